//! The seam between the portal and the media agents (the webrtc-agent SFU today, the
//! mixer later): what the portal asks of an agent, and what an agent reports back.
//!
//! The portal validates every client request (permissions, ownership, limits) before it
//! reaches an agent, so an agent trusts these calls. Agents answer asynchronously through
//! [`AgentEvent`]s because WebRTC negotiation outlives a request: the SDP answer, ICE
//! connectivity and the first media packet all come later.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaKind {
    /// An audio track.
    Audio,
    /// A video track.
    Video,
}

impl MediaKind {
    /// `"audio"` or `"video"`.
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Audio => "audio",
            MediaKind::Video => "video",
        }
    }
}

/// One track a publisher announces in `publish`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishTrack {
    /// Audio or video.
    pub kind: MediaKind,
    /// The m-line (transceiver) id in the client's offer.
    pub mid: String,
    /// `mic`, `camera`, `screen-cast`, ...
    pub source: String,
}

/// One track a subscriber asks for in `subscribe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeTrack {
    /// Audio or video.
    pub kind: MediaKind,
    /// The m-line id in the subscriber's offer.
    pub mid: String,
    /// The stream it comes from.
    pub from: String,
}

/// Identifies a WebRTC session: who, which transport (peer connection), which session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRef {
    /// Room id.
    pub room: String,
    /// Participant id.
    pub participant: String,
    /// Transport (peer connection) id.
    pub transport: String,
    /// Publication or subscription id.
    pub session: String,
}

/// A publication to set up on a transport; media starts after the client's offer.
#[derive(Debug, Clone)]
pub struct PublishSpec {
    /// Where it belongs.
    pub at: SessionRef,
    /// The announced tracks.
    pub tracks: Vec<PublishTrack>,
    /// Whether the publication carries a data channel.
    pub data: bool,
}

/// A subscription to set up on a transport.
#[derive(Debug, Clone)]
pub struct SubscribeSpec {
    /// Where it belongs.
    pub at: SessionRef,
    /// The requested tracks.
    pub tracks: Vec<SubscribeTrack>,
    /// Subscribe to this stream's data channel, if any.
    pub data_from: Option<String>,
}

/// A client `soac` message, already checked for shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signaling {
    /// A (re)offer for the transport.
    Offer(String),
    /// A trickled ICE candidate (without the `a=` prefix) with its m-line.
    Candidate {
        /// `candidate:...` line.
        candidate: String,
        /// m-line id.
        sdp_mid: Option<String>,
        /// m-line index.
        sdp_mline_index: Option<u16>,
    },
    /// Candidates the client withdrew (ignored by agents that do not need them).
    RemovedCandidates,
}

/// What an agent reports to the portal.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    /// A `progress` notification for a participant (answer SDP, ready, error).
    Progress {
        /// Room id.
        room: String,
        /// Recipient.
        participant: String,
        /// The notification data, e.g. `{id, status: "soac", data: {type: "answer", sdp}}`.
        data: Value,
    },
    /// A publication's media flows: it becomes a forward stream of the room.
    StreamReady {
        /// Room id.
        room: String,
        /// The stream in OWT StreamInfo form (`id`, `type`, `media.tracks`, `info`).
        stream: Value,
    },
    /// A publication ended on the agent's side (peer gone, transport failed).
    StreamEnded {
        /// Room id.
        room: String,
        /// Stream id.
        stream: String,
        /// Why.
        reason: String,
    },
    /// A subscription ended on the agent's side.
    SubscriptionEnded {
        /// Room id.
        room: String,
        /// Owner.
        participant: String,
        /// Subscription id.
        subscription: String,
        /// Why.
        reason: String,
    },
    /// A field of a stream's info changed on the media side (a mixed stream's
    /// `activeInput` or `video.layout`, decided by the mixer itself).
    StreamUpdated {
        /// Room id.
        room: String,
        /// Stream id.
        stream: String,
        /// OWT's field name: `activeInput` or `video.layout`.
        field: String,
        /// The new value.
        value: Value,
    },
}

/// Why an agent refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// The transport id is unknown to the agent.
    #[error("Transport does NOT exist: {0}")]
    NoTransport(String),
    /// The session id is unknown to the agent.
    #[error("Session does NOT exist: {0}")]
    NoSession(String),
    /// The request cannot be honoured (bad SDP, unsupported codec, ...).
    #[error("{0}")]
    Rejected(String),
    /// The agent failed internally.
    #[error("media agent failure: {0}")]
    Failed(String),
}

/// Pause/resume of a publication's or subscription's tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackSwitch {
    /// Affect audio.
    pub audio: bool,
    /// Affect video.
    pub video: bool,
    /// true to resume, false to pause.
    pub active: bool,
}

