//! guestd's own event schema (versioned, documented in `docs/events.md` and
//! `docs/events.schema.json`) and the writer that puts it on stdout as JSON lines.
//!
//! Back-pressure policy: producers `await` a bounded queue. A slow or stalled stdout reader
//! therefore slows sessions down (their sockets stop being read, TCP pushes back on the server),
//! but no event is ever dropped, `ended` included. `guestd_event_queue_depth` and
//! `guestd_event_queue_full_total` show when that happens.

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// Version of the event schema; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// Why a chat ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// guestd (on a command) made the guest leave.
    GuestLeft,
    /// The agent disconnected the interaction.
    AgentEnded,
    /// A flow disconnected the chat before any agent connected.
    FlowEnded,
    /// The 15-minute no-activity rule (guestd's deadline passed).
    InactivityTimeout,
    /// The socket was lost and could not be reopened within the grace window.
    ReconnectGraceExpired,
    /// The jwt was refused (401).
    TokenExpired,
    /// The platform ended it for a reason guestd cannot tell.
    ServerEnded,
    /// Web Messaging: an agent or flow ended the conversation (Presence `Disconnect`; the
    /// deployment's Conversation Disconnect is on). `read_only` says whether the session may
    /// still send (Send mode) or not (ReadOnly mode).
    ConversationDisconnected,
    /// Web Messaging: the session's time to live ran out (`SessionExpiredEvent`, code 4006,
    /// or a reconnect answered with a new session).
    SessionExpired,
    /// Web Messaging: the platform does not know the session token (code 4007).
    SessionNotFound,
    /// Web Messaging: the session was cleared by another client of the same token
    /// (`SessionClearedEvent` guestd did not ask for).
    SessionCleared,
    /// Web Messaging: the platform closed guestd's connection (`ConnectionClosedEvent`:
    /// signed in elsewhere, logged out, or evicted by a fourth connection). guestd does not
    /// reconnect: that would evict the user's own client in turn.
    ConnectionClosed,
    /// Web Messaging: `start_new` discarded the session (a new one replaces it).
    StartedNew,
}

impl EndReason {
    /// Every reason, in documentation order.
    pub const ALL: [EndReason; 13] = [
        EndReason::GuestLeft,
        EndReason::AgentEnded,
        EndReason::FlowEnded,
        EndReason::InactivityTimeout,
        EndReason::ReconnectGraceExpired,
        EndReason::TokenExpired,
        EndReason::ServerEnded,
        EndReason::ConversationDisconnected,
        EndReason::SessionExpired,
        EndReason::SessionNotFound,
        EndReason::SessionCleared,
        EndReason::ConnectionClosed,
        EndReason::StartedNew,
    ];

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::GuestLeft => "guest_left",
            EndReason::AgentEnded => "agent_ended",
            EndReason::FlowEnded => "flow_ended",
            EndReason::InactivityTimeout => "inactivity_timeout",
            EndReason::ReconnectGraceExpired => "reconnect_grace_expired",
            EndReason::TokenExpired => "token_expired",
            EndReason::ServerEnded => "server_ended",
            EndReason::ConversationDisconnected => "conversation_disconnected",
            EndReason::SessionExpired => "session_expired",
            EndReason::SessionNotFound => "session_not_found",
            EndReason::SessionCleared => "session_cleared",
            EndReason::ConnectionClosed => "connection_closed",
            EndReason::StartedNew => "started_new",
        }
    }
}

/// What an `ended` event ends, where the backend tells them apart (Web Messaging; a guest chat
/// is one thing and its `ended` carries no scope).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum EndScope {
    /// The conversation ended; the session (its token) lives on and may start another.
    Conversation,
    /// The session ended: its token is no good any more (or was discarded).
    Session,
    /// Only guestd's connection ended: the session lives on in another client.
    Connection,
}

/// The Web Messaging additions to an `ended` event; empty (and absent on the wire) for a guest
/// chat.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EndExtra {
    /// What ended.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub scope: Option<EndScope>,
    /// The conversation ended in ReadOnly mode: the session can no longer send.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub read_only: bool,
}

