//! The SFU as a [`StreamSource`] for the media nodes inside the server (mixer, recorder):
//! a tap is a [`Sink`] on a track's fan-out whose packets are marshalled as the consumer
//! reads them; a local stream is a publication without a transport whose fan-outs are fed
//! from the producer's marshalled packets. The SFU's own forwarding path (publisher →
//! fan-out → subscriber writers) does not convert anything.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;
use rtc::shared::marshal::{Marshal, Unmarshal};
use tessera_core::RoomId;
use tessera_core::agent::MediaKind;
use tessera_core::media::{CodecInfo, LocalTrack, RtpReceiver, RtpSink, StreamSource, Tap};
use tokio::sync::mpsc;
use tracing::debug;

use crate::WebrtcAgent;
use crate::forward::{Fanout, Sink};
use crate::publication::{KeyframeSource, Publication};

/// The codec as the media seam describes it.
pub(crate) fn codec_info(codec: &RTCRtpCodec, payload_type: Option<u8>) -> CodecInfo {
    CodecInfo {
        mime_type: codec.mime_type.clone(),
        clock_rate: codec.clock_rate,
        channels: codec.channels,
        fmtp: codec.sdp_fmtp_line.clone(),
        payload_type,
    }
}

/// The codec as webrtc-rs negotiates it.
pub(crate) fn rtc_codec(codec: &CodecInfo) -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: codec.mime_type.clone(),
        clock_rate: codec.clock_rate,
        channels: codec.channels,
        sdp_fmtp_line: codec.fmtp.clone(),
        ..Default::default()
    }
}

/// A tap's packets: the sink's queue, marshalled when read (in the consumer's task).
struct TapReceiver(mpsc::Receiver<rtp::Packet>);

impl RtpReceiver for TapReceiver {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        loop {
            match self.0.poll_recv(cx) {
                Poll::Ready(Some(packet)) => match packet.marshal() {
                    Ok(bytes) => return Poll::Ready(Some(bytes.freeze())),
                    Err(e) => debug!(error = %e, "cannot serialise a tapped packet"),
                },
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A local stream's track: the producer's packets go to its fan-out.
struct LocalSink(Arc<Fanout>);

impl RtpSink for LocalSink {
    fn send(&self, packet: &[u8]) {
        let mut buf = packet;
        match rtp::Packet::unmarshal(&mut buf) {
            Ok(mut p) => self.0.forward(&mut p),
            Err(e) => debug!(error = %e, "unparsable RTP from a local producer"),
        }
    }

    fn has_consumers(&self) -> bool {
        !self.0.is_empty()
    }
}

impl StreamSource for WebrtcAgent {
    fn tap(&self, stream: &str, kind: MediaKind) -> Option<Tap> {
        let p = self.publication(stream)?;
        let track = p.track(kind)?;
        let (sink, packets) = Sink::new();
        let tap = Tap { codec: codec_info(&track.codec, None), sink_id: sink.id, packets: Box::new(TapReceiver(packets)) };
        track.fanout.add(sink);
        track.request_keyframe();
        Some(tap)
    }

    fn untap(&self, stream: &str, kind: MediaKind, sink_id: u64) {
        if let Some(t) = self.publication(stream).and_then(|p| p.track(kind)) {
            t.fanout.remove(sink_id);
        }
    }

    fn request_keyframe(&self, stream: &str) {
        if let Some(p) = self.publication(stream) {
            p.request_keyframe();
        }
    }

    fn stream_room(&self, stream: &str) -> Option<RoomId> {
        self.publication(stream).map(|p| p.room.as_str().into())
    }

    fn publish_local(&self, room: &str, stream: &str, tracks: Vec<LocalTrack>) -> Vec<Arc<dyn RtpSink>> {
        let p = Arc::new(Publication::local(room, stream, self.settings.keyframe_interval));
        let sinks = tracks
            .into_iter()
            .map(|t| {
                let fanout = p.add_track(t.kind, rtc_codec(&t.codec), KeyframeSource::Local(t.on_keyframe)).fanout.clone();
                Arc::new(LocalSink(fanout)) as Arc<dyn RtpSink>
            })
            .collect();
        self.lock().publications.insert(stream.to_string(), p);
        sinks
    }

    fn unpublish_local(&self, stream: &str) {
        let p = self.lock().publications.remove(stream);
        if let Some(p) = p {
            p.end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn agent() -> Arc<WebrtcAgent> {
        let settings = crate::AgentSettings {
            bind_ips: vec![std::net::IpAddr::from([127, 0, 0, 1])],
            public_ip: None,
            port_min: 40200,
            port_max: 40210,
            keyframe_interval: Duration::from_millis(300),
            ice_disconnected_timeout: Duration::from_secs(5),
            ice_failed_timeout: Duration::from_secs(10),
            ice_tcp: false,
        };
        WebrtcAgent::new(settings).0
    }

    fn packet(seq: u16, pt: u8) -> Vec<u8> {
        let mut p = rtp::Packet::default();
        p.header.version = 2;
        p.header.sequence_number = seq;
        p.header.ssrc = 42;
        p.header.payload_type = pt;
        p.payload = Bytes::from_static(b"payload");
        p.marshal().unwrap().to_vec()
    }

    /// A local stream's packets reach a tap on it unchanged, the tap ends when the stream
    /// goes away, and the codec crosses the seam intact.
    #[tokio::test]
    async fn local_stream_packets_reach_taps() {
        let agent = agent();
        let source: Arc<dyn StreamSource> = agent.clone();
        let codec = CodecInfo { mime_type: "video/VP8".into(), clock_rate: 90000, channels: 0, fmtp: String::new(), payload_type: Some(96) };
        let sinks =
            source.publish_local("r", "r-common", vec![LocalTrack { kind: MediaKind::Video, codec: codec.clone(), on_keyframe: Arc::new(|| {}) }]);
        assert_eq!(sinks.len(), 1);
        assert!(!sinks[0].has_consumers());
        assert_eq!(source.stream_room("r-common").as_ref().map(|r| r.as_str()), Some("r"));
        assert!(source.tap("r-common", MediaKind::Audio).is_none());
        let mut tap = source.tap("r-common", MediaKind::Video).unwrap();
        assert_eq!(tap.codec, CodecInfo { payload_type: None, ..codec });
        assert!(sinks[0].has_consumers());
        sinks[0].send(&packet(7, 96));
        sinks[0].send(b"not rtp");
        assert_eq!(tap.recv().await.unwrap().to_vec(), packet(7, 96));
        source.untap("r-common", MediaKind::Video, tap.sink_id);
        assert!(!sinks[0].has_consumers());
        assert!(tap.recv().await.is_none());
        let mut tap = source.tap("r-common", MediaKind::Video).unwrap();
        source.unpublish_local("r-common");
        assert!(tap.recv().await.is_none());
        assert!(source.stream_room("r-common").is_none());
        assert_eq!(agent.stats().local_streams, 0);
    }
}
