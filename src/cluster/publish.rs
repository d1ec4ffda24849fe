//! Events into the JetStream stream, behind the same [`EventSink`] seam as stdout: each line is
//! written to the node's own sink (stdout) once, then published on
//! `<prefix>.events.<conversation>` with `Nats-Msg-Id` derived from the event's stable id
//! (`event_id` for `ended`, the same on every node that writes it, so a failover's re-emit is
//! dropped by the stream's duplicate window; otherwise node, boot and sequence). The header is an
//! HMAC of that id under a key derived from the cluster secret ([`Keyring::private_id`]): the
//! same on every node, unpredictable to anyone else, so nobody can publish a look-alike first and
//! make the stream drop the real `ended` as its duplicate. A flush returns only once the
//! stream has acknowledged every line, so an `ended` counts as delivered (and its session entry
//! is removed) only when JetStream holds it. While NATS cannot take events the flush fails and
//! the writer retries with back-off: producers wait, nothing is dropped, and a line is never
//! written to stdout twice.

use super::seal::Keyring;
use crate::events::EventSink;
use async_nats::jetstream::{self, context::Publish, context::PublishAckFuture};
use futures::future::BoxFuture;
use std::collections::VecDeque;

/// Lines published but not yet acknowledged, at most, before a write waits for acks.
const MAX_UNACKED: usize = 1024;

/// The subject and message id of one event line: `(conversation or "none", id)`.
pub fn address(line: &[u8], origin: &str) -> (String, String) {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(default)]
        seq: u64,
        #[serde(default, borrow)]
        conversation_id: Option<std::borrow::Cow<'a, str>>,
        #[serde(default, borrow)]
        event_id: Option<std::borrow::Cow<'a, str>>,
    }
    let head: Option<Head> = serde_json::from_slice(line).ok();
    let conv = head
        .as_ref()
        .and_then(|h| h.conversation_id.as_deref())
        .filter(|c| super::valid_token(c))
        .unwrap_or("none")
        .to_string();
    let id = match &head {
        // An empty `event_id` is no id (guestd's own are never empty): it would deduplicate
        // every such line against the others.
        Some(Head {
            event_id: Some(id), ..
        }) if !id.is_empty() => id.to_string(),
        Some(h) => format!("{origin}:{}", h.seq),
        None => format!("{origin}:unparsed:{}", uuid::Uuid::new_v4().simple()),
    };
    (conv, id)
}

struct Pub {
    subject: String,
    id: String,
    payload: bytes::Bytes,
    ack: Option<PublishAckFuture>,
}

/// The publishing half.
pub struct Publisher {
    js: jetstream::Context,
    subjects: String,
    /// `<node>-<boot>`: makes the ids of events without an `event_id` unique across restarts.
    origin: String,
    keys: Keyring,
    pending: VecDeque<Pub>,
}

impl Publisher {
    /// Publish on `<subjects>.<conversation>` as `node`.
    pub fn new(js: jetstream::Context, subjects: String, node: &str, keys: Keyring) -> Self {
        let boot = &uuid::Uuid::new_v4().simple().to_string()[..8];
        Publisher {
            js,
            subjects,
            origin: format!("{node}-{boot}"),
            keys,
            pending: VecDeque::new(),
        }
    }

    async fn send_unsent(&mut self) -> std::io::Result<()> {
        for p in self.pending.iter_mut().filter(|p| p.ack.is_none()) {
            let publish = Publish::build()
                .payload(p.payload.clone())
                .message_id(&p.id);
            let ack = self
                .js
                .send_publish(p.subject.clone(), publish)
                .await
                .map_err(|e| std::io::Error::other(format!("publishing an event: {e}")))?;
            p.ack = Some(ack);
        }
        Ok(())
    }

    /// Wait for every ack; a line whose ack failed is published again (same id).
    async fn settle(&mut self) -> std::io::Result<()> {
        let mut failed = None;
        let mut keep = VecDeque::new();
        while let Some(mut p) = self.pending.pop_front() {
            match p.ack.take() {
                Some(ack) => match ack.await {
                    Ok(_) => {}
                    Err(e) => {
                        failed.get_or_insert(e.to_string());
                        keep.push_back(p);
                    }
                },
                None => keep.push_back(p),
            }
        }
        self.pending = keep;
        if self.pending.is_empty() {
            return Ok(());
        }
        metrics::counter!("guestd_stream_publish_failures_total").increment(1);
        self.send_unsent().await?;
        Err(std::io::Error::other(format!(
            "the event stream did not acknowledge {} event(s): {}",
            self.pending.len(),
            failed.unwrap_or_else(|| "not sent".into())
        )))
    }
}

/// A sink that writes to `inner` and publishes to the stream.
pub struct StreamSink<S> {
    inner: S,
    out: Option<Publisher>,
    /// The current line is written to `inner` (a retry must not write it again).
    written: bool,
    /// The current line is queued for publishing.
    staged: bool,
}

impl<S> StreamSink<S> {
    /// `inner`, and the stream when `out` is given.
    pub fn new(inner: S, out: Option<Publisher>) -> Self {
        StreamSink {
            inner,
            out,
            written: false,
            staged: false,
        }
    }
}

impl<S: EventSink> EventSink for StreamSink<S> {
    fn write_line<'a>(&'a mut self, line: &'a [u8]) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            if !self.written {
                self.inner.write_line(line).await?;
                self.written = true;
            }
            if let Some(out) = self.out.as_mut() {
                if !self.staged {
                    let (conv, id) = address(line, &out.origin);
                    let id = out.keys.private_id(&id);
                    let payload =
                        bytes::Bytes::copy_from_slice(line.strip_suffix(b"\n").unwrap_or(line));
                    out.pending.push_back(Pub {
                        subject: format!("{}.{conv}", out.subjects),
                        id,
                        payload,
                        ack: None,
                    });
                    self.staged = true;
                }
                out.send_unsent().await?;
                if out.pending.len() >= MAX_UNACKED {
                    out.settle().await?;
                }
            }
            self.written = false;
            self.staged = false;
            Ok(())
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, std::io::Result<()>> {
        Box::pin(async move {
            self.inner.flush().await?;
            if let Some(out) = self.out.as_mut() {
                out.settle().await?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_addressed_by_conversation_and_stable_id() {
        let (c, id) = address(
            br#"{"v":1,"seq":9,"conversation_id":"c-1","event_id":"s-1:ended","type":"ended"}"#,
            "n1-ab",
        );
        assert_eq!((c.as_str(), id.as_str()), ("c-1", "s-1:ended"));
        let (c, id) = address(br#"{"v":1,"seq":9,"conversation_id":null}"#, "n1-ab");
        assert_eq!((c.as_str(), id.as_str()), ("none", "n1-ab:9"));
        // A conversation id that is not a subject token is not put in a subject.
        let (c, _) = address(br#"{"seq":1,"conversation_id":"a.b *"}"#, "n");
        assert_eq!(c, "none");
        let (c, id) = address(b"not json", "n");
        assert_eq!(c, "none");
        assert!(id.starts_with("n:unparsed:"));
        // An empty event id (a fuzz finding of cluster_wire) is no id: the line's sequence is.
        let (_, id) = address(br#"{"v":1,"cr_id":"c-1","event_id":""}"#, "n1-ab");
        assert_eq!(id, "n1-ab:0");
    }
}
