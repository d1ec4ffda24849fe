//! systemd's readiness protocol (`Type=notify`): a datagram of `KEY=VALUE` lines to the socket
//! named by `NOTIFY_SOCKET`. guestd sends `READY=1` once its HTTP API listens and its journal has
//! been read back, `RELOADING=1` ... `READY=1` around a SIGHUP reload, and `STOPPING=1` when it
//! starts draining. Without `NOTIFY_SOCKET` (not under systemd) every call does nothing.
//!
//! A few lines over the socket rather than a crate: the protocol is one `sendto`, and the one
//! detail worth the code is the abstract-namespace address (`@name`) systemd may pass.

use std::io;

/// Send `state` (newline-separated `KEY=VALUE` pairs) to systemd, if it is listening.
/// Ok(false) when `NOTIFY_SOCKET` is unset.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(path) => notify_to(&path, state).map(|()| true),
        None => Ok(false),
    }
}

/// Send `state` to the notification socket `path` (a file path, or `@name` for Linux's abstract
/// namespace).
pub fn notify_to(path: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    #[cfg(unix)]
    {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)?;
            }
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            {
                let _ = name;
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "abstract NOTIFY_SOCKET on a system without abstract sockets",
                ));
            }
        } else {
            sock.send_to(state.as_bytes(), path)?;
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        let _ = (path, state);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "NOTIFY_SOCKET on a system without unix sockets",
        ))
    }
}

/// [`notify`], with a failure logged rather than returned: readiness is systemd's business, a
/// failed datagram must not stop guestd (systemd then times the start out and says so).
pub fn notify_or_log(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, state, "could not notify systemd (NOTIFY_SOCKET)");
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn sends_the_state_to_a_path() {
        let dir = std::env::temp_dir().join(format!("guestd-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        notify_to(path.as_os_str(), "READY=1\nSTATUS=up").expect("sent");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).expect("received");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_the_state_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("guestd-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract address");
        let listener = std::os::unix::net::UnixDatagram::bind_addr(&addr).expect("bind abstract");
        notify_to(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").expect("sent");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).expect("received");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let e = notify_to(
            std::ffi::OsStr::new("/nonexistent/guestd/notify"),
            "READY=1",
        );
        assert!(e.is_err());
    }
}
