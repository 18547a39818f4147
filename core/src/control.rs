//! The seam between the management API and live conferences: the management API owns
//! room configuration, the portal owns who is connected and what is published. The
//! portal implements [`RoomControl`]; the binary hands it to the management API.

use serde::{Deserialize, Serialize};

use crate::room::AudioVideo;

/// What a participant may publish and subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    /// Publishing rights.
    pub publish: AudioVideo,
    /// Subscribing rights.
    pub subscribe: AudioVideo,
}

/// A participant as the REST API lists it (OWT's `{id, role, user, permission}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantInfo {
    /// Participant id (the Socket.IO socket id at login).
    pub id: String,
    /// Role name.
    pub role: String,
    /// User name from the token.
    pub user: String,
    /// Effective permissions.
    pub permission: Permission,
}

/// Failures of live-room control operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// No such participant in the room.
    #[error("Participant not found: {0}")]
    ParticipantNotFound(String),
    /// No such stream in the room.
    #[error("Stream not found: {0}")]
    StreamNotFound(String),
    /// The request is not valid for this object.
    #[error("{0}")]
    BadRequest(String),
    /// The operation was valid but failed.
    #[error("Operation failed: {0}")]
    Failed(String),
}

/// Live state of rooms, as the management API needs it.
#[async_trait::async_trait]
pub trait RoomControl: Send + Sync {
    /// Participants currently in the room (including those inside their reconnection grace period).
    async fn participants(&self, room: &str) -> Vec<ParticipantInfo>;
    /// Removes a participant: sends `drop` and closes the session.
    async fn drop_participant(&self, room: &str, participant: &str) -> Result<(), ControlError>;
    /// Streams of the room (forward and mixed), in the OWT REST format.
    async fn streams(&self, room: &str) -> Vec<serde_json::Value>;
    /// Stops a forward stream.
    async fn delete_stream(&self, room: &str, stream: &str) -> Result<(), ControlError>;
    /// Applies OWT StreamUpdate operations (mix/unmix, layout); returns the updated stream.
    async fn patch_stream(&self, room: &str, stream: &str, ops: &serde_json::Value) -> Result<serde_json::Value, ControlError>;
    /// The room's configuration changed; running conferences pick up what they can.
    async fn room_updated(&self, room: &crate::room::Room);
    /// The room was deleted; everyone in it is dropped.
    async fn room_deleted(&self, room: &str);
    /// Server-wide counts (rooms, participants, media objects) for `GET /v1/stats`.
    async fn stats(&self) -> serde_json::Value {
        serde_json::json!({})
    }
}

/// A `RoomControl` for a management API running without a portal: no one is ever connected.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoLiveRooms;

#[async_trait::async_trait]
impl RoomControl for NoLiveRooms {
    async fn participants(&self, _room: &str) -> Vec<ParticipantInfo> {
        Vec::new()
    }
    async fn drop_participant(&self, _room: &str, participant: &str) -> Result<(), ControlError> {
        Err(ControlError::ParticipantNotFound(participant.into()))
    }
    async fn streams(&self, _room: &str) -> Vec<serde_json::Value> {
        Vec::new()
    }
    async fn delete_stream(&self, _room: &str, stream: &str) -> Result<(), ControlError> {
        Err(ControlError::StreamNotFound(stream.into()))
    }
    async fn patch_stream(&self, _room: &str, stream: &str, _ops: &serde_json::Value) -> Result<serde_json::Value, ControlError> {
        Err(ControlError::StreamNotFound(stream.into()))
    }
    async fn room_updated(&self, _room: &crate::room::Room) {}
    async fn room_deleted(&self, _room: &str) {}
}
