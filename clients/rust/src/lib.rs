//! A Rust client for Tessera, for tests and the load generator: Client-Portal signaling
//! over Socket.IO (websocket transport) in [`signaling`], WebRTC publishers and
//! subscribers in `peer`, and light receive-only peers for load generation in `light`.

pub mod arrival;
pub mod light;
pub mod loss;
pub mod media;
pub mod peer;
pub mod signaling;
pub mod simulcast;
