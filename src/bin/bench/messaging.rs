//! `guestd-bench --web-messaging N`: Web Messaging sessions measured next to guest chats
//! (docs/benchmarks.md, "Web Messaging"). The emulator in its own process; one guestd with N
//! guest chats (the usual run), then one guestd with N Web Messaging sessions, on the same
//! machine, one after the other:
//! - memory: RSS per idle session;
//! - CPU per liveness cycle: a Web Messaging session's cycle is one websocket ping and its pong
//!   (every `--heartbeat`, scaled to the platform's 15 s), a guest chat's one server heartbeat
//!   (scaled to 30 s); cycles are counted as sessions x window / period;
//! - `ended` latency: the time from the admin call that sends a Presence Disconnect to the
//!   `ended` line (it includes the admin call's HTTP round trip, which the guest chat figure,
//!   timed from the frame's send, does not).
//!
//! There is no reconnect storm for Web Messaging here: the emulator's drop-all is guest chat's.

use super::{
    Args, Emu, Proc, Report, anon_kib, cpu_secs, per_session, percentile, rss_kib, wall_us,
};
use anyhow::{Context, bail};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::time::Instant;

pub async fn run(n: usize, exe: &PathBuf, args: &Args) -> anyhow::Result<Report> {
    let emu = Emu::start(exe, args, None).await?;
    let ping = args.heartbeat;
    let mut c = Command::new(exe);
    c.arg("run")
        .env_remove("GUESTD_CONFIG")
        .env("GUESTD_WEB_MESSAGING__BASE_URL", &emu.base)
        .env("GUESTD_WEB_MESSAGING__DEPLOYMENT_ID", "bench")
        .env(
            "GUESTD_WEB_MESSAGING__PING_INTERVAL",
            format!("{}ms", ping.as_millis()),
        )
        .env("GUESTD_STREAM__MAX_CONCURRENT_CONNECTS", "256")
        .env("GUESTD_JOURNAL__ENABLED", "false")
        .env("GUESTD_CONTROL__HTTP_LISTEN", "")
        .env("GUESTD_SUPERVISOR__MAX_SESSIONS", "200000")
        .env("RUST_LOG", "error");
    let mut p = Proc::spawn(c)?;
    p.ready(Duration::from_secs(20)).await?;
    let (rss_base, anon_base) = (rss_kib(p.pid), anon_kib(p.pid));
    let tokens: Vec<String> = (0..n)
        .map(|i| format!("bench-{i}-{}", uuid::Uuid::new_v4()))
        .collect();
    let mut buf = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let cmd = json!({"cmd": "start", "request_id": format!("wm-{i}"), "backend": "web_messaging", "token": t});
        buf.extend_from_slice(cmd.to_string().as_bytes());
        buf.push(b'\n');
    }
    let t0 = Instant::now();
    let writer = {
        let mut stdin = p.stdin.take().context("stdin")?;
        tokio::spawn(async move {
            let r = stdin.write_all(&buf).await;
            (stdin, r)
        })
    };
    let mut session_of: HashMap<String, usize> = HashMap::new();
    let mut connected = HashSet::new();
    while connected.len() < n {
        let (_, v) = p
            .next(Duration::from_secs(120))
            .await
            .with_context(|| format!("{} of {n} connected", connected.len()))?;
        match v["type"].as_str() {
            Some("command_result") => {
                if let (Some(rid), Some(s)) = (v["request_id"].as_str(), v["session"].as_str()) {
                    if let Some(i) = rid.strip_prefix("wm-").and_then(|i| i.parse().ok()) {
                        session_of.insert(s.to_string(), i);
                    }
                }
            }
            Some("connected") => {
                connected.insert(v["session"].as_str().unwrap_or_default().to_string());
            }
            Some("command_error") | Some("ended") => bail!("a session failed: {v}"),
            _ => {}
        }
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    let (stdin, wrote) = writer.await?;
    wrote?;
    p.stdin = Some(stdin);
    // Steady state: two ping periods with nothing on stdout.
    let settle = Instant::now();
    loop {
        match tokio::time::timeout(ping, p.lines.recv()).await {
            Ok(Some(_)) => continue,
            Ok(None) => bail!("guestd's stdout closed"),
            Err(_) if settle.elapsed() >= ping * 2 => break,
            Err(_) => {}
        }
        if settle.elapsed() > Duration::from_secs(120) {
            bail!("no quiet steady state within 120 s");
        }
    }
    let (rss_loaded, anon_loaded) = (rss_kib(p.pid), anon_kib(p.pid));
    let cpu0 = cpu_secs(p.pid);
    let t_cpu = Instant::now();
    super::drain_until(&mut p, std::time::Instant::now() + args.steady).await;
    let cpu = cpu_secs(p.pid) - cpu0;
    let window = t_cpu.elapsed().as_secs_f64();
    let cycles = (n as f64 * window / ping.as_secs_f64()).max(1.0);
    let per_cycle = cpu / cycles;

    // `ended` latency: Presence Disconnects, ten at a time.
    let samples = args.latency_samples.min(n).max(1);
    let index: HashMap<usize, String> = session_of.iter().map(|(s, i)| (*i, s.clone())).collect();
    let http = reqwest::Client::new();
    let mut lat = Vec::with_capacity(samples);
    for batch in (0..samples).collect::<Vec<_>>().chunks(10) {
        let mut sent: HashMap<String, u64> = HashMap::new();
        for &i in batch {
            let at = wall_us();
            let r = http
                .post(format!(
                    "{}/emulator/messaging/sessions/{}",
                    emu.base, tokens[i]
                ))
                .json(&json!({"action": "disconnect"}))
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("admin disconnect: {}", r.status());
            }
            if let Some(s) = index.get(&i) {
                sent.insert(s.clone(), at);
            }
        }
        let mut waiting = sent.len();
        while waiting > 0 {
            let (at, v) = p.next(Duration::from_secs(30)).await?;
            if v["type"] == "ended" {
                if let Some(t) = v["session"].as_str().and_then(|s| sent.get(s)) {
                    lat.push(at.saturating_sub(*t));
                    waiting -= 1;
                }
            }
        }
    }
    lat.sort_unstable();
    p.stop().await;
    Ok(Report {
        program: "guestd-web-messaging".into(),
        sessions: n,
        connect_secs,
        rss_base_kib: rss_base,
        rss_loaded_kib: rss_loaded,
        bytes_per_session: per_session(rss_base, rss_loaded, n),
        anon_bytes_per_session: per_session(anon_base, anon_loaded, n),
        // Per liveness cycle (a ping), in the columns of a heartbeat.
        cpu_secs_per_1000_heartbeats: per_cycle * 1000.0,
        core_pct_at_30s_heartbeats: per_cycle * n as f64 / 15.0 * 100.0,
        core_pct_at_30s_for_50k: per_cycle * 50_000.0 / 15.0 * 100.0,
        ended_samples: lat.len(),
        ended_p50_ms: percentile(&lat, 0.50) as f64 / 1000.0,
        ended_p99_ms: percentile(&lat, 0.99) as f64 / 1000.0,
        ended_max_ms: lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        storm_sessions: 0,
        storm_recovered_secs: f64::NAN,
        storm_lost: 0,
        storm_peak_connects: None,
    })
}
