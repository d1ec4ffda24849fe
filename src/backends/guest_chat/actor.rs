//! The session actor: one task per chat owning its websocket, timers, REST calls in flight and
//! its [`Machine`]. Callers talk to it through a cheap [`SessionHandle`].
//!
//! The loop waits on whichever comes first: a command, the stream, a connect attempt, a REST
//! result, the machine's next deadline, or shutdown; feeds it to the machine; and performs the
//! actions in order. Nothing here decides anything the machine could decide.

use super::api::{ChatRef, Failure};
use super::backend::GuestChat;
use super::machine::{Action, Input, Machine};
use crate::events::EventKind;
use crate::session::run::{
    Calls, FAIR_EVERY, close_in_background, close_now, emit, leave_durably, next_call, next_frame,
    opt, rearm,
};
use crate::session::{
    CommandError, Done, Mailbox, SessionCmd, SessionCtx, SessionHandle, SessionView,
};
use crate::transport::stream::{ConnectError, Ws};
use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt, StreamExt};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tracing::Instrument;

/// The view of the session `id` of `chat`, as `machine` stands (the reply to `Get`, and what
/// `start`/`attach` answer).
pub(super) fn view_of(id: &str, chat: &ChatRef, machine: &Machine) -> SessionView {
    SessionView {
        agent_connected: machine.agent_connected(),
        last_message_id: machine.last_message_id().map(str::to_string),
        ended: machine.ended(),
        ..SessionView::new(
            id,
            &chat.conversation_id,
            &chat.member_id,
            machine.phase().as_str(),
            super::backend::NAME,
        )
    }
    .with_ends(machine.ends())
}

/// Spawn a session task for `chat`, driven by `machine`.
pub fn spawn(
    ctx: Arc<SessionCtx>,
    gc: Arc<GuestChat>,
    id: String,
    chat: ChatRef,
    machine: Machine,
) -> SessionHandle {
    let (handle, rx) = SessionHandle::new(&id, &chat.conversation_id);
    let span = tracing::info_span!("session", session = %id, conversation = %chat.conversation_id);
    // The actor lives in its own allocation and the task's future only points at it: an async
    // fn's by-value arguments take space twice in its state (rust-lang/rust#62958), which for a
    // 2 KiB actor is 2 KiB per idle session.
    let actor = Box::new(Actor::new(ctx, gc, id, chat, machine));
    tokio::spawn(run_then_report(actor, rx).instrument(span));
    handle
}

async fn run_then_report(mut actor: Box<Actor>, rx: Arc<Mailbox>) {
    actor.run(&rx).await;
    rx.close();
    let _ = actor.ctx.done.send(actor.id.clone());
}

/// What woke the loop.
enum Wake {
    Input(Input),
    Nothing,
    Shutdown,
}

struct Actor {
    ctx: Arc<SessionCtx>,
    /// The backend: the guest API, the rules, the Platform API.
    gc: Arc<GuestChat>,
    id: String,
    chat: ChatRef,
    machine: Machine,
    ws: Option<Ws>,
    connecting: Option<BoxFuture<'static, Result<Ws, ConnectError>>>,
    /// REST calls in flight; allocated only while there are some (an idle session has none).
    rest: Calls<Input>,
    queued: VecDeque<Input>,
    stopping: bool,
    /// A digest of the no-activity evidence last written to the journal (8 bytes per session,
    /// not a copy).
    journaled_activity: u64,
    /// The same for its agent part alone (who, since when): a change there is recorded durably
    /// before the event that reveals it (see `record_activity`).
    journaled_agent: u64,
    /// Cluster mode: the epoch this node held the chat in (0 on a single node).
    epoch: u64,
    relinquished: bool,
}

