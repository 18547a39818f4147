//! Streams on a node without the SFU (a mixer or recorder node): the streams its mixer
//! produces and the streams its relay imports, each track fanned out to the taps on it
//! (the mixer's decoders, the recorder, the relay's exports to other nodes).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tessera_core::agent::{LayerChoice, MediaKind};
use tessera_core::media::{CodecInfo, LocalTrack, Need, NeedFn, RtpReceiver, RtpSink, StreamSource, Tap};
use tessera_core::typed_ids::RoomId;
use tokio::sync::mpsc;
use tracing::debug;

/// Packets a tap may fall behind before newer ones are dropped for it (a stalled
/// consumer must not hold up the producer or the others).
const TAP_QUEUE: usize = 512;

/// One track's consumers.
struct Fanout {
    kind: MediaKind,
    codec: CodecInfo,
    on_keyframe: Arc<dyn Fn() + Send + Sync>,
    taps: Mutex<Vec<(u64, mpsc::Sender<Bytes>)>>,
    keyframes: Mutex<KeyframeThrottle>,
    /// Where the producer of a layered video (relayed one layer at a time) hears which layer
    /// the taps agree on.
    on_need: Option<NeedFn>,
    /// The layer each tap chose (a tap that chose none wants the top one), and the one
    /// last told.
    choices: Mutex<(HashMap<u64, LayerChoice>, LayerChoice)>,
    /// A layer of a layered video produced here (a mixer's view with layers): its RID,
    /// and whether its producer was last told someone takes it.
    rid: Option<String>,
    told: Mutex<Option<bool>>,
}

impl RtpSink for Fanout {
    fn send(&self, packet: &[u8]) {
        let mut taps = self.taps.lock().unwrap_or_else(|p| p.into_inner());
        if taps.is_empty() {
            return;
        }
        // One copy, shared by every tap.
        let packet = Bytes::copy_from_slice(packet);
        let before = taps.len();
        taps.retain(|(id, tx)| match tx.try_send(packet.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                debug!(tap = id, "a tap fell behind; packet dropped for it");
                true
            }
            // Its consumer dropped it without untapping.
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if taps.len() < before {
            drop(taps);
            // Its choice of layer goes with it.
            self.retell();
        }
    }

    fn has_consumers(&self) -> bool {
        self.taps.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|(_, tx)| !tx.is_closed())
    }
}

impl Fanout {
    /// Tells the producer the layer the taps now agree on, if that changed. Decided and
    /// told under the choices' lock (taken before the taps'), so that two changes at once
    /// cannot be told in the wrong order.
    fn retell(&self) {
        let Some(on_need) = &self.on_need else { return };
        // A layer of a video produced here: whether anyone takes it.
        if self.rid.is_some() {
            let mut told = self.told.lock().unwrap_or_else(|p| p.into_inner());
            let taken = self.has_consumers();
            if *told != Some(taken) {
                *told = Some(taken);
                on_need(Need::Layer(taken));
            }
            return;
        }
        let mut choices = self.choices.lock().unwrap_or_else(|p| p.into_inner());
        let ids: Vec<u64> = self.taps.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|(_, tx)| !tx.is_closed()).map(|(id, _)| *id).collect();
        choices.0.retain(|id, _| ids.contains(id));
        let agreed = agreed(ids.iter().map(|id| choices.0.get(id).cloned().unwrap_or_default()));
        if agreed != choices.1 {
            choices.1 = agreed.clone();
            on_need(Need::Choice(agreed));
        }
    }

    /// Asks the producer for a keyframe, at most once per [`KEYFRAME_INTERVAL`]: a request
    /// inside the window is deferred to its end, never dropped. The producer's callback
    /// runs on a blocking thread (the mixer's takes its locks and the encoder's).
    fn keyframe(self: &Arc<Self>) {
        let now = Instant::now();
        let delay = {
            let mut k = self.keyframes.lock().unwrap_or_else(|p| p.into_inner());
            if k.pending {
                return;
            }
            let due = k.last.map_or(now, |l| l + KEYFRAME_INTERVAL);
            k.pending = true;
            due.saturating_duration_since(now)
        };
        let me = self.clone();
        let fire = move || {
            {
                let mut k = me.keyframes.lock().unwrap_or_else(|p| p.into_inner());
                k.pending = false;
                k.last = Some(Instant::now());
            }
            (me.on_keyframe)();
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tokio::task::spawn_blocking(fire).await;
                });
            }
            Err(_) => fire(),
        }
    }
}

