//! The forwarding engine (`webrtc.engine = "workers"`): webrtc-rs's sans-I/O
//! `rtc` driven by one OS thread per CPU, each owning one UDP socket (port
//! `udp_port_min + worker`) and every peer connection placed on it. ICE-lite: the
//! server answers the client's checks and never sends its own, so one socket serves all
//! its connections (see [`demux`]).
//!
//! This module is the control plane: it places transports on workers, keeps the registry
//! of publications, subscriptions and transports the portal's commands are checked
//! against, and reports to the portal. The packet path lives in [`worker`], on the
//! worker threads, without locks.

mod demux;
mod tcp;
mod udp;
mod worker;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::{GCC_MAX_BITRATE, GCC_MIN_BITRATE, NackGeneratorBuilder, ReceiverReportBuilder, Registry, Slot, TwccReceiverBuilder};
use rtc::peer_connection::certificate::{CertificateParams, RTCCertificate};
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::configure_simulcast_extension_headers;
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::transport::{RTCDtlsRole, RTCIceCandidateInit};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{RTCPFeedback, RTCRtpCodec, RTCRtpHeaderExtensionCapability, RtpCodecKind, TYPE_RTCP_FB_TRANSPORT_CC};
use rtc::sdp::extmap::TRANSPORT_CC_URI;
use rtc::shared::marshal::Unmarshal;
use tessera_core::agent::{AgentError, AgentEvent, LayerChoice, MediaKind, Progress, Signaling};
use tessera_core::command::{AgentCommand, AgentReply, MediaNode, MediaStats};
use tessera_core::media::{ImportError, LocalTrack, RtpReceiver, RtpSink, StreamImporter, StreamSource, Tap};
use tessera_core::{RoomId, StreamInfo};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::AgentSettings;
use crate::bwe::{Estimate, SendSide, SubscriberEstimator};
use crate::codec::{codec_info, rtc_codec};
use crate::rtcp_counter::RtcpCounters;
use crate::simulcast::{LayerBoard, VideoCodec};
use crate::stack::Stack;
use crate::wire::Wire;
use worker::{Batch, Cmd, SourceTrack, Worker};

/// A published track, unique across workers.
pub(crate) type TrackId = u64;

/// Where a subscriber connection's GCC target starts (bits per second).
const GCC_START_BITRATE: f64 = 1_000_000.0;

/// Batches queued from one worker to another before new ones are dropped.
const INBOX: usize = 1024;
/// Socket buffer size asked for (bytes).
const SOCKET_BUFFER: usize = 4 << 20;
/// Packets queued for a tap (mixer or recorder input) before new ones are dropped.
const TAP_QUEUE: usize = 512;
/// A room's transports stay on its first worker until that worker holds this many more
/// transports than the least loaded one; then new ones spread (large fan-outs use every core).
const ROOM_SPREAD: usize = 16;

/// How the control plane reaches one worker.
struct WorkerHandle {
    cmds: mpsc::UnboundedSender<Cmd>,
    data: mpsc::Sender<Batch>,
}

/// A flowing track of a publication, as subscriptions find it.
#[derive(Debug, Clone)]
struct PubTrack {
    kind: MediaKind,
    track: TrackId,
    codec: RTCRtpCodec,
    /// A local track's consumer count (the worker keeps it exact; a new tap counts at once).
    consumers: Option<Arc<AtomicUsize>>,
    /// The layers of a simulcast video (`track` is the first that flowed).
    layers: Option<Arc<LayerBoard>>,
}

impl PubTrack {
    /// Every track it has: each layer of a simulcast video, else the one.
    fn all_tracks(&self) -> Vec<TrackId> {
        match &self.layers {
            Some(b) => b.layers.iter().map(|l| l.track).collect(),
            None => vec![self.track],
        }
    }
}

struct PubEntry {
    room: String,
    /// Empty for streams produced inside the server (mixed views).
    participant: String,
    transport: String,
    worker: usize,
    tracks: Vec<PubTrack>,
    ready: bool,
}

struct SubEntry {
    participant: String,
    transport: String,
    /// The streams it reads.
    from: Vec<String>,
}

struct TransportEntry {
    room: String,
    participant: String,
    worker: usize,
    sessions: HashSet<String>,
}

/// The control plane's registry (never touched on the packet path).
#[derive(Default)]
struct State {
    transports: HashMap<String, TransportEntry>,
    publications: HashMap<String, PubEntry>,
    subscriptions: HashMap<String, SubEntry>,
    by_participant: HashMap<String, HashSet<String>>,
    homes: HashMap<String, usize>,
}

/// What the workers share with the control plane.
pub(crate) struct Shared {
    settings: AgentSettings,
    workers: OnceLock<Vec<WorkerHandle>>,
    state: Mutex<State>,
    /// Events in order, to the task that forwards them to the portal.
    events: mpsc::UnboundedSender<AgentEvent>,
    next_track: AtomicU64,
    next_tap: AtomicU64,
    certificate: RTCCertificate,
    crypto: Arc<dyn rtc::crypto::RTCCryptoProvider>,
    /// Each worker's traffic totals, stored by the worker once per loop round.
    pub(crate) traffic: Vec<TrafficCells>,
    /// RTCP the interceptors consume (NACKs, receiver reports), counted by every connection.
    rtcp: Arc<RtcpCounters>,
    /// The codecs and header extensions every connection starts from, made once: a clone
    /// is what registering them again would make, without the slack of vectors grown one
    /// push at a time (kilobytes per connection) or the work.
    media: MediaEngine,
}

/// Traffic totals of one worker since start (transport level: media, RTCP, STUN, DTLS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Datagrams and ICE-TCP frames received.
    pub packets_in: u64,
    /// Their bytes.
    pub bytes_in: u64,
    /// Datagrams handed to the kernel and ICE-TCP frames queued on their connection.
    pub packets_out: u64,
    /// Their bytes.
    pub bytes_out: u64,
    /// Datagrams dropped behind a full send queue.
    pub dropped_out: u64,
    /// RTP packets received from publishers (after decryption).
    pub rtp_in: u64,
    /// Keyframe requests (PLI/FIR) received from subscribers.
    pub keyframe_requests_in: u64,
    /// PLIs sent to publishers (after throttling).
    pub plis_out: u64,
    /// Connections whose ICE and DTLS completed, now (a gauge, not a total).
    pub connected: u64,
}

impl Traffic {
    fn add(&mut self, o: &Traffic) {
        self.packets_in += o.packets_in;
        self.bytes_in += o.bytes_in;
        self.packets_out += o.packets_out;
        self.bytes_out += o.bytes_out;
        self.dropped_out += o.dropped_out;
        self.rtp_in += o.rtp_in;
        self.keyframe_requests_in += o.keyframe_requests_in;
        self.plis_out += o.plis_out;
        self.connected += o.connected;
    }
}

/// A worker's [`Traffic`], readable from other threads. On a cache line of its own, so
/// workers storing theirs do not steal each other's line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct TrafficCells([AtomicU64; 9]);

impl TrafficCells {
    /// Called by the owning worker only, once per loop round (not per packet).
    pub(crate) fn store(&self, t: &Traffic) {
        let values = [t.packets_in, t.bytes_in, t.packets_out, t.bytes_out, t.dropped_out, t.rtp_in, t.keyframe_requests_in, t.plis_out, t.connected];
        for (cell, v) in self.0.iter().zip(values) {
            cell.store(v, Ordering::Relaxed);
        }
    }

    fn load(&self) -> Traffic {
        let [a, b, c, d, e, f, g, h, i] = self.0.each_ref().map(|c| c.load(Ordering::Relaxed));
        Traffic {
            packets_in: a,
            bytes_in: b,
            packets_out: c,
            bytes_out: d,
            dropped_out: e,
            rtp_in: f,
            keyframe_requests_in: g,
            plis_out: h,
            connected: i,
        }
    }
}

