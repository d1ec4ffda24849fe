//! The roster: who is in the chat, in which role and state, as member-change frames and members
//! lists tell it. Frames keep their order: one that names a member whose role is unknown waits
//! for the members list, later ones wait behind it, and all are replayed in arrival order, each
//! at the instant it arrived, before an end is decided (see `docs/events.md`).

use super::*;

/// Times the members list is asked again when it predates the guest's DISCONNECTED frame.
pub(super) const MAX_GONE_REFETCHES: u8 = 3;
/// Times the members list is asked again for a member it does not list yet.
pub(super) const MAX_ROLE_REFETCHES: u8 = 3;
/// Times a failed members list is retried while frames wait for roles or an end waits for it.
pub(super) const MAX_LOOKUP_RETRIES: u8 = 3;

/// One member as the machine knows it.
#[derive(Debug)]
pub(super) struct Member {
    /// Unknown until a members list says.
    pub(super) role: Option<Role>,
    pub(super) state: MemberState,
}

impl Machine {
    pub(super) fn fetch(&mut self, why: Fetch, out: &mut Vec<Action>) {
        match self.fetching {
            // A stronger reason replaces a weaker one in flight; its result is read with it.
            Some(current) if current != Fetch::Refresh || why == Fetch::Refresh => {}
            Some(_) => self.fetching = Some(why),
            None => {
                self.fetching = Some(why);
                out.push(Action::FetchMembers);
            }
        }
    }

    pub(super) fn member(&self, id: &str) -> Option<&Member> {
        self.members.iter().find(|(m, _)| m == id).map(|(_, k)| k)
    }

    pub(super) fn role_name(&self, id: &str) -> String {
        let role = self
            .member(id)
            .and_then(|k| k.role)
            .unwrap_or(Role::Unknown);
        role.as_str().to_string()
    }

    pub(super) fn on_member_change(
        &mut self,
        id: String,
        state: MemberState,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        // Frame order is evidence: once one frame waits for a role, later ones wait behind it.
        if !self.held_members.is_empty() || self.member(&id).is_none() {
            self.held_members.push((id, state, now));
            self.fetch(Fetch::Refresh, out);
            return;
        }
        self.apply_member(&id, None, state, now, out);
    }

    /// Record a member's role (from a members list) without touching its state.
    pub(super) fn learn_role(&mut self, id: &str, role: Role) {
        self.entry(id).role = Some(role);
    }

    /// The member `id`, added with an unknown role and state when first met.
    fn entry(&mut self, id: &str) -> &mut Member {
        let at = match self.members.iter().position(|(m, _)| m == id) {
            Some(i) => i,
            None => {
                self.members.push((
                    id.to_string(),
                    Member {
                        role: None,
                        state: MemberState::Unknown,
                    },
                ));
                self.members.len() - 1
            }
        };
        &mut self.members[at].1
    }

    pub(super) fn apply_member(
        &mut self,
        id: &str,
        role: Option<Role>,
        state: MemberState,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let known = self.entry(id);
        if role.is_some() {
            known.role = role;
        }
        if known.state == state {
            return;
        }
        known.state = state;
        let role = known.role.unwrap_or(Role::Unknown);
        out.push(Action::Emit(EventKind::MemberChanged {
            member_id: id.to_string(),
            role: role.as_str().into(),
            state: state.as_str().into(),
        }));
        match (role, state) {
            (Role::Agent, MemberState::Connected) if self.agent.is_none() => {
                self.agent = Some(id.to_string());
                // The agent connected before a restart: its clock runs from then.
                let restored = self
                    .restored_agent
                    .take()
                    .filter(|(a, _)| a == id)
                    .map(|(_, t)| t);
                self.agent_since = Some(restored.unwrap_or(now));
                self.agent_ever = true;
                self.warned = false;
                out.push(Action::Emit(EventKind::AgentConnected {
                    member_id: id.to_string(),
                }));
            }
            (Role::Agent, MemberState::Disconnected) => {
                // Any agent leaving is evidence, even one whose CONNECTED guestd missed; after
                // the guest left, an agent leaving is not why the chat ended.
                self.agent_ever = true;
                let restored = self.restored_agent.as_ref().is_some_and(|(a, _)| a == id);
                if (restored || self.agent.as_deref() == Some(id))
                    && self
                        .evidence_deadline()
                        .is_some_and(|dl| now + self.timing.inactivity_skew >= dl)
                {
                    self.idle_ended = true;
                }
                if restored && !self.guest_gone {
                    self.restored_agent = None;
                }
                if !self.guest_gone {
                    self.last_agent_left = Some(now);
                }
                if self.agent.as_deref() == Some(id) {
                    self.agent = None;
                    self.agent_since = None;
                    out.push(Action::Emit(EventKind::AgentDisconnected {
                        member_id: id.to_string(),
                    }));
                }
            }
            (Role::Workflow, MemberState::Disconnected) if !self.guest_gone => {
                self.workflow_left = true
            }
            _ => {}
        }
        if id == self.guest_id && state == MemberState::Disconnected && !self.reconciling {
            // A frame (or a held frame replayed): the stream was up when it was sent.
            if self.at_gone.is_none() {
                let mut e = self.snapshot(now);
                e.stream = Stream::Up;
                self.at_gone = Some(e);
            }
            self.guest_gone = true;
            if self.held_members.is_empty()
                && self.fetching.is_none()
                && self.deferred_list.is_none()
            {
                self.decide(now, out);
            }
            // Otherwise roles or states are still on their way: decide when the list is in.
        }
    }

