//! The control protocol between the room controller (the portal) and the media nodes:
//! one command enum per kind of node, with one typed reply per command, and the
//! [`Router`] that finds the node serving a room or a view.
//!
//! A node implements a single `handle(command) -> reply` method, so the same node can be
//! reached in-process ([`LocalRouter`], messages passed as values) or over a message bus
//! (every command and reply is serde-serialisable and round-trip tested). Callers use
//! the typed `call` helpers (`dyn MediaNode::call(Publish(..))` returns the publish reply
//! type), so a reply of the wrong kind is a protocol error, never a silent mismatch.
//!
//! Ownership: media nodes own transports and sessions (what flows where); the room
//! controller owns participants, permissions and which streams exist. Each learns the
//! other's changes only from commands and [`crate::agent::AgentEvent`]s.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::agent::{AgentError, LayerChoice, MediaKind, PublishSpec, RecordingSpec, Signaling, SubscribeSpec, TrackSwitch, TransportRef};
use crate::room::View;
use crate::stream::{LayoutEntry, StreamInfo};
use crate::typed_ids::{ParticipantId, RoomId, SessionId, StreamId, TransportId, ViewLabel};

/// Declares one protocol: the command enum, the reply enum, the trait tying each command
/// body to its reply type, the node trait and its typed `call`.
macro_rules! protocol {
    (
        $(#[$cdoc:meta])* command $Command:ident;
        $(#[$rdoc:meta])* reply $Reply:ident;
        $(#[$qdoc:meta])* request $Request:ident;
        $(#[$ndoc:meta])* node $Node:ident, error $Error:ident;
        $( $(#[$vdoc:meta])* $Variant:ident($Body:ty) -> $Out:ty; )+
    ) => {
        $(#[$cdoc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "command", content = "args", rename_all = "snake_case")]
        pub enum $Command {
            $( $(#[$vdoc])* $Variant($Body), )+
        }

        $(#[$rdoc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "reply", content = "value", rename_all = "snake_case")]
        pub enum $Reply {
            $( #[doc = concat!("The answer to `", stringify!($Variant), "`.")] $Variant($Out), )+
        }

        impl $Command {
            /// The command's name, for logs and errors.
            pub fn name(&self) -> &'static str {
                match self {
                    $( $Command::$Variant(_) => stringify!($Variant), )+
                }
            }
        }

        $(#[$qdoc])*
        pub trait $Request: Into<$Command> + Send {
            /// What the node answers.
            type Reply: Send;
            /// The typed answer inside a reply, if the reply is this command's.
            fn reply_of(reply: $Reply) -> Option<Self::Reply>;
        }

        $(
            impl From<$Body> for $Command {
                fn from(body: $Body) -> Self {
                    $Command::$Variant(body)
                }
            }

            impl $Request for $Body {
                type Reply = $Out;
                fn reply_of(reply: $Reply) -> Option<$Out> {
                    match reply {
                        $Reply::$Variant(v) => Some(v),
                        #[allow(unreachable_patterns)]
                        _ => None,
                    }
                }
            }
        )+

        $(#[$ndoc])*
        #[async_trait::async_trait]
        pub trait $Node: Send + Sync {
            /// Carries out one command.
            async fn handle(&self, command: $Command) -> Result<$Reply, $Error>;
        }

        impl dyn $Node {
            /// Sends a command and returns its typed reply.
            pub async fn call<R: $Request>(&self, request: R) -> Result<R::Reply, $Error> {
                let command: $Command = request.into();
                let name = command.name();
                let reply = self.handle(command).await?;
                R::reply_of(reply).ok_or_else(|| $Error::Failed(format!("protocol: a reply of another kind to {name}")))
            }
        }
    };
}

// ---------------------------------------------------------------------------------------
// webrtc media node (the SFU)

/// Negotiation input from a client for one of its transports (`soac`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    /// The transport.
    pub at: TransportRef,
    /// The offer or candidate.
    pub signaling: Signaling,
}

/// Ends a publication (its stream disappears) or a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndSession {
    /// Room id.
    pub room: RoomId,
    /// Owner.
    pub participant: ParticipantId,
    /// Publication or subscription id.
    pub session: SessionId,
}

/// Pauses or resumes forwarding of a publication's or subscription's tracks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchTracks {
    /// Room id.
    pub room: RoomId,
    /// Owner.
    pub participant: ParticipantId,
    /// Publication or subscription id.
    pub session: SessionId,
    /// Which tracks, and on or off.
    pub switch: TrackSwitch,
}

/// Changes the simulcast layer a subscription's video takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectLayer {
    /// Room id.
    pub room: RoomId,
    /// Owner.
    pub participant: ParticipantId,
    /// The subscription.
    pub session: SessionId,
    /// The layer wanted.
    pub layer: LayerChoice,
}

/// Asks a stream's publisher for a keyframe (throttled by the node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestKeyframe {
    /// Room id.
    pub room: RoomId,
    /// The stream.
    pub stream: StreamId,
}

/// A participant left its room: everything it has on the node goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantLeft {
    /// Room id.
    pub room: RoomId,
    /// The participant.
    pub participant: ParticipantId,
}

/// Asks a media node for its counts of live objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetStats;

/// Counts of a media node's live objects, for the stats endpoint and leak tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaStats {
    /// Open transports (peer connections).
    pub transports: usize,
    /// Client publications (announced or flowing).
    pub publications: usize,
    /// Streams produced inside the server (mixed views).
    pub local_streams: usize,
    /// Subscriptions.
    pub subscriptions: usize,
}

protocol! {
    /// What the room controller asks of a webrtc media node. The controller has checked
    /// permissions, ownership and limits; the node trusts these commands.
    command AgentCommand;
    /// A webrtc media node's answer to an [`AgentCommand`].
    reply AgentReply;
    /// A body of an [`AgentCommand`], with its reply type.
    request AgentRequest;
    /// A webrtc media node (the SFU) as the room controller drives it. Negotiation
    /// results come later, as [`crate::agent::AgentEvent`]s.
    node MediaNode, error AgentError;
    /// Registers a publication; media flows after the client's offer on its transport.
    Publish(PublishSpec) -> ();
    /// Registers a subscription to streams the node has.
    Subscribe(SubscribeSpec) -> ();
    /// An offer or candidate from the client.
    Signal(Signal) -> ();
    /// Ends a publication or subscription.
    EndSession(EndSession) -> ();
    /// Pauses or resumes tracks.
    SwitchTracks(SwitchTracks) -> ();
    /// Asks for a keyframe.
    RequestKeyframe(RequestKeyframe) -> ();
    /// Changes a subscription's simulcast layer.
    SelectLayer(SelectLayer) -> ();
    /// Drops what a participant had.
    ParticipantLeft(ParticipantLeft) -> ();
    /// Counts of live objects.
    GetStats(GetStats) -> MediaStats;
}

// ---------------------------------------------------------------------------------------
// mixer node (the MCU)

/// Why a mixer refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixError {
    /// The room has no running view of that label.
    #[error("View does NOT exist: {0}")]
    NoView(ViewLabel),
    /// The view mixes as many inputs as it may.
    #[error("View {0} is full")]
    ViewFull(ViewLabel),
    /// The stream is not one of the view's inputs.
    #[error("Stream {stream} is not mixed in view {view}")]
    NotInView {
        /// The stream.
        stream: StreamId,
        /// The view.
        view: ViewLabel,
    },
    /// The view has no region of that id.
    #[error("Region does NOT exist: {region}")]
    NoRegion {
        /// The view.
        view: ViewLabel,
        /// The requested region id.
        region: String,
    },
    /// A layout or template the mixer cannot apply, and why.
    #[error("{0}")]
    BadLayout(String),
    /// The mixer failed internally.
    #[error("mixer failure: {0}")]
    Failed(String),
}

/// Starts (or finds, if running) a view's mixed stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartView {
    /// Room id.
    pub room: RoomId,
    /// The view's settings from the room configuration (boxed: the largest command by far).
    pub view: Box<View>,
}

/// Stops a view and frees its pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopView {
    /// Room id.
    pub room: RoomId,
    /// The view.
    pub view: ViewLabel,
}

/// Adds a forward stream to a view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mix {
    /// Room id.
    pub room: RoomId,
    /// The view.
    pub view: ViewLabel,
    /// The forward stream.
    pub stream: StreamId,
}

/// Removes a stream from a view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unmix {
    /// Room id.
    pub room: RoomId,
    /// The view.
    pub view: ViewLabel,
    /// The stream.
    pub stream: StreamId,
}

