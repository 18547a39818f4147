//! Tessera's SFU: WebRTC sessions that forward published streams to subscribers without
//! decoding, built on `webrtc` 0.21.
//!
//! Shape:
//! - A **transport** is one `RTCPeerConnection` with one client, owned by one task
//!   ([`transport`]). A client may put many publications and subscriptions on one
//!   transport (renegotiating with a fresh offer each time, as the OWT JS SDK does) or
//!   use one transport per session.
//! - A **publication** is the set of tracks one `publish` announced. Each received track
//!   gets a reader task feeding a [`forward::Fanout`].
//! - A **subscription** adds a sendonly transceiver per requested track to the
//!   subscriber's transport, fed by a [`forward::Sink`] on the source track's fan-out.
//! - The mixer and recorder reach the fan-outs only through
//!   [`tessera_core::media::StreamSource`], which the agent implements (`media`): taps
//!   and streams produced inside the server (mixed views) convert packets to and from
//!   marshalled bytes there, off the forwarding path.
//!
//! ICE: full ICE (not ICE-lite), host candidates on the configured or detected addresses,
//! one UDP port per transport from the configured range; the answer SDP carries the
//! candidates (OWT clients ignore trickled server candidates).

// Input from the network and files must never panic this crate: no unwrap/expect/panic
// and no unchecked indexing outside tests (`./scripts/test` runs clippy with -D warnings).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

pub mod feedback;
pub mod forward;
mod media;
pub mod net;
mod publication;
mod transport;
pub mod workers;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tessera_core::agent::{AgentError, AgentEvent, PublishSpec, Signaling, SubscribeSpec, TrackSwitch, TransportRef};
use tessera_core::command::{AgentCommand, AgentReply, MediaNode, MediaStats};
use tessera_core::{ParticipantId, SessionId};
use tokio::sync::mpsc;
use tracing::{debug, info};

pub use publication::KeyframeSource;
use publication::Publication;
use transport::{TransportCmd, TransportHandle};

/// Settings of the SFU, from the `[webrtc]` config section.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Addresses to gather host candidates on.
    pub bind_ips: Vec<IpAddr>,
    /// Address announced instead of the bound one (1:1 NAT), if any.
    pub public_ip: Option<IpAddr>,
    /// Lowest UDP port.
    pub port_min: u16,
    /// Highest UDP port.
    pub port_max: u16,
    /// Shortest interval between two keyframe requests to one publisher track.
    pub keyframe_interval: Duration,
    /// ICE: no traffic for this long marks a transport disconnected.
    pub ice_disconnected_timeout: Duration,
    /// ICE: disconnected for this long marks it failed (and ends its sessions).
    pub ice_failed_timeout: Duration,
    /// Passive ICE-TCP on each worker's port (the `workers` engine).
    pub ice_tcp: bool,
}

impl AgentSettings {
    /// Settings from a loaded configuration.
    pub fn from_config(c: &tessera_config::Config) -> Self {
        let w = &c.webrtc;
        AgentSettings {
            bind_ips: net::bind_ips(w.bind_ip.parse().ok()),
            public_ip: w.public_ip.parse().ok(),
            port_min: w.udp_port_min,
            port_max: w.udp_port_max,
            keyframe_interval: Duration::from_millis(300),
            ice_disconnected_timeout: Duration::from_secs(5),
            ice_failed_timeout: Duration::from_secs(10),
            ice_tcp: w.ice_tcp,
        }
    }
}

/// Counts of live objects, for the stats endpoint and leak tests (the protocol's type).
pub type AgentStats = MediaStats;

/// A subscription, as the agent tracks it to undo it.
struct SubscriptionEntry {
    room: String,
    participant: String,
    transport: String,
}

#[derive(Default)]
struct State {
    transports: HashMap<String, TransportHandle>,
    publications: HashMap<String, Arc<Publication>>,
    subscriptions: HashMap<String, SubscriptionEntry>,
    by_participant: HashMap<String, HashSet<String>>,
}

/// The SFU.
pub struct WebrtcAgent {
    pub(crate) settings: AgentSettings,
    pub(crate) events: mpsc::Sender<AgentEvent>,
    pub(crate) ports: net::PortAllocator,
    state: Mutex<State>,
    me: std::sync::Weak<WebrtcAgent>,
}

