//! The guest chat seam: what a guest chat session needs from its platform.
//!
//! A guest chat session needs a handful of REST calls and a way to read stream frames; it does
//! not need to know they are Genesys's. [`ChatApi`] is that seam: `client::GenesysApi`
//! implements it, and another vendor's guest chat API with the same shape (create, a read-only
//! event stream, REST sends) would be a second implementation driving the same machine.
//!
//! The seam owns the vocabulary the guest chat machine reads: member roles and states, message
//! kinds, how a call failed as a session needs to know it ([`Failure`]). Nothing outside
//! `protocol` and `client` names a wire type.

use crate::secret::Secret;
use crate::transport::policy::{ApiError, PolicyError, check_id};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// A member's role in a chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The guest guestd acts for.
    Customer,
    /// A human agent.
    Agent,
    /// An automated flow (a Genesys Architect flow, a bot).
    Workflow,
    /// The queue itself.
    Acd,
    /// A role this build does not know.
    Unknown,
}

impl Role {
    /// The name in guestd's event schema.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Agent => "agent",
            Role::Workflow => "workflow",
            Role::Acd => "acd",
            Role::Unknown => "unknown",
        }
    }
}

/// A member's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberState {
    /// Being offered the chat (agents).
    Alerting,
    /// In the chat.
    Connected,
    /// Gone; final.
    Disconnected,
    /// A state this build does not know (or, inside guestd, not known yet).
    Unknown,
}

impl MemberState {
    /// The name in guestd's event schema.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alerting => "alerting",
            MemberState::Connected => "connected",
            MemberState::Disconnected => "disconnected",
            MemberState::Unknown => "unknown",
        }
    }
}

/// What a chat message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// Text someone wrote.
    Standard,
    /// A system notice.
    Notice,
    /// A member joined.
    MemberJoin,
    /// A member left.
    MemberLeave,
    /// A kind this build does not know.
    Unknown,
}

impl MessageKind {
    /// The name in guestd's event schema (`body_type`).
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Standard => "standard",
            MessageKind::Notice => "notice",
            MessageKind::MemberJoin => "member-join",
            MessageKind::MemberLeave => "member-leave",
            MessageKind::Unknown => "unknown",
        }
    }

    /// Written by a member (counts as the guest's activity when the guest wrote it).
    pub fn is_written(self) -> bool {
        matches!(self, MessageKind::Standard | MessageKind::Notice)
    }
}

/// How a call failed, as a session needs to know it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    /// The credential was refused (401): the chat cannot be acted on any more.
    #[error("unauthorized (401): {0}")]
    Unauthorized(String),
    /// The chat or member is gone (404).
    #[error("not found (404): {0}")]
    NotFound(String),
    /// Anything else (already retried by the backend's client).
    #[error("{0}")]
    Other(String),
}

impl From<&ApiError> for Failure {
    fn from(e: &ApiError) -> Self {
        match e {
            ApiError::Unauthorized(m) => Failure::Unauthorized(m.clone()),
            ApiError::NotFound(m) => Failure::NotFound(m.clone()),
            other => Failure::Other(other.to_string()),
        }
    }
}

/// Everything needed to act for the guest in one chat. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRef {
    /// The platform's conversation id (stable for the chat's life).
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
    /// The member's id in this conversation.
    pub id: String,
    /// Its role, as the members list says (a stream frame carries none).
    pub role: Role,
    /// Its state when the list was taken.
    pub state: MemberState,
    /// When it left (ISO-8601), where the backend says.
    pub leave_date: Option<String>,
}

/// A chat message as the backend reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// The platform's message id: what a backfill resumes after.
    pub id: String,
    /// Sender member id.
    pub sender_id: String,
    /// The text as written (at most the backend's `max_message_chars`).
    pub body: String,
    /// What it is.
    pub kind: MessageKind,
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
        /// The typing member's id.
        sender_id: String,
    },
    /// A member changed state.
    MemberChange {
        /// The member whose state changed (its role may be unknown yet).
        member_id: String,
        /// The state it is in now.
        state: MemberState,
    },
    /// The server will close this socket soon.
    SocketClosing,
    /// A frame we understood but do not act on.
    Other(String),
}

impl ChatRef {
    /// Both ids of the chat pass [`check_id`] (before any URL is built from them).
    pub fn check_ids(&self) -> Result<(), PolicyError> {
        check_id("conversation_id", &self.conversation_id)?;
        check_id("member_id", &self.member_id)
    }
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
    /// The most characters a message body may have (longer sends are refused locally).
    fn max_message_chars(&self) -> usize;
}

/// Backends for tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A backend whose `create` never answers (a slow platform) and whose other calls fail.
    pub(crate) struct Stalled;

    impl ChatApi for Stalled {
        fn create(&self, _: StartSpec) -> BoxFuture<'static, Result<ChatRef, ApiError>> {
            Box::pin(futures::future::pending())
        }
        fn list_members(
            &self,
            _: &ChatRef,
        ) -> BoxFuture<'static, Result<Vec<ChatMember>, ApiError>> {
            Box::pin(futures::future::pending())
        }
        fn messages_after(
            &self,
            _: &ChatRef,
            _: Option<String>,
        ) -> BoxFuture<'static, Result<Vec<ChatMessage>, ApiError>> {
            Box::pin(futures::future::pending())
        }
        fn leave(&self, _: &ChatRef) -> BoxFuture<'static, Result<(), ApiError>> {
            Box::pin(futures::future::pending())
        }
        fn send_message(
            &self,
            _: &ChatRef,
            _: String,
        ) -> BoxFuture<'static, Result<ChatMessage, ApiError>> {
            Box::pin(futures::future::pending())
        }
        fn send_typing(&self, _: &ChatRef) -> BoxFuture<'static, Result<(), ApiError>> {
            Box::pin(futures::future::pending())
        }
        fn decode(&self, _: &str) -> Result<ChatEvent, String> {
            Err("no frames here".into())
        }
        fn ping_frame(&self) -> &'static str {
            "{}"
        }
        fn max_message_chars(&self) -> usize {
            4000
        }
    }
}
