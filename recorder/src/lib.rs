//! Tessera's recorder: any forward or mixed stream (audio and video may come from
//! different streams, as in OWT) written to a file in the storage folder, without
//! decoding:
//!
//! ```text
//! tap → appsrc → rtpjitterbuffer → rtpvp8depay (wait-for-keyframe) ─┐
//! tap → appsrc → rtpjitterbuffer → rtpopusdepay → opusparse ────────┼→ webmmux / matroskamux / mp4mux → filesink
//! ```
//!
//! Files are written progressively (Matroska clusters, fragmented MP4), so a crash keeps
//! what was written readable; a clean stop sends EOS so the muxer finalises the file.
//! A recording ends when stopped over REST, when its sources end, when its room is
//! deleted, and at server shutdown.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use tessera_core::agent::{MediaKind, RecordingSpec};
use tessera_core::command::{
    MAX_RECORDING_CHUNK, RecorderCommand, RecorderNode, RecorderReply, RecordingChunk, RecordingError, RecordingFormat, RecordingInfo,
    RecordingMedia, RecordingSource, RecordingState, RecordingStorage,
};
use tessera_core::hooks::{Hook, HookSink};
use tessera_core::media::{ImportError, StreamImporter, StreamSource, ensure_stream, with_payload_type};
use tessera_core::{RoomId, StreamId};
use tracing::{info, warn};

const VIDEO_PT: u8 = 96;
const AUDIO_PT: u8 = 111;
/// How long a stop waits for the muxer to finalise the file.
const FINALISE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Recording,
    Stopped,
    Failed,
}

struct Input {
    from: String,
    codec: String,
    sink_id: u64,
    appsrc: gst_app::AppSrc,
    feeder: tokio::task::JoinHandle<()>,
}

struct State {
    status: Status,
    reason: Option<String>,
    ended: Option<Instant>,
    pipeline: Option<gst::Pipeline>,
    inputs: HashMap<MediaKind, Input>,
    /// (stream, codec) per kind, kept after the end for the description.
    sources: HashMap<MediaKind, (String, String)>,
    /// Ended, but the muxer is still writing the file's end: the file is not complete.
    finalising: bool,
}

struct Recording {
    id: String,
    room: String,
    container: String,
    path: PathBuf,
    started_ms: u64,
    started: Instant,
    audio_from: Option<StreamId>,
    video_from: Option<StreamId>,
    state: Mutex<State>,
    /// The muxer has written its end (set by whoever pops EOS from the bus).
    eos: std::sync::atomic::AtomicBool,
    /// Told when the recording ends (webhooks).
    hooks: Option<Arc<dyn HookSink>>,
}

impl Recording {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn describe(&self) -> RecordingInfo {
        let s = self.lock();
        let end = s.ended.unwrap_or_else(Instant::now);
        let size = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        let media = |kind: MediaKind, configured: &Option<StreamId>| match (s.sources.get(&kind), configured) {
            (Some((from, codec)), _) => {
                Some(RecordingSource { from: from.as_str().into(), format: Some(RecordingFormat { codec: codec_name(codec).to_string() }) })
            }
            (None, Some(from)) => Some(RecordingSource { from: from.clone(), format: None }),
            (None, None) => None,
        };
        RecordingInfo {
            id: self.id.clone(),
            state: match s.status {
                Status::Recording => RecordingState::Recording,
                Status::Stopped => RecordingState::Stopped,
                Status::Failed => RecordingState::Failed,
            },
            container: self.container.clone(),
            started_at: self.started_ms,
            duration: end.duration_since(self.started).as_secs_f64(),
            size,
            storage: RecordingStorage { file: self.path.display().to_string() },
            url: format!("/v1/rooms/{}/recordings/{}/file", self.room, self.id),
            media: RecordingMedia { audio: media(MediaKind::Audio, &self.audio_from), video: media(MediaKind::Video, &self.video_from) },
            reason: s.reason.clone(),
        }
    }

