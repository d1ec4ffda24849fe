//! Commands in cluster mode. A command for an existing chat runs on the chat's owner; `start`
//! (and `attach` of a chat nobody holds) on the least-loaded live node. Nodes forward to
//! `<prefix>.cmd.<node>`.
//!
//! **A forward is sealed** ([`Purpose::Forward`]) with the target node and its epoch as context
//! and the time it was made inside: a node runs only forwards sealed for itself in its current
//! epoch and made within [`FORWARD_FRESH`] (clocks may differ by less than that). Its reply is
//! sealed too ([`Purpose::Reply`]), bound to the forward's id, so what crosses `_INBOX` is
//! unreadable and unforgeable without the cluster secret.
//!
//! A forward carries an id, and the node that runs it keeps each id's reply for
//! [`REPLIES_KEPT`] (longer than a forward stays fresh): a forward that got no answer in time
//! (the node was reconnecting to NATS, say) is sent again with the same id and gets the first
//! run's reply, never a second run (a `start` run twice would create two chats); a captured
//! forward replayed gets the same (sealed) reply and runs nothing. A node's refusal (it cannot
//! open a forward sealed for an epoch it is not acting in: the sender's view lags, or the node
//! is between epochs) has the sender read the node's announcement from the bucket again and try
//! after a pause ([`refused_pause`]). After [`FORWARD_TRIES`] the caller gets `unreachable`.
//!
//! Plain command lines (the stdin form) on `<prefix>.cmd`, served by a queue group of every
//! node, are off unless `cluster.nats_commands` is set; then each needs the HTTP API's token in
//! an `Authorization: Bearer` header, and NATS permissions must keep others from subscribing to
//! the subject (docs/operations.md, "Threat model").

use super::node::{Node, lock};
use super::seal::{Keyring, Purpose};
use crate::command::Command;
use crate::control;
use crate::secret::Secret;
use crate::session::Open;
use crate::supervisor::Route;
use crate::supervisor::{Supervisor, SupervisorError, static_code};
use futures::StreamExt;
use futures::future::BoxFuture;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long one try of a forward waits for its reply.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Tries of one forward (same id): a `start` waits for the platform's create, which has its own
/// retries.
const FORWARD_TRIES: usize = 8;
/// No try of a forward is sent later than this after it was made, whatever its tries met
/// (timeouts, refusals and the re-reads and pauses after them).
const FORWARD_SPAN: Duration = Duration::from_secs(40);
/// A node's announcement is read again after a refusal at most this often (per target node):
/// forwards refused together cost one read.
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// How long a node keeps a forward's reply for a repeated try.
const REPLIES_KEPT: Duration = Duration::from_secs(300);
/// How old a forward may be when it arrives: its tries are sent within [`FORWARD_SPAN`] (40 s)
/// and each lands within [`FORWARD_TIMEOUT`], so the last try tolerates 45 s of clock
/// difference between nodes.
pub const FORWARD_FRESH: Duration = Duration::from_secs(90);
/// Commands from NATS run at once on one node; more wait (a flood costs no memory).
const MAX_NATS_IN_FLIGHT: usize = 256;
/// How long a placement counts toward a node's load before the sessions bucket shows it.
const PLACED_FOR: Duration = Duration::from_secs(3);

/// Places and forwards commands.
pub struct Router {
    /// This node: its id, view, keys, NATS handles, and the home slots that name new chats.
    me: Arc<Node>,
    /// When each node's announcement was last read again after a refusal.
    refreshed: Arc<Mutex<HashMap<String, Instant>>>,
    placed: Mutex<VecDeque<(Instant, String)>>,
    /// Nodes that answered no responders lately (reconnecting to NATS), with when.
    avoid: Mutex<Vec<(Instant, String)>>,
}

impl Router {
    /// For `node`, forwarding on `<cmd>.<node>`.
    pub fn new(node: &Node) -> Self {
        Router {
            me: Arc::new(node.clone()),
            refreshed: Arc::default(),
            placed: Mutex::new(VecDeque::new()),
            avoid: Mutex::new(Vec::new()),
        }
    }

