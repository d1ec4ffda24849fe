//! The sample consumer (examples/consumer.rs) on a real guestd's events: from stdout, with a
//! restart's repeats, and from a real JetStream stream holding an `ended` twice (as a failover
//! during a key rotation leaves it: two message ids, one `event_id`).

mod common;

#[allow(dead_code)]
#[path = "../examples/consumer.rs"]
mod consumer;

use common::nats::NatsServer;
use common::*;
use guestd::emulator::EmulatorConfig;
use serde_json::Value;
use std::time::Duration;

/// Two chats through a real guestd: one an agent ends after two messages, one a flow ends.
/// Returns every event line guestd wrote, and the two conversation ids.
async fn two_chats() -> (Vec<String>, String, String) {
    let emu = emulator(EmulatorConfig {
        heartbeat_interval: Duration::from_millis(200),
        agent_join_delay: None,
        agent_alert_duration: Duration::from_millis(20),
        ..EmulatorConfig::default()
    })
    .await;
    let mut d = Daemon::spawn(fast_env(&emu), &[]);
    let (s1, c1) = d.start("r1").await;
    let (s2, c2) = d.start("r2").await;
    d.wait_type(&s1, "connected").await;
    emu.agent_join(&c1).unwrap();
    d.wait_type(&s1, "agent_connected").await;
    for body in ["hello", "anything else?"] {
        emu.agent_send(&c1, body).unwrap();
        d.wait(|v| v["session"] == s1.as_str() && v["type"] == "message" && v["body"] == body)
            .await;
    }
    emu.agent_end(&c1).unwrap();
    d.wait_type(&s1, "ended").await;
    emu.flow_disconnect(&c2).unwrap();
    d.wait_type(&s2, "ended").await;
    let d = finish_ok(d).await;
    let lines = d.seen.iter().map(Value::to_string).collect();
    (lines, c1, c2)
}

fn check(lines: &[String], ends: &[consumer::Chat], ledger: &consumer::Ledger, c1: &str, c2: &str) {
    // Distinct messages guestd wrote for each chat (the agent's two, and whatever the
    // emulator's platform posts around them).
    let distinct = |conv: &str| {
        lines
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| v["conversation_id"] == conv && v["type"] == "message")
            .filter_map(|v| v["message_id"].as_str().map(String::from))
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    assert!(distinct(c1) >= 2);
    assert_eq!(ends.len(), 2, "one record per chat: {ends:#?}");
    let one = ends.iter().find(|c| c.conversation_id == c1).unwrap();
    let two = ends.iter().find(|c| c.conversation_id == c2).unwrap();
    assert_eq!(one.reason.as_deref(), Some("agent_ended"));
    assert_eq!(one.messages, distinct(c1), "each message once");
    assert_eq!(two.reason.as_deref(), Some("flow_ended"));
    assert_eq!(two.messages, distinct(c2));
    assert_eq!(ledger.open().count(), 0);
}

/// stdout, then a restart that writes the last events again (docs/events.md, "Delivery").
#[tokio::test]
async fn from_stdout_with_a_restarts_repeats_one_record_per_chat() {
    let (lines, c1, c2) = two_chats().await;
    let mut ledger = consumer::Ledger::default();
    let half = lines.len() / 2;
    let ends: Vec<consumer::Chat> = lines
        .iter()
        .chain(lines[half..].iter())
        .filter_map(|l| ledger.apply(l))
        .collect();
    check(&lines, &ends, &ledger, &c1, &c2);
    assert!(ledger.duplicates >= 2, "the repeated ends were dropped");
}

/// The JetStream stream, read with the example's durable consumer: every line published as
/// guestd publishes it, each `ended` twice under two message ids; under a `cluster.prefix` of
/// its own (`--prefix`).
#[tokio::test]
async fn from_the_jetstream_stream_with_an_end_stored_twice_one_record_per_chat() {
    let (lines, c1, c2) = two_chats().await;
    let server = NatsServer::start("", &[]).await;
    let url = format!("nats://127.0.0.1:{}", server.port);
    let client = async_nats::connect(url.clone()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "ACME_EVENTS".into(),
        subjects: vec!["ACME.events.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut published = 0;
    for (i, line) in lines.iter().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap();
        let conv = v["conversation_id"].as_str().unwrap_or("none").to_string();
        let copies = if v["type"] == "ended" { 2 } else { 1 };
        for copy in 0..copies {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("node-{copy}:{i}").as_str());
            js.publish_with_headers(format!("ACME.events.{conv}"), headers, line.clone().into())
                .await
                .unwrap()
                .await
                .unwrap();
            published += 1;
        }
    }
    assert_eq!(published, lines.len() + 2);
    let mut ledger = consumer::Ledger::default();
    // Everything is in the stream before the reader starts: it stops once idle that long
    // (scaled, so a slow machine's pauses between deliveries do not end it early).
    let idle = scaled(Duration::from_secs(2)).as_secs().max(2).to_string();
    let args: Vec<String> = [
        "--until-idle",
        idle.as_str(),
        "--durable",
        "test-consumer",
        "--prefix",
        "ACME",
    ]
    .map(String::from)
    .into();
    consumer::from_nats_into(&args, &url, &mut ledger, |_| {})
        .await
        .unwrap();
    let ends: Vec<consumer::Chat> = ledger
        .chats()
        .filter(|c| c.reason.is_some())
        .cloned()
        .collect();
    check(&lines, &ends, &ledger, &c1, &c2);
    assert_eq!(ledger.duplicates, 2, "both second copies dropped");
    // Durable: everything was acknowledged, a second run reads nothing new.
    let mut again = consumer::Ledger::default();
    consumer::from_nats_into(&args, &url, &mut again, |_| {})
        .await
        .unwrap();
    assert_eq!(again.chats().count(), 0);
}
