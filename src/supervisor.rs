//! The registry of sessions: who is live, the session limit, and the one place that turns a
//! `start`/`attach`/journal entry into a running session actor.
//!
//! The registry itself is a small actor (one task owning the maps), per the project's shape: no
//! shared `Mutex<HashMap>` of live state. Slow work (the create call, asking 10k sessions for
//! their view) happens outside it, in the caller's task.

use crate::command::OpenCmd;
use crate::events::{Emitter, Event, EventKind};
use crate::journal::{Recovered, SessionRecord};
use crate::session::{
    Backend, Backends, CommandError, Done, DoneReply, Launch, Open, OpenError, SessionCmd,
    SessionCtx, SessionHandle, SessionView, Spawn,
};
use crate::transport::policy::ApiError;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// Cluster mode: where commands run. `place` answers from what this node knows (the chat's
/// owner; for a new chat, the least-loaded live node); `forward` runs the command there.
pub trait Route: Send + Sync + 'static {
    /// The node that should run `cmd`, or None for this one.
    fn place<'a>(
        &'a self,
        cmd: &'a crate::command::Command,
    ) -> futures::future::BoxFuture<'a, Option<String>>;
    /// `node` did not get a command (no responders): a new chat goes elsewhere for a while.
    fn unreachable(&self, node: &str);
    /// The id of a new chat that runs on this node (None: any fresh id).
    fn session_id(&self) -> Option<String> {
        None
    }
    /// Whether the chat `cmd` names exists in the cluster (so "not found" means "moving").
    fn moving<'a>(
        &'a self,
        cmd: &'a crate::command::Command,
    ) -> futures::future::BoxFuture<'a, bool>;
    /// Run `cmd` on `node`; its reply as that node serialized it. The error code
    /// `no_responders` means nobody received it (safe to send again).
    fn forward(
        &self,
        node: String,
        cmd: &crate::command::Command,
    ) -> futures::future::BoxFuture<'static, Result<serde_json::Value, SupervisorError>>;
}

/// Why a supervisor operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// No live session by that id or conversation id.
    #[error("no live session {0}")]
    NotFound(String),
    /// The session limit is reached.
    #[error("session limit reached ({0})")]
    Full(usize),
    /// That conversation already has a session.
    #[error("conversation {0} is already supervised by session {1}")]
    AlreadyAttached(String, String),
    /// The backend refused.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The session ended while the command was on its way.
    #[error("{0}")]
    Ended(String),
    /// The session has a full backlog of commands.
    #[error("{0}")]
    Busy(String),
    /// The command's arguments were wrong.
    #[error("{0}")]
    Invalid(String),
    /// guestd is shutting down.
    #[error("guestd is shutting down")]
    ShuttingDown,
    /// The session's record could not be made durable (a full or failing disk).
    #[error("the session journal refused the record: {0}")]
    Journal(String),
    /// Cluster mode: the chat is moving to another node; retry.
    #[error("{0}")]
    Moved(String),
    /// Web Messaging: the session is read-only.
    #[error("{0}")]
    ReadOnly(String),
    /// Web Messaging: the platform refused the message or did not confirm it.
    #[error("{0}")]
    Refused(String),
    /// Web Messaging: the session is reconnecting; retry.
    #[error("{0}")]
    NotConnected(String),
    /// Cluster mode: the node that ran the command refused it (its code and message), or could
    /// not be reached (`unreachable`).
    #[error("{1}")]
    Remote(&'static str, String),
}

impl From<crate::platform::status::StatusError> for SupervisorError {
    fn from(e: crate::platform::status::StatusError) -> Self {
        match e {
            crate::platform::status::StatusError::Invalid(m) => SupervisorError::Invalid(m),
            crate::platform::status::StatusError::Api(a) => SupervisorError::Api(a),
        }
    }
}

impl From<OpenError> for SupervisorError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Invalid(m) => SupervisorError::Invalid(m),
            OpenError::Api(a) => SupervisorError::Api(a),
        }
    }
}

