//! The link: the event stream's life as the machine sees it. Heartbeats (any frame is life;
//! `heartbeat_tolerance` misses declare the socket dead, the first one pings), losing the
//! socket, reconnecting with backoff inside the grace window, and giving up when it runs out.

use super::*;

/// The socket, as the machine knows it.
#[derive(Debug)]
pub(super) enum Link {
    /// Open; `missed` heartbeats counted since `last_rx`.
    Up { last_rx: Instant, missed: u32 },
    /// Lost at `lost_at`; reconnect attempt `attempt` is due at `next_at` (None while one is in
    /// flight); `giving_up` once the grace window ran out and the last reconcile is under way.
    Down {
        lost_at: Instant,
        attempt: u32,
        next_at: Option<Instant>,
        giving_up: bool,
    },
}

/// When the next heartbeat counts as missed: `last_rx + interval * (missed + 1) + interval / 2`
/// (half an interval of slack for a heartbeat on its way).
pub(super) fn last_rx_miss_due(t: &Timing, last_rx: Instant, missed: u32) -> Instant {
    last_rx + t.heartbeat_interval * (missed + 1) + t.heartbeat_interval / 2
}

impl Machine {
    pub(super) fn alive(&mut self, now: Instant) {
        if let Link::Up { last_rx, missed } = &mut self.link {
            *last_rx = now;
            *missed = 0;
        }
    }

    pub(super) fn lose(&mut self, why: &str, immediate: bool, now: Instant, out: &mut Vec<Action>) {
        // A backfill that answered and waits for roles is complete: its messages (and the
        // frames held behind them) go out before the loss, not again after the next reopen.
        self.release_roles_wait(now, out);
        if self.ended.is_some() {
            return;
        }
        self.link = Link::Down {
            lost_at: now,
            attempt: 0,
            next_at: None,
            giving_up: false,
        };
        self.needs_backfill = true;
        self.backfilling = None;
        let held = std::mem::take(&mut self.held);
        // Frames held for a backfill that will not finish: the next backfill covers messages.
        for (ev, at) in held {
            if let ChatEvent::MemberChange { member_id, state } = ev {
                self.on_member_change(member_id, state, at, out);
            }
            // A held frame that ended the chat (the guest's DISCONNECTED): nothing after it.
            if self.ended.is_some() {
                return;
            }
        }
        out.push(Action::Emit(EventKind::Disconnected {
            reason: why.to_string(),
        }));
        self.schedule(immediate, why, now, out);
        self.read_deferred_list(now, out);
    }

    /// Schedule the next attempt; `cause` is what it follows (the loss, or the last attempt's
    /// failure), carried on the `reconnecting` event.
    pub(super) fn schedule(
        &mut self,
        immediate: bool,
        cause: &str,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let grace = self.timing.reconnect_grace;
        let delay = if immediate {
            Duration::ZERO
        } else {
            self.backoff.next_delay()
        };
        if let Link::Down {
            lost_at,
            attempt,
            next_at,
            ..
        } = &mut self.link
        {
            let left = (*lost_at + grace).saturating_duration_since(now);
            let delay = delay.min(left);
            *attempt += 1;
            *next_at = Some(now + delay);
            out.push(Action::Emit(EventKind::Reconnecting {
                attempt: *attempt,
                delay_ms: delay.as_millis() as u64,
                grace_left_ms: left.as_millis() as u64,
                cause: cause.to_string(),
            }));
        }
    }

    pub(super) fn on_opened(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Link::Down {
            lost_at, giving_up, ..
        } = self.link
        else {
            return;
        };
        if giving_up {
            out.push(Action::CloseSocket);
            return;
        }
        self.link = Link::Up {
            last_rx: now,
            missed: 0,
        };
        self.backoff.reset();
        if !self.ever_connected && !self.needs_backfill {
            self.ever_connected = true;
            out.push(Action::Emit(EventKind::Connected));
            // Members that joined before the stream opened: learn their roles and states.
            self.fetch(Fetch::Refresh, out);
            if !self.own_sent.is_empty() {
                // guestd sent for the guest before its stream opened: those messages were
                // never streamed to it. Fetch them (no `reconnected`: nothing was lost).
                self.first_backfill = true;
                self.backfilling = Some(lost_at);
                self.ask_backfill(out);
            }
            return;
        }
        self.ever_connected = true;
        self.needs_backfill = false;
        self.backfilling = Some(lost_at);
        self.ask_backfill(out);
        self.fetch(Fetch::Refresh, out);
    }

    pub(super) fn on_connect_failed(&mut self, f: Failure, now: Instant, out: &mut Vec<Action>) {
        let Link::Down {
            giving_up: false, ..
        } = self.link
        else {
            return;
        };
        match f {
            Failure::Unauthorized(m) => self.end(
                EndReason::TokenExpired,
                format!("stream refused the jwt (401): {m}"),
                now,
                out,
            ),
            Failure::NotFound(_) => self.fetch(Fetch::Gone, out),
            Failure::Other(m) => self.schedule(false, &format!("connect failed: {m}"), now, out),
        }
    }

    /// The link's deadlines: a heartbeat miss (ping, then declare the socket dead), the grace
    /// window running out (reconcile once, then end), a reconnect attempt due.
    pub(super) fn tick_link(&mut self, now: Instant, out: &mut Vec<Action>) {
        match &mut self.link {
            Link::Up { last_rx, missed } => {
                let due = last_rx_miss_due(&self.timing, *last_rx, *missed);
                if now >= due {
                    *missed += 1;
                    let (k, silent) = (*missed, now - *last_rx);
                    out.push(Action::Emit(EventKind::HeartbeatMissed {
                        missed: k,
                        silent_ms: silent.as_millis() as u64,
                    }));
                    if k >= self.timing.heartbeat_tolerance.max(1) {
                        out.push(Action::CloseSocket);
                        self.lose("heartbeat timeout", false, now, out);
                    } else {
                        out.push(Action::Ping);
                    }
                }
            }
            Link::Down {
                lost_at,
                next_at,
                giving_up,
                ..
            } => {
                if *giving_up {
                } else if now >= *lost_at + self.timing.reconnect_grace {
                    *giving_up = true;
                    *next_at = None;
                    out.push(Action::AbortConnect);
                    self.fetch(Fetch::GaveUp, out);
                } else if next_at.is_some_and(|n| now >= n) {
                    *next_at = None;
                    out.push(Action::Connect);
                }
            }
        }
    }
}
