//! The seam's proof (issue 26): a backend that is not Genesys's, written here against guestd's
//! library alone and registered through `session::Backend`, runs through the supervisor, the
//! HTTP control API, a journal restart and a cluster takeover, with nothing outside this file
//! knowing it exists.
//!
//! Its chats ("ticks"): a loopback websocket that sends `tick` frames and then `end`; the
//! session counts ticks and reports `ended` (`server_ended`) at the `end` frame, or
//! `guest_left` when told to leave. The backend is the first part of this file (the module
//! `ticks`, about 180 lines); the tests follow.

mod common;

mod ticks {
    use futures::{FutureExt, SinkExt, StreamExt, future::BoxFuture};
    use guestd::events::{EndReason, EventKind};
    use guestd::journal::Recovered;
    use guestd::session::run::{emit, next_frame};
    use guestd::session::{
        Args, Backend, CommandError, Done, Launch, Mailbox, Open, OpenError, SessionCmd,
        SessionCtx, SessionHandle, SessionView,
    };
    use std::sync::Arc;
    use tokio_tungstenite::tungstenite::Message;

    pub const NAME: &str = "ticks";

    /// `start`/`attach` arguments: the chat's key and its socket (loopback only).
    #[derive(serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct A {
        key: String,
        url: String,
    }

    pub struct Ticks;

    impl Backend for Ticks {
        fn name(&self) -> &'static str {
            NAME
        }
        fn prepare(
            &self,
            _: &SessionCtx,
            open: Open,
            args: &mut Args,
        ) -> Result<Option<String>, String> {
            let a: A = args.parse(open)?;
            if !a.url.starts_with("ws://127.0.0.1:") {
                return Err(format!(
                    "{}: ticks only knows loopback sockets",
                    open.name()
                ));
            }
            Ok(Some(a.key))
        }
        fn open(
            &self,
            _: &Arc<SessionCtx>,
            open: Open,
            args: Args,
        ) -> BoxFuture<'static, Result<Launch, OpenError>> {
            let a = args.parse::<A>(open).map_err(OpenError::Invalid);
            async move { a.map(launch) }.boxed()
        }
        fn resume(
            &self,
            _: &Arc<SessionCtx>,
            r: Recovered,
        ) -> BoxFuture<'static, Result<Launch, OpenError>> {
            let a = serde_json::from_value::<A>(r.record.state)
                .map_err(|e| OpenError::Invalid(e.to_string()));
            async move { a.map(launch) }.boxed()
        }
    }

    fn launch(a: A) -> Launch {
        Launch {
            conversation_id: a.key.clone(),
            member_id: "guest".into(),
            record: serde_json::to_value(&a).unwrap(),
            abandon: None,
            spawn: Box::new(move |ctx, id| {
                let (handle, mailbox) = SessionHandle::new(&id, &a.key);
                let view = SessionView::new(&id, &a.key, "guest", "connecting", NAME);
                tokio::spawn(run(ctx, mailbox, id, a));
                (handle, view)
            }),
        }
    }

    /// One session: connect, count ticks, end at `end` (or a leave); on shutdown or when
    /// relinquished, stop without ending (the next process, or node, picks it up).
    async fn run(ctx: Arc<SessionCtx>, mailbox: Arc<Mailbox>, id: String, a: A) {
        let epoch = ctx.epoch();
        let mut ws = ctx.connector.connect_to(&a.url, None).await.ok();
        let mut ticks = 0u64;
        let (mut state, mut end) = ("connected", None);
        if ws.is_some() {
            emit(&ctx, &id, &a.key, EventKind::Connected).await;
        } else {
            end = Some((EndReason::ConnectionClosed, "could not connect".to_string()));
        }
        while end.is_none() {
            tokio::select! {
                _ = ctx.cancel.cancelled() => break,
                cmd = mailbox.recv() => match *cmd {
                    SessionCmd::Get { reply } => {
                        let _ = reply.send(SessionView { last_message_id: Some(format!("tick {ticks}")), ..SessionView::new(&id, &a.key, "guest", state, NAME) });
                    }
                    SessionCmd::Leave { reply } => {
                        let _ = reply.send(ctx.journal.leaving(&id).await.map(|_| Done::Leaving { leaving: true }).map_err(|e| CommandError::Journal(e.0)));
                        end = Some((EndReason::GuestLeft, "left on request".into()));
                    }
                    SessionCmd::Send { reply, .. } | SessionCmd::Typing { reply } => {
                        let _ = reply.send(Err(CommandError::Unsupported("ticks chats carry no messages".into())));
                    }
                    SessionCmd::StartNew { reply } => {
                        let _ = reply.send(Err(CommandError::Unsupported("ticks chats never reopen".into())));
                    }
                    SessionCmd::Relinquish => {
                        ctx.journal.forget(&id);
                        break;
                    }
                },
                f = next_frame(&mut ws) => match f {
                    Some(Ok(Message::Text(t))) if t.as_str() == "end" => end = Some((EndReason::ServerEnded, format!("end after {ticks} ticks"))),
                    Some(Ok(Message::Text(_))) => ticks += 1,
                    Some(Ok(_)) => {}
                    _ => { ws = None; state = "lost"; end = Some((EndReason::ConnectionClosed, "socket lost".into())) }
                },
            }
        }
        if let Some((reason, detail)) = end {
            if ctx.may_act(epoch) {
                let kind = EventKind::Ended {
                    reason,
                    duration_ms: 0,
                    detail,
                    extra: Default::default(),
                };
                emit(&ctx, &id, &a.key, kind).await;
            }
        }
        if let Some(mut w) = ws {
            let _ = w.close().await;
        }
        mailbox.close();
        let _ = ctx.done.send(id);
    }

    /// The chats' server: each connection gets `tick` frames, and `end` once it has sent
    /// `min_ticks` and `go` is true. The number of connections so far is in `connections`.
    pub struct Server {
        pub url: String,
        pub go: tokio::sync::watch::Sender<bool>,
        pub connections: tokio::sync::watch::Receiver<usize>,
    }

    pub async fn server(min_ticks: usize, go: bool) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ticks", listener.local_addr().unwrap());
        let (go_tx, go_rx) = tokio::sync::watch::channel(go);
        let (count_tx, connections) = tokio::sync::watch::channel(0usize);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count_tx.send_modify(|n| *n += 1);
                let mut go = go_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    let mut every = tokio::time::interval(std::time::Duration::from_millis(20));
                    for sent in 0.. {
                        if sent >= min_ticks && *go.borrow_and_update() {
                            let _ = ws.send(Message::Text("end".into())).await;
                            while ws.next().await.is_some() {}
                            return;
                        }
                        tokio::select! {
                            _ = every.tick() => if ws.send(Message::Text("tick".into())).await.is_err() { return },
                            _ = go.changed() => {}
                            m = ws.next() => if !matches!(m, Some(Ok(_))) { return },
                        }
                    }
                });
            }
        });
        Server {
            url,
            go: go_tx,
            connections,
        }
    }
}

