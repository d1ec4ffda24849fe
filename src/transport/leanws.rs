//! guestd's client side of a websocket (RFC 6455) that holds no buffer while a socket is idle.
//!
//! Why not tungstenite's own: its frame codec keeps a read buffer per socket for life (a
//! `BytesMut` that starts at `read_buffer_size` and grows, 1 to 2 KiB in practice, once frames
//! wrap round it, never shrinking), a write buffer that keeps the capacity of the largest frame
//! ever sent, and tokio-tungstenite adds two `Arc`'d waker proxies per socket. An idle session
//! needs none of that: its socket receives one small frame every 30 seconds.
//!
//! Here, bytes are read into a per-thread scratch buffer ([`SCRATCH`]); each frame is parsed out
//! of it and copied into its message, and only what is left over (the start of a frame not yet
//! whole, or frames after the one returned) is kept with the socket, in a `Vec` read in place
//! (frames are taken from it by moving an offset, never by copying the rest) and freed as soon as
//! it is consumed. A frame larger than one read is read straight into that `Vec`, which grows as
//! the frame's bytes arrive (doubling, capped at the frame's announced length), never zero-filled.
//! Writes encode a frame into an exact-size `Vec`, written through and freed when written. So
//! between frames a socket holds its transport and a few words ([`LeanWs::buffered_capacity`]
//! is 0).
//!
//! # Bounded by construction
//! What one socket can hold, whatever the server does (`M` = `max_message`, 256 KiB by default):
//! - read: the bytes of the frame being read, at most `M` + 14 + [`MIN_READ`] (a frame announced
//!   longer than what its message may still take is refused as soon as its header is in, before
//!   its bytes), and a fragmented message's parts, which with the frame being read stay under
//!   `M` + 14 + [`MIN_READ`] in all;
//! - write: one frame the caller sent (`Sink::poll_ready` waits until the last one is written;
//!   a message over `M` is refused with `WriteBufferFull`), and **one** owed control reply: a
//!   pong for the latest ping (a newer ping replaces a pong not yet started, tungstenite's rule)
//!   or the close reply (which nothing replaces), at most 139 bytes. A ping flood from a server
//!   that never reads costs one pong, not one per ping.
//!
//! So no server holds more than about 2 x `M` + 5 KiB of one socket (the transport adds its own,
//! see `crate::transport::leantls`); `tests/transport.rs` measures it under every hostile server it plays.
//!
//! # The protocol is tungstenite's
//! The rules, types ([`Message`], [`CloseFrame`], [`Error`]) and header parser are tungstenite's,
//! so the session actors read either stream alike and `stream.lean_ws = false` goes back to
//! tokio-tungstenite; `tests/transport.rs` runs both over the same servers and asserts the same
//! outcome. Server frames must be unmasked, no reserved bits (no extension is negotiated),
//! control frames whole and at most 125 bytes, a fragmented message continued before anything
//! else starts, text valid UTF-8, no message over `max_message`. A ping is answered with a pong
//! (and also returned, as proof of life). A close from the server is answered with the same frame
//! (a code that may not be sent on the wire becomes 1002 "Protocol violation", in the message
//! returned too); after it, the stream ends at the socket's end, and any frame before that is
//! `ReceivedAfterClosing`. After guestd's own close, frames are still read until the server's
//! close reply; a socket that ends before it, or without any close, is
//! `ResetWithoutClosingHandshake`.
//!
//! Differences from tokio-tungstenite, on purpose (also in docs/design.md):
//! - `Sink::poll_close` sends the close frame, flushes, and then shuts the write side down (a TLS
//!   close_notify, a TCP FIN): guestd has nothing more to write. Reading goes on until the
//!   server's close reply and the socket's end. tokio-tungstenite leaves the socket open for
//!   writing until it is dropped.
//! - A continuation frame that would take a message over `max_message` is refused when its
//!   header arrives; tungstenite reads the frame first. Same error, sooner, and nothing held.
//! - A control reply owed when a message is returned is written at once if the socket takes it
//!   (tungstenite writes it on the next read or write); a session that drops the socket on a
//!   close still answers it.
//!
//! Reader and writer may be two tasks (`StreamExt::split`): a write the read path makes for a
//! reply registers the reader's waker with the socket, so a writer parked in `poll_ready` is
//! woken as well, to register its own. Client frames are masked with a fresh random key each.

