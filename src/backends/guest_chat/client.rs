//! REST client of the Genesys guest chat API, implementing [`ChatApi`].
//!
//! Every call goes through [`GenesysApi::call`], which owns the retry policy: 429 waits for
//! `Retry-After` (capped), 5xx and transport errors back off with jitter, anything else fails at
//! once with a typed [`ApiError`]. The jwt only ever leaves this module in the `Authorization`
//! header.

use super::api::{
    ChatApi, ChatEvent, ChatMember, ChatMessage, ChatRef, MemberState, MessageKind, Role, StartSpec,
};
use super::protocol::{
    self as p, CreateChatRequest, CreateChatResponse, MemberInfo, Page, RoutingTarget,
    SendMessageRequest,
};
use crate::platform::rest::{ClientConfig, Inner};
use crate::secret::Secret;
use crate::transport::policy::{ApiError, check_id, check_url, path_segment};
use futures::FutureExt;
use futures::future::BoxFuture;
use reqwest::Method;
use std::sync::Arc;

/// The Genesys backend.
#[derive(Clone)]
pub struct GenesysApi {
    inner: Arc<Inner>,
}

impl GenesysApi {
    /// Build a client. TLS is `crate::transport::tls::client_config`, the websockets' own: certificates
    /// are always verified.
    pub fn new(cfg: ClientConfig) -> Result<Self, ApiError> {
        Ok(GenesysApi {
            inner: Arc::new(Inner::new(cfg)?),
        })
    }

    /// The full URL of a path from `protocol::path`.
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.inner.cfg.api_base.trim_end_matches('/'))
    }
}

/// The chat's conversation id as a URL path segment, once it passed [`check_id`].
fn conv_segment(chat: &ChatRef) -> Result<String, ApiError> {
    check_id("conversation_id", &chat.conversation_id)?;
    Ok(path_segment(&chat.conversation_id))
}

/// Both ids of the chat as URL path segments, once they passed [`check_id`].
fn member_segments(chat: &ChatRef) -> Result<(String, String), ApiError> {
    chat.check_ids()?;
    Ok((
        path_segment(&chat.conversation_id),
        path_segment(&chat.member_id),
    ))
}

/// A call refused before it was made.
fn refused<T: Send + 'static>(e: ApiError) -> BoxFuture<'static, Result<T, ApiError>> {
    futures::future::ready(Err(e)).boxed()
}

/// Entities asked for per page (the platform's maximum).
const PAGE: u32 = 100;
/// Pages followed at most in one listing: far more than any chat holds.
const MAX_PAGES: usize = 100;

fn member(m: p::Member) -> ChatMember {
    ChatMember {
        id: m.id,
        role: role(m.role),
        state: state(m.state),
        leave_date: m.leave_date,
    }
}

/// The neutral role of a wire role.
fn role(r: p::Role) -> Role {
    match r {
        p::Role::Customer => Role::Customer,
        p::Role::Agent => Role::Agent,
        p::Role::Workflow => Role::Workflow,
        p::Role::Acd => Role::Acd,
        p::Role::Unknown => Role::Unknown,
    }
}

/// The neutral state of a wire state.
fn state(s: p::MemberState) -> MemberState {
    match s {
        p::MemberState::Alerting => MemberState::Alerting,
        p::MemberState::Connected => MemberState::Connected,
        p::MemberState::Disconnected => MemberState::Disconnected,
        p::MemberState::Unknown => MemberState::Unknown,
    }
}

/// Map a wire message to the neutral one.
pub fn message(m: p::Message) -> ChatMessage {
    let kind = match m.body_type {
        p::BodyType::Standard => MessageKind::Standard,
        p::BodyType::Notice => MessageKind::Notice,
        p::BodyType::MemberJoin => MessageKind::MemberJoin,
        p::BodyType::MemberLeave => MessageKind::MemberLeave,
        p::BodyType::Unknown => MessageKind::Unknown,
    };
    ChatMessage {
        id: m.id,
        sender_id: m.sender.id,
        body: m.body,
        kind,
        timestamp: m.timestamp,
    }
}

