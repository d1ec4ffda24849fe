//! Configuration: a TOML file (every key documented in `config/guestd.toml`), environment
//! overrides `GUESTD_<SECTION>__<KEY>` (for example `GUESTD_SESSION__RECONNECT_GRACE=90s`), and
//! validation with errors that name the key.

use crate::backoff_policy::BackoffConfig;
use crate::session::Timing;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key or a wrong type.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// An environment override that does not fit.
    #[error("environment variable {var}: {msg}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        msg: String,
    },
    /// A value out of range.
    #[error("invalid value for {key}: {msg}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        msg: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the guest chat API is.
    pub genesys: GenesysSection,
    /// REST client.
    pub rest: RestSection,
    /// Websocket transport.
    pub stream: StreamSection,
    /// Session rules.
    /// `[session]`: the rules' durations, read straight into the machine's [`Timing`].
    pub session: Timing,
    /// Session registry.
    pub supervisor: SupervisorSection,
    /// Event output.
    pub events: EventsSection,
    /// Control channels.
    pub control: ControlSection,
    /// Session journal.
    pub journal: JournalSection,
    /// Shutdown behaviour.
    pub shutdown: ShutdownSection,
    /// The Platform API (optional): confirms every end with the platform's own account.
    pub platform: PlatformSection,
    /// Several nodes on NATS JetStream (optional; absent = one node with the file journal).
    pub cluster: ClusterSection,
    /// The Web Messaging backend (chats that name `"backend": "web_messaging"`).
    pub web_messaging: crate::webmessaging::Settings,
    /// `[status]`: how long and how many reported ends `status` remembers.
    pub status: crate::ends::Remember,
}

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
        crate::cluster::seal::parse_key(text.trim())
    }

    /// The keyring: the seal key, and the older ones still accepted.
    pub fn keyring(&self) -> Result<crate::cluster::seal::Keyring, String> {
        let current = self.seal_key()?;
        let mut accepted = Vec::new();
        for p in &self.accept_seal_key_files {
            let text = crate::secret::read_file(p)?;
            accepted.push(
                crate::cluster::seal::parse_key(text.trim())
                    .map_err(|e| format!("{}: {e}", p.display()))?,
            );
        }
        Ok(crate::cluster::seal::Keyring::new(&current, &accepted))
    }

    fn check(&self) -> Result<(), (&'static str, String)> {
        let bad = |k, m: &str| Err((k, m.to_string()));
        if !crate::cluster::valid_token(&self.node()) {
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
            if let Err(e) = crate::cluster::check_server(s, self.allow_insecure) {
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

/// `[platform]`: OAuth client credentials for the Platform API. Off while `api_base` is empty.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PlatformSection {
    /// `https://api.<region>` (or the emulator); empty: no Platform API.
    pub api_base: String,
    /// Where the token endpoint is; empty: `api_base` with `api.` replaced by `login.` (the
    /// same base when it has no `api.`, as for the emulator).
    pub login_base: String,
    /// OAuth client id (or `GUESTD_PLATFORM__CLIENT_ID`).
    pub client_id: Option<crate::secret::Secret>,
    /// OAuth client secret (or `GUESTD_PLATFORM__CLIENT_SECRET`); never logged.
    pub client_secret: Option<crate::secret::Secret>,
    /// A file whose first line is the client secret; wins over `client_secret`.
    pub client_secret_file: Option<PathBuf>,
    /// Wait this long after an `ended` before asking the platform.
    #[serde(with = "humantime_serde")]
    pub confirm_delay: Duration,
    /// Ask at most this many times for the conversation to show its `endTime`.
    pub confirm_attempts: u32,
    /// Allow a plaintext `http://` base off loopback.
    pub allow_insecure: bool,
}

impl Default for PlatformSection {
    fn default() -> Self {
        PlatformSection {
            api_base: String::new(),
            login_base: String::new(),
            client_id: None,
            client_secret: None,
            client_secret_file: None,
            confirm_delay: Duration::from_secs(2),
            confirm_attempts: 5,
            allow_insecure: false,
        }
    }
}

impl PlatformSection {
    /// Whether the Platform API is configured.
    pub fn enabled(&self) -> bool {
        !self.api_base.trim().is_empty()
    }

    /// The token endpoint's base.
    pub fn login_base(&self) -> String {
        if !self.login_base.is_empty() {
            return self.login_base.clone();
        }
        self.api_base.replacen("://api.", "://login.", 1)
    }

    /// (client id, client secret), from the file or the configuration/environment.
    pub fn credentials(&self) -> Result<(crate::secret::Secret, crate::secret::Secret), String> {
        let id = self
            .client_id
            .clone()
            .filter(|s| !s.expose().trim().is_empty())
            .ok_or("client_id is required (or GUESTD_PLATFORM__CLIENT_ID)")?;
        let secret = match &self.client_secret_file {
            Some(p) => {
                let text = crate::secret::read_file(p)?;
                crate::secret::Secret::new(text.lines().next().unwrap_or_default().trim())
            }
            None => self
                .client_secret
                .clone()
                .unwrap_or_else(|| crate::secret::Secret::new("")),
        };
        if secret.expose().is_empty() {
            return Err(
                "client_secret is required (client_secret_file or GUESTD_PLATFORM__CLIENT_SECRET)"
                    .into(),
            );
        }
        Ok((id, secret))
    }
}

/// `[genesys]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GenesysSection {
    /// API base URL of the region, or of the emulator.
    pub api_base: String,
    /// Organization id used by `start`.
    pub organization_id: String,
    /// Web chat deployment id used by `start`.
    pub deployment_id: String,
    /// Allow plaintext http/ws to hosts other than loopback.
    pub allow_insecure: bool,
    /// Extra trusted root certificates (PEM), added to the webpki roots: a corporate TLS proxy,
    /// or a test server. Verification itself is never turned off.
    pub extra_ca_file: Option<PathBuf>,
    /// More hosts an event stream (an `attach`'s `eventStreamUri`, a create reply's) may name:
    /// `host` or `*.domain`. The API host and its parent domain are always allowed
    /// (`crate::backend::default_stream_hosts`).
    pub stream_hosts: Vec<String>,
}

impl Default for GenesysSection {
    fn default() -> Self {
        GenesysSection {
            api_base: "https://api.mypurecloud.com".into(),
            organization_id: String::new(),
            deployment_id: String::new(),
            allow_insecure: false,
            extra_ca_file: None,
            stream_hosts: Vec::new(),
        }
    }
}

impl GenesysSection {
    /// The certificates of `extra_ca_file` (none when unset).
    pub fn extra_roots(&self) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
        use rustls::pki_types::pem::PemObject;
        let Some(path) = &self.extra_ca_file else {
            return Ok(Vec::new());
        };
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| e.to_string())?;
        if certs.is_empty() {
            return Err("no certificate in the file".into());
        }
        Ok(certs)
    }
}

