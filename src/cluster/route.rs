//! Commands in cluster mode. A command for an existing chat runs on the chat's owner; `start`
//! (and `attach` of a chat nobody holds) on the least-loaded live node. Nodes forward to
//! `<prefix>.cmd.<node>` with the command sealed (an `attach` carries a jwt); anyone may send
//! plain command lines (the stdin form) to `<prefix>.cmd`, served by a queue group of every node.
//! A forward carries an id, and the node that runs it keeps each id's reply for a few minutes:
//! a forward that got no answer in time (the node was reconnecting to NATS, say) is sent again
//! with the same id and gets the first run's reply, never a second run (a `start` run twice
//! would create two chats). After [`FORWARD_TRIES`] the caller gets `unreachable`.

use super::node::{Node, View, lock};
use super::seal::Sealer;
use crate::control::{self, Command, Route};
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
/// Tries of one forward (same id), so up to about 40 s in all: a `start` waits for the
/// platform's create, which has its own retries.
const FORWARD_TRIES: usize = 8;
/// How long a node keeps a forward's reply for a repeated try.
const REPLIES_KEPT: Duration = Duration::from_secs(300);
/// How long a placement counts toward a node's load before the sessions bucket shows it.
const PLACED_FOR: Duration = Duration::from_secs(3);

/// Places and forwards commands.
pub struct Router {
    node: String,
    client: async_nats::Client,
    cmd: String,
    sealer: Sealer,
    view: Arc<Mutex<View>>,
    sessions: async_nats::jetstream::kv::Store,
    placed: Mutex<VecDeque<(Instant, String)>>,
    /// Nodes that answered no responders lately (reconnecting to NATS), with when.
    avoid: Mutex<Vec<(Instant, String)>>,
}

impl Router {
    /// For `node`, forwarding on `<cmd>.<node>`.
    pub fn new(node: &Node) -> Self {
        Router {
            node: node.id.clone(),
            client: node.nats.client.clone(),
            cmd: node.nats.names.cmd.clone(),
            sealer: node.sealer.clone(),
            view: node.view.clone(),
            sessions: node.nats.sessions.clone(),
            placed: Mutex::new(VecDeque::new()),
            avoid: Mutex::new(Vec::new()),
        }
    }

    /// The least-loaded live node (counting placements the bucket does not show yet).
    fn least_loaded(&self) -> Option<String> {
        let now = Instant::now();
        let mut load = lock(&self.view).load(now);
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
        lock(&self.view).owner_of(key, Instant::now())
    }

    /// The sessions bucket's own entry for a session id the view does not know (yet): a watch
    /// that restarted after a NATS server died can lag well behind the bucket.
    async fn entry(&self, key: &str) -> Option<super::store::Entry> {
        if !key.starts_with("s-") || !super::valid_token(key) {
            return None;
        }
        let read = tokio::time::timeout(Duration::from_secs(5), self.sessions.entry(key)).await;
        match read {
            Ok(Ok(Some(e))) if e.operation == async_nats::jetstream::kv::Operation::Put => {
                super::store::Entry::parse(&e.value)
            }
            _ => None,
        }
    }

    async fn owner_or_read(&self, key: &str) -> Option<String> {
        if let Some(o) = self.owner(key) {
            return Some(o);
        }
        let known = lock(&self.view).session_of(key).is_some();
        if known {
            return None;
        }
        let e = self.entry(key).await?;
        let mut v = lock(&self.view);
        (v.observer.holding(&e.owner, e.epoch, Instant::now()) == super::lease::Holding::Held)
            .then_some(e.owner)
    }
}

