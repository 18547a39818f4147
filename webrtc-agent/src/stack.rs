//! A connection's interceptors as one link of rtc's chain, so that a forwarded packet
//! meets only those that look at it.
//!
//! rtc's chain walks every packet through every interceptor, by value: each takes it onto
//! its queue and gives it back, several copies of a ~220-byte struct per interceptor
//! whether it looks at the packet or not (docs/performance.md, "Where the CPU goes"). Of
//! the six a server connection has, three look at the RTP it sends: the sender reports
//! (counts), the NACK responder (history) and [`Wire`] (NACK ages, transport-wide
//! numbers, probes). The NACK generator, the TWCC receiver and the receiver reports only
//! read what arrives; on the way out they pass everything untouched. So here an RTP packet
//! going out visits those three and nothing else; an RTP packet coming in visits only
//! those other three (the first three pass incoming RTP untouched); and everything else
//! (RTCP either way, what an interceptor generates on a timer or in answer to feedback)
//! takes the whole walk in rtc's own order, as its chain would.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rtc::interceptor::{
    Attribute, Interceptor, NackGeneratorInterceptor, Packet, ReceiverReportInterceptor, StreamInfo, TaggedPacket, TwccReceiverInterceptor,
};
use rtc::sansio::Protocol;
use rtc::shared::error::Error;
use tracing::debug;

use crate::responder::Responder;
use crate::rtx_in::RtxIn;
use crate::sender_reports::SenderReports;
use crate::wire::Wire;

/// The interceptors (see the module docs), in rtc's slot order.
pub struct Stack {
    /// Ahead of them all: publishers' RTX restored to the stream it repairs.
    rtx_in: RtxIn,
    wire: Wire,
    nack_responder: Responder,
    nack_generator: NackGeneratorInterceptor,
    twcc_receiver: TwccReceiverInterceptor,
    receiver_reports: ReceiverReportInterceptor,
    sender_reports: SenderReports,
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
    /// Reused between walks.
    belt: VecDeque<TaggedPacket>,
    /// An interceptor may hold packets of its own going out (generated on a timer, or in
    /// answer to what arrived) that only a whole walk collects...
    pending_writes: bool,
    /// ...or, after a timer, coming in.
    pending_reads: bool,
    /// Whether a stream the connection receives was ever bound. Until then the three that
    /// read arrivals hold nothing, make nothing and pass everything on as it came, so a
    /// walk skips them: each would otherwise keep two queues grown for the walk (~1.7 KB a
    /// connection that only sends, as a subscriber's does).
    receives: bool,
}

/// A direction of a walk.
#[derive(Clone, Copy)]
enum Way {
    /// Network to application: wire-most first.
    Read,
    /// Application to network: wire-most last.
    Write,
}

impl Stack {
    /// The link for one connection.
    pub fn new(
        wire: Wire,
        nack_responder: Responder,
        nack_generator: NackGeneratorInterceptor,
        twcc_receiver: TwccReceiverInterceptor,
        receiver_reports: ReceiverReportInterceptor,
        sender_reports: SenderReports,
    ) -> Self {
        Stack {
            rtx_in: RtxIn::new(wire.counters().clone()),
            wire,
            nack_responder,
            nack_generator,
            twcc_receiver,
            receiver_reports,
            sender_reports,
            read: VecDeque::new(),
            write: VecDeque::new(),
            belt: VecDeque::new(),
            pending_writes: false,
            pending_reads: false,
            receives: false,
        }
    }

    /// Every interceptor, wire-most first (rtc's slots: congestion control, NACK responder,
    /// NACK generator, TWCC receiver, receiver reports, sender reports), each with whether
    /// it only reads what arrives (passing everything going out untouched) or, like the
    /// other three, passes incoming RTP untouched.
    fn all(&mut self) -> [(&mut dyn Interceptor, bool); 6] {
        [
            (&mut self.wire, false),
            (&mut self.nack_responder, false),
            (&mut self.nack_generator, true),
            (&mut self.twcc_receiver, true),
            (&mut self.receiver_reports, true),
            (&mut self.sender_reports, false),
        ]
    }

