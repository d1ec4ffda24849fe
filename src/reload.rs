//! SIGHUP: apply what can change without dropping a chat, name what needs a restart.
//!
//! Applied in place: the log filter (`log.level`), the HTTP API's token (`control.token_file`,
//! re-read even when its name is unchanged, or `control.token`), `control.allowed_hosts` and
//! `control.allowed_origins`, and the Platform API's client credentials (`platform.client_id`,
//! `platform.client_secret`, `platform.client_secret_file`). Every other changed key is named
//! as needing a restart and stays as it was. A configuration that fails to load or validate is
//! refused whole: nothing of it is applied.

use crate::config::Config;
use crate::daemon::Running;

/// Keys a reload applies in place.
pub const RELOADABLE: &[&str] = &[
    "log.level",
    "control.token",
    "control.token_file",
    "control.allowed_hosts",
    "control.allowed_origins",
    "platform.client_id",
    "platform.client_secret",
    "platform.client_secret_file",
];

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Keys applied (and `control.token_file` when only the file's content changed).
    pub applied: Vec<String>,
    /// Changed keys left as they were until a restart.
    pub needs_restart: Vec<String>,
}

/// The keys (dotted) whose values differ between `a` and `b`. Values are compared, never
/// printed.
pub fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    fn walk(prefix: &str, a: Option<&toml::Value>, b: Option<&toml::Value>, out: &mut Vec<String>) {
        match (a, b) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&p, x.get(k), y.get(k), out);
                }
            }
            (x, y) if x != y => out.push(prefix.to_string()),
            _ => {}
        }
    }
    let (Ok(x), Ok(y)) = (toml::Value::try_from(a), toml::Value::try_from(b)) else {
        return vec!["(unserializable)".into()];
    };
    let mut out = Vec::new();
    walk("", Some(&x), Some(&y), &mut out);
    out
}

/// The reloadable state of a running guestd: the configuration in force and the token read.
pub struct Reloader {
    /// The configuration in force: the one started with, plus what reloads applied.
    pub current: Config,
    token: Option<crate::secret::Secret>,
}

impl Reloader {
    /// For a guestd started with `cfg`.
    pub fn new(cfg: Config) -> Self {
        let token = cfg.control.bearer_token().ok().flatten();
        Reloader {
            current: cfg,
            token,
        }
    }

    /// Apply `new` (already loaded and validated) to `running`. `set_filter` installs a log
    /// filter (`Ok(false)`: unchanged, or fixed by `--log-level`); an error from it refuses the
    /// whole reload before anything else is applied.
    pub async fn apply(
        &mut self,
        running: &Running,
        new: Config,
        set_filter: impl FnOnce(&str) -> Result<bool, String>,
    ) -> Result<Report, String> {
        let changed = changed_keys(&self.current, &new);
        let token = new.control.bearer_token()?;
        if self.token.is_some() && token.is_none() {
            // An API that had a token would answer anyone from now on (off loopback: anyone
            // who reaches it); guestd warns of that at start, so it is a start's decision.
            return Err(
                "the new configuration has no API token where the running one has: \
                        removing the token needs a restart"
                    .into(),
            );
        }
        let credentials = if new.platform.enabled() {
            Some(new.platform.credentials()?)
        } else {
            None
        };
        let mut report = Report::default();
        if set_filter(&new.log.level)? {
            report.applied.push("log.level".into());
        }
        let mut next = self.current.clone();
        next.log = new.log.clone();
        if let Some((cell, local)) = &running.access {
            let token_changed = token != self.token;
            cell.set(crate::control::access::Access::new(
                *local,
                &new.control.allowed_hosts,
                &new.control.allowed_origins,
                token.clone(),
            ));
            for k in ["control.allowed_hosts", "control.allowed_origins"] {
                if changed.iter().any(|c| c == k) {
                    report.applied.push(k.into());
                }
            }
            if token_changed {
                report.applied.push(
                    if new.control.token_file.is_some() {
                        "control.token_file"
                    } else {
                        "control.token"
                    }
                    .into(),
                );
            }
            next.control.allowed_hosts = new.control.allowed_hosts.clone();
            next.control.allowed_origins = new.control.allowed_origins.clone();
            next.control.token = new.control.token.clone();
            next.control.token_file = new.control.token_file.clone();
            self.token = token;
        }
        if let (Some(api), Some((id, secret))) = (&running.platform, credentials) {
            if api.set_credentials(id, secret).await {
                report.applied.push("platform credentials".into());
            }
            next.platform.client_id = new.platform.client_id.clone();
            next.platform.client_secret = new.platform.client_secret.clone();
            next.platform.client_secret_file = new.platform.client_secret_file.clone();
        }
        report.needs_restart = changed_keys(&next, &new);
        self.current = next;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_names_each_leaf_and_never_a_value() {
        let a = Config::default();
        let mut b = Config::default();
        b.session.reconnect_grace = std::time::Duration::from_secs(9);
        b.control.token = Some(crate::secret::Secret::new("s3cr3t"));
        b.rest.backoff.jitter = 0.1;
        let keys = changed_keys(&a, &b);
        assert_eq!(
            keys,
            vec![
                "control.token",
                "rest.backoff.jitter",
                "session.reconnect_grace"
            ]
        );
        assert!(changed_keys(&a, &a).is_empty());
    }
}
