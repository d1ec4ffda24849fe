//! The plumbing every session actor runs on, whatever its backend: the `select!` helpers of a
//! session's loop (a timer that is not reset for nothing, REST calls in flight allocated only
//! while there are some, the next frame of a socket that may be closed), closing a socket, a
//! `leave` made durable before it is answered, and the one way a session's event is written
//! (metrics, journal marks, the exactly-once `ended`). Backends call these; none borrows
//! another backend's private parts.

use super::ctx::SessionCtx;
use super::handle::{CommandError, Done, DoneReply};
use crate::events::{AfterWrite, Event, EventKind};
use crate::journal::EndingRecord;
use crate::transport::stream::Ws;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::time::Duration;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Frames handled in a row before the other sources of a session's loop get a turn (see the
/// loop): a server that floods frames must not starve call results and deadlines.
pub const FAIR_EVERY: u32 = 64;

/// Set the session's one timer to `at`, unless it is set there already. Every frame passes
/// here, and most leave the deadline where it was (a message, a typing event, a ping), so the
/// timer wheel is left alone for them (a reset is a remove and an insert under the wheel's
/// lock). Same outcome as a reset: a timer that fired at `at` and is not moved fires again at
/// once, as a reset to that past instant would.
pub fn rearm(sleep: std::pin::Pin<&mut tokio::time::Sleep>, at: tokio::time::Instant) {
    if sleep.deadline() != at {
        sleep.reset(at);
    }
}

/// The output of `f`, or pending forever when there is none (a `select!` branch that is off).
pub async fn opt<F: std::future::Future + Unpin>(f: Option<&mut F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => futures::future::pending().await,
    }
}

/// Calls in flight, allocated only while there are some (an idle session has none).
pub type Calls<T> = Option<Box<FuturesUnordered<BoxFuture<'static, Option<T>>>>>;

/// The next call's result; frees the set once it is empty. Pending while there is none.
pub async fn next_call<T>(calls: &mut Calls<T>) -> Option<T> {
    loop {
        match calls {
            Some(r) => match r.next().await {
                Some(i) => {
                    if r.is_empty() {
                        *calls = None;
                    }
                    return i;
                }
                None => *calls = None,
            },
            None => futures::future::pending::<()>().await,
        }
    }
}

/// Close `ws` (if open) and wait for it at most a second.
pub async fn close_now(ws: &mut Option<Ws>) {
    if let Some(mut ws) = ws.take() {
        let _ =
            tokio::time::timeout(Duration::from_secs(1), futures::SinkExt::close(&mut ws)).await;
    }
}

/// Close `ws` (if open) on its own task: the session does not wait for the peer.
pub fn close_in_background(ws: &mut Option<Ws>) {
    if let Some(mut ws) = ws.take() {
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(1), futures::SinkExt::close(&mut ws))
                .await;
        });
    }
}

/// A `leave` made durable before it is answered: a crash after "leaving" must not lose it (the
/// next process finds it in the journal and sends it again). Once durable, the reply says so
/// and `then` goes to the session's machine.
pub fn leave_durably<I: Send + 'static>(
    ctx: &SessionCtx,
    id: &str,
    reply: DoneReply,
    then: I,
) -> BoxFuture<'static, Option<I>> {
    let durable = ctx.journal.leaving(id);
    async move {
        match durable.await {
            Ok(()) => {
                let _ = reply.send(Ok(Done::Leaving { leaving: true }));
                Some(then)
            }
            Err(e) => {
                let _ = reply.send(Err(CommandError::Journal(e.0)));
                None
            }
        }
    }
    .boxed()
}

/// The next frame of the socket, or pending forever while there is none.
pub async fn next_frame(
    ws: &mut Option<Ws>,
) -> Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>> {
    match ws {
        Some(w) => w.next().await,
        None => futures::future::pending().await,
    }
}

/// Emit one of a session's events, with its metrics. A message is marked in the journal (the
/// id a restart's backfill starts after) once its line is written and flushed, not when it is
/// queued: a SIGKILL in between then repeats it after the restart instead of losing it (both
/// machines emit messages in order, and the id of the last one emitted is their backfill's
/// starting point). An `ended` is recorded in the journal first (its `event_id` is stable
/// across restarts), written and flushed, then the session's entry is closed (a backend that
/// asks its platform for an account of the end does so once this returns). False when the end
/// could not be recorded and the journal is strict (cluster mode): the caller relinquishes the
/// chat to its next owner, which decides again.
pub async fn emit(ctx: &SessionCtx, id: &str, conversation: &str, kind: EventKind) -> bool {
    match &kind {
        EventKind::Reconnecting { .. } => {
            metrics::counter!("guestd_reconnect_attempts_total").increment(1)
        }
        EventKind::Reconnected { .. } => metrics::counter!("guestd_reconnects_total").increment(1),
        EventKind::HeartbeatMissed { .. } => {
            metrics::counter!("guestd_heartbeat_misses_total").increment(1)
        }
        EventKind::StreamError { .. } => {
            metrics::counter!("guestd_stream_errors_total").increment(1)
        }
        _ => {}
    }
    let mut ev = Event::new(id, Some(conversation), kind);
    if let EventKind::Ended {
        reason,
        duration_ms,
        detail,
        extra,
    } = &ev.kind
    {
        metrics::counter!("guestd_ended_total", "reason" => reason.as_str()).increment(1);
        tracing::info!(reason = reason.as_str(), duration_ms, detail = %detail, "chat ended");
        let event_id = format!("{id}:ended");
        ev.event_id = Some(event_id.clone());
        let rec = EndingRecord {
            reason: *reason,
            detail: detail.clone(),
            duration_ms: *duration_ms,
            event_id,
            ts: ev.ts.clone(),
            extra: extra.clone(),
        };
        if let Err(e) = ctx.journal.ending(id, rec).await {
            if ctx.journal.strict() {
                // Cluster mode: the chat's next owner finds it and decides.
                tracing::warn!(error = %e, "the end could not be recorded; leaving the chat to its next owner");
                return false;
            }
            // Written anyway: the user learns of the end now. After a restart the chat may be
            // picked up and its end reported again, with the same event_id.
            tracing::error!(error = %e, "the end could not be made durable; writing it anyway");
        }
        if ctx.emitter.emit_flushed(ev).await {
            ctx.journal.ended(id);
        }
        return true;
    }
    if let EventKind::Message { message_id, .. } = &ev.kind {
        let (journal, session, message) = (ctx.journal.clone(), id.to_string(), message_id.clone());
        ev = ev.after_write(AfterWrite::new(move || {
            journal.progress(&session, &message)
        }));
    }
    ctx.emitter.emit(ev).await;
    true
}

/// Rebase a wall-clock instant (ms since the epoch) onto the monotonic clock (a journaled
/// session's start, at a restart).
pub fn instant_at(wall_ms: i64, now: tokio::time::Instant) -> tokio::time::Instant {
    let ago = (chrono::Utc::now().timestamp_millis() - wall_ms).max(0) as u64;
    now.checked_sub(Duration::from_millis(ago)).unwrap_or(now)
}
