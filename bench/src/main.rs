//! `tessera-bench`: starts the servers under test on loopback, drives them with the same
//! synthetic WebRTC publishers and subscribers (the `tessera-client` crate), and reports
//! what each server forwarded, what it cost (CPU seconds and RSS from /proc, server process
//! only), the latency it added (send timestamps carried in every payload, same machine
//! clock), loss, and time to first frame. With `--against janus` every scenario runs on
//! Tessera and then on Janus, alternating, and a table gives the ratio of the two.
//!
//! Everything stays in 127.0.0.0/8 (the bench re-executes itself in its own network
//! namespace when it can: see `isolate`), every run is bounded in time and count, and the
//! tool stops by itself.

mod isolate;
mod mixer_bare;
mod quota;
mod scenario;
mod server;
mod simulcast;
mod soak;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};
use tessera_client::media::LiveFormat;

use scenario::{Figures, Load, Shape, percentile, row};
use server::{AnyServer, Kind, Launch};

/// Load scenarios against Tessera, side by side with Janus.
#[derive(Parser, Debug)]
#[command(name = "tessera-bench", version, about)]
struct Args {
    /// smoke, one-to-one, fanout50, meeting10, mixer4, ramp, all (the five before),
    /// mixer-matrix (mixer CPU per view: inputs × resolution × fps; Tessera only), mixer-layers (a view with and without lower layers; Tessera only), mixer-vs-gstreamer (Tessera's 9-input 720p30 view against a bare GStreamer pipeline doing the same work, same CPU, same moving content; CPU ratio and fps), soak
    /// (a long meeting with churn, a watched and recorded mix; RSS, fds and threads over
    /// time; Tessera only; fails when memory grows, fds or threads stay, or media is lost),
    /// cluster (the ramp on a cluster of one and then two webrtc nodes, each on a CPU of
    /// its own where there is one, else each held to --cpu-quota of the servers' CPU;
    /// forwarded packets per second at capacity; Tessera only), scaling (the ramp on one
    /// server with one and then two forwarding workers, on one and two CPUs where the
    /// machine has them, else each worker thread held to --cpu-quota of the servers' CPU;
    /// Tessera only),
    /// or simulcast (one publisher of three layers, 50 subscribers of which 20 on limited
    /// links; per group bit rate, loss, gaps; CPU per packet against fanout50's; Tessera only).
    #[arg(long, default_value = "smoke")]
    scenario: String,
    /// Peer server run alongside: none (Tessera alone) or janus.
    #[arg(long, default_value = "none")]
    against: String,
    /// Print a JSON array (one object per scenario and server) instead of tables.
    #[arg(long)]
    json: bool,
    /// Also write that JSON array to this file (tables still print).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Print the tables of a run saved with --save, without running anything.
    #[arg(long)]
    report: Option<PathBuf>,
    /// The tessera binary (default: next to this one).
    #[arg(long)]
    tessera_bin: Option<PathBuf>,
    /// The janus binary.
    #[arg(long, default_value = "/usr/bin/janus")]
    janus_bin: PathBuf,
    /// Don't pin servers to CPU 1 and the load generator to CPU 0.
    #[arg(long)]
    no_pin: bool,
    /// Video bit rate of each synthetic publisher, kbit/s (1000-byte frames at 30 fps by default).
    #[arg(long, default_value_t = 240)]
    video_kbps: u32,
    /// Video frames per second of each synthetic publisher.
    #[arg(long, default_value_t = 30)]
    fps: u32,
    /// Seconds of measured traffic per scenario (ramp steps and matrix cells use at most 5);
    /// default 10, and 1800 for soak.
    #[arg(long)]
    seconds: Option<u64>,
    /// Participants of the soak's core meeting (2-30).
    #[arg(long, default_value_t = 10)]
    participants: usize,
    /// Largest loss (percent) on the soak's core meeting that still passes.
    #[arg(long, default_value_t = 0.0)]
    max_loss_pct: f64,
    /// Run Tessera with `webrtc.bandwidth_estimation = false` (to measure what it costs).
    #[arg(long)]
    no_bandwidth_estimation: bool,
    /// Hold each server process (each webrtc node of a cluster; each forwarding worker in
    /// scaling) to this fraction of one CPU (a cgroup with a CFS quota; root); the ramp's
    /// CPU rule is then 95 % of it. cluster and scaling use 0.4 by themselves when the
    /// servers are pinned on a machine with fewer than 3 CPUs.
    #[arg(long)]
    cpu_quota: Option<f64>,
    /// Where cluster's webrtc nodes go when each is held to a CPU quota (a machine with too
    /// few CPUs for one each beside the load generator's): `shared`, every node on the
    /// servers' CPU and the rest on CPU 0; `own`, each node on a CPU of its own (node 1 on
    /// the servers' CPU, node 2 on the next one down) with the load generator, the portal
    /// and NATS free to run on every CPU (on 2 CPUs this measured worse: docs/performance.md).
    #[arg(long, default_value = "shared")]
    node_cpus: String,
    /// Tessera's forwarding workers (`webrtc.workers`; 0: one per CPU it may use).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// The ramp's first step (subscribers; ramp, cluster and scaling), e.g. to measure memory
    /// at one load without the steps below it.
    #[arg(long, default_value_t = 10)]
    ramp_from: usize,
    /// The ramp's last step: it stops there even when every step passed.
    #[arg(long, default_value_t = RAMP_MAX)]
    ramp_to: usize,
}

