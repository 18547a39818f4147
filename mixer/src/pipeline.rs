//! One GStreamer pipeline per running view (see `docs/mixer.md` for the diagram):
//!
//! ```text
//! videotestsrc (background colour, live clock) ─┐
//! appsrc → rtpjitterbuffer → depay → decoder ───┼→ compositor → vp8enc/x264enc → pay → appsink → RtpSink
//! appsrc → ... (one branch per video input)  ───┘      └→ (lower layers: tee → valve → videoscale → encoder → pay → appsink)
//! audiotestsrc (silence, live clock) ───────────┐
//! appsrc → rtpjitterbuffer → rtpopusdepay → opusdec ┼→ audiomixer → opusenc → rtpopuspay → appsink → RtpSink
//! ```
//!
//! Inputs are bins added and removed while the pipeline plays, on compositor/audiomixer
//! request pads. The silent/background sources keep the mix producing output with zero
//! inputs; `ignore-inactive-pads` keeps a stalled input from holding the mix back; the
//! decoders ignore corrupt frames (`max-errors=-1`) so a bad input freezes alone.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use tessera_core::agent::MediaKind;
use tessera_core::media::{RtpSink, with_payload_type};
use tessera_core::room::View;
use tracing::{debug, warn};

use crate::layout::Rect;

/// Payload types used inside the pipeline (inputs are rewritten to them).
pub(crate) const VIDEO_PT: u8 = 96;
pub(crate) const AUDIO_PT: u8 = 111;

/// Errors building or changing a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// An element could not be made or linked (missing plugin, bad description).
    #[error("GStreamer: {0}")]
    Gst(String),
}

impl From<gst::glib::Error> for PipelineError {
    fn from(e: gst::glib::Error) -> Self {
        PipelineError::Gst(e.to_string())
    }
}

impl From<gst::glib::BoolError> for PipelineError {
    fn from(e: gst::glib::BoolError) -> Self {
        PipelineError::Gst(e.to_string())
    }
}

/// One input branch in the pipeline.
struct Branch {
    bin: gst::Bin,
    appsrc: gst_app::AppSrc,
    mixer_pad: gst::Pad,
    /// Audio inputs: smoothed mean square of the decoded samples (f32 bits, full scale = 1).
    level: Option<Arc<AtomicU32>>,
}

/// Follows the loudness of an audio input from the buffers leaving its branch (S16LE).
/// An exponential average over ~100 ms of 20 ms buffers: short clicks don't make a speaker.
fn measure_level(pad: &gst::Pad) -> Arc<AtomicU32> {
    let level = Arc::new(AtomicU32::new(0f32.to_bits()));
    let store = level.clone();
    pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
        if let Some(buffer) = info.buffer()
            && let Ok(map) = buffer.map_readable()
        {
            let bytes = map.as_slice();
            let n = bytes.len() / 2;
            if n > 0 {
                let sum: f64 = bytes.chunks_exact(2).map(|c| f64::from(i16::from_le_bytes([c[0], c[1]])).powi(2)).sum();
                let ms = (sum / n as f64 / (32768.0 * 32768.0)) as f32;
                let old = f32::from_bits(store.load(Ordering::Relaxed));
                store.store((old * 0.8 + ms * 0.2).to_bits(), Ordering::Relaxed);
            }
        }
        gst::PadProbeReturn::Ok
    });
    level
}

/// What the video encoder of a view did, over all its pipelines (a view keeps one across
/// restarts, so its totals only grow, as Prometheus counters must).
#[derive(Debug, Default)]
pub struct EncoderStats {
    /// Frames out of the encoder.
    pub frames: AtomicU64,
    /// Frames whose encode time was measured (matched in by timestamp).
    pub timed: AtomicU64,
    /// Sum of their encode times, in microseconds.
    pub encode_us: AtomicU64,
    /// Frames in the encoder: (timestamp, when it went in).
    pending: std::sync::Mutex<std::collections::VecDeque<(gst::ClockTime, std::time::Instant)>>,
}

