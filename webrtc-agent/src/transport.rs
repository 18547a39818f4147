//! One transport = one `RTCPeerConnection` with one client, owned by one task. The
//! task serialises everything that touches the connection: offers (each one may add
//! publications and subscriptions), candidates, received tracks, state changes. The
//! connection's event handler only forwards events to the task, because webrtc-rs runs
//! handler callbacks on its driver task, which must never block.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::{NackGeneratorBuilder, NackResponderBuilder, Registry, Slot};
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::RTCPFeedback;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use tessera_core::agent::{AgentError, AgentEvent, MediaKind, Progress, SubscribeSpec, TrackSwitch};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{Instrument, debug, info, info_span, warn};
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder, RTCIceCandidateInit,
    RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription, SettingEngineBuilder, configure_rtcp_reports,
    configure_simulcast_extension_headers, configure_twcc_receiver_only,
};

use crate::WebrtcAgent;
use crate::feedback::{KeyframeRequestTap, is_keyframe_request};
use crate::forward::{Fanout, Rewriter, Sink};
use crate::publication::{PubTrack, Publication};

/// How long an answer waits for ICE gathering, so it carries the server's candidates.
const GATHER_TIMEOUT: Duration = Duration::from_secs(3);

/// Commands from the agent to a transport task.
pub(crate) enum TransportCmd {
    Publish(Arc<Publication>),
    Subscribe(SubscribeSpec, Vec<Arc<Publication>>, Option<Arc<Publication>>),
    Offer(String, oneshot::Sender<Result<(), AgentError>>),
    Candidate { candidate: String, sdp_mid: Option<String>, sdp_mline_index: Option<u16> },
    EndSession(String),
    Switch(String, TrackSwitch),
    Close(String),
}

/// Events from the connection's handler (and our own helper tasks) to the task.
enum PcEvent {
    Track(Arc<dyn TrackRemote>),
    State(RTCPeerConnectionState),
    DataChannel(Arc<dyn DataChannel>),
    DataOpen(String),
}

/// The agent's way to reach a transport task.
#[derive(Clone)]
pub(crate) struct TransportHandle {
    pub room: String,
    pub participant: String,
    tx: mpsc::Sender<TransportCmd>,
}

impl TransportHandle {
    pub async fn send(&self, cmd: TransportCmd) -> Result<(), AgentError> {
        self.tx.send(cmd).await.map_err(|_| AgentError::Failed("transport is closed".into()))
    }
}

struct Handler {
    events: mpsc::UnboundedSender<PcEvent>,
    gathering: watch::Sender<bool>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathering.send(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.events.send(PcEvent::State(state));
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let _ = self.events.send(PcEvent::Track(track));
    }

    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        let _ = self.events.send(PcEvent::DataChannel(dc));
    }
}

/// A subscribed track on this transport.
struct SubTrack {
    kind: MediaKind,
    source: Arc<PubTrack>,
    fanout: Arc<Fanout>,
    sink_id: u64,
    active: Arc<AtomicBool>,
    resync: Arc<AtomicBool>,
}

struct SubState {
    tracks: Vec<SubTrack>,
    data_source: Option<Arc<Publication>>,
    ready_sent: bool,
    stop: watch::Sender<bool>,
}

/// A subscribed track to set up, at its m-line's position in the offer.
struct Planned {
    pos: usize,
    session: String,
    kind: MediaKind,
    src: Arc<Publication>,
    track: Arc<PubTrack>,
}

/// The local (sending) track made for a subscribed track.
struct LocalTrack {
    session: String,
    kind: MediaKind,
    source: Arc<PubTrack>,
    local: Arc<TrackLocalStaticRTP>,
    ssrc: u32,
}

/// A subscription waiting for the offer that carries its m-lines.
struct PendingSub {
    spec: SubscribeSpec,
    sources: Vec<Arc<Publication>>,
    data_source: Option<Arc<Publication>>,
}

struct Task {
    agent: Arc<WebrtcAgent>,
    id: String,
    room: String,
    participant: String,
    pc: Arc<dyn PeerConnection>,
    events_tx: mpsc::UnboundedSender<PcEvent>,
    gathered: watch::Receiver<bool>,
    publications: Vec<Arc<Publication>>,
    pending: Vec<PendingSub>,
    subs: HashMap<String, SubState>,
    connected: bool,
    has_remote: bool,
    early_candidates: Vec<RTCIceCandidateInit>,
}