/// The payload of an event; `type` on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// guestd took charge of a chat.
    SessionStarted {
        /// "start" (guestd created it), "attach" or "resume" (from the journal after a restart).
        mode: String,
        /// The guest's member id.
        member_id: String,
    },
    /// The event stream is open for the first time.
    Connected,
    /// The event stream was lost.
    Disconnected {
        /// What ended the stream: `closed by server (code reason)`, `heartbeat timeout`, ...
        reason: String,
    },
    /// A reconnect attempt is scheduled.
    Reconnecting {
        /// 1 for the first attempt after a loss.
        attempt: u32,
        /// Milliseconds until the attempt (capped by what remains of the grace window).
        delay_ms: u64,
        /// What remains of the grace window.
        grace_left_ms: u64,
        /// What the attempt follows: the loss (`heartbeat timeout`, `closed by server ...`),
        /// or the previous attempt's failure (`connect failed: ...`).
        cause: String,
    },
    /// The stream is open again and missed messages were fetched.
    Reconnected {
        /// Milliseconds from the loss to the reopened stream.
        downtime_ms: u64,
        /// Messages emitted from the backfill.
        backfilled: u32,
    },
    /// No frame for another heartbeat interval.
    HeartbeatMissed {
        /// Consecutive misses.
        missed: u32,
        /// Milliseconds since the last frame.
        silent_ms: u64,
    },
    /// A member changed state.
    MemberChanged {
        /// The member's id in the conversation.
        member_id: String,
        /// "customer", "agent", "workflow", "acd" or "unknown".
        role: String,
        /// "alerting", "connected", "disconnected" or "unknown".
        state: String,
    },
    /// An agent is connected (the no-activity rule starts).
    AgentConnected {
        /// The agent's member id.
        member_id: String,
    },
    /// No agent is connected any more.
    AgentDisconnected {
        /// The agent's member id.
        member_id: String,
    },
    /// A chat message (live or backfilled).
    Message {
        /// The platform's message id; each is emitted once per process.
        message_id: String,
        /// Sender member id.
        sender_id: String,
        /// Sender role.
        sender_role: String,
        /// "standard", "notice", "member-join", "member-leave".
        body_type: String,
        /// Text, unless bodies are turned off.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        body: Option<String>,
        /// Platform timestamp.
        timestamp: String,
        /// Whether it came from the backfill after a reconnect.
        backfilled: bool,
    },
    /// Someone is typing.
    Typing {
        /// Sender member id.
        sender_id: String,
        /// Sender role.
        sender_role: String,
    },
    /// The no-activity deadline is near.
    InactivityWarning {
        /// Time left before guestd ends the chat.
        remaining_ms: u64,
    },
    /// The chat ended. Exactly one per session.
    Ended {
        /// Why, inferred in the order docs/events.md gives.
        reason: EndReason,
        /// Milliseconds since the session started.
        duration_ms: u64,
        /// How guestd knows.
        detail: String,
        /// Web Messaging: what ended and whether the session is read-only.
        #[serde(flatten)]
        extra: EndExtra,
    },
    /// Web Messaging: the session expires soon unless someone writes (`expirationDate` from
    /// the platform, refreshed by every message).
    ExpiryWarning {
        /// Milliseconds left.
        remaining_ms: u64,
        /// The expiry, RFC 3339.
        expires_at: String,
    },
    /// A frame could not be decoded; it was skipped.
    StreamError {
        /// What was wrong.
        detail: String,
    },
    /// A command succeeded.
    CommandResult {
        /// The command.
        command: String,
        /// Its result.
        result: serde_json::Value,
    },
    /// A command failed.
    CommandError {
        /// The command, or "unknown".
        command: String,
        /// What was wrong.
        error: String,
    },
    /// The Platform API's account of an end (only with `[platform]` configured), after the
    /// session's `ended`.
    EndConfirmed {
        /// The reason the `ended` event gave.
        reason: EndReason,
        /// The reason the platform's disconnect types map to; null where they name none.
        platform_reason: Option<EndReason>,
        /// Whether the two agree; null where the platform's answer names no cause.
        agrees: Option<bool>,
        /// The conversation's `endTime` (RFC 3339); null if the platform does not show it over.
        platform_end_time: Option<String>,
        /// Each participant's purpose and `disconnectType`, as the platform gives them.
        participants: Vec<Participant>,
        /// How the verdict was reached, or why there is none.
        detail: String,
    },
}

/// One participant in an `end_confirmed` event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Participant {
    /// `customer`, `workflow`, `acd`, `agent`, ...
    pub purpose: String,
    /// `client`, `peer`, `system`, `timeout`, `transport.failure`, ... or null.
    pub disconnect_type: Option<String>,
}

impl EventKind {
    /// The wire name of the type.
    pub fn type_name(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
            .unwrap_or_default()
    }
}

