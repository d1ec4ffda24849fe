//! Guest chat as a [`Backend`]: what `start`, `attach` and a restart take, and how each
//! becomes a running session (a [`Machine`] driven by the [`actor`](super::actor)).

use super::actor;
use super::api::{ChatApi, ChatRef, MemberState, StartSpec};
use super::machine::{Machine, Timing};
use crate::events::EndReason;
use crate::journal::Recovered;
use crate::platform::api::Platform;
use crate::secret::Secret;
use crate::session::{Args, Backend, Launch, Open, OpenError, SessionCtx};
use crate::transport::policy::ApiError;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::time::Instant;

/// The guest chat backend: the guest API, the session rules, and (when configured) the
/// Platform API that confirms each end.
pub struct GuestChat {
    /// The guest API (Genesys's, or a test double).
    pub api: Arc<dyn ChatApi>,
    /// Rules and durations.
    pub timing: Arc<Timing>,
    /// The Platform API, when configured: every `ended` is followed by `end_confirmed`.
    pub platform: Option<Platform>,
}

/// The backend's name.
pub const NAME: &str = "guest_chat";

/// `attach`'s arguments.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachArgs {
    conversation_id: String,
    member_id: String,
    jwt: Secret,
    event_stream_uri: String,
}

impl From<AttachArgs> for ChatRef {
    fn from(a: AttachArgs) -> Self {
        ChatRef {
            conversation_id: a.conversation_id,
            member_id: a.member_id,
            jwt: a.jwt,
            event_stream_uri: a.event_stream_uri,
        }
    }
}

/// What the journal keeps of a guest chat (the same shape as before records named their
/// backend, so both read alike).
#[derive(Serialize, Deserialize)]
struct Record {
    chat: ChatRef,
}

impl GuestChat {
    /// Ask the platform about an end, in the background, and write its `end_confirmed`.
    pub(crate) fn confirm_end(
        &self,
        ctx: &SessionCtx,
        session: &str,
        conversation: &str,
        reason: EndReason,
    ) {
        let Some(platform) = self.platform.clone() else {
            return;
        };
        let (emitter, session, conversation) = (
            ctx.emitter.clone(),
            session.to_string(),
            conversation.to_string(),
        );
        tokio::spawn(async move {
            let ev = platform.confirm(&session, &conversation, reason).await;
            emitter.emit(ev).await;
        });
    }

    /// Everything `attach` checks before anything is reserved or sent.
    fn check_attach(ctx: &SessionCtx, chat: &ChatRef) -> Result<(), String> {
        for (name, v) in [
            ("conversation_id", &chat.conversation_id),
            ("member_id", &chat.member_id),
            ("event_stream_uri", &chat.event_stream_uri),
        ] {
            if v.trim().is_empty() {
                return Err(format!("attach needs {name}"));
            }
        }
        if chat.jwt.expose().trim().is_empty() {
            return Err("attach needs jwt".into());
        }
        // The ids go into every REST URL of the chat.
        chat.check_ids().map_err(|e| e.to_string())?;
        ctx.connector
            .check_url(&chat.event_stream_uri)
            .map_err(|e| format!("event_stream_uri {e}"))
    }

    /// How to run `chat` with `machine`, and what to journal.
    fn launch(self: &Arc<Self>, chat: ChatRef, machine: Machine, abandon: bool) -> Launch {
        let record = serde_json::to_value(Record { chat: chat.clone() }).unwrap_or_default();
        let leave = abandon.then(|| {
            let leave = self.api.leave(&chat);
            async move {
                if let Err(e) = leave.await {
                    tracing::warn!(error = %e, "could not leave a chat whose record failed");
                }
            }
            .boxed()
        });
        let gc = self.clone();
        Launch {
            conversation_id: chat.conversation_id.clone(),
            member_id: chat.member_id.clone(),
            record,
            abandon: leave,
            spawn: Box::new(move |ctx, id| {
                let view = actor::view_of(&id, &chat, &machine);
                (actor::spawn(ctx, gc, id, chat, machine), view)
            }),
        }
    }
}

/// The guest chat backend as the registry holds it (the trait needs an `Arc` to hand the
/// sessions it spawns).
pub struct GuestChatBackend(pub Arc<GuestChat>);

