//! Wire types of the Genesys Cloud guest chat API (Web Chat v2), REST and websocket.
//!
//! Field names mirror the remote API through serde attributes; nothing here knows about guestd's
//! own event schema. Both the REST client and the emulator use these types, so a drift between
//! them shows up as a compile error rather than a silent mismatch.
//! See `../shared/protocol/genesys-guest-chat.md` for the reference this follows.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Body of `POST /api/v2/webchat/guest/conversations`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CreateChatRequest {
    /// Genesys organization id.
    pub organization_id: String,
    /// Web chat deployment id.
    pub deployment_id: String,
    /// Where the flow routes the chat.
    pub routing_target: RoutingTarget,
    /// The guest's own details.
    pub member_info: MemberInfo,
}

/// Routing target of a new chat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RoutingTarget {
    /// Always "QUEUE" for guest chats.
    pub target_type: String,
    /// Queue name.
    pub target_address: String,
    /// Optional skills.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skills: Vec<String>,
    /// Optional language.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Optional priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
}

/// The guest's details on create.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MemberInfo {
    /// Name shown to the agent.
    pub display_name: String,
    /// Optional avatar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar_image_url: Option<String>,
    /// Optional first name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    /// Optional last name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    /// Optional email.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Optional phone number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_number: Option<String>,
    /// Free-form string attributes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_fields: BTreeMap<String, String>,
}

/// Reply to create chat.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CreateChatResponse {
    /// Conversation id.
    pub id: String,
    /// Bearer token for every later call. Secret: never logged.
    pub jwt: String,
    /// Websocket URI of the event stream.
    pub event_stream_uri: String,
    /// The guest member.
    pub member: IdRef,
}

impl std::fmt::Debug for CreateChatResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateChatResponse")
            .field("id", &self.id)
            .field("jwt", &"<redacted>")
            .field("event_stream_uri", &self.event_stream_uri)
            .field("member", &self.member)
            .finish()
    }
}

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

/// A conversation member as list/get members return it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// Member id.
    pub id: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Avatar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar_image_url: Option<String>,
    /// Role.
    pub role: Role,
    /// When the member joined (ISO-8601).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_date: Option<String>,
    /// When the member left (ISO-8601).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leave_date: Option<String>,
    /// First name given at create (`WebChatMemberInfo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    /// Last name given at create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    /// Email given at create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Phone number given at create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_number: Option<String>,
    /// Whether the guest authenticated.
    #[serde(default)]
    pub authenticated_guest: bool,
    /// Custom fields.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_fields: BTreeMap<String, String>,
    /// State.
    pub state: MemberState,
}

/// A page of entities (list members, list messages).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Page<T> {
    /// The entities.
    pub entities: Vec<T>,
    /// Page size, where the call pages by number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
    /// Page number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_number: Option<u32>,
    /// Total entities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u32>,
    /// Link to the next page (messages): an `/api/v2/...` path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// Link to the previous page (messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// Number of pages, where the call pages by number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_count: Option<u32>,
    /// This page, as an `/api/v2/...` path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_uri: Option<String>,
    /// The first page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_uri: Option<String>,
    /// The next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_uri: Option<String>,
    /// The previous page; absent on the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_uri: Option<String>,
    /// The last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_uri: Option<String>,
}

impl<T> Page<T> {
    /// The path of the next page, from `nextUri` or, failing that, `next`.
    pub fn next_path(&self) -> Option<&str> {
        self.next_uri
            .as_deref()
            .or(self.next.as_deref())
            .filter(|p| !p.is_empty())
    }
}

