//! Websocket text frames from the platform, one per line of the input: decoding never panics,
//! whatever arrives, and a live session's rules take every frame that decodes (one whose agent
//! is connected, so the member and message paths all run): they never panic, end the chat at
//! most once, and do nothing after the end.
#![no_main]
use guestd::backends::guest_chat::api::{ChatMember, MemberState, Role};
use guestd::events::EventKind;
use guestd::backends::guest_chat::{Action, Input, Machine, Timing};
use libfuzzer_sys::fuzz_target;

fn member(id: &str, role: Role) -> ChatMember {
    ChatMember {
        id: id.into(),
        role,
        state: MemberState::Connected,
        leave_date: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let now = tokio::time::Instant::now();
    let mut m = Machine::new(Timing::default(), "guest", now);
    m.anchor_wall(now, 1_800_000_000_000);
    m.step(Input::Tick, now);
    m.step(Input::Opened, now);
    m.step(
        Input::Members(Ok(vec![
            member("guest", Role::Customer),
            member("agent", Role::Agent),
            member("flow", Role::Workflow),
        ])),
        now,
    );
    let mut ends = 0;
    for (i, line) in text.lines().enumerate() {
        let _ = guestd::backends::guest_chat::protocol::is_ping(line);
        let input = match guestd::backends::guest_chat::client::chat_event(line) {
            Ok(ev) => Input::Frame(ev),
            Err(e) => Input::BadFrame(e),
        };
        let at = now + std::time::Duration::from_millis(i as u64);
        let acts = m.step(input, at);
        if ends > 0 {
            assert!(acts.is_empty(), "actions after the end: {acts:?}");
        }
        ends += acts
            .iter()
            .filter(|a| matches!(a, Action::Emit(EventKind::Ended { .. })))
            .count();
        assert!(ends <= 1, "a second ended");
        // Answer whatever the frame asked for with nothing: a list that failed, an empty page.
        for a in acts {
            let reply = match a {
                Action::FetchMembers => {
                    Input::Members(Err(guestd::backends::guest_chat::api::Failure::Other("fuzz".into())))
                }
                Action::Backfill { generation, .. } => Input::Backfill(generation, Ok(Vec::new())),
                _ => continue,
            };
            let more = m.step(reply, at);
            ends += more
                .iter()
                .filter(|a| matches!(a, Action::Emit(EventKind::Ended { .. })))
                .count();
            assert!(ends <= 1, "a second ended");
        }
    }
});
