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

/// A plain HTTP/1.1 request on a fresh connection; (status, body).
async fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut req =
        reqwest::Client::new().request(method.parse().unwrap(), format!("http://{addr}{path}"));
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The path of the attack: the conversation id climbs out of `/api/v2/conversations/` to a
/// Platform API call of the attacker's choosing, made with the organisation's token.
const TRAVERSAL: &str = "..%2F..%2Fusers%2Fme%3Fexpand=authorization";

/// A conversation id that is not an id is refused as `invalid` (400) before guestd builds any
/// URL from it: the platform (here the emulator, which logs every request) hears nothing.
#[tokio::test]
async fn an_id_that_is_not_an_id_never_reaches_a_url() {
    let emu = emulator(quick()).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut d = Daemon::spawn(with_platform(&emu, with_http(fast_env(&emu), &addr)), &[]);
    started(&mut d).await;
    let (status, body) = http(
        &addr,
        "GET",
        &format!("/v1/conversations/{TRAVERSAL}/status"),
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"code\":\"invalid\""), "{body}");
    // The same through stdin, with a jwt (the guest API's path), and through attach.
    d.send(json!({"cmd": "status", "request_id": "s1", "conversation_id": "../../users/me?x=1", "jwt": "j"}))
        .await;
    let r = d.wait(|v| v["request_id"] == "s1").await;
    assert_eq!(r["type"], "command_error", "{r}");
    let good = "3f2a9c1d-7b4e-4c1a-9d2e-0123456789ab";
    for (conv, member) in [
        ("../../users/me", good),
        (good, "x/../../../users/me"),
        (good, ""),
    ] {
        let attach = json!({"conversation_id": conv, "member_id": member, "jwt": "j",
            "event_stream_uri": format!("{}/v2/stream/{good}", emu.base_url().replace("http", "ws"))});
        let (status, body) = http(
            &addr,
            "POST",
            "/v1/sessions/attach",
            Some(&attach.to_string()),
        )
        .await;
        assert_eq!(status, 400, "{conv} {member}: {body}");
        assert!(body.contains("\"code\":\"invalid\""), "{body}");
    }
    assert_eq!(
        emu.requests(),
        Vec::<String>::new(),
        "no request reached the platform"
    );
    // A well-formed id still gets its answer from the Platform API.
    let g = Guest::create(&emu).await;
    let (status, body) = http(
        &addr,
        "GET",
        &format!("/v1/conversations/{}/status", g.id),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"source\":\"platform\""), "{body}");
    finish_ok(d).await;
    emu.shutdown();
}
