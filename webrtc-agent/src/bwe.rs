//! A subscriber connection's bandwidth, as the SFU's simulcast choice reads it: GCC's
//! target (webrtc-rs's port, driven by the client's transport-wide congestion control
//! feedback), and over the last second of that feedback, what reached the client and what
//! was lost, and the path's capacity as the media's own packet trains show it. The
//! estimator runs inside the connection's interceptor chain ([`SendSide`], part of
//! [`crate::wire::Wire`]; without a pacer: forwarded media leaves as it comes) and writes
//! what it finds where the worker reads it when it chooses layers.
//!
//! **Capacity from packet trains.** A video frame's packets leave the SFU back to back;
//! a bottleneck on the way spreads them out at its own rate, and the client's feedback
//! says when each arrived. So each train (three packets or more, all arrived, sent
//! within [`TRAIN_GAP`] of each other) whose arrivals spread more than their departures
//! gives a sample of the bottleneck's rate: the bytes after the packet that ends the
//! train's first spread gap, over the arrival time they span (packets a shaper's token
//! bucket let through together at the head show nothing, and the gap after them only
//! what the bucket lacked). One that arrived as it left says the path is not narrower than that
//! (unbounded at this resolution). The median of the last [`CAPACITY_SAMPLES`] samples
//! of the last [`CAPACITY_SPAN`] is the capacity (a low layer makes few trains): the layer choice tries a higher layer only when it fits
//! ([`crate::simulcast::AutoState`]), so a subscriber on a narrow link is not pushed
//! into loss by trials that cannot succeed, while one whose link was freed sees it at once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rtc::interceptor::{BandwidthEstimator, EstimatorStats, Gcc, PacketReport, StreamInfo};

use crate::probe::Prober;

/// How much feedback the delivered rate and the loss are measured over.
const WINDOW: Duration = Duration::from_secs(1);
/// Packets that leave within this of the one before belong to one train.
const TRAIN_GAP: Duration = Duration::from_millis(1);
/// Two packets of a train whose arrivals are no further apart than their departures and
/// this met no bottleneck between them (TWCC reports arrivals in 250 µs steps).
const PAIR_SPREAD_MIN: Duration = Duration::from_micros(500);
/// Capacity samples are kept this long...
const CAPACITY_SPAN: Duration = Duration::from_secs(10);
/// ...and only so many of the latest.
const CAPACITY_SAMPLES: usize = 5;
/// Fewer samples than this say nothing.
const CAPACITY_MIN_SAMPLES: usize = 3;
/// A capacity sample of a train that met no bottleneck.
pub const UNBOUNDED: u64 = u64::MAX;

/// What a connection's estimator last found.
#[derive(Debug)]
pub struct Estimate {
    target: AtomicU64,
    delivered: AtomicU64,
    loss_permille: AtomicU32,
    packets: AtomicU32,
    capacity: AtomicU64,
    /// When it was last written, in µs after `base`.
    updated_us: AtomicU64,
    base: Instant,
    /// Whether the connection estimates at all (see [`SendSide`]).
    enabled: AtomicBool,
    /// Whether the worker asks for probe trains (see [`crate::probe`]).
    probing: AtomicBool,
}

impl Default for Estimate {
    fn default() -> Self {
        Estimate {
            target: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            loss_permille: AtomicU32::new(0),
            packets: AtomicU32::new(0),
            capacity: AtomicU64::new(0),
            updated_us: AtomicU64::new(0),
            base: Instant::now(),
            enabled: AtomicBool::new(false),
            probing: AtomicBool::new(false),
        }
    }
}

/// A reading of an [`Estimate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reading {
    /// GCC's target, bits per second; 0 until the client's first feedback.
    pub target: u64,
    /// Bits per second the client reported receiving, over the last second.
    pub delivered: u64,
    /// Of the packets reported over the last second, the share lost, per mille.
    pub loss_permille: u32,
    /// How many packets that second of feedback covers.
    pub packets: u32,
    /// The path's capacity in bits per second as packet trains show it: 0 while unknown,
    /// [`UNBOUNDED`] when trains met no bottleneck.
    pub capacity: u64,
    /// How long ago the client's last feedback came (a client that stopped sending it
    /// leaves the values as they were).
    pub age: Duration,
}

