//! The soak scenario: Tessera under a steady meeting for a long time, with people coming
//! and going, watching what the server process keeps.
//!
//! - A core meeting of N participants (10 by default, like meeting10): each logs in once,
//!   publishes synthetic VP8 + Opus and subscribes to the N − 1 others (one transport per
//!   publication and subscription, as OWT clients do). It stays for the whole run; loss,
//!   order and latency are measured on it over the whole run, the way the other scenarios
//!   count them (every subscriber × every packet its publisher sent).
//! - The room's mixed view: two cameras with real VP8/Opus (GStreamer, in the bench) are
//!   mixed into `{room}-common` (the synthetic streams are not decodable media, so the room
//!   is created with `autoMix: false` and only the cameras are added to the view); the first
//!   core participant subscribes to the mix, and a recording of it is started over REST and
//!   stopped with DELETE at the end.
//! - Churn: every 5 s one extra participant logs in, subscribes to two core streams (every
//!   third one to the mix too; every second one publishes a synthetic stream as well) and
//!   leaves 10–20 s later, by `logout` (even ones) or by closing its socket (odd ones).
//! - Every ~10 s (every `seconds / 30` s, at least 2, in short runs) the server process is
//!   sampled: RSS, open file descriptors and threads from /proc, and `GET /v1/stats`.
//!
//! Checks: RSS after warm-up (20 % of the run or 60 s, whichever is smaller) grows by less
//! than 5 % (mean of the last 20 % of the samples against the sample at the end of
//! warm-up); once everyone has left and the recording is stopped, fds and threads come
//! back to the baseline taken before the first login (within a small tolerance, waiting up
//! to [`SETTLE_MAX`] for them) and the portal counts no participant or transport; loss on
//! the core meeting is at most `--max-loss-pct` (0 by default); every extra joined and got
//! media; the recording ended `stopped` with bytes in it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::Method;
use serde_json::{Value, json};
use tessera_client::media::{LiveFormat, LiveSource, live_source_with};
use tessera_client::peer::{Marker, PublishOptions, Publisher, Received, Subscriber};
use tessera_client::signaling::Signaling;
use tokio::sync::watch;

use crate::scenario::Load;
use crate::server::tessera::Tessera;
use crate::server::{Server, cpu_seconds, open_fds, rss_mb, threads};

/// What a soak run does and accepts.
#[derive(Debug, Clone, Copy)]
pub struct Soak {
    /// Length of the measured run (the setup before it is not counted).
    pub seconds: u64,
    /// Participants of the core meeting.
    pub participants: usize,
    /// Largest loss on the core meeting, in percent, that still passes.
    pub max_loss_pct: f64,
    /// What each synthetic publisher sends.
    pub load: Load,
}

/// File descriptors tolerated above the baseline once everyone has left (things opened
/// once, lazily).
pub const FD_TOLERANCE: usize = 2;
/// Threads tolerated above the baseline once everyone has left.
pub const THREAD_TOLERANCE: usize = 2;
/// Largest RSS growth after warm-up, in percent.
pub const RSS_GROWTH_MAX_PCT: f64 = 5.0;
/// `[portal]` settings of the soak's server: a participant whose socket closed without a
/// logout keeps its place for 5 s instead of 60, so those who leave that way near the end
/// are gone before the after-check (the grace itself is exercised all along the run).
pub const PORTAL_SETTINGS: &str = "reconnection_timeout_secs = 5\n";
/// How long fds and threads may take to come back after everyone has left.
pub const SETTLE_MAX: Duration = Duration::from_secs(10);
/// One extra participant joins this often.
const CHURN_EVERY: Duration = Duration::from_secs(5);
/// The churn starts with the core meeting's setup and runs at least this long before the
/// measured run starts, so the run begins in its steady state (extras stay 10–20 s).
const CHURN_WARMUP: Duration = Duration::from_secs(15);
/// Real cameras mixed into the view.
const CAMERAS: usize = 2;

/// The process figures of one sample.
#[derive(Debug, Clone, Copy, Default)]
struct Proc {
    rss_mb: f64,
    fds: usize,
    threads: usize,
    cpu_s: f64,
    /// Seconds the process's threads waited for a CPU while runnable (schedstat).
    wait_s: f64,
    /// The whole machine's busy and total CPU time (jiffies, /proc/stat).
    host: (u64, u64),
}

impl Proc {
    fn of(pid: u32) -> Proc {
        Proc {
            rss_mb: rss_mb(pid),
            fds: open_fds(pid),
            threads: threads(pid),
            cpu_s: cpu_seconds(pid),
            wait_s: run_delay_s(pid),
            host: host_jiffies(),
        }
    }

