//! The Web Messaging rules in virtual time: frames are the reference's JSON, decoded by the real
//! decoder, so a 72-hour session or a 5-second retry costs nothing.

use super::*;
use crate::backends::web_messaging::protocol::decode;
use proptest::prelude::*;
use serde_json::json;
use std::collections::VecDeque;

const WALL0: i64 = 1_800_000_000_000;
const TTL: u64 = 3600;

pub(super) fn settings() -> Settings {
    Settings {
        include_bodies: false,
        backoff: crate::backoff_policy::BackoffConfig {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: 0.0,
        },
        ..Settings::default()
    }
}

pub(super) struct Sim {
    pub m: Machine,
    pub base: Instant,
    pub t: Duration,
    pub out: Vec<Action>,
}

impl Sim {
    pub fn new(begin: Begin, deployment: Deployment) -> Sim {
        let base = Instant::now();
        let mut m = Machine::new(Arc::new(settings()), deployment, begin, base);
        let out = m.start();
        Sim {
            m,
            base,
            t: Duration::ZERO,
            out,
        }
    }

    pub fn now(&self) -> Instant {
        self.base + self.t
    }

    pub fn wall(&self) -> i64 {
        WALL0 + self.t.as_millis() as i64
    }

    pub fn step(&mut self, i: Input) -> &[Action] {
        self.out = self.m.step(i, self.now(), self.wall());
        &self.out
    }

    pub fn frame(&mut self, v: serde_json::Value) -> &[Action] {
        let f = decode(&v.to_string()).expect("a frame the reference gives");
        self.step(Input::Frame(f))
    }

    /// Advance to `t` ms, ticking at every deadline on the way; every action.
    pub fn until(&mut self, t_ms: u64) -> Vec<Action> {
        let end = Duration::from_millis(t_ms);
        let mut all = Vec::new();
        let mut stuck = 0;
        loop {
            let next = self
                .m
                .next_deadline()
                .map(|d| d.saturating_duration_since(self.base));
            match next {
                Some(d) if d <= end => {
                    // A deadline that a tick at its instant does not move would spin the
                    // session's task forever.
                    stuck = if d <= self.t { stuck + 1 } else { 0 };
                    assert!(
                        stuck < 100,
                        "a deadline at {d:?} that a tick does not clear"
                    );
                    self.t = self.t.max(d);
                    all.extend(self.m.step(Input::Tick, self.now(), self.wall()));
                }
                _ => break,
            }
        }
        self.t = end;
        all.extend(self.m.step(Input::Tick, self.now(), self.wall()));
        all
    }

    pub fn session(&self, new_session: bool, read_only: bool) -> serde_json::Value {
        json!({"type":"response","class":"SessionResponse","code":200,"body":{
            "connected":true,"newSession":new_session,"readOnly":read_only,
            "durationSeconds":TTL,"expirationDate":(self.wall()/1000) as u64 + TTL}})
    }

    /// Open and configure.
    pub fn live(&mut self) {
        self.step(Input::Opened);
        let s = self.session(true, false);
        self.frame(s);
        assert_eq!(self.m.phase(), Phase::Live);
    }
}

pub(super) fn ended(a: &[Action]) -> Option<(EndReason, EndExtra)> {
    a.iter().find_map(|a| match a {
        Action::Emit(EventKind::Ended { reason, extra, .. }) => Some((*reason, extra.clone())),
        _ => None,
    })
}

fn writes(a: &[Action]) -> Vec<Out> {
    a.iter()
        .filter_map(|a| match a {
            Action::Write(o) => Some(o.clone()),
            _ => None,
        })
        .collect()
}

fn replies(a: &[Action]) -> Vec<(String, Result<Reply, Refusal>)> {
    a.iter()
        .filter_map(|a| match a {
            Action::Reply(t, r) => Some((t.clone(), r.clone())),
            _ => None,
        })
        .collect()
}

fn emitted(a: &[Action], kind: &str) -> usize {
    a.iter()
        .filter(|a| matches!(a, Action::Emit(k) if k.type_name() == kind))
        .count()
}

fn echo(tid: &str, text: &str, id: &str) -> serde_json::Value {
    json!({"type":"message","class":"StructuredMessage","code":200,"tracingId":tid,"body":{
        "text":text,"direction":"Inbound","id":"x","type":"Text","originatingEntity":"Human",
        "channel":{"time":"2026-11-29T12:00:00.000Z","messageId":id}}})
}

fn agent(text: &str, id: &str, time: &str) -> serde_json::Value {
    json!({"type":"message","class":"StructuredMessage","code":200,"body":{
        "text":text,"direction":"Outbound","id":id,"type":"Text","originatingEntity":"Human",
        "channel":{"time":time,"messageId":id}}})
}

fn disconnect(read_only: bool) -> serde_json::Value {
    let mut v = json!({"type":"message","class":"StructuredMessage","code":200,"body":{
        "type":"Event","direction":"Outbound","id":"d","originatingEntity":"Bot",
        "channel":{"time":"2026-11-29T12:00:09.000Z"},
        "events":[{"eventType":"Presence","presence":{"type":"Disconnect"}}]}});
    if read_only {
        v["body"]["metadata"] = json!({"readOnly":"true"});
    }
    v
}

