//! Placement: which node serves each WebRTC transport, mixed view and recording of a room.
//!
//! A room gets a home, a webrtc node, when its first session needs one: OWT's
//! `least-used` among live, not draining nodes with the webrtc role, preferring this
//! portal's region, then nodes that also run the mixer and recorder (a room's views and
//! recordings are then made where its sessions are, with no relay hop), then the fewest
//! WebRTC transports, then this node itself (no hop over NATS), then the lowest CPU.
//! Each new transport (peer connection) of the room goes to the home too, until the home
//! holds `room_spread` more transports than the least-used webrtc node: then to that node
//! (0: every transport to the least-used node). A transport stays on its node; streams
//! cross between nodes over the media relay (`relay/`). Placements made between two load
//! reports count against the chosen node, so a burst spreads.
//!
//! A room whose home lacks the mixer or recorder role gets those on the least-used node
//! that has it (fewest views, then CPU). Everything is forgotten when the room empties.
//! A node found gone (see [`GONE_AFTER_SILENCE`]) loses its transports: the portal is told
//! which ([`AgentEvent::MediaLost`]), and the room's next transports go elsewhere.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tessera_core::agent::{AgentError, AgentEvent, LostTransport};
use tessera_core::command::{AgentCommand, AgentReply, LocalRouter, MediaNode, MixNode, RecorderNode, Router};
use tessera_core::node::{NodeDirectory, NodeRecord, Role};
use tessera_core::typed_ids::{ParticipantId, RoomId, SessionId, TransportId, ViewLabel};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::ClusterNode;
use crate::rpc::{RemoteMedia, RemoteMixer, RemoteRecorder};

/// Where one transport of a room runs.
struct PlacedTransport {
    node: String,
    participant: ParticipantId,
    sessions: HashSet<SessionId>,
    /// When it was placed.
    at: Instant,
}

/// Where a room's parts run.
#[derive(Default)]
struct RoomPlacement {
    /// The room's first webrtc node (see the module doc).
    home: Option<NodeRecord>,
    transports: HashMap<TransportId, PlacedTransport>,
    /// Each session's transport.
    sessions: HashMap<SessionId, TransportId>,
    /// The mixer or recorder node, when the home lacks that role.
    parts: HashMap<Role, NodeRecord>,
    /// Transports lost with their node (not placed again under the same id).
    lost: HashSet<TransportId>,
}

impl RoomPlacement {
    fn node_of_session(&self, session: &str) -> Option<String> {
        self.sessions.get(session).and_then(|t| self.transports.get(t)).map(|t| t.node.clone())
    }

    fn forget_session(&mut self, session: &str) {
        if let Some(t) = self.sessions.remove(session)
            && let Some(placed) = self.transports.get_mut(&t)
        {
            placed.sessions.remove(session);
        }
    }

    /// Forgets a transport and its sessions.
    fn remove_transport(&mut self, id: &TransportId) -> Option<PlacedTransport> {
        let t = self.transports.remove(id)?;
        for s in &t.sessions {
            self.sessions.remove(s);
        }
        Some(t)
    }

    /// Forgets the transports matching `which`; returns them with their ids.
    fn remove_transports(&mut self, which: impl Fn(&PlacedTransport) -> bool) -> Vec<(TransportId, PlacedTransport)> {
        let ids: Vec<TransportId> = self.transports.iter().filter(|(_, t)| which(t)).map(|(id, _)| id.clone()).collect();
        ids.into_iter().filter_map(|id| self.remove_transport(&id).map(|t| (id, t))).collect()
    }

    /// Everything on `node` is over: its transports (returned) and, if it made the room's
    /// views, those (`true` in the result).
    fn lose(&mut self, node: &str) -> (Vec<LostTransport>, bool) {
        let mut lost = Vec::new();
        for (id, t) in self.remove_transports(|t| t.node == node) {
            self.lost.insert(id.clone());
            lost.push(LostTransport { participant: t.participant, transport: id, sessions: t.sessions.into_iter().collect() });
        }
        let mixer_here = match self.parts.get(&Role::Mixer) {
            Some(n) => n.id == node,
            None => self.home.as_ref().is_some_and(|h| h.id == node && h.roles.contains(&Role::Mixer)),
        };
        if self.home.as_ref().is_some_and(|h| h.id == node) {
            self.home = None;
        }
        self.parts.retain(|_, n| n.id != node);
        (lost, mixer_here)
    }
}