    /// The least-loaded live node: what each announced (this node: what it holds now), plus
    /// the placements made since.
    fn least_loaded(&self) -> Option<String> {
        let now = Instant::now();
        let mut load = lock(&self.me.view).load(now);
        // This node's own count is known exactly, and it is a candidate even before its first
        // announcement has come back through the watch.
        if self.me.fence.acting(self.me.fence.epoch()) {
            load.insert(self.me.id.clone(), self.me.journal.count());
        } else {
            load.remove(&self.me.id);
        }
        let mut placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        while placed
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > PLACED_FOR)
        {
            placed.pop_front();
        }
        for (_, n) in placed.iter() {
            if let Some(l) = load.get_mut(n) {
                *l += 1;
            }
        }
        {
            let mut avoid = self.avoid.lock().unwrap_or_else(|e| e.into_inner());
            avoid.retain(|(t, _)| now.duration_since(*t) < PLACED_FOR);
            if avoid.len() < load.len() {
                for (_, n) in avoid.iter() {
                    load.remove(n);
                }
            }
        }
        let best = load
            .into_iter()
            .min_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)))
            .map(|(n, _)| n)?;
        placed.push_back((now, best.clone()));
        Some(best)
    }

    fn owner(&self, key: &str) -> Option<String> {
        lock(&self.me.view).owner_of(key, Instant::now())
    }

    /// The sessions bucket's own entry for a session id the view does not know (yet): a watch
    /// that restarted after a NATS server died can lag well behind the bucket.
    async fn entry(&self, key: &str) -> Option<super::store::Entry> {
        if !key.starts_with("s-") || !super::valid_token(key) {
            return None;
        }
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            self.me.nats.sessions.entry(super::slots::bucket_key(key)),
        )
        .await;
        match read {
            Ok(Ok(Some(e))) if e.operation == async_nats::jetstream::kv::Operation::Put => {
                super::store::Entry::open(key, &e.value, &self.me.keys).ok()
            }
            _ => None,
        }
    }

    /// The entry of the chat `key` names: a session id's own entry, or for a conversation id
    /// the entry the key index names, if it is that conversation's (the index is not trusted
    /// further than that: the entry is sealed, the index is not).
    async fn entry_of(&self, key: &str) -> Option<super::store::Entry> {
        if key.starts_with("s-") {
            return self.entry(key).await;
        }
        let index = super::slots::index_key(&self.me.keys, key);
        let read =
            tokio::time::timeout(Duration::from_secs(5), self.me.nats.sessions.get(index)).await;
        let session = match read {
            Ok(Ok(Some(v))) => String::from_utf8(v.to_vec()).ok()?,
            _ => return None,
        };
        let e = self.entry(&session).await?;
        (e.record.conversation_id == key).then_some(e)
    }

    /// The live owner of the chat `key` names, read from the bucket.
    async fn owner_read(&self, key: &str) -> Option<String> {
        let e = self.entry_of(key).await?;
        let mut v = lock(&self.me.view);
        (v.observer.holding(&e.owner, e.epoch, Instant::now()) == super::lease::Holding::Held)
            .then_some(e.owner)
    }

    async fn owner_or_read(&self, key: &str) -> Option<String> {
        if let Some(o) = self.owner(key) {
            return Some(o);
        }
        let known = lock(&self.me.view).session_of(key).is_some();
        if known {
            return None;
        }
        self.owner_read(key).await
    }
}

impl Route for Router {
    fn session_id(&self) -> Option<String> {
        self.me.new_session_id()
    }