/// `[rest]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RestSection {
    /// Per-request timeout.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Retries after the first try for 429, 5xx and transport errors.
    pub max_retries: u32,
    /// Longest Retry-After honoured.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// REST requests in flight at once, process-wide.
    pub max_concurrent: usize,
    /// Delays between retries.
    pub backoff: BackoffConfig,
}

impl Default for RestSection {
    fn default() -> Self {
        RestSection {
            timeout: Duration::from_secs(10),
            max_retries: 4,
            max_retry_after: Duration::from_secs(60),
            max_concurrent: 64,
            backoff: BackoffConfig {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(5),
                multiplier: 2.0,
                jitter: 0.3,
            },
        }
    }
}

/// `[stream]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StreamSection {
    /// Read buffer per socket, bytes (`lean_ws = false` only).
    pub read_buffer: usize,
    /// Write buffer target per socket, bytes, 0 writes every frame through (`lean_ws = false`
    /// only).
    pub write_buffer: usize,
    /// Largest message accepted from the server, bytes; also the most a frame in flight can
    /// hold (and, with `lean_ws = false`, the most a socket's read buffer can grow to for life).
    pub max_message: usize,
    /// Websocket handshake timeout.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Handshakes in flight at once, process-wide (bounds reconnect storms).
    pub max_concurrent_connects: usize,
    /// Send `Authorization: Bearer <jwt>` on the handshake.
    pub send_jwt: bool,
    /// TLS through guestd's own stream, which holds no buffer while a socket is idle
    /// (`crate::leantls`); false: tokio-rustls, which keeps about 4 KiB per socket.
    pub lean_tls: bool,
    /// Websocket frames through guestd's own reader and writer, which hold no buffer while a
    /// socket is idle (`crate::leanws`); false: tokio-tungstenite, which keeps its read buffer
    /// (`read_buffer`, growing) per socket. `read_buffer` and `write_buffer` apply to it only.
    pub lean_ws: bool,
}

