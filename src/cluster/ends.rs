//! Remembered ends shared between nodes: the JetStream stream `<prefix>_ENDED`, one subject per
//! conversation, so any node answers `status` for a chat another node (or this one, before a
//! restart) reported ended.
//!
//! A stream and not a KV bucket: a bucket refuses writes once full (its discard policy is
//! `new`), where a memory should let its oldest go. The stream keeps one message per subject
//! (`max_messages_per_subject = 1`: an `end_confirmed` replaces the bare end), for
//! `status.remember_ended` (`max_age`), and at most `status.remember_max` messages, the oldest
//! discarded first.
//!
//! **Nothing in it is readable or forgeable without the cluster secret** (issue 28's promise):
//! - the subject is `<prefix>.ended.<32 hex>`, an HMAC of the conversation id under a key derived
//!   from the secret ([`Keyring::private_id`]): the stream does not even list which
//!   conversations ended;
//! - the message is the [`EndRecord`] sealed whole ([`Purpose::Ended`]), bound to the
//!   conversation id: a record cannot be moved to another conversation, and one that does not
//!   open is passed over as if absent.
//!
//! What a user allowed to publish on guestd's subjects could still do is hide a record (a later
//! message on the same subject replaces it; the answer then comes from the other sources, as
//! for a chat never seen): `config/nats-permissions.conf` keeps other users off `GUESTD.>`.
//!
//! Cost per chat: one publish when it ends and one more when the platform confirms it, each
//! about 700 bytes on the wire and at rest (measured in the unit test below: a sealed record
//! is its JSON plus 40 bytes, in base64), kept for the window.

use super::seal::{Keyring, Purpose};
use super::{ClusterError, Nats};
use crate::ends::{EndRecord, Remember};
use async_nats::jetstream;
use futures::future::BoxFuture;
use std::time::Duration;

/// Longest a publish or a read may take.
const CALL: Duration = Duration::from_secs(5);
/// Tries of one publish before it is given up (logged).
const PUBLISH_TRIES: u32 = 3;

/// The ended-chats stream. Cheap to clone.
#[derive(Clone)]
pub struct EndsStream {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    subject: String,
    keys: Keyring,
}

/// What a subject's HMAC is taken of: `ended:` + the conversation id (other HMACs under the same
/// key, events' ids, are of `<session>:ended`: no conversation id has a `:`).
fn id_input(conversation_id: &str) -> String {
    format!("ended:{conversation_id}")
}

/// The context a record is sealed with: its conversation.
fn context(conversation_id: &str) -> [&[u8]; 1] {
    [conversation_id.as_bytes()]
}

/// A record as it rests in the stream.
pub fn seal(rec: &EndRecord, keys: &Keyring) -> Vec<u8> {
    let plain = serde_json::to_vec(rec).unwrap_or_default();
    keys.seal(Purpose::Ended, &context(&rec.conversation_id), &plain)
        .into_bytes()
}

/// The record of `conversation_id` in `bytes`, if it opens with a key this node accepts and
/// names that conversation.
pub fn open(conversation_id: &str, bytes: &[u8], keys: &Keyring) -> Option<EndRecord> {
    let sealed = std::str::from_utf8(bytes).ok()?;
    let plain = keys
        .open(Purpose::Ended, &context(conversation_id), sealed)
        .ok()?;
    let rec: EndRecord = serde_json::from_slice(&plain).ok()?;
    (rec.conversation_id == conversation_id).then_some(rec)
}

impl EndsStream {
    /// Create (or update to `keep`) the stream and return it.
    pub async fn open(
        nats: &Nats,
        keys: Keyring,
        replicas: usize,
        keep: &Remember,
    ) -> Result<EndsStream, ClusterError> {
        let names = &nats.names;
        let config = jetstream::stream::Config {
            name: names.ended_stream.clone(),
            description: Some(
                "guestd: ends reported, for status; subjects and records sealed".into(),
            ),
            subjects: vec![format!("{}.*", names.ended)],
            max_age: keep.remember_ended,
            max_messages: keep.remember_max.max(1) as i64,
            max_messages_per_subject: 1,
            discard: jetstream::stream::DiscardPolicy::Old,
            // Not larger than max_age (the server refuses that); no publish is ever repeated
            // on purpose, a repeat only replaces the record with itself.
            duplicate_window: keep.remember_ended.min(Duration::from_secs(120)),
            num_replicas: replicas,
            ..Default::default()
        };
        let js = nats.js.clone();
        let stream = super::with_retry(&names.ended_stream, || {
            js.get_or_create_stream(config.clone())
        })
        .await?;
        // A changed window or bound applies to the stream made by an earlier start.
        if let Err(e) = js.update_stream(config.clone()).await {
            tracing::warn!(stream = %names.ended_stream, error = %e, "could not update the ended-chats stream to the configured window");
        }
        Ok(EndsStream {
            js,
            stream,
            subject: names.ended.clone(),
            keys,
        })
    }

    fn subject_for(&self, id: &str) -> String {
        format!("{}.{id}", self.subject)
    }
}

