//! A `guestd run` node of a cluster test: its own directory, its stdout (events) and stderr
//! (logs) in files there, HTTP on a port it binds itself (port 0, read back from its log), and
//! the cluster settings the tests share
//! (lease 10 s, renewal 1 s, fence margin 2 s, grace 30 s), each overridable.
#![allow(dead_code)]

use super::{fast_env, signal};
use guestd::emulator::{Emulator, EmulatorConfig};
use std::path::PathBuf;
use std::time::Duration;

/// Longest wait for anything in these tests.
pub const LONG: Duration = Duration::from_secs(90);
/// The HTTP API's token, also required of commands over NATS (`cluster.nats_commands`).
pub const TOKEN: &str = "cluster-test-api-token";
pub const KEY: &str = "5f0e6c0b3a2d4e1f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f";

pub struct Node {
    pub id: String,
    pub alive: bool,
    pub child: tokio::process::Child,
    pub dir: PathBuf,
    /// The HTTP API's port, once the node has logged it.
    http: tokio::sync::watch::Receiver<Option<u16>>,
    /// Copies the node's stderr into `stderr.log`, watching for the HTTP API's address.
    log: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    pub fn spawn(id: &str, emu: &Emulator, servers: &[String], extra: &[(&str, &str)]) -> Node {
        let dir =
            std::env::temp_dir().join(format!("guestd-cluster-{id}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut env = fast_env(emu);
        env.retain(|(k, _)| {
            !k.starts_with("GUESTD_SESSION__") && k != "GUESTD_CONTROL__HTTP_LISTEN"
        });
        let servers = format!(
            "[{}]",
            servers
                .iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        for (k, v) in [
            ("GUESTD_SESSION__HEARTBEAT_INTERVAL", "500ms"),
            ("GUESTD_SESSION__HEARTBEAT_TOLERANCE", "3"),
            ("GUESTD_SESSION__RECONNECT_GRACE", "30s"),
            ("GUESTD_SESSION__INACTIVITY_TIMEOUT", "10m"),
            ("GUESTD_SESSION__BACKOFF__INITIAL", "100ms"),
            ("GUESTD_SESSION__BACKOFF__MAX", "1s"),
            ("GUESTD_CONTROL__HTTP_LISTEN", "127.0.0.1:0"),
            ("GUESTD_CONTROL__STDIN", "false"),
            ("GUESTD_CLUSTER__SERVERS", &servers),
            ("GUESTD_CLUSTER__NODE_ID", id),
            // Longer than a JetStream leader election after a server dies (seen to take over
            // 4 s on this 2-core machine), or every such death would fence the nodes.
            ("GUESTD_CLUSTER__LEASE", "10s"),
            ("GUESTD_CLUSTER__RENEW", "1s"),
            ("GUESTD_CLUSTER__FENCE_MARGIN", "2s"),
            ("GUESTD_CLUSTER__REPLICAS", "3"),
            ("GUESTD_CLUSTER_SEAL_KEY", KEY),
            ("GUESTD_CLUSTER__NATS_COMMANDS", "true"),
            ("GUESTD_CONTROL__TOKEN", TOKEN),
            ("GUESTD_SHUTDOWN__DRAIN_TIMEOUT", "10s"),
            ("GUESTD_WEB_MESSAGING__BASE_URL", &emu.base_url()),
            ("GUESTD_WEB_MESSAGING__DEPLOYMENT_ID", "dep-1"),
            ("GUESTD_WEB_MESSAGING__PING_INTERVAL", "1s"),
            ("RUST_LOG", "guestd=info"),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        {
            env.retain(|(e, _)| e != k);
            env.push((k.to_string(), v.to_string()));
        }
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_guestd"))
            .arg("run")
            .current_dir(&dir)
            .envs(env)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout.jsonl")).unwrap())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // The node binds port 0 and logs the address ("HTTP API listening addr=..."): its
        // stderr is copied line by line into stderr.log, and the port read off on the way. (A
        // node reads no stdin, so there is no reply to await before reading the file.)
        let (port, http) = tokio::sync::watch::channel(None);
        let mut file = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = tokio::spawn(async move {
            use std::io::Write;
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(file, "{line}");
                if port.borrow().is_none() && line.contains("HTTP API listening") {
                    let p = line
                        .split("addr=")
                        .nth(1)
                        .and_then(|a| a.split_whitespace().next())
                        .and_then(|a| a.rsplit(':').next())
                        .and_then(|p| p.parse::<u16>().ok());
                    port.send_replace(p);
                }
            }
        });
        Node {
            id: id.to_string(),
            alive: true,
            child,
            dir,
            http,
            log: Some(log),
        }
    }

    /// The port of the node's HTTP API, once it listens.
    pub async fn http(&self) -> u16 {
        let mut rx = self.http.clone();
        match tokio::time::timeout(LONG, rx.wait_for(Option::is_some)).await {
            Ok(Ok(p)) => p.unwrap_or_default(),
            _ => panic!(
                "node {} logged no HTTP address; stderr:\n{}",
                self.id,
                self.stderr()
            ),
        }
    }

    /// Wait until everything the node wrote to stderr is in stderr.log (after it exited).
    async fn logged(&mut self) {
        if let Some(log) = self.log.take() {
            let _ = tokio::time::timeout(LONG, log).await;
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id().unwrap() as i32
    }

    pub async fn kill9(&mut self) {
        self.alive = false;
        signal(self.pid(), "KILL");
        let _ = self.child.wait().await;
        self.logged().await;
    }

    /// SIGTERM and wait for the exit; its status.
    pub async fn stop(&mut self) -> Option<i32> {
        self.alive = false;
        signal(self.pid(), "TERM");
        let code = tokio::time::timeout(LONG, self.child.wait())
            .await
            .expect("a node did not stop after SIGTERM")
            .unwrap()
            .code();
        self.logged().await;
        code
    }
}

/// The emulator the cluster tests run against: heartbeats every 500 ms, a 30 s grace, the
/// no-activity rule out of the way, agents that join and connect on command.
pub fn cluster_emu_cfg() -> EmulatorConfig {
    EmulatorConfig {
        heartbeat_interval: Duration::from_millis(500),
        reconnect_grace: Duration::from_secs(30),
        inactivity_timeout: Duration::from_secs(600),
        agent_join_delay: None,
        agent_alert_duration: Duration::from_millis(20),
        ..EmulatorConfig::default()
    }
}
