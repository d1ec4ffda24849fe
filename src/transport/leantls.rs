//! A TLS client stream that holds no buffer while idle: rustls's unbuffered connection API with
//! every buffer owned here, each freed as soon as it is empty.
//!
//! Why: `tokio_rustls` drives rustls's buffered `ClientConnection`, whose record deframer keeps a
//! 4 KiB buffer per connection for life (rustls 0.23 `DeframerVecBuffer::prepare_read` resizes it
//! to `used + 4096` and shrinks it no further), plus chunk queues for plaintext and outgoing
//! records. An idle guest chat receives a ~120-byte heartbeat every 30 s: keeping 4 KiB+ per
//! socket for that is most of what TLS costs an idle session (docs/benchmarks.md). Here:
//! - incoming TLS bytes go into `incoming`, allocated when the socket is readable (not before:
//!   `poll_read_ready` first) and freed when no partial record is left;
//! - decrypted bytes the reader has not taken yet wait in `plain`, freed once taken;
//! - outgoing records wait in `outgoing`, freed once written.
//!
//! So an idle session holds the rustls connection state (keys, sequence numbers) and nothing
//! else. The handshake is done before the stream is handed to the websocket layer; a
//! post-handshake message (a TLS 1.3 key update or session ticket) is handled on the way.
//!
//! # Bounded by construction
//! Whatever the peer does, one stream holds at most: `incoming` [`MAX_INCOMING`] (80 KiB: a
//! handshake message may take 64 KiB, rustls's own bound); `plain` what one pass decrypted out of
//! `incoming`, so no more than `incoming`; `outgoing` one record of the caller's (a write takes at
//! most [`MAX_WRITE`] bytes, and only once what was queued before is written) and what the
//! connection queues itself (a key update answer, an alert: rustls keeps at most one key update
//! owed). About 180 KiB in the worst case; 0 while idle.
//!
//! # The same outcomes as tokio-rustls
//! tokio-rustls is the oracle (`tests/transport.rs` and the tests below run both): a socket that
//! ends without close_notify is `UnexpectedEof` (a truncation), not an end; shutting the write
//! side down (close_notify, queued behind whatever waits to be written, then a TCP FIN) does not
//! stop reading, so the peer's last records and its close_notify are read; a TLS error sends the
//! fatal alert rustls queued for it, as a last gasp that waits for nothing.
//!
//! Reader and writer may be two tasks (`tokio::io::split`): records decrypted while writing are
//! kept in `plain` and the reader is woken for them; a write the read path makes (records the
//! connection queued) takes the socket's write wake-up, so a writer parked on the socket is
//! woken too, to take it back.

use bytes::BufMut;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError, ReadTraffic,
    UnbufferedStatus,
};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 4096;
/// The most `incoming` may hold: a handshake message may take up to 64 KiB (rustls's own
/// bound), a record 16 KiB and change.
pub const MAX_INCOMING: usize = 0x1_0000 + 0x4000;

/// What one pass of the connection's state machine came to.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// Something was done; run it again.
    Again,
    /// More bytes from the peer are needed (handshake, or a partial record).
    NeedRead,
    /// Handshake done and nothing to read: application data may be written.
    Idle,
    /// The peer closed the connection (close_notify).
    Eof,
}

/// A TLS client connection over TCP, buffers owned here.
pub struct LeanTls {
    tcp: TcpStream,
    conn: UnbufferedClientConnection,
    /// TLS bytes received and not yet processed (its length is what is held).
    incoming: Vec<u8>,
    outgoing: Vec<u8>,
    sent: usize,
    plain: Vec<u8>,
    taken: usize,
    /// How the read side ended, if it has.
    read_end: ReadEnd,
    /// close_notify is queued (guestd's write side is shut); reading goes on.
    close_queued: bool,
    read_waker: Option<Waker>,
    /// A writer parked on the socket (woken when the read path writes, see the module doc).
    write_waker: Option<Waker>,
}

/// How the peer ended the read side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadEnd {
    Open,
    /// close_notify: a clean end.
    Clean,
    /// The socket ended without close_notify: a truncation, an error (as rustls says).
    Truncated,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Encode a handshake record at the end of `out`.
