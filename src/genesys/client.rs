//! REST client of the Genesys guest chat API, implementing [`ChatApi`].
//!
//! Every call goes through [`GenesysApi::call`], which owns the retry policy: 429 waits for
//! `Retry-After` (capped), 5xx and transport errors back off with jitter, anything else fails at
//! once with a typed [`ApiError`]. The jwt only ever leaves this module in the `Authorization`
//! header.

use super::protocol::{
    self as p, CreateChatRequest, CreateChatResponse, ErrorBody, MemberInfo, Page, RoutingTarget,
    SendMessageRequest,
};
use crate::backend::{
    ApiError, ChatApi, ChatEvent, ChatMember, ChatMessage, ChatRef, EXCERPT_CHARS, MemberState,
    MessageKind, Role, StartSpec, check_id, check_url, excerpt, path_segment,
};
use crate::backoff_policy::{Backoff, BackoffConfig};
use crate::secret::Secret;
use futures::FutureExt;
use futures::future::BoxFuture;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// The Genesys backend.
#[derive(Clone)]
pub struct GenesysApi {
    inner: Arc<Inner>,
}

/// The REST machinery both Genesys clients share (the guest API's and the Platform API's):
/// one HTTP client with guestd's TLS, a cap on requests in flight, the retry policy.
pub(crate) struct Inner {
    pub(super) http: reqwest::Client,
    permits: tokio::sync::Semaphore,
    pub(super) cfg: ClientConfig,
}

impl GenesysApi {
    /// Build a client. TLS is `crate::tls::client_config`, the websockets' own: certificates
    /// are always verified.
    pub fn new(cfg: ClientConfig) -> Result<Self, ApiError> {
        Ok(GenesysApi {
            inner: Arc::new(Inner::new(cfg)?),
        })
    }

    /// The full URL of a path from `protocol::path`.
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.inner.cfg.api_base.trim_end_matches('/'))
    }
}

/// The chat's conversation id as a URL path segment, once it passed [`check_id`].
fn conv_segment(chat: &ChatRef) -> Result<String, ApiError> {
    check_id("conversation_id", &chat.conversation_id)?;
    Ok(path_segment(&chat.conversation_id))
}

/// Both ids of the chat as URL path segments, once they passed [`check_id`].
fn member_segments(chat: &ChatRef) -> Result<(String, String), ApiError> {
    chat.check_ids()?;
    Ok((
        path_segment(&chat.conversation_id),
        path_segment(&chat.member_id),
    ))
}

/// A call refused before it was made.
fn refused<T: Send + 'static>(e: ApiError) -> BoxFuture<'static, Result<T, ApiError>> {
    futures::future::ready(Err(e)).boxed()
}

