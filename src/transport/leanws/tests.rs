//! The lean websocket against tungstenite's server over real loopback sockets, and against
//! hand-made frames (every rule, every split of the bytes) over an in-memory pipe.

use super::*;
use futures::{SinkExt, StreamExt};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const MAX: usize = 256 * 1024;

/// A server frame (unmasked unless `mask` is given).
fn frame(fin: bool, opcode: u8, payload: &[u8], rsv: u8, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut v = vec![(if fin { 0x80 } else { 0 }) | (rsv << 4) | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => v.push(m | n as u8),
        n if n < 65536 => {
            v.push(m | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(m | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            v.extend_from_slice(&k);
            v.extend(payload.iter().zip(k.iter().cycle()).map(|(b, k)| b ^ k));
        }
        None => v.extend_from_slice(payload),
    }
    v
}

fn text(s: &str) -> Vec<u8> {
    frame(true, 1, s.as_bytes(), 0, None)
}

/// The client over one end of a pipe; the other end plays the server.
fn pipe(max: usize) -> (LeanWs<DuplexStream>, DuplexStream) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    (LeanWs::from_partially_read(a, Vec::new(), max), b)
}

/// Reads one client frame off the server end: (fin, opcode, unmasked payload), checking it is
/// masked.
async fn client_frame(server: &mut DuplexStream) -> (bool, u8, Vec<u8>) {
    let mut h = [0u8; 2];
    server.read_exact(&mut h).await.unwrap();
    assert!(h[1] & 0x80 != 0, "client frames are masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            server.read_exact(&mut b).await.unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            server.read_exact(&mut b).await.unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut k = [0u8; 4];
    server.read_exact(&mut k).await.unwrap();
    let mut p = vec![0u8; len];
    server.read_exact(&mut p).await.unwrap();
    for (i, b) in p.iter_mut().enumerate() {
        *b ^= k[i % 4];
    }
    (h[0] & 0x80 != 0, h[0] & 0x0f, p)
}

#[tokio::test]
async fn talks_to_tungstenites_server_over_a_socket_and_holds_nothing_while_idle() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let cfg = WebSocketConfig::default().max_message_size(Some(MAX));
        let mut ws = tokio_tungstenite::accept_async_with_config(tcp, Some(cfg))
            .await
            .unwrap();
        ws.send(Message::text("hello")).await.unwrap();
        ws.send(Message::binary(vec![7u8; 100_000])).await.unwrap();
        ws.send(Message::Ping(Bytes::from_static(b"p1")))
            .await
            .unwrap();
        // What the client sends back, in order: its pong (automatic), then its messages.
        let mut got = Vec::new();
        while let Some(m) = ws.next().await {
            match m.unwrap() {
                Message::Close(c) => {
                    got.push(format!("close {:?}", c.map(|c| u16::from(c.code))));
                    // Reading on writes the close reply and ends at the socket's end.
                    while ws.next().await.is_some() {}
                    break;
                }
                Message::Text(t) => got.push(format!("text {}", t.len())),
                Message::Pong(p) => got.push(format!("pong {}", String::from_utf8_lossy(&p))),
                other => got.push(format!("{other:?}")),
            }
        }
        got
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    // The client handshake by hand, as `stream::Connector` does.
    let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
    let url = url::Url::parse(&format!("ws://{addr}/x")).unwrap();
    let mut tcp = tcp;
    tcp.write_all(crate::transport::stream::upgrade_request(&url, &key, None).as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let head = loop {
        let mut chunk = [0u8; 256];
        let n = tcp.read(&mut chunk).await.unwrap();
        buf.extend_from_slice(&chunk[..n]);
        if let Some(h) = crate::transport::stream::parse_upgrade_reply(&buf, &key).unwrap() {
            break h;
        }
    };
    let mut ws = LeanWs::from_partially_read(tcp, buf[head..].to_vec(), MAX);
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(t))) if t == "hello"));
    match ws.next().await {
        Some(Ok(Message::Binary(b))) => assert!(b.len() == 100_000 && b.iter().all(|x| *x == 7)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(ws.next().await, Some(Ok(Message::Ping(p))) if p == "p1"));
    assert_eq!(
        ws.buffered_capacity(),
        0,
        "nothing held once read, the pong written"
    );
    ws.send(Message::text("x".repeat(70_000))).await.unwrap();
    assert_eq!(ws.buffered_capacity(), 0, "nothing held once written");
    ws.close().await.unwrap();
    // The server's close reply ends the stream.
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(_))) => continue,
            None => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        server.await.unwrap(),
        vec!["pong p1", "text 70000", "close None"]
    );
    assert_eq!(ws.buffered_capacity(), 0);
}

