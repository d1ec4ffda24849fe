//! Who may drive the HTTP API. It listens on loopback, but loopback is not a boundary against
//! a web page in the user's browser: a cross-site `text/plain` POST reaches it, and DNS
//! rebinding lets a foreign page read it under its own host name. So every request is checked:
//!
//! - `Host` must name this listener (`127.0.0.1:PORT`, `localhost:PORT`, `[::1]:PORT`, the
//!   configured address) or one of `control.allowed_hosts`: a rebound name is refused;
//! - an `Origin` header (browsers send one on every cross-site write) must be one of
//!   `control.allowed_origins` (none by default): a page's request is refused;
//! - a request with a body must say `Content-Type: application/json`: a form or `text/plain`
//!   POST, which a page can send without a preflight, is refused;
//! - with a token configured (`control.token_file`, or `GUESTD_CONTROL__TOKEN`), `/v1/...` and
//!   `/metrics` need `Authorization: Bearer <token>`; `/healthz` and `/readyz` stay open for
//!   probes. The token is a [`Secret`]: never logged, compared in constant time.

use crate::secret::Secret;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;

/// The checks, built once from the configuration.
#[derive(Debug, Clone)]
pub struct Access {
    hosts: Vec<String>,
    origins: Vec<String>,
    token: Option<Secret>,
}

/// A refused request: status, code, and a message naming the problem.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// What was wrong.
    pub message: String,
}

impl Access {
    /// Checks for a listener bound to `listen`.
    pub fn new(
        listen: SocketAddr,
        allowed_hosts: &[String],
        allowed_origins: &[String],
        token: Option<Secret>,
    ) -> Self {
        let port = listen.port();
        let mut hosts = vec![
            listen.to_string(),
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            format!("[::1]:{port}"),
        ];
        hosts.extend(allowed_hosts.iter().map(|h| h.to_ascii_lowercase()));
        Access {
            hosts,
            origins: allowed_origins.to_vec(),
            token: token.filter(|t| !t.expose().is_empty()),
        }
    }

    /// Whether a request with these headers may go on.
    pub fn check(&self, path: &str, headers: &HeaderMap, has_body: bool) -> Result<(), Refusal> {
        let refuse = |status, code, message: String| {
            Err(Refusal {
                status,
                code,
                message,
            })
        };
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_ascii_lowercase);
        match host {
            Some(h) if self.hosts.contains(&h) => {}
            Some(h) => {
                return refuse(
                    StatusCode::FORBIDDEN,
                    "forbidden_host",
                    format!("Host {h:?} is not this API's (add it to control.allowed_hosts)"),
                );
            }
            None => {
                return refuse(StatusCode::BAD_REQUEST, "no_host", "no Host header".into());
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or_default();
            if !self.origins.iter().any(|o| o == origin) {
                return refuse(
                    StatusCode::FORBIDDEN,
                    "forbidden_origin",
                    format!(
                        "requests from web pages (Origin {origin:?}) are refused (see control.allowed_origins)"
                    ),
                );
            }
        }
        if has_body {
            let json = headers
                .get(header::CONTENT_TYPE)
                .and_then(|c| c.to_str().ok())
                .map(|c| {
                    c.split(';')
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_ascii_lowercase()
                })
                .is_some_and(|c| c == "application/json" || c.ends_with("+json"));
            if !json {
                return refuse(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "not_json",
                    "a request body must be sent as Content-Type: application/json".into(),
                );
            }
        }
        let open = matches!(path, "/healthz" | "/readyz");
        if let (Some(token), false) = (&self.token, open) {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|a| a.to_str().ok())
                .and_then(bearer_credentials)
                .unwrap_or_default();
            if !constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "missing or wrong bearer token".into(),
                );
            }
        }
        Ok(())
    }
}

/// Equal, in a time that depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

/// The checks in force, replaced whole when the configuration is reloaded (SIGHUP): a request
/// is checked against the set that was current when it arrived.
#[derive(Debug, Clone)]
pub struct AccessCell(Arc<std::sync::RwLock<Arc<Access>>>);

