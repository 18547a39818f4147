//! Retransmission requests for packets sent too long ago are not answered. A client
//! behind a congested link asks again for what the link dropped, long after: the
//! retransmissions then queue behind everything else on the same link and keep it
//! congested after the server has already moved the client to a lower layer (measured
//! with Chromium behind a 450 kbit/s shaper: 60 % loss on the lowest layer for 5 s after
//! the move, from retransmissions of the top layer's packets). Past [`NACK_MAX_AGE`] a
//! repaired packet would come too late for the receiver's jitter buffer anyway.
//!
//! The interceptor sits wire-ward of webrtc-rs's NACK responder: on the write path it
//! notes when each packet of this connection's streams first left, on the read path it
//! takes the sequence numbers that are too old out of each NACK before the responder
//! sees it (a NACK left empty is dropped).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rtc::interceptor::{Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp::transport_feedbacks::transport_layer_nack::{TransportLayerNack, nack_pairs_from_sequence_numbers};
use rtc::sansio::Protocol;
use rtc::shared::error::Error;

/// Packets sent longer ago than this are not retransmitted.
pub const NACK_MAX_AGE: Duration = Duration::from_millis(1000);
/// Send times kept per stream (as many as the responder's history, and more).
const SLOTS: usize = 512;

/// The interceptor (see the module docs).
#[derive(Default)]
pub struct NackAgeLimit {
    /// Per sending SSRC: (sequence number, first sent) by sequence number modulo [`SLOTS`].
    sent: HashMap<u32, Vec<Option<(u16, Instant)>>>,
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
    /// NACKed packets refused for their age (for tests and logs).
    pub refused: u64,
}

impl NackAgeLimit {
    /// The sequence numbers of `nack` still young enough to resend, as of `now`.
    fn young(&self, nack: &TransportLayerNack, now: Instant) -> Vec<u16> {
        let Some(ring) = self.sent.get(&nack.media_ssrc) else { return nack.nacks.iter().flat_map(|p| p.packet_list()).collect() };
        nack.nacks
            .iter()
            .flat_map(|p| p.packet_list())
            .filter(|seq| match ring.get(usize::from(*seq) % SLOTS) {
                Some(Some((s, at))) if s == seq => now.saturating_duration_since(*at) <= NACK_MAX_AGE,
                // Unknown here: the responder decides (it has no such packet either).
                _ => true,
            })
            .collect()
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for NackAgeLimit {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &mut msg.message.packet
            && packets.iter().any(|p| p.as_any().is::<TransportLayerNack>())
        {
            let now = msg.now;
            let mut kept: Vec<Box<dyn rtc::rtcp::Packet>> = Vec::with_capacity(packets.len());
            for p in packets.drain(..) {
                let Some(nack) = p.as_any().downcast_ref::<TransportLayerNack>() else {
                    kept.push(p);
                    continue;
                };
                let asked = nack.nacks.iter().map(|n| n.packet_list().len()).sum::<usize>();
                let young = self.young(nack, now);
                self.refused += (asked - young.len().min(asked)) as u64;
                if !young.is_empty() {
                    kept.push(Box::new(TransportLayerNack {
                        sender_ssrc: nack.sender_ssrc,
                        media_ssrc: nack.media_ssrc,
                        nacks: nack_pairs_from_sequence_numbers(&young),
                    }));
                }
            }
            if kept.is_empty() {
                return Ok(());
            }
            *packets = kept;
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtp(p) = &msg.message.packet
            && let Some(ring) = self.sent.get_mut(&p.header.ssrc)
            && let Some(slot) = ring.get_mut(usize::from(p.header.sequence_number) % SLOTS)
        {
            let seq = p.header.sequence_number;
            // A retransmission on the stream's own SSRC keeps the first send's time.
            if !matches!(slot, Some((s, _)) if *s == seq) {
                *slot = Some((seq, msg.now));
            }
        }
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write.pop_front()
    }
}

impl Interceptor for NackAgeLimit {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.sent.insert(info.ssrc, vec![None; SLOTS]);
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.sent.remove(&info.ssrc);
    }
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::interceptor::AttributedPacket;
    use rtc::shared::TransportContext;

    fn tagged(packet: Packet, now: Instant) -> TaggedPacket {
        TaggedPacket { now, transport: TransportContext::default(), message: AttributedPacket::new(packet) }
    }

    #[test]
    fn old_packets_are_not_asked_again() {
        let mut k = NackAgeLimit::default();
        k.bind_local_stream(&StreamInfo { ssrc: 5, ..Default::default() });
        let t0 = Instant::now();
        for seq in 0..20u16 {
            let p = rtc::rtp::Packet {
                header: rtc::rtp::Header { version: 2, ssrc: 5, sequence_number: seq, ..Default::default() },
                payload: vec![0; 4].into(),
            };
            k.handle_write(tagged(Packet::Rtp(p), t0 + Duration::from_millis(u64::from(seq) * 100))).unwrap();
            while k.poll_write().is_some() {}
        }
        // At 2.05 s: 0..=10 left more than a second ago; 11 and 15 are young; 700 was never sent here.
        let nack = TransportLayerNack { sender_ssrc: 1, media_ssrc: 5, nacks: nack_pairs_from_sequence_numbers(&[2, 3, 11, 15, 700]) };
        k.handle_read(tagged(Packet::Rtcp(vec![Box::new(nack)]), t0 + Duration::from_millis(2050))).unwrap();
        let out = k.poll_read().unwrap();
        let Packet::Rtcp(packets) = &out.message.packet else { panic!("not RTCP") };
        let n = packets[0].as_any().downcast_ref::<TransportLayerNack>().unwrap();
        let seqs: Vec<u16> = n.nacks.iter().flat_map(|p| p.packet_list()).collect();
        assert_eq!(seqs, [11, 15, 700]);
        assert_eq!(k.refused, 2);
        // Only old ones: the NACK is dropped; another stream's NACK passes.
        let old = TransportLayerNack { sender_ssrc: 1, media_ssrc: 5, nacks: nack_pairs_from_sequence_numbers(&[1]) };
        k.handle_read(tagged(Packet::Rtcp(vec![Box::new(old)]), t0 + Duration::from_millis(2050))).unwrap();
        assert!(k.poll_read().is_none());
        let other = TransportLayerNack { sender_ssrc: 1, media_ssrc: 9, nacks: nack_pairs_from_sequence_numbers(&[1]) };
        k.handle_read(tagged(Packet::Rtcp(vec![Box::new(other)]), t0 + Duration::from_millis(2050))).unwrap();
        assert!(k.poll_read().is_some());
    }
}
