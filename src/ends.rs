//! The ends guestd reported, remembered for `status`: "when and why did it end?" is the question
//! guestd exists to answer, and it used to forget the answer the moment the session's task was
//! gone.
//!
//! Every `ended` line guestd writes (and the `end_confirmed` that may follow it) is noted here
//! as the event writer writes it ([`Ends::observer`]), before the flush that makes it visible,
//! so a reader who saw the line and asks gets an answer that includes it. What is remembered is
//! exactly what was reported: nothing here emits an event or decides an end.
//! Each record is kept for `status.remember_ended` (24 h) after its end, and at most
//! `status.remember_max` (100,000) records are kept, the oldest going first.
//!
//! Where it survives:
//! - a restart: the file journal appends each record (`op: "remembered"`) and keeps the records
//!   still inside the window when it compacts (`journal.rs`); a chat that ended while guestd was
//!   down is reported at the restart, and noted then like any other;
//! - another node (cluster mode): each record is also put, sealed, in the cluster's ended-chats
//!   stream ([`Replica`], `cluster::ends`), which a node asks when its own memory has no answer.
//!
//! Why a `Mutex<HashMap>` and not an actor: this is no live state, only a lookup table of
//! settled facts, written once or twice per chat and read by `status`; each lock is held for a
//! map operation, never across an `.await`.

use crate::events::{EndExtra, EndReason, Event, EventKind, Participant};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// `[status]`: how long and how many ends are remembered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Remember {
    /// How long after its end a chat's end is remembered (0 s: not at all).
    #[serde(with = "humantime_serde")]
    pub remember_ended: Duration,
    /// At most this many ends are remembered; the oldest goes first.
    pub remember_max: usize,
}

impl Default for Remember {
    fn default() -> Self {
        Remember {
            remember_ended: Duration::from_secs(24 * 3600),
            remember_max: 100_000,
        }
    }
}

impl Remember {
    /// Whether an end at `ended_ms` is still inside the window at `now_ms`.
    pub fn keeps(&self, ended_ms: i64, now_ms: i64) -> bool {
        self.remember_max > 0
            && now_ms.saturating_sub(ended_ms) < self.remember_ended.as_millis() as i64
    }
}

/// The platform's account of an end (from `end_confirmed`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Confirmation {
    /// The reason the platform's disconnect types map to; null where they name none.
    pub platform_reason: Option<EndReason>,
    /// Whether it agrees with guestd's reason; null where the platform names no cause.
    pub agrees: Option<bool>,
    /// The conversation's `endTime`, when the platform showed it.
    pub platform_end_time: Option<String>,
    /// Each participant and how its leg ended.
    pub participants: Vec<Participant>,
    /// How the verdict was reached, or why there is none.
    pub detail: String,
}

/// One end guestd reported.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EndRecord {
    /// The conversation (for Web Messaging, guestd's `wm-` key).
    pub conversation_id: String,
    /// guestd's session.
    pub session: String,
    /// The `ended` event's reason.
    pub reason: EndReason,
    /// The `ended` event's `ts` (RFC 3339 UTC with ms).
    pub ended_at: String,
    /// The `ended` event's detail.
    pub detail: String,
    /// The `ended` event's duration.
    pub duration_ms: u64,
    /// Web Messaging: scope and read-only.
    #[serde(default, flatten)]
    pub extra: EndExtra,
    /// The platform's confirmation, once `end_confirmed` was written.
    #[serde(default)]
    pub confirmation: Option<Box<Confirmation>>,
}

impl EndRecord {
    /// When it ended, ms since the epoch (None if `ended_at` does not parse).
    pub fn ended_ms(&self) -> Option<i64> {
        chrono::DateTime::parse_from_rfc3339(&self.ended_at)
            .ok()
            .map(|t| t.timestamp_millis())
    }

    /// The record an `ended` event makes.
    pub fn of(ev: &Event) -> Option<EndRecord> {
        let EventKind::Ended {
            reason,
            duration_ms,
            detail,
            extra,
        } = &ev.kind
        else {
            return None;
        };
        Some(EndRecord {
            conversation_id: ev.conversation_id.clone()?,
            session: ev.session.clone(),
            reason: *reason,
            ended_at: ev.ts.clone(),
            detail: detail.clone(),
            duration_ms: *duration_ms,
            extra: extra.clone(),
            confirmation: None,
        })
    }
}

