//! The session actor: one task per chat owning its websocket, timers, REST calls in flight and
//! its [`Machine`]. Callers talk to it through a cheap [`SessionHandle`].
//!
//! The loop waits on whichever comes first: a command, the stream, a connect attempt, a REST
//! result, the machine's next deadline, or shutdown; feeds it to the machine; and performs the
//! actions in order. Nothing here decides anything the machine could decide.

use super::machine::{Action, Input, Machine, Timing};
use crate::backends::guest_chat::api::{ChatApi, ChatRef, Failure};
use crate::events::{AfterWrite, Emitter, EndReason, Event, EventKind};
use crate::journal::{EndingRecord, Journal};
use crate::transport::policy::ApiError;
use crate::transport::stream::{ConnectError, Connector, Ws};
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
    pub timing: Arc<Timing>,
    /// Told the session id when a session task finishes.
    pub done: mpsc::UnboundedSender<String>,
    /// Process shutdown.
    pub cancel: CancellationToken,
    /// On shutdown, leave the chats instead of only closing the sockets.
    pub leave_on_shutdown: bool,
    /// The Platform API, when configured: every `ended` is followed by `end_confirmed`.
    pub platform: Option<crate::platform::api::Platform>,
    /// Cluster mode: whether this node may still act for the chats it took (see
    /// `crate::cluster::Fence`). None on a single node.
    pub fence: Option<crate::cluster::Fence>,
    /// The Web Messaging backend, when `[web_messaging]` can be used.
    pub messaging: Option<Arc<crate::backends::web_messaging::client::Messaging>>,
}

impl SessionCtx {
    /// A context for tests: one node, no Platform API, no Web Messaging, default timing, a
    /// connector for `connects` at once; `done` and `cancel` fresh (the caller may replace
    /// them).
    #[cfg(test)]
    pub(crate) fn for_test(
        api: Arc<dyn ChatApi>,
        emitter: crate::events::Emitter,
        journal: Arc<dyn Journal>,
        connects: usize,
    ) -> (Self, mpsc::UnboundedReceiver<String>) {
        let (done, done_rx) = mpsc::unbounded_channel();
        let ctx = SessionCtx {
            api,
            connector: Connector::new(Default::default(), connects),
            emitter,
            journal,
            timing: Arc::new(Timing::default()),
            done,
            cancel: CancellationToken::new(),
            leave_on_shutdown: false,
            platform: None,
            fence: None,
            messaging: None,
        };
        (ctx, done_rx)
    }

    /// Whether this process may still act for a chat it took in `epoch` (always, on a single
    /// node; see `crate::cluster::Fence`).
    pub fn may_act(&self, epoch: u64) -> bool {
        self.fence.as_ref().is_none_or(|f| f.acting(epoch))
    }

    /// Ask the platform about an end, in the background, and write its `end_confirmed`.
    pub fn confirm_end(&self, session: &str, conversation: &str, reason: EndReason) {
        let Some(platform) = self.platform.clone() else {
            return;
        };
        let (emitter, session, conversation) = (
            self.emitter.clone(),
            session.to_string(),
            conversation.to_string(),
        );
        tokio::spawn(async move {
            let ev = platform.confirm(&session, &conversation, reason).await;
            emitter.emit(ev).await;
        });
    }
}

/// What a session did for a command (serialized as the command's `result`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Done {
    /// The message was sent.
    Sent {
        /// The platform's message id.
        message_id: String,
        /// The platform's timestamp (RFC 3339).
        timestamp: String,
    },
    /// The typing indicator was sent.
    Typed {},
    /// The leave is recorded durably and under way; the `ended` event follows.
    Leaving {
        /// Always true.
        leaving: bool,
    },
}

/// Why a session refused or failed a command.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommandError {
    /// The session has ended (or ended while the command waited).
    #[error("session {0} has ended")]
    Ended(String),
    /// [`MAILBOX_LIMIT`] commands already wait for this session.
    #[error("session {0} is busy: {MAILBOX_LIMIT} commands are waiting; retry")]
    Busy(String),
    /// The platform refused or failed the call.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// What the command needs recorded could not be made durable.
    #[error("the session journal refused the record: {0}")]
    Journal(String),
    /// This node no longer acts for the chat (cluster mode); retry: the command reaches the
    /// node that took it.
    #[error("session {0} is moving to another node; retry")]
    Moved(String),
    /// Web Messaging: the session is read-only (its conversation was ended in ReadOnly mode).
    #[error("session {0} is read-only: its conversation was ended; start_new begins another")]
    ReadOnly(String),
    /// Web Messaging: the platform refused the message, or did not confirm it.
    #[error("{0}")]
    Refused(String),
    /// Web Messaging: the session is reconnecting; retry.
    #[error("session {0} is not connected; retry")]
    NotLive(String),
    /// The command does not apply to this session's backend.
    #[error("{0}")]
    Unsupported(String),
}