/// One event before it gets its sequence number.
#[derive(Debug)]
pub struct Event {
    /// guestd's session id ("-" for process-level replies).
    pub session: String,
    /// Conversation id, where known.
    pub conversation_id: Option<String>,
    /// The caller's id for a command reply.
    pub request_id: Option<String>,
    /// Stable id for de-duplication across restarts (set on `ended`).
    pub event_id: Option<String>,
    /// RFC 3339 UTC with ms, taken when the event happened.
    pub ts: String,
    /// Payload.
    pub kind: EventKind,
    /// Told once the line is written and flushed.
    pub ack: Option<oneshot::Sender<()>>,
    /// Run once the line is written and flushed (see [`AfterWrite`]).
    pub after_write: Option<AfterWrite>,
}

/// Work that must follow an event's delivery, never its queueing: the journal's mark of the
/// last message a session emitted. Marked when queued, a SIGKILL between the queue and the
/// write lost the events caught in between (the restart's backfill started after them). The
/// writer runs these in queue order, after the flush that delivered their lines and before
/// anything is acknowledged; a line never written runs nothing.
pub struct AfterWrite(Box<dyn FnOnce() + Send>);

impl AfterWrite {
    /// `f` runs once the event's line is written and flushed.
    pub fn new(f: impl FnOnce() + Send + 'static) -> Self {
        AfterWrite(Box::new(f))
    }
}

impl std::fmt::Debug for AfterWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AfterWrite")
    }
}

impl Event {
    /// A new event stamped now.
    pub fn new(session: &str, conversation_id: Option<&str>, kind: EventKind) -> Self {
        Event {
            session: session.to_string(),
            conversation_id: conversation_id.map(str::to_string),
            request_id: None,
            event_id: None,
            ts: now_rfc3339(),
            kind,
            ack: None,
            after_write: None,
        }
    }

    /// With work to run once its line is written and flushed.
    pub fn after_write(mut self, f: AfterWrite) -> Self {
        self.after_write = Some(f);
        self
    }

    /// With a request id.
    pub fn with_request(mut self, request_id: Option<String>) -> Self {
        self.request_id = request_id;
        self
    }
}

/// RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[derive(Serialize)]
struct Line<'a> {
    v: u32,
    seq: u64,
    ts: &'a str,
    session: &'a str,
    conversation_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a str>,
    #[serde(flatten)]
    kind: &'a EventKind,
}

/// Serialize one event as its JSON line (with the trailing newline).
pub fn to_line(ev: &Event, seq: u64) -> Vec<u8> {
    let line = Line {
        v: SCHEMA_VERSION,
        seq,
        ts: &ev.ts,
        session: &ev.session,
        conversation_id: ev.conversation_id.as_deref(),
        request_id: ev.request_id.as_deref(),
        event_id: ev.event_id.as_deref(),
        kind: &ev.kind,
    };
    let mut out = serde_json::to_vec(&line).unwrap_or_else(|e| {
        format!(r#"{{"v":1,"seq":{seq},"type":"internal_error","error":"{e}"}}"#).into_bytes()
    });
    out.push(b'\n');
    out
}

/// Where event lines go. stdout today; a NATS JetStream publisher later.
pub trait EventSink: Send + 'static {
    /// Write one complete line.
    fn write_line<'a>(&'a mut self, line: &'a [u8]) -> BoxFuture<'a, std::io::Result<()>>;
    /// Make everything written so far visible to the reader.
    fn flush(&mut self) -> BoxFuture<'_, std::io::Result<()>>;
}

/// Any async writer (stdout, a pipe, a file) is a sink.
pub struct WriterSink<W>(pub W);

impl<W: AsyncWrite + Unpin + Send + 'static> EventSink for WriterSink<W> {
    fn write_line<'a>(&'a mut self, line: &'a [u8]) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(self.0.write_all(line))
    }
    fn flush(&mut self) -> BoxFuture<'_, std::io::Result<()>> {
        Box::pin(self.0.flush())
    }
}

/// A blocking writer (stdout) as a sink, with exact accounting. Lines gather in memory; a
/// flush writes them on a blocking thread and counts every byte the OS took, so after a failure
/// (EPIPE, ENOSPC) nothing is lost or repeated: the next flush resumes at the first byte not
/// written. Not `WriterSink(tokio::io::stdout())`: tokio's stdout writes from a background
/// thread and reports a failed write on a later call, having dropped the data, so a retry
/// would "succeed" with the line gone.
pub struct StdSink<W: std::io::Write + Send + 'static> {
    /// None only while a flush runs on the blocking thread.
    writer: Option<W>,
    pending: Vec<u8>,
    /// Bytes of `pending` already written.
    written: usize,
}

