//! The emulator's Web Messaging side over real sockets, read back with guestd's own decoder
//! (`webmessaging::protocol`): sessions by token, echoes matched by tracingId, the read-only
//! flow, rate and length limits, the three-sockets rule, expiry, clear, history with getJwt.

mod common;

use common::*;
use futures::{SinkExt, StreamExt};
use guestd::backends::web_messaging::protocol::{Action, Frame, HistoryPage, code, decode};
use guestd::emulator::messaging::{DisconnectMode, WebMessagingConfig};
use guestd::emulator::{Emulator, EmulatorConfig};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn emu_with(wm: WebMessagingConfig) -> Emulator {
    emulator(EmulatorConfig {
        web_messaging: wm,
        ..EmulatorConfig::default()
    })
    .await
}

struct Guest {
    ws: Ws,
    token: String,
}

impl Guest {
    async fn open(emu: &Emulator, token: &str) -> Guest {
        let url = format!("ws://{}/v1?deploymentId=dep-1", emu.addr());
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Guest {
            ws,
            token: token.to_string(),
        }
    }

    /// A guest on a fresh token, its session configured (a new one).
    async fn configured(emu: &Emulator) -> (Guest, String) {
        let token = format!("tok-{}", uuid::Uuid::new_v4());
        let mut g = Guest::open(emu, &token).await;
        g.configure(true).await;
        (g, token)
    }

    async fn send(&mut self, a: Action<'_>, tid: &str) {
        self.ws
            .send(Message::Text(a.encode(&self.token, tid).into()))
            .await
            .unwrap();
    }

    /// The next text frame's text.
    async fn next_text(&mut self) -> String {
        loop {
            let m = tokio::time::timeout(wait(), self.ws.next())
                .await
                .expect("no frame in time")
                .expect("socket closed")
                .unwrap();
            if let Message::Text(t) = m {
                return t.to_string();
            }
        }
    }

    /// The next text frame, as JSON.
    async fn next_raw(&mut self) -> Value {
        serde_json::from_str(&self.next_text().await).unwrap()
    }

    async fn next(&mut self) -> Frame {
        decode(&self.next_text().await).unwrap()
    }

    async fn configure(
        &mut self,
        start_new: bool,
    ) -> guestd::backends::web_messaging::protocol::SessionResponse {
        self.send(
            Action::ConfigureSession {
                deployment_id: "dep-1",
                start_new,
            },
            "cfg",
        )
        .await;
        match self.next().await {
            Frame::Session(s) => s,
            other => panic!("{other:?}"),
        }
    }
}

async fn admin(emu: &Emulator, token: &str, body: Value) -> u16 {
    wm_admin(emu, token, body).await
}

