//! The Genesys Web Messaging backend (the Messenger guest API), issue 12. Built in steps:
//! [`protocol`] (the wire: client actions, server frames, decoded into typed values with every
//! [CONFLICT] of `../shared/protocol/genesys-web-messaging.md` accepted in both forms) is the
//! first; the emulator side and the session rules follow.

pub mod protocol;
