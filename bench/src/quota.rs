//! A CPU budget for one server process, smaller than a core: a cgroup of its own with a
//! CFS bandwidth limit (cgroup v1's `cpu` controller, or v2's `cpu.max`).
//!
//! The scaling scenarios need each node (or worker) on a core of its own and the load
//! generator on another. A machine with fewer CPUs than that can still tell whether work
//! splits evenly: each node gets the same fraction of one CPU, all on the servers' CPU,
//! and the capacity is where a node's budget runs out. The nodes then share that core's
//! caches, which a node with a core of its own would not, so the proxy errs against the
//! larger cluster.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The CFS period: short, so a throttled process waits at most a few milliseconds (the
/// ramp judges p99 latency; the default 100 ms period would stall it for tens).
const PERIOD_US: u64 = 10_000;

/// A process's cgroup; removed when dropped (after the process has ended).
pub struct CpuQuota {
    dir: PathBuf,
}

/// Where cgroups with a CPU limit can be made, and how.
enum Hierarchy {
    /// cgroup v1: `cpu.cfs_period_us` and `cpu.cfs_quota_us`.
    V1(PathBuf),
    /// cgroup v2: `cpu.max` ("quota period").
    V2(PathBuf),
}

impl Hierarchy {
    /// The folder the bench's cgroups are made in.
    fn root(&self) -> &Path {
        match self {
            Hierarchy::V1(root) | Hierarchy::V2(root) => root,
        }
    }
}

fn hierarchy() -> Option<Hierarchy> {
    let v1 = Path::new("/sys/fs/cgroup/cpu");
    if v1.join("cpu.cfs_quota_us").exists() {
        return Some(Hierarchy::V1(v1.to_path_buf()));
    }
    let v2 = Path::new("/sys/fs/cgroup");
    let controllers = std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
    controllers.split_whitespace().any(|c| c == "cpu").then(|| Hierarchy::V2(v2.to_path_buf()))
}

fn write(path: &Path, value: &str) -> anyhow::Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing `{value}` to {}", path.display()))
}

impl CpuQuota {
    /// An empty cgroup limited to `fraction` of one CPU; `name` and `id` tell it apart.
    fn make(fraction: f64, name: &str, id: u32) -> anyhow::Result<CpuQuota> {
        if !(0.1..=64.0).contains(&fraction) {
            bail!("a CPU quota of {fraction} is outside 0.1..=64 CPUs (the kernel takes at least 1 ms of each 10 ms period)");
        }
        let Some(h) = hierarchy() else { bail!("no cgroup CPU controller (needs /sys/fs/cgroup/cpu or cgroup v2 with `cpu`, as root)") };
        let quota_us = (fraction * PERIOD_US as f64).round() as u64;
        let leaf = format!("{PREFIX}{}-{name}-{id}", std::process::id());
        let dir = h.root().join(leaf);
        std::fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        let quota = CpuQuota { dir };
        match &h {
            Hierarchy::V1(_) => {
                write(&quota.dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(&quota.dir.join("cpu.cfs_quota_us"), &quota_us.to_string())?;
            }
            Hierarchy::V2(root) => {
                // The root must hand the controller down (the real root may hold processes;
                // a container's may not, and then this fails with the reason).
                write(&root.join("cgroup.subtree_control"), "+cpu")?;
                write(&quota.dir.join("cpu.max"), &format!("{quota_us} {PERIOD_US}"))?;
            }
        }
        Ok(quota)
    }

    /// Limits process `pid` (all its threads, and those it starts later) to `fraction` of
    /// one CPU. `name` tells the cgroup apart in listings.
    pub fn apply(pid: u32, fraction: f64, name: &str) -> anyhow::Result<CpuQuota> {
        let quota = CpuQuota::make(fraction, name, pid)?;
        // Moves every thread of the process.
        write(&quota.dir.join("cgroup.procs"), &pid.to_string())?;
        Ok(quota)
    }

    /// Limits each thread of process `pid` whose name starts with `prefix` to `fraction`
    /// of one CPU, each in a cgroup of its own (cgroup v1, which places threads one by
    /// one); the process's other threads stay as they are. Returns one per thread found.
    pub fn apply_to_threads(pid: u32, prefix: &str, fraction: f64) -> anyhow::Result<Vec<CpuQuota>> {
        if matches!(hierarchy(), Some(Hierarchy::V2(_))) {
            bail!("a CPU quota per thread needs cgroup v1's `cpu` controller (this machine has cgroup v2)");
        }
        let mut quotas = Vec::new();
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).with_context(|| format!("listing the threads of {pid}"))?;
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else { continue };
            if !comm.trim_end().starts_with(prefix) {
                continue;
            }
            let quota = CpuQuota::make(fraction, comm.trim_end(), tid)?;
            write(&quota.dir.join("tasks"), &tid.to_string())?;
            quotas.push(quota);
        }
        Ok(quotas)
    }
}

