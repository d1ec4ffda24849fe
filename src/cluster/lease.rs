//! Ownership rules, pure (no NATS, no clock of their own): who holds a chat, when a node must
//! stop acting, which live node takes an orphan. The node task feeds these from the nodes
//! bucket and the monotonic clock; the property tests below drive them with adversarial timings.
//!
//! The argument, in one place: a node N acts only until `sent + lease - fence_margin`, where
//! `sent` is when it *sent* its newest renewal the server acknowledged ([`Fence`]). Another node
//! counts N dead only once `lease` has passed on its own clock since it *saw* N's newest renewal
//! ([`Observer`]); it cannot see a renewal before it was sent, so it counts N dead after
//! `sent' + lease` for some `sent' >= sent`. Between the two lie at least `fence_margin`, which
//! covers clock-rate drift and the time a fenced node takes to stop. Taking a chat is a
//! compare-and-set on its entry's revision, so of two nodes that both count it orphaned, one wins.

use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// A node's announcement in the nodes bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce {
    /// The node's incarnation: grows on every join (after a restart or a fence).
    pub epoch: u64,
    /// Announcements so far in this epoch: an announcement that is not newer than one seen
    /// (a replayed older value, stored again) is not a renewal.
    pub seq: u64,
    /// The node left on purpose (SIGTERM): its chats are free at once.
    pub left: bool,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    epoch: u64,
    seq: u64,
    left: bool,
    /// The bucket revision of the announcement; `at` moves only when it changes (a watch that
    /// starts again replays the newest value, which is not a new renewal).
    revision: u64,
    at: Instant,
}

/// Whether a chat's owner still holds it, as this node sees it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// Its owner is live in this epoch: hands off.
    Held,
    /// Nobody holds it: the preferred live node may take it.
    Orphan,
}

/// What one node knows of the others, on its own monotonic clock.
#[derive(Debug)]
pub struct Observer {
    lease: Duration,
    nodes: HashMap<String, Seen>,
    /// Owners named by entries but not (yet) seen in the nodes bucket, with when first named:
    /// a node that joined a moment ago must not lose its chats because its announcement is late.
    unknown: HashMap<(String, u64), Instant>,
}

impl Observer {
    /// Nodes are dead `lease` after their last renewal was seen.
    pub fn new(lease: Duration) -> Self {
        Observer {
            lease,
            nodes: HashMap::new(),
            unknown: HashMap::new(),
        }
    }

    /// A renewal (or a leave) of `node`, stored at `revision`, was seen now; whether it was
    /// news (newer than any seen).
    pub fn saw(&mut self, node: &str, a: Announce, revision: u64, now: Instant) -> bool {
        self.unknown
            .retain(|(n, e), _| !(n == node && *e <= a.epoch));
        if let Some(s) = self.nodes.get(node) {
            // A watch that starts again replays the newest value (same revision); a value
            // stored again by someone who read it earlier has a new revision but is no newer.
            if s.revision >= revision || (s.epoch, s.seq) >= (a.epoch, a.seq) {
                return false;
            }
        }
        self.nodes.insert(
            node.to_string(),
            Seen {
                epoch: a.epoch,
                seq: a.seq,
                left: a.left,
                revision,
                at: now,
            },
        );
        true
    }

    /// The newest epoch seen of `node`.
    pub fn epoch_of(&self, node: &str) -> Option<u64> {
        self.nodes.get(node).map(|s| s.epoch)
    }

    fn alive(&self, s: &Seen, now: Instant) -> bool {
        !s.left && now.saturating_duration_since(s.at) <= self.lease
    }

    /// Whether the chat owned by (`owner`, `epoch`) is still held.
    pub fn holding(&mut self, owner: &str, epoch: u64, now: Instant) -> Holding {
        if owner.is_empty() {
            return Holding::Orphan;
        }
        let lease = self.lease;
        match self.nodes.get(owner).copied() {
            Some(s) if s.epoch == epoch => {
                if self.alive(&s, now) {
                    Holding::Held
                } else {
                    Holding::Orphan
                }
            }
            // The node has joined again since: it stopped acting for the older epoch first.
            Some(s) if s.epoch > epoch => Holding::Orphan,
            // Not seen (yet) in this epoch: give the announcement a lease's time to arrive.
            _ => {
                let first = *self
                    .unknown
                    .entry((owner.to_string(), epoch))
                    .or_insert(now);
                if now.saturating_duration_since(first) > lease {
                    Holding::Orphan
                } else {
                    Holding::Held
                }
            }
        }
    }