    /// Ends the recording: stops the inputs, lets the muxer finalise, frees the pipeline.
    fn finish(&self, source: &dyn StreamSource, status: Status, reason: &str) {
        let (pipeline, inputs) = {
            let mut s = self.lock();
            if s.status != Status::Recording {
                return;
            }
            s.status = status;
            s.reason = Some(reason.to_string());
            s.ended = Some(Instant::now());
            s.finalising = true;
            (s.pipeline.take(), std::mem::take(&mut s.inputs))
        };
        let _finalised = Finalised(self);
        for (kind, input) in &inputs {
            source.untap(&input.from, *kind, input.sink_id);
            input.feeder.abort();
            let _ = input.appsrc.end_of_stream();
        }
        if let Some(p) = pipeline {
            if status == Status::Stopped {
                wait_for_eos(&p, &self.eos);
            }
            let _ = p.set_state(gst::State::Null);
        }
        info!(recording = %self.id, room = %self.room, reason, file = ?self.path, "recording ended");
        self.finished_hook();
    }

    /// Tells the hooks the recording ended, as it ended.
    fn finished_hook(&self) {
        let Some(h) = &self.hooks else { return };
        let info = self.describe();
        let state = if info.state == RecordingState::Stopped { "stopped" } else { "failed" };
        h.emit(Hook::RecordingFinished {
            room: self.room.clone(),
            recording: self.id.clone(),
            file: info.storage.file,
            state: state.into(),
            duration: info.duration,
            size: info.size,
            reason: info.reason,
        });
    }
}

/// Waits (bounded) until the muxer has written its end: EOS (seen here or by the bus
/// watcher, which shares the bus), an error, or the timeout.
fn wait_for_eos(p: &gst::Pipeline, eos: &std::sync::atomic::AtomicBool) {
    use std::sync::atomic::Ordering;
    let Some(bus) = p.bus() else { return };
    let deadline = Instant::now() + FINALISE_TIMEOUT;
    while !eos.load(Ordering::Acquire) && Instant::now() < deadline {
        if let Some(msg) = bus.timed_pop_filtered(gst::ClockTime::from_mseconds(50), &[gst::MessageType::Eos, gst::MessageType::Error]) {
            if matches!(msg.view(), gst::MessageView::Eos(_)) {
                eos.store(true, Ordering::Release);
            }
            return;
        }
    }
}

