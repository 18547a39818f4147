//! The seam between the portal and the media agents (the webrtc-agent SFU today, the
//! mixer later): what the portal asks of an agent, and what an agent reports back.
//!
//! The portal validates every client request (permissions, ownership, limits) before it
//! reaches an agent, so an agent trusts these calls. Agents answer asynchronously through
//! [`AgentEvent`]s because WebRTC negotiation outlives a request: the SDP answer, ICE
//! connectivity and the first media packet all come later.

use serde::{Deserialize, Serialize};

use crate::stream::{LayoutEntry, StreamInfo, TrackInfo};
use crate::typed_ids::{ParticipantId, RoomId, SessionId, StreamId, TransportId};

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishTrack {
    /// Audio or video.
    pub kind: MediaKind,
    /// The m-line (transceiver) id in the client's offer.
    pub mid: String,
    /// `mic`, `camera`, `screen-cast`, ...
    pub source: String,
}

/// One track a subscriber asks for in `subscribe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeTrack {
    /// Audio or video.
    pub kind: MediaKind,
    /// The m-line id in the subscriber's offer.
    pub mid: String,
    /// The stream it comes from.
    pub from: StreamId,
    /// Which simulcast layer of a layered video track (ignored for other tracks).
    #[serde(default)]
    pub layer: LayerChoice,
}

/// Which simulcast layer a subscriber wants of a layered video track.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerChoice {
    /// The server's pick: the highest layer flowing.
    #[default]
    Auto,
    /// The layer of this RID (the nearest flowing one, lower first, while it does not flow).
    Rid(String),
    /// The flowing layer whose picture size is closest to this one.
    Resolution {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// The flowing layer whose measured bit rate is nearest this share of the highest
    /// flowing layer's (OWT's `"bitrate": "x0.6"` subscription parameter).
    Bitrate {
        /// The share, in thousandths (600 for `"x0.6"`).
        permille: u32,
    },
    /// The lowest flowing layer that fills a region of this size unenlarged, fitted with
    /// its aspect ratio kept (its width or its height reaches the region's; the highest
    /// flowing one when none does): what a mixer's region needs, decoding no more.
    Fill {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
}

/// Identifies a WebRTC session: who, which transport (peer connection), which session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRef {
    /// Room id.
    pub room: RoomId,
    /// Participant id.
    pub participant: ParticipantId,
    /// Transport (peer connection) id.
    pub transport: TransportId,
    /// Publication or subscription id.
    pub session: SessionId,
}

/// A participant's transport (one peer connection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportRef {
    /// Room id.
    pub room: RoomId,
    /// Owner.
    pub participant: ParticipantId,
    /// Transport id.
    pub transport: TransportId,
}

/// A publication to set up on a transport; media starts after the client's offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishSpec {
    /// Where it belongs.
    pub at: SessionRef,
    /// The announced tracks.
    pub tracks: Vec<PublishTrack>,
    /// Whether the publication carries a data channel.
    pub data: bool,
    /// The codecs it may send (the room's `mediaIn`): the agent answers its m-lines with
    /// those only, and refuses an m-line that offers none; `None`: any codec.
    #[serde(default)]
    pub accept: Option<crate::room::MediaIn>,
}

/// A subscription to set up on a transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeSpec {
    /// Where it belongs.
    pub at: SessionRef,
    /// The requested tracks.
    pub tracks: Vec<SubscribeTrack>,
    /// Subscribe to this stream's data channel, if any.
    pub data_from: Option<StreamId>,
}

/// A client `soac` message, already checked for shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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

/// How a transport's negotiation advances (OWT's `progress` notification, whose wire
/// shape the portal builds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Progress {
    /// The server's SDP answer to the client's offer.
    Answer {
        /// The SDP.
        sdp: String,
    },
    /// The transport's ICE/DTLS connection is up.
    TransportReady,
    /// One session on the transport flows (publication: first media; subscription: bound).
    SessionReady {
        /// The publication or subscription.
        session: SessionId,
    },
}

/// A change of a stream's info decided on the media side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamUpdate {
    /// A mixed stream's layout (OWT field `video.layout`).
    Layout(Vec<LayoutEntry>),
    /// A mixed stream's loudest input (OWT field `activeInput`), none when it left.
    ActiveInput(Option<StreamId>),
    /// The simulcast layers (RIDs) of a forward stream that someone takes: its publisher
    /// may stop sending the others (told to the publisher alone, field `video.layers`).
    ActiveLayers(Vec<String>),
    /// A forward stream's tracks as now measured (its simulcast layers' picture sizes,
    /// once known); told to everyone as the whole stream (field `.`).
    Tracks(Vec<TrackInfo>),
}

