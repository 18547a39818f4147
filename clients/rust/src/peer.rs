//! WebRTC publishers and subscribers on `webrtc` 0.21, speaking to Tessera through
//! [`Signaling`]. ICE is bound to 127.0.0.1 (tests and benchmarks stay on loopback).
//!
//! The publisher sends synthetic media: one RTP packet per video frame whose payload
//! starts with a VP8 payload descriptor and a VP8 frame tag (keyframe or not, so
//! receivers can tell), followed by a [`Marker`]; audio packets carry a marker too. A
//! keyframe is sent first and whenever the server asks for one (PLI/FIR).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::{Registry, Slot};
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use rtc::shared::marshal::MarshalSize;
use serde_json::{Value, json};
use tessera_webrtc_agent::feedback::{KeyframeRequestTap, is_keyframe_request};
use tessera_webrtc_agent::simulcast::VideoCodec;
use tokio::sync::{mpsc, watch};
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder, RTCIceGatheringState, RTCIceServer,
    RTCIceTransportPolicy, RTCSessionDescription, SettingEngineBuilder, register_default_interceptors,
};

use crate::arrival::{Arrivals, StampingRuntime};
use crate::signaling::Signaling;

/// A publisher answers at most one keyframe request per this interval, as a browser's
/// encoder does (libwebrtc's `EncoderRtcpFeedback` ignores a PLI or FIR less than 300 ms
/// after the last one it took), so servers are measured against the publishers they meet.
pub const KEYFRAME_REQUEST_MIN_INTERVAL: Duration = Duration::from_millis(300);

/// Largest synthetic video payload: bigger frames are split over several packets.
pub const MAX_VIDEO_PAYLOAD: usize = 1100;

/// Bytes that start every marker, so receivers can find it.
pub const MAGIC: [u8; 4] = *b"TSRA";

/// What a synthetic packet carries after its codec header: who sent it, its index, and
/// when (microseconds since the Unix epoch, same machine clock as the receiver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// Sender's tag (e.g. publisher index).
    pub tag: u32,
    /// Packet index per track, from 0.
    pub index: u64,
    /// Send time in µs since the epoch.
    pub sent_us: u64,
}

impl Marker {
    /// Encoded size.
    pub const LEN: usize = 24;

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.tag.to_be_bytes());
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.sent_us.to_be_bytes());
    }

    /// Finds and decodes a marker in a payload.
    pub fn find(payload: &[u8]) -> Option<Marker> {
        let at = payload.windows(4).position(|w| w == MAGIC)?;
        let b = payload.get(at..at + Self::LEN)?;
        Some(Marker {
            tag: u32::from_be_bytes(b[4..8].try_into().ok()?),
            index: u64::from_be_bytes(b[8..16].try_into().ok()?),
            sent_us: u64::from_be_bytes(b[16..24].try_into().ok()?),
        })
    }
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Whether a VP8 RTP payload starts a keyframe (S bit, partition 0, then the frame
/// header's P bit clear behind any descriptor form, RFC 7741 §4.2): the server's own test.
pub fn is_vp8_keyframe(payload: &[u8]) -> bool {
    VideoCodec::Vp8.starts_keyframe(payload)
}

enum ConnEvent {
    Track(Arc<dyn TrackRemote>),
}

struct Handler {
    events: mpsc::UnboundedSender<ConnEvent>,
    gathering: watch::Sender<bool>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathering.send(true);
        }
    }
    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let _ = self.events.send(ConnEvent::Track(track));
    }
}

/// One RTCPeerConnection to the server (one transport).
pub struct Connection {
    /// The connection.
    pub pc: Arc<dyn PeerConnection>,
    /// Every media packet received on this connection, in arrival order.
    pub received: Arc<Mutex<Vec<Received>>>,
    gathered: watch::Receiver<bool>,
    /// The server's transport id, once known.
    pub transport: Option<String>,
}

/// The address [`Connection::new`] binds ICE to (127.0.0.1 unless set).
static DEFAULT_ICE_IP: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);

/// Makes every later [`Connection::new`] of this process bind ICE to `ip` (a
/// loopback-range address: a test whose servers are in other network namespaces reaches
/// them from its own address on a bridge, not from 127.0.0.1, which each namespace has).
pub fn set_default_ice_ip(ip: &str) {
    if let Ok(mut d) = DEFAULT_ICE_IP.write() {
        *d = Some(ip.to_string());
    }
}

/// The address connections bind ICE to unless told otherwise.
pub(crate) fn default_ice_ip() -> String {
    DEFAULT_ICE_IP.read().ok().and_then(|d| d.clone()).unwrap_or_else(|| "127.0.0.1".to_string())
}

impl Connection {
    /// A connection with ICE on 127.0.0.1 (or the address [`set_default_ice_ip`] set).
    pub async fn new() -> anyhow::Result<Connection> {
        Self::new_on(&default_ice_ip()).await
    }

    /// A connection with ICE on `ip` (a loopback-range address: tests and benchmarks
    /// never leave 127.0.0.0/8).
    pub async fn new_on(ip: &str) -> anyhow::Result<Connection> {
        Self::build(ip, None, None).await
    }

