//! The log filter: where it comes from (`--log-level`/`GUESTD_LOG_LEVEL`, `[log] level`,
//! `RUST_LOG`, else `info`) and a check that refuses a filter that would silently drop every
//! line (`RUST_LOG=verbose` is, to tracing, "everything of the target `verbose`"), while
//! `warn,hyper` or `guestd::session` pass as tracing reads them.

use tracing_subscriber::EnvFilter;

/// The levels a directive may name.
const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

/// Why a filter was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "{source_name}: `{directive}` is neither a level ({}) nor target=level (e.g. \
     `info,guestd=debug`){detail}",
    LEVELS.join(", ")
)]
pub struct FilterError {
    /// Where the filter came from (`RUST_LOG`, `--log-level`, `log.level`).
    pub source_name: String,
    /// The directive refused.
    pub directive: String,
    /// tracing's own words, when it refused the directive too.
    pub detail: String,
}

fn is_level(s: &str) -> bool {
    LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s.trim()))
}

/// Check a filter (comma-separated directives: a level, `target[span{field}]=level`, or a bare
/// target) and build it. A filter of bare words only, none a level nor one of guestd's targets
/// (`RUST_LOG=verbose`), is refused: tracing would take each for a target and show nothing.
pub fn parse_filter(source_name: &str, spec: &str) -> Result<EnvFilter, FilterError> {
    let refuse = |directive: &str, detail: String| FilterError {
        source_name: source_name.to_string(),
        directive: directive.to_string(),
        detail,
    };
    let directives: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    for d in &directives {
        if let Some((target, level)) = d.rsplit_once('=')
            && (target.trim().is_empty() || !is_level(level))
        {
            return Err(refuse(d, String::new()));
        }
    }
    // A bare word is a target ("everything of it"): fine beside a level (`warn,hyper`) or when
    // it names guestd's own (`guestd`, `guestd::session`). Alone and unknown (`verbose`), it
    // would show nothing at all.
    let known_target = |d: &str| d.starts_with("guestd") || d.contains("::");
    if let Some(first) = directives.first()
        && directives
            .iter()
            .all(|d| !d.contains('=') && !is_level(d) && !known_target(d))
    {
        return Err(refuse(first, String::new()));
    }
    EnvFilter::builder()
        .with_default_directive(tracing::level_filters::LevelFilter::INFO.into())
        // Spaces after the commas are allowed here; tracing's parser takes none.
        .parse(directives.join(","))
        .map_err(|e| refuse(spec, format!(": {e}")))
}

/// The filter in force: `flag` (`--log-level` or `GUESTD_LOG_LEVEL`), else `configured`
/// (`[log] level`), else `RUST_LOG`, else `info`; with the name of where it came from.
pub fn choose(
    flag: Option<&str>,
    configured: &str,
    rust_log: Option<&str>,
) -> (&'static str, String) {
    match (flag, configured.trim(), rust_log) {
        (Some(f), _, _) if !f.trim().is_empty() => ("--log-level", f.to_string()),
        (_, c, _) if !c.is_empty() => ("log.level", c.to_string()),
        (_, _, Some(r)) if !r.trim().is_empty() => ("RUST_LOG", r.to_string()),
        _ => ("default", "info".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_word_that_is_not_a_level_is_refused() {
        for ok in [
            "info",
            "DEBUG",
            "guestd=debug",
            "info,guestd=trace",
            "guestd::session=warn, hyper=off",
            "guestd[session]=debug",
        ] {
            assert!(parse_filter("RUST_LOG", ok).is_ok(), "{ok}");
        }
        // A bare target beside a level, or one of guestd's own: what the user meant.
        for ok in [
            "warn,guestd::session",
            "info,hyper",
            "guestd",
            "guestd::session",
            "info,verbose",
        ] {
            assert!(parse_filter("RUST_LOG", ok).is_ok(), "{ok}");
        }
        for bad in ["verbose", "loud,noisy", "guestd=loud", "=debug"] {
            let e = parse_filter("RUST_LOG", bad).unwrap_err().to_string();
            assert!(
                e.starts_with("RUST_LOG: `") && e.contains("neither a level"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_flag_wins_then_the_file_then_rust_log() {
        assert_eq!(
            choose(Some("debug"), "warn", Some("trace")),
            ("--log-level", "debug".into())
        );
        assert_eq!(
            choose(None, "warn", Some("trace")),
            ("log.level", "warn".into())
        );
        assert_eq!(
            choose(None, "", Some("trace")),
            ("RUST_LOG", "trace".into())
        );
        assert_eq!(choose(None, " ", None), ("default", "info".into()));
    }
}