/// The ramp's last step: a bound on the run's length (the load generator shares the
/// machine, so it also bounds what the ramp can tell). Tessera passed 1210 on one core at
/// 60–70 % of it (2026-12-05): the ramp goes on until a server fails.
const RAMP_MAX: usize = 4000;
/// The ramp's smallest step up (and the resolution its search ends at).
const RAMP_STEP: usize = 60;
/// A ramp step's load generator at this share of its CPU or more may be what failed it.
const GENERATOR_BUSY_PCT: f64 = 90.0;
/// What cluster and scaling give each node (or worker) where the machine has too few CPUs
/// for one each beside the load generator's: two of them fit on one CPU with room spare.
const SHARED_CPU_QUOTA: f64 = 0.4;
/// The fidelity scenarios' shape: full peers joining one at a time.
const FULL: Shape = Shape { publishers: 1, fanout: 0, mesh: false, parallel: 1, light: false };
const ALL: [&str; 5] = ["one-to-one", "fanout50", "meeting10", "mixer4", "ramp"];
const KNOWN: [&str; 14] = [
    "smoke",
    "one-to-one",
    "fanout50",
    "meeting10",
    "mixer4",
    "ramp",
    "mixer-matrix",
    "mixer-layers",
    "mixer-vs-gstreamer",
    "soak",
    "cluster",
    "scaling",
    "simulcast",
    "all",
];

/// Whether a ramp step passed: it ran, every subscriber saw video, loss ≤ 1 %, p99 ≤ 50 ms,
/// and the busiest server process stayed under 95 % of its CPU budget (`budget`: CPUs,
/// 1.0 for a whole core; `None` where the budgets are the worker threads', whose
/// exhaustion shows as latency).
fn step_passes(f: &Figures, error: &Option<String>, budget: Option<f64>) -> bool {
    error.is_none()
        && f.missing_first_frames == 0
        && f.loss_pct <= 1.0
        && percentile(&f.latency, 0.99) <= 50.0
        && budget.is_none_or(|b| f.max_cpu_pct() < 95.0 * b)
}

/// The step after `n` subscribers passed: `RAMP_STEP` more, or a fifth more once that is
/// larger (rounded down to tens), so a server that carries thousands is reached in a few
/// steps and the steps where Janus's limit lies stay fine.
fn next_step(n: usize) -> usize {
    n + RAMP_STEP.max(n / 5 / 10 * 10)
}

/// Between a passed and a failed step: the middle (rounded to tens), while they are more
/// than `RAMP_STEP` apart.
fn between(passed: usize, failed: usize) -> Option<usize> {
    (failed.saturating_sub(passed) > RAMP_STEP).then(|| (passed + failed) / 2 / 10 * 10)
}

/// Adds subscribers to one publisher (`steps.start`, then [`next_step`]s up to `steps.end`;
/// with more `publishers`, the step's subscribers split evenly among them), each step on a
/// server `start` makes afresh, until a step fails twice in a row (one spike in a 5 s
/// window should not decide the capacity); then halves the gap between the last passed
/// and the failed step down to `RAMP_STEP`. See [`step_passes`] (`budget`: each server
/// process's CPUs). Joins go 8 at a time to keep the run short. The last row carries the
/// capacity, and `limit`: `server`, `generator` (the load generator was at
/// [`GENERATOR_BUSY_PCT`] of its CPU or more in the step that failed: the server may carry
/// more) or `max` (no step failed).
#[allow(clippy::too_many_arguments)]
async fn ramp<S: server::Server>(
    scenario: &str,
    server: &str,
    steps: std::ops::RangeInclusive<usize>,
    load: Load,
    seconds: u64,
    budget: Option<f64>,
    publishers: usize,
    mut start: impl AsyncFnMut() -> anyhow::Result<S>,
    tag: impl Fn(&mut Value),
    out: &mut Vec<Value>,
) -> anyhow::Result<()> {
    let publishers = publishers.max(1);
    let step_s = seconds.min(5);
    // This ramp's rows are `out[first..]`: pushed as they come, so a run stopped by its
    // time limit keeps the steps it made.
    let first = out.len();
    let mut capacity = 0;
    // The smallest step that failed twice, and whether its generator was busy.
    let mut failed: Option<(usize, bool)> = None;
    let mut n = *steps.start();
    let mut retried = false;
    while n <= *steps.end() {
        let s = start().await?;
        // A step that cannot even be set up (joins refused or timing out under load) is a
        // failed step, not the end of the run.
        let shape = Shape { publishers, fanout: n / publishers, mesh: false, parallel: 8, light: true };
        let (f, error) = match scenario::sfu(&s, load, shape, step_s).await {
            Ok(f) => (f, None),
            Err(e) => (Figures { subscribers: n, ..Default::default() }, Some(format!("{e:#}"))),
        };
        drop(s);
        let ok = step_passes(&f, &error, budget);
        let mut r = row(scenario, server, &f);
        tag(&mut r);
        r["step_subscribers"] = json!(n);
        r["cpu_budget"] = json!(budget);
        r["passed"] = json!(ok);
        eprintln!(
            "tessera-bench: {scenario} step {n} on {server}: {}, p99 {:.1} ms, loss {:.2} %, busiest process {:.1} % of a core, {} forwarded pkt/s",
            if ok { "passed" } else { "failed" },
            percentile(&f.latency, 0.99),
            f.loss_pct,
            f.max_cpu_pct(),
            r["forwarded_pps"]
        );
        if let Some(e) = error {
            eprintln!("tessera-bench: {scenario} step {n} on {server}: {e}");
            r["error"] = json!(e);
        }
        out.push(r);
        if !ok && !retried {
            retried = true;
            continue;
        }
        retried = false;
        if ok {
            capacity = n;
        } else {
            failed = Some((n, f.generator_cpu_pct() >= GENERATOR_BUSY_PCT));
        }
        n = match failed {
            None => next_step(n),
            Some((at, _)) => match between(capacity, at) {
                Some(mid) => mid,
                None => break,
            },
        };
    }
    // The memory figure: RSS at the largest passed step over its subscribers.
    let per_subscriber = out[first..]
        .iter()
        .filter(|r| r["passed"] == true && r["step_subscribers"] == capacity)
        .find_map(|r| r["rss_mb"].as_f64())
        .filter(|_| capacity > 0)
        .map(|rss| (rss / capacity as f64 * 1000.0).round() / 1000.0);
    if let Some(last) = out[first..].last_mut() {
        last["capacity_subscribers"] = json!(capacity);
        last["rss_mb_per_subscriber"] = json!(per_subscriber);
        last["limit"] = json!(match failed {
            None => "max",
            Some((_, true)) => "generator",
            Some((_, false)) => "server",
        });
    }
    Ok(())
}