    /// A connection whose media engine also offers the MID and RID header extensions a
    /// simulcast sender needs (RFC 8852).
    pub async fn with_simulcast_extensions(ip: &str) -> anyhow::Result<Connection> {
        Self::build_with(ip, None, None, true, None).await
    }

    /// A connection whose media engine knows only Opus and VP8, as a client without H.264
    /// (or any other video codec) offers.
    pub async fn vp8_only(ip: &str) -> anyhow::Result<Connection> {
        Self::build_with(ip, None, None, false, Some(vec![(opus(), 111, RtpCodecKind::Audio), (vp8(), 96, RtpCodecKind::Video)])).await
    }

    /// A connection with ICE on `ip` that may only use relayed candidates, from the TURN
    /// servers in a login result's `iceServers` (`iceTransportPolicy: 'relay'`).
    pub async fn relay_only(ip: &str, ice_servers: &Value) -> anyhow::Result<Connection> {
        let servers = ice_servers
            .as_array()
            .ok_or_else(|| anyhow!("iceServers is not an array"))?
            .iter()
            .map(|s| RTCIceServer {
                urls: s["urls"].as_array().map(|u| u.iter().filter_map(|u| u.as_str().map(str::to_string)).collect()).unwrap_or_default(),
                username: s["username"].as_str().unwrap_or_default().to_string(),
                credential: s["credential"].as_str().unwrap_or_default().to_string(),
            })
            .collect();
        Self::build(ip, None, Some(servers)).await
    }

    /// Like [`Connection::new_on`], offering only the SRTP profile every server has
    /// (`AES128_CM_HMAC_SHA1_80`), so benchmarks compare servers on the same cipher.
    pub async fn new_on_baseline_srtp(ip: &str) -> anyhow::Result<Connection> {
        Self::build(ip, Some(vec![SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80]), None).await
    }

    async fn build(ip: &str, srtp: Option<Vec<SrtpProtectionProfile>>, relay: Option<Vec<RTCIceServer>>) -> anyhow::Result<Connection> {
        Self::build_with(ip, srtp, relay, false, None).await
    }

