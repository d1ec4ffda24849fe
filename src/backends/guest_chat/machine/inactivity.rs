//! The no-activity rule's state: when it ends the chat (no guest message for
//! `inactivity_timeout` while an agent is connected), when it warns, the evidence it rests on
//! (the agent and since when, the guest's last message, restored from the journal after a
//! restart), and the wall-clock anchor that lets leave dates be read against its deadline. Its
//! own file because the rule has its own evidence and its own persistence (the journal's
//! `Activity`, the session's digest of it), apart from the stream and the roster.

use super::*;

impl Machine {
    /// Tie this machine's instants to the wall clock: `ms` is the wall-clock time at `at`. Leave
    /// dates are read against guestd's no-activity deadline only with an anchor.
    pub fn anchor_wall(&mut self, at: Instant, ms: i64) {
        self.wall = Some((at, ms));
    }

    /// Whether [`Machine::anchor_wall`] was called.
    pub fn anchored(&self) -> bool {
        self.wall.is_some()
    }

    fn ms_at(&self, t: Instant) -> Option<i64> {
        let (at, ms) = self.wall?;
        Some(if t >= at {
            ms + (t - at).as_millis() as i64
        } else {
            ms - (at - t).as_millis() as i64
        })
    }

    pub(super) fn instant_at_ms(&self, t: i64) -> Option<Instant> {
        let (at, ms) = self.wall?;
        Some(if t >= ms {
            at + Duration::from_millis((t - ms) as u64)
        } else {
            at.checked_sub(Duration::from_millis((ms - t) as u64))
                .unwrap_or(at)
        })
    }

    /// A resumed session picks up the no-activity rule's evidence from the journal (the machine
    /// must be anchored first): the guest's last message, and the agent connected before the
    /// restart, which counts once the roster sees that same agent connected again (another
    /// agent starts the clock afresh).
    pub fn with_activity(mut self, a: &crate::journal::Activity) -> Self {
        self.last_guest_msg = a.last_guest_ms.and_then(|t| self.instant_at_ms(t));
        self.restored_agent = match (&a.agent, a.agent_since_ms) {
            (Some(agent), Some(t)) => self.instant_at_ms(t).map(|t| (agent.clone(), t)),
            _ => None,
        };
        self
    }

    /// The agent the no-activity evidence names, and since when: the one connected now, or
    /// else the one a restart restored from the journal.
    fn evidence_agent(&self) -> Option<(&str, Instant)> {
        match (&self.agent, self.agent_since, &self.restored_agent) {
            (Some(a), Some(t), _) => Some((a.as_str(), t)),
            (None, _, Some((a, t))) => Some((a.as_str(), *t)),
            _ => None,
        }
    }

    /// A digest of [`Machine::activity`] without building it (the session asks after every
    /// step, a heartbeat's included): of the whole evidence, and of its agent part when there
    /// is an agent. Equal evidence gives equal digests.
    pub fn activity_digest(&self) -> ActivityDigest {
        use std::hash::{Hash, Hasher};
        if self.wall.is_none() {
            return ActivityDigest::default();
        }
        let (agent, since) = self.evidence_agent().unzip();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (agent, since.and_then(|t| self.ms_at(t))).hash(&mut h);
        let agent_part = agent.map(|_| h.finish());
        self.last_guest_msg.and_then(|t| self.ms_at(t)).hash(&mut h);
        ActivityDigest {
            all: h.finish(),
            agent: agent_part,
        }
    }

    /// The no-activity rule's evidence as the journal keeps it (None without an anchor).
    pub fn activity(&self) -> Option<crate::journal::Activity> {
        self.wall?;
        let (agent, since) = self.evidence_agent().unzip();
        Some(crate::journal::Activity {
            agent: agent.map(str::to_string),
            agent_since_ms: since.and_then(|t| self.ms_at(t)),
            last_guest_ms: self.last_guest_msg.and_then(|t| self.ms_at(t)),
        })
    }

    /// When the no-activity rule ends the chat, if it runs now.
    pub fn inactivity_deadline(&self) -> Option<Instant> {
        self.agent_since.map(|since| self.deadline_from(since))
    }

    /// The no-activity deadline for an agent connected since `since`: the later of that and the
    /// guest's last message, plus the timeout.
    fn deadline_from(&self, since: Instant) -> Instant {
        let from = match self.last_guest_msg {
            Some(m) if m > since => m,
            _ => since,
        };
        from + self.timing.inactivity_timeout
    }

    /// The no-activity deadline as evidence: guestd's own, or, after a restart and before the
    /// roster has seen the agent again, the one the journal's record implies.
    pub(super) fn evidence_deadline(&self) -> Option<Instant> {
        if let Some(dl) = self.inactivity_deadline() {
            return Some(dl);
        }
        let (_, since) = self.restored_agent.as_ref()?;
        Some(self.deadline_from(*since))
    }

    /// Whether the guest's leave date (from a members list) falls at or after the no-activity
    /// deadline, within the skew; None when either is unknown.
    pub(super) fn inactivity_by_date(&self) -> Option<bool> {
        let left = self.guest_left_ms?;
        let dl = self.ms_at(self.evidence_deadline()?)?;
        let skew = self.timing.inactivity_skew.as_millis() as i64;
        Some(left + skew >= dl)
    }

    pub(super) fn warning_at(&self, deadline: Instant) -> Option<Instant> {
        let lead = self.timing.inactivity_warning_lead;
        (!self.warned && !lead.is_zero() && lead < self.timing.inactivity_timeout)
            .then(|| deadline - lead)
    }

    pub(super) fn guest_activity(&mut self, now: Instant) {
        self.last_guest_msg = Some(now);
        self.warned = false;
    }
}

/// See [`Machine::activity_digest`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActivityDigest {
    /// Of the whole evidence (0 without an anchor).
    pub all: u64,
    /// Of the agent part, when there is an agent.
    pub agent: Option<u64>,
}
