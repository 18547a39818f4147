//! The nodes of a deployment, as the management API lists them: one in a single process,
//! every registered node in a cluster (`tessera-cluster` keeps them in NATS).

use serde::{Deserialize, Serialize};

/// What a node does. A single process has every role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Participants' signaling (and the management API).
    Portal,
    /// WebRTC sessions: the SFU.
    Webrtc,
    /// Mixed views.
    Mixer,
    /// Recordings.
    Recorder,
}

impl Role {
    /// Every role, in the order they are listed.
    pub const ALL: [Role; 4] = [Role::Portal, Role::Webrtc, Role::Mixer, Role::Recorder];

    /// The role's name (`portal`, `webrtc`, `mixer`, `recorder`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Portal => "portal",
            Role::Webrtc => "webrtc",
            Role::Mixer => "mixer",
            Role::Recorder => "recorder",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| format!("`{s}` is not a role (portal, webrtc, mixer, recorder)"))
    }
}

/// How busy a node is, as it last reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeLoad {
    /// CPU the process used since the previous report, in percent of one core.
    pub cpu_pct: f64,
    /// WebRTC transports (peer connections).
    pub transports: usize,
    /// Published streams (forward and mixed).
    pub publications: usize,
    /// Subscriptions.
    pub subscriptions: usize,
    /// Mixed views running.
    pub views: usize,
}

/// One node as the deployment knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// Its id (`cluster.node_id`).
    pub id: String,
    /// Tells this run of the node from an earlier one with the same id.
    pub instance: String,
    /// What it does.
    pub roles: Vec<Role>,
    /// Where other nodes send it relayed media; empty when it relays nothing.
    pub relay_addr: String,
    /// Its region label.
    pub region: String,
    /// It is draining: no new sessions.
    pub draining: bool,
    /// Its latest load report.
    pub load: NodeLoad,
    /// When it started (ms since the Unix epoch).
    pub started_ms: u64,
    /// When it last reported (ms since the Unix epoch).
    pub reported_ms: u64,
    /// The Tessera version it runs.
    pub version: String,
}

/// Milliseconds since the Unix epoch (the node records' clock).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl NodeRecord {
    /// A node starting now: a fresh instance id, no load yet, not draining.
    pub fn starting(id: String, roles: Vec<Role>, relay_addr: String, region: String) -> NodeRecord {
        let now = now_ms();
        NodeRecord {
            id,
            instance: format!("{:016x}", rand::random::<u64>()),
            roles,
            relay_addr,
            region,
            draining: false,
            load: NodeLoad::default(),
            started_ms: now,
            reported_ms: now,
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// Why the node list could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the node registry is unreachable: {0}")]
pub struct NodeDirectoryError(pub String);

/// The nodes of this deployment.
#[async_trait::async_trait]
pub trait NodeDirectory: Send + Sync {
    /// This node, with its current load.
    fn this_node(&self) -> NodeRecord;
    /// Every live node, this one included, by id.
    async fn nodes(&self) -> Result<Vec<NodeRecord>, NodeDirectoryError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_and_serialize() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
            assert_eq!(serde_json::to_value(r).unwrap(), serde_json::json!(r.as_str()));
        }
        assert!("sfu".parse::<Role>().unwrap_err().contains("not a role"));
    }

    #[test]
    fn record_round_trips() {
        let n = NodeRecord {
            id: "n1".into(),
            instance: "abc".into(),
            roles: Role::ALL.to_vec(),
            relay_addr: "127.0.2.1".into(),
            region: "eu".into(),
            draining: false,
            load: NodeLoad { cpu_pct: 12.5, transports: 3, publications: 1, subscriptions: 2, views: 1 },
            started_ms: 1,
            reported_ms: 2,
            version: "0.1.0".into(),
        };
        let v = serde_json::to_value(&n).unwrap();
        assert_eq!(v["load"]["cpuPct"], 12.5);
        assert_eq!(v["relayAddr"], "127.0.2.1");
        assert_eq!(serde_json::from_value::<NodeRecord>(v).unwrap(), n);
    }
}