/// Everything `/metrics` reads of the agent.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AgentMetrics {
    /// Live object counts.
    pub stats: MediaStats,
    /// Traffic totals of all workers.
    pub traffic: Traffic,
    /// NACKs received from subscribers.
    pub nacks_in: u64,
    /// Packets those NACKs asked for.
    pub nacked_packets: u64,
    /// NACKs sent to publishers.
    pub nacks_out: u64,
    /// Publishers' retransmissions that came over RTX, restored to their stream.
    pub rtx_repairs: u64,
    /// Receiver report blocks from subscribers.
    pub reports: u64,
    /// Sum of their fraction lost (0..1 each).
    pub fraction_lost_sum: f64,
    /// Round-trip times measured from those reports.
    pub rtt_samples: u64,
    /// Their sum, in seconds.
    pub rtt_sum_secs: f64,
}

impl Shared {
    /// The crypto backend (STUN integrity checks).
    pub(crate) fn crypto(&self) -> &dyn rtc::crypto::RTCCrypto {
        self.crypto.crypto()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, event: AgentEvent) {
        if self.events.send(event).is_err() {
            debug!("portal gone; agent event dropped");
        }
    }

    pub(crate) fn next_track(&self) -> TrackId {
        self.next_track.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends a command to every worker but `except`.
    pub(crate) fn broadcast(&self, except: usize, cmd: impl Fn(usize) -> Cmd) {
        for (i, w) in self.workers.get().into_iter().flatten().enumerate() {
            if i != except {
                let _ = w.cmds.send(cmd(i));
            }
        }
    }

    pub(crate) fn send_to(&self, worker: usize, cmd: Cmd) {
        if let Some(w) = self.workers.get().and_then(|w| w.get(worker)) {
            let _ = w.cmds.send(cmd);
        }
    }

    /// Hands a batch to another worker; a full inbox drops it (that worker is overloaded,
    /// and waiting would stall this one).
    pub(crate) fn send_batch(&self, worker: usize, batch: Batch) {
        if let Some(w) = self.workers.get().and_then(|w| w.get(worker)) {
            let _ = w.data.try_send(batch);
        }
    }

    pub(crate) fn progress(&self, room: &str, participant: &str, transport: &str, progress: Progress) {
        self.emit(AgentEvent::Progress { room: room.into(), participant: participant.into(), transport: transport.into(), progress });
    }

    /// Sessions a worker ended before they started (see `Worker::refuse`): forgotten here,
    /// and each reported with `reason` (unless ended meanwhile by the portal).
    pub(crate) fn sessions_refused(
        &self,
        room: &str,
        participant: &str,
        transport: &str,
        publications: &[String],
        subscriptions: &[String],
        reason: &str,
    ) {
        let (publications, subscriptions) = {
            let mut s = self.lock();
            let publications: Vec<&String> = publications
                .iter()
                .filter(|id| match s.publications.get(id.as_str()) {
                    Some(p) if p.transport == transport => s.publications.remove(id.as_str()).is_some(),
                    _ => false,
                })
                .collect();
            let subscriptions: Vec<&String> = subscriptions
                .iter()
                .filter(|id| match s.subscriptions.get(id.as_str()) {
                    Some(e) if e.transport == transport => s.subscriptions.remove(id.as_str()).is_some(),
                    _ => false,
                })
                .collect();
            if let Some(entry) = s.transports.get_mut(transport) {
                for id in publications.iter().chain(&subscriptions) {
                    entry.sessions.remove(id.as_str());
                }
            }
            (publications, subscriptions)
        };
        for id in publications {
            self.emit(AgentEvent::PublicationFailed {
                room: room.into(),
                participant: participant.into(),
                transport: transport.into(),
                publication: id.as_str().into(),
                reason: reason.into(),
            });
        }
        for id in subscriptions {
            self.emit(AgentEvent::SubscriptionEnded {
                room: room.into(),
                participant: participant.into(),
                transport: transport.into(),
                subscription: id.as_str().into(),
                reason: reason.into(),
            });
        }
    }

    pub(crate) fn track_flowing(&self, publication: &str, kind: MediaKind, track: TrackId, codec: RTCRtpCodec, layers: Option<Arc<LayerBoard>>) {
        if let Some(p) = self.lock().publications.get_mut(publication) {
            p.tracks.retain(|t| t.kind != kind);
            p.tracks.push(PubTrack { kind, track, codec, consumers: None, layers });
        }
    }

    /// A publication's media all flow: tell the room (which tells its publisher `ready`),
    /// unless it ended meanwhile (an `unpublish` the worker has not applied yet must not
    /// resurrect it).
    pub(crate) fn publication_ready(&self, room: &str, transport: &str, stream: StreamInfo) {
        let mut s = self.lock();
        let Some(p) = s.publications.get_mut(stream.id.as_str()) else { return };
        p.ready = true;
        // Emitted under the lock, so an end of this publication is reported after it.
        self.emit(AgentEvent::StreamReady { room: room.into(), stream, transport: transport.into() });
    }

    /// A worker closed a transport: forget its sessions and tell the portal (ended streams,
    /// ended subscriptions, the closed transport).
    pub(crate) fn transport_closed(&self, transport: &str, reason: &str) {
        let (entry, ended, subs) = {
            let mut s = self.lock();
            let Some(t) = s.transports.remove(transport) else { return };
            let room_in_use = s.transports.values().any(|o| o.room == t.room) || s.publications.values().any(|p| p.room == t.room);
            if !room_in_use {
                s.homes.remove(&t.room);
            }
            if let Some(set) = s.by_participant.get_mut(&t.participant) {
                set.remove(transport);
                if set.is_empty() {
                    s.by_participant.remove(&t.participant);
                }
            }
            let mut ended = Vec::new();
            let mut subs = Vec::new();
            for id in &t.sessions {
                if let Some(p) = s.publications.remove(id) {
                    ended.push((id.clone(), p.ready));
                }
                if s.subscriptions.remove(id).is_some() {
                    subs.push(id.clone());
                }
            }
            (t, ended, subs)
        };
        for (id, ready) in &ended {
            if *ready {
                self.emit(AgentEvent::StreamEnded { room: entry.room.as_str().into(), stream: id.as_str().into(), reason: reason.into() });
            }
        }
        // The transport first: the portal then knows these subscriptions ended with it
        // (no session error of their own to tell).
        self.emit(AgentEvent::TransportClosed {
            room: entry.room.as_str().into(),
            participant: entry.participant.as_str().into(),
            transport: transport.into(),
            sessions: entry.sessions.iter().map(|s| s.as_str().into()).collect(),
            reason: reason.into(),
        });
        for id in &subs {
            self.emit(AgentEvent::SubscriptionEnded {
                room: entry.room.as_str().into(),
                participant: entry.participant.as_str().into(),
                transport: transport.into(),
                subscription: id.as_str().into(),
                reason: reason.into(),
            });
        }
    }
}

/// A random string of ASCII letters and digits (ICE credentials).
pub(crate) fn random_token(len: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..len).map(|_| CHARS.get(rng.random_range(0..CHARS.len())).copied().map(char::from).unwrap_or('x')).collect()
}

/// Packets of each outgoing video stream kept for retransmission: 256 is 1.7 s of 720p,
/// longer than a retransmission can usefully arrive (webrtc-rs keeps 1024: 34 s).
const NACK_HISTORY: u16 = 256;
/// NACKs sent for one lost packet of a publisher whose repair does not come (one that
/// comes ends them: RTX is restored ahead of the generator, [`crate::rtx_in`]).
const NACKS_PER_PACKET: u16 = 3;

