//! Tessera's shared domain model, free of I/O frameworks: ids, the room model (roles,
//! views, media formats), the persistent room store, participant tokens, reconnection
//! tickets, the management-API signature scheme, and the trait through which the
//! management API reaches live conference state.
//!
//! Everything that checks time takes `now` as an argument so it can be tested without
//! sleeping (see `token` and `ticket`).

pub mod agent;
pub mod control;
pub mod crypto;
pub mod ids;
pub mod room;
pub mod store;
pub mod ticket;
pub mod token;

pub use control::{ControlError, ParticipantInfo, Permission, RoomControl};
pub use room::{Room, RoomError};
pub use store::{RoomStore, StoreError};
