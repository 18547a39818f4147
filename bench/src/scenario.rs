//! The scenarios: synthetic publishers and subscribers against any [`Server`], and the
//! mixer scenarios that only Tessera can run. Every figure comes from what the subscribers
//! received inside one measurement window and from the server's /proc entries over it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_client::media::{LiveFormat, live_source_with};
use tessera_client::peer::{Marker, PublishOptions, Publisher, Received, Subscriber, is_vp8_keyframe, now_us};

use crate::server::tessera::Tessera;
use crate::server::{Keep, PeerKind, Server, Sub, cpu_seconds, rss_mb};

/// Figures of one scenario run on one server.
#[derive(Debug, Default)]
pub struct Figures {
    /// Media packets the subscribers received per second.
    pub forwarded_pps: f64,
    /// Their bit rate (payload + RTP header).
    pub mbps: f64,
    /// Server CPU seconds (user + system, all threads) over the window; of every process
    /// measured, for a cluster.
    pub cpu_seconds: f64,
    /// The busiest process's share of `cpu_seconds` (the one that saturates first).
    pub max_cpu_seconds: f64,
    /// The load generator's own CPU seconds over the window (this process: its peers'
    /// crypto and sockets), to tell a server's limit from the generator's.
    pub generator_cpu_seconds: f64,
    /// Window length in seconds.
    pub window_s: f64,
    /// Server RSS at the end of the window.
    pub rss_mb: f64,
    /// One-way latencies (ms) of every marked packet received in the window.
    pub latency: Vec<f64>,
    /// Packets missing from the subscribers' sequences, in percent.
    pub loss_pct: f64,
    /// Packets that arrived after a later packet of their track, in percent.
    pub out_of_order_pct: f64,
    /// Synthetic publishers' video bit rate and frame rate, when they were synthetic.
    pub video_kbps: Option<u32>,
    /// See `video_kbps`.
    pub fps: Option<u32>,
    /// Median time from the start of a subscriber's join to its first video packet.
    pub first_frame_ms: f64,
    /// Mixed video frames per second seen by a viewer, when a mix was measured.
    pub mixer_fps: Option<f64>,
    /// The view's configured frame rate, when a mix was measured.
    pub mixer_fps_configured: Option<u32>,
    /// Subscriber connections.
    pub subscribers: usize,
    /// Subscribers that saw no video within 5 s of joining.
    pub missing_first_frames: usize,
}

impl Figures {
    /// Server CPU over the window, in percent of one core.
    pub fn cpu_pct(&self) -> f64 {
        self.of_window(self.cpu_seconds)
    }

    /// The busiest process's CPU over the window, in percent of one core.
    pub fn max_cpu_pct(&self) -> f64 {
        self.of_window(self.max_cpu_seconds)
    }

    /// Rates, CPU and memory of one measurement window (`measure`'s result), from every
    /// subscriber's log.
    /// The load generator's CPU over the window, in percent of one core.
    pub fn generator_cpu_pct(&self) -> f64 {
        self.of_window(self.generator_cpu_seconds)
    }

    /// CPU `seconds` spent over the window, in percent of one core.
    fn of_window(&self, seconds: f64) -> f64 {
        seconds / self.window_s.max(0.001) * 100.0
    }

    fn window(logs: &[Vec<Received>], Measured { cpu, max_cpu, generator, from, to, rss }: Measured, first_frames: &[f64]) -> Figures {
        let w = analyse(logs, from, to);
        let secs = (to - from) as f64 / 1e6;
        Figures {
            forwarded_pps: w.packets as f64 / secs,
            mbps: w.bytes as f64 * 8.0 / secs / 1e6,
            cpu_seconds: cpu,
            max_cpu_seconds: max_cpu,
            generator_cpu_seconds: generator,
            window_s: secs,
            rss_mb: rss,
            first_frame_ms: percentile(first_frames, 0.5),
            subscribers: logs.len(),
            ..Default::default()
        }
    }
}

/// Value at quantile `p` (0..=1) of `v`.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    s[((s.len() - 1) as f64 * p).round() as usize]
}

