//! guestd's own event schema (versioned, documented in `docs/events.md` and
//! `docs/events.schema.json`) and the writer that puts it on stdout as JSON lines.
//!
//! Back-pressure policy: producers `await` a bounded queue. A slow or stalled stdout reader
//! therefore slows sessions down (their sockets stop being read, TCP pushes back on the server),
//! but no event is ever dropped, `ended` included. `guestd_event_queue_depth` and
//! `guestd_event_queue_full_total` show when that happens.

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
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
}

impl EndReason {
    /// Every reason, in documentation order.
    pub const ALL: [EndReason; 7] = [
        EndReason::GuestLeft,
        EndReason::AgentEnded,
        EndReason::FlowEnded,
        EndReason::InactivityTimeout,
        EndReason::ReconnectGraceExpired,
        EndReason::TokenExpired,
        EndReason::ServerEnded,
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
        }
    }
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
        /// Why.
        reason: String,
    },
    /// A reconnect attempt is scheduled.
    Reconnecting {
        /// 1 for the first attempt after a loss.
        attempt: u32,
        /// Delay before it.
        delay_ms: u64,
        /// What remains of the grace window.
        grace_left_ms: u64,
    },
    /// The stream is open again and missed messages were fetched.
    Reconnected {
        /// Time since the loss.
        downtime_ms: u64,
        /// Messages emitted from the backfill.
        backfilled: u32,
    },
    /// No frame for another heartbeat interval.
    HeartbeatMissed {
        /// Consecutive misses.
        missed: u32,
        /// Time since the last frame.
        silent_ms: u64,
    },
    /// A member changed state.
    MemberChanged {
        /// Member id.
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
        /// Message id.
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
        /// Why.
        reason: EndReason,
        /// Since the session started.
        duration_ms: u64,
        /// How guestd knows.
        detail: String,
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
        }
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

/// The producers' end: cheap to clone.
#[derive(Clone)]
pub struct Emitter {
    tx: mpsc::Sender<Msg>,
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

    /// Queue an event and wait until its line is flushed.
    pub async fn emit_flushed(&self, mut ev: Event) -> bool {
        let (tx, rx) = oneshot::channel();
        ev.ack = Some(tx);
        self.emit(ev).await;
        rx.await.is_ok()
    }
}

/// Start the writer task; returns the emitter and the task (which ends when every emitter is
/// dropped and the queue is drained).
pub fn spawn_writer<S: EventSink>(
    mut sink: S,
    capacity: usize,
) -> (Emitter, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Msg>(capacity.max(1));
    let task = tokio::spawn(async move {
        let mut seq: u64 = 0;
        let mut acks = Vec::new();
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            // Write what is queued, then flush once: every line is whole when it becomes visible.
            while let Some(msg) = next {
                match msg {
                    Msg::Event(mut ev) => {
                        seq += 1;
                        let line = to_line(&ev, seq);
                        if let Err(e) = sink.write_line(&line).await {
                            tracing::error!(error = %e, "writing an event failed");
                        }
                        if let Some(a) = ev.ack.take() {
                            acks.push(a);
                        }
                    }
                    Msg::Flush(a) => acks.push(a),
                }
                next = if acks.len() < 256 {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            if let Err(e) = sink.flush().await {
                tracing::error!(error = %e, "flushing events failed");
            }
            for a in acks.drain(..) {
                let _ = a.send(());
            }
        }
        let _ = sink.flush().await;
    });
    (Emitter { tx }, task)
}

#[cfg(test)]
mod tests {
    use super::*;

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
