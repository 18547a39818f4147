//! A room's home: in a cluster, the one portal node that holds a room's live state
//! (participants, streams, subscriptions) and drives its media. Any portal node (a
//! *front*) may hold a participant's socket; when the room's home is another node, the
//! front forwards the socket's requests there and the home sends the participant's
//! notifications back. Without a cluster there are no homes: every portal is the home of
//! every room it serves. Wire shapes and subjects: docs/cluster.md, "Room homes".

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::control::{ControlError, ParticipantInfo};

/// A socket on a front: the front's node id and the socket's id there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClientAddr {
    /// The front's node id.
    pub front: String,
    /// The socket's id on the front (also the participant's id once logged in).
    pub socket: String,
    /// The front's run ([`Homes::incarnation`]), so a home notices a front that restarted
    /// under the same id (its sockets died with the earlier run).
    #[serde(default)]
    pub run: String,
}

/// Where a socket's session stands, as the home last told its front.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum FrontSession {
    /// Not logged in yet.
    Fresh,
    /// Logged in as `participant` of `room`, owning the participant while `generation` matches.
    Joined {
        /// Room id.
        room: String,
        /// Participant id.
        participant: String,
        /// The participant's socket generation (bumped at each relogin).
        generation: u64,
    },
    /// Logged out, dropped or failed login.
    Ended,
}

/// A client's request, forwarded by its front to the room's home.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontRequest {
    /// The socket that sent it.
    pub client: ClientAddr,
    /// Its session as the home last answered.
    pub session: FrontSession,
    /// The Client-Portal request name (`login`, `publish`, …).
    pub name: String,
    /// Its arguments, as the client sent them.
    pub args: Vec<Value>,
}

/// The home's answer to a [`FrontRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontReply {
    /// The ack: `Ok(data)` → `('ok', data?)`, `Err(reason)` → `('error', reason)`.
    pub reply: Result<Option<Value>, String>,
    /// The session after the request.
    pub session: FrontSession,
    /// Notifications queued while the participant's socket was away, to send after the ack.
    #[serde(default)]
    pub replay: Vec<(String, Value)>,
    /// The home could not take the request because the room is not (or no longer) its
    /// own: the front finds the home again and retries.
    #[serde(default)]
    pub moved: bool,
    /// The home's incarnation (node id and run), so the front notices when another takes
    /// the room over.
    #[serde(default)]
    pub home: String,
}

/// What a home sends to a socket held by another front.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ToClient {
    /// Emit a notification.
    Emit {
        /// Its number among the notifications the home sent this socket (from 0), so the
        /// front can tell the home which ones it delivered when the socket closes, and
        /// notices one lost on the way.
        seq: u64,
        /// Event name (`participant`, `stream`, `progress`, …).
        event: String,
        /// Its arguments (usually one).
        args: Vec<Value>,
    },
    /// Close the socket (after a `drop`, a relogin on another socket, a flood).
    Disconnect,
}

/// The management API's requests about a room's live state, forwarded to its home.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum ControlRequest {
    /// The room's participants.
    Participants,
    /// Drop one participant.
    DropParticipant {
        /// Participant id.
        participant: String,
    },
    /// The room's streams.
    Streams,
    /// Stop a forward stream.
    DeleteStream {
        /// Stream id.
        stream: String,
    },
    /// OWT StreamUpdate operations.
    PatchStream {
        /// Stream id.
        stream: String,
        /// The operations.
        ops: Value,
    },
    /// OWT ParticipantUpdate operations.
    PatchParticipant {
        /// Participant id.
        participant: String,
        /// The operations.
        ops: Value,
    },
    /// The room was deleted: drop everyone.
    RoomDeleted,
    /// The room's configuration changed: its home starts and stops views to match.
    RoomUpdated {
        /// The room as it is now.
        room: Box<crate::room::Room>,
    },
}

