//! The session state machine: every rule guestd enforces, with no sockets and no clock.
//!
//! `Machine::step(input, now) -> Vec<Action>` is the whole interface: the actor feeds it what
//! happened (a frame, a lost socket, a REST result, a timer tick) with the current time, and
//! performs the actions it returns (connect, ping, reconcile, backfill, leave, emit an event,
//! stop). `next_deadline()` tells the actor when to tick next. Because time is an argument,
//! tests drive a 15-minute rule in microseconds with made-up instants.
//!
//! Rules (see `docs/events.md` for the user-facing version):
//! - any frame is life; `heartbeat_tolerance` missed heartbeats (each declared at
//!   `last frame + k * interval + interval / 2`) mean the socket is dead; the first miss pings;
//! - a lost socket is reopened with jittered exponential backoff until `reconnect_grace` after
//!   the loss; then guestd reconciles once (list members) and ends;
//! - after a reconnect: backfill messages after the last seen id, reconcile members; live frames
//!   that arrive meanwhile are held so messages come out once each and in order; backfilled
//!   messages whose sender's role is not known yet (after a restart or a takeover the machine
//!   knows only the guest) wait for that members list, at most `history::ROLES_WAIT` (10 s),
//!   so a message says the same `sender_role` backfilled as it would have live;
//! - no guest message for `inactivity_timeout` while an agent is connected: warn at
//!   `inactivity_warning_lead` before, then leave and end with `inactivity_timeout`;
//! - the end is inferred from all the evidence at hand, in the order `ending` documents (leave
//!   requested, own inactivity deadline, the members' leave dates, the member frames' order, a
//!   stream that was down, otherwise server); a 401 ends with `token_expired` when it arrives;
//!   exactly one `ended` is ever produced, whatever arrives after it;
//! - member-change frames are applied in the order they arrived: once a frame names a member
//!   whose role is unknown, later member frames wait behind it until the members list gives the
//!   roles, then all are replayed in order before anything is decided.
//!
//! One `Machine` value, its rules split by concern into child modules that each add methods
//! to it: [`link`] (heartbeats, losing and reopening the socket, the grace window),
//! [`roster`] (members, roles, held frames, members lists), [`history`] (messages once and in
//! order, backfills), [`ending`] (why a chat ended: a pure function of an `Evidence`
//! value), `inactivity` (the no-activity rule, its evidence and the wall-clock anchor), and
//! `clock` (when to tick, when the chat ends if nothing happens, what a tick does). The
//! inputs, actions and settings are in `types`. This file holds the state, the `step` that
//! dispatches inputs, the evidence snapshot, and the one `end`.
//! One struct rather than one per concern: the concerns read each other's state at every step
//! (an end reads the link, the roster and the clock), and the session's size matters (see
//! docs/design.md); the split is in the code that reads and writes it.

mod clock;
mod ending;
mod history;
mod inactivity;
mod link;
mod roster;
mod types;

pub use inactivity::ActivityDigest;
pub use types::{Action, Input, Phase, Timing};

use crate::backends::guest_chat::api::{
    ChatEvent, ChatMember, ChatMessage, Failure, MemberState, Role,
};
use crate::backoff_policy::Backoff;
use crate::events::{EndReason, EventKind};
use ending::{ByDates, ByFrames, Evidence, Stream};
use link::Link;
use roster::Member;
use std::collections::VecDeque;
use tokio::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fetch {
    /// Roles of new members, or a reconcile after a reconnect.
    Refresh,
    /// The grace window ran out: reconcile once, then end.
    GaveUp,
    /// The stream said the chat is gone (404): find out why.
    Gone,
}

/// `stream_error` events a session emits per minute at most.
const STREAM_ERRORS_PER_MINUTE: u8 = 5;