impl Backend for GuestChatBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn prepare(
        &self,
        ctx: &SessionCtx,
        open: Open,
        args: &mut Args,
    ) -> Result<Option<String>, String> {
        match open {
            Open::Start => {
                let spec: StartSpec = args.parse(open)?;
                if spec.queue.trim().is_empty() || spec.display_name.trim().is_empty() {
                    return Err("start needs queue and display_name".into());
                }
                Ok(None)
            }
            Open::Attach => {
                let chat: ChatRef = args.parse::<AttachArgs>(open)?.into();
                GuestChat::check_attach(ctx, &chat)?;
                Ok(Some(chat.conversation_id))
            }
        }
    }

    fn open(
        &self,
        _ctx: &Arc<SessionCtx>,
        open: Open,
        args: Args,
    ) -> BoxFuture<'static, Result<Launch, OpenError>> {
        let gc = self.0.clone();
        async move {
            let chat: ChatRef = match open {
                Open::Start => {
                    let spec: StartSpec = args.parse(open).map_err(OpenError::Invalid)?;
                    gc.api.create(spec).await?
                }
                Open::Attach => args
                    .parse::<AttachArgs>(open)
                    .map_err(OpenError::Invalid)?
                    .into(),
            };
            // The chat's clock starts once it exists (its create may have taken retries).
            let machine = Machine::new(gc.timing.clone(), &chat.member_id, Instant::now());
            Ok(gc.launch(chat, machine, open == Open::Start))
        }
        .boxed()
    }

    fn resume(
        &self,
        _ctx: &Arc<SessionCtx>,
        r: Recovered,
    ) -> BoxFuture<'static, Result<Launch, OpenError>> {
        let gc = self.0.clone();
        async move {
            let rec: Record = serde_json::from_value(r.record.state.clone())
                .map_err(|e| OpenError::Invalid(format!("the journaled guest chat: {e}")))?;
            let now = Instant::now();
            let started = crate::session::run::instant_at(r.record.started_ms, now);
            // The grace window counts from this restart: the crash time is not known
            // precisely, and giving up too early would lose chats the platform still holds.
            let mut machine = Machine::resume(
                gc.timing.clone(),
                &rec.chat.member_id,
                started,
                now,
                r.last_message_id,
                now,
            );
            machine.anchor_wall(now, chrono::Utc::now().timestamp_millis());
            let machine = machine.with_activity(&r.activity);
            // A leave accepted before the crash is sent again.
            let machine = if r.leaving {
                machine.leaving()
            } else {
                machine
            };
            Ok(gc.launch(rec.chat, machine, false))
        }
        .boxed()
    }

    fn ended_while_down(
        &self,
        ctx: &SessionCtx,
        session: &str,
        conversation: &str,
        reason: EndReason,
    ) {
        self.0.confirm_end(ctx, session, conversation, reason);
    }

    fn claims_legacy(&self, state: &serde_json::Value) -> bool {
        state.get("chat").is_some() && state.get("web_messaging").is_none()
    }

    fn max_message_chars(&self) -> Option<usize> {
        Some(self.0.api.max_message_chars())
    }

    fn alive_by_credential(
        &self,
        conversation_id: &str,
        secret: Secret,
    ) -> Option<BoxFuture<'static, Result<bool, ApiError>>> {
        let chat = ChatRef {
            conversation_id: conversation_id.to_string(),
            member_id: String::new(),
            jwt: secret,
            event_stream_uri: String::new(),
        };
        let members = self.0.api.list_members(&chat);
        Some(
            async move {
                let members = members.await?;
                Ok(!(members.is_empty()
                    || members.iter().all(|m| m.state == MemberState::Disconnected)))
            }
            .boxed(),
        )
    }
}

/// The registry of a test: guest chat alone, on `api`, with `timing`.
#[cfg(test)]
pub(crate) fn only(api: Arc<dyn ChatApi>, timing: Timing) -> crate::session::Backends {
    crate::session::Backends::new(vec![Arc::new(GuestChatBackend(Arc::new(GuestChat {
        api,
        timing: Arc::new(timing),
        platform: None,
    })))])
}