/// Issue 25, item 9: an agent's typing event carries no originatingEntity (the shape the
/// Messenger Transport SDK's fixtures show): it is the agent's, not a bot's; a bot's says Bot.
/// A Receipt frame is not a message.
#[test]
fn typing_without_an_entity_is_the_agents_and_a_receipt_is_no_message() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    let typing = |entity: Option<&str>| {
        let mut v = json!({"type":"message","class":"StructuredMessage","code":200,"body":{
            "type":"Event","direction":"Outbound","id":"t",
            "channel":{"time":"2026-11-29T12:00:01.000Z"},
            "events":[{"eventType":"Typing","typing":{"type":"On","duration":5000}}]}});
        if let Some(e) = entity {
            v["body"]["originatingEntity"] = json!(e);
        }
        v
    };
    for (entity, role) in [
        (None, "agent"),
        (Some("Human"), "agent"),
        (Some("Bot"), "workflow"),
    ] {
        let a = s.frame(typing(entity)).to_vec();
        let got: Vec<String> = a
            .iter()
            .filter_map(|a| match a {
                Action::Emit(EventKind::Typing { sender_role, .. }) => Some(sender_role.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(got, [role], "{entity:?}");
    }
    let receipt = json!({"type":"message","class":"StructuredMessage","code":200,"body":{
        "type":"Receipt","direction":"Outbound","id":"r1","originatingEntity":"Human",
        "channel":{"time":"2026-11-29T12:00:02.000Z","messageId":"r1"},"status":"Delivered"}});
    let a = s.frame(receipt).to_vec();
    assert_eq!(emitted(&a, "message"), 0, "{a:?}");
}

#[test]
fn a_start_opens_configures_and_connects() {
    let mut s = Sim::new(Begin::Start { start_new: false }, Deployment::default());
    assert!(matches!(s.out[..], [Action::Connect]));
    let a = s.step(Input::Opened).to_vec();
    assert_eq!(writes(&a), [Out::Configure { start_new: false }]);
    let v = s.session(true, false);
    let a = s.frame(v).to_vec();
    assert_eq!(emitted(&a, "connected"), 1);
    assert_eq!(s.m.phase(), Phase::Live);
    assert!(s.m.expires().is_some());
}

#[test]
fn auto_start_sends_a_join_for_a_new_session() {
    let d = Deployment {
        auto_start: true,
        ..Default::default()
    };
    let mut s = Sim::new(Begin::Start { start_new: true }, d);
    let a = s.step(Input::Opened).to_vec();
    assert_eq!(writes(&a), [Out::Configure { start_new: true }]);
    let v = s.session(true, false);
    assert_eq!(writes(s.frame(v)), [Out::Join]);
}

#[test]
fn a_send_is_answered_by_its_echo_matched_by_tracing_id() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    let a = s
        .step(Input::Send {
            tid: "t1".into(),
            text: "hi".into(),
        })
        .to_vec();
    assert_eq!(
        writes(&a),
        [Out::Text {
            tid: "t1".into(),
            text: "hi".into()
        }]
    );
    // An agent message in between is not the answer.
    s.frame(agent("hello", "a1", "2026-11-29T12:00:00.000Z"));
    let a = s.frame(echo("t1", "hi", "m1")).to_vec();
    assert_eq!(
        replies(&a),
        [(
            "t1".to_string(),
            Ok(Reply::Sent {
                message_id: "m1".into(),
                timestamp: "2026-11-29T12:00:00.000Z".into()
            })
        )]
    );
    assert_eq!(emitted(&a, "message"), 1);
    assert_eq!(s.m.last_message_id(), Some("m1"));
}

#[test]
fn sends_are_paced_under_the_rate() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    let mut written = 0;
    for i in 0..5 {
        let a = s
            .step(Input::Send {
                tid: format!("t{i}"),
                text: "x".into(),
            })
            .to_vec();
        written += writes(&a).len();
    }
    assert_eq!(written, 2, "2 per second");
    let a = s.until(1000);
    assert_eq!(writes(&a).len(), 2);
    let a = s.until(2000);
    assert_eq!(writes(&a).len(), 1);
}

#[test]
fn a_429_frame_puts_the_send_back_and_pauses_without_dropping_the_socket() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    s.step(Input::Send {
        tid: "t1".into(),
        text: "a".into(),
    });
    let a = s
        .frame(json!({"type":"response","class":"TooManyRequestsErrorMessage","code":429,"tracingId":"t1",
            "body":{"retryAfter":3,"errorCode":4029,"errorMessage":"Message rate too high for this session"}}))
        .to_vec();
    assert!(replies(&a).is_empty(), "not an answer yet");
    assert!(!a.iter().any(|a| matches!(a, Action::CloseSocket)));
    assert!(writes(&s.until(2900)).is_empty(), "paused for retryAfter");
    let a = s.until(3000);
    assert_eq!(
        writes(&a),
        [Out::Text {
            tid: "t1".into(),
            text: "a".into()
        }]
    );
    assert_eq!(s.m.phase(), Phase::Live);
}

