//! `mixer-vs-gstreamer`: what Tessera's mixer costs on top of GStreamer's own work. In one
//! run, on the same pinned CPU one after the other: Tessera mixing nine VP8 publishers
//! into a 1280×720@30 view watched by one viewer, and a bare `gst-launch-1.0` pipeline
//! doing the same media work — nine RTP inputs through the mixer's jitter buffer,
//! depayloader, decoder, converter and scaler into a compositor with the same background
//! and the same 3×3 regions, then the same VP8 encoder settings and payloader, sent to a
//! UDP port. Both get the same moving content (diagonal stripes moving 4 pixels a frame,
//! encoded once before either runs and replayed without re-encoding, so the load
//! generator's CPU is the same for both). Reported: each one's CPU, output frame rate,
//! and Tessera's CPU ÷ the bare pipeline's; and the latency each adds: every input
//! picture shows its frame index (`tessera_client::media::encode_counted_clip`), read
//! back from the decoded output, so each output frame's first packet's arrival minus
//! when the input picture it shows was sent is one sample (both on the bench's clock,
//! the arrival as the kernel's receive time of the datagram for both, so it holds the
//! network and the publishing clients too, a few ms on loopback).
//!
//! Then two such views (two rooms, eighteen publishers) on the whole machine with the
//! server unpinned: whether both keep the full frame rate.
//!
//! What only Tessera does is the rest of a conference server: SRTP/DTLS on nine inputs
//! and one output, the SFU that hands the inputs to the mixer, an audio mix of the
//! (silent) view, signaling, and the RTP handling in and out of GStreamer.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rtc::shared::marshal::{Marshal, Unmarshal};
use serde_json::{Value, json};
use tessera_client::arrival::{record_arrivals, recv_stamped};
use tessera_client::media::{Clip, LiveFormat, decode_vp8_each, encode_counted_clip, read_counter};
use tessera_client::peer::{PublishOptions, Publisher, Received, Subscriber, now_us};
use tokio::net::UdpSocket;

use crate::scenario::{Figures, Measured, frame_rate, measure, percentile, row};
use crate::server::{AnyServer, Kind, Launch, Process, Server, scratch_dir};

/// The view: its size and rate, and the inputs.
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 720;
const FPS: u32 = 30;
const INPUTS: usize = 9;
/// Each input: 640×360@30, shown in a region of 426×240 (scaled by 2/3).
const INPUT: LiveFormat = LiveFormat { width: 640, height: 360, fps: FPS, volume: 0.0 };
const REGION_SCALE: f64 = 2.0 / 3.0;
/// Seconds of content encoded (replayed in a loop).
const CLIP_SECONDS: u32 = 10;
/// Time for the mixer to get its inputs' keyframes (every 2 s in the clip) and settle.
const WARM_UP: Duration = Duration::from_secs(4);
/// The mixer's encoder bit rate for this view: Tessera derives it as OWT does (pixels ×
/// fps × motion factor 0.8 × 0.07), and the bare pipeline is given the same.
const VIEW_KBPS: u32 = 1548;
/// The mixer's key frame interval (frames) for a view that sets none.
const KEY_FRAME_INTERVAL: u32 = 100;

/// Where a replay sends.
enum Target {
    /// A Tessera publisher (its own sequence numbers, SSRC, SRTP).
    Publisher(Arc<Publisher>),
    /// Plain RTP to a UDP port, from a socket bound before the ports were chosen (so it
    /// cannot take one of them).
    Udp(Arc<UdpSocket>, SocketAddr),
}

/// Stops a replay when dropped (an error on the way out must not leave it running).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Waits for a stopped replay; its error, if it failed, is the run's.
async fn finish(replaying: tokio::task::JoinHandle<anyhow::Result<()>>) -> anyhow::Result<()> {
    replaying.await.context("the replay task")?.context("replaying the clip")
}

/// When each picture was sent: (µs since the epoch, its frame index in the clip).
type Sent = Arc<std::sync::Mutex<Vec<(u64, u32)>>>;