    /// Since `before`: the process's run-queue wait in % of one CPU (how much CPU it
    /// wanted and did not get: the machine is shared), and the machine's busy %.
    fn contention(&self, before: &Proc, dt: f64) -> (f64, f64) {
        let wait = (self.wait_s - before.wait_s).max(0.0) / dt * 100.0;
        let (busy, total) = (self.host.0.saturating_sub(before.host.0), self.host.1.saturating_sub(before.host.1));
        (wait, if total > 0 { busy as f64 * 100.0 / total as f64 } else { 0.0 })
    }
}

/// Time a process's threads spent runnable but waiting for a CPU (sum over its current
/// threads of the second field of /proc/<pid>/task/<tid>/schedstat, ns).
fn run_delay_s(pid: u32) -> f64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
    let ns: u64 = dir
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ns as f64 / 1e9
}

/// The machine's (busy, total) CPU jiffies from the first line of /proc/stat.
fn host_jiffies() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return (0, 0) };
    let f: Vec<u64> = stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let total: u64 = f.iter().take(8).sum();
    // idle and iowait are fields 4 and 5.
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// Names of a process's threads (`comm` of each task).
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok()).map(|n| n.trim().to_string()).collect()
}

/// What a process's descriptors point at (`socket`, `anon_inode:[eventfd]`, a path...).
fn fd_targets(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|t| {
            let t = t.to_string_lossy().to_string();
            // socket:[inode], pipe:[inode]: the kind is what tells.
            match t.split_once(":[") {
                Some((kind, _)) if kind == "socket" || kind == "pipe" => kind.to_string(),
                _ => t,
            }
        })
        .collect()
}

/// What `now` has more of than `base` (multiset difference), sorted.
fn more_than(base: &[String], now: &[String]) -> Vec<String> {
    let mut left = base.to_vec();
    let mut extra = Vec::new();
    for x in now {
        match left.iter().position(|b| b == x) {
            Some(i) => {
                left.swap_remove(i);
            }
            None => extra.push(x.clone()),
        }
    }
    extra.sort();
    extra
}

/// Latencies in 0.1 ms buckets up to 5 s (the last bucket holds everything above).
struct Histogram {
    buckets: Vec<u32>,
    count: u64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram { buckets: vec![0; 50_001], count: 0 }
    }

    fn add(&mut self, ms: f64) {
        let i = ((ms.max(0.0) * 10.0) as usize).min(self.buckets.len() - 1);
        self.buckets[i] += 1;
        self.count += 1;
    }

    /// Value at quantile `p` (bucket middle), 0 when empty.
    fn quantile(&self, p: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let target = ((self.count - 1) as f64 * p).round() as u64 + 1;
        let mut seen = 0u64;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += u64::from(*n);
            if seen >= target {
                return (i as f64 + 0.5) / 10.0;
            }
        }
        (self.buckets.len() as f64 - 0.5) / 10.0
    }

    fn clear(&mut self) {
        self.buckets.iter_mut().for_each(|b| *b = 0);
        self.count = 0;
    }
}

/// Marker indices of one track received since the start of the run, as a bitmap.
#[derive(Default)]
struct Track {
    start: u64,
    seen: Vec<u64>,
    highest: Option<u64>,
}

impl Track {
    /// Marks `index` received; true the first time.
    fn mark(&mut self, index: u64) -> bool {
        let Some(off) = index.checked_sub(self.start) else { return false };
        // A corrupt index must not allocate the world: 10 M packets is hours of video.
        if off > 10_000_000 {
            return false;
        }
        let (word, bit) = ((off / 64) as usize, off % 64);
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        let had = self.seen[word] & (1 << bit) != 0;
        self.seen[word] |= 1 << bit;
        !had
    }

    /// Distinct indices received in `[start, start + n)`.
    fn received_below(&self, n: u64) -> u64 {
        let (full, rest) = ((n / 64) as usize, n % 64);
        let mut c: u64 = self.seen.iter().take(full).map(|w| u64::from(w.count_ones())).sum();
        if rest > 0
            && let Some(w) = self.seen.get(full)
        {
            c += u64::from((w & ((1u64 << rest) - 1)).count_ones());
        }
        c
    }
}

/// One core subscription and what it received during the run.
struct Tally {
    /// Publisher (index = marker tag) it subscribes to.
    tag: u32,
    sub: Subscriber,
    video: Track,
    audio: Track,
    packets: u64,
    bytes: u64,
    marked: u64,
    late: u64,
}

/// Takes what a subscription received so far (a long run must not keep every packet).
fn take(sub: &Subscriber) -> Vec<Received> {
    sub.received.lock().map(|mut r| std::mem::take(&mut *r)).unwrap_or_default()
}

