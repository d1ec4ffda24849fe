//! What every session gets, whatever its backend.

use crate::events::Emitter;
use crate::journal::Journal;
use crate::transport::stream::Connector;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What every session shares: where its events and records go, how it opens sockets, when to
/// stop. A backend's own settings and clients live in the backend (`session::Backend`), not
/// here.
#[derive(Clone)]
pub struct SessionCtx {
    /// Opens streams (the URL policy, the connect limit, TLS).
    pub connector: Connector,
    /// Where events go.
    pub emitter: Emitter,
    /// Where sessions are recorded.
    pub journal: Arc<dyn Journal>,
    /// Told the session id when a session task finishes.
    pub done: mpsc::UnboundedSender<String>,
    /// Process shutdown.
    pub cancel: CancellationToken,
    /// On shutdown, leave the chats instead of only closing the sockets.
    pub leave_on_shutdown: bool,
    /// Cluster mode: whether this node may still act for the chats it took (see
    /// `super::fence::Fence`). None on a single node.
    pub fence: Option<super::fence::Fence>,
}

impl SessionCtx {
    /// A context for tests: one node, a connector for `connects` at once; `done` and `cancel`
    /// fresh (the caller may replace them).
    #[cfg(test)]
    pub(crate) fn for_test(
        emitter: Emitter,
        journal: Arc<dyn Journal>,
        connects: usize,
    ) -> (Self, mpsc::UnboundedReceiver<String>) {
        let (done, done_rx) = mpsc::unbounded_channel();
        let ctx = SessionCtx {
            connector: Connector::new(Default::default(), connects),
            emitter,
            journal,
            done,
            cancel: CancellationToken::new(),
            leave_on_shutdown: false,
            fence: None,
        };
        (ctx, done_rx)
    }

    /// Whether this process may still act for a chat it took in `epoch` (always, on a single
    /// node; see `super::fence::Fence`).
    pub fn may_act(&self, epoch: u64) -> bool {
        self.fence.as_ref().is_none_or(|f| f.acting(epoch))
    }

    /// The epoch this node holds new chats in (0 on a single node).
    pub fn epoch(&self) -> u64 {
        self.fence.as_ref().map_or(0, |f| f.epoch())
    }
}
