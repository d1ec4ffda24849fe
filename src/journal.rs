//! The session journal: what a restarted guestd needs to pick every chat back up and to report
//! each `ended` once.
//!
//! Store: an append-only JSON-lines file, fsynced before anything that must survive a crash is
//! acted on, compacted (rewritten with only live sessions, then atomically renamed) at start-up.
//! Chosen over redb/SQLite because the access pattern is exactly that: appends while running,
//! one sequential read at start. It holds jwts, so it is created with mode 0600.
//!
//! Guarantee for `ended`: the decision (`ending`, with a stable `event_id`) is fsynced *before*
//! the event is written to stdout, and `ended` is recorded after the line is flushed. A crash
//! between the two re-emits the same event with the same `event_id` on restart: delivery is
//! at-least-once, de-duplicable by `event_id`. Exactly-once to an arbitrary pipe is not possible
//! (the write and the journal cannot be one atomic step); this is the strongest honest promise.

use crate::backend::ChatRef;
use crate::events::EndReason;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use tokio::sync::{mpsc, oneshot};

/// A session as first recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionRecord {
    /// guestd's session id.
    pub session: String,
    /// The chat (with its jwt).
    pub chat: ChatRef,
    /// Wall-clock start, ms since the epoch.
    pub started_ms: i64,
    /// "start" or "attach".
    pub mode: String,
}

/// The end, decided but maybe not yet written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EndingRecord {
    /// Why.
    pub reason: EndReason,
    /// How guestd knows.
    pub detail: String,
    /// Duration at the end.
    pub duration_ms: u64,
    /// Stable id of the `ended` event.
    pub event_id: String,
    /// Timestamp of the event.
    pub ts: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Rec {
    Session(SessionRecord),
    Progress {
        session: String,
        last_message_id: String,
        at_ms: i64,
    },
    Ending {
        session: String,
        ending: EndingRecord,
    },
    /// The guest was asked to leave; a restart sends the leave again.
    Leaving {
        session: String,
    },
    Ended {
        session: String,
    },
}

/// A session found in the journal at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovered {
    /// As first recorded.
    pub record: SessionRecord,
    /// Newest message seen.
    pub last_message_id: Option<String>,
    /// Last time anything was recorded for it (ms since the epoch).
    pub last_alive_ms: i64,
    /// An end decided but perhaps never written.
    pub ending: Option<EndingRecord>,
    /// A `leave` was accepted; the DELETE may not have reached the platform.
    pub leaving: bool,
}

/// What sessions need from a journal. The file journal implements it; a replicated one (NATS
/// JetStream KV, say) would be another implementation.
pub trait Journal: Send + Sync + 'static {
    /// A session began.
    fn session_started(&self, rec: SessionRecord);
    /// A newer message id was seen.
    fn progress(&self, session: &str, last_message_id: &str);
    /// The end is decided; resolves once durable.
    fn ending(&self, session: &str, ending: EndingRecord) -> BoxFuture<'static, ()>;
    /// The guest is to leave; resolves once durable (the `leave` reply waits for it).
    fn leaving(&self, session: &str) -> BoxFuture<'static, ()>;
    /// The `ended` line is flushed; the session is gone for good.
    fn ended(&self, session: &str);
    /// Everything recorded so far is durable.
    fn sync(&self) -> BoxFuture<'static, ()>;
}

/// A journal that keeps nothing (`journal.enabled = false`).
pub struct NullJournal;

impl Journal for NullJournal {
    fn session_started(&self, _: SessionRecord) {}
    fn progress(&self, _: &str, _: &str) {}
    fn ending(&self, _: &str, _: EndingRecord) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
    fn leaving(&self, _: &str) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
    fn ended(&self, _: &str) {}
    fn sync(&self) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// Errors opening the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// I/O on the file.
    #[error("journal {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

enum Msg {
    Rec(Rec),
    Sync(oneshot::Sender<()>),
}

/// The append-only file journal.
pub struct FileJournal {
    tx: mpsc::UnboundedSender<Msg>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn open_0600(path: &Path, truncate: bool) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.create(true);
    if truncate {
        o.write(true).truncate(true);
    } else {
        o.append(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let f = o.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(f)
}

/// Read a journal file into the sessions it still holds. Unreadable lines (a torn last write)
/// are skipped with a warning.
pub fn load(path: &Path) -> Result<Vec<Recovered>, JournalError> {
    let io = |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut live: HashMap<String, Recovered> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Rec>(&line) {
            Ok(Rec::Session(r)) => {
                order.push(r.session.clone());
                live.insert(
                    r.session.clone(),
                    Recovered {
                        last_alive_ms: r.started_ms,
                        record: r,
                        last_message_id: None,
                        ending: None,
                        leaving: false,
                    },
                );
            }
            Ok(Rec::Progress {
                session,
                last_message_id,
                at_ms,
            }) => {
                if let Some(s) = live.get_mut(&session) {
                    s.last_message_id = Some(last_message_id);
                    s.last_alive_ms = s.last_alive_ms.max(at_ms);
                }
            }
            Ok(Rec::Ending { session, ending }) => {
                if let Some(s) = live.get_mut(&session) {
                    s.ending = Some(ending);
                }
            }
            Ok(Rec::Leaving { session }) => {
                if let Some(s) = live.get_mut(&session) {
                    s.leaving = true;
                }
            }
            Ok(Rec::Ended { session }) => {
                live.remove(&session);
            }
            Err(e) => {
                tracing::warn!(line = n + 1, error = %e, "skipping an unreadable journal line")
            }
        }
    }
    Ok(order.into_iter().filter_map(|s| live.remove(&s)).collect())
}

impl FileJournal {
    /// Open (creating) the journal at `path`, compact it, and return it with the sessions it held.
    /// While running, it is compacted again each time `compact_after` bytes have been appended.
    pub fn open(
        path: &Path,
        compact_after: u64,
    ) -> Result<(FileJournal, Vec<Recovered>), JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let (file, recovered) = compact(path)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let path = path.to_path_buf();
        std::thread::Builder::new()
            .name("guestd-journal".into())
            .spawn(move || writer(file, path, rx, compact_after.max(1024)))
            .map_err(io)?;
        Ok((FileJournal { tx }, recovered))
    }

