//! Web Messaging wire types, named as the API names them (`../shared/protocol/
//! genesys-web-messaging.md`, sections 2-4 and 8). Client actions are encoded exactly as
//! Genesys's own transport SDK encodes them (its serialization tests assert those bytes); server
//! frames are decoded into [`Frame`], ignoring unknown fields and keeping unknown classes as
//! [`Frame::Unknown`] instead of failing.
//!
//! Where the reference marks a [CONFLICT] both forms are accepted on input:
//! - `ConnectionClosedEvent`: `body.reason` (transport SDK) or `body.reasonCode` (schema).
//! - `SessionExpiredEvent`, `GenerateUrlError`: any `type` (`response` or `message`).
//! - `expirationDate`: epoch seconds (seen live); a value too large to be seconds is read as ms.
//! - echo metadata values are strings (`"259200"`); numbers are accepted too.

use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The fixed `tracingId` of the transport SDK's health check: base64 of "HealthCheckMessageId".
pub const HEALTH_CHECK_ID: &str = "SGVhbHRoQ2hlY2tNZXNzYWdlSWQ=";
/// The longest guest text the platform takes, in bytes (error 4011 beyond).
pub const MAX_TEXT_BYTES: usize = 4096;
/// The longest session token, in characters.
pub const MAX_TOKEN_CHARS: usize = 2048;

/// Wire error codes (section 8) a supervisor acts on.
pub mod code {
    /// The session is read-only: no new messages.
    pub const READ_ONLY: u16 = 409;
    /// Rate limited (with `TooManyRequestsErrorMessage`).
    pub const TOO_MANY_REQUESTS: u16 = 429;
    /// The session has expired.
    pub const SESSION_EXPIRED: u16 = 4006;
    /// The session token is unknown.
    pub const SESSION_NOT_FOUND: u16 = 4007;
    /// The message is too long.
    pub const MESSAGE_TOO_LONG: u16 = 4011;
    /// Custom attributes are too large.
    pub const CUSTOM_ATTRIBUTES_TOO_LARGE: u16 = 4013;
    /// A required parameter of the request is missing.
    pub const MISSING_PARAMETER: u16 = 4020;
    /// Request rate too high (inside a 429 frame).
    pub const RATE: u16 = 4029;
}

/// A client action, encoded as the transport SDK encodes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Action<'a> {
    /// Open or resume the session of `token` (`start_new`: a fresh one).
    ConfigureSession {
        /// The deployment.
        deployment_id: &'a str,
        /// Discard the old session.
        start_new: bool,
    },
    /// Guest text.
    Text(&'a str),
    /// Guest typing.
    TypingOn,
    /// Presence Join (autostart).
    Join,
    /// Presence Clear (the guest clears and leaves; irreversible).
    Clear,
    /// Health check.
    Echo,
    /// A short-lived bearer for the history call.
    GetJwt,
    /// Close every socket of the session.
    CloseSession,
}

impl Action<'_> {
    /// The frame's text for `token`, tagged `tracing_id`.
    pub fn encode(&self, token: &str, tracing_id: &str) -> String {
        let event = |kind: &str, body: Value| json!({"events": [{"eventType": kind, kind.to_lowercase(): body}], "type": "Event"});
        let mut v = match self {
            Action::ConfigureSession {
                deployment_id,
                start_new,
            } => json!({
                "deploymentId": deployment_id,
                "startNew": start_new,
                "journeyContext": {"customer": {"id": token, "idType": "cookie"}, "customerSession": {"id": "", "type": "web"}},
                "action": "configureSession",
            }),
            Action::Text(t) => {
                json!({"message": {"text": t, "type": "Text"}, "action": "onMessage"})
            }
            Action::TypingOn => {
                json!({"message": event("Typing", json!({"type": "On"})), "action": "onMessage"})
            }
            Action::Join => {
                json!({"message": event("Presence", json!({"type": "Join"})), "action": "onMessage"})
            }
            Action::Clear => {
                json!({"message": event("Presence", json!({"type": "Clear"})), "action": "onMessage"})
            }
            Action::Echo => {
                json!({"message": {"text": "ping", "type": "Text"}, "action": "echo"})
            }
            Action::GetJwt => json!({"action": "getJwt"}),
            Action::CloseSession => json!({"closeAllConnections": true, "action": "closeSession"}),
        };
        if let Some(m) = v.as_object_mut() {
            m.insert("token".into(), json!(token));
            m.insert("tracingId".into(), json!(tracing_id));
        }
        v.to_string()
    }
}