    fn place<'a>(&'a self, cmd: &'a Command) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            let node = match cmd {
                Command::Open(o) => match (o.open, &o.key) {
                    (Open::Attach, Some(key)) => match self.owner(key) {
                        Some(o) => Some(o),
                        None => match self.owner_read(key).await {
                            Some(o) => Some(o),
                            None => self.least_loaded(),
                        },
                    },
                    _ => self.least_loaded(),
                },
                Command::Send { session, .. }
                | Command::Typing { session }
                | Command::Leave { session }
                | Command::Get { session }
                | Command::StartNew { session } => self.owner_or_read(session).await,
                Command::List | Command::Status { .. } => None,
            }?;
            (node != self.me.id).then_some(node)
        })
    }

    fn moving<'a>(&'a self, cmd: &'a Command) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            match cmd {
                Command::Send { session, .. }
                | Command::Typing { session }
                | Command::Leave { session }
                | Command::Get { session }
                | Command::StartNew { session } => {
                    {
                        let v = lock(&self.me.view);
                        // Not in step with the bucket yet (just reconnected): it may exist.
                        if v.session_of(session).is_some() || !v.synced() {
                            return true;
                        }
                    }
                    self.entry_of(session).await.is_some()
                }
                _ => false,
            }
        })
    }

    fn unreachable(&self, node: &str) {
        self.avoid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((Instant::now(), node.to_string()));
    }

    fn forward(
        &self,
        node: String,
        cmd: &Command,
    ) -> BoxFuture<'static, Result<serde_json::Value, SupervisorError>> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let made = now_ms();
        let cmd = cmd.clone();
        let me = self.me.clone();
        let refreshed = self.refreshed.clone();
        Box::pin(async move {
            let subject = format!("{}.{node}", me.nats.names.cmd);
            let begun = Instant::now();
            let mut last = String::new();
            let mut refusals = 0u32;
            for n in 0..FORWARD_TRIES {
                if n > 0 {
                    metrics::counter!("guestd_cluster_forward_retries_total").increment(1);
                }
                // Sealed for the node's epoch as the view knows it at each try: a node that
                // joined again meanwhile (after a fence) takes the retry, same id and time.
                let epoch = lock(&me.view).observer.epoch_of(&node).unwrap_or(0);
                let sealed = seal_forward(&me.keys, &node, epoch, &id, made, &cmd);
                match try_forward(&me.nats.client, &subject, &sealed, &me.keys, &id).await {
                    Try::Done(r) => return r,
                    Try::NoResponders => {
                        // Nobody got it: the caller may place it elsewhere.
                        return Err(SupervisorError::Remote(
                            "no_responders",
                            format!("node {node}: no responders"),
                        ));
                    }
                    Try::Refused(why) => {
                        last = why;
                        if n + 1 == FORWARD_TRIES {
                            break;
                        }
                        // The node could not open it: sealed for an epoch it is not acting in.
                        // Either the view's watch lags (after a NATS server died, say), so the
                        // bucket is read again, or the node is between epochs (its new one not
                        // announced yet), so the next try waits for it, paced.
                        let due = {
                            let mut r = refreshed.lock().unwrap_or_else(|e| e.into_inner());
                            let now = Instant::now();
                            r.retain(|_, t| now.duration_since(*t) < REFRESH_EVERY);
                            r.insert(node.clone(), now).is_none()
                        };
                        if due {
                            let left = FORWARD_SPAN.saturating_sub(begun.elapsed());
                            let _ = tokio::time::timeout(left, me.refresh(&node)).await;
                        }
                        let left = FORWARD_SPAN.saturating_sub(begun.elapsed());
                        tokio::time::sleep(refused_pause(refusals).min(left)).await;
                        refusals += 1;
                    }
                    Try::Again(why) => last = why,
                }
                if begun.elapsed() >= FORWARD_SPAN {
                    break;
                }
            }
            Err(SupervisorError::Remote(
                "unreachable",
                format!("node {node} did not answer: {last}"),
            ))
        })
    }
}

/// How long to wait after the `n`th refusal of a forward before the next try: 250 ms doubling
/// up to [`FORWARD_TIMEOUT`] (17.75 s over 7 waits), so a node's new epoch has time to be
/// announced before the tries run out.
fn refused_pause(n: u32) -> Duration {
    (Duration::from_millis(250) * 2u32.saturating_pow(n.min(5))).min(FORWARD_TIMEOUT)
}

/// How one try of a forward went.
enum Try {
    /// A reply that opened for this forward.
    Done(Result<serde_json::Value, SupervisorError>),
    /// Nobody listens on the node's subject.
    NoResponders,
    /// The node refused it (it could not open it): its refusal.
    Refused(String),
    /// No reply that opened, in time: why, for the last error.
    Again(String),
}

