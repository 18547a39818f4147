//! Retransmissions publishers send over RTX (RFC 4588), turned back into the packets they
//! repair before rtc's receiving interceptors and the worker see them.
//!
//! Two kinds of RTX flow arrive. A stream the SDP declares (`a=ssrc-group:FID <media>
//! <rtx>`) has its flow bound by rtc with the stream, and rtc restores its packets, but
//! only at the end of its pipeline, past the interceptors: its NACK generator never saw a
//! repair and asked again every 100 ms while the packet stayed in its log (Tessera caps
//! that at three). A browser publishing simulcast declares no SSRCs: each layer is known by
//! the RID on its first packets, and each layer's RTX flow by the *repaired* RID on its
//! first packets (RFC 8852); rtc 0.21 binds layers by RID but not their RTX flows (its
//! `bind_by_rid`: "TODO: Add support of handling repair rtp stream id (rrid)") and drops
//! their packets.
//!
//! So here, in the stack ahead of every interceptor, an RTX packet of either kind becomes
//! the packet it carries (RFC 4588 §4: the stream's SSRC, the payload type the RTX
//! format's `apt` names, the original sequence number from the payload's first two bytes,
//! the rest of the payload): the NACK generator sees the repair and stops asking, the
//! receiver reports count it, and the worker forwards it as it forwards a packet resent on
//! the stream's own SSRC. The transport-wide number stays, so the TWCC feedback still
//! covers the RTX packet as sent. A padding-only RTX packet (a bandwidth probe: nothing to
//! restore) goes on untouched: the TWCC receiver counts it, rtc then drops it.
//!
//! Only SSRCs rtc bound (those the SDP declares or its RIDs name) are learnt, and a stream
//! has one RTX flow, so what a client can make this keep is bounded by what it negotiated.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use rtc::interceptor::StreamInfo;
use rtc::rtp;

use crate::rtcp_counter::RtcpCounters;

const MID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
const RID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";
const RRID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id";

/// A stream rtc bound (a simulcast layer, or any other), and what its first packets named it.
struct Bound {
    ssrc: u32,
    /// `(mid, rid)`, once a packet carrying both came.
    name: Option<(Bytes, Bytes)>,
    /// Its RTX flow's SSRC: declared by the SDP, or once an RTX packet naming the layer came.
    rtx: Option<u32>,
    /// The declared flow's RTX payload type and the stream's own.
    declared: Option<(u8, u8)>,
}

/// Per connection (see the module docs).
pub struct RtxIn {
    /// RTX payload types of the simulcast m-lines, each with the one it repairs (`apt`).
    apt: Vec<(u8, u8)>,
    /// Whether a bound stream has a declared RTX flow.
    declared: bool,
    mid: Option<u8>,
    rid: Option<u8>,
    rrid: Option<u8>,
    streams: Vec<Bound>,
    counters: Arc<RtcpCounters>,
}

impl RtxIn {
    /// Restoring nothing until [`RtxIn::set_layer_rtx`] names RTX formats or a stream with a
    /// declared RTX flow is bound.
    pub fn new(counters: Arc<RtcpCounters>) -> Self {
        RtxIn { apt: Vec::new(), declared: false, mid: None, rid: None, rrid: None, streams: Vec::new(), counters }
    }

    /// The RTX payload types negotiated on simulcast m-lines, with the payload type each
    /// repairs (from the answer).
    pub fn set_layer_rtx(&mut self, apt: Vec<(u8, u8)>) {
        self.apt = apt;
    }

    /// A stream rtc bound: its header extension ids, its declared RTX flow, and its SSRC
    /// as a possible layer.
    pub fn bind(&mut self, info: &StreamInfo) {
        for e in &info.rtp_header_extensions {
            let Ok(id) = u8::try_from(e.id) else { continue };
            match e.uri.as_str() {
                MID_URI => self.mid = Some(id),
                RID_URI => self.rid = Some(id),
                RRID_URI => self.rrid = Some(id),
                _ => {}
            }
        }
        let declared = info.ssrc_rtx.zip(info.payload_type_rtx);
        match self.streams.iter_mut().find(|l| l.ssrc == info.ssrc) {
            Some(l) if declared.is_some() => {
                l.rtx = declared.map(|(ssrc, _)| ssrc);
                l.declared = declared.map(|(_, pt)| (pt, info.payload_type));
            }
            Some(_) => {}
            None => self.streams.push(Bound {
                ssrc: info.ssrc,
                name: None,
                rtx: declared.map(|(ssrc, _)| ssrc),
                declared: declared.map(|(_, pt)| (pt, info.payload_type)),
            }),
        }
        self.declared |= declared.is_some();
    }

