//! What every session shares, whatever its backend: the handle and its commands
//! ([`handle`]), the context every session gets ([`ctx`]), the plumbing of a session's loop
//! ([`run`]), the fence of cluster mode ([`fence`]), and the seam every backend implements
//! ([`backend`]). Nothing here names a backend.

pub mod backend;
pub mod ctx;
pub mod fence;
pub mod handle;
pub mod run;

pub use backend::{Args, Backend, Backends, Launch, Open, OpenError, Spawn};
pub use ctx::SessionCtx;
pub use handle::{
    CommandError, Done, DoneReply, MAILBOX_LIMIT, Mailbox, Reopen, SessionCmd, SessionHandle,
    SessionView, wall_at,
};
