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
//!   that arrive meanwhile are held so messages come out once each and in order;
//! - no guest message for `inactivity_timeout` while an agent is connected: warn at
//!   `inactivity_warning_lead` before, then leave and end with `inactivity_timeout`;
//! - the end is inferred from all the evidence at hand, in the order `ending` documents (leave
//!   requested, own inactivity deadline, the members' leave dates, the member frames' order, a
//!   stream that was down, otherwise server); a 401 ends with `token_expired` when it arrives;
//!   exactly one `ended` is ever produced, whatever arrives after it;
//! - member-change frames are applied in the order they arrived: once a frame names a member
//!   whose role is unknown, later member frames wait behind it until the members list gives the
//!   roles, then all are replayed in order before anything is decided.

mod ending;

use crate::backend::{ChatEvent, ChatMember, ChatMessage, Failure, MemberState, Role};
use crate::backoff_policy::{Backoff, BackoffConfig};
use crate::events::{EndReason, EventKind};
use ending::{ByDates, ByFrames, Evidence, Stream};
use std::collections::VecDeque;
use tokio::time::{Duration, Instant};

/// Every duration the machine uses.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Expected heartbeat period (platform: about 30 s).
    pub heartbeat_interval: Duration,
    /// Consecutive missed heartbeats that mean the socket is dead (at least 1).
    pub heartbeat_tolerance: u32,
    /// How long after a loss guestd keeps trying to reconnect.
    pub reconnect_grace: Duration,
    /// No guest message for this long while an agent is connected ends the chat.
    pub inactivity_timeout: Duration,
    /// How long before that deadline to warn (0 for no warning).
    pub inactivity_warning_lead: Duration,
    /// A server-side end this close to guestd's own deadline counts as `inactivity_timeout`.
    pub inactivity_skew: Duration,
    /// An agent leaving at most this long before the guest means `agent_ended`.
    pub agent_end_window: Duration,
    /// Whether `message` events carry bodies.
    pub include_bodies: bool,
    /// Reconnect delays.
    pub backoff: BackoffConfig,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_tolerance: 2,
            reconnect_grace: Duration::from_secs(120),
            inactivity_timeout: Duration::from_secs(15 * 60),
            inactivity_warning_lead: Duration::from_secs(60),
            inactivity_skew: Duration::from_secs(5),
            agent_end_window: Duration::from_secs(10),
            include_bodies: true,
            backoff: BackoffConfig::default(),
        }
    }
}

/// What happened.
#[derive(Debug, Clone)]
pub enum Input {
    /// The websocket opened.
    Opened,
    /// Opening the websocket failed.
    ConnectFailed(Failure),
    /// A decoded frame.
    Frame(ChatEvent),
    /// A frame that could not be decoded (skipped; still proof of life).
    BadFrame(String),
    /// The websocket closed or failed.
    Lost(String),
    /// A deadline may have passed.
    Tick,
    /// Result of list members.
    Members(Result<Vec<ChatMember>, Failure>),
    /// Result of the backfill.
    Backfill(Result<Vec<ChatMessage>, Failure>),
    /// A caller asked the guest to leave.
    LeaveRequested,
    /// Result of the leave call.
    LeaveDone(Result<(), Failure>),
    /// A message was sent for the guest through guestd; the platform gave it this id.
    GuestSent(String),
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Emit an event.
    Emit(EventKind),
    /// Open the websocket now.
    Connect,
    /// Give up an attempt in flight.
    AbortConnect,
    /// Close the websocket (without leaving the chat).
    CloseSocket,
    /// Send the protocol's ping frame.
    Ping,
    /// Call list members.
    FetchMembers,
    /// Fetch messages after this id.
    Backfill {
        /// Last seen message id.
        after: Option<String>,
    },
    /// Call leave (DELETE member).
    Leave,
    /// The session is over: finish pending work and stop.
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fetch {
    /// Roles of new members, or a reconcile after a reconnect.
    Refresh,
    /// The grace window ran out: reconcile once, then end.
    GaveUp,
    /// The stream said the chat is gone (404): find out why.
    Gone,
}

#[derive(Debug)]
enum Link {
    Up {
        last_rx: Instant,
        missed: u32,
    },
    Down {
        lost_at: Instant,
        attempt: u32,
        next_at: Option<Instant>,
        giving_up: bool,
    },
}

#[derive(Debug)]
struct Known {
    role: Option<Role>,
    state: MemberState,
}

/// The coarse state, for views and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Never connected yet.
    Connecting,
    /// Stream open.
    Connected,
    /// Stream lost, inside the grace window.
    Reconnecting,
    /// Over.
    Ended,
}