impl Default for StreamSection {
    fn default() -> Self {
        StreamSection {
            read_buffer: 1024,
            write_buffer: 0,
            // The platform's largest frame is a 4,000-character message, about 17 KiB even
            // JSON-escaped; tungstenite keeps a socket's read buffer at the largest frame it
            // read, so this bound is also the most an idle session can be made to hold.
            max_message: 64 * 1024,
            connect_timeout: Duration::from_secs(10),
            max_concurrent_connects: 256,
            send_jwt: true,
            lean_tls: true,
            lean_ws: true,
        }
    }
}

/// `[supervisor]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisorSection {
    /// Sessions held at once; more are refused.
    pub max_sessions: usize,
}

impl Default for SupervisorSection {
    fn default() -> Self {
        SupervisorSection {
            max_sessions: 100_000,
        }
    }
}

/// `[events]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EventsSection {
    /// Events queued for stdout before producers wait.
    pub queue_capacity: usize,
}

impl Default for EventsSection {
    fn default() -> Self {
        EventsSection {
            queue_capacity: 4096,
        }
    }
}

/// `[control]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ControlSection {
    /// Read JSON-line commands from stdin.
    pub stdin: bool,
    /// Address of the HTTP API and ops endpoints; empty to disable.
    pub http_listen: String,
    /// Allow `http_listen` on a non-loopback address.
    pub allow_non_loopback: bool,
    /// More `Host` values the API answers to (`name:port`), e.g. a proxy's; the listener's own
    /// address, `localhost` and `[::1]` with its port are always allowed.
    pub allowed_hosts: Vec<String>,
    /// Web origins allowed to call the API (`https://console.example.com`); none by default:
    /// a request carrying another `Origin` is refused.
    pub allowed_origins: Vec<String>,
    /// A file holding the API's bearer token (first line). Unset: no token.
    pub token_file: Option<PathBuf>,
    /// The token itself, for `GUESTD_CONTROL__TOKEN`; never logged. `token_file` wins.
    pub token: Option<crate::secret::Secret>,
    /// HTTP connections open at once (beyond them, probe slots; see `control::serve`).
    pub max_connections: usize,
    /// HTTP connections open at once from one peer address.
    pub max_connections_per_peer: usize,
    /// Time a client has to send a whole request body.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
}

impl ControlSection {
    /// The API's bearer token, if one is configured.
    pub fn bearer_token(&self) -> Result<Option<crate::secret::Secret>, String> {
        match &self.token_file {
            Some(p) => {
                let text = crate::secret::read_file(p)?;
                let token = text.lines().next().unwrap_or_default().trim().to_string();
                if token.is_empty() {
                    return Err(format!("{} holds no token", p.display()));
                }
                Ok(Some(crate::secret::Secret::new(token)))
            }
            None => Ok(self.token.clone().filter(|t| !t.expose().trim().is_empty())),
        }
    }
}