fn encode(e: &mut EncodeTlsData<'_, ClientConnectionData>, out: &mut Vec<u8>) -> io::Result<()> {
    let start = out.len();
    let mut need = 0;
    loop {
        out.resize(start + need, 0);
        match e.encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size }))
                if required_size > need =>
            {
                need = required_size
            }
            Err(e) => {
                out.truncate(start);
                return Err(io_err(format!("{e:?}")));
            }
        }
    }
}

/// Hand every decrypted record to the reader: straight into `out` (the reader's buffer, when
/// it is the reader asking) as far as it fits, the rest into `plain`; wake the reader otherwise.
/// The bytes to discard.
fn decrypt(
    r: &mut ReadTraffic<'_, '_, ClientConnectionData>,
    plain: &mut Vec<u8>,
    reader: Option<&Waker>,
    mut out: Option<&mut ReadBuf<'_>>,
) -> io::Result<usize> {
    let mut discard = 0;
    while let Some(rec) = r.next_record() {
        let rec = rec.map_err(io_err)?;
        discard += rec.discard;
        let mut payload = rec.payload;
        if let Some(out) = out.as_deref_mut() {
            if plain.is_empty() {
                let n = out.remaining().min(payload.len());
                out.put_slice(&payload[..n]);
                payload = &payload[n..];
            }
        }
        plain.extend_from_slice(payload);
    }
    if out.is_none() {
        if let Some(w) = reader {
            w.wake_by_ref();
        }
    }
    Ok(discard)
}

