//! Tessera's MCU: each view of a room yields one **mixed stream** (`<roomId>-<label>`),
//! composed with GStreamer from the forward streams mixed into it, and offered to
//! subscribers exactly like a forward stream: the mixer takes and offers streams only
//! through a [`StreamSource`] (the webrtc-agent's fan-outs in one process).
//!
//! A view's pipeline runs only while someone consumes the mixed stream (a subscriber or
//! a recorder taps it): a supervisor task per view checks four times a second, starts the
//! pipeline on demand and stops it after a few idle seconds. Inputs are taps on the
//! forward streams, fed into the pipeline's appsrcs.

pub mod layout;
pub mod pipeline;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tessera_core::agent::{AgentEvent, LayerChoice, MediaKind, StreamUpdate};
use tessera_core::command::{MixCommand, MixError, MixNode, MixReply};
use tessera_core::media::{CodecInfo, LocalTrack, RtpSink, StreamImporter, StreamSource, ensure_stream};
use tessera_core::room::{CustomTemplate, VideoParameters, View};
use tessera_core::stream::{LayoutEntry, MixedInfo, StreamInfo, StreamKind, TrackFormat, TrackInfo, TrackStatus};
use tessera_core::{RoomId, StreamId, ViewLabel};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use layout::{Rect, Templates};
use pipeline::ViewPipeline;

/// How long a view may have no consumer before its pipeline stops.
const IDLE_STOP: Duration = Duration::from_secs(3);
/// How often a view checks for consumers.
const SUPERVISE_EVERY: Duration = Duration::from_millis(250);
/// How often a running view tries again to bring inputs it could not take from other nodes
/// (doubling while it fails, up to [`IMPORT_RETRY_MAX`]).
const IMPORT_RETRY: Duration = Duration::from_secs(1);
const IMPORT_RETRY_MAX: Duration = Duration::from_secs(16);
/// A running view whose encoder produced no video for this long is rebuilt.
const STALL_RESTART: Duration = Duration::from_secs(2);
/// Inputs quieter than this (dBFS) are not speaking.
const VAD_FLOOR_DB: f32 = -50.0;
/// A new speaker must be this much louder than the current one...
const VAD_MARGIN_DB: f32 = 3.0;
/// ...for this many supervisor ticks in a row (500 ms), so a cough doesn't switch.
const VAD_TICKS: u32 = 2;

/// The mixed stream id of a view (OWT's convention).
pub fn mixed_stream_id(room: &str, label: &str) -> String {
    format!("{room}-{label}")
}

/// One view's encoder totals since the view started.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewMetrics {
    /// Room id.
    pub room: String,
    /// View label.
    pub view: String,
    /// Whether its pipeline runs (views stop while nobody consumes them).
    pub running: bool,
    /// Video frames encoded.
    pub frames: u64,
    /// Frames whose encode time was measured.
    pub timed_frames: u64,
    /// Sum of those encode times, in seconds.
    pub encode_secs: f64,
}

/// What a view mixes and how it lays it out.
struct ViewState {
    inputs: Vec<String>,
    pins: Vec<(String, String)>,
    /// Where each stream was last placed, so it stays there while others come and go.
    placed: Vec<(String, String)>,
    templates: Templates,
    pipeline: Option<ViewPipeline>,
    /// Taps feeding the pipeline: (stream, kind, sink id, feeder task).
    taps: Vec<(String, MediaKind, u64, tokio::task::JoinHandle<()>)>,
    idle_since: Option<Instant>,
    /// Last time the supervisor saw video output.
    last_output: Instant,
    /// Last time the supervisor rebuilt the pipeline.
    last_restart: Instant,
    /// The loudest input (voice activity), once one has spoken.
    active: Option<String>,
    /// A louder input and for how many supervisor ticks in a row it has been loudest.
    candidate: Option<(String, u32)>,
}

struct ViewMix {
    room: String,
    id: String,
    config: View,
    /// Its encoder's totals, over every pipeline it ran.
    encoder: Arc<pipeline::EncoderStats>,
    /// The mixed video's tracks, one per layer, full size first; empty without video.
    video_out: Vec<Arc<dyn RtpSink>>,
    /// Whether someone takes each layer (index 0, the full one, always flows): kept here
    /// so a pipeline started again opens the same valves.
    layer_need: Vec<AtomicBool>,
    audio_out: Option<Arc<dyn RtpSink>>,
    state: Mutex<ViewState>,
}

impl ViewMix {
    fn lock(&self) -> MutexGuard<'_, ViewState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Computes the placement and remembers it.
    fn assigned(&self, s: &mut ViewState) -> Vec<(Rect, Option<String>)> {
        let a = layout::assign(s.templates.for_inputs(s.inputs.len()), &s.inputs, &s.pins, &s.placed);
        s.placed = a.iter().filter_map(|(r, st)| st.clone().map(|st| (st, r.id.clone()))).collect();
        a
    }

    fn layout(&self) -> Vec<LayoutEntry> {
        let mut s = self.lock();
        layout::entries(&self.assigned(&mut s))
    }

