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

use super::Settings;
use super::protocol::{Frame, SessionResponse, StructuredMessage, code};
use crate::backoff_policy::Backoff;
use crate::events::{EndExtra, EndReason, EndScope, EventKind};
use crate::secret::Secret;
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

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Opening the first socket.
    Connecting,
    /// Socket open, `configureSession` sent, no `SessionResponse` yet.
    Configuring,
    /// Configured.
    Live,
    /// The socket was lost; a new one is due or being opened.
    Reconnecting,
    /// Over.
    Ended,
}

impl Phase {
    /// The name in the session's view.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Configuring => "configuring",
            Phase::Live => "connected",
            Phase::Reconnecting => "reconnecting",
            Phase::Ended => "ended",
        }
    }
}

/// A client action the actor encodes with the session's token.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    /// `configureSession`.
    Configure {
        /// `startNew`.
        start_new: bool,
    },
    /// Guest text, tagged `tid`.
    Text {
        /// Tracing id.
        tid: String,
        /// Text.
        text: String,
    },
    /// Typing on.
    Typing,
    /// Presence Join (the deployment auto-starts conversations).
    Join,
    /// Presence Clear (leave, where the deployment allows it).
    Clear,
    /// Health check, tagged `tid`.
    Echo {
        /// Tracing id.
        tid: String,
    },
    /// A bearer for the history call.
    GetJwt,
    /// Close every socket of the session.
    CloseSession,
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// The session has ended.
    #[error("the session has ended")]
    Ended,
    /// The conversation ended in ReadOnly mode: no new messages.
    #[error("the session is read-only: its conversation was ended; start_new begins another")]
    ReadOnly,
    /// The platform refused the message (code and text).
    #[error("refused by the platform ({0}): {1}")]
    Rejected(u16, String),
    /// The socket was lost after the message was written and before its echo: it may or may
    /// not have been delivered.
    #[error(
        "the connection was lost before the platform confirmed the message; it may have been delivered"
    )]
    Unconfirmed,
    /// No echo within `send_timeout` while the socket stayed up: it may or may not have been
    /// delivered.
    #[error(
        "the platform did not confirm the message within {0:?} (the connection stayed up); it may have been delivered"
    )]
    NotEchoed(Duration),
    /// Not sent within the queue timeout (rate limited or disconnected).
    #[error("not sent within {0:?} (rate limited or disconnected)")]
    Timeout(Duration),
    /// The command needs a configured session.
    #[error("the session is not connected; retry")]
    NotLive,
}

/// What a command did.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The platform echoed the message.
    Sent {
        /// Its id (`channel.messageId`, else `id`).
        message_id: String,
        /// `channel.time`.
        timestamp: String,
    },
    /// Typing was sent or coalesced.
    Typed,
    /// The session was closed for `start_new`.
    Closed,
}

/// Something that happened to the session.
#[derive(Debug)]
pub enum Input {
    /// The socket is open.
    Opened,
    /// A connect attempt failed; `fatal` when retrying cannot help (the upgrade was refused
    /// with a 4xx).
    ConnectFailed {
        /// What went wrong.
        detail: String,
        /// Do not retry.
        fatal: bool,
    },
    /// The socket is gone.
    Lost(String),
    /// A decoded frame.
    Frame(Frame),
    /// A websocket pong.
    Pong,
    /// Send `text` (command id `tid`, also the tracing id).
    Send {
        /// Command id.
        tid: String,
        /// Text.
        text: String,
    },
    /// Typing (command id).
    Typing(String),
    /// Leave (already made durable by the caller).
    Leave,
    /// Close the session so a new one can start (command id).
    StartNew(String),
    /// A backfill's result: the history pages' messages and the calls it took.
    History {
        /// Messages, any order.
        messages: Result<Vec<StructuredMessage>, String>,
        /// History calls made.
        calls: u32,
    },
    /// A deadline may have passed.
    Tick,
}