/// Issue 25, item 7: a 429 without a tracingId (the Transport SDK's fixtures show no other) puts
/// the oldest unconfirmed send back and sends it again after retryAfter; its echo confirms it
/// once.
#[test]
fn a_429_without_a_tracing_id_retries_the_oldest_unconfirmed_send() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    s.step(Input::Send {
        tid: "t1".into(),
        text: "a".into(),
    });
    let a = s
        .frame(json!({"type":"response","class":"TooManyRequestsErrorMessage","code":429,
            "body":{"retryAfter":1,"errorCode":4029,"errorMessage":"Message rate too high for this session"}}))
        .to_vec();
    assert!(replies(&a).is_empty(), "not an answer yet: {a:?}");
    let a = s.until(1000);
    assert_eq!(
        writes(&a),
        [Out::Text {
            tid: "t1".into(),
            text: "a".into()
        }]
    );
    let a = s.frame(echo("t1", "a", "m-1")).to_vec();
    let r = replies(&a);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, "t1");
    assert!(r[0].1.is_ok(), "{r:?}");
    // Nothing more later: no second answer, no unconfirmed.
    assert!(replies(&s.until(30_000)).is_empty());
}

#[test]
fn a_409_makes_the_session_read_only_and_later_sends_are_refused_here() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    s.step(Input::Send {
        tid: "t1".into(),
        text: "a".into(),
    });
    let a = s
        .frame(
            json!({"type":"response","class":"string","code":409,"tracingId":"t1",
            "body":"Session is read-only, no new messages allowed"}),
        )
        .to_vec();
    assert_eq!(replies(&a), [("t1".to_string(), Err(Refusal::ReadOnly))]);
    let a = s
        .step(Input::Send {
            tid: "t2".into(),
            text: "b".into(),
        })
        .to_vec();
    assert!(writes(&a).is_empty());
    assert_eq!(replies(&a), [("t2".to_string(), Err(Refusal::ReadOnly))]);
    assert!(ended(&a).is_none());
}

#[test]
fn presence_disconnect_ends_the_conversation_read_only_or_not() {
    for ro in [true, false] {
        let mut s = Sim::new(Begin::Attach, Deployment::default());
        s.live();
        let a = s.frame(disconnect(ro)).to_vec();
        let (reason, extra) = ended(&a).expect("ended");
        assert_eq!(reason, EndReason::ConversationDisconnected);
        assert_eq!(extra.scope, Some(EndScope::Conversation));
        assert_eq!(extra.read_only, ro);
        assert!(matches!(a.last(), Some(Action::Stop)));
        // Nothing after the end but refusals.
        let a = s
            .step(Input::Send {
                tid: "late".into(),
                text: "x".into(),
            })
            .to_vec();
        assert_eq!(replies(&a), [("late".to_string(), Err(Refusal::Ended))]);
        assert!(s.frame(disconnect(ro)).is_empty());
    }
}

#[test]
fn session_level_ends_name_their_reason_and_scope() {
    let cases = [
        (
            json!({"type":"response","class":"SessionExpiredEvent","code":200,"body":{}}),
            EndReason::SessionExpired,
            EndScope::Session,
        ),
        (
            json!({"type":"message","class":"SessionExpiredEvent","code":200,"body":{}}),
            EndReason::SessionExpired,
            EndScope::Session,
        ),
        (
            json!({"type":"response","class":"string","code":4006,"body":"session expired error message"}),
            EndReason::SessionExpired,
            EndScope::Session,
        ),
        (
            json!({"type":"response","class":"string","code":4007,"body":"session not found error message"}),
            EndReason::SessionNotFound,
            EndScope::Session,
        ),
        (
            json!({"type":"message","class":"SessionClearedEvent","code":200,"body":{}}),
            EndReason::SessionCleared,
            EndScope::Session,
        ),
        (
            json!({"type":"message","class":"ConnectionClosedEvent","code":200,"body":{"reason":"signedIn"}}),
            EndReason::ConnectionClosed,
            EndScope::Session,
        ),
        (
            json!({"type":"message","class":"ConnectionClosedEvent","code":200,"body":{"reasonCode":"signedIn"}}),
            EndReason::ConnectionClosed,
            EndScope::Session,
        ),
        (
            json!({"type":"message","class":"ConnectionClosedEvent","code":200,"body":{}}),
            EndReason::ConnectionClosed,
            EndScope::Connection,
        ),
        (
            json!({"type":"message","class":"LogoutEvent","code":200,"body":{}}),
            EndReason::ConnectionClosed,
            EndScope::Session,
        ),
    ];
    for (frame, reason, scope) in cases {
        let mut s = Sim::new(Begin::Attach, Deployment::default());
        s.live();
        let a = s.frame(frame.clone()).to_vec();
        assert_eq!(
            ended(&a),
            Some((
                reason,
                EndExtra {
                    scope: Some(scope),
                    read_only: false
                }
            )),
            "{frame}"
        );
    }
}