/// Replaces a view's layout: its regions become the view's custom template and listed
/// streams are pinned to them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetLayout {
    /// Room id.
    pub room: RoomId,
    /// The view.
    pub view: ViewLabel,
    /// The requested layout.
    pub layout: Vec<LayoutEntry>,
}

/// Switches a view's base template (`fluid`, `lecture`); pins and custom regions go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetTemplate {
    /// Room id.
    pub room: RoomId,
    /// The view.
    pub view: ViewLabel,
    /// `fluid` or `lecture`.
    pub base: String,
}

/// Puts a stream of a view into a region (by id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetRegion {
    /// Room id.
    pub room: RoomId,
    /// The view.
    pub view: ViewLabel,
    /// The stream.
    pub stream: StreamId,
    /// The region id.
    pub region: String,
}

/// Asks for a view's current layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetLayout {
    /// Room id.
    pub room: RoomId,
    /// The view.
    pub view: ViewLabel,
}

protocol! {
    /// What the room controller asks of a mixer node: one mixed stream per view.
    command MixCommand;
    /// A mixer's answer to a [`MixCommand`].
    reply MixReply;
    /// A body of a [`MixCommand`], with its reply type.
    request MixRequest;
    /// A mixer node (the MCU) as the room controller drives it. Layout and active-input
    /// changes it decides itself come as [`crate::agent::AgentEvent::StreamUpdated`].
    node MixNode, error MixError;
    /// Starts a view (idempotent: concurrent starts of one view create it once); its stream.
    StartView(StartView) -> StreamInfo;
    /// Stops a view.
    StopView(StopView) -> ();
    /// Mixes a stream into a view; the new layout.
    Mix(Mix) -> Vec<LayoutEntry>;
    /// Takes a stream out of a view; the new layout.
    Unmix(Unmix) -> Vec<LayoutEntry>;
    /// Replaces a view's layout; the applied layout.
    SetLayout(SetLayout) -> Vec<LayoutEntry>;
    /// Switches a view's base template; the new layout.
    SetTemplate(SetTemplate) -> Vec<LayoutEntry>;
    /// Moves a stream to a region; the new layout.
    SetRegion(SetRegion) -> Vec<LayoutEntry>;
    /// A view's current layout.
    GetLayout(GetLayout) -> Vec<LayoutEntry>;
}

