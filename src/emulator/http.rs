//! The emulator's HTTP surface: the Genesys guest REST paths, the websocket upgrade at the
//! `eventStreamUri`, and the admin API under `/emulator/` (kept apart from the Genesys paths).

use super::world::{EndCause, SocketCmd};
use super::{AdminError, Emulator, Shared};
use crate::backends::guest_chat::protocol::{
    BodyType, CreateChatRequest, CreateChatResponse, ErrorBody, MAX_BODY_CHARS, MemberState,
    MembersQuery, MessagesQuery, Page, SendMessageRequest, path, query_string,
};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::time::{Duration, Instant};

type S = State<Arc<Shared>>;

/// A platform-shaped error reply.
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad.request", message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not.found", message)
    }
    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication.required", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            message: self.message,
            code: self.code.to_string(),
            status: self.status.as_u16(),
            context_id: Some(uuid::Uuid::new_v4().to_string()),
            details: Vec::new(),
            errors: Vec::new(),
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let status = match e {
            AdminError::NoConversation(_) => StatusCode::NOT_FOUND,
            AdminError::Ended(_) | AdminError::NoAgent(_) | AdminError::Nothing(_) => {
                StatusCode::CONFLICT
            }
        };
        ApiError::new(status, "emulator.admin", e.to_string())
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    use crate::backends::guest_chat::protocol::CONVERSATIONS;
    Router::new()
        .route(CONVERSATIONS, post(create))
        .route(&path::members("{conv}"), get(list_members))
        .route(
            &path::member("{conv}", "{member}"),
            get(get_member).delete(leave),
        )
        .route(
            &path::member_messages("{conv}", "{member}"),
            post(send_message),
        )
        .route(
            &path::member_typing("{conv}", "{member}"),
            post(send_typing),
        )
        .route(&path::messages("{conv}"), get(list_messages))
        .route(&path::message("{conv}", "{message}"), get(get_message))
        .route("/v2/stream/{conv}", get(stream))
        .route("/v1", get(wm_socket))
        .route("/api/v2/webmessaging/messages", get(wm_history))
        .route(
            "/webdeployments/v1/deployments/{deployment}/config.json",
            get(wm_config),
        )
        .route("/emulator/messaging/sessions", get(wm_admin_list))
        .route("/emulator/messaging/sessions/{token}", post(wm_admin))
        .route("/oauth/token", post(platform_token))
        .route("/api/v2/conversations/{conv}", get(platform_conversation))
        .route(
            "/api/v2/conversations/chats/{conv}",
            get(platform_conversation),
        )
        .route(
            "/emulator/platform/expire-tokens",
            post(admin_expire_platform_tokens),
        )
        .route("/emulator/conversations", get(admin_list))
        .route("/emulator/conversations/{conv}", get(admin_get))
        .route(
            "/emulator/conversations/{conv}/{action}",
            post(admin_action),
        )
        .route(
            "/emulator/conversations/{conv}/{group}/{action}",
            post(admin_action2),
        )
        .route("/emulator/faults", post(admin_faults))
        .route("/emulator/delays", post(admin_delays))
        .route("/emulator/sockets/drop-all", post(admin_drop_all))
        .route("/emulator/log", get(admin_log))
        .route("/emulator/bulk/create", post(admin_bulk_create))
        .route("/emulator/bulk/end", post(admin_bulk_end))
        .route("/emulator/stats", get(admin_stats))
        .fallback(|| async { ApiError::not_found("no such path") })
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            log_requests,
        ))
        .with_state(shared)
}