/// The home's answer to a [`ControlRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "camelCase")]
pub enum ControlAnswer {
    /// Participants.
    Participants(Vec<ParticipantInfo>),
    /// Streams, or one stream, in the OWT REST shape.
    Json(Value),
    /// One participant.
    Participant(ParticipantInfo),
    /// Done, nothing to show.
    Done,
}

/// Why a room's home could not be found or reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum HomeError {
    /// NATS did not answer (away or too slow).
    #[error("the cluster is unavailable: {0}")]
    Unavailable(String),
    /// Another node holds the room but did not answer in time (it may have died; its
    /// claim expires after the cluster's TTL and the room can be taken over then).
    #[error("the node holding room {room} ({node}) does not answer")]
    Unreachable {
        /// Room id.
        room: String,
        /// The node that holds it.
        node: String,
    },
    /// The answer could not be read.
    #[error("cluster protocol error: {0}")]
    Protocol(String),
    /// The home refused the control request.
    #[error("{0}")]
    Control(ControlErrorWire),
}

/// A [`ControlError`] on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "message", rename_all = "camelCase")]
pub enum ControlErrorWire {
    /// See [`ControlError::ParticipantNotFound`].
    ParticipantNotFound(String),
    /// See [`ControlError::StreamNotFound`].
    StreamNotFound(String),
    /// See [`ControlError::BadRequest`].
    BadRequest(String),
    /// See [`ControlError::Failed`].
    Failed(String),
    /// See [`ControlError::Unavailable`].
    Unavailable(String),
}

impl std::fmt::Display for ControlErrorWire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        ControlError::from(self.clone()).fmt(f)
    }
}

impl From<ControlError> for ControlErrorWire {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::ParticipantNotFound(m) => ControlErrorWire::ParticipantNotFound(m),
            ControlError::StreamNotFound(m) => ControlErrorWire::StreamNotFound(m),
            ControlError::BadRequest(m) => ControlErrorWire::BadRequest(m),
            ControlError::Failed(m) => ControlErrorWire::Failed(m),
            ControlError::Unavailable(m) => ControlErrorWire::Unavailable(m),
        }
    }
}

impl From<ControlErrorWire> for ControlError {
    fn from(e: ControlErrorWire) -> Self {
        match e {
            ControlErrorWire::ParticipantNotFound(m) => ControlError::ParticipantNotFound(m),
            ControlErrorWire::StreamNotFound(m) => ControlError::StreamNotFound(m),
            ControlErrorWire::BadRequest(m) => ControlError::BadRequest(m),
            ControlErrorWire::Failed(m) => ControlError::Failed(m),
            ControlErrorWire::Unavailable(m) => ControlError::Unavailable(m),
        }
    }
}

impl From<HomeError> for ControlError {
    fn from(e: HomeError) -> Self {
        match e {
            HomeError::Control(c) => c.into(),
            HomeError::Protocol(m) => ControlError::Failed(m),
            other => ControlError::Unavailable(other.to_string()),
        }
    }
}

/// Where a room's home is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Home {
    /// This node.
    Here,
    /// Another node (its id).
    There(String),
}

