//! Issue 28, the control API and outside input: what an attacker found, each as a test against
//! the real binary and the real emulator over real sockets.

mod common;

use common::*;
use serde_json::json;

/// `env` with the HTTP API on `listen`.
fn with_http(mut env: Vec<(String, String)>, listen: &str) -> Vec<(String, String)> {
    env.retain(|(k, _)| k != "GUESTD_CONTROL__HTTP_LISTEN");
    env.push(("GUESTD_CONTROL__HTTP_LISTEN".into(), listen.into()));
    env
}

/// Wait until guestd has started (its first stdin command answers: by then every start-up log
/// line is written).
async fn started(d: &mut Daemon) {
    d.send(json!({"cmd": "list", "request_id": "up"})).await;
    let r = d.wait(|v| v["request_id"] == "up").await;
    assert_eq!(r["type"], "command_result", "{r}");
}

const NO_TOKEN_WARNING: &str = "the HTTP API has no token";

/// An API open beyond loopback without a token says so at start-up, as a WARN line.
#[tokio::test]
async fn an_api_without_a_token_off_loopback_is_warned_about() {
    let emu = emulator(quick()).await;
    let mut env = with_http(fast_env(&emu), &format!("0.0.0.0:{}", free_port()));
    env.push(("GUESTD_CONTROL__ALLOW_NON_LOOPBACK".into(), "true".into()));
    let mut d = Daemon::spawn(env, &[]);
    started(&mut d).await;
    let err = d.stderr();
    let line = err
        .lines()
        .find(|l| l.contains(NO_TOKEN_WARNING))
        .unwrap_or_else(|| panic!("no warning in stderr:\n{err}"));
    assert!(line.contains("WARN"), "{line}");
    finish_ok(d).await;
    emu.shutdown();
}

/// On loopback, or with a token, there is nothing to warn about.
#[tokio::test]
async fn an_api_on_loopback_or_with_a_token_is_not_warned_about() {
    let emu = emulator(quick()).await;
    let loopback = with_http(fast_env(&emu), &format!("127.0.0.1:{}", free_port()));
    let mut with_token = with_http(fast_env(&emu), &format!("0.0.0.0:{}", free_port()));
    with_token.push(("GUESTD_CONTROL__ALLOW_NON_LOOPBACK".into(), "true".into()));
    with_token.push(("GUESTD_CONTROL__TOKEN".into(), "t0ken-for-the-test".into()));
    for env in [loopback, with_token] {
        let mut d = Daemon::spawn(env, &[]);
        started(&mut d).await;
        let err = d.stderr();
        assert!(err.contains("HTTP API listening"), "{err}");
        assert!(!err.contains(NO_TOKEN_WARNING), "{err}");
        finish_ok(d).await;
    }
    emu.shutdown();
}