/// The reply channel of a command that acts on the chat.
pub type DoneReply = oneshot::Sender<Result<Done, CommandError>>;

/// A command to one session.
#[derive(Debug)]
pub enum SessionCmd {
    /// Send a message as the guest.
    Send {
        /// The message text (already checked against the backend's limit).
        body: String,
        /// The sent message, or why not.
        reply: DoneReply,
    },
    /// Send a typing indicator.
    Typing {
        /// Done, or why not.
        reply: DoneReply,
    },
    /// Leave the chat (the `ended` event follows).
    Leave {
        /// Accepted, or why not.
        reply: DoneReply,
    },
    /// Describe the session.
    Get {
        /// Where the view goes (dropped unanswered once the session has ended).
        reply: oneshot::Sender<SessionView>,
    },
    /// Stop acting for the chat without ending or leaving it: another node takes it (cluster
    /// mode: this node is fenced, or lost the chat's entry).
    Relinquish,
    /// Web Messaging: close the session so a new one can begin on the same token; the reply
    /// carries what the new one needs.
    StartNew {
        /// The session's deployment and token once it is closed, or why not.
        reply: oneshot::Sender<Result<crate::backends::web_messaging::actor::Reopen, CommandError>>,
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
    /// `guest_chat` or `web_messaging`.
    pub backend: &'static str,
    /// Web Messaging: the session can no longer send.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// Web Messaging: whether an agent's end reaches the guest at all (the deployment's
    /// Conversation Disconnect); false means guestd cannot see one and never reports one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_end_visible: Option<bool>,
    /// Web Messaging: milliseconds until the session expires, as last seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in_ms: Option<u64>,
    /// When the platform ends the chat if nothing happens (RFC 3339); null while nothing would
    /// (a guest chat queued with its socket up) and once it has ended.
    pub ends_at: Option<String>,
    /// Why it would end then: `inactivity_timeout`, `reconnect_grace_expired` or
    /// `session_expired`.
    pub ends_because: Option<EndReason>,
}

impl SessionView {
    /// The view of a guest chat.
    pub fn guest_chat(session: &str, chat: &ChatRef, state: &'static str) -> SessionView {
        SessionView {
            session: session.to_string(),
            conversation_id: chat.conversation_id.clone(),
            member_id: chat.member_id.clone(),
            state,
            agent_connected: false,
            last_message_id: None,
            ended: None,
            backend: "guest_chat",
            read_only: false,
            agent_end_visible: None,
            expires_in_ms: None,
            ends_at: None,
            ends_because: None,
        }
    }

    /// With `ends` (a machine's [`Machine::ends`]) as wall-clock `ends_at`/`ends_because`.
    pub fn with_ends(mut self, ends: Option<(Instant, EndReason)>) -> SessionView {
        if let Some((at, why)) = ends {
            self.ends_at = Some(wall_at(at, Instant::now(), chrono::Utc::now()));
            self.ends_because = Some(why);
        }
        self
    }
}

/// The wall-clock time (RFC 3339 UTC, ms) of instant `at`, given that `now` is `wall`.
pub fn wall_at(at: Instant, now: Instant, wall: chrono::DateTime<chrono::Utc>) -> String {
    let t = if at >= now {
        wall + chrono::Duration::from_std(at - now).unwrap_or_default()
    } else {
        wall - chrono::Duration::from_std(now - at).unwrap_or_default()
    };
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The way to talk to a session task.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    /// guestd's session id.
    pub id: Arc<str>,
    /// Conversation id.
    pub conversation_id: Arc<str>,
    mailbox: Arc<Mailbox>,
}

/// A session's command inbox. Not a `tokio::sync::mpsc` channel: with its cache-padded state and
/// first block allocated up front that costs about 800 bytes per session, a tenth of an idle
/// session, for commands that are rare. This is a short locked queue and a `Notify`.
#[derive(Debug, Default)]
pub struct Mailbox {
    queue: std::sync::Mutex<VecDeque<Box<SessionCmd>>>,
    notify: tokio::sync::Notify,
    closed: std::sync::atomic::AtomicBool,
    /// Told when the session task has finished.
    gone: tokio::sync::Notify,
}

/// Commands queued for one session before senders are refused.
pub const MAILBOX_LIMIT: usize = 64;

impl Mailbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Box<SessionCmd>>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a command; `Err(true)` when the session has ended, `Err(false)` when it is full.
    fn push(&self, cmd: SessionCmd) -> Result<(), bool> {
        {
            // Checked under the lock: `close` sets the flag under it too, so no command can slip
            // in after the last one was dropped and wait for a reply forever.
            let mut q = self.lock();
            if self.closed.load(std::sync::atomic::Ordering::Acquire) {
                return Err(true);
            }
            if q.len() >= MAILBOX_LIMIT {
                return Err(false);
            }
            q.push_back(Box::new(cmd));
        }
        self.notify.notify_one();
        Ok(())
    }

