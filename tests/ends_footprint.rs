//! What one remembered end costs in memory (issue 24: `status.remember_max` bounds the count,
//! docs/operations.md states the cost): allocations counted on this thread while 20,000
//! realistic records are remembered, with and without the platform's confirmation.

use guestd::ends::{Confirmation, EndRecord, Ends, Remember};
use guestd::events::{EndReason, Participant};

mod counting;

#[global_allocator]
static ALLOC: counting::Counting = counting::Counting;

const N: usize = 20_000;

fn record(i: usize, confirmed: bool) -> EndRecord {
    let ended_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    EndRecord {
        conversation_id: format!("{:08x}-5b5c-4b1e-9a39-0e0f5c1d2e3f", i),
        session: format!("s-{i:012x}"),
        reason: EndReason::AgentEnded,
        ended_at,
        detail: "the agent disconnected just before the guest".into(),
        duration_ms: 183_000,
        extra: Default::default(),
        confirmation: confirmed.then(|| {
            Box::new(Confirmation {
                platform_reason: Some(EndReason::AgentEnded),
                agrees: Some(true),
                platform_end_time: Some("2026-12-07T01:00:00.100Z".into()),
                participants: ["customer", "workflow", "acd", "agent"]
                    .iter()
                    .map(|p| Participant {
                        purpose: p.to_string(),
                        disconnect_type: Some("peer".into()),
                    })
                    .collect(),
                detail: "the platform's disconnect types name the cause".into(),
            })
        }),
    }
}

/// Bytes per remembered end, measured: the memory's own tables (map, order, keys) plus the
/// heap each record holds (its strings, the confirmation's participants).
fn per_record(confirmed: bool) -> isize {
    let ends = Ends::new(
        Remember {
            remember_max: N,
            ..Remember::default()
        },
        None,
    );
    let records: Vec<EndRecord> = (0..N).map(|i| record(i, confirmed)).collect();
    // The vector's buffer is freed as the records move in: not the memory's saving.
    let buffer = (records.capacity() * size_of::<EndRecord>()) as isize;
    let before = counting::live();
    ends.restore(records);
    let tables = counting::live() - before + buffer;
    assert_eq!(ends.len(), N);
    // The heap the records brought with them, measured on a second set built the same way.
    let start = counting::live();
    let again: Vec<EndRecord> = (0..N).map(|i| record(i, confirmed)).collect();
    let contents = counting::live() - start - (again.capacity() * size_of::<EndRecord>()) as isize;
    drop(again);
    (tables + contents) / N as isize
}

#[test]
fn a_remembered_end_costs_a_few_hundred_bytes() {
    let bare = per_record(false);
    let confirmed = per_record(true);
    println!("remembered end: {bare} bytes; with the platform's confirmation: {confirmed} bytes");
    // docs/operations.md states these figures: keep them true.
    assert!((250..600).contains(&bare), "{bare}");
    assert!((bare..1200).contains(&confirmed), "{confirmed}");
}