fn codec_name(mime: &str) -> String {
    mime.split('/').nth(1).unwrap_or(mime).to_ascii_lowercase()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The recording service.
pub struct Recorder {
    source: Arc<dyn StreamSource>,
    dir: PathBuf,
    recordings: Mutex<HashMap<String, Arc<Recording>>>,
    me: std::sync::Weak<Recorder>,
    hooks: std::sync::OnceLock<Arc<dyn HookSink>>,
    /// Brings streams produced on other nodes here (a cluster's relay).
    importer: std::sync::OnceLock<Arc<dyn StreamImporter>>,
}

impl Recorder {
    /// A recorder taking its streams from `source` and writing into `dir`.
    pub fn new(source: Arc<dyn StreamSource>, dir: PathBuf) -> Arc<Recorder> {
        Arc::new_cyclic(|me| Recorder {
            source,
            dir,
            recordings: Mutex::new(HashMap::new()),
            me: me.clone(),
            hooks: std::sync::OnceLock::new(),
            importer: std::sync::OnceLock::new(),
        })
    }

    /// Lets recordings take streams published on other nodes (set once, by a cluster).
    pub fn set_importer(&self, importer: Arc<dyn StreamImporter>) {
        if self.importer.set(importer).is_err() {
            warn!("a second stream importer was ignored");
        }
    }

    /// Makes `stream` available here, from another node if need be.
    async fn bring(&self, room: &str, stream: &str) -> Result<(), RecordingError> {
        ensure_stream(self.source.as_ref(), self.importer.get().map(|i| i.as_ref()), &RoomId::from(room), stream).await.map_err(|e| match e {
            ImportError::NotFound(_) => RecordingError::NoStream(stream.into()),
            ImportError::Failed { .. } => RecordingError::Failed(e.to_string()),
        })
    }

    /// Recordings this node knows, by state: (recording, stopped, failed). One whose file
    /// is still being finalised counts as recording: its file is not complete yet.
    pub fn counts(&self) -> (usize, usize, usize) {
        let recordings: Vec<Arc<Recording>> = self.lock().values().cloned().collect();
        let mut c = (0, 0, 0);
        for r in recordings {
            let s = r.lock();
            match s.status {
                _ if s.finalising => c.0 += 1,
                Status::Recording => c.0 += 1,
                Status::Stopped => c.1 += 1,
                Status::Failed => c.2 += 1,
            }
        }
        c
    }

    /// Tells `hooks` when recordings start and end, from now on (once).
    pub fn set_hooks(&self, hooks: Arc<dyn HookSink>) {
        let _ = self.hooks.set(hooks);
    }

    fn arc(&self) -> Result<Arc<Recorder>, RecordingError> {
        self.me.upgrade().ok_or_else(|| RecordingError::Failed("recorder is shutting down".into()))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Recording>>> {
        self.recordings.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, room: &str, id: &str) -> Result<Arc<Recording>, RecordingError> {
        self.lock().get(id).filter(|r| r.room == room).cloned().ok_or_else(|| RecordingError::NoRecording(id.to_string()))
    }

    fn codec_of(&self, room: &str, stream: &str, kind: MediaKind) -> Result<String, RecordingError> {
        if self.source.stream_room(stream).as_ref().map(|r| r.as_str()) != Some(room) {
            return Err(RecordingError::NoStream(stream.into()));
        }
        let tap = self.source.tap(stream, kind).ok_or_else(|| RecordingError::Rejected(format!("Stream {stream} has no {} track", kind.as_str())))?;
        self.source.untap(stream, kind, tap.sink_id);
        Ok(tap.codec.mime_lower())
    }

    /// Connects a stream's track to the recording's appsrc.
    fn attach(self: &Arc<Self>, rec: &Arc<Recording>, kind: MediaKind, from: &str, appsrc: gst_app::AppSrc) -> Result<Input, RecordingError> {
        let mut tap = self.source.tap(from, kind).ok_or_else(|| RecordingError::Rejected(format!("Stream {from} has no {} track", kind.as_str())))?;
        let src = appsrc.clone();
        let (me, recording) = (self.clone(), rec.clone());
        let (codec, sink_id) = (tap.codec.mime_lower(), tap.sink_id);
        let pt = if kind == MediaKind::Video { VIDEO_PT } else { AUDIO_PT };
        let feeder = tokio::spawn(async move {
            while let Some(packet) = tap.recv().await {
                let _ = src.push_buffer(gst::Buffer::from_slice(with_payload_type(packet, pt)));
            }
            // The source ended (unpublished, owner left): finalise the file.
            let source = me.source.clone();
            tokio::task::spawn_blocking(move || recording.finish(source.as_ref(), Status::Stopped, "source ended"));
        });
        Ok(Input { from: from.to_string(), codec, sink_id, appsrc, feeder })
    }

    fn build(self: &Arc<Self>, rec: &Arc<Recording>, video: Option<(&str, &str)>, audio: Option<&str>) -> Result<(), String> {
        gst::init().map_err(|e| e.to_string())?;
        let mux = match rec.container.as_str() {
            "webm" => "webmmux name=mux",
            "mp4" => "mp4mux name=mux fragment-duration=1000",
            _ => "matroskamux name=mux",
        };
        let mut desc = format!("{mux} ! filesink name=file sync=false buffer-mode=unbuffered location=\"{}\" ", rec.path.display());
        if let Some((_, mime)) = video {
            let (enc, chain) = match mime {
                "video/h264" => ("H264", "rtph264depay ! h264parse"),
                "video/vp9" => ("VP9", "rtpvp9depay"),
                _ => ("VP8", "rtpvp8depay wait-for-keyframe=true"),
            };
            desc.push_str(&format!(
                "appsrc name=vsrc is-live=true format=time do-timestamp=true caps=\"application/x-rtp,media=video,encoding-name={enc},clock-rate=90000,payload={VIDEO_PT}\" ! rtpjitterbuffer latency=200 ! {chain} ! queue ! mux. "
            ));
        }
        if audio.is_some() {
            desc.push_str(&format!(
                "appsrc name=asrc is-live=true format=time do-timestamp=true caps=\"application/x-rtp,media=audio,encoding-name=OPUS,clock-rate=48000,payload={AUDIO_PT}\" ! rtpjitterbuffer latency=200 ! rtpopusdepay ! opusparse ! queue ! mux. "
            ));
        }
        let pipeline = gst::parse::launch(&desc).map_err(|e| e.to_string())?.downcast::<gst::Pipeline>().map_err(|_| "not a pipeline".to_string())?;
        let appsrc = |name: &str| pipeline.by_name(name).and_then(|e| e.downcast::<gst_app::AppSrc>().ok());
        if pipeline.set_state(gst::State::Playing).is_err() {
            let reason = first_error(&pipeline).unwrap_or_else(|| "the pipeline did not start".into());
            let _ = pipeline.set_state(gst::State::Null);
            return Err(reason);
        }
        let mut inputs = HashMap::new();
        if let (Some((from, _)), Some(src)) = (video, appsrc("vsrc")) {
            inputs.insert(MediaKind::Video, self.attach(rec, MediaKind::Video, from, src).map_err(|e| e.to_string())?);
        }
        if let (Some(from), Some(src)) = (audio, appsrc("asrc")) {
            inputs.insert(MediaKind::Audio, self.attach(rec, MediaKind::Audio, from, src).map_err(|e| e.to_string())?);
        }
        watch_bus(self.source.clone(), rec.clone(), &pipeline);
        let mut s = rec.lock();
        if s.status != Status::Recording {
            // Ended while it was being built (shutdown, room deleted, its source gone): the
            // end found no pipeline to finalise, so this one is finalised here.
            s.finalising = true;
            drop(s);
            let _finalised = Finalised(rec);
            for (kind, input) in &inputs {
                self.source.untap(&input.from, *kind, input.sink_id);
                input.feeder.abort();
                let _ = input.appsrc.end_of_stream();
            }
            wait_for_eos(&pipeline, &rec.eos);
            let _ = pipeline.set_state(gst::State::Null);
            return Ok(());
        }
        s.pipeline = Some(pipeline);
        s.sources = inputs.iter().map(|(k, i)| (*k, (i.from.clone(), i.codec.clone()))).collect();
        s.inputs = inputs;
        Ok(())
    }
}

/// Clears a recording's `finalising` when its end is written, however that went.
struct Finalised<'a>(&'a Recording);

impl Drop for Finalised<'_> {
    fn drop(&mut self) {
        self.0.lock().finalising = false;
    }
}