use bytes::Bytes;
use futures::{Sink, Stream};
use std::cell::RefCell;
use std::io::Cursor;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tokio_tungstenite::tungstenite::{Error, Message, Utf8Bytes};

/// The per-thread buffer reads land in: larger than any heartbeat or message burst in one read,
/// small enough to be nothing per worker thread.
pub const SCRATCH: usize = 16 * 1024;
/// A read into a socket's own buffer (a frame larger than one read) asks for at least this much.
pub const MIN_READ: usize = 4 * 1024;
/// The largest control frame payload (RFC 6455 5.5).
const MAX_CONTROL: usize = 125;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Where the closing handshake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Frames both ways.
    Open,
    /// guestd sent a close; waiting for the server's (frames before it are still read).
    CloseSent,
    /// Both closes seen (the server's reply, or the server's close and guestd's reply owed or
    /// written): reading on to the socket's end, which ends the stream.
    Closed,
    /// Nothing more: ended, failed, or reset.
    Done,
}

/// A message arriving in fragments.
struct Fragments {
    text: bool,
    data: Vec<u8>,
    /// Bytes of a text message known to be valid UTF-8 so far.
    checked: usize,
}

impl Fragments {
    /// A text message's bytes so far must be valid UTF-8 but for a sequence cut at the end (as
    /// tungstenite checks, fragment by fragment: found by the `ws_differential` fuzz target,
    /// guestd checked only the whole message). Each byte is checked once.
    fn check(&mut self) -> Result<(), Error> {
        if !self.text {
            return Ok(());
        }
        match std::str::from_utf8(&self.data[self.checked..]) {
            Ok(_) => self.checked = self.data.len(),
            Err(e) if e.error_len().is_some() => return Err(Error::Utf8(e.to_string())),
            Err(e) => self.checked += e.valid_up_to(),
        }
        Ok(())
    }
}

