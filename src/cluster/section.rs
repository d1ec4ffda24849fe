//! `[cluster]`: the cluster's own configuration section and its validation. It lives with the
//! cluster (not in `config`) so that the cluster imports nothing from `config`: `config` holds
//! this section as one of its fields, and the dependency runs one way (issue 26: no circles).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// `[cluster]`: several guestd nodes sharing chats through NATS JetStream. Off while `servers`
/// is empty. See docs/design.md ("Cluster mode") and docs/operations.md.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// NATS server URLs (`nats://host:4222`, `tls://host:4222`); empty = single node.
    pub servers: Vec<String>,
    /// This node's name (letters, digits, `-`, `_`); empty = the host name.
    pub node_id: String,
    /// Prefix of every bucket, stream and subject guestd makes (letters, digits, `_`).
    pub prefix: String,
    /// How long a node's lease lasts without a renewal; others take its chats after that.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often a node renews its lease.
    #[serde(with = "humantime_serde")]
    pub renew: Duration,
    /// A node stops acting this long before its lease could run out (clock and network slack).
    #[serde(with = "humantime_serde")]
    pub fence_margin: Duration,
    /// Replicas of the buckets and the event stream (3 on a 3-server cluster).
    pub replicas: usize,
    /// The event stream's duplicate window: a re-emitted event inside it is dropped.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// How long the event stream keeps events.
    #[serde(with = "humantime_serde")]
    pub events_max_age: Duration,
    /// The cluster secret: 32 bytes (64 hex digits), the same on every node, from this file;
    /// or set `GUESTD_CLUSTER_SEAL_KEY` (the environment wins). Required in cluster mode. Every
    /// key guestd uses in NATS is derived from it (session entries, announcements, forwards,
    /// replies, event ids); values it seals name it by a key id.
    pub seal_key_file: Option<PathBuf>,
    /// Older cluster secrets still accepted for opening (never for sealing), while a new one
    /// rolls out: docs/operations.md, "Rotating the seal key".
    pub accept_seal_key_files: Vec<PathBuf>,
    /// Serve plain command lines on `<prefix>.cmd` to any NATS client that sends the HTTP API's
    /// token (`Authorization: Bearer` header). Off: only guestd nodes' sealed forwards are run.
    pub nats_commands: bool,
    /// NATS credentials file (`.creds`), if the servers require one.
    pub credentials_file: Option<PathBuf>,
    /// NATS token, from this file, if the servers require one.
    pub token_file: Option<PathBuf>,
    /// NATS user name, with `password_file`, if the servers require one.
    pub user: String,
    /// NATS password for `user`, from this file (first line).
    pub password_file: Option<PathBuf>,
    /// Extra CA (PEM) to verify the NATS servers with.
    pub tls_ca_file: Option<PathBuf>,
    /// Require TLS to the NATS servers.
    pub tls_required: bool,
    /// Allow plaintext `nats://` to hosts other than loopback.
    pub allow_insecure: bool,
    /// Connect only to `servers`, never to the cluster members the servers advertise (a node
    /// that reaches NATS through a proxy or NAT).
    pub ignore_discovered_servers: bool,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            servers: Vec::new(),
            node_id: String::new(),
            prefix: "GUESTD".into(),
            lease: Duration::from_secs(15),
            renew: Duration::from_secs(3),
            fence_margin: Duration::from_secs(5),
            replicas: 1,
            duplicate_window: Duration::from_secs(600),
            events_max_age: Duration::from_secs(7 * 86_400),
            seal_key_file: None,
            accept_seal_key_files: Vec::new(),
            nats_commands: false,
            credentials_file: None,
            token_file: None,
            user: String::new(),
            password_file: None,
            tls_ca_file: None,
            tls_required: false,
            allow_insecure: false,
            ignore_discovered_servers: false,
        }
    }
}

impl ClusterSection {
    /// Whether cluster mode is on.
    pub fn enabled(&self) -> bool {
        !self.servers.is_empty()
    }

    /// This node's id: `node_id`, else the host name.
    pub fn node(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| {
                h.trim()
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect()
            })
            .filter(|h: &String| !h.is_empty())
            .unwrap_or_else(|| "guestd".into())
    }

    /// The seal key: `GUESTD_CLUSTER_SEAL_KEY`, else `seal_key_file`.
    pub fn seal_key(&self) -> Result<[u8; 32], String> {
        let text = match std::env::var("GUESTD_CLUSTER_SEAL_KEY") {
            Ok(v) if !v.trim().is_empty() => v,
            _ => match &self.seal_key_file {
                Some(p) => crate::secret::read_file(p)?,
                None => {
                    return Err("cluster mode needs a seal key: seal_key_file or \
                                GUESTD_CLUSTER_SEAL_KEY (64 hex digits)"
                        .into());
                }
            },
        };
        super::seal::parse_key(text.trim())
    }

    /// The keyring: the seal key, and the older ones still accepted.
    pub fn keyring(&self) -> Result<super::seal::Keyring, String> {
        let current = self.seal_key()?;
        let mut accepted = Vec::new();
        for p in &self.accept_seal_key_files {
            let text = crate::secret::read_file(p)?;
            accepted.push(
                super::seal::parse_key(text.trim()).map_err(|e| format!("{}: {e}", p.display()))?,
            );
        }
        Ok(super::seal::Keyring::new(&current, &accepted))
    }

    pub(crate) fn check(&self) -> Result<(), (&'static str, String)> {
        let bad = |k, m: &str| Err((k, m.to_string()));
        if !super::valid_token(&self.node()) {
            return bad("cluster.node_id", "letters, digits, '-' and '_' only");
        }
        if self.prefix.is_empty()
            || !self
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return bad("cluster.prefix", "letters, digits and '_' only");
        }
        if self.renew.is_zero() || self.fence_margin.is_zero() {
            return bad("cluster.renew", "renew and fence_margin must be > 0");
        }
        if self.renew * 2 + self.fence_margin > self.lease {
            return bad(
                "cluster.lease",
                "must be at least 2 x renew + fence_margin (a node must get two tries before it fences)",
            );
        }
        if self.replicas == 0 || self.replicas > 5 {
            return bad("cluster.replicas", "must be 1 to 5");
        }
        if self.duplicate_window.is_zero() || self.duplicate_window > self.events_max_age {
            return bad(
                "cluster.duplicate_window",
                "must be > 0 and no longer than events_max_age",
            );
        }
        for s in &self.servers {
            if let Err(e) = super::check_server(s, self.allow_insecure) {
                return bad("cluster.servers", &e);
            }
        }
        if let Err(e) = self.seal_key() {
            return bad("cluster.seal_key_file", &e);
        }
        if let Err(e) = self.keyring() {
            return bad("cluster.accept_seal_key_files", &e);
        }
        if self.user.is_empty() != self.password_file.is_none() {
            return bad(
                "cluster.user",
                "user and password_file go together (NATS user/password authentication)",
            );
        }
        Ok(())
    }
}