impl Route for Router {
    fn place<'a>(&'a self, cmd: &'a Command) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            let node = match cmd {
                Command::Start(_) | Command::StartMessaging(_) => self.least_loaded(),
                Command::Attach(chat) => self
                    .owner(&chat.conversation_id)
                    .or_else(|| self.least_loaded()),
                Command::AttachMessaging(spec) => {
                    self.owner(&spec.key()).or_else(|| self.least_loaded())
                }
                Command::Send { session, .. }
                | Command::Typing { session }
                | Command::Leave { session }
                | Command::Get { session }
                | Command::StartNew { session } => self.owner_or_read(session).await,
                Command::List | Command::Status { .. } => None,
            }?;
            (node != self.node).then_some(node)
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
                        let v = lock(&self.view);
                        // Not in step with the bucket yet (just reconnected): it may exist.
                        if v.session_of(session).is_some() || !v.synced {
                            return true;
                        }
                    }
                    self.entry(session).await.is_some()
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
        let wire = serde_json::json!({
            "id": uuid::Uuid::new_v4().simple().to_string(),
            "cmd": control::to_wire(cmd),
        });
        let sealed = self
            .sealer
            .seal("cmd", &serde_json::to_vec(&wire).unwrap_or_default());
        let subject = format!("{}.{node}", self.cmd);
        let client = self.client.clone();
        Box::pin(async move {
            let mut last = String::new();
            for _ in 0..FORWARD_TRIES {
                let r = tokio::time::timeout(
                    FORWARD_TIMEOUT,
                    client.request(subject.clone(), sealed.clone().into_bytes().into()),
                )
                .await;
                match r {
                    Ok(Ok(reply)) => return from_wire(&reply.payload),
                    Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                        // Nobody got it: the caller may place it elsewhere.
                        return Err(SupervisorError::Remote(
                            "no_responders",
                            format!("node {node}: {e}"),
                        ));
                    }
                    Ok(Err(e)) => last = e.to_string(),
                    Err(_) => last = "no reply in time".into(),
                }
                metrics::counter!("guestd_cluster_forward_retries_total").increment(1);
            }
            Err(SupervisorError::Remote(
                "unreachable",
                format!("node {node} did not answer: {last}"),
            ))
        })
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

/// Serve commands: forwarded ones on `<cmd>.<node>` (sealed, run here) and anyone's on `<cmd>`
/// (plain command lines, placed like stdin's).
pub async fn serve(
    node: &Node,
    sup: Supervisor,
    cancel: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    let (client, cmd, sealer) = (
        node.nats.client.clone(),
        node.nats.names.cmd.clone(),
        node.sealer.clone(),
    );
    let direct = client.subscribe(format!("{cmd}.{}", node.id)).await?;
    let public = client
        .queue_subscribe(cmd.clone(), "guestd".to_string())
        .await?;
    let mut both = futures::stream::select(direct.map(|m| (true, m)), public.map(|m| (false, m)));
    let replies = Arc::new(Mutex::new(Replies::default()));
    loop {
        let (forwarded, msg) = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            m = both.next() => match m { Some(m) => m, None => return Ok(()) },
        };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let (client, sealer, sup, replies) =
            (client.clone(), sealer.clone(), sup.clone(), replies.clone());
        tokio::spawn(async move {
            let bytes = if forwarded {
                run_forwarded(&sup, &sealer, &replies, &msg.payload).await
            } else {
                to_wire(run_line(&sup, &msg.payload).await)
            };
            if let Err(e) = client.publish(reply_to, bytes.into()).await {
                tracing::warn!(error = %e, "could not answer a command over NATS");
            }
        });
    }
}

async fn run_forwarded(
    sup: &Supervisor,
    sealer: &Sealer,
    replies: &Mutex<Replies>,
    payload: &[u8],
) -> Vec<u8> {
    let opened = sealer
        .open("cmd", &String::from_utf8_lossy(payload))
        .map_err(|e| SupervisorError::Invalid(format!("forwarded command: {e}")))
        .and_then(|plain| {
            serde_json::from_slice::<serde_json::Value>(&plain)
                .map_err(|e| SupervisorError::Invalid(format!("forwarded command: {e}")))
        });
    let mut v = match opened {
        Ok(v) => v,
        Err(e) => return to_wire(Err(e)),
    };
    let id = v["id"].as_str().unwrap_or_default().to_string();
    let (mut rx, tx) = replies.lock().unwrap_or_else(|e| e.into_inner()).slot(&id);
    if let Some(tx) = tx {
        let line = v["cmd"].take().to_string();
        let (_, _, cmd) = control::parse_line(&line);
        let result = match cmd {
            Ok(cmd) => control::execute_here(sup, cmd).await,
            Err(e) => Err(SupervisorError::Invalid(e)),
        };
        let bytes = to_wire(result);
        let _ = tx.send(Some(bytes.clone()));
        return bytes;
    }
    // A repeated try: the first run's reply, once it has one.
    match rx.wait_for(|r| r.is_some()).await {
        Ok(r) => r.clone().unwrap_or_default(),
        Err(_) => to_wire(Err(SupervisorError::Remote(
            "unreachable",
            "the first try of this command was abandoned".into(),
        ))),
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
