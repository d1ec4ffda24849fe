//! Issue 28's attacks, played against real processes: a nats-server over TLS with users and the
//! permissions of `config/nats-permissions.conf`, two `guestd run` nodes (NATS user `guestd`), the
//! emulator, and two attackers who hold no cluster secret and no API token:
//! - `insider`: a NATS user of the same account with every right (a leaked credential, an
//!   over-privileged service): whatever guestd does against it rests on the cluster secret;
//! - `other`: a user of the same account with the documented deny rules (`NOT_GUESTD`).
//!
//! Each test asserts the attack fails, that the chat goes on, and that no jwt reaches any
//! output. The tests run one at a time (two cores) with lease 4 s, renewal 1 s.

mod common;

use async_nats::jetstream;
use common::nats::NatsServer;
use common::node::{LONG, Node, TOKEN};
use common::*;
use futures::{FutureExt, StreamExt};
use guestd::emulator::{Emulator, EmulatorConfig};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::Instant;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const LEASE: Duration = Duration::from_secs(4);

fn emu_cfg() -> EmulatorConfig {
    common::node::cluster_emu_cfg()
}

/// Everything of one attack: the server, the emulator, nodes n1 and n2, both attackers, and
/// a feed of every event published (read as `insider`).
struct Rig {
    nats: NatsServer,
    emu: Emulator,
    nodes: Vec<Node>,
    insider: async_nats::Client,
    other: async_nats::Client,
    /// What the server told `other` (permission violations).
    refusals: tokio::sync::mpsc::UnboundedReceiver<String>,
    feed: async_nats::Subscriber,
    seen: Vec<Value>,
}

async fn client(
    port: u16,
    ca: &std::path::Path,
    user: &str,
    extra: impl FnOnce(async_nats::ConnectOptions) -> async_nats::ConnectOptions,
) -> async_nats::Client {
    extra(
        async_nats::ConnectOptions::with_user_and_password(user.into(), format!("{user}-pw"))
            .add_root_certificates(ca.to_path_buf())
            .require_tls(true),
    )
    .connect(format!("tls://127.0.0.1:{port}"))
    .await
    .unwrap()
}

