//! Asking the platform how a chat ended: the Platform API (`GET /api/v2/conversations/{id}`)
//! with OAuth client credentials, for back ends that have them.
//!
//! guestd infers every end from what the guest side sees; the Platform API says it outright
//! through each participant's `disconnectType`. After each `ended`, guestd asks (after a short
//! delay, retrying while the conversation does not show its `endTime` yet) and writes an
//! `end_confirmed` event: the platform's `endTime`, each participant's purpose and
//! `disconnectType`, the reason those map to ([`platform_reason`], the one mapping table), and
//! whether it agrees with the inferred reason. Where the platform's answer does not name a
//! cause, it says so (`platform_reason: null`, `agrees: null`), never a guess dressed as fact.
//!
//! The access token (client-credentials grant, HTTP Basic to `POST /oauth/token` on the login
//! host) is cached and renewed before `expires_in` runs out, and once more on a 401. The client
//! id and secret are [`Secret`]s: never logged.

use crate::events::{EndReason, Event, EventKind, Participant};
use crate::platform::rest::{ClientConfig, Inner};
use crate::secret::Secret;
use crate::transport::policy::ApiError;
use reqwest::Method;
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the Platform API client needs.
#[derive(Debug, Clone)]
pub struct PlatformConfig {
    /// REST settings and the API base (`https://api.<region>`, or the emulator).
    pub rest: ClientConfig,
    /// Where `POST /oauth/token` goes (`https://login.<region>`, or the emulator).
    pub login_base: String,
    /// OAuth client id.
    pub client_id: Secret,
    /// OAuth client secret.
    pub client_secret: Secret,
    /// Wait this long after an `ended` before asking.
    pub confirm_delay: Duration,
    /// Ask at most this many times for a conversation to show its `endTime`.
    pub confirm_attempts: u32,
}

/// A conversation as the Platform API gives it (the fields guestd reads).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Conversation {
    /// Present once the conversation is over (it never reopens).
    #[serde(default)]
    pub end_time: Option<String>,
    /// Every participant.
    #[serde(default)]
    pub participants: Vec<ConversationParticipant>,
}

/// One participant.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConversationParticipant {
    /// `customer`, `workflow`, `acd`, `agent`, ...
    #[serde(default)]
    pub purpose: String,
    /// Its chat legs.
    #[serde(default)]
    pub chats: Vec<ChatLeg>,
}

/// One chat leg of a participant.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChatLeg {
    /// `connected` or `disconnected`.
    #[serde(default)]
    pub state: String,
    /// Who ended the leg: `client`, `peer`, `system`, `timeout`, `transport.failure`, ...
    #[serde(default)]
    pub disconnect_type: Option<String>,
    /// When it ended (RFC 3339).
    #[serde(default)]
    pub disconnected_time: Option<String>,
}

impl ConversationParticipant {
    /// How its (first ended) chat leg ended.
    pub fn disconnect_type(&self) -> Option<&str> {
        self.chats.iter().find_map(|c| c.disconnect_type.as_deref())
    }
}

impl Conversation {
    /// Each participant's purpose and `disconnectType`, as events and status report them.
    pub fn summary(&self) -> Vec<Participant> {
        self.participants
            .iter()
            .map(|p| Participant {
                purpose: p.purpose.clone(),
                disconnect_type: p.disconnect_type().map(str::to_string),
            })
            .collect()
    }

    fn disconnect_of(&self, purpose: &str) -> Option<&str> {
        self.participants
            .iter()
            .filter(|p| p.purpose == purpose)
            .find_map(ConversationParticipant::disconnect_type)
    }

    fn any_client(&self, purpose: &str) -> bool {
        self.participants
            .iter()
            .filter(|p| p.purpose == purpose)
            .flat_map(|p| p.chats.iter())
            .any(|c| c.disconnect_type.as_deref() == Some("client"))
    }
}

/// The one mapping from the platform's disconnect types to guestd's reasons (docs/events.md
/// has the same table). `Err` says why the answer names no cause.
pub fn platform_reason(c: &Conversation) -> Result<EndReason, String> {
    if c.end_time.is_none() {
        return Err("the platform does not show the conversation as over".into());
    }
    match c.disconnect_of("customer") {
        Some("client") => Ok(EndReason::GuestLeft),
        Some("peer") if c.any_client("agent") => Ok(EndReason::AgentEnded),
        Some("peer")
            if c.any_client("workflow") && !c.participants.iter().any(|p| p.purpose == "agent") =>
        {
            Ok(EndReason::FlowEnded)
        }
        Some("peer") => Err("the customer's leg ended by a peer no participant owns".into()),
        // Not in the public record; the emulator's knobs default to these.
        Some("timeout") => Ok(EndReason::InactivityTimeout),
        Some("transport.failure") => Ok(EndReason::ReconnectGraceExpired),
        Some("system") => Ok(EndReason::ServerEnded),
        Some(other) => Err(format!(
            "the customer's disconnectType {other:?} names no cause"
        )),
        None => Err("the customer's leg has no disconnectType".into()),
    }
}

