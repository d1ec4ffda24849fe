//! Conformance: Genesys's own guest chat SDK (npm `purecloud-guest-chat-client` 13.2.0, pinned
//! in tests/sdk/package-lock.json) walks a whole chat and its error cases against the emulator
//! over real sockets (tests/sdk/walk.mjs). The emulator is only worth its fidelity: what the
//! platform's own client sends must be accepted, and what it expects must come back.

use guestd::emulator::{Emulator, EmulatorConfig};
use std::path::Path;
use std::process::Command;

/// Install the pinned SDK with `npm ci` when it is not there yet.
fn install(dir: &Path) {
    if dir
        .join("node_modules/purecloud-guest-chat-client")
        .is_dir()
    {
        return;
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .output()
        .expect("npm is needed for this test (Node 20 and npm)");
    assert!(
        out.status.success(),
        "npm ci failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn genesys_sdk_walks_a_whole_chat_against_the_emulator() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk");
    install(&dir);
    let emu = Emulator::start(
        EmulatorConfig {
            // Agents only on the walk's admin call.
            agent_join_delay: None,
            ..EmulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let base = emu.base_url();
    let out = tokio::process::Command::new("node")
        .arg("walk.mjs")
        .arg(&base)
        .current_dir(&dir)
        .output()
        .await
        .expect("node is needed for this test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the SDK walk failed:\n{stdout}\n{stderr}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.ends_with(" 0 failed"), "{last}");
    let passed: usize = last
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(passed >= 80, "the walk ran its checks: {last}");
    emu.shutdown();
}
