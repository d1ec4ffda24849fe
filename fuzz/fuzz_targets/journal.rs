//! A journal file read at start-up: torn, garbled, not UTF-8, live sessions and remembered ends.
//! Loading never fails on content.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let loaded = guestd::journal::load_from(data);
    assert!(loaded.is_ok(), "content never makes loading fail");
    // Remembered ends (issue 24) are read by the same loader.
    let state = guestd::journal::load_state(data);
    assert!(state.is_ok(), "content never makes loading fail");
});