/// Every request into the request log, before routing (so a path no route knows is seen too).
async fn log_requests(State(sh): S, req: Request, next: axum::middleware::Next) -> Response {
    let line = format!(
        "{} {}",
        req.method(),
        req.uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    sh.world().record_request(line);
    next.run(req).await
}

/// Every error answers as the platform's `ErrorBody` JSON, including those axum makes itself
/// (413 for a body over 2 MB, 405, a path it cannot parse): the SDK parses every error body.
async fn json_errors(req: Request, next: axum::middleware::Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let text = axum::body::to_bytes(resp.into_body(), 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    // The codes of these are not in the public record [unsure].
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "request.entity.too.large",
        StatusCode::METHOD_NOT_ALLOWED => "method.not.allowed",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported.media.type",
        s if s.is_server_error() => "internal.server.error",
        _ => "bad.request",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    ApiError::new(status, code, message).into_response()
}

/// The bearer token of a request; the scheme is case-insensitive (the Messenger Transport SDK
/// sends `bearer <jwt>` to the history call; issue 25).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    crate::control::access::bearer_credentials(headers.get(header::AUTHORIZATION)?.to_str().ok()?)
}

/// The next fault queued by `/emulator/faults`, as the error reply it becomes (429 carries
/// `Retry-After`). Create and every other guest call take faults from the same queue.
pub(crate) fn injected_fault(w: &mut super::world::World) -> Option<ApiError> {
    let (status, retry) = w.rest_faults.pop_front()?;
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut e = ApiError::new(code, "emulator.fault", format!("injected {status}"));
    if status == 429 {
        e.code = "too.many.requests";
        e.retry_after = Some(retry);
    }
    Some(e)
}

/// The checks every guest call but create goes through, in the platform's order: injected
/// faults, then a bearer token at all, the conversation, the token matching it and not expired.
/// Every outcome is written to the guest-side log.
fn guard(shared: &Shared, headers: &HeaderMap, conv: &str, action: &str) -> Result<(), ApiError> {
    let mut w = shared.world();
    let result = (|| {
        if let Some(e) = injected_fault(&mut w) {
            return Err(e);
        }
        let token =
            bearer(headers).ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
        let c = w
            .convs
            .get(conv)
            .ok_or_else(|| ApiError::not_found(format!("conversation {conv} not found")))?;
        if c.jwt != token {
            return Err(ApiError::unauthorized("invalid token"));
        }
        if c.jwt_expires <= Instant::now() {
            return Err(ApiError::unauthorized("token expired"));
        }
        Ok(())
    })();
    let status = match &result {
        Ok(()) => 200,
        Err(e) => e.status.as_u16(),
    };
    w.record(Some(conv), action, Some(status), String::new());
    result
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid body: {e}")))
}

async fn create(State(sh): S, body: Bytes) -> Result<Json<CreateChatResponse>, ApiError> {
    let req: CreateChatRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => {
            sh.world()
                .record(None, "create", Some(400), e.message.clone());
            return Err(e);
        }
    };
    let missing = [
        ("organizationId", req.organization_id.is_empty()),
        ("deploymentId", req.deployment_id.is_empty()),
        (
            "routingTarget.targetAddress",
            req.routing_target.target_address.is_empty(),
        ),
        (
            "memberInfo.displayName",
            req.member_info.display_name.is_empty(),
        ),
    ]
    .into_iter()
    .find(|(_, empty)| *empty);
    if let Some((field, _)) = missing {
        let msg = format!("{field} is required");
        sh.world().record(None, "create", Some(400), msg.clone());
        return Err(ApiError::bad(msg));
    }
    if req.routing_target.target_type != "QUEUE" {
        return Err(ApiError::bad("routingTarget.targetType must be QUEUE"));
    }
    let created = sh.create_chat(
        &req.member_info,
        req.routing_target.target_address.clone(),
        true,
    )?;
    Ok(Json(created))
}

