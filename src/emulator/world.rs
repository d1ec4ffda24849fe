//! The emulator's model of the platform: conversations, members, messages, sockets and the
//! server-side rules (reconnect grace, no-activity, no reopen, jwt expiry).
//!
//! One `std::sync::Mutex<World>` guards it all. This is deliberate and differs from guestd's own
//! shape (an actor per session): the emulator is a test double whose operations are tiny and never
//! await while holding the lock, and one lock makes every admin fault atomic with respect to the
//! rules (for example "drop the socket and start the grace window" cannot interleave with a
//! reconnect). Timers live in one small task per conversation (see `mod.rs`), woken through a
//! `Notify` whenever a deadline may have moved.

use super::EmulatorConfig;
use crate::backends::guest_chat::protocol::{
    self as p, BodyType, IdRef, Member, MemberChange, MemberRef, MemberState, Message, Role, Typing,
};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// What the emulator tells one socket task to do.
#[derive(Debug, Clone)]
pub enum SocketCmd {
    /// Send a text frame.
    Text(Utf8Bytes),
    /// Send a close frame with this code and end.
    Close(u16),
    /// Drop the TCP connection with a reset, no close frame.
    Reset,
    /// Stop heartbeats, stop reading and answering; keep the TCP connection open.
    HalfOpen,
    /// Send `v2.system.socket_closing`, then close after the configured delay.
    Closing,
    /// Hostile, for tests of a client's bounds: send protocol pings as fast as the socket takes
    /// them for this long, reading nothing meanwhile (the client's pongs pile up on its side).
    PingFlood(std::time::Duration),
}

/// Why a conversation ended, as the emulator knows it (guestd has to infer it).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EndCause {
    /// The guest called DELETE on its member.
    GuestLeft,
    /// The agent ended the interaction.
    AgentEnded,
    /// A flow's Disconnect block ran.
    FlowDisconnected,
    /// The guest did not reconnect within the grace window.
    GraceExpired,
    /// No guest message for the no-activity timeout while an agent was connected.
    Inactivity,
    /// The platform disconnected the guest for a reason the guest is not told (admin `end`).
    Server,
}

/// One line of the guest-side log: what a client did to the emulator.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    /// Milliseconds since the emulator started.
    pub at_ms: u64,
    /// Conversation, where known.
    pub conversation_id: Option<String>,
    /// What happened: `create`, `connect`, `socket_closed`, `ping`, `ping_unanswered` (into a
    /// half-open socket), `list_members`, `get_member`,
    /// `leave`, `send_message`, `send_typing`, `list_messages`, `get_message`, `agent_connected`,
    /// `ended`, `rejected`.
    pub action: String,
    /// HTTP status answered, for REST calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Free text.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

pub(crate) struct SocketEntry {
    pub tx: mpsc::UnboundedSender<SocketCmd>,
    /// Half-open sockets no longer count as connected and receive nothing.
    pub live: bool,
}

/// One conversation.
pub(crate) struct Conv {
    pub id: String,
    pub jwt: String,
    pub jwt_expires: Instant,
    pub guest_id: String,
    pub workflow_id: String,
    pub agent_id: Option<String>,
    pub members: Vec<Member>,
    pub messages: Vec<Message>,
    pub ended: Option<EndCause>,
    pub sockets: HashMap<u64, SocketEntry>,
    /// When the guest lost its last live socket; the grace window counts from here.
    pub lost_at: Option<Instant>,
    pub agent_join_at: Option<Instant>,
    pub agent_connect_at: Option<Instant>,
    pub agent_connected_at: Option<Instant>,
    pub last_guest_activity: Instant,
    pub last_frame: Option<Utf8Bytes>,
    pub notify: Arc<Notify>,
    /// Leave dates never go backwards; each is after the last unless `tie_next_leave`.
    pub last_leave_ms: i64,
    /// The next member to leave gets the same leave date as the last one (one operation).
    pub tie_next_leave: bool,
    /// When an agent who joined with `agent_flash` ends the chat.
    pub agent_end_at: Option<Instant>,
    /// While set, websocket handshakes for this chat answer 503 (a network partition).
    pub stream_blocked: bool,
}

