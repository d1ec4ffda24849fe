//! The websocket transport: opening the event stream with deliberate buffer sizes and a bound on
//! concurrent handshakes.
//!
//! tungstenite's defaults reserve a 128 KiB read buffer per socket and let the write buffer grow
//! to 128 KiB before flushing; at 50k sessions that is gigabytes for frames that are a few hundred
//! bytes. By default the frames go through guestd's own reader and writer
//! ([`crate::transport::leanws`]), which keep no buffer per idle socket at all; with `stream.lean_ws = false`
//! tokio-tungstenite does, with both buffers set deliberately (default 1 KiB read, growing only
//! for a larger frame; write-through). Either way message and frame size are capped so a hostile
//! or broken server cannot make one session allocate without bound. Measured in
//! `docs/benchmarks.md`: 4 KiB -> 1 KiB took 3 KiB off every session, no buffer 3 KiB more.

use crate::secret::Secret;
use crate::transport::policy::{EXCERPT_CHARS, PolicyError, check_stream_url, excerpt};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// An open event stream: guestd's own websocket ([`crate::transport::leanws::LeanWs`], no buffer held
/// while idle; the default, `Left`) or tokio-tungstenite's (`stream.lean_ws = false`, `Right`,
/// boxed so it does not size the default). Both read and write tungstenite's `Message`; close
/// either with `futures::SinkExt::close`.
pub type Ws = futures::future::Either<
    crate::transport::leanws::LeanWs<Transport>,
    Box<WebSocketStream<Transport>>,
>;

/// guestd's side of a websocket: TCP, or TLS over TCP.
pub type Transport = MaybeTls<ClientTls>;

/// A client TLS stream: guestd's own ([`crate::transport::leantls::LeanTls`], no buffer held while idle;
/// the default, `Left`) or tokio-rustls's (`stream.lean_tls = false`, `Right`).
pub type ClientTls = tokio_util::either::Either<
    crate::transport::leantls::LeanTls,
    tokio_rustls::client::TlsStream<TcpStream>,
