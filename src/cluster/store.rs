//! The session journal in a JetStream KV bucket: one entry per chat, written only by its owner
//! and only with compare-and-set on the revision it last wrote, so a node that lost a chat (it
//! was fenced, another node took the entry) cannot overwrite the new owner's record: its write
//! fails, and the session stops acting ([`Lost`]). The jwt is sealed ([`Sealer`]), bound to the
//! session id.
//!
//! Writes are per chat in order: each waits for the one before (one lock per chat), and
//! progress (the newest message id) is coalesced so a busy chat makes one write in flight and at
//! most one waiting. A write that fails for want of NATS (a timeout, no servers) is retried for
//! as long as this node may act; a compare-and-set that fails because the entry moved on is
//! re-read: still ours (an earlier write landed but its ack was lost) is retried on the new
//! revision; someone else's is lost.

use super::Fence;
use super::seal::Sealer;
use crate::backend::ChatRef;
use crate::journal::{Durable, EndingRecord, Journal, NotDurable, Recovered, SessionRecord};
use crate::secret::Secret;
use async_nats::jetstream::kv::{Operation, Store};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Longest a single KV call may take: a call into a cluster that is electing leaders can hang.
const CALL: Duration = Duration::from_secs(5);

/// `f`, bounded by [`CALL`]; its error as text.
async fn bounded<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("no answer from JetStream in time".into()),
    }
}

/// One chat's entry in the sessions bucket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// The node that holds it; empty once released.
    pub owner: String,
    /// The owner's epoch when it took the chat.
    pub epoch: u64,
    /// As first recorded, the jwt sealed.
    pub record: SessionRecord,
    /// Newest message seen.
    pub last_message_id: Option<String>,
    /// Last write, ms since the epoch.
    pub last_alive_ms: i64,
    /// An end decided but perhaps never written.
    pub ending: Option<EndingRecord>,
    /// A `leave` was accepted.
    pub leaving: bool,
}

impl Entry {
    /// A new entry for `rec`, its jwt sealed.
    pub fn new(rec: SessionRecord, owner: &str, epoch: u64, sealer: &Sealer) -> Entry {
        let mut record = rec;
        let sealed = sealer.seal(&record.session, record.chat.jwt.expose().as_bytes());
        record.chat.jwt = Secret::new(sealed);
        Entry {
            owner: owner.to_string(),
            epoch,
            last_alive_ms: record.started_ms,
            record,
            last_message_id: None,
            ending: None,
            leaving: false,
        }
    }

    /// What a node resuming the chat needs, the jwt opened.
    pub fn recovered(&self, sealer: &Sealer) -> Result<Recovered, super::seal::OpenError> {
        let jwt = sealer.open(&self.record.session, self.record.chat.jwt.expose())?;
        let mut record = self.record.clone();
        record.chat = ChatRef {
            jwt: Secret::new(String::from_utf8_lossy(&jwt).into_owned()),
            ..record.chat
        };
        Ok(Recovered {
            record,
            last_message_id: self.last_message_id.clone(),
            last_alive_ms: self.last_alive_ms,
            ending: self.ending.clone(),
            leaving: self.leaving,
        })
    }

    /// Serialized.
    pub fn to_bytes(&self) -> bytes::Bytes {
        serde_json::to_vec(self).unwrap_or_default().into()
    }

    /// Parsed; None for what is not an entry (it is logged and left alone).
    pub fn parse(bytes: &[u8]) -> Option<Entry> {
        serde_json::from_slice(bytes).ok()
    }
}

/// A chat this node lost: its entry was taken, or it may no longer act. The node relinquishes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Lost(pub String);

struct Slot {
    /// The revision this node last wrote (or took).
    rev: u64,
    entry: Entry,
}

#[derive(Default)]
struct Pending {
    progress: Option<String>,
    flushing: bool,
}

struct Held {
    slot: tokio::sync::Mutex<Option<Slot>>,
    pending: Mutex<Pending>,
}

impl Held {
    fn new(slot: Option<Slot>) -> Arc<Held> {
        Arc::new(Held {
            slot: tokio::sync::Mutex::new(slot),
            pending: Mutex::new(Pending::default()),
        })
    }
}

/// The KV journal. Cheap to share.
#[derive(Clone)]
pub struct KvJournal(Arc<Inner>);

struct Inner {
    kv: Store,
    sealer: Sealer,
    node: String,
    fence: Fence,
    held: Mutex<HashMap<String, Arc<Held>>>,
    lost: mpsc::UnboundedSender<Lost>,
    healthy: AtomicBool,
}

#[derive(Debug)]
enum WriteError {
    /// Another node's now.
    Lost,
    /// This node may not act.
    Fenced,
}

