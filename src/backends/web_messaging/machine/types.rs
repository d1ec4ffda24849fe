//! The machine's vocabulary: where a session is ([`Phase`]), how it begins ([`Begin`]), what the
//! deployment allows ([`Deployment`]), what happens to it ([`Input`]), what the actor must do
//! ([`Action`], with the client actions of [`Out`]), and how commands are answered ([`Reply`],
//! [`Refusal`]). Its own file because these are the types other modules (the actor, the backend,
//! the fuzz target) name, read without the rules behind them; `machine` re-exports each one.

use crate::backends::web_messaging::protocol::{Frame, StructuredMessage};
use crate::events::EventKind;
use crate::secret::Secret;
use std::time::Duration;

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
