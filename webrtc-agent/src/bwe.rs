//! A subscriber connection's bandwidth, as the SFU's simulcast choice reads it: GCC's
//! target (webrtc-rs's port, driven by the client's transport-wide congestion control
//! feedback), and over the last second of that feedback, what reached the client and what
//! was lost, and the path's capacity as the media's own packet trains show it. The
//! estimator runs inside the connection's interceptor chain (as its congestion
//! controller, without a pacer: forwarded media leaves as it comes) and writes what it
//! finds where the worker reads it when it chooses layers.
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

use rtc::interceptor::{BandwidthEstimator, EstimatorStats, Gcc, Interceptor, PacketReport, StreamInfo, TaggedPacket};
use rtc::sansio::Protocol;
use rtc::shared::error::Error;

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
    /// Whether the connection estimates at all (see [`Switched`]).
    enabled: AtomicBool,
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

/// An interceptor that works only once its connection's [`Estimate`] is enabled: before,
/// packets pass it untouched. Numbering every sent packet and keeping its history costs
/// 20–30 % more CPU per forwarded packet (docs/performance.md), which only a connection
/// that takes a simulcast video on `auto` has any use for.
pub struct Switched<I> {
    inner: I,
    estimate: Arc<Estimate>,
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

impl<I> Switched<I> {
    /// `inner`, working once `estimate` is enabled.
    pub fn new(inner: I, estimate: Arc<Estimate>) -> Self {
        Switched { inner, estimate, read: VecDeque::new(), write: VecDeque::new() }
    }

    fn on(&self) -> bool {
        self.estimate.enabled.load(Ordering::Relaxed)
    }
}

impl<I: Interceptor> Protocol<TaggedPacket, TaggedPacket, ()> for Switched<I> {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Error> {
        if self.on() {
            self.inner.handle_read(msg)
        } else {
            self.read.push_back(msg);
            Ok(())
        }
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front().or_else(|| self.inner.poll_read())
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Error> {
        if self.on() {
            self.inner.handle_write(msg)
        } else {
            self.write.push_back(msg);
            Ok(())
        }
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front().or_else(|| self.inner.poll_write())
    }

    fn handle_event(&mut self, evt: ()) -> Result<(), Error> {
        self.inner.handle_event(evt)
    }

    fn poll_event(&mut self) -> Option<()> {
        self.inner.poll_event()
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Error> {
        if self.on() { self.inner.handle_timeout(now) } else { Ok(()) }
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        if self.on() { self.inner.poll_timeout() } else { None }
    }

    fn close(&mut self) -> Result<(), Error> {
        self.inner.close()
    }
}

impl<I: Interceptor> Interceptor for Switched<I> {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.inner.bind_local_stream(info);
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.inner.unbind_local_stream(info);
    }
    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        self.inner.bind_remote_stream(info);
    }
    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        self.inner.unbind_remote_stream(info);
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
}