    fn send(&self, m: Msg) {
        if self.tx.send(m).is_err() {
            tracing::error!("journal writer is gone");
        }
    }
}

/// Rewrite the journal with its live sessions only (temp file, fsync, rename over the old one),
/// and reopen it for appending.
fn compact(path: &Path) -> Result<(std::fs::File, Vec<Recovered>), JournalError> {
    let io = |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let recovered = load(path)?;
    let tmp = path.with_extension("compact");
    {
        let mut f = std::io::BufWriter::new(open_0600(&tmp, true).map_err(io)?);
        for r in &recovered {
            let mut recs = vec![Rec::Session(r.record.clone())];
            if let Some(id) = &r.last_message_id {
                recs.push(Rec::Progress {
                    session: r.record.session.clone(),
                    last_message_id: id.clone(),
                    at_ms: r.last_alive_ms,
                });
            }
            if r.leaving {
                recs.push(Rec::Leaving {
                    session: r.record.session.clone(),
                });
            }
            if let Some(e) = &r.ending {
                recs.push(Rec::Ending {
                    session: r.record.session.clone(),
                    ending: e.clone(),
                });
            }
            for rec in recs {
                let mut line = serde_json::to_vec(&rec).unwrap_or_default();
                line.push(b'\n');
                f.write_all(&line).map_err(io)?;
            }
        }
        let f = f.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename is durable once the directory is.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    let file = open_0600(path, false).map_err(io)?;
    Ok((file, recovered))
}

/// A plain thread: file I/O and fsync block, and batching is easiest with a blocking receive.
fn writer(
    file: std::fs::File,
    path: PathBuf,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    compact_after: u64,
) {
    let mut out = std::io::BufWriter::new(file);
    let mut appended: u64 = 0;
    while let Some(first) = rx.blocking_recv() {
        let mut waiters = Vec::new();
        let mut next = Some(first);
        while let Some(m) = next {
            match m {
                Msg::Rec(rec) => {
                    let mut line = serde_json::to_vec(&rec).unwrap_or_default();
                    line.push(b'\n');
                    if let Err(e) = out.write_all(&line) {
                        tracing::error!(path = %path.display(), error = %e, "journal write failed");
                    }
                    appended += line.len() as u64;
                }
                Msg::Sync(w) => waiters.push(w),
            }
            next = rx.try_recv().ok();
        }
        let flushed = out.flush().and_then(|_| {
            if waiters.is_empty() {
                Ok(())
            } else {
                out.get_ref().sync_data()
            }
        });
        if let Err(e) = flushed {
            tracing::error!(path = %path.display(), error = %e, "journal flush failed");
        }
        if appended >= compact_after {
            // Only this thread appends, so what it reads back is everything written so far.
            let synced = out.flush().and_then(|_| out.get_ref().sync_data());
            match synced
                .map_err(|e| JournalError::Io {
                    path: path.clone(),
                    source: e,
                })
                .and_then(|_| compact(&path))
            {
                Ok((file, live)) => {
                    tracing::debug!(live = live.len(), appended, "journal compacted");
                    out = std::io::BufWriter::new(file);
                    appended = 0;
                }
                Err(e) => {
                    tracing::error!(error = %e, "journal compaction failed; appending to the old file");
                    appended = 0;
                }
            }
        }
        for w in waiters {
            let _ = w.send(());
        }
    }
}

impl Journal for FileJournal {
    fn session_started(&self, rec: SessionRecord) {
        self.send(Msg::Rec(Rec::Session(rec)));
    }
    fn progress(&self, session: &str, last_message_id: &str) {
        self.send(Msg::Rec(Rec::Progress {
            session: session.to_string(),
            last_message_id: last_message_id.to_string(),
            at_ms: now_ms(),
        }));
    }
    fn ending(&self, session: &str, ending: EndingRecord) -> BoxFuture<'static, ()> {
        self.send(Msg::Rec(Rec::Ending {
            session: session.to_string(),
            ending,
        }));
        self.sync()
    }
    fn leaving(&self, session: &str) -> BoxFuture<'static, ()> {
        self.send(Msg::Rec(Rec::Leaving {
            session: session.to_string(),
        }));
        self.sync()
    }
    fn ended(&self, session: &str) {
        self.send(Msg::Rec(Rec::Ended {
            session: session.to_string(),
        }));
    }
    fn sync(&self) -> BoxFuture<'static, ()> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Sync(tx));
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn rec(id: &str) -> SessionRecord {
        SessionRecord {
            session: id.into(),
            chat: ChatRef {
                conversation_id: format!("c-{id}"),
                member_id: "m".into(),
                jwt: Secret::new("tok"),
                event_stream_uri: "ws://127.0.0.1:1/x".into(),
            },
            started_ms: 1,
            mode: "start".into(),
        }
    }