impl Tally {
    fn absorb(&mut self, batch: Vec<Received>, now: &mut Histogram, all: &mut Histogram) {
        for r in batch {
            self.packets += 1;
            self.bytes += r.payload.len() as u64 + 12;
            // The marker follows the codec header (at most 7 bytes): no need to scan the
            // whole payload (it matters in debug builds).
            let Some(m) = Marker::find(&r.payload[..r.payload.len().min(Marker::LEN + 16)]) else { continue };
            if m.tag != self.tag {
                continue;
            }
            self.marked += 1;
            let track = if r.kind == "video" { &mut self.video } else { &mut self.audio };
            match track.highest {
                Some(h) if m.index < h => self.late += 1,
                Some(h) if m.index == h => {}
                _ => track.highest = Some(m.index),
            }
            if track.mark(m.index) {
                let ms = r.arrived_us.saturating_sub(m.sent_us) as f64 / 1000.0;
                now.add(ms);
                all.add(ms);
            }
        }
    }
}

/// The mixed stream as one viewer sees it: video frames (RTP timestamp changes).
struct MixView {
    sub: Subscriber,
    last_ts: Option<u32>,
    frames: u64,
    frames_since_sample: u64,
}

impl MixView {
    fn absorb(&mut self, batch: Vec<Received>) {
        for r in batch.iter().filter(|r| r.kind == "video") {
            if self.last_ts != Some(r.header.timestamp) {
                self.last_ts = Some(r.header.timestamp);
                self.frames += 1;
                self.frames_since_sample += 1;
            }
        }
    }
}

/// Aborts its tasks when dropped, however the run ends.
#[derive(Default)]
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn spawn_sender(p: &Arc<Publisher>, load: Load) -> tokio::task::JoinHandle<()> {
    let p = p.clone();
    tokio::spawn(async move {
        let _ = p.send_for(Duration::from_secs(24 * 3600), load.fps, load.frame_bytes()).await;
    })
}

fn round(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}

async fn stats(t: &Tessera) -> Value {
    t.api(Method::GET, "/v1/stats", None).await.unwrap_or(Value::Null)
}

fn count(stats: &Value, key: &str) -> u64 {
    stats.get(key).and_then(Value::as_u64).or_else(|| stats["media"].get(key).and_then(Value::as_u64)).unwrap_or(0)
}

fn snapshot(p: &Proc, stats: &Value) -> Value {
    json!({
        "rss_mb": round(p.rss_mb, 1),
        "fds": p.fds,
        "threads": p.threads,
        "participants": count(stats, "participants"),
        "rooms": count(stats, "rooms"),
        "streams": count(stats, "streams"),
        "sockets": count(stats, "sockets"),
        "transports": count(stats, "transports"),
        "subscriptions": count(stats, "subscriptions"),
    })
}

/// One churn participant: joins, subscribes (and maybe publishes), checks media flows,
/// stays `stay` (or until `stop`), leaves. `present` counts those logged in.
struct Extra {
    k: usize,
    room: String,
    streams: Vec<String>,
    mixed: String,
    stay: Duration,
    load: Load,
}

impl Extra {
    async fn run(self, t: Arc<Tessera>, present: Arc<AtomicUsize>, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let k = self.k;
        let mut sig = t.join_room(&self.room, &format!("extra{k}")).await.with_context(|| format!("extra{k} login"))?;
        present.fetch_add(1, Ordering::Relaxed);
        let mut tasks = Tasks::default();
        let mut subs = Vec::new();
        let mut publisher = None;
        let setup = async {
            let n = self.streams.len();
            let a = k % n;
            let mut b = (k + 1 + k / n) % n;
            if b == a {
                b = (a + 1) % n;
            }
            let mut wanted = vec![self.streams[a].clone(), self.streams[b].clone()];
            if k.is_multiple_of(3) {
                wanted.push(self.mixed.clone());
            }
            for stream in &wanted {
                let s = Subscriber::start_on(&mut sig, t.connection().await?, stream, true, true, false)
                    .await
                    .with_context(|| format!("extra{k} subscribing to {stream}"))?;
                subs.push((stream.clone(), s));
            }
            if k % 2 == 1 {
                let opts = PublishOptions { audio: true, video: true, data: false, tag: 10_000 + k as u32, h264: false };
                let p = Publisher::start(&mut sig, opts, Some(t.connection().await?)).await.with_context(|| format!("extra{k} publishing"))?;
                p.keep_sent.store(false, Ordering::Relaxed);
                let p = Arc::new(p);
                tasks.0.push(spawn_sender(&p, self.load));
                publisher = Some(p);
            }
            for (stream, s) in &subs {
                s.wait_until("first video", Duration::from_secs(8), |r| r.iter().any(|p| p.kind == "video"))
                    .await
                    .with_context(|| format!("extra{k}: no video of {stream}"))?;
            }
            // Keep nothing while staying: only the first frame was of interest.
            for (_, s) in &subs {
                take(s);
            }
            anyhow::Ok(())
        };
        // Setting up is bounded, and the end of the run interrupts it (not a failure: it
        // only means the joins are slow, which the curve shows).
        let result = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(40), setup) => r.unwrap_or_else(|_| Err(anyhow::anyhow!("extra{k}: joining took over 40 s"))),
            _ = stop.changed() => Ok(()),
        };
        if result.is_ok() && !*stop.borrow() {
            tokio::select! {
                _ = tokio::time::sleep(self.stay) => {}
                _ = stop.changed() => {}
            }
        }
        drop(tasks);
        // Leave either way: half by logout, half by just closing the socket.
        if k.is_multiple_of(2) {
            let _ = sig.ok("logout", None).await;
        }
        sig.close().await;
        for (_, s) in &subs {
            s.conn.close().await;
        }
        if let Some(p) = &publisher {
            p.conn.close().await;
        }
        present.fetch_sub(1, Ordering::Relaxed);
        result
    }
}