    /// A stream rtc let go of.
    pub fn unbind(&mut self, ssrc: u32) {
        self.streams.retain(|l| l.ssrc != ssrc);
        self.declared = self.streams.iter().any(|l| l.declared.is_some());
    }

    /// An RTP packet arriving: a layer's first packets name it; RTX packets are restored
    /// in place (see the module docs).
    pub fn read(&mut self, p: &mut rtp::Packet) {
        if self.apt.is_empty() && !self.declared {
            return;
        }
        let Some(apt) = self.repaired_payload_type(p.header.payload_type) else {
            self.learn_layer(p);
            return;
        };
        let Some(layer) = self.repaired_stream(p) else { return };
        let Some(&[high, low]) = p.payload.first_chunk::<2>() else { return };
        let original = u16::from_be_bytes([high, low]);
        p.header.ssrc = layer;
        p.header.payload_type = apt;
        p.header.sequence_number = original;
        p.header.padding = false;
        p.payload = p.payload.slice(2..);
        if let Some(rrid) = self.rrid {
            // Now the layer's own packet; a repaired RID on it would only confuse rtc.
            let _ = p.header.del_extension(rrid);
        }
        self.counters.rtx_repairs.fetch_add(1, Relaxed);
    }

    /// The payload type an RTX payload type repairs; `None` for one that is not RTX.
    fn repaired_payload_type(&self, pt: u8) -> Option<u8> {
        let from_answer = self.apt.iter().find(|(rtx, _)| *rtx == pt).map(|(_, apt)| *apt);
        from_answer.or_else(|| self.streams.iter().find_map(|l| l.declared.filter(|(rtx, _)| *rtx == pt).map(|(_, apt)| apt)))
    }

    /// Notes the MID and RID a bound layer's packet carries, until it is named.
    fn learn_layer(&mut self, p: &rtp::Packet) {
        if self.apt.is_empty() {
            // No simulcast m-line: no layer to name.
            return;
        }
        let Some(layer) = self.streams.iter_mut().find(|l| l.ssrc == p.header.ssrc) else { return };
        if layer.name.is_some() {
            return;
        }
        let (Some(mid), Some(rid)) = (self.mid, self.rid) else { return };
        if let (Some(mid), Some(rid)) = (p.header.get_extension(mid), p.header.get_extension(rid)) {
            layer.name = Some((mid, rid));
        }
    }

    /// The SSRC of the stream an RTX packet repairs: a declared flow's, or a layer's, known
    /// by its SSRC once an earlier packet of the flow named the layer (browsers stop
    /// sending MID and RIDs once the receiver reports on the flow).
    fn repaired_stream(&mut self, p: &rtp::Packet) -> Option<u32> {
        let ssrc = p.header.ssrc;
        if let Some(l) = self.streams.iter().find(|l| l.rtx == Some(ssrc)) {
            return Some(l.ssrc);
        }
        let rrid = p.header.get_extension(self.rrid?)?;
        let mid = self.mid.and_then(|id| p.header.get_extension(id));
        let named = |l: &Bound| l.name.as_ref().is_some_and(|(m, r)| *r == rrid && mid.as_ref().is_none_or(|mid| m == mid));
        // Without a MID the RID must name one layer only (RIDs are per m-line).
        if mid.is_none() && self.streams.iter().filter(|l| named(l)).count() > 1 {
            return None;
        }
        let layer = self.streams.iter_mut().find(|l| named(l))?;
        // A layer has one RTX flow: a new SSRC for it (a restarted encoder) replaces the old.
        layer.rtx = Some(ssrc);
        Some(layer.ssrc)
    }
}

#[cfg(test)]
mod tests {
    use rtc::interceptor::RTPHeaderExtension;

    use super::*;

    const MID: u8 = 1;
    const RID: u8 = 2;
    const RRID: u8 = 3;

