//! The seam between the scenarios and the servers they load: every server under test is
//! started by the bench on loopback with its own configuration, and offers the same two
//! verbs — publish a synthetic stream, subscribe to one. Adding a peer (mediasoup through
//! its npm package, say) means one more module and one more [`AnyServer`] variant.

pub mod cluster;
pub mod janus;
pub mod pair;
pub mod tessera;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use tessera_client::light::LightSubscriber;
use tessera_client::peer::{Publisher, Received, Subscriber};

/// Whatever must stay alive for a publication or subscription to last (a signaling
/// connection, a Janus session and its poller).
pub type Keep = Box<dyn std::any::Any + Send>;

/// What subscribes: a full webrtc-rs peer (every packet decrypted and logged), or a light
/// one (`tessera_client::light`) that only decrypts when `decrypts` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// A full peer.
    Full,
    /// A light peer.
    Light {
        /// Decrypt payloads (markers: latency); else read the clear RTP header only.
        decrypts: bool,
    },
}

/// A subscription made by a scenario.
pub enum Sub {
    /// On a full peer.
    Full(Subscriber),
    /// On a light peer.
    Light(LightSubscriber),
}

impl Sub {
    /// Everything received so far, in arrival order.
    pub fn received(&self) -> &Arc<std::sync::Mutex<Vec<Received>>> {
        match self {
            Sub::Full(s) => &s.received,
            Sub::Light(s) => &s.received,
        }
    }

    /// Whether the payloads (and their markers) are there to read.
    pub fn has_payloads(&self) -> bool {
        match self {
            Sub::Full(_) => true,
            Sub::Light(s) => s.decrypts,
        }
    }
}

/// A server the scenarios can load.
pub trait Server {
    /// The server's process id, for CPU and memory readings.
    fn pid(&self) -> u32;
    /// Every process whose CPU and memory count (a cluster's forwarding nodes).
    fn pids(&self) -> Vec<u32> {
        vec![self.pid()]
    }
    /// Publishes one synthetic VP8 + Opus stream tagged `tag`, ready to be subscribed to.
    async fn publish(&self, user: &str, tag: u32) -> anyhow::Result<(Arc<Publisher>, Keep)>;
    /// Subscribes to audio and video of `stream` (a publisher's `stream_id`).
    async fn subscribe(&self, user: &str, stream: &str, peer: PeerKind) -> anyhow::Result<(Sub, Keep)>;
}

/// The servers this bench knows.
pub enum AnyServer {
    /// Tessera itself.
    Tessera(tessera::Tessera),
    /// Janus with its VideoRoom plugin.
    Janus(janus::Janus),
}

/// Which server to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Tessera.
    Tessera,
    /// Janus.
    Janus,
}

impl Kind {
    /// The server's name in reports: `"tessera"` or `"janus"`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Tessera => "tessera",
            Kind::Janus => "janus",
        }
    }
}

/// A server process and its scratch directory: killed and removed when dropped.
pub struct Process {
    /// The running server.
    pub child: std::process::Child,
    /// Its configuration, data and log.
    pub dir: PathBuf,
    /// Its CPU budgets (the process's, or some threads'): held for their `Drop`, which
    /// runs after the process is reaped (fields drop after `Process::drop`).
    quotas: Vec<crate::quota::CpuQuota>,
}

impl Process {
    /// A started server, held to `cpu_quota` of one CPU when one is given.
    pub fn new(child: std::process::Child, dir: PathBuf, cpu_quota: Option<f64>, name: &str) -> anyhow::Result<Process> {
        // Owned first: if the quota fails, dropping it kills the process and removes its folder.
        let mut process = Process { child, dir, quotas: Vec::new() };
        if let Some(q) = cpu_quota {
            process.quotas.push(crate::quota::CpuQuota::apply(process.child.id(), q, name)?);
        }
        Ok(process)
    }

