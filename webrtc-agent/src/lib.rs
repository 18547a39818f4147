//! Tessera's SFU: WebRTC sessions that forward published streams to subscribers without
//! decoding, on webrtc-rs's sans-I/O core `rtc` 0.21.
//!
//! Shape ([`workers`]): one OS thread per CPU, each owning one UDP socket (and an ICE-TCP
//! listener on the same port number) and every peer connection placed on it; ICE-lite.
//! - A **transport** is one `RTCPeerConnection` with one client. A client may put many
//!   publications and subscriptions on one transport (renegotiating with a fresh offer
//!   each time, as the OWT JS SDK does) or use one transport per session.
//! - A **publication** is the set of tracks one `publish` announced; each received packet
//!   goes straight to the subscriber legs on its worker and once to each other worker
//!   with subscribers of it.
//! - A **subscription** adds a sendonly transceiver per requested track to the
//!   subscriber's transport; [`forward`] rewrites each packet for it.
//! - The mixer and recorder reach the tracks only through
//!   [`tessera_core::media::StreamSource`], which the agent implements: taps and streams
//!   produced inside the server (mixed views) convert packets to and from marshalled
//!   bytes there, off the forwarding path.

// Input from the network and files must never panic this crate: no unwrap/expect/panic
// and no unchecked indexing outside tests (`./scripts/test` runs clippy with -D warnings).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

pub mod bwe;
mod codec;
pub mod feedback;
pub mod forward;
pub mod nack_age;
pub mod net;
pub mod probe;
pub mod responder;
pub mod rtcp_counter;
pub mod rtx_in;
mod sdp;
pub mod sender_reports;
mod seq_ring;
pub mod simulcast;
pub mod srtp_out;
pub mod stack;
pub mod wire;
pub mod workers;

use std::net::IpAddr;
use std::time::Duration;

pub use workers::WorkerAgent;

/// Settings of the SFU, from the `[webrtc]` config section.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Addresses to gather host candidates on.
    pub bind_ips: Vec<IpAddr>,
    /// Address announced instead of the bound one (1:1 NAT), if any.
    pub public_ip: Option<IpAddr>,
    /// Lowest UDP port.
    pub port_min: u16,
    /// Highest UDP port.
    pub port_max: u16,
    /// Shortest interval between two keyframe requests to one publisher track (320 ms: a
    /// browser's encoder ignores a request that reaches it less than 300 ms after the last
    /// it took, and the network may bring two requests closer than they were sent).
    pub keyframe_interval: Duration,
    /// ICE: no traffic for this long marks a transport disconnected.
    pub ice_disconnected_timeout: Duration,
    /// ICE: disconnected for this long marks it failed (and ends its sessions).
    pub ice_failed_timeout: Duration,
    /// Passive ICE-TCP on each worker's port.
    pub ice_tcp: bool,
    /// Send-side bandwidth estimation per connection (TWCC + GCC).
    pub bandwidth_estimation: bool,
}

impl AgentSettings {
    /// Settings from a loaded configuration.
    pub fn from_config(c: &tessera_config::Config) -> Self {
        let w = &c.webrtc;
        AgentSettings {
            bind_ips: net::bind_ips(w.bind_ip.parse().ok()),
            public_ip: w.public_ip.parse().ok(),
            port_min: w.udp_port_min,
            port_max: w.udp_port_max,
            keyframe_interval: Duration::from_millis(320),
            ice_disconnected_timeout: Duration::from_secs(5),
            ice_failed_timeout: Duration::from_secs(10),
            ice_tcp: w.ice_tcp,
            bandwidth_estimation: w.bandwidth_estimation,
        }
    }
}
