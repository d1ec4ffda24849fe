//! guestd supervises contact-center guest chat sessions (Genesys Cloud Web Chat v2) and reports,
//! as JSON lines, when and why each chat ends.
//!
//! Data flows one way: transport (`stream`, `genesys::client`) -> backend decode
//! (`genesys::protocol`, mapped onto `backend`'s neutral types) -> session (`session`: pure rules
//! in `machine`, I/O in `actor`) -> events (`events`). Commands flow the other way through
//! handles (`control` -> `supervisor` -> `session`). No arrow points back up: `stream` and
//! `backend` know nothing of sessions, sessions nothing of Genesys.

/// The backends, one folder each: guest chat (Web Chat v2) and Web Messaging.
pub mod backends;
/// Retry and reconnect delays (the `backoff` crate behind one small module).
pub mod backoff_policy;
/// Several nodes on NATS JetStream.
pub mod cluster;
pub mod command;
/// Configuration file, defaults and environment overrides.
pub mod config;
/// Control channels: stdin JSON lines and the loopback HTTP API, and who may drive it.
pub mod control;
/// Wiring a configuration into a running guestd.
pub mod daemon;
/// `guestd demo`: scripted chats against the embedded emulator.
pub mod demo;
/// The emulator of the Genesys guest chat server side.
pub mod emulator;
/// The ends guestd reported, remembered for `status` (a window, across restarts and nodes).
pub mod ends;
/// guestd's own event schema and the sinks that write it.
pub mod events;
/// Giving a burst's freed memory back to the system.
pub mod heap;
/// The session journal that lets a restarted guestd pick chats back up.
pub mod journal;
/// The log filter and its checks.
pub mod logging;
/// Prometheus metrics.
pub mod metrics;
/// The Platform API and the status of any conversation.
pub mod platform;
/// SIGHUP: what a reload applies in place, and what needs a restart.
pub mod reload;
/// systemd readiness notifications (`Type=notify`).
pub mod sdnotify;
/// Secret strings that never print.
pub mod secret;
/// One session: the pure state machine and the actor that drives it.
pub mod session;
/// The registry of sessions and its limits.
pub mod supervisor;
/// Sockets: the websocket client, its TLS stream, the TLS configuration, the URL policy.
pub mod transport;

/// This binary's version and git revision: the start-up log line and `guestd_build_info` name
/// both. The revision is build.rs's (`git rev-parse`), else `GUESTD_GIT_REVISION` at build time
/// (the container build, which has no .git: `--build-arg GUESTD_GIT_REVISION=...`), else
/// "unknown".
pub fn build_info() -> (&'static str, &'static str) {
    (
        env!("CARGO_PKG_VERSION"),
        match (
            option_env!("BUILD_GIT_REVISION"),
            option_env!("GUESTD_GIT_REVISION"),
        ) {
            (Some(r), _) | (None, Some(r)) if !r.is_empty() => r,
            _ => "unknown",
        },
    )
}
