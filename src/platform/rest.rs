//! The REST machinery every Genesys Cloud client shares (the guest chat API's, the Platform
//! API's, Web Messaging's): one HTTP client with guestd's TLS, a cap on requests in flight, the
//! retry policy (429 waits for `Retry-After`, capped; 5xx and transport errors back off with
//! jitter; anything else fails at once with a typed [`ApiError`]), bodies read with a limit.

use crate::backoff_policy::{Backoff, BackoffConfig};
use crate::secret::Secret;
use crate::transport::policy::{ApiError, EXCERPT_CHARS, check_url, excerpt};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Error body of every 4xx/5xx (the SDK's `ErrorBody`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Human text.
    pub message: String,
    /// Machine code, e.g. "bad.request".
    pub code: String,
    /// HTTP status.
    pub status: u16,
    /// Id of the failed request, for support.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_id: Option<String>,
    /// More detail, where given.
    #[serde(default)]
    pub details: Vec<serde_json::Value>,
    /// Nested errors, where given.
    #[serde(default)]
    pub errors: Vec<serde_json::Value>,
}
/// Settings of the REST client.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// API base, e.g. `https://api.mypurecloud.com` or the emulator's `http://127.0.0.1:PORT`.
    pub api_base: String,
    /// Organization id (create only).
    pub organization_id: String,
    /// Deployment id (create only).
    pub deployment_id: String,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Retries after the first try, for 429/5xx/transport errors.
    pub max_retries: u32,
    /// Delays between retries.
    pub backoff: BackoffConfig,
    /// Longest `Retry-After` honoured; longer ones are capped.
    pub max_retry_after: Duration,
    /// Allow plaintext http/ws to hosts other than loopback.
    pub allow_insecure: bool,
    /// REST requests in flight at once, process-wide (a reconnect storm's reconciles queue here
    /// rather than opening thousands of connections and tripping the platform's rate limit).
    pub max_concurrent: usize,
    /// Root certificates trusted besides the webpki roots.
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

/// The REST machinery both Genesys clients share (the guest API's and the Platform API's):
/// one HTTP client with guestd's TLS, a cap on requests in flight, the retry policy.
pub(crate) struct Inner {
    pub(crate) http: reqwest::Client,
    permits: tokio::sync::Semaphore,
    pub(crate) cfg: ClientConfig,
}