fn first_error(p: &gst::Pipeline) -> Option<String> {
    let bus = p.bus()?;
    let msg = bus.timed_pop_filtered(gst::ClockTime::from_mseconds(200), &[gst::MessageType::Error])?;
    match msg.view() {
        gst::MessageView::Error(e) => Some(format!("{} ({})", e.error(), e.debug().map(|d| d.to_string()).unwrap_or_default())),
        _ => None,
    }
}

/// Turns pipeline errors (disk full, unwritable file) into the failed state.
fn watch_bus(source: Arc<dyn StreamSource>, rec: Arc<Recording>, p: &gst::Pipeline) {
    let Some(bus) = p.bus() else { return };
    std::thread::spawn(move || {
        loop {
            if rec.lock().status != Status::Recording {
                return;
            }
            let Some(msg) = bus.timed_pop_filtered(gst::ClockTime::from_mseconds(200), &[gst::MessageType::Error, gst::MessageType::Eos]) else {
                continue;
            };
            if let gst::MessageView::Eos(_) = msg.view() {
                rec.eos.store(true, std::sync::atomic::Ordering::Release);
                continue;
            }
            if let gst::MessageView::Error(e) = msg.view() {
                let reason = format!("{}", e.error());
                warn!(recording = %rec.id, reason = ?reason, "recording failed");
                rec.finish(source.as_ref(), Status::Failed, &reason);
                return;
            }
        }
    });
}

