//! The NACK responder: what a connection sent on each stream that negotiated `nack`, kept
//! to be sent again (as RTX where the stream has a repair flow) when the client reports it
//! lost.
//!
//! It answers as rtc's `NackResponderInterceptor` does, packet for packet (the stack's
//! differential test runs both), but keeps each packet in 48 bytes instead of rtc's
//! 112-byte `rtp::Packet`: what the server sends has no CSRCs, padding or header
//! extensions at this point of the stack (the rewriter strips them; transport-wide numbers
//! are added nearer the wire), so a packet is its payload (shared with every other copy of
//! it, not copied) and four header fields. A packet that does carry more keeps its whole
//! header aside. For a subscriber with one video stream that is 12 KB of history instead
//! of 29 KB.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::interceptor::{Attribute, AttributedPacket, Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp::header::Header;
use rtc::sansio::Protocol;
use rtc::shared::TransportContext;
use rtc::shared::error::Error;

use crate::seq_ring::SeqRing;

/// One packet as sent.
#[derive(Clone)]
struct Kept {
    payload: Bytes,
    timestamp: u32,
    sequence_number: u16,
    payload_type: u8,
    marker: bool,
    /// The whole header, when it holds more than the fields above (rare here).
    header: Option<Box<Header>>,
}

impl Kept {
    fn of(packet: &rtc::rtp::Packet) -> Kept {
        let h = &packet.header;
        let plain = h.version == 2
            && !h.padding
            && !h.extension
            && h.csrc.is_empty()
            && h.extension_profile == 0
            && h.extensions.is_empty()
            && h.extensions_padding == 0;
        Kept {
            payload: packet.payload.clone(),
            timestamp: h.timestamp,
            sequence_number: h.sequence_number,
            payload_type: h.payload_type,
            marker: h.marker,
            header: (!plain).then(|| Box::new(h.clone())),
        }
    }

    /// The packet again, on `ssrc`.
    fn packet(&self, ssrc: u32) -> rtc::rtp::Packet {
        let header = match &self.header {
            Some(h) => (**h).clone(),
            None => Header {
                version: 2,
                marker: self.marker,
                payload_type: self.payload_type,
                sequence_number: self.sequence_number,
                timestamp: self.timestamp,
                ssrc,
                ..Default::default()
            },
        };
        rtc::rtp::Packet { header, payload: self.payload.clone() }
    }
}

/// Packets a stream's history starts with room for: 2 s of a 240 kbit/s video, so a
/// subscriber of a light stream does not hold room for a heavy one's.
const FIRST_SIZE: u16 = 64;
/// How far back a history must reach: a lost packet is reported within a round trip and
/// the client's reordering wait, and a repair later than this comes too late to show.
const REACH: Duration = Duration::from_secs(1);

impl crate::seq_ring::Numbered for Option<Kept> {
    fn seq(&self) -> Option<u16> {
        self.as_ref().map(|k| k.sequence_number)
    }
}

/// The last packets of one stream, by sequence number (a power-of-two ring, as rtc's). It
/// starts small and doubles, up to its most, while a lap of the ring takes less than
/// [`REACH`]: its memory follows the stream's packet rate.
struct History {
    slots: SeqRing<Option<Kept>>,
    /// The newest sequence number kept, once one is.
    newest: Option<u16>,
    /// When the ring last began a lap.
    lap_began: Option<Instant>,
}

impl History {
    /// Room for up to `most` packets: a power of two up to 32768 (else none, as rtc's).
    fn new(most: u16) -> Option<History> {
        let first = most.min(FIRST_SIZE);
        most.is_power_of_two().then(|| History { slots: SeqRing::new(usize::from(first), usize::from(most)), newest: None, lap_began: None })
    }

    /// Doubles the ring if its last lap was quicker than [`REACH`] (what it holds lies
    /// within one lap behind the newest).
    fn lap(&mut self, now: Instant) {
        let quick = self.lap_began.is_some_and(|began| now.saturating_duration_since(began) < REACH);
        self.lap_began = Some(now);
        if quick {
            self.slots.grow();
        }
    }

