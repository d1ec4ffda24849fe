//! The backend-neutral interface a session talks to.
//!
//! A session needs a handful of REST calls and a way to read stream frames; it does not need to
//! know they are Genesys's. [`ChatApi`] is that seam: `genesys::client::GenesysApi` implements it
//! today, and a Web Messaging backend would be a second implementation in its own module.
//!
//! The seam owns the neutral vocabulary every backend maps its wire types onto: member roles
//! and states, message kinds, how a call failed as a session needs to know it ([`Failure`]),
//! and the URL policy (plaintext only to loopback). Nothing outside a backend's own module
//! names a wire type: the house reads transport -> backend decode -> session -> events.

use crate::secret::Secret;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::time::Duration;

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

/// A URL the configuration forbids.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// The one URL policy, for REST and streams alike: https/wss anywhere; http/ws only to a
/// loopback host unless `allow_insecure`.
pub fn check_url(url: &str, allow_insecure: bool) -> Result<(), PolicyError> {
    let u = url::Url::parse(url).map_err(|e| PolicyError(format!("bad URL {url}: {e}")))?;
    match u.scheme() {
        "https" | "wss" => Ok(()),
        "http" | "ws" => {
            let loopback = match u.host() {
                Some(url::Host::Ipv4(a)) => a.is_loopback(),
                Some(url::Host::Ipv6(a)) => a.is_loopback(),
                Some(url::Host::Domain(d)) => d == "localhost",
                None => false,
            };
            if loopback || allow_insecure {
                Ok(())
            } else {
                Err(PolicyError(format!(
                    "plaintext {} to non-loopback host {}; set allow_insecure to permit",
                    u.scheme(),
                    u.host_str().unwrap_or("?")
                )))
            }
        }
        other => Err(PolicyError(format!("unsupported scheme {other}"))),
    }
}

/// The hosts a stream URL may name by default, given the API base: the API's own host and,
/// for a name of three labels or more, every host under its parent domain
/// (`https://api.mypurecloud.com` -> `api.mypurecloud.com`, `*.mypurecloud.com`; the
/// emulator's `http://127.0.0.1:8780` -> `127.0.0.1`). A two-label name or an address gives
/// only itself: `*.com` would allow anything.
pub fn default_stream_hosts(api_base: &str) -> Vec<String> {
    let Some(host) = url::Url::parse(api_base)
        .ok()
        .and_then(|u| u.host_str().map(|h| h.to_ascii_lowercase()))
    else {
        return Vec::new();
    };
    let mut out = vec![host.clone()];
    let is_name = matches!(url::Host::parse(&host), Ok(url::Host::Domain(_)));
    if let (true, Some((_, parent))) = (is_name, host.split_once('.')) {
        if parent.contains('.') {
            out.push(format!("*.{parent}"));
        }
    }
    out
}

/// Whether `host` is one `rules` names: a rule is a host (`streaming.example.com`,
/// `127.0.0.1`, `[::1]`) or `*.<domain>` for that domain and every name under it. Case does
/// not matter; ports are not compared.
pub fn host_allowed(host: &str, rules: &[String]) -> bool {
    let host = host.to_ascii_lowercase();
    rules.iter().any(|r| {
        let r = r.trim().to_ascii_lowercase();
        match r.strip_prefix("*.") {
            Some(domain) => host == domain || host.ends_with(&format!(".{domain}")),
            None => host == r,
        }
    })
}

/// The stream URL policy: [`check_url`], then, when `hosts` names any, the URL's host must be
/// one of them (see [`host_allowed`]). An `attach` names its own `eventStreamUri`; without this
/// rule it could point guestd at any internal service.
pub fn check_stream_url(
    url: &str,
    allow_insecure: bool,
    hosts: &[String],
) -> Result<(), PolicyError> {
    check_url(url, allow_insecure)?;
    if hosts.is_empty() {
        return Ok(());
    }
    let host = url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    if host_allowed(&host, hosts) {
        Ok(())
    } else {
        Err(PolicyError(format!(
            "stream host {host} is not the platform's ({}); genesys.stream_hosts can add hosts",
            hosts.join(", ")
        )))
    }
}