/// The whole emulated platform.
pub(crate) struct World {
    pub cfg: EmulatorConfig,
    pub started: Instant,
    pub convs: HashMap<String, Conv>,
    pub rest_faults: VecDeque<(u16, u64)>,
    /// How long every guest members list waits before it is read and answered (the admin API's
    /// `delays`; zero by default).
    pub list_members_delay: Duration,
    pub log: Vec<LogEntry>,
    pub log_tx: broadcast::Sender<LogEntry>,
    pub next_socket: u64,
    /// Sockets counted as connected right now, across all conversations.
    pub live_sockets: usize,
    /// Platform API access tokens and when each expires.
    pub platform_tokens: HashMap<String, Instant>,
    /// Every HTTP request received, as `METHOD /path?query` (bounded by `log_limit`): what a
    /// client really asked for, routed or not.
    pub requests: Vec<String>,
}

pub(crate) fn now_iso() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Conv {
    pub fn member_mut(&mut self, id: &str) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.id == id)
    }

    pub fn member_state(&self, id: &str) -> Option<MemberState> {
        self.members.iter().find(|m| m.id == id).map(|m| m.state)
    }

    fn publish(&mut self, text: String) {
        let frame = Utf8Bytes::from(text);
        for s in self.sockets.values().filter(|s| s.live) {
            let _ = s.tx.send(SocketCmd::Text(frame.clone()));
        }
        self.last_frame = Some(frame);
    }

    fn publish_member_change(&mut self, member_id: &str, state: MemberState) {
        let body = MemberChange {
            conversation: IdRef {
                id: self.id.clone(),
            },
            member: MemberRef {
                id: member_id.to_string(),
                state,
            },
            timestamp: now_iso(),
        };
        let text = p::encode_envelope(
            &p::members_topic(&self.id),
            serde_json::to_value(body).unwrap_or_default(),
            Some("member-change"),
        );
        self.publish(text);
    }

    /// Store and publish a message.
    pub fn post_message(&mut self, sender: &str, body: &str, body_type: BodyType) -> Message {
        let msg = Message {
            id: uuid::Uuid::new_v4().to_string(),
            name: None,
            conversation: IdRef {
                id: self.id.clone(),
            },
            sender: IdRef {
                id: sender.to_string(),
            },
            body: body.to_string(),
            body_type,
            timestamp: now_iso(),
        };
        self.messages.push(msg.clone());
        let text = p::encode_envelope(
            &p::messages_topic(&self.id),
            serde_json::to_value(&msg).unwrap_or_default(),
            Some("message"),
        );
        self.publish(text);
        msg
    }

    /// Publish a typing indicator.
    pub fn post_typing(&mut self, sender: &str) -> Typing {
        let t = Typing {
            id: uuid::Uuid::new_v4().to_string(),
            conversation: IdRef {
                id: self.id.clone(),
            },
            sender: IdRef {
                id: sender.to_string(),
            },
            timestamp: now_iso(),
        };
        let text = p::encode_envelope(
            &p::messages_topic(&self.id),
            serde_json::to_value(&t).unwrap_or_default(),
            Some("typing-indicator"),
        );
        self.publish(text);
        t
    }

    /// Change a member's state, record dates, publish the member-change.
    pub fn set_state(&mut self, member_id: &str, state: MemberState) {
        let Some(m) = self.member_mut(member_id) else {
            return;
        };
        if m.state == state {
            return;
        }
        m.state = state;
        if state == MemberState::Disconnected {
            let ms = if std::mem::take(&mut self.tie_next_leave) {
                self.last_leave_ms
            } else {
                chrono::Utc::now()
                    .timestamp_millis()
                    .max(self.last_leave_ms + 1)
            };
            self.last_leave_ms = ms;
            if let Some(m) = self.member_mut(member_id) {
                m.leave_date = chrono::DateTime::from_timestamp_millis(ms)
                    .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
            }
        }
        self.publish_member_change(member_id, state);
    }

    fn add_member(&mut self, id: &str, role: Role, name: &str, state: MemberState) {
        self.members.push(Member {
            id: id.to_string(),
            display_name: Some(name.to_string()),
            avatar_image_url: None,
            role,
            join_date: Some(now_iso()),
            leave_date: None,
            first_name: None,
            last_name: None,
            email: None,
            phone_number: None,
            authenticated_guest: false,
            custom_fields: Default::default(),
            state,
        });
        self.publish_member_change(id, state);
    }

    /// The agent is offered the chat (ALERTING), then connects after the alert duration.
    pub fn agent_alert(&mut self, now: Instant, alert: Duration) {
        if self.ended.is_some() || self.agent_id.is_some() {
            return;
        }
        let id = uuid::Uuid::new_v4().to_string();
        self.add_member(&id, Role::Agent, "Agent", MemberState::Alerting);
        self.agent_id = Some(id);
        self.agent_join_at = None;
        self.agent_connect_at = Some(now + alert);
    }

    fn agent_connect(&mut self, now: Instant, workflow_leaves: bool) {
        let Some(agent) = self.agent_id.clone() else {
            return;
        };
        self.agent_connect_at = None;
        self.set_state(&agent, MemberState::Connected);
        self.post_message(&agent, "", BodyType::MemberJoin);
        self.agent_connected_at = Some(now);
        if workflow_leaves {
            let wf = self.workflow_id.clone();
            self.set_state(&wf, MemberState::Disconnected);
        }
    }

    /// When the no-activity rule fires, if it runs now.
    pub fn inactivity_deadline(&self, timeout: Duration) -> Option<Instant> {
        let since = self.agent_connected_at?;
        let agent = self.agent_id.as_deref()?;
        if self.member_state(agent) != Some(MemberState::Connected) {
            return None;
        }
        Some(since.max(self.last_guest_activity) + timeout)
    }

    /// An agent joins CONNECTED at once (no ALERTING, no `member-join` message) and ends the
    /// chat `hold` later (at once for zero: the caller ends it under the same lock).
    pub fn agent_flash(&mut self, now: Instant, hold: Duration) {
        if self.ended.is_some() || self.agent_id.is_some() {
            return;
        }
        let id = uuid::Uuid::new_v4().to_string();
        self.add_member(&id, Role::Agent, "Agent", MemberState::Connected);
        self.agent_id = Some(id);
        self.agent_join_at = None;
        self.agent_connected_at = Some(now);
        self.agent_end_at = Some(now + hold);
    }

    /// End the chat; idempotent. `first` goes DISCONNECTED before everyone else; with
    /// `tie_dates`, an agent's or a flow's end gives the guest the same leave date as `first`
    /// (the platform closes the guest's leg in the operation that ends the agent's).
    pub fn end(&mut self, cause: EndCause, close_sockets: bool, tie_dates: bool) {
        if self.ended.is_some() {
            return;
        }
        self.ended = Some(cause);
        let first = match cause {
            EndCause::AgentEnded => self.agent_id.clone(),
            EndCause::FlowDisconnected => Some(self.workflow_id.clone()),
            _ => Some(self.guest_id.clone()),
        };
        if let Some(first) = first {
            self.set_state(&first, MemberState::Disconnected);
            self.tie_next_leave =
                tie_dates && matches!(cause, EndCause::AgentEnded | EndCause::FlowDisconnected);
        }
        let guest = self.guest_id.clone();
        self.set_state(&guest, MemberState::Disconnected);
        let rest: Vec<String> = self.members.iter().map(|m| m.id.clone()).collect();
        for id in rest {
            self.set_state(&id, MemberState::Disconnected);
        }
        self.tie_next_leave = false;
        self.agent_join_at = None;
        self.agent_connect_at = None;
        self.agent_end_at = None;
        self.lost_at = None;
        if close_sockets {
            for s in self.sockets.values() {
                let _ = s.tx.send(SocketCmd::Close(1000));
            }
        }
        self.notify.notify_one();
    }
}

