//! A simulcast publisher for tests: one video m-line sending several RID layers (RFC 8853),
//! each a real VP8 or H.264 encoding (GStreamer) of its own solid colour and picture size, so a
//! subscriber can tell from the decoded pictures which layer reached it. Packets carry
//! the MID and RID header extensions as browsers send them; a layer can be stopped and
//! started again (as a browser does when its bandwidth drops).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, anyhow};
use bytes::Bytes;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use serde_json::json;
use tessera_webrtc_agent::feedback::is_keyframe_request;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};

pub use tessera_webrtc_agent::simulcast::vp8_keyframe_size;

use crate::media::appsink_to_channel;
use crate::peer::{Connection, h264, vp8};
use crate::signaling::Signaling;

/// One layer to send: its RID, picture size and colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpec {
    /// The RID (`q`, `h`, `f`, ...).
    pub rid: &'static str,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The solid colour of every picture.
    pub rgb: (u8, u8, u8),
    /// Send a moving zone plate at this bitrate (kbit/s) instead of the solid colour: a picture that
    /// costs what the encoder is given, for bandwidth tests.
    pub noise_kbps: Option<u32>,
}

/// Three layers, lowest first, as browsers send them: quarter, half and full size, blue,
/// green and red.
pub const THREE_LAYERS: [LayerSpec; 3] = [
    LayerSpec { rid: "q", width: 160, height: 120, rgb: (0, 0, 255), noise_kbps: None },
    LayerSpec { rid: "h", width: 320, height: 240, rgb: (0, 255, 0), noise_kbps: None },
    LayerSpec { rid: "f", width: 640, height: 480, rgb: (255, 0, 0), noise_kbps: None },
];

/// Three layers of moving pictures, each as costly as a camera's: 80, 250 and 700 kbit/s.
pub const THREE_NOISY_LAYERS: [LayerSpec; 3] = [
    LayerSpec { rid: "q", width: 160, height: 120, rgb: (0, 0, 0), noise_kbps: Some(80) },
    LayerSpec { rid: "h", width: 320, height: 240, rgb: (0, 0, 0), noise_kbps: Some(250) },
    LayerSpec { rid: "f", width: 640, height: 480, rgb: (0, 0, 0), noise_kbps: Some(700) },
];

/// The codec a [`SimulcastPublisher`] encodes its layers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCodec {
    /// VP8 (libvpx), 15-bit picture ids.
    Vp8,
    /// H.264 constrained baseline (x264), SPS and PPS before every IDR, as browsers send.
    H264,
}

impl LayerCodec {
    /// The codec each layer's coding names.
    fn rtp_codec(self) -> RTCRtpCodec {
        match self {
            LayerCodec::Vp8 => vp8(),
            LayerCodec::H264 => h264(),
        }
    }

    /// The encoder and payloader of a layer's pipeline, for `bitrate` bit/s.
    fn encoder(self, bitrate: u64) -> String {
        match self {
            LayerCodec::Vp8 => format!(
                "vp8enc deadline=1 cpu-used=8 keyframe-max-dist=60 end-usage=cbr target-bitrate={bitrate} ! \
                 rtpvp8pay pt=96 mtu=1100 picture-id-mode=15-bit"
            ),
            LayerCodec::H264 => format!(
                "x264enc tune=zerolatency speed-preset=ultrafast key-int-max=60 bitrate={} ! \
                 video/x-h264,profile=constrained-baseline ! rtph264pay pt=96 mtu=1100 config-interval=-1 aggregate-mode=zero-latency",
                bitrate / 1000
            ),
        }
    }
}

struct Layer {
    spec: LayerSpec,
    ssrc: u32,
    /// The server asked for a keyframe of this layer.
    keyframe: Arc<AtomicBool>,
    /// While true the layer sends nothing.
    stopped: Arc<AtomicBool>,
}