impl Rig {
    async fn up() -> Rig {
        let dir = temp_dir("attacks");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (ca, keyfile) = (dir.join("ca.pem"), dir.join("key.pem"));
        std::fs::write(&ca, cert.pem()).unwrap();
        std::fs::write(&keyfile, key.serialize_pem()).unwrap();
        let perms = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/nats-permissions.conf"
        ))
        .unwrap();
        let conf = format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n\
             include ./nats-permissions.conf\n\
             accounts {{\n  CHATS {{\n    jetstream: enabled\n    users: [\n\
             {{ user: guestd, password: guestd-pw, permissions: $GUESTD_PERMISSIONS }}\n\
             {{ user: other, password: other-pw, permissions: $NOT_GUESTD }}\n\
             {{ user: insider, password: insider-pw }}\n    ]\n  }}\n}}\n",
            ca.display(),
            keyfile.display()
        );
        let nats = NatsServer::start(&conf, &[("nats-permissions.conf", &perms)]).await;
        let password = dir.join("nats-password");
        std::fs::write(&password, "guestd-pw\n").unwrap();
        std::fs::set_permissions(
            &password,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let emu = emulator(emu_cfg()).await;
        let server = format!("tls://127.0.0.1:{}", nats.port);
        let env = [
            ("GUESTD_CLUSTER__USER", "guestd".to_string()),
            (
                "GUESTD_CLUSTER__PASSWORD_FILE",
                password.display().to_string(),
            ),
            ("GUESTD_CLUSTER__TLS_CA_FILE", ca.display().to_string()),
            ("GUESTD_CLUSTER__TLS_REQUIRED", "true".into()),
            ("GUESTD_CLUSTER__REPLICAS", "1".into()),
            ("GUESTD_CLUSTER__LEASE", "4s".into()),
            ("GUESTD_CLUSTER__RENEW", "1s".into()),
            ("GUESTD_CLUSTER__FENCE_MARGIN", "1s".into()),
            ("GUESTD_CLUSTER__NATS_COMMANDS", "false".into()),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let nodes = ["n1", "n2"]
            .iter()
            .map(|id| Node::spawn(id, &emu, std::slice::from_ref(&server), &env))
            .collect();
        let insider = client(nats.port, &ca, "insider", |o| o).await;
        let (tx, refusals) = tokio::sync::mpsc::unbounded_channel();
        let other = client(nats.port, &ca, "other", |o| {
            o.event_callback(move |e| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(e.to_string());
                }
            })
        })
        .await;
        let feed = insider.subscribe("GUESTD.events.>").await.unwrap();
        let rig = Rig {
            nats,
            emu,
            nodes,
            insider,
            other,
            refusals,
            feed,
            seen: Vec::new(),
        };
        rig.wait_joined().await;
        rig
    }

    fn js(&self) -> jetstream::Context {
        jetstream::new(self.insider.clone())
    }

    async fn kv(&self, bucket: &str) -> jetstream::kv::Store {
        self.js().get_key_value(bucket).await.unwrap()
    }

    /// Until both nodes have announced themselves (a watch: each put is an event).
    async fn wait_joined(&self) {
        let deadline = Instant::now() + LONG;
        let kv = loop {
            match self.js().get_key_value("GUESTD_nodes").await {
                Ok(kv) => break kv,
                Err(_) => {
                    assert!(Instant::now() < deadline, "no nodes bucket");
                    // The first node creates it; nothing to watch before that.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let mut w = kv.watch_with_history(">").await.unwrap();
        let mut seen = std::collections::HashSet::new();
        while seen.len() < 2 {
            let e = tokio::time::timeout_at(deadline, w.next())
                .await
                .expect("nodes did not join")
                .unwrap()
                .unwrap();
            // A node's announcement, not one of its slots (`slot.<id>`).
            if !e.key.starts_with("slot.") {
                seen.insert(e.key);
            }
        }
        // And each serves its forward subject: a node announces itself a moment before it
        // subscribes, and a forward nobody hears sends the chat elsewhere for a while. A
        // probe that is no forward gets a refusal once someone listens.
        for id in seen {
            loop {
                let probe = self
                    .insider
                    .request(format!("GUESTD.cmd.{id}"), "probe".into())
                    .await;
                match probe {
                    Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                        assert!(Instant::now() < deadline, "{id} never served its subject");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    _ => break,
                }
            }
        }
    }

    /// The HTTP API of node `i`, with the API token.
    async fn http(
        &self,
        i: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut req = reqwest::Client::new()
            .request(
                method,
                format!("http://127.0.0.1:{}{path}", self.nodes[i].http().await),
            )
            .bearer_auth(TOKEN)
            .timeout(LONG);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.unwrap()
    }

    /// Start a chat through node `i`; (session, conversation).
    async fn chat(&self, i: usize) -> (String, String) {
        let r = self
            .http(
                i,
                reqwest::Method::POST,
                "/v1/sessions",
                Some(json!({"queue": "Support", "display_name": "Guest"})),
            )
            .await;
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 201, "{v}");
        (
            v["session"].as_str().unwrap().into(),
            v["conversation_id"].as_str().unwrap().into(),
        )
    }

    /// Read the event feed until `done` holds of what was seen.
    async fn until(&mut self, what: &str, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + LONG;
        while !done(&self.seen) {
            let m = tokio::time::timeout_at(deadline, self.feed.next())
                .await
                .unwrap_or_else(|_| panic!("no {what} within {LONG:?}: {:?}", self.seen))
                .unwrap();
            self.seen.push(serde_json::from_slice(&m.payload).unwrap());
        }
    }

    async fn connected(&mut self, session: &str) {
        self.until("connected", |seen| {
            seen.iter()
                .any(|v| v["type"] == "connected" && v["session"] == session)
        })
        .await;
    }

    /// The entry of `session` as the bucket shows it (the clear fields; the rest is sealed).
    async fn entry(&self, session: &str) -> (Value, u64) {
        let e = self
            .kv("GUESTD_sessions")
            .await
            .entry(key(session))
            .await
            .unwrap()
            .unwrap();
        (
            serde_json::from_slice(&e.value).unwrap_or(Value::Null),
            e.revision,
        )
    }

    /// Stop both nodes; every line each wrote to stdout, and all of their stderr.
    async fn stop(&mut self) -> (Vec<Value>, String) {
        let mut lines = Vec::new();
        let mut logs = String::new();
        for n in &mut self.nodes {
            if n.alive {
                n.stop().await;
            }
            let out = std::fs::read_to_string(n.dir.join("stdout.jsonl")).unwrap_or_default();
            lines.extend(
                out.lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap()),
            );
            logs.push_str(&n.stderr());
        }
        (lines, logs)
    }

    /// No jwt of any chat in `text`.
    fn assert_no_jwt(&self, text: &str) {
        for conv in self.emu.conversation_ids() {
            if let Some(jwt) = self.emu.jwt(&conv) {
                assert!(!text.contains(&jwt), "a jwt leaked");
            }
        }
    }
}