async fn list_members(
    State(sh): S,
    headers: HeaderMap,
    Path(conv): Path<String>,
    q: Result<Query<MembersQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    guard(&sh, &headers, &conv, "list_members")?;
    let Query(q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
    let delay = sh.world().list_members_delay;
    if !delay.is_zero() {
        // The list is read after the wait: it says what the platform holds when it answers.
        tokio::time::sleep(delay).await;
    }
    let size = q.page_size.unwrap_or(25) as usize;
    let number = q.page_number.unwrap_or(1) as usize;
    let exclude = q.exclude_disconnected_members.unwrap_or(false);
    if size == 0 || size > 100 || number == 0 {
        return Err(ApiError::bad(
            "pageSize must be 1..=100 and pageNumber >= 1",
        ));
    }
    let w = sh.world();
    let c = w
        .convs
        .get(&conv)
        .ok_or_else(|| ApiError::not_found("conversation"))?;
    let all: Vec<_> = c
        .members
        .iter()
        .filter(|m| !(exclude && m.state == MemberState::Disconnected))
        .cloned()
        .collect();
    let total = all.len();
    let entities = all
        .into_iter()
        .skip((number - 1) * size)
        .take(size)
        .collect();
    let pages = total.div_ceil(size).max(1);
    let uri = |n: usize| {
        let q = MembersQuery {
            page_size: Some(size as u32),
            page_number: Some(n as u32),
            exclude_disconnected_members: exclude.then_some(true),
        };
        format!("{}{}", path::members(&conv), query_string(&q))
    };
    Ok(Json(Page {
        entities,
        page_size: Some(size as u32),
        page_number: Some(number as u32),
        total: Some(total as u32),
        page_count: Some(pages as u32),
        self_uri: Some(uri(number)),
        first_uri: Some(uri(1)),
        last_uri: Some(uri(pages)),
        next_uri: (number < pages).then(|| uri(number + 1)),
        previous_uri: (number > 1).then(|| uri((number - 1).min(pages))),
        next: None,
        previous: None,
    })
    .into_response())
}

async fn get_member(
    State(sh): S,
    headers: HeaderMap,
    Path((conv, member)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    guard(&sh, &headers, &conv, "get_member")?;
    let w = sh.world();
    let c = w
        .convs
        .get(&conv)
        .ok_or_else(|| ApiError::not_found("conversation"))?;
    let m = c
        .members
        .iter()
        .find(|m| m.id == member)
        .ok_or_else(|| ApiError::not_found(format!("member {member} not found")))?;
    Ok(Json(m.clone()).into_response())
}

fn own_member(sh: &Shared, conv: &str, member: &str) -> Result<(), ApiError> {
    let w = sh.world();
    let c = w
        .convs
        .get(conv)
        .ok_or_else(|| ApiError::not_found("conversation"))?;
    if c.member_state(member).is_none() {
        return Err(ApiError::not_found(format!("member {member} not found")));
    }
    if c.guest_id != member {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "not your member",
        ));
    }
    if c.ended.is_some() {
        return Err(
            ApiError::bad("the conversation has ended").with_code("chat.error.conversation.state")
        );
    }
    Ok(())
}

impl ApiError {
    /// Its HTTP status, as a number.
    pub(crate) fn status_code(&self) -> u16 {
        self.status.as_u16()
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }
}