/// One layer for several consumers of a layered video: theirs when they agree; the
/// largest region when each fills one (a mixer's views); else the top layer (a recording
/// wants it, and it serves everyone).
fn agreed(choices: impl Iterator<Item = LayerChoice>) -> LayerChoice {
    let mut out: Option<LayerChoice> = None;
    for c in choices {
        out = Some(match (out, c) {
            (None, c) => c,
            (Some(LayerChoice::Fill { width: a, height: b }), LayerChoice::Fill { width: c, height: d }) => {
                LayerChoice::Fill { width: a.max(c), height: b.max(d) }
            }
            (Some(a), c) if a == c => a,
            _ => return LayerChoice::Auto,
        });
    }
    out.unwrap_or_default()
}

/// Keyframe requests to one producer are at most this frequent.
const KEYFRAME_INTERVAL: Duration = Duration::from_millis(300);

#[derive(Default)]
struct KeyframeThrottle {
    last: Option<Instant>,
    pending: bool,
}

struct Stream {
    room: RoomId,
    tracks: Vec<Arc<Fanout>>,
}

/// The [`StreamSource`] of a node without the webrtc role.
#[derive(Default)]
pub struct LocalStreams {
    streams: Mutex<HashMap<String, Stream>>,
    next_tap: AtomicU64,
}

struct TapRx(mpsc::Receiver<Bytes>);

impl RtpReceiver for TapRx {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        self.0.poll_recv(cx)
    }
}

impl LocalStreams {
    /// No streams yet.
    pub fn new() -> Arc<LocalStreams> {
        Arc::new(LocalStreams::default())
    }

    /// A stream's track of `kind`; of a layered video, the top layer (declared last).
    fn track(&self, stream: &str, kind: MediaKind) -> Option<Arc<Fanout>> {
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams.get(stream)?.tracks.iter().rev().find(|t| t.kind == kind).cloned()
    }

    /// The layer `rid` of a stream's layered video.
    fn layer(&self, stream: &str, rid: &str) -> Option<Arc<Fanout>> {
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams.get(stream)?.tracks.iter().find(|t| t.rid.as_deref() == Some(rid)).cloned()
    }

    fn tap_fanout(&self, track: &Arc<Fanout>) -> Tap {
        let id = self.next_tap.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(TAP_QUEUE);
        track.taps.lock().unwrap_or_else(|p| p.into_inner()).push((id, tx));
        // A new consumer starts with a picture (and in the top layer until it chooses).
        if track.kind == MediaKind::Video {
            track.keyframe();
            track.retell();
        }
        Tap { codec: track.codec.clone(), sink_id: id, packets: Box::new(TapRx(rx)) }
    }

    /// How many streams there are (produced here or imported).
    pub fn count(&self) -> usize {
        self.streams.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl StreamSource for LocalStreams {
    fn tap(&self, stream: &str, kind: MediaKind) -> Option<Tap> {
        let track = self.track(stream, kind)?;
        Some(self.tap_fanout(&track))
    }

    fn untap(&self, stream: &str, kind: MediaKind, sink_id: u64) {
        // Whichever of the kind's tracks (a layer tapped alone) holds the tap.
        let tracks: Vec<Arc<Fanout>> = {
            let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            streams.get(stream).map(|s| s.tracks.iter().filter(|t| t.kind == kind).cloned().collect()).unwrap_or_default()
        };
        for track in tracks {
            let removed = {
                let mut taps = track.taps.lock().unwrap_or_else(|p| p.into_inner());
                let before = taps.len();
                taps.retain(|(id, _)| *id != sink_id);
                taps.len() < before
            };
            if removed {
                track.retell();
            }
        }
    }

    fn layers(&self, stream: &str) -> Vec<String> {
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams.get(stream).map(|s| s.tracks.iter().filter_map(|t| t.rid.clone()).collect()).unwrap_or_default()
    }

    fn tap_layer(&self, stream: &str, rid: &str) -> Option<Tap> {
        let track = self.layer(stream, rid)?;
        Some(self.tap_fanout(&track))
    }

    fn request_layer_keyframe(&self, stream: &str, rid: &str) {
        match self.layer(stream, rid) {
            Some(track) => track.keyframe(),
            None => self.request_keyframe(stream),
        }
    }

    fn set_tap_layer(&self, stream: &str, kind: MediaKind, sink_id: u64, layer: LayerChoice) {
        // Only a video relayed one layer at a time hears choices (nobody would clear them
        // otherwise); a layered video produced here has a track per layer instead.
        if let Some(track) = self.track(stream, kind).filter(|t| t.on_need.is_some() && t.rid.is_none()) {
            track.choices.lock().unwrap_or_else(|p| p.into_inner()).0.insert(sink_id, layer);
            track.retell();
        }
    }

    fn request_keyframe(&self, stream: &str) {
        if let Some(track) = self.track(stream, MediaKind::Video) {
            track.keyframe();
        }
    }

    fn stream_room(&self, stream: &str) -> Option<RoomId> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner()).get(stream).map(|s| s.room.clone())
    }