// ---------------------------------------------------------------------------------------
// recorder node

/// Why a recorder refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordingError {
    /// No recording of that id in the room.
    #[error("recording {0} not found")]
    NoRecording(String),
    /// The source stream does not exist or lacks the track.
    #[error("Stream does NOT exist: {0}")]
    NoStream(StreamId),
    /// The request cannot be honoured (container/codec mismatch, ended recording, ...).
    #[error("{0}")]
    Rejected(String),
    /// The recorder failed internally.
    #[error("recorder failure: {0}")]
    Failed(String),
}

/// A recording's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordingState {
    /// Writing.
    Recording,
    /// Stopped and finalised.
    Stopped,
    /// Could not start or failed while writing; `reason` says why.
    Failed,
}

/// Where one kind of media of a recording comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingSource {
    /// The source stream.
    pub from: StreamId,
    /// Its codec, once the recording took it (`{codec: "vp8"}`, OWT's `format`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<RecordingFormat>,
}

/// A recorded track's codec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingFormat {
    /// `opus`, `vp8`, `h264`, ...
    pub codec: String,
}

/// The audio and video sources of a recording (`false` on the wire when absent, as OWT).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingMedia {
    /// Audio source.
    #[serde(with = "false_when_none")]
    pub audio: Option<RecordingSource>,
    /// Video source.
    #[serde(with = "false_when_none")]
    pub video: Option<RecordingSource>,
}

