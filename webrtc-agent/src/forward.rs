//! What happens to a forwarded packet between a publisher's track and each subscriber:
//! header extensions stripped once (their ids are negotiated per connection, and a clone
//! of a packet without them is a refcount bump on the payload), then per subscriber leg
//! its own SSRC, payload type and a continuous sequence ([`Rewriter`]); repeated
//! retransmissions dropped ([`SeenWindow`]); keyframe requests to the publisher spaced
//! and deferred, never lost ([`KeyframeThrottle`]).

use std::time::{Duration, Instant};

use rtc::rtp;

/// Removes header extensions: their ids are negotiated per connection.
pub fn strip_extensions(packet: &mut rtp::Packet) {
    if packet.header.extension || !packet.header.extensions.is_empty() {
        packet.header.extension = false;
        packet.header.extension_profile = 0;
        packet.header.extensions.clear();
        packet.header.extensions_padding = 0;
    }
}

/// Rewrites a forwarded packet for one subscriber connection: its own SSRC, the payload
/// type negotiated there, and a sequence number that stays continuous when forwarding
/// pauses and resumes (a gap would make the receiver ask for packets that never come).
#[derive(Debug, Clone)]
pub struct Rewriter {
    /// SSRC announced to the subscriber.
    pub ssrc: u32,
    /// Payload type negotiated with the subscriber.
    pub payload_type: u8,
    seq_offset: u16,
    last_out: Option<u16>,
    resync: bool,
    ts_offset: u32,
    /// The newest timestamp sent, and when.
    last_ts: Option<(u32, Instant)>,
    rebase_ts: bool,
}

/// The RTP clock of video (a switch between layers carries timestamps on at this rate).
const VIDEO_CLOCK: u64 = 90_000;

impl Rewriter {
    /// A rewriter for a subscriber track.
    pub fn new(ssrc: u32, payload_type: u8) -> Self {
        Rewriter { ssrc, payload_type, seq_offset: 0, last_out: None, resync: true, ts_offset: 0, last_ts: None, rebase_ts: false }
    }

    /// The next packet starts a new run (after a pause): continue the sequence from the last one sent.
    pub fn resync(&mut self) {
        self.resync = true;
    }

    /// The next packet comes from another source (another simulcast layer of the same
    /// video, with its own numbering and timestamp base): sequence numbers and (90 kHz)
    /// timestamps continue from the last ones sent, the timestamps advanced by the time
    /// that passed.
    pub fn switch_source(&mut self) {
        self.resync = true;
        self.rebase_ts = true;
    }

    /// Rewrites the packet in place (`now`: when it is sent, for a later switch).
    pub fn rewrite(&mut self, packet: &mut rtp::Packet, now: Instant) {
        let h = &mut packet.header;
        if std::mem::take(&mut self.rebase_ts)
            && let Some((last, at)) = self.last_ts
        {
            let ticks = (now.saturating_duration_since(at).as_micros() as u64 * VIDEO_CLOCK / 1_000_000).max(1);
            self.ts_offset = last.wrapping_add(ticks as u32).wrapping_sub(h.timestamp);
        }
        let ts = h.timestamp.wrapping_add(self.ts_offset);
        match self.last_ts {
            Some((last, _)) if ts.wrapping_sub(last) > 0x8000_0000 => {}
            _ => self.last_ts = Some((ts, now)),
        }
        h.timestamp = ts;
        if self.resync {
            // First packet ever: keep the publisher's numbering (offset 0).
            self.seq_offset = match self.last_out {
                Some(last) => last.wrapping_add(1).wrapping_sub(h.sequence_number),
                None => 0,
            };
            self.resync = false;
        }
        let out = h.sequence_number.wrapping_add(self.seq_offset);
        // Only move "last" forward: reordered older packets must not rewind it.
        match self.last_out {
            Some(last) if out.wrapping_sub(last) > 0x8000 => {}
            _ => self.last_out = Some(out),
        }
        h.sequence_number = out;
        h.ssrc = self.ssrc;
        h.payload_type = self.payload_type;
    }
}

