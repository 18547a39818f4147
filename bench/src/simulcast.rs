//! The simulcast scenario (Tessera only): one publisher sending three real VP8 layers,
//! fifty light subscribers on `auto`, twenty of them behind a limited link of their own;
//! per group what arrived (bit rate, loss, the longest gap in the video, the layer it
//! ended on), and the server's CPU per forwarded packet against three references on
//! fresh servers in the same run: fanout50 as the `fanout50` scenario runs it (full
//! peers, the bench's `--video-kbps`/`--fps`), fanout50 on the same light peers (audio and
//! video at the top layer's rate), and like for like (the same subscribers at the same
//! video rates, without simulcast).
//!
//! The limited links are real queues: each limited subscriber has an address of its own
//! in the bench's namespace, and an HTB class on `lo` (where every packet between two of
//! the namespace's addresses goes) holds what the server sends it to a rate behind a
//! short FIFO, as a home uplink's bottleneck does. Those subscribers answer with TWCC
//! feedback and receiver reports as browsers do (`LightOptions::feedback`); the others
//! send none, so the server keeps them on the layer they started on, the highest.

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tessera_client::light::{self, LightOptions, LightSubscriber};
use tessera_client::peer::{PublishOptions, Publisher, Received};
use tessera_client::signaling::Signaling;
use tessera_client::simulcast::{LayerSpec, SimulcastPublisher, vp8_keyframe_size};

use crate::scenario::{AbortOnDrop, Figures, Load, Measured, Shape, measure, row};
use crate::server::tessera::Tessera;
use crate::server::{AnyServer, Kind, Launch, Server};

