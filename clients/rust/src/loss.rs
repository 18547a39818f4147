//! Keyframe requests on lasting loss, as browsers make them: a video packet that stays
//! missing for [`GIVE_UP`] (its retransmissions, if any were asked for, did not come)
//! leaves a picture that cannot be decoded, so the client asks for a keyframe (PLI)
//! instead of showing nothing until the sender's next periodic one. A test subscriber
//! behind a congested link needs it as much as a browser does: a layer switch whose
//! keyframe the link dropped would otherwise freeze it for seconds.
//!
//! Likewise a video stream whose packets arrive without a keyframe among them (its first
//! one was lost before the receiver was ready, or sent before the connection was) cannot
//! be decoded at all: as Chrome's receiver does, the client asks for one after
//! [`NO_KEYFRAME_WAIT`], and again every [`GIVE_UP`] until one comes.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rtc::interceptor::{AttributedPacket, Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::reception_report::ReceptionReport;
use rtc::sansio::Protocol;
use rtc::shared::TransportContext;
use rtc::shared::error::Error;
use tessera_webrtc_agent::simulcast::VideoCodec;

/// How long a packet may stay missing before the picture is given up on.
pub const GIVE_UP: Duration = Duration::from_secs(1);
/// How long packets may arrive without any keyframe before one is asked for.
pub const NO_KEYFRAME_WAIT: Duration = Duration::from_millis(500);
/// How often missing packets are looked at.
const CHECK: Duration = Duration::from_millis(100);
/// The SSRC keyframe requests come from (libwebrtc's for a stream it only receives).
const RECEIVER_SSRC: u32 = 1;
/// A jump longer than this is a new sequence (a sender restart), not loss.
const MAX_GAP: u16 = 512;

struct Stream {
    highest: Option<u16>,
    /// Missing sequence numbers and since when.
    missing: HashMap<u16, Instant>,
    codec: VideoCodec,
    keyframe: Keyframe,
}

/// Whether a stream has had a keyframe yet.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Keyframe {
    /// Nothing has arrived yet.
    Unseen,
    /// Packets arrive without any keyframe: since when, and when one was last asked for.
    Missing { since: Instant, asked: Option<Instant> },
    /// A keyframe has come (or the codec's keyframes cannot be told).
    Seen,
}

impl Stream {
    fn new(codec: VideoCodec) -> Self {
        let keyframe = if codec == VideoCodec::Other { Keyframe::Seen } else { Keyframe::Unseen };
        Stream { highest: None, missing: HashMap::new(), codec, keyframe }
    }

    /// Whether a keyframe request is due for lack of any keyframe (and notes it asked).
    fn keyframe_due(&mut self, now: Instant) -> bool {
        let Keyframe::Missing { since, asked } = &mut self.keyframe else { return false };
        let due = match asked {
            None => now.saturating_duration_since(*since) >= NO_KEYFRAME_WAIT,
            Some(at) => now.saturating_duration_since(*at) >= GIVE_UP,
        };
        if due {
            *asked = Some(now);
        }
        due
    }
}

/// The interceptor (see the module docs); video streams only.
#[derive(Default)]
pub struct KeyframeOnLoss {
    streams: HashMap<u32, Stream>,
    /// RTX SSRC → the media SSRC it repairs.
    rtx: HashMap<u32, u32>,
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
    next: Option<Instant>,
}

impl KeyframeOnLoss {
    /// A media packet (not a repair) of a watched stream: has the stream had a keyframe?
    fn media(&mut self, ssrc: u32, payload: &[u8], now: Instant) {
        let Some(s) = self.streams.get_mut(&ssrc) else { return };
        if s.keyframe == Keyframe::Seen {
            return;
        }
        if s.codec.starts_keyframe(payload) {
            s.keyframe = Keyframe::Seen;
        } else if s.keyframe == Keyframe::Unseen {
            s.keyframe = Keyframe::Missing { since: now, asked: None };
            let check = now + NO_KEYFRAME_WAIT;
            self.next = Some(self.next.map_or(check, |n| n.min(check)));
        }
    }