/// What to do with a keyframe request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyframeDecision {
    /// Send a PLI now.
    SendNow,
    /// One was sent recently; send one at this instant (the caller schedules it).
    SendAt(Instant),
    /// A deferred one is already scheduled; nothing to do.
    AlreadyScheduled,
    /// A PLI was sent and its keyframe has not come yet: that keyframe serves this request
    /// too (it reaches every subscriber after it), so no other is sent.
    Covered,
}

/// How long a sent PLI covers later requests while its keyframe has not come: a publisher
/// answers within a round trip and a frame, so one that has not by then may have lost the
/// request, and the next request is sent again (within the interval rule).
pub const KEYFRAME_AWAIT: Duration = Duration::from_millis(500);

/// How many times a PLI whose keyframe does not come is sent again for the requests
/// waiting on it; after that, only a new request sends one (a publisher that stopped
/// sending video is not asked every half second for ever).
const KEYFRAME_RETRIES: u8 = 3;

/// Throttles keyframe requests to a publisher: at most one per `interval`, but a request
/// inside the interval is never lost — it is deferred to the interval's end, so a
/// subscriber that joins right after another still gets its keyframe soon. Where the
/// caller can see keyframes (`detects`), a request made while a sent PLI's keyframe is
/// still on its way is covered by it (as mediasoup's key frame request manager does), so a
/// burst of joins or losses costs one keyframe and the interval can stay short; and if
/// the keyframe does not come within [`KEYFRAME_AWAIT`] of its PLI, the PLI is sent again
/// (the caller calls [`KeyframeThrottle::wait_over`] then), so a lost PLI loses no
/// request: taps (the mixer's inputs, recordings, relays) do not ask again by themselves.
#[derive(Debug)]
pub struct KeyframeThrottle {
    interval: Duration,
    last: Option<Instant>,
    scheduled: bool,
    detects: bool,
    /// When the PLI whose keyframe has not come yet was sent.
    awaiting: Option<Instant>,
    /// A request waits for a keyframe (none has come since it was made).
    relied_on: bool,
    /// PLIs sent again since the last request that sent one, or the last keyframe.
    retries: u8,
}

impl KeyframeThrottle {
    /// A throttle with the given minimum interval between PLIs; `detects`: the caller
    /// reports keyframes with [`KeyframeThrottle::keyframe_seen`].
    pub fn new(interval: Duration, detects: bool) -> Self {
        KeyframeThrottle { interval, last: None, scheduled: false, detects, awaiting: None, relied_on: false, retries: 0 }
    }

    /// Decides about a request arriving at `now`. `cover`: a keyframe already on its way
    /// may serve it. Not so for a subscription that has just connected: a keyframe in
    /// flight can reach the client in the moment it cannot yet decrypt (it has not read the
    /// server's last handshake flight), and be dropped there.
    pub fn request(&mut self, now: Instant, cover: bool) -> KeyframeDecision {
        // Whatever the decision, the request waits for the next keyframe.
        self.relied_on = self.detects;
        if self.scheduled {
            return KeyframeDecision::AlreadyScheduled;
        }
        if cover && self.awaiting.is_some_and(|sent| now.saturating_duration_since(sent) < KEYFRAME_AWAIT) {
            // It rides on that PLI, with one retry at least (earlier requests may have used
            // the others up while the publisher did not answer).
            self.retries = self.retries.min(KEYFRAME_RETRIES - 1);
            return KeyframeDecision::Covered;
        }
        // A request that sends a PLI gets retries of its own.
        self.retries = 0;
        self.by_interval(now)
    }

