//! Every shell example in README.md and docs/*.md works as written, or says why it cannot run
//! here. Each ```sh block must be marked just above it:
//!
//! - `<!-- docs-test: run NAME -->`: this test runs it (a runner per NAME below), on free
//!   ports, with the binary under test, and checks what matters in its output (event types,
//!   the `ended` reason), not timestamps or ids;
//! - `<!-- docs-test: skip REASON -->`: it cannot run here (a real Genesys org, minutes of
//!   benchmark); the reason is printed, never skipped silently.
//!
//! An unmarked block fails the test, so a new example cannot drift unnoticed. Every shipped
//! configuration file is checked with `guestd check-config` too.

mod common;

use common::{free_port, temp_dir};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_guestd");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// (file, line, marker, block text) for every ```sh block.
fn blocks() -> Vec<(String, usize, Option<String>, String)> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            if lines[i].trim() == "```sh" {
                let marker = lines[..i]
                    .iter()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .and_then(|l| l.trim().strip_prefix("<!-- docs-test: "))
                    .and_then(|l| l.strip_suffix(" -->"))
                    .map(str::to_string);
                let end = (i + 1..lines.len())
                    .find(|&j| lines[j].trim() == "```")
                    .unwrap_or(lines.len());
                let name = f.strip_prefix(root()).unwrap().display().to_string();
                out.push((name, i + 1, marker, lines[i + 1..end].join("\n")));
                i = end;
            }
            i += 1;
        }
    }
    out
}

/// README's walk-through: a chat started, an agent joining, writing and ending it, one ended.
async fn walkthrough(script: &str) {
    // README's script names its ports: picked here and released for it (racy; see `free_port`).
    let (emu_port, api_port) = (free_port(), free_port());
    let script = script
        .lines()
        .filter(|l| !l.starts_with("cargo build"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("./target/release/guestd", BIN)
        .replace("8780", &emu_port.to_string())
        .replace("8787", &api_port.to_string());
    let dir = temp_dir("docs");
    // Whatever happens, the servers the script started go with it.
    let script = format!("set -u\ntrap 'kill $(jobs -p) 2>/dev/null' EXIT\n{script}\n");
    let run = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&dir)
        .env(
            "GUESTD_CONTROL__HTTP_LISTEN",
            format!("127.0.0.1:{api_port}"),
        )
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the walk-through finishes within a minute")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the walk-through failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("type").is_some())
        .collect();
    let types: Vec<&str> = events.iter().filter_map(|v| v["type"].as_str()).collect();
    for want in [
        "session_started",
        "connected",
        "agent_connected",
        "message",
        "agent_disconnected",
        "ended",
    ] {
        assert!(types.contains(&want), "{want} in {types:?}");
    }
    assert!(
        events
            .iter()
            .any(|v| v["type"] == "message" && v["body"] == "Hello, how can I help?"),
        "the agent's message: {types:?}"
    );
    let ended: Vec<&Value> = events.iter().filter(|v| v["type"] == "ended").collect();
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0]["reason"], "agent_ended");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn every_shell_example_runs_as_written_or_says_why_not() {
    let all = blocks();
    assert!(all.len() >= 5, "found the examples: {}", all.len());
    let unmarked: Vec<String> = all
        .iter()
        .filter(|(_, _, m, _)| m.is_none())
        .map(|(f, l, _, _)| format!("{f}:{l}"))
        .collect();
    assert!(
        unmarked.is_empty(),
        "mark each ```sh block with <!-- docs-test: run NAME --> or <!-- docs-test: skip REASON -->: {unmarked:?}"
    );
    let mut ran = 0;
    for (file, line, marker, text) in &all {
        let marker = marker.as_deref().unwrap_or_default();
        if let Some(reason) = marker.strip_prefix("skip ") {
            println!("skipped {file}:{line}: {reason}");
            continue;
        }
        match marker.strip_prefix("run ") {
            Some("walkthrough") => walkthrough(text).await,
            other => panic!("{file}:{line}: no runner for {other:?}"),
        }
        println!("ran {file}:{line} ({marker})");
        ran += 1;
    }
    assert!(ran >= 1, "at least the README walk-through runs");
}

#[test]
fn every_shipped_config_passes_check_config() {
    let mut checked = 0;
    for entry in std::fs::read_dir(root().join("config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let mut cmd = std::process::Command::new(BIN);
        cmd.arg("check-config").arg("--config").arg(&path);
        if path.file_name() == Some(Path::new("emulator.toml").as_os_str()) {
            cmd.arg("--emulator");
        }
        let out = cmd.env_remove("GUESTD_CONFIG").output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 2, "config/guestd.toml and config/emulator.toml");
}
