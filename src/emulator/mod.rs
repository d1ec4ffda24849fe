//! An emulator of the Genesys Cloud guest chat server side (REST + websocket) on one loopback port.
//!
//! It is the ground truth of guestd's tests, the embedded default of `guestd demo`, and a product
//! feature: users point their own integration tests at `guestd emulator`. It follows
//! `../shared/protocol/genesys-guest-chat.md`; behaviours that are guesses about the real platform
//! are listed in `docs/emulator.md` and each has a knob in [`EmulatorConfig`].
//!
//! Shape: [`World`](world::World) holds the model under one lock (see its doc for why), `http`
//! serves the Genesys paths and the admin API under `/emulator/`, `socket` runs one task per
//! websocket, and a rules task per conversation fires the server-side timers.

mod http;
/// The Web Messaging server side.
pub mod messaging;
mod platform;
mod socket;
pub mod world;

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::broadcast;
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use world::{EndCause, LogEntry, SocketCmd, World};

pub use world::EndCause as EmulatorEndCause;

/// Every knob of the emulated platform. Durations in config files are humantime strings ("30s").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmulatorConfig {
    /// Heartbeat period on every socket (platform: about 30 s).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How long a guest without a live socket is kept before it goes DISCONNECTED
    /// ("a couple of minutes" on the platform **[unsure]**; default 2 min).
    #[serde(with = "humantime_serde")]
    pub reconnect_grace: Duration,
    /// No guest message for this long while an agent is connected ends the chat (15 min).
    #[serde(with = "humantime_serde")]
    pub inactivity_timeout: Duration,
    /// Whether typing indicators count as guest activity (**[unsure]**; default no).
    pub typing_counts_as_activity: bool,
    /// Delay from create to an agent being offered the chat; `None` (`"never"` in a file) means
    /// only on admin command.
    #[serde(with = "never_or_duration")]
    pub agent_join_delay: Option<Duration>,
    /// How long an offered agent stays ALERTING before CONNECTED.
    #[serde(with = "humantime_serde")]
    pub agent_alert_duration: Duration,
    /// Whether the workflow member goes DISCONNECTED when an agent connects (**[unsure]**).
    pub workflow_leaves_on_agent: bool,
    /// Lifetime of a jwt from create; calls after it answer 401.
    #[serde(with = "humantime_serde")]
    pub jwt_lifetime: Duration,
    /// After `v2.system.socket_closing`, how long before the server closes that socket (about 1 min).
    #[serde(with = "humantime_serde")]
    pub socket_closing_delay: Duration,
    /// Close every socket of a chat (code 1000) right after it ends (**[unsure]**).
    pub close_sockets_on_end: bool,
    /// Whether the websocket handshake must carry `Authorization: Bearer <jwt>` (**[unsure]**: the
    /// public record shows the URI alone; a header that is present is always checked).
    pub stream_requires_jwt: bool,
    /// Host (and port) put into `eventStreamUri`; default the address the emulator listens on.
    pub public_host: Option<String>,
    /// Serve HTTPS and WSS with this certificate chain (PEM); plaintext when unset.
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// The private key (PEM) of `tls_cert_file`.
    pub tls_key_file: Option<std::path::PathBuf>,
    /// When the agent (or a flow) ends a chat, the guest's leave date equals the ender's, as the
    /// platform closes the guest's leg in the same operation (**[unsure]**: reported as the
    /// normal case; `false` keeps every leave date strictly after the previous one).
    pub tie_leave_dates: bool,
    /// Platform API: the OAuth client id the token endpoint accepts.
    pub platform_client_id: String,
    /// Platform API: its secret.
    pub platform_client_secret: String,
    /// Platform API: `expires_in` of an access token.
    #[serde(with = "humantime_serde")]
    pub platform_token_lifetime: Duration,
    /// Platform API: the customer's `disconnectType` when the grace rule ended the chat
    /// (**[unsure]**: not in the public record).
    pub platform_lost_connection_type: String,
    /// Platform API: the customer's `disconnectType` when the no-activity rule ended the chat
    /// (**[unsure]**).
    pub platform_inactivity_type: String,
    /// Largest message a socket accepts from a client, bytes.
    pub max_client_frame: usize,
    /// Entries kept in the guest-side log.
    pub log_limit: usize,
    /// The Web Messaging side (`/v1?deploymentId=`): deployment settings and limits.
    pub web_messaging: messaging::WebMessagingConfig,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            heartbeat_interval: Duration::from_secs(30),
            reconnect_grace: Duration::from_secs(120),
            inactivity_timeout: Duration::from_secs(15 * 60),
            typing_counts_as_activity: false,
            agent_join_delay: Some(Duration::from_secs(5)),
            agent_alert_duration: Duration::from_millis(500),
            workflow_leaves_on_agent: true,
            jwt_lifetime: Duration::from_secs(2 * 3600),
            socket_closing_delay: Duration::from_secs(60),
            close_sockets_on_end: true,
            stream_requires_jwt: false,
            public_host: None,
            tls_cert_file: None,
            tls_key_file: None,
            tie_leave_dates: true,
            platform_client_id: "emulator-client".into(),
            platform_client_secret: "emulator-secret".into(),
            platform_token_lifetime: Duration::from_secs(86_400),
            platform_lost_connection_type: "transport.failure".into(),
            platform_inactivity_type: "timeout".into(),
            max_client_frame: 64 * 1024,
            log_limit: 100_000,
            web_messaging: messaging::WebMessagingConfig::default(),
        }
    }
}

