//! The session journal in a JetStream KV bucket: one entry per chat, written only by its owner
//! and only with compare-and-set on the revision it last wrote, so a node that lost a chat (it
//! was fenced, another node took the entry) cannot overwrite the new owner's record: its write
//! fails, and the session stops acting ([`Lost`]).
//!
//! An entry rests **sealed whole** ([`Keyring`], [`Purpose::Entry`]): the jwt, the stream URL,
//! the progress and the end, bound to the KV key, the owner and the epoch. Owner and epoch are
//! also in the clear, for operators (`nats kv get`), but a node trusts only what opens. So a
//! writer without the cluster secret can neither read a jwt nor point a node at another URL,
//! and a value cannot be moved to another chat or owner.
//!
//! **Conflicts.** Only a node that may act writes its chats' entries, and no other node takes a
//! chat while its owner may act (the lease argument, `lease.rs`). So an entry of a chat this node
//! holds that vanished, does not open, or names an owner that is not live (an older value
//! replayed) was not written by a guestd node in step with the cluster: the owner keeps the
//! chat, writes its entry again, logs an error and counts it in
//! `guestd_cluster_entry_conflicts_total{kind}`. An entry that opens and names another live
//! owner is a real takeover: the chat is lost.
//!
//! Writes are per chat in order: each waits for the one before (one lock per chat), and
//! progress (the newest message id) is coalesced so a busy chat makes one write in flight and at
//! most one waiting. A write that fails for want of NATS (a timeout, no servers) is retried for
//! as long as this node may act; a compare-and-set that fails because the entry moved on is
//! re-read and judged as above.
//!
//! **Calls in flight.** At most [`CALLS_IN_FLIGHT`] calls on the sessions bucket are in flight
//! from one node ([`Inner::call`]); the rest wait their turn, each holding only its arguments,
//! and the call itself is allocated once it has a turn. A burst of starts (a thousand
//! `attach`es in a second) so queues here, not in JetStream, where it would delay the
//! renewals of every node, and its peak memory (about 3 KiB per write in flight, measured with
//! heaptrack) does not stay behind in the allocator once the burst is over.

use super::Fence;
use super::seal::{Keyring, Purpose};
use super::slots;
use crate::journal::{
    Activity, Durable, EndingRecord, Journal, NotDurable, Recovered, SessionRecord,
};
use async_nats::jetstream::kv::{Operation, Store};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Longest a single KV call may take: a call into a cluster that is electing leaders can hang.
const CALL: Duration = Duration::from_secs(5);

/// Calls on the sessions bucket in flight at once from one node (see the module's doc). At
/// JetStream's pace on a loaded cluster (a few ms a write) that is thousands of writes a second;
/// what it bounds is the backlog a burst puts in front of other nodes' renewals.
pub const CALLS_IN_FLIGHT: usize = 64;

/// The error of a call that got no turn in time ([`with_turn`]): nothing was sent, so there is
/// nothing to read back, and it says the node is busy, not that JetStream is unwell.
const NO_TURN: &str = "no turn for a JetStream call in time";

/// `f`, bounded by [`CALL`]; its error as text.
async fn bounded<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("no answer from JetStream in time".into()),
    }
}

/// One chat's entry in the sessions bucket, as a node holds it once opened.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// The node that holds it; empty once released.
    pub owner: String,
    /// The owner's epoch when it took the chat.
    pub epoch: u64,
    /// As first recorded (the jwt in it: the entry rests sealed whole).
    pub record: StoredRecord,
    /// Newest message seen.
    pub last_message_id: Option<String>,
    /// Last write, ms since the epoch.
    pub last_alive_ms: i64,
    /// An end decided but perhaps never written.
    pub ending: Option<EndingRecord>,
    /// A `leave` was accepted.
    pub leaving: bool,
    /// The no-activity rule's evidence.
    #[serde(default)]
    pub activity: Activity,
    /// Grows with every write of the entry (a take included): sealed, so an older value stored
    /// again (a replay) is told from a newer one by every node that saw the newer.
    #[serde(default)]
    pub generation: u64,
}

/// A chat's record as its entry keeps it: the JSON text of its [`SessionRecord`] (the backend's
/// state, the credential in it), read back only when the chat is resumed, and the two ids the
/// nodes look at. Held as a `serde_json::Value` map for as long as the chat lived, the state cost
/// about 1 KiB more per chat on a cluster node (docs/benchmarks.md), and every write walked it.
/// Written exactly as the record it holds, so entries stay readable both ways.
#[derive(Clone)]
pub struct StoredRecord {
    raw: Box<serde_json::value::RawValue>,
    /// guestd's session id.
    pub session: String,
    /// The chat's key.
    pub conversation_id: String,
}

