//! The Genesys Cloud guest chat backend (Web Chat v2), one folder:
//!
//! - [`protocol`]: the wire (REST bodies, stream frames), named as Genesys names them;
//! - [`client`]: the guest API's REST client and frame decoder, behind the [`api::ChatApi`]
//!   seam (another vendor's guest chat with the same shape would be a second client);
//! - [`machine`]: the pure rules of one chat (heartbeats, the grace window, the 15-minute rule,
//!   end inference);
//! - [`actor`]: the task that owns the socket and drives the machine;
//! - [`backend`]: `start`, `attach` and a restart, as the `session::Backend` the supervisor
//!   holds.

pub mod actor;
pub mod api;
pub mod backend;
pub mod client;
pub mod machine;
pub mod protocol;

pub use backend::{GuestChat, GuestChatBackend, NAME};
pub use machine::{Action, Input, Machine, Timing};
