//! A sample consumer of guestd's events: one record per chat, every event counted once.
//!
//! guestd delivers at least once: after a restart it may write an `ended` or a `message` again
//! (docs/events.md, "Delivery"), and in cluster mode a failover may put the same `ended` in the
//! stream twice. A consumer de-duplicates by `event_id` (every `ended` has one, the same on every
//! node and across restarts) and by `message_id` within a chat. This one keeps, per conversation:
//! its session, when it started, whether an agent is connected, how many distinct messages it
//! saw, and how it ended. It prints one JSON line per chat when the chat ends, and at the end of
//! its input one line per chat still open.
//!
//! ```sh
//! guestd run | cargo run --example consumer                       # from stdout
//! cargo run --example consumer < events.jsonl                     # from a file
//! cargo run --example consumer -- --nats nats://127.0.0.1:4222    # from the JetStream stream
//! ```
//!
//! With `--nats` it reads the stream `<prefix>_EVENTS` (`--prefix`, guestd's `cluster.prefix`,
//! default `GUESTD`) through a durable pull consumer (`--durable`,
//! default `guestd-consumer-example`), acknowledging each event once applied, so a restarted
//! consumer goes on where it stopped. `--until-idle SECS` stops after that long without an event
//! (tests use it); without it, it reads forever. Credentials: `--creds FILE`, or `--user` with the
//! password in `$NATS_PASSWORD`.

use serde_json::Value;
use std::collections::{HashMap, HashSet, VecDeque};

/// How many `event_id`s are remembered: enough for every end repeated within a restart or a
/// failover (guestd repeats at most what it had not acknowledged).
const REMEMBERED_EVENT_IDS: usize = 100_000;

/// How many ended chats are kept (their records, for `chats()` and a late `end_confirmed`);
/// beyond it the oldest end is forgotten, so a consumer that runs for months holds what is
/// open plus this many, not every chat it ever saw.
const REMEMBERED_ENDED: usize = 100_000;

/// What is known of one chat.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct Chat {
    /// The conversation.
    pub conversation_id: String,
    /// guestd's session.
    pub session: String,
    /// The first event's time.
    pub first_seen: String,
    /// An agent is connected now.
    pub agent_connected: bool,
    /// Distinct messages seen (by `message_id`).
    pub messages: usize,
    /// Why it ended, once it has.
    pub reason: Option<String>,
    /// When it ended.
    pub ended_at: Option<String>,
    /// guestd's words on the end.
    pub detail: Option<String>,
    /// The platform's confirmation, when `[platform]` is set (`end_confirmed`).
    pub confirmed: Option<bool>,
    #[serde(skip)]
    message_ids: HashSet<String>,
}

/// Every chat open and the latest ended ones, and the ids that make a repeat a no-op. Bounded:
/// `REMEMBERED_EVENT_IDS` event ids, `keep_ended` ended chats (an ended chat also drops its
/// message ids: a message after its end can only be a repeat), and as many ids of ended chats
/// forgotten since, whose late events are repeats too (not a new chat).
pub struct Ledger {
    chats: HashMap<String, Chat>,
    event_ids: HashSet<String>,
    event_order: VecDeque<String>,
    ended_order: VecDeque<String>,
    forgotten: HashSet<String>,
    forgotten_order: VecDeque<String>,
    keep_ended: usize,
    /// Lines that were not guestd events (logged to stderr, skipped).
    pub skipped: usize,
    /// Repeats dropped.
    pub duplicates: usize,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger::keeping(REMEMBERED_ENDED)
    }
}

impl Ledger {
    /// A ledger that keeps at most `keep_ended` ended chats.
    pub fn keeping(keep_ended: usize) -> Ledger {
        Ledger {
            chats: HashMap::new(),
            event_ids: HashSet::new(),
            event_order: VecDeque::new(),
            ended_order: VecDeque::new(),
            forgotten: HashSet::new(),
            forgotten_order: VecDeque::new(),
            keep_ended,
            skipped: 0,
            duplicates: 0,
        }
    }

