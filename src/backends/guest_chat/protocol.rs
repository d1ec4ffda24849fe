//! Wire types of the Genesys Cloud guest chat API (Web Chat v2), REST and websocket.
//!
//! Field names mirror the remote API through serde attributes; nothing here knows about guestd's
//! own event schema. Both the REST client and the emulator use these types, so a drift between
//! them shows up as a compile error rather than a silent mismatch.
//! See `../shared/protocol/genesys-guest-chat.md` for the reference this follows.
//!
//! Four files, one concept each, all re-exported here so every item keeps its
//! `protocol::` path: `chat` (the chat's own values, in REST replies and stream frames
//! alike: members' states and roles, messages, typing, member changes), `rest` (request and
//! reply bodies, queries, paths), `stream` (the websocket envelope, its topics and the
//! frames guestd and the emulator build), and `decode` (reading one frame into a
//! [`StreamEvent`] without building a `Value` tree).

mod chat;
mod decode;
mod rest;
mod stream;

pub use chat::{BodyType, IdRef, MemberChange, MemberRef, MemberState, Message, Role, Typing};
pub use decode::decode_frame;
pub use rest::{
    CONVERSATIONS, CreateChatRequest, CreateChatResponse, MAX_BODY_CHARS, Member, MemberInfo,
    MembersQuery, MessagesQuery, Page, RoutingTarget, SendMessageRequest, path, query_string,
};
pub use stream::{
    DecodeError, Envelope, HEARTBEAT_MESSAGE, PING_FRAME, PING_MESSAGE, PONG_MESSAGE, StreamEvent,
    TOPIC_METADATA, TOPIC_SOCKET_CLOSING, encode_envelope, heartbeat_frame, is_ping, members_topic,
    messages_topic, pong_frame,
};

/// Error body of every 4xx/5xx (shared by every Genesys Cloud API).
pub use crate::platform::rest::ErrorBody;

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
