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
    let mut env = with_http(fast_env(&emu), "0.0.0.0:0");
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
    let loopback = with_http(fast_env(&emu), "127.0.0.1:0");
    let mut with_token = with_http(fast_env(&emu), "0.0.0.0:0");
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
    let mut d = Daemon::spawn(
        with_platform(&emu, with_http(fast_env(&emu), "127.0.0.1:0")),
        &[],
    );
    started(&mut d).await;
    let addr = d.http_addr().await;
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

/// What a hostile server saw of one exchange: the bytes of its body it could write before
/// guestd hung up, and whether it was cut off.
struct Served {
    written: usize,
    cut_off: bool,
}

/// A tiny hostile HTTP server on loopback: answers one request with `status` and a body of
/// `total` bytes (`head` first, then filler), in chunks, without a Content-Length (chunked
/// framing would be kinder; this one ends the body by closing). Reports what it managed to
/// write.
async fn hostile_once(
    status: u16,
    head: &'static str,
    total: usize,
) -> (String, tokio::sync::oneshot::Receiver<Served>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client hung up before its request");
            req.extend_from_slice(&buf[..n]);
        }
        let reply = format!(
            "HTTP/1.1 {status} Whatever\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
        );
        tcp.write_all(reply.as_bytes()).await.unwrap();
        let mut written = 0;
        let mut cut_off = false;
        let filler = vec![b'A'; 64 * 1024];
        if tcp.write_all(head.as_bytes()).await.is_err() {
            cut_off = true;
        }
        written += head.len();
        while !cut_off && written < total {
            match tcp.write_all(&filler).await {
                Ok(()) => written += filler.len(),
                Err(_) => cut_off = true,
            }
        }
        let _ = tx.send(Served { written, cut_off });
    });
    (base, rx)
}

const HOSTILE_HEAD: &str = "\u{1b}[31mboom\r\nfake log line eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlc2lnbmF0dXJl ";

/// A server answering 500 (or 200) with 100 MB: guestd reads a bounded prefix, hangs up, and
/// its error is a short sanitized excerpt, not the body.
#[tokio::test]
async fn a_huge_reply_is_cut_and_never_echoed() {
    const TOTAL: usize = 100 << 20;
    for (status, rid) in [(500u16, "err"), (200, "ok")] {
        let (base, served) = hostile_once(status, HOSTILE_HEAD, TOTAL).await;
        let mut env = fast_env(&emulator(quick()).await);
        env.retain(|(k, _)| k != "GUESTD_GENESYS__API_BASE");
        env.push(("GUESTD_GENESYS__API_BASE".into(), base));
        env.push(("GUESTD_REST__MAX_RETRIES".into(), "0".into()));
        let mut d = Daemon::spawn(env, &[]);
        d.send(
            json!({"cmd": "start", "request_id": rid, "queue": "Support", "display_name": "Ann"}),
        )
        .await;
        let r = d.wait(|v| v["request_id"] == rid).await;
        assert_eq!(r["type"], "command_error", "{r}");
        let error = r["error"].as_str().unwrap();
        assert!(
            error.chars().count() <= 300,
            "{status}: {} chars",
            error.chars().count()
        );
        assert!(!error.contains("eyJ"), "{error}");
        assert!(!error.chars().any(char::is_control), "{error:?}");
        let served = served.await.unwrap();
        assert!(
            served.cut_off && served.written < 16 << 20,
            "{status}: guestd read {} bytes of {TOTAL}",
            served.written
        );
        let err = d.stderr();
        assert!(
            !err.contains("eyJhbGciOiJIUzI1NiJ9"),
            "no token in the logs"
        );
        finish_ok(d).await;
    }
}