impl KvJournal {
    /// A journal writing as `node`; chats it loses are sent on `lost`.
    pub fn new(
        kv: Store,
        sealer: Sealer,
        node: String,
        fence: Fence,
        lost: mpsc::UnboundedSender<Lost>,
    ) -> Self {
        KvJournal(Arc::new(Inner {
            kv,
            sealer,
            node,
            fence,
            held: Mutex::new(HashMap::new()),
            lost,
            healthy: AtomicBool::new(true),
        }))
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Held>>> {
        self.0.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn held(&self, session: &str) -> Option<Arc<Held>> {
        self.map().get(session).cloned()
    }

    /// Whether this node holds (runs or is starting) `session`.
    pub fn holds(&self, session: &str) -> bool {
        self.held(session).is_some()
    }

    /// Take an orphaned chat: compare-and-set its entry at `rev` to this node's ownership.
    /// Returns what to resume, or None if another node was faster (or the entry is unreadable).
    pub async fn take(&self, session: &str, rev: u64, mut entry: Entry) -> Option<Recovered> {
        let epoch = self.0.fence.epoch();
        if !self.0.fence.acting(epoch) || self.holds(session) {
            return None;
        }
        entry.owner = self.0.node.clone();
        entry.epoch = epoch;
        let rev = match bounded(self.0.kv.update(session, entry.to_bytes(), rev)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(session, error = %e, "another node took the chat first");
                return None;
            }
        };
        let recovered = match entry.recovered(&self.0.sealer) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(session, error = %e, "cannot open a taken chat's jwt; is every node's seal key the same?");
                return None;
            }
        };
        self.map()
            .insert(session.to_string(), Held::new(Some(Slot { rev, entry })));
        Some(recovered)
    }

    /// Write `change` to `session`'s entry, compare-and-set, retried while this node may act.
    async fn write(&self, session: &str, change: impl Fn(&mut Entry)) -> Result<(), WriteError> {
        let Some(held) = self.held(session) else {
            return Err(WriteError::Lost);
        };
        let mut guard = held.slot.lock().await;
        let Some(slot) = guard.as_mut() else {
            return Err(WriteError::Lost);
        };
        change(&mut slot.entry);
        slot.entry.last_alive_ms = chrono::Utc::now().timestamp_millis();
        let mut wait = Duration::from_millis(100);
        loop {
            if !self.0.fence.acting(slot.entry.epoch) {
                return Err(WriteError::Fenced);
            }
            match self
                .0
                .kv
                .update(session, slot.entry.to_bytes(), slot.rev)
                .await
            {
                Ok(rev) => {
                    slot.rev = rev;
                    self.0.healthy.store(true, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => {
                    // Wrong revision, or no answer: read what is there.
                    match bounded(self.0.kv.entry(session)).await {
                        Ok(Some(cur)) if cur.operation == Operation::Put => {
                            match Entry::parse(&cur.value) {
                                Some(theirs)
                                    if theirs.owner == self.0.node
                                        && theirs.epoch == slot.entry.epoch =>
                                {
                                    // Ours: an earlier write landed. Go on from its revision.
                                    slot.rev = cur.revision;
                                    if theirs == slot.entry {
                                        return Ok(());
                                    }
                                    continue;
                                }
                                _ => {
                                    *guard = None;
                                    return Err(WriteError::Lost);
                                }
                            }
                        }
                        Ok(_) => {
                            *guard = None;
                            return Err(WriteError::Lost);
                        }
                        Err(_) => {
                            self.0.healthy.store(false, Ordering::Relaxed);
                            tracing::warn!(session, error = %e, "session entry write failed; retrying");
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(Duration::from_secs(2));
                        }
                    }
                }
            }
        }
    }

    /// Remove an ended chat's entry, at the revision this node wrote: a chat another node took
    /// meanwhile keeps its entry (that node re-emits the same `ended`; the stream drops it).
    async fn purge(&self, session: &str, rev: Option<u64>) {
        let Some(rev) = rev else {
            return;
        };
        let mut wait = Duration::from_millis(100);
        for _ in 0..30 {
            match bounded(self.0.kv.purge_expect_revision(session, Some(rev))).await {
                Ok(()) => return,
                Err(e) => {
                    if matches!(bounded(self.0.kv.entry(session)).await, Ok(Some(cur)) if cur.revision != rev)
                    {
                        return;
                    }
                    tracing::warn!(session, error = %e, "could not remove an ended chat's entry; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn lose(&self, session: &str) {
        self.forget(session);
        let _ = self.0.lost.send(Lost(session.to_string()));
    }

    async fn durable_write(
        self,
        session: String,
        change: impl Fn(&mut Entry),
    ) -> Result<(), NotDurable> {
        match self.write(&session, change).await {
            Ok(()) => Ok(()),
            Err(WriteError::Lost) => {
                self.lose(&session);
                Err(NotDurable("another node holds this chat now".into()))
            }
            Err(WriteError::Fenced) => {
                self.lose(&session);
                Err(NotDurable("this node may no longer act (fenced)".into()))
            }
        }
    }
}

impl Journal for KvJournal {
    fn session_started(&self, rec: SessionRecord) -> Durable {
        let me = self.clone();
        Box::pin(async move {
            let epoch = me.0.fence.epoch();
            if !me.0.fence.acting(epoch) {
                return Err(NotDurable(
                    "this node may not act (not joined, or fenced)".into(),
                ));
            }
            let session = rec.session.clone();
            let entry = Entry::new(rec, &me.0.node, epoch, &me.0.sealer);
            let held = Held::new(None);
            let mut slot = held.slot.lock().await;
            me.map().insert(session.clone(), held.clone());
            // Retried while this node may act: a server that dies mid-write (its peers take
            // over in a second or two) must not fail a `start` whose chat exists already.
            let mut wait = Duration::from_millis(100);
            let result = loop {
                match bounded(me.0.kv.create(&session, entry.to_bytes())).await {
                    Ok(rev) => break Ok(rev),
                    Err(e) => {
                        // Did an earlier try land (its ack lost)?
                        if let Ok(Some(cur)) = bounded(me.0.kv.entry(&session)).await {
                            if cur.operation == Operation::Put {
                                break match Entry::parse(&cur.value) {
                                    Some(theirs)
                                        if theirs.owner == me.0.node && theirs.epoch == epoch =>
                                    {
                                        Ok(cur.revision)
                                    }
                                    _ => Err(format!("session entry: {e}")),
                                };
                            }
                        }
                        if !me.0.fence.acting(epoch) {
                            break Err(format!(
                                "session entry: {e}; and this node may no longer act"
                            ));
                        }
                        me.0.healthy.store(false, Ordering::Relaxed);
                        tracing::warn!(session, error = %e, "session entry not written yet; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(1));
                    }
                }
            };
            match result {
                Ok(rev) => {
                    me.0.healthy.store(true, Ordering::Relaxed);
                    *slot = Some(Slot { rev, entry });
                    Ok(())
                }
                Err(e) => {
                    drop(slot);
                    me.forget(&session);
                    Err(NotDurable(e))
                }
            }
        })
    }

    fn progress(&self, session: &str, last_message_id: &str) {
        let Some(held) = self.held(session) else {
            return;
        };
        {
            let mut p = held.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.progress = Some(last_message_id.to_string());
            if p.flushing {
                return;
            }
            p.flushing = true;
        }
        let me = self.clone();
        let session = session.to_string();
        tokio::spawn(async move {
            loop {
                let next = {
                    let mut p = held.pending.lock().unwrap_or_else(|e| e.into_inner());
                    match p.progress.take() {
                        Some(id) => id,
                        None => {
                            p.flushing = false;
                            return;
                        }
                    }
                };
                let r = me
                    .write(&session, |e| e.last_message_id = Some(next.clone()))
                    .await;
                if r.is_err() {
                    me.lose(&session);
                    let mut p = held.pending.lock().unwrap_or_else(|e| e.into_inner());
                    p.flushing = false;
                    p.progress = None;
                    return;
                }
            }
        });
    }

    fn ending(&self, session: &str, ending: EndingRecord) -> Durable {
        Box::pin(self.clone().durable_write(session.to_string(), move |e| {
            e.ending = Some(ending.clone())
        }))
    }

    fn leaving(&self, session: &str) -> Durable {
        Box::pin(
            self.clone()
                .durable_write(session.to_string(), |e| e.leaving = true),
        )
    }

    fn ended(&self, session: &str) {
        // Held until the entry is gone, so the claimer does not take the chat back meanwhile.
        let Some(held) = self.held(session) else {
            return;
        };
        let me = self.clone();
        let session = session.to_string();
        tokio::spawn(async move {
            let slot = held.slot.lock().await;
            let rev = slot.as_ref().map(|s| s.rev);
            drop(slot);
            me.purge(&session, rev).await;
            me.forget(&session);
        });
    }

    fn sync(&self) -> Durable {
        Box::pin(async { Ok(()) })
    }

    fn healthy(&self) -> bool {
        self.0.healthy.load(Ordering::Relaxed)
    }

    fn strict(&self) -> bool {
        true
    }

    fn forget(&self, session: &str) {
        self.map().remove(session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_hold_the_jwt_sealed_and_give_it_back() {
        let sealer = Sealer::new(&[3; 32]);
        let rec = SessionRecord {
            session: "s-1".into(),
            chat: ChatRef {
                conversation_id: "c".into(),
                member_id: "m".into(),
                jwt: Secret::new("eyJ.secret.sig"),
                event_stream_uri: "ws://127.0.0.1/x".into(),
            },
            started_ms: 5,
            mode: "start".into(),
            web_messaging: None,
        };
        let e = Entry::new(rec.clone(), "n1", 9, &sealer);
        let text = String::from_utf8(e.to_bytes().to_vec()).unwrap();
        assert!(!text.contains("secret"), "{text}");
        let back = Entry::parse(text.as_bytes()).unwrap();
        assert_eq!(back, e);
        let r = back.recovered(&sealer).unwrap();
        assert_eq!(r.record, rec);
        assert!(back.recovered(&Sealer::new(&[4; 32])).is_err());
        assert_eq!(Entry::parse(b"{}"), None);
    }
}
