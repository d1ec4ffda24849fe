//! What every REST client and socket of every backend shares: how a call failed
//! ([`ApiError`]), the one URL policy (plaintext only to loopback), the ids that may go into a
//! URL path, and excerpts of bodies safe to log.

use std::time::Duration;

/// A URL the configuration forbids.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// The one URL policy, for REST and streams alike: https/wss anywhere; http/ws only to a
/// loopback host unless `allow_insecure`.
pub fn check_url(url: &str, allow_insecure: bool) -> Result<(), PolicyError> {
    let u = url::Url::parse(url).map_err(|e| PolicyError(format!("bad URL {url}: {e}")))?;
    match u.scheme() {
        "https" | "wss" => Ok(()),
        "http" | "ws" => {
            let loopback = match u.host() {
                Some(url::Host::Ipv4(a)) => a.is_loopback(),
                Some(url::Host::Ipv6(a)) => a.is_loopback(),
                Some(url::Host::Domain(d)) => d == "localhost",
                None => false,
            };
            if loopback || allow_insecure {
                Ok(())
            } else {
                Err(PolicyError(format!(
                    "plaintext {} to non-loopback host {}; set allow_insecure to permit",
                    u.scheme(),
                    u.host_str().unwrap_or("?")
                )))
            }
        }
        other => Err(PolicyError(format!("unsupported scheme {other}"))),
    }
}

/// The hosts a stream URL may name by default, given the API base: the API's own host and,
/// for a name of three labels or more, every host under its parent domain
/// (`https://api.mypurecloud.com` -> `api.mypurecloud.com`, `*.mypurecloud.com`; the
/// emulator's `http://127.0.0.1:8780` -> `127.0.0.1`). A two-label name or an address gives
/// only itself: `*.com` would allow anything.
pub fn default_stream_hosts(api_base: &str) -> Vec<String> {
    let Some(host) = url::Url::parse(api_base)
        .ok()
        .and_then(|u| u.host_str().map(|h| h.to_ascii_lowercase()))
    else {
        return Vec::new();
    };
    let mut out = vec![host.clone()];
    let is_name = matches!(url::Host::parse(&host), Ok(url::Host::Domain(_)));
    if let (true, Some((_, parent))) = (is_name, host.split_once('.')) {
        if parent.contains('.') {
            out.push(format!("*.{parent}"));
        }
    }
    out
}

/// Whether `host` is one `rules` names: a rule is a host (`streaming.example.com`,
/// `127.0.0.1`, `[::1]`) or `*.<domain>` for that domain and every name under it. Case does
/// not matter; ports are not compared.
pub fn host_allowed(host: &str, rules: &[String]) -> bool {
    let host = host.to_ascii_lowercase();
    rules.iter().any(|r| {
        let r = r.trim().to_ascii_lowercase();
        match r.strip_prefix("*.") {
            Some(domain) => host == domain || host.ends_with(&format!(".{domain}")),
            None => host == r,
        }
    })
}

/// The stream URL policy: [`check_url`], then, when `hosts` names any, the URL's host must be
/// one of them (see [`host_allowed`]). An `attach` names its own `eventStreamUri`; without this
/// rule it could point guestd at any internal service.
pub fn check_stream_url(
    url: &str,
    allow_insecure: bool,
    hosts: &[String],
) -> Result<(), PolicyError> {
    check_url(url, allow_insecure)?;
    if hosts.is_empty() {
        return Ok(());
    }
    let host = url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    if host_allowed(&host, hosts) {
        Ok(())
    } else {
        Err(PolicyError(format!(
            "stream host {host} is not the platform's ({}); genesys.stream_hosts can add hosts",
            hosts.join(", ")
        )))
    }
}

/// Longest id guestd puts into a URL. Genesys ids are UUIDs (36 characters).
pub const MAX_ID_LEN: usize = 128;

