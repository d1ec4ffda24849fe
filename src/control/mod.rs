//! Control channels: JSON-line commands on stdin and a loopback HTTP API, with the same command
//! set behind both. A bad command gets an error naming the problem; it never stops the daemon or
//! touches another session.
//!
//! stdin: one JSON object per line, `{"cmd": "...", "request_id": "...", ...}`; the reply is a
//! `command_result` or `command_error` event on stdout carrying the `request_id`. Commands that
//! name the same session (or conversation) are applied in the order they were read, so a `send`
//! right after its `attach` finds the session; others run concurrently, so a slow `start` does
//! not hold up a `send`. At most [`MAX_STDIN_IN_FLIGHT`] run at once: beyond that the reader
//! stops reading, and the writer feeding stdin waits (back-pressure, not memory). A line that is
//! not a command (not UTF-8, too long, not JSON) gets a `command_error` and reading goes on.
//!
//! HTTP: each command runs in its own task, so a client that hangs up cannot abandon a `start`
//! halfway (a chat created on the platform but never supervised).

/// Who may drive the HTTP API: Host, Origin, Content-Type and an optional bearer token.
pub mod access;

pub use crate::command::Command;
use crate::command::OpenCmd;
use crate::events::{Event, EventKind};
use crate::secret::Secret;
use crate::session::{Args, Done, Open, SessionView};
pub use crate::supervisor::Route;
use crate::supervisor::{Supervisor, SupervisorError};
use crate::transport::policy::ApiError;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::AsyncRead;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, FramedRead};

/// Longest stdin command line, bytes.
pub const MAX_LINE: usize = 1 << 20;
/// stdin commands running at once; the reader waits beyond this.
pub const MAX_STDIN_IN_FLIGHT: usize = 256;

/// One stdin line as read: its text, or why it cannot be a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A line of UTF-8 (without its `\n` or `\r\n`).
    Text(String),
    /// Longer than [`MAX_LINE`]; its bytes were skipped.
    TooLong,
    /// Not UTF-8.
    NotUtf8,
}

/// Splits stdin into [`Line`]s. Unlike `LinesCodec` it never fails on content: tokio-util's
/// `FramedRead` ends the stream after a decoder's first error, so one bad byte would end stdin.
#[derive(Debug)]
pub struct CommandLines {
    max: usize,
    /// Inside a line that is too long: skip to its end.
    skipping: bool,
    /// Bytes already searched for `\n`.
    searched: usize,
}

impl CommandLines {
    /// Lines of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        CommandLines {
            max,
            skipping: false,
            searched: 0,
        }
    }

    fn line(bytes: &[u8]) -> Line {
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        match std::str::from_utf8(bytes) {
            Ok(s) => Line::Text(s.to_string()),
            Err(_) => Line::NotUtf8,
        }
    }
}

