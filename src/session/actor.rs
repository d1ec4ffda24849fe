//! The session actor: one task per chat owning its websocket, timers, REST calls in flight and
//! its [`Machine`]. Callers talk to it through a cheap [`SessionHandle`].
//!
//! The loop waits on whichever comes first: a command, the stream, a connect attempt, a REST
//! result, the machine's next deadline, or shutdown; feeds it to the machine; and performs the
//! actions in order. Nothing here decides anything the machine could decide.

use super::machine::{Action, Failure, Input, Machine, Timing};
use crate::backend::{ChatApi, ChatRef};
use crate::events::{Emitter, EndReason, Event, EventKind};
use crate::journal::{EndingRecord, Journal};
use crate::stream::{Connector, Ws};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// What every session shares.
#[derive(Clone)]
pub struct SessionCtx {
    /// The backend.
    pub api: Arc<dyn ChatApi>,
    /// Opens streams.
    pub connector: Connector,
    /// Where events go.
    pub emitter: Emitter,
    /// Where sessions are recorded.
    pub journal: Arc<dyn Journal>,
    /// Rules and durations.
    pub timing: Timing,
    /// Told the session id when a session task finishes.
    pub done: mpsc::UnboundedSender<String>,
    /// Process shutdown.
    pub cancel: CancellationToken,
    /// On shutdown, leave the chats instead of only closing the sockets.
    pub leave_on_shutdown: bool,
}

/// A command to one session.
#[derive(Debug)]
pub enum SessionCmd {
    /// Send a message as the guest.
    Send {
        /// Text.
        body: String,
        /// The sent message, or why not.
        reply: oneshot::Sender<Result<serde_json::Value, String>>,
    },
    /// Send a typing indicator.
    Typing {
        /// Done, or why not.
        reply: oneshot::Sender<Result<serde_json::Value, String>>,
    },
    /// Leave the chat (the `ended` event follows).
    Leave {
        /// Accepted, or why not.
        reply: oneshot::Sender<Result<serde_json::Value, String>>,
    },
    /// Describe the session.
    Get {
        /// The view.
        reply: oneshot::Sender<SessionView>,
    },
}

/// A snapshot of one session.
#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    /// guestd's id.
    pub session: String,
    /// Conversation id.
    pub conversation_id: String,
    /// Guest member id.
    pub member_id: String,
    /// connecting, connected, reconnecting, ended.
    pub state: &'static str,
    /// Whether an agent is connected.
    pub agent_connected: bool,
    /// Newest message seen.
    pub last_message_id: Option<String>,
    /// Why it ended, once it has.
    pub ended: Option<EndReason>,
}

/// The way to talk to a session task.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    /// guestd's session id.
    pub id: Arc<str>,
    /// Conversation id.
    pub conversation_id: Arc<str>,
    tx: mpsc::Sender<SessionCmd>,
}

/// The session task is gone (it ended).
#[derive(Debug, thiserror::Error)]
#[error("session {0} has ended")]
pub struct Gone(pub String);

impl SessionHandle {
    /// Send a command; fails if the session has ended.
    pub async fn send(&self, cmd: SessionCmd) -> Result<(), Gone> {
        self.tx
            .send(cmd)
            .await
            .map_err(|_| Gone(self.id.to_string()))
    }

    /// Whether the session task has finished.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Ask for the session's view.
    pub async fn view(&self) -> Result<SessionView, Gone> {
        let (reply, rx) = oneshot::channel();
        self.send(SessionCmd::Get { reply }).await?;
        rx.await.map_err(|_| Gone(self.id.to_string()))
    }
}

/// Spawn a session task for `chat`, driven by `machine`.
pub fn spawn(ctx: SessionCtx, id: String, chat: ChatRef, machine: Machine) -> SessionHandle {
    let (tx, rx) = mpsc::channel(16);
    let handle = SessionHandle {
        id: id.clone().into(),
        conversation_id: chat.conversation_id.clone().into(),
        tx,
    };
    let span = tracing::info_span!("session", session = %id, conversation = %chat.conversation_id);
    tokio::spawn(
        async move {
            let done = ctx.done.clone();
            Actor::new(ctx, id.clone(), chat, machine).run(rx).await;
            let _ = done.send(id);
        }
        .instrument(span),
    );
    handle
}

type Rest = FuturesUnordered<BoxFuture<'static, Option<Input>>>;

struct Actor {
    ctx: SessionCtx,
    id: String,
    chat: ChatRef,
    m: Machine,
    ws: Option<Ws>,
    connecting: Option<BoxFuture<'static, Result<Ws, Failure>>>,
    rest: Rest,
    queued: VecDeque<Input>,
    stopping: bool,
    journaled_msg: Option<String>,
}

async fn opt<F: std::future::Future + Unpin>(f: Option<&mut F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => futures::future::pending().await,
    }
}