/// Where a recording is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingStorage {
    /// The file on the recorder's machine.
    pub file: String,
}

/// A recording as the REST API describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordingInfo {
    /// Recording id.
    pub id: String,
    /// Recording, stopped or failed.
    pub state: RecordingState,
    /// `webm`, `mkv` or `mp4`.
    pub container: String,
    /// Start time, ms since the Unix epoch.
    pub started_at: u64,
    /// Seconds recorded (so far, while recording).
    pub duration: f64,
    /// Bytes written.
    pub size: u64,
    /// Where the file is.
    pub storage: RecordingStorage,
    /// The REST path that downloads the file.
    pub url: String,
    /// Its sources.
    pub media: RecordingMedia,
    /// Why it stopped or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

mod false_when_none {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::RecordingSource;

    pub fn serialize<S: Serializer>(v: &Option<RecordingSource>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(source) => source.serialize(s),
            None => s.serialize_bool(false),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Wire {
        Source(RecordingSource),
        Absent(Option<bool>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RecordingSource>, D::Error> {
        match Wire::deserialize(d)? {
            Wire::Source(s) => Ok(Some(s)),
            Wire::Absent(None | Some(false)) => Ok(None),
            Wire::Absent(Some(true)) => Err(serde::de::Error::custom("expected a source object or false")),
        }
    }
}

/// Starts a recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRecording {
    /// Room id.
    pub room: RoomId,
    /// What to record, into which container.
    pub spec: RecordingSpec,
}

/// Lists a room's recordings, running and finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRecordings {
    /// Room id.
    pub room: RoomId,
}

/// Switches the audio or video source of a running recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchSource {
    /// Room id.
    pub room: RoomId,
    /// Recording id.
    pub recording: String,
    /// Which kind of media.
    pub kind: MediaKind,
    /// The new source stream.
    pub from: StreamId,
}

/// Stops and finalises a recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopRecording {
    /// Room id.
    pub room: RoomId,
    /// Recording id.
    pub recording: String,
}

/// Asks where a recording's file is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingFile {
    /// Room id.
    pub room: RoomId,
    /// Recording id.
    pub recording: String,
}

/// Asks for bytes of a recording's file, so a file on another node can be downloaded
/// through any portal (over NATS in a cluster).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadRecording {
    /// Room id.
    pub room: RoomId,
    /// Recording id.
    pub recording: String,
    /// Where to start, in bytes.
    pub offset: u64,
    /// Most bytes wanted (the recorder gives at most [`MAX_RECORDING_CHUNK`]).
    pub len: u32,
}

/// The largest chunk a [`ReadRecording`] gets: well under NATS's 1 MB message limit once
/// base64-encoded, and small enough that a reply never holds up a node's other requests
/// for long.
pub const MAX_RECORDING_CHUNK: u32 = 64 * 1024;

/// Bytes of a recording's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingChunk {
    /// The file's name (no folder), for the download's name and type.
    pub name: String,
    /// The file's size now (a running recording grows).
    pub size: u64,
    /// The bytes from the requested offset; empty at the end.
    #[serde(with = "base64_bytes")]
    pub data: Vec<u8>,
}

/// Bytes as base64 on the wire (JSON would spell every byte as a number).
mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// A room was deleted: its recordings stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomDeleted {
    /// Room id.
    pub room: RoomId,
}

/// The server stops: every recording is finalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownRecorder;