impl Inner {
    /// Check the base URL against the policy and build the HTTP client.
    pub(crate) fn new(cfg: ClientConfig) -> Result<Self, ApiError> {
        check_url(&cfg.api_base, cfg.allow_insecure)?;
        let tls = crate::transport::tls::client_config(&cfg.extra_roots)
            .map_err(|e| ApiError::Policy(e.to_string()))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .pool_max_idle_per_host(64)
            .user_agent(concat!("guestd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ApiError::Transport(e.to_string()))?;
        Ok(Inner {
            http,
            permits: tokio::sync::Semaphore::new(cfg.max_concurrent.max(1)),
            cfg,
        })
    }
}

impl Inner {
    /// The URL of a paging link: an `/api/v2/...` path on the configured base, or a full URL on
    /// that same base; anything else is refused rather than followed off the platform.
    pub(crate) fn follow(&self, link: Option<&str>) -> Result<Option<String>, ApiError> {
        let Some(link) = link else {
            return Ok(None);
        };
        let base = self.cfg.api_base.trim_end_matches('/');
        if link.starts_with("/api/v2/") {
            return Ok(Some(format!("{base}{link}")));
        }
        if link.starts_with(&format!("{base}/api/v2/")) {
            return Ok(Some(link.to_string()));
        }
        Err(ApiError::Decode(format!(
            "a paging link leaves the platform: {link}"
        )))
    }

    /// One REST call with the retry policy. `T = ()` for replies without a body.
    ///
    /// Not an `async fn`: its arguments would be held twice in its state (rust-lang/rust#62958),
    /// and in a connect burst thousands of calls wait for a permit at once.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    pub(crate) fn call<T: DeserializeOwned + Send>(
        &self,
        name: &'static str,
        method: Method,
        url: String,
        jwt: Option<Secret>,
        body: Option<serde_json::Value>,
    ) -> impl std::future::Future<Output = Result<Option<T>, ApiError>> + Send + '_ {
        async move {
            // Made at the first retry: most calls never need it.
            let mut backoff: Option<Box<Backoff>> = None;
            let mut attempt = 0;
            loop {
                let permit = self
                    .permits
                    .acquire()
                    .await
                    .map_err(|_| ApiError::Transport("client closed".into()))?;
                // The attempt's state (the request, hyper's future, the reply) is allocated only
                // once a permit is held: a call waiting its turn holds its arguments and no more.
                // Built before the wait, every session of a connect burst held one (about 1 KiB)
                // while the REST permits were taken, and the holes they left among the sessions'
                // own allocations stayed in RSS (docs/benchmarks.md, "A burst's leftovers").
                crate::heap::churn();
                let tried =
                    Box::pin(self.attempt(name, &method, &url, jwt.as_ref(), body.as_ref())).await;
                drop(permit);
                let (err, wait) = match tried {
                    Attempt::Done(r) => return r,
                    Attempt::Again(err, wait) => (err, wait),
                };
                if attempt >= self.cfg.max_retries {
                    return Err(err);
                }
                attempt += 1;
                let delay = match wait {
                    Some(d) => d.min(self.cfg.max_retry_after),
                    None => backoff
                        .get_or_insert_with(|| Box::new(Backoff::new(&self.cfg.backoff)))
                        .next_delay(),
                };
                metrics::counter!("guestd_rest_retries_total", "call" => name).increment(1);
                tracing::debug!(call = name, attempt, delay_ms = delay.as_millis() as u64, error = %err, "retrying REST call");
                drop(err);
                // Boxed: a retry is rare, and its timer inline would be held by every waiting call.
                Box::pin(tokio::time::sleep(delay)).await;
            }
        }
    }