/// `"never"` (also `"off"`, `"none"`) or a humantime duration such as `"5s"`.
mod never_or_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_str("never"),
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        match text.trim() {
            "never" | "off" | "none" => Ok(None),
            t => humantime::parse_duration(t)
                .map(Some)
                .map_err(|e| serde::de::Error::custom(format!("{t:?}: {e} (or \"never\")"))),
        }
    }
}

/// A read-only view of one conversation, for tests and the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct ConversationView {
    /// Conversation id.
    pub id: String,
    /// The guest member id.
    pub guest_member_id: String,
    /// The agent member id, once one was offered.
    pub agent_member_id: Option<String>,
    /// Why it ended, if it did.
    pub ended: Option<EndCause>,
    /// Members in join order.
    pub members: Vec<crate::backends::guest_chat::protocol::Member>,
    /// Messages in order.
    pub messages: Vec<crate::backends::guest_chat::protocol::Message>,
    /// Sockets counted as connected.
    pub live_sockets: usize,
}

/// Counters for benches and dashboards.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmulatorStats {
    /// Conversations created.
    pub conversations: usize,
    /// Conversations not ended.
    pub active: usize,
    /// Sockets counted as connected.
    pub live_sockets: usize,
    /// Heartbeat frames written since start.
    pub heartbeats_sent: u64,
}

/// Errors of the admin operations.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No such conversation.
    #[error("no conversation {0}")]
    NoConversation(String),
    /// The conversation ended; it never reopens.
    #[error("conversation {0} has ended")]
    Ended(String),
    /// The operation needs an agent that is not there.
    #[error("conversation {0} has no connected agent")]
    NoAgent(String),
    /// Nothing to act on.
    #[error("{0}")]
    Nothing(String),
}

pub(crate) struct Shared {
    pub world: Mutex<World>,
    /// Serving HTTPS/WSS.
    pub https: bool,
    pub cfg: EmulatorConfig,
    pub stream_bases: Vec<String>,
    pub next_base: AtomicUsize,
    /// Heartbeat frames written, across all sockets.
    pub heartbeats: AtomicU64,
    /// Web Messaging sessions.
    pub wm: Mutex<messaging::WmWorld>,
    pub cancel: CancellationToken,
}

impl Shared {
    /// Lock the world; a poisoned lock (a panic elsewhere) is recovered, the state is still sound
    /// enough for a test double.
    pub fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The websocket base for the next chat (round robin over the listen addresses).
    pub fn next_stream_base(&self) -> &str {
        let i = self.next_base.fetch_add(1, Ordering::Relaxed);
        &self.stream_bases[i % self.stream_bases.len()]
    }

    /// Create a chat as the platform's create call does: the conversation, its rules task, its
    /// `eventStreamUri`. The one path for the REST call and the bulk admin call. `Err` carries
    /// an injected fault for the create call.
    pub(crate) fn create_chat(
        self: &Arc<Self>,
        info: &crate::backends::guest_chat::protocol::MemberInfo,
        log_detail: String,
        take_faults: bool,
    ) -> Result<crate::backends::guest_chat::protocol::CreateChatResponse, http::ApiError> {
        let (id, jwt, guest, notify) = {
            let mut w = self.world();
            if take_faults {
                if let Some(e) = http::injected_fault(&mut w) {
                    w.record(None, "create", Some(e.status_code()), "injected".into());
                    return Err(e);
                }
            }
            let out = w.create(info, Instant::now());
            w.record(Some(&out.0), "create", Some(200), log_detail);
            out
        };
        self.spawn_rules(id.clone(), notify);
        Ok(crate::backends::guest_chat::protocol::CreateChatResponse {
            event_stream_uri: format!("{}/v2/stream/{id}", self.next_stream_base()),
            id,
            jwt,
            member: crate::backends::guest_chat::protocol::IdRef { id: guest },
        })
    }

