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
use super::slots::{self, SlotEntry};
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
    /// Chats it held when it announced: how new chats are placed, without a view of every chat.
    #[serde(default)]
    pub held: u64,
    /// This build holds slots (`slots.rs`).
    #[serde(default)]
    pub slots: bool,
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

/// Who holds a slot, as the nodes bucket shows it.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    /// The holder and its epoch.
    pub entry: SlotEntry,
    /// The slot entry's revision (a take or a release is a compare-and-set on it).
    pub revision: u64,
    /// Since when this node, holding it, has seen it empty.
    pub empty_since: Option<Instant>,
    /// When its newest value was written or seen: the holder writes it again before the nodes
    /// bucket's `max_age` (a day) would remove it ([`SLOT_REFRESH`]).
    pub seen: Instant,
}

/// Renewals waiting for their acknowledgement at once, at most. With sane settings there are
/// never more than `(lease - fence_margin) / renew` plus one (4 with the defaults); a renew far
/// shorter than the lease skips renewals rather than pile them up.
const RENEWALS_IN_FLIGHT: usize = 8;

/// How often a holder writes its slot entries again (the nodes bucket keeps a value a day).
const SLOT_REFRESH: Duration = Duration::from_secs(3600);

impl SlotInfo {
    fn new(entry: SlotEntry, revision: u64) -> Self {
        SlotInfo {
            entry,
            revision,
            empty_since: None,
            seen: Instant::now(),
        }
    }

    /// Held by `node` in `epoch`.
    fn held_by(&self, node: &str, epoch: u64) -> bool {
        self.entry.holder == node && self.entry.epoch == epoch
    }
}

/// What this node knows of the cluster: every node and slot (a few entries per node), and the
/// chats of the slots it watches (its own, in steady state; `slots.rs`).
#[derive(Debug)]
pub struct View {
    /// Liveness of the nodes.
    pub observer: Observer,
    /// The chats of the watched slots, by session id.
    pub sessions: HashMap<String, Info>,
    /// Conversation id -> session id, for the same chats.
    pub by_conv: HashMap<String, String>,
    /// Every slot.
    pub slots: HashMap<String, SlotInfo>,
    /// Chats each node said it held in its newest announcement.
    pub held: HashMap<String, u64>,
    /// Nodes that hold slots (a build before slots never takes one: not preferred for any).
    pub slotted: HashSet<String>,
    /// Watches (by filter) that have not caught up since they (re)started.
    pub unsynced: HashSet<String>,
}

impl View {
    fn new(lease: Duration) -> Self {
        View {
            observer: Observer::new(lease),
            sessions: HashMap::new(),
            by_conv: HashMap::new(),
            slots: HashMap::new(),
            held: HashMap::new(),
            slotted: HashSet::new(),
            unsynced: HashSet::from([slots::filter(None)]),
        }
    }

    /// Every watch has caught up with the bucket.
    pub fn synced(&self) -> bool {
        self.unsynced.is_empty()
    }

    /// Forget the chats of `slot` (None: the legacy ones): its watch stopped.
    fn drop_scope(&mut self, slot: Option<&str>) {
        let gone: Vec<String> = self
            .sessions
            .keys()
            .filter(|s| slots::slot_of(s) == slot)
            .cloned()
            .collect();
        for k in gone {
            self.remove(&k);
        }
    }