    fn add(&mut self, now: Instant, packet: &rtc::rtp::Packet) {
        let seq = packet.header.sequence_number;
        match self.newest {
            Some(newest) if seq == newest => return,
            // Newer: the sequence numbers skipped since are gone.
            Some(newest) if seq.wrapping_sub(newest) < 1 << 15 => {
                if self.slots.index(seq) < self.slots.index(newest) || usize::from(seq.wrapping_sub(newest)) >= self.slots.len() {
                    self.lap(now);
                }
                let mut s = newest.wrapping_add(1);
                while s != seq {
                    if let Some(slot) = self.slots.get_mut(s) {
                        *slot = None;
                    }
                    s = s.wrapping_add(1);
                }
                self.newest = Some(seq);
            }
            // Older (out of order): kept if still in the window (rtc's would overwrite a
            // newer packet's slot with it), the newest stays.
            Some(newest) if usize::from(newest.wrapping_sub(seq)) >= self.slots.len() => return,
            Some(_) => {}
            None => self.newest = Some(seq),
        }
        if let Some(slot) = self.slots.get_mut(seq) {
            *slot = Some(Kept::of(packet));
        }
    }

    fn get(&self, seq: u16) -> Option<&Kept> {
        let behind = self.newest?.wrapping_sub(seq);
        if behind >= 1 << 15 || usize::from(behind) >= self.slots.len() {
            return None;
        }
        self.slots.get(seq)?.as_ref().filter(|k| k.sequence_number == seq)
    }
}

/// A stream the connection sends with NACK negotiated.
struct Stream {
    history: History,
    /// The repair flow's SSRC and payload type, if it has one.
    rtx: Option<(u32, u8)>,
    rtx_sequence_number: u16,
}

/// The NACK responder (see the module doc).
pub struct Responder {
    size: u16,
    streams: HashMap<u32, Stream>,
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

impl Responder {
    /// A responder keeping up to the last `size` packets of each stream (a power of two;
    /// another size keeps nothing, as rtc's), fewer while a stream's rate needs fewer.
    pub fn new(size: u16) -> Responder {
        Responder { size, streams: HashMap::new(), read: VecDeque::new(), write: VecDeque::new() }
    }

    /// Keeps an RTP packet going out at `now`, if its stream is answered (by reference: a
    /// packet the worker sends itself is not queued here).
    pub fn on_send(&mut self, now: Instant, packet: &rtc::rtp::Packet) {
        if let Some(stream) = self.streams.get_mut(&packet.header.ssrc) {
            stream.history.add(now, packet);
        }
    }

    /// Whether a lost packet of stream `ssrc` is sent again as it was, on its own SSRC (NACK
    /// negotiated without RTX).
    pub fn resends_in_place(&self, ssrc: u32) -> bool {
        self.streams.get(&ssrc).is_some_and(|s| s.rtx.is_none())
    }

