//! What a caller can ask guestd: the commands, as every front end (stdin, HTTP, a NATS
//! request from another node) parses them into one type. A module of its own so that the
//! supervisor, which routes commands in cluster mode (`supervisor::Route`), and `control`, which
//! parses and runs them, both use it without importing each other (issue 26: no circles).

use crate::backends::guest_chat::api::{ChatRef, StartSpec};
use crate::secret::Secret;

/// A parsed command.
#[derive(Debug, Clone)]
pub enum Command {
    /// Create a chat and supervise it.
    Start(StartSpec),
    /// Supervise an existing chat.
    Attach(ChatRef),
    /// Open a Web Messaging session and supervise it (`start` with `"backend":
    /// "web_messaging"`).
    StartMessaging(crate::backends::web_messaging::Spec),
    /// Supervise an existing Web Messaging session (`attach` with `"backend":
    /// "web_messaging"`).
    AttachMessaging(crate::backends::web_messaging::Spec),
    /// Web Messaging: close the session and begin a new one on the same token.
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
            Command::Start(_) | Command::StartMessaging(_) => "start",
            Command::Attach(_) | Command::AttachMessaging(_) => "attach",
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
