//! The relay's datagrams (sans-I/O): a 6-byte header, a body, and with authentication a
//! 16-byte tag.
//!
//! ```text
//! 0      1      2              6
//! +------+------+--------------+-------------------------+-----------------+
//! | 0xE7 | kind | channel (BE) | body                    | tag (optional)  |
//! +------+------+--------------+-------------------------+-----------------+
//! ```
//!
//! The channel is chosen by the importing node, one per track; the exporter knows it by
//! the importer's address and that number. Bodies: `Rtp` a marshalled RTP packet (to
//! the importer), `Nack` big-endian 16-bit sequence numbers (to the exporter),
//! `Keepalive` one byte (1: send, 0: keep the channel but send nothing; empty is 1),
//! `Layer` the JSON of a layer choice, the others empty. The tag is HMAC-SHA256 over everything before it, truncated to 16 bytes, keyed
//! with the cluster's relay key.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// First byte of every relay datagram.
const MAGIC: u8 = 0xE7;
/// Header length.
pub(crate) const HEADER: usize = 6;
/// Tag length when authenticated.
pub(crate) const TAG: usize = 16;
/// At most this many sequence numbers in one NACK.
pub(crate) const MAX_NACK: usize = 64;

/// What a datagram says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// An RTP packet of the channel's track (exporter → importer).
    Rtp = 1,
    /// The importer's consumers need a keyframe (importer → exporter).
    Keyframe = 2,
    /// These packets were lost on the way (importer → exporter).
    Nack = 3,
    /// The importer still wants the channel (importer → exporter, every second).
    Keepalive = 4,
    /// The track ended at its origin (exporter → importer).
    End = 5,
    /// The importer no longer wants the channel (importer → exporter).
    Stop = 6,
    /// The exporter still sends the channel, even while its track is silent (exporter →
    /// importer, every second).
    Alive = 7,
    /// The layer the importer's consumers of a layered video agree on, as JSON (importer →
    /// exporter, on a change and with every keepalive after).
    Layer = 8,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Rtp,
            2 => Kind::Keyframe,
            3 => Kind::Nack,
            4 => Kind::Keepalive,
            5 => Kind::End,
            6 => Kind::Stop,
            7 => Kind::Alive,
            8 => Kind::Layer,
            _ => return None,
        })
    }
}

/// The relay key, ready to sign (cloned per datagram: HMAC's keyed state is small).
#[derive(Clone)]
pub(crate) struct Key(Hmac<Sha256>);

impl Key {
    /// A key from the cluster's shared secret.
    pub(crate) fn new(secret: &[u8]) -> Key {
        match Hmac::<Sha256>::new_from_slice(secret) {
            Ok(m) => Key(m),
            Err(_) => unreachable!("HMAC-SHA256 accepts any key length"),
        }
    }
}

/// A decoded datagram, borrowing its body.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Frame<'a> {
    pub kind: Kind,
    pub channel: u32,
    pub body: &'a [u8],
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WireError {
    #[error("too short for a relay datagram")]
    Short,
    #[error("not a relay datagram")]
    Magic,
    #[error("unknown kind {0}")]
    Kind(u8),
    #[error("bad or missing authentication tag")]
    Tag,
}

/// Starts a datagram in `out` (cleared first, so one buffer serves every packet).
fn header(out: &mut Vec<u8>, kind: Kind, channel: u32) {
    out.clear();
    out.push(MAGIC);
    out.push(kind as u8);
    out.extend_from_slice(&channel.to_be_bytes());
}

/// Ends a datagram: with a key, its tag over everything before it.
fn sign(out: &mut Vec<u8>, key: Option<&Key>) {
    if let Some(key) = key {
        let mut mac = key.0.clone();
        mac.update(out);
        let tag = mac.finalize().into_bytes();
        out.extend_from_slice(tag.get(..TAG).unwrap_or_default());
    }
}

/// Writes a datagram into `out`.
pub(crate) fn encode(out: &mut Vec<u8>, kind: Kind, channel: u32, body: &[u8], key: Option<&Key>) {
    header(out, kind, channel);
    out.extend_from_slice(body);
    sign(out, key);
}