protocol! {
    /// What the management API asks of a recorder node.
    command RecorderCommand;
    /// A recorder's answer to a [`RecorderCommand`].
    reply RecorderReply;
    /// A body of a [`RecorderCommand`], with its reply type.
    request RecorderRequest;
    /// A recorder node as the management API drives it.
    node RecorderNode, error RecordingError;
    /// Starts a recording; its description.
    StartRecording(StartRecording) -> RecordingInfo;
    /// The room's recordings, in start order.
    ListRecordings(ListRecordings) -> Vec<RecordingInfo>;
    /// Switches a source; the new description.
    SwitchSource(SwitchSource) -> RecordingInfo;
    /// Stops a recording; its final description.
    StopRecording(StopRecording) -> RecordingInfo;
    /// The file of a recording (on the recorder's machine).
    RecordingFile(RecordingFile) -> PathBuf;
    /// Bytes of a recording's file.
    ReadRecording(ReadRecording) -> RecordingChunk;
    /// Stops the recordings of a deleted room.
    RoomDeleted(RoomDeleted) -> ();
    /// Stops and finalises everything.
    ShutdownRecorder(ShutdownRecorder) -> ();
}

impl AgentCommand {
    /// The room the command concerns; none for node-wide ones (stats).
    pub fn room(&self) -> Option<&RoomId> {
        match self {
            AgentCommand::Publish(c) => Some(&c.at.room),
            AgentCommand::Subscribe(c) => Some(&c.at.room),
            AgentCommand::Signal(c) => Some(&c.at.room),
            AgentCommand::EndSession(c) => Some(&c.room),
            AgentCommand::SwitchTracks(c) => Some(&c.room),
            AgentCommand::RequestKeyframe(c) => Some(&c.room),
            AgentCommand::SelectLayer(c) => Some(&c.room),
            AgentCommand::ParticipantLeft(c) => Some(&c.room),
            AgentCommand::GetStats(_) => None,
        }
    }
}

impl MixCommand {
    /// The room the command concerns.
    pub fn room(&self) -> &RoomId {
        match self {
            MixCommand::StartView(c) => &c.room,
            MixCommand::StopView(c) => &c.room,
            MixCommand::Mix(c) => &c.room,
            MixCommand::Unmix(c) => &c.room,
            MixCommand::SetLayout(c) => &c.room,
            MixCommand::SetTemplate(c) => &c.room,
            MixCommand::SetRegion(c) => &c.room,
            MixCommand::GetLayout(c) => &c.room,
        }
    }
}

// ---------------------------------------------------------------------------------------
// routing

/// Finds the node that serves a room or a view. The local router returns the objects of
/// this process; a cluster router returns proxies that carry the same commands over a bus.
pub trait Router: Send + Sync {
    /// The webrtc node for the room's sessions.
    fn agent_for(&self, room: &RoomId) -> Option<Arc<dyn MediaNode>>;
    /// The mixer node for one view of a room.
    fn mixer_for(&self, room: &RoomId, view: &ViewLabel) -> Option<Arc<dyn MixNode>>;
    /// The recorder node for the room's recordings.
    fn recorder_for(&self, room: &RoomId) -> Option<Arc<dyn RecorderNode>>;
    /// Every webrtc node, for server-wide counts.
    fn media_nodes(&self) -> Vec<Arc<dyn MediaNode>>;
    /// Every recorder node, this process's first: a recording outlives its room's
    /// placement, so its file is looked for on each (downloads after the meeting).
    fn recorder_nodes(&self) -> Vec<Arc<dyn RecorderNode>>;
    /// The room is empty and its views stopped: a router that placed it may forget where,
    /// so it is placed afresh (on the least-used node) when someone comes back.
    fn release(&self, _room: &RoomId) {}
    /// A transport of the room closed (its sessions are over): a router may forget it.
    fn transport_closed(&self, _room: &RoomId, _transport: &TransportId) {}
}

/// Every node in this process; commands are passed as values, never serialised.
#[derive(Clone, Default)]
pub struct LocalRouter {
    /// The SFU, if this process runs one.
    pub agent: Option<Arc<dyn MediaNode>>,
    /// The mixer, if this process runs one.
    pub mixer: Option<Arc<dyn MixNode>>,
    /// The recorder, if this process runs one.
    pub recorder: Option<Arc<dyn RecorderNode>>,
}