/// Whether `id` may go into a URL guestd builds: 1 to [`MAX_ID_LEN`] ASCII letters, digits,
/// `-` and `_`. Genesys ids (conversations, members, deployments) are UUIDs, and the emulator
/// issues UUIDs; the set leaves room for readable test ids ("demo-deployment") while it cannot
/// hold `/`, `.`, `%`, `?`, `#` or anything else that would move a request elsewhere (an id
/// `../../users/me?expand=authorization` once made guestd call that path with the
/// organisation's token).
pub fn check_id(what: &str, id: &str) -> Result<(), PolicyError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(PolicyError(format!(
            "{what} is not an id (1 to {MAX_ID_LEN} letters, digits, '-' or '_'; Genesys ids are UUIDs)"
        )))
    }
}

/// `s` as one URL path segment: every byte but letters, digits, `-`, `_` and `~`
/// percent-encoded. Defence in depth behind [`check_id`], which is what keeps dot segments out
/// (URL parsers read `%2e%2e` as `..`).
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Characters of a remote body an error or event may carry.
pub const EXCERPT_CHARS: usize = 200;

/// A short, safe excerpt of text a remote server sent (an error body, an upgrade refusal), for
/// error messages and events: control characters become spaces (no terminal escapes or forged
/// log lines), anything that looks like a bearer token (a JWT `eyJ...`, a dotted token of 32+
/// characters, an opaque run of 64+) becomes `<redacted>`, and at most `max` characters are
/// kept (then `...`).
pub fn excerpt(text: &str, max: usize) -> String {
    let is_token_char =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | '/' | '=');
    let mut out = String::new();
    let mut chars = 0;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if chars >= max {
            out.push_str("...");
            break;
        }
        if is_token_char(c) {
            let end = rest.find(|c: char| !is_token_char(c)).unwrap_or(rest.len());
            let run = &rest[..end];
            rest = &rest[end..];
            let secret = (run.starts_with("eyJ") && run.len() >= 16)
                || (run.matches('.').count() >= 2 && run.len() >= 32)
                || run.len() >= 64;
            let shown = if secret { "<redacted>" } else { run };
            for c in shown.chars() {
                if chars >= max {
                    break;
                }
                out.push(c);
                chars += 1;
            }
            continue;
        }
        rest = &rest[c.len_utf8()..];
        out.push(if c.is_control() { ' ' } else { c });
        chars += 1;
    }
    out
}

/// How a REST call failed, as the session needs to know it.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ApiError {
    /// 401: the jwt is invalid or expired.
    #[error("unauthorized (401): {0}")]
    Unauthorized(String),
    /// 404: the chat or member is gone.
    #[error("not found (404): {0}")]
    NotFound(String),
    /// 429 after retries ran out.
    #[error("rate limited (429){}", .0.map(|d| format!(", retry after {} s", d.as_secs())).unwrap_or_default())]
    RateLimited(Option<Duration>),
    /// Another 4xx: the request was wrong; not retried.
    #[error("rejected ({status}): {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The platform's message.
        message: String,
    },
    /// 5xx after retries ran out.
    #[error("server error ({status}): {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// The platform's message.
        message: String,
    },
    /// Connection, timeout or TLS failure.
    #[error("transport: {0}")]
    Transport(String),
    /// The reply was not what the API promises.
    #[error("bad reply: {0}")]
    Decode(String),
    /// The configuration forbids this endpoint (plaintext to a non-loopback host).
    #[error("refused by policy: {0}")]
    Policy(String),
    /// guestd's configuration lacks what the call needs (a `start` without organization or
    /// deployment id): refused before anything is sent.
    #[error("{0}")]
    NotConfigured(String),
}