>;

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
    /// TLS through guestd's own stream, which holds no buffer while idle (see
    /// `crate::transport::leantls`); false: tokio-rustls.
    pub lean_tls: bool,
    /// Websocket frames through guestd's own reader and writer, which hold no buffer while
    /// idle (see `crate::transport::leanws`); false: tokio-tungstenite.
    pub lean_ws: bool,
    /// The hosts a stream may be opened to (`crate::transport::policy::host_allowed` rules); empty: any
    /// (the daemon always names the platform's, see `crate::transport::policy::default_stream_hosts`).
    pub allowed_hosts: Vec<String>,
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
            lean_tls: true,
            lean_ws: true,
            allowed_hosts: Vec::new(),
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
        let tls = crate::transport::tls::client_config(&cfg.extra_roots).map_err(|e| {
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

    /// Handshakes in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The most handshakes ever in flight at once.
    pub fn peak_in_flight(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Whether the URL policy allows `url` (the same policy every stream is opened under):
    /// the scheme rule and the allowed hosts.
    pub fn check_url(&self, url: &str) -> Result<(), PolicyError> {
        check_stream_url(url, self.cfg.allow_insecure, &self.cfg.allowed_hosts)
    }

    /// Open a chat's event stream at `url`, with its credential as bearer if `send_jwt`.
    pub async fn connect(&self, url: &str, credential: &Secret) -> Result<Ws, ConnectError> {
        let bearer = self.cfg.send_jwt.then(|| credential.expose());
        self.connect_to(url, bearer).await
    }

    /// Open a websocket to `url`, with `bearer` on the handshake when given.
    pub async fn connect_to(&self, url: &str, bearer: Option<&str>) -> Result<Ws, ConnectError> {
        self.check_url(url)?;
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| ConnectError::Failed("connector closed".into()))?;
        let _counted = InFlight::enter(&self.in_flight, &self.peak);
        crate::heap::churn();
        // The handshake's state (TCP, TLS, the reply's read chunk) is allocated only once a
        // permit is held: a session waiting its turn holds this small future, not the
        // handshake's. The same rule as a REST call's attempt (platform/rest.rs), whose waiting
        // copies were what a 10,000-chat burst left in RSS; measured alone, this one was within
        // the noise (docs/benchmarks.md, "A burst's leftovers").
        let fut = Box::pin(self.open(url, bearer));
        match tokio::time::timeout(self.cfg.connect_timeout, fut).await {
            Err(_) => Err(ConnectError::Timeout),
            Ok(r) => r,
        }
    }

    /// TCP, TLS for `wss`, then the HTTP upgrade, done here rather than by tokio-tungstenite's
    /// `connect_async`: its handshake reads the reply through a 4 KiB buffer that then becomes
    /// the socket's read buffer for life, whatever `read_buffer_size` says. Reading the reply
    /// ourselves and handing over only the bytes past the header lets `stream.read_buffer` set
    /// the real per-socket size.
    async fn open(&self, url: &str, bearer: Option<&str>) -> Result<Ws, ConnectError> {
        let failed = |m: String| ConnectError::Failed(m);
        let url = url::Url::parse(url).map_err(|e| failed(format!("bad eventStreamUri: {e}")))?;
        let host = url
            .host_str()
            .ok_or_else(|| failed("eventStreamUri has no host".into()))?
            .to_string();
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let port = url
            .port_or_known_default()
            .ok_or_else(|| failed("eventStreamUri has no port".into()))?;
        let tcp = TcpStream::connect((bare_host, port))
            .await
            .map_err(|e| failed(format!("connect {host}:{port}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let mut stream = match url.scheme() {
            "ws" => MaybeTls::Plain(tcp),
            "wss" => {
                let name = rustls::pki_types::ServerName::try_from(bare_host.to_string())
                    .map_err(|e| failed(format!("bad TLS server name {host}: {e}")))?;
                let config = self
                    .tls
                    .clone()
                    .map_err(|e| failed(format!("TLS unavailable: {e}")))?;
                let tls = if self.cfg.lean_tls {
                    ClientTls::Left(
                        crate::transport::leantls::LeanTls::connect(tcp, config, name)
                            .await
                            .map_err(|e| failed(format!("TLS with {host}: {e}")))?,
                    )
                } else {
                    ClientTls::Right(
                        tokio_rustls::TlsConnector::from(config)
                            .connect(name, tcp)
                            .await
                            .map_err(|e| failed(format!("TLS with {host}: {e}")))?,
                    )
                };
                MaybeTls::Tls(Box::new(tls))
            }
            s => return Err(failed(format!("unsupported scheme {s}"))),
        };
        let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
        let req = upgrade_request(&url, &key, bearer);
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| failed(format!("handshake write: {e}")))?;
        drop(req);
        // Read the reply head (bounded), keep whatever follows it.
        let mut buf: Vec<u8> = Vec::with_capacity(REPLY_BUFFER);
        let mut chunk = [0u8; READ_CHUNK];
        let head_len = loop {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| failed(format!("handshake read: {e}")))?;
            if n == 0 {
                return Err(failed("connection closed during the handshake".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(head_len) = parse_upgrade_reply(&buf, &key)? {
                break head_len;
            }
        };
        let rest = buf[head_len..].to_vec();
        drop(buf);
        if self.cfg.lean_ws {
            return Ok(futures::future::Either::Left(
                crate::transport::leanws::LeanWs::from_partially_read(
                    stream,
                    rest,
                    self.cfg.max_message,
                ),
            ));
        }
        let ws_cfg = WebSocketConfig::default()
            .read_buffer_size(self.cfg.read_buffer)
            .write_buffer_size(self.cfg.write_buffer)
            .max_write_buffer_size(self.cfg.max_message.max(self.cfg.write_buffer + 1))
            .max_message_size(Some(self.cfg.max_message))
            .max_frame_size(Some(self.cfg.max_message));
        Ok(futures::future::Either::Right(Box::new(
            WebSocketStream::from_partially_read(stream, rest, Role::Client, Some(ws_cfg)).await,
        )))
    }
}

/// The most bytes an upgrade reply's head may take before it is refused.
const MAX_REPLY_HEAD: usize = 16 * 1024;
/// Initial capacity of the buffer the reply is read into (a reply head is a few hundred bytes).
const REPLY_BUFFER: usize = 1024;
/// Bytes read from the socket at a time during the handshake.
const READ_CHUNK: usize = 512;
/// Headers parsed from an upgrade reply.
const MAX_REPLY_HEADERS: usize = 32;
/// Characters of a refusal's body kept in the error (it reaches `reconnecting.cause`): a
/// sanitized excerpt, never the body (a stream URL pointed at an internal service must not
/// read its answer back).
const REFUSAL_EXCERPT: usize = EXCERPT_CHARS / 2;

/// Why a stream could not be opened.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConnectError {
    /// The URL policy forbids the URI.
    #[error("refused by policy: {0}")]
    Policy(#[from] PolicyError),
    /// The server answered the upgrade with another status.
    #[error("handshake answered {status}: {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The start of the reply body.
        body: String,
    },
    /// No reply within `stream.connect_timeout`.
    #[error("handshake timed out")]
    Timeout,
    /// A network, TLS or protocol failure.
    #[error("{0}")]
    Failed(String),
}

/// The HTTP upgrade request for `url`, with `key` and, when given, the bearer token.
pub fn upgrade_request(url: &url::Url, key: &str, bearer: Option<&str>) -> String {
    let mut path = url.path().to_string();
    if let Some(q) = url.query() {
        path.push('?');
        path.push_str(q);
    }
    let host = url.host_str().unwrap_or_default();
    let host = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nUser-Agent: guestd/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(token) = bearer {
        req.push_str("Authorization: Bearer ");
        req.push_str(token);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req
}

/// Read an upgrade reply from the bytes received so far: `Ok(None)` while its head is
/// incomplete, `Ok(Some(head_len))` once it is a valid `101` for `key` (bytes after `head_len`
/// are already websocket frames), an error for anything else.
pub fn parse_upgrade_reply(buf: &[u8], key: &str) -> Result<Option<usize>, ConnectError> {
    let failed = |m: String| ConnectError::Failed(m);
    let Some(head_len) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) else {
        if buf.len() > MAX_REPLY_HEAD {
            return Err(failed("handshake reply header too large".into()));
        }
        return Ok(None);
    };
    if head_len > MAX_REPLY_HEAD {
        return Err(failed("handshake reply header too large".into()));
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_REPLY_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(&buf[..head_len])
        .map_err(|e| failed(format!("bad handshake reply: {e}")))?;
    let status = resp.code.unwrap_or(0);
    if status != 101 {
        let end = buf.len().min(head_len + 4 * REFUSAL_EXCERPT);
        let body = excerpt(
            &String::from_utf8_lossy(&buf[head_len..end]),
            REFUSAL_EXCERPT,
        );
        return Err(ConnectError::Refused { status, body });
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_string())
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    if header("sec-websocket-accept").as_deref() != Some(accept.as_str()) {
        return Err(failed(
            "handshake reply has a wrong Sec-WebSocket-Accept".into(),
        ));
    }
    if !header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
        return Err(failed(
            "handshake reply does not upgrade to websocket".into(),
        ));
    }
    // RFC 6455 4.1, the client's checks 3, 5 and 6: `Connection` names `Upgrade` (as a token:
    // tungstenite wants the whole value to be `Upgrade`, stricter than the RFC; see
    // docs/design.md), and no extension or subprotocol guestd did not ask for (it asks for none;
    // tungstenite does not check extensions yet, the RFC says the client MUST).
    if !header("connection").is_some_and(|c| {
        c.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    }) {
        return Err(failed("handshake reply lacks Connection: Upgrade".into()));
    }
    if header("sec-websocket-extensions").is_some_and(|e| !e.trim().is_empty()) {
        return Err(failed(
            "handshake reply names an extension guestd did not ask for".into(),
        ));
    }
    if header("sec-websocket-protocol").is_some() {
        return Err(failed(
            "handshake reply names a subprotocol guestd did not ask for".into(),
        ));
    }
    Ok(Some(head_len))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_plaintext_socket_does_not_carry_tls_state() {
        assert!(std::mem::size_of::<super::Transport>() <= 48);
        // guestd's own framing: the transport, two empty Vecs and a few words (tungstenite's
        // WebSocketStream was ~350 bytes, boxed behind the other arm).
        assert!(
            std::mem::size_of::<super::Ws>() <= 160,
            "{}",
            std::mem::size_of::<super::Ws>()
        );
    }

    #[test]
    fn the_upgrade_request_names_path_query_host_and_only_a_given_token() {
        use super::*;
        let url = url::Url::parse("wss://streaming.example.com/v2/stream/c1?x=1").unwrap();
        let req = upgrade_request(&url, "dGhlIHNhbXBsZSBub25jZQ==", None);
        assert!(
            req.starts_with("GET /v2/stream/c1?x=1 HTTP/1.1\r\nHost: streaming.example.com\r\n"),
            "{req}"
        );
        assert!(req.contains("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"));
        assert!(req.ends_with("\r\n\r\n") && !req.contains("Authorization"));
        let url = url::Url::parse("ws://127.0.0.1:8780/v2/stream/c1").unwrap();
        let req = upgrade_request(&url, "k", Some("tok"));
        assert!(
            req.contains("Host: 127.0.0.1:8780\r\n")
                && req.contains("Authorization: Bearer tok\r\n")
        );
    }

    #[test]
    fn upgrade_replies_are_read_from_bytes() {
        use super::*;
        // RFC 6455's example key and accept value.
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi";
        let head = ok.len() - 4;
        for cut in [0, 10, head - 1] {
            assert_eq!(parse_upgrade_reply(&ok[..cut], key), Ok(None), "cut {cut}");
        }
        assert_eq!(parse_upgrade_reply(ok, key), Ok(Some(head)));
        assert!(matches!(
            parse_upgrade_reply(ok, "another key"),
            Err(ConnectError::Failed(m)) if m.contains("Accept")
        ));
        let gone = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nno chat c";
        assert_eq!(
            parse_upgrade_reply(gone, key),
            Err(ConnectError::Refused {
                status: 404,
                body: "no chat c".into()
            })
        );
        // An internal service's answer is not read back: a short sanitized excerpt at most.
        let mut internal = b"HTTP/1.1 200 OK\r\n\r\n\x1b[2Jsecret-config: eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl\n".to_vec();
        internal.extend(std::iter::repeat_n(b'k', 10_000));
        let Err(ConnectError::Refused { status: 200, body }) = parse_upgrade_reply(&internal, key)
        else {
            panic!("a 200 is a refusal")
        };
        assert!(body.chars().count() <= REFUSAL_EXCERPT + 3, "{body}");
        assert!(
            !body.contains("eyJ") && !body.chars().any(char::is_control),
            "{body:?}"
        );
        let no_upgrade = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert!(parse_upgrade_reply(no_upgrade, key).is_err());
        // RFC 6455 4.1 checks 3, 5, 6 (they were not made): Connection must name Upgrade, and
        // no extension or subprotocol may come unasked.
        let reply = |extra: &str| {
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n{extra}\r\n"
            )
        };
        for (extra, ok) in [
            ("", false),
            ("Connection: keep-alive\r\n", false),
            ("Connection: upgrade\r\n", true),
            ("Connection: keep-alive, Upgrade\r\n", true),
            (
                "Connection: Upgrade\r\nSec-WebSocket-Extensions: permessage-deflate\r\n",
                false,
            ),
            (
                "Connection: Upgrade\r\nSec-WebSocket-Protocol: chat\r\n",
                false,
            ),
        ] {
            let r = parse_upgrade_reply(reply(extra).as_bytes(), key);
            assert_eq!(r.is_ok(), ok, "{extra:?}: {r:?}");
        }
        assert!(matches!(
            parse_upgrade_reply(b"garbage\r\n\r\n", key),
            Err(ConnectError::Failed(_))
        ));
        let endless = vec![b'x'; MAX_REPLY_HEAD + 1];
        assert!(parse_upgrade_reply(&endless, key).is_err());
    }

    /// A connect dropped mid-handshake (what `AbortConnect` does when a session ends) gives its
    /// in-flight count back; it used to stay counted for good.
    #[tokio::test]
    async fn a_dropped_connect_is_no_longer_in_flight() {
        use super::*;
        use crate::backends::guest_chat::api::ChatRef;
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
            let attempt = c.connect(&chat.event_stream_uri, &chat.jwt);
            let r = tokio::time::timeout(Duration::from_millis(50), attempt).await;
            assert!(r.is_err(), "the handshake hangs and is dropped");
        }
        assert_eq!(c.in_flight(), 0);
        assert_eq!(c.peak_in_flight(), 1);
    }
}