    fn by_interval(&mut self, now: Instant) -> KeyframeDecision {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.scheduled = true;
                KeyframeDecision::SendAt(last + self.interval)
            }
            _ => {
                self.sent(now);
                KeyframeDecision::SendNow
            }
        }
    }

    /// Records that the deferred request was sent at `now`.
    pub fn sent_deferred(&mut self, now: Instant) {
        self.scheduled = false;
        self.sent(now);
    }

    fn sent(&mut self, now: Instant) {
        self.last = Some(now);
        if self.detects {
            self.awaiting = Some(now);
        }
    }

    /// When the PLI whose keyframe is awaited was sent: the caller calls
    /// [`KeyframeThrottle::wait_over`] with it [`KEYFRAME_AWAIT`] later.
    pub fn awaited_since(&self) -> Option<Instant> {
        self.awaiting
    }

    /// The wait for the keyframe of the PLI sent at `sent` is over at `now`: what to do,
    /// if anything — a PLI again when that keyframe has not come and a request waits for it.
    pub fn wait_over(&mut self, sent: Instant, now: Instant) -> Option<KeyframeDecision> {
        if self.awaiting != Some(sent) || !self.relied_on || self.scheduled {
            return None;
        }
        if self.retries >= KEYFRAME_RETRIES {
            self.relied_on = false;
            return None;
        }
        self.retries += 1;
        Some(self.by_interval(now))
    }

    /// Whether a keyframe is awaited (the caller then looks for one in each packet).
    pub fn awaiting(&self) -> bool {
        self.awaiting.is_some()
    }

    /// The publisher's keyframe came: later requests need a new one.
    pub fn keyframe_seen(&mut self) {
        self.awaiting = None;
        self.relied_on = false;
        self.retries = 0;
    }
}

/// Sequence numbers a publisher track has already delivered, over the last
/// [`SeenWindow::SIZE`], so a packet that arrives twice is forwarded once: a repair that
/// crossed a second NACK, or a browser's RTX padding while it probes its bandwidth (copies
/// of packets it just sent). (Before RTX was restored ahead of the NACK generator,
/// [`crate::rtx_in`], the generator asked for a lost packet on every round, and each
/// answer reached every subscriber.)
#[derive(Debug, Clone)]
pub struct SeenWindow {
    bits: [u64; Self::SIZE / 64],
    highest: Option<u16>,
    /// The last packet older than the window and how many such packets came in a row,
    /// each following the one before: that many mean the source numbers anew from there.
    stray: Option<(u16, u8)>,
}

impl Default for SeenWindow {
    fn default() -> Self {
        SeenWindow { bits: [0; Self::SIZE / 64], highest: None, stray: None }
    }
}

impl SeenWindow {
    /// Sequence numbers remembered behind the highest one.
    pub const SIZE: usize = 1024;

    /// Whether `seq` is newer than every number seen so far (so not a late packet or a
    /// retransmission); does not record it.
    pub fn advances(&self, seq: u16) -> bool {
        self.highest.is_none_or(|highest| {
            let ahead = seq.wrapping_sub(highest);
            ahead != 0 && ahead < 0x8000
        })
    }

    /// Packets older than the window, each following the one before, after which the
    /// window starts anew from them.
    const RESTART_RUN: u8 = 4;

    /// Whether `seq` was delivered before; records it. A packet older than the window is
    /// let through unrecorded (a very late repair); [`Self::RESTART_RUN`] of them in a
    /// row, each following the one before, start the window anew from there (a source
    /// that restarted its numbering lower, or came back from a long silence, is tracked
    /// again).
    pub fn repeat(&mut self, seq: u16) -> bool {
        let Some(highest) = self.highest else {
            self.highest = Some(seq);
            return self.mark(seq, true);
        };
        let ahead = seq.wrapping_sub(highest);
        if ahead != 0 && ahead < 0x8000 {
            // Newer: forget the slots it passes over (they now stand for unseen numbers).
            if usize::from(ahead) >= Self::SIZE {
                self.bits = [0; Self::SIZE / 64];
            } else {
                for s in 1..=ahead {
                    self.mark(highest.wrapping_add(s), false);
                }
            }
            self.highest = Some(seq);
        } else if usize::from(highest.wrapping_sub(seq)) >= Self::SIZE {
            let run = match self.stray {
                Some((last, n)) if seq == last.wrapping_add(1) => n.saturating_add(1),
                _ => 1,
            };
            if run < Self::RESTART_RUN {
                self.stray = Some((seq, run));
                return false;
            }
            self.stray = None;
            self.bits = [0; Self::SIZE / 64];
            self.highest = Some(seq);
        }
        self.mark(seq, true)
    }