    #[tokio::test]
    async fn keeps_live_sessions_drops_ended_and_survives_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("guestd-journal-{}", uuid::Uuid::new_v4()));
        let path = dir.join("journal.jsonl");
        {
            let (j, rec0) = FileJournal::open(&path, 1 << 20).unwrap();
            assert!(rec0.is_empty());
            j.session_started(rec("a"));
            j.session_started(rec("b"));
            j.session_started(rec("c"));
            j.progress("a", "m1");
            j.progress("a", "m2");
            let ending = EndingRecord {
                reason: EndReason::AgentEnded,
                detail: "d".into(),
                duration_ms: 3,
                event_id: "b:ended".into(),
                ts: "t".into(),
            };
            j.ending("b", ending).await;
            j.ending(
                "c",
                EndingRecord {
                    reason: EndReason::GuestLeft,
                    detail: "d".into(),
                    duration_ms: 3,
                    event_id: "c:ended".into(),
                    ts: "t".into(),
                },
            )
            .await;
            j.ended("c");
            j.sync().await;
        }
        // A torn write at the end is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"op\":\"sess")
            .unwrap();
        let (_j, got) = FileJournal::open(&path, 1 << 20).unwrap();
        let ids: Vec<_> = got.iter().map(|r| r.record.session.as_str()).collect();
        assert_eq!(ids, vec!["a", "b"]);
        assert_eq!(got[0].last_message_id.as_deref(), Some("m2"));
        assert_eq!(
            got[1].ending.as_ref().map(|e| e.event_id.as_str()),
            Some("b:ended")
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A leave accepted before a crash survives the restart and its compaction.
    #[tokio::test]
    async fn a_leave_request_survives_restarts() {
        let dir = std::env::temp_dir().join(format!("guestd-journal-l-{}", uuid::Uuid::new_v4()));
        let path = dir.join("journal.jsonl");
        {
            let (j, _) = FileJournal::open(&path, 1 << 20).unwrap();
            j.session_started(rec("a"));
            j.session_started(rec("b"));
            j.leaving("a").await;
        }
        for _ in 0..2 {
            // Each open compacts: the record must be carried over, not only read.
            let (_j, got) = FileJournal::open(&path, 1 << 20).unwrap();
            let leaving: Vec<_> = got
                .iter()
                .map(|r| (r.record.session.as_str(), r.leaving))
                .collect();
            assert_eq!(leaving, vec![("a", true), ("b", false)]);
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[cfg(test)]
mod compaction_tests {
    use super::*;
    use crate::secret::Secret;

    #[tokio::test]
    async fn a_running_journal_stays_small() {
        let dir = std::env::temp_dir().join(format!("guestd-journal-c-{}", uuid::Uuid::new_v4()));
        let path = dir.join("journal.jsonl");
        let (j, _) = FileJournal::open(&path, 4096).unwrap();
        j.session_started(SessionRecord {
            session: "a".into(),
            chat: ChatRef {
                conversation_id: "c".into(),
                member_id: "m".into(),
                jwt: Secret::new("tok"),
                event_stream_uri: "ws://127.0.0.1:1/x".into(),
            },
            started_ms: 1,
            mode: "start".into(),
        });
        for i in 0..2000 {
            j.progress("a", &format!("message-{i:05}"));
        }
        j.sync().await;
        // 2000 progress lines are ~200 KB; compaction keeps the file near the threshold.
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < 8192, "{size}");
        let got = load(&path).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].last_message_id.as_deref(), Some("message-01999"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