    /// The next command. `notify_one` keeps a permit when nobody waits, so no wake-up is lost.
    pub(crate) async fn recv(&self) -> Box<SessionCmd> {
        loop {
            if let Some(c) = self.lock().pop_front() {
                return c;
            }
            self.notify.notified().await;
        }
    }

    /// Refuse new commands and drop the queued ones (their callers see the session ended).
    pub(crate) fn close(&self) {
        {
            let mut q = self.lock();
            self.closed
                .store(true, std::sync::atomic::Ordering::Release);
            q.clear();
        }
        self.gone.notify_waiters();
    }
}

impl SessionHandle {
    /// Send a command; fails if the session has ended or has a full backlog of commands.
    pub async fn send(&self, cmd: SessionCmd) -> Result<(), CommandError> {
        self.mailbox.push(cmd).map_err(|ended| {
            if ended {
                CommandError::Ended(self.id.to_string())
            } else {
                CommandError::Busy(self.id.to_string())
            }
        })
    }

    /// A handle for a new session task, and the inbox the task reads.
    pub(crate) fn new(id: &str, conversation_id: &str) -> (SessionHandle, Arc<Mailbox>) {
        let mailbox = Arc::new(Mailbox::default());
        let handle = SessionHandle {
            id: id.into(),
            conversation_id: conversation_id.into(),
            mailbox: mailbox.clone(),
        };
        (handle, mailbox)
    }

    /// Wait until the session task has finished.
    pub async fn finished(&self) {
        loop {
            let gone = self.mailbox.gone.notified();
            tokio::pin!(gone);
            gone.as_mut().enable();
            if self.is_closed() {
                return;
            }
            gone.await;
        }
    }

    /// Whether the session task has finished.
    pub fn is_closed(&self) -> bool {
        self.mailbox
            .closed
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Ask for the session's view.
    pub async fn view(&self) -> Result<SessionView, CommandError> {
        let (reply, rx) = oneshot::channel();
        self.send(SessionCmd::Get { reply }).await?;
        rx.await
            .map_err(|_| CommandError::Ended(self.id.to_string()))
    }
}

/// Spawn a session task for `chat`, driven by `machine`.
pub fn spawn(ctx: Arc<SessionCtx>, id: String, chat: ChatRef, machine: Machine) -> SessionHandle {
    let (handle, rx) = SessionHandle::new(&id, &chat.conversation_id);
    let span = tracing::info_span!("session", session = %id, conversation = %chat.conversation_id);
    // The actor lives in its own allocation and the task's future only points at it: an async
    // fn's by-value arguments take space twice in its state (rust-lang/rust#62958), which for a
    // 2 KiB actor is 2 KiB per idle session.
    let actor = Box::new(Actor::new(ctx, id, chat, machine));
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

/// Frames handled in a row before the other sources of a session's loop get a turn (see the
/// loop): a server that floods frames must not starve call results and deadlines.
pub(crate) const FAIR_EVERY: u32 = 64;

/// Set the session's one timer to `at`, unless it is set there already. Every frame passes
/// here, and most leave the deadline where it was (a message, a typing event, a ping), so the
/// timer wheel is left alone for them (a reset is a remove and an insert under the wheel's
/// lock). Same outcome as a reset: a timer that fired at `at` and is not moved fires again at
/// once, as a reset to that past instant would.
pub(crate) fn rearm(sleep: std::pin::Pin<&mut tokio::time::Sleep>, at: tokio::time::Instant) {
    if sleep.deadline() != at {
        sleep.reset(at);
    }
}

/// The output of `f`, or pending forever when there is none (a `select!` branch that is off).
pub(crate) async fn opt<F: std::future::Future + Unpin>(f: Option<&mut F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => futures::future::pending().await,
    }
}

/// Calls in flight, allocated only while there are some (an idle session has none).
pub(crate) type Calls<T> = Option<Box<FuturesUnordered<BoxFuture<'static, Option<T>>>>>;

/// The next call's result; frees the set once it is empty. Pending while there is none.
pub(crate) async fn next_call<T>(calls: &mut Calls<T>) -> Option<T> {
    loop {
        match calls {
            Some(r) => match r.next().await {
                Some(i) => {
                    if r.is_empty() {
                        *calls = None;
                    }
                    return i;
                }
                None => *calls = None,
            },
            None => futures::future::pending::<()>().await,
        }
    }
}

/// Close `ws` (if open) and wait for it at most a second.
pub(crate) async fn close_now(ws: &mut Option<Ws>) {
    if let Some(mut ws) = ws.take() {
        let _ =
            tokio::time::timeout(Duration::from_secs(1), futures::SinkExt::close(&mut ws)).await;
    }
}

/// Close `ws` (if open) on its own task: the session does not wait for the peer.
pub(crate) fn close_in_background(ws: &mut Option<Ws>) {
    if let Some(mut ws) = ws.take() {
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(1), futures::SinkExt::close(&mut ws))
                .await;
        });
    }
}