    /// Sets or clears the slot of `seq`; returns whether it was set.
    fn mark(&mut self, seq: u16, on: bool) -> bool {
        let Some(word) = self.bits.get_mut(usize::from(seq) % Self::SIZE / 64) else { return false };
        let bit = 1u64 << (seq % 64);
        let was = *word & bit != 0;
        if on {
            *word |= bit;
        } else {
            *word &= !bit;
        }
        was
    }
}

#[cfg(test)]
mod seen_window_tests {
    use super::SeenWindow;

    #[test]
    fn repeats_are_caught_within_the_window_across_the_wrap() {
        let mut w = SeenWindow::default();
        for s in 65000u16..=65535 {
            assert!(!w.repeat(s));
        }
        for s in 0u16..100 {
            assert!(!w.repeat(s));
        }
        // Repeats of old and new packets.
        assert!(w.repeat(65300));
        assert!(w.repeat(99));
        assert!(w.repeat(0));
        // Lost then repaired: the first delivery passes, the second is a repeat; only a
        // newer number advances the stream.
        assert!(w.advances(105) && !w.advances(99) && !w.advances(50));
        assert!(!w.repeat(105));
        assert!(!w.advances(101) && !w.advances(105));
        assert!(!w.repeat(101));
        assert!(w.repeat(101));
        assert!(!w.repeat(102));
        // Older than the window: let through (unknown), not recorded; a very late repair
        // leaves the window as it was.
        let old = 105u16.wrapping_sub(2000);
        assert!(!w.repeat(old));
        assert!(!w.repeat(old));
        assert!(w.repeat(105) && !w.advances(104));
        // A run of them, each following the one before, starts the window anew there
        // (a source that restarted lower): the stream goes on from it and is tracked.
        let restart = 105u16.wrapping_sub(3000);
        for k in 0..u16::from(SeenWindow::RESTART_RUN) {
            assert!(!w.repeat(restart.wrapping_add(k)));
        }
        let last = restart.wrapping_add(u16::from(SeenWindow::RESTART_RUN) - 1);
        assert!(w.repeat(last), "recorded once the window starts anew");
        assert!(w.advances(last.wrapping_add(1)) && !w.advances(restart));
        assert!(!w.repeat(last.wrapping_add(1)));
        // A jump ahead by more than the window forgets everything before it.
        assert!(!w.repeat(3105));
        assert!(!w.repeat(3104));
        assert!(w.repeat(3105));
        assert!(!w.repeat(101));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(seq: u16) -> rtp::Packet {
        let mut p = rtp::Packet::default();
        p.header.version = 2;
        p.header.sequence_number = seq;
        p.header.ssrc = 1;
        p.header.payload_type = 96;
        p
    }

    #[test]
    fn rewriter_keeps_continuity_across_pauses() {
        let mut r = Rewriter::new(777, 100);
        let mut p = pkt(65534);
        r.rewrite(&mut p, Instant::now());
        assert_eq!((p.header.sequence_number, p.header.ssrc, p.header.payload_type), (65534, 777, 100));
        let mut p = pkt(65535);
        r.rewrite(&mut p, Instant::now());
        let mut p = pkt(0);
        r.rewrite(&mut p, Instant::now());
        assert_eq!(p.header.sequence_number, 0);
        // Paused: the source went on to 500; the subscriber continues at 1.
        r.resync();
        let mut p = pkt(500);
        r.rewrite(&mut p, Instant::now());
        assert_eq!(p.header.sequence_number, 1);
        let mut p = pkt(501);
        r.rewrite(&mut p, Instant::now());
        assert_eq!(p.header.sequence_number, 2);
        // A late, reordered packet keeps its relative place and does not rewind.
        let mut p = pkt(499);
        r.rewrite(&mut p, Instant::now());
        assert_eq!(p.header.sequence_number, 0);
        r.resync();
        let mut p = pkt(9000);
        r.rewrite(&mut p, Instant::now());
        assert_eq!(p.header.sequence_number, 3);
    }

    #[test]
    fn a_switch_of_source_carries_sequence_and_timestamps_on() {
        let t0 = Instant::now();
        let mut r = Rewriter::new(1, 96);
        let mut p = pkt(10);
        p.header.timestamp = 1000;
        r.rewrite(&mut p, t0);
        assert_eq!((p.header.sequence_number, p.header.timestamp), (10, 1000));
        // Another layer, numbered and timed from elsewhere, 100 ms later.
        r.switch_source();
        let mut p = pkt(5000);
        p.header.timestamp = 777_777;
        r.rewrite(&mut p, t0 + Duration::from_millis(100));
        assert_eq!((p.header.sequence_number, p.header.timestamp), (11, 10_000));
        let mut p = pkt(5001);
        p.header.timestamp = 780_777;
        r.rewrite(&mut p, t0 + Duration::from_millis(133));
        assert_eq!((p.header.sequence_number, p.header.timestamp), (12, 13_000));
        // A pause of the same source keeps its timestamps (same clock) but closes the sequence gap.
        r.resync();
        let mut p = pkt(6000);
        p.header.timestamp = 870_777;
        r.rewrite(&mut p, t0 + Duration::from_millis(1133));
        assert_eq!((p.header.sequence_number, p.header.timestamp), (13, 103_000));
    }

    #[test]
    fn a_request_while_a_keyframe_is_on_its_way_is_covered_by_it() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut t = KeyframeThrottle::new(ms(100), true);
        assert_eq!(t.request(t0, true), KeyframeDecision::SendNow);
        assert!(t.awaiting());
        assert_eq!(t.awaited_since(), Some(t0));
        // Before the keyframe comes, later requests (even past the interval) ride on it.
        assert_eq!(t.request(t0 + ms(20), true), KeyframeDecision::Covered);
        assert_eq!(t.request(t0 + ms(150), true), KeyframeDecision::Covered);
        // A subscription that has just connected is not: it gets its own, within the interval rule.
        assert_eq!(t.request(t0 + ms(160), false), KeyframeDecision::SendNow);
        t.keyframe_seen();
        assert!(!t.awaiting());
        // The wait for the first PLI's keyframe ends with nothing to do: a keyframe came.
        assert_eq!(t.wait_over(t0, t0 + KEYFRAME_AWAIT), None);
        // After it, a request needs a keyframe of its own, within the interval rule.
        assert_eq!(t.request(t0 + ms(200), true), KeyframeDecision::SendAt(t0 + ms(260)));
        t.sent_deferred(t0 + ms(260));
        // A keyframe that never comes covers requests for KEYFRAME_AWAIT only.
        let sent = t0 + ms(260);
        assert_eq!(t.request(sent + KEYFRAME_AWAIT - ms(1), true), KeyframeDecision::Covered);
        // ... and the covered request gets the PLI again when the wait is over.
        assert_eq!(t.wait_over(sent, sent + KEYFRAME_AWAIT), Some(KeyframeDecision::SendNow));
        assert_eq!(t.awaited_since(), Some(sent + KEYFRAME_AWAIT));
        assert_eq!(t.request(sent + KEYFRAME_AWAIT * 2, true), KeyframeDecision::SendNow);
        // Without keyframe detection nothing is covered.
        let mut blind = KeyframeThrottle::new(ms(100), false);
        assert_eq!(blind.request(t0, true), KeyframeDecision::SendNow);
        assert_eq!(blind.awaited_since(), None);
        assert_eq!(blind.request(t0 + ms(150), true), KeyframeDecision::SendNow);
    }