/// Counts frames out of `encoder` and times each from its sink pad to its src pad. Both
/// encoders run without frame reordering or lag (zerolatency, lag-in-frames=0), so a frame
/// leaves with the timestamp it came in with.
fn measure_encoder(encoder: &gst::Element, stats: &Arc<EncoderStats>) {
    if let Ok(mut q) = stats.pending.lock() {
        // Frames of a previous pipeline never come out of this one.
        q.clear();
    }
    if let Some(pad) = encoder.static_pad("sink") {
        let stats = stats.clone();
        pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            if let (Some(pts), Ok(mut q)) = (info.buffer().and_then(|b| b.pts()), stats.pending.lock()) {
                q.push_back((pts, std::time::Instant::now()));
                // Frames the encoder dropped never come out: forget them.
                if q.len() > 32 {
                    q.pop_front();
                }
            }
            gst::PadProbeReturn::Ok
        });
    }
    if let Some(pad) = encoder.static_pad("src") {
        let stats = stats.clone();
        pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            stats.frames.fetch_add(1, Ordering::Relaxed);
            if let (Some(pts), Ok(mut q)) = (info.buffer().and_then(|b| b.pts()), stats.pending.lock()) {
                while let Some((p, at)) = q.pop_front() {
                    if p == pts {
                        stats.timed.fetch_add(1, Ordering::Relaxed);
                        stats.encode_us.fetch_add(at.elapsed().as_micros() as u64, Ordering::Relaxed);
                        break;
                    }
                }
            }
            gst::PadProbeReturn::Ok
        });
    }
}

/// A running view pipeline.
pub struct ViewPipeline {
    pipeline: gst::Pipeline,
    compositor: Option<gst::Element>,
    audiomixer: Option<gst::Element>,
    /// One appsink per layer of the mixed video, full size first.
    video_sinks: Vec<gst::Element>,
    /// The lower layers' valves (index 0 is layer 1): closed while nobody takes the layer,
    /// so it is neither scaled nor encoded; open at the start.
    valves: Vec<gst::Element>,
    width: u32,
    height: u32,
    branches: HashMap<(String, MediaKind), Branch>,
    /// Set whenever the video encoder output a packet; the supervisor clears and checks it.
    pub video_produced: Arc<AtomicBool>,

    /// The first error an element posted, if any: an aggregator that errors stops for
    /// good while the other half (audio or video) goes on, so the view must be rebuilt.
    pub failed: Arc<std::sync::Mutex<Option<String>>>,
}

/// Pixels a second one encoder thread is given: 1080p30 (one libvpx thread at `cpu-used=8`
/// encodes a 1080p frame in about 16 ms on the reference machine, half its 33 ms).
const PIXELS_PER_ENCODER_THREAD: u64 = 1920 * 1080 * 30;

/// Encoder threads for a view: one per 1080p30 of pixel rate, at most the CPUs this process
/// may use. libvpx threads spin while they wait for each other, so a thread more than the
/// picture needs only burns CPU another view could use (measured: two 9-input 720p30 views
/// on two CPUs with `threads=2` each made 20 fps on 174 % of a core, with one thread each
/// 30 fps on 130 %; a view pinned to one CPU with `threads=2` made 5 of 30 fps).
fn encoder_threads(width: u32, height: u32, fps: u32) -> usize {
    let pixels = u64::from(width) * u64::from(height) * u64::from(fps.max(1));
    let needed = usize::try_from(pixels.div_ceil(PIXELS_PER_ENCODER_THREAD)).unwrap_or(usize::MAX);
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    needed.clamp(1, cpus.max(1))
}

/// Name prefix of input branch bins, so bus messages can tell an input's failure from the
/// view's.
const INPUT_BIN_PREFIX: &str = "mix-input-";