/// The codecs and header extensions a connection offers and accepts: rtc's defaults (each
/// video codec with NACK, PLI, FIR and REMB feedback already), the simulcast extensions,
/// and transport-wide congestion control feedback (what rtc's `configure_twcc_receiver_only`
/// registers; its interceptor is in each connection's stack). NACK and PLI are not
/// registered again: `register_feedback` adds to every codec of a kind that lacks it, so
/// that only gave them to the eleven RTX codecs, which are never asked to repair.
fn media_engine() -> Result<MediaEngine, AgentError> {
    let failed = |what: &str, e: rtc::shared::error::Error| AgentError::Failed(format!("{what}: {e}"));
    let mut media = MediaEngine::default();
    media.register_default_codecs().map_err(|e| failed("media engine", e))?;
    configure_simulcast_extension_headers(&mut media).map_err(|e| failed("interceptors", e))?;
    for kind in [RtpCodecKind::Video, RtpCodecKind::Audio] {
        media.register_feedback(RTCPFeedback { typ: TYPE_RTCP_FB_TRANSPORT_CC.into(), parameter: String::new() }, kind);
        media
            .register_header_extension(RTCRtpHeaderExtensionCapability { uri: TRANSPORT_CC_URI.to_string() }, kind, None)
            .map_err(|e| failed("interceptors", e))?;
    }
    Ok(media)
}

/// A connection as [`build_pc`] makes it, with what the worker keeps of its insides.
pub(crate) struct Built {
    pub(crate) pc: RTCPeerConnection,
    /// What its send-side bandwidth estimator found.
    pub(crate) estimate: Arc<Estimate>,
    /// How its SRTP was keyed.
    pub(crate) tap: Arc<crate::srtp_out::KeyTap>,
    /// Its interceptors, for the packets the worker encrypts itself.
    pub(crate) stack: crate::stack::SharedStack,
}

/// A server-side peer connection: ICE-lite with this worker's credentials, the shared
/// DTLS certificate, webrtc-rs's default codecs and the interceptors docs/sfu.md lists.
/// With `webrtc.bandwidth_estimation`, the connection also numbers what it sends
/// (transport-wide sequence numbers) and estimates its bandwidth from the client's TWCC
/// feedback ([`crate::bwe`]), without a pacer (forwarded media leaves as it comes; the
/// estimate only chooses simulcast layers); what it finds is returned with it.
pub(crate) fn build_pc(shared: &Shared, ufrag: &str, password: &str, now: Instant) -> Result<Built, AgentError> {
    let failed = |what: &str, e: rtc::shared::error::Error| AgentError::Failed(format!("{what}: {e}"));
    let media = shared.media.clone();
    let estimate = Arc::new(Estimate::default());
    // Working only once the connection takes a simulcast video on auto (see `SendSide`).
    let send_side = shared
        .settings
        .bandwidth_estimation
        .then(|| SendSide::new(SubscriberEstimator::new(GCC_START_BITRATE, GCC_MIN_BITRATE, GCC_MAX_BITRATE, estimate.clone()), estimate.clone()));
    // One link of rtc's chain (see `crate::stack`), in the slot wire-most.
    let stack = Stack::new(
        Wire::new(shared.rtcp.clone(), send_side),
        crate::responder::Responder::new(NACK_HISTORY),
        NackGeneratorBuilder::new().with_max_nacks_per_packet(NACKS_PER_PACKET).build(),
        TwccReceiverBuilder::new().build(),
        ReceiverReportBuilder::new().build(),
        crate::sender_reports::SenderReports::new(crate::sender_reports::INTERVAL),
    );
    let stack = crate::stack::SharedStack::new(stack);
    let registry = Registry::new().with(Slot::CongestionControl, stack.clone());
    let s = &shared.settings;
    let tap = crate::srtp_out::KeyTap::new(shared.crypto.clone());
    let settings = SettingEngineBuilder::new()
        .with_crypto_provider(tap.clone())
        .with_lite(true)
        .with_ice_credentials(ufrag.to_string(), password.to_string())
        .with_answering_dtls_role(RTCDtlsRole::Server)
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        .with_ice_timeouts(Some(s.ice_disconnected_timeout), Some(s.ice_failed_timeout), Some(Duration::from_secs(2)))
        .build();
    RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().with_certificates(vec![shared.certificate.clone()]).build())
        .with_media_engine(media)
        .with_setting_engine(settings)
        .with_interceptor_registry(registry)
        .build(now)
        .map(|pc| Built { pc, estimate, tap, stack })
        .map_err(|e| failed("peer connection", e))
}

/// A worker's sockets: UDP, and the ICE-TCP listener on the same port number.
type Sockets = (std::net::UdpSocket, Option<std::net::TcpListener>);

/// Binds `count` consecutive ports on `ip` (UDP, and TCP too with `tcp`): `min..min+count`
/// if free, else the next free block in the range (another server on the machine, or a
/// test running beside).
fn bind_block(ip: std::net::IpAddr, min: u16, max: u16, count: usize, tcp: bool) -> Result<Vec<Sockets>, AgentError> {
    let mut base = usize::from(min);
    let mut last_err = String::from("the range is smaller than the number of workers");
    let bind = |addr: SocketAddr| -> std::io::Result<Sockets> {
        let udp = std::net::UdpSocket::bind(addr)?;
        let listener = if tcp { Some(std::net::TcpListener::bind(addr)?) } else { None };
        Ok((udp, listener))
    };
    while base + count <= usize::from(max) + 1 {
        let mut sockets = Vec::with_capacity(count);
        for i in 0..count {
            let Ok(port) = u16::try_from(base + i) else { break };
            match bind(SocketAddr::new(ip, port)) {
                Ok(s) => sockets.push(s),
                Err(e) => {
                    last_err = format!("{ip}:{port}: {e}");
                    break;
                }
            }
        }
        if sockets.len() == count {
            return Ok(sockets);
        }
        base += count;
    }
    let what = if tcp { "UDP+TCP" } else { "UDP" };
    Err(AgentError::Failed(format!("no {count} free consecutive {what} ports in {min}..={max} ({last_err})")))
}

/// The SFU on worker threads (the `workers` engine).
pub struct WorkerAgent {
    shared: Arc<Shared>,
    /// The portal's end of the event channel, for other media nodes reporting on it.
    events: mpsc::Sender<AgentEvent>,
    /// Each worker's socket address (for `ss`-style checks and logs).
    addrs: Vec<SocketAddr>,
    /// Brings streams of other nodes here for subscribers (a cluster's relay).
    importer: OnceLock<Arc<dyn StreamImporter>>,
}

