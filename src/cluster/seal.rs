//! Authenticating (and hiding) everything a node trusts from NATS: session entries, node
//! announcements, forwarded commands and their replies, and the ids that de-duplicate events.
//!
//! One cluster secret (32 bytes, every node the same) is never used as a key itself: HKDF-SHA256
//! (ring) derives one key per [`Purpose`], so a value sealed for one purpose never opens as
//! another (a sealed forward is no jwt, an entry is no reply). Sealing is XChaCha20-Poly1305
//! (RustCrypto's `chacha20poly1305`) with a random 24-byte nonce, and the **context** (the KV
//! key, the owner and epoch, the target node, the forward id...) is the associated data: a
//! sealed value cannot be moved to another entry, another node or another epoch.
//!
//! A sealed value is `g2.<kid>.<base64(nonce || ciphertext)>`: `kid` names the secret that sealed
//! it (8 hex digits derived from it, revealing nothing usable), so a key can be rolled: every
//! node seals with its current secret and opens with the current one and those it accepts
//! (`cluster.accept_seal_key_files`), see docs/operations.md, "Rotating the seal key".

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::sync::Arc;

use base64::Engine;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD_NO_PAD;

/// The version prefix of sealed values.
const PREFIX: &str = "g2";
/// HKDF salt: names the scheme, so a secret reused elsewhere yields other keys.
const SALT: &[u8] = b"guestd cluster seal v2";

/// Parse a 32-byte key written as 64 hex digits.
pub fn parse_key(text: &str) -> Result<[u8; 32], String> {
    let t = text.trim();
    if t.len() != 64 || !t.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err("the seal key must be 64 hex digits (32 bytes; `openssl rand -hex 32`)".into());
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(key)
}

/// What a key is for. Each has its own key, derived from the cluster secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A session entry in the sessions bucket (the whole entry, jwt included).
    Entry,
    /// A node's announcement in the nodes bucket.
    Node,
    /// A command forwarded to another node.
    Forward,
    /// The reply to a forwarded command.
    Reply,
    /// A chat's end, remembered for `status` (the ended-chats stream).
    Ended,
}

impl Purpose {
    const ALL: [Purpose; 5] = [
        Purpose::Entry,
        Purpose::Node,
        Purpose::Forward,
        Purpose::Reply,
        Purpose::Ended,
    ];

    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Entry => b"entry",
            Purpose::Node => b"node",
            Purpose::Forward => b"forward",
            Purpose::Reply => b"reply",
            Purpose::Ended => b"ended",
        }
    }
}

/// A value could not be opened: another secret, another purpose or context, or tampered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot open a sealed value (not sealed by a key this node accepts, or not for this use)")]
pub struct OpenError;

/// HKDF-SHA256 of `secret` for `info`, 32 bytes.
fn derive(secret: &[u8; 32], info: &[u8]) -> [u8; 32] {
    struct Len;
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            32
        }
    }
    let mut out = [0u8; 32];
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, SALT).extract(secret);
    // Expanding 32 bytes from SHA-256 cannot fail (the limit is 255 x 32).
    if let Ok(okm) = prk.expand(&[info], Len) {
        let _ = okm.fill(&mut out);
    }
    out
}

/// The keys derived from one secret.
struct KeySet {
    kid: String,
    aead: [XChaCha20Poly1305; 5],
    ids: ring::hmac::Key,
    /// The secret behind derived chat keys.
    conversation_keys: [u8; 32],
}

impl KeySet {
    fn new(secret: &[u8; 32]) -> Self {
        let kid: String = derive(secret, b"key id")[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        KeySet {
            kid,
            aead: Purpose::ALL.map(|p| XChaCha20Poly1305::new((&derive(secret, p.label())).into())),
            ids: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &derive(secret, b"event ids")),
            // The label is the one the first backend to derive keys (Web Messaging) was given:
            // changing it would change every key a running cluster has handed out.
            conversation_keys: derive(secret, b"web messaging keys"),
        }
    }