/// One try of a forward: published with an inbox of its own, whose replies are read until one
/// opens for this forward or the try times out. A reply that does not open (forged, or a
/// refusal the node could not seal) is passed over, so whoever answers first cannot decide
/// the outcome; a refusal's text is kept for the error if nothing better comes.
async fn try_forward(
    client: &async_nats::Client,
    subject: &str,
    sealed: &str,
    keys: &Keyring,
    id: &str,
) -> Try {
    let inbox = client.new_inbox();
    let mut replies = match client.subscribe(inbox.clone()).await {
        Ok(s) => s,
        Err(e) => return Try::Again(e.to_string()),
    };
    let payload = bytes::Bytes::copy_from_slice(sealed.as_bytes());
    if let Err(e) = client
        .publish_with_reply(subject.to_string(), inbox, payload)
        .await
    {
        return Try::Again(e.to_string());
    }
    let deadline = Instant::now() + FORWARD_TIMEOUT;
    let mut last = "no reply in time".to_string();
    loop {
        let m = match tokio::time::timeout_at(deadline, replies.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => return Try::Again("the reply subscription closed".into()),
            Err(_) => return Try::Again(last),
        };
        if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            return Try::NoResponders;
        }
        match opened_reply(keys, id, &m.payload) {
            Some(r) => return Try::Done(r),
            // A node's refusal (it could not open the forward: it joined again since the view
            // last saw it, say): try again, sealed afresh. Forged, it costs a try and a pause.
            None if from_wire(&m.payload).is_err() && m.payload.starts_with(b"{") => {
                return Try::Refused(unopened_reply(&m.payload).to_string());
            }
            None => last = unopened_reply(&m.payload).to_string(),
        }
    }
}

type ReplyRx = tokio::sync::watch::Receiver<Option<Vec<u8>>>;
type ReplyTx = tokio::sync::watch::Sender<Option<Vec<u8>>>;

/// Replies to forwarded commands, by forward id, for repeated tries.
#[derive(Default)]
struct Replies {
    by_id: HashMap<String, ReplyRx>,
    order: VecDeque<(Instant, String)>,
}

impl Replies {
    /// The reply channel for `id`, and whether this call should run the command.
    fn slot(&mut self, id: &str) -> (ReplyRx, Option<ReplyTx>) {
        let now = Instant::now();
        while self
            .order
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > REPLIES_KEPT)
        {
            if let Some((_, old)) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
        if let Some(rx) = self.by_id.get(id) {
            return (rx.clone(), None);
        }
        let (tx, rx) = tokio::sync::watch::channel(None);
        self.by_id.insert(id.to_string(), rx.clone());
        self.order.push_back((now, id.to_string()));
        (rx, Some(tx))
    }
}

