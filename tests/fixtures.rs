//! Issue 29: fixtures the emulator did not write. Text Genesys and its users published (a
//! websocket frame captured on the developer forum, a create reply from Genesys's developer blog,
//! an error body from Genesys's SDK README; tests/fixtures/genesys/README.md cites each) is
//! decoded by guestd's own decoder and checked field by field against values written here by
//! hand; then the emulator produces the same event over its real REST API and websocket, and its
//! JSON must have the fixture's shape: the same keys, the same JSON types, the same nesting.
//! Before, the emulator built its frames with the structs guestd decodes, and no frame from the
//! platform was a fixture: a field both sides misnamed the same way would pass.

mod common;

use common::*;
use guestd::backends::guest_chat::api::{ChatEvent, MemberState};
use guestd::backends::guest_chat::protocol::{self as p, StreamEvent};
use serde_json::{Value, json};

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/genesys/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The structure of a JSON value: keys, JSON types and nesting, without the values (an array
/// by the shape of its first element).
fn shape(v: &Value) -> Value {
    match v {
        Value::Null => json!("null"),
        Value::Bool(_) => json!("boolean"),
        Value::Number(_) => json!("number"),
        Value::String(_) => json!("string"),
        Value::Array(a) => json!(["array", a.first().map(shape).unwrap_or(json!("empty"))]),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
    }
}

/// The paths where two shapes differ, for a readable failure.
fn differences(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = format!("{path}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(a), Some(b)) => differences(&p, a, b, out),
                    (Some(_), None) => out.push(format!("{p}: only in the fixture")),
                    (None, Some(_)) => out.push(format!("{p}: only in the emulator's")),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == 2 && y.len() == 2 && x[0] == y[0] => {
            differences(&format!("{path}[0]"), &x[1], &y[1], out)
        }
        (a, b) if a != b => out.push(format!("{path}: fixture {a}, emulator {b}")),
        _ => {}
    }
}

fn assert_same_shape(what: &str, fixture: &Value, emulator: &Value) {
    let mut diff = Vec::new();
    differences("$", &shape(fixture), &shape(emulator), &mut diff);
    assert!(
        diff.is_empty(),
        "{what}: the emulator's JSON differs in shape from the published one:\n{}\nfixture: {fixture:#}\nemulator: {emulator:#}",
        diff.join("\n")
    );
}

/// The forum's member-change frame, decoded by guestd: every field as published.
#[test]
fn a_published_member_change_frame_decodes_field_by_field() {
    let text = fixture("member_change.forum-7575.json");
    let StreamEvent::MemberChange(c) = p::decode_frame(&text).expect("decodes") else {
        panic!("not a member change")
    };
    assert_eq!(c.conversation.id, "6a8e057a-d340-4d9f-aabb-66ed9ffc2d8b");
    assert_eq!(c.member.id, "1c5f7bbc-7d06-4b14-b0fc-3dca8b7010f9");
    assert_eq!(c.member.state, p::MemberState::Connected);
    assert_eq!(c.timestamp, "2020-04-20T09:36:45.355Z");
    let env: p::Envelope = serde_json::from_str(&text).expect("an envelope");
    assert_eq!(
        env.topic_name,
        "v2.conversations.chats.6a8e057a-d340-4d9f-aabb-66ed9ffc2d8b.members"
    );
    assert_eq!(env.version.as_deref(), Some("2"));
    assert_eq!(
        env.metadata,
        Some(
            json!({"CorrelationId": "3079a590-8f0a-47dd-ac4b-13e5fc7ade39", "type": "member-change"})
        )
    );
    // What a session sees of it.
    assert_eq!(
        guestd::backends::guest_chat::client::chat_event(&text).expect("an event"),
        ChatEvent::MemberChange {
            member_id: "1c5f7bbc-7d06-4b14-b0fc-3dca8b7010f9".into(),
            state: MemberState::Connected,
        }
    );
}

/// The blog's create reply, with the one brace the post lost put back, decoded by guestd.
#[test]
fn a_published_create_reply_decodes_field_by_field() {
    let text = fixture("create_conversation_reply.devcenter-blog-2019.txt");
    assert!(
        serde_json::from_str::<Value>(&text).is_err(),
        "as published, the outer object is not closed"
    );
    let repaired = format!("{}}}", text.trim_end());
    let r: p::CreateChatResponse = serde_json::from_str(&repaired).expect("decodes");
    assert_eq!(r.id, "c4c2e5a6-f01e-48ed-960a-68d48c3e0d05");
    assert_eq!(r.jwt, "eyJhbGciOi...");
    assert_eq!(
        r.event_stream_uri,
        "wss://carrierpigeon.mypurecloud.com/v1/token/eyJhbGciOi[...]"
    );
    assert_eq!(r.member.id, "8dd184ac-c481-4d67-bb33-bd6976b1b5f0");
}

/// The SDK README's 404 body, decoded by guestd.
#[test]
fn a_published_error_body_decodes_field_by_field() {
    let text = fixture("error_404.guest-sdk-readme.json");
    let e: p::ErrorBody = serde_json::from_str(&text).expect("decodes");
    assert_eq!(e.status, 404);
    assert_eq!(e.code, "not.found");
    assert_eq!(e.message, "The requested operation failed with status 404");
    assert_eq!(
        e.context_id.as_deref(),
        Some("d11bd3b3-ab7e-4fd4-9687-d04af9f30a63")
    );
    assert!(e.details.is_empty() && e.errors.is_empty());
}

/// The emulator serves each of the three with the published shape: its create reply, its
/// member-change frame for an agent who connects (read off its websocket), its 404 body.
#[tokio::test]
async fn the_emulator_serves_the_published_shapes() {
    let emu = emulator(quick()).await;
    let http = reqwest::Client::new();
    // The create reply, raw.
    let reply: Value = http
        .post(format!(
            "{}/api/v2/webchat/guest/conversations",
            emu.base_url()
        ))
        .json(&json!({
            "organizationId": "org", "deploymentId": "dep",
            "routingTarget": {"targetType": "QUEUE", "targetAddress": "Support"},
            "memberInfo": {"displayName": "Ann"}
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let published = format!(
        "{}}}",
        fixture("create_conversation_reply.devcenter-blog-2019.txt").trim_end()
    );
    let published: Value = serde_json::from_str(&published).unwrap();
    assert_same_shape("create reply", &published, &reply);
    // A member-change frame: the agent connects.
    let guest = Guest {
        http: http.clone(),
        base: emu.base_url(),
        id: reply["id"].as_str().unwrap().into(),
        jwt: reply["jwt"].as_str().unwrap().into(),
        member: reply["member"]["id"].as_str().unwrap().into(),
        uri: reply["eventStreamUri"].as_str().unwrap().into(),
    };
    let mut ws = guest.connect().await;
    emu.agent_join(&guest.id).unwrap();
    let agent = emu
        .conversation(&guest.id)
        .and_then(|c| c.agent_member_id)
        .expect("an agent named at once by the join");
    let frame = wait_event(&mut ws, |v| is_member_change(v, &agent, "CONNECTED")).await;
    let published: Value = serde_json::from_str(&fixture("member_change.forum-7575.json")).unwrap();
    assert_same_shape("member-change frame", &published, &frame);
    // Field by field where the values must agree too: the topic's form, the type.
    assert_eq!(
        frame["topicName"],
        format!("v2.conversations.chats.{}.members", guest.id)
    );
    assert_eq!(frame["version"], published["version"]);
    assert_eq!(frame["metadata"]["type"], published["metadata"]["type"]);
    // A 404 body: a message that does not exist.
    let r = http
        .get(guest.url("/messages/no-such-message"))
        .bearer_auth(&guest.jwt)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    let published: Value =
        serde_json::from_str(&fixture("error_404.guest-sdk-readme.json")).unwrap();
    assert_same_shape("404 body", &published, &body);
    assert_eq!(body["code"], published["code"]);
    assert_eq!(body["status"], published["status"]);
    emu.shutdown();
}

/// The forum's Platform API answer for a guest chat the guest ended: its customer participant,
/// decoded by guestd, and read with the conversation's `endTime` from the same answer, is
/// `guest_left` by the platform's own account (`disconnectType: "client"`).
#[test]
fn a_published_platform_answer_decodes_and_reads_guest_left() {
    use guestd::platform::api::{Conversation, ConversationParticipant, platform_reason};
    let text = fixture("platform_customer_participant.forum-15561.json");
    let p: ConversationParticipant = serde_json::from_str(&text).expect("decodes");
    assert_eq!(p.purpose, "customer");
    assert_eq!(p.chats.len(), 1);
    assert_eq!(p.chats[0].state, "disconnected");
    assert_eq!(p.chats[0].disconnect_type.as_deref(), Some("client"));
    assert_eq!(
        p.chats[0].disconnected_time.as_deref(),
        Some("2022-07-18T12:08:27.437Z")
    );
    assert_eq!(p.disconnect_type(), Some("client"));
    let c = Conversation {
        // The answer's own endTime, from the same post.
        end_time: Some("2022-07-18T12:08:27.440Z".into()),
        participants: vec![p],
    };
    assert_eq!(
        platform_reason(&c),
        Ok(guestd::events::EndReason::GuestLeft)
    );
}

/// A participant's `attributes` is a free map of strings: its keys are the chat's, not a shape.
fn without_free_maps(mut v: Value) -> Value {
    if let Some(a) = v.get_mut("attributes") {
        let all_strings = a
            .as_object()
            .is_some_and(|o| o.values().all(Value::is_string));
        assert!(all_strings, "attributes is a map of strings: {a}");
        *a = json!({});
    }
    v
}

/// The emulator's Platform API view of a chat the guest left: its customer participant has the
/// published one's keys, types and nesting, and says `client` as the published one does.
#[tokio::test]
async fn the_emulator_serves_the_published_platform_answer_shape() {
    let emu = emulator(quick()).await;
    let guest = Guest::create(&emu).await;
    let mut ws = guest.connect().await;
    assert_eq!(guest.leave().await, 204);
    wait_event(&mut ws, |v| {
        is_member_change(v, &guest.member, "DISCONNECTED")
    })
    .await;
    let http = reqwest::Client::new();
    let token: Value = http
        .post(format!("{}/oauth/token", emu.base_url()))
        .basic_auth("emulator-client", Some("emulator-secret"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let view: Value = http
        .get(format!(
            "{}/api/v2/conversations/{}",
            emu.base_url(),
            guest.id
        ))
        .bearer_auth(token["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let customer = view["participants"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["purpose"] == "customer"))
        .cloned()
        .unwrap_or_else(|| panic!("no customer in {view:#}"));
    let published: Value =
        serde_json::from_str(&fixture("platform_customer_participant.forum-15561.json")).unwrap();
    assert_same_shape(
        "Platform API customer participant",
        &without_free_maps(published.clone()),
        &without_free_maps(customer.clone()),
    );
    assert_eq!(
        customer["chats"][0]["disconnectType"],
        published["chats"][0]["disconnectType"]
    );
    assert_eq!(
        customer["chats"][0]["provider"],
        published["chats"][0]["provider"]
    );
    assert!(view["endTime"].is_string(), "over: {view:#}");
    emu.shutdown();
}
