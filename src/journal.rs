//! The session journal: what a restarted guestd needs to pick every chat back up and to report
//! each `ended` once.
//!
//! Store: an append-only JSON-lines file, fsynced before anything that must survive a crash is
//! acted on, compacted (rewritten with only live sessions, then atomically renamed) at start-up.
//! Chosen over redb/SQLite because the access pattern is exactly that: appends while running,
//! one sequential read at start. It holds jwts, so it is created with mode 0600.
//!
//! Failures are reported, never swallowed: a write, flush or fsync that fails makes the records
//! waiting on it fail (`start`/`attach`/`leave` then fail with a clear error; an `ended` is
//! still written, and says in the log that it may be reported again after a restart), and the
//! journal reports itself unhealthy (`/readyz`, `guestd_journal_up`) until a later sync works.
//! A torn line left by a failed write is closed before the next record. If the file is removed
//! or replaced while guestd runs, the next batch notices and rewrites it from guestd's own open
//! file (compaction always reads the open file, never the path).
//!
//! Messages: `progress` (the id a restart's backfill starts after) is recorded once the
//! message's line is written and flushed (the event writer runs it, see
//! `events::AfterWrite`), never when it is queued, so what a SIGKILL caught in the queue is
//! fetched again by the next process: at-least-once across a SIGKILL.
//!
//! Remembered ends (`crate::ends`): each end guestd reported is appended (`op: "remembered"`,
//! no jwt in it) as its line is written, and compaction keeps those still inside
//! `status.remember_ended` (at most `status.remember_max`, newest kept), so `status` answers
//! for them after a restart. The record is appended before the session's `ended` mark (the
//! mark waits for the flush, the record is sent as the line is written), so an end whose mark
//! survived a crash has its record too, and one whose mark did not is written again at the
//! restart (the `ending` record) and noted then.
//!
//! Guarantee for `ended`: the decision (`ending`, with a stable `event_id`) is fsynced *before*
//! the event is written to stdout, and `ended` is recorded after the line is flushed. A crash
//! between the two re-emits the same event with the same `event_id` on restart: delivery is
//! at-least-once, de-duplicable by `event_id`. Exactly-once to an arbitrary pipe is not possible
//! (the write and the journal cannot be one atomic step); this is the strongest honest promise.

use crate::events::EndReason;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, Read, Seek, Write};
use std::path::{Path, PathBuf};
use tokio::sync::{mpsc, oneshot, watch};

/// A session as first recorded: what every backend's record has, and the backend's own part.
/// Its `Debug` shows the keys of `state` only (a credential is in it).
#[derive(Clone, Serialize, PartialEq)]
pub struct SessionRecord {
    /// guestd's session id.
    pub session: String,
    /// Wall-clock start, ms since the epoch.
    pub started_ms: i64,
    /// "start" or "attach".
    pub mode: String,
    /// The backend's name (`session::Backend::name`); empty for a record written before
    /// records named it (the backends say which is theirs: `Backend::claims_legacy`).
    pub backend: String,
    /// The chat's key (what commands and `status` name it by).
    pub conversation_id: String,
    /// The backend's own record (its credential in it).
    pub state: serde_json::Value,
}

impl std::fmt::Debug for SessionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&String> = self
            .state
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        f.debug_struct("SessionRecord")
            .field("session", &self.session)
            .field("started_ms", &self.started_ms)
            .field("mode", &self.mode)
            .field("backend", &self.backend)
            .field("conversation_id", &self.conversation_id)
            .field("state", &keys)
            .finish()
    }
}

/// A record as read: today's form, or the one before records named their backend
/// (`{"chat": {...}, ...}`, whose remainder is the backend's state as it was).
#[derive(Deserialize)]
struct RawRecord {
    session: String,
    started_ms: i64,
    mode: String,
    #[serde(default)]
    backend: Option<String>,
    #[serde(default)]
    conversation_id: Option<String>,
    #[serde(default)]
    state: Option<serde_json::Value>,
    #[serde(flatten)]
    legacy: serde_json::Map<String, serde_json::Value>,
}

impl<'de> Deserialize<'de> for SessionRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = RawRecord::deserialize(d)?;
        if let (Some(backend), Some(conversation_id)) = (r.backend, r.conversation_id) {
            // A backend with nothing of its own to keep journals `null`.
            return Ok(SessionRecord {
                session: r.session,
                started_ms: r.started_ms,
                mode: r.mode,
                backend,
                conversation_id,
                state: r.state.unwrap_or(serde_json::Value::Null),
            });
        }
        let conversation_id = r
            .legacy
            .get("chat")
            .and_then(|c| c.get("conversation_id"))
            .and_then(|c| c.as_str())
            .ok_or_else(|| serde::de::Error::missing_field("conversation_id"))?
            .to_string();
        Ok(SessionRecord {
            session: r.session,
            started_ms: r.started_ms,
            mode: r.mode,
            backend: String::new(),
            conversation_id,
            state: serde_json::Value::Object(r.legacy),
        })
    }
}

