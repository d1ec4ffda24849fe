//! What every session shares, whatever its backend.

pub use crate::backends::guest_chat::actor::{
    CommandError, Done, SessionCmd, SessionCtx, SessionHandle, SessionView,
};