impl StoredRecord {
    /// `rec`, kept as its JSON text.
    pub fn new(rec: &SessionRecord) -> Result<StoredRecord, serde_json::Error> {
        Ok(StoredRecord {
            raw: serde_json::value::to_raw_value(rec)?,
            session: rec.session.clone(),
            conversation_id: rec.conversation_id.clone(),
        })
    }

    /// The record, read back.
    pub fn record(&self) -> Result<SessionRecord, serde_json::Error> {
        serde_json::from_str(self.raw.get())
    }
}

impl PartialEq for StoredRecord {
    fn eq(&self, other: &Self) -> bool {
        self.raw.get() == other.raw.get()
    }
}

/// The ids only: the rest holds a credential.
impl std::fmt::Debug for StoredRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredRecord")
            .field("session", &self.session)
            .field("conversation_id", &self.conversation_id)
            .finish_non_exhaustive()
    }
}

impl Serialize for StoredRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for StoredRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        // The ids, and the other fields a [`SessionRecord`] requires checked for their type
        // without being kept (its `state` may be any JSON): what opens here, `record()` reads
        // back.
        #[derive(Deserialize)]
        struct Ids {
            session: String,
            backend: Option<String>,
            conversation_id: Option<String>,
            #[serde(rename = "started_ms")]
            _started_ms: i64,
            #[serde(rename = "mode")]
            _mode: String,
        }
        let ids: Ids = serde_json::from_str(raw.get()).map_err(D::Error::custom)?;
        match (ids.backend, ids.conversation_id) {
            (Some(_), Some(conversation_id)) => Ok(StoredRecord {
                raw,
                session: ids.session,
                conversation_id,
            }),
            // A record of the shape before backends were named: read as the journal reads it,
            // and kept in today's shape.
            _ => {
                let rec: SessionRecord =
                    serde_json::from_str(raw.get()).map_err(D::Error::custom)?;
                StoredRecord::new(&rec).map_err(D::Error::custom)
            }
        }
    }
}

/// How an entry rests in the bucket.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    /// Owner, in the clear for operators; bound into the seal.
    owner: String,
    /// Epoch, likewise.
    epoch: u64,
    /// The whole [`Entry`] sealed, with the KV key, owner and epoch as context.
    sealed: String,
}

/// Why a value in the sessions bucket is not an entry this node can trust.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Foreign {
    /// Not an entry's shape at all.
    #[error("not a guestd session entry")]
    Shape,
    /// The shape, but it does not open with any key this node accepts for this key, owner and
    /// epoch (forged, moved from another chat, or sealed with a key not configured here).
    #[error("a session entry that does not authenticate (forged, moved, or another seal key)")]
    Unauthenticated,
}

fn context<'a>(key: &'a str, owner: &'a str, epoch: &'a [u8; 8]) -> [&'a [u8]; 3] {
    [key.as_bytes(), owner.as_bytes(), epoch]
}

impl Entry {
    /// A new entry for `rec`.
    pub fn new(rec: &SessionRecord, owner: &str, epoch: u64) -> Result<Entry, serde_json::Error> {
        Ok(Entry {
            owner: owner.to_string(),
            epoch,
            last_alive_ms: rec.started_ms,
            record: StoredRecord::new(rec)?,
            last_message_id: None,
            ending: None,
            leaving: false,
            activity: Activity::default(),
            generation: 1,
        })
    }

    /// What a node resuming the chat needs; an error when its record does not read back.
    pub fn recovered(&self) -> Result<Recovered, serde_json::Error> {
        Ok(Recovered {
            record: self.record.record()?,
            last_message_id: self.last_message_id.clone(),
            last_alive_ms: self.last_alive_ms,
            ending: self.ending.clone(),
            leaving: self.leaving,
            activity: self.activity.clone(),
        })
    }

    /// Sealed for the bucket under `session`'s key ([`slots::bucket_key`]).
    pub fn seal(&self, session: &str, keys: &Keyring) -> bytes::Bytes {
        let plain = serde_json::to_vec(self).unwrap_or_default();
        let epoch = self.epoch.to_be_bytes();
        let key = slots::bucket_key(session);
        let key = key.as_ref();
        let wire = Wire {
            owner: self.owner.clone(),
            epoch: self.epoch,
            sealed: keys.seal(Purpose::Entry, &context(key, &self.owner, &epoch), &plain),
        };
        serde_json::to_vec(&wire).unwrap_or_default().into()
    }

