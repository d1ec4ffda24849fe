//! A `guestd run` node of a cluster test: its own directory, its stdout (events) and stderr
//! (logs) in files there, HTTP on a port of its own, and the cluster settings the tests share
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
    pub http: u16,
}

impl Node {
    pub fn spawn(id: &str, emu: &Emulator, servers: &[String], extra: &[(&str, &str)]) -> Node {
        let dir =
            std::env::temp_dir().join(format!("guestd-cluster-{id}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        // A port picked and released (racy; see `free_port`): a node reads no stdin, so no
        // reply says its log line with the address it bound is written.
        let http = super::free_port();
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
            ("GUESTD_CONTROL__HTTP_LISTEN", &format!("127.0.0.1:{http}")),
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
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_guestd"))
            .arg("run")
            .current_dir(&dir)
            .envs(env)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout.jsonl")).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Node {
            id: id.to_string(),
            alive: true,
            child,
            dir,
            http,
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
    }

    /// SIGTERM and wait for the exit; its status.
    pub async fn stop(&mut self) -> Option<i32> {
        self.alive = false;
        signal(self.pid(), "TERM");
        tokio::time::timeout(LONG, self.child.wait())
            .await
            .expect("a node did not stop after SIGTERM")
            .unwrap()
            .code()
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
