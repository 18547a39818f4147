//! One forwarding worker: an OS thread that owns a UDP socket and the peer connections
//! placed on it, and drives them with webrtc-rs's sans-I/O `RTCPeerConnection`.
//!
//! The loop: read every datagram waiting on the socket, hand each to its connection
//! (`handle_read`), drain what that produced (received RTP goes straight to the local
//! subscribers' senders, to the workers whose subscribers want it, and to taps), then
//! drain `poll_write` only for the connections that have output, and run the timers that
//! are due. Nothing on this path locks, awaits or logs per packet; the state is owned by
//! the thread. Control commands (negotiation, sessions) arrive on a channel and are
//! applied between batches.
//!
//! Costs inside `rtc` 0.21 we live with for now (measured in the bench, listed in
//! docs/sfu.md): `handle_read` takes an owned `BytesMut` (one copy per datagram), the
//! receive path clones the track id `String` per packet, and SRTP marshals then encrypts
//! (two copies per sent packet). Forwarded packets skip `write_rtp` (see [`deliver`]).
//! What this file adds per forwarded packet: one `rtp::Packet` clone per leg (header
//! fields, the payload is reference-counted; extensions are stripped once before).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::ice::tcp_type::TcpType;
use rtc::interceptor::{AttributedPacket, Packet as InterceptorPacket, TaggedPacket};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::event::{RTCDataChannelEvent, RTCPeerConnectionEvent, RTCTrackEvent, RTCTrackEventInit};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate, RTCIceCandidateInit};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind};
use rtc::rtp_transceiver::{RTCRtpReceiverId, RTCRtpSenderId, RTCRtpTransceiverDirection, RTCRtpTransceiverId, RTCRtpTransceiverInit};
use rtc::sansio::Protocol;
use rtc::shared::marshal::Marshal;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use rtc::stun::attributes::ATTR_USE_CANDIDATE;
use rtc::stun::integrity::MessageIntegrity;
use tessera_core::agent::{
    AgentError, AgentEvent, LayerChoice, MediaKind, Progress, PublishSpec, PublishTrack, StreamUpdate, SubscribeSpec, TrackSwitch,
};
use tessera_core::room::{Resolution, VideoParameters};
use tessera_core::stream::{ForwardInfo, StreamInfo, StreamKind, TrackInfo, TrackStatus};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, trace, warn};

use super::demux::{self, Kind};
use super::tcp::{self, TcpEvent};
use super::udp;
use super::{Shared, TrackId};
use crate::feedback::is_keyframe_request;
use crate::forward::{KEYFRAME_AWAIT, KeyframeDecision, KeyframeThrottle, Rewriter, SeenWindow, strip_extensions};
use crate::simulcast::{AutoState, LayerBoard, VideoCodec, Vp8Munger};

/// `recvmmsg` calls per loop round before the loop drains outputs and timers.
const READ_ROUNDS: usize = 2;
/// A connection handed this many forwarded packets since it was last drained is drained
/// at once (see `deliver`).
const DRAIN_EVERY: u32 = 4;
/// Addresses a connection may be reached from at once (its candidate pairs).
const ADDRS_PER_PEER: usize = 4;
/// A subscriber leg forwards at most one keyframe request per this interval (the
/// publisher's throttle decides the PLIs; this bounds the commands between workers).
const LEG_KEYFRAME_INTERVAL: Duration = Duration::from_millis(200);
/// How often the publisher's worker measures a layered video's layers.
const LAYER_TICK: Duration = Duration::from_millis(500);
/// A layer that sent nothing for this long no longer flows (its subscribers move).
const LAYER_TIMEOUT: Duration = Duration::from_millis(1500);
/// A publisher asked for a layer that does not flow is asked again after this long.
const RETELL: Duration = Duration::from_secs(5);
/// How long after a switch a layered leg drops its new layer's older packets.
const FLOOR_FOR: Duration = Duration::from_secs(1);
/// How often subscribers on `auto` look at their bandwidth estimate.
const ADAPT_TICK: Duration = Duration::from_millis(250);
/// A subscriber waiting for a layer's keyframe asks again after this long.
const SWITCH_KEYFRAME_RETRY: Duration = Duration::from_millis(1000);

/// Packets handed from one worker to another, one batch per loop round.
pub(crate) type Batch = Vec<(TrackId, rtp::Packet)>;

/// A track one of this worker's subscriptions reads, wherever it is published.
#[derive(Debug, Clone)]
pub(crate) struct SourceTrack {
    pub kind: MediaKind,
    pub track: TrackId,
    pub owner: usize,
    pub codec: RTCRtpCodec,
    pub stream: String,
    /// The layers of a layered (simulcast) video; `track` is its first flowing layer.
    pub layers: Option<Arc<LayerBoard>>,
}

/// Commands from the control plane (and from other workers) to a worker.
pub(crate) enum Cmd {
    Open {
        transport: String,
        room: String,
        participant: String,
        reply: oneshot::Sender<Result<(), AgentError>>,
    },
    Publish {
        transport: String,
        spec: PublishSpec,
    },
    Subscribe {
        transport: String,
        spec: SubscribeSpec,
        sources: Vec<SourceTrack>,
        data_owner: Option<usize>,
    },
    Offer {
        transport: String,
        sdp: String,
        reply: oneshot::Sender<Result<(), AgentError>>,
    },
    Candidate {
        transport: String,
        candidate: RTCIceCandidateInit,
    },
    EndSession {
        transport: String,
        session: String,
    },
    Switch {
        transport: String,
        session: String,
        switch: TrackSwitch,
    },
    /// A subscription's video takes another simulcast layer.
    SelectLayer {
        transport: String,
        session: String,
        layer: LayerChoice,
    },
    /// Which layers of a layered video flow (or their order) changed: subscribers here choose again.
    LayersChanged {
        board: u64,
    },
    Close {
        transport: String,
        reason: String,
    },
    /// Another worker has (`add`) or no longer has subscribers of a track published here.
    RemoteSubscriber {
        track: TrackId,
        worker: usize,
        add: bool,
    },
    /// A keyframe request for a track published here; `cover`: see [`KeyframeThrottle::request`].
    Keyframe {
        track: TrackId,
        cover: bool,
    },
    Tap {
        track: TrackId,
        id: u64,
        tx: mpsc::Sender<Bytes>,
        /// Reads this very track, even a layer of a layered video (a relay to another node),
        /// instead of following the video's best layer.
        exact: bool,
    },
    Untap {
        track: TrackId,
        id: u64,
    },
    /// A tap stops (`idle`) or starts again reading its track: an idle tap gets no packets
    /// and does not count as a reader (a relayed layer nobody on the other node takes).
    TapIdle {
        id: u64,
        idle: bool,
    },
    /// A tap on a layered video reads another layer (see [`LayerTap`]).
    TapLayer {
        id: u64,
        choice: LayerChoice,
    },
    LocalPublish {
        track: TrackId,
        kind: MediaKind,
        codec: RTCRtpCodec,
        on_keyframe: Arc<dyn Fn() + Send + Sync>,
        consumers: Arc<AtomicUsize>,
        /// Which layer of a layered video it is (a stream relayed with its layers).
        layer: Option<LocalLayer>,
    },
    LocalUnpublish {
        track: TrackId,
    },
    /// A track published on another worker resumes after a pause: its legs here continue
    /// their sequence numbers.
    Resync {
        track: TrackId,
    },
    /// Another worker has (`add`) or no longer has data subscribers of a publication here.
    DataSubscriber {
        publication: String,
        worker: usize,
        add: bool,
    },
    /// Stop: close every connection and end the thread.
    Shutdown,
    /// A message of a publication's data channel, for this worker's data subscribers.
    Data {
        publication: String,
        text: bool,
        data: Bytes,
    },
}

/// A layer of a layered video produced inside the server (relayed from another node).
pub(crate) struct LocalLayer {
    pub board: Arc<LayerBoard>,
    pub index: usize,
    /// The count of taps on the whole video (each follows its best layer), for the producer.
    pub taps: Arc<AtomicUsize>,
    /// Told whether anyone here needs the layer (its producer may stop sending it).
    pub on_need: Option<tessera_core::media::NeedFn>,
}

/// A tap on one track: its packets, unless idle.
struct TrackTap {
    id: u64,
    tx: mpsc::Sender<Bytes>,
    idle: bool,
}

/// A track published on this worker (by a client, or by the mixer).
struct Published {
    kind: MediaKind,
    codec: RTCRtpCodec,
    /// The publisher's connection and receiver, for keyframe requests; none for local tracks.
    publisher: Option<(u32, RTCRtpReceiverId, u32)>,
    on_keyframe: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Subscriber legs on this worker: (peer, leg).
    subscribers: Vec<(u32, u32)>,
    /// Other workers with subscribers (each gets one copy per packet).
    workers: Vec<usize>,
    taps: Vec<TrackTap>,
    throttle: KeyframeThrottle,
    /// Its codec's family, for finding its keyframes.
    video: VideoCodec,
    pli_due: Option<Instant>,
    seen: SeenWindow,
    /// Publisher-side mute (`stream-control pause`).
    active: bool,
    /// Consumers of a local track (the mixer runs a view only while someone watches).
    consumers: Option<Arc<AtomicUsize>>,
    /// A simulcast layer's measurements (bytes since the last tick, last packet).
    meter: Option<LayerMeter>,
    /// A relayed layer's producer, told whether anyone here needs it.
    on_need: Option<tessera_core::media::NeedFn>,
}

/// What the publisher's worker measures of one simulcast layer between two ticks.
struct LayerMeter {
    board: Arc<LayerBoard>,
    index: usize,
    bytes: u64,
    frames: u32,
    /// Its last packet (none yet: a relayed layer is not live before its first).
    last: Option<Instant>,
}

/// A subscriber leg's simulcast layer: what it wants, and a switch under way.
struct Selection {
    board: Arc<LayerBoard>,
    choice: LayerChoice,
    /// The layer (track) it moves to at that layer's next keyframe.
    target: Option<TrackId>,
    /// The current layer has given this leg a keyframe (nothing is sent before one).
    started: bool,
    vp8: Option<Vp8Munger>,
    /// When a keyframe of the awaited layer was last asked for.
    asked: Option<Instant>,
    /// On `auto`: how the layer follows the connection's bandwidth.
    auto: AutoState,
    /// The source's sequence number the leg started (or switched) at, and when: for a
    /// second, an older packet of that layer (late, or a retransmission) would land
    /// before it, and is dropped.
    floor: Option<(u16, Instant)>,
    /// Paused: its choice is not counted (the publisher need not send for it).
    paused: bool,
}

impl Selection {
    /// On `auto`, heading below the top flowing layer, free to move there (not held for
    /// want of keyframes) and not settling after a move down.
    fn could_go_up(&self, source: TrackId, now: Instant) -> bool {
        if self.choice != LayerChoice::Auto || self.paused || self.auto.settling(now) || self.held(source) {
            return false;
        }
        let heading = self.target.unwrap_or(source);
        self.board.ranked().last().and_then(|&i| self.board.layers.get(i)).is_some_and(|l| l.track != heading)
    }

    fn new(board: Arc<LayerBoard>, choice: LayerChoice) -> Selection {
        board.count_choice(&choice, true);
        let vp8 = (board.codec == VideoCodec::Vp8).then(Vp8Munger::default);
        Selection { board, choice, target: None, started: false, vp8, asked: None, auto: AutoState::default(), floor: None, paused: false }
    }

    /// Changes the choice (the board counts what legs want, for the publisher).
    fn set_choice(&mut self, choice: LayerChoice) {
        if !self.paused {
            self.board.count_choice(&self.choice, false);
            self.board.count_choice(&choice, true);
        }
        if choice == LayerChoice::Auto && self.choice != LayerChoice::Auto {
            self.auto = AutoState::default();
        }
        self.choice = choice;
    }

    /// Where keyframes cannot be found a move would show a broken picture: a reader of
    /// `source` that has started stays on it while it flows.
    fn held(&self, source: TrackId) -> bool {
        self.board.codec == VideoCodec::Other && self.started && self.board.index_of(source).is_some_and(|i| self.board.is_live(i))
    }

    /// Aims the reader of `source` at layer `want`: it moves at `want`'s next keyframe
    /// (the caller asks for one), or stays where it is, calling off a move under way.
    fn aim(&mut self, want: TrackId, source: TrackId, now: Instant) -> Aim {
        if self.target == Some(want) || (want == source && self.target.is_none()) {
            return Aim::Unchanged;
        }
        let dropped = self.target.take();
        if want != source {
            self.target = Some(want);
            self.asked = Some(now);
        }
        Aim::Changed { dropped }
    }

    /// Pauses or resumes the leg's reading: a paused leg wants no layer, and resumes like
    /// a switch (on a keyframe; `auto` starts over, the estimate before the pause is old).
    fn set_paused(&mut self, paused: bool) {
        if paused == self.paused {
            return;
        }
        self.paused = paused;
        self.board.count_choice(&self.choice, !paused);
        if !paused {
            self.started = false;
            self.auto = AutoState::default();
            // The floor of its last start is another time's (maybe another layer's).
            self.floor = None;
            // Its pictures go on numbered from the last one sent, as the sequence does.
            if let Some(v) = &mut self.vp8 {
                v.rebase();
            }
        }
    }
}

/// What [`Selection::aim`] did.
enum Aim {
    /// Already there, or on the way.
    Unchanged,
    /// A new aim; the layer it was heading for before, if any.
    Changed { dropped: Option<TrackId> },
}

impl Drop for Selection {
    fn drop(&mut self) {
        if !self.paused {
            self.board.count_choice(&self.choice, false);
        }
    }
}

