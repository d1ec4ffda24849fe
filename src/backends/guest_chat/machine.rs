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
//! order, backfills), and [`ending`] (why a chat ended: a pure function of an `Evidence`
//! value). This file holds the inputs and actions, the no-activity rule, and the one `end`.
//! One struct rather than one per concern: the concerns read each other's state at every step
//! (an end reads the link, the roster and the clock), and the session's size matters (see
//! docs/design.md); the split is in the code that reads and writes it.

mod ending;
mod history;
mod link;
mod roster;

use crate::backends::guest_chat::api::{
    ChatEvent, ChatMember, ChatMessage, Failure, MemberState, Role,
};
use crate::backoff_policy::{Backoff, BackoffConfig};
use crate::events::{EndReason, EventKind};
use ending::{ByDates, ByFrames, Evidence, Stream};
use link::Link;
use roster::Member;
use std::collections::VecDeque;
use tokio::time::{Duration, Instant};

/// Every duration the machine uses; `[session]` in the configuration (humantime strings in
/// files, e.g. `"30s"`; every key optional).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timing {
    /// Expected heartbeat period (platform: about 30 s).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Consecutive missed heartbeats that mean the socket is dead (at least 1).
    pub heartbeat_tolerance: u32,
    /// How long after a loss guestd keeps trying to reconnect.
    #[serde(with = "humantime_serde")]
    pub reconnect_grace: Duration,
    /// No guest message for this long while an agent is connected ends the chat.
    #[serde(with = "humantime_serde")]
    pub inactivity_timeout: Duration,
    /// How long before that deadline to warn (0 for no warning).
    #[serde(with = "humantime_serde")]
    pub inactivity_warning_lead: Duration,
    /// A server-side end this close to guestd's own deadline counts as `inactivity_timeout`.
    #[serde(with = "humantime_serde")]
    pub inactivity_skew: Duration,
    /// An agent leaving at most this long before the guest means `agent_ended`.
    #[serde(with = "humantime_serde")]
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
    /// Result of the backfill asked with this generation (`Action::Backfill::generation`): an answer
    /// to an older one (asked before a socket loss, answered after the reopen asked again) is
    /// ignored, so it cannot stand in for the newer one's.
    Backfill(u32, Result<Vec<ChatMessage>, Failure>),
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
        /// This backfill's generation, to be given back with its answer.
        generation: u32,
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

    /// Tie this machine's instants to the wall clock: `ms` is the wall-clock time at `at`. Leave
    /// dates are read against guestd's no-activity deadline only with an anchor.
    pub fn anchor_wall(&mut self, at: Instant, ms: i64) {
        self.wall = Some((at, ms));
    }

    /// Whether [`Machine::anchor_wall`] was called.
    pub fn anchored(&self) -> bool {
        self.wall.is_some()
    }

    fn ms_at(&self, t: Instant) -> Option<i64> {
        let (at, ms) = self.wall?;
        Some(if t >= at {
            ms + (t - at).as_millis() as i64
        } else {
            ms - (at - t).as_millis() as i64
        })
    }

    fn instant_at_ms(&self, t: i64) -> Option<Instant> {
        let (at, ms) = self.wall?;
        Some(if t >= ms {
            at + Duration::from_millis((t - ms) as u64)
        } else {
            at.checked_sub(Duration::from_millis((ms - t) as u64))
                .unwrap_or(at)
        })
    }

    /// A resumed session picks up the no-activity rule's evidence from the journal (the machine
    /// must be anchored first): the guest's last message, and the agent connected before the
    /// restart, which counts once the roster sees that same agent connected again (another
    /// agent starts the clock afresh).
    pub fn with_activity(mut self, a: &crate::journal::Activity) -> Self {
        self.last_guest_msg = a.last_guest_ms.and_then(|t| self.instant_at_ms(t));
        self.restored_agent = match (&a.agent, a.agent_since_ms) {
            (Some(agent), Some(t)) => self.instant_at_ms(t).map(|t| (agent.clone(), t)),
            _ => None,
        };
        self
    }

    /// The agent the no-activity evidence names, and since when: the one connected now, or
    /// else the one a restart restored from the journal.
    fn evidence_agent(&self) -> Option<(&str, Instant)> {
        match (&self.agent, self.agent_since, &self.restored_agent) {
            (Some(a), Some(t), _) => Some((a.as_str(), t)),
            (None, _, Some((a, t))) => Some((a.as_str(), *t)),
            _ => None,
        }
    }

    /// A digest of [`Machine::activity`] without building it (the session asks after every
    /// step, a heartbeat's included): of the whole evidence, and of its agent part when there
    /// is an agent. Equal evidence gives equal digests.
    pub fn activity_digest(&self) -> ActivityDigest {
        use std::hash::{Hash, Hasher};
        if self.wall.is_none() {
            return ActivityDigest::default();
        }
        let (agent, since) = self.evidence_agent().unzip();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (agent, since.and_then(|t| self.ms_at(t))).hash(&mut h);
        let agent_part = agent.map(|_| h.finish());
        self.last_guest_msg.and_then(|t| self.ms_at(t)).hash(&mut h);
        ActivityDigest {
            all: h.finish(),
            agent: agent_part,
        }
    }

    /// The no-activity rule's evidence as the journal keeps it (None without an anchor).
    pub fn activity(&self) -> Option<crate::journal::Activity> {
        self.wall?;
        let (agent, since) = self.evidence_agent().unzip();
        Some(crate::journal::Activity {
            agent: agent.map(str::to_string),
            agent_since_ms: since.and_then(|t| self.ms_at(t)),
            last_guest_ms: self.last_guest_msg.and_then(|t| self.ms_at(t)),
        })
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
        self.agent_since.map(|since| self.deadline_from(since))
    }

    /// The no-activity deadline for an agent connected since `since`: the later of that and the
    /// guest's last message, plus the timeout.
    fn deadline_from(&self, since: Instant) -> Instant {
        let from = match self.last_guest_msg {
            Some(m) if m > since => m,
            _ => since,
        };
        from + self.timing.inactivity_timeout
    }

    /// The no-activity deadline as evidence: guestd's own, or, after a restart and before the
    /// roster has seen the agent again, the one the journal's record implies.
    fn evidence_deadline(&self) -> Option<Instant> {
        if let Some(dl) = self.inactivity_deadline() {
            return Some(dl);
        }
        let (_, since) = self.restored_agent.as_ref()?;
        Some(self.deadline_from(*since))
    }

    /// Whether the guest's leave date (from a members list) falls at or after the no-activity
    /// deadline, within the skew; None when either is unknown.
    fn inactivity_by_date(&self) -> Option<bool> {
        let left = self.guest_left_ms?;
        let dl = self.ms_at(self.evidence_deadline()?)?;
        let skew = self.timing.inactivity_skew.as_millis() as i64;
        Some(left + skew >= dl)
    }

    /// When the platform ends the chat if nothing happens, and why (what `status` and `get`
    /// report as `ends_at`/`ends_because`): the no-activity deadline while an agent is
    /// connected (after a restart, the one the journal's agent and the guest's last message
    /// imply, not one counted from the restart), the end of the grace window while the socket
    /// is down (or has not opened yet), whichever comes first. None once ended, and while the
    /// socket is up with no agent (queued: nothing ends the chat by itself).
    pub fn ends(&self) -> Option<(Instant, EndReason)> {
        if self.ended.is_some() {
            return None;
        }
        let idle = self
            .evidence_deadline()
            .map(|t| (t, EndReason::InactivityTimeout));
        let grace = match &self.link {
            Link::Down { lost_at, .. } => Some((
                *lost_at + self.timing.reconnect_grace,
                EndReason::ReconnectGraceExpired,
            )),
            Link::Up { .. } => None,
        };
        match (idle, grace) {
            (Some(i), Some(g)) => Some(if g.0 < i.0 { g } else { i }),
            (i, g) => i.or(g),
        }
    }

    /// When the actor must tick next, or None once ended.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.ended.is_some() {
            return None;
        }
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        match &self.link {
            Link::Up { last_rx, missed } => {
                consider(link::last_rx_miss_due(&self.timing, *last_rx, *missed))
            }
            Link::Down {
                lost_at,
                next_at,
                giving_up,
                ..
            } => {
                if !giving_up {
                    consider(*lost_at + self.timing.reconnect_grace);
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
        if let Some(w) = &self.roles_wait {
            consider(w.1);
        }
        next
    }

    fn warning_at(&self, deadline: Instant) -> Option<Instant> {
        let lead = self.timing.inactivity_warning_lead;
        (!self.warned && !lead.is_zero() && lead < self.timing.inactivity_timeout)
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

    fn guest_activity(&mut self, now: Instant) {
        self.last_guest_msg = Some(now);
        self.warned = false;
    }

    fn on_tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        if std::mem::take(&mut self.leave_due) {
            out.push(Action::Leave);
        }
        // The wait for roles ends at its bound, and before the no-activity rule is read: a
        // guest's message waiting there (or held behind it) is activity, and is counted once
        // it is emitted.
        let inactive = self.inactivity_deadline().is_some_and(|dl| now >= dl);
        if self
            .roles_wait
            .as_ref()
            .is_some_and(|w| now >= w.1 || inactive)
        {
            self.release_roles_wait(now, out);
            if self.ended.is_some() {
                return;
            }
        }
        self.tick_link(now, out);
        if self.ended.is_some() {
            return;
        }
        if let Some(dl) = self.inactivity_deadline() {
            if now >= dl {
                let limit = humantime::format_duration(self.timing.inactivity_timeout);
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

/// See [`Machine::activity_digest`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActivityDigest {
    /// Of the whole evidence (0 without an anchor).
    pub all: u64,
    /// Of the agent part, when there is an agent.
    pub agent: Option<u64>,
}

#[cfg(test)]
mod prop;
#[cfg(test)]
mod tests;