/// What an agent reports to the room controller (the portal today).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentEvent {
    /// Negotiation progress of a participant's transport.
    Progress {
        /// Room id.
        room: RoomId,
        /// Recipient.
        participant: ParticipantId,
        /// The transport.
        transport: TransportId,
        /// What happened.
        progress: Progress,
    },
    /// A publication's media flows: it becomes a forward stream of the room, and its
    /// publisher is told `ready` on `transport`. One event, so that the room controller
    /// has the stream before the publisher hears `ready` (a client may pass the id on at
    /// once) and still tells it `ready` before everyone `stream add`, OWT's order (its
    /// samples read the publication, set when publish resolves, in `streamadded`).
    StreamReady {
        /// Room id.
        room: RoomId,
        /// The stream.
        stream: StreamInfo,
        /// The publication's transport.
        transport: TransportId,
    },
    /// A publication ended on the agent's side (peer gone, transport failed).
    StreamEnded {
        /// Room id.
        room: RoomId,
        /// Stream id.
        stream: StreamId,
        /// Why.
        reason: String,
    },
    /// A subscription ended on the agent's side.
    SubscriptionEnded {
        /// Room id (always the subscription's room).
        room: RoomId,
        /// Owner.
        participant: ParticipantId,
        /// Its transport.
        transport: TransportId,
        /// Subscription id.
        subscription: SessionId,
        /// Why.
        reason: String,
    },
    /// A publication that never became a stream failed on the agent's side (its offer was
    /// refused); a publication that did ends with [`AgentEvent::StreamEnded`].
    PublicationFailed {
        /// Room id.
        room: RoomId,
        /// Owner.
        participant: ParticipantId,
        /// Its transport.
        transport: TransportId,
        /// Publication id.
        publication: SessionId,
        /// Why.
        reason: String,
    },
    /// A transport closed (peer gone, ICE failed, closed by request). Every session on it
    /// is over, including publications that never became streams.
    TransportClosed {
        /// Room id.
        room: RoomId,
        /// Owner.
        participant: ParticipantId,
        /// The transport.
        transport: TransportId,
        /// The publications and subscriptions that were on it.
        sessions: Vec<SessionId>,
        /// Why.
        reason: String,
    },
    /// A field of a stream's info changed on the media side (the mixer's own decisions).
    StreamUpdated {
        /// Room id.
        room: RoomId,
        /// Stream id.
        stream: StreamId,
        /// What changed.
        update: StreamUpdate,
    },
    /// A node serving some of the room's media is gone (a cluster node died): the
    /// transports listed, their sessions, and (with `views`) the room's views are over.
    /// Reported by the cluster's router, not by the node itself.
    MediaLost {
        /// Room id.
        room: RoomId,
        /// Why (which node).
        reason: String,
        /// The room's transports that were on that node.
        transports: Vec<LostTransport>,
        /// Whether the room's mixed views were made there (they start again elsewhere).
        views: bool,
    },
}

/// A participant's transport lost with its node, and the sessions it carried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostTransport {
    /// Owner.
    pub participant: ParticipantId,
    /// The transport.
    pub transport: TransportId,
    /// Its publications and subscriptions.
    pub sessions: Vec<SessionId>,
}

impl AgentEvent {
    /// The room the event belongs to.
    pub fn room(&self) -> &RoomId {
        match self {
            AgentEvent::Progress { room, .. }
            | AgentEvent::StreamReady { room, .. }
            | AgentEvent::StreamEnded { room, .. }
            | AgentEvent::SubscriptionEnded { room, .. }
            | AgentEvent::PublicationFailed { room, .. }
            | AgentEvent::TransportClosed { room, .. }
            | AgentEvent::StreamUpdated { room, .. }
            | AgentEvent::MediaLost { room, .. } => room,
        }
    }
}

/// Why an agent refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentError {
    /// The transport id is unknown to the agent.
    #[error("Transport does NOT exist: {0}")]
    NoTransport(TransportId),
    /// The session id is unknown to the agent.
    #[error("Session does NOT exist: {0}")]
    NoSession(SessionId),
    /// The stream is unknown to the agent.
    #[error("Stream does NOT exist: {0}")]
    NoStream(StreamId),
    /// The request cannot be honoured (bad SDP, unsupported codec, ...).
    #[error("{0}")]
    Rejected(String),
    /// The agent failed internally.
    #[error("media agent failure: {0}")]
    Failed(String),
}

