//! Cluster mode: several guestd nodes share chats through NATS JetStream (see docs/design.md,
//! "Cluster mode"). Nothing here is consensus of guestd's own: JetStream's replicated KV with
//! compare-and-set is the one arbiter of who owns a chat.
//!
//! - [`lease`]: the ownership rules, pure and property-tested.
//! - [`node`]: a node's life: join, renew, fence, watch the others, take orphaned chats.
//! - [`store`]: the session journal in a KV bucket (one entry per chat, its jwt sealed).
//! - [`publish`]: events into a JetStream stream, de-duplicated by `Nats-Msg-Id`.
//! - [`route`]: commands reach the chat's owner, new chats the least-loaded node.
//! - [`seal`]: XChaCha20-Poly1305 for what must not rest in NATS in plaintext.
//! - [`ends`]: the ends nodes reported, sealed, for `status` on any node.
//! - [`slots`]: key prefixes held by nodes, so a node watches and keeps only its own chats.

pub mod ends;
pub mod lease;
pub mod node;
pub mod publish;
pub mod route;
pub mod seal;
mod section;
pub mod slots;
pub mod store;

use async_nats::jetstream;
pub use section::ClusterSection;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What went wrong talking to NATS.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Connecting.
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    /// Creating or opening a bucket or the stream.
    #[error("JetStream setup ({what}): {msg}")]
    Setup {
        /// Which bucket or stream.
        what: String,
        /// Why.
        msg: String,
    },
    /// A configuration value.
    #[error("{0}")]
    Config(String),
}

/// Whether `s` is a safe NATS subject token and KV key part: letters, digits, `-`, `_`.
pub fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The URL policy for NATS servers: `tls://` anywhere; `nats://` only to loopback unless
/// `allow_insecure` (the same rule as for the platform's URLs).
pub fn check_server(url: &str, allow_insecure: bool) -> Result<(), String> {
    let u = url::Url::parse(url).map_err(|e| format!("bad URL {url}: {e}"))?;
    match u.scheme() {
        "tls" => Ok(()),
        "nats" => {
            let as_http = format!("http://{}", u.host_str().unwrap_or(""));
            crate::transport::policy::check_url(&as_http, allow_insecure)
                .map_err(|e| e.0.replace("plaintext http", "plaintext nats"))
        }
        other => Err(format!(
            "unsupported scheme {other} in {url} (nats:// or tls://)"
        )),
    }
}

/// What an operator should hear at start about how this node reaches NATS: plaintext, or no
/// credentials (anyone who reaches the servers is then as trusted as guestd's nodes, save for
/// the cluster secret).
pub fn exposure(cfg: &ClusterSection) -> Vec<String> {
    let mut out = Vec::new();
    let plaintext: Vec<&str> = cfg
        .servers
        .iter()
        .filter(|s| s.starts_with("nats://"))
        .map(String::as_str)
        .collect();
    if !cfg.tls_required && !plaintext.is_empty() {
        out.push(format!(
            "joining the cluster in plaintext ({}; servers NATS advertises are joined the same way): \
             set cluster.tls_required and tls:// servers unless NATS is on this host only",
            plaintext.join(", ")
        ));
    }
    if cfg.credentials_file.is_none() && cfg.token_file.is_none() && cfg.password_file.is_none() {
        out.push(
            "joining the cluster without NATS credentials: give guestd a NATS user of its own \
             with the permissions in docs/operations.md (\"Threat model\")"
                .into(),
        );
    }
    out
}

/// The names of everything guestd makes in NATS, from the prefix.
#[derive(Debug, Clone)]
pub struct Names {
    /// Nodes bucket (one entry per node: its epoch, renewed).
    pub nodes: String,
    /// Sessions bucket (one entry per chat).
    pub sessions: String,
    /// Event stream.
    pub stream: String,
    /// Event subjects: `<prefix>.events.<conversation>`.
    pub events: String,
    /// Command subjects: `<prefix>.cmd` (any node) and `<prefix>.cmd.<node>`.
    pub cmd: String,
    /// Ended-chats stream (remembered ends, for `status`).
    pub ended_stream: String,
    /// Its subjects: `<prefix>.ended.<HMAC of the conversation id>`.
    pub ended: String,
}

impl Names {
    /// Names for `prefix`.
    pub fn new(prefix: &str) -> Self {
        Names {
            nodes: format!("{prefix}_nodes"),
            sessions: format!("{prefix}_sessions"),
            stream: format!("{prefix}_EVENTS"),
            events: format!("{prefix}.events"),
            cmd: format!("{prefix}.cmd"),
            ended_stream: format!("{prefix}_ENDED"),
            ended: format!("{prefix}.ended"),
        }
    }
}

pub use crate::session::fence::Fence;

/// A connection to NATS and JetStream with guestd's buckets and stream.
#[derive(Clone)]
pub struct Nats {
    /// The client.
    pub client: async_nats::Client,
    /// JetStream.
    pub js: jetstream::Context,
    /// The nodes bucket.
    pub nodes: jetstream::kv::Store,
    /// The sessions bucket.
    pub sessions: jetstream::kv::Store,
    /// Names.
    pub names: Arc<Names>,
}

