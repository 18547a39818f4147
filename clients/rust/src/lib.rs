//! A Rust client for Tessera, for tests and the load generator: Client-Portal signaling
//! over Socket.IO (websocket transport) in [`signaling`], and WebRTC publishers and
//! subscribers in `peer`.

pub mod media;
pub mod peer;
pub mod signaling;
