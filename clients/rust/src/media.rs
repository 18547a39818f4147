//! Real encoded media for tests and benchmarks, made and read with GStreamer: a live
//! VP8 (solid colour) + Opus (sine tone) source feeding a [`Publisher`], and offline
//! decoders that turn received RTP back into RGB frames and PCM samples.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use rtc::shared::marshal::{Marshal, Unmarshal};
use tokio::sync::mpsc;

use crate::peer::{Publisher, Received};

/// A running GStreamer source; stops when dropped.
pub struct LiveSource {
    pipeline: gst::Pipeline,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for LiveSource {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub(crate) fn appsink_to_channel(sink: gst_app::AppSink) -> mpsc::Receiver<rtc::rtp::Packet> {
    let (tx, rx) = mpsc::channel(1024);
    sink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |s| {
                let sample = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                if let Some(buf) = sample.buffer()
                    && let Ok(map) = buf.map_readable()
                {
                    let mut bytes = map.as_slice();
                    if let Ok(p) = rtc::rtp::Packet::unmarshal(&mut bytes) {
                        let _ = tx.try_send(p);
                    }
                }
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    rx
}

/// Picture size and rate, and tone volume, of a live source.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LiveFormat {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Frames per second.
    pub fps: u32,
    /// Tone volume, 0–1.
    pub volume: f64,
}

impl Default for LiveFormat {
    fn default() -> Self {
        LiveFormat { width: 320, height: 240, fps: 15, volume: 0.4 }
    }
}

/// Starts encoding a solid `rgb` colour (VP8, 320×240, 15 fps) and a `tone_hz` sine (Opus)
/// into the publisher's tracks. The publisher's keyframe requests force VP8 keyframes.
pub fn live_source(publisher: Arc<Publisher>, rgb: (u8, u8, u8), tone_hz: u32) -> anyhow::Result<LiveSource> {
    live_source_with(publisher, rgb, tone_hz, LiveFormat::default())
}

/// The VP8 encoder and payloader of the sources here: realtime, a keyframe every 2 s, a
/// bit rate for the picture size and rate, RTP packets of at most 1100 bytes.
fn vp8_rtp(format: LiveFormat) -> String {
    let LiveFormat { width, height, fps, .. } = format;
    format!(
        "vp8enc deadline=1 cpu-used=8 keyframe-max-dist={keydist} target-bitrate={bitrate} ! rtpvp8pay pt=96 mtu=1100",
        keydist = fps * 2,
        bitrate = (u64::from(width) * u64::from(height) * u64::from(fps) / 16).clamp(300_000, 2_000_000),
    )
}

/// [`live_source`] at another picture size and rate.
pub fn live_source_with(publisher: Arc<Publisher>, rgb: (u8, u8, u8), tone_hz: u32, format: LiveFormat) -> anyhow::Result<LiveSource> {
    gst::init()?;
    let LiveFormat { width, height, fps, volume } = format;
    let colour = 0xFF00_0000u32 | (u32::from(rgb.0) << 16) | (u32::from(rgb.1) << 8) | u32::from(rgb.2);
    let desc = format!(
        "videotestsrc is-live=true pattern=solid-color foreground-color={colour} ! video/x-raw,width={width},height={height},framerate={fps}/1 ! \
         videoconvert ! {video} ! appsink name=v sync=false \
         audiotestsrc is-live=true wave=sine freq={tone_hz} volume={volume} samplesperbuffer=960 ! audio/x-raw,rate=48000,channels=2 ! \
         audioconvert ! opusenc bitrate=64000 ! rtpopuspay pt=111 ! appsink name=a sync=false",
        video = vp8_rtp(format),
    );
    let pipeline = gst::parse::launch(&desc)?.downcast::<gst::Pipeline>().map_err(|_| anyhow!("not a pipeline"))?;
    let sink = |name: &str| -> anyhow::Result<gst_app::AppSink> {
        pipeline.by_name(name).and_then(|e| e.downcast::<gst_app::AppSink>().ok()).ok_or_else(|| anyhow!("no appsink {name}"))
    };
    let mut video = appsink_to_channel(sink("v")?);
    let mut audio = appsink_to_channel(sink("a")?);
    // Keyframes are asked for from the sink end: an upstream event, not serialised with
    // the data, so it cannot wait on the streaming thread.
    let vsink = pipeline.by_name("v").ok_or_else(|| anyhow!("no video sink"))?;
    pipeline.set_state(gst::State::Playing)?;
    let p = publisher.clone();
    let v_task = tokio::spawn(async move {
        while let Some(packet) = video.recv().await {
            if p.take_keyframe_request() {
                let s = gst::Structure::builder("GstForceKeyUnit").field("all-headers", true).build();
                vsink.send_event(gst::event::CustomUpstream::new(s));
            }
            p.write_rtp("video", packet).await;
        }
    });
    let a_task = tokio::spawn(async move {
        while let Some(packet) = audio.recv().await {
            publisher.write_rtp("audio", packet).await;
        }
    });
    Ok(LiveSource { pipeline, tasks: vec![v_task, a_task] })
}

/// VP8 RTP packets encoded once, with their presentation times: the same moving content
/// replayed to several receivers (a server's mixer, a bare GStreamer pipeline) without
/// encoding it again for each.
pub struct Clip {
    /// The packets in order, each with its frame's presentation time from the clip's start.
    pub packets: Vec<(Duration, rtc::rtp::Packet)>,
    /// How long the clip plays (frames × frame time): a replay loops after it.
    pub duration: Duration,
}

/// Bits of the frame counter drawn into a counted clip: the frame's index, then its parity.
const COUNTER_BITS: u32 = 10;
/// The counter's cells: squares of this side (pixels of the clip's picture)...
const COUNTER_CELL: usize = 40;
/// ...this far apart, left to right, from (`COUNTER_CELL`/2, `COUNTER_CELL`/2).
const COUNTER_PITCH: usize = 56;

/// A [`Clip`] of moving diagonal stripes whose every picture shows its frame index as a
/// row of black or white squares at the top (9 bits and a parity bit), for measuring how
/// long a picture takes through a mixer: [`read_counter`] reads it back from the
/// decoded output. Encoded as a live source would be ([`vp8_rtp`]), as fast as it goes.
/// At least 600 pixels wide.
pub fn encode_counted_clip(format: LiveFormat, seconds: u32) -> anyhow::Result<Clip> {
    gst::init()?;
    let LiveFormat { width, height, fps, .. } = format;
    let (w, h) = (width as usize, height as usize);
    if w < COUNTER_PITCH * COUNTER_BITS as usize + COUNTER_CELL || h < 2 * COUNTER_CELL || w % 2 == 1 || h % 2 == 1 {
        anyhow::bail!("a counted clip needs an even size of at least 600×80, not {w}×{h}");
    }
    let frames = fps.max(1) * seconds.max(1);
    let desc = format!(
        "appsrc name=src format=time caps=video/x-raw,format=I420,width={width},height={height},framerate={fps}/1 ! {} ! appsink name=v sync=false",
        vp8_rtp(format)
    );
    let pipeline = gst::parse::launch(&desc)?.downcast::<gst::Pipeline>().map_err(|_| anyhow!("not a pipeline"))?;
    let src = pipeline.by_name("src").and_then(|e| e.downcast::<gst_app::AppSrc>().ok()).ok_or_else(|| anyhow!("no appsrc"))?;
    let sink = pipeline.by_name("v").and_then(|e| e.downcast::<gst_app::AppSink>().ok()).ok_or_else(|| anyhow!("no appsink"))?;
    pipeline.set_state(gst::State::Playing)?;
    let result = (|| -> anyhow::Result<Vec<(Duration, rtc::rtp::Packet)>> {
        let mut packets = Vec::new();
        let mut picture = vec![128u8; w * h * 3 / 2];
        for n in 0..frames {
            let (luma, _) = picture.split_at_mut(w * h);
            for (y, row) in luma.chunks_exact_mut(w).enumerate() {
                for (x, px) in row.iter_mut().enumerate() {
                    // Stripes 32 pixels wide, moving 4 pixels a frame.
                    *px = if (x + y + 4 * n as usize) % 64 < 32 { 60 } else { 190 };
                }
            }
            let code = (n % 512) | (((n % 512).count_ones() & 1) << 9);
            for bit in 0..COUNTER_BITS as usize {
                let on = (code >> bit) & 1 == 1;
                for y in COUNTER_CELL / 2..COUNTER_CELL / 2 + COUNTER_CELL {
                    let from = y * w + COUNTER_CELL / 2 + bit * COUNTER_PITCH;
                    if let Some(cells) = luma.get_mut(from..from + COUNTER_CELL) {
                        cells.fill(if on { 235 } else { 16 });
                    }
                }
            }
            let mut buffer = gst::Buffer::from_slice(picture.clone());
            if let Some(b) = buffer.get_mut() {
                b.set_pts(gst::ClockTime::from_nseconds(u64::from(n) * 1_000_000_000 / u64::from(fps.max(1))));
            }
            src.push_buffer(buffer).map_err(|e| anyhow!("push: {e:?}"))?;
            while let Some(sample) = sink.try_pull_sample(gst::ClockTime::ZERO) {
                packets.push(clip_packet(&sample)?);
            }
        }
        src.end_of_stream().map_err(|e| anyhow!("eos: {e:?}"))?;
        while let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_seconds(5)) {
            packets.push(clip_packet(&sample)?);
        }
        Ok(packets)
    })();
    pipeline.set_state(gst::State::Null)?;
    let packets = result?;
    let duration = Duration::from_secs_f64(f64::from(frames) / f64::from(fps.max(1)));
    Ok(Clip { packets, duration })
}

/// A payloader's sample as a clip packet.
fn clip_packet(sample: &gst::Sample) -> anyhow::Result<(Duration, rtc::rtp::Packet)> {
    let buffer = sample.buffer().ok_or_else(|| anyhow!("sample without a buffer"))?;
    let pts = buffer.pts().map_or(Duration::ZERO, |t| Duration::from_nanos(t.nseconds()));
    let map = buffer.map_readable()?;
    let mut bytes = map.as_slice();
    Ok((pts, rtc::rtp::Packet::unmarshal(&mut bytes).context("the payloader's RTP")?))
}

/// The frame index a picture of [`encode_counted_clip`] shows, read from `frame` where
/// that picture was drawn at (`x`, `y`) scaled by `scale` (a mixer's region); `None`
/// where the counter cannot be read (a bad parity: a picture between two, or blurred).
pub fn read_counter(frame: &Frame, x: usize, y: usize, scale: f64) -> Option<u32> {
    let mut code = 0u32;
    for bit in 0..COUNTER_BITS as usize {
        let cx = x + ((COUNTER_CELL + bit * COUNTER_PITCH) as f64 * scale) as usize;
        let cy = y + (COUNTER_CELL as f64 * scale) as usize;
        let (r, g, b) = frame.around(cx, cy);
        let luma = (u32::from(r) * 3 + u32::from(g) * 6 + u32::from(b)) / 10;
        if luma > 128 {
            code |= 1 << bit;
        }
    }
    let index = code & 0x1FF;
    (index.count_ones() & 1 == code >> 9).then_some(index)
}

/// Feeds `packets` (sorted here by arrival, then by sequence) through the decoding
/// pipeline `desc`, handing each decoded sample to `each` with the RTP timestamp the
/// buffers are timed from (the first in sequence order; older ones are timed at 0).
fn run_decoder(
    desc: &str,
    caps: &str,
    packets: &mut [Received],
    clock: f64,
    each: &mut dyn FnMut(gst::Sample, u32) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    gst::init()?;
    let pipeline = gst::parse::launch(desc)?.downcast::<gst::Pipeline>().map_err(|_| anyhow!("not a pipeline"))?;
    let src = pipeline.by_name("src").and_then(|e| e.downcast::<gst_app::AppSrc>().ok()).ok_or_else(|| anyhow!("no appsrc"))?;
    let sink = pipeline.by_name("sink").and_then(|e| e.downcast::<gst_app::AppSink>().ok()).ok_or_else(|| anyhow!("no appsink"))?;
    src.set_caps(Some(&caps.parse::<gst::Caps>()?));
    pipeline.set_state(gst::State::Playing)?;
    // Order by sequence (unwrapped) so depayloaders see the stream as sent.
    packets.sort_by_key(|p| p.arrived_us);
    let mut ext_seq: Vec<(i64, usize)> = Vec::new();
    let mut last: Option<i64> = None;
    for (i, p) in packets.iter().enumerate() {
        let s = i64::from(p.header.sequence_number);
        let unwrapped = match last {
            None => s,
            Some(l) => {
                let base = l - (l & 0xFFFF);
                let cands = [base + s - 0x10000, base + s, base + s + 0x10000];
                *cands.iter().min_by_key(|c| (**c - l).abs()).unwrap_or(&s)
            }
        };
        last = Some(unwrapped);
        ext_seq.push((unwrapped, i));
    }
    ext_seq.sort();
    ext_seq.dedup_by_key(|(s, _)| *s);
    let first_ts = ext_seq.first().and_then(|(_, i)| packets.get(*i)).map_or(0, |p| p.header.timestamp);
    for (_, i) in ext_seq {
        let p = &packets[i];
        let pkt = rtc::rtp::Packet { header: p.header.clone(), payload: p.payload.clone() };
        let bytes = pkt.marshal().context("marshal")?;
        let mut buf = gst::Buffer::from_slice(bytes);
        // A timestamp older than the first (reordered) is timed at the start: a wrapped
        // difference would time it hours later and push every later picture's time up.
        let ticks = p.header.timestamp.wrapping_sub(first_ts);
        let secs = if ticks > 0x8000_0000 { 0.0 } else { f64::from(ticks) / clock };
        if let Some(b) = buf.get_mut() {
            b.set_pts(gst::ClockTime::from_nseconds((secs * 1e9) as u64));
        }
        src.push_buffer(buf).map_err(|e| anyhow!("push: {e:?}"))?;
        while let Some(s) = sink.try_pull_sample(gst::ClockTime::ZERO) {
            each(s, first_ts)?;
        }
    }
    src.end_of_stream().map_err(|e| anyhow!("eos: {e:?}"))?;
    while let Some(s) = sink.try_pull_sample(gst::ClockTime::from_mseconds(500)) {
        each(s, first_ts)?;
    }
    pipeline.set_state(gst::State::Null)?;
    Ok(())
}

/// A decoded RGB frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The RTP timestamp of the packets it was decoded from.
    pub timestamp: u32,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Packed RGB rows.
    pub rgb: Vec<u8>,
}

