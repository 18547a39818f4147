//! A publication: the tracks (and data channel) one `publish` announced, their fan-outs,
//! keyframe requests to the publisher, and the stream description the room sees.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;
use serde_json::Value;
use tessera_core::agent::{MediaKind, PublishSpec, PublishTrack, TrackSwitch};
use tessera_core::room::{AudioFormat, VideoFormat};
use tessera_core::stream::{ForwardInfo, StreamInfo, StreamKind, TrackFormat, TrackInfo, TrackStatus};
use tracing::debug;
use webrtc::data_channel::DataChannel;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};

use crate::forward::{Fanout, KeyframeDecision, KeyframeThrottle, SeenWindow};

/// How a track's producer is asked for a keyframe.
pub enum KeyframeSource {
    /// A remote publisher: send it a PLI for this SSRC.
    Remote {
        /// The publisher's track.
        track: Arc<dyn TrackRemote>,
        /// Its media SSRC.
        ssrc: u32,
    },
    /// A producer inside the server (the mixer's encoder): call this.
    Local(Arc<dyn Fn() + Send + Sync>),
}

/// One track of a publication (received from a client, or produced by the mixer).
pub(crate) struct PubTrack {
    pub kind: MediaKind,
    pub codec: RTCRtpCodec,
    pub fanout: Arc<Fanout>,
    source: KeyframeSource,
    throttle: Mutex<KeyframeThrottle>,
    /// Publisher-side mute (`stream-control pause`): nothing is forwarded while false.
    active: AtomicBool,
}

impl PubTrack {
    /// Asks the publisher for a keyframe, throttled; a request inside the throttle window
    /// is sent at the window's end rather than dropped.
    pub fn request_keyframe(self: &Arc<Self>) {
        if self.kind != MediaKind::Video {
            return;
        }
        let decision = self.throttle.lock().unwrap_or_else(|p| p.into_inner()).request(Instant::now());
        let me = self.clone();
        match decision {
            KeyframeDecision::SendNow => {
                tokio::spawn(async move { me.send_pli().await });
            }
            KeyframeDecision::SendAt(at) => {
                tokio::spawn(async move {
                    tokio::time::sleep_until(at.into()).await;
                    me.throttle.lock().unwrap_or_else(|p| p.into_inner()).sent_deferred(Instant::now());
                    me.send_pli().await;
                });
            }
            KeyframeDecision::AlreadyScheduled => {}
        }
    }

    async fn send_pli(&self) {
        match &self.source {
            KeyframeSource::Remote { track, ssrc } => {
                let pli = PictureLossIndication { sender_ssrc: 0, media_ssrc: *ssrc };
                if let Err(e) = track.write_rtcp(vec![Box::new(pli)]).await {
                    debug!(error = %e, "PLI to publisher failed");
                } else {
                    debug!(ssrc, "PLI sent to publisher");
                }
            }
            KeyframeSource::Local(f) => f(),
        }
    }

    /// Reads a remote publisher's packets until the track ends, forwarding them.
    pub async fn run_reader(self: Arc<Self>, ended: Arc<AtomicBool>) {
        let KeyframeSource::Remote { track, .. } = &self.source else { return };
        let remote = track.clone();
        let mut seen = SeenWindow::default();
        while let Some(event) = remote.poll().await {
            match event {
                TrackRemoteEvent::OnRtpPacket(mut packet) => {
                    if ended.load(Ordering::Relaxed) {
                        break;
                    }
                    // A repeated RTX repair (see `SeenWindow`) goes to nobody.
                    if seen.repeat(packet.header.sequence_number) {
                        continue;
                    }
                    if self.active.load(Ordering::Relaxed) {
                        self.fanout.forward(&mut packet);
                    }
                }
                TrackRemoteEvent::OnEnded | TrackRemoteEvent::OnError => break,
                _ => {}
            }
        }
        self.fanout.clear();
    }
}

/// A publication on one transport.
pub(crate) struct Publication {
    pub id: String,
    pub room: String,
    pub participant: String,
    pub transport: String,
    pub announced: Vec<PublishTrack>,
    pub data: bool,
    keyframe_interval: Duration,
    tracks: Mutex<Vec<Arc<PubTrack>>>,
    data_open: AtomicBool,
    /// Subscribers' data channels: (subscription id, channel).
    data_sinks: Mutex<Vec<(String, Arc<dyn DataChannel>)>>,
    ready: AtomicBool,
    pub ended: Arc<AtomicBool>,
}