#[tokio::test]
async fn frames_split_anywhere_and_coalesced_arrive_whole_and_in_order() {
    let mut wire = Vec::new();
    wire.extend(text("one"));
    wire.extend(frame(false, 1, b"tw", 0, None));
    wire.extend(frame(true, 9, b"mid", 0, None));
    wire.extend(frame(true, 0, "o ✓".as_bytes(), 0, None));
    wire.extend(frame(true, 2, &[1, 2, 3], 0, None));
    wire.extend(text(&"y".repeat(300)));
    for cut in 1..wire.len() {
        let (mut ws, mut server) = pipe(MAX);
        let (a, b) = wire.split_at(cut);
        let (a, b) = (a.to_vec(), b.to_vec());
        let writer = tokio::spawn(async move {
            server.write_all(&a).await.unwrap();
            tokio::task::yield_now().await;
            server.write_all(&b).await.unwrap();
            server
        });
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(match ws.next().await.unwrap().unwrap() {
                Message::Text(t) => format!("t:{}", t.chars().take(5).collect::<String>()),
                Message::Binary(b) => format!("b:{:?}", b.to_vec()),
                Message::Ping(p) => format!("ping:{}", String::from_utf8_lossy(&p)),
                m => format!("{m:?}"),
            });
        }
        assert_eq!(
            got,
            ["t:one", "ping:mid", "t:two ✓", "b:[1, 2, 3]", "t:yyyyy"],
            "cut at {cut}"
        );
        assert_eq!(ws.buffered_capacity(), 0, "cut at {cut}");
        let mut server = writer.await.unwrap();
        // The ping in the middle of the fragmented message was answered.
        assert_eq!(client_frame(&mut server).await, (true, 10, b"mid".to_vec()));
    }
}

