//! The rules of one Web Messaging session, as a pure state machine: inputs (socket opened or
//! lost, a decoded frame, a pong, a command, a history result, a tick) in; actions (connect,
//! write a client action, ping, emit an event, answer a command, fetch history, stop) out. It
//! owns no socket and reads no clock: the caller passes `now` (monotonic) and `wall_ms` (the
//! wall clock, for the platform's `expirationDate` in epoch seconds), so every rule is tested
//! without sockets and in no time.
//!
//! What it decides (`../shared/protocol/genesys-web-messaging.md` sections 5, 7 and 10):
//! - Liveness from the client side: a websocket ping every `ping_interval`; a ping unanswered
//!   by the next one means the socket is dead. There is no server heartbeat to wait for.
//! - Reconnect with the same token for as long as the session lives: the bound is the session's
//!   expiry as last seen (`expirationDate` from `SessionResponse` and echo replies, moved on by
//!   every message either way), not a fixed grace window. A reconnect answered with
//!   `newSession: true` means the old session expired while guestd was away.
//! - After each reconnect, a backfill: `getJwt`, then history, each message emitted once, in
//!   order, after the last one seen; within `history_per_minute` (a backfill over the quota
//!   waits for it). Live messages that arrive while a backfill is outstanding are held and
//!   emitted after it: emitted at once, they moved the last message seen past the ones the
//!   backfill was to fetch, which were then skipped (lost).
//! - Sends: queued, paced under `messages_per_second`, matched to their echo by `tracingId`; a
//!   `TooManyRequestsErrorMessage` puts the send back at the head of the queue and pauses sends
//!   for `retryAfter` seconds without touching the socket; a 409 makes the session read-only
//!   and every later send is refused here.
//! - Typing at most once per `typing_interval` (more are answered but not sent).
//! - Ends, each exactly once: a Presence Disconnect (the conversation; read-only or not), the
//!   session expired (the event, code 4006, or a new session on reconnect), not found (4007),
//!   cleared, the connection closed by the platform (signed in elsewhere, logged out, evicted:
//!   never reconnected, which would evict the user's own client in turn), guest_left (a leave:
//!   Presence Clear where the deployment allows it, else `closeSession`), started_new, and
//!   reconnect_grace_expired when the platform cannot be reached past the last known expiry.
//!   When the deployment's Conversation Disconnect is off, an agent's end never reaches the
//!   guest: the machine never invents one.
//! - No 15-minute rule: an `expiry_warning` before the session expires instead.
//!
//! One `Machine` value, its rules split by concern into child modules that each add methods to
//! it: `types` (the inputs, actions, replies and refusals the actor trades with it),
//! `clock` (deadlines, the session's expiry, and what a tick does), `connection` (opening,
//! losing and configuring the socket, reconnecting until the last known expiry), `frames`
//! (what each server frame means), and `backfill` (messages once and in order, the history
//! backfill after a reconnect). This file holds the state, the `step` that dispatches inputs,
//! the send queue, and the one `end`.

mod backfill;
mod clock;
mod connection;
mod frames;
mod types;

pub use types::{Action, Begin, Deployment, Input, Out, Phase, Refusal, Reply};

use super::Settings;
use super::protocol::{Frame, SessionResponse, StructuredMessage, code};
use crate::backoff_policy::Backoff;
use crate::events::{EndExtra, EndReason, EndScope, EventKind};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long after the last known expiry an unreachable session is given up.
pub const EXPIRY_SLACK: Duration = Duration::from_secs(5);
/// How long a `SessionResponse` may take after the socket opened.
pub const CONFIGURE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a leave waits for the platform to confirm it.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a queued send may wait (paced, rate limited, or while reconnecting).
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Message keys remembered to de-duplicate live frames against the backfill.
const SEEN: usize = 64;
/// The echo's tracing id prefix (echo replies are not messages).
const ECHO_TID: &str = "echo-";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backfill {
    Idle,
    /// Waiting for the history quota.
    Due(Instant),
    WantJwt,
    Fetching,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    No,
    /// Asked while not live: done once configured.
    Pending,
    Sent(Instant),
}