    /// Opens or closes `p`'s lower layers as their needs were last told.
    fn apply_layer_needs(&self, p: &ViewPipeline) {
        for (i, need) in self.layer_need.iter().enumerate().skip(1) {
            p.set_layer_active(i, need.load(Ordering::Relaxed));
        }
    }

    fn demand(&self) -> bool {
        self.video_out.iter().any(|f| f.has_consumers()) || self.audio_out.as_ref().is_some_and(|f| f.has_consumers())
    }

    fn stream_info(&self) -> StreamInfo {
        let mut tracks = Vec::new();
        if let (Some(a), Some(_)) = (&self.config.audio, &self.audio_out) {
            tracks.push(TrackInfo {
                kind: MediaKind::Audio,
                source: "mixed".into(),
                mid: None,
                format: TrackFormat::Audio(a.format.clone()),
                parameters: None,
                status: TrackStatus::Active,
                rid: None,
            });
        }
        if let (Some(v), false) = (&self.config.video, self.video_out.is_empty()) {
            let full = pipeline::bitrate_kbps(&self.config);
            let layered = self.video_out.len() > 1;
            for (rid, resolution, scale) in v.layer_sizes().into_iter().take(self.video_out.len()) {
                let bitrate = if scale == (1, 1) { full } else { pipeline::layer_bitrate_kbps(full, scale) };
                tracks.push(TrackInfo {
                    kind: MediaKind::Video,
                    source: "mixed".into(),
                    mid: None,
                    format: TrackFormat::Video(v.format.clone()),
                    parameters: Some(VideoParameters { resolution, bitrate: Some(bitrate), ..v.parameters.clone() }),
                    status: TrackStatus::Active,
                    rid: layered.then_some(rid),
                });
            }
        }
        let active_input = self.lock().active.as_deref().map(StreamId::from);
        StreamInfo {
            id: self.id.as_str().into(),
            kind: StreamKind::Mixed(MixedInfo { label: self.config.label.as_str().into(), layout: self.layout(), active_input }),
            tracks,
            data: false,
        }
    }
}

/// The MCU service.
pub struct Mixer {
    source: Arc<dyn StreamSource>,
    /// Brings inputs produced on other nodes here (a cluster's relay).
    importer: std::sync::OnceLock<Arc<dyn StreamImporter>>,
    events: mpsc::Sender<AgentEvent>,
    rooms: Mutex<HashMap<String, HashMap<String, Arc<ViewMix>>>>,
}

fn opus_codec() -> CodecInfo {
    CodecInfo {
        mime_type: "audio/opus".into(),
        clock_rate: 48000,
        channels: 2,
        fmtp: "minptime=10;useinbandfec=1".into(),
        payload_type: Some(pipeline::AUDIO_PT),
    }
}

fn video_codec(codec: &str) -> CodecInfo {
    if codec == "h264" {
        CodecInfo {
            mime_type: "video/H264".into(),
            clock_rate: 90000,
            channels: 0,
            fmtp: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f".into(),
            payload_type: Some(pipeline::VIDEO_PT),
        }
    } else {
        CodecInfo { mime_type: "video/VP8".into(), clock_rate: 90000, channels: 0, fmtp: String::new(), payload_type: Some(pipeline::VIDEO_PT) }
    }
}

impl Mixer {
    /// A mixer taking its inputs from and offering its mixed streams through `source`,
    /// reporting mixed-stream updates (layout, active input) on `events`.
    pub fn new(source: Arc<dyn StreamSource>, events: mpsc::Sender<AgentEvent>) -> Arc<Mixer> {
        Arc::new(Mixer { source, importer: std::sync::OnceLock::new(), events, rooms: Mutex::new(HashMap::new()) })
    }

    /// Lets views take inputs published on other nodes (set once, by a cluster, before
    /// any view starts).
    pub fn set_importer(&self, importer: Arc<dyn StreamImporter>) {
        if self.importer.set(importer).is_err() {
            warn!("a second stream importer was ignored");
        }
    }

    /// Mixed views running, over every room (a node's load report).
    pub fn view_count(&self) -> usize {
        self.lock().values().map(HashMap::len).sum()
    }