    pub(super) fn on_members(
        &mut self,
        r: Result<Vec<ChatMember>, Failure>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let why = self.fetching.take().unwrap_or(Fetch::Refresh);
        let held = std::mem::take(&mut self.held_members);
        let list = match r {
            Ok(list) => list,
            Err(f) => return self.on_members_failed(why, f, held, now, out),
        };
        if self.backfilling.is_some() {
            self.held_members = held;
            self.deferred_list = Some((why, list));
            // Backfilled messages waiting for roles: this list gives them (then the held
            // frames are replayed and the list read, in that order).
            return self.release_roles_wait(now, out);
        }
        self.lookup_retries = 0;
        let guest_left_in_list = list
            .iter()
            .any(|m| m.id == self.guest_id && m.state == MemberState::Disconnected);
        let guest_left_in_frames = self.guest_gone
            || held
                .iter()
                .any(|(id, s, _)| *id == self.guest_id && *s == MemberState::Disconnected);
        if guest_left_in_frames && !guest_left_in_list && self.gone_refetches < MAX_GONE_REFETCHES {
            // The list predates the guest's DISCONNECTED: ask again before deciding.
            self.gone_refetches += 1;
            self.held_members = held;
            return self.fetch(Fetch::Refresh, out);
        }
        if guest_left_in_list {
            self.guest_left_ms = list
                .iter()
                .find(|m| m.id == self.guest_id)
                .and_then(|m| m.leave_date.as_deref())
                .and_then(ending::instant_ms);
            self.dates = ending::by_dates(
                &list,
                &self.guest_id,
                self.agent_ever,
                self.timing.agent_end_window,
            );
        }
        let all_gone = list.len() > 1 && list.iter().all(|m| m.state == MemberState::Disconnected);
        // Roles first, then the held frames in the order they arrived: that order is evidence
        // (an agent who joined and left before the guest), and deciding from the list alone
        // would throw it away.
        for m in &list {
            self.learn_role(&m.id, m.role);
        }
        let mut held = held.into_iter();
        // Each frame is applied at the instant it arrived: when an agent connected is when the
        // no-activity clock starts, however long its role took to learn.
        while let Some((id, state, at)) = held.next() {
            if self.ended.is_some() {
                return;
            }
            let listed = list.iter().any(|m| m.id == id);
            if !listed && self.role_refetches < MAX_ROLE_REFETCHES && !guest_left_in_list {
                // Joined after the list was taken: ask again, keeping the order.
                self.role_refetches += 1;
                self.held_members = std::iter::once((id, state, at)).chain(held).collect();
                return self.fetch(Fetch::Refresh, out);
            }
            self.apply_member(&id, None, state, at, out);
        }
        self.role_refetches = 0;
        if self.ended.is_some() {
            return;
        }
        // Then the list's own states, the guest last; an end they show is decided on the
        // evidence as it stood before them.
        let pre = self.snapshot(now);
        self.reconciling = true;
        let (guest, others): (Vec<_>, Vec<_>) =
            list.into_iter().partition(|m| m.id == self.guest_id);
        for m in others.iter().chain(guest.iter()) {
            self.apply_member(&m.id, Some(m.role), m.state, now, out);
        }
        self.reconciling = false;
        if guest_left_in_list || all_gone || self.guest_gone {
            return self.decide_with(pre, now, out);
        }
        match why {
            Fetch::GaveUp => self.end(
                EndReason::ReconnectGraceExpired,
                "no reconnect within the grace window".into(),
                now,
                out,
            ),
            // 404 on the stream but the guest is still in: try the stream again.
            Fetch::Gone if matches!(self.link, Link::Down { .. }) => self.schedule(
                false,
                "the stream answered 404 but the guest is still in the chat",
                now,
                out,
            ),
            _ => {}
        }
    }

    pub(super) fn on_members_failed(
        &mut self,
        why: Fetch,
        f: Failure,
        held: Vec<(String, MemberState, Instant)>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        // Frames wait on this list, or an end does (the guest left, the grace ran out, the stream
        // answered 404): ask again rather than guess.
        let waiting = !held.is_empty()
            || self.guest_gone
            || why != Fetch::Refresh
            || self.roles_wait.is_some();
        if let Failure::Other(e) = &f {
            self.stream_error(format!("list members failed: {e}"), now, out);
            if waiting && self.lookup_retries < MAX_LOOKUP_RETRIES {
                self.lookup_retries += 1;
                self.held_members = held;
                return self.fetch(why, out);
            }
        }
        // No list to be had: apply the frames as they came, with the roles known so far.
        for (id, state, at) in held {
            self.apply_member(&id, None, state, at, out);
        }
        if self.ended.is_some() {
            return;
        }
        // Backfilled messages waiting for roles go out with the roles known so far.
        self.release_roles_wait(now, out);
        if self.ended.is_some() {
            return;
        }
        if self.guest_gone {
            return self.decide(now, out);
        }
        match (why, f) {
            (Fetch::GaveUp, f) => self.end(
                EndReason::ReconnectGraceExpired,
                format!("no reconnect within the grace window (reconcile: {f})"),
                now,
                out,
            ),
            (_, Failure::Unauthorized(m)) => self.end(
                EndReason::TokenExpired,
                format!("list members refused the jwt (401): {m}"),
                now,
                out,
            ),
            (_, Failure::NotFound(m)) => self.end(
                EndReason::ServerEnded,
                format!("the conversation is gone (404): {m}"),
                now,
                out,
            ),
            (Fetch::Gone, Failure::Other(m)) if matches!(self.link, Link::Down { .. }) => self
                .schedule(
                    false,
                    &format!("the stream answered 404 and list members failed: {m}"),
                    now,
                    out,
                ),
            (_, Failure::Other(_)) => {}
        }
    }
}
