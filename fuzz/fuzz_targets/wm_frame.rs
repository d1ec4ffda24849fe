//! A Web Messaging server frame, as the platform (or anyone on the path) might send it: decoding
//! never panics, whatever decodes can be asked every question a session asks of it, and a live
//! session's rules take it (they never panic and end at most once). The same bytes are also read
//! as a history page and as a deployment's `config.json`.
#![no_main]
use guestd::events::EventKind;
use guestd::backends::web_messaging::machine::{Action, Begin, Deployment, Input, Machine};
use guestd::backends::web_messaging::protocol::{Frame, HistoryPage, SessionResponse, decode};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(frame) = decode(text) {
        if let Frame::Message { message, .. } = &frame {
            let _ = (message.key(), message.disconnect(), message.typing(), message.expiration_date());
        }
        let now = tokio::time::Instant::now();
        let wall = 1_800_000_000_000;
        let mut m = Machine::new(Arc::new(Default::default()), Deployment::default(), Begin::Attach, now);
        m.start();
        m.step(Input::Opened, now, wall);
        let live = SessionResponse {
            connected: true,
            duration_seconds: Some(3600),
            expiration_date: Some(1_800_003_600),
            ..Default::default()
        };
        m.step(Input::Frame(Frame::Session(live)), now, wall);
        let a = m.step(Input::Frame(frame.clone()), now, wall);
        let b = m.step(Input::Frame(frame), now, wall);
        // Matched on the action, not its printout: a frame's own text may read "Ended {".
        let ends = a
            .iter()
            .chain(&b)
            .filter(|x| matches!(x, Action::Emit(EventKind::Ended { .. })))
            .count();
        assert!(ends <= 1);
    }
    let _ = serde_json::from_str::<HistoryPage>(text);
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        let _ = guestd::backends::web_messaging::client::parse_deployment(&v);
    }
});
