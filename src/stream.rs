//! The websocket transport: opening the event stream with deliberate buffer sizes and a bound on
//! concurrent handshakes.
//!
//! tungstenite's defaults reserve a 128 KiB read buffer per socket and let the write buffer grow
//! to 128 KiB before flushing; at 50k sessions that is gigabytes for frames that are a few hundred
//! bytes. guestd sets both (default 4 KiB read, write-through) and caps message and frame size so
//! a hostile or broken server cannot make one session allocate without bound.

use crate::backend::ChatRef;
use crate::genesys::client::check_transport;
use crate::session::Failure;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// An open event stream.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

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
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            read_buffer: 4096,
            write_buffer: 0,
            max_message: 256 * 1024,
            connect_timeout: Duration::from_secs(10),
            allow_insecure: false,
            send_jwt: true,
        }
    }
}

/// Opens streams, at most `limit` handshakes at a time across the process.
#[derive(Clone)]
pub struct Connector {
    cfg: StreamConfig,
    permits: Arc<Semaphore>,
}

impl Connector {
    /// A connector with a concurrency limit.
    pub fn new(cfg: StreamConfig, limit: usize) -> Self {
        Connector {
            cfg,
            permits: Arc::new(Semaphore::new(limit.max(1))),
        }
    }

    /// Whether plaintext ws to non-loopback hosts is allowed.
    pub fn allows_insecure(&self) -> bool {
        self.cfg.allow_insecure
    }

    /// Handshakes in flight now.
    pub fn in_flight(&self, limit: usize) -> usize {
        limit.saturating_sub(self.permits.available_permits())
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
        metrics::gauge!("guestd_connects_in_flight").increment(1.0);
        let result = self.handshake(chat).await;
        metrics::gauge!("guestd_connects_in_flight").decrement(1.0);
        result
    }

    async fn handshake(&self, chat: &ChatRef) -> Result<Ws, Failure> {
        let mut req = chat
            .event_stream_uri
            .as_str()
            .into_client_request()
            .map_err(|e| Failure::Other(format!("bad eventStreamUri: {e}")))?;
        if self.cfg.send_jwt {
            let v = format!("Bearer {}", chat.jwt.expose())
                .parse()
                .map_err(|_| Failure::Other("jwt is not a valid header value".into()))?;
            req.headers_mut().insert("authorization", v);
        }
        let ws_cfg = WebSocketConfig::default()
            .read_buffer_size(self.cfg.read_buffer)
            .write_buffer_size(self.cfg.write_buffer)
            .max_write_buffer_size(self.cfg.max_message.max(self.cfg.write_buffer + 1))
            .max_message_size(Some(self.cfg.max_message))
            .max_frame_size(Some(self.cfg.max_message));
        let fut = tokio_tungstenite::connect_async_with_config(req, Some(ws_cfg), true);
        match tokio::time::timeout(self.cfg.connect_timeout, fut).await {
            Err(_) => Err(Failure::Other("handshake timed out".into())),
            Ok(Ok((ws, _))) => Ok(ws),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| {
                        String::from_utf8_lossy(b)
                            .chars()
                            .take(200)
                            .collect::<String>()
                    })
                    .unwrap_or_default();
                Err(match status {
                    401 => Failure::Unauthorized(body),
                    404 => Failure::NotFound(body),
                    s => Failure::Other(format!("handshake answered {s}: {body}")),
                })
            }
            Ok(Err(e)) => Err(Failure::Other(e.to_string())),
        }
    }
}