    async fn build_with(
        ip: &str,
        srtp: Option<Vec<SrtpProtectionProfile>>,
        relay: Option<Vec<RTCIceServer>>,
        simulcast: bool,
        codecs: Option<Vec<(RTCRtpCodec, u8, RtpCodecKind)>>,
    ) -> anyhow::Result<Connection> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (gtx, grx) = watch::channel(false);
        let arrivals = Arc::new(Arrivals::default());
        let mut media = MediaEngine::default();
        match codecs {
            None => media.register_default_codecs()?,
            Some(codecs) => {
                for (rtp_codec, payload_type, kind) in codecs {
                    media.register_codec(RTCRtpCodecParameters { rtp_codec, payload_type }, kind)?;
                }
            }
        }
        if simulcast {
            rtc::peer_connection::configuration::interceptor_registry::configure_simulcast_extension_headers(&mut media)?;
        }
        // Browsers give up on a lost packet after a few requests; webrtc-rs's generator
        // would ask for it as long as it stays in its window.
        let registry = register_default_interceptors(Registry::new(), &mut media)?
            .with(Slot::NackGenerator, rtc::interceptor::NackGeneratorBuilder::new().with_max_nacks_per_packet(5).build())
            .with(Slot::from(14_000), KeyframeRequestTap::default())
            .with(Slot::from(14_100), crate::loss::KeyframeOnLoss::default());
        // No mDNS: candidates are plain loopback addresses, and joining the multicast group
        // fails in a namespace that holds only loopback.
        let mut settings = SettingEngineBuilder::new()
            .with_multicast_dns_mode(MulticastDnsMode::Disabled)
            // Checks every 50 ms, as a browser paces them (libwebrtc: 48 ms) rather than
            // webrtc-rs's 200 ms, which against an ICE-lite server (the client checks and
            // nominates alone) held every connection back by a whole interval; 28 attempts
            // keep webrtc-rs's 1.4 s before a pair fails.
            .with_ice_connection_attempts(Some(Duration::from_millis(50)), Some(28));
        if let Some(profiles) = srtp {
            settings = settings.with_srtp_protection_profiles(profiles);
        }
        let settings = settings.build();
        let configuration = match relay {
            Some(servers) => RTCConfigurationBuilder::new().with_ice_servers(servers).with_ice_transport_policy(RTCIceTransportPolicy::Relay).build(),
            None => RTCConfigurationBuilder::new().build(),
        };
        let pc = PeerConnectionBuilder::new()
            .with_configuration(configuration)
            .with_media_engine(media)
            .with_setting_engine(settings)
            .with_interceptor_registry(registry)
            .with_handler(Arc::new(Handler { events: tx, gathering: gtx }) as Arc<dyn PeerConnectionEventHandler>)
            .with_udp_addrs(vec![format!("{ip}:0")])
            .with_runtime(Arc::new(StampingRuntime::new(arrivals.clone())))
            .build()
            .await?;
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        tokio::spawn(collect_tracks(rx, received.clone(), arrivals));
        Ok(Connection { pc: Arc::new(pc), received, gathered: grx, transport: None })
    }

    /// Subscribes to `stream` on this connection (renegotiating it if it already carries
    /// sessions, as the OWT JS SDK does). Returns the subscription id.
    pub async fn subscribe(&mut self, sig: &mut Signaling, stream: &str, audio: bool, video: bool, data: bool) -> anyhow::Result<String> {
        self.subscribe_with(sig, stream, audio, video, data, Value::Null).await
    }

    /// Like [`Connection::subscribe`], `video` adding its fields to the video track's
    /// request (`{"from": "<a layer's track id>"}`, `{"parameters": {...}}`).
    pub async fn subscribe_with(
        &mut self,
        sig: &mut Signaling,
        stream: &str,
        audio: bool,
        video: bool,
        data: bool,
        video_fields: Value,
    ) -> anyhow::Result<String> {
        let before = self.pc.get_transceivers().await.len();
        let mut kinds = Vec::new();
        if audio {
            kinds.push(RtpCodecKind::Audio);
        }
        if video {
            kinds.push(RtpCodecKind::Video);
        }
        for k in &kinds {
            let init = RTCRtpTransceiverInit { direction: RTCRtpTransceiverDirection::Recvonly, streams: vec![], send_encodings: vec![] };
            self.pc.add_transceiver_from_kind(*k, Some(init)).await?;
        }
        let offer = self.make_offer().await?;
        let mut tracks = Vec::new();
        let transceivers = self.pc.get_transceivers().await;
        for (t, k) in transceivers.iter().skip(before).zip(&kinds) {
            let mid = t.mid().await.ok().flatten().ok_or_else(|| anyhow!("transceiver without mid"))?;
            let kind = if *k == RtpCodecKind::Audio { "audio" } else { "video" };
            let mut track = json!({"type": kind, "mid": mid, "from": stream});
            if let (true, Some(fields), Some(t)) = (kind == "video", video_fields.as_object(), track.as_object_mut()) {
                t.extend(fields.clone());
            }
            tracks.push(track);
        }
        let mut req = json!({"media": {"tracks": tracks}});
        if data {
            req["data"] = json!({"from": stream});
        }
        self.negotiate(sig, "subscribe", req, offer).await.context("subscribe")
    }

    /// Offers the current transceivers: sends `request` (publish/subscribe) with the
    /// transport id filled in, then the offer by `soac`, applies the answer and waits for
    /// the session's `ready`. Returns the session id.
    pub async fn negotiate(&mut self, sig: &mut Signaling, request: &str, data: Value, offer_sdp: String) -> anyhow::Result<String> {
        let session = self.exchange(sig, request, data, offer_sdp).await?;
        self.wait_ready(sig, &session, Duration::from_secs(10)).await?;
        Ok(session)
    }

    /// Sends the request and the offer and applies the answer; does not wait for `ready`.
    pub async fn exchange(&mut self, sig: &mut Signaling, request: &str, data: Value, offer_sdp: String) -> anyhow::Result<String> {
        let (session, answer) = offer_session(sig, &mut self.transport, request, data, offer_sdp).await?;
        self.pc.set_remote_description(RTCSessionDescription::answer(answer)?).await?;
        Ok(session)
    }

    /// Waits for the session's `ready` progress (or fails on its `error`).
    pub async fn wait_ready(&self, sig: &mut Signaling, session: &str, timeout: Duration) -> anyhow::Result<()> {
        session_ready(sig, self.transport.as_deref().unwrap_or_default(), session, timeout).await
    }

    /// Creates and applies an offer for the current transceivers, waiting for ICE
    /// gathering; returns its SDP. Mids are assigned from here on.
    pub async fn make_offer(&self) -> anyhow::Result<String> {
        let offer = self.pc.create_offer(None).await?;
        self.pc.set_local_description(offer).await?;
        let mut g = self.gathered.clone();
        let _ = tokio::time::timeout(Duration::from_secs(3), g.wait_for(|d| *d)).await;
        Ok(self.pc.local_description().await.ok_or_else(|| anyhow!("no local offer"))?.sdp)
    }

    /// Applies a server's answer to this connection's offer.
    pub async fn apply_answer(&self, answer_sdp: String) -> anyhow::Result<()> {
        self.pc.set_remote_description(RTCSessionDescription::answer(answer_sdp)?).await?;
        Ok(())
    }

    /// Applies a server's offer (servers that offer, like Janus subscriptions) and returns
    /// the answer, with every local candidate gathered (no trickle).
    pub async fn answer(&self, offer_sdp: String) -> anyhow::Result<String> {
        self.pc.set_remote_description(RTCSessionDescription::offer(offer_sdp)?).await?;
        let answer = self.pc.create_answer(None).await?;
        self.pc.set_local_description(answer).await?;
        let mut g = self.gathered.clone();
        let _ = tokio::time::timeout(Duration::from_secs(3), g.wait_for(|d| *d)).await;
        Ok(self.pc.local_description().await.ok_or_else(|| anyhow!("no local answer"))?.sdp)
    }

    /// The mid of the transceiver sending `track`.
    pub async fn mid_of_local(&self, track: &Arc<dyn TrackLocal>) -> Option<String> {
        for t in self.pc.get_transceivers().await {
            if let Ok(Some(s)) = t.sender().await
                && std::ptr::addr_eq(Arc::as_ptr(s.track()), Arc::as_ptr(track))
            {
                return t.mid().await.ok().flatten();
            }
        }
        None
    }

    /// The payload type negotiated for `mime` on the transceiver sending `track`.
    pub async fn payload_type(&self, track: &Arc<dyn TrackLocal>, mime: &str) -> Option<u8> {
        for s in self.pc.get_senders().await {
            if std::ptr::addr_eq(Arc::as_ptr(s.track()), Arc::as_ptr(track)) {
                let params = s.get_parameters().await.ok()?;
                return params.rtp_parameters.codecs.iter().find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime)).map(|c| c.payload_type);
            }
        }
        None
    }

    /// Closes the connection.
    pub async fn close(&self) {
        let _ = self.pc.close().await;
    }
}

