//! Conformance of the emulator's Web Messaging side with Genesys's own client, the Messenger
//! Transport SDK 2.14.0 (Kotlin, github.com/MyPureCloud/genesys-messenger-transport-mobile-sdk,
//! tag 2.14.0). The SDK cannot run here (no JVM), so this test is written from its sources:
//!
//! - [`sdk`] mirrors the SDK's receive models field by field (`transport/src/commonMain/kotlin/
//!   com/genesys/cloud/messenger/transport/shyrka/receive/*.kt`, cited per type): a Kotlin field
//!   without a default is required here, a nullable one is an `Option`, a defaulted one is
//!   `#[serde(default)]` (kotlinx, like serde, refuses `null` for it), enums only take the SDK's
//!   values, and unknown keys are ignored (`WebMessagingJson.kt`: `ignoreUnknownKeys = true`).
//!   [`sdk::decode`] is `WebMessagingJson.decodeFromString`: a frame whose `class` the SDK does
//!   not know is an error, and so is every frame the SDK would fail to decode.
//! - [`req`] writes the SDK's requests byte for byte as kotlinx encodes them
//!   (`shyrka/send/*.kt`; `encodeDefaults` off, so defaulted fields are left out unless
//!   `@Required`), and the SDK's own test fixtures where they exist
//!   (`transport/src/androidUnitTest/kotlin/transport/util/Request.kt`).
//! - [`walk`] plays the SDK's flow (`core/MessagingClientImpl.kt`): config.json, connect,
//!   configure, autostart, send and echo, typing, health check, getJwt and history
//!   (`network/WebMessagingApi.kt`), disconnect and reconnect, the agent's read-only end,
//!   startNewChat (closeSession, then configure with `startNew`), clear; every frame the
//!   emulator sends on the way is decoded with the SDK's models.

mod common;