impl WebrtcAgent {
    /// Creates the agent and the receiver of its events (for the portal).
    pub fn new(settings: AgentSettings) -> (Arc<WebrtcAgent>, mpsc::Receiver<AgentEvent>) {
        let (tx, rx) = mpsc::channel(4096);
        let ports = net::PortAllocator::new(settings.port_min, settings.port_max);
        info!(bind = ?settings.bind_ips, public = ?settings.public_ip, ports = %format!("{}-{}", settings.port_min, settings.port_max), "webrtc-agent ready");
        let agent = Arc::new_cyclic(|me| WebrtcAgent { settings, events: tx, ports, state: Mutex::new(State::default()), me: me.clone() });
        (agent, rx)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts of live transports, publications and subscriptions.
    pub fn stats(&self) -> AgentStats {
        let s = self.lock();
        let local = s.publications.values().filter(|p| p.participant.is_empty()).count();
        AgentStats {
            transports: s.transports.len(),
            publications: s.publications.len() - local,
            local_streams: local,
            subscriptions: s.subscriptions.len(),
        }
    }

    pub(crate) fn publication(&self, id: &str) -> Option<Arc<Publication>> {
        self.lock().publications.get(id).cloned()
    }

    /// A sender into the agent's event channel (to the portal), for other media nodes
    /// that report on the same channel (the mixer's mixed-stream updates).
    pub fn event_sender(&self) -> mpsc::Sender<AgentEvent> {
        self.events.clone()
    }

    /// Sends an event to the portal.
    pub async fn emit(&self, event: AgentEvent) {
        if self.events.send(event).await.is_err() {
            debug!("portal gone; agent event dropped");
        }
    }

    /// The transport with this id, created on first use by this participant.
    async fn transport(self: &Arc<Self>, room: &str, participant: &str, id: &str) -> Result<TransportHandle, AgentError> {
        if let Some(t) = self.lock().transports.get(id) {
            if t.participant != participant {
                return Err(AgentError::NoTransport(id.into()));
            }
            return Ok(t.clone());
        }
        let handle = transport::spawn(self.clone(), room, participant, id).await?;
        let mut s = self.lock();
        s.transports.insert(id.to_string(), handle.clone());
        s.by_participant.entry(participant.to_string()).or_default().insert(id.to_string());
        Ok(handle)
    }

    /// Called by a transport task when it ends: forget it and everything on it.
    pub(crate) async fn transport_closed(&self, id: &str, reason: &str) {
        let (t, publications, subscriptions) = {
            let mut s = self.lock();
            let Some(t) = s.transports.remove(id) else { return };
            if let Some(set) = s.by_participant.get_mut(&t.participant) {
                set.remove(id);
                if set.is_empty() {
                    s.by_participant.remove(&t.participant);
                }
            }
            let pubs: Vec<Arc<Publication>> = s.publications.values().filter(|p| p.transport == id).cloned().collect();
            for p in &pubs {
                s.publications.remove(&p.id);
            }
            let subs: Vec<(String, SubscriptionEntry)> = {
                let ids: Vec<String> = s.subscriptions.iter().filter(|(_, e)| e.transport == id).map(|(k, _)| k.clone()).collect();
                ids.into_iter().filter_map(|k| s.subscriptions.remove(&k).map(|e| (k, e))).collect()
            };
            (t, pubs, subs)
        };
        let mut sessions: Vec<SessionId> = Vec::new();
        for p in publications {
            p.end();
            sessions.push(p.id.as_str().into());
            if p.is_ready() {
                self.emit(AgentEvent::StreamEnded { room: p.room.as_str().into(), stream: p.id.as_str().into(), reason: reason.into() }).await;
            }
        }
        for (sub, e) in subscriptions {
            sessions.push(sub.as_str().into());
            let ended = AgentEvent::SubscriptionEnded {
                room: e.room.into(),
                participant: e.participant.into(),
                subscription: sub.into(),
                reason: reason.into(),
            };
            self.emit(ended).await;
        }
        // Also reports publications that never flowed, which the room controller still
        // counts as pending inputs until it hears they are gone.
        let closed = AgentEvent::TransportClosed {
            room: t.room.as_str().into(),
            participant: t.participant.as_str().into(),
            transport: id.into(),
            sessions,
            reason: reason.into(),
        };
        self.emit(closed).await;
        info!(transport = %id, reason, "transport closed");
    }
}

#[async_trait::async_trait]
impl MediaNode for WebrtcAgent {
    async fn handle(&self, command: AgentCommand) -> Result<AgentReply, AgentError> {
        Ok(match command {
            AgentCommand::Publish(spec) => AgentReply::Publish(self.publish(spec).await?),
            AgentCommand::Subscribe(spec) => AgentReply::Subscribe(self.subscribe(spec).await?),
            AgentCommand::Signal(s) => AgentReply::Signal(self.signal(&s.at, s.signaling).await?),
            AgentCommand::EndSession(e) => {
                self.end_session(&e.participant, &e.session).await;
                AgentReply::EndSession(())
            }
            AgentCommand::SwitchTracks(s) => AgentReply::SwitchTracks(self.switch(&s.participant, &s.session, s.switch).await?),
            AgentCommand::RequestKeyframe(k) => {
                if let Some(p) = self.publication(k.stream.as_str()) {
                    p.request_keyframe();
                }
                AgentReply::RequestKeyframe(())
            }
            AgentCommand::ParticipantLeft(p) => {
                self.participant_left(&p.participant).await;
                AgentReply::ParticipantLeft(())
            }
            AgentCommand::GetStats(_) => AgentReply::GetStats(self.stats()),
        })
    }
}

impl WebrtcAgent {
    async fn publish(&self, spec: PublishSpec) -> Result<(), AgentError> {
        let me = self.self_arc()?;
        let t = me.transport(spec.at.room.as_str(), spec.at.participant.as_str(), spec.at.transport.as_str()).await?;
        let publication = Arc::new(Publication::new(&spec, self.settings.keyframe_interval));
        self.lock().publications.insert(spec.at.session.to_string(), publication.clone());
        t.send(TransportCmd::Publish(publication)).await
    }

