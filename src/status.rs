//! "Is conversation X still alive?" for any conversation, held or not. The answer comes from the
//! best source at hand, in this order:
//!
//! 1. guestd's own view, when it holds the chat (`source: "guestd"`);
//! 2. the Platform API, when `[platform]` is configured: over once it shows an `endTime`, with
//!    each participant's `disconnectType` (`source: "platform"`);
//! 3. the guest API's members list, when the caller gives the chat's jwt: over once every member
//!    is DISCONNECTED (`source: "guest_api"`);
//!
//! else an error that says what would answer it.

use crate::backend::{ApiError, ChatRef, MemberState};
use crate::events::{EndReason, Participant};
use crate::genesys::platform::platform_reason;
use crate::secret::Secret;
use crate::supervisor::{Supervisor, SupervisorError};
use serde::Serialize;

/// A conversation's status.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ConversationStatus {
    /// The conversation asked about.
    pub conversation_id: String,
    /// Still going (false: over for good; a conversation never reopens).
    pub alive: bool,
    /// Who answered: `guestd`, `platform` or `guest_api`.
    pub source: &'static str,
    /// guestd's session, when it holds the chat.
    pub session: Option<String>,
    /// Why it ended: guestd's reason, or the one the platform's disconnect types map to.
    pub reason: Option<EndReason>,
    /// The platform's `endTime`, when it gave one.
    pub end_time: Option<String>,
    /// Each participant and how its leg ended, when the platform said.
    pub participants: Vec<Participant>,
}

/// The status of `conversation_id`; `jwt` lets the guest API answer for a chat neither guestd
/// holds nor the Platform API can be asked about.
pub async fn status(
    sup: &Supervisor,
    conversation_id: &str,
    jwt: Option<Secret>,
) -> Result<ConversationStatus, SupervisorError> {
    // Before anything else: the id goes into Platform API and guest API URLs.
    crate::backend::check_id("conversation_id", conversation_id)
        .map_err(|e| SupervisorError::Invalid(e.to_string()))?;
    let held = sup.get(conversation_id).await.ok();
    status_from(
        held,
        sup.platform(),
        sup.api().as_ref(),
        conversation_id,
        jwt,
    )
    .await
}

/// The same from explicit sources (`guestd status` without a running guestd passes no view).
pub async fn status_from(
    held: Option<crate::session::SessionView>,
    platform: Option<&crate::genesys::platform::PlatformApi>,
    api: &dyn crate::backend::ChatApi,
    conversation_id: &str,
    jwt: Option<Secret>,
) -> Result<ConversationStatus, SupervisorError> {
    crate::backend::check_id("conversation_id", conversation_id)
        .map_err(|e| SupervisorError::Invalid(e.to_string()))?;
    let mut out = ConversationStatus {
        conversation_id: conversation_id.to_string(),
        alive: true,
        source: "guestd",
        session: None,
        reason: None,
        end_time: None,
        participants: Vec::new(),
    };
    if let Some(view) = held {
        out.alive = view.ended.is_none();
        out.session = Some(view.session);
        out.reason = view.ended;
        return Ok(out);
    }
    if let Some(platform) = platform {
        let c = platform.conversation(conversation_id).await?;
        out.source = "platform";
        out.alive = c.end_time.is_none();
        out.reason = platform_reason(&c).ok();
        out.end_time = c.end_time.clone();
        out.participants = c.summary();
        return Ok(out);
    }
    let Some(jwt) = jwt else {
        return Err(SupervisorError::Invalid(format!(
            "guestd does not hold {conversation_id}, and without [platform] or the chat's jwt \
             nothing else can answer"
        )));
    };
    let chat = ChatRef {
        conversation_id: conversation_id.to_string(),
        member_id: String::new(),
        jwt,
        event_stream_uri: String::new(),
    };
    let members = match api.list_members(&chat).await {
        Ok(m) => m,
        // A refused jwt says nothing certain about the chat: say so.
        Err(ApiError::Unauthorized(m)) => {
            return Err(SupervisorError::Invalid(format!(
                "the guest API refused the jwt ({m}); it may have expired with a chat long over"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    out.source = "guest_api";
    out.alive =
        !(members.is_empty() || members.iter().all(|m| m.state == MemberState::Disconnected));
    Ok(out)
}