/// Finds a room's nodes in the cluster: this process's own parts when placed here,
/// proxies over NATS otherwise.
pub struct ClusterRouter {
    me_arc: Weak<ClusterRouter>,
    node: Arc<ClusterNode>,
    me: String,
    /// This node's run, told to the nodes it places things on.
    caller: crate::rpc::Caller,
    region: String,
    /// This node's own parts (none where it lacks the role).
    local: LocalRouter,
    /// How many more transports than the least-used node a room's home may hold before
    /// the room's new transports go elsewhere.
    spread: u64,
    rooms: Mutex<HashMap<RoomId, RoomPlacement>>,
    /// Nodes in use that NATS says nobody listens for, since the first probe that said so.
    suspects: Mutex<HashMap<String, Instant>>,
    /// When every node in use was last probed.
    probed_all: Mutex<Option<Instant>>,
    /// The last return of this node's NATS link, and the nodes in use not yet asked since
    /// what they ended meanwhile.
    to_ask: Mutex<(Option<Instant>, HashSet<String>)>,
    /// Each node's last answer read: what it ended is asked for after it.
    ended_read: Mutex<HashMap<String, crate::placed::WhatEnded>>,
}

/// A node in use is given up when NATS has said at every probe for this long that nobody
/// listens on its subject. A killed node's connection closes, so NATS knows at once (the
/// node registry would keep its entry for up to [`crate::NODE_TTL`]); a live node that lost
/// NATS for a moment reconnects within milliseconds (its client retries at once, then
/// every 250 ms at most: `RECONNECT_MAX_DELAY`).
const GONE_AFTER_SILENCE: Duration = Duration::from_secs(2);
/// Nodes in use are probed this often (a stats request: NATS answers "no responders" for a
/// node that is not there without asking anyone)...
const PROBE: Duration = Duration::from_secs(1);
/// ...and one that stopped answering, this often.
const SUSPECT_PROBE: Duration = Duration::from_millis(500);
/// For this long after this node's own NATS connection came back, nobody is judged: after a
/// NATS restart the other nodes reconnect within 250 ms of it listening, and may take a
/// moment to serve their subjects again.
const RECONNECT_GRACE: Duration = Duration::from_secs(6);