impl World {
    pub fn new(cfg: EmulatorConfig) -> Self {
        let (log_tx, _) = broadcast::channel(4096);
        World {
            cfg,
            started: Instant::now(),
            convs: HashMap::new(),
            rest_faults: VecDeque::new(),
            list_members_delay: Duration::ZERO,
            log: Vec::new(),
            log_tx,
            next_socket: 1,
            live_sockets: 0,
            platform_tokens: HashMap::new(),
            requests: Vec::new(),
        }
    }

    /// Append to the request log (bounded by `log_limit`, halved when full as the log is).
    pub fn record_request(&mut self, line: String) {
        if self.requests.len() >= self.cfg.log_limit {
            let cut = self.cfg.log_limit / 2;
            self.requests.drain(..cut.max(1));
        }
        self.requests.push(line);
    }

    /// Append to the guest-side log (bounded by `log_limit`) and tell subscribers.
    pub fn record(
        &mut self,
        conv: Option<&str>,
        action: &str,
        status: Option<u16>,
        detail: String,
    ) {
        let e = LogEntry {
            at_ms: self.started.elapsed().as_millis() as u64,
            conversation_id: conv.map(str::to_string),
            action: action.to_string(),
            status,
            detail,
        };
        if self.log.len() >= self.cfg.log_limit {
            let cut = self.cfg.log_limit / 2;
            self.log.drain(..cut.max(1));
        }
        self.log.push(e.clone());
        let _ = self.log_tx.send(e);
    }