#[test]
fn a_silent_socket_is_found_by_ping_and_the_reconnect_backfills_after_the_last_message() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    s.frame(agent("one", "a1", "2026-11-29T12:00:01.000Z"));
    let a = s.until(15_000);
    assert!(a.iter().any(|a| matches!(a, Action::Ping)));
    s.step(Input::Pong);
    let a = s.until(30_000);
    assert!(
        a.iter().any(|a| matches!(a, Action::Ping)),
        "answered: ping again"
    );
    // No pong this time: dead at the next ping.
    let a = s.until(45_000);
    assert_eq!(emitted(&a, "disconnected"), 1);
    assert_eq!(emitted(&a, "reconnecting"), 1);
    assert!(a.iter().any(|a| matches!(a, Action::CloseSocket)));
    assert_eq!(s.m.phase(), Phase::Reconnecting);
    let a = s.until(46_000);
    assert!(a.iter().any(|a| matches!(a, Action::Connect)));
    let a = s.step(Input::Opened).to_vec();
    assert_eq!(writes(&a), [Out::Configure { start_new: false }]);
    let v = s.session(false, false);
    let a = s.frame(v).to_vec();
    assert_eq!(writes(&a), [Out::GetJwt]);
    assert_eq!(emitted(&a, "connected"), 0);
    let a = s
        .frame(json!({"type":"response","class":"JwtResponse","code":200,"body":{"jwt":"hist-jwt","exp":1}}))
        .to_vec();
    assert!(matches!(&a[..], [Action::FetchHistory { after: Some(k), .. }] if k == "a1"));
    // History newest first, with the old message and two new ones.
    let page = page(&[
        agent("three", "a3", "2026-11-29T12:00:40.000Z"),
        agent("two", "a2", "2026-11-29T12:00:30.000Z"),
        agent("one", "a1", "2026-11-29T12:00:01.000Z"),
    ]);
    let a = s
        .step(Input::History {
            messages: Ok(page),
            calls: 1,
        })
        .to_vec();
    assert_eq!(
        backfilled_ids(&a),
        ["a2", "a3"],
        "once each, in order, after the last seen"
    );
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Emit(EventKind::Reconnected { backfilled: 2, .. })
    )));
    // A live duplicate of a backfilled message is not emitted again.
    let a = s
        .frame(agent("three", "a3", "2026-11-29T12:00:40.000Z"))
        .to_vec();
    assert_eq!(emitted(&a, "message"), 0);
}

#[test]
fn history_calls_stay_under_the_per_minute_limit() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    let mut fetched = 0;
    for k in 0..12u64 {
        s.step(Input::Lost("drop".into()));
        s.until(s.t.as_millis() as u64 + 1000);
        s.step(Input::Opened);
        let v = s.session(false, false);
        let a = s.frame(v).to_vec();
        if writes(&a).contains(&Out::GetJwt) {
            fetched += 1;
            s.frame(json!({"type":"response","class":"JwtResponse","code":200,"body":{"jwt":"j","exp":1}}));
            s.step(Input::History {
                messages: Ok(vec![]),
                calls: 1,
            });
        }
        let _ = k;
    }
    assert_eq!(fetched, 10, "10 per minute; the rest wait");
}

#[test]
fn a_reconnect_answered_with_a_new_session_means_the_old_one_expired() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    s.step(Input::Lost("closed by server".into()));
    s.until(2000);
    s.step(Input::Opened);
    let v = s.session(true, false);
    let a = s.frame(v).to_vec();
    assert_eq!(ended(&a).map(|e| e.0), Some(EndReason::SessionExpired));
}

#[test]
fn a_resumed_session_must_still_exist() {
    let mut s = Sim::new(Begin::Resume, Deployment::default());
    s.step(Input::Opened);
    let v = s.session(true, false);
    let a = s.frame(v).to_vec();
    assert_eq!(ended(&a).map(|e| e.0), Some(EndReason::SessionExpired));
    let mut s = Sim::new(Begin::Resume, Deployment::default());
    s.step(Input::Opened);
    let v = s.session(false, false);
    let a = s.frame(v).to_vec();
    assert!(ended(&a).is_none());
    assert_eq!(writes(&a), [Out::GetJwt], "a resumed session backfills");
}

#[test]
fn an_attach_to_a_read_only_session_ends_its_conversation_at_once() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.step(Input::Opened);
    let v = s.session(false, true);
    let a = s.frame(v).to_vec();
    let (r, e) = ended(&a).unwrap();
    assert_eq!(r, EndReason::ConversationDisconnected);
    assert!(e.read_only);
}

#[test]
fn unreachable_past_the_last_known_expiry_gives_up() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    s.step(Input::Lost("network".into()));
    let mut ends = 0;
    let mut t = 0;
    while t < (TTL + 60) * 1000 && ends == 0 {
        t += 5000;
        let a = s.until(t);
        if a.iter().any(|a| matches!(a, Action::Connect)) {
            let a = s
                .step(Input::ConnectFailed {
                    detail: "refused".into(),
                    fatal: false,
                })
                .to_vec();
            ends += usize::from(ended(&a).is_some());
        }
        ends += usize::from(ended(&a).is_some());
    }
    assert_eq!(ends, 1);
    assert_eq!(s.m.ended(), Some(EndReason::ReconnectGraceExpired));
    assert!(s.t >= Duration::from_secs(TTL), "not before the expiry");
}

