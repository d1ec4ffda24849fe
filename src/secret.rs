//! A string that never prints: the jwt travels in this wrapper from the create reply to the
//! `Authorization` header and the journal, and every `Debug`/`Display` shows `<redacted>`.

use serde::{Deserialize, Serialize};

/// A secret string. Serialization writes the value (the journal needs it) except inside
/// [`redacting`]; formatting never does. Shared, not copied: a chat's calls and reconnects
/// each take a handle to its one copy (a copy per waiting call was part of what a connect
/// burst left behind, docs/benchmarks.md).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(std::sync::Arc<str>);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

thread_local! {
    static REDACT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` (a serialization meant for people: `check-config`) with every [`Secret`] written as
/// `<redacted>`, wherever it sits in the value.
pub fn redacting<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            REDACT.with(|r| r.set(self.0));
        }
    }
    let _reset = Reset(REDACT.with(|r| r.replace(true)));
    f()
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if REDACT.with(|r| r.get()) {
            s.serialize_str("<redacted>")
        } else {
            s.serialize_str(&self.0)
        }
    }
}

impl Secret {
    /// Wrap a value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into().into())
    }
    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Read a file that holds a secret (a token, a key, a password). A file that others may write
/// is refused (they could swap the secret); one that others may read is used with a warning.
pub fn read_file(path: &std::path::Path) -> Result<String, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = f
            .metadata()
            .map_err(|e| format!("{}: {e}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o022 != 0 {
            return Err(format!(
                "{} holds a secret but others may write it (mode {:03o}): chmod 600 it",
                path.display(),
                mode & 0o777
            ));
        }
        if mode & 0o004 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:03o}", mode & 0o777),
                "a secret file every local user may read: chmod 600 it (or 640 for a group of \
                 guestd's own)"
            );
        }
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut f, &mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text)
}

/// A 32-byte key kept in `path` (64 hex digits, mode 0600), made on first use. The file is
/// created with O_EXCL and never through a symlink, so a planted name is refused, not followed.
pub fn key_file(path: &std::path::Path) -> Result<[u8; 32], String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let parse = |text: &str| {
        let t = text.trim();
        let mut key = [0u8; 32];
        if t.len() != 64 {
            return Err(format!("{}: not a 64-hex-digit key", path.display()));
        }
        for (i, b) in key.iter_mut().enumerate() {
            *b = u8::from_str_radix(t.get(2 * i..2 * i + 2).unwrap_or("zz"), 16)
                .map_err(|_| format!("{}: not a 64-hex-digit key", path.display()))?;
        }
        Ok(key)
    };
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(mut f) => {
            let mut key = [0u8; 32];
            rand::Rng::fill(&mut rand::rng(), &mut key[..]);
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            f.write_all(hex.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta =
                std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
            if !meta.file_type().is_file() {
                return Err(format!("{} is not a plain file", path.display()));
            }
            parse(&read_file(path)?)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn never_formats_the_value() {
        let s = super::Secret::new("eyJhbGciOi.secret.sig");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        assert_eq!(s.expose(), "eyJhbGciOi.secret.sig");
    }

    #[test]
    fn serializes_the_value_except_when_redacting() {
        let s = vec![super::Secret::new("hunter2")];
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"["hunter2"]"#);
        let r = super::redacting(|| serde_json::to_string(&s).unwrap());
        assert_eq!(r, r#"["<redacted>"]"#);
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"["hunter2"]"#);
    }

    #[test]
    fn a_key_file_is_made_once_and_read_back_never_through_a_link() {
        let dir = std::env::temp_dir().join(format!("guestd-key-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("wm.key");
        let k = super::key_file(&p).unwrap();
        assert_eq!(super::key_file(&p).unwrap(), k);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let target = dir.join("elsewhere");
        std::fs::write(&target, "x").unwrap();
        let link = dir.join("planted.key");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(super::key_file(&link).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "x");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_file_others_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let p = std::env::temp_dir().join(format!("guestd-secret-{}", uuid::Uuid::new_v4()));
        std::fs::write(&p, "k\n").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o640, true),
            (0o644, true),
            (0o660, false),
            (0o602, false),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = super::read_file(&p);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(e.contains("chmod 600") && !e.contains("k\n"), "{e}");
            }
        }
        std::fs::remove_file(&p).unwrap();
    }
}
