//! The backends: one folder per kind of chat guestd can supervise, each owning its wire types,
//! client, pure machine, actor and journal record, and each a `session::Backend`:
//!
//! - [`guest_chat`]: Genesys Cloud guest chat (Web Chat v2), the default;
//! - [`web_messaging`]: Genesys Cloud Web Messaging (the Messenger guest API).
//!
//! This module is the registry: the one place that turns a configuration into the backends a
//! supervisor holds ([`registry`]) and into what the rest of the daemon needs to know of them
//! (the socket hosts they may open, the secret behind derived keys). Nothing outside this
//! folder names a backend's type; adding one is a folder here and a line in [`registry`]
//! (docs/design.md, "Adding a backend").

pub mod guest_chat;
pub mod web_messaging;

use crate::config::Config;
use crate::platform::api::Platform;
use crate::platform::rest::ClientConfig;
use crate::session::Backends;
use crate::transport::policy::ApiError;
use rustls::pki_types::CertificateDer;
use std::sync::Arc;

/// What the backends can serve with this configuration (`check-config` prints these before
/// `Config::readiness`'s lines; `run` logs them at start).
pub fn readiness(cfg: &Config) -> Vec<crate::config::Readiness> {
    use crate::config::Readiness;
    let mut out = Vec::new();
    let g = &cfg.genesys;
    out.push(Readiness {
        command: "start (guest chat)",
        ready: guest_chat::client::start_missing(&g.organization_id, &g.deployment_id).is_none(),
        detail: guest_chat::client::start_missing(&g.organization_id, &g.deployment_id)
            .unwrap_or_else(|| format!("creates chats at {}", g.api_base)),
    });
    out.push(Readiness {
        command: "attach (guest chat)",
        ready: true,
        detail: "needs nothing configured: the command carries the chat's ids and jwt".into(),
    });
    let wm = cfg.web_messaging.deployment_id.trim().is_empty();
    out.push(Readiness {
        command: "start/attach (web_messaging)",
        ready: !wm,
        detail: if wm {
            "each command must name its deployment_id: web_messaging.deployment_id \
             (GUESTD_WEB_MESSAGING__DEPLOYMENT_ID) is unset"
                .into()
        } else {
            format!("deployment {}", cfg.web_messaging.deployment_id)
        },
    });
    out
}

/// The backends a configuration describes, the default (guest chat) first. `platform`, when
/// configured, confirms every guest chat end.
pub fn registry(
    cfg: &Config,
    roots: &[CertificateDer<'static>],
    platform: Option<Platform>,
) -> Result<Backends, ApiError> {
    let guest = guest_chat::GuestChat {
        api: Arc::new(guest_api(cfg, roots)?),
        timing: Arc::new(cfg.session.clone()),
        platform,
    };
    let messaging = web_messaging::client::Messaging::new(
        cfg.web_messaging.clone(),
        rest_config(cfg, "", cfg.genesys.allow_insecure, roots),
    )?;
    Ok(Backends::new(vec![
        Arc::new(guest_chat::GuestChatBackend(Arc::new(guest))),
        Arc::new(web_messaging::backend::WebMessaging(Arc::new(messaging))),
    ]))
}

/// The guest chat API client a configuration describes.
pub fn guest_api(
    cfg: &Config,
    roots: &[CertificateDer<'static>],
) -> Result<guest_chat::client::GenesysApi, ApiError> {
    guest_chat::client::GenesysApi::new(rest_config(
        cfg,
        &cfg.genesys.api_base,
        cfg.genesys.allow_insecure,
        roots,
    ))
}

/// The hosts the backends' sockets may be opened to: the guest API's host and parent domain,
/// the Web Messaging socket's host (from the configuration, like the API base), and
/// `genesys.stream_hosts`.
pub fn stream_hosts(cfg: &Config) -> Vec<String> {
    let mut hosts = crate::transport::policy::default_stream_hosts(&cfg.genesys.api_base);
    let wm = web_messaging::client::Endpoints::of(&cfg.web_messaging);
    if let Some(h) = url::Url::parse(&wm.socket)
        .ok()
        .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
    {
        hosts.push(h);
    }
    hosts.extend(cfg.genesys.stream_hosts.iter().cloned());
    hosts
}

/// The secret behind the keys a backend derives for its chats (Web Messaging's conversation
/// keys): the same on every node of a cluster, and across restarts. The first call wins.
pub fn set_key_secret(secret: &[u8; 32]) {
    web_messaging::set_key_secret(secret);
}

/// The REST settings of a configuration (`[rest]`, the guest chat's organization and
/// deployment) for a Genesys client of `api_base`.
pub fn rest_config(
    cfg: &Config,
    api_base: &str,
    allow_insecure: bool,
    extra_roots: &[rustls::pki_types::CertificateDer<'static>],
) -> ClientConfig {
    ClientConfig {
        api_base: api_base.to_string(),
        organization_id: cfg.genesys.organization_id.clone(),
        deployment_id: cfg.genesys.deployment_id.clone(),
        timeout: cfg.rest.timeout,
        max_retries: cfg.rest.max_retries,
        backoff: cfg.rest.backoff.clone(),
        max_retry_after: cfg.rest.max_retry_after,
        allow_insecure,
        max_concurrent: cfg.rest.max_concurrent,
        extra_roots: extra_roots.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_start_lacks_and_attach_needs_nothing() {
        let cfg = Config::default();
        let r = readiness(&cfg);
        let start = r
            .iter()
            .find(|r| r.command == "start (guest chat)")
            .unwrap();
        assert!(!start.ready);
        for needle in [
            "genesys.organization_id (GUESTD_GENESYS__ORGANIZATION_ID)",
            "genesys.deployment_id (GUESTD_GENESYS__DEPLOYMENT_ID)",
        ] {
            assert!(start.detail.contains(needle), "{}", start.detail);
        }
        assert!(
            r.iter()
                .any(|r| r.command == "attach (guest chat)" && r.ready)
        );
        let mut cfg = Config::default();
        cfg.genesys.organization_id = "o".into();
        let m = guest_chat::client::start_missing(&cfg.genesys.organization_id, "").unwrap();
        assert!(
            m.contains("deployment_id") && !m.contains("organization_id"),
            "{m}"
        );
        cfg.genesys.deployment_id = "d".into();
        assert!(readiness(&cfg)[0].ready);
    }
}