#[test]
fn the_expiry_warning_comes_once_and_again_after_activity_moves_the_expiry() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    let lead = settings().expiry_warning_lead.as_millis() as u64;
    let a = s.until(TTL * 1000 - lead - 1);
    assert_eq!(emitted(&a, "expiry_warning"), 0);
    let a = s.until(TTL * 1000 - lead + 1000);
    assert_eq!(emitted(&a, "expiry_warning"), 1);
    s.step(Input::Pong);
    // The agent writes: the session lives another hour.
    s.frame(agent("still there?", "a9", "2026-11-29T13:00:00.000Z"));
    let now = s.t.as_millis() as u64;
    let a = s.until(now + TTL * 1000 - lead - 1000);
    assert_eq!(emitted(&a, "expiry_warning"), 0);
    let a = s.until(now + TTL * 1000 - lead + 1000);
    assert_eq!(emitted(&a, "expiry_warning"), 1);
}

#[test]
fn an_expiry_reported_in_the_past_does_not_keep_a_deadline_due() {
    // The platform's clock behind guestd's: the expiry it reports has already passed here.
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.step(Input::Opened);
    let past = json!({"type":"response","class":"SessionResponse","code":200,"body":{
        "connected":true,"newSession":true,"durationSeconds":TTL,
        "expirationDate":(s.wall()/1000) as u64 - 10}});
    s.frame(past);
    // `until` fails if a deadline is not moved by its tick.
    let a = s.until(60_000);
    assert_eq!(
        emitted(&a, "expiry_warning"),
        0,
        "no warning for an expiry already past"
    );
    assert!(
        writes(&a).iter().any(|w| matches!(w, Out::Echo { .. })),
        "an echo asks"
    );
}

#[test]
fn at_expiry_an_echo_asks_and_the_answer_ends_the_session() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    let mut echoes = Vec::new();
    let mut t = 0;
    while t < TTL * 1000 + 3000 {
        t += 15_000.min(TTL * 1000 + 3000 - t);
        let a = s.until(t);
        if a.iter().any(|a| matches!(a, Action::Ping)) {
            s.step(Input::Pong);
        }
        echoes.extend(
            writes(&a)
                .into_iter()
                .filter(|w| matches!(w, Out::Echo { .. })),
        );
    }
    assert_eq!(echoes.len(), 1, "one echo just after the expiry");
    let a = s
        .frame(json!({"type":"response","class":"SessionExpiredEvent","code":200,"body":{}}))
        .to_vec();
    assert_eq!(ended(&a).map(|e| e.0), Some(EndReason::SessionExpired));
}

#[test]
fn an_echo_reply_refreshes_the_expiry_and_is_not_a_message() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    let before = s.m.expires().unwrap();
    let exp = (s.wall() / 1000) as u64 + 2 * TTL;
    let a = s
        .frame(
            json!({"type":"response","class":"StructuredMessage","code":200,"tracingId":"echo-1",
            "body":{"text":"ping","type":"Text","direction":"Inbound","id":"e",
            "metadata":{"durationSeconds":"7200","expirationDate":exp.to_string()}}}),
        )
        .to_vec();
    assert!(a.is_empty());
    assert!(s.m.expires().unwrap() > before + Duration::from_secs(TTL - 5));
}

#[test]
fn a_leave_clears_the_session_or_closes_it_where_clear_is_off() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    assert_eq!(writes(s.step(Input::Leave)), [Out::Clear]);
    let a = s
        .frame(json!({"type":"message","class":"SessionClearedEvent","code":200,"body":{}}))
        .to_vec();
    assert_eq!(ended(&a).map(|e| e.0), Some(EndReason::GuestLeft));

    // Clear refused (the deployment does not allow it): closeSession instead.
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    s.step(Input::Leave);
    let a = s
        .frame(json!({"type":"response","class":"string","code":403,"body":"Presence events Conversation Clear are not supported"}))
        .to_vec();
    assert_eq!(writes(&a), [Out::CloseSession]);
    let a = s
        .frame(json!({"type":"response","class":"SessionResponse","code":200,"body":{"connected":false,"newSession":false}}))
        .to_vec();
    assert_eq!(ended(&a).map(|e| e.0), Some(EndReason::GuestLeft));

    // Known from config.json: closeSession straight away.
    let d = Deployment {
        clear_allowed: Some(false),
        ..Default::default()
    };
    let mut s = Sim::new(Begin::Attach, d);
    s.live();
    assert_eq!(writes(s.step(Input::Leave)), [Out::CloseSession]);

    // A leave while reconnecting is done once configured.
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    s.step(Input::Lost("drop".into()));
    assert!(writes(s.step(Input::Leave)).is_empty());
    s.until(2000);
    s.step(Input::Opened);
    let v = s.session(false, false);
    assert!(writes(s.frame(v)).contains(&Out::Clear));
    // No confirmation at all: ended anyway once the leave timed out.
    let a = s.until(2000 + LEAVE_TIMEOUT.as_millis() as u64 + 1);
    assert_eq!(ended(&a).map(|e| e.0), Some(EndReason::GuestLeft));
}

#[test]
fn start_new_closes_the_session_and_ends_it() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    assert_eq!(
        writes(s.step(Input::StartNew("n1".into()))),
        [Out::CloseSession]
    );
    let a = s
        .frame(json!({"type":"response","class":"SessionResponse","code":200,"body":{"connected":false,"newSession":false}}))
        .to_vec();
    assert_eq!(replies(&a), [("n1".to_string(), Ok(Reply::Closed))]);
    assert_eq!(ended(&a).map(|e| e.0), Some(EndReason::StartedNew));
}

