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
    /// The node holding the room's live state could not be reached (a cluster's).
    #[error("Room unavailable, retry later: {0}")]
    Unavailable(String),
}

/// Live state of rooms, as the management API needs it.
#[async_trait::async_trait]
pub trait RoomControl: Send + Sync {
    /// Participants currently in the room (including those inside their reconnection grace period).
    async fn participants(&self, room: &str) -> Result<Vec<ParticipantInfo>, ControlError>;
    /// Removes a participant: sends `drop` and closes the session.
    async fn drop_participant(&self, room: &str, participant: &str) -> Result<(), ControlError>;
    /// Streams of the room (forward and mixed), in the OWT REST format.
    async fn streams(&self, room: &str) -> Result<Vec<serde_json::Value>, ControlError>;
    /// Stops a forward stream.
    async fn delete_stream(&self, room: &str, stream: &str) -> Result<(), ControlError>;
    /// Applies OWT StreamUpdate operations (mix/unmix, layout); returns the updated stream.
    async fn patch_stream(&self, room: &str, stream: &str, ops: &serde_json::Value) -> Result<serde_json::Value, ControlError>;
    /// Applies OWT ParticipantUpdate operations (permissions, see [`apply_permission_ops`]);
    /// returns the participant as updated.
    async fn patch_participant(&self, room: &str, participant: &str, ops: &serde_json::Value) -> Result<ParticipantInfo, ControlError>;
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
    async fn participants(&self, _room: &str) -> Result<Vec<ParticipantInfo>, ControlError> {
        Ok(Vec::new())
    }
    async fn drop_participant(&self, _room: &str, participant: &str) -> Result<(), ControlError> {
        Err(ControlError::ParticipantNotFound(participant.into()))
    }
    async fn streams(&self, _room: &str) -> Result<Vec<serde_json::Value>, ControlError> {
        Ok(Vec::new())
    }
    async fn delete_stream(&self, _room: &str, stream: &str) -> Result<(), ControlError> {
        Err(ControlError::StreamNotFound(stream.into()))
    }
    async fn patch_stream(&self, _room: &str, stream: &str, _ops: &serde_json::Value) -> Result<serde_json::Value, ControlError> {
        Err(ControlError::StreamNotFound(stream.into()))
    }
    async fn patch_participant(&self, _room: &str, participant: &str, _ops: &serde_json::Value) -> Result<ParticipantInfo, ControlError> {
        Err(ControlError::ParticipantNotFound(participant.into()))
    }
    async fn room_updated(&self, _room: &crate::room::Room) {}
    async fn room_deleted(&self, _room: &str) {}
}