impl ClusterRouter {
    /// A router for the portal of `node`, whose own parts are `local`, spreading a room's
    /// transports over nodes after `spread` (see the module doc). When a node serving
    /// rooms disappears from the cluster, what each room had there is reported to
    /// `portal` as [`AgentEvent::MediaLost`].
    pub fn new(node: Arc<ClusterNode>, local: LocalRouter, spread: u64, portal: Option<mpsc::Sender<AgentEvent>>) -> Arc<ClusterRouter> {
        let me = node.this_node();
        let router = Arc::new_cyclic(|me_arc| ClusterRouter {
            me_arc: me_arc.clone(),
            node,
            caller: crate::rpc::Caller::run(&me.id, &me.instance),
            me: me.id,
            region: me.region,
            local,
            spread,
            rooms: Mutex::new(HashMap::new()),
            suspects: Mutex::new(HashMap::new()),
            probed_all: Mutex::new(None),
            to_ask: Mutex::new((None, HashSet::new())),
            ended_read: Mutex::new(HashMap::new()),
        });
        if let Some(portal) = portal {
            let weak = Arc::downgrade(&router);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SUSPECT_PROBE);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(router) = weak.upgrade() else { return };
                    for event in router.lost().await {
                        if portal.send(event).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
        router
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<RoomId, RoomPlacement>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the rooms had on nodes found gone: not listening on NATS for
    /// [`GONE_AFTER_SILENCE`]. Each such node's transports are forgotten at once (a session
    /// started meanwhile is placed on a live node) and reported, per room. While NATS is
    /// away, and for [`RECONNECT_GRACE`] after it is back, nothing is judged.
    async fn lost(&self) -> Vec<AgentEvent> {
        if self.node.reconnected_within(RECONNECT_GRACE) {
            self.suspects.lock().unwrap_or_else(|p| p.into_inner()).clear();
            return Vec::new();
        }
        // Each node in use, with the part it serves the rooms (probed on that part's subject).
        let in_use: HashMap<String, &'static str> = {
            let rooms = self.rooms();
            let mut parts = HashMap::new();
            for r in rooms.values() {
                for (role, n) in &r.parts {
                    parts.entry(n.id.clone()).or_insert(if *role == Role::Mixer { "mix" } else { "recorder" });
                }
                for id in r.transports.values().map(|t| t.node.clone()).chain(r.home.iter().map(|h| h.id.clone())) {
                    parts.insert(id, "media");
                }
            }
            parts
        };
        let all = {
            let mut probed = self.probed_all.lock().unwrap_or_else(|p| p.into_inner());
            let due = probed.is_none_or(|at| at.elapsed() >= PROBE);
            if due {
                *probed = Some(Instant::now());
            }
            due
        };
        let to_probe: Vec<(String, &'static str)> = {
            let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
            suspects.retain(|id, _| in_use.contains_key(id));
            in_use.iter().filter(|(id, _)| all || suspects.contains_key(*id)).map(|(id, part)| (id.clone(), *part)).collect()
        };
        let mut gone = Vec::new();
        for (id, part) in to_probe {
            let silent = crate::rpc::responds(&self.node.client(), &self.me, &id, part).await == Some(false);
            let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
            if !silent {
                suspects.remove(&id);
                continue;
            }
            let since = *suspects.entry(id.clone()).or_insert_with(Instant::now);
            if since.elapsed() >= GONE_AFTER_SILENCE {
                suspects.remove(&id);
                gone.push(id);
            }
        }
        // After the probes: a node slow to say what it ended holds up no judging of the others.
        let mut events = self.ended_while_away(&in_use).await;
        // Our own connection dropped during the probes: what they said is not trusted (what
        // nodes said they ended is: it is reported).
        if self.node.reconnected_within(RECONNECT_GRACE) {
            self.suspects.lock().unwrap_or_else(|p| p.into_inner()).clear();
            return events;
        }
        let mut rooms = self.rooms();
        for id in gone {
            let reason = format!("webrtc node `{id}` is gone");
            for (room, placement) in rooms.iter_mut() {
                let (transports, views) = placement.lose(&id);
                if transports.is_empty() && !views {
                    continue;
                }
                warn!(room = %room, node = %id, transports = transports.len(), views, "a node serving a room is gone");
                events.push(AgentEvent::MediaLost { room: room.clone(), reason: reason.clone(), transports, views });
            }
        }
        events
    }

    /// What the nodes in use ended of this run's placements while its NATS link was away,
    /// once it is back (`placed.rs`: a home cut off for longer than a node waits for it
    /// loses what it placed there, and the events saying so reached nobody). Each node is
    /// asked once per return of the link, again at the next check if it could not answer.
    /// The transports ended are forgotten and reported as lost, like a gone node's; a view
    /// ended makes the room's views start again.
    async fn ended_while_away(&self, in_use: &HashMap<String, &'static str>) -> Vec<AgentEvent> {
        let Some(back) = self.node.came_back() else { return Vec::new() };
        let asking: Vec<String> = {
            let mut to_ask = self.to_ask.lock().unwrap_or_else(|p| p.into_inner());
            if to_ask.0 != Some(back) {
                *to_ask = (Some(back), in_use.keys().cloned().collect());
            }
            to_ask.1.retain(|id| in_use.contains_key(id));
            to_ask.1.iter().cloned().collect()
        };
        if asking.is_empty() {
            return Vec::new();
        }
        let client = self.node.client();
        let read: Vec<crate::placed::WhatEnded> = {
            let ended_read = self.ended_read.lock().unwrap_or_else(|p| p.into_inner());
            asking.iter().map(|id| ended_read.get(id).copied().unwrap_or_else(crate::placed::WhatEnded::first)).collect()
        };
        // A webrtc or mixer node that nobody answers for (its own link down for a moment) is
        // asked again; a recorder has nothing to say. What a node tells stays told there
        // until this home asks after it, so an answer lost on the way comes again.
        let answers = futures_util::future::join_all(asking.iter().zip(read).map(|(id, question)| {
            crate::rpc::what_ended(&client, &self.caller, id, question, in_use.get(id).is_some_and(|part| *part != "recorder"))
        }))
        .await;
        let mut told = Vec::new();
        {
            let mut to_ask = self.to_ask.lock().unwrap_or_else(|p| p.into_inner());
            let mut ended_read = self.ended_read.lock().unwrap_or_else(|p| p.into_inner());
            for (id, answer) in asking.into_iter().zip(answers) {
                let Some(answer) = answer else { continue };
                to_ask.1.remove(&id);
                ended_read.insert(id.clone(), answer.next());
                if !answer.ended.is_empty() {
                    told.push((id, answer.ended));
                }
            }
        }
        let mut lost: HashMap<RoomId, (Vec<LostTransport>, bool, String)> = HashMap::new();
        let mut rooms = self.rooms();
        for (id, ended) in told {
            for crate::placed::Ended { room, what } in ended {
                let Some(placement) = rooms.get_mut(&room) else { continue };
                let entry = lost
                    .entry(room.clone())
                    .or_insert_with(|| (Vec::new(), false, format!("node `{id}` ended this while the room's home was cut off from the cluster")));
                match what {
                    crate::placed::Placement::Participant(who) => {
                        // Only what was placed before the link came back: what the participant
                        // was given since is new, and lives.
                        for (transport, t) in placement.remove_transports(|t| t.node == id && t.participant == who && t.at < back) {
                            placement.lost.insert(transport.clone());
                            entry.0.push(LostTransport { participant: t.participant, transport, sessions: t.sessions.into_iter().collect() });
                        }
                    }
                    crate::placed::Placement::View(_) => entry.1 = true,
                }
            }
        }
        lost.into_iter()
            .filter(|(_, (transports, views, _))| !transports.is_empty() || *views)
            .map(|(room, (transports, views, reason))| {
                warn!(room = %room, transports = transports.len(), views, "a node ended what this home placed while it was cut off");
                AgentEvent::MediaLost { room, reason, transports, views }
            })
            .collect()
    }

    /// The least-used live webrtc node; `prefer_full` first prefers nodes that also run the
    /// mixer and recorder (for a room's home).
    fn least_used(&self, prefer_full: bool) -> Option<NodeRecord> {
        least_used_webrtc(&self.node.known_nodes(), &self.region, &self.me, prefer_full).cloned()
    }

    /// The room's home, choosing one if it has none.
    fn home(&self, placement: &mut RoomPlacement, room: &RoomId) -> Option<NodeRecord> {
        if let Some(home) = &placement.home {
            return Some(home.clone());
        }
        let chosen = self.least_used(true)?;
        info!(room = %room, node = %chosen.id, "room placed on a webrtc node");
        placement.home = Some(chosen.clone());
        Some(chosen)
    }

    /// The node of a transport, placing it if it is new (see the module doc): on `near` if
    /// given (the node of the stream whose data channel it carries: data does not cross
    /// nodes).
    fn place_transport(
        &self,
        room: &RoomId,
        transport: &TransportId,
        participant: &ParticipantId,
        near: Option<String>,
    ) -> Result<(String, bool), AgentError> {
        let mut rooms = self.rooms();
        let placement = rooms.entry(room.clone()).or_default();
        if let Some(t) = placement.transports.get(transport) {
            return match near {
                Some(near) if near != t.node => {
                    Err(AgentError::Rejected("a stream's data comes only on a transport of its own node: subscribe to it on a new transport".into()))
                }
                _ => Ok((t.node.clone(), false)),
            };
        }
        // A transport of a node found gone is over, even if the portal has not heard yet:
        // it is not made anew elsewhere under the same id.
        if placement.lost.contains(transport) {
            return Err(AgentError::NoTransport(transport.clone()));
        }
        let known = self.node.known_nodes();
        let chosen = match near {
            Some(near) => {
                if !known.iter().any(|n| n.id == near && !n.draining) {
                    return Err(AgentError::Rejected(format!("the node carrying that stream's data (`{near}`) takes no new sessions")));
                }
                near
            }
            None => {
                let home = self.home(placement, room).ok_or_else(|| AgentError::Failed("no webrtc node is available".into()))?;
                // The home's load as last reported (with placements counted since), not as
                // it was when the room was placed; a home that left the list or drains takes
                // no more.
                let home_now = known.iter().find(|n| n.id == home.id).filter(|n| !n.draining);
                let spread = usize::try_from(self.spread).unwrap_or(usize::MAX);
                match (home_now, self.least_used(false)) {
                    (Some(h), Some(least)) if least.id != h.id && h.load.transports >= least.load.transports.saturating_add(spread) => {
                        debug!(room = %room, transport = %transport, node = %least.id, "transport placed off the room's home");
                        least.id
                    }
                    (Some(h), _) => h.id.clone(),
                    (None, Some(least)) => least.id,
                    (None, None) => return Err(AgentError::Failed("no webrtc node is available".into())),
                }
            }
        };
        placement.transports.insert(
            transport.clone(),
            PlacedTransport { node: chosen.clone(), participant: participant.clone(), sessions: HashSet::new(), at: Instant::now() },
        );
        drop(rooms);
        self.node.count_placement(&chosen);
        Ok((chosen, true))
    }

    /// The node serving `role` (mixer, recorder) for `room`: its home when that has the
    /// role (no relay hop), else the least-used node with it (fewest views, then CPU),
    /// kept for the room until it is released.
    fn place_part(&self, room: &RoomId, role: Role) -> Option<NodeRecord> {
        let mut rooms = self.rooms();
        let placement = rooms.entry(room.clone()).or_default();
        // Where it already runs first (the home may have changed since: the view stays).
        if let Some(n) = placement.parts.get(&role) {
            return Some(n.clone());
        }
        if let Some(home) = self.home(placement, room).filter(|n| n.roles.contains(&role)) {
            return Some(home);
        }
        let chosen = least_used_part(&self.node.known_nodes(), &self.region, &self.me, role).cloned()?;
        info!(room = %room, node = %chosen.id, role = ?role, "room's media part placed on a node without its webrtc sessions");
        placement.parts.insert(role, chosen.clone());
        Some(chosen)
    }

    fn media(&self, node: &str) -> Option<Arc<dyn MediaNode>> {
        if node == self.me {
            return self.local.agent.clone();
        }
        Some(Arc::new(RemoteMedia::new(self.node.client(), self.caller.clone(), node)))
    }

    fn is_me(&self, node: &NodeRecord) -> bool {
        node.id == self.me
    }
}

/// A room's media as the portal sees it: one node, though each command goes to the node
/// of the transport or session it names.
struct RoomMedia {
    router: Arc<ClusterRouter>,
    room: RoomId,
}

impl RoomMedia {
    fn at(&self, node: Option<String>, missing: impl FnOnce() -> AgentError) -> Result<Arc<dyn MediaNode>, AgentError> {
        node.and_then(|n| self.router.media(&n)).ok_or_else(missing)
    }

