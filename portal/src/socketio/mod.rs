//! A Socket.IO v5 / Engine.IO v4 server for actix-web, written by hand, which also
//! serves Socket.IO v2 / Engine.IO v3 clients (socket.io-client 2.x, OWT JS SDK 4.x).
//!
//! - [`engine`]: Engine.IO packet and long-polling payload codec (both versions).
//! - [`packet`]: Socket.IO packet codec.
//! - [`SocketIo`]: the transports (long-polling, websocket, upgrade) and sessions; a
//!   websocket is read and written by its session's task on the connection itself
//!   (`ws`).
//!
//! Each session speaks the version of its handshake (`EIO=3` or `EIO=4`). With v4 the
//! server pings and the client CONNECTs to `/`; with v3 the client pings and the server
//! connects `/` by itself. Only the `/` namespace exists; binary packets are rejected
//! ([`Incoming::Invalid`]).

pub mod chunks;
pub mod engine;
pub mod packet;
mod server;
mod session;
mod socket;
mod ws;

pub use server::{SocketIo, SocketIoConfig, cors};
#[cfg(test)]
pub(crate) use socket::OutRx;
pub use socket::{Event, Incoming, Socket, SocketClosed, SocketHandle};