/// A reply as it crosses NATS.
pub fn to_wire(r: Result<control::Reply, SupervisorError>) -> Vec<u8> {
    let v = match r {
        Ok(reply) => serde_json::json!({ "ok": reply }),
        Err(e) => serde_json::json!({ "error": { "code": e.code(), "message": e.to_string() } }),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// A reply read back; anything else is a `backend_error` naming what came.
pub fn from_wire(bytes: &[u8]) -> Result<serde_json::Value, SupervisorError> {
    let bad = || {
        SupervisorError::Remote(
            "backend_error",
            format!(
                "a node answered with something that is not a reply: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ),
        )
    };
    let mut v: serde_json::Value = serde_json::from_slice(bytes).map_err(|_| bad())?;
    if let Some(ok) = v.get_mut("ok") {
        return Ok(ok.take());
    }
    let err = v.get("error").ok_or_else(bad)?;
    let code = err.get("code").and_then(|c| c.as_str()).ok_or_else(bad)?;
    let message = err
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_string();
    Err(SupervisorError::Remote(static_code(code), message))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A forward as it crosses NATS: sealed for `node` in `epoch`, made at `at_ms`.
pub fn seal_forward(
    keys: &Keyring,
    node: &str,
    epoch: u64,
    id: &str,
    at_ms: i64,
    cmd: &Command,
) -> String {
    let wire = serde_json::json!({ "id": id, "at_ms": at_ms, "cmd": control::to_wire(cmd) });
    keys.seal(
        Purpose::Forward,
        &[node.as_bytes(), &epoch.to_be_bytes()],
        &serde_json::to_vec(&wire).unwrap_or_default(),
    )
}

/// Why a forward is not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refused {
    /// Not sealed for this node in this epoch by a key it accepts.
    #[error("a forwarded command that does not authenticate for this node and epoch")]
    Unauthenticated,
    /// Made too long ago, or in the future.
    #[error("a forwarded command made {0} ms from now: stale or replayed")]
    Stale(i64),
    /// Opened, but not a forward's shape.
    #[error("a forwarded command that is not one: {0}")]
    Shape(String),
}

/// A forward opened by `node` in `epoch` at `now_ms`: its id and command line.
pub fn open_forward(
    keys: &Keyring,
    node: &str,
    epoch: u64,
    now_ms: i64,
    payload: &[u8],
) -> Result<(String, String), Refused> {
    let plain = keys
        .open(
            Purpose::Forward,
            &[node.as_bytes(), &epoch.to_be_bytes()],
            &String::from_utf8_lossy(payload),
        )
        .map_err(|_| Refused::Unauthenticated)?;
    #[derive(serde::Deserialize)]
    struct Wire {
        id: String,
        at_ms: i64,
        cmd: serde_json::Value,
    }
    let w: Wire = serde_json::from_slice(&plain).map_err(|e| Refused::Shape(e.to_string()))?;
    let age = now_ms - w.at_ms;
    if age.unsigned_abs() > FORWARD_FRESH.as_millis() as u64 {
        return Err(Refused::Stale(-age));
    }
    Ok((w.id, w.cmd.to_string()))
}

/// The reply to forward `id`, sealed.
fn seal_reply(keys: &Keyring, id: &str, reply: &[u8]) -> Vec<u8> {
    keys.seal(Purpose::Reply, &[id.as_bytes()], reply)
        .into_bytes()
}

/// The reply to forward `id`, read back; None when it does not open for this forward.
fn opened_reply(
    keys: &Keyring,
    id: &str,
    payload: &[u8],
) -> Option<Result<serde_json::Value, SupervisorError>> {
    let plain = keys
        .open(
            Purpose::Reply,
            &[id.as_bytes()],
            &String::from_utf8_lossy(payload),
        )
        .ok()?;
    Some(from_wire(&plain))
}

/// Why a reply that does not open is refused, with a node's own (unsealed) refusal if it is one.
fn unopened_reply(payload: &[u8]) -> SupervisorError {
    metrics::counter!("guestd_cluster_forged_total", "what" => "reply").increment(1);
    let refusal = from_wire(payload)
        .err()
        .map(|e| format!(" (it said: {e})"))
        .unwrap_or_default();
    SupervisorError::Remote(
        "backend_error",
        format!("a node's reply did not authenticate{refusal}"),
    )
}

/// The reply to forward `id`: opened and read back; a reply that does not open is refused.
pub fn open_reply(
    keys: &Keyring,
    id: &str,
    payload: &[u8],
) -> Result<serde_json::Value, SupervisorError> {
    opened_reply(keys, id, payload).unwrap_or_else(|| Err(unopened_reply(payload)))
}

/// Whether a command line on the public subject carries the expected bearer token.
fn authorized(headers: Option<&async_nats::HeaderMap>, token: &Secret) -> bool {
    use ring::digest::{SHA256, digest};
    let given = headers
        .and_then(|h| h.get("Authorization"))
        .map(|v| v.as_str())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Digests compared, so the time taken says nothing about the token.
    !given.is_empty()
        && digest(&SHA256, given.as_bytes()).as_ref()
            == digest(&SHA256, token.expose().as_bytes()).as_ref()
}

/// Serve commands: forwarded ones on `<cmd>.<node>` (sealed, run here) and, when `public`
/// holds the API token (`cluster.nats_commands`), command lines on `<cmd>` that carry it.
pub async fn serve(
    node: &Node,
    sup: Supervisor,
    cancel: CancellationToken,
    public: Option<Secret>,
) -> Result<(), async_nats::SubscribeError> {
    let client = node.nats.client.clone();
    let cmd = node.nats.names.cmd.clone();
    let direct = client.subscribe(format!("{cmd}.{}", node.id)).await?;
    let public_sub = match &public {
        Some(_) => Some(
            client
                .queue_subscribe(cmd.clone(), "guestd".to_string())
                .await?,
        ),
        None => None,
    };
    let public_stream = futures::stream::iter(public_sub).flatten();
    let mut both =
        futures::stream::select(direct.map(|m| (true, m)), public_stream.map(|m| (false, m)));
    let replies = Arc::new(Mutex::new(Replies::default()));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_NATS_IN_FLIGHT));
    loop {
        let (forwarded, msg) = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            m = both.next() => match m { Some(m) => m, None => return Ok(()) },
        };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (client, sup, replies, node) =
            (client.clone(), sup.clone(), replies.clone(), node.clone());
        let public = public.clone();
        tokio::spawn(async move {
            let bytes = if forwarded {
                run_forwarded(&sup, &node, &replies, &msg.payload).await
            } else if public
                .as_ref()
                .is_some_and(|t| authorized(msg.headers.as_ref(), t))
            {
                to_wire(run_line(&sup, &msg.payload).await)
            } else {
                metrics::counter!("guestd_commands_total", "channel" => "nats", "result" => "unauthorized")
                    .increment(1);
                to_wire(Err(SupervisorError::Remote(
                    "unauthorized",
                    "a command over NATS needs the API token (Authorization: Bearer)".into(),
                )))
            };
            if let Err(e) = client.publish(reply_to, bytes.into()).await {
                tracing::warn!(error = %e, "could not answer a command over NATS");
            }
            drop(slot);
        });
    }
}