impl LeanTls {
    /// Connect TLS over `tcp` to `name`, verified by `config`; returns once the handshake is
    /// done.
    pub async fn connect(
        tcp: TcpStream,
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> io::Result<LeanTls> {
        let conn = UnbufferedClientConnection::new(config, name).map_err(io_err)?;
        let mut s = LeanTls {
            tcp,
            conn,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            sent: 0,
            plain: Vec::new(),
            taken: 0,
            read_end: ReadEnd::Open,
            close_queued: false,
            read_waker: None,
            write_waker: None,
        };
        loop {
            std::future::poll_fn(|cx| s.poll_send(cx)).await?;
            let progress = match s.process(None) {
                Ok(p) => p,
                Err(e) => {
                    // The alert the failure queued (a bad certificate, say) goes out, unwaited.
                    s.send_alert_now();
                    return Err(e);
                }
            };
            match progress {
                Progress::Again => {}
                Progress::Idle => {
                    std::future::poll_fn(|cx| s.poll_send(cx)).await?;
                    s.release();
                    return Ok(s);
                }
                Progress::NeedRead => {
                    let n = std::future::poll_fn(|cx| s.poll_fill(cx)).await?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed during the TLS handshake",
                        ));
                    }
                }
                Progress::Eof => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed during the TLS handshake",
                    ));
                }
            }
        }
    }

    /// Bytes this stream holds in buffers now (for the tests and the benchmark's accounting).
    pub fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.outgoing.capacity() + self.plain.capacity()
    }

    /// Free the buffers that hold nothing.
    fn release(&mut self) {
        if self.incoming.is_empty() && self.incoming.capacity() > 0 {
            self.incoming = Vec::new();
        }
        if self.sent >= self.outgoing.len() && self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
            self.sent = 0;
        }
        if self.taken >= self.plain.len() && self.plain.capacity() > 0 {
            self.plain = Vec::new();
            self.taken = 0;
        }
    }

    /// A TLS error from the connection: the bytes it took are dropped and its alert queued.
    fn failed(&mut self, discard: usize, e: rustls::Error) -> io::Error {
        if discard > 0 {
            self.incoming.drain(..discard);
        }
        self.queue_alert();
        io_err(e)
    }

    /// After a TLS error: the fatal alert rustls queued for it, into `outgoing` (rustls hands it
    /// out first thing once its state has failed). tokio-rustls sends it the same way, as a last
    /// gasp. One call only: a second would deframe the bad bytes again and fail a second time.
    fn queue_alert(&mut self) {
        // The same buffer as before: the deframer keeps positions in it.
        let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut self.incoming);
        if let Ok(ConnectionState::EncodeTlsData(mut e)) = state {
            let _ = encode(&mut e, &mut self.outgoing);
        }
        if discard > 0 {
            self.incoming.drain(..discard);
        }
    }

    /// Write what is queued without waiting and without taking anyone's wake-up (the last gasp
    /// after an error).
    fn send_alert_now(&mut self) {
        while self.sent < self.outgoing.len() {
            match self.tcp.try_write(&self.outgoing[self.sent..]) {
                Ok(n) if n > 0 => self.sent += n,
                _ => break,
            }
        }
    }

    /// One pass of the state machine over the bytes received so far.
    fn process(&mut self, out: Option<&mut ReadBuf<'_>>) -> io::Result<Progress> {
        let UnbufferedStatus { mut discard, state } =
            self.conn.process_tls_records(&mut self.incoming);
        let state = match state {
            Ok(s) => s,
            Err(e) => return Err(self.failed(discard, e)),
        };
        let progress = match state {
            ConnectionState::ReadTraffic(mut r) => {
                discard += decrypt(&mut r, &mut self.plain, self.read_waker.as_ref(), out)?;
                Progress::Again
            }
            ConnectionState::EncodeTlsData(mut e) => {
                encode(&mut e, &mut self.outgoing)?;
                Progress::Again
            }
            // The records are in `outgoing`, in order; every path writes them before anything
            // queued after them.
            ConnectionState::TransmitTlsData(t) => {
                t.done();
                Progress::Again
            }
            ConnectionState::BlockedHandshake => Progress::NeedRead,
            ConnectionState::WriteTraffic(_) => {
                if self.incoming.len() > discard {
                    // A partial record: the rest is still on its way.
                    Progress::NeedRead
                } else {
                    Progress::Idle
                }
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => Progress::Eof,
            other => return Err(io_err(format!("unexpected TLS state {other:?}"))),
        };
        if discard > 0 {
            self.incoming.drain(..discard);
        }
        Ok(progress)
    }

    /// Read what the socket has into `incoming`, allocating only once it is readable. Ok(0) at
    /// the socket's end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            if self.incoming.len() >= MAX_INCOMING {
                return Poll::Ready(Err(io_err("a TLS message larger than 80 KiB")));
            }
            if self.incoming.is_empty() {
                // Nothing partial is held: nothing to keep while waiting.
                self.incoming = Vec::new();
            }
            ready!(self.tcp.poll_read_ready(cx))?;
            // Spare capacity, not zero-filled: `try_read_buf` reads into it.
            let room = READ_CHUNK.min(MAX_INCOMING - self.incoming.len());
            self.incoming.reserve(room);
            let mut limited = (&mut self.incoming).limit(room);
            match self.tcp.try_read_buf(&mut limited) {
                Ok(n) => {
                    return Poll::Ready(Ok(n));
                }
                // Readiness was stale; `try_read` cleared it, so the next poll registers.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Write `outgoing` to the socket; frees it once written.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
        }
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Encrypt `data` (or a close_notify) into `outgoing`, handling whatever the connection
    /// has to do first.
    fn encrypt(&mut self, data: Option<&[u8]>) -> io::Result<()> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let state = match state {
                Ok(s) => s,
                Err(e) => return Err(self.failed(discard, e)),
            };
            let done = match state {
                ConnectionState::WriteTraffic(mut w) => {
                    let start = self.outgoing.len();
                    let mut need = data.map_or(64, |d| d.len() + d.len() / 16 + 64);
                    loop {
                        self.outgoing.resize(start + need, 0);
                        let r = match data {
                            Some(d) => w.encrypt(d, &mut self.outgoing[start..]),
                            None => w.queue_close_notify(&mut self.outgoing[start..]),
                        };
                        match r {
                            Ok(n) => {
                                self.outgoing.truncate(start + n);
                                break;
                            }
                            Err(EncryptError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            })) if required_size > need => need = required_size,
                            Err(e) => {
                                self.outgoing.truncate(start);
                                return Err(io_err(format!("{e:?}")));
                            }
                        }
                    }
                    true
                }
                ConnectionState::ReadTraffic(mut r) => {
                    discard += decrypt(&mut r, &mut self.plain, self.read_waker.as_ref(), None)?;
                    false
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    encode(&mut e, &mut self.outgoing)?;
                    false
                }
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    false
                }
                ConnectionState::PeerClosed => {
                    self.read_end = ReadEnd::Clean;
                    if let Some(w) = &self.read_waker {
                        w.wake_by_ref();
                    }
                    false
                }
                ConnectionState::Closed => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the TLS connection is closed",
                    ));
                }
                other => return Err(io_err(format!("unexpected TLS state {other:?}"))),
            };
            if discard > 0 {
                self.incoming.drain(..discard);
            }
            if done {
                return Ok(());
            }
        }
    }
}