/// Where `session`'s entry rests in the sessions bucket (its slot's prefix, docs/design.md).
fn key(session: &str) -> String {
    guestd::cluster::slots::bucket_key(session).into_owned()
}

/// Exactly one `ended` for `session` across every node's output, with `reason`.
fn one_ended(lines: &[Value], session: &str, reason: &str) {
    let ends: Vec<&Value> = lines
        .iter()
        .filter(|v| v["type"] == "ended" && v["session"] == session)
        .collect();
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert_eq!(ends[0]["reason"], reason);
}

/// Wait for the sessions bucket to show `session` owned by `owner` again, after `after`.
async fn restored(rig: &Rig, session: &str, owner: &str, after: u64) -> u64 {
    restored_from(rig, session, owner, after, &[]).await
}

/// [`restored`], with a value other than `not` (an older value of the same owner replayed).
async fn restored_from(rig: &Rig, session: &str, owner: &str, after: u64, not: &[u8]) -> u64 {
    let kv = rig.kv("GUESTD_sessions").await;
    let mut w = kv.watch(key(session)).await.unwrap();
    let deadline = Instant::now() + LONG;
    // The watch starts with the newest value, then every change.
    loop {
        let e = tokio::time::timeout_at(deadline, w.next())
            .await
            .expect("the owner did not write its entry again")
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_slice(&e.value).unwrap_or(Value::Null);
        if e.revision > after
            && e.operation == jetstream::kv::Operation::Put
            && e.value.as_ref() != not
            && v["owner"] == owner
            && v["sealed"].as_str().is_some_and(|s| s.starts_with("g2."))
        {
            return e.revision;
        }
    }
}