/// The soak run on a fresh Tessera; returns its row (figures, curve, checks).
pub async fn soak(t: Arc<Tessera>, o: Soak) -> anyhow::Result<Value> {
    let pid = t.pid();
    let n = o.participants;
    let room = t.create_room("soak", json!({"autoMix": false})).await?;
    let mixed = format!("{room}-common");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = Proc::of(pid);
    let (base_threads, base_fds) = (thread_names(pid), fd_targets(pid));
    let base_stats = stats(&t).await;
    eprintln!(
        "tessera-bench: soak baseline: rss {:.1} MB, {} fds, {} threads; {} core participants, {} s",
        base.rss_mb, base.fds, base.threads, n, o.seconds
    );

    // The core meeting: everyone publishes, then everyone subscribes to everyone else.
    let setup_started = Instant::now();
    let mut sigs = Vec::new();
    let mut pubs = Vec::new();
    let mut senders = Tasks::default();
    for i in 0..n {
        let mut sig = t.join_room(&room, &format!("p{i}")).await.with_context(|| format!("p{i} login"))?;
        let opts = PublishOptions { audio: true, video: true, data: false, tag: i as u32, h264: false };
        let p = Publisher::start(&mut sig, opts, Some(t.connection().await?)).await.with_context(|| format!("p{i} publishing"))?;
        p.keep_sent.store(false, Ordering::Relaxed);
        let p = Arc::new(p);
        senders.0.push(spawn_sender(&p, o.load));
        sigs.push(sig);
        pubs.push(p);
    }

    // The churn, from now on: one extra every CHURN_EVERY while `joining`.
    let present = Arc::new(AtomicUsize::new(0));
    let joining = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (stop_tx, stop_rx) = watch::channel(false);
    let churn_started = Instant::now();
    let spawner = {
        let (t, present, joining, mut stop) = (t.clone(), present.clone(), joining.clone(), stop_rx.clone());
        let streams: Vec<String> = pubs.iter().map(|p| p.stream_id.clone()).collect();
        let (room, mixed, load) = (room.clone(), mixed.clone(), o.load);
        tokio::spawn(async move {
            let mut extras = Vec::new();
            while joining.load(Ordering::Relaxed) {
                let k = extras.len();
                let stay = Duration::from_secs(10 + (k as u64 * 7919) % 11);
                let extra = Extra { k, room: room.clone(), streams: streams.clone(), mixed: mixed.clone(), stay, load };
                extras.push(tokio::spawn(extra.run(t.clone(), present.clone(), stop.clone())));
                tokio::select! {
                    _ = tokio::time::sleep(CHURN_EVERY) => {}
                    _ = stop.changed() => break,
                }
            }
            extras
        })
    };
    // However the run ends, no extra keeps joining.
    struct StopChurn(watch::Sender<bool>);
    impl Drop for StopChurn {
        fn drop(&mut self) {
            let _ = self.0.send(true);
        }
    }
    let stop_churn = StopChurn(stop_tx);

    let mut tallies = Vec::new();
    let mut first_frames = Vec::new();
    for (i, sig) in sigs.iter_mut().enumerate() {
        for (j, p) in pubs.iter().enumerate().filter(|(j, _)| *j != i) {
            let started = Instant::now();
            let sub = Subscriber::start_on(sig, t.connection().await?, &p.stream_id, true, true, false)
                .await
                .with_context(|| format!("p{i} subscribing to p{j}"))?;
            sub.wait_until("first video", Duration::from_secs(5), |r| r.iter().any(|p| p.kind == "video"))
                .await
                .with_context(|| format!("p{i}: no video from p{j}"))?;
            first_frames.push(started.elapsed().as_secs_f64() * 1000.0);
            tallies.push(Tally { tag: j as u32, sub, video: Track::default(), audio: Track::default(), packets: 0, bytes: 0, marked: 0, late: 0 });
        }
    }

    // The cameras, mixed into the view; the first participant watches the mix; the mix is
    // recorded.
    let mut cameras: Vec<(Signaling, Arc<Publisher>, LiveSource)> = Vec::new();
    for c in 0..CAMERAS {
        let mut sig = t.join_room(&room, &format!("cam{c}")).await?;
        let opts = PublishOptions { audio: true, video: true, data: false, tag: 1000 + c as u32, h264: false };
        let p = Arc::new(Publisher::start(&mut sig, opts, Some(t.connection().await?)).await.with_context(|| format!("cam{c} publishing"))?);
        p.keep_sent.store(false, Ordering::Relaxed);
        let colour = [(200, 30, 30), (30, 30, 200)][c % 2];
        let src = live_source_with(p.clone(), colour, 300 + 100 * c as u32, LiveFormat::default())?;
        let ops = json!([{"op": "add", "path": "/info/inViews", "value": "common"}]);
        t.api(Method::PATCH, &format!("/v1/rooms/{room}/streams/{}", p.stream_id), Some(&ops)).await.context("mixing a camera")?;
        cameras.push((sig, p, src));
    }
    let started = Instant::now();
    let mix_sub = Subscriber::start_on(&mut sigs[0], t.connection().await?, &mixed, true, true, false).await.context("subscribing to the mix")?;
    mix_sub.wait_until("first mixed video", Duration::from_secs(10), |r| r.iter().any(|p| p.kind == "video")).await?;
    let first_mixed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut mix = MixView { sub: mix_sub, last_ts: None, frames: 0, frames_since_sample: 0 };
    let body = json!({"media": {"audio": {"from": mixed}, "video": {"from": mixed}}});
    let recording = t.api(Method::POST, &format!("/v1/rooms/{room}/recordings"), Some(&body)).await.context("starting the recording")?;
    let recording_id = recording["id"].as_str().context("recording without an id")?.to_string();
    tokio::time::sleep(Duration::from_millis(1500).max(CHURN_WARMUP.saturating_sub(churn_started.elapsed()))).await;
    let setup_s = setup_started.elapsed().as_secs_f64();

    // The run.
    for tally in &tallies {
        take(&tally.sub);
    }
    take(&mix.sub);
    let starts: Vec<(u64, u64)> = pubs.iter().map(|p| p.sent_counts()).collect();
    for tally in &mut tallies {
        let (v, a) = starts[tally.tag as usize];
        tally.video.start = v;
        tally.audio.start = a;
    }
    let t0 = Instant::now();
    let proc0 = Proc::of(pid);
    let interval = Duration::from_secs((o.seconds / 30).clamp(2, 10));
    let warmup_s = (o.seconds as f64 * 0.2).min(60.0);
    let mut hist_now = Histogram::new();
    let mut hist_all = Histogram::new();
    let mut curve: Vec<Value> = Vec::new();
    let mut prev = (0.0f64, proc0);
    let mut next_sample = Duration::ZERO;
    let run = Duration::from_secs(o.seconds);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let elapsed = t0.elapsed();
        for tally in &mut tallies {
            let batch = take(&tally.sub);
            tally.absorb(batch, &mut hist_now, &mut hist_all);
        }
        mix.absorb(take(&mix.sub));
        for sig in sigs.iter_mut().chain(cameras.iter_mut().map(|(s, _, _)| s)) {
            sig.drain();
            sig.backlog.clear();
        }
        // Extras join until 5 s before the end.
        if elapsed + CHURN_EVERY > run {
            joining.store(false, Ordering::Relaxed);
        }
        let last = elapsed >= run;
        if elapsed >= next_sample || last {
            let secs = elapsed.as_secs_f64();
            let p = Proc::of(pid);
            let s = stats(&t).await;
            let dt = secs - prev.0;
            let cpu_pct = if dt >= 0.5 { Some(round((p.cpu_s - prev.1.cpu_s) / dt * 100.0, 1)) } else { None };
            let (wait_pct, host_pct) = if dt >= 0.5 { p.contention(&prev.1, dt) } else { (0.0, 0.0) };
            let mix_fps = if dt >= 0.5 { Some(round(mix.frames_since_sample as f64 / dt, 1)) } else { None };
            let mut row = snapshot(&p, &s);
            row["t_s"] = json!(secs.round());
            row["cpu_pct"] = json!(cpu_pct);
            row["wait_pct"] = json!(round(wait_pct, 1));
            row["host_busy_pct"] = json!(round(host_pct, 1));
            row["latency_ms_p99"] = json!(round(hist_now.quantile(0.99), 2));
            row["mix_fps"] = json!(mix_fps);
            row["extras"] = json!(present.load(Ordering::Relaxed));
            eprintln!(
                "tessera-bench: soak t={:>5.0} s  rss {:>6.1} MB  fds {:>4}  threads {:>3}  participants {:>3}  extras {}  cpu {:>5} % (waited {:.0} %, host {:.0} %)  p99 {:>6.2} ms  mix {} fps",
                secs,
                p.rss_mb,
                p.fds,
                p.threads,
                row["participants"],
                row["extras"],
                cpu_pct.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                wait_pct,
                host_pct,
                hist_now.quantile(0.99),
                mix_fps.map(|f| f.to_string()).unwrap_or_else(|| "-".into()),
            );
            curve.push(row);
            hist_now.clear();
            mix.frames_since_sample = 0;
            prev = (secs, p);
            while next_sample <= elapsed {
                next_sample += interval;
            }
        }
        if last {
            break;
        }
    }
    let window_s = t0.elapsed().as_secs_f64();
    let proc_end = Proc::of(pid);
    let ends: Vec<(u64, u64)> = pubs.iter().map(|p| p.sent_counts()).collect();
    // Packets sent at the very end are still on their way.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for tally in &mut tallies {
        let batch = take(&tally.sub);
        tally.absorb(batch, &mut hist_now, &mut hist_all);
    }
    let (mut expected, mut got) = (0u64, 0u64);
    for tally in &tallies {
        let (v, a) = ends[tally.tag as usize];
        let (nv, na) = (v.saturating_sub(tally.video.start), a.saturating_sub(tally.audio.start));
        expected += nv + na;
        got += tally.video.received_below(nv) + tally.audio.received_below(na);
    }
    let loss_pct = if expected == 0 { 100.0 } else { 100.0 * expected.saturating_sub(got) as f64 / expected as f64 };
    let packets: u64 = tallies.iter().map(|t| t.packets).sum();
    let bytes: u64 = tallies.iter().map(|t| t.bytes).sum();
    let marked: u64 = tallies.iter().map(|t| t.marked).sum();
    let late: u64 = tallies.iter().map(|t| t.late).sum();

    // Everyone leaves: the extras first, then the recording stops, then the cameras and
    // the core meeting.
    joining.store(false, Ordering::Relaxed);
    drop(stop_churn);
    let extras = spawner.await.unwrap_or_default();
    let mut extra_errors = Vec::new();
    let extras_total = extras.len();
    for (k, h) in extras.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(30), h).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => extra_errors.push(format!("{e:#}")),
            Ok(Err(e)) => extra_errors.push(format!("extra{k}: {e}")),
            Err(_) => extra_errors.push(format!("extra{k}: did not leave within 30 s")),
        }
    }
    let stopped = t.api(Method::DELETE, &format!("/v1/rooms/{room}/recordings/{recording_id}"), None).await;
    let (rec_state, rec_size, rec_duration, rec_error) = match &stopped {
        Ok(r) => (r["state"].as_str().unwrap_or("?").to_string(), r["size"].as_u64().unwrap_or(0), r["duration"].as_f64().unwrap_or(0.0), None),
        Err(e) => ("?".to_string(), 0, 0.0, Some(format!("{e:#}"))),
    };
    drop(senders);
    for (mut sig, p, src) in cameras {
        drop(src);
        let _ = sig.ok("logout", None).await;
        sig.close().await;
        p.conn.close().await;
    }
    mix.sub.conn.close().await;
    for tally in &tallies {
        tally.sub.conn.close().await;
    }
    for (mut sig, p) in sigs.into_iter().zip(&pubs) {
        let _ = sig.ok("logout", None).await;
        sig.close().await;
        p.conn.close().await;
    }
    drop(tallies);
    drop(pubs);

    // Fds and threads must come back.
    let left = Instant::now();
    let (base_participants, base_transports) = (count(&base_stats, "participants"), count(&base_stats, "transports"));
    let mut settling = Vec::new();
    let (after, after_stats) = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let p = Proc::of(pid);
        let s = stats(&t).await;
        settling.push(json!([round(left.elapsed().as_secs_f64(), 1), p.fds, p.threads, count(&s, "participants"), count(&s, "transports")]));
        let back = p.fds <= base.fds + FD_TOLERANCE
            && p.threads <= base.threads + THREAD_TOLERANCE
            && count(&s, "participants") == base_participants
            && count(&s, "transports") == base_transports;
        if back || left.elapsed() >= SETTLE_MAX {
            break (p, s);
        }
    };
    let settle_s = left.elapsed().as_secs_f64();
    eprintln!(
        "tessera-bench: soak after everyone left ({settle_s:.1} s): rss {:.1} MB, {} fds (baseline {}), {} threads (baseline {})",
        after.rss_mb, after.fds, base.fds, after.threads, base.threads
    );

    // Checks.
    let rss_at = |v: &Value| v["rss_mb"].as_f64().unwrap_or(0.0);
    let warm = curve.iter().find(|r| r["t_s"].as_f64().unwrap_or(0.0) >= warmup_s.round()).or(curve.last()).map(rss_at).unwrap_or(0.0);
    let tail_from = o.seconds as f64 * 0.8;
    let tail: Vec<f64> = curve.iter().filter(|r| r["t_s"].as_f64().unwrap_or(0.0) >= tail_from).map(rss_at).collect();
    let tail_mean = if tail.is_empty() { curve.last().map(rss_at).unwrap_or(0.0) } else { tail.iter().sum::<f64>() / tail.len() as f64 };
    let growth_pct = if warm > 0.0 { (tail_mean - warm) / warm * 100.0 } else { 0.0 };
    let mut failures = Vec::new();
    let rss_ok = growth_pct < RSS_GROWTH_MAX_PCT;
    if !rss_ok {
        failures.push(format!(
            "RSS grew {growth_pct:.1} % after warm-up ({warm:.1} MB at {warmup_s:.0} s, {tail_mean:.1} MB mean of the last 20 %), limit {RSS_GROWTH_MAX_PCT} %"
        ));
    }
    let fds_ok = after.fds <= base.fds + FD_TOLERANCE;
    if !fds_ok {
        failures.push(format!("{} fds {settle_s:.0} s after everyone left, baseline {} (+{FD_TOLERANCE} tolerated)", after.fds, base.fds));
    }
    let threads_ok = after.threads <= base.threads + THREAD_TOLERANCE;
    if !threads_ok {
        failures.push(format!(
            "{} threads {settle_s:.0} s after everyone left, baseline {} (+{THREAD_TOLERANCE} tolerated)",
            after.threads, base.threads
        ));
    }
    let (after_participants, after_transports) = (count(&after_stats, "participants"), count(&after_stats, "transports"));
    let portal_ok = after_participants == base_participants && after_transports == base_transports;
    if !portal_ok {
        failures.push(format!(
            "after everyone left the portal still counts {after_participants} participants and {after_transports} transports (baseline {base_participants} and {base_transports}): {after_stats}"
        ));
    }
    let loss_ok = loss_pct <= o.max_loss_pct;
    if !loss_ok {
        failures.push(format!("loss on the core meeting {loss_pct:.3} % (limit {} %)", o.max_loss_pct));
    }
    let churn_ok = extra_errors.is_empty() && extras_total > 0;
    if !churn_ok {
        failures.push(format!("{} of {extras_total} extra participants failed: {}", extra_errors.len(), extra_errors.join("; ")));
    }
    let recording_ok = rec_state == "stopped" && rec_size > 0;
    if !recording_ok {
        failures
            .push(format!("recording of the mix ended {rec_state} with {rec_size} bytes{}", rec_error.map(|e| format!(": {e}")).unwrap_or_default()));
    }

    let cpu = proc_end.cpu_s - proc0.cpu_s;
    let mut after_row = snapshot(&after, &after_stats);
    after_row["settle_s"] = json!(round(settle_s, 1));
    // [s after everyone left, fds, threads, participants, transports] until they were back.
    after_row["settling"] = json!(settling);
    // What is left over, by name: threads by their names, fds by what they point at.
    after_row["new_threads"] = json!(more_than(&base_threads, &thread_names(pid)));
    after_row["new_fds"] = json!(more_than(&base_fds, &fd_targets(pid)));
    let mut first = first_frames.clone();
    first.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let first_frame_ms = first.get(first.len() / 2).copied().unwrap_or(0.0);
    let checks = json!({
    "rss_growth": {"passed": rss_ok, "value_pct": round(growth_pct, 2), "limit_pct": RSS_GROWTH_MAX_PCT},
    "fds_back": {"passed": fds_ok, "baseline": base.fds, "after": after.fds, "tolerance": FD_TOLERANCE},
    "threads_back": {"passed": threads_ok, "baseline": base.threads, "after": after.threads, "tolerance": THREAD_TOLERANCE},
    "portal_back": {"passed": portal_ok, "participants": after_participants, "transports": after_transports},
    "loss": {"passed": loss_ok, "value_pct": round(loss_pct, 3), "limit_pct": o.max_loss_pct},
    "churn": {"passed": churn_ok, "extras": extras_total, "failed": extra_errors.len(), "errors": extra_errors},
    "recording": {"passed": recording_ok},
    });
    let mut row = json!({
        "scenario": "soak",
        "server": "tessera",
        "seconds": o.seconds,
        "setup_s": round(setup_s, 1),
        "participants": n,
        "subscribers": n * (n - 1),
        "cameras": CAMERAS,
        "extras": extras_total,
        "forwarded_pps": (packets as f64 / window_s).round(),
        "mbps": round(bytes as f64 * 8.0 / window_s / 1e6, 2),
        "cpu_seconds": round(cpu, 2),
        "cpu_pct": round(cpu / window_s * 100.0, 1),
        "cpu_us_per_packet": if packets > 0 { round(cpu * 1e6 / packets as f64, 2) } else { 0.0 },
        "rss_mb": proc_end.rss_mb.round(),
        "latency_ms_p50": round(hist_all.quantile(0.5), 2),
        "latency_ms_p95": round(hist_all.quantile(0.95), 2),
        "latency_ms_p99": round(hist_all.quantile(0.99), 2),
        "loss_pct": round(loss_pct, 3),
        "out_of_order_pct": if marked > 0 { round(100.0 * late as f64 / marked as f64, 3) } else { 0.0 },
        "first_frame_ms": first_frame_ms.round(),
        "first_mixed_frame_ms": first_mixed_ms.round(),
        "mixer_fps": round(mix.frames as f64 / window_s, 1),
        "video_kbps": o.load.video_kbps,
        "video_fps": o.load.fps,
        "sample_every_s": interval.as_secs(),
        "warmup_s": round(warmup_s, 1),
        "rss_mb_warmup": round(warm, 1),
        "rss_mb_tail_mean": round(tail_mean, 1),
        "rss_growth_pct": round(growth_pct, 2),
        "recording": {"id": recording_id, "state": rec_state, "size": rec_size, "duration": rec_duration},
        "baseline": snapshot(&base, &base_stats),
        "after": after_row,
        "curve": curve,
    });
    row["checks"] = checks;
    row["passed"] = json!(failures.is_empty());
    row["failures"] = json!(failures);
    Ok(row)
}