impl Decoder for CommandLines {
    type Item = Line;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> std::io::Result<Option<Line>> {
        let newline = buf[self.searched..]
            .iter()
            .position(|b| *b == b'\n')
            .map(|i| i + self.searched);
        match newline {
            Some(i) => {
                self.searched = 0;
                let line = buf.split_to(i + 1);
                if std::mem::take(&mut self.skipping) || i > self.max {
                    return Ok(Some(Line::TooLong));
                }
                Ok(Some(Self::line(&line[..i])))
            }
            None if buf.len() > self.max => {
                // Keep no more than the limit in memory: drop what is here, skip to the end.
                buf.advance(buf.len());
                self.searched = 0;
                self.skipping = true;
                Ok(None)
            }
            None => {
                self.searched = buf.len();
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> std::io::Result<Option<Line>> {
        if let Some(line) = self.decode(buf)? {
            return Ok(Some(line));
        }
        self.searched = 0;
        if std::mem::take(&mut self.skipping) {
            buf.clear();
            return Ok(Some(Line::TooLong));
        }
        if buf.is_empty() {
            return Ok(None);
        }
        let line = buf.split();
        Ok(Some(Self::line(&line)))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendArgs {
    session: String,
    body: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionArg {
    session: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusArgs {
    conversation_id: String,
    #[serde(default)]
    jwt: Option<Secret>,
}

/// Parse one stdin line into (request_id, command name, command). The name and request id are
/// returned even when the rest is wrong, so the error reply can carry them.
pub fn parse_line(line: &str) -> (Option<String>, String, Result<Command, String>) {
    let mut v: serde_json::Map<String, serde_json::Value> = match serde_json::from_str(line) {
        Ok(serde_json::Value::Object(m)) => m,
        Ok(_) => {
            return (
                None,
                "unknown".into(),
                Err("a command is a JSON object".into()),
            );
        }
        Err(e) => return (None, "unknown".into(), Err(format!("not JSON: {e}"))),
    };
    let request_id = match v.remove("request_id") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s),
        Some(other) => Some(other.to_string()),
    };
    let name = match v.remove("cmd") {
        Some(serde_json::Value::String(s)) => s,
        _ => {
            return (
                request_id,
                "unknown".into(),
                Err(
                    "missing \"cmd\" (start, attach, send, typing, leave, start_new, list, get, status)"
                        .into(),
                ),
            );
        }
    };
    let rest = serde_json::Value::Object(v);
    let cmd = parse_command(&name, rest);
    (request_id, name, cmd)
}

/// Parse the arguments of command `name`.
pub fn parse_command(name: &str, args: serde_json::Value) -> Result<Command, String> {
    fn de<T: serde::de::DeserializeOwned>(name: &str, v: serde_json::Value) -> Result<T, String> {
        serde_json::from_value(v).map_err(|e| format!("{name}: {e}"))
    }
    if name == "start" || name == "attach" {
        let serde_json::Value::Object(mut args) = args else {
            return Err(format!("{name}: the arguments are a JSON object"));
        };
        let backend = match args.remove("backend") {
            None => None,
            Some(serde_json::Value::String(b)) => Some(b),
            Some(_) => return Err(format!("{name}: backend is a backend's name, a string")),
        };
        return Ok(Command::Open(OpenCmd {
            open: if name == "start" {
                Open::Start
            } else {
                Open::Attach
            },
            backend,
            args: Args(args),
            key: None,
        }));
    }
    if args.get("backend").is_some() {
        return Err(format!("{name}: unknown field `backend`"));
    }
    Ok(match name {
        "start_new" => Command::StartNew {
            session: de::<SessionArg>(name, args)?.session,
        },
        "send" => {
            let a: SendArgs = de(name, args)?;
            Command::Send {
                session: a.session,
                body: a.body,
            }
        }
        "typing" => Command::Typing {
            session: de::<SessionArg>(name, args)?.session,
        },
        "leave" => Command::Leave {
            session: de::<SessionArg>(name, args)?.session,
        },
        "get" => Command::Get {
            session: de::<SessionArg>(name, args)?.session,
        },
        "status" => {
            let a: StatusArgs = de(name, args)?;
            Command::Status {
                conversation_id: a.conversation_id,
                jwt: a.jwt,
            }
        }
        "list" => {
            de::<NoArgs>(name, args)?;
            Command::List
        }
        other => {
            return Err(format!(
                "unknown command {other:?} (start, attach, send, typing, leave, start_new, list, get, status)"
            ));
        }
    })
}

/// What a command returns: the `result` of its `command_result` event and its HTTP body.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// `start`, `attach`, `get`: the session's view.
    Session(SessionView),
    /// `list`: every live session's view.
    Sessions {
        /// Sorted by session id.
        sessions: Vec<SessionView>,
    },
    /// `send`, `typing`, `leave`: what the session did.
    Done(Done),
    /// `status`: whether the conversation is alive, and who says so.
    Status(crate::platform::status::ConversationStatus),
    /// Cluster mode: the reply of the node that ran the command, as it sent it.
    Remote(serde_json::Value),
}

/// A command as JSON, the form [`parse_line`] reads (for forwarding it to another node; the
/// caller seals it, since `attach` and `status` carry a jwt).
pub fn to_wire(cmd: &Command) -> serde_json::Value {
    use serde_json::json;
    let mut v = match cmd {
        Command::Open(o) => {
            let mut m = o.args.0.clone();
            if let Some(b) = &o.backend {
                m.insert("backend".into(), json!(b));
            }
            serde_json::Value::Object(m)
        }
        Command::Send { session, body } => json!({ "session": session, "body": body }),
        Command::Typing { session }
        | Command::Leave { session }
        | Command::Get { session }
        | Command::StartNew { session } => {
            json!({ "session": session })
        }
        Command::List => json!({}),
        Command::Status {
            conversation_id,
            jwt,
        } => match jwt {
            Some(j) => json!({ "conversation_id": conversation_id, "jwt": j.expose() }),
            None => json!({ "conversation_id": conversation_id }),
        },
    };
    if let Some(m) = v.as_object_mut() {
        m.insert("cmd".into(), json!(cmd.name()));
    }
    v
}

/// Run a command: here, or (cluster mode) on the node it belongs to.
pub async fn execute(sup: &Supervisor, cmd: Command) -> Result<Reply, SupervisorError> {
    // A backend fills in what its configuration supplies here (a Web Messaging chat's key
    // comes from its deployment and token), so the node that runs the command is the one
    // every node would pick.
    let cmd = match cmd {
        Command::Open(mut o) => {
            sup.prepare(&mut o)?;
            Command::Open(o)
        }
        other => other,
    };
    let Some(router) = sup.router() else {
        return execute_here(sup, cmd).await;
    };
    // A node reconnecting to NATS has no subscription for a moment (no responders: nobody got
    // the command), and a chat that is moving between nodes is found nowhere for a moment: both
    // are tried again, placed anew each time, for up to about ten seconds.
    let mut tries = 0;
    loop {
        let (node, result) = match router.place(&cmd).await {
            Some(node) => {
                let r = router.forward(node.clone(), &cmd).await;
                (Some(node), r.map(Reply::Remote))
            }
            None => (None, execute_here(sup, cmd.clone()).await),
        };
        let again = match &result {
            Err(SupervisorError::Remote("no_responders", _)) => {
                if let Some(n) = &node {
                    router.unreachable(n);
                }
                true
            }
            Err(SupervisorError::NotFound(_))
            | Err(SupervisorError::Moved(_))
            | Err(SupervisorError::Remote("not_found" | "moved", _)) => router.moving(&cmd).await,
            _ => false,
        };
        if !again || tries >= 40 {
            return match result {
                Err(SupervisorError::Remote("no_responders", msg)) => {
                    Err(SupervisorError::Remote("unreachable", msg))
                }
                r => r,
            };
        }
        tries += 1;
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Run a command on this node.
pub async fn execute_here(sup: &Supervisor, cmd: Command) -> Result<Reply, SupervisorError> {
    Ok(match cmd {
        Command::Open(o) => Reply::Session(sup.open(o).await?),
        Command::StartNew { session } => Reply::Session(sup.start_new(&session).await?),
        Command::Send { session, body } => Reply::Done(sup.send_message(&session, body).await?),
        Command::Typing { session } => Reply::Done(sup.send_typing(&session).await?),
        Command::Leave { session } => Reply::Done(sup.leave(&session).await?),
        Command::List => Reply::Sessions {
            sessions: sup.list().await,
        },
        Command::Get { session } => Reply::Session(sup.get(&session).await?),
        Command::Status {
            conversation_id,
            jwt,
        } => Reply::Status(status(sup, &conversation_id, jwt).await?),
    })
}

/// The status of `conversation_id`; `jwt` lets the guest API answer for a chat neither guestd
/// holds nor the Platform API can be asked about.
pub async fn status(
    sup: &Supervisor,
    conversation_id: &str,
    jwt: Option<Secret>,
) -> Result<crate::platform::status::ConversationStatus, SupervisorError> {
    // Before anything else: the id goes into Platform API and guest API URLs.
    crate::transport::policy::check_id("conversation_id", conversation_id)
        .map_err(|e| SupervisorError::Invalid(e.to_string()))?;
    let held = sup.get(conversation_id).await.ok();
    // Over (or gone): the remembered end says more than the view (when, how guestd knew).
    if held.as_ref().is_none_or(|v| v.ended.is_some()) {
        if let Some(ends) = sup.ends() {
            if let Some(r) = ends.find(conversation_id).await {
                return Ok(crate::platform::status::ConversationStatus::remembered(r));
            }
        }
    }
    Ok(crate::platform::status::status_from(
        held,
        sup.platform(),
        sup.backends(),
        conversation_id,
        jwt,
    )
    .await?)
}

/// The event that answers a stdin command; serialized here, at the edge.
fn reply_event(
    request_id: Option<String>,
    command: String,
    result: Result<Reply, String>,
) -> Event {
    let (session, conv) = match &result {
        Ok(Reply::Session(v)) => (v.session.clone(), Some(v.conversation_id.clone())),
        Ok(Reply::Remote(v)) if v.get("session").is_some_and(|s| s.is_string()) => (
            v["session"].as_str().unwrap_or("-").to_string(),
            v.get("conversation_id")
                .and_then(|c| c.as_str())
                .map(str::to_string),
        ),
        _ => ("-".to_string(), None),
    };
    let kind = match result {
        Ok(reply) => EventKind::CommandResult {
            command,
            result: serde_json::to_value(&reply).unwrap_or_default(),
        },
        Err(error) => EventKind::CommandError { command, error },
    };
    Event::new(&session, conv.as_deref(), kind).with_request(request_id)
}

/// Split `input` into [`Line`]s as stdin would, fed to the decoder `chunk` bytes at a time
/// (for tests and the fuzz target).
pub fn split_lines(input: &[u8], max: usize, chunk: usize) -> Vec<Line> {
    let mut codec = CommandLines::new(max);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for part in input.chunks(chunk.max(1)) {
        buf.extend_from_slice(part);
        while let Ok(Some(l)) = codec.decode(&mut buf) {
            out.push(l);
        }
    }
    while let Ok(Some(l)) = codec.decode_eof(&mut buf) {
        out.push(l);
    }
    out
}

/// The command an HTTP API body makes: `start` and `attach` take the whole body, `send` a
/// `{"body": ...}` for `session`. The HTTP handlers and the fuzz target share it.
pub fn command_from_body(name: &str, session: &str, body: &[u8]) -> Result<Command, String> {
    fn parse<T: serde::de::DeserializeOwned>(name: &str, body: &[u8]) -> Result<T, String> {
        let body: &[u8] = if body.is_empty() { b"{}" } else { body };
        serde_json::from_slice(body).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => format!("{name}: {e}"),
            _ => format!("not JSON: {e}"),
        })
    }
    if name == "start" || name == "attach" {
        // The same arguments as on stdin, `backend` included.
        let v: serde_json::Value = parse(name, body)?;
        if !v.is_object() {
            return Err(format!("{name}: the body is a JSON object"));
        }
        return parse_command(name, v);
    }
    Ok(match name {
        "send" => Command::Send {
            session: session.to_string(),
            body: parse::<SendBody>(name, body)?.body,
        },
        other => return Err(format!("{other} takes no body")),
    })
}

/// The session a command acts on, when it names one: commands with the same key are applied in
/// the order they were read.
fn order_key(cmd: &Command) -> Option<String> {
    match cmd {
        Command::Open(o) if o.open == Open::Attach => o.key.clone(),
        Command::Send { session, .. }
        | Command::Typing { session }
        | Command::Leave { session }
        | Command::Get { session }
        | Command::StartNew { session } => Some(session.clone()),
        Command::Open(_) | Command::List | Command::Status { .. } => None,
    }
}

/// Read commands from `input` until it closes or `stop` fires. See the module doc for the
/// order, the bound and what happens to a bad line.
pub async fn stdin_loop<R: AsyncRead + Unpin>(
    sup: Supervisor,
    input: R,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut lines = FramedRead::new(input, CommandLines::new(MAX_LINE));
    let slots = Arc::new(Semaphore::new(MAX_STDIN_IN_FLIGHT));
    // Per key, the completion of the last command read for it.
    let mut tails: HashMap<String, oneshot::Receiver<()>> = HashMap::new();
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            l = lines.next() => l,
        };
        let (request_id, name, parsed) = match next {
            None => break,
            Some(Ok(Line::Text(l))) if l.trim().is_empty() => continue,
            Some(Ok(Line::Text(l))) => parse_line(&l),
            Some(Ok(Line::TooLong)) => (
                None,
                "unknown".into(),
                Err(format!("command line longer than {MAX_LINE} bytes")),
            ),
            Some(Ok(Line::NotUtf8)) => (
                None,
                "unknown".into(),
                Err("command line is not UTF-8".into()),
            ),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "stdin read failed; no more stdin commands");
                break;
            }
        };
        // A start/attach is checked (and completed from the configuration) here, once: its key
        // orders it with the commands after it.
        let parsed = parsed.and_then(|c| match c {
            Command::Open(mut o) => {
                sup.prepare(&mut o).map_err(|e| e.to_string())?;
                Ok(Command::Open(o))
            }
            c => Ok(c),
        });
        // Back-pressure: wait for a free slot before reading on.
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (after, done) = match parsed.as_ref().ok().and_then(order_key) {
            Some(key) => {
                if tails.len() > 4 * MAX_STDIN_IN_FLIGHT {
                    // Forget keys whose last command has finished.
                    tails.retain(|_, rx| {
                        matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty))
                    });
                }
                let (tx, rx) = oneshot::channel();
                (tails.insert(key, rx), Some(tx))
            }
            None => (None, None),
        };
        let sup = sup.clone();
        tokio::spawn(async move {
            if let Some(prev) = after {
                // Finished or dropped: either way it is no longer ahead of this one.
                let _ = prev.await;
            }
            let result = match parsed {
                Err(e) => Err(e),
                Ok(cmd) => execute(&sup, cmd).await.map_err(|e| e.to_string()),
            };
            let ok = if result.is_ok() { "ok" } else { "error" };
            metrics::counter!("guestd_commands_total", "channel" => "stdin", "result" => ok)
                .increment(1);
            if let Err(e) = &result {
                tracing::info!(command = %name, error = %e, "command failed");
            }
            sup.emitter()
                .emit(reply_event(request_id, name, result))
                .await;
            drop(done);
            drop(permit);
        });
    }
    tracing::debug!("stdin closed; commands still accepted over HTTP");
}