/// `SessionResponse.body`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SessionResponse {
    /// False in the reply that confirms `closeSession`.
    pub connected: bool,
    /// False when an existing session was resumed.
    pub new_session: bool,
    /// The conversation was ended in ReadOnly mode: only history may be read.
    pub read_only: bool,
    /// Session lifetime after the last message, seconds.
    #[serde(deserialize_with = "lenient_u64")]
    pub duration_seconds: Option<u64>,
    /// When the session expires, epoch seconds.
    #[serde(deserialize_with = "lenient_u64")]
    pub expiration_date: Option<u64>,
    /// Whether the session was autostarted.
    pub auto_started: bool,
}

/// A message or event in a `StructuredMessage` (pushed, an echo, or a history entity).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StructuredMessage {
    /// The server's id.
    pub id: String,
    /// `Inbound` (from the guest; echoes) or `Outbound` (agent, bot, flow).
    pub direction: String,
    /// `Text`, `Structured`, `Event`, `Receipt`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Text, if any.
    pub text: Option<String>,
    /// `Human`, `Bot`, or empty.
    pub originating_entity: Option<String>,
    /// Channel: time and message id.
    pub channel: Option<Channel>,
    /// Events (typing, presence).
    pub events: Vec<Event>,
    /// String metadata (`readOnly`, `durationSeconds`, `expirationDate`, `correlationId`).
    pub metadata: Option<serde_json::Map<String, Value>>,
}

/// `channel` of a message.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Channel {
    /// RFC 3339.
    pub time: Option<String>,
    /// Inbound messages: the id history uses.
    pub message_id: Option<String>,
}

/// One event of a message.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Event {
    /// `Typing`, `Presence`.
    pub event_type: String,
    /// Typing details.
    pub typing: Option<Value>,
    /// Presence details: `{"type": "Join" | "Disconnect" | "Clear" | ...}`.
    pub presence: Option<Value>,
}

impl StructuredMessage {
    /// The id to de-duplicate and resume by: `channel.messageId`, else `id`.
    pub fn key(&self) -> &str {
        self.channel
            .as_ref()
            .and_then(|c| c.message_id.as_deref())
            .unwrap_or(&self.id)
    }

    fn presence(&self, kind: &str) -> bool {
        self.events.iter().any(|e| {
            e.event_type == "Presence"
                && e.presence
                    .as_ref()
                    .and_then(|p| p.get("type"))
                    .and_then(Value::as_str)
                    == Some(kind)
        })
    }

    /// A Presence Disconnect: an agent or flow ended the conversation. `Some(read_only)`.
    pub fn disconnect(&self) -> Option<bool> {
        if self.direction != "Outbound" || !self.presence("Disconnect") {
            return None;
        }
        let read_only = self
            .metadata
            .as_ref()
            .and_then(|m| m.get("readOnly"))
            .is_some_and(|v| v.as_str() == Some("true") || v.as_bool() == Some(true));
        Some(read_only)
    }

    /// Agent or bot typing.
    pub fn typing(&self) -> bool {
        self.events.iter().any(|e| e.event_type == "Typing")
    }

    /// The session's expiry from echo metadata, epoch seconds.
    pub fn expiration_date(&self) -> Option<u64> {
        let v = self.metadata.as_ref()?.get("expirationDate")?;
        as_u64(v).map(seconds)
    }

    /// The session's time to live from echo metadata, seconds (a string on the wire).
    pub fn duration_seconds(&self) -> Option<u64> {
        as_u64(self.metadata.as_ref()?.get("durationSeconds")?)
    }
}