    /// Holds each thread named `prefix…` to `fraction` of one CPU; fails unless `expected`
    /// such threads were found.
    pub fn limit_threads(&mut self, prefix: &str, fraction: f64, expected: usize) -> anyhow::Result<()> {
        let found = crate::quota::CpuQuota::apply_to_threads(self.child.id(), prefix, fraction)?;
        let n = found.len();
        self.quotas.extend(found);
        if n != expected {
            anyhow::bail!("{n} threads named {prefix}…, expected {expected}");
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How to start the servers.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The tessera binary.
    pub tessera_bin: PathBuf,
    /// The janus binary.
    pub janus_bin: PathBuf,
    /// Pin the server to this CPU (the load generator runs on the others).
    pub pin_cpu: Option<usize>,
    /// How many CPUs from `pin_cpu` on the server may use (1 unless a scenario gives it more).
    pub pinned_cpus: usize,
    /// Instead, let the server run on every CPU of the machine (the bench's own process
    /// may be pinned, and a child would inherit that).
    pub all_cpus: bool,
    /// Loopback-range address the servers' media binds to.
    pub server_ip: String,
    /// Loopback-range address the load generator's peers bind to.
    pub client_ip: String,
    /// Tessera's send-side bandwidth estimation (`webrtc.bandwidth_estimation`).
    pub bandwidth_estimation: bool,
    /// Each server process (each webrtc node of a cluster) held to this fraction of one
    /// CPU ([`crate::quota`]); the ramp's CPU rule is then relative to it.
    pub cpu_quota: Option<f64>,
    /// Tessera's forwarding worker threads (`webrtc.workers`; 0: one per CPU it may use).
    pub workers: usize,
    /// Each of Tessera's forwarding worker threads held to this fraction of one CPU (the
    /// rest of the process unlimited): a worker's share of a core, where the machine has
    /// no core for each.
    pub worker_quota: Option<f64>,
}

impl Launch {
    /// A command for a server binary, pinned when asked.
    pub fn command(&self, bin: &PathBuf) -> Command {
        if self.all_cpus {
            let mut c = Command::new("taskset");
            // The online CPUs as the kernel lists them ("0-1", "0,2-3").
            let online = std::fs::read_to_string("/sys/devices/system/cpu/online").map(|s| s.trim().to_string()).unwrap_or_default();
            let list = if online.is_empty() { format!("0-{}", crate::isolate::machine_cpus().max(1) - 1) } else { online };
            c.arg("-c").arg(list).arg(bin);
            return c;
        }
        match self.pin_cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                let last = cpu + self.pinned_cpus.max(1) - 1;
                c.arg("-c").arg(if last > cpu { format!("{cpu}-{last}") } else { cpu.to_string() }).arg(bin);
                c
            }
            None => Command::new(bin),
        }
    }
}

impl AnyServer {
    /// Starts a fresh server of `kind`.
    pub async fn start(kind: Kind, launch: &Launch) -> anyhow::Result<AnyServer> {
        Ok(match kind {
            Kind::Tessera => AnyServer::Tessera(tessera::Tessera::start(launch)?),
            Kind::Janus => AnyServer::Janus(janus::Janus::start(launch).await?),
        })
    }

    /// The Tessera server, for the scenarios only it can run (the mixer).
    pub fn as_tessera(&self) -> Option<&tessera::Tessera> {
        match self {
            AnyServer::Tessera(t) => Some(t),
            AnyServer::Janus(_) => None,
        }
    }
}

impl Server for AnyServer {
    fn pid(&self) -> u32 {
        match self {
            AnyServer::Tessera(s) => s.pid(),
            AnyServer::Janus(s) => s.pid(),
        }
    }
    async fn publish(&self, user: &str, tag: u32) -> anyhow::Result<(Arc<Publisher>, Keep)> {
        match self {
            AnyServer::Tessera(s) => s.publish(user, tag).await,
            AnyServer::Janus(s) => s.publish(user, tag).await,
        }
    }
    async fn subscribe(&self, user: &str, stream: &str, peer: PeerKind) -> anyhow::Result<(Sub, Keep)> {
        match self {
            AnyServer::Tessera(s) => s.subscribe(user, stream, peer).await,
            AnyServer::Janus(s) => s.subscribe(user, stream, peer).await,
        }
    }
}

/// A fresh scratch directory for one server run.
pub fn scratch_dir(what: &str) -> anyhow::Result<PathBuf> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("tessera-bench-{what}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// user+system CPU seconds of a process (all its threads).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, i.e. 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Resident set size of a process in MiB.
pub fn rss_mb(pid: u32) -> f64 {
    status_field(pid, "VmRSS:").map(|kb| kb / 1024.0).unwrap_or(0.0)
}

/// A line's first number in /proc/<pid>/status (`VmRSS:`, `Threads:`...).
fn status_field(pid: u32, field: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
}

/// Threads of a process (`Threads:` in /proc/<pid>/status).
pub fn threads(pid: u32) -> usize {
    status_field(pid, "Threads:").map(|n| n as usize).unwrap_or(0)
}

/// Open file descriptors of a process (entries of /proc/<pid>/fd).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}