impl Router for LocalRouter {
    fn agent_for(&self, _room: &RoomId) -> Option<Arc<dyn MediaNode>> {
        self.agent.clone()
    }
    fn mixer_for(&self, _room: &RoomId, _view: &ViewLabel) -> Option<Arc<dyn MixNode>> {
        self.mixer.clone()
    }
    fn recorder_for(&self, _room: &RoomId) -> Option<Arc<dyn RecorderNode>> {
        self.recorder.clone()
    }
    fn media_nodes(&self) -> Vec<Arc<dyn MediaNode>> {
        self.agent.iter().cloned().collect()
    }
    fn recorder_nodes(&self) -> Vec<Arc<dyn RecorderNode>> {
        self.recorder.iter().cloned().collect()
    }
}

impl std::ops::Add for MediaStats {
    type Output = MediaStats;
    fn add(self, o: MediaStats) -> MediaStats {
        MediaStats {
            transports: self.transports + o.transports,
            publications: self.publications + o.publications,
            local_streams: self.local_streams + o.local_streams,
            subscriptions: self.subscriptions + o.subscriptions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::tests::{at, layout, round_trip};
    use crate::agent::{PublishTrack, SubscribeTrack};

    fn recording() -> RecordingInfo {
        RecordingInfo {
            id: "rec1".into(),
            state: RecordingState::Stopped,
            container: "mkv".into(),
            started_at: 1_700_000_000_000,
            duration: 2.5,
            size: 1234,
            storage: RecordingStorage { file: "/tmp/r.mkv".into() },
            url: "/v1/rooms/r/recordings/rec1/file".into(),
            media: RecordingMedia {
                audio: None,
                video: Some(RecordingSource { from: "s".into(), format: Some(RecordingFormat { codec: "h264".into() }) }),
            },
            reason: Some("stopped over REST".into()),
        }
    }

    #[test]
    fn every_agent_command_and_reply_round_trips() {
        let commands: Vec<AgentCommand> = vec![
            PublishSpec {
                at: at(),
                tracks: vec![PublishTrack { kind: MediaKind::Video, mid: "1".into(), source: "camera".into() }],
                data: true,
                accept: None,
            }
            .into(),
            SubscribeSpec {
                at: at(),
                tracks: vec![SubscribeTrack { kind: MediaKind::Audio, mid: "0".into(), from: "s9".into(), layer: Default::default() }],
                data_from: Some("s9".into()),
            }
            .into(),
            Signal {
                at: TransportRef { room: "r".into(), participant: "p".into(), transport: "t".into() },
                signaling: Signaling::Offer("v=0".into()),
            }
            .into(),
            Signal {
                at: TransportRef { room: "r".into(), participant: "p".into(), transport: "t".into() },
                signaling: Signaling::Candidate {
                    candidate: "candidate:1 1 udp 1 127.0.0.1 9 typ host".into(),
                    sdp_mid: Some("0".into()),
                    sdp_mline_index: None,
                },
            }
            .into(),
            EndSession { room: "r".into(), participant: "p".into(), session: "s".into() }.into(),
            SwitchTracks {
                room: "r".into(),
                participant: "p".into(),
                session: "s".into(),
                switch: TrackSwitch { audio: true, video: false, active: false },
            }
            .into(),
            RequestKeyframe { room: "r".into(), stream: "s".into() }.into(),
            ParticipantLeft { room: "r".into(), participant: "p".into() }.into(),
            GetStats.into(),
        ];
        assert_eq!(commands.len(), 9, "one of each command");
        for c in commands {
            round_trip(c);
        }
        round_trip(AgentReply::Publish(()));
        round_trip(AgentReply::GetStats(MediaStats { transports: 1, publications: 2, local_streams: 3, subscriptions: 4 }));
        for e in [
            AgentError::NoTransport("t".into()),
            AgentError::NoSession("s".into()),
            AgentError::NoStream("s".into()),
            AgentError::Rejected("x".into()),
            AgentError::Failed("y".into()),
        ] {
            round_trip(e);
        }
    }

    #[test]
    fn every_mix_command_and_reply_round_trips() {
        let view: View = serde_json::from_value(serde_json::json!({"label": "common"})).unwrap();
        let commands: Vec<MixCommand> = vec![
            StartView { room: "r".into(), view: Box::new(view) }.into(),
            StopView { room: "r".into(), view: "common".into() }.into(),
            Mix { room: "r".into(), view: "common".into(), stream: "s".into() }.into(),
            Unmix { room: "r".into(), view: "common".into(), stream: "s".into() }.into(),
            SetLayout { room: "r".into(), view: "common".into(), layout: layout() }.into(),
            SetTemplate { room: "r".into(), view: "common".into(), base: "lecture".into() }.into(),
            SetRegion { room: "r".into(), view: "common".into(), stream: "s".into(), region: "1".into() }.into(),
            GetLayout { room: "r".into(), view: "common".into() }.into(),
        ];
        assert_eq!(commands.len(), 8, "one of each command");
        for c in commands {
            round_trip(c);
        }
        round_trip(MixReply::StartView(crate::stream::tests::mixed()));
        round_trip(MixReply::Mix(layout()));
        round_trip(MixReply::StopView(()));
        for e in [
            MixError::NoView("v".into()),
            MixError::ViewFull("v".into()),
            MixError::NotInView { stream: "s".into(), view: "v".into() },
            MixError::NoRegion { view: "v".into(), region: "9".into() },
            MixError::BadLayout("x".into()),
            MixError::Failed("y".into()),
        ] {
            round_trip(e);
        }
    }

    #[test]
    fn every_recorder_command_and_reply_round_trips() {
        let commands: Vec<RecorderCommand> = vec![
            StartRecording { room: "r".into(), spec: RecordingSpec { container: "mkv".into(), audio_from: Some("a".into()), video_from: None } }
                .into(),
            ListRecordings { room: "r".into() }.into(),
            SwitchSource { room: "r".into(), recording: "rec1".into(), kind: MediaKind::Video, from: "s2".into() }.into(),
            StopRecording { room: "r".into(), recording: "rec1".into() }.into(),
            RecordingFile { room: "r".into(), recording: "rec1".into() }.into(),
            RoomDeleted { room: "r".into() }.into(),
            ShutdownRecorder.into(),
        ];
        assert_eq!(commands.len(), 7, "one of each command");
        for c in commands {
            round_trip(c);
        }
        round_trip(RecorderReply::StartRecording(recording()));
        round_trip(RecorderReply::ListRecordings(vec![recording()]));
        round_trip(RecorderReply::RecordingFile("/tmp/r.mkv".into()));
        for e in [
            RecordingError::NoRecording("x".into()),
            RecordingError::NoStream("s".into()),
            RecordingError::Rejected("r".into()),
            RecordingError::Failed("f".into()),
        ] {
            round_trip(e);
        }
    }

    #[test]
    fn recordings_keep_owt_wire_shape() {
        let v = serde_json::to_value(recording()).unwrap();
        assert_eq!(v["media"]["audio"], serde_json::json!(false));
        assert_eq!(v["media"]["video"], serde_json::json!({"from": "s", "format": {"codec": "h264"}}));
        assert_eq!(v["startedAt"], 1_700_000_000_000u64);
        assert_eq!(v["state"], "stopped");
        assert_eq!(v["storage"]["file"], "/tmp/r.mkv");
    }

    /// A node that answers every command with the reply of another one.
    struct Confused;

    #[async_trait::async_trait]
    impl MediaNode for Confused {
        async fn handle(&self, _: AgentCommand) -> Result<AgentReply, AgentError> {
            Ok(AgentReply::GetStats(MediaStats::default()))
        }
    }

    #[tokio::test]
    async fn a_reply_of_the_wrong_kind_is_an_error() {
        let node: Arc<dyn MediaNode> = Arc::new(Confused);
        let e = node.call(ParticipantLeft { room: "r".into(), participant: "p".into() }).await.unwrap_err();
        assert!(e.to_string().contains("ParticipantLeft"), "{e}");
        assert_eq!(node.call(GetStats).await.unwrap(), MediaStats::default());
    }
}