/// A decoded server frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Reply to `configureSession` (or `closeSession`).
    Session(SessionResponse),
    /// A message or event; `tracing_id` on echoes of the guest's sends and echo replies.
    Message {
        /// The message.
        message: Box<StructuredMessage>,
        /// `type`: `response` (a direct reply) or `message` (pushed).
        response: bool,
        /// The request it answers or echoes.
        tracing_id: Option<String>,
    },
    /// Reply to `getJwt`.
    Jwt {
        /// The bearer (a [`Secret`]: `{:?}` of the frame shows `<redacted>`).
        jwt: Secret,
        /// Expiry, epoch seconds.
        exp: u64,
    },
    /// The session expired.
    SessionExpired,
    /// The guest cleared the conversation; the session is gone.
    SessionCleared,
    /// This socket was closed: `signedIn` (the token is dead), or none (a 4th socket evicted it).
    ConnectionClosed {
        /// `reason` or `reasonCode`.
        reason: Option<String>,
    },
    /// An authenticated session was logged out elsewhere.
    Logout,
    /// Rate limited: wait `retry_after` seconds; the socket stays up.
    TooManyRequests {
        /// Seconds.
        retry_after: u64,
        /// The request refused.
        tracing_id: Option<String>,
    },
    /// An error reply (`class: "string"`): HTTP-style or 4xxx code and its text.
    Error {
        /// The code.
        code: u16,
        /// The text.
        text: String,
        /// The request refused.
        tracing_id: Option<String>,
    },
    /// A class guestd does not use (attachments, unknown): kept by name.
    Unknown(String),
}

/// Why a frame could not be read at all.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("web messaging frame: {0}")]
pub struct DecodeError(pub String);

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(rename = "class", default)]
    class: String,
    #[serde(default)]
    code: Option<Value>,
    #[serde(default)]
    body: Value,
    #[serde(rename = "tracingId", default)]
    tracing_id: Option<String>,
}

fn as_u64(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
}

/// Epoch seconds from a value that may be milliseconds (the reference's [CONFLICT]).
fn seconds(v: u64) -> u64 {
    if v > 100_000_000_000 { v / 1000 } else { v }
}

fn lenient_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    Ok(v.as_ref().and_then(as_u64))
}

/// Decode one text frame.
pub fn decode(text: &str) -> Result<Frame, DecodeError> {
    let env: Envelope =
        serde_json::from_str(text).map_err(|e| DecodeError(format!("not an envelope: {e}")))?;
    let code = env.code.as_ref().and_then(as_u64).unwrap_or(200);
    let code = u16::try_from(code).unwrap_or(u16::MAX);
    let body = env.body;
    let tracing_id = env.tracing_id;
    let parse = |what: &str, b: Value| -> Result<StructuredMessage, DecodeError> {
        serde_json::from_value(b).map_err(|e| DecodeError(format!("{what}: {e}")))
    };
    Ok(match env.class.as_str() {
        "SessionResponse" => Frame::Session(
            serde_json::from_value::<SessionResponse>(body)
                .map(|mut s| {
                    s.expiration_date = s.expiration_date.map(seconds);
                    s
                })
                .map_err(|e| DecodeError(format!("SessionResponse: {e}")))?,
        ),
        "StructuredMessage" => Frame::Message {
            message: Box::new(parse("StructuredMessage", body)?),
            response: env.kind == "response",
            tracing_id,
        },
        "JwtResponse" => Frame::Jwt {
            jwt: body
                .get("jwt")
                .and_then(Value::as_str)
                .map(Secret::new)
                .ok_or_else(|| DecodeError("JwtResponse without jwt".into()))?,
            exp: body.get("exp").and_then(as_u64).map(seconds).unwrap_or(0),
        },
        "SessionExpiredEvent" => Frame::SessionExpired,
        "SessionClearedEvent" => Frame::SessionCleared,
        "ConnectionClosedEvent" => Frame::ConnectionClosed {
            reason: body
                .get("reason")
                .or_else(|| body.get("reasonCode"))
                .and_then(Value::as_str)
                .map(str::to_string),
        },
        "LogoutEvent" => Frame::Logout,
        "TooManyRequestsErrorMessage" => Frame::TooManyRequests {
            retry_after: body.get("retryAfter").and_then(as_u64).unwrap_or(1),
            tracing_id,
        },
        "string" => Frame::Error {
            code,
            text: match body {
                Value::String(s) => s,
                other => other.to_string(),
            },
            tracing_id,
        },
        "" => return Err(DecodeError("no class".into())),
        other => Frame::Unknown(other.to_string()),
    })
}

