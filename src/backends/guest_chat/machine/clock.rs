//! Time in the guest chat machine: when the actor must tick next, when the chat ends if nothing
//! happens (what `status` reports as `ends_at`/`ends_because`), and what a tick does (a leave
//! due after a restart, the bound of the wait for roles, the link's deadlines, the no-activity
//! warning and end). Its own file because it reads every concern's deadline in one place.

use super::*;

impl Machine {
    /// When the platform ends the chat if nothing happens, and why (what `status` and `get`
    /// report as `ends_at`/`ends_because`): the no-activity deadline while an agent is
    /// connected (after a restart, the one the journal's agent and the guest's last message
    /// imply, not one counted from the restart), the end of the grace window while the socket
    /// is down (or has not opened yet), whichever comes first. None once ended, and while the
    /// socket is up with no agent (queued: nothing ends the chat by itself).
    pub fn ends(&self) -> Option<(Instant, EndReason)> {
        if self.ended.is_some() {
            return None;
        }
        let idle = self
            .evidence_deadline()
            .map(|t| (t, EndReason::InactivityTimeout));
        let grace = match &self.link {
            Link::Down { lost_at, .. } => Some((
                *lost_at + self.timing.reconnect_grace,
                EndReason::ReconnectGraceExpired,
            )),
            Link::Up { .. } => None,
        };
        match (idle, grace) {
            (Some(i), Some(g)) => Some(if g.0 < i.0 { g } else { i }),
            (i, g) => i.or(g),
        }
    }

    /// When the actor must tick next, or None once ended.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.ended.is_some() {
            return None;
        }
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        match &self.link {
            Link::Up { last_rx, missed } => {
                consider(link::last_rx_miss_due(&self.timing, *last_rx, *missed))
            }
            Link::Down {
                lost_at,
                next_at,
                giving_up,
                ..
            } => {
                if !giving_up {
                    consider(*lost_at + self.timing.reconnect_grace);
                    if let Some(n) = next_at {
                        consider(*n);
                    }
                }
            }
        }
        if let Some(dl) = self.inactivity_deadline() {
            if let Some(w) = self.warning_at(dl) {
                consider(w);
            }
            consider(dl);
        }
        if let Some(w) = &self.roles_wait {
            consider(w.1);
        }
        next
    }

    pub(super) fn on_tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        if std::mem::take(&mut self.leave_due) {
            out.push(Action::Leave);
        }
        // The wait for roles ends at its bound, and before the no-activity rule is read: a
        // guest's message waiting there (or held behind it) is activity, and is counted once
        // it is emitted.
        let inactive = self.inactivity_deadline().is_some_and(|dl| now >= dl);
        if self
            .roles_wait
            .as_ref()
            .is_some_and(|w| now >= w.1 || inactive)
        {
            self.release_roles_wait(now, out);
            if self.ended.is_some() {
                return;
            }
        }
        self.tick_link(now, out);
        if self.ended.is_some() {
            return;
        }
        if let Some(dl) = self.inactivity_deadline() {
            if now >= dl {
                let limit = humantime::format_duration(self.timing.inactivity_timeout);
                out.push(Action::Leave);
                self.end(
                    EndReason::InactivityTimeout,
                    format!(
                        "no guest message for {limit} while an agent was connected; guestd left"
                    ),
                    now,
                    out,
                );
            } else if self.warning_at(dl).is_some_and(|w| now >= w) {
                self.warned = true;
                out.push(Action::Emit(EventKind::InactivityWarning {
                    remaining_ms: (dl - now).as_millis() as u64,
                }));
            }
        }
    }
}
