//! `guestd-bench --frames N`: burst throughput of guestd's websocket reader, its own framing
//! (`leanws`, the default) against tokio-tungstenite's (`stream.lean_ws = false`), side by side
//! in one process: a tungstenite server on loopback sends N text frames as fast as it can and
//! the client reads them through `stream::Connector`, as a session does. Sizes: a tiny frame (16
//! bytes: many frames per read, the case that copied the rest of the read per frame before issue
//! 23), a heartbeat-sized frame, a 4 KiB one and the platform's largest message (~17 KiB escaped), rounds alternating
//! between the two readers; the median round is reported.

use futures::{SinkExt, StreamExt};
use guestd::transport::stream::{Connector, StreamConfig};
use serde::Serialize;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const SIZES: [usize; 4] = [16, 200, 4096, 17 * 1024];
const ROUNDS: usize = 5;

/// One reader at one size.
#[derive(Serialize)]
pub struct FramesReport {
    reader: &'static str,
    frame_bytes: usize,
    frames: usize,
    median_secs: f64,
    frames_per_sec: f64,
    mib_per_sec: f64,
}

/// Serves one connection: `n` frames of `size` bytes, then a close.
async fn serve(listener: TcpListener, n: usize, size: usize) -> anyhow::Result<()> {
    let (tcp, _) = listener.accept().await?;
    let mut ws = tokio_tungstenite::accept_async(tcp).await?;
    let text: String = "x".repeat(size);
    for _ in 0..n {
        ws.feed(Message::text(text.clone())).await?;
    }
    ws.flush().await?;
    ws.close(None).await?;
    // Read until the client's close reply.
    while let Some(Ok(m)) = ws.next().await {
        if m.is_close() {
            break;
        }
    }
    Ok(())
}

/// Seconds for one reader to read `n` frames of `size`.
async fn round(lean: bool, n: usize, size: usize) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}/burst", listener.local_addr()?);
    let server = tokio::spawn(serve(listener, n, size));
    let connector = Connector::new(
        StreamConfig {
            lean_ws: lean,
            ..StreamConfig::default()
        },
        1,
    );
    let mut ws = connector
        .connect_to(&url, None)
        .await
        .map_err(|e| anyhow::anyhow!("connect: {e}"))?;
    let t0 = Instant::now();
    let mut got = 0usize;
    while let Some(m) = ws.next().await {
        match m? {
            Message::Text(t) => {
                anyhow::ensure!(t.len() == size, "a frame of {} bytes", t.len());
                got += 1;
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    anyhow::ensure!(got == n, "read {got} of {n} frames");
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close()).await;
    server.await??;
    Ok(secs)
}

/// Every size, both readers, `ROUNDS` alternating rounds each.
pub async fn run(n: usize) -> anyhow::Result<Vec<FramesReport>> {
    let mut out = Vec::new();
    for size in SIZES {
        let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..ROUNDS {
            for (i, lean) in [true, false].into_iter().enumerate() {
                times[i].push(round(lean, n, size).await?);
            }
        }
        for (i, reader) in ["leanws", "tungstenite"].into_iter().enumerate() {
            let t = &mut times[i];
            t.sort_by(f64::total_cmp);
            let median = t[t.len() / 2];
            out.push(FramesReport {
                reader,
                frame_bytes: size,
                frames: n,
                median_secs: median,
                frames_per_sec: n as f64 / median,
                mib_per_sec: (n * size) as f64 / median / (1024.0 * 1024.0),
            });
        }
    }
    Ok(out)
}

/// The table, with tungstenite's throughput over guestd's own per size.
pub fn print(reports: &[FramesReport]) {
    println!("| frame bytes | reader | frames | median s | frames/s | MiB/s |");
    println!("|---:|---|---:|---:|---:|---:|");
    for r in reports {
        println!(
            "| {} | {} | {} | {:.3} | {:.0} | {:.1} |",
            r.frame_bytes, r.reader, r.frames, r.median_secs, r.frames_per_sec, r.mib_per_sec
        );
    }
    for pair in reports.chunks(2) {
        if let [a, b] = pair {
            println!(
                "{} bytes: leanws reads {:.2}x tungstenite's frames per second",
                a.frame_bytes,
                a.frames_per_sec / b.frames_per_sec
            );
        }
    }
}
