//! Time in the Web Messaging machine: the next deadline the actor must tick at, when the session
//! ends if nothing happens, the session's expiry as last seen (set from the platform's
//! `expirationDate`, moved on by every message), and what a tick does (reconnect and configure
//! timeouts, pings, send and queue timeouts, the leave's wait, a deferred backfill, the expiry
//! warning and the echo health check). Its own file because every deadline the machine keeps is
//! read here and nowhere else decides when one has passed.

use super::*;

impl Machine {
    /// The earliest time a [`Input::Tick`] can change anything.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.phase == Phase::Ended {
            return None;
        }
        let mut d: Option<Instant> = None;
        let mut at = |t: Option<Instant>| {
            if let Some(t) = t {
                d = Some(d.map_or(t, |x| x.min(t)));
            }
        };
        at(self.retry_at);
        at(self.configure_by);
        at(self.next_ping);
        at(self
            .inflight
            .iter()
            .map(|(_, _, t)| *t + self.s.send_timeout)
            .min());
        at(self.outbox.front().map(|(_, _, t)| *t + QUEUE_TIMEOUT));
        if self.phase == Phase::Live {
            at(self.next_send_slot());
            if self.leave == Leave::Pending {
                at(self.paused_until);
            }
        }
        if let Backfill::Due(t) = self.backfill {
            at(Some(t));
        }
        if let Leave::Sent(t) = self.leave {
            at(Some(t + LEAVE_TIMEOUT));
        }
        at(self.give_up_at());
        if let Some(e) = self.expires {
            if !self.warned && !self.s.expiry_warning_lead.is_zero() {
                at(Some(e.checked_sub(self.s.expiry_warning_lead).unwrap_or(e)));
            }
            if self.phase == Phase::Live {
                at(Some(self.echo_due(e)));
            }
        }
        d
    }

    /// When the session ends if nothing happens, and why (`ends_at`/`ends_because` in `status`
    /// and `get`): while the socket is down (or not open yet), when guestd gives it up
    /// (`reconnect_grace_expired`: the last known expiry plus a slack, or
    /// `first_connect_window` before any expiry is known); otherwise the session's expiry as
    /// last seen (`session_expired`; every message moves it on). None once ended, and before
    /// the platform has named an expiry.
    pub fn ends(&self) -> Option<(Instant, EndReason)> {
        if self.phase == Phase::Ended {
            return None;
        }
        if let Some(t) = self.give_up_at() {
            return Some((t, EndReason::ReconnectGraceExpired));
        }
        self.expires.map(|e| (e, EndReason::SessionExpired))
    }

    /// When a session that cannot reconnect is given up.
    pub(super) fn give_up_at(&self) -> Option<Instant> {
        if !matches!(self.phase, Phase::Reconnecting | Phase::Connecting) {
            return None;
        }
        match self.expires {
            Some(e) => Some(e + EXPIRY_SLACK),
            None => self
                .lost_at
                .or(Some(self.started))
                .map(|t| t + self.s.first_connect_window),
        }
    }

    /// When to check, by echo, whether the session expired: just after its expiry, then no
    /// more often than `echo_interval`.
    fn echo_due(&self, expires: Instant) -> Instant {
        let after = expires + Duration::from_secs(2);
        match self.last_echo {
            Some(t) if t + self.s.echo_interval > after => t + self.s.echo_interval,
            _ => after,
        }
    }

    fn next_send_slot(&self) -> Option<Instant> {
        if self.outbox.is_empty() {
            return None;
        }
        let rate = self.s.messages_per_second as usize;
        let slot = if self.sent.len() >= rate {
            self.sent
                .get(self.sent.len() - rate)
                .map(|t| *t + Duration::from_secs(1))
        } else {
            None
        };
        match (slot, self.paused_until) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    pub(super) fn refresh_expiry(
        &mut self,
        r_exp: Option<u64>,
        r_dur: Option<u64>,
        now: Instant,
        wall_ms: i64,
    ) {
        if let Some(d) = r_dur {
            self.duration = Some(Duration::from_secs(d));
        }
        if let Some(exp_s) = r_exp {
            let left_ms = (exp_s as i64).saturating_mul(1000) - wall_ms;
            self.set_expiry(now + Duration::from_millis(left_ms.max(0) as u64));
        }
    }

    fn set_expiry(&mut self, at: Instant) {
        let lead = self.s.expiry_warning_lead;
        if self.warned && self.expires.is_some_and(|old| at > old + lead) {
            // Moved well past the old warning: warn again before the new expiry.
            self.warned = false;
        }
        self.expires = Some(at);
    }

    /// Any message either way restarts the session's time to live.
    pub(super) fn activity(&mut self, now: Instant) {
        if let Some(d) = self.duration {
            self.set_expiry(now + d);
        }
    }

    pub(super) fn tick(&mut self, now: Instant, wall_ms: i64, out: &mut Vec<Action>) {
        if let Some(end) = self.give_up_at() {
            if now >= end {
                return self.give_up(now, out);
            }
        }
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
            out.push(Action::Connect);
        }
        if self.configure_by.is_some_and(|t| now >= t) {
            return self.lost("no SessionResponse within 10 s".into(), now, out);
        }
        if self.next_ping.is_some_and(|t| now >= t) {
            if self.awaiting_pong {
                return self.lost(
                    format!("no pong within {:?}", self.s.ping_interval),
                    now,
                    out,
                );
            }
            self.awaiting_pong = true;
            self.next_ping = Some(now + self.s.ping_interval);
            out.push(Action::Ping);
        }
        let timeout = self.s.send_timeout;
        let mut i = 0;
        while i < self.inflight.len() {
            if now >= self.inflight[i].2 + timeout {
                let (tid, _, _) = self.inflight.remove(i);
                out.push(Action::Reply(tid, Err(Refusal::NotEchoed(timeout))));
            } else {
                i += 1;
            }
        }
        while self
            .outbox
            .front()
            .is_some_and(|(_, _, t)| now >= *t + QUEUE_TIMEOUT)
        {
            if let Some((tid, _, _)) = self.outbox.pop_front() {
                out.push(Action::Reply(tid, Err(Refusal::Timeout(QUEUE_TIMEOUT))));
            }
        }
        if let Leave::Sent(t) = self.leave {
            if now >= t + LEAVE_TIMEOUT {
                return self.end(
                    EndReason::GuestLeft,
                    "guestd left the session (no confirmation within 5 s)".into(),
                    extra(EndScope::Session, false),
                    now,
                    out,
                );
            }
        }
        if let Backfill::Due(t) = self.backfill {
            if now >= t && self.phase == Phase::Live {
                self.start_backfill(now, out);
            }
        }
        if let Some(e) = self.expires {
            let lead = self.s.expiry_warning_lead;
            if !self.warned && !lead.is_zero() && now + lead >= e {
                // Marked even when the expiry has already passed (a clock ahead of the
                // platform's, an expiry reported in the past), so its deadline does not stay
                // due; warned only while it is still ahead.
                self.warned = true;
                if now < e {
                    let left = e.saturating_duration_since(now);
                    let at = chrono::DateTime::from_timestamp_millis(wall_ms + ms(left) as i64)
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                        .unwrap_or_default();
                    out.push(Action::Emit(EventKind::ExpiryWarning {
                        remaining_ms: ms(left),
                        expires_at: at,
                    }));
                }
            }
            if self.phase == Phase::Live && now >= self.echo_due(e) {
                self.last_echo = Some(now);
                self.echoes += 1;
                out.push(Action::Write(Out::Echo {
                    tid: format!("{ECHO_TID}{}", self.echoes),
                }));
            }
        }
        self.flush(now, out);
    }
}