async fn leave(
    State(sh): S,
    headers: HeaderMap,
    Path((conv, member)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    guard(&sh, &headers, &conv, "leave")?;
    own_member(&sh, &conv, &member)?;
    sh.world().end(&conv, EndCause::GuestLeft);
    Ok(StatusCode::NO_CONTENT)
}

async fn send_message(
    State(sh): S,
    headers: HeaderMap,
    Path((conv, member)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    guard(&sh, &headers, &conv, "send_message")?;
    let req: SendMessageRequest = parse(&body)?;
    let chars = req.body.chars().count();
    if chars > MAX_BODY_CHARS {
        return Err(ApiError::bad(format!(
            "body has {chars} characters; at most {MAX_BODY_CHARS} are allowed"
        ))
        .with_code("chat.error.message.length"));
    }
    if !matches!(req.body_type, BodyType::Standard | BodyType::Notice) {
        return Err(ApiError::bad("bodyType must be standard or notice"));
    }
    own_member(&sh, &conv, &member)?;
    let mut w = sh.world();
    let c = w
        .convs
        .get_mut(&conv)
        .ok_or_else(|| ApiError::not_found("conversation"))?;
    c.last_guest_activity = Instant::now();
    c.notify.notify_one();
    let msg = c.post_message(&member, &req.body, req.body_type);
    Ok(Json(msg).into_response())
}

async fn send_typing(
    State(sh): S,
    headers: HeaderMap,
    Path((conv, member)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    guard(&sh, &headers, &conv, "send_typing")?;
    own_member(&sh, &conv, &member)?;
    let counts = sh.cfg.typing_counts_as_activity;
    let mut w = sh.world();
    let c = w
        .convs
        .get_mut(&conv)
        .ok_or_else(|| ApiError::not_found("conversation"))?;
    if counts {
        c.last_guest_activity = Instant::now();
        c.notify.notify_one();
    }
    Ok(Json(c.post_typing(&member)).into_response())
}

async fn list_messages(
    State(sh): S,
    headers: HeaderMap,
    Path(conv): Path<String>,
    q: Result<Query<MessagesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    guard(&sh, &headers, &conv, "list_messages")?;
    let Query(q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
    let max = q.max_results.unwrap_or(100) as usize;
    if max == 0 || max > 100 {
        return Err(ApiError::bad("maxResults must be 1..=100"));
    }
    // Ascending unless asked otherwise (the SDK's documented default).
    let ascending = match q.sort_order.as_deref() {
        None | Some("ascending") => true,
        Some("descending") => false,
        Some(other) => {
            return Err(ApiError::bad(format!(
                "sortOrder {other} is not ascending/descending"
            )));
        }
    };
    let w = sh.world();
    let c = w
        .convs
        .get(&conv)
        .ok_or_else(|| ApiError::not_found("conversation"))?;
    let pos = |id: &str| {
        c.messages
            .iter()
            .position(|m| m.id == id)
            .ok_or_else(|| ApiError::bad(format!("message {id} is not in this conversation")))
    };
    let lo = match &q.after {
        Some(id) => pos(id)? + 1,
        None => 0,
    };
    let hi = match &q.before {
        Some(id) => pos(id)?,
        None => c.messages.len(),
    };
    let window = if lo < hi {
        &c.messages[lo..hi]
    } else {
        &[][..]
    };
    let order = if ascending { "ascending" } else { "descending" };
    let entities: Vec<_> = if ascending {
        window.iter().take(max).cloned().collect()
    } else {
        window.iter().rev().take(max).cloned().collect()
    };
    // The next page continues after the last entity in the order asked for.
    let link = |after: Option<&str>, before: Option<&str>| {
        let q = MessagesQuery {
            after: after.map(str::to_string),
            before: before.map(str::to_string),
            sort_order: Some(order.to_string()),
            max_results: Some(max as u32),
        };
        format!("{}{}", path::messages(&conv), query_string(&q))
    };
    let next = (window.len() > max)
        .then(|| entities.last())
        .flatten()
        .map(|m| {
            if ascending {
                link(Some(&m.id), q.before.as_deref())
            } else {
                link(q.after.as_deref(), Some(&m.id))
            }
        });
    Ok(Json(Page {
        self_uri: Some(link(q.after.as_deref(), q.before.as_deref())),
        first_uri: Some(link(None, None)),
        next_uri: next.clone(),
        next,
        entities,
        page_size: Some(max as u32),
        page_number: None,
        total: None,
        page_count: None,
        previous_uri: None,
        last_uri: None,
        previous: None,
    })
    .into_response())
}

async fn get_message(
    State(sh): S,
    headers: HeaderMap,
    Path((conv, message)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    guard(&sh, &headers, &conv, "get_message")?;
    let w = sh.world();
    let c = w
        .convs
        .get(&conv)
        .ok_or_else(|| ApiError::not_found("conversation"))?;
    let m = c
        .messages
        .iter()
        .find(|m| m.id == message)
        .ok_or_else(|| ApiError::not_found(format!("message {message} not found")))?;
    Ok(Json(m.clone()).into_response())
}

/// The websocket upgrade. Done by hand rather than with axum's `ws` extractor so the socket task
/// owns the raw `TcpStream` and can drop it with a TCP reset (SO_LINGER 0), which is one of the
/// faults the admin API offers.
async fn stream(
    State(sh): S,
    Path(conv): Path<String>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let headers = req.headers().clone();
    let key = headers
        .get("sec-websocket-key")
        .cloned()
        .ok_or_else(|| ApiError::bad("not a websocket upgrade"))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<SocketCmd>();
    let sock = {
        let mut w = sh.world();
        let checked = (|| {
            let c = w
                .convs
                .get(&conv)
                .ok_or_else(|| ApiError::not_found("conversation not found"))?;
            if c.ended.is_some() {
                return Err(ApiError::not_found("conversation has ended"));
            }
            if c.stream_blocked {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "emulator.blocked",
                    "stream blocked by the admin API",
                ));
            }
            match bearer(&headers) {
                Some(t) if t != c.jwt => return Err(ApiError::unauthorized("invalid token")),
                Some(_) if c.jwt_expires <= Instant::now() => {
                    return Err(ApiError::unauthorized("token expired"));
                }
                None if sh.cfg.stream_requires_jwt => {
                    return Err(ApiError::unauthorized("missing bearer token"));
                }
                _ => {}
            }
            Ok(())
        })();
        if let Err(e) = checked {
            w.record(
                Some(&conv),
                "rejected",
                Some(e.status.as_u16()),
                e.message.clone(),
            );
            return Err(e);
        }
        w.socket_opened(&conv, tx)
            .ok_or_else(|| ApiError::not_found("conversation"))?
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(super::socket::run(sh.clone(), conv, sock, on_upgrade, rx));
    switching_protocols(&key)
}

/// The 101 reply that completes a websocket upgrade for `key` (`Sec-WebSocket-Key`).
fn switching_protocols(key: &HeaderValue) -> Result<Response, ApiError> {
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-accept", accept)
        .body(Body::empty())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

/// `GET /v1?deploymentId=`: a Web Messaging guest socket.
async fn wm_socket(
    State(sh): S,
    Query(q): Query<HashMap<String, String>>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let Some(deployment) = q.get("deploymentId").filter(|d| !d.trim().is_empty()) else {
        return Err(ApiError::bad("deploymentId is required"));
    };
    if !sh.cfg.web_messaging.knows(deployment) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            super::messaging::UNKNOWN_DEPLOYMENT,
        ));
    }
    let key = req
        .headers()
        .get("sec-websocket-key")
        .cloned()
        .ok_or_else(|| ApiError::bad("not a websocket upgrade"))?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let shared = sh.clone();
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let Ok(parts) = upgraded.downcast::<hyper_util::rt::TokioIo<super::socket::EmuStream>>()
        else {
            return;
        };
        if !parts.read_buf.is_empty() {
            return;
        }
        let cfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(4096)
            .max_message_size(Some(shared.cfg.max_client_frame))
            .max_frame_size(Some(shared.cfg.max_client_frame));
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            parts.io.into_inner(),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            Some(cfg),
        )
        .await;
        super::messaging::serve(shared, ws).await;
    });
    switching_protocols(&key)
}

