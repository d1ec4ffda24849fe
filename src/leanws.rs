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
//! whole, or frames after the one returned) is kept with the socket, in a `Vec` freed as soon as
//! it is consumed. A frame larger than one read is read straight into that `Vec`, reserved once
//! for the frame's announced length (bounded by `max_message`). Writes encode a frame into an
//! exact-size `Vec`, written through and freed when written. So between frames a socket holds
//! its transport and a few words ([`LeanWs::buffered_capacity`] is 0).
//!
//! The protocol rules are tungstenite's (and its types: [`Message`], [`CloseFrame`], [`Error`],
//! and its header parser), so the session actors read either stream alike and
//! `stream.lean_ws = false` goes back to tokio-tungstenite: server frames must be unmasked, no
//! reserved bits (no extension is negotiated), control frames whole and at most 125 bytes, a
//! fragmented message continued before anything else starts, text valid UTF-8, no message over
//! `max_message`. A ping is answered with a pong (and also returned, as proof of life), a close
//! is answered with the same code and ends the stream once the reply is written; a socket that
//! ends without a close frame is an error (`ResetWithoutClosingHandshake`), as in tungstenite.
//! Client frames are masked with a fresh random key each.

use bytes::Bytes;
use futures::{Sink, Stream};
use std::cell::RefCell;
use std::io::Cursor;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tokio_tungstenite::tungstenite::{Error, Message, Utf8Bytes};

/// The per-thread buffer reads land in: larger than any heartbeat or message burst in one read,
/// small enough to be nothing per worker thread.
pub const SCRATCH: usize = 16 * 1024;
/// A read into a socket's own buffer (a frame larger than one read) asks for at least this much.
const MIN_READ: usize = 4 * 1024;
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
    /// The server sent a close; the stream ends once the reply is written.
    CloseReceived,
    /// Nothing more: closed both ways, failed, or reset.
    Done,
}

/// A message arriving in fragments.
struct Fragments {
    text: bool,
    data: Vec<u8>,
}

/// A client websocket over `S` (see the module doc).
pub struct LeanWs<S> {
    io: S,
    /// Bytes read and not yet parsed: empty (no allocation) between frames.
    held: Vec<u8>,
    /// A fragmented message being put together (rare: boxed).
    fragments: Option<Box<Fragments>>,
    /// Encoded bytes not yet written: empty (no allocation) once written.
    out: Vec<u8>,
    max_message: usize,
    state: State,
}

impl<S: AsyncRead + AsyncWrite + Unpin> LeanWs<S> {
    /// A websocket over `io`, after the upgrade: `rest` holds whatever the server sent past the
    /// reply's head (already frames). No message (or frame) over `max_message` bytes is read.
    pub fn from_partially_read(io: S, rest: Vec<u8>, max_message: usize) -> Self {
        LeanWs {
            io,
            held: rest,
            fragments: None,
            out: Vec::new(),
            max_message,
            state: State::Open,
        }
    }

    /// Bytes of buffer this socket holds (0 while idle).
    pub fn buffered_capacity(&self) -> usize {
        self.held.capacity()
            + self.out.capacity()
            + self.fragments.as_ref().map_or(0, |f| f.data.capacity())
    }

