//! Giving a burst's freed memory back to the operating system.
//!
//! A burst (thousands of chats attached at once, a reconnect storm, a mass end) allocates and
//! frees much short-lived memory (REST calls waiting their turn, handshakes, roster replies)
//! between the chats' long-lived allocations. glibc keeps what was freed in holes between live
//! chunks for reuse, and on its own returns only the free top of a heap: after 10,000 chats
//! attached in one burst the chats hold the same as when attached 500 at a time, but the process
//! keeps 0.4-0.5 KiB a chat more in pages that hold nothing (docs/benchmarks.md, "A burst's
//! leftovers" and "A burst's freed pages"). `malloc_trim(0)` walks every arena and hands each
//! whole free page back (`madvise(MADV_DONTNEED)`); the memory stays mapped and is reused on the
//! next burst.
//!
//! The walk holds each arena's lock while it trims that arena, so a thread that allocates from
//! it meanwhile waits: the trim runs on a blocking thread once a burst is over, as [`Trigger`]
//! decides: after at least `memory.trim_after` units of churn (websocket connects and REST
//! attempts begun, sessions gone, counted process-wide) since the last trim, at the first check
//! (one every `memory.trim_quiet`) that finds the churn since the check before down to a
//! trickle, or, on a node whose churn never falls that low, at most once a minute. A burst's
//! roster fetches go on after its connects, so the REST attempts count: trimming when the
//! connects alone were done returned less than half (576 against 1,312 KiB at 4,000 chats). Its
//! duration is the metric `guestd_heap_trim_seconds`: 1.5-2.6 ms at 10,000 chats
//! (docs/benchmarks.md, "A burst's freed pages").
//!
//! Only glibc has `malloc_trim`; elsewhere (musl, macOS) no task starts, and the start says so.
//!
//! The churn is counted process-wide (a static): one guestd per process is the daemon's shape;
//! an in-process test that starts several sees one shared count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Churn since start, process-wide: websocket connects and REST attempts begun, sessions gone.
static CHURN: AtomicU64 = AtomicU64::new(0);

/// Count one unit of churn (a connect or a REST attempt begun, a session gone).
pub fn churn() {
    CHURN.fetch_add(1, Ordering::Relaxed);
}

/// Churn counted since start.
pub fn churned() -> u64 {
    CHURN.load(Ordering::Relaxed)
}

/// When to trim: the pure rule, tested without a heap or a clock.
///
/// A burst is over when the churn between two checks falls to a trickle, under a tenth of
/// `after`: a node with light steady traffic (a message here, a reconnect there) still trims
/// after its bursts, and a burst that is still connecting or fetching rosters (thousands of
/// units a second) is not trimmed halfway, only to fill the same pages again, unless it lasts
/// longer than the bound below. A node whose traffic never falls that low (every REST attempt
/// counts, messages too) trims anyway at the [`Trigger::PATIENCE`]th check in a row that finds
/// a trim due: at most one a minute at the default 2 s checks. That a trim is cheap then is
/// reasoning from the idle runs (a few milliseconds at 10,000 chats), not measured under
/// message load; never trimming is not the promise.
#[derive(Debug, Clone)]
pub struct Trigger {
    after: u64,
    at_last_trim: u64,
    at_last_check: u64,
    /// Checks in a row that found a trim due but the churn above a trickle.
    waited: u32,
}

impl Trigger {
    /// Trim after `after` units of churn; 0 never trims.
    pub fn new(after: u64) -> Self {
        Trigger {
            after,
            at_last_trim: 0,
            at_last_check: 0,
            waited: 0,
        }
    }

    /// A due trim runs at this check in a row that found it due, trickle or not.
    pub const PATIENCE: u32 = 30;

    /// Below this much churn between two checks, the burst is over.
    pub fn trickle(&self) -> u64 {
        (self.after / 10).max(1)
    }

    /// A check, with the churn counted since start (it only grows): whether to trim now.
    pub fn check(&mut self, churn: u64) -> bool {
        let quiet = churn.saturating_sub(self.at_last_check) < self.trickle();
        self.at_last_check = churn;
        let due = self.after > 0 && churn.saturating_sub(self.at_last_trim) >= self.after;
        if !due {
            self.waited = 0;
            return false;
        }
        if quiet || self.waited + 1 >= Self::PATIENCE {
            self.at_last_trim = churn;
            self.waited = 0;
            true
        } else {
            self.waited += 1;
            false
        }
    }
}