    fn layer(ssrc: u32) -> StreamInfo {
        let ext = |uri: &str, id| RTPHeaderExtension { uri: uri.into(), id };
        StreamInfo {
            ssrc,
            payload_type: 96,
            rtp_header_extensions: vec![ext(MID_URI, 1), ext(RID_URI, 2), ext(RRID_URI, 3), ext("urn:other", 4)],
            ..Default::default()
        }
    }

    fn packet(ssrc: u32, pt: u8, seq: u16, ext: &[(u8, &str)], payload: &[u8]) -> rtp::Packet {
        let mut p = rtp::Packet {
            header: rtp::Header { version: 2, ssrc, payload_type: pt, sequence_number: seq, timestamp: 9000, ..Default::default() },
            payload: Bytes::copy_from_slice(payload),
        };
        for (id, value) in ext {
            p.header.set_extension(*id, Bytes::copy_from_slice(value.as_bytes())).unwrap();
        }
        p
    }

    /// Two layers of m-line "0" (SSRCs 1 and 2, RIDs q and h) named by their first packets.
    fn two_layers() -> (RtxIn, Arc<RtcpCounters>) {
        let counters = Arc::new(RtcpCounters::default());
        let mut l = RtxIn::new(counters.clone());
        l.set_layer_rtx(vec![(97, 96)]);
        for (ssrc, rid) in [(1, "q"), (2, "h")] {
            l.bind(&layer(ssrc));
            l.read(&mut packet(ssrc, 96, 10, &[(MID, "0"), (RID, rid)], b"media"));
        }
        (l, counters)
    }

    #[test]
    fn a_layers_rtx_packet_becomes_the_packet_it_repairs() {
        let (mut l, counters) = two_layers();
        let mut rtx = packet(11, 97, 500, &[(MID, "0"), (RRID, "h"), (4, "x")], &[0x12, 0x34, 7, 8, 9]);
        rtx.header.padding = true;
        l.read(&mut rtx);
        assert_eq!((rtx.header.ssrc, rtx.header.payload_type, rtx.header.sequence_number), (2, 96, 0x1234));
        assert_eq!(&rtx.payload[..], &[7, 8, 9]);
        assert!(!rtx.header.padding);
        assert_eq!(rtx.header.get_extension(RRID), None, "the repaired RID is gone");
        assert_eq!(rtx.header.get_extension(4).as_deref(), Some(&b"x"[..]), "other extensions stay");
        assert_eq!(rtx.header.timestamp, 9000);
        // Later packets of the flow carry no extensions: known by their SSRC.
        let mut later = packet(11, 97, 501, &[], &[0x12, 0x40, 1]);
        l.read(&mut later);
        assert_eq!((later.header.ssrc, later.header.sequence_number, &later.payload[..]), (2, 0x1240, &[1u8][..]));
        assert_eq!(counters.rtx_repairs.load(Relaxed), 2);
        // The layer's own packets pass as they are.
        let mut media = packet(2, 96, 11, &[], b"more");
        l.read(&mut media);
        assert_eq!((media.header.ssrc, media.header.sequence_number, &media.payload[..]), (2, 11, &b"more"[..]));
        // A new RTX SSRC for the layer (a restarted encoder) replaces the old.
        let mut renewed = packet(12, 97, 1, &[(MID, "0"), (RRID, "h")], &[0, 5, 1]);
        l.read(&mut renewed);
        assert_eq!(renewed.header.ssrc, 2);
        let mut old = packet(11, 97, 502, &[], &[0, 6, 1]);
        l.read(&mut old);
        assert_eq!(old.header.ssrc, 11, "the old flow is no longer the layer's");
    }