    fn cipher(&self, p: Purpose) -> &XChaCha20Poly1305 {
        &self.aead[Purpose::ALL.iter().position(|q| *q == p).unwrap_or(0)]
    }
}

/// The associated data: the purpose, then each context part, length-prefixed (so `["ab", "c"]`
/// and `["a", "bc"]` differ).
fn aad(p: Purpose, context: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    for part in std::iter::once(p.label()).chain(context.iter().copied()) {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// Seals with the current secret; opens with it and every accepted one. Cheap to clone.
#[derive(Clone)]
pub struct Keyring(Arc<[KeySet]>);

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring(kid {}, <keys>)", self.kid())
    }
}

impl Keyring {
    /// A keyring that seals with `current` and also opens what `accepted` sealed.
    pub fn new(current: &[u8; 32], accepted: &[[u8; 32]]) -> Self {
        let sets: Vec<KeySet> = std::iter::once(current)
            .chain(accepted.iter().filter(|k| *k != current))
            .map(KeySet::new)
            .collect();
        Keyring(sets.into())
    }

    /// The id of the secret this keyring seals with.
    pub fn kid(&self) -> &str {
        &self.0[0].kid
    }

    /// The ids of every secret this keyring opens with, current first.
    pub fn kids(&self) -> Vec<&str> {
        self.0.iter().map(|k| k.kid.as_str()).collect()
    }

    /// Seal `plain` for `purpose`, bound to `context`.
    pub fn seal(&self, purpose: Purpose, context: &[&[u8]], plain: &[u8]) -> String {
        let keys = &self.0[0];
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = aad(purpose, context);
        // Encryption with a valid key and nonce cannot fail for inputs below 256 GiB.
        let ct = keys
            .cipher(purpose)
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: &aad,
                },
            )
            .unwrap_or_default();
        let mut raw = nonce.to_vec();
        raw.extend_from_slice(&ct);
        format!("{PREFIX}.{}.{}", keys.kid, B64.encode(raw))
    }

    /// Open what [`Keyring::seal`] made for the same `purpose` and `context`, with any secret
    /// this keyring accepts.
    pub fn open(
        &self,
        purpose: Purpose,
        context: &[&[u8]],
        sealed: &str,
    ) -> Result<Vec<u8>, OpenError> {
        let mut parts = sealed.splitn(3, '.');
        let (Some(PREFIX), Some(kid), Some(body)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(OpenError);
        };
        let keys = self.0.iter().find(|k| k.kid == kid).ok_or(OpenError)?;
        let raw = B64.decode(body).map_err(|_| OpenError)?;
        if raw.len() < 24 + 16 {
            return Err(OpenError);
        }
        let (nonce, ct) = raw.split_at(24);
        let aad = aad(purpose, context);
        keys.cipher(purpose)
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
            .map_err(|_| OpenError)
    }

    /// The key id a sealed value names, if it has the sealed form.
    pub fn kid_of(sealed: &str) -> Option<&str> {
        let mut parts = sealed.splitn(3, '.');
        (parts.next() == Some(PREFIX))
            .then(|| parts.next())
            .flatten()
    }

    /// The secret behind the chat keys a backend derives (the same on every node).
    pub fn conversation_keys(&self) -> [u8; 32] {
        self.0[0].conversation_keys
    }

    /// An id for `raw` that every node computes alike and nobody without the secret can
    /// predict: 32 hex digits of HMAC-SHA256 under the current secret's id key. An event's
    /// `Nats-Msg-Id` is this, so an outsider cannot publish a copy that makes the stream drop the
    /// real event as a duplicate.
    pub fn private_id(&self, raw: &str) -> String {
        id_with(&self.0[0], raw)
    }

    /// [`Keyring::private_id`] under every secret this keyring accepts, current first (what
    /// the others put under their ids while a key rolls).
    pub fn private_ids(&self, raw: &str) -> Vec<String> {
        self.0.iter().map(|k| id_with(k, raw)).collect()
    }
}

