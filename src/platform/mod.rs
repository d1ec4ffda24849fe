//! The Genesys Cloud Platform API and the `status` command that asks it.

pub mod api;
pub mod rest;
pub mod status;