impl Inner {
    /// Check the base URL against the policy and build the HTTP client.
    pub(crate) fn new(cfg: ClientConfig) -> Result<Self, ApiError> {
        check_url(&cfg.api_base, cfg.allow_insecure)?;
        let tls = crate::tls::client_config(&cfg.extra_roots)
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

/// Entities asked for per page (the platform's maximum).
const PAGE: u32 = 100;
/// Pages followed at most in one listing: far more than any chat holds.
const MAX_PAGES: usize = 100;

impl Inner {
    /// The URL of a paging link: an `/api/v2/...` path on the configured base, or a full URL on
    /// that same base; anything else is refused rather than followed off the platform.
    fn follow(&self, link: Option<&str>) -> Result<Option<String>, ApiError> {
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
    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        name: &'static str,
        method: Method,
        url: String,
        jwt: Option<Secret>,
        body: Option<serde_json::Value>,
    ) -> Result<Option<T>, ApiError> {
        let mut backoff = Backoff::new(&self.cfg.backoff);
        let mut attempt = 0;
        loop {
            let mut req = self.http.request(method.clone(), &url);
            if let Some(jwt) = &jwt {
                req = req.bearer_auth(jwt.expose());
            }
            if let Some(b) = &body {
                req = req.json(b);
            }
            let permit = self
                .permits
                .acquire()
                .await
                .map_err(|_| ApiError::Transport("client closed".into()))?;
            let started = Instant::now();
            let sent = req.send().await;
            metrics::histogram!("guestd_rest_request_duration_seconds", "call" => name)
                .record(started.elapsed().as_secs_f64());
            let (err, wait) = match sent {
                Err(e) => (ApiError::Transport(transport_text(&e)), None),
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() {
                        if status == StatusCode::NO_CONTENT {
                            return Ok(None);
                        }
                        let bytes = match read_limited(resp, reply_limit(name)).await {
                            Ok(Body::Whole(b)) => b,
                            Ok(Body::Cut(_)) => {
                                return Err(ApiError::Decode(format!(
                                    "{name}: the reply is over {} bytes",
                                    reply_limit(name)
                                )));
                            }
                            Err(e) => return Err(ApiError::Transport(transport_text(&e))),
                        };
                        if bytes.is_empty() {
                            return Ok(None);
                        }
                        return serde_json::from_slice(&bytes)
                            .map(Some)
                            .map_err(|e| ApiError::Decode(format!("{name}: {e}")));
                    }
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let message = error_message(resp).await;
                    match status.as_u16() {
                        401 => return Err(ApiError::Unauthorized(message)),
                        404 => return Err(ApiError::NotFound(message)),
                        429 => (ApiError::RateLimited(retry_after), retry_after),
                        s @ 500..=599 => (ApiError::Server { status: s, message }, None),
                        s => return Err(ApiError::Rejected { status: s, message }),
                    }
                }
            };
            drop(permit);
            if attempt >= self.cfg.max_retries {
                return Err(err);
            }
            attempt += 1;
            let delay = match wait {
                Some(d) => d.min(self.cfg.max_retry_after),
                None => backoff.next_delay(),
            };
            metrics::counter!("guestd_rest_retries_total", "call" => name).increment(1);
            tracing::debug!(call = name, attempt, delay_ms = delay.as_millis() as u64, error = %err, "retrying REST call");
            tokio::time::sleep(delay).await;
        }
    }
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

fn member(m: p::Member) -> ChatMember {
    ChatMember {
        id: m.id,
        role: role(m.role),
        state: state(m.state),
        leave_date: m.leave_date,
    }
}

/// The neutral role of a wire role.
fn role(r: p::Role) -> Role {
    match r {
        p::Role::Customer => Role::Customer,
        p::Role::Agent => Role::Agent,
        p::Role::Workflow => Role::Workflow,
        p::Role::Acd => Role::Acd,
        p::Role::Unknown => Role::Unknown,
    }
}

/// The neutral state of a wire state.
fn state(s: p::MemberState) -> MemberState {
    match s {
        p::MemberState::Alerting => MemberState::Alerting,
        p::MemberState::Connected => MemberState::Connected,
        p::MemberState::Disconnected => MemberState::Disconnected,
        p::MemberState::Unknown => MemberState::Unknown,
    }
}

/// Map a wire message to the neutral one.
pub fn message(m: p::Message) -> ChatMessage {
    let kind = match m.body_type {
        p::BodyType::Standard => MessageKind::Standard,
        p::BodyType::Notice => MessageKind::Notice,
        p::BodyType::MemberJoin => MessageKind::MemberJoin,
        p::BodyType::MemberLeave => MessageKind::MemberLeave,
        p::BodyType::Unknown => MessageKind::Unknown,
    };
    ChatMessage {
        id: m.id,
        sender_id: m.sender.id,
        body: m.body,
        kind,
        timestamp: m.timestamp,
    }
}

impl ChatApi for GenesysApi {
    fn create(&self, spec: StartSpec) -> BoxFuture<'static, Result<ChatRef, ApiError>> {
        let inner = self.inner.clone();
        let url = self.url(p::CONVERSATIONS);
        async move {
            // Every missing key at once, before the platform is asked (issue 24).
            if let Some(msg) =
                crate::config::start_missing(&inner.cfg.organization_id, &inner.cfg.deployment_id)
            {
                return Err(ApiError::NotConfigured(msg));
            }
            let req = CreateChatRequest {
                organization_id: inner.cfg.organization_id.clone(),
                deployment_id: inner.cfg.deployment_id.clone(),
                routing_target: RoutingTarget {
                    target_type: "QUEUE".into(),
                    target_address: spec.queue,
                    skills: spec.skills,
                    language: spec.language,
                    priority: spec.priority,
                },
                member_info: MemberInfo {
                    display_name: spec.display_name,
                    avatar_image_url: None,
                    first_name: spec.first_name,
                    last_name: spec.last_name,
                    email: spec.email,
                    phone_number: spec.phone_number,
                    custom_fields: spec.custom_fields,
                },
            };
            let body = serde_json::to_value(req).map_err(|e| ApiError::Decode(e.to_string()))?;
            let r: CreateChatResponse = inner
                .call("create", Method::POST, url, None, Some(body))
                .await?
                .ok_or_else(|| ApiError::Decode("create: empty reply".into()))?;
            check_url(&r.event_stream_uri, inner.cfg.allow_insecure)?;
            // Ids the platform hands out go into later URLs: they are held to the same rule.
            check_id("the created conversation's id", &r.id)?;
            check_id("the created member's id", &r.member.id)?;
            Ok(ChatRef {
                conversation_id: r.id,
                member_id: r.member.id,
                jwt: Secret::new(r.jwt),
                event_stream_uri: r.event_stream_uri,
            })
        }
        .boxed()
    }

    fn list_members(
        &self,
        chat: &ChatRef,
    ) -> BoxFuture<'static, Result<Vec<ChatMember>, ApiError>> {
        let inner = self.inner.clone();
        let conv = match conv_segment(chat) {
            Ok(c) => c,
            Err(e) => return refused(e),
        };
        let first = self.url(&format!(
            "{}{}",
            p::path::members(&conv),
            p::query_string(&p::MembersQuery {
                page_size: Some(PAGE),
                page_number: Some(1),
                exclude_disconnected_members: None,
            })
        ));
        let jwt = chat.jwt.clone();
        async move {
            let mut out = Vec::new();
            let mut url = first;
            for _ in 0..MAX_PAGES {
                let page: Page<p::Member> = inner
                    .call("list_members", Method::GET, url, Some(jwt.clone()), None)
                    .await?
                    .ok_or_else(|| ApiError::Decode("list members: empty reply".into()))?;
                let next = inner.follow(page.next_path())?;
                out.extend(page.entities.into_iter().map(member));
                match next {
                    Some(n) => url = n,
                    None => break,
                }
            }
            Ok(out)
        }
        .boxed()
    }

