//! One chat session: a pure state machine ([`machine`]) that decides, and an actor ([`actor`])
//! that owns the sockets and timers and does what the machine asks.

pub mod actor;
pub mod machine;

pub use actor::{CommandError, Done, SessionCmd, SessionCtx, SessionHandle, SessionView};
pub use machine::{Action, Input, Machine, Timing};
