//! The guest chat REST side: create's request and reply (with the guest's details and the
//! routing target), list members' entries, pages, the members and messages queries (empty
//! values read as "not given", as Genesys's SDK sends them), send message's body, the body
//! limit, and the paths. Its own file because these are the HTTP calls' shapes, apart from the
//! websocket's.

use super::*;
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

/// The most characters a chat message body may have (`CreateWebChatMessageRequest.body`).
pub const MAX_BODY_CHARS: usize = 4000;

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
