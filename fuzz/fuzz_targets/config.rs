//! A configuration file plus environment overrides: lines `GUESTD_...=...` are the environment,
//! the rest is the TOML text. Parsing and validating return an error, never panic. Each line is
//! also a log filter (`--log-level`, `RUST_LOG`, `[log] level`) for its check.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (env, toml): (Vec<&str>, Vec<&str>) =
        text.lines().partition(|l| l.starts_with("GUESTD_") && l.contains('='));
    let env = env.into_iter().filter_map(|l| {
        l.split_once('=')
            .map(|(k, v)| (k.to_string(), v.to_string()))
    });
    let _ = guestd::config::Config::from_toml(&toml.join("\n"), env);
    for line in text.lines() {
        let _ = guestd::logging::parse_filter("fuzz", line);
    }
});
