//! Media between nodes: a plain RTP/RTCP relay over UDP (like OWT's internal connections
//! or mediasoup's PipeTransport).
//!
//! Every media node of a cluster has one relay socket (`[cluster] relay_addr`, announced
//! in its registry entry). A node that needs a stream it does not have — an SFU whose
//! subscriber asks for a stream published on another node, a mixer or recorder on a node
//! without the SFU — *imports* it: it asks the media nodes over NATS
//! (`tessera.node.<id>.relay`, an [`ExportRequest`]) and the one that has the stream
//! *exports* it: it taps the stream's tracks and sends each packet once to the importer,
//! whatever the number of consumers there. The importer offers the stream in its own
//! [`StreamSource`] (the SFU's local streams, or [`LocalStreams`]), so its subscribers,
//! mixer and recorder take it like a local one. Keyframe requests and NACKs travel back
//! on the same pair of sockets; the exporter keeps the last [`HISTORY`] packets of each
//! track to answer NACKs.
//!
//! Lifetimes without NATS on the data path: each end says every second that it is alive
//! (per channel); an exporter that hears nothing from its importer for [`LEASE`] stops
//! (the importer died or forgot), and an import that hears nothing from its exporter for
//! as long ends (the exporting node died: its consumers here are told the stream ended);
//! a stream that ends at its origin is ended at the importer by an `End` datagram; an
//! import without consumers for [`IDLE_RELEASE`] is released (`Stop`).
//! Datagrams are unencrypted; with `cluster.relay_auth` each carries an HMAC tag keyed
//! with a secret the cluster shares, and unsigned or forged ones are dropped (wire.rs).
//! The tag does not stop a replay of a datagram captured on the network between nodes
//! (a replayed packet is a duplicate receivers drop; a replayed `End` or `Stop` ends a
//! relayed stream early): the relay assumes that network is not hostile, as the NATS
//! server's buckets do. A node sends only to the relay address its peer registered.

mod local;
mod wire;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
pub use local::LocalStreams;
use serde::{Deserialize, Serialize};
use tessera_core::agent::{LayerChoice, MediaKind};
use tessera_core::media::{CodecInfo, ImportError, LocalTrack, Need, NeedFn, RtpSink, StreamImporter, StreamSource};
use tessera_core::node::Role;
use tessera_core::typed_ids::RoomId;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info};
use wire::{GapDetector, Key, Kind};

use crate::{ClusterError, ClusterNode};

/// Packets an exporter keeps per track for NACKs (about 2 s of 720p video).
const HISTORY: usize = 512;
/// An exporter stops after this long without a word from its importer.
const LEASE: Duration = Duration::from_secs(5);
/// How often an importer says it still wants its channels.
const KEEPALIVE: Duration = Duration::from_secs(1);
/// An import without consumers is released after this long (a mixer rebuilding its
/// pipeline, a subscriber renegotiating, keep it meanwhile).
const IDLE_RELEASE: Duration = Duration::from_secs(10);
/// How long the nodes may take to answer an import.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// Channels an importer that takes layers offers for a simulcast video's layers (the most
/// layers the SFU receives of one video).
const LAYER_CHANNELS: usize = 4;

/// What an importer asks of the node that has a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRequest {
    /// The stream's room (a stream of another room is not given).
    pub room: RoomId,
    /// The stream.
    pub stream: String,
    /// The importer's relay socket.
    pub to: SocketAddr,
    /// Whether the importer signs and checks datagrams (`cluster.relay_auth`).
    pub auth: bool,
    /// The channel the importer chose for each kind of track it takes.
    pub channels: Vec<(MediaKind, u32)>,
    /// Channels for the layers of a simulcast video, one per layer, when the importer lets
    /// its consumers choose layers; without them (or too few) the video channel carries
    /// the top layer.
    #[serde(default)]
    pub layer_channels: Vec<u32>,
}

/// One track the exporter sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedTrack {
    /// Audio or video.
    pub kind: MediaKind,
    /// Its codec.
    pub codec: CodecInfo,
    /// The importer's channel it comes on.
    pub channel: u32,
    /// The simulcast layer it is, when the video comes layer by layer.
    #[serde(default)]
    pub rid: Option<String>,
}

/// The exporter's answer: where the packets come from, and which tracks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportReply {
    /// The exporter's relay socket (datagrams from elsewhere are dropped).
    pub from: SocketAddr,
    /// The tracks it sends.
    pub tracks: Vec<ExportedTrack>,
}

/// Why a node did not export a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ExportError {
    /// This node does not have it (the usual answer: every media node is asked).
    #[error("no stream {0} here")]
    NoStream(String),
    /// This node has it but will not send it.
    #[error("{0}")]
    Refused(String),
}

