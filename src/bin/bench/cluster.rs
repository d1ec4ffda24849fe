//! `guestd-bench --cluster N`: cluster mode measured (docs/benchmarks.md, "Cluster mode").
//! A 3-server NATS JetStream cluster on loopback (R3), `--cluster-nodes` guestd nodes (3 unless
//! told), the emulator in its own process. N chats (N per node with `--per-node`) are attached
//! through the nodes' stdin; then:
//! - memory: RSS per idle session on each node, next to one single-node guestd holding as many
//!   chats as one node does;
//! - traffic: an agent joins a sample of chats and sends them messages for a few seconds; what
//!   each node received from NATS meanwhile (`out_msgs` of its connection in the servers'
//!   `/connz`), which is design-neutral: it counts for a build before slots as for one after;
//! - failover: kill -9 the node holding the most chats; time from the kill to each of its chats
//!   reconnected on another node (p50, p99, last);
//! - event throughput into JetStream: every chat ended at once; time until the stream has
//!   acknowledged an `ended` for each (events per second into the stream).
//!
//! With `--baseline`, every node count runs with both builds, alternating for `--rounds`, each
//! on fresh NATS servers and a fresh emulator.

use super::{Emu, Proc, rss_kib, wall_us};
use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::time::Instant;

#[path = "../../../tests/common/nats.rs"]
mod nats;

const KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn node(exe: &PathBuf, id: &str, emu: &Emu, servers: &str, hb_ms: u128, cluster: bool) -> Command {
    let mut c = Command::new(exe);
    c.arg("run")
        .env_remove("GUESTD_CONFIG")
        .env("GUESTD_GENESYS__API_BASE", &emu.base)
        .env("GUESTD_GENESYS__STREAM_HOSTS", super::loopback_hosts(16))
        .env("GUESTD_SESSION__HEARTBEAT_INTERVAL", format!("{hb_ms}ms"))
        .env("GUESTD_SESSION__RECONNECT_GRACE", "2m")
        .env("GUESTD_SESSION__INACTIVITY_TIMEOUT", "1h")
        .env("GUESTD_STREAM__MAX_CONCURRENT_CONNECTS", "256")
        .env("GUESTD_JOURNAL__ENABLED", "false")
        .env("GUESTD_CONTROL__HTTP_LISTEN", "")
        .env("GUESTD_SUPERVISOR__MAX_SESSIONS", "200000")
        .env("RUST_LOG", "error");
    if cluster {
        c.env("GUESTD_CLUSTER__SERVERS", servers)
            .env("GUESTD_CLUSTER__NODE_ID", id)
            .env("GUESTD_CLUSTER__REPLICAS", "3")
            .env("GUESTD_CLUSTER__LEASE", "6s")
            .env("GUESTD_CLUSTER__RENEW", "2s")
            .env("GUESTD_CLUSTER__FENCE_MARGIN", "2s")
            .env("GUESTD_CLUSTER_SEAL_KEY", KEY);
    }
    c
}

async fn attach(p: &mut Proc, chats: &[Value]) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    for c in chats {
        let mut cmd = c.clone();
        cmd["cmd"] = json!("attach");
        buf.extend_from_slice(cmd.to_string().as_bytes());
        buf.push(b'\n');
    }
    let mut stdin = p.stdin.take().context("stdin")?;
    let h = tokio::spawn(async move {
        let r = stdin.write_all(&buf).await;
        (stdin, r)
    });
    let (stdin, r) = h.await?;
    r?;
    p.stdin = Some(stdin);
    Ok(())
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Every event line of every node, as (node index, time us, value), in one channel.
fn merge(procs: &mut [Proc]) -> tokio::sync::mpsc::UnboundedReceiver<(usize, u64, Value)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for (i, p) in procs.iter_mut().enumerate() {
        let (_, mut lines) = {
            let (t, r) = tokio::sync::mpsc::unbounded_channel();
            (t, std::mem::replace(&mut p.lines, r))
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some((at, v)) = lines.recv().await {
                if tx.send((i, at, v)).is_err() {
                    return;
                }
            }
        });
    }
    rx
}

