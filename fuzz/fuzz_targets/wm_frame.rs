//! A Web Messaging server frame, as the platform (or anyone on the path) might send it: decoding
//! never panics, and whatever decodes can be asked every question a session asks of it.
#![no_main]
use guestd::webmessaging::protocol::{Frame, HistoryPage, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Frame::Message { message, .. }) = decode(text) {
        let _ = (message.key(), message.disconnect(), message.typing(), message.expiration_date());
    }
    let _ = serde_json::from_str::<HistoryPage>(text);
});