/// An `attach` whose stream URL names a host outside the platform's (its API host, that host's
/// parent domain, `genesys.stream_hosts`) is refused as `invalid` before any connection: a
/// listener on 127.0.0.2 (the emulator is on 127.0.0.1) accepts nothing. The platform's own
/// host still works, and `genesys.stream_hosts` adds one.
#[tokio::test]
async fn a_stream_url_off_the_platform_is_refused_before_connecting() {
    use futures::FutureExt;
    // Two addresses, one world: chats alternate their eventStreamUri between them.
    let emu = guestd::emulator::Emulator::start_multi(
        quick(),
        &[
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.3:0".parse().unwrap(),
        ],
    )
    .await
    .unwrap();
    let foreign = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let foreign_port = foreign.local_addr().unwrap().port();
    let mut env = with_http(fast_env(&emu), "127.0.0.1:0");
    env.push((
        "GUESTD_GENESYS__STREAM_HOSTS".into(),
        r#"["127.0.0.3"]"#.into(),
    ));
    let mut d = Daemon::spawn(env, &[]);
    started(&mut d).await;
    let addr = d.http_addr().await;
    let on_first = Guest::create(&emu).await;
    let on_second = Guest::create(&emu).await;
    assert!(on_first.uri.contains("127.0.0.1:"), "{}", on_first.uri);
    assert!(on_second.uri.contains("127.0.0.3:"), "{}", on_second.uri);
    let attach = |g: &Guest, uri: String| {
        json!({"conversation_id": g.id, "member_id": g.member, "jwt": g.jwt, "event_stream_uri": uri})
            .to_string()
    };
    for uri in [
        format!("ws://127.0.0.2:{foreign_port}/v2/stream/{}", on_first.id),
        format!("ws://localhost:{foreign_port}/v2/stream/{}", on_first.id),
    ] {
        let (status, body) = http(
            &addr,
            "POST",
            "/v1/sessions/attach",
            Some(&attach(&on_first, uri.clone())),
        )
        .await;
        assert_eq!(status, 400, "{uri}: {body}");
        assert!(
            body.contains("\"code\":\"invalid\"") && body.contains("stream host"),
            "{body}"
        );
    }
    // The platform's host, and the one stream_hosts adds, work.
    for g in [&on_first, &on_second] {
        let (status, body) = http(
            &addr,
            "POST",
            "/v1/sessions/attach",
            Some(&attach(g, g.uri.clone())),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let session: serde_json::Value = serde_json::from_str(&body).unwrap();
        d.wait_type(session["session"].as_str().unwrap(), "connected")
            .await;
    }
    assert!(
        foreign.accept().now_or_never().is_none(),
        "guestd connected to the foreign host"
    );
    finish_ok(d).await;
    emu.shutdown();
}

/// A raw TCP connection to `addr` from the loopback address `from` (127.0.0.x: each is its own
/// peer to guestd).
async fn connect_from(from: &str, addr: &str) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    sock.connect(addr.parse().unwrap()).await.unwrap()
}

/// Send one request on `tcp` and read the whole answer until guestd closes the connection.
async fn request_on(mut tcp: tokio::net::TcpStream, req: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait(), tcp.read_to_end(&mut out))
        .await
        .expect("an answer in time");
    String::from_utf8_lossy(&out).into_owned()
}

/// Many connections trickling their bodies: each is closed (408) once the body timeout passes,
/// one peer cannot take more than its share, and while the pool is full `/healthz` still
/// answers at once (a probe slot) where other paths get 503. Bounds lowered by configuration
/// (`control.max_connections` 16, per peer 4, `control.body_timeout` 1 s) to keep it quick.
#[tokio::test]
async fn trickled_bodies_time_out_and_probes_answer_while_the_pool_is_full() {
    use tokio::io::AsyncWriteExt;
    const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
    let emu = emulator(quick()).await;
    let mut env = with_http(fast_env(&emu), "127.0.0.1:0");
    env.push(("GUESTD_CONTROL__MAX_CONNECTIONS".into(), "16".into()));
    env.push((
        "GUESTD_CONTROL__MAX_CONNECTIONS_PER_PEER".into(),
        "4".into(),
    ));
    env.push(("GUESTD_CONTROL__BODY_TIMEOUT".into(), "1s".into()));
    let mut d = Daemon::spawn(env, &[]);
    started(&mut d).await;
    let addr = d.http_addr().await;
    let head = format!(
        "POST /v1/sessions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
    );
    let t0 = std::time::Instant::now();
    // Four peers, four trickling connections each: the whole pool.
    let mut trickling = Vec::new();
    for peer in ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"] {
        for _ in 0..4 {
            let mut tcp = connect_from(peer, &addr).await;
            tcp.write_all(head.as_bytes()).await.unwrap();
            trickling.push(tokio::spawn(request_on(tcp, "\"")));
        }
    }
    // A fifth connection of a peer at its share, and a new peer while the pool is full: only
    // probes answer.
    let full = |path: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let start = full(
        "/v1/sessions",
        r#"{"queue":"Support","display_name":"Ann"}"#,
    );
    let r = request_on(connect_from("127.0.0.11", &addr).await, &start).await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.contains("too_many_connections"), "{r}");
    let r = request_on(connect_from("127.0.0.20", &addr).await, &start).await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    let probe_at = std::time::Instant::now();
    let r = request_on(
        connect_from("127.0.0.20", &addr).await,
        &format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
    )
    .await;
    let probe_took = probe_at.elapsed();
    assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("ok\n"), "{r}");
    // Answered while the pool was still full: no trickling connection had its 408 yet (read
    // from the connections, not from a clock a loaded machine stretches).
    assert!(
        trickling.iter().all(|t| !t.is_finished()),
        "the pool was full all along (healthz took {probe_took:?})"
    );
    // Every trickling connection: 408, then closed, after the body timeout and not long after.
    for t in trickling {
        let r = t.await.unwrap();
        assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    }
    let took = t0.elapsed();
    assert!(
        took >= BODY_TIMEOUT && took < BODY_TIMEOUT + scaled(std::time::Duration::from_secs(3)),
        "{took:?}"
    );
    finish_ok(d).await;
    emu.shutdown();
}