#[test]
fn typing_is_sent_at_most_once_per_interval_and_always_answered() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    let mut sent = 0;
    for i in 0..10u64 {
        s.until(i * 1000);
        let a = s.step(Input::Typing(format!("y{i}"))).to_vec();
        sent += writes(&a).len();
        assert_eq!(replies(&a).len(), 1);
        s.step(Input::Pong);
    }
    assert_eq!(sent, 2, "at 0 s and 5 s");
}

/// Issue 25, item 6: an echo that never comes while the socket stays up is reported as that,
/// not as a lost connection.
#[test]
fn a_send_never_echoed_on_a_live_socket_is_not_called_a_lost_connection() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    s.step(Input::Send {
        tid: "t1".into(),
        text: "x".into(),
    });
    let timeout = settings().send_timeout;
    let ms = (timeout + Duration::from_secs(1)).as_millis() as u64;
    let mut all = Vec::new();
    // The socket stays up: every ping is answered.
    while s.t < Duration::from_millis(ms) {
        let step = (s.t + Duration::from_millis(500)).as_millis() as u64;
        all.extend(s.until(step));
        s.frame(json!({"type":"response","class":"string","code":200,"body":"pong"}));
    }
    let r = replies(&all);
    assert_eq!(r, [("t1".to_string(), Err(Refusal::NotEchoed(timeout)))]);
    assert_eq!(emitted(&all, "disconnected"), 0);
    let text = Refusal::NotEchoed(timeout).to_string();
    assert!(
        text.contains("connection stayed up") && !text.contains("lost"),
        "{text}"
    );
}

#[test]
fn a_lost_socket_answers_unconfirmed_sends_and_keeps_queued_ones() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    for i in 0..3 {
        s.step(Input::Send {
            tid: format!("t{i}"),
            text: "x".into(),
        });
    }
    let a = s.step(Input::Lost("drop".into())).to_vec();
    let r = replies(&a);
    assert_eq!(r.len(), 2, "the two written");
    assert!(r.iter().all(|(_, r)| *r == Err(Refusal::Unconfirmed)));
    s.until(2000);
    s.step(Input::Opened);
    let v = s.session(false, false);
    let a = s.frame(v).to_vec();
    assert!(
        writes(&a).contains(&Out::Text {
            tid: "t2".into(),
            text: "x".into()
        }),
        "the queued one goes after the reconnect"
    );
}

#[test]
fn a_fatal_connect_failure_ends_and_a_first_connect_has_a_window() {
    let mut s = Sim::new(Begin::Start { start_new: false }, Deployment::default());
    let a = s
        .step(Input::ConnectFailed {
            detail: "handshake answered 403".into(),
            fatal: true,
        })
        .to_vec();
    assert_eq!(ended(&a).map(|e| e.0), Some(EndReason::ServerEnded));

    let mut s = Sim::new(Begin::Start { start_new: false }, Deployment::default());
    let mut t = 0;
    while s.m.ended().is_none() && t < 200_000 {
        t += 1000;
        let a = s.until(t);
        if a.iter().any(|a| matches!(a, Action::Connect)) {
            s.step(Input::ConnectFailed {
                detail: "refused".into(),
                fatal: false,
            });
        }
    }
    assert_eq!(s.m.ended(), Some(EndReason::ReconnectGraceExpired));
    assert!(t >= 120_000);
}