/// Subscribers on a free link.
const FREE: usize = 30;
/// Subscribers on a limited link each.
const LIMITED: usize = 20;
/// The limited links' rate: the middle layer fits, the top one does not.
const LIMIT_KBPS: u32 = 600;
/// Packets the limited links' queue holds before it drops.
const LIMIT_QUEUE: u32 = 64;
/// Moving zone plates (each layer costs what its encoder is given), 15 fps.
const LAYERS: [LayerSpec; 3] = [
    LayerSpec { rid: "q", width: 160, height: 120, rgb: (0, 0, 0), noise_kbps: Some(150) },
    LayerSpec { rid: "h", width: 320, height: 240, rgb: (0, 0, 0), noise_kbps: Some(400) },
    LayerSpec { rid: "f", width: 640, height: 480, rgb: (0, 0, 0), noise_kbps: Some(1200) },
];
/// Time the limited subscribers get to find their layer before the window.
const SETTLE: Duration = Duration::from_secs(8);
/// A subscriber whose video paused longer than this in the window stalled.
const STALL: Duration = Duration::from_secs(1);
/// The limited subscribers' addresses: 127.0.1.100 and up, beside the load generator's.
fn limited_ip(i: usize) -> String {
    format!("127.0.1.{}", 100 + i)
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The limited links and their addresses, removed when dropped.
struct Shaping {
    addresses: Vec<String>,
}

impl Shaping {
    /// One HTB class per address at `kbps` with a `queue`-packet FIFO; all other traffic
    /// through an unlimited default class.
    fn new(addresses: &[String], kbps: u32, queue: u32) -> anyhow::Result<Shaping> {
        let mut shaping = Shaping { addresses: Vec::new() };
        for ip in addresses {
            run("ip", &["addr", "add", &format!("{ip}/32"), "dev", "b0"])?;
            shaping.addresses.push(ip.clone());
        }
        run("tc", &["qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "1"])?;
        run("tc", &["class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb", "rate", "100gbit"])?;
        for (i, ip) in addresses.iter().enumerate() {
            let class = format!("1:{:x}", 0x100 + i);
            let rate = format!("{kbps}kbit");
            // A burst of one packet, as a link that serialises at its rate: `lo`'s 64 KiB
            // MTU would otherwise give each class a 64 KiB token bucket that lets every
            // frame through at once (a link that hides its rate until it is overrun).
            let class_args = ["class", "add", "dev", "lo", "parent", "1:", "classid", &class, "htb", "rate", &rate, "ceil", &rate];
            run("tc", &[&class_args[..], &["burst", "1600b", "cburst", "1600b"]].concat())?;
            run("tc", &["qdisc", "add", "dev", "lo", "parent", &class, "pfifo", "limit", &queue.to_string()])?;
            let dst = format!("{ip}/32");
            run("tc", &["filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "u32", "match", "ip", "dst", &dst, "flowid", &class])?;
        }
        Ok(shaping)
    }
}

impl Drop for Shaping {
    fn drop(&mut self) {
        let _ = run("tc", &["qdisc", "del", "dev", "lo", "root"]);
        for ip in &self.addresses {
            let _ = run("ip", &["addr", "del", &format!("{ip}/32"), "dev", "b0"]);
        }
    }
}

/// What one subscriber's video did in the window.
#[derive(Debug, Clone, Default)]
struct Seen {
    packets: usize,
    bytes: usize,
    /// Sequence numbers missing between the lowest and highest that arrived.
    lost: u64,
    expected: u64,
    /// The longest time without a video packet (window edges included).
    longest_gap: Duration,
    /// The width of the last keyframe that arrived (subscribers that decrypt).
    width: Option<u16>,
}

fn seen(log: &[Received], (from_us, to_us): (u64, u64)) -> Seen {
    let video: Vec<&Received> = log.iter().filter(|r| r.kind == "video" && r.arrived_us >= from_us && r.arrived_us <= to_us).collect();
    let mut s = Seen { longest_gap: Duration::from_micros(to_us.saturating_sub(from_us)), ..Seen::default() };
    let (Some(first), Some(last)) = (video.first(), video.last()) else { return s };
    let mut gap = first.arrived_us.saturating_sub(from_us).max(to_us.saturating_sub(last.arrived_us));
    // Sequence numbers unwrapped from the first one (the server numbers a subscriber's
    // video continuously across layer switches).
    let (mut ext, mut prev) = (0i64, first.header.sequence_number);
    let mut numbers = HashSet::new();
    for pair in video.windows(2) {
        if let [a, b] = pair {
            gap = gap.max(b.arrived_us.saturating_sub(a.arrived_us));
        }
    }
    for r in &video {
        ext += i64::from(r.header.sequence_number.wrapping_sub(prev) as i16);
        prev = r.header.sequence_number;
        numbers.insert(ext);
        s.packets += 1;
        s.bytes += r.size;
        if let Some((w, _)) = vp8_keyframe_size(&r.payload) {
            s.width = Some(w);
        }
    }
    let (lo, hi) = (numbers.iter().min().copied().unwrap_or(0), numbers.iter().max().copied().unwrap_or(0));
    s.expected = (hi - lo + 1) as u64;
    s.lost = s.expected - numbers.len() as u64;
    s.longest_gap = Duration::from_micros(gap);
    s
}

/// One group's row.
fn group_row(name: &str, seens: &[Seen], window_s: f64, first_frames: &[f64]) -> Value {
    let kbps: Vec<f64> = seens.iter().map(|s| s.bytes as f64 * 8.0 / window_s / 1000.0).collect();
    let (lost, expected): (u64, u64) = seens.iter().fold((0, 0), |(l, e), s| (l + s.lost, e + s.expected));
    let mut widths: BTreeMap<String, usize> = BTreeMap::new();
    for s in seens {
        *widths.entry(s.width.map_or("?".to_string(), |w| w.to_string())).or_default() += 1;
    }
    let longest = seens.iter().map(|s| s.longest_gap).max().unwrap_or_default();
    json!({
        "scenario": "simulcast",
        "server": "tessera",
        "group": name,
        "subscribers": seens.len(),
        "kbps_mean": (kbps.iter().sum::<f64>() / kbps.len().max(1) as f64).round(),
        "kbps_min": kbps.iter().copied().fold(f64::INFINITY, f64::min).round(),
        "kbps_max": kbps.iter().copied().fold(0.0, f64::max).round(),
        "loss_pct": if expected == 0 { 0.0 } else { (10000.0 * lost as f64 / expected as f64).round() / 100.0 },
        "longest_gap_ms": longest.as_millis() as u64,
        "stalled": seens.iter().filter(|s| s.longest_gap > STALL).count(),
        "last_keyframe_widths": widths,
        "first_frame_ms": crate::scenario::percentile(first_frames, 0.5).round(),
    })
}

/// A subscriber of the scenario: its group, its peer, its session.
struct Member {
    limited: bool,
    sub: LightSubscriber,
    _sig: Signaling,
    first_frame_ms: Option<f64>,
}

impl Member {
    /// What it received in the measured window.
    fn seen_in(&self, measured: &Measured) -> Seen {
        seen(&self.sub.received.lock().map(|r| r.clone()).unwrap_or_default(), (measured.from, measured.to))
    }
}

/// Joins subscriber `i`; a limited one answers with feedback, from its own shaped address
/// when `shaped`.
async fn join(t: &Tessera, room: &str, stream: &str, i: usize, limited: bool, shaped: bool) -> anyhow::Result<Member> {
    let started = Instant::now();
    let mut sig = t.join_room(room, &format!("sub{i}")).await?;
    let (ip, options) = if limited {
        let ip = if shaped { limited_ip(i - FREE) } else { t.client_ip().to_string() };
        (ip, LightOptions { feedback: true, video_only: true, ..LightOptions::default() })
    } else {
        (t.client_ip().to_string(), LightOptions { video_only: true, ..LightOptions::default() })
    };
    let sub = light::subscribe_with(&mut sig, &ip, stream, options).await.with_context(|| format!("subscriber {i}"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut first_frame_ms = None;
    while Instant::now() < deadline {
        if sub.received.lock().map(|r| r.iter().any(|p| p.kind == "video")).unwrap_or(false) {
            first_frame_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Member { limited, sub, _sig: sig, first_frame_ms })
}

/// Runs the scenario, then its references (fanout50, fanout50 on light peers, like for
/// like); returns the rows: one per group, one per reference, and the comparison.
pub async fn simulcast(launch: &Launch, load: Load, seconds: u64) -> anyhow::Result<Vec<Value>> {
    let mut rows = Vec::new();
    let t = Tessera::start(launch)?;
    let room = t.create_room("simulcast", json!({"views": []})).await?;
    let mut psig = t.join_room(&room, "layers").await?;
    let publisher = SimulcastPublisher::start_on(&mut psig, t.client_ip(), &LAYERS).await?;
    // The server measures each layer's bit rate before anyone needs it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let limited_ips: Vec<String> = (0..LIMITED).map(limited_ip).collect();
    let shaping = Shaping::new(&limited_ips, LIMIT_KBPS, LIMIT_QUEUE)?;
    let mut members = Vec::new();
    let wanted: Vec<usize> = (0..FREE + LIMITED).collect();
    for batch in wanted.chunks(8) {
        let joins = batch.iter().map(|&i| join(&t, &room, &publisher.stream_id, i, i >= FREE, true));
        for m in futures_util::future::join_all(joins).await {
            members.push(m?);
        }
    }
    tokio::time::sleep(SETTLE).await;
    let measured = measure(&[t.pid()], seconds).await;
    let mut groups: [(Vec<Seen>, Vec<f64>); 2] = Default::default();
    let mut packets = 0usize;
    for m in &members {
        let s = m.seen_in(&measured);
        packets += s.packets;
        let g = &mut groups[usize::from(m.limited)];
        g.0.push(s);
        g.1.extend(m.first_frame_ms);
    }
    let missing = members.iter().filter(|m| m.first_frame_ms.is_none()).count();
    let (window_s, cpu_us) = per_packet(&measured, packets);
    for (name, (seens, first)) in ["free", "limited"].iter().zip(&groups) {
        rows.push(group_row(name, seens, window_s, first));
    }
    drop(members);
    drop(publisher);
    drop(t);
    drop(shaping);

    // The same count of light subscribers of one synthetic publisher at the top layer's
    // rate (no simulcast, so no bandwidth estimation at work).
    let top = Load { video_kbps: 1200, fps: 15 };
    let light = Shape { publishers: 1, fanout: FREE + LIMITED, mesh: false, parallel: 8, light: true };
    let light_us = reference(launch, "fanout50-light", top, light, seconds, &mut rows).await?;
    // fanout50 as the criterion names it: the `fanout50` scenario itself, full
    // webrtc-rs peers (each answering with reports, NACKs and TWCC), the bench's load.
    let full = Shape { light: false, parallel: 1, ..light };
    let fanout50_us = reference(launch, "fanout50", load, full, seconds, &mut rows).await?;
    let like = like_for_like(launch, seconds).await?;
    let like_us = like["cpu_us_per_packet"].as_f64().unwrap_or(0.0);
    rows.push(like);
    let ratio = |reference: f64| if reference > 0.0 { (cpu_us / reference * 100.0).round() / 100.0 } else { 0.0 };
    rows.push(json!({
        "scenario": "simulcast",
        "server": "tessera",
        "group": "all",
        "subscribers": FREE + LIMITED,
        "missing_first_frames": missing,
        "forwarded_pps": (packets as f64 / window_s).round(),
        "cpu_pct": (measured.cpu / window_s * 1000.0).round() / 10.0,
        "cpu_us_per_packet": (cpu_us * 100.0).round() / 100.0,
        "fanout50_cpu_us_per_packet": fanout50_us,
        "cpu_ratio_to_fanout50": ratio(fanout50_us),
        "fanout50_light_cpu_us_per_packet": light_us,
        "cpu_ratio_to_fanout50_light": ratio(light_us),
        "like_for_like_cpu_us_per_packet": like_us,
        "cpu_ratio_to_like_for_like": ratio(like_us),
        "limit_kbps": LIMIT_KBPS,
        "limit_queue_packets": LIMIT_QUEUE,
        "layers_kbps": LAYERS.iter().map(|l| l.noise_kbps.unwrap_or(0)).collect::<Vec<_>>(),
    }));
    Ok(rows)
}

/// Runs the fanout `shape` of `load` as reference `name` on a fresh server, adds its row
/// to `rows`, and returns its CPU µs per forwarded packet.
async fn reference(launch: &Launch, name: &str, load: Load, shape: Shape, seconds: u64, rows: &mut Vec<Value>) -> anyhow::Result<f64> {
    let s = AnyServer::start(Kind::Tessera, launch).await?;
    let f: Figures = crate::scenario::sfu(&s, load, shape, seconds).await?;
    let mut r = row(name, "tessera", &f);
    r["reference_for"] = json!("simulcast");
    let us = r["cpu_us_per_packet"].as_f64().unwrap_or(0.0);
    rows.push(r);
    Ok(us)
}

/// The like-for-like reference, on a fresh server: the scenario's subscribers (light,
/// video only, the same twenty answering with feedback) receiving what they received
/// there, without simulcast: the thirty free ones a synthetic video-only publisher at the
/// top layer's rate, the twenty others one at the middle layer's, all on free links.
/// (Each connection costs the server something whatever its rate — timers, reports,
/// feedback — so a reference of fifty subscribers at the top rate makes each packet look
/// cheaper.) The scenario's shaper stays in place, though nobody is behind it: the kernel
/// charges the sender for every packet's trip through `lo`'s HTB and its filters (5-10 %
/// of the server's CPU in the scenario, profiled), a cost of the test network, not of
/// the server.
async fn like_for_like(launch: &Launch, seconds: u64) -> anyhow::Result<Value> {
    let limited_ips: Vec<String> = (0..LIMITED).map(limited_ip).collect();
    let _shaping = Shaping::new(&limited_ips, LIMIT_KBPS, LIMIT_QUEUE)?;
    let t = Tessera::start(launch)?;
    let room = t.create_room("reference", json!({"views": []})).await?;
    let mut keep = Vec::new();
    let mut senders = Vec::new();
    let mut streams = Vec::new();
    for (tag, spec) in [&LAYERS[2], &LAYERS[1]].into_iter().enumerate() {
        let mut sig = t.join_room(&room, &format!("synthetic-{}", spec.rid)).await?;
        let opts = PublishOptions { audio: false, video: true, data: false, tag: tag as u32, h264: false };
        let p = Arc::new(Publisher::start(&mut sig, opts, Some(t.connection().await?)).await?);
        p.keep_sent.store(false, Ordering::Relaxed);
        let load = Load { video_kbps: spec.noise_kbps.unwrap_or(0), fps: 15 };
        let sender = p.clone();
        senders.push(tokio::spawn(async move { sender.send_for(Duration::from_secs(24 * 3600), load.fps, load.frame_bytes()).await }));
        streams.push(p.stream_id.clone());
        keep.push((sig, p));
    }
    let senders = AbortOnDrop(senders);
    let mut members = Vec::new();
    let wanted: Vec<usize> = (0..FREE + LIMITED).collect();
    for batch in wanted.chunks(8) {
        let joins = batch.iter().map(|&i| join(&t, &room, &streams[usize::from(i >= FREE)], i, i >= FREE, false));
        for m in futures_util::future::join_all(joins).await {
            members.push(m?);
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let measured = measure(&[t.pid()], seconds).await;
    drop(senders);
    let packets = members.iter().map(|m| m.seen_in(&measured).packets).sum();
    let (window_s, cpu_us) = per_packet(&measured, packets);
    Ok(json!({
        "scenario": "like-for-like",
        "server": "tessera",
        "reference_for": "simulcast",
        "subscribers": members.len(),
        "video_kbps": [LAYERS[2].noise_kbps, LAYERS[1].noise_kbps],
        "fps": 15,
        "forwarded_pps": (packets as f64 / window_s).round(),
        "cpu_pct": (measured.cpu / window_s * 1000.0).round() / 10.0,
        "cpu_us_per_packet": (cpu_us * 100.0).round() / 100.0,
    }))
}

/// The measured window's length in seconds, and the server's CPU µs per packet of the
/// `packets` forwarded in it.
fn per_packet(measured: &Measured, packets: usize) -> (f64, f64) {
    ((measured.to - measured.from) as f64 / 1e6, measured.cpu * 1e6 / (packets.max(1) as f64))
}

/// Prints the scenario's rows, when a run has them.
pub fn print(rows: &[Value]) {
    let groups: Vec<&Value> = rows.iter().filter(|r| r["scenario"] == "simulcast" && r["group"].is_string() && r["group"] != "all").collect();
    if groups.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<10} {:>5} {:>10} {:>10} {:>10} {:>8} {:>9} {:>8} {:>10}  last keyframe widths",
        "simulcast", "subs", "kbit/s", "min", "max", "loss %", "gap ms", "stalled", "1st frame"
    );
    for g in groups {
        println!(
            "{:<10} {:>5} {:>10} {:>10} {:>10} {:>8} {:>9} {:>8} {:>10}  {}",
            g["group"].as_str().unwrap_or("?"),
            g["subscribers"],
            g["kbps_mean"],
            g["kbps_min"],
            g["kbps_max"],
            g["loss_pct"],
            g["longest_gap_ms"],
            g["stalled"],
            g["first_frame_ms"],
            g["last_keyframe_widths"]
        );
    }
    if let Some(all) = rows.iter().find(|r| r["scenario"] == "simulcast" && r["group"] == "all") {
        println!(
            "simulcast: {} pkt/s forwarded, CPU {} %, {} µs/pkt; fanout50 {} µs/pkt: ratio {}; fanout50 on the same light peers {} µs/pkt: ratio {}; like for like (no simulcast, same rates) {} µs/pkt: ratio {} (subscribers without a first frame: {})",
            all["forwarded_pps"],
            all["cpu_pct"],
            all["cpu_us_per_packet"],
            all["fanout50_cpu_us_per_packet"],
            all["cpu_ratio_to_fanout50"],
            all["fanout50_light_cpu_us_per_packet"],
            all["cpu_ratio_to_fanout50_light"],
            all["like_for_like_cpu_us_per_packet"],
            all["cpu_ratio_to_like_for_like"],
            all["missing_first_frames"]
        );
    }
}
