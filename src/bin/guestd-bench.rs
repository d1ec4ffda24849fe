//! guestd-bench: sessions per box, memory and CPU per session, `ended` latency and a reconnect
//! storm, for guestd and a hand-written peer, side by side in the same run.
//!
//! Each measured program runs in its own process against an emulator in another process (so the
//! emulator's memory and CPU are not counted). The emulator listens on several loopback addresses
//! so client sockets are not limited by one destination's ephemeral ports.
//!
//! ```sh
//! cargo run --release --bin guestd-bench -- --sessions 1000,10000,19000
//! cargo run --release --bin guestd-bench -- --smoke        # ~1k sessions, under a minute
//! ```

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

#[path = "bench/cluster.rs"]
mod cluster;
#[path = "bench/frames.rs"]
mod frames;
#[path = "bench/messaging.rs"]
mod messaging;

#[derive(Parser, Clone)]
#[command(about = "Benchmark guestd against a hand-written peer on the emulator")]
struct Args {
    /// Session counts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    sessions: Vec<usize>,
    /// Quick run for CI: 1,000 sessions, short windows.
    #[arg(long)]
    smoke: bool,
    /// Heartbeat period used by the emulator and both programs (figures are scaled to 30 s).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Steady-state window over which CPU is measured.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    steady: Duration,
    /// Chats ended one batch at a time to measure `ended` latency.
    #[arg(long, default_value_t = 1000)]
    latency_samples: usize,
    /// Peers, comma-separated: "python" (benches/peers/peer.py, needs the websockets package),
    /// "node" (benches/peers/node/peer.mjs: Genesys's guest chat SDK and ws; run `npm ci` in
    /// that folder first), "tokio-rustls" (guestd with `stream.lean_tls = false`, to measure
    /// its own TLS stream against), "tungstenite" (guestd with `stream.lean_ws = false`,
    /// tokio-tungstenite's websocket frames), or "none".
    #[arg(long, value_delimiter = ',', default_value = "python")]
    peer: Vec<String>,
    /// Loopback addresses the emulator listens on (127.0.0.1 ..).
    #[arg(long, default_value_t = 4)]
    addrs: u8,
    /// guestd's stream.max_concurrent_connects.
    #[arg(long, default_value_t = 256)]
    max_connects: usize,
    /// guestd's stream.read_buffer, bytes (default: guestd's own default).
    #[arg(long)]
    read_buffer: Option<usize>,
    /// The guestd binary (default: next to this one).
    #[arg(long)]
    guestd: Option<PathBuf>,
    /// A previous build of guestd, run as the arm `guestd-baseline` beside this one in the same
    /// run (same emulator, same settings): a change's cost read side by side, since this
    /// machine's figures move by up to 1.7x between runs. Build it from a worktree, e.g.
    /// `git worktree add /tmp/base HEAD~1 && cargo build --release --manifest-path
    /// /tmp/base/Cargo.toml`, then `--baseline /tmp/base/target/release/guestd`.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// KEY=VALUE set for the `guestd` arm only (not the baseline, the emulator or a peer): a
    /// setting measured side by side against the same build without it, e.g.
    /// `--baseline target/release/guestd --env TOKIO_WORKER_THREADS=1`.
    #[arg(long = "env", value_parser = parse_env)]
    arm_env: Vec<(String, String)>,
    /// Run every arm this many times, alternating (A, B, A, B, ...), so a drift of the machine
    /// over the run falls on both arms alike.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Budget: fail unless guestd's memory per session is at most this many times that of the
    /// `--budget-vs` arm measured in the same run (side by side: this machine's figures move
    /// between runs, ratios within one run do not).
    #[arg(long)]
    max_memory_ratio: Option<f64>,
    /// Budget: fail unless guestd's `ended` p99 is at most this many times the `--budget-vs`
    /// arm's, or within `--p99-slack` of it (a few ms either way is noise).
    #[arg(long)]
    max_p99_ratio: Option<f64>,
    /// Milliseconds of `ended` p99 above the other arm that never fail the budget.
    #[arg(long, default_value_t = 20.0)]
    p99_slack: f64,
    /// The arm the budget ratios compare against.
    #[arg(long, default_value = "guestd-tungstenite")]
    budget_vs: String,
    /// Budget: fail when guestd holds more than this many KiB per idle session.
    #[arg(long)]
    max_kib_per_session: Option<f64>,
    /// Run over TLS (HTTPS/WSS with a throwaway certificate made by the `openssl` command).
    #[arg(long)]
    tls: bool,
    /// Cluster mode instead: this many chats on three nodes and a 3-server NATS cluster
    /// (needs nats-server on the PATH): memory per session next to one node, failover after
    /// kill -9, events per second into JetStream.
    #[arg(long)]
    cluster: Option<usize>,
    /// Cluster mode: node counts to run, each in turn (e.g. `3,6`).
    #[arg(long, value_delimiter = ',', default_value = "3")]
    cluster_nodes: Vec<usize>,
    /// Cluster mode: `--cluster N` chats per node, not in all.
    #[arg(long)]
    per_node: bool,
    /// Web Messaging instead: this many guest chats, then as many Web Messaging sessions, side
    /// by side (memory per idle session, CPU per liveness cycle, `ended` latency).
    #[arg(long)]
    web_messaging: Option<usize>,
    /// Burst throughput instead: this many frames per round through guestd's own websocket
    /// reader and through tokio-tungstenite's, side by side in one process (no guestd process).
    #[arg(long)]
    frames: Option<usize>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

/// The emulator's loopback addresses as `genesys.stream_hosts` (guestd sends streams only to
/// the platform's hosts; the bench spreads the emulator's sockets over several addresses).
fn loopback_hosts(addrs: u8) -> String {
    let hosts: Vec<String> = (1..=addrs.max(1))
        .map(|i| format!("\"127.0.0.{i}\""))
        .collect();
    format!("[{}]", hosts.join(","))
}

/// A throwaway certificate for 127.0.0.1-4, made with the openssl command line.
fn make_cert(dir: &std::path::Path, addrs: u8) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let sans: Vec<String> = (1..=addrs.max(1))
        .map(|i| format!("IP:127.0.0.{i}"))
        .collect();
    let st = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args(["-subj", "/CN=localhost", "-addext"])
        .arg(format!("subjectAltName=DNS:localhost,{}", sans.join(",")))
        // A leaf, not a CA: rustls refuses a CA certificate used as the server's own.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running openssl (needed for --tls)")?;
    if !st.success() {
        bail!("openssl could not make a certificate");
    }
    Ok((cert, key))
}