async fn next_frame(
    ws: &mut Option<Ws>,
) -> Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>> {
    match ws {
        Some(w) => w.next().await,
        None => futures::future::pending().await,
    }
}

impl Actor {
    fn new(ctx: SessionCtx, id: String, chat: ChatRef, m: Machine) -> Self {
        let journaled_msg = m.last_message_id().map(str::to_string);
        Actor {
            ctx,
            id,
            chat,
            m,
            ws: None,
            connecting: None,
            rest: FuturesUnordered::new(),
            queued: VecDeque::new(),
            stopping: false,
            journaled_msg,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<SessionCmd>) {
        metrics::gauge!("guestd_sessions", "state" => self.m.phase().as_str()).increment(1.0);
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let sleep = tokio::time::sleep_until(self.m.next_deadline().unwrap_or(far));
        tokio::pin!(sleep);
        let cancel = self.ctx.cancel.clone();
        let mut shutting_down = false;
        while !self.stopping {
            let input = if let Some(i) = self.queued.pop_front() {
                Some(i)
            } else {
                sleep.as_mut().reset(self.m.next_deadline().unwrap_or(far));
                tokio::select! {
                    _ = cancel.cancelled(), if !shutting_down => {
                        shutting_down = true;
                        if self.ctx.leave_on_shutdown {
                            Some(Input::LeaveRequested)
                        } else {
                            self.close_socket().await;
                            break;
                        }
                    }
                    cmd = rx.recv() => match cmd {
                        Some(cmd) => self.command(cmd),
                        None => None,
                    },
                    r = opt(self.connecting.as_mut()) => {
                        self.connecting = None;
                        Some(match r {
                            Ok(ws) => {
                                metrics::counter!("guestd_connects_total").increment(1);
                                self.ws = Some(ws);
                                Input::Opened
                            }
                            Err(f) => {
                                metrics::counter!("guestd_connect_failures_total").increment(1);
                                tracing::debug!(error = ?f, "connect failed");
                                Input::ConnectFailed(f)
                            }
                        })
                    }
                    frame = next_frame(&mut self.ws) => self.frame(frame),
                    Some(i) = self.rest.next(), if !self.rest.is_empty() => i,
                    _ = &mut sleep => Some(Input::Tick),
                }
            };
            if let Some(input) = input {
                let before = self.m.phase();
                let actions = self.m.step(input, Instant::now());
                for a in actions {
                    self.perform(a).await;
                }
                let after = self.m.phase();
                if before != after {
                    metrics::gauge!("guestd_sessions", "state" => before.as_str()).decrement(1.0);
                    metrics::gauge!("guestd_sessions", "state" => after.as_str()).increment(1.0);
                }
                if let Some(id) = self.m.last_message_id() {
                    if self.journaled_msg.as_deref() != Some(id) {
                        self.ctx.journal.progress(&self.id, id);
                        self.journaled_msg = Some(id.to_string());
                    }
                }
            }
        }
        metrics::gauge!("guestd_sessions", "state" => self.m.phase().as_str()).decrement(1.0);
        // Finish what the end asked for (a leave, say), bounded.
        let drain = async { while self.rest.next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .is_err()
        {
            tracing::warn!("gave up waiting for REST calls after the end");
        }
    }

    fn command(&mut self, cmd: SessionCmd) -> Option<Input> {
        let ended = self.m.ended();
        match cmd {
            SessionCmd::Get { reply } => {
                let _ = reply.send(SessionView {
                    session: self.id.clone(),
                    conversation_id: self.chat.conversation_id.clone(),
                    member_id: self.chat.member_id.clone(),
                    state: self.m.phase().as_str(),
                    agent_connected: self.m.agent_connected(),
                    last_message_id: self.m.last_message_id().map(str::to_string),
                    ended,
                });
                None
            }
            SessionCmd::Send { reply, .. }
            | SessionCmd::Typing { reply }
            | SessionCmd::Leave { reply }
                if ended.is_some() =>
            {
                let _ = reply.send(Err(format!("session {} has ended", self.id)));
                None
            }
            SessionCmd::Send { body, reply } => {
                let fut = self.ctx.api.send_message(&self.chat, body);
                self.rest.push(
                    async move {
                        match fut.await {
                            Ok(m) => {
                                let _ = reply.send(Ok(serde_json::json!({ "message_id": m.id, "timestamp": m.timestamp })));
                                Some(Input::GuestSent)
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e.to_string()));
                                None
                            }
                        }
                    }
                    .boxed(),
                );
                None
            }
            SessionCmd::Typing { reply } => {
                let fut = self.ctx.api.send_typing(&self.chat);
                self.rest.push(
                    async move {
                        let _ = reply.send(
                            fut.await
                                .map(|_| serde_json::json!({}))
                                .map_err(|e| e.to_string()),
                        );
                        None
                    }
                    .boxed(),
                );
                None
            }
            SessionCmd::Leave { reply } => {
                let _ = reply.send(Ok(serde_json::json!({ "leaving": true })));
                Some(Input::LeaveRequested)
            }
        }
    }