    #[test]
    fn a_pli_whose_keyframe_never_comes_is_sent_again_a_few_times() {
        let t0 = Instant::now();
        let mut t = KeyframeThrottle::new(Duration::from_millis(100), true);
        assert_eq!(t.request(t0, true), KeyframeDecision::SendNow);
        assert_eq!(t.request(t0 + Duration::from_millis(10), true), KeyframeDecision::Covered);
        let mut sent = t0;
        for _ in 0..KEYFRAME_RETRIES {
            assert_eq!(t.wait_over(sent, sent + KEYFRAME_AWAIT), Some(KeyframeDecision::SendNow));
            sent += KEYFRAME_AWAIT;
        }
        // A publisher that sends no keyframe is not asked for ever.
        assert_eq!(t.wait_over(sent, sent + KEYFRAME_AWAIT), None);
        // A stale wait (a later PLI was sent) does nothing.
        assert_eq!(t.wait_over(t0, sent + KEYFRAME_AWAIT), None);
        // A new request that sends a PLI gets retries of its own.
        let later = sent + KEYFRAME_AWAIT * 2;
        assert_eq!(t.request(later, true), KeyframeDecision::SendNow);
        assert_eq!(t.wait_over(later, later + KEYFRAME_AWAIT), Some(KeyframeDecision::SendNow));
        // Once the keyframe comes, the wait ends quietly.
        t.keyframe_seen();
        assert_eq!(t.wait_over(later + KEYFRAME_AWAIT, later + KEYFRAME_AWAIT * 2), None);
    }