/// Messages each guestd node's NATS connection received so far, by node id, over every server.
async fn received(http: &reqwest::Client, monitors: &[u16]) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for port in monitors {
        let url = format!("http://127.0.0.1:{port}/connz?limit=10000");
        let Ok(r) = http.get(url).send().await else {
            continue;
        };
        let Ok(v) = r.json::<Value>().await else {
            continue;
        };
        for c in v["connections"].as_array().into_iter().flatten() {
            if let Some(node) = c["name"].as_str().and_then(|n| n.strip_prefix("guestd-")) {
                *out.entry(node.to_string()).or_default() += c["out_msgs"].as_u64().unwrap_or(0);
            }
        }
    }
    out
}

/// Every arm, node count and round; their runs and a summary.
pub async fn run(n: usize, exe: &std::path::Path, args: &super::Args) -> anyhow::Result<Value> {
    let mut arms = vec![("guestd", exe.to_path_buf())];
    if let Some(old) = &args.baseline {
        arms.push(("guestd-baseline", old.clone()));
    }
    let mut runs = Vec::new();
    for &nodes in &args.cluster_nodes {
        for round in 0..args.rounds.max(1) {
            for (arm, bin) in &arms {
                let chats = if args.per_node { n * nodes } else { n };
                eprintln!(
                    "cluster: {arm}, {nodes} nodes, {chats} chats, round {}",
                    round + 1
                );
                let mut r = run_arm(chats, nodes, bin, args).await?;
                r["arm"] = json!(arm);
                r["round"] = json!(round + 1);
                runs.push(r);
            }
        }
    }
    eprintln!(
        "\n{:<16} {:>5} {:>7} {:>14} {:>14} {:>16} {:>14}",
        "arm", "nodes", "chats", "KiB/chat node", "KiB/chat one", "recv/node/msg", "failover p99"
    );
    for r in &runs {
        eprintln!(
            "{:<16} {:>5} {:>7} {:>14.2} {:>14.2} {:>16.2} {:>11} ms",
            r["arm"].as_str().unwrap_or_default(),
            r["nodes"],
            r["chats"],
            r["cluster_kib_per_session_avg"].as_f64().unwrap_or(0.0),
            r["single_node_kib_per_session"].as_f64().unwrap_or(0.0),
            r["traffic"]["received_per_node_per_message"]
                .as_f64()
                .unwrap_or(0.0),
            r["failover_p99_ms"],
        );
    }
    Ok(json!({ "runs": runs }))
}