/// Builds the peer connection and starts its task.
pub(crate) async fn spawn(agent: Arc<WebrtcAgent>, room: &str, participant: &str, id: &str) -> Result<TransportHandle, AgentError> {
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (gather_tx, gathered) = watch::channel(false);
    let handler = Arc::new(Handler { events: events_tx.clone(), gathering: gather_tx });
    let pc = build_pc(&agent, handler).await?;
    let (tx, rx) = mpsc::channel(64);
    let task = Task {
        agent,
        id: id.to_string(),
        room: room.to_string(),
        participant: participant.to_string(),
        pc,
        events_tx,
        gathered,
        publications: Vec::new(),
        pending: Vec::new(),
        subs: HashMap::new(),
        connected: false,
        has_remote: false,
        early_candidates: Vec::new(),
    };
    let span = info_span!("transport", room = %room, participant = %participant, transport = %id);
    tokio::spawn(task.run(rx, events_rx).instrument(span));
    Ok(TransportHandle { room: room.to_string(), participant: participant.to_string(), tx })
}

/// Packets of each outgoing video stream kept for retransmission. webrtc-rs keeps 1024 by
/// default — 34 s of a 30 packet/s stream, per subscriber; 256 is still 1.7 s of 720p
/// (~150 packets/s), longer than any retransmission that can still arrive in time, and cut
/// the memory per subscriber (docs/performance.md).
const NACK_HISTORY: u16 = 256;

/// NACKs sent for one lost packet of a publisher. webrtc-rs's generator does not see RTX
/// repairs (they cross the interceptors under the RTX SSRC), so without a cap it asked for
/// every lost packet each 100 ms for as long as it stayed in its 512-packet log — some
/// 170 times at 30 packets/s — and the publisher answered each time. Three requests cover
/// a lost retransmission; the repeats that still arrive are dropped (`SeenWindow`).
const NACKS_PER_PACKET: u16 = 3;

/// webrtc-rs's default interceptors (NACK, TWCC feedback, RTCP reports) with a shorter
/// NACK history and capped NACK repeats, plus our keyframe-request tap.
fn interceptors(media: &mut MediaEngine) -> Result<Registry, webrtc::error::Error> {
    for parameter in ["", "pli"] {
        media.register_feedback(RTCPFeedback { typ: "nack".into(), parameter: parameter.into() }, RtpCodecKind::Video);
    }
    let registry = Registry::new()
        .with(Slot::NackResponder, NackResponderBuilder::new().with_size(NACK_HISTORY).build())
        .with(Slot::NackGenerator, NackGeneratorBuilder::new().with_max_nacks_per_packet(NACKS_PER_PACKET).build());
    configure_simulcast_extension_headers(media)?;
    let registry = configure_twcc_receiver_only(registry, media)?;
    Ok(configure_rtcp_reports(registry).with(Slot::from(14_000), KeyframeRequestTap::default()))
}

async fn build_pc(agent: &WebrtcAgent, handler: Arc<Handler>) -> Result<Arc<dyn PeerConnection>, AgentError> {
    let s = &agent.settings;
    let mut last_err = String::from("no free UDP port in the configured range");
    for _ in 0..5 {
        let Some(port) = agent.ports.allocate(&s.bind_ips) else { break };
        let mut media = MediaEngine::default();
        media.register_default_codecs().map_err(|e| AgentError::Failed(format!("media engine: {e}")))?;
        let registry = interceptors(&mut media).map_err(|e| AgentError::Failed(format!("interceptors: {e}")))?;
        let settings = SettingEngineBuilder::new()
            .with_multicast_dns_mode(MulticastDnsMode::Disabled)
            .with_ice_timeouts(Some(s.ice_disconnected_timeout), Some(s.ice_failed_timeout), Some(Duration::from_secs(2)))
            .build();
        let addrs: Vec<String> = s.bind_ips.iter().map(|ip| std::net::SocketAddr::new(*ip, port).to_string()).collect();
        let built = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(media)
            .with_setting_engine(settings)
            .with_interceptor_registry(registry)
            .with_handler(handler.clone() as Arc<dyn PeerConnectionEventHandler>)
            .with_udp_addrs(addrs)
            .build()
            .await;
        match built {
            Ok(pc) => return Ok(Arc::new(pc)),
            Err(e) => last_err = e.to_string(),
        }
    }
    Err(AgentError::Failed(format!("cannot open a media port: {last_err}")))
}