    fn node_of_session(&self, session: &str) -> Option<String> {
        self.router.rooms().get(&self.room).and_then(|p| p.node_of_session(session))
    }

    fn node_of_transport(&self, transport: &str) -> Option<String> {
        self.router.rooms().get(&self.room).and_then(|p| p.transports.get(transport)).map(|t| t.node.clone())
    }

    /// Records a session on its transport; false when the transport is gone meanwhile
    /// (its node was just found dead).
    fn note_session(&self, transport: &TransportId, session: &SessionId) -> bool {
        let mut rooms = self.router.rooms();
        let Some(p) = rooms.get_mut(&self.room) else { return false };
        let Some(t) = p.transports.get_mut(transport) else { return false };
        t.sessions.insert(session.clone());
        p.sessions.insert(session.clone(), transport.clone());
        true
    }

    fn forget_session(&self, session: &str) {
        if let Some(p) = self.router.rooms().get_mut(&self.room) {
            p.forget_session(session);
        }
    }

    /// Sets up a publication or subscription on its transport's node (`near` the node of
    /// the stream whose data it takes).
    async fn open(&self, at: &tessera_core::agent::SessionRef, near: Option<String>, command: AgentCommand) -> Result<AgentReply, AgentError> {
        let (node, new) = self.router.place_transport(&self.room, &at.transport, &at.participant, near)?;
        let agent = self.at(Some(node), || AgentError::Failed("no webrtc node is available".into()))?;
        if !self.note_session(&at.transport, &at.session) {
            return Err(AgentError::NoTransport(at.transport.clone()));
        }
        let out = agent.handle(command).await;
        if out.is_err() {
            self.forget_session(at.session.as_str());
            // A transport that never carried a session is not the client's: forgotten.
            if new
                && let Some(p) = self.router.rooms().get_mut(&self.room)
                && p.transports.get(&at.transport).is_some_and(|t| t.sessions.is_empty())
            {
                p.transports.remove(&at.transport);
            }
        }
        out
    }
}

#[async_trait::async_trait]
impl MediaNode for RoomMedia {
    async fn handle(&self, command: AgentCommand) -> Result<AgentReply, AgentError> {
        match command {
            AgentCommand::Publish(spec) => {
                let at = spec.at.clone();
                self.open(&at, None, AgentCommand::Publish(spec)).await
            }
            AgentCommand::Subscribe(spec) => {
                let at = spec.at.clone();
                let near = spec.data_from.as_ref().and_then(|d| self.node_of_session(d.as_str()));
                self.open(&at, near, AgentCommand::Subscribe(spec)).await
            }
            AgentCommand::Signal(s) => {
                let transport = s.at.transport.clone();
                self.at(self.node_of_transport(transport.as_str()), || AgentError::NoTransport(transport))?.handle(AgentCommand::Signal(s)).await
            }
            AgentCommand::EndSession(e) => {
                let node = self.node_of_session(e.session.as_str());
                let session = e.session.clone();
                let out = match node.and_then(|n| self.router.media(&n)) {
                    Some(agent) => agent.handle(AgentCommand::EndSession(e)).await,
                    None => Ok(AgentReply::EndSession(())),
                };
                self.forget_session(session.as_str());
                out
            }
            AgentCommand::SwitchTracks(s) => {
                let session = s.session.clone();
                self.at(self.node_of_session(session.as_str()), || AgentError::NoSession(session))?.handle(AgentCommand::SwitchTracks(s)).await
            }
            AgentCommand::SelectLayer(l) => {
                let session = l.session.clone();
                self.at(self.node_of_session(session.as_str()), || AgentError::NoSession(session))?.handle(AgentCommand::SelectLayer(l)).await
            }
            AgentCommand::RequestKeyframe(k) => match self.node_of_session(k.stream.as_str()).and_then(|n| self.router.media(&n)) {
                Some(agent) => agent.handle(AgentCommand::RequestKeyframe(k)).await,
                None => Ok(AgentReply::RequestKeyframe(())),
            },
            AgentCommand::ParticipantLeft(p) => {
                // Every node holding one of the participant's transports.
                let nodes: HashSet<String> = {
                    let mut rooms = self.router.rooms();
                    let Some(placement) = rooms.get_mut(&self.room) else { return Ok(AgentReply::ParticipantLeft(())) };
                    placement.remove_transports(|t| t.participant == p.participant).into_iter().map(|(_, t)| t.node).collect()
                };
                let mut result = Ok(AgentReply::ParticipantLeft(()));
                for node in nodes {
                    if let Some(agent) = self.router.media(&node)
                        && let Err(e) = agent.handle(AgentCommand::ParticipantLeft(p.clone())).await
                    {
                        result = Err(e);
                    }
                }
                result
            }
            AgentCommand::GetStats(g) => {
                let home = self.router.rooms().get(&self.room).and_then(|p| p.home.as_ref().map(|h| h.id.clone()));
                self.at(home.or_else(|| Some(self.router.me.clone())), || AgentError::Failed("no webrtc node".into()))?
                    .handle(AgentCommand::GetStats(g))
                    .await
            }
        }
    }
}

impl Router for ClusterRouter {
    fn agent_for(&self, room: &RoomId) -> Option<Arc<dyn MediaNode>> {
        let router = self.me_arc.upgrade()?;
        // Some webrtc node must exist for the room's sessions.
        self.least_used(false).or_else(|| self.rooms().get(room).and_then(|p| p.home.clone()))?;
        Some(Arc::new(RoomMedia { router, room: room.clone() }))
    }

