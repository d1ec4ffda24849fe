//! The Web Messaging server side (`../shared/protocol/genesys-web-messaging.md`, section 9), on
//! the emulator's own port: the guest websocket `/v1?deploymentId=`, the history call with
//! `getJwt` tokens, the deployment's `config.json`, and admin calls to script an agent or a bot.
//!
//! State per session token (not per socket): the conversation (if one is open), read-only, the
//! expiry (refreshed by every message), up to `max_connections` sockets (a new one evicts the
//! oldest with `ConnectionClosedEvent`, as the platform does), the history, the send rate.
//! Choices where the reference is unsure are knobs ([`WebMessagingConfig`]) and are listed in
//! docs/emulator.md.

use super::Shared;
use crate::backends::web_messaging::protocol::{self as p, MAX_TOKEN_CHARS};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// What a deployment does when an agent or flow ends a conversation (Conversation Disconnect).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisconnectMode {
    /// The setting is off (the platform's default): the guest gets no signal at all.
    Off,
    /// A Presence Disconnect; the guest may write again (a new conversation).
    Send,
    /// A Presence Disconnect with `metadata.readOnly: "true"`; sends get 409 from then on.
    ReadOnly,
}

/// The Web Messaging knobs (`[web_messaging]` in the emulator's config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebMessagingConfig {
    /// Conversation Disconnect: off, send or read_only.
    pub conversation_disconnect: DisconnectMode,
    /// Session lifetime after the last message (platform default 72 h; 15 min to 18 months).
    #[serde(with = "humantime_serde")]
    pub session_duration: Duration,
    /// `autoStart.enabled` in config.json.
    pub auto_start: bool,
    /// `conversationClear.enabled`: a guest's Presence Clear ends the session.
    pub clear_allowed: bool,
    /// Guest messages per second per session before a 429 frame. The reference gives 2 (Genesys
    /// notice, 2023) and 5 (limits page, 2026): [CONFLICT], 2 by default.
    pub messages_per_second: u32,
    /// Whether a guest's typing event (an `onMessage` of type Event) counts toward
    /// `messages_per_second`. [UNCERTAIN] No document says. The Messenger Transport SDK sends
    /// typing at most once per 5 s (`UserTypingProvider.kt`, TYPING_INDICATOR_COOL_DOWN_MILLISECONDS
    /// = 5000) as it spaces its health checks, which reads as a client saving the platform's rate
    /// for messages: counted by default.
    pub typing_counts_toward_rate: bool,
    /// Sockets per session token; one more evicts the oldest.
    pub max_connections: usize,
    /// Longest guest text, bytes (error 4011 beyond).
    pub max_text_bytes: usize,
    /// Lifetime of a `getJwt` token ([UNCERTAIN]: "1 minute" per one secondary source).
    #[serde(with = "humantime_serde")]
    pub jwt_lifetime: Duration,
    /// History calls per session per minute.
    pub history_per_minute: u32,
    /// The deployment ids this emulator serves; empty (the default): every id, as if each
    /// existed, so an integration's own id works out of the box. With a list, an unknown id is
    /// refused where the platform is known or believed to refuse it:
    /// - the socket upgrade `/v1?deploymentId=` answers HTTP 403 [INFERRED: the Transport SDK maps
    ///   an upgrade 403 to WebsocketAccessDenied (1002), whose corrective action reads "Check that
    ///   your deploymentId, feature toggles, and configuration are correct"; `ErrorCode.kt`,
    ///   androidMain `network/PlatformSocket.kt`];
    /// - `config.json` answers 404 [UNCERTAIN: the SDK fails any non-2xx alike,
    ///   DeploymentConfigFetchFailed (6007); a CDN's missing object is a guess];
    /// - a `configureSession` that names an unknown id answers a `string` 403 frame [UNCERTAIN:
    ///   the SDK handles a configure 403 as a fatal error; no capture shows the text].
    pub deployments: Vec<String>,
}

