//! What each server frame means to the Web Messaging machine: echoes (expiry only), Presence
//! Disconnect, typing, the echo of a guest send, live messages (held behind a backfill), the
//! `getJwt` answer, the session and connection end events, 429 and error frames. Its own file
//! because it is the one place that reads the platform's frames; the rules it applies live with
//! their concern (sends, backfill, the end).

use super::*;

impl Machine {
    pub(super) fn frame(&mut self, f: Frame, now: Instant, wall_ms: i64, out: &mut Vec<Action>) {
        match f {
            Frame::Session(r) => self.configured(r, now, wall_ms, out),
            Frame::Message {
                message,
                tracing_id,
                ..
            } => {
                if tracing_id.as_deref().is_some_and(|t| {
                    t.starts_with(ECHO_TID) || t == super::super::protocol::HEALTH_CHECK_ID
                }) {
                    self.refresh_expiry(
                        message.expiration_date(),
                        message.duration_seconds(),
                        now,
                        wall_ms,
                    );
                    return;
                }
                if let Some(read_only) = message.disconnect() {
                    self.read_only |= read_only;
                    let who = message
                        .originating_entity
                        .as_deref()
                        .unwrap_or("the platform");
                    let mode = if read_only { "ReadOnly" } else { "Send" };
                    return self.end(
                        EndReason::ConversationDisconnected,
                        format!("Presence Disconnect from {who} ({mode} mode)"),
                        extra(EndScope::Conversation, read_only),
                        now,
                        out,
                    );
                }
                if message.direction == "Outbound" && message.typing() {
                    // The platform's typing events name no originatingEntity (the Messenger
                    // Transport SDK reads every one as the agent's): only a bot's says Bot.
                    let (id, role) = if message.originating_entity.as_deref() == Some("Bot") {
                        ("bot", "workflow")
                    } else {
                        ("agent", "agent")
                    };
                    out.push(Action::Emit(EventKind::Typing {
                        sender_id: id.into(),
                        sender_role: role.into(),
                    }));
                    return;
                }
                if let Some(i) = self.inflight_index(tracing_id.as_deref()) {
                    let (tid, _, _) = self.inflight.remove(i);
                    out.push(Action::Reply(
                        tid,
                        Ok(Reply::Sent {
                            message_id: message.key().to_string(),
                            timestamp: message
                                .channel
                                .as_ref()
                                .and_then(|c| c.time.clone())
                                .unwrap_or_default(),
                        }),
                    ));
                }
                if self.backfill == Backfill::Idle {
                    self.message(*message, false, now, out);
                } else {
                    self.held.push_back((*message, now));
                }
            }
            Frame::Jwt { jwt, .. } => {
                if self.backfill == Backfill::WantJwt {
                    self.backfill = Backfill::Fetching;
                    out.push(Action::FetchHistory {
                        jwt,
                        after: self.last_key.clone(),
                    });
                }
            }
            Frame::SessionExpired => self.end(
                EndReason::SessionExpired,
                "SessionExpiredEvent".into(),
                extra(EndScope::Session, self.read_only),
                now,
                out,
            ),
            Frame::SessionCleared => {
                let (reason, detail) = if matches!(self.leave, Leave::Sent(_)) {
                    (
                        EndReason::GuestLeft,
                        "guestd cleared the session (Presence Clear)",
                    )
                } else {
                    (
                        EndReason::SessionCleared,
                        "SessionClearedEvent: cleared by another client of the token",
                    )
                };
                self.end(
                    reason,
                    detail.into(),
                    extra(EndScope::Session, false),
                    now,
                    out,
                )
            }
            Frame::ConnectionClosed { reason } => {
                let (scope, detail) = match reason.as_deref() {
                    Some("signedIn") => (EndScope::Session, "ConnectionClosedEvent: signed in elsewhere".to_string()),
                    Some(r) => (EndScope::Session, format!("ConnectionClosedEvent: {r}")),
                    None => (
                        EndScope::Connection,
                        "ConnectionClosedEvent: evicted by another connection of the token (not reopened: that would evict it in turn)".to_string(),
                    ),
                };
                self.end(
                    EndReason::ConnectionClosed,
                    detail,
                    extra(scope, self.read_only),
                    now,
                    out,
                )
            }
            Frame::Logout => self.end(
                EndReason::ConnectionClosed,
                "LogoutEvent: logged out elsewhere".into(),
                extra(EndScope::Session, false),
                now,
                out,
            ),
            Frame::TooManyRequests {
                retry_after,
                tracing_id,
            } => {
                let pause = Duration::from_secs(retry_after.max(1));
                self.paused_until = Some(now + pause);
                // Without a tracingId (the only shape the Transport SDK's fixtures show) the
                // refused send is taken to be the oldest unconfirmed one: the platform answers
                // in order. Sent again after the pause; its echo carries its tracingId, so it
                // is confirmed once.
                let refused = match tracing_id.as_deref() {
                    Some(_) => self.inflight_index(tracing_id.as_deref()),
                    None if !self.inflight.is_empty() => Some(0),
                    None => None,
                };
                if let Some(i) = refused {
                    // Refused, not sent: back to the head of the queue.
                    let (tid, text, _) = self.inflight.remove(i);
                    self.outbox.push_front((tid, text, now));
                } else if matches!(self.leave, Leave::Sent(_)) {
                    // The leave itself was refused: sent again after the pause.
                    self.leave = Leave::Pending;
                }
            }
            Frame::Error {
                code: c,
                text,
                tracing_id,
            } => self.error(c, text, tracing_id, now, out),
            Frame::Unknown(_) => {}
        }
    }

    fn inflight_index(&self, tid: Option<&str>) -> Option<usize> {
        let tid = tid?;
        self.inflight.iter().position(|(x, _, _)| x == tid)
    }

    fn error(
        &mut self,
        c: u16,
        text: String,
        tid: Option<String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        match c {
            code::SESSION_EXPIRED => {
                return self.end(
                    EndReason::SessionExpired,
                    format!("error {c}: {text}"),
                    extra(EndScope::Session, self.read_only),
                    now,
                    out,
                );
            }
            code::SESSION_NOT_FOUND => {
                return self.end(
                    EndReason::SessionNotFound,
                    format!("error {c}: {text}"),
                    extra(EndScope::Session, false),
                    now,
                    out,
                );
            }
            _ => {}
        }
        if let Some(i) = self.inflight_index(tid.as_deref()) {
            let (tid, _, _) = self.inflight.remove(i);
            let refusal = if c == code::READ_ONLY {
                self.read_only = true;
                Refusal::ReadOnly
            } else {
                Refusal::Rejected(c, text)
            };
            out.push(Action::Reply(tid, Err(refusal)));
            return;
        }
        if matches!(self.leave, Leave::Sent(_)) && c == 403 {
            // Clear is off for this deployment: close the session instead.
            self.deployment.clear_allowed = Some(false);
            self.leave = Leave::Sent(now);
            out.push(Action::Write(Out::CloseSession));
            return;
        }
        if self.phase == Phase::Configuring && (c == 401 || c == 403) {
            return self.end(
                EndReason::ServerEnded,
                format!("configureSession refused ({c}): {text}"),
                extra(EndScope::Session, false),
                now,
                out,
            );
        }
        out.push(Action::Emit(EventKind::StreamError {
            detail: format!("error frame {c}: {text}"),
        }));
    }
}