/// Aggregator settings shared by the compositor and the audio mixer: always live (a failed
/// latency query must not make them wait for every input), and room for inputs that join
/// later with more latency (jitter buffer + decoder) than the test sources had.
const AGGREGATOR_LIVE: &str = "force-live=true min-upstream-latency=120000000 ignore-inactive-pads=true";

impl ViewPipeline {
    /// Whether this pipeline makes video (audio-only views have nothing to watch).
    pub fn has_video(&self) -> bool {
        !self.video_sinks.is_empty()
    }
}

/// Target bitrate of a lower layer: the full one's times the area ratio to the power 0.75
/// (a smaller picture needs more bits per pixel), at least 50 kbit/s.
pub fn layer_bitrate_kbps(full_kbps: u32, (n, d): (u32, u32)) -> u32 {
    let area = (f64::from(n) / f64::from(d.max(1))).powi(2);
    ((f64::from(full_kbps) * area.powf(0.75)) as u32).max(50)
}

/// The encoder and payloader of one layer, ending in appsink `vsink<i>`.
fn encoder_desc(codec: &str, i: usize, width: u32, height: u32, fps: u32, kbps: u32, kfi: u32) -> String {
    let threads = encoder_threads(width, height, fps);
    let encoder = if codec == "h264" {
        format!(
            "x264enc name=venc{i} tune=zerolatency speed-preset=ultrafast bitrate={kbps} key-int-max={kfi} threads={threads} ! video/x-h264,profile=constrained-baseline ! rtph264pay pt={VIDEO_PT} mtu=1200 config-interval=-1"
        )
    } else {
        format!(
            "vp8enc name=venc{i} deadline=1 cpu-used=8 end-usage=cbr target-bitrate={bps} keyframe-max-dist={kfi} lag-in-frames=0 error-resilient=partitions threads={threads} static-threshold=100 ! rtpvp8pay pt={VIDEO_PT} mtu=1200 picture-id-mode=15-bit",
            bps = kbps * 1000
        )
    };
    // A lower layer's sink may see no buffer for a long time (its valve closed): it must
    // not hold the pipeline's state change waiting for one.
    let wait = if i == 0 { "" } else { " async=false" };
    format!("{encoder} ! appsink name=vsink{i} sync=false emit-signals=false max-buffers=64 drop=true{wait} ")
}

/// Encoder bitrate for a view, in kbit/s: configured, or derived like OWT from resolution,
/// frame rate and motion factor.
pub fn bitrate_kbps(view: &View) -> u32 {
    let Some(v) = &view.video else { return 0 };
    if let Some(b) = v.parameters.bitrate {
        return b;
    }
    let pixels = f64::from(v.parameters.resolution.width * v.parameters.resolution.height);
    let kbps = pixels * f64::from(v.parameters.framerate) * v.motion_factor * 0.07 / 1000.0;
    (kbps as u32).clamp(100, 20_000)
}

fn rgb_hex(view: &View) -> u32 {
    let c = view.video.as_ref().map(|v| v.bg_color).unwrap_or_default();
    0xFF00_0000 | (u32::from(c.r) << 16) | (u32::from(c.g) << 8) | u32::from(c.b)
}