/// Largest token reply read (an access token and its lifetime: well under 4 KiB).
const MAX_TOKEN_REPLY: usize = 64 << 10;

/// The Platform API client.
pub struct PlatformApi {
    rest: Inner,
    cfg: PlatformConfig,
    token: tokio::sync::Mutex<Option<(Secret, Instant)>>,
    /// (client id, client secret) now: `cfg`'s, until a reload (SIGHUP) replaces them.
    credentials: std::sync::RwLock<(Secret, Secret)>,
}

impl PlatformApi {
    /// A client; checks the URLs against the policy.
    pub fn new(cfg: PlatformConfig) -> Result<Self, ApiError> {
        crate::transport::policy::check_url(&cfg.login_base, cfg.rest.allow_insecure)?;
        Ok(PlatformApi {
            rest: Inner::new(cfg.rest.clone())?,
            credentials: std::sync::RwLock::new((cfg.client_id.clone(), cfg.client_secret.clone())),
            cfg,
            token: tokio::sync::Mutex::new(None),
        })
    }

    fn credentials(&self) -> (Secret, Secret) {
        match self.credentials.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Use these client credentials from now on (a reload); the token of the old ones is
    /// dropped, so the next call proves the new ones. Whether they changed.
    pub async fn set_credentials(&self, id: Secret, secret: Secret) -> bool {
        let changed = {
            let mut c = match self.credentials.write() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            let changed = c.0 != id || c.1 != secret;
            *c = (id, secret);
            changed
        };
        if changed {
            *self.token.lock().await = None;
        }
        changed
    }

    /// A valid access token: the cached one, or a new one once 90% of its life has passed.
    async fn access_token(&self, renew: bool) -> Result<Secret, ApiError> {
        let mut cached = self.token.lock().await;
        if let (Some((t, until)), false) = (cached.as_ref(), renew) {
            if Instant::now() < *until {
                return Ok(t.clone());
            }
        }
        let url = format!("{}/oauth/token", self.cfg.login_base.trim_end_matches('/'));
        let (id, secret) = self.credentials();
        let resp = self
            .rest
            .http
            .post(url)
            .basic_auth(id.expose(), Some(secret.expose()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials")
            .send()
            .await
            .map_err(|e| ApiError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        if status == 401 || status == 400 {
            return Err(ApiError::Unauthorized(
                "the Platform API refused the client credentials".into(),
            ));
        }
        if !resp.status().is_success() {
            return Err(ApiError::Server {
                status,
                message: "token endpoint".into(),
            });
        }
        #[derive(Deserialize)]
        struct Token {
            access_token: String,
            expires_in: u64,
        }
        let bytes = match crate::platform::rest::read_limited(resp, MAX_TOKEN_REPLY).await {
            Ok(crate::platform::rest::Body::Whole(b)) => b,
            Ok(crate::platform::rest::Body::Cut(_)) => {
                return Err(ApiError::Decode(format!(
                    "token: the reply is over {MAX_TOKEN_REPLY} bytes"
                )));
            }
            Err(e) => return Err(ApiError::Transport(e.to_string())),
        };
        let t: Token =
            serde_json::from_slice(&bytes).map_err(|e| ApiError::Decode(format!("token: {e}")))?;
        metrics::counter!("guestd_platform_tokens_total").increment(1);
        let token = Secret::new(t.access_token);
        let life = Duration::from_secs(t.expires_in.max(1));
        *cached = Some((token.clone(), Instant::now() + life * 9 / 10));
        Ok(token)
    }

    /// `GET /api/v2/conversations/{id}` (429 and 5xx retried as for the guest API; a 401 renews
    /// the token once).
    /// The id must pass [`crate::transport::policy::check_id`]: anything else is refused before any
    /// request (the call carries the organisation's token).
    pub async fn conversation(&self, id: &str) -> Result<Conversation, ApiError> {
        crate::transport::policy::check_id("conversation_id", id)?;
        let url = format!(
            "{}/api/v2/conversations/{}",
            self.rest.cfg.api_base.trim_end_matches('/'),
            crate::transport::policy::path_segment(id)
        );
        let mut renew = false;
        loop {
            let token = self.access_token(renew).await?;
            match self
                .rest
                .call::<Conversation>(
                    "platform_conversation",
                    Method::GET,
                    url.clone(),
                    Some(token),
                    None,
                )
                .await
            {
                Err(ApiError::Unauthorized(_)) if !renew => renew = true,
                Err(e) => return Err(e),
                Ok(c) => return c.ok_or_else(|| ApiError::Decode("empty conversation".into())),
            }
        }
    }

    /// After an `ended`: ask the platform (waiting for its `endTime`) and build `end_confirmed`.
    pub async fn confirm(&self, session: &str, conversation: &str, inferred: EndReason) -> Event {
        tokio::time::sleep(self.cfg.confirm_delay).await;
        let mut last: Result<Conversation, ApiError> = Err(ApiError::Decode("not asked".into()));
        for attempt in 0..self.cfg.confirm_attempts.max(1) {
            last = self.conversation(conversation).await;
            if matches!(&last, Ok(c) if c.end_time.is_some()) {
                break;
            }
            tokio::time::sleep(self.cfg.confirm_delay * (attempt + 1)).await;
        }
        let kind = match last {
            Ok(c) => {
                let verdict = platform_reason(&c);
                let agrees = verdict.as_ref().ok().map(|r| *r == inferred);
                let label = match agrees {
                    Some(true) => "agree",
                    Some(false) => "disagree",
                    None => "unknown",
                };
                metrics::counter!("guestd_end_confirmations_total", "reason" => inferred.as_str(), "result" => label)
                    .increment(1);
                EventKind::EndConfirmed {
                    reason: inferred,
                    platform_reason: verdict.as_ref().ok().copied(),
                    agrees,
                    platform_end_time: c.end_time.clone(),
                    participants: c.summary(),
                    detail: match verdict {
                        Ok(_) => "the platform's disconnect types name the cause".into(),
                        Err(why) => why,
                    },
                }
            }
            Err(e) => {
                metrics::counter!("guestd_end_confirmations_total", "reason" => inferred.as_str(), "result" => "failed")
                    .increment(1);
                EventKind::EndConfirmed {
                    reason: inferred,
                    platform_reason: None,
                    agrees: None,
                    platform_end_time: None,
                    participants: Vec::new(),
                    detail: format!("the Platform API could not be asked: {e}"),
                }
            }
        };
        Event::new(session, Some(conversation), kind)
    }
}

/// Shared by every session.
pub type Platform = Arc<PlatformApi>;

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(end: bool, legs: &[(&str, &str)]) -> Conversation {
        Conversation {
            end_time: end.then(|| "2026-11-26T10:00:05Z".into()),
            participants: legs
                .iter()
                .map(|(purpose, t)| ConversationParticipant {
                    purpose: purpose.to_string(),
                    chats: vec![ChatLeg {
                        state: "disconnected".into(),
                        disconnect_type: Some(t.to_string()),
                        disconnected_time: None,
                    }],
                })
                .collect(),
        }
    }

    /// The mapping table, row by row (docs/events.md holds the same).
    #[test]
    fn disconnect_types_map_to_reasons_in_one_table() {
        let rows: Vec<(Conversation, Result<EndReason, ()>)> = vec![
            (
                conv(true, &[("customer", "client"), ("workflow", "peer")]),
                Ok(EndReason::GuestLeft),
            ),
            (
                conv(true, &[("customer", "peer"), ("agent", "client")]),
                Ok(EndReason::AgentEnded),
            ),
            (
                conv(true, &[("customer", "peer"), ("workflow", "client")]),
                Ok(EndReason::FlowEnded),
            ),
            (
                conv(true, &[("customer", "timeout")]),
                Ok(EndReason::InactivityTimeout),
            ),
            (
                conv(true, &[("customer", "transport.failure")]),
                Ok(EndReason::ReconnectGraceExpired),
            ),
            (
                conv(true, &[("customer", "system")]),
                Ok(EndReason::ServerEnded),
            ),
            (
                conv(true, &[("customer", "peer"), ("agent", "peer")]),
                Err(()),
            ),
            (conv(true, &[("customer", "transfer")]), Err(())),
            (conv(true, &[("agent", "client")]), Err(())),
            (conv(false, &[("customer", "client")]), Err(())),
        ];
        for (i, (c, want)) in rows.into_iter().enumerate() {
            assert_eq!(platform_reason(&c).map_err(|_| ()), want, "row {i}");
        }
    }
}