/// `GET /api/v2/webmessaging/messages`: the session's history, bearer = a `getJwt` token.
async fn wm_history(
    State(sh): S,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let jwt = bearer(&headers).ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
    let num = |k: &str, d: usize| {
        q.get(k)
            .filter(|v| !v.is_empty())
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    match super::messaging::history(&sh, jwt, num("pageNumber", 1), num("pageSize", 25)) {
        Ok(page) => Ok(Json(page).into_response()),
        Err(super::messaging::HistoryRefusal::Unauthorized) => {
            Err(ApiError::unauthorized("invalid or expired token"))
        }
        Err(super::messaging::HistoryRefusal::TooMany) => {
            let mut r = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too.many.requests",
                "history: 10 calls per minute per session",
            )
            .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("6"));
            Ok(r)
        }
    }
}

/// `GET .../deployments/{id}/config.json`: the deployment's settings, from the knobs.
/// An unknown deployment (see `WebMessagingConfig::deployments`): 404.
async fn wm_config(
    State(sh): S,
    Path(deployment): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !sh.cfg.web_messaging.knows(&deployment) {
        return Err(ApiError::not_found(format!("no deployment {deployment}")));
    }
    let base = sh.next_stream_base().replace("/v2/stream", "");
    Ok(Json(super::messaging::deployment_config(
        &sh,
        &deployment,
        &base,
    )))
}

async fn wm_admin_list(State(sh): S) -> Json<Vec<super::messaging::WmSessionView>> {
    Json(super::messaging::sessions(&sh))
}

/// `POST /emulator/messaging/sessions/{token}` with `{"action": ...}` (see `WmAdmin`).
async fn wm_admin(
    State(sh): S,
    Path(token): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let a: super::messaging::WmAdmin = parse(&body)?;
    if super::messaging::admin(&sh, &token, a) {
        Ok(Json(serde_json::json!({"ok": true})).into_response())
    } else {
        Err(ApiError::not_found(
            "no web messaging session with that token",
        ))
    }
}

fn emu(sh: &Arc<Shared>) -> Emulator {
    Emulator {
        addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        shared: sh.clone(),
    }
}

async fn admin_list(State(sh): S) -> Json<Vec<super::ConversationView>> {
    let e = emu(&sh);
    let mut v: Vec<_> = e
        .conversation_ids()
        .iter()
        .filter_map(|id| e.conversation(id))
        .collect();
    v.sort_by(|a, b| a.id.cmp(&b.id));
    Json(v)
}

async fn admin_get(State(sh): S, Path(conv): Path<String>) -> Result<Response, ApiError> {
    let view = emu(&sh)
        .conversation(&conv)
        .ok_or_else(|| ApiError::not_found(format!("conversation {conv} not found")))?;
    Ok(Json(view).into_response())
}