    async fn subscribe(&self, spec: SubscribeSpec) -> Result<(), AgentError> {
        let me = self.self_arc()?;
        let mut sources = Vec::new();
        for track in &spec.tracks {
            let p = self.publication(track.from.as_str()).ok_or_else(|| AgentError::NoStream(track.from.clone()))?;
            if !p.has_flowing(track.kind) {
                return Err(AgentError::Rejected(format!("Stream {} has no {} media yet", track.from, track.kind.as_str())));
            }
            sources.push(p);
        }
        let data_source = match &spec.data_from {
            Some(from) => Some(self.publication(from.as_str()).ok_or_else(|| AgentError::NoStream(from.clone()))?),
            None => None,
        };
        let t = me.transport(spec.at.room.as_str(), spec.at.participant.as_str(), spec.at.transport.as_str()).await?;
        let entry = SubscriptionEntry {
            room: spec.at.room.to_string(),
            participant: spec.at.participant.to_string(),
            transport: spec.at.transport.to_string(),
        };
        self.lock().subscriptions.insert(spec.at.session.to_string(), entry);
        t.send(TransportCmd::Subscribe(spec, sources, data_source)).await
    }

    async fn signal(&self, at: &TransportRef, signaling: Signaling) -> Result<(), AgentError> {
        let (participant, transport) = (at.participant.as_str(), at.transport.as_str());
        let t = self.lock().transports.get(transport).filter(|t| t.participant == participant).cloned();
        let t = t.ok_or_else(|| AgentError::NoTransport(transport.into()))?;
        match signaling {
            Signaling::Offer(sdp) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                t.send(TransportCmd::Offer(sdp, tx)).await?;
                rx.await.map_err(|_| AgentError::Failed("transport ended while negotiating".into()))?
            }
            Signaling::Candidate { candidate, sdp_mid, sdp_mline_index } => {
                t.send(TransportCmd::Candidate { candidate, sdp_mid, sdp_mline_index }).await
            }
            Signaling::RemovedCandidates => Ok(()),
        }
    }

    async fn end_session(&self, participant: &ParticipantId, session: &SessionId) {
        let (participant, session) = (participant.as_str(), session.as_str());
        let (publication, subscription) = {
            let mut s = self.lock();
            let p = s.publications.get(session).filter(|p| p.participant == participant).cloned();
            if p.is_some() {
                s.publications.remove(session);
            }
            let sub = match s.subscriptions.get(session) {
                Some(e) if e.participant == participant => s.subscriptions.remove(session),
                _ => None,
            };
            (p, sub)
        };
        if let Some(p) = publication {
            p.end();
            let t = self.lock().transports.get(&p.transport).cloned();
            if let Some(t) = t {
                let _ = t.send(TransportCmd::EndSession(session.to_string())).await;
            }
        }
        if let Some(e) = subscription {
            let t = self.lock().transports.get(&e.transport).cloned();
            if let Some(t) = t {
                let _ = t.send(TransportCmd::EndSession(session.to_string())).await;
            }
        }
    }

    async fn switch(&self, participant: &ParticipantId, session: &SessionId, switch: TrackSwitch) -> Result<(), AgentError> {
        let (participant, session) = (participant.as_str(), session.as_str());
        if let Some(p) = self.publication(session).filter(|p| p.participant == participant) {
            p.switch(switch);
            return Ok(());
        }
        let transport = self.lock().subscriptions.get(session).filter(|e| e.participant == participant).map(|e| e.transport.clone());
        let transport = transport.ok_or_else(|| AgentError::NoSession(session.into()))?;
        let t = self.lock().transports.get(&transport).cloned().ok_or_else(|| AgentError::NoTransport(transport.into()))?;
        t.send(TransportCmd::Switch(session.to_string(), switch)).await
    }

    async fn participant_left(&self, participant: &ParticipantId) {
        let transports: Vec<TransportHandle> = {
            let s = self.lock();
            s.by_participant
                .get(participant.as_str())
                .map(|ids| ids.iter().filter_map(|id| s.transports.get(id).cloned()).collect())
                .unwrap_or_default()
        };
        for t in transports {
            let _ = t.send(TransportCmd::Close("participant left".into())).await;
        }
    }
}

impl WebrtcAgent {
    /// The agent is always held in an `Arc` (see [`WebrtcAgent::new`]); tasks need their own clone.
    fn self_arc(&self) -> Result<Arc<WebrtcAgent>, AgentError> {
        self.me.upgrade().ok_or_else(|| AgentError::Failed("agent is shutting down".into()))
    }
}