impl WebMessagingConfig {
    /// Whether `deployment` is one this emulator serves (see `deployments`).
    pub fn knows(&self, deployment: &str) -> bool {
        self.deployments.is_empty() || self.deployments.iter().any(|d| d == deployment)
    }
}

impl Default for WebMessagingConfig {
    fn default() -> Self {
        WebMessagingConfig {
            conversation_disconnect: DisconnectMode::ReadOnly,
            session_duration: Duration::from_secs(259_200),
            auto_start: false,
            clear_allowed: true,
            messages_per_second: 2,
            typing_counts_toward_rate: true,
            max_connections: 3,
            max_text_bytes: p::MAX_TEXT_BYTES,
            jwt_lifetime: Duration::from_secs(60),
            history_per_minute: 10,
            deployments: Vec::new(),
        }
    }
}

/// The custom attributes a message may carry, bytes (`maxCustomDataBytes` in SessionResponse).
pub const MAX_CUSTOM_DATA_BYTES: usize = 2048;

/// What a socket or a `configureSession` naming a deployment the emulator does not serve hears
/// ([UNCERTAIN] text: see `WebMessagingConfig::deployments`).
pub const UNKNOWN_DEPLOYMENT: &str =
    "Access was refused: no active deployment with this deploymentId";

/// The display name the emulated agent's messages carry (`channel.from.nickname`).
pub const AGENT_NICKNAME: &str = "Emulated Agent";

/// What the socket task is told to do.
#[derive(Debug)]
pub(crate) enum WmCmd {
    /// Write a frame.
    Text(String),
    /// Write `ConnectionClosedEvent` (with a reason), then close.
    Closed(Option<String>),
    /// Drop the TCP connection without a close frame.
    Drop,
    /// Stop (or start again) reading the socket: no pongs while stopped.
    Deaf(bool),
    /// Send websocket pings as fast as the socket takes them for this long, reading nothing
    /// meanwhile (a hostile server; logged as `wm_ping_flood` with the count when done).
    PingFlood(Duration),
}

struct Conn {
    id: u64,
    tx: mpsc::UnboundedSender<WmCmd>,
}

/// One guest session.
struct Session {
    conversation: Option<String>,
    read_only: bool,
    expires: Instant,
    conns: VecDeque<Conn>,
    history: Vec<Value>,
    sends: VecDeque<Instant>,
    history_calls: VecDeque<Instant>,
}

/// Every Web Messaging session the emulator holds.
#[derive(Default)]
pub(crate) struct WmWorld {
    sessions: HashMap<String, Session>,
    jwts: HashMap<String, (String, Instant)>,
    next_conn: u64,
}

/// A session as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WmSessionView {
    /// The session token's first 8 characters (the token is a secret).
    pub token_prefix: String,
    /// The open conversation.
    pub conversation_id: Option<String>,
    /// Read-only.
    pub read_only: bool,
    /// Sockets open.
    pub connections: usize,
    /// Messages in the history.
    pub messages: usize,
    /// Whether it has expired.
    pub expired: bool,
}

fn epoch_s(at: Instant) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let ahead = at.saturating_duration_since(Instant::now());
    (now + ahead).as_secs()
}

fn hex32() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn frame(kind: &str, class: &str, code: u16, body: Value, tracing_id: Option<&str>) -> String {
    let mut v = json!({"type": kind, "class": class, "code": code, "body": body});
    if let Some(t) = tracing_id {
        v["tracingId"] = json!(t);
    }
    v.to_string()
}

fn error(code: u16, text: &str, tracing_id: Option<&str>) -> String {
    frame("response", "string", code, json!(text), tracing_id)
}

impl Session {
    fn fan_out(&self, text: &str) {
        for c in &self.conns {
            let _ = c.tx.send(WmCmd::Text(text.to_string()));
        }
    }

    fn expired(&self) -> bool {
        Instant::now() >= self.expires
    }
}

