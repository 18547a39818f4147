//! A subscriber connection's bandwidth, as the SFU's simulcast choice reads it: GCC's
//! target (webrtc-rs's port, driven by the client's transport-wide congestion control
//! feedback), and over the last second of that feedback, what reached the client and what
//! was lost. The estimator runs inside the connection's interceptor chain (as its
//! congestion controller, without a pacer: forwarded media leaves as it comes) and writes
//! what it finds where the worker reads it when it chooses layers.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rtc::interceptor::{BandwidthEstimator, EstimatorStats, Gcc, Interceptor, PacketReport, StreamInfo, TaggedPacket};
use rtc::sansio::Protocol;
use rtc::shared::error::Error;

/// How much feedback the delivered rate and the loss are measured over.
const WINDOW: Duration = Duration::from_secs(1);

/// What a connection's estimator last found.
#[derive(Debug)]
pub struct Estimate {
    target: AtomicU64,
    delivered: AtomicU64,
    loss_permille: AtomicU32,
    packets: AtomicU32,
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
    /// How long ago the client's last feedback came (a client that stopped sending it
    /// leaves the values as they were).
    pub age: Duration,
}

impl Estimate {
    /// Starts estimating (the connection takes a simulcast video).
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
    out: Arc<Estimate>,
}

impl SubscriberEstimator {
    /// An estimator starting GCC at `start` bits per second (within `min..=max`), writing into `out`.
    pub fn new(start: f64, min: f64, max: f64, out: Arc<Estimate>) -> Self {
        SubscriberEstimator { gcc: Gcc::new(start, min, max), window: VecDeque::new(), twcc: Vec::new(), out }
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

/// An interceptor that works only once its connection's [`Estimate`] is enabled: before,
/// packets pass it untouched. Numbering every sent packet and keeping its history costs
/// 20–30 % more CPU per forwarded packet (docs/performance.md), which only a connection
/// that takes a simulcast video has any use for.
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
