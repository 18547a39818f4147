//! Several network namespaces on one bridge, every address in 127.0.0.0/8
//! (`../shared/build-notes.md` §6): the test's own namespace holds the bridge `br0` at
//! 127.0.2.254; node N gets a namespace of its own at 127.0.2.N, joined to the bridge by
//! a veth pair. Loopback is narrowed to 127.0.0.1/32 everywhere, so 127.0.2.x is not
//! local and crosses the bridge, and `route_localnet` lets loopback-range addresses travel
//! on a link. Call [`Bridge::new`] only inside the test's own namespace
//! ([`super::in_own_netns`]).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The test's address on the bridge.
pub const HOST: &str = "127.0.2.254";

/// The bridge and the nodes' namespaces (each held by a `sleep`, ended on drop, or after
/// 15 minutes if the test is killed).
pub struct Bridge {
    holders: Vec<(u8, Child)>,
}

fn sh(script: &str) {
    let out = Command::new("sh").args(["-c", script]).output().expect("sh");
    assert!(out.status.success(), "`{script}` failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Commands that narrow loopback and let 127/8 travel on `dev`.
fn narrow(dev: &str) -> String {
    format!(
        "ip link set lo up && ip addr del 127.0.0.1/8 dev lo && ip addr add 127.0.0.1/32 dev lo && \
         echo 1 > /proc/sys/net/ipv4/conf/all/route_localnet && echo 1 > /proc/sys/net/ipv4/conf/{dev}/route_localnet"
    )
}

impl Bridge {
    /// `br0` in this namespace, at [`HOST`].
    pub fn new() -> Bridge {
        // Never on the host: only in a namespace of the test's own.
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        let outer = std::env::var_os(super::OUTER_NETNS).map(std::path::PathBuf::from);
        assert!(outer.is_some_and(|o| o != ours), "Bridge::new outside a network namespace of the test's own");
        sh(&format!("ip link add br0 type bridge && ip link set br0 up && {} && ip addr add {HOST}/24 dev br0", narrow("br0")));
        Bridge { holders: Vec::new() }
    }

    /// A namespace for node `n` at 127.0.2.`n`, on the bridge.
    pub fn add(&mut self, n: u8) {
        // No inherited output: a holder left behind must not keep the test's pipes open.
        // Bounded: a holder orphaned by a killed test ends by itself.
        let holder = Command::new("unshare").args(["-n", "sleep", "900"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("unshare");
        let pid = holder.id();
        // Held (and ended on drop) before anything below can fail.
        self.holders.push((n, holder));
        // `unshare` makes the namespace, then becomes `sleep`: wait until it has one of its own.
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{pid}/ns/net")).ok().is_none_or(|ns| ns == ours) {
            assert!(Instant::now() < deadline, "node {n}'s namespace never appeared");
            std::thread::sleep(Duration::from_millis(5));
        }
        sh(&format!("ip link add v{n} type veth peer name eth0 netns {pid} && ip link set v{n} master br0 up"));
        let inside = format!("{} && ip addr add 127.0.2.{n}/24 dev eth0 && ip link set eth0 up", narrow("eth0"));
        let out = Command::new("nsenter").args(["-t", &pid.to_string(), "-n", "sh", "-c", &inside]).output().expect("nsenter");
        assert!(out.status.success(), "setting up node {n}'s namespace: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The command prefix that runs a program in node `n`'s namespace.
    pub fn enter(&mut self, n: u8) -> Vec<String> {
        let holder = self.holders.iter_mut().find(|(k, _)| *k == n).map(|(_, c)| c).expect("node added");
        // A holder that ended would leave its pid to anything (nsenter into another namespace).
        assert!(holder.try_wait().ok().flatten().is_none(), "node {n}'s namespace holder ended");
        let pid = holder.id();
        vec!["nsenter".into(), "-t".into(), pid.to_string(), "-n".into()]
    }

    /// Node `n`'s address.
    pub fn ip(n: u8) -> String {
        format!("127.0.2.{n}")
    }

    /// Takes node `n`'s link down (`up = false`) or up again.
    pub fn link(&self, n: u8, up: bool) {
        sh(&format!("ip link set v{n} {}", if up { "up" } else { "down" }));
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        for (_, c) in &mut self.holders {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