/// Query of list members. Genesys's own SDK sends every parameter, **empty when unset**
/// (`pageSize=&pageNumber=&excludeDisconnectedMembers=`; `false` and `0` go out empty too), so
/// an empty value means "not given".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MembersQuery {
    /// 1..=100.
    #[serde(
        default,
        deserialize_with = "empty::number",
        skip_serializing_if = "Option::is_none"
    )]
    pub page_size: Option<u32>,
    /// From 1.
    #[serde(
        default,
        deserialize_with = "empty::number",
        skip_serializing_if = "Option::is_none"
    )]
    pub page_number: Option<u32>,
    /// Leave out members who left.
    #[serde(
        default,
        deserialize_with = "empty::boolean",
        skip_serializing_if = "Option::is_none"
    )]
    pub exclude_disconnected_members: Option<bool>,
}

/// Query of list messages; an empty value means "not given", as for [`MembersQuery`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessagesQuery {
    /// Messages after this id.
    #[serde(
        default,
        deserialize_with = "empty::text",
        skip_serializing_if = "Option::is_none"
    )]
    pub after: Option<String>,
    /// Messages before this id.
    #[serde(
        default,
        deserialize_with = "empty::text",
        skip_serializing_if = "Option::is_none"
    )]
    pub before: Option<String>,
    /// `ascending` (the default) or `descending`.
    #[serde(
        default,
        deserialize_with = "empty::text",
        skip_serializing_if = "Option::is_none"
    )]
    pub sort_order: Option<String>,
    /// 1..=100.
    #[serde(
        default,
        deserialize_with = "empty::number",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_results: Option<u32>,
}

/// `?a=1&b=x` for a query struct (an empty string when nothing is set).
pub fn query_string<Q: Serialize>(q: &Q) -> String {
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(q) {
        for (k, v) in m {
            let v = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            out.append_pair(&k, &v);
        }
    }
    let s = out.finish();
    if s.is_empty() { s } else { format!("?{s}") }
}

/// Query values where an empty string means "not given".
mod empty {
    use serde::{Deserialize, Deserializer, de::Error};

    pub fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.filter(|s| !s.is_empty()))
    }

    pub fn number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        match text(d)? {
            None => Ok(None),
            Some(s) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| D::Error::custom(format!("{s:?} is not a number"))),
        }
    }

    pub fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        match text(d)?.as_deref() {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(s) => Err(D::Error::custom(format!("{s:?} is not true or false"))),
        }
    }
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

/// Body of send message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SendMessageRequest {
    /// Text.
    pub body: String,
    /// "standard" or "notice".
    #[serde(default = "default_body_type")]
    pub body_type: BodyType,
}