    /// Apply one event line. Returns the chat's record when this line ended it (once per chat,
    /// however often its `ended` is delivered).
    pub fn apply(&mut self, line: &str) -> Option<Chat> {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            self.skipped += 1;
            return None;
        };
        let (Some(kind), Some(conv)) = (v["type"].as_str(), v["conversation_id"].as_str()) else {
            // Command replies without a chat, and anything else: not a chat's event.
            self.skipped += 1;
            return None;
        };
        if let Some(id) = v["event_id"].as_str() {
            if !self.event_ids.insert(id.to_string()) {
                self.duplicates += 1;
                return None;
            }
            self.event_order.push_back(id.to_string());
            if self.event_order.len() > REMEMBERED_EVENT_IDS
                && let Some(old) = self.event_order.pop_front()
            {
                self.event_ids.remove(&old);
            }
        }
        if self.forgotten.contains(conv) {
            // A late event of a chat that ended long ago: a repeat, not a new chat.
            self.duplicates += 1;
            return None;
        }
        if kind == "end_confirmed" && !self.chats.contains_key(conv) {
            // The confirmation of an end never seen: no record of its own.
            return None;
        }
        let chat = self.chats.entry(conv.to_string()).or_insert_with(|| Chat {
            conversation_id: conv.to_string(),
            first_seen: v["ts"].as_str().unwrap_or_default().to_string(),
            ..Chat::default()
        });
        if let Some(s) = v["session"].as_str() {
            chat.session = s.to_string();
        }
        match kind {
            "agent_connected" => chat.agent_connected = true,
            "agent_disconnected" => chat.agent_connected = false,
            // After its end, a chat's message can only be a repeat.
            "message" if chat.reason.is_some() => self.duplicates += 1,
            "message" => {
                let id = v["message_id"].as_str().unwrap_or_default().to_string();
                if chat.message_ids.insert(id) {
                    chat.messages += 1;
                } else {
                    self.duplicates += 1;
                }
            }
            "end_confirmed" => chat.confirmed = v["agrees"].as_bool(),
            "ended" if chat.reason.is_none() => {
                chat.reason = v["reason"].as_str().map(String::from);
                chat.ended_at = v["ts"].as_str().map(String::from);
                chat.detail = v["detail"].as_str().map(String::from);
                chat.agent_connected = false;
                chat.message_ids = HashSet::new();
                let ended = chat.clone();
                self.ended_order.push_back(conv.to_string());
                while self.ended_order.len() > self.keep_ended {
                    if let Some(old) = self.ended_order.pop_front() {
                        self.chats.remove(&old);
                        self.forgotten.insert(old.clone());
                        self.forgotten_order.push_back(old);
                    }
                }
                while self.forgotten_order.len() > self.keep_ended {
                    if let Some(old) = self.forgotten_order.pop_front() {
                        self.forgotten.remove(&old);
                    }
                }
                return Some(ended);
            }
            // An `ended` without an event_id cannot be told from a repeat but by the chat.
            "ended" => self.duplicates += 1,
            _ => {}
        }
        None
    }

    /// Every chat not yet ended.
    pub fn open(&self) -> impl Iterator<Item = &Chat> {
        self.chats.values().filter(|c| c.reason.is_none())
    }

    /// Every chat seen.
    pub fn chats(&self) -> impl Iterator<Item = &Chat> {
        self.chats.values()
    }
}

