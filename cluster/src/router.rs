//! Placement: which node serves a room's WebRTC sessions, mixed views and recordings.
//!
//! A room is placed on one webrtc node when its first session needs one, and stays there
//! while that node is listed. The choice follows OWT's `least-used`: among live, not
//! draining nodes with the webrtc role, prefer this portal's region, then nodes that also
//! run the mixer and recorder (a room's views and recordings are then made where its
//! sessions are, with no relay hop), then the fewest WebRTC transports, then this node
//! itself (no hop over NATS), then the lowest CPU. Placements made between two load
//! reports count against the chosen node, so a burst of new rooms spreads. A room stays
//! on its node until that node is found gone (then it is reported to the portal as lost,
//! and placed anew once the portal has ended its sessions) or the room empties.
//!
//! A room whose webrtc node lacks the mixer or recorder role gets those on the least-used
//! node that has it (fewest views, then CPU); streams cross between the nodes over the
//! media relay (`relay.rs`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tessera_core::agent::AgentEvent;
use tessera_core::command::{LocalRouter, MediaNode, MixNode, RecorderNode, Router};
use tessera_core::node::{NodeDirectory, NodeRecord, Role};
use tessera_core::typed_ids::{RoomId, ViewLabel};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

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
    /// Room → the webrtc node it was placed on (as it was then).
    homes: Mutex<HashMap<RoomId, NodeRecord>>,
    /// Home nodes found gone, by how many checks in a row.
    suspects: Mutex<HashMap<String, u32>>,
    /// Rooms reported lost and not yet released by the portal.
    reported: Mutex<HashSet<RoomId>>,
    /// Room → the mixer or recorder node serving it, when its webrtc node lacks that role.
    parts: Mutex<HashMap<(RoomId, Role), NodeRecord>>,
}

/// A home node is given up after this many checks in a row (one per heartbeat, so 8 s and
/// more) found it both unlisted and not listening: a live node that NATS lost for a moment
/// (a NATS restart empties the registry, and nodes reconnect with a backoff of up to a
/// few seconds) must not lose its rooms.
const GONE_AFTER_CHECKS: u32 = 5;