/// A layered video published on this worker, as its worker keeps it.
struct BoardState {
    board: Arc<LayerBoard>,
    /// The last ranking (to see it change).
    ranking: Vec<usize>,
    /// The layers last asked of the publisher (bit i: layer i); all at first.
    asked: u32,
    /// When they were last asked.
    told: Option<Instant>,
    /// The publication, and the connection it came on (none for a video produced inside
    /// the server: nobody to ask for layers, no description to update from here).
    publication: String,
    peer: Option<u32>,
    /// Taps (the mixer, a recording, another node) on it.
    taps: Vec<LayerTap>,
    /// Where a local video's producer reads how many taps there are.
    tap_count: Option<Arc<AtomicUsize>>,
    /// The layers' picture sizes (where known), as last reported.
    sizes: Vec<Option<(u16, u16)>>,
    /// Taps on one layer that has not flowed yet (another node's relay asked for every
    /// declared layer): attached when it starts, so that it is not taken as ended.
    waiting: Vec<(TrackId, TrackTap)>,
}

impl BoardState {
    /// Tells a local video's producer how many taps it has.
    fn count_taps(&self) {
        if let Some(c) = &self.tap_count {
            c.store(self.taps.len(), Ordering::Relaxed);
        }
    }
}

/// A tap on a layered video: it reads the highest flowing layer, or the one its consumer
/// chose (the mixer: the lowest that fills the input's region), and moves when that
/// changes as a subscriber does (at a keyframe, its numbering continuous), so a mix or a
/// recording that started on the first layer to flow goes on in the best one.
struct LayerTap {
    id: u64,
    tx: mpsc::Sender<Bytes>,
    source: TrackId,
    sel: Selection,
    rewriter: Rewriter,
}

/// What a layered reader (a leg or a tap) does with a packet of `track`.
enum Gate {
    /// Not for it (another layer, or not a keyframe it waits for).
    Skip,
    /// Not yet: it waits for a keyframe of `track`, and it is time to ask again.
    Ask,
    /// Send it.
    Send,
    /// Send it: it starts the new layer; the reader left the one given.
    Switched(TrackId),
}

/// The layered gate: a reader takes packets only from its current layer once that gave
/// it a keyframe, and moves to the layer it awaits at that layer's keyframe.
fn gate(
    sel: &mut Selection,
    source: &mut TrackId,
    rewriter: &mut Rewriter,
    track: TrackId,
    packet: &rtp::Packet,
    now: Instant,
    keyframe: &mut Option<bool>,
) -> Gate {
    let codec = sel.board.codec;
    // Without keyframe detection (other codecs) a reader moves at once.
    let key = codec == VideoCodec::Other || *keyframe.get_or_insert_with(|| codec.starts_keyframe(&packet.payload));
    let seq = packet.header.sequence_number;
    let needs_key = if sel.target == Some(track) {
        true
    } else if *source == track {
        if let Some((floor, at)) = sel.floor {
            if now.saturating_duration_since(at) > FLOOR_FOR {
                sel.floor = None;
            } else if seq.wrapping_sub(floor) >= 0x8000 {
                return Gate::Skip;
            }
        }
        !sel.started
    } else {
        return Gate::Skip;
    };
    if !needs_key {
        return Gate::Send;
    }
    if !key {
        if sel.asked.is_none_or(|t| now.saturating_duration_since(t) >= SWITCH_KEYFRAME_RETRY) {
            sel.asked = Some(now);
            return Gate::Ask;
        }
        return Gate::Skip;
    }
    let mut left = None;
    if sel.target == Some(track) {
        left = Some(std::mem::replace(source, track));
        sel.target = None;
        rewriter.switch_source();
        if let Some(v) = &mut sel.vp8 {
            v.rebase();
        }
    }
    sel.started = true;
    sel.floor = Some((seq, now));
    left.map_or(Gate::Send, Gate::Switched)
}

/// What delivering a packet to layered legs leads to, done once the packet is delivered.
enum LegNote {
    /// The leg moved to another layer: it no longer reads `from`.
    Switched { peer: u32, leg: u32, from: TrackId, owner: usize },
    /// A leg awaits a keyframe of this track.
    Keyframe { track: TrackId, owner: usize },
}

impl Published {
    fn consumer_count(&self) -> usize {
        self.subscribers.len() + self.workers.len() + self.taps.iter().filter(|t| !t.idle).count()
    }
}

/// One sending track of a subscription on a connection.
struct Leg {
    session: String,
    kind: MediaKind,
    source: TrackId,
    owner: usize,
    sender: RTCRtpSenderId,
    /// The sending track's id (keyframe requests from the subscriber name it).
    track_id: String,
    rewriter: Rewriter,
    active: bool,
    last_keyframe_request: Option<Instant>,
    /// The layer choice of a simulcast source.
    sel: Option<Selection>,
}

impl Leg {
    /// Whether it forwards a layered video on `auto` (the bandwidth estimate moves it).
    fn on_auto(&self) -> bool {
        self.active && self.sel.as_ref().is_some_and(|s| s.choice == LayerChoice::Auto)
    }

    /// The tracks it reads: its source, and the layer it is switching to.
    fn tracks(&self) -> impl Iterator<Item = TrackId> + '_ {
        std::iter::once(self.source).chain(self.sel.as_ref().and_then(|s| s.target))
    }
}

/// A publication announced on a connection.
struct PubSession {
    id: String,
    announced: Vec<PublishTrack>,
    flowing: Vec<(MediaKind, TrackId)>,
    /// Its video's layers when the client sends simulcast.
    board: Option<Arc<LayerBoard>>,
    /// The publication carries a data channel; `data_open` once the client opened it.
    data: bool,
    data_open: bool,
    ready: bool,
    /// An offer carrying it was answered (until then, a refused offer ends it).
    answered: bool,
    /// The codecs its m-lines may carry (the room's `mediaIn`); `None`: any.
    accept: Option<tessera_core::room::MediaIn>,
}

/// A subscription waiting for the offer that carries its m-lines.
struct PendingSub {
    spec: SubscribeSpec,
    sources: Vec<SourceTrack>,
    /// The worker of the publication whose data channel it wants.
    data_owner: Option<usize>,
}

/// One client connection (transport) on this worker.
struct Peer {
    /// Its key in the worker's map.
    id: u32,
    transport: String,
    room: String,
    participant: String,
    pc: RTCPeerConnection,
    /// What its send-side bandwidth estimator found.
    estimate: Arc<crate::bwe::Estimate>,
    ufrag: String,
    /// The server ICE password (checks from a new address must be signed with it).
    password: String,
    /// Addresses routed to this connection, oldest first.
    addrs: Vec<SocketAddr>,
    /// ICE-TCP connections (client addresses) bound to this connection, oldest first.
    tcp_addrs: Vec<SocketAddr>,
    publications: Vec<PubSession>,
    pending: Vec<PendingSub>,
    legs: HashMap<u32, Leg>,
    /// Subscriptions on this connection whose `ready` progress was not sent yet.
    unannounced: Vec<String>,
    subscriptions: HashSet<String>,
    /// Received track id → the published track it feeds.
    receivers: HashMap<String, TrackId>,
    /// Simulcast layers share one received track id: their SSRC → the layer's track.
    layer_receivers: HashMap<u32, TrackId>,
    /// The simulcast layers (RIDs) of each m-line of the last offer.
    simulcast: Vec<(String, Vec<String>)>,
    /// The codec sent on each subscription's m-line (by mid): the client's offers are cut
    /// down to it there (`sdp::only_sent_codecs`).
    sending: HashMap<String, rtc::rtp_transceiver::rtp_sender::RTCRtpCodec>,
    /// Subscriptions waiting for the client's data channel labelled with their stream id:
    /// (subscription, publication, the publication's worker).
    data_wanted: Vec<(String, String, usize)>,
    /// Subscribed data channels: (subscription, publication, its worker, channel).
    data_legs: Vec<(String, String, usize, usize)>,
    /// The publisher's data channels: channel → publication.
    data_sources: HashMap<usize, String>,
    has_remote: bool,
    candidate_added: bool,
    connected: bool,
    /// The earliest deadline of this connection in the timer heap.
    scheduled: Option<Instant>,
    dirty: bool,
    /// Forwarded packets handed to it since it was last drained.
    unsent: u32,
    /// How rtc keyed its SRTP contexts.
    tap: Arc<crate::srtp_out::KeyTap>,
    /// Its interceptors (shared with rtc's chain).
    stack: crate::stack::SharedStack,
    /// Forwarded media's own SRTP protection once connected (`crate::srtp_out`), and the
    /// handshake it was keyed from.
    srtp: Option<(crate::srtp_out::Sealer, usize)>,
    /// The client's selected pair, where forwarded media goes: the address of its last
    /// signed nominating check, or where rtc last sent DTLS or SRTP(C).
    remote: Option<rtc::shared::TransportContext>,
    /// An empty list with room, lent to each forwarded packet sent past rtc and taken back:
    /// the transport-wide number the estimator adds (a header extension) then allocates
    /// nothing per packet.
    spare_extensions: Vec<rtp::header::Extension>,
}

/// What a timer entry wakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Peer(u32),
    Pli(TrackId),
    /// The wait for the keyframe of a PLI (sent then) to this track is over.
    KeyframeWait(TrackId, Instant),
    /// Measure a layered video's layers (a board on this worker).
    Layers(u64),
    /// Subscribers on `auto` choose again from their bandwidth estimate.
    Adapt,
    /// An ICE-TCP connection (address, serial) that must be bound by now.
    TcpUnbound(SocketAddr, u64),
}

/// Where a worker's packets leave: its UDP socket, through a queue sent in `sendmmsg`
/// batches (which also holds datagrams back while the send buffer is full), and its
/// ICE-TCP connections.
struct Outlet {
    socket: UdpSocket,
    /// Datagrams not yet sent, oldest first.
    queue: std::collections::VecDeque<(BytesMut, SocketAddr)>,
    /// Bytes the queued datagrams' buffers hold (capacity, not length: a sealing buffer
    /// is of one size whatever it carries).
    queued_bytes: usize,
    /// Datagrams dropped because the queue was full.
    send_drops: u64,
    /// Emptied buffers of [`SEALED_BUFFER`] bytes, for the packets the worker seals itself
    /// (one per datagram in flight; nothing is allocated per packet once warm).
    spare: Vec<BytesMut>,
    tcp: tcp::Conns,
    /// What went in and out, published to [`super::Shared`] once per loop round.
    traffic: super::Traffic,
}

impl Outlet {
    /// An empty buffer for a datagram the worker seals itself; back to [`Self::spare`] once sent.
    fn buffer(&mut self) -> BytesMut {
        self.spare.pop().unwrap_or_else(|| BytesMut::with_capacity(SEALED_BUFFER))
    }

    /// Keeps a sent datagram's buffer for the next, if it is one of [`Self::buffer`]'s size
    /// (rtc's own are sized to their packet) and the spares are not already plenty.
    fn recycle(&mut self, mut data: BytesMut) {
        if data.capacity() == SEALED_BUFFER && self.spare.len() < MAX_SPARE {
            data.clear();
            self.spare.push(data);
        }
    }

    /// Takes the oldest queued datagram off the queue (and its bytes off the count).
    fn dequeue(&mut self) -> Option<BytesMut> {
        let (data, _) = self.queue.pop_front()?;
        self.queued_bytes = self.queued_bytes.saturating_sub(data.capacity());
        Some(data)
    }

    /// Sends one packet `rtc` produced, or the worker sealed, over the transport it names
    /// (UDP: queued, and sent once a batch is full or at the end of the loop round).
    fn send(&mut self, out: TaggedBytesMut) {
        if out.transport.transport_protocol == TransportProtocol::TCP {
            self.traffic.packets_out += 1;
            self.traffic.bytes_out += out.message.len() as u64;
            self.tcp.send(out.transport.peer_addr, &out.message);
            self.recycle(out.message);
            return;
        }
        while self.queue.len() >= MAX_QUEUED || (self.queued_bytes >= MAX_QUEUED_BYTES && !self.queue.is_empty()) {
            if let Some(dropped) = self.dequeue() {
                self.recycle(dropped);
            }
            self.send_drops += 1;
            self.traffic.dropped_out += 1;
        }
        self.queued_bytes += out.message.capacity();
        self.queue.push_back((out.message, out.transport.peer_addr));
        if self.queue.len() >= udp::BATCH {
            self.send_queued();
        }
    }

    /// Sends the queue in order, in batches, until it is empty or the send buffer is full.
    fn send_queued(&mut self) {
        while !self.queue.is_empty() {
            match udp::send_batch(&self.socket, self.queue.make_contiguous()) {
                Ok(n) if n > 0 => {
                    // Counted once per batch, when the kernel took them.
                    for _ in 0..n {
                        let Some(data) = self.dequeue() else { break };
                        self.traffic.packets_out += 1;
                        self.traffic.bytes_out += data.len() as u64;
                        self.recycle(data);
                    }
                }
                Ok(_) => return,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // The first datagram cannot be sent (e.g. an address the socket cannot reach): skip it.
                    debug!(error = %e, "send error");
                    if let Some(data) = self.dequeue() {
                        self.recycle(data);
                    }
                }
            }
        }
    }
}

/// Accepts on the ICE-TCP listener (not before `resume`), or waits forever when there is none.
async fn accept(listener: Option<&TcpListener>, resume: Option<Instant>) -> std::io::Result<(TcpStream, SocketAddr)> {
    let Some(l) = listener else { return std::future::pending().await };
    if let Some(t) = resume {
        tokio::time::sleep_until(t.into()).await;
    }
    l.accept().await
}