#[async_trait::async_trait]
impl RecorderNode for Recorder {
    async fn handle(&self, command: RecorderCommand) -> Result<RecorderReply, RecordingError> {
        Ok(match command {
            RecorderCommand::StartRecording(c) => RecorderReply::StartRecording(self.start(c.room.as_str(), c.spec).await?),
            RecorderCommand::ListRecordings(c) => RecorderReply::ListRecordings(self.list(c.room.as_str())),
            RecorderCommand::SwitchSource(c) => {
                RecorderReply::SwitchSource(self.switch_source(c.room.as_str(), &c.recording, c.kind, c.from.as_str()).await?)
            }
            RecorderCommand::StopRecording(c) => RecorderReply::StopRecording(self.stop(c.room.as_str(), &c.recording).await?),
            RecorderCommand::RecordingFile(c) => RecorderReply::RecordingFile(self.get(c.room.as_str(), &c.recording)?.path.clone()),
            RecorderCommand::ReadRecording(c) => {
                let path = self.get(c.room.as_str(), &c.recording)?.path.clone();
                RecorderReply::ReadRecording(read_chunk(&path, c.offset, c.len).await?)
            }
            RecorderCommand::RoomDeleted(c) => {
                self.room_deleted(&c.room).await;
                RecorderReply::RoomDeleted(())
            }
            RecorderCommand::ShutdownRecorder(_) => {
                self.shutdown().await;
                RecorderReply::ShutdownRecorder(())
            }
        })
    }
}

/// Bytes `offset..offset+len` (at most [`MAX_RECORDING_CHUNK`]) of a recording's file.
async fn read_chunk(path: &std::path::Path, offset: u64, len: u32) -> Result<RecordingChunk, RecordingError> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let failed = |e: std::io::Error| RecordingError::Failed(format!("reading {}: {e}", path.display()));
    let mut file = tokio::fs::File::open(path).await.map_err(failed)?;
    let size = file.metadata().await.map_err(failed)?.len();
    let want = u64::from(len.min(MAX_RECORDING_CHUNK)).min(size.saturating_sub(offset));
    let mut data = vec![0; usize::try_from(want).unwrap_or(0)];
    if !data.is_empty() {
        file.seek(std::io::SeekFrom::Start(offset)).await.map_err(failed)?;
        file.read_exact(&mut data).await.map_err(failed)?;
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("recording").to_string();
    Ok(RecordingChunk { name, size, data })
}

impl Recorder {
    async fn start(&self, room: &str, spec: RecordingSpec) -> Result<RecordingInfo, RecordingError> {
        if spec.audio_from.is_none() && spec.video_from.is_none() {
            return Err(RecordingError::Rejected("media: record audio, video or both".into()));
        }
        for from in spec.video_from.iter().chain(&spec.audio_from) {
            self.bring(room, from.as_str()).await?;
        }
        let video = match &spec.video_from {
            Some(from) => Some((from.clone(), self.codec_of(room, from.as_str(), MediaKind::Video)?)),
            None => None,
        };
        if let Some(from) = &spec.audio_from {
            let codec = self.codec_of(room, from.as_str(), MediaKind::Audio)?;
            if codec != "audio/opus" {
                return Err(RecordingError::Rejected(format!("audio codec {codec} cannot be recorded (opus only)")));
            }
        }
        let vcodec = video.as_ref().map(|(_, c)| c.as_str());
        let container = match (spec.container.as_str(), vcodec) {
            ("auto" | "", Some("video/h264")) => "mkv",
            ("auto" | "", _) => "webm",
            ("webm", Some("video/h264")) => return Err(RecordingError::Rejected("webm cannot hold H.264; use mkv or mp4".into())),
            ("mp4", Some("video/vp8")) => return Err(RecordingError::Rejected("mp4 cannot hold VP8; use webm or mkv".into())),
            (c @ ("webm" | "mkv" | "mp4"), _) => c,
            (other, _) => return Err(RecordingError::Rejected(format!("container `{other}` is not auto, webm, mkv or mp4"))),
        };
        let id = tessera_core::ids::session_id();
        let stamp = time_stamp();
        let path = self.dir.join(format!("{room}-{id}-{stamp}.{container}"));
        let rec = Arc::new(Recording {
            id: id.clone(),
            room: room.to_string(),
            container: container.to_string(),
            path,
            started_ms: now_ms(),
            started: Instant::now(),
            audio_from: spec.audio_from.clone(),
            video_from: spec.video_from.clone(),
            state: Mutex::new(State {
                status: Status::Recording,
                reason: None,
                ended: None,
                pipeline: None,
                inputs: HashMap::new(),
                sources: HashMap::new(),
                finalising: false,
            }),
            eos: std::sync::atomic::AtomicBool::new(false),
            hooks: self.hooks.get().cloned(),
        });
        self.lock().insert(id.clone(), rec.clone());
        // Before the pipeline runs, so that whatever ends it is reported after this.
        if let Some(h) = &rec.hooks {
            h.emit(Hook::RecordingStarted { room: room.to_string(), recording: id.clone(), file: rec.path.display().to_string() });
        }
        let me = self.arc()?;
        let r = rec.clone();
        let video_ref = video.clone();
        let audio = spec.audio_from.clone();
        let built = tokio::task::spawn_blocking(move || {
            me.build(&r, video_ref.as_ref().map(|(f, c)| (f.as_str(), c.as_str())), audio.as_ref().map(StreamId::as_str))
        })
        .await
        .map_err(|e| RecordingError::Failed(e.to_string()))?;
        if let Err(reason) = built {
            let mut s = rec.lock();
            s.status = Status::Failed;
            s.reason = Some(reason.clone());
            s.ended = Some(Instant::now());
            warn!(recording = %id, reason = ?reason, "recording could not start");
            drop(s);
            rec.finished_hook();
        } else {
            info!(recording = %id, room, file = ?rec.path, "recording started");
        }
        Ok(rec.describe())
    }