impl ClusterRouter {
    /// A router for the portal of `node`, whose own parts are `local`. When a node
    /// serving rooms disappears from the cluster, each of its rooms is reported to
    /// `portal` as [`AgentEvent::MediaLost`] (and placed anew by its next session).
    pub fn new(node: Arc<ClusterNode>, local: LocalRouter, portal: Option<mpsc::Sender<AgentEvent>>) -> Arc<ClusterRouter> {
        let me = node.this_node();
        let router = Arc::new(ClusterRouter {
            node,
            me: me.id,
            region: me.region,
            local,
            homes: Mutex::new(HashMap::new()),
            suspects: Mutex::new(HashMap::new()),
            reported: Mutex::new(HashSet::new()),
            parts: Mutex::new(HashMap::new()),
        });
        if let Some(portal) = portal {
            let weak = Arc::downgrade(&router);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(crate::HEARTBEAT);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(router) = weak.upgrade() else { return };
                    for (room, node) in router.lost_homes().await {
                        let reason = format!("webrtc node `{node}` is gone");
                        if portal.send(AgentEvent::MediaLost { room, reason }).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
        router
    }

    /// The rooms whose node is gone, each reported once, with that node. Gone: not in the
    /// node list and not listening on NATS, [`GONE_AFTER_CHECKS`] checks in a row. The
    /// room keeps its home until the portal has ended its sessions and calls
    /// [`Router::release`]: a session placed meanwhile would be wiped with the others, so
    /// until then commands go to the dead node and fail at once ("no responders").
    /// While NATS is away nothing can be told and nothing is given up.
    async fn lost_homes(&self) -> Vec<(RoomId, String)> {
        let known = self.node.known_nodes();
        let homes: HashSet<String> = self.homes.lock().unwrap_or_else(|p| p.into_inner()).values().map(|n| n.id.clone()).collect();
        self.suspects.lock().unwrap_or_else(|p| p.into_inner()).retain(|id, _| homes.contains(id));
        let mut gone = HashSet::new();
        for id in homes {
            let listed = known.iter().any(|n| n.id == id);
            let silent = !listed && crate::rpc::media_responds(&self.node.client(), &self.me, &id).await == Some(false);
            let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
            if !silent {
                suspects.remove(&id);
                continue;
            }
            let n = suspects.entry(id.clone()).or_insert(0);
            *n = n.saturating_add(1);
            if *n >= GONE_AFTER_CHECKS {
                gone.insert(id);
            }
        }
        let homes = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        let mut lost = Vec::new();
        for (room, node) in homes.iter().filter(|(_, n)| gone.contains(&n.id)) {
            if reported.insert(room.clone()) {
                warn!(room = %room, node = %node.id, "the webrtc node serving a room is gone");
                lost.push((room.clone(), node.id.clone()));
            }
        }
        lost
    }

    /// The webrtc node serving `room`, placing it if it has none (or its node is gone).
    fn place(&self, room: &RoomId) -> Option<NodeRecord> {
        let mut homes = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        // A room stays where it is until its node is found gone (see `lost_homes`): a node
        // missing from one list read may be alive, with the room's sessions.
        if let Some(home) = homes.get(room) {
            return Some(home.clone());
        }
        let known = self.node.known_nodes();
        let missing = |n: &NodeRecord| [Role::Mixer, Role::Recorder].iter().filter(|r| !n.roles.contains(r)).count();
        let chosen = known
            .iter()
            .filter(|n| n.roles.contains(&Role::Webrtc) && !n.draining)
            .min_by(|a, b| {
                let key = |n: &NodeRecord| (!self.region.is_empty() && n.region != self.region, missing(n), n.load.transports, n.id != self.me);
                key(a).cmp(&key(b)).then(a.load.cpu_pct.total_cmp(&b.load.cpu_pct))
            })?
            .clone();
        homes.insert(room.clone(), chosen.clone());
        drop(homes);
        self.node.count_placement(&chosen.id);
        info!(room = %room, node = %chosen.id, "room placed on a webrtc node");
        Some(chosen)
    }

    /// The node serving `role` (mixer, recorder) for `room`: its webrtc node when that has
    /// the role (no relay hop), else the least-used node with it (fewest views, then CPU;
    /// streams cross over the relay), kept for the room until it is released.
    fn place_part(&self, room: &RoomId, role: Role) -> Option<NodeRecord> {
        let home = self.place(room);
        if let Some(home) = home.filter(|n| n.roles.contains(&role)) {
            return Some(home);
        }
        let mut parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        let key = (room.clone(), role);
        if let Some(n) = parts.get(&key) {
            return Some(n.clone());
        }
        let known = self.node.known_nodes();
        let chosen = known
            .iter()
            .filter(|n| n.roles.contains(&role) && !n.draining)
            .min_by(|a, b| {
                let key = |n: &NodeRecord| (!self.region.is_empty() && n.region != self.region, n.load.views, n.id != self.me);
                key(a).cmp(&key(b)).then(a.load.cpu_pct.total_cmp(&b.load.cpu_pct))
            })?
            .clone();
        info!(room = %room, node = %chosen.id, role = ?role, "room's media part placed on a node without its webrtc sessions");
        parts.insert(key, chosen.clone());
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
        let node = self.place_part(room, Role::Mixer)?;
        if self.is_me(&node) {
            return self.local.mixer.clone();
        }
        Some(Arc::new(RemoteMixer::new(self.node.client(), &self.me, &node.id)))
    }

    fn recorder_for(&self, room: &RoomId) -> Option<Arc<dyn RecorderNode>> {
        let node = self.place_part(room, Role::Recorder)?;
        if self.is_me(&node) {
            return self.local.recorder.clone();
        }
        Some(Arc::new(RemoteRecorder::new(self.node.client(), &self.me, &node.id)))
    }

    fn release(&self, room: &RoomId) {
        self.reported.lock().unwrap_or_else(|p| p.into_inner()).remove(room);
        self.parts.lock().unwrap_or_else(|p| p.into_inner()).retain(|(r, _), _| r != room);
        if let Some(node) = self.homes.lock().unwrap_or_else(|p| p.into_inner()).remove(room) {
            debug!(room = %room, node = %node.id, "room no longer placed (empty)");
        }
    }

    fn recorder_nodes(&self) -> Vec<Arc<dyn RecorderNode>> {
        let mut out: Vec<Arc<dyn RecorderNode>> = self.local.recorder.iter().cloned().collect();
        for n in self.node.known_nodes().into_iter().filter(|n| n.roles.contains(&Role::Recorder) && !self.is_me(n)) {
            out.push(Arc::new(RemoteRecorder::new(self.node.client(), &self.me, &n.id)));
        }
        out
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