/// The codes [`SupervisorError::code`] gives, for errors that travel between nodes.
pub const CODES: &[&str] = &[
    "not_found",
    "full",
    "conflict",
    "unauthorized",
    "rate_limited",
    "backend_error",
    "ended",
    "busy",
    "invalid",
    "shutting_down",
    "journal",
    "moved",
    "unreachable",
    "no_responders",
    "read_only",
    "refused",
    "not_connected",
    "not_configured",
];

/// A code received from another node, as one of [`CODES`] (`backend_error` if unknown).
pub fn static_code(code: &str) -> &'static str {
    CODES
        .iter()
        .find(|c| **c == code)
        .copied()
        .unwrap_or("backend_error")
}

impl SupervisorError {
    /// A short machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            SupervisorError::NotFound(_) => "not_found",
            SupervisorError::Full(_) => "full",
            SupervisorError::AlreadyAttached(..) => "conflict",
            SupervisorError::Api(ApiError::Unauthorized(_)) => "unauthorized",
            SupervisorError::Api(ApiError::RateLimited(_)) => "rate_limited",
            SupervisorError::Api(ApiError::NotConfigured(_)) => "not_configured",
            SupervisorError::Api(_) => "backend_error",
            SupervisorError::Ended(_) => "ended",
            SupervisorError::Busy(_) => "busy",
            SupervisorError::Invalid(_) => "invalid",
            SupervisorError::ShuttingDown => "shutting_down",
            SupervisorError::Journal(_) => "journal",
            SupervisorError::Moved(_) => "moved",
            SupervisorError::ReadOnly(_) => "read_only",
            SupervisorError::Refused(_) => "refused",
            SupervisorError::NotConnected(_) => "not_connected",
            SupervisorError::Remote(code, _) => code,
        }
    }
}

/// Whether a reservation counts against `max_sessions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    /// A new chat: refused when the limit is reached.
    Enforced,
    /// A chat from the journal: guestd already answers for it, so it is picked up even past the
    /// limit (new chats are refused until the count is back under it).
    Exceeded,
}

enum Cmd {
    /// Hold a slot, and the conversation when it is known (attach, resume): one atomic step, so
    /// two attaches of one conversation cannot both pass.
    Reserve(
        Option<Arc<str>>,
        Limit,
        oneshot::Sender<Result<(), SupervisorError>>,
    ),
    /// The reservation travels with its session: the registry disarms it on receipt, so a
    /// caller dropped at any `.await` can neither leak the slot nor release it twice.
    Register(
        SessionHandle,
        Reservation,
        oneshot::Sender<Result<(), SupervisorError>>,
    ),
    Lookup(String, oneshot::Sender<Option<SessionHandle>>),
    List(oneshot::Sender<Vec<SessionHandle>>),
}

/// A slot held in the registry for a session being set up. Dropped anywhere before the registry
/// takes it (a failed create, a caller whose future was dropped at an `.await`), it gives the
/// slot and its conversation back.
struct Reservation {
    release: mpsc::UnboundedSender<Option<Arc<str>>>,
    conversation: Option<Arc<str>>,
    armed: bool,
}

impl Reservation {
    /// The registry has taken over the slot.
    fn disarm(mut self) -> Option<Arc<str>> {
        self.armed = false;
        self.conversation.take()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.armed {
            // Unbounded, so a drop never waits and is never lost.
            let _ = self.release.send(self.conversation.take());
        }
    }
}

/// A cheap handle to the registry.
#[derive(Clone)]
pub struct Supervisor {
    tx: mpsc::Sender<Cmd>,
    release: mpsc::UnboundedSender<Option<Arc<str>>>,
    ctx: Arc<SessionCtx>,
    backends: Backends,
    live: watch::Receiver<usize>,
    accepting: watch::Receiver<bool>,
    stop_accepting: Arc<watch::Sender<bool>>,
    router: Arc<std::sync::OnceLock<Arc<dyn Route>>>,
    ends: Arc<std::sync::OnceLock<Arc<crate::ends::Ends>>>,
    platform: Arc<std::sync::OnceLock<crate::platform::api::Platform>>,
}