/// The attacker's write of `value` over `session`'s entry, compare-and-set on the revision it
/// last read, read again while the owner writes in between (the owner writes its entry whenever
/// a message is marked written or the no-activity evidence changes, at moments no test
/// controls); the revision written.
async fn forge(kv: &jetstream::kv::Store, session: &str, value: &Value) -> u64 {
    for _ in 0..20 {
        let rev = kv
            .entry(key(session))
            .await
            .unwrap()
            .map_or(0, |e| e.revision);
        match kv
            .update(key(session), serde_json::to_vec(value).unwrap().into(), rev)
            .await
        {
            Ok(r) => return r,
            Err(e) if e.kind() == jetstream::kv::UpdateErrorKind::WrongLastRevision => continue,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("the owner wrote {session} twenty times in a row")
}

/// Scenarios 1, 2 and 7: a rewritten entry (plain, pointing at the attacker's listener), an
/// entry sealed with a captured forward (the decryption oracle), and a purged entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insider_without_the_secret_can_neither_steal_a_jwt_nor_move_or_drop_a_chat() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::up().await;
    let captured = rig.insider.subscribe("GUESTD.cmd.>").await.unwrap();
    let (s, c) = rig.chat(0).await;
    rig.connected(&s).await;
    let first = rig
        .kv("GUESTD_sessions")
        .await
        .entry(key(&s))
        .await
        .unwrap()
        .unwrap()
        .value;
    rig.emu.agent_join(&c).unwrap();
    rig.until("agent", |seen| {
        seen.iter().any(|v| v["type"] == "agent_connected")
    })
    .await;
    let (wire, _) = rig.entry(&s).await;
    let owner = wire["owner"].as_str().unwrap().to_string();
    let (me, them) = if owner == "n1" { (0, 1) } else { (1, 0) };
    let thief = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let thief_url = format!("ws://{}/steal", thief.local_addr().unwrap());
    let nodes = rig.kv("GUESTD_nodes").await;
    let their_id = rig.nodes[them].id.clone();
    let their_epoch: Value =
        serde_json::from_slice(&nodes.entry(&their_id).await.unwrap().unwrap().value).unwrap();
    let kv = rig.kv("GUESTD_sessions").await;

    // 1. The entry rewritten in the old, plain form: the other node as owner, the attacker's
    // listener as the stream.
    let forged = json!({
        "owner": their_id, "epoch": their_epoch["epoch"],
        "record": {"session": s, "chat": {"conversation_id": c, "member_id": "m", "jwt": "x",
            "event_stream_uri": thief_url}, "started_ms": 0, "mode": "start"},
        "last_message_id": null, "last_alive_ms": 0, "ending": null, "leaving": false,
    });
    let r1 = forge(&kv, &s, &forged).await;
    restored(&rig, &s, &owner, r1).await;

    // 2. The entry sealed with a forward captured on the wire: a command through the node that
    // does not own the chat is forwarded to the owner.
    let r = rig
        .http(
            them,
            reqwest::Method::GET,
            &format!("/v1/sessions/{s}"),
            None,
        )
        .await;
    assert_eq!(r.status(), 200);
    let mut captured = captured;
    let fwd = tokio::time::timeout(LONG, captured.next())
        .await
        .unwrap()
        .unwrap();
    let fwd = String::from_utf8(fwd.payload.to_vec()).unwrap();
    assert!(
        fwd.starts_with("g2."),
        "a forward crosses NATS sealed: {fwd}"
    );
    assert!(!fwd.contains(&s));
    let oracle = json!({"owner": their_id, "epoch": their_epoch["epoch"], "sealed": fwd});
    let r2 = forge(&kv, &s, &oracle).await;
    let rev = restored(&rig, &s, &owner, r2).await;

    // 7. The entry purged.
    // Compare-and-set on the revision last read, read again while the owner writes meanwhile.
    let mut purged = None;
    for _ in 0..20 {
        let at = kv.entry(key(&s)).await.unwrap().map_or(rev, |e| e.revision);
        if kv.purge_expect_revision(key(&s), Some(at)).await.is_ok() {
            purged = Some(at);
            break;
        }
    }
    let purged = purged.expect("the owner wrote its entry twenty times in a row");
    let rev = restored(&rig, &s, &owner, purged).await;

    // The owner's own first value, genuinely sealed, stored again (it rolls back what the
    // entry says about the chat): older by its generation, written over.
    let r3 = kv.put(key(&s), first.clone()).await.unwrap();
    assert!(r3 > rev);
    restored_from(&rig, &s, &owner, r3, &first).await;

    // The chat is where it was and goes on: a message through the other node reaches it.
    let r = rig
        .http(
            them,
            reqwest::Method::POST,
            &format!("/v1/sessions/{s}/messages"),
            Some(json!({"body": "still here"})),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    rig.emu.agent_end(&c).unwrap();
    rig.until("ended", |seen| seen.iter().any(|v| v["type"] == "ended"))
        .await;
    assert!(
        thief.accept().now_or_never().is_none(),
        "a node connected to the URL of a forged entry"
    );
    let (lines, logs) = rig.stop().await;
    one_ended(&lines, &s, "agent_ended");
    let by_owner = std::fs::read_to_string(rig.nodes[me].dir.join("stdout.jsonl")).unwrap();
    assert!(
        by_owner.contains("\"ended\""),
        "the owner kept the chat to its end"
    );
    for kind in ["kind=\"forged\"", "kind=\"vanished\"", "kind=\"replayed\""] {
        assert!(logs.contains(kind), "no alert for {kind}");
    }
    assert!(logs.contains("ALERT"), "{logs}");
    rig.assert_no_jwt(&logs);
    rig.assert_no_jwt(&serde_json::to_string(&lines).unwrap());
}

/// Scenarios 3 and 5: the public command subject, replayed and forged forwards, sniffed replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_over_nats_need_the_secret_and_a_captured_forward_runs_once() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::up().await;
    // Off by default: nobody serves plain command lines.
    let plain = rig
        .insider
        .request("GUESTD.cmd", json!({"cmd": "list"}).to_string().into())
        .await;
    assert!(
        matches!(&plain, Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders),
        "{plain:?}"
    );
    let mut forwards = rig.insider.subscribe("GUESTD.cmd.n2").await.unwrap();
    let mut replies = rig.insider.subscribe("_INBOX_GUESTD.>").await.unwrap();
    // Both subscriptions in place at the server before anything is forwarded.
    rig.insider.flush().await.unwrap();
    // Through n1: the first start stays on n1 (least loaded, first by name), the second goes
    // to n2 as a forward.
    let (s1, _) = rig.chat(0).await;
    let (s2, _) = rig.chat(0).await;
    let fwd = match tokio::time::timeout(LONG, forwards.next()).await {
        Ok(m) => m.unwrap(),
        Err(_) => panic!(
            "no forward to n2 seen: s1 on {}, s2 on {}",
            rig.entry(&s1).await.0["owner"],
            rig.entry(&s2).await.0["owner"]
        ),
    };
    let chats = rig.emu.conversation_ids().len();
    assert_eq!(chats, 2);
    // Every reply that crossed the inbox was sealed: no session id, no jwt.
    while let Some(Some(m)) = replies.next().now_or_never() {
        let text = String::from_utf8_lossy(&m.payload).to_string();
        if text.contains(&s2) || text.contains(&s1) {
            panic!("a reply in the clear: {text}");
        }
        rig.assert_no_jwt(&text);
    }
    // The captured `start` replayed to n2: the first run's reply (sealed), no second chat.
    let again = rig
        .insider
        .request("GUESTD.cmd.n2", fwd.payload.clone())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&again.payload).to_string();
    assert!(text.starts_with("g2.") && !text.contains(&s2), "{text}");
    // Replayed to n1: refused, it was sealed for n2.
    let other = rig
        .insider
        .request("GUESTD.cmd.n1", fwd.payload.clone())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&other.payload).to_string();
    assert!(text.contains("does not authenticate"), "{text}");
    // A forward the attacker wrote: refused.
    let forged = json!({"id": "x", "at_ms": 0, "cmd": {"cmd": "start", "queue": "Support", "display_name": "x"}});
    let r = rig
        .insider
        .request("GUESTD.cmd.n1", forged.to_string().into())
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&r.payload).contains("does not authenticate"));
    assert_eq!(
        rig.emu.conversation_ids().len(),
        chats,
        "a replayed or forged forward made a chat"
    );

    // A forged reply, answered first by a fake responder on n2's subject (n2 paused, so the
    // fake is first for sure), is passed over: the caller waits for n2's own, sealed reply.
    let mut fake = rig.insider.subscribe("GUESTD.cmd.n2").await.unwrap();
    // The server must have the subscription before n1 forwards (subscribe does not wait for
    // it): without this flush the forward can pass the fake by, and nothing ever answers.
    rig.insider.flush().await.unwrap();
    let insider = rig.insider.clone();
    let (forged_tx, forged_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Some(m) = fake.next().await {
            let forged = json!({"ok": {"session": "s-forged", "conversation_id": "c-forged"}});
            let _ = insider
                .publish(m.reply.unwrap(), forged.to_string().into())
                .await;
            let _ = insider.flush().await;
            let _ = forged_tx.send(());
        }
    });
    signal(rig.nodes[1].pid(), "STOP");
    let url = format!(
        "http://127.0.0.1:{}/v1/sessions/{s2}",
        rig.nodes[0].http().await
    );
    let asked = tokio::spawn(async move {
        let r = reqwest::Client::new()
            .get(url)
            .bearer_auth(TOKEN)
            .timeout(LONG)
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    });
    tokio::time::timeout(LONG, forged_rx)
        .await
        .unwrap()
        .unwrap();
    signal(rig.nodes[1].pid(), "CONT");
    let (status, body) = asked.await.unwrap();
    assert!(
        !body.contains("s-forged"),
        "a forged reply was believed: {body}"
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&s2), "n2's own reply: {body}");
    for (s, _) in [(s1.clone(), ()), (s2.clone(), ())] {
        let r = rig
            .http(
                0,
                reqwest::Method::DELETE,
                &format!("/v1/sessions/{s}"),
                None,
            )
            .await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    rig.until("both ended", |seen| {
        seen.iter().filter(|v| v["type"] == "ended").count() >= 2
    })
    .await;
    let (lines, logs) = rig.stop().await;
    one_ended(&lines, &s1, "guest_left");
    one_ended(&lines, &s2, "guest_left");
    rig.assert_no_jwt(&logs);
}