    fn publish_local(&self, room: &str, stream: &str, tracks: Vec<LocalTrack>) -> Vec<Arc<dyn RtpSink>> {
        let fanouts: Vec<Arc<Fanout>> = tracks
            .into_iter()
            .map(|t| {
                Arc::new(Fanout {
                    kind: t.kind,
                    codec: t.codec,
                    on_keyframe: t.on_keyframe,
                    taps: Mutex::new(Vec::new()),
                    keyframes: Mutex::default(),
                    on_need: t.on_need,
                    choices: Mutex::default(),
                    rid: t.rid.filter(|_| t.kind == MediaKind::Video),
                    told: Mutex::new(None),
                })
            })
            .collect();
        let sinks = fanouts.iter().map(|f| f.clone() as Arc<dyn RtpSink>).collect();
        // A stream published again under its id replaces the old one for new taps; the old
        // one's taps end when it is unpublished... which this replacement is: end them now.
        let old = self.streams.lock().unwrap_or_else(|p| p.into_inner()).remove(stream);
        for t in old.into_iter().flat_map(|s| s.tracks) {
            t.taps.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
        self.streams.lock().unwrap_or_else(|p| p.into_inner()).insert(stream.to_string(), Stream { room: room.into(), tracks: fanouts });
        sinks
    }

    fn unpublish_local(&self, stream: &str) {
        let gone = self.streams.lock().unwrap_or_else(|p| p.into_inner()).remove(stream);
        if let Some(s) = gone {
            for t in s.tracks {
                t.taps.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    fn vp8() -> CodecInfo {
        CodecInfo { mime_type: "video/VP8".into(), clock_rate: 90000, channels: 0, fmtp: String::new(), payload_type: Some(96) }
    }

    #[test]
    fn taps_agree_on_one_layer() {
        let fill = |width, height| LayerChoice::Fill { width, height };
        assert_eq!(agreed([].into_iter()), LayerChoice::Auto);
        assert_eq!(agreed([fill(320, 240)].into_iter()), fill(320, 240));
        assert_eq!(agreed([fill(320, 240), fill(160, 360)].into_iter()), fill(320, 360), "the largest region");
        assert_eq!(agreed([fill(320, 240), LayerChoice::Auto].into_iter()), LayerChoice::Auto, "a recording takes the top layer");
        let rid = || LayerChoice::Rid("h".into());
        assert_eq!(agreed([rid(), rid()].into_iter()), rid());
        assert_eq!(agreed([rid(), fill(1, 1)].into_iter()), LayerChoice::Auto);
    }

    /// A relayed layered video's producer hears the layer its taps agree on, on a change
    /// only: a mixer's region alone, the top layer while a recording also reads it.
    #[tokio::test]
    async fn the_producer_hears_the_layer_the_taps_agree_on() {
        let streams = LocalStreams::new();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        let on_need: NeedFn = Arc::new(move |n| h.lock().unwrap().push(n));
        let track = LocalTrack { kind: MediaKind::Video, codec: vp8(), on_keyframe: Arc::new(|| {}), rid: None, on_need: Some(on_need) };
        streams.publish_local("r", "s", vec![track]);
        let mixer = streams.tap("s", MediaKind::Video).unwrap();
        assert!(heard.lock().unwrap().is_empty(), "a new tap takes the top layer, as the producer sends");
        streams.set_tap_layer("s", MediaKind::Video, mixer.sink_id, LayerChoice::Fill { width: 320, height: 240 });
        streams.set_tap_layer("s", MediaKind::Video, mixer.sink_id, LayerChoice::Fill { width: 320, height: 240 });
        let recorder = streams.tap("s", MediaKind::Video).unwrap();
        streams.untap("s", MediaKind::Video, recorder.sink_id);
        let fill = Need::Choice(LayerChoice::Fill { width: 320, height: 240 });
        assert_eq!(*heard.lock().unwrap(), [fill.clone(), Need::Choice(LayerChoice::Auto), fill]);
    }

    #[tokio::test]
    async fn a_layered_video_made_here_is_tapped_whole_at_its_top_or_layer_by_layer() {
        let streams = LocalStreams::new();
        let heard = Arc::new(Mutex::new(Vec::new()));
        // A mixer's view with a half layer: declared lowest first, each layer its own track.
        let layer = |rid: &str, tell: bool| {
            let h = heard.clone();
            let name = rid.to_string();
            let on_need: Option<NeedFn> = tell.then(|| Arc::new(move |n| h.lock().unwrap().push((name.clone(), n))) as NeedFn);
            LocalTrack { kind: MediaKind::Video, codec: vp8(), on_keyframe: Arc::new(|| {}), rid: Some(rid.into()), on_need }
        };
        let sinks = streams.publish_local("r", "v", vec![layer("x1_2", true), layer("x1", false)]);
        assert_eq!(streams.layers("v"), ["x1_2", "x1"]);
        // A whole-video tap (a recording) reads the top layer.
        let mut whole = streams.tap("v", MediaKind::Video).unwrap();
        let mut half = streams.tap_layer("v", "x1_2").unwrap();
        assert!(streams.tap_layer("v", "x1_4").is_none());
        sinks[0].send(b"half");
        sinks[1].send(b"full");
        assert_eq!(&whole.recv().await.unwrap()[..], b"full");
        assert_eq!(&half.recv().await.unwrap()[..], b"half");
        // The lower layer's producer hears when someone takes it and when nobody does.
        streams.untap("v", MediaKind::Video, half.sink_id);
        assert_eq!(*heard.lock().unwrap(), [("x1_2".to_string(), Need::Layer(true)), ("x1_2".to_string(), Need::Layer(false))]);
        // Layer choices are not for it.
        streams.set_tap_layer("v", MediaKind::Video, whole.sink_id, LayerChoice::Fill { width: 10, height: 10 });
        assert_eq!(heard.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn packets_fan_out_to_every_tap_until_the_stream_ends() {
        let streams = LocalStreams::new();
        let keyframes = Arc::new(AtomicUsize::new(0));
        let k = keyframes.clone();
        let on_keyframe = Arc::new(move || {
            k.fetch_add(1, Ordering::Relaxed);
        });
        let sinks =
            streams.publish_local("r", "r-common", vec![LocalTrack { kind: MediaKind::Video, codec: vp8(), on_keyframe, rid: None, on_need: None }]);
        assert_eq!(streams.stream_room("r-common").as_ref().map(|r| r.as_str()), Some("r"));
        assert!(streams.tap("r-common", MediaKind::Audio).is_none());
        assert!(!sinks[0].has_consumers());
        sinks[0].send(b"before anyone");
        let mut a = streams.tap("r-common", MediaKind::Video).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(keyframes.load(Ordering::Relaxed), 1, "a new tap asks for a picture at once");
        let mut b = streams.tap("r-common", MediaKind::Video).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(keyframes.load(Ordering::Relaxed), 1, "the second's request, inside the window, waits...");
        tokio::time::sleep(KEYFRAME_INTERVAL).await;
        assert_eq!(keyframes.load(Ordering::Relaxed), 2, "...and is made at the end of the window, not dropped");
        assert_eq!(a.codec, vp8());
        sinks[0].send(b"one");
        for _ in 0..10 {
            streams.request_keyframe("r-common");
        }
        tokio::time::sleep(KEYFRAME_INTERVAL + Duration::from_millis(100)).await;
        assert_eq!(keyframes.load(Ordering::Relaxed), 3, "ten requests at once are one");
        for tap in [&mut a, &mut b] {
            assert_eq!(tap.recv().await.as_deref(), Some(&b"one"[..]));
        }
        streams.untap("r-common", MediaKind::Video, a.sink_id);
        assert_eq!(tokio::time::timeout(Duration::from_secs(1), a.recv()).await.unwrap(), None);
        assert!(sinks[0].has_consumers());
        streams.unpublish_local("r-common");
        assert_eq!(tokio::time::timeout(Duration::from_secs(1), b.recv()).await.unwrap(), None);
        assert!(!sinks[0].has_consumers());
        assert_eq!(streams.count(), 0);
    }
}