impl<W: std::io::Write + Send + 'static> StdSink<W> {
    /// Wrap a blocking writer.
    pub fn new(writer: W) -> Self {
        StdSink {
            writer: Some(writer),
            pending: Vec::new(),
            written: 0,
        }
    }
}

/// Write `buf[*written..]` and flush, counting progress in `written`.
fn write_counted(
    w: &mut impl std::io::Write,
    buf: &[u8],
    written: &mut usize,
) -> std::io::Result<()> {
    while *written < buf.len() {
        match w.write(&buf[*written..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => *written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    w.flush()
}

impl<W: std::io::Write + Send + 'static> EventSink for StdSink<W> {
    fn write_line<'a>(&'a mut self, line: &'a [u8]) -> BoxFuture<'a, std::io::Result<()>> {
        self.pending.extend_from_slice(line);
        Box::pin(async { Ok(()) })
    }

    fn flush(&mut self) -> BoxFuture<'_, std::io::Result<()>> {
        Box::pin(async move {
            let Some(mut w) = self.writer.take() else {
                return Err(std::io::Error::other("the sink's writer was lost"));
            };
            let buf = std::mem::take(&mut self.pending);
            let mut written = self.written;
            let joined = tokio::task::spawn_blocking(move || {
                let r = write_counted(&mut w, &buf, &mut written);
                (w, buf, written, r)
            })
            .await;
            let (w, mut buf, written, r) = joined.map_err(std::io::Error::other)?;
            self.writer = Some(w);
            if r.is_ok() {
                buf.clear();
                self.written = 0;
            } else {
                self.written = written;
            }
            self.pending = buf;
            r
        })
    }
}

enum Msg {
    Event(Box<Event>),
    Flush(oneshot::Sender<()>),
}

/// A sink that hands every line, parsed, to subscribers and then to an optional inner sink.
/// `guestd demo` uses it to follow its chats; tests use it to await events instead of sleeping.
pub struct TapSink<S> {
    inner: Option<S>,
    tx: tokio::sync::broadcast::Sender<serde_json::Value>,
}

impl<S> TapSink<S> {
    /// Tap in front of `inner` (None: lines go only to subscribers).
    pub fn new(inner: Option<S>, capacity: usize) -> Self {
        let (tx, _) = tokio::sync::broadcast::channel(capacity.max(16));
        TapSink { inner, tx }
    }

    /// Subscribe to the lines written from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<serde_json::Value> {
        self.tx.subscribe()
    }

    /// The sender, to subscribe later.
    pub fn sender(&self) -> tokio::sync::broadcast::Sender<serde_json::Value> {
        self.tx.clone()
    }
}

impl<S: EventSink> EventSink for TapSink<S> {
    fn write_line<'a>(&'a mut self, line: &'a [u8]) -> BoxFuture<'a, std::io::Result<()>> {
        if let Ok(v) = serde_json::from_slice(line) {
            let _ = self.tx.send(v);
        }
        match &mut self.inner {
            Some(s) => s.write_line(line),
            None => Box::pin(async { Ok(()) }),
        }
    }
    fn flush(&mut self) -> BoxFuture<'_, std::io::Result<()>> {
        match &mut self.inner {
            Some(s) => s.flush(),
            None => Box::pin(async { Ok(()) }),
        }
    }
}

/// Whether the sink takes lines: false from a failed write until a retry succeeds. Shared by
/// the writer, `/readyz` and the `guestd_event_sink_up` gauge.
#[derive(Clone, Debug)]
pub struct SinkHealth(Arc<tokio::sync::watch::Sender<bool>>);

impl SinkHealth {
    fn new() -> Self {
        metrics::gauge!("guestd_event_sink_up").set(1.0);
        SinkHealth(Arc::new(tokio::sync::watch::Sender::new(true)))
    }

    /// Whether the last write succeeded.
    pub fn ok(&self) -> bool {
        *self.0.borrow()
    }

    /// Follow changes (awaitable, for tests and probes).
    pub fn watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.0.subscribe()
    }

    fn set(&self, ok: bool) {
        self.0.send_replace(ok);
        metrics::gauge!("guestd_event_sink_up").set(if ok { 1.0 } else { 0.0 });
    }
}