use common::*;
use futures::{SinkExt, StreamExt};
use guestd::emulator::messaging::{DisconnectMode, WebMessagingConfig};
use guestd::emulator::{Emulator, EmulatorConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The SDK's receive models. Decoding into them is the check: a field not read here still
/// has to be present, of its type, or absent where the SDK allows it.
#[allow(dead_code)]
mod sdk {
    use serde::Deserialize;
    use std::collections::HashMap;

    /// `shyrka/receive/PreIdentifiedWebMessagingMessage.kt` and `WebMessagingMessage.kt`.
    #[derive(Debug, Deserialize)]
    pub struct Envelope {
        #[serde(rename = "type")]
        pub kind: String,
        pub code: i32,
        #[serde(rename = "class")]
        pub class: String,
        #[serde(rename = "tracingId")]
        pub tracing_id: Option<String>,
    }

    /// `shyrka/receive/SessionResponse.kt`.
    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct SessionResponse {
        pub connected: bool,
        #[serde(default)]
        pub new_session: bool,
        #[serde(default)]
        pub read_only: bool,
        #[serde(default = "unset")]
        pub max_custom_data_bytes: i32,
        pub allowed_media: Option<AllowedMedia>,
        #[serde(default)]
        pub blocked_extensions: Vec<String>,
        #[serde(default)]
        pub cleared_existing_session: bool,
        pub duration_seconds: Option<i64>,
        pub expiration_date: Option<i64>,
    }

    fn unset() -> i32 {
        // MAX_CUSTOM_DATA_BYTES_UNSET in the SDK.
        -1
    }

    #[derive(Debug, Deserialize)]
    pub struct AllowedMedia {
        pub inbound: Option<Inbound>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Inbound {
        #[serde(default)]
        pub file_types: Vec<FileType>,
        pub max_file_size_k_b: Option<i64>,
    }

    #[derive(Debug, Deserialize)]
    pub struct FileType {
        #[serde(rename = "type")]
        pub kind: String,
    }

    /// `shyrka/receive/StructuredMessage.kt`.
    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct StructuredMessage {
        pub id: String,
        #[serde(rename = "type")]
        pub kind: MessageKind,
        pub text: Option<String>,
        pub direction: String,
        pub channel: Option<Channel>,
        #[serde(default)]
        pub content: Vec<serde_json::Value>,
        #[serde(default)]
        pub metadata: HashMap<String, String>,
        #[serde(default)]
        pub events: Vec<serde_json::Value>,
        pub originating_entity: Option<String>,
        pub originating_message_id: Option<String>,
    }

    #[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy)]
    pub enum MessageKind {
        Text,
        Event,
        Structured,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Channel {
        pub time: Option<String>,
        pub message_id: Option<String>,
        #[serde(rename = "type")]
        pub kind: Option<String>,
        pub to: Option<Participant>,
        pub from: Option<Participant>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Participant {
        pub first_name: Option<String>,
        pub last_name: Option<String>,
        pub nickname: Option<String>,
        pub image: Option<String>,
    }

    /// `shyrka/receive/StructuredMessageEvent.kt`: by `eventType`; any other is `Unknown`.
    #[derive(Debug)]
    pub enum StructuredEvent {
        Typing(TypingEvent),
        Presence(PresenceEvent),
        Unknown,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct TypingEvent {
        pub event_type: EventType,
        pub typing: Typing,
    }

    #[derive(Debug, Deserialize)]
    pub struct Typing {
        #[serde(rename = "type")]
        pub kind: String,
        pub duration: Option<i64>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct PresenceEvent {
        pub event_type: EventType,
        pub presence: Presence,
    }

    #[derive(Debug, Deserialize)]
    pub struct Presence {
        #[serde(rename = "type")]
        pub kind: PresenceType,
    }

    #[derive(Debug, Deserialize, PartialEq, Eq)]
    pub enum EventType {
        Typing,
        Error,
        Presence,
    }

    #[derive(Debug, Deserialize, PartialEq, Eq)]
    pub enum PresenceType {
        Disconnect,
        Join,
        Clear,
        SignIn,
    }

    impl StructuredMessage {
        /// The events as the SDK's polymorphic serializer reads them.
        pub fn structured_events(&self) -> Result<Vec<StructuredEvent>, String> {
            self.events
                .iter()
                .map(|e| match e.get("eventType").and_then(|t| t.as_str()) {
                    Some("Typing") => serde_json::from_value(e.clone())
                        .map(StructuredEvent::Typing)
                        .map_err(|x| format!("TypingEvent: {x}: {e}")),
                    Some("Presence") => serde_json::from_value(e.clone())
                        .map(StructuredEvent::Presence)
                        .map_err(|x| format!("PresenceEvent: {x}: {e}")),
                    _ => Ok(StructuredEvent::Unknown),
                })
                .collect()
        }
    }

    /// `shyrka/receive/JwtResponse.kt`.
    #[derive(Debug, Deserialize)]
    pub struct JwtResponse {
        #[serde(default)]
        pub jwt: String,
        #[serde(default)]
        pub exp: i64,
    }

    /// `shyrka/receive/TooManyRequestsErrorMessage.kt`.
    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct TooManyRequests {
        pub retry_after: i32,
        pub error_code: i32,
        pub error_message: String,
    }

    /// `shyrka/receive/ConnectionClosedEvent.kt`.
    #[derive(Debug, Deserialize)]
    pub struct ConnectionClosed {
        pub reason: Option<String>,
    }

    /// `SessionExpiredEvent.kt`, `SessionClearedEvent.kt`, `LogoutEvent.kt`: empty classes, whose
    /// body must still be an object (kotlinx refuses `[]`, which a serde derive would take).
    fn empty(s: &str) -> Result<(), String> {
        let v: serde_json::Value = serde_json::from_str(s).map_err(|e| e.to_string())?;
        if v.get("body").is_some_and(serde_json::Value::is_object) {
            Ok(())
        } else {
            Err(format!("an empty class's body must be an object: {s}"))
        }
    }

    /// `shyrka/receive/StructuredMessage.kt` (`MessageEntityList`): a history page.
    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct MessageEntityList {
        #[serde(default)]
        pub entities: Vec<StructuredMessage>,
        pub page_size: i32,
        pub page_number: i32,
        pub total: i32,
        pub page_count: i32,
    }

    /// A decoded frame: `WebMessagingJson.decodeFromString`, for the classes the emulator may
    /// send (attachments are out of its scope: their classes are refused here too).
    #[derive(Debug)]
    #[allow(clippy::large_enum_variant)] // a test's frames, one at a time
    pub enum Body {
        Text(String),
        Session(SessionResponse),
        Structured(StructuredMessage),
        Jwt(JwtResponse),
        Expired,
        TooMany(TooManyRequests),
        Closed(ConnectionClosed),
        Logout,
        Cleared,
    }

    #[derive(Deserialize)]
    struct Typed<T> {
        body: T,
    }

    fn body<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
        serde_json::from_str::<Typed<T>>(s)
            .map(|t| t.body)
            .map_err(|e| format!("{e}: {s}"))
    }

    /// Decode a frame as the SDK does; Err where the SDK would throw.
    pub fn decode(s: &str) -> Result<(Envelope, Body), String> {
        let env: Envelope = serde_json::from_str(s).map_err(|e| format!("{e}: {s}"))?;
        if !["message", "response"].contains(&env.kind.as_str()) {
            // `MessageType.kt`: the two kinds the SDK knows.
            return Err(format!("type {:?}: {s}", env.kind));
        }
        let b = match env.class.as_str() {
            "string" => Body::Text(body(s)?),
            "SessionResponse" => Body::Session(body(s)?),
            "StructuredMessage" => {
                let m: StructuredMessage = body(s)?;
                if !["Inbound", "Outbound"].contains(&m.direction.as_str()) {
                    return Err(format!("direction {:?}: {s}", m.direction));
                }
                m.structured_events()?;
                Body::Structured(m)
            }
            "JwtResponse" => Body::Jwt(body(s)?),
            "SessionExpiredEvent" => empty(s).map(|_| Body::Expired)?,
            "TooManyRequestsErrorMessage" => Body::TooMany(body(s)?),
            "ConnectionClosedEvent" => Body::Closed(body(s)?),
            "LogoutEvent" => empty(s).map(|_| Body::Logout)?,
            "SessionClearedEvent" => empty(s).map(|_| Body::Cleared)?,
            other => return Err(format!("class {other:?} the SDK does not know: {s}")),
        };
        Ok((env, b))
    }

    /// `shyrka/receive/DeploymentConfig.kt`.
    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct DeploymentConfig {
        pub id: String,
        pub version: String,
        pub languages: Vec<String>,
        pub default_language: String,
        pub api_endpoint: String,
        pub messenger: Messenger,
        pub journey_events: Enabled,
        pub status: Status,
        pub auth: Auth,
    }

    #[derive(Debug, Deserialize, PartialEq, Eq)]
    pub enum Status {
        Active,
        Inactive,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Messenger {
        pub enabled: bool,
        pub apps: Apps,
        pub styles: Styles,
        pub launcher_button: LauncherButton,
        pub file_upload: FileUpload,
    }

    #[derive(Debug, Deserialize)]
    pub struct Apps {
        pub conversations: Conversations,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Conversations {
        pub messaging_endpoint: String,
        #[serde(default)]
        pub show_agent_typing_indicator: bool,
        #[serde(default)]
        pub show_user_typing_indicator: bool,
        #[serde(default)]
        pub auto_start: OptEnabled,
        #[serde(default)]
        pub conversation_disconnect: ConversationDisconnect,
        #[serde(default)]
        pub conversation_clear: OptEnabled,
        #[serde(default)]
        pub notifications: Notifications,
        #[serde(default)]
        pub markdown: OptEnabled,
        #[serde(default)]
        pub humanize: OptEnabled,
    }

    #[derive(Debug, Deserialize, Default)]
    pub struct OptEnabled {
        #[serde(default)]
        pub enabled: bool,
    }

    #[derive(Debug, Deserialize)]
    pub struct Enabled {
        pub enabled: bool,
    }

    #[derive(Debug, Deserialize, Default)]
    pub struct ConversationDisconnect {
        #[serde(default)]
        pub enabled: bool,
        #[serde(default, rename = "type")]
        pub kind: DisconnectType,
    }

    #[derive(Debug, Deserialize, Default, PartialEq, Eq)]
    pub enum DisconnectType {
        ReadOnly,
        #[default]
        Send,
    }

    #[derive(Debug, Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct Notifications {
        #[serde(default)]
        pub enabled: bool,
        #[serde(default)]
        pub notification_content_type: ContentType,
    }

    #[derive(Debug, Deserialize, Default)]
    pub enum ContentType {
        IncludeMessagesContent,
        #[default]
        ExcludeMessagesContent,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Styles {
        pub primary_color: String,
    }

    #[derive(Debug, Deserialize)]
    pub struct LauncherButton {
        pub visibility: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct FileUpload {
        pub enable_attachments: Option<bool>,
        #[serde(default)]
        pub modes: Vec<Mode>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Mode {
        #[serde(default)]
        pub file_types: Vec<String>,
        pub max_file_size_k_b: i64,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Auth {
        pub enabled: bool,
        #[serde(default)]
        pub allow_session_upgrade: bool,
    }
}

/// The SDK's requests, as kotlinx writes them (field order: constructor, then body; defaulted
/// fields left out unless `@Required`).
mod req {
    /// `shyrka/send/EchoRequest.kt`: the health check's fixed tracingId.
    pub const HEALTH_CHECK_ID: &str = "SGVhbHRoQ2hlY2tNZXNzYWdlSWQ=";

    /// `Request.configureRequest` (the SDK's fixture) with this token and deployment;
    /// `ConfigureSessionRequest.kt`. The fixture has no tracingId (the SDK's tests match
    /// requests by `contains`); a running SDK writes one (kotlinx compares the value with a
    /// fresh evaluation of its default, a new random UUID). The emulator must take both.
    pub fn configure_fixture(token: &str, deployment: &str, start_new: bool) -> String {
        format!(
            r#"{{"token":"{token}","deploymentId":"{deployment}","startNew":{start_new},"journeyContext":{{"customer":{{"id":"{token}","idType":"cookie"}},"customerSession":{{"id":"","type":"web"}}}},"action":"configureSession"}}"#
        )
    }

    /// `ConfigureSessionRequest.kt` as a running SDK writes it (a random tracingId differs from
    /// its default expression, so it is written).
    pub fn configure(token: &str, deployment: &str, start_new: bool, tid: &str) -> String {
        format!(
            r#"{{"token":"{token}","deploymentId":"{deployment}","startNew":{start_new},"journeyContext":{{"customer":{{"id":"{token}","idType":"cookie"}},"customerSession":{{"id":"","type":"web"}}}},"tracingId":"{tid}","action":"configureSession"}}"#
        )
    }

    /// `AutoStartRequest.kt`: a Presence Join with the custom attributes in the message's
    /// channel (the field order of `Request.autostart`, the SDK's fixture, plus the tracingId
    /// a running SDK writes).
    pub fn autostart(token: &str, tid: &str) -> String {
        format!(
            r#"{{"token":"{token}","tracingId":"{tid}","action":"onMessage","message":{{"events":[{{"eventType":"Presence","presence":{{"type":"Join"}}}}],"channel":{{"metadata":{{"customAttributes":{{"A":"B"}}}}}},"type":"Event"}}}}"#
        )
    }

    /// `OnMessageRequest.kt` + `TextMessage.kt` (no metadata, no content, no channel).
    pub fn text(token: &str, text: &str, tid: &str) -> String {
        format!(
            r#"{{"token":"{token}","message":{{"text":"{text}","type":"Text"}},"tracingId":"{tid}","action":"onMessage"}}"#
        )
    }

    /// `TextMessage.kt` with custom attributes (`Channel.kt`).
    pub fn text_with_attributes(token: &str, text: &str, tid: &str) -> String {
        format!(
            r#"{{"token":"{token}","message":{{"text":"{text}","channel":{{"metadata":{{"customAttributes":{{"plan":"gold"}}}}}},"type":"Text"}},"tracingId":"{tid}","action":"onMessage"}}"#
        )
    }

    /// `UserTypingRequest.kt`.
    pub fn typing(token: &str, tid: &str) -> String {
        format!(
            r#"{{"token":"{token}","tracingId":"{tid}","action":"onMessage","message":{{"events":[{{"eventType":"Typing","typing":{{"type":"On"}}}}],"type":"Event"}}}}"#
        )
    }

    /// `EchoRequest.kt`: the health check.
    pub fn echo(token: &str) -> String {
        format!(
            r#"{{"token":"{token}","tracingId":"{HEALTH_CHECK_ID}","action":"echo","message":{{"text":"ping","type":"Text"}}}}"#
        )
    }

    /// `JwtRequest.kt`.
    pub fn get_jwt(token: &str, tid: &str) -> String {
        format!(r#"{{"token":"{token}","tracingId":"{tid}","action":"getJwt"}}"#)
    }

    /// `CloseSessionRequest.kt` (startNewChat).
    pub fn close_session(token: &str, tid: &str) -> String {
        format!(
            r#"{{"token":"{token}","closeAllConnections":true,"tracingId":"{tid}","action":"closeSession"}}"#
        )
    }

    /// `ClearConversationRequest.kt`.
    pub fn clear(token: &str, tid: &str) -> String {
        format!(
            r#"{{"token":"{token}","tracingId":"{tid}","action":"onMessage","message":{{"events":[{{"eventType":"Presence","presence":{{"type":"Clear"}}}}],"type":"Event"}}}}"#
        )
    }
}

const DEPLOYMENT: &str = "sdk-deployment";

/// The SDK's socket: `Urls.webSocketUrl` (`/v1?deploymentId=&application=`) with the headers
/// androidMain `network/PlatformSocket.kt` adds (Origin = the URL's host, User-Agent).
struct SdkSocket {
    ws: Ws,
    /// Every frame read, decoded (the walk's transcript).
    seen: Vec<String>,
}

impl SdkSocket {
    async fn open(emu: &Emulator, deployment: &str) -> Result<SdkSocket, u16> {
        let url = format!(
            "ws://{}/v1?deploymentId={deployment}&application=TransportSDK-2.14.0",
            emu.addr()
        );
        let mut r = url.into_client_request().unwrap();
        r.headers_mut()
            .insert("Origin", emu.addr().ip().to_string().parse().unwrap());
        r.headers_mut()
            .insert("User-Agent", "Android 14".parse().unwrap());
        match tokio_tungstenite::connect_async(r).await {
            Ok((ws, _)) => Ok(SdkSocket {
                ws,
                seen: Vec::new(),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("{e}"),
        }
    }

    async fn send(&mut self, text: String) {
        self.ws.send(Message::Text(text.into())).await.unwrap();
    }

    /// The next frame, decoded with the SDK's models (a frame the SDK cannot decode fails the
    /// test); None when the server closed the socket.
    async fn next(&mut self) -> Option<(sdk::Envelope, sdk::Body)> {
        loop {
            let m = tokio::time::timeout(wait(), self.ws.next())
                .await
                .expect("no frame in time");
            match m {
                Some(Ok(Message::Text(t))) => {
                    self.seen.push(t.to_string());
                    return Some(sdk::decode(&t).unwrap_or_else(|e| panic!("the SDK fails: {e}")));
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    }

    /// Read until a frame `pick` accepts; every frame on the way is decoded too.
    async fn until<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&sdk::Envelope, sdk::Body) -> Option<T>,
    ) -> T {
        loop {
            let Some((env, body)) = self.next().await else {
                panic!("closed before {what}; read {:?}", self.seen);
            };
            let refusal = match &body {
                sdk::Body::Text(t) => Some(format!("{} {t}", env.code)),
                sdk::Body::TooMany(t) => Some(format!("429 {t:?}")),
                _ => None,
            };
            if let Some(t) = pick(&env, body) {
                return t;
            }
            // An error frame the step did not ask for: a request the SDK makes was refused.
            if let Some(r) = refusal {
                panic!(
                    "waiting for {what}: an error frame {r}; read {:?}",
                    self.seen
                );
            }
        }
    }

    async fn session(&mut self, what: &str) -> sdk::SessionResponse {
        self.until(what, |_, b| match b {
            sdk::Body::Session(s) => Some(s),
            _ => None,
        })
        .await
    }

    /// The next `StructuredMessage` of type Event (typing, presence).
    async fn event(&mut self, what: &str) -> sdk::StructuredMessage {
        self.until(what, |_, b| match b {
            sdk::Body::Structured(m) if m.kind == sdk::MessageKind::Event => Some(m),
            _ => None,
        })
        .await
    }

    /// The echo of the send with `tid` (`MessageStore` matches it by tracingId).
    async fn echo_of(&mut self, tid: &str) -> sdk::StructuredMessage {
        self.until(tid, |env, b| match b {
            sdk::Body::Structured(m) if env.tracing_id.as_deref() == Some(tid) => Some(m),
            _ => None,
        })
        .await
    }

    /// The next `string` error frame: its code and text.
    async fn error(&mut self, what: &str) -> (i32, String) {
        self.until(what, |env, b| match b {
            sdk::Body::Text(t) => Some((env.code, t)),
            _ => None,
        })
        .await
    }
}

async fn sdk_emulator() -> Emulator {
    emulator(EmulatorConfig {
        web_messaging: WebMessagingConfig {
            conversation_disconnect: DisconnectMode::ReadOnly,
            auto_start: true,
            // The walk is about shapes; the rate has its own tests.
            messages_per_second: 100,
            deployments: vec![DEPLOYMENT.to_string()],
            ..WebMessagingConfig::default()
        },
        ..EmulatorConfig::default()
    })
    .await
}

/// The SDK's whole flow against the emulator, every frame decoded with the SDK's models.
#[tokio::test]
async fn the_transport_sdks_flow_walks_against_the_emulator() {
    let emu = sdk_emulator().await;
    let http = reqwest::Client::new();
    let token = uuid::Uuid::new_v4().to_string();

    // fetchDeploymentConfig(): `Urls.deploymentConfigUrl`, no headers.
    let resp = http
        .get(config_json_url(&emu, DEPLOYMENT))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let config: sdk::DeploymentConfig =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("DeploymentConfig: {e}: {text}"));
    assert_eq!(config.id, DEPLOYMENT);
    assert_eq!(config.status, sdk::Status::Active);
    assert!(config.messenger.apps.conversations.auto_start.enabled);
    assert_eq!(
        config
            .messenger
            .apps
            .conversations
            .conversation_disconnect
            .kind,
        sdk::DisconnectType::ReadOnly
    );
    assert!(
        config
            .messenger
            .apps
            .conversations
            .conversation_clear
            .enabled
    );

    // connect(): the socket, then configureSession on open (the fixture's exact bytes).
    let mut a = SdkSocket::open(&emu, DEPLOYMENT).await.unwrap();
    a.send(req::configure_fixture(&token, DEPLOYMENT, false))
        .await;
    let s = a.session("the first SessionResponse").await;
    assert!(s.connected && s.new_session && !s.read_only, "{s:?}");
    assert_eq!(s.max_custom_data_bytes, 2048, "{s:?}");

    // A new session with autoStart on: the SDK sends its Presence Join; then a text, one with
    // custom attributes, typing (answered by nothing), and the health check.
    a.send(req::autostart(&token, "t-0")).await;
    let join = a.echo_of("t-0").await;
    assert_eq!(join.kind, sdk::MessageKind::Event);
    assert!(matches!(
        join.structured_events().unwrap()[..],
        [sdk::StructuredEvent::Presence(ref p)] if p.presence.kind == sdk::PresenceType::Join
    ));
    a.send(req::text(&token, "hello", "t-1")).await;
    let echo = a.echo_of("t-1").await;
    assert_eq!(echo.kind, sdk::MessageKind::Text);
    assert_eq!(echo.text.as_deref(), Some("hello"));
    assert_eq!(echo.direction, "Inbound");
    a.send(req::text_with_attributes(&token, "with attributes", "t-2"))
        .await;
    let echo = a.echo_of("t-2").await;
    assert_eq!(echo.text.as_deref(), Some("with attributes"));
    a.send(req::typing(&token, "t-3")).await;
    a.send(req::echo(&token)).await;
    let (env, health) = a
        .until("the health check", |env, b| match b {
            sdk::Body::Structured(m) if env.tracing_id.as_deref() == Some(req::HEALTH_CHECK_ID) => {
                Some((env.kind.clone(), m))
            }
            sdk::Body::Text(t) => panic!("an error frame: {t}"),
            _ => None,
        })
        .await;
    assert_eq!(env, "response");
    assert_eq!(health.text.as_deref(), Some("ping"));
    // `SessionDurationHandler` reads these two as numbers written as strings.
    for k in ["durationSeconds", "expirationDate"] {
        assert!(
            health
                .metadata
                .get(k)
                .is_some_and(|v| v.parse::<i64>().is_ok()),
            "{k}: {health:?}"
        );
    }

    // The agent types, then writes: Outbound, the agent's name in `channel.from.nickname`.
    wm_admin_ok(&emu, &token, serde_json::json!({"action": "agent_typing"})).await;
    let typing = a.event("the agent's typing").await;
    assert_eq!(typing.direction, "Outbound");
    assert!(matches!(
        typing.structured_events().unwrap()[..],
        [sdk::StructuredEvent::Typing(ref t)] if t.typing.kind == "On"
    ));
    wm_admin_ok(
        &emu,
        &token,
        serde_json::json!({"action": "agent_text", "text": "how can I help?"}),
    )
    .await;
    let agent = a
        .until("the agent's message", |_, b| match b {
            sdk::Body::Structured(m)
                if m.direction == "Outbound" && m.kind == sdk::MessageKind::Text =>
            {
                Some(m)
            }
            _ => None,
        })
        .await;
    assert_eq!(agent.originating_entity.as_deref(), Some("Human"));
    let from = agent.channel.as_ref().and_then(|c| c.from.as_ref());
    assert!(
        from.and_then(|f| f.nickname.as_deref()).is_some(),
        "{agent:?}"
    );

    // History: getJwt on the socket, then `WebMessagingApi.getMessages` (lowercase bearer,
    // Origin, pageNumber and pageSize 25).
    a.send(req::get_jwt(&token, "t-4")).await;
    let jwt = a
        .until("the JwtResponse", |env, b| match b {
            sdk::Body::Jwt(j) if env.tracing_id.as_deref() == Some("t-4") => Some(j),
            _ => None,
        })
        .await;
    assert!(!jwt.jwt.is_empty() && jwt.exp > 1_700_000_000, "{jwt:?}");
    let page = http
        .get(format!("{}/api/v2/webmessaging/messages", emu.base_url()))
        .header("Authorization", format!("bearer {}", jwt.jwt))
        .header("Origin", "localhost")
        .query(&[("pageNumber", "1"), ("pageSize", "25")])
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let text = page.text().await.unwrap();
    let page: sdk::MessageEntityList =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("MessageEntityList: {e}: {text}"));
    assert_eq!((page.page_number, page.page_size), (1, 25));
    let texts: Vec<&str> = page
        .entities
        .iter()
        .filter_map(|m| m.text.as_deref())
        .collect();
    for want in ["hello", "with attributes", "how can I help?"] {
        assert!(texts.contains(&want), "{want} in {texts:?}");
    }
    for m in &page.entities {
        assert!(
            ["Inbound", "Outbound"].contains(&m.direction.as_str()),
            "{m:?}"
        );
        m.structured_events().unwrap();
    }

    // disconnect(): close 1000 "The user has closed the connection.", then connect() again:
    // the same session, not a new one.
    a.ws.close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: 1000.into(),
        reason: "The user has closed the connection.".into(),
    }))
    .await
    .unwrap();
    let mut a = SdkSocket::open(&emu, DEPLOYMENT).await.unwrap();
    a.send(req::configure(&token, DEPLOYMENT, false, "t-5"))
        .await;
    let s = a.session("the reconnect's SessionResponse").await;
    assert!(s.connected && !s.new_session && !s.read_only, "{s:?}");

    // A second device on the same token (closeSession will close it).
    let mut b = SdkSocket::open(&emu, DEPLOYMENT).await.unwrap();
    b.send(req::configure(&token, DEPLOYMENT, false, "t-6"))
        .await;
    b.session("the second device's SessionResponse").await;

    // The agent ends the conversation, read-only: a Presence Disconnect with
    // `metadata.readOnly` "true" (`handleAsEvent(metadata["readOnly"].toBoolean())`); a send
    // then fails (the SDK's `onMessageError`).
    wm_admin_ok(&emu, &token, serde_json::json!({"action": "disconnect"})).await;
    let end = a.event("the Presence Disconnect").await;
    assert_eq!(
        end.metadata.get("readOnly").map(String::as_str),
        Some("true")
    );
    assert!(matches!(
        end.structured_events().unwrap()[..],
        [sdk::StructuredEvent::Presence(ref p)] if p.presence.kind == sdk::PresenceType::Disconnect
    ));
    a.send(req::text(&token, "still there?", "t-7")).await;
    let (code, _) = a.error("the read-only refusal").await;
    assert_eq!(code, 409);

    // startNewChat(): closeSession, whose answer the SDK needs read-only and not connected
    // (`handleSessionResponse`); the other device hears ConnectionClosedEvent; then
    // configureSession with startNew, a new session.
    a.send(req::close_session(&token, "t-8")).await;
    let s = a.session("closeSession's SessionResponse").await;
    assert!(s.read_only && !s.connected, "{s:?}");
    let closed = b
        .until("the other device's ConnectionClosedEvent", |_, b| match b {
            sdk::Body::Closed(c) => Some(c),
            _ => None,
        })
        .await;
    assert_eq!(closed.reason, None);
    a.send(req::configure(&token, DEPLOYMENT, true, "t-9"))
        .await;
    let s = a.session("startNew's SessionResponse").await;
    assert!(s.connected && s.new_session && !s.read_only, "{s:?}");

    // clearConversation(): SessionClearedEvent, then ConnectionClosedEvent, then the close.
    a.send(req::clear(&token, "t-10")).await;
    a.until("SessionClearedEvent", |_, b| {
        matches!(b, sdk::Body::Cleared).then_some(())
    })
    .await;
    a.until("the ConnectionClosedEvent after a clear", |_, b| {
        matches!(b, sdk::Body::Closed(_)).then_some(())
    })
    .await;
    assert!(a.next().await.is_none(), "the socket closes after a clear");
}

/// The error frames the SDK must read: each decoded with its model, with the codes
/// `ErrorCode.mapFrom` knows (4007, 4011, 4013, 4020, 4029 in a 429). A fresh session per case:
/// the rate (one a second here) is per session.
#[tokio::test]
async fn error_frames_decode_with_the_sdks_models() {
    let emu = emulator(EmulatorConfig {
        web_messaging: WebMessagingConfig {
            messages_per_second: 1,
            deployments: vec![DEPLOYMENT.to_string()],
            ..WebMessagingConfig::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let fresh = || async {
        let token = uuid::Uuid::new_v4().to_string();
        let mut a = SdkSocket::open(&emu, DEPLOYMENT).await.unwrap();
        a.send(req::configure(&token, DEPLOYMENT, false, "cfg"))
            .await;
        a.session("configured").await;
        (a, token)
    };
    // Before configureSession: session not found.
    let mut a = SdkSocket::open(&emu, DEPLOYMENT).await.unwrap();
    a.send(req::text("not-configured", "early", "e-1")).await;
    assert_eq!(a.error("4007").await.0, 4007);
    // A configureSession without its deploymentId: 4020.
    a.send(
        r#"{"token":"t","startNew":false,"tracingId":"e-2","action":"configureSession"}"#
            .to_string(),
    )
    .await;
    assert_eq!(a.error("4020").await.0, 4020);
    // Too long: 4011.
    let (mut a, token) = fresh().await;
    a.send(req::text(&token, &"x".repeat(4097), "e-3")).await;
    assert_eq!(a.error("4011").await.0, 4011);
    // Over the rate: TooManyRequestsErrorMessage with 4029 (the SDK's fixture `tooManyRequests`).
    let (mut a, token) = fresh().await;
    a.send(req::text(&token, "one", "e-4")).await;
    a.send(req::text(&token, "two", "e-5")).await;
    let many = a
        .until("the 429", |env, b| match b {
            sdk::Body::TooMany(t) => Some((env.code, t)),
            _ => None,
        })
        .await;
    assert_eq!((many.0, many.1.error_code), (429, 4029), "{many:?}");
    assert!(many.1.retry_after >= 1);
    // Custom attributes over maxCustomDataBytes: 4013.
    let (mut a, token) = fresh().await;
    let big = "v".repeat(3000);
    a.send(format!(
        r#"{{"token":"{token}","message":{{"text":"big","channel":{{"metadata":{{"customAttributes":{{"k":"{big}"}}}}}},"type":"Text"}},"tracingId":"e-6","action":"onMessage"}}"#
    ))
    .await;
    assert_eq!(a.error("4013").await.0, 4013);
    // Expiry: SessionExpiredEvent (an empty object body).
    wm_admin_ok(&emu, &token, serde_json::json!({"action": "expire"})).await;
    a.until("SessionExpiredEvent", |_, b| {
        matches!(b, sdk::Body::Expired).then_some(())
    })
    .await;
}

/// Issue 25: the emulator knows its deployments. An unknown deploymentId is refused: 403 on the
/// socket upgrade (the SDK's WebsocketAccessDenied), 404 on config.json, and a 403 frame on a
/// configureSession that names it; a known one is served. With no list, every id is served.
#[tokio::test]
async fn an_unknown_deployment_is_refused_as_the_sdk_expects() {
    let emu = sdk_emulator().await;
    assert_eq!(SdkSocket::open(&emu, "nope").await.err(), Some(403));
    let config = |d: &str| config_json_url(&emu, d);
    assert_eq!(reqwest::get(config("nope")).await.unwrap().status(), 404);
    assert_eq!(
        reqwest::get(config(DEPLOYMENT)).await.unwrap().status(),
        200
    );
    let mut a = SdkSocket::open(&emu, DEPLOYMENT).await.unwrap();
    let token = uuid::Uuid::new_v4().to_string();
    a.send(req::configure(&token, "nope", false, "u-1")).await;
    let (code, text) = a.error("the configure refusal").await;
    assert_eq!(code, 403, "{text}");
    assert!(
        text.contains("deploymentId"),
        "the text names what is wrong: {text}"
    );
    // The same socket then configures its own deployment.
    a.send(req::configure(&token, DEPLOYMENT, false, "u-2"))
        .await;
    assert!(a.session("configured").await.connected);

    // No list: any id.
    let open = emulator(EmulatorConfig::default()).await;
    let mut b = SdkSocket::open(&open, "anything").await.unwrap();
    b.send(req::configure(&token, "anything", false, "u-3"))
        .await;
    assert!(b.session("configured").await.connected);
    config_json(&open, "anything").await;
}