    /// Writes `out` until it is empty, then frees it.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(Error::Io(std::io::ErrorKind::WriteZero.into())));
            }
            self.out.drain(..n);
        }
        self.out = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Appends one masked frame to `out`.
    fn encode(&mut self, opcode: OpCode, payload: &[u8]) {
        let mask: [u8; 4] = rand::random();
        let header = FrameHeader {
            opcode,
            mask: Some(mask),
            ..FrameHeader::default()
        };
        let len = payload.len() as u64;
        self.out.reserve_exact(header.len(len) + payload.len());
        // Writing into a Vec cannot fail.
        let _ = header.format(len, &mut self.out);
        self.out
            .extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    }

    /// Returns `m`, writing a reply it asked for (a pong, a close) now if the socket takes it: a write
    /// that fails is met again, and reported, on the next poll.
    fn deliver(
        &mut self,
        cx: &mut Context<'_>,
        m: Message,
    ) -> Poll<Option<Result<Message, Error>>> {
        if !self.out.is_empty() && self.state != State::Done {
            let _ = self.poll_write_out(cx);
        }
        Poll::Ready(Some(Ok(m)))
    }

    /// Ends the stream for good, freeing every buffer.
    fn fail(&mut self, e: Error) -> Poll<Option<Result<Message, Error>>> {
        self.state = State::Done;
        self.held = Vec::new();
        self.out = Vec::new();
        self.fragments = None;
        Poll::Ready(Some(Err(e)))
    }

    /// One whole frame: the message it completes, if any.
    fn on_frame(&mut self, header: FrameHeader, payload: &[u8]) -> Result<Option<Message>, Error> {
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
                            self.encode(OpCode::Control(Control::Pong), payload);
                        }
                        Ok(Some(Message::Ping(Bytes::copy_from_slice(payload))))
                    }
                    Control::Pong => Ok(Some(Message::Pong(Bytes::copy_from_slice(payload)))),
                    Control::Close => {
                        let frame = close_frame(payload)?;
                        // A message cut short by the close is never completed.
                        self.fragments = None;
                        match self.state {
                            State::Open => {
                                // Answer with the same code (RFC 6455 5.5.1); a code that may
                                // not be sent on the wire is answered as a protocol error.
                                let reply = match &frame {
                                    None => Vec::new(),
                                    Some(f) if f.code.is_allowed() => {
                                        u16::from(f.code).to_be_bytes().to_vec()
                                    }
                                    Some(_) => 1002u16.to_be_bytes().to_vec(),
                                };
                                self.encode(OpCode::Control(Control::Close), &reply);
                                self.state = State::CloseReceived;
                            }
                            _ => self.state = State::Done,
                        }
                        Ok(Some(Message::Close(frame)))
                    }
                    Control::Reserved(op) => {
                        Err(Error::Protocol(ProtocolError::UnknownControlFrameType(op)))
                    }
                }
            }
            OpCode::Data(Data::Continue) => {
                let Some(f) = self.fragments.as_mut() else {
                    return Err(Error::Protocol(ProtocolError::UnexpectedContinueFrame));
                };
                let size = f.data.len() + payload.len();
                if size > self.max_message {
                    return Err(too_long(size, self.max_message));
                }
                f.data.extend_from_slice(payload);
                if !header.is_final {
                    return Ok(None);
                }
                let Some(f) = self.fragments.take() else {
                    return Ok(None);
                };
                let Fragments { text, data } = *f;
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
                    self.fragments = Some(Box::new(Fragments {
                        text,
                        data: payload.to_vec(),
                    }));
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

fn parse(buf: &[u8], max_message: usize) -> Result<Parsed, Error> {
    let mut cursor = Cursor::new(buf);
    let Some((header, len)) = FrameHeader::parse(&mut cursor)? else {
        return Ok(Parsed::Partial(None));
    };
    let start = cursor.position() as usize;
    if len > max_message as u64 {
        return Err(too_long(
            usize::try_from(len).unwrap_or(usize::MAX),
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
    /// The whole frame at the start of `buf`, handled (`Ok(Ok(message))`, `None` when it
    /// completes none), with the bytes after it kept in `held`; or `Ok(Err(total))` while the
    /// frame is incomplete (its total length once the header is in). `buf` is never `held`
    /// itself: the caller takes it out first.
    fn take_frame(&mut self, buf: &[u8]) -> Result<Result<Option<Message>, Option<usize>>, Error> {
        match parse(buf, self.max_message)? {
            Parsed::Partial(total) => Ok(Err(total)),
            Parsed::Whole { header, payload } => {
                let end = payload.end;
                let msg = self.on_frame(header, &buf[payload])?;
                if end < buf.len() {
                    self.held = buf[end..].to_vec();
                }
                Ok(Ok(msg))
            }
        }
    }

    /// Reads once. With nothing held, into the per-thread scratch buffer; a whole frame there is
    /// handled at once and only the bytes after it are kept. With a frame started, straight
    /// into `held`, reserved for the whole frame when its length is known.
    fn poll_read_some(
        &mut self,
        cx: &mut Context<'_>,
        want: Option<usize>,
    ) -> Poll<Result<Read, Error>> {
        if !self.held.is_empty() {
            let len = self.held.len();
            let target = want
                .unwrap_or(0)
                .max(len + MIN_READ)
                .min(len + self.max_message.max(MIN_READ));
            self.held.reserve_exact(target - len);
            self.held.resize(target, 0);
            let mut rb = ReadBuf::new(&mut self.held[len..]);
            let r = Pin::new(&mut self.io).poll_read(cx, &mut rb);
            let n = rb.filled().len();
            self.held.truncate(len + n);
            ready!(r)?;
            return Poll::Ready(Ok(if n == 0 { Read::Eof } else { Read::More }));
        }
        SCRATCH_BUF.with(|cell| {
            let mut scratch = cell.borrow_mut();
            if scratch.len() < SCRATCH {
                scratch.resize(SCRATCH, 0);
            }
            let mut rb = ReadBuf::new(&mut scratch[..]);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(Read::Eof));
            }
            let got = &scratch[..n];
            match self.take_frame(got)? {
                Ok(msg) => Poll::Ready(Ok(Read::Frame(msg))),
                Err(total) => {
                    let mut held = Vec::with_capacity(total.unwrap_or(n).max(n));
                    held.extend_from_slice(got);
                    self.held = held;
                    Poll::Ready(Ok(Read::More))
                }
            }
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for LeanWs<S> {
    type Item = Result<Message, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.state == State::Done {
                this.held = Vec::new();
                this.fragments = None;
                return Poll::Ready(None);
            }
            // A reply owed (pong, close) goes out first; a full socket does not stop reading.
            if !this.out.is_empty() {
                if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
                    return this.fail(e);
                }
            }
            if this.state == State::CloseReceived {
                if !this.out.is_empty() {
                    return Poll::Pending;
                }
                this.state = State::Done;
                continue;
            }
            let mut want = None;
            if !this.held.is_empty() {
                let held = std::mem::take(&mut this.held);
                match this.take_frame(&held) {
                    Err(e) => return this.fail(e),
                    Ok(Ok(Some(m))) => return this.deliver(cx, m),
                    Ok(Ok(None)) => continue,
                    Ok(Err(total)) => {
                        this.held = held;
                        want = total;
                    }
                }
            }
            match this.poll_read_some(cx, want) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return this.fail(e),
                Poll::Ready(Ok(Read::More)) => {}
                Poll::Ready(Ok(Read::Frame(None))) => {}
                Poll::Ready(Ok(Read::Frame(Some(m)))) => return this.deliver(cx, m),
                Poll::Ready(Ok(Read::Eof)) => {
                    if this.state == State::CloseSent {
                        this.state = State::Done;
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
        self.get_mut().poll_write_out(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Error> {
        let this = self.get_mut();
        match this.state {
            State::Open => {}
            State::Done => return Err(Error::AlreadyClosed),
            State::CloseSent | State::CloseReceived => {
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
        match item {
            Message::Text(t) => this.encode(OpCode::Data(Data::Text), t.as_bytes()),
            Message::Binary(b) => this.encode(OpCode::Data(Data::Binary), &b),
            Message::Ping(p) => {
                control(&p)?;
                this.encode(OpCode::Control(Control::Ping), &p);
            }
            Message::Pong(p) => {
                control(&p)?;
                this.encode(OpCode::Control(Control::Pong), &p);
            }
            Message::Close(frame) => {
                let mut payload = Vec::new();
                if let Some(f) = frame {
                    payload.extend_from_slice(&u16::from(f.code).to_be_bytes());
                    payload.extend_from_slice(f.reason.as_bytes());
                }
                control(&payload)?;
                this.encode(OpCode::Control(Control::Close), &payload);
                this.state = State::CloseSent;
            }
            Message::Frame(_) => {
                return Err(Error::Protocol(ProtocolError::InvalidOpcode(0)));
            }
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        if this.state == State::Open {
            this.encode(OpCode::Control(Control::Close), &[]);
            this.state = State::CloseSent;
        }
        if this.state == State::Done && this.out.is_empty() {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_write_out(cx))?;
        ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests;