impl WmWorld {
    /// `token`'s session, made (or made anew) per `configureSession`.
    fn configure(
        &mut self,
        cfg: &WebMessagingConfig,
        token: &str,
        start_new: bool,
        conn: u64,
        tx: &mpsc::UnboundedSender<WmCmd>,
    ) -> Value {
        let fresh = start_new || self.sessions.get(token).is_none_or(Session::expired);
        if fresh {
            // A fresh session keeps nothing of the old one; its sockets are the old session's.
            let old = self.sessions.remove(token);
            self.sessions.insert(
                token.to_string(),
                Session {
                    conversation: None,
                    read_only: false,
                    expires: Instant::now() + cfg.session_duration,
                    conns: old.map(|s| s.conns).unwrap_or_default(),
                    history: Vec::new(),
                    sends: VecDeque::new(),
                    history_calls: VecDeque::new(),
                },
            );
        }
        let Some(s) = self.sessions.get_mut(token) else {
            return json!({});
        };
        if !s.conns.iter().any(|c| c.id == conn) {
            s.conns.push_back(Conn {
                id: conn,
                tx: tx.clone(),
            });
            while s.conns.len() > cfg.max_connections.max(1) {
                if let Some(oldest) = s.conns.pop_front() {
                    let _ = oldest.tx.send(WmCmd::Closed(None));
                }
            }
        }
        json!({
            "connected": true,
            "newSession": fresh,
            "readOnly": s.read_only,
            "maxCustomDataBytes": MAX_CUSTOM_DATA_BYTES,
            "durationSeconds": cfg.session_duration.as_secs(),
            "expirationDate": epoch_s(s.expires),
        })
    }

    fn detach(&mut self, conn: u64) {
        for s in self.sessions.values_mut() {
            s.conns.retain(|c| c.id != conn);
        }
    }

    fn message(direction: &str, body: Value) -> Value {
        let mut m = body;
        m["direction"] = json!(direction);
        m["id"] = json!(hex32());
        m["channel"] = json!({
            "time": crate::events::now_rfc3339(),
            "messageId": uuid::Uuid::new_v4().to_string(),
        });
        m
    }
}

/// The shared state's Web Messaging part.
pub(crate) fn world(sh: &Shared) -> std::sync::MutexGuard<'_, WmWorld> {
    sh.wm.lock().unwrap_or_else(|e| e.into_inner())
}