    pub fn spawn_rules(self: &Arc<Self>, conv_id: String, notify: Arc<tokio::sync::Notify>) {
        let shared = self.clone();
        tokio::spawn(async move {
            loop {
                let next = shared.world().tick(&conv_id, Instant::now());
                let Some(next) = next else { break };
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {}
                    _ = notify.notified() => {}
                    _ = shared.cancel.cancelled() => break,
                }
            }
        });
    }
}

/// A running emulator. Dropping it does not stop it; call [`Emulator::shutdown`].
#[derive(Clone)]
pub struct Emulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Emulator {
    /// Bind `addr` (port 0 for an ephemeral port) and serve until shutdown.
    pub async fn start(cfg: EmulatorConfig, addr: SocketAddr) -> std::io::Result<Emulator> {
        Self::start_multi(cfg, &[addr]).await
    }

    /// Serve the same emulated platform on several addresses (for example 127.0.0.1..4, so a
    /// benchmark's 50k client sockets are not limited by one destination's ephemeral ports).
    /// Each new chat's `eventStreamUri` names the next address in turn.
    pub async fn start_multi(
        cfg: EmulatorConfig,
        addrs: &[SocketAddr],
    ) -> std::io::Result<Emulator> {
        let mut listeners = Vec::new();
        for a in addrs {
            listeners.push(tokio::net::TcpListener::bind(a).await?);
        }
        let bound: Vec<SocketAddr> = listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<Result<_, _>>()?;
        let addr = *bound.first().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to listen on")
        })?;
        let tls = tls_acceptor(&cfg)?;
        let ws = if tls.is_some() { "wss" } else { "ws" };
        let stream_bases = match &cfg.public_host {
            Some(h) => vec![format!("{ws}://{h}")],
            None => bound.iter().map(|a| format!("{ws}://{a}")).collect(),
        };
        let shared = Arc::new(Shared {
            world: Mutex::new(World::new(cfg.clone())),
            https: tls.is_some(),
            cfg,
            stream_bases,
            next_base: AtomicUsize::new(0),
            heartbeats: AtomicU64::new(0),
            wm: Mutex::new(messaging::WmWorld::default()),
            cancel: CancellationToken::new(),
        });
        let app = http::router(shared.clone());
        for listener in listeners {
            tokio::spawn(serve_listener(
                listener,
                app.clone(),
                shared.cancel.clone(),
                tls.clone(),
            ));
        }
        tracing::info!(addrs = ?bound, "emulator listening");
        Ok(Emulator { addr, shared })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr` (or `https://`), the API base to configure guestd with.
    pub fn base_url(&self) -> String {
        let scheme = if self.shared.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Stop serving and close every socket.
    pub fn shutdown(&self) {
        self.shared.cancel.cancel();
    }

    /// Subscribe to the guest-side log as it grows.
    pub fn subscribe_log(&self) -> broadcast::Receiver<LogEntry> {
        self.shared.world().log_tx.subscribe()
    }

    /// The guest-side log so far.
    pub fn log(&self) -> Vec<LogEntry> {
        self.shared.world().log.clone()
    }

    /// Every HTTP request received so far, as `METHOD /path?query`, routed or not.
    pub fn requests(&self) -> Vec<String> {
        self.shared.world().requests.clone()
    }

    /// Counters.
    pub fn stats(&self) -> EmulatorStats {
        let w = self.shared.world();
        EmulatorStats {
            conversations: w.convs.len(),
            active: w.convs.values().filter(|c| c.ended.is_none()).count(),
            live_sockets: w.live_sockets,
            heartbeats_sent: self.shared.heartbeats.load(Ordering::Relaxed),
        }
    }

    /// All conversation ids.
    pub fn conversation_ids(&self) -> Vec<String> {
        self.shared.world().convs.keys().cloned().collect()
    }

    /// One conversation.
    pub fn conversation(&self, id: &str) -> Option<ConversationView> {
        let w = self.shared.world();
        let c = w.convs.get(id)?;
        Some(ConversationView {
            id: c.id.clone(),
            guest_member_id: c.guest_id.clone(),
            agent_member_id: c.agent_id.clone(),
            ended: c.ended,
            members: c.members.clone(),
            messages: c.messages.clone(),
            live_sockets: c.sockets.values().filter(|s| s.live).count(),
        })
    }

    fn with_live<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut World) -> Result<T, AdminError>,
    ) -> Result<T, AdminError> {
        let mut w = self.shared.world();
        match w.convs.get(id) {
            None => return Err(AdminError::NoConversation(id.to_string())),
            Some(c) if c.ended.is_some() => return Err(AdminError::Ended(id.to_string())),
            Some(_) => {}
        }
        f(&mut w)
    }

    /// Offer the chat to an agent now (ALERTING, then CONNECTED after the alert duration).
    pub fn agent_join(&self, id: &str) -> Result<(), AdminError> {
        let alert = self.shared.cfg.agent_alert_duration;
        self.with_live(id, |w| {
            let c = Self::agentless(w, id)?;
            c.agent_alert(Instant::now(), alert);
            c.notify.notify_one();
            Ok(())
        })
    }

    /// The conversation, if no agent was offered it yet.
    fn agentless<'w>(w: &'w mut World, id: &str) -> Result<&'w mut world::Conv, AdminError> {
        let c = w
            .convs
            .get_mut(id)
            .ok_or_else(|| AdminError::NoConversation(id.into()))?;
        if c.agent_id.is_some() {
            return Err(AdminError::Nothing(format!("{id} already has an agent")));
        }
        Ok(c)
    }

    fn agent_id(w: &World, id: &str) -> Result<String, AdminError> {
        let c = w
            .convs
            .get(id)
            .ok_or_else(|| AdminError::NoConversation(id.into()))?;
        let a = c
            .agent_id
            .clone()
            .ok_or_else(|| AdminError::NoAgent(id.into()))?;
        if c.member_state(&a) != Some(crate::backends::guest_chat::protocol::MemberState::Connected)
        {
            return Err(AdminError::NoAgent(id.into()));
        }
        Ok(a)
    }

    /// The agent sends a message.
    pub fn agent_send(
        &self,
        id: &str,
        body: &str,
    ) -> Result<crate::backends::guest_chat::protocol::Message, AdminError> {
        self.with_live(id, |w| {
            let agent = Self::agent_id(w, id)?;
            let c = w
                .convs
                .get_mut(id)
                .ok_or_else(|| AdminError::NoConversation(id.into()))?;
            Ok(c.post_message(
                &agent,
                body,
                crate::backends::guest_chat::protocol::BodyType::Standard,
            ))
        })
    }

    /// Web Messaging: script the session of `token` (an agent's text, a Disconnect, expiry...);
    /// false if there is no such session.
    pub fn messaging(&self, token: &str, action: messaging::WmAdmin) -> bool {
        messaging::admin(&self.shared, token, action)
    }

    /// The agent types.
    pub fn agent_typing(&self, id: &str) -> Result<(), AdminError> {
        self.with_live(id, |w| {
            let agent = Self::agent_id(w, id)?;
            let c = w
                .convs
                .get_mut(id)
                .ok_or_else(|| AdminError::NoConversation(id.into()))?;
            c.post_typing(&agent);
            Ok(())
        })
    }

    /// An agent joins (CONNECTED at once) and ends the chat `hold` later: the race of a member
    /// guestd has not met joining and leaving within milliseconds. Zero ends it under the same
    /// lock, so the three member-change frames go out back to back.
    pub fn agent_flash(&self, id: &str, hold: Duration) -> Result<(), AdminError> {
        self.with_live(id, |w| {
            let c = Self::agentless(w, id)?;
            c.agent_flash(Instant::now(), hold);
            c.notify.notify_one();
            if hold.is_zero() {
                w.end(id, EndCause::AgentEnded);
            }
            Ok(())
        })
    }

    /// The agent disconnects the interaction; the chat ends.
    pub fn agent_end(&self, id: &str) -> Result<(), AdminError> {
        self.with_live(id, |w| {
            Self::agent_id(w, id)?;
            w.end(id, EndCause::AgentEnded);
            Ok(())
        })
    }

    /// A flow's Disconnect block runs (typically while queued); the chat ends.
    pub fn flow_disconnect(&self, id: &str) -> Result<(), AdminError> {
        self.with_live(id, |w| {
            w.end(id, EndCause::FlowDisconnected);
            Ok(())
        })
    }

    fn sockets(&self, id: &str, cmd: SocketCmd) -> Result<usize, AdminError> {
        self.with_live(id, |w| match w.send_to_sockets(id, cmd) {
            0 => Err(AdminError::Nothing(format!("{id} has no live socket"))),
            n => Ok(n),
        })
    }

    /// Drop the guest's sockets: with a close frame (`reset = false`) or a TCP reset.
    pub fn drop_sockets(&self, id: &str, reset: bool) -> Result<usize, AdminError> {
        self.sockets(
            id,
            if reset {
                SocketCmd::Reset
            } else {
                SocketCmd::Close(1011)
            },
        )
    }

    /// Stop heartbeats and answers on the guest's sockets, keeping TCP open; the platform
    /// treats the guest as gone and starts the grace window.
    pub fn half_open(&self, id: &str) -> Result<usize, AdminError> {
        self.sockets(id, SocketCmd::HalfOpen)
    }

    /// Hostile: flood the guest's sockets with protocol pings for `span`, reading nothing
    /// meanwhile (logged as `ping_flood` with the count when done).
    pub fn ping_flood(&self, id: &str, span: Duration) -> Result<usize, AdminError> {
        self.sockets(id, SocketCmd::PingFlood(span))
    }

    /// Send `v2.system.socket_closing`; the socket closes after `socket_closing_delay`.
    pub fn socket_closing(&self, id: &str) -> Result<usize, AdminError> {
        self.sockets(id, SocketCmd::Closing)
    }

    /// Send a frame that is not JSON.
    pub fn send_malformed(&self, id: &str) -> Result<usize, AdminError> {
        self.sockets(
            id,
            SocketCmd::Text(r#"{"topicName": "v2.conversations.chats.#"#.into()),
        )
    }

    /// Send a well-formed frame of `bytes` bytes (to trip a client's frame limit).
    pub fn send_oversized(&self, id: &str, bytes: usize) -> Result<usize, AdminError> {
        let body = serde_json::json!({ "message": "x".repeat(bytes) });
        let text =
            crate::backends::guest_chat::protocol::encode_envelope("channel.metadata", body, None);
        self.sockets(id, SocketCmd::Text(text.into()))
    }

    /// Send a frame of an unknown topic.
    pub fn send_unknown(&self, id: &str) -> Result<usize, AdminError> {
        let text = crate::backends::guest_chat::protocol::encode_envelope(
            "v2.emulator.unknown",
            serde_json::json!({ "hello": "world" }),
            Some("mystery"),
        );
        self.sockets(id, SocketCmd::Text(text.into()))
    }

    /// Send the last event of the conversation again.
    pub fn send_duplicate(&self, id: &str) -> Result<usize, AdminError> {
        let frame = {
            let w = self.shared.world();
            w.convs.get(id).and_then(|c| c.last_frame.clone())
        };
        let frame = frame.ok_or_else(|| AdminError::Nothing(format!("{id} has sent no event")))?;
        self.sockets(id, SocketCmd::Text(frame))
    }

    /// The platform disconnects the guest for a reason it does not tell; the chat ends.
    pub fn server_end(&self, id: &str) -> Result<(), AdminError> {
        self.with_live(id, |w| {
            w.end(id, EndCause::Server);
            Ok(())
        })
    }

    /// Refuse (`true`) or allow again (`false`) websocket handshakes for the chat: the guest
    /// cannot reconnect, as in a network partition. REST still works.
    pub fn block_stream(&self, id: &str, blocked: bool) -> Result<(), AdminError> {
        let mut w = self.shared.world();
        let c = w
            .convs
            .get_mut(id)
            .ok_or_else(|| AdminError::NoConversation(id.into()))?;
        c.stream_blocked = blocked;
        Ok(())
    }

    /// The conversation's jwt, for tests and audits (for example: check it never appears in logs).
    pub fn jwt(&self, id: &str) -> Option<String> {
        self.shared.world().convs.get(id).map(|c| c.jwt.clone())
    }

    /// Make the conversation's jwt expire now.
    pub fn expire_jwt(&self, id: &str) -> Result<(), AdminError> {
        let mut w = self.shared.world();
        let c = w
            .convs
            .get_mut(id)
            .ok_or_else(|| AdminError::NoConversation(id.into()))?;
        c.jwt_expires = Instant::now();
        Ok(())
    }

    /// Answer the next `count` guest REST calls with `status` (429 carries `Retry-After`).
    pub fn inject_rest_faults(&self, status: u16, count: usize, retry_after_secs: u64) {
        let mut w = self.shared.world();
        for _ in 0..count {
            w.rest_faults.push_back((status, retry_after_secs));
        }
    }

    /// Every guest members list waits `d` before it is read and answered (zero: at once), so a
    /// test can make a client's other calls answer first.
    pub fn delay_list_members(&self, d: Duration) {
        self.shared.world().list_members_delay = d;
    }

    /// Create `count` chats at once, as the platform's create call would (benchmarks). Returns
    /// (conversation id, guest member id, jwt, eventStreamUri) for each.
    pub fn bulk_create(&self, count: usize) -> Vec<(String, String, String, String)> {
        let info = crate::backends::guest_chat::protocol::MemberInfo {
            display_name: "Bench guest".into(),
            ..Default::default()
        };
        (0..count)
            .filter_map(|_| self.shared.create_chat(&info, "bulk".into(), false).ok())
            .map(|r| (r.id, r.member.id, r.jwt, r.event_stream_uri))
            .collect()
    }

    /// End these chats as the platform would for an unknown reason (guest DISCONNECTED first);
    /// returns, for each, the wall-clock time in microseconds at which the decisive frame (the
    /// guest's DISCONNECTED) was handed to its sockets.
    pub fn bulk_server_end(&self, ids: &[String]) -> Vec<(String, u64)> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let mut w = self.shared.world();
            let at = wall_us();
            if w.end(id, EndCause::Server) {
                out.push((id.clone(), at));
            }
        }
        out
    }

    /// Drop every live socket of every conversation (a reconnect storm). Returns how many.
    pub fn drop_all_sockets(&self, reset: bool) -> usize {
        let mut w = self.shared.world();
        let ids: Vec<String> = w.convs.keys().cloned().collect();
        ids.iter()
            .map(|id| {
                w.send_to_sockets(
                    id,
                    if reset {
                        SocketCmd::Reset
                    } else {
                        SocketCmd::Close(1011)
                    },
                )
            })
            .sum()
    }
}