async fn run_arm(
    n: usize,
    nodes: usize,
    exe: &PathBuf,
    args: &super::Args,
) -> anyhow::Result<Value> {
    let cluster = nats::NatsCluster::start();
    let client = cluster.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let emu = Emu::start(exe, args, None).await?;
    let hb_ms = args.heartbeat.as_millis();
    let servers = format!(
        "[{}]",
        cluster
            .urls()
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut procs = Vec::new();
    for i in 0..nodes {
        let id = format!("n{}", i + 1);
        procs.push(Proc::spawn(node(exe, &id, &emu, &servers, hb_ms, true))?);
    }
    for p in procs.iter_mut() {
        p.ready(Duration::from_secs(90)).await?;
    }
    let base: Vec<u64> = procs.iter().map(|p| rss_kib(p.pid)).collect();
    let chats = super::create_chats(&emu, n).await?;
    let t0 = Instant::now();
    for (i, part) in chats.chunks(n.div_ceil(nodes)).enumerate() {
        attach(&mut procs[i], part).await?;
    }
    let mut rx = merge(&mut procs);
    // Which node runs which conversation: its `connected` line.
    let mut owner: HashMap<String, usize> = HashMap::new();
    while owner.len() < n {
        let (i, _, v) = tokio::time::timeout(Duration::from_secs(180), rx.recv())
            .await
            .with_context(|| format!("{} of {n} connected", owner.len()))?
            .context("stdout closed")?;
        match v["type"].as_str() {
            Some("connected") => {
                owner.insert(v["conversation_id"].as_str().unwrap_or_default().into(), i);
            }
            Some("command_error") => bail!("attach failed: {v}"),
            _ => {}
        }
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    // Settle, then memory.
    let quiet = args.heartbeat.max(Duration::from_secs(1)) * 2;
    while let Ok(Some(_)) = tokio::time::timeout(quiet, rx.recv()).await {}
    let held: Vec<usize> = (0..nodes)
        .map(|i| owner.values().filter(|o| **o == i).count())
        .collect();
    let per_session: Vec<f64> = (0..nodes)
        .map(|i| {
            (rss_kib(procs[i].pid).saturating_sub(base[i])) as f64 * 1024.0 / held[i].max(1) as f64
        })
        .collect();
    eprintln!(
        "cluster: {n} chats connected in {connect_secs:.1} s, held {held:?}, bytes/session {per_session:?}"
    );

    // What the sessions bucket holds per chat (every replica holds as much).
    let bucket = js
        .get_stream("KV_GUESTD_sessions")
        .await?
        .info()
        .await?
        .state
        .clone();
    let entry_bytes = bucket.bytes as f64 / bucket.messages.max(1) as f64;
    eprintln!(
        "sessions bucket: {} entries, {} bytes ({entry_bytes:.0} per entry)",
        bucket.messages, bucket.bytes
    );

    // Traffic: an agent joins a sample of chats, then sends each a message a second for a few
    // seconds; what each node receives from NATS meanwhile.
    let http = reqwest::Client::new();
    let sample: Vec<String> = owner.keys().take(600.min(n)).cloned().collect();
    let before = received(&http, &cluster.monitors).await;
    let t_traffic = Instant::now();
    // Chats the emulator made in bulk have an agent already: a refusal says so, nothing more.
    futures::stream::iter(sample.iter())
        .map(|c| emu.post_path(format!("conversations/{c}/agent/join"), json!({})))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let rounds = 5;
    for r in 0..rounds {
        let next = Instant::now() + Duration::from_secs(1);
        futures::stream::iter(sample.iter())
            .map(|c| {
                emu.post_path(
                    format!("conversations/{c}/agent/message"),
                    json!({ "body": format!("m{r}") }),
                )
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()?;
        tokio::time::sleep_until(next).await;
    }
    // Let the last writes land and reach every watch.
    while let Ok(Some(_)) = tokio::time::timeout(quiet, rx.recv()).await {}
    let traffic_secs = t_traffic.elapsed().as_secs_f64();
    let after = received(&http, &cluster.monitors).await;
    let got: Vec<u64> = (0..nodes)
        .map(|i| {
            let id = format!("n{}", i + 1);
            after.get(&id).copied().unwrap_or(0) - before.get(&id).copied().unwrap_or(0)
        })
        .collect();
    let messages = sample.len() * rounds;
    let per_message = got.iter().sum::<u64>() as f64 / nodes as f64 / messages.max(1) as f64;
    eprintln!(
        "traffic: {messages} agent messages to {} chats in {traffic_secs:.1} s; NATS messages received per node {got:?} ({per_message:.2} per node per agent message)",
        sample.len()
    );

    // Failover: kill -9 the busiest node.
    let victim = (0..nodes).max_by_key(|i| held[*i]).unwrap_or(0);
    let moving: HashSet<String> = owner
        .iter()
        .filter(|(_, o)| **o == victim)
        .map(|(c, _)| c.clone())
        .collect();
    let killed = wall_us();
    let _ = procs[victim].child.start_kill();
    let mut resumed: HashSet<String> = HashSet::new();
    let mut back: HashMap<String, u64> = HashMap::new();
    while back.len() < moving.len() {
        let (i, at, v) = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .with_context(|| format!("{} of {} moved", back.len(), moving.len()))?
            .context("stdout closed")?;
        if i == victim {
            continue;
        }
        let conv = v["conversation_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match v["type"].as_str() {
            Some("session_started") if v["mode"] == "resume" => {
                resumed.insert(conv);
            }
            Some("connected") | Some("reconnected") if resumed.contains(&conv) => {
                back.entry(conv.clone())
                    .or_insert(at.saturating_sub(killed));
                owner.insert(conv, i);
            }
            _ => {}
        }
    }
    let mut times: Vec<u64> = back.values().map(|us| us / 1000).collect();
    times.sort();
    eprintln!(
        "failover: {} chats moved; p50 {} ms, p99 {} ms, last {} ms",
        times.len(),
        pct(&times, 0.5),
        pct(&times, 0.99),
        times.last().copied().unwrap_or(0)
    );

    // Throughput into the stream: end every chat at once.
    let mut stream = js.get_stream("GUESTD_EVENTS").await?;
    let before = stream.info().await?.state.messages;
    let ids: Vec<String> = owner.keys().cloned().collect();
    let t_end = Instant::now();
    for batch in ids.chunks(5000) {
        emu.post("bulk/end", json!({ "ids": batch })).await?;
    }
    let mut ended = 0;
    let mut lines_out = 0u64;
    while ended < ids.len() {
        let (_, _, v) = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .with_context(|| format!("{ended} of {} ended", ids.len()))?
            .context("stdout closed")?;
        lines_out += 1;
        if v["type"] == "ended" {
            ended += 1;
        }
    }
    // An `ended` line is written after the stream acknowledged it: the stream holds them all now.
    let secs = t_end.elapsed().as_secs_f64();
    let after = stream.info().await?.state.messages;
    let into_stream = after.saturating_sub(before);
    eprintln!(
        "stream: {into_stream} events acknowledged in {secs:.2} s ({:.0}/s) while ending {} chats",
        into_stream as f64 / secs,
        ids.len()
    );
    drop(procs);

    // Single node next to it: one guestd without [cluster], as many chats as one cluster node held.
    let m = held[victim].max(1);
    let mut single = Proc::spawn(node(exe, "single", &emu, "", hb_ms, false))?;
    single.ready(Duration::from_secs(90)).await?;
    let base1 = rss_kib(single.pid);
    let chats1 = super::create_chats(&emu, m).await?;
    attach(&mut single, &chats1).await?;
    let mut up = 0;
    while up < m {
        let (_, v) = single.next(Duration::from_secs(120)).await?;
        if v["type"] == "connected" {
            up += 1;
        }
    }
    while let Ok(Ok(_)) = tokio::time::timeout(quiet, single.next(quiet * 2)).await {}
    let single_per = (rss_kib(single.pid).saturating_sub(base1)) as f64 * 1024.0 / m as f64;
    eprintln!("single node: {m} chats, {single_per:.0} bytes/session");

    let avg = per_session.iter().sum::<f64>() / nodes as f64;
    Ok(json!({
        "chats": n,
        "nodes": nodes,
        "sessions_bucket_entries": bucket.messages,
        "sessions_bucket_bytes_per_entry": entry_bytes,
        "traffic": {
            "chats": sample.len(),
            "agent_messages": messages,
            "secs": traffic_secs,
            "received_per_node": got,
            "received_per_node_per_message": per_message,
        },
        "nats_servers": 3,
        "replicas": 3,
        "lease": "6s", "renew": "2s", "fence_margin": "2s",
        "connect_secs": connect_secs,
        "held": held,
        "cluster_bytes_per_session": per_session,
        "cluster_kib_per_session_avg": avg / 1024.0,
        "single_node_chats": m,
        "single_node_kib_per_session": single_per / 1024.0,
        "failover_moved": times.len(),
        "failover_p50_ms": pct(&times, 0.5),
        "failover_p99_ms": pct(&times, 0.99),
        "failover_last_ms": times.last().copied().unwrap_or(0),
        "stream_events": into_stream,
        "stream_secs": secs,
        "stream_events_per_sec": into_stream as f64 / secs,
        "stdout_lines_during_end": lines_out,
    }))
}
