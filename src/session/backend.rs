//! The seam: what a backend is to the rest of guestd.
//!
//! A backend is one kind of chat guestd can supervise (Genesys guest chat, Web Messaging, a test
//! backend, another vendor's). The supervisor, the journal, control, the cluster and status
//! talk to it only through [`Backend`]; a backend talks to them only through the session layer
//! (`SessionCtx`, `SessionHandle`, the commands of `handle`, the plumbing of `run`). Adding one
//! is a folder under `backends/` and a line in the registry (docs/design.md, "Adding a
//! backend").
//!
//! The trait is small on purpose (one method that matters per moment of a chat's life):
//!
//! - [`Backend::prepare`]: check a `start`/`attach`'s arguments and fill what the configuration
//!   supplies, so every node routes and runs it alike; the chat's key when it is known before
//!   opening;
//! - [`Backend::open`]: open the chat (create it, or take over the caller's) and say how to run
//!   it ([`Launch`]);
//! - [`Backend::resume`]: the same from the backend's own journal record, after a restart or a
//!   takeover.
//!
//! Everything else has a default. Commands to a live session go through its
//! [`SessionHandle`](super::SessionHandle) and the backend's actor answers them, refusing with
//! `CommandError::Unsupported` what its kind of chat has no use for.

use super::ctx::SessionCtx;
use super::handle::{SessionHandle, SessionView};
use crate::events::EndReason;
use crate::journal::Recovered;
use crate::secret::Secret;
use crate::transport::policy::ApiError;
use futures::future::BoxFuture;
use std::sync::Arc;

/// `start` (open a new chat) or `attach` (take over one the caller opened).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// A new chat.
    Start,
    /// A chat the caller opened.
    Attach,
}

impl Open {
    /// The command's name.
    pub fn name(self) -> &'static str {
        match self {
            Open::Start => "start",
            Open::Attach => "attach",
        }
    }
}

/// A `start`/`attach`'s arguments as JSON, less `cmd`, `backend` and `request_id`: each backend
/// parses its own. `Debug` shows the keys only (an `attach` carries a credential).
#[derive(Clone, Default, PartialEq)]
pub struct Args(pub serde_json::Map<String, serde_json::Value>);

impl std::fmt::Debug for Args {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Args {
    /// The arguments as a typed value, with serde's message prefixed by the command's name
    /// (`start: missing field "queue"`).
    pub fn parse<T: serde::de::DeserializeOwned>(&self, open: Open) -> Result<T, String> {
        serde_json::from_value(serde_json::Value::Object(self.0.clone()))
            .map_err(|e| format!("{}: {e}", open.name()))
    }

    /// Arguments from a typed value (a backend writing back what it filled in).
    pub fn of<T: serde::Serialize>(v: &T) -> Args {
        match serde_json::to_value(v) {
            Ok(serde_json::Value::Object(m)) => Args(m),
            _ => Args::default(),
        }
    }
}

/// Why a backend could not open or resume a chat.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The arguments (or the record) were wrong, or the backend is not configured for them.
    #[error("{0}")]
    Invalid(String),
    /// The platform refused or failed a call.
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// How to run a session, once the supervisor has made its record durable and written its
/// `session_started`: the view the caller gets back, and the session's task.
pub type Spawn = Box<dyn FnOnce(Arc<SessionCtx>, String) -> (SessionHandle, SessionView) + Send>;

/// What opening (or resuming) a chat gives the supervisor.
pub struct Launch {
    /// The chat's key: what commands, `status` and the cluster name it by (the platform's
    /// conversation id, or a key the backend derives when the guest side has none).
    pub conversation_id: String,
    /// The guest's member id, as `session_started` reports it.
    pub member_id: String,
    /// The backend's part of the journal record: whatever [`Backend::resume`] needs, secrets
    /// included (the journal file is 0600; a cluster entry rests sealed whole).
    pub record: serde_json::Value,
    /// Runs the session: given the context and the session id.
    pub spawn: Spawn,
    /// Undoes what opening did, when the record cannot be made durable (a chat guestd created
    /// itself is left, so nothing is orphaned on the platform).
    pub abandon: Option<BoxFuture<'static, ()>>,
}

/// One kind of chat guestd can supervise. See the module doc.
pub trait Backend: Send + Sync + 'static {
    /// The name commands (`"backend": ...`), the journal and events use.
    fn name(&self) -> &'static str;