fn new_session_id() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("s-{}", &u[..12])
}

impl Supervisor {
    /// Start the registry. `ctx.done` must be the sender whose receiver is `done_rx`.
    pub fn spawn(
        ctx: SessionCtx,
        done_rx: mpsc::UnboundedReceiver<String>,
        max_sessions: usize,
        backends: Backends,
    ) -> Supervisor {
        let (tx, rx) = mpsc::channel(1024);
        let (release, release_rx) = mpsc::unbounded_channel();
        let (live_tx, live) = watch::channel(0usize);
        let (stop_accepting, accepting) = watch::channel(true);
        tokio::spawn(registry(rx, release_rx, done_rx, max_sessions, live_tx));
        Supervisor {
            tx,
            release,
            ctx: Arc::new(ctx),
            backends,
            live,
            accepting,
            stop_accepting: Arc::new(stop_accepting),
            router: Default::default(),
            ends: Default::default(),
            platform: Default::default(),
        }
    }

    /// Cluster mode: where commands go when this node is not the one to run them.
    pub fn set_router(&self, router: Arc<dyn Route>) {
        let _ = self.router.set(router);
    }

    /// Where the ends guestd reported are remembered, for `status`.
    pub fn set_ends(&self, ends: Arc<crate::ends::Ends>) {
        let _ = self.ends.set(ends);
    }

    /// The remembered ends, when set.
    pub fn ends(&self) -> Option<&Arc<crate::ends::Ends>> {
        self.ends.get()
    }

    /// The router, in cluster mode.
    pub fn router(&self) -> Option<&Arc<dyn Route>> {
        self.router.get()
    }

    /// Stop acting for a session without ending it (cluster mode: another node takes it).
    pub async fn relinquish(&self, key: &str) {
        if let Some(h) = self.lookup(key).await {
            let _ = h.send(SessionCmd::Relinquish).await;
        }
    }

    /// Stop acting for every session (cluster mode: this node is fenced).
    pub async fn relinquish_all(&self) {
        let handles = self.ask(Cmd::List).await.unwrap_or_default();
        for h in handles {
            let _ = h.send(SessionCmd::Relinquish).await;
        }
    }

    /// Whether a session (by session id) runs here.
    pub async fn runs(&self, session: &str) -> bool {
        self.lookup(session).await.is_some()
    }

    /// The backends.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// The Platform API, for `status`, when configured.
    pub fn set_platform(&self, platform: crate::platform::api::Platform) {
        let _ = self.platform.set(platform);
    }

    /// The Platform API, when configured.
    pub fn platform(&self) -> Option<&crate::platform::api::PlatformApi> {
        self.platform.get().map(|p| p.as_ref())
    }