impl WorkerAgent {
    /// Starts `workers` threads (0: one per CPU this process may use) on ports
    /// `port_min + i` of the first bind address; returns the agent and its events.
    pub fn new(settings: AgentSettings, workers: usize) -> Result<(Arc<WorkerAgent>, mpsc::Receiver<AgentEvent>), AgentError> {
        let count = match workers {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        };
        // One socket per worker on one address. Several (no `bind_ip` configured, several
        // interfaces): the default route's, which is where clients on the internet come from.
        let ip = match settings.bind_ips.as_slice() {
            [ip] => *ip,
            [] => return Err(AgentError::Failed("no address to bind media to".into())),
            several => {
                let ip = crate::net::primary_ip(several).ok_or_else(|| AgentError::Failed("no address to bind media to".into()))?;
                info!(%ip, of = ?several, "webrtc.bind_ip is not set: media binds the default route's address (set webrtc.bind_ip to choose)");
                ip
            }
        };
        let provider = rtc::crypto::default_provider().map_err(|e| AgentError::Failed(format!("crypto provider: {e}")))?;
        let params = CertificateParams::new(vec![random_token(16)]).map_err(|e| AgentError::Failed(format!("DTLS certificate: {e}")))?;
        let certificate = RTCCertificate::generate(provider.crypto(), rtc::crypto::SignatureScheme::EcdsaP256Sha256, params)
            .map_err(|e| AgentError::Failed(format!("DTLS certificate: {e}")))?;
        let (events_tx, mut events_rx) = mpsc::unbounded_channel();
        let (portal_tx, portal_rx) = mpsc::channel(4096);
        // Ordered hand-over to the portal's bounded channel (workers never wait on it).
        let relay = portal_tx.clone();
        tokio::spawn(async move {
            while let Some(e) = events_rx.recv().await {
                if relay.send(e).await.is_err() {
                    break;
                }
            }
        });
        let shared = Arc::new(Shared {
            settings,
            workers: OnceLock::new(),
            state: Mutex::new(State::default()),
            events: events_tx,
            next_track: AtomicU64::new(1),
            next_tap: AtomicU64::new(1),
            certificate,
            crypto: provider,
            traffic: (0..count).map(|_| TrafficCells::default()).collect(),
            rtcp: Arc::new(RtcpCounters::default()),
            media: media_engine()?,
        });
        let sockets = bind_block(ip, shared.settings.port_min, shared.settings.port_max, count, shared.settings.ice_tcp)?;
        let mut handles = Vec::new();
        let mut addrs = Vec::new();
        for (index, (std_socket, std_listener)) in sockets.into_iter().enumerate() {
            let bind = std_socket.local_addr().map_err(|e| AgentError::Failed(format!("worker {index}: {e}")))?;
            std_socket.set_nonblocking(true).map_err(|e| AgentError::Failed(format!("worker {index}: {e}")))?;
            if let Some(l) = &std_listener {
                l.set_nonblocking(true).map_err(|e| AgentError::Failed(format!("worker {index}: {e}")))?;
            }
            // One socket carries every connection's burst (a frame to hundreds of
            // subscribers at once): ask for large buffers; the kernel caps them at
            // net.core.{w,r}mem_max.
            let sock = socket2::SockRef::from(&std_socket);
            if let Err(e) = sock.set_send_buffer_size(SOCKET_BUFFER).and_then(|()| sock.set_recv_buffer_size(SOCKET_BUFFER)) {
                warn!(worker = index, error = %e, "socket buffers left at the system default");
            }
            let advertised = SocketAddr::new(shared.settings.public_ip.unwrap_or(ip), bind.port());
            let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
            let (data_tx, data_rx) = mpsc::channel(INBOX);
            let sh = shared.clone();
            std::thread::Builder::new()
                .name(format!("tessera-worker-{index}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt,
                        Err(e) => {
                            warn!(worker = index, error = %e, "worker runtime failed to start");
                            return;
                        }
                    };
                    rt.block_on(async move {
                        let listener = match std_listener.map(tokio::net::TcpListener::from_std).transpose() {
                            Ok(l) => l,
                            Err(e) => {
                                warn!(worker = index, error = %e, "ICE-TCP listener unusable; this worker serves UDP only");
                                None
                            }
                        };
                        match tokio::net::UdpSocket::from_std(std_socket) {
                            Ok(socket) => Worker::new(index, sh, socket, listener, advertised, count).run(cmd_rx, data_rx).await,
                            Err(e) => warn!(worker = index, error = %e, "worker socket unusable"),
                        }
                    });
                })
                .map_err(|e| AgentError::Failed(format!("worker {index}: {e}")))?;
            handles.push(WorkerHandle { cmds: cmd_tx, data: data_tx });
            addrs.push(bind);
        }
        let _ = shared.workers.set(handles);
        info!(workers = count, addrs = ?addrs, ice_tcp = shared.settings.ice_tcp, public = ?shared.settings.public_ip, "webrtc-agent ready (workers engine, ICE-lite)");
        Ok((Arc::new(WorkerAgent { shared, events: portal_tx, addrs, importer: OnceLock::new() }), portal_rx))
    }

    /// A sender into the event channel to the portal, for other media nodes that report
    /// on the same channel (the mixer's mixed-stream updates).
    pub fn event_sender(&self) -> mpsc::Sender<AgentEvent> {
        self.events.clone()
    }

    /// The workers' socket addresses.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Counts of live transports, publications and subscriptions.
    pub fn stats(&self) -> MediaStats {
        let s = self.shared.lock();
        let local = s.publications.values().filter(|p| p.participant.is_empty()).count();
        MediaStats {
            transports: s.transports.len(),
            publications: s.publications.len() - local,
            local_streams: local,
            subscriptions: s.subscriptions.len(),
        }
    }

    /// Counts and traffic totals for `/metrics`.
    pub fn metrics(&self) -> AgentMetrics {
        let mut traffic = Traffic::default();
        for cells in &self.shared.traffic {
            traffic.add(&cells.load());
        }
        let r = &self.shared.rtcp;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        AgentMetrics {
            stats: self.stats(),
            traffic,
            nacks_in: load(&r.nacks_in),
            nacked_packets: load(&r.nacked_packets),
            nacks_out: load(&r.nacks_out),
            rtx_repairs: load(&r.rtx_repairs),
            reports: load(&r.reports),
            fraction_lost_sum: load(&r.fraction_lost_256) as f64 / 256.0,
            rtt_samples: load(&r.rtt_samples),
            rtt_sum_secs: load(&r.rtt_us) as f64 / 1e6,
        }
    }

    /// The worker for a new transport of `room`: the room's worker unless it holds
    /// [`ROOM_SPREAD`] more transports than the least loaded one.
    fn place(&self, s: &mut State, room: &str) -> usize {
        let count = self.shared.workers.get().map_or(1, Vec::len);
        let mut load = vec![0usize; count];
        for t in s.transports.values() {
            if let Some(n) = load.get_mut(t.worker) {
                *n += 1;
            }
        }
        let least = (0..count).min_by_key(|i| load.get(*i).copied().unwrap_or(usize::MAX)).unwrap_or(0);
        let load = |i: usize| load.get(i).copied().unwrap_or(usize::MAX);
        let home = *s.homes.entry(room.to_string()).or_insert(least);
        if load(home) >= load(least) + ROOM_SPREAD { least } else { home }
    }

    /// The transport's worker, opening it there on first use by this participant.
    async fn transport(&self, room: &str, participant: &str, id: &str) -> Result<usize, AgentError> {
        let worker = {
            let mut s = self.shared.lock();
            if let Some(t) = s.transports.get(id) {
                return if t.participant == participant { Ok(t.worker) } else { Err(AgentError::NoTransport(id.into())) };
            }
            let w = self.place(&mut s, room);
            s.transports
                .insert(id.to_string(), TransportEntry { room: room.into(), participant: participant.into(), worker: w, sessions: HashSet::new() });
            s.by_participant.entry(participant.to_string()).or_default().insert(id.to_string());
            w
        };
        let (tx, rx) = oneshot::channel();
        self.shared.send_to(worker, Cmd::Open { transport: id.into(), room: room.into(), participant: participant.into(), reply: tx });
        let result = match rx.await {
            Ok(r) => r,
            Err(_) => Err(AgentError::Failed("worker stopped".into())),
        };
        if result.is_err() {
            // Nothing was opened: forget it without reporting a closed transport.
            let mut s = self.shared.lock();
            if s.transports.remove(id).is_some()
                && let Some(set) = s.by_participant.get_mut(participant)
            {
                set.remove(id);
            }
        }
        result.map(|()| worker)
    }

    fn transport_of(&self, participant: &str, id: &str) -> Result<usize, AgentError> {
        let s = self.shared.lock();
        s.transports.get(id).filter(|t| t.participant == participant).map(|t| t.worker).ok_or_else(|| AgentError::NoTransport(id.into()))
    }

    async fn publish(&self, spec: tessera_core::agent::PublishSpec) -> Result<(), AgentError> {
        let at = &spec.at;
        let worker = self.transport(at.room.as_str(), at.participant.as_str(), at.transport.as_str()).await?;
        {
            // The transport may have closed while it opened: then nothing is registered.
            let mut s = self.shared.lock();
            let t = s.transports.get_mut(at.transport.as_str()).ok_or_else(|| AgentError::NoTransport(at.transport.clone()))?;
            t.sessions.insert(at.session.to_string());
            s.publications.insert(
                at.session.to_string(),
                PubEntry {
                    room: at.room.to_string(),
                    participant: at.participant.to_string(),
                    transport: at.transport.to_string(),
                    worker,
                    tracks: Vec::new(),
                    ready: false,
                },
            );
        }
        self.shared.send_to(worker, Cmd::Publish { transport: at.transport.to_string(), spec });
        Ok(())
    }

    /// Lets subscribers here take streams published on other nodes (set once, by a cluster).
    pub fn set_importer(&self, importer: Arc<dyn StreamImporter>) {
        if self.importer.set(importer).is_err() {
            warn!("a second stream importer was ignored");
        }
    }

    /// Brings the subscription's media streams that are not here from the nodes that have
    /// them (data channels do not cross nodes).
    async fn import_sources(&self, spec: &tessera_core::agent::SubscribeSpec) -> Result<(), AgentError> {
        let Some(importer) = self.importer.get() else { return Ok(()) };
        let mut streams: Vec<&tessera_core::StreamId> = spec.tracks.iter().map(|t| &t.from).collect();
        streams.dedup();
        // Asked even for streams here: an imported one is then kept for this subscriber
        // rather than released as idle while it negotiates.
        for from in streams {
            importer.import(&spec.at.room, from.as_str()).await.map_err(|e| match e {
                ImportError::NotFound(_) => AgentError::NoStream(from.clone()),
                ImportError::Failed { .. } => AgentError::Failed(e.to_string()),
            })?;
        }
        Ok(())
    }

    async fn subscribe(&self, spec: tessera_core::agent::SubscribeSpec) -> Result<(), AgentError> {
        self.import_sources(&spec).await?;
        let mut sources = Vec::new();
        let mut data_owner = None;
        {
            let s = self.shared.lock();
            if let Some(from) = &spec.data_from {
                data_owner = Some(s.publications.get(from.as_str()).map(|p| p.worker).ok_or_else(|| AgentError::NoStream(from.clone()))?);
            }
            for t in &spec.tracks {
                let p = s.publications.get(t.from.as_str()).ok_or_else(|| AgentError::NoStream(t.from.clone()))?;
                let track = p
                    .tracks
                    .iter()
                    .find(|x| x.kind == t.kind)
                    .ok_or_else(|| AgentError::Rejected(format!("Stream {} has no {} media yet", t.from, t.kind.as_str())))?;
                sources.push(SourceTrack {
                    kind: t.kind,
                    track: track.track,
                    owner: p.worker,
                    codec: track.codec.clone(),
                    stream: t.from.to_string(),
                    layers: track.layers.clone(),
                });
            }
        }
        let at = &spec.at;
        let worker = self.transport(at.room.as_str(), at.participant.as_str(), at.transport.as_str()).await?;
        {
            // The transport may have closed while it opened: then nothing is registered.
            let mut s = self.shared.lock();
            let t = s.transports.get_mut(at.transport.as_str()).ok_or_else(|| AgentError::NoTransport(at.transport.clone()))?;
            t.sessions.insert(at.session.to_string());
            let from = spec.tracks.iter().map(|t| t.from.to_string()).collect();
            s.subscriptions
                .insert(at.session.to_string(), SubEntry { participant: at.participant.to_string(), transport: at.transport.to_string(), from });
        }
        self.shared.send_to(worker, Cmd::Subscribe { transport: at.transport.to_string(), spec, sources, data_owner });
        Ok(())
    }

    async fn signal(&self, at: &tessera_core::agent::TransportRef, signaling: Signaling) -> Result<(), AgentError> {
        let worker = self.transport_of(at.participant.as_str(), at.transport.as_str())?;
        let transport = at.transport.to_string();
        match signaling {
            Signaling::Offer(sdp) => {
                let (tx, rx) = oneshot::channel();
                self.shared.send_to(worker, Cmd::Offer { transport, sdp, reply: tx });
                rx.await.map_err(|_| AgentError::Failed("transport ended while negotiating".into()))?
            }
            Signaling::Candidate { candidate, sdp_mid, sdp_mline_index } => {
                let candidate = RTCIceCandidateInit { candidate, sdp_mid, sdp_mline_index, ..Default::default() };
                self.shared.send_to(worker, Cmd::Candidate { transport, candidate });
                Ok(())
            }
            Signaling::RemovedCandidates => Ok(()),
        }
    }

    fn end_session(&self, participant: &str, session: &str) {
        let target = {
            let mut s = self.shared.lock();
            let from_pub = match s.publications.get(session) {
                Some(p) if p.participant == participant => s.publications.remove(session).map(|p| p.transport),
                _ => None,
            };
            let from_sub = match s.subscriptions.get(session) {
                Some(e) if e.participant == participant => s.subscriptions.remove(session).map(|e| e.transport),
                _ => None,
            };
            let transport = from_pub.or(from_sub);
            transport.and_then(|t| {
                let entry = s.transports.get_mut(&t)?;
                entry.sessions.remove(session);
                Some((t, entry.worker))
            })
        };
        if let Some((transport, worker)) = target {
            self.shared.send_to(worker, Cmd::EndSession { transport, session: session.into() });
        }
    }

    fn switch(&self, participant: &str, session: &str, switch: tessera_core::agent::TrackSwitch) -> Result<(), AgentError> {
        let target = {
            let s = self.shared.lock();
            let transport = s
                .publications
                .get(session)
                .filter(|p| p.participant == participant)
                .map(|p| p.transport.clone())
                .or_else(|| s.subscriptions.get(session).filter(|e| e.participant == participant).map(|e| e.transport.clone()));
            transport.and_then(|t| s.transports.get(&t).map(|e| (t.clone(), e.worker)))
        };
        let (transport, worker) = target.ok_or_else(|| AgentError::NoSession(session.into()))?;
        self.shared.send_to(worker, Cmd::Switch { transport, session: session.into(), switch });
        Ok(())
    }

    fn select_layer(&self, participant: &str, session: &str, layer: LayerChoice) -> Result<(), AgentError> {
        let target = {
            let s = self.shared.lock();
            let transport = s.subscriptions.get(session).filter(|e| e.participant == participant).map(|e| e.transport.clone());
            transport.and_then(|t| s.transports.get(&t).map(|e| (t.clone(), e.worker)))
        };
        let (transport, worker) = target.ok_or_else(|| AgentError::NoSession(session.into()))?;
        self.shared.send_to(worker, Cmd::SelectLayer { transport, session: session.into(), layer });
        Ok(())
    }

    fn participant_left(&self, participant: &str) {
        let transports: Vec<(String, usize)> = {
            let s = self.shared.lock();
            s.by_participant
                .get(participant)
                .map(|ids| ids.iter().filter_map(|id| s.transports.get(id).map(|t| (id.clone(), t.worker))).collect())
                .unwrap_or_default()
        };
        for (transport, worker) in transports {
            self.shared.send_to(worker, Cmd::Close { transport, reason: "participant left".into() });
        }
    }

    fn keyframe_for(&self, stream: &str) {
        let tracks: Vec<(TrackId, usize)> = {
            let s = self.shared.lock();
            s.publications
                .get(stream)
                .map(|p| {
                    p.tracks
                        .iter()
                        .filter(|t| t.kind == MediaKind::Video)
                        .flat_map(|t| t.all_tracks().into_iter().map(|track| (track, p.worker)))
                        .collect()
                })
                .unwrap_or_default()
        };
        for (track, worker) in tracks {
            self.shared.send_to(worker, Cmd::Keyframe { track, cover: true });
        }
    }
}