/// One input of a generated history.
#[derive(Debug, Clone)]
enum Ev {
    Wait(u64),
    Open,
    Lose,
    Pong,
    Session { new: bool, read_only: bool },
    Agent(u8),
    Disconnect(bool),
    Expired,
    NotFound,
    Cleared,
    Closed(bool),
    TooMany,
    ReadOnly409,
    Send,
    Leave,
    StartNew,
    Typing,
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        6 => (0u64..40_000).prop_map(Ev::Wait),
        3 => Just(Ev::Open),
        2 => Just(Ev::Lose),
        3 => Just(Ev::Pong),
        3 => (any::<bool>(), prop::bool::weighted(0.1)).prop_map(|(new, read_only)| Ev::Session { new, read_only }),
        4 => any::<u8>().prop_map(Ev::Agent),
        1 => any::<bool>().prop_map(Ev::Disconnect),
        1 => Just(Ev::Expired),
        1 => Just(Ev::NotFound),
        1 => Just(Ev::Cleared),
        1 => any::<bool>().prop_map(Ev::Closed),
        2 => Just(Ev::TooMany),
        1 => Just(Ev::ReadOnly409),
        4 => Just(Ev::Send),
        1 => Just(Ev::Leave),
        1 => Just(Ev::StartNew),
        2 => Just(Ev::Typing),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Whatever frames, losses, commands and waits interleave: at most one `ended`, nothing
    /// but refusals after it, every command answered exactly once by the time the session has
    /// ended, each message id emitted at most once, and the first terminal frame the session
    /// reads while live names the reason.
    #[test]
    fn one_end_whatever_interleaves(evs in prop::collection::vec(ev(), 1..80)) {
        let mut s = Sim::new(Begin::Attach, Deployment::default());
        let mut all: Vec<Action> = std::mem::take(&mut s.out);
        let mut asked: Vec<String> = Vec::new();
        let mut recent: VecDeque<String> = VecDeque::new();
        let mut n = 0;
        for e in evs {
            n += 1;
            let open = matches!(s.m.phase(), Phase::Live | Phase::Configuring);
            let done = s.m.ended().is_some();
            // A terminal frame read on an open socket ends the session, for its own reason.
            let mut terminal: Option<EndReason> = None;
            let a: Vec<Action> = match e {
                Ev::Wait(ms) => { let t = s.t.as_millis() as u64 + ms; s.until(t) }
                Ev::Open => s.step(Input::Opened).to_vec(),
                Ev::Lose => s.step(Input::Lost("drop".into())).to_vec(),
                Ev::Pong => s.step(Input::Pong).to_vec(),
                Ev::Session { new, read_only } => { let v = s.session(new, read_only); s.frame(v).to_vec() }
                Ev::Agent(k) => s.frame(agent("x", &format!("a{k}"), &format!("2026-11-29T12:00:{:02}.000Z", k % 60))).to_vec(),
                Ev::Disconnect(ro) => {
                    terminal = Some(EndReason::ConversationDisconnected);
                    s.frame(disconnect(ro)).to_vec()
                }
                Ev::Expired => {
                    terminal = Some(EndReason::SessionExpired);
                    s.frame(json!({"type":"response","class":"SessionExpiredEvent","code":200,"body":{}})).to_vec()
                }
                Ev::NotFound => {
                    terminal = Some(EndReason::SessionNotFound);
                    s.frame(json!({"type":"response","class":"string","code":4007,"body":"nf"})).to_vec()
                }
                Ev::Cleared => {
                    // guest_left when guestd asked for it, session_cleared otherwise.
                    let r = s.frame(json!({"type":"message","class":"SessionClearedEvent","code":200,"body":{}})).to_vec();
                    if !done {
                        prop_assert!(matches!(ended(&r).map(|e| e.0), Some(EndReason::GuestLeft | EndReason::SessionCleared)));
                    }
                    r
                }
                Ev::Closed(signed_in) => {
                    terminal = Some(EndReason::ConnectionClosed);
                    let body = if signed_in { json!({"reason":"signedIn"}) } else { json!({}) };
                    s.frame(json!({"type":"message","class":"ConnectionClosedEvent","code":200,"body":body})).to_vec()
                }
                Ev::TooMany => {
                    let tid = asked.last().cloned().unwrap_or_default();
                    s.frame(json!({"type":"response","class":"TooManyRequestsErrorMessage","code":429,"tracingId":tid,"body":{"retryAfter":2}})).to_vec()
                }
                Ev::ReadOnly409 => {
                    let tid = asked.last().cloned().unwrap_or_default();
                    s.frame(json!({"type":"response","class":"string","code":409,"tracingId":tid,"body":"read-only"})).to_vec()
                }
                Ev::Send => { let t = format!("t{n}"); asked.push(t.clone()); s.step(Input::Send { tid: t, text: "x".into() }).to_vec() }
                Ev::Typing => { let t = format!("y{n}"); asked.push(t.clone()); s.step(Input::Typing(t)).to_vec() }
                Ev::StartNew => { let t = format!("n{n}"); asked.push(t.clone()); s.step(Input::StartNew(t)).to_vec() }
                Ev::Leave => s.step(Input::Leave).to_vec(),
            };
            if done {
                prop_assert!(a.iter().all(|a| matches!(a, Action::Reply(_, Err(Refusal::Ended)))), "after the end: {a:?}");
            } else if let Some(r) = terminal {
                // Disconnect counts only once configured (the machine reads it like any message).
                if open && !(r == EndReason::ConversationDisconnected && s.m.phase() == Phase::Configuring) {
                    prop_assert_eq!(ended(&a).map(|e| e.0), Some(r));
                }
            }
            for x in &a {
                if let Action::Emit(EventKind::Message { message_id, .. }) = x {
                    prop_assert!(!recent.contains(message_id), "message {} emitted twice", message_id);
                    if recent.len() >= 64 { recent.pop_front(); }
                    recent.push_back(message_id.clone());
                }
            }
            all.extend(a);
        }
        let ends = all.iter().filter(|a| matches!(a, Action::Emit(EventKind::Ended { .. }))).count();
        prop_assert!(ends <= 1);
        if s.m.ended().is_some() {
            // Every command ever asked is answered exactly once.
            for t in &asked {
                let n = all.iter().filter(|a| matches!(a, Action::Reply(x, _) if x == t)).count();
                prop_assert_eq!(n, 1, "command {} answered {} times", t, n);
            }
        }
        for t in &asked {
            let n = all.iter().filter(|a| matches!(a, Action::Reply(x, _) if x == t)).count();
            prop_assert!(n <= 1, "command {} answered {} times", t, n);
        }
    }
}

/// An idle Web Messaging session is one of tens of thousands: keep the machine small (its
/// queues allocate nothing while empty). Fails if a change inlines something large.
#[test]
fn the_machine_stays_small() {
    let size = std::mem::size_of::<Machine>();
    eprintln!("web messaging machine {size} B");
    assert!(size <= 512, "the machine grew to {size} bytes");
}

