//! The backends: one folder per kind of chat guestd can supervise.

pub mod guest_chat;
pub mod web_messaging;