/// State of the HTTP API.
#[derive(Clone)]
pub struct HttpState {
    /// The registry.
    pub sup: Supervisor,
    /// Ready once the journal is replayed and until shutdown.
    pub ready: tokio::sync::watch::Receiver<bool>,
    /// Time a client has to send a whole request body (`control.body_timeout`).
    pub body_timeout: std::time::Duration,
}

/// An HTTP error reply: `{"error": ..., "code": ...}` with its status.
struct HttpError {
    status: StatusCode,
    message: String,
    code: &'static str,
    /// Seconds, for a `Retry-After` header.
    retry_after: Option<u64>,
}

impl HttpError {
    fn new(status: StatusCode, message: impl Into<String>, code: &'static str) -> Self {
        HttpError {
            status,
            message: message.into(),
            code,
            retry_after: None,
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        metrics::counter!("guestd_commands_total", "channel" => "http", "result" => "error")
            .increment(1);
        let body = Json(serde_json::json!({ "error": self.message, "code": self.code }));
        match self.retry_after {
            Some(secs) => (
                self.status,
                [(axum::http::header::RETRY_AFTER, secs.to_string())],
                body,
            )
                .into_response(),
            None => (self.status, body).into_response(),
        }
    }
}

/// The one mapping from a command's failure to an HTTP status.
impl From<SupervisorError> for HttpError {
    fn from(e: SupervisorError) -> Self {
        let mut retry_after = None;
        let status = match &e {
            SupervisorError::NotFound(_) => StatusCode::NOT_FOUND,
            SupervisorError::Full(_) | SupervisorError::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            SupervisorError::Busy(_) => {
                retry_after = Some(1);
                StatusCode::SERVICE_UNAVAILABLE
            }
            SupervisorError::AlreadyAttached(..) | SupervisorError::Ended(_) => {
                StatusCode::CONFLICT
            }
            SupervisorError::Invalid(_) => StatusCode::BAD_REQUEST,
            SupervisorError::ReadOnly(_) => StatusCode::CONFLICT,
            SupervisorError::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            SupervisorError::Journal(_)
            | SupervisorError::Moved(_)
            | SupervisorError::NotConnected(_) => {
                retry_after = Some(1);
                StatusCode::SERVICE_UNAVAILABLE
            }
            SupervisorError::Remote(code, _) => match *code {
                "not_found" => StatusCode::NOT_FOUND,
                "conflict" | "ended" | "read_only" | "not_configured" => StatusCode::CONFLICT,
                "refused" => StatusCode::UNPROCESSABLE_ENTITY,
                "invalid" => StatusCode::BAD_REQUEST,
                "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
                "unauthorized" | "backend_error" => StatusCode::BAD_GATEWAY,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            },
            SupervisorError::Api(api) => match api {
                ApiError::RateLimited(after) => {
                    retry_after = Some(after.map_or(1, |d| d.as_secs().max(1)));
                    StatusCode::TOO_MANY_REQUESTS
                }
                // The platform refused what was asked (a body it does not take, say).
                ApiError::Rejected { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                ApiError::Policy(_) => StatusCode::BAD_REQUEST,
                // guestd's own configuration lacks what the command needs (docs/events.md).
                ApiError::NotConfigured(_) => StatusCode::CONFLICT,
                ApiError::Transport(_) => StatusCode::GATEWAY_TIMEOUT,
                // The platform refused guestd (401), lost the chat (404), or failed (5xx).
                ApiError::Unauthorized(_)
                | ApiError::NotFound(_)
                | ApiError::Server { .. }
                | ApiError::Decode(_) => StatusCode::BAD_GATEWAY,
            },
        };
        HttpError {
            status,
            message: e.to_string(),
            code: e.code(),
            retry_after,
        }
    }
}

/// Run a command in its own task and answer with its reply.
async fn run_http(st: &HttpState, cmd: Command) -> Result<Response, HttpError> {
    let created = matches!(cmd, Command::Open(_) | Command::StartNew { .. });
    // In its own task: hyper drops this handler's future when the client hangs up, which must
    // not abandon a command halfway.
    let sup = st.sup.clone();
    let reply = tokio::spawn(async move { execute(&sup, cmd).await })
        .await
        .map_err(|e| {
            HttpError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("command failed: {e}"),
                "internal",
            )
        })??;
    metrics::counter!("guestd_commands_total", "channel" => "http", "result" => "ok").increment(1);
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(reply)).into_response())
}