impl Frame {
    /// The colour at (x, y).
    pub fn at(&self, x: usize, y: usize) -> (u8, u8, u8) {
        let i = (y.min(self.height - 1) * self.width + x.min(self.width - 1)) * 3;
        (self.rgb[i], self.rgb[i + 1], self.rgb[i + 2])
    }

    /// Average colour of a small square around (x, y).
    pub fn around(&self, x: usize, y: usize) -> (u8, u8, u8) {
        let (mut r, mut g, mut b, mut n) = (0u32, 0u32, 0u32, 0u32);
        for dy in 0..8 {
            for dx in 0..8 {
                let (pr, pg, pb) = self.at((x + dx).saturating_sub(4), (y + dy).saturating_sub(4));
                r += u32::from(pr);
                g += u32::from(pg);
                b += u32::from(pb);
                n += 1;
            }
        }
        ((r / n) as u8, (g / n) as u8, (b / n) as u8)
    }
}

/// Decodes received VP8 RTP into RGB frames.
pub fn decode_vp8(packets: &[Received]) -> anyhow::Result<Vec<Frame>> {
    let mut frames = Vec::new();
    decode_vp8_each(packets, |f| frames.push(f))?;
    Ok(frames)
}

/// [`decode_vp8`], handing each frame to `each` as it is decoded instead of keeping them
/// all (a 1280×720 frame is 2.7 MB of RGB).
pub fn decode_vp8_each(packets: &[Received], each: impl FnMut(Frame)) -> anyhow::Result<()> {
    decode_video_each(packets, "VP8", "rtpvp8depay ! vp8dec", each)
}

