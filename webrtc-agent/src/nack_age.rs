//! Retransmission requests for packets sent too long ago are not answered. A client
//! behind a congested link asks again for what the link dropped, long after: the
//! retransmissions then queue behind everything else on the same link and keep it
//! congested after the server has already moved the client to a lower layer (measured
//! with Chromium behind a 450 kbit/s shaper: 60 % loss on the lowest layer for 5 s after
//! the move, from retransmissions of the top layer's packets). Past [`NACK_MAX_AGE`], or
//! three round trips on a longer path (libwebrtc's rule), a repaired packet would come too
//! late for the receiver's jitter buffer anyway.
//!
//! Nor may retransmissions add more than half of what the connection sends (a budget
//! earned by first transmissions, saved up to a burst): a lossy link must not be asked to
//! carry a storm of repairs on top of its media.
//!
//! It works in [`crate::wire::Wire`], wire-ward of webrtc-rs's NACK responder: on the
//! write path it notes when each packet of this connection's streams first left, on the
//! read path it takes the sequence numbers that are too old out of each NACK before the
//! responder sees it (a NACK left empty is dropped).

use std::time::{Duration, Instant};

use rtc::rtcp::transport_feedbacks::transport_layer_nack::{TransportLayerNack, nack_pairs_from_sequence_numbers};

use crate::seq_ring::{Numbered, SeqRing};

/// Packets sent longer ago than this, or three round trips if longer (libwebrtc's
/// rule), are not retransmitted.
pub const NACK_MAX_AGE: Duration = Duration::from_millis(1000);
/// Send times kept per stream at most (as many as the responder's history, and more).
const SLOTS: usize = 512;
/// Send times a stream starts with room for; the ring doubles, up to [`SLOTS`], while a lap
/// of it takes less than [`NACK_MAX_AGE`], as the responder's history does: a subscriber of
/// a light stream keeps 512 bytes, not 4 KiB.
const FIRST_SLOTS: usize = 64;
/// Retransmissions may add at most one packet for every [`SENT_PER_RESEND`] first
/// transmissions of the connection...
const SENT_PER_RESEND: u32 = 2;
/// ...with a burst of at most this many.
const RESEND_BURST: u32 = 100;

/// When a packet first left: its sequence number, and milliseconds after the limit's
/// base, wrapping (plus one: 0 is an empty slot). Eight bytes, not the 24 of an
/// `Option<(u16, Instant)>`: every subscriber stream keeps up to [`SLOTS`] of them.
#[derive(Clone, Copy, Default)]
struct SentAt {
    seq: u16,
    ms: u32,
}

impl Numbered for SentAt {
    fn seq(&self) -> Option<u16> {
        (self.ms != 0).then_some(self.seq)
    }
}

/// Send times by sequence number.
struct SendTimes {
    slots: SeqRing<SentAt>,
    /// When the ring last passed its slot 0 (in [`NackLimit::ms`]'s unit).
    lap_began: Option<u32>,
}

impl SendTimes {
    fn new() -> SendTimes {
        SendTimes { slots: SeqRing::new(FIRST_SLOTS, SLOTS), lap_began: None }
    }

    /// Notes a transmission (a retransmission keeps the first's time); a first
    /// transmission that begins a lap quicker than [`NACK_MAX_AGE`] doubles the ring
    /// first (what it holds lies within one lap, so nothing collides).
    fn note(&mut self, seq: u16, ms: u32, retransmission: bool) {
        if !retransmission && self.slots.index(seq) == 0 {
            let quick = self.lap_began.is_some_and(|began| ms.wrapping_sub(began) < NACK_MAX_AGE.as_millis() as u32);
            self.lap_began = Some(ms);
            if quick {
                self.slots.grow();
            }
        }
        if let Some(slot) = self.slots.get_mut(seq)
            && slot.seq() != Some(seq)
        {
            *slot = SentAt { seq, ms };
        }
    }
}

/// Send times per local stream, and the NACK filter they allow (see the module docs).
pub struct NackLimit {
    /// What send times count from.
    base: Instant,
    /// Per sending SSRC (a connection has a few: a linear search beats hashing).
    sent: Vec<(u32, SendTimes)>,
    /// NACKed packets refused for their age (for tests and logs).
    pub refused: u64,
    /// NACKed packets refused for the retransmission budget.
    pub over_budget: u64,
    /// The client's smoothed round-trip time, from its receiver reports.
    rtt: Option<Duration>,
    /// Retransmissions allowed now, in units of 1/[`SENT_PER_RESEND`] packet: each first
    /// transmission adds one unit, each packet granted to a NACK takes a whole packet.
    budget: u32,
}

