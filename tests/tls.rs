//! TLS end to end: the emulator serves HTTPS and WSS with a certificate of a private CA; guestd
//! trusts it only when told to (`genesys.extra_ca_file`), and refuses it otherwise, for REST and
//! for the event stream alike.

mod common;

use common::*;
use guestd::emulator::EmulatorConfig;
use guestd::emulator::messaging::WmAdmin;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

struct Pki {
    cert: PathBuf,
    key: PathBuf,
}

fn pki() -> Pki {
    let dir = std::env::temp_dir().join(format!("guestd-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    let pki = Pki {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    pki
}

fn tls_emu_cfg(p: &Pki) -> EmulatorConfig {
    EmulatorConfig {
        heartbeat_interval: Duration::from_millis(200),
        reconnect_grace: Duration::from_secs(5),
        agent_join_delay: None,
        agent_alert_duration: Duration::from_millis(20),
        tls_cert_file: Some(p.cert.clone()),
        tls_key_file: Some(p.key.clone()),
        ..EmulatorConfig::default()
    }
}

#[tokio::test]
async fn https_and_wss_with_a_trusted_private_ca() {
    let p = pki();
    let emu = emulator(tls_emu_cfg(&p)).await;
    assert!(emu.base_url().starts_with("https://"));
    let mut env = fast_env(&emu);
    env.push((
        "GUESTD_GENESYS__EXTRA_CA_FILE".into(),
        p.cert.display().to_string(),
    ));
    let mut d = Daemon::spawn(env, &[]);
    let (s, c) = d.start("r1").await;
    d.wait_type(&s, "connected").await;
    emu.agent_join(&c).unwrap();
    d.wait_type(&s, "agent_connected").await;
    emu.agent_send(&c, "over TLS").unwrap();
    d.wait(|v| v["body"] == "over TLS").await;
    // A reset of the TLS connection: guestd reconnects over TLS and backfills.
    emu.drop_sockets(&c, true).unwrap();
    d.wait_type(&s, "reconnected").await;
    emu.agent_end(&c).unwrap();
    let e = d.wait_type(&s, "ended").await;
    assert_eq!(e["reason"], "agent_ended");
    assert!(
        emu.log()
            .iter()
            .filter(|l| l.conversation_id.as_deref() == Some(&c) && l.action == "connect")
            .count()
            >= 2
    );
    signal(d.pid(), "TERM");
    d.drain().await;
    assert!(d.child.wait().await.unwrap().success());
}

#[tokio::test]
async fn an_untrusted_certificate_is_refused_for_rest_and_stream() {
    let p = pki();
    let emu = emulator(tls_emu_cfg(&p)).await;
    let mut d = Daemon::spawn(fast_env(&emu), &[]);
    // REST: create fails with a certificate error, reported to the caller.
    d.send(json!({"cmd": "start", "request_id": "r1", "queue": "Support", "display_name": "x"}))
        .await;
    let r = d.wait(|v| v["request_id"] == "r1").await;
    assert_eq!(r["type"], "command_error", "{r}");
    let err = r["error"].as_str().unwrap().to_lowercase();
    assert!(
        err.contains("certificate") || err.contains("unknownissuer") || err.contains("transport"),
        "{err}"
    );
    assert!(
        !emu.log().iter().any(|l| l.action == "create"),
        "no request got through"
    );
    // Stream: a chat created elsewhere, attached: the websocket handshake is refused too.
    let g = Guest::create_tls(&emu, &p.cert).await;
    d.send(json!({"cmd": "attach", "request_id": "a1", "conversation_id": g.id, "member_id": g.member, "jwt": g.jwt, "event_stream_uri": g.uri})).await;
    let r = d.wait(|v| v["request_id"] == "a1").await;
    let s = r["result"]["session"].as_str().unwrap().to_string();
    d.wait_type(&s, "reconnecting").await;
    d.wait_type(&s, "reconnecting").await;
    assert!(
        !emu.log()
            .iter()
            .any(|l| l.conversation_id.as_deref() == Some(&g.id) && l.action == "connect")
    );
    assert_eq!(d.count(&s, "connected"), 0);
    signal(d.pid(), "TERM");
    d.drain().await;
    assert!(d.child.wait().await.unwrap().success());
    let logs = d.stderr().to_lowercase();
    assert!(
        logs.contains("certificate") || logs.contains("unknownissuer"),
        "the TLS failure is logged"
    );
}

/// Web Messaging over TLS: the session's socket (wss), the history call and config.json
/// (https) with the private CA trusted; a drop is backfilled over TLS. Without the CA the
/// session cannot be opened and ends with the refusal in its detail.
#[tokio::test]
async fn web_messaging_over_wss_and_https() {
    let p = pki();
    let emu = emulator(tls_emu_cfg(&p)).await;
    let mut env = fast_env(&emu);
    env.push(("GUESTD_WEB_MESSAGING__BASE_URL".into(), emu.base_url()));
    env.push(("GUESTD_WEB_MESSAGING__DEPLOYMENT_ID".into(), "dep-1".into()));
    env.push((
        "GUESTD_WEB_MESSAGING__FIRST_CONNECT_WINDOW".into(),
        "1s".into(),
    ));
    let mut trusted = env.clone();
    trusted.push((
        "GUESTD_GENESYS__EXTRA_CA_FILE".into(),
        p.cert.display().to_string(),
    ));
    let mut d = Daemon::spawn(trusted, &[]);
    let token = format!("tok-{}", uuid::Uuid::new_v4());
    d.send(json!({"cmd": "start", "request_id": "w1", "backend": "web_messaging", "token": token}))
        .await;
    let r = d.wait(|v| v["request_id"] == "w1").await;
    let s = r["result"]["session"].as_str().unwrap().to_string();
    d.wait_type(&s, "connected").await;
    assert_eq!(
        r["result"]["agent_end_visible"], true,
        "config.json read over https: {r}"
    );
    assert!(emu.messaging(&token, WmAdmin::Drop));
    assert!(emu.messaging(
        &token,
        WmAdmin::AgentText {
            text: "over TLS".into()
        }
    ));
    let m = d.wait(|v| v["body"] == "over TLS").await;
    assert_eq!(m["backfilled"], true, "history over https: {m}");
    assert!(emu.messaging(&token, WmAdmin::Disconnect));
    let e = d.wait_type(&s, "ended").await;
    assert_eq!(e["reason"], "conversation_disconnected");
    signal(d.pid(), "TERM");
    d.drain().await;
    assert!(d.child.wait().await.unwrap().success());

    // Not trusted: no socket, no session.
    let mut d = Daemon::spawn(env, &[]);
    d.send(json!({"cmd": "start", "request_id": "w2", "backend": "web_messaging", "token": "t2"}))
        .await;
    let r = d.wait(|v| v["request_id"] == "w2").await;
    let s = r["result"]["session"].as_str().unwrap().to_string();
    let e = d.wait_type(&s, "ended").await;
    assert_eq!(e["reason"], "reconnect_grace_expired", "{e}");
    assert_eq!(d.count(&s, "connected"), 0);
    assert!(
        d.stderr().contains("certificate")
            || d.seen.iter().any(|v| v["cause"]
                .as_str()
                .is_some_and(|c| c.contains("certificate"))),
        "the refusal names the certificate"
    );
    signal(d.pid(), "TERM");
    d.drain().await;
    assert!(d.child.wait().await.unwrap().success());
}