/// One Web Messaging session's state.
#[derive(Debug)]
pub struct Machine {
    s: Arc<Settings>,
    deployment: Deployment,
    begin: Begin,
    started: Instant,
    phase: Phase,
    configured_once: bool,
    ended: Option<EndReason>,
    read_only: bool,
    /// The session's expiry as last seen, and its duration.
    expires: Option<Instant>,
    duration: Option<Duration>,
    warned: bool,
    last_key: Option<String>,
    seen: VecDeque<String>,
    /// Live messages that arrived while a backfill was outstanding, with when: emitted after
    /// it (kept across a drop; those the next backfill fetches are skipped as seen).
    held: VecDeque<(StructuredMessage, Instant)>,
    outbox: VecDeque<(String, String, Instant)>,
    /// Written, awaiting their echo: tracing id, text (sent again after a 429), when.
    inflight: Vec<(String, String, Instant)>,
    sent: VecDeque<Instant>,
    paused_until: Option<Instant>,
    last_typing: Option<Instant>,
    next_ping: Option<Instant>,
    awaiting_pong: bool,
    last_echo: Option<Instant>,
    echoes: u32,
    configure_by: Option<Instant>,
    lost_at: Option<Instant>,
    attempt: u32,
    retry_at: Option<Instant>,
    backoff: Option<Box<Backoff>>,
    backfill: Backfill,
    history_calls: VecDeque<Instant>,
    leave: Leave,
    start_new: Option<String>,
}

