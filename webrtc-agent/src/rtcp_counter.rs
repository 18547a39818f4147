//! Counts the RTCP that webrtc-rs's interceptors consume before the application could see
//! it: NACKs from subscribers (answered from the NACK history), NACKs sent to publishers
//! (made by the NACK generator) and the receiver reports subscribers send, whose loss and
//! round-trip time become metrics. It counts in [`crate::wire::Wire`], wire-most in the
//! chain, so it sees every NACK a client sent (before the age limit refuses any) and every
//! NACK the generator made, and lets every packet pass unchanged. Round-trip times compare
//! the wall clock now with the wall-clock time our sender report carried, so a clock step
//! in between skews one sample (bounded by the plausibility check). Counting is per RTCP
//! packet (a few per second per stream), never per media packet.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::reception_report::ReceptionReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;

/// Totals since start, shared by every connection of the agent.
#[derive(Debug, Default)]
pub struct RtcpCounters {
    /// NACK packets received (from subscribers).
    pub nacks_in: AtomicU64,
    /// Media packets those NACKs asked for again.
    pub nacked_packets: AtomicU64,
    /// NACK packets sent (to publishers).
    pub nacks_out: AtomicU64,
    /// Report blocks received in receiver reports.
    pub reports: AtomicU64,
    /// Sum of their `fraction lost`, in 1/256.
    pub fraction_lost_256: AtomicU64,
    /// Report blocks that allowed a round-trip time (they echo one of our sender reports).
    pub rtt_samples: AtomicU64,
    /// Sum of those round-trip times, in microseconds.
    pub rtt_us: AtomicU64,
    /// Publishers' retransmissions that came over RTX and were restored to their stream
    /// (a simulcast layer's or a declared flow's; [`crate::rtx_in`]; per such packet).
    pub rtx_repairs: AtomicU64,
}

impl RtcpCounters {
    /// Counts RTCP received from a client; returns the round-trip time (µs) of the last
    /// report block among them that echoes one of our sender reports.
    pub fn count_read(&self, packets: &[Box<dyn rtc::rtcp::Packet>]) -> Option<u64> {
        let mut rtt = None;
        for p in packets {
            let any = p.as_any();
            if let Some(n) = any.downcast_ref::<TransportLayerNack>() {
                self.nacks_in.fetch_add(1, Relaxed);
                self.nacked_packets.fetch_add(nacked(n), Relaxed);
            } else if let Some(rr) = any.downcast_ref::<ReceiverReport>() {
                rtt = count_reports(self, &rr.reports).or(rtt);
            } else if let Some(sr) = any.downcast_ref::<SenderReport>() {
                // A client that also sends (a publisher subscribing on the same
                // transport) reports what it receives in its sender reports.
                rtt = count_reports(self, &sr.reports).or(rtt);
            }
        }
        rtt
    }

    /// Counts RTCP sent to a client.
    pub fn count_written(&self, packets: &[Box<dyn rtc::rtcp::Packet>]) {
        let n = packets.iter().filter(|p| p.as_any().is::<TransportLayerNack>()).count();
        if n > 0 {
            self.nacks_out.fetch_add(n as u64, Relaxed);
        }
    }
}

/// Packets a NACK asks for: one per pair plus one per set bit of its bitmask.
fn nacked(n: &TransportLayerNack) -> u64 {
    n.nacks.iter().map(|p| 1 + u64::from(p.lost_packets.count_ones())).sum()
}

/// The middle 32 bits of the NTP time now, the unit of RTCP's LSR and DLSR (1/65536 s).
fn compact_ntp_now() -> u32 {
    const NTP_UNIX_OFFSET: u64 = 0x83AA_7E80;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs().wrapping_add(NTP_UNIX_OFFSET);
    let frac16 = (u64::from(now.subsec_nanos()) << 16) / 1_000_000_000;
    (((secs & 0xFFFF) << 16) | frac16) as u32
}

/// RFC 3550 §6.4.1: RTT = now − LSR − DLSR, for a block that echoes a sender report.
/// `None` without one, or for an implausible result (a clock step, a bogus client).
fn round_trip_us(now: u32, last_sender_report: u32, delay: u32) -> Option<u64> {
    if last_sender_report == 0 {
        return None;
    }
    let units = now.wrapping_sub(last_sender_report).wrapping_sub(delay);
    // Ten seconds is far beyond any real path; beyond it the subtraction wrapped.
    (units < 10 * 65_536).then(|| u64::from(units) * 1_000_000 / 65_536)
}

/// Counts `reports`; the round-trip time (µs) of the last one that allows one.
fn count_reports(c: &RtcpCounters, reports: &[ReceptionReport]) -> Option<u64> {
    if reports.is_empty() {
        return None;
    }
    let now = compact_ntp_now();
    let mut last = None;
    for r in reports {
        c.reports.fetch_add(1, Relaxed);
        c.fraction_lost_256.fetch_add(u64::from(r.fraction_lost), Relaxed);
        if let Some(us) = round_trip_us(now, r.last_sender_report, r.delay) {
            c.rtt_samples.fetch_add(1, Relaxed);
            c.rtt_us.fetch_add(us, Relaxed);
            last = Some(us);
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_from_lsr_and_dlsr() {
        // Sent at 1.0 s, held 0.25 s by the client, back at 1.3 s: 50 ms.
        let (lsr, dlsr, now) = (65_536, 16_384, 65_536 + 16_384 + 3_277);
        let us = round_trip_us(now, lsr, dlsr).unwrap();
        assert!((49_000..=51_000).contains(&us), "{us}");
        assert_eq!(round_trip_us(now, 0, dlsr), None, "no sender report echoed");
        assert_eq!(round_trip_us(lsr, now, 0), None, "wrapped: implausible");
        // Across the 16-bit seconds wrap: 6554 units of 1/65536 s.
        assert_eq!(round_trip_us(100, u32::MAX - 6_453, 0), Some(100_006));
    }

    #[test]
    fn receiver_reports_are_counted_and_give_the_round_trip() {
        let c = RtcpCounters::default();
        // Our sender report left 0.2 s ago; the client held it 0.05 s.
        let block = |lsr: u32| ReceptionReport { ssrc: 5, fraction_lost: 64, last_sender_report: lsr, delay: 3_277, ..Default::default() };
        let sent = compact_ntp_now().wrapping_sub(13_107);
        let rr = ReceiverReport { ssrc: 1, reports: vec![block(0), block(sent)], ..Default::default() };
        let nack = TransportLayerNack {
            sender_ssrc: 1,
            media_ssrc: 5,
            nacks: rtc::rtcp::transport_feedbacks::transport_layer_nack::nack_pairs_from_sequence_numbers(&[1, 2, 3]),
        };
        let packets: Vec<Box<dyn rtc::rtcp::Packet>> = vec![Box::new(rr), Box::new(nack)];
        let rtt = c.count_read(&packets).unwrap();
        assert!((145_000..=170_000).contains(&rtt), "{rtt}");
        assert_eq!((c.reports.load(Relaxed), c.fraction_lost_256.load(Relaxed), c.rtt_samples.load(Relaxed)), (2, 128, 1));
        assert_eq!((c.nacks_in.load(Relaxed), c.nacked_packets.load(Relaxed)), (1, 3));
        // A block that echoes no sender report gives no round trip.
        let rr = ReceiverReport { ssrc: 1, reports: vec![block(0)], ..Default::default() };
        assert_eq!(c.count_read(&[Box::new(rr) as Box<dyn rtc::rtcp::Packet>]), None);
        c.count_written(&packets);
        assert_eq!(c.nacks_out.load(Relaxed), 1);
    }
}