/// What subscribers received in a window: rates and arrival order.
struct Window {
    packets: usize,
    bytes: usize,
    /// Marked packets that arrived after a later one of the same track, in percent.
    out_of_order_pct: f64,
}

fn analyse(received: &[Vec<Received>], from_us: u64, to_us: u64) -> Window {
    let (mut packets, mut bytes, mut got, mut late) = (0usize, 0usize, 0u64, 0u64);
    for log in received {
        // Highest index seen so far per track (kind, publisher tag).
        let mut highest: HashMap<(&str, u32), u64> = HashMap::new();
        for r in log.iter().filter(|r| r.arrived_us >= from_us && r.arrived_us <= to_us) {
            packets += 1;
            bytes += r.size;
            if let Some(m) = Marker::find(&r.payload) {
                got += 1;
                match highest.get_mut(&(r.kind, m.tag)) {
                    Some(h) if m.index < *h => late += 1,
                    Some(h) => *h = m.index,
                    None => {
                        highest.insert((r.kind, m.tag), m.index);
                    }
                }
            }
        }
    }
    Window { packets, bytes, out_of_order_pct: if got == 0 { 0.0 } else { 100.0 * late as f64 / got as f64 } }
}

/// Packets each publisher sent in the window: marker index ranges `[start, end)` of its
/// video and audio tracks.
#[derive(Debug, Clone, Copy)]
struct Sent {
    video: (u64, u64),
    audio: (u64, u64),
}

/// Loss and latency against what was sent: for every subscriber, each packet its publisher
/// sent in the window counts once, whether it arrived or not (a subscriber that received
/// nothing is 100 % loss), and each one that arrived gives a latency sample. A subscriber
/// without payloads (a light peer that does not decrypt) counts the distinct sequence
/// numbers that arrived in the window instead, and gives no latency.
fn delivery(subs: &[(u32, bool, Vec<Received>)], sent: &HashMap<u32, Sent>, (from_us, to_us): (u64, u64)) -> (Vec<f64>, f64) {
    let (mut expected, mut got, mut latency) = (0u64, 0u64, Vec::new());
    for (tag, payloads, log) in subs {
        let Some(range) = sent.get(tag) else { continue };
        let wanted = (range.video.1 - range.video.0) + (range.audio.1 - range.audio.0);
        expected += wanted;
        if !payloads {
            let arrived: HashSet<(&str, u16)> =
                log.iter().filter(|r| r.arrived_us >= from_us && r.arrived_us <= to_us).map(|r| (r.kind, r.header.sequence_number)).collect();
            // Packets sent just before the window and arriving in it stand in for those
            // sent at its end and arriving after: a few either way, never more than sent.
            got += (arrived.len() as u64).min(wanted);
            continue;
        }
        let mut seen = std::collections::HashSet::new();
        for r in log {
            let Some(m) = Marker::find(&r.payload) else { continue };
            let (lo, hi) = if r.kind == "video" { range.video } else { range.audio };
            if m.tag == *tag && m.index >= lo && m.index < hi && seen.insert((r.kind, m.index)) {
                got += 1;
                latency.push(r.arrived_us.saturating_sub(m.sent_us) as f64 / 1000.0);
            }
        }
    }
    let loss = if expected == 0 { 0.0 } else { 100.0 * expected.saturating_sub(got) as f64 / expected as f64 };
    (latency, loss)
}

/// Aborts the tasks when dropped, whichever way the scenario ends.
pub(crate) struct AbortOnDrop(pub(crate) Vec<tokio::task::JoinHandle<anyhow::Result<(u64, u64)>>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// What the servers' processes spent over a window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Measured {
    /// CPU seconds of every process.
    pub(crate) cpu: f64,
    /// CPU seconds of the busiest one.
    pub(crate) max_cpu: f64,
    /// CPU seconds of the load generator (this process).
    pub(crate) generator: f64,
    /// The window, µs since the epoch.
    pub(crate) from: u64,
    /// See `from`.
    pub(crate) to: u64,
    /// RSS of every process at the end, MiB.
    pub(crate) rss: f64,
}