/// The command an HTTP body makes, or a 400 naming the problem.
fn body_command(name: &str, session: &str, body: &Bytes) -> Result<Command, HttpError> {
    command_from_body(name, session, body)
        .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, e, "invalid"))
}

/// HTTP connections open at once (the default of `control.max_connections`); beyond this, new
/// ones get a probe slot or are closed at once (counted in
/// `guestd_http_refused_total{code="too_many_connections"}`), so idle clients cannot exhaust
/// the open-file limit that sessions need.
pub const MAX_HTTP_CONNECTIONS: usize = 512;
/// HTTP connections open at once from one peer address (the default of
/// `control.max_connections_per_peer`): one client cannot take the whole pool.
pub const MAX_HTTP_CONNECTIONS_PER_PEER: usize = 64;
/// A client must send a request's headers within this (an idle or slow-loris connection is
/// closed).
pub const HTTP_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A client must send a request's whole body within this (the default of
/// `control.body_timeout`); a body still trickling in then gets 408 and the connection is
/// closed.
pub const HTTP_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Largest request body, bytes (as a stdin command line); larger gets 413.
pub const MAX_HTTP_BODY: usize = MAX_LINE;
/// The longest one connection may live, whatever it does.
pub const HTTP_CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(300);
/// Connections held apart, beyond `max_connections`, for probes: while the general pool (or a
/// peer's share of it) is full, a new connection gets one of these; it serves `/healthz`,
/// `/readyz` and `/metrics` only (anything else: 503), one request, for at most
/// [`PROBE_LIFETIME`].
pub const PROBE_SLOTS: usize = 16;
/// Probe slots one peer address may hold at once.
pub const PROBE_SLOTS_PER_PEER: usize = 2;
/// The longest a probe connection lives (headers included).
pub const PROBE_LIFETIME: std::time::Duration = std::time::Duration::from_secs(5);

