//! An HTTP API request body, for each command that takes one; and the same bytes as an id
//! (a conversation id in a path, say): what `check_id` lets into a URL needs no escaping, and
//! `path_segment` never leaves a character that ends a segment; and as a remote error body:
//! its `excerpt` is short and holds no control character.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for name in ["start", "attach", "send"] {
        let _ = guestd::control::command_from_body(name, "s-1", data);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let seg = guestd::transport::policy::path_segment(s);
        assert!(
            seg.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~' | b'%'))
        );
        let e = guestd::transport::policy::excerpt(s, 40);
        assert!(e.chars().count() <= 43 && !e.chars().any(char::is_control));
        if guestd::transport::policy::check_id("id", s).is_ok() {
            assert_eq!(seg, s);
            assert!(!s.contains(['.', '/', '%', '?', '#']));
        }
    }
});
