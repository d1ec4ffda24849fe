//! Why a chat ended: a pure function of the evidence a session holds when its guest goes
//! DISCONNECTED.
//!
//! The platform never says why a guest chat ended; guestd infers it. The machine gathers the
//! evidence into an [`Evidence`] value and [`infer`] reads it in one documented order (the same
//! order as `docs/events.md`), the strongest evidence first:
//!
//! 1. guestd asked the guest to leave -> `guest_left`;
//! 2. guestd's own no-activity deadline had passed (within `inactivity_skew`) when the chat ended
//!    (the guest's leave date when guestd learned of the end late; the deadline survives a
//!    restart through the journal), or the agent left at it -> `inactivity_timeout`;
//! 3. the members list's leave dates, compared as instants: an agent that left at or before the
//!    guest (and at most `agent_end_window` before it, with no agent leaving after the guest)
//!    -> `agent_ended`; with no agent ever, a workflow that did -> `flow_ended`. Equal dates are
//!    the platform's normal case: it closes the guest's leg in the operation that ends the agent's;
//! 4. the order of member-change frames, read once every member's role is known: an agent went
//!    DISCONNECTED at most `agent_end_window` before the guest -> `agent_ended`; no agent ever
//!    connected and a workflow went DISCONNECTED first -> `flow_ended`;
//! 5. the end happened while the stream was down (reconnecting, or guestd itself was down) and
//!    nothing above explains it -> `reconnect_grace_expired`;
//! 6. otherwise -> `server_ended`.
//!
//! A 401 (`token_expired`) is not inferred here: it is decided the moment the 401 arrives, since
//! the guest has not been seen to leave at all.

use crate::backends::guest_chat::api::{ChatMember, MemberState, Role};
use crate::events::EndReason;
use std::time::Duration;

/// What the members list's leave dates say about who left first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByDates {
    /// An agent left at or just before the guest, and no agent stayed after the guest.
    AgentFirst,
    /// No agent ever joined, and a workflow left at or just before the guest.
    FlowFirst,
    /// The dates name no cause (the guest left first, or the others left long before).
    NoCause,
}

/// What the order of member-change frames said when the guest went DISCONNECTED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ByFrames {
    /// An agent went DISCONNECTED at most `agent_end_window` before the guest.
    pub agent_just_before: bool,
    /// No agent ever connected and a workflow went DISCONNECTED before the guest.
    pub flow_without_agent: bool,
}

/// The state of the event stream when the guest's end became known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Open: the guest's DISCONNECTED arrived as a frame, or with the stream up.
    Up,
    /// Lost, and guestd had reconnected since starting; `grace_elapsed` once the window ran out.
    Reconnecting {
        /// The grace window had run out.
        grace_elapsed: bool,
    },
    /// Never open in this process since a restart: the chat ended while guestd was down.
    GuestdWasDown,
}

/// Everything the session knows when it decides why its chat ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evidence {
    /// guestd sent (or is sending) the leave call.
    pub leave_requested: bool,
    /// guestd's own no-activity deadline was reached, within the configured skew.
    pub inactivity_due: bool,
    /// The members list's leave dates, when a list showed the guest DISCONNECTED with a date.
    pub dates: Option<ByDates>,
    /// The frames' order.
    pub frames: ByFrames,
    /// The stream's state.
    pub stream: Stream,
}

/// Why the chat ended, with a one-line detail for the `ended` event.
pub fn infer(e: &Evidence) -> (EndReason, &'static str) {
    if e.leave_requested {
        return (EndReason::GuestLeft, "guest left on request");
    }
    if e.inactivity_due {
        return (
            EndReason::InactivityTimeout,
            "the platform ended it at the no-activity deadline",
        );
    }
    match e.dates {
        Some(ByDates::AgentFirst) => {
            return (
                EndReason::AgentEnded,
                "the agent left at or before the guest (members' leave dates)",
            );
        }
        Some(ByDates::FlowFirst) => {
            return (
                EndReason::FlowEnded,
                "a flow left at or before the guest and no agent joined (members' leave dates)",
            );
        }
        Some(ByDates::NoCause) | None => {}
    }
    if e.frames.agent_just_before {
        return (
            EndReason::AgentEnded,
            "the agent disconnected just before the guest",
        );
    }
    if e.frames.flow_without_agent {
        return (
            EndReason::FlowEnded,
            "a flow disconnected the chat before any agent connected",
        );
    }
    match e.stream {
        Stream::Reconnecting {
            grace_elapsed: true,
        } => (
            EndReason::ReconnectGraceExpired,
            "no reconnect within the grace window",
        ),
        Stream::Reconnecting {
            grace_elapsed: false,
        } => (
            EndReason::ReconnectGraceExpired,
            "the platform disconnected the guest while guestd was reconnecting",
        ),
        Stream::GuestdWasDown => (
            EndReason::ReconnectGraceExpired,
            "the chat ended while guestd was down, and nothing else explains it",
        ),
        Stream::Up => (
            EndReason::ServerEnded,
            "the guest went DISCONNECTED without a known cause",
        ),
    }
}