    fn arrived(&mut self, ssrc: u32, seq: u16, now: Instant) {
        let Some(s) = self.streams.get_mut(&ssrc) else { return };
        let Some(highest) = s.highest else {
            s.highest = Some(seq);
            return;
        };
        let ahead = seq.wrapping_sub(highest);
        if ahead == 0 || ahead >= 0x8000 {
            // Late or repaired.
            s.missing.remove(&seq);
            return;
        }
        if ahead > MAX_GAP {
            s.missing.clear();
        } else {
            for gap in 1..ahead {
                s.missing.insert(highest.wrapping_add(gap), now);
            }
            if ahead > 1 && self.next.is_none() {
                self.next = Some(now + CHECK);
            }
        }
        s.highest = Some(seq);
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeOnLoss {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtp(p) = &msg.message.packet {
            let ssrc = p.header.ssrc;
            if let Some(&media) = self.rtx.get(&ssrc) {
                // An RTX packet starts with the sequence number it repairs.
                if let [a, b, ..] = p.payload[..] {
                    self.arrived(media, u16::from_be_bytes([a, b]), msg.now);
                }
            } else {
                self.media(ssrc, &p.payload, msg.now);
                self.arrived(ssrc, p.header.sequence_number, msg.now);
            }
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

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Self::Error> {
        if self.next.is_none_or(|t| t > now) {
            return Ok(());
        }
        let mut waiting = false;
        for (&ssrc, s) in &mut self.streams {
            let lost = s.missing.values().any(|since| now.saturating_duration_since(*since) >= GIVE_UP);
            let keyless = s.keyframe_due(now);
            if lost || keyless {
                s.missing.clear();
                // Compound RTCP, as libwebrtc sends it where `rtcp-rsize` is not negotiated:
                // a receiver report naming the stream, then the PLI, from a non-zero SSRC.
                // Janus (1.1) files RTCP under an m-line by its sender SSRC, else by the
                // SSRC of a report block: a bare PLI from SSRC 0 landed on its audio
                // m-line and was dropped, so no re-request of ours ever reached its
                // publisher.
                let block = ReceptionReport { ssrc, last_sequence_number: s.highest.map_or(0, u32::from), ..Default::default() };
                let rr = ReceiverReport { ssrc: RECEIVER_SSRC, reports: vec![block], ..Default::default() };
                let pli = PictureLossIndication { sender_ssrc: RECEIVER_SSRC, media_ssrc: ssrc };
                self.write.push_back(TaggedPacket {
                    now,
                    transport: TransportContext::default(),
                    message: AttributedPacket::new(Packet::Rtcp(vec![Box::new(rr), Box::new(pli)])),
                });
            }
            waiting |= !s.missing.is_empty() || matches!(s.keyframe, Keyframe::Missing { .. });
        }
        self.next = waiting.then_some(now + CHECK);
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Self::Time> {
        self.next
    }
}

impl Interceptor for KeyframeOnLoss {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        if info.mime_type.to_ascii_lowercase().starts_with("video/") {
            self.streams.insert(info.ssrc, Stream::new(VideoCodec::of(&info.mime_type)));
            if let Some(rtx) = info.ssrc_rtx {
                self.rtx.insert(rtx, info.ssrc);
            }
        }
    }
    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        self.streams.remove(&info.ssrc);
        self.rtx.retain(|_, media| *media != info.ssrc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VP8 packet: the start of a keyframe (S bit, then the P bit clear).
    fn rtp(ssrc: u32, seq: u16, now: Instant) -> TaggedPacket {
        vp8(ssrc, seq, now, true)
    }

    fn vp8(ssrc: u32, seq: u16, now: Instant, key: bool) -> TaggedPacket {
        let mut payload = vec![0; 10];
        payload[0] = 0x10;
        payload[1] = u8::from(!key);
        let packet =
            rtc::rtp::Packet { header: rtc::rtp::Header { version: 2, ssrc, sequence_number: seq, ..Default::default() }, payload: payload.into() };
        TaggedPacket { now, transport: TransportContext::default(), message: AttributedPacket::new(Packet::Rtp(packet)) }
    }

    fn plis(k: &mut KeyframeOnLoss) -> usize {
        std::iter::from_fn(|| k.poll_write())
            .filter(|m| matches!(&m.message.packet, Packet::Rtcp(p) if p.iter().any(|p| p.as_any().is::<PictureLossIndication>())))
            .count()
    }

    #[test]
    fn a_packet_missing_for_a_second_asks_for_a_keyframe_once() {
        let mut k = KeyframeOnLoss::default();
        k.bind_remote_stream(&StreamInfo { ssrc: 7, mime_type: "video/VP8".into(), ..Default::default() });
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // 3 is lost, 5 comes late: only 3 stays missing.
        for (seq, ms) in [(1, 0), (2, 10), (4, 20), (6, 30), (5, 40), (7, 50)] {
            k.handle_read(rtp(7, seq, at(ms))).unwrap();
        }
        k.handle_timeout(at(500)).unwrap();
        assert_eq!(plis(&mut k), 0, "not yet");
        k.handle_timeout(at(1100)).unwrap();
        assert_eq!(plis(&mut k), 1);
        k.handle_timeout(at(2000)).unwrap();
        assert_eq!(plis(&mut k), 0, "asked once");
        assert_eq!(k.poll_timeout(), None, "nothing missing, nothing to wake up for");
        // A retransmission in time asks for nothing; audio is not watched.
        k.handle_read(rtp(7, 9, at(2100))).unwrap();
        k.handle_read(rtp(7, 8, at(2200))).unwrap();
        k.handle_read(rtp(9, 1, at(2100))).unwrap();
        k.handle_read(rtp(9, 5, at(2100))).unwrap();
        k.handle_timeout(at(3500)).unwrap();
        assert_eq!(plis(&mut k), 0);
    }

    #[test]
    fn packets_without_any_keyframe_ask_for_one_until_it_comes() {
        let mut k = KeyframeOnLoss::default();
        k.bind_remote_stream(&StreamInfo { ssrc: 7, mime_type: "video/VP8".into(), ..Default::default() });
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for seq in 0..5u16 {
            k.handle_read(vp8(7, seq, at(u64::from(seq) * 50), false)).unwrap();
        }
        k.handle_timeout(at(400)).unwrap();
        assert_eq!(plis(&mut k), 0, "not yet");
        assert_eq!(k.poll_timeout(), Some(at(500)));
        k.handle_timeout(at(500)).unwrap();
        // Compound, as libwebrtc sends it: a receiver report naming the stream, then the
        // PLI, both from a non-zero SSRC (what Janus needs to route it to the video).
        let request = k.poll_write().expect("a keyframe request");
        let Packet::Rtcp(parts) = &request.message.packet else { panic!("not RTCP") };
        let rr = parts[0].as_any().downcast_ref::<ReceiverReport>().expect("a receiver report first");
        assert_eq!((rr.ssrc, rr.reports.len(), rr.reports[0].ssrc, rr.reports[0].last_sequence_number), (RECEIVER_SSRC, 1, 7, 4));
        let pli = parts[1].as_any().downcast_ref::<PictureLossIndication>().expect("then the PLI");
        assert_eq!((pli.sender_ssrc, pli.media_ssrc, parts.len()), (RECEIVER_SSRC, 7, 2));
        assert_ne!(RECEIVER_SSRC, 0);
        assert_eq!(plis(&mut k), 0, "delta frames alone cannot be decoded: one request");
        k.handle_timeout(at(1000)).unwrap();
        assert_eq!(plis(&mut k), 0, "asked a moment ago");
        k.handle_timeout(at(1500)).unwrap();
        assert_eq!(plis(&mut k), 1, "asked again: none came");
        // The keyframe comes: no more requests, nothing to wake up for.
        k.handle_read(vp8(7, 5, at(1600), true)).unwrap();
        k.handle_read(vp8(7, 6, at(1650), false)).unwrap();
        k.handle_timeout(at(1700)).unwrap();
        k.handle_timeout(at(3000)).unwrap();
        assert_eq!(plis(&mut k), 0);
        assert_eq!(k.poll_timeout(), None);
    }
}