/// A publication of several simulcast layers.
pub struct SimulcastPublisher {
    /// Its connection.
    pub conn: Connection,
    /// The stream id.
    pub stream_id: String,
    /// The client's offer (its `a=simulcast` and `a=rid` lines).
    pub offer: String,
    /// The server's answer.
    pub answer: String,
    layers: Vec<Layer>,
    pipelines: Vec<gst::Pipeline>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for SimulcastPublisher {
    fn drop(&mut self) {
        for p in &self.pipelines {
            let _ = p.set_state(gst::State::Null);
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The id an SDP gives a header extension (`a=extmap:<id> <uri>`).
fn extmap_id(sdp: &str, uri: &str) -> Option<u8> {
    sdp.lines().filter_map(|l| l.trim().strip_prefix("a=extmap:")).find_map(|l| {
        let mut parts = l.split_whitespace();
        let id = parts.next()?.split('/').next()?.parse().ok()?;
        (parts.next() == Some(uri)).then_some(id)
    })
}

impl SimulcastPublisher {
    /// Publishes `layers` (VP8, 15 fps) on a new connection and waits until the server
    /// says the publication is ready.
    pub async fn start(sig: &mut Signaling, layers: &[LayerSpec]) -> anyhow::Result<SimulcastPublisher> {
        SimulcastPublisher::start_on(sig, &crate::peer::default_ice_ip(), layers).await
    }

    /// [`SimulcastPublisher::start`] with ICE on `ip`.
    pub async fn start_on(sig: &mut Signaling, ip: &str, layers: &[LayerSpec]) -> anyhow::Result<SimulcastPublisher> {
        SimulcastPublisher::begin(sig, ip, layers, &[], LayerCodec::Vp8).await
    }

    /// [`SimulcastPublisher::start`] in H.264.
    pub async fn start_h264(sig: &mut Signaling, layers: &[LayerSpec]) -> anyhow::Result<SimulcastPublisher> {
        SimulcastPublisher::begin(sig, &crate::peer::default_ice_ip(), layers, &[], LayerCodec::H264).await
    }

    /// [`SimulcastPublisher::start`], with the layers named in `held` declared but not sent
    /// until [`SimulcastPublisher::stop_layer`] restarts them (as a browser short of uplink
    /// starts).
    pub async fn start_holding(sig: &mut Signaling, layers: &[LayerSpec], held: &[&str]) -> anyhow::Result<SimulcastPublisher> {
        SimulcastPublisher::begin(sig, &crate::peer::default_ice_ip(), layers, held, LayerCodec::Vp8).await
    }

    async fn begin(sig: &mut Signaling, ip: &str, layers: &[LayerSpec], held: &[&str], codec: LayerCodec) -> anyhow::Result<SimulcastPublisher> {
        gst::init()?;
        let conn = Connection::with_simulcast_extensions(ip).await?;
        let layers: Vec<Layer> = layers
            .iter()
            .map(|spec| Layer {
                spec: *spec,
                ssrc: rand::random(),
                keyframe: Arc::new(AtomicBool::new(true)),
                stopped: Arc::new(AtomicBool::new(held.contains(&spec.rid))),
            })
            .collect();
        let codings = layers
            .iter()
            .map(|l| RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters { rid: l.spec.rid.into(), ssrc: Some(l.ssrc), ..Default::default() },
                codec: codec.rtp_codec(),
                ..Default::default()
            })
            .collect();
        let id: u32 = rand::random();
        let local = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            format!("simulcast-{id}"),
            format!("video-{id}"),
            "video".into(),
            RtpCodecKind::Video,
            codings,
        )));
        let as_dyn = local.clone() as Arc<dyn TrackLocal>;
        let init = RTCRtpTransceiverInit { direction: RTCRtpTransceiverDirection::Sendonly, streams: vec![], send_encodings: vec![] };
        conn.pc.add_transceiver_from_track(as_dyn.clone(), Some(init)).await?;
        let offer = conn.make_offer().await?;
        let mid = conn.mid_of_local(&as_dyn).await.ok_or_else(|| anyhow!("no mid for the video track"))?;
        let mid_ext = extmap_id(&offer, "urn:ietf:params:rtp-hdrext:sdes:mid").ok_or_else(|| anyhow!("the offer has no MID extension"))?;
        let rid_ext = extmap_id(&offer, "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id").ok_or_else(|| anyhow!("the offer has no RID extension"))?;
        let mut transport = None;
        let req = json!({"media": {"tracks": [{"type": "video", "mid": mid, "source": "camera"}]}});
        let (stream_id, answer) = crate::peer::offer_session(sig, &mut transport, "publish", req, offer.clone()).await.context("publish")?;
        conn.apply_answer(answer.clone()).await?;
        let mut conn = conn;
        conn.transport = transport;
        let mime = codec.rtp_codec().mime_type;
        let payload_type = conn.payload_type(&as_dyn, &mime).await.ok_or_else(|| anyhow!("{mime} not negotiated"))?;

        // Keyframe requests name the layer's SSRC.
        let mut tasks = Vec::new();
        let wanted: Vec<(u32, Arc<AtomicBool>)> = layers.iter().map(|l| (l.ssrc, l.keyframe.clone())).collect();
        let rtcp = local.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(ev) = rtcp.poll().await {
                if let TrackLocalEvent::OnRtcpPacket(packets) = ev {
                    for p in packets.iter().filter(|p| is_keyframe_request(p.as_ref())) {
                        for ssrc in p.destination_ssrc() {
                            if let Some((_, flag)) = wanted.iter().find(|(s, _)| *s == ssrc) {
                                flag.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
        }));
        let mut pipelines = Vec::new();
        for l in &layers {
            let LayerSpec { width, height, rgb, noise_kbps, .. } = l.spec;
            let colour = 0xFF00_0000u32 | (u32::from(rgb.0) << 16) | (u32::from(rgb.1) << 8) | u32::from(rgb.2);
            let (source, bitrate) = match noise_kbps {
                Some(kbps) => ("pattern=zone-plate kx2=20 ky2=20 kt=1".to_string(), u64::from(kbps) * 1000),
                None => {
                    (format!("pattern=solid-color foreground-color={colour}"), (u64::from(width) * u64::from(height) * 2).clamp(100_000, 1_000_000))
                }
            };
            let encode = codec.encoder(bitrate);
            let desc = format!(
                "videotestsrc is-live=true {source} ! capsfilter name=size caps=video/x-raw,width={width},height={height},framerate=15/1 ! \
                 videoconvert ! {encode} ! appsink name=v sync=false",
            );
            let pipeline = gst::parse::launch(&desc)?.downcast::<gst::Pipeline>().map_err(|_| anyhow!("not a pipeline"))?;
            let sink = pipeline.by_name("v").ok_or_else(|| anyhow!("no appsink"))?;
            let appsink = sink.clone().downcast::<gst_app::AppSink>().map_err(|_| anyhow!("not an appsink"))?;
            let mut packets = appsink_to_channel(appsink);
            pipeline.set_state(gst::State::Playing)?;
            pipelines.push(pipeline);
            let (track, ssrc, keyframe, stopped) = (local.clone(), l.ssrc, l.keyframe.clone(), l.stopped.clone());
            let (mid, rid) = (Bytes::from(mid.clone()), Bytes::from_static(l.spec.rid.as_bytes()));
            tasks.push(tokio::spawn(async move {
                while let Some(mut packet) = packets.recv().await {
                    if keyframe.swap(false, Ordering::Relaxed) {
                        let s = gst::Structure::builder("GstForceKeyUnit").field("all-headers", true).build();
                        sink.send_event(gst::event::CustomUpstream::new(s));
                    }
                    if stopped.load(Ordering::Relaxed) {
                        continue;
                    }
                    packet.header.ssrc = ssrc;
                    packet.header.payload_type = payload_type;
                    if packet.header.set_extension(mid_ext, mid.clone()).is_err() || packet.header.set_extension(rid_ext, rid.clone()).is_err() {
                        continue;
                    }
                    let _ = track.write_rtp(packet).await;
                }
            }));
        }
        let publisher = SimulcastPublisher { conn, stream_id, offer, answer, layers, pipelines, tasks };
        publisher.conn.wait_ready(sig, &publisher.stream_id, std::time::Duration::from_secs(10)).await?;
        Ok(publisher)
    }

    /// Changes layer `rid`'s picture size from its next frame on (as a browser scales a
    /// layer down when its CPU or uplink is short), starting with a keyframe.
    pub fn resize(&self, rid: &str, width: u32, height: u32) -> anyhow::Result<()> {
        let i = self.layers.iter().position(|l| l.spec.rid == rid).ok_or_else(|| anyhow!("no layer {rid}"))?;
        let filter = self.pipelines.get(i).and_then(|p| p.by_name("size")).ok_or_else(|| anyhow!("no size filter"))?;
        let caps = gst::Caps::builder("video/x-raw")
            .field("width", width as i32)
            .field("height", height as i32)
            .field("framerate", gst::Fraction::new(15, 1))
            .build();
        filter.set_property("caps", caps);
        if let Some(l) = self.layers.get(i) {
            l.keyframe.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Stops (`true`) or restarts sending layer `rid`; a restart begins with a keyframe.
    pub fn stop_layer(&self, rid: &str, stop: bool) {
        for l in self.layers.iter().filter(|l| l.spec.rid == rid) {
            if !stop {
                l.keyframe.store(true, Ordering::Relaxed);
            }
            l.stopped.store(stop, Ordering::Relaxed);
        }
    }
}