    /// The event emitter.
    pub fn emitter(&self) -> &Emitter {
        &self.ctx.emitter
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Cmd,
    ) -> Result<T, SupervisorError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| SupervisorError::ShuttingDown)?;
        rx.await.map_err(|_| SupervisorError::ShuttingDown)
    }

    /// Live sessions now.
    pub fn live(&self) -> usize {
        *self.live.borrow()
    }

    /// Whether the journal's last sync worked.
    pub fn journal_ok(&self) -> bool {
        self.ctx.journal.healthy()
    }

    /// Whether new sessions are accepted.
    pub fn accepting(&self) -> bool {
        *self.accepting.borrow()
    }

    /// Refuse new sessions from now on (shutdown).
    pub fn stop_accepting(&self) {
        let _ = self.stop_accepting.send(false);
    }

    /// Wait until no session is live.
    pub async fn wait_empty(&self) {
        let mut live = self.live.clone();
        let _ = live.wait_for(|n| *n == 0).await;
    }

    /// Check a `start`/`attach` and fill in what its backend's configuration supplies; sets
    /// its key when known (run where the command is read, before it is routed).
    pub fn prepare(&self, cmd: &mut OpenCmd) -> Result<(), SupervisorError> {
        let backend = self.backend_of(cmd)?;
        cmd.key = backend
            .prepare(&self.ctx, cmd.open, &mut cmd.args)
            .map_err(SupervisorError::Invalid)?;
        Ok(())
    }

    /// The backend `cmd` names; an unknown one is refused with the command's name
    /// (`start: unknown backend "x" (guest_chat or web_messaging)`).
    fn backend_of(&self, cmd: &OpenCmd) -> Result<&Arc<dyn Backend>, SupervisorError> {
        self.backends
            .get(cmd.backend.as_deref())
            .map_err(|e| SupervisorError::Invalid(format!("{}: {e}", cmd.open.name())))
    }

    /// Open a chat with its backend (`start`, `attach`) and supervise it.
    pub async fn open(&self, mut cmd: OpenCmd) -> Result<SessionView, SupervisorError> {
        // Again, here: a command from stdin was prepared where it was read, one from HTTP or
        // another node was not (and preparing twice changes nothing).
        self.prepare(&mut cmd)?;
        let backend = self.backend_of(&cmd)?.clone();
        let slot = self
            .reserve(cmd.key.map(Into::into), Limit::Enforced)
            .await?;
        let launch = backend.open(&self.ctx, cmd.open, cmd.args).await?;
        self.launch(backend.name(), launch, slot, cmd.open.name())
            .await
    }

    /// Hold a slot (and the conversation, when known) until the session is registered.
    async fn reserve(
        &self,
        conversation: Option<Arc<str>>,
        limit: Limit,
    ) -> Result<Reservation, SupervisorError> {
        if !self.accepting() {
            return Err(SupervisorError::ShuttingDown);
        }
        self.ask(|tx| Cmd::Reserve(conversation.clone(), limit, tx))
            .await??;
        Ok(Reservation {
            release: self.release.clone(),
            conversation,
            armed: true,
        })
    }

    /// Record a new session durably, then run it.
    async fn launch(
        &self,
        backend: &'static str,
        launch: Launch,
        slot: Reservation,
        mode: &str,
    ) -> Result<SessionView, SupervisorError> {
        let id = self
            .router()
            .and_then(|r| r.session_id())
            .unwrap_or_else(new_session_id);
        let recorded = self
            .ctx
            .journal
            .session_started(SessionRecord {
                session: id.clone(),
                started_ms: chrono::Utc::now().timestamp_millis(),
                mode: mode.to_string(),
                backend: backend.to_string(),
                conversation_id: launch.conversation_id.clone(),
                state: launch.record,
            })
            .await;
        if let Err(e) = recorded {
            // Unsupervised after a restart is not a chat guestd may take on.
            if let Some(abandon) = launch.abandon {
                tokio::spawn(abandon);
            }
            return Err(SupervisorError::Journal(e.0));
        }
        self.run(
            id,
            &launch.conversation_id,
            &launch.member_id,
            launch.spawn,
            slot,
            mode,
        )
        .await
    }

    /// Announce a session, spawn it, and hand its slot to the registry.
    async fn run(
        &self,
        id: String,
        conversation_id: &str,
        member_id: &str,
        spawn: Spawn,
        slot: Reservation,
        mode: &str,
    ) -> Result<SessionView, SupervisorError> {
        // `session_started` goes out before the session's actor can emit anything.
        self.ctx
            .emitter
            .emit(Event::new(
                &id,
                Some(conversation_id),
                EventKind::SessionStarted {
                    mode: mode.to_string(),
                    member_id: member_id.to_string(),
                },
            ))
            .await;
        let (handle, view) = spawn(self.ctx.clone(), id);
        self.ask(|tx| Cmd::Register(handle, slot, tx)).await??;
        Ok(view)
    }

    /// Close the session of `key` and begin a new one on the same credential (Web Messaging's
    /// `start_new`: `closeSession`, then `configureSession{startNew: true}`); the new
    /// session's view.
    pub async fn start_new(&self, key: &str) -> Result<SessionView, SupervisorError> {
        let h = self.handle(key).await?;
        let (tx, rx) = oneshot::channel();
        h.send(SessionCmd::StartNew { reply: tx })
            .await
            .map_err(Self::refused)?;
        let reopen = rx
            .await
            .map_err(|_| SupervisorError::Ended(format!("session {key} has ended")))?
            .map_err(Self::refused)?;
        // The old session's slot and key are free once its task is done.
        h.finished().await;
        self.open(OpenCmd {
            open: Open::Start,
            backend: Some(reopen.backend.to_string()),
            args: reopen.args,
            key: None,
        })
        .await
    }

    /// Pick up a session found in the journal after a restart.
    pub async fn resume(&self, r: Recovered) -> Result<(), SupervisorError> {
        let id = r.record.session.clone();
        let conv = r.record.conversation_id.clone();
        let backend = self
            .backends
            .of_record(&r.record)
            .map_err(SupervisorError::from)
            .cloned();
        if let Some(ending) = r.ending {
            // Decided before the crash but maybe never written: write it again, same event_id.
            let mut ev = Event::new(
                &id,
                Some(&conv),
                EventKind::Ended {
                    reason: ending.reason,
                    duration_ms: ending.duration_ms,
                    detail: ending.detail,
                    extra: ending.extra,
                },
            );
            ev.ts = ending.ts;
            ev.event_id = Some(ending.event_id);
            if self.ctx.emitter.emit_flushed(ev).await {
                self.ctx.journal.ended(&id);
            }
            // Ended while guestd was down: accounted for the same way as a live end (by its
            // backend, if it is still registered: the end itself is written whatever it is).
            if let Ok(b) = &backend {
                b.ended_while_down(&self.ctx, &id, &conv, ending.reason);
            }
            return Ok(());
        }
        let backend = backend?;
        let slot = self
            .reserve(Some(conv.as_str().into()), Limit::Exceeded)
            .await?;
        let launch = backend.resume(&self.ctx, r).await?;
        self.run(id, &conv, &launch.member_id, launch.spawn, slot, "resume")
            .await
            .map(|_| ())
    }

    /// Find a live session by session id or conversation id.
    pub async fn lookup(&self, key: &str) -> Option<SessionHandle> {
        self.ask(|tx| Cmd::Lookup(key.to_string(), tx))
            .await
            .ok()
            .flatten()
    }

    /// The one place a session's refusal becomes a supervisor error.
    fn refused(e: CommandError) -> SupervisorError {
        match e {
            CommandError::Ended(_) => SupervisorError::Ended(e.to_string()),
            CommandError::Busy(_) => SupervisorError::Busy(e.to_string()),
            CommandError::Api(a) => SupervisorError::Api(a),
            CommandError::Journal(j) => SupervisorError::Journal(j),
            CommandError::Moved(_) => SupervisorError::Moved(e.to_string()),
            CommandError::ReadOnly(_) => SupervisorError::ReadOnly(e.to_string()),
            CommandError::Refused(_) => SupervisorError::Refused(e.to_string()),
            CommandError::NotLive(_) => SupervisorError::NotConnected(e.to_string()),
            CommandError::Unsupported(_) | CommandError::Invalid(_) => {
                SupervisorError::Invalid(e.to_string())
            }
        }
    }

    async fn handle(&self, key: &str) -> Result<SessionHandle, SupervisorError> {
        self.lookup(key)
            .await
            .ok_or_else(|| SupervisorError::NotFound(key.to_string()))
    }

    /// One session's view.
    pub async fn get(&self, key: &str) -> Result<SessionView, SupervisorError> {
        self.handle(key).await?.view().await.map_err(Self::refused)
    }

    /// Every live session's view.
    pub async fn list(&self) -> Vec<SessionView> {
        let handles = self.ask(Cmd::List).await.unwrap_or_default();
        let views = futures::future::join_all(handles.iter().map(|h| h.view())).await;
        let mut v: Vec<_> = views.into_iter().filter_map(Result::ok).collect();
        v.sort_by(|a, b| a.session.cmp(&b.session));
        v
    }

    async fn command(
        &self,
        key: &str,
        make: impl FnOnce(DoneReply) -> SessionCmd,
    ) -> Result<Done, SupervisorError> {
        let h = self.handle(key).await?;
        let (tx, rx) = oneshot::channel();
        h.send(make(tx)).await.map_err(Self::refused)?;
        rx.await
            .map_err(|_| SupervisorError::Ended(format!("session {key} has ended")))?
            .map_err(Self::refused)
    }

    /// Send a message as the guest.
    pub async fn send_message(&self, key: &str, body: String) -> Result<Done, SupervisorError> {
        if body.is_empty() {
            return Err(SupervisorError::Invalid(
                "send needs a non-empty body".into(),
            ));
        }
        // Its length is the backend's to judge (its session refuses one too long); one longer
        // than any backend takes is refused here, before the session is looked for.
        let chars = body.chars().count();
        if let Some(max) = self
            .backends
            .all()
            .filter_map(|b| b.max_message_chars())
            .max()
        {
            if chars > max {
                return Err(SupervisorError::Invalid(format!(
                    "send: the body has {chars} characters; the platform takes at most {max}"
                )));
            }
        }
        self.command(key, |reply| SessionCmd::Send { body, reply })
            .await
    }

    /// Send a typing indicator as the guest.
    pub async fn send_typing(&self, key: &str) -> Result<Done, SupervisorError> {
        self.command(key, |reply| SessionCmd::Typing { reply })
            .await
    }

    /// Make the guest leave; the `ended` event follows.
    pub async fn leave(&self, key: &str) -> Result<Done, SupervisorError> {
        self.command(key, |reply| SessionCmd::Leave { reply }).await
    }
}

