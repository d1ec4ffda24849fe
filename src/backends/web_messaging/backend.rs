//! Web Messaging as a [`Backend`]: what `start`, `attach` and a restart take, and how each
//! becomes a running session (a [`Machine`] driven by the [`actor`](super::actor)).

use super::Spec;
use super::actor;
use super::client::Messaging;
use super::machine::{Begin, Machine};
use crate::journal::Recovered;
use crate::secret::Secret;
use crate::session::{Args, Backend, Launch, Open, OpenError, SessionCtx};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::time::Instant;

/// The backend's name.
pub const NAME: &str = "web_messaging";

/// The guest's member id as `session_started` and the view report it: the guest side of Web
/// Messaging has no member id of its own.
pub(super) const MEMBER: &str = "guest";

/// What a Web Messaging session acts with.
#[derive(Debug, Clone)]
pub struct Chat {
    /// guestd's key for it (`conversation_key`: the guest side never learns the platform's
    /// conversation id).
    pub key: String,
    /// The session token (a secret).
    pub token: Secret,
    /// The deployment.
    pub deployment_id: String,
    /// The socket's URL.
    pub socket_url: String,
}

/// What the journal keeps of a Web Messaging session.
#[derive(Serialize, Deserialize)]
struct Record {
    deployment_id: String,
    token: Secret,
    socket_url: String,
}

/// The record as journaled before records named their backend: a guest chat's `chat` whose
/// `jwt` held the token and `event_stream_uri` the socket, beside `web_messaging`.
#[derive(Deserialize)]
struct LegacyRecord {
    chat: LegacyChat,
    web_messaging: LegacyWm,
}

#[derive(Deserialize)]
struct LegacyChat {
    jwt: Secret,
    event_stream_uri: String,
}

#[derive(Deserialize)]
struct LegacyWm {
    deployment_id: String,
}

impl Record {
    fn read(state: &serde_json::Value) -> Result<Record, String> {
        if state.get("web_messaging").is_some() {
            let l: LegacyRecord = serde_json::from_value(state.clone())
                .map_err(|e| format!("the journaled Web Messaging session: {e}"))?;
            return Ok(Record {
                deployment_id: l.web_messaging.deployment_id,
                token: l.chat.jwt,
                socket_url: l.chat.event_stream_uri,
            });
        }
        serde_json::from_value(state.clone())
            .map_err(|e| format!("the journaled Web Messaging session: {e}"))
    }
}

/// The Web Messaging backend (`[web_messaging]`).
pub struct WebMessaging(pub Arc<Messaging>);

impl WebMessaging {
    /// How to run `chat` with `machine`, and what to journal.
    fn launch(&self, chat: Chat, machine: Machine) -> Launch {
        let record = serde_json::to_value(Record {
            deployment_id: chat.deployment_id.clone(),
            token: chat.token.clone(),
            socket_url: chat.socket_url.clone(),
        })
        .unwrap_or_default();
        let wm = self.0.clone();
        Launch {
            conversation_id: chat.key.clone(),
            member_id: MEMBER.into(),
            record,
            abandon: None,
            spawn: Box::new(move |ctx, id| {
                let view = actor::view_of(&id, &chat, &machine);
                (actor::spawn(ctx, wm, id, chat, machine), view)
            }),
        }
    }
}

impl Backend for WebMessaging {
    fn name(&self) -> &'static str {
        NAME
    }

    fn prepare(
        &self,
        _ctx: &SessionCtx,
        open: Open,
        args: &mut Args,
    ) -> Result<Option<String>, String> {
        let mut spec: Spec = args.parse(open)?;
        spec.resolve(&self.0.settings, open == Open::Attach)?;
        *args = Args::of(&spec);
        Ok(Some(spec.key()))
    }

    fn open(
        &self,
        _ctx: &Arc<SessionCtx>,
        open: Open,
        args: Args,
    ) -> BoxFuture<'static, Result<Launch, OpenError>> {
        let me = WebMessaging(self.0.clone());
        async move {
            let spec: Spec = args.parse(open).map_err(OpenError::Invalid)?;
            let key = spec.key();
            let deployment_id = spec.deployment_id.clone().unwrap_or_default();
            let Some(token) = spec.token.clone() else {
                return Err(OpenError::Invalid("web_messaging needs token".into()));
            };
            let deployment = me.0.deployment(&deployment_id).await;
            let chat = Chat {
                key,
                token,
                socket_url: me.0.endpoints.socket_url(&deployment_id),
                deployment_id,
            };
            let begin = match open {
                Open::Attach => Begin::Attach,
                Open::Start => Begin::Start {
                    start_new: spec.start_new,
                },
            };
            let machine = Machine::new(me.0.settings.clone(), deployment, begin, Instant::now());
            Ok(me.launch(chat, machine))
        }
        .boxed()
    }

    fn resume(
        &self,
        _ctx: &Arc<SessionCtx>,
        r: Recovered,
    ) -> BoxFuture<'static, Result<Launch, OpenError>> {
        let me = WebMessaging(self.0.clone());
        async move {
            let rec = Record::read(&r.record.state).map_err(OpenError::Invalid)?;
            let now = Instant::now();
            let started = crate::session::run::instant_at(r.record.started_ms, now);
            let deployment = me.0.deployment(&rec.deployment_id).await;
            let machine = Machine::new(me.0.settings.clone(), deployment, Begin::Resume, now)
                .resuming(started, r.last_message_id);
            let machine = if r.leaving {
                machine.leaving()
            } else {
                machine
            };
            let chat = Chat {
                key: r.record.conversation_id.clone(),
                token: rec.token,
                deployment_id: rec.deployment_id,
                socket_url: rec.socket_url,
            };
            Ok(me.launch(chat, machine))
        }
        .boxed()
    }

    fn claims_legacy(&self, state: &serde_json::Value) -> bool {
        state.get("web_messaging").is_some()
    }

    fn max_message_chars(&self) -> Option<usize> {
        Some(super::actor::MAX_SEND_CHARS)
    }
}

/// The arguments of a `start` that begins a new session on `chat`'s token
/// (`configureSession{startNew: true}`).
pub(crate) fn reopen_args(chat: &Chat) -> Args {
    let spec = Spec {
        deployment_id: Some(chat.deployment_id.clone()),
        token: Some(chat.token.clone()),
        start_new: true,
    };
    Args::of(&spec)
}
