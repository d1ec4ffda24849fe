//! Sockets and their rules: the websocket client, its TLS stream and framing, the one TLS
//! configuration, and the URL policy every backend's REST and sockets follow.

pub mod leantls;
pub mod leanws;
pub mod policy;
pub mod stream;
pub mod tls;
