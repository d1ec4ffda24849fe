//! The REST side of Web Messaging and its URLs: the history call (bearer from `getJwt`), the
//! deployment's public `config.json`, and the socket URL, for a region or the emulator.
//!
//! Calls go through the guest chat client's REST machinery (`genesys::client::Inner`): one
//! HTTP client with guestd's TLS, the process-wide cap on requests in flight, and the retry
//! policy (429 with `Retry-After`, 5xx and transport errors with backoff).

use super::Settings;
use super::machine::Deployment;
use super::protocol::{HistoryPage, StructuredMessage};
use crate::platform::rest::{ClientConfig, Inner};
use crate::secret::Secret;
use crate::transport::policy::{ApiError, check_url};
use reqwest::Method;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// History entities asked for per page.
const PAGE_SIZE: u32 = 25;
/// Pages read at most per backfill (each is one of the 10 history calls a minute allows).
const MAX_PAGES: u32 = 3;
/// How long a deployment's configuration is reused.
const CONFIG_TTL: Duration = Duration::from_secs(600);

/// Where a region's (or the emulator's) three endpoints are.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoints {
    /// `wss://webmessaging.<region>` (no path).
    pub socket: String,
    /// `https://api.<region>`.
    pub api: String,
    /// `https://api-cdn.<region>`.
    pub cdn: String,
}

impl Endpoints {
    /// The endpoints `s` names: `base_url` for all three, else the region's.
    pub fn of(s: &Settings) -> Endpoints {
        let base = s.base_url.trim_end_matches('/');
        if !base.is_empty() {
            let socket = if let Some(rest) = base.strip_prefix("https://") {
                format!("wss://{rest}")
            } else if let Some(rest) = base.strip_prefix("http://") {
                format!("ws://{rest}")
            } else {
                base.to_string()
            };
            return Endpoints {
                socket,
                api: base.to_string(),
                cdn: base.to_string(),
            };
        }
        let region = s.region.trim();
        Endpoints {
            socket: format!("wss://webmessaging.{region}"),
            api: format!("https://api.{region}"),
            cdn: format!("https://api-cdn.{region}"),
        }
    }

    /// The guest socket of `deployment`.
    pub fn socket_url(&self, deployment: &str) -> String {
        let mut u = format!("{}/v1", self.socket);
        u.push_str("?deploymentId=");
        u.extend(url::form_urlencoded::byte_serialize(deployment.as_bytes()));
        u
    }
}

/// The Web Messaging backend's shared part: settings, endpoints, REST.
pub struct Messaging {
    /// The settings.
    pub settings: Arc<Settings>,
    /// The endpoints.
    pub endpoints: Endpoints,
    rest: Inner,
    configs: Mutex<HashMap<String, (Deployment, Instant)>>,
}

impl Messaging {
    /// Build it from the settings and the REST settings of the guest chat client (timeouts,
    /// retries, TLS roots, allow_insecure); checks the URLs against the policy.
    pub fn new(settings: Settings, rest: ClientConfig) -> Result<Messaging, ApiError> {
        let endpoints = Endpoints::of(&settings);
        for u in [&endpoints.socket, &endpoints.cdn] {
            check_url(u, rest.allow_insecure)?;
        }
        let rest = Inner::new(ClientConfig {
            api_base: endpoints.api.clone(),
            ..rest
        })?;
        Ok(Messaging {
            settings: Arc::new(settings),
            endpoints,
            rest,
            configs: Mutex::new(HashMap::new()),
        })
    }

    /// What `deployment`'s `config.json` says (cached); unknown fields stay None when it cannot
    /// be read, which is logged: a session still runs, it only knows less.
    pub async fn deployment(&self, deployment: &str) -> Deployment {
        if !self.settings.read_deployment_config {
            return Deployment::default();
        }
        if let Some((d, at)) = self
            .configs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(deployment)
        {
            if at.elapsed() < CONFIG_TTL {
                return *d;
            }
        }
        let url = format!(
            "{}/webdeployments/v1/deployments/{}/config.json",
            self.endpoints.cdn,
            crate::transport::policy::path_segment(deployment)
        );
        match self
            .rest
            .call::<Value>("deployment_config", Method::GET, url, None, None)
            .await
        {
            Ok(Some(v)) => {
                let d = parse_deployment(&v);
                self.configs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(deployment.to_string(), (d, Instant::now()));
                d
            }
            Ok(None) => Deployment::default(),
            Err(e) => {
                tracing::warn!(error = %e, deployment, "could not read the deployment's config.json; an agent's end may not be visible");
                Deployment::default()
            }
        }
    }

    /// History after `after` (newest pages first, stopping at the page that holds it), and the
    /// calls it took. The messages come in no particular order.
    pub async fn history(
        &self,
        jwt: Secret,
        after: Option<String>,
    ) -> (Result<Vec<StructuredMessage>, String>, u32) {
        let mut all = Vec::new();
        let mut calls = 0;
        for page in 1..=MAX_PAGES {
            let url = format!(
                "{}/api/v2/webmessaging/messages?pageSize={PAGE_SIZE}&pageNumber={page}",
                self.endpoints.api
            );
            calls += 1;
            let r = self
                .rest
                .call::<HistoryPage>("history", Method::GET, url, Some(jwt.clone()), None)
                .await;
            let p = match r {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => return (Err(e.to_string()), calls),
            };
            let found = after
                .as_deref()
                .is_some_and(|k| p.entities.iter().any(|m| m.key() == k));
            let last = p.page_count <= page || p.entities.is_empty();
            all.extend(p.entities);
            if found || last {
                break;
            }
        }
        (Ok(all), calls)
    }
}

/// The fields of `config.json` a supervisor needs (`../shared/protocol/genesys-web-messaging.md`
/// section 6).
pub fn parse_deployment(v: &Value) -> Deployment {
    let c = v.pointer("/messenger/apps/conversations");
    let flag = |p: &str| c.and_then(|c| c.pointer(p)).and_then(Value::as_bool);
    Deployment {
        disconnect_visible: flag("/conversationDisconnect/enabled"),
        clear_allowed: flag("/conversationClear/enabled"),
        auto_start: flag("/autoStart/enabled").unwrap_or(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn endpoints_of_a_region_and_of_the_emulator() {
        let e = Endpoints::of(&Settings::default());
        assert_eq!(
            e.socket_url("d-1"),
            "wss://webmessaging.mypurecloud.com/v1?deploymentId=d-1"
        );
        assert_eq!(e.api, "https://api.mypurecloud.com");
        assert_eq!(e.cdn, "https://api-cdn.mypurecloud.com");
        let e = Endpoints::of(&Settings {
            base_url: "http://127.0.0.1:8080/".into(),
            ..Settings::default()
        });
        assert_eq!(
            e.socket_url("a b"),
            "ws://127.0.0.1:8080/v1?deploymentId=a+b"
        );
        assert_eq!(e.api, "http://127.0.0.1:8080");
    }

    #[test]
    fn the_deployment_config_fields_that_matter() {
        let v = json!({"messenger":{"apps":{"conversations":{
            "autoStart":{"enabled":true},
            "conversationDisconnect":{"enabled":false},
            "conversationClear":{"enabled":true}}}}});
        assert_eq!(
            parse_deployment(&v),
            Deployment {
                disconnect_visible: Some(false),
                clear_allowed: Some(true),
                auto_start: true
            }
        );
        assert_eq!(parse_deployment(&json!({})), Deployment::default());
    }
}