impl Publication {
    /// A stream produced inside the server: no owner, no transport, ready at once.
    pub fn local(room: &str, id: &str, keyframe_interval: Duration) -> Self {
        Publication {
            id: id.into(),
            room: room.into(),
            participant: String::new(),
            transport: String::new(),
            announced: Vec::new(),
            data: false,
            keyframe_interval,
            tracks: Mutex::new(Vec::new()),
            data_open: AtomicBool::new(false),
            data_sinks: Mutex::new(Vec::new()),
            ready: AtomicBool::new(true),
            ended: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn new(spec: &PublishSpec, keyframe_interval: Duration) -> Self {
        Publication {
            id: spec.at.session.to_string(),
            room: spec.at.room.to_string(),
            participant: spec.at.participant.to_string(),
            transport: spec.at.transport.to_string(),
            announced: spec.tracks.clone(),
            data: spec.data,
            keyframe_interval,
            tracks: Mutex::new(Vec::new()),
            data_open: AtomicBool::new(false),
            data_sinks: Mutex::new(Vec::new()),
            ready: AtomicBool::new(false),
            ended: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The announced track with this mid, if any.
    pub fn announced_at(&self, mid: &str) -> Option<&PublishTrack> {
        self.announced.iter().find(|t| t.mid == mid)
    }

    /// Registers a track; returns it (for its reader task, when remote).
    pub fn add_track(&self, kind: MediaKind, codec: RTCRtpCodec, source: KeyframeSource) -> Arc<PubTrack> {
        let t = Arc::new(PubTrack {
            kind,
            codec,
            fanout: Arc::new(Fanout::default()),
            source,
            throttle: Mutex::new(KeyframeThrottle::new(self.keyframe_interval)),
            active: AtomicBool::new(true),
        });
        self.tracks.lock().unwrap_or_else(|p| p.into_inner()).push(t.clone());
        t
    }

    /// The flowing track of this kind.
    pub fn track(&self, kind: MediaKind) -> Option<Arc<PubTrack>> {
        self.tracks.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|t| t.kind == kind).cloned()
    }

    pub fn has_flowing(&self, kind: MediaKind) -> bool {
        self.track(kind).is_some()
    }

    /// The publisher's data channel opened.
    pub fn set_data_open(&self) {
        self.data_open.store(true, Ordering::Relaxed);
    }

    /// Everything announced flows; returns true exactly once (when it becomes ready).
    pub fn check_ready(&self) -> bool {
        let all_media = self.announced.iter().all(|a| self.has_flowing(a.kind));
        let data_ok = !self.data || self.data_open.load(Ordering::Relaxed);
        all_media && data_ok && !self.ended.load(Ordering::Relaxed) && !self.ready.swap(true, Ordering::AcqRel)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn request_keyframe(&self) {
        if let Some(t) = self.track(MediaKind::Video) {
            t.request_keyframe();
        }
    }

    /// Publisher mute/unmute.
    pub fn switch(&self, s: TrackSwitch) {
        for t in self.tracks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if s.covers(t.kind) {
                let was = t.active.swap(s.active, Ordering::Relaxed);
                if s.active && !was {
                    t.fanout.resync_all();
                    t.request_keyframe();
                }
            }
        }
    }

    pub fn add_data_sink(&self, subscription: &str, dc: Arc<dyn DataChannel>) {
        self.data_sinks.lock().unwrap_or_else(|p| p.into_inner()).push((subscription.to_string(), dc));
    }

    pub fn remove_data_sink(&self, subscription: &str) {
        self.data_sinks.lock().unwrap_or_else(|p| p.into_inner()).retain(|(s, _)| s != subscription);
    }

    /// Relays one message from the publisher's data channel to every subscriber's, in order.
    pub async fn relay_data(&self, text: bool, data: &bytes::BytesMut) {
        let sinks: Vec<Arc<dyn DataChannel>> = self.data_sinks.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(_, dc)| dc.clone()).collect();
        for dc in sinks {
            let r = if text {
                match std::str::from_utf8(data) {
                    Ok(s) => dc.send_text(s).await,
                    Err(_) => dc.send(data.clone()).await,
                }
            } else {
                dc.send(data.clone()).await
            };
            if let Err(e) = r {
                debug!(error = %e, "data relay to a subscriber failed");
            }
        }
    }

    /// Stops forwarding for good.
    pub fn end(&self) {
        self.ended.store(true, Ordering::Relaxed);
        for t in self.tracks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            t.fanout.clear();
        }
        self.data_sinks.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// The stream as the room sees it.
    pub fn stream_info(&self) -> StreamInfo {
        let tracks = self
            .announced
            .iter()
            .filter_map(|a| {
                let t = self.track(a.kind)?;
                Some(TrackInfo {
                    kind: a.kind,
                    source: a.source.clone(),
                    mid: Some(a.mid.clone()),
                    format: codec_format(&t.codec),
                    parameters: None,
                    status: if t.active.load(Ordering::Relaxed) { TrackStatus::Active } else { TrackStatus::Inactive },
                })
            })
            .collect();
        StreamInfo {
            id: self.id.as_str().into(),
            // The room controller fills in what it owns: views and the publisher's attributes.
            kind: StreamKind::Forward(ForwardInfo { owner: self.participant.as_str().into(), in_views: Vec::new(), attributes: Value::Null }),
            tracks,
            data: self.data,
        }
    }
}

/// The format of a negotiated codec.
pub(crate) fn codec_format(codec: &RTCRtpCodec) -> TrackFormat {
    let mime = codec.mime_type.to_ascii_lowercase();
    let name = mime.split('/').nth(1).unwrap_or(&mime).to_string();
    if mime.starts_with("audio/") {
        let channels = (codec.channels > 0).then_some(u32::from(codec.channels));
        TrackFormat::Audio(AudioFormat { codec: name, sample_rate: Some(codec.clock_rate), channel_num: channels })
    } else if name == "h264" {
        TrackFormat::Video(VideoFormat { codec: name, profile: Some(h264_profile(&codec.sdp_fmtp_line).to_string()) })
    } else {
        TrackFormat::Video(VideoFormat { codec: name, profile: None })
    }
}

/// OWT's H.264 profile name from an fmtp line's `profile-level-id`.
fn h264_profile(fmtp: &str) -> &'static str {
    let id = fmtp
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case("profile-level-id"))
        .map(|(_, v)| v.to_ascii_lowercase())
        .unwrap_or_default();
    match id.get(..4) {
        Some("42e0") | Some("42c0") => "CB",
        Some("4200") | Some("4280") => "B",
        Some("4d00") | Some("4d40") => "M",
        Some("6400") => "H",
        _ => "CB",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let opus = RTCRtpCodec { mime_type: "audio/opus".into(), clock_rate: 48000, channels: 2, ..Default::default() };
        assert_eq!(codec_format(&opus), TrackFormat::Audio(AudioFormat { codec: "opus".into(), sample_rate: Some(48000), channel_num: Some(2) }));
        let vp8 = RTCRtpCodec { mime_type: "video/VP8".into(), clock_rate: 90000, ..Default::default() };
        assert_eq!(codec_format(&vp8), TrackFormat::Video(VideoFormat { codec: "vp8".into(), profile: None }));
        let h264 = RTCRtpCodec {
            mime_type: "video/H264".into(),
            clock_rate: 90000,
            sdp_fmtp_line: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f".into(),
            ..Default::default()
        };
        assert_eq!(codec_format(&h264), TrackFormat::Video(VideoFormat { codec: "h264".into(), profile: Some("CB".into()) }));
    }
}