/// The state of one session.
#[derive(Debug)]
pub struct Machine {
    /// Every duration and switch the rules use.
    timing: std::sync::Arc<Timing>,
    /// `stream_error` events in the current minute, since when, and how many were left out.
    errors: (Option<Instant>, u8, u32),
    backoff: Backoff,
    guest_id: String,
    started: Instant,
    link: Link,
    ever_connected: bool,
    resumed: bool,
    /// Members by id. A chat has a handful: a vector searched linearly is smaller and faster
    /// than a hash map.
    members: Vec<(String, Member)>,
    /// Member frames waiting for roles, in arrival order, with when each arrived.
    held_members: Vec<(String, MemberState, Instant)>,
    fetching: Option<Fetch>,
    reconciling: bool,
    guest_gone: bool,
    gone_refetches: u8,
    role_refetches: u8,
    lookup_retries: u8,
    /// The evidence as it stood when the guest's DISCONNECTED frame arrived.
    at_gone: Option<Evidence>,
    agent: Option<String>,
    agent_since: Option<Instant>,
    /// The agent the journal said was connected before a restart, and since when: evidence for
    /// the no-activity rule until the roster learns that agent's state again.
    restored_agent: Option<(String, Instant)>,
    /// Wall-clock milliseconds at an instant, to read leave dates against deadlines.
    wall: Option<(Instant, i64)>,
    /// The guest's leave date from a members list, ms since the epoch.
    guest_left_ms: Option<i64>,
    /// The backfill in flight is the first connection's (messages guestd sent before its stream
    /// opened), not a reconnect's.
    first_backfill: bool,
    /// The agent left at guestd's no-activity deadline (the platform's rule ends the agent's
    /// leg too, in either order with the guest's).
    idle_ended: bool,
    agent_ever: bool,
    last_agent_left: Option<Instant>,
    workflow_left: bool,
    /// What a members list that showed the guest DISCONNECTED said through its leave dates.
    dates: Option<ByDates>,
    last_guest_msg: Option<Instant>,
    warned: bool,
    leave_requested: bool,
    /// A leave recorded before a restart: the first tick sends it again.
    leave_due: bool,
    backfilling: Option<Instant>,
    /// A members list that arrived while a backfill held live frames: those frames are older
    /// than the list, so it is read once they have been replayed.
    deferred_list: Option<(Fetch, Vec<ChatMember>)>,
    /// Live frames that arrived during a backfill, with when each arrived.
    held: Vec<(ChatEvent, Instant)>,
    /// The generation of the latest backfill asked (see `Input::Backfill`).
    backfill_gen: u32,
    /// A backfill's messages waiting for their senders' roles, and until when at most (rare:
    /// boxed, so an idle session does not pay for it).
    roles_wait: Option<Box<(Vec<ChatMessage>, Instant)>>,
    needs_backfill: bool,
    last_msg_id: Option<String>,
    seen: VecDeque<String>,
    /// Messages guestd sent itself (already counted as guest activity).
    own_sent: VecDeque<String>,
    ended: Option<EndReason>,
}

impl Machine {
    /// A new session that has not connected yet; the first `Tick` asks to connect.
    pub fn new(timing: impl Into<std::sync::Arc<Timing>>, guest_id: &str, now: Instant) -> Self {
        let timing = timing.into();
        let backoff = Backoff::new(&timing.backoff);
        let members = vec![(
            guest_id.to_string(),
            Member {
                role: Some(Role::Customer),
                state: MemberState::Connected,
            },
        )];
        Machine {
            timing,
            errors: (None, 0, 0),
            backoff,
            guest_id: guest_id.to_string(),
            started: now,
            link: Link::Down {
                lost_at: now,
                attempt: 0,
                next_at: Some(now),
                giving_up: false,
            },
            ever_connected: false,
            resumed: false,
            members,
            held_members: Vec::new(),
            fetching: None,
            reconciling: false,
            guest_gone: false,
            gone_refetches: 0,
            role_refetches: 0,
            lookup_retries: 0,
            at_gone: None,
            agent: None,
            agent_since: None,
            restored_agent: None,
            wall: None,
            guest_left_ms: None,
            idle_ended: false,
            first_backfill: false,
            agent_ever: false,
            last_agent_left: None,
            workflow_left: false,
            dates: None,
            last_guest_msg: None,
            warned: false,
            leave_requested: false,
            leave_due: false,
            backfilling: None,
            deferred_list: None,
            held: Vec::new(),
            backfill_gen: 0,
            roles_wait: None,
            needs_backfill: false,
            last_msg_id: None,
            seen: VecDeque::new(),
            own_sent: VecDeque::new(),
            ended: None,
        }
    }

