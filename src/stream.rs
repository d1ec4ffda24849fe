//! The websocket transport: opening the event stream with deliberate buffer sizes and a bound on
//! concurrent handshakes.
//!
//! tungstenite's defaults reserve a 128 KiB read buffer per socket and let the write buffer grow
//! to 128 KiB before flushing; at 50k sessions that is gigabytes for frames that are a few hundred
//! bytes. guestd sets both (default 1 KiB read, growing only for a larger frame; write-through)
//! and caps message and frame size so a hostile or broken server cannot make one session allocate
//! without bound. Measured in `docs/benchmarks.md`: 4 KiB -> 1 KiB took 3 KiB off every session.

use crate::backend::ChatRef;
use crate::genesys::client::check_transport;
use crate::session::Failure;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// An open event stream.
pub type Ws = WebSocketStream<Transport>;

/// guestd's side of a websocket: TCP, or TLS over TCP.
pub type Transport = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

/// TCP, or TLS over TCP, with the TLS state boxed. Not tokio-tungstenite's `MaybeTlsStream`: that
/// enum holds the rustls connection inline, so every socket is 1,112 bytes even when plaintext;
/// boxed, a plaintext socket is 40 bytes and a TLS one 8 bytes more than before. Generic over the
/// TLS stream so the emulator's server side uses the same type.
pub enum MaybeTls<T> {
    /// Plaintext (loopback, or `allow_insecure`).
    Plain(TcpStream),
    /// TLS, verified.
    Tls(Box<T>),
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Transport settings.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Per-socket read buffer, bytes.
    pub read_buffer: usize,
    /// Write buffer target, bytes (0: every frame is written through).
    pub write_buffer: usize,
    /// Largest message accepted, bytes.
    pub max_message: usize,
    /// Handshake timeout.
    pub connect_timeout: Duration,
    /// Allow plaintext ws to non-loopback hosts.
    pub allow_insecure: bool,
    /// Send `Authorization: Bearer <jwt>` on the handshake.
    pub send_jwt: bool,
    /// Root certificates trusted besides the webpki roots.
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            read_buffer: 1024,
            write_buffer: 0,
            max_message: 256 * 1024,
            connect_timeout: Duration::from_secs(10),
            allow_insecure: false,
            send_jwt: true,
            extra_roots: Vec::new(),
        }
    }
}

/// Counts one handshake in flight for as long as it lives: a connect future dropped at any
/// `.await` (an aborted attempt when a session ends) still gives its count back.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicUsize, peak: &AtomicUsize) -> Self {
        let now = count.fetch_add(1, Ordering::Relaxed) + 1;
        if peak.fetch_max(now, Ordering::Relaxed) < now {
            metrics::gauge!("guestd_connects_in_flight_peak").set(now as f64);
        }
        metrics::gauge!("guestd_connects_in_flight").set(now as f64);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let now = self.0.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!("guestd_connects_in_flight").set(now as f64);
    }
}