/// The payload type the subscriber negotiated for the publisher's codec: the same codec
/// with the same H.264 profile and packetization mode if offered, else the same codec.
pub(crate) fn negotiated_payload_type(
    codecs: &[rtc::rtp_transceiver::rtp_sender::RTCRtpCodecParameters],
    want: &rtc::rtp_transceiver::rtp_sender::RTCRtpCodec,
) -> Option<u8> {
    let same_mime = |c: &&rtc::rtp_transceiver::rtp_sender::RTCRtpCodecParameters| c.rtp_codec.mime_type.eq_ignore_ascii_case(&want.mime_type);
    let key = |fmtp: &str| {
        let mut parts: Vec<String> = fmtp
            .split(';')
            .map(|kv| kv.trim().to_ascii_lowercase())
            .filter(|kv| kv.starts_with("profile-level-id") || kv.starts_with("packetization-mode"))
            .collect();
        parts.sort();
        parts
    };
    let wanted = key(&want.sdp_fmtp_line);
    codecs
        .iter()
        .filter(same_mime)
        .find(|c| key(&c.rtp_codec.sdp_fmtp_line) == wanted)
        .or_else(|| codecs.iter().find(same_mime))
        .map(|c| c.payload_type)
}

/// The order in which m-lines appear in an SDP, by mid.
pub(crate) fn mid_order(sdp: &str) -> Vec<String> {
    sdp.lines().filter_map(|l| l.trim().strip_prefix("a=mid:")).map(str::to_string).collect()
}

/// Replaces the bound addresses in candidate lines with the public one (1:1 NAT).
fn announce_public_ip(sdp: &str, bound: &[std::net::IpAddr], public: Option<std::net::IpAddr>) -> String {
    let Some(public) = public else { return sdp.to_string() };
    let public = public.to_string();
    let bound: Vec<String> = bound.iter().map(|ip| ip.to_string()).collect();
    sdp.split_inclusive('\n')
        .map(|line| {
            if !line.starts_with("a=candidate:") {
                return line.to_string();
            }
            let mut fields: Vec<&str> = line.split(' ').collect();
            // a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ ...
            if let Some(address) = fields.get_mut(4)
                && bound.iter().any(|b| b == address)
            {
                *address = &public;
            }
            fields.join(" ")
        })
        .collect()
}