/// Counters of the relay, for `/metrics`.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// RTP packets sent to importers (repairs included).
    pub packets_out: AtomicU64,
    /// RTP packets received from exporters.
    pub packets_in: AtomicU64,
    /// Packets found missing by importers (asked again).
    pub nacked: AtomicU64,
    /// Datagrams dropped: unreadable, unsigned or forged, from an unexpected address.
    pub dropped: AtomicU64,
}

/// The importer's end of one track.
struct InChannel {
    stream: String,
    from: SocketAddr,
    sink: Arc<dyn RtpSink>,
    gaps: GapDetector,
    /// When the exporter was last heard on this channel (a packet or its keepalive).
    heard: Instant,
    /// What the consumers here need of it, repeated with every keepalive.
    need: Arc<ChannelNeed>,
}

/// What an importer's consumers need of one channel. Sent, whether changed or repeated,
/// under its lock: a repeat cannot overtake the change it repeats.
#[derive(Debug, Default)]
struct ChannelNeed(Mutex<NeedState>);

#[derive(Debug, Default)]
struct NeedState {
    /// A layer nobody here takes: the channel is kept, but the exporter sends nothing (see
    /// [`Kind::Keepalive`]).
    idle: bool,
    /// The layer the consumers of a video relayed one layer at a time agree on, as sent
    /// ([`Kind::Layer`]); `None` until they chose one.
    choice: Option<Vec<u8>>,
}

impl ChannelNeed {
    fn lock(&self) -> std::sync::MutexGuard<'_, NeedState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The keepalive (saying whether the channel is needed), and the layer choice if any.
    fn repeat(&self, relay: &Relay, channel: u32, to: SocketAddr) {
        let state = self.lock();
        relay.send_control(Kind::Keepalive, channel, &[u8::from(!state.idle)], to);
        if let Some(choice) = &state.choice {
            relay.send_control(Kind::Layer, channel, choice, to);
        }
    }
}

/// A stream brought here from another node.
struct Import {
    from: SocketAddr,
    channels: Vec<u32>,
    sinks: Vec<Arc<dyn RtpSink>>,
    idle_since: Option<Instant>,
}

#[derive(Default)]
struct Imports {
    by_stream: HashMap<String, Import>,
    by_channel: HashMap<u32, InChannel>,
}

/// The exporter's end of one track, as the receive loop reaches it.
struct OutChannel {
    stream: String,
    /// The simulcast layer it carries (keyframe requests name it).
    rid: Option<String>,
    kind: MediaKind,
    /// The tap it reads, whether the importer said it needs nothing now, and the layer it
    /// last asked for.
    sink_id: u64,
    idle: bool,
    choice: LayerChoice,
    nacks: mpsc::Sender<Vec<u16>>,
    /// Milliseconds since the relay started when the importer was last heard.
    heard_ms: Arc<AtomicU64>,
}

/// How a relay finds the node that has a stream: over NATS in a cluster
/// ([`NatsControl`]); tests connect two relays directly.
#[async_trait::async_trait]
pub trait Control: Send + Sync {
    /// This node's id (named in refusals).
    fn node_id(&self) -> String;
    /// Asks the nodes that may have the stream; the first that has it answers.
    async fn ask(&self, request: &ExportRequest) -> Result<ExportReply, ImportError>;
}

/// The cluster's control: every other live node that makes streams is asked at once over
/// NATS (`tessera.node.<id>.relay`).
pub struct NatsControl {
    node: Arc<ClusterNode>,
}

#[async_trait::async_trait]
impl Control for NatsControl {
    fn node_id(&self) -> String {
        self.node.id()
    }

    async fn ask(&self, request: &ExportRequest) -> Result<ExportReply, ImportError> {
        // The nodes as last read first; then, if none had it, a fresh read (a node that
        // joined since the last heartbeat may have it).
        let mut asked = HashSet::new();
        match self.ask_among(request, &mut asked).await {
            Err(ImportError::NotFound(_)) => {
                self.node.refresh_known().await;
                self.ask_among(request, &mut asked).await
            }
            other => other,
        }
    }
}

