//! Wiring: turn a [`Config`] into a running guestd (journal, event writer, backend, supervisor,
//! control channels) and shut it down in order. `guestd run` and `guestd demo` both use it.

use crate::config::Config;
use crate::control::{self, HttpState};
use crate::events::{self, Emitter, EventSink};
use crate::journal::{FileJournal, Journal, NullJournal};
use crate::session::SessionCtx;
use crate::supervisor::Supervisor;
use crate::transport::stream::{Connector, StreamConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::AsyncRead;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Why guestd could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The journal.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    /// The backend client.
    #[error("backend: {0}")]
    Backend(#[from] crate::transport::policy::ApiError),
    /// Cluster mode: NATS or JetStream.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The HTTP listener.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A running guestd.
pub struct Running {
    /// The session registry.
    pub sup: Supervisor,
    /// Where the HTTP API listens, if enabled.
    pub http_addr: Option<SocketAddr>,
    emitter: Emitter,
    writer: tokio::task::JoinHandle<()>,
    journal: Arc<dyn Journal>,
    sessions_cancel: CancellationToken,
    control_cancel: CancellationToken,
    ready: watch::Sender<bool>,
    cfg: Config,
    node: Option<crate::cluster::node::Node>,
    /// What a SIGHUP may change in place (`crate::reload`).
    pub(crate) access: Option<(crate::control::access::AccessCell, SocketAddr)>,
    pub(crate) platform: Option<Arc<crate::platform::api::PlatformApi>>,
}

/// What a shutdown did.
#[derive(Debug, Clone, PartialEq)]
pub struct ShutdownReport {
    /// Sessions live when it began.
    pub sessions: usize,
    /// Whether all of them finished inside the drain timeout.
    pub drained: bool,
    /// Whether every queued event was written and flushed (false: the sink was stalled or
    /// failing; the journal keeps every undelivered `ended`).
    pub delivered: bool,
}

/// The Platform API client, when `[platform]` is configured.
pub fn platform_api(
    cfg: &Config,
    extra_roots: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<Option<crate::platform::api::PlatformApi>, DaemonError> {
    if !cfg.platform.enabled() {
        return Ok(None);
    }
    let (client_id, client_secret) = cfg
        .platform
        .credentials()
        .map_err(crate::transport::policy::ApiError::Policy)?;
    let mut rest = crate::backends::rest_config(
        cfg,
        &cfg.platform.api_base,
        cfg.platform.allow_insecure,
        extra_roots,
    );
    // Confirmations are background work: a small cap keeps them out of the chats' way.
    rest.max_concurrent = 8;
    Ok(Some(crate::platform::api::PlatformApi::new(
        crate::platform::api::PlatformConfig {
            rest,
            login_base: cfg.platform.login_base(),
            client_id,
            client_secret,
            confirm_delay: cfg.platform.confirm_delay,
            confirm_attempts: cfg.platform.confirm_attempts,
        },
    )?))
}

/// Start guestd with `sink` for events and optionally `stdin` for commands.
pub async fn start<S: EventSink, R: AsyncRead + Unpin + Send + 'static>(
    cfg: Config,
    sink: S,
    stdin: Option<R>,
) -> Result<Running, DaemonError> {
    start_with(cfg, sink, stdin, Vec::new()).await
}

/// [`start`], with backends of the caller's registered after the configured ones (an embedder's
/// own backend; the seam's test backend in tests/seam.rs).
pub async fn start_with<S: EventSink, R: AsyncRead + Unpin + Send + 'static>(
    cfg: Config,
    sink: S,
    stdin: Option<R>,
    extra: Vec<Arc<dyn crate::session::Backend>>,
) -> Result<Running, DaemonError> {
    crate::metrics::install();
    metrics::gauge!("guestd_connects_in_flight_limit")
        .set(cfg.stream.max_concurrent_connects as f64);
    // Bound first: a client that connects while the node joins its cluster (or replays its
    // journal) waits in the backlog instead of being refused.
    let listener = if cfg.control.http_listen.is_empty() {
        None
    } else {
        let addr = cfg.control.http_listen.clone();
        Some(
            tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(|source| DaemonError::Listen { addr, source })?,
        )
    };
    // Cluster mode: the journal is the sessions bucket, events also go to the stream, and the
    // chats to resume are found by the node's claimer instead of a file.
    let node = if cfg.cluster.enabled() {
        let keys = cfg
            .cluster
            .keyring()
            .map_err(crate::cluster::ClusterError::Config)?;
        tracing::info!(key_ids = ?keys.kids(), "cluster secret loaded (seals with the first key id)");
        let nats = crate::cluster::connect(&cfg.cluster).await?;
        Some(crate::cluster::node::Node::join(nats, &cfg.cluster, keys).await?)
    } else {
        None
    };
    let (journal, recovered, ends): (Arc<dyn Journal>, _, _) = if let Some(n) = &node {
        let ends = crate::ends::Ends::new(cfg.status.clone(), None);
        if cfg.status.remember_max > 0 && !cfg.status.remember_ended.is_zero() {
            let stream = crate::cluster::ends::EndsStream::open(
                &n.nats,
                n.keys.clone(),
                cfg.cluster.replicas,
                &cfg.status,
            )
            .await?;
            ends.set_replica(Arc::new(stream));
        }
        (Arc::new(n.journal.clone()), Vec::new(), ends)
    } else if cfg.journal.enabled {
        let (j, state) = FileJournal::open_remembering(
            &cfg.journal.path,
            cfg.journal.compact_after_bytes,
            cfg.status.clone(),
        )?;
        let j = Arc::new(j);
        let ends = crate::ends::Ends::new(cfg.status.clone(), Some(j.clone()));
        ends.restore(state.remembered);
        (j, state.live, ends)
    } else {
        let ends = crate::ends::Ends::new(cfg.status.clone(), None);
        (Arc::new(NullJournal), Vec::new(), ends)
    };
    // The secret behind derived chat keys (after the journal made its directory): the
    // cluster's, or one kept beside the journal.
    if let Some(n) = &node {
        crate::backends::set_key_secret(&n.keys.conversation_keys());
    } else if cfg.journal.enabled {
        let path = cfg.journal.path.with_extension("key");
        let key = crate::secret::key_file(&path).map_err(|e| crate::journal::JournalError::Io {
            path: path.clone(),
            source: std::io::Error::other(format!("the chat key file: {e}")),
        })?;
        crate::backends::set_key_secret(&key);
    }
    let publisher = node.as_ref().map(|n| {
        crate::cluster::publish::Publisher::new(
            n.nats.js.clone(),
            n.nats.names.events.clone(),
            &n.id,
            n.keys.clone(),
        )
    });
    let sink = crate::cluster::publish::StreamSink::new(sink, publisher);
    let (emitter, writer) =
        events::spawn_writer_observed(sink, cfg.events.queue_capacity, Some(ends.observer()));
    let extra_roots = cfg
        .genesys
        .extra_roots()
        .map_err(crate::transport::policy::ApiError::Policy)?;
    let connector_roots = extra_roots;
    let platform = platform_api(&cfg, &connector_roots)?.map(Arc::new);
    let backends = crate::backends::registry(&cfg, &connector_roots, platform.clone())?;
    let backends = crate::session::Backends::new(backends.all().cloned().chain(extra).collect());
    let connector = Connector::new(
        StreamConfig {
            read_buffer: cfg.stream.read_buffer,
            write_buffer: cfg.stream.write_buffer,
            max_message: cfg.stream.max_message,
            connect_timeout: cfg.stream.connect_timeout,
            allow_insecure: cfg.genesys.allow_insecure,
            send_jwt: cfg.stream.send_jwt,
            lean_tls: cfg.stream.lean_tls,
            lean_ws: cfg.stream.lean_ws,
            extra_roots: connector_roots.clone(),
            allowed_hosts: crate::backends::stream_hosts(&cfg),
        },
        cfg.stream.max_concurrent_connects,
    );
    let sessions_cancel = CancellationToken::new();
    let control_cancel = CancellationToken::new();
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let ctx = SessionCtx {
        connector,
        emitter: emitter.clone(),
        journal: journal.clone(),
        done: done_tx,
        cancel: sessions_cancel.clone(),
        leave_on_shutdown: cfg.shutdown.leave_on_shutdown,
        fence: node.as_ref().map(|n| n.fence.clone()),
    };
    let sup = Supervisor::spawn(ctx, done_rx, cfg.supervisor.max_sessions, backends);
    if let Some(p) = &platform {
        sup.set_platform(p.clone());
    }
    sup.set_ends(ends);
    if let Some(n) = &node {
        sup.set_router(Arc::new(crate::cluster::route::Router::new(n)));
        let (n2, sup2, cancel) = (n.clone(), sup.clone(), control_cancel.clone());
        let public = if cfg.cluster.nats_commands {
            cfg.control.bearer_token().ok().flatten()
        } else {
            None
        };
        tokio::spawn(async move {
            if let Err(e) = crate::cluster::route::serve(&n2, sup2, cancel, public).await {
                tracing::error!(error = %e, "cannot serve commands over NATS");
            }
        });
        n.run(sup.clone());
    }
    let (ready, ready_rx) = watch::channel(false);
    let mut access_cell = None;
    let http_addr = if let Some(listener) = listener {
        let addr = cfg.control.http_listen.clone();
        let local = listener
            .local_addr()
            .map_err(|source| DaemonError::Listen {
                addr: addr.clone(),
                source,
            })?;
        let token = cfg
            .control
            .bearer_token()
            .map_err(|e| DaemonError::Listen {
                addr: addr.clone(),
                source: std::io::Error::other(e),
            })?;
        if token.is_none() && !local.ip().is_loopback() {
            // Anyone who reaches the address can drive, read and end every chat.
            tracing::warn!(
                addr = %local,
                "the HTTP API has no token and listens beyond loopback: anyone who reaches it \
                 can drive every chat; set control.token_file (or GUESTD_CONTROL__TOKEN) and \
                 put TLS in front"
            );
        }
        let access = crate::control::access::AccessCell::new(crate::control::access::Access::new(
            local,
            &cfg.control.allowed_hosts,
            &cfg.control.allowed_origins,
            token,
        ));
        access_cell = Some((access.clone(), local));
        let app = control::router(
            HttpState {
                sup: sup.clone(),
                ready: ready_rx,
                body_timeout: cfg.control.body_timeout,
            },
            access,
        );
        tokio::spawn(control::serve(
            listener,
            app,
            control_cancel.clone(),
            control::HttpLimits {
                max_connections: cfg.control.max_connections,
                max_per_peer: cfg.control.max_connections_per_peer,
                body_timeout: cfg.control.body_timeout,
            },
        ));
        tracing::info!(addr = %local, "HTTP API listening");
        Some(local)
    } else {
        None
    };
    let resumed = recovered.len();
    for r in recovered {
        let id = r.record.session.clone();
        if let Err(e) = sup.resume(r).await {
            tracing::error!(session = %id, error = %e, "could not resume a journaled session");
        }
    }
    if resumed > 0 {
        tracing::info!(sessions = resumed, "picked up sessions from the journal");
    }
    if let Some(input) = stdin {
        tokio::spawn(control::stdin_loop(
            sup.clone(),
            input,
            control_cancel.clone(),
        ));
    }
    // Started once nothing here can fail any more; stopped with the sessions (a shutdown's
    // mass end is not a burst worth trimming for).
    crate::heap::spawn(
        cfg.memory.trim_after,
        cfg.memory.trim_quiet,
        crate::heap::churned,
        sessions_cancel.clone(),
    );
    let _ = ready.send(true);
    Ok(Running {
        sup,
        http_addr,
        emitter,
        writer,
        journal,
        sessions_cancel,
        control_cancel,
        ready,
        cfg,
        node,
        access: access_cell,
        platform,
    })
}

impl Running {
    /// The event emitter (for process-level events).
    pub fn emitter(&self) -> &Emitter {
        &self.emitter
    }

    /// Drain: stop taking commands, let every session close (or leave, with
    /// `leave_on_shutdown`), persist, flush events. Bounded by `shutdown.drain_timeout`.
    pub async fn shutdown(self) -> ShutdownReport {
        let _ = self.ready.send(false);
        self.sup.stop_accepting();
        let sessions = self.sup.live();
        tracing::info!(
            sessions,
            leave = self.cfg.shutdown.leave_on_shutdown,
            "shutting down"
        );
        self.sessions_cancel.cancel();
        // The whole shutdown fits in drain_timeout: sessions get nine tenths of it, the final
        // journal sync and event flush what is left. A stalled stdout cannot hold it up.
        let start = tokio::time::Instant::now();
        let limit = self.cfg.shutdown.drain_timeout;
        let drained = tokio::time::timeout_at(start + limit * 9 / 10, self.sup.wait_empty())
            .await
            .is_ok();
        if !drained {
            tracing::warn!(
                left = self.sup.live(),
                "drain timeout: some sessions did not finish"
            );
        }
        self.control_cancel.cancel();
        let delivered = tokio::time::timeout_at(start + limit, async {
            if let Err(e) = self.journal.sync().await {
                tracing::error!(error = %e, "the journal's last sync failed");
            }
            self.emitter.flush().await;
        })
        .await
        .is_ok();
        if !delivered {
            tracing::error!(
                "events could not be delivered before the drain timeout; every undelivered ended \
                 stays in the journal and the next start writes it"
            );
        }
        if let Some(node) = &self.node {
            // The sessions have stopped: the others may take the chats now.
            node.leave().await;
        }
        drop(self.writer);
        ShutdownReport {
            sessions,
            drained,
            delivered,
        }
    }
}