    /// Each running view's encoder totals, for `/metrics`.
    pub fn metrics(&self) -> Vec<ViewMetrics> {
        let views: Vec<Arc<ViewMix>> = self.lock().values().flat_map(|v| v.values().cloned()).collect();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        views
            .iter()
            .map(|v| {
                let e = &v.encoder;
                ViewMetrics {
                    room: v.room.clone(),
                    view: v.config.label.clone(),
                    running: v.lock().pipeline.is_some(),
                    frames: load(&e.frames),
                    timed_frames: load(&e.timed),
                    encode_secs: load(&e.encode_us) as f64 / 1e6,
                }
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, HashMap<String, Arc<ViewMix>>>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn view(&self, room: &str, label: &str) -> Result<Arc<ViewMix>, MixError> {
        self.lock().get(room).and_then(|v| v.get(label)).cloned().ok_or_else(|| MixError::NoView(label.into()))
    }

    fn create_view(&self, room: &str, config: &View) -> Arc<ViewMix> {
        let id = mixed_stream_id(room, &config.label);
        let weak_view: Arc<Mutex<Weak<ViewMix>>> = Arc::new(Mutex::new(Weak::new()));
        let mut tracks = Vec::new();
        if config.audio.is_some() {
            tracks.push(LocalTrack { kind: MediaKind::Audio, codec: opus_codec(), on_keyframe: Arc::new(|| {}), rid: None, on_need: None });
        }
        let layers = config.video.as_ref().map(|v| v.layer_sizes()).unwrap_or_default();
        if let Some(v) = &config.video {
            // With lower layers, each is a simulcast layer of the mixed video (RID and all);
            // without, one plain track as ever.
            let layered = layers.len() > 1;
            // Declared lowest first, as browsers declare simulcast layers: the SFU ranks
            // layers in that order until it knows their sizes.
            for (i, (rid, _, _)) in layers.iter().enumerate().rev() {
                let w = weak_view.clone();
                let on_keyframe = Arc::new(move || {
                    let view = w.lock().ok().and_then(|g| g.upgrade());
                    if let Some(view) = view
                        && let Some(p) = &view.lock().pipeline
                    {
                        p.force_keyframe(i);
                    }
                });
                let w = weak_view.clone();
                let on_need: Option<tessera_core::media::NeedFn> = (layered && i > 0).then(|| {
                    Arc::new(move |need: tessera_core::media::Need| {
                        let tessera_core::media::Need::Layer(wanted) = need else { return };
                        let view = w.lock().ok().and_then(|g| g.upgrade());
                        if let Some(view) = view {
                            debug!(stream = %view.id, layer = i, wanted, "mixed layer need");
                            if let Some(n) = view.layer_need.get(i) {
                                n.store(wanted, Ordering::Relaxed);
                            }
                            // Called on a media thread, which must not wait: a view busy
                            // (adding an input) gets it from its supervisor's next tick.
                            if let Ok(s) = view.state.try_lock()
                                && let Some(p) = &s.pipeline
                            {
                                p.set_layer_active(i, wanted);
                            }
                        }
                    }) as tessera_core::media::NeedFn
                });
                let rid = layered.then(|| rid.clone());
                tracks.push(LocalTrack { kind: MediaKind::Video, codec: video_codec(&v.format.codec), on_keyframe, rid, on_need });
            }
        }
        let kinds: Vec<MediaKind> = tracks.iter().map(|t| t.kind).collect();
        let sinks = self.source.publish_local(room, &id, tracks);
        let mut video_out = Vec::new();
        let mut audio_out = None;
        for (k, f) in kinds.into_iter().zip(sinks) {
            match k {
                MediaKind::Audio => audio_out = Some(f),
                MediaKind::Video => video_out.push(f),
            }
        }
        // The pipeline's order: full size first.
        video_out.reverse();
        // Every layer flows until the SFU says which nobody takes (it assumes a new
        // stream's layers all flow).
        let layer_need = video_out.iter().map(|_| AtomicBool::new(true)).collect();
        let templates = match &config.video {
            Some(v) => Templates::from_layout(&v.layout, v.max_input),
            None => Templates::from_layout(&Default::default(), 1),
        };
        let view = Arc::new(ViewMix {
            room: room.to_string(),
            id: id.clone(),
            config: config.clone(),
            encoder: Arc::default(),
            video_out,
            layer_need,
            audio_out,
            state: Mutex::new(ViewState {
                inputs: Vec::new(),
                pins: Vec::new(),
                placed: Vec::new(),
                templates,
                pipeline: None,
                taps: Vec::new(),
                idle_since: None,
                last_output: Instant::now(),
                last_restart: Instant::now().checked_sub(STALL_RESTART).unwrap_or_else(Instant::now),
                active: None,
                candidate: None,
            }),
        });
        if let Ok(mut w) = weak_view.lock() {
            *w = Arc::downgrade(&view);
        }
        let span = info_span!("view", room = %room, view = ?config.label);
        let importer = self.importer.get().cloned();
        tokio::spawn(supervise(self.source.clone(), importer, self.events.clone(), Arc::downgrade(&view)).instrument(span));
        view
    }
}

/// Keeps a view's pipeline running exactly while it has consumers.
async fn supervise(source: Arc<dyn StreamSource>, importer: Option<Arc<dyn StreamImporter>>, events: mpsc::Sender<AgentEvent>, view: Weak<ViewMix>) {
    let mut tick = tokio::time::interval(SUPERVISE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_import = Instant::now();
    let mut import_every = IMPORT_RETRY;
    loop {
        tick.tick().await;
        let Some(view) = view.upgrade() else { return };
        let demand = view.demand();
        let running = view.lock().pipeline.is_some();
        if demand && !running {
            // Inputs from other nodes are released while nobody watches: bring them back.
            import_inputs(source.as_ref(), importer.as_deref(), &view).await;
            if let Err(e) = start_pipeline(source.as_ref(), &view) {
                warn!(error = %e, "cannot start the view pipeline");
            }
        } else if !demand && running {
            let stop = {
                let mut s = view.lock();
                let since = *s.idle_since.get_or_insert_with(Instant::now);
                since.elapsed() >= IDLE_STOP
            };
            if stop {
                stop_pipeline(source.as_ref(), &view);
            }
        } else if demand {
            // A pipeline whose encoder went silent (a stuck start, a wedged element) is
            // rebuilt rather than left showing nothing.
            let stalled = {
                let mut s = view.lock();
                s.idle_since = None;
                let produced =
                    s.pipeline.as_ref().is_some_and(|p| !p.has_video() || p.video_produced.swap(false, std::sync::atomic::Ordering::Relaxed));
                if produced {
                    s.last_output = Instant::now();
                }
                // The layers' needs, where a media thread could not apply them at once.
                if let Some(p) = &s.pipeline {
                    view.apply_layer_needs(p);
                }
                let failed = s.pipeline.as_ref().and_then(|p| p.failed.lock().ok().and_then(|f| f.clone()));
                if let Some(error) = &failed {
                    warn!(stream = %view.id, %error, "view pipeline failed; restarting it");
                }
                // At most one rebuild per STALL_RESTART, whatever keeps failing.
                (failed.is_some() || s.last_output.elapsed() >= STALL_RESTART) && s.last_restart.elapsed() >= STALL_RESTART
            };
            if stalled {
                view.lock().last_restart = Instant::now();
                warn!(stream = %view.id, "view pipeline failed or produced no video for 2 s; restarting it");
                stop_pipeline(source.as_ref(), &view);
                if let Err(e) = start_pipeline(source.as_ref(), &view) {
                    warn!(error = %e, "cannot restart the view pipeline");
                }
            }
            // An input that could not be brought from its node (not listed there yet, a
            // relay hiccup) is tried again: after a second, then less often while it fails.
            if importer.is_some() && last_import.elapsed() >= import_every {
                last_import = Instant::now();
                let (brought, failed) = import_inputs(source.as_ref(), importer.as_deref(), &view).await;
                for stream in &brought {
                    attach(source.as_ref(), &view, stream);
                }
                if !brought.is_empty() {
                    relayout(source.as_ref(), &view);
                }
                import_every = if failed { (import_every * 2).min(IMPORT_RETRY_MAX) } else { IMPORT_RETRY };
            }
            for update in voice_activity(source.as_ref(), &view) {
                let event = AgentEvent::StreamUpdated { room: view.room.as_str().into(), stream: view.id.as_str().into(), update };
                if events.send(event).await.is_err() {
                    debug!("portal gone; mixed-stream update dropped");
                }
            }
        }
    }
}

/// Voice activity: follows the loudest audio input and, when the view asks for it
/// (`keepActiveInputPrimary`), moves it into the primary region. Returns what changed.
fn voice_activity(source: &dyn StreamSource, view: &ViewMix) -> Vec<StreamUpdate> {
    if !view.config.audio.as_ref().is_some_and(|a| a.vad) {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut s = view.lock();
    if s.active.as_ref().is_some_and(|a| !s.inputs.contains(a)) {
        s.active = None;
        s.candidate = None;
        out.push(StreamUpdate::ActiveInput(None));
    }
    let levels = match &s.pipeline {
        Some(p) => p.audio_levels(),
        None => return out,
    };
    let loudest = levels.iter().filter(|(st, db)| *db > VAD_FLOOR_DB && s.inputs.contains(st)).max_by(|a, b| a.1.total_cmp(&b.1)).cloned();
    let Some((stream, db)) = loudest else {
        s.candidate = None;
        return out;
    };
    let active_db = s.active.as_ref().and_then(|a| levels.iter().find(|(st, _)| st == a)).map(|(_, d)| *d);
    if s.active.as_deref() == Some(stream.as_str()) || active_db.is_some_and(|a| db < a + VAD_MARGIN_DB) {
        s.candidate = None;
        return out;
    }
    let ticks = match &s.candidate {
        Some((c, n)) if *c == stream => n + 1,
        _ => 1,
    };
    if ticks < VAD_TICKS {
        s.candidate = Some((stream, ticks));
        return out;
    }
    s.candidate = None;
    s.active = Some(stream.clone());
    debug!(view = %view.id, %stream, level_db = db, "active input");
    out.push(StreamUpdate::ActiveInput(Some(stream.as_str().into())));
    if view.config.video.as_ref().is_some_and(|v| v.keep_active_input_primary) {
        let before = view.assigned(&mut s);
        let primary = before.first().map(|(r, _)| r.id.clone());
        let holder = before.first().and_then(|(_, st)| st.clone());
        if let Some(primary) = primary
            && holder.as_deref() != Some(stream.as_str())
        {
            // The speaker takes the primary region; whoever held it takes the speaker's.
            let old = s.placed.iter().find(|(st, _)| *st == stream).map(|(_, r)| r.clone());
            s.placed.retain(|(st, _)| *st != stream && Some(st) != holder.as_ref());
            s.placed.push((stream.clone(), primary));
            if let (Some(h), Some(o)) = (holder, old) {
                s.placed.push((h, o));
            }
            let after = view.assigned(&mut s);
            place(source, &s, &after);
            out.push(StreamUpdate::Layout(layout::entries(&after)));
        }
    }
    out
}

/// Brings the view's inputs that are not on this node from the nodes that have them;
/// returns those brought, and whether any could not be.
async fn import_inputs(source: &dyn StreamSource, importer: Option<&dyn StreamImporter>, view: &ViewMix) -> (Vec<String>, bool) {
    let missing: Vec<String> = view.lock().inputs.iter().filter(|i| source.stream_room(i).is_none()).cloned().collect();
    let room = RoomId::from(view.room.as_str());
    let (mut brought, mut failed) = (Vec::new(), false);
    for stream in missing {
        match ensure_stream(source, importer, &room, &stream).await {
            Ok(()) => brought.push(stream),
            Err(e) => {
                warn!(%stream, error = %e, "a mix input is not available");
                failed = true;
            }
        }
    }
    (brought, failed)
}

fn start_pipeline(source: &dyn StreamSource, view: &Arc<ViewMix>) -> Result<(), pipeline::PipelineError> {
    let p = ViewPipeline::start(&view.config, view.video_out.clone(), view.audio_out.clone(), &view.encoder)?;
    info!(stream = %view.id, "view pipeline started");
    view.apply_layer_needs(&p);
    let inputs = {
        let mut s = view.lock();
        s.pipeline = Some(p);
        s.idle_since = None;
        s.last_output = Instant::now();
        s.inputs.clone()
    };
    for stream in inputs {
        attach(source, view, &stream);
    }
    relayout(source, view);
    Ok(())
}

fn stop_pipeline(source: &dyn StreamSource, view: &Arc<ViewMix>) {
    let (pipeline, taps) = {
        let mut s = view.lock();
        (s.pipeline.take(), std::mem::take(&mut s.taps))
    };
    for (stream, kind, sink, task) in taps {
        source.untap(&stream, kind, sink);
        task.abort();
    }
    drop(pipeline);
    info!(stream = %view.id, "view pipeline stopped (no consumer)");
}

/// Connects a stream's tracks to the running pipeline.
fn attach(source: &dyn StreamSource, view: &Arc<ViewMix>, stream: &str) {
    let mut s = view.lock();
    if s.pipeline.is_none() {
        return;
    }
    // A tap whose stream ended (an input relayed from a node that lost it) no longer
    // counts: the stream may be back.
    let ended: Vec<(String, MediaKind)> =
        s.taps.iter().filter(|(st, _, _, task)| st == stream && task.is_finished()).map(|(st, k, ..)| (st.clone(), *k)).collect();
    if !ended.is_empty() {
        s.taps.retain(|(st, _, _, task)| !(st == stream && task.is_finished()));
        for (st, kind) in ended {
            if let Some(p) = s.pipeline.as_mut() {
                p.remove_input(&st, kind);
            }
        }
    }
    for kind in [MediaKind::Video, MediaKind::Audio] {
        let wanted = match kind {
            MediaKind::Video => !view.video_out.is_empty(),
            MediaKind::Audio => view.audio_out.is_some(),
        };
        if !wanted || s.taps.iter().any(|(st, k, ..)| st == stream && *k == kind) {
            continue;
        }
        let Some(mut tap) = source.tap(stream, kind) else { continue };
        let Some(p) = s.pipeline.as_mut() else { return };
        let appsrc = match p.add_input(stream, kind, &tap.codec.mime_type) {
            Ok(a) => a,
            Err(e) => {
                warn!(%stream, kind = kind.as_str(), error = %e, "cannot add input to the mix");
                source.untap(stream, kind, tap.sink_id);
                continue;
            }
        };
        debug!(%stream, kind = kind.as_str(), codec = %tap.codec.mime_type, "input attached");
        let name = stream.to_string();
        let sink_id = tap.sink_id;
        let task = tokio::spawn(async move {
            let mut first = true;
            while let Some(packet) = tap.recv().await {
                if first {
                    debug!(stream = %name, kind = kind.as_str(), "input flowing");
                    first = false;
                }
                ViewPipeline::push(&appsrc, kind, packet);
            }
        });
        s.taps.push((stream.to_string(), kind, sink_id, task));
    }
}

fn detach(source: &dyn StreamSource, view: &Arc<ViewMix>, stream: &str) {
    let mut s = view.lock();
    let mut kept = Vec::new();
    for (st, kind, sink, task) in std::mem::take(&mut s.taps) {
        if st == stream {
            source.untap(&st, kind, sink);
            task.abort();
            if let Some(p) = s.pipeline.as_mut() {
                p.remove_input(&st, kind);
            }
        } else {
            kept.push((st, kind, sink, task));
        }
    }
    s.taps = kept;
}

/// Places the inputs in their regions, and has each simulcast input's tap read the
/// lowest layer that fills its region (the lowest of all while it is not shown): no
/// decoding of 1280×720 for a 320×240 tile.
fn relayout(source: &dyn StreamSource, view: &ViewMix) {
    let mut s = view.lock();
    let assigned = view.assigned(&mut s);
    place(source, &s, &assigned);
}

/// Gives the running pipeline a placement (see [`relayout`]).
fn place(source: &dyn StreamSource, s: &ViewState, assigned: &[(Rect, Option<String>)]) {
    let Some(p) = &s.pipeline else { return };
    let sizes = p.apply_layout(assigned);
    for (stream, kind, sink, _) in &s.taps {
        if *kind == MediaKind::Video {
            let (width, height) = sizes.iter().find(|(st, _)| st == stream).map_or((0, 0), |(_, size)| *size);
            source.set_tap_layer(stream, MediaKind::Video, *sink, LayerChoice::Fill { width, height });
        }
    }
}

/// Turns a requested layout into regions (a custom template) and pins, checking it.
fn parse_layout(items: &[LayoutEntry]) -> Result<(CustomTemplate, Vec<(String, String)>), MixError> {
    let mut regions: Vec<tessera_core::room::Region> = Vec::new();
    let mut pins: Vec<(String, String)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let region = item.region.clone();
        if regions.iter().any(|r| r.id == region.id) {
            return Err(MixError::BadLayout(format!("layout[{i}].region.id `{}` is used twice", region.id.escape_debug())));
        }
        if let Some(stream) = &item.stream {
            if pins.iter().any(|(s, _)| s == stream.as_str()) {
                return Err(MixError::BadLayout(format!("layout[{i}].stream `{}` is used twice", stream.as_str().escape_debug())));
            }
            pins.push((stream.to_string(), region.id.clone()));
        }
        regions.push(region);
    }
    if regions.is_empty() {
        return Err(MixError::BadLayout("layout needs at least one region".into()));
    }
    let template = CustomTemplate { primary: None, region: regions };
    // Validate areas with the room model's rules.
    let check = tessera_core::Room {
        views: vec![View {
            video: Some(tessera_core::room::ViewVideo {
                layout: tessera_core::room::Layout {
                    templates: tessera_core::room::Templates { base: "void".into(), custom: vec![template.clone()] },
                    ..Default::default()
                },
                ..Default::default()
            }),
            ..Default::default()
        }],
        name: "check".into(),
        ..Default::default()
    };
    check.validate().map_err(|e| MixError::BadLayout(format!("layout: {}", e.reason)))?;
    Ok((template, pins))
}

#[async_trait::async_trait]
impl MixNode for Mixer {
    async fn handle(&self, command: MixCommand) -> Result<MixReply, MixError> {
        Ok(match command {
            MixCommand::StartView(c) => MixReply::StartView(self.start_view(&c.room, &c.view)),
            MixCommand::StopView(c) => {
                self.stop_view(&c.room, &c.view);
                MixReply::StopView(())
            }
            MixCommand::Mix(c) => {
                if let Err(e) = ensure_stream(self.source.as_ref(), self.importer.get().map(|i| i.as_ref()), &c.room, c.stream.as_str()).await {
                    // The stream joins the layout anyway: it shows once it can be taken
                    // (the view's next start brings it again).
                    warn!(stream = %c.stream, error = %e, "a mix input is not available");
                }
                MixReply::Mix(self.mix(&c.room, &c.view, &c.stream)?)
            }
            MixCommand::Unmix(c) => MixReply::Unmix(self.unmix(&c.room, &c.view, &c.stream)?),
            MixCommand::SetLayout(c) => MixReply::SetLayout(self.set_layout(&c.room, &c.view, c.layout)?),
            MixCommand::SetTemplate(c) => MixReply::SetTemplate(self.set_template(&c.room, &c.view, &c.base)?),
            MixCommand::SetRegion(c) => MixReply::SetRegion(self.set_region(&c.room, &c.view, &c.stream, &c.region)?),
            MixCommand::GetLayout(c) => MixReply::GetLayout(self.view(c.room.as_str(), c.view.as_str())?.layout()),
        })
    }
}

impl Mixer {
    /// Creates a view's mixed stream, or finds it if it runs. Checked and created under
    /// one lock: two first logins at once used to both create the views, and the second
    /// registration replaced the first's outputs with ones no pipeline fed.
    fn start_view(&self, room: &RoomId, config: &View) -> StreamInfo {
        let mut rooms = self.lock();
        let views = rooms.entry(room.to_string()).or_default();
        if let Some(v) = views.get(&config.label) {
            return v.stream_info();
        }
        let view = self.create_view(room.as_str(), config);
        views.insert(config.label.clone(), view.clone());
        info!(%room, view = ?config.label, "view mixing ready");
        view.stream_info()
    }

    /// Frees a view's pipeline and mixed stream.
    fn stop_view(&self, room: &RoomId, label: &ViewLabel) {
        let view = {
            let mut rooms = self.lock();
            let Some(views) = rooms.get_mut(room.as_str()) else { return };
            let view = views.remove(label.as_str());
            if views.is_empty() {
                rooms.remove(room.as_str());
            }
            view
        };
        if let Some(view) = view {
            stop_pipeline(self.source.as_ref(), &view);
            self.source.unpublish_local(&view.id);
        }
    }

    fn mix(&self, room: &RoomId, label: &ViewLabel, stream: &StreamId) -> Result<Vec<LayoutEntry>, MixError> {
        let (room, label, stream) = (room.as_str(), label.as_str(), stream.as_str());
        let view = self.view(room, label)?;
        {
            let mut s = view.lock();
            if !s.inputs.iter().any(|i| i == stream) {
                if view.config.video.as_ref().is_some_and(|v| s.inputs.len() >= v.max_input as usize) {
                    return Err(MixError::ViewFull(label.into()));
                }
                s.inputs.push(stream.to_string());
            }
        }
        attach(self.source.as_ref(), &view, stream);
        relayout(self.source.as_ref(), &view);
        Ok(view.layout())
    }

    fn unmix(&self, room: &RoomId, label: &ViewLabel, stream: &StreamId) -> Result<Vec<LayoutEntry>, MixError> {
        let (room, label, stream) = (room.as_str(), label.as_str(), stream.as_str());
        let view = self.view(room, label)?;
        {
            let mut s = view.lock();
            s.inputs.retain(|i| i != stream);
            s.pins.retain(|(st, _)| st != stream);
        }
        detach(self.source.as_ref(), &view, stream);
        relayout(self.source.as_ref(), &view);
        Ok(view.layout())
    }

    fn set_layout(&self, room: &RoomId, label: &ViewLabel, requested: Vec<LayoutEntry>) -> Result<Vec<LayoutEntry>, MixError> {
        let (room, label) = (room.as_str(), label.as_str());
        let view = self.view(room, label)?;
        let (template, pins) = parse_layout(&requested)?;
        {
            let mut s = view.lock();
            for (stream, _) in &pins {
                if !s.inputs.contains(stream) {
                    return Err(MixError::NotInView { stream: stream.as_str().into(), view: label.into() });
                }
            }
            let mut base = view.config.video.as_ref().map(|v| v.layout.clone()).unwrap_or_default();
            base.templates.custom.push(template);
            s.templates = Templates::from_layout(&base, view.config.video.as_ref().map(|v| v.max_input).unwrap_or(16));
            s.pins = pins;
        }
        relayout(self.source.as_ref(), &view);
        Ok(view.layout())
    }

    fn set_template(&self, room: &RoomId, label: &ViewLabel, base: &str) -> Result<Vec<LayoutEntry>, MixError> {
        let (room, label) = (room.as_str(), label.as_str());
        if !["fluid", "lecture"].contains(&base) {
            return Err(MixError::BadLayout(format!("template `{base}` is not fluid or lecture")));
        }
        let view = self.view(room, label)?;
        {
            let mut s = view.lock();
            let mut layout = view.config.video.as_ref().map(|v| v.layout.clone()).unwrap_or_default();
            layout.templates.base = base.to_string();
            layout.templates.custom.clear();
            s.templates = Templates::from_layout(&layout, view.config.video.as_ref().map(|v| v.max_input).unwrap_or(16));
            s.pins.clear();
            s.placed.clear();
        }
        relayout(self.source.as_ref(), &view);
        Ok(view.layout())
    }

    fn set_region(&self, room: &RoomId, label: &ViewLabel, stream: &StreamId, region: &str) -> Result<Vec<LayoutEntry>, MixError> {
        let (room, label, stream) = (room.as_str(), label.as_str(), stream.as_str());
        let view = self.view(room, label)?;
        {
            let mut s = view.lock();
            if !s.inputs.iter().any(|i| i == stream) {
                return Err(MixError::NotInView { stream: stream.into(), view: label.into() });
            }
            let regions = s.templates.for_inputs(s.inputs.len());
            if !regions.iter().any(|r| r.id == region) {
                return Err(MixError::NoRegion { view: label.into(), region: region.into() });
            }
            // The stream moves there; whoever held the region takes the stream's old one.
            let old = s.placed.iter().find(|(st, _)| st == stream).map(|(_, r)| r.clone());
            let holder = s.placed.iter().find(|(_, r)| r == region).map(|(st, _)| st.clone());
            s.pins.retain(|(st, r)| st != stream && r != region);
            s.pins.push((stream.to_string(), region.to_string()));
            if let (Some(holder), Some(old)) = (holder, old)
                && holder != stream
            {
                s.placed.retain(|(st, _)| *st != holder);
                s.placed.push((holder, old));
            }
        }
        relayout(self.source.as_ref(), &view);
        Ok(view.layout())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};
    use tessera_core::RoomId;
    use tessera_core::media::{RtpReceiver, Tap};

    /// A track of [`Registry`]: counts its taps.
    #[derive(Default)]
    struct Track(AtomicUsize);

    impl RtpSink for Track {
        fn send(&self, _: &[u8]) {}
        fn has_consumers(&self) -> bool {
            self.0.load(Ordering::SeqCst) > 0
        }
    }

    /// Packets that never come.
    struct Silent;

    impl RtpReceiver for Silent {
        fn poll_recv(&mut self, _: &mut Context<'_>) -> Poll<Option<bytes::Bytes>> {
            Poll::Pending
        }
    }

    /// The tracks of a registered stream.
    type Tracks = Vec<(MediaKind, Arc<Track>)>;

    /// A stream source that, like the SFU, keeps the last registration of a stream id.
    #[derive(Default)]
    struct Registry {
        streams: Mutex<HashMap<String, Tracks>>,
        published: AtomicUsize,
    }

    impl Registry {
        fn track(&self, stream: &str, kind: MediaKind) -> Option<Arc<Track>> {
            self.streams.lock().unwrap().get(stream)?.iter().find(|(k, _)| *k == kind).map(|(_, t)| t.clone())
        }
    }

    impl StreamSource for Registry {
        fn tap(&self, stream: &str, kind: MediaKind) -> Option<Tap> {
            let t = self.track(stream, kind)?;
            t.0.fetch_add(1, Ordering::SeqCst);
            let codec = CodecInfo { mime_type: "video/VP8".into(), clock_rate: 90000, channels: 0, fmtp: String::new(), payload_type: None };
            Some(Tap { codec, sink_id: 1, packets: Box::new(Silent) })
        }
        fn untap(&self, stream: &str, kind: MediaKind, _: u64) {
            if let Some(t) = self.track(stream, kind) {
                t.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        fn request_keyframe(&self, _: &str) {}
        fn stream_room(&self, _: &str) -> Option<RoomId> {
            None
        }
        fn publish_local(&self, _: &str, stream: &str, tracks: Vec<LocalTrack>) -> Vec<Arc<dyn RtpSink>> {
            self.published.fetch_add(1, Ordering::SeqCst);
            let tracks: Tracks = tracks.into_iter().map(|t| (t.kind, Arc::new(Track::default()))).collect();
            let sinks = tracks.iter().map(|(_, t)| t.clone() as Arc<dyn RtpSink>).collect();
            self.streams.lock().unwrap().insert(stream.to_string(), tracks);
            sinks
        }
        fn unpublish_local(&self, stream: &str) {
            self.streams.lock().unwrap().remove(stream);
        }
    }

    #[test]
    fn layout_values_are_validated() {
        let ok = json!([
            {"stream": "a", "region": {"id": "1", "shape": "rectangle", "area": {"left": "0", "top": "0", "width": "1/2", "height": "1"}}},
            {"region": {"id": "2", "shape": "rectangle", "area": {"left": "1/2", "top": "0", "width": "1/2", "height": "1"}}}
        ]);
        let entries = |v: serde_json::Value| -> Vec<LayoutEntry> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|e| LayoutEntry {
                    stream: e.get("stream").and_then(|s| s.as_str()).map(StreamId::from),
                    region: serde_json::from_value(e["region"].clone()).unwrap(),
                })
                .collect()
        };
        let (t, pins) = parse_layout(&entries(ok)).unwrap();
        assert_eq!(t.region.len(), 2);
        assert_eq!(pins, vec![("a".to_string(), "1".to_string())]);
        let dup = json!([
            {"stream": "a", "region": {"id": "1", "area": {"left": "0", "top": "0", "width": "1", "height": "1"}}},
            {"stream": "a", "region": {"id": "2", "area": {"left": "0", "top": "0", "width": "1", "height": "1"}}}
        ]);
        assert!(parse_layout(&entries(dup)).unwrap_err().to_string().contains("used twice"));
        let outside = json!([{"region": {"id": "1", "area": {"left": "1/2", "top": "0", "width": "1", "height": "1"}}}]);
        assert!(parse_layout(&entries(outside)).is_err());
        assert!(parse_layout(&[]).is_err());
    }

    /// Two first logins at the same moment both created the room's views; the second
    /// registration replaced the first's outputs in the SFU, so the view the mixer kept
    /// fed a fan-out nobody could subscribe to. Each view must be created once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_view_starts_create_each_view_once() {
        use tessera_core::command::{StartView, StopView};
        let registry = Arc::new(Registry::default());
        let agent: Arc<dyn StreamSource> = registry.clone();
        let mixer = Mixer::new(agent.clone(), mpsc::channel(16).0);
        let node: Arc<dyn MixNode> = mixer.clone();
        for n in 0..20 {
            // Many views widen the window between "no views yet" and "views registered".
            let views: Vec<Value> = (0..16).map(|v| json!({"label": format!("v{v}")})).collect();
            let room = tessera_core::Room::from_options(format!("room{n}"), format!("Room {n}"), json!({"views": views})).unwrap();
            let barrier = Arc::new(tokio::sync::Barrier::new(4));
            let starts: Vec<_> = (0..4)
                .map(|_| {
                    let (node, room, barrier) = (node.clone(), room.clone(), barrier.clone());
                    tokio::spawn(async move {
                        barrier.wait().await;
                        let mut ids = Vec::new();
                        for view in room.views {
                            ids.push(node.call(StartView { room: room.id.as_str().into(), view: Box::new(view) }).await.unwrap().id);
                        }
                        ids
                    })
                })
                .collect();
            for s in starts {
                assert_eq!(s.await.unwrap().len(), 16, "one mixed stream per view");
            }
            assert_eq!(registry.published.swap(0, Ordering::SeqCst), 16, "each view registered once");
            for v in 0..16 {
                let view = mixer.view(&room.id, &format!("v{v}")).unwrap();
                // A consumer tapping the registered stream must reach the outputs the view's
                // pipeline feeds.
                let tap = agent.tap(&view.id, MediaKind::Video).expect("the mixed stream is registered");
                assert!(view.video_out.first().is_some_and(|f| f.has_consumers()), "{}: the view feeds a track the source does not serve", view.id);
                agent.untap(&view.id, MediaKind::Video, tap.sink_id);
            }
            for v in 0..16 {
                node.call(StopView { room: room.id.as_str().into(), view: format!("v{v}").into() }).await.unwrap();
            }
            assert!(registry.streams.lock().unwrap().is_empty(), "stopping the views unregisters the mixed streams");
            assert!(mixer.lock().is_empty(), "no room left behind");
        }
    }
}