/// The CPU quota each of `units` nodes (or workers) of a scaling scenario gets, all on the
/// servers' CPU: `--cpu-quota` when given, else [`SHARED_CPU_QUOTA`] when the machine has
/// no CPU for each beside the load generator's; `None`: a CPU each. `own_cpus`: the units
/// will each have a CPU of their own after all (the cluster's `--node-cpus own`), which
/// the quota then limits, and the load generator shares.
fn shared_cpu_quota(launch: &Launch, scenario: &str, cpus: usize, units: usize, own_cpus: bool) -> anyhow::Result<Option<f64>> {
    let quota = match (launch.cpu_quota, launch.pin_cpu) {
        (Some(q), _) => q,
        // Pinned, with no CPU for each unit beside the load generator's.
        (None, Some(cpu)) if cpus <= units => {
            if !quota::available() {
                eprintln!("tessera-bench: {scenario}: {cpus} CPUs and no cgroup CPU quota here: the units share the CPUs as they come");
                return Ok(None);
            }
            let of = if own_cpus {
                "a CPU of its own (a cgroup CPU quota); the load generator, the portal and NATS on every CPU".to_string()
            } else {
                format!("CPU {cpu} (a cgroup CPU quota)")
            };
            eprintln!(
                "tessera-bench: {scenario}: {cpus} CPUs, not one for each of {units} beside the load generator's: each gets {SHARED_CPU_QUOTA} of {of}"
            );
            SHARED_CPU_QUOTA
        }
        (None, _) => return Ok(None),
    };
    if !own_cpus && quota * units as f64 > 0.95 {
        bail!("{scenario}: {units} × --cpu-quota {quota} do not fit on one CPU (at most 0.95 together)");
    }
    Ok(Some(quota))
}