/// What one trim did.
#[derive(Debug, Clone, Copy)]
pub struct Trimmed {
    /// Resident bytes before.
    pub rss_before: u64,
    /// Resident bytes after.
    pub rss_after: u64,
    /// How long the walk took.
    pub took: Duration,
}

/// Whether this allocator can give freed memory back (glibc on Linux).
pub const SUPPORTED: bool = cfg!(all(target_os = "linux", target_env = "gnu"));

/// Trim now, on this thread (blocking: call it from a blocking thread).
pub fn trim() -> Trimmed {
    let rss_before = resident_bytes();
    let start = Instant::now();
    malloc_trim();
    let took = start.elapsed();
    Trimmed {
        rss_before,
        rss_after: resident_bytes(),
        took,
    }
}

/// Its answer (whether any arena of the process had a page to give) says nothing of this
/// burst's pages, so it is not reported.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn malloc_trim() {
    // SAFETY: malloc_trim takes no pointer and is thread-safe (each arena under its lock).
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn malloc_trim() {}

/// This process's resident bytes (0 where /proc is not there).
fn resident_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf reads a constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// Check every `quiet` the churn `load` reads ([`churned`] in the daemon) and trim when the
/// [`Trigger`] says so, until `cancel`. The receiver counts the trims done (the daemon drops it;
/// a test awaits it).
pub fn spawn(
    after: u64,
    quiet: Duration,
    mut load: impl FnMut() -> u64 + Send + 'static,
    cancel: CancellationToken,
) -> watch::Receiver<u64> {
    let (done, trims) = watch::channel(0u64);
    if after == 0 {
        return trims;
    }
    if !SUPPORTED {
        tracing::info!(
            "memory.trim_after is set, but this allocator cannot return freed memory (not glibc): no trims"
        );
        return trims;
    }
    tokio::spawn(async move {
        let mut trigger = Trigger::new(after);
        let mut tick = tokio::time::interval(quiet.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !trigger.check(load()) {
                continue;
            }
            let Ok(t) = tokio::task::spawn_blocking(trim).await else {
                continue;
            };
            let returned = t.rss_before.saturating_sub(t.rss_after);
            // The count last: a reader who sees it sees the trim's time and its log line.
            metrics::histogram!("guestd_heap_trim_seconds").record(t.took.as_secs_f64());
            metrics::counter!("guestd_heap_returned_bytes_total").increment(returned);
            tracing::info!(
                returned_kib = returned / 1024,
                resident_kib = t.rss_after / 1024,
                took_us = u64::try_from(t.took.as_micros()).unwrap_or(u64::MAX),
                "returned a burst's freed memory to the system"
            );
            metrics::counter!("guestd_heap_trims_total").increment(1);
            done.send_modify(|n| *n += 1);
        }
    });
    trims
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn trims_once_a_burst_is_over_and_not_before() {
        let mut t = Trigger::new(100);
        assert_eq!(t.trickle(), 10);
        assert!(!t.check(0), "nothing happened");
        assert!(!t.check(60), "a burst under way");
        assert!(!t.check(150), "still under way");
        assert!(t.check(155), "a trickle: over, 155 since the last trim");
        assert!(!t.check(155), "once per burst");
        assert!(!t.check(200), "45 more, churning");
        assert!(!t.check(205), "a trickle, but only 50 since the trim");
        assert!(!t.check(300), "churning");
        assert!(t.check(300), "quiet, 145 since the trim");
    }

    #[test]
    fn light_steady_traffic_does_not_hold_a_trim_back() {
        let mut t = Trigger::new(1000);
        assert!(!t.check(5000), "a burst");
        // Then a message or a reconnect every so often: 99 per check is a trickle.
        assert!(t.check(5099));
        assert!(!t.check(5198));
    }

    #[test]
    fn busy_traffic_delays_a_due_trim_by_patience_checks_at_most() {
        let mut t = Trigger::new(1000);
        let mut churn = 0;
        let mut trims = Vec::new();
        for i in 0..100u32 {
            churn += 500; // never a trickle
            if t.check(churn) {
                trims.push(i);
            }
        }
        // Due from the second check (1,000 churned); run at the PATIENCE-th check that found
        // it due; then due again two checks after a trim.
        assert_eq!(trims[0], Trigger::PATIENCE, "{trims:?}");
        assert!(
            trims
                .windows(2)
                .all(|w| w[1] - w[0] == Trigger::PATIENCE + 1),
            "{trims:?}"
        );
    }

    #[test]
    fn zero_never_trims() {
        let mut t = Trigger::new(0);
        for c in [0, 10_000, 10_000, 10_000] {
            assert!(!t.check(c));
        }
    }

    proptest! {
        /// Whatever the checks, read back from their history rather than from a copy of the
        /// rule's counter: a trim only when at least `after` came since the last one; a quiet
        /// check (under a trickle since the one before) with that much due always trims; a trim
        /// at a busy check comes after exactly `PATIENCE - 1` due, busy checks without one; and
        /// no `PATIENCE` due checks pass in a row without a trim. The checks come in segments
        /// of one growth each, so long busy runs (which reach the bound) are common.
        #[test]
        fn trims_when_quiet_or_overdue_and_only_after_enough_churn(
            after in 1u64..200,
            segments in proptest::collection::vec((0u64..400, 1usize..70), 1..8),
        ) {
            let mut t = Trigger::new(after);
            let trickle = (after / 10).max(1);
            // (quiet, due, trimmed) per check
            let mut history: Vec<(bool, bool, bool)> = Vec::new();
            let (mut churn, mut prev, mut last_trim) = (0u64, 0u64, 0u64);
            for (grow, len) in segments {
                for _ in 0..len {
                    churn += grow;
                    let quiet = churn - prev < trickle;
                    let due = churn - last_trim >= after;
                    let did = t.check(churn);
                    prop_assert!(!did || due, "a trim with less than `after` behind it");
                    prop_assert!(!(quiet && due) || did, "a quiet, due check that did not trim");
                    history.push((quiet, due, did));
                    if did {
                        last_trim = churn;
                    }
                    prev = churn;
                }
            }
            let p = Trigger::PATIENCE as usize;
            for (i, &(quiet, _, did)) in history.iter().enumerate() {
                if did && !quiet {
                    prop_assert!(i + 1 >= p, "a forced trim before {p} checks");
                    let run = &history[i + 1 - p..i];
                    prop_assert!(
                        run.iter().all(|&(q, d, x)| !q && d && !x),
                        "a forced trim not after {} due, busy checks: {run:?}",
                        p - 1
                    );
                }
            }
            for w in history.windows(p) {
                prop_assert!(
                    !w.iter().all(|&(_, d, x)| d && !x),
                    "{p} due checks in a row without a trim"
                );
            }
        }
    }

    /// The task under virtual time: no trim while a burst churns, one once it falls to a
    /// trickle, and none again until as much churn again (glibc: elsewhere no task starts).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[tokio::test(start_paused = true)]
    async fn the_task_trims_after_a_burst_once() {
        use std::sync::Arc;
        let churn = Arc::new(AtomicU64::new(0));
        let c = churn.clone();
        let cancel = CancellationToken::new();
        let mut trims = spawn(
            100,
            Duration::from_secs(1),
            move || c.load(Ordering::SeqCst),
            cancel.clone(),
        );
        for _ in 0..10 {
            churn.fetch_add(30, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        assert_eq!(*trims.borrow(), 0, "no trim while the burst is under way");
        tokio::time::timeout(Duration::from_secs(3), trims.changed())
            .await
            .expect("a trim within two checks of the burst's end")
            .expect("the task runs");
        assert_eq!(*trims.borrow(), 1);
        churn.fetch_add(99, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(*trims.borrow(), 1, "99 is less than a burst");
        churn.fetch_add(1, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(3), trims.changed())
            .await
            .expect("a second burst, a second trim")
            .expect("the task runs");
        cancel.cancel();
    }
}
