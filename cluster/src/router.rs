//! Placement: which node serves a room's WebRTC sessions, mixed views and recordings.
//!
//! A room is placed on one webrtc node when its first session needs one, and stays there
//! while that node is listed. The choice follows OWT's `least-used`: among live, not
//! draining nodes with the webrtc role, prefer this portal's region, then nodes that also
//! run the mixer and recorder (they read streams from the SFU of their own process until
//! media is relayed between nodes, so a room's views and recordings are made where its
//! sessions are), then the fewest WebRTC transports, then this node itself (no hop over
//! NATS), then the lowest CPU. Placements made
//! between two load reports count against the chosen node, so a burst of new rooms
//! spreads. A room whose node is gone is placed anew by its next session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tessera_core::command::{LocalRouter, MediaNode, MixNode, RecorderNode, Router};
use tessera_core::node::{NodeDirectory, NodeRecord, Role};
use tessera_core::typed_ids::{RoomId, ViewLabel};
use tracing::info;

use crate::ClusterNode;
use crate::rpc::{RemoteMedia, RemoteMixer, RemoteRecorder};

/// Finds a room's nodes in the cluster: this process's own parts when placed here,
/// proxies over NATS otherwise.
pub struct ClusterRouter {
    node: Arc<ClusterNode>,
    me: String,
    region: String,
    /// This node's own parts (none where it lacks the role).
    local: LocalRouter,
    /// Room → the webrtc node it was placed on.
    homes: Mutex<HashMap<RoomId, String>>,
}

impl ClusterRouter {
    /// A router for the portal of `node`, whose own parts are `local`.
    pub fn new(node: Arc<ClusterNode>, local: LocalRouter) -> ClusterRouter {
        let me = node.this_node();
        ClusterRouter { node, me: me.id, region: me.region, local, homes: Mutex::new(HashMap::new()) }
    }

    /// The webrtc node serving `room`, placing it if it has none (or its node is gone).
    fn place(&self, room: &RoomId) -> Option<NodeRecord> {
        let known = self.node.known_nodes();
        let mut homes = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(home) = homes.get(room).and_then(|id| known.iter().find(|n| &n.id == id)) {
            return Some(home.clone());
        }
        let missing = |n: &NodeRecord| [Role::Mixer, Role::Recorder].iter().filter(|r| !n.roles.contains(r)).count();
        let chosen = known
            .iter()
            .filter(|n| n.roles.contains(&Role::Webrtc) && !n.draining)
            .min_by(|a, b| {
                let key = |n: &NodeRecord| (!self.region.is_empty() && n.region != self.region, missing(n), n.load.transports, n.id != self.me);
                key(a).cmp(&key(b)).then(a.load.cpu_pct.total_cmp(&b.load.cpu_pct))
            })?
            .clone();
        homes.insert(room.clone(), chosen.id.clone());
        drop(homes);
        self.node.count_placement(&chosen.id);
        info!(room = %room, node = %chosen.id, "room placed on a webrtc node");
        Some(chosen)
    }

    fn is_me(&self, node: &NodeRecord) -> bool {
        node.id == self.me
    }
}

impl Router for ClusterRouter {
    fn agent_for(&self, room: &RoomId) -> Option<Arc<dyn MediaNode>> {
        let node = self.place(room)?;
        if self.is_me(&node) {
            return self.local.agent.clone();
        }
        Some(Arc::new(RemoteMedia::new(self.node.client(), &self.me, &node.id)))
    }

    fn mixer_for(&self, room: &RoomId, _view: &ViewLabel) -> Option<Arc<dyn MixNode>> {
        let node = self.place(room).filter(|n| n.roles.contains(&Role::Mixer))?;
        if self.is_me(&node) {
            return self.local.mixer.clone();
        }
        Some(Arc::new(RemoteMixer::new(self.node.client(), &self.me, &node.id)))
    }

    fn recorder_for(&self, room: &RoomId) -> Option<Arc<dyn RecorderNode>> {
        let node = self.place(room).filter(|n| n.roles.contains(&Role::Recorder))?;
        if self.is_me(&node) {
            return self.local.recorder.clone();
        }
        Some(Arc::new(RemoteRecorder::new(self.node.client(), &self.me, &node.id)))
    }

    fn media_nodes(&self) -> Vec<Arc<dyn MediaNode>> {
        let mut out: Vec<Arc<dyn MediaNode>> = Vec::new();
        for n in self.node.known_nodes().into_iter().filter(|n| n.roles.contains(&Role::Webrtc)) {
            if self.is_me(&n) {
                out.extend(self.local.agent.clone());
            } else {
                out.push(Arc::new(RemoteMedia::new(self.node.client(), &self.me, &n.id)));
            }
        }
        out
    }
}