/// A cluster's room homes, as the portal uses them. Lock order: the portal may call the
/// synchronous methods while holding its room lock; implementations never call the
/// portal while holding a lock of their own.
#[async_trait::async_trait]
pub trait Homes: Send + Sync {
    /// This node's id.
    fn node(&self) -> &str;
    /// This node's run (node id and instance), signed into reconnection tickets.
    fn incarnation(&self) -> String;
    /// The home of `room`, claimed for this node when no node holds it.
    async fn claim(&self, room: &str) -> Result<Home, HomeError>;
    /// The home of `room` if a node holds it, without claiming it.
    async fn holder(&self, room: &str) -> Result<Option<Home>, HomeError>;
    /// Whether this node holds `room` right now (checked under the portal's room lock
    /// before a participant is seated).
    fn is_home(&self, room: &str) -> bool;
    /// Gives `room` up (it emptied); called under the portal's room lock, so no seat can
    /// be taken between the check and the release.
    fn release(&self, room: &str);
    /// The run of the node this node took `room` over from, when it did (the holder had
    /// died), so participants of that run may be seated again by relogin.
    fn predecessor(&self, room: &str) -> Option<String>;
    /// Whether a node's run (an [`Homes::incarnation`]) is still in the cluster.
    fn is_live(&self, incarnation: &str) -> bool;
    /// Whether a node (by id) is in the cluster's node list as last read.
    fn node_listed(&self, node: &str) -> bool;
    /// Forwards a client's request to the home of `room`.
    async fn forward(&self, room: &str, request: FrontRequest) -> Result<FrontReply, HomeError>;
    /// Tells the home of `room` that a client's socket closed after `delivered` of the
    /// home's notifications reached it.
    fn closed(&self, room: &str, client: ClientAddr, delivered: u64, reason: String);
    /// Sends a notification or a close to a socket on another front.
    fn to_client(&self, client: &ClientAddr, message: ToClient);
    /// The incarnation of the node answering for `room` now (`None`: nobody holds it).
    async fn answering(&self, room: &str) -> Result<Option<String>, HomeError>;
    /// Forwards a management request to the home of `room`.
    async fn control(&self, room: &str, request: ControlRequest) -> Result<ControlAnswer, HomeError>;
}

/// What a portal does with the messages other nodes send it (requests for rooms it is the
/// home of; notifications for sockets it holds as a front).
#[async_trait::async_trait]
pub trait HomeService: Send + Sync {
    /// A request from a client of another front, for a room this node holds.
    async fn request(&self, room: &str, request: FrontRequest) -> FrontReply;
    /// A client of another front lost its socket after `delivered` notifications.
    fn closed(&self, room: &str, client: ClientAddr, delivered: u64, reason: String);
    /// A management request for a room this node holds.
    async fn control(&self, room: &str, request: ControlRequest) -> Result<ControlAnswer, ControlError>;
    /// A notification or close for one of this node's sockets.
    fn to_client(&self, socket: &str, message: ToClient);
    /// Another node took over a room this node held (this one was cut off from NATS past
    /// its claim's age): this node's state of the room is void.
    fn room_lost(&self, room: &str);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wire_shapes_round_trip() {
        let req = FrontRequest {
            client: ClientAddr { front: "n2".into(), socket: "abc".into(), run: "n2/x".into() },
            session: FrontSession::Joined { room: "r".into(), participant: "abc".into(), generation: 2 },
            name: "publish".into(),
            args: vec![json!({"media": {"audio": {"source": "mic"}}})],
        };
        let text = serde_json::to_string(&req).unwrap();
        assert_eq!(serde_json::from_str::<FrontRequest>(&text).unwrap(), req);
        let reply = FrontReply {
            reply: Err("nope".into()),
            session: FrontSession::Ended,
            replay: vec![("text".into(), json!(1))],
            moved: false,
            home: "n1/x".into(),
        };
        assert_eq!(serde_json::from_str::<FrontReply>(&serde_json::to_string(&reply).unwrap()).unwrap(), reply);
        for m in [ToClient::Emit { seq: 3, event: "drop".into(), args: vec![] }, ToClient::Disconnect] {
            assert_eq!(serde_json::from_str::<ToClient>(&serde_json::to_string(&m).unwrap()).unwrap(), m);
        }
        let c = ControlRequest::PatchStream { stream: "s".into(), ops: json!([{"op": "add"}]) };
        assert_eq!(serde_json::from_str::<ControlRequest>(&serde_json::to_string(&c).unwrap()).unwrap(), c);
        let e: Result<ControlAnswer, ControlErrorWire> = Err(ControlError::StreamNotFound("s".into()).into());
        let back: Result<ControlAnswer, ControlErrorWire> = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(ControlError::from(back.unwrap_err()), ControlError::StreamNotFound("s".into()));
    }
}