impl Task {
    async fn run(mut self, mut cmds: mpsc::Receiver<TransportCmd>, mut events: mpsc::UnboundedReceiver<PcEvent>) {
        debug!("transport opened");
        let reason = loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    None => break "agent gone".to_string(),
                    Some(TransportCmd::Close(reason)) => break reason,
                    Some(cmd) => self.command(cmd).await,
                },
                ev = events.recv() => match ev {
                    None => break "connection gone".to_string(),
                    Some(ev) => if let Some(reason) = self.event(ev).await { break reason },
                },
            }
        };
        self.shutdown(&reason).await;
    }

    async fn command(&mut self, cmd: TransportCmd) {
        match cmd {
            TransportCmd::Publish(p) => self.publications.push(p),
            TransportCmd::Subscribe(spec, sources, data_source) => self.pending.push(PendingSub { spec, sources, data_source }),
            TransportCmd::Offer(sdp, reply) => {
                let r = self.offer(sdp).await;
                if let Err(e) = &r {
                    warn!(error = ?e.to_string(), "offer failed");
                }
                let _ = reply.send(r);
            }
            TransportCmd::Candidate { candidate, sdp_mid, sdp_mline_index } => {
                let init = RTCIceCandidateInit { candidate, sdp_mid, sdp_mline_index, ..Default::default() };
                if self.has_remote {
                    if let Err(e) = self.pc.add_ice_candidate(init).await {
                        debug!(error = ?e.to_string(), "client candidate refused");
                    }
                } else if self.early_candidates.len() < 64 {
                    self.early_candidates.push(init);
                }
            }
            TransportCmd::EndSession(id) => {
                self.publications.retain(|p| p.id != id);
                self.pending.retain(|p| p.spec.at.session != *id.as_str());
                if let Some(sub) = self.subs.remove(&id) {
                    drop_sub(&id, sub);
                }
            }
            TransportCmd::Switch(id, switch) => {
                if let Some(sub) = self.subs.get(&id) {
                    for t in &sub.tracks {
                        if switch.covers(t.kind) {
                            let was = t.active.swap(switch.active, Ordering::Relaxed);
                            if switch.active && !was {
                                t.resync.store(true, Ordering::Relaxed);
                                t.source.request_keyframe();
                            }
                        }
                    }
                }
            }
            TransportCmd::Close(_) => {}
        }
    }

    /// Applies a client offer: attaches pending subscriptions, answers, starts forwarding.
    async fn offer(&mut self, sdp: String) -> Result<(), AgentError> {
        let order = mid_order(&sdp);
        let pending = std::mem::take(&mut self.pending);
        // Local sendonly transceivers are created before the offer is applied, in m-line
        // order, so webrtc-rs pairs each with the client's recvonly m-line of its kind.
        let mut planned: Vec<Planned> = Vec::new();
        for p in &pending {
            for (t, src) in p.spec.tracks.iter().zip(&p.sources) {
                let Some(track) = src.track(t.kind) else {
                    return Err(AgentError::Rejected(format!("Stream {} has no {} media", t.from, t.kind.as_str())));
                };
                let pos = order.iter().position(|m| *m == t.mid).ok_or_else(|| {
                    AgentError::Rejected(format!("the offer has no m-line with mid {} for subscription {}", t.mid, p.spec.at.session))
                })?;
                planned.push(Planned { pos, session: p.spec.at.session.to_string(), kind: t.kind, src: src.clone(), track });
            }
        }
        planned.sort_by_key(|p| p.pos);
        let mut locals: Vec<LocalTrack> = Vec::new();
        for Planned { session, kind, src, track, .. } in planned {
            let ssrc: u32 = rand::random();
            let codec_kind = match kind {
                MediaKind::Audio => RtpCodecKind::Audio,
                MediaKind::Video => RtpCodecKind::Video,
            };
            let local = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
                src.id.clone(),
                format!("{}-{}-{}", session, kind.as_str(), ssrc),
                format!("{}-{}", src.id, kind.as_str()),
                codec_kind,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(ssrc), ..Default::default() },
                    codec: track.codec.clone(),
                    ..Default::default()
                }],
            )));
            let init = RTCRtpTransceiverInit { direction: RTCRtpTransceiverDirection::Sendonly, streams: vec![], send_encodings: vec![] };
            self.pc
                .add_transceiver_from_track(local.clone() as Arc<dyn TrackLocal>, Some(init))
                .await
                .map_err(|e| AgentError::Failed(format!("adding a subscriber track: {e}")))?;
            locals.push(LocalTrack { session, kind, source: track, local, ssrc });
        }

        let offer = RTCSessionDescription::offer(sdp).map_err(|e| AgentError::Rejected(format!("invalid SDP offer: {e}")))?;
        self.pc.set_remote_description(offer).await.map_err(|e| AgentError::Rejected(format!("invalid SDP offer: {e}")))?;
        self.has_remote = true;
        for c in std::mem::take(&mut self.early_candidates) {
            if let Err(e) = self.pc.add_ice_candidate(c).await {
                debug!(error = ?e.to_string(), "early client candidate refused");
            }
        }
        let answer = self.pc.create_answer(None).await.map_err(|e| AgentError::Rejected(format!("cannot answer the offer: {e}")))?;
        self.pc.set_local_description(answer).await.map_err(|e| AgentError::Failed(format!("applying the answer: {e}")))?;
        let mut gathered = self.gathered.clone();
        let _ = tokio::time::timeout(GATHER_TIMEOUT, gathered.wait_for(|done| *done)).await;
        let local = self.pc.local_description().await.ok_or_else(|| AgentError::Failed("no local description".into()))?;
        let sdp = announce_public_ip(&local.sdp, &self.agent.settings.bind_ips, self.agent.settings.public_ip);
        self.progress(Progress::Answer { sdp }).await;

        // Bind each subscriber track to its fan-out, with the payload type negotiated here.
        let senders = self.pc.get_senders().await;
        let mut by_session: HashMap<String, Vec<SubTrack>> = HashMap::new();
        let mut stops: HashMap<String, (watch::Sender<bool>, watch::Receiver<bool>)> = HashMap::new();
        for LocalTrack { session, kind, source, local, ssrc } in locals {
            let mut payload_type = None;
            let as_dyn = local.clone() as Arc<dyn TrackLocal>;
            for s in &senders {
                if std::ptr::addr_eq(Arc::as_ptr(s.track()), Arc::as_ptr(&as_dyn))
                    && let Ok(params) = s.get_parameters().await
                {
                    payload_type = negotiated_payload_type(&params.rtp_parameters.codecs, &source.codec);
                }
            }
            let Some(payload_type) = payload_type else {
                warn!(%session, kind = kind.as_str(), codec = %source.codec.mime_type, "subscriber did not accept the publisher's codec");
                continue;
            };
            let stop_rx = stops.entry(session.clone()).or_insert_with(|| watch::channel(false)).1.clone();
            let (sink, rx) = Sink::new();
            let resync = sink.resync.clone();
            let sub_track = SubTrack {
                kind,
                source: source.clone(),
                fanout: source.fanout.clone(),
                sink_id: sink.id,
                active: sink.active.clone(),
                resync: resync.clone(),
            };
            source.fanout.add(sink);
            tokio::spawn(write_loop(local.clone(), rx, Rewriter::new(ssrc, payload_type), resync));
            if kind == MediaKind::Video {
                tokio::spawn(feedback_loop(local, source.clone(), stop_rx));
            }
            by_session.entry(session).or_default().push(sub_track);
        }
        for p in pending {
            let id = p.spec.at.session.to_string();
            let (stop, _) = stops.remove(&id).unwrap_or_else(|| watch::channel(false));
            let tracks = by_session.remove(&id).unwrap_or_default();
            self.subs.insert(id.clone(), SubState { tracks, data_source: p.data_source, ready_sent: false, stop });
        }
        if self.connected {
            self.announce_subscriptions().await;
        }
        Ok(())
    }

    /// Tells the client its new subscriptions are up, and asks for keyframes for them.
    async fn announce_subscriptions(&mut self) {
        let mut ready = Vec::new();
        for (id, sub) in self.subs.iter_mut().filter(|(_, s)| !s.ready_sent) {
            sub.ready_sent = true;
            for t in &sub.tracks {
                t.source.request_keyframe();
            }
            ready.push(id.clone());
        }
        for id in ready {
            self.progress(Progress::SessionReady { session: id.into() }).await;
        }
    }

    async fn progress(&self, progress: Progress) {
        let event = AgentEvent::Progress {
            room: self.room.as_str().into(),
            participant: self.participant.as_str().into(),
            transport: self.id.as_str().into(),
            progress,
        };
        self.agent.emit(event).await;
    }

    /// Handles a connection event; returns a reason when the transport must end.
    async fn event(&mut self, ev: PcEvent) -> Option<String> {
        match ev {
            PcEvent::State(state) => {
                debug!(%state, "connection state");
                match state {
                    RTCPeerConnectionState::Connected if !self.connected => {
                        self.connected = true;
                        info!("transport connected");
                        self.progress(Progress::TransportReady).await;
                        self.announce_subscriptions().await;
                    }
                    RTCPeerConnectionState::Failed => return Some("connection failed".into()),
                    RTCPeerConnectionState::Closed => return Some("connection closed".into()),
                    _ => {}
                }
            }
            PcEvent::Track(remote) => self.track(remote).await,
            PcEvent::DataChannel(dc) => self.data_channel(dc).await,
            PcEvent::DataOpen(publication) => {
                if let Some(p) = self.publications.iter().find(|p| p.id == publication).cloned() {
                    p.set_data_open();
                    self.check_ready(&p).await;
                }
            }
        }
        None
    }

    /// A publisher's track started flowing.
    async fn track(&mut self, remote: Arc<dyn TrackRemote>) {
        let Some(ssrc) = remote.ssrcs().await.first().copied() else { return };
        let Some(codec) = remote.codec(ssrc).await else {
            warn!(ssrc, "track without a negotiated codec ignored");
            return;
        };
        let mut mid = None;
        for t in self.pc.get_transceivers().await {
            if let Ok(Some(r)) = t.receiver().await
                && std::ptr::addr_eq(Arc::as_ptr(r.track()), Arc::as_ptr(&remote))
            {
                mid = t.mid().await.ok().flatten();
                break;
            }
        }
        let Some(mid) = mid else {
            warn!(ssrc, "track on an unknown m-line ignored");
            return;
        };
        let found = self.publications.iter().find_map(|p| p.announced_at(&mid).map(|a| (p.clone(), a.kind)));
        let Some((publication, kind)) = found else {
            debug!(mid = ?mid, "track that no publication announced; ignored");
            return;
        };
        if publication.has_flowing(kind) {
            return;
        }
        info!(publication = %publication.id, kind = kind.as_str(), codec = %codec.mime_type, ssrc, "publisher track flowing");
        let track = publication.add_track(kind, codec, crate::publication::KeyframeSource::Remote { track: remote, ssrc });
        tokio::spawn(track.run_reader(publication.ended.clone()));
        self.check_ready(&publication).await;
    }

    async fn check_ready(&self, p: &Arc<Publication>) {
        if p.check_ready() {
            self.progress(Progress::SessionReady { session: p.id.as_str().into() }).await;
            self.agent.emit(AgentEvent::StreamReady { room: self.room.as_str().into(), stream: p.stream_info() }).await;
        }
    }

    /// A data channel opened by the client: a subscriber's (labelled with the stream id
    /// it wants) or a publisher's (any other label, on a transport with a data publication).
    async fn data_channel(&mut self, dc: Arc<dyn DataChannel>) {
        let label = dc.label().await.unwrap_or_default();
        let sub =
            self.subs.iter().find(|(_, s)| s.data_source.as_ref().is_some_and(|d| d.id == label)).map(|(id, s)| (id.clone(), s.data_source.clone()));
        if let Some((sub_id, Some(source))) = sub {
            source.add_data_sink(&sub_id, dc.clone());
            // Drain the subscriber channel's events so its queue never fills.
            tokio::spawn(async move { while dc.poll().await.is_some() {} });
            return;
        }
        let Some(p) = self.publications.iter().find(|p| p.data && !p.is_ready()).cloned() else {
            debug!(label = ?label, "data channel with no matching publication or subscription; ignored");
            return;
        };
        let events = self.events_tx.clone();
        let _ = events.send(PcEvent::DataOpen(p.id.clone()));
        tokio::spawn(async move {
            while let Some(ev) = dc.poll().await {
                match ev {
                    DataChannelEvent::OnMessage(msg) => p.relay_data(msg.is_string, &msg.data).await,
                    DataChannelEvent::OnClose => break,
                    _ => {}
                }
            }
        });
    }

    async fn shutdown(mut self, reason: &str) {
        for (id, sub) in self.subs.drain() {
            drop_sub(&id, sub);
        }
        for p in &self.publications {
            p.end();
        }
        if let Err(e) = self.pc.close().await {
            debug!(error = %e, "closing the peer connection");
        }
        self.agent.transport_closed(&self.id, reason).await;
    }
}