    fn list(&self, room: &str) -> Vec<RecordingInfo> {
        let mut recs: Vec<Arc<Recording>> = self.lock().values().filter(|r| r.room == room).cloned().collect();
        recs.sort_by_key(|r| r.started_ms);
        recs.iter().map(|r| r.describe()).collect()
    }

    async fn switch_source(&self, room: &str, id: &str, kind: MediaKind, from: &str) -> Result<RecordingInfo, RecordingError> {
        let rec = self.get(room, id)?;
        self.bring(room, from).await?;
        let codec = self.codec_of(room, from, kind)?;
        let old = {
            let mut s = rec.lock();
            if s.status != Status::Recording {
                return Err(RecordingError::Rejected("the recording has ended".into()));
            }
            let Some(current) = s.inputs.get(&kind) else {
                return Err(RecordingError::Rejected(format!("the recording has no {} source", kind.as_str())));
            };
            if current.codec != codec {
                return Err(RecordingError::Rejected(format!("Stream {from} is {codec}, the recording holds {}", current.codec)));
            }
            s.inputs.remove(&kind)
        };
        let Some(old) = old else { return Err(RecordingError::Failed("source vanished".into())) };
        self.source.untap(&old.from, kind, old.sink_id);
        old.feeder.abort();
        let input = self.arc()?.attach(&rec, kind, from, old.appsrc.clone())?;
        let mut s = rec.lock();
        s.sources.insert(kind, (from.to_string(), codec));
        s.inputs.insert(kind, input);
        drop(s);
        Ok(rec.describe())
    }

    async fn stop(&self, room: &str, id: &str) -> Result<RecordingInfo, RecordingError> {
        let rec = self.get(room, id)?;
        let source = self.source.clone();
        let r = rec.clone();
        let _ = tokio::task::spawn_blocking(move || r.finish(source.as_ref(), Status::Stopped, "stopped")).await;
        Ok(rec.describe())
    }

    async fn room_deleted(&self, room: &RoomId) {
        let recs: Vec<Arc<Recording>> = self.lock().values().filter(|r| r.room == room.as_str()).cloned().collect();
        for r in recs {
            let source = self.source.clone();
            let _ = tokio::task::spawn_blocking(move || r.finish(source.as_ref(), Status::Stopped, "room deleted")).await;
        }
    }

    /// Stops and finalises every recording (server shutdown).
    pub async fn shutdown(&self) {
        let recs: Vec<Arc<Recording>> = self.lock().values().cloned().collect();
        let mut tasks = Vec::new();
        for r in recs {
            let source = self.source.clone();
            tasks.push(tokio::task::spawn_blocking(move || r.finish(source.as_ref(), Status::Stopped, "server shutdown")));
        }
        for t in tasks {
            let _ = t.await;
        }
        // Recordings that ended just before (their source left) may still be writing their
        // end on another thread: the process must not exit under them.
        let deadline = tokio::time::Instant::now() + FINALISE_TIMEOUT + Duration::from_secs(1);
        while self.counts().0 > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `YYYYMMDDTHHMMSSZ` for file names, computed without a date crate.
fn time_stamp() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_stamps() {
        let s = time_stamp();
        assert_eq!(s.len(), 16);
        assert!(s.starts_with("20"));
        assert!(s.ends_with('Z'));
    }
}
