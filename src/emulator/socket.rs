//! One task per emulator websocket: heartbeats, pong replies, and the socket faults.

use super::Shared;
use super::world::SocketCmd;
use crate::backends::guest_chat::protocol::{self as p, TOPIC_SOCKET_CLOSING};
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

pub(crate) async fn run(
    sh: Arc<Shared>,
    conv: String,
    sock: u64,
    on_upgrade: hyper::upgrade::OnUpgrade,
    rx: mpsc::UnboundedReceiver<SocketCmd>,
) {
    let why = match on_upgrade.await {
        Ok(upgraded) => match upgraded.downcast::<TokioIo<EmuStream>>() {
            Ok(parts) if parts.read_buf.is_empty() => {
                let cfg = WebSocketConfig::default()
                    .read_buffer_size(4096)
                    .write_buffer_size(0)
                    .max_message_size(Some(sh.cfg.max_client_frame))
                    .max_frame_size(Some(sh.cfg.max_client_frame));
                let ws = WebSocketStream::from_raw_socket(
                    parts.io.into_inner(),
                    Role::Server,
                    Some(cfg),
                )
                .await;
                serve(&sh, &conv, sock, ws, rx).await
            }
            _ => "upgrade did not yield the emulator's stream",
        },
        Err(_) => "upgrade failed",
    };
    sh.world().socket_lost(&conv, sock, true, why);
}

async fn serve(
    sh: &Shared,
    conv: &str,
    sock: u64,
    mut ws: WebSocketStream<EmuStream>,
    mut rx: mpsc::UnboundedReceiver<SocketCmd>,
) -> &'static str {
    let every = sh.cfg.heartbeat_interval;
    let mut hb = tokio::time::interval_at(Instant::now() + every, every);
    let heartbeat: Utf8Bytes = p::heartbeat_frame().into();
    let pong: Utf8Bytes = p::pong_frame().into();
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let mut close_at = far;
    let mut half_open = false;
    loop {
        tokio::select! {
            _ = sh.cancel.cancelled() => {
                let frame = CloseFrame { code: 1001u16.into(), reason: "emulator stopping".into() };
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(Some(frame))).await;
                return "emulator stopped";
            }
            cmd = rx.recv() => match cmd {
                None => return "emulator stopped",
                Some(SocketCmd::Text(t)) => {
                    if !half_open && ws.send(Message::Text(t)).await.is_err() {
                        return "write failed";
                    }
                }
                Some(SocketCmd::Close(code)) => {
                    let frame = CloseFrame { code: code.into(), reason: "".into() };
                    close_and_drain(sh, &mut ws, frame).await;
                    return "closed by server";
                }
                Some(SocketCmd::Reset) => {
                    // SO_LINGER 0 turns the close of the fd into a RST: no close frame, no FIN.
                    if let Err(e) = socket_reset(tcp(ws.get_ref())) {
                        tracing::warn!(error = %e, "could not set SO_LINGER for a reset");
                    }
                    return "reset by server";
                }
                Some(SocketCmd::HalfOpen) => {
                    half_open = true;
                    // Keep the TCP connection open but silent until the chat ends or a long bound.
                    close_at = Instant::now() + sh.cfg.reconnect_grace + Duration::from_secs(60);
                    // The platform counts a silent socket as lost: the grace window starts now.
                    sh.world().socket_lost(conv, sock, false, "half-open");
                }
                Some(SocketCmd::PingFlood(span)) => {
                    let until = Instant::now() + span;
                    let mut sent = 0u64;
                    while Instant::now() < until {
                        let ping = Message::Ping(bytes::Bytes::from_static(b"flood"));
                        if ws.feed(ping).await.is_err() {
                            return "write failed";
                        }
                        sent += 1;
                        if sent % 256 == 0 {
                            if ws.flush().await.is_err() {
                                return "write failed";
                            }
                            tokio::task::yield_now().await;
                        }
                    }
                    if ws.flush().await.is_err() {
                        return "write failed";
                    }
                    sh.world().record(Some(conv), "ping_flood", None, sent.to_string());
                }
                Some(SocketCmd::Closing) => {
                    let t = p::encode_envelope(TOPIC_SOCKET_CLOSING, serde_json::json!({}), None);
                    if ws.send(Message::Text(t.into())).await.is_err() {
                        return "write failed";
                    }
                    close_at = Instant::now() + sh.cfg.socket_closing_delay;
                }
            },
            _ = hb.tick(), if !half_open => {
                if ws.send(Message::Text(heartbeat.clone())).await.is_err() {
                    return "write failed";
                }
                sh.heartbeats.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            _ = tokio::time::sleep_until(close_at) => {
                if half_open {
                    return "half-open socket expired";
                }
                let frame = CloseFrame { code: 1001u16.into(), reason: "socket closing".into() };
                close_and_drain(sh, &mut ws, frame).await;
                return "closed after socket_closing";
            }
            // A half-open socket is still read, so the log can show what the client sent into
            // it (`ping_unanswered`), but nothing is answered and nothing counts as alive.
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) if half_open => {
                    if p::is_ping(&t) {
                        sh.world().record(Some(conv), "ping_unanswered", None, String::new());
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    if p::is_ping(&t) {
                        sh.world().record(Some(conv), "ping", None, String::new());
                        if ws.send(Message::Text(pong.clone())).await.is_err() {
                            return "write failed";
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None => return "closed by client",
                Some(Err(_)) => return "read failed",
                Some(Ok(_)) => {}
            },
        }
    }
}

/// The server's side of the closing handshake (RFC 6455, 7.1.1): send the close frame, then read
/// on until the client's close before the TCP connection is dropped: while the client keeps
/// sending (at most 2 minutes), or until it has been silent for 2 s, or the emulator stops. Dropping it with the client's data still unread makes the kernel answer
/// with a reset, and a reset makes the client's kernel discard what it had received but not yet
/// read: the frames sent just before the close (the members' DISCONNECTED of a chat the server
/// ended) would be lost, which the platform, reading its sockets all along, does not do. It
/// happened after a ping flood: the client, answering each ping of the backlog, took 3 to 10 s
/// to reach the close, over 30 s on a loaded machine.
async fn close_and_drain(sh: &Shared, ws: &mut WebSocketStream<EmuStream>, frame: CloseFrame) {
    let handshake = async {
        if tokio::time::timeout(Duration::from_secs(2), ws.close(Some(frame)))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            while let Ok(Some(Ok(_))) =
                tokio::time::timeout(Duration::from_secs(2), ws.next()).await
            {}
        }
    };
    tokio::select! {
        _ = sh.cancel.cancelled() => {}
        _ = tokio::time::timeout(Duration::from_secs(120), handshake) => {}
    }
}

#[allow(deprecated)]
fn socket_reset(s: &TcpStream) -> std::io::Result<()> {
    s.set_linger(Some(Duration::ZERO))
}

/// What the emulator serves on: TCP, or TLS over TCP (the same boxed-TLS type guestd uses).
pub(crate) type EmuStream =
    crate::transport::stream::MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

/// The TCP connection underneath (to reset it).
fn tcp(s: &EmuStream) -> &TcpStream {
    match s {
        EmuStream::Plain(s) => s,
        EmuStream::Tls(s) => s.get_ref().0,
    }
}