/// Scenario 4: forged nodes, a forged leave, a deleted announcement and a replayed renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_announcements_move_no_chat() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::up().await;
    let (s1, _) = rig.chat(0).await;
    let (s2, _) = rig.chat(0).await;
    rig.until("both connected", |seen| {
        seen.iter().filter(|v| v["type"] == "connected").count() >= 2
    })
    .await;
    let (w2, _) = rig.entry(&s2).await;
    assert_eq!(w2["owner"], "n2");
    let nodes = rig.kv("GUESTD_nodes").await;
    let real: Value =
        serde_json::from_slice(&nodes.entry("n2").await.unwrap().unwrap().value).unwrap();
    let now_ms = chrono::Utc::now().timestamp_millis();
    // A node that does not exist, in the old plain form and with a made-up seal.
    nodes
        .put(
            "n9",
            json!({"epoch": now_ms, "left": false}).to_string().into(),
        )
        .await
        .unwrap();
    nodes
        .put(
            "n8",
            json!({"epoch": now_ms, "seq": 1, "left": false, "sealed": "g2.00000000.AAAA"})
                .to_string()
                .into(),
        )
        .await
        .unwrap();
    // n2 "left", in a newer epoch; then its announcement deleted.
    let forged_leave = json!({"epoch": real["epoch"].as_u64().unwrap() + 1, "seq": 1, "left": true, "sealed": "g2.x.AAAA"});
    nodes
        .put("n2", forged_leave.to_string().into())
        .await
        .unwrap();
    nodes.delete("n2").await.unwrap();
    // Two leases of n2's renewals, each an event on the bucket.
    let mut w = nodes.watch("n2").await.unwrap();
    let until = Instant::now() + LEASE * 2;
    while Instant::now() < until {
        tokio::time::timeout(LONG, w.next())
            .await
            .expect("n2 stopped renewing")
            .unwrap()
            .unwrap();
    }
    let (w2, _) = rig.entry(&s2).await;
    assert_eq!(w2["owner"], "n2", "a forged leave moved n2's chat");
    // New chats go to live nodes only: through n1, alternating n1 and n2.
    let mut more = Vec::new();
    for _ in 0..4 {
        let (s, _) = rig.chat(0).await;
        let (e, _) = rig.entry(&s).await;
        assert!(
            e["owner"] == "n1" || e["owner"] == "n2",
            "placed on {}",
            e["owner"]
        );
        more.push(s);
    }

    // n2 dies; the insider replays its last real announcement again and again. Its chat is
    // taken all the same, within a lease and a bit.
    let last = nodes.entry("n2").await.unwrap().unwrap().value;
    let n2_era = rig
        .kv("GUESTD_sessions")
        .await
        .entry(key(&s2))
        .await
        .unwrap()
        .unwrap()
        .value;
    rig.nodes[1].kill9().await;
    let replayer = {
        let nodes = nodes.clone();
        tokio::spawn(async move {
            loop {
                let _ = nodes.put("n2", last.clone()).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let kv = rig.kv("GUESTD_sessions").await;
    let mut w = kv.watch(key(&s2)).await.unwrap();
    loop {
        let e = tokio::time::timeout(LONG, w.next())
            .await
            .expect("n2's chat was never taken")
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_slice(&e.value).unwrap_or(Value::Null);
        if v["owner"] == "n1" {
            break;
        }
    }
    replayer.abort();
    // The value that named n2, genuinely sealed, stored again once n1 holds the chat: it moves
    // nothing, and n1 writes its own over it.
    let r = kv.put(key(&s2), n2_era).await.unwrap();
    restored(&rig, &s2, "n1", r).await;
    let (lines, logs) = rig.stop().await;
    assert!(logs.contains("announcement in the nodes bucket that does not authenticate"));
    let resumes = lines
        .iter()
        .filter(|v| v["type"] == "session_started" && v["session"] == *s2 && v["mode"] == "resume")
        .count();
    assert_eq!(
        resumes, 1,
        "n2's chat was resumed once, by n1, not again after the replay"
    );
    for s in [&s1, &s2].into_iter().chain(more.iter()) {
        assert!(
            lines
                .iter()
                .all(|v| !(v["type"] == "ended" && v["session"] == *s)),
            "{s} ended: {lines:?}"
        );
    }
    rig.assert_no_jwt(&logs);
}

/// Scenario 6: an `ended` published first under the guessable id does not suppress the real one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_ended_does_not_make_the_stream_drop_the_real_one() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::up().await;
    let (s, c) = rig.chat(0).await;
    rig.connected(&s).await;
    rig.emu.agent_join(&c).unwrap();
    rig.until("agent", |seen| {
        seen.iter().any(|v| v["type"] == "agent_connected")
    })
    .await;
    let js = rig.js();
    let forged = json!({"v": 1, "type": "ended", "session": s, "conversation_id": c,
        "reason": "flow_ended", "event_id": format!("{s}:ended")});
    js.send_publish(
        format!("GUESTD.events.{c}"),
        jetstream::context::Publish::build()
            .payload(forged.to_string().into())
            .message_id(format!("{s}:ended")),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    rig.emu.agent_end(&c).unwrap();
    rig.until("the real end", |seen| {
        seen.iter()
            .any(|v| v["type"] == "ended" && v["reason"] == "agent_ended")
    })
    .await;
    let (lines, _) = rig.stop().await;
    one_ended(&lines, &s, "agent_ended");
    // In the stream itself, not only on the wire.
    let mut stream = js.get_stream("GUESTD_EVENTS").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut reasons = Vec::new();
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await.unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        if v["type"] == "ended" {
            reasons.push(v["reason"].as_str().unwrap().to_string());
        }
    }
    assert!(reasons.contains(&"agent_ended".to_string()), "{reasons:?}");
}

/// Least privilege: a user with `NOT_GUESTD` can neither send commands, nor touch the buckets,
/// nor read events; guestd itself runs under `GUESTD_PERMISSIONS` (every test here does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_the_documented_deny_rules_reaches_nothing_of_guestd() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::up().await;
    let mut sniff = rig.other.subscribe("GUESTD.events.>").await.unwrap();
    let mut inbox = rig.other.subscribe("_INBOX_GUESTD.>").await.unwrap();
    let (s, _) = rig.chat(0).await;
    rig.connected(&s).await;
    // Commands: the publish is refused by the server, nothing answers.
    let cmd = tokio::time::timeout(
        Duration::from_secs(2),
        rig.other.request("GUESTD.cmd.n1", "x".into()),
    )
    .await;
    assert!(!matches!(cmd, Ok(Ok(_))), "{cmd:?}");
    // The buckets and the stream: every JetStream call about them refused (no answer).
    let mut js = jetstream::new(rig.other.clone());
    js.set_timeout(Duration::from_secs(2));
    assert!(js.get_key_value("GUESTD_sessions").await.is_err());
    assert!(js.get_key_value("GUESTD_nodes").await.is_err());
    assert!(js.get_stream("GUESTD_EVENTS").await.is_err());
    // The ended-chats stream (issue 24) too: its records are sealed, and it stays out of reach.
    assert!(js.get_stream("GUESTD_ENDED").await.is_err());
    // A stream of its own that would copy the events, or capture the command subjects: refused
    // (NATS checks neither against the creator's permissions, so creating streams is denied).
    let mirror = js
        .create_stream(jetstream::stream::Config {
            name: "COPY".into(),
            mirror: Some(jetstream::stream::Source {
                name: "GUESTD_EVENTS".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    assert!(mirror.is_err(), "a mirror of guestd's events was created");
    let capture = js
        .create_stream(jetstream::stream::Config {
            name: "CAPTURE".into(),
            subjects: vec!["GUESTD.cmd.>".into(), "GUESTD.cmd".into()],
            ..Default::default()
        })
        .await;
    assert!(
        capture.is_err(),
        "a stream capturing guestd's commands was created"
    );
    let put = js
        .publish(format!("$KV.GUESTD_sessions.{s}"), "x".into())
        .await;
    if let Ok(ack) = put {
        assert!(
            ack.await.is_err(),
            "a write to the sessions bucket was acknowledged"
        );
    }
    // Guest chat events flowed meanwhile (the insider saw `connected`); `other` saw none.
    rig.http(
        0,
        reqwest::Method::DELETE,
        &format!("/v1/sessions/{s}"),
        None,
    )
    .await;
    rig.until("ended", |seen| seen.iter().any(|v| v["type"] == "ended"))
        .await;
    // A round trip after the last event: anything routed to `other` has arrived by now.
    rig.other.flush().await.unwrap();
    assert!(
        sniff.next().now_or_never().is_none(),
        "events reached a denied user"
    );
    assert!(
        inbox.next().now_or_never().is_none(),
        "guestd's replies reached a denied user"
    );
    let (lines, logs) = rig.stop().await;
    one_ended(&lines, &s, "guest_left");
    // The server said why, for the subscriptions and the publishes alike.
    let mut said = Vec::new();
    while let Ok(e) = rig.refusals.try_recv() {
        said.push(e);
    }
    let said = said.join("\n");
    for what in ["\"GUESTD.events.>\"", "\"GUESTD.cmd.n1\""] {
        assert!(said.contains(what), "no refusal of {what}: {said}");
    }
    let log = rig.nats.log();
    for what in [
        "Subscription Violation - User \"other\", Subject \"GUESTD.events.>\"",
        "Publish Violation - User \"other\", Subject \"GUESTD.cmd.n1\"",
        "Publish Violation - User \"other\", Subject \"$JS.API.STREAM.INFO.KV_GUESTD_sessions\"",
        "Publish Violation - User \"other\", Subject \"$JS.API.STREAM.CREATE.COPY\"",
        "Publish Violation - User \"other\", Subject \"$JS.API.STREAM.CREATE.CAPTURE\"",
    ] {
        assert!(log.contains(what), "the server did not refuse: {what}");
    }
    // Over TLS and with credentials, the nodes do not warn about either.
    assert!(
        !logs.contains("in plaintext") && !logs.contains("without NATS credentials"),
        "{logs}"
    );
}