    /// A session picked up from the journal after a restart: it started at `started`, lost its
    /// socket at `lost_at`, and backfills from `last_msg_id` once reconnected.
    pub fn resume(
        t: impl Into<std::sync::Arc<Timing>>,
        guest_id: &str,
        started: Instant,
        lost_at: Instant,
        last_msg_id: Option<String>,
        now: Instant,
    ) -> Self {
        let mut m = Machine::new(t, guest_id, now);
        m.started = started;
        m.link = Link::Down {
            lost_at,
            attempt: 0,
            next_at: Some(now),
            giving_up: false,
        };
        m.resumed = true;
        m.needs_backfill = true;
        m.last_msg_id = last_msg_id;
        m
    }

    /// A resumed session whose guest was asked to leave before the restart (the journal holds
    /// the request): the first tick sends the leave again, and the end reads `guest_left`.
    pub fn leaving(mut self) -> Self {
        self.leave_requested = true;
        self.leave_due = true;
        self
    }

    /// The coarse state.
    pub fn phase(&self) -> Phase {
        match (&self.ended, &self.link) {
            (Some(_), _) => Phase::Ended,
            (None, Link::Up { .. }) => Phase::Connected,
            (None, Link::Down { .. }) if self.ever_connected || self.resumed => Phase::Reconnecting,
            (None, Link::Down { .. }) => Phase::Connecting,
        }
    }

    /// Why it ended, once it has.
    pub fn ended(&self) -> Option<EndReason> {
        self.ended
    }

    /// Whether an agent is connected now.
    pub fn agent_connected(&self) -> bool {
        self.agent.is_some()
    }

    /// The newest message id seen (what a backfill starts after).
    pub fn last_message_id(&self) -> Option<&str> {
        self.last_msg_id.as_deref()
    }

    /// Feed one input; get the actions to perform, in order.
    pub fn step(&mut self, input: Input, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.ended.is_some() {
            return out;
        }
        match input {
            Input::Tick => self.on_tick(now, &mut out),
            Input::Opened => self.on_opened(now, &mut out),
            Input::ConnectFailed(f) => self.on_connect_failed(f, now, &mut out),
            Input::Frame(ev) => {
                self.alive(now);
                self.on_frame(ev, now, &mut out);
            }
            Input::BadFrame(detail) => {
                self.alive(now);
                self.stream_error(detail, now, &mut out);
            }
            Input::Lost(why) => {
                if matches!(self.link, Link::Up { .. }) {
                    self.lose(&why, false, now, &mut out);
                }
            }
            Input::Members(r) => self.on_members(r, now, &mut out),
            Input::Backfill(generation, r) => self.on_backfill(generation, r, now, &mut out),
            Input::LeaveRequested => {
                self.leave_requested = true;
                out.push(Action::Leave);
            }
            Input::LeaveDone(Ok(())) => self.end(
                EndReason::GuestLeft,
                "guest left: leave answered 204".into(),
                now,
                &mut out,
            ),
            Input::LeaveDone(Err(f)) => {
                self.leave_requested = false;
                match f {
                    Failure::Other(e) => out.push(Action::Emit(EventKind::CommandError {
                        command: "leave".into(),
                        error: e,
                    })),
                    // The chat was already over: find out how.
                    _ => self.fetch(Fetch::Gone, &mut out),
                }
            }
            Input::GuestSent(id) => {
                self.note_own_sent(id);
                self.guest_activity(now)
            }
        }
        out
    }

    fn on_frame(&mut self, ev: ChatEvent, now: Instant, out: &mut Vec<Action>) {
        match ev {
            ChatEvent::Heartbeat | ChatEvent::Pong | ChatEvent::Other(_) => {}
            ChatEvent::SocketClosing => {
                out.push(Action::CloseSocket);
                self.lose("socket_closing", true, now, out);
            }
            ChatEvent::Typing { sender_id } => {
                let sender_role = self.role_name(&sender_id);
                out.push(Action::Emit(EventKind::Typing {
                    sender_id,
                    sender_role,
                }));
            }
            ev @ (ChatEvent::Message(_) | ChatEvent::MemberChange { .. })
                if self.backfilling.is_some() =>
            {
                self.held.push((ev, now));
            }
            ChatEvent::Message(m) => {
                self.on_message(m, false, now, out);
            }
            ChatEvent::MemberChange { member_id, state } => {
                self.on_member_change(member_id, state, now, out)
            }
        }
    }