impl Actor {
    fn new(
        ctx: Arc<SessionCtx>,
        gc: Arc<GuestChat>,
        id: String,
        chat: ChatRef,
        mut machine: Machine,
    ) -> Self {
        if !machine.anchored() {
            machine.anchor_wall(Instant::now(), chrono::Utc::now().timestamp_millis());
        }
        let d = machine.activity_digest();
        let (journaled_activity, journaled_agent) = (d.all, d.agent.unwrap_or(0));
        Actor {
            id,
            chat,
            machine,
            ws: None,
            connecting: None,
            rest: None,
            queued: VecDeque::new(),
            stopping: false,
            journaled_activity,
            journaled_agent,
            epoch: ctx.epoch(),
            relinquished: false,
            ctx,
            gc,
        }
    }

    /// Whether this process may act for the chat (always, on a single node).
    fn may_act(&self) -> bool {
        self.ctx.may_act(self.epoch)
    }

    /// Stop at once without an effect: no REST call, no `leave`, no `ended`. The socket is
    /// dropped (a close frame is not an effect the platform acts on, but nothing is sent).
    fn relinquish(&mut self, why: &str) {
        tracing::info!(why, "no longer acting for this chat: another node takes it");
        metrics::counter!("guestd_sessions_relinquished_total").increment(1);
        self.ws = None;
        self.connecting = None;
        self.rest = None;
        self.queued.clear();
        self.stopping = true;
        self.relinquished = true;
        self.ctx.journal.forget(&self.id);
    }