fn drop_sub(id: &str, sub: SubState) {
    for t in &sub.tracks {
        t.fanout.remove(t.sink_id);
    }
    if let Some(d) = &sub.data_source {
        d.remove_data_sink(id);
    }
    let _ = sub.stop.send(true);
}

/// Writes one subscriber track: rewrite, then send. Ends when the sink is removed.
async fn write_loop(local: Arc<TrackLocalStaticRTP>, mut rx: mpsc::Receiver<rtc::rtp::Packet>, mut rw: Rewriter, resync: Arc<AtomicBool>) {
    while let Some(mut packet) = rx.recv().await {
        if resync.swap(false, Ordering::Relaxed) {
            rw.resync();
        }
        rw.rewrite(&mut packet);
        // Fails before DTLS is up (the track is not bound yet) and after close: both benign.
        let _ = local.write_rtp(packet).await;
    }
}

/// Relays a subscriber's keyframe requests to the publisher (throttled there).
async fn feedback_loop(local: Arc<TrackLocalStaticRTP>, source: Arc<PubTrack>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            ev = local.poll() => match ev {
                Some(TrackLocalEvent::OnRtcpPacket(packets)) => {
                    if packets.iter().any(|p| is_keyframe_request(p.as_ref())) {
                        source.request_keyframe();
                    }
                }
                Some(_) => {}
                None => {
                    // Not bound yet (poll returns None before negotiation) or unbound: wait a bit.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = stop.changed() => return,
                    }
                }
            },
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_ip_rewrites_only_bound_candidates() {
        let sdp = "v=0\r\na=candidate:1 1 udp 2130706431 10.0.0.5 40000 typ host\r\na=candidate:2 1 udp 1 192.168.1.1 40001 typ host\r\na=mid:0\r\n";
        let out = announce_public_ip(sdp, &["10.0.0.5".parse().unwrap()], Some("203.0.113.7".parse().unwrap()));
        assert!(out.contains("203.0.113.7 40000 typ host\r\n"));
        assert!(out.contains("192.168.1.1 40001"));
        assert_eq!(announce_public_ip(sdp, &[], None), sdp);
        assert_eq!(mid_order(&out), vec!["0"]);
    }
}

