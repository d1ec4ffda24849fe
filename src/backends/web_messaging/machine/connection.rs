//! The socket's life in the Web Messaging machine: opened (send `configureSession`), lost
//! (unconfirmed sends answered, a retry scheduled with backoff), given up past the last known
//! expiry, and configured (a `SessionResponse`: a new or read-only session where none was
//! expected ends it; otherwise live again, with a backfill after a reconnect). Its own file
//! because reconnecting is one concern with its own rules, apart from what frames say once live.

use super::*;

impl Machine {
    pub(super) fn opened(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.phase = Phase::Configuring;
        self.retry_at = None;
        self.configure_by = Some(now + CONFIGURE_TIMEOUT);
        self.awaiting_pong = false;
        self.next_ping = Some(now + self.s.ping_interval);
        let start_new =
            matches!(self.begin, Begin::Start { start_new: true }) && !self.configured_once;
        out.push(Action::Write(Out::Configure { start_new }));
    }

    pub(super) fn lost(&mut self, why: String, now: Instant, out: &mut Vec<Action>) {
        let was_open = matches!(self.phase, Phase::Live | Phase::Configuring);
        out.push(Action::CloseSocket);
        if was_open {
            out.push(Action::Emit(EventKind::Disconnected {
                reason: why.clone(),
            }));
        }
        for (tid, _, _) in self.inflight.drain(..) {
            out.push(Action::Reply(tid, Err(Refusal::Unconfirmed)));
        }
        if let Some(tid) = self.start_new.take() {
            out.push(Action::Reply(tid, Err(Refusal::NotLive)));
        }
        if let Leave::Sent(_) = self.leave {
            // Sent again once configured.
            self.leave = Leave::Pending;
        }
        self.configure_by = None;
        self.next_ping = None;
        self.awaiting_pong = false;
        if self.backfill != Backfill::Idle {
            self.backfill = Backfill::Idle;
        }
        self.schedule_retry(why, now, out);
    }

    pub(super) fn schedule_retry(&mut self, cause: String, now: Instant, out: &mut Vec<Action>) {
        if self.phase != Phase::Connecting {
            self.phase = Phase::Reconnecting;
            self.lost_at.get_or_insert(now);
        }
        if let Some(end) = self.give_up_at() {
            if now >= end {
                return self.give_up(now, out);
            }
        }
        let backoff = self
            .backoff
            .get_or_insert_with(|| Box::new(Backoff::new(&self.s.backoff)));
        let delay = backoff.next_delay();
        self.attempt += 1;
        let left = self
            .give_up_at()
            .map_or(0, |e| ms(e.saturating_duration_since(now)));
        self.retry_at = Some(now + delay);
        out.push(Action::Emit(EventKind::Reconnecting {
            attempt: self.attempt,
            delay_ms: ms(delay),
            grace_left_ms: left,
            cause,
        }));
    }

    pub(super) fn give_up(&mut self, now: Instant, out: &mut Vec<Action>) {
        let detail = if self.expires.is_some() {
            "the platform could not be reached before the session's last known expiry".to_string()
        } else {
            format!(
                "no session could be configured within {:?}",
                self.s.first_connect_window
            )
        };
        self.end(
            EndReason::ReconnectGraceExpired,
            detail,
            extra(EndScope::Session, false),
            now,
            out,
        );
    }

    pub(super) fn configured(
        &mut self,
        r: SessionResponse,
        now: Instant,
        wall_ms: i64,
        out: &mut Vec<Action>,
    ) {
        if !r.connected {
            // The reply to closeSession.
            if let Some(tid) = self.start_new.take() {
                out.push(Action::Reply(tid, Ok(Reply::Closed)));
                return self.end(
                    EndReason::StartedNew,
                    "the session was closed for start_new".into(),
                    extra(EndScope::Session, self.read_only),
                    now,
                    out,
                );
            }
            if matches!(self.leave, Leave::Sent(_)) {
                return self.end(
                    EndReason::GuestLeft,
                    "guestd closed the session (closeSession)".into(),
                    extra(EndScope::Session, false),
                    now,
                    out,
                );
            }
            return;
        }
        let again = self.configured_once || self.begin == Begin::Resume;
        if again && r.new_session {
            return self.end(
                EndReason::SessionExpired,
                "the platform answered the reconnect with a new session: the old one had expired"
                    .into(),
                extra(EndScope::Session, false),
                now,
                out,
            );
        }
        if r.read_only {
            self.read_only = true;
            return self.end(
                EndReason::ConversationDisconnected,
                "the session is read-only: its conversation was ended in ReadOnly mode".into(),
                extra(EndScope::Conversation, true),
                now,
                out,
            );
        }
        self.configure_by = None;
        self.refresh_expiry(r.expiration_date, r.duration_seconds, now, wall_ms);
        if let Some(b) = self.backoff.as_mut() {
            b.reset();
        }
        self.attempt = 0;
        self.phase = Phase::Live;
        if !self.configured_once && self.begin != Begin::Resume {
            self.configured_once = true;
            out.push(Action::Emit(EventKind::Connected));
            if r.new_session && self.deployment.auto_start {
                out.push(Action::Write(Out::Join));
            }
        } else {
            self.configured_once = true;
            self.start_backfill(now, out);
        }
        if self.leave == Leave::Pending {
            return self.send_leave(now, out);
        }
        self.flush(now, out);
    }
}