    /// Create a conversation as the platform does on `POST .../conversations`.
    pub fn create(
        &mut self,
        info: &p::MemberInfo,
        now: Instant,
    ) -> (String, String, String, Arc<Notify>) {
        let id = uuid::Uuid::new_v4().to_string();
        let guest_id = uuid::Uuid::new_v4().to_string();
        let workflow_id = uuid::Uuid::new_v4().to_string();
        let exp_unix = chrono::Utc::now().timestamp() + self.cfg.jwt_lifetime.as_secs() as i64;
        let jwt = make_jwt(&id, exp_unix);
        let notify = Arc::new(Notify::new());
        let mut conv = Conv {
            id: id.clone(),
            jwt: jwt.clone(),
            jwt_expires: now + self.cfg.jwt_lifetime,
            guest_id: guest_id.clone(),
            workflow_id: workflow_id.clone(),
            agent_id: None,
            members: Vec::new(),
            messages: Vec::new(),
            ended: None,
            sockets: HashMap::new(),
            // A chat whose guest never opens the stream is lost like one whose socket dropped.
            lost_at: Some(now),
            agent_join_at: self.cfg.agent_join_delay.map(|d| now + d),
            agent_connect_at: None,
            agent_connected_at: None,
            last_guest_activity: now,
            last_frame: None,
            notify: notify.clone(),
            last_leave_ms: 0,
            tie_next_leave: false,
            agent_end_at: None,
            stream_blocked: false,
        };
        conv.add_member(
            &guest_id,
            Role::Customer,
            &info.display_name,
            MemberState::Connected,
        );
        if let Some(g) = conv.member_mut(&guest_id) {
            // WebChatMemberInfo gives back what the guest gave at create.
            g.avatar_image_url = info.avatar_image_url.clone();
            g.first_name = info.first_name.clone();
            g.last_name = info.last_name.clone();
            g.email = info.email.clone();
            g.phone_number = info.phone_number.clone();
            g.custom_fields = info.custom_fields.clone();
        }
        conv.add_member(
            &workflow_id,
            Role::Workflow,
            "Inbound flow",
            MemberState::Connected,
        );
        self.convs.insert(id.clone(), conv);
        (id, jwt, guest_id, notify)
    }