    /// The evidence as it stands now (without a members list's dates unless one was read).
    fn snapshot(&self, now: Instant) -> Evidence {
        let stream = match self.link {
            Link::Up { .. } => Stream::Up,
            Link::Down { .. } if self.resumed && !self.ever_connected => Stream::GuestdWasDown,
            Link::Down { lost_at, .. } => Stream::Reconnecting {
                grace_elapsed: now >= lost_at + self.timing.reconnect_grace,
            },
        };
        Evidence {
            leave_requested: self.leave_requested,
            inactivity_due: self.idle_ended
                || self
                    .evidence_deadline()
                    .is_some_and(|dl| now + self.timing.inactivity_skew >= dl),
            dates: self.dates,
            frames: ByFrames {
                agent_just_before: self.last_agent_left.is_some_and(|t| {
                    now.saturating_duration_since(t) <= self.timing.agent_end_window
                }),
                flow_without_agent: !self.agent_ever && self.workflow_left,
            },
            stream,
        }
    }

    /// End the chat for the reason the evidence gives (`pre` when the guest's end was learned
    /// from a list: the evidence before that list's states were applied).
    fn decide_with(&mut self, pre: Evidence, now: Instant, out: &mut Vec<Action>) {
        let mut e = self.at_gone.unwrap_or(pre);
        e.dates = self.dates;
        e.leave_requested |= self.leave_requested;
        // Learned late (guestd was down or reconnecting): when the guest left says more about
        // the no-activity rule than when guestd found out.
        if e.stream != Stream::Up {
            if let Some(due) = self.inactivity_by_date() {
                e.inactivity_due = due;
            }
        }
        let (reason, detail) = ending::infer(&e);
        self.end(reason, detail.into(), now, out);
    }

    fn decide(&mut self, now: Instant, out: &mut Vec<Action>) {
        let pre = self.snapshot(now);
        self.decide_with(pre, now, out);
    }

    /// Emit a `stream_error`, at most [`STREAM_ERRORS_PER_MINUTE`] a minute: a server that sends
    /// garbage cannot flood the output. The next one after a pause says how many were left out.
    fn stream_error(&mut self, detail: String, now: Instant, out: &mut Vec<Action>) {
        let (since, count, dropped) = &mut self.errors;
        if since.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(60)) {
            *since = Some(now);
            *count = 0;
        }
        if *count >= STREAM_ERRORS_PER_MINUTE {
            *dropped += 1;
            return;
        }
        *count += 1;
        let detail = match std::mem::take(dropped) {
            0 => detail,
            n => format!("{detail} ({n} more left out in the last minute)"),
        };
        out.push(Action::Emit(EventKind::StreamError { detail }));
    }

    fn end(&mut self, reason: EndReason, detail: String, now: Instant, out: &mut Vec<Action>) {
        if self.ended.is_some() {
            return;
        }
        // Backfilled messages still waiting for roles were fetched: they come out before the
        // end, with the roles known, rather than die with the session; then the live messages
        // held behind them (or behind a backfill still in flight: out of order with what it
        // would have fetched, but not lost). Member changes held are moot once it has ended.
        if let Some(w) = self.roles_wait.take() {
            for m in w.0 {
                self.on_message(m, true, now, out);
            }
        }
        for (ev, at) in std::mem::take(&mut self.held) {
            if let ChatEvent::Message(m) = ev {
                self.on_message(m, false, at, out);
            }
        }
        self.ended = Some(reason);
        out.push(Action::Emit(EventKind::Ended {
            reason,
            duration_ms: now.saturating_duration_since(self.started).as_millis() as u64,
            detail,
            extra: Default::default(),
        }));
        out.push(Action::AbortConnect);
        out.push(Action::CloseSocket);
        out.push(Action::Stop);
    }
}

#[cfg(test)]
mod prop;
#[cfg(test)]
mod tests;