/// Names of the bench's cgroups start with this, then the bench's pid.
const PREFIX: &str = "tessera-bench-";

/// Whether this machine lets the bench make CPU quotas: makes one and removes it.
pub fn available() -> bool {
    CpuQuota::make(0.5, "probe", 0).is_ok()
}

/// Removes what an earlier bench stopped by a signal left behind: empty cgroups named
/// after a bench process that is gone.
pub fn sweep() {
    let Some(h) = hierarchy() else { return };
    let Ok(entries) = std::fs::read_dir(h.root()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        // The process was killed and reaped before this runs (see `server::Process`);
        // its cgroup empties a moment later.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("tessera-bench: could not remove cgroup {}", self.dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::{Duration, Instant};

    /// A process spinning on a CPU gets no more than its quota (the kernel enforces it; the
    /// bound holds on a busy machine too), and its cgroup goes with it.
    #[test]
    fn a_spinning_process_is_held_to_its_quota() {
        // The effective uid: the second number of `Uid:` in /proc/self/status.
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let root = status.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2)) == Some("0");
        if hierarchy().is_none() || !root {
            eprintln!("skipped: needs root and a cgroup CPU controller");
            return;
        }
        // Killed however the test ends, so a failed assertion leaves nothing spinning.
        struct Spinner(std::process::Child);
        impl Drop for Spinner {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let child = Spinner(Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap());
        let pid = child.0.id();
        let quota = CpuQuota::apply(pid, 0.2, "test").unwrap();
        let dir = quota.dir.clone();
        let leaf = dir.file_name().unwrap().to_str().unwrap().to_string();
        assert!(std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap().lines().any(|l| l.ends_with(&leaf)));
        let before = crate::server::cpu_seconds(pid);
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(1500));
        let spent = crate::server::cpu_seconds(pid) - before;
        let wall = start.elapsed().as_secs_f64();
        drop(child);
        drop(quota);
        // 0.2 of a CPU for 1.5 s is 0.3 CPU seconds (the tick counts round to 10 ms).
        assert!(spent > 0.1 && spent < 0.2 * wall + 0.1, "{spent} CPU seconds in {wall} s");
        assert!(!dir.exists(), "{} left behind", dir.display());
        assert!(CpuQuota::apply(pid, 0.01, "test").is_err());

        // One thread by name, in a cgroup of its own (cgroup v1 only).
        if matches!(hierarchy(), Some(Hierarchy::V1(_))) {
            let child = Spinner(Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap());
            let pid = child.0.id();
            let quotas = CpuQuota::apply_to_threads(pid, "sh", 0.2).unwrap();
            assert_eq!(quotas.len(), 1);
            assert!(CpuQuota::apply_to_threads(pid, "no-such-thread", 0.2).unwrap().is_empty());
            let before = crate::server::cpu_seconds(pid);
            std::thread::sleep(Duration::from_millis(1000));
            let spent = crate::server::cpu_seconds(pid) - before;
            assert!(spent > 0.05 && spent < 0.35, "{spent} CPU seconds in 1 s");
        }
    }
}