impl Phase {
    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Connected => "connected",
            Phase::Reconnecting => "reconnecting",
            Phase::Ended => "ended",
        }
    }
}

/// Message ids remembered to drop duplicates (a backfill overlapping live frames).
const SEEN_CAP: usize = 128;
/// Ids of messages guestd sent for the guest, remembered until their echo is seen.
const OWN_SENT_CAP: usize = 8;
/// Times the members list is asked again when it predates the guest's DISCONNECTED frame.
const MAX_GONE_REFETCHES: u8 = 3;
/// Times the members list is asked again for a member it does not list yet.
const MAX_ROLE_REFETCHES: u8 = 3;
/// Times a failed members list is retried while frames wait for roles or an end waits for it.
const MAX_LOOKUP_RETRIES: u8 = 3;

/// The state of one session.
#[derive(Debug)]
pub struct Machine {
    t: std::sync::Arc<Timing>,
    backoff: Backoff,
    guest_id: String,
    started: Instant,
    link: Link,
    ever_connected: bool,
    resumed: bool,
    /// Members by id. A chat has a handful: a vector searched linearly is smaller and faster
    /// than a hash map.
    members: Vec<(String, Known)>,
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
    needs_backfill: bool,
    last_msg_id: Option<String>,
    seen: VecDeque<String>,
    /// Messages guestd sent itself (already counted as guest activity).
    own_sent: VecDeque<String>,
    ended: Option<EndReason>,
}

impl Machine {
    /// A new session that has not connected yet; the first `Tick` asks to connect.
    pub fn new(t: impl Into<std::sync::Arc<Timing>>, guest_id: &str, now: Instant) -> Self {
        let t = t.into();
        let backoff = Backoff::new(&t.backoff);
        let members = vec![(
            guest_id.to_string(),
            Known {
                role: Some(Role::Customer),
                state: MemberState::Connected,
            },
        )];
        Machine {
            t,
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

    /// When the no-activity rule ends the chat, if it runs now.
    pub fn inactivity_deadline(&self) -> Option<Instant> {
        let since = self.agent_since?;
        let from = match self.last_guest_msg {
            Some(m) if m > since => m,
            _ => since,
        };
        Some(from + self.t.inactivity_timeout)
    }

    /// When the actor must tick next, or None once ended.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.ended.is_some() {
            return None;
        }
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        match &self.link {
            Link::Up { last_rx, missed } => consider(self.miss_due(*last_rx, *missed)),
            Link::Down {
                lost_at,
                next_at,
                giving_up,
                ..
            } => {
                if !giving_up {
                    consider(*lost_at + self.t.reconnect_grace);
                    if let Some(n) = next_at {
                        consider(*n);
                    }
                }
            }
        }
        if let Some(dl) = self.inactivity_deadline() {
            if let Some(w) = self.warning_at(dl) {
                consider(w);
            }
            consider(dl);
        }
        next
    }

    fn miss_due(&self, last_rx: Instant, missed: u32) -> Instant {
        last_rx_miss_due(&self.t, last_rx, missed)
    }

