//! What a caller can ask guestd: the commands, as every front end (stdin, HTTP, a NATS
//! request from another node) parses them into one type. A module of its own so that the
//! supervisor, which routes commands in cluster mode (`supervisor::Route`), and `control`, which
//! parses and runs them, both use it without importing each other (issue 26: no circles).

use crate::secret::Secret;
use crate::session::{Args, Open};

/// A parsed command.
#[derive(Debug, Clone)]
pub enum Command {
    /// `start` (create a chat) or `attach` (supervise one the caller created), with a backend.
    Open(OpenCmd),
    /// Close the session and begin a new one on the same credential (Web Messaging's).
    StartNew {
        /// Session id or conversation id.
        session: String,
    },
    /// Send a message as the guest.
    Send {
        /// Session id or conversation id.
        session: String,
        /// The message text (at most the backend's `max_message_chars`).
        body: String,
    },
    /// Send typing.
    Typing {
        /// Session id or conversation id.
        session: String,
    },
    /// Leave the chat.
    Leave {
        /// Session id or conversation id.
        session: String,
    },
    /// List sessions.
    List,
    /// One session.
    Get {
        /// Session id or conversation id.
        session: String,
    },
    /// Whether any conversation is alive, held or not (see `crate::platform::status`).
    Status {
        /// The conversation id.
        conversation_id: String,
        /// The chat's jwt, for the guest API to answer when nothing else can.
        jwt: Option<Secret>,
    },
}

impl Command {
    /// The command's name.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Open(o) => o.open.name(),
            Command::StartNew { .. } => "start_new",
            Command::Send { .. } => "send",
            Command::Typing { .. } => "typing",
            Command::Leave { .. } => "leave",
            Command::List => "list",
            Command::Get { .. } => "get",
            Command::Status { .. } => "status",
        }
    }
}

/// A `start` or `attach`: which backend, and its arguments (the backend's to parse).
#[derive(Debug, Clone)]
pub struct OpenCmd {
    /// Start or attach.
    pub open: Open,
    /// The backend the command names (`"backend": ...`); None: the default.
    pub backend: Option<String>,
    /// The rest of the command.
    pub args: Args,
    /// The chat's key, once the backend has prepared the command and the key is known before
    /// opening (`Supervisor::prepare`).
    pub key: Option<String>,
}
