//! A node's life in the cluster: join (a new epoch), renew its announcement, fence itself when
//! renewals stop being acknowledged, follow the nodes and sessions buckets, and take orphaned
//! chats (those whose owner is dead, left, or joined again since), each through a
//! compare-and-set on its entry ([`super::store::KvJournal::take`]).
//!
//! One task per concern, sharing one [`View`] behind a mutex: renewal (and fencing), a watch of
//! each bucket, the claimer, and the relay of lost chats to the supervisor.

use super::ClusterSection;
use super::lease::{self, Announce, Holding, Observer};
use super::seal::{Keyring, Purpose};
use super::store::{KvJournal, Lost};
use super::{Fence, Nats};
use crate::journal::Journal;
use crate::supervisor::Supervisor;
use async_nats::jetstream::kv::Operation;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Claims in flight at once: enough to move thousands of chats in seconds, few enough not to
/// starve the chats already held.
const MAX_CLAIMS: usize = 64;

/// A node's announcement, as a node reads it once opened.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct NodeEntry {
    /// Incarnation.
    pub epoch: u64,
    /// Announcements of this epoch so far: a replayed older one is not news (lease.rs).
    #[serde(default)]
    pub seq: u64,
    /// Left on purpose.
    #[serde(default)]
    pub left: bool,
}

/// How an announcement rests in the nodes bucket: the fields in the clear for operators, and
/// the same sealed with the node's id as context (a node trusts only what opens).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeWire {
    epoch: u64,
    seq: u64,
    left: bool,
    sealed: String,
}

impl NodeEntry {
    /// Sealed for the bucket under `node`.
    pub fn seal(&self, node: &str, keys: &Keyring) -> Vec<u8> {
        let plain = serde_json::to_vec(self).unwrap_or_default();
        serde_json::to_vec(&NodeWire {
            epoch: self.epoch,
            seq: self.seq,
            left: self.left,
            sealed: keys.seal(Purpose::Node, &[node.as_bytes()], &plain),
        })
        .unwrap_or_default()
    }

    /// The announcement stored under `node`, if it opens.
    pub fn open(node: &str, bytes: &[u8], keys: &Keyring) -> Option<NodeEntry> {
        let wire: NodeWire = serde_json::from_slice(bytes).ok()?;
        let plain = keys
            .open(Purpose::Node, &[node.as_bytes()], &wire.sealed)
            .ok()?;
        serde_json::from_slice(&plain).ok()
    }
}

/// One chat as the sessions bucket shows it.
#[derive(Debug, Clone)]
pub struct Info {
    /// Owner (empty: released).
    pub owner: String,
    /// Owner's epoch.
    pub epoch: u64,
    /// Conversation id.
    pub conversation: String,
    /// The entry's generation: a value with a lower one is an older value stored again.
    pub generation: u64,
}

/// What this node knows of the cluster.
#[derive(Debug)]
pub struct View {
    /// Liveness of the nodes.
    pub observer: Observer,
    /// Every chat's owner.
    pub sessions: HashMap<String, Info>,
    /// Conversation id -> session id.
    pub by_conv: HashMap<String, String>,
    /// The sessions watch has caught up since it (re)started.
    pub synced: bool,
}

impl View {
    fn new(lease: Duration) -> Self {
        View {
            observer: Observer::new(lease),
            sessions: HashMap::new(),
            by_conv: HashMap::new(),
            synced: false,
        }
    }

    /// The session id for a session or conversation id.
    pub fn session_of<'a>(&'a self, key: &'a str) -> Option<&'a str> {
        if self.sessions.contains_key(key) {
            return Some(key);
        }
        self.by_conv.get(key).map(String::as_str)
    }

    /// The live owner of `key` (a session or conversation id), if any.
    pub fn owner_of(&mut self, key: &str, now: Instant) -> Option<String> {
        let session = self.session_of(key)?.to_string();
        let info = self.sessions.get(&session)?.clone();
        (self.observer.holding(&info.owner, info.epoch, now) == Holding::Held).then_some(info.owner)
    }

    /// Chats held per live node.
    pub fn load(&mut self, now: Instant) -> HashMap<String, usize> {
        let mut load: HashMap<String, usize> = self
            .observer
            .live(now)
            .into_iter()
            .map(|n| (n, 0))
            .collect();
        for info in self.sessions.values() {
            if let Some(n) = load.get_mut(&info.owner) {
                *n += 1;
            }
        }
        load
    }
}