impl ChatApi for GenesysApi {
    fn create(&self, spec: StartSpec) -> BoxFuture<'static, Result<ChatRef, ApiError>> {
        let inner = self.inner.clone();
        let url = self.url(p::CONVERSATIONS);
        async move {
            // Every missing key at once, before the platform is asked (issue 24).
            if let Some(msg) = start_missing(&inner.cfg.organization_id, &inner.cfg.deployment_id) {
                return Err(ApiError::NotConfigured(msg));
            }
            let req = CreateChatRequest {
                organization_id: inner.cfg.organization_id.clone(),
                deployment_id: inner.cfg.deployment_id.clone(),
                routing_target: RoutingTarget {
                    target_type: "QUEUE".into(),
                    target_address: spec.queue,
                    skills: spec.skills,
                    language: spec.language,
                    priority: spec.priority,
                },
                member_info: MemberInfo {
                    display_name: spec.display_name,
                    avatar_image_url: None,
                    first_name: spec.first_name,
                    last_name: spec.last_name,
                    email: spec.email,
                    phone_number: spec.phone_number,
                    custom_fields: spec.custom_fields,
                },
            };
            let body = serde_json::to_value(req).map_err(|e| ApiError::Decode(e.to_string()))?;
            let r: CreateChatResponse = inner
                .call("create", Method::POST, url, None, Some(body))
                .await?
                .ok_or_else(|| ApiError::Decode("create: empty reply".into()))?;
            check_url(&r.event_stream_uri, inner.cfg.allow_insecure)?;
            // Ids the platform hands out go into later URLs: they are held to the same rule.
            check_id("the created conversation's id", &r.id)?;
            check_id("the created member's id", &r.member.id)?;
            Ok(ChatRef {
                conversation_id: r.id,
                member_id: r.member.id,
                jwt: Secret::new(r.jwt),
                event_stream_uri: r.event_stream_uri,
            })
        }
        .boxed()
    }

    fn list_members(
        &self,
        chat: &ChatRef,
    ) -> BoxFuture<'static, Result<Vec<ChatMember>, ApiError>> {
        let inner = self.inner.clone();
        let conv = match conv_segment(chat) {
            Ok(c) => c,
            Err(e) => return refused(e),
        };
        let first = self.url(&format!(
            "{}{}",
            p::path::members(&conv),
            p::query_string(&p::MembersQuery {
                page_size: Some(PAGE),
                page_number: Some(1),
                exclude_disconnected_members: None,
            })
        ));
        let jwt = chat.jwt.clone();
        async move {
            let mut out = Vec::new();
            let mut url = first;
            for _ in 0..MAX_PAGES {
                let page: Page<p::Member> = inner
                    .call("list_members", Method::GET, url, Some(jwt.clone()), None)
                    .await?
                    .ok_or_else(|| ApiError::Decode("list members: empty reply".into()))?;
                let next = inner.follow(page.next_path())?;
                out.extend(page.entities.into_iter().map(member));
                match next {
                    Some(n) => url = n,
                    None => break,
                }
            }
            Ok(out)
        }
        .boxed()
    }

    fn messages_after(
        &self,
        chat: &ChatRef,
        after: Option<String>,
    ) -> BoxFuture<'static, Result<Vec<ChatMessage>, ApiError>> {
        let inner = self.inner.clone();
        let conv = match conv_segment(chat) {
            Ok(c) => c,
            Err(e) => return refused(e),
        };
        let base = self.url(&p::path::messages(&conv));
        let jwt = chat.jwt.clone();
        // Oldest first, asked explicitly (whatever a server's default order).
        let page_after = move |after: Option<String>| {
            let q = p::MessagesQuery {
                after,
                before: None,
                sort_order: Some("ascending".into()),
                max_results: Some(PAGE),
            };
            format!("{base}{}", p::query_string(&q))
        };
        async move {
            let mut out: Vec<ChatMessage> = Vec::new();
            let mut url = page_after(after);
            for _ in 0..MAX_PAGES {
                let page: Page<p::Message> = inner
                    .call("list_messages", Method::GET, url, Some(jwt.clone()), None)
                    .await?
                    .ok_or_else(|| ApiError::Decode("list messages: empty reply".into()))?;
                let n = page.entities.len();
                let next = inner.follow(page.next_path())?;
                out.extend(page.entities.into_iter().map(message));
                url = match next {
                    Some(next) => next,
                    // A server without paging links: a full page means there may be more.
                    None if n >= PAGE as usize => page_after(out.last().map(|m| m.id.clone())),
                    None => break,
                };
            }
            Ok(out)
        }
        .boxed()
    }

    fn leave(&self, chat: &ChatRef) -> BoxFuture<'static, Result<(), ApiError>> {
        let inner = self.inner.clone();
        let (conv, member) = match member_segments(chat) {
            Ok(ids) => ids,
            Err(e) => return refused(e),
        };
        let url = self.url(&p::path::member(&conv, &member));
        let jwt = chat.jwt.clone();
        async move {
            inner
                .call::<serde_json::Value>("leave", Method::DELETE, url, Some(jwt), None)
                .await
                .map(|_| ())
        }
        .boxed()
    }

    fn send_message(
        &self,
        chat: &ChatRef,
        body: String,
    ) -> BoxFuture<'static, Result<ChatMessage, ApiError>> {
        let inner = self.inner.clone();
        let (conv, member) = match member_segments(chat) {
            Ok(ids) => ids,
            Err(e) => return refused(e),
        };
        let url = self.url(&p::path::member_messages(&conv, &member));
        let jwt = chat.jwt.clone();
        async move {
            let req = SendMessageRequest {
                body,
                body_type: p::BodyType::Standard,
            };
            let body = serde_json::to_value(req).map_err(|e| ApiError::Decode(e.to_string()))?;
            let m: p::Message = inner
                .call("send_message", Method::POST, url, Some(jwt), Some(body))
                .await?
                .ok_or_else(|| ApiError::Decode("send message: empty reply".into()))?;
            Ok(message(m))
        }
        .boxed()
    }

    fn send_typing(&self, chat: &ChatRef) -> BoxFuture<'static, Result<(), ApiError>> {
        let inner = self.inner.clone();
        let (conv, member) = match member_segments(chat) {
            Ok(ids) => ids,
            Err(e) => return refused(e),
        };
        let url = self.url(&p::path::member_typing(&conv, &member));
        let jwt = chat.jwt.clone();
        async move {
            inner
                .call::<serde_json::Value>("send_typing", Method::POST, url, Some(jwt), None)
                .await
                .map(|_| ())
        }
        .boxed()
    }

    fn decode(&self, text: &str) -> Result<ChatEvent, String> {
        chat_event(text)
    }

    fn ping_frame(&self) -> &'static str {
        p::PING_FRAME
    }

    fn max_message_chars(&self) -> usize {
        p::MAX_BODY_CHARS
    }
}