impl Default for NackLimit {
    fn default() -> Self {
        NackLimit { base: Instant::now(), sent: Vec::new(), refused: 0, over_budget: 0, rtt: None, budget: 0 }
    }
}

impl NackLimit {
    /// `at` in wrapping milliseconds after the base, never 0.
    fn ms(&self, at: Instant) -> u32 {
        (at.saturating_duration_since(self.base).as_millis() as u32).wrapping_add(1).max(1)
    }

    /// A local stream was bound: its send times are kept from now on, if it can be NACKed
    /// (an audio stream usually cannot: nothing to keep for it).
    pub fn bind(&mut self, info: &rtc::interceptor::StreamInfo) {
        let nack = info.rtcp_feedback.iter().any(|f| f.typ == "nack" && f.parameter.is_empty());
        if nack && !self.sent.iter().any(|(s, _)| *s == info.ssrc) {
            self.sent.push((info.ssrc, SendTimes::new()));
        }
    }

    /// A local stream was unbound.
    pub fn unbind(&mut self, ssrc: u32) {
        self.sent.retain(|(s, _)| *s != ssrc);
    }

    /// Packet `seq` of stream `ssrc` left now (a retransmission on the stream's own SSRC
    /// keeps the first send's time).
    pub fn on_sent(&mut self, ssrc: u32, seq: u16, retransmission: bool, now: Instant) {
        if !retransmission {
            self.budget = (self.budget + 1).min(RESEND_BURST * SENT_PER_RESEND);
        }
        let ms = self.ms(now);
        let Some((_, ring)) = self.sent.iter_mut().find(|(s, _)| *s == ssrc) else { return };
        ring.note(seq, ms, retransmission);
    }

    /// A round-trip time measured from a client's receiver report (smoothed as TCP
    /// does: 7/8 of the old and 1/8 of the new).
    pub fn on_rtt(&mut self, sample: Duration) {
        self.rtt = Some(match self.rtt {
            Some(rtt) => (rtt * 7 + sample) / 8,
            None => sample,
        });
    }

    /// Packets older than this are not resent.
    pub fn max_age(&self) -> Duration {
        self.rtt.map_or(NACK_MAX_AGE, |rtt| NACK_MAX_AGE.max(rtt * 3))
    }

    /// The sequence numbers of `nack` still young enough to resend, as of `now`; `None`
    /// for a stream kept here no send times for.
    fn young(&self, nack: &TransportLayerNack, now: Instant) -> Option<Vec<u16>> {
        let max_age = u32::try_from(self.max_age().as_millis()).unwrap_or(u32::MAX);
        let now_ms = self.ms(now);
        let (_, ring) = self.sent.iter().find(|(s, _)| *s == nack.media_ssrc)?;
        let young = nack
            .nacks
            .iter()
            .flat_map(|p| p.packet_list())
            .filter(|seq| match ring.slots.get(*seq) {
                // (A send time after `now` wraps to far past 2³¹: young, as a saturating age would be.)
                Some(slot) if slot.seq() == Some(*seq) => {
                    let age = now_ms.wrapping_sub(slot.ms);
                    age <= max_age || age > 0x8000_0000
                }
                // Unknown here: the responder decides (it has no such packet either).
                _ => true,
            })
            .collect();
        Some(young)
    }

