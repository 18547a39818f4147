//! Streams of a room as the room controller and the media nodes exchange them: typed,
//! serialisable, and free of OWT's wire shape, which only the portal builds
//! (`portal::wire`). A forward stream is one publisher's media relayed by the SFU; a mixed
//! stream is a view of the room composed by the mixer.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::agent::MediaKind;
use crate::room::{AudioFormat, Region, VideoFormat, VideoParameters};
use crate::typed_ids::{ParticipantId, StreamId, ViewLabel};

/// One stream of a room.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// Stream id.
    pub id: StreamId,
    /// Forward or mixed, with what only that kind has.
    pub kind: StreamKind,
    /// Its tracks, audio first when both exist.
    pub tracks: Vec<TrackInfo>,
    /// Whether it carries a data channel (forward streams published with `data: true`).
    pub data: bool,
}

/// What kind of stream, with its kind's details.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    /// One publisher's media, relayed.
    Forward(ForwardInfo),
    /// A view's composition.
    Mixed(MixedInfo),
}

/// Details of a forward stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardInfo {
    /// The publishing participant.
    pub owner: ParticipantId,
    /// The views this stream is mixed into.
    pub in_views: Vec<ViewLabel>,
    /// The publisher's `attributes` from `publish` (free-form, passed through).
    pub attributes: Value,
}

/// Details of a mixed stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixedInfo {
    /// The view it shows.
    pub label: ViewLabel,
    /// Which stream is in which region.
    pub layout: Vec<LayoutEntry>,
    /// The loudest input (voice activity), if any.
    pub active_input: Option<StreamId>,
}

/// One region of a view's layout and the stream placed in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayoutEntry {
    /// The stream shown there, if any.
    pub stream: Option<StreamId>,
    /// The region (OWT's `{id, shape, area}` in fractions of the view).
    pub region: Region,
}

/// Whether a track is being forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackStatus {
    /// Flowing.
    Active,
    /// Paused by its publisher (`stream-control` pause) or by the server.
    Inactive,
}

/// The encoding of a track.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackFormat {
    /// An audio codec.
    Audio(AudioFormat),
    /// A video codec.
    Video(VideoFormat),
}

/// One track of a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrackInfo {
    /// Audio or video.
    pub kind: MediaKind,
    /// `mic`, `camera`, `screen-cast`, ... or `mixed`.
    pub source: String,
    /// The publisher's m-line id (forward streams).
    pub mid: Option<String>,
    /// The codec.
    pub format: TrackFormat,
    /// Encoding parameters, when the server chose them (mixed video).
    pub parameters: Option<VideoParameters>,
    /// Forwarded or paused.
    pub status: TrackStatus,
    /// The simulcast layer's RID (one track per layer of a layered video).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rid: Option<String>,
}

impl StreamInfo {
    /// The owner of a forward stream.
    pub fn owner(&self) -> Option<&ParticipantId> {
        match &self.kind {
            StreamKind::Forward(f) => Some(&f.owner),
            StreamKind::Mixed(_) => None,
        }
    }

    /// Whether this is a forward stream.
    pub fn is_forward(&self) -> bool {
        matches!(self.kind, StreamKind::Forward(_))
    }

    /// Whether the stream has a track of `kind`.
    pub fn has(&self, kind: MediaKind) -> bool {
        self.tracks.iter().any(|t| t.kind == kind)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::room::Resolution;

    pub(crate) fn forward() -> StreamInfo {
        StreamInfo {
            id: "s1".into(),
            kind: StreamKind::Forward(ForwardInfo {
                owner: "p1".into(),
                in_views: vec!["common".into()],
                attributes: serde_json::json!({"name": "cam"}),
            }),
            tracks: vec![
                TrackInfo {
                    kind: MediaKind::Audio,
                    source: "mic".into(),
                    mid: Some("0".into()),
                    format: TrackFormat::Audio(AudioFormat { codec: "opus".into(), sample_rate: Some(48000), channel_num: Some(2) }),
                    parameters: None,
                    status: TrackStatus::Active,
                    rid: None,
                },
                TrackInfo {
                    kind: MediaKind::Video,
                    source: "camera".into(),
                    mid: Some("1".into()),
                    format: TrackFormat::Video(VideoFormat { codec: "h264".into(), profile: Some("CB".into()) }),
                    parameters: None,
                    status: TrackStatus::Inactive,
                    rid: None,
                },
            ],
            data: true,
        }
    }

    pub(crate) fn mixed() -> StreamInfo {
        StreamInfo {
            id: "r-common".into(),
            kind: StreamKind::Mixed(MixedInfo {
                label: "common".into(),
                layout: vec![LayoutEntry {
                    stream: Some("s1".into()),
                    region: serde_json::from_value(serde_json::json!({"id": "1", "area": {"left": "0", "top": "0", "width": "1", "height": "1"}}))
                        .unwrap(),
                }],
                active_input: None,
            }),
            tracks: vec![TrackInfo {
                kind: MediaKind::Video,
                source: "mixed".into(),
                mid: None,
                format: TrackFormat::Video(VideoFormat { codec: "vp8".into(), profile: None }),
                parameters: Some(VideoParameters {
                    resolution: Resolution { width: 640, height: 480 },
                    framerate: 24,
                    bitrate: Some(800),
                    key_frame_interval: 100,
                }),
                status: TrackStatus::Active,
                rid: None,
            }],
            data: false,
        }
    }

    #[test]
    fn stream_info_round_trips() {
        for s in [forward(), mixed()] {
            let text = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<StreamInfo>(&text).unwrap(), s, "{text}");
        }
        assert_eq!(forward().owner().map(|o| o.as_str()), Some("p1"));
        assert!(mixed().owner().is_none());
        assert!(forward().has(MediaKind::Audio) && !mixed().has(MediaKind::Audio));
    }
}