/// Sends `clip` to every target at its frames' times, looping (timestamps carry on across
/// laps), until `stop`; notes in `sent` when each picture's first packet went.
async fn replay(clip: Arc<Clip>, targets: Vec<Target>, stop: Arc<AtomicBool>, sent: Sent) -> anyhow::Result<()> {
    let ticks = (clip.duration.as_secs_f64() * 90_000.0) as u32;
    let start = tokio::time::Instant::now();
    let mut seq: u16 = 0;
    for lap in 0u32.. {
        for (pts, packet) in &clip.packets {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            tokio::time::sleep_until(start + clip.duration * lap + *pts).await;
            // The picture shows its index modulo 512 (`encode_counted_clip`).
            let index = (pts.as_secs_f64() * f64::from(FPS)).round() as u32 % 512;
            if let Ok(mut s) = sent.lock()
                && s.last().is_none_or(|(_, i)| *i != index)
            {
                s.push((now_us(), index));
            }
            let mut p = packet.clone();
            p.header.timestamp = p.header.timestamp.wrapping_add(ticks.wrapping_mul(lap));
            p.header.sequence_number = seq;
            seq = seq.wrapping_add(1);
            for t in &targets {
                match t {
                    Target::Publisher(publisher) => publisher.write_rtp("video", p.clone()).await,
                    Target::Udp(socket, to) => {
                        let bytes = p.marshal()?;
                        socket.send_to(&bytes, to).await?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// The bare pipeline for inputs on `ports`, its output to `out` (see the module docs).
fn bare_pipeline(ports: &[u16], out: u16, threads: usize) -> String {
    let caps = format!("video/x-raw,format=I420,width={WIDTH},height={HEIGHT},framerate={FPS}/1");
    let (w, h) = (WIDTH / 3, HEIGHT / 3);
    let pads: String = (0..ports.len())
        .map(|i| {
            let (x, y) = ((i as u32 % 3) * w, (i as u32 / 3) * h);
            let n = i + 1;
            format!("sink_{n}::xpos={x} sink_{n}::ypos={y} sink_{n}::width={w} sink_{n}::height={h} sink_{n}::zorder=1 sink_{n}::sizing-policy=keep-aspect-ratio ")
        })
        .collect();
    let mut desc = format!(
        "videotestsrc is-live=true pattern=solid-color foreground-color=0xFF000000 ! {caps} ! \
         compositor name=comp force-live=true min-upstream-latency=120000000 ignore-inactive-pads=true background=black {pads}! {caps} ! \
         queue max-size-buffers=2 leaky=downstream ! \
         vp8enc deadline=1 cpu-used=8 end-usage=cbr target-bitrate={bps} keyframe-max-dist={KEY_FRAME_INTERVAL} lag-in-frames=0 error-resilient=partitions threads={threads} static-threshold=100 ! \
         rtpvp8pay pt=96 mtu=1200 picture-id-mode=15-bit ! udpsink host=127.0.0.1 port={out} sync=false async=false ",
        bps = VIEW_KBPS * 1000,
    );
    for (i, port) in ports.iter().enumerate() {
        desc.push_str(&format!(
            "udpsrc address=127.0.0.1 port={port} caps=\"application/x-rtp,media=video,encoding-name=VP8,clock-rate=90000,payload=96\" ! \
             rtpjitterbuffer latency=80 drop-on-latency=true ! rtpvp8depay ! vp8dec max-errors=-1 ! videoconvert ! videoscale ! \
             queue max-size-buffers=3 leaky=downstream ! comp.sink_{} ",
            i + 1
        ));
    }
    desc
}

/// The latency samples (ms) of a mixer's output: for each decoded frame whose first packet
/// arrived in `from..=to` and whose top-left region shows a readable frame index, the time
/// from the latest send of that picture before the arrival.
fn latencies(output: &[Received], sent: &[(u64, u32)], from: u64, to: u64) -> anyhow::Result<Vec<f64>> {
    let mut first: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
    for p in output {
        let at = first.entry(p.header.timestamp).or_insert(p.arrived_us);
        *at = (*at).min(p.arrived_us);
    }
    let mut samples = Vec::new();
    // Frame by frame: kept, the output of a 10 s window would be over a gigabyte of RGB.
    decode_vp8_each(output, |frame| {
        let Some(&arrived) = first.get(&frame.timestamp).filter(|a| (from..=to).contains(*a)) else { return };
        let Some(index) = read_counter(&frame, 0, 0, REGION_SCALE) else { return };
        let sent_at = sent.iter().filter(|(at, i)| *i == index && *at <= arrived).map(|(at, _)| *at).max();
        if let Some(at) = sent_at {
            samples.push((arrived - at) as f64 / 1000.0);
        }
    })?;
    Ok(samples)
}

/// Tessera's side: `views` rooms, each with nine publishers replaying `clip` into its
/// view and one viewer; figures per view (the CPU is the whole server's).
async fn tessera_views(launch: &Launch, clip: Arc<Clip>, seconds: u64, views: usize) -> anyhow::Result<Vec<Figures>> {
    let s = AnyServer::start(Kind::Tessera, launch).await?;
    let t = s.as_tessera().context("mixer-vs-gstreamer needs Tessera")?;
    let mut keep = Vec::new();
    let mut targets = Vec::new();
    let mut rooms = Vec::new();
    for v in 0..views {
        let room = t.create_named_mix_room(&format!("mixer-vs-gstreamer-{v}"), WIDTH, HEIGHT, FPS).await?;
        for i in 0..INPUTS {
            let mut sig = t.join_room(&room, &format!("cam{i}")).await?;
            let opts = PublishOptions { audio: false, video: true, data: false, tag: i as u32, h264: false };
            let p = Arc::new(Publisher::start(&mut sig, opts, Some(t.connection().await?)).await?);
            // Nothing here compares bytes: keep no copy of each packet sent.
            p.keep_sent.store(false, std::sync::atomic::Ordering::Relaxed);
            targets.push(Target::Publisher(p.clone()));
            keep.push((sig, p));
        }
        rooms.push(room);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_error = StopOnDrop(stop.clone());
    let sent = Sent::default();
    let replaying = tokio::spawn(replay(clip, targets, stop.clone(), sent.clone()));
    let mut viewers = Vec::new();
    for room in &rooms {
        let mut sig = t.join_room(room, "viewer").await?;
        let viewer = Subscriber::start_on(&mut sig, t.connection().await?, &format!("{room}-common"), true, true, false).await?;
        viewers.push((viewer, sig));
    }
    tokio::time::sleep(WARM_UP).await;
    let measured = measure(&[t.pid()], seconds).await;
    stop.store(true, Ordering::Relaxed);
    finish(replaying).await?;
    let outputs: Vec<Vec<Received>> = viewers
        .iter()
        .map(|(v, _)| v.received.lock().map(|r| r.iter().filter(|p| p.kind == "video").cloned().collect()).unwrap_or_default())
        .collect();
    drop((viewers, keep));
    let sent = sent.lock().map(|s| s.clone()).unwrap_or_default();
    let mut figures = Vec::new();
    for output in outputs {
        figures.push(Figures { subscribers: 1, ..mixer_figures(output, sent.clone(), measured).await? });
    }
    Ok(figures)
}

/// The bare pipeline's side, pinned as the server is.
async fn bare(launch: &Launch, clip: Arc<Clip>, seconds: u64) -> anyhow::Result<Figures> {
    let send = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    // Free ports for the inputs (held until the pipeline is about to bind them).
    let probes: Vec<std::net::UdpSocket> = (0..INPUTS).map(|_| std::net::UdpSocket::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    let ports: Vec<u16> = probes.iter().map(|s| s.local_addr().map(|a| a.port())).collect::<Result<_, _>>()?;
    let out = UdpSocket::bind("127.0.0.1:0").await?;
    // The kernel's receive time, as Tessera's viewer (a full peer) takes it.
    record_arrivals(&out).context("SO_TIMESTAMPNS on the bare pipeline's output socket")?;
    // The encoder's threads as the mixer's rule gives them: one per 1080p30 of pixel rate,
    // at most the CPUs it may use (one when pinned, as the server is).
    let pixel_rate = u64::from(WIDTH) * u64::from(HEIGHT) * u64::from(FPS);
    let cpus = if launch.pin_cpu.is_some() { 1 } else { std::thread::available_parallelism().map_or(1, |n| n.get()) };
    let threads = usize::try_from(pixel_rate.div_ceil(1920 * 1080 * 30)).unwrap_or(usize::MAX).clamp(1, cpus);
    let desc = bare_pipeline(&ports, out.local_addr()?.port(), threads);
    drop(probes);
    let dir = scratch_dir("gstreamer")?;
    let log = std::fs::File::create(dir.join("gst-launch.log"))?;
    let mut cmd = launch.command(&"gst-launch-1.0".into());
    cmd.arg("-q").args(desc.split_whitespace().map(|a| a.replace('"', ""))).stdout(Stdio::null()).stderr(log);
    let child = cmd.spawn().context("starting gst-launch-1.0 (Debian package gstreamer1.0-tools)")?;
    let mut process = Process::new(child, dir, launch.cpu_quota, "gst")?;
    let pid = process.child.id();
    let received: Arc<std::sync::Mutex<Vec<Received>>> = Arc::default();
    let listening = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok(got) = recv_stamped(&out, &mut buf).await {
                let (n, arrived_us) = (got.len, got.at.map_or_else(now_us, |at| at.as_micros() as u64));
                let mut bytes = buf.get(..n).unwrap_or_default();
                let Ok(p) = rtc::rtp::Packet::unmarshal(&mut bytes) else { continue };
                if let Ok(mut r) = received.lock() {
                    r.push(Received { kind: "video", header: p.header, payload: p.payload, arrived_us, size: n });
                }
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_error = StopOnDrop(stop.clone());
    let sent = Sent::default();
    let targets = ports.iter().map(|p| Target::Udp(send.clone(), SocketAddr::from(([127, 0, 0, 1], *p)))).collect();
    let replaying = tokio::spawn(replay(clip, targets, stop.clone(), sent.clone()));
    tokio::time::sleep(WARM_UP).await;
    let measured = measure(&[pid], seconds).await;
    // A pipeline that failed (a bad element, a port taken) measured nothing.
    if let Ok(Some(status)) = process.child.try_wait() {
        let log = std::fs::read_to_string(process.dir.join("gst-launch.log")).unwrap_or_default();
        anyhow::bail!("gst-launch-1.0 exited ({status}) during the measurement: {}", log.trim());
    }
    stop.store(true, Ordering::Relaxed);
    finish(replaying).await?;
    listening.abort();
    let output = received.lock().map(|s| s.clone()).unwrap_or_default();
    drop(process);
    let sent = sent.lock().map(|s| s.clone()).unwrap_or_default();
    mixer_figures(output, sent, measured).await
}

/// A mixer's figures over the window `measured`: its CPU and memory, and from its `output`
/// (video packets as they arrived) the frame rate and the latency.
async fn mixer_figures(output: Vec<Received>, sent: Vec<(u64, u32)>, measured: Measured) -> anyhow::Result<Figures> {
    let seen: Vec<(u64, u32)> = output.iter().map(|p| (p.arrived_us, p.header.timestamp)).collect();
    let latency = tokio::task::spawn_blocking(move || latencies(&output, &sent, measured.from, measured.to)).await??;
    Ok(Figures {
        latency,
        cpu_seconds: measured.cpu,
        max_cpu_seconds: measured.max_cpu,
        generator_cpu_seconds: measured.generator,
        window_s: (measured.to - measured.from) as f64 / 1e6,
        rss_mb: measured.rss,
        mixer_fps: Some(frame_rate(&seen, measured.from, measured.to)),
        mixer_fps_configured: Some(FPS),
        ..Figures::default()
    })
}

/// Runs both sides and returns their rows (the ratio is printed).
pub async fn mixer_vs_gstreamer(launch: &Launch, seconds: u64) -> anyhow::Result<Vec<Value>> {
    let started = Instant::now();
    let clip = Arc::new(tokio::task::spawn_blocking(|| encode_counted_clip(INPUT, CLIP_SECONDS)).await??);
    eprintln!(
        "tessera-bench: mixer-vs-gstreamer: {} packets of moving, counted pictures encoded in {:.1} s",
        clip.packets.len(),
        started.elapsed().as_secs_f64()
    );
    let tessera = tessera_views(launch, clip.clone(), seconds, 1).await?.into_iter().next().context("no view measured")?;
    let bare = bare(launch, clip.clone(), seconds).await?;
    let ratio = tessera.cpu_pct() / bare.cpu_pct().max(0.001);
    eprintln!(
        "tessera-bench: mixer-vs-gstreamer: Tessera {:.1} % of a core at {:.1} fps, bare GStreamer {:.1} % at {:.1} fps: ratio {:.2}",
        tessera.cpu_pct(),
        tessera.mixer_fps.unwrap_or(0.0),
        bare.cpu_pct(),
        bare.mixer_fps.unwrap_or(0.0),
        ratio,
    );
    eprintln!(
        "tessera-bench: mixer-vs-gstreamer: latency p50/p99 ms: Tessera {:.0}/{:.0} ({} frames read), bare {:.0}/{:.0} ({})",
        percentile(&tessera.latency, 0.5),
        percentile(&tessera.latency, 0.99),
        tessera.latency.len(),
        percentile(&bare.latency, 0.5),
        percentile(&bare.latency, 0.99),
        bare.latency.len(),
    );
    let mut rows = vec![row("mixer-vs-gstreamer", "tessera", &tessera), row("mixer-vs-gstreamer", "gstreamer", &bare)];
    if let Some(r) = rows.first_mut() {
        r["cpu_ratio_to_bare"] = json!((ratio * 100.0).round() / 100.0);
    }
    // Two such views (two rooms) on the whole machine (every CPU, the load generator's
    // too): both at full rate?
    let unpinned = Launch { pin_cpu: None, all_cpus: true, ..launch.clone() };
    let two = tessera_views(&unpinned, clip, seconds, 2).await?;
    let fps: Vec<String> = two.iter().map(|f| format!("{:.1}", f.mixer_fps.unwrap_or(0.0))).collect();
    eprintln!(
        "tessera-bench: mixer-vs-gstreamer: two views unpinned: {} fps, server {:.0} % of a core, latency p50/p99 ms {}",
        fps.join(" and "),
        two.first().map_or(0.0, Figures::cpu_pct),
        two.iter().map(|f| format!("{:.0}/{:.0}", percentile(&f.latency, 0.5), percentile(&f.latency, 0.99))).collect::<Vec<_>>().join(" and "),
    );
    for (i, f) in two.iter().enumerate() {
        let mut r = row("mixer-two-views", "tessera", f);
        r["view"] = json!(i + 1);
        rows.push(r);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bare_pipeline_places_each_input_in_its_region() {
        let d = bare_pipeline(&[5000, 5001, 5002, 5003], 6000, 1);
        assert!(d.contains("sink_4::xpos=0 sink_4::ypos=240 sink_4::width=426 sink_4::height=240"), "{d}");
        assert!(d.contains("udpsrc address=127.0.0.1 port=5003"), "{d}");
        assert!(d.contains("target-bitrate=1548000") && d.contains("udpsink host=127.0.0.1 port=6000"), "{d}");
        assert_eq!(d.matches("vp8dec").count(), 4);
    }

    #[test]
    fn frame_rate_counts_distinct_timestamps_in_the_window() {
        let seen = [(0, 1), (1_000_000, 2), (1_000_001, 2), (1_500_000, 3), (3_000_000, 4)];
        assert_eq!(frame_rate(&seen, 1_000_000, 2_000_000), 2.0);
    }
}
