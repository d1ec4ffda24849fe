//! Slots: how a node's cost follows its own chats (issue 27).
//!
//! Every chat's entry in the sessions bucket rests under a **slot**, a key prefix:
//! `<slot>.<session>`. A slot is held by one node at a time, named in the nodes bucket
//! (`slot.<id>`, sealed like an announcement), and a node watches only the slots it holds. A node
//! places its new chats in slots it made at its join (its *home* slots,
//! [`SLOTS_PER_NODE`]), so in steady state a node watches its own chats' entries and nothing
//! else: no entry of another node's chat reaches it, and its view holds only its own chats.
//!
//! The slot is in the session id (`s-<slot>-<12 hex>`), so any node finds a chat's entry (and so
//! its owner) with one read, without a view of the cluster.
//!
//! **Slots decide who looks, never who acts.** Who may act for a chat is still its entry's owner
//! and epoch, taken only by compare-and-set when the owner is dead (`lease.rs`, `store.rs`).
//! A slot's holder is the node that watches the slot, takes its orphaned chats, and routes to
//! them. When the holder dies (its lease runs out, as for chats), the live node
//! [`super::lease::preferred`] for the slot takes the slot by compare-and-set, watches it, and
//! takes its orphaned chats one by one as before. So two nodes that both believe they hold a
//! slot (a replayed slot entry, a take racing) at worst both watch it: the chat-level
//! compare-and-set still lets one of them act. A dead node's chats spread over the survivors
//! slot by slot.
//!
//! A slot a node took (not one of its home slots) is given back once it has been empty for
//! [`EMPTY_FOR_LEASES`] leases: long enough that a write of the slot's last holder, in flight
//! when it was fenced, has landed or failed.
//!
//! A holder writes its slot entries again every hour (the nodes bucket's `max_age` is a day), a
//! node names new chats only in home slots its view shows it holding in its current epoch, and
//! only nodes that announce they hold slots are preferred for a dead holder's slot (a node of a
//! build before slots never takes one, so during a rolling upgrade no slot waits for it).
//!
//! **Legacy entries** (written before slots, key = session id, one token) are watched by every
//! node with the filter `*`, as the whole bucket used to be, until they end.

use super::seal::{Keyring, Purpose};
use serde::{Deserialize, Serialize};

/// Home slots a node makes at each join. A dead node's chats spread over at most this many
/// survivors (one per slot), so it is also the fan-out of a failover.
pub const SLOTS_PER_NODE: usize = 8;

/// A slot taken from another node is given back once empty for this many leases.
pub const EMPTY_FOR_LEASES: u32 = 2;

/// Length of a slot id (hex digits).
const SLOT_LEN: usize = 6;

/// A fresh slot id.
pub fn new_slot() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    u[..SLOT_LEN].to_string()
}

/// A fresh session id in `slot`.
pub fn session_in(slot: &str) -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("s-{slot}-{}", &u[..12])
}

/// The slot named in a session id, if it has one (`s-<slot>-<rest>`).
pub fn slot_of(session: &str) -> Option<&str> {
    let rest = session.strip_prefix("s-")?;
    let (slot, tail) = rest.split_once('-')?;
    (slot.len() == SLOT_LEN && slot.bytes().all(|b| b.is_ascii_hexdigit()) && !tail.is_empty())
        .then_some(slot)
}

/// Where `session`'s entry rests in the sessions bucket.
pub fn bucket_key(session: &str) -> std::borrow::Cow<'_, str> {
    match slot_of(session) {
        Some(slot) => format!("{slot}.{session}").into(),
        None => session.into(),
    }
}

/// The session a bucket key is for, if it is a session's key (`<slot>.<session>` or a legacy
/// `<session>`), not the key index's or another shape.
pub fn session_of_key(key: &str) -> Option<&str> {
    match key.split_once('.') {
        None => Some(key),
        Some((slot, session)) => (slot_of(session) == Some(slot)).then_some(session),
    }
}

/// The watch filter of `slot` (None: the legacy entries).
pub fn filter(slot: Option<&str>) -> String {
    match slot {
        Some(s) => format!("{s}.>"),
        None => "*".to_string(),
    }
}

/// The nodes bucket's key for `slot`.
pub fn entry_key(slot: &str) -> String {
    format!("slot.{slot}")
}

/// The slot a nodes-bucket key names, if it is a slot's.
pub fn slot_of_entry_key(key: &str) -> Option<&str> {
    let s = key.strip_prefix("slot.")?;
    (s.len() == SLOT_LEN && s.bytes().all(|b| b.is_ascii_hexdigit())).then_some(s)
}