/// A history page (`GET /api/v2/webmessaging/messages`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HistoryPage {
    /// Messages (newest first, the reference believes).
    pub entities: Vec<StructuredMessage>,
    /// Page size.
    pub page_size: u32,
    /// This page, from 1.
    pub page_number: u32,
    /// Messages in all.
    pub total: u32,
    /// Pages in all.
    pub page_count: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn actions_encode_as_the_transport_sdk_does() {
        // The SDK's serialization tests assert these objects (field order aside).
        assert_eq!(
            v(&Action::ConfigureSession {
                deployment_id: "<deploymentId>",
                start_new: false
            }
            .encode("<token>", "<tid>")),
            v(
                r#"{"token":"<token>","deploymentId":"<deploymentId>","startNew":false,"journeyContext":{"customer":{"id":"<token>","idType":"cookie"},"customerSession":{"id":"","type":"web"}},"tracingId":"<tid>","action":"configureSession"}"#
            )
        );
        assert_eq!(
            v(&Action::Text("Hello world").encode("<token>", "<tid>")),
            v(
                r#"{"token":"<token>","message":{"text":"Hello world","type":"Text"},"tracingId":"<tid>","action":"onMessage"}"#
            )
        );
        assert_eq!(
            v(&Action::TypingOn.encode("<token>", "<tid>")),
            v(
                r#"{"token":"<token>","tracingId":"<tid>","action":"onMessage","message":{"events":[{"eventType":"Typing","typing":{"type":"On"}}],"type":"Event"}}"#
            )
        );
        assert_eq!(
            v(&Action::Join.encode("<token>", "<tid>")),
            v(
                r#"{"token":"<token>","tracingId":"<tid>","action":"onMessage","message":{"events":[{"eventType":"Presence","presence":{"type":"Join"}}],"type":"Event"}}"#
            )
        );
        assert_eq!(
            v(&Action::Clear.encode("<token>", "<tid>")),
            v(
                r#"{"token":"<token>","tracingId":"<tid>","action":"onMessage","message":{"events":[{"eventType":"Presence","presence":{"type":"Clear"}}],"type":"Event"}}"#
            )
        );
        assert_eq!(
            v(&Action::Echo.encode("<token>", HEALTH_CHECK_ID)),
            v(
                r#"{"token":"<token>","tracingId":"SGVhbHRoQ2hlY2tNZXNzYWdlSWQ=","action":"echo","message":{"text":"ping","type":"Text"}}"#
            )
        );
        assert_eq!(
            v(&Action::GetJwt.encode("<token>", "<tid>")),
            v(r#"{"token":"<token>","tracingId":"<tid>","action":"getJwt"}"#)
        );
        assert_eq!(
            v(&Action::CloseSession.encode("<token>", "<tid>")),
            v(
                r#"{"token":"<token>","closeAllConnections":true,"tracingId":"<tid>","action":"closeSession"}"#
            )
        );
    }

    #[test]
    fn session_responses_decode_full_and_minimal() {
        let full = r#"{"type":"response","class":"SessionResponse","code":200,"body":{"connected":true,"newSession":true,"readOnly":false,"maxCustomDataBytes":100,"allowedMedia":{"inbound":{"fileTypes":[{"type":"*/*"}],"maxFileSizeKB":10240}},"blockedExtensions":[".ade"],"clearedExistingSession":false,"durationSeconds":259200,"expirationDate":1791139139}}"#;
        let Frame::Session(s) = decode(full).unwrap() else {
            panic!()
        };
        assert!(s.connected && s.new_session && !s.read_only);
        assert_eq!(
            (s.duration_seconds, s.expiration_date),
            (Some(259200), Some(1791139139))
        );
        let min = r#"{"type":"response","class":"SessionResponse","code":200,"body":{"connected":true,"newSession":true}}"#;
        let Frame::Session(s) = decode(min).unwrap() else {
            panic!()
        };
        assert_eq!(s.expiration_date, None);
        // Milliseconds (the reference's conflict) read as seconds.
        let ms = r#"{"type":"response","class":"SessionResponse","code":200,"body":{"connected":true,"readOnly":true,"expirationDate":1791139139000}}"#;
        let Frame::Session(s) = decode(ms).unwrap() else {
            panic!()
        };
        assert_eq!((s.read_only, s.expiration_date), (true, Some(1791139139)));
    }

    #[test]
    fn messages_decode_echoes_agents_disconnects_and_echo_replies() {
        let echo = r#"{"type":"message","class":"StructuredMessage","code":200,"body":{"originatingEntity":"","text":"hi","direction":"Inbound","id":"0123456789abcdef0123456789abcdef","channel":{"time":"2024-02-09T22:39:48.101Z","messageId":"11111111-2222-3333-4444-555555555555"},"type":"Text","metadata":{"correlationId":"x"}},"tracingId":"t-1"}"#;
        let Frame::Message {
            message,
            response,
            tracing_id,
        } = decode(echo).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (message.direction.as_str(), message.text.as_deref()),
            ("Inbound", Some("hi"))
        );
        assert_eq!(message.key(), "11111111-2222-3333-4444-555555555555");
        assert!(!response);
        assert_eq!(tracing_id.as_deref(), Some("t-1"));

        let ro = r#"{"type":"message","class":"StructuredMessage","code":200,"body":{"type":"Event","direction":"Outbound","id":"d1","channel":{"time":"2024-02-09T22:39:50.526Z","type":"Private","from":{"nickname":"Robot Friend"},"to":{}},"events":[{"eventType":"Presence","presence":{"type":"Disconnect"}}],"metadata":{"readOnly":"true"},"originatingEntity":"Bot"}}"#;
        let Frame::Message { message, .. } = decode(ro).unwrap() else {
            panic!()
        };
        assert_eq!(message.disconnect(), Some(true));
        let send = ro.replace(r#","metadata":{"readOnly":"true"}"#, "");
        let Frame::Message { message, .. } = decode(&send).unwrap() else {
            panic!()
        };
        assert_eq!(message.disconnect(), Some(false));
        // The guest's own Join echo is not a disconnect.
        let join = r#"{"type":"message","class":"StructuredMessage","code":200,"body":{"direction":"Inbound","id":"j","type":"Event","events":[{"eventType":"Presence","presence":{"type":"Join"}}]}}"#;
        let Frame::Message { message, .. } = decode(join).unwrap() else {
            panic!()
        };
        assert_eq!(message.disconnect(), None);

        let typing = r#"{"type":"message","class":"StructuredMessage","code":200,"body":{"direction":"Outbound","id":"t","type":"Event","events":[{"eventType":"Typing","typing":{"type":"On","duration":5000}}]}}"#;
        let Frame::Message { message, .. } = decode(typing).unwrap() else {
            panic!()
        };
        assert!(message.typing());

        let hc = r#"{"type":"response","class":"StructuredMessage","code":200,"body":{"text":"ping","type":"Text","direction":"Inbound","id":"echo_id","metadata":{"durationSeconds":"259200","expirationDate":"1791139139"}},"tracingId":"SGVhbHRoQ2hlY2tNZXNzYWdlSWQ="}"#;
        let Frame::Message {
            message,
            response,
            tracing_id,
        } = decode(hc).unwrap()
        else {
            panic!()
        };
        assert!(response);
        assert_eq!(tracing_id.as_deref(), Some(HEALTH_CHECK_ID));
        assert_eq!(message.expiration_date(), Some(1791139139));
    }

    #[test]
    fn session_ends_rate_limits_and_errors_decode_in_every_form() {
        assert_eq!(
            decode(r#"{"type":"response","class":"JwtResponse","code":200,"body":{"jwt":"expected-jwt-token","exp":1623675564}}"#).unwrap(),
            Frame::Jwt { jwt: Secret::new("expected-jwt-token"), exp: 1623675564 }
        );
        for t in ["response", "message"] {
            let f =
                format!(r#"{{"type":"{t}","class":"SessionExpiredEvent","code":200,"body":{{}}}}"#);
            assert_eq!(decode(&f).unwrap(), Frame::SessionExpired);
        }
        assert_eq!(
            decode(r#"{"type":"message","class":"SessionClearedEvent","code":200,"body":{}}"#)
                .unwrap(),
            Frame::SessionCleared
        );
        assert_eq!(
            decode(r#"{"type":"message","class":"ConnectionClosedEvent","code":200,"body":{}}"#)
                .unwrap(),
            Frame::ConnectionClosed { reason: None }
        );
        for field in ["reason", "reasonCode"] {
            let f = format!(
                r#"{{"type":"message","class":"ConnectionClosedEvent","code":200,"body":{{"{field}":"signedIn"}}}}"#
            );
            assert_eq!(
                decode(&f).unwrap(),
                Frame::ConnectionClosed {
                    reason: Some("signedIn".into())
                }
            );
        }
        assert_eq!(
            decode(r#"{"type":"response","class":"TooManyRequestsErrorMessage","code":429,"body":{"retryAfter":3,"errorCode":4029,"errorMessage":"Message rate too high for this session"}}"#).unwrap(),
            Frame::TooManyRequests { retry_after: 3, tracing_id: None }
        );
        assert_eq!(
            decode(r#"{"type":"response","class":"string","code":409,"body":"Session is read-only, no new messages allowed","tracingId":"t"}"#).unwrap(),
            Frame::Error { code: code::READ_ONLY, text: "Session is read-only, no new messages allowed".into(), tracing_id: Some("t".into()) }
        );
        for c in [
            code::SESSION_EXPIRED,
            code::SESSION_NOT_FOUND,
            code::MESSAGE_TOO_LONG,
            5000,
        ] {
            let f = format!(r#"{{"type":"response","class":"string","code":{c},"body":"x"}}"#);
            assert!(matches!(decode(&f).unwrap(), Frame::Error { code, .. } if code == c));
        }
        assert_eq!(
            decode(r#"{"type":"message","class":"UploadSuccessEvent","code":200,"body":{"attachmentId":"a"}}"#).unwrap(),
            Frame::Unknown("UploadSuccessEvent".into())
        );
        assert!(decode("not json").is_err());
        assert!(decode(r#"{"type":"message","code":200}"#).is_err());
    }

    #[test]
    fn history_pages_decode() {
        let page = r#"{"entities":[{"id":"5befde6373a23f32f20b59b4e1cba0e6","channel":{"time":"2014-04-30T21:09:51.411Z"},"type":"Text","text":"hi","content":[],"direction":"Outbound","originatingEntity":"Bot"},{"id":"46e7","channel":{"time":null},"type":"Event","events":[{"eventType":"Presence","presence":{"type":"Join"}}],"direction":"Inbound","originatingEntity":"Human"}],"pageSize":25,"pageNumber":1,"total":3,"pageCount":1}"#;
        let p: HistoryPage = serde_json::from_str(page).unwrap();
        assert_eq!((p.entities.len(), p.page_size, p.total), (2, 25, 3));
        assert_eq!(p.entities[0].key(), "5befde6373a23f32f20b59b4e1cba0e6");
    }

    /// A `JwtResponse` holds a bearer: no `{:?}` of the frame (a log line, a test failure) may
    /// show it.
    #[test]
    fn a_jwt_frame_never_formats_its_jwt() {
        let f = decode(r#"{"type":"response","class":"JwtResponse","code":200,"body":{"jwt":"eyJhbGciOi.hidden-bearer.sig","exp":1623675564}}"#).unwrap();
        let dbg = format!("{f:?} {f:#?}");
        assert!(!dbg.contains("hidden-bearer"), "{dbg}");
        assert!(dbg.contains("Jwt"), "{dbg}");
    }
}