    /// Walks `msg` (or nothing, to collect what the interceptors hold) through them, as
    /// rtc's chain does: each takes what is on the belt, and what it gives out (passed on,
    /// or its own) goes on to the next. An RTP packet meets only the three that look at it
    /// going its way (see the module docs).
    fn walk(&mut self, msg: Option<TaggedPacket>, way: Way) {
        let rtp = msg.as_ref().is_some_and(|m| matches!(m.message.packet, Packet::Rtp(_)));
        let reading = matches!(way, Way::Read);
        let receives = self.receives;
        let mut belt = std::mem::take(&mut self.belt);
        belt.extend(msg);
        let mut all = self.all();
        if !reading {
            all.reverse();
        }
        for (interceptor, reads_arrivals) in all {
            if (rtp && reads_arrivals != reading) || (reads_arrivals && !receives) {
                continue;
            }
            pass(interceptor, &mut belt, way);
        }
        match way {
            Way::Read => self.read.extend(belt.drain(..)),
            Way::Write => self.write.extend(belt.drain(..)),
        }
        self.belt = belt;
    }

    /// An RTP packet Tessera sends itself, past rtc's pipeline (`crate::srtp_out`): it
    /// meets what it would have met going out through rtc (sender report counts, the NACK
    /// history, [`Wire`]'s ages and numbers) and comes back as it would have reached the
    /// wire. Anything else the walk gives out waits for rtc's next write as usual. Not for
    /// a stream that [`Stack::resends_in_place`].
    pub fn send_rtp(&mut self, msg: TaggedPacket) -> Option<TaggedPacket> {
        let Packet::Rtp(p) = &msg.message.packet else { return None };
        if self.write.is_empty() && !self.pending_writes && !msg.message.has(&Attribute::Retransmission) {
            // Nothing waits anywhere in the stack (interceptors give out packets of their
            // own only after a timer or an arrival, which set `pending_writes`), so there is
            // no order to keep: the three that look at RTP going out see it by reference,
            // in the walk's order, and it is not moved through their queues.
            let TaggedPacket { now, transport, mut message } = msg;
            let Packet::Rtp(p) = &mut message.packet else { return None };
            self.sender_reports.on_send(now, p);
            self.nack_responder.on_send(now, p);
            if self.wire.send_direct(p, now, transport) {
                self.pending_writes = true;
            }
            return Some(TaggedPacket { now, transport, message });
        }
        let (ssrc, seq) = (p.header.ssrc, p.header.sequence_number);
        let held = self.write.len();
        self.walk(Some(msg), Way::Write);
        // The packet itself, not what the walk made beside it (a probe train on the RTX
        // stream follows it out of `Wire`): those go through rtc with every other packet
        // of their stream.
        let at = (held..self.write.len()).find(|&i| {
            self.write.get(i).is_some_and(|m| matches!(&m.message.packet, Packet::Rtp(q) if q.header.ssrc == ssrc && q.header.sequence_number == seq))
        })?;
        self.write.remove(at)
    }

    /// The RTX payload types of the simulcast m-lines the connection receives, each with
    /// the payload type it repairs: their packets are restored to their layer
    /// ([`crate::rtx_in`]).
    pub fn set_layer_rtx(&mut self, apt: Vec<(u8, u8)>) {
        self.rtx_in.set_layer_rtx(apt);
    }

    /// Whether anything waits to go out through rtc's next write (what a walk made beside a
    /// packet, or what an interceptor holds for a whole walk to collect).
    pub fn holds_output(&self) -> bool {
        !self.write.is_empty() || self.pending_writes
    }

    /// Whether lost packets of stream `ssrc` are sent again as they were (NACK without
    /// RTX): those resends leave through rtc's SRTP context, so the stream must go through
    /// rtc whole (one SSRC is never encrypted by two contexts).
    pub fn resends_in_place(&self, ssrc: u32) -> bool {
        self.nack_responder.resends_in_place(ssrc)
    }
}

/// A [`Stack`] shared between rtc's chain and the worker that owns the connection, for the
/// packets the worker sends itself. Only that worker's thread ever takes the lock (rtc
/// runs the chain on it too), so it is never contended; rtc asks its interceptors to be
/// `Send + Sync`, which is why it is a lock at all.
#[derive(Clone)]
pub struct SharedStack(pub Arc<Mutex<Stack>>);