async fn with_retry<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> Result<T, ClusterError> {
    // JetStream answers "no responders" or times out while a cluster elects its meta leader:
    // retry for a while before calling the setup failed.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut wait = Duration::from_millis(200);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() + wait < deadline => {
                tracing::warn!(what, error = %e, "JetStream setup: retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(3));
            }
            Err(e) => {
                return Err(ClusterError::Setup {
                    what: what.to_string(),
                    msg: e.to_string(),
                });
            }
        }
    }
}

/// Connect, then create (or open) the buckets and the stream.
pub async fn connect(cfg: &ClusterSection) -> Result<Nats, ClusterError> {
    let node = cfg.node();
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("guestd-{node}"))
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)))
        .max_reconnects(None::<usize>)
        .reconnect_delay_callback(|n| Duration::from_millis((100 * (n as u64 + 1)).min(1000)))
        .event_callback(|e| async move {
            tracing::info!(event = %e, "NATS connection event");
        });
    if let Some(p) = &cfg.credentials_file {
        crate::secret::read_file(p)
            .map_err(|e| ClusterError::Config(format!("cluster.credentials_file: {e}")))?;
        opts = opts
            .credentials_file(p)
            .await
            .map_err(|e| ClusterError::Config(format!("cluster.credentials_file: {e}")))?;
    }
    if let Some(p) = &cfg.token_file {
        let t = crate::secret::read_file(p)
            .map_err(|e| ClusterError::Config(format!("cluster.token_file: {e}")))?;
        opts = opts.token(t.trim().to_string());
    }
    if let Some(p) = &cfg.password_file {
        let t = crate::secret::read_file(p)
            .map_err(|e| ClusterError::Config(format!("cluster.password_file: {e}")))?;
        let password = t.lines().next().unwrap_or_default().trim().to_string();
        opts = opts.user_and_password(cfg.user.clone(), password);
    }
    for w in exposure(cfg) {
        tracing::warn!("{w}");
    }
    // Replies to this node's requests arrive under a prefix of guestd's own, which NATS
    // permissions can keep every other user from subscribing to (docs/operations.md).
    opts = opts.custom_inbox_prefix(format!("_INBOX_{}", cfg.prefix));
    if let Some(p) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(p.clone());
    }
    if cfg.tls_required {
        opts = opts.require_tls(true);
    }
    if cfg.ignore_discovered_servers {
        opts = opts.ignore_discovered_servers();
    }
    let client = opts
        .connect(cfg.servers.clone())
        .await
        .map_err(|e| ClusterError::Connect(e.to_string()))?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(5));
    let names = Names::new(&cfg.prefix);
    let replicas = cfg.replicas;
    let nodes = with_retry(&names.nodes, || {
        js.create_key_value(jetstream::kv::Config {
            bucket: names.nodes.clone(),
            description: "guestd nodes: epoch and renewals".into(),
            history: 1,
            // A node that left stays readable for a day, then goes.
            max_age: Duration::from_secs(86_400),
            num_replicas: replicas,
            ..Default::default()
        })
    })
    .await?;
    let sessions = with_retry(&names.sessions, || {
        js.create_key_value(jetstream::kv::Config {
            bucket: names.sessions.clone(),
            description: "guestd sessions: owner, progress, decided end; jwt sealed".into(),
            history: 1,
            num_replicas: replicas,
            ..Default::default()
        })
    })
    .await?;
    with_retry(&names.stream, || {
        js.get_or_create_stream(jetstream::stream::Config {
            name: names.stream.clone(),
            description: Some("guestd events, one subject per conversation".into()),
            subjects: vec![format!("{}.>", names.events)],
            max_age: cfg.events_max_age,
            duplicate_window: cfg.duplicate_window,
            num_replicas: replicas,
            ..Default::default()
        })
    })
    .await?;
    Ok(Nats {
        client,
        js,
        nodes,
        sessions,
        names: Arc::new(names),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_nats_only_to_loopback() {
        assert!(check_server("nats://127.0.0.1:4222", false).is_ok());
        assert!(check_server("nats://localhost:4222", false).is_ok());
        assert!(check_server("tls://nats.example.com:4222", false).is_ok());
        let e = check_server("nats://nats.example.com:4222", false).unwrap_err();
        assert!(e.contains("allow_insecure"), "{e}");
        assert!(check_server("nats://nats.example.com:4222", true).is_ok());
        assert!(check_server("http://127.0.0.1:4222", false).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fence_stops_at_its_time_and_at_a_new_epoch() {
        let f = Fence::default();
        assert!(!f.acting(0));
        f.begin(7, Instant::now() + Duration::from_secs(10));
        assert!(f.acting(7));
        assert!(!f.acting(6));
        assert!(f.renewed(7, Instant::now() + Duration::from_secs(12)));
        tokio::time::advance(Duration::from_secs(12)).await;
        assert!(!f.acting(7));
        // An acknowledgement after the fence does not revive the epoch.
        assert!(!f.renewed(7, Instant::now() + Duration::from_secs(5)));
        assert!(!f.acting(7));
        f.begin(8, Instant::now() + Duration::from_secs(5));
        assert!(f.acting(8));
        f.revoke();
        assert!(!f.acting(7));
    }
}
