//! The guest chat event stream: the websocket envelope, its topics, the heartbeat, ping and
//! pong frames, the decoded [`StreamEvent`] and why a frame could not be decoded, and the
//! envelope the emulator sends. Its own file because it is the websocket's vocabulary, used by
//! the client and the emulator alike; reading a frame is in `decode`.

use super::*;
use serde::{Deserialize, Serialize};

/// One websocket text frame, as sent by the server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Topic, e.g. `v2.conversations.chats.{id}.messages`.
    pub topic_name: String,
    /// Always "2".
    #[serde(default)]
    pub version: Option<String>,
    /// Event payload.
    #[serde(default)]
    pub event_body: serde_json::Value,
    /// Carries `type` for chat topics.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

/// Topic of heartbeats and pongs.
pub const TOPIC_METADATA: &str = "channel.metadata";
/// Topic of the maintenance notice.
pub const TOPIC_SOCKET_CLOSING: &str = "v2.system.socket_closing";
/// Body of a heartbeat.
pub const HEARTBEAT_MESSAGE: &str = "WebSocket Heartbeat";
/// The client's ping frame.
pub const PING_FRAME: &str = r#"{"message":"ping"}"#;
/// The `message` of a ping.
pub const PING_MESSAGE: &str = "ping";
/// The `message` of the server's reply to a ping.
pub const PONG_MESSAGE: &str = "pong";

/// A heartbeat frame, as the server sends it.
pub fn heartbeat_frame() -> String {
    encode_envelope(
        TOPIC_METADATA,
        serde_json::json!({ "message": HEARTBEAT_MESSAGE }),
        None,
    )
}

/// The server's reply to a ping.
pub fn pong_frame() -> String {
    encode_envelope(
        TOPIC_METADATA,
        serde_json::json!({ "message": PONG_MESSAGE }),
        None,
    )
}

/// Whether a client frame is a ping: [`PING_FRAME`] or any JSON object whose `message` is
/// `"ping"`.
pub fn is_ping(text: &str) -> bool {
    text == PING_FRAME
        || serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .is_some_and(|v| v.get("message").and_then(|m| m.as_str()) == Some(PING_MESSAGE))
}

/// Topic of chat messages and typing for a conversation.
pub fn messages_topic(conversation_id: &str) -> String {
    format!("v2.conversations.chats.{conversation_id}.messages")
}

/// Topic of member changes for a conversation.
pub fn members_topic(conversation_id: &str) -> String {
    format!("v2.conversations.chats.{conversation_id}.members")
}

/// A decoded stream frame.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// Server heartbeat.
    Heartbeat,
    /// Reply to our ping.
    Pong,
    /// Other `channel.metadata` text.
    Metadata(String),
    /// Chat message.
    Message(Message),
    /// Typing indicator.
    Typing(Typing),
    /// Member changed state.
    MemberChange(MemberChange),
    /// Server will close this socket soon.
    SocketClosing,
    /// A well-formed frame of a topic or type we do not handle.
    Unknown {
        /// Its topic.
        topic: String,
    },
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON or not an envelope.
    #[error("frame is not a valid envelope: {0}")]
    Envelope(#[source] serde_json::Error),
    /// Envelope fine, body not of the shape its type says.
    #[error("{topic}: body does not match its type: {source}")]
    Body {
        /// The topic.
        topic: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Encode an envelope for the server side (the emulator).
pub fn encode_envelope(topic: &str, body: serde_json::Value, kind: Option<&str>) -> String {
    let env = Envelope {
        topic_name: topic.to_string(),
        version: Some("2".to_string()),
        event_body: body,
        // Public captures show a CorrelationId on every frame.
        metadata: Some(match kind {
            Some(k) => {
                serde_json::json!({ "CorrelationId": uuid::Uuid::new_v4().to_string(), "type": k })
            }
            None => serde_json::json!({ "CorrelationId": uuid::Uuid::new_v4().to_string() }),
        }),
    };
    serde_json::to_string(&env).unwrap_or_default()
}