/// The bounds of the HTTP listener (see the constants for what each means).
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// General connections at once.
    pub max_connections: usize,
    /// General connections at once per peer address.
    pub max_per_peer: usize,
    /// Time to send a whole request body.
    pub body_timeout: std::time::Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: MAX_HTTP_CONNECTIONS,
            max_per_peer: MAX_HTTP_CONNECTIONS_PER_PEER,
            body_timeout: HTTP_BODY_TIMEOUT,
        }
    }
}

/// Connections counted per peer address, in one pool (general or probe). A [`PeerSlot`] gives
/// its count back when dropped.
#[derive(Default)]
struct PeerCounts(std::sync::Mutex<HashMap<std::net::IpAddr, usize>>);

/// One connection of a peer, counted until dropped.
struct PeerSlot {
    counts: Arc<PeerCounts>,
    ip: std::net::IpAddr,
}

impl PeerCounts {
    /// Count one more connection of `ip` unless it holds `max` already.
    fn take(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<PeerSlot> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut m = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Whether `path` is a probe's (answered on probe slots too).
fn is_probe(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

/// Serve `app` on `listener` until `stop`: HTTP/1 with a header timeout, a body timeout (in
/// [`router`]), a lifetime, a cap on connections and one per peer, and probe slots held apart
/// so `/healthz`, `/readyz` and `/metrics` answer while the pool is full (axum::serve has none
/// of these).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    stop: tokio_util::sync::CancellationToken,
    limits: HttpLimits,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let probe_slots = Arc::new(Semaphore::new(PROBE_SLOTS));
    let peers = Arc::new(PeerCounts::default());
    let probe_peers = Arc::new(PeerCounts::default());
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let general = peers
            .take(peer.ip(), limits.max_per_peer.max(1))
            .and_then(|p| Some((p, slots.clone().try_acquire_owned().ok()?)));
        if let Some((peer_slot, slot)) = general {
            let svc = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HTTP_HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
                let _ = tokio::time::timeout(HTTP_CONNECTION_LIFETIME, conn).await;
                drop((slot, peer_slot));
            });
            continue;
        }
        let probe = probe_peers
            .take(peer.ip(), PROBE_SLOTS_PER_PEER)
            .and_then(|p| Some((p, probe_slots.clone().try_acquire_owned().ok()?)));
        let Some((peer_slot, slot)) = probe else {
            metrics::counter!("guestd_http_refused_total", "code" => "too_many_connections")
                .increment(1);
            drop(tcp);
            continue;
        };
        let inner = hyper_util::service::TowerToHyperService::new(app.clone());
        let svc = hyper::service::service_fn(
            move |req: axum::extract::Request<hyper::body::Incoming>| {
                let probe = is_probe(req.uri().path());
                let answer = probe.then(|| hyper::service::Service::call(&inner, req));
                async move {
                    if let Some(answer) = answer {
                        answer.await
                    } else {
                        metrics::counter!("guestd_http_refused_total", "code" => "too_many_connections")
                        .increment(1);
                        let mut r = HttpError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "too many connections: only /healthz, /readyz and /metrics answer now",
                            "too_many_connections",
                        )
                        .into_response();
                        r.headers_mut().insert(
                            axum::http::header::CONNECTION,
                            axum::http::HeaderValue::from_static("close"),
                        );
                        Ok::<_, std::convert::Infallible>(r)
                    }
                }
            },
        );
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(PROBE_LIFETIME)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(PROBE_LIFETIME, conn).await;
            drop((slot, peer_slot));
        });
    }
}

