//! The Genesys Cloud guest chat backend: wire types, the REST client and the stream decoder.
//!
//! Everything Genesys-specific lives under this module so a second backend (Web Messaging, say)
//! is an added module implementing [`crate::backend::ChatApi`], not a rewrite.

pub mod client;
pub mod platform;
pub mod protocol;