    /// Live nodes, sorted.
    pub fn live(&self, now: Instant) -> Vec<String> {
        let mut v: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, s)| self.alive(s, now))
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }
}

/// FNV-1a, 64 bits, then the splitmix64 finalizer (FNV alone mixes short keys poorly): stable
/// across processes and versions, unlike std's seeded hasher.
fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The live node that takes an orphaned `session` (rendezvous hashing: every node computes the
/// same answer from the same live set, and a node's death moves only its own chats).
pub fn preferred<'a>(session: &str, live: &'a [String]) -> Option<&'a str> {
    live.iter()
        .max_by_key(|n| (fnv(&[session, n]), n.as_str()))
        .map(String::as_str)
}

/// When a node must stop acting: `lease - margin` after it sent its newest acknowledged renewal.
pub fn acting_until(sent: Instant, lease: Duration, margin: Duration) -> Instant {
    sent + lease.saturating_sub(margin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn owners_are_held_while_renewed_and_orphaned_after_a_lease() {
        let now = t0();
        let lease = Duration::from_secs(10);
        let mut o = Observer::new(lease);
        o.saw(
            "a",
            Announce {
                epoch: 1,
                seq: 1,
                left: false,
            },
            1,
            now,
        );
        assert_eq!(o.holding("a", 1, now + lease), Holding::Held);
        assert_eq!(
            o.holding("a", 1, now + lease + Duration::from_millis(1)),
            Holding::Orphan
        );
        // A newer epoch orphans the older one at once.
        o.saw(
            "a",
            Announce {
                epoch: 2,
                seq: 2,
                left: false,
            },
            2,
            now + lease,
        );
        assert_eq!(o.holding("a", 1, now + lease), Holding::Orphan);
        assert_eq!(o.holding("a", 2, now + lease), Holding::Held);
        // A leave frees at once.
        o.saw(
            "a",
            Announce {
                epoch: 2,
                seq: 3,
                left: true,
            },
            3,
            now + lease,
        );
        // The same revision again (a watch that starts over) is not a renewal.
        let mut p = Observer::new(lease);
        p.saw(
            "x",
            Announce {
                epoch: 1,
                seq: 4,
                left: false,
            },
            4,
            now,
        );
        p.saw(
            "x",
            Announce {
                epoch: 1,
                seq: 4,
                left: false,
            },
            4,
            now + lease,
        );
        assert_eq!(p.holding("x", 1, now + lease * 2), Holding::Orphan);
        // An older announcement stored again (a new revision, an old sequence) is no renewal:
        // replaying a dead node's last renewal does not keep its chats from being taken.
        let mut r = Observer::new(lease);
        let renewal = |seq| Announce {
            epoch: 1,
            seq,
            left: false,
        };
        r.saw("y", renewal(7), 10, now);
        r.saw("y", renewal(6), 11, now + lease);
        r.saw("y", renewal(7), 12, now + lease);
        assert_eq!(r.holding("y", 1, now + lease * 2), Holding::Orphan);
        r.saw("y", renewal(8), 13, now + lease * 2);
        assert_eq!(r.holding("y", 1, now + lease * 2), Holding::Held);
        // An older epoch's leave, replayed, does not free a newer epoch's chats.
        r.saw(
            "y",
            Announce {
                epoch: 0,
                seq: 99,
                left: true,
            },
            14,
            now + lease * 2,
        );
        assert_eq!(r.holding("y", 1, now + lease * 2), Holding::Held);
        assert_eq!(o.holding("a", 2, now + lease), Holding::Orphan);
        assert!(o.live(now + lease).is_empty());
        // Released chats have no owner.
        assert_eq!(o.holding("", 0, now), Holding::Orphan);
    }

    #[test]
    fn an_owner_not_seen_yet_gets_a_lease_to_show_up() {
        let now = t0();
        let lease = Duration::from_secs(10);
        let mut o = Observer::new(lease);
        assert_eq!(o.holding("b", 5, now), Holding::Held);
        assert_eq!(o.holding("b", 5, now + lease), Holding::Held);
        o.saw(
            "b",
            Announce {
                epoch: 5,
                seq: 1,
                left: false,
            },
            1,
            now + lease,
        );
        assert_eq!(o.holding("b", 5, now + lease * 2), Holding::Held);
        // Named, never seen: orphaned after a lease.
        assert_eq!(o.holding("c", 1, now), Holding::Held);
        assert_eq!(o.holding("c", 1, now + lease * 2), Holding::Orphan);
        // A newer epoch than the one seen is "not seen yet", not dead.
        assert_eq!(o.holding("b", 6, now + lease), Holding::Held);
    }

    #[test]
    fn a_dead_node_moves_only_its_own_chats() {
        let all: Vec<String> = ["n1", "n2", "n3"].map(String::from).to_vec();
        let survivors: Vec<String> = ["n1", "n2"].map(String::from).to_vec();
        let mut moved = 0;
        let mut counts = HashMap::new();
        for i in 0..3000 {
            let s = format!("s-{i}");
            let before = preferred(&s, &all).unwrap();
            *counts.entry(before).or_insert(0) += 1;
            let after = preferred(&s, &survivors).unwrap();
            if before != "n3" {
                assert_eq!(before, after);
            } else {
                moved += 1;
            }
        }
        assert!((800..1200).contains(&moved), "{moved}");
        assert!(
            counts.values().all(|c| (800..1200).contains(c)),
            "{counts:?}"
        );
        assert_eq!(preferred("x", &[]), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        /// However renewals are delayed, lost or unacknowledged, and however late another node's
        /// watch delivers them, that node (which checks the owner's newest revision with a
        /// direct read before it takes anything) counts the owner dead only once the owner has
        /// stopped acting.
        #[test]
        fn no_node_takes_a_chat_while_its_owner_may_still_act(
            renewals in proptest::collection::vec(
                // (gap before sending, store delay, ack delay, ack lost, watch delay), ms
                (0u64..6_000, 0u64..3_000, 0u64..3_000, any::<bool>(), 0u64..8_000), 1..30),
            lease_s in 6u64..20,
            margin_ms in 1u64..3_000,
        ) {
            let lease = Duration::from_secs(lease_s);
            let margin = Duration::from_millis(margin_ms);
            let ms = Duration::from_millis;
            let start = t0();
            // The join: stored (revision 1) and acknowledged at `start`.
            let mut stored: Vec<(Instant, u64)> = vec![(start, 1)];
            let mut watched: Vec<(Instant, u64)> = vec![(start, 1)];
            let mut acks: Vec<(Instant, Instant)> = Vec::new(); // (ack arrives, sent)
            let mut sent = start;
            for (i, (gap, store, ack, lost, watch)) in renewals.into_iter().enumerate() {
                sent += ms(gap);
                let rev = i as u64 + 2;
                let st = sent + ms(store);
                stored.push((st, rev));
                watched.push((st + ms(watch), rev));
                if !lost {
                    acks.push((st + ms(ack), sent));
                }
            }
            // The owner: an ack extends acting only if it arrives while still acting.
            acks.sort();
            let mut until = acting_until(start, lease, margin);
            for (arrives, sent) in acks {
                if arrives >= until {
                    break;
                }
                until = until.max(acting_until(sent, lease, margin));
            }
            // The other node, every 100 ms: its watch, then the check before a take.
            let mut o = Observer::new(lease);
            watched.sort();
            let a = |rev: u64| Announce { epoch: 1, seq: rev, left: false };
            let mut t = start;
            let end = until + lease * 3;
            while t < end {
                for (at, rev) in watched.iter().filter(|(at, _)| *at <= t) {
                    o.saw("a", a(*rev), *rev, *at);
                }
                if o.holding("a", 1, t) == Holding::Orphan {
                    let newest = stored.iter().filter(|(at, _)| *at <= t).map(|(_, r)| *r).max();
                    if let Some(r) = newest {
                        o.saw("a", a(r), r, t);
                    }
                    if o.holding("a", 1, t) == Holding::Orphan {
                        prop_assert!(t >= until, "taken at {:?}, owner acts until {:?}",
                            t - start, until - start);
                        break;
                    }
                }
                t += ms(100);
            }
        }
    }
}