fn default_body_type() -> BodyType {
    BodyType::Standard
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

/// Error body of every 4xx/5xx (shared by every Genesys Cloud API).
pub use crate::platform::rest::ErrorBody;

/// The most characters a chat message body may have (`CreateWebChatMessageRequest.body`).
pub const MAX_BODY_CHARS: usize = 4000;

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

/// Root of every guest chat REST path (create is a POST to it itself).
pub const CONVERSATIONS: &str = "/api/v2/webchat/guest/conversations";

/// The guest chat REST paths, for the client (with ids) and the emulator's router (with
/// `{conv}`-style placeholders): written once, so the two cannot disagree.
pub mod path {
    use super::CONVERSATIONS;

    /// List members.
    pub fn members(conv: &str) -> String {
        format!("{CONVERSATIONS}/{conv}/members")
    }
    /// Get a member; DELETE to leave.
    pub fn member(conv: &str, member: &str) -> String {
        format!("{CONVERSATIONS}/{conv}/members/{member}")
    }
    /// Send a message as a member.
    pub fn member_messages(conv: &str, member: &str) -> String {
        format!("{CONVERSATIONS}/{conv}/members/{member}/messages")
    }
    /// Send a typing indicator as a member.
    pub fn member_typing(conv: &str, member: &str) -> String {
        format!("{CONVERSATIONS}/{conv}/members/{member}/typing")
    }
    /// List messages.
    pub fn messages(conv: &str) -> String {
        format!("{CONVERSATIONS}/{conv}/messages")
    }
    /// Get a message.
    pub fn message(conv: &str, message: &str) -> String {
        format!("{CONVERSATIONS}/{conv}/messages/{message}")
    }
}

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

/// Decode one text frame.
pub fn decode_frame(text: &str) -> Result<StreamEvent, DecodeError> {
    let env: Incoming = serde_json::from_str(text).map_err(DecodeError::Envelope)?;
    let body = env.event_body.map_or("null", |b| b.get());
    let body_err = |topic: &str, source| DecodeError::Body {
        topic: topic.to_string(),
        source,
    };
    if env.topic_name == TOPIC_METADATA {
        let msg = field_str(body, "message");
        return Ok(match msg.as_deref().unwrap_or_default() {
            HEARTBEAT_MESSAGE => StreamEvent::Heartbeat,
            PONG_MESSAGE => StreamEvent::Pong,
            other => StreamEvent::Metadata(other.to_string()),
        });
    }
    if env.topic_name == TOPIC_SOCKET_CLOSING {
        return Ok(StreamEvent::SocketClosing);
    }
    let kind = env
        .metadata
        .and_then(|m| field_str(m.get(), "type"))
        .unwrap_or_default();
    let topic = env.topic_name;
    if topic.starts_with("v2.conversations.chats.") {
        if topic.ends_with(".messages") {
            match &*kind {
                "message" => {
                    return body_value(body)
                        .map(StreamEvent::Message)
                        .map_err(|e| body_err(&topic, e));
                }
                "typing-indicator" => {
                    return body_value(body)
                        .map(StreamEvent::Typing)
                        .map_err(|e| body_err(&topic, e));
                }
                _ => {}
            }
        } else if topic.ends_with(".members") && kind == "member-change" {
            return body_value(body)
                .map(StreamEvent::MemberChange)
                .map_err(|e| body_err(&topic, e));
        }
    }
    Ok(StreamEvent::Unknown {
        topic: topic.into_owned(),
    })
}

/// A chat body, read as before through a `Value` (a duplicate key: the last one wins), so a
/// message, typing or member frame decodes exactly as it did.
fn body_value<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, serde_json::Error> {
    serde_json::from_value(serde_json::from_str(body)?)
}

/// A frame as decoded: [`Envelope`]'s fields borrowed from the frame's text, the body and the
/// metadata left as raw JSON until the topic says what they hold. A heartbeat (the frame
/// every session gets every few seconds) then builds no `Value` tree for its body and
/// metadata and allocates nothing for its topic, keys or message. Same events as through
/// [`Envelope`] (`the_borrowed_decoder_agrees_with_the_value_decoder`), save that values it
/// skips unread are no longer refused for what `Value` would have refused in them: a lone
/// surrogate escape, a number out of range, nesting deeper than 128 (such frames now decode,
/// where they were dropped as undecodable).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Incoming<'a> {
    #[serde(borrow)]
    topic_name: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    #[allow(dead_code)] // read to refuse what Envelope refuses (a version that is no string)
    version: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    event_body: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    metadata: Option<&'a serde_json::value::RawValue>,
}

