//! The Genesys Web Messaging backend (the Messenger guest API), next to the guest chat backend
//! in `crate::genesys`.
//!
//! - [`protocol`]: the wire (client actions, server frames), with every [CONFLICT] of
//!   `../shared/protocol/genesys-web-messaging.md` accepted in both forms.
//! - [`machine`]: the pure rules of one Web Messaging session (no sockets, no clock of its own).
//! - [`actor`]: the task that owns the socket and drives the machine; it answers the same
//!   `SessionHandle` commands as a guest chat session.
//! - [`backend`]: `start`, `attach` and a restart, as the `session::Backend` the supervisor
//!   holds.
//! - [`client`]: the REST side (history with a `getJwt` bearer, the deployment's `config.json`)
//!   and the URLs of a region or of the emulator.
//!
//! Why a second machine and not one machine for both backends: the two share almost no rule.
//! Guest chat is a read-only event socket with server heartbeats, a two-minute grace window
//! and the 15-minute rule, sends over REST; Web Messaging is one bidirectional socket whose
//! sends are acknowledged by echo, liveness driven from the client (pings), a reconnect bound by
//! the session's time to live, a conversation and a session that end separately. One machine
//! would carry both sets of rules behind a flag on every branch. What they do share is the
//! outside: the command handle, the registry, the journal, the event writer and the exactly-once
//! `ended`; both backends plug into those through `crate::session`.

pub mod actor;
pub mod backend;
pub mod client;
pub mod machine;
pub mod protocol;

use crate::backoff_policy::BackoffConfig;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `[web_messaging]` in guestd's configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The deployment used when `start`/`attach` names none.
    pub deployment_id: String,
    /// The region's domain (`mypurecloud.com`, `mypurecloud.ie`, `usw2.pure.cloud`, ...): the
    /// socket is `wss://webmessaging.<region>/v1`, history `https://api.<region>`, the
    /// deployment's configuration `https://api-cdn.<region>`.
    pub region: String,
    /// Instead of `region`, one base URL serving all three (the emulator's
    /// `http://127.0.0.1:PORT`).
    pub base_url: String,
    /// Guest messages per second per session, paced locally. The reference gives 2 (Genesys's
    /// 2023 notice) and 5 (the limits page, 2026): [CONFLICT], so 2, the safe one.
    pub messages_per_second: u32,
    /// Websocket ping period; a ping unanswered by the next one means the socket is dead.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Shortest time between two `echo` health checks (the platform allows 2 per minute).
    #[serde(with = "humantime_serde")]
    pub echo_interval: Duration,
    /// Typing indicators are sent at most this often (the platform: one per 5 s).
    #[serde(with = "humantime_serde")]
    pub typing_interval: Duration,
    /// `expiry_warning` is emitted this long before the session expires ("0s" for none).
    #[serde(with = "humantime_serde")]
    pub expiry_warning_lead: Duration,
    /// A sent message not echoed within this is reported as unconfirmed.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// History calls per session per minute (the platform allows 10).
    pub history_per_minute: u32,
    /// How long a first connection (before any `SessionResponse`) may keep failing.
    #[serde(with = "humantime_serde")]
    pub first_connect_window: Duration,
    /// Reconnect delays (the transport SDK waits a fixed 5 s).
    pub backoff: BackoffConfig,
    /// Read the deployment's `config.json` at start, to know whether an agent's end can be
    /// seen at all (Conversation Disconnect) and whether a leave may clear the session.
    pub read_deployment_config: bool,
    /// Whether message events carry bodies (as `[session] include_bodies`).
    pub include_bodies: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            deployment_id: String::new(),
            region: "mypurecloud.com".into(),
            base_url: String::new(),
            messages_per_second: 2,
            ping_interval: Duration::from_secs(15),
            echo_interval: Duration::from_secs(30),
            typing_interval: Duration::from_secs(5),
            expiry_warning_lead: Duration::from_secs(300),
            send_timeout: Duration::from_secs(10),
            history_per_minute: 10,
            first_connect_window: Duration::from_secs(120),
            backoff: BackoffConfig {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(5),
                multiplier: 2.0,
                jitter: 0.3,
            },
            read_deployment_config: true,
            include_bodies: true,
        }
    }
}

impl Settings {
    /// Check the values; the key and what is wrong.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.messages_per_second == 0 {
            return Err(("web_messaging.messages_per_second", "must be >= 1".into()));
        }
        for (key, d) in [
            ("web_messaging.ping_interval", self.ping_interval),
            ("web_messaging.echo_interval", self.echo_interval),
            ("web_messaging.send_timeout", self.send_timeout),
            (
                "web_messaging.first_connect_window",
                self.first_connect_window,
            ),
        ] {
            if d.is_zero() {
                return Err((key, "must be > 0".into()));
            }
        }
        if self.history_per_minute == 0 {
            return Err(("web_messaging.history_per_minute", "must be >= 1".into()));
        }
        if self.base_url.trim().is_empty() && self.region.trim().is_empty() {
            return Err((
                "web_messaging.region",
                "region or base_url is needed".into(),
            ));
        }
        if !self.base_url.is_empty() {
            url::Url::parse(&self.base_url)
                .map_err(|e| ("web_messaging.base_url", format!("not a URL: {e}")))?;
        }
        Ok(())
    }
}