/// The servers' CPU seconds and RSS over `seconds` of traffic, and the window.
pub(crate) async fn measure(pids: &[u32], seconds: u64) -> Measured {
    let me = std::process::id();
    let (cpu0, gen0, from): (Vec<f64>, f64, u64) = (pids.iter().map(|p| cpu_seconds(*p)).collect(), cpu_seconds(me), now_us());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (cpu1, gen1, to): (Vec<f64>, f64, u64) = (pids.iter().map(|p| cpu_seconds(*p)).collect(), cpu_seconds(me), now_us());
    let spent: Vec<f64> = cpu1.iter().zip(&cpu0).map(|(b, a)| b - a).collect();
    Measured {
        cpu: spent.iter().sum(),
        max_cpu: spent.iter().copied().fold(0.0, f64::max),
        generator: gen1 - gen0,
        from,
        to,
        rss: pids.iter().map(|p| rss_mb(*p)).sum(),
    }
}

/// Subscribes and returns the subscription with the time from the start of the join
/// (token/login or session creation included) to its first video packet (none after 5 s).
async fn subscribe_timed<S: Server>(server: &S, user: &str, stream: &str, peer: PeerKind) -> anyhow::Result<(Sub, Keep, Option<f64>)> {
    let started = Instant::now();
    let (s, keep) = server.subscribe(user, stream, peer).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut first = None;
    // The first picture the subscriber can show: a keyframe's first packet, where the
    // payload can be read (a server that forwards from a keyframe and one that forwards the
    // frames before it differ in the first packet, not in the first picture); a light peer
    // that does not decrypt sees only that video arrives.
    let payloads = s.has_payloads();
    let shows = |p: &Received| p.kind == "video" && (!payloads || is_vp8_keyframe(&p.payload));
    while Instant::now() < deadline {
        if s.received().lock().map(|r| r.iter().any(shows)).unwrap_or(false) {
            first = Some(started.elapsed().as_secs_f64() * 1000.0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((s, keep, first))
}

/// Empties the subscribers' packet logs (keeping their room for what comes next).
fn forget_received<'a>(subs: impl Iterator<Item = &'a Sub>) {
    for s in subs {
        if let Ok(mut r) = s.received().lock() {
            r.clear();
        }
    }
}

fn logs(subs: &[(Subscriber, Keep)]) -> Vec<Vec<Received>> {
    subs.iter().map(|(s, _)| s.received.lock().map(|r| r.clone()).unwrap_or_default()).collect()
}

/// What each synthetic publisher sends: VP8-framed video at `video_kbps` and `fps` (frames
/// over 1100 bytes split into several packets), and 50 Opus-sized audio packets a second.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Video bit rate in kbit/s.
    pub video_kbps: u32,
    /// Video frames per second.
    pub fps: u32,
}

impl Load {
    pub(crate) fn frame_bytes(&self) -> usize {
        (self.video_kbps as usize * 1000 / 8 / self.fps.max(1) as usize).max(64)
    }
}

/// Who joins an SFU scenario: `publishers` synthetic publishers, each subscribed by every
/// other publisher's participant (`mesh`) or by `fanout` subscribers, `parallel` joining at
/// a time (1: each join on a quiet server, so its time to first frame is the server's
/// alone), on light peers (`tessera_client::light`, one in ten decrypting) or full ones.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Synthetic publishers.
    pub publishers: usize,
    /// Subscribers per publisher (without `mesh`).
    pub fanout: usize,
    /// Every participant subscribes to every other publisher.
    pub mesh: bool,
    /// Joins at a time.
    pub parallel: usize,
    /// Light peers instead of full ones.
    pub light: bool,
}

