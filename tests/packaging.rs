//! The container image and the systemd unit, run as they are shipped. No Docker engine and no
//! systemd run on the machines CI uses, so each test reads the settings the file gives (the
//! Dockerfile's `ENV` and `CMD`, the unit's `Environment=` and `ExecStart=`), runs the real binary
//! with them (paths moved into a temporary directory, port 8787 to a free one) and asserts what
//! an operator would see from outside. The image itself is linted by hadolint in `.ci/run`, the
//! unit rated by `systemd-analyze security`.

mod common;

use common::*;
use guestd::emulator::Emulator;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).expect(path)
}

/// The final stage of the Dockerfile: its `ENV` pairs and `CMD` arguments.
fn dockerfile_runtime() -> (BTreeMap<String, String>, Vec<String>) {
    let text = repo("Dockerfile");
    // Join continuation lines, keep the last stage only.
    let joined = text.replace("\\\n", " ");
    let last = joined
        .rsplit("\nFROM ")
        .next()
        .expect("a FROM line")
        .to_string();
    let mut env = BTreeMap::new();
    let mut cmd = Vec::new();
    for line in last.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("ENV ") {
            for pair in rest.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("ENV k=v");
                env.insert(k.to_string(), v.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("CMD ") {
            cmd = serde_json::from_str(rest).expect("CMD in exec form");
        }
    }
    (env, cmd)
}

/// A running guestd configured as the Dockerfile configures it.
struct Container {
    child: tokio::process::Child,
    stderr: PathBuf,
    dir: PathBuf,
    notify: tokio::net::UnixDatagram,
}

impl Container {
    async fn start(emu: &Emulator, token: Option<&str>) -> Container {
        let (env, cmd) = dockerfile_runtime();
        assert_eq!(cmd, ["run", "--log-format", "json"]);
        let dir = temp_dir("container");
        // The image's files, moved under `dir`; its config is the shipped one.
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/guestd.toml");
        assert_eq!(env["GUESTD_CONFIG"], "/etc/guestd/guestd.toml");
        let token_file = dir.join("guestd_token");
        if let Some(t) = token {
            std::fs::write(&token_file, format!("{t}\n")).unwrap();
        }
        let mut run = tokio::process::Command::new(env!("CARGO_BIN_EXE_guestd"));
        for (k, v) in &env {
            let v = match k.as_str() {
                "GUESTD_CONFIG" => config.display().to_string(),
                "GUESTD_JOURNAL__PATH" => dir.join("journal.jsonl").display().to_string(),
                "GUESTD_CONTROL__TOKEN_FILE" => token_file.display().to_string(),
                // Every interface, as in the image; a free port instead of 8787.
                "GUESTD_CONTROL__HTTP_LISTEN" => {
                    assert_eq!(v, "0.0.0.0:8787");
                    "0.0.0.0:0".into()
                }
                _ => v.clone(),
            };
            run.env(k, v);
        }
        // What `docker run -e ...` adds (README, "In a container").
        run.env("GUESTD_GENESYS__API_BASE", emu.base_url())
            .env("GUESTD_GENESYS__ORGANIZATION_ID", "org")
            .env("GUESTD_GENESYS__DEPLOYMENT_ID", "dep");
        let stderr = dir.join("stderr.log");
        let notify_path = dir.join("notify.sock");
        let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
        run.env("NOTIFY_SOCKET", &notify_path);
        run.args(&cmd)
            .current_dir(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .kill_on_drop(true);
        Container {
            child: run.spawn().unwrap(),
            stderr,
            dir,
            notify,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The port it listens on, from its log line, once it says READY=1 (systemd's readiness
    /// datagram, which guestd sends once the API listens), or None if it exits first.
    async fn port(&mut self) -> Option<u16> {
        let mut buf = [0u8; 64];
        tokio::select! {
            got = tokio::time::timeout(wait(), self.notify.recv(&mut buf)) => {
                let n = got.expect("READY=1 within the deadline").unwrap();
                assert_eq!(&buf[..n], b"READY=1");
            }
            _ = self.child.wait() => return None,
        }
        let log = self.stderr();
        let addr = logged_http_addr(&log)
            .unwrap_or_else(|| panic!("no \"HTTP API listening\" line:\n{log}"));
        let port = addr
            .strip_prefix("0.0.0.0:")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("not on every interface: {addr}"));
        Some(port)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `docker run` as README gives it: the API listens on every interface of the container, so
/// `-p 127.0.0.1:8787:8787` reaches it from the host (the request arrives naming
/// `127.0.0.1:8787`, as here); it answers commands only with the token; the health check's
/// request works without it; events go to stdout, JSON logs to stderr.
#[tokio::test]
async fn the_image_settings_serve_the_api_on_every_interface_with_a_token_required() {
    let emu = emulator(guestd::emulator::EmulatorConfig::default()).await;
    let token = "container-token-5f1c";
    let mut c = Container::start(&emu, Some(token)).await;
    let port = c
        .port()
        .await
        .unwrap_or_else(|| panic!("exited:\n{}", c.stderr()));
    let http = reqwest::Client::new();
    // HEALTHCHECK: curl -fsS http://127.0.0.1:8787/healthz
    let health = http
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let start = json!({"queue": "Support", "display_name": "Ann"});
    let refused = http
        .post(format!("http://127.0.0.1:{port}/v1/sessions"))
        .json(&start)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401, "no token, no command");
    let r = http
        .post(format!("http://127.0.0.1:{port}/v1/sessions"))
        .bearer_auth(token)
        .json(&start)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", c.stderr());
    let v: Value = r.json().await.unwrap();
    let conv = v["conversation_id"].as_str().unwrap().to_string();
    // Events on stdout, as `docker logs` shows them: the chat's first event names it.
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(c.child.stdout.take().unwrap()).lines();
    let first: Value = tokio::time::timeout(wait(), lines.next_line())
        .await
        .expect("an event within the deadline")
        .unwrap()
        .map(|l| serde_json::from_str(&l).unwrap())
        .expect("stdout open");
    assert_eq!(first["conversation_id"], conv.as_str(), "{first}");
    // The logs are JSON (CMD --log-format json), on stderr, and never show the token.
    let log = c.stderr();
    assert!(
        log.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "{log}"
    );
    assert!(!log.contains(token));
    signal(c.child.id().unwrap() as i32, "TERM");
    let st = tokio::time::timeout(wait(), c.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(st.success(), "{st:?}\n{}", c.stderr());
}

/// Without the token file the image's settings refuse to start, saying which file is missing:
/// an API on every interface never runs open by accident.
#[tokio::test]
async fn the_image_settings_refuse_to_start_without_the_token_file() {
    let emu = emulator(guestd::emulator::EmulatorConfig::default()).await;
    let mut c = Container::start(&emu, None).await;
    assert_eq!(c.port().await, None, "it served:\n{}", c.stderr());
    let st = tokio::time::timeout(wait(), c.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!st.success());
    let log = c.stderr();
    assert!(log.contains("guestd_token"), "{log}");
}

/// `.dockerignore` keeps the build context to what the Dockerfile copies.
#[test]
fn the_build_context_is_only_what_the_image_copies() {
    let ignore = repo(".dockerignore");
    let rules: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(rules.first(), Some(&"*"), "everything is out unless named");
    let docker = repo("Dockerfile");
    for line in docker
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        for src in &words[..words.len() - 1] {
            let src = src.trim_end_matches('/');
            // Kept if it, or a folder it is in, is named with `!`.
            let kept = src
                .split('/')
                .scan(String::new(), |path, part| {
                    if !path.is_empty() {
                        path.push('/');
                    }
                    path.push_str(part);
                    Some(path.clone())
                })
                .any(|p| {
                    rules.contains(&format!("!{p}").as_str())
                        || rules.contains(&format!("!{p}/").as_str())
                });
            assert!(
                kept,
                "the Dockerfile copies {src} but .dockerignore leaves it out"
            );
        }
    }
}

/// The unit's `Environment=` lines and `ExecStart=` arguments, run with `check-config`: the
/// configuration the unit gives guestd is valid (the token from the credentials directory, the
/// events file, the journal in the state directory).
#[tokio::test]
async fn the_systemd_units_settings_are_a_valid_configuration() {
    let unit = repo("config/guestd.service");
    let dir = temp_dir("unit");
    let creds = dir.join("credentials");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("token"), "unit-token\n").unwrap();
    let mut env: Vec<(String, String)> = Vec::new();
    let mut exec: Vec<String> = Vec::new();
    for line in unit.lines().map(str::trim) {
        if let Some(pair) = line.strip_prefix("Environment=") {
            let (k, v) = pair.split_once('=').expect("Environment=K=V");
            let v = v
                .replace("%d", &creds.display().to_string())
                .replace("/var/lib/guestd", &dir.display().to_string())
                .replace("/var/log/guestd", &dir.display().to_string());
            env.push((k.to_string(), v));
        } else if let Some(cmd) = line.strip_prefix("ExecStart=") {
            exec = cmd.split_whitespace().map(String::from).collect();
        }
    }
    for (want, why) in [
        ("Type=notify", "readiness"),
        ("GUESTD_EVENTS__PATH=", "events in a file of their own"),
        ("LoadCredential=token:", "the token handed over by systemd"),
    ] {
        assert!(unit.contains(want), "the unit has no {want} ({why})");
    }
    assert_eq!(exec[0], "/usr/local/bin/guestd");
    assert_eq!(exec[1], "run");
    let config_at = exec.iter().position(|a| a == "--config").unwrap();
    assert_eq!(exec[config_at + 1], "/etc/guestd/guestd.toml");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_guestd"))
        .args([
            "check-config",
            "--config",
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config/guestd.toml")
                .display()
                .to_string(),
        ])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("GUESTD_GENESYS__ORGANIZATION_ID", "org")
        .env("GUESTD_GENESYS__DEPLOYMENT_ID", "dep")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("events.jsonl"), "{stdout}");
    assert!(!stdout.contains("unit-token") && !stderr.contains("unit-token"));
    let _ = std::fs::remove_dir_all(&dir);
}