async fn run_forwarded(
    sup: &Supervisor,
    node: &Node,
    replies: &Mutex<Replies>,
    payload: &[u8],
) -> Vec<u8> {
    let (id, line) = match open_forward(&node.keys, &node.id, node.fence.epoch(), now_ms(), payload)
    {
        Ok(v) => v,
        Err(e) => {
            metrics::counter!("guestd_cluster_forged_total", "what" => "forward").increment(1);
            tracing::warn!(error = %e, "refused a forwarded command");
            // Unsealed: it names no chat and carries nothing but the refusal.
            return to_wire(Err(SupervisorError::Remote("backend_error", e.to_string())));
        }
    };
    let (mut rx, tx) = replies.lock().unwrap_or_else(|e| e.into_inner()).slot(&id);
    if let Some(tx) = tx {
        let (_, _, cmd) = control::parse_line(&line);
        let result = match cmd {
            Ok(cmd) => control::execute_here(sup, cmd).await,
            Err(e) => Err(SupervisorError::Invalid(e)),
        };
        let bytes = seal_reply(&node.keys, &id, &to_wire(result));
        let _ = tx.send(Some(bytes.clone()));
        return bytes;
    }
    // A repeated try (or a replay): the first run's reply, once it has one.
    match rx.wait_for(|r| r.is_some()).await {
        Ok(r) => r.clone().unwrap_or_default(),
        Err(_) => seal_reply(
            &node.keys,
            &id,
            &to_wire(Err(SupervisorError::Remote(
                "unreachable",
                "the first try of this command was abandoned".into(),
            ))),
        ),
    }
}