fn print(chat: &Chat) {
    match serde_json::to_string(chat) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("consumer: cannot print {}: {e}", chat.conversation_id),
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Read the stream `<prefix>_EVENTS` at `url` into `ledger`, calling `on_end` for each chat as it
/// ends (see the module's doc for `args`).
pub async fn from_nats_into(
    args: &[String],
    url: &str,
    ledger: &mut Ledger,
    mut on_end: impl FnMut(&Chat),
) -> anyhow::Result<()> {
    use async_nats::jetstream;
    use futures::StreamExt;
    let mut opts = async_nats::ConnectOptions::new();
    if let Some(creds) = arg(args, "--creds") {
        opts = opts.credentials_file(creds).await?;
    } else if let Some(user) = arg(args, "--user") {
        opts = opts.user_and_password(user, std::env::var("NATS_PASSWORD").unwrap_or_default());
    }
    let client = opts.connect(url).await?;
    let js = jetstream::new(client);
    let prefix = arg(args, "--prefix").unwrap_or_else(|| "GUESTD".into());
    let stream = js.get_stream(format!("{prefix}_EVENTS")).await?;
    let durable = arg(args, "--durable").unwrap_or_else(|| "guestd-consumer-example".into());
    let consumer = stream
        .get_or_create_consumer(
            &durable,
            jetstream::consumer::pull::Config {
                durable_name: Some(durable.clone()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?;
    let idle = arg(args, "--until-idle")
        .map(|s| s.parse::<u64>())
        .transpose()?
        .map(std::time::Duration::from_secs);
    let mut messages = consumer.messages().await?;
    loop {
        let next = match idle {
            Some(d) => match tokio::time::timeout(d, messages.next()).await {
                Ok(n) => n,
                Err(_) => return Ok(()),
            },
            None => messages.next().await,
        };
        let Some(msg) = next else { return Ok(()) };
        let msg = msg.map_err(|e| anyhow::anyhow!("reading the stream: {e}"))?;
        if let Some(chat) = ledger.apply(&String::from_utf8_lossy(&msg.payload)) {
            on_end(&chat);
        }
        // Acknowledged only once applied: a crash before this line re-reads it, and the ledger
        // of the next run drops nothing it has not seen.
        msg.ack()
            .await
            .map_err(|e| anyhow::anyhow!("acknowledging: {e}"))?;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut ledger = Ledger::default();
    match arg(&args, "--nats") {
        Some(url) => from_nats_into(&args, &url, &mut ledger, print).await?,
        None => {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Some(line) = lines.next_line().await? {
                if let Some(chat) = ledger.apply(&line) {
                    print(&chat);
                }
            }
        }
    }
    let mut open: Vec<&Chat> = ledger.open().collect();
    open.sort_by(|a, b| a.first_seen.cmp(&b.first_seen));
    for chat in open {
        print(chat);
    }
    eprintln!(
        "consumer: {} chats, {} still open, {} repeats dropped, {} lines skipped",
        ledger.chats().count(),
        ledger.open().count(),
        ledger.duplicates,
        ledger.skipped
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(conv: &str, kind: &str, extra: &str) -> String {
        format!(
            r#"{{"v":1,"seq":1,"ts":"2026-12-07T10:00:00.000Z","session":"s-{conv}","conversation_id":"{conv}","type":"{kind}"{extra}}}"#
        )
    }

    /// A restart that writes a chat's messages and its `ended` again: one record, the messages
    /// counted once, the end reported once.
    #[test]
    fn a_replayed_end_and_replayed_messages_count_once() {
        let mut l = Ledger::default();
        let run = [
            ev("c1", "connected", ""),
            ev("c1", "agent_connected", r#","member_id":"a""#),
            ev("c1", "message", r#","message_id":"m1""#),
            ev("c1", "message", r#","message_id":"m2""#),
            ev(
                "c1",
                "ended",
                r#","event_id":"s-c1:ended","reason":"agent_ended","detail":"d""#,
            ),
        ];
        let ends: Vec<Chat> = run
            .iter()
            .chain(run[2..].iter())
            .filter_map(|line| l.apply(line))
            .collect();
        assert_eq!(ends.len(), 1);
        assert_eq!(ends[0].reason.as_deref(), Some("agent_ended"));
        assert_eq!(ends[0].messages, 2);
        assert!(!ends[0].agent_connected);
        assert_eq!(l.duplicates, 3);
        assert_eq!(l.open().count(), 0);
    }

    /// Chats interleaved; one still open at the end; lines that are not a chat's are skipped.
    #[test]
    fn interleaved_chats_each_get_their_own_record() {
        let mut l = Ledger::default();
        let lines = [
            ev("a", "connected", ""),
            ev("b", "connected", ""),
            "not json".to_string(),
            r#"{"v":1,"seq":3,"type":"command_error","request_id":"r9"}"#.to_string(),
            ev("a", "message", r#","message_id":"m1""#),
            ev("b", "message", r#","message_id":"m1""#),
            ev(
                "a",
                "ended",
                r#","event_id":"s-a:ended","reason":"inactivity_timeout""#,
            ),
        ];
        let ends: Vec<Chat> = lines.iter().filter_map(|x| l.apply(x)).collect();
        assert_eq!(ends.len(), 1);
        assert_eq!(ends[0].conversation_id, "a");
        assert_eq!(ends[0].messages, 1);
        let open: Vec<&Chat> = l.open().collect();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].conversation_id, "b");
        assert_eq!(open[0].messages, 1, "message ids are per chat");
        assert_eq!(l.skipped, 2);
    }

    /// The platform's confirmation lands on the record.
    #[test]
    fn end_confirmed_is_kept() {
        let mut l = Ledger::default();
        l.apply(&ev(
            "c",
            "ended",
            r#","event_id":"s-c:ended","reason":"guest_left""#,
        ));
        l.apply(&ev("c", "end_confirmed", r#","agrees":true"#));
        assert_eq!(l.chats().next().and_then(|c| c.confirmed), Some(true));
    }

    /// Memory is bounded: beyond `keep_ended`, the oldest ended chat is forgotten, and a late
    /// confirmation of it makes no new record; open chats are never dropped.
    #[test]
    fn ended_chats_beyond_the_bound_are_forgotten_and_open_ones_kept() {
        let mut l = Ledger::keeping(2);
        l.apply(&ev("open", "connected", ""));
        for c in ["e1", "e2", "e3"] {
            l.apply(&ev(c, "connected", ""));
            l.apply(&ev(c, "message", r#","message_id":"m1""#));
            let id = format!(r#","event_id":"s-{c}:ended","reason":"guest_left""#);
            assert!(l.apply(&ev(c, "ended", &id)).is_some());
        }
        let mut kept: Vec<&str> = l.chats().map(|c| c.conversation_id.as_str()).collect();
        kept.sort();
        assert_eq!(kept, ["e2", "e3", "open"]);
        l.apply(&ev("e1", "end_confirmed", r#","agrees":true"#));
        l.apply(&ev("e1", "message", r#","message_id":"m1""#));
        let id = r#","event_id":"s-e1:ended-again","reason":"guest_left""#;
        assert!(l.apply(&ev("e1", "ended", id)).is_none());
        assert_eq!(
            l.chats().count(),
            3,
            "no record for a forgotten chat's late events"
        );
        assert_eq!(l.open().count(), 1);
        // A message repeated after its chat's end counts as a repeat, not a message.
        l.apply(&ev("e3", "message", r#","message_id":"m9""#));
        let e3 = l.chats().find(|c| c.conversation_id == "e3").unwrap();
        assert_eq!(e3.messages, 1);
    }
}