impl AccessCell {
    /// A cell holding `access`.
    pub fn new(access: Access) -> Self {
        AccessCell(Arc::new(std::sync::RwLock::new(Arc::new(access))))
    }
    /// The checks now.
    pub fn get(&self) -> Arc<Access> {
        match self.0.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
    /// Replace the checks.
    pub fn set(&self, access: Access) {
        match self.0.write() {
            Ok(mut a) => *a = Arc::new(access),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(access),
        }
    }
}

impl From<Access> for AccessCell {
    fn from(a: Access) -> Self {
        AccessCell::new(a)
    }
}

/// The axum middleware running [`Access::check`].
pub async fn guard(State(cell): State<AccessCell>, req: Request, next: Next) -> Response {
    let access = cell.get();
    let has_body = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|l| l.to_str().ok())
        .and_then(|l| l.parse::<u64>().ok())
        .map_or(req.headers().contains_key(header::TRANSFER_ENCODING), |n| {
            n > 0
        });
    match access.check(req.uri().path(), req.headers(), has_body) {
        Ok(()) => next.run(req).await,
        Err(r) => {
            metrics::counter!("guestd_http_refused_total", "code" => r.code).increment(1);
            (
                r.status,
                axum::Json(serde_json::json!({ "error": r.message, "code": r.code })),
            )
                .into_response()
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is case-insensitive (RFC
/// 7235, 2.1: Genesys's Messenger Transport SDK sends `bearer`), followed by one or more spaces.
pub fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    let token = rest.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn access(token: Option<&str>) -> Access {
        Access::new(
            "127.0.0.1:8787".parse().unwrap(),
            &["guestd.internal:8787".into()],
            &["https://console.example.com".into()],
            token.map(Secret::new),
        )
    }

    #[test]
    fn host_origin_content_type_and_token() {
        let a = access(None);
        let ok = |h: &HeaderMap, body| a.check("/v1/sessions", h, body);
        let local = (header::HOST, "127.0.0.1:8787");
        let json = (header::CONTENT_TYPE, "application/json; charset=utf-8");
        assert!(ok(&headers(&[local.clone(), json.clone()]), true).is_ok());
        assert!(ok(&headers(&[(header::HOST, "localhost:8787")]), false).is_ok());
        assert!(ok(&headers(&[(header::HOST, "GUESTD.internal:8787")]), false).is_ok());
        // DNS rebinding: a foreign name for the same address.
        let r = ok(&headers(&[(header::HOST, "evil.example:8787")]), false).unwrap_err();
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(ok(&headers(&[(header::HOST, "127.0.0.1:9999")]), false).is_err());
        assert!(ok(&headers(&[]), false).is_err());
        // A page's cross-site request.
        let page = (header::ORIGIN, "https://evil.example");
        let r = ok(&headers(&[local.clone(), json.clone(), page]), true).unwrap_err();
        assert_eq!(r.code, "forbidden_origin");
        let console = (header::ORIGIN, "https://console.example.com");
        assert!(ok(&headers(&[local.clone(), json.clone(), console]), true).is_ok());
        // A form or text/plain body.
        for ct in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ] {
            let r = ok(&headers(&[local.clone(), (header::CONTENT_TYPE, ct)]), true).unwrap_err();
            assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}");
        }
        assert!(
            ok(&headers(std::slice::from_ref(&local)), true).is_err(),
            "a body needs a type"
        );

        let a = access(Some("s3cret"));
        let with = |auth: &str| {
            a.check(
                "/v1/sessions",
                &headers(&[local.clone(), (header::AUTHORIZATION, auth)]),
                false,
            )
        };
        assert!(with("Bearer s3cret").is_ok());
        assert!(
            with("bearer s3cret").is_ok(),
            "the scheme is case-insensitive"
        );
        assert!(with("BEARER  s3cret").is_ok());
        assert!(with("Basic s3cret").is_err());
        assert!(with("Bearers3cret").is_err());
        assert_eq!(
            with("Bearer nope").unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        assert!(with("s3cret").is_err());
        assert!(
            a.check("/metrics", &headers(std::slice::from_ref(&local)), false)
                .is_err()
        );
        assert!(
            a.check("/readyz", &headers(std::slice::from_ref(&local)), false)
                .is_ok()
        );
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
