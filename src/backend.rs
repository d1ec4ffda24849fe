//! The backend-neutral interface a session talks to.
//!
//! A session needs a handful of REST calls and a way to read stream frames; it does not need to
//! know they are Genesys's. [`ChatApi`] is that seam: `genesys::client::GenesysApi` implements it
//! today, and a Web Messaging backend would be a second implementation in its own module.

use crate::secret::Secret;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub use crate::genesys::protocol::{MemberState, Role};

/// Everything needed to act for the guest in one chat. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRef {
    /// Conversation id.
    pub conversation_id: String,
    /// The guest's member id.
    pub member_id: String,
    /// The bearer token (redacted in every format).
    pub jwt: Secret,
    /// Websocket URI of the event stream.
    pub event_stream_uri: String,
}

/// What a `start` needs to create a chat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartSpec {
    /// Queue name (routing target address).
    pub queue: String,
    /// Guest display name.
    pub display_name: String,
    /// Optional skills.
    #[serde(default)]
    pub skills: Vec<String>,
    /// Optional language.
    #[serde(default)]
    pub language: Option<String>,
    /// Optional priority.
    #[serde(default)]
    pub priority: Option<i64>,
    /// Optional first name.
    #[serde(default)]
    pub first_name: Option<String>,
    /// Optional last name.
    #[serde(default)]
    pub last_name: Option<String>,
    /// Optional email.
    #[serde(default)]
    pub email: Option<String>,
    /// Optional phone number.
    #[serde(default)]
    pub phone_number: Option<String>,
    /// Optional custom fields.
    #[serde(default)]
    pub custom_fields: std::collections::BTreeMap<String, String>,
}

/// A member as the backend reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMember {
    /// Member id.
    pub id: String,
    /// Role.
    pub role: Role,
    /// State.
    pub state: MemberState,
    /// When it left (ISO-8601), where the backend says.
    pub leave_date: Option<String>,
}

/// A chat message as the backend reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// Message id.
    pub id: String,
    /// Sender member id.
    pub sender_id: String,
    /// Text.
    pub body: String,
    /// "standard", "notice", "member-join", "member-leave".
    pub body_type: String,
    /// ISO-8601.
    pub timestamp: String,
}

/// A decoded stream frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatEvent {
    /// Server heartbeat.
    Heartbeat,
    /// Reply to our ping.
    Pong,
    /// A message (including the guest's own, echoed).
    Message(ChatMessage),
    /// Someone is typing.
    Typing {
        /// Who.
        sender_id: String,
    },
    /// A member changed state.
    MemberChange {
        /// Who.
        member_id: String,
        /// New state.
        state: MemberState,
    },
    /// The server will close this socket soon.
    SocketClosing,
    /// A frame we understood but do not act on.
    Other(String),
}

/// How a REST call failed, as the session needs to know it.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ApiError {
    /// 401: the jwt is invalid or expired.
    #[error("unauthorized (401): {0}")]
    Unauthorized(String),
    /// 404: the chat or member is gone.
    #[error("not found (404): {0}")]
    NotFound(String),
    /// 429 after retries ran out.
    #[error("rate limited (429), retry after {0:?}")]
    RateLimited(Option<Duration>),
    /// Another 4xx: the request was wrong; not retried.
    #[error("rejected ({status}): {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The platform's message.
        message: String,
    },
    /// 5xx after retries ran out.
    #[error("server error ({status}): {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// The platform's message.
        message: String,
    },
    /// Connection, timeout or TLS failure.
    #[error("transport: {0}")]
    Transport(String),
    /// The reply was not what the API promises.
    #[error("bad reply: {0}")]
    Decode(String),
    /// The configuration forbids this endpoint (plaintext to a non-loopback host).
    #[error("refused by policy: {0}")]
    Policy(String),
}

/// The REST side of a chat backend, plus its frame decoder. Futures are boxed and `'static` so a
/// session can hold several in flight without borrowing.
pub trait ChatApi: Send + Sync + 'static {
    /// Create a chat for the guest.
    fn create(&self, spec: StartSpec) -> BoxFuture<'static, Result<ChatRef, ApiError>>;
    /// List every member.
    fn list_members(&self, chat: &ChatRef)
    -> BoxFuture<'static, Result<Vec<ChatMember>, ApiError>>;
    /// Messages after `after` (all when None), oldest first, following pages.
    fn messages_after(
        &self,
        chat: &ChatRef,
        after: Option<String>,
    ) -> BoxFuture<'static, Result<Vec<ChatMessage>, ApiError>>;
    /// The guest leaves (ends the chat).
    fn leave(&self, chat: &ChatRef) -> BoxFuture<'static, Result<(), ApiError>>;
    /// Send a message as the guest.
    fn send_message(
        &self,
        chat: &ChatRef,
        body: String,
    ) -> BoxFuture<'static, Result<ChatMessage, ApiError>>;
    /// Send a typing indicator as the guest.
    fn send_typing(&self, chat: &ChatRef) -> BoxFuture<'static, Result<(), ApiError>>;
    /// Decode one text frame of the event stream.
    fn decode(&self, text: &str) -> Result<ChatEvent, String>;
    /// The text frame that asks the server for a pong.
    fn ping_frame(&self) -> &'static str;
}
