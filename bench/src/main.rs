//! `tessera-bench`: starts a server on loopback, drives it with synthetic WebRTC
//! publishers and subscribers (the `tessera-client` crate), and reports what the server
//! forwarded, what it cost (CPU seconds and RSS from /proc, server process only), the
//! latency it added (send timestamps carried in every payload, same machine clock), loss,
//! and time to first frame. Everything stays on 127.0.0.1, every run is bounded in time
//! and count, and the tool stops by itself.
//!
//! The peer server for side-by-side runs (Janus) is not wired yet: `--against janus`
//! says so. The seam is `Target`: a server the scenarios can start and reach.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};
use tessera_client::media::live_source;
use tessera_client::peer::{Marker, PublishOptions, Publisher, Received, Subscriber};
use tessera_client::signaling::Signaling;

/// Load scenarios against Tessera.
#[derive(Parser, Debug)]
#[command(name = "tessera-bench", version, about)]
struct Args {
    /// smoke, one-to-one, fanout50, meeting10, mixer4, ramp, or all.
    #[arg(long, default_value = "smoke")]
    scenario: String,
    /// Peer server to compare with: none (Tessera alone) or janus.
    #[arg(long, default_value = "none")]
    against: String,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
    /// The tessera binary (default: next to this one).
    #[arg(long)]
    tessera_bin: Option<PathBuf>,
    /// Seconds of measured traffic per scenario.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

const KEY: &str = "bench-service-key-0123456789";

/// A server under test, running on loopback.
struct Target {
    child: Child,
    portal: String,
    api: String,
    _dir: PathBuf,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

fn start_tessera(bin: &PathBuf) -> anyhow::Result<Target> {
    let dir = std::env::temp_dir().join(format!("tessera-bench-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("bench.toml");
    std::fs::write(&cfg, "[webrtc]\nbind_ip = \"127.0.0.1\"\n[portal]\nmax_requests_per_sec = 1000\n[log]\nlevel = \"warn\"\n")?;
    let mut child = Command::new(bin)
        .args(["serve", "--portal-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("TESSERA_SERVICE_KEY", KEY)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("server stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let (mut portal, mut api) = (None, None);
    while portal.is_none() || api.is_none() {
        let Some(Ok(line)) = lines.next() else { bail!("the server exited before listening") };
        if let Some(a) = line.strip_prefix("tessera: portal listening on ") {
            portal = Some(a.to_string());
        }
        if let Some(a) = line.strip_prefix("tessera: management API listening on ") {
            api = Some(a.to_string());
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Ok(Target { child, portal: portal.unwrap_or_default(), api: api.unwrap_or_default(), _dir: dir })
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos() as u64).unwrap_or(0)
}

/// user+system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, i.e. 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

async fn token(t: &Target, room: &str, user: &str) -> anyhow::Result<String> {
    let res = reqwest::Client::new()
        .post(format!("{}/v1/rooms/{room}/tokens", t.api))
        .bearer_auth(KEY)
        .json(&json!({"user": user, "role": "presenter"}))
        .send()
        .await?;
    Ok(res.text().await?)
}

async fn join(t: &Target, user: &str) -> anyhow::Result<Signaling> {
    let tok = token(t, "dev", user).await?;
    let mut sig = Signaling::connect(&t.portal).await?;
    sig.ok("login", Some(json!({"token": tok, "protocol": "1.2"}))).await?;
    Ok(sig)
}

/// Figures of one scenario run.
#[derive(Debug, Default)]
struct Figures {
    forwarded_pps: f64,
    mbps: f64,
    cpu_seconds: f64,
    rss_mb: f64,
    latency: Vec<f64>,
    loss_pct: f64,
    first_frame_ms: f64,
    mixer_fps: Option<f64>,
    subscribers: usize,
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    s[((s.len() - 1) as f64 * p).round() as usize]
}

/// Latency samples and loss from what subscribers received inside the window.
fn analyse(received: &[Vec<Received>], from_us: u64, to_us: u64) -> (usize, usize, Vec<f64>, f64) {
    let (mut packets, mut bytes, mut latency) = (0usize, 0usize, Vec::new());
    let (mut expected, mut got) = (0u64, 0u64);
    for log in received {
        let mut by_track: HashMap<(&str, u32), (u64, u64, u64)> = HashMap::new();
        for r in log.iter().filter(|r| r.arrived_us >= from_us && r.arrived_us <= to_us) {
            packets += 1;
            bytes += r.payload.len() + 12;
            if let Some(m) = Marker::find(&r.payload) {
                latency.push((r.arrived_us.saturating_sub(m.sent_us)) as f64 / 1000.0);
                let e = by_track.entry((r.kind, m.tag)).or_insert((u64::MAX, 0, 0));
                e.0 = e.0.min(m.index);
                e.1 = e.1.max(m.index);
                e.2 += 1;
            }
        }
        for (min, max, n) in by_track.values() {
            expected += max - min + 1;
            got += n;
        }
    }
    let loss = if expected == 0 { 0.0 } else { 100.0 * (expected.saturating_sub(got)) as f64 / expected as f64 };
    (packets, bytes, latency, loss)
}

/// CPU seconds used by the server and the window (µs since epoch) over `seconds` of traffic.
async fn measure(pid: u32, seconds: u64) -> (f64, u64, u64, f64) {
    let (cpu0, from) = (cpu_seconds(pid), tessera_client::peer::now_us());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (cpu1, to) = (cpu_seconds(pid), tessera_client::peer::now_us());
    (cpu1 - cpu0, from, to, rss_mb(pid))
}

/// Subscribes `user` to `stream` and returns it with its time to first video packet.
async fn subscribe_timed(t: &Target, user: &str, stream: &str) -> anyhow::Result<(Signaling, Subscriber, Option<f64>)> {
    let mut sig = join(t, user).await?;
    let started = Instant::now();
    let s = Subscriber::start(&mut sig, stream, true, true, false).await?;
    let first = s.wait_until("first video", Duration::from_secs(5), |r| r.iter().any(|p| p.kind == "video")).await.ok().map(|_| started.elapsed().as_secs_f64() * 1000.0);
    Ok((sig, s, first))
}

/// `publishers` synthetic publishers; each subscriber set subscribes to every publisher
/// but its own (`mesh`) or `fanout` subscribers per stream.
async fn sfu_scenario(t: &Target, publishers: usize, fanout: usize, mesh: bool, seconds: u64) -> anyhow::Result<Figures> {
    let mut pubs = Vec::new();
    for i in 0..publishers {
        let mut sig = join(t, &format!("pub{i}")).await?;
        let p = Publisher::start(&mut sig, PublishOptions { audio: true, video: true, data: false, tag: i as u32, h264: false }, None).await?;
        pubs.push((sig, Arc::new(p)));
    }
    let warm = seconds + 30;
    let senders: Vec<_> = pubs
        .iter()
        .map(|(_, p)| {
            let p = p.clone();
            tokio::spawn(async move { p.send_for(Duration::from_secs(warm), 30, 1000).await })
        })
        .collect();
    let mut subs = Vec::new();
    let mut first_frames = Vec::new();
    for (i, (_, p)) in pubs.iter().enumerate() {
        let count = if mesh { publishers - 1 } else { fanout };
        for j in 0..count {
            let (sig, s, first) = subscribe_timed(t, &format!("sub{i}-{j}"), &p.stream_id).await?;
            first_frames.extend(first);
            subs.push((sig, s));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cpu, from, to, rss) = measure(t.child.id(), seconds).await;
    for s in &senders {
        s.abort();
    }
    let logs: Vec<Vec<Received>> = subs.iter().map(|(_, s)| s.received.lock().map(|r| r.clone()).unwrap_or_default()).collect();
    let (packets, bytes, latency, loss) = analyse(&logs, from, to);
    let secs = (to - from) as f64 / 1e6;
    Ok(Figures {
        forwarded_pps: packets as f64 / secs,
        mbps: bytes as f64 * 8.0 / secs / 1e6,
        cpu_seconds: cpu,
        rss_mb: rss,
        latency,
        loss_pct: loss,
        first_frame_ms: percentile(&first_frames, 0.5),
        mixer_fps: None,
        subscribers: subs.len(),
    })
}

/// `inputs` real VP8/Opus publishers mixed into the room's view, `viewers` subscribers of the mix.
async fn mixer_scenario(t: &Target, inputs: usize, viewers: usize, seconds: u64) -> anyhow::Result<Figures> {
    let mut keep = Vec::new();
    for i in 0..inputs {
        let mut sig = join(t, &format!("cam{i}")).await?;
        let p = Arc::new(Publisher::start(&mut sig, PublishOptions { audio: true, video: true, data: false, tag: i as u32, h264: false }, None).await?);
        let colour = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)][i % 4];
        let src = live_source(p.clone(), colour, 300 + 100 * i as u32)?;
        keep.push((sig, p, src));
    }
    let mut subs = Vec::new();
    let mut first_frames = Vec::new();
    for j in 0..viewers {
        let (sig, s, first) = subscribe_timed(t, &format!("viewer{j}"), "dev-common").await?;
        first_frames.extend(first);
        subs.push((sig, s));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (cpu, from, to, rss) = measure(t.child.id(), seconds).await;
    let logs: Vec<Vec<Received>> = subs.iter().map(|(_, s)| s.received.lock().map(|r| r.clone()).unwrap_or_default()).collect();
    let secs = (to - from) as f64 / 1e6;
    // Output frame rate: distinct RTP timestamps of the mixed video seen by the first viewer.
    let frames: std::collections::HashSet<u32> = logs
        .first()
        .map(|l| l.iter().filter(|r| r.kind == "video" && r.arrived_us >= from && r.arrived_us <= to).map(|r| r.header.timestamp).collect())
        .unwrap_or_default();
    let (packets, bytes, _, _) = analyse(&logs, from, to);
    Ok(Figures {
        forwarded_pps: packets as f64 / secs,
        mbps: bytes as f64 * 8.0 / secs / 1e6,
        cpu_seconds: cpu,
        rss_mb: rss,
        latency: Vec::new(),
        loss_pct: 0.0,
        first_frame_ms: percentile(&first_frames, 0.5),
        mixer_fps: Some(frames.len() as f64 / secs),
        subscribers: subs.len(),
    })
}

fn row(scenario: &str, server: &str, f: &Figures, seconds: u64) -> Value {
    let mut v = json!({
        "scenario": scenario,
        "server": server,
        "subscribers": f.subscribers,
        "forwarded_pps": f.forwarded_pps.round(),
        "mbps": (f.mbps * 100.0).round() / 100.0,
        "cpu_seconds": (f.cpu_seconds * 100.0).round() / 100.0,
        "cpu_pct": (f.cpu_seconds / seconds as f64 * 1000.0).round() / 10.0,
        "rss_mb": f.rss_mb.round(),
        "latency_ms_p50": (percentile(&f.latency, 0.5) * 100.0).round() / 100.0,
        "latency_ms_p95": (percentile(&f.latency, 0.95) * 100.0).round() / 100.0,
        "latency_ms_p99": (percentile(&f.latency, 0.99) * 100.0).round() / 100.0,
        "loss_pct": (f.loss_pct * 100.0).round() / 100.0,
        "first_frame_ms": f.first_frame_ms.round(),
    });
    if let Some(fps) = f.mixer_fps {
        v["mixer_fps"] = json!((fps * 10.0).round() / 10.0);
        v["mixer_fps_configured"] = json!(24);
    }
    v
}

async fn run_scenario(name: &str, bin: &PathBuf, seconds: u64) -> anyhow::Result<Vec<Value>> {
    let mut rows = Vec::new();
    match name {
        "ramp" => {
            // Add subscribers to one publisher until loss passes 1 % or p99 passes 50 ms.
            let mut n = 10;
            let mut capacity = 0;
            while n <= 120 {
                let t = start_tessera(bin)?;
                let f = sfu_scenario(&t, 1, n, false, seconds.min(5)).await?;
                let ok = f.loss_pct <= 1.0 && percentile(&f.latency, 0.99) <= 50.0;
                let mut r = row("ramp", "tessera", &f, seconds.min(5));
                r["step_subscribers"] = json!(n);
                rows.push(r);
                if !ok {
                    break;
                }
                capacity = n;
                n += 20;
            }
            if let Some(last) = rows.last_mut() {
                last["capacity_subscribers"] = json!(capacity);
            }
        }
        _ => {
            let t = start_tessera(bin)?;
            let f = match name {
                "smoke" => sfu_scenario(&t, 1, 2, false, seconds.min(3)).await?,
                "one-to-one" => sfu_scenario(&t, 1, 1, false, seconds).await?,
                "fanout50" => sfu_scenario(&t, 1, 50, false, seconds).await?,
                "meeting10" => sfu_scenario(&t, 10, 0, true, seconds).await?,
                "mixer4" => mixer_scenario(&t, 4, 20, seconds).await?,
                other => bail!("unknown scenario `{other}` (smoke, one-to-one, fanout50, meeting10, mixer4, ramp, all)"),
            };
            let secs = if name == "smoke" { seconds.min(3) } else { seconds };
            rows.push(row(name, "tessera", &f, secs));
        }
    }
    Ok(rows)
}

fn print_table(rows: &[Value]) {
    println!("{:<12} {:<8} {:>5} {:>9} {:>7} {:>6} {:>7} {:>8} {:>8} {:>7} {:>9} {:>8}", "scenario", "server", "subs", "fwd pps", "Mbit/s", "CPU %", "RSS MB", "p50 ms", "p99 ms", "loss %", "1st frame", "mix fps");
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    for r in rows {
        let c = |k: &str| text(r.get(k).unwrap_or(&Value::Null));
        println!(
            "{:<12} {:<8} {:>5} {:>9} {:>7} {:>6} {:>7} {:>8} {:>8} {:>7} {:>9} {:>8}",
            c("scenario"),
            c("server"),
            c("subscribers"),
            c("forwarded_pps"),
            c("mbps"),
            c("cpu_pct"),
            c("rss_mb"),
            c("latency_ms_p50"),
            c("latency_ms_p99"),
            c("loss_pct"),
            c("first_frame_ms"),
            c("mixer_fps"),
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.against != "none" {
        bail!("--against {}: only `none` is available yet; the Janus adapter is not written (issue 10)", args.against);
    }
    let bin = match &args.tessera_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.parent().context("exe dir")?.join("tessera"),
    };
    let names: Vec<&str> = if args.scenario == "all" {
        vec!["one-to-one", "fanout50", "meeting10", "mixer4", "ramp"]
    } else {
        vec![args.scenario.as_str()]
    };
    let mut rows = Vec::new();
    for name in names {
        // Every scenario is bounded: a stuck one cannot hold the run.
        let r = tokio::time::timeout(Duration::from_secs(args.seconds * 12 + 120), run_scenario(name, &bin, args.seconds))
            .await
            .map_err(|_| anyhow::anyhow!("scenario {name} timed out"))??;
        rows.extend(r);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    Ok(())
}