    fn answer(&mut self, now: Instant, nack: &TransportLayerNack) {
        let Some(stream) = self.streams.get_mut(&nack.media_ssrc) else { return };
        for pair in &nack.nacks {
            let lost = (0..16u16).filter(|i| pair.lost_packets & (1 << i) != 0).map(|i| pair.packet_id.wrapping_add(i + 1));
            for seq in std::iter::once(pair.packet_id).chain(lost) {
                let Some(kept) = stream.history.get(seq) else { continue };
                let packet = match stream.rtx {
                    Some((ssrc, payload_type)) => {
                        // RFC 4588: the original sequence number, then the original payload.
                        let mut payload = Vec::with_capacity(2 + kept.payload.len());
                        payload.extend_from_slice(&seq.to_be_bytes());
                        payload.extend_from_slice(&kept.payload);
                        let sequence_number = stream.rtx_sequence_number;
                        stream.rtx_sequence_number = sequence_number.wrapping_add(1);
                        let header = Header {
                            version: 2,
                            ssrc,
                            payload_type,
                            sequence_number,
                            timestamp: kept.timestamp,
                            marker: kept.marker,
                            ..Default::default()
                        };
                        rtc::rtp::Packet { header, payload: payload.into() }
                    }
                    None => kept.packet(nack.media_ssrc),
                };
                self.write.push_back(TaggedPacket {
                    now,
                    transport: TransportContext::default(),
                    message: AttributedPacket::new(Packet::Rtp(packet)).with(Attribute::Retransmission),
                });
            }
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for Responder {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            for nack in packets.iter().filter_map(|p| p.as_any().downcast_ref::<TransportLayerNack>()) {
                self.answer(msg.now, nack);
            }
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        crate::stack::next_of(&mut self.read)
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtp(packet) = &msg.message.packet {
            self.on_send(msg.now, packet);
        }
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        crate::stack::next_of(&mut self.write)
    }

    fn handle_timeout(&mut self, _now: Instant) -> Result<(), Self::Error> {
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        None
    }
}

impl Interceptor for Responder {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        let nack = info.rtcp_feedback.iter().any(|fb| fb.typ == "nack" && fb.parameter.is_empty());
        if nack && let Some(history) = History::new(self.size) {
            let rtx = info.ssrc_rtx.zip(info.payload_type_rtx);
            self.streams.insert(info.ssrc, Stream { history, rtx, rtx_sequence_number: 0 });
        }
    }

    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.streams.remove(&info.ssrc);
    }

    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}

    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
impl Responder {
    /// Packets its queues have room for (a test of `crate::stack::next_of`).
    pub(crate) fn queued_room(&self) -> usize {
        self.read.capacity() + self.write.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(seq: u16) -> rtc::rtp::Packet {
        rtc::rtp::Packet {
            header: Header { version: 2, sequence_number: seq, timestamp: u32::from(seq) * 3000, ssrc: 7, payload_type: 96, ..Default::default() },
            payload: Bytes::from(vec![seq as u8; 3]),
        }
    }

    #[test]
    fn a_kept_packet_is_48_bytes_and_comes_back_whole() {
        assert_eq!(std::mem::size_of::<Option<Kept>>(), 48);
        let p = packet(5);
        assert_eq!(Kept::of(&p).packet(7), p);
        // A header with more than the four fields is kept whole.
        let mut q = packet(6);
        q.header.csrc = vec![1, 2];
        q.header.padding = true;
        assert_eq!(Kept::of(&q).packet(7), q);
    }

    #[test]
    fn the_history_keeps_the_last_packets_and_forgets_what_was_skipped() {
        let now = Instant::now();
        let mut h = History::new(8).unwrap();
        assert!(History::new(6).is_none());
        assert!(h.get(0).is_none());
        for seq in [65530u16, 65531, 65533] {
            h.add(now, &packet(seq));
        }
        assert!(h.get(65532).is_none(), "skipped");
        assert_eq!(h.get(65533).map(|k| k.sequence_number), Some(65533));
        // Across the wrap, and a late packet is kept without moving the newest.
        for seq in [65535u16, 0, 1, 2] {
            h.add(now, &packet(seq));
        }
        h.add(now, &packet(65534));
        assert!(h.get(65534).is_some());
        assert!(h.get(65530).is_none(), "overwritten by 2");
        assert!(h.get(3).is_none(), "not sent yet");
        assert_eq!(h.newest, Some(2));
    }

    #[test]
    fn the_history_grows_with_the_packet_rate_and_keeps_what_it_had() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // 30 packets a second: a lap of 64 takes 2 s, the ring stays at 64.
        let mut slow = History::new(256).unwrap();
        for seq in 0..400u16 {
            slow.add(at(u64::from(seq) * 33), &packet(seq));
        }
        assert_eq!(slow.slots.len(), usize::from(FIRST_SIZE));
        assert!(slow.get(399 - 63).is_some() && slow.get(399 - 64).is_none());
        // 250 a second: it doubles at each quick lap, up to its most, and a packet kept
        // before a doubling is still found after it.
        let mut fast = History::new(256).unwrap();
        let mut sizes = Vec::new();
        for seq in 60_000..61_000u16 {
            fast.add(at(u64::from(seq - 60_000) * 4), &packet(seq));
            if sizes.last() != Some(&fast.slots.len()) {
                sizes.push(fast.slots.len());
                assert!(fast.slots.len() == 64 || (fast.get(seq - 1).is_some() && fast.get(seq - 63).is_some()), "{seq}");
            }
        }
        assert_eq!(sizes, [64, 128, 256]);
        assert!(fast.get(60_999 - 255).is_some() && fast.get(60_999 - 256).is_none());
        // A stream that slows keeps its room (a burst will come back).
        for seq in 61_000..61_600u16 {
            fast.add(at(4_000 + u64::from(seq - 61_000) * 100), &packet(seq));
        }
        assert_eq!(fast.slots.len(), 256);
    }
}