/// Runs one scenario on one server kind, adding its rows to `rows` as they come (a
/// scenario stopped by its time limit keeps those it made).
async fn run(name: &str, kind: Kind, launch: &Launch, load: Load, seconds: u64, args: &Args, rows: &mut Vec<Value>) -> anyhow::Result<()> {
    match name {
        "soak" if kind != Kind::Tessera => {
            eprintln!("tessera-bench: soak is Tessera only (it records and watches the room's mix)");
        }
        "soak" => {
            let t = Arc::new(server::tessera::Tessera::start_with(launch, soak::PORTAL_SETTINGS)?);
            let o = soak::Soak { seconds, participants: args.participants, max_loss_pct: args.max_loss_pct, load };
            rows.push(soak::soak(t, o).await?);
        }
        "ramp" => {
            // A fresh server per step, so steps don't inherit each other's state.
            let budget = Some(launch.cpu_quota.unwrap_or(1.0));
            ramp(
                "ramp",
                kind.name(),
                args.ramp_from..=args.ramp_to,
                load,
                seconds,
                budget,
                1,
                async || AnyServer::start(kind, launch).await,
                |_| {},
                rows,
            )
            .await?;
        }
        "cluster" | "scaling" if kind != Kind::Tessera => {
            eprintln!("tessera-bench: {name} is Tessera only (it compares Tessera with more of itself)");
        }
        "cluster" => {
            // The ramp twice: one webrtc node, then two; a fresh cluster (NATS too) per step.
            let pinned = launch.pin_cpu.is_some();
            let cpus = isolate::machine_cpus();
            // With quotas, each node keeps a budget of its own; `own` also gives it a CPU of
            // its own, and then the load generator may not keep CPU 0 to itself.
            let wants_own = pinned && cpus >= 2 && args.node_cpus == "own";
            let quota = shared_cpu_quota(launch, name, cpus, 2, wants_own)?;
            let own = quota.is_some() && wants_own;
            if own {
                isolate::unpin_self(cpus)?;
            }
            let portal_cpu = if own { None } else { launch.pin_cpu.map(|_| 0) };
            let place = |nodes: usize| -> Vec<Option<usize>> {
                match (quota, launch.pin_cpu) {
                    (Some(_), Some(cpu)) if own => (0..nodes).map(|i| Some((cpu + cpus - i % cpus) % cpus)).collect(),
                    (Some(_), _) => vec![launch.pin_cpu; nodes],
                    (None, _) => server::cluster::webrtc_cpus(nodes, cpus, pinned),
                }
            };
            for nodes in [1usize, 2] {
                let placement = place(nodes);
                let nodes_launch = Launch { cpu_quota: quota, ..launch.clone() };
                let start = async || server::cluster::Cluster::start(&nodes_launch, &placement, portal_cpu).await;
                let tag = |r: &mut Value| {
                    r["webrtc_nodes"] = json!(nodes);
                    r["webrtc_cpus"] = json!(placement);
                    r["node_cpus"] = json!(if own {
                        "own"
                    } else if quota.is_some() {
                        "shared"
                    } else {
                        "pinned"
                    });
                };
                ramp("cluster", kind.name(), args.ramp_from..=args.ramp_to, load, seconds, Some(quota.unwrap_or(1.0)), 1, start, tag, rows).await?;
            }
            // Where the nodes' CPUs are stand-ins (budgets), the control: two standalone
            // servers on the two nodes' CPUs and budgets, a publisher each and half the
            // subscribers each, nothing between them — what this machine lets two
            // independent servers carry, so that the cluster's cost can be told from the
            // stand-in's.
            if let Some(quota) = quota {
                let placement = place(2);
                let launches: Vec<Launch> =
                    placement.iter().map(|cpu| Launch { cpu_quota: Some(quota), pin_cpu: *cpu, pinned_cpus: 1, ..launch.clone() }).collect();
                let start = async || server::pair::Pair::start([&launches[0], &launches[1]]);
                let tag = |r: &mut Value| {
                    r["standalone_servers"] = json!(2);
                    r["webrtc_cpus"] = json!(placement);
                    r["node_cpus"] = json!(if own { "own" } else { "shared" });
                };
                ramp("cluster", kind.name(), args.ramp_from..=args.ramp_to, load, seconds, Some(quota), 2, start, tag, rows).await?;
            }
        }
        "scaling" => {
            // The ramp twice on one server: one forwarding worker, then two, each with a
            // CPU of its own, or each worker thread held to a quota of the servers' CPU
            // (the rest of the process, the portal's signalling, unlimited beside them).
            let cpus = isolate::machine_cpus();
            let quota = shared_cpu_quota(launch, name, cpus, 2, false)?;
            for workers in [1usize, 2] {
                let worker_launch = match quota {
                    Some(q) => Launch { workers, cpu_quota: None, worker_quota: Some(q), ..launch.clone() },
                    None => Launch { workers, pinned_cpus: workers, ..launch.clone() },
                };
                let budget = if quota.is_some() { None } else { Some(workers as f64) };
                let tag = |r: &mut Value| {
                    r["workers"] = json!(workers);
                    r["worker_quota"] = json!(quota);
                };
                let start = async || AnyServer::start(kind, &worker_launch).await;
                ramp("scaling", kind.name(), args.ramp_from..=args.ramp_to, load, seconds, budget, 1, start, tag, rows).await?;
            }
        }
        "simulcast" if kind != Kind::Tessera => {
            eprintln!("tessera-bench: simulcast is Tessera only (the scenario drives Tessera's layer choice and its estimator)");
        }
        "simulcast" => {
            if std::env::var(isolate::ENV).is_err() {
                bail!("simulcast needs the bench's own network namespace (unshare -n, ip and tc, as root): it limits links with tc");
            }
            rows.extend(simulcast::simulcast(launch, load, seconds).await?);
        }
        "mixer-vs-gstreamer" if kind != Kind::Tessera => {
            eprintln!("tessera-bench: mixer-vs-gstreamer compares Tessera's mixer with a bare GStreamer pipeline; Janus has no mixer");
        }
        "mixer-vs-gstreamer" => rows.extend(mixer_bare::mixer_vs_gstreamer(launch, seconds).await?),
        "mixer4" | "mixer-matrix" | "mixer-layers" if kind != Kind::Tessera => {
            eprintln!("tessera-bench: {name} is Tessera only: Janus's VideoRoom forwards, it has no video mixer");
        }
        "mixer-layers" => {
            // What a view's lower layers cost: the same view with and without
            // `["x1/2", "x1/4"]`, one viewer on auto (which needs every layer), alternating.
            for (width, height) in [(640, 480), (1280, 720)] {
                for layers in [&[][..], &["x1/2", "x1/4"][..]] {
                    let s = AnyServer::start(kind, launch).await?;
                    let t = s.as_tessera().context("mixer needs Tessera")?;
                    let room = t.create_layered_mix_room(&format!("layers-{width}x{height}-{}", layers.len()), width, height, 30, layers).await?;
                    let input = LiveFormat { fps: 30, ..LiveFormat::default() };
                    let f = scenario::mixer(t, &room, 4, input, 1, 30, seconds).await?;
                    let mut r = row(name, kind.name(), &f);
                    r["inputs"] = json!(4);
                    r["view"] = json!(format!("{width}x{height}@30"));
                    r["layers"] = json!(layers);
                    rows.push(r);
                }
            }
        }
        "mixer4" => {
            let s = AnyServer::start(kind, launch).await?;
            let t = s.as_tessera().context("mixer needs Tessera")?;
            let f = scenario::mixer(t, "dev", 4, LiveFormat::default(), 20, 24, seconds).await?;
            rows.push(row(name, kind.name(), &f));
        }
        "mixer-matrix" => {
            // One view per cell, one viewer (a view that nobody watches does no work).
            for (width, height) in [(320, 240), (640, 480), (1280, 720)] {
                for fps in [15, 30] {
                    for inputs in [1, 4, 9] {
                        let s = AnyServer::start(kind, launch).await?;
                        let t = s.as_tessera().context("mixer needs Tessera")?;
                        let room = t.create_mix_room(width, height, fps).await?;
                        let input = LiveFormat { fps, ..LiveFormat::default() };
                        let f = scenario::mixer(t, &room, inputs, input, 1, fps, seconds.min(5)).await?;
                        let mut r = row(name, kind.name(), &f);
                        r["inputs"] = json!(inputs);
                        r["view"] = json!(format!("{width}x{height}@{fps}"));
                        rows.push(r);
                    }
                }
            }
        }
        _ => {
            let s = AnyServer::start(kind, launch).await?;
            let f: Figures = match name {
                "smoke" => scenario::sfu(&s, load, Shape { publishers: 1, fanout: 2, ..FULL }, seconds.min(3)).await?,
                "one-to-one" => scenario::sfu(&s, load, Shape { publishers: 1, fanout: 1, ..FULL }, seconds).await?,
                "fanout50" => scenario::sfu(&s, load, Shape { publishers: 1, fanout: 50, ..FULL }, seconds).await?,
                "meeting10" => scenario::sfu(&s, load, Shape { publishers: 10, mesh: true, ..FULL }, seconds).await?,
                other => bail!("unknown scenario `{other}`"),
            };
            rows.push(row(name, kind.name(), &f));
        }
    }
    Ok(())
}

fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => "-".to_string(),
        Some(other) => other.to_string(),
    }
}

fn print_rows(rows: &[Value]) {
    println!(
        "{:<12} {:<8} {:>5} {:>9} {:>7} {:>6} {:>7} {:>7} {:>8} {:>8} {:>7} {:>6} {:>9} {:>8} {:>6}",
        "scenario",
        "server",
        "subs",
        "fwd pps",
        "Mbit/s",
        "CPU %",
        "µs/pkt",
        "RSS MB",
        "p50 ms",
        "p99 ms",
        "loss %",
        "ooo %",
        "1st frame",
        "mix fps",
        "gen %"
    );
    for r in rows {
        let c = |k: &str| text(r.get(k));
        let scenario = match (r.get("view"), r.get("step_subscribers"), r.get("webrtc_nodes")) {
            _ if r.get("group").is_some() => format!("sc-{}", c("group")),
            (Some(v), _, _) => {
                let layered = r.get("layers").and_then(Value::as_array).is_some_and(|l| !l.is_empty());
                format!("{} {}in{}", text(Some(v)), c("inputs"), if layered { " +layers" } else { "" })
            }
            (_, Some(n), Some(nodes)) => format!("cluster{nodes} {n}"),
            (_, Some(n), _) if r.get("workers").is_some() => format!("scaling{} {n}", c("workers")),
            (_, Some(n), _) if r.get("standalone_servers").is_some() => format!("pair {n}"),
            (_, Some(n), _) => format!("ramp {n}"),
            _ => c("scenario"),
        };
        println!(
            "{:<12} {:<8} {:>5} {:>9} {:>7} {:>6} {:>7} {:>7} {:>8} {:>8} {:>7} {:>6} {:>9} {:>8} {:>6}",
            scenario,
            c("server"),
            c("subscribers"),
            c("forwarded_pps"),
            c("mbps"),
            c("cpu_pct"),
            c("cpu_us_per_packet"),
            c("rss_mb"),
            c("latency_ms_p50"),
            c("latency_ms_p99"),
            c("loss_pct"),
            c("out_of_order_pct"),
            c("first_frame_ms"),
            c("mixer_fps"),
            c("generator_cpu_pct"),
        );
    }
    for r in rows.iter().filter(|r| r.get("capacity_subscribers").is_some()) {
        let c = |k: &str| text(r.get(k));
        println!(
            "{} on {}: capacity {} subscribers (limit: {}), RSS per subscriber there {} MB",
            c("scenario"),
            c("server"),
            c("capacity_subscribers"),
            c("limit"),
            c("rss_mb_per_subscriber")
        );
    }
}