/// After a failed accept (e.g. out of file descriptors, which fails again at once), the
/// listener rests this long instead of spinning the worker.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The worker's state, owned by its thread.
pub(crate) struct Worker {
    index: usize,
    shared: Arc<Shared>,
    out: Outlet,
    /// The ICE-TCP listener on the worker's port (`webrtc.ice_tcp`).
    listener: Option<TcpListener>,
    /// Set after a failed accept: the listener rests until then.
    accept_resume: Option<Instant>,
    tcp_events: mpsc::Receiver<TcpEvent>,
    /// The address in this worker's host candidate (what clients send to).
    local: SocketAddr,
    /// Boxed: a connection is kilobytes, and a map grown by doubling would keep up to as
    /// many empty slots of that size (twice over while it rehashes).
    peers: HashMap<u32, Box<Peer>>,
    by_transport: HashMap<String, u32>,
    by_ufrag: HashMap<String, u32>,
    by_addr: HashMap<SocketAddr, u32>,
    published: HashMap<TrackId, Published>,
    /// Tracks published on other workers: this worker's subscriber legs.
    relayed: HashMap<TrackId, Vec<(u32, u32)>>,
    /// Layered videos published here.
    boards: HashMap<u64, BoardState>,
    /// What the last delivery to layered legs left to do.
    notes: Vec<LegNote>,
    /// Data subscribers on this worker, by publication: (peer, channel).
    data_sinks: HashMap<String, Vec<(u32, usize)>>,
    /// Other workers with data subscribers of a publication made here.
    data_workers: HashMap<String, Vec<usize>>,
    /// Set by `Cmd::Shutdown`: the loop ends after this round.
    stopping: bool,
    /// Received packets of the datagram being handled (kept for its capacity).
    scratch: Vec<(TrackId, rtp::Packet)>,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    dirty: Vec<u32>,
    outbox: Vec<Batch>,
    next_peer: u32,
    next_leg: u32,
}

impl Worker {
    pub(crate) fn new(
        index: usize,
        shared: Arc<Shared>,
        socket: UdpSocket,
        listener: Option<TcpListener>,
        local: SocketAddr,
        workers: usize,
    ) -> Worker {
        let (tcp_tx, tcp_events) = mpsc::channel(tcp::EVENT_QUEUE);
        Worker {
            index,
            shared,
            out: Outlet {
                socket,
                queue: std::collections::VecDeque::new(),
                spare: Vec::new(),
                queued_bytes: 0,
                send_drops: 0,
                tcp: tcp::Conns::new(tcp_tx),
                traffic: Default::default(),
            },
            listener,
            accept_resume: None,
            tcp_events,
            local,
            peers: HashMap::new(),
            by_transport: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            published: HashMap::new(),
            relayed: HashMap::new(),
            boards: HashMap::new(),
            notes: Vec::new(),
            data_sinks: HashMap::new(),
            data_workers: HashMap::new(),
            stopping: false,
            scratch: Vec::new(),
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            outbox: (0..workers).map(|_| Vec::new()).collect(),
            next_peer: 0,
            next_leg: 0,
        }
    }

