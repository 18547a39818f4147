//! A Socket.IO v5 / Engine.IO v4 server for actix-web, written by hand.
//!
//! - [`engine`]: Engine.IO packet and long-polling payload codec.
//! - [`packet`]: Socket.IO packet codec.
//! - [`SocketIo`]: the transports (long-polling, websocket, upgrade) and sessions.
//!
//! Only the `/` namespace exists; binary packets are rejected
//! ([`Incoming::Invalid`]). The server pings (Engine.IO v4 direction).

pub mod engine;
pub mod packet;
mod server;
mod session;
mod socket;

pub use server::{SocketIo, SocketIoConfig, cors};
pub use socket::{Incoming, Socket, SocketClosed, SocketHandle};