/// Property tests: OWT's format object is built from any negotiated codec without a panic.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn codec_format_names_the_codec(
            mime in prop_oneof!["(audio|video|AUDIO|Video|x)?/?[A-Za-z0-9]{0,6}(/[a-z]{0,3})?", "\\PC{0,12}"],
            fmtp in prop_oneof!["((profile-level-id|PROFILE-LEVEL-ID|x)=[0-9a-fA-F]{0,8}|packetization-mode=1| ?;)*", "\\PC{0,20}"],
            clock_rate in any::<u32>(),
            channels in any::<u16>(),
        ) {
            let codec = RTCRtpCodec { mime_type: mime.clone(), clock_rate, channels, sdp_fmtp_line: fmtp.clone(), ..Default::default() };
            let f = codec_format(&codec);
            let lower = mime.to_ascii_lowercase();
            let name = lower.split('/').nth(1).unwrap_or(&lower);
            match &f {
                TrackFormat::Audio(a) => {
                    prop_assert!(lower.starts_with("audio/"));
                    prop_assert_eq!(a.codec.as_str(), name);
                    prop_assert_eq!(a.sample_rate, Some(clock_rate));
                }
                TrackFormat::Video(v) => {
                    prop_assert!(!lower.starts_with("audio/"));
                    prop_assert_eq!(v.codec.as_str(), name);
                    if name == "h264" {
                        prop_assert!(["CB", "B", "M", "H"].contains(&v.profile.as_deref().unwrap_or_default()), "{:?}", f);
                    }
                }
            }
            prop_assert!(["CB", "B", "M", "H"].contains(&h264_profile(&fmtp)));
        }

        #[test]
        fn h264_profile_reads_the_profile_idc(prefix in prop::sample::select(&["42e0", "42c0", "4200", "4280", "4d00", "4d40", "6400"][..]), level in "[0-9a-f]{2}", upper in any::<bool>()) {
            let id = format!("{prefix}{level}");
            let id = if upper { id.to_ascii_uppercase() } else { id };
            let expected = match prefix {
                "42e0" | "42c0" => "CB",
                "4200" | "4280" => "B",
                "4d00" | "4d40" => "M",
                _ => "H",
            };
            prop_assert_eq!(h264_profile(&format!("packetization-mode=1; profile-level-id={id}")), expected);
        }
    }
}
