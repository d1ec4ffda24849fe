//! The chat's own values, as both the REST replies and the stream's frames carry them: an id
//! reference, a member's state and role, a message and its body type, a typing indicator, a
//! member change. Its own file because `rest` and `stream` both build on these; neither owns
//! them.

use serde::{Deserialize, Serialize};

/// `{"id": ...}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IdRef {
    /// The id.
    pub id: String,
}

/// Member state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MemberState {
    /// Being offered (agents).
    Alerting,
    /// In the chat.
    Connected,
    /// Gone; final.
    Disconnected,
    /// A state this build does not know.
    #[serde(other)]
    Unknown,
}

/// Member role. The exact set is **[unsure]** in the public record; unknown roles decode as `Unknown`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Role {
    /// The guest.
    Customer,
    /// A human agent.
    Agent,
    /// An Architect flow.
    Workflow,
    /// The queue.
    Acd,
    /// Anything else.
    #[serde(other)]
    Unknown,
}

/// Body type of a chat message.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BodyType {
    /// A normal message.
    Standard,
    /// A system notice.
    Notice,
    /// A member joined.
    MemberJoin,
    /// A member left.
    MemberLeave,
    /// Anything else.
    #[serde(other)]
    Unknown,
}

/// A chat message (REST and stream).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    /// Message id.
    pub id: String,
    /// Optional name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Conversation.
    pub conversation: IdRef,
    /// Sender member.
    pub sender: IdRef,
    /// Text.
    #[serde(default)]
    pub body: String,
    /// Kind of body.
    pub body_type: BodyType,
    /// ISO-8601 UTC with ms.
    pub timestamp: String,
}

/// A typing indicator (REST reply and stream event).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Typing {
    /// Indicator id.
    pub id: String,
    /// Conversation.
    pub conversation: IdRef,
    /// Sender member.
    pub sender: IdRef,
    /// ISO-8601 UTC with ms.
    pub timestamp: String,
}

/// Member-change event body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MemberChange {
    /// Conversation.
    pub conversation: IdRef,
    /// Member id and new state.
    pub member: MemberRef,
    /// ISO-8601 UTC with ms.
    #[serde(default)]
    pub timestamp: String,
}

/// `{"id", "state"}` inside a member-change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemberRef {
    /// Member id.
    pub id: String,
    /// New state.
    pub state: MemberState,
}
