//! A websocket text frame from the platform: decoding never panics, whatever arrives.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = guestd::genesys::protocol::decode_frame(text);
        let _ = guestd::genesys::protocol::is_ping(text);
    }
});
