//! guestd as a service: SIGTERM drain, leave-on-shutdown, SIGKILL and restart from the journal,
//! re-emitting an undelivered `ended`, a stalled stdout reader, the HTTP API and `/metrics`.

mod common;

use common::*;
use guestd::emulator::{Emulator, EmulatorConfig};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

fn journal_env(emu: &Emulator, journal: &std::path::Path) -> Vec<(String, String)> {
    let mut env = fast_env(emu);
    env.retain(|(k, _)| k != "GUESTD_JOURNAL__ENABLED");
    env.push(("GUESTD_JOURNAL__ENABLED".into(), "true".into()));
    env.push(("GUESTD_JOURNAL__PATH".into(), journal.display().to_string()));
    env.push(("GUESTD_SESSION__RECONNECT_GRACE".into(), "4s".into()));
    env.push(("GUESTD_SESSION__INACTIVITY_TIMEOUT".into(), "1m".into()));
    env
}

/// The messages a restart must send again for `session`, read after the first process was
/// killed and drained: the ones it wrote after the last id its journal recorded as seen. The
/// journal marks a message once its line is written, so a SIGKILL between the two repeats it
/// (at least once, docs/events.md); the backfill starts right after the recorded id, so
/// nothing it had recorded comes again.
fn unmarked(d1: &Daemon, journal: &std::path::Path, session: &str) -> Vec<Value> {
    let last = guestd::journal::load(journal)
        .unwrap()
        .into_iter()
        .find(|r| r.record.session == session)
        .expect("the killed process journaled the session")
        .last_message_id;
    let wrote: Vec<&Value> = d1
        .seen
        .iter()
        .filter(|v| v["session"] == session && v["type"] == "message")
        .collect();
    let from = match &last {
        None => 0,
        Some(id) => {
            wrote
                .iter()
                .position(|v| v["message_id"] == id.as_str())
                .unwrap_or_else(|| panic!("the journal's last id {id} was never written"))
                + 1
        }
    };
    wrote[from..].iter().map(|v| (*v).clone()).collect()
}

fn temp_journal() -> PathBuf {
    temp_dir("svc").join("journal.jsonl")
}

/// The status of a request.
async fn status(req: reqwest::RequestBuilder) -> u16 {
    req.send().await.unwrap().status().as_u16()
}

/// A chat started over the HTTP API at `base` (201), its reply.
async fn start_over_http(http: &reqwest::Client, base: &str, name: &str) -> Value {
    let r = http
        .post(format!("{base}/v1/sessions"))
        .json(&json!({"queue": "Support", "display_name": name}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json().await.unwrap()
}

async fn start_n(d: &mut Daemon, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let (s, c) = d.start(&format!("r{i}")).await;
        d.wait_type(&s, "connected").await;
        out.push((s, c));
    }
    out
}

/// `status` asked over stdin; the reply's `result`.
async fn status_stdin(d: &mut Daemon, conv: &str) -> Value {
    let rid = format!("st-{}", uuid::Uuid::new_v4());
    d.send(json!({"cmd": "status", "request_id": rid, "conversation_id": conv}))
        .await;
    let r = d.wait(|v| v["request_id"] == rid.as_str()).await;
    assert_eq!(r["type"], "command_result", "{r}");
    r["result"].clone()
}

/// `guestd status <conv>` against the running guestd at `addr`: (exit ok, printed JSON).
async fn status_cli(env: &[(String, String)], addr: &str, conv: &str) -> (bool, Value) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_guestd"))
        .args(["status", conv])
        .envs(env.iter().cloned())
        .env("GUESTD_CONTROL__HTTP_LISTEN", addr)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    (
        out.status.success(),
        serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {text}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        }),
    )
}