/// Read the whole request body within the body timeout (and at most [`MAX_HTTP_BODY`]), so a
/// client trickling its body cannot hold a connection: 408 (or 413) and the connection closes.
async fn body_deadline(
    State(timeout): State<std::time::Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let refuse = |status, message: &str, code| {
        let mut r = HttpError::new(status, message, code).into_response();
        r.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        r
    };
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, MAX_HTTP_BODY)).await
    {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            metrics::counter!("guestd_http_refused_total", "code" => "body_too_large").increment(1);
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large or broken",
                "body_too_large",
            );
        }
        Err(_) => {
            metrics::counter!("guestd_http_refused_total", "code" => "body_timeout").increment(1);
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                "request body not received in time",
                "body_timeout",
            );
        }
    };
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// The HTTP API and ops endpoints, behind the access checks of [`crate::control::access`].
pub fn router(st: HttpState, access: impl Into<crate::control::access::AccessCell>) -> Router {
    Router::new()
        .route("/v1/sessions", post(http_start).get(http_list))
        .route("/v1/sessions/attach", post(http_attach))
        .route("/v1/sessions/{id}", get(http_get).delete(http_leave))
        .route("/v1/sessions/{id}/messages", post(http_send))
        .route("/v1/sessions/{id}/typing", post(http_typing))
        .route("/v1/sessions/{id}/start_new", post(http_start_new))
        .route("/v1/conversations/{id}/status", get(http_status))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(|| async { crate::metrics::render() }))
        .fallback(|| async { HttpError::new(StatusCode::NOT_FOUND, "no such path", "not_found") })
        .with_state(st.clone())
        // Inside the access checks: a refused client's body is never read.
        .layer(axum::middleware::from_fn_with_state(
            st.body_timeout,
            body_deadline,
        ))
        .layer(axum::middleware::from_fn_with_state(
            access.into(),
            crate::control::access::guard,
        ))
}