impl Default for ControlSection {
    fn default() -> Self {
        ControlSection {
            stdin: true,
            http_listen: "127.0.0.1:8787".into(),
            allow_non_loopback: false,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            token_file: None,
            token: None,
            max_connections: crate::control::MAX_HTTP_CONNECTIONS,
            max_connections_per_peer: crate::control::MAX_HTTP_CONNECTIONS_PER_PEER,
            body_timeout: crate::control::HTTP_BODY_TIMEOUT,
        }
    }
}

/// `[journal]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JournalSection {
    /// Keep a journal (needed to survive restarts).
    pub enabled: bool,
    /// Its file (created 0600: it holds jwts).
    pub path: PathBuf,
    /// Rewrite it with only the live sessions each time this many bytes have been appended.
    pub compact_after_bytes: u64,
}

impl Default for JournalSection {
    fn default() -> Self {
        JournalSection {
            enabled: true,
            path: PathBuf::from("guestd-journal.jsonl"),
            compact_after_bytes: 64 * 1024 * 1024,
        }
    }
}

/// `[shutdown]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSection {
    /// Longest a SIGTERM drain may take.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Leave every chat on shutdown instead of keeping it for the next start.
    pub leave_on_shutdown: bool,
}

impl Default for ShutdownSection {
    fn default() -> Self {
        ShutdownSection {
            drain_timeout: Duration::from_secs(10),
            leave_on_shutdown: false,
        }
    }
}

/// Turn `GUESTD_A__B_C=v` pairs into overrides of key `a.b_c` in `doc`.
fn apply_env(
    doc: &mut toml::Table,
    vars: impl Iterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (var, raw) in vars {
        let Some(rest) = var.strip_prefix("GUESTD_") else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.len() < 2 || path.iter().any(|p| p.is_empty()) {
            // GUESTD_CONFIG and the like are CLI variables, not keys.
            continue;
        }
        // A value is TOML if it parses as one (numbers, booleans, arrays), else a string.
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw.clone()));
        let mut table = &mut *doc;
        for seg in &path[..path.len() - 1] {
            let entry = table
                .entry(seg.clone())
                .or_insert_with(|| toml::Value::Table(Default::default()));
            table = entry.as_table_mut().ok_or_else(|| ConfigError::Env {
                var: var.clone(),
                msg: format!("{seg} is not a section"),
            })?;
        }
        table.insert(path[path.len() - 1].clone(), value);
    }
    Ok(())
}

impl Config {
    /// Parse TOML text, apply environment overrides, validate.
    pub fn from_toml(
        text: &str,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut doc: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        apply_env(&mut doc, env)?;
        let cfg: Config = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Load a file (or the defaults when `path` is None) with the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        Config::from_toml(&text, std::env::vars())
    }