/// A close from the server is answered with the same frame (code and reason, as tungstenite
/// does); the stream ends at the socket's end, not before; nothing can be sent after it.
#[tokio::test]
async fn a_close_is_answered_with_its_frame_and_the_stream_ends_at_the_sockets_end() {
    let (mut ws, mut server) = pipe(MAX);
    let mut close = 4001u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"bye");
    server
        .write_all(&frame(true, 8, &close, 0, None))
        .await
        .unwrap();
    match ws.next().await {
        Some(Ok(Message::Close(Some(c)))) => {
            assert_eq!((u16::from(c.code), c.reason.as_str()), (4001, "bye"))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(client_frame(&mut server).await, (true, 8, close));
    assert!(ws.send(Message::text("late")).await.is_err());
    // Still open until the server ends the socket.
    let waiting = tokio::time::timeout(std::time::Duration::from_millis(20), ws.next()).await;
    assert!(waiting.is_err(), "the stream waits for the socket's end");
    drop(server);
    assert!(ws.next().await.is_none());
    assert_eq!(ws.buffered_capacity(), 0);
}

/// A frame after the server's close is an error (tungstenite: ReceivedAfterClosing).
#[tokio::test]
async fn a_frame_after_the_servers_close_is_an_error() {
    let (mut ws, mut server) = pipe(MAX);
    let mut wire = frame(true, 8, &1000u16.to_be_bytes(), 0, None);
    wire.extend(text("late"));
    server.write_all(&wire).await.unwrap();
    assert!(matches!(ws.next().await, Some(Ok(Message::Close(Some(_))))));
    assert!(matches!(
        ws.next().await,
        Some(Err(Error::Protocol(ProtocolError::ReceivedAfterClosing)))
    ));
    assert!(ws.next().await.is_none());
}

/// Found by the fuzz target: a close in the middle of a fragmented message, with a code that
/// may not be sent on the wire, left the message's start held after the stream ended. The code
/// is a protocol error, told as tungstenite tells it: 1002 "Protocol violation", in the message
/// returned and in the reply (it used to pass the illegal code on).
#[tokio::test]
async fn a_close_inside_a_fragmented_message_frees_it_and_is_answered_1002() {
    let (mut ws, mut server) = pipe(MAX);
    let mut wire = frame(false, 1, b"ab", 0, None);
    wire.extend(frame(true, 8, &25643u16.to_be_bytes(), 0, None));
    server.write_all(&wire).await.unwrap();
    match ws.next().await {
        Some(Ok(Message::Close(Some(c)))) => assert_eq!(
            (u16::from(c.code), c.reason.as_str()),
            (1002, "Protocol violation")
        ),
        other => panic!("{other:?}"),
    }
    let mut reply = 1002u16.to_be_bytes().to_vec();
    reply.extend_from_slice(b"Protocol violation");
    assert_eq!(client_frame(&mut server).await, (true, 8, reply));
    drop(server);
    assert!(ws.next().await.is_none());
    assert_eq!(ws.buffered_capacity(), 0);
}

#[tokio::test]
async fn a_socket_that_ends_without_a_close_is_an_error_then_nothing() {
    let (mut ws, mut server) = pipe(MAX);
    server.write_all(&text("hi")).await.unwrap();
    server.write_all(&[0x81, 0x05, b'a']).await.unwrap();
    drop(server);
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(t))) if t == "hi"));
    assert!(matches!(
        ws.next().await,
        Some(Err(Error::Protocol(
            ProtocolError::ResetWithoutClosingHandshake
        )))
    ));
    assert!(ws.next().await.is_none());
    assert_eq!(ws.buffered_capacity(), 0);
}

#[tokio::test]
async fn every_broken_frame_is_a_clear_error_and_ends_the_stream() {
    let long = vec![b'a'; 200];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("masked", frame(true, 1, b"x", 0, Some([1, 2, 3, 4]))),
        ("reserved bits", frame(true, 1, b"x", 4, None)),
        ("control fragmented", frame(false, 9, b"", 0, None)),
        ("control too big", frame(true, 9, &long, 0, None)),
        ("continuation first", frame(true, 0, b"x", 0, None)),
        ("unknown data opcode", frame(true, 3, b"x", 0, None)),
        ("unknown control opcode", frame(true, 11, b"x", 0, None)),
        ("not utf-8", frame(true, 1, &[0xff, 0xfe], 0, None)),
        ("close of one byte", frame(true, 8, &[3], 0, None)),
        ("too long", frame(true, 2, &vec![0u8; 2000], 0, None)),
        ("too long once put together", {
            let mut v = frame(false, 1, &[b'a'; 600], 0, None);
            v.extend(frame(true, 0, &[b'a'; 600], 0, None));
            v
        }),
        ("new message inside a fragmented one", {
            let mut v = frame(false, 1, b"a", 0, None);
            v.extend(text("b"));
            v
        }),
    ];
    for (name, wire) in cases {
        let (mut ws, mut server) = pipe(1000);
        server.write_all(&wire).await.unwrap();
        match ws.next().await {
            Some(Err(e)) => assert!(!e.to_string().is_empty(), "{name}"),
            other => panic!("{name}: {other:?}"),
        }
        assert!(ws.next().await.is_none(), "{name}");
        assert_eq!(ws.buffered_capacity(), 0, "{name}");
    }
}

#[tokio::test]
async fn an_announced_length_over_the_limit_is_refused_before_it_arrives() {
    let (mut ws, mut server) = pipe(1000);
    // Header only: 2^40 bytes announced.
    let mut h = vec![0x82, 127];
    h.extend_from_slice(&(1u64 << 40).to_be_bytes());
    server.write_all(&h).await.unwrap();
    assert!(matches!(
        ws.next().await,
        Some(Err(Error::Capacity(CapacityError::MessageTooLong { .. })))
    ));
}