    /// Apply every rule that is due at `now`; return the next deadline, or None when the
    /// conversation is gone or ended (its rules task then stops).
    pub fn tick(&mut self, conv_id: &str, now: Instant) -> Option<Instant> {
        let cfg = self.cfg.clone();
        let mut ended_now = None;
        let mut agent_now = false;
        {
            let conv = self.convs.get_mut(conv_id)?;
            if conv.ended.is_some() {
                return None;
            }
            if conv.agent_join_at.is_some_and(|t| t <= now) {
                conv.agent_alert(now, cfg.agent_alert_duration);
            }
            if conv.agent_connect_at.is_some_and(|t| t <= now) {
                conv.agent_connect(now, cfg.workflow_leaves_on_agent);
                agent_now = true;
            }
            let (close, tie) = (cfg.close_sockets_on_end, cfg.tie_leave_dates);
            if conv.lost_at.is_some_and(|t| t + cfg.reconnect_grace <= now) {
                conv.end(EndCause::GraceExpired, close, tie);
                ended_now = Some(EndCause::GraceExpired);
            } else if conv
                .inactivity_deadline(cfg.inactivity_timeout)
                .is_some_and(|t| t <= now)
            {
                conv.end(EndCause::Inactivity, close, tie);
                ended_now = Some(EndCause::Inactivity);
            } else if conv.agent_end_at.is_some_and(|t| t <= now) {
                conv.end(EndCause::AgentEnded, close, tie);
                ended_now = Some(EndCause::AgentEnded);
            }
        }
        if agent_now {
            self.record(Some(conv_id), "agent_connected", None, String::new());
        }
        if let Some(cause) = ended_now {
            self.record(Some(conv_id), "ended", None, format!("{cause:?}"));
            return None;
        }
        let conv = self.convs.get(conv_id)?;
        [
            conv.agent_join_at,
            conv.agent_connect_at,
            conv.lost_at.map(|t| t + cfg.reconnect_grace),
            conv.inactivity_deadline(cfg.inactivity_timeout),
            conv.agent_end_at,
        ]
        .into_iter()
        .flatten()
        .min()
        .or(Some(now + Duration::from_secs(3600)))
    }

    /// End a conversation for an admin or guest reason, and log it.
    pub fn end(&mut self, conv_id: &str, cause: EndCause) -> bool {
        let (close, tie) = (self.cfg.close_sockets_on_end, self.cfg.tie_leave_dates);
        let Some(conv) = self.convs.get_mut(conv_id) else {
            return false;
        };
        if conv.ended.is_some() {
            return false;
        }
        conv.end(cause, close, tie);
        self.record(Some(conv_id), "ended", None, format!("{cause:?}"));
        true
    }

    /// A socket opened for a conversation.
    pub fn socket_opened(
        &mut self,
        conv_id: &str,
        tx: mpsc::UnboundedSender<SocketCmd>,
    ) -> Option<u64> {
        let id = self.next_socket;
        self.next_socket += 1;
        let conv = self.convs.get_mut(conv_id)?;
        conv.sockets.insert(id, SocketEntry { tx, live: true });
        conv.lost_at = None;
        conv.notify.notify_one();
        self.live_sockets += 1;
        self.record(Some(conv_id), "connect", None, format!("socket {id}"));
        Some(id)
    }

    /// A socket stopped counting as connected (closed, reset, or made half-open).
    pub fn socket_lost(&mut self, conv_id: &str, sock: u64, remove: bool, why: &str) {
        let now = Instant::now();
        let Some(conv) = self.convs.get_mut(conv_id) else {
            return;
        };
        let was_live = match conv.sockets.get_mut(&sock) {
            Some(s) => std::mem::replace(&mut s.live, false),
            None => false,
        };
        if remove {
            conv.sockets.remove(&sock);
        }
        if was_live {
            self.live_sockets = self.live_sockets.saturating_sub(1);
            let conv = self.convs.get_mut(conv_id);
            if let Some(conv) = conv {
                if conv.ended.is_none() && !conv.sockets.values().any(|s| s.live) {
                    conv.lost_at = Some(now);
                    conv.notify.notify_one();
                }
            }
            self.record(
                Some(conv_id),
                "socket_closed",
                None,
                format!("socket {sock}: {why}"),
            );
        }
    }

    /// Send a command to every socket of a conversation (live ones only, unless `all`).
    pub fn send_to_sockets(&mut self, conv_id: &str, cmd: SocketCmd) -> usize {
        let Some(conv) = self.convs.get(conv_id) else {
            return 0;
        };
        let mut n = 0;
        for s in conv.sockets.values().filter(|s| s.live) {
            if s.tx.send(cmd.clone()).is_ok() {
                n += 1;
            }
        }
        n
    }
}

/// A token shaped like a JWT (three base64url parts) so clients can read `exp`; the signature is
/// random and only the emulator's own comparison makes it valid.
fn make_jwt(conv_id: &str, exp_unix: i64) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = b64.encode(
        serde_json::json!({"sub": conv_id, "exp": exp_unix, "iss": "guestd-emulator"}).to_string(),
    );
    let sig = b64.encode(uuid::Uuid::new_v4().as_bytes());
    format!("{header}.{claims}.{sig}")
}
