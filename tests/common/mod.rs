//! Shared helpers: a guest test client for the emulator (real REST and websocket on loopback),
//! and a driver for the real `guestd` binary over stdin/stdout.
#![allow(dead_code)]

use futures::StreamExt;
use guestd::emulator::{Emulator, EmulatorConfig};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod nats;
pub mod node;

/// How much slower than an idle machine these tests may run: `GUESTD_TEST_TIME_SCALE`
/// (default 2: CI's 2 cores, shared with a build). Every deadline a test waits under is
/// scaled by it, through [`wait`] and [`scaled`]; the durations guestd and the emulator are
/// configured with are not (they are what the tests exercise).
pub fn time_scale() -> f64 {
    std::env::var("GUESTD_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(2.0)
}

/// `d` scaled by [`time_scale`].
pub fn scaled(d: Duration) -> Duration {
    d.mul_f64(time_scale())
}

/// The longest wait for one expected thing (an event, a frame, an exit): 15 s, scaled.
pub fn wait() -> Duration {
    scaled(Duration::from_secs(15))
}

/// The no-activity timeout of [`fast_env`] (and of the daemon tests' emulator): 2 s, scaled.
/// A test with an agent must end its chat before it, so on a loaded machine it is longer.
pub fn idle_timeout() -> Duration {
    scaled(Duration::from_secs(2))
}

/// A loopback port nobody listens on right now. Racy (another process may take it before the
/// one it is meant for binds it), so only where a script must be told a fixed port: README's
/// walkthrough (its text names the ports; tests/docs.rs substitutes them). guestd binds port 0
/// everywhere else and the test reads the address back ([`with_http_any_port`],
/// [`Daemon::http_base`], a cluster node's `http()`); the emulator in-process binds port 0 too.
/// (nats-server, a third-party process told its ports, has its own copy in nats.rs.)
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn emulator(cfg: EmulatorConfig) -> Emulator {
    Emulator::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// A fresh directory under the system's temp dir, named `guestd-<tag>-<uuid>`.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("guestd-{tag}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Durations for guestd run as a service: 200 ms heartbeats, a 5 s grace window, a 1 min
/// no-activity rule; agents only on command.
pub fn service_emu_cfg() -> EmulatorConfig {
    EmulatorConfig {
        heartbeat_interval: Duration::from_millis(200),
        reconnect_grace: Duration::from_secs(5),
        inactivity_timeout: Duration::from_secs(60),
        agent_join_delay: None,
        agent_alert_duration: Duration::from_millis(20),
        ..EmulatorConfig::default()
    }
}

/// Short durations for rule tests; agents only on command.
pub fn quick() -> EmulatorConfig {
    EmulatorConfig {
        heartbeat_interval: Duration::from_millis(200),
        reconnect_grace: Duration::from_millis(600),
        inactivity_timeout: Duration::from_millis(800),
        agent_join_delay: None,
        agent_alert_duration: Duration::from_millis(50),
        socket_closing_delay: Duration::from_millis(300),
        ..EmulatorConfig::default()
    }
}

pub struct Guest {
    pub http: reqwest::Client,
    pub base: String,
    pub id: String,
    pub jwt: String,
    pub member: String,
    pub uri: String,
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

impl Guest {
    pub async fn create(emu: &Emulator) -> Guest {
        Self::create_with(emu, reqwest::Client::new()).await
    }

    /// Against an emulator serving HTTPS with the certificate in `ca` (PEM).
    pub async fn create_tls(emu: &Emulator, ca: &std::path::Path) -> Guest {
        let pem = std::fs::read(ca).unwrap();
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .build()
            .unwrap();
        Self::create_with(emu, http).await
    }

    async fn create_with(emu: &Emulator, http: reqwest::Client) -> Guest {
        let base = emu.base_url();
        let r = http
            .post(format!("{base}/api/v2/webchat/guest/conversations"))
            .json(&json!({
                "organizationId": "org", "deploymentId": "dep",
                "routingTarget": {"targetType": "QUEUE", "targetAddress": "Support"},
                "memberInfo": {"displayName": "Ann", "customFields": {"k": "v"}}
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        Guest {
            http,
            base,
            id: v["id"].as_str().unwrap().into(),
            jwt: v["jwt"].as_str().unwrap().into(),
            member: v["member"]["id"].as_str().unwrap().into(),
            uri: v["eventStreamUri"].as_str().unwrap().into(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "{}/api/v2/webchat/guest/conversations/{}{}",
            self.base, self.id, path
        )
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.jwt)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.jwt)
            .json(&body)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn say(&self, text: &str) -> (u16, Value) {
        self.post(
            &format!("/members/{}/messages", self.member),
            json!({"body": text, "bodyType": "standard"}),
        )
        .await
    }

    pub async fn leave(&self) -> u16 {
        let r = self
            .http
            .delete(self.url(&format!("/members/{}", self.member)))
            .bearer_auth(&self.jwt)
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    }

    pub async fn members(&self) -> Vec<Value> {
        let (s, v) = self.get("/members").await;
        assert_eq!(s, 200, "{v}");
        v["entities"].as_array().unwrap().clone()
    }

    pub async fn connect(&self) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(self.uri.as_str())
            .await
            .unwrap();
        ws
    }
}

/// Next text frame parsed as JSON, skipping heartbeats unless `keep_heartbeats`.
pub async fn next_event(ws: &mut Ws, keep_heartbeats: bool) -> Value {
    loop {
        let m = tokio::time::timeout(wait(), ws.next())
            .await
            .expect("a frame in time");
        match m {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap_or(json!({"raw": t.to_string()}));
                if !keep_heartbeats && v["eventBody"]["message"] == "WebSocket Heartbeat" {
                    continue;
                }
                return v;
            }
            Some(Ok(Message::Close(c))) => return json!({"close": c.map(|c| u16::from(c.code))}),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return json!({"error": e.to_string()}),
            None => return json!({"eof": true}),
        }
    }
}

/// Wait for a frame matching `pred`, skipping others.
pub async fn wait_event(ws: &mut Ws, pred: impl Fn(&Value) -> bool) -> Value {
    loop {
        let v = next_event(ws, true).await;
        if pred(&v) {
            return v;
        }
        assert!(
            v.get("close").is_none() && v.get("error").is_none() && v.get("eof").is_none(),
            "stream ended: {v}"
        );
    }
}

pub fn is_member_change(v: &Value, id: &str, state: &str) -> bool {
    v["metadata"]["type"] == "member-change"
        && v["eventBody"]["member"]["id"] == id
        && v["eventBody"]["member"]["state"] == state
}

/// The first entry of the emulator's log that `pred` accepts, waiting up to `within` for it.
pub async fn log_entry_within(
    emu: &Emulator,
    pred: impl Fn(&guestd::emulator::world::LogEntry) -> bool,
    within: Duration,
) -> guestd::emulator::world::LogEntry {
    let mut rx = emu.subscribe_log();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(e) = emu.log().into_iter().find(|e| pred(e)) {
            return e;
        }
        if tokio::time::timeout_at(deadline, rx.recv()).await.is_err() {
            panic!(
                "no such entry in the emulator log within {within:?}: {:?}",
                emu.log()
            );
        }
    }
}

/// Wait for the emulator's guest-side log to show `action` for `conv`.
pub async fn wait_log(emu: &Emulator, conv: &str, action: &str, count: usize) {
    let mut rx = emu.subscribe_log();
    let n = || {
        emu.log()
            .iter()
            .filter(|e| e.conversation_id.as_deref() == Some(conv) && e.action == action)
            .count()
    };
    let deadline = tokio::time::Instant::now() + wait();
    while n() < count {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(_) => {}
            Err(_) => panic!(
                "no {count}x {action} for {conv} in the emulator log: {:?}",
                emu.log()
            ),
        }
    }
}

/// The real binary, driven over stdin/stdout.
pub struct Daemon {
    pub child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    lines: Option<tokio::io::Lines<BufReader<tokio::process::ChildStdout>>>,
    pub seen: Vec<Value>,
    /// Whether `wait` already returned the event at the same index of `seen`.
    taken: Vec<bool>,
    pub stderr_path: std::path::PathBuf,
}

/// Environment for the binary: fast durations matching `quick()`-like emulators.
pub fn fast_env(emu: &Emulator) -> Vec<(String, String)> {
    vec![
        ("GUESTD_GENESYS__API_BASE", emu.base_url()),
        ("GUESTD_GENESYS__ORGANIZATION_ID", "org".into()),
        ("GUESTD_GENESYS__DEPLOYMENT_ID", "dep".into()),
        ("GUESTD_SESSION__HEARTBEAT_INTERVAL", "200ms".into()),
        ("GUESTD_SESSION__HEARTBEAT_TOLERANCE", "2".into()),
        ("GUESTD_SESSION__RECONNECT_GRACE", "1500ms".into()),
        (
            "GUESTD_SESSION__INACTIVITY_TIMEOUT",
            format!("{}ms", idle_timeout().as_millis()),
        ),
        ("GUESTD_SESSION__INACTIVITY_WARNING_LEAD", "500ms".into()),
        ("GUESTD_SESSION__INACTIVITY_SKEW", "200ms".into()),
        ("GUESTD_SESSION__AGENT_END_WINDOW", "2s".into()),
        ("GUESTD_SESSION__BACKOFF__INITIAL", "100ms".into()),
        ("GUESTD_SESSION__BACKOFF__MAX", "400ms".into()),
        ("GUESTD_REST__BACKOFF__INITIAL", "20ms".into()),
        ("GUESTD_REST__BACKOFF__MAX", "100ms".into()),
        ("GUESTD_CONTROL__HTTP_LISTEN", "".into()),
        ("GUESTD_JOURNAL__ENABLED", "false".into()),
        ("RUST_LOG", "guestd=debug".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// `env` with the HTTP API on `ip`, port 0: guestd binds a port of its own and the test reads
/// the address back with [`Daemon::http_base`].
pub fn with_http_any_port(mut env: Vec<(String, String)>, ip: &str) -> Vec<(String, String)> {
    env.retain(|(k, _)| k != "GUESTD_CONTROL__HTTP_LISTEN");
    env.push(("GUESTD_CONTROL__HTTP_LISTEN".into(), format!("{ip}:0")));
    env
}

/// `env` plus `[platform]` pointed at the emulator's Platform API (its default client).
pub fn with_platform(emu: &Emulator, mut env: Vec<(String, String)>) -> Vec<(String, String)> {
    for (k, v) in [
        ("GUESTD_PLATFORM__API_BASE", emu.base_url()),
        ("GUESTD_PLATFORM__CLIENT_ID", "emulator-client".into()),
        ("GUESTD_PLATFORM__CLIENT_SECRET", "emulator-secret".into()),
    ] {
        env.push((k.into(), v));
    }
    env
}

impl Daemon {
    pub fn spawn(env: Vec<(String, String)>, args: &[&str]) -> Daemon {
        let dir = std::env::temp_dir().join(format!("guestd-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let stderr_path = dir.join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_guestd"));
        cmd.arg("run")
            .args(args)
            .current_dir(&dir)
            .envs(env)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let stdin = child.stdin.take();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Daemon {
            child,
            stdin,
            lines: Some(lines),
            seen: Vec::new(),
            taken: Vec::new(),
            stderr_path,
        }
    }

    pub async fn send(&mut self, cmd: Value) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    }

    pub async fn send_raw(&mut self, line: &str) {
        self.send_bytes(line.as_bytes()).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(bytes).await.unwrap();
        stdin.flush().await.unwrap();
    }

    /// Close guestd's stdout: its reader goes away (writes then fail with EPIPE).
    pub fn close_stdout(&mut self) {
        self.lines = None;
    }

    /// Next event line; None at EOF (or once `close_stdout` was called).
    pub async fn next(&mut self) -> Option<Value> {
        self.next_within(wait()).await
    }

    /// [`Daemon::next`], waiting at most `within` for the line.
    pub async fn next_within(&mut self, within: Duration) -> Option<Value> {
        let lines = self.lines.as_mut()?;
        let line = tokio::time::timeout(within, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no event within {within:?}; seen: {:#?}", self.seen))
            .unwrap()?;
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}"));
        self.seen.push(v.clone());
        self.taken.push(true);
        Some(v)
    }

    /// The first event matching `pred` that no earlier `wait` returned: one already seen (read
    /// while waiting for something else; events race, tests should not care in which order
    /// unrelated ones arrive) or the next one to come.
    pub async fn wait(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_within(pred, wait()).await
    }

    /// [`Daemon::wait`], allowing `within` between two lines (a daemon that is busy by design,
    /// working through a flood's backlog, say).
    pub async fn wait_within(&mut self, pred: impl Fn(&Value) -> bool, within: Duration) -> Value {
        if let Some(i) = (0..self.seen.len()).find(|&i| !self.taken[i] && pred(&self.seen[i])) {
            self.taken[i] = true;
            return self.seen[i].clone();
        }
        loop {
            match self.next_within(within).await {
                Some(v) if pred(&v) => return v,
                Some(_) => {
                    let last = self.taken.len() - 1;
                    self.taken[last] = false;
                }
                None => panic!("stdout closed; seen: {:#?}", self.seen),
            }
        }
    }

    pub async fn wait_type(&mut self, session: &str, kind: &str) -> Value {
        self.wait(|v| v["session"] == session && v["type"] == kind)
            .await
    }

    /// Start a chat; returns (session id, conversation id).
    pub async fn start(&mut self, rid: &str) -> (String, String) {
        self.send(json!({"cmd": "start", "request_id": rid, "queue": "Support", "display_name": "Test guest"})).await;
        let r = self.wait(|v| v["request_id"] == rid).await;
        assert_eq!(r["type"], "command_result", "{r}");
        (
            r["result"]["session"].as_str().unwrap().to_string(),
            r["result"]["conversation_id"].as_str().unwrap().to_string(),
        )
    }

    /// Types of every event of `session` seen so far.
    pub fn types(&self, session: &str) -> Vec<String> {
        self.seen
            .iter()
            .filter(|v| v["session"] == session)
            .map(|v| v["type"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    pub fn count(&self, session: &str, kind: &str) -> usize {
        self.seen
            .iter()
            .filter(|v| v["session"] == session && v["type"] == kind)
            .count()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id().unwrap() as i32
    }

    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// The HTTP API's base URL (`http://127.0.0.1:port`), for a guestd started with
    /// `control.http_listen` on port 0 (see [`with_http_any_port`]): guestd binds it and logs the
    /// address before it reads stdin, so once a command sent now is answered, the log line is
    /// on stderr. No port is picked by the test and released for guestd to take (a race).
    pub async fn http_base(&mut self) -> String {
        format!("http://{}", self.http_addr().await)
    }

    /// The HTTP API's `ip:port` (see [`Daemon::http_base`]).
    pub async fn http_addr(&mut self) -> String {
        let rid = format!("addr-{}", uuid::Uuid::new_v4());
        self.send(json!({"cmd": "list", "request_id": rid})).await;
        self.wait(|v| v["request_id"] == rid.as_str()).await;
        let log = self.stderr();
        logged_http_addr(&log)
            .unwrap_or_else(|| panic!("no \"HTTP API listening addr=...\" in stderr:\n{log}"))
    }

    /// Read every remaining line until EOF.
    pub async fn drain(&mut self) {
        while self.next().await.is_some() {}
    }
}

/// The `ip:port` of guestd's "HTTP API listening addr=..." log line (pretty or JSON logs).
pub fn logged_http_addr(log: &str) -> Option<String> {
    log.lines()
        .filter(|l| l.contains("HTTP API listening"))
        .find_map(|l| {
            l.split("addr=")
                .nth(1)
                .or_else(|| l.split("\"addr\":\"").nth(1))
        })
        .and_then(|a| a.split(|c: char| c.is_whitespace() || c == '"').next())
        .map(String::from)
}

pub fn signal(pid: i32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Check event lines against docs/events.schema.json (required fields, types, enums); the
/// types seen.
pub fn check_schema(schema: &Value, lines: &[Value]) -> std::collections::BTreeSet<String> {
    let d_seen = lines;
    let type_enum: Vec<&str> = schema["properties"]["type"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let mut seen_types = std::collections::BTreeSet::new();
    for line in d_seen {
        for k in schema["required"].as_array().unwrap() {
            assert!(
                line.get(k.as_str().unwrap()).is_some(),
                "{k} missing: {line}"
            );
        }
        let t = line["type"].as_str().unwrap();
        assert!(type_enum.contains(&t), "type {t} is not in the schema");
        seen_types.insert(t.to_string());
        let rule = schema["allOf"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["if"]["properties"]["type"]["const"] == t)
            .unwrap();
        for k in rule["then"]["required"].as_array().unwrap() {
            assert!(
                line.get(k.as_str().unwrap()).is_some(),
                "{t}: {k} missing: {line}"
            );
        }
        for (k, spec) in rule["then"]["properties"].as_object().unwrap() {
            let Some(v) = line.get(k) else { continue };
            match spec.get("type").and_then(|t| t.as_str()) {
                Some("string") => assert!(v.is_string(), "{t}.{k}: {v}"),
                Some("integer") => assert!(v.is_u64(), "{t}.{k}: {v}"),
                Some("boolean") => assert!(v.is_boolean(), "{t}.{k}: {v}"),
                _ => {}
            }
            if let Some(allowed) = spec.get("enum").and_then(|e| e.as_array()) {
                assert!(allowed.contains(v), "{t}.{k} = {v} not in {allowed:?}");
            }
        }
    }
    seen_types
}

/// docs/events.schema.json.
pub fn shipped_schema() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/events.schema.json"
        ))
        .unwrap(),
    )
    .unwrap()
}

/// SIGTERM, then every remaining event: guestd must exit 0, with sequence numbers that
/// increase by one across the whole run.
pub async fn finish_ok(mut d: Daemon) -> Daemon {
    signal(d.pid(), "TERM");
    d.close_stdin();
    d.drain().await;
    let st = tokio::time::timeout(wait(), d.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(st.success(), "exit status {st:?}; stderr:\n{}", d.stderr());
    let seqs: Vec<u64> = d.seen.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert_no_second_ended(&d.seen);
    d
}

/// At most one `ended` per session in everything one process wrote, read to its end: a late
/// duplicate (a timer that fires after the end, a second decision) fails here whatever the
/// test checked before.
pub fn assert_no_second_ended(lines: &[Value]) {
    let mut ends: std::collections::HashMap<&str, Vec<&str>> = std::collections::HashMap::new();
    for v in lines.iter().filter(|v| v["type"] == "ended") {
        ends.entry(v["session"].as_str().unwrap_or("?"))
            .or_default()
            .push(v["reason"].as_str().unwrap_or("?"));
    }
    let twice: Vec<_> = ends.iter().filter(|(_, r)| r.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "sessions that ended more than once: {twice:?}"
    );
}

/// `POST /emulator/messaging/sessions/{token}` (a Web Messaging admin action); the status.
/// A Web Messaging admin action that must be taken (200).
pub async fn wm_admin_ok(emu: &Emulator, token: &str, body: Value) {
    let status = wm_admin(emu, token, body.clone()).await;
    assert_eq!(status, 200, "admin {body}");
}

/// The URL of a deployment's `config.json` on the emulator.
pub fn config_json_url(emu: &Emulator, deployment: &str) -> String {
    format!(
        "{}/webdeployments/v1/deployments/{deployment}/config.json",
        emu.base_url()
    )
}

/// The deployment's `config.json` as the emulator serves it, parsed.
pub async fn config_json(emu: &Emulator, deployment: &str) -> Value {
    reqwest::get(config_json_url(emu, deployment))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// After a ping flood from the emulator: the pings it sent (its log entry `pred` finds, within
/// `span` and the usual wait) and guestd's RSS growth over `before` KiB, printed under `label`.
/// The flood must be real (over 10,000 pings) and the growth under 32 MiB.
pub async fn flood_measured(
    emu: &Emulator,
    pid: i32,
    before: u64,
    pred: impl Fn(&guestd::emulator::world::LogEntry) -> bool,
    span: Duration,
    label: &str,
) {
    let pings = log_entry_within(emu, pred, span + wait())
        .await
        .detail
        .parse::<u64>()
        .unwrap_or(0);
    let (peak, _) = memory_kib(pid);
    let grew = peak.saturating_sub(before);
    eprintln!(
        "{label}: {pings} pings in {span:?}; RSS {before} KiB, peak {peak} KiB (+{grew} KiB)"
    );
    assert!(
        pings > 10_000,
        "{label}: a flood of {pings} pings proves nothing"
    );
    assert!(grew < 32 * 1024, "{label}: grew by {grew} KiB");
}

pub async fn wm_admin(emu: &Emulator, token: &str, body: Value) -> u16 {
    reqwest::Client::new()
        .post(format!(
            "{}/emulator/messaging/sessions/{token}",
            emu.base_url()
        ))
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A self-signed certificate for `localhost` and `127.0.0.1`, and its key, as PEM files.
pub struct Pki {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// A fresh [`Pki`] in a temporary directory.
pub fn pki() -> Pki {
    let dir = std::env::temp_dir().join(format!("guestd-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    let pki = Pki {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    pki
}

/// Peak resident memory (`VmHWM`) and resident memory now (`VmRSS`) of `pid`, KiB.
pub fn memory_kib(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
    };
    (field("VmHWM:"), field("VmRSS:"))
}