/// Writes an RTP datagram carrying `packet` with its sequence number replaced by `seq`
/// (the exporter keeps its channels' numbering continuous across a publisher's pause).
/// A packet too short to be RTP goes as it is.
pub(crate) fn encode_rtp(out: &mut Vec<u8>, channel: u32, packet: &[u8], seq: u16, key: Option<&Key>) {
    header(out, Kind::Rtp, channel);
    match (packet.get(..2), packet.get(4..)) {
        (Some(head), Some(rest)) => {
            out.extend_from_slice(head);
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(rest);
        }
        _ => out.extend_from_slice(packet),
    }
    sign(out, key);
}

/// An exporter's numbering of one channel: the source's sequence numbers shifted so that a
/// pause (no packet for [`PAUSE`], then a jump larger than any loss burst worth asking
/// for) or a source that started again lower (a mixer rebuilt its pipeline) does not look
/// like loss downstream, where every packet skipped would be asked for again and the
/// subscribers' pictures would stall. A smaller gap is loss and is kept, so the importer
/// asks for it.
#[derive(Debug, Default)]
pub(crate) struct Renumber {
    /// The newest input number, the number it went out under, and when it came.
    last: Option<(u16, u16, std::time::Instant)>,
    offset: u16,
    /// The first input number after the last shift: older ones' numbers are taken.
    shifted_at: Option<u16>,
}

/// A silence this long followed by a jump is a pause, not loss.
pub(crate) const PAUSE: std::time::Duration = std::time::Duration::from_millis(500);
/// ...and the jump must be larger than this (a burst the importer would ask for).
const PAUSE_JUMP: u16 = MAX_NACK as u16;

impl Renumber {
    /// The number to send `seq` under, received at `now`; `None` for a late packet from
    /// before a shift (its number went to another packet).
    pub(crate) fn next(&mut self, seq: u16, now: std::time::Instant) -> Option<u16> {
        let Some((last_in, last_out, at)) = self.last else {
            self.last = Some((seq, seq, now));
            return Some(seq);
        };
        let ahead = seq.wrapping_sub(last_in);
        let shift = if ahead == 0 {
            false
        } else if ahead < 0x8000 {
            ahead > PAUSE_JUMP && now.duration_since(at) >= PAUSE
        } else if usize::from(last_in.wrapping_sub(seq)) > RESTART_BEHIND {
            true
        } else {
            // A late packet: sent under its number, unless that number was given away.
            if let Some(first) = self.shifted_at
                && seq.wrapping_sub(first) >= 0x8000
            {
                return None;
            }
            return Some(seq.wrapping_add(self.offset));
        };
        if shift {
            self.offset = last_out.wrapping_add(1).wrapping_sub(seq);
            self.shifted_at = Some(seq);
        }
        let out = seq.wrapping_add(self.offset);
        if ahead != 0 {
            self.last = Some((seq, out, now));
        }
        Some(out)
    }
}

/// Reads a datagram; with a key, only one whose tag verifies.
pub(crate) fn decode<'a>(datagram: &'a [u8], key: Option<&Key>) -> Result<Frame<'a>, WireError> {
    let signed = match key {
        Some(key) => {
            let split = datagram.len().checked_sub(TAG).filter(|n| *n >= HEADER).ok_or(WireError::Short)?;
            let (signed, tag) = datagram.split_at(split);
            let mut mac = key.0.clone();
            mac.update(signed);
            mac.verify_truncated_left(tag).map_err(|_| WireError::Tag)?;
            signed
        }
        None => datagram,
    };
    let (header, body) = signed.split_at_checked(HEADER).ok_or(WireError::Short)?;
    let [magic, kind, c0, c1, c2, c3] = header else { return Err(WireError::Short) };
    if *magic != MAGIC {
        return Err(WireError::Magic);
    }
    let kind = Kind::from_byte(*kind).ok_or(WireError::Kind(*kind))?;
    Ok(Frame { kind, channel: u32::from_be_bytes([*c0, *c1, *c2, *c3]), body })
}

/// A NACK body: the sequence numbers, at most [`MAX_NACK`].
pub(crate) fn nack_body(out: &mut Vec<u8>, seqs: impl IntoIterator<Item = u16>) {
    out.clear();
    for s in seqs.into_iter().take(MAX_NACK) {
        out.extend_from_slice(&s.to_be_bytes());
    }
}