    fn mixer_for(&self, room: &RoomId, _view: &ViewLabel) -> Option<Arc<dyn MixNode>> {
        let node = self.place_part(room, Role::Mixer)?;
        if self.is_me(&node) {
            return self.local.mixer.clone();
        }
        Some(Arc::new(RemoteMixer::new(self.node.client(), self.caller.clone(), &node.id)))
    }

    fn recorder_for(&self, room: &RoomId) -> Option<Arc<dyn RecorderNode>> {
        let node = self.place_part(room, Role::Recorder)?;
        if self.is_me(&node) {
            return self.local.recorder.clone();
        }
        Some(Arc::new(RemoteRecorder::new(self.node.client(), self.caller.clone(), &node.id)))
    }

    fn release(&self, room: &RoomId) {
        if self.rooms().remove(room).is_some() {
            debug!(room = %room, "room no longer placed (empty)");
        }
    }

    fn transport_closed(&self, room: &RoomId, transport: &TransportId) {
        if let Some(p) = self.rooms().get_mut(room) {
            p.remove_transport(transport);
        }
    }

    fn recorder_nodes(&self) -> Vec<Arc<dyn RecorderNode>> {
        let mut out: Vec<Arc<dyn RecorderNode>> = self.local.recorder.iter().cloned().collect();
        for n in self.node.known_nodes().into_iter().filter(|n| n.roles.contains(&Role::Recorder) && !self.is_me(n)) {
            out.push(Arc::new(RemoteRecorder::new(self.node.client(), self.caller.clone(), &n.id)));
        }
        out
    }