    /// Runs the loop until the control plane goes away.
    pub(crate) async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>, mut inbox: mpsc::Receiver<Batch>) {
        let mut batch = udp::RecvBatch::new();
        self.timers.push(Reverse((Instant::now() + ADAPT_TICK, Timer::Adapt)));
        loop {
            // Control before data: a command sent before a packet (a tap, a local
            // publication, a subscription) is applied before that packet is handled.
            while let Ok(cmd) = cmds.try_recv() {
                self.command(cmd);
            }
            // Once per loop round, before it may sleep: what the last round and the
            // commands just applied did is visible while it waits.
            if let Some(cells) = self.shared.traffic.get(self.index) {
                cells.store(&self.out.traffic);
            }
            if self.stopping {
                break;
            }
            let next = self.timers.peek().map(|Reverse((t, _))| *t);
            let sleep = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                batch = inbox.recv() => {
                    if let Some(batch) = batch {
                        let now = Instant::now();
                        for (track, packet) in batch {
                            self.incoming(track, packet, now);
                        }
                    }
                }
                readable = self.out.socket.readable() => {
                    if readable.is_ok() {
                        self.read_socket(&mut batch);
                    }
                }
                () = sleep => self.run_timers(),
                writable = self.out.socket.writable(), if !self.out.queue.is_empty() => {
                    if writable.is_ok() {
                        self.out.send_queued();
                    }
                }
                accepted = accept(self.listener.as_ref(), self.accept_resume) => match accepted {
                    Ok((stream, from)) => {
                        self.accept_resume = None;
                        if let Some(serial) = self.out.tcp.accept(stream, from) {
                            self.timers.push(Reverse((Instant::now() + tcp::UNBOUND_TIMEOUT, Timer::TcpUnbound(from, serial))));
                        }
                    }
                    Err(e) => {
                        debug!(error = %e, "ICE-TCP accept failed");
                        self.accept_resume = Some(Instant::now() + ACCEPT_BACKOFF);
                    }
                },
                event = self.tcp_events.recv() => match event {
                    Some(TcpEvent::Frame { from, serial, data }) if self.out.tcp.is_current(from, serial) => {
                        self.receive(data, from, TransportProtocol::TCP);
                    }
                    Some(TcpEvent::Frame { .. }) => {}
                    Some(TcpEvent::Closed { from, serial }) => {
                        if let Some(id) = self.out.tcp.closed(from, serial)
                            && let Some(p) = self.peers.get_mut(&id)
                        {
                            p.tcp_addrs.retain(|a| *a != from);
                        }
                    }
                    None => {}
                },
            }
            self.flush();
            if self.stopping {
                break;
            }
        }
        for id in self.peers.keys().copied().collect::<Vec<_>>() {
            self.close_peer(id, "server shutdown");
        }
        self.flush();
        if self.out.send_drops > 0 || self.out.tcp.drops > 0 {
            info!(worker = self.index, udp = self.out.send_drops, tcp = self.out.tcp.drops, "packets dropped behind full send queues");
        }
    }

    fn read_socket(&mut self, batch: &mut udp::RecvBatch) {
        for _ in 0..READ_ROUNDS {
            let n = match batch.recv(&self.out.socket) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!(error = %e, "receive error");
                    return;
                }
            };
            for i in 0..n {
                if let Some((data, from)) = batch.get(i) {
                    self.receive(data, from, TransportProtocol::UDP);
                }
            }
            if n < udp::BATCH {
                return;
            }
        }
    }

    /// Hands one packet (a UDP datagram or an ICE-TCP frame) to its connection.
    fn receive(&mut self, data: BytesMut, from: SocketAddr, via: TransportProtocol) {
        self.out.traffic.packets_in += 1;
        self.out.traffic.bytes_in += data.len() as u64;
        let routed = |w: &Self| match via {
            TransportProtocol::TCP => w.out.tcp.peer_of(from),
            _ => w.by_addr.get(&from).copied(),
        };
        let mut nominates = false;
        let peer = match demux::classify(&data) {
            Kind::BindingRequest { ufrag, mut message } => {
                let Some(&id) = self.by_ufrag.get(&ufrag) else { return };
                let Some(p) = self.peers.get(&id) else { return };
                let known = routed(self) == Some(id);
                nominates = message.contains(ATTR_USE_CANDIDATE);
                // Only a check signed with this connection's password may route an address
                // to it, or make it the one media goes to; an unsigned or forged one goes
                // no further.
                if (!known || nominates) && MessageIntegrity::check(&mut message, p.password.as_bytes(), self.shared.crypto()).is_err() {
                    return;
                }
                if !known {
                    match via {
                        TransportProtocol::TCP => self.learn_tcp(id, from),
                        _ => self.learn(id, from),
                    }
                }
                id
            }
            Kind::StunOther | Kind::Other => match routed(self) {
                Some(id) => id,
                None => return,
            },
        };
        let now = Instant::now();
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let msg = TaggedBytesMut {
            now,
            transport: TransportContext { local_addr: self.local, peer_addr: from, ecn: None, transport_protocol: via },
            message: data,
        };
        // The client (the controlling agent: the server is ICE-lite) nominates the pair
        // media goes on from now, as rtc selects it.
        if nominates {
            p.remote = Some(msg.transport);
        }
        // `handle_read` reports problems through its own logs; its result carries nothing to act on.
        let _ = p.pc.handle_read(msg);
        // Keyed again (a new DTLS handshake): rtc's new context takes over from the next
        // packet on. rtc keys SRTP only as it reads a handshake's last flight (its DTLS
        // handler's `handle_read`), so this is the one place to ask, not per forwarded
        // packet (the tap is another cache line per subscriber).
        if p.srtp.as_ref().is_some_and(|(_, h)| *h != p.tap.handshakes()) {
            p.srtp = None;
        }
        self.drain_peer(peer, now);
    }

    /// Binds an ICE-TCP connection to connection `id` (it keeps its last few).
    fn learn_tcp(&mut self, id: u32, from: SocketAddr) {
        if let Some(other) = self.out.tcp.bind(from, id)
            && let Some(o) = self.peers.get_mut(&other)
        {
            o.tcp_addrs.retain(|a| *a != from);
        }
        let Some(p) = self.peers.get_mut(&id) else { return };
        p.tcp_addrs.push(from);
        if p.tcp_addrs.len() > ADDRS_PER_PEER {
            let old = p.tcp_addrs.remove(0);
            self.out.tcp.close(old);
        }
    }

    /// Routes `addr` to connection `id` (a client may check from several addresses: host,
    /// reflexive, relay). A connection keeps its last few; an address moves from another
    /// connection only by a check signed for this one.
    fn learn(&mut self, id: u32, addr: SocketAddr) {
        if let Some(other) = self.by_addr.insert(addr, id)
            && other != id
            && let Some(o) = self.peers.get_mut(&other)
        {
            o.addrs.retain(|a| *a != addr);
        }
        let Some(p) = self.peers.get_mut(&id) else { return };
        p.addrs.push(addr);
        if p.addrs.len() > ADDRS_PER_PEER {
            let old = p.addrs.remove(0);
            if self.by_addr.get(&old) == Some(&id) {
                self.by_addr.remove(&old);
            }
        }
    }

    /// Takes everything a connection produced: events, received media, feedback.
    fn drain_peer(&mut self, id: u32, now: Instant) {
        let mut events = Vec::new();
        // Events first: a track's first packet comes out of the same datagram as its
        // OnTrack event, and only a track that event registered takes the packet.
        {
            let Some(p) = self.peers.get_mut(&id) else { return };
            while let Some(e) = p.pc.poll_event() {
                events.push(e);
            }
        }
        for e in events.drain(..) {
            self.event(id, e, now);
        }
        // Reused across datagrams: no allocation per received packet.
        let mut media = std::mem::take(&mut self.scratch);
        let mut keyframe_requests = Vec::new();
        let mut data = Vec::new();
        {
            let Some(p) = self.peers.get_mut(&id) else {
                self.scratch = media;
                return;
            };
            while let Some(TaggedRTCMessage { message, .. }) = p.pc.poll_read() {
                match message {
                    RTCMessage::RtpPacket(track_id, packet) => {
                        self.out.traffic.rtp_in += 1;
                        let layer = if p.layer_receivers.is_empty() { None } else { p.layer_receivers.get(&packet.header.ssrc) };
                        if let Some(&track) = layer.or_else(|| p.receivers.get(&track_id)) {
                            media.push((track, packet));
                        }
                    }
                    RTCMessage::DataChannelMessage(channel, message) => {
                        if let Some(publication) = p.data_sources.get(&channel) {
                            data.push((publication.clone(), message.is_string, message.data.freeze()));
                        }
                    }
                    RTCMessage::RtcpPacket(track_id, packets) => {
                        self.out.traffic.keyframe_requests_in += packets.iter().filter(|r| is_keyframe_request(r.as_ref())).count() as u64;
                        if packets.iter().any(|r| is_keyframe_request(r.as_ref()))
                            && let Some(leg) = p.legs.values_mut().find(|l| l.track_id == track_id)
                            // A paused leg shows nothing: its subscriber's requests wait for the resume's keyframe.
                            && leg.active
                            && leg.last_keyframe_request.is_none_or(|t| now.duration_since(t) >= LEG_KEYFRAME_INTERVAL)
                        {
                            leg.last_keyframe_request = Some(now);
                            let awaited = leg.sel.as_ref().and_then(|s| s.target);
                            keyframe_requests.push((awaited.unwrap_or(leg.source), leg.owner));
                        }
                    }
                    _ => {}
                }
            }
            while let Some(e) = p.pc.poll_event() {
                events.push(e);
            }
            p.mark_dirty(&mut self.dirty);
        }
        for e in events {
            self.event(id, e, now);
        }
        for (track, packet) in media.drain(..) {
            self.forward(track, packet, now);
        }
        self.scratch = media;
        for (track, owner) in keyframe_requests {
            self.keyframe(track, owner, now);
        }
        for (publication, text, bytes) in data {
            self.relay_data(&publication, text, &bytes, now);
            for &w in self.data_workers.get(&publication).into_iter().flatten() {
                self.shared.send_to(w, Cmd::Data { publication: publication.clone(), text, data: bytes.clone() });
            }
        }
    }

    /// Sends one message of a publication's data channel to its subscribers on this worker, in order.
    fn relay_data(&mut self, publication: &str, text: bool, bytes: &Bytes, now: Instant) {
        let Some(sinks) = self.data_sinks.get(publication) else { return };
        for &(peer, channel) in sinks {
            let Some(p) = self.peers.get_mut(&peer) else { continue };
            if let Some(mut dc) = p.pc.data_channel(channel) {
                let r = match (text, std::str::from_utf8(bytes)) {
                    (true, Ok(s)) => dc.send_text(now, s),
                    _ => dc.send(now, BytesMut::from(&bytes[..])),
                };
                if let Err(e) = r {
                    debug!(error = %e, "data relay to a subscriber failed");
                }
            }
            p.mark_dirty(&mut self.dirty);
        }
    }

    /// A data channel the client opened: a subscriber's (labelled with the stream id it
    /// wants) or a publisher's (any other label, on a transport with a data publication).
    fn data_channel_opened(&mut self, id: u32, channel: usize) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        let Some(label) = p.pc.data_channel(channel).map(|dc| dc.label().to_string()) else { return };
        if let Some(pos) = p.data_wanted.iter().position(|(_, stream, _)| *stream == label) {
            let (session, stream, owner) = p.data_wanted.remove(pos);
            p.data_legs.push((session, stream.clone(), owner, channel));
            let sinks = self.data_sinks.entry(stream.clone()).or_default();
            if sinks.is_empty() && owner != self.index {
                self.shared.send_to(owner, Cmd::DataSubscriber { publication: stream, worker: self.index, add: true });
            }
            sinks.push((id, channel));
            return;
        }
        let Some(publication) = p.publications.iter_mut().find(|s| s.data && !s.data_open) else {
            debug!(label = ?label, "data channel with no matching publication or subscription; ignored");
            return;
        };
        publication.data_open = true;
        let publication = publication.id.clone();
        p.data_sources.insert(channel, publication.clone());
        self.check_ready(id, &publication);
    }

    /// A packet of a track published here: to local subscribers, other workers and taps.
    fn forward(&mut self, track: TrackId, mut packet: rtp::Packet, now: Instant) {
        let Some(t) = self.published.get_mut(&track) else { return };
        let layered = t.meter.as_ref().map(|m| m.board.id);
        let mut woke = None;
        if let Some(m) = &mut t.meter {
            m.bytes += packet.payload.len() as u64;
            m.frames += u32::from(packet.header.marker);
            m.last = Some(now);
            if let Some(size) = m.board.codec.picture_size(&packet.payload) {
                m.board.set_size(m.index, size);
            }
            // A relayed layer flows from its first packet (a client's from its track event).
            if t.publisher.is_none() && !m.board.is_live(m.index) {
                woke = Some((m.board.clone(), m.index));
            }
        }
        if let Some((board, index)) = woke
            && board.set_live_mask(board.live_mask() | 1 << index)
        {
            self.layers_changed(board.id, now);
        }
        let Some(t) = self.published.get_mut(&track) else { return };
        let seq = packet.header.sequence_number;
        // Seen even while the track is paused (a keyframe dropped then must not keep covering
        // the request its resumption makes), but only at the head of the stream: a late or
        // repaired packet of an old keyframe is not the one awaited.
        if t.throttle.awaiting() && t.seen.advances(seq) && t.video.starts_keyframe(&packet.payload) {
            t.throttle.keyframe_seen();
            debug!(track, "keyframe came");
        }
        // A repeated RTX repair goes to nobody (see `SeenWindow`).
        if t.seen.repeat(seq) || !t.active {
            return;
        }
        strip_extensions(&mut packet);
        for &w in &t.workers {
            if let Some(out) = self.outbox.get_mut(w) {
                out.push((track, packet.clone()));
            }
        }
        if t.taps.iter().any(|tap| !tap.idle)
            && let Ok(bytes) = packet.marshal()
        {
            let bytes = bytes.freeze();
            t.taps.retain(|tap| tap.idle || !matches!(tap.tx.try_send(bytes.clone()), Err(mpsc::error::TrySendError::Closed(_))));
        }
        deliver(&mut self.peers, &mut self.dirty, &mut self.out, &t.subscribers, track, &packet, now, &mut self.notes);
        self.follow_notes(now);
        if let Some(board) = layered {
            self.feed_layer_taps(board, track, &packet, now);
        }
    }

    /// A layered video's packet to its taps (each reads one layer; see [`LayerTap`]).
    fn feed_layer_taps(&mut self, board: u64, track: TrackId, packet: &rtp::Packet, now: Instant) {
        let Some(state) = self.boards.get_mut(&board) else { return };
        if state.taps.is_empty() {
            return;
        }
        let mut keyframe = None;
        let mut ask = false;
        state.taps.retain_mut(|tap| {
            match gate(&mut tap.sel, &mut tap.source, &mut tap.rewriter, track, packet, now, &mut keyframe) {
                Gate::Skip => return true,
                Gate::Ask => {
                    ask = true;
                    return true;
                }
                Gate::Send | Gate::Switched(_) => {}
            }
            let mut out = packet.clone();
            tap.rewriter.rewrite(&mut out, now);
            out.header.payload_type = packet.header.payload_type;
            if let Some(v) = &mut tap.sel.vp8 {
                v.munge(&mut out);
            }
            match out.marshal() {
                Ok(bytes) => !matches!(tap.tx.try_send(bytes.freeze()), Err(mpsc::error::TrySendError::Closed(_))),
                Err(_) => true,
            }
        });
        state.count_taps();
        if ask {
            self.keyframe(track, self.index, now);
        }
    }

    /// A tap on a layered video (see [`LayerTap`]): it starts on the highest flowing layer.
    fn tap_layers(&mut self, board: u64, track: TrackId, id: u64, tx: mpsc::Sender<Bytes>, now: Instant) {
        let Some(state) = self.boards.get_mut(&board) else { return };
        let b = state.board.clone();
        // While no layer flows, the one tapped (it moves when one does).
        let start = b.choose(&LayerChoice::Auto).and_then(|i| b.layers.get(i)).map_or(track, |l| l.track);
        let sel = Selection::new(b, LayerChoice::Auto);
        state.taps.push(LayerTap { id, tx, source: start, sel, rewriter: Rewriter::new(rand::random(), 0) });
        state.count_taps();
        self.keyframe(start, self.index, now);
    }

    /// A layered video's taps move to the layer their choice gives now.
    fn retarget_layer_taps(&mut self, board: u64, now: Instant) {
        let Some(state) = self.boards.get_mut(&board) else { return };
        let mut ask = Vec::new();
        for tap in &mut state.taps {
            if tap.sel.held(tap.source) {
                continue;
            }
            let b = &tap.sel.board;
            let Some(want) = b.choose(&tap.sel.choice).and_then(|i| b.layers.get(i)).map(|l| l.track) else { continue };
            // A tap reads every layer of its board: nothing to detach from.
            if matches!(tap.sel.aim(want, tap.source, now), Aim::Changed { .. }) && want != tap.source {
                ask.push(want);
            }
        }
        for track in ask {
            self.keyframe(track, self.index, now);
        }
    }

    /// A packet from another worker (or a local producer) for this worker's subscribers.
    fn incoming(&mut self, track: TrackId, packet: rtp::Packet, now: Instant) {
        if self.published.contains_key(&track) {
            return self.forward(track, packet, now);
        }
        if let Some(legs) = self.relayed.get(&track) {
            deliver(&mut self.peers, &mut self.dirty, &mut self.out, legs, track, &packet, now, &mut self.notes);
            self.follow_notes(now);
        }
    }

    /// Does what delivering to layered legs left: lets go of the layers they left, asks
    /// for the keyframes they wait for.
    fn follow_notes(&mut self, now: Instant) {
        if self.notes.is_empty() {
            return;
        }
        let mut notes = std::mem::take(&mut self.notes);
        for note in notes.drain(..) {
            match note {
                LegNote::Switched { peer, leg, from, owner } => self.detach(from, owner, peer, leg),
                LegNote::Keyframe { track, owner } => self.keyframe(track, owner, now),
            }
        }
        self.notes = notes;
    }

    /// Asks a track's producer for a keyframe (throttled), wherever it is published.
    fn keyframe(&mut self, track: TrackId, owner: usize, now: Instant) {
        self.ask_keyframe(track, owner, true, now);
    }

    /// [`Self::keyframe`]; `cover`: a keyframe already on its way may serve the request
    /// (see [`KeyframeThrottle::request`]).
    fn ask_keyframe(&mut self, track: TrackId, owner: usize, cover: bool, now: Instant) {
        if owner != self.index {
            self.shared.send_to(owner, Cmd::Keyframe { track, cover });
            return;
        }
        let Some(t) = self.published.get_mut(&track) else { return };
        if t.kind != MediaKind::Video {
            return;
        }
        let decision = t.throttle.request(now, cover);
        self.decided(track, decision);
    }

    /// Carries out a throttle's decision about a track's keyframe request.
    fn decided(&mut self, track: TrackId, decision: KeyframeDecision) {
        match decision {
            KeyframeDecision::SendNow => self.send_pli(track),
            KeyframeDecision::SendAt(at) => {
                if let Some(t) = self.published.get_mut(&track) {
                    t.pli_due = Some(at);
                    self.timers.push(Reverse((at, Timer::Pli(track))));
                }
            }
            KeyframeDecision::AlreadyScheduled | KeyframeDecision::Covered => {}
        }
    }

    /// Sends the PLI the throttle just counted as sent, and sets the end of the wait for
    /// its keyframe.
    fn send_pli(&mut self, track: TrackId) {
        let Some(t) = self.published.get(&track) else { return };
        if let Some(sent) = t.throttle.awaited_since() {
            self.timers.push(Reverse((sent + KEYFRAME_AWAIT, Timer::KeyframeWait(track, sent))));
        }
        if let Some(f) = &t.on_keyframe {
            // The producer (the mixer's encoder) takes its own locks: not on the packet thread.
            let f = f.clone();
            tokio::task::spawn_blocking(move || f());
            return;
        }
        let Some((peer, receiver, ssrc)) = t.publisher else { return };
        let Some(p) = self.peers.get_mut(&peer) else { return };
        if let Some(mut r) = p.pc.rtp_receiver(receiver) {
            self.out.traffic.plis_out += 1;
            debug!(track, "PLI to the publisher");
            let pli = PictureLossIndication { sender_ssrc: 0, media_ssrc: ssrc };
            if let Err(e) = r.write_rtcp(Instant::now(), vec![Box::new(pli)]) {
                debug!(error = %e, "PLI to publisher failed");
            }
        }
        p.mark_dirty(&mut self.dirty);
    }

    fn run_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, timer))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Peer(id) => {
                    let Some(p) = self.peers.get_mut(&id) else { continue };
                    if p.scheduled != Some(at) {
                        continue; // superseded by an earlier deadline
                    }
                    p.scheduled = None;
                    if let Err(e) = p.pc.handle_timeout(now) {
                        debug!(transport = %p.transport, error = %e, "timer error");
                    }
                    p.dirty = false;
                    self.drain_peer(id, now);
                    if let Some(p) = self.peers.get_mut(&id) {
                        p.mark_dirty(&mut self.dirty);
                    }
                }
                Timer::TcpUnbound(from, serial) => self.out.tcp.expire_unbound(from, serial),
                Timer::Layers(board) => self.measure_layers(board, now),
                Timer::Adapt => {
                    // Subscribers on `auto` follow their connection's bandwidth estimate.
                    let legs = self.legs_where(Leg::on_auto);
                    for (peer, leg) in legs {
                        self.reselect(peer, leg, now);
                    }
                    // A connection with a leg that could go up probes its link (see `crate::probe`).
                    for p in self.peers.values().filter(|p| p.estimate.enabled()) {
                        p.estimate.set_probing(p.legs.values().any(|l| l.on_auto() && l.sel.as_ref().is_some_and(|s| s.could_go_up(l.source, now))));
                    }
                    self.timers.push(Reverse((now + ADAPT_TICK, Timer::Adapt)));
                }
                Timer::Pli(track) => {
                    let Some(t) = self.published.get_mut(&track) else { continue };
                    if t.pli_due != Some(at) {
                        continue;
                    }
                    t.pli_due = None;
                    t.throttle.sent_deferred(now);
                    self.send_pli(track);
                }
                Timer::KeyframeWait(track, sent) => {
                    let Some(t) = self.published.get_mut(&track) else { continue };
                    if let Some(decision) = t.throttle.wait_over(sent, now) {
                        debug!(track, "keyframe not come within the wait: PLI again");
                        self.decided(track, decision);
                    }
                }
            }
        }
    }

    /// Sends what the dirty connections queued, hands batches to other workers, and
    /// re-arms the connections' timers.
    fn flush(&mut self) {
        while let Some(id) = self.dirty.pop() {
            let Some(p) = self.peers.get_mut(&id) else { continue };
            p.dirty = false;
            p.unsent = 0;
            while let Some(out) = p.pc.poll_write() {
                // DTLS and SRTP(C) go to the selected pair only (STUN answers any check).
                if out.message.first().is_some_and(|b| *b >= 20) {
                    p.remote = Some(out.transport);
                }
                self.out.send(out);
            }
            if let Some(deadline) = p.pc.poll_timeout()
                && p.scheduled.is_none_or(|s| deadline < s)
            {
                p.scheduled = Some(deadline);
                self.timers.push(Reverse((deadline, Timer::Peer(id))));
            }
        }
        self.out.send_queued();
        for (w, out) in self.outbox.iter_mut().enumerate() {
            if !out.is_empty() {
                let batch = std::mem::take(out);
                self.shared.send_batch(w, batch);
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        let now = Instant::now();
        match cmd {
            Cmd::Open { transport, room, participant, reply } => {
                let _ = reply.send(self.open(transport, room, participant, now));
            }
            Cmd::Publish { transport, spec } => {
                if let Some(p) = self.peer_mut(&transport) {
                    p.publications.push(PubSession {
                        id: spec.at.session.to_string(),
                        announced: spec.tracks,
                        flowing: Vec::new(),
                        board: None,
                        data: spec.data,
                        data_open: false,
                        ready: false,
                        answered: false,
                        accept: spec.accept,
                    });
                }
            }
            Cmd::Subscribe { transport, spec, sources, data_owner } => {
                if let Some(p) = self.peer_mut(&transport) {
                    p.pending.push(PendingSub { spec, sources, data_owner });
                }
            }
            Cmd::Offer { transport, sdp, reply } => {
                let waiting = self.waiting_sessions(&transport);
                let r = self.offer(&transport, sdp, now);
                if let Err(e) = &r {
                    warn!(transport = ?transport, error = ?e.to_string(), "offer failed");
                    // The sessions the offer was to start end with it: a client that does
                    // not read the `soac` answer (OWT's SDK) learns it from their errors.
                    let (publications, subscriptions) = waiting;
                    self.refuse(&transport, &publications, &subscriptions, &e.to_string());
                }
                let _ = reply.send(r);
            }
            Cmd::Candidate { transport, candidate } => {
                if let Some(&id) = self.by_transport.get(&transport)
                    && let Some(p) = self.peers.get_mut(&id)
                    && p.has_remote
                {
                    if let Err(e) = p.pc.add_remote_candidate(candidate) {
                        debug!(error = %e, "client candidate refused");
                    }
                    // Whatever rtc does with it (a check, a timer) is collected by the flush.
                    p.mark_dirty(&mut self.dirty);
                }
            }
            Cmd::EndSession { transport, session } => self.end_session(&transport, &session),
            Cmd::Switch { transport, session, switch } => self.switch(&transport, &session, switch, now),
            Cmd::SelectLayer { transport, session, layer } => self.select_layer(&transport, &session, layer, now),
            Cmd::LayersChanged { board } => self.reselect_board(board, now),
            Cmd::Close { transport, reason } => {
                if let Some(&id) = self.by_transport.get(&transport) {
                    self.close_peer(id, &reason);
                }
            }
            Cmd::RemoteSubscriber { track, worker, add } => {
                if let Some(t) = self.published.get_mut(&track) {
                    t.workers.retain(|w| *w != worker);
                    if add {
                        t.workers.push(worker);
                    }
                    update_consumers(t);
                }
            }
            Cmd::Keyframe { track, cover } => self.ask_keyframe(track, self.index, cover, now),
            Cmd::Tap { track, id, tx, exact } => {
                let layered = self.published.get(&track).and_then(|t| t.meter.as_ref()).map(|m| m.board.id).filter(|_| !exact);
                if let Some(board) = layered {
                    self.tap_layers(board, track, id, tx, now);
                } else if let Some(t) = self.published.get_mut(&track) {
                    t.taps.push(TrackTap { id, tx, idle: false });
                    update_consumers(t);
                    self.keyframe(track, self.index, now);
                } else if let Some(state) = self.boards.values_mut().find(|s| s.board.layers.iter().any(|l| l.track == track)) {
                    // A declared layer that has not flowed yet (dropping the sender would
                    // end the tap as if the stream had ended).
                    state.waiting.push((track, TrackTap { id, tx, idle: false }));
                }
            }
            Cmd::Untap { track, id } => {
                if let Some(t) = self.published.get_mut(&track) {
                    t.taps.retain(|tap| tap.id != id);
                    update_consumers(t);
                }
                for state in self.boards.values_mut() {
                    state.taps.retain(|t| t.id != id);
                    state.waiting.retain(|(_, t)| t.id != id);
                    state.count_taps();
                }
            }
            Cmd::TapIdle { id, idle } => {
                let mut woke = None;
                for (&track, t) in self.published.iter_mut() {
                    if let Some(tap) = t.taps.iter_mut().find(|tap| tap.id == id) {
                        // Back in use: its consumers need a picture to start from.
                        if tap.idle && !idle {
                            woke = Some(track);
                        }
                        tap.idle = idle;
                        update_consumers(t);
                    }
                }
                for (_, tap) in self.boards.values_mut().flat_map(|s| s.waiting.iter_mut()).filter(|(_, t)| t.id == id) {
                    tap.idle = idle;
                }
                if let Some(track) = woke {
                    self.keyframe(track, self.index, now);
                }
            }
            Cmd::TapLayer { id, choice } => {
                let board = self.boards.iter_mut().find_map(|(board, state)| {
                    let tap = state.taps.iter_mut().find(|t| t.id == id)?;
                    if tap.sel.choice != choice {
                        tap.sel.set_choice(choice.clone());
                    }
                    Some(*board)
                });
                if let Some(board) = board {
                    self.retarget_layer_taps(board, now);
                }
            }
            Cmd::LocalPublish { track, kind, codec, on_keyframe, consumers, layer } => {
                let mut p = published(kind, codec, self.shared.settings.keyframe_interval);
                p.on_keyframe = Some(on_keyframe);
                p.consumers = Some(consumers);
                if let Some(l) = layer {
                    // It flows from its first packet on (`forward`), not before.
                    p.meter = Some(LayerMeter { board: l.board.clone(), index: l.index, bytes: 0, frames: 0, last: None });
                    p.on_need = l.on_need;
                    if let std::collections::hash_map::Entry::Vacant(e) = self.boards.entry(l.board.id) {
                        let n = l.board.layers.len();
                        e.insert(BoardState {
                            board: l.board.clone(),
                            ranking: Vec::new(),
                            asked: (1u32 << n) - 1,
                            told: None,
                            publication: String::new(),
                            peer: None,
                            taps: Vec::new(),
                            tap_count: Some(l.taps),
                            sizes: vec![None; n],
                            waiting: Vec::new(),
                        });
                        self.timers.push(Reverse((now + LAYER_TICK, Timer::Layers(l.board.id))));
                    }
                }
                self.published.insert(track, p);
            }
            Cmd::LocalUnpublish { track } => self.unpublish(track),
            Cmd::Data { publication, text, data } => self.relay_data(&publication, text, &data, now),
            Cmd::Resync { track } => {
                for &(peer, leg) in self.relayed.get(&track).into_iter().flatten() {
                    if let Some(l) = self.peers.get_mut(&peer).and_then(|p| p.legs.get_mut(&leg)) {
                        l.rewriter.resync();
                    }
                }
            }
            Cmd::DataSubscriber { publication, worker, add } => {
                let workers = self.data_workers.entry(publication.clone()).or_default();
                workers.retain(|w| *w != worker);
                if add {
                    workers.push(worker);
                } else if workers.is_empty() {
                    self.data_workers.remove(&publication);
                }
            }
            Cmd::Shutdown => self.stopping = true,
        }
    }

    fn peer_mut(&mut self, transport: &str) -> Option<&mut Peer> {
        let id = *self.by_transport.get(transport)?;
        self.peers.get_mut(&id).map(|p| &mut **p)
    }

    fn open(&mut self, transport: String, room: String, participant: String, now: Instant) -> Result<(), AgentError> {
        if self.by_transport.contains_key(&transport) {
            return Ok(());
        }
        let ufrag = format!("w{}{}", self.index, super::random_token(10));
        let password = super::random_token(24);
        let super::Built { pc, estimate, tap, stack } = super::build_pc(&self.shared, &ufrag, &password, now)?;
        let id = self.next_peer;
        self.next_peer = self.next_peer.wrapping_add(1);
        self.by_transport.insert(transport.clone(), id);
        self.by_ufrag.insert(ufrag.clone(), id);
        self.peers.insert(
            id,
            Box::new(Peer {
                id,
                transport,
                room,
                participant,
                pc,
                estimate,
                ufrag,
                password,
                addrs: Vec::new(),
                tcp_addrs: Vec::new(),
                publications: Vec::new(),
                pending: Vec::new(),
                legs: HashMap::new(),
                unannounced: Vec::new(),
                subscriptions: HashSet::new(),
                receivers: HashMap::new(),
                layer_receivers: HashMap::new(),
                simulcast: Vec::new(),
                sending: HashMap::new(),
                data_wanted: Vec::new(),
                data_legs: Vec::new(),
                data_sources: HashMap::new(),
                has_remote: false,
                candidate_added: false,
                connected: false,
                scheduled: None,
                dirty: false,
                unsent: 0,
                tap,
                stack,
                srtp: None,
                spare_extensions: Vec::new(),
                remote: None,
            }),
        );
        Ok(())
    }

    /// The publications and subscriptions of a transport that wait for an offer to carry
    /// them (none answered yet).
    fn waiting_sessions(&self, transport: &str) -> (Vec<String>, Vec<String>) {
        let Some(p) = self.by_transport.get(transport).and_then(|id| self.peers.get(id)) else { return (Vec::new(), Vec::new()) };
        let publications = p.publications.iter().filter(|s| !s.answered).map(|s| s.id.clone()).collect();
        let subscriptions = p.pending.iter().map(|s| s.spec.at.session.to_string()).collect();
        (publications, subscriptions)
    }

    /// Ends sessions that cannot go on (their offer was refused, the client's answer took
    /// none of their codec), each with an error the portal passes to its client.
    fn refuse(&mut self, transport: &str, publications: &[String], subscriptions: &[String], reason: &str) {
        let Some((room, participant)) =
            self.by_transport.get(transport).and_then(|id| self.peers.get(id)).map(|p| (p.room.clone(), p.participant.clone()))
        else {
            return;
        };
        for session in publications.iter().chain(subscriptions) {
            self.end_session(transport, session);
        }
        self.shared.sessions_refused(&room, &participant, transport, publications, subscriptions, reason);
    }

    /// Applies a client offer: attaches pending subscriptions, answers, starts forwarding.
    fn offer(&mut self, transport: &str, sdp: String, now: Instant) -> Result<(), AgentError> {
        let id = *self.by_transport.get(transport).ok_or_else(|| AgentError::NoTransport(transport.into()))?;
        let local = self.local;
        let tcp = self.listener.is_some();
        let Some(p) = self.peers.get_mut(&id) else { return Err(AgentError::NoTransport(transport.into())) };
        // A publication m-line that offers none of the room's codecs is refused before
        // anything changes. rtc reads the offer whole (it fixes a connection's codecs from
        // the first description, which later subscriptions need); the answer the client
        // gets is cut to the room's codecs (below), so it sends only those.
        let accepting: Vec<(String, tessera_core::room::MediaIn)> = p
            .publications
            .iter()
            .filter_map(|s| s.accept.as_ref().map(|a| (s, a)))
            .flat_map(|(s, a)| s.announced.iter().map(move |t| (t.mid.clone(), a.clone())))
            .collect();
        let accepting: Vec<(&str, &tessera_core::room::MediaIn)> = accepting.iter().map(|(m, a)| (m.as_str(), a)).collect();
        crate::sdp::only_accepted(&sdp, &accepting).map_err(AgentError::Rejected)?;
        let order = crate::sdp::mid_order(&sdp);
        let simulcast = crate::sdp::simulcast_rids(&sdp);
        // A flowing video's layers are fixed by the offer that started it (its subscribers,
        // the mixer and recordings are on them): an offer that renames, adds or drops them
        // is refused, and the publication goes on as it was.
        let rids_of = |list: &[(String, Vec<String>)], mid: &str| list.iter().find(|(m, _)| m == mid).map(|(_, r)| r.clone()).unwrap_or_default();
        for publication in p.publications.iter().filter(|s| s.flowing.iter().any(|(k, _)| *k == MediaKind::Video)) {
            for t in publication.announced.iter().filter(|t| t.kind == MediaKind::Video) {
                let (was, now) = (rids_of(&p.simulcast, &t.mid), rids_of(&simulcast, &t.mid));
                if order.contains(&t.mid) && was != now {
                    return Err(AgentError::Rejected(format!(
                        "the simulcast layers of publication {} cannot change once it flows (m-line {}: RIDs [{}], offered [{}])",
                        publication.id,
                        t.mid,
                        was.join(","),
                        now.join(",")
                    )));
                }
            }
        }
        let pending = std::mem::take(&mut p.pending);
        // The codec each new subscription's m-line will carry (kept once the offer applies).
        let mut sending = Vec::new();
        // Sending transceivers are created before the offer is applied, in m-line order,
        // so each pairs with the client's recvonly m-line of its kind.
        let mut planned = Vec::new();
        for sub in &pending {
            for t in &sub.spec.tracks {
                let Some(src) = sub.sources.iter().find(|s| s.kind == t.kind && s.stream == t.from.as_str()) else {
                    return Err(AgentError::Rejected(format!("Stream {} has no {} media", t.from, t.kind.as_str())));
                };
                let pos = order.iter().position(|m| *m == t.mid).ok_or_else(|| {
                    AgentError::Rejected(format!("the offer has no m-line with mid {} for subscription {}", t.mid, sub.spec.at.session))
                })?;
                planned.push((pos, sub.spec.at.session.to_string(), src.clone(), t.layer.clone()));
                sending.push((t.mid.to_string(), src.codec.clone()));
            }
        }
        planned.sort_by_key(|(pos, _, _, _)| *pos);
        let mut created = Vec::new();
        for (_, session, src, layer) in planned {
            let ssrc: u32 = rand::random();
            let kind = match src.kind {
                MediaKind::Audio => RtpCodecKind::Audio,
                MediaKind::Video => RtpCodecKind::Video,
            };
            let track_id = format!("{}-{}-{}", session, src.kind.as_str(), ssrc);
            // The msid names the subscription, not the source stream: a browser groups the
            // tracks of one msid into one MediaStream, which would merge two subscriptions
            // of a stream on one transport, or a re-subscription with the ended one.
            let track = MediaStreamTrack::new(
                session.clone(),
                track_id.clone(),
                format!("{}-{}", src.stream, src.kind.as_str()),
                kind,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(ssrc), ..Default::default() },
                    codec: src.codec.clone(),
                    ..Default::default()
                }],
            );
            let init = RTCRtpTransceiverInit { direction: RTCRtpTransceiverDirection::Sendonly, streams: vec![], send_encodings: vec![] };
            let transceiver =
                p.pc.add_transceiver_from_track(track, Some(init)).map_err(|e| AgentError::Failed(format!("adding a subscriber track: {e}")))?;
            created.push((session, src, layer, RTCRtpSenderId::from(transceiver), track_id, ssrc));
        }

        // What rtc keeps of the offer (text and parsed, for the connection's life) and
        // answers is then only what is sent on the subscriptions' m-lines.
        let mut cut_to = p.sending.clone();
        cut_to.extend(sending.iter().cloned());
        let sdp = crate::sdp::only_sent_codecs(&sdp, &cut_to);
        let applied = RTCSessionDescription::offer(sdp).and_then(|offer| p.pc.set_remote_description(now, offer));
        if let Err(e) = applied {
            // The sending transceivers made for the refused subscriptions must not pair
            // with the m-lines of a later offer.
            for (_, _, _, sender, _, _) in &created {
                if let Some(Err(e)) = p.pc.rtp_transceiver(RTCRtpTransceiverId::from(*sender)).map(|mut t| t.stop()) {
                    debug!(error = %e, "stopping a refused subscription's transceiver");
                }
            }
            return Err(AgentError::Rejected(format!("invalid SDP offer: {e}")));
        }
        p.sending = cut_to;
        p.has_remote = true;
        p.simulcast = simulcast;
        if !p.candidate_added {
            // The worker's socket (its public address behind 1:1 NAT), and its ICE-TCP
            // port of the same number (lower priority: clients take it when UDP fails).
            let networks: &[(&str, TcpType)] =
                if tcp { &[("udp", TcpType::Unspecified), ("tcp", TcpType::Passive)] } else { &[("udp", TcpType::Unspecified)] };
            for &(network, tcp_type) in networks {
                let candidate = CandidateHostConfig {
                    base_config: CandidateConfig {
                        network: network.to_owned(),
                        address: local.ip().to_string(),
                        port: local.port(),
                        component: 1,
                        ..Default::default()
                    },
                    tcp_type,
                }
                .new_candidate_host()
                .and_then(|c| RTCIceCandidate::from(&c).to_json())
                .map_err(|e| AgentError::Failed(format!("host candidate: {e}")))?;
                p.pc.add_local_candidate(candidate).map_err(|e| AgentError::Failed(format!("host candidate: {e}")))?;
            }
            p.candidate_added = true;
        }
        let answer = p.pc.create_answer(None).map_err(|e| AgentError::Rejected(format!("cannot answer the offer: {e}")))?;
        p.pc.set_local_description(now, answer).map_err(|e| AgentError::Failed(format!("applying the answer: {e}")))?;
        let sdp = p.pc.local_description().map(|d| d.sdp).ok_or_else(|| AgentError::Failed("no local description".into()))?;
        // rtc keeps its own copy whole (it refuses an edited answer; it only receives on
        // these m-lines). This fails only where rtc answered none of the room's codecs the
        // offer had (a codec the room lists that rtc does not know), as `create_answer`
        // fails where it can answer no codec at all.
        let sdp = crate::sdp::only_accepted(&sdp, &accepting).map_err(AgentError::Rejected)?;
        // Each simulcast layer's retransmissions come on an RTX flow of its own that only
        // the repaired RID names; rtc 0.21 cannot bind those, the stack restores them
        // (`crate::rtx_in`). Set at every answer: a re-offer may end the simulcast m-lines.
        let mids: Vec<&str> = p.simulcast.iter().map(|(m, _)| m.as_str()).collect();
        let apt = if mids.is_empty() { Vec::new() } else { crate::sdp::rtx_repairs(&sdp, &mids) };
        if let Ok(mut stack) = p.stack.0.lock() {
            stack.set_layer_rtx(apt);
        }
        self.shared.progress(&p.room, &p.participant, &p.transport, Progress::Answer { sdp });

        for s in &mut p.publications {
            s.answered = true;
        }
        // Bind each sending track to its source with the payload type negotiated here.
        let mut sources_added = Vec::new();
        // Subscriptions the client's offer cannot carry (it has not their codec).
        let mut unaccepted: Vec<(String, String)> = Vec::new();
        for (session, src, layer, sender, track_id, ssrc) in created {
            let payload_type =
                p.pc.rtp_sender(sender).and_then(|mut s| crate::sdp::negotiated_payload_type(&s.get_parameters().rtp_parameters.codecs, &src.codec));
            let Some(payload_type) = payload_type else {
                warn!(%session, kind = src.kind.as_str(), codec = %src.codec.mime_type, "subscriber did not accept the publisher's codec");
                let reason = format!(
                    "the offer has no {}, the codec of the stream's {} (streams are sent in their own codec, not transcoded)",
                    src.codec.mime_type,
                    src.kind.as_str()
                );
                if !unaccepted.iter().any(|(s, _)| *s == session) {
                    unaccepted.push((session, reason));
                }
                continue;
            };
            let leg_id = self.next_leg;
            self.next_leg = self.next_leg.wrapping_add(1);
            // A layered source starts on the layer chosen for it, at that layer's next keyframe.
            let (source, sel) = match &src.layers {
                Some(board) => {
                    let first = board.choose(&layer).and_then(|i| board.layers.get(i)).map_or(src.track, |l| l.track);
                    // On `auto`, this connection now needs its bandwidth estimated (a
                    // leg on a chosen layer never reads it).
                    if layer == LayerChoice::Auto {
                        p.estimate.enable();
                    }
                    (first, Some(Selection::new(board.clone(), layer)))
                }
                None => (src.track, None),
            };
            p.legs.insert(
                leg_id,
                Leg {
                    session,
                    kind: src.kind,
                    source,
                    owner: src.owner,
                    sender,
                    track_id,
                    rewriter: Rewriter::new(ssrc, payload_type),
                    active: true,
                    last_keyframe_request: None,
                    sel,
                },
            );
            sources_added.push((source, src.owner, leg_id));
        }
        // rtc keeps the codec list each m-line was answered with three times over per
        // transceiver, and the sender's last parameters once more: ~12 KB for a first
        // m-line, which the offer keeps whole (`only_sent_codecs`). A sending transceiver
        // needs only the codec it sends and its RTX once the answer is made, so that is all
        // it keeps. The answer itself stays whole: a client whose stack takes its codecs
        // from the first m-line's answer, as webrtc-rs and Pion do, must be able to offer
        // another codec on a later m-line.
        for t in p.pc.get_transceivers().collect::<Vec<_>>() {
            let Some(transceiver) = p.pc.rtp_transceiver(t) else { continue };
            let (Some(mid), Some(sender)) = (transceiver.mid().clone(), transceiver.sender()) else { continue };
            let Some(want) = p.sending.get(&mid) else { continue };
            let Some(kept) = p.pc.rtp_sender(sender).and_then(|mut s| crate::sdp::only_sent(&s.get_parameters().rtp_parameters.codecs, want)) else {
                continue;
            };
            if let Some(Err(e)) = p.pc.rtp_transceiver(t).map(|mut t| t.set_codec_preferences(kept)) {
                debug!(error = %e, %mid, "keeping only the sent codec");
            }
        }
        for sub in pending {
            let session = sub.spec.at.session.to_string();
            if let (Some(from), Some(owner)) = (&sub.spec.data_from, sub.data_owner) {
                p.data_wanted.push((session.clone(), from.to_string(), owner));
            }
            p.subscriptions.insert(session.clone());
            p.unannounced.push(session);
        }
        let connected = p.connected;
        p.mark_dirty(&mut self.dirty);
        for (track, owner, leg) in sources_added {
            self.attach(track, owner, id, leg);
        }
        for (session, reason) in unaccepted {
            self.refuse(transport, &[], std::slice::from_ref(&session), &reason);
        }
        if connected {
            self.announce_subscriptions(id, now);
        }
        Ok(())
    }

    /// Adds a subscriber leg to its source: directly when the track is published here, else
    /// through the owning worker (once per track and worker).
    fn attach(&mut self, track: TrackId, owner: usize, peer: u32, leg: u32) {
        if owner == self.index {
            if let Some(t) = self.published.get_mut(&track) {
                t.subscribers.push((peer, leg));
                update_consumers(t);
            }
            return;
        }
        let legs = self.relayed.entry(track).or_default();
        if legs.is_empty() {
            self.shared.send_to(owner, Cmd::RemoteSubscriber { track, worker: self.index, add: true });
        }
        legs.push((peer, leg));
    }

    fn detach(&mut self, track: TrackId, owner: usize, peer: u32, leg: u32) {
        if owner == self.index {
            if let Some(t) = self.published.get_mut(&track) {
                t.subscribers.retain(|s| *s != (peer, leg));
                update_consumers(t);
            }
            return;
        }
        let Some(legs) = self.relayed.get_mut(&track) else { return };
        legs.retain(|s| *s != (peer, leg));
        if legs.is_empty() {
            self.relayed.remove(&track);
            self.shared.send_to(owner, Cmd::RemoteSubscriber { track, worker: self.index, add: false });
        }
    }

    /// Tells the client its new subscriptions are up, and asks for keyframes for them.
    fn announce_subscriptions(&mut self, id: u32, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        let sessions = std::mem::take(&mut p.unannounced);
        let mut sources: Vec<(TrackId, usize)> = Vec::new();
        for s in &sessions {
            sources.extend(p.legs.values().filter(|l| &l.session == s).map(|l| (l.source, l.owner)));
            self.shared.progress(&p.room, &p.participant, &p.transport, Progress::SessionReady { session: s.as_str().into() });
        }
        // Not covered by a keyframe already in flight: the client may not decrypt it yet.
        for (track, owner) in sources {
            self.ask_keyframe(track, owner, false, now);
        }
    }

    fn event(&mut self, id: u32, event: RTCPeerConnectionEvent, now: Instant) {
        match event {
            RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => match state {
                RTCPeerConnectionState::Connected => {
                    let Some(p) = self.peers.get_mut(&id) else { return };
                    if p.connected {
                        return;
                    }
                    p.connected = true;
                    let cipher = p.pc.get_stats(now, rtc::statistics::StatsSelector::None).transport().map(|t| t.srtp_cipher.clone());
                    let handshake = p.tap.handshakes();
                    p.srtp = cipher
                        .as_deref()
                        .and_then(crate::srtp_out::profile)
                        .and_then(|profile| crate::srtp_out::outbound(&p.tap, profile))
                        .map(|c| (c, handshake));
                    debug!(transport = %p.transport, cipher = ?cipher, own = p.srtp.is_some(), "forwarded media's SRTP");
                    self.out.traffic.connected += 1;
                    info!(transport = %p.transport, worker = self.index, "transport connected");
                    self.shared.progress(&p.room, &p.participant, &p.transport, Progress::TransportReady);
                    self.announce_subscriptions(id, now);
                }
                RTCPeerConnectionState::Failed => self.close_peer(id, "connection failed"),
                RTCPeerConnectionState::Closed => self.close_peer(id, "connection closed"),
                _ => {}
            },
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => self.track_opened(id, init),
            RTCPeerConnectionEvent::OnDataChannel(RTCDataChannelEvent::OnOpen(channel)) => self.data_channel_opened(id, channel),
            _ => {}
        }
    }

    /// A publisher's track started flowing (its first packet arrived); for simulcast, one
    /// of its layers did.
    fn track_opened(&mut self, id: u32, init: RTCTrackEventInit) {
        let interval = self.shared.settings.keyframe_interval;
        let now = Instant::now();
        let Some(p) = self.peers.get_mut(&id) else { return };
        let receiver = init.receiver_id;
        let Some(mut r) = p.pc.rtp_receiver(receiver) else { return };
        let ssrc = match init.rid {
            Some(_) => init.ssrc,
            None => match r.track().ssrcs().next() {
                Some(ssrc) => ssrc,
                None => return,
            },
        };
        // A layer's coding may not name its codec: then the m-line's negotiated one.
        let codec = r.track().codec(ssrc).cloned().or_else(|| {
            r.get_parameters()
                .rtp_parameters
                .codecs
                .iter()
                .find(|c| !c.rtp_codec.mime_type.to_ascii_lowercase().ends_with("/rtx"))
                .map(|c| c.rtp_codec.clone())
        });
        let Some(codec) = codec else {
            warn!(ssrc, "track without a negotiated codec ignored");
            return;
        };
        let mid = p.pc.rtp_transceiver(receiver.into()).and_then(|t| t.mid().clone());
        let Some(mid) = mid else {
            warn!(ssrc, "track on an unknown m-line ignored");
            return;
        };
        let declared = p.simulcast.iter().find(|(m, _)| *m == mid).map(|(_, rids)| rids.clone());
        let Some(publication) = p.publications.iter_mut().find(|s| s.announced.iter().any(|a| a.mid == mid)) else {
            debug!(mid = ?mid, "track that no publication announced; ignored");
            return;
        };
        let Some(kind) = publication.announced.iter().find(|a| a.mid == mid).map(|a| a.kind) else { return };
        let mut layer = None;
        let key = match (&init.rid, declared) {
            (Some(rid), Some(rids)) if kind == MediaKind::Video => {
                let shared = &self.shared;
                let board = publication.board.get_or_insert_with(|| {
                    let layers = rids.iter().map(|r| (r.clone(), shared.next_track())).collect();
                    Arc::new(LayerBoard::new(shared.next_track(), VideoCodec::of(&codec.mime_type), layers))
                });
                let Some(index) = board.index_of_rid(rid) else {
                    warn!(publication = %publication.id, rid = ?rid, "a layer the offer did not declare (RIDs changed?); ignored");
                    return;
                };
                let Some(key) = board.layers.get(index).map(|l| l.track) else { return };
                p.layer_receivers.insert(ssrc, key);
                if publication.flowing.iter().any(|(_, t)| *t == key) {
                    // The layer came back on another SSRC: keyframe requests go there now.
                    if let Some(t) = self.published.get_mut(&key) {
                        t.publisher = Some((id, receiver, ssrc));
                    }
                    return;
                }
                layer = Some((board.clone(), index));
                key
            }
            // One track (a RID on an m-line that declared no simulcast is taken as the track).
            _ => {
                if publication.flowing.iter().any(|(k, _)| *k == kind) {
                    return;
                }
                let key = self.shared.next_track();
                p.receivers.insert(init.track_id, key);
                key
            }
        };
        let first = !publication.flowing.iter().any(|(k, _)| *k == kind);
        publication.flowing.push((kind, key));
        let rid = layer.as_ref().and_then(|(b, i)| b.layers.get(*i)).map(|l| l.rid.clone());
        info!(publication = %publication.id, kind = kind.as_str(), codec = %codec.mime_type, ssrc, rid = ?rid, worker = self.index, "publisher track flowing");
        let mut t = published(kind, codec.clone(), interval);
        t.publisher = Some((id, receiver, ssrc));
        t.meter = layer.as_ref().map(|(board, index)| LayerMeter { board: board.clone(), index: *index, bytes: 0, frames: 0, last: Some(now) });
        if let Some(state) = layer.as_ref().and_then(|(board, _)| self.boards.get_mut(&board.id)) {
            let (now_on, still): (Vec<_>, Vec<_>) = std::mem::take(&mut state.waiting).into_iter().partition(|(k, _)| *k == key);
            state.waiting = still;
            t.taps.extend(now_on.into_iter().map(|(_, tap)| tap));
            update_consumers(&t);
        }
        self.published.insert(key, t);
        let publication = publication.id.clone();
        if first {
            self.shared.track_flowing(&publication, kind, key, codec, layer.as_ref().map(|(b, _)| b.clone()));
        }
        if let Some((board, index)) = layer {
            // Its first keyframe shows its size (which ranks it) and gives subscribers a start.
            self.keyframe(key, self.index, now);
            if first {
                let all = (1u32 << board.layers.len()) - 1;
                let state = BoardState {
                    board: board.clone(),
                    ranking: Vec::new(),
                    asked: all,
                    told: None,
                    publication: publication.clone(),
                    peer: Some(id),
                    taps: Vec::new(),
                    tap_count: None,
                    sizes: vec![None; board.layers.len()],
                    waiting: Vec::new(),
                };
                self.boards.insert(board.id, state);
                self.timers.push(Reverse((now + LAYER_TICK, Timer::Layers(board.id))));
            }
            if board.set_live_mask(board.live_mask() | 1 << index) {
                self.layers_changed(board.id, now);
            }
        }
        self.check_ready(id, &publication);
    }

    /// Measures a layered video's layers (bitrate, whether each still flows) and tells
    /// every worker when which layers flow, or their order, changed.
    fn measure_layers(&mut self, board_id: u64, now: Instant) {
        let Some(state) = self.boards.get(&board_id) else { return };
        let board = state.board.clone();
        let mut live = 0u32;
        for (i, layer) in board.layers.iter().enumerate() {
            let Some(m) = self.published.get_mut(&layer.track).and_then(|t| t.meter.as_mut()) else { continue };
            let tick_ms = (LAYER_TICK.as_millis() as u64).max(1);
            // A layer that sent nothing (paused by its publisher) keeps its last figures,
            // so the layers' order does not change while it rests.
            if m.bytes > 0 {
                // Averaged over about two seconds: one tick holds a few frames only, and
                // their sizes vary (a keyframe, an encoder making up for it after).
                let bps = u32::try_from(m.bytes.saturating_mul(8).saturating_mul(1000) / tick_ms).unwrap_or(u32::MAX);
                let before = board.bitrate(i);
                board.set_bitrate(i, if before == 0 { bps } else { u32::try_from((u64::from(before) * 3 + u64::from(bps)) / 4).unwrap_or(u32::MAX) });
                board.set_framerate(i, u32::try_from(u64::from(m.frames) * 1000 / tick_ms).unwrap_or(u32::MAX));
            }
            (m.bytes, m.frames) = (0, 0);
            if m.last.is_some_and(|last| now.saturating_duration_since(last) < LAYER_TIMEOUT) {
                live |= 1 << i;
            }
        }
        let ranking = board.ranked_all();
        let mut changed = board.set_live_mask(live);
        // What the publisher should send: a layer nobody takes costs it upload for nothing.
        // A tap on the whole video (a recording, the mixer) may want any layer; a tap on one
        // layer (a relay to another node, while that node needs it) reads that layer.
        // (A tap waiting for a layer that has not flowed yet reads it as soon as it does.)
        // A waiting tap whose exporter went away (its receiver dropped) waits for nothing.
        if let Some(s) = self.boards.get_mut(&board_id) {
            s.waiting.retain(|(_, t)| !t.tx.is_closed());
        }
        let waiting: Vec<TrackId> =
            self.boards.get(&board_id).map(|s| s.waiting.iter().filter(|(_, t)| !t.idle).map(|(k, _)| *k).collect()).unwrap_or_default();
        let reads = |track: TrackId| self.published.get(&track).is_some_and(|t| t.consumer_count() > 0) || waiting.contains(&track);
        let tapped = self.boards.get(&board_id).is_some_and(|s| !s.taps.is_empty());
        let wanted = board.wanted(tapped, |i| board.layers.get(i).is_some_and(|l| reads(l.track)));
        let mut tell = None;
        let mut tell_producer = None;
        let sizes: Vec<Option<(u16, u16)>> = (0..board.layers.len()).map(|i| board.size(i)).collect();
        let mut resized = None;
        if let Some(state) = self.boards.get_mut(&board_id) {
            if state.sizes != sizes {
                state.sizes = sizes;
                resized = state.peer.map(|peer| (peer, state.publication.clone()));
                // Choices by size (a resolution, a mixer's region) may pick another layer now.
                changed = true;
            }
            if state.ranking != ranking {
                changed |= !state.ranking.is_empty();
                state.ranking = ranking;
            }
            // Asked once the stream is announced (before, the room would not know it), and
            // again while a layer asked for does not flow (the message may have been lost).
            let ready = state
                .peer
                .and_then(|peer| self.peers.get(&peer))
                .is_some_and(|p| p.publications.iter().any(|s| s.id == state.publication && s.ready));
            let unanswered = wanted & !live != 0 && state.told.is_some_and(|t| now.saturating_duration_since(t) >= RETELL);
            if ready && (state.asked != wanted || unanswered) {
                state.asked = wanted;
                state.told = Some(now);
                let rids = board.layers.iter().enumerate().filter(|(i, _)| wanted & 1 << i != 0).map(|(_, l)| l.rid.clone()).collect();
                tell = state.peer.map(|peer| (peer, state.publication.clone(), rids));
            }
            // A relayed video's producer (the relay, which repeats it to the origin) hears
            // of each layer whose need changed.
            if state.peer.is_none() && state.asked != wanted {
                tell_producer = Some(state.asked ^ wanted);
                state.asked = wanted;
            }
        }
        for (i, layer) in board.layers.iter().enumerate().filter(|(i, _)| tell_producer.is_some_and(|bits| bits & 1 << i != 0)) {
            if let Some(on_need) = self.published.get(&layer.track).and_then(|t| t.on_need.as_ref()) {
                on_need(tessera_core::media::Need::Layer(wanted & 1 << i != 0));
            }
        }
        if let Some((peer, publication, rids)) = tell
            && let Some(p) = self.peers.get(&peer)
        {
            debug!(publication = %publication, layers = ?rids, "simulcast layers asked of the publisher");
            self.shared.emit(AgentEvent::StreamUpdated {
                room: p.room.as_str().into(),
                stream: publication.as_str().into(),
                update: StreamUpdate::ActiveLayers(rids),
            });
        }
        // A layer's size became known or changed (an encoder scaling down for CPU or
        // bandwidth): the stream's description says so, at most once a tick (a stream not
        // announced yet will carry it when it is).
        if let Some((peer, publication)) = resized
            && let Some(p) = self.peers.get(&peer)
            && p.publications.iter().any(|s| s.id == publication && s.ready)
            && let Some((_, info)) = self.stream_info(peer, &publication)
        {
            let (room, stream) = (p.room.as_str().into(), publication.as_str().into());
            self.shared.emit(AgentEvent::StreamUpdated { room, stream, update: StreamUpdate::Tracks(info.tracks) });
        }
        if changed {
            debug!(board = board_id, live = format!("{live:#b}"), "simulcast layers changed");
            self.layers_changed(board_id, now);
        }
        self.timers.push(Reverse((now + LAYER_TICK, Timer::Layers(board_id))));
    }

    /// Every worker's subscribers of a layered video choose their layer again (and its
    /// taps, which are on this worker).
    fn layers_changed(&mut self, board: u64, now: Instant) {
        self.shared.broadcast(self.index, |_| Cmd::LayersChanged { board });
        self.reselect_board(board, now);
        self.retarget_layer_taps(board, now);
    }

    /// Every leg on this worker for which `pred` holds: (peer, leg).
    fn legs_where(&self, pred: impl Fn(&Leg) -> bool) -> Vec<(u32, u32)> {
        self.peers.iter().flat_map(|(&peer, p)| p.legs.iter().filter(|(_, l)| pred(l)).map(move |(&leg, _)| (peer, leg))).collect()
    }

    /// This worker's legs reading a layered video choose their layer again.
    fn reselect_board(&mut self, board: u64, now: Instant) {
        for (peer, leg) in self.legs_where(|l| l.sel.as_ref().is_some_and(|s| s.board.id == board)) {
            self.reselect(peer, leg, now);
        }
    }

    /// A subscription's video takes another layer.
    fn select_layer(&mut self, transport: &str, session: &str, layer: LayerChoice, now: Instant) {
        let Some(&id) = self.by_transport.get(transport) else { return };
        let Some(p) = self.peers.get_mut(&id) else { return };
        // A subscription still waiting for its offer starts on the new choice.
        for t in p.pending.iter_mut().filter(|s| s.spec.at.session == *session).flat_map(|s| s.spec.tracks.iter_mut()) {
            if t.kind == MediaKind::Video {
                t.layer = layer.clone();
            }
        }
        let mut legs = Vec::new();
        for (&leg, l) in p.legs.iter_mut().filter(|(_, l)| l.session == session) {
            if let Some(sel) = &mut l.sel {
                sel.set_choice(layer.clone());
                legs.push(leg);
            }
        }
        if !legs.is_empty() && layer == LayerChoice::Auto {
            p.estimate.enable();
        }
        for leg in legs {
            self.reselect(id, leg, now);
        }
    }

    /// Points a layered leg at the layer its choice gives now: it moves there at that
    /// layer's next keyframe (asked for at once), reading both until then.
    fn reselect(&mut self, peer: u32, leg: u32, now: Instant) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        // On `auto`, what reaches the client is shared by the connection's auto legs.
        let auto_legs = p.legs.values().filter(|l| l.on_auto()).count().max(1) as u64;
        let mut estimate = p.estimate.read(now);
        let probes = p.estimate.clone();
        estimate.delivered /= auto_legs;
        if estimate.capacity != crate::bwe::UNBOUNDED {
            estimate.capacity /= auto_legs;
        }
        let Some(l) = p.legs.get_mut(&leg) else { return };
        let (owner, source) = (l.owner, l.source);
        // A paused leg reads nothing; it chooses again when it resumes.
        let Some(sel) = l.sel.as_mut().filter(|s| !s.paused) else { return };
        if sel.held(source) {
            return;
        }
        let chosen = match &sel.choice {
            LayerChoice::Auto => {
                trace!(peer, leg, estimate = ?estimate, "auto layer reading");
                if sel.target.is_some() {
                    sel.auto.switching(now);
                }
                let heading = sel.board.index_of(sel.target.unwrap_or(source));
                let next = sel.auto.next(&sel.board, heading, estimate, now);
                // A move down lets the link's queue drain: no probe trains into it (the
                // next Adapt tick would stop them only up to 250 ms later).
                if sel.auto.settling(now) {
                    probes.set_probing(false);
                }
                next
            }
            other => sel.board.choose(other),
        };
        let Some(want) = chosen.and_then(|i| sel.board.layers.get(i)).map(|l| l.track) else { return };
        let Aim::Changed { dropped } = sel.aim(want, source, now) else { return };
        debug!(peer, leg, estimate = ?estimate, layer = ?chosen, "simulcast layer chosen");
        if let Some(t) = dropped {
            self.detach(t, owner, peer, leg);
        }
        if want != source {
            self.attach(want, owner, peer, leg);
            self.keyframe(want, owner, now);
        }
    }

    /// Announces a publication whose media (and data channel) all flow, once.
    fn check_ready(&mut self, id: u32, publication: &str) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        let Some(s) = p.publications.iter_mut().find(|s| s.id == publication) else { return };
        let media = s.announced.iter().all(|a| s.flowing.iter().any(|(k, _)| *k == a.kind));
        if !media || (s.data && !s.data_open) || s.ready {
            return;
        }
        s.ready = true;
        let (room, transport) = (p.room.clone(), p.transport.clone());
        if let Some((_, info)) = self.stream_info(id, publication) {
            self.shared.publication_ready(&room, &transport, info);
        }
    }

    /// The stream description of a ready publication.
    fn stream_info(&self, id: u32, publication: &str) -> Option<(String, StreamInfo)> {
        let p = self.peers.get(&id)?;
        let s = p.publications.iter().find(|s| s.id == publication)?;
        let mut tracks = Vec::new();
        for a in &s.announced {
            let Some((_, key)) = s.flowing.iter().find(|(k, _)| *k == a.kind) else { continue };
            let Some(t) = self.published.get(key) else { continue };
            let info = TrackInfo {
                kind: a.kind,
                source: a.source.clone(),
                mid: Some(a.mid.clone()),
                format: crate::codec::codec_format(&t.codec),
                parameters: None,
                status: if t.active { TrackStatus::Active } else { TrackStatus::Inactive },
                rid: None,
            };
            match s.board.as_ref().filter(|_| a.kind == MediaKind::Video) {
                // One track per declared layer, with its picture size once seen.
                Some(board) => tracks.extend(board.layers.iter().enumerate().map(|(i, l)| TrackInfo {
                    rid: Some(l.rid.clone()),
                    // As measured so far (a layer that has not shown a keyframe has no size yet).
                    parameters: board.size(i).map(|(w, h)| VideoParameters {
                        resolution: Resolution { width: u32::from(w), height: u32::from(h) },
                        framerate: board.framerate(i),
                        bitrate: Some(board.bitrate(i) / 1000).filter(|b| *b > 0),
                        key_frame_interval: 0,
                    }),
                    ..info.clone()
                })),
                None => tracks.push(info),
            }
        }
        let info = StreamInfo {
            id: s.id.as_str().into(),
            // The room controller fills in what it owns: views and the publisher's attributes.
            kind: StreamKind::Forward(ForwardInfo {
                owner: p.participant.as_str().into(),
                in_views: Vec::new(),
                attributes: serde_json::Value::Null,
            }),
            tracks,
            data: s.data,
        };
        Some((s.id.clone(), info))
    }

    fn end_session(&mut self, transport: &str, session: &str) {
        let Some(&id) = self.by_transport.get(transport) else { return };
        let mut unpublish = Vec::new();
        let mut detach = Vec::new();
        let Some(p) = self.peers.get_mut(&id) else { return };
        p.pending.retain(|s| s.spec.at.session != *session);
        if let Some(pos) = p.publications.iter().position(|s| s.id == session) {
            let s = p.publications.remove(pos);
            unpublish.extend(s.flowing.iter().map(|(_, k)| *k));
            p.receivers.retain(|_, k| !unpublish.contains(k));
            p.layer_receivers.retain(|_, k| !unpublish.contains(k));
        }
        if p.subscriptions.remove(session) {
            let legs: Vec<u32> = p.legs.iter().filter(|(_, l)| l.session == session).map(|(k, _)| *k).collect();
            for leg in legs {
                // The m-line stays until the client renegotiates it away; it just gets no media.
                if let Some(l) = p.legs.remove(&leg) {
                    detach.extend(l.tracks().map(|t| (t, l.owner, leg)));
                }
            }
            p.unannounced.retain(|s| s != session);
            p.data_wanted.retain(|(s, _, _)| s != session);
        }
        let mut data_detach = Vec::new();
        p.data_legs.retain(|(s, stream, owner, channel)| {
            let ends = s == session;
            if ends {
                data_detach.push((stream.clone(), *owner, *channel));
            }
            !ends
        });
        p.data_sources.retain(|_, publication| publication != session);
        p.mark_dirty(&mut self.dirty);
        for (stream, owner, channel) in data_detach {
            self.remove_data_sink(&stream, owner, id, channel);
        }
        for track in unpublish {
            self.unpublish(track);
        }
        for (track, owner, leg) in detach {
            self.detach(track, owner, id, leg);
        }
    }

    fn remove_data_sink(&mut self, stream: &str, owner: usize, peer: u32, channel: usize) {
        if let Some(sinks) = self.data_sinks.get_mut(stream) {
            sinks.retain(|s| *s != (peer, channel));
            if sinks.is_empty() {
                self.data_sinks.remove(stream);
                if owner != self.index {
                    self.shared.send_to(owner, Cmd::DataSubscriber { publication: stream.to_string(), worker: self.index, add: false });
                }
            }
        }
    }

    /// A published track ends: its subscribers here stop getting packets; the workers
    /// relaying it and the taps are let go.
    fn unpublish(&mut self, track: TrackId) {
        // Dropping the track closes its taps; other workers' legs simply stop getting
        // packets until their sessions end.
        let Some(t) = self.published.remove(&track) else { return };
        if let Some(c) = &t.consumers {
            c.store(0, Ordering::Relaxed);
        }
        // The last layer of a layered video: nobody measures it any more.
        if let Some(m) = &t.meter
            && !m.board.layers.iter().any(|l| self.published.contains_key(&l.track))
        {
            self.boards.remove(&m.board.id);
        }
    }

    fn switch(&mut self, transport: &str, session: &str, switch: TrackSwitch, now: Instant) {
        let Some(&id) = self.by_transport.get(transport) else { return };
        let Some(p) = self.peers.get_mut(&id) else { return };
        let mut keyframes = Vec::new();
        let publication: Option<Vec<TrackId>> =
            p.publications.iter().find(|s| s.id == session).map(|s| s.flowing.iter().filter(|(k, _)| switch.covers(*k)).map(|(_, t)| *t).collect());
        match publication {
            Some(tracks) => {
                for key in tracks {
                    let Some(t) = self.published.get_mut(&key) else { continue };
                    let was = std::mem::replace(&mut t.active, switch.active);
                    if switch.active && !was {
                        // Subscribers continue their sequence numbers across the pause.
                        for &(peer, leg) in &t.subscribers {
                            if let Some(l) = self.peers.get_mut(&peer).and_then(|p| p.legs.get_mut(&leg)) {
                                l.rewriter.resync();
                            }
                        }
                        for &w in &t.workers {
                            self.shared.send_to(w, Cmd::Resync { track: key });
                        }
                        keyframes.push((key, self.index));
                    }
                }
            }
            None => {
                // A paused layered leg lets go of its layers, so that the publisher may
                // stop sending what nobody watches; it takes them again on resume.
                let (mut detached, mut resumed) = (Vec::new(), Vec::new());
                for (&leg, l) in p.legs.iter_mut().filter(|(_, l)| l.session == session && switch.covers(l.kind)) {
                    let was = std::mem::replace(&mut l.active, switch.active);
                    if was == switch.active {
                        continue;
                    }
                    if let Some(sel) = &mut l.sel {
                        sel.set_paused(!switch.active);
                        if switch.active {
                            resumed.push((l.owner, leg));
                        } else {
                            detached.extend(std::iter::once(l.source).chain(sel.target.take()).map(|t| (t, l.owner, leg)));
                        }
                    }
                    if switch.active {
                        l.rewriter.resync();
                        if l.sel.is_none() {
                            keyframes.push((l.source, l.owner));
                        }
                    }
                }
                for (track, owner, leg) in detached {
                    self.detach(track, owner, id, leg);
                }
                for (owner, leg) in resumed {
                    // The layer its choice gives now (sizes and flowing layers may have
                    // changed), chosen before it reads anything: it starts at that
                    // layer's keyframe, with no detour through the one it paused on.
                    self.reselect(id, leg, now);
                    let Some(l) = self.peers.get_mut(&id).and_then(|p| p.legs.get_mut(&leg)) else { continue };
                    let Some(sel) = &mut l.sel else { continue };
                    match sel.target.take() {
                        // Attached, and its keyframe asked for, by `reselect`; another
                        // layer has its own timestamp base.
                        Some(t) => {
                            l.source = t;
                            l.rewriter.switch_source();
                        }
                        None => {
                            let source = l.source;
                            self.attach(source, owner, id, leg);
                            keyframes.push((source, owner));
                        }
                    }
                }
            }
        }
        for (track, owner) in keyframes {
            self.keyframe(track, owner, now);
        }
    }

    /// Closes a connection and forgets everything on it; the control plane reports it.
    fn close_peer(&mut self, id: u32, reason: &str) {
        let Some(mut p) = self.peers.remove(&id) else { return };
        if p.connected {
            self.out.traffic.connected = self.out.traffic.connected.saturating_sub(1);
        }
        let _ = p.pc.close();
        while let Some(out) = p.pc.poll_write() {
            self.out.send(out);
        }
        for a in &p.tcp_addrs {
            self.out.tcp.close(*a);
        }
        self.by_transport.remove(&p.transport);
        self.by_ufrag.remove(&p.ufrag);
        for a in &p.addrs {
            if self.by_addr.get(a) == Some(&id) {
                self.by_addr.remove(a);
            }
        }
        for s in &p.publications {
            for (_, key) in &s.flowing {
                self.unpublish(*key);
            }
        }
        for (leg_id, l) in &p.legs {
            for track in l.tracks() {
                self.detach(track, l.owner, id, *leg_id);
            }
        }
        for (_, stream, owner, channel) in &p.data_legs {
            self.remove_data_sink(stream, *owner, id, *channel);
        }
        info!(transport = %p.transport, reason, worker = self.index, "transport closed");
        self.shared.transport_closed(&p.transport, reason);
    }
}