    #[test]
    fn throttle_defers_instead_of_dropping() {
        let t0 = Instant::now();
        let mut t = KeyframeThrottle::new(Duration::from_millis(500), false);
        assert_eq!(t.request(t0, true), KeyframeDecision::SendNow);
        assert_eq!(t.request(t0 + Duration::from_millis(100), true), KeyframeDecision::SendAt(t0 + Duration::from_millis(500)));
        assert_eq!(t.request(t0 + Duration::from_millis(200), true), KeyframeDecision::AlreadyScheduled);
        t.sent_deferred(t0 + Duration::from_millis(500));
        assert_eq!(t.request(t0 + Duration::from_millis(1100), true), KeyframeDecision::SendNow);
    }
}

/// Property tests of the per-subscriber rewriter and the keyframe throttle.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> ProptestConfig {
        ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() }
    }

    /// What the source does between two packets a subscriber receives.
    #[derive(Debug, Clone)]
    enum Step {
        /// The next packet.
        Next,
        /// Packets lost on the way (the gap must stay visible, for NACK).
        Gap(u16),
        /// An older packet arriving late.
        Late(u16),
        /// Forwarding paused and resumed (publisher or subscriber mute): the source's
        /// numbering went on meanwhile, to any value.
        Mute(u16),
    }

    fn steps(with_loss: bool) -> impl Strategy<Value = Vec<Step>> {
        let step = if with_loss {
            prop_oneof![8 => Just(Step::Next), 2 => (2..60u16).prop_map(Step::Gap), 2 => (1..12u16).prop_map(Step::Late), 1 => any::<u16>().prop_map(Step::Mute)].boxed()
        } else {
            prop_oneof![6 => Just(Step::Next), 1 => any::<u16>().prop_map(Step::Mute)].boxed()
        };
        prop::collection::vec(step, 1..200)
    }

    fn pkt(seq: u16, ts: u32) -> rtp::Packet {
        let mut p = rtp::Packet::default();
        p.header.version = 2;
        p.header.sequence_number = seq;
        p.header.timestamp = ts;
        p.header.ssrc = 0x1234_5678;
        p.header.payload_type = 111;
        p.payload = bytes::Bytes::from(seq.to_be_bytes().to_vec());
        p
    }

    /// Feeds the steps through a rewriter; yields (input seq, output packet, resynced before it).
    fn run(first: u16, steps: &[Step], ssrc: u32, pt: u8) -> Vec<(u16, rtp::Packet, bool)> {
        let mut r = Rewriter::new(ssrc, pt);
        let (mut seq, mut highest) = (first, first);
        let mut out = Vec::new();
        let send = |r: &mut Rewriter, seq: u16, resynced: bool, out: &mut Vec<_>| {
            let mut p = pkt(seq, u32::from(seq).wrapping_mul(960));
            r.rewrite(&mut p, Instant::now());
            out.push((seq, p, resynced));
        };
        send(&mut r, seq, true, &mut out);
        for step in steps {
            match step {
                Step::Next => {
                    highest = highest.wrapping_add(1);
                    seq = highest;
                }
                Step::Gap(n) => {
                    highest = highest.wrapping_add(*n);
                    seq = highest;
                }
                Step::Late(n) => seq = highest.wrapping_sub(*n),
                Step::Mute(to) => {
                    r.resync();
                    highest = *to;
                    seq = *to;
                }
            }
            send(&mut r, seq, matches!(step, Step::Mute(_)), &mut out);
        }
        out
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn sequence_is_continuous_across_mutes(first in any::<u16>(), steps in steps(false), ssrc in any::<u32>(), pt in 0..128u8) {
            let out = run(first, &steps, ssrc, pt);
            // The very first packet keeps the publisher's numbering.
            prop_assert_eq!(out[0].1.header.sequence_number, first);
            for pair in out.windows(2) {
                let (prev, next) = (pair[0].1.header.sequence_number, pair[1].1.header.sequence_number);
                prop_assert_eq!(next, prev.wrapping_add(1), "gap in the output after {:?}", steps);
            }
            for (seq, p, _) in &out {
                prop_assert_eq!((p.header.ssrc, p.header.payload_type), (ssrc, pt));
                // Timestamps and payloads pass through untouched.
                prop_assert_eq!(p.header.timestamp, u32::from(*seq).wrapping_mul(960));
                prop_assert_eq!(&p.payload[..], &seq.to_be_bytes()[..]);
            }
        }

        #[test]
        fn losses_stay_visible_and_late_packets_do_not_rewind(first in any::<u16>(), steps in steps(true)) {
            let out = run(first, &steps, 7, 96);
            // Between resyncs the output is the input shifted by one offset (losses and
            // reordering stay as they were); after a resync the output continues right
            // after the highest number sent so far.
            let mut highest_out = out[0].1.header.sequence_number;
            let mut offset = 0u16;
            for (i, (seq, p, resynced)) in out.iter().enumerate() {
                let o = p.header.sequence_number;
                if i > 0 && *resynced {
                    prop_assert_eq!(o, highest_out.wrapping_add(1), "packet {} after a mute", i);
                    offset = o.wrapping_sub(*seq);
                }
                prop_assert_eq!(o.wrapping_sub(*seq), offset, "packet {} moved within its run", i);
                if (o.wrapping_sub(highest_out) as i16) > 0 {
                    highest_out = o;
                }
            }
        }

        #[test]
        fn keyframe_requests_are_spaced_and_never_lost(
            interval_ms in 1..1000u64,
            detects in any::<bool>(),
            steps in prop::collection::vec((0..1500u64, any::<bool>(), any::<bool>(), any::<bool>()), 1..60),
        ) {
            let interval = Duration::from_millis(interval_ms);
            let t0 = Instant::now();
            let mut t = KeyframeThrottle::new(interval, detects);
            let mut sent: Vec<Instant> = Vec::new();
            let mut deferred: Option<Instant> = None;
            // The ends of the waits for sent PLIs' keyframes (the caller's timers).
            let mut waits: Vec<Instant> = Vec::new();
            // The keyframe answering the last PLI has not come yet.
            let mut on_its_way = false;
            // A request that no keyframe has answered yet, and the PLIs sent again for it.
            let mut waiting = false;
            let mut retries = 0;
            let mut now = t0;
            for (gap, keyframe_came, asks, cover) in steps {
                now += Duration::from_millis(gap);
                // The caller's timers, in the order they fall due.
                loop {
                    let wait = waits.iter().map(|s| *s + KEYFRAME_AWAIT).filter(|e| *e <= now).min();
                    let due = deferred.filter(|at| *at <= now);
                    let at = match (due, wait) {
                        (Some(d), Some(w)) if w < d => w,
                        (Some(d), _) => d,
                        (None, Some(w)) => w,
                        (None, None) => break,
                    };
                    let mut send = false;
                    if due == Some(at) {
                        t.sent_deferred(at);
                        deferred = None;
                        send = true;
                    } else {
                        let s = at - KEYFRAME_AWAIT;
                        waits.retain(|w| *w != s);
                        match t.wait_over(s, at) {
                            None => {}
                            Some(d) => {
                                prop_assert!(detects && on_its_way && waiting && sent.last() == Some(&s));
                                retries += 1;
                                prop_assert!(retries <= KEYFRAME_RETRIES, "sent again {} times", retries);
                                match d {
                                    KeyframeDecision::SendNow => send = true,
                                    KeyframeDecision::SendAt(x) => deferred = Some(x),
                                    other => prop_assert!(false, "{:?} after a wait", other),
                                }
                            }
                        }
                    }
                    if send {
                        sent.push(at);
                        if detects {
                            on_its_way = true;
                            waits.push(at);
                        }
                    }
                }
                if keyframe_came {
                    t.keyframe_seen();
                    on_its_way = false;
                    waiting = false;
                    retries = 0;
                }
                // While no keyframe comes (a PLI lost), a waiting request has a PLI due or
                // one sent less than KEYFRAME_AWAIT ago whose wait is still to end (until
                // its retries are used up).
                if waiting && retries < KEYFRAME_RETRIES {
                    prop_assert!(
                        deferred.is_some() || sent.last().is_some_and(|s| now - *s < KEYFRAME_AWAIT && waits.contains(s)),
                        "a waiting request with no PLI on its way at {:?}",
                        now - t0
                    );
                }
                if !asks {
                    continue;
                }
                match t.request(now, cover) {
                    KeyframeDecision::SendNow => {
                        prop_assert!(deferred.is_none());
                        retries = 0;
                        sent.push(now);
                        if detects {
                            on_its_way = true;
                            waits.push(now);
                        }
                    }
                    KeyframeDecision::SendAt(at) => {
                        prop_assert!(deferred.is_none() && at > now && at <= now + interval);
                        deferred = Some(at);
                        retries = 0;
                    }
                    KeyframeDecision::AlreadyScheduled => prop_assert!(deferred.is_some()),
                    // Only a PLI sent less than KEYFRAME_AWAIT ago whose keyframe has not come
                    // covers, and only a request that allows it.
                    KeyframeDecision::Covered => {
                        prop_assert!(cover && detects && on_its_way && sent.last().is_some_and(|s| now - *s < KEYFRAME_AWAIT));
                        retries = retries.min(KEYFRAME_RETRIES - 1);
                    }
                }
                waiting |= detects;
                // Every request is answered by a PLI sent no earlier than interval after the
                // previous one, or by a keyframe still to come.
                prop_assert!(deferred.is_some() || sent.last() == Some(&now) || (cover && detects && on_its_way));
            }
            for pair in sent.windows(2) {
                prop_assert!(pair[1] - pair[0] >= interval, "PLIs {:?} apart", pair[1] - pair[0]);
            }
        }
    }
}