    fn frame(
        &mut self,
        frame: Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>,
    ) -> Option<Input> {
        match frame {
            Some(Ok(WsMessage::Text(t))) => Some(match self.ctx.api.decode(&t) {
                Ok(ev) => Input::Frame(ev),
                Err(e) => {
                    metrics::counter!("guestd_bad_frames_total").increment(1);
                    tracing::warn!(error = %e, "skipping a frame that does not decode");
                    Input::BadFrame(e)
                }
            }),
            Some(Ok(WsMessage::Close(c))) => {
                self.ws = None;
                let why = c
                    .map(|c| format!("closed by server ({} {})", u16::from(c.code), c.reason))
                    .unwrap_or_else(|| "closed by server".into());
                Some(Input::Lost(why))
            }
            // Protocol pings/pongs and binary frames are still proof of life.
            Some(Ok(_)) => Some(Input::Frame(crate::backend::ChatEvent::Other(
                "control frame".into(),
            ))),
            Some(Err(e)) => {
                self.ws = None;
                Some(Input::Lost(format!("stream error: {e}")))
            }
            None => {
                self.ws = None;
                Some(Input::Lost("stream ended without a close frame".into()))
            }
        }
    }

    async fn close_socket(&mut self) {
        if let Some(mut ws) = self.ws.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
        }
    }

    async fn perform(&mut self, a: Action) {
        match a {
            Action::Emit(kind) => self.emit(kind).await,
            Action::Connect => {
                let connector = self.ctx.connector.clone();
                let chat = self.chat.clone();
                self.connecting = Some(async move { connector.connect(&chat).await }.boxed());
            }
            Action::AbortConnect => self.connecting = None,
            Action::CloseSocket => {
                if let Some(mut ws) = self.ws.take() {
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    });
                }
            }
            Action::Ping => {
                let ping = self.ctx.api.ping_frame();
                if let Some(ws) = self.ws.as_mut() {
                    if let Err(e) = ws.send(WsMessage::Text(ping.into())).await {
                        self.ws = None;
                        self.queued
                            .push_back(Input::Lost(format!("ping failed: {e}")));
                    }
                }
            }
            Action::FetchMembers => {
                let fut = self.ctx.api.list_members(&self.chat);
                self.rest.push(
                    fut.map(|r| Some(Input::Members(r.map_err(|e| Failure::from(&e)))))
                        .boxed(),
                );
            }
            Action::Backfill { after } => {
                let fut = self.ctx.api.messages_after(&self.chat, after);
                self.rest.push(
                    fut.map(|r| Some(Input::Backfill(r.map_err(|e| Failure::from(&e)))))
                        .boxed(),
                );
            }
            Action::Leave => {
                let fut = self.ctx.api.leave(&self.chat);
                self.rest.push(
                    fut.map(|r| Some(Input::LeaveDone(r.map_err(|e| Failure::from(&e)))))
                        .boxed(),
                );
            }
            Action::Stop => self.stopping = true,
        }
    }

    async fn emit(&mut self, kind: EventKind) {
        match &kind {
            EventKind::Reconnecting { .. } => {
                metrics::counter!("guestd_reconnect_attempts_total").increment(1)
            }
            EventKind::Reconnected { .. } => {
                metrics::counter!("guestd_reconnects_total").increment(1)
            }
            EventKind::HeartbeatMissed { .. } => {
                metrics::counter!("guestd_heartbeat_misses_total").increment(1)
            }
            EventKind::StreamError { .. } => {
                metrics::counter!("guestd_stream_errors_total").increment(1)
            }
            _ => {}
        }
        let mut ev = Event::new(&self.id, Some(&self.chat.conversation_id), kind);
        if let EventKind::Ended {
            reason,
            duration_ms,
            detail,
        } = &ev.kind
        {
            metrics::counter!("guestd_ended_total", "reason" => reason.as_str()).increment(1);
            tracing::info!(reason = reason.as_str(), duration_ms, detail = %detail, "chat ended");
            let event_id = format!("{}:ended", self.id);
            ev.event_id = Some(event_id.clone());
            let rec = EndingRecord {
                reason: *reason,
                detail: detail.clone(),
                duration_ms: *duration_ms,
                event_id,
                ts: ev.ts.clone(),
            };
            self.ctx.journal.ending(&self.id, rec).await;
            if self.ctx.emitter.emit_flushed(ev).await {
                self.ctx.journal.ended(&self.id);
            }
            return;
        }
        self.ctx.emitter.emit(ev).await;
    }
}