/// The end, decided but maybe not yet written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EndingRecord {
    /// The reason the `ended` event carries.
    pub reason: EndReason,
    /// How guestd knows.
    pub detail: String,
    /// Duration at the end.
    pub duration_ms: u64,
    /// Stable id of the `ended` event.
    pub event_id: String,
    /// Timestamp of the event.
    pub ts: String,
    /// Web Messaging: scope and read-only (absent for a guest chat).
    #[serde(default, skip_serializing_if = "is_default")]
    pub extra: crate::events::EndExtra,
}

/// What the no-activity rule needs to survive a restart: which agent is connected and since
/// when, and when the guest last wrote (wall clock, ms since the epoch). With it, a chat the
/// platform ended for no activity while guestd was down is reported as `inactivity_timeout`,
/// not by whatever the members' leave dates would otherwise suggest.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct Activity {
    /// The agent guestd last saw connected (None: no agent now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// When guestd saw that agent connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_since_ms: Option<i64>,
    /// When the guest last wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_guest_ms: Option<i64>,
}

fn is_default(e: &crate::events::EndExtra) -> bool {
    *e == crate::events::EndExtra::default()
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
    /// The no-activity rule's evidence changed.
    Activity {
        session: String,
        activity: Activity,
    },
    Ended {
        session: String,
    },
    /// An end guestd reported, kept for `status` for a window.
    Remembered {
        end: crate::ends::EndRecord,
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
    /// The no-activity rule's evidence, as last recorded.
    pub activity: Activity,
}

/// A record could not be made durable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("journal: {0}")]
pub struct NotDurable(pub String);

/// Resolves once what was recorded is durable, or says why it is not.
pub type Durable = BoxFuture<'static, Result<(), NotDurable>>;

/// What sessions need from a journal. The file journal implements it; a replicated one (NATS
/// JetStream KV, say) would be another implementation.
pub trait Journal: Send + Sync + 'static {
    /// A session began; resolves once durable (the command answers only then).
    fn session_started(&self, rec: SessionRecord) -> Durable;
    /// A newer message id was seen.
    fn progress(&self, session: &str, last_message_id: &str);
    /// The no-activity rule's evidence changed (an agent came or went, the guest wrote). Like
    /// progress, recorded without waiting.
    fn activity(&self, session: &str, activity: Activity);
    /// The no-activity rule's evidence changed in a way the event about to be emitted reveals
    /// (an agent came or went); resolves once durable. The session waits for it before it
    /// writes that event, so a crash between the two cannot leave a reader who saw
    /// `agent_connected` and a journal without that agent. The default records it as
    /// `activity` does, then waits for a `sync`.
    fn evidence(&self, session: &str, activity: Activity) -> Durable {
        self.activity(session, activity);
        self.sync()
    }
    /// The end is decided; resolves once durable.
    fn ending(&self, session: &str, ending: EndingRecord) -> Durable;
    /// The guest is to leave; resolves once durable (the `leave` reply waits for it).
    fn leaving(&self, session: &str) -> Durable;
    /// The `ended` line is flushed; the session is gone for good.
    fn ended(&self, session: &str);
    /// Everything recorded so far is durable.
    fn sync(&self) -> Durable;
    /// Whether the last sync worked (false while the disk refuses writes).
    fn healthy(&self) -> bool {
        true
    }
    /// Whether an end that could not be made durable must not be written (cluster mode: the
    /// chat's next owner decides and writes it). The file journal writes it anyway.
    fn strict(&self) -> bool {
        false
    }
    /// This process stops acting for the session without ending it (another node takes it):
    /// drop what is held for it, keep the record.
    fn forget(&self, _session: &str) {}
}

fn durable() -> Durable {
    Box::pin(async { Ok(()) })
}

/// A journal that keeps nothing (`journal.enabled = false`).
pub struct NullJournal;

impl Journal for NullJournal {
    fn session_started(&self, _: SessionRecord) -> Durable {
        durable()
    }
    fn progress(&self, _: &str, _: &str) {}
    fn activity(&self, _: &str, _: Activity) {}
    fn ending(&self, _: &str, _: EndingRecord) -> Durable {
        durable()
    }
    fn leaving(&self, _: &str) -> Durable {
        durable()
    }
    fn ended(&self, _: &str) {}
    fn sync(&self) -> Durable {
        durable()
    }
}