    /// The session's whole life. Memory matters here (one of these per chat, tens of
    /// thousands per process): everything awaited that is large or rare is boxed, and no select
    /// branch awaits, so the task's future holds little beyond the actor itself.
    async fn run(&mut self, rx: &Mailbox) {
        metrics::gauge!("guestd_sessions", "backend" => "guest_chat", "state" => self.machine.phase().as_str()).increment(1.0);
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut sleep = Box::pin(tokio::time::sleep_until(
            self.machine.next_deadline().unwrap_or(far),
        ));
        let cancel = self.ctx.cancel.clone();
        let mut shutting_down = false;
        let mut frames_in_a_row = 0u32;
        while !self.stopping {
            let input = match self.queued.pop_front() {
                Some(i) => Wake::Input(i),
                None => {
                    rearm(sleep.as_mut(), self.machine.next_deadline().unwrap_or(far));
                    // Biased, frames before the timer: after a stall (a slow stdout reader holds
                    // the session in `emit`), frames already received are proof of life and must
                    // be seen before a deadline can declare the socket silent.
                    // After a long run of frames (a server flooding pings), what else is
                    // ready now goes first: call results and a due deadline are not starved.
                    let mut turn = None;
                    if frames_in_a_row >= FAIR_EVERY {
                        frames_in_a_row = 0;
                        turn = futures::FutureExt::now_or_never(async {
                            tokio::select! {
                                biased;
                                r = opt(self.connecting.as_mut()) => Wake::Input(self.connected(r)),
                                i = next_call(&mut self.rest) => i.map_or(Wake::Nothing, Wake::Input),
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
                            i = next_call(&mut self.rest) => i.map_or(Wake::Nothing, Wake::Input),
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
                        Input::LeaveRequested
                    } else {
                        Box::pin(close_now(&mut self.ws)).await;
                        break;
                    }
                }
            };
            if !self.may_act() {
                self.relinquish("fenced");
                break;
            }
            let before = self.machine.phase();
            let actions = self.machine.step(input, Instant::now());
            // Gauges first: a reader who sees an event sees the state it announces.
            let after = self.machine.phase();
            if before != after {
                metrics::gauge!("guestd_sessions", "backend" => "guest_chat", "state" => before.as_str()).decrement(1.0);
                metrics::gauge!("guestd_sessions", "backend" => "guest_chat", "state" => after.as_str()).increment(1.0);
            }
            // Evidence before the events that reveal it (issue: a restart in the no-activity
            // window misreported): performing the actions may write `agent_connected`.
            Box::pin(self.record_activity()).await;
            for a in actions {
                if self.relinquished {
                    break;
                }
                Box::pin(self.perform(a)).await;
            }
        }
        metrics::gauge!("guestd_sessions", "backend" => "guest_chat", "state" => self.machine.phase().as_str()).decrement(1.0);
        Box::pin(self.finish()).await;
    }

    /// Record the no-activity rule's evidence when the last step changed it, before the step's
    /// actions are performed. A change of agent (one arrives, leaves, or another takes over)
    /// is recorded durably and waited for: a reader who saw `agent_connected` and then a crash
    /// must find that agent in the journal, or the next process, finding the chat ended, would
    /// report a lost socket (`reconnect_grace_expired`) where the platform ended it for no
    /// activity; and one who saw `agent_disconnected` must not find the agent still there, or
    /// the next process would count it and report `inactivity_timeout` for a chat that had no
    /// agent. The guest's last message alone is recorded without waiting: it moves with every
    /// message, and losing the newest only makes a restart's deadline earlier. A record that
    /// fails is logged; on a strict journal (cluster mode: another node may hold the chat now)
    /// the session stops acting for the chat before it emits anything.
    async fn record_activity(&mut self) {
        let d = self.machine.activity_digest();
        if d.all == self.journaled_activity {
            return;
        }
        self.journaled_activity = d.all;
        let agent = d.agent.unwrap_or(0);
        let changed = agent != self.journaled_agent;
        self.journaled_agent = agent;
        let Some(a) = self.machine.activity() else {
            return;
        };
        if !changed {
            self.ctx.journal.activity(&self.id, a);
            return;
        }
        if let Err(e) = self.ctx.journal.evidence(&self.id, a).await {
            tracing::warn!(error = %e, "the agent's arrival or departure is not durable; a restart may misreport a no-activity end");
            if self.ctx.journal.strict() {
                self.relinquish("evidence not recorded");
            }
        }
    }

    /// Finish what the end asked for (a leave, say), bounded.
    async fn finish(&mut self) {
        let drain = async {
            while let Some(r) = self.rest.as_mut() {
                if r.next().await.is_none() {
                    self.rest = None;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .is_err()
        {
            tracing::warn!("gave up waiting for REST calls after the end");
        }
    }

    fn rest_push(&mut self, f: BoxFuture<'static, Option<Input>>) {
        self.rest.get_or_insert_with(Default::default).push(f);
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
                Input::ConnectFailed(match e {
                    ConnectError::Refused { status: 401, body } => Failure::Unauthorized(body),
                    ConnectError::Refused { status: 404, body } => Failure::NotFound(body),
                    other => Failure::Other(other.to_string()),
                })
            }
        }
    }

    fn command(&mut self, cmd: SessionCmd) -> Option<Input> {
        let ended = self.machine.ended();
        match cmd {
            SessionCmd::Relinquish => {
                self.relinquish("asked");
                None
            }
            SessionCmd::StartNew { reply } => {
                let _ = reply.send(Err(CommandError::Unsupported(
                    "start_new is a Web Messaging command; a guest chat never reopens".into(),
                )));
                None
            }
            SessionCmd::Send { body, reply }
                if body.chars().count() > self.gc.api.max_message_chars() =>
            {
                // Refused here: the platform would refuse it, after a round trip.
                let (chars, max) = (body.chars().count(), self.gc.api.max_message_chars());
                let _ = reply.send(Err(CommandError::Invalid(format!(
                    "send: the body has {chars} characters; the platform takes at most {max}"
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
            SessionCmd::Get { reply } => {
                let _ = reply.send(view_of(&self.id, &self.chat, &self.machine));
                None
            }
            SessionCmd::Send { reply, .. }
            | SessionCmd::Typing { reply }
            | SessionCmd::Leave { reply }
                if ended.is_some() =>
            {
                let _ = reply.send(Err(CommandError::Ended(self.id.clone())));
                None
            }
            SessionCmd::Send { body, reply } => {
                let fut = self.gc.api.send_message(&self.chat, body);
                self.rest_push(
                    async move {
                        match fut.await {
                            Ok(m) => {
                                let sent = Done::Sent {
                                    message_id: m.id.clone(),
                                    timestamp: m.timestamp,
                                };
                                let _ = reply.send(Ok(sent));
                                Some(Input::GuestSent(m.id))
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e.into()));
                                None
                            }
                        }
                    }
                    .boxed(),
                );
                None
            }
            SessionCmd::Typing { reply } => {
                let fut = self.gc.api.send_typing(&self.chat);
                self.rest_push(
                    async move {
                        let _ = reply.send(fut.await.map(|_| Done::Typed {}).map_err(Into::into));
                        None
                    }
                    .boxed(),
                );
                None
            }
            SessionCmd::Leave { reply } => {
                let leave = leave_durably(&self.ctx, &self.id, reply, Input::LeaveRequested);
                self.rest_push(leave);
                None
            }
        }
    }

    fn frame(
        &mut self,
        frame: Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>,
    ) -> Option<Input> {
        match frame {
            Some(Ok(WsMessage::Text(t))) => Some(match self.gc.api.decode(&t) {
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
            Some(Ok(_)) => Some(Input::Frame(
                crate::backends::guest_chat::api::ChatEvent::Other("control frame".into()),
            )),
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

    async fn perform(&mut self, a: Action) {
        match a {
            Action::Emit(kind) => self.emit(kind).await,
            Action::Connect => {
                let connector = self.ctx.connector.clone();
                // What the connect needs, not the whole chat: in a burst thousands wait.
                let (uri, jwt) = (self.chat.event_stream_uri.clone(), self.chat.jwt.clone());
                self.connecting = Some(
                    async move {
                        let started = tokio::time::Instant::now();
                        let r = connector.connect(&uri, &jwt).await;
                        metrics::histogram!("guestd_connect_duration_seconds", "backend" => "guest_chat")
                            .record(started.elapsed());
                        r
                    }
                    .boxed(),
                );
            }
            Action::AbortConnect => self.connecting = None,
            Action::CloseSocket => close_in_background(&mut self.ws),
            Action::Ping => {
                let ping = self.gc.api.ping_frame();
                if let Some(ws) = self.ws.as_mut() {
                    if let Err(e) = ws.send(WsMessage::Text(ping.into())).await {
                        self.ws = None;
                        self.queued
                            .push_back(Input::Lost(format!("ping failed: {e}")));
                    }
                }
            }
            Action::FetchMembers => {
                let fut = self.gc.api.list_members(&self.chat);
                self.rest_push(
                    fut.map(|r| Some(Input::Members(r.map_err(|e| Failure::from(&e)))))
                        .boxed(),
                );
            }
            Action::Backfill { after, generation } => {
                let fut = self.gc.api.messages_after(&self.chat, after);
                self.rest_push(
                    fut.map(move |r| {
                        Some(Input::Backfill(
                            generation,
                            r.map_err(|e| Failure::from(&e)),
                        ))
                    })
                    .boxed(),
                );
            }
            Action::Leave => {
                let fut = self.gc.api.leave(&self.chat);
                self.rest_push(
                    fut.map(|r| Some(Input::LeaveDone(r.map_err(|e| Failure::from(&e)))))
                        .boxed(),
                );
            }
            Action::Stop => self.stopping = true,
        }
    }

    async fn emit(&mut self, kind: EventKind) {
        let conv = self.chat.conversation_id.clone();
        let ended = match &kind {
            EventKind::Ended { reason, .. } => Some(*reason),
            _ => None,
        };
        if !emit(&self.ctx, &self.id, &conv, kind).await {
            self.relinquish("end not recorded");
        } else if let Some(reason) = ended {
            // The platform's account of the end, once the line is out.
            self.gc.confirm_end(&self.ctx, &self.id, &conv, reason);
        }
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;
    #[tokio::test]
    /// An idle session's footprint is the point of guestd: keep the task's future and the actor
    /// small (see docs/design.md). These bounds fail if a change inlines something large again.
    async fn an_idle_session_stays_small() {
        let (em, _t) = crate::events::spawn_writer(crate::events::WriterSink(tokio::io::sink()), 4);
        let (ctx, _rx) = SessionCtx::for_test(em, Arc::new(crate::journal::NullJournal), 1);
        let gc = Arc::new(GuestChat {
            api: Arc::new(crate::backends::guest_chat::api::testing::Stalled),
            timing: Arc::new(super::super::Timing::default()),
            platform: None,
        });
        let chat = ChatRef {
            conversation_id: "c".into(),
            member_id: "m".into(),
            jwt: crate::secret::Secret::new("j"),
            event_stream_uri: "ws://127.0.0.1:1/x".into(),
        };
        let m = Machine::new(super::super::Timing::default(), "m", Instant::now());
        let rx = Arc::new(Mailbox::default());
        let a = Actor::new(Arc::new(ctx), gc, "s".into(), chat, m);
        let f = run_then_report(Box::new(a), rx);
        let task = std::mem::size_of_val(&f);
        let actor = std::mem::size_of::<Actor>();
        eprintln!(
            "task future {task} B, actor {actor} B, machine {} B",
            std::mem::size_of::<Machine>()
        );
        assert!(
            task <= 1024,
            "the session task's future grew to {task} bytes"
        );
        assert!(actor <= 2304, "the actor grew to {actor} bytes");
        assert!(std::mem::size_of::<SessionHandle>() <= 48);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{EndingRecord, Journal};
    use std::sync::Mutex;
    use tokio::io::AsyncBufReadExt;
    use tokio::sync::mpsc;

    /// Records the messages marked as emitted.
    #[derive(Default)]
    struct Marks(Mutex<Vec<String>>);

    impl Journal for Marks {
        fn session_started(&self, _: crate::journal::SessionRecord) -> crate::journal::Durable {
            Box::pin(async { Ok(()) })
        }
        fn progress(&self, session: &str, last_message_id: &str) {
            let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
            m.push(format!("{session}:{last_message_id}"));
        }
        fn activity(&self, _: &str, _: crate::journal::Activity) {}
        fn ending(&self, _: &str, _: EndingRecord) -> crate::journal::Durable {
            Box::pin(async { Ok(()) })
        }
        fn leaving(&self, _: &str) -> crate::journal::Durable {
            Box::pin(async { Ok(()) })
        }
        fn ended(&self, _: &str) {}
        fn sync(&self) -> crate::journal::Durable {
            Box::pin(async { Ok(()) })
        }
    }

    fn message(id: &str) -> EventKind {
        EventKind::Message {
            message_id: id.into(),
            sender_id: "a".into(),
            sender_role: "agent".into(),
            body_type: "standard".into(),
            body: Some("hello".into()),
            timestamp: "2026-11-26T10:00:00.000Z".into(),
            backfilled: false,
        }
    }

    /// Issue 29: the journal marks a message as emitted (the id a restart's backfill starts
    /// after) only once its line is written and flushed. The actor marked it once the event was
    /// queued: a SIGKILL with the reader behind lost every queued message
    /// (tests/service.rs `sigkill_with_events_queued_and_messages_arriving_loses_nothing`).
    #[tokio::test]
    async fn a_message_is_marked_in_the_journal_only_once_written() {
        // A reader that has not read yet: the writer blocks on the pipe.
        let (client, server) = tokio::io::duplex(16);
        let (emitter, _writer) = crate::events::spawn_writer(crate::events::WriterSink(client), 8);
        let marks = Arc::new(Marks::default());
        let (ctx, _rx) = SessionCtx::for_test(emitter.clone(), marks.clone(), 1);
        for id in ["m1", "m2"] {
            assert!(emit(&ctx, "s", "c", message(id)).await);
        }
        emit(&ctx, "s", "c", EventKind::Connected).await;
        let marked = || marks.0.lock().map(|m| m.clone()).unwrap_or_default();
        assert!(marked().is_empty(), "queued, not written: {:?}", marked());
        // The reader catches up: both lines come out, and only then are they marked, in order.
        let mut lines = tokio::io::BufReader::new(server).lines();
        let reader = tokio::spawn(async move {
            let mut n = 0;
            while let Ok(Some(_)) = lines.next_line().await {
                n += 1;
            }
            n
        });
        emitter.flush().await;
        assert_eq!(marked(), ["s:m1", "s:m2"]);
        drop((ctx, emitter));
        reader.abort();
    }

    /// Holds every `evidence` record until the test lets it through.
    struct Gate {
        seen: mpsc::UnboundedSender<crate::journal::Activity>,
        open: tokio::sync::watch::Receiver<bool>,
    }

    impl Journal for Gate {
        fn session_started(&self, _: crate::journal::SessionRecord) -> crate::journal::Durable {
            Box::pin(async { Ok(()) })
        }
        fn progress(&self, _: &str, _: &str) {}
        fn activity(&self, _: &str, _: crate::journal::Activity) {}
        fn evidence(&self, _: &str, a: crate::journal::Activity) -> crate::journal::Durable {
            let _ = self.seen.send(a);
            let mut open = self.open.clone();
            Box::pin(async move {
                let _ = open.wait_for(|o| *o).await;
                Ok(())
            })
        }
        fn ending(&self, _: &str, _: EndingRecord) -> crate::journal::Durable {
            Box::pin(async { Ok(()) })
        }
        fn leaving(&self, _: &str) -> crate::journal::Durable {
            Box::pin(async { Ok(()) })
        }
        fn ended(&self, _: &str) {}
        fn sync(&self) -> crate::journal::Durable {
            Box::pin(async { Ok(()) })
        }
    }

    /// A restart in the no-activity window misreported: `agent_connected` was written before
    /// the agent was journaled, so a SIGKILL between the two left a reader who saw the agent
    /// and a journal without it, and the next process called the platform's no-activity end a
    /// lost socket (`tests/service.rs` `a_chat_ended_for_no_activity_while_guestd_was_down_says_so`
    /// failed 2 runs in 24 under load). The agent is now recorded durably, and waited for,
    /// before the event: against the emulator, with a journal that holds the record, no
    /// `agent_connected` line comes out until the record is through.
    #[tokio::test]
    async fn an_agent_is_journaled_durably_before_agent_connected_is_written() {
        let emu = crate::emulator::Emulator::start(
            crate::demo::fast_emulator(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        let cfg = crate::demo::fast_config(&emu.base_url());
        let (client, server) = tokio::io::duplex(1 << 16);
        let (emitter, _writer) = crate::events::spawn_writer(crate::events::WriterSink(client), 64);
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let (open_tx, open) = tokio::sync::watch::channel(false);
        let (ctx, done_rx) = SessionCtx::for_test(
            emitter,
            Arc::new(Gate {
                seen: seen_tx,
                open,
            }),
            4,
        );
        let cancel = ctx.cancel.clone();
        let backends = super::super::backend::only(
            Arc::new(crate::backends::guest_api(&cfg, &[]).unwrap()),
            cfg.session.clone(),
        );
        let sup = crate::supervisor::Supervisor::spawn(ctx, done_rx, 4, backends);
        let crate::command::Command::Open(start) = crate::control::parse_command(
            "start",
            serde_json::json!({"queue": "Support", "display_name": "Ann"}),
        )
        .unwrap() else {
            panic!("a start");
        };
        let view = sup.open(start).await.unwrap();
        let mut lines = tokio::io::BufReader::new(server).lines();
        let mut next_type = async move || -> String {
            let line = lines.next_line().await.unwrap().unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            v["type"].as_str().unwrap_or_default().to_string()
        };
        while next_type().await != "connected" {}
        emu.agent_join(&view.conversation_id).unwrap();
        let held = tokio::time::timeout(Duration::from_secs(10), seen.recv())
            .await
            .expect("the agent's arrival is recorded as evidence")
            .unwrap();
        assert!(
            held.agent.is_some() && held.agent_since_ms.is_some(),
            "{held:?}"
        );
        // While the record is held, no line about the agent may come out.
        let early = tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                let t = next_type().await;
                if t == "agent_connected" {
                    return t;
                }
            }
        })
        .await;
        assert!(
            early.is_err(),
            "agent_connected written before its evidence was durable"
        );
        open_tx.send_replace(true);
        let after = tokio::time::timeout(Duration::from_secs(10), async {
            while next_type().await != "agent_connected" {}
        })
        .await;
        assert!(
            after.is_ok(),
            "agent_connected follows once the record is through"
        );
        cancel.cancel();
        emu.shutdown();
    }
}