impl Drop for WorkerAgent {
    fn drop(&mut self) {
        // Workers hold the shared state, so they would outlive the agent without this.
        self.shared.broadcast(usize::MAX, |_| Cmd::Shutdown);
    }
}

#[async_trait::async_trait]
impl MediaNode for WorkerAgent {
    async fn handle(&self, command: AgentCommand) -> Result<AgentReply, AgentError> {
        Ok(match command {
            AgentCommand::Publish(spec) => AgentReply::Publish(self.publish(spec).await?),
            AgentCommand::Subscribe(spec) => AgentReply::Subscribe(self.subscribe(spec).await?),
            AgentCommand::Signal(s) => AgentReply::Signal(self.signal(&s.at, s.signaling).await?),
            AgentCommand::EndSession(e) => {
                self.end_session(e.participant.as_str(), e.session.as_str());
                AgentReply::EndSession(())
            }
            AgentCommand::SwitchTracks(s) => AgentReply::SwitchTracks(self.switch(s.participant.as_str(), s.session.as_str(), s.switch)?),
            AgentCommand::RequestKeyframe(k) => {
                self.keyframe_for(k.stream.as_str());
                AgentReply::RequestKeyframe(())
            }
            AgentCommand::ParticipantLeft(p) => {
                self.participant_left(p.participant.as_str());
                AgentReply::ParticipantLeft(())
            }
            AgentCommand::SelectLayer(l) => AgentReply::SelectLayer(self.select_layer(l.participant.as_str(), l.session.as_str(), l.layer)?),
            AgentCommand::GetStats(_) => AgentReply::GetStats(self.stats()),
        })
    }
}