/// What the actor must do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Open a socket.
    Connect,
    /// Close the socket (if any).
    CloseSocket,
    /// Write a client action.
    Write(Out),
    /// Send a websocket ping.
    Ping,
    /// Emit an event.
    Emit(EventKind),
    /// Answer command `tid`.
    Reply(String, Result<Reply, Refusal>),
    /// Fetch history with `jwt`, newest pages first, until `after` is found.
    FetchHistory {
        /// The bearer from `JwtResponse`.
        jwt: Secret,
        /// The last message seen.
        after: Option<String>,
    },
    /// The session is over.
    Stop,
}

/// How a session begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begin {
    /// `start`: a session guestd opens (fresh unless the token is known).
    Start {
        /// `configureSession{startNew: true}`.
        start_new: bool,
    },
    /// `attach`: an existing session; a `newSession: true` answer is fine (the platform may
    /// have none yet for this token) but one that is read-only ends at once.
    Attach,
    /// From the journal after a restart (or another node): the session must still exist.
    Resume,
}

/// What the deployment's `config.json` said (None where it could not be read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deployment {
    /// Conversation Disconnect is on: an agent's end reaches the guest.
    pub disconnect_visible: Option<bool>,
    /// `conversationClear.enabled`.
    pub clear_allowed: Option<bool>,
    /// `autoStart.enabled`.
    pub auto_start: bool,
}

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

    /// The earliest time a [`Input::Tick`] can change anything.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.phase == Phase::Ended {
            return None;
        }
        let mut d: Option<Instant> = None;
        let mut at = |t: Option<Instant>| {
            if let Some(t) = t {
                d = Some(d.map_or(t, |x| x.min(t)));
            }
        };
        at(self.retry_at);
        at(self.configure_by);
        at(self.next_ping);
        at(self
            .inflight
            .iter()
            .map(|(_, _, t)| *t + self.s.send_timeout)
            .min());
        at(self.outbox.front().map(|(_, _, t)| *t + QUEUE_TIMEOUT));
        if self.phase == Phase::Live {
            at(self.next_send_slot());
            if self.leave == Leave::Pending {
                at(self.paused_until);
            }
        }
        if let Backfill::Due(t) = self.backfill {
            at(Some(t));
        }
        if let Leave::Sent(t) = self.leave {
            at(Some(t + LEAVE_TIMEOUT));
        }
        at(self.give_up_at());
        if let Some(e) = self.expires {
            if !self.warned && !self.s.expiry_warning_lead.is_zero() {
                at(Some(e.checked_sub(self.s.expiry_warning_lead).unwrap_or(e)));
            }
            if self.phase == Phase::Live {
                at(Some(self.echo_due(e)));
            }
        }
        d
    }

    /// When the session ends if nothing happens, and why (`ends_at`/`ends_because` in `status`
    /// and `get`): while the socket is down (or not open yet), when guestd gives it up
    /// (`reconnect_grace_expired`: the last known expiry plus a slack, or
    /// `first_connect_window` before any expiry is known); otherwise the session's expiry as
    /// last seen (`session_expired`; every message moves it on). None once ended, and before
    /// the platform has named an expiry.
    pub fn ends(&self) -> Option<(Instant, EndReason)> {
        if self.phase == Phase::Ended {
            return None;
        }
        if let Some(t) = self.give_up_at() {
            return Some((t, EndReason::ReconnectGraceExpired));
        }
        self.expires.map(|e| (e, EndReason::SessionExpired))
    }

    /// When a session that cannot reconnect is given up.
    fn give_up_at(&self) -> Option<Instant> {
        if !matches!(self.phase, Phase::Reconnecting | Phase::Connecting) {
            return None;
        }
        match self.expires {
            Some(e) => Some(e + EXPIRY_SLACK),
            None => self
                .lost_at
                .or(Some(self.started))
                .map(|t| t + self.s.first_connect_window),
        }
    }

    /// When to check, by echo, whether the session expired: just after its expiry, then no
    /// more often than `echo_interval`.
    fn echo_due(&self, expires: Instant) -> Instant {
        let after = expires + Duration::from_secs(2);
        match self.last_echo {
            Some(t) if t + self.s.echo_interval > after => t + self.s.echo_interval,
            _ => after,
        }
    }

    fn next_send_slot(&self) -> Option<Instant> {
        if self.outbox.is_empty() {
            return None;
        }
        let rate = self.s.messages_per_second as usize;
        let slot = if self.sent.len() >= rate {
            self.sent
                .get(self.sent.len() - rate)
                .map(|t| *t + Duration::from_secs(1))
        } else {
            None
        };
        match (slot, self.paused_until) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
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

    fn opened(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.phase = Phase::Configuring;
        self.retry_at = None;
        self.configure_by = Some(now + CONFIGURE_TIMEOUT);
        self.awaiting_pong = false;
        self.next_ping = Some(now + self.s.ping_interval);
        let start_new =
            matches!(self.begin, Begin::Start { start_new: true }) && !self.configured_once;
        out.push(Action::Write(Out::Configure { start_new }));
    }

    fn lost(&mut self, why: String, now: Instant, out: &mut Vec<Action>) {
        let was_open = matches!(self.phase, Phase::Live | Phase::Configuring);
        out.push(Action::CloseSocket);
        if was_open {
            out.push(Action::Emit(EventKind::Disconnected {
                reason: why.clone(),
            }));
        }
        for (tid, _, _) in self.inflight.drain(..) {
            out.push(Action::Reply(tid, Err(Refusal::Unconfirmed)));
        }
        if let Some(tid) = self.start_new.take() {
            out.push(Action::Reply(tid, Err(Refusal::NotLive)));
        }
        if let Leave::Sent(_) = self.leave {
            // Sent again once configured.
            self.leave = Leave::Pending;
        }
        self.configure_by = None;
        self.next_ping = None;
        self.awaiting_pong = false;
        if self.backfill != Backfill::Idle {
            self.backfill = Backfill::Idle;
        }
        self.schedule_retry(why, now, out);
    }

    fn schedule_retry(&mut self, cause: String, now: Instant, out: &mut Vec<Action>) {
        if self.phase != Phase::Connecting {
            self.phase = Phase::Reconnecting;
            self.lost_at.get_or_insert(now);
        }
        if let Some(end) = self.give_up_at() {
            if now >= end {
                return self.give_up(now, out);
            }
        }
        let backoff = self
            .backoff
            .get_or_insert_with(|| Box::new(Backoff::new(&self.s.backoff)));
        let delay = backoff.next_delay();
        self.attempt += 1;
        let left = self
            .give_up_at()
            .map_or(0, |e| ms(e.saturating_duration_since(now)));
        self.retry_at = Some(now + delay);
        out.push(Action::Emit(EventKind::Reconnecting {
            attempt: self.attempt,
            delay_ms: ms(delay),
            grace_left_ms: left,
            cause,
        }));
    }

    fn give_up(&mut self, now: Instant, out: &mut Vec<Action>) {
        let detail = if self.expires.is_some() {
            "the platform could not be reached before the session's last known expiry".to_string()
        } else {
            format!(
                "no session could be configured within {:?}",
                self.s.first_connect_window
            )
        };
        self.end(
            EndReason::ReconnectGraceExpired,
            detail,
            extra(EndScope::Session, false),
            now,
            out,
        );
    }

    fn refresh_expiry(
        &mut self,
        r_exp: Option<u64>,
        r_dur: Option<u64>,
        now: Instant,
        wall_ms: i64,
    ) {
        if let Some(d) = r_dur {
            self.duration = Some(Duration::from_secs(d));
        }
        if let Some(exp_s) = r_exp {
            let left_ms = (exp_s as i64).saturating_mul(1000) - wall_ms;
            self.set_expiry(now + Duration::from_millis(left_ms.max(0) as u64));
        }
    }

    fn set_expiry(&mut self, at: Instant) {
        let lead = self.s.expiry_warning_lead;
        if self.warned && self.expires.is_some_and(|old| at > old + lead) {
            // Moved well past the old warning: warn again before the new expiry.
            self.warned = false;
        }
        self.expires = Some(at);
    }

    /// Any message either way restarts the session's time to live.
    fn activity(&mut self, now: Instant) {
        if let Some(d) = self.duration {
            self.set_expiry(now + d);
        }
    }

    fn configured(
        &mut self,
        r: SessionResponse,
        now: Instant,
        wall_ms: i64,
        out: &mut Vec<Action>,
    ) {
        if !r.connected {
            // The reply to closeSession.
            if let Some(tid) = self.start_new.take() {
                out.push(Action::Reply(tid, Ok(Reply::Closed)));
                return self.end(
                    EndReason::StartedNew,
                    "the session was closed for start_new".into(),
                    extra(EndScope::Session, self.read_only),
                    now,
                    out,
                );
            }
            if matches!(self.leave, Leave::Sent(_)) {
                return self.end(
                    EndReason::GuestLeft,
                    "guestd closed the session (closeSession)".into(),
                    extra(EndScope::Session, false),
                    now,
                    out,
                );
            }
            return;
        }
        let again = self.configured_once || self.begin == Begin::Resume;
        if again && r.new_session {
            return self.end(
                EndReason::SessionExpired,
                "the platform answered the reconnect with a new session: the old one had expired"
                    .into(),
                extra(EndScope::Session, false),
                now,
                out,
            );
        }
        if r.read_only {
            self.read_only = true;
            return self.end(
                EndReason::ConversationDisconnected,
                "the session is read-only: its conversation was ended in ReadOnly mode".into(),
                extra(EndScope::Conversation, true),
                now,
                out,
            );
        }
        self.configure_by = None;
        self.refresh_expiry(r.expiration_date, r.duration_seconds, now, wall_ms);
        if let Some(b) = self.backoff.as_mut() {
            b.reset();
        }
        self.attempt = 0;
        self.phase = Phase::Live;
        if !self.configured_once && self.begin != Begin::Resume {
            self.configured_once = true;
            out.push(Action::Emit(EventKind::Connected));
            if r.new_session && self.deployment.auto_start {
                out.push(Action::Write(Out::Join));
            }
        } else {
            self.configured_once = true;
            self.start_backfill(now, out);
        }
        if self.leave == Leave::Pending {
            return self.send_leave(now, out);
        }
        self.flush(now, out);
    }

    fn send_leave(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.leave = Leave::Sent(now);
        if self.deployment.clear_allowed == Some(false) {
            out.push(Action::Write(Out::CloseSession));
        } else {
            out.push(Action::Write(Out::Clear));
        }
    }

    fn start_backfill(&mut self, now: Instant, out: &mut Vec<Action>) {
        while self
            .history_calls
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            self.history_calls.pop_front();
        }
        if self.history_calls.len() < self.s.history_per_minute as usize {
            self.backfill = Backfill::WantJwt;
            out.push(Action::Write(Out::GetJwt));
        } else {
            let at = self.history_calls[0] + Duration::from_secs(60);
            self.backfill = Backfill::Due(at);
        }
    }

    fn reconnected(&mut self, backfilled: u32, now: Instant, out: &mut Vec<Action>) {
        let downtime = self
            .lost_at
            .take()
            .map_or(0, |t| ms(now.saturating_duration_since(t)));
        out.push(Action::Emit(EventKind::Reconnected {
            downtime_ms: downtime,
            backfilled,
        }));
    }

    fn history(
        &mut self,
        messages: Result<Vec<StructuredMessage>, String>,
        calls: u32,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        for _ in 0..calls {
            self.history_calls.push_back(now);
        }
        if self.backfill != Backfill::Fetching {
            return;
        }
        self.backfill = Backfill::Idle;
        match messages {
            Ok(mut msgs) => {
                // Oldest first: the pages come newest first (the reference, the emulator, the
                // Transport SDK's fixtures), so reverse them, then order by time with a stable
                // sort, so messages of the same millisecond keep the platform's order
                // ([UNCERTAIN] the page order in the reference); then only what follows the
                // last message seen.
                msgs.reverse();
                msgs.sort_by(|a, b| {
                    let t = |m: &StructuredMessage| m.channel.as_ref().and_then(|c| c.time.clone());
                    t(a).cmp(&t(b))
                });
                let start = match &self.last_key {
                    Some(k) => msgs.iter().position(|m| m.key() == k).map_or(0, |i| i + 1),
                    None => 0,
                };
                let mut n = 0;
                for m in msgs.into_iter().skip(start) {
                    if self.message(m, true, now, out) {
                        n += 1;
                    }
                }
                self.reconnected(n, now, out);
            }
            Err(e) => {
                out.push(Action::Emit(EventKind::StreamError {
                    detail: format!("history backfill failed: {e}"),
                }));
                self.reconnected(0, now, out);
            }
        }
        self.release_held(out);
    }

    /// Emit the live messages held behind a backfill, in arrival order (those a backfill
    /// already emitted are skipped as seen).
    fn release_held(&mut self, out: &mut Vec<Action>) {
        while let Some((m, at)) = self.held.pop_front() {
            self.message(m, false, at, out);
        }
    }

    /// Emit a message once; whether it was new.
    fn message(
        &mut self,
        m: StructuredMessage,
        backfilled: bool,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> bool {
        let key = m.key().to_string();
        // Events and delivery receipts are not messages (a Receipt is the platform saying a
        // message was delivered or read).
        if m.kind == "Event" || m.kind == "Receipt" || self.seen.contains(&key) {
            return false;
        }
        if self.seen.len() >= SEEN {
            self.seen.pop_front();
        }
        self.seen.push_back(key.clone());
        self.last_key = Some(key.clone());
        if !backfilled {
            self.activity(now);
        }
        let (sender_id, role) = sender(&m);
        out.push(Action::Emit(EventKind::Message {
            message_id: key,
            sender_id: sender_id.into(),
            sender_role: role.into(),
            body_type: if m.kind == "Text" || m.kind == "Structured" {
                "standard".into()
            } else {
                "unknown".into()
            },
            body: if self.s.include_bodies {
                m.text.clone()
            } else {
                None
            },
            timestamp: m
                .channel
                .as_ref()
                .and_then(|c| c.time.clone())
                .unwrap_or_default(),
            backfilled,
        }));
        true
    }

    fn frame(&mut self, f: Frame, now: Instant, wall_ms: i64, out: &mut Vec<Action>) {
        match f {
            Frame::Session(r) => self.configured(r, now, wall_ms, out),
            Frame::Message {
                message,
                tracing_id,
                ..
            } => {
                if tracing_id.as_deref().is_some_and(|t| {
                    t.starts_with(ECHO_TID) || t == super::protocol::HEALTH_CHECK_ID
                }) {
                    self.refresh_expiry(
                        message.expiration_date(),
                        message.duration_seconds(),
                        now,
                        wall_ms,
                    );
                    return;
                }
                if let Some(read_only) = message.disconnect() {
                    self.read_only |= read_only;
                    let who = message
                        .originating_entity
                        .as_deref()
                        .unwrap_or("the platform");
                    let mode = if read_only { "ReadOnly" } else { "Send" };
                    return self.end(
                        EndReason::ConversationDisconnected,
                        format!("Presence Disconnect from {who} ({mode} mode)"),
                        extra(EndScope::Conversation, read_only),
                        now,
                        out,
                    );
                }
                if message.direction == "Outbound" && message.typing() {
                    // The platform's typing events name no originatingEntity (the Messenger
                    // Transport SDK reads every one as the agent's): only a bot's says Bot.
                    let (id, role) = if message.originating_entity.as_deref() == Some("Bot") {
                        ("bot", "workflow")
                    } else {
                        ("agent", "agent")
                    };
                    out.push(Action::Emit(EventKind::Typing {
                        sender_id: id.into(),
                        sender_role: role.into(),
                    }));
                    return;
                }
                if let Some(i) = self.inflight_index(tracing_id.as_deref()) {
                    let (tid, _, _) = self.inflight.remove(i);
                    out.push(Action::Reply(
                        tid,
                        Ok(Reply::Sent {
                            message_id: message.key().to_string(),
                            timestamp: message
                                .channel
                                .as_ref()
                                .and_then(|c| c.time.clone())
                                .unwrap_or_default(),
                        }),
                    ));
                }
                if self.backfill == Backfill::Idle {
                    self.message(*message, false, now, out);
                } else {
                    self.held.push_back((*message, now));
                }
            }
            Frame::Jwt { jwt, .. } => {
                if self.backfill == Backfill::WantJwt {
                    self.backfill = Backfill::Fetching;
                    out.push(Action::FetchHistory {
                        jwt,
                        after: self.last_key.clone(),
                    });
                }
            }
            Frame::SessionExpired => self.end(
                EndReason::SessionExpired,
                "SessionExpiredEvent".into(),
                extra(EndScope::Session, self.read_only),
                now,
                out,
            ),
            Frame::SessionCleared => {
                let (reason, detail) = if matches!(self.leave, Leave::Sent(_)) {
                    (
                        EndReason::GuestLeft,
                        "guestd cleared the session (Presence Clear)",
                    )
                } else {
                    (
                        EndReason::SessionCleared,
                        "SessionClearedEvent: cleared by another client of the token",
                    )
                };
                self.end(
                    reason,
                    detail.into(),
                    extra(EndScope::Session, false),
                    now,
                    out,
                )
            }
            Frame::ConnectionClosed { reason } => {
                let (scope, detail) = match reason.as_deref() {
                    Some("signedIn") => (EndScope::Session, "ConnectionClosedEvent: signed in elsewhere".to_string()),
                    Some(r) => (EndScope::Session, format!("ConnectionClosedEvent: {r}")),
                    None => (
                        EndScope::Connection,
                        "ConnectionClosedEvent: evicted by another connection of the token (not reopened: that would evict it in turn)".to_string(),
                    ),
                };
                self.end(
                    EndReason::ConnectionClosed,
                    detail,
                    extra(scope, self.read_only),
                    now,
                    out,
                )
            }
            Frame::Logout => self.end(
                EndReason::ConnectionClosed,
                "LogoutEvent: logged out elsewhere".into(),
                extra(EndScope::Session, false),
                now,
                out,
            ),
            Frame::TooManyRequests {
                retry_after,
                tracing_id,
            } => {
                let pause = Duration::from_secs(retry_after.max(1));
                self.paused_until = Some(now + pause);
                // Without a tracingId (the only shape the Transport SDK's fixtures show) the
                // refused send is taken to be the oldest unconfirmed one: the platform answers
                // in order. Sent again after the pause; its echo carries its tracingId, so it
                // is confirmed once.
                let refused = match tracing_id.as_deref() {
                    Some(_) => self.inflight_index(tracing_id.as_deref()),
                    None if !self.inflight.is_empty() => Some(0),
                    None => None,
                };
                if let Some(i) = refused {
                    // Refused, not sent: back to the head of the queue.
                    let (tid, text, _) = self.inflight.remove(i);
                    self.outbox.push_front((tid, text, now));
                } else if matches!(self.leave, Leave::Sent(_)) {
                    // The leave itself was refused: sent again after the pause.
                    self.leave = Leave::Pending;
                }
            }
            Frame::Error {
                code: c,
                text,
                tracing_id,
            } => self.error(c, text, tracing_id, now, out),
            Frame::Unknown(_) => {}
        }
    }

    fn inflight_index(&self, tid: Option<&str>) -> Option<usize> {
        let tid = tid?;
        self.inflight.iter().position(|(x, _, _)| x == tid)
    }

    fn error(
        &mut self,
        c: u16,
        text: String,
        tid: Option<String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        match c {
            code::SESSION_EXPIRED => {
                return self.end(
                    EndReason::SessionExpired,
                    format!("error {c}: {text}"),
                    extra(EndScope::Session, self.read_only),
                    now,
                    out,
                );
            }
            code::SESSION_NOT_FOUND => {
                return self.end(
                    EndReason::SessionNotFound,
                    format!("error {c}: {text}"),
                    extra(EndScope::Session, false),
                    now,
                    out,
                );
            }
            _ => {}
        }
        if let Some(i) = self.inflight_index(tid.as_deref()) {
            let (tid, _, _) = self.inflight.remove(i);
            let refusal = if c == code::READ_ONLY {
                self.read_only = true;
                Refusal::ReadOnly
            } else {
                Refusal::Rejected(c, text)
            };
            out.push(Action::Reply(tid, Err(refusal)));
            return;
        }
        if matches!(self.leave, Leave::Sent(_)) && c == 403 {
            // Clear is off for this deployment: close the session instead.
            self.deployment.clear_allowed = Some(false);
            self.leave = Leave::Sent(now);
            out.push(Action::Write(Out::CloseSession));
            return;
        }
        if self.phase == Phase::Configuring && (c == 401 || c == 403) {
            return self.end(
                EndReason::ServerEnded,
                format!("configureSession refused ({c}): {text}"),
                extra(EndScope::Session, false),
                now,
                out,
            );
        }
        out.push(Action::Emit(EventKind::StreamError {
            detail: format!("error frame {c}: {text}"),
        }));
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

    fn tick(&mut self, now: Instant, wall_ms: i64, out: &mut Vec<Action>) {
        if let Some(end) = self.give_up_at() {
            if now >= end {
                return self.give_up(now, out);
            }
        }
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
            out.push(Action::Connect);
        }
        if self.configure_by.is_some_and(|t| now >= t) {
            return self.lost("no SessionResponse within 10 s".into(), now, out);
        }
        if self.next_ping.is_some_and(|t| now >= t) {
            if self.awaiting_pong {
                return self.lost(
                    format!("no pong within {:?}", self.s.ping_interval),
                    now,
                    out,
                );
            }
            self.awaiting_pong = true;
            self.next_ping = Some(now + self.s.ping_interval);
            out.push(Action::Ping);
        }
        let timeout = self.s.send_timeout;
        let mut i = 0;
        while i < self.inflight.len() {
            if now >= self.inflight[i].2 + timeout {
                let (tid, _, _) = self.inflight.remove(i);
                out.push(Action::Reply(tid, Err(Refusal::NotEchoed(timeout))));
            } else {
                i += 1;
            }
        }
        while self
            .outbox
            .front()
            .is_some_and(|(_, _, t)| now >= *t + QUEUE_TIMEOUT)
        {
            if let Some((tid, _, _)) = self.outbox.pop_front() {
                out.push(Action::Reply(tid, Err(Refusal::Timeout(QUEUE_TIMEOUT))));
            }
        }
        if let Leave::Sent(t) = self.leave {
            if now >= t + LEAVE_TIMEOUT {
                return self.end(
                    EndReason::GuestLeft,
                    "guestd left the session (no confirmation within 5 s)".into(),
                    extra(EndScope::Session, false),
                    now,
                    out,
                );
            }
        }
        if let Backfill::Due(t) = self.backfill {
            if now >= t && self.phase == Phase::Live {
                self.start_backfill(now, out);
            }
        }
        if let Some(e) = self.expires {
            let lead = self.s.expiry_warning_lead;
            if !self.warned && !lead.is_zero() && now + lead >= e {
                // Marked even when the expiry has already passed (a clock ahead of the
                // platform's, an expiry reported in the past), so its deadline does not stay
                // due; warned only while it is still ahead.
                self.warned = true;
                if now < e {
                    let left = e.saturating_duration_since(now);
                    let at = chrono::DateTime::from_timestamp_millis(wall_ms + ms(left) as i64)
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                        .unwrap_or_default();
                    out.push(Action::Emit(EventKind::ExpiryWarning {
                        remaining_ms: ms(left),
                        expires_at: at,
                    }));
                }
            }
            if self.phase == Phase::Live && now >= self.echo_due(e) {
                self.last_echo = Some(now);
                self.echoes += 1;
                out.push(Action::Write(Out::Echo {
                    tid: format!("{ECHO_TID}{}", self.echoes),
                }));
            }
        }
        self.flush(now, out);
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

/// The sender of a message as guestd names it: the guest (`Inbound`), else the agent (`Human`)
/// or a flow/bot.
fn sender(m: &StructuredMessage) -> (&'static str, &'static str) {
    if m.direction == "Inbound" {
        ("guest", "customer")
    } else if m.originating_entity.as_deref() == Some("Human") {
        ("agent", "agent")
    } else {
        ("bot", "workflow")
    }
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