    fn warning_at(&self, deadline: Instant) -> Option<Instant> {
        let lead = self.t.inactivity_warning_lead;
        (!self.warned && !lead.is_zero() && lead < self.t.inactivity_timeout)
            .then(|| deadline - lead)
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
                out.push(Action::Emit(EventKind::StreamError { detail }));
            }
            Input::Lost(why) => {
                if matches!(self.link, Link::Up { .. }) {
                    self.lose(&why, false, now, &mut out);
                }
            }
            Input::Members(r) => self.on_members(r, now, &mut out),
            Input::Backfill(r) => self.on_backfill(r, now, &mut out),
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
                // Its echo (live or backfilled) must not move the clock again, later.
                if self.own_sent.len() >= OWN_SENT_CAP {
                    self.own_sent.pop_front();
                }
                self.own_sent.push_back(id);
                self.guest_activity(now)
            }
        }
        out
    }

    fn alive(&mut self, now: Instant) {
        if let Link::Up { last_rx, missed } = &mut self.link {
            *last_rx = now;
            *missed = 0;
        }
    }

    fn guest_activity(&mut self, now: Instant) {
        self.last_guest_msg = Some(now);
        self.warned = false;
    }

    fn on_tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        if std::mem::take(&mut self.leave_due) {
            out.push(Action::Leave);
        }
        match &mut self.link {
            Link::Up { last_rx, missed } => {
                let due = last_rx_miss_due(&self.t, *last_rx, *missed);
                if now >= due {
                    *missed += 1;
                    let (k, silent) = (*missed, now - *last_rx);
                    out.push(Action::Emit(EventKind::HeartbeatMissed {
                        missed: k,
                        silent_ms: silent.as_millis() as u64,
                    }));
                    if k >= self.t.heartbeat_tolerance.max(1) {
                        out.push(Action::CloseSocket);
                        self.lose("heartbeat timeout", false, now, out);
                    } else {
                        out.push(Action::Ping);
                    }
                }
            }
            Link::Down {
                lost_at,
                next_at,
                giving_up,
                ..
            } => {
                if *giving_up {
                } else if now >= *lost_at + self.t.reconnect_grace {
                    *giving_up = true;
                    *next_at = None;
                    out.push(Action::AbortConnect);
                    self.fetch(Fetch::GaveUp, out);
                } else if next_at.is_some_and(|n| now >= n) {
                    *next_at = None;
                    out.push(Action::Connect);
                }
            }
        }
        if self.ended.is_some() {
            return;
        }
        if let Some(dl) = self.inactivity_deadline() {
            if now >= dl {
                let limit = humantime::format_duration(self.t.inactivity_timeout);
                out.push(Action::Leave);
                self.end(
                    EndReason::InactivityTimeout,
                    format!(
                        "no guest message for {limit} while an agent was connected; guestd left"
                    ),
                    now,
                    out,
                );
            } else if self.warning_at(dl).is_some_and(|w| now >= w) {
                self.warned = true;
                out.push(Action::Emit(EventKind::InactivityWarning {
                    remaining_ms: (dl - now).as_millis() as u64,
                }));
            }
        }
    }

    fn lose(&mut self, why: &str, immediate: bool, now: Instant, out: &mut Vec<Action>) {
        self.link = Link::Down {
            lost_at: now,
            attempt: 0,
            next_at: None,
            giving_up: false,
        };
        self.needs_backfill = true;
        self.backfilling = None;
        let held = std::mem::take(&mut self.held);
        // Frames held for a backfill that will not finish: the next backfill covers messages.
        for (ev, at) in held {
            if let ChatEvent::MemberChange { member_id, state } = ev {
                self.on_member_change(member_id, state, at, out);
            }
        }
        out.push(Action::Emit(EventKind::Disconnected {
            reason: why.to_string(),
        }));
        self.schedule(immediate, now, out);
        self.read_deferred_list(now, out);
    }

    fn schedule(&mut self, immediate: bool, now: Instant, out: &mut Vec<Action>) {
        let grace = self.t.reconnect_grace;
        let delay = if immediate {
            Duration::ZERO
        } else {
            self.backoff.next_delay()
        };
        if let Link::Down {
            lost_at,
            attempt,
            next_at,
            ..
        } = &mut self.link
        {
            let left = (*lost_at + grace).saturating_duration_since(now);
            let delay = delay.min(left);
            *attempt += 1;
            *next_at = Some(now + delay);
            out.push(Action::Emit(EventKind::Reconnecting {
                attempt: *attempt,
                delay_ms: delay.as_millis() as u64,
                grace_left_ms: left.as_millis() as u64,
            }));
        }
    }

    fn on_opened(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Link::Down {
            lost_at, giving_up, ..
        } = self.link
        else {
            return;
        };
        if giving_up {
            out.push(Action::CloseSocket);
            return;
        }
        self.link = Link::Up {
            last_rx: now,
            missed: 0,
        };
        self.backoff.reset();
        if !self.ever_connected && !self.needs_backfill {
            self.ever_connected = true;
            out.push(Action::Emit(EventKind::Connected));
            // Members that joined before the stream opened: learn their roles and states.
            self.fetch(Fetch::Refresh, out);
            return;
        }
        self.ever_connected = true;
        self.needs_backfill = false;
        self.backfilling = Some(lost_at);
        out.push(Action::Backfill {
            after: self.last_msg_id.clone(),
        });
        self.fetch(Fetch::Refresh, out);
    }

    fn on_connect_failed(&mut self, f: Failure, now: Instant, out: &mut Vec<Action>) {
        let Link::Down {
            giving_up: false, ..
        } = self.link
        else {
            return;
        };
        match f {
            Failure::Unauthorized(m) => self.end(
                EndReason::TokenExpired,
                format!("stream refused the jwt (401): {m}"),
                now,
                out,
            ),
            Failure::NotFound(_) => self.fetch(Fetch::Gone, out),
            Failure::Other(_) => self.schedule(false, now, out),
        }
    }

    fn fetch(&mut self, why: Fetch, out: &mut Vec<Action>) {
        match self.fetching {
            // A stronger reason replaces a weaker one in flight; its result is read with it.
            Some(current) if current != Fetch::Refresh || why == Fetch::Refresh => {}
            Some(_) => self.fetching = Some(why),
            None => {
                self.fetching = Some(why);
                out.push(Action::FetchMembers);
            }
        }
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

    fn member(&self, id: &str) -> Option<&Known> {
        self.members.iter().find(|(m, _)| m == id).map(|(_, k)| k)
    }

    fn role_name(&self, id: &str) -> String {
        let role = self
            .member(id)
            .and_then(|k| k.role)
            .unwrap_or(Role::Unknown);
        role.as_str().to_string()
    }

    /// Emit a message unless already seen; true when emitted.
    fn on_message(
        &mut self,
        m: ChatMessage,
        backfilled: bool,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> bool {
        if self.seen.iter().any(|s| *s == m.id) {
            return false;
        }
        if self.seen.len() >= SEEN_CAP {
            self.seen.pop_front();
        }
        self.seen.push_back(m.id.clone());
        self.last_msg_id = Some(m.id.clone());
        if m.sender_id == self.guest_id && m.kind.is_written() {
            // guestd's own messages were counted when sent; counting a late echo (a backfill
            // after an outage) would put guestd's deadline after the platform's. Another
            // client's message counts when seen: a backfilled one is then late, which can
            // only delay guestd's own deadline, never bring it early.
            if !self.own_sent.contains(&m.id) {
                self.guest_activity(now);
            }
        }
        let sender_role = self.role_name(&m.sender_id);
        out.push(Action::Emit(EventKind::Message {
            message_id: m.id,
            sender_id: m.sender_id,
            sender_role,
            body_type: m.kind.as_str().to_string(),
            body: self.t.include_bodies.then_some(m.body),
            timestamp: m.timestamp,
            backfilled,
        }));
        true
    }

    fn on_member_change(
        &mut self,
        id: String,
        state: MemberState,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        // Frame order is evidence: once one frame waits for a role, later ones wait behind it.
        if !self.held_members.is_empty() || self.member(&id).is_none() {
            self.held_members.push((id, state, now));
            self.fetch(Fetch::Refresh, out);
            return;
        }
        self.apply_member(&id, None, state, now, out);
    }

    /// Record a member's role (from a members list) without touching its state.
    fn learn_role(&mut self, id: &str, role: Role) {
        match self.members.iter_mut().find(|(m, _)| m == id) {
            Some((_, k)) => k.role = Some(role),
            None => self.members.push((
                id.to_string(),
                Known {
                    role: Some(role),
                    state: MemberState::Unknown,
                },
            )),
        }
    }

    fn apply_member(
        &mut self,
        id: &str,
        role: Option<Role>,
        state: MemberState,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let at = match self.members.iter().position(|(m, _)| m == id) {
            Some(i) => i,
            None => {
                self.members.push((
                    id.to_string(),
                    Known {
                        role: None,
                        state: MemberState::Unknown,
                    },
                ));
                self.members.len() - 1
            }
        };
        let known = &mut self.members[at].1;
        if role.is_some() {
            known.role = role;
        }
        if known.state == state {
            return;
        }
        known.state = state;
        let role = known.role.unwrap_or(Role::Unknown);
        out.push(Action::Emit(EventKind::MemberChanged {
            member_id: id.to_string(),
            role: role.as_str().into(),
            state: state.as_str().into(),
        }));
        match (role, state) {
            (Role::Agent, MemberState::Connected) if self.agent.is_none() => {
                self.agent = Some(id.to_string());
                self.agent_since = Some(now);
                self.agent_ever = true;
                self.warned = false;
                out.push(Action::Emit(EventKind::AgentConnected {
                    member_id: id.to_string(),
                }));
            }
            (Role::Agent, MemberState::Disconnected) => {
                // Any agent leaving is evidence, even one whose CONNECTED guestd missed; after
                // the guest left, an agent leaving is not why the chat ended.
                self.agent_ever = true;
                if !self.guest_gone {
                    self.last_agent_left = Some(now);
                }
                if self.agent.as_deref() == Some(id) {
                    self.agent = None;
                    self.agent_since = None;
                    out.push(Action::Emit(EventKind::AgentDisconnected {
                        member_id: id.to_string(),
                    }));
                }
            }
            (Role::Workflow, MemberState::Disconnected) if !self.guest_gone => {
                self.workflow_left = true
            }
            _ => {}
        }
        if id == self.guest_id && state == MemberState::Disconnected && !self.reconciling {
            // A frame (or a held frame replayed): the stream was up when it was sent.
            if self.at_gone.is_none() {
                let mut e = self.snapshot(now);
                e.stream = Stream::Up;
                self.at_gone = Some(e);
            }
            self.guest_gone = true;
            if self.held_members.is_empty()
                && self.fetching.is_none()
                && self.deferred_list.is_none()
            {
                self.decide(now, out);
            }
            // Otherwise roles or states are still on their way: decide when the list is in.
        }
    }

    /// The evidence as it stands now (without a members list's dates unless one was read).
    fn snapshot(&self, now: Instant) -> Evidence {
        let stream = match self.link {
            Link::Up { .. } => Stream::Up,
            Link::Down { .. } if self.resumed && !self.ever_connected => Stream::GuestdWasDown,
            Link::Down { lost_at, .. } => Stream::Reconnecting {
                grace_elapsed: now >= lost_at + self.t.reconnect_grace,
            },
        };
        Evidence {
            leave_requested: self.leave_requested,
            inactivity_due: self
                .inactivity_deadline()
                .is_some_and(|dl| now + self.t.inactivity_skew >= dl),
            dates: self.dates,
            frames: ByFrames {
                agent_just_before: self
                    .last_agent_left
                    .is_some_and(|t| now.saturating_duration_since(t) <= self.t.agent_end_window),
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
        let (reason, detail) = ending::infer(&e);
        self.end(reason, detail.into(), now, out);
    }

    fn decide(&mut self, now: Instant, out: &mut Vec<Action>) {
        let pre = self.snapshot(now);
        self.decide_with(pre, now, out);
    }

    fn on_members(
        &mut self,
        r: Result<Vec<ChatMember>, Failure>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let why = self.fetching.take().unwrap_or(Fetch::Refresh);
        let held = std::mem::take(&mut self.held_members);
        let list = match r {
            Ok(list) => list,
            Err(f) => return self.on_members_failed(why, f, held, now, out),
        };
        if self.backfilling.is_some() {
            self.held_members = held;
            self.deferred_list = Some((why, list));
            return;
        }
        self.lookup_retries = 0;
        let guest_left_in_list = list
            .iter()
            .any(|m| m.id == self.guest_id && m.state == MemberState::Disconnected);
        let guest_left_in_frames = self.guest_gone
            || held
                .iter()
                .any(|(id, s, _)| *id == self.guest_id && *s == MemberState::Disconnected);
        if guest_left_in_frames && !guest_left_in_list && self.gone_refetches < MAX_GONE_REFETCHES {
            // The list predates the guest's DISCONNECTED: ask again before deciding.
            self.gone_refetches += 1;
            self.held_members = held;
            return self.fetch(Fetch::Refresh, out);
        }
        if guest_left_in_list {
            self.dates = ending::by_dates(
                &list,
                &self.guest_id,
                self.agent_ever,
                self.t.agent_end_window,
            );
        }
        let all_gone = list.len() > 1 && list.iter().all(|m| m.state == MemberState::Disconnected);
        // Roles first, then the held frames in the order they arrived: that order is evidence
        // (an agent who joined and left before the guest), and deciding from the list alone
        // would throw it away.
        for m in &list {
            self.learn_role(&m.id, m.role);
        }
        let mut held = held.into_iter();
        // Each frame is applied at the instant it arrived: when an agent connected is when the
        // no-activity clock starts, however long its role took to learn.
        while let Some((id, state, at)) = held.next() {
            if self.ended.is_some() {
                return;
            }
            let listed = list.iter().any(|m| m.id == id);
            if !listed && self.role_refetches < MAX_ROLE_REFETCHES && !guest_left_in_list {
                // Joined after the list was taken: ask again, keeping the order.
                self.role_refetches += 1;
                self.held_members = std::iter::once((id, state, at)).chain(held).collect();
                return self.fetch(Fetch::Refresh, out);
            }
            self.apply_member(&id, None, state, at, out);
        }
        self.role_refetches = 0;
        if self.ended.is_some() {
            return;
        }
        // Then the list's own states, the guest last; an end they show is decided on the
        // evidence as it stood before them.
        let pre = self.snapshot(now);
        self.reconciling = true;
        let (guest, others): (Vec<_>, Vec<_>) =
            list.into_iter().partition(|m| m.id == self.guest_id);
        for m in others.iter().chain(guest.iter()) {
            self.apply_member(&m.id, Some(m.role), m.state, now, out);
        }
        self.reconciling = false;
        if guest_left_in_list || all_gone || self.guest_gone {
            return self.decide_with(pre, now, out);
        }
        match why {
            Fetch::GaveUp => self.end(
                EndReason::ReconnectGraceExpired,
                "no reconnect within the grace window".into(),
                now,
                out,
            ),
            // 404 on the stream but the guest is still in: try the stream again.
            Fetch::Gone if matches!(self.link, Link::Down { .. }) => self.schedule(false, now, out),
            _ => {}
        }
    }

    fn on_members_failed(
        &mut self,
        why: Fetch,
        f: Failure,
        held: Vec<(String, MemberState, Instant)>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        // Frames wait on this list, or an end does (the guest left, the grace ran out, the stream
        // answered 404): ask again rather than guess.
        let waiting = !held.is_empty() || self.guest_gone || why != Fetch::Refresh;
        if let Failure::Other(e) = &f {
            out.push(Action::Emit(EventKind::StreamError {
                detail: format!("list members failed: {e}"),
            }));
            if waiting && self.lookup_retries < MAX_LOOKUP_RETRIES {
                self.lookup_retries += 1;
                self.held_members = held;
                return self.fetch(why, out);
            }
        }
        // No list to be had: apply the frames as they came, with the roles known so far.
        for (id, state, at) in held {
            self.apply_member(&id, None, state, at, out);
        }
        if self.ended.is_some() {
            return;
        }
        if self.guest_gone {
            return self.decide(now, out);
        }
        match (why, f) {
            (Fetch::GaveUp, f) => self.end(
                EndReason::ReconnectGraceExpired,
                format!("no reconnect within the grace window (reconcile: {f})"),
                now,
                out,
            ),
            (_, Failure::Unauthorized(m)) => self.end(
                EndReason::TokenExpired,
                format!("list members refused the jwt (401): {m}"),
                now,
                out,
            ),
            (_, Failure::NotFound(m)) => self.end(
                EndReason::ServerEnded,
                format!("the conversation is gone (404): {m}"),
                now,
                out,
            ),
            (Fetch::Gone, Failure::Other(_)) if matches!(self.link, Link::Down { .. }) => {
                self.schedule(false, now, out)
            }
            (_, Failure::Other(_)) => {}
        }
    }

    fn on_backfill(
        &mut self,
        r: Result<Vec<ChatMessage>, Failure>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(lost_at) = self.backfilling.take() else {
            return;
        };
        let mut n = 0u32;
        match r {
            Ok(msgs) => {
                for m in msgs {
                    if self.on_message(m, true, now, out) {
                        n += 1;
                    }
                }
            }
            Err(Failure::Unauthorized(m)) => {
                return self.end(
                    EndReason::TokenExpired,
                    format!("backfill refused the jwt (401): {m}"),
                    now,
                    out,
                );
            }
            Err(Failure::NotFound(m)) => {
                return self.end(
                    EndReason::ServerEnded,
                    format!("the conversation is gone (404): {m}"),
                    now,
                    out,
                );
            }
            Err(Failure::Other(e)) => out.push(Action::Emit(EventKind::StreamError {
                detail: format!("backfill failed, messages may be missing: {e}"),
            })),
        }
        out.push(Action::Emit(EventKind::Reconnected {
            downtime_ms: now.saturating_duration_since(lost_at).as_millis() as u64,
            backfilled: n,
        }));
        for (ev, at) in std::mem::take(&mut self.held) {
            if self.ended.is_some() {
                return;
            }
            self.on_frame(ev, at, out);
        }
        self.read_deferred_list(now, out);
    }

    /// Read a members list that waited for a backfill's held frames.
    fn read_deferred_list(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some((why, list)) = self.deferred_list.take() else {
            return;
        };
        // A lookup started meanwhile answers later, with a newer list: that one is read instead.
        if self.ended.is_none() && self.fetching.is_none() {
            self.fetching = Some(why);
            self.on_members(Ok(list), now, out);
        }
    }

    fn end(&mut self, reason: EndReason, detail: String, now: Instant, out: &mut Vec<Action>) {
        if self.ended.is_some() {
            return;
        }
        self.ended = Some(reason);
        out.push(Action::Emit(EventKind::Ended {
            reason,
            duration_ms: now.saturating_duration_since(self.started).as_millis() as u64,
            detail,
        }));
        out.push(Action::AbortConnect);
        out.push(Action::CloseSocket);
        out.push(Action::Stop);
    }
}

/// When the next heartbeat counts as missed: `last_rx + interval * (missed + 1) + interval / 2`
/// (half an interval of slack for a heartbeat on its way).
fn last_rx_miss_due(t: &Timing, last_rx: Instant, missed: u32) -> Instant {
    last_rx + t.heartbeat_interval * (missed + 1) + t.heartbeat_interval / 2
}

#[cfg(test)]
mod prop;
#[cfg(test)]
mod tests;
