//! The media seam between the stream producers (the webrtc-agent SFU) and the media
//! nodes that consume or produce streams inside the server (the mixer, the recorder).
//!
//! A consumer takes a stream's track through a [`StreamSource`]: it [`StreamSource::tap`]s
//! it and reads marshalled RTP packets (`Bytes`, header extensions stripped, the
//! producer's payload type) until the stream ends or it [`StreamSource::untap`]s. A
//! producer registers a stream of its own with [`StreamSource::publish_local`] and pushes
//! marshalled RTP into the returned [`RtpSink`]s. In one process the SFU's fan-outs
//! implement this; a cluster puts an RTP/RTCP relay behind the same trait, so everything
//! here is free of WebRTC types and the descriptions ([`CodecInfo`]) are serialisable.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::agent::{LayerChoice, MediaKind};
use crate::typed_ids::RoomId;

/// The RTP encoding of a track.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodecInfo {
    /// `audio/opus`, `video/VP8`, `video/H264`, ... (case as negotiated).
    pub mime_type: String,
    /// RTP clock rate in Hz.
    pub clock_rate: u32,
    /// Audio channels (0 for video).
    pub channels: u16,
    /// The SDP `a=fmtp` parameters, empty when none.
    pub fmtp: String,
    /// The payload type the packets carry, when the producer fixed one (a publisher's
    /// packets carry the type negotiated on its own connection: consumers that need a
    /// fixed one rewrite it with [`with_payload_type`]).
    pub payload_type: Option<u8>,
}

impl CodecInfo {
    /// The MIME type in lower case (`video/vp8`).
    pub fn mime_lower(&self) -> String {
        self.mime_type.to_ascii_lowercase()
    }
}

/// The receiving end of a tap: marshalled RTP packets, in arrival order, until the
/// stream's track ends or the tap is removed (then `None`).
pub trait RtpReceiver: Send {
    /// Polls for the next packet.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>>;
}

/// A consumer's tap on one track of a stream.
pub struct Tap {
    /// The track's codec.
    pub codec: CodecInfo,
    /// Id to remove the tap with [`StreamSource::untap`].
    pub sink_id: u64,
    /// The packets.
    pub packets: Box<dyn RtpReceiver>,
}

impl Tap {
    /// The next packet; `None` once the track ended or the tap was removed.
    pub async fn recv(&mut self) -> Option<Bytes> {
        poll_fn(|cx| self.packets.poll_recv(cx)).await
    }
}

/// Where a producer inside the server pushes one track of its stream.
pub trait RtpSink: Send + Sync {
    /// Delivers one marshalled RTP packet to the track's consumers (dropped when none).
    fn send(&self, packet: &[u8]);
    /// Whether anyone consumes the track (a subscriber, a recorder, ...).
    fn has_consumers(&self) -> bool;
}

/// A track of a stream produced inside the server (a mixed view).
pub struct LocalTrack {
    /// Audio or video.
    pub kind: MediaKind,
    /// Its RTP codec.
    pub codec: CodecInfo,
    /// Called (throttled by the source) when a consumer needs a keyframe.
    pub on_keyframe: Arc<dyn Fn() + Send + Sync>,
    /// A simulcast layer's RID: the video tracks with one are the layers of one layered
    /// video, in the order given (a stream relayed from another node with its layers).
    pub rid: Option<String>,
    /// Told what this node's consumers need of the track (called on a media thread: it
    /// must not block), so that its producer sends only that; `None` to send regardless.
    pub on_need: Option<NeedFn>,
}

/// What the consumers on a node need of a track produced on another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// Whether anyone needs this layer of a layered video now (a layer nobody needs may be
    /// paused at its publisher).
    Layer(bool),
    /// The layer the consumers of a layered video relayed one layer at a time agree on.
    Choice(LayerChoice),
}

/// Where a track's consumers tell its producer what they [`Need`].
pub type NeedFn = Arc<dyn Fn(Need) + Send + Sync>;

