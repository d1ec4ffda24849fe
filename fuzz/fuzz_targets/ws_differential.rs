//! The same server bytes through guestd's websocket reader (`leanws`) and through
//! tokio-tungstenite's, the oracle (issue 23): the same messages in the same order, and the same
//! end (the stream's end, or an error of the same kind). The input picks the chunk sizes and the
//! bytes left over from the upgrade reply, as `ws_frames` does. The one difference on purpose
//! (docs/design.md): a continuation that takes a message over the limit is refused at its header
//! by guestd, after its bytes by tungstenite, with the same error kind, so the comparison stops
//! at a capacity error on either side.
#![no_main]
use futures::StreamExt;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error, Message};

const MAX: usize = 4096;

/// What a reader saw, one line per message, then its end.
async fn read<S>(mut ws: S) -> Vec<String>
where
    S: futures::Stream<Item = Result<Message, Error>> + Unpin,
{
    let mut seen = Vec::new();
    loop {
        match ws.next().await {
            Some(Ok(m)) => seen.push(format!("{m:?}")),
            Some(Err(e)) => {
                seen.push(class(&e));
                return seen;
            }
            None => {
                seen.push("end".into());
                return seen;
            }
        }
    }
}

fn class(e: &Error) -> String {
    match e {
        Error::Protocol(p) => format!("protocol {p:?}"),
        Error::Capacity(_) => "capacity".into(),
        Error::Utf8(_) => "utf8".into(),
        Error::Io(e) => format!("io {:?}", e.kind()),
        other => format!("{other:?}"),
    }
}

/// Writes `wire` into a pipe in `chunk`-sized pieces, then ends it; the client end.
fn pipe(wire: Vec<u8>, chunk: usize) -> tokio::io::DuplexStream {
    let (a, mut server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        for piece in wire.chunks(chunk) {
            if server.write_all(piece).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
        let _ = server.shutdown().await;
        // Keep reading what the client writes (pongs, close replies) so it never blocks.
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut server, &mut sink).await;
    });
    a
}

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
        let lean = guestd::transport::leanws::LeanWs::from_partially_read(
            pipe(wire.to_vec(), chunk),
            leftover.to_vec(),
            MAX,
        );
        let cfg = WebSocketConfig::default()
            .max_message_size(Some(MAX))
            .max_frame_size(Some(MAX));
        let upstream = tokio_tungstenite::WebSocketStream::from_partially_read(
            pipe(wire.to_vec(), chunk),
            leftover.to_vec(),
            Role::Client,
            Some(cfg),
        )
        .await;
        let mut a = read(lean).await;
        let mut b = read(upstream).await;
        // Up to a capacity error on either side (refused sooner by guestd on purpose).
        let cut = [&a, &b]
            .iter()
            .filter_map(|v| v.iter().position(|l| l == "capacity"))
            .min();
        if let Some(i) = cut {
            a.truncate(i);
            b.truncate(i);
        }
        assert_eq!(
            a, b,
            "guestd (left) and tungstenite (right) read these bytes differently"
        );
    });
});