/// Issue 24: `status` remembers every end guestd reported. A chat its agent ended is answered
/// from guestd's memory (`source: "remembered"`: reason, `ended_at` = the `ended` event's
/// `ts`, detail, the platform's confirmation) over stdin, HTTP and `guestd status`; after a
/// SIGKILL and a restart, for that chat and for one whose agent ended it while guestd was down
/// (reported at the restart); by `guestd status` from the journal while no guestd runs; and a
/// restart whose window is shorter than their age forgets both (the fallbacks answer again,
/// here: none).
#[tokio::test]
async fn status_remembers_ended_chats_across_a_restart_then_forgets_them() {
    let emu = emulator(service_emu_cfg()).await;
    let journal = temp_journal();
    let mut env = with_http_any_port(
        with_platform(&emu, journal_env(&emu, &journal)),
        "127.0.0.1",
    );
    env.push(("GUESTD_PLATFORM__CONFIRM_DELAY".into(), "20ms".into()));
    let mut d1 = Daemon::spawn(env.clone(), &[]);
    let chats = start_n(&mut d1, 2).await;
    let ((s1, c1), (s2, c2)) = (chats[0].clone(), chats[1].clone());
    for (s, c) in &chats {
        emu.agent_join(c).unwrap();
        d1.wait_type(s, "agent_connected").await;
    }
    emu.agent_end(&c1).unwrap();
    let ended1 = d1.wait_type(&s1, "ended").await;
    assert_eq!(ended1["reason"], "agent_ended");
    let confirmed = d1.wait_type(&s1, "end_confirmed").await;
    assert_eq!(confirmed["agrees"], true, "{confirmed}");
    let check1 = |r: &Value| {
        assert_eq!(r["alive"], false, "{r}");
        assert_eq!(r["source"], "remembered", "{r}");
        assert_eq!(r["session"], s1.as_str(), "{r}");
        assert_eq!(r["reason"], "agent_ended", "{r}");
        assert_eq!(r["ended_at"], ended1["ts"], "{r}");
        assert_eq!(r["detail"], ended1["detail"], "{r}");
        assert_eq!(r["duration_ms"], ended1["duration_ms"], "{r}");
        assert_eq!(r["confirmation"]["platform_reason"], "agent_ended", "{r}");
        assert_eq!(r["confirmation"]["agrees"], true, "{r}");
        assert_eq!(r["end_time"], confirmed["platform_end_time"], "{r}");
    };
    // The confirmation is noted once its line is flushed; the status command is read after it.
    check1(&status_stdin(&mut d1, &c1).await);
    // The live chat: held, with its deadline.
    let live = status_stdin(&mut d1, &c2).await;
    assert_eq!(
        (live["alive"].clone(), live["source"].clone()),
        (json!(true), json!("guestd"))
    );
    assert_eq!(live["ends_because"], "inactivity_timeout", "{live}");

    signal(d1.pid(), "KILL");
    let _ = d1.child.wait().await;
    emu.agent_end(&c2).unwrap();

    let mut d2 = Daemon::spawn(env.clone(), &[]);
    let ended2 = d2.wait_type(&s2, "ended").await;
    assert_eq!(ended2["reason"], "agent_ended");
    d2.wait_type(&s2, "end_confirmed").await;
    check1(&status_stdin(&mut d2, &c1).await);
    let r2 = status_stdin(&mut d2, &c2).await;
    assert_eq!(
        (
            r2["source"].clone(),
            r2["reason"].clone(),
            r2["ended_at"].clone()
        ),
        (
            json!("remembered"),
            json!("agent_ended"),
            ended2["ts"].clone()
        ),
        "{r2}"
    );
    assert_eq!(r2["confirmation"]["agrees"], true, "{r2}");
    // Over HTTP and from the command line, the same answer.
    let addr = d2.http_addr().await;
    let http: Value = reqwest::get(format!("http://{addr}/v1/conversations/{c1}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    check1(&http);
    let (ok, cli) = status_cli(&env, &addr, &c1).await;
    assert!(ok, "{cli}");
    check1(&cli);
    let d2 = finish_ok(d2).await;
    assert_eq!(d2.count(&s1, "ended"), 0, "no end is reported twice");
    // No guestd running: `guestd status` reads the journal's memory.
    let (ok, cli) = status_cli(&env, "", &c1).await;
    assert!(ok, "{cli}");
    check1(&cli);

    // A window shorter than their age: forgotten at the start; without [platform] or a jwt
    // nothing else can answer, as before.
    let mut env3 = journal_env(&emu, &journal);
    env3.push(("GUESTD_STATUS__REMEMBER_ENDED".into(), "1ms".into()));
    let mut d3 = Daemon::spawn(env3, &[]);
    let rid = "st-forgotten";
    d3.send(json!({"cmd": "status", "request_id": rid, "conversation_id": c1}))
        .await;
    let r = d3.wait(|v| v["request_id"] == rid).await;
    assert_eq!(r["type"], "command_error", "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("does not hold"),
        "{r}"
    );
    finish_ok(d3).await;
}

#[tokio::test]
async fn sigterm_drains_keeps_chats_and_exits_zero() {
    let emu = emulator(service_emu_cfg()).await;
    let journal = temp_journal();
    let mut d = Daemon::spawn(journal_env(&emu, &journal), &[]);
    let chats = start_n(&mut d, 3).await;
    let t0 = std::time::Instant::now();
    signal(d.pid(), "TERM");
    d.drain().await;
    let st = tokio::time::timeout(wait(), d.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(st.success(), "{st:?}\n{}", d.stderr());
    // Kept chats are only closed: well inside the drain timeout (10 s), on a loaded machine too.
    assert!(
        t0.elapsed() < Duration::from_secs(10).min(scaled(Duration::from_secs(4))),
        "inside the drain timeout: {:?}",
        t0.elapsed()
    );
    assert_eq!(
        d.seen.iter().filter(|v| v["type"] == "ended").count(),
        0,
        "chats are kept, not ended"
    );
    for (_, c) in &chats {
        // Closed cleanly by the client, not left, not ended.
        wait_log(&emu, c, "socket_closed", 1).await;
        let closed = emu
            .log()
            .into_iter()
            .find(|e| e.conversation_id.as_deref() == Some(c) && e.action == "socket_closed")
            .unwrap();
        assert!(closed.detail.contains("closed by client"), "{closed:?}");
        assert!(emu.conversation(c).unwrap().ended.is_none());
        assert!(
            !emu.log()
                .iter()
                .any(|e| e.conversation_id.as_deref() == Some(c) && e.action == "leave")
        );
    }
    let kept = guestd::journal::load(&journal).unwrap();
    assert_eq!(
        kept.len(),
        3,
        "every live chat is in the journal for the next start"
    );
    assert!(d.stderr().contains("shutting down"));
}

#[tokio::test]
async fn leave_on_shutdown_ends_every_chat() {
    let emu = emulator(service_emu_cfg()).await;
    let mut d = Daemon::spawn(fast_env(&emu), &["--leave-on-shutdown"]);
    let chats = start_n(&mut d, 3).await;
    signal(d.pid(), "TERM");
    d.drain().await;
    assert!(d.child.wait().await.unwrap().success());
    for (s, c) in &chats {
        let ended: Vec<_> = d
            .seen
            .iter()
            .filter(|v| v["session"] == s.as_str() && v["type"] == "ended")
            .collect();
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0]["reason"], "guest_left");
        assert!(emu.conversation(c).unwrap().ended.is_some());
    }
}

/// Issue 29: guestd is SIGKILLed while an agent is connected and the guest is silent; the
/// platform's no-activity rule ends the chat while guestd is down (the guest's leg and the
/// agent's in the same millisecond); guestd comes back inside the grace window. It reported
/// `agent_ended` (the tied leave dates) before the journal kept the agent and the guest's last
/// message; the true reason is `inactivity_timeout`.
#[tokio::test]
async fn a_chat_ended_for_no_activity_while_guestd_was_down_says_so() {
    let emu = emulator(EmulatorConfig {
        inactivity_timeout: Duration::from_secs(3),
        reconnect_grace: Duration::from_secs(20),
        ..service_emu_cfg()
    })
    .await;
    let journal = temp_journal();
    let mut env = journal_env(&emu, &journal);
    for (k, v) in [
        ("GUESTD_SESSION__INACTIVITY_TIMEOUT", "3s"),
        ("GUESTD_SESSION__INACTIVITY_WARNING_LEAD", "1s"),
        ("GUESTD_SESSION__RECONNECT_GRACE", "20s"),
    ] {
        env.retain(|(e, _)| e != k);
        env.push((k.into(), v.into()));
    }
    let mut d1 = Daemon::spawn(env.clone(), &[]);
    let chats = start_n(&mut d1, 1).await;
    let (s, c) = chats[0].clone();
    emu.agent_join(&c).unwrap();
    d1.wait_type(&s, "agent_connected").await;
    signal(d1.pid(), "KILL");
    let _ = d1.child.wait().await;
    // The platform's rule ends the chat 3 s after the agent connected, guestd being down.
    wait_log(&emu, &c, "ended", 1).await;
    let ended_by = emu
        .log()
        .into_iter()
        .find(|e| e.conversation_id.as_deref() == Some(c.as_str()) && e.action == "ended")
        .unwrap();
    assert_eq!(ended_by.detail, "Inactivity");
    let mut d2 = Daemon::spawn(env, &[]);
    let ended = d2.wait_type(&s, "ended").await;
    assert_eq!(ended["reason"], "inactivity_timeout", "{:#?}", d2.seen);
    finish_ok(d2).await;
}

/// Issue 29: guestd is SIGKILLed while its stdout is not read (events wait in its queue, lines
/// the pipe could not take) and agents post messages all along, before, across and after the
/// kill; a restart picks every chat up. Across both processes' stdout, read to its end: every
/// posted message appears at least once and within one process exactly once (a restart may
/// repeat what the first process wrote after its last journaled message: at-least-once), and
/// every chat has exactly one `ended`. The journal used to record a message as emitted when its
/// event was queued: the events the kill caught in the queue were never written, and the
/// restart's backfill started after them.
#[tokio::test]
async fn sigkill_with_events_queued_and_messages_arriving_loses_nothing() {
    const CHATS: usize = 16;
    let emu = emulator(EmulatorConfig {
        reconnect_grace: Duration::from_secs(30),
        ..service_emu_cfg()
    })
    .await;
    let journal = temp_journal();
    let mut env = with_http_any_port(journal_env(&emu, &journal), "127.0.0.1");
    env.retain(|(k, _)| k != "GUESTD_SESSION__RECONNECT_GRACE");
    env.push(("GUESTD_SESSION__RECONNECT_GRACE".into(), "30s".into()));
    env.push(("GUESTD_EVENTS__QUEUE_CAPACITY".into(), "64".into()));
    let mut d1 = Daemon::spawn(env.clone(), &[]);
    let base = d1.http_base().await;
    let chats = start_n(&mut d1, CHATS).await;
    for (s, c) in &chats {
        emu.agent_join(c).unwrap();
        d1.wait_type(s, "agent_connected").await;
    }
    // Agents post from here on, round robin over the chats, until told to stop.
    let stop = tokio_util::sync::CancellationToken::new();
    let poster = {
        let (emu, stop) = (emu.clone(), stop.clone());
        let convs: Vec<String> = chats.iter().map(|(_, c)| c.clone()).collect();
        let pad = "x".repeat(200);
        tokio::spawn(async move {
            let mut posted: Vec<(String, String)> = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            for i in 0.. {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let c = &convs[i % convs.len()];
                let body = format!("m{i} {pad}");
                emu.agent_send(c, &body).unwrap();
                posted.push((c.clone(), body));
            }
            posted
        })
    };
    // stdout is not read from now on: the pipe fills, then guestd's queue. The stall shows
    // only in guestd's metrics (no line can say so: nobody reads them), so they are polled.
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + wait();
    loop {
        let m = metrics_text(&http, &base).await;
        if metric(&m, "guestd_event_queue_full_total") >= 3.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the output never stalled:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(d1.pid(), "KILL");
    let _ = d1.child.wait().await;
    // What the first process wrote is still in the pipe: read it to its end.
    d1.drain().await;
    let mut d2 = Daemon::spawn(env, &[]);
    for (s, _) in &chats {
        d2.wait_type(s, "reconnected").await;
    }
    // Agents write on for a moment after the restart, then end every chat.
    for (s, _) in chats.iter().take(2) {
        d2.wait(|v| {
            v["session"] == s.as_str() && v["type"] == "message" && v["backfilled"] == false
        })
        .await;
    }
    stop.cancel();
    let posted = poster.await.unwrap();
    for (s, c) in &chats {
        emu.agent_end(c).unwrap();
        d2.wait_type(s, "ended").await;
    }
    let d2 = finish_ok(d2).await;
    let session_of: HashMap<&str, &str> = chats
        .iter()
        .map(|(s, c)| (c.as_str(), s.as_str()))
        .collect();
    let mut lost = Vec::new();
    for (c, body) in &posted {
        let s = session_of[c.as_str()];
        let n = |d: &Daemon| {
            d.seen
                .iter()
                .filter(|v| {
                    v["session"] == s && v["type"] == "message" && v["body"] == body.as_str()
                })
                .count()
        };
        let (n1, n2) = (n(&d1), n(&d2));
        assert!(n1 <= 1 && n2 <= 1, "{s}: {n1} and {n2} copies of {body:.8}");
        if n1 + n2 == 0 {
            lost.push(body[..body.find(' ').unwrap_or(body.len())].to_string());
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} posted messages lost: {lost:?}",
        lost.len(),
        posted.len()
    );
    for (s, _) in &chats {
        assert_eq!(d1.count(s, "ended") + d2.count(s, "ended"), 1, "{s}");
    }
    for d in [&d1, &d2] {
        let mut ids = std::collections::HashSet::new();
        for v in d.seen.iter().filter(|v| v["type"] == "message") {
            assert!(
                ids.insert(v["message_id"].to_string()),
                "twice in one process: {v}"
            );
        }
    }
    let written_by_d1 = d1.seen.iter().filter(|v| v["type"] == "message").count();
    eprintln!(
        "{} messages posted, {written_by_d1} written before the kill, {} after",
        posted.len(),
        d2.seen.iter().filter(|v| v["type"] == "message").count()
    );
}

#[tokio::test]
async fn sigkill_then_restart_picks_every_chat_back_up() {
    let emu = emulator(service_emu_cfg()).await;
    let journal = temp_journal();
    let mut d1 = Daemon::spawn(journal_env(&emu, &journal), &[]);
    let chats = start_n(&mut d1, 5).await;
    // Two messages seen before the crash, one sent while guestd is down. The first is
    // journaled as seen well before the crash (the second's round trip lies between), so the
    // backfill's starting point is tested, not only that nothing is lost.
    emu.agent_join(&chats[0].1).unwrap();
    d1.wait_type(&chats[0].0, "agent_connected").await;
    emu.agent_send(&chats[0].1, "first").unwrap();
    d1.wait(|v| v["body"] == "first").await;
    emu.agent_send(&chats[0].1, "before the crash").unwrap();
    d1.wait(|v| v["body"] == "before the crash").await;
    signal(d1.pid(), "KILL");
    let _ = d1.child.wait().await;
    d1.drain().await;
    let again = unmarked(&d1, &journal, &chats[0].0);
    emu.agent_send(&chats[0].1, "while guestd was down")
        .unwrap();
    // One chat ends while guestd is down: the agent ends it.
    emu.agent_join(&chats[1].1).unwrap();
    wait_log(&emu, &chats[1].1, "agent_connected", 1).await;
    emu.agent_end(&chats[1].1).unwrap();

    let mut d2 = Daemon::spawn(journal_env(&emu, &journal), &[]);
    let mut ended: HashMap<String, String> = HashMap::new();
    let mut resumed = 0;
    let mut reconnected = 0;
    while resumed < 5 || reconnected < 4 || ended.is_empty() {
        let v = d2.next().await.unwrap();
        match v["type"].as_str().unwrap() {
            "session_started" => {
                assert_eq!(v["mode"], "resume");
                resumed += 1;
            }
            "reconnected" => reconnected += 1,
            "ended" => {
                ended.insert(
                    v["session"].as_str().unwrap().into(),
                    v["reason"].as_str().unwrap().into(),
                );
            }
            _ => {}
        }
    }
    assert_eq!(
        ended.get(&chats[1].0).map(String::as_str),
        Some("agent_ended"),
        "{:#?}",
        d2.seen
    );
    let backfilled = match d2
        .seen
        .iter()
        .find(|v| v["body"] == "while guestd was down")
    {
        Some(v) => v.clone(),
        None => d2.wait(|v| v["body"] == "while guestd was down").await,
    };
    assert_eq!(backfilled["backfilled"], true);
    let said: Vec<&Value> = d2
        .seen
        .iter()
        .filter(|v| v["session"] == chats[0].0.as_str() && v["type"] == "message")
        .collect();
    let ids =
        |vs: &[&Value]| -> Vec<String> { vs.iter().map(|v| v["message_id"].to_string()).collect() };
    let mut expected: Vec<&Value> = again.iter().collect();
    expected.push(&backfilled);
    assert_eq!(
        ids(&said),
        ids(&expected),
        "the backfill starts after the last id the journal recorded: only what the first \
         process wrote after it comes again, then the message sent while guestd was down"
    );
    // End the rest; each gets one ended, none got one in the first process.
    for (s, c) in &chats[2..] {
        emu.flow_disconnect(c).unwrap();
        d2.wait_type(s, "ended").await;
    }
    emu.agent_end(&chats[0].1).unwrap();
    d2.wait_type(&chats[0].0, "ended").await;
    let d2 = finish_ok(d2).await;
    for (s, _) in &chats {
        let n1 = d1
            .seen
            .iter()
            .filter(|v| v["session"] == s.as_str() && v["type"] == "ended")
            .count();
        let n2 = d2
            .seen
            .iter()
            .filter(|v| v["session"] == s.as_str() && v["type"] == "ended")
            .count();
        assert_eq!(n1 + n2, 1, "{s}");
    }
    assert!(
        guestd::journal::load(&journal).unwrap().is_empty(),
        "nothing left to resume"
    );
}

/// Issue 25, item 10: an agent writes while guestd is down (SIGKILL). After the restart the
/// session knows only the guest; the emulator answers members lists a second late, so the
/// backfill answers first. The backfilled messages still say `sender_role: "agent"` with the
/// agent's member id, as the one read live before the crash did: once each, in order.
#[tokio::test]
async fn messages_backfilled_after_a_restart_carry_the_agents_role() {
    let emu = emulator(service_emu_cfg()).await;
    let journal = temp_journal();
    let mut d1 = Daemon::spawn(journal_env(&emu, &journal), &[]);
    let chats = start_n(&mut d1, 1).await;
    let (s, c) = &chats[0];
    emu.agent_join(c).unwrap();
    d1.wait_type(s, "agent_connected").await;
    let agent = emu.conversation(c).unwrap().agent_member_id.unwrap();
    emu.agent_send(c, "live").unwrap();
    let live = d1.wait(|v| v["body"] == "live").await;
    assert_eq!(
        (live["sender_role"].as_str(), live["sender_id"].as_str()),
        (Some("agent"), Some(agent.as_str()))
    );
    signal(d1.pid(), "KILL");
    let _ = d1.child.wait().await;
    d1.drain().await;
    let again = unmarked(&d1, &journal, s);
    let down = ["down 1", "down 2", "down 3"];
    for body in down {
        emu.agent_send(c, body).unwrap();
    }
    // Not scaled: well under guestd's 10 s bound on the wait for roles, well over a backfill's
    // time on loopback.
    emu.delay_list_members(Duration::from_secs(1));

    let mut d2 = Daemon::spawn(journal_env(&emu, &journal), &[]);
    // `reconnected` follows the backfilled messages.
    d2.wait_type(s, "reconnected").await;
    emu.delay_list_members(Duration::ZERO);
    let said: Vec<&Value> = d2
        .seen
        .iter()
        .filter(|v| v["session"] == s.as_str() && v["type"] == "message")
        .collect();
    // What the first process wrote after the last id its journal recorded comes again (at
    // least once), with the sender and role it had live; then the agent's three, once each.
    assert!(said.len() >= again.len(), "{said:#?}");
    let (repeated, new) = said.split_at(again.len());
    for (v, live) in repeated.iter().zip(&again) {
        assert_eq!(v["message_id"], live["message_id"], "{v}");
        assert_eq!(v["backfilled"], true, "{v}");
        assert_eq!(
            (&v["sender_id"], &v["sender_role"]),
            (&live["sender_id"], &live["sender_role"]),
            "the role it had live: {v}"
        );
    }
    let bodies: Vec<&str> = new.iter().map(|v| v["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, down, "once each, in order, after the last seen");
    for v in new {
        assert_eq!(v["backfilled"], true, "{v}");
        assert_eq!(v["sender_id"], agent.as_str(), "{v}");
        assert_eq!(
            v["sender_role"], "agent",
            "the role the live message had: {v}"
        );
    }
    emu.agent_end(c).unwrap();
    d2.wait_type(s, "ended").await;
    let d2 = finish_ok(d2).await;
    let again = d2
        .seen
        .iter()
        .filter(|v| v["type"] == "message" && down.contains(&v["body"].as_str().unwrap_or("")))
        .count();
    assert_eq!(again, down.len(), "no message twice");
}

/// Issue 9, case 2: chats their agents end while guestd is down (SIGKILL; grace 4 s). The
/// platform gives the agent and the guest the same leave date; every one is `agent_ended`, once.
#[tokio::test]
async fn chats_ended_by_agents_while_guestd_was_down_with_tied_dates_are_agent_ended() {
    let emu = emulator(EmulatorConfig {
        tie_leave_dates: true,
        ..service_emu_cfg()
    })
    .await;
    let journal = temp_journal();
    let mut d1 = Daemon::spawn(journal_env(&emu, &journal), &[]);
    let chats = start_n(&mut d1, 8).await;
    for (s, c) in &chats {
        emu.agent_join(c).unwrap();
        d1.wait_type(s, "agent_connected").await;
    }
    signal(d1.pid(), "KILL");
    let _ = d1.child.wait().await;
    for (_, c) in &chats {
        emu.agent_end(c).unwrap();
        let m = emu.conversation(c).unwrap();
        let json = serde_json::to_value(&m).unwrap();
        let dates: Vec<&str> = json["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "AGENT" || m["role"] == "CUSTOMER")
            .map(|m| m["leaveDate"].as_str().unwrap())
            .collect();
        assert_eq!(dates.len(), 2);
        assert_eq!(dates[0], dates[1], "tied leave dates");
    }
    let mut d2 = Daemon::spawn(journal_env(&emu, &journal), &[]);
    let mut ended: HashMap<String, String> = HashMap::new();
    while ended.len() < chats.len() {
        let v = d2.next().await.unwrap();
        if v["type"] == "ended" {
            let prev = ended.insert(
                v["session"].as_str().unwrap().into(),
                v["reason"].as_str().unwrap().into(),
            );
            assert!(prev.is_none(), "second ended: {v}");
        }
    }
    for (s, _) in &chats {
        assert_eq!(ended[s], "agent_ended", "{s}: {:#?}", d2.types(s));
        assert_eq!(d1.count(s, "ended"), 0);
    }
    finish_ok(d2).await;
}

/// stdout's reader goes away before a chat ends: the `ended` is never acknowledged as written,
/// SIGTERM still exits within the drain timeout (status 75: undelivered), and the next start
/// writes that `ended`, with the same event_id. (It used to be acknowledged and lost.)
#[tokio::test]
async fn an_ended_nobody_read_is_written_by_the_next_start() {
    let emu = emulator(service_emu_cfg()).await;
    let journal = temp_journal();
    let mut env = journal_env(&emu, &journal);
    env.push(("GUESTD_SHUTDOWN__DRAIN_TIMEOUT".into(), "2s".into()));
    let mut d1 = Daemon::spawn(env.clone(), &[]);
    let chats = start_n(&mut d1, 2).await;
    d1.close_stdout();
    emu.flow_disconnect(&chats[0].1).unwrap();
    wait_log(&emu, &chats[0].1, "socket_closed", 1).await;
    let begun = std::time::Instant::now();
    signal(d1.pid(), "TERM");
    let st = tokio::time::timeout(wait(), d1.child.wait())
        .await
        .expect("exits despite the stalled output")
        .unwrap();
    assert!(
        begun.elapsed() < Duration::from_secs(2) + scaled(Duration::from_millis(1500)),
        "within the drain timeout (2 s) and a margin: {:?}",
        begun.elapsed()
    );
    assert_eq!(
        st.code(),
        Some(75),
        "undelivered events; stderr:\n{}",
        d1.stderr()
    );
    assert!(d1.stderr().contains("events wait until output works again"));

    let mut d2 = Daemon::spawn(env, &[]);
    let ended = d2
        .wait(|v| v["type"] == "ended" && v["session"] == chats[0].0.as_str())
        .await;
    assert_eq!(ended["reason"], "flow_ended");
    assert_eq!(ended["event_id"], format!("{}:ended", chats[0].0));
    // The other chat is picked up as usual.
    let resumed = d2
        .wait(|v| v["type"] == "session_started" && v["session"] == chats[1].0.as_str())
        .await;
    assert_eq!(resumed["mode"], "resume");
    emu.flow_disconnect(&chats[1].1).unwrap();
    d2.wait_type(&chats[1].0, "ended").await;
    finish_ok(d2).await;
}

/// The HTTP API refuses what a web page could send it: a foreign `Host` (DNS rebinding), any
/// `Origin`, a body that is not JSON; with a token, a request without it. Probes stay open.
#[tokio::test]
async fn the_http_api_refuses_web_pages_and_strangers() {
    let emu = emulator(service_emu_cfg()).await;
    let token_file = temp_journal().with_file_name("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let mut env = with_http_any_port(fast_env(&emu), "127.0.0.1");
    env.push((
        "GUESTD_CONTROL__TOKEN_FILE".into(),
        token_file.display().to_string(),
    ));
    let mut d = Daemon::spawn(env, &[]);
    let (s, _) = d.start("r1").await;
    let http = reqwest::Client::new();
    let base = d.http_base().await;
    let port = base.rsplit(':').next().unwrap_or_default().to_string();
    let start = json!({"queue": "Support", "display_name": "Ann"});
    let auth = "Bearer s3cret-token";
    // A cross-site text/plain POST (no preflight needed): refused, no chat created.
    let created_before = emu.conversation_ids().len();
    let r = http
        .post(format!("{base}/v1/sessions"))
        .header("authorization", auth)
        .header("content-type", "text/plain")
        .body(start.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = http
        .post(format!("{base}/v1/sessions/{s}/messages"))
        .header("authorization", auth)
        .header("origin", "https://evil.example")
        .json(&json!({"body": "sent by a web page"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // DNS rebinding: the page's own host name for 127.0.0.1.
    let r = http
        .get(format!("{base}/v1/sessions"))
        .header("authorization", auth)
        .header("host", format!("rebind.evil.example:{port}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // No token, a wrong token.
    assert_eq!(status(http.get(format!("{base}/v1/sessions"))).await, 401);
    assert_eq!(
        status(
            http.get(format!("{base}/metrics"))
                .header("authorization", "Bearer nope")
        )
        .await,
        401
    );
    assert_eq!(emu.conversation_ids().len(), created_before);
    // Probes are open; the right token works.
    assert_eq!(status(http.get(format!("{base}/readyz"))).await, 200);
    let r = http
        .post(format!("{base}/v1/sessions"))
        .header("authorization", auth)
        .json(&start)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(
        !d.stderr().contains("s3cret-token"),
        "the token is never logged"
    );
    finish_ok(d).await;
}

/// With `[platform]`, a chat its agent ended while guestd was down is reported after the restart
/// and confirmed by the platform like any other.
#[tokio::test]
async fn an_end_while_guestd_was_down_is_confirmed_after_the_restart() {
    let emu = emulator(service_emu_cfg()).await;
    let journal = temp_journal();
    let mut env = with_platform(&emu, journal_env(&emu, &journal));
    env.push(("GUESTD_PLATFORM__CONFIRM_DELAY".into(), "20ms".into()));
    let mut d1 = Daemon::spawn(env.clone(), &[]);
    let chats = start_n(&mut d1, 1).await;
    let (s, c) = &chats[0];
    emu.agent_join(c).unwrap();
    d1.wait_type(s, "agent_connected").await;
    signal(d1.pid(), "KILL");
    let _ = d1.child.wait().await;
    emu.agent_end(c).unwrap();
    let mut d2 = Daemon::spawn(env, &[]);
    let ended = d2.wait_type(s, "ended").await;
    assert_eq!(ended["reason"], "agent_ended");
    let v = d2.wait_type(s, "end_confirmed").await;
    assert_eq!(
        (v["platform_reason"].clone(), v["agrees"].clone()),
        (json!("agent_ended"), json!(true)),
        "{v}"
    );
    finish_ok(d2).await;
}

async fn finish_ok(mut d: Daemon) -> Daemon {
    signal(d.pid(), "TERM");
    d.drain().await;
    assert!(d.child.wait().await.unwrap().success(), "{}", d.stderr());
    d
}

#[tokio::test]
async fn an_end_decided_but_not_written_is_written_after_restart_with_the_same_event_id() {
    let emu = emulator(service_emu_cfg()).await;
    let journal = temp_journal();
    let lines = [
        json!({"op":"session","session":"s-crashed","chat":{"conversation_id":"c-1","member_id":"m-1","jwt":"secret","event_stream_uri":"ws://127.0.0.1:1/v2/stream/c-1"},"started_ms":1,"mode":"start"}),
        json!({"op":"ending","session":"s-crashed","ending":{"reason":"agent_ended","detail":"the agent disconnected just before the guest","duration_ms":1234,"event_id":"s-crashed:ended","ts":"2026-11-26T10:00:00.000Z"}}),
    ];
    std::fs::write(
        &journal,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let mut d = Daemon::spawn(journal_env(&emu, &journal), &[]);
    let e = d.wait(|v| v["type"] == "ended").await;
    assert_eq!(e["event_id"], "s-crashed:ended");
    assert_eq!(e["reason"], "agent_ended");
    assert_eq!(e["ts"], "2026-11-26T10:00:00.000Z");
    let d = finish_ok(d).await;
    assert_eq!(d.seen.iter().filter(|v| v["type"] == "ended").count(), 1);
    assert!(guestd::journal::load(&journal).unwrap().is_empty());
}

#[tokio::test]
async fn a_stalled_stdout_reader_loses_no_event() {
    let emu = emulator(service_emu_cfg()).await;
    let mut env = with_http_any_port(fast_env(&emu), "127.0.0.1");
    env.push(("GUESTD_EVENTS__QUEUE_CAPACITY".into(), "4".into()));
    env.push(("GUESTD_SESSION__INACTIVITY_TIMEOUT".into(), "1m".into()));
    let mut d = Daemon::spawn(env, &[]);
    let base = d.http_base().await;
    let chats = start_n(&mut d, 10).await;
    for (s, c) in &chats {
        emu.agent_join(c).unwrap();
        d.wait_type(s, "agent_connected").await;
    }
    // Stop reading stdout. 10 chats x 60 messages of ~300 bytes: far more than the pipe holds.
    let big = "x".repeat(200);
    for (_, c) in &chats {
        for i in 0..60 {
            emu.agent_send(c, &format!("{i} {big}")).unwrap();
        }
        emu.agent_end(c).unwrap();
    }
    // The daemon is back-pressured, not failing: its HTTP side still answers.
    let http = reqwest::Client::new();
    let metrics = metrics_text(&http, &base).await;
    assert!(metrics.contains("guestd_event_queue_depth"), "{metrics}");
    // Now read everything.
    let mut ended = 0;
    while ended < chats.len() {
        let v = d.next().await.unwrap();
        ended += (v["type"] == "ended") as usize;
    }
    for (s, _) in &chats {
        assert_eq!(
            d.count(s, "message") - 1,
            60,
            "every message of {s} (plus the agent's member-join)"
        );
        assert_eq!(d.count(s, "ended"), 1);
    }
    let metrics = metrics_text(&http, &base).await;
    let full = metric(&metrics, "guestd_event_queue_full_total");
    assert!(full > 0.0, "the stall was seen: {full}");
    finish_ok(d).await;
}

/// The text of guestd's `/metrics` at `base`.
async fn metrics_text(http: &reqwest::Client, base: &str) -> String {
    http.get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn metric_with(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn http_api_ops_endpoints_and_metrics_match_what_happened() {
    let emu = emulator(service_emu_cfg()).await;
    let env = with_http_any_port(fast_env(&emu), "127.0.0.1");
    let mut d = Daemon::spawn(env, &[]);
    let base = d.http_base().await;
    let http = reqwest::Client::new();
    // Before any chat: every metric is described, every counter is there at zero, and the build
    // and process metrics are there (a counter that appears with its first event hides that
    // event from rate() and increase()).
    let first = metrics_text(&http, &base).await;
    let typed: Vec<&str> = first
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(typed.len() > 30, "{first}");
    for name in &typed {
        assert!(
            first.contains(&format!("# HELP {name} ")),
            "{name} has no # HELP line"
        );
    }
    for reason in guestd::events::EndReason::ALL {
        let series = format!("guestd_ended_total{{reason=\"{}\"}} 0", reason.as_str());
        assert!(first.contains(&series), "no {series} in {first}");
    }
    for series in [
        "guestd_reconnects_total 0",
        "guestd_heartbeat_misses_total 0",
        "guestd_connect_failures_total 0",
        "guestd_event_write_failures_total 0",
        "guestd_sessions{backend=\"guest_chat\",state=\"connected\"} 0",
        "guestd_sessions{backend=\"web_messaging\",state=\"reconnecting\"} 0",
    ] {
        assert!(first.contains(series), "no {series} in {first}");
    }
    assert!(
        first.contains(&format!(
            "guestd_build_info{{version=\"{}\",git_revision=",
            env!("CARGO_PKG_VERSION")
        )),
        "{first}"
    );
    assert!(
        metric(&first, "process_resident_memory_bytes") > 1e6,
        "{first}"
    );
    assert!(metric(&first, "process_open_fds") > 3.0, "{first}");
    assert!(
        metric(&first, "process_start_time_seconds") > 1.7e9,
        "{first}"
    );
    // Readiness comes once started; the first start proves the port is up.
    let (s0, c0) = d.start("r0").await;
    assert_eq!(status(http.get(format!("{base}/healthz"))).await, 200);
    assert_eq!(status(http.get(format!("{base}/readyz"))).await, 200);
    // Start and manage a chat over HTTP.
    let v = start_over_http(&http, &base, "Bob").await;
    let s1 = v["session"].as_str().unwrap().to_string();
    let c1 = v["conversation_id"].as_str().unwrap().to_string();
    d.wait_type(&s1, "connected").await;
    let got: Value = http
        .get(format!("{base}/v1/sessions/{c1}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["session"], s1.as_str());
    let r = http
        .post(format!("{base}/v1/sessions/{s1}/messages"))
        .json(&json!({"body": "over http"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    d.wait(|v| v["body"] == "over http").await;
    assert_eq!(
        status(http.post(format!("{base}/v1/sessions/{s1}/typing"))).await,
        200
    );
    let list: Value = http
        .get(format!("{base}/v1/sessions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["sessions"].as_array().unwrap().len(), 2);
    // Bad requests are clear and harmless.
    let r = http
        .post(format!("{base}/v1/sessions"))
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("not JSON"));
    assert_eq!(
        status(http.get(format!("{base}/v1/sessions/s-nope"))).await,
        404
    );
    assert_eq!(
        http.post(format!("{base}/v1/sessions/{s1}/messages"))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    // A reconnect and a heartbeat miss, then two ends.
    emu.drop_sockets(&c0, true).unwrap();
    d.wait_type(&s0, "reconnected").await;
    emu.half_open(&c0).unwrap();
    d.wait_type(&s0, "heartbeat_missed").await;
    d.wait_type(&s0, "reconnected").await;
    assert_eq!(
        status(http.delete(format!("{base}/v1/sessions/{s1}"))).await,
        200
    );
    d.wait_type(&s1, "ended").await;
    emu.flow_disconnect(&c0).unwrap();
    d.wait_type(&s0, "ended").await;
    let m = metrics_text(&http, &base).await;
    assert_eq!(
        metric_with(&m, "guestd_ended_total", "reason=\"guest_left\""),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_with(&m, "guestd_ended_total", "reason=\"flow_ended\""),
        1.0
    );
    assert_eq!(metric(&m, "guestd_ended_total"), 2.0);
    assert_eq!(metric(&m, "guestd_reconnects_total"), 2.0);
    assert_eq!(metric(&m, "guestd_connects_total"), 4.0);
    assert!(metric(&m, "guestd_heartbeat_misses_total") >= 2.0);
    assert!(
        metric_with(
            &m,
            "guestd_rest_request_duration_seconds_bucket",
            "call=\"create\""
        ) > 0.0
    );
    assert_eq!(
        metric_with(&m, "guestd_sessions", "state=\"connected\""),
        0.0
    );
    // Every websocket connect, opened or failed, is timed once.
    assert_eq!(
        metric_with(
            &m,
            "guestd_connect_duration_seconds_count",
            "backend=\"guest_chat\""
        ),
        metric(&m, "guestd_connects_total") + metric(&m, "guestd_connect_failures_total")
    );
    let d = finish_ok(d).await;
    assert!(d.seen.iter().all(|v| v["type"] != "command_error"));
}

#[tokio::test]
async fn bad_config_is_refused_with_a_clear_error() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_guestd"))
        .args(["run"])
        .env("GUESTD_SESSION__HEARTBEAT_TOLERANCE", "0")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("session.heartbeat_tolerance"), "{err}");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_guestd"))
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/guestd.toml"),
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("reconnect_grace = \"2m\""));
}

/// Under systemd (`Type=notify`, config/guestd.service): `READY=1` comes only once the HTTP API
/// answers, `STOPPING=1` when the drain starts, and events go to their own file (mode 0600),
/// nothing to stdout.
#[cfg(unix)]
#[tokio::test]
async fn under_systemd_ready_means_serving_stopping_means_draining_and_events_have_their_own_file()
{
    use std::os::unix::fs::PermissionsExt;
    let emu = emulator(service_emu_cfg()).await;
    let dir = temp_dir("notify");
    let sock_path = dir.join("notify.sock");
    let notify = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    let events = dir.join("events.jsonl");
    let mut env = with_http_any_port(fast_env(&emu), "127.0.0.1");
    env.push(("NOTIFY_SOCKET".into(), sock_path.display().to_string()));
    env.push(("GUESTD_EVENTS__PATH".into(), events.display().to_string()));
    env.push(("GUESTD_CONTROL__STDIN".into(), "false".into()));
    let mut d = Daemon::spawn(env, &[]);
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(wait(), notify.recv(&mut buf))
        .await
        .expect("READY=1 within the deadline")
        .unwrap();
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), "READY=1");
    // Ready means serving: the address is logged and the API answers now, without a retry.
    let log = d.stderr();
    let addr = logged_http_addr(&log)
        .unwrap_or_else(|| panic!("READY=1 before the HTTP API listened:\n{log}"));
    let http = reqwest::Client::new();
    let v = start_over_http(&http, &format!("http://{addr}"), "Ann").await;
    let conv = v["conversation_id"].as_str().unwrap().to_string();
    emu.flow_disconnect(&conv).unwrap();
    // guestd's own view says when the end is decided (there is no stdout to read it from).
    let deadline = tokio::time::Instant::now() + wait();
    loop {
        let got: Value = http
            .get(format!("http://{addr}/v1/sessions/{conv}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or(Value::Null);
        if got["ended"].is_string() || got["code"] == "not_found" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no end seen: {got}");
        tokio::task::yield_now().await;
    }
    signal(d.pid(), "TERM");
    let n = tokio::time::timeout(wait(), notify.recv(&mut buf))
        .await
        .expect("STOPPING=1 within the deadline")
        .unwrap();
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), "STOPPING=1");
    let st = tokio::time::timeout(wait(), d.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(st.success(), "{st:?}\n{}", d.stderr());
    assert_eq!(d.next().await, None, "stdout carries no event");
    let mode = std::fs::metadata(&events).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the events file is the owner's alone");
    let lines: Vec<Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ends: Vec<&Value> = lines
        .iter()
        .filter(|v| v["type"] == "ended" && v["conversation_id"] == conv.as_str())
        .collect();
    assert_eq!(ends.len(), 1, "{lines:#?}");
    assert_eq!(ends[0]["reason"], "flow_ended");
    assert_no_second_ended(&lines);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 27: a burst's freed memory goes back to the system once the burst is over. With
/// `memory.trim_after = 20`, twenty chats started at once are followed by a trim (glibc only),
/// counted, timed and reported with what it returned; the chats go on as before and each ends
/// once when its guest leaves. The trim is seen only in guestd's metrics and log (no event can
/// say so), so the metrics are polled.
#[tokio::test]
async fn a_burst_s_freed_memory_goes_back_to_the_system_once_it_is_over() {
    let emu = emulator(quick()).await;
    let mut env = with_http_any_port(fast_env(&emu), "127.0.0.1");
    env.push(("GUESTD_MEMORY__TRIM_AFTER".into(), "20".into()));
    env.push(("GUESTD_MEMORY__TRIM_QUIET".into(), "100ms".into()));
    let mut d = Daemon::spawn(env, &[]);
    let base = d.http_base().await;
    let http = reqwest::Client::new();
    let before = metrics_text(&http, &base).await;
    assert_eq!(metric(&before, "guestd_heap_trims_total"), 0.0, "{before}");
    for i in 0..20 {
        d.send(json!({"cmd": "start", "request_id": format!("r{i}"), "queue": "Support", "display_name": "Guest"}))
            .await;
    }
    let mut sessions = Vec::new();
    for i in 0..20 {
        let rid = format!("r{i}");
        let r = d.wait(|v| v["request_id"] == rid.as_str()).await;
        assert_eq!(r["type"], "command_result", "{r}");
        sessions.push(r["result"]["session"].as_str().unwrap().to_string());
    }
    for s in &sessions {
        d.wait_type(s, "connected").await;
    }
    let glibc = cfg!(all(target_os = "linux", target_env = "gnu"));
    let deadline = tokio::time::Instant::now() + wait();
    let m = loop {
        let m = metrics_text(&http, &base).await;
        // The count is raised last, after the trim's time and its log line.
        if !glibc || metric(&m, "guestd_heap_trims_total") >= 1.0 {
            break m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no trim after the burst:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if glibc {
        let trims = metric(&m, "guestd_heap_trims_total");
        assert!(
            metric(&m, "guestd_heap_trim_seconds_count") >= trims,
            "each trim is timed:\n{m}"
        );
        assert!(
            d.stderr()
                .contains("returned a burst's freed memory to the system"),
            "the trim is logged"
        );
    }
    for (i, s) in sessions.iter().enumerate() {
        let rid = format!("l{i}");
        d.send(json!({"cmd": "leave", "session": s, "request_id": rid}))
            .await;
    }
    for s in &sessions {
        let e = d.wait_type(s, "ended").await;
        assert_eq!(e["reason"], "guest_left", "{e}");
    }
    finish_ok(d).await;
}