/// What a Web Messaging `start` or `attach` names (`"backend": "web_messaging"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The deployment; `[web_messaging] deployment_id` when absent.
    #[serde(default)]
    pub deployment_id: Option<String>,
    /// The session token: `start` makes a UUID when absent; `attach` needs one. A secret.
    #[serde(default)]
    pub token: Option<crate::secret::Secret>,
    /// `start` only: discard the token's old session (`configureSession{startNew: true}`):
    /// begin again after a read-only end.
    #[serde(default)]
    pub start_new: bool,
}

impl Spec {
    /// Fill in the deployment from `settings` and, for a start, a new token; or say what is
    /// missing.
    pub fn resolve(&mut self, settings: &Settings, attach: bool) -> Result<(), String> {
        let name = if attach { "attach" } else { "start" };
        if self
            .deployment_id
            .as_deref()
            .is_none_or(|d| d.trim().is_empty())
        {
            if settings.deployment_id.trim().is_empty() {
                return Err(format!(
                    "{name}: web_messaging needs deployment_id (in the command or [web_messaging])"
                ));
            }
            self.deployment_id = Some(settings.deployment_id.clone());
        }
        // It goes into the config.json URL and the socket's query.
        if let Some(d) = &self.deployment_id {
            crate::transport::policy::check_id("deployment_id", d)
                .map_err(|e| format!("{name}: {e}"))?;
        }
        match &self.token {
            None if attach => return Err("attach: web_messaging needs token".into()),
            None => self.token = Some(crate::secret::Secret::new(uuid::Uuid::new_v4().to_string())),
            Some(t) => {
                let n = t.expose().chars().count();
                if t.expose().trim().is_empty() || n > protocol::MAX_TOKEN_CHARS {
                    return Err(format!(
                        "{name}: token must have 1 to {} characters",
                        protocol::MAX_TOKEN_CHARS
                    ));
                }
            }
        }
        if attach && self.start_new {
            return Err("attach: start_new is for start".into());
        }
        Ok(())
    }

    /// The conversation key (after [`Spec::resolve`]).
    pub fn key(&self) -> String {
        conversation_key(
            self.deployment_id.as_deref().unwrap_or_default(),
            self.token.as_ref().map(|t| t.expose()).unwrap_or_default(),
        )
    }
}

/// The secret behind conversation keys, set once at start ([`set_key_secret`]): the cluster's
/// (every node must compute the same key), or one kept beside the journal (the same across
/// restarts), or, with neither, one made for this process.
static KEY_SECRET: std::sync::OnceLock<ring::hmac::Key> = std::sync::OnceLock::new();

/// Use `secret` for conversation keys; the first call wins (one daemon per process).
pub fn set_key_secret(secret: &[u8; 32]) {
    let _ = KEY_SECRET.set(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret));
}

fn key_secret() -> &'static ring::hmac::Key {
    KEY_SECRET.get_or_init(|| {
        let mut k = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut k[..]);
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k)
    })
}

/// The conversation key guestd gives a Web Messaging session: the guest side never learns the
/// platform's conversation id, and the token is a secret, so the key is a keyed digest of both
/// (HMAC-SHA256 under [`set_key_secret`]'s secret, 128 bits shown): stable, one per token (a
/// second `attach` of a token is refused, which keeps guestd at one socket per token); without
/// the secret nobody can check a guessed token against a key, nor make two tokens collide.
pub fn conversation_key(deployment_id: &str, token: &str) -> String {
    let mut ctx = ring::hmac::Context::with_key(key_secret());
    ctx.update(deployment_id.as_bytes());
    ctx.update(&[0]);
    ctx.update(token.as_bytes());
    let tag = ctx.sign();
    let hex: String = tag.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("wm-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_depends_on_deployment_and_token_and_shows_neither() {
        let a = conversation_key("dep", "secret-token");
        assert_eq!(a, conversation_key("dep", "secret-token"));
        assert_ne!(a, conversation_key("dep2", "secret-token"));
        assert_ne!(a, conversation_key("dep", "secret-token2"));
        assert!(a.starts_with("wm-") && a.len() == 35 && !a.contains("secret"));
    }

    #[test]
    fn settings_are_checked() {
        assert!(Settings::default().validate().is_ok());
        let s = Settings {
            messages_per_second: 0,
            ..Default::default()
        };
        assert_eq!(
            s.validate().unwrap_err().0,
            "web_messaging.messages_per_second"
        );
        let s = Settings {
            base_url: "not a url".into(),
            ..Default::default()
        };
        assert_eq!(s.validate().unwrap_err().0, "web_messaging.base_url");
    }
}