impl From<PolicyError> for ApiError {
    fn from(e: PolicyError) -> Self {
        ApiError::Policy(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::{
        check_id, check_stream_url, check_url, default_stream_hosts, excerpt, path_segment,
    };

    #[test]
    fn streams_stay_on_the_platforms_hosts() {
        let rules = default_stream_hosts("https://api.mypurecloud.com");
        assert_eq!(rules, ["api.mypurecloud.com", "*.mypurecloud.com"]);
        for ok in [
            "wss://streaming.mypurecloud.com/v2/x",
            "wss://api.mypurecloud.com/x",
            "wss://A.B.MyPureCloud.com:8443/x",
        ] {
            assert!(check_stream_url(ok, false, &rules).is_ok(), "{ok}");
        }
        for bad in [
            "wss://mypurecloud.com.evil.example/x",
            "wss://evilmypurecloud.com/x",
            "wss://169.254.169.254/latest",
            "ws://127.0.0.1:8080/x",
        ] {
            assert!(check_stream_url(bad, false, &rules).is_err(), "{bad}");
        }
        let emu = default_stream_hosts("http://127.0.0.1:8780");
        assert_eq!(emu, ["127.0.0.1"]);
        assert!(check_stream_url("ws://127.0.0.1:9/v2/stream/c", false, &emu).is_ok());
        assert!(check_stream_url("ws://127.0.0.2:9/v2/stream/c", false, &emu).is_err());
        assert_eq!(default_stream_hosts("https://example.com"), ["example.com"]);
        let extra = vec!["*.example.net".to_string(), "[::1]".to_string()];
        assert!(check_stream_url("wss://s.example.net/x", false, &extra).is_ok());
        assert!(check_stream_url("ws://[::1]:1/x", false, &extra).is_ok());
        assert!(check_stream_url("wss://anything.example/x", false, &[]).is_ok());
    }

    #[test]
    fn excerpts_are_short_plain_and_hold_no_token() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlc2lnbmF0dXJl";
        let body =
            format!("\u{1b}[31mdenied\r\nfake: line {jwt} id 3f2a9c1d-7b4e-4c1a-9d2e-0123456789ab");
        let e = excerpt(&body, 200);
        assert!(!e.contains(jwt) && !e.contains("eyJ"), "{e}");
        assert!(e.contains("<redacted>"), "{e}");
        assert!(!e.chars().any(char::is_control), "{e:?}");
        assert!(
            e.contains("3f2a9c1d-7b4e-4c1a-9d2e-0123456789ab"),
            "ids stay: {e}"
        );
        let long = excerpt(&"x ".repeat(10_000), 200);
        assert_eq!(long.chars().count(), 203, "{long}");
        assert!(long.ends_with("..."));
        assert_eq!(
            excerpt(&"a".repeat(500), 200),
            "<redacted>",
            "an opaque run"
        );
        assert_eq!(excerpt("not found", 200), "not found");
    }

    #[test]
    fn ids_are_ids_and_nothing_that_moves_a_url() {
        for good in [
            "3f2a9c1d-7b4e-4c1a-9d2e-0123456789ab",
            "demo-deployment",
            "c1",
            "a_b",
        ] {
            assert!(check_id("id", good).is_ok(), "{good}");
        }
        let long = "a".repeat(129);
        for bad in [
            "",
            "..",
            "../../users/me?expand=authorization",
            "..%2F..%2Fusers",
            "a/b",
            "a.b",
            "a b",
            "a?b",
            "a#b",
            "a\u{0}",
            "ü",
            long.as_str(),
        ] {
            assert!(check_id("id", bad).is_err(), "{bad:?}");
        }
        assert_eq!(path_segment("a-b_c~9"), "a-b_c~9");
        assert_eq!(path_segment("../x?y"), "%2E%2E%2Fx%3Fy");
        assert_eq!(path_segment("ü"), "%C3%BC");
    }

    #[test]
    fn plaintext_only_to_loopback_unless_allowed() {
        assert!(check_url("http://127.0.0.1:8080", false).is_ok());
        assert!(check_url("ws://localhost:1/x", false).is_ok());
        assert!(check_url("ws://[::1]:1/x", false).is_ok());
        assert!(check_url("https://api.mypurecloud.com", false).is_ok());
        assert!(check_url("http://api.example.com", false).is_err());
        assert!(check_url("ws://10.0.0.1/x", false).is_err());
        assert!(check_url("ws://10.0.0.1/x", true).is_ok());
        assert!(check_url("ftp://x", true).is_err());
        assert!(check_url("not a url", true).is_err());
    }
}