/// A client websocket over `S` (see the module doc).
pub struct LeanWs<S> {
    io: S,
    /// Bytes read and not yet parsed from `taken` on: empty (no allocation) between frames.
    held: Vec<u8>,
    /// Bytes at the start of `held` already handled.
    taken: usize,
    /// A fragmented message being put together (rare: boxed).
    fragments: Option<Box<Fragments>>,
    /// Encoded bytes being written: empty (no allocation) once written.
    out: Vec<u8>,
    /// The control reply owed, encoded, not yet started (it goes into `out` once `out` is
    /// empty): a pong while open (a newer one replaces it), the close reply once closed (no
    /// frame is answered after a close, so nothing replaces it).
    reply: Option<Box<[u8]>>,
    /// A writer parked in `poll_ready`, `poll_flush` or `poll_close` (woken when the read path
    /// writes, see the module doc).
    write_waker: Option<Waker>,
    max_message: usize,
    state: State,
    /// The read path wrote a reply the transport has not flushed yet.
    unflushed: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> LeanWs<S> {
    /// A websocket over `io`, after the upgrade: `rest` holds whatever the server sent past the
    /// reply's head (already frames). No message (or frame) over `max_message` bytes is read.
    pub fn from_partially_read(io: S, rest: Vec<u8>, max_message: usize) -> Self {
        LeanWs {
            io,
            held: rest,
            taken: 0,
            fragments: None,
            out: Vec::new(),
            reply: None,
            write_waker: None,
            max_message,
            state: State::Open,
            unflushed: false,
        }
    }

    /// Bytes of buffer this socket holds (0 while idle).
    pub fn buffered_capacity(&self) -> usize {
        self.held.capacity()
            + self.out.capacity()
            + self.fragments.as_ref().map_or(0, |f| f.data.capacity())
            + self.reply.as_ref().map_or(0, |r| r.len())
    }

    /// The transport under the websocket.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Writes `out`, then the owed reply, until both are empty; frees `out`.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            while !self.out.is_empty() {
                let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out))?;
                if n == 0 {
                    return Poll::Ready(Err(Error::Io(std::io::ErrorKind::WriteZero.into())));
                }
                self.out.drain(..n);
            }
            match self.reply.take() {
                Some(r) => self.out = r.into_vec(),
                None => break,
            }
        }
        self.out = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// A writer's poll that waits on the socket: remembered, so the read path can wake it.
    fn park_writer<T>(&mut self, cx: &Context<'_>, p: Poll<T>) -> Poll<T> {
        crate::transport::leantls::park(&mut self.write_waker, cx, p)
    }

    /// The read path's turn at writing what is owed (a full socket does not stop reading); a
    /// parked writer is woken, as the read path's write took the socket's write wake-up.
    ///
    /// Written bytes are flushed too: a transport that buffers (tokio-rustls does) would
    /// otherwise keep a pong until the next write, as tungstenite's `unflushed_additional`
    /// guards against.
    fn write_owed(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        if self.out.is_empty() && self.reply.is_none() && !self.unflushed {
            return Ok(());
        }
        let r = match self.poll_write_out(cx) {
            Poll::Ready(Ok(())) => {
                self.unflushed = true;
                match Pin::new(&mut self.io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        self.unflushed = false;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
                    Poll::Pending => Poll::Pending,
                }
            }
            other => other,
        };
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
        match r {
            Poll::Ready(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// One masked frame, encoded.
    fn encode(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mask: [u8; 4] = rand::random();
        let header = FrameHeader {
            opcode,
            mask: Some(mask),
            ..FrameHeader::default()
        };
        let len = payload.len() as u64;
        let mut v = Vec::with_capacity(header.len(len) + payload.len());
        // Writing into a Vec cannot fail.
        let _ = header.format(len, &mut v);
        v.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        v
    }

    /// Owe a control reply: it replaces a pong not yet started (a close is owed only once, and
    /// nothing is answered after it).
    fn owe(&mut self, opcode: Control, payload: &[u8]) {
        self.reply = Some(Self::encode(OpCode::Control(opcode), payload).into_boxed_slice());
    }

    /// Returns `m`, writing a reply it asked for (a pong, a close) now if the socket takes it: a
    /// write that fails is met again, and reported, on the next poll.
    fn deliver(
        &mut self,
        cx: &mut Context<'_>,
        m: Message,
    ) -> Poll<Option<Result<Message, Error>>> {
        let _ = self.write_owed(cx);
        Poll::Ready(Some(Ok(m)))
    }

    /// Ends the stream for good, freeing every buffer.
    fn fail(&mut self, e: Error) -> Poll<Option<Result<Message, Error>>> {
        self.state = State::Done;
        self.free_read();
        self.out = Vec::new();
        self.reply = None;
        Poll::Ready(Some(Err(e)))
    }

    fn free_read(&mut self) {
        self.held = Vec::new();
        self.taken = 0;
        self.fragments = None;
    }

    /// The most a frame may announce now: the message limit, less what a fragmented message
    /// being put together already holds.
    fn frame_limit(&self) -> usize {
        self.max_message
            .saturating_sub(self.fragments.as_ref().map_or(0, |f| f.data.len()))
    }

    /// One whole frame: the message it completes, if any.
    fn on_frame(&mut self, header: FrameHeader, payload: &[u8]) -> Result<Option<Message>, Error> {
        if matches!(self.state, State::Closed | State::Done) {
            return Err(Error::Protocol(ProtocolError::ReceivedAfterClosing));
        }
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(Error::Protocol(ProtocolError::NonZeroReservedBits));
        }
        if header.mask.is_some() {
            return Err(Error::Protocol(ProtocolError::MaskedFrameFromServer));
        }
        match header.opcode {
            OpCode::Control(c) => {
                if !header.is_final {
                    return Err(Error::Protocol(ProtocolError::FragmentedControlFrame));
                }
                if payload.len() > MAX_CONTROL {
                    return Err(Error::Protocol(ProtocolError::ControlFrameTooBig));
                }
                match c {
                    Control::Ping => {
                        if self.state == State::Open {
                            self.owe(Control::Pong, payload);
                        }
                        Ok(Some(Message::Ping(Bytes::copy_from_slice(payload))))
                    }
                    Control::Pong => Ok(Some(Message::Pong(Bytes::copy_from_slice(payload)))),
                    Control::Close => {
                        let frame = close_frame(payload)?;
                        match self.state {
                            State::Open => {
                                // Answer with the same frame (RFC 6455 5.5.1); a code that may
                                // not be sent on the wire is a protocol error, told as such.
                                let frame = frame.map(|f| {
                                    if f.code.is_allowed() {
                                        f
                                    } else {
                                        CloseFrame {
                                            code: CloseCode::Protocol,
                                            reason: Utf8Bytes::from_static("Protocol violation"),
                                        }
                                    }
                                });
                                let mut reply = Vec::new();
                                if let Some(f) = &frame {
                                    reply.extend_from_slice(&u16::from(f.code).to_be_bytes());
                                    reply.extend_from_slice(f.reason.as_bytes());
                                }
                                self.owe(Control::Close, &reply);
                                self.state = State::Closed;
                                Ok(Some(Message::Close(frame)))
                            }
                            _ => {
                                self.state = State::Closed;
                                Ok(Some(Message::Close(frame)))
                            }
                        }
                    }
                    Control::Reserved(op) => {
                        Err(Error::Protocol(ProtocolError::UnknownControlFrameType(op)))
                    }
                }
            }
            OpCode::Data(Data::Continue) => {
                let max = self.max_message;
                let Some(f) = self.fragments.as_mut() else {
                    return Err(Error::Protocol(ProtocolError::UnexpectedContinueFrame));
                };
                let size = f.data.len() + payload.len();
                if size > max {
                    return Err(too_long(size, max));
                }
                if f.data.capacity() < size {
                    // Doubling, never past the limit.
                    let cap = (f.data.capacity() * 2).clamp(size, max);
                    f.data.reserve_exact(cap - f.data.len());
                }
                f.data.extend_from_slice(payload);
                f.check()?;
                if !header.is_final {
                    return Ok(None);
                }
                let Some(f) = self.fragments.take() else {
                    return Ok(None);
                };
                let Fragments { text, data, .. } = *f;
                message(text, data).map(Some)
            }
            OpCode::Data(d @ (Data::Text | Data::Binary)) => {
                if self.fragments.is_some() {
                    return Err(Error::Protocol(ProtocolError::ExpectedFragment(d)));
                }
                let text = d == Data::Text;
                if header.is_final {
                    message(text, payload.to_vec()).map(Some)
                } else {
                    let mut f = Box::new(Fragments {
                        text,
                        data: payload.to_vec(),
                        checked: 0,
                    });
                    f.check()?;
                    self.fragments = Some(f);
                    Ok(None)
                }
            }
            OpCode::Data(Data::Reserved(op)) => {
                Err(Error::Protocol(ProtocolError::UnknownDataFrameType(op)))
            }
        }
    }
}

/// A whole frame at the start of `buf`: its header, where its payload is, and the bytes it
/// takes. `Ok(None)` while incomplete, with the frame's total length when the header is in.
enum Parsed {
    Whole {
        header: FrameHeader,
        payload: std::ops::Range<usize>,
    },
    Partial(Option<usize>),
}

/// The frame at the start of `buf`; one announcing more than `limit` payload bytes is refused at
/// once (`max_message` is the size reported).
fn parse(buf: &[u8], limit: usize, max_message: usize) -> Result<Parsed, Error> {
    let mut cursor = Cursor::new(buf);
    let Some((header, len)) = FrameHeader::parse(&mut cursor)? else {
        return Ok(Parsed::Partial(None));
    };
    let start = cursor.position() as usize;
    if len > limit as u64 {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        return Err(too_long(
            len.saturating_add(max_message - limit),
            max_message,
        ));
    }
    let end = start + len as usize;
    if buf.len() < end {
        return Ok(Parsed::Partial(Some(end)));
    }
    Ok(Parsed::Whole {
        header,
        payload: start..end,
    })
}

fn too_long(size: usize, max_size: usize) -> Error {
    Error::Capacity(CapacityError::MessageTooLong { size, max_size })
}

fn message(text: bool, data: Vec<u8>) -> Result<Message, Error> {
    if text {
        let s = String::from_utf8(data).map_err(|e| Error::Utf8(e.to_string()))?;
        Ok(Message::Text(Utf8Bytes::from(s)))
    } else {
        Ok(Message::Binary(Bytes::from(data)))
    }
}

/// A close frame's payload: none, or a code and a UTF-8 reason.
fn close_frame(payload: &[u8]) -> Result<Option<CloseFrame>, Error> {
    match payload {
        [] => Ok(None),
        [_] => Err(Error::Protocol(ProtocolError::InvalidCloseSequence)),
        [a, b, reason @ ..] => {
            let reason = std::str::from_utf8(reason).map_err(|e| Error::Utf8(e.to_string()))?;
            Ok(Some(CloseFrame {
                code: CloseCode::from(u16::from_be_bytes([*a, *b])),
                reason: Utf8Bytes::from(reason),
            }))
        }
    }
}

/// What one read gave.
enum Read {
    /// Bytes now in `held`.
    More,
    /// The server closed the socket.
    Eof,
    /// A whole frame read through the scratch buffer, handled: its message (if it completed
    /// one), the rest kept in `held`.
    Frame(Option<Message>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> LeanWs<S> {
    /// Reads once. With nothing held, into the per-thread scratch buffer; a whole frame there is
    /// handled at once and only the bytes after it are kept. With a frame started, straight
    /// into `held`, which grows as bytes arrive (see the module doc), up to the frame's `total`
    /// length once its header is in.
    fn poll_read_some(
        &mut self,
        cx: &mut Context<'_>,
        total: Option<usize>,
    ) -> Poll<Result<Read, Error>> {
        if self.taken < self.held.len() {
            if self.taken > 0 {
                self.held.drain(..self.taken);
                self.taken = 0;
            }
            let len = self.held.len();
            let goal =
                (len + len.max(MIN_READ)).min(total.map_or(usize::MAX, |t| t.max(len + MIN_READ)));
            if self.held.capacity() < goal {
                self.held.reserve_exact(goal - len);
            }
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.io),
                cx,
                &mut self.held
            ))?;
            return Poll::Ready(Ok(if n == 0 { Read::Eof } else { Read::More }));
        }
        SCRATCH_BUF.with(|cell| {
            let mut scratch = cell.borrow_mut();
            if scratch.len() < SCRATCH {
                scratch.resize(SCRATCH, 0);
            }
            let mut rb = tokio::io::ReadBuf::new(&mut scratch[..]);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(Read::Eof));
            }
            let got = &scratch[..n];
            match parse(got, self.frame_limit(), self.max_message)? {
                Parsed::Whole { header, payload } => {
                    let end = payload.end;
                    let msg = self.on_frame(header, &got[payload])?;
                    if end < got.len() {
                        self.held = got[end..].to_vec();
                        self.taken = 0;
                    }
                    Poll::Ready(Ok(Read::Frame(msg)))
                }
                Parsed::Partial(total) => {
                    // Room for what the frame announced, as far as one more read goes.
                    let mut held =
                        Vec::with_capacity(total.map_or(n, |t| t.min(n + MIN_READ)).max(n));
                    held.extend_from_slice(got);
                    self.held = held;
                    self.taken = 0;
                    Poll::Ready(Ok(Read::More))
                }
            }
        })
    }

    /// The whole frame at `taken` in `held`, handled: `Ok(Ok(message))` (`None` when it
    /// completes none), or `Ok(Err(total))` while it is incomplete. Frames are taken in place.
    fn take_held(&mut self) -> Result<Result<Option<Message>, Option<usize>>, Error> {
        let held = std::mem::take(&mut self.held);
        let r = match parse(&held[self.taken..], self.frame_limit(), self.max_message) {
            Err(e) => Err(e),
            Ok(Parsed::Partial(total)) => Ok(Err(total)),
            Ok(Parsed::Whole { header, payload }) => {
                let at = self.taken;
                let r = self.on_frame(header, &held[at + payload.start..at + payload.end]);
                self.taken = at + payload.end;
                r.map(Ok)
            }
        };
        if self.taken >= held.len() {
            self.taken = 0;
        } else {
            self.held = held;
        }
        r
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for LeanWs<S> {
    type Item = Result<Message, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.state == State::Done {
                this.free_read();
                return Poll::Ready(None);
            }
            // A reply owed (pong, close) goes out first; a full socket does not stop reading.
            if let Err(e) = this.write_owed(cx) {
                return this.fail(e);
            }
            let mut total = None;
            if this.taken < this.held.len() {
                match this.take_held() {
                    Err(e) => return this.fail(e),
                    Ok(Ok(Some(m))) => return this.deliver(cx, m),
                    Ok(Ok(None)) => continue,
                    Ok(Err(t)) => total = t,
                }
            }
            match this.poll_read_some(cx, total) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return this.fail(e),
                Poll::Ready(Ok(Read::More)) => {}
                Poll::Ready(Ok(Read::Frame(None))) => {}
                Poll::Ready(Ok(Read::Frame(Some(m)))) => return this.deliver(cx, m),
                Poll::Ready(Ok(Read::Eof)) => {
                    if this.state == State::Closed {
                        this.state = State::Done;
                        this.free_read();
                        return Poll::Ready(None);
                    }
                    return this.fail(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake));
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Message> for LeanWs<S> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        let p = this.poll_write_out(cx);
        this.park_writer(cx, p)
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Error> {
        let this = self.get_mut();
        match this.state {
            State::Open => {}
            State::Done => return Err(Error::AlreadyClosed),
            State::CloseSent | State::Closed => {
                return Err(Error::Protocol(ProtocolError::SendAfterClosing));
            }
        }
        let control = |p: &[u8]| {
            if p.len() > MAX_CONTROL {
                Err(Error::Protocol(ProtocolError::ControlFrameTooBig))
            } else {
                Ok(())
            }
        };
        let (opcode, payload): (OpCode, &[u8]) = match &item {
            Message::Text(t) => (OpCode::Data(Data::Text), t.as_bytes()),
            Message::Binary(b) => (OpCode::Data(Data::Binary), b),
            Message::Ping(p) => {
                control(p)?;
                (OpCode::Control(Control::Ping), p)
            }
            Message::Pong(p) => {
                control(p)?;
                (OpCode::Control(Control::Pong), p)
            }
            Message::Close(frame) => {
                let mut payload = Vec::new();
                if let Some(f) = frame {
                    payload.extend_from_slice(&u16::from(f.code).to_be_bytes());
                    payload.extend_from_slice(f.reason.as_bytes());
                }
                control(&payload)?;
                this.queue_close(&payload);
                return Ok(());
            }
            Message::Frame(_) => {
                return Err(Error::Protocol(ProtocolError::InvalidOpcode(0)));
            }
        };
        if payload.len() > this.max_message {
            // The bound on what one socket queues for writing (module doc).
            return Err(Error::WriteBufferFull(Box::new(item)));
        }
        let frame = Self::encode(opcode, payload);
        if this.out.is_empty() {
            this.out = frame;
        } else {
            this.out.extend(frame);
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        let p = this.flush_all(cx);
        this.park_writer(cx, p)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        let p = this.close_all(cx);
        this.park_writer(cx, p)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> LeanWs<S> {
    /// guestd's close frame, after what is queued and a pong owed (nothing follows a close).
    fn queue_close(&mut self, payload: &[u8]) {
        if let Some(r) = self.reply.take() {
            self.out.extend_from_slice(&r);
        }
        self.out
            .extend(Self::encode(OpCode::Control(Control::Close), payload));
        self.state = State::CloseSent;
    }

    fn flush_all(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        ready!(self.poll_write_out(cx))?;
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.unflushed = false;
        Poll::Ready(Ok(()))
    }

    /// The close frame (once), everything owed before it, a flush, then the write side shut.
    fn close_all(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.state == State::Open {
            self.queue_close(&[]);
        }
        if self.state == State::Done && self.out.is_empty() && self.reply.is_none() {
            return Poll::Ready(Ok(()));
        }
        ready!(self.flush_all(cx))?;
        ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests;