/// A leave date as milliseconds since the Unix epoch. RFC 3339 with or without a fraction (a
/// missing fraction is `.000`) and with any offset; None for anything else. Dates are compared as
/// instants, never as strings: `10:00:05Z` is before `10:00:05.120Z`.
pub fn instant_ms(date: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(date.trim())
        .ok()
        .map(|d| d.timestamp_millis())
}

/// Read the members list's leave dates. None when the list does not show the guest DISCONNECTED
/// with a readable leave date (then the dates say nothing either way).
///
/// `agent_ever` is whether guestd saw an agent connect (an agent may be missing from the list).
pub fn by_dates(
    list: &[ChatMember],
    guest_id: &str,
    agent_ever: bool,
    window: Duration,
) -> Option<ByDates> {
    let guest = list
        .iter()
        .find(|m| m.id == guest_id && m.state == MemberState::Disconnected)?;
    let g = instant_ms(guest.leave_date.as_deref()?)?;
    let window = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    // When a member left, if it did; `i64::MAX` for one still in the chat (it left after the guest).
    let left = |m: &ChatMember| match m.state {
        MemberState::Disconnected => m.leave_date.as_deref().and_then(instant_ms),
        _ => Some(i64::MAX),
    };
    let just_before = |t: i64| t <= g && g - t <= window;
    let of = |role: Role| {
        list.iter()
            .filter(move |m| m.role == role && m.id != guest_id)
    };
    let agents: Vec<Option<i64>> = of(Role::Agent).map(left).collect();
    // An agent still there after the guest left means the guest's leg ended first.
    let agent_stayed = agents.iter().any(|t| t.is_some_and(|t| t > g));
    if !agent_stayed && agents.iter().any(|t| t.is_some_and(just_before)) {
        return Some(ByDates::AgentFirst);
    }
    let any_agent = agent_ever || !agents.is_empty();
    if !any_agent && of(Role::Workflow).any(|m| left(m).is_some_and(just_before)) {
        return Some(ByDates::FlowFirst);
    }
    Some(ByDates::NoCause)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(10);

    fn m(id: &str, role: Role, left: Option<&str>) -> ChatMember {
        ChatMember {
            id: id.into(),
            role,
            state: if left.is_some() {
                MemberState::Disconnected
            } else {
                MemberState::Connected
            },
            leave_date: left.map(str::to_string),
        }
    }

    fn ev() -> Evidence {
        Evidence {
            leave_requested: false,
            inactivity_due: false,
            dates: None,
            frames: ByFrames::default(),
            stream: Stream::Up,
        }
    }

    /// The documented order, one row per step: each row holds every weaker piece of evidence
    /// too, so a wrong order fails.
    #[test]
    fn infer_reads_the_evidence_in_the_documented_order() {
        let all_weaker = |mut e: Evidence| {
            e.frames = ByFrames {
                agent_just_before: true,
                flow_without_agent: true,
            };
            e.stream = Stream::Reconnecting {
                grace_elapsed: true,
            };
            e
        };
        let rows: Vec<(Evidence, EndReason)> = vec![
            (
                Evidence {
                    leave_requested: true,
                    inactivity_due: true,
                    dates: Some(ByDates::AgentFirst),
                    ..all_weaker(ev())
                },
                EndReason::GuestLeft,
            ),
            (
                Evidence {
                    inactivity_due: true,
                    dates: Some(ByDates::AgentFirst),
                    ..all_weaker(ev())
                },
                EndReason::InactivityTimeout,
            ),
            (
                Evidence {
                    dates: Some(ByDates::AgentFirst),
                    ..all_weaker(ev())
                },
                EndReason::AgentEnded,
            ),
            (
                Evidence {
                    dates: Some(ByDates::FlowFirst),
                    ..all_weaker(ev())
                },
                EndReason::FlowEnded,
            ),
            (
                Evidence {
                    dates: Some(ByDates::NoCause),
                    ..all_weaker(ev())
                },
                EndReason::AgentEnded,
            ),
            (
                Evidence {
                    frames: ByFrames {
                        agent_just_before: false,
                        flow_without_agent: true,
                    },
                    stream: Stream::GuestdWasDown,
                    ..ev()
                },
                EndReason::FlowEnded,
            ),
            (
                Evidence {
                    stream: Stream::GuestdWasDown,
                    ..ev()
                },
                EndReason::ReconnectGraceExpired,
            ),
            (
                Evidence {
                    stream: Stream::Reconnecting {
                        grace_elapsed: false,
                    },
                    ..ev()
                },
                EndReason::ReconnectGraceExpired,
            ),
            (ev(), EndReason::ServerEnded),
        ];
        for (i, (e, want)) in rows.iter().enumerate() {
            assert_eq!(infer(e).0, *want, "row {i}: {e:?}");
        }
    }

    #[test]
    fn leave_dates_are_instants_not_strings() {
        assert_eq!(
            instant_ms("2026-11-26T10:00:05Z"),
            instant_ms("2026-11-26T10:00:05.000Z")
        );
        assert!(instant_ms("2026-11-26T10:00:05Z") < instant_ms("2026-11-26T10:00:05.120Z"));
        // As strings the two sort the other way round.
        assert!("2026-11-26T10:00:05Z" > "2026-11-26T10:00:05.120Z");
        assert_eq!(
            instant_ms("2026-11-26T11:00:05.120+01:00"),
            instant_ms("2026-11-26T10:00:05.120Z")
        );
        assert_eq!(instant_ms("yesterday"), None);
        assert_eq!(instant_ms(""), None);
    }

    #[test]
    fn dates_name_the_agent_on_a_tie_and_before_never_after() {
        let g = |d: &str| m("g", Role::Customer, Some(d));
        let t = "2026-11-26T10:00:05Z";
        // A tie, one side without a fraction.
        let list = [g(t), m("a", Role::Agent, Some("2026-11-26T10:00:05.000Z"))];
        assert_eq!(by_dates(&list, "g", true, W), Some(ByDates::AgentFirst));
        // The agent a few ms before, written with more digits than the guest.
        let list = [g(t), m("a", Role::Agent, Some("2026-11-26T10:00:04.997Z"))];
        assert_eq!(by_dates(&list, "g", true, W), Some(ByDates::AgentFirst));
        // The agent after the guest (which a string comparison got wrong).
        let list = [g(t), m("a", Role::Agent, Some("2026-11-26T10:00:05.120Z"))];
        assert_eq!(by_dates(&list, "g", true, W), Some(ByDates::NoCause));
        // An agent that left long ago (a transfer), then the guest was dropped.
        let list = [g(t), m("a", Role::Agent, Some("2026-11-26T09:00:00Z"))];
        assert_eq!(by_dates(&list, "g", true, W), Some(ByDates::NoCause));
        // A first agent left at the same moment, but a second was still there.
        let list = [
            g(t),
            m("a", Role::Agent, Some(t)),
            m("b", Role::Agent, None),
        ];
        assert_eq!(by_dates(&list, "g", true, W), Some(ByDates::NoCause));
    }

    #[test]
    fn dates_name_a_flow_only_when_no_agent_ever_joined() {
        let t = "2026-11-26T10:00:05.500Z";
        let list = [
            m("g", Role::Customer, Some(t)),
            m("f", Role::Workflow, Some(t)),
        ];
        assert_eq!(by_dates(&list, "g", false, W), Some(ByDates::FlowFirst));
        // guestd saw an agent (the list no longer shows it): the flow is not the cause.
        assert_eq!(by_dates(&list, "g", true, W), Some(ByDates::NoCause));
    }

    #[test]
    fn no_dates_no_verdict() {
        let list = [
            m("g", Role::Customer, None),
            m("a", Role::Agent, Some("2026-11-26T10:00:05Z")),
        ];
        assert_eq!(by_dates(&list, "g", true, W), None, "guest still connected");
        let mut g = m("g", Role::Customer, Some("x"));
        g.leave_date = None;
        assert_eq!(by_dates(&[g], "g", true, W), None, "no leave date");
    }
}
