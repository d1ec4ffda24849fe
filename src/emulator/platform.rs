//! The Platform API side of the emulator: the OAuth client-credentials grant and the
//! conversation view (`GET /api/v2/conversations/{id}` and `/api/v2/conversations/chats/{id}`),
//! shaped like the founding forum thread's example and consistent with how each chat really
//! ended in the emulator.
//!
//! `disconnectType` says who ended a participant's leg: `client` (the participant itself),
//! `peer` (the other side). From the public record: the guest leaving gives the customer
//! `client` and the others `peer`. The rest are guesses with knobs (docs/emulator.md): an agent's
//! end gives the agent `client`; a flow's Disconnect gives the workflow `client`; a guest lost
//! through its connection gets `platform_lost_connection_type` (`transport.failure`); the
//! no-activity rule gets `platform_inactivity_type` (`timeout`); a server end `system`; a flow
//! that handed the chat to an agent `transfer`.

use super::EmulatorConfig;
use super::world::{Conv, EndCause};
use crate::backends::guest_chat::protocol::{MemberState, Role};
use serde_json::{Value, json};

/// The conversation as the Platform API shows it.
pub(crate) fn conversation_view(c: &Conv, cfg: &EmulatorConfig) -> Value {
    let leg_type = |role: Role, id: &str| -> Option<&str> {
        let ended_by = c.ended?;
        let guest = id == c.guest_id;
        Some(match (ended_by, role) {
            (EndCause::GuestLeft, _) if guest => "client",
            (EndCause::AgentEnded, Role::Agent) => "client",
            (EndCause::FlowDisconnected, Role::Workflow) => "client",
            (EndCause::GraceExpired, _) if guest => cfg.platform_lost_connection_type.as_str(),
            (EndCause::Inactivity, _) if guest => cfg.platform_inactivity_type.as_str(),
            (EndCause::Server, _) if guest => "system",
            _ => "peer",
        })
    };
    let mut participants = Vec::new();
    for m in &c.members {
        let purpose = match m.role {
            Role::Customer => "customer",
            Role::Agent => "agent",
            Role::Workflow => "workflow",
            Role::Acd => "acd",
            Role::Unknown => "unknown",
        };
        let gone = m.state == MemberState::Disconnected;
        // A flow that left while the chat went on handed it over.
        let disconnect = if !gone {
            None
        } else if m.role == Role::Workflow
            && c.ended.is_some_and(|e| e != EndCause::FlowDisconnected)
            && m.leave_date.is_some()
            && c.agent_connected_at.is_some()
            && !matches!(leg_type(m.role, &m.id), Some("client"))
        {
            Some("transfer")
        } else {
            leg_type(m.role, &m.id).or(Some("peer"))
        };
        let mut segment = json!({"startTime": m.join_date, "type": "Interact"});
        // The keys and nesting of a published answer (tests/fixtures/genesys,
        // platform_customer_participant.forum-15561.json), values the emulator's own.
        let mut chat = json!({
            "state": if gone { "disconnected" } else { "connected" },
            "id": m.id,
            "held": false,
            "direction": "inbound",
            "connectedTime": m.join_date,
            "provider": "PureCloud Webchat v2",
            "afterCallWork": {},
            "afterCallWorkRequired": false,
            "initialState": "connected",
        });
        if gone {
            segment["endTime"] = json!(m.leave_date);
            segment["howEnded"] = json!("Disconnect");
            segment["disconnectType"] = json!(disconnect);
            chat["disconnectType"] = json!(disconnect);
            chat["disconnectedTime"] = json!(m.leave_date);
        }
        chat["segments"] = json!([segment]);
        // What the guest gave at create, as the platform's `context.` attributes.
        let attributes: serde_json::Map<String, Value> = m
            .first_name
            .iter()
            .map(|v| ("context.firstName".to_string(), json!(v)))
            .chain(
                m.last_name
                    .iter()
                    .map(|v| ("context.lastName".to_string(), json!(v))),
            )
            .chain(
                m.custom_fields
                    .iter()
                    .map(|(k, v)| (format!("context.{k}"), json!(v))),
            )
            .collect();
        let mut p = json!({
            "id": m.id,
            "purpose": purpose,
            "name": m.display_name,
            "startTime": m.join_date,
            "connectedTime": m.join_date,
            "wrapupRequired": false,
            "attributes": attributes,
            "calls": [],
            "callbacks": [],
            "chats": [chat],
            "cobrowsesessions": [],
            "emails": [],
            "messages": [],
            "screenshares": [],
            "socialExpressions": [],
            "videos": [],
        });
        if gone {
            p["endTime"] = json!(m.leave_date);
        }
        participants.push(p);
    }
    let mut v = json!({
        "id": c.id,
        "startTime": c.members.first().and_then(|m| m.join_date.clone()),
        "participants": participants,
        "recordingState": "none",
        "divisions": [],
        "selfUri": format!("/api/v2/conversations/{}", c.id),
    });
    if c.ended.is_some() {
        // Over once every leg is: the last leave date.
        v["endTime"] = json!(c.members.iter().filter_map(|m| m.leave_date.clone()).max());
    }
    v
}