/// The side-by-side table: per scenario and figure, Tessera, Janus and their ratio.
fn print_comparison(rows: &[Value]) {
    let figures = [
        ("forwarded_pps", "forwarded pkt/s"),
        ("cpu_us_per_packet", "CPU µs per packet"),
        ("cpu_pct", "CPU % of a core"),
        ("rss_mb", "RSS MB"),
        ("latency_ms_p50", "latency p50 ms"),
        ("latency_ms_p99", "latency p99 ms"),
        ("loss_pct", "loss %"),
        ("first_frame_ms", "first frame ms"),
        // Subscribers the median above leaves out: no picture within 5 s of joining.
        ("missing_first_frames", "no picture (5 s)"),
        ("capacity_subscribers", "capacity (subs)"),
    ];
    println!();
    println!("{:<12} {:<18} {:>10} {:>10} {:>15}", "scenario", "figure", "tessera", "janus", "tessera/janus");
    let mut scenarios: Vec<&str> = rows.iter().filter_map(|r| r["scenario"].as_str()).collect();
    scenarios.dedup();
    for sc in scenarios {
        // A ramp compares the largest step both servers passed (same load on both), and
        // the capacities from its last rows; other scenarios have one row per server.
        let passed_at = |server: &str, n: u64| {
            rows.iter().find(|r| r["scenario"] == sc && r["server"] == server && r["step_subscribers"] == n && r["passed"] == true)
        };
        let common_step = rows
            .iter()
            .filter(|r| r["scenario"] == sc && r["server"] == "tessera" && r["passed"] == true)
            .filter_map(|r| r["step_subscribers"].as_u64())
            .filter(|n| passed_at("janus", *n).is_some())
            .max();
        let pick = |server: &str| match common_step {
            Some(n) => passed_at(server, n),
            None => rows.iter().rev().find(|r| r["scenario"] == sc && r["server"] == server),
        };
        let last = |server: &str| rows.iter().rev().find(|r| r["scenario"] == sc && r["server"] == server);
        let (Some(t), Some(j)) = (pick("tessera"), pick("janus")) else { continue };
        let label_sc = match common_step {
            Some(n) => format!("{sc} {n}"),
            None => sc.to_string(),
        };
        for (key, label) in figures {
            let (t, j) = if key == "capacity_subscribers" { (last("tessera").unwrap_or(t), last("janus").unwrap_or(j)) } else { (t, j) };
            let (Some(a), Some(b)) = (t.get(key).and_then(Value::as_f64), j.get(key).and_then(Value::as_f64)) else { continue };
            let sc = &label_sc;
            let ratio = if b.abs() > f64::EPSILON { format!("{:.2}", a / b) } else { "-".into() };
            println!("{sc:<12} {label:<18} {a:>10} {b:>10} {ratio:>15}");
        }
    }
}

/// The cluster's scaling (`cluster`: one webrtc node against two) and a server's
/// (`scaling`: one forwarding worker against two): forwarded packets per second at each
/// size's capacity (its largest passing step) and their ratio.
fn print_scaling(rows: &[Value]) {
    print_scaled(rows, "cluster", "webrtc_nodes", "webrtc node(s)");
    print_cluster_control(rows);
    print_scaled(rows, "scaling", "workers", "worker(s)");
}

/// The largest passing step of the ramp whose rows have `key` = `size` in `scenario`, and
/// whether that ramp found its limit (a ramp that never failed stopped at its last step).
fn ramp_capacity<'a>(rows: &'a [Value], scenario: &str, key: &str, size: u64) -> Option<(&'a Value, bool)> {
    let of = || rows.iter().filter(move |r| r["scenario"] == scenario && r[key] == size);
    let best = of().filter(|r| r["passed"] == true).max_by_key(|r| r["step_subscribers"].as_u64().unwrap_or(0))?;
    Some((best, of().any(|r| r["passed"] == false)))
}

/// The cluster's control (two standalone servers on the nodes' CPUs and budgets): what it
/// carried, against one node and against the cluster's two.
fn print_cluster_control(rows: &[Value]) {
    // Only ramps that found their limit.
    let capacity = |key: &str, size: u64| {
        let (best, limited) = ramp_capacity(rows, "cluster", key, size)?;
        limited.then(|| (best, best["forwarded_pps"].as_f64().unwrap_or(0.0)))
    };
    let Some((pair, pair_pps)) = capacity("standalone_servers", 2) else { return };
    println!(
        "  control, two standalone servers (a publisher each, nothing between them) on CPUs {}, each held to {} of a CPU: {} subscribers, {} pkt/s",
        text(pair.get("webrtc_cpus")),
        text(pair.get("cpu_budget")),
        text(pair.get("step_subscribers")),
        pair_pps
    );
    if let Some((_, one)) = capacity("webrtc_nodes", 1).filter(|(_, p)| *p > 0.0) {
        println!("  two standalone servers / one node: {:.2} (what this placement allows two independent servers)", pair_pps / one);
    }
    if let Some((_, two)) = capacity("webrtc_nodes", 2).filter(|_| pair_pps > 0.0) {
        println!("  two nodes / two standalone servers: {:.2} (the cluster's own cost: the relay, the portal node)", two / pair_pps);
    }
}