impl Estimate {
    /// Starts estimating (the connection takes a simulcast video on `auto`).
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    /// Whether it estimates (a simulcast video on `auto` was taken).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Asks for probe trains, or stops them (a subscriber below its video's top layer
    /// wants to know whether the next one fits).
    pub fn set_probing(&self, on: bool) {
        self.probing.store(on, Ordering::Relaxed);
    }

    /// The latest values, as of `now`.
    pub fn read(&self, now: Instant) -> Reading {
        let updated = self.base + Duration::from_micros(self.updated_us.load(Ordering::Relaxed));
        Reading {
            target: self.target.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            loss_permille: self.loss_permille.load(Ordering::Relaxed),
            packets: self.packets.load(Ordering::Relaxed),
            capacity: self.capacity.load(Ordering::Relaxed),
            age: now.saturating_duration_since(updated),
        }
    }
}

/// GCC, and a second of feedback kept to measure delivery and loss.
pub struct SubscriberEstimator {
    gcc: Gcc,
    /// (when reported, bytes, arrived) per packet, oldest first.
    window: VecDeque<(Instant, usize, bool)>,
    /// Scratch for the reports that carry a transport-wide number.
    twcc: Vec<PacketReport>,
    /// (when, bits per second or [`UNBOUNDED`]) per train, oldest first.
    trains: VecDeque<(Instant, u64)>,
    out: Arc<Estimate>,
}

impl SubscriberEstimator {
    /// An estimator starting GCC at `start` bits per second (within `min..=max`), writing into `out`.
    pub fn new(start: f64, min: f64, max: f64, out: Arc<Estimate>) -> Self {
        SubscriberEstimator { gcc: Gcc::new(start, min, max), window: VecDeque::new(), twcc: Vec::new(), trains: VecDeque::new(), out }
    }
}

