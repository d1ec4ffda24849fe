//! The guest chat machine's vocabulary: its settings ([`Timing`]), what happens to a session
//! ([`Input`]), what the actor must do ([`Action`]), and the coarse state views report
//! ([`Phase`]). Its own file because these are what the actor, the backend and the
//! configuration name, read without the rules behind them; `machine` re-exports each one.

use crate::backends::guest_chat::api::{ChatEvent, ChatMember, ChatMessage, Failure};
use crate::backoff_policy::BackoffConfig;
use crate::events::EventKind;
use tokio::time::Duration;

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