fn print_scaled(rows: &[Value], scenario: &str, key: &str, what: &str) {
    let of = |size: u64| rows.iter().filter(move |r| r["scenario"] == scenario && r[key] == size);
    let (Some((one, one_limited)), Some((two, two_limited))) = (ramp_capacity(rows, scenario, key, 1), ramp_capacity(rows, scenario, key, 2)) else {
        return;
    };
    let pps = |r: &Value| r["forwarded_pps"].as_f64().unwrap_or(0.0);
    println!();
    println!("{scenario}: forwarded pkt/s at capacity (largest passing step)");
    for (size, r, limited) in [(1, one, one_limited), (2, two, two_limited)] {
        let cpus = r.get("webrtc_cpus").map(|c| format!(" on CPUs {}", text(Some(c)))).unwrap_or_default();
        let budget = match (r.get("worker_quota").and_then(Value::as_f64), r.get("cpu_budget").and_then(Value::as_f64)) {
            (Some(q), _) => format!("each worker held to {q} of a CPU"),
            (None, Some(b)) => format!("{b} CPU(s) of budget"),
            (None, None) => "no CPU rule".to_string(),
        };
        println!(
            "  {size} {what}{cpus}, {budget}: {} subscribers, {} pkt/s, busiest process {} % of a core{}",
            text(r.get("step_subscribers")),
            pps(r),
            text(r.get("busiest_cpu_pct")),
            if limited { "" } else { " (the ramp ended before a step failed: not the limit)" }
        );
    }
    if pps(one) > 0.0 && one_limited {
        println!("  two / one: {:.2}", pps(two) / pps(one));
    }
    // The same load on both: how much of the busiest process's CPU it takes with one and
    // with two (what the second relieves, whatever else limits the larger ramp).
    let passed = |size: u64, n: u64| of(size).find(|r| r["step_subscribers"] == n && r["passed"] == true);
    let common = of(1).filter(|r| r["passed"] == true).filter_map(|r| r["step_subscribers"].as_u64()).filter(|n| passed(2, *n).is_some()).max();
    if let Some(n) = common
        && let (Some(a), Some(b)) = (passed(1, n), passed(2, n))
    {
        let busiest = |r: &Value| r["busiest_cpu_pct"].as_f64().unwrap_or(0.0);
        let total = |r: &Value| r["cpu_pct"].as_f64().unwrap_or(0.0);
        if a["webrtc_nodes"].is_null() {
            // One process either way: what the same load costs it with one and with two.
            println!("  at {n} subscribers: the server took {:.1} % of a core with one, {:.1} % with two", total(a), total(b));
            return;
        }
        println!(
            "  at {n} subscribers: busiest process {:.1} % of a core with one, {:.1} % with two ({:.2}× less); all together {:.1} % vs {:.1} %",
            busiest(a),
            busiest(b),
            if busiest(b) > 0.0 { busiest(a) / busiest(b) } else { 0.0 },
            total(a),
            total(b)
        );
    }
}