fn wall_us() -> u64 {
    guestd::emulator::wall_us()
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// The anonymous part of RSS: the heap and stacks, without the binary's own pages (which one
/// build maps more of than another at the same work: 1.2-1.5 MiB at start between two builds
/// of one source tree, docs/benchmarks.md, "A burst's freed pages").
fn anon_kib(pid: u32) -> u64 {
    status_kib(pid, "RssAnon:")
}

/// Bytes per session from a reading in KiB before `n` sessions and one with them.
fn per_session(base_kib: u64, loaded_kib: u64, n: usize) -> f64 {
    (loaded_kib.saturating_sub(base_kib) as f64 * 1024.0) / n as f64
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    ticks / clk_tck()
}

fn free_port(ip: &str) -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind(format!("{ip}:0"))?
        .local_addr()?
        .port())
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Proc {
    child: Child,
    pid: u32,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<(u64, Value)>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> anyhow::Result<Proc> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("spawning")?;
        let pid = child.id().context("pid")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = r.next_line().await {
                let at = wall_us();
                if let Ok(v) = serde_json::from_str::<Value>(&l) {
                    if tx.send((at, v)).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(Proc {
            child,
            pid,
            stdin: Some(stdin),
            lines,
        })
    }

    /// Wait until guestd answers a command on stdin: it is up.
    async fn ready(&mut self, within: Duration) -> anyhow::Result<()> {
        if let Some(stdin) = self.stdin.as_mut() {
            stdin
                .write_all(b"{\"cmd\":\"list\",\"request_id\":\"ready\"}\n")
                .await?;
        }
        loop {
            let (_, v) = self.next(within).await?;
            if v["request_id"] == "ready" {
                return Ok(());
            }
        }
    }

    /// Stop it politely (a profiler wrapping it gets to write its output), then for sure.
    async fn stop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
        }
    }

    async fn next(&mut self, within: Duration) -> anyhow::Result<(u64, Value)> {
        match tokio::time::timeout(within, self.lines.recv()).await {
            Ok(Some(x)) => Ok(x),
            Ok(None) => bail!("the program's stdout closed"),
            Err(_) => bail!("no output within {within:?}"),
        }
    }
}