/// Applies OWT ParticipantUpdate operations (`[{op: "replace", path, value}]`) to a
/// permission: paths `/permission/publish` and `/permission/subscribe` with `{audio, video}`
/// (both booleans), or `/permission/{publish,subscribe}/{audio,video}` with a boolean. All
/// or nothing: the first bad operation is named and nothing changes.
pub fn apply_permission_ops(current: Permission, ops: &serde_json::Value) -> Result<Permission, ControlError> {
    let ops = ops.as_array().ok_or_else(|| ControlError::BadRequest("body must be an array of operations".into()))?;
    if ops.is_empty() {
        return Err(ControlError::BadRequest("body has no operation".into()));
    }
    let mut next = current;
    for (i, op) in ops.iter().enumerate() {
        let bad = |m: String| ControlError::BadRequest(format!("[{i}]: {m}"));
        let object = op.as_object().ok_or_else(|| bad("an operation is an object {op, path, value}".into()))?;
        if let Some(extra) = object.keys().find(|k| !["op", "path", "value"].contains(&k.as_str())) {
            return Err(bad(format!("unknown field `{}`", extra.escape_debug())));
        }
        match object.get("op").and_then(serde_json::Value::as_str) {
            Some("replace") => {}
            _ => return Err(bad("`op` must be \"replace\"".into())),
        }
        let path = object.get("path").and_then(serde_json::Value::as_str).ok_or_else(|| bad("`path` must be a string".into()))?;
        let value = object.get("value").unwrap_or(&serde_json::Value::Null);
        let mut parts = path.strip_prefix("/permission/").unwrap_or_default().split('/');
        let target = match parts.next() {
            Some("publish") => &mut next.publish,
            Some("subscribe") => &mut next.subscribe,
            _ => {
                return Err(bad(format!(
                    "unsupported path `{}` (use /permission/publish[/audio|/video] or /permission/subscribe[...])",
                    path.escape_debug()
                )));
            }
        };
        let flag = |v: &serde_json::Value, what: &str| v.as_bool().ok_or_else(|| bad(format!("`{what}` must be a boolean")));
        match (parts.next(), parts.next()) {
            (None, _) => {
                let av = value.as_object().ok_or_else(|| bad("`value` must be {audio, video}".into()))?;
                if let Some(extra) = av.keys().find(|k| !["audio", "video"].contains(&k.as_str())) {
                    return Err(bad(format!("unknown field `value.{}`", extra.escape_debug())));
                }
                let audio = flag(av.get("audio").unwrap_or(&serde_json::Value::Null), "value.audio")?;
                let video = flag(av.get("video").unwrap_or(&serde_json::Value::Null), "value.video")?;
                *target = crate::room::AudioVideo { audio, video };
            }
            (Some("audio"), None) => target.audio = flag(value, "value")?,
            (Some("video"), None) => target.video = flag(value, "value")?,
            _ => return Err(bad(format!("unsupported path `{}`", path.escape_debug()))),
        }
    }
    Ok(next)
}

#[cfg(test)]
mod permission_tests {
    use super::*;
    use crate::room::AudioVideo;
    use serde_json::json;

    fn all() -> Permission {
        Permission { publish: AudioVideo { audio: true, video: true }, subscribe: AudioVideo { audio: true, video: true } }
    }

    #[test]
    fn owt_paths_and_values() {
        let p = apply_permission_ops(all(), &json!([{"op": "replace", "path": "/permission/subscribe/video", "value": false}])).unwrap();
        assert_eq!(p.subscribe, AudioVideo { audio: true, video: false });
        assert_eq!(p.publish, all().publish);
        let ops = json!([
            {"op": "replace", "path": "/permission/publish", "value": {"audio": false, "video": false}},
            {"op": "replace", "path": "/permission/publish/audio", "value": true}
        ]);
        let p = apply_permission_ops(all(), &ops).unwrap();
        assert_eq!(p.publish, AudioVideo { audio: true, video: false });
    }

    #[test]
    fn a_bad_operation_is_named_and_nothing_changes() {
        let cases = [
            (json!({}), "array"),
            (json!([]), "no operation"),
            (json!([{"op": "add", "path": "/permission/publish/audio", "value": true}]), "[0]: `op`"),
            (
                json!([{"op": "replace", "path": "/permission/publish/audio", "value": true}, {"op": "replace", "path": "/role", "value": "x"}]),
                "[1]: unsupported path",
            ),
            (json!([{"op": "replace", "path": "/permission/publish/audio", "value": "yes"}]), "boolean"),
            (json!([{"op": "replace", "path": "/permission/subscribe", "value": {"audio": true}}]), "value.video"),
            (json!([{"op": "replace", "path": "/permission/subscribe", "value": {"audio": true, "video": true, "data": true}}]), "value.data"),
            (json!([{"op": "replace", "path": "/permission/publish/audio/x", "value": true}]), "unsupported path"),
            (json!([{"op": "replace", "path": "/permission/publish/audio", "value": true, "from": 1}]), "unknown field `from`"),
        ];
        for (ops, want) in cases {
            match apply_permission_ops(all(), &ops) {
                Err(ControlError::BadRequest(m)) => assert!(m.contains(want), "{ops}: {m}"),
                other => panic!("{ops}: {other:?}"),
            }
        }
    }
}