async fn readyz(State(st): State<HttpState>) -> Response {
    if !st.sup.journal_ok() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the journal cannot make records durable (disk full?)\n",
        )
            .into_response()
    } else if !st.sup.emitter().sink_ok() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: event output is failing (no reader?); events wait\n",
        )
            .into_response()
    } else if *st.ready.borrow() && st.sup.accepting() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn http_start(State(st): State<HttpState>, body: Bytes) -> Result<Response, HttpError> {
    run_http(&st, body_command("start", "", &body)?).await
}

async fn http_attach(State(st): State<HttpState>, body: Bytes) -> Result<Response, HttpError> {
    run_http(&st, body_command("attach", "", &body)?).await
}

async fn http_list(State(st): State<HttpState>) -> Result<Response, HttpError> {
    run_http(&st, Command::List).await
}

async fn http_get(
    State(st): State<HttpState>,
    Path(session): Path<String>,
) -> Result<Response, HttpError> {
    run_http(&st, Command::Get { session }).await
}

async fn http_leave(
    State(st): State<HttpState>,
    Path(session): Path<String>,
) -> Result<Response, HttpError> {
    run_http(&st, Command::Leave { session }).await
}

async fn http_start_new(
    State(st): State<HttpState>,
    Path(session): Path<String>,
) -> Result<Response, HttpError> {
    run_http(&st, Command::StartNew { session }).await
}

async fn http_typing(
    State(st): State<HttpState>,
    Path(session): Path<String>,
) -> Result<Response, HttpError> {
    run_http(&st, Command::Typing { session }).await
}