/// Errors opening the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// I/O on the file.
    #[error("journal {path}: {source}")]
    Io {
        /// The journal file.
        path: PathBuf,
        /// The I/O error the OS gave.
        #[source]
        source: std::io::Error,
    },
}

enum Msg {
    Rec(Rec),
    Sync(oneshot::Sender<Result<(), NotDurable>>),
}

/// The append-only file journal.
pub struct FileJournal {
    tx: mpsc::UnboundedSender<Msg>,
    healthy: watch::Receiver<bool>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Open (creating) the journal for appending, mode 0600.
fn open_0600(path: &Path) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    // Readable too: compaction reads back its own open file, never the path.
    o.create(true).append(true).read(true);
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

/// Create a new file at `path`, mode 0600: never an existing one (O_EXCL) and never through a
/// symlink (O_NOFOLLOW), so a name planted in the directory is refused, not written through.
fn create_new_0600(path: &Path) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    }
    o.open(path)
}

/// A new temporary file beside `path` (same directory, so the rename is atomic) under a random
/// name (`.<name>.<128 random bits>.tmp`), made by [`create_new_0600`]; a clash is tried again.
fn temp_beside(path: &Path) -> std::io::Result<(std::fs::File, PathBuf)> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "journal".into());
    let mut last = None;
    for _ in 0..8 {
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
        match create_new_0600(&tmp) {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no temporary name")))
}

/// Read a journal file into the sessions it still holds. Unreadable lines (a torn last write,
/// bytes that are not UTF-8) are skipped with a warning.
pub fn load(path: &Path) -> Result<Vec<Recovered>, JournalError> {
    let io = |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::File::open(path) {
        Ok(f) => load_from(std::io::BufReader::new(f)).map_err(io),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io(e)),
    }
}

/// [`load`] from any reader.
pub fn load_from(input: impl BufRead) -> std::io::Result<Vec<Recovered>> {
    load_state(input).map(|s| s.live)
}

/// What a journal holds: live sessions and remembered ends.
#[derive(Debug, Default)]
pub struct State {
    /// Sessions to pick up, in the order they began.
    pub live: Vec<Recovered>,
    /// Ends reported, the newest per conversation, in the order they were written.
    pub remembered: Vec<crate::ends::EndRecord>,
}

/// [`load_from`], remembered ends included.
pub fn load_state(mut input: impl BufRead) -> std::io::Result<State> {
    let mut live: HashMap<String, Recovered> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut remembered: HashMap<String, (usize, crate::ends::EndRecord)> = HashMap::new();
    let mut raw = Vec::new();
    let mut n = 0usize;
    loop {
        raw.clear();
        if input.read_until(b'\n', &mut raw)? == 0 {
            break;
        }
        n += 1;
        let Ok(line) = std::str::from_utf8(&raw) else {
            tracing::warn!(line = n, "skipping a journal line that is not UTF-8");
            continue;
        };
        if line.trim().is_empty() {
            continue;
        }
        if line.contains(r#""op":"remembered""#) {
            if let Ok(Rec::Remembered { end }) = serde_json::from_str::<Rec>(line) {
                remembered.insert(end.conversation_id.clone(), (n, end));
                continue;
            }
        }
        apply(&mut live, &mut order, n, line);
    }
    let mut remembered: Vec<_> = remembered.into_values().collect();
    remembered.sort_by_key(|(n, _)| *n);
    Ok(State {
        live: order.into_iter().filter_map(|s| live.remove(&s)).collect(),
        remembered: remembered.into_iter().map(|(_, r)| r).collect(),
    })
}

/// Apply one journal line to the sessions read so far.
fn apply(live: &mut HashMap<String, Recovered>, order: &mut Vec<String>, n: usize, line: &str) {
    match serde_json::from_str::<Rec>(line) {
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
                    activity: Activity::default(),
                },
            );
        }
        Ok(Rec::Activity { session, activity }) => {
            if let Some(s) = live.get_mut(&session) {
                s.activity = activity;
            }
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
        // Read by `load_state`.
        Ok(Rec::Remembered { .. }) => {}
        Err(e) => tracing::warn!(line = n, error = %e, "skipping an unreadable journal line"),
    }
}

impl FileJournal {
    /// Open (creating) the journal at `path`, compact it, and return it with the sessions it held.
    /// While running, it is compacted again each time `compact_after` bytes have been appended.
    pub fn open(
        path: &Path,
        compact_after: u64,
    ) -> Result<(FileJournal, Vec<Recovered>), JournalError> {
        Self::open_remembering(path, compact_after, crate::ends::Remember::default())
            .map(|(j, s)| (j, s.live))
    }

