//! The server's reply to guestd's websocket upgrade, read byte by byte as it arrives.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    for end in [data.len() / 3, data.len() / 2, data.len()] {
        if let Ok(Some(head)) = guestd::transport::stream::parse_upgrade_reply(&data[..end], key) {
            assert!(head <= end);
        }
    }
});