/// The Client-Portal offer exchange: sends `request` (publish/subscribe) with the transport
/// id filled in (`transport`, updated from the ack), then the offer by `soac`, and waits
/// for the server's answer. Returns the session id and the answer SDP.
pub async fn offer_session(
    sig: &mut Signaling,
    transport: &mut Option<String>,
    request: &str,
    mut data: Value,
    offer_sdp: String,
) -> anyhow::Result<(String, String)> {
    let mut t = json!({"type": "webrtc"});
    if let Some(id) = transport.as_deref() {
        t["id"] = json!(id);
    }
    data["transport"] = t;
    let ack = sig.ok(request, Some(data)).await?;
    let session = ack["id"].as_str().ok_or_else(|| anyhow!("{request} ack without id: {ack}"))?.to_string();
    let id = ack["transportId"].as_str().ok_or_else(|| anyhow!("{request} ack without transportId"))?.to_string();
    *transport = Some(id.clone());
    sig.ok("soac", Some(json!({"id": id, "signaling": {"type": "offer", "sdp": offer_sdp}}))).await?;
    let answer = sig
        .wait_for("answer", Duration::from_secs(10), |n| {
            n.event == "progress" && n.data["id"] == id.as_str() && n.data["status"] == "soac" && n.data["data"]["type"] == "answer"
        })
        .await?;
    let sdp = answer.data["data"]["sdp"].as_str().ok_or_else(|| anyhow!("answer without sdp"))?.to_string();
    Ok((session, sdp))
}

/// Waits for a session's `ready` progress on `transport` (or fails on its `error`).
pub async fn session_ready(sig: &mut Signaling, transport: &str, session: &str, timeout: Duration) -> anyhow::Result<()> {
    sig.wait_for("session ready", timeout, |n| {
        if n.event != "progress" || n.data["id"] != transport {
            return false;
        }
        if n.data["status"] == "error" {
            return true;
        }
        n.data["sessionId"] == session && n.data["status"] == "ready"
    })
    .await
    .and_then(|n| if n.data["status"] == "error" { Err(anyhow!("session failed: {}", n.data)) } else { Ok(()) })
}

/// Records every packet of every track the connection receives, with when it reached
/// the socket (see [`crate::arrival`]; the clock now where the kernel gave no time).
async fn collect_tracks(mut events: mpsc::UnboundedReceiver<ConnEvent>, sink: Arc<Mutex<Vec<Received>>>, arrivals: Arc<Arrivals>) {
    while let Some(ConnEvent::Track(track)) = events.recv().await {
        let sink = sink.clone();
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            let kind = if track.kind().await == RtpCodecKind::Audio { "audio" } else { "video" };
            while let Some(ev) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(p) = ev {
                    let size = p.header.marshal_size() + p.payload.len();
                    let arrived_us = arrivals.take(p.header.ssrc, p.header.sequence_number).unwrap_or_else(now_us);
                    let r = Received { kind, header: p.header, payload: p.payload, arrived_us, size };
                    if let Ok(mut s) = sink.lock() {
                        s.push(r);
                    }
                }
            }
        });
    }
}

struct SendTrack {
    local: Arc<TrackLocalStaticRTP>,
    ssrc: u32,
    payload_type: u8,
}

/// Options of a synthetic publisher.
#[derive(Debug, Clone, Copy)]
pub struct PublishOptions {
    /// Send an Opus-typed audio track.
    pub audio: bool,
    /// Send a VP8-typed video track.
    pub video: bool,
    /// Open a data channel.
    pub data: bool,
    /// Marker tag in every packet.
    pub tag: u32,
    /// Offer H.264 (constrained baseline, packetization mode 1) instead of VP8.
    pub h264: bool,
}

