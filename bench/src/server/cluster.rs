//! Tessera as a cluster under test: `nats-server`, a portal-only node, and one or more
//! webrtc nodes, each webrtc node pinned to a CPU of its own where the machine has one.
//! Participants join through the portal node, which places each transport on the
//! least-used webrtc node (`room_spread = 0`), so subscribers alternate between the webrtc
//! nodes and the publication crosses to the others once, over the media relay.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tessera_client::peer::Publisher;

use super::tessera::Tessera;
use super::{Keep, Launch, PeerKind, Process, Server, Sub, scratch_dir};

/// A running cluster: the processes stop when it is dropped (webrtc nodes, portal, NATS).
pub struct Cluster {
    /// The webrtc nodes, whose CPU and memory the scenario measures.
    webrtc: Vec<Process>,
    /// The portal node, which the load generator talks to.
    portal: Tessera,
    _nats: Process,
}

/// The CPUs the webrtc nodes go on: one each after the load generator's (CPU 0) while
/// the machine has them; past that they share (where no CPU quota stands in; see
/// `shared_cpu_quota` in main.rs).
pub fn webrtc_cpus(nodes: usize, cpus: usize, pinned: bool) -> Vec<Option<usize>> {
    (0..nodes).map(|i| pinned.then(|| (i + 1) % cpus.max(1))).collect()
}

fn command(bin: &Path, cpu: Option<usize>) -> Command {
    match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts `nats-server` with JetStream on a free loopback port; returns it and its URL.
fn start_nats() -> anyhow::Result<(Process, String)> {
    let dir = scratch_dir("nats")?;
    let port = free_port()?;
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.join("store"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nats-server (Debian package `nats-server`; scripts/install-deps.sh --test)")?;
    let process = Process::new(child, dir, None, "nats")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nats-server did not listen on 127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((process, format!("nats://127.0.0.1:{port}")))
}

/// Starts a webrtc-only node and waits until it serves.
fn start_webrtc(launch: &Launch, nats: &str, id: &str, cpu: Option<usize>) -> anyhow::Result<Process> {
    let dir = scratch_dir(id)?;
    let cfg = dir.join("bench.toml");
    let toml = format!(
        "[webrtc]\nbind_ip = \"{}\"\nworkers = {}\n[cluster]\nnode_id = \"{id}\"\nroles = [\"webrtc\"]\n[log]\nlevel = \"warn\"\n",
        launch.server_ip, launch.workers
    );
    std::fs::write(&cfg, toml)?;
    let mut child = command(&launch.tessera_bin, cpu)
        .args(["serve", "--cluster", nats, "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", launch.tessera_bin.display()))?;
    let stdout = child.stdout.take().context("node stdout")?;
    let process = Process::new(child, dir, launch.cpu_quota, id)?;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let Some(Ok(line)) = lines.next() else { bail!("webrtc node {id} exited before serving") };
        if line.ends_with("(no portal)") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Ok(process)
}

impl Cluster {
    /// NATS, then `cpus.len()` webrtc nodes (on those CPUs), then the portal node (on
    /// `portal_cpu`, or wherever the load generator may run); ready when the portal lists
    /// every webrtc node.
    pub async fn start(launch: &Launch, cpus: &[Option<usize>], portal_cpu: Option<usize>) -> anyhow::Result<Cluster> {
        let (nats, url) = start_nats()?;
        let mut webrtc = Vec::new();
        for (i, cpu) in cpus.iter().enumerate() {
            webrtc.push(start_webrtc(launch, &url, &format!("w{}", i + 1), *cpu)?);
        }
        let portal_cfg = format!("[cluster]\nnode_id = \"portal\"\nroles = [\"portal\"]\nroom_spread = 0\nnats_url = \"{url}\"\n");
        let portal_launch = Launch { pin_cpu: portal_cpu, cpu_quota: None, ..launch.clone() };
        let portal = Tessera::start_with_config(&portal_launch, &portal_cfg)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let listed = portal.api(reqwest::Method::GET, "/v1/cluster/nodes", None).await.ok();
            let count = listed
                .as_ref()
                .and_then(|v| v["nodes"].as_array())
                .map_or(0, |n| n.iter().filter(|n| n["roles"] == serde_json::json!(["webrtc"])).count());
            if count == cpus.len() {
                break;
            }
            if Instant::now() > deadline {
                bail!("the portal listed {count} of {} webrtc nodes after 15 s", cpus.len());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(Cluster { webrtc, portal, _nats: nats })
    }
}

impl Server for Cluster {
    fn pid(&self) -> u32 {
        self.webrtc.first().map_or(0, |p| p.child.id())
    }
    fn pids(&self) -> Vec<u32> {
        self.webrtc.iter().map(|p| p.child.id()).collect()
    }
    async fn publish(&self, user: &str, tag: u32) -> anyhow::Result<(Arc<Publisher>, Keep)> {
        self.portal.publish(user, tag).await
    }
    async fn subscribe(&self, user: &str, stream: &str, peer: PeerKind) -> anyhow::Result<(Sub, Keep)> {
        self.portal.subscribe(user, stream, peer).await
    }
}
