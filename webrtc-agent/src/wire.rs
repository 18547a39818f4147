//! Tessera's own interceptor, wire-most in each connection's chain: the keyframe-request
//! tap ([`crate::feedback`]), the RTCP counters ([`crate::rtcp_counter`]), the NACK age
//! limit ([`crate::nack_age`]) and the send side of the bandwidth estimate
//! ([`crate::bwe::SendSide`]) in one link of rtc's chain.
//!
//! Why one: rtc's chain hands each packet (a ~220-byte struct) to every interceptor by
//! value, which queues it and gives it back, so every interceptor costs several copies
//! of every packet in both directions whether it looks at the packet or not. As five
//! interceptors (rtc's TWCC sender and congestion controller among them, whose send
//! history keeps three hash maps per packet) they cost more CPU per forwarded packet
//! than SRTP did (docs/performance.md, "Simulcast").
//!
//! Wire-most is where each part belongs: NACKs are counted as the client sent them and
//! filtered before the NACK responder sees them; NACKs the generator made are counted as
//! they leave; transport-wide numbers are given after every generator (retransmissions
//! included), in the order packets reach the wire.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rtc::interceptor::{Attribute, AttributedPacket, Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtp;
use rtc::sansio::Protocol;
use rtc::shared::TransportContext;
use rtc::shared::error::Error;

use crate::bwe::SendSide;
use crate::feedback::{deliverable, keyframe_requests};
use crate::nack_age::NackLimit;
use crate::rtcp_counter::RtcpCounters;

/// The interceptor (see the module docs); one per connection.
pub struct Wire {
    counters: Arc<RtcpCounters>,
    ages: NackLimit,
    /// With `webrtc.bandwidth_estimation`.
    send_side: Option<SendSide>,
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
    /// Scratch for a probe train ([`crate::probe`]).
    train: Vec<rtc::rtp::Packet>,
}

impl Wire {
    /// An RTP packet going out: its age noted, numbered for the estimator, and a probe
    /// train made to follow it when one is due (see [`Self::queue_train`]).
    fn note_rtp(&mut self, p: &mut rtp::Packet, retransmission: bool, now: Instant) {
        self.ages.on_sent(p.header.ssrc, p.header.sequence_number, retransmission, now);
        if let Some(s) = &mut self.send_side {
            s.on_write(p, now);
            if !retransmission {
                s.probe_train(p, now, &mut self.train);
            }
        }
    }

    /// Queues the probe train [`Self::note_rtp`] made, numbered, back to back behind the
    /// packet that started it: the train the estimate reads.
    fn queue_train(&mut self, now: Instant, transport: TransportContext) {
        for mut probe in self.train.drain(..) {
            if let Some(s) = &mut self.send_side {
                s.on_write(&mut probe, now);
            }
            self.write.push_back(TaggedPacket { now, transport, message: AttributedPacket::new(Packet::Rtp(probe)).with(Attribute::Retransmission) });
        }
    }

    /// A media packet the worker sends itself (`Stack::send_rtp`), by reference: what
    /// [`Protocol::handle_write`] does to it, without queueing it. Returns whether a probe
    /// train now waits in the queue for rtc's next write.
    pub fn send_direct(&mut self, p: &mut rtp::Packet, now: Instant, transport: TransportContext) -> bool {
        self.note_rtp(p, false, now);
        self.queue_train(now, transport);
        !self.write.is_empty()
    }

    /// What it counts into.
    pub fn counters(&self) -> &Arc<RtcpCounters> {
        &self.counters
    }

    /// Counting into `counters`, estimating with `send_side` if given.
    pub fn new(counters: Arc<RtcpCounters>, send_side: Option<SendSide>) -> Self {
        Wire { counters, ages: NackLimit::default(), send_side, read: VecDeque::new(), write: VecDeque::new(), train: Vec::new() }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for Wire {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &mut msg.message.packet
            && !packets.is_empty()
        {
            if let Some(us) = self.counters.count_read(packets) {
                self.ages.on_rtt(Duration::from_micros(us));
            }
            if let Some(requests) = keyframe_requests(packets) {
                self.read.push_back(deliverable(requests, msg.now, msg.transport));
            }
            if let Some(s) = &mut self.send_side {
                s.on_read(packets, msg.now);
            }
            self.ages.filter(packets, msg.now);
            // Only NACKs refused for their age were in it: nothing left to pass on (an
            // empty compound packet means something else to rtc).
            if packets.is_empty() {
                return Ok(());
            }
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        crate::stack::next_of(&mut self.read)
    }

    fn handle_write(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        let retransmission = msg.message.has(&Attribute::Retransmission);
        match &mut msg.message.packet {
            Packet::Rtp(p) => self.note_rtp(p, retransmission, msg.now),
            Packet::Rtcp(packets) => self.counters.count_written(packets),
            _ => {}
        }
        let (now, transport) = (msg.now, msg.transport);
        self.write.push_back(msg);
        self.queue_train(now, transport);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        crate::stack::next_of(&mut self.write)
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Self::Error> {
        if let Some(s) = &mut self.send_side {
            s.handle_timeout(now);
        }
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.send_side.as_ref().and_then(SendSide::poll_timeout)
    }
}

impl Interceptor for Wire {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.ages.bind(info);
        if let Some(s) = &mut self.send_side {
            s.bind(info);
        }
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.ages.unbind(info.ssrc);
        if let Some(s) = &mut self.send_side {
            s.unbind(info.ssrc);
        }
    }
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
impl Wire {
    /// Packets its queues have room for (a test of `crate::stack::next_of`).
    pub(crate) fn queued_room(&self) -> usize {
        self.read.capacity() + self.write.capacity()
    }
}