/// A publication of synthetic media.
pub struct Publisher {
    /// Its connection.
    pub conn: Connection,
    /// Publication (= stream) id.
    pub stream_id: String,
    video: Option<SendTrack>,
    audio: Option<SendTrack>,
    /// The publisher's data channel, when asked for.
    pub data: Option<Arc<dyn DataChannel>>,
    /// Keyframe requests received from the server.
    pub keyframe_requests: Arc<AtomicU64>,
    keyframe_wanted: Arc<AtomicBool>,
    tag: u32,
    /// Payloads sent, by (kind, index), so receivers can compare bytes (while `keep_sent`).
    pub sent: Arc<Mutex<HashMap<(&'static str, u64), Bytes>>>,
    /// Whether to keep every payload in `sent` (tests compare bytes; a long load run must not).
    pub keep_sent: AtomicBool,
    /// While true, `send_for` sends nothing (to test pauses from the outside).
    pub paused: Arc<AtomicBool>,
    counters: Mutex<Counters>,
    started: Instant,
}

#[derive(Default)]
struct Counters {
    video_seq: u16,
    audio_seq: u16,
    video_index: u64,
    audio_index: u64,
}

pub(crate) fn vp8() -> RTCRtpCodec {
    RTCRtpCodec { mime_type: "video/VP8".into(), clock_rate: 90000, ..Default::default() }
}

pub(crate) fn h264() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: "video/H264".into(),
        clock_rate: 90000,
        sdp_fmtp_line: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f".into(),
        ..Default::default()
    }
}

fn opus() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: "audio/opus".into(),
        clock_rate: 48000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
        ..Default::default()
    }
}

fn local_track(kind: RtpCodecKind, codec: RTCRtpCodec, ssrc: u32, name: &str) -> Arc<TrackLocalStaticRTP> {
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        format!("stream-{ssrc}"),
        format!("{name}-{ssrc}"),
        name.to_string(),
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(ssrc), ..Default::default() },
            codec,
            ..Default::default()
        }],
    )))
}