/// A stream frame as the session machine takes it (the seam's `decode` for the guest chat API).
pub fn chat_event(text: &str) -> Result<ChatEvent, String> {
    match p::decode_frame(text).map_err(|e| e.to_string())? {
        p::StreamEvent::Heartbeat => Ok(ChatEvent::Heartbeat),
        p::StreamEvent::Pong => Ok(ChatEvent::Pong),
        p::StreamEvent::Metadata(m) => Ok(ChatEvent::Other(format!(
            "channel.metadata: {}",
            truncate(&m)
        ))),
        p::StreamEvent::Message(m) => Ok(ChatEvent::Message(message(m))),
        p::StreamEvent::Typing(t) => Ok(ChatEvent::Typing {
            sender_id: t.sender.id,
        }),
        p::StreamEvent::MemberChange(c) => Ok(ChatEvent::MemberChange {
            member_id: c.member.id,
            state: state(c.member.state),
        }),
        p::StreamEvent::SocketClosing => Ok(ChatEvent::SocketClosing),
        p::StreamEvent::Unknown { topic } => Ok(ChatEvent::Other(topic)),
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The keys a guest chat `start` needs that `organization_id`/`deployment_id` leave unset, as
/// one message naming each key and its environment variable; None when it can run. guestd
/// refuses such a `start` itself (code `not_configured`), before anything is sent.
pub fn start_missing(organization_id: &str, deployment_id: &str) -> Option<String> {
    let missing: Vec<String> = [
        ("genesys.organization_id", organization_id),
        ("genesys.deployment_id", deployment_id),
    ]
    .into_iter()
    .filter(|(_, v)| v.trim().is_empty())
    // The variable as `config::env_var_of` names it.
    .map(|(k, _)| format!("{k} (GUESTD_{})", k.replace('.', "__").to_ascii_uppercase()))
    .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "guest chat start is not configured: set {} (attach needs neither)",
            missing.join(" and ")
        )
    })
}