impl LeanTls {
    /// A writer's poll that waits on the socket: remembered, so the read path can wake it.
    fn park_writer<T>(&mut self, cx: &Context<'_>, p: Poll<T>) -> Poll<T> {
        park(&mut self.write_waker, cx, p)
    }
}

/// Keeps the waker of a writer whose poll `p` waits (clears it once the poll is ready): with
/// reader and writer on two tasks, the read path's writes take the socket's single write
/// wake-up, and wake this one so the writer takes it back (here and in `crate::transport::leanws`).
pub(crate) fn park<T>(slot: &mut Option<Waker>, cx: &Context<'_>, p: Poll<T>) -> Poll<T> {
    match p {
        Poll::Pending => {
            if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *slot = Some(cx.waker().clone());
            }
        }
        Poll::Ready(_) => *slot = None,
    }
    p
}

impl AsyncRead for LeanTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this
            .read_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            this.read_waker = Some(cx.waker().clone());
        }
        loop {
            if this.taken < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.taken);
                buf.put_slice(&this.plain[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken >= this.plain.len() {
                    this.plain = Vec::new();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            match this.read_end {
                ReadEnd::Open => {}
                ReadEnd::Clean => return Poll::Ready(Ok(())),
                ReadEnd::Truncated => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed connection without sending TLS close_notify",
                    )));
                }
            }
            // Records a post-handshake message asked for go out on the way (best effort: a
            // full socket is retried by the next read, write or flush). This write takes the
            // socket's write wake-up, so a writer parked on it is woken to take it back.
            if this.sent < this.outgoing.len() {
                let sent = this.poll_send(cx);
                if let Some(w) = this.write_waker.take() {
                    w.wake();
                }
                if let Poll::Ready(Err(e)) = sent {
                    return Poll::Ready(Err(e));
                }
            }
            let before = buf.filled().len();
            let progress = match this.process(Some(buf)) {
                Ok(p) => p,
                Err(e) => {
                    this.send_alert_now();
                    return Poll::Ready(Err(e));
                }
            };
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            match progress {
                Progress::Again => continue,
                Progress::Eof => this.read_end = ReadEnd::Clean,
                Progress::NeedRead | Progress::Idle => match this.poll_fill(cx) {
                    Poll::Ready(Ok(0)) => {
                        // The socket ended without close_notify: a truncation, not an end
                        // (tokio-rustls: UnexpectedEof).
                        this.read_end = ReadEnd::Truncated;
                        this.incoming = Vec::new();
                        this.release();
                    }
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        this.release();
                        return Poll::Pending;
                    }
                },
            }
        }
    }
}

/// The most plaintext one `poll_write` takes: one record's worth, so what waits to be written
/// is one record and whatever the connection queued itself (module doc).
pub const MAX_WRITE: usize = 16 * 1024;