impl TrackSwitch {
    /// Whether the switch applies to tracks of this kind.
    pub fn covers(&self, kind: MediaKind) -> bool {
        match kind {
            MediaKind::Audio => self.audio,
            MediaKind::Video => self.video,
        }
    }
}

/// A media agent as the portal drives it.
#[async_trait::async_trait]
pub trait MediaAgent: Send + Sync {
    /// Registers a publication; its media flows after the client's offer on `spec.at.transport`.
    async fn publish(&self, spec: PublishSpec) -> Result<(), AgentError>;
    /// Registers a subscription to existing streams.
    async fn subscribe(&self, spec: SubscribeSpec) -> Result<(), AgentError>;
    /// Handles an offer or candidate from the client for one of its transports.
    async fn signal(&self, room: &str, participant: &str, transport: &str, signaling: Signaling) -> Result<(), AgentError>;
    /// Ends a publication (its stream disappears) or a subscription.
    async fn end_session(&self, participant: &str, session: &str);
    /// Pauses or resumes forwarding of a publication's or subscription's tracks.
    async fn switch(&self, participant: &str, session: &str, switch: TrackSwitch) -> Result<(), AgentError>;
    /// Asks a publisher for a keyframe on a stream's video (throttled by the agent).
    async fn request_keyframe(&self, stream: &str);
    /// Drops everything a participant has (left the room).
    async fn participant_left(&self, participant: &str);
    /// Counts of live media objects, for the stats endpoint.
    fn stats(&self) -> Value;
}

/// The MCU as the portal drives it: one mixed stream per view of a room.
#[async_trait::async_trait]
pub trait MixEngine: Send + Sync {
    /// Creates (or returns, if already there) the room's mixed streams, one per view, as
    /// OWT StreamInfo (`type: "mixed"`, `info: {label, layout, activeInput}`, `media.tracks`).
    async fn start_room(&self, room: &crate::room::Room) -> Vec<Value>;
    /// Frees the room's mixed streams and pipelines.
    async fn stop_room(&self, room: &str);
    /// Adds a forward stream to a view; returns the view's new layout.
    async fn mix(&self, room: &str, view: &str, stream: &str) -> Result<Value, AgentError>;
    /// Removes a stream from a view; returns the view's new layout.
    async fn unmix(&self, room: &str, view: &str, stream: &str) -> Result<Value, AgentError>;
    /// Replaces a view's layout with OWT's `[{stream?, region: {id, shape, area}}]`:
    /// regions become the view's custom template and listed streams are pinned to them.
    /// Returns the applied layout.
    async fn set_layout(&self, room: &str, view: &str, layout: Value) -> Result<Value, AgentError>;
    /// Switches a view's base template (`fluid`, `lecture`); pins and custom regions are
    /// dropped. Returns the new layout. (Tessera extension.)
    async fn set_template(&self, room: &str, view: &str, base: &str) -> Result<Value, AgentError>;
    /// Puts a stream of the view into a region (by id); returns the new layout.
    async fn set_region(&self, room: &str, view: &str, stream: &str, region: &str) -> Result<Value, AgentError>;
    /// The current layout of a view.
    async fn layout(&self, room: &str, view: &str) -> Option<Value>;
}

/// What to record: a stream's audio and/or video (they may come from different streams).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordingSpec {
    /// `auto`, `webm`, `mkv` or `mp4`.
    pub container: String,
    /// Stream to take audio from.
    pub audio_from: Option<String>,
    /// Stream to take video from.
    pub video_from: Option<String>,
}

/// Recording to storage, as the management API drives it.
#[async_trait::async_trait]
pub trait RecordingEngine: Send + Sync {
    /// Starts a recording; returns its description (`id`, `state`, `storage`, ...).
    async fn start(&self, room: &str, spec: RecordingSpec) -> Result<Value, AgentError>;
    /// The room's recordings, running and finished.
    async fn list(&self, room: &str) -> Vec<Value>;
    /// Switches the audio or video source of a running recording.
    async fn switch_source(&self, room: &str, id: &str, kind: MediaKind, from: &str) -> Result<Value, AgentError>;
    /// Stops and finalises a recording; returns its final description.
    async fn stop(&self, room: &str, id: &str) -> Result<Value, AgentError>;
    /// The file of a recording, for download.
    async fn file(&self, room: &str, id: &str) -> Option<std::path::PathBuf>;
    /// Stops every recording of a deleted room.
    async fn room_deleted(&self, room: &str);
    /// Stops and finalises everything (server shutdown).
    async fn shutdown(&self);
}