/// Hands the encoder's RTP packets (one per appsink buffer) to the mixed stream's track.
fn forward_to(sink: &gst_app::AppSink, out: Arc<dyn RtpSink>, produced: Option<Arc<AtomicBool>>) {
    sink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |s| {
                let sample = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                if let Some(p) = &produced {
                    p.store(true, Ordering::Relaxed);
                }
                let Some(buffer) = sample.buffer() else { return Ok(gst::FlowSuccess::Ok) };
                let Ok(map) = buffer.map_readable() else { return Ok(gst::FlowSuccess::Ok) };
                out.send(map.as_slice());
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
}

impl ViewPipeline {
    /// Builds and starts the pipeline of a view, feeding the given tracks.
    pub fn start(
        view: &View,
        video_out: Vec<Arc<dyn RtpSink>>,
        audio_out: Option<Arc<dyn RtpSink>>,
        encoder: &Arc<EncoderStats>,
    ) -> Result<ViewPipeline, PipelineError> {
        gst::init()?;
        let mut desc = String::new();
        let (mut width, mut height) = (0, 0);
        if let (Some(v), false) = (&view.video, video_out.is_empty()) {
            let p = &v.parameters;
            (width, height) = (p.resolution.width, p.resolution.height);
            let caps = format!("video/x-raw,format=I420,width={},height={},framerate={}/1", width, height, p.framerate);
            let kbps = bitrate_kbps(view);
            let codec = v.format.codec.as_str();
            let (fps, kfi) = (p.framerate, p.key_frame_interval);
            let full = encoder_desc(codec, 0, width, height, fps, kbps, kfi);
            let head = format!(
                "videotestsrc is-live=true pattern=solid-color foreground-color={bg} ! {caps} ! compositor name=comp {AGGREGATOR_LIVE} background=black ! {caps} ! ",
                bg = rgb_hex(view)
            );
            if video_out.len() < 2 {
                desc.push_str(&format!("{head}queue max-size-buffers=2 leaky=downstream ! {full}"));
            } else {
                // A tee after the compositor: the full layer as before, and each lower one
                // behind a valve, scaled, with its own encoder. The valves start open: the SFU
                // takes every layer of a new stream to flow until it says which nobody takes.
                desc.push_str(&format!("{head}tee name=vtee vtee. ! queue max-size-buffers=2 leaky=downstream ! {full}"));
                for (i, (_, r, scale)) in v.layer_sizes().iter().enumerate().skip(1).take(video_out.len() - 1) {
                    let layer = encoder_desc(codec, i, r.width, r.height, fps, layer_bitrate_kbps(kbps, *scale), kfi);
                    desc.push_str(&format!(
                        "vtee. ! queue max-size-buffers=2 leaky=downstream ! valve name=vvalve{i} drop=false ! videoscale ! video/x-raw,width={w},height={h} ! {layer}",
                        w = r.width,
                        h = r.height
                    ));
                }
            }
        }
        if let (Some(_), Some(_)) = (&view.audio, &audio_out) {
            desc.push_str(&format!(
                "audiotestsrc is-live=true wave=silence samplesperbuffer=960 ! audio/x-raw,format=S16LE,rate=48000,channels=2 ! audiomixer name=amix {AGGREGATOR_LIVE} ! audio/x-raw,format=S16LE,rate=48000,channels=2 ! audioconvert ! opusenc bitrate=64000 frame-size=20 ! rtpopuspay pt={AUDIO_PT} ! appsink name=asink sync=false emit-signals=false max-buffers=64 drop=true"
            ));
        }
        if desc.is_empty() {
            return Err(PipelineError::Gst("view has neither audio nor video".into()));
        }
        let pipeline = gst::parse::launch(&desc)?.downcast::<gst::Pipeline>().map_err(|_| PipelineError::Gst("not a pipeline".into()))?;
        let compositor = pipeline.by_name("comp");
        let audiomixer = pipeline.by_name("amix");
        let video_produced = Arc::new(AtomicBool::new(false));
        if let Some(venc) = pipeline.by_name("venc0") {
            measure_encoder(&venc, encoder);
        }
        let mut video_sinks = Vec::new();
        let mut valves = Vec::new();
        for (i, fanout) in video_out.into_iter().enumerate() {
            let Some(sink) = pipeline.by_name(&format!("vsink{i}")) else { break };
            let appsink = sink.clone().downcast::<gst_app::AppSink>().map_err(|_| PipelineError::Gst(format!("vsink{i}")))?;
            // The full layer's output is what the stall watch looks at.
            forward_to(&appsink, fanout, (i == 0).then(|| video_produced.clone()));
            video_sinks.push(sink);
            if i > 0
                && let Some(valve) = pipeline.by_name(&format!("vvalve{i}"))
            {
                valves.push(valve);
            }
        }
        if let (Some(sink), Some(fanout)) = (pipeline.by_name("asink"), audio_out) {
            let appsink = sink.downcast::<gst_app::AppSink>().map_err(|_| PipelineError::Gst("asink".into()))?;
            forward_to(&appsink, fanout, None);
        }
        // The background covers the whole canvas under every input.
        if let Some(comp) = &compositor
            && let Some(pad) = comp.static_pad("sink_0")
        {
            pad.set_property("zorder", 0u32);
        }
        let failed: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        if let Some(bus) = pipeline.bus() {
            let (failed, weak) = (failed.clone(), pipeline.downgrade());
            // Nobody pops this bus: handle what matters here and drop every message, so
            // none pile up for the pipeline's lifetime.
            bus.set_sync_handler(move |_, msg| {
                use gst::MessageView;
                let from = || msg.src().map(|s| s.path_string().to_string()).unwrap_or_default();
                match msg.view() {
                    // An input branch that fails (a publisher sending garbage its depayloader
                    // refuses, a flow error while it is being removed) only loses that input:
                    // its region freezes and the mix goes on. Anything else stops the view.
                    MessageView::Error(e) if from().contains(INPUT_BIN_PREFIX) => {
                        warn!(element = %from(), error = %e.error(), "mix input failed; it stays frozen until it leaves");
                    }
                    MessageView::Error(e) => {
                        warn!(element = %from(), error = %e.error(), debug = ?e.debug(), "view pipeline error");
                        if let Ok(mut f) = failed.lock() {
                            f.get_or_insert_with(|| format!("{}: {}", from(), e.error()));
                        }
                    }
                    MessageView::Warning(w) => debug!(element = %from(), warning = %w.error(), "view pipeline warning"),
                    // An input joined with more latency: re-distribute it (not from a
                    // streaming thread, hence call_async).
                    MessageView::Latency(_) => {
                        if let Some(p) = weak.upgrade() {
                            p.call_async(|p| {
                                let _ = p.recalculate_latency();
                            });
                        }
                    }
                    _ => {}
                }
                gst::BusSyncReply::Drop
            });
        }
        pipeline.set_state(gst::State::Playing).map_err(|e| PipelineError::Gst(format!("cannot play: {e}")))?;
        // Wait until it plays: a branch added while the state change is still in flight
        // would sync to PAUSED and never flow.
        let (result, _, _) = pipeline.state(gst::ClockTime::from_seconds(3));
        result.map_err(|e| PipelineError::Gst(format!("pipeline did not start: {e}")))?;
        Ok(ViewPipeline { pipeline, compositor, audiomixer, video_sinks, valves, width, height, branches: HashMap::new(), video_produced, failed })
    }

    /// The pipeline's bus, to watch for errors.
    pub fn bus(&self) -> Option<gst::Bus> {
        self.pipeline.bus()
    }

    /// Adds an input branch for one track of a stream; returns where to push its RTP.
    pub fn add_input(&mut self, stream: &str, kind: MediaKind, codec_mime: &str) -> Result<gst_app::AppSrc, PipelineError> {
        let key = (stream.to_string(), kind);
        if let Some(b) = self.branches.get(&key) {
            return Ok(b.appsrc.clone());
        }
        let mime = codec_mime.to_ascii_lowercase();
        let (desc, mixer) = match kind {
            MediaKind::Video => {
                let Some(comp) = &self.compositor else { return Err(PipelineError::Gst("view has no video".into())) };
                let (enc, depay, dec) = match mime.as_str() {
                    "video/h264" => ("H264", "rtph264depay", "avdec_h264 max-errors=-1"),
                    "video/vp9" => ("VP9", "rtpvp9depay", "vp9dec max-errors=-1"),
                    _ => ("VP8", "rtpvp8depay", "vp8dec max-errors=-1"),
                };
                (
                    format!(
                        "appsrc name=src is-live=true format=time do-timestamp=true max-bytes=2000000 leaky-type=downstream caps=\"application/x-rtp,media=video,encoding-name={enc},clock-rate=90000,payload={VIDEO_PT}\" ! rtpjitterbuffer latency=80 drop-on-latency=true ! {depay} ! {dec} ! videoconvert ! videoscale ! queue max-size-buffers=3 leaky=downstream"
                    ),
                    comp.clone(),
                )
            }
            MediaKind::Audio => {
                let Some(amix) = &self.audiomixer else { return Err(PipelineError::Gst("view has no audio".into())) };
                (
                    format!(
                        "appsrc name=src is-live=true format=time do-timestamp=true max-bytes=500000 leaky-type=downstream caps=\"application/x-rtp,media=audio,encoding-name=OPUS,clock-rate=48000,payload={AUDIO_PT}\" ! rtpjitterbuffer latency=80 drop-on-latency=true ! rtpopusdepay ! opusdec plc=true ! audioconvert ! audioresample ! audio/x-raw,format=S16LE,rate=48000,channels=2 ! queue max-size-time=200000000 leaky=downstream"
                    ),
                    amix.clone(),
                )
            }
        };
        let bin = gst::parse::bin_from_description(&desc, true)?;
        static NEXT_INPUT: AtomicU64 = AtomicU64::new(0);
        bin.set_property("name", format!("{INPUT_BIN_PREFIX}{}", NEXT_INPUT.fetch_add(1, Ordering::Relaxed)));
        let appsrc =
            bin.by_name("src").and_then(|e| e.downcast::<gst_app::AppSrc>().ok()).ok_or_else(|| PipelineError::Gst("input appsrc".into()))?;
        self.pipeline.add(&bin)?;
        let src_pad = bin.static_pad("src").ok_or_else(|| PipelineError::Gst("input bin has no src pad".into()))?;
        let mixer_pad = mixer.request_pad_simple("sink_%u").ok_or_else(|| PipelineError::Gst("no mixer pad".into()))?;
        if kind == MediaKind::Video {
            mixer_pad.set_property("zorder", 1u32);
            mixer_pad.set_property_from_str("sizing-policy", "keep-aspect-ratio");
            // Hidden until the layout places it.
            mixer_pad.set_property("alpha", 0.0f64);
        }
        src_pad.link(&mixer_pad).map_err(|e| PipelineError::Gst(format!("linking input: {e:?}")))?;
        let level = (kind == MediaKind::Audio).then(|| measure_level(&src_pad));
        // The pipeline always plays while inputs come and go.
        bin.set_state(gst::State::Playing).map_err(|e| PipelineError::Gst(format!("starting input: {e}")))?;
        self.branches.insert(key, Branch { bin, appsrc: appsrc.clone(), mixer_pad, level });
        Ok(appsrc)
    }

    /// Removes an input branch; the others keep flowing.
    pub fn remove_input(&mut self, stream: &str, kind: MediaKind) {
        let Some(b) = self.branches.remove(&(stream.to_string(), kind)) else { return };
        // Detach from the mixer first: stopping a branch whose thread is inside the
        // aggregator's chain function could wait on the aggregator.
        if let Some(src) = b.bin.static_pad("src") {
            let _ = src.unlink(&b.mixer_pad);
        }
        if let Some(parent) = b.mixer_pad.parent_element() {
            parent.release_request_pad(&b.mixer_pad);
        }
        let _ = b.bin.set_state(gst::State::Null);
        let _ = self.pipeline.remove(&b.bin);
    }

    /// Places video inputs: each assigned stream's pad gets its region; others are hidden.
    /// Returns each placed stream's region size in pixels.
    pub fn apply_layout(&self, assigned: &[(Rect, Option<String>)]) -> Vec<(String, (u32, u32))> {
        let mut sizes = Vec::new();
        for ((stream, kind), b) in &self.branches {
            if *kind != MediaKind::Video {
                continue;
            }
            match assigned.iter().find(|(_, s)| s.as_deref() == Some(stream.as_str())) {
                Some((rect, _)) => {
                    let (x, y, w, h) = rect.pixels(self.width, self.height);
                    b.mixer_pad.set_property("xpos", x);
                    b.mixer_pad.set_property("ypos", y);
                    b.mixer_pad.set_property("width", w);
                    b.mixer_pad.set_property("height", h);
                    b.mixer_pad.set_property("alpha", 1.0f64);
                    sizes.push((stream.clone(), (w.unsigned_abs(), h.unsigned_abs())));
                }
                None => b.mixer_pad.set_property("alpha", 0.0f64),
            }
        }
        sizes
    }

    /// The loudness of each audio input in dBFS (−100 for silence), for voice activity.
    pub fn audio_levels(&self) -> Vec<(String, f32)> {
        self.branches
            .iter()
            .filter_map(|((stream, _), b)| {
                b.level.as_ref().map(|l| (stream.clone(), 10.0 * f32::from_bits(l.load(Ordering::Relaxed)).max(1e-10).log10()))
            })
            .collect()
    }

    /// Asks the encoder of layer `layer` (0: full size) for a keyframe now.
    pub fn force_keyframe(&self, layer: usize) {
        if let Some(sink) = self.video_sinks.get(layer) {
            let s = gst::Structure::builder("GstForceKeyUnit").field("all-headers", true).build();
            sink.send_event(gst::event::CustomUpstream::new(s));
        }
    }

    /// Opens (someone takes it) or closes a lower layer's valve; an opened layer starts
    /// with a keyframe.
    pub fn set_layer_active(&self, layer: usize, active: bool) {
        let Some(valve) = layer.checked_sub(1).and_then(|i| self.valves.get(i)) else { return };
        if valve.property::<bool>("drop") == active {
            valve.set_property("drop", !active);
            if active {
                self.force_keyframe(layer);
            }
        }
    }

    /// Pushes one marshalled RTP packet of an input into its appsrc, with the pipeline's
    /// payload type (rewritten in place, no copy).
    pub fn push(appsrc: &gst_app::AppSrc, kind: MediaKind, packet: bytes::Bytes) {
        let pt = match kind {
            MediaKind::Video => VIDEO_PT,
            MediaKind::Audio => AUDIO_PT,
        };
        if let Err(e) = appsrc.push_buffer(gst::Buffer::from_slice(with_payload_type(packet, pt))) {
            debug!(error = ?e, "input dropped by the pipeline");
        }
    }
}

impl Drop for ViewPipeline {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    #[test]
    fn one_encoder_thread_per_1080p30() {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        assert_eq!(encoder_threads(1280, 720, 30), 1);
        assert_eq!(encoder_threads(1920, 1080, 30), 1);
        assert_eq!(encoder_threads(320, 240, 0), 1);
        assert_eq!(encoder_threads(1920, 1080, 60), 2.min(cpus));
        assert_eq!(encoder_threads(3840, 2160, 30), 4.min(cpus));
    }

    /// A track that hands the mixed packets to a channel.
    struct Collect(mpsc::Sender<Vec<u8>>);

    impl RtpSink for Collect {
        fn send(&self, packet: &[u8]) {
            let _ = self.0.send(packet.to_vec());
        }
        fn has_consumers(&self) -> bool {
            true
        }
    }

    fn collect() -> (Arc<dyn RtpSink>, mpsc::Receiver<Vec<u8>>) {
        let (tx, rx) = mpsc::channel();
        (Arc::new(Collect(tx)), rx)
    }

    fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn an_input_failure_loses_only_that_input_and_an_aggregator_failure_marks_the_view() {
        let (video, vrx) = collect();
        let (audio, arx) = collect();
        let p = ViewPipeline::start(&View::default(), vec![video], Some(audio), &Arc::default()).unwrap();
        // With no input the view still produces: background video and silence.
        wait_for("mixed video", || vrx.try_recv().is_ok());
        wait_for("mixed audio", || arx.try_recv().is_ok());
        assert!(p.failed.lock().unwrap().is_none());

        // An input that fails loses only itself: the view is not marked failed.
        let mut p = p;
        let appsrc = p.add_input("s1", MediaKind::Video, "video/VP8").unwrap();
        gst::element_error!(appsrc, gst::CoreError::Failed, ("input failure"));
        std::thread::sleep(Duration::from_millis(200));
        assert!(p.failed.lock().unwrap().is_none(), "{:?}", p.failed.lock().unwrap());
        while vrx.try_recv().is_ok() {}
        wait_for("mixed video after the input's failure", || vrx.try_recv().is_ok());

        // An aggregator that fails stops for good: the view must say so, naming it.
        let comp = p.compositor.clone().unwrap();
        gst::element_error!(comp, gst::CoreError::Failed, ("injected failure"));
        wait_for("the failure to be recorded", || p.failed.lock().unwrap().is_some());
        let failed = p.failed.lock().unwrap().clone().unwrap();
        assert!(failed.contains("comp") && failed.contains("injected failure"), "{failed}");
    }

    /// The picture size of a VP8 keyframe's first RTP packet, if it is one (the payloader
    /// adds no header extension).
    fn vp8_keyframe_size(rtp: &[u8]) -> Option<(u16, u16)> {
        let csrcs = usize::from(*rtp.first()? & 0x0f);
        tessera_webrtc_agent::simulcast::vp8_keyframe_size(rtp.get(12 + 4 * csrcs..)?)
    }

    #[test]
    fn a_lower_layer_is_encoded_at_its_size_only_while_it_is_taken() {
        let view: View = serde_json::from_value(serde_json::json!({"label": "l", "audio": false, "video": {"layers": ["x1/2", "x1/4"]}})).unwrap();
        let (full, full_rx) = collect();
        let (half, half_rx) = collect();
        let (quarter, quarter_rx) = collect();
        let p = ViewPipeline::start(&view, vec![full, half, quarter], None, &Arc::default()).unwrap();
        let keyframe = |rx: &mpsc::Receiver<Vec<u8>>| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(pkt) = rx.recv_timeout(Duration::from_millis(100))
                    && let Some(size) = vp8_keyframe_size(&pkt)
                {
                    return Some(size);
                }
            }
            None
        };
        assert_eq!(keyframe(&full_rx), Some((640, 480)));
        // Every layer flows from the start, at its size.
        assert_eq!(keyframe(&half_rx), Some((320, 240)));
        assert_eq!(keyframe(&quarter_rx), Some((160, 120)));
        // Nobody takes the lower layers: nothing more is encoded for them (after what was
        // in flight).
        p.set_layer_active(1, false);
        p.set_layer_active(2, false);
        std::thread::sleep(Duration::from_millis(300));
        while half_rx.try_recv().is_ok() || quarter_rx.try_recv().is_ok() {}
        std::thread::sleep(Duration::from_millis(400));
        assert!(half_rx.try_recv().is_err() && quarter_rx.try_recv().is_err(), "a lower layer was encoded while closed");
        // Taken again: it starts with a keyframe at its size.
        p.set_layer_active(1, true);
        assert_eq!(keyframe(&half_rx), Some((320, 240)), "the half layer starts again with a keyframe at its size");
        assert!(quarter_rx.try_recv().is_err(), "the quarter layer opened with the half one");
        // The full layer flowed throughout.
        assert!(full_rx.recv_timeout(Duration::from_secs(1)).is_ok());
    }
}
