//! Probe trains: where the forwarded media makes no packet trains of its own (a browser's
//! pacer spreads a frame's packets out; a low layer sends one packet a frame), the
//! capacity estimate ([`crate::bwe`]) has nothing to measure, and a subscriber below its
//! video's top layer could only find out whether the next one fits by switching to it —
//! a second of loss on a narrow link. So while its connection asks for probes, once per
//! [`INTERVAL`] the media packet just sent is followed, back to back, by RTX copies
//! (RFC 4588) of the last [`TRAIN`] packets of its stream: the train the estimate reads.
//! The client drops the copies as duplicates of what it has (or uses one as the repair
//! of a packet it lost), as libwebrtc's "payload padding" probes do.
//!
//! RTX, because a second copy on the media SSRC would be a replay to the client's SRTP
//! and dropped before it is counted. The probes and the NACK responder's retransmissions
//! share one RTX sequence per stream, numbered here as they leave (the responder counts
//! its own from zero and knows nothing of the probes).

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use rtc::interceptor::StreamInfo;
use rtc::rtp;

/// Copies in a probe train (after the media packet that starts it).
pub const TRAIN: usize = 3;
/// At most one probe train per connection this often.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// A media packet as its RTX copy needs it.
#[derive(Clone)]
struct Kept {
    sequence_number: u16,
    timestamp: u32,
    marker: bool,
    payload: Bytes,
}

/// A local video stream with a repair (RTX) stream.
struct Repaired {
    ssrc: u32,
    rtx_ssrc: u32,
    rtx_payload_type: u8,
    /// The next RTX sequence number.
    rtx_sequence: u16,
    /// The last packets sent, by count modulo [`TRAIN`].
    recent: [Option<Kept>; TRAIN],
    sent: usize,
}

/// Probe trains and RTX numbering of one connection (see the module docs).
#[derive(Default)]
pub struct Prober {
    streams: Vec<Repaired>,
    last_train: Option<Instant>,
    /// Whether recent packets are being kept (only while probes are asked for).
    keeping: bool,
}

impl Prober {
    /// A local stream was bound: a video with RTX can be probed.
    pub fn bind(&mut self, info: &StreamInfo) {
        let (Some(rtx_ssrc), Some(rtx_payload_type)) = (info.ssrc_rtx, info.payload_type_rtx) else { return };
        if !info.mime_type.to_ascii_lowercase().starts_with("video/") {
            return;
        }
        self.unbind(info.ssrc);
        self.streams.push(Repaired { ssrc: info.ssrc, rtx_ssrc, rtx_payload_type, rtx_sequence: 0, recent: Default::default(), sent: 0 });
    }

    /// A local stream was unbound.
    pub fn unbind(&mut self, ssrc: u32) {
        self.streams.retain(|s| s.ssrc != ssrc);
    }

    /// The RTX SSRC of the media stream `ssrc`, if it has one.
    pub fn rtx_of(&self, ssrc: u32) -> Option<u32> {
        self.streams.iter().find(|s| s.ssrc == ssrc).map(|s| s.rtx_ssrc)
    }

    /// A packet leaving: an RTX packet takes the next number of its stream's one sequence.
    pub fn renumber(&mut self, packet: &mut rtp::Packet) {
        let ssrc = packet.header.ssrc;
        if let Some(s) = self.streams.iter_mut().find(|s| s.rtx_ssrc == ssrc) {
            packet.header.sequence_number = s.rtx_sequence;
            s.rtx_sequence = s.rtx_sequence.wrapping_add(1);
        }
    }