/// Runs `shape` with every publisher sending `load`, measuring `seconds`.
pub async fn sfu<S: Server>(server: &S, load: Load, shape: Shape, seconds: u64) -> anyhow::Result<Figures> {
    let Shape { publishers, fanout, mesh, parallel, light } = shape;
    let mut pubs = Vec::new();
    for i in 0..publishers {
        let (p, keep) = server.publish(&format!("pub{i}"), i as u32).await?;
        p.keep_sent.store(false, std::sync::atomic::Ordering::Relaxed);
        pubs.push((p, keep));
    }
    // Senders run until the scenario ends, however long the joins take.
    let _senders = AbortOnDrop(
        pubs.iter()
            .map(|(p, _)| {
                let p = p.clone();
                tokio::spawn(async move { p.send_for(Duration::from_secs(24 * 3600), load.fps, load.frame_bytes()).await })
            })
            .collect(),
    );
    let mut subs = Vec::new();
    let mut first_frames = Vec::new();
    let mut wanted = Vec::new();
    for (i, (p, _)) in pubs.iter().enumerate() {
        let count = if mesh { publishers - 1 } else { fanout };
        wanted.extend((0..count).map(|j| (format!("sub{i}-{j}"), i as u32, p.stream_id.clone())));
    }
    for batch in wanted.chunks(parallel.max(1)) {
        let joins = batch.iter().map(|(user, _, stream)| {
            // Light peers: one in ten decrypts, for latency from the markers.
            let peer = if light { PeerKind::Light { decrypts: user.ends_with('0') } } else { PeerKind::Full };
            subscribe_timed(server, user, stream, peer)
        });
        for (r, (_, tag, _)) in futures_util::future::join_all(joins).await.into_iter().zip(batch) {
            let (s, keep, first) = r?;
            first_frames.extend(first);
            subs.push((*tag, s, keep));
        }
        // Only the window is measured, and each first frame is timed already: the packets
        // before are let go as the joins go on. (Kept, the first subscribers of a ramp's
        // step of thousands held every packet of the minutes the joins took — gigabytes,
        // and a load generator busy growing and copying them.)
        forget_received(subs.iter().map(|(_, s, _)| s));
    }
    // Let the last joins' handshakes and keyframe requests settle before measuring.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    forget_received(subs.iter().map(|(_, s, _)| s));
    let counts = |pubs: &[(Arc<Publisher>, Keep)]| pubs.iter().map(|(p, _)| p.sent_counts()).collect::<Vec<_>>();
    let before = counts(&pubs);
    let measured = measure(&server.pids(), seconds).await;
    let (from, to) = (measured.from, measured.to);
    let after = counts(&pubs);
    // Packets sent at the very end of the window are still on their way.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent: HashMap<u32, Sent> =
        before.iter().zip(&after).enumerate().map(|(i, (b, a))| (i as u32, Sent { video: (b.0, a.0), audio: (b.1, a.1) })).collect();
    let tagged: Vec<(u32, bool, Vec<Received>)> =
        subs.iter().map(|(tag, s, _)| (*tag, s.has_payloads(), s.received().lock().map(|r| r.clone()).unwrap_or_default())).collect();
    let (latency, loss_pct) = delivery(&tagged, &sent, (from, to));
    let logs: Vec<Vec<Received>> = tagged.into_iter().map(|(_, _, l)| l).collect();
    let w = analyse(&logs, from, to);
    Ok(Figures {
        latency,
        loss_pct,
        out_of_order_pct: w.out_of_order_pct,
        video_kbps: Some(load.video_kbps),
        fps: Some(load.fps),
        missing_first_frames: logs.len() - first_frames.len(),
        ..Figures::window(&logs, measured, &first_frames)
    })
}