    /// [`FileJournal::open`], with the ends it remembers (those `keep` still keeps).
    pub fn open_remembering(
        path: &Path,
        compact_after: u64,
        keep: crate::ends::Remember,
    ) -> Result<(FileJournal, State), JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir).map_err(io)?;
        }
        let mut state = load_state_at(path)?;
        state.remembered = kept(state.remembered, &keep);
        let file = rewrite(path, &state.live, &state.remembered)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (healthy_tx, healthy) = watch::channel(true);
        metrics::gauge!("guestd_journal_up").set(1.0);
        let path = path.to_path_buf();
        std::thread::Builder::new()
            .name("guestd-journal".into())
            .spawn(move || {
                Writer {
                    out: std::io::BufWriter::new(file),
                    path,
                    appended: 0,
                    compact_after: compact_after.max(1024),
                    torn: false,
                    healthy: healthy_tx,
                    keep,
                }
                .run(rx)
            })
            .map_err(io)?;
        Ok((FileJournal { tx, healthy }, state))
    }

    fn send(&self, m: Msg) {
        if self.tx.send(m).is_err() {
            tracing::error!("journal writer is gone");
        }
    }

    fn durable(&self) -> Durable {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Sync(tx));
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(NotDurable("the journal writer is gone".into())))
        })
    }
}

/// The journal's directory holds jwts: created 0700 (an existing one is left as it is).
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

/// [`load_state`] of the file at `path` (none: empty).
fn load_state_at(path: &Path) -> Result<State, JournalError> {
    let io = |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::File::open(path) {
        Ok(f) => load_state(std::io::BufReader::new(f)).map_err(io),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(io(e)),
    }
}

/// The remembered ends `keep` keeps now: inside the window, the newest `remember_max`.
fn kept(
    remembered: Vec<crate::ends::EndRecord>,
    keep: &crate::ends::Remember,
) -> Vec<crate::ends::EndRecord> {
    let now = now_ms();
    let mut v: Vec<_> = remembered
        .into_iter()
        .filter(|r| r.ended_ms().is_some_and(|ms| keep.keeps(ms, now)))
        .collect();
    let over = v.len().saturating_sub(keep.remember_max);
    v.drain(..over);
    v
}