/// A tap's packets, already marshalled by the worker.
struct TapReceiver(mpsc::Receiver<Bytes>);

impl RtpReceiver for TapReceiver {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        self.0.poll_recv(cx)
    }
}

/// A local stream's track: the producer's packets go to the owning worker's inbox.
struct LocalSink {
    shared: Arc<Shared>,
    worker: usize,
    track: TrackId,
    /// Its consumers; for a layer of a layered video, every layer's and the video's taps'
    /// (each layer is measured while anyone reads any of them, so that choices can be made).
    consumers: Vec<Arc<AtomicUsize>>,
}

impl RtpSink for LocalSink {
    fn send(&self, packet: &[u8]) {
        if !self.has_consumers() {
            return;
        }
        let mut buf = packet;
        match rtp::Packet::unmarshal(&mut buf) {
            Ok(p) => self.shared.send_batch(self.worker, vec![(self.track, p)]),
            Err(e) => debug!(error = %e, "unparsable RTP from a local producer"),
        }
    }

    fn has_consumers(&self) -> bool {
        self.consumers.iter().any(|c| c.load(Ordering::Relaxed) > 0)
    }
}

/// The sink of a layer beyond what a layered video holds: it takes nothing.
struct NoSink;

impl RtpSink for NoSink {
    fn send(&self, _packet: &[u8]) {}

    fn has_consumers(&self) -> bool {
        false
    }
}

impl StreamSource for WorkerAgent {
    fn tap(&self, stream: &str, kind: MediaKind) -> Option<Tap> {
        let (track, worker, codec) = {
            let s = self.shared.lock();
            let p = s.publications.get(stream)?;
            let t = p.tracks.iter().find(|t| t.kind == kind)?;
            if let Some(c) = &t.consumers {
                c.fetch_add(1, Ordering::Relaxed);
            }
            // A simulcast video's worker keeps its taps on the highest flowing layer.
            (t.track, p.worker, t.codec.clone())
        };
        let id = self.shared.next_tap.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(TAP_QUEUE);
        self.shared.send_to(worker, Cmd::Tap { track, id, tx, exact: false });
        Some(Tap { codec: codec_info(&codec, None), sink_id: id, packets: Box::new(TapReceiver(rx)) })
    }

    fn untap(&self, stream: &str, kind: MediaKind, sink_id: u64) {
        let found = {
            let s = self.shared.lock();
            s.publications.get(stream).and_then(|p| p.tracks.iter().find(|t| t.kind == kind).map(|t| (t.all_tracks(), p.worker)))
        };
        // A simulcast video's tap is on the layer that was highest then: untapped wherever it is.
        if let Some((tracks, worker)) = found {
            for track in tracks {
                self.shared.send_to(worker, Cmd::Untap { track, id: sink_id });
            }
        }
    }

    fn set_tap_layer(&self, stream: &str, kind: MediaKind, sink_id: u64, layer: LayerChoice) {
        let worker = {
            let s = self.shared.lock();
            s.publications.get(stream).filter(|p| p.tracks.iter().any(|t| t.kind == kind && t.layers.is_some())).map(|p| p.worker)
        };
        if let Some(worker) = worker {
            self.shared.send_to(worker, Cmd::TapLayer { id: sink_id, choice: layer });
        }
    }

    fn layers(&self, stream: &str) -> Vec<String> {
        let s = self.shared.lock();
        let board = s.publications.get(stream).and_then(|p| p.tracks.iter().find_map(|t| t.layers.clone()));
        board.map(|b| b.layers.iter().map(|l| l.rid.clone()).collect()).unwrap_or_default()
    }

    fn tap_layer(&self, stream: &str, rid: &str) -> Option<Tap> {
        let (track, worker, codec) = {
            let s = self.shared.lock();
            let p = s.publications.get(stream)?;
            let t = p.tracks.iter().find(|t| t.layers.is_some())?;
            let layer = t.layers.as_ref()?.layers.iter().find(|l| l.rid == rid)?;
            (layer.track, p.worker, t.codec.clone())
        };
        let id = self.shared.next_tap.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(TAP_QUEUE);
        self.shared.send_to(worker, Cmd::Tap { track, id, tx, exact: true });
        Some(Tap { codec: codec_info(&codec, None), sink_id: id, packets: Box::new(TapReceiver(rx)) })
    }

    fn request_layer_keyframe(&self, stream: &str, rid: &str) {
        let found = {
            let s = self.shared.lock();
            s.publications.get(stream).and_then(|p| {
                let board = p.tracks.iter().find_map(|t| t.layers.as_ref())?;
                board.layers.iter().find(|l| l.rid == rid).map(|l| (l.track, p.worker))
            })
        };
        match found {
            Some((track, worker)) => self.shared.send_to(worker, Cmd::Keyframe { track, cover: true }),
            None => self.keyframe_for(stream),
        }
    }

    fn takes_layers(&self) -> bool {
        true
    }

    fn set_tap_idle(&self, stream: &str, _kind: MediaKind, sink_id: u64, idle: bool) {
        let worker = self.shared.lock().publications.get(stream).map(|p| p.worker);
        if let Some(worker) = worker {
            self.shared.send_to(worker, Cmd::TapIdle { id: sink_id, idle });
        }
    }

    fn request_keyframe(&self, stream: &str) {
        self.keyframe_for(stream);
    }

    fn stream_room(&self, stream: &str) -> Option<RoomId> {
        self.shared.lock().publications.get(stream).map(|p| p.room.as_str().into())
    }