/// Opens streams, at most `limit` handshakes at a time across the process.
#[derive(Clone)]
pub struct Connector {
    cfg: StreamConfig,
    tls: Result<Arc<rustls::ClientConfig>, String>,
    permits: Arc<Semaphore>,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Connector {
    /// A connector with a concurrency limit.
    pub fn new(cfg: StreamConfig, limit: usize) -> Self {
        // TLS is always verified against the webpki roots; there is no way to turn that off.
        let mut roots =
            rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for der in &cfg.extra_roots {
            if let Err(e) = roots.add(der.clone()) {
                tracing::error!(error = %e, "an extra CA certificate was refused");
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
        .map_err(|e| {
            tracing::error!(error = %e, "TLS configuration failed; wss connections will fail");
            e.to_string()
        });
        Connector {
            cfg,
            tls,
            permits: Arc::new(Semaphore::new(limit.max(1))),
            in_flight: Arc::new(AtomicUsize::new(0)),
            peak: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Whether plaintext ws to non-loopback hosts is allowed.
    pub fn allows_insecure(&self) -> bool {
        self.cfg.allow_insecure
    }

    /// Handshakes in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The most handshakes ever in flight at once.
    pub fn peak_in_flight(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Open the event stream of `chat`.
    pub async fn connect(&self, chat: &ChatRef) -> Result<Ws, Failure> {
        check_transport(&chat.event_stream_uri, self.cfg.allow_insecure)
            .map_err(|e| Failure::Other(e.to_string()))?;
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Failure::Other("connector closed".into()))?;
        let _counted = InFlight::enter(&self.in_flight, &self.peak);
        self.handshake(chat).await
    }

    async fn handshake(&self, chat: &ChatRef) -> Result<Ws, Failure> {
        let fut = self.open(chat);
        match tokio::time::timeout(self.cfg.connect_timeout, fut).await {
            Err(_) => Err(Failure::Other("handshake timed out".into())),
            Ok(r) => r,
        }
    }

    /// TCP, TLS for `wss`, then the HTTP upgrade, done here rather than by tokio-tungstenite's
    /// `connect_async`: its handshake reads the reply through a 4 KiB buffer that then becomes
    /// the socket's read buffer for life, whatever `read_buffer_size` says. Reading the reply
    /// ourselves and handing over only the bytes past the header lets `stream.read_buffer` set
    /// the real per-socket size.
    async fn open(&self, chat: &ChatRef) -> Result<Ws, Failure> {
        let other = |m: String| Failure::Other(m);
        let url = url::Url::parse(&chat.event_stream_uri)
            .map_err(|e| other(format!("bad eventStreamUri: {e}")))?;
        let host = url
            .host_str()
            .ok_or_else(|| other("eventStreamUri has no host".into()))?
            .to_string();
        let port = url
            .port_or_known_default()
            .ok_or_else(|| other("eventStreamUri has no port".into()))?;
        let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
            .await
            .map_err(|e| other(format!("connect {host}:{port}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let mut stream = match url.scheme() {
            "ws" => MaybeTls::Plain(tcp),
            "wss" => {
                let name = rustls::pki_types::ServerName::try_from(
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string(),
                )
                .map_err(|e| other(format!("bad TLS server name {host}: {e}")))?;
                let config = self
                    .tls
                    .clone()
                    .map_err(|e| other(format!("TLS unavailable: {e}")))?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| other(format!("TLS with {host}: {e}")))?;
                MaybeTls::Tls(Box::new(tls))
            }
            s => return Err(other(format!("unsupported scheme {s}"))),
        };
        let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
        let mut path = url.path().to_string();
        if let Some(q) = url.query() {
            path.push('?');
            path.push_str(q);
        }
        let host_header = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nUser-Agent: guestd/{}\r\n",
            env!("CARGO_PKG_VERSION")
        );
        if self.cfg.send_jwt {
            req.push_str("Authorization: Bearer ");
            req.push_str(chat.jwt.expose());
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| other(format!("handshake write: {e}")))?;
        drop(req);
        // Read the reply head (bounded), keep whatever follows it.
        let mut buf: Vec<u8> = Vec::with_capacity(1024);
        let mut chunk = [0u8; 512];
        let head_len = loop {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| other(format!("handshake read: {e}")))?;
            if n == 0 {
                return Err(other("connection closed during the handshake".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 16 * 1024 {
                return Err(other("handshake reply header too large".into()));
            }
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        resp.parse(&buf[..head_len])
            .map_err(|e| other(format!("bad handshake reply: {e}")))?;
        let status = resp.code.unwrap_or(0);
        if status != 101 {
            let body = String::from_utf8_lossy(&buf[head_len..])
                .chars()
                .take(200)
                .collect::<String>();
            return Err(match status {
                401 => Failure::Unauthorized(body),
                404 => Failure::NotFound(body),
                s => Failure::Other(format!("handshake answered {s}: {body}")),
            });
        }
        let header = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).to_string())
        };
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        if header("sec-websocket-accept").as_deref() != Some(accept.as_str()) {
            return Err(other(
                "handshake reply has a wrong Sec-WebSocket-Accept".into(),
            ));
        }
        if !header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
            return Err(other(
                "handshake reply does not upgrade to websocket".into(),
            ));
        }
        let rest = buf[head_len..].to_vec();
        drop(buf);
        let ws_cfg = WebSocketConfig::default()
            .read_buffer_size(self.cfg.read_buffer)
            .write_buffer_size(self.cfg.write_buffer)
            .max_write_buffer_size(self.cfg.max_message.max(self.cfg.write_buffer + 1))
            .max_message_size(Some(self.cfg.max_message))
            .max_frame_size(Some(self.cfg.max_message));
        Ok(WebSocketStream::from_partially_read(stream, rest, Role::Client, Some(ws_cfg)).await)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_plaintext_socket_does_not_carry_tls_state() {
        assert!(std::mem::size_of::<super::Transport>() <= 48);
        assert!(
            std::mem::size_of::<super::Ws>() <= 400,
            "{}",
            std::mem::size_of::<super::Ws>()
        );
    }

    /// A connect dropped mid-handshake (what `AbortConnect` does when a session ends) gives its
    /// in-flight count back; it used to stay counted for good.
    #[tokio::test]
    async fn a_dropped_connect_is_no_longer_in_flight() {
        use super::*;
        // A server that accepts and never answers the upgrade.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let c = Connector::new(StreamConfig::default(), 4);
        let chat = ChatRef {
            conversation_id: "c".into(),
            member_id: "m".into(),
            jwt: crate::secret::Secret::new("j"),
            event_stream_uri: format!("ws://{addr}/v2/stream/c"),
        };
        for _ in 0..3 {
            let attempt = c.connect(&chat);
            let r = tokio::time::timeout(Duration::from_millis(50), attempt).await;
            assert!(r.is_err(), "the handshake hangs and is dropped");
        }
        assert_eq!(c.in_flight(), 0);
        assert_eq!(c.peak_in_flight(), 1);
    }
}