impl BandwidthEstimator for SubscriberEstimator {
    fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        // A stream the client does not number (TWCC on video but not on audio, say) is
        // reported as never arriving: it says nothing about the path.
        self.twcc.clear();
        self.twcc.extend(reports.iter().filter(|r| r.is_twcc).cloned());
        self.gcc.on_reports(now, &self.twcc);
        if self.twcc.is_empty() {
            return;
        }
        self.window.extend(self.twcc.iter().map(|r| (now, r.size, r.arrived)));
        while self.window.front().is_some_and(|(at, _, _)| now.saturating_duration_since(*at) >= WINDOW) {
            self.window.pop_front();
        }
        // Over the time the window's own feedback spans (shorter at first, or after a gap).
        let oldest = self.window.front().map_or(now, |(at, _, _)| *at);
        let span = now.saturating_duration_since(oldest).clamp(Duration::from_millis(100), WINDOW);
        let bytes: usize = self.window.iter().filter(|(_, _, arrived)| *arrived).map(|(_, size, _)| size).sum();
        let lost = self.window.iter().filter(|(_, _, arrived)| !arrived).count();
        let total = self.window.len().max(1);
        self.out.target.store(self.gcc.target_bitrate().max(0.0) as u64, Ordering::Relaxed);
        self.out.delivered.store((bytes as u64 * 8 * 1000) / span.as_millis().max(1) as u64, Ordering::Relaxed);
        self.out.loss_permille.store((lost * 1000 / total) as u32, Ordering::Relaxed);
        self.out.packets.store(u32::try_from(self.window.len()).unwrap_or(u32::MAX), Ordering::Relaxed);
        self.trains.extend(train_rates(&self.twcc).map(|rate| (now, rate)));
        while self.trains.len() > CAPACITY_SAMPLES || self.trains.front().is_some_and(|(at, _)| now.saturating_duration_since(*at) >= CAPACITY_SPAN) {
            self.trains.pop_front();
        }
        self.out.capacity.store(median(self.trains.iter().map(|(_, r)| *r)), Ordering::Relaxed);
        let since = now.saturating_duration_since(self.out.base);
        self.out.updated_us.store(u64::try_from(since.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn target_bitrate(&self) -> f64 {
        self.gcc.target_bitrate()
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.gcc.handle_timeout(now);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.gcc.poll_timeout()
    }

    fn stats(&self) -> EstimatorStats {
        self.gcc.stats()
    }
}

/// The rate each packet train in `reports` (in send order) shows: bits per second, or
/// [`UNBOUNDED`] when its arrivals spread no more than its departures (see the module
/// docs). Trains with a lost packet or fewer than three packets show nothing.
fn train_rates(reports: &[PacketReport]) -> impl Iterator<Item = u64> + '_ {
    let mut start = 0;
    std::iter::from_fn(move || {
        while start < reports.len() {
            let from = start;
            let mut end = from + 1;
            while let (Some(a), Some(b)) = (reports.get(end - 1), reports.get(end)) {
                if b.departure.saturating_duration_since(a.departure) > TRAIN_GAP {
                    break;
                }
                end += 1;
            }
            start = end;
            let train = reports.get(from..end).unwrap_or_default();
            if let Some(rate) = train_rate(train) {
                return Some(rate);
            }
        }
        None
    })
}

fn train_rate(train: &[PacketReport]) -> Option<u64> {
    if train.len() < 3 || train.iter().any(|r| !r.arrived || r.arrival.is_none()) {
        return None;
    }
    // The packets a shaper's token bucket let through together lead the train and show
    // nothing of its rate, and the first gap after them only the bucket's remaining
    // deficit: the rate is read from the packet that ends the first gap on.
    let spread = |pair: &[PacketReport]| match pair {
        [a, b] => {
            let arrival = b.arrival.zip(a.arrival).and_then(|(b, a)| b.checked_sub(a)).unwrap_or_default();
            arrival > b.departure.saturating_duration_since(a.departure) + PAIR_SPREAD_MIN
        }
        _ => false,
    };
    let Some(first) = train.windows(2).position(spread) else { return Some(UNBOUNDED) };
    let (from, last) = (train.get(first + 1)?, train.last()?);
    if first + 2 >= train.len() {
        return None;
    }
    let arrival = last.arrival?.checked_sub(from.arrival?)?;
    let bits: u64 = train.iter().skip(first + 2).map(|r| r.size as u64 * 8).sum();
    Some(bits * 1_000_000 / u64::try_from(arrival.as_micros()).unwrap_or(u64::MAX).max(1))
}

/// The median of `samples` (the upper one of an even count), 0 with too few.
fn median(samples: impl Iterator<Item = u64>) -> u64 {
    let mut v: Vec<u64> = samples.collect();
    if v.len() < CAPACITY_MIN_SAMPLES {
        return 0;
    }
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The transport-cc header extension's URI (draft-holmer-rmcat-transport-wide-cc-extensions-01).
const TRANSPORT_CC_URI: &str = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01";
/// Sent packets remembered for feedback: at the ~250 packets/s of a 2.5 Mbit/s layer
/// four seconds, far longer than feedback takes (every ~100 ms).
const HISTORY: usize = 1024;
/// A packet sent longer ago than this and not reported as arrived is forgotten, not
/// reported lost (as rtc's own send history does).
const FORGET_AFTER: Duration = Duration::from_secs(2);

/// Every transport-wide sequence number as its two big-endian extension bytes, so that
/// numbering a packet needs no allocation for its payload.
// Evaluated at compile time: an index out of range fails the build, not a packet.
#[allow(clippy::indexing_slicing)]
static TWCC_BYTES: [u8; 131_072] = {
    let mut t = [0u8; 131_072];
    let mut i = 0;
    while i < 65_536 {
        t[2 * i] = (i >> 8) as u8;
        t[2 * i + 1] = i as u8;
        i += 1;
    }
    t
};

/// One numbered packet, as its feedback will be matched.
#[derive(Clone, Copy)]
struct Sent {
    /// Transport-wide number, unwrapped (the wire carries its low 16 bits).
    id: u64,
    ssrc: u32,
    rtp_sequence_number: u16,
    size: u32,
    departure: Instant,
    arrived: bool,
    arrival: Option<Duration>,
}

/// The send side of a connection's bandwidth estimate: it numbers each RTP packet that
/// leaves with a transport-wide sequence number, remembers it, and turns the client's
/// TWCC feedback into [`PacketReport`]s for the estimator, once the connection's
/// [`Estimate`] is enabled (before, it does nothing: numbering and history cost CPU on
/// every packet, and only a connection with a simulcast video on `auto` reads the
/// estimate). Replaces rtc's TwccSender and CongestionControl interceptors: their
/// history keeps three hash maps per packet and their numbering allocates per packet,
/// where this is a ring indexed by the number and a static table of extension bytes.
pub struct SendSide {
    estimator: SubscriberEstimator,
    estimate: Arc<Estimate>,
    /// Local streams that negotiated transport-cc: (SSRC, extension id, the media
    /// stream's SSRC: itself, or the one an RTX stream repairs).
    streams: Vec<(u32, u8, u32)>,
    /// Probe trains and the RTX numbering they share with retransmissions.
    prober: Prober,
    /// By `id % HISTORY`; allocated when the estimate is first enabled.
    ring: Vec<Option<Sent>>,
    /// Number of the next packet.
    next: u64,
    /// Highest number reported as arrived so far, and the lowest not yet reported.
    highest_arrived: Option<u64>,
    next_to_report: u64,
    /// Reused for each feedback's reports.
    reports: Vec<PacketReport>,
}

impl SendSide {
    /// Feeds `estimator`, which writes into `estimate`; works once `estimate` is enabled.
    pub fn new(estimator: SubscriberEstimator, estimate: Arc<Estimate>) -> Self {
        SendSide {
            estimator,
            estimate,
            streams: Vec::new(),
            prober: Prober::default(),
            ring: Vec::new(),
            next: 0,
            highest_arrived: None,
            next_to_report: 0,
            reports: Vec::new(),
        }
    }

    fn on(&mut self) -> bool {
        if !self.estimate.enabled.load(Ordering::Relaxed) {
            return false;
        }
        if self.ring.is_empty() {
            self.ring = vec![None; HISTORY];
        }
        true
    }

    /// A local stream was bound: numbered if it negotiated the extension (its RTX
    /// stream too: retransmissions and probes are bytes on the path like the media).
    pub fn bind(&mut self, info: &StreamInfo) {
        self.unbind(info.ssrc);
        self.prober.bind(info);
        let id = info.rtp_header_extensions.iter().find(|e| e.uri == TRANSPORT_CC_URI).and_then(|e| u8::try_from(e.id).ok());
        if let Some(id) = id.filter(|id| *id != 0) {
            self.streams.push((info.ssrc, id, info.ssrc));
            if let Some(rtx) = info.ssrc_rtx {
                self.streams.push((rtx, id, info.ssrc));
            }
        }
    }

    /// A local stream was unbound.
    pub fn unbind(&mut self, ssrc: u32) {
        self.streams.retain(|(_, _, media)| *media != ssrc);
        self.prober.unbind(ssrc);
    }

    /// Numbers and remembers `packet`, leaving now (an RTX packet first takes its RTX
    /// sequence number, see [`crate::probe`]).
    pub fn on_write(&mut self, packet: &mut rtc::rtp::Packet, now: Instant) {
        self.prober.renumber(packet);
        let ssrc = packet.header.ssrc;
        let Some(&(_, ext, _)) = self.streams.iter().find(|(s, _, _)| *s == ssrc) else { return };
        if !self.on() {
            return;
        }
        let id = self.next;
        let wire = usize::from(id as u16) * 2;
        let Some(bytes) = TWCC_BYTES.get(wire..wire + 2) else { return };
        if packet.header.set_extension(ext, bytes::Bytes::from_static(bytes)).is_err() {
            return;
        }
        self.next += 1;
        let size = rtc::shared::marshal::MarshalSize::marshal_size(packet);
        if let Some(slot) = self.ring.get_mut((id % HISTORY as u64) as usize) {
            *slot = Some(Sent {
                id,
                ssrc,
                rtp_sequence_number: packet.header.sequence_number,
                size: u32::try_from(size).unwrap_or(u32::MAX),
                departure: now,
                arrived: false,
                arrival: None,
            });
        }
    }

    /// A media packet that left (after [`Self::on_write`]): when the worker asks for
    /// probes and one is due, the train to send right after it, into `train`.
    pub fn probe_train(&mut self, packet: &rtc::rtp::Packet, now: Instant, train: &mut Vec<rtc::rtp::Packet>) {
        let probing = self.estimate.enabled() && self.estimate.probing.load(Ordering::Relaxed);
        self.prober.after(packet, probing, now, train);
    }

    /// The unwrapped number of a packet the wire names by its low 16 bits, if remembered.
    fn slot(&mut self, wire: u16) -> Option<&mut Sent> {
        let last = self.next.checked_sub(1)?;
        let id = last.checked_sub(u64::from((last as u16).wrapping_sub(wire)))?;
        self.ring.get_mut((id % HISTORY as u64) as usize)?.as_mut().filter(|s| s.id == id)
    }

    /// Takes in the transport-cc feedback among `packets`, received now, and runs the
    /// estimator on what it reports.
    pub fn on_read(&mut self, packets: &[Box<dyn rtc::rtcp::Packet>], now: Instant) {
        use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
        let mut fed = false;
        for p in packets {
            let Some(feedback) = p.as_any().downcast_ref::<TransportLayerCc>() else { continue };
            if !self.on() {
                return;
            }
            fed = true;
            for ack in rtc::interceptor::convert_twcc(feedback) {
                let Some(sent) = self.slot(ack.sequence_number) else { continue };
                sent.arrived = ack.arrived;
                sent.arrival = ack.arrival;
                let (id, arrived) = (sent.id, sent.arrived);
                if arrived && self.highest_arrived.is_none_or(|h| h < id) {
                    self.highest_arrived = Some(id);
                }
            }
        }
        if fed {
            self.take_reports(now);
            self.estimator.on_reports(now, &self.reports);
        }
    }

    /// Everything from the last report up to the highest packet that arrived, in send
    /// order; what did not arrive by then is reported lost, unless it is older than
    /// [`FORGET_AFTER`].
    fn take_reports(&mut self, now: Instant) {
        self.reports.clear();
        let Some(high) = self.highest_arrived else { return };
        let from = self.next_to_report.max(self.next.saturating_sub(HISTORY as u64));
        for id in from..=high {
            let Some(Some(s)) = self.ring.get((id % HISTORY as u64) as usize) else { continue };
            if s.id != id || (!s.arrived && now.saturating_duration_since(s.departure) > FORGET_AFTER) {
                continue;
            }
            self.reports.push(PacketReport {
                ssrc: s.ssrc,
                id,
                rtp_sequence_number: s.rtp_sequence_number,
                is_twcc: true,
                twcc_sequence_number: id as u16,
                size: s.size as usize,
                arrived: s.arrived,
                departure: s.departure,
                arrival: s.arrival,
                ecn: Default::default(),
            });
        }
        self.next_to_report = self.next_to_report.max(high + 1);
    }

    /// When the estimator wants [`Self::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.estimate.enabled.load(Ordering::Relaxed) { self.estimator.poll_timeout() } else { None }
    }

    /// Runs the estimator's timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.estimate.enabled.load(Ordering::Relaxed) {
            self.estimator.handle_timeout(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report of a packet of `size` bytes sent at `sent_us` and arrived at `arrived_us`
    /// (receiver clock), or lost.
    fn report(sent_us: u64, arrived_us: Option<u64>, size: usize, base: Instant) -> PacketReport {
        PacketReport {
            ssrc: 1,
            id: sent_us,
            rtp_sequence_number: 0,
            is_twcc: true,
            twcc_sequence_number: 0,
            size,
            arrived: arrived_us.is_some(),
            departure: base + Duration::from_micros(sent_us),
            arrival: arrived_us.map(Duration::from_micros),
            ecn: Default::default(),
        }
    }

    #[test]
    fn packet_trains_show_the_bottleneck() {
        let base = Instant::now();
        let mut reports = Vec::new();
        // A frame of four 1100-byte packets sent 50 µs apart through a 600 kbit/s link:
        // 14.67 ms apart on arrival.
        for i in 0..4 {
            reports.push(report(i * 50, Some(10_000 + i * 14_667), 1100, base));
        }
        // 40 ms later, a frame that met no bottleneck.
        for i in 0..3 {
            reports.push(report(40_000 + i * 50, Some(60_000 + i * 60), 1100, base));
        }
        // Through a shaper whose token bucket let the first two pass together, the third
        // after the bucket's deficit only: the rate from the fourth on. With only three,
        // nothing.
        reports.push(report(60_000, Some(70_000), 1100, base));
        reports.push(report(60_050, Some(70_250), 1100, base));
        reports.push(report(60_100, Some(75_000), 1100, base));
        reports.push(report(60_150, Some(85_500), 734, base));
        reports.push(report(70_000, Some(90_000), 1100, base));
        reports.push(report(70_050, Some(90_250), 1100, base));
        reports.push(report(70_100, Some(95_000), 1100, base));
        // A frame with a lost packet, and one of two packets: no sample.
        reports.push(report(80_000, Some(90_000), 1100, base));
        reports.push(report(80_050, None, 1100, base));
        reports.push(report(80_100, Some(120_000), 1100, base));
        reports.push(report(120_000, Some(130_000), 1100, base));
        reports.push(report(120_050, Some(145_000), 1100, base));
        let rates: Vec<u64> = train_rates(&reports).collect();
        assert_eq!(rates.len(), 3, "{rates:?}");
        assert!((590_000..=610_000).contains(&rates[0]), "{rates:?}");
        assert_eq!(rates[1], UNBOUNDED);
        assert!((555_000..=562_000).contains(&rates[2]), "{rates:?}");
        assert_eq!(median([600_000, UNBOUNDED].into_iter()), 0, "too few samples");
        assert_eq!(median([600_000, 610_000, UNBOUNDED].into_iter()), 610_000);
        assert_eq!(median([600_000, UNBOUNDED, UNBOUNDED].into_iter()), UNBOUNDED);
    }

    fn feedback(base: u16, symbols: &[bool]) -> Vec<Box<dyn rtc::rtcp::Packet>> {
        use rtc::rtcp::transport_feedbacks::transport_layer_cc::*;
        let symbol_list: Vec<SymbolTypeTcc> =
            symbols.iter().map(|r| if *r { SymbolTypeTcc::PacketReceivedSmallDelta } else { SymbolTypeTcc::PacketNotReceived }).collect();
        let recv_deltas =
            symbols.iter().filter(|r| **r).map(|_| RecvDelta { type_tcc_packet: SymbolTypeTcc::PacketReceivedSmallDelta, delta: 1_000 }).collect();
        vec![Box::new(TransportLayerCc {
            sender_ssrc: 1,
            media_ssrc: 7,
            base_sequence_number: base,
            packet_status_count: symbols.len() as u16,
            reference_time: 0,
            fb_pkt_count: 0,
            packet_chunks: vec![PacketStatusChunk::StatusVectorChunk(StatusVectorChunk {
                type_tcc: StatusChunkTypeTcc::StatusVectorChunk,
                symbol_size: SymbolSizeTypeTcc::TwoBit,
                symbol_list,
            })],
            recv_deltas,
        })]
    }

    fn send_side() -> (SendSide, Arc<Estimate>) {
        let estimate = Arc::new(Estimate::default());
        let estimator = SubscriberEstimator::new(1_000_000.0, 100_000.0, 10_000_000.0, estimate.clone());
        let mut s = SendSide::new(estimator, estimate.clone());
        let ext = rtc::interceptor::RTPHeaderExtension { uri: TRANSPORT_CC_URI.into(), id: 5 };
        s.bind(&StreamInfo { ssrc: 7, rtp_header_extensions: vec![ext], ..Default::default() });
        (s, estimate)
    }

    fn packet(ssrc: u32, seq: u16) -> rtc::rtp::Packet {
        rtc::rtp::Packet { header: rtc::rtp::Header { version: 2, ssrc, sequence_number: seq, ..Default::default() }, payload: vec![0; 1000].into() }
    }

    #[test]
    fn sent_packets_are_numbered_and_feedback_reaches_the_estimate() {
        let (mut s, estimate) = send_side();
        let t0 = Instant::now();
        // Not enabled yet: nothing is numbered.
        let mut p = packet(7, 100);
        s.on_write(&mut p, t0);
        assert!(p.header.get_extension(5).is_none());
        estimate.enable();
        for i in 0..6u16 {
            let mut p = packet(7, 101 + i);
            s.on_write(&mut p, t0 + Duration::from_millis(u64::from(i)));
            assert_eq!(p.header.get_extension(5).as_deref(), Some(&i.to_be_bytes()[..]));
            // Another stream (no transport-cc negotiated) is not numbered.
            let mut other = packet(8, i);
            s.on_write(&mut other, t0);
            assert!(other.header.get_extension(5).is_none());
        }
        // Packet 2 lost; 40000 was never sent (ignored).
        let now = t0 + Duration::from_millis(50);
        s.on_read(&feedback(0, &[true, true, false, true, true, true]), now);
        let ids: Vec<(u64, bool, u16)> = s.reports.iter().map(|r| (r.id, r.arrived, r.rtp_sequence_number)).collect();
        assert_eq!(ids, [(0, true, 101), (1, true, 102), (2, false, 103), (3, true, 104), (4, true, 105), (5, true, 106)]);
        assert!(s.reports.iter().all(|r| r.size > 1000 && r.is_twcc));
        let r = estimate.read(now);
        assert_eq!((r.packets, r.loss_permille), (6, 166));
        s.on_read(&feedback(40_000, &[true]), now);
        assert!(s.reports.is_empty(), "nothing new was reported");
        // Reported packets are not reported again.
        s.on_read(&feedback(3, &[true, true, true]), now);
        assert!(s.reports.is_empty());
    }

    #[test]
    fn numbers_wrap_and_old_unreported_packets_are_forgotten() {
        let (mut s, estimate) = send_side();
        estimate.enable();
        let t0 = Instant::now();
        s.next = 65_534;
        for i in 0..4u16 {
            let mut p = packet(7, i);
            s.on_write(&mut p, t0);
            assert_eq!(p.header.get_extension(5).as_deref(), Some(&65_534u16.wrapping_add(i).to_be_bytes()[..]));
        }
        s.on_read(&feedback(65_535, &[false, true]), t0 + Duration::from_millis(30));
        let ids: Vec<(u64, bool)> = s.reports.iter().map(|r| (r.id, r.arrived)).collect();
        assert_eq!(ids, [(65_534, false), (65_535, false), (65_536, true)], "65534 never reported: lost");
        // Three seconds on, 65537 was never reported: forgotten rather than lost.
        let mut p = packet(7, 9);
        s.on_write(&mut p, t0 + Duration::from_secs(3));
        s.on_read(&feedback(2, &[true]), t0 + Duration::from_secs(3));
        let ids: Vec<u64> = s.reports.iter().map(|r| r.id).collect();
        assert_eq!(ids, [65_538]);
    }
}