/// Write `remembered` and `live` to a temp file (fsynced), rename it over `path`, and reopen it
/// for appending.
fn rewrite(
    path: &Path,
    live: &[Recovered],
    remembered: &[crate::ends::EndRecord],
) -> Result<std::fs::File, JournalError> {
    let io = |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    };
    // A random name opened with O_EXCL|O_NOFOLLOW: a fixed name (it was `<path>.compact`) lets
    // anyone who can write the directory plant a symlink there and have the jwts written
    // through it.
    let (file, tmp) = temp_beside(path).map_err(io)?;
    let written = (|| {
        let mut f = std::io::BufWriter::new(file);
        for end in remembered {
            let mut line =
                serde_json::to_vec(&Rec::Remembered { end: end.clone() }).unwrap_or_default();
            line.push(b'\n');
            f.write_all(&line).map_err(io)?;
        }
        for r in live {
            let mut recs = vec![Rec::Session(r.record.clone())];
            if r.activity != Activity::default() {
                recs.push(Rec::Activity {
                    session: r.record.session.clone(),
                    activity: r.activity.clone(),
                });
            }
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
        std::fs::rename(&tmp, path).map_err(io)
    })();
    if written.is_err() {
        // Leave no half-written copy of the jwts behind.
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename is durable once the directory is.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    open_0600(path).map_err(io)
}

/// The journal's writer: a plain thread, since file I/O and fsync block and batching is easiest
/// with a blocking receive.
struct Writer {
    out: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    appended: u64,
    compact_after: u64,
    /// A failed write may have left part of a line: close it before the next record.
    torn: bool,
    healthy: watch::Sender<bool>,
    /// Which remembered ends compaction keeps.
    keep: crate::ends::Remember,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        while let Some(first) = rx.blocking_recv() {
            let mut waiters = Vec::new();
            let mut failed: Option<String> = None;
            let mut next = Some(first);
            while let Some(m) = next {
                match m {
                    Msg::Rec(rec) => {
                        if let Err(e) = self.append(&rec) {
                            failed.get_or_insert(e.to_string());
                        }
                    }
                    Msg::Sync(w) => waiters.push(w),
                }
                next = rx.try_recv().ok();
            }
            if let Err(e) = self.replace_if_gone() {
                failed.get_or_insert(e.to_string());
            }
            let flushed = self.out.flush().and_then(|_| {
                if waiters.is_empty() {
                    Ok(())
                } else {
                    self.out.get_ref().sync_data()
                }
            });
            if let Err(e) = flushed {
                self.torn = true;
                failed.get_or_insert(e.to_string());
            }
            if failed.is_none() && self.appended >= self.compact_after {
                if let Err(e) = self.compact() {
                    tracing::error!(error = %e, "journal compaction failed; appending to the old file");
                }
                self.appended = 0;
            }
            self.set_health(failed.as_deref(), !waiters.is_empty());
            for w in waiters {
                let _ = w.send(match &failed {
                    None => Ok(()),
                    Some(e) => Err(NotDurable(e.clone())),
                });
            }
        }
    }

    fn append(&mut self, rec: &Rec) -> std::io::Result<()> {
        let mut line = Vec::with_capacity(256);
        if self.torn {
            // Whatever a failed write left is closed off as a line of its own (skipped on load).
            line.push(b'\n');
        }
        serde_json::to_writer(&mut line, rec).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.out
            .write_all(&line)
            .inspect_err(|_| self.torn = true)?;
        self.torn = false;
        self.appended += line.len() as u64;
        Ok(())
    }

    /// Healthy again only after a batch whose records were synced without an error.
    fn set_health(&self, failed: Option<&str>, synced: bool) {
        let was = *self.healthy.borrow();
        match failed {
            Some(e) if was => {
                tracing::error!(path = %self.path.display(), error = %e, "journal write failed; records are not durable");
                metrics::gauge!("guestd_journal_up").set(0.0);
                self.healthy.send_replace(false);
            }
            None if !was && synced => {
                tracing::warn!(path = %self.path.display(), "journal writes work again");
                metrics::gauge!("guestd_journal_up").set(1.0);
                self.healthy.send_replace(true);
            }
            _ => {}
        }
    }

    /// The file at the path is no longer ours (removed, or replaced by another): write ours back.
    fn replace_if_gone(&mut self) -> Result<(), JournalError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let ours = self.out.get_ref().metadata().map(|m| (m.dev(), m.ino()));
            let there = std::fs::metadata(&self.path).map(|m| (m.dev(), m.ino()));
            if let (Ok(ours), Ok(there)) = (&ours, &there) {
                if ours == there {
                    return Ok(());
                }
            }
            tracing::warn!(path = %self.path.display(), "the journal file was removed or replaced; rewriting it from guestd's own copy");
            metrics::counter!("guestd_journal_rewrites_total").increment(1);
            self.compact()
        }
        #[cfg(not(unix))]
        Ok(())
    }

    /// Rewrite the journal with its live sessions only, read from the open file (never the path,
    /// which may have been removed or replaced), and continue appending to the new file.
    fn compact(&mut self) -> Result<(), JournalError> {
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        self.out.flush().map_err(io)?;
        let mut reader = self.out.get_ref().try_clone().map_err(io)?;
        reader.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).map_err(io)?;
        let state = load_state(&bytes[..]).map_err(io)?;
        let remembered = kept(state.remembered, &self.keep);
        let file = rewrite(&self.path, &state.live, &remembered)?;
        tracing::debug!(
            live = state.live.len(),
            remembered = remembered.len(),
            appended = self.appended,
            "journal compacted"
        );
        self.out = std::io::BufWriter::new(file);
        self.torn = false;
        Ok(())
    }
}

impl crate::ends::Keep for FileJournal {
    fn remember(&self, rec: &crate::ends::EndRecord) {
        self.send(Msg::Rec(Rec::Remembered { end: rec.clone() }));
    }
}

impl Journal for FileJournal {
    fn session_started(&self, rec: SessionRecord) -> Durable {
        self.send(Msg::Rec(Rec::Session(rec)));
        self.durable()
    }
    fn progress(&self, session: &str, last_message_id: &str) {
        self.send(Msg::Rec(Rec::Progress {
            session: session.to_string(),
            last_message_id: last_message_id.to_string(),
            at_ms: now_ms(),
        }));
    }
    fn activity(&self, session: &str, activity: Activity) {
        self.send(Msg::Rec(Rec::Activity {
            session: session.to_string(),
            activity,
        }));
    }
    fn ending(&self, session: &str, ending: EndingRecord) -> Durable {
        self.send(Msg::Rec(Rec::Ending {
            session: session.to_string(),
            ending,
        }));
        self.durable()
    }
    fn leaving(&self, session: &str) -> Durable {
        self.send(Msg::Rec(Rec::Leaving {
            session: session.to_string(),
        }));
        self.durable()
    }
    fn ended(&self, session: &str) {
        self.send(Msg::Rec(Rec::Ended {
            session: session.to_string(),
        }));
    }
    fn sync(&self) -> Durable {
        self.durable()
    }
    fn healthy(&self) -> bool {
        *self.healthy.borrow()
    }
}