    /// The entry stored for `session` (under its key), if it opens and agrees with its clear
    /// fields.
    pub fn open(session: &str, bytes: &[u8], keys: &Keyring) -> Result<Entry, Foreign> {
        let wire: Wire = serde_json::from_slice(bytes).map_err(|_| Foreign::Shape)?;
        let epoch = wire.epoch.to_be_bytes();
        let key = slots::bucket_key(session);
        let key = key.as_ref();
        let plain = keys
            .open(
                Purpose::Entry,
                &context(key, &wire.owner, &epoch),
                &wire.sealed,
            )
            .map_err(|_| Foreign::Unauthenticated)?;
        let entry: Entry = serde_json::from_slice(&plain).map_err(|_| Foreign::Unauthenticated)?;
        if entry.owner != wire.owner || entry.epoch != wire.epoch || entry.record.session != session
        {
            return Err(Foreign::Unauthenticated);
        }
        Ok(entry)
    }
}

/// Note in the key index that `conversation`'s chat is `session`, so a keyed `attach` or a
/// command by conversation id on any node finds it without a view of the cluster (`route.rs`).
/// Best effort: a missing index entry costs what a view that lags did (the attach is placed as
/// a new chat, and its node refuses a key it already holds).
async fn write_index(kv: &Store, keys: &Keyring, conversation: &str, session: &str) {
    let key = slots::index_key(keys, conversation);
    for left in (0..3).rev() {
        match bounded(kv.put(key.clone(), session.to_string().into())).await {
            Ok(_) => return,
            Err(e) if left == 0 => {
                tracing::warn!(session, error = %e, "could not write the chat's key index entry")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A chat this node lost: its entry was taken, or it may no longer act. The node relinquishes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Lost(pub String);

/// Whether `(owner, epoch)` holds its chats now, as this node sees the cluster.
pub type Liveness = Arc<dyn Fn(&str, u64) -> bool + Send + Sync>;

struct Slot {
    /// The revision this node last wrote (or took); 0 for "no entry".
    rev: u64,
    entry: Entry,
}

/// What waits to be written for a chat, coalesced: only the newest of each counts.
#[derive(Default)]
struct Pending {
    progress: Option<String>,
    activity: Option<Activity>,
    flushing: bool,
}

struct Held {
    slot: tokio::sync::Mutex<Option<Slot>>,
    pending: Mutex<Pending>,
    /// The chat ended and its entry is being removed on purpose: a vanished entry is no conflict,
    /// and nothing more is written.
    ended: AtomicBool,
    /// The revision this node last wrote, readable without the slot's lock (the watch uses it
    /// to pass over its own writes).
    last_rev: std::sync::atomic::AtomicU64,
}

/// Move what is pending for a chat into its entry (called by a write, under the slot's lock).
fn apply_pending(held: &Held, e: &mut Entry) {
    let mut p = held.pending.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(id) = p.progress.take() {
        e.last_message_id = Some(id);
    }
    if let Some(a) = p.activity.take() {
        e.activity = a;
    }
}

impl Held {
    fn new(slot: Option<Slot>) -> Arc<Held> {
        let rev = slot.as_ref().map_or(0, |s| s.rev);
        Arc::new(Held {
            slot: tokio::sync::Mutex::new(slot),
            pending: Mutex::new(Pending::default()),
            ended: AtomicBool::new(false),
            last_rev: std::sync::atomic::AtomicU64::new(rev),
        })
    }
}

/// The KV journal. Cheap to share.
#[derive(Clone)]
pub struct KvJournal(Arc<Inner>);

struct Inner {
    kv: Store,
    keys: Keyring,
    node: String,
    fence: Fence,
    live: Liveness,
    held: Mutex<HashMap<String, Arc<Held>>>,
    lost: mpsc::UnboundedSender<Lost>,
    healthy: AtomicBool,
    /// Turns for calls on the bucket ([`CALLS_IN_FLIGHT`]).
    turns: tokio::sync::Semaphore,
    /// Key index writes waiting, written by one task a few at a time ([`INDEX_QUEUE`]).
    index: mpsc::Sender<(String, String)>,
}

impl Inner {
    /// One call on the sessions bucket, made by `make` once it has a turn ([`with_turn`]).
    async fn call<'a, T, E, F>(&'a self, make: impl FnOnce(&'a Store) -> F) -> Result<T, String>
    where
        E: std::fmt::Display,
        F: std::future::Future<Output = Result<T, E>> + 'a,
    {
        with_turn(&self.turns, || make(&self.kv)).await
    }
}

/// The call `make` makes, once it has one of `turns`: the wait for a turn and the call are
/// each bounded by [`CALL`]. The call's future is boxed when made, so a caller waiting for a
/// turn holds only `make`.
async fn with_turn<T, E, F>(
    turns: &tokio::sync::Semaphore,
    make: impl FnOnce() -> F,
) -> Result<T, String>
where
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
{
    let turn = match tokio::time::timeout(CALL, turns.acquire()).await {
        Ok(Ok(t)) => t,
        Ok(Err(_)) => return Err("the journal is closed".into()),
        Err(_) => return Err(NO_TURN.into()),
    };
    let r = bounded(Box::pin(make())).await;
    drop(turn);
    r
}

/// Key index writes that may wait; more are dropped (best effort: the index is a hint).
const INDEX_QUEUE: usize = 65_536;
/// Key index writes in flight at once: a burst of starts does not double JetStream's write
/// rate at the moment renewals need it.
const INDEX_IN_FLIGHT: usize = 4;

#[derive(Debug)]
enum WriteError {
    /// Another node's now.
    Lost,
    /// This node may not act.
    Fenced,
}

/// What the bucket holds for a chat this node holds, judged.
#[derive(Debug, PartialEq)]
enum Judged {
    /// This node's own value at this revision (the same as the slot's when the flag is set).
    Ours(u64, bool),
    /// A live owner's: a real takeover.
    Theirs,
    /// Not written by a guestd node in step: rewrite at this revision.
    Conflict(u64, &'static str),
}

impl KvJournal {
    /// A journal writing as `node`; chats it loses are sent on `lost`; `live` says whether
    /// another owner named by an entry holds its chats.
    pub fn new(
        kv: Store,
        keys: Keyring,
        node: String,
        fence: Fence,
        live: Liveness,
        lost: mpsc::UnboundedSender<Lost>,
    ) -> Self {
        let (index, mut queued) = mpsc::channel::<(String, String)>(INDEX_QUEUE);
        let (ikv, ikeys) = (kv.clone(), keys.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                use futures::StreamExt;
                let writes = futures::stream::poll_fn(move |cx| queued.poll_recv(cx))
                    .map(|(conversation, session)| {
                        let (kv, keys) = (ikv.clone(), ikeys.clone());
                        async move { write_index(&kv, &keys, &conversation, &session).await }
                    })
                    .buffer_unordered(INDEX_IN_FLIGHT);
                writes.for_each(|()| async {}).await;
            });
        }
        KvJournal(Arc::new(Inner {
            kv,
            keys,
            node,
            fence,
            live,
            held: Mutex::new(HashMap::new()),
            lost,
            healthy: AtomicBool::new(true),
            turns: tokio::sync::Semaphore::new(CALLS_IN_FLIGHT),
            index,
        }))
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Held>>> {
        self.0.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn held(&self, session: &str) -> Option<Arc<Held>> {
        self.map().get(session).cloned()
    }

    /// Chats this node holds (runs or is starting).
    pub fn count(&self) -> usize {
        self.map().len()
    }

    /// Whether this node holds (runs or is starting) `session`.
    pub fn holds(&self, session: &str) -> bool {
        self.held(session).is_some()
    }

    /// Open what the bucket holds under `key`.
    pub fn open(&self, key: &str, bytes: &[u8]) -> Result<Entry, Foreign> {
        Entry::open(key, bytes, &self.0.keys)
    }

    /// Take an orphaned chat: compare-and-set its entry at `rev` to this node's ownership.
    /// Returns what to resume, or None if another node was faster.
    pub async fn take(&self, session: &str, rev: u64, mut entry: Entry) -> Option<Recovered> {
        let epoch = self.0.fence.epoch();
        if !self.0.fence.acting(epoch) || self.holds(session) {
            return None;
        }
        // What the resume needs, read back before anything is taken: a chat whose record
        // does not read back here stays where it is.
        let recovered = match entry.recovered() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(session, error = %e, "a chat's record does not read back; not taken");
                return None;
            }
        };
        entry.owner = self.0.node.clone();
        entry.epoch = epoch;
        entry.generation += 1;
        let rev = match self
            .0
            .call(|kv| {
                kv.update(
                    slots::bucket_key(session),
                    entry.seal(session, &self.0.keys),
                    rev,
                )
            })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                // Another node was faster, or no answer (or turn) in time: the chat stays an
                // orphan for the next round of claims.
                tracing::debug!(session, error = %e, "did not take the chat");
                return None;
            }
        };
        // The key index names the chat again (written at its start; written again here in case
        // that write was lost), in the background: the resume does not wait for it.
        self.index_later(entry.record.conversation_id.clone(), session.to_string());
        self.map()
            .insert(session.to_string(), Held::new(Some(Slot { rev, entry })));
        // A change that landed between the compare-and-set and the line above went unjudged:
        // the sessions watch passes over a chat not held here yet. Read the entry once more
        // (an older value stored again at that moment stayed in the bucket for good).
        let newer = match self.0.call(|kv| kv.entry(slots::bucket_key(session))).await {
            Ok(Some(cur)) => (cur.revision > rev).then_some(cur.revision),
            Ok(None) => Some(rev + 1),
            Err(_) => None,
        };
        if let Some(at) = newer {
            self.watched(session, at);
        }
        Some(recovered)
    }

    /// Judge `cur`, the bucket's value for a chat held here whose entry is `mine`.
    fn judge(&self, mine: &Entry, cur: Option<&async_nats::jetstream::kv::Entry>) -> Judged {
        let Some(cur) = cur else {
            return Judged::Conflict(0, "vanished");
        };
        if cur.operation != Operation::Put {
            return Judged::Conflict(cur.revision, "vanished");
        }
        match Entry::open(
            slots::session_of_key(&cur.key).unwrap_or_default(),
            &cur.value,
            &self.0.keys,
        ) {
            Err(_) => Judged::Conflict(cur.revision, "forged"),
            // Older than what this node wrote: stored again by someone, whoever it names.
            Ok(theirs) if theirs.generation < mine.generation => {
                Judged::Conflict(cur.revision, "replayed")
            }
            Ok(theirs) if theirs.owner == self.0.node && theirs.epoch == mine.epoch => {
                Judged::Ours(cur.revision, &theirs == mine)
            }
            Ok(theirs) if (self.0.live)(&theirs.owner, theirs.epoch) => Judged::Theirs,
            Ok(_) => Judged::Conflict(cur.revision, "replayed"),
        }
    }

    fn alert(&self, session: &str, kind: &'static str) {
        metrics::counter!("guestd_cluster_entry_conflicts_total", "kind" => kind).increment(1);
        tracing::error!(
            session,
            kind,
            "ALERT: this chat's session entry was changed by something other than a guestd node \
             in step with the cluster (a NATS user with write access to the sessions bucket?); \
             this node keeps the chat and writes its entry again"
        );
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
        if held.ended.load(Ordering::Acquire) {
            // The entry is being removed: a late progress write must not outlive the purge.
            return Ok(());
        }
        change(&mut slot.entry);
        slot.entry.last_alive_ms = chrono::Utc::now().timestamp_millis();
        slot.entry.generation += 1;
        let mut wait = Duration::from_millis(100);
        loop {
            if !self.0.fence.acting(slot.entry.epoch) {
                return Err(WriteError::Fenced);
            }
            // Sealed once the write has its turn: a write waiting holds no sealed copy.
            let entry = &slot.entry;
            let sealed = || entry.seal(session, &self.0.keys);
            // Revision 0: the entry vanished (`create` steps over a delete or purge marker).
            let put = if slot.rev == 0 {
                self.0
                    .call(|kv| kv.create(slots::bucket_key(session), sealed()))
                    .await
            } else {
                let rev = slot.rev;
                self.0
                    .call(|kv| kv.update(slots::bucket_key(session), sealed(), rev))
                    .await
            };
            let e = match put {
                Ok(rev) => {
                    slot.rev = rev;
                    held.last_rev.store(rev, Ordering::Release);
                    self.0.healthy.store(true, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => e,
            };
            if e == NO_TURN {
                // Nothing was sent: wait for a turn again.
                tracing::debug!(
                    session,
                    "session entry write waited too long for a turn; retrying"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
                continue;
            }
            // Wrong revision, or no answer: read what is there.
            match self.0.call(|kv| kv.entry(slots::bucket_key(session))).await {
                Ok(cur) => match self.judge(&slot.entry, cur.as_ref()) {
                    Judged::Ours(rev, same) => {
                        // An earlier write landed (its ack lost). Go on from its revision.
                        slot.rev = rev;
                        held.last_rev.store(rev, Ordering::Release);
                        if same {
                            return Ok(());
                        }
                    }
                    Judged::Theirs => {
                        *guard = None;
                        return Err(WriteError::Lost);
                    }
                    Judged::Conflict(rev, kind) => {
                        if held.ended.load(Ordering::Acquire) && kind == "vanished" {
                            return Ok(());
                        }
                        self.alert(session, kind);
                        slot.rev = rev;
                        // Paced, so a writer racing this one cannot make it spin.
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(2));
                    }
                },
                Err(_) => {
                    self.0.healthy.store(false, Ordering::Relaxed);
                    tracing::warn!(session, error = %e, "session entry write failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// The sessions watch saw a change of `session`'s entry at `revision`. For a chat held
    /// here, any revision after the one this node last wrote is judged (`write` reads it): a
    /// conflict is written over (the chat stays here), a live owner's takeover loses the chat.
    /// This node's own writes (and anything older) are passed over without a task.
    pub fn watched(&self, session: &str, revision: u64) {
        let Some(held) = self.held(session) else {
            return;
        };
        if held.ended.load(Ordering::Acquire) || revision <= held.last_rev.load(Ordering::Acquire) {
            return;
        }
        let me = self.clone();
        let session = session.to_string();
        tokio::spawn(async move {
            {
                let guard = held.slot.lock().await;
                match guard.as_ref() {
                    // Not yet written (a start in progress), or the write whose echo this is
                    // finished meanwhile.
                    None => return,
                    Some(slot) if slot.rev >= revision => return,
                    Some(_) => {}
                }
            }
            if let Err(e) = me.write(&session, |_| {}).await {
                tracing::warn!(session, error = ?e, "a chat's entry was taken over");
                me.lose(&session);
            }
        });
    }

    /// Queue a key index write ([`write_index`]).
    fn index_later(&self, conversation: String, session: String) {
        if self.0.index.try_send((conversation, session)).is_err() {
            tracing::warn!("key index writes are behind; one was dropped (a hint only)");
        }
    }

    /// Remove `conversation`'s key index entry if it still names `session`.
    async fn unindex(&self, conversation: &str, session: &str) {
        let key = slots::index_key(&self.0.keys, conversation);
        if let Ok(Some(cur)) = self.0.call(|kv| kv.entry(key.clone())).await {
            if cur.operation == Operation::Put && cur.value.as_ref() == session.as_bytes() {
                let _ = self
                    .0
                    .call(|kv| kv.purge_expect_revision(key, Some(cur.revision)))
                    .await;
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
            match self
                .0
                .call(|kv| kv.purge_expect_revision(slots::bucket_key(session), Some(rev)))
                .await
            {
                Ok(()) => return,
                Err(e) => {
                    if matches!(self.0.call(|kv| kv.entry(slots::bucket_key(session))).await, Ok(Some(cur)) if cur.revision != rev)
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

    /// Note what `set` puts in `session`'s pending writes; one writer per chat writes the newest
    /// of each until nothing is pending (a busy chat makes one write in flight, one waiting).
    fn coalesce(&self, session: &str, set: impl FnOnce(&mut Pending)) {
        let Some(held) = self.held(session) else {
            return;
        };
        {
            let mut p = held.pending.lock().unwrap_or_else(|e| e.into_inner());
            set(&mut p);
            if p.flushing {
                return;
            }
            p.flushing = true;
        }
        let me = self.clone();
        let session = session.to_string();
        tokio::spawn(async move {
            loop {
                {
                    let mut p = held.pending.lock().unwrap_or_else(|e| e.into_inner());
                    if p.progress.is_none() && p.activity.is_none() {
                        p.flushing = false;
                        return;
                    }
                }
                // What is pending is taken inside the write, under the slot's lock: a value
                // set meanwhile (an `evidence` write, say) is never overtaken by an older one.
                let r = me.write(&session, |e| apply_pending(&held, e)).await;
                let stop = r.is_err() || held.ended.load(Ordering::Acquire);
                if r.is_err() {
                    me.lose(&session);
                }
                if stop {
                    // Lost, or ended (the entry is being removed: nothing more is written).
                    let mut p = held.pending.lock().unwrap_or_else(|e| e.into_inner());
                    *p = Pending::default();
                    return;
                }
            }
        });
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
            let entry = Entry::new(&rec, &me.0.node, epoch)
                .map_err(|e| NotDurable(format!("session record: {e}")))?;
            let held = Held::new(None);
            let mut slot = held.slot.lock().await;
            me.map().insert(session.clone(), held.clone());
            // Retried while this node may act: a server that dies mid-write (its peers take
            // over in a second or two) must not fail a `start` whose chat exists already.
            let mut wait = Duration::from_millis(100);
            let mut sent = false;
            let result = loop {
                match me
                    .0
                    .call(|kv| {
                        // Sealed once the write has its turn.
                        sent = true;
                        kv.create(
                            slots::bucket_key(&session),
                            entry.seal(&session, &me.0.keys),
                        )
                    })
                    .await
                {
                    Ok(rev) => break Ok(rev),
                    Err(e) if e == NO_TURN && !sent => {
                        // Nothing was ever sent: wait for a turn again, while this node may
                        // act. (Once a try was sent, every failure reads back first: that try
                        // may have landed.)
                        if !me.0.fence.acting(epoch) {
                            break Err(format!(
                                "session entry: {e}; and this node may no longer act"
                            ));
                        }
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(1));
                    }
                    Err(e) => {
                        // Did an earlier try land (its ack lost)?
                        if let Ok(Some(cur)) =
                            me.0.call(|kv| kv.entry(slots::bucket_key(&session))).await
                        {
                            if cur.operation == Operation::Put {
                                break match me.open(&session, &cur.value) {
                                    Ok(theirs)
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
                    held.last_rev.store(rev, Ordering::Release);
                    let conversation = entry.record.conversation_id.clone();
                    *slot = Some(Slot { rev, entry });
                    drop(slot);
                    me.index_later(conversation, session);
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
        let id = last_message_id.to_string();
        self.coalesce(session, |p| p.progress = Some(id));
    }

    fn activity(&self, session: &str, activity: Activity) {
        self.coalesce(session, |p| p.activity = Some(activity));
    }

    /// Written now and waited for. The value is made the pending one, then a write takes
    /// what is pending under the slot's lock: whichever write (this one or a coalesced flush)
    /// runs first carries it, and an older value taken before cannot land after it (a write
    /// in flight holds the lock this one waits for). Resolves once the entry holds it.
    fn evidence(&self, session: &str, activity: Activity) -> Durable {
        let held = self.held(session);
        if let Some(h) = &held {
            h.pending.lock().unwrap_or_else(|e| e.into_inner()).activity = Some(activity);
        }
        Box::pin(self.clone().durable_write(session.to_string(), move |e| {
            if let Some(h) = &held {
                apply_pending(h, e);
            }
        }))
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
        held.ended.store(true, Ordering::Release);
        let me = self.clone();
        let session = session.to_string();
        tokio::spawn(async move {
            // Held through the purge: no write lands between reading the revision and removing it.
            let slot = held.slot.lock().await;
            let rev = slot.as_ref().map(|s| s.rev);
            let conversation = slot
                .as_ref()
                .map(|s| s.entry.record.conversation_id.clone());
            me.purge(&session, rev).await;
            drop(slot);
            me.forget(&session);
            if let Some(c) = conversation {
                me.unindex(&c, &session).await;
            }
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

    #[tokio::test(start_paused = true)]
    async fn no_more_than_the_stated_calls_are_in_flight_and_a_call_waits_a_bounded_time() {
        use std::sync::atomic::AtomicUsize;
        let turns = tokio::sync::Semaphore::new(CALLS_IN_FLIGHT);
        let (now, most, made) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        let gate = tokio::sync::Semaphore::new(0);
        // Four times the bound, each call held until the gate opens.
        let calls = futures::future::join_all((0..CALLS_IN_FLIGHT * 4).map(|_| {
            with_turn(&turns, || {
                made.fetch_add(1, Ordering::SeqCst);
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(n, Ordering::SeqCst);
                async {
                    if let Ok(p) = gate.acquire().await {
                        p.forget();
                    }
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, String>(())
                }
            })
        }));
        let opener = async {
            // Let every call that can start do so, then open the gate a call at a time.
            for _ in 0..CALLS_IN_FLIGHT * 4 {
                tokio::task::yield_now().await;
                assert!(now.load(Ordering::SeqCst) <= CALLS_IN_FLIGHT);
                gate.add_permits(1);
            }
        };
        let (results, ()) = tokio::join!(calls, opener);
        assert_eq!(
            most.load(Ordering::SeqCst),
            CALLS_IN_FLIGHT,
            "the bound is reached, never passed"
        );
        assert!(results.iter().all(Result::is_ok), "every call ran");
        assert_eq!(made.load(Ordering::SeqCst), CALLS_IN_FLIGHT * 4);

        // Every turn taken (held here): a caller gives up after CALL without making its call.
        let all = turns
            .acquire_many(CALLS_IN_FLIGHT as u32)
            .await
            .expect("open");
        let t = tokio::time::Instant::now();
        let late = with_turn(&turns, || async {
            made.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(())
        })
        .await;
        assert_eq!(late, Err(NO_TURN.to_string()));
        assert_eq!(t.elapsed(), CALL);
        drop(all);

        // Calls that hang (JetStream stalled) give their turns back after CALL: a caller that
        // came a second later gets one then and makes its call.
        let hung = futures::future::join_all(
            (0..CALLS_IN_FLIGHT)
                .map(|_| with_turn(&turns, futures::future::pending::<Result<(), String>>)),
        );
        let later = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let t = tokio::time::Instant::now();
            let r = with_turn(&turns, || async {
                made.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(())
            })
            .await;
            (r, t.elapsed())
        };
        let (hung, (later, waited)) = tokio::join!(hung, later);
        assert!(
            hung.iter()
                .all(|r| r.as_ref().is_err_and(|e| e.contains("no answer")))
        );
        assert_eq!(later, Ok(()));
        assert_eq!(waited, CALL - Duration::from_secs(1));
        assert_eq!(
            made.load(Ordering::SeqCst),
            CALLS_IN_FLIGHT * 4 + 1,
            "the call that got no turn was never made; the later one was"
        );
    }

    fn record(session: &str) -> SessionRecord {
        SessionRecord {
            session: session.into(),
            started_ms: 5,
            mode: "start".into(),
            backend: "guest_chat".into(),
            conversation_id: "c".into(),
            state: serde_json::json!({"chat": {
                "conversation_id": "c",
                "member_id": "m",
                "jwt": "eyJ.secret.sig",
                "event_stream_uri": "ws://127.0.0.1/x",
            }}),
        }
    }

    #[test]
    fn a_stored_record_is_written_as_the_record_and_reads_back_from_either_shape() {
        let rec = record("s-1");
        let stored = StoredRecord::new(&rec).unwrap();
        // The same JSON as the record itself: entries stay readable by builds either side.
        assert_eq!(
            serde_json::to_value(&stored).unwrap(),
            serde_json::to_value(&rec).unwrap()
        );
        let back: StoredRecord =
            serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(back, stored);
        assert_eq!(back.record().unwrap(), rec);
        assert_eq!(
            (back.session.as_str(), back.conversation_id.as_str()),
            ("s-1", "c")
        );
        // The shape before records named their backend reads as the journal reads it.
        let legacy = serde_json::json!({
            "session": "s-2", "started_ms": 5, "mode": "attach",
            "chat": {"conversation_id": "c-old", "jwt": "eyJ.secret.sig"},
        });
        let old: StoredRecord = serde_json::from_str(&legacy.to_string()).unwrap();
        let expected: SessionRecord = serde_json::from_value(legacy).unwrap();
        assert_eq!(old.record().unwrap(), expected);
        assert_eq!(old.conversation_id, "c-old");
        // A record `record()` would not read back does not open: a bad start time or mode.
        for bad in [
            serde_json::json!({"session": "s", "started_ms": "soon", "mode": "start",
                "backend": "guest_chat", "conversation_id": "c", "state": null}),
            serde_json::json!({"session": "s", "started_ms": 5,
                "backend": "guest_chat", "conversation_id": "c", "state": null}),
        ] {
            assert!(
                serde_json::from_str::<StoredRecord>(&bad.to_string()).is_err(),
                "{bad}"
            );
            assert!(serde_json::from_value::<SessionRecord>(bad).is_err());
        }
        // Its Debug names the ids, never the credential.
        assert!(!format!("{stored:?}").contains("secret"));
    }

    #[test]
    fn entries_rest_sealed_whole_and_open_only_where_they_were_written() {
        let keys = Keyring::new(&[3; 32], &[]);
        let e = Entry::new(&record("s-1"), "n1", 9).unwrap();
        let bytes = e.seal("s-1", &keys);
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        for secret in ["secret", "127.0.0.1", "\"c\""] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(Entry::open("s-1", &bytes, &keys).unwrap(), e);
        assert_eq!(
            Entry::open("s-1", &bytes, &keys)
                .unwrap()
                .recovered()
                .unwrap()
                .record,
            record("s-1")
        );
        // Another key, another chat's key: refused.
        assert_eq!(
            Entry::open("s-1", &bytes, &Keyring::new(&[4; 32], &[])),
            Err(Foreign::Unauthenticated)
        );
        assert_eq!(
            Entry::open("s-2", &bytes, &keys),
            Err(Foreign::Unauthenticated)
        );
        // The clear owner or epoch changed: refused.
        let mut wire: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        wire["owner"] = "n2".into();
        let moved = serde_json::to_vec(&wire).unwrap();
        assert_eq!(
            Entry::open("s-1", &moved, &keys),
            Err(Foreign::Unauthenticated)
        );
        wire["owner"] = "n1".into();
        wire["epoch"] = 10.into();
        let moved = serde_json::to_vec(&wire).unwrap();
        assert_eq!(
            Entry::open("s-1", &moved, &keys),
            Err(Foreign::Unauthenticated)
        );
        // The old, partly plain form (an attacker's rewrite) and junk.
        let plain = serde_json::json!({"owner": "n2", "epoch": 1, "record": record("s-1"),
            "last_message_id": null, "last_alive_ms": 0, "ending": null, "leaving": false});
        assert_eq!(
            Entry::open("s-1", &serde_json::to_vec(&plain).unwrap(), &keys),
            Err(Foreign::Shape)
        );
        assert_eq!(Entry::open("s-1", b"{}", &keys), Err(Foreign::Shape));
    }

    #[test]
    fn a_sealed_value_of_another_purpose_is_no_entry() {
        // A forward sealed by the same secret, put where an entry's seal goes, does not open:
        // the keys differ by purpose (the decryption-oracle attack of issue 28).
        let keys = Keyring::new(&[3; 32], &[]);
        let forward = keys.seal(Purpose::Forward, &[b"n1", &9u64.to_be_bytes()], b"{}");
        let wire = serde_json::json!({"owner": "n1", "epoch": 9, "sealed": forward});
        assert_eq!(
            Entry::open("s-1", &serde_json::to_vec(&wire).unwrap(), &keys),
            Err(Foreign::Unauthenticated)
        );
    }
}