/// The sequence numbers of a NACK body (an odd trailing byte is ignored).
pub(crate) fn nack_seqs(body: &[u8]) -> impl Iterator<Item = u16> + '_ {
    body.chunks_exact(2).take(MAX_NACK).map(|c| u16::from_be_bytes([c.first().copied().unwrap_or(0), c.get(1).copied().unwrap_or(0)]))
}

/// The sequence number of a marshalled RTP packet.
pub(crate) fn rtp_seq(packet: &[u8]) -> Option<u16> {
    let b = packet.get(2..4)?;
    Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
}

/// A packet further behind the highest than this is a sender's restart, not a late one
/// (the exporter keeps no older packets to repair anyway).
const RESTART_BEHIND: usize = 512;

/// Sequence-gap tracking on an importing channel: which packets to ask again for.
#[derive(Debug, Default)]
pub(crate) struct GapDetector {
    highest: Option<u16>,
}

impl GapDetector {
    /// Notes a received sequence number; returns the range of numbers skipped before it
    /// (empty when in order, a repair, or a jump too large to be loss: a restart).
    pub(crate) fn on_packet(&mut self, seq: u16) -> std::ops::Range<u32> {
        let Some(highest) = self.highest else {
            self.highest = Some(seq);
            return 0..0;
        };
        let ahead = seq.wrapping_sub(highest);
        if ahead >= 0x8000 && usize::from(highest.wrapping_sub(seq)) > RESTART_BEHIND {
            // Far behind: the sender started again with a new base (a mixer rebuilt its
            // pipeline), not a late packet.
            self.highest = Some(seq);
            return 0..0;
        }
        if ahead == 0 || ahead >= 0x8000 {
            // A duplicate or an older packet (a repair we asked for).
            return 0..0;
        }
        self.highest = Some(seq);
        if ahead == 1 || usize::from(ahead) > MAX_NACK * 4 {
            return 0..0;
        }
        let first = u32::from(highest) + 1;
        first..first + u32::from(ahead) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_with_and_without_a_key() {
        let key = Key::new(b"cluster secret");
        let mut buf = Vec::new();
        for key in [None, Some(&key)] {
            encode(&mut buf, Kind::Rtp, 0xA1B2C3D4, b"rtp!", key);
            assert_eq!(decode(&buf, key), Ok(Frame { kind: Kind::Rtp, channel: 0xA1B2C3D4, body: b"rtp!" }));
            encode(&mut buf, Kind::Stop, 7, b"", key);
            assert_eq!(decode(&buf, key), Ok(Frame { kind: Kind::Stop, channel: 7, body: b"" }));
        }
        assert_eq!(buf.len(), HEADER + TAG);
    }

    #[test]
    fn forged_or_unsigned_datagrams_are_refused() {
        let key = Key::new(b"cluster secret");
        let mut buf = Vec::new();
        encode(&mut buf, Kind::Rtp, 1, b"a payload longer than a tag would be", None);
        assert_eq!(decode(&buf, Some(&key)), Err(WireError::Tag), "unsigned where a key is required");
        encode(&mut buf, Kind::Rtp, 1, b"payload", None);
        assert_eq!(decode(&buf, Some(&key)), Err(WireError::Short), "unsigned and shorter than a tag");
        encode(&mut buf, Kind::Rtp, 1, b"payload", Some(&Key::new(b"another secret")));
        assert_eq!(decode(&buf, Some(&key)), Err(WireError::Tag), "signed with another key");
        encode(&mut buf, Kind::Rtp, 1, b"payload", Some(&key));
        if let Some(b) = buf.get_mut(7) {
            *b ^= 1;
        }
        assert_eq!(decode(&buf, Some(&key)), Err(WireError::Tag), "a changed body");
        assert_eq!(decode(&[0xE7, 1, 0], None), Err(WireError::Short));
        assert_eq!(decode(&[0x80, 1, 0, 0, 0, 0], None), Err(WireError::Magic));
        assert_eq!(decode(&[0xE7, 9, 0, 0, 0, 0], None), Err(WireError::Kind(9)));
        assert_eq!(decode(&[0xE7, 7, 0, 0, 0, 1], None), Ok(Frame { kind: Kind::Alive, channel: 1, body: b"" }));
        assert_eq!(decode(&[0; 10], Some(&key)), Err(WireError::Short));
    }

    #[test]
    fn nack_bodies_round_trip_and_are_bounded() {
        let mut body = Vec::new();
        nack_body(&mut body, [1, 65535, 300]);
        assert_eq!(nack_seqs(&body).collect::<Vec<_>>(), vec![1, 65535, 300]);
        nack_body(&mut body, 0..1000);
        assert_eq!(nack_seqs(&body).count(), MAX_NACK);
        assert_eq!(nack_seqs(&[1, 2, 3]).collect::<Vec<_>>(), vec![0x0102]);
        assert_eq!(rtp_seq(&[0x80, 96, 0x12, 0x34]), Some(0x1234));
        assert_eq!(rtp_seq(&[0x80]), None);
    }

    #[test]
    fn rtp_is_sent_renumbered_and_a_pause_is_not_loss() {
        let key = Key::new(b"k");
        let mut buf = Vec::new();
        let packet = [0x80, 96, 0x12, 0x34, 9, 9, 9, 9, 1, 2, 3, 4, 0xAA];
        encode_rtp(&mut buf, 5, &packet, 0xBEEF, Some(&key));
        let f = decode(&buf, Some(&key)).unwrap();
        assert_eq!(f.kind, Kind::Rtp);
        assert_eq!(f.body, &[0x80, 96, 0xBE, 0xEF, 9, 9, 9, 9, 1, 2, 3, 4, 0xAA]);
        let t0 = std::time::Instant::now();
        let mut r = Renumber::default();
        assert_eq!(r.next(100, t0), Some(100));
        assert_eq!(r.next(101, t0), Some(101));
        assert_eq!(r.next(104, t0), Some(104), "a gap without a silence is loss: kept");
        assert_eq!(r.next(103, t0), Some(103), "a late packet keeps its number");
        let later = t0 + PAUSE;
        assert_eq!(r.next(110, later), Some(110), "a small gap after a silence is loss too (a quiet screen share)");
        let resumed = later + PAUSE;
        assert_eq!(r.next(500, resumed), Some(111), "after a pause the numbering goes on");
        assert_eq!(r.next(501, resumed), Some(112));
        assert_eq!(r.next(109, resumed), None, "a packet from before the pause: its number was given away");
        assert_eq!(r.next(501, resumed), Some(112), "a duplicate keeps its number");
        assert_eq!(r.next(40000, resumed), Some(113), "a source that started again far lower goes on too");
        assert_eq!(r.next(40001, resumed), Some(114));
        let mut r = Renumber::default();
        assert_eq!(r.next(65530, t0), Some(65530));
        assert_eq!(r.next(65531, t0), Some(65531));
        assert_eq!(r.next(300, later), Some(65532), "across the wrap too");
        assert_eq!(r.next(301, later), Some(65533));
    }

    #[test]
    fn gaps_are_found_across_the_wrap() {
        let mut g = GapDetector::default();
        assert_eq!(g.on_packet(65533), 0..0);
        assert_eq!(g.on_packet(65534), 0..0);
        let gap = g.on_packet(2);
        let seqs: Vec<u16> = gap.map(|s| s as u16).collect();
        assert_eq!(seqs, vec![65535, 0, 1]);
        assert_eq!(g.on_packet(0), 0..0, "a repair is not a gap");
        assert_eq!(g.on_packet(2), 0..0, "a duplicate is not a gap");
        assert_eq!(g.on_packet(3), 0..0);
        assert_eq!(g.on_packet(3 + 5000), 0..0, "a restart is not loss");
        assert_eq!(g.on_packet(1000), 0..0, "a restart backwards is not a late packet...");
        let seqs: Vec<u32> = g.on_packet(1003).collect();
        assert_eq!(seqs, vec![1001, 1002], "...and loss after it is found");
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), signed in any::<bool>()) {
            let key = Key::new(b"k");
            let _ = decode(&bytes, signed.then_some(&key));
            let _ = nack_seqs(&bytes).count();
        }
    }
}