/// `GET /v1/conversations/{id}/status`; the chat's jwt may come in `X-Guest-Chat-Jwt` (a header,
/// never the query string, which proxies log).
async fn http_status(
    State(st): State<HttpState>,
    Path(conversation_id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Response, HttpError> {
    let jwt = headers
        .get("x-guest-chat-jwt")
        .and_then(|v| v.to_str().ok())
        .map(Secret::new);
    run_http(
        &st,
        Command::Status {
            conversation_id,
            jwt,
        },
    )
    .await
}

/// The body of `POST /v1/sessions/{id}/messages`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    body: String,
}

async fn http_send(
    State(st): State<HttpState>,
    Path(session): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    run_http(&st, body_command("send", &session, &body)?).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every failure kind has its status: a platform 401, 429 or 5xx is not the caller's 400.
    #[test]
    fn failures_map_to_statuses_in_one_place() {
        use std::time::Duration;
        let rows: Vec<(SupervisorError, u16, Option<u64>)> = vec![
            (SupervisorError::NotFound("s".into()), 404, None),
            (SupervisorError::Full(3), 503, None),
            (SupervisorError::ShuttingDown, 503, None),
            (SupervisorError::Busy("s".into()), 503, Some(1)),
            (SupervisorError::Ended("s".into()), 409, None),
            (
                SupervisorError::AlreadyAttached("c".into(), "s".into()),
                409,
                None,
            ),
            (SupervisorError::Invalid("x".into()), 400, None),
            (
                SupervisorError::Api(ApiError::Unauthorized("x".into())),
                502,
                None,
            ),
            (
                SupervisorError::Api(ApiError::RateLimited(Some(Duration::from_secs(7)))),
                429,
                Some(7),
            ),
            (
                SupervisorError::Api(ApiError::Server {
                    status: 503,
                    message: "x".into(),
                }),
                502,
                None,
            ),
            (
                SupervisorError::Api(ApiError::Rejected {
                    status: 400,
                    message: "x".into(),
                }),
                422,
                None,
            ),
            (
                SupervisorError::Api(ApiError::Transport("x".into())),
                504,
                None,
            ),
            (
                SupervisorError::Api(ApiError::NotConfigured("x".into())),
                409,
                None,
            ),
            (
                SupervisorError::Remote("not_configured", "x".into()),
                409,
                None,
            ),
        ];
        for (e, status, retry) in rows {
            let text = e.to_string();
            let h = HttpError::from(e);
            assert_eq!(h.status.as_u16(), status, "{text}");
            assert_eq!(h.retry_after, retry, "{text}");
            assert!(!h.message.contains("Some("), "no Debug text: {}", h.message);
        }
    }

    #[test]
    fn bad_lines_are_items_not_the_end_of_stdin() {
        let input = b"{\"cmd\":\"list\"}\r\nRen\xe9e\n0123456789ABCDEF\nok\ntail";
        for chunk in [1, 3, 7, 100] {
            assert_eq!(
                split_lines(input, 10, chunk),
                vec![
                    Line::TooLong,
                    Line::NotUtf8,
                    Line::TooLong,
                    Line::Text("ok".into()),
                    Line::Text("tail".into()),
                ],
                "chunk {chunk}"
            );
        }
        let input = b"{\"cmd\":\"list\"}\r\nRen\xe9e\n";
        assert_eq!(
            split_lines(input, 64, 5),
            vec![Line::Text("{\"cmd\":\"list\"}".into()), Line::NotUtf8]
        );
        // A line too long at EOF, with no newline, is reported too.
        assert_eq!(split_lines(&[b'x'; 50], 10, 4), vec![Line::TooLong]);
        assert_eq!(split_lines(b"", 10, 4), vec![]);
    }

    #[tokio::test]
    async fn commands_on_one_session_share_an_order_key() {
        // As the stdin loop does: a start/attach is prepared by its backend, which gives its key.
        let (emitter, _writer) =
            crate::events::spawn_writer(crate::events::WriterSink(tokio::io::sink()), 4);
        let (ctx, _done) =
            crate::session::SessionCtx::for_test(emitter, Arc::new(crate::journal::NullJournal), 1);
        let backends = crate::backends::guest_chat::backend::only(
            Arc::new(crate::backends::guest_chat::api::testing::Stalled),
            Default::default(),
        );
        let key = |l: &str| {
            let mut c = parse_line(l).2.ok()?;
            if let Command::Open(o) = &mut c {
                let b = backends.get(None).ok()?;
                o.key = b.prepare(&ctx, o.open, &mut o.args).ok()?;
            }
            order_key(&c)
        };
        assert_eq!(
            key(
                r#"{"cmd":"attach","conversation_id":"c1","member_id":"m","jwt":"j","event_stream_uri":"ws://127.0.0.1:1/x"}"#
            ),
            key(r#"{"cmd":"send","session":"c1","body":"hi"}"#)
        );
        assert_eq!(
            key(r#"{"cmd":"leave","session":"c1"}"#).as_deref(),
            Some("c1")
        );
        assert_eq!(
            key(r#"{"cmd":"start","queue":"q","display_name":"d"}"#),
            None
        );
        assert_eq!(key(r#"{"cmd":"list"}"#), None);
    }

    #[test]
    fn parses_commands_and_names_errors() {
        let (rid, name, c) =
            parse_line(r#"{"cmd":"send","request_id":"r1","session":"s-1","body":"hi"}"#);
        assert_eq!(rid.as_deref(), Some("r1"));
        assert_eq!(name, "send");
        assert!(
            matches!(c, Ok(Command::Send { ref session, ref body }) if session == "s-1" && body == "hi")
        );
        let (_, _, c) = parse_line(r#"{"cmd":"start","queue":"Support","display_name":"Ann"}"#);
        assert!(
            matches!(c, Ok(Command::Open(ref o)) if o.open == Open::Start && o.args.0["queue"] == "Support")
        );
        let (_, _, c) = parse_line("{oops");
        assert!(c.unwrap_err().starts_with("not JSON"));
        let (rid, _, c) = parse_line(r#"{"request_id":"r2"}"#);
        assert_eq!(rid.as_deref(), Some("r2"));
        assert!(c.unwrap_err().contains("missing \"cmd\""));
        let (_, _, c) = parse_line(r#"{"cmd":"fly"}"#);
        assert!(c.unwrap_err().contains("unknown command"));
        let (_, _, c) = parse_line(r#"{"cmd":"send","session":"s"}"#);
        assert!(c.unwrap_err().contains("body"));
        let (_, _, c) = parse_line(r#"{"cmd":"list","extra":1}"#);
        assert!(c.unwrap_err().contains("extra"));
        let (_, _, c) = parse_line(
            r#"{"cmd":"attach","conversation_id":"c","member_id":"m","jwt":"secret-token","event_stream_uri":"ws://127.0.0.1:1/x"}"#,
        );
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("secret-token"), "{dbg}");
    }
}