#[tokio::test]
async fn client_frames_are_masked_and_a_close_is_sent_once() {
    let (mut ws, mut server) = pipe(MAX);
    ws.send(Message::text("hey")).await.unwrap();
    ws.send(Message::Ping(Bytes::new())).await.unwrap();
    assert!(
        ws.send(Message::Ping(Bytes::from(vec![0; 126])))
            .await
            .is_err()
    );
    ws.close().await.unwrap();
    assert_eq!(client_frame(&mut server).await, (true, 1, b"hey".to_vec()));
    assert_eq!(client_frame(&mut server).await, (true, 9, Vec::new()));
    assert_eq!(client_frame(&mut server).await, (true, 8, Vec::new()));
    // The write side is shut: nothing follows the close.
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    // The server's answer, then the socket's end, end the stream.
    server
        .write_all(&frame(true, 8, &[], 0, None))
        .await
        .unwrap();
    assert!(matches!(ws.next().await, Some(Ok(Message::Close(None)))));
    drop(server);
    assert!(ws.next().await.is_none());
}

/// Bound 1 (issue 23: 1.7 GiB in 12 s): a server that floods pings and never reads costs one
/// owed pong, not one per ping. The pongs that go out answer pings in order, and the latest
/// ping is answered once the server reads.
#[tokio::test]
async fn a_ping_flood_from_a_server_that_never_reads_holds_one_pong() {
    const PINGS: u32 = 20_000;
    let (a, mut server) = tokio::io::duplex(1024);
    let mut ws = LeanWs::from_partially_read(a, Vec::new(), MAX);
    let flood = tokio::spawn(async move {
        for i in 0..PINGS {
            server
                .write_all(&frame(true, 9, &i.to_be_bytes(), 0, None))
                .await
                .unwrap();
        }
        // Now read: pongs in order, up to the latest ping's.
        let mut last = None;
        loop {
            let (fin, op, p) = client_frame(&mut server).await;
            assert!(fin && op == 10, "only pongs: {op}");
            let n = u32::from_be_bytes(p.try_into().unwrap());
            assert!(
                last.is_none_or(|l| n > l),
                "pongs in order: {n} after {last:?}"
            );
            last = Some(n);
            if n == PINGS - 1 {
                break;
            }
        }
        server
    });
    let mut most = 0;
    for i in 0..PINGS {
        match ws.next().await {
            Some(Ok(Message::Ping(p))) => assert_eq!(&p[..], &i.to_be_bytes()),
            other => panic!("{other:?}"),
        }
        most = most.max(ws.buffered_capacity());
    }
    // Keep reading (nothing comes) so the owed pong is written as the server reads.
    let mut server = tokio::select! {
        s = flood => s.unwrap(),
        m = ws.next() => panic!("{m:?}"),
    };
    // At most one read's bytes not yet parsed, one pong being written and one owed (20,000
    // pongs would be 200,000 bytes).
    assert!(most <= SCRATCH + 2 * (14 + 125), "held {most} bytes");
    server
        .write_all(&frame(true, 8, &[], 0, None))
        .await
        .unwrap();
    assert!(matches!(ws.next().await, Some(Ok(Message::Close(None)))));
}

/// After guestd's close, the stream ends cleanly only with the server's close reply: a socket
/// that ends before it is `ResetWithoutClosingHandshake`, as in tungstenite (it used to read as
/// a clean end).
#[tokio::test]
async fn after_guestds_close_an_end_without_the_servers_reply_is_an_error() {
    let (mut ws, mut server) = pipe(MAX);
    ws.close().await.unwrap();
    assert_eq!(client_frame(&mut server).await, (true, 8, Vec::new()));
    drop(server);
    assert!(matches!(
        ws.next().await,
        Some(Err(Error::Protocol(
            ProtocolError::ResetWithoutClosingHandshake
        )))
    ));
}

