//! Messages in the Web Messaging machine: each emitted once and in order (de-duplicated by key
//! against the last `SEEN`), the history backfill after a reconnect (`getJwt`, then history
//! within `history_per_minute`), the live messages held behind it, and who sent each one. Its own
//! file because the exactly-once, in-order rule spans the live path and the backfill and is
//! easiest to check in one place.

use super::*;

impl Machine {
    pub(super) fn start_backfill(&mut self, now: Instant, out: &mut Vec<Action>) {
        while self
            .history_calls
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            self.history_calls.pop_front();
        }
        if self.history_calls.len() < self.s.history_per_minute as usize {
            self.backfill = Backfill::WantJwt;
            out.push(Action::Write(Out::GetJwt));
        } else {
            let at = self.history_calls[0] + Duration::from_secs(60);
            self.backfill = Backfill::Due(at);
        }
    }

    fn reconnected(&mut self, backfilled: u32, now: Instant, out: &mut Vec<Action>) {
        let downtime = self
            .lost_at
            .take()
            .map_or(0, |t| ms(now.saturating_duration_since(t)));
        out.push(Action::Emit(EventKind::Reconnected {
            downtime_ms: downtime,
            backfilled,
        }));
    }

    pub(super) fn history(
        &mut self,
        messages: Result<Vec<StructuredMessage>, String>,
        calls: u32,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        for _ in 0..calls {
            self.history_calls.push_back(now);
        }
        if self.backfill != Backfill::Fetching {
            return;
        }
        self.backfill = Backfill::Idle;
        match messages {
            Ok(mut msgs) => {
                // Oldest first: the pages come newest first (the reference, the emulator, the
                // Transport SDK's fixtures), so reverse them, then order by time with a stable
                // sort, so messages of the same millisecond keep the platform's order
                // ([UNCERTAIN] the page order in the reference); then only what follows the
                // last message seen.
                msgs.reverse();
                msgs.sort_by(|a, b| {
                    let t = |m: &StructuredMessage| m.channel.as_ref().and_then(|c| c.time.clone());
                    t(a).cmp(&t(b))
                });
                let start = match &self.last_key {
                    Some(k) => msgs.iter().position(|m| m.key() == k).map_or(0, |i| i + 1),
                    None => 0,
                };
                let mut n = 0;
                for m in msgs.into_iter().skip(start) {
                    if self.message(m, true, now, out) {
                        n += 1;
                    }
                }
                self.reconnected(n, now, out);
            }
            Err(e) => {
                out.push(Action::Emit(EventKind::StreamError {
                    detail: format!("history backfill failed: {e}"),
                }));
                self.reconnected(0, now, out);
            }
        }
        self.release_held(out);
    }

    /// Emit the live messages held behind a backfill, in arrival order (those a backfill
    /// already emitted are skipped as seen).
    pub(super) fn release_held(&mut self, out: &mut Vec<Action>) {
        while let Some((m, at)) = self.held.pop_front() {
            self.message(m, false, at, out);
        }
    }

    /// Emit a message once; whether it was new.
    pub(super) fn message(
        &mut self,
        m: StructuredMessage,
        backfilled: bool,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> bool {
        let key = m.key().to_string();
        // Events and delivery receipts are not messages (a Receipt is the platform saying a
        // message was delivered or read).
        if m.kind == "Event" || m.kind == "Receipt" || self.seen.contains(&key) {
            return false;
        }
        if self.seen.len() >= SEEN {
            self.seen.pop_front();
        }
        self.seen.push_back(key.clone());
        self.last_key = Some(key.clone());
        if !backfilled {
            self.activity(now);
        }
        let (sender_id, role) = sender(&m);
        out.push(Action::Emit(EventKind::Message {
            message_id: key,
            sender_id: sender_id.into(),
            sender_role: role.into(),
            body_type: if m.kind == "Text" || m.kind == "Structured" {
                "standard".into()
            } else {
                "unknown".into()
            },
            body: if self.s.include_bodies {
                m.text.clone()
            } else {
                None
            },
            timestamp: m
                .channel
                .as_ref()
                .and_then(|c| c.time.clone())
                .unwrap_or_default(),
            backfilled,
        }));
        true
    }
}

/// The sender of a message as guestd names it: the guest (`Inbound`), else the agent (`Human`)
/// or a flow/bot.
fn sender(m: &StructuredMessage) -> (&'static str, &'static str) {
    if m.direction == "Inbound" {
        ("guest", "customer")
    } else if m.originating_entity.as_deref() == Some("Human") {
        ("agent", "agent")
    } else {
        ("bot", "workflow")
    }
}