async fn registry(
    mut rx: mpsc::Receiver<Cmd>,
    mut release_rx: mpsc::UnboundedReceiver<Option<Arc<str>>>,
    mut done_rx: mpsc::UnboundedReceiver<String>,
    max: usize,
    live_tx: watch::Sender<usize>,
) {
    let mut by_id: HashMap<Arc<str>, SessionHandle> = HashMap::new();
    let mut by_conv: HashMap<Arc<str>, Arc<str>> = HashMap::new();
    // Slots held by sessions being set up, and the conversations among them.
    let mut reserved = 0usize;
    let mut reserved_convs: HashSet<Arc<str>> = HashSet::new();
    loop {
        tokio::select! {
            // Releases first: a slot given back before a new request is free for it.
            biased;
            Some(conv) = release_rx.recv() => {
                reserved = reserved.saturating_sub(1);
                if let Some(c) = conv {
                    reserved_convs.remove(&c);
                }
            }
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                match cmd {
                    Cmd::Reserve(conv, limit, reply) => {
                        // A session whose task has finished does not hold its conversation, even
                        // before its `done` is read (start_new reopens the same key at once).
                        if let Some(c) = &conv {
                            let closed = by_conv
                                .get(c)
                                .and_then(|id| by_id.get(id))
                                .is_some_and(|h| h.is_closed());
                            if closed {
                                if let Some(id) = by_conv.remove(c) {
                                    by_id.remove(&id);
                                }
                            }
                        }
                        let taken = conv.as_ref().and_then(|c| {
                            by_conv
                                .get(c)
                                .map(|s| s.to_string())
                                .or_else(|| reserved_convs.contains(c).then(|| "(being set up)".to_string()))
                                .map(|s| (c.to_string(), s))
                        });
                        if let Some((c, s)) = taken {
                            let _ = reply.send(Err(SupervisorError::AlreadyAttached(c, s)));
                        } else if by_id.len() + reserved >= max && limit == Limit::Enforced {
                            let _ = reply.send(Err(SupervisorError::Full(max)));
                        } else {
                            reserved += 1;
                            if let Some(c) = conv {
                                reserved_convs.insert(c);
                            }
                            let _ = reply.send(Ok(()));
                        }
                    }
                    Cmd::Register(h, slot, reply) => {
                        reserved = reserved.saturating_sub(1);
                        if let Some(c) = slot.disarm() {
                            reserved_convs.remove(&c);
                        }
                        // A session that already finished has sent its `done`, maybe before this.
                        if h.is_closed() {
                            let _ = reply.send(Ok(()));
                            let _ = live_tx.send(by_id.len() + reserved);
                            continue;
                        }
                        by_conv.insert(h.conversation_id.clone(), h.id.clone());
                        by_id.insert(h.id.clone(), h);
                        let _ = reply.send(Ok(()));
                    }
                    Cmd::Lookup(key, reply) => {
                        let h = by_id
                            .get(key.as_str())
                            .or_else(|| by_conv.get(key.as_str()).and_then(|id| by_id.get(id)))
                            .cloned();
                        let _ = reply.send(h);
                    }
                    Cmd::List(reply) => {
                        let _ = reply.send(by_id.values().cloned().collect());
                    }
                }
            }
            Some(id) = done_rx.recv() => {
                crate::heap::churn();
                if let Some(h) = by_id.remove(id.as_str()) {
                    by_conv.remove(&h.conversation_id);
                }
            }
        }
        let _ = live_tx.send(by_id.len() + reserved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::guest_chat::api::testing::Stalled;
    use tokio_util::sync::CancellationToken;

    use std::time::Duration;

    fn supervisor(max: usize) -> (Supervisor, CancellationToken) {
        supervisor_with(max, Arc::new(crate::journal::NullJournal))
    }

    fn supervisor_with(
        max: usize,
        journal: Arc<dyn crate::journal::Journal>,
    ) -> (Supervisor, CancellationToken) {
        let (emitter, _writer) =
            crate::events::spawn_writer(crate::events::WriterSink(tokio::io::sink()), 64);
        let (ctx, done_rx) = SessionCtx::for_test(emitter, journal, 4);
        let cancel = ctx.cancel.clone();
        let backends = crate::backends::guest_chat::backend::only(
            Arc::new(Stalled),
            crate::backends::guest_chat::Timing::default(),
        );
        (Supervisor::spawn(ctx, done_rx, max, backends), cancel)
    }

    fn open(open: Open, args: serde_json::Value) -> OpenCmd {
        let serde_json::Value::Object(args) = args else {
            panic!("arguments are an object");
        };
        OpenCmd {
            open,
            backend: None,
            args: crate::session::Args(args),
            key: None,
        }
    }

    fn chat_json(conv: &str) -> serde_json::Value {
        serde_json::json!({
            "conversation_id": conv,
            "member_id": "m",
            "jwt": "j",
            "event_stream_uri": "ws://127.0.0.1:9/x",
        })
    }

    fn chat(conv: &str) -> OpenCmd {
        open(Open::Attach, chat_json(conv))
    }

    fn spec() -> OpenCmd {
        open(
            Open::Start,
            serde_json::json!({"queue": "Support", "display_name": "Ann"}),
        )
    }

    /// A `start` whose caller goes away mid-create (an HTTP client that hangs up) gives its slot
    /// back; it used to keep it for good, until the limit refused every new chat.
    #[tokio::test]
    async fn a_start_dropped_mid_create_gives_its_slot_back() {
        let (sup, cancel) = supervisor(1);
        let r = tokio::time::timeout(Duration::from_millis(20), sup.open(spec())).await;
        assert!(r.is_err(), "create never answers; the caller gives up");
        let mut live = sup.live.clone();
        let _ = tokio::time::timeout(Duration::from_secs(5), live.wait_for(|n| *n == 0)).await;
        assert_eq!(sup.live(), 0);
        sup.open(chat("c1")).await.expect("the one slot is free");
        assert!(matches!(
            sup.open(chat("c2")).await,
            Err(SupervisorError::Full(1))
        ));
        cancel.cancel();
    }

    /// A journal whose disk is full.
    struct FullDisk;

    impl crate::journal::Journal for FullDisk {
        fn session_started(&self, _: SessionRecord) -> crate::journal::Durable {
            Box::pin(async { Err(crate::journal::NotDurable("No space left on device".into())) })
        }
        fn progress(&self, _: &str, _: &str) {}
        fn activity(&self, _: &str, _: crate::journal::Activity) {}
        fn ending(&self, _: &str, _: crate::journal::EndingRecord) -> crate::journal::Durable {
            Box::pin(async { Err(crate::journal::NotDurable("full".into())) })
        }
        fn leaving(&self, _: &str) -> crate::journal::Durable {
            Box::pin(async { Err(crate::journal::NotDurable("full".into())) })
        }
        fn ended(&self, _: &str) {}
        fn sync(&self) -> crate::journal::Durable {
            Box::pin(async { Err(crate::journal::NotDurable("full".into())) })
        }
        fn healthy(&self) -> bool {
            false
        }
    }

    /// A session whose record cannot be made durable is not started: the command fails with the
    /// journal's reason and holds no slot.
    #[tokio::test]
    async fn a_record_that_cannot_be_made_durable_fails_the_command() {
        let (sup, cancel) = supervisor_with(1, Arc::new(FullDisk));
        for conv in ["c1", "c2"] {
            let e = sup.open(chat(conv)).await.unwrap_err();
            assert!(
                matches!(e, SupervisorError::Journal(ref m) if m.contains("No space")),
                "{e}"
            );
        }
        assert!(sup.list().await.is_empty());
        assert!(!sup.journal_ok());
        cancel.cancel();
    }

    /// A journal holding more chats than `max_sessions`: every one is picked up (guestd already
    /// answers for them); new chats are refused while over the limit.
    #[tokio::test]
    async fn journaled_chats_are_resumed_past_the_limit() {
        let (sup, cancel) = supervisor(1);
        for conv in ["j1", "j2", "j3"] {
            let r = Recovered {
                record: SessionRecord {
                    session: format!("s-{conv}"),
                    started_ms: chrono::Utc::now().timestamp_millis(),
                    mode: "start".into(),
                    backend: "guest_chat".into(),
                    conversation_id: conv.into(),
                    state: serde_json::json!({ "chat": chat_json(conv) }),
                },
                last_message_id: None,
                last_alive_ms: 0,
                ending: None,
                leaving: false,
                activity: Default::default(),
            };
            sup.resume(r).await.unwrap();
        }
        assert_eq!(sup.list().await.len(), 3);
        assert!(matches!(
            sup.open(chat("new")).await,
            Err(SupervisorError::Full(1))
        ));
        cancel.cancel();
    }

    /// A body longer than every backend takes is refused as `invalid` before the session is
    /// looked for (as when the supervisor held the one limit), so an unknown session does not
    /// turn it into `not_found`.
    #[tokio::test]
    async fn a_body_too_long_for_every_backend_is_invalid_wherever_it_goes() {
        let (sup, cancel) = supervisor(1);
        let e = sup
            .send_message("nobody", "x".repeat(4001))
            .await
            .unwrap_err();
        assert!(
            matches!(e, SupervisorError::Invalid(ref m) if m.contains("4001 characters")),
            "{e}"
        );
        assert!(matches!(
            sup.send_message("nobody", "x".repeat(4000)).await,
            Err(SupervisorError::NotFound(_))
        ));
        cancel.cancel();
    }

    /// Twenty concurrent attaches of one conversation: one session, nineteen conflicts.
    #[tokio::test]
    async fn concurrent_attaches_of_one_conversation_admit_one() {
        let (sup, cancel) = supervisor(100);
        let results = futures::future::join_all((0..20).map(|_| sup.open(chat("same")))).await;
        let ok = results.iter().filter(|r| r.is_ok()).count();
        let conflicts = results
            .iter()
            .filter(|r| matches!(r, Err(SupervisorError::AlreadyAttached(..))))
            .count();
        assert_eq!((ok, conflicts), (1, 19), "{results:?}");
        // A different conversation is still welcome, and a failed attach held nothing.
        sup.open(chat("other")).await.unwrap();
        assert_eq!(sup.list().await.len(), 2);
        cancel.cancel();
    }
}
