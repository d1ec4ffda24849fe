//! How the rest of guestd talks to a session, whatever its backend: the handle, its mailbox,
//! the commands a session answers, their replies and errors, and the session's view.

use super::backend::Args;
use crate::events::EndReason;
use crate::transport::policy::ApiError;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::time::Instant;

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
    /// The command's arguments do not fit this session's backend (a message too long).
    #[error("{0}")]
    Invalid(String),
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
    /// Close the session so a new one can begin on the same credential (Web Messaging's
    /// `start_new`); a backend without such a thing answers `Unsupported`.
    StartNew {
        /// Once it is closed, the arguments of the new session's `start` (secrets in them), or
        /// why not.
        reply: oneshot::Sender<Result<Reopen, CommandError>>,
    },
}

/// What a new session needs after `StartNew` closed the old one: a `start` of the same backend
/// with these arguments (the credential in them).
#[derive(Debug)]
pub struct Reopen {
    /// The backend's name.
    pub backend: &'static str,
    /// The new session's `start` arguments.
    pub args: Args,
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
    /// The backend's name (`Backend::name`).
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
    /// The view of a session that has seen nothing yet; a backend fills in what it knows.
    pub fn new(
        session: &str,
        conversation_id: &str,
        member_id: &str,
        state: &'static str,
        backend: &'static str,
    ) -> SessionView {
        SessionView {
            session: session.to_string(),
            conversation_id: conversation_id.to_string(),
            member_id: member_id.to_string(),
            state,
            agent_connected: false,
            last_message_id: None,
            ended: None,
            backend,
            read_only: false,
            agent_end_visible: None,
            expires_in_ms: None,
            ends_at: None,
            ends_because: None,
        }
    }

    /// With `ends` (when a machine says the platform ends the chat if nothing happens) as wall-clock `ends_at`/`ends_because`.
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
    pub async fn recv(&self) -> Box<SessionCmd> {
        loop {
            if let Some(c) = self.lock().pop_front() {
                return c;
            }
            self.notify.notified().await;
        }
    }

    /// Refuse new commands and drop the queued ones (their callers see the session ended).
    pub fn close(&self) {
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
    pub fn new(id: &str, conversation_id: &str) -> (SessionHandle, Arc<Mailbox>) {
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