    #[test]
    fn what_cannot_be_restored_passes_untouched() {
        let (mut l, counters) = two_layers();
        let untouched = |l: &mut RtxIn, mut p: rtp::Packet| {
            let before = p.clone();
            l.read(&mut p);
            assert_eq!(p, before);
        };
        // A padding-only probe (rtc leaves the padding out of the payload): nothing to restore.
        untouched(&mut l, packet(11, 97, 1, &[(MID, "0"), (RRID, "q")], &[]));
        untouched(&mut l, packet(11, 97, 2, &[(MID, "0"), (RRID, "q")], &[9]));
        // A RID no layer has, another m-line's, no repaired RID at all.
        untouched(&mut l, packet(13, 97, 1, &[(MID, "0"), (RRID, "f")], &[0, 1, 2]));
        untouched(&mut l, packet(13, 97, 1, &[(MID, "1"), (RRID, "q")], &[0, 1, 2]));
        untouched(&mut l, packet(13, 97, 1, &[(MID, "0")], &[0, 1, 2]));
        // Not an RTX payload type of a simulcast m-line.
        untouched(&mut l, packet(13, 98, 1, &[(MID, "0"), (RRID, "q")], &[0, 1, 2]));
        assert_eq!(counters.rtx_repairs.load(Relaxed), 0);
        // An SSRC rtc did not bind naming itself h does not become the layer.
        l.read(&mut packet(99, 96, 1, &[(MID, "0"), (RID, "f")], b"junk"));
        untouched(&mut l, packet(13, 97, 1, &[(MID, "0"), (RRID, "f")], &[0, 1, 2]));
        // A layer rtc let go of.
        l.unbind(1);
        untouched(&mut l, packet(14, 97, 1, &[(MID, "0"), (RRID, "q")], &[0, 1, 2]));
        // Nothing expected: nothing touched.
        let (mut quiet, _) = two_layers();
        quiet.set_layer_rtx(Vec::new());
        untouched(&mut quiet, packet(11, 97, 1, &[(MID, "0"), (RRID, "h")], &[0, 1, 2]));
    }

    /// A flow the SDP declares (FID) is known by its SSRC from the bind, without simulcast
    /// m-lines or extensions; its packets are restored with the stream's payload type.
    #[test]
    fn a_declared_rtx_flow_is_restored_by_its_ssrc() {
        let counters = Arc::new(RtcpCounters::default());
        let mut l = RtxIn::new(counters.clone());
        let mut media = packet(1, 100, 7, &[], b"media");
        l.read(&mut media);
        assert_eq!(media.header.ssrc, 1);
        l.bind(&StreamInfo { ssrc: 1, ssrc_rtx: Some(21), payload_type: 100, payload_type_rtx: Some(101), ..Default::default() });
        // rtc binds the flow in its own right too.
        l.bind(&StreamInfo { ssrc: 21, payload_type: 101, ..Default::default() });
        let mut rtx = packet(21, 101, 3, &[], &[0, 7, 1, 2]);
        l.read(&mut rtx);
        assert_eq!((rtx.header.ssrc, rtx.header.payload_type, rtx.header.sequence_number, &rtx.payload[..]), (1, 100, 7, &[1u8, 2][..]));
        // Another stream's payload type on that SSRC is not this flow's RTX.
        let mut other = packet(21, 96, 4, &[], &[0, 8, 1]);
        l.read(&mut other);
        assert_eq!(other.header.ssrc, 21);
        assert_eq!(counters.rtx_repairs.load(Relaxed), 1);
        l.unbind(1);
        let mut gone = packet(21, 101, 5, &[], &[0, 9, 1]);
        l.read(&mut gone);
        assert_eq!(gone.header.ssrc, 21, "the stream was let go of");
        assert!(!l.declared, "with no declared flow left, reads take the fast path again");
    }

    /// RIDs are per m-line: without a MID, a repaired RID two m-lines have is not taken.
    #[test]
    fn without_a_mid_the_rid_must_be_unambiguous() {
        let (mut l, _) = two_layers();
        l.bind(&layer(3));
        l.read(&mut packet(3, 96, 10, &[(MID, "1"), (RID, "h")], b"media"));
        let mut ambiguous = packet(11, 97, 1, &[(RRID, "h")], &[0, 1, 2]);
        l.read(&mut ambiguous);
        assert_eq!(ambiguous.header.ssrc, 11);
        let mut unique = packet(11, 97, 1, &[(RRID, "q")], &[0, 1, 2]);
        l.read(&mut unique);
        assert_eq!(unique.header.ssrc, 1);
        let mut named = packet(15, 97, 1, &[(MID, "1"), (RRID, "h")], &[0, 1, 2]);
        l.read(&mut named);
        assert_eq!(named.header.ssrc, 3);
    }
}