async fn run_line(sup: &Supervisor, payload: &[u8]) -> Result<control::Reply, SupervisorError> {
    let text = String::from_utf8(payload.to_vec())
        .map_err(|_| SupervisorError::Invalid("a command is UTF-8 JSON".into()))?;
    let (_, _, cmd) = control::parse_line(&text);
    let cmd = cmd.map_err(SupervisorError::Invalid)?;
    metrics::counter!("guestd_commands_total", "channel" => "nats", "result" => "received")
        .increment(1);
    control::execute(sup, cmd).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forward_refused_at_every_try_stays_fresh_to_its_last_try() {
        // Every try is sent within the span and lands within a try's timeout: what is left
        // of the freshness is the clock difference tolerated between nodes.
        let skew = FORWARD_FRESH.saturating_sub(FORWARD_SPAN + FORWARD_TIMEOUT);
        assert!(
            skew >= Duration::from_secs(30),
            "tolerates {skew:?} of clock difference"
        );
        // Refusals alone (instant, then paced) leave the span room for a new epoch.
        let pauses: Duration = (0..FORWARD_TRIES as u32 - 1).map(refused_pause).sum();
        assert!(
            pauses >= Duration::from_secs(15) && pauses < FORWARD_SPAN,
            "paced over {pauses:?}"
        );
        assert_eq!(refused_pause(0), Duration::from_millis(250));
        assert_eq!(refused_pause(30), FORWARD_TIMEOUT);
    }

    #[tokio::test]
    async fn a_repeated_forward_gets_the_first_run_s_reply_and_never_runs_twice() {
        let mut r = Replies::default();
        let (_, first) = r.slot("f-1");
        let (mut again, second) = r.slot("f-1");
        assert!(second.is_none(), "a repeated id must not run again");
        let (_, other) = r.slot("f-2");
        assert!(other.is_some());
        first.unwrap().send(Some(b"reply".to_vec())).unwrap();
        let got = again.wait_for(|v| v.is_some()).await.unwrap().clone();
        assert_eq!(got.as_deref(), Some(&b"reply"[..]));
    }

    #[test]
    fn a_forward_runs_only_on_its_node_in_its_epoch_while_fresh() {
        let keys = Keyring::new(&[5; 32], &[]);
        let cmd = Command::List;
        let t = 1_000_000_000_000;
        let f = seal_forward(&keys, "n2", 7, "f-1", t, &cmd);
        let (id, line) = open_forward(&keys, "n2", 7, t + 1_000, f.as_bytes()).unwrap();
        assert_eq!(id, "f-1");
        assert!(line.contains("list"), "{line}");
        // Replayed to another node, or to the same node after it joined again: refused.
        assert_eq!(
            open_forward(&keys, "n1", 7, t, f.as_bytes()),
            Err(Refused::Unauthenticated)
        );
        assert_eq!(
            open_forward(&keys, "n2", 8, t, f.as_bytes()),
            Err(Refused::Unauthenticated)
        );
        // Replayed later than a forward's tries can take, or made in the future: refused.
        let late = t + FORWARD_FRESH.as_millis() as i64 + 1;
        assert!(matches!(
            open_forward(&keys, "n2", 7, late, f.as_bytes()),
            Err(Refused::Stale(_))
        ));
        let early = t - FORWARD_FRESH.as_millis() as i64 - 1;
        assert!(matches!(
            open_forward(&keys, "n2", 7, early, f.as_bytes()),
            Err(Refused::Stale(_))
        ));
        // Another secret, or a plain command line: refused.
        let other = Keyring::new(&[6; 32], &[]);
        assert_eq!(
            open_forward(&other, "n2", 7, t, f.as_bytes()),
            Err(Refused::Unauthenticated)
        );
        assert_eq!(
            open_forward(&keys, "n2", 7, t, br#"{"cmd":"list"}"#),
            Err(Refused::Unauthenticated)
        );
    }

    #[test]
    fn a_reply_counts_only_if_it_opens_for_its_forward() {
        let keys = Keyring::new(&[5; 32], &[]);
        let ok = to_wire(Ok(control::Reply::Remote(
            serde_json::json!({"session": "s-1"}),
        )));
        let sealed = seal_reply(&keys, "f-1", &ok);
        assert!(!String::from_utf8_lossy(&sealed).contains("s-1"));
        assert_eq!(open_reply(&keys, "f-1", &sealed).unwrap()["session"], "s-1");
        // A reply to another forward, a plain (forged) reply, another secret's: refused.
        assert_eq!(
            open_reply(&keys, "f-2", &sealed).unwrap_err().code(),
            "backend_error"
        );
        let forged = open_reply(&keys, "f-1", &ok).unwrap_err();
        assert!(
            forged.to_string().contains("did not authenticate"),
            "{forged}"
        );
        let other = seal_reply(&Keyring::new(&[6; 32], &[]), "f-1", &ok);
        assert!(open_reply(&keys, "f-1", &other).is_err());
    }

    #[test]
    fn public_commands_need_the_token() {
        let token = Secret::new("t0ken");
        let mut h = async_nats::HeaderMap::new();
        assert!(!authorized(None, &token));
        assert!(!authorized(Some(&h), &token));
        h.insert("Authorization", "Bearer wrong");
        assert!(!authorized(Some(&h), &token));
        h.insert("Authorization", "Bearer t0ken");
        assert!(authorized(Some(&h), &token));
    }

    #[test]
    fn replies_cross_as_json_and_keep_their_codes() {
        let ok = to_wire(Ok(control::Reply::Remote(
            serde_json::json!({"session": "s-1"}),
        )));
        assert_eq!(from_wire(&ok).unwrap()["session"], "s-1");
        let err = to_wire(Err(SupervisorError::NotFound("x".into())));
        let e = from_wire(&err).unwrap_err();
        assert_eq!(e.code(), "not_found");
        assert!(e.to_string().contains("x"));
        assert_eq!(from_wire(b"garbage").unwrap_err().code(), "backend_error");
        assert_eq!(
            from_wire(br#"{"error":{"code":"weird","message":"m"}}"#)
                .unwrap_err()
                .code(),
            "backend_error"
        );
    }
}
