//! Sealing secrets that cross or rest in NATS (the jwt in session entries, forwarded commands):
//! XChaCha20-Poly1305 (RustCrypto's `chacha20poly1305`) with a random 24-byte nonce per seal and
//! the entry's key as associated data, so a sealed value cannot be moved to another entry.

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use base64::Engine;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD_NO_PAD;

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

/// A value could not be opened: wrong key, another entry's value, or tampered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot open a sealed value (wrong seal key, or not this entry's)")]
pub struct OpenError;

/// Seals and opens with one key. Cheap to clone.
#[derive(Clone)]
pub struct Sealer(XChaCha20Poly1305);

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<key>)")
    }
}

impl Sealer {
    /// A sealer for `key`.
    pub fn new(key: &[u8; 32]) -> Self {
        Sealer(XChaCha20Poly1305::new(key.into()))
    }

    /// Seal `plain`, bound to `context`: base64 of nonce || ciphertext.
    pub fn seal(&self, context: &str, plain: &[u8]) -> String {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        // Encryption with a valid key and nonce cannot fail for inputs below 256 GiB.
        let ct = self
            .0
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: context.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        B64.encode(out)
    }

    /// Open what [`Sealer::seal`] made for the same `context`.
    pub fn open(&self, context: &str, sealed: &str) -> Result<Vec<u8>, OpenError> {
        let raw = B64.decode(sealed).map_err(|_| OpenError)?;
        if raw.len() < 24 + 16 {
            return Err(OpenError);
        }
        let (nonce, ct) = raw.split_at(24);
        self.0
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| OpenError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_open_only_with_the_key_and_the_context() {
        let s = Sealer::new(&[7; 32]);
        let sealed = s.seal("s-1", b"eyJ.jwt.sig");
        assert!(!sealed.contains("eyJ"));
        assert_eq!(s.open("s-1", &sealed).unwrap(), b"eyJ.jwt.sig");
        assert_eq!(s.open("s-2", &sealed), Err(OpenError));
        assert_eq!(Sealer::new(&[8; 32]).open("s-1", &sealed), Err(OpenError));
        assert_eq!(s.open("s-1", "AAAA"), Err(OpenError));
        assert_ne!(
            s.seal("s-1", b"x"),
            s.seal("s-1", b"x"),
            "a fresh nonce each time"
        );
    }

    #[test]
    fn keys_are_64_hex_digits() {
        assert_eq!(parse_key(&"0f".repeat(32)).unwrap(), [15; 32]);
        assert!(parse_key("abc").is_err());
        assert!(parse_key(&"zz".repeat(32)).is_err());
    }
}
