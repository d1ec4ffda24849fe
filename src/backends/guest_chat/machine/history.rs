//! Message history: every message once and in order, live or backfilled after a reconnect;
//! live frames that arrive during a backfill are held and replayed after it. Backfilled
//! messages from a sender whose role is unknown (after a restart or a takeover the machine
//! knows only the guest) wait for the members list asked at the reopen, at most
//! [`ROLES_WAIT`], so an agent's message says `agent` whether it was read live or backfilled.

use super::*;

/// Message ids remembered to drop duplicates (a backfill overlapping live frames).
pub(super) const SEEN_CAP: usize = 128;
/// Ids of messages guestd sent for the guest, remembered until their echo is seen.
pub(super) const OWN_SENT_CAP: usize = 8;
/// Longest wait of backfilled messages for the members list that gives their senders' roles.
/// The list is asked at the reopen, in parallel with the backfill, and normally answers within
/// a second; past this bound (or once the list has failed [`super::roster::MAX_LOOKUP_RETRIES`]
/// times more) the messages come out with the roles known then, `unknown` for the rest: late
/// and unlabelled rather than lost. Live frames wait behind them as long.
pub(super) const ROLES_WAIT: Duration = Duration::from_secs(10);

impl Machine {
    /// guestd sent message `id` for the guest: its echo (live or backfilled) must not move the
    /// no-activity clock again, later.
    pub(super) fn note_own_sent(&mut self, id: String) {
        if self.own_sent.len() >= OWN_SENT_CAP {
            self.own_sent.pop_front();
        }
        self.own_sent.push_back(id);
    }

    /// Emit a message unless already seen; true when emitted.
    pub(super) fn on_message(
        &mut self,
        m: ChatMessage,
        backfilled: bool,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> bool {
        if self.seen.iter().any(|s| *s == m.id) {
            return false;
        }
        if self.seen.len() >= SEEN_CAP {
            self.seen.pop_front();
        }
        self.seen.push_back(m.id.clone());
        self.last_msg_id = Some(m.id.clone());
        if m.sender_id == self.guest_id && m.kind.is_written() {
            // guestd's own messages were counted when sent; counting a late echo (a backfill
            // after an outage) would put guestd's deadline after the platform's. Another
            // client's message counts when seen: a backfilled one is then late, which can
            // only delay guestd's own deadline, never bring it early.
            //
            // A backfilled message says when it was written (its platform timestamp): that,
            // not its late arrival, is when the guest was active. It matters after a restart,
            // when guestd no longer knows which messages were its own.
            if !self.own_sent.contains(&m.id) {
                let written = backfilled
                    .then(|| super::ending::instant_ms(&m.timestamp))
                    .flatten()
                    .and_then(|ms| self.instant_at_ms(ms))
                    .map(|t| t.min(now));
                match written {
                    Some(t) if self.last_guest_msg.is_some_and(|l| l >= t) => {}
                    Some(t) => self.guest_activity(t),
                    None => self.guest_activity(now),
                }
            }
        }
        let sender_role = self.role_name(&m.sender_id);
        out.push(Action::Emit(EventKind::Message {
            message_id: m.id,
            sender_id: m.sender_id,
            sender_role,
            body_type: m.kind.as_str().to_string(),
            body: self.timing.include_bodies.then_some(m.body),
            timestamp: m.timestamp,
            backfilled,
        }));
        true
    }

    /// Ask for the messages after the last seen, as a new generation.
    pub(super) fn ask_backfill(&mut self, out: &mut Vec<Action>) {
        self.backfill_gen = self.backfill_gen.wrapping_add(1);
        out.push(Action::Backfill {
            after: self.last_msg_id.clone(),
            generation: self.backfill_gen,
        });
    }

    pub(super) fn on_backfill(
        &mut self,
        generation: u32,
        r: Result<Vec<ChatMessage>, Failure>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if self.backfilling.is_none() || generation != self.backfill_gen {
            // Not waited for, or the answer to a backfill asked before a socket loss: the one
            // asked at the reopen (after the same id, answered later) has what this one lacks.
            return;
        }
        let msgs = match r {
            Ok(msgs) => msgs,
            Err(Failure::Unauthorized(m)) => {
                self.backfilling = None;
                return self.end(
                    EndReason::TokenExpired,
                    format!("backfill refused the jwt (401): {m}"),
                    now,
                    out,
                );
            }
            Err(Failure::NotFound(m)) => {
                self.backfilling = None;
                return self.end(
                    EndReason::ServerEnded,
                    format!("the conversation is gone (404): {m}"),
                    now,
                    out,
                );
            }
            Err(Failure::Other(e)) => {
                self.stream_error(
                    format!("backfill failed, messages may be missing: {e}"),
                    now,
                    out,
                );
                Vec::new()
            }
        };
        if let Some(w) = self.roles_wait.as_mut() {
            // A second answer of the same generation cannot come (one call per generation);
            // should one, nothing is dropped: each message comes out once (`seen`).
            w.0.extend(msgs);
            return;
        }
        let unknown = msgs
            .iter()
            .any(|m| self.member(&m.sender_id).and_then(|k| k.role).is_none());
        if unknown && self.deferred_list.is_none() {
            // A sender whose role guestd has not learnt (after a restart or a takeover it knows
            // only the guest): wait for the members list, asked at the reopen, rather than say
            // `unknown` for an agent. Live frames stay held behind these messages meanwhile.
            self.fetch(Fetch::Refresh, out);
            self.roles_wait = Some(Box::new((msgs, now + ROLES_WAIT)));
            return;
        }
        self.finish_backfill(msgs, now, out);
    }

    /// Emit a backfill's messages, with the roles known now (a members list that arrived
    /// during the backfill gives its roles first), then the frames held behind it, then that
    /// list.
    pub(super) fn finish_backfill(
        &mut self,
        msgs: Vec<ChatMessage>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(lost_at) = self.backfilling.take() else {
            return;
        };
        self.roles_wait = None;
        if let Some((why, list)) = self.deferred_list.take() {
            // Roles only: the list's states are newer than the held frames and wait for them.
            for m in &list {
                self.learn_role(&m.id, m.role);
            }
            self.deferred_list = Some((why, list));
        }
        let mut n = 0u32;
        for m in msgs {
            if self.on_message(m, true, now, out) {
                n += 1;
            }
        }
        if !std::mem::take(&mut self.first_backfill) {
            out.push(Action::Emit(EventKind::Reconnected {
                downtime_ms: now.saturating_duration_since(lost_at).as_millis() as u64,
                backfilled: n,
            }));
        }
        for (ev, at) in std::mem::take(&mut self.held) {
            if self.ended.is_some() {
                return;
            }
            self.on_frame(ev, at, out);
        }
        self.read_deferred_list(now, out);
    }

    /// Backfilled messages waiting for roles go out now, with the roles known so far (the
    /// wait ran out, the members list failed for good, or the socket was lost).
    pub(super) fn release_roles_wait(&mut self, now: Instant, out: &mut Vec<Action>) {
        if let Some(w) = self.roles_wait.take() {
            self.finish_backfill(w.0, now, out);
        }
    }

    /// Read a members list that waited for a backfill's held frames.
    pub(super) fn read_deferred_list(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some((why, list)) = self.deferred_list.take() else {
            return;
        };
        // A lookup started meanwhile answers later, with a newer list: that one is read instead.
        if self.ended.is_none() && self.fetching.is_none() {
            self.fetching = Some(why);
            self.on_members(Ok(list), now, out);
        }
    }
}