/// A frame's announced length is not reserved up front: what is held grows with the bytes that
/// arrived (it reserved, and zero-filled, the whole announced length at once).
#[tokio::test]
async fn an_announced_frame_is_held_only_as_its_bytes_arrive() {
    let (mut ws, mut server) = pipe(MAX);
    let body: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let wire = frame(true, 2, &body, 0, None);
    let mut at = 0;
    for part in [100usize, 20_000, 60_000] {
        server.write_all(&wire[at..at + part]).await.unwrap();
        at += part;
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(10), ws.next()).await;
        assert!(waiting.is_err(), "the frame is not whole yet");
        let held = ws.buffered_capacity();
        assert!(
            held <= 2 * at + MIN_READ,
            "{held} bytes held for {at} received"
        );
    }
    let rest = wire[at..].to_vec();
    let _server = tokio::spawn(async move {
        server.write_all(&rest).await.unwrap();
        server
    });
    match ws.next().await {
        Some(Ok(Message::Binary(b))) => assert!(b[..] == body[..]),
        other => panic!("{other:?}"),
    }
    assert_eq!(ws.buffered_capacity(), 0);
}

/// A continuation frame that would take its message over the limit is refused when its header
/// arrives, before its bytes (it used to wait for them).
#[tokio::test]
async fn a_continuation_past_the_limit_is_refused_at_its_header() {
    let (mut ws, mut server) = pipe(1000);
    let mut wire = frame(false, 1, &[b'a'; 600], 0, None);
    wire.extend_from_slice(&[0x80, 126]);
    wire.extend_from_slice(&600u16.to_be_bytes());
    server.write_all(&wire).await.unwrap();
    let r = tokio::time::timeout(std::time::Duration::from_secs(5), ws.next()).await;
    assert!(
        matches!(
            r,
            Ok(Some(Err(Error::Capacity(CapacityError::MessageTooLong {
                size: 1200,
                max_size: 1000
            }))))
        ),
        "{r:?}"
    );
    assert_eq!(ws.buffered_capacity(), 0);
}

/// What one socket queues for writing is bounded: a message over the limit is refused, not
/// queued.
#[tokio::test]
async fn a_message_over_the_limit_is_refused_not_queued() {
    let (mut ws, _server) = pipe(1000);
    assert!(matches!(
        ws.send(Message::binary(vec![0u8; 1001])).await,
        Err(Error::WriteBufferFull(_))
    ));
    assert_eq!(ws.buffered_capacity(), 0);
    ws.send(Message::binary(vec![0u8; 1000])).await.unwrap();
}

/// With reader and writer on two tasks, a reply the reader writes (a pong) must not leave the
/// writer parked for good: the read path's write takes the socket's write wake-up, so it wakes
/// the writer too (the writer was never woken again).
#[tokio::test]
async fn a_writer_on_its_own_task_is_not_robbed_of_its_wake_up() {
    let (a, mut server) = tokio::io::duplex(256);
    let ws = LeanWs::from_partially_read(a, Vec::new(), MAX);
    let (mut tx, mut rx) = ws.split();
    let big = "w".repeat(10_000);
    let b2 = big.clone();
    let writer = tokio::spawn(async move {
        tx.send(Message::text(b2)).await.unwrap();
        tx
    });
    // The writer is parked on a full pipe; now a ping makes the reader owe a pong.
    tokio::task::yield_now().await;
    server
        .write_all(&frame(true, 9, b"p", 0, None))
        .await
        .unwrap();
    let (pinged, got_ping) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(async move {
        let first = rx.next().await;
        assert!(matches!(first, Some(Ok(Message::Ping(_)))), "{first:?}");
        let _ = pinged.send(());
        // Wait for more (none comes): the reader stays parked on the socket.
        let m = rx.next().await;
        (rx, m)
    });
    // Only once the reader has tried to write its pong does the server read.
    got_ping.await.unwrap();
    // The server reads everything: the message, then the pong.
    assert_eq!(client_frame(&mut server).await, (true, 1, big.into_bytes()));
    assert_eq!(client_frame(&mut server).await, (true, 10, b"p".to_vec()));
    let tx = tokio::time::timeout(std::time::Duration::from_secs(10), writer)
        .await
        .expect("the writer was woken")
        .unwrap();
    drop((tx, reader));
}

/// A message as the server sends it, and as the client must read it.
#[derive(Debug, Clone)]
enum Sent {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
}