impl Peer {
    /// Queues this connection for the next flush (once).
    fn mark_dirty(&mut self, dirty: &mut Vec<u32>) {
        if !self.dirty {
            self.dirty = true;
            dirty.push(self.id);
        }
    }
}

/// Datagrams queued for the socket before the oldest are dropped (a burst to hundreds of
/// subscribers can outrun the kernel buffer; a stalled socket must not grow memory
/// without bound).
const MAX_QUEUED: usize = 16_384;
/// ... and at most this many bytes of buffers (sealing buffers are all of one size, so a
/// queue of small packets would otherwise hold more than their length says).
const MAX_QUEUED_BYTES: usize = 16 << 20;
/// Capacity of a buffer the worker seals a forwarded packet in: any packet a publisher's
/// datagram carried ([`udp::MAX_DATAGRAM`]) with the longest SRTP tag.
const SEALED_BUFFER: usize = udp::MAX_DATAGRAM + crate::srtp_out::MAX_TAG;
/// Spare sealing buffers a worker keeps (four full batches; a burst beyond allocates).
const MAX_SPARE: usize = 4 * udp::BATCH;

/// Writes a packet of `track` to each subscriber leg (rewritten for its connection). A
/// layered leg takes it only from its current layer once that gave it a keyframe, and
/// moves to the layer it awaits at that layer's keyframe; what that leaves to do goes to `notes`.
#[allow(clippy::too_many_arguments)]
fn deliver(
    peers: &mut HashMap<u32, Box<Peer>>,
    dirty: &mut Vec<u32>,
    out: &mut Outlet,
    legs: &[(u32, u32)],
    track: TrackId,
    packet: &rtp::Packet,
    now: Instant,
    notes: &mut Vec<LegNote>,
) {
    // Looked at once per packet, and only for layered legs.
    let mut keyframe: Option<bool> = None;
    for &(peer, leg) in legs {
        let Some(p) = peers.get_mut(&peer) else { continue };
        let Some(l) = p.legs.get_mut(&leg) else { continue };
        // Before its connection is up nothing can be sent (and a layered leg must not
        // count a keyframe as given).
        if !l.active || !p.connected {
            continue;
        }
        if let Some(sel) = &mut l.sel {
            match gate(sel, &mut l.source, &mut l.rewriter, track, packet, now, &mut keyframe) {
                Gate::Skip => continue,
                Gate::Ask => {
                    notes.push(LegNote::Keyframe { track, owner: l.owner });
                    continue;
                }
                Gate::Switched(from) => notes.push(LegNote::Switched { peer, leg, from, owner: l.owner }),
                Gate::Send => {}
            }
        }
        let mut copy = packet.clone();
        l.rewriter.rewrite(&mut copy, now);
        if let Some(Selection { vp8: Some(v), .. }) = &mut l.sel {
            v.munge(&mut copy);
        }
        // A leg whose sender is gone sends nothing, on either path.
        let live = p.pc.rtp_sender(l.sender).is_some();
        let mut copy = Some(copy);
        // A connection whose packet went past rtc with nothing left behind for it, and no
        // timer earlier than the one it has, is not flushed this round: walking rtc's
        // whole (empty) send pipeline for each subscriber on every round was a tenth of a
        // worker's time.
        let mut flush = true;
        if live
            && let (Some((srtp, _)), Some(remote)) = (&mut p.srtp, p.remote)
            && let Ok(mut stack) = p.stack.0.lock()
            && let Some(mut packet) = copy.take_if(|c| !stack.resends_in_place(c.header.ssrc))
        {
            // Stripped before the fan-out (here too for a relayed packet from another node:
            // what is lent must replace an empty list).
            strip_extensions(&mut packet);
            packet.header.extensions = std::mem::take(&mut p.spare_extensions);
            // Encrypted here, past rtc's pipeline (`crate::srtp_out`), after meeting the
            // interceptors it would have met there.
            let tagged = TaggedPacket { now, transport: remote, message: AttributedPacket::new(InterceptorPacket::Rtp(packet)) };
            let sent = stack.send_rtp(tagged);
            // The walk may leave output for rtc (a probe train) or arm a timer (the first
            // packet arms the sender reports'): the flush collects both.
            flush = stack.holds_output() || stack.poll_timeout().is_some_and(|t| p.scheduled.is_none_or(|s| t < s));
            drop(stack);
            if let Some(InterceptorPacket::Rtp(mut packet)) = sent.map(|t| t.message.packet) {
                // Marshalled and sealed in the buffer it leaves in.
                let mut buf = out.buffer();
                let sealed = srtp.seal(&packet, &mut buf);
                let mut spare = std::mem::take(&mut packet.header.extensions);
                spare.clear();
                p.spare_extensions = spare;
                if sealed {
                    out.send(TaggedBytesMut { now, transport: remote, message: buf });
                } else {
                    out.recycle(buf);
                }
            }
        }
        // Otherwise straight into the connection, not through `RTCRtpSender::write_rtp`:
        // that checks what the rewriter made sure of (the leg's SSRC and payload type, no
        // extensions) and allocates the track id `String` per packet, which rtc then
        // ignores. A refused packet is dropped for this leg only.
        if live && let Some(copy) = copy {
            let _ = p.pc.handle_write(TaggedRTCMessage { now, message: RTCMessage::RtpPacket(String::new(), copy) });
            p.unsent += 1;
            // rtc's handler queues grow to the most a connection was handed between two
            // drains, and keep that size: a burst (a keyframe, a full receive batch) is
            // sent on every few packets, not left to pile up until the round's flush.
            if p.unsent >= DRAIN_EVERY {
                p.unsent = 0;
                while let Some(datagram) = p.pc.poll_write() {
                    out.send(datagram);
                }
            }
        }
        if flush && !p.dirty {
            p.dirty = true;
            dirty.push(peer);
        }
    }
}

fn published(kind: MediaKind, codec: RTCRtpCodec, keyframe_interval: Duration) -> Published {
    // Keyframes are seen (and a sent PLI covers requests until its keyframe) where the
    // codec's keyframes can be found in its packets.
    let video = if kind == MediaKind::Video { VideoCodec::of(&codec.mime_type) } else { VideoCodec::Other };
    let detects = video != VideoCodec::Other;
    Published {
        video,
        kind,
        codec,
        publisher: None,
        on_keyframe: None,
        subscribers: Vec::new(),
        workers: Vec::new(),
        taps: Vec::new(),
        throttle: KeyframeThrottle::new(keyframe_interval, detects),
        pli_due: None,
        seen: SeenWindow::default(),
        active: true,
        consumers: None,
        meter: None,
        on_need: None,
    }
}

fn update_consumers(t: &Published) {
    if let Some(c) = &t.consumers {
        c.store(t.consumer_count(), Ordering::Relaxed);
    }
}