#[tokio::test]
async fn a_session_lives_by_its_token_and_echoes_every_send() {
    let emu = emu_with(WebMessagingConfig::default()).await;
    let token = uuid::Uuid::new_v4().to_string();
    let mut g = Guest::open(&emu, &token).await;
    let s = g.configure(false).await;
    assert!(s.connected && s.new_session && !s.read_only);
    assert!(s.expiration_date.unwrap() > 1_700_000_000 && s.duration_seconds == Some(259_200));
    g.send(Action::Text("hello"), "t-1").await;
    let Frame::Message {
        message,
        tracing_id,
        ..
    } = g.next().await
    else {
        panic!()
    };
    assert_eq!(
        (message.direction.as_str(), message.text.as_deref()),
        ("Inbound", Some("hello"))
    );
    assert_eq!(tracing_id.as_deref(), Some("t-1"));
    assert_eq!(
        admin(
            &emu,
            &token,
            json!({"action": "agent_text", "text": "hi, Ann"})
        )
        .await,
        200
    );
    let Frame::Message { message, .. } = g.next().await else {
        panic!()
    };
    assert_eq!(
        (message.direction.as_str(), message.text.as_deref()),
        ("Outbound", Some("hi, Ann"))
    );
    // A new socket with the same token resumes the session.
    drop(g);
    let mut g = Guest::open(&emu, &token).await;
    assert!(!g.configure(false).await.new_session);
    g.send(Action::Echo, "hc").await;
    let Frame::Message {
        message, response, ..
    } = g.next().await
    else {
        panic!()
    };
    assert!(response && message.expiration_date().is_some());
    // History, with a getJwt token: newest first.
    g.send(Action::GetJwt, "j").await;
    let Frame::Jwt { jwt, exp } = g.next().await else {
        panic!()
    };
    assert!(exp > 1_700_000_000);
    let http = reqwest::Client::new();
    let url = format!(
        "{}/api/v2/webmessaging/messages?pageNumber=&pageSize=",
        emu.base_url()
    );
    let page: HistoryPage = http
        .get(&url)
        .bearer_auth(jwt.expose())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let texts: Vec<_> = page
        .entities
        .iter()
        .map(|m| m.text.clone().unwrap_or_default())
        .collect();
    assert_eq!(texts, ["hi, Ann", "hello"]);
    // The scheme as the Messenger Transport SDK writes it, lowercase (RFC 7235: any case).
    let lower = http
        .get(&url)
        .header("Authorization", format!("bearer {}", jwt.expose()))
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status(), 200);
    assert_eq!(
        http.get(&url)
            .bearer_auth("wm-nope")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    // Unknown tokens on the admin API.
    assert_eq!(
        admin(&emu, "nobody", json!({"action": "expire"})).await,
        404
    );
}

#[tokio::test]
async fn a_read_only_disconnect_refuses_sends_until_a_new_session() {
    let emu = emu_with(WebMessagingConfig::default()).await;
    let token = uuid::Uuid::new_v4().to_string();
    let mut g = Guest::open(&emu, &token).await;
    g.configure(false).await;
    g.send(Action::Text("help"), "t").await;
    g.next().await;
    admin(&emu, &token, json!({"action": "disconnect"})).await;
    let Frame::Message { message, .. } = g.next().await else {
        panic!()
    };
    assert_eq!(message.disconnect(), Some(true));
    g.send(Action::Text("still there?"), "t-ro").await;
    assert_eq!(
        g.next().await,
        Frame::Error {
            code: code::READ_ONLY,
            text: "Session is read-only, no new messages allowed".into(),
            tracing_id: Some("t-ro".into())
        }
    );
    assert!(g.configure(false).await.read_only);
    g.send(Action::CloseSession, "close").await;
    let Frame::Session(s) = g.next().await else {
        panic!()
    };
    assert!(!s.connected);
    let s = g.configure(true).await;
    assert!(s.new_session && !s.read_only);
}

#[tokio::test]
async fn disconnect_modes_send_and_off() {
    for (mode, want) in [
        (DisconnectMode::Send, Some(false)),
        (DisconnectMode::Off, None),
    ] {
        let emu = emu_with(WebMessagingConfig {
            conversation_disconnect: mode,
            ..Default::default()
        })
        .await;
        let token = uuid::Uuid::new_v4().to_string();
        let mut g = Guest::open(&emu, &token).await;
        g.configure(false).await;
        admin(&emu, &token, json!({"action": "disconnect"})).await;
        admin(
            &emu,
            &token,
            json!({"action": "agent_text", "text": "after"}),
        )
        .await;
        let Frame::Message { message, .. } = g.next().await else {
            panic!()
        };
        assert_eq!(message.disconnect(), want, "{mode:?}");
        if want.is_none() {
            // Off: nothing reached the guest before the next message.
            assert_eq!(message.text.as_deref(), Some("after"));
        }
        let cfg = config_json(&emu, "dep-1").await;
        let d = &cfg["messenger"]["apps"]["conversations"]["conversationDisconnect"];
        assert_eq!(d["enabled"], mode != DisconnectMode::Off, "{cfg}");
    }
}