/// The end of `conversation_id` remembered in the journal at `path`, still inside `keep`'s
/// window (`guestd status` when no guestd runs). Read only; a journal that cannot be read
/// answers nothing.
pub fn remembered_end(
    path: &Path,
    keep: &crate::ends::Remember,
    conversation_id: &str,
) -> Option<crate::ends::EndRecord> {
    let f = std::fs::File::open(path).ok()?;
    let state = load_state(std::io::BufReader::new(f)).ok()?;
    let now = chrono::Utc::now().timestamp_millis();
    state.remembered.into_iter().rev().find(|r| {
        r.conversation_id == conversation_id && r.ended_ms().is_some_and(|ms| keep.keeps(ms, now))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn activity(last_guest_ms: Option<i64>) -> Activity {
        Activity {
            agent: Some("agent-1".into()),
            agent_since_ms: Some(1_000),
            last_guest_ms,
        }
    }

    /// A session record for tests, with the jwt `tok`.
    pub(super) fn rec(id: &str) -> SessionRecord {
        SessionRecord {
            session: id.into(),
            started_ms: 1,
            mode: "start".into(),
            backend: "guest_chat".into(),
            conversation_id: format!("c-{id}"),
            state: serde_json::json!({"chat": {
                "conversation_id": format!("c-{id}"),
                "member_id": "m",
                "jwt": "tok",
                "event_stream_uri": "ws://127.0.0.1:1/x",
            }}),
        }
    }

    /// A record written before records named their backend reads as one with no backend name,
    /// its key from the chat, its state the rest as it was; today's form reads back as written.
    #[test]
    fn records_from_before_backends_had_names_still_read() {
        let old = r#"{"op":"session","session":"s-1","chat":{"conversation_id":"c-1","member_id":"m","jwt":"tok","event_stream_uri":"ws://127.0.0.1:1/x"},"started_ms":5,"mode":"attach","web_messaging":{"deployment_id":"d"}}"#;
        let Rec::Session(r) = serde_json::from_str::<Rec>(old).unwrap() else {
            panic!("not a session record");
        };
        assert_eq!(
            (r.backend.as_str(), r.conversation_id.as_str()),
            ("", "c-1")
        );
        assert_eq!(
            (r.session.as_str(), r.started_ms, r.mode.as_str()),
            ("s-1", 5, "attach")
        );
        assert_eq!(r.state["chat"]["jwt"], "tok");
        assert_eq!(r.state["web_messaging"]["deployment_id"], "d");
        assert!(r.state.get("op").is_none() && r.state.get("session").is_none());
        let now = rec("a");
        let line = serde_json::to_string(&Rec::Session(now.clone())).unwrap();
        let Rec::Session(back) = serde_json::from_str::<Rec>(&line).unwrap() else {
            panic!("not a session record");
        };
        assert_eq!(back, now);
        let missing = r#"{"op":"session","session":"s-1","started_ms":5,"mode":"attach"}"#;
        assert!(serde_json::from_str::<Rec>(missing).is_err());
        // A backend with nothing of its own journals `null`, and it reads back.
        let bare = SessionRecord {
            state: serde_json::Value::Null,
            ..rec("b")
        };
        let line = serde_json::to_string(&Rec::Session(bare.clone())).unwrap();
        let Rec::Session(back) = serde_json::from_str::<Rec>(&line).unwrap() else {
            panic!("not a session record");
        };
        assert_eq!(back, bare);
        // Its Debug names the state's keys, never the credential in it.
        let dbg = format!("{:?}", rec("c"));
        assert!(dbg.contains("chat") && !dbg.contains("tok"), "{dbg}");
    }

    #[tokio::test]
    async fn keeps_live_sessions_drops_ended_and_survives_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("guestd-journal-{}", uuid::Uuid::new_v4()));
        let path = dir.join("journal.jsonl");
        {
            let (j, rec0) = FileJournal::open(&path, 1 << 20).unwrap();
            assert!(rec0.is_empty());
            j.session_started(rec("a")).await.unwrap();
            j.session_started(rec("b")).await.unwrap();
            j.session_started(rec("c")).await.unwrap();
            j.progress("a", "m1");
            j.progress("a", "m2");
            j.activity("a", activity(Some(5)));
            j.activity("a", activity(Some(9)));
            let ending = EndingRecord {
                reason: EndReason::AgentEnded,
                detail: "d".into(),
                duration_ms: 3,
                event_id: "b:ended".into(),
                ts: "t".into(),
                extra: Default::default(),
            };
            j.ending("b", ending).await.unwrap();
            j.ending(
                "c",
                EndingRecord {
                    reason: EndReason::GuestLeft,
                    detail: "d".into(),
                    duration_ms: 3,
                    event_id: "c:ended".into(),
                    ts: "t".into(),
                    extra: Default::default(),
                },
            )
            .await
            .unwrap();
            j.ended("c");
            j.sync().await.unwrap();
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
        assert_eq!(got[0].activity, activity(Some(9)), "the newest evidence");
        assert_eq!(got[1].activity, Activity::default());
        assert_eq!(
            got[1].ending.as_ref().map(|e| e.event_id.as_str()),
            Some("b:ended")
        );
        // Compaction (the open above) kept it.
        drop(_j);
        let (_j, again) = FileJournal::open(&path, 1 << 20).unwrap();
        assert_eq!(again[0].activity, activity(Some(9)));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A full disk (`/dev/full` answers every write with ENOSPC): the records waiting on the
    /// sync fail with a clear error, and the journal reports itself unhealthy.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_full_disk_fails_the_records_and_says_so() {
        let path = PathBuf::from("/dev/full");
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let (healthy_tx, healthy) = watch::channel(true);
        std::thread::spawn(move || {
            Writer {
                out: std::io::BufWriter::new(file),
                path,
                appended: 0,
                compact_after: u64::MAX,
                torn: false,
                healthy: healthy_tx,
                keep: Default::default(),
            }
            .run(rx)
        });
        let j = FileJournal { tx, healthy };
        let e = j.session_started(rec("a")).await.unwrap_err();
        assert!(e.to_string().contains("No space left"), "{e}");
        assert!(!j.healthy());
        assert!(j.leaving("a").await.is_err());
    }

    /// The file is deleted while guestd runs: the next batch writes it back from guestd's own
    /// open file, with every live session (it used to be wiped at the next compaction).
    #[tokio::test]
    async fn a_removed_journal_is_written_back() {
        let dir = std::env::temp_dir().join(format!("guestd-journal-r-{}", uuid::Uuid::new_v4()));
        let path = dir.join("journal.jsonl");
        let (j, _) = FileJournal::open(&path, 1 << 20).unwrap();
        j.session_started(rec("a")).await.unwrap();
        j.session_started(rec("b")).await.unwrap();
        j.progress("a", "m7");
        j.sync().await.unwrap();
        std::fs::remove_file(&path).unwrap();
        j.session_started(rec("c")).await.unwrap();
        let got = load(&path).unwrap();
        let ids: Vec<_> = got.iter().map(|r| r.record.session.as_str()).collect();
        assert_eq!(ids, vec!["a", "b", "c"]);
        assert_eq!(got[0].last_message_id.as_deref(), Some("m7"));
        // Replaced by another file (renamed over it): the same.
        let other = dir.join("other.jsonl");
        std::fs::write(&other, b"{}\n").unwrap();
        std::fs::rename(&other, &path).unwrap();
        j.ended("b");
        j.sync().await.unwrap();
        let ids: Vec<_> = load(&path)
            .unwrap()
            .into_iter()
            .map(|r| r.record.session)
            .collect();
        assert_eq!(ids, vec!["a", "c"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "the directory holds jwts");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A line that is not UTF-8 is skipped like any other garbage; startup goes on.
    #[test]
    fn a_line_that_is_not_utf8_is_skipped() {
        let mut bytes = serde_json::to_vec(&Rec::Session(rec("a"))).unwrap();
        bytes.extend_from_slice(b"\n{\"op\":\"progress\",\"session\":\"Ren\xe9e\"}\n");
        bytes.extend_from_slice(&serde_json::to_vec(&Rec::Session(rec("b"))).unwrap());
        bytes.push(b'\n');
        let got = load_from(&bytes[..]).unwrap();
        assert_eq!(got.len(), 2);
    }

    /// A leave accepted before a crash survives the restart and its compaction.
    #[tokio::test]
    async fn a_leave_request_survives_restarts() {
        let dir = std::env::temp_dir().join(format!("guestd-journal-l-{}", uuid::Uuid::new_v4()));
        let path = dir.join("journal.jsonl");
        {
            let (j, _) = FileJournal::open(&path, 1 << 20).unwrap();
            j.session_started(rec("a")).await.unwrap();
            j.session_started(rec("b")).await.unwrap();
            j.leaving("a").await.unwrap();
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

    #[tokio::test]
    async fn a_running_journal_stays_small() {
        let dir = std::env::temp_dir().join(format!("guestd-journal-c-{}", uuid::Uuid::new_v4()));
        let path = dir.join("journal.jsonl");
        let (j, _) = FileJournal::open(&path, 4096).unwrap();
        j.session_started(super::tests::rec("a")).await.unwrap();
        for i in 0..2000 {
            j.progress("a", &format!("message-{i:05}"));
        }
        j.sync().await.unwrap();
        // 2000 progress lines are ~200 KB; compaction keeps the file near the threshold.
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < 8192, "{size}");
        let got = load(&path).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].last_message_id.as_deref(), Some("message-01999"));
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A local user who can write the journal's directory plants a symlink where the
    /// compaction's temporary file used to be (`<journal>.compact`): compaction must neither
    /// follow it nor touch its target, and leaves no temporary file behind.
    #[cfg(unix)]
    #[tokio::test]
    async fn compaction_follows_no_planted_symlink() {
        let dir = std::env::temp_dir().join(format!("guestd-journal-s-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("journal.jsonl");
        let victim = dir.join("victim.txt");
        std::fs::write(&victim, "precious\n").unwrap();
        std::os::unix::fs::symlink(&victim, path.with_extension("compact")).unwrap();
        // Open compacts at once; the running journal compacts again past 4 KiB.
        let (j, _) = FileJournal::open(&path, 4096).unwrap();
        j.session_started(super::tests::rec("a")).await.unwrap();
        for i in 0..200 {
            j.progress("a", &format!("message-{i:05}"));
        }
        j.sync().await.unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        let link = std::fs::symlink_metadata(path.with_extension("compact")).unwrap();
        assert!(link.file_type().is_symlink());
        assert_eq!(load(&path).unwrap().len(), 1);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["journal.compact", "journal.jsonl", "victim.txt"]);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The temporary file is opened with O_EXCL and O_NOFOLLOW: a name someone guessed and
    /// planted (a symlink, or a file) is refused, never written through.
    #[cfg(unix)]
    #[test]
    fn the_temporary_file_is_never_opened_through_a_planted_name() {
        let dir = std::env::temp_dir().join(format!("guestd-journal-t-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim.txt");
        std::fs::write(&victim, "precious\n").unwrap();
        let planted = dir.join("planted");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        assert!(create_new_0600(&planted).is_err());
        assert!(create_new_0600(&victim).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        let (f, tmp) = temp_beside(&dir.join("journal.jsonl")).unwrap();
        drop(f);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&tmp).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (_, tmp2) = temp_beside(&dir.join("journal.jsonl")).unwrap();
        assert_ne!(tmp, tmp2, "names are not predictable");
        assert_eq!(tmp.parent(), Some(dir.as_path()));
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[cfg(test)]
mod remembered_tests {
    use super::*;
    use crate::ends::{EndRecord, Remember};

    fn end(conv: &str, session: &str, ago_ms: i64) -> EndRecord {
        EndRecord {
            conversation_id: conv.into(),
            session: session.into(),
            reason: EndReason::AgentEnded,
            ended_at: chrono::DateTime::from_timestamp_millis(now_ms() - ago_ms)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            detail: "the agent disconnected just before the guest".into(),
            duration_ms: 9,
            extra: Default::default(),
            confirmation: None,
        }
    }

    /// Remembered ends survive a restart and every compaction while inside the window; the
    /// newest per conversation wins; those past the window or over the bound are dropped.
    #[tokio::test]
    async fn remembered_ends_survive_compaction_inside_the_window() {
        use crate::ends::Keep;
        let dir = std::env::temp_dir().join(format!("guestd-journal-m-{}", uuid::Uuid::new_v4()));
        let path = dir.join("journal.jsonl");
        let keep = Remember {
            remember_ended: std::time::Duration::from_secs(3600),
            remember_max: 3,
        };
        {
            let (j, _) = FileJournal::open_remembering(&path, 4096, keep.clone()).unwrap();
            j.session_started(tests::rec("a")).await.unwrap();
            j.remember(&end("c-old", "s-0", 2 * 3_600_000));
            j.remember(&end("c-1", "s-1", 60_000));
            j.remember(&end("c-2", "s-2", 50_000));
            j.remember(&end("c-2", "s-2b", 40_000));
            j.remember(&end("c-3", "s-3", 30_000));
            j.remember(&end("c-4", "s-4", 20_000));
            // Enough progress to compact the running journal more than once.
            for i in 0..200 {
                j.progress("a", &format!("message-{i:05}"));
            }
            j.sync().await.unwrap();
        }
        for _ in 0..2 {
            let (_j, state) = FileJournal::open_remembering(&path, 4096, keep.clone()).unwrap();
            let convs: Vec<_> = state
                .remembered
                .iter()
                .map(|r| (r.conversation_id.as_str(), r.session.as_str()))
                .collect();
            assert_eq!(convs, [("c-2", "s-2b"), ("c-3", "s-3"), ("c-4", "s-4")]);
            assert_eq!(state.live.len(), 1, "live sessions are kept as before");
            assert_eq!(
                state.live[0].last_message_id.as_deref(),
                Some("message-00199")
            );
        }
        // `load` gives the live sessions alone.
        assert_eq!(load(&path).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).ok();
    }
}