    /// Check ranges and relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, msg: &str| {
            Err(ConfigError::Invalid {
                key,
                msg: msg.into(),
            })
        };
        for h in &self.genesys.stream_hosts {
            let name = h.strip_prefix("*.").unwrap_or(h);
            if name.trim().is_empty() || name.contains(['/', '*', ' ']) {
                return bad(
                    "genesys.stream_hosts",
                    "each entry is a host (\"streams.example.net\") or \"*.domain\"",
                );
            }
        }
        let s = &self.session;
        if s.heartbeat_interval.is_zero() {
            return bad("session.heartbeat_interval", "must be > 0");
        }
        if s.heartbeat_tolerance == 0 {
            return bad("session.heartbeat_tolerance", "must be >= 1");
        }
        if s.reconnect_grace.is_zero() {
            return bad("session.reconnect_grace", "must be > 0");
        }
        if s.inactivity_timeout.is_zero() {
            return bad("session.inactivity_timeout", "must be > 0");
        }
        self.web_messaging
            .validate()
            .map_err(|(key, msg)| ConfigError::Invalid { key, msg })?;
        if s.inactivity_warning_lead >= s.inactivity_timeout {
            return bad(
                "session.inactivity_warning_lead",
                "must be shorter than inactivity_timeout",
            );
        }
        for (key, b) in [
            ("session.backoff", &s.backoff),
            ("rest.backoff", &self.rest.backoff),
        ] {
            if b.initial.is_zero()
                || b.max < b.initial
                || b.multiplier < 1.0
                || !(0.0..=1.0).contains(&b.jitter)
            {
                return bad(
                    key,
                    "needs initial > 0, max >= initial, multiplier >= 1, 0 <= jitter <= 1",
                );
            }
        }
        if self.rest.max_concurrent == 0 {
            return bad("rest.max_concurrent", "must be >= 1");
        }
        if self.stream.max_concurrent_connects == 0 {
            return bad("stream.max_concurrent_connects", "must be >= 1");
        }
        if self.stream.read_buffer < 256 {
            return bad("stream.read_buffer", "must be >= 256 bytes");
        }
        if self.stream.max_message < 1024 {
            return bad("stream.max_message", "must be >= 1024 bytes");
        }
        if self.events.queue_capacity == 0 {
            return bad("events.queue_capacity", "must be >= 1");
        }
        if self.supervisor.max_sessions == 0 {
            return bad("supervisor.max_sessions", "must be >= 1");
        }
        if let Err(e) =
            crate::backend::check_url(&self.genesys.api_base, self.genesys.allow_insecure)
        {
            return bad("genesys.api_base", &e.to_string());
        }
        if let Some(p) = &self.genesys.extra_ca_file {
            if let Err(e) = self.genesys.extra_roots() {
                return bad("genesys.extra_ca_file", &format!("{}: {e}", p.display()));
            }
        }
        if self.platform.enabled() {
            if let Err(e) =
                crate::backend::check_url(&self.platform.api_base, self.platform.allow_insecure)
            {
                return bad("platform.api_base", &e.to_string());
            }
            if let Err(e) = self.platform.credentials() {
                return bad("platform", &e);
            }
        }
        if self.cluster.enabled() {
            if self.cluster.nats_commands && !matches!(self.control.bearer_token(), Ok(Some(_))) {
                return bad(
                    "cluster.nats_commands",
                    "commands over NATS need the API token (control.token_file or \
                     GUESTD_CONTROL__TOKEN): without it anyone who can publish could drive every chat",
                );
            }
            if let Err((key, msg)) = self.cluster.check() {
                return bad(key, &msg);
            }
        }
        if !self.control.http_listen.is_empty() {
            let addr: SocketAddr = match self.control.http_listen.parse() {
                Ok(a) => a,
                Err(e) => return bad("control.http_listen", &format!("not an ip:port: {e}")),
            };
            if !addr.ip().is_loopback() && !self.control.allow_non_loopback {
                return bad(
                    "control.http_listen",
                    "must be a loopback address unless allow_non_loopback = true",
                );
            }
            if self.control.max_connections == 0 || self.control.max_connections_per_peer == 0 {
                return bad(
                    "control.max_connections",
                    "max_connections and max_connections_per_peer are at least 1",
                );
            }
            if self.control.body_timeout.is_zero() {
                return bad("control.body_timeout", "must be above 0");
            }
            if let Err(e) = self.control.bearer_token() {
                return bad("control.token_file", &e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> std::iter::Empty<(String, String)> {
        std::iter::empty()
    }

    #[test]
    fn shipped_config_file_parses_and_matches_the_defaults() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/guestd.toml"))
                .unwrap();
        let cfg = Config::from_toml(&text, none()).unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn env_overrides_keys_with_types() {
        let env = vec![
            (
                "GUESTD_SESSION__RECONNECT_GRACE".to_string(),
                "90s".to_string(),
            ),
            (
                "GUESTD_SESSION__HEARTBEAT_TOLERANCE".to_string(),
                "3".to_string(),
            ),
            (
                "GUESTD_SESSION__BACKOFF__JITTER".to_string(),
                "0.0".to_string(),
            ),
            (
                "GUESTD_GENESYS__API_BASE".to_string(),
                "http://127.0.0.1:9".to_string(),
            ),
            ("GUESTD_CONFIG".to_string(), "ignored".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let cfg = Config::from_toml("", env.into_iter()).unwrap();
        assert_eq!(cfg.session.reconnect_grace, Duration::from_secs(90));
        assert_eq!(cfg.session.heartbeat_tolerance, 3);
        assert_eq!(cfg.session.backoff.jitter, 0.0);
        assert_eq!(cfg.genesys.api_base, "http://127.0.0.1:9");
    }

    #[test]
    fn bad_config_names_the_problem() {
        let e = Config::from_toml("[session]\nheartbeat_tolerence = 2\n", none())
            .unwrap_err()
            .to_string();
        assert!(e.contains("heartbeat_tolerence"), "{e}");
        let e = Config::from_toml("[session]\nreconnect_grace = \"soon\"\n", none())
            .unwrap_err()
            .to_string();
        assert!(e.contains("reconnect_grace") || e.contains("soon"), "{e}");
        let e = Config::from_toml("[session]\ninactivity_warning_lead = \"20m\"\n", none())
            .unwrap_err()
            .to_string();
        assert!(e.contains("inactivity_warning_lead"), "{e}");
        let e = Config::from_toml("[genesys]\napi_base = \"http://example.com\"\n", none())
            .unwrap_err()
            .to_string();
        assert!(e.contains("allow_insecure"), "{e}");
        let e = Config::from_toml("[control]\nhttp_listen = \"0.0.0.0:80\"\n", none())
            .unwrap_err()
            .to_string();
        assert!(e.contains("loopback"), "{e}");
        assert!(
            Config::from_toml(
                "[genesys]\napi_base = \"http://example.com\"\nallow_insecure = true\n",
                none()
            )
            .is_ok()
        );
    }

    #[test]
    fn cluster_config_is_checked_key_by_key() {
        let dir = std::env::temp_dir().join(format!("guestd-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("seal.key");
        std::fs::write(&key, "ab".repeat(32)).unwrap();
        let base = format!(
            "[cluster]\nservers = [\"nats://127.0.0.1:4222\"]\nnode_id = \"n1\"\nseal_key_file = \"{}\"\n",
            key.display()
        );
        let cfg = Config::from_toml(&base, none()).unwrap();
        assert!(cfg.cluster.enabled());
        assert_eq!(cfg.cluster.node(), "n1");
        for (extra, key) in [
            ("node_id = \"n 1\"\n", "cluster.node_id"),
            ("prefix = \"a.b\"\n", "cluster.prefix"),
            ("lease = \"5s\"\n", "cluster.lease"),
            ("replicas = 0\n", "cluster.replicas"),
            (
                "duplicate_window = \"30days\"\n",
                "cluster.duplicate_window",
            ),
        ] {
            let text = base.replace("node_id = \"n1\"\n", "") + extra;
            let text = if key == "cluster.node_id" {
                text
            } else {
                text + "node_id = \"n1\"\n"
            };
            let e = Config::from_toml(&text, none()).unwrap_err().to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
        let e = Config::from_toml(
            "[cluster]\nservers = [\"nats://nats.example.com:4222\"]\nnode_id = \"n1\"\n",
            none(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cluster.servers") && e.contains("allow_insecure"),
            "{e}"
        );
        // No seal key: refused (unless the environment gives one, which this test does not).
        if std::env::var("GUESTD_CLUSTER_SEAL_KEY").is_err() {
            let e = Config::from_toml(
                "[cluster]\nservers = [\"nats://127.0.0.1:4222\"]\nnode_id = \"n1\"\n",
                none(),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("seal"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