/// Decodes received H.264 RTP (packetization mode 1) into RGB frames.
pub fn decode_h264(packets: &[Received]) -> anyhow::Result<Vec<Frame>> {
    let mut frames = Vec::new();
    decode_video_each(packets, "H264", "rtph264depay ! avdec_h264", |f| frames.push(f))?;
    Ok(frames)
}

/// Decodes the video of `packets` (`encoding` in RTP caps) through `decoder` into RGB frames.
fn decode_video_each(packets: &[Received], encoding: &str, decoder: &str, mut each: impl FnMut(Frame)) -> anyhow::Result<()> {
    let mut video: Vec<Received> = packets.iter().filter(|p| p.kind == "video").cloned().collect();
    let desc = format!("appsrc name=src format=time ! {decoder} ! videoconvert ! video/x-raw,format=RGB ! appsink name=sink sync=false");
    let caps = format!("application/x-rtp,media=video,encoding-name={encoding},clock-rate=90000,payload=96");
    run_decoder(&desc, &caps, &mut video, 90000.0, &mut |s, base| {
        let (Some(buf), Some(caps)) = (s.buffer(), s.caps()) else { return Ok(()) };
        let st = caps.structure(0).ok_or_else(|| anyhow!("caps"))?;
        let width = st.get::<i32>("width")? as usize;
        let height = st.get::<i32>("height")? as usize;
        let ticks = buf.pts().map_or(0, |t| (t.nseconds() as f64 * 90_000.0 / 1e9).round() as u64);
        let map = buf.map_readable()?;
        // RGB rows are padded to 4 bytes.
        let stride = (width * 3).div_ceil(4) * 4;
        let mut rgb = Vec::with_capacity(width * height * 3);
        for row in 0..height {
            let start = row * stride;
            rgb.extend_from_slice(map.get(start..start + width * 3).ok_or_else(|| anyhow!("short frame"))?);
        }
        each(Frame { timestamp: base.wrapping_add(ticks as u32), width, height, rgb });
        Ok(())
    })
}