    /// A packet that left: kept while `probing`; when a train is due, its copies are
    /// pushed to `train` (to leave right after it, each through [`Prober::renumber`]).
    pub fn after(&mut self, packet: &rtp::Packet, probing: bool, now: Instant, train: &mut Vec<rtp::Packet>) {
        if !probing {
            if std::mem::take(&mut self.keeping) {
                for s in &mut self.streams {
                    s.recent = Default::default();
                    s.sent = 0;
                }
            }
            return;
        }
        self.keeping = true;
        // A padding-only packet (a publisher without RTX pads on its media SSRC) would
        // make a train of empty copies.
        if packet.payload.is_empty() {
            return;
        }
        let ssrc = packet.header.ssrc;
        let Some(s) = self.streams.iter_mut().find(|s| s.ssrc == ssrc) else { return };
        if let Some(slot) = s.recent.get_mut(s.sent % TRAIN) {
            *slot = Some(Kept {
                sequence_number: packet.header.sequence_number,
                timestamp: packet.header.timestamp,
                marker: packet.header.marker,
                payload: packet.payload.clone(),
            });
        }
        s.sent += 1;
        if s.sent < TRAIN || self.last_train.is_some_and(|t| now.saturating_duration_since(t) < INTERVAL) {
            return;
        }
        self.last_train = Some(now);
        // Oldest first, as they were sent.
        for i in 0..TRAIN {
            let Some(Some(k)) = s.recent.get((s.sent + i) % TRAIN) else { continue };
            let mut payload = BytesMut::with_capacity(2 + k.payload.len());
            payload.put_u16(k.sequence_number);
            payload.put_slice(&k.payload);
            train.push(rtp::Packet {
                header: rtp::header::Header {
                    version: 2,
                    ssrc: s.rtx_ssrc,
                    payload_type: s.rtx_payload_type,
                    sequence_number: 0,
                    timestamp: k.timestamp,
                    marker: k.marker,
                    ..Default::default()
                },
                payload: payload.freeze(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(ssrc: u32, rtx: Option<u32>, mime: &str) -> StreamInfo {
        StreamInfo {
            ssrc,
            ssrc_rtx: rtx,
            payload_type: 96,
            payload_type_rtx: rtx.map(|_| 97),
            mime_type: mime.into(),
            clock_rate: 90_000,
            ..Default::default()
        }
    }

    fn packet(ssrc: u32, seq: u16) -> rtp::Packet {
        rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                ssrc,
                sequence_number: seq,
                timestamp: u32::from(seq) * 3000,
                payload_type: 96,
                ..Default::default()
            },
            payload: Bytes::from(vec![seq as u8; 100]),
        }
    }

    #[test]
    fn a_train_copies_the_last_packets_as_rtx_once_per_interval() {
        let mut p = Prober::default();
        p.bind(&info(10, Some(11), "video/VP8"));
        p.bind(&info(20, Some(21), "audio/opus"));
        p.bind(&info(30, None, "video/VP8"));
        let t0 = Instant::now();
        let mut train = Vec::new();
        // Not asked for: nothing kept, nothing sent.
        for seq in 0..5 {
            p.after(&packet(10, seq), false, t0, &mut train);
        }
        assert!(train.is_empty());
        // Asked for: the train follows the TRAIN-th packet kept, copies oldest first.
        for seq in 5..7 {
            p.after(&packet(10, seq), true, t0, &mut train);
        }
        assert!(train.is_empty(), "fewer packets kept than a train holds");
        p.after(&packet(10, 7), true, t0, &mut train);
        let osn: Vec<u16> = train.iter().map(|r| u16::from_be_bytes([r.payload[0], r.payload[1]])).collect();
        assert_eq!(osn, vec![5, 6, 7]);
        assert!(train.iter().all(|r| r.header.ssrc == 11 && r.header.payload_type == 97 && r.payload.len() == 102));
        assert_eq!(train[2].header.timestamp, 7 * 3000);
        assert_eq!(&train[2].payload[2..], &[7u8; 100][..]);
        // The RTX sequence is one, shared with the responder's retransmissions.
        for r in &mut train {
            p.renumber(r);
        }
        let mut nack_rtx = packet(11, 0);
        p.renumber(&mut nack_rtx);
        assert_eq!(train.iter().map(|r| r.header.sequence_number).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(nack_rtx.header.sequence_number, 3);
        // Not again within the interval; again after it.
        train.clear();
        p.after(&packet(10, 8), true, t0 + INTERVAL / 2, &mut train);
        assert!(train.is_empty());
        p.after(&packet(10, 9), true, t0 + INTERVAL, &mut train);
        assert_eq!(train.len(), TRAIN);
        // Audio and video without RTX are never probed.
        train.clear();
        for seq in 0..10 {
            p.after(&packet(20, seq), true, t0 + INTERVAL * 3, &mut train);
            p.after(&packet(30, seq), true, t0 + INTERVAL * 3, &mut train);
        }
        assert!(train.is_empty());
        assert_eq!(p.rtx_of(10), Some(11));
        assert_eq!(p.rtx_of(30), None);
    }

    #[test]
    fn padding_only_packets_are_not_copied() {
        let mut p = Prober::default();
        p.bind(&info(10, Some(11), "video/VP8"));
        let mut train = Vec::new();
        let mut padding = packet(10, 0);
        padding.payload = Bytes::new();
        for _ in 0..5 {
            p.after(&padding, true, Instant::now(), &mut train);
        }
        assert!(train.is_empty());
    }

    #[test]
    fn stopping_forgets_the_kept_packets() {
        let mut p = Prober::default();
        p.bind(&info(10, Some(11), "video/VP8"));
        let t0 = Instant::now();
        let mut train = Vec::new();
        for seq in 0..2 {
            p.after(&packet(10, seq), true, t0, &mut train);
        }
        p.after(&packet(10, 2), false, t0, &mut train);
        // Starting again needs a whole train of fresh packets: none of the old ones is copied.
        for seq in 3..5 {
            p.after(&packet(10, seq), true, t0, &mut train);
        }
        assert!(train.is_empty());
        p.after(&packet(10, 5), true, t0, &mut train);
        let osn: Vec<u16> = train.iter().map(|r| u16::from_be_bytes([r.payload[0], r.payload[1]])).collect();
        assert_eq!(osn, vec![3, 4, 5]);
    }
}