/// How long the writer waits between retries of a line its sink refused, at most.
const SINK_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// The producers' end: cheap to clone.
#[derive(Clone)]
pub struct Emitter {
    tx: mpsc::Sender<Msg>,
    health: SinkHealth,
}

impl Emitter {
    /// Queue an event; waits while the queue is full (back-pressure, never a drop).
    pub async fn emit(&self, ev: Event) {
        let depth = self.tx.max_capacity() - self.tx.capacity();
        metrics::gauge!("guestd_event_queue_depth").set(depth as f64);
        if self.tx.capacity() == 0 {
            metrics::counter!("guestd_event_queue_full_total").increment(1);
        }
        if self.tx.send(Msg::Event(Box::new(ev))).await.is_err() {
            tracing::error!("event writer is gone; event lost");
        }
    }

    /// Wait until everything queued before this call is written and flushed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Whether the sink takes lines (false while its writes fail: a reader that went away, a
    /// full disk under a file).
    pub fn sink_ok(&self) -> bool {
        self.health.ok()
    }

    /// The sink's health, to await its changes.
    pub fn sink_health(&self) -> tokio::sync::watch::Receiver<bool> {
        self.health.watch()
    }

    /// Queue an event and wait until its line is written and flushed; false if the writer
    /// stopped first (the line was then not delivered).
    pub async fn emit_flushed(&self, mut ev: Event) -> bool {
        let (tx, rx) = oneshot::channel();
        ev.ack = Some(tx);
        self.emit(ev).await;
        rx.await.is_ok()
    }
}

/// Write `line` (or flush, for None) until it succeeds. While it fails (the reader went away: EPIPE; a full disk under a
/// file), nothing more is taken from the queue, so producers wait (back-pressure, as for a slow
/// reader) and no line is acknowledged as written: an `ended` stays pending in the journal and
/// the next process delivers it. The failure shows at once in the sink's health (`/readyz`,
/// `guestd_event_sink_up`) and in one log line; retries back off to [`SINK_RETRY_MAX`]. A line
/// that failed halfway is written whole again, so a reader that comes back may see its
/// beginning twice, the second time complete.
async fn retry<S: EventSink>(sink: &mut S, health: &SinkHealth, line: Option<&[u8]>) {
    let mut wait = std::time::Duration::from_millis(50);
    let what = if line.is_some() {
        "writing an event"
    } else {
        "flushing events"
    };
    loop {
        let done = match line {
            Some(l) => sink.write_line(l).await,
            None => sink.flush().await,
        };
        match done {
            Ok(()) => {
                if !health.ok() {
                    tracing::warn!("event output works again");
                    health.set(true);
                }
                return;
            }
            Err(e) => {
                if health.ok() {
                    tracing::error!(error = %e, "{what} failed; events wait until output works again");
                    health.set(false);
                }
                metrics::counter!("guestd_event_write_failures_total").increment(1);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(SINK_RETRY_MAX);
            }
        }
    }
}

/// Looks at each event as its line is written, before the flush that makes it visible (the
/// memory of reported ends, `crate::ends`, so a reader that saw a line and asks about it gets
/// an answer that includes it). It sees events; it cannot change them.
pub type Observer = Arc<dyn Fn(&Event) + Send + Sync>;

/// Start the writer task; returns the emitter and the task (which ends when every emitter is
/// dropped and the queue is drained).
pub fn spawn_writer<S: EventSink>(
    sink: S,
    capacity: usize,
) -> (Emitter, tokio::task::JoinHandle<()>) {
    spawn_writer_observed(sink, capacity, None)
}