    fn media_nodes(&self) -> Vec<Arc<dyn MediaNode>> {
        let mut out: Vec<Arc<dyn MediaNode>> = Vec::new();
        for n in self.node.known_nodes().into_iter().filter(|n| n.roles.contains(&Role::Webrtc)) {
            if self.is_me(&n) {
                out.extend(self.local.agent.clone());
            } else {
                out.push(Arc::new(RemoteMedia::new(self.node.client(), self.caller.clone(), &n.id)));
            }
        }
        out
    }
}

/// OWT's `least-used` among the live webrtc nodes, for a portal in `region` (empty: none):
/// nodes of that region first, then (with `prefer_full`, for a room's home) those that also
/// mix and record, then the fewest transports, then `me` (commands pass as values), then
/// the lowest CPU.
fn least_used_webrtc<'a>(nodes: &'a [NodeRecord], region: &str, me: &str, prefer_full: bool) -> Option<&'a NodeRecord> {
    let missing = |n: &NodeRecord| if prefer_full { [Role::Mixer, Role::Recorder].iter().filter(|r| !n.roles.contains(r)).count() } else { 0 };
    nodes.iter().filter(|n| n.roles.contains(&Role::Webrtc) && !n.draining).min_by(|a, b| {
        let key = |n: &NodeRecord| (!region.is_empty() && n.region != region, missing(n), n.load.transports, n.id != me);
        key(a).cmp(&key(b)).then(a.load.cpu_pct.total_cmp(&b.load.cpu_pct))
    })
}