/// A mixer load: `inputs` real VP8/Opus publishers (GStreamer-encoded) mixed into `room`'s
/// `common` view, and `viewers` subscribers of the mix.
pub async fn mixer(
    t: &Tessera,
    room: &str,
    inputs: usize,
    input: LiveFormat,
    viewers: usize,
    configured_fps: u32,
    seconds: u64,
) -> anyhow::Result<Figures> {
    let mut keep = Vec::new();
    for i in 0..inputs {
        let mut sig = t.join_room(room, &format!("cam{i}")).await?;
        let opts = PublishOptions { audio: true, video: true, data: false, tag: i as u32, h264: false };
        let p = Arc::new(Publisher::start(&mut sig, opts, Some(t.connection().await?)).await?);
        // Nothing here compares bytes: keep no copy of each packet sent.
        p.keep_sent.store(false, std::sync::atomic::Ordering::Relaxed);
        let colour = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)][i % 4];
        let src = live_source_with(p.clone(), colour, 300 + 100 * i as u32, input)?;
        keep.push((sig, p, src));
    }
    let mut subs = Vec::new();
    let mut first_frames = Vec::new();
    for j in 0..viewers {
        let started = Instant::now();
        let mut sig = t.join_room(room, &format!("viewer{j}")).await?;
        let s = Subscriber::start_on(&mut sig, t.connection().await?, &format!("{room}-common"), true, true, false).await?;
        if s.wait_until("first mixed video", Duration::from_secs(8), |r| r.iter().any(|p| p.kind == "video")).await.is_ok() {
            first_frames.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        subs.push((s, Box::new(sig) as Keep));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let measured = measure(&[t.pid()], seconds).await;
    let (from, to) = (measured.from, measured.to);
    let logs = logs(&subs);
    // Output frame rate, as the first viewer saw it.
    let seen: Vec<(u64, u32)> =
        logs.first().map(|l| l.iter().filter(|r| r.kind == "video").map(|r| (r.arrived_us, r.header.timestamp)).collect()).unwrap_or_default();
    Ok(Figures {
        mixer_fps: Some(frame_rate(&seen, from, to)),
        mixer_fps_configured: Some(configured_fps),
        missing_first_frames: viewers - first_frames.len(),
        ..Figures::window(&logs, measured, &first_frames)
    })
}

/// Video frames per second: distinct RTP timestamps among `(arrival µs, timestamp)` that
/// arrived in `from..=to`.
pub(crate) fn frame_rate(seen: &[(u64, u32)], from: u64, to: u64) -> f64 {
    let frames: HashSet<u32> = seen.iter().filter(|(at, _)| *at >= from && *at <= to).map(|(_, ts)| *ts).collect();
    frames.len() as f64 / ((to.saturating_sub(from)) as f64 / 1e6).max(0.001)
}

fn round(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}

/// One JSON row: the figures of `scenario` on `server`.
pub fn row(scenario: &str, server: &str, f: &Figures) -> Value {
    let packets = f.forwarded_pps * f.window_s;
    let mut v = json!({
        "scenario": scenario,
        "server": server,
        "subscribers": f.subscribers,
        "forwarded_pps": f.forwarded_pps.round(),
        "mbps": round(f.mbps, 2),
        "cpu_seconds": round(f.cpu_seconds, 2),
        "cpu_pct": round(f.cpu_pct(), 1),
        "busiest_cpu_pct": round(f.max_cpu_pct(), 1),
        "generator_cpu_pct": round(f.generator_cpu_pct(), 1),
        "cpu_us_per_packet": if packets > 0.0 { round(f.cpu_seconds * 1e6 / packets, 2) } else { 0.0 },
        "rss_mb": f.rss_mb.round(),
        "latency_ms_p50": round(percentile(&f.latency, 0.5), 2),
        "latency_ms_p95": round(percentile(&f.latency, 0.95), 2),
        "latency_ms_p99": round(percentile(&f.latency, 0.99), 2),
        "loss_pct": round(f.loss_pct, 2),
        "out_of_order_pct": round(f.out_of_order_pct, 3),
        "first_frame_ms": f.first_frame_ms.round(),
        "missing_first_frames": f.missing_first_frames,
    });
    if let (Some(kbps), Some(fps)) = (f.video_kbps, f.fps) {
        v["video_kbps"] = json!(kbps);
        v["video_fps"] = json!(fps);
    }
    if let Some(fps) = f.mixer_fps {
        v["mixer_fps"] = json!(round(fps, 1));
    }
    if let Some(fps) = f.mixer_fps_configured {
        v["mixer_fps_configured"] = json!(fps);
    }
    v
}