/// Longest id guestd puts into a URL. Genesys ids are UUIDs (36 characters).
pub const MAX_ID_LEN: usize = 128;

/// Whether `id` may go into a URL guestd builds: 1 to [`MAX_ID_LEN`] ASCII letters, digits,
/// `-` and `_`. Genesys ids (conversations, members, deployments) are UUIDs, and the emulator
/// issues UUIDs; the set leaves room for readable test ids ("demo-deployment") while it cannot
/// hold `/`, `.`, `%`, `?`, `#` or anything else that would move a request elsewhere (an id
/// `../../users/me?expand=authorization` once made guestd call that path with the
/// organisation's token).
pub fn check_id(what: &str, id: &str) -> Result<(), PolicyError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(PolicyError(format!(
            "{what} is not an id (1 to {MAX_ID_LEN} letters, digits, '-' or '_'; Genesys ids are UUIDs)"
        )))
    }
}

/// `s` as one URL path segment: every byte but letters, digits, `-`, `_` and `~`
/// percent-encoded. Defence in depth behind [`check_id`], which is what keeps dot segments out
/// (URL parsers read `%2e%2e` as `..`).
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Characters of a remote body an error or event may carry.
pub const EXCERPT_CHARS: usize = 200;

/// A short, safe excerpt of text a remote server sent (an error body, an upgrade refusal), for
/// error messages and events: control characters become spaces (no terminal escapes or forged
/// log lines), anything that looks like a bearer token (a JWT `eyJ...`, a dotted token of 32+
/// characters, an opaque run of 64+) becomes `<redacted>`, and at most `max` characters are
/// kept (then `...`).
pub fn excerpt(text: &str, max: usize) -> String {
    let is_token_char =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | '/' | '=');
    let mut out = String::new();
    let mut chars = 0;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if chars >= max {
            out.push_str("...");
            break;
        }
        if is_token_char(c) {
            let end = rest.find(|c: char| !is_token_char(c)).unwrap_or(rest.len());
            let run = &rest[..end];
            rest = &rest[end..];
            let secret = (run.starts_with("eyJ") && run.len() >= 16)
                || (run.matches('.').count() >= 2 && run.len() >= 32)
                || run.len() >= 64;
            let shown = if secret { "<redacted>" } else { run };
            for c in shown.chars() {
                if chars >= max {
                    break;
                }
                out.push(c);
                chars += 1;
            }
            continue;
        }
        rest = &rest[c.len_utf8()..];
        out.push(if c.is_control() { ' ' } else { c });
        chars += 1;
    }
    out
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
    #[error("rate limited (429){}", .0.map(|d| format!(", retry after {} s", d.as_secs())).unwrap_or_default())]
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
    /// guestd's configuration lacks what the call needs (a `start` without organization or
    /// deployment id): refused before anything is sent.
    #[error("{0}")]
    NotConfigured(String),
}

impl ChatRef {
    /// Both ids of the chat pass [`check_id`] (before any URL is built from them).
    pub fn check_ids(&self) -> Result<(), PolicyError> {
        check_id("conversation_id", &self.conversation_id)?;
        check_id("member_id", &self.member_id)
    }
}