impl crate::ends::Replica for EndsStream {
    fn put(&self, rec: &EndRecord) {
        let subject = self.subject_for(&self.keys.private_id(&id_input(&rec.conversation_id)));
        let payload: bytes::Bytes = seal(rec, &self.keys).into();
        let js = self.js.clone();
        let session = rec.session.clone();
        // The bare end goes in only where the conversation has no record yet: its publish may be
        // retried and land after the confirmed record (published separately, a moment later),
        // which it must not replace. A repeat of the same end (a restart) finds its own record.
        let bare = rec.confirmation.is_none();
        tokio::spawn(async move {
            for attempt in 1..=PUBLISH_TRIES {
                let sent = async {
                    let ack = if bare {
                        let mut headers = async_nats::HeaderMap::new();
                        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
                        js.publish_with_headers(subject.clone(), headers, payload.clone())
                            .await
                    } else {
                        js.publish(subject.clone(), payload.clone()).await
                    };
                    match ack.map_err(|e| e.to_string())?.await {
                        Ok(_) => Ok(()),
                        Err(e)
                            if e.kind()
                                == async_nats::jetstream::context::PublishErrorKind::WrongLastSequence =>
                        {
                            Ok(())
                        }
                        Err(e) => Err(e.to_string()),
                    }
                };
                match tokio::time::timeout(CALL, sent).await {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) if attempt == PUBLISH_TRIES => {
                        tracing::warn!(session, error = %e, "could not share a chat's end with the other nodes; they answer status from the other sources")
                    }
                    Err(_) if attempt == PUBLISH_TRIES => {
                        tracing::warn!(
                            session,
                            "could not share a chat's end with the other nodes in time"
                        )
                    }
                    _ => tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await,
                }
            }
        });
    }

    fn get<'a>(&'a self, conversation_id: &'a str) -> BoxFuture<'a, Option<EndRecord>> {
        Box::pin(async move {
            // Each secret this node accepts names the subject its records were put under.
            for id in self.keys.private_ids(&id_input(conversation_id)) {
                let read = tokio::time::timeout(
                    CALL,
                    self.stream
                        .get_last_raw_message_by_subject(&self.subject_for(&id)),
                )
                .await;
                match read {
                    Ok(Ok(m)) => {
                        if let Some(r) = open(conversation_id, &m.payload, &self.keys) {
                            return Some(r);
                        }
                        tracing::warn!(
                            "a record in the ended-chats stream does not open (another seal key, or not guestd's)"
                        );
                    }
                    Ok(Err(e))
                        if e.kind()
                            == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "could not read the ended-chats stream")
                    }
                    Err(_) => tracing::warn!("no answer from the ended-chats stream in time"),
                }
            }
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EndReason, Participant};

    fn rec(conv: &str) -> EndRecord {
        EndRecord {
            conversation_id: conv.into(),
            session: "s-0123456789ab".into(),
            reason: EndReason::AgentEnded,
            ended_at: "2026-12-07T01:00:00.000Z".into(),
            detail: "the agent disconnected just before the guest".into(),
            duration_ms: 123_456,
            extra: Default::default(),
            confirmation: Some(Box::new(crate::ends::Confirmation {
                platform_reason: Some(EndReason::AgentEnded),
                agrees: Some(true),
                platform_end_time: Some("2026-12-07T01:00:00.100Z".into()),
                participants: vec![
                    Participant {
                        purpose: "customer".into(),
                        disconnect_type: Some("peer".into()),
                    },
                    Participant {
                        purpose: "agent".into(),
                        disconnect_type: Some("client".into()),
                    },
                ],
                detail: "the platform's disconnect types name the cause".into(),
            })),
        }
    }

    /// A record opens only with the secret and only as its own conversation's; the subject and
    /// the bytes name neither the conversation nor the reason.
    #[test]
    fn records_rest_sealed_and_bound_to_their_conversation() {
        let keys = Keyring::new(&[5; 32], &[]);
        let conv = "d2543ad1-5b5c-4b1e-9a39-0e0f5c1d2e3f";
        let sealed = seal(&rec(conv), &keys);
        let text = String::from_utf8(sealed.clone()).unwrap();
        for plain in [conv, "agent_ended", "s-0123456789ab"] {
            assert!(!text.contains(plain), "{plain} in {text}");
        }
        assert_eq!(open(conv, &sealed, &keys), Some(rec(conv)));
        assert_eq!(open("another", &sealed, &keys), None, "moved: refused");
        assert_eq!(
            open(conv, &sealed, &Keyring::new(&[6; 32], &[])),
            None,
            "another secret"
        );
        // Sealed by the same secret for another purpose (an entry's seal): no record.
        let entry = keys.seal(
            Purpose::Entry,
            &context(conv),
            &serde_json::to_vec(&rec(conv)).unwrap(),
        );
        assert_eq!(open(conv, entry.as_bytes(), &keys), None);
        assert_eq!(open(conv, b"{\"reason\":\"agent_ended\"}", &keys), None);
        let id = keys.private_id(&id_input(conv));
        assert!(!id.contains(conv) && id.len() == 32);
        // The figure in the module doc: a confirmed record's size at rest.
        assert!(sealed.len() < 800, "{}", sealed.len());
    }
}