/// Property tests of the SDP helpers, and of the parsers (webrtc-rs's) that read what
/// clients send: SDP offers, ICE candidates and RTCP feedback.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;
    use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodecParameters};

    fn config() -> ProptestConfig {
        ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() }
    }

    fn text(max: usize) -> impl Strategy<Value = String> {
        prop::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter)
    }

    const OFFER: &str = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n\
a=msid-semantic: WMS\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n\
a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=ice-options:trickle\r\n\
a=fingerprint:sha-256 AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99\r\n\
a=setup:actpass\r\na=mid:0\r\na=sendonly\r\na=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n\
a=ssrc:1 cname:x\r\nm=video 9 UDP/TLS/RTP/SAVPF 96 102\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=sendonly\r\na=rtcp-mux\r\n\
a=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack pli\r\na=rtpmap:102 H264/90000\r\n\
a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n\
a=candidate:1 1 udp 2130706431 10.0.0.5 40000 typ host\r\na=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid\r\n";

    /// SDP-looking text: lines of the offer above, cut, repeated and mixed with junk.
    fn sdp_like() -> impl Strategy<Value = String> {
        let lines: Vec<&'static str> = OFFER.split("\r\n").filter(|l| !l.is_empty()).collect();
        let line = prop_oneof![
            4 => prop::sample::select(lines.clone()).prop_map(str::to_string),
            2 => (prop::sample::select(lines), any::<prop::sample::Index>(), text(6)).prop_map(|(l, cut, junk)| {
                let cut = cut.index(l.len() + 1);
                format!("{}{junk}", l.get(..cut).unwrap_or(l))
            }),
            1 => "[a-z]=[ -~]{0,20}",
            1 => text(20),
        ];
        (prop::collection::vec(line, 0..30), prop::sample::select(&["\r\n", "\n", "\r"][..]))
            .prop_map(|(lines, eol)| lines.iter().map(|l| format!("{l}{eol}")).collect::<String>())
    }

    fn ip() -> impl Strategy<Value = std::net::IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(std::net::IpAddr::from),
            any::<[u16; 8]>().prop_map(std::net::IpAddr::from),
            prop::sample::select(&["10.0.0.5", "192.168.1.1", "::1"][..]).prop_map(|s| s.parse().unwrap()),
        ]
    }

    fn fmtp() -> impl Strategy<Value = String> {
        let part = prop_oneof![
            prop::sample::select(&["profile-level-id=42e01f", "profile-level-id=42E01F", "profile-level-id=640c1f", "profile-level-id=4d001f"][..]),
            prop::sample::select(&["packetization-mode=1", "packetization-mode=0", " packetization-mode=1 "][..]),
            prop::sample::select(&["level-asymmetry-allowed=1", "minptime=10", "", "=", ";"][..]),
        ];
        prop_oneof![4 => prop::collection::vec(part, 0..4).prop_map(|p| p.join(";")), 1 => text(20)]
    }

    fn codec(mime: impl Strategy<Value = &'static str>) -> impl Strategy<Value = RTCRtpCodec> {
        (mime, fmtp()).prop_map(|(mime_type, sdp_fmtp_line)| RTCRtpCodec {
            mime_type: mime_type.to_string(),
            clock_rate: 90000,
            sdp_fmtp_line,
            ..Default::default()
        })
    }

    fn mimes() -> impl Strategy<Value = &'static str> {
        prop::sample::select(&["video/H264", "video/h264", "video/VP8", "audio/opus", "video/AV1", ""][..])
    }

    /// The H.264 parameters that decide whether two codecs carry the same stream.
    fn h264_key(fmtp: &str) -> Vec<String> {
        let mut k: Vec<String> = fmtp
            .split(';')
            .map(|kv| kv.trim().to_ascii_lowercase())
            .filter(|kv| kv.starts_with("profile-level-id") || kv.starts_with("packetization-mode"))
            .collect();
        k.sort();
        k
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn announce_public_ip_replaces_exactly_the_bound_addresses(
            sdp in prop_oneof![sdp_like(), text(60)],
            bound in prop::collection::vec(ip(), 0..3),
            public in prop::option::of(ip()),
        ) {
            let out = announce_public_ip(&sdp, &bound, public);
            let Some(public) = public else {
                prop_assert_eq!(out, sdp);
                return Ok(());
            };
            let before: Vec<&str> = sdp.split_inclusive('\n').collect();
            let after: Vec<&str> = out.split_inclusive('\n').collect();
            prop_assert_eq!(before.len(), after.len());
            for (b, a) in before.iter().zip(&after) {
                let (bf, af): (Vec<&str>, Vec<&str>) = (b.split(' ').collect(), a.split(' ').collect());
                prop_assert_eq!(bf.len(), af.len());
                for (i, (x, y)) in bf.iter().zip(&af).enumerate() {
                    let replaced = b.starts_with("a=candidate:") && i == 4 && bound.iter().any(|ip| ip.to_string() == *x);
                    if replaced {
                        prop_assert_eq!(y.to_string(), public.to_string());
                    } else {
                        prop_assert_eq!(x, y);
                    }
                }
            }
        }

        #[test]
        fn mid_order_lists_the_mid_lines(sdp in prop_oneof![sdp_like(), text(60)]) {
            let mids = mid_order(&sdp);
            prop_assert_eq!(mids.len(), sdp.lines().filter(|l| l.trim().starts_with("a=mid:")).count());
            for m in &mids {
                let line = format!("a=mid:{m}");
                prop_assert!(sdp.contains(&line), "{:?} is not in the SDP", m);
            }
        }

        #[test]
        fn negotiated_payload_type_prefers_the_same_h264_stream(
            want in codec(mimes()),
            offered in prop::collection::vec((codec(mimes()), any::<u8>()), 0..6),
        ) {
            let codecs: Vec<RTCRtpCodecParameters> =
                offered.into_iter().map(|(rtp_codec, payload_type)| RTCRtpCodecParameters { rtp_codec, payload_type }).collect();
            let same: Vec<&RTCRtpCodecParameters> = codecs.iter().filter(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(&want.mime_type)).collect();
            match negotiated_payload_type(&codecs, &want) {
                None => prop_assert!(same.is_empty()),
                Some(pt) => {
                    prop_assert!(same.iter().any(|c| c.payload_type == pt), "{} is not a payload type of the same codec", pt);
                    let exact = same.iter().find(|c| h264_key(&c.rtp_codec.sdp_fmtp_line) == h264_key(&want.sdp_fmtp_line));
                    let expected = exact.or(same.first()).map(|c| c.payload_type);
                    prop_assert_eq!(Some(pt), expected);
                }
            }
        }

        #[test]
        fn sdp_offers_parse_or_fail_cleanly(sdp in prop_oneof![sdp_like(), text(80)]) {
            if let Ok(offer) = RTCSessionDescription::offer(sdp) {
                let _ = offer.unmarshal();
            }
        }

        #[test]
        fn ice_candidates_parse_or_fail_cleanly(line in prop_oneof![
            "(candidate:)?[0-9a-z]{0,4} [0-9]{0,2} (udp|tcp|UDP|x) [0-9]{0,10} [0-9a-f.:]{0,20} [0-9]{0,6} typ (host|srflx|relay|x)( raddr [0-9.]{0,15} rport [0-9]{0,6})?( tcptype (active|passive|so))?( generation [0-9])?",
            text(60),
        ]) {
            let _ = rtc::ice::candidate::unmarshal_candidate(&line);
        }

        #[test]
        fn rtcp_feedback_parses_or_fails_cleanly(
            packets in prop::collection::vec((192u8..=207, 0u8..32, any::<bool>(), prop::collection::vec(any::<u8>(), 0..40)), 1..4),
            raw in prop::collection::vec(any::<u8>(), 0..80),
            use_raw in prop::bool::weighted(0.2),
        ) {
            // Mostly RTCP headers (version 2, a real packet type, a length that may lie)
            // in front of random bodies.
            let bytes: Vec<u8> = if use_raw {
                raw
            } else {
                packets
                    .iter()
                    .flat_map(|(pt, count, honest, body)| {
                        let words = if *honest { body.len() / 4 } else { usize::from(*count) };
                        let mut p = vec![0x80 | count, *pt, 0, u8::try_from(words).unwrap_or(255)];
                        p.extend_from_slice(&body[..body.len() / 4 * 4]);
                        p
                    })
                    .collect()
            };
            if let Ok(parsed) = rtc::rtcp::packet::unmarshal(&mut &bytes[..]) {
                for p in &parsed {
                    let _ = is_keyframe_request(p.as_ref());
                }
            }
        }
    }
}