    fn publish_local(&self, room: &str, stream: &str, tracks: Vec<LocalTrack>) -> Vec<Arc<dyn RtpSink>> {
        let worker = {
            let mut s = self.shared.lock();
            self.place(&mut s, room)
        };
        // The video tracks with a RID are the layers of one layered video (a stream relayed
        // from another node with its simulcast layers): one board, measured by the worker.
        let mut rids: Vec<String> = Vec::new();
        for rid in tracks.iter().filter(|t| t.kind == MediaKind::Video).filter_map(|t| t.rid.as_ref()) {
            if !rids.contains(rid) {
                rids.push(rid.clone());
            }
        }
        let board = match tracks.iter().find(|t| t.kind == MediaKind::Video && t.rid.is_some()) {
            Some(first) => {
                let layers = rids.iter().map(|r| (r.clone(), self.shared.next_track())).collect();
                Some(Arc::new(LayerBoard::new(self.shared.next_track(), VideoCodec::of(&first.codec.mime_type), layers)))
            }
            None => None,
        };
        // One consumer count per layer, and one for the taps on the whole video.
        let layer_counts: Vec<Arc<AtomicUsize>> = board.iter().flat_map(|b| b.layers.iter()).map(|_| Arc::default()).collect();
        let board_taps: Arc<AtomicUsize> = Arc::default();
        let mut entries = Vec::new();
        let mut sinks: Vec<Arc<dyn RtpSink>> = Vec::new();
        let mut taken = HashSet::new();
        for t in tracks {
            let codec = rtc_codec(&t.codec);
            let layer = match (&board, &t.rid, t.kind) {
                (Some(b), Some(rid), MediaKind::Video) => match b.index_of_rid(rid).filter(|i| taken.insert(*i)) {
                    Some(i) => Some((b.clone(), i)),
                    None => {
                        // Beyond what a board holds, or a RID given twice.
                        warn!(stream = %stream.escape_debug(), rid = %rid.escape_debug(), "a layer of a local stream left out");
                        sinks.push(Arc::new(NoSink));
                        continue;
                    }
                },
                _ => None,
            };
            let (track, consumers, sink_counts) = match &layer {
                Some((b, i)) => {
                    let (Some(l), Some(c)) = (b.layers.get(*i), layer_counts.get(*i)) else {
                        sinks.push(Arc::new(NoSink));
                        continue;
                    };
                    let mut all = layer_counts.clone();
                    all.push(board_taps.clone());
                    (l.track, c.clone(), all)
                }
                None => {
                    let c: Arc<AtomicUsize> = Arc::default();
                    (self.shared.next_track(), c.clone(), vec![c])
                }
            };
            let local_layer =
                layer.as_ref().map(|(b, i)| worker::LocalLayer { board: b.clone(), index: *i, taps: board_taps.clone(), on_need: t.on_need.clone() });
            let first_layer = layer.as_ref().is_some_and(|(_, i)| *i == 0);
            self.shared.send_to(
                worker,
                Cmd::LocalPublish {
                    track,
                    kind: t.kind,
                    codec: codec.clone(),
                    on_keyframe: t.on_keyframe,
                    consumers: consumers.clone(),
                    layer: local_layer,
                },
            );
            match &layer {
                // The layered video is one entry (its first layer names it), as a client's is.
                Some((b, _)) if first_layer => {
                    entries.push(PubTrack { kind: t.kind, track, codec, consumers: Some(board_taps.clone()), layers: Some(b.clone()) })
                }
                Some(_) => {}
                None => entries.push(PubTrack { kind: t.kind, track, codec, consumers: Some(consumers), layers: None }),
            }
            sinks.push(Arc::new(LocalSink { shared: self.shared.clone(), worker, track, consumers: sink_counts }));
        }
        self.shared.lock().publications.insert(
            stream.to_string(),
            PubEntry { room: room.into(), participant: String::new(), transport: String::new(), worker, tracks: entries, ready: true },
        );
        sinks
    }

