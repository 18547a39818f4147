//! Tessera's shared domain model, free of I/O frameworks: ids, the room model (roles,
//! views, media formats), the persistent room store, participant tokens, reconnection
//! tickets, the management-API signature scheme, the control protocol to media nodes
//! ([`command`]: typed commands, replies and the router), the media seam ([`media::StreamSource`])
//! through which the mixer and recorder take streams, and the trait through which the
//! management API reaches live conference state.
//!
//! Everything that checks time takes `now` as an argument so it can be tested without
//! sleeping (see `token` and `ticket`).

// Input from the network and files must never panic this crate: no unwrap/expect/panic
// and no unchecked indexing outside tests (`./scripts/test` runs clippy with -D warnings).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

pub mod agent;
pub mod command;
pub mod control;
pub mod crypto;
pub mod home;
pub mod hooks;
pub mod ids;
pub mod media;
pub mod node;
pub mod room;
pub mod store;
pub mod stream;
pub mod ticket;
pub mod token;
pub mod typed_ids;

pub use control::{ControlError, ParticipantInfo, Permission, RoomControl};
pub use room::{Room, RoomError};
pub use store::{RoomStore, Rooms, StoreError};
pub use stream::StreamInfo;
pub use typed_ids::{ParticipantId, RoomId, SessionId, StreamId, TransportId, ViewLabel};
