//! This process as a node: its id, its load, and the node list the management API shows
//! when there is no cluster (this node alone).

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use tessera_core::node::{NodeDirectory, NodeDirectoryError, NodeLoad, NodeRecord, Role, now_ms};

/// The node id: `cluster.node_id`, else the one kept in `<data_dir>/node.id` (generated
/// there at first start, so a node keeps its id across restarts).
pub fn node_id(configured: &str, data_dir: &Path) -> anyhow::Result<String> {
    if !configured.is_empty() {
        return Ok(configured.to_string());
    }
    let file = data_dir.join("node.id");
    match std::fs::read_to_string(&file) {
        Ok(text) => {
            let id = text.trim();
            anyhow::ensure!(
                tessera_config::valid_node_id(id),
                "{}: `{}` is not a node id (letters, digits, - and _)",
                file.display(),
                id.escape_debug()
            );
            Ok(id.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = format!("node-{:08x}", rand::random::<u32>());
            std::fs::write(&file, format!("{id}\n")).with_context(|| format!("writing {}", file.display()))?;
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
    }
}

/// CPU this process used between two samples, in percent of one core.
pub struct CpuMeter {
    last: Mutex<(Instant, f64)>,
}

impl CpuMeter {
    /// A meter starting now.
    pub fn new() -> CpuMeter {
        CpuMeter { last: Mutex::new((Instant::now(), process_cpu_seconds())) }
    }

    /// Percent of one core since the previous sample.
    pub fn sample(&self) -> f64 {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let (now, cpu) = (Instant::now(), process_cpu_seconds());
        let wall = now.duration_since(last.0).as_secs_f64();
        let pct = if wall > 0.0 { (cpu - last.1).max(0.0) / wall * 100.0 } else { 0.0 };
        *last = (now, cpu);
        (pct * 10.0).round() / 10.0
    }
}

/// user + system CPU seconds of this process (Linux `/proc/self/stat`; 0 elsewhere).
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime: fields 14 and 15 of stat, i.e. 12 and 13 after the name; 100 ticks a second on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

/// The node list of a single process: this node, with every role.
pub struct LocalNode {
    record: Mutex<NodeRecord>,
    load: Box<dyn Fn() -> NodeLoad + Send + Sync>,
}

impl LocalNode {
    /// This node as `id`, its load measured by `load` when listed.
    pub fn new(id: String, load: Box<dyn Fn() -> NodeLoad + Send + Sync>) -> LocalNode {
        let record = NodeRecord::starting(id, Role::ALL.to_vec(), String::new(), String::new());
        LocalNode { record: Mutex::new(record), load }
    }
}

#[async_trait::async_trait]
impl NodeDirectory for LocalNode {
    fn this_node(&self) -> NodeRecord {
        let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
        r.load = (self.load)();
        r.reported_ms = now_ms();
        r.clone()
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, NodeDirectoryError> {
        Ok(vec![self.this_node()])
    }
}
