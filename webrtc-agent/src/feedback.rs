//! Subscribers' keyframe requests (PLI/FIR) for the SFU. webrtc-rs consumes inbound RTCP
//! inside its interceptor chain; only packets tagged `DeliverToApplication` surface as
//! `TrackLocalEvent::OnRtcpPacket`. [`crate::wire::Wire`] lets a tagged copy of each
//! keyframe request go to the application and the original batch go on unchanged, so
//! NACK and report handling further up the chain still see everything.

use std::collections::VecDeque;
use std::time::Instant;

use rtc::interceptor::{Attribute, AttributedPacket, Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::sansio::Protocol;
use rtc::shared::TransportContext;
use rtc::shared::error::Error;

/// Whether an RTCP packet asks for a keyframe.
pub fn is_keyframe_request(packet: &dyn rtc::rtcp::Packet) -> bool {
    let any = packet.as_any();
    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
}

/// Copies of the keyframe requests among `packets`, if any.
pub fn keyframe_requests(packets: &[Box<dyn rtc::rtcp::Packet>]) -> Option<Vec<Box<dyn rtc::rtcp::Packet>>> {
    if !packets.iter().any(|p| is_keyframe_request(p.as_ref())) {
        return None;
    }
    Some(packets.iter().filter(|p| is_keyframe_request(p.as_ref())).cloned().collect())
}

/// Only the keyframe-request tap, as an interceptor of its own: for clients (the Rust
/// test client's publishers), whose chains have no [`crate::wire::Wire`].
#[derive(Default)]
pub struct KeyframeRequestTap {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequestTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet
            && let Some(requests) = keyframe_requests(packets)
        {
            self.read.push_back(deliverable(requests, msg.now, msg.transport));
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write.pop_front()
    }
}

impl Interceptor for KeyframeRequestTap {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// `requests`, received at `now` over `transport`, tagged for delivery to the application.
pub fn deliverable(requests: Vec<Box<dyn rtc::rtcp::Packet>>, now: Instant, transport: TransportContext) -> TaggedPacket {
    let mut message = AttributedPacket::new(Packet::Rtcp(requests));
    message.add(Attribute::DeliverToApplication);
    TaggedPacket { now, transport, message }
}