/// One guest socket: read actions, answer, relay what the admin API scripts.
pub(crate) async fn serve<S>(sh: Arc<Shared>, ws: tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::unbounded_channel();
    let conn = {
        let mut w = world(&sh);
        w.next_conn += 1;
        w.next_conn
    };
    let (mut sink, mut stream) = ws.split();
    let mut token: Option<String> = None;
    let mut deaf = false;
    loop {
        tokio::select! {
            _ = sh.cancel.cancelled() => break,
            cmd = rx.recv() => match cmd {
                Some(WmCmd::Text(t)) => {
                    if sink.send(Message::Text(t.into())).await.is_err() { break; }
                }
                Some(WmCmd::Closed(reason)) => {
                    let body = match reason { Some(r) => json!({"reason": r}), None => json!({}) };
                    let _ = sink.send(Message::Text(frame("message", "ConnectionClosedEvent", 200, body, None).into())).await;
                    let _ = sink.close().await;
                    break;
                }
                Some(WmCmd::Drop) | None => break,
                Some(WmCmd::Deaf(d)) => deaf = d,
                Some(WmCmd::PingFlood(span)) => {
                    let until = Instant::now() + span;
                    let mut sent = 0u64;
                    let mut failed = false;
                    while Instant::now() < until {
                        if sink.feed(Message::Ping(bytes::Bytes::from_static(b"flood"))).await.is_err() {
                            failed = true;
                            break;
                        }
                        sent += 1;
                        if sent % 256 == 0 {
                            if sink.flush().await.is_err() {
                                failed = true;
                                break;
                            }
                            tokio::task::yield_now().await;
                        }
                    }
                    failed |= sink.flush().await.is_err();
                    sh.world().record(None, "wm_ping_flood", None, sent.to_string());
                    if failed {
                        break;
                    }
                }
            },
            msg = stream.next(), if !deaf => match msg {
                Some(Ok(Message::Text(t))) => {
                    let replies = act(&sh, conn, &tx, &mut token, &t);
                    for r in replies {
                        if sink.send(Message::Text(r.into())).await.is_err() { break; }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    world(&sh).detach(conn);
}

/// Answer one client frame; the frames for this socket (others get theirs through their tasks).
fn act(
    sh: &Shared,
    conn: u64,
    tx: &mpsc::UnboundedSender<WmCmd>,
    token: &mut Option<String>,
    text: &str,
) -> Vec<String> {
    let cfg = &sh.cfg.web_messaging;
    let Ok(req) = serde_json::from_str::<Value>(text) else {
        return vec![error(400, "Request failed.", None)];
    };
    let tid = req.get("tracingId").and_then(Value::as_str);
    let action = req.get("action").and_then(Value::as_str).unwrap_or("");
    let Some(tok) = req.get("token").and_then(Value::as_str) else {
        return vec![error(
            p::code::MISSING_PARAMETER,
            "Missing parameter: token",
            tid,
        )];
    };
    if tok.is_empty() || tok.chars().count() > MAX_TOKEN_CHARS {
        return vec![error(400, "Request failed.", tid)];
    }
    let mut w = world(sh);
    if action == "configureSession" {
        let deployment = req.get("deploymentId").and_then(Value::as_str);
        let Some(deployment) = deployment.filter(|d| !d.is_empty()) else {
            return vec![error(
                p::code::MISSING_PARAMETER,
                "Missing parameter: deploymentId",
                tid,
            )];
        };
        if !cfg.knows(deployment) {
            return vec![error(403, UNKNOWN_DEPLOYMENT, tid)];
        }
        let start_new = req
            .get("startNew")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        *token = Some(tok.to_string());
        let body = w.configure(cfg, tok, start_new, conn, tx);
        return vec![frame("response", "SessionResponse", 200, body, tid)];
    }
    if token.as_deref() != Some(tok) {
        return vec![error(p::code::SESSION_NOT_FOUND, "session not found", tid)];
    }
    let jwt_lifetime = cfg.jwt_lifetime;
    let Some(s) = w.sessions.get_mut(tok) else {
        return vec![error(p::code::SESSION_NOT_FOUND, "session not found", tid)];
    };
    if s.expired() && action != "closeSession" {
        return vec![frame(
            "response",
            "SessionExpiredEvent",
            200,
            json!({}),
            tid,
        )];
    }
    match action {
        "echo" => {
            let body = json!({
                "text": "ping", "type": "Text", "direction": "Inbound", "id": hex32(),
                "metadata": {
                    "durationSeconds": cfg.session_duration.as_secs().to_string(),
                    "expirationDate": epoch_s(s.expires).to_string(),
                },
            });
            vec![frame("response", "StructuredMessage", 200, body, tid)]
        }
        "getJwt" => {
            let jwt = format!("wm-{}", hex32());
            let exp = Instant::now() + jwt_lifetime;
            let reply = json!({"jwt": jwt, "exp": epoch_s(exp)});
            w.jwts.insert(jwt, (tok.to_string(), exp));
            vec![frame("response", "JwtResponse", 200, reply, tid)]
        }
        "closeSession" => {
            for c in s.conns.drain(..).filter(|c| c.id != conn) {
                let _ = c.tx.send(WmCmd::Closed(None));
            }
            let body = json!({"connected": false, "newSession": false, "readOnly": s.read_only});
            vec![frame("response", "SessionResponse", 200, body, tid)]
        }
        "onMessage" => {
            let message = req.get("message").cloned().unwrap_or(Value::Null);
            on_message(cfg, s, message, tid)
        }
        _ => vec![error(400, "Request failed.", tid)],
    }
}

fn on_message(
    cfg: &WebMessagingConfig,
    s: &mut Session,
    message: Value,
    tid: Option<&str>,
) -> Vec<String> {
    let now = Instant::now();
    let typing = message.get("type").and_then(Value::as_str) == Some("Event")
        && message.pointer("/events/0/eventType") == Some(&json!("Typing"));
    if typing && !cfg.typing_counts_toward_rate {
        return Vec::new();
    }
    while s
        .sends
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
    {
        s.sends.pop_front();
    }
    if s.sends.len() >= cfg.messages_per_second as usize {
        let body = json!({"retryAfter": 1, "errorCode": p::code::RATE, "errorMessage": "Message rate too high for this session"});
        return vec![frame(
            "response",
            "TooManyRequestsErrorMessage",
            429,
            body,
            tid,
        )];
    }
    s.sends.push_back(now);
    let kind = message.get("type").and_then(Value::as_str).unwrap_or("");
    let presence = message
        .pointer("/events/0/presence/type")
        .and_then(Value::as_str)
        .unwrap_or("");
    if kind == "Event" && message.pointer("/events/0/eventType") == Some(&json!("Typing")) {
        return Vec::new();
    }
    if presence == "Clear" {
        if !cfg.clear_allowed {
            return vec![error(
                403,
                "Presence events Conversation Clear are not supported",
                tid,
            )];
        }
        s.fan_out(&frame(
            "message",
            "SessionClearedEvent",
            200,
            json!({}),
            None,
        ));
        for c in s.conns.drain(..) {
            let _ = c.tx.send(WmCmd::Closed(None));
        }
        s.expires = now;
        s.conversation = None;
        return Vec::new();
    }
    if s.read_only {
        return vec![error(
            p::code::READ_ONLY,
            "Session is read-only, no new messages allowed",
            tid,
        )];
    }
    // Custom attributes over the advertised maxCustomDataBytes are refused with 4013 (the
    // reference's text). [UNCERTAIN] How the platform counts them is not published: here, the
    // bytes of their JSON as the guest sent it.
    if let Some(attrs) = message.pointer("/channel/metadata/customAttributes") {
        let size = attrs.to_string().len();
        if size > MAX_CUSTOM_DATA_BYTES {
            return vec![error(
                p::code::CUSTOM_ATTRIBUTES_TOO_LARGE,
                &format!(
                    "Custom Attributes in channel metadata is larger than {MAX_CUSTOM_DATA_BYTES} bytes"
                ),
                tid,
            )];
        }
    }
    if let Some(t) = message.get("text").and_then(Value::as_str) {
        if t.len() > cfg.max_text_bytes {
            let text = format!(
                "Message length {} is larger than {}",
                t.len(),
                cfg.max_text_bytes
            );
            return vec![error(p::code::MESSAGE_TOO_LONG, &text, tid)];
        }
    }
    if s.conversation.is_none() {
        s.conversation = Some(uuid::Uuid::new_v4().to_string());
    }
    s.expires = now + cfg.session_duration;
    let mut echo = WmWorld::message("Inbound", message);
    echo["originatingEntity"] = json!("Human");
    s.history.push(echo.clone());
    s.fan_out(&frame("message", "StructuredMessage", 200, echo, tid));
    Vec::new()
}

/// What the admin API can make happen to a session.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum WmAdmin {
    /// The agent (or a bot) writes.
    AgentText {
        /// The text.
        text: String,
    },
    /// The agent is typing.
    AgentTyping,
    /// The agent or flow ends the conversation (what the guest sees depends on the mode).
    Disconnect,
    /// The session expires now.
    Expire,
    /// Close every socket of the session (`signedIn`: the token is dead).
    Close {
        /// `signedIn`, or none (as when a 4th socket evicts the oldest).
        #[serde(default)]
        reason: Option<String>,
    },
    /// Drop every socket without a close frame.
    Drop,
    /// The platform loses the session: its sockets stay open, its next request gets 4007.
    Forget,
    /// The session turns read-only without a Disconnect frame (one lost on the way): the next
    /// send gets 409.
    SilentReadOnly,
    /// Stop answering (and reading) on every socket, or start again.
    Deaf {
        /// Stop (true) or resume (false).
        deaf: bool,
    },
    /// Flood every socket of the session with websocket pings for `ms` milliseconds, reading
    /// nothing meanwhile.
    PingFlood {
        /// How long.
        ms: u64,
    },
}

/// Apply an admin action to the session of `token`; false if there is none.
pub(crate) fn admin(sh: &Shared, token: &str, a: WmAdmin) -> bool {
    let mode = sh.cfg.web_messaging.conversation_disconnect;
    let mut w = world(sh);
    let Some(s) = w.sessions.get_mut(token) else {
        return false;
    };
    match a {
        WmAdmin::AgentText { text } => {
            let mut m = WmWorld::message(
                "Outbound",
                json!({"type": "Text", "text": text, "originatingEntity": "Human"}),
            );
            // As the platform sends an agent's message (the Messenger Transport SDK reads the
            // agent's display name from `channel.from.nickname`; issue 25).
            m["channel"]["type"] = json!("Private");
            m["channel"]["from"] = json!({"nickname": AGENT_NICKNAME});
            s.history.push(m.clone());
            s.expires = Instant::now() + sh.cfg.web_messaging.session_duration;
            s.fan_out(&frame("message", "StructuredMessage", 200, m, None));
        }
        WmAdmin::AgentTyping => {
            let m = WmWorld::message(
                "Outbound",
                json!({"type": "Event", "events": [{"eventType": "Typing", "typing": {"type": "On", "duration": 5000}}]}),
            );
            s.fan_out(&frame("message", "StructuredMessage", 200, m, None));
        }
        WmAdmin::Disconnect => {
            s.conversation = None;
            if mode != DisconnectMode::Off {
                let mut m = WmWorld::message(
                    "Outbound",
                    json!({"type": "Event", "events": [{"eventType": "Presence", "presence": {"type": "Disconnect"}}], "originatingEntity": "Bot"}),
                );
                if mode == DisconnectMode::ReadOnly {
                    m["metadata"] = json!({"readOnly": "true"});
                    s.read_only = true;
                }
                s.history.push(m.clone());
                s.fan_out(&frame("message", "StructuredMessage", 200, m, None));
            }
        }
        WmAdmin::Expire => {
            s.expires = Instant::now();
            s.conversation = None;
            s.fan_out(&frame(
                "response",
                "SessionExpiredEvent",
                200,
                json!({}),
                None,
            ));
        }
        WmAdmin::Close { reason } => {
            for c in s.conns.drain(..) {
                let _ = c.tx.send(WmCmd::Closed(reason.clone()));
            }
            if reason.as_deref() == Some("signedIn") {
                w.sessions.remove(token);
            }
        }
        WmAdmin::Drop => {
            for c in s.conns.drain(..) {
                let _ = c.tx.send(WmCmd::Drop);
            }
        }
        WmAdmin::Forget => {
            w.sessions.remove(token);
        }
        WmAdmin::SilentReadOnly => {
            s.read_only = true;
            s.conversation = None;
        }
        WmAdmin::Deaf { deaf } => {
            for c in &s.conns {
                let _ = c.tx.send(WmCmd::Deaf(deaf));
            }
        }
        WmAdmin::PingFlood { ms } => {
            for c in &s.conns {
                let _ = c.tx.send(WmCmd::PingFlood(Duration::from_millis(ms)));
            }
        }
    }
    true
}

/// The sessions, for the admin API.
pub(crate) fn sessions(sh: &Shared) -> Vec<WmSessionView> {
    let w = world(sh);
    let mut v: Vec<WmSessionView> = w
        .sessions
        .iter()
        .map(|(t, s)| WmSessionView {
            token_prefix: t.chars().take(8).collect(),
            conversation_id: s.conversation.clone(),
            read_only: s.read_only,
            connections: s.conns.len(),
            messages: s.history.len(),
            expired: s.expired(),
        })
        .collect();
    v.sort_by(|a, b| a.token_prefix.cmp(&b.token_prefix));
    v
}

/// Why a history call was refused.
pub(crate) enum HistoryRefusal {
    /// No such jwt, or expired.
    Unauthorized,
    /// Over the per-session rate.
    TooMany,
}

/// A history page for the bearer `jwt`: newest first ([UNCERTAIN] in the reference).
pub(crate) fn history(
    sh: &Shared,
    jwt: &str,
    page_number: usize,
    page_size: usize,
) -> Result<Value, HistoryRefusal> {
    let per_minute = sh.cfg.web_messaging.history_per_minute as usize;
    let mut w = world(sh);
    let token = match w.jwts.get(jwt) {
        Some((t, exp)) if *exp > Instant::now() => t.clone(),
        _ => return Err(HistoryRefusal::Unauthorized),
    };
    let s = w
        .sessions
        .get_mut(&token)
        .ok_or(HistoryRefusal::Unauthorized)?;
    let now = Instant::now();
    while s
        .history_calls
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
    {
        s.history_calls.pop_front();
    }
    if s.history_calls.len() >= per_minute {
        return Err(HistoryRefusal::TooMany);
    }
    s.history_calls.push_back(now);
    let size = page_size.clamp(1, 100);
    let page = page_number.max(1);
    let total = s.history.len();
    let entities: Vec<Value> = s
        .history
        .iter()
        .rev()
        .skip((page - 1) * size)
        .take(size)
        .cloned()
        .collect();
    Ok(json!({
        "entities": entities,
        "pageSize": size,
        "pageNumber": page,
        "total": total,
        "pageCount": total.div_ceil(size),
    }))
}

/// `config.json` of the deployment, from the knobs.
pub(crate) fn deployment_config(sh: &Shared, deployment: &str, ws_base: &str) -> Value {
    let c = &sh.cfg.web_messaging;
    let disconnect = match c.conversation_disconnect {
        DisconnectMode::Off => json!({"enabled": false}),
        DisconnectMode::Send => json!({"enabled": true, "type": "Send"}),
        DisconnectMode::ReadOnly => json!({"enabled": true, "type": "ReadOnly"}),
    };
    // The REST base the SDK calls (history, getJwt's peers): the websocket base's scheme made
    // http(s).
    let api = ws_base
        .strip_prefix("ws")
        .map(|rest| format!("http{rest}"))
        .unwrap_or_else(|| ws_base.to_string());
    // Every field the Messenger Transport SDK's DeploymentConfig requires (its
    // `shyrka/receive/DeploymentConfig.kt`: no default for these, so a config.json without them
    // fails its connect() with MissingDeploymentConfig); values where the emulator has no knob
    // are the platform's defaults for a plain deployment.
    json!({
        "id": deployment,
        "version": "1",
        "status": "Active",
        "languages": ["en-us"],
        "defaultLanguage": "en-us",
        "apiEndpoint": api,
        "journeyEvents": {"enabled": false},
        "auth": {"enabled": false, "allowSessionUpgrade": false},
        "messenger": {
            "enabled": true,
            "styles": {"primaryColor": "#ff4f1f"},
            "launcherButton": {"visibility": "On"},
            "fileUpload": {"enableAttachments": false, "modes": []},
            "apps": {"conversations": {
                "messagingEndpoint": ws_base,
                "autoStart": {"enabled": c.auto_start},
                "conversationDisconnect": disconnect,
                "conversationClear": {"enabled": c.clear_allowed},
                "sessionDurationSeconds": c.session_duration.as_secs(),
                "showUserTypingIndicator": true,
                "showAgentTypingIndicator": true,
            }},
        },
    })
}