/// [`spawn_writer`], with an [`Observer`] of every event written.
pub fn spawn_writer_observed<S: EventSink>(
    mut sink: S,
    capacity: usize,
    observer: Option<Observer>,
) -> (Emitter, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Msg>(capacity.max(1));
    let health = SinkHealth::new();
    let writer_health = health.clone();
    let task = tokio::spawn(async move {
        let health = writer_health;
        let mut seq: u64 = 0;
        let mut acks = Vec::new();
        let mut after = Vec::new();
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            // Write what is queued, then flush once: every line is whole when it becomes visible.
            while let Some(msg) = next {
                match msg {
                    Msg::Event(mut ev) => {
                        seq += 1;
                        let line = to_line(&ev, seq);
                        retry(&mut sink, &health, Some(&line)).await;
                        if let Some(a) = ev.ack.take() {
                            acks.push(a);
                        }
                        if let Some(f) = ev.after_write.take() {
                            after.push(f);
                        }
                        if let Some(o) = &observer {
                            o(&ev);
                        }
                    }
                    Msg::Flush(a) => acks.push(a),
                }
                next = if acks.len() + after.len() < 256 {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            retry(&mut sink, &health, None).await;
            // Run and acknowledged only now: written and flushed.
            for AfterWrite(f) in after.drain(..) {
                f();
            }
            for a in acks.drain(..) {
                let _ = a.send(());
            }
        }
        let _ = sink.flush().await;
    });
    (Emitter { tx, health }, task)
}

/// Open `path` for events: appended, created with mode 0600 (events carry message bodies), never
/// through a symlink planted at that name.
pub fn open_events_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    }
    opts.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A blocking writer that takes `cut` bytes, then fails (EPIPE) until `heal` is set.
    #[derive(Clone)]
    struct Flaky {
        out: Arc<Mutex<Vec<u8>>>,
        cut: Arc<Mutex<usize>>,
        heal: Arc<AtomicBool>,
    }

    impl std::io::Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut cut = self.cut.lock().unwrap();
            if !self.heal.load(Ordering::SeqCst) && *cut == 0 {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            let n = if self.heal.load(Ordering::SeqCst) {
                buf.len()
            } else {
                buf.len().min(*cut)
            };
            *cut -= n.min(*cut);
            self.out.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The reader goes away mid-line: nothing is acknowledged, the sink reports unhealthy, and
    /// once writes work again every line comes out once, whole, in order; only then the ack.
    #[tokio::test]
    async fn a_failing_output_acknowledges_nothing_and_loses_nothing() {
        let w = Flaky {
            out: Arc::default(),
            cut: Arc::new(Mutex::new(30)),
            heal: Arc::default(),
        };
        let (em, task) = spawn_writer(StdSink::new(w.clone()), 4);
        em.emit(Event::new("s1", Some("c1"), EventKind::Connected))
            .await;
        let mut ended = Event::new(
            "s1",
            Some("c1"),
            EventKind::Ended {
                reason: EndReason::FlowEnded,
                duration_ms: 5,
                detail: "x".into(),
                extra: Default::default(),
            },
        );
        ended.event_id = Some("s1:ended".into());
        let em2 = em.clone();
        let acked = tokio::spawn(async move { em2.emit_flushed(ended).await });
        // The failure shows in the sink's health.
        let mut health = em.sink_health();
        tokio::time::timeout(std::time::Duration::from_secs(5), health.wait_for(|ok| !ok))
            .await
            .expect("the sink reports the failure")
            .unwrap();
        assert!(!acked.is_finished(), "not acknowledged while undelivered");
        w.heal.store(true, Ordering::SeqCst);
        assert!(acked.await.unwrap(), "acknowledged once written");
        assert!(em.sink_ok());
        drop(em);
        task.await.ok();
        let out = String::from_utf8(w.out.lock().unwrap().clone()).unwrap();
        let types: Vec<String> = out
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["type"].to_string())
            .collect();
        assert_eq!(types, ["\"connected\"", "\"ended\""], "{out}");
    }

    #[tokio::test]
    async fn lines_carry_envelope_fields_in_sequence() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let (em, task) = spawn_writer(WriterSink(client), 4);
        em.emit(Event::new("s1", Some("c1"), EventKind::Connected))
            .await;
        let mut ended = Event::new(
            "s1",
            Some("c1"),
            EventKind::Ended {
                reason: EndReason::AgentEnded,
                duration_ms: 5,
                detail: "x".into(),
                extra: Default::default(),
            },
        );
        ended.event_id = Some("s1:ended".into());
        assert!(em.emit_flushed(ended).await);
        drop(em);
        task.await.ok();
        let mut out = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut server, &mut out)
            .await
            .ok();
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["type"], "connected");
        assert_eq!(lines[0]["seq"], 1);
        assert_eq!(lines[0]["v"], 1);
        assert_eq!(lines[1]["seq"], 2);
        assert_eq!(lines[1]["reason"], "agent_ended");
        assert_eq!(lines[1]["event_id"], "s1:ended");
        assert_eq!(lines[1]["conversation_id"], "c1");
        assert!(lines[1]["ts"].as_str().unwrap().ends_with('Z'));
    }
}
