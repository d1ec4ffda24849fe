//! The bytes of a websocket as the server sends them, read by guestd's frame reader
//! (`leanws`) in chunks whose sizes the input also picks, after bytes left over from the upgrade
//! reply (read with the headers; also picked by the input): never panics, never returns a
//! message over the limit, nothing but an error or the end after a close, nothing after an
//! error, and holds nothing afterwards.
#![no_main]
use futures::StreamExt;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let [chunk, left, rest @ ..] = data else {
        return;
    };
    let chunk = usize::from(*chunk).max(1);
    let (leftover, wire) = rest.split_at(usize::from(*left).min(rest.len()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (a, mut server) = tokio::io::duplex(64 * 1024);
        let mut ws = guestd::transport::leanws::LeanWs::from_partially_read(a, leftover.to_vec(), MAX);
        let wire = wire.to_vec();
        let writer = tokio::spawn(async move {
            for piece in wire.chunks(chunk) {
                if server.write_all(piece).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
            // The end of the bytes is the socket's end (EOF).
            let _ = server.shutdown().await;
        });
        // After the server's close the stream reads on to the socket's end (tungstenite's
        // rule): only an error (a frame after the close) or the end may follow it.
        let mut closed = false;
        let mut failed = false;
        while let Some(m) = ws.next().await {
            assert!(!failed, "something after an error");
            match m {
                Ok(m) if m.is_close() => {
                    assert!(!closed, "a second close");
                    closed = true;
                }
                Ok(m) => {
                    assert!(!closed, "a message after the close");
                    assert!(m.len() <= MAX);
                }
                Err(_) => failed = true,
            }
        }
        assert_eq!(ws.buffered_capacity(), 0);
        drop(writer.await);
    });
});