impl NatsControl {
    /// Asks the nodes that may have the stream and are not in `asked` (which it fills).
    async fn ask_among(&self, request: &ExportRequest, asked: &mut HashSet<String>) -> Result<ExportReply, ImportError> {
        let (client, me) = (self.node.client(), self.node.id());
        let origins: Vec<String> = self
            .node
            .known_nodes()
            .into_iter()
            .filter(|n| n.id != me && (n.roles.contains(&Role::Webrtc) || n.roles.contains(&Role::Mixer)) && !asked.contains(&n.id))
            .map(|n| n.id)
            .collect();
        asked.extend(origins.iter().cloned());
        let mut asks: FuturesUnordered<_> = origins
            .into_iter()
            .map(|to| {
                let (client, me) = (client.clone(), me.clone());
                async move {
                    let from = crate::rpc::Caller::node(&me);
                    let answer = crate::rpc::call::<_, ExportReply, ExportError>(&client, &from, &to, "relay", request, ASK_TIMEOUT).await;
                    (to, answer)
                }
            })
            .collect();
        let stream = &request.stream;
        let mut failures = Vec::new();
        while let Some((node, answer)) = asks.next().await {
            match answer {
                Ok(Ok(reply)) => {
                    debug!(%node, stream = %stream.escape_debug(), "stream found for import");
                    return Ok(reply);
                }
                Ok(Err(ExportError::NoStream(_))) => {}
                Ok(Err(e)) => failures.push(format!("node `{node}`: {e}")),
                Err(e) if e.contains("no responders") => {}
                Err(e) => failures.push(format!("node `{node}`: {e}")),
            }
        }
        if failures.is_empty() {
            Err(ImportError::NotFound(stream.to_string()))
        } else {
            Err(ImportError::Failed { stream: stream.to_string(), reason: failures.join("; ") })
        }
    }
}

/// This node's relay: its socket, what it exports and what it imports.
pub struct Relay {
    me: Weak<Relay>,
    control: Arc<dyn Control>,
    socket: Arc<UdpSocket>,
    /// The same socket for sends from synchronous code (keyframe callbacks): tokio's
    /// `try_send_to` refuses until its reactor has seen the socket writable.
    control_socket: std::net::UdpSocket,
    addr: SocketAddr,
    key: Option<Key>,
    /// Where imports go and exports come from: the SFU, or [`LocalStreams`].
    local: Arc<dyn StreamSource>,
    imports: Mutex<Imports>,
    exports: Mutex<HashMap<(SocketAddr, u32), OutChannel>>,
    next_channel: AtomicU32,
    /// Imports being set up, one lock per stream (two subscribers asking for one stream at
    /// once must not import it twice; a slow one must not hold up others).
    setup: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    started: Instant,
    /// Packet counts.
    pub counters: RelayCounters,
}

/// Binds the relay socket (before the node joins, so its entry names the real port).
pub fn bind(addr: SocketAddr) -> Result<std::net::UdpSocket, ClusterError> {
    let socket = std::net::UdpSocket::bind(addr).map_err(|e| ClusterError::Relay(format!("cannot bind the media relay on {addr}: {e}")))?;
    socket.set_nonblocking(true).map_err(|e| ClusterError::Relay(format!("media relay socket: {e}")))?;
    Ok(socket)
}

impl Relay {
    /// Starts the relay of `node` on `socket` (from [`bind`]): serves exports over NATS and
    /// receives on the socket. With `secret`, every datagram is signed and checked.
    pub fn start(
        node: Arc<ClusterNode>,
        socket: std::net::UdpSocket,
        secret: Option<&[u8]>,
        local: Arc<dyn StreamSource>,
    ) -> Result<Arc<Relay>, ClusterError> {
        let (client, me) = (node.client(), node.id());
        let relay = Relay::new(Arc::new(NatsControl { node: node.clone() }), socket, secret, local)?;
        let (weak, node) = (Arc::downgrade(&relay), Arc::downgrade(&node));
        let handle = move |request: ExportRequest, from: Option<crate::rpc::Caller>| {
            let (relay, node) = (weak.upgrade(), node.upgrade());
            async move {
                let (Some(relay), Some(node)) = (relay, node) else { return Err(ExportError::Refused("the relay stopped".into())) };
                // Media goes only to the relay address the asking node registered, not to
                // any address a request names.
                let from = from.ok_or_else(|| ExportError::Refused("an export request must name its node".into()))?.node;
                let registered = |node: &ClusterNode| node.known_nodes().into_iter().find(|n| n.id == from).map(|n| n.relay_addr);
                let matches = |a: &Option<String>| a.as_deref().and_then(|a| a.parse::<SocketAddr>().ok()) == Some(request.to);
                let mut addr = registered(&node);
                if !matches(&addr) {
                    // A node that joined (or started again on another port) since the last read.
                    node.refresh_known().await;
                    addr = registered(&node);
                }
                if !matches(&addr) {
                    return Err(ExportError::Refused(format!(
                        "node `{}` asked for media at {}, but its registered relay address is {}",
                        from.escape_debug(),
                        request.to,
                        addr.as_deref().unwrap_or("unknown")
                    )));
                }
                relay.export(request)
            }
        };
        tokio::spawn(crate::rpc::serve_part(client, crate::rpc::subject(&me, "relay"), handle, ExportError::Refused));
        Ok(relay)
    }