#[tokio::test]
async fn rate_and_length_limits_answer_in_band_and_keep_the_socket() {
    let emu = emu_with(WebMessagingConfig::default()).await;
    let token = uuid::Uuid::new_v4().to_string();
    let mut g = Guest::open(&emu, &token).await;
    g.configure(false).await;
    for i in 0..3 {
        g.send(Action::Text(&format!("m{i}")), &format!("t{i}"))
            .await;
    }
    let mut limited = 0;
    for _ in 0..3 {
        match g.next().await {
            Frame::TooManyRequests {
                retry_after,
                tracing_id,
            } => {
                assert_eq!((retry_after, tracing_id.as_deref()), (1, Some("t2")));
                limited += 1;
            }
            Frame::Message { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(limited, 1, "two per second pass, the third is refused");
    let long = "x".repeat(4097);
    // After the window: a text over 4096 bytes.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    g.send(Action::Text(&long), "long").await;
    assert!(matches!(
        g.next().await,
        Frame::Error {
            code: code::MESSAGE_TOO_LONG,
            ..
        }
    ));
    g.send(Action::Echo, "still-open").await;
    assert!(matches!(
        g.next().await,
        Frame::Message { response: true, .. }
    ));
}

#[tokio::test]
async fn a_fourth_socket_evicts_the_oldest_and_ends_are_signalled() {
    let emu = emu_with(WebMessagingConfig::default()).await;
    let token = uuid::Uuid::new_v4().to_string();
    let mut first = Guest::open(&emu, &token).await;
    first.configure(false).await;
    let mut others = Vec::new();
    for _ in 0..3 {
        let mut g = Guest::open(&emu, &token).await;
        g.configure(false).await;
        others.push(g);
    }
    assert_eq!(first.next().await, Frame::ConnectionClosed { reason: None });
    // Expiry reaches every socket.
    admin(&emu, &token, json!({"action": "expire"})).await;
    for g in others.iter_mut() {
        assert_eq!(g.next().await, Frame::SessionExpired);
    }
    others[0].send(Action::Echo, "late").await;
    assert_eq!(others[0].next().await, Frame::SessionExpired);
    // Signed in elsewhere: closed with the reason.
    let t2 = uuid::Uuid::new_v4().to_string();
    let mut g = Guest::open(&emu, &t2).await;
    g.configure(false).await;
    admin(&emu, &t2, json!({"action": "close", "reason": "signedIn"})).await;
    assert_eq!(
        g.next().await,
        Frame::ConnectionClosed {
            reason: Some("signedIn".into())
        }
    );
    // Clear: the session is wiped.
    let t3 = uuid::Uuid::new_v4().to_string();
    let mut g = Guest::open(&emu, &t3).await;
    g.configure(false).await;
    g.send(Action::Clear, "clear").await;
    assert_eq!(g.next().await, Frame::SessionCleared);
    assert_eq!(g.next().await, Frame::ConnectionClosed { reason: None });
}

/// Issue 25, item 3: an agent's message carries what the platform's does and Genesys's clients
/// read: `channel.type: "Private"` and the agent's display name in `channel.from.nickname`.
#[tokio::test]
async fn an_agents_message_names_its_sender_as_the_platform_does() {
    let emu = emu_with(WebMessagingConfig::default()).await;
    let (mut g, token) = Guest::configured(&emu).await;
    assert_eq!(
        admin(&emu, &token, json!({"action": "agent_text", "text": "hi"})).await,
        200
    );
    let v = g.next_raw().await;
    let channel = &v["body"]["channel"];
    assert_eq!(channel["type"], "Private", "{v}");
    assert_eq!(
        channel["from"]["nickname"],
        guestd::emulator::messaging::AGENT_NICKNAME,
        "{v}"
    );
    assert_eq!(v["body"]["originatingEntity"], "Human", "{v}");
}

/// Issue 25, item 4: custom attributes over the advertised `maxCustomDataBytes` are refused with
/// 4013, as the platform does; within it the message is echoed.
#[tokio::test]
async fn custom_attributes_over_the_limit_are_refused_with_4013() {
    let emu = emu_with(WebMessagingConfig::default()).await;
    let (mut g, token) = Guest::configured(&emu).await;
    let limit = guestd::emulator::messaging::MAX_CUSTOM_DATA_BYTES;
    let send = |value: String, tid: &str| {
        json!({"action": "onMessage", "token": token, "tracingId": tid, "message": {
            "type": "Text", "text": "hello",
            "channel": {"metadata": {"customAttributes": {"note": value}}}}})
        .to_string()
    };
    g.ws.send(Message::Text(send("x".repeat(limit), "big").into()))
        .await
        .unwrap();
    let v = g.next_raw().await;
    assert_eq!(v["code"], 4013, "{v}");
    assert_eq!(v["tracingId"], "big", "{v}");
    g.ws.send(Message::Text(send("small".into(), "ok").into()))
        .await
        .unwrap();
    let v = g.next_raw().await;
    assert_eq!(
        (v["code"].clone(), v["tracingId"].clone()),
        (json!(200), json!("ok")),
        "{v}"
    );
}

/// Issue 25, item 1: the deployment's config.json has every field the Messenger Transport SDK's
/// `DeploymentConfig` requires, with its types (MyPureCloud/genesys-messenger-transport-mobile-sdk,
/// `transport/src/commonMain/kotlin/com/genesys/cloud/messenger/transport/shyrka/receive/
/// DeploymentConfig.kt`: the fields without a default), so the SDK's connect() does not fail with
/// MissingDeploymentConfig (6006).
#[tokio::test]
async fn config_json_has_what_the_transport_sdk_requires() {
    let emu = emu_with(WebMessagingConfig::default()).await;
    let url = config_json_url(&emu, "dep-1");
    let v: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    let string = |p: &str| assert!(v.pointer(p).is_some_and(Value::is_string), "{p}: {v}");
    let boolean = |p: &str| assert!(v.pointer(p).is_some_and(Value::is_boolean), "{p}: {v}");
    // DeploymentConfig
    for p in ["/id", "/version", "/defaultLanguage", "/apiEndpoint"] {
        string(p);
    }
    assert!(
        v["languages"]
            .as_array()
            .is_some_and(|l| l.iter().all(Value::is_string)),
        "{v}"
    );
    assert!(
        ["Active", "Inactive"].contains(&v["status"].as_str().unwrap_or("")),
        "{v}"
    );
    boolean("/journeyEvents/enabled");
    boolean("/auth/enabled");
    // Messenger
    boolean("/messenger/enabled");
    string("/messenger/apps/conversations/messagingEndpoint");
    string("/messenger/styles/primaryColor");
    string("/messenger/launcherButton/visibility");
    assert!(
        v.pointer("/messenger/fileUpload")
            .is_some_and(Value::is_object),
        "{v}"
    );
    // The enum values the SDK knows.
    let disconnect = &v["messenger"]["apps"]["conversations"]["conversationDisconnect"];
    if let Some(t) = disconnect.get("type") {
        assert!(
            ["ReadOnly", "Send"].contains(&t.as_str().unwrap_or("")),
            "{v}"
        );
    }
    assert!(
        v["apiEndpoint"].as_str().unwrap().starts_with("http"),
        "{v}"
    );
}

/// Issue 25, item 5: whether typing spends the message rate is a knob (counted by default; see
/// `typing_counts_toward_rate`). With a limit of one a second, a typing event then a message:
/// the message hears 429 when typing counts, and is echoed when it does not.
#[tokio::test]
async fn typing_spends_the_message_rate_only_when_configured_to() {
    for counts in [true, false] {
        let emu = emu_with(WebMessagingConfig {
            messages_per_second: 1,
            typing_counts_toward_rate: counts,
            ..WebMessagingConfig::default()
        })
        .await;
        let (mut g, _) = Guest::configured(&emu).await;
        g.send(Action::TypingOn, "ty").await;
        g.send(Action::Text("hello"), "m1").await;
        let v = g.next_raw().await;
        let want = if counts { 429 } else { 200 };
        assert_eq!(v["code"], want, "typing counts: {counts}: {v}");
        assert_eq!(v["tracingId"], "m1", "{v}");
    }
}