fn extra(scope: EndScope, read_only: bool) -> EndExtra {
    EndExtra {
        scope: Some(scope),
        read_only,
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl Machine {
    /// A session beginning `begin`, with what the deployment's configuration said.
    pub fn new(s: Arc<Settings>, deployment: Deployment, begin: Begin, now: Instant) -> Self {
        Machine {
            s,
            deployment,
            begin,
            started: now,
            phase: Phase::Connecting,
            configured_once: false,
            ended: None,
            read_only: false,
            expires: None,
            duration: None,
            warned: false,
            last_key: None,
            seen: VecDeque::new(),
            held: VecDeque::new(),
            outbox: VecDeque::new(),
            inflight: Vec::new(),
            sent: VecDeque::new(),
            paused_until: None,
            last_typing: None,
            next_ping: None,
            awaiting_pong: false,
            last_echo: None,
            echoes: 0,
            configure_by: None,
            lost_at: None,
            attempt: 0,
            retry_at: None,
            backoff: None,
            backfill: Backfill::Idle,
            history_calls: VecDeque::new(),
            leave: Leave::No,
            start_new: None,
        }
    }

    /// Resume after `last_message_id` (from the journal); `started` is the session's start.
    /// The window to reach the platform counts from the resume (the machine's creation), as
    /// after a loss: counted from the session's start, a session resumed more than
    /// `first_connect_window` after it began was given up at its first tick, before its socket
    /// could open.
    pub fn resuming(mut self, started: Instant, last_message_id: Option<String>) -> Self {
        self.lost_at = Some(self.started);
        self.started = started;
        self.last_key = last_message_id;
        self
    }

    /// A leave accepted before a restart: done as soon as the session is configured.
    pub fn leaving(mut self) -> Self {
        self.leave = Leave::Pending;
        self
    }

    /// Where the session is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Why it ended, once it has.
    pub fn ended(&self) -> Option<EndReason> {
        self.ended
    }

    /// Whether the session may not send any more.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The newest message seen.
    pub fn last_message_id(&self) -> Option<&str> {
        self.last_key.as_deref()
    }

    /// What the deployment's configuration said.
    pub fn deployment(&self) -> Deployment {
        self.deployment
    }

    /// The session's expiry as last seen.
    pub fn expires(&self) -> Option<Instant> {
        self.expires
    }

    /// The first actions: open the socket.
    pub fn start(&mut self) -> Vec<Action> {
        vec![Action::Connect]
    }

    /// Feed one input; the actions to perform, in order.
    pub fn step(&mut self, input: Input, now: Instant, wall_ms: i64) -> Vec<Action> {
        let mut out = Vec::new();
        if self.phase == Phase::Ended {
            match input {
                Input::Send { tid, .. } | Input::Typing(tid) | Input::StartNew(tid) => {
                    out.push(Action::Reply(tid, Err(Refusal::Ended)))
                }
                _ => {}
            }
            return out;
        }
        match input {
            Input::Opened => self.opened(now, &mut out),
            Input::ConnectFailed { detail, fatal } => {
                if fatal {
                    self.end(
                        EndReason::ServerEnded,
                        format!("the platform refused the socket: {detail}"),
                        extra(EndScope::Session, false),
                        now,
                        &mut out,
                    );
                } else {
                    self.schedule_retry(format!("connect failed: {detail}"), now, &mut out);
                }
            }
            Input::Lost(why) => self.lost(why, now, &mut out),
            Input::Pong => self.awaiting_pong = false,
            Input::Frame(f) => self.frame(f, now, wall_ms, &mut out),
            Input::Send { tid, text } => {
                if self.read_only {
                    out.push(Action::Reply(tid, Err(Refusal::ReadOnly)));
                } else {
                    self.outbox.push_back((tid, text, now));
                    self.flush(now, &mut out);
                }
            }
            Input::Typing(tid) => {
                if self.read_only {
                    out.push(Action::Reply(tid, Err(Refusal::ReadOnly)));
                } else if self.phase != Phase::Live {
                    out.push(Action::Reply(tid, Err(Refusal::NotLive)));
                } else {
                    let due = self
                        .last_typing
                        .is_none_or(|t| now >= t + self.s.typing_interval);
                    if due {
                        self.last_typing = Some(now);
                        out.push(Action::Write(Out::Typing));
                    }
                    out.push(Action::Reply(tid, Ok(Reply::Typed)));
                }
            }
            Input::Leave => {
                if self.leave == Leave::No {
                    self.leave = Leave::Pending;
                }
                if self.phase == Phase::Live {
                    self.send_leave(now, &mut out);
                }
            }
            Input::StartNew(tid) => {
                if self.phase != Phase::Live {
                    out.push(Action::Reply(tid, Err(Refusal::NotLive)));
                } else if self.start_new.is_none() {
                    self.start_new = Some(tid);
                    out.push(Action::Write(Out::CloseSession));
                } else {
                    out.push(Action::Reply(tid, Err(Refusal::NotLive)));
                }
            }
            Input::History { messages, calls } => self.history(messages, calls, now, &mut out),
            Input::Tick => self.tick(now, wall_ms, &mut out),
        }
        out
    }

    fn send_leave(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.leave = Leave::Sent(now);
        if self.deployment.clear_allowed == Some(false) {
            out.push(Action::Write(Out::CloseSession));
        } else {
            out.push(Action::Write(Out::Clear));
        }
    }

    fn flush(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.phase != Phase::Live {
            return;
        }
        if self.paused_until.is_some_and(|t| now < t) {
            return;
        }
        self.paused_until = None;
        if self.leave == Leave::Pending {
            return self.send_leave(now, out);
        }
        while self
            .sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            self.sent.pop_front();
        }
        while self.sent.len() < self.s.messages_per_second as usize {
            let Some((tid, text, _)) = self.outbox.pop_front() else {
                break;
            };
            self.sent.push_back(now);
            self.inflight.push((tid.clone(), text.clone(), now));
            out.push(Action::Write(Out::Text { tid, text }));
        }
    }

    fn end(
        &mut self,
        reason: EndReason,
        detail: String,
        extra: EndExtra,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if self.ended.is_some() {
            return;
        }
        self.ended = Some(reason);
        // Messages seen live but held behind a backfill come out before the end.
        self.release_held(out);
        self.phase = Phase::Ended;
        for (tid, _, _) in self.inflight.drain(..) {
            out.push(Action::Reply(tid, Err(Refusal::Ended)));
        }
        for (tid, _, _) in self.outbox.drain(..) {
            out.push(Action::Reply(tid, Err(Refusal::Ended)));
        }
        if let Some(tid) = self.start_new.take() {
            out.push(Action::Reply(tid, Err(Refusal::Ended)));
        }
        out.push(Action::Emit(EventKind::Ended {
            reason,
            duration_ms: ms(now.saturating_duration_since(self.started)),
            detail,
            extra,
        }));
        out.push(Action::CloseSocket);
        out.push(Action::Stop);
    }
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