    /// Check a `start`/`attach`'s arguments and fill in what the configuration supplies (run
    /// once, where the command is read, before it is routed; running it again on what it
    /// filled changes nothing). The chat's key when it is known before opening: an `attach` is
    /// routed to the chat's owner by it, and one chat has one session.
    fn prepare(
        &self,
        ctx: &SessionCtx,
        open: Open,
        args: &mut Args,
    ) -> Result<Option<String>, String>;

    /// Open the chat: create it (`start`) or check what the caller gave (`attach`).
    fn open(
        &self,
        ctx: &Arc<SessionCtx>,
        open: Open,
        args: Args,
    ) -> BoxFuture<'static, Result<Launch, OpenError>>;

    /// Pick a chat back up from its journal record (`r.record.state` is this backend's own).
    fn resume(
        &self,
        ctx: &Arc<SessionCtx>,
        r: Recovered,
    ) -> BoxFuture<'static, Result<Launch, OpenError>>;

    /// An end found decided in the journal at a restart was written again: a backend that asks
    /// its platform for an account of each end does it here too.
    fn ended_while_down(
        &self,
        _ctx: &SessionCtx,
        _session: &str,
        _conversation_id: &str,
        _reason: EndReason,
    ) {
    }

    /// Whether a journal record written before records named their backend is this backend's.
    fn claims_legacy(&self, _state: &serde_json::Value) -> bool {
        false
    }

    /// The most characters a message body may have, when the backend has one limit for all its
    /// chats (the supervisor refuses a longer body before it looks for the session; the
    /// session checks again).
    fn max_message_chars(&self) -> Option<usize> {
        None
    }

    /// `status` for a chat guestd does not hold, from the chat's own credential: whether it is
    /// still alive. None: this backend cannot tell that way.
    fn alive_by_credential(
        &self,
        _conversation_id: &str,
        _secret: Secret,
    ) -> Option<BoxFuture<'static, Result<bool, ApiError>>> {
        None
    }
}

/// The backends a supervisor opens chats with, by name; the first is the default (a command
/// that names none). Built in one place (`crate::backends::registry`); held by the supervisor
/// and read by `status`.
#[derive(Clone, Default)]
pub struct Backends(Vec<Arc<dyn Backend>>);

impl Backends {
    /// These backends, the first the default; a later one of a name already taken is dropped.
    pub fn new(list: Vec<Arc<dyn Backend>>) -> Backends {
        let mut out: Vec<Arc<dyn Backend>> = Vec::new();
        for b in list {
            if out.iter().all(|o| o.name() != b.name()) {
                out.push(b);
            }
        }
        Backends(out)
    }

    /// The backend called `name` (the default for None).
    pub fn get(&self, name: Option<&str>) -> Result<&Arc<dyn Backend>, OpenError> {
        let found = match name {
            None => self.0.first(),
            Some(n) => self.0.iter().find(|b| b.name() == n),
        };
        found.ok_or_else(|| {
            OpenError::Invalid(match name {
                Some(n) => format!("unknown backend {n:?} ({})", self.names().join(" or ")),
                None => "no backend is configured".into(),
            })
        })
    }

    /// Every backend's name, the default first.
    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|b| b.name()).collect()
    }

    /// Every backend.
    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Backend>> {
        self.0.iter()
    }

    /// The backend a journal record belongs to: the one it names, or for a record from before
    /// records named their backend, the one that claims it.
    pub fn of_record(
        &self,
        rec: &crate::journal::SessionRecord,
    ) -> Result<&Arc<dyn Backend>, OpenError> {
        if !rec.backend.is_empty() {
            return self.get(Some(&rec.backend));
        }
        self.0
            .iter()
            .find(|b| b.claims_legacy(&rec.state))
            .ok_or_else(|| {
                OpenError::Invalid(format!(
                    "no backend claims the journaled session {}",
                    rec.session
                ))
            })
    }
}
