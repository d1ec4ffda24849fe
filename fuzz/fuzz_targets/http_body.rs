//! An HTTP API request body, for each command that takes one.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for name in ["start", "attach", "send"] {
        let _ = guestd::control::command_from_body(name, "s-1", data);
    }
});