    fn messages_after(
        &self,
        chat: &ChatRef,
        after: Option<String>,
    ) -> BoxFuture<'static, Result<Vec<ChatMessage>, ApiError>> {
        let inner = self.inner.clone();
        let conv = match conv_segment(chat) {
            Ok(c) => c,
            Err(e) => return refused(e),
        };
        let base = self.url(&p::path::messages(&conv));
        let jwt = chat.jwt.clone();
        // Oldest first, asked explicitly (whatever a server's default order).
        let page_after = move |after: Option<String>| {
            let q = p::MessagesQuery {
                after,
                before: None,
                sort_order: Some("ascending".into()),
                max_results: Some(PAGE),
            };
            format!("{base}{}", p::query_string(&q))
        };
        async move {
            let mut out: Vec<ChatMessage> = Vec::new();
            let mut url = page_after(after);
            for _ in 0..MAX_PAGES {
                let page: Page<p::Message> = inner
                    .call("list_messages", Method::GET, url, Some(jwt.clone()), None)
                    .await?
                    .ok_or_else(|| ApiError::Decode("list messages: empty reply".into()))?;
                let n = page.entities.len();
                let next = inner.follow(page.next_path())?;
                out.extend(page.entities.into_iter().map(message));
                url = match next {
                    Some(next) => next,
                    // A server without paging links: a full page means there may be more.
                    None if n >= PAGE as usize => page_after(out.last().map(|m| m.id.clone())),
                    None => break,
                };
            }
            Ok(out)
        }
        .boxed()
    }

    fn leave(&self, chat: &ChatRef) -> BoxFuture<'static, Result<(), ApiError>> {
        let inner = self.inner.clone();
        let (conv, member) = match member_segments(chat) {
            Ok(ids) => ids,
            Err(e) => return refused(e),
        };
        let url = self.url(&p::path::member(&conv, &member));
        let jwt = chat.jwt.clone();
        async move {
            inner
                .call::<serde_json::Value>("leave", Method::DELETE, url, Some(jwt), None)
                .await
                .map(|_| ())
        }
        .boxed()
    }

    fn send_message(
        &self,
        chat: &ChatRef,
        body: String,
    ) -> BoxFuture<'static, Result<ChatMessage, ApiError>> {
        let inner = self.inner.clone();
        let (conv, member) = match member_segments(chat) {
            Ok(ids) => ids,
            Err(e) => return refused(e),
        };
        let url = self.url(&p::path::member_messages(&conv, &member));
        let jwt = chat.jwt.clone();
        async move {
            let req = SendMessageRequest {
                body,
                body_type: p::BodyType::Standard,
            };
            let body = serde_json::to_value(req).map_err(|e| ApiError::Decode(e.to_string()))?;
            let m: p::Message = inner
                .call("send_message", Method::POST, url, Some(jwt), Some(body))
                .await?
                .ok_or_else(|| ApiError::Decode("send message: empty reply".into()))?;
            Ok(message(m))
        }
        .boxed()
    }

    fn send_typing(&self, chat: &ChatRef) -> BoxFuture<'static, Result<(), ApiError>> {
        let inner = self.inner.clone();
        let (conv, member) = match member_segments(chat) {
            Ok(ids) => ids,
            Err(e) => return refused(e),
        };
        let url = self.url(&p::path::member_typing(&conv, &member));
        let jwt = chat.jwt.clone();
        async move {
            inner
                .call::<serde_json::Value>("send_typing", Method::POST, url, Some(jwt), None)
                .await
                .map(|_| ())
        }
        .boxed()
    }

    fn decode(&self, text: &str) -> Result<ChatEvent, String> {
        chat_event(text)
    }

    fn ping_frame(&self) -> &'static str {
        p::PING_FRAME
    }

    fn max_message_chars(&self) -> usize {
        p::MAX_BODY_CHARS
    }
}

/// A stream frame as the session machine takes it (the seam's `decode` for the guest chat API).
pub fn chat_event(text: &str) -> Result<ChatEvent, String> {
    match p::decode_frame(text).map_err(|e| e.to_string())? {
        p::StreamEvent::Heartbeat => Ok(ChatEvent::Heartbeat),
        p::StreamEvent::Pong => Ok(ChatEvent::Pong),
        p::StreamEvent::Metadata(m) => Ok(ChatEvent::Other(format!(
            "channel.metadata: {}",
            truncate(&m)
        ))),
        p::StreamEvent::Message(m) => Ok(ChatEvent::Message(message(m))),
        p::StreamEvent::Typing(t) => Ok(ChatEvent::Typing {
            sender_id: t.sender.id,
        }),
        p::StreamEvent::MemberChange(c) => Ok(ChatEvent::MemberChange {
            member_id: c.member.id,
            state: state(c.member.state),
        }),
        p::StreamEvent::SocketClosing => Ok(ChatEvent::SocketClosing),
        p::StreamEvent::Unknown { topic } => Ok(ChatEvent::Other(topic)),
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