    /// Takes the packets sent too long ago out of the NACKs among `packets` (received
    /// now), dropping NACKs left empty; other RTCP stays.
    pub fn filter(&mut self, packets: &mut Vec<Box<dyn rtc::rtcp::Packet>>, now: Instant) {
        if !packets.iter().any(|p| p.as_any().is::<TransportLayerNack>()) {
            return;
        }
        let mut kept: Vec<Box<dyn rtc::rtcp::Packet>> = Vec::with_capacity(packets.len());
        for p in packets.drain(..) {
            // A NACK for a stream kept here no send times for (audio: none negotiated) is
            // the responder's to ignore; it spends no retransmission budget.
            let Some((nack, mut young)) = p.as_any().downcast_ref::<TransportLayerNack>().and_then(|n| Some((n, self.young(n, now)?))) else {
                kept.push(p);
                continue;
            };
            let asked = nack.nacks.iter().map(|n| n.packet_list().len()).sum::<usize>();
            self.refused += (asked - young.len().min(asked)) as u64;
            // Over budget: the newest are kept (the oldest are nearest their deadline).
            let granted = young.len().min((self.budget / SENT_PER_RESEND) as usize);
            self.over_budget += (young.len() - granted) as u64;
            young.drain(..young.len() - granted);
            self.budget -= granted as u32 * SENT_PER_RESEND;
            if !young.is_empty() {
                kept.push(Box::new(TransportLayerNack {
                    sender_ssrc: nack.sender_ssrc,
                    media_ssrc: nack.media_ssrc,
                    nacks: nack_pairs_from_sequence_numbers(&young),
                }));
            }
        }
        *packets = kept;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that negotiated NACK.
    fn video(ssrc: u32) -> rtc::interceptor::StreamInfo {
        rtc::interceptor::StreamInfo {
            ssrc,
            rtcp_feedback: vec![rtc::interceptor::RTCPFeedback { typ: "nack".into(), parameter: String::new() }],
            ..Default::default()
        }
    }

    /// The NACKed sequence numbers that pass the filter, as of `at`.
    fn passed(k: &mut NackLimit, ssrc: u32, seqs: &[u16], at: Instant) -> Vec<u16> {
        let nack = TransportLayerNack { sender_ssrc: 1, media_ssrc: ssrc, nacks: nack_pairs_from_sequence_numbers(seqs) };
        let mut packets: Vec<Box<dyn rtc::rtcp::Packet>> = vec![Box::new(nack)];
        k.filter(&mut packets, at);
        packets
            .iter()
            .filter_map(|p| p.as_any().downcast_ref::<TransportLayerNack>())
            .flat_map(|n| n.nacks.iter().flat_map(|p| p.packet_list()))
            .collect()
    }

    #[test]
    fn the_send_times_follow_the_packet_rate() {
        let t0 = Instant::now();
        let mut k = NackLimit::default();
        k.bind(&video(5));
        k.bind(&video(6));
        k.budget = RESEND_BURST * SENT_PER_RESEND;
        // 30 packets a second: a lap of 64 takes 2.1 s, the ring stays at 64.
        for seq in 0..300u16 {
            k.on_sent(5, seq, false, t0 + Duration::from_millis(u64::from(seq) * 1000 / 30));
        }
        // 400 a second (past the sequence numbers' wrap): it doubles up to 512, a lap of 1.28 s.
        let start = 65_000u16;
        for i in 0..1600u16 {
            k.on_sent(6, start.wrapping_add(i), false, t0 + Duration::from_micros(u64::from(i) * 2500));
        }
        let size = |ssrc: u32| k.sent.iter().find(|(s, _)| *s == ssrc).map(|(_, r)| r.slots.len());
        assert_eq!(size(5), Some(FIRST_SLOTS));
        assert_eq!(size(6), Some(SLOTS));
        // 4 s in: a packet sent 1.1 s before is still in the ring, and refused for its
        // age (in a ring of 64 it would be unknown and pass); one 0.5 s old passes.
        let at = t0 + Duration::from_millis(4000);
        let old = start.wrapping_add(1600 - 440);
        let young = start.wrapping_add(1600 - 200);
        assert_eq!(passed(&mut k, 6, &[old, young], at), [young]);
        assert_eq!(k.refused, 1);
    }

    #[test]
    fn old_packets_are_not_asked_again() {
        let mut k = NackLimit::default();
        k.bind(&video(5));
        let t0 = Instant::now();
        for seq in 0..20u16 {
            k.on_sent(5, seq, false, t0 + Duration::from_millis(u64::from(seq) * 100));
        }
        // A retransmission keeps the first send's time.
        k.on_sent(5, 3, true, t0 + Duration::from_millis(1900));
        // At 2.05 s: 0..=10 left more than a second ago; 11 and 15 are young; 700 was never sent here.
        let at = t0 + Duration::from_millis(2050);
        let nack = TransportLayerNack { sender_ssrc: 1, media_ssrc: 5, nacks: nack_pairs_from_sequence_numbers(&[2, 3, 11, 15, 700]) };
        let mut packets: Vec<Box<dyn rtc::rtcp::Packet>> = vec![Box::new(nack)];
        k.filter(&mut packets, at);
        let n = packets[0].as_any().downcast_ref::<TransportLayerNack>().unwrap();
        let seqs: Vec<u16> = n.nacks.iter().flat_map(|p| p.packet_list()).collect();
        assert_eq!(seqs, [11, 15, 700]);
        assert_eq!(k.refused, 2);
        // Only old ones: the NACK is dropped; another stream's NACK passes.
        let old = TransportLayerNack { sender_ssrc: 1, media_ssrc: 5, nacks: nack_pairs_from_sequence_numbers(&[1]) };
        let mut packets: Vec<Box<dyn rtc::rtcp::Packet>> = vec![Box::new(old)];
        k.filter(&mut packets, at);
        assert!(packets.is_empty());
        let other = TransportLayerNack { sender_ssrc: 1, media_ssrc: 9, nacks: nack_pairs_from_sequence_numbers(&[1]) };
        let mut packets: Vec<Box<dyn rtc::rtcp::Packet>> = vec![Box::new(other)];
        k.filter(&mut packets, at);
        assert_eq!(packets.len(), 1);
        // On a path of 650 ms round trip, 1.95 s is still young: 2 and 3 are resent.
        k.on_rtt(Duration::from_millis(650));
        assert_eq!(k.max_age(), Duration::from_millis(1950));
        // Smoothed: one sample of 50 ms moves it by an eighth of the difference.
        k.on_rtt(Duration::from_millis(50));
        assert_eq!(k.max_age(), Duration::from_millis(1725));
        k.on_rtt(Duration::from_millis(1175));
        assert_eq!(k.max_age(), Duration::from_millis(1950));
        let nack = TransportLayerNack { sender_ssrc: 1, media_ssrc: 5, nacks: nack_pairs_from_sequence_numbers(&[0, 2, 3]) };
        let mut packets: Vec<Box<dyn rtc::rtcp::Packet>> = vec![Box::new(nack)];
        k.filter(&mut packets, at);
        let n = packets[0].as_any().downcast_ref::<TransportLayerNack>().unwrap();
        assert_eq!(n.nacks.iter().flat_map(|p| p.packet_list()).collect::<Vec<_>>(), [2, 3]);
        // Unbound: nothing is refused any more.
        k.unbind(5);
        let nack = TransportLayerNack { sender_ssrc: 1, media_ssrc: 5, nacks: nack_pairs_from_sequence_numbers(&[1]) };
        let mut packets: Vec<Box<dyn rtc::rtcp::Packet>> = vec![Box::new(nack)];
        k.filter(&mut packets, at);
        assert_eq!(packets.len(), 1);
    }

    #[test]
    fn retransmissions_add_at_most_half_of_what_was_sent() {
        let mut k = NackLimit::default();
        k.bind(&video(5));
        let t0 = Instant::now();
        let seqs = |n: &[Box<dyn rtc::rtcp::Packet>]| -> Vec<u16> {
            n.iter()
                .filter_map(|p| p.as_any().downcast_ref::<TransportLayerNack>())
                .flat_map(|n| n.nacks.iter().flat_map(|p| p.packet_list()))
                .collect()
        };
        for seq in 0..10u16 {
            k.on_sent(5, seq, false, t0);
        }
        // Retransmissions do not add to the budget.
        k.on_sent(5, 0, true, t0);
        // Ten sent: five may be resent, the newest of those asked for.
        let nack = TransportLayerNack { sender_ssrc: 1, media_ssrc: 5, nacks: nack_pairs_from_sequence_numbers(&[1, 2, 3, 4, 5, 6, 7, 8]) };
        let mut packets: Vec<Box<dyn rtc::rtcp::Packet>> = vec![Box::new(nack)];
        k.filter(&mut packets, t0);
        assert_eq!(seqs(&packets), [4, 5, 6, 7, 8]);
        assert_eq!((k.over_budget, k.refused), (3, 0));
        // Spent: nothing until more is sent; four more sent allow two.
        let nack = TransportLayerNack { sender_ssrc: 1, media_ssrc: 5, nacks: nack_pairs_from_sequence_numbers(&[1, 2, 3]) };
        let mut packets: Vec<Box<dyn rtc::rtcp::Packet>> = vec![Box::new(nack.clone())];
        k.filter(&mut packets, t0);
        assert!(packets.is_empty());
        for seq in 10..14u16 {
            k.on_sent(5, seq, false, t0);
        }
        let mut packets: Vec<Box<dyn rtc::rtcp::Packet>> = vec![Box::new(nack)];
        k.filter(&mut packets, t0);
        assert_eq!(seqs(&packets), [2, 3]);
        // A long quiet stream saves up at most a burst of 100.
        for seq in 0..5_000u16 {
            k.on_sent(5, seq, false, t0);
        }
        let all: Vec<u16> = (4_000..4_300).collect();
        let mut packets: Vec<Box<dyn rtc::rtcp::Packet>> =
            vec![Box::new(TransportLayerNack { sender_ssrc: 1, media_ssrc: 5, nacks: nack_pairs_from_sequence_numbers(&all) })];
        k.filter(&mut packets, t0);
        assert_eq!(seqs(&packets), (4_200..4_300).collect::<Vec<_>>());
    }
}