impl SharedStack {
    /// Shares `stack`.
    pub fn new(stack: Stack) -> Self {
        SharedStack(Arc::new(Mutex::new(stack)))
    }

    fn with<R>(&self, f: impl FnOnce(&mut Stack) -> R) -> Option<R> {
        self.0.lock().ok().map(|mut s| f(&mut s))
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for SharedStack {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.with(|s| s.handle_read(msg)).unwrap_or(Ok(()))
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.with(|s| s.poll_read()).flatten()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.with(|s| s.handle_write(msg)).unwrap_or(Ok(()))
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.with(|s| s.poll_write()).flatten()
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Self::Error> {
        self.with(|s| s.handle_timeout(now)).unwrap_or(Ok(()))
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.with(|s| s.poll_timeout()).flatten()
    }

    fn close(&mut self) -> Result<(), Self::Error> {
        self.with(|s| s.close()).unwrap_or(Ok(()))
    }
}

impl Interceptor for SharedStack {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.with(|s| s.bind_local_stream(info));
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.with(|s| s.unbind_local_stream(info));
    }
    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        self.with(|s| s.bind_remote_stream(info));
    }
    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        self.with(|s| s.unbind_remote_stream(info));
    }
}

/// The next packet of one of Tessera's interceptors' queues; a drained queue lets its room
/// go. Such a queue holds packets only during a walk (or from a timer or an arrival to the
/// next walk), and RTP going out passes it only on the slow path (retransmissions, what
/// waits behind them), incoming RTP never; kept, its room for four ~220-byte packets
/// stayed with every connection once any RTCP had passed (~2.7 KB a subscriber with three
/// such interceptors), where giving it back costs an allocation per walk that uses it.
pub(crate) fn next_of(queue: &mut VecDeque<TaggedPacket>) -> Option<TaggedPacket> {
    let next = queue.pop_front();
    if next.is_none() && queue.capacity() > 0 {
        *queue = VecDeque::new();
    }
    next
}

