//! Reconnect and retry delays: jittered exponential backoff.
//!
//! The design card asks for the `backoff` crate, which RustSec flags as unmaintained
//! (RUSTSEC-2025-0012; its `instant` dependency RUSTSEC-2024-0384). It is used here and nowhere
//! else, only for its delay arithmetic (no `max_elapsed_time`, so it never reads the clock): the
//! grace window is enforced by the session state machine. Swapping to the maintained `backon`
//! crate means rewriting this one file (`ExponentialBuilder::default().with_jitter()...build()`
//! is an iterator of delays with the same shape).

use backoff::backoff::Backoff as _;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Backoff settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffConfig {
    /// First delay.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Largest delay.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Growth per attempt.
    pub multiplier: f64,
    /// Randomization factor: each delay is drawn from `d * (1 ± jitter)`. 0 for none.
    pub jitter: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(15),
            multiplier: 2.0,
            jitter: 0.3,
        }
    }
}

/// A sequence of delays.
pub struct Backoff {
    inner: backoff::ExponentialBackoff,
}

impl std::fmt::Debug for Backoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backoff")
            .field("current", &self.inner.current_interval)
            .finish()
    }
}

impl Backoff {
    /// A fresh sequence.
    pub fn new(cfg: &BackoffConfig) -> Self {
        let inner = backoff::ExponentialBackoff {
            current_interval: cfg.initial,
            initial_interval: cfg.initial,
            randomization_factor: cfg.jitter.clamp(0.0, 1.0),
            multiplier: cfg.multiplier.max(1.0),
            max_interval: cfg.max,
            max_elapsed_time: None,
            ..Default::default()
        };
        Backoff { inner }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        self.inner.next_backoff().unwrap_or(self.inner.max_interval)
    }

    /// Start again from the initial delay.
    pub fn reset(&mut self) {
        self.inner.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_without_jitter_and_resets() {
        let cfg = BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(350),
            multiplier: 2.0,
            jitter: 0.0,
        };
        let mut b = Backoff::new(&cfg);
        let got: Vec<_> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, vec![100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }

    #[test]
    fn jitter_stays_in_its_band() {
        let cfg = BackoffConfig {
            initial: Duration::from_millis(1000),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.5,
        };
        for _ in 0..100 {
            let d = Backoff::new(&cfg).next_delay().as_millis();
            assert!((500..=1500).contains(&d), "{d}");
        }
    }
}
