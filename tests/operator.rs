//! The operator's first hour (issue 24), with the real binary against the emulator: a `start`
//! the configuration cannot serve is refused by guestd itself; configuration and filter errors
//! are one clear line; no secret appears in any output; SIGHUP reloads without dropping a chat;
//! completions and the man page.

mod common;

use base64::Engine;
use common::*;
use guestd::emulator::EmulatorConfig;
use serde_json::{Value, json};
use std::time::Duration;

/// Run `guestd <args>` to its end: (exit code, stdout, stderr).
fn guestd(env: &[(String, String)], args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_guestd"))
        .args(args)
        .env_remove("GUESTD_CONFIG")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`guestd`] without blocking the runtime (the in-process emulator must go on answering).
async fn guestd_async(env: &[(String, String)], args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_guestd"))
        .args(args)
        .env_remove("GUESTD_CONFIG")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn chmod600(p: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn set(env: &mut Vec<(String, String)>, k: &str, v: &str) {
    env.retain(|(x, _)| x != k);
    env.push((k.into(), v.into()));
}

/// Wait for `needle` in the daemon's stderr after byte `from` (a log line has no event to
/// await: polled until the deadline).
async fn log_line(d: &Daemon, from: usize, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + wait();
    loop {
        let log = d.stderr();
        if let Some(line) = log
            .get(from..)
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains(needle))
        {
            return line.to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {needle:?} in stderr:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 24, friction 1: without organization and deployment ids, check-config and the start-up
/// log say `start` is not ready, and a `start` (stdin and HTTP) is refused by guestd with one
/// message naming both keys and their variables (409 `not_configured`), the platform never
/// asked. `attach` still works.
#[tokio::test]
async fn a_start_the_configuration_cannot_serve_is_refused_by_guestd_naming_every_key() {
    let emu = emulator(service_emu_cfg()).await;
    let mut env = with_http_any_port(fast_env(&emu), "127.0.0.1");
    env.retain(|(k, _)| !k.starts_with("GUESTD_GENESYS__ORGANIZATION_ID"));
    env.retain(|(k, _)| !k.starts_with("GUESTD_GENESYS__DEPLOYMENT_ID"));
    let both = [
        "genesys.organization_id (GUESTD_GENESYS__ORGANIZATION_ID)",
        "genesys.deployment_id (GUESTD_GENESYS__DEPLOYMENT_ID)",
    ];
    let (code, out, _) = guestd(&env, &["check-config"]);
    assert_eq!(code, 0);
    let line = out
        .lines()
        .find(|l| l.contains("start (guest chat)"))
        .unwrap_or_else(|| panic!("no readiness line:\n{out}"));
    assert!(line.contains("NOT READY"), "{line}");
    for k in both {
        assert!(line.contains(k), "{line}");
    }
    let attach = out
        .lines()
        .find(|l| l.contains("attach (guest chat)"))
        .unwrap_or_default();
    assert!(
        attach.contains("ready") && !attach.contains("NOT READY"),
        "{out}"
    );

    let mut d = Daemon::spawn(env, &[]);
    d.send(json!({"cmd": "start", "request_id": "s1", "queue": "Support", "display_name": "Ann"}))
        .await;
    let r = d.wait(|v| v["request_id"] == "s1").await;
    assert_eq!(r["type"], "command_error", "{r}");
    for k in both {
        assert!(r["error"].as_str().unwrap().contains(k), "{r}");
    }
    let base = d.http_base().await;
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/sessions"))
        .json(&json!({"queue": "Support", "display_name": "Ann"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "not_configured", "{body}");
    for k in both {
        assert!(body["error"].as_str().unwrap().contains(k), "{body}");
    }
    // Nothing reached the platform.
    assert!(
        !emu.requests()
            .iter()
            .any(|r| r.starts_with("POST /api/v2/webchat/guest/conversations")),
        "{:?}",
        emu.requests()
    );
    assert!(emu.conversation_ids().is_empty());
    // The start-up log said so before any command.
    let log = d.stderr();
    let warn = log
        .lines()
        .find(|l| l.contains("not ready") && l.contains("start (guest chat)"))
        .unwrap_or_else(|| panic!("no start-up readiness warning:\n{log}"));
    assert!(warn.contains("GUESTD_GENESYS__DEPLOYMENT_ID"), "{warn}");
    // attach needs neither id.
    let (conv, member, jwt, uri) = emu.bulk_create(1).remove(0);
    d.send(
        json!({"cmd": "attach", "request_id": "a1", "conversation_id": conv,
        "member_id": member, "jwt": jwt, "event_stream_uri": uri}),
    )
    .await;
    let r = d.wait(|v| v["request_id"] == "a1").await;
    assert_eq!(r["type"], "command_result", "{r}");
    finish_ok(d).await;
}

/// Issue 24, friction 5 (and 10's start-up line): configuration and filter errors are one line
/// naming the variable, with no backtrace even under RUST_BACKTRACE=1, exit 1.
#[test]
fn configuration_errors_are_one_line_without_a_backtrace() {
    let base = vec![
        ("RUST_BACKTRACE".to_string(), "1".to_string()),
        ("GUESTD_CONTROL__HTTP_LISTEN".to_string(), "".to_string()),
    ];
    // (environment, arguments, what the error says)
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<&'a str>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![("GUESTD_GENESYS_ORGANIZATION_ID", "o")],
            vec!["check-config"],
            "did you mean GUESTD_GENESYS__ORGANIZATION_ID",
        ),
        (
            vec![("GUESTD_GENESYS__ORGANISATION_ID", "o")],
            vec!["check-config"],
            "environment variable GUESTD_GENESYS__ORGANISATION_ID: genesys.organisation_id is not a configuration key; did you mean GUESTD_GENESYS__ORGANIZATION_ID",
        ),
        (
            vec![("GUESTD_SESSION__HEARTBEAT_TOLERANCE", "two")],
            vec!["check-config"],
            "expected u32",
        ),
        (
            vec![("RUST_LOG", "verbose")],
            vec!["check-config"],
            "RUST_LOG: `verbose` is neither a level",
        ),
        (
            vec![],
            vec!["--log-level", "loud", "check-config"],
            "--log-level: `loud` is neither a level",
        ),
        (
            vec![("GUESTD_LOG__LEVEL", "verbose")],
            vec!["check-config"],
            "log.level",
        ),
    ];
    for (extra, args, needle) in cases {
        let mut env = base.clone();
        for (k, v) in extra {
            set(&mut env, k, v);
        }
        let (code, _, err) = guestd(&env, &args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(err.starts_with("guestd: error: "), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(!err.to_lowercase().contains("backtrace"), "{err}");
    }
    // A numeric-looking value for a string key is the string; --log-level takes a level.
    let mut env = base.clone();
    set(&mut env, "GUESTD_GENESYS__ORGANIZATION_ID", "12345");
    let (code, out, err) = guestd(&env, &["--log-level", "debug", "check-config"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("organization_id = \"12345\""), "{out}");
}

/// Issue 24, friction 3: known secrets in the environment and files, a run with a guest chat
/// started, confirmed by the Platform API and ended, a Web Messaging session, `status` and
/// `check-config`: none of them appears in any stdout or stderr, raw or base64.
#[tokio::test]
async fn no_secret_appears_in_any_output() {
    let api_token = "apitok-7f3a9c51d2e84b06";
    let client_secret = "clientsecret-91b2c3d4e5f6";
    let seal_key = "5eal".repeat(16);
    let wm_token = format!("wmtok-{}", uuid::Uuid::new_v4());
    let emu = emulator(EmulatorConfig {
        platform_client_secret: client_secret.into(),
        ..service_emu_cfg()
    })
    .await;
    let dir = temp_dir("op");
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{api_token}\n")).unwrap();
    chmod600(&token_file);
    let mut env = with_platform(&emu, with_http_any_port(fast_env(&emu), "127.0.0.1"));
    set(&mut env, "GUESTD_PLATFORM__CLIENT_SECRET", client_secret);
    set(&mut env, "GUESTD_PLATFORM__CONFIRM_DELAY", "50ms");
    set(
        &mut env,
        "GUESTD_CONTROL__TOKEN_FILE",
        &token_file.display().to_string(),
    );
    set(&mut env, "GUESTD_CLUSTER_SEAL_KEY", &seal_key);
    set(&mut env, "GUESTD_WEB_MESSAGING__BASE_URL", &emu.base_url());
    set(&mut env, "GUESTD_WEB_MESSAGING__DEPLOYMENT_ID", "dep-1");
    set(&mut env, "RUST_LOG", "guestd=trace,info");
    let mut outputs = Vec::new();
    let (_, out, err) = guestd(&env, &["check-config"]);
    outputs.push(out + &err);
    // The control token given inline instead of in a file.
    let mut inline = env.clone();
    inline.retain(|(k, _)| k != "GUESTD_CONTROL__TOKEN_FILE");
    set(&mut inline, "GUESTD_CONTROL__TOKEN", api_token);
    let (_, out, err) = guestd(&inline, &["check-config"]);
    assert!(out.contains("token = \"<redacted>\""), "{out}");
    outputs.push(out + &err);

    let mut d = Daemon::spawn(env.clone(), &[]);
    let (s, c) = d.start("r1").await;
    d.wait_type(&s, "connected").await;
    let jwt = emu.jwt(&c).unwrap();
    emu.agent_join(&c).unwrap();
    d.wait_type(&s, "agent_connected").await;
    d.send(
        json!({"cmd": "start", "request_id": "w1", "backend": "web_messaging", "token": wm_token}),
    )
    .await;
    let r = d.wait(|v| v["request_id"] == "w1").await;
    assert_eq!(r["type"], "command_result", "{r}");
    let base = d.http_base().await;
    // Over HTTP with the token; `status` from the command line, with the chat's jwt.
    let r = reqwest::Client::new()
        .get(format!("{base}/v1/sessions"))
        .bearer_auth(api_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut status_env = env.clone();
    set(
        &mut status_env,
        "GUESTD_CONTROL__HTTP_LISTEN",
        base.trim_start_matches("http://"),
    );
    set(&mut status_env, "CHAT_JWT", &jwt);
    let (code, out, err) =
        guestd_async(&status_env, &["status", &c, "--jwt-env", "CHAT_JWT"]).await;
    assert_eq!(code, 0, "{out}{err}");
    outputs.push(out + &err);
    emu.agent_end(&c).unwrap();
    d.wait_type(&s, "ended").await;
    d.wait_type(&s, "end_confirmed").await;
    let (code, out, err) =
        guestd_async(&status_env, &["status", &c, "--jwt-env", "CHAT_JWT"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("\"alive\":false"), "{out}");
    outputs.push(out + &err);
    let d = finish_ok(d).await;
    outputs.push(d.stderr());
    outputs.push(
        d.seen
            .iter()
            .map(|v| v.to_string() + "\n")
            .collect::<String>(),
    );
    let all = outputs.concat();
    assert!(all.contains("guestd starting"), "the run logged");
    let b64 = base64::engine::general_purpose::STANDARD;
    for secret in [api_token, client_secret, &seal_key, &jwt, &wm_token] {
        for form in [
            secret.to_string(),
            b64.encode(secret),
            b64.encode(format!("emulator-client:{secret}")),
        ] {
            assert!(
                !all.contains(&form),
                "a secret ({}...) was printed",
                &secret[..6]
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 24, friction 4: SIGHUP re-reads the configuration. A new token file is applied (the
/// old token refused, the new one taken), a changed origin list too, a restart-only key is
/// named, the chat stays live; a configuration that does not validate is refused and the
/// daemon serves on with what it had. SIGHUP never ends the process.
#[tokio::test]
async fn sighup_reloads_the_token_and_keeps_every_chat() {
    let emu = emulator(service_emu_cfg()).await;
    let dir = temp_dir("op");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "old-token\n").unwrap();
    chmod600(&token_file);
    let config = dir.join("guestd.toml");
    let write_config = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                "[control]\ntoken_file = \"{}\"\n{extra}",
                token_file.display()
            ),
        )
        .unwrap()
    };
    write_config("");
    let env = with_http_any_port(fast_env(&emu), "127.0.0.1");
    let mut env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k != "GUESTD_SESSION__INACTIVITY_TIMEOUT")
        .collect();
    set(&mut env, "GUESTD_SESSION__INACTIVITY_TIMEOUT", "10m");
    let mut d = Daemon::spawn(env, &["--config", &config.display().to_string()]);
    let (s, c) = d.start("r1").await;
    d.wait_type(&s, "connected").await;
    emu.agent_join(&c).unwrap();
    d.wait_type(&s, "agent_connected").await;
    let base = d.http_base().await;
    let start_line = log_line(&d, 0, "guestd starting").await;
    for field in [
        "version=",
        "git_revision=",
        "guestd.toml",
        "journal=",
        "stdin=on",
        "http_listen=127.0.0.1:0",
    ] {
        assert!(start_line.contains(field), "{field}: {start_line}");
    }
    let http = reqwest::Client::new();
    let get = |token: &'static str| {
        let r = http
            .get(format!("{base}/v1/sessions/{s}"))
            .bearer_auth(token)
            .send();
        async move { r.await.unwrap().status().as_u16() }
    };
    assert_eq!(get("old-token").await, 200);
    assert_eq!(get("new-token").await, 401);

    std::fs::write(&token_file, "new-token\n").unwrap();
    write_config("allowed_origins = [\"https://console.example.com\"]\n[rest]\nmax_retries = 7\n");
    let from = d.stderr().len();
    signal(d.pid(), "HUP");
    let line = log_line(&d, from, "reloaded").await;
    assert!(
        line.contains("control.token_file") && line.contains("control.allowed_origins"),
        "{line}"
    );
    assert!(line.contains("needs_restart=rest.max_retries"), "{line}");
    assert!(!line.contains("new-token"), "{line}");
    assert_eq!(get("old-token").await, 401);
    assert_eq!(get("new-token").await, 200);
    let r = http
        .get(format!("{base}/v1/sessions"))
        .bearer_auth("new-token")
        .header("origin", "https://console.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the new origin is allowed");

    // A configuration that does not validate: refused, the old one kept.
    write_config("[rest]\nmax_concurrent = 0\n");
    let from = d.stderr().len();
    signal(d.pid(), "HUP");
    let line = log_line(&d, from, "reload refused").await;
    assert!(line.contains("rest.max_concurrent"), "{line}");
    assert_eq!(get("new-token").await, 200);
    // A valid configuration without the token: refused too (an API that had a token would
    // answer anyone), the token kept.
    std::fs::write(&config, "").unwrap();
    let from = d.stderr().len();
    signal(d.pid(), "HUP");
    let line = log_line(&d, from, "reload refused").await;
    assert!(
        line.contains("removing the token needs a restart"),
        "{line}"
    );
    assert_eq!(get("new-token").await, 200);
    assert_eq!(get("").await, 401);
    // The chat lived through both: still connected, no end, and it still carries messages.
    d.send(json!({"cmd": "get", "request_id": "g1", "session": s}))
        .await;
    let r = d.wait(|v| v["request_id"] == "g1").await;
    assert_eq!(r["type"], "command_result", "{r}");
    assert_eq!(r["result"]["state"], "connected", "{r}");
    assert_eq!(d.count(&s, "ended"), 0);
    emu.agent_end(&c).unwrap();
    assert_eq!(d.wait_type(&s, "ended").await["reason"], "agent_ended");
    finish_ok(d).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 24, friction 4: SIGHUP applies new Platform API credentials: with a wrong client secret
/// the first end cannot be confirmed; after the secret file is fixed and SIGHUP sent, the next
/// end is confirmed by the platform, and no chat was dropped on the way.
#[tokio::test]
async fn sighup_applies_new_platform_credentials() {
    let emu = emulator(EmulatorConfig {
        platform_client_secret: "right-secret".into(),
        ..service_emu_cfg()
    })
    .await;
    let dir = temp_dir("op");
    let secret_file = dir.join("platform-secret");
    std::fs::write(&secret_file, "wrong-secret\n").unwrap();
    chmod600(&secret_file);
    let mut env = with_platform(&emu, fast_env(&emu));
    env.retain(|(k, _)| k != "GUESTD_PLATFORM__CLIENT_SECRET");
    set(
        &mut env,
        "GUESTD_PLATFORM__CLIENT_SECRET_FILE",
        &secret_file.display().to_string(),
    );
    set(&mut env, "GUESTD_PLATFORM__CONFIRM_DELAY", "50ms");
    set(&mut env, "GUESTD_PLATFORM__CONFIRM_ATTEMPTS", "1");
    let mut d = Daemon::spawn(env, &[]);
    let (s1, c1) = d.start("r1").await;
    let (s2, c2) = d.start("r2").await;
    for (s, c) in [(&s1, &c1), (&s2, &c2)] {
        d.wait_type(s, "connected").await;
        emu.agent_join(c).unwrap();
        d.wait_type(s, "agent_connected").await;
    }
    emu.agent_end(&c1).unwrap();
    let e = d.wait_type(&s1, "end_confirmed").await;
    assert!(
        e["detail"].as_str().unwrap().contains("could not be asked"),
        "{e}"
    );
    std::fs::write(&secret_file, "right-secret\n").unwrap();
    let from = d.stderr().len();
    signal(d.pid(), "HUP");
    let line = log_line(&d, from, "reloaded").await;
    assert!(line.contains("platform credentials"), "{line}");
    assert_eq!(
        d.count(&s2, "ended"),
        0,
        "the second chat lived through the reload"
    );
    emu.agent_end(&c2).unwrap();
    let e = d.wait_type(&s2, "end_confirmed").await;
    assert!(
        !e["detail"].as_str().unwrap().contains("could not be asked")
            && !e["platform_end_time"].is_null(),
        "{e}"
    );
    let d = finish_ok(d).await;
    assert!(!d.stderr().contains("right-secret") && !d.stderr().contains("wrong-secret"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 24, friction 10: completions and the man page come from the CLI and name every
/// subcommand.
#[test]
fn completions_and_man_page_name_the_subcommands() {
    let subcommands = [
        "run",
        "emulator",
        "demo",
        "status",
        "check-config",
        "completions",
        "man",
    ];
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = guestd(&[], &["completions", shell]);
        assert_eq!(code, 0, "{err}");
        for s in subcommands {
            assert!(out.contains(s), "{shell} completions lack {s}");
        }
    }
    let (code, out, err) = guestd(&[], &["man"]);
    assert_eq!(code, 0, "{err}");
    let out = out.replace("\\-", "-");
    assert!(
        out.starts_with(".ie") || out.contains(".TH guestd 1"),
        "{out}"
    );
    for s in subcommands {
        assert!(out.contains(s), "the man page lacks {s}");
    }
    assert!(out.contains("--log-level"), "{out}");
}
