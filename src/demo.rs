//! `guestd demo`: the embedded emulator and the supervisor in one process, running one scripted
//! chat per end reason at accelerated durations (a 15-minute rule becomes 3 s), printing every
//! event and a closing summary. It exits non-zero if any chat ends for the wrong reason, so it is
//! also a smoke test of the whole product.

use crate::config::Config;
use crate::emulator::{Emulator, EmulatorConfig};
use crate::events::{EndReason, StdSink, TapSink};
use crate::supervisor::Supervisor;
use std::time::Duration;
use tokio::sync::broadcast;

/// Accelerated emulator settings shared by the demo and the tests.
pub fn fast_emulator() -> EmulatorConfig {
    EmulatorConfig {
        heartbeat_interval: Duration::from_millis(500),
        reconnect_grace: Duration::from_secs(2),
        inactivity_timeout: Duration::from_secs(3),
        agent_join_delay: None,
        agent_alert_duration: Duration::from_millis(100),
        socket_closing_delay: Duration::from_secs(1),
        ..EmulatorConfig::default()
    }
}

/// guestd settings that match [`fast_emulator`], pointed at `api_base`.
pub fn fast_config(api_base: &str) -> Config {
    let mut c = Config::default();
    c.genesys.api_base = api_base.to_string();
    c.genesys.organization_id = "demo-org".into();
    c.genesys.deployment_id = "demo-deployment".into();
    c.session.heartbeat_interval = Duration::from_millis(500);
    c.session.heartbeat_tolerance = 2;
    c.session.reconnect_grace = Duration::from_secs(2);
    c.session.inactivity_timeout = Duration::from_secs(3);
    c.session.inactivity_warning_lead = Duration::from_secs(1);
    c.session.inactivity_skew = Duration::from_millis(500);
    c.session.agent_end_window = Duration::from_secs(2);
    c.session.backoff.initial = Duration::from_millis(200);
    c.session.backoff.max = Duration::from_millis(800);
    c.rest.backoff.initial = Duration::from_millis(50);
    c.rest.backoff.max = Duration::from_millis(200);
    c.web_messaging.base_url = api_base.to_string();
    c.web_messaging.deployment_id = "demo-deployment".into();
    c.web_messaging.ping_interval = Duration::from_millis(500);
    c.web_messaging.backoff.initial = Duration::from_millis(200);
    c.web_messaging.backoff.max = Duration::from_millis(800);
    c.control.http_listen = String::new();
    c.control.stdin = false;
    c.journal.enabled = false;
    c
}

/// A `start` command, as a user would send it.
async fn start(
    sup: &Supervisor,
    args: serde_json::Value,
) -> Result<crate::session::SessionView, crate::supervisor::SupervisorError> {
    match crate::control::parse_command("start", args) {
        Ok(crate::command::Command::Open(o)) => sup.open(o).await,
        Ok(other) => Err(crate::supervisor::SupervisorError::Invalid(format!(
            "not a start: {}",
            other.name()
        ))),
        Err(e) => Err(crate::supervisor::SupervisorError::Invalid(e)),
    }
}

/// Follows the event lines of one session.
pub struct Follower {
    rx: broadcast::Receiver<serde_json::Value>,
    session: String,
}

/// The awaited event did not come.
#[derive(Debug, thiserror::Error)]
#[error("session {session}: no {what} within {secs}s")]
pub struct Timeout {
    /// Session.
    pub session: String,
    /// What was awaited.
    pub what: String,
    /// How long.
    pub secs: u64,
}

impl Follower {
    /// Follow `session` on `rx` (subscribe before the session can emit).
    pub fn new(rx: broadcast::Receiver<serde_json::Value>, session: &str) -> Self {
        Follower {
            rx,
            session: session.to_string(),
        }
    }