/// The node for a room's mixer or recorder (`role`) when its home lacks it: the portal's
/// region first, then the fewest views, then `me`, then the lowest CPU.
fn least_used_part<'a>(nodes: &'a [NodeRecord], region: &str, me: &str, role: Role) -> Option<&'a NodeRecord> {
    nodes.iter().filter(|n| n.roles.contains(&role) && !n.draining).min_by(|a, b| {
        let key = |n: &NodeRecord| (!region.is_empty() && n.region != region, n.load.views, n.id != me);
        key(a).cmp(&key(b)).then(a.load.cpu_pct.total_cmp(&b.load.cpu_pct))
    })
}

#[cfg(test)]
mod placement_tests {
    use super::*;

    fn node(id: &str, roles: &[Role], region: &str, transports: usize, views: usize, cpu: f64) -> NodeRecord {
        let mut n = NodeRecord::starting(id.into(), roles.to_vec(), String::new(), region.into());
        n.load = tessera_core::node::NodeLoad { cpu_pct: cpu, transports, views, ..Default::default() };
        n
    }

    #[test]
    fn webrtc_sessions_go_to_the_least_used_node_of_the_portals_region() {
        use Role::{Mixer, Recorder, Webrtc};
        let nodes = [
            node("eu-busy", &[Webrtc], "eu", 30, 0, 10.0),
            node("eu-idle", &[Webrtc], "eu", 2, 0, 50.0),
            node("us-idle", &[Webrtc], "us", 0, 0, 1.0),
            node("us-mixer", &[Mixer], "us", 0, 0, 0.0),
        ];
        let pick = |region: &str, me: &str, full: bool| least_used_webrtc(&nodes, region, me, full).map(|n| n.id.as_str());
        assert_eq!(pick("eu", "x", false), Some("eu-idle"), "the region first, then the fewest transports");
        assert_eq!(pick("us", "x", false), Some("us-idle"));
        assert_eq!(pick("", "x", false), Some("us-idle"), "no region: the fewest transports anywhere");
        assert_eq!(pick("asia", "x", false), Some("us-idle"), "nobody in the region: the least used elsewhere");
        // Ties on transports: this node, then the lowest CPU.
        let tied = [node("a", &[Webrtc], "", 3, 0, 5.0), node("b", &[Webrtc], "", 3, 0, 1.0), node("me", &[Webrtc], "", 3, 0, 90.0)];
        assert_eq!(least_used_webrtc(&tied, "", "me", false).map(|n| n.id.as_str()), Some("me"));
        assert_eq!(least_used_webrtc(&tied, "", "z", false).map(|n| n.id.as_str()), Some("b"));
        // A room's home prefers a node that also mixes and records; draining nodes get nothing.
        let mut homes = [node("sfu", &[Webrtc], "", 0, 0, 0.0), node("full", &[Webrtc, Mixer, Recorder], "", 9, 0, 0.0)];
        assert_eq!(least_used_webrtc(&homes, "", "z", true).map(|n| n.id.as_str()), Some("full"));
        assert_eq!(least_used_webrtc(&homes, "", "z", false).map(|n| n.id.as_str()), Some("sfu"));
        homes[1].draining = true;
        assert_eq!(least_used_webrtc(&homes, "", "z", true).map(|n| n.id.as_str()), Some("sfu"));
        assert_eq!(least_used_webrtc(&nodes[3..], "", "z", false), None, "no webrtc node");
    }

    #[test]
    fn mixers_and_recorders_go_to_the_portals_region_then_the_fewest_views() {
        use Role::{Mixer, Recorder};
        let nodes = [
            node("eu-mix", &[Mixer], "eu", 0, 4, 10.0),
            node("us-mix", &[Mixer], "us", 0, 1, 10.0),
            node("us-mix2", &[Mixer], "us", 0, 1, 5.0),
            node("us-rec", &[Recorder], "us", 0, 0, 0.0),
        ];
        let pick = |region: &str, role| least_used_part(&nodes, region, "x", role).map(|n| n.id.as_str());
        assert_eq!(pick("eu", Mixer), Some("eu-mix"), "its region though it has more views");
        assert_eq!(pick("us", Mixer), Some("us-mix2"), "fewest views, then the lowest CPU");
        assert_eq!(pick("", Mixer), Some("us-mix2"));
        assert_eq!(pick("eu", Recorder), Some("us-rec"), "no recorder in the region: elsewhere");
    }
}