fn id_with(keys: &KeySet, raw: &str) -> String {
    let tag = ring::hmac::sign(&keys.ids, raw.as_bytes());
    tag.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Keyring {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_open_only_with_the_secret_the_purpose_and_the_context() {
        let k = Keyring::new(&[7; 32], &[]);
        let sealed = k.seal(Purpose::Entry, &[b"s-1", b"n1"], b"eyJ.jwt.sig");
        // Not in the clear: neither the text nor its decoded bytes hold the plaintext.
        assert!(!sealed.contains("eyJ.jwt.sig"));
        let raw = B64.decode(sealed.rsplit('.').next().unwrap()).unwrap();
        assert!(!raw.windows(11).any(|w| w == b"eyJ.jwt.sig"));
        assert!(sealed.starts_with(&format!("g2.{}.", k.kid())));
        assert_eq!(
            k.open(Purpose::Entry, &[b"s-1", b"n1"], &sealed).unwrap(),
            b"eyJ.jwt.sig"
        );
        // Another context, another purpose, another secret: refused.
        assert_eq!(
            k.open(Purpose::Entry, &[b"s-2", b"n1"], &sealed),
            Err(OpenError)
        );
        assert_eq!(
            k.open(Purpose::Entry, &[b"s-1n", b"1"], &sealed),
            Err(OpenError)
        );
        assert_eq!(
            k.open(Purpose::Forward, &[b"s-1", b"n1"], &sealed),
            Err(OpenError)
        );
        assert_eq!(
            Keyring::new(&[8; 32], &[]).open(Purpose::Entry, &[b"s-1", b"n1"], &sealed),
            Err(OpenError)
        );
        assert_eq!(k.open(Purpose::Entry, &[b"s-1"], "AAAA"), Err(OpenError));
        assert_eq!(
            k.open(Purpose::Entry, &[b"s-1"], "g2.zz.AAAA"),
            Err(OpenError)
        );
        assert_ne!(
            k.seal(Purpose::Entry, &[b"s-1"], b"x"),
            k.seal(Purpose::Entry, &[b"s-1"], b"x"),
            "a fresh nonce each time"
        );
    }

    #[test]
    fn a_key_in_rotation_opens_the_old_values_and_seals_with_the_new() {
        let old = Keyring::new(&[1; 32], &[]);
        let rolling = Keyring::new(&[2; 32], &[[1; 32]]);
        let new = Keyring::new(&[2; 32], &[]);
        let by_old = old.seal(Purpose::Node, &[b"n1"], b"{}");
        assert_eq!(
            rolling.open(Purpose::Node, &[b"n1"], &by_old).unwrap(),
            b"{}"
        );
        assert!(new.open(Purpose::Node, &[b"n1"], &by_old).is_err());
        let by_rolling = rolling.seal(Purpose::Node, &[b"n1"], b"{}");
        assert_eq!(Keyring::kid_of(&by_rolling), Some(new.kid()));
        assert_eq!(
            new.open(Purpose::Node, &[b"n1"], &by_rolling).unwrap(),
            b"{}"
        );
        assert_ne!(old.kid(), new.kid());
        assert_eq!(rolling.kids(), vec![new.kid(), old.kid()]);
    }

    #[test]
    fn private_ids_are_stable_per_secret_and_unlike_the_raw_id() {
        let a = Keyring::new(&[1; 32], &[]);
        let id = a.private_id("s-1:ended");
        assert_eq!(
            id,
            Keyring::new(&[1; 32], &[[9; 32]]).private_id("s-1:ended")
        );
        assert_ne!(id, Keyring::new(&[2; 32], &[]).private_id("s-1:ended"));
        assert_ne!(id, a.private_id("s-2:ended"));
        assert_eq!(id.len(), 32);
        assert!(!id.contains("s-1"));
    }

    #[test]
    fn keys_are_64_hex_digits() {
        assert_eq!(parse_key(&"0f".repeat(32)).unwrap(), [15; 32]);
        assert!(parse_key("abc").is_err());
        assert!(parse_key(&"zz".repeat(32)).is_err());
    }
}