/// A publisher's connection with its tracks added and its offer made, before the answer.
pub struct PreparedPublisher {
    /// The connection: apply the server's answer on `conn.pc`.
    pub conn: Connection,
    /// The offer SDP (every candidate gathered).
    pub offer: String,
    /// `{type, mid, source}` per track, as OWT's `publish` wants them.
    pub tracks: Vec<Value>,
    made: Vec<(&'static str, Arc<TrackLocalStaticRTP>, u32, RTCRtpCodec)>,
    data: Option<Arc<dyn DataChannel>>,
    tag: u32,
}

impl PreparedPublisher {
    /// The publisher, once the answer is applied; `stream_id` is the server's name for it.
    pub async fn finish(self, stream_id: String) -> anyhow::Result<Publisher> {
        let keyframe_requests = Arc::new(AtomicU64::new(0));
        let keyframe_wanted = Arc::new(AtomicBool::new(true));
        let (mut video, mut audio) = (None, None);
        for (name, local, ssrc, codec) in self.made {
            let as_dyn = local.clone() as Arc<dyn TrackLocal>;
            let payload_type = self.conn.payload_type(&as_dyn, &codec.mime_type).await.ok_or_else(|| anyhow!("{name} codec not negotiated"))?;
            let t = SendTrack { local: local.clone(), ssrc, payload_type };
            if name == "video" {
                let (count, wanted) = (keyframe_requests.clone(), keyframe_wanted.clone());
                tokio::spawn(async move {
                    let mut taken: Option<Instant> = None;
                    while let Some(ev) = local.poll().await {
                        if let TrackLocalEvent::OnRtcpPacket(pkts) = ev
                            && pkts.iter().any(|p| is_keyframe_request(p.as_ref()))
                        {
                            count.fetch_add(1, Ordering::Relaxed);
                            if taken.is_none_or(|t| t.elapsed() >= KEYFRAME_REQUEST_MIN_INTERVAL) {
                                taken = Some(Instant::now());
                                wanted.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                });
                video = Some(t);
            } else {
                audio = Some(t);
            }
        }
        Ok(Publisher {
            conn: self.conn,
            stream_id,
            video,
            audio,
            data: self.data,
            keyframe_requests,
            keyframe_wanted,
            tag: self.tag,
            sent: Arc::default(),
            keep_sent: AtomicBool::new(true),
            paused: Arc::default(),
            counters: Mutex::new(Counters { video_seq: rand::random(), audio_seq: rand::random(), ..Default::default() }),
            started: Instant::now(),
        })
    }
}

impl Publisher {
    /// Publishes on a new connection (or on `conn` if given: one connection for many sessions).
    pub async fn start(sig: &mut Signaling, opts: PublishOptions, conn: Option<Connection>) -> anyhow::Result<Publisher> {
        let conn = match conn {
            Some(c) => c,
            None => Connection::new().await?,
        };
        let mut prepared = Publisher::prepare(opts, conn).await?;
        let mut req = json!({"media": {"tracks": prepared.tracks.clone()}, "attributes": {"tag": opts.tag}});
        if opts.data {
            req["data"] = json!(true);
        }
        let offer = prepared.offer.clone();
        let stream_id = prepared.conn.exchange(sig, "publish", req, offer).await.context("publish")?;
        let publisher = prepared.finish(stream_id).await?;
        // The server calls a publication ready when its media flows: send until it does.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            publisher.send_video(600).await;
            publisher.send_audio().await;
            match publisher.conn.wait_ready(sig, &publisher.stream_id, Duration::from_millis(40)).await {
                Ok(()) => break,
                Err(e) if e.to_string().contains("session failed") => return Err(e),
                Err(_) if Instant::now() > deadline => bail!("publication {} never became ready", publisher.stream_id),
                Err(_) => {}
            }
        }
        Ok(publisher)
    }

    /// Adds the tracks to `conn` and makes the offer, without signaling: the caller sends
    /// [`PreparedPublisher::offer`] to whichever server it speaks to, applies the answer on
    /// `conn.pc`, then calls [`PreparedPublisher::finish`].
    pub async fn prepare(opts: PublishOptions, conn: Connection) -> anyhow::Result<PreparedPublisher> {
        let mut made = Vec::new();
        for (on, kind, codec, name) in
            [(opts.audio, RtpCodecKind::Audio, opus(), "audio"), (opts.video, RtpCodecKind::Video, if opts.h264 { h264() } else { vp8() }, "video")]
        {
            if !on {
                continue;
            }
            let ssrc: u32 = rand::random();
            let local = local_track(kind, codec.clone(), ssrc, name);
            let init = RTCRtpTransceiverInit { direction: RTCRtpTransceiverDirection::Sendonly, streams: vec![], send_encodings: vec![] };
            conn.pc.add_transceiver_from_track(local.clone() as Arc<dyn TrackLocal>, Some(init)).await?;
            made.push((name, local, ssrc, codec));
        }
        let data = if opts.data { Some(conn.pc.create_data_channel("pub-data", None).await?) } else { None };
        let offer = conn.make_offer().await?;
        let mut tracks = Vec::new();
        for (name, local, _, _) in &made {
            let mid = conn.mid_of_local(&(local.clone() as Arc<dyn TrackLocal>)).await.ok_or_else(|| anyhow!("no mid for {name}"))?;
            let source = if *name == "audio" { "mic" } else { "camera" };
            tracks.push(json!({"type": name, "mid": mid, "source": source}));
        }
        Ok(PreparedPublisher { conn, offer, tracks, made, data, tag: opts.tag })
    }

    /// Packets sent so far: (video, audio) — the next marker indices.
    pub fn sent_counts(&self) -> (u64, u64) {
        let c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        (c.video_index, c.audio_index)
    }

    /// Whether the server asked for a keyframe since the last call (for real encoders).
    pub fn take_keyframe_request(&self) -> bool {
        self.keyframe_wanted.swap(false, Ordering::Relaxed)
    }

    /// Writes an RTP packet made elsewhere (a real encoder) on the `"audio"` or `"video"`
    /// track, with this track's SSRC and negotiated payload type.
    pub async fn write_rtp(&self, kind: &str, mut packet: rtp::Packet) {
        let (t, kind) = if kind == "video" { (&self.video, "video") } else { (&self.audio, "audio") };
        let Some(t) = t else { return };
        // Continue this track's own sequence: a jump back to the encoder's numbering
        // would look like a replay to SRTP and be dropped.
        let (seq, index) = {
            let mut guard = self.counters.lock().unwrap_or_else(|p| p.into_inner());
            let c = &mut *guard;
            let (seq, index) = if kind == "video" { (&mut c.video_seq, &mut c.video_index) } else { (&mut c.audio_seq, &mut c.audio_index) };
            let r = (*seq, *index);
            *seq = seq.wrapping_add(1);
            *index += 1;
            r
        };
        packet.header.sequence_number = seq;
        packet.header.ssrc = t.ssrc;
        packet.header.payload_type = t.payload_type;
        self.keep(kind, index, &packet.payload);
        let _ = t.local.write_rtp(packet).await;
    }

    /// Keeps a copy of packet `index` of `kind` in [`Publisher::sent`], while `keep_sent`.
    fn keep(&self, kind: &'static str, index: u64, payload: &Bytes) {
        if self.keep_sent.load(Ordering::Relaxed)
            && let Ok(mut sent) = self.sent.lock()
        {
            sent.insert((kind, index), payload.clone());
        }
    }

    /// The SSRC and negotiated payload type of the `"audio"` or `"video"` track.
    pub fn track_ids(&self, kind: &str) -> Option<(u32, u8)> {
        let t = if kind == "video" { &self.video } else { &self.audio };
        t.as_ref().map(|t| (t.ssrc, t.payload_type))
    }

    /// Writes `packet` on the `"audio"` or `"video"` track as it is (sequence number,
    /// timestamp, header bits, CSRCs and payload untouched), for fault tests: garbage over
    /// the connection's real SRTP session. webrtc-rs drops a packet whose SSRC or payload
    /// type is not this track's (see [`Publisher::track_ids`]); what it accepts it
    /// marshals, encrypts and sends as is.
    pub async fn write_raw_rtp(&self, kind: &str, packet: rtp::Packet) -> anyhow::Result<()> {
        let t = if kind == "video" { &self.video } else { &self.audio };
        let t = t.as_ref().ok_or_else(|| anyhow!("no {kind} track"))?;
        t.local.write_rtp(packet).await?;
        Ok(())
    }

    /// Sends RTCP packets (any, `rtcp::RawPacket` included) from the `"audio"` or `"video"`
    /// track's sender, over the connection's SRTCP session, for fault tests.
    pub async fn write_rtcp(&self, kind: &str, packets: Vec<Box<dyn rtc::rtcp::Packet>>) -> anyhow::Result<()> {
        let t = if kind == "video" { &self.video } else { &self.audio };
        let t = t.as_ref().ok_or_else(|| anyhow!("no {kind} track"))?;
        t.local.write_rtcp(packets).await?;
        Ok(())
    }

    /// Sends one video frame (a keyframe when one was asked for) of `bytes` bytes, in as
    /// many packets of at most [`MAX_VIDEO_PAYLOAD`] bytes as it needs (same timestamp,
    /// RTP marker on the last, VP8 start bit on the first); every packet carries a marker.
    pub async fn send_video(&self, bytes: usize) {
        let Some(v) = &self.video else { return };
        let count = bytes.div_ceil(MAX_VIDEO_PAYLOAD).max(1);
        let key = self.keyframe_wanted.swap(false, Ordering::Relaxed);
        let ts = (self.started.elapsed().as_secs_f64() * 90000.0) as u32;
        for part in 0..count {
            let (seq, index) = {
                let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
                let r = (c.video_seq, c.video_index);
                c.video_seq = c.video_seq.wrapping_add(1);
                c.video_index += 1;
                r
            };
            let mut payload = if part == 0 {
                let mut p = vec![0x10, if key { 0x00 } else { 0x01 }];
                if key {
                    p.extend_from_slice(&[0x00, 0x00, 0x9d, 0x01, 0x2a]);
                }
                p
            } else {
                vec![0x00]
            };
            Marker { tag: self.tag, index, sent_us: now_us() }.write(&mut payload);
            payload.resize((bytes / count).max(payload.len()), 0xAB);
            let payload = Bytes::from(payload);
            self.keep("video", index, &payload);
            v.local.write_rtp(packet(v, seq, ts, part + 1 == count, payload)).await.ok();
        }
    }

    /// Sends one 20 ms audio packet.
    pub async fn send_audio(&self) {
        let Some(a) = &self.audio else { return };
        let (seq, index) = {
            let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
            let r = (c.audio_seq, c.audio_index);
            c.audio_seq = c.audio_seq.wrapping_add(1);
            c.audio_index += 1;
            r
        };
        let mut payload = vec![0xFC];
        Marker { tag: self.tag, index, sent_us: now_us() }.write(&mut payload);
        payload.resize(80, 0);
        let payload = Bytes::from(payload);
        self.keep("audio", index, &payload);
        let ts = (self.started.elapsed().as_secs_f64() * 48000.0) as u32;
        a.local.write_rtp(packet(a, seq, ts, false, payload)).await.ok();
    }

    /// Sends synthetic media for `duration`: video at `fps` frames per second of
    /// `video_bytes` each (split into packets as needed), audio every 20 ms. Returns frames
    /// (video) and packets (audio) sent.
    pub async fn send_for(&self, duration: Duration, fps: u32, video_bytes: usize) -> anyhow::Result<(u64, u64)> {
        let start = Instant::now();
        let (mut vn, mut an) = (0u64, 0u64);
        let frame = Duration::from_secs_f64(1.0 / f64::from(fps.max(1)));
        let mut next_video = Instant::now();
        let mut next_audio = Instant::now();
        while start.elapsed() < duration {
            let now = Instant::now();
            if self.paused.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(10)).await;
                next_video = Instant::now();
                next_audio = Instant::now();
                continue;
            }
            if self.video.is_some() && now >= next_video {
                self.send_video(video_bytes).await;
                vn += 1;
                next_video += frame;
            }
            if self.audio.is_some() && now >= next_audio {
                self.send_audio().await;
                an += 1;
                next_audio += Duration::from_millis(20);
            }
            let next = match (&self.video, &self.audio) {
                (Some(_), Some(_)) => next_video.min(next_audio),
                (Some(_), None) => next_video,
                (None, Some(_)) => next_audio,
                (None, None) => return Ok((0, 0)),
            };
            tokio::time::sleep_until(next.into()).await;
        }
        Ok((vn, an))
    }

