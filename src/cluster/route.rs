//! Commands in cluster mode. A command for an existing chat runs on the chat's owner; `start`
//! (and `attach` of a chat nobody holds) on the least-loaded live node. Nodes forward to
//! `<prefix>.cmd.<node>` with the command sealed (an `attach` carries a jwt); anyone may send
//! plain command lines (the stdin form) to `<prefix>.cmd`, served by a queue group of every node.
//! A forward is sent once: a `start` retried blindly could create two chats. On no answer the
//! caller gets `unreachable` and decides.

use super::node::View;
use super::seal::Sealer;
use crate::control::{self, Command, Route};
use crate::supervisor::{Supervisor, SupervisorError, static_code};
use futures::StreamExt;
use futures::future::BoxFuture;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a forwarded command may take (a `start` waits for the platform's create).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a placement counts toward a node's load before the sessions bucket shows it.
const PLACED_FOR: Duration = Duration::from_secs(3);

/// Places and forwards commands.
pub struct Router {
    node: String,
    client: async_nats::Client,
    cmd: String,
    sealer: Sealer,
    view: Arc<Mutex<View>>,
    placed: Mutex<VecDeque<(Instant, String)>>,
}

impl Router {
    /// For `node`, forwarding on `<cmd>.<node>`.
    pub fn new(
        node: String,
        client: async_nats::Client,
        cmd: String,
        sealer: Sealer,
        view: Arc<Mutex<View>>,
    ) -> Self {
        Router {
            node,
            client,
            cmd,
            sealer,
            view,
            placed: Mutex::new(VecDeque::new()),
        }
    }

    /// The least-loaded live node (counting placements the bucket does not show yet).
    fn least_loaded(&self) -> Option<String> {
        let now = Instant::now();
        let mut load = self
            .view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .load(now);
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
        let best = load
            .into_iter()
            .min_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)))
            .map(|(n, _)| n)?;
        placed.push_back((now, best.clone()));
        Some(best)
    }

    fn owner(&self, key: &str) -> Option<String> {
        self.view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .owner_of(key, Instant::now())
    }
}

impl Route for Router {
    fn place(&self, cmd: &Command) -> Option<String> {
        let node = match cmd {
            Command::Start(_) => self.least_loaded(),
            Command::Attach(chat) => self
                .owner(&chat.conversation_id)
                .or_else(|| self.least_loaded()),
            Command::Send { session, .. }
            | Command::Typing { session }
            | Command::Leave { session }
            | Command::Get { session } => self.owner(session),
            Command::List | Command::Status { .. } => None,
        }?;
        (node != self.node).then_some(node)
    }

    fn forward(
        &self,
        node: String,
        cmd: &Command,
    ) -> BoxFuture<'static, Result<serde_json::Value, SupervisorError>> {
        let wire = serde_json::to_vec(&control::to_wire(cmd)).unwrap_or_default();
        let sealed = self.sealer.seal("cmd", &wire);
        let subject = format!("{}.{node}", self.cmd);
        let client = self.client.clone();
        Box::pin(async move {
            let reply = tokio::time::timeout(
                FORWARD_TIMEOUT,
                client.request(subject, sealed.into_bytes().into()),
            )
            .await
            .map_err(|_| {
                SupervisorError::Remote(
                    "unreachable",
                    format!("node {node} did not answer in time"),
                )
            })?
            .map_err(|e| SupervisorError::Remote("unreachable", format!("node {node}: {e}")))?;
            from_wire(&reply.payload)
        })
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
    client: async_nats::Client,
    cmd: String,
    node: String,
    sealer: Sealer,
    sup: Supervisor,
    cancel: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    let direct = client.subscribe(format!("{cmd}.{node}")).await?;
    let public = client
        .queue_subscribe(cmd.clone(), "guestd".to_string())
        .await?;
    let mut both = futures::stream::select(direct.map(|m| (true, m)), public.map(|m| (false, m)));
    loop {
        let (forwarded, msg) = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            m = both.next() => match m { Some(m) => m, None => return Ok(()) },
        };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let (client, sealer, sup) = (client.clone(), sealer.clone(), sup.clone());
        tokio::spawn(async move {
            let result = run(&sup, &sealer, forwarded, &msg.payload).await;
            if let Err(e) = client.publish(reply_to, to_wire(result).into()).await {
                tracing::warn!(error = %e, "could not answer a command over NATS");
            }
        });
    }
}

async fn run(
    sup: &Supervisor,
    sealer: &Sealer,
    forwarded: bool,
    payload: &[u8],
) -> Result<control::Reply, SupervisorError> {
    let text = if forwarded {
        let plain = sealer
            .open("cmd", &String::from_utf8_lossy(payload))
            .map_err(|e| SupervisorError::Invalid(format!("forwarded command: {e}")))?;
        String::from_utf8(plain)
            .map_err(|_| SupervisorError::Invalid("forwarded command is not UTF-8".into()))?
    } else {
        String::from_utf8(payload.to_vec())
            .map_err(|_| SupervisorError::Invalid("a command is UTF-8 JSON".into()))?
    };
    let (_, _, cmd) = control::parse_line(&text);
    let cmd = cmd.map_err(SupervisorError::Invalid)?;
    metrics::counter!("guestd_commands_total", "channel" => "nats", "result" => "received")
        .increment(1);
    if forwarded {
        control::execute_here(sup, cmd).await
    } else {
        control::execute(sup, cmd).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