/// The string at `key` of the JSON object `json`, or None (not an object, no such key, not a
/// string): what `Value::get(key).and_then(as_str)` gives, without building the `Value`.
fn field_str<'a>(json: &'a str, key: &str) -> Option<std::borrow::Cow<'a, str>> {
    /// A string borrowed from the text when it has no escapes (a plain `Cow` always owns).
    #[derive(Deserialize)]
    struct Text<'a>(#[serde(borrow)] std::borrow::Cow<'a, str>);
    struct Field<'k>(&'k str);
    impl<'de, 'k> serde::de::DeserializeSeed<'de> for Field<'k> {
        type Value = Option<std::borrow::Cow<'de, str>>;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de, 'k> serde::de::Visitor<'de> for Field<'k> {
        type Value = Option<std::borrow::Cow<'de, str>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            // The last occurrence wins, as in a `Value` map.
            let mut found = None;
            while let Some(Text(k)) = map.next_key::<Text<'de>>()? {
                let v: &'de serde_json::value::RawValue = map.next_value()?;
                if k == self.0 {
                    found = Some(serde_json::from_str::<Text<'de>>(v.get()).ok().map(|t| t.0));
                }
            }
            Ok(found.flatten())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    let mut de = serde_json::Deserializer::from_str(json);
    serde::de::DeserializeSeed::deserialize(Field(key), &mut de)
        .ok()
        .flatten()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The decoder before frames were read without a `Value` tree: the oracle the borrowed
    /// decoder is held to (same event, or an error for the same frames).
    fn decode_via_value(text: &str) -> Result<StreamEvent, ()> {
        let env: Envelope = serde_json::from_str(text).map_err(|_| ())?;
        if env.topic_name == TOPIC_METADATA {
            let msg = env
                .event_body
                .get("message")
                .and_then(|m| m.as_str())
                .unwrap_or_default();
            return Ok(match msg {
                HEARTBEAT_MESSAGE => StreamEvent::Heartbeat,
                PONG_MESSAGE => StreamEvent::Pong,
                other => StreamEvent::Metadata(other.to_string()),
            });
        }
        if env.topic_name == TOPIC_SOCKET_CLOSING {
            return Ok(StreamEvent::SocketClosing);
        }
        let kind = env
            .metadata
            .as_ref()
            .and_then(|m| m.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or_default()
            .to_string();
        let topic = env.topic_name;
        if topic.starts_with("v2.conversations.chats.") {
            if topic.ends_with(".messages") {
                match kind.as_str() {
                    "message" => {
                        return serde_json::from_value(env.event_body)
                            .map(StreamEvent::Message)
                            .map_err(|_| ());
                    }
                    "typing-indicator" => {
                        return serde_json::from_value(env.event_body)
                            .map(StreamEvent::Typing)
                            .map_err(|_| ());
                    }
                    _ => {}
                }
            } else if topic.ends_with(".members") && kind == "member-change" {
                return serde_json::from_value(env.event_body)
                    .map(StreamEvent::MemberChange)
                    .map_err(|_| ());
            }
        }
        Ok(StreamEvent::Unknown { topic })
    }

    fn json_piece() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just("null".to_string()),
            Just("3".to_string()),
            Just("true".to_string()),
            Just("[1,{\"message\":\"x\"}]".to_string()),
            Just("\"WebSocket Heartbeat\"".to_string()),
            Just("\"WebSocket\\u0020Heartbeat\"".to_string()),
            Just("\"pong\"".to_string()),
            Just("\"message\"".to_string()),
            Just("\"member-change\"".to_string()),
            Just("\"typing-indicator\"".to_string()),
            Just("{}".to_string()),
            "[a-z \\\\\"]{0,6}".prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
        ]
    }

    fn object(keys: &'static [&'static str]) -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        proptest::collection::vec((proptest::sample::select(keys), json_piece()), 0..4).prop_map(
            |kv| {
                let fields: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", fields.join(","))
            },
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
        /// Generated frames (known and unknown topics, bodies and metadata of every JSON type,
        /// duplicate keys, escaped strings, missing fields, real message bodies) decode to the
        /// same event as through a `Value`, or fail for both.
        #[test]
        fn the_borrowed_decoder_agrees_with_the_value_decoder(
            topic in proptest::sample::select(vec![
                "\"channel.metadata\"", "\"channel\\u002emetadata\"", "\"v2.system.socket_closing\"",
                "\"v2.conversations.chats.c1.messages\"", "\"v2.conversations.chats.c1.members\"",
                "\"v2.other\"", "3", "null",
            ]),
            version in proptest::sample::select(vec![None, Some("\"2\""), Some("2"), Some("null")]),
            body in proptest::prop_oneof![
                object(&["message", "id", "other"]),
                json_piece(),
                proptest::strategy::Just(r#"{"id":"m1","sender":{"id":"a1"},"body":"hi","bodyType":"standard","timestamp":"2026-01-01T00:00:00.000Z","conversation":{"id":"c1"}}"#.to_string()),
                proptest::strategy::Just(r#"{"conversation":{"id":"c1"},"member":{"id":"m1","state":"CONNECTED"},"timestamp":"2026-01-01T00:00:00.000Z"}"#.to_string()),
                proptest::strategy::Just(r#"{"id":"m1","id":"m2","sender":{"id":"a1"},"body":"hi","body":"again","bodyType":"standard","timestamp":"2026-01-01T00:00:00.000Z","conversation":{"id":"c1"}}"#.to_string()),
            ],
            has_body in proptest::bool::ANY,
            metadata in proptest::option::of(proptest::prop_oneof![object(&["type", "CorrelationId"]), json_piece()]),
        ) {
            let mut fields = vec![format!("\"topicName\":{topic}")];
            if let Some(v) = version {
                fields.push(format!("\"version\":{v}"));
            }
            if has_body {
                fields.push(format!("\"eventBody\":{body}"));
            }
            if let Some(m) = &metadata {
                fields.push(format!("\"metadata\":{m}"));
            }
            let frame = format!("{{{}}}", fields.join(","));
            proptest::prop_assert_eq!(decode_frame(&frame).map_err(|_| ()), decode_via_value(&frame), "{}", frame);
        }
    }

    #[test]
    fn decodes_heartbeat_pong_and_closing() {
        let hb = encode_envelope(
            TOPIC_METADATA,
            serde_json::json!({"message": HEARTBEAT_MESSAGE}),
            None,
        );
        assert_eq!(decode_frame(&hb).ok(), Some(StreamEvent::Heartbeat));
        let pong = encode_envelope(TOPIC_METADATA, serde_json::json!({"message": "pong"}), None);
        assert_eq!(decode_frame(&pong).ok(), Some(StreamEvent::Pong));
        let closing = encode_envelope(TOPIC_SOCKET_CLOSING, serde_json::json!({}), None);
        assert_eq!(
            decode_frame(&closing).ok(),
            Some(StreamEvent::SocketClosing)
        );
    }

    #[test]
    fn decodes_member_change_and_message() {
        let mc = r#"{"topicName":"v2.conversations.chats.c1.members","version":"2","eventBody":{"conversation":{"id":"c1"},"member":{"id":"m1","state":"DISCONNECTED"},"timestamp":"2026-01-01T00:00:00.000Z"},"metadata":{"type":"member-change"}}"#;
        match decode_frame(mc) {
            Ok(StreamEvent::MemberChange(m)) => {
                assert_eq!(m.member.id, "m1");
                assert_eq!(m.member.state, MemberState::Disconnected);
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = r#"{"topicName":"v2.conversations.chats.c1.messages","eventBody":{"id":"x","conversation":{"id":"c1"},"sender":{"id":"m1"},"body":"hi","bodyType":"standard","timestamp":"t"},"metadata":{"type":"message"}}"#;
        assert!(matches!(decode_frame(msg), Ok(StreamEvent::Message(m)) if m.body == "hi"));
    }

    #[test]
    fn malformed_and_unknown_frames_are_told_apart() {
        assert!(matches!(
            decode_frame("{not json"),
            Err(DecodeError::Envelope(_))
        ));
        let bad_body = r#"{"topicName":"v2.conversations.chats.c1.members","eventBody":{"member":7},"metadata":{"type":"member-change"}}"#;
        assert!(matches!(
            decode_frame(bad_body),
            Err(DecodeError::Body { .. })
        ));
        let unknown = r#"{"topicName":"v2.users.x.presence","eventBody":{}}"#;
        assert!(matches!(
            decode_frame(unknown),
            Ok(StreamEvent::Unknown { .. })
        ));
        let odd_state = r#"{"topicName":"v2.conversations.chats.c1.members","eventBody":{"conversation":{"id":"c1"},"member":{"id":"m","state":"PARKED"}},"metadata":{"type":"member-change"}}"#;
        assert!(
            matches!(decode_frame(odd_state), Ok(StreamEvent::MemberChange(m)) if m.member.state == MemberState::Unknown)
        );
    }
}