/// A session resumed from the journal long after it began (here 2 hours) connects: the window
/// to reach the platform counts from the resume. It counted from the session's start, so the
/// first tick gave it up as `reconnect_grace_expired` before its socket could open (found by
/// the model in `machine/model.rs`).
#[test]
fn a_session_resumed_long_after_it_began_is_not_given_up_at_once() {
    let base = Instant::now();
    let two_hours = Duration::from_secs(7200);
    let now = base + two_hours;
    let mut m = Machine::new(
        Arc::new(settings()),
        Deployment::default(),
        Begin::Resume,
        now,
    )
    .resuming(base, Some("a1".into()));
    assert!(matches!(m.start()[..], [Action::Connect]));
    let due = m.next_deadline();
    assert!(due.is_none_or(|d| d > now), "nothing due at once: {due:?}");
    let a = m.step(Input::Tick, now + Duration::from_millis(40), WALL0);
    assert!(ended(&a).is_none(), "{a:?}");
    m.step(Input::Opened, now + Duration::from_millis(50), WALL0);
    assert_eq!(m.phase(), Phase::Configuring);
    // Unreachable for the whole window after the resume: then given up.
    let mut m = Machine::new(
        Arc::new(settings()),
        Deployment::default(),
        Begin::Resume,
        now,
    )
    .resuming(base, None);
    m.start();
    let end = now + settings().first_connect_window;
    let a = m.step(Input::Tick, end, WALL0);
    assert_eq!(
        ended(&a).map(|e| e.0),
        Some(EndReason::ReconnectGraceExpired)
    );
}

/// Issue 24: `ends` for Web Messaging. Before the socket opens: the first connection's window;
/// live: the session's expiry, moved on by an echo that refreshes it; the socket down: when
/// guestd gives the session up (the last known expiry plus a slack); ended: nothing.
#[test]
fn ends_names_the_expiry_or_the_give_up_time() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    assert_eq!(
        s.m.ends(),
        Some((
            s.base + settings().first_connect_window,
            EndReason::ReconnectGraceExpired
        ))
    );
    s.live();
    let exp = s.m.expires().unwrap();
    assert_eq!(s.m.ends(), Some((exp, EndReason::SessionExpired)));
    let later = (s.wall() / 1000) as u64 + 2 * TTL;
    s.frame(
        json!({"type":"response","class":"StructuredMessage","code":200,"tracingId":"echo-1",
        "body":{"text":"ping","type":"Text","direction":"Inbound","id":"e",
        "metadata":{"durationSeconds":"7200","expirationDate":later.to_string()}}}),
    );
    let moved = s.m.expires().unwrap();
    assert!(moved > exp);
    assert_eq!(s.m.ends(), Some((moved, EndReason::SessionExpired)));
    s.step(Input::Lost("network".into()));
    assert_eq!(
        s.m.ends(),
        Some((moved + EXPIRY_SLACK, EndReason::ReconnectGraceExpired))
    );
    let mut over = Sim::new(Begin::Attach, Deployment::default());
    over.live();
    over.frame(json!({"type":"message","class":"SessionExpiredEvent","code":200,"body":{}}));
    assert_eq!(over.m.ended(), Some(EndReason::SessionExpired));
    assert_eq!(over.m.ends(), None);
}

/// Issue 25, item 8: backfilled messages that share one `channel.time` millisecond come out in
/// the order they were sent (the page lists them newest first), not reversed.
#[test]
fn backfilled_messages_of_the_same_millisecond_keep_their_order() {
    let mut s = Sim::new(Begin::Attach, Deployment::default());
    s.live();
    s.frame(agent("one", "a1", "2026-11-29T12:00:01.000Z"));
    s.step(Input::Lost("drop".into()));
    s.until(s.t.as_millis() as u64 + 5000);
    s.step(Input::Opened);
    let v = s.session(false, false);
    s.frame(v);
    s.frame(json!({"type":"response","class":"JwtResponse","code":200,"body":{"jwt":"j","exp":1}}));
    let same = "2026-11-29T12:00:30.000Z";
    let page = page(&[
        agent("three", "a3", same),
        agent("two", "a2", same),
        agent("one", "a1", "2026-11-29T12:00:01.000Z"),
    ]);
    let a = s
        .step(Input::History {
            messages: Ok(page),
            calls: 1,
        })
        .to_vec();
    assert_eq!(backfilled_ids(&a), ["a2", "a3"]);
}

/// A history page: the bodies of these frames, as the history call returns them.
fn page(frames: &[serde_json::Value]) -> Vec<StructuredMessage> {
    frames
        .iter()
        .map(|v| serde_json::from_value(v["body"].clone()).unwrap())
        .collect()
}

/// The ids of the backfilled messages `a` emits, in order.
fn backfilled_ids(a: &[Action]) -> Vec<String> {
    a.iter()
        .filter_map(|a| match a {
            Action::Emit(EventKind::Message {
                message_id,
                backfilled: true,
                ..
            }) => Some(message_id.clone()),
            _ => None,
        })
        .collect()
}
