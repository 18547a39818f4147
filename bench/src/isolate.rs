//! Keeps every load run on loopback: the bench re-executes itself inside a fresh network
//! namespace holding only `lo` and a bridge `b0` with two loopback-range addresses
//! (127.0.1.1 for the servers, 127.0.1.2 for the load generator — Janus's ICE library
//! gathers nothing on `lo` itself). Nothing in there can reach another host, whatever a
//! server's ICE gathering would like to do. When the machine has two CPUs or more, the
//! load generator is pinned to CPU 0 and the servers to CPU 1, so they don't compete.

use std::process::Command;

/// Set in the re-executed bench: `pin` when servers are to be pinned to CPU 1.
pub const ENV: &str = "TESSERA_BENCH_ISOLATED";

/// Where the bench runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// Inside the bench's own network namespace; servers pinned when `pinned`.
    Namespace {
        /// Servers on CPU 1, load generator on CPU 0.
        pinned: bool,
    },
    /// In the host's namespace, everything bound to 127.0.0.1 (no root for a namespace).
    HostLoopback,
}

const SETUP: &str = "set -e
ip link set lo up
ip link add b0 type bridge
ip addr add 127.0.1.1/32 dev b0
ip addr add 127.0.1.2/32 dev b0
ip link set b0 up
exec \"$@\"";

/// CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// CPUs the machine has online (the pinned bench itself may run on one only).
pub fn machine_cpus() -> usize {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    // A list of ranges: "0-1", "0,2-3".
    let counted: usize = online
        .trim()
        .split(',')
        .filter_map(|part| match part.split_once('-') {
            Some((a, b)) => Some(b.parse::<usize>().ok()?.checked_sub(a.parse::<usize>().ok()?)? + 1),
            None => part.parse::<usize>().ok().map(|_| 1),
        })
        .sum();
    if counted == 0 { cpus() } else { counted }
}

/// Lets every thread of this process (the load generator, pinned to CPU 0 at entry) run
/// on any of the machine's `cpus` CPUs; what it starts from now on inherits that.
pub fn unpin_self(cpus: usize) -> anyhow::Result<()> {
    let list = format!("0-{}", cpus.saturating_sub(1));
    let pid = std::process::id().to_string();
    let status = Command::new("taskset").args(["-a", "-p", "-c", &list, &pid]).stdout(std::process::Stdio::null()).status()?;
    if !status.success() {
        anyhow::bail!("taskset -a -p -c {list} {pid} failed ({status})");
    }
    Ok(())
}

fn works(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd).args(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Where this process is. When it is not isolated yet and can be, re-executes it inside a
/// namespace and returns the child's exit code for the caller to exit with.
pub fn enter(allow_pin: bool) -> anyhow::Result<Result<Place, i32>> {
    if let Ok(v) = std::env::var(ENV) {
        return Ok(Ok(Place::Namespace { pinned: v == "pin" }));
    }
    if !works("unshare", &["-n", "true"]) || !works("ip", &["-V"]) {
        return Ok(Ok(Place::HostLoopback));
    }
    let pin = allow_pin && cpus() >= 2 && works("taskset", &["-c", "0", "true"]);
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new("unshare");
    cmd.args(["-n", "--", "sh", "-c", SETUP, "sh"]);
    if pin {
        cmd.args(["taskset", "-c", "0"]);
    }
    cmd.arg(exe).args(std::env::args_os().skip(1)).env(ENV, if pin { "pin" } else { "yes" });
    let status = cmd.status()?;
    Ok(Err(status.code().unwrap_or(1)))
}