/// Prints a soak row's curve and checks.
pub fn print(r: &Value) {
    println!();
    println!(
        "soak: {} core participants ({} subscriptions), {} cameras mixed, {} extras over {} s; setup {} s",
        r["participants"], r["subscribers"], r["cameras"], r["extras"], r["seconds"], r["setup_s"]
    );
    println!(
        "{:>6} {:>7} {:>5} {:>7} {:>6} {:>7} {:>7} {:>7} {:>6} {:>7} {:>7} {:>7} {:>7}",
        "t s", "RSS MB", "fds", "threads", "parts", "streams", "sockets", "extras", "CPU %", "wait %", "host %", "p99 ms", "mix fps"
    );
    let c = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut lines: Vec<(String, &Value)> = vec![("base".into(), &r["baseline"])];
    if let Some(curve) = r["curve"].as_array() {
        lines.extend(curve.iter().map(|s| (c(&s["t_s"]), s)));
    }
    lines.push(("after".into(), &r["after"]));
    for (label, s) in lines {
        println!(
            "{:>6} {:>7} {:>5} {:>7} {:>6} {:>7} {:>7} {:>7} {:>6} {:>7} {:>7} {:>7} {:>7}",
            label,
            c(&s["rss_mb"]),
            c(&s["fds"]),
            c(&s["threads"]),
            c(&s["participants"]),
            c(&s["streams"]),
            c(&s["sockets"]),
            c(&s["extras"]),
            c(&s["cpu_pct"]),
            c(&s["wait_pct"]),
            c(&s["host_busy_pct"]),
            c(&s["latency_ms_p99"]),
            c(&s["mix_fps"]),
        );
    }
    println!(
        "RSS {} MB at the end of warm-up ({} s), {} MB mean of the last 20 %: {} %; loss {} %; recording {} ({} bytes, {} s)",
        r["rss_mb_warmup"],
        r["warmup_s"],
        r["rss_mb_tail_mean"],
        r["rss_growth_pct"],
        r["loss_pct"],
        c(&r["recording"]["state"]),
        r["recording"]["size"],
        r["recording"]["duration"],
    );
    if let Some(checks) = r["checks"].as_object() {
        let line: Vec<String> = checks.iter().map(|(k, v)| format!("{k} {}", if v["passed"] == true { "ok" } else { "FAILED" })).collect();
        println!("checks: {}", line.join(", "));
    }
    for f in r["failures"].as_array().into_iter().flatten() {
        println!("FAILED: {}", f.as_str().unwrap_or_default());
    }
}