    /// Stops publishing and closes the connection.
    pub async fn stop(&self, sig: &mut Signaling) -> anyhow::Result<()> {
        sig.ok("unpublish", Some(json!({"id": self.stream_id}))).await?;
        Ok(())
    }
}

fn packet(t: &SendTrack, seq: u16, ts: u32, marker: bool, payload: Bytes) -> rtp::Packet {
    rtp::Packet {
        header: rtp::Header {
            version: 2,
            marker,
            payload_type: t.payload_type,
            sequence_number: seq,
            timestamp: ts,
            ssrc: t.ssrc,
            ..Default::default()
        },
        payload,
    }
}

/// One received media packet.
#[derive(Debug, Clone)]
pub struct Received {
    /// `audio` or `video`.
    pub kind: &'static str,
    /// RTP header as received.
    pub header: rtp::Header,
    /// Payload.
    pub payload: Bytes,
    /// Arrival time in µs since the epoch: for a full peer's UDP packets the kernel's
    /// receive time ([`crate::arrival`]), else when the client read it.
    pub arrived_us: u64,
    /// Bytes of the RTP packet (header and payload; for a light peer that does not decrypt,
    /// the SRTP packet without its authentication tag).
    pub size: usize,
}

/// Data channel messages received: (is_text, bytes), in order.
pub type DataLog = Arc<Mutex<Vec<(bool, Vec<u8>)>>>;

/// A subscription receiving media.
pub struct Subscriber {
    /// Its connection.
    pub conn: Connection,
    /// Subscription id.
    pub id: String,
    /// Everything received, in arrival order.
    pub received: Arc<Mutex<Vec<Received>>>,
    /// Data channel messages received: (is_text, bytes).
    pub data: DataLog,
}

impl Subscriber {
    /// Subscribes to `stream` (audio and/or video, and its data channel if `data`) on a new connection.
    pub async fn start(sig: &mut Signaling, stream: &str, audio: bool, video: bool, data: bool) -> anyhow::Result<Subscriber> {
        Self::start_on(sig, Connection::new().await?, stream, audio, video, data).await
    }

