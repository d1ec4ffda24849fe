//! Reading one stream frame: [`decode_frame`], with the borrowed envelope it reads first and
//! the field lookups that spare a heartbeat any `Value` tree. Its own file because this is the
//! hot path every frame takes, held by its tests to the plain `Value` decoder's answers.

use super::*;
use serde::Deserialize;

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