impl From<PolicyError> for ApiError {
    fn from(e: PolicyError) -> Self {
        ApiError::Policy(e.0)
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

#[cfg(test)]
mod tests {
    use super::{
        check_id, check_stream_url, check_url, default_stream_hosts, excerpt, path_segment,
    };

    #[test]
    fn streams_stay_on_the_platforms_hosts() {
        let rules = default_stream_hosts("https://api.mypurecloud.com");
        assert_eq!(rules, ["api.mypurecloud.com", "*.mypurecloud.com"]);
        for ok in [
            "wss://streaming.mypurecloud.com/v2/x",
            "wss://api.mypurecloud.com/x",
            "wss://A.B.MyPureCloud.com:8443/x",
        ] {
            assert!(check_stream_url(ok, false, &rules).is_ok(), "{ok}");
        }
        for bad in [
            "wss://mypurecloud.com.evil.example/x",
            "wss://evilmypurecloud.com/x",
            "wss://169.254.169.254/latest",
            "ws://127.0.0.1:8080/x",
        ] {
            assert!(check_stream_url(bad, false, &rules).is_err(), "{bad}");
        }
        let emu = default_stream_hosts("http://127.0.0.1:8780");
        assert_eq!(emu, ["127.0.0.1"]);
        assert!(check_stream_url("ws://127.0.0.1:9/v2/stream/c", false, &emu).is_ok());
        assert!(check_stream_url("ws://127.0.0.2:9/v2/stream/c", false, &emu).is_err());
        assert_eq!(default_stream_hosts("https://example.com"), ["example.com"]);
        let extra = vec!["*.example.net".to_string(), "[::1]".to_string()];
        assert!(check_stream_url("wss://s.example.net/x", false, &extra).is_ok());
        assert!(check_stream_url("ws://[::1]:1/x", false, &extra).is_ok());
        assert!(check_stream_url("wss://anything.example/x", false, &[]).is_ok());
    }

    #[test]
    fn excerpts_are_short_plain_and_hold_no_token() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlc2lnbmF0dXJl";
        let body =
            format!("\u{1b}[31mdenied\r\nfake: line {jwt} id 3f2a9c1d-7b4e-4c1a-9d2e-0123456789ab");
        let e = excerpt(&body, 200);
        assert!(!e.contains(jwt) && !e.contains("eyJ"), "{e}");
        assert!(e.contains("<redacted>"), "{e}");
        assert!(!e.chars().any(char::is_control), "{e:?}");
        assert!(
            e.contains("3f2a9c1d-7b4e-4c1a-9d2e-0123456789ab"),
            "ids stay: {e}"
        );
        let long = excerpt(&"x ".repeat(10_000), 200);
        assert_eq!(long.chars().count(), 203, "{long}");
        assert!(long.ends_with("..."));
        assert_eq!(
            excerpt(&"a".repeat(500), 200),
            "<redacted>",
            "an opaque run"
        );
        assert_eq!(excerpt("not found", 200), "not found");
    }

    #[test]
    fn ids_are_ids_and_nothing_that_moves_a_url() {
        for good in [
            "3f2a9c1d-7b4e-4c1a-9d2e-0123456789ab",
            "demo-deployment",
            "c1",
            "a_b",
        ] {
            assert!(check_id("id", good).is_ok(), "{good}");
        }
        let long = "a".repeat(129);
        for bad in [
            "",
            "..",
            "../../users/me?expand=authorization",
            "..%2F..%2Fusers",
            "a/b",
            "a.b",
            "a b",
            "a?b",
            "a#b",
            "a\u{0}",
            "ü",
            long.as_str(),
        ] {
            assert!(check_id("id", bad).is_err(), "{bad:?}");
        }
        assert_eq!(path_segment("a-b_c~9"), "a-b_c~9");
        assert_eq!(path_segment("../x?y"), "%2E%2E%2Fx%3Fy");
        assert_eq!(path_segment("ü"), "%C3%BC");
    }

    #[test]
    fn plaintext_only_to_loopback_unless_allowed() {
        assert!(check_url("http://127.0.0.1:8080", false).is_ok());
        assert!(check_url("ws://localhost:1/x", false).is_ok());
        assert!(check_url("ws://[::1]:1/x", false).is_ok());
        assert!(check_url("https://api.mypurecloud.com", false).is_ok());
        assert!(check_url("http://api.example.com", false).is_err());
        assert!(check_url("ws://10.0.0.1/x", false).is_err());
        assert!(check_url("ws://10.0.0.1/x", true).is_ok());
        assert!(check_url("ftp://x", true).is_err());
        assert!(check_url("not a url", true).is_err());
    }
}