/// The TLS acceptor when `tls_cert_file` and `tls_key_file` are set.
fn tls_acceptor(cfg: &EmulatorConfig) -> std::io::Result<Option<tokio_rustls::TlsAcceptor>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    let (cert, key) = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        _ => return Err(bad("tls_cert_file and tls_key_file go together".into())),
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(format!("{}: {e}", cert.display())))?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| bad(format!("{}: {e}", key.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
    .map_err(|e| bad(format!("TLS configuration: {e}")))?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

/// A plain HTTP/1 accept loop rather than `axum::serve`: axum's auto (h1/h2) builder wraps the
/// connection in a private type, and the socket task needs its own stream type back from the
/// upgrade to be able to reset the TCP connection.
async fn serve_listener(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    cancel: CancellationToken,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    tracing::warn!(error = %e, "emulator accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let tls = tls.clone();
        tokio::spawn(async move {
            let io = match tls {
                None => socket::EmuStream::Plain(tcp),
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(s) => socket::EmuStream::Tls(Box::new(s)),
                    Err(e) => {
                        tracing::debug!(error = %e, "emulator TLS handshake failed");
                        return;
                    }
                },
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "emulator connection ended with an error");
            }
        });
    }
}

/// Wall-clock microseconds since the epoch (comparable across processes on one machine).
pub fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_emulator_config_parses_and_matches_the_defaults() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/emulator.toml"))
                .unwrap();
        let cfg: EmulatorConfig = toml::from_str(&text).unwrap();
        assert_eq!(
            toml::to_string(&cfg).unwrap(),
            toml::to_string(&EmulatorConfig::default()).unwrap()
        );
    }

    #[test]
    fn agents_can_join_only_on_command_and_bad_keys_are_refused() {
        let cfg: EmulatorConfig = toml::from_str("agent_join_delay = \"never\"").unwrap();
        assert_eq!(cfg.agent_join_delay, None);
        let cfg: EmulatorConfig = toml::from_str("agent_join_delay = \"250ms\"").unwrap();
        assert_eq!(cfg.agent_join_delay, Some(Duration::from_millis(250)));
        let e = toml::from_str::<EmulatorConfig>("agent_join_delay = \"soon\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("never"), "{e}");
        let e = toml::from_str::<EmulatorConfig>("heartbeat = \"1s\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("heartbeat"), "{e}");
    }
}