fn sent() -> impl Strategy<Value = Sent> {
    prop_oneof![
        "[a-z✓ ]{0,300}".prop_map(Sent::Text),
        proptest::collection::vec(any::<u8>(), 0..3000).prop_map(Sent::Binary),
        proptest::collection::vec(any::<u8>(), 0..125).prop_map(Sent::Ping),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Any messages, data ones cut into any fragments with pings between them, written in
    /// chunks of any size: each is read whole, in order, and nothing is held afterwards.
    #[test]
    fn any_messages_in_any_fragments_and_chunks_arrive_whole(
        msgs in proptest::collection::vec((sent(), 1usize..4), 1..12),
        chunks in proptest::collection::vec(1usize..700, 1..40),
    ) {
        let mut wire = Vec::new();
        let mut expect = Vec::new();
        for (m, parts) in &msgs {
            match m {
                Sent::Ping(p) => {
                    wire.extend(frame(true, 9, p, 0, None));
                    expect.push(m.clone());
                }
                Sent::Text(_) | Sent::Binary(_) => {
                    let (op, bytes) = match m {
                        Sent::Text(t) => (1u8, t.as_bytes().to_vec()),
                        Sent::Binary(b) => (2u8, b.clone()),
                        Sent::Ping(_) => unreachable!(),
                    };
                    let step = bytes.len().div_ceil(*parts).max(1);
                    let pieces: Vec<&[u8]> = if bytes.is_empty() { vec![&[][..]] } else { bytes.chunks(step).collect() };
                    for (i, piece) in pieces.iter().enumerate() {
                        let op = if i == 0 { op } else { 0 };
                        wire.extend(frame(i + 1 == pieces.len(), op, piece, 0, None));
                        if i == 0 && pieces.len() > 1 {
                            // A ping may come between fragments.
                            wire.extend(frame(true, 9, b"between", 0, None));
                            expect.push(Sent::Ping(b"between".to_vec()));
                        }
                    }
                    expect.push(m.clone());
                }
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let (mut ws, mut server) = pipe(MAX);
            let writer = tokio::spawn(async move {
                let mut at = 0;
                let mut i = 0;
                while at < wire.len() {
                    let n = chunks[i % chunks.len()].min(wire.len() - at);
                    server.write_all(&wire[at..at + n]).await.unwrap();
                    tokio::task::yield_now().await;
                    at += n;
                    i += 1;
                }
                // Drain the pongs so the pipe never fills.
                let mut sink = Vec::new();
                let _ = server.read_to_end(&mut sink).await;
            });
            for want in &expect {
                let got = ws.next().await.unwrap().unwrap();
                match (want, got) {
                    (Sent::Text(a), Message::Text(b)) => assert_eq!(a.as_str(), b.as_str()),
                    (Sent::Binary(a), Message::Binary(b)) => assert_eq!(&a[..], &b[..]),
                    (Sent::Ping(a), Message::Ping(b)) => assert_eq!(&a[..], &b[..]),
                    (w, g) => panic!("wanted {w:?}, got {g:?}"),
                }
            }
            assert_eq!(ws.buffered_capacity(), 0);
            drop(ws);
            writer.await.unwrap();
        });
    }
}

/// Found by the `ws_differential` fuzz target: a fragmented text message is checked for UTF-8
/// fragment by fragment, as tungstenite does (the whole message was checked only at its end, so
/// what followed the bad fragment decided the error).
#[tokio::test]
async fn invalid_utf8_in_a_text_fragment_is_an_error_at_that_fragment() {
    let (mut ws, mut server) = pipe(MAX);
    let mut wire = frame(false, 1, b"a\xff", 0, None);
    wire.extend_from_slice(&[0xff, 0xff]);
    server.write_all(&wire).await.unwrap();
    assert!(matches!(ws.next().await, Some(Err(Error::Utf8(_)))));
    // A sequence cut at a fragment's end is not an error: it completes in the next one.
    let (mut ws, mut server) = pipe(MAX);
    let check = "✓".as_bytes();
    let mut wire = frame(false, 1, &check[..1], 0, None);
    wire.extend(frame(true, 0, &check[1..], 0, None));
    server.write_all(&wire).await.unwrap();
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(t))) if t == "✓"));
}