    /// A video-only subscription on a new connection, `video_fields` added to its track's
    /// request (a simulcast layer's track id as `from`, `parameters`).
    pub async fn start_video(sig: &mut Signaling, stream: &str, video_fields: Value) -> anyhow::Result<Subscriber> {
        Self::start_video_on(sig, Connection::new().await?, stream, video_fields).await
    }

    /// [`Subscriber::start_video`] on a connection made by the caller (its own bind address).
    pub async fn start_video_on(sig: &mut Signaling, mut conn: Connection, stream: &str, video_fields: Value) -> anyhow::Result<Subscriber> {
        let id = conn.subscribe_with(sig, stream, false, true, false, video_fields).await?;
        let received = conn.received.clone();
        Ok(Subscriber { conn, id, received, data: Arc::default() })
    }

    /// Like [`Subscriber::start`], on a connection made by the caller (its own bind address).
    pub async fn start_on(
        sig: &mut Signaling,
        mut conn: Connection,
        stream: &str,
        audio: bool,
        video: bool,
        data: bool,
    ) -> anyhow::Result<Subscriber> {
        let data_rx: DataLog = Arc::default();
        if data {
            let dc = conn.pc.create_data_channel(stream, None).await?;
            let store = data_rx.clone();
            tokio::spawn(async move {
                while let Some(ev) = dc.poll().await {
                    if let DataChannelEvent::OnMessage(m) = ev
                        && let Ok(mut s) = store.lock()
                    {
                        s.push((m.is_string, m.data.to_vec()));
                    }
                }
            });
        }
        let id = conn.subscribe(sig, stream, audio, video, data).await?;
        let received = conn.received.clone();
        Ok(Subscriber { conn, id, received, data: data_rx })
    }

    /// Packets received so far of one kind.
    pub fn packets(&self, kind: &str) -> Vec<Received> {
        self.received.lock().map(|r| r.iter().filter(|p| p.kind == kind).cloned().collect()).unwrap_or_default()
    }

    /// Waits until `pred` holds over the received packets, or fails after `timeout`.
    pub async fn wait_until(&self, what: &str, timeout: Duration, pred: impl Fn(&[Received]) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self.received.lock().map(|r| pred(&r)).unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Per-tag counts of the keyframes in a list of received video packets.
pub fn keyframes_by_tag(packets: &[Received]) -> HashMap<u32, usize> {
    let mut m = HashMap::new();
    for p in packets.iter().filter(|p| p.kind == "video" && is_vp8_keyframe(&p.payload)) {
        if let Some(mk) = Marker::find(&p.payload) {
            *m.entry(mk.tag).or_insert(0) += 1;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::is_vp8_keyframe;

    #[test]
    fn vp8_keyframes_are_found_behind_every_descriptor_form() {
        // 1-byte descriptor (S=1), frame header with P=0 / P=1.
        assert!(is_vp8_keyframe(&[0x10, 0x00]));
        assert!(!is_vp8_keyframe(&[0x10, 0x01]));
        // Not the start of a partition.
        assert!(!is_vp8_keyframe(&[0x00, 0x00]));
        // X with a 15-bit picture id, TL0PICIDX and TID: the frame header is the 6th byte.
        assert!(is_vp8_keyframe(&[0x90, 0xE0, 0x81, 0x23, 0x07, 0x40, 0x00]));
        assert!(!is_vp8_keyframe(&[0x90, 0xE0, 0x81, 0x23, 0x07, 0x40, 0x01]));
        // X with a 7-bit picture id only.
        assert!(is_vp8_keyframe(&[0x90, 0x80, 0x05, 0x00]));
        // The start of a later partition is not the start of the frame.
        assert!(!is_vp8_keyframe(&[0x11, 0x00]));
        assert!(!is_vp8_keyframe(&[0x90, 0x80, 0x05, 0x01]));
        // Cut short.
        assert!(!is_vp8_keyframe(&[0x90, 0x80, 0x85]));
        assert!(!is_vp8_keyframe(&[]));
    }
}