/// The key index's key for a chat's key (its conversation id): an HMAC, so the bucket does not
/// list conversation ids. Read when a keyed `attach` is placed; written when the chat starts.
pub fn index_key(keys: &Keyring, chat_key: &str) -> String {
    format!("i.{}", keys.private_id(chat_key))
}

/// Who holds a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotEntry {
    /// The holding node.
    pub holder: String,
    /// Its epoch when it made or took the slot.
    pub epoch: u64,
}

/// How a slot entry rests: the fields in the clear for operators, and sealed with the slot's id
/// as context (a node trusts only what opens).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlotWire {
    holder: String,
    epoch: u64,
    sealed: String,
}

impl SlotEntry {
    /// Sealed for the nodes bucket under `slot`.
    pub fn seal(&self, slot: &str, keys: &Keyring) -> bytes::Bytes {
        let plain = serde_json::to_vec(self).unwrap_or_default();
        serde_json::to_vec(&SlotWire {
            holder: self.holder.clone(),
            epoch: self.epoch,
            sealed: keys.seal(Purpose::Node, &[b"slot", slot.as_bytes()], &plain),
        })
        .unwrap_or_default()
        .into()
    }

    /// The entry stored for `slot`, if it opens and agrees with its clear fields.
    pub fn open(slot: &str, bytes: &[u8], keys: &Keyring) -> Option<SlotEntry> {
        let wire: SlotWire = serde_json::from_slice(bytes).ok()?;
        let plain = keys
            .open(Purpose::Node, &[b"slot", slot.as_bytes()], &wire.sealed)
            .ok()?;
        let e: SlotEntry = serde_json::from_slice(&plain).ok()?;
        (e.holder == wire.holder && e.epoch == wire.epoch).then_some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keyring {
        Keyring::new(&[7; 32], &[])
    }

    #[test]
    fn a_session_id_names_its_slot_and_its_key() {
        let slot = new_slot();
        let s = session_in(&slot);
        assert_eq!(slot_of(&s), Some(slot.as_str()));
        assert!(super::super::valid_token(&s), "{s}");
        let key = bucket_key(&s);
        assert_eq!(key, format!("{slot}.{s}"));
        assert_eq!(session_of_key(&key), Some(s.as_str()));
        assert!(key.starts_with(&filter(Some(&slot))[..SLOT_LEN + 1]));
    }

    #[test]
    fn legacy_ids_keep_their_old_key() {
        for s in [
            "s-0123456789ab",
            "s-x",
            "s-abcdef-",
            "s-abcdeg-12",
            "s-abc-12",
        ] {
            assert_eq!(slot_of(s), None, "{s}");
            assert_eq!(bucket_key(s), s);
            assert_eq!(session_of_key(s), Some(s));
        }
    }

    #[test]
    fn keys_that_are_not_a_sessions_are_not_taken_for_one() {
        // The key index, a slot prefix that does not match the id inside, a bare prefix.
        assert_eq!(session_of_key("i.0123abcd"), None);
        assert_eq!(session_of_key("abcdef.s-123456-0123456789ab"), None);
        assert_eq!(session_of_key("abcdef.x"), None);
        assert_eq!(slot_of_entry_key("slot.abcdef"), Some("abcdef"));
        assert_eq!(slot_of_entry_key("slot.abc"), None);
        assert_eq!(slot_of_entry_key("n1"), None);
    }

    #[test]
    fn a_slot_entry_opens_only_for_its_slot_and_with_the_secret() {
        let k = keys();
        let e = SlotEntry {
            holder: "n1".into(),
            epoch: 9,
        };
        let b = e.seal("abcdef", &k);
        assert_eq!(SlotEntry::open("abcdef", &b, &k), Some(e.clone()));
        // Moved to another slot, or opened with another secret: nothing.
        assert_eq!(SlotEntry::open("abcde0", &b, &k), None);
        assert_eq!(
            SlotEntry::open("abcdef", &b, &Keyring::new(&[8; 32], &[])),
            None
        );
        // The clear fields changed to name another holder: nothing.
        let mut v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        v["holder"] = "n2".into();
        assert_eq!(
            SlotEntry::open("abcdef", &serde_json::to_vec(&v).unwrap(), &k),
            None
        );
        // A node's announcement is not a slot entry, nor the other way round.
        let n = super::super::node::NodeEntry {
            epoch: 9,
            seq: 1,
            left: false,
            held: 0,
            slots: true,
        }
        .seal("abcdef", &k);
        assert_eq!(SlotEntry::open("abcdef", &n, &k), None);
        assert!(super::super::node::NodeEntry::open("slot.abcdef", &b, &k).is_none());
    }
}