#[derive(Deserialize, Default)]
struct AdminBody {
    body: Option<String>,
    bytes: Option<usize>,
    mode: Option<String>,
    hold_ms: Option<u64>,
}

async fn admin_action(
    State(sh): S,
    Path((conv, action)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let a: AdminBody = if body.is_empty() {
        AdminBody::default()
    } else {
        parse(&body)?
    };
    let e = emu(&sh);
    let n = match action.as_str() {
        "flow-disconnect" => e.flow_disconnect(&conv).map(|_| 1)?,
        "server-end" => e.server_end(&conv).map(|_| 1)?,
        "block-stream" => e.block_stream(&conv, true).map(|_| 1)?,
        "unblock-stream" => e.block_stream(&conv, false).map(|_| 1)?,
        "half-open" => e.half_open(&conv)?,
        "ping-flood" => e.ping_flood(&conv, Duration::from_millis(a.hold_ms.unwrap_or(1000)))?,
        "socket-closing" => e.socket_closing(&conv)?,
        "malformed" => e.send_malformed(&conv)?,
        "oversized" => e.send_oversized(&conv, a.bytes.unwrap_or(1 << 20))?,
        "unknown-event" => e.send_unknown(&conv)?,
        "duplicate" => e.send_duplicate(&conv)?,
        "expire-jwt" => e.expire_jwt(&conv).map(|_| 1)?,
        "drop" => e.drop_sockets(&conv, a.mode.as_deref() == Some("reset"))?,
        other => return Err(ApiError::not_found(format!("no admin action {other}"))),
    };
    Ok(Json(serde_json::json!({ "ok": true, "affected": n })).into_response())
}

async fn admin_action2(
    State(sh): S,
    Path((conv, group, action)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if group != "agent" {
        return Err(ApiError::not_found(format!("no admin group {group}")));
    }
    let a: AdminBody = if body.is_empty() {
        AdminBody::default()
    } else {
        parse(&body)?
    };
    let e = emu(&sh);
    let reply = match action.as_str() {
        "join" => e
            .agent_join(&conv)
            .map(|_| serde_json::json!({"ok": true}))?,
        "message" => {
            let m = e.agent_send(&conv, a.body.as_deref().unwrap_or_default())?;
            serde_json::to_value(m).unwrap_or_default()
        }
        "typing" => e
            .agent_typing(&conv)
            .map(|_| serde_json::json!({"ok": true}))?,
        "end" => e
            .agent_end(&conv)
            .map(|_| serde_json::json!({"ok": true}))?,
        "flash" => e
            .agent_flash(&conv, Duration::from_millis(a.hold_ms.unwrap_or(0)))
            .map(|_| serde_json::json!({"ok": true}))?,
        other => return Err(ApiError::not_found(format!("no agent action {other}"))),
    };
    Ok(Json(reply).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
struct FaultBody {
    status: u16,
    #[serde(default = "one")]
    count: usize,
    #[serde(default = "one_u64")]
    retry_after: u64,
}
fn one() -> usize {
    1
}
fn one_u64() -> u64 {
    1
}

async fn admin_faults(State(sh): S, body: Bytes) -> Result<Response, ApiError> {
    let f: FaultBody = parse(&body)?;
    if !(400..=599).contains(&f.status) {
        return Err(ApiError::bad("status must be 400..=599"));
    }
    emu(&sh).inject_rest_faults(f.status, f.count, f.retry_after);
    Ok(Json(serde_json::json!({ "ok": true, "queued": f.count })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelaysBody {
    list_members_ms: u64,
}

async fn admin_delays(State(sh): S, body: Bytes) -> Result<Response, ApiError> {
    let d: DelaysBody = parse(&body)?;
    if d.list_members_ms > 600_000 {
        return Err(ApiError::bad("list_members_ms must be at most 600000"));
    }
    emu(&sh).delay_list_members(Duration::from_millis(d.list_members_ms));
    Ok(Json(serde_json::json!({ "ok": true })).into_response())
}

async fn admin_drop_all(State(sh): S, Query(q): Query<HashMap<String, String>>) -> Response {
    let n = emu(&sh).drop_all_sockets(q.get("mode").map(String::as_str) == Some("reset"));
    Json(serde_json::json!({ "ok": true, "affected": n })).into_response()
}

async fn admin_log(State(sh): S, Query(q): Query<HashMap<String, String>>) -> Response {
    let log = emu(&sh).log();
    let conv = q.get("conversation");
    let v: Vec<_> = log
        .into_iter()
        .filter(|e| conv.is_none() || e.conversation_id.as_ref() == conv)
        .collect();
    Json(v).into_response()
}

async fn admin_stats(State(sh): S) -> Response {
    Json(emu(&sh).stats()).into_response()
}

#[derive(Deserialize)]
struct BulkCreate {
    count: usize,
}

async fn admin_bulk_create(State(sh): S, body: Bytes) -> Result<Response, ApiError> {
    let b: BulkCreate = parse(&body)?;
    if b.count == 0 || b.count > 100_000 {
        return Err(ApiError::bad("count must be 1..=100000"));
    }
    let chats: Vec<_> = emu(&sh)
        .bulk_create(b.count)
        .into_iter()
        .map(|(id, member, jwt, uri)| serde_json::json!({"conversation_id": id, "member_id": member, "jwt": jwt, "event_stream_uri": uri}))
        .collect();
    Ok(Json(chats).into_response())
}

#[derive(Deserialize)]
struct BulkEnd {
    ids: Vec<String>,
}

async fn admin_bulk_end(State(sh): S, body: Bytes) -> Result<Response, ApiError> {
    let b: BulkEnd = parse(&body)?;
    let sent: serde_json::Map<String, serde_json::Value> = emu(&sh)
        .bulk_server_end(&b.ids)
        .into_iter()
        .map(|(id, us)| (id, serde_json::Value::from(us)))
        .collect();
    Ok(Json(serde_json::json!({ "sent_at_us": sent })).into_response())
}

/// `POST /oauth/token`: the client-credentials grant (HTTP Basic with the client id and secret,
/// `grant_type=client_credentials` in a form body).
async fn platform_token(
    State(sh): S,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    use base64::Engine;
    let form = String::from_utf8_lossy(&body);
    if !form
        .split('&')
        .any(|kv| kv == "grant_type=client_credentials")
    {
        return Err(ApiError::bad("grant_type must be client_credentials"));
    }
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let expected = format!(
        "{}:{}",
        sh.cfg.platform_client_id, sh.cfg.platform_client_secret
    );
    if basic.as_deref() != Some(expected.as_str()) {
        sh.world()
            .record(None, "platform_token", Some(401), String::new());
        return Err(ApiError::unauthorized("client credentials refused"));
    }
    let token = uuid::Uuid::new_v4().simple().to_string();
    let lifetime = sh.cfg.platform_token_lifetime;
    {
        let mut w = sh.world();
        w.platform_tokens
            .insert(token.clone(), Instant::now() + lifetime);
        w.record(None, "platform_token", Some(200), String::new());
    }
    Ok(Json(serde_json::json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": lifetime.as_secs(),
    }))
    .into_response())
}

/// `GET /api/v2/conversations/{id}` (and `/conversations/chats/{id}`): the conversation as the
/// Platform API shows it, for a valid access token.
async fn platform_conversation(
    State(sh): S,
    headers: HeaderMap,
    Path(conv): Path<String>,
) -> Result<Response, ApiError> {
    let mut w = sh.world();
    let valid = bearer(&headers)
        .and_then(|t| w.platform_tokens.get(t))
        .is_some_and(|exp| *exp > Instant::now());
    if !valid {
        w.record(
            Some(&conv),
            "platform_conversation",
            Some(401),
            String::new(),
        );
        return Err(ApiError::unauthorized(
            "access token missing, invalid or expired",
        ));
    }
    let Some(c) = w.convs.get(&conv) else {
        w.record(
            Some(&conv),
            "platform_conversation",
            Some(404),
            String::new(),
        );
        return Err(ApiError::not_found(format!(
            "conversation {conv} not found"
        )));
    };
    let view = super::platform::conversation_view(c, &w.cfg);
    w.record(
        Some(&conv),
        "platform_conversation",
        Some(200),
        String::new(),
    );
    Ok(Json(view).into_response())
}

/// Every Platform API token expires now (tests of renewal).
async fn admin_expire_platform_tokens(State(sh): S) -> Response {
    let mut w = sh.world();
    let n = w.platform_tokens.len();
    w.platform_tokens.clear();
    Json(serde_json::json!({ "ok": true, "affected": n })).into_response()
}