impl AsyncWrite for LeanTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // What was queued before goes first (and holds back the writer while the socket is
        // full).
        let sent = this.poll_send(cx);
        ready!(this.park_writer(cx, sent))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.close_queued {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS write side is shut",
            )));
        }
        let n = data.len().min(MAX_WRITE);
        if let Err(e) = this.encrypt(Some(&data[..n])) {
            this.send_alert_now();
            return Poll::Ready(Err(e));
        }
        // Written now if the socket takes it, else by the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let sent = this.poll_send(cx);
        ready!(this.park_writer(cx, sent))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    /// Queues close_notify once, behind whatever waits to be written (it was dropped when the
    /// socket was full), writes it all, then shuts the TCP write side. Reading goes on: the
    /// peer's last records and its close_notify are still read.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            // A connection that cannot send it any more (closed) is shut all the same.
            let _ = this.encrypt(None);
            this.close_queued = true;
        }
        let sent = this.poll_send(cx);
        ready!(this.park_writer(cx, sent))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A TLS server on loopback (tokio-rustls) and a `LeanTls` client connected to it, with
    /// `versions` allowed on both ends.
    async fn pair(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (LeanTls, tokio_rustls::server::TlsStream<TcpStream>) {
        match pair_as(versions, true).await {
            (crate::transport::stream::ClientTls::Left(c), s) => (c, s),
            _ => unreachable!(),
        }
    }

    /// Both clients, guestd's own (`lean`) and tokio-rustls's (the oracle), the same way.
    async fn pair_as(
        versions: &[&'static rustls::SupportedProtocolVersion],
        lean: bool,
    ) -> (
        crate::transport::stream::ClientTls,
        tokio_rustls::server::TlsStream<TcpStream>,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = CertificateDer::from(cert.der().to_vec());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Small socket buffers (fixed, not autotuned): a writer that does not get read is
        // stuck behind a full socket after a few KiB.
        let small = 8 * 1024;
        let listen = tokio::net::TcpSocket::new_v4().unwrap();
        listen.set_recv_buffer_size(small).unwrap();
        listen.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listen.listen(8).unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await.unwrap()
        });
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_send_buffer_size(small).unwrap();
        let tcp = sock.connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let c = if lean {
            crate::transport::stream::ClientTls::Left(
                LeanTls::connect(tcp, Arc::new(client), name).await.unwrap(),
            )
        } else {
            crate::transport::stream::ClientTls::Right(
                tokio_rustls::TlsConnector::from(Arc::new(client))
                    .connect(name, tcp)
                    .await
                    .unwrap(),
            )
        };
        (c, accept.await.unwrap())
    }

    /// Bug 2 of issue 23: a socket that ends between records without close_notify is a
    /// truncation, an `UnexpectedEof` error, as tokio-rustls says (it read as a clean end).
    #[tokio::test]
    async fn an_end_without_close_notify_is_unexpected_eof_as_in_tokio_rustls() {
        for versions in BOTH {
            for lean in [true, false] {
                let (mut c, mut s) = pair_as(versions, lean).await;
                s.write_all(b"data").await.unwrap();
                s.flush().await.unwrap();
                let (tcp, _) = s.into_inner();
                drop(tcp);
                let mut got = Vec::new();
                let r = c.read_to_end(&mut got).await;
                assert_eq!(got, b"data", "lean {lean}");
                assert_eq!(
                    r.map_err(|e| e.kind()),
                    Err(io::ErrorKind::UnexpectedEof),
                    "lean {lean}"
                );
            }
        }
    }

    /// Bug 3: shutting the write side down does not stop reading: the peer's last bytes and its
    /// close_notify are read (they were lost: shutdown marked the stream at its end for reading).
    #[tokio::test]
    async fn reading_goes_on_after_shutdown_as_in_tokio_rustls() {
        for versions in BOTH {
            for lean in [true, false] {
                let (mut c, mut s) = pair_as(versions, lean).await;
                c.write_all(b"bye").await.unwrap();
                c.shutdown().await.unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                assert_eq!(got, b"bye");
                s.write_all(b"last words").await.unwrap();
                s.shutdown().await.unwrap();
                let mut back = Vec::new();
                c.read_to_end(&mut back).await.unwrap();
                assert_eq!(back, b"last words", "lean {lean}");
            }
        }
    }

    /// Writes `c` full until the socket takes no more (a noop waker: nothing is woken), so
    /// records wait to be written; the bytes taken.
    fn fill<W: AsyncWrite + Unpin>(c: &mut W) -> usize {
        let chunk = vec![7u8; MAX_WRITE];
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut total = 0;
        loop {
            match Pin::new(&mut *c).poll_write(&mut cx, &chunk) {
                Poll::Ready(Ok(n)) => total += n,
                Poll::Pending => return total,
                Poll::Ready(Err(e)) => panic!("{e}"),
            }
        }
    }

    /// Bug 4: close_notify is sent behind records still waiting on a full socket (it was
    /// queued only when nothing waited, and the peer read a truncation).
    #[tokio::test]
    async fn close_notify_goes_out_behind_a_full_socket() {
        for lean in [true, false] {
            let (mut c, mut s) = pair_as(&[&rustls::version::TLS13], lean).await;
            let total = fill(&mut c);
            // The first shutdown poll comes while records wait.
            let waker = futures::task::noop_waker();
            let polled = Pin::new(&mut c).poll_shutdown(&mut Context::from_waker(&waker));
            assert!(polled.is_pending(), "lean {lean}: the socket is full");
            let server = tokio::spawn(async move {
                let mut got = Vec::new();
                let r = s.read_to_end(&mut got).await.map(|_| got.len());
                r.map_err(|e| e.to_string())
            });
            c.shutdown().await.unwrap();
            assert_eq!(server.await.unwrap(), Ok(total), "lean {lean}");
        }
    }

    /// Bug 5: with reader and writer on two tasks, the read path writing what waits to be
    /// written must not leave the writer parked for good (it took the socket's write wake-up).
    #[tokio::test]
    async fn a_writer_on_its_own_task_is_not_robbed_of_its_wake_up() {
        let (c, mut s) = pair(&[&rustls::version::TLS13]).await;
        let (mut cr, mut cw) = tokio::io::split(c);
        let (parked, writer_parked) = tokio::sync::oneshot::channel();
        let writer = tokio::spawn(async move {
            let chunk = vec![1u8; MAX_WRITE];
            let mut parked = Some(parked);
            let mut total = 0;
            // Writes until parked on a full socket (told once), then one more record.
            while parked.is_some() || total % (4 * MAX_WRITE) != 0 {
                total += std::future::poll_fn(|cx| {
                    let p = Pin::new(&mut cw).poll_write(cx, &chunk);
                    if p.is_pending() {
                        if let Some(tx) = parked.take() {
                            let _ = tx.send(());
                        }
                    }
                    p
                })
                .await
                .unwrap();
            }
            cw.flush().await.unwrap();
            total
        });
        writer_parked.await.unwrap();
        // The server sends a record; the reader reads it while records wait to be written.
        s.write_all(b"x").await.unwrap();
        s.flush().await.unwrap();
        let (read_one, got_one) = tokio::sync::oneshot::channel();
        let reader = tokio::spawn(async move {
            let mut one = [0u8; 1];
            cr.read_exact(&mut one).await.unwrap();
            let _ = read_one.send(());
            let mut more = [0u8; 1];
            let _ = cr.read(&mut more).await;
            cr
        });
        got_one.await.unwrap();
        let server = tokio::spawn(async move {
            let mut sink = vec![0u8; 64 * 1024];
            loop {
                if s.read(&mut sink).await.unwrap_or(0) == 0 {
                    break;
                }
            }
        });
        let w = tokio::time::timeout(std::time::Duration::from_secs(10), writer).await;
        assert!(w.is_ok(), "the writer was never woken");
        reader.abort();
        server.abort();
    }

    /// The fatal alert rustls queues on a TLS error is sent, as tokio-rustls sends it (it was
    /// never sent): the server reads the client's bad_record_mac.
    #[tokio::test]
    async fn a_tls_error_sends_its_alert_as_tokio_rustls_does() {
        for lean in [true, false] {
            let (mut c, mut s) = pair_as(&[&rustls::version::TLS13], lean).await;
            // A record the client cannot decrypt, straight onto the socket.
            s.get_mut()
                .0
                .write_all(&[
                    23, 3, 3, 0, 20, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18,
                    19, 20,
                ])
                .await
                .unwrap();
            let mut buf = [0u8; 16];
            assert!(c.read(&mut buf).await.is_err(), "lean {lean}");
            let r = s.read(&mut buf);
            let r = tokio::time::timeout(std::time::Duration::from_secs(10), r).await;
            let e = r
                .expect("an alert, not silence")
                .expect_err("the server reads an alert");
            assert!(e.to_string().contains("BadRecordMac"), "lean {lean}: {e}");
        }
    }

    /// One write takes at most one record's worth: what waits to be written is bounded, not the
    /// caller's whole buffer.
    #[tokio::test]
    async fn one_write_queues_at_most_one_record() {
        let (mut c, _s) = pair(&[&rustls::version::TLS13]).await;
        let big = vec![3u8; 1 << 20];
        let n = c.write(&big).await.unwrap();
        assert_eq!(n, MAX_WRITE);
        assert!(
            c.buffered_capacity() <= MAX_WRITE + MAX_WRITE / 16 + 1024,
            "{}",
            c.buffered_capacity()
        );
    }

    const BOTH: [&[&rustls::SupportedProtocolVersion]; 2] =
        [&[&rustls::version::TLS13], &[&rustls::version::TLS12]];

    /// Bytes both ways, small and larger than a record, arrive whole and in order; once the
    /// exchange is over the client holds no buffer at all.
    #[tokio::test]
    async fn data_both_ways_and_nothing_held_while_idle() {
        for versions in BOTH {
            let (mut c, mut s) = pair(versions).await;
            assert_eq!(c.buffered_capacity(), 0, "after the handshake");
            let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
            let b2 = big.clone();
            let server = tokio::spawn(async move {
                let mut got = vec![0u8; b2.len()];
                s.read_exact(&mut got).await.unwrap();
                assert_eq!(got, b2);
                s.write_all(b"pong").await.unwrap();
                s.write_all(&b2).await.unwrap();
                s.flush().await.unwrap();
                s
            });
            c.write_all(&big).await.unwrap();
            c.flush().await.unwrap();
            let mut pong = [0u8; 4];
            c.read_exact(&mut pong).await.unwrap();
            assert_eq!(&pong, b"pong");
            let mut back = vec![0u8; big.len()];
            c.read_exact(&mut back).await.unwrap();
            assert_eq!(back, big);
            let mut s = server.await.unwrap();
            // A small frame after a pause, as a heartbeat would come.
            s.write_all(b"heartbeat").await.unwrap();
            s.flush().await.unwrap();
            let mut hb = [0u8; 9];
            c.read_exact(&mut hb).await.unwrap();
            assert_eq!(&hb, b"heartbeat");
            // Idle again: a read that waits frees everything first.
            let mut one = [0u8; 1];
            let waiting =
                tokio::time::timeout(std::time::Duration::from_millis(50), c.read(&mut one)).await;
            assert!(waiting.is_err(), "nothing to read");
            assert_eq!(c.buffered_capacity(), 0, "idle: no buffer held");
        }
    }

    /// close_notify from the server reads as the end of the stream; the client's own shutdown
    /// sends close_notify the server reads as the end.
    #[tokio::test]
    async fn close_notify_both_ways() {
        for versions in BOTH {
            let (mut c, mut s) = pair(versions).await;
            s.write_all(b"bye").await.unwrap();
            s.shutdown().await.unwrap();
            let mut all = Vec::new();
            c.read_to_end(&mut all).await.unwrap();
            assert_eq!(all, b"bye");
            let (mut c, mut s) = pair(versions).await;
            c.write_all(b"last").await.unwrap();
            c.shutdown().await.unwrap();
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.unwrap();
            assert_eq!(all, b"last");
        }
    }

    /// A TLS 1.3 key update from the server (which asks the client to update too): reading goes
    /// on under the new keys, and the client's writes after it are read by the server.
    #[tokio::test]
    async fn a_key_update_from_the_server() {
        let (mut c, mut s) = pair(&[&rustls::version::TLS13]).await;
        s.write_all(b"before").await.unwrap();
        s.flush().await.unwrap();
        s.get_mut().1.refresh_traffic_keys().unwrap();
        s.write_all(b"after").await.unwrap();
        s.flush().await.unwrap();
        let mut got = [0u8; 11];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"beforeafter");
        c.write_all(b"reply").await.unwrap();
        c.flush().await.unwrap();
        let mut r = [0u8; 5];
        s.read_exact(&mut r).await.unwrap();
        assert_eq!(&r, b"reply");
    }

    /// Random traffic both ways at once: the server writes messages of random sizes (1 byte to
    /// 40 KB, so records split across reads and reads hold several records) and flushes at
    /// random points; the client echoes every byte back while it reads (so records are
    /// decrypted on the write path too). Everything arrives once and in order, both ways, for
    /// TLS 1.2 and 1.3. (A key update has its own test above.)
    #[tokio::test]
    async fn random_traffic_both_ways_arrives_whole_and_in_order() {
        for (round, versions) in BOTH.iter().cycle().take(8).enumerate() {
            let (c, s) = pair(versions).await;
            let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ round as u64;
            let mut rnd = move |n: u64| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed % n
            };
            let mut sent = Vec::new();
            let mut plan = Vec::new();
            for _ in 0..40 {
                let len = match rnd(4) {
                    0 => 1 + rnd(16),
                    1 => 100 + rnd(400),
                    2 => 1000 + rnd(8000),
                    _ => 16_000 + rnd(24_000),
                } as usize;
                let chunk: Vec<u8> = (0..len).map(|_| rnd(256) as u8).collect();
                sent.extend_from_slice(&chunk);
                plan.push((chunk, rnd(3) == 0));
            }
            let total = sent.len();
            let (mut sr, mut sw) = tokio::io::split(s);
            let (mut cr, mut cw) = tokio::io::split(c);
            let writer = tokio::spawn(async move {
                for (chunk, flush) in plan {
                    sw.write_all(&chunk).await.unwrap();
                    if flush {
                        sw.flush().await.unwrap();
                    }
                }
                sw.flush().await.unwrap();
                sw
            });
            let echo = tokio::spawn(async move {
                let mut got = Vec::with_capacity(total);
                let mut buf = vec![0u8; 7000];
                while got.len() < total {
                    let n = cr.read(&mut buf).await.unwrap();
                    assert!(n > 0, "early end after {} of {total}", got.len());
                    got.extend_from_slice(&buf[..n]);
                    cw.write_all(&buf[..n]).await.unwrap();
                }
                cw.flush().await.unwrap();
                got
            });
            let mut back = vec![0u8; total];
            sr.read_exact(&mut back).await.unwrap();
            let got = echo.await.unwrap();
            writer.await.unwrap();
            assert!(got == sent, "round {round}: the client read other bytes");
            assert!(
                back == sent,
                "round {round}: the server read other bytes back"
            );
        }
    }

    /// A socket that ends inside a record is an error, not a short read.
    #[tokio::test]
    async fn a_connection_cut_inside_a_record_is_an_error() {
        let (mut c, s) = pair(&[&rustls::version::TLS13]).await;
        let (mut tcp, _) = s.into_inner();
        tcp.write_all(&[23, 3, 3, 0, 200, 1, 2, 3]).await.unwrap();
        drop(tcp);
        let mut buf = [0u8; 16];
        let r = c.read(&mut buf).await;
        assert!(r.is_err(), "{r:?}");
    }
}

#[cfg(test)]
mod size_tests {
    /// The stream's own footprint next to tokio-rustls's (both are boxed per socket): within a
    /// few words of it (three buffer handles and the reader's waker); what it saves is the heap
    /// those buffers would hold while idle.
    #[test]
    fn the_stream_is_about_as_large_as_tokio_rustls() {
        let lean = std::mem::size_of::<super::LeanTls>();
        let buffered =
            std::mem::size_of::<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>();
        eprintln!("LeanTls {lean} B, tokio-rustls TlsStream {buffered} B");
        assert!(lean <= buffered + 64, "{lean} > {buffered} + 64");
    }
}