    /// A relay on `socket` that finds streams through `control` (exports are answered by
    /// whoever calls [`Relay::export`]).
    pub fn new(
        control: Arc<dyn Control>,
        socket: std::net::UdpSocket,
        secret: Option<&[u8]>,
        local: Arc<dyn StreamSource>,
    ) -> Result<Arc<Relay>, ClusterError> {
        let addr = socket.local_addr().map_err(|e| ClusterError::Relay(format!("media relay socket: {e}")))?;
        let control_socket = socket.try_clone().map_err(|e| ClusterError::Relay(format!("media relay socket: {e}")))?;
        let socket = Arc::new(UdpSocket::from_std(socket).map_err(|e| ClusterError::Relay(format!("media relay socket: {e}")))?);
        let relay = Arc::new_cyclic(|me| Relay {
            me: me.clone(),
            control,
            socket,
            control_socket,
            addr,
            key: secret.map(Key::new),
            local,
            imports: Mutex::new(Imports::default()),
            exports: Mutex::new(HashMap::new()),
            next_channel: AtomicU32::new(rand_start()),
            setup: Mutex::new(HashMap::new()),
            started: Instant::now(),
            counters: RelayCounters::default(),
        });
        tokio::spawn(receive(relay.clone()));
        tokio::spawn(keep_imports(Arc::downgrade(&relay)));
        info!(addr = %addr, authenticated = relay.key.is_some(), "media relay listening");
        Ok(relay)
    }