    fn unpublish_local(&self, stream: &str) {
        let (p, readers) = {
            let s = &mut *self.shared.lock();
            let p = s.publications.remove(stream);
            let readers: Vec<(String, SubEntry)> = s
                .subscriptions
                .iter()
                .filter(|(_, e)| e.from.iter().any(|f| f == stream))
                .map(|(id, e)| (id.clone(), SubEntry { participant: e.participant.clone(), transport: e.transport.clone(), from: Vec::new() }))
                .collect();
            (p, readers)
        };
        let Some(p) = p else { return };
        for track in p.tracks.iter().flat_map(|t| t.all_tracks()) {
            self.shared.send_to(p.worker, Cmd::LocalUnpublish { track });
        }
        // Their legs would wait for packets that never come (a relayed stream whose node is
        // gone): the subscriptions end, and their owners are told.
        for (id, e) in readers {
            self.end_session(&e.participant, &id);
            self.shared.emit(AgentEvent::SubscriptionEnded {
                room: p.room.as_str().into(),
                participant: e.participant.as_str().into(),
                transport: e.transport.as_str().into(),
                subscription: id.as_str().into(),
                reason: format!("Stream {stream} ended"),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::shared::marshal::Marshal;
    use tessera_core::media::CodecInfo;

    fn settings() -> AgentSettings {
        AgentSettings {
            bind_ips: vec![std::net::IpAddr::from([127, 0, 0, 1])],
            public_ip: None,
            port_min: 40200,
            port_max: 40299,
            keyframe_interval: Duration::from_millis(100),
            ice_disconnected_timeout: Duration::from_secs(5),
            ice_failed_timeout: Duration::from_secs(10),
            ice_tcp: false,
            bandwidth_estimation: true,
        }
    }

    fn agent() -> Arc<WorkerAgent> {
        WorkerAgent::new(settings(), 1).unwrap().0
    }

    fn packet(seq: u16, pt: u8) -> Vec<u8> {
        let mut p = rtp::Packet::default();
        p.header.version = 2;
        p.header.sequence_number = seq;
        p.header.ssrc = 42;
        p.header.payload_type = pt;
        p.payload = Bytes::from_static(b"payload");
        p.marshal().unwrap().to_vec()
    }

    /// A local stream's packets (the mixer's) reach a tap on it (the recorder's) unchanged
    /// through the worker, the tap ends when the stream goes away, and the codec crosses the
    /// seam intact.
    #[tokio::test]
    async fn local_stream_packets_reach_taps() {
        let agent = agent();
        let source: Arc<dyn StreamSource> = agent.clone();
        let codec = CodecInfo { mime_type: "video/VP8".into(), clock_rate: 90000, channels: 0, fmtp: String::new(), payload_type: Some(96) };
        let sinks = source.publish_local(
            "r",
            "r-common",
            vec![LocalTrack { kind: MediaKind::Video, codec: codec.clone(), on_keyframe: Arc::new(|| {}), rid: None, on_need: None }],
        );
        assert_eq!(sinks.len(), 1);
        assert!(!sinks[0].has_consumers());
        assert_eq!(source.stream_room("r-common").as_ref().map(|r| r.as_str()), Some("r"));
        assert!(source.tap("r-common", MediaKind::Audio).is_none());
        let mut tap = source.tap("r-common", MediaKind::Video).unwrap();
        assert_eq!(tap.codec, CodecInfo { payload_type: None, ..codec });
        assert!(sinks[0].has_consumers(), "a tap counts as a consumer at once (the mixer starts producing)");
        // Packets sent before the worker applied the tap are not for it: send until one arrives.
        let mut seq = 0;
        let first = loop {
            seq += 1;
            sinks[0].send(&packet(seq, 96));
            if let Ok(got) = tokio::time::timeout(Duration::from_millis(20), tap.recv()).await {
                break got.unwrap();
            }
            assert!(seq < 100, "no packet reached the tap");
        };
        assert!((1..=seq).any(|s| first.to_vec() == packet(s, 96)), "a sent packet, unchanged");
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(50), tap.recv()).await {}
        // From then on, every packet in order; garbage in between is dropped.
        sinks[0].send(&packet(500, 96));
        sinks[0].send(b"not rtp");
        sinks[0].send(&packet(501, 96));
        for want in [500, 501] {
            let got = tokio::time::timeout(Duration::from_secs(2), tap.recv()).await.unwrap().unwrap();
            assert_eq!(got.to_vec(), packet(want, 96));
        }
        source.untap("r-common", MediaKind::Video, tap.sink_id);
        assert!(tokio::time::timeout(Duration::from_secs(2), tap.recv()).await.unwrap().is_none());
        let mut tap = source.tap("r-common", MediaKind::Video).unwrap();
        source.unpublish_local("r-common");
        assert!(tokio::time::timeout(Duration::from_secs(2), tap.recv()).await.unwrap().is_none());
        assert!(source.stream_room("r-common").is_none());
        assert_eq!(agent.stats().local_streams, 0);
    }

    /// A publisher's offer as webrtc-rs makes it with every default codec on its m-line.
    fn publisher_offer() -> String {
        let mut media = MediaEngine::default();
        media.register_default_codecs().unwrap();
        offer_with(media)
    }

    /// A video offer of every codec `media` has.
    fn offer_with(media: MediaEngine) -> String {
        use rtc::media_stream::MediaStreamTrack;
        use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodingParameters, RTCRtpEncodingParameters};
        use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
        let mut pc = RTCPeerConnectionBuilder::new().with_media_engine(media).build(Instant::now()).unwrap();
        // No codec named: the m-line offers every codec of the engine, as a browser's does.
        let encoding =
            RTCRtpEncodingParameters { rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(7), ..Default::default() }, ..Default::default() };
        let track = MediaStreamTrack::new("s".into(), "t".into(), "v".into(), RtpCodecKind::Video, vec![encoding]);
        let init = RTCRtpTransceiverInit { direction: RTCRtpTransceiverDirection::Sendonly, streams: vec![], send_encodings: vec![] };
        pc.add_transceiver_from_track(track, Some(init)).unwrap();
        pc.create_offer(None).unwrap().sdp
    }

    /// The connections' codecs: each video codec with NACK, PLI and transport-wide feedback,
    /// its RTX repair flow without NACK or PLI (nobody asks to repair a repair, and every
    /// connection keeps a copy of the lot). Read from what an offer of them all lists.
    #[test]
    fn video_codecs_have_their_feedback_and_repair_flows_no_nack() {
        let offer = offer_with(media_engine().unwrap());
        let feedback = |pt: &str| {
            offer.lines().filter(|l| l.starts_with(&format!("a=rtcp-fb:{pt} "))).map(|l| l.split_once(' ').unwrap().1.to_owned()).collect::<Vec<_>>()
        };
        let (mut primaries, mut repairs) = (0, 0);
        for line in offer.lines().filter(|l| l.starts_with("a=rtpmap:")) {
            let pt = line.trim_start_matches("a=rtpmap:").split(' ').next().unwrap();
            let fb = feedback(pt);
            if line.contains(" rtx/") {
                repairs += 1;
                assert!(!fb.iter().any(|f| f.starts_with("nack")), "{line}: {fb:?}");
            } else if line.contains("/90000") {
                primaries += 1;
                for want in ["nack", "nack pli", "transport-cc"] {
                    assert!(fb.iter().any(|f| f == want), "{line}: {fb:?}");
                }
            }
        }
        assert!(primaries >= 10 && repairs >= 10, "{primaries} video codecs, {repairs} repair flows in\n{offer}");
    }

    /// The room's `mediaIn` decides what a publication is answered with; an offer without
    /// any of its codecs is refused, and the transport is left as it was.
    #[tokio::test]
    async fn a_publication_is_answered_with_the_rooms_codecs_only() {
        use tessera_core::agent::{PublishSpec, PublishTrack, SessionRef, TransportRef};
        use tessera_core::command::Signal;
        let (agent, mut events) = WorkerAgent::new(settings(), 1).unwrap();
        let node: Arc<dyn MediaNode> = agent.clone();
        let offer = publisher_offer();
        assert!(offer.contains(" VP8/90000") && offer.contains(" H264/90000") && offer.contains(" VP9/90000"), "{offer}");
        let media_in = |video: serde_json::Value| -> tessera_core::room::MediaIn {
            serde_json::from_value(serde_json::json!({"audio": [{"codec": "opus"}], "video": video})).unwrap()
        };
        let publish = |transport: &str, accept| PublishSpec {
            at: SessionRef { room: "r".into(), participant: "p".into(), transport: transport.into(), session: transport.into() },
            tracks: vec![PublishTrack { kind: MediaKind::Video, mid: "0".into(), source: "camera".into() }],
            data: false,
            accept: Some(accept),
        };
        let signal = |transport: &str, sdp: &str| Signal {
            at: TransportRef { room: "r".into(), participant: "p".into(), transport: transport.into() },
            signaling: Signaling::Offer(sdp.to_string()),
        };
        // A room of H.264 and VP9: the answer lists those (and their RTX), not VP8 or AV1.
        node.call(publish("t1", media_in(serde_json::json!([{"codec": "h264"}, {"codec": "vp9"}])))).await.unwrap();
        node.call(signal("t1", &offer)).await.unwrap();
        let answer = loop {
            match tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap() {
                AgentEvent::Progress { progress: Progress::Answer { sdp }, .. } => break sdp,
                _ => continue,
            }
        };
        let rtpmaps: Vec<&str> = answer.lines().filter_map(|l| l.trim().strip_prefix("a=rtpmap:")).filter_map(|l| l.split(' ').nth(1)).collect();
        assert!(rtpmaps.iter().any(|c| c.starts_with("H264/")) && rtpmaps.iter().any(|c| c.starts_with("VP9/")), "{answer}");
        assert!(rtpmaps.iter().all(|c| ["H264/", "VP9/", "rtx/"].iter().any(|k| c.starts_with(k))), "{rtpmaps:?}\n{answer}");
        // A room of AV1 only: refused, naming the m-line; no answer is made.
        node.call(publish("t2", media_in(serde_json::json!([{"codec": "av1"}])))).await.unwrap();
        let err = node.call(signal("t2", &offer.replace(" AV1/90000", " XYZ/90000"))).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            AgentError::Rejected("the offer's m-line 0 has no video codec the room accepts (mediaIn: av1)".into()).to_string()
        );
        // The publication the offer was for ends with the same reason (OWT's SDK reads that,
        // not the `soac` answer).
        let mut failed = Vec::new();
        while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(300), events.recv()).await {
            assert!(!matches!(e, AgentEvent::Progress { progress: Progress::Answer { .. }, .. }), "answered a refused offer: {e:?}");
            if let AgentEvent::PublicationFailed { transport, publication, reason, .. } = e {
                failed.push((transport.to_string(), publication.to_string(), reason));
            }
        }
        assert_eq!(failed, [("t2".to_string(), "t2".to_string(), err.to_string())]);
        assert!(!agent.shared.lock().publications.contains_key("t2"), "the refused publication is forgotten");
        // Garbage: the same; the answered publication of t1 is not touched by t2's refusals.
        node.call(publish("t3", media_in(serde_json::json!([{"codec": "vp8"}])))).await.unwrap();
        let err = node.call(signal("t3", "v=0\r\nnot an offer")).await.unwrap_err();
        assert!(err.to_string().contains("invalid SDP offer"), "{err}");
        let e = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
        assert!(matches!(&e, AgentEvent::PublicationFailed { publication, .. } if publication.as_str() == "t3"), "{e:?}");
        assert!(agent.shared.lock().publications.contains_key("t1"));
    }
}
