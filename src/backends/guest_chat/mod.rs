//! The Genesys Cloud guest chat backend (Web Chat v2).

pub mod actor;
pub mod api;
pub mod client;
pub mod machine;
pub mod protocol;

pub use machine::{Action, Input, Machine, Timing};