    /// The relay socket's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Streams imported here, streams exported from here (tracks).
    pub fn counts(&self) -> (usize, usize) {
        let imports = self.imports.lock().unwrap_or_else(|p| p.into_inner()).by_stream.len();
        (imports, self.exports.lock().unwrap_or_else(|p| p.into_inner()).len())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Sends one control datagram without waiting (a full socket buffer drops it; every
    /// kind of feedback is repeated or harmless to lose).
    fn send_control(&self, kind: Kind, channel: u32, body: &[u8], to: SocketAddr) {
        let mut buf = Vec::with_capacity(wire::HEADER + body.len() + wire::TAG);
        wire::encode(&mut buf, kind, channel, body, self.key.as_ref());
        if let Err(e) = self.control_socket.send_to(&buf, to) {
            debug!(%to, error = %e, "relay control datagram not sent");
        }
    }

    /// Answers an importer: taps the stream's tracks and starts sending them.
    pub fn export(&self, request: ExportRequest) -> Result<ExportReply, ExportError> {
        if request.auth != self.key.is_some() {
            return Err(ExportError::Refused(format!(
                "relay authentication differs: the importing node has cluster.relay_auth = {}, node `{}` has {}; set it alike on every node",
                request.auth,
                self.control.node_id(),
                self.key.is_some()
            )));
        }
        // Only streams that originate here: a stream this node imported is given by its origin.
        let imported = self.imports.lock().unwrap_or_else(|p| p.into_inner()).by_stream.contains_key(&request.stream);
        if imported || self.local.stream_room(&request.stream).as_ref() != Some(&request.room) {
            return Err(ExportError::NoStream(request.stream));
        }
        let Some(me) = self.me.upgrade() else { return Err(ExportError::Refused("the relay stopped".into())) };
        let mut tracks = Vec::new();
        let mut kinds = Vec::new();
        // One channel per kind of track, at most; a simulcast video layer by layer when the
        // importer offered channels enough.
        // Layer channels must be distinct, and not the per-kind ones (else two tracks would
        // share a channel): a request that breaks this gets the whole video instead.
        let mut layer_channels = request.layer_channels.clone();
        layer_channels.sort_unstable();
        layer_channels.dedup();
        let distinct =
            layer_channels.len() == request.layer_channels.len() && !request.channels.iter().any(|(_, c)| request.layer_channels.contains(c));
        for (kind, channel) in request.channels {
            if kinds.contains(&kind) {
                continue;
            }
            kinds.push(kind);
            let rids = if kind == MediaKind::Video && distinct { self.local.layers(&request.stream) } else { Vec::new() };
            if !rids.is_empty() && rids.len() <= request.layer_channels.len() {
                let before = tracks.len();
                for (rid, &channel) in rids.iter().zip(&request.layer_channels) {
                    let Some(tap) = self.local.tap_layer(&request.stream, rid) else { continue };
                    tracks.push(self.send_track(&me, &request.stream, request.to, kind, channel, Some(rid.clone()), tap));
                }
                if tracks.len() > before {
                    continue;
                }
                // Its layers went between the two looks: the video as a whole, if still there.
            }
            let Some(tap) = self.local.tap(&request.stream, kind) else { continue };
            tracks.push(self.send_track(&me, &request.stream, request.to, kind, channel, None, tap));
        }
        if tracks.is_empty() {
            return Err(ExportError::NoStream(request.stream));
        }
        info!(stream = %request.stream.escape_debug(), to = %request.to, tracks = tracks.len(), "exporting a stream to another node");
        Ok(ExportReply { from: self.addr, tracks })
    }

    /// Starts sending one tapped track (a layer, with its `rid`) to an importer's channel.
    #[allow(clippy::too_many_arguments)]
    fn send_track(
        &self,
        me: &Arc<Relay>,
        stream: &str,
        to: SocketAddr,
        kind: MediaKind,
        channel: u32,
        rid: Option<String>,
        tap: tessera_core::media::Tap,
    ) -> ExportedTrack {
        let (nacks, nack_rx) = mpsc::channel(16);
        let heard_ms = Arc::new(AtomicU64::new(self.now_ms()));
        let out = OutChannel {
            stream: stream.to_string(),
            rid: rid.clone(),
            kind,
            sink_id: tap.sink_id,
            idle: false,
            choice: LayerChoice::Auto,
            nacks,
            heard_ms: heard_ms.clone(),
        };
        if let Some(old) = self.exports.lock().unwrap_or_else(|p| p.into_inner()).insert((to, channel), out) {
            debug!(stream = %old.stream.escape_debug(), "an export channel was asked for again; the old one ends");
        }
        let track = ExportedTrack { kind, codec: tap.codec.clone(), channel, rid };
        let export = Export { relay: me.clone(), stream: stream.to_string(), kind, to, channel, heard_ms, nack_rx };
        tokio::spawn(export.run(tap));
        track
    }

    fn channel(&self) -> u32 {
        self.next_channel.fetch_add(1, Ordering::Relaxed)
    }

    /// Ends an import here: its consumers stop receiving, and (when `tell`) the exporter
    /// is told to stop sending.
    fn end_import(&self, stream: &str, tell: bool, only_if_idle: bool) {
        let import = {
            let mut imports = self.imports.lock().unwrap_or_else(|p| p.into_inner());
            // Decided idle outside this lock: a consumer may have come since.
            let idle = |i: &Import| i.idle_since.is_some() && !i.sinks.iter().any(|s| s.has_consumers());
            if only_if_idle && !imports.by_stream.get(stream).is_some_and(idle) {
                return;
            }
            let Some(import) = imports.by_stream.remove(stream) else { return };
            for c in &import.channels {
                imports.by_channel.remove(c);
            }
            import
        };
        if tell {
            for c in &import.channels {
                self.send_control(Kind::Stop, *c, &[], import.from);
            }
        }
        self.local.unpublish_local(stream);
        info!(stream = %stream.escape_debug(), "imported stream released");
    }

    fn on_datagram(&self, datagram: &[u8], src: SocketAddr, nack_buf: &mut Vec<u8>) {
        let frame = match wire::decode(datagram, self.key.as_ref()) {
            Ok(f) => f,
            Err(e) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                debug!(%src, error = %e, "relay datagram dropped");
                return;
            }
        };
        match frame.kind {
            Kind::Rtp => {
                let (sink, gap) = {
                    let mut imports = self.imports.lock().unwrap_or_else(|p| p.into_inner());
                    match imports.by_channel.get_mut(&frame.channel) {
                        Some(c) if c.from == src => {
                            c.heard = Instant::now();
                            let gap = wire::rtp_seq(frame.body).map(|s| c.gaps.on_packet(s)).unwrap_or(0..0);
                            (c.sink.clone(), gap)
                        }
                        _ => {
                            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                };
                self.counters.packets_in.fetch_add(1, Ordering::Relaxed);
                if !gap.is_empty() {
                    let asked = (gap.end - gap.start).min(wire::MAX_NACK as u32);
                    self.counters.nacked.fetch_add(u64::from(asked), Ordering::Relaxed);
                    wire::nack_body(nack_buf, gap.map(|s| s as u16));
                    self.send_control(Kind::Nack, frame.channel, nack_buf, src);
                }
                sink.send(frame.body);
            }
            Kind::Alive => {
                let mut imports = self.imports.lock().unwrap_or_else(|p| p.into_inner());
                match imports.by_channel.get_mut(&frame.channel) {
                    Some(c) if c.from == src => c.heard = Instant::now(),
                    _ => {
                        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Kind::End => {
                // One channel ended (a layer's tap closed, say): the import ends with its last.
                let ended = {
                    let mut imports = self.imports.lock().unwrap_or_else(|p| p.into_inner());
                    let Imports { by_stream, by_channel } = &mut *imports;
                    match by_channel.get(&frame.channel).filter(|c| c.from == src).map(|c| c.stream.clone()) {
                        Some(stream) => {
                            by_channel.remove(&frame.channel);
                            let rest = by_stream.get(&stream).is_some_and(|i| i.channels.iter().any(|c| by_channel.contains_key(c)));
                            (!rest).then_some(stream)
                        }
                        None => None,
                    }
                };
                if let Some(stream) = ended {
                    info!(stream = %stream.escape_debug(), "an imported stream ended at its origin");
                    self.end_import(&stream, true, false);
                }
            }
            Kind::Keyframe | Kind::Nack | Kind::Keepalive | Kind::Stop | Kind::Layer => {
                let key = (src, frame.channel);
                let mut exports = self.exports.lock().unwrap_or_else(|p| p.into_inner());
                let mut idle_now = None;
                let mut layer_now = None;
                let keyframe_of = match exports.get_mut(&key) {
                    None => {
                        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                        drop(exports);
                        // An importer that still wants a channel this node no longer sends
                        // (its lease ran out, its End was lost): told it ended.
                        if matches!(frame.kind, Kind::Keepalive | Kind::Keyframe) {
                            self.send_control(Kind::End, frame.channel, &[], src);
                        }
                        return;
                    }
                    Some(out) => {
                        out.heard_ms.store(self.now_ms(), Ordering::Relaxed);
                        match frame.kind {
                            Kind::Keyframe => Some((out.stream.clone(), out.rid.clone())),
                            Kind::Nack => {
                                // A full queue drops the request: the importer's consumers
                                // recover from the loss themselves (their own NACKs, PLIs).
                                let _ = out.nacks.try_send(wire::nack_seqs(frame.body).collect());
                                None
                            }
                            Kind::Keepalive => {
                                // `[0]`: kept, but nobody there needs the packets now.
                                let idle = frame.body.first() == Some(&0);
                                if idle != out.idle {
                                    out.idle = idle;
                                    idle_now = Some((out.stream.clone(), out.kind, out.sink_id, idle));
                                }
                                None
                            }
                            Kind::Layer => {
                                match serde_json::from_slice::<LayerChoice>(frame.body) {
                                    Ok(choice) if choice != out.choice => {
                                        out.choice = choice.clone();
                                        layer_now = Some((out.stream.clone(), out.kind, out.sink_id, choice));
                                    }
                                    Ok(_) => {}
                                    Err(e) => debug!(%src, error = %e, "unreadable layer choice from an importer"),
                                }
                                None
                            }
                            _ => None,
                        }
                    }
                };
                if frame.kind == Kind::Stop {
                    // Dropping the channel's NACK sender ends its task.
                    exports.remove(&key);
                }
                drop(exports);
                match keyframe_of {
                    Some((stream, Some(rid))) => self.local.request_layer_keyframe(&stream, &rid),
                    Some((stream, None)) => self.local.request_keyframe(&stream),
                    None => {}
                }
                if let Some((stream, kind, sink_id, choice)) = layer_now {
                    debug!(stream = %stream.escape_debug(), channel = frame.channel, choice = ?choice, "the importer's layer changed");
                    self.local.set_tap_layer(&stream, kind, sink_id, choice);
                }
                if let Some((stream, kind, sink_id, idle)) = idle_now {
                    debug!(stream = %stream.escape_debug(), channel = frame.channel, idle, "the importer's need of a relayed track changed");
                    self.local.set_tap_idle(&stream, kind, sink_id, idle);
                }
            }
        }
    }
}

/// A start for channel numbers that differs between runs, so a datagram of a previous
/// run of a node (same address) does not land on a new channel.
fn rand_start() -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    nanos.wrapping_mul(2_654_435_761) & 0x7FFF_FFFF
}

#[async_trait::async_trait]
impl StreamImporter for Relay {
    async fn import(&self, room: &RoomId, stream: &str) -> Result<(), ImportError> {
        if self.keep(stream) || self.local.stream_room(stream).is_some() {
            return Ok(());
        }
        let gate = self.setup.lock().unwrap_or_else(|p| p.into_inner()).entry(stream.to_string()).or_default().clone();
        // Removes the gate when the last caller leaves (returning or cancelled): the map
        // holds one reference, each caller one.
        struct Leave<'a>(&'a Relay, &'a str, Option<Arc<tokio::sync::Mutex<()>>>);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                let mut setup = self.0.setup.lock().unwrap_or_else(|p| p.into_inner());
                drop(self.2.take());
                if setup.get(self.1).is_some_and(|g| Arc::strong_count(g) == 1) {
                    setup.remove(self.1);
                }
            }
        }
        let leave = Leave(self, stream, Some(gate));
        let out = match &leave.2 {
            Some(gate) => {
                let _one_per_stream = gate.lock().await;
                if self.keep(stream) || self.local.stream_room(stream).is_some() { Ok(()) } else { self.bring(room, stream).await }
            }
            None => Ok(()),
        };
        drop(leave);
        out
    }
}

impl Relay {
    /// Whether `stream` is imported here; if so it is kept (a new consumer is coming), as
    /// if it had just been used.
    fn keep(&self, stream: &str) -> bool {
        let mut imports = self.imports.lock().unwrap_or_else(|p| p.into_inner());
        match imports.by_stream.get_mut(stream) {
            Some(import) => {
                import.idle_since = None;
                true
            }
            None => false,
        }
    }

    /// Asks the node that has `stream` to send it here, and offers it in the local source.
    async fn bring(&self, room: &RoomId, stream: &str) -> Result<(), ImportError> {
        let channels = vec![(MediaKind::Audio, self.channel()), (MediaKind::Video, self.channel())];
        // Where consumers here choose layers (an SFU), every layer comes; else the top one.
        let layer_channels = if self.local.takes_layers() { (0..LAYER_CHANNELS).map(|_| self.channel()).collect() } else { Vec::new() };
        let request =
            ExportRequest { room: room.clone(), stream: stream.to_string(), to: self.addr, auth: self.key.is_some(), channels, layer_channels };
        let reply = self.control.ask(&request).await?;
        let mut tracks = Vec::new();
        let mut needs = Vec::new();
        for t in &reply.tracks {
            let need = Arc::new(ChannelNeed::default());
            needs.push(need.clone());
            // Said at once, and with every keepalive after: a layer nobody here takes is
            // not sent (the exporter's tap idles, and its publisher may pause it); a video
            // relayed one layer at a time comes in the layer the consumers here agree on.
            let on_need: Option<NeedFn> = (t.kind == MediaKind::Video).then(|| {
                let (me, channel, to) = (self.me.clone(), t.channel, reply.from);
                Arc::new(move |n: Need| {
                    let Some(relay) = me.upgrade() else { return };
                    match n {
                        Need::Layer(wanted) => {
                            let mut state = need.lock();
                            if state.idle == wanted {
                                state.idle = !wanted;
                                relay.send_control(Kind::Keepalive, channel, &[u8::from(wanted)], to);
                            }
                        }
                        Need::Choice(choice) => {
                            let Ok(body) = serde_json::to_vec(&choice) else { return };
                            let mut state = need.lock();
                            // The exporter starts on auto: nothing to say (and repeat) yet.
                            if state.choice.is_none() && choice == LayerChoice::Auto {
                                return;
                            }
                            if state.choice.as_ref() != Some(&body) {
                                relay.send_control(Kind::Layer, channel, &body, to);
                                state.choice = Some(body);
                            }
                        }
                    }
                }) as NeedFn
            });
            let on_keyframe: Arc<dyn Fn() + Send + Sync> = match t.kind {
                MediaKind::Video => {
                    let (me, channel, to) = (self.me.clone(), t.channel, reply.from);
                    Arc::new(move || {
                        if let Some(relay) = me.upgrade() {
                            relay.send_control(Kind::Keyframe, channel, &[], to);
                        }
                    })
                }
                MediaKind::Audio => Arc::new(|| {}),
            };
            tracks.push(LocalTrack { kind: t.kind, codec: t.codec.clone(), on_keyframe, rid: t.rid.clone(), on_need });
        }
        let sinks = self.local.publish_local(room.as_str(), stream, tracks);
        {
            let mut imports = self.imports.lock().unwrap_or_else(|p| p.into_inner());
            for ((t, sink), need) in reply.tracks.iter().zip(&sinks).zip(needs) {
                let c = InChannel {
                    stream: stream.to_string(),
                    from: reply.from,
                    sink: sink.clone(),
                    gaps: GapDetector::default(),
                    heard: Instant::now(),
                    need,
                };
                imports.by_channel.insert(t.channel, c);
            }
            let channels = reply.tracks.iter().map(|t| t.channel).collect();
            imports.by_stream.insert(stream.to_string(), Import { from: reply.from, channels, sinks, idle_since: None });
        }
        // The exporter's first packets (and the keyframe its tap asked for) may have come
        // before the channels were known here: ask for a picture again.
        for t in reply.tracks.iter().filter(|t| t.kind == MediaKind::Video) {
            self.send_control(Kind::Keyframe, t.channel, &[], reply.from);
        }
        info!(stream = %stream.escape_debug(), from = %reply.from, tracks = reply.tracks.len(), "stream imported from another node");
        Ok(())
    }
}

/// Reads the relay socket until the process ends.
async fn receive(relay: Arc<Relay>) {
    let mut buf = vec![0u8; 65536];
    let mut nack_buf = Vec::with_capacity(wire::MAX_NACK * 2);
    loop {
        match relay.socket.recv_from(&mut buf).await {
            Ok((n, src)) => relay.on_datagram(buf.get(..n).unwrap_or_default(), src, &mut nack_buf),
            Err(e) => {
                // ICMP port unreachable and the like: the socket itself is fine.
                debug!(error = %e, "relay receive error");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Once a second: keepalives for every imported channel; imports without consumers for
/// [`IDLE_RELEASE`] released.
async fn keep_imports(relay: Weak<Relay>) {
    let mut tick = tokio::time::interval(KEEPALIVE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(relay) = relay.upgrade() else { return };
        let mut keep = Vec::new();
        let mut idle = Vec::new();
        let mut silent = Vec::new();
        {
            let mut imports = relay.imports.lock().unwrap_or_else(|p| p.into_inner());
            let Imports { by_stream, by_channel } = &mut *imports;
            for (stream, import) in by_stream.iter_mut() {
                let heard = import.channels.iter().filter_map(|c| by_channel.get(c)).map(|c| c.heard).max();
                if heard.is_none_or(|h| h.elapsed() >= LEASE) {
                    silent.push(stream.clone());
                    continue;
                }
                if import.sinks.iter().any(|s| s.has_consumers()) {
                    import.idle_since = None;
                } else if import.idle_since.get_or_insert_with(Instant::now).elapsed() >= IDLE_RELEASE {
                    idle.push(stream.clone());
                    continue;
                }
                // Channels that ended on their own (see `Kind::End`) are not kept.
                keep.extend(import.channels.iter().filter_map(|c| Some((*c, import.from, by_channel.get(c)?.need.clone()))));
            }
        }
        for (channel, to, need) in keep {
            need.repeat(&relay, channel, to);
        }
        for stream in idle {
            relay.end_import(&stream, true, true);
        }
        for stream in silent {
            info!(stream = %stream.escape_debug(), "the node exporting a stream went silent");
            relay.end_import(&stream, false, false);
        }
    }
}

/// One exported track: its tap's packets to the importer, repairs on request.
struct Export {
    relay: Arc<Relay>,
    stream: String,
    kind: MediaKind,
    to: SocketAddr,
    channel: u32,
    heard_ms: Arc<AtomicU64>,
    nack_rx: mpsc::Receiver<Vec<u16>>,
}

impl Export {
    async fn run(mut self, mut tap: tessera_core::media::Tap) {
        let relay = self.relay.clone();
        // Sent packets by the number they were sent under.
        let mut history: Vec<Option<(u16, Bytes)>> = vec![None; HISTORY];
        let mut numbering = wire::Renumber::default();
        let mut buf = Vec::with_capacity(1500);
        let mut lease = tokio::time::interval(KEEPALIVE);
        lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let why = loop {
            tokio::select! {
                packet = tap.recv() => {
                    let Some(packet) = packet else {
                        // Said three times: a lost End would leave the importer waiting
                        // for its idle release.
                        for _ in 0..3 {
                            relay.send_control(Kind::End, self.channel, &[], self.to);
                        }
                        break "the stream ended";
                    };
                    let Some(seq) = wire::rtp_seq(&packet) else { continue };
                    let Some(seq) = numbering.next(seq, Instant::now()) else { continue };
                    wire::encode_rtp(&mut buf, self.channel, &packet, seq, relay.key.as_ref());
                    if let Err(e) = relay.socket.send_to(&buf, self.to).await {
                        debug!(to = %self.to, error = %e, "relayed packet not sent");
                    } else {
                        relay.counters.packets_out.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(slot) = history.get_mut(usize::from(seq) % HISTORY) {
                        *slot = Some((seq, packet));
                    }
                }
                nack = self.nack_rx.recv() => {
                    let Some(seqs) = nack else { break "the importer stopped it" };
                    for seq in seqs {
                        let kept = history.get(usize::from(seq) % HISTORY).and_then(|p| p.as_ref()).filter(|(sent, _)| *sent == seq);
                        if let Some((_, p)) = kept {
                            wire::encode_rtp(&mut buf, self.channel, p, seq, relay.key.as_ref());
                            if relay.socket.send_to(&buf, self.to).await.is_ok() {
                                relay.counters.packets_out.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                _ = lease.tick() => {
                    relay.send_control(Kind::Alive, self.channel, &[], self.to);
                    let silent = relay.now_ms().saturating_sub(self.heard_ms.load(Ordering::Relaxed));
                    if silent > u64::try_from(LEASE.as_millis()).unwrap_or(u64::MAX) {
                        // In case it is alive after all (a long cut): it stops waiting.
                        relay.send_control(Kind::End, self.channel, &[], self.to);
                        break "the importer went silent";
                    }
                }
            }
        };
        relay.local.untap(&self.stream, self.kind, tap.sink_id);
        let mut exports = relay.exports.lock().unwrap_or_else(|p| p.into_inner());
        // Only this task's entry (a new export on the same channel replaced it otherwise).
        if exports.get(&(self.to, self.channel)).is_some_and(|o| Arc::ptr_eq(&o.heard_ms, &self.heard_ms)) {
            exports.remove(&(self.to, self.channel));
        }
        drop(exports);
        info!(stream = %self.stream.escape_debug(), kind = self.kind.as_str(), to = %self.to, why, "export ended");
    }
}

#[cfg(test)]
mod tests;