    /// One try of [`Inner::call`], with a permit held.
    async fn attempt<T: DeserializeOwned>(
        &self,
        name: &'static str,
        method: &Method,
        url: &str,
        jwt: Option<&Secret>,
        body: Option<&serde_json::Value>,
    ) -> Attempt<T> {
        let mut req = self.http.request(method.clone(), url);
        if let Some(jwt) = jwt {
            req = req.bearer_auth(jwt.expose());
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let started = Instant::now();
        let sent = req.send().await;
        metrics::histogram!("guestd_rest_request_duration_seconds", "call" => name)
            .record(started.elapsed().as_secs_f64());
        match sent {
            Err(e) => Attempt::Again(ApiError::Transport(transport_text(&e)), None),
            Ok(resp) => {
                let status = resp.status();
                if status.is_success() {
                    if status == StatusCode::NO_CONTENT {
                        return Attempt::Done(Ok(None));
                    }
                    let bytes = match read_limited(resp, reply_limit(name)).await {
                        Ok(Body::Whole(b)) => b,
                        Ok(Body::Cut(_)) => {
                            return Attempt::Done(Err(ApiError::Decode(format!(
                                "{name}: the reply is over {} bytes",
                                reply_limit(name)
                            ))));
                        }
                        Err(e) => {
                            return Attempt::Done(Err(ApiError::Transport(transport_text(&e))));
                        }
                    };
                    if bytes.is_empty() {
                        return Attempt::Done(Ok(None));
                    }
                    return Attempt::Done(
                        serde_json::from_slice(&bytes)
                            .map(Some)
                            .map_err(|e| ApiError::Decode(format!("{name}: {e}"))),
                    );
                }
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let message = error_message(resp).await;
                match status.as_u16() {
                    401 => Attempt::Done(Err(ApiError::Unauthorized(message))),
                    404 => Attempt::Done(Err(ApiError::NotFound(message))),
                    429 => Attempt::Again(ApiError::RateLimited(retry_after), retry_after),
                    s @ 500..=599 => Attempt::Again(ApiError::Server { status: s, message }, None),
                    s => Attempt::Done(Err(ApiError::Rejected { status: s, message })),
                }
            }
        }
    }
}

/// How one try of a call came out.
enum Attempt<T> {
    /// The call's result: no retry.
    Done(Result<Option<T>, ApiError>),
    /// Worth another try (after the wait the server asked for, if any).
    Again(ApiError, Option<Duration>),
}

/// Largest reply body read for a listing page (`list_messages`, Web Messaging `history`): a
/// page of 100 messages of 4,000 four-byte characters is about 1.6 MB.
pub const MAX_PAGE_REPLY: usize = 4 << 20;
/// Largest reply body read for any other call (a create answer, a members page, a
/// conversation, `config.json`: a few KiB each).
pub const MAX_REPLY: usize = 1 << 20;
/// Bytes of an error reply read, for its message (then the connection is dropped).
pub const MAX_ERROR_BODY: usize = 64 << 10;

/// The most bytes read for a successful reply to `call`.
fn reply_limit(call: &str) -> usize {
    match call {
        "list_messages" | "history" => MAX_PAGE_REPLY,
        _ => MAX_REPLY,
    }
}

/// A reply body read with a limit.
pub(crate) enum Body {
    /// All of it.
    Whole(Vec<u8>),
    /// Its first `limit` bytes; the rest was never read.
    Cut(Vec<u8>),
}

/// Read at most `limit` bytes of `resp`'s body: a larger one is cut there
/// and the response dropped (its connection closed), so a hostile or broken server cannot make
/// guestd hold more than `limit` bytes for it.
pub(crate) async fn read_limited(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Body, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = limit - out.len();
        if chunk.len() > room {
            out.extend_from_slice(&chunk[..room]);
            return Ok(Body::Cut(out));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Body::Whole(out))
}

/// The message of an error reply: the platform's `message` when the body is its error shape,
/// else the body itself; either way a short sanitized [`excerpt`] of at most
/// [`EXCERPT_CHARS`], read from at most [`MAX_ERROR_BODY`] bytes.
pub(crate) async fn error_message(resp: reqwest::Response) -> String {
    let bytes = match read_limited(resp, MAX_ERROR_BODY).await {
        Ok(Body::Whole(b)) | Ok(Body::Cut(b)) => b,
        Err(_) => Vec::new(),
    };
    let text = String::from_utf8_lossy(&bytes);
    let message = serde_json::from_str::<ErrorBody>(&text)
        .map(|b| b.message)
        .unwrap_or_else(|_| text.into_owned());
    excerpt(&message, EXCERPT_CHARS)
}

/// reqwest's error text without the URL (which is harmless here, but keep lines short).
fn transport_text(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "request"
    };
    let mut s = format!("{kind}: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(&format!(": {cause}"));
        src = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The most bytes a REST call holds while it waits for a permit (its arguments once, the
    /// wait itself; 288 measured with rustc 1.95, 568 as an `async fn` with its backoff and retry
    /// timer inline; the bound leaves room for another compiler's layout).
    /// In a connect burst thousands of calls wait at once (a roster fetch per connected chat,
    /// 64 permits): docs/benchmarks.md, "A burst's leftovers".
    const WAITING_CALL_BYTES: usize = 384;

    #[test]
    fn a_call_waiting_its_turn_holds_its_arguments_not_its_attempt() {
        let cfg = crate::backends::rest_config(
            &crate::config::Config::default(),
            "http://127.0.0.1:9",
            false,
            &[],
        );
        let inner = Inner::new(cfg).unwrap();
        let call =
            inner.call::<serde_json::Value>("list_members", Method::GET, String::new(), None, None);
        let attempt =
            inner.attempt::<serde_json::Value>("list_members", &Method::GET, "", None, None);
        let (call, attempt) = (
            std::mem::size_of_val(&call),
            std::mem::size_of_val(&attempt),
        );
        assert!(
            call <= WAITING_CALL_BYTES,
            "a waiting call holds {call} bytes"
        );
        // The attempt is the large part, allocated only with a permit held.
        assert!(attempt > 2 * call, "attempt {attempt} bytes, call {call}");
    }
}