/// Writes the rows so far to `--save`'s file, if asked.
fn save(args: &Args, rows: &[Value]) -> anyhow::Result<()> {
    if let Some(path) = &args.save {
        std::fs::write(path, serde_json::to_string_pretty(rows)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The workspace's reqwest has rustls without a built-in provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    if let Some(path) = &args.report {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let rows: Vec<Value> = serde_json::from_str(&text).with_context(|| format!("{} is not a saved run", path.display()))?;
        print_rows(&rows);
        if rows.iter().any(|r| r["server"] == "janus") {
            print_comparison(&rows);
        }
        rows.iter().filter(|r| r["scenario"] == "soak").for_each(soak::print);
        print_scaling(&rows);
        return Ok(());
    }
    let kinds = match args.against.as_str() {
        "none" => vec![Kind::Tessera],
        "janus" => vec![Kind::Tessera, Kind::Janus],
        other => bail!("--against {other}: expected none or janus"),
    };
    if !KNOWN.contains(&args.scenario.as_str()) {
        bail!(
            "unknown scenario `{}` (smoke, one-to-one, fanout50, meeting10, mixer4, ramp, all, mixer-matrix, mixer-layers, mixer-vs-gstreamer, soak, cluster, scaling, simulcast)",
            args.scenario
        );
    }
    let seconds = args.seconds.unwrap_or(if args.scenario == "soak" { 1800 } else { 10 });
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    if args.ramp_from == 0 || args.ramp_from > args.ramp_to {
        bail!("--ramp-from must be at least 1 and at most --ramp-to ({} and {} given)", args.ramp_from, args.ramp_to);
    }
    if args.scenario == "soak" && (seconds < 30 || !(2..=30).contains(&args.participants) || !(0.0..=100.0).contains(&args.max_loss_pct)) {
        bail!("soak needs --seconds of at least 30, --participants 2-30 and --max-loss-pct 0-100");
    }
    if args.fps == 0 || args.fps > 120 || args.video_kbps == 0 || args.video_kbps > 20_000 {
        bail!("--fps must be 1-120 and --video-kbps 1-20000");
    }
    let load = Load { video_kbps: args.video_kbps, fps: args.fps };
    let place = match isolate::enter(!args.no_pin)? {
        Ok(place) => place,
        Err(code) => std::process::exit(code),
    };
    let (server_ip, client_ip, pin_cpu) = match place {
        isolate::Place::Namespace { pinned } => ("127.0.1.1", "127.0.1.2", pinned.then_some(1)),
        isolate::Place::HostLoopback if kinds.contains(&Kind::Janus) => {
            bail!("--against janus needs the bench's own network namespace (unshare -n and ip, as root): Janus gathers no ICE candidate on `lo`")
        }
        isolate::Place::HostLoopback => {
            eprintln!("tessera-bench: no network namespace available (needs root); running on 127.0.0.1 in this one");
            ("127.0.0.1", "127.0.0.1", None)
        }
    };
    let tessera_bin = match &args.tessera_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.parent().context("exe dir")?.join("tessera"),
    };
    if kinds.contains(&Kind::Janus) && !args.janus_bin.exists() {
        bail!("{} not found: install the Debian package `janus` (scripts/install-deps.sh --test)", args.janus_bin.display());
    }
    if !["own", "shared"].contains(&args.node_cpus.as_str()) {
        bail!("--node-cpus {}: expected own or shared", args.node_cpus);
    }
    if args.cpu_quota.is_some_and(|q| !(0.1..=64.0).contains(&q)) {
        bail!("--cpu-quota must be 0.1-64 (CPUs)");
    }
    if pin_cpu.is_some() && args.cpu_quota.is_some_and(|q| q > 1.0) {
        bail!("--cpu-quota above 1 needs --no-pin: a pinned server has one CPU");
    }
    quota::sweep();
    let launch = Launch {
        tessera_bin,
        janus_bin: args.janus_bin.clone(),
        pin_cpu,
        pinned_cpus: 1,
        all_cpus: false,
        server_ip: server_ip.into(),
        client_ip: client_ip.into(),
        bandwidth_estimation: !args.no_bandwidth_estimation,
        cpu_quota: args.cpu_quota,
        workers: args.workers,
        worker_quota: None,
    };
    let names: Vec<&str> = if args.scenario == "all" { ALL.to_vec() } else { vec![args.scenario.as_str()] };
    let mut rows = Vec::new();
    for name in names {
        // Servers alternate per scenario, so both see the same machine state in one run.
        for &kind in &kinds {
            // Every scenario is bounded: a stuck one cannot hold the run (the ramp and the
            // matrix are many runs in one).
            let limit = match name {
                // Up to 21 steps of a ramp, each joining its subscribers 8 at a time.
                "ramp" => Duration::from_secs(3600),
                "mixer-matrix" => Duration::from_secs(900),
                // Three ramps (one node, two, the two standalone servers).
                "cluster" => Duration::from_secs(5400),
                "scaling" => Duration::from_secs(2700),
                "soak" => Duration::from_secs(seconds + 900),
                _ => Duration::from_secs(seconds * 20 + 240),
            };
            let started = std::time::Instant::now();
            let result = tokio::time::timeout(limit, run(name, kind, &launch, load, seconds, &args, &mut rows))
                .await
                .map_err(|_| anyhow::anyhow!("timed out after {limit:?}"))
                .and_then(|r| r);
            match result {
                Ok(()) => {}
                Err(e) => {
                    // Keep what the earlier scenarios measured.
                    save(&args, &rows)?;
                    return Err(e.context(format!("scenario {name} on {kind:?} (rows so far saved with --save)")));
                }
            }
            eprintln!("tessera-bench: {name} on {kind:?} took {:.0} s", started.elapsed().as_secs_f64());
            save(&args, &rows)?;
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_rows(&rows);
        if kinds.contains(&Kind::Janus) {
            print_comparison(&rows);
        }
        rows.iter().filter(|r| r["scenario"] == "soak").for_each(soak::print);
        print_scaling(&rows);
        simulcast::print(&rows);
    }
    // A soak that measured a leak, a growth or a loss fails the run, after its report.
    let failed: Vec<&Value> = rows.iter().filter(|r| r["scenario"] == "soak" && r["passed"] == false).collect();
    if !failed.is_empty() {
        let why: Vec<&str> = failed.iter().flat_map(|r| r["failures"].as_array().into_iter().flatten()).filter_map(Value::as_str).collect();
        bail!("soak failed: {}", why.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ramp_steps_up_by_a_fifth_and_searches_down_to_its_resolution() {
        let mut steps = vec![10];
        while let Some(&n) = steps.last().filter(|n| **n < 1300) {
            steps.push(next_step(n));
        }
        assert_eq!(steps, [10, 70, 130, 190, 250, 310, 370, 440, 520, 620, 740, 880, 1050, 1260, 1510]);
        assert_eq!(between(1260, 1510), Some(1380));
        assert_eq!(between(1380, 1510), Some(1440));
        assert_eq!(between(1440, 1510), Some(1470));
        assert_eq!(between(1470, 1510), None);
        assert_eq!(between(0, 10), None);
    }
}