/// What is told an [`Ends`] from outside: a record to keep, or a confirmation of one.
#[derive(Debug, Clone, PartialEq)]
enum Note {
    Ended(EndRecord),
    Confirmed {
        conversation_id: String,
        session: String,
        confirmation: Confirmation,
    },
}

fn note_of(ev: &Event) -> Option<Note> {
    if let Some(r) = EndRecord::of(ev) {
        return Some(Note::Ended(r));
    }
    let EventKind::EndConfirmed {
        platform_reason,
        agrees,
        platform_end_time,
        participants,
        detail,
        ..
    } = &ev.kind
    else {
        return None;
    };
    Some(Note::Confirmed {
        conversation_id: ev.conversation_id.clone()?,
        session: ev.session.clone(),
        confirmation: Confirmation {
            platform_reason: *platform_reason,
            agrees: *agrees,
            platform_end_time: platform_end_time.clone(),
            participants: participants.clone(),
            detail: detail.clone(),
        },
    })
}

/// Where remembered ends are kept beyond this process's memory (the file journal).
pub trait Keep: Send + Sync + 'static {
    /// Keep `rec` (a newer record of the same conversation replaces it).
    fn remember(&self, rec: &EndRecord);
}

/// Remembered ends shared between nodes (cluster mode).
pub trait Replica: Send + Sync + 'static {
    /// Share `rec` (in the background; a failure is logged, never waited for).
    fn put(&self, rec: &EndRecord);
    /// What another node (or this one, before a restart) remembered of `conversation_id`.
    fn get<'a>(&'a self, conversation_id: &'a str) -> BoxFuture<'a, Option<EndRecord>>;
}

/// The remembered records, oldest first in `order`.
#[derive(Default)]
struct Book {
    /// Boxed: the table keeps spare room (a third or more), which costs a pointer per slot,
    /// not a whole record (measured: 609 bytes per end inline, 422 boxed; tests/ends_footprint.rs).
    by_conv: HashMap<Arc<str>, Box<(i64, EndRecord)>>,
    /// (ended ms, conversation, session): a record replaced by a newer end of the same
    /// conversation leaves a stale row, skipped when it comes up.
    order: VecDeque<(i64, Arc<str>, Box<str>)>,
}

impl Book {
    fn evict(&mut self, keep: &Remember, now_ms: i64) {
        while let Some((ms, conv, session)) = self.order.front() {
            let current = self
                .by_conv
                .get(conv)
                .is_some_and(|b| b.1.session == **session);
            let expired = !keep.keeps(*ms, now_ms);
            if current && !expired && self.by_conv.len() <= keep.remember_max {
                break;
            }
            if current {
                self.by_conv.remove(conv);
            }
            self.order.pop_front();
        }
        // Stale rows only: bound them too (a conversation ended again and again).
        if self.order.len() > 2 * keep.remember_max.max(1) {
            let by_conv = &self.by_conv;
            self.order
                .retain(|(_, c, s)| by_conv.get(c).is_some_and(|b| b.1.session.as_str() == &**s));
        }
    }
}