/// Hands everything on the belt to `interceptor`, and puts what it gives out on the belt.
fn pass(interceptor: &mut dyn Interceptor, belt: &mut VecDeque<TaggedPacket>, way: Way) {
    while let Some(next) = belt.pop_front() {
        let handled = match way {
            Way::Read => interceptor.handle_read(next),
            Way::Write => interceptor.handle_write(next),
        };
        if let Err(e) = handled {
            debug!(error = %e, "an interceptor refused a packet");
        }
    }
    loop {
        let out = match way {
            Way::Read => interceptor.poll_read(),
            Way::Write => interceptor.poll_write(),
        };
        let Some(out) = out else { break };
        belt.push_back(out);
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for Stack {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtp(p) = &mut msg.message.packet {
            self.rtx_in.read(p);
        }
        // The NACK responder answers a NACK with retransmissions: they wait in it for the
        // next whole write walk. (None of the three an RTP packet meets makes a packet as it
        // reads.)
        if !matches!(msg.message.packet, Packet::Rtp(_)) {
            self.pending_writes = true;
        }
        self.walk(Some(msg), Way::Read);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        if self.read.is_empty() && std::mem::take(&mut self.pending_reads) {
            self.walk(None, Way::Read);
        }
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.walk(Some(msg), Way::Write);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        if self.write.is_empty() && std::mem::take(&mut self.pending_writes) {
            self.walk(None, Way::Write);
        }
        self.write.pop_front()
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Self::Error> {
        // Set first: what an interceptor made before another's timer failed is still
        // collected (the direct path of `send_rtp` trusts the flag).
        self.pending_writes = true;
        self.pending_reads = true;
        for (interceptor, _) in self.all() {
            interceptor.handle_timeout(now)?;
        }
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.all().into_iter().filter_map(|(i, _)| i.poll_timeout()).min()
    }

    fn close(&mut self) -> Result<(), Self::Error> {
        for (interceptor, _) in self.all() {
            interceptor.close()?;
        }
        self.pending_writes = true;
        self.pending_reads = true;
        Ok(())
    }
}

impl Interceptor for Stack {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        for (interceptor, _) in self.all() {
            interceptor.bind_local_stream(info);
        }
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        for (interceptor, _) in self.all() {
            interceptor.unbind_local_stream(info);
        }
    }
    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        self.receives = true;
        self.rtx_in.bind(info);
        for (interceptor, _) in self.all() {
            interceptor.bind_remote_stream(info);
        }
    }
    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        self.rtx_in.unbind(info.ssrc);
        for (interceptor, _) in self.all() {
            interceptor.unbind_remote_stream(info);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use rtc::interceptor::{
        AttributedPacket, NackGeneratorBuilder, NackResponderBuilder, RTCPFeedback, RTPHeaderExtension, ReceiverReportBuilder, Registry,
        SenderReportBuilder, Slot, TwccReceiverBuilder,
    };
    use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
    use rtc::rtcp::transport_feedbacks::transport_layer_nack::{TransportLayerNack, nack_pairs_from_sequence_numbers};
    use rtc::sdp::extmap::TRANSPORT_CC_URI;
    use rtc::shared::TransportContext;
    use rtc::shared::marshal::Marshal;

    use super::*;
    use crate::rtcp_counter::RtcpCounters;

    /// With `webrtc.bandwidth_estimation`, a connection's send side once its estimate is at
    /// work and probing (transport-wide numbers on everything sent, RTX numbering shared by
    /// probes and retransmissions).
    fn send_side(estimating: bool) -> Option<crate::bwe::SendSide> {
        let estimate = Arc::new(crate::bwe::Estimate::default());
        estimate.enable();
        estimate.set_probing(true);
        let estimator = crate::bwe::SubscriberEstimator::new(1_000_000.0, 30_000.0, 3_000_000.0, estimate.clone());
        estimating.then(|| crate::bwe::SendSide::new(estimator, estimate))
    }

    /// The stack as the server's connections have it: the one link of rtc's chain (which
    /// ends every chain with its terminus for inbound RTCP).
    fn stack(estimating: bool) -> impl Interceptor {
        Registry::new().with(Slot::CongestionControl, new_stack(estimating)).build()
    }

    fn new_stack(estimating: bool) -> Stack {
        Stack::new(
            Wire::new(Arc::new(RtcpCounters::default()), send_side(estimating)),
            crate::responder::Responder::new(256),
            NackGeneratorBuilder::new().build(),
            TwccReceiverBuilder::new().build(),
            ReceiverReportBuilder::new().build(),
            SenderReports::new(crate::sender_reports::INTERVAL),
        )
    }

    /// The stack with every RTP packet going out sent past rtc's pipeline, as the worker
    /// sends forwarded media (`Stack::send_rtp`): what comes back is what leaves.
    struct Bypassed {
        stack: Stack,
        sent: VecDeque<TaggedPacket>,
    }

    impl Protocol<TaggedPacket, TaggedPacket, ()> for Bypassed {
        type Rout = TaggedPacket;
        type Wout = TaggedPacket;
        type Eout = ();
        type Error = Error;
        type Time = Instant;
        fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Error> {
            self.stack.handle_read(msg)
        }
        fn poll_read(&mut self) -> Option<TaggedPacket> {
            self.stack.poll_read()
        }
        fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Error> {
            if let Packet::Rtp(p) = &msg.message.packet
                && !self.stack.resends_in_place(p.header.ssrc)
            {
                let (ssrc, seq) = (p.header.ssrc, p.header.sequence_number);
                let sent = self.stack.send_rtp(msg);
                // What comes back is the packet itself (never a probe made beside it).
                assert!(
                    matches!(&sent, Some(m) if matches!(&m.message.packet, Packet::Rtp(q) if q.header.ssrc == ssrc && q.header.sequence_number == seq)),
                    "send_rtp gave back another packet than {ssrc}/{seq}"
                );
                self.sent.extend(sent);
                return Ok(());
            }
            self.stack.handle_write(msg)
        }
        fn poll_write(&mut self) -> Option<TaggedPacket> {
            self.sent.pop_front().or_else(|| self.stack.poll_write())
        }
        fn handle_timeout(&mut self, now: Instant) -> Result<(), Error> {
            self.stack.handle_timeout(now)
        }
        fn poll_timeout(&mut self) -> Option<Instant> {
            self.stack.poll_timeout()
        }
        fn close(&mut self) -> Result<(), Error> {
            self.stack.close()
        }
    }

    impl Interceptor for Bypassed {
        fn bind_local_stream(&mut self, info: &StreamInfo) {
            self.stack.bind_local_stream(info);
        }
        fn unbind_local_stream(&mut self, info: &StreamInfo) {
            self.stack.unbind_local_stream(info);
        }
        fn bind_remote_stream(&mut self, info: &StreamInfo) {
            self.stack.bind_remote_stream(info);
        }
        fn unbind_remote_stream(&mut self, info: &StreamInfo) {
            self.stack.unbind_remote_stream(info);
        }
    }

    fn bypassed(estimating: bool) -> impl Interceptor {
        Registry::new().with(Slot::CongestionControl, Bypassed { stack: new_stack(estimating), sent: VecDeque::new() }).build()
    }

    /// A stream whose losses are sent again as they were (NACK without RTX) goes through
    /// rtc whole: its resends leave through rtc's SRTP context.
    #[test]
    fn a_stream_resent_in_place_is_not_sent_past_rtc() {
        let (mut s, now) = (new_stack(false), Instant::now());
        s.bind_local_stream(&stream(10, Some(11)));
        s.bind_local_stream(&stream(20, None));
        let mut audio = stream(30, None);
        audio.rtcp_feedback.clear();
        s.bind_local_stream(&audio);
        assert!(!s.resends_in_place(10), "RTX repairs stream 10");
        assert!(!s.resends_in_place(30), "stream 30 is never resent");
        assert!(s.resends_in_place(20), "stream 20 is resent in place");
        assert!(s.send_rtp(tagged(rtp(10, 1), now)).is_some());
    }

    /// A walk leaves Tessera's interceptors' queues without room: they hold packets only
    /// within it (or from a timer to it), and every connection would keep what they grew.
    #[test]
    fn drained_queues_keep_no_room() {
        let (mut s, now) = (new_stack(false), Instant::now());
        s.bind_local_stream(&stream(10, Some(11)));
        for seq in 1..=20 {
            s.handle_write(tagged(rtp(10, seq), now)).unwrap();
            while s.poll_write().is_some() {}
        }
        // A timer's sender report, collected by the next walk.
        s.handle_timeout(now + std::time::Duration::from_secs(2)).unwrap();
        let mut reports = 0;
        while let Some(out) = s.poll_write() {
            reports += usize::from(matches!(out.message.packet, Packet::Rtcp(_)));
        }
        assert!(reports > 0, "the timer made a sender report");
        let room = [s.wire.queued_room(), s.nack_responder.queued_room(), s.sender_reports.queued_room()];
        assert_eq!(room, [0, 0, 0], "wire, responder, sender reports");
    }

    /// The same interceptors in rtc's own chain.
    fn chain(estimating: bool) -> impl Interceptor {
        Registry::new()
            .with(Slot::CongestionControl, Wire::new(Arc::new(RtcpCounters::default()), send_side(estimating)))
            .with(Slot::NackResponder, NackResponderBuilder::new().with_size(256).build())
            .with(Slot::NackGenerator, NackGeneratorBuilder::new().build())
            .with(Slot::TwccReceiver, TwccReceiverBuilder::new().build())
            .with(Slot::ReceiverReport, ReceiverReportBuilder::new().build())
            .with(Slot::SenderReport, SenderReportBuilder::new().build())
            .build()
    }

    fn stream(ssrc: u32, rtx: Option<u32>) -> StreamInfo {
        StreamInfo {
            ssrc,
            ssrc_rtx: rtx,
            payload_type: 96,
            payload_type_rtx: rtx.map(|_| 97),
            mime_type: "video/VP8".into(),
            clock_rate: 90_000,
            rtcp_feedback: vec![RTCPFeedback { typ: "nack".into(), parameter: String::new() }],
            rtp_header_extensions: vec![RTPHeaderExtension { uri: TRANSPORT_CC_URI.into(), id: 3 }],
            ..Default::default()
        }
    }

    fn tagged(packet: Packet, now: Instant) -> TaggedPacket {
        let peer: SocketAddr = ([127, 0, 0, 1], 5000).into();
        let transport = TransportContext { peer_addr: peer, ..Default::default() };
        TaggedPacket { now, transport, message: AttributedPacket::new(packet) }
    }

    fn rtp(ssrc: u32, seq: u16) -> Packet {
        Packet::Rtp(rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                ssrc,
                payload_type: 96,
                sequence_number: seq,
                timestamp: u32::from(seq) * 3000,
                ..Default::default()
            },
            payload: bytes::Bytes::from(vec![seq as u8; 50]),
        })
    }

    /// What left or arrived, as bytes on the wire (RTCP compound packets marshalled whole,
    /// each part's sender SSRC zeroed: every generator draws its own at random; and a
    /// sender report's NTP time, read from the wall clock).
    fn bytes(msg: &TaggedPacket) -> Vec<u8> {
        match &msg.message.packet {
            Packet::Rtp(p) => p.marshal().map(|b| b.to_vec()).unwrap_or_default(),
            Packet::Rtcp(p) => {
                let mut b = rtc::rtcp::packet::marshal(p).map(|b| b.to_vec()).unwrap_or_default();
                let mut at = 0;
                while at + 8 <= b.len() {
                    let words = usize::from(u16::from_be_bytes([b[at + 2], b[at + 3]]));
                    b[at + 4..at + 8].fill(0);
                    if b[at + 1] == 200 && at + 16 <= b.len() {
                        b[at + 8..at + 16].fill(0);
                    }
                    at += (words + 1) * 4;
                }
                b
            }
            _ => vec![0xff],
        }
    }

    /// What went out and what came in after one step, as bytes.
    type Step = (Vec<Vec<u8>>, Vec<Vec<u8>>);

    /// Drains both directions: (written, read), each sorted (reports for several streams
    /// come in the order of a hash map).
    fn drain(i: &mut dyn Interceptor) -> Step {
        let mut written = Vec::new();
        while let Some(m) = i.poll_write() {
            written.push(bytes(&m));
        }
        let mut read = Vec::new();
        while let Some(m) = i.poll_read() {
            read.push(bytes(&m));
        }
        written.sort();
        read.sort();
        (written, read)
    }

    /// One connection's life: a sending stream (with and one without RTX), a receiving
    /// stream with a gap (bound with `receiving`; else its packets arrive unbound), a NACK
    /// and a PLI from the client, RTCP written by the application, report timers.
    fn life(i: &mut dyn Interceptor, receiving: bool) -> Vec<Step> {
        let t0 = Instant::now();
        let mut steps = Vec::new();
        i.bind_local_stream(&stream(10, Some(11)));
        i.bind_local_stream(&stream(20, None));
        // The client numbers what it sends for transport-wide feedback.
        let mut remote = stream(30, None);
        remote.rtp_header_extensions = vec![RTPHeaderExtension { uri: TRANSPORT_CC_URI.into(), id: 5 }];
        if receiving {
            i.bind_remote_stream(&remote);
        }
        for seq in 0..40u16 {
            let now = t0 + Duration::from_millis(u64::from(seq) * 33);
            let ssrc = if seq % 2 == 0 { 10 } else { 20 };
            i.handle_write(tagged(rtp(ssrc, seq), now)).unwrap();
            if seq % 3 != 1 {
                let mut arriving = rtp(30, seq);
                if let Packet::Rtp(p) = &mut arriving {
                    p.header.set_extension(5, bytes::Bytes::copy_from_slice(&seq.to_be_bytes())).unwrap();
                }
                i.handle_read(tagged(arriving, now)).unwrap();
            }
            if let Some(at) = i.poll_timeout().filter(|at| *at <= now) {
                i.handle_timeout(at).unwrap();
            }
            steps.push(drain(i));
        }
        let now = t0 + Duration::from_millis(1400);
        // Young and old packets of both streams (even numbers went on 10, odd on 20), in one
        // NACK each: one lost bitmask covers several.
        for (media_ssrc, lost) in [(10, &[4, 30, 32, 34, 36][..]), (20, &[7, 31, 33, 37][..])] {
            let nack = TransportLayerNack { sender_ssrc: 1, media_ssrc, nacks: nack_pairs_from_sequence_numbers(lost) };
            let pli = PictureLossIndication { sender_ssrc: 1, media_ssrc };
            i.handle_read(tagged(Packet::Rtcp(vec![Box::new(nack), Box::new(pli)]), now)).unwrap();
            steps.push(drain(i));
        }
        i.handle_write(tagged(Packet::Rtcp(vec![Box::new(PictureLossIndication { sender_ssrc: 1, media_ssrc: 30 })]), now)).unwrap();
        steps.push(drain(i));
        for ms in [2000, 3000, 4500] {
            i.handle_timeout(t0 + Duration::from_millis(ms)).unwrap();
            steps.push(drain(i));
        }
        i.unbind_local_stream(&stream(20, None));
        i.handle_write(tagged(rtp(20, 41), t0 + Duration::from_millis(4600))).unwrap();
        steps.push(drain(i));
        steps
    }

    /// A retransmission over RTX reaches the NACK generator as the packet it repairs, and
    /// the application as the stream's packet, whether the flow is a simulcast layer's
    /// (named by its repaired RID) or declared by the SDP (FID): the lost packet is asked
    /// for once, not again. Without the RTX it is asked again.
    #[test]
    fn an_rtx_repair_ends_the_nack_generators_asking() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let with_ext = |mut packet: Packet, ext: &[(u8, &str)]| {
            if let Packet::Rtp(p) = &mut packet {
                for (id, v) in ext {
                    p.header.set_extension(*id, bytes::Bytes::copy_from_slice(v.as_bytes())).unwrap();
                }
            }
            packet
        };
        let nacked = |s: &mut Stack, at: Instant| -> Vec<u16> {
            s.handle_timeout(at).unwrap();
            let mut lost = Vec::new();
            while let Some(m) = s.poll_write() {
                if let Packet::Rtcp(packets) = &m.message.packet {
                    for n in packets.iter().filter_map(|p| p.as_any().downcast_ref::<TransportLayerNack>()) {
                        assert_eq!(n.media_ssrc, 40);
                        lost.extend(n.nacks.iter().flat_map(|pair| pair.packet_list()));
                    }
                }
            }
            lost
        };
        for case in ["unrepaired", "layer", "declared"] {
            let mut s = new_stack(false);
            let mut stream_info = stream(40, None);
            // A layer's packets and its RTX's first ones name it; a declared flow needs nothing.
            type Extensions<'a> = &'a [(u8, &'a str)];
            let (media_ext, rtx_ext): (Extensions, Extensions) = if case == "declared" {
                stream_info.ssrc_rtx = Some(41);
                stream_info.payload_type_rtx = Some(97);
                (&[], &[])
            } else {
                s.set_layer_rtx(vec![(97, 96)]);
                (&[(1, "0"), (2, "h")], &[(1, "0"), (3, "h")])
            };
            stream_info.rtp_header_extensions = [
                "urn:ietf:params:rtp-hdrext:sdes:mid",
                "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
                "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id",
            ]
            .iter()
            .zip(1..)
            .map(|(uri, id)| RTPHeaderExtension { uri: (*uri).into(), id })
            .collect();
            s.bind_remote_stream(&stream_info);
            for seq in (0..10u16).filter(|s| *s != 4) {
                s.handle_read(tagged(with_ext(rtp(40, seq), media_ext), ms(u64::from(seq) * 33))).unwrap();
            }
            while s.poll_read().is_some() {}
            assert_eq!(nacked(&mut s, ms(400)), vec![4], "{case}");
            if case != "unrepaired" {
                let rtx = Packet::Rtp(rtc::rtp::Packet {
                    header: rtc::rtp::header::Header {
                        version: 2,
                        ssrc: 41,
                        payload_type: 97,
                        sequence_number: 900,
                        timestamp: 12_000,
                        ..Default::default()
                    },
                    payload: bytes::Bytes::from(vec![0, 4, 4, 4, 4]),
                });
                s.handle_read(tagged(with_ext(rtx, rtx_ext), ms(420))).unwrap();
                let read = s.poll_read().expect("the repair reaches the application");
                let Packet::Rtp(p) = &read.message.packet else { panic!("not RTP: {:?}", read.message.packet) };
                assert_eq!((p.header.ssrc, p.header.payload_type, p.header.sequence_number, &p.payload[..]), (40, 96, 4, &[4u8, 4, 4][..]), "{case}");
                assert_eq!(s.wire.counters().rtx_repairs.load(std::sync::atomic::Ordering::Relaxed), 1, "{case}");
            }
            let again = nacked(&mut s, ms(600));
            if case == "unrepaired" {
                assert_eq!(again, vec![4], "without the repair the packet is asked for again");
            } else {
                assert!(again.is_empty(), "{case}: asked again after the repair: {again:?}");
            }
        }
    }

    #[test]
    fn the_stack_sends_and_delivers_what_rtcs_chain_does() {
        compare(false, true);
    }

    /// A connection that receives nothing (a subscriber's) walks past the three that read
    /// arrivals: what leaves and what arrives is still what rtc's chain gives.
    #[test]
    fn a_connection_that_only_sends_gets_the_same_too() {
        compare(false, false);
        compare(true, false);
    }

    /// With the send side at work, what leaves carries transport-wide numbers in the order
    /// packets reached the wire, and RTX numbers shared by probes and retransmissions:
    /// any change in the order the stack hands packets on shows in the bytes.
    #[test]
    fn with_bandwidth_estimation_the_numbering_is_the_same_too() {
        let (numbered, probes) = compare(true, true);
        assert!(numbered >= 40, "transport-wide numbers went out on what was sent: {numbered}");
        assert!(probes >= 1, "a probe train went out: {probes}");
    }

    /// Runs one connection's life through the stack and rtc's chain and compares each
    /// step; returns the RTP packets that went out with a transport-wide number, and those
    /// on the RTX stream outside the NACK steps (probes).
    fn compare(estimating: bool, receiving: bool) -> (usize, usize) {
        let (mut ours, mut theirs, mut past) = (stack(estimating), chain(estimating), bypassed(estimating));
        let (a, b) = (life(&mut ours, receiving), life(&mut theirs, receiving));
        assert_eq!(a.len(), b.len());
        // Sent past rtc's pipeline, the same leaves: counted in the sender reports, kept
        // for retransmission, numbered.
        let c = life(&mut past, receiving);
        for (step, (x, z)) in a.iter().zip(&c).enumerate() {
            assert_eq!(x, z, "step {step}: what left or arrived differs when RTP is sent past rtc's pipeline");
        }
        let (mut retransmissions, mut plain, mut numbered, mut probes) = (0, 0, 0, 0);
        let mut reports = 0;
        let mut feedback = 0;
        for (step, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x, y, "step {step}: what left or arrived differs");
            retransmissions += x.0.iter().filter(|p| p.len() > 1 && p[1] & 0x7f == 97).count();
            // RTP with a header extension (the only one here: the transport-wide number).
            numbered += x.0.iter().filter(|p| p.len() > 12 && p[0] & 0x10 != 0 && (96..=97).contains(&(p[1] & 0x7f))).count();
            if !(40..42).contains(&step) {
                probes += x.0.iter().filter(|p| p.len() > 1 && p[1] & 0x7f == 97).count();
            }
            // The NACK steps' RTP on stream 20 (no RTX): sent again as it was.
            if (40..42).contains(&step) {
                plain += x.0.iter().filter(|p| p.len() > 12 && p[1] & 0x7f == 96 && p[8..12] == 20u32.to_be_bytes()).count();
            }
            reports += x.0.iter().filter(|p| p.len() > 1 && (200..=201).contains(&p[1])).count();
            feedback += x.0.iter().filter(|p| p.len() > 1 && p[0] & 0x1f == 15 && p[1] == 205).count();
        }
        // The comparison saw the parts that matter: RTX answers to the NACK, reports both ways.
        assert!(retransmissions >= 4, "NACKed packets young enough were repaired over RTX: {retransmissions}");
        assert!(plain >= 3, "and sent again as they were where there is no RTX: {plain}");
        if receiving {
            assert!(reports >= 2, "sender and receiver reports went out: {reports}");
            assert!(feedback >= 1, "transport-wide feedback went out: {feedback}");
        } else {
            assert!(reports >= 1, "sender reports went out: {reports}");
            assert_eq!(feedback, 0, "nothing received, no transport-wide feedback");
        }
        (numbered, probes)
    }
}