    fn remove(&mut self, session: &str) {
        if let Some(i) = self.sessions.remove(session) {
            if self.by_conv.get(&i.conversation).map(String::as_str) == Some(session) {
                self.by_conv.remove(&i.conversation);
            }
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

    /// Chats held per live node, as each announced.
    pub fn load(&mut self, now: Instant) -> HashMap<String, usize> {
        self.observer
            .live(now)
            .into_iter()
            .map(|n| {
                let held = self.held.get(&n).copied().unwrap_or(0) as usize;
                (n, held)
            })
            .collect()
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
    /// The slots this node made at its newest join, where its new chats go.
    homes: Arc<Mutex<Vec<String>>>,
    next_home: Arc<std::sync::atomic::AtomicUsize>,
    /// One permit per renewal waiting for its acknowledgement ([`RENEWALS_IN_FLIGHT`]).
    renewals: Arc<tokio::sync::Semaphore>,
    /// A slot was made, taken, given back or changed hands: the watches follow.
    slot_change: Arc<Notify>,
    /// Held while a new epoch is being announced: `leave` waits for a join under way, so no
    /// join is announced after its `left`.
    joining: Arc<tokio::sync::Mutex<()>>,
    /// The newest epoch this node put to the nodes bucket, acknowledged or not: what its `left`
    /// names (one older than what others saw would be ignored).
    announced: Arc<std::sync::atomic::AtomicU64>,
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
            homes: Arc::new(Mutex::new(Vec::new())),
            next_home: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            renewals: Arc::new(tokio::sync::Semaphore::new(RENEWALS_IN_FLIGHT)),
            slot_change: Arc::new(Notify::new()),
            joining: Arc::new(tokio::sync::Mutex::new(())),
            announced: Arc::new(std::sync::atomic::AtomicU64::new(0)),
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

    /// Announce `epoch` (`left` when leaving), one more in this epoch's sequence, waiting
    /// `renew` (at least a second) for the acknowledgement.
    async fn announce(&self, epoch: u64, left: bool) -> Result<Instant, String> {
        self.announce_within(epoch, left, self.cfg.renew.max(Duration::from_secs(1)))
            .await
    }

    /// [`Node::announce`], waiting `wait` for the acknowledgement.
    async fn announce_within(
        &self,
        epoch: u64,
        left: bool,
        wait: Duration,
    ) -> Result<Instant, String> {
        let sent = Instant::now();
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
        let held = self.journal.count() as u64;
        let bytes = NodeEntry {
            epoch,
            seq,
            left,
            held,
            slots: true,
        }
        .seal(&self.id, &self.keys);
        match tokio::time::timeout(wait, self.nats.nodes.put(&self.id, bytes.into())).await {
            Ok(Ok(_)) => Ok(sent),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no acknowledgement in time".into()),
        }
    }

    async fn announce_new_epoch(&self) -> Result<u64, String> {
        let _joining = self.joining.lock().await;
        // A leave stops a join at once (it waits for the lock), up to the announcement itself;
        // the cancel is polled first, so a join after a leave reads nothing.
        let leaving = || Err::<u64, String>("leaving".into());
        let read = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return leaving(),
            r = tokio::time::timeout(Duration::from_secs(5), self.nats.nodes.entry(&self.id)) => r,
        }
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
        // Above every epoch this node put, acknowledged or not (the fence's among them: a fence
        // begins only in an epoch put below): a put whose acknowledgement timed out may still
        // have landed, and a retry must not repeat or undercut it.
        let epoch = prev.saturating_add(1).max(now).max(
            self.announced
                .load(std::sync::atomic::Ordering::Acquire)
                .saturating_add(1),
        );
        // The previous epoch's home slots are others' to take now: no new chat goes there.
        self.homes.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // This epoch's homes before its announcement: once others see the node, it can take
        // chats at once (a slot whose holder's epoch is not seen yet counts as held for a
        // lease, and one of an epoch never announced is taken and given back after that).
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return leaving(),
            _ = self.make_homes(epoch) => {}
        }
        // A node leaving does not announce a join: its `left` is its last word. Past this
        // point the epoch counts as announced (its put may land even if unacknowledged), and
        // its sequence starts: a `left` after it names this epoch, one more in its sequence.
        if self.cancel.is_cancelled() {
            return leaving();
        }
        self.seq.store(0, std::sync::atomic::Ordering::Release);
        self.announced
            .fetch_max(epoch, std::sync::atomic::Ordering::AcqRel);
        let sent = self.announce(epoch, false).await?;
        if self.cancel.is_cancelled() {
            return leaving();
        }
        self.fence.begin(
            epoch,
            lease::acting_until(sent, self.cfg.lease, self.cfg.fence_margin),
        );
        self.slot_change.notify_one();
        Ok(epoch)
    }

    /// Make this epoch's home slots (`slots.rs`). A slot that cannot be made is left out: with
    /// none, new chats get ids without a slot and rest where every node watches them.
    async fn make_homes(&self, epoch: u64) {
        let mut homes = self.new_slots(epoch, slots::SLOTS_PER_NODE).await;
        if homes.len() < slots::SLOTS_PER_NODE {
            homes.extend(
                self.new_slots(epoch, slots::SLOTS_PER_NODE - homes.len())
                    .await,
            );
        }
        if homes.len() < slots::SLOTS_PER_NODE {
            tracing::warn!(
                made = homes.len(),
                "fewer home slots than wanted: new chats without a slot are watched by every node"
            );
        }
        *self.homes.lock().unwrap_or_else(|e| e.into_inner()) = homes;
        self.slot_change.notify_one();
    }

    /// Make `want` new slots held by this node in `epoch`, all at once, within a third of a
    /// lease (renewals wait for this after a fence); the ones made.
    async fn new_slots(&self, epoch: u64, want: usize) -> Vec<String> {
        let entry = SlotEntry {
            holder: self.id.clone(),
            epoch,
        };
        let wait = (self.cfg.lease / 3).clamp(Duration::from_millis(500), Duration::from_secs(5));
        let made = futures::future::join_all((0..want).map(|_| {
            let slot = slots::new_slot();
            let put = self
                .nats
                .nodes
                .create(slots::entry_key(&slot), entry.seal(&slot, &self.keys));
            async move { (slot, tokio::time::timeout(wait, put).await) }
        }))
        .await;
        let mut out = Vec::new();
        for (slot, r) in made {
            match r {
                Ok(Ok(revision)) => {
                    lock(&self.view)
                        .slots
                        .insert(slot.clone(), SlotInfo::new(entry.clone(), revision));
                    out.push(slot);
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "could not make a slot"),
                Err(_) => tracing::warn!("no answer making a slot"),
            }
        }
        if !out.is_empty() {
            self.slot_change.notify_one();
        }
        out
    }

    /// Make more home slots in this epoch when fewer than [`slots::SLOTS_PER_NODE`] are held
    /// (some could not be made at the join, or were taken while the announcement was late):
    /// without them, new chats get ids every node watches.
    async fn top_up_homes(&self) {
        let epoch = self.fence.epoch();
        if !self.fence.acting(epoch) {
            return;
        }
        let held = self.held_homes(epoch);
        if held.len() >= slots::SLOTS_PER_NODE {
            return;
        }
        let made = self
            .new_slots(epoch, slots::SLOTS_PER_NODE - held.len())
            .await;
        if made.is_empty() {
            return;
        }
        tracing::info!(made = made.len(), "made more home slots");
        let mut homes = held;
        homes.extend(made);
        if self.fence.epoch() == epoch {
            *self.homes.lock().unwrap_or_else(|e| e.into_inner()) = homes;
        }
    }

    /// A session id for a new chat on this node: in one of its home slots, in turn.
    /// A home the view no longer shows held by this node in its epoch (taken, or expired)
    /// is passed over: a chat must rest where its holder watches.
    pub fn new_session_id(&self) -> Option<String> {
        let held = self.held_homes(self.fence.epoch());
        if held.is_empty() {
            return None;
        }
        let i = self
            .next_home
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(slots::session_in(&held[i % held.len()]))
    }

    /// This node's home slots that the view shows it holding in `epoch`.
    fn held_homes(&self, epoch: u64) -> Vec<String> {
        let homes = self.homes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let v = lock(&self.view);
        homes
            .into_iter()
            .filter(|h| v.slots.get(h).is_some_and(|i| i.held_by(&self.id, epoch)))
            .collect()
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
        tokio::spawn(self.clone().follow_slots());
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
                    // A node leaving does not join again (its `left` is its last word).
                    if self.cancel.is_cancelled() {
                        return;
                    }
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
                // Each renewal waits for its acknowledgement until acting would stop, beside
                // the next ones (at most (lease - fence_margin) / renew + 1 in flight): one
                // acknowledged late (JetStream busy with a burst of writes) still proves the
                // node alive from when it was sent, which is all the lease counts from.
                let wait = self
                    .fence
                    .until()
                    .map_or(Duration::ZERO, |t| {
                        t.saturating_duration_since(Instant::now())
                    })
                    .max(self.cfg.renew)
                    .max(Duration::from_secs(1));
                let Ok(permit) = self.renewals.clone().try_acquire_owned() else {
                    tracing::warn!("renewals are not acknowledged; skipping one");
                    continue;
                };
                let me = self.clone();
                tokio::spawn(async move {
                    // A node leaving sends `left` last: no renewal of this loop after it.
                    let r = if me.cancel.is_cancelled() {
                        Err("leaving".to_string())
                    } else {
                        me.announce_within(epoch, false, wait).await
                    };
                    drop(permit);
                    match r {
                        Ok(sent) => {
                            let until =
                                lease::acting_until(sent, me.cfg.lease, me.cfg.fence_margin);
                            if !me.fence.renewed(epoch, until) && !me.cancel.is_cancelled() {
                                tracing::warn!(
                                    "a renewal was acknowledged after the fence; joining again"
                                );
                            }
                        }
                        Err(_) if me.cancel.is_cancelled() => {}
                        Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
                    }
                });
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

    /// The slots this node watches now: those whose entry names it in its current epoch.
    fn watched_slots(&self) -> HashSet<String> {
        let epoch = self.fence.epoch();
        lock(&self.view)
            .slots
            .iter()
            .filter(|(_, i)| i.held_by(&self.id, epoch))
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Keep one watch per slot this node holds, plus one of the legacy entries; give back a
    /// slot taken from another node once it has stayed empty (`slots.rs`).
    async fn follow_slots(self) {
        let mut running: HashMap<Option<String>, CancellationToken> = HashMap::new();
        loop {
            let mut want: HashSet<Option<String>> =
                self.watched_slots().into_iter().map(Some).collect();
            want.insert(None);
            for scope in &want {
                if !running.contains_key(scope) {
                    let stop = self.cancel.child_token();
                    running.insert(scope.clone(), stop.clone());
                    // Not in step until its watch exists and has replayed (or found nothing):
                    // a slot whose watch cannot be made is never taken for empty.
                    lock(&self.view)
                        .unsynced
                        .insert(slots::filter(scope.as_deref()));
                    tokio::spawn(self.clone().follow(scope.clone(), stop));
                }
            }
            let stopped: Vec<Option<String>> = running
                .keys()
                .filter(|s| !want.contains(*s))
                .cloned()
                .collect();
            for scope in stopped {
                if let Some(stop) = running.remove(&scope) {
                    stop.cancel();
                }
                let mut v = lock(&self.view);
                v.drop_scope(scope.as_deref());
                v.unsynced.remove(&slots::filter(scope.as_deref()));
            }
            metrics::gauge!("guestd_cluster_slots_watched").set((running.len() - 1) as f64);
            self.give_back_empty_slots().await;
            self.refresh_slots().await;
            self.top_up_homes().await;
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.slot_change.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Give back the slots this node took from others (not its home slots) that have been
    /// empty for [`slots::EMPTY_FOR_LEASES`] leases.
    async fn give_back_empty_slots(&self) {
        let homes: HashSet<String> = self
            .homes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        let held = self.watched_slots();
        let now = Instant::now();
        let quiet = self.cfg.lease * slots::EMPTY_FOR_LEASES;
        let mut ripe = Vec::new();
        {
            let mut v = lock(&self.view);
            let synced = v.synced();
            let busy: HashSet<&str> = v
                .sessions
                .keys()
                .filter_map(|s| slots::slot_of(s))
                .collect();
            let busy: HashSet<String> = busy.into_iter().map(str::to_string).collect();
            for slot in held.iter().filter(|s| !homes.contains(*s)) {
                let Some(info) = v.slots.get_mut(slot) else {
                    continue;
                };
                if !synced || busy.contains(slot) {
                    info.empty_since = None;
                    continue;
                }
                let since = *info.empty_since.get_or_insert(now);
                if now.duration_since(since) >= quiet {
                    ripe.push((slot.clone(), info.revision));
                }
            }
        }
        for (slot, revision) in ripe {
            // Out of the view first, so this node's own watch does not take the removal for
            // someone else's (and write the slot again); back in if it did not go.
            let Some(info) = lock(&self.view).slots.remove(&slot) else {
                continue;
            };
            let gone = tokio::time::timeout(
                Duration::from_secs(5),
                self.nats
                    .nodes
                    .purge_expect_revision(slots::entry_key(&slot), Some(revision)),
            )
            .await;
            if let Ok(Ok(())) = gone {
                tracing::info!(slot, "gave back an empty slot taken from another node");
            } else {
                let mut v = lock(&self.view);
                if !v.slots.contains_key(&slot) {
                    v.slots.insert(slot.clone(), info);
                }
            }
            self.slot_change.notify_one();
        }
    }

    /// Write again the entries of the slots this node holds that were last written
    /// [`SLOT_REFRESH`] ago, so the nodes bucket's `max_age` never removes a held slot. One
    /// that is gone already is made again.
    async fn refresh_slots(&self) {
        let now = Instant::now();
        let stale: Vec<(String, SlotInfo)> = {
            let epoch = self.fence.epoch();
            lock(&self.view)
                .slots
                .iter()
                .filter(|(_, i)| {
                    i.held_by(&self.id, epoch) && now.duration_since(i.seen) >= SLOT_REFRESH
                })
                .map(|(s, i)| (s.clone(), i.clone()))
                .collect()
        };
        for (slot, info) in stale {
            let bytes = info.entry.seal(&slot, &self.keys);
            let key = slots::entry_key(&slot);
            let wrote = match self.nats.nodes.entry(key.clone()).await {
                Ok(Some(e)) if e.operation == Operation::Put && e.revision == info.revision => {
                    self.nats.nodes.update(key, bytes, info.revision).await.ok()
                }
                Ok(Some(e)) if e.operation == Operation::Put => None,
                Ok(_) => self.nats.nodes.create(key, bytes).await.ok(),
                Err(_) => None,
            };
            if let Some(revision) = wrote {
                if let Some(i) = lock(&self.view).slots.get_mut(&slot) {
                    i.revision = i.revision.max(revision);
                    i.seen = Instant::now();
                }
            }
        }
    }

    /// Follow the entries of `slot` (None: the legacy ones) into the view until `stop`.
    async fn follow(self, slot: Option<String>, stop: CancellationToken) {
        let filter = slots::filter(slot.as_deref());
        self.follow_until(slot, &filter, &stop).await;
        // Stopped: whatever this watch put in the view goes (`follow_slots` drops it too; a
        // change applied meanwhile is refused under the lock, as `stop` is checked there).
        lock(&self.view).unsynced.remove(&filter);
    }

    async fn follow_until(&self, slot: Option<String>, filter: &str, stop: &CancellationToken) {
        let filter = filter.to_string();
        loop {
            let watch = tokio::select! {
                _ = stop.cancelled() => return,
                w = self.nats.sessions.watch_with_history(&filter) => w,
            };
            match watch {
                Ok(mut w) => {
                    // A fresh watch replays every entry. The old view stays in use meanwhile
                    // (commands keep finding their chats); once the replay has caught up
                    // (`delta` 0), entries it did not replay are gone and are dropped.
                    {
                        let mut v = lock(&self.view);
                        if stop.is_cancelled() {
                            return;
                        }
                        v.unsynced.insert(filter.clone());
                    }
                    let mut replayed: Option<HashSet<String>> = Some(HashSet::new());
                    loop {
                        let next = tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = self.stale.notified() => break,
                            n = tokio::time::timeout(Duration::from_secs(2), w.next()) => match n {
                                Ok(n) => n,
                                Err(_) => {
                                    // Nothing to replay (or nothing new): in step.
                                    lock(&self.view).unsynced.remove(&filter);
                                    continue;
                                }
                            },
                        };
                        match next {
                            Some(Ok(e)) => {
                                let Some(session) = slots::session_of_key(&e.key) else {
                                    continue;
                                };
                                let mut v = lock(&self.view);
                                if stop.is_cancelled() {
                                    return;
                                }
                                if let Some(seen) = replayed.as_mut() {
                                    seen.insert(session.to_string());
                                    if e.delta == 0 {
                                        let seen = replayed.take().unwrap_or_default();
                                        let gone: Vec<String> = v
                                            .sessions
                                            .keys()
                                            .filter(|k| {
                                                slots::slot_of(k) == slot.as_deref()
                                                    && !seen.contains(*k)
                                            })
                                            .cloned()
                                            .collect();
                                        for k in gone {
                                            v.remove(&k);
                                        }
                                        v.unsynced.remove(&filter);
                                    }
                                }
                                let opened = (e.operation == Operation::Put)
                                    .then(|| self.journal.open(session, &e.value));
                                let known = v.sessions.get(session).map_or(0, |i| i.generation);
                                match &opened {
                                    Some(Ok(entry)) if entry.generation < known => {
                                        // An older value stored again: it moves nothing (its
                                        // owner, if it holds the chat, writes over it).
                                        metrics::counter!("guestd_cluster_forged_total", "what" => "replayed_entry")
                                            .increment(1);
                                        tracing::warn!(key = %e.key, "ignored an older session entry stored again");
                                    }
                                    Some(Ok(entry)) => {
                                        let whose = if entry.owner == self.id {
                                            "own"
                                        } else {
                                            "other"
                                        };
                                        metrics::counter!("guestd_cluster_entries_seen_total", "whose" => whose)
                                            .increment(1);
                                        let conv = entry.record.conversation_id.clone();
                                        v.by_conv.insert(conv.clone(), session.to_string());
                                        v.sessions.insert(
                                            session.to_string(),
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
                                    None => v.remove(session),
                                }
                                drop(v);
                                self.journal.watched(session, e.revision);
                                self.changed.notify_one();
                            }
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, filter, "sessions watch failed; watching again");
                                break;
                            }
                            None => break,
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, filter, "cannot watch the sessions bucket yet")
                }
            }
            let again = tokio::select! {
                _ = stop.cancelled() => false,
                go = self.pause() => go,
            };
            if !again {
                return;
            }
        }
    }

    /// Read `owner`'s announcement from the bucket itself: a watch can deliver late, and a node
    /// must not be counted dead on a stale view. A newer revision counts as seen now.
    pub(crate) async fn refresh(&self, owner: &str) {
        let read = tokio::time::timeout(Duration::from_secs(5), self.nats.nodes.entry(owner)).await;
        if let Ok(Ok(Some(e))) = read {
            self.apply_node(&e);
        }
    }

    /// A node's announcement (from the watch or a direct read), seen now.
    fn apply_node(&self, e: &async_nats::jetstream::kv::Entry) {
        if let Some(slot) = slots::slot_of_entry_key(&e.key) {
            return self.apply_slot(slot, e);
        }
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
                    if v.observer.saw(&e.key, a, e.revision, now) {
                        v.held.insert(e.key.clone(), n.held);
                        if n.slots {
                            v.slotted.insert(e.key.clone());
                        } else {
                            v.slotted.remove(&e.key);
                        }
                    }
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

    /// A slot's entry (from the watch or a direct read).
    fn apply_slot(&self, slot: &str, e: &async_nats::jetstream::kv::Entry) {
        let mut v = lock(&self.view);
        match e.operation {
            Operation::Put => match SlotEntry::open(slot, &e.value, &self.keys) {
                Some(entry) => {
                    let newer = v.slots.get(slot).is_none_or(|i| i.revision < e.revision);
                    if newer {
                        v.slots
                            .insert(slot.to_string(), SlotInfo::new(entry, e.revision));
                        self.slot_change.notify_one();
                    }
                }
                None => {
                    metrics::counter!("guestd_cluster_forged_total", "what" => "slot").increment(1);
                    tracing::error!(
                        key = %e.key,
                        "ALERT: a slot entry in the nodes bucket that does not authenticate; ignored"
                    );
                }
            },
            Operation::Delete | Operation::Purge => {
                let Some(info) = v.slots.get(slot) else {
                    return;
                };
                if info.revision >= e.revision {
                    return;
                }
                let mine = info.held_by(&self.id, self.fence.epoch());
                if !mine {
                    v.slots.remove(slot);
                    self.slot_change.notify_one();
                    return;
                }
                // Removed by someone else while this node holds it: its chats would go
                // unwatched. Made again.
                metrics::counter!("guestd_cluster_slot_conflicts_total").increment(1);
                tracing::error!(
                    slot,
                    "ALERT: a slot this node holds was removed by something other than this node; \
                     writing it again"
                );
                let entry = info.entry.clone();
                drop(v);
                let (nodes, keys, view, slot) = (
                    self.nats.nodes.clone(),
                    self.keys.clone(),
                    self.view.clone(),
                    slot.to_string(),
                );
                tokio::spawn(async move {
                    let bytes = entry.seal(&slot, &keys);
                    let made = tokio::time::timeout(
                        Duration::from_secs(5),
                        nodes.create(slots::entry_key(&slot), bytes),
                    )
                    .await;
                    if let Ok(Ok(revision)) = made {
                        if let Some(i) = lock(&view).slots.get_mut(&slot) {
                            i.revision = i.revision.max(revision);
                        }
                    }
                });
            }
        }
    }

    /// Slots this node should take now: those whose holder is dead and for which this node is
    /// the preferred live one. With the holder and the revision seen.
    fn slot_candidates(&self) -> Vec<(String, String, u64)> {
        let now = Instant::now();
        if !self.fence.acting(self.fence.epoch()) {
            return Vec::new();
        }
        let mut v = lock(&self.view);
        let live: Vec<String> = v
            .observer
            .live(now)
            .into_iter()
            .filter(|n| v.slotted.contains(n))
            .collect();
        let all: Vec<(String, SlotInfo)> = v
            .slots
            .iter()
            .map(|(s, i)| (s.clone(), i.clone()))
            .collect();
        all.into_iter()
            .filter(|(s, i)| {
                v.observer.holding(&i.entry.holder, i.entry.epoch, now) == Holding::Orphan
                    && lease::preferred(s, &live) == Some(self.id.as_str())
            })
            .map(|(s, i)| (s, i.entry.holder, i.revision))
            .collect()
    }

    /// Take `slot` (seen at `revision`) by compare-and-set; its watch starts at once.
    async fn take_slot(&self, slot: &str, revision: u64) {
        let entry = SlotEntry {
            holder: self.id.clone(),
            epoch: self.fence.epoch(),
        };
        let took = tokio::time::timeout(
            Duration::from_secs(5),
            self.nats.nodes.update(
                slots::entry_key(slot),
                entry.seal(slot, &self.keys),
                revision,
            ),
        )
        .await;
        if let Ok(Ok(revision)) = took {
            tracing::info!(slot, "took a slot whose holder is gone");
            metrics::counter!("guestd_cluster_slots_taken_total").increment(1);
            {
                // A newer value the watch applied meanwhile stays.
                let mut v = lock(&self.view);
                if v.slots.get(slot).is_none_or(|i| i.revision < revision) {
                    v.slots
                        .insert(slot.to_string(), SlotInfo::new(entry, revision));
                }
            }
            self.slot_change.notify_one();
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
            // A chat in a slot goes to the slot's holder; a legacy one (no slot) to the live
            // node preferred for it, as every node watches those.
            let ours = match slots::slot_of(&s) {
                Some(slot) => v
                    .slots
                    .get(slot)
                    .is_some_and(|i| i.held_by(&self.id, epoch)),
                None => lease::preferred(&s, &live) == Some(self.id.as_str()),
            };
            if ours && v.observer.holding(&info.owner, info.epoch, now) == Holding::Orphan {
                out.push((s, info.owner));
            }
        }
        out
    }

    /// Take one chat and resume it; false if it was not taken.
    async fn claim(&self, sup: &Supervisor, session: &str) -> bool {
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            self.nats.sessions.entry(slots::bucket_key(session)),
        )
        .await;
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
            let slots = self.slot_candidates();
            if !slots.is_empty() {
                // Check each holder's newest announcement before counting it dead.
                let holders: HashSet<&str> = slots.iter().map(|(_, h, _)| h.as_str()).collect();
                for h in holders {
                    self.refresh(h).await;
                }
                for (slot, _, revision) in self.slot_candidates() {
                    self.take_slot(&slot, revision).await;
                }
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
        self.fence.close();
        self.cancel.cancel();
        // A join under way stops (it gives up at `cancel` until its announcement, which waits
        // at most `max(renew, 1 s)`); the fence is closed, so it cannot begin acting again
        // however late it runs. `left` names the newest epoch put, acknowledged or not.
        let joining = self.joining.lock();
        let wait = self.cfg.renew.max(Duration::from_secs(1)) + Duration::from_secs(1);
        let _joined = tokio::time::timeout(wait, joining).await;
        let epoch = self.announced.load(std::sync::atomic::Ordering::Acquire);
        // Renewals in flight land before `left` (for up to `renew`), so none is stored after it
        // and read as this node still here.
        let all = self.renewals.acquire_many(RENEWALS_IN_FLIGHT as u32);
        let _ = tokio::time::timeout(self.cfg.renew, all).await;
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