/// Pause/resume of a publication's or subscription's tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// What to record: a stream's audio and/or video (they may come from different streams).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingSpec {
    /// `auto`, `webm`, `mkv` or `mp4`.
    pub container: String,
    /// Stream to take audio from.
    pub audio_from: Option<StreamId>,
    /// Stream to take video from.
    pub video_from: Option<StreamId>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Serialises and parses back; they must be equal.
    pub(crate) fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(v: T) {
        let text = serde_json::to_string(&v).unwrap();
        let back: T = serde_json::from_str(&text).unwrap();
        assert_eq!(back, v, "{text}");
    }

    pub(crate) fn at() -> SessionRef {
        SessionRef { room: "r".into(), participant: "p".into(), transport: "t".into(), session: "s".into() }
    }

    pub(crate) fn layout() -> Vec<LayoutEntry> {
        let region: crate::room::Region =
            serde_json::from_value(serde_json::json!({"id": "1", "area": {"left": "0", "top": "0", "width": "1/2", "height": "1"}})).unwrap();
        vec![LayoutEntry { stream: Some("s".into()), region: region.clone() }, LayoutEntry { stream: None, region }]
    }

    #[test]
    fn every_command_round_trips() {
        round_trip(PublishSpec {
            at: at(),
            tracks: vec![PublishTrack { kind: MediaKind::Video, mid: "1".into(), source: "camera".into() }],
            data: true,
            accept: Some(crate::room::MediaIn::default()),
        });
        round_trip(SubscribeSpec {
            at: at(),
            tracks: vec![SubscribeTrack { kind: MediaKind::Audio, mid: "0".into(), from: "s9".into(), layer: LayerChoice::Auto }],
            data_from: Some("s9".into()),
        });
        round_trip(TransportRef { room: "r".into(), participant: "p".into(), transport: "t".into() });
        round_trip(Signaling::Offer("v=0".into()));
        round_trip(Signaling::Candidate {
            candidate: "candidate:1 1 udp 1 127.0.0.1 9 typ host".into(),
            sdp_mid: Some("0".into()),
            sdp_mline_index: None,
        });
        round_trip(Signaling::RemovedCandidates);
        round_trip(TrackSwitch { audio: true, video: false, active: false });
        round_trip(RecordingSpec { container: "mkv".into(), audio_from: Some("a".into()), video_from: None });
        for e in
            [AgentError::NoTransport("t".into()), AgentError::NoSession("s".into()), AgentError::Rejected("x".into()), AgentError::Failed("y".into())]
        {
            round_trip(e);
        }
        round_trip(layout());
    }

    #[test]
    fn every_event_round_trips() {
        let events = vec![
            AgentEvent::Progress {
                room: "r".into(),
                participant: "p".into(),
                transport: "t".into(),
                progress: Progress::Answer { sdp: "v=0".into() },
            },
            AgentEvent::Progress { room: "r".into(), participant: "p".into(), transport: "t".into(), progress: Progress::TransportReady },
            AgentEvent::Progress {
                room: "r".into(),
                participant: "p".into(),
                transport: "t".into(),
                progress: Progress::SessionReady { session: "s".into() },
            },
            AgentEvent::StreamReady { room: "r".into(), stream: crate::stream::tests::forward(), transport: "t".into() },
            AgentEvent::StreamReady { room: "r".into(), stream: crate::stream::tests::mixed(), transport: "t".into() },
            AgentEvent::StreamEnded { room: "r".into(), stream: "s".into(), reason: "gone".into() },
            AgentEvent::SubscriptionEnded {
                room: "r".into(),
                participant: "p".into(),
                transport: "t".into(),
                subscription: "s".into(),
                reason: "x".into(),
            },
            AgentEvent::PublicationFailed {
                room: "r".into(),
                participant: "p".into(),
                transport: "t".into(),
                publication: "s".into(),
                reason: "refused".into(),
            },
            AgentEvent::TransportClosed {
                room: "r".into(),
                participant: "p".into(),
                transport: "t".into(),
                sessions: vec!["a".into(), "b".into()],
                reason: "ICE failed".into(),
            },
            AgentEvent::StreamUpdated { room: "r".into(), stream: "r-common".into(), update: StreamUpdate::Layout(layout()) },
            AgentEvent::StreamUpdated { room: "r".into(), stream: "r-common".into(), update: StreamUpdate::ActiveInput(Some("s".into())) },
            AgentEvent::MediaLost {
                room: "r".into(),
                reason: "webrtc node `n2` is gone".into(),
                transports: vec![LostTransport { participant: "p".into(), transport: "t".into(), sessions: vec!["s".into()] }],
                views: true,
            },
        ];
        for e in events {
            round_trip(e);
        }
    }
}
