//! Whether this node may still act for the chats it took: the fence every session reads before
//! anything with an effect. Set by the cluster's node task (`crate::cluster::node`); absent on a
//! single node. Here, beside the sessions that read it, so a session needs nothing of the
//! cluster.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Whether this node may act for chats it took in `epoch`: set by the node task after each
/// acknowledged renewal, read by every session before anything with an effect (REST calls,
/// `leave`, `ended`). Time-based, so it holds even if the node task is late.
#[derive(Clone, Debug)]
pub struct Fence(Arc<FenceState>);

#[derive(Debug)]
struct FenceState {
    base: Instant,
    epoch: AtomicU64,
    /// ms after `base`.
    until: AtomicU64,
    /// Closed for good (the node left): nothing makes it act again.
    closed: AtomicBool,
}

impl Default for Fence {
    fn default() -> Self {
        Fence(Arc::new(FenceState {
            base: Instant::now(),
            epoch: AtomicU64::new(0),
            until: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }))
    }
}

impl Fence {
    /// The current epoch (0 before the first join).
    pub fn epoch(&self) -> u64 {
        self.0.epoch.load(Ordering::Acquire)
    }

    /// Whether a chat taken in `epoch` may be acted for now.
    pub fn acting(&self, epoch: u64) -> bool {
        let until = self.0.until.load(Ordering::Acquire);
        let now = Instant::now()
            .saturating_duration_since(self.0.base)
            .as_millis() as u64;
        self.epoch() == epoch && epoch != 0 && now < until
    }

    /// When acting stops, if it has not.
    pub fn until(&self) -> Option<Instant> {
        let until = self.0.until.load(Ordering::Acquire);
        let at = self.0.base + Duration::from_millis(until);
        (at > Instant::now()).then_some(at)
    }

    /// A renewal sent at some point was acknowledged: act until `until`, unless acting has
    /// already stopped (an acknowledgement that comes back after the fence cannot revive the
    /// epoch: other nodes may have counted this one dead and taken its chats). False then.
    pub(crate) fn renewed(&self, epoch: u64, until: Instant) -> bool {
        let ms = until.saturating_duration_since(self.0.base).as_millis() as u64;
        let now = Instant::now()
            .saturating_duration_since(self.0.base)
            .as_millis() as u64;
        if self.epoch() != epoch {
            return false;
        }
        let mut cur = self.0.until.load(Ordering::Acquire);
        loop {
            if now >= cur {
                return false;
            }
            if ms <= cur {
                return true;
            }
            match self
                .0
                .until
                .compare_exchange(cur, ms, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(c) => cur = c,
            }
        }
    }

    pub(crate) fn begin(&self, epoch: u64, until: Instant) {
        let ms = until.saturating_duration_since(self.0.base).as_millis() as u64;
        // The epoch first: a reader asking whether the old epoch may act never pairs it with
        // the new deadline.
        self.0.epoch.store(epoch, Ordering::Release);
        self.0.until.store(ms, Ordering::SeqCst);
        // A close that came first wins: either this sees it, or its revoke comes after the
        // store above (both sequentially consistent).
        if self.0.closed.load(Ordering::SeqCst) {
            self.0.until.store(0, Ordering::SeqCst);
        }
    }

    pub(crate) fn revoke(&self) {
        self.0.until.store(0, Ordering::SeqCst);
    }

    /// Stop acting for good: a join still under way when the node leaves cannot begin it again.
    pub(crate) fn close(&self) {
        self.0.closed.store(true, Ordering::SeqCst);
        self.revoke();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_closed_fence_never_acts_again() {
        let f = Fence::default();
        let later = || Instant::now() + Duration::from_secs(10);
        f.begin(7, later());
        assert!(f.acting(7));
        f.close();
        assert!(!f.acting(7));
        // A join that was under way when the node left, however late it comes.
        f.begin(8, later());
        assert!(!f.acting(8));
        assert!(f.until().is_none());
        assert!(!f.renewed(8, later()));
        assert!(!f.acting(8));
        // Revoke alone is not final: a fenced node joins again.
        let g = Fence::default();
        g.begin(1, later());
        g.revoke();
        g.begin(2, later());
        assert!(g.acting(2));
    }
}