/// Decodes received Opus RTP into mono 48 kHz samples.
pub fn decode_opus(packets: &[Received]) -> anyhow::Result<Vec<i16>> {
    let mut audio: Vec<Received> = packets.iter().filter(|p| p.kind == "audio").cloned().collect();
    let desc = "appsrc name=src format=time ! rtpopusdepay ! opusdec ! audioconvert ! audioresample ! audio/x-raw,format=S16LE,channels=1,rate=48000 ! appsink name=sink sync=false";
    let caps = "application/x-rtp,media=audio,encoding-name=OPUS,clock-rate=48000,payload=111";
    let mut pcm = Vec::new();
    run_decoder(desc, caps, &mut audio, 48000.0, &mut |s, _| {
        if let Some(buf) = s.buffer() {
            let map = buf.map_readable()?;
            pcm.extend(map.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])));
        }
        Ok(())
    })?;
    Ok(pcm)
}

/// Signal power at `freq` Hz (Goertzel), normalised by length.
pub fn tone_power(pcm: &[i16], freq: f64, rate: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / rate;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in pcm {
        let s0 = f64::from(x) + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    (s1 * s1 + s2 * s2 - coeff * s1 * s2) / (pcm.len().max(1) as f64).powi(2)
}

/// Waits, then returns (for convenience in tests).
pub async fn settle(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counted_clip_shows_each_frame_index_scaled_or_not() -> anyhow::Result<()> {
        let clip = encode_counted_clip(LiveFormat { width: 640, height: 360, fps: 30, volume: 0.0 }, 1)?;
        assert!(clip.packets.len() >= 30, "{} packets", clip.packets.len());
        assert_eq!(clip.duration, Duration::from_secs(1));
        let received: Vec<Received> = clip
            .packets
            .iter()
            .enumerate()
            .map(|(i, (_, p))| Received {
                kind: "video",
                header: p.header.clone(),
                payload: p.payload.clone(),
                arrived_us: i as u64,
                size: p.payload.len(),
            })
            .collect();
        let frames = decode_vp8(&received)?;
        let read: Vec<Option<u32>> = frames.iter().map(|f| read_counter(f, 0, 0, 1.0)).collect();
        assert_eq!(read, (0..30).map(Some).collect::<Vec<_>>());
        // Each frame's timestamp is its packets'.
        let mut sent: Vec<u32> = clip.packets.iter().map(|(_, p)| p.header.timestamp).collect();
        sent.dedup();
        assert_eq!(frames.iter().map(|f| f.timestamp).collect::<Vec<_>>(), sent);
        // Scaled to 2/3 (a mixer's 3×3 region of 1280×720), still read.
        let small: Vec<Frame> = frames.iter().map(|f| scale(f, 2.0 / 3.0)).collect();
        assert_eq!(small.iter().map(|f| read_counter(f, 0, 0, 2.0 / 3.0)).collect::<Vec<_>>(), read);
        Ok(())
    }

    /// A nearest-neighbour downscale.
    fn scale(f: &Frame, by: f64) -> Frame {
        let (width, height) = ((f.width as f64 * by) as usize, (f.height as f64 * by) as usize);
        let mut rgb = Vec::with_capacity(width * height * 3);
        for y in 0..height {
            for x in 0..width {
                let (r, g, b) = f.at((x as f64 / by) as usize, (y as f64 / by) as usize);
                rgb.extend_from_slice(&[r, g, b]);
            }
        }
        Frame { timestamp: f.timestamp, width, height, rgb }
    }
}