/// A joined node.
#[derive(Clone)]
pub struct Node {
    /// This node's id.
    pub id: String,
    /// NATS.
    pub nats: Nats,
    /// What it knows.
    pub view: Arc<Mutex<View>>,
    /// Whether it may act.
    pub fence: Fence,
    /// The session journal (KV).
    pub journal: KvJournal,
    /// Seals and opens what crosses or rests in NATS (the secret every node shares).
    pub keys: Keyring,
    /// Announcements made in this epoch (each renewal counts one more).
    seq: Arc<std::sync::atomic::AtomicU64>,
    cfg: ClusterSection,
    lost: Arc<Mutex<Option<mpsc::UnboundedReceiver<Lost>>>>,
    changed: Arc<Notify>,
    /// The nodes watch went silent (it sees this node's own renewals, so silence means stuck):
    /// both watches start over.
    stale: Arc<Notify>,
    cancel: CancellationToken,
}

/// The view, recovered from a poisoned lock (a panic elsewhere leaves it usable).
pub(crate) fn lock(v: &Mutex<View>) -> std::sync::MutexGuard<'_, View> {
    v.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    chrono::Utc::now().timestamp_millis().max(0) as u64
}

impl Node {
    /// Join: announce a new epoch and wait until the announcement is acknowledged (the node
    /// acts from then on), retrying while NATS is unreachable.
    pub async fn join(
        nats: Nats,
        cfg: &ClusterSection,
        keys: Keyring,
    ) -> Result<Node, super::ClusterError> {
        let id = cfg.node();
        let fence = Fence::default();
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        let view = Arc::new(Mutex::new(View::new(cfg.lease)));
        let seen = view.clone();
        let live: super::store::Liveness = Arc::new(move |owner: &str, epoch: u64| {
            lock(&seen).observer.holding(owner, epoch, Instant::now()) == Holding::Held
        });
        let journal = KvJournal::new(
            nats.sessions.clone(),
            keys.clone(),
            id.clone(),
            fence.clone(),
            live,
            lost_tx,
        );
        let node = Node {
            id,
            nats,
            view,
            fence,
            journal,
            keys,
            seq: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            cfg: cfg.clone(),
            lost: Arc::new(Mutex::new(Some(lost_rx))),
            changed: Arc::new(Notify::new()),
            stale: Arc::new(Notify::new()),
            cancel: CancellationToken::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match node.announce_new_epoch().await {
                Ok(epoch) => {
                    tracing::info!(node = %node.id, epoch, "joined the cluster");
                    return Ok(node);
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(error = %e, "cannot join the cluster yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(super::ClusterError::Connect(e)),
            }
        }
    }

    /// Announce `epoch` (`left` when leaving), one more in this epoch's sequence.
    async fn announce(&self, epoch: u64, left: bool) -> Result<Instant, String> {
        let sent = Instant::now();
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
        let bytes = NodeEntry { epoch, seq, left }.seal(&self.id, &self.keys);
        match tokio::time::timeout(
            self.cfg.renew.max(Duration::from_secs(1)),
            self.nats.nodes.put(&self.id, bytes.into()),
        )
        .await
        {
            Ok(Ok(_)) => Ok(sent),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no acknowledgement in time".into()),
        }
    }

    async fn announce_new_epoch(&self) -> Result<u64, String> {
        let read = tokio::time::timeout(Duration::from_secs(5), self.nats.nodes.entry(&self.id))
            .await
            .map_err(|_| "no answer reading this node's entry".to_string())?;
        let now = now_ms();
        let prev = match read {
            // The epoch this node last announced. One that does not open (forged, or sealed with
            // a key no longer configured) still counts as a lower bound when it is no more than a
            // day ahead of the clock: other nodes may remember it, and an epoch that went back
            // would have them ignore this node's renewals. Beyond a day it is someone's forgery.
            Ok(Some(e)) => NodeEntry::open(&self.id, &e.value, &self.keys)
                .map(|n| n.epoch)
                .or_else(|| {
                    serde_json::from_slice::<serde_json::Value>(&e.value)
                        .ok()
                        .and_then(|v| v["epoch"].as_u64())
                        .filter(|&ep| ep <= now.saturating_add(86_400_000))
                })
                .unwrap_or(0),
            Ok(None) => 0,
            Err(e) => return Err(e.to_string()),
        };
        let epoch = prev
            .saturating_add(1)
            .max(now)
            .max(self.fence.epoch().saturating_add(1));
        self.seq.store(0, std::sync::atomic::Ordering::Release);
        let sent = self.announce(epoch, false).await?;
        self.fence.begin(
            epoch,
            lease::acting_until(sent, self.cfg.lease, self.cfg.fence_margin),
        );
        Ok(epoch)
    }

    /// Wait a moment before watching again; false once the node is leaving.
    async fn pause(&self) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = tokio::time::sleep(Duration::from_millis(500)) => true,
        }
    }