/// Streams as the media nodes inside the server take and offer them.
pub trait StreamSource: Send + Sync {
    /// Taps a stream's track (and asks its producer for a keyframe); `None` when the
    /// stream or the track does not exist.
    fn tap(&self, stream: &str, kind: MediaKind) -> Option<Tap>;
    /// Removes a tap; its receiver ends.
    fn untap(&self, stream: &str, kind: MediaKind, sink_id: u64);
    /// Changes which simulcast layer a tap on a layered video reads (it starts on the
    /// highest flowing one, as a recording wants); sources and streams without layers
    /// ignore it.
    fn set_tap_layer(&self, _stream: &str, _kind: MediaKind, _sink_id: u64, _layer: LayerChoice) {}
    /// Asks the producer of a stream's video for a keyframe (throttled by the source).
    fn request_keyframe(&self, stream: &str);
    /// The RIDs of a stream's simulcast video layers, in the publisher's order; empty when
    /// its video has one encoding (or the source does not tell layers apart).
    fn layers(&self, _stream: &str) -> Vec<String> {
        Vec::new()
    }
    /// Taps one simulcast layer of a stream's video as it arrives, never switching (a relay
    /// to another node carries each layer on its own); `None` without such a layer.
    fn tap_layer(&self, _stream: &str, _rid: &str) -> Option<Tap> {
        None
    }
    /// Asks for a keyframe of one layer of a stream's video (all of them where the source
    /// does not tell layers apart).
    fn request_layer_keyframe(&self, stream: &str, _rid: &str) {
        self.request_keyframe(stream);
    }
    /// Whether [`StreamSource::publish_local`] takes layered videos (tracks with a `rid`)
    /// and lets each consumer choose its layer; a source that does not gets the top layer only.
    fn takes_layers(&self) -> bool {
        false
    }
    /// Stops (`idle`) or starts again a tap's packets; an idle tap does not count as a
    /// reader of its track (a relayed layer nobody on the importing node takes, so that
    /// the publisher may pause it). Sources that cannot ignore it.
    fn set_tap_idle(&self, _stream: &str, _kind: MediaKind, _sink_id: u64, _idle: bool) {}
    /// The room a stream (forward or produced inside the server) belongs to.
    fn stream_room(&self, stream: &str) -> Option<RoomId>;
    /// Registers a stream produced inside the server so clients and other media nodes
    /// can take it like a forward stream. Returns one sink per track, in order.
    fn publish_local(&self, room: &str, stream: &str, tracks: Vec<LocalTrack>) -> Vec<Arc<dyn RtpSink>>;
    /// Removes a stream added by [`StreamSource::publish_local`]; its consumers stop receiving.
    fn unpublish_local(&self, stream: &str);
}

/// Why a stream produced on another node could not be brought to this one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// No node of the cluster offers the stream.
    #[error("stream {0} is on no node of the cluster")]
    NotFound(String),
    /// A node has it but the relay could not be set up.
    #[error("relaying stream {stream}: {reason}")]
    Failed {
        /// The stream.
        stream: String,
        /// Why.
        reason: String,
    },
}

/// Brings streams produced on other nodes into this node's [`StreamSource`] (a cluster's
/// RTP relay), so consumers here take them like local ones. A node without a cluster
/// has none: every stream is local there.
#[async_trait::async_trait]
pub trait StreamImporter: Send + Sync {
    /// Makes `stream` of `room` available in this node's source; `Ok` at once when it
    /// already is. The stream stays while it has consumers here (and a little after).
    async fn import(&self, room: &RoomId, stream: &str) -> Result<(), ImportError>;
}

/// Makes sure `stream` can be tapped from `source`: local, or brought by `importer`.
pub async fn ensure_stream(source: &dyn StreamSource, importer: Option<&dyn StreamImporter>, room: &RoomId, stream: &str) -> Result<(), ImportError> {
    if source.stream_room(stream).is_some() {
        return Ok(());
    }
    match importer {
        Some(i) => i.import(room, stream).await,
        None => Err(ImportError::NotFound(stream.to_string())),
    }
}

/// A marshalled RTP packet with its payload type replaced (without copying when the
/// packet's buffer is not shared). Packets too short to be RTP are returned unchanged.
pub fn with_payload_type(packet: Bytes, payload_type: u8) -> BytesMut {
    let mut buf = packet.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..]));
    if let Some(b) = buf.get_mut(1) {
        *b = (*b & 0x80) | (payload_type & 0x7F);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_info_round_trips() {
        let c = CodecInfo {
            mime_type: "video/H264".into(),
            clock_rate: 90000,
            channels: 0,
            fmtp: "packetization-mode=1;profile-level-id=42e01f".into(),
            payload_type: Some(96),
        };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<CodecInfo>(&text).unwrap(), c);
        assert_eq!(c.mime_lower(), "video/h264");
    }

    #[test]
    fn payload_type_is_replaced_keeping_the_marker() {
        // V=2, no padding/extension/CSRC; marker set, PT 100; seq 1.
        let packet = Bytes::from(vec![0x80, 0x80 | 100, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0xAB]);
        let out = with_payload_type(packet.clone(), 96);
        assert_eq!(&out[..], &[0x80, 0x80 | 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0xAB][..]);
        // A shared buffer is copied, the original untouched.
        let shared = packet.clone();
        let out = with_payload_type(packet, 111);
        assert_eq!(out[1], 0x80 | 111);
        assert_eq!(shared[1], 0x80 | 100);
        assert!(with_payload_type(Bytes::new(), 96).is_empty());
    }

    #[test]
    fn tap_reads_its_receiver_until_it_ends() {
        struct Two(Vec<Bytes>);
        impl RtpReceiver for Two {
            fn poll_recv(&mut self, _: &mut Context<'_>) -> Poll<Option<Bytes>> {
                Poll::Ready(self.0.pop())
            }
        }
        let mut tap = Tap {
            codec: CodecInfo { mime_type: "audio/opus".into(), clock_rate: 48000, channels: 2, fmtp: String::new(), payload_type: None },
            sink_id: 1,
            packets: Box::new(Two(vec![Bytes::from_static(b"b"), Bytes::from_static(b"a")])),
        };
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut next = || {
            let mut f = std::pin::pin!(tap.recv());
            match f.as_mut().poll(&mut cx) {
                Poll::Ready(p) => p,
                Poll::Pending => panic!("pending"),
            }
        };
        assert_eq!(next().as_deref(), Some(&b"a"[..]));
        assert_eq!(next().as_deref(), Some(&b"b"[..]));
        assert_eq!(next(), None);
    }
}