/// A `leave` made durable before it is answered: a crash after "leaving" must not lose it (the
/// next process finds it in the journal and sends it again). Once durable, the reply says so
/// and `then` goes to the session's machine.
pub(crate) fn leave_durably<I: Send + 'static>(
    ctx: &SessionCtx,
    id: &str,
    reply: DoneReply,
    then: I,
) -> BoxFuture<'static, Option<I>> {
    let durable = ctx.journal.leaving(id);
    async move {
        match durable.await {
            Ok(()) => {
                let _ = reply.send(Ok(Done::Leaving { leaving: true }));
                Some(then)
            }
            Err(e) => {
                let _ = reply.send(Err(CommandError::Journal(e.0)));
                None
            }
        }
    }
    .boxed()
}

/// The next frame of the socket, or pending forever while there is none.
pub(crate) async fn next_frame(
    ws: &mut Option<Ws>,
) -> Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>> {
    match ws {
        Some(w) => w.next().await,
        None => futures::future::pending().await,
    }
}

impl Actor {
    fn new(ctx: Arc<SessionCtx>, id: String, chat: ChatRef, mut machine: Machine) -> Self {
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
            epoch: ctx.fence.as_ref().map_or(0, |f| f.epoch()),
            relinquished: false,
            ctx,
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
            SessionCmd::Send { reply, .. }
            | SessionCmd::Typing { reply }
            | SessionCmd::Leave { reply }
                if !self.may_act() =>
            {
                let _ = reply.send(Err(CommandError::Moved(self.id.clone())));
                None
            }
            SessionCmd::Get { reply } => {
                let _ = reply.send(
                    SessionView {
                        agent_connected: self.machine.agent_connected(),
                        last_message_id: self.machine.last_message_id().map(str::to_string),
                        ended,
                        ..SessionView::guest_chat(
                            &self.id,
                            &self.chat,
                            self.machine.phase().as_str(),
                        )
                    }
                    .with_ends(self.machine.ends()),
                );
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
                let fut = self.ctx.api.send_message(&self.chat, body);
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
                let fut = self.ctx.api.send_typing(&self.chat);
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
                let chat = self.chat.clone();
                self.connecting = Some(
                    async move {
                        let started = tokio::time::Instant::now();
                        let r = connector.connect(&chat).await;
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
                self.rest_push(
                    fut.map(|r| Some(Input::Members(r.map_err(|e| Failure::from(&e)))))
                        .boxed(),
                );
            }
            Action::Backfill { after, generation } => {
                let fut = self.ctx.api.messages_after(&self.chat, after);
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
                let fut = self.ctx.api.leave(&self.chat);
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
        if !emit(&self.ctx, &self.id, &conv, kind, true).await {
            self.relinquish("end not recorded");
        }
    }
}

/// Emit one of a session's events, with its metrics. A message is marked in the journal (the
/// id a restart's backfill starts after) once its line is written and flushed, not when it is
/// queued: a SIGKILL in between then repeats it after the restart instead of losing it (both
/// machines emit messages in order, and the id of the last one emitted is their backfill's
/// starting point). An `ended` is recorded in the journal first (its `event_id` is stable
/// across restarts), written and flushed, then the session's entry is closed and, with
/// `confirm`, the platform asked for its account. False when the end could not be recorded and
/// the journal is strict (cluster mode): the caller relinquishes the chat to its next owner,
/// which decides again.
pub(crate) async fn emit(
    ctx: &SessionCtx,
    id: &str,
    conversation: &str,
    kind: EventKind,
    confirm: bool,
) -> bool {
    match &kind {
        EventKind::Reconnecting { .. } => {
            metrics::counter!("guestd_reconnect_attempts_total").increment(1)
        }
        EventKind::Reconnected { .. } => metrics::counter!("guestd_reconnects_total").increment(1),
        EventKind::HeartbeatMissed { .. } => {
            metrics::counter!("guestd_heartbeat_misses_total").increment(1)
        }
        EventKind::StreamError { .. } => {
            metrics::counter!("guestd_stream_errors_total").increment(1)
        }
        _ => {}
    }
    let mut ev = Event::new(id, Some(conversation), kind);
    if let EventKind::Ended {
        reason,
        duration_ms,
        detail,
        extra,
    } = &ev.kind
    {
        metrics::counter!("guestd_ended_total", "reason" => reason.as_str()).increment(1);
        tracing::info!(reason = reason.as_str(), duration_ms, detail = %detail, "chat ended");
        let event_id = format!("{id}:ended");
        ev.event_id = Some(event_id.clone());
        let rec = EndingRecord {
            reason: *reason,
            detail: detail.clone(),
            duration_ms: *duration_ms,
            event_id,
            ts: ev.ts.clone(),
            extra: extra.clone(),
        };
        if let Err(e) = ctx.journal.ending(id, rec).await {
            if ctx.journal.strict() {
                // Cluster mode: the chat's next owner finds it and decides.
                tracing::warn!(error = %e, "the end could not be recorded; leaving the chat to its next owner");
                return false;
            }
            // Written anyway: the user learns of the end now. After a restart the chat may be
            // picked up and its end reported again, with the same event_id.
            tracing::error!(error = %e, "the end could not be made durable; writing it anyway");
        }
        let reason = *reason;
        if ctx.emitter.emit_flushed(ev).await {
            ctx.journal.ended(id);
        }
        if confirm {
            ctx.confirm_end(id, conversation, reason);
        }
        return true;
    }
    if let EventKind::Message { message_id, .. } = &ev.kind {
        let (journal, session, message) = (ctx.journal.clone(), id.to_string(), message_id.clone());
        ev = ev.after_write(AfterWrite::new(move || {
            journal.progress(&session, &message)
        }));
    }
    ctx.emitter.emit(ev).await;
    true
}

#[cfg(test)]
mod size_tests {
    use super::*;
    #[tokio::test]
    /// An idle session's footprint is the point of guestd: keep the task's future and the actor
    /// small (see docs/design.md). These bounds fail if a change inlines something large again.
    async fn an_idle_session_stays_small() {
        let (em, _t) = crate::events::spawn_writer(crate::events::WriterSink(tokio::io::sink()), 4);
        let (ctx, _rx) = SessionCtx::for_test(
            Arc::new(crate::backends::guest_chat::api::testing::Stalled),
            em,
            Arc::new(crate::journal::NullJournal),
            1,
        );
        let chat = ChatRef {
            conversation_id: "c".into(),
            member_id: "m".into(),
            jwt: crate::secret::Secret::new("j"),
            event_stream_uri: "ws://127.0.0.1:1/x".into(),
        };
        let m = Machine::new(Timing::default(), "m", Instant::now());
        let rx = Arc::new(Mailbox::default());
        let a = Actor::new(Arc::new(ctx), "s".into(), chat, m);
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
    use std::sync::Mutex;
    use tokio::io::AsyncBufReadExt;

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
        let (ctx, _rx) = SessionCtx::for_test(
            Arc::new(crate::backends::guest_chat::api::testing::Stalled),
            emitter.clone(),
            marks.clone(),
            1,
        );
        for id in ["m1", "m2"] {
            assert!(emit(&ctx, "s", "c", message(id), false).await);
        }
        emit(&ctx, "s", "c", EventKind::Connected, false).await;
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
        let (mut ctx, done_rx) = SessionCtx::for_test(
            Arc::new(crate::daemon::guest_api(&cfg, &[]).unwrap()),
            emitter,
            Arc::new(Gate {
                seen: seen_tx,
                open,
            }),
            4,
        );
        ctx.timing = Arc::new(cfg.session.clone());
        let cancel = ctx.cancel.clone();
        let sup = crate::supervisor::Supervisor::spawn(ctx, done_rx, 4);
        let view = sup
            .start(crate::backends::guest_chat::api::StartSpec {
                queue: "Support".into(),
                display_name: "Ann".into(),
                ..Default::default()
            })
            .await
            .unwrap();
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
