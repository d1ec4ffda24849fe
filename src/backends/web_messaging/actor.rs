//! The Web Messaging session actor: one task per session token owning its one socket, its
//! commands waiting for an echo, the history call in flight, and its [`Machine`]. It answers
//! the same [`SessionHandle`] commands as a guest chat session, so the registry, the control
//! channels, the journal and the cluster see no difference.
//!
//! The token is the session's secret: it goes on the socket inside the client's frames and
//! nowhere else (not in the URL, not in a header, never in a log or an event). In the journal
//! it takes the jwt's place in the record, so it is sealed where the jwt is (cluster mode).

use super::backend::{Chat, MEMBER, NAME, reopen_args};
use super::client::Messaging;
use super::machine::{Action, Input, Machine, Out, Refusal, Reply};
use super::protocol::{self as p, Action as Wire};
use crate::events::EventKind;
use crate::session::run::{
    Calls, FAIR_EVERY, close_in_background, close_now, emit, leave_durably, next_call, next_frame,
    opt, rearm,
};
use crate::session::{
    CommandError, Done, DoneReply, Mailbox, Reopen, SessionCmd, SessionCtx, SessionHandle,
    SessionView,
};
use crate::transport::stream::{ConnectError, Ws};
use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tracing::Instrument;

/// The longest text a `send` takes, in characters: guestd's one limit for every backend
/// before they were split (the guest chat API's), kept so a send refused yesterday is refused
/// today. The platform's own limit is [`p::MAX_TEXT_BYTES`] bytes.
pub const MAX_SEND_CHARS: usize = 4000;

/// Undecodable frames reported as `stream_error` per minute, at most (the rest are counted).
const STREAM_ERRORS_PER_MINUTE: u32 = 5;

/// The view of the session `id` of `chat`, as `machine` stands (the reply to `Get`, and what
/// `start`/`attach` answer).
pub(super) fn view_of(id: &str, chat: &Chat, machine: &Machine) -> SessionView {
    SessionView {
        last_message_id: machine.last_message_id().map(str::to_string),
        ended: machine.ended(),
        read_only: machine.read_only(),
        agent_end_visible: machine.deployment().disconnect_visible,
        expires_in_ms: machine
            .expires()
            .map(|e| e.saturating_duration_since(Instant::now()).as_millis() as u64),
        ..SessionView::new(id, &chat.key, MEMBER, machine.phase().as_str(), NAME)
    }
    .with_ends(machine.ends())
}

/// Spawn the session task of `chat` (a Web Messaging chat: see `Supervisor`).
pub fn spawn(
    ctx: Arc<SessionCtx>,
    wm: Arc<Messaging>,
    id: String,
    chat: Chat,
    machine: Machine,
) -> SessionHandle {
    let (handle, rx) = SessionHandle::new(&id, &chat.key);
    let span =
        tracing::info_span!("session", session = %id, conversation = %chat.key, backend = NAME);
    let actor = Box::new(Actor {
        epoch: ctx.epoch(),
        ctx,
        wm,
        id,
        chat,
        machine,
        ws: None,
        connecting: None,
        work: None,
        replies: Vec::new(),
        start_new: None,
        next_tid: 0,
        queued: VecDeque::new(),
        stopping: false,
        relinquished: false,
        bad_frames: (0, None),
    });
    tokio::spawn(
        async move {
            let mut actor = actor;
            actor.run(&rx).await;
            rx.close();
            let _ = actor.ctx.done.send(actor.id.clone());
        }
        .instrument(span),
    );
    handle
}

enum Wake {
    Input(Input),
    Nothing,
    Shutdown,
}

struct Actor {
    ctx: Arc<SessionCtx>,
    wm: Arc<Messaging>,
    id: String,
    chat: Chat,
    machine: Machine,
    ws: Option<Ws>,
    connecting: Option<BoxFuture<'static, Result<Ws, ConnectError>>>,
    /// History calls and journal writes in flight; allocated only while there are some.
    work: Calls<Input>,
    replies: Vec<(String, DoneReply)>,
    start_new: Option<(String, oneshot::Sender<Result<Reopen, CommandError>>)>,
    next_tid: u64,
    queued: VecDeque<Input>,
    stopping: bool,
    relinquished: bool,
    epoch: u64,
    /// Undecodable frames this minute, and when the minute began.
    bad_frames: (u32, Option<Instant>),
}