    /// Wait for the next event of this session with `type == kind`.
    pub async fn wait(
        &mut self,
        kind: &str,
        within: Duration,
    ) -> Result<serde_json::Value, Timeout> {
        let session = self.session.clone();
        let fut = async {
            loop {
                match self.rx.recv().await {
                    Ok(v) if v["session"] == session.as_str() && v["type"] == kind => {
                        return Some(v);
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        };
        match tokio::time::timeout(within, fut).await {
            Ok(Some(v)) => Ok(v),
            _ => Err(Timeout {
                session,
                what: kind.to_string(),
                secs: within.as_secs(),
            }),
        }
    }
}

struct Outcome {
    name: &'static str,
    session: String,
    expected: EndReason,
    got: Option<String>,
    duration_ms: u64,
    detail: String,
}

impl Outcome {
    /// What a scripted chat came to: its `ended` line, or why there was none.
    fn of(
        name: &'static str,
        session: String,
        expected: EndReason,
        ended: Result<serde_json::Value, String>,
    ) -> Outcome {
        match ended {
            Ok(ended) => Outcome {
                name,
                session,
                expected,
                got: ended["reason"].as_str().map(str::to_string),
                duration_ms: ended["duration_ms"].as_u64().unwrap_or(0),
                detail: ended["detail"].as_str().unwrap_or_default().to_string(),
            },
            Err(detail) => Outcome {
                name,
                session,
                expected,
                got: None,
                duration_ms: 0,
                detail,
            },
        }
    }
}

const WAIT: Duration = Duration::from_secs(15);

async fn scenario(
    name: &'static str,
    expected: EndReason,
    sup: Supervisor,
    emu: Emulator,
    tap: broadcast::Sender<serde_json::Value>,
) -> Outcome {
    let rx = tap.subscribe();
    let view = match start(
        &sup,
        serde_json::json!({"queue": "Support", "display_name": format!("Demo guest ({name})")}),
    )
    .await
    {
        Ok(v) => v,
        Err(e) => {
            return Outcome::of(
                name,
                "-".into(),
                expected,
                Err(format!("start failed: {e}")),
            );
        }
    };
    let conv = view.conversation_id.clone();
    let mut f = Follower::new(rx, &view.session);
    let script = async {
        f.wait("connected", WAIT).await?;
        let admin = |r: Result<_, crate::emulator::AdminError>| {
            if let Err(e) = r {
                tracing::warn!(error = %e, "demo admin call failed");
            }
        };
        match expected {
            EndReason::GuestLeft => {
                admin(emu.agent_join(&conv));
                f.wait("agent_connected", WAIT).await?;
                admin(emu.agent_send(&conv, "Hello, how can I help?").map(|_| ()));
                f.wait("message", WAIT).await?;
                let _ = sup
                    .send_message(&view.session, "My order is late.".into())
                    .await;
                // An abrupt drop, and a message sent while the guest is away: backfilled.
                admin(emu.drop_sockets(&conv, true).map(|_| ()));
                f.wait("disconnected", WAIT).await?;
                admin(
                    emu.agent_send(&conv, "Sorry to hear that, checking now.")
                        .map(|_| ()),
                );
                f.wait("reconnected", WAIT).await?;
                // Maintenance: the server asks for a new socket.
                admin(emu.socket_closing(&conv).map(|_| ()));
                f.wait("reconnected", WAIT).await?;
                let _ = sup.leave(&view.session).await;
            }
            EndReason::AgentEnded => {
                admin(emu.agent_join(&conv));
                f.wait("agent_connected", WAIT).await?;
                admin(emu.agent_typing(&conv));
                admin(emu.agent_send(&conv, "Anything else?").map(|_| ()));
                let _ = sup.send_message(&view.session, "No, thanks!".into()).await;
                f.wait("message", WAIT).await?;
                admin(emu.agent_end(&conv));
            }
            EndReason::FlowEnded => {
                admin(emu.flow_disconnect(&conv));
            }
            EndReason::InactivityTimeout => {
                admin(emu.agent_join(&conv));
                f.wait("agent_connected", WAIT).await?;
                f.wait("inactivity_warning", WAIT).await?;
            }
            EndReason::ReconnectGraceExpired => {
                // A network partition: the guest cannot get a socket back.
                admin(emu.block_stream(&conv, true));
                admin(emu.drop_sockets(&conv, true).map(|_| ()));
            }
            EndReason::TokenExpired => {
                admin(emu.expire_jwt(&conv));
                admin(emu.drop_sockets(&conv, false).map(|_| ()));
            }
            EndReason::ServerEnded => {
                admin(emu.half_open(&conv).map(|_| ()));
                f.wait("reconnected", WAIT).await?;
                admin(emu.server_end(&conv));
            }
            // Web Messaging ends: scripted by `wm_scenario`, never planned here.
            EndReason::ConversationDisconnected
            | EndReason::SessionExpired
            | EndReason::SessionNotFound
            | EndReason::SessionCleared
            | EndReason::ConnectionClosed
            | EndReason::StartedNew => {}
        }
        f.wait("ended", WAIT).await
    };
    let ended = script.await.map_err(|e| e.to_string());
    Outcome::of(name, view.session, expected, ended)
}

/// A Web Messaging session scripted to end for `expected` (the emulator's default deployment:
/// Conversation Disconnect in ReadOnly mode, clear allowed).
async fn wm_scenario(
    name: &'static str,
    expected: EndReason,
    sup: Supervisor,
    emu: Emulator,
    tap: broadcast::Sender<serde_json::Value>,
) -> Outcome {
    use crate::emulator::messaging::WmAdmin;
    let rx = tap.subscribe();
    let token = uuid::Uuid::new_v4().to_string();
    let view = match start(
        &sup,
        serde_json::json!({"backend": "web_messaging", "token": token}),
    )
    .await
    {
        Ok(v) => v,
        Err(e) => {
            return Outcome::of(
                name,
                "-".into(),
                expected,
                Err(format!("start failed: {e}")),
            );
        }
    };
    let mut f = Follower::new(rx, &view.session);
    let admin = |a: WmAdmin| {
        if !emu.messaging(&token, a) {
            tracing::warn!("demo: no such Web Messaging session in the emulator");
        }
    };
    let script = async {
        f.wait("connected", WAIT).await?;
        match expected {
            EndReason::ConversationDisconnected => {
                let _ = sup
                    .send_message(&view.session, "Where is my parcel?".into())
                    .await;
                admin(WmAdmin::AgentTyping);
                admin(WmAdmin::AgentText {
                    text: "It left the depot this morning.".into(),
                });
                f.wait("message", WAIT).await?;
                admin(WmAdmin::Disconnect);
            }
            EndReason::SessionExpired => admin(WmAdmin::Expire),
            EndReason::GuestLeft => {
                // Dropped without a close frame; the agent writes meanwhile: backfilled.
                admin(WmAdmin::Drop);
                admin(WmAdmin::AgentText {
                    text: "Are you still there?".into(),
                });
                f.wait("reconnected", WAIT).await?;
                let _ = sup.leave(&view.session).await;
            }
            EndReason::ConnectionClosed => admin(WmAdmin::Close {
                reason: Some("signedIn".into()),
            }),
            EndReason::SessionNotFound => {
                admin(WmAdmin::Forget);
                let _ = sup.send_message(&view.session, "hello?".into()).await;
            }
            EndReason::StartedNew => {
                let rx = tap.subscribe();
                if let Ok(new) = sup.start_new(&view.session).await {
                    // The new session on the same token is left: it ends too, as guest_left.
                    let mut g = Follower::new(rx, &new.session);
                    g.wait("connected", WAIT).await?;
                    let _ = sup.leave(&new.session).await;
                    g.wait("ended", WAIT).await?;
                }
            }
            _ => {}
        }
        f.wait("ended", WAIT).await
    };
    let ended = script.await.map_err(|e| e.to_string());
    Outcome::of(name, view.session, expected, ended)
}

/// Run the demo; true when every chat ended for the reason it was scripted to.
pub async fn run(print_events: bool) -> anyhow::Result<bool> {
    let emu = Emulator::start(fast_emulator(), "127.0.0.1:0".parse()?).await?;
    let stdout = print_events.then(|| StdSink::new(std::io::stdout()));
    let tap = TapSink::new(stdout, 65_536);
    let tap_tx = tap.sender();
    let cfg = fast_config(&emu.base_url());
    let no_stdin: Option<tokio::io::Empty> = None;
    let running = crate::daemon::start(cfg, tap, no_stdin).await?;
    eprintln!(
        "guestd demo: emulator on {}, 7 scripted guest chats (heartbeat 0.5 s, grace 2 s, no-activity rule 3 s) and 6 Web Messaging sessions",
        emu.base_url()
    );
    let plan = [
        ("leave after a drop + socket_closing", EndReason::GuestLeft),
        ("agent ends the chat", EndReason::AgentEnded),
        ("flow disconnects in queue", EndReason::FlowEnded),
        ("guest silent with an agent", EndReason::InactivityTimeout),
        ("network partition", EndReason::ReconnectGraceExpired),
        ("jwt expired, then a drop", EndReason::TokenExpired),
        ("half-open, then platform ends", EndReason::ServerEnded),
    ];
    let runs = plan.iter().map(|(name, reason)| {
        scenario(
            name,
            *reason,
            running.sup.clone(),
            emu.clone(),
            tap_tx.clone(),
        )
    });
    let wm_plan = [
        (
            "messenger: agent ends, read-only",
            EndReason::ConversationDisconnected,
        ),
        ("messenger: session expires", EndReason::SessionExpired),
        ("messenger: drop + backfill, leave", EndReason::GuestLeft),
        (
            "messenger: signed in elsewhere",
            EndReason::ConnectionClosed,
        ),
        ("messenger: platform lost it", EndReason::SessionNotFound),
        ("messenger: start_new", EndReason::StartedNew),
    ];
    let wm_runs = wm_plan.iter().map(|(name, reason)| {
        wm_scenario(
            name,
            *reason,
            running.sup.clone(),
            emu.clone(),
            tap_tx.clone(),
        )
    });
    let (mut outcomes, wm) = futures::future::join(
        futures::future::join_all(runs),
        futures::future::join_all(wm_runs),
    )
    .await;
    outcomes.extend(wm);
    running.shutdown().await;
    emu.shutdown();
    let mut ok = true;
    println!();
    println!(
        "{:<38} {:<16} {:<26} {:<26} {:>9}",
        "chat", "session", "expected", "ended", "duration"
    );
    for o in &outcomes {
        let got = o.got.clone().unwrap_or_else(|| "-".into());
        let mark = if got == o.expected.as_str() {
            ""
        } else {
            "  <-- MISMATCH"
        };
        ok &= mark.is_empty();
        println!(
            "{:<38} {:<16} {:<26} {:<26} {:>7}ms{mark}",
            o.name,
            o.session,
            o.expected.as_str(),
            got,
            o.duration_ms
        );
        if !mark.is_empty() {
            println!("    detail: {}", o.detail);
        }
    }
    println!(
        "{} of {} chats ended for the scripted reason",
        outcomes
            .iter()
            .filter(|o| o.got.as_deref() == Some(o.expected.as_str()))
            .count(),
        outcomes.len()
    );
    Ok(ok)
}
