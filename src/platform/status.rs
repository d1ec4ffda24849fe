//! "Is conversation X still alive?" for any conversation, held or not. The answer comes from the
//! best source at hand, in this order:
//!
//! 1. guestd's own view, when it holds the chat (`source: "guestd"`), with when and why the
//!    platform will end it if nothing happens (`ends_at`, `ends_because`);
//! 2. the end guestd reported, while it is remembered (`source: "remembered"`: this node's
//!    memory, its journal after a restart, or, in cluster mode, the node that reported it; see
//!    `crate::ends`);
//! 3. the Platform API, when `[platform]` is configured: over once it shows an `endTime`, with
//!    each participant's `disconnectType` (`source: "platform"`);
//! 4. the guest API's members list, when the caller gives the chat's jwt: over once every member
//!    is DISCONNECTED (`source: "guest_api"`);
//!
//! else an error that says what would answer it.

use crate::events::{EndReason, Participant};
use crate::platform::api::platform_reason;
use crate::secret::Secret;
use crate::transport::policy::ApiError;
use serde::Serialize;

/// Why `status` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The question was wrong, or nothing configured can answer it.
    #[error("{0}")]
    Invalid(String),
    /// The platform refused or failed the call.
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// A conversation's status.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ConversationStatus {
    /// The conversation asked about.
    pub conversation_id: String,
    /// Still going (false: over for good; a conversation never reopens).
    pub alive: bool,
    /// Who answered: `guestd`, `remembered`, `platform` or `guest_api`.
    pub source: &'static str,
    /// guestd's session, when it holds the chat.
    pub session: Option<String>,
    /// Why it ended: guestd's reason, or the one the platform's disconnect types map to.
    pub reason: Option<EndReason>,
    /// The platform's `endTime`, when it gave one.
    pub end_time: Option<String>,
    /// Each participant and how its leg ended, when the platform said.
    pub participants: Vec<Participant>,
    /// When guestd reported the end (`source: "remembered"`): the `ended` event's `ts`.
    pub ended_at: Option<String>,
    /// How guestd knew (the `ended` event's detail; `remembered`).
    pub detail: Option<String>,
    /// How long the chat lasted (the `ended` event's; `remembered`).
    pub duration_ms: Option<u64>,
    /// The platform's account of the end (`end_confirmed`), when there was one.
    pub confirmation: Option<Box<crate::ends::Confirmation>>,
    /// A live chat held here: when the platform ends it if nothing happens (RFC 3339); null
    /// while nothing would (queued, socket up) or once over.
    pub ends_at: Option<String>,
    /// Why it would end then: `inactivity_timeout`, `reconnect_grace_expired`,
    /// `session_expired`.
    pub ends_because: Option<EndReason>,
}

impl ConversationStatus {
    fn new(conversation_id: &str) -> Self {
        ConversationStatus {
            conversation_id: conversation_id.to_string(),
            alive: true,
            source: "guestd",
            session: None,
            reason: None,
            end_time: None,
            participants: Vec::new(),
            ended_at: None,
            detail: None,
            duration_ms: None,
            confirmation: None,
            ends_at: None,
            ends_because: None,
        }
    }

    /// The answer a remembered end gives.
    pub fn remembered(r: crate::ends::EndRecord) -> Self {
        let mut out = ConversationStatus::new(&r.conversation_id);
        out.alive = false;
        out.source = "remembered";
        out.session = Some(r.session);
        out.reason = Some(r.reason);
        out.ended_at = Some(r.ended_at);
        out.detail = Some(r.detail);
        out.duration_ms = Some(r.duration_ms);
        if let Some(c) = &r.confirmation {
            out.end_time = c.platform_end_time.clone();
            out.participants = c.participants.clone();
        }
        out.confirmation = r.confirmation;
        out
    }
}

/// The same from explicit sources (`guestd status` without a running guestd passes no view).
pub async fn status_from(
    held: Option<crate::session::SessionView>,
    platform: Option<&crate::platform::api::PlatformApi>,
    backends: &crate::session::Backends,
    conversation_id: &str,
    jwt: Option<Secret>,
) -> Result<ConversationStatus, StatusError> {
    crate::transport::policy::check_id("conversation_id", conversation_id)
        .map_err(|e| StatusError::Invalid(e.to_string()))?;
    let mut out = ConversationStatus::new(conversation_id);
    if let Some(view) = held {
        out.alive = view.ended.is_none();
        out.session = Some(view.session);
        out.reason = view.ended;
        out.ends_at = view.ends_at;
        out.ends_because = view.ends_because;
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
        return Err(StatusError::Invalid(format!(
            "guestd does not hold {conversation_id}, and without [platform] or the chat's jwt \
             nothing else can answer"
        )));
    };
    let Some(asked) = backends
        .all()
        .find_map(|b| b.alive_by_credential(conversation_id, jwt.clone()))
    else {
        return Err(StatusError::Invalid(format!(
            "guestd does not hold {conversation_id}, and no backend can answer from a jwt"
        )));
    };
    let alive = match asked.await {
        Ok(alive) => alive,
        // A refused jwt says nothing certain about the chat: say so.
        Err(ApiError::Unauthorized(m)) => {
            return Err(StatusError::Invalid(format!(
                "the guest API refused the jwt ({m}); it may have expired with a chat long over"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    out.source = "guest_api";
    out.alive = alive;
    Ok(out)
}