fn wall_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Actor {
    fn may_act(&self) -> bool {
        self.ctx.may_act(self.epoch)
    }

    fn relinquish(&mut self, why: &str) {
        tracing::info!(
            why,
            "no longer acting for this session: another node takes it"
        );
        metrics::counter!("guestd_sessions_relinquished_total").increment(1);
        self.ws = None;
        self.connecting = None;
        self.work = None;
        self.queued.clear();
        self.stopping = true;
        self.relinquished = true;
        self.ctx.journal.forget(&self.id);
    }

    fn tid(&mut self, prefix: &str) -> String {
        self.next_tid += 1;
        format!("{prefix}{}", self.next_tid)
    }

    async fn run(&mut self, rx: &Mailbox) {
        let phase = |m: &Machine| m.phase().as_str();
        metrics::gauge!("guestd_sessions", "backend" => "web_messaging", "state" => phase(&self.machine)).increment(1.0);
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut sleep = Box::pin(tokio::time::sleep_until(far));
        let cancel = self.ctx.cancel.clone();
        let mut shutting_down = false;
        let mut frames_in_a_row = 0u32;
        for a in self.machine.start() {
            Box::pin(self.perform(a)).await;
        }
        while !self.stopping {
            let input = match self.queued.pop_front() {
                Some(i) => Wake::Input(i),
                None => {
                    rearm(sleep.as_mut(), self.machine.next_deadline().unwrap_or(far));
                    // After a long run of frames (a server flooding pings), what else is
                    // ready now goes first: call results and a due deadline are not starved.
                    let mut turn = None;
                    if frames_in_a_row >= FAIR_EVERY {
                        frames_in_a_row = 0;
                        turn = futures::FutureExt::now_or_never(async {
                            tokio::select! {
                                biased;
                                r = opt(self.connecting.as_mut()) => Wake::Input(self.connected(r)),
                                i = next_call(&mut self.work) => i.map_or(Wake::Nothing, Wake::Input),
                                _ = sleep.as_mut() => Wake::Input(Input::Tick),
                            }
                        });
                    }
                    let mut framed = false;
                    let wake = match turn {
                        Some(w) => w,
                        // Biased: shutdown, then commands (never starved by frames), then
                        // frames before the timer (see above).
                        None => tokio::select! {
                            biased;
                            _ = cancel.cancelled(), if !shutting_down => Wake::Shutdown,
                            cmd = rx.recv() => self.command(*cmd).map_or(Wake::Nothing, Wake::Input),
                            frame = next_frame(&mut self.ws) => {
                                framed = true;
                                self.frame(frame).map_or(Wake::Nothing, Wake::Input)
                            }
                            r = opt(self.connecting.as_mut()) => Wake::Input(self.connected(r)),
                            i = next_call(&mut self.work) => i.map_or(Wake::Nothing, Wake::Input),
                            _ = sleep.as_mut() => Wake::Input(Input::Tick),
                        },
                    };
                    frames_in_a_row = if framed { frames_in_a_row + 1 } else { 0 };
                    wake
                }
            };
            let input = match input {
                Wake::Input(i) => i,
                Wake::Nothing => continue,
                Wake::Shutdown => {
                    shutting_down = true;
                    if self.ctx.leave_on_shutdown {
                        Input::Leave
                    } else {
                        close_now(&mut self.ws).await;
                        break;
                    }
                }
            };
            if !self.may_act() {
                self.relinquish("fenced");
                break;
            }
            let before = self.machine.phase();
            let actions = self.machine.step(input, Instant::now(), wall_ms());
            let after = self.machine.phase();
            if before != after {
                metrics::gauge!("guestd_sessions", "backend" => "web_messaging", "state" => before.as_str()).decrement(1.0);
                metrics::gauge!("guestd_sessions", "backend" => "web_messaging", "state" => after.as_str()).increment(1.0);
            }
            for a in actions {
                if self.relinquished {
                    break;
                }
                Box::pin(self.perform(a)).await;
            }
        }
        metrics::gauge!("guestd_sessions", "backend" => "web_messaging", "state" => phase(&self.machine)).decrement(1.0);
        // Commands still waiting hear that the session is gone.
        for (_, reply) in self.replies.drain(..) {
            let _ = reply.send(Err(CommandError::Ended(self.id.clone())));
        }
    }

    fn work_push(&mut self, f: BoxFuture<'static, Option<Input>>) {
        self.work.get_or_insert_with(Default::default).push(f);
    }

    fn connected(&mut self, r: Result<Ws, ConnectError>) -> Input {
        self.connecting = None;
        match r {
            Ok(ws) => {
                metrics::counter!("guestd_connects_total").increment(1);
                self.ws = Some(ws);
                Input::Opened
            }
            Err(e) => {
                metrics::counter!("guestd_connect_failures_total").increment(1);
                tracing::debug!(error = %e, "connect failed");
                // An upgrade refused with a 4xx (an unknown or inactive deployment, an origin
                // not allowed) will not change by retrying; 429 and 5xx may.
                let fatal = matches!(e, ConnectError::Refused { status, .. } if (400..500).contains(&status) && status != 429)
                    || matches!(e, ConnectError::Policy(_));
                Input::ConnectFailed {
                    detail: e.to_string(),
                    fatal,
                }
            }
        }
    }

    fn view(&self) -> SessionView {
        view_of(&self.id, &self.chat, &self.machine)
    }

    fn command(&mut self, cmd: SessionCmd) -> Option<Input> {
        match cmd {
            SessionCmd::Relinquish => {
                self.relinquish("asked");
                None
            }
            SessionCmd::Get { reply } => {
                let _ = reply.send(self.view());
                None
            }
            SessionCmd::Send { body, reply } if body.chars().count() > MAX_SEND_CHARS => {
                let chars = body.chars().count();
                let _ = reply.send(Err(CommandError::Invalid(format!(
                    "send: the body has {chars} characters; the platform takes at most \
                     {MAX_SEND_CHARS}"
                ))));
                None
            }
            SessionCmd::Send { reply, .. }
            | SessionCmd::Typing { reply }
            | SessionCmd::Leave { reply }
                if !self.may_act() =>
            {
                let _ = reply.send(Err(CommandError::Moved(self.id.clone())));
                None
            }
            SessionCmd::StartNew { reply } if !self.may_act() => {
                let _ = reply.send(Err(CommandError::Moved(self.id.clone())));
                None
            }
            SessionCmd::Send { body, reply } => {
                let tid = self.tid("g");
                self.replies.push((tid.clone(), reply));
                Some(Input::Send { tid, text: body })
            }
            SessionCmd::Typing { reply } => {
                let tid = self.tid("y");
                self.replies.push((tid.clone(), reply));
                Some(Input::Typing(tid))
            }
            SessionCmd::Leave { reply } => {
                if self.machine.ended().is_some() {
                    let _ = reply.send(Err(CommandError::Ended(self.id.clone())));
                    return None;
                }
                let leave = leave_durably(&self.ctx, &self.id, reply, Input::Leave);
                self.work_push(leave);
                None
            }
            SessionCmd::StartNew { reply } => {
                if self.start_new.is_some() {
                    let _ = reply.send(Err(CommandError::Busy(self.id.clone())));
                    return None;
                }
                let tid = self.tid("n");
                self.start_new = Some((tid.clone(), reply));
                Some(Input::StartNew(tid))
            }
        }
    }

    fn frame(
        &mut self,
        frame: Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>,
    ) -> Option<Input> {
        match frame {
            Some(Ok(WsMessage::Text(t))) => match p::decode(&t) {
                Ok(f) => {
                    if let p::Frame::TooManyRequests { retry_after, .. } = &f {
                        metrics::counter!("guestd_rate_limited_total").increment(1);
                        tracing::info!(
                            retry_after,
                            "the platform asked to slow down (429 frame); sends wait"
                        );
                    }
                    Some(Input::Frame(f))
                }
                Err(e) => {
                    metrics::counter!("guestd_bad_frames_total").increment(1);
                    let now = Instant::now();
                    let (n, since) = &mut self.bad_frames;
                    if since.is_none_or(|s| now.duration_since(s) >= Duration::from_secs(60)) {
                        *n = 0;
                        *since = Some(now);
                    }
                    *n += 1;
                    tracing::warn!(error = %e, "skipping a frame that does not decode");
                    if *n <= STREAM_ERRORS_PER_MINUTE {
                        let kind = EventKind::StreamError {
                            detail: e.to_string(),
                        };
                        self.queued_emit(kind);
                    }
                    None
                }
            },
            Some(Ok(WsMessage::Pong(_))) => Some(Input::Pong),
            Some(Ok(WsMessage::Close(c))) => {
                self.ws = None;
                let why = c
                    .map(|c| format!("closed by server ({} {})", u16::from(c.code), c.reason))
                    .unwrap_or_else(|| "closed by server".into());
                Some(Input::Lost(why))
            }
            Some(Ok(_)) => None,
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

    /// An event to emit outside a machine step (a frame that does not decode).
    fn queued_emit(&mut self, kind: EventKind) {
        let (ctx, id, conv) = (self.ctx.clone(), self.id.clone(), self.chat.key.clone());
        self.work_push(
            async move {
                emit(&ctx, &id, &conv, kind).await;
                None
            }
            .boxed(),
        );
    }

    async fn write(&mut self, text: String) {
        if let Some(ws) = self.ws.as_mut() {
            if let Err(e) = ws.send(WsMessage::Text(text.into())).await {
                self.ws = None;
                self.queued
                    .push_back(Input::Lost(format!("write failed: {e}")));
            }
        }
    }

    async fn perform(&mut self, a: Action) {
        match a {
            Action::Connect => {
                let connector = self.ctx.connector.clone();
                let url = self.chat.socket_url.clone();
                self.connecting = Some(
                    async move {
                        let started = tokio::time::Instant::now();
                        let r = connector.connect_to(&url, None).await;
                        metrics::histogram!("guestd_connect_duration_seconds", "backend" => "web_messaging")
                            .record(started.elapsed());
                        r
                    }
                    .boxed(),
                );
            }
            Action::CloseSocket => {
                self.connecting = None;
                close_in_background(&mut self.ws);
            }
            Action::Write(out) => {
                let token = self.chat.token.clone();
                let dep = self.chat.deployment_id.clone();
                let (wire, tid) = match &out {
                    Out::Configure { start_new } => (
                        Wire::ConfigureSession {
                            deployment_id: &dep,
                            start_new: *start_new,
                        },
                        self.tid("c"),
                    ),
                    Out::Text { tid, text } => (Wire::Text(text), tid.clone()),
                    Out::Typing => (Wire::TypingOn, self.tid("t")),
                    Out::Join => (Wire::Join, self.tid("j")),
                    Out::Clear => (Wire::Clear, self.tid("l")),
                    Out::Echo { tid } => (Wire::Echo, tid.clone()),
                    Out::GetJwt => (Wire::GetJwt, self.tid("h")),
                    Out::CloseSession => (Wire::CloseSession, self.tid("x")),
                };
                let text = wire.encode(token.expose(), &tid);
                self.write(text).await;
            }
            Action::Ping => {
                if let Some(ws) = self.ws.as_mut() {
                    if let Err(e) = ws.send(WsMessage::Ping(Default::default())).await {
                        self.ws = None;
                        self.queued
                            .push_back(Input::Lost(format!("ping failed: {e}")));
                    }
                }
            }
            Action::Emit(kind) => {
                let conv = self.chat.key.clone();
                // The Platform API is asked about guest chats only: it has no view of a Web
                // Messaging session guestd can name.
                if !emit(&self.ctx, &self.id, &conv, kind).await {
                    self.relinquish("end not recorded");
                }
            }
            Action::Reply(tid, r) => self.reply(&tid, r),
            Action::FetchHistory { jwt, after } => {
                let wm = self.wm.clone();
                self.work_push(
                    async move {
                        let (messages, calls) = wm.history(jwt, after).await;
                        Some(Input::History { messages, calls })
                    }
                    .boxed(),
                );
            }
            Action::Stop => self.stopping = true,
        }
    }

    fn reply(&mut self, tid: &str, r: Result<Reply, Refusal>) {
        if let Some((t, reply)) = self.start_new.take() {
            if t == tid {
                let _ = reply.send(match r {
                    Ok(_) => Ok(Reopen {
                        backend: NAME,
                        args: reopen_args(&self.chat),
                    }),
                    Err(e) => Err(self.refused(e)),
                });
                return;
            }
            self.start_new = Some((t, reply));
        }
        let Some(i) = self.replies.iter().position(|(t, _)| t == tid) else {
            return;
        };
        let (_, reply) = self.replies.swap_remove(i);
        let done = match r {
            Ok(Reply::Sent {
                message_id,
                timestamp,
            }) => Ok(Done::Sent {
                message_id,
                timestamp,
            }),
            Ok(Reply::Typed) => Ok(Done::Typed {}),
            Ok(Reply::Closed) => Ok(Done::Typed {}),
            Err(e) => Err(self.refused(e)),
        };
        let _ = reply.send(done);
    }

    fn refused(&self, e: Refusal) -> CommandError {
        match e {
            Refusal::Ended => CommandError::Ended(self.id.clone()),
            Refusal::ReadOnly => CommandError::ReadOnly(self.id.clone()),
            Refusal::NotLive => CommandError::NotLive(self.id.clone()),
            other => CommandError::Refused(other.to_string()),
        }
    }
}