use common::{temp_dir, wait};
use guestd::config::Config;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

/// A guestd in this process, with the ticks backend registered beside the configured ones;
/// its event lines come out on the receiver.
async fn daemon(cfg: Config) -> (guestd::daemon::Running, mpsc::UnboundedReceiver<Value>) {
    let (client, server) = tokio::io::duplex(1 << 16);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(server).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            let _ = tx.send(serde_json::from_str(&l).unwrap());
        }
    });
    let sink = guestd::events::WriterSink(client);
    let extra: Vec<Arc<dyn guestd::session::Backend>> = vec![Arc::new(ticks::Ticks)];
    let running = guestd::daemon::start_with(cfg, sink, None::<tokio::io::Empty>, extra)
        .await
        .unwrap();
    (running, rx)
}

fn config(http: bool) -> Config {
    let mut cfg = guestd::demo::fast_config("http://127.0.0.1:9");
    if http {
        cfg.control.http_listen = "127.0.0.1:0".into();
    }
    cfg
}

/// The next event of `session` whose type is `ty`, every event of it before that in `seen`.
async fn next(rx: &mut mpsc::UnboundedReceiver<Value>, ty: &str, seen: &mut Vec<Value>) -> Value {
    tokio::time::timeout(wait(), async {
        loop {
            let v = rx.recv().await.expect("the event stream ended");
            seen.push(v.clone());
            if v["type"] == ty {
                return v;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {ty} event; saw {seen:#?}"))
}

fn ended(seen: &[Value]) -> Vec<&Value> {
    seen.iter().filter(|v| v["type"] == "ended").collect()
}

/// A ticks chat started by a `start` command run through control, as stdin would; its
/// session id.
async fn start(d: &guestd::daemon::Running, key: &str, url: &str) -> Value {
    let cmd = guestd::control::parse_command(
        "start",
        json!({"backend": "ticks", "key": key, "url": url}),
    )
    .unwrap();
    let view = guestd::control::execute(&d.sup, cmd).await.unwrap();
    serde_json::to_value(&view).unwrap()["session"].clone()
}

/// Let the server end the chat: `session`'s `ended` (`server_ended`) must come from `d`; then
/// `d` shuts down, and every event it wrote is in `seen`.
async fn end_on_server(
    srv: &ticks::Server,
    d: guestd::daemon::Running,
    mut rx: mpsc::UnboundedReceiver<Value>,
    session: &Value,
    seen: &mut Vec<Value>,
) {
    srv.go.send_replace(true);
    let end = next(&mut rx, "ended", seen).await;
    assert_eq!(
        (&end["session"], end["reason"].as_str()),
        (session, Some("server_ended"))
    );
    d.shutdown().await;
    while let Ok(v) = rx.try_recv() {
        seen.push(v);
    }
}

/// Start, get, list, a refused send, and a leave, over the HTTP API: the supervisor and control
/// run a backend they were never told about, and its chat ends once, for the reason it gives.
#[tokio::test]
async fn a_backend_from_outside_the_crate_answers_the_control_api_and_ends_once() {
    let srv = ticks::server(usize::MAX, false).await;
    let (d, mut rx) = daemon(config(true)).await;
    let api = format!("http://{}/v1", d.http_addr.unwrap());
    let http = reqwest::Client::new();
    let started = http
        .post(format!("{api}/sessions"))
        .json(&json!({"backend": "ticks", "key": "t-1", "url": srv.url}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 201);
    let view: Value = started.json().await.unwrap();
    assert_eq!(
        (view["backend"].as_str(), view["conversation_id"].as_str()),
        (Some("ticks"), Some("t-1"))
    );
    let mut seen = Vec::new();
    next(&mut rx, "connected", &mut seen).await;
    let got: Value = http
        .get(format!("{api}/sessions/t-1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (got["state"].as_str(), got["session"].clone()),
        (Some("connected"), view["session"].clone())
    );
    let list: Value = http
        .get(format!("{api}/sessions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["sessions"].as_array().map(Vec::len), Some(1));
    let send = http
        .post(format!("{api}/sessions/t-1/messages"))
        .json(&json!({"body": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        send.status(),
        400,
        "a backend refuses what it has no use for"
    );
    let again = http
        .post(format!("{api}/sessions"))
        .json(&json!({"backend": "ticks", "key": "t-1", "url": srv.url}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.status(),
        409,
        "one session per key, whatever the backend"
    );
    let bad = http
        .post(format!("{api}/sessions"))
        .json(&json!({"backend": "ticks", "key": "t-2", "url": "ws://10.0.0.1:1/x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400, "the backend's own checks answer");
    let left = http
        .delete(format!("{api}/sessions/t-1"))
        .send()
        .await
        .unwrap();
    assert!(left.status().is_success());
    let end = next(&mut rx, "ended", &mut seen).await;
    assert_eq!(
        (end["reason"].as_str(), end["session"].clone()),
        (Some("guest_left"), view["session"].clone())
    );
    d.shutdown().await;
    while let Ok(v) = rx.try_recv() {
        seen.push(v);
    }
    assert_eq!(ended(&seen).len(), 1, "{seen:#?}");
}

/// A restart: the session's own record comes back through `Backend::resume` (same session id,
/// `resume` mode, a second connection), and the chat ends once, after the restart.
#[tokio::test]
async fn a_journaled_chat_of_the_backend_is_picked_up_after_a_restart_and_ends_once() {
    let srv = ticks::server(3, false).await;
    let dir = temp_dir("seam-journal");
    let mut cfg = config(false);
    cfg.journal.enabled = true;
    cfg.journal.path = dir.join("journal.jsonl");
    let (d, mut rx) = daemon(cfg.clone()).await;
    let session = start(&d, "t-9", &srv.url).await;
    let mut first = Vec::new();
    next(&mut rx, "connected", &mut first).await;
    d.shutdown().await;
    let (d, mut rx) = daemon(cfg).await;
    let mut second = Vec::new();
    let resumed = next(&mut rx, "session_started", &mut second).await;
    assert_eq!(
        (resumed["session"].clone(), resumed["mode"].as_str()),
        (session.clone(), Some("resume"))
    );
    next(&mut rx, "connected", &mut second).await;
    assert_eq!(*srv.connections.borrow(), 2);
    end_on_server(&srv, d, rx, &session, &mut second).await;
    assert_eq!(
        ended(&first).len() + ended(&second).len(),
        1,
        "{first:#?} {second:#?}"
    );
}

/// A cluster of two nodes on one NATS server: the chat of the node that leaves is taken by the
/// other through the backend's own record (sealed in the sessions bucket), and ends once there.
#[tokio::test]
async fn a_chat_of_the_backend_moves_to_another_node_and_ends_once() {
    let nats = common::nats::NatsServer::start("", &[]).await;
    let srv = ticks::server(3, false).await;
    let dir = temp_dir("seam-cluster");
    let key_file = dir.join("seal.key");
    std::fs::write(
        &key_file,
        "5f0e6c0b3a2d4e1f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f",
    )
    .unwrap();
    let node = |id: &str| {
        let mut cfg = config(false);
        cfg.cluster.servers = vec![format!("nats://127.0.0.1:{}", nats.port)];
        cfg.cluster.node_id = id.into();
        cfg.cluster.prefix = format!("seam{}", uuid::Uuid::new_v4().simple());
        cfg.cluster.replicas = 1;
        cfg.cluster.lease = Duration::from_secs(4);
        cfg.cluster.renew = Duration::from_millis(500);
        cfg.cluster.fence_margin = Duration::from_secs(1);
        cfg.cluster.seal_key_file = Some(key_file.clone());
        cfg
    };
    let a = node("a");
    let mut b = node("b");
    b.cluster.prefix = a.cluster.prefix.clone();
    let (da, mut rxa) = daemon(a).await;
    let session = start(&da, "t-c", &srv.url).await;
    let mut on_a = Vec::new();
    next(&mut rxa, "connected", &mut on_a).await;
    let (db, mut rxb) = daemon(b).await;
    da.shutdown().await;
    let mut on_b = Vec::new();
    let taken = next(&mut rxb, "session_started", &mut on_b).await;
    assert_eq!(taken["session"], session, "node b took node a's chat");
    next(&mut rxb, "connected", &mut on_b).await;
    end_on_server(&srv, db, rxb, &session, &mut on_b).await;
    while let Ok(v) = rxa.try_recv() {
        on_a.push(v);
    }
    assert_eq!(
        ended(&on_a).len() + ended(&on_b).len(),
        1,
        "{on_a:#?} {on_b:#?}"
    );
}