struct Emu {
    _child: Child,
    base: String,
    http: reqwest::Client,
}

impl Emu {
    async fn start(
        exe: &PathBuf,
        args: &Args,
        tls: Option<(PathBuf, PathBuf)>,
    ) -> anyhow::Result<Emu> {
        let dir = std::env::temp_dir().join(format!("guestd-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("emulator.toml");
        let mut text = format!(
            "heartbeat_interval = \"{}ms\"\nreconnect_grace = \"5m\"\ninactivity_timeout = \"2h\"\nlog_limit = 1000\n",
            args.heartbeat.as_millis()
        );
        if let Some((cert, key)) = &tls {
            text.push_str(&format!(
                "tls_cert_file = {:?}\ntls_key_file = {:?}\n",
                cert, key
            ));
        }
        std::fs::write(&cfg, text)?;
        let mut cmd = Command::new(exe);
        cmd.arg("emulator").arg("--config").arg(&cfg);
        let mut first = None;
        for i in 1..=args.addrs.max(1) {
            let ip = format!("127.0.0.{i}");
            let addr = format!("{ip}:{}", free_port(&ip)?);
            first.get_or_insert_with(|| addr.clone());
            cmd.arg("--listen").arg(addr);
        }
        cmd.env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("starting the emulator")?;
        let stderr = child.stderr.take().context("emulator stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await {
                Ok(Ok(Some(l))) if l.contains("guestd emulator on") => break,
                Ok(Ok(Some(_))) => {}
                _ => bail!("the emulator did not start"),
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let mut http = reqwest::Client::builder();
        if let Some((cert, _)) = &tls {
            http =
                http.add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(cert)?)?);
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        Ok(Emu {
            _child: child,
            base: format!("{scheme}://{}", first.context("an address")?),
            http: http.build()?,
        })
    }

    async fn post_path(&self, path: String, body: Value) -> anyhow::Result<Value> {
        self.post(&path, body).await
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let r = self
            .http
            .post(format!("{}/emulator/{path}", self.base))
            .json(&body)
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await?;
        if !status.is_success() {
            bail!("emulator {path}: {status} {v}");
        }
        Ok(v)
    }

    async fn heartbeats(&self) -> anyhow::Result<u64> {
        let v: Value = self
            .http
            .get(format!("{}/emulator/stats", self.base))
            .send()
            .await?
            .json()
            .await?;
        Ok(v["heartbeats_sent"].as_u64().unwrap_or(0))
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
struct Report {
    program: String,
    sessions: usize,
    connect_secs: f64,
    rss_base_kib: u64,
    rss_loaded_kib: u64,
    bytes_per_session: f64,
    /// The same from anonymous RSS only (0 in the peers' rows written before it was added).
    anon_bytes_per_session: f64,
    cpu_secs_per_1000_heartbeats: f64,
    core_pct_at_30s_heartbeats: f64,
    core_pct_at_30s_for_50k: f64,
    ended_samples: usize,
    ended_p50_ms: f64,
    ended_p99_ms: f64,
    ended_max_ms: f64,
    storm_sessions: usize,
    storm_recovered_secs: f64,
    storm_lost: usize,
    storm_peak_connects: Option<u64>,
}

/// A peer: `program script`, with the heartbeat and grace it should use and, over TLS, the
/// emulator's certificate in the variable the peer reads (`ca_var`).
fn peer_command(
    program: &str,
    script: &str,
    ca_var: &str,
    args: &Args,
    tls: Option<&(PathBuf, PathBuf)>,
) -> Command {
    let mut c = Command::new(program);
    c.arg(script)
        .env(
            "PEER_HEARTBEAT",
            format!("{}", args.heartbeat.as_secs_f64()),
        )
        .env("PEER_GRACE", "120")
        .envs(tls.map(|(cert, _)| (ca_var.to_string(), cert.display().to_string())));
    c
}

/// `n` chats created straight on the emulator, each as the fields `attach` takes.
async fn create_chats(emu: &Emu, n: usize) -> anyhow::Result<Vec<Value>> {
    let mut chats = Vec::with_capacity(n);
    while chats.len() < n {
        let count = (n - chats.len()).min(5000);
        let v = emu.post("bulk/create", json!({ "count": count })).await?;
        chats.extend(v.as_array().cloned().unwrap_or_default());
    }
    Ok(chats)
}

async fn run(kind: &str, n: usize, exe: &PathBuf, args: &Args) -> anyhow::Result<Report> {
    let tls = if args.tls {
        let dir = std::env::temp_dir().join(format!("guestd-bench-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Some(make_cert(&dir, args.addrs)?)
    } else {
        None
    };
    let emu = Emu::start(exe, args, tls.clone()).await?;
    let metrics_port = free_port("127.0.0.1")?;
    let hb_ms = args.heartbeat.as_millis();
    let is_guestd = kind.starts_with("guestd");
    let daemon = match (&args.baseline, kind) {
        (Some(old), "guestd-baseline") => old,
        _ => exe,
    };
    let mut cmd = if is_guestd {
        let mut c = Command::new(daemon);
        c.arg("run")
            .env(
                "GUESTD_STREAM__LEAN_TLS",
                (kind != "guestd-tokio-rustls").to_string(),
            )
            .env(
                "GUESTD_STREAM__LEAN_WS",
                (kind != "guestd-tungstenite").to_string(),
            )
            .env("GUESTD_GENESYS__API_BASE", &emu.base)
            .env("GUESTD_GENESYS__STREAM_HOSTS", loopback_hosts(args.addrs))
            .env("GUESTD_SESSION__HEARTBEAT_INTERVAL", format!("{hb_ms}ms"))
            .env("GUESTD_SESSION__RECONNECT_GRACE", "2m")
            .env("GUESTD_SESSION__INACTIVITY_TIMEOUT", "1h")
            .env(
                "GUESTD_STREAM__MAX_CONCURRENT_CONNECTS",
                args.max_connects.to_string(),
            )
            .envs(
                args.read_buffer
                    .map(|b| ("GUESTD_STREAM__READ_BUFFER", b.to_string())),
            )
            .env("GUESTD_JOURNAL__ENABLED", "false")
            .env(
                "GUESTD_CONTROL__HTTP_LISTEN",
                format!("127.0.0.1:{metrics_port}"),
            )
            .env("GUESTD_SUPERVISOR__MAX_SESSIONS", "200000")
            .envs(
                tls.as_ref()
                    .map(|(cert, _)| ("GUESTD_GENESYS__EXTRA_CA_FILE", cert.display().to_string())),
            )
            .env("RUST_LOG", "error");
        if kind == "guestd" {
            c.envs(args.arm_env.iter().map(|(k, v)| (k, v)));
        }
        c
    } else if kind == "node-peer" {
        peer_command(
            "node",
            concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peers/node/peer.mjs"),
            "NODE_EXTRA_CA_CERTS",
            args,
            tls.as_ref(),
        )
    } else {
        peer_command(
            "python3",
            concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peers/peer.py"),
            "PEER_CA_FILE",
            args,
            tls.as_ref(),
        )
    };
    cmd.env_remove("GUESTD_CONFIG");
    let mut p = Proc::spawn(cmd)?;
    // Ready: guestd answers a command; the peer says so.
    if is_guestd {
        p.ready(Duration::from_secs(20)).await?;
    } else {
        while p.next(Duration::from_secs(20)).await?.1["type"] != "ready" {}
    }
    let (rss_base, anon_base) = (rss_kib(p.pid), anon_kib(p.pid));
    // Chats, created straight on the emulator, attached through stdin.
    let chats = create_chats(&emu, n).await?;
    let t0 = Instant::now();
    let mut buf = Vec::new();
    for c in &chats {
        let mut cmd = c.clone();
        cmd["cmd"] = json!("attach");
        buf.extend_from_slice(cmd.to_string().as_bytes());
        buf.push(b'\n');
    }
    let writer = {
        let mut stdin = p.stdin.take().context("stdin")?;
        tokio::spawn(async move {
            let r = stdin.write_all(&buf).await;
            (stdin, r)
        })
    };
    let mut connected = HashSet::new();
    let mut ended_early = 0;
    while connected.len() < n {
        let (_, v) = p
            .next(Duration::from_secs(120))
            .await
            .with_context(|| format!("{} of {n} connected", connected.len()))?;
        match v["type"].as_str() {
            Some("connected") => {
                connected.insert(
                    v["conversation_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
            Some("ended") => ended_early += 1,
            Some("command_error") => bail!("attach failed: {v}"),
            _ => {}
        }
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    let (stdin, wrote) = writer.await?;
    wrote?;
    p.stdin = Some(stdin);
    if ended_early > 0 {
        bail!("{ended_early} sessions ended while connecting");
    }
    // Steady state: wait until the connect-time work (roster fetches and their events) is done,
    // that is until stdout has been quiet for a heartbeat interval, and at least two intervals.
    let settle_from = Instant::now();
    let quiet = args.heartbeat.max(Duration::from_secs(1));
    loop {
        match tokio::time::timeout(quiet, p.lines.recv()).await {
            Ok(Some(_)) => continue,
            Ok(None) => bail!("the program's stdout closed"),
            Err(_) if settle_from.elapsed() >= args.heartbeat * 2 => break,
            Err(_) => {}
        }
        if settle_from.elapsed() > Duration::from_secs(120) {
            bail!("no quiet steady state within 120 s");
        }
    }
    let (rss_loaded, anon_loaded) = (rss_kib(p.pid), anon_kib(p.pid));
    let (hb0, cpu0) = (emu.heartbeats().await?, cpu_secs(p.pid));
    let t_cpu = Instant::now();
    drain_until(&mut p, Instant::now() + args.steady).await;
    let (hb1, cpu1) = (emu.heartbeats().await?, cpu_secs(p.pid));
    let window = t_cpu.elapsed().as_secs_f64();
    let hbs = (hb1 - hb0).max(1) as f64;
    let cpu = cpu1 - cpu0;
    let per_hb = cpu / hbs;
    let per_30s = (cpu / window) * args.heartbeat.as_secs_f64() / 30.0;

    // `ended` latency: end small batches and time each decisive frame to its `ended` line.
    let samples = args.latency_samples.min(n / 2).max(1);
    let ids: Vec<String> = chats
        .iter()
        .take(samples)
        .filter_map(|c| c["conversation_id"].as_str().map(str::to_string))
        .collect();
    let mut lat = Vec::with_capacity(samples);
    for batch in ids.chunks(10) {
        let r = emu.post("bulk/end", json!({ "ids": batch })).await?;
        let sent: HashMap<String, u64> = r["sent_at_us"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        let mut waiting = sent.len();
        while waiting > 0 {
            let (at, v) = p.next(Duration::from_secs(30)).await?;
            if v["type"] == "ended" {
                if let Some(s) = v["conversation_id"].as_str().and_then(|c| sent.get(c)) {
                    lat.push(at.saturating_sub(*s));
                    waiting -= 1;
                }
            }
        }
    }
    lat.sort_unstable();

    // Reconnect storm: every remaining socket reset at once.
    let storm_n = n - samples;
    let t_drop = Instant::now();
    emu.post("sockets/drop-all?mode=reset", json!({})).await?;
    let mut back = HashSet::new();
    let mut lost = 0;
    let deadline = Instant::now() + Duration::from_secs(150);
    while back.len() < storm_n && Instant::now() < deadline {
        let Ok((_, v)) = p.next(Duration::from_secs(150)).await else {
            break;
        };
        match v["type"].as_str() {
            Some("reconnected") => {
                back.insert(
                    v["conversation_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
            Some("ended") => lost += 1,
            _ => {}
        }
    }
    let storm_secs = t_drop.elapsed().as_secs_f64();
    let peak = if is_guestd {
        let m = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
            .await?
            .text()
            .await?;
        m.lines()
            .find(|l| l.starts_with("guestd_connects_in_flight_peak"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|x| x as u64)
    } else {
        None
    };
    p.stop().await;
    Ok(Report {
        program: kind.to_string(),
        sessions: n,
        connect_secs,
        rss_base_kib: rss_base,
        rss_loaded_kib: rss_loaded,
        bytes_per_session: per_session(rss_base, rss_loaded, n),
        anon_bytes_per_session: per_session(anon_base, anon_loaded, n),
        cpu_secs_per_1000_heartbeats: per_hb * 1000.0,
        core_pct_at_30s_heartbeats: per_30s * 100.0,
        core_pct_at_30s_for_50k: per_hb * 50_000.0 / 30.0 * 100.0,
        ended_samples: lat.len(),
        ended_p50_ms: percentile(&lat, 0.50) as f64 / 1000.0,
        ended_p99_ms: percentile(&lat, 0.99) as f64 / 1000.0,
        ended_max_ms: lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        storm_sessions: storm_n,
        storm_recovered_secs: if back.len() == storm_n {
            storm_secs
        } else {
            f64::NAN
        },
        storm_lost: lost + storm_n.saturating_sub(back.len()),
        storm_peak_connects: peak,
    })
}

async fn drain_until(p: &mut Proc, until: Instant) {
    while let Ok(Some(_)) = tokio::time::timeout_at(until.into(), p.lines.recv()).await {}
}

fn node_peer_available() -> bool {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peers/node");
    std::path::Path::new(dir)
        .join("node_modules/purecloud-guest-chat-client")
        .exists()
        && std::process::Command::new("node")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
}

fn peer_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import websockets"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn print(reports: &[Report]) {
    println!();
    println!(
        "| sessions | program | connect s | RSS/session | CPU s/1k hb | core % @30s hb | core % @30s, 50k | ended p50/p99/max ms | storm: recovered s, lost, peak connects |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---|---|");
    for r in reports {
        println!(
            "| {} | {} | {:.1} | {:.1} KiB | {:.4} | {:.3} | {:.2} | {:.2} / {:.2} / {:.2} | {:.1}, {}, {} |",
            r.sessions,
            r.program,
            r.connect_secs,
            r.bytes_per_session / 1024.0,
            r.cpu_secs_per_1000_heartbeats,
            r.core_pct_at_30s_heartbeats,
            r.core_pct_at_30s_for_50k,
            r.ended_p50_ms,
            r.ended_p99_ms,
            r.ended_max_ms,
            r.storm_recovered_secs,
            r.storm_lost,
            r.storm_peak_connects
                .map(|p| p.to_string())
                .unwrap_or_else(|| "n/a".into()),
        );
    }
    // Rounds: the mean of each arm, the figure to compare side by side.
    let mut arms: Vec<(usize, &str)> = reports
        .iter()
        .map(|r| (r.sessions, r.program.as_str()))
        .collect();
    arms.sort_unstable();
    arms.dedup();
    for (n, program) in arms {
        let rs: Vec<&Report> = reports
            .iter()
            .filter(|r| r.sessions == n && r.program == program)
            .collect();
        if rs.len() < 2 {
            continue;
        }
        let mean = |f: fn(&Report) -> f64| rs.iter().map(|r| f(r)).sum::<f64>() / rs.len() as f64;
        println!(
            "mean of {} rounds at {n} sessions, {program}: RSS/session {:.2} KiB (anonymous {:.2}), CPU s/1k hb {:.4}, ended p99 {:.2} ms",
            rs.len(),
            mean(|r| r.bytes_per_session) / 1024.0,
            mean(|r| r.anon_bytes_per_session) / 1024.0,
            mean(|r| r.cpu_secs_per_1000_heartbeats),
            mean(|r| r.ended_p99_ms),
        );
    }
    let by_n: HashMap<usize, Vec<&Report>> = reports.iter().fold(HashMap::new(), |mut m, r| {
        m.entry(r.sessions).or_default().push(r);
        m
    });
    let mut ns: Vec<_> = by_n.keys().copied().collect();
    ns.sort_unstable();
    for n in ns {
        let rs = &by_n[&n];
        let Some(g) = rs.iter().find(|r| r.program == "guestd") else {
            continue;
        };
        for p in rs.iter().filter(|r| r.program != "guestd") {
            let ratio = |a: f64, b: f64| a / b.max(1e-9);
            let storm = ratio(p.storm_recovered_secs, g.storm_recovered_secs);
            let storm = if storm.is_nan() {
                "not measured".to_string()
            } else {
                format!("{storm:.1}x")
            };
            println!(
                "ratio at {n} sessions, {}/guestd: memory per session {:.1}x, CPU per heartbeat {:.1}x, ended p99 {:.1}x, storm recovery {storm}",
                p.program,
                ratio(p.bytes_per_session, g.bytes_per_session),
                ratio(
                    p.cpu_secs_per_1000_heartbeats,
                    g.cpu_secs_per_1000_heartbeats
                ),
                ratio(p.ended_p99_ms, g.ended_p99_ms),
            );
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.sessions = vec![1000];
        args.heartbeat = Duration::from_secs(1);
        args.steady = Duration::from_secs(5);
        args.latency_samples = 200;
        // Side by side with guestd on tokio-tungstenite's frames, with a budget: guestd's own
        // frames must keep their memory lead, and `ended` must stay as fast.
        if !args.peer.iter().any(|p| p == "tungstenite") {
            args.peer.push("tungstenite".into());
        }
        args.max_memory_ratio.get_or_insert(1.25);
        args.max_p99_ratio.get_or_insert(3.0);
        args.max_kib_per_session.get_or_insert(16.0);
    }
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => eprintln!("open-file limit: {n}"),
        Err(e) => eprintln!("could not raise the open-file limit: {e}"),
    }
    let exe = match &args.guestd {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("guestd"),
    };
    if !exe.exists() {
        bail!(
            "{} not found: build it first (cargo build --release)",
            exe.display()
        );
    }
    if let Some(n) = args.frames {
        let r = frames::run(n).await?;
        frames::print(&r);
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&r)?)?;
        }
        return Ok(());
    }
    if let Some(n) = args.cluster {
        let r = cluster::run(n, &exe, &args).await?;
        println!("{}", serde_json::to_string_pretty(&r)?);
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&r)?)?;
        }
        return Ok(());
    }
    if let Some(n) = args.web_messaging {
        eprintln!("running guestd with {n} guest chats ...");
        let g = run("guestd", n, &exe, &args).await?;
        eprintln!("running guestd with {n} Web Messaging sessions ...");
        let w = messaging::run(n, &exe, &args).await?;
        let reports = vec![g, w];
        print(&reports);
        println!(
            "(web messaging: the CPU columns are per liveness cycle, a ping every 15 s; the ended latency includes the admin call's round trip)"
        );
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&reports)?)?;
        }
        return Ok(());
    }
    let mut programs = vec!["guestd"];
    if let Some(old) = &args.baseline {
        if !old.exists() {
            bail!("--baseline {} not found", old.display());
        }
        programs.push("guestd-baseline");
    }
    for peer in &args.peer {
        match peer.as_str() {
            "python" if peer_available() => programs.push("python-peer"),
            "python" => eprintln!(
                "python peer skipped: python3 with the websockets package is not installed (pip install websockets)"
            ),
            "node" if node_peer_available() => programs.push("node-peer"),
            // guestd itself with tokio-rustls instead of its own TLS stream (`--tls` runs).
            "tokio-rustls" => programs.push("guestd-tokio-rustls"),
            // guestd itself with tokio-tungstenite instead of its own websocket frames.
            "tungstenite" => programs.push("guestd-tungstenite"),
            "node" => eprintln!(
                "node peer skipped: run `npm ci` in benches/peers/node (Node 20 and npm needed)"
            ),
            "none" => {}
            other => {
                bail!("unknown peer {other:?} (python, node, tokio-rustls, tungstenite, none)")
            }
        }
    }
    eprintln!(
        "machine: {} cores; heartbeat {:?}; steady window {:?}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        args.heartbeat,
        args.steady
    );
    let mut reports = Vec::new();
    for &n in &args.sessions {
        for (round, kind) in
            (0..args.rounds.max(1)).flat_map(|r| programs.iter().map(move |k| (r, k)))
        {
            eprintln!("running {kind} with {n} sessions (round {}) ...", round + 1);
            match run(kind, n, &exe, &args).await {
                Ok(r) => reports.push(r),
                Err(e) => eprintln!("{kind} at {n} sessions failed: {e:#}"),
            }
        }
    }
    print(&reports);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&reports)?)?;
    }
    if reports.iter().filter(|r| r.program == "guestd").count()
        < args.sessions.len() * args.rounds.max(1)
    {
        bail!("some guestd runs failed");
    }
    if reports
        .iter()
        .any(|r| r.program == "guestd" && r.storm_lost > 0)
    {
        bail!("guestd lost sessions in the reconnect storm");
    }
    let over = over_budget(&reports, &args);
    if !over.is_empty() {
        bail!("over budget:\n{}", over.join("\n"));
    }
    Ok(())
}

/// Every budget guestd missed in `reports`, one line each.
fn over_budget(reports: &[Report], args: &Args) -> Vec<String> {
    let mut out = Vec::new();
    for g in reports.iter().filter(|r| r.program == "guestd") {
        let kib = g.bytes_per_session / 1024.0;
        if let Some(max) = args.max_kib_per_session {
            if kib > max {
                out.push(format!(
                    "{} sessions: {kib:.1} KiB per session > {max}",
                    g.sessions
                ));
            }
        }
        let Some(o) = reports
            .iter()
            .find(|r| r.program == args.budget_vs && r.sessions == g.sessions)
        else {
            if args.max_memory_ratio.is_some() || args.max_p99_ratio.is_some() {
                out.push(format!(
                    "{} sessions: no {} arm to compare with",
                    g.sessions, args.budget_vs
                ));
            }
            continue;
        };
        if let Some(max) = args.max_memory_ratio {
            if g.bytes_per_session > o.bytes_per_session * max {
                out.push(format!(
                    "{} sessions: memory per session {:.1} KiB > {max} x {}'s {:.1} KiB",
                    g.sessions,
                    kib,
                    o.program,
                    o.bytes_per_session / 1024.0
                ));
            }
        }
        if let Some(max) = args.max_p99_ratio {
            if g.ended_p99_ms > (o.ended_p99_ms * max).max(o.ended_p99_ms + args.p99_slack) {
                out.push(format!(
                    "{} sessions: ended p99 {:.1} ms > {max} x {}'s {:.1} ms (+{} ms slack)",
                    g.sessions, g.ended_p99_ms, o.program, o.ended_p99_ms, args.p99_slack
                ));
            }
        }
    }
    out
}