    /// Run the node's tasks for `sup` until [`Node::leave`].
    pub fn run(&self, sup: Supervisor) {
        tokio::spawn(self.clone().renewals(sup.clone()));
        tokio::spawn(self.clone().follow_nodes());
        tokio::spawn(self.clone().follow_sessions());
        tokio::spawn(self.clone().claims(sup.clone()));
        if let Some(mut lost) = self.lost.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let cancel = self.cancel.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        l = lost.recv() => match l {
                            Some(Lost(session)) => sup.relinquish(&session).await,
                            None => return,
                        },
                    }
                }
            });
        }
    }

    /// Renew every `renew`; once acting has stopped (no acknowledged renewal for
    /// `lease - fence_margin`), relinquish every chat and join again in a new epoch.
    async fn renewals(self, sup: Supervisor) {
        let mut next = Instant::now();
        loop {
            let fenced_at = self.fence.until().unwrap_or_else(Instant::now);
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
                _ = tokio::time::sleep_until(fenced_at) => {}
            }
            if self.cancel.is_cancelled() {
                return;
            }
            let epoch = self.fence.epoch();
            if self.fence.until().is_none() {
                tracing::error!(
                    node = %self.id, epoch,
                    "fenced: no renewal acknowledged in time; relinquishing every chat"
                );
                metrics::counter!("guestd_cluster_fenced_total").increment(1);
                sup.relinquish_all().await;
                loop {
                    match self.announce_new_epoch().await {
                        Ok(e) => {
                            tracing::info!(node = %self.id, epoch = e, "joined again");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot join again yet");
                            tokio::select! {
                                _ = self.cancel.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                            }
                        }
                    }
                }
                self.changed.notify_one();
                next = Instant::now() + self.cfg.renew;
                continue;
            }
            if Instant::now() >= next {
                next = Instant::now() + self.cfg.renew;
                match self.announce(epoch, false).await {
                    Ok(sent) => {
                        let until =
                            lease::acting_until(sent, self.cfg.lease, self.cfg.fence_margin);
                        if !self.fence.renewed(epoch, until) {
                            tracing::warn!(
                                "a renewal was acknowledged after the fence; joining again"
                            );
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
                }
            }
        }
    }

    async fn follow_nodes(self) {
        loop {
            let watch = self.nats.nodes.watch_with_history(">").await;
            match watch {
                Ok(mut w) => loop {
                    let silence = self.cfg.renew * 3;
                    let next = tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        n = tokio::time::timeout(silence, w.next()) => match n {
                            Ok(n) => n,
                            Err(_) => {
                                tracing::warn!("no renewal seen for a while, not even this node's; watching both buckets again");
                                self.stale.notify_waiters();
                                break;
                            }
                        },
                    };
                    match next {
                        Some(Ok(e)) => {
                            self.apply_node(&e);
                            self.changed.notify_one();
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "nodes watch failed; watching again");
                            break;
                        }
                        None => break,
                    }
                },
                Err(e) => tracing::warn!(error = %e, "cannot watch the nodes bucket yet"),
            }
            if !self.pause().await {
                return;
            }
        }
    }

    async fn follow_sessions(self) {
        loop {
            let watch = self.nats.sessions.watch_with_history(">").await;
            match watch {
                Ok(mut w) => {
                    // A fresh watch replays every entry. The old view stays in use meanwhile
                    // (commands keep finding their chats); once the replay has caught up
                    // (`delta` 0), entries it did not replay are gone and are dropped.
                    lock(&self.view).synced = false;
                    let mut replayed: Option<HashSet<String>> = Some(HashSet::new());
                    loop {
                        let next = tokio::select! {
                            _ = self.cancel.cancelled() => return,
                            _ = self.stale.notified() => break,
                            n = tokio::time::timeout(Duration::from_secs(2), w.next()) => match n {
                                Ok(n) => n,
                                Err(_) => {
                                    // Nothing to replay (or nothing new): in step.
                                    lock(&self.view).synced = true;
                                    continue;
                                }
                            },
                        };
                        match next {
                            Some(Ok(e)) => {
                                let mut v = lock(&self.view);
                                if let Some(seen) = replayed.as_mut() {
                                    seen.insert(e.key.clone());
                                    if e.delta == 0 {
                                        let seen = replayed.take().unwrap_or_default();
                                        let gone: Vec<String> = v
                                            .sessions
                                            .keys()
                                            .filter(|k| !seen.contains(*k))
                                            .cloned()
                                            .collect();
                                        for k in gone {
                                            if let Some(i) = v.sessions.remove(&k) {
                                                if v.by_conv.get(&i.conversation) == Some(&k) {
                                                    v.by_conv.remove(&i.conversation);
                                                }
                                            }
                                        }
                                        v.synced = true;
                                    }
                                }
                                let opened = (e.operation == Operation::Put)
                                    .then(|| self.journal.open(&e.key, &e.value));
                                let known = v.sessions.get(&e.key).map_or(0, |i| i.generation);
                                match &opened {
                                    Some(Ok(entry)) if entry.generation < known => {
                                        // An older value stored again: it moves nothing (its
                                        // owner, if it holds the chat, writes over it).
                                        metrics::counter!("guestd_cluster_forged_total", "what" => "replayed_entry")
                                            .increment(1);
                                        tracing::warn!(key = %e.key, "ignored an older session entry stored again");
                                    }
                                    Some(Ok(entry)) => {
                                        let conv = entry.record.conversation_id.clone();
                                        v.by_conv.insert(conv.clone(), e.key.clone());
                                        v.sessions.insert(
                                            e.key.clone(),
                                            Info {
                                                owner: entry.owner.clone(),
                                                epoch: entry.epoch,
                                                conversation: conv,
                                                generation: entry.generation,
                                            },
                                        );
                                    }
                                    Some(Err(why)) => {
                                        // The view keeps what it knew: a forged value moves no
                                        // chat and hides none.
                                        metrics::counter!("guestd_cluster_forged_total", "what" => "entry")
                                            .increment(1);
                                        tracing::warn!(key = %e.key, error = %why, "ignored a sessions entry")
                                    }
                                    None => {
                                        if let Some(i) = v.sessions.remove(&e.key) {
                                            if v.by_conv.get(&i.conversation) == Some(&e.key) {
                                                v.by_conv.remove(&i.conversation);
                                            }
                                        }
                                    }
                                }
                                drop(v);
                                self.journal.watched(&e.key, e.revision);
                                self.changed.notify_one();
                            }
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "sessions watch failed; watching again");
                                break;
                            }
                            None => break,
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot watch the sessions bucket yet"),
            }
            if !self.pause().await {
                return;
            }
        }
    }

    /// Read `owner`'s announcement from the bucket itself: a watch can deliver late, and a node
    /// must not be counted dead on a stale view. A newer revision counts as seen now.
    async fn refresh(&self, owner: &str) {
        let read = tokio::time::timeout(Duration::from_secs(5), self.nats.nodes.entry(owner)).await;
        if let Ok(Ok(Some(e))) = read {
            self.apply_node(&e);
        }
    }

    /// A node's announcement (from the watch or a direct read), seen now.
    fn apply_node(&self, e: &async_nats::jetstream::kv::Entry) {
        let now = Instant::now();
        let mut v = lock(&self.view);
        match e.operation {
            Operation::Put => match NodeEntry::open(&e.key, &e.value, &self.keys) {
                Some(n) => {
                    let a = Announce {
                        epoch: n.epoch,
                        seq: n.seq,
                        left: n.left,
                    };
                    v.observer.saw(&e.key, a, e.revision, now);
                }
                None => {
                    metrics::counter!("guestd_cluster_forged_total", "what" => "announcement")
                        .increment(1);
                    tracing::error!(
                        key = %e.key,
                        "ALERT: an announcement in the nodes bucket that does not authenticate \
                         (forged, or sealed with a key not configured here); ignored"
                    );
                }
            },
            // A deletion carries no proof of who made it: a node is counted gone only when its
            // renewals stop for a lease (lease.rs), never because its entry was removed.
            Operation::Delete | Operation::Purge => {}
        }
    }

    /// Chats this node should take now: orphans it is preferred for, and its own entries (this
    /// epoch) that no session here holds.
    fn candidates(&self, busy: &HashSet<String>) -> Vec<(String, String)> {
        let now = Instant::now();
        let epoch = self.fence.epoch();
        if !self.fence.acting(epoch) {
            return Vec::new();
        }
        let mut v = lock(&self.view);
        let live = v.observer.live(now);
        let sessions: Vec<(String, Info)> = v
            .sessions
            .iter()
            .filter(|(s, _)| !busy.contains(*s))
            .map(|(s, i)| (s.clone(), i.clone()))
            .collect();
        let mut out = Vec::new();
        for (s, info) in sessions {
            if out.len() + busy.len() >= MAX_CLAIMS {
                break;
            }
            let mine = info.owner == self.id && info.epoch == epoch;
            if mine {
                if !self.journal.holds(&s) {
                    out.push((s, info.owner));
                }
                continue;
            }
            if v.observer.holding(&info.owner, info.epoch, now) == Holding::Orphan
                && lease::preferred(&s, &live) == Some(self.id.as_str())
            {
                out.push((s, info.owner));
            }
        }
        out
    }

    /// Take one chat and resume it; false if it was not taken.
    async fn claim(&self, sup: &Supervisor, session: &str) -> bool {
        let read =
            tokio::time::timeout(Duration::from_secs(5), self.nats.sessions.entry(session)).await;
        let cur = match read {
            Ok(Ok(Some(e))) if e.operation == Operation::Put => e,
            _ => return false,
        };
        let Ok(entry) = self.journal.open(session, &cur.value) else {
            return false;
        };
        // Older than what the watch showed: an older value stored again, not an orphan.
        let seen = lock(&self.view)
            .sessions
            .get(session)
            .map_or(0, |i| i.generation);
        if entry.generation < seen {
            return false;
        }
        let epoch = self.fence.epoch();
        let mine = entry.owner == self.id && entry.epoch == epoch;
        if !mine {
            let now = Instant::now();
            let mut v = lock(&self.view);
            if v.observer.holding(&entry.owner, entry.epoch, now) != Holding::Orphan {
                return false;
            }
        }
        if mine && self.journal.holds(session) {
            return false;
        }
        if sup.runs(session).await {
            // Still winding down here (relinquished a moment ago): next round.
            return false;
        }
        let Some(recovered) = self.journal.take(session, cur.revision, entry).await else {
            return false;
        };
        let started = Instant::now();
        match sup.resume(recovered).await {
            Ok(()) => {
                metrics::counter!("guestd_cluster_chats_taken_total").increment(1);
                tracing::info!(
                    session,
                    took_ms = started.elapsed().as_millis() as u64,
                    "took over a chat"
                );
                true
            }
            Err(e) => {
                tracing::warn!(session, error = %e, "could not resume a taken chat; retrying");
                self.journal.forget(session);
                false
            }
        }
    }

    async fn claims(self, sup: Supervisor) {
        let busy = Arc::new(Mutex::new(HashSet::<String>::new()));
        let done = Arc::new(Notify::new());
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.changed.notified() => {}
                _ = done.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            if !sup.accepting() {
                continue;
            }
            let snapshot = busy.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let first = self.candidates(&snapshot);
            if first.is_empty() {
                continue;
            }
            // Check each owner's newest announcement before counting it dead.
            let owners: HashSet<&str> = first
                .iter()
                .map(|(_, o)| o.as_str())
                .filter(|o| !o.is_empty() && *o != self.id)
                .collect();
            for o in owners {
                self.refresh(o).await;
            }
            for (s, _) in self.candidates(&snapshot) {
                busy.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(s.clone());
                let (me, sup, busy, done) = (self.clone(), sup.clone(), busy.clone(), done.clone());
                tokio::spawn(async move {
                    me.claim(&sup, &s).await;
                    busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&s);
                    done.notify_one();
                });
            }
        }
    }

    /// Leave on purpose (after the sessions have stopped): announce it, so the others take this
    /// node's chats at once instead of after a lease.
    pub async fn leave(&self) {
        let epoch = self.fence.epoch();
        self.fence.revoke();
        self.cancel.cancel();
        match self.announce(epoch, true).await {
            Ok(_) => {
                tracing::info!(node = %self.id, "left the cluster; the other nodes take its chats")
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not announce leaving; the other nodes take this node's chats after a lease")
            }
        }
    }
}