/// The ends guestd reported, for `status`. Cheap to share.
pub struct Ends {
    keep: Remember,
    book: Mutex<Book>,
    persist: Option<Arc<dyn Keep>>,
    replica: OnceLock<Arc<dyn Replica>>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Ends {
    /// An empty memory; `persist` keeps each record across restarts.
    pub fn new(keep: Remember, persist: Option<Arc<dyn Keep>>) -> Arc<Ends> {
        Arc::new(Ends {
            keep,
            book: Mutex::new(Book::default()),
            persist,
            replica: OnceLock::new(),
        })
    }

    /// Cluster mode: share every record with the other nodes, and ask them.
    pub fn set_replica(&self, r: Arc<dyn Replica>) {
        let _ = self.replica.set(r);
    }

    /// The window and the bound.
    pub fn keep(&self) -> &Remember {
        &self.keep
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records found at start (the journal's), oldest first; those outside the window are
    /// dropped. Not persisted again (they are in the journal already).
    pub fn restore(&self, records: impl IntoIterator<Item = EndRecord>) {
        let now = now_ms();
        let mut book = self.lock();
        for r in records {
            insert(&mut book, r, &self.keep, now);
        }
        book.evict(&self.keep, now);
    }

    /// Note what `ev` reports, if it is an end or a confirmation: kept here, in the journal and
    /// (cluster mode) shared.
    fn note(&self, note: Note, now: i64) {
        let rec = {
            let mut book = self.lock();
            let rec = match note {
                Note::Ended(r) => insert(&mut book, r, &self.keep, now),
                Note::Confirmed {
                    conversation_id,
                    session,
                    confirmation,
                } => book
                    .by_conv
                    .get_mut(conversation_id.as_str())
                    .filter(|b| b.1.session == session)
                    .map(|b| {
                        let r = &mut b.1;
                        r.confirmation = Some(Box::new(confirmation));
                        r.clone()
                    }),
            };
            book.evict(&self.keep, now);
            rec
        };
        let Some(rec) = rec else { return };
        if let Some(p) = &self.persist {
            p.remember(&rec);
        }
        if let Some(r) = self.replica.get() {
            r.put(&rec);
        }
    }

    /// What the event writer calls with each event it writes: an `ended` or `end_confirmed`
    /// is noted, every other event passed over.
    pub fn observer(self: &Arc<Self>) -> crate::events::Observer {
        let me = self.clone();
        Arc::new(move |ev: &Event| {
            if me.keep.remember_max == 0 || me.keep.remember_ended.is_zero() {
                return;
            }
            if let Some(note) = note_of(ev) {
                me.note(note, now_ms());
            }
        })
    }

    /// The remembered end of `conversation_id`, here or (cluster mode) on another node.
    pub async fn find(&self, conversation_id: &str) -> Option<EndRecord> {
        if let Some(r) = self.local(conversation_id, now_ms()) {
            return Some(r);
        }
        let r = self.replica.get()?.get(conversation_id).await?;
        let now = now_ms();
        r.ended_ms()
            .is_some_and(|ms| self.keep.keeps(ms, now))
            .then_some(r)
    }

    /// The end remembered here, if still inside the window at `now`.
    fn local(&self, conversation_id: &str, now: i64) -> Option<EndRecord> {
        let book = self.lock();
        let (ms, r) = &**book.by_conv.get(conversation_id)?;
        self.keep.keeps(*ms, now).then(|| r.clone())
    }

    /// How many ends are remembered here now.
    pub fn len(&self) -> usize {
        self.lock().by_conv.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Put `r` in the book (a newer end of the same conversation replaces an older one); the record
/// as kept, or None if it is outside the window (or older than what is kept).
fn insert(book: &mut Book, r: EndRecord, keep: &Remember, now: i64) -> Option<EndRecord> {
    let ms = r.ended_ms().unwrap_or(now);
    if !keep.keeps(ms, now) {
        return None;
    }
    if let Some((old_ms, old)) = book.by_conv.get(r.conversation_id.as_str()).map(|b| &**b) {
        if *old_ms > ms || (old.session == r.session && old.confirmation.is_some()) {
            // An older end, or the same end written again (a restart re-emits it): keep what is
            // there, confirmation included.
            return (old.session == r.session).then(|| old.clone());
        }
    }
    let conv: Arc<str> = r.conversation_id.as_str().into();
    book.order
        .push_back((ms, conv.clone(), r.session.as_str().into()));
    book.by_conv.insert(conv, Box::new((ms, r.clone())));
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> String {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }

    fn ended(conv: &str, session: &str, ms: i64) -> Event {
        let mut ev = Event::new(
            session,
            Some(conv),
            EventKind::Ended {
                reason: EndReason::AgentEnded,
                duration_ms: 7,
                detail: "the agent disconnected just before the guest".into(),
                extra: EndExtra::default(),
            },
        );
        ev.ts = at(ms);
        ev
    }

    fn confirmed(conv: &str, session: &str) -> Event {
        Event::new(
            session,
            Some(conv),
            EventKind::EndConfirmed {
                reason: EndReason::AgentEnded,
                platform_reason: Some(EndReason::AgentEnded),
                agrees: Some(true),
                platform_end_time: Some("2026-12-07T01:00:00.000Z".into()),
                participants: vec![Participant {
                    purpose: "customer".into(),
                    disconnect_type: Some("peer".into()),
                }],
                detail: "the platform's disconnect types name the cause".into(),
            },
        )
    }

    fn ends(window: Duration, max: usize) -> Arc<Ends> {
        Ends::new(
            Remember {
                remember_ended: window,
                remember_max: max,
            },
            None,
        )
    }

    const HOUR: i64 = 3_600_000;

    /// An end an hour old is answered inside a 24 h window, with its confirmation; past the
    /// window it is forgotten.
    #[test]
    fn an_end_is_remembered_for_the_window_and_then_forgotten() {
        let e = ends(Duration::from_secs(24 * 3600), 10);
        let t0 = 1_800_000_000_000;
        e.note(note_of(&ended("c1", "s-1", t0)).unwrap(), t0);
        e.note(note_of(&confirmed("c1", "s-1")).unwrap(), t0 + 5_000);
        let r = e.local("c1", t0 + HOUR).expect("an hour later");
        assert_eq!(r.reason, EndReason::AgentEnded);
        assert_eq!(r.ended_at, at(t0));
        assert_eq!(r.session, "s-1");
        assert_eq!(
            r.confirmation.as_ref().and_then(|c| c.platform_reason),
            Some(EndReason::AgentEnded)
        );
        assert!(e.local("c1", t0 + 24 * HOUR - 1).is_some());
        assert!(e.local("c1", t0 + 24 * HOUR).is_none(), "past the window");
        assert!(e.local("c2", t0).is_none(), "never seen");
    }

    /// The count bound evicts the oldest; the window evicts on the next note.
    #[test]
    fn the_oldest_goes_first_past_the_bound() {
        let e = ends(Duration::from_secs(3600), 3);
        let t0 = 1_800_000_000_000;
        for i in 0..5 {
            let conv = format!("c{i}");
            e.note(
                note_of(&ended(&conv, &format!("s-{i}"), t0 + i)).unwrap(),
                t0 + i,
            );
        }
        assert_eq!(e.len(), 3);
        assert!(e.local("c0", t0 + 10).is_none());
        assert!(e.local("c1", t0 + 10).is_none());
        assert!(e.local("c4", t0 + 10).is_some());
        // An hour later a new end drops every old one.
        let later = t0 + HOUR + 10;
        e.note(note_of(&ended("c9", "s-9", later)).unwrap(), later);
        assert_eq!(e.len(), 1);
    }

    /// A restart re-emits an end (same session, same ts): the confirmation already kept stays;
    /// a new session of the same conversation (Web Messaging's start_new) replaces the record.
    #[test]
    fn the_same_end_written_again_keeps_its_confirmation() {
        let e = ends(Duration::from_secs(3600), 10);
        let t0 = 1_800_000_000_000;
        e.note(note_of(&ended("c1", "s-1", t0)).unwrap(), t0);
        e.note(note_of(&confirmed("c1", "s-1")).unwrap(), t0);
        e.note(note_of(&ended("c1", "s-1", t0)).unwrap(), t0 + 1);
        assert!(e.local("c1", t0 + 2).unwrap().confirmation.is_some());
        // A confirmation of another session is not this record's.
        e.note(note_of(&ended("c1", "s-2", t0 + 10)).unwrap(), t0 + 10);
        e.note(note_of(&confirmed("c1", "s-1")).unwrap(), t0 + 11);
        let r = e.local("c1", t0 + 12).unwrap();
        assert_eq!((r.session.as_str(), r.confirmation), ("s-2", None));
        // Replaced rows do not pile up.
        for i in 0..100 {
            e.note(
                note_of(&ended("c1", &format!("s-x{i}"), t0 + 20 + i)).unwrap(),
                t0 + 20 + i,
            );
        }
        assert!(e.lock().order.len() <= 21, "{}", e.lock().order.len());
    }

    /// Other events are not noted; a zero window remembers nothing.
    #[test]
    fn only_ends_are_noted() {
        let e = ends(Duration::from_secs(3600), 10);
        let obs = e.observer();
        obs(&Event::new("s-1", Some("c1"), EventKind::Connected));
        assert!(e.is_empty());
        obs(&ended("c1", "s-1", now_ms()));
        assert_eq!(e.len(), 1);
        let off = ends(Duration::ZERO, 10);
        off.observer()(&ended("c1", "s-1", now_ms()));
        assert!(off.is_empty());
    }

    /// Records restored from the journal: those outside the window are dropped.
    #[test]
    fn restored_records_outside_the_window_are_dropped() {
        let e = ends(Duration::from_secs(3600), 10);
        let now = now_ms();
        let old = EndRecord::of(&ended("c-old", "s-1", now - 2 * HOUR)).unwrap();
        let new = EndRecord::of(&ended("c-new", "s-2", now - HOUR / 2)).unwrap();
        e.restore([old, new]);
        assert_eq!(e.len(), 1);
        assert!(e.local("c-new", now).is_some());
    }
}
