//! Simulcast: a publisher's video in several layers (RIDs, RFC 8853), and what moving a
//! subscriber from one layer to another takes — a keyframe of the new layer to start on
//! ([`VideoCodec::starts_keyframe`]), and picture ids that go on where the old layer's
//! stopped ([`Vp8Munger`]; sequence numbers and timestamps are the [`crate::forward::Rewriter`]'s).
//!
//! [`LayerBoard`] is a layered video as every worker sees it: its layers' RIDs and tracks
//! (fixed when the first layer flows) and what the publisher's worker measures of them —
//! which flow, their picture sizes and bitrates — written when they change, never per
//! packet, and read only when a subscriber's layer is chosen.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rtc::rtp;
use tessera_core::agent::LayerChoice;

/// Layers a publication may offer (OWT and browsers use up to 3).
pub const MAX_LAYERS: usize = 4;

/// Video codecs whose keyframes the SFU can find: a layer switch waits for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoCodec {
    /// VP8 (RFC 7741).
    Vp8,
    /// H.264 (RFC 6184).
    H264,
    /// Anything else: subscribers stay on the layer they started with.
    Other,
}

impl VideoCodec {
    /// The family of a codec's MIME type (`video/VP8`, ...).
    pub fn of(mime: &str) -> VideoCodec {
        let name = mime.rsplit('/').next().unwrap_or(mime);
        if name.eq_ignore_ascii_case("vp8") {
            VideoCodec::Vp8
        } else if name.eq_ignore_ascii_case("h264") {
            VideoCodec::H264
        } else {
            VideoCodec::Other
        }
    }

    /// The picture size a packet shows: a VP8 keyframe's header, an H.264 SPS.
    pub fn picture_size(self, payload: &[u8]) -> Option<(u16, u16)> {
        match self {
            VideoCodec::Vp8 => vp8_keyframe_size(payload),
            VideoCodec::H264 => h264_sps_size(payload),
            VideoCodec::Other => None,
        }
    }

    /// Whether the payload is the first packet of a keyframe.
    pub fn starts_keyframe(self, payload: &[u8]) -> bool {
        match self {
            VideoCodec::Vp8 => vp8_keyframe_header(payload).is_some(),
            VideoCodec::H264 => h264_starts_keyframe(payload),
            VideoCodec::Other => false,
        }
    }
}

/// Where a VP8 payload descriptor keeps its fields: (picture id at, 15-bit), TL0PICIDX
/// at, and the length of the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Vp8Descriptor {
    picture_id: Option<(usize, bool)>,
    tl0: Option<usize>,
    len: usize,
}

fn vp8_descriptor(payload: &[u8]) -> Option<Vp8Descriptor> {
    let first = *payload.first()?;
    let mut d = Vp8Descriptor { picture_id: None, tl0: None, len: 1 };
    if first & 0x80 == 0 {
        return Some(d);
    }
    let x = *payload.get(1)?;
    d.len = 2;
    if x & 0x80 != 0 {
        let m = *payload.get(d.len)? & 0x80 != 0;
        d.picture_id = Some((d.len, m));
        d.len += if m { 2 } else { 1 };
    }
    if x & 0x40 != 0 {
        d.tl0 = Some(d.len);
        d.len += 1;
    }
    if x & 0x30 != 0 {
        d.len += 1;
    }
    (payload.len() > d.len).then_some(d)
}

/// The VP8 frame header after the descriptor when the packet starts a keyframe (S bit,
/// partition 0, P bit clear).
fn vp8_keyframe_header(payload: &[u8]) -> Option<&[u8]> {
    let first = *payload.first()?;
    if first & 0x10 == 0 || first & 0x07 != 0 {
        return None;
    }
    let d = vp8_descriptor(payload)?;
    let header = payload.get(d.len..)?;
    (header.first()? & 0x01 == 0).then_some(header)
}

/// A VP8 keyframe's picture size, from its first packet (start code `9d 01 2a`, then
/// 14-bit width and height).
pub fn vp8_keyframe_size(payload: &[u8]) -> Option<(u16, u16)> {
    let h = vp8_keyframe_header(payload)?;
    if h.get(3..6)? != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let w = u16::from_le_bytes([*h.get(6)?, *h.get(7)?]) & 0x3fff;
    let hgt = u16::from_le_bytes([*h.get(8)?, *h.get(9)?]) & 0x3fff;
    (w > 0 && hgt > 0).then_some((w, hgt))
}

/// A VP8 payload's picture id (7 or 15 bits), when it has one.
pub fn vp8_picture_id(payload: &[u8]) -> Option<u16> {
    let (at, long) = vp8_descriptor(payload)?.picture_id?;
    picture_id_at(payload, at, long).map(|(id, _)| id)
}

/// The picture id the descriptor keeps at `at` (15 bits when `long`), and its mask.
fn picture_id_at(payload: &[u8], at: usize, long: bool) -> Option<(u16, u16)> {
    let hi = u16::from(*payload.get(at)? & 0x7f);
    if long { Some((hi << 8 | u16::from(*payload.get(at + 1)?), 0x7fff)) } else { Some((hi, 0x7f)) }
}

/// H.264: an IDR slice or a sequence parameter set starts the packet (single NAL unit,
/// inside a STAP-A, or the first fragment of an FU-A).
fn h264_starts_keyframe(payload: &[u8]) -> bool {
    let key = |nal: u8| matches!(nal & 0x1f, 5 | 7);
    let Some(&first) = payload.first() else { return false };
    match first & 0x1f {
        24 => stap_a_units(payload).any(|unit| unit.first().is_some_and(|&nal| key(nal))),
        28 => payload.get(1).is_some_and(|&fu| fu & 0x80 != 0 && key(fu)),
        _ => key(first),
    }
}

/// The NAL units a STAP-A aggregates (`payload` from its header byte on), each whole. A
/// unit of length zero or cut off by the packet's end ends the walk: the packet is
/// malformed, and nothing in it from there on is trusted (one rule for keyframes and
/// sizes).
fn stap_a_units(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = payload.get(1..).unwrap_or_default();
    std::iter::from_fn(move || {
        let (size, tail) = rest.split_first_chunk::<2>()?;
        let size = usize::from(u16::from_be_bytes(*size));
        let unit = tail.get(..size).filter(|u| !u.is_empty());
        rest = if unit.is_some() { tail.get(size..).unwrap_or_default() } else { &[] };
        unit
    })
}

/// An H.264 picture size, from a sequence parameter set the packet carries (a single NAL
/// unit or inside a STAP-A; browsers send it with every IDR), cropping applied.
pub fn h264_sps_size(payload: &[u8]) -> Option<(u16, u16)> {
    let is_sps = |nal: &[u8]| nal.first().is_some_and(|b| b & 0x1f == 7);
    match payload.first()? & 0x1f {
        7 => sps_size(payload),
        24 => stap_a_units(payload).find(|unit| is_sps(unit)).and_then(sps_size),
        _ => None,
    }
}

/// Reads an RBSP bit by bit (emulation-prevention bytes already removed).
struct Bits<'a> {
    data: &'a [u8],
    at: usize,
}

impl Bits<'_> {
    fn bit(&mut self) -> Option<u32> {
        let byte = *self.data.get(self.at / 8)?;
        let bit = (byte >> (7 - self.at % 8)) & 1;
        self.at += 1;
        Some(u32::from(bit))
    }

    fn bits(&mut self, n: u32) -> Option<u32> {
        (0..n).try_fold(0u32, |v, _| Some(v << 1 | self.bit()?))
    }

    /// Exp-Golomb, unsigned (values beyond 32 bits are refused).
    fn ue(&mut self) -> Option<u32> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return None;
            }
        }
        let rest = self.bits(zeros)?;
        ((1u64 << zeros) - 1 + u64::from(rest)).try_into().ok()
    }

    /// Exp-Golomb, signed.
    fn se(&mut self) -> Option<i64> {
        let k = i64::from(self.ue()?);
        Some(if k % 2 == 1 { (k + 1) / 2 } else { -(k / 2) })
    }
}

/// The size a sequence parameter set NAL unit (header byte first) declares.
fn sps_size(nal: &[u8]) -> Option<(u16, u16)> {
    // Emulation prevention: 00 00 03 → 00 00 (an SPS is tens of bytes, once per keyframe).
    let mut rbsp = Vec::with_capacity(nal.len());
    let mut zeros = 0;
    for &b in nal.get(1..)? {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        rbsp.push(b);
    }
    let mut r = Bits { data: &rbsp, at: 0 };
    let profile = r.bits(8)?;
    r.bits(16)?; // constraint flags, level
    r.ue()?; // seq_parameter_set_id
    let mut chroma_format = 1;
    if matches!(profile, 100 | 110 | 122 | 244 | 44 | 83 | 86 | 118 | 128 | 138 | 139 | 134 | 135) {
        chroma_format = r.ue()?;
        if chroma_format > 3 {
            return None;
        }
        if chroma_format == 3 {
            r.bit()?; // separate_colour_plane_flag
        }
        r.ue()?; // bit depths
        r.ue()?;
        r.bit()?; // qpprime_y_zero_transform_bypass_flag
        if r.bit()? == 1 {
            for i in 0..if chroma_format == 3 { 12 } else { 8 } {
                if r.bit()? == 1 {
                    // A scaling list: only read past.
                    let (mut last, mut next) = (8i64, 8i64);
                    for _ in 0..if i < 6 { 16 } else { 64 } {
                        if next != 0 {
                            next = (last + r.se()? + 256).rem_euclid(256);
                        }
                        if next != 0 {
                            last = next;
                        }
                    }
                }
            }
        }
    }
    r.ue()?; // log2_max_frame_num_minus4
    match r.ue()? {
        0 => {
            r.ue()?;
        }
        1 => {
            r.bit()?;
            r.se()?;
            r.se()?;
            let cycle = r.ue()?;
            if cycle > 255 {
                return None;
            }
            for _ in 0..cycle {
                r.se()?;
            }
        }
        2 => {}
        _ => return None,
    }
    r.ue()?; // max_num_ref_frames
    r.bit()?; // gaps_in_frame_num_value_allowed_flag
    let width_mbs = u64::from(r.ue()?) + 1;
    let height_units = u64::from(r.ue()?) + 1;
    let frame_mbs_only = u64::from(r.bit()?);
    if frame_mbs_only == 0 {
        r.bit()?; // mb_adaptive_frame_field_flag
    }
    r.bit()?; // direct_8x8_inference_flag
    let (mut left, mut right, mut top, mut bottom) = (0u64, 0u64, 0u64, 0u64);
    if r.bit()? == 1 {
        (left, right, top, bottom) = (r.ue()?.into(), r.ue()?.into(), r.ue()?.into(), r.ue()?.into());
    }
    // Crop units (H.264 7.4.2.1.1): chroma subsampling, times two for field coding.
    let (sub_w, sub_h) = match chroma_format {
        0 => (1, 1),
        1 => (2, 2),
        2 => (2, 1),
        _ => (1, 1),
    };
    let width = (width_mbs * 16).checked_sub((left + right) * sub_w)?;
    let height = ((2 - frame_mbs_only) * height_units * 16).checked_sub((top + bottom) * sub_h * (2 - frame_mbs_only))?;
    let (w, h) = (u16::try_from(width).ok()?, u16::try_from(height).ok()?);
    (w > 0 && h > 0).then_some((w, h))
}

/// Keeps a subscriber's VP8 picture ids and TL0PICIDX continuous across layer switches:
/// each layer numbers its own pictures, and a decoder that sees the numbers jump back
/// takes the new pictures for old ones and drops them.
#[derive(Debug, Clone, Default)]
pub struct Vp8Munger {
    picture_offset: u16,
    tl0_offset: u8,
    last_picture: Option<u16>,
    last_tl0: Option<u8>,
    rebase: bool,
}

impl Vp8Munger {
    /// The next packet starts another layer: its numbers continue from the last ones sent.
    pub fn rebase(&mut self) {
        self.rebase = true;
    }

    /// Rewrites the packet's picture id and TL0PICIDX; the payload is copied only when
    /// they move (after a switch), never on the first layer.
    pub fn munge(&mut self, packet: &mut rtp::Packet) {
        let Some(d) = vp8_descriptor(&packet.payload) else { return };
        let p = &packet.payload;
        let picture = d.picture_id.and_then(|(at, long)| picture_id_at(p, at, long));
        let tl0 = d.tl0.and_then(|at| p.get(at).copied());
        if std::mem::take(&mut self.rebase) {
            if let (Some((id, _)), Some(last)) = (picture, self.last_picture) {
                self.picture_offset = last.wrapping_add(1).wrapping_sub(id) & 0x7fff;
            }
            if let (Some(t), Some(last)) = (tl0, self.last_tl0) {
                self.tl0_offset = last.wrapping_add(1).wrapping_sub(t);
            }
        }
        let picture_out = picture.map(|(id, mask)| (id.wrapping_add(self.picture_offset) & mask, mask));
        let tl0_out = tl0.map(|t| t.wrapping_add(self.tl0_offset));
        if let Some((out, mask)) = picture_out {
            // Only forward: a late packet of an older picture must not rewind it.
            match self.last_picture {
                Some(last) if out.wrapping_sub(last) & mask > mask / 2 => {}
                _ => self.last_picture = Some(out),
            }
        }
        if let Some(out) = tl0_out {
            match self.last_tl0 {
                Some(last) if out.wrapping_sub(last) > 0x80 => {}
                _ => self.last_tl0 = Some(out),
            }
        }
        if self.picture_offset == 0 && self.tl0_offset == 0 {
            return;
        }
        let mut bytes = BytesMut::from(&packet.payload[..]);
        if let (Some((at, long)), Some((out, _))) = (d.picture_id, picture_out) {
            if long {
                if let Some(b) = bytes.get_mut(at..at + 2) {
                    b.copy_from_slice(&(out | 0x8000).to_be_bytes());
                }
            } else if let Some(b) = bytes.get_mut(at) {
                *b = out as u8 & 0x7f;
            }
        }
        if let (Some(at), Some(out)) = (d.tl0, tl0_out)
            && let Some(b) = bytes.get_mut(at)
        {
            *b = out;
        }
        packet.payload = bytes.freeze();
    }
}

/// One layer on a [`LayerBoard`].
#[derive(Debug)]
pub struct BoardLayer {
    /// Its RID.
    pub rid: String,
    /// The published track that carries it.
    pub track: u64,
    /// `width << 16 | height` of its last keyframe; 0 until one was seen.
    size: AtomicU32,
    /// Bits per second, over the last measuring interval.
    bitrate: AtomicU32,
    /// Frames per second, over the last measuring interval.
    framerate: AtomicU32,
}

/// A layered video's layers, shared by the publisher's worker (which writes what it
/// measures, on change) and the workers whose subscribers take it (which read it when
/// they choose a layer).
#[derive(Debug)]
pub struct LayerBoard {
    /// Unique across the agent (the publisher's worker's timers and commands name it).
    pub id: u64,
    /// The codec every layer uses.
    pub codec: VideoCodec,
    /// In the order the publisher declared them.
    pub layers: Vec<BoardLayer>,
    /// Bit i: layer i is flowing.
    live: AtomicU32,
    /// Subscriber legs, on every worker, that may want any layer (`auto`, a resolution).
    wide: AtomicU32,
    /// Subscriber legs, on every worker, that want layer i (by RID).
    want: [AtomicU32; MAX_LAYERS],
}

impl LayerBoard {
    /// A board for the declared layers (RID, track), none flowing yet.
    pub fn new(id: u64, codec: VideoCodec, layers: Vec<(String, u64)>) -> LayerBoard {
        let layers = layers
            .into_iter()
            .take(MAX_LAYERS)
            .map(|(rid, track)| BoardLayer { rid, track, size: AtomicU32::new(0), bitrate: AtomicU32::new(0), framerate: AtomicU32::new(0) })
            .collect();
        LayerBoard { id, codec, layers, live: AtomicU32::new(0), wide: AtomicU32::new(0), want: Default::default() }
    }

    /// The index of the layer carried by `track`.
    pub fn index_of(&self, track: u64) -> Option<usize> {
        self.layers.iter().position(|l| l.track == track)
    }

    /// The index of the layer of `rid`.
    pub fn index_of_rid(&self, rid: &str) -> Option<usize> {
        self.layers.iter().position(|l| l.rid == rid)
    }

    /// Counts a subscriber leg's choice in (`true`) or out: a RID wants that layer, `auto`
    /// and a resolution may want any.
    pub fn count_choice(&self, choice: &LayerChoice, on: bool) {
        let cell = match choice {
            LayerChoice::Rid(rid) => self.index_of_rid(rid).and_then(|i| self.want.get(i)).unwrap_or(&self.wide),
            LayerChoice::Auto | LayerChoice::Resolution { .. } | LayerChoice::Bitrate { .. } | LayerChoice::Fill { .. } => &self.wide,
        };
        if on {
            cell.fetch_add(1, Ordering::Relaxed);
        } else {
            let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// The layers the publisher should send (bit i: layer i): all of them while a reader
    /// may want any (a subscriber on `auto` or by resolution, or `tapped`: the mixer, a
    /// recording); else every layer up to the highest that a subscriber reads (`read`)
    /// or asked for by RID, lower ones kept for moving down; else only the lowest, so
    /// that a new subscriber starts at once.
    pub fn wanted(&self, tapped: bool, read: impl Fn(usize) -> bool) -> u32 {
        let all = (1u32 << self.layers.len()) - 1;
        if tapped || self.wide.load(Ordering::Relaxed) > 0 {
            return all;
        }
        let asked = |i: usize| self.want.get(i).is_some_and(|c| c.load(Ordering::Relaxed) > 0);
        let order = self.ranked_all();
        let upto = order.iter().rposition(|&i| read(i) || asked(i)).unwrap_or(0);
        order.iter().take(upto + 1).fold(0, |mask, &i| mask | 1 << i)
    }

    /// Which layers flow (bit i: layer i).
    pub fn live_mask(&self) -> u32 {
        self.live.load(Ordering::Relaxed)
    }

    /// Sets which layers flow; returns whether that changed.
    pub fn set_live_mask(&self, mask: u32) -> bool {
        self.live.swap(mask, Ordering::Relaxed) != mask
    }

    /// Whether layer `i` flows.
    pub fn is_live(&self, i: usize) -> bool {
        i < MAX_LAYERS && self.live_mask() & (1 << i) != 0
    }

    /// Layer `i`'s picture size, once a keyframe showed it.
    pub fn size(&self, i: usize) -> Option<(u16, u16)> {
        let v = self.layers.get(i)?.size.load(Ordering::Relaxed);
        (v != 0).then_some(((v >> 16) as u16, v as u16))
    }

    /// Records layer `i`'s picture size; returns whether it changed.
    pub fn set_size(&self, i: usize, (w, h): (u16, u16)) -> bool {
        let v = u32::from(w) << 16 | u32::from(h);
        self.layers.get(i).is_some_and(|l| l.size.swap(v, Ordering::Relaxed) != v)
    }

    /// Layer `i`'s bitrate (bits per second) over the last interval.
    pub fn bitrate(&self, i: usize) -> u32 {
        self.layers.get(i).map_or(0, |l| l.bitrate.load(Ordering::Relaxed))
    }

    /// Records layer `i`'s bitrate.
    pub fn set_bitrate(&self, i: usize, bps: u32) {
        if let Some(l) = self.layers.get(i) {
            l.bitrate.store(bps, Ordering::Relaxed);
        }
    }

    /// Layer `i`'s frame rate over the last interval.
    pub fn framerate(&self, i: usize) -> u32 {
        self.layers.get(i).map_or(0, |l| l.framerate.load(Ordering::Relaxed))
    }

    /// Records layer `i`'s frame rate.
    pub fn set_framerate(&self, i: usize, fps: u32) {
        if let Some(l) = self.layers.get(i) {
            l.framerate.store(fps, Ordering::Relaxed);
        }
    }

    /// Every layer from the lowest to the highest: by picture size where every layer's is
    /// known, else by bitrate where measured, else as declared.
    pub fn ranked_all(&self) -> Vec<usize> {
        self.rank((0..self.layers.len()).collect())
    }

    /// The flowing layers, lowest first (by picture size where every flowing layer's is
    /// known, else by bitrate, else as declared: a layer that never flows does not decide).
    pub fn ranked(&self) -> Vec<usize> {
        self.rank((0..self.layers.len()).filter(|&i| self.is_live(i)).collect())
    }

    fn rank(&self, mut order: Vec<usize>) -> Vec<usize> {
        let area = |i: usize| self.size(i).map(|(w, h)| u32::from(w) * u32::from(h));
        if order.iter().all(|&i| area(i).is_some()) {
            order.sort_by_key(|&i| (area(i), self.bitrate(i), i));
        } else if order.iter().all(|&i| self.bitrate(i) > 0) {
            order.sort_by_key(|&i| (self.bitrate(i), i));
        }
        order
    }

    /// The layer to forward for a subscriber's choice, among the flowing ones; none while
    /// no layer flows. A RID that does not flow gives the nearest lower flowing layer,
    /// else the nearest higher one.
    pub fn choose(&self, choice: &LayerChoice) -> Option<usize> {
        let live = self.ranked();
        match choice {
            LayerChoice::Auto => live.last().copied(),
            LayerChoice::Rid(rid) => {
                let Some(want) = self.index_of_rid(rid) else { return live.last().copied() };
                if self.is_live(want) {
                    return Some(want);
                }
                let all = self.ranked_all();
                let pos = all.iter().position(|&i| i == want)?;
                let below = all.get(..pos).and_then(|b| b.iter().rev().find(|&&i| self.is_live(i)));
                below.or_else(|| all.get(pos + 1..).and_then(|a| a.iter().find(|&&i| self.is_live(i)))).copied()
            }
            LayerChoice::Resolution { width, height } => {
                let want = i64::from(*width) * i64::from(*height);
                let sized: Vec<(usize, i64)> =
                    live.iter().filter_map(|&i| self.size(i).map(|(w, h)| (i, (i64::from(w) * i64::from(h) - want).abs()))).collect();
                // Ties go to the lower layer (ranked first).
                sized.iter().min_by_key(|(_, d)| *d).map(|(i, _)| *i).or(live.last().copied())
            }
            LayerChoice::Bitrate { permille } => {
                let top = live.last().map_or(0, |&i| u64::from(self.bitrate(i)));
                let want = top * u64::from(*permille) / 1000;
                // Layers not measured yet are left out; ties go to the lower layer.
                let measured = live.iter().filter(|&&i| self.bitrate(i) > 0).map(|&i| (i, u64::from(self.bitrate(i)).abs_diff(want)));
                measured.min_by_key(|(_, d)| *d).map(|(i, _)| i).or(live.last().copied())
            }
            // Not shown: the lowest, whether sizes are known or not.
            LayerChoice::Fill { width: 0, .. } | LayerChoice::Fill { height: 0, .. } => live.first().copied(),
            LayerChoice::Fill { width, height } => {
                // Fitted inside the region with its aspect ratio kept (the mixer letterboxes), a
                // picture is not enlarged when its width or its height reaches the region's.
                let covers = |i: usize| self.size(i).is_some_and(|(w, h)| u32::from(w) >= *width || u32::from(h) >= *height);
                live.iter().copied().find(|&i| covers(i)).or(live.last().copied())
            }
        }
    }
}

/// How the server picks the layer of a subscriber on `auto`, from its connection's
/// bandwidth estimate ([`crate::bwe`]): it starts on the highest layer (or the best that
/// fits a known estimate), and until it first meets congestion goes straight to the best
/// layer that fits GCC's target when more layers flow; on congestion — a tenth of the packets lost over the last
/// second, or GCC's target falling by a sixth — it goes down at once, to the best layer
/// that fits 90 % of what reached the client, at least one layer, then lets the move take
/// effect for [`AUTO_SETTLE`] before acting again. It goes up carefully: one layer at a
/// time, after [`AUTO_BACKOFF`] without congestion, as a trial that must meet no
/// congestion for [`AUTO_TRIAL`]; a failed trial doubles the wait before the next (up to
/// [`AUTO_BACKOFF_MAX`]). Going up is the probe: GCC's own increase is too slow to follow
/// a link that was freed (8 % a second). Where the media's packet trains show the link's
/// capacity ([`crate::bwe`]), a try is made only when the next layer fits it with a tenth
/// spare, and when it does, steps up come after [`AUTO_FAST_STEP`] instead of the backoff
/// and the trial; a link whose capacity misled a try once (a shaper with a large token
/// bucket passes short trains at full speed) gets only the gate from then on.
#[derive(Debug, Clone, Default)]
pub struct AutoState {
    /// GCC's targets of the last [`PEAK_SPAN`] (since the last move down), oldest first.
    targets: std::collections::VecDeque<(Instant, u64)>,
    quiet_since: Option<Instant>,
    backoff: Option<Duration>,
    trial: Option<Instant>,
    /// The running trial was made on the capacity's word.
    trial_on_capacity: bool,
    /// When the switch of the last step up made on the capacity's word took place.
    capacity_step: Option<Instant>,
    /// Such a step waits for its switch.
    capacity_pending: bool,
    /// When [`AutoState::switching`] was last told (the same tick as `next` while it waits).
    switch_seen: Option<Instant>,
    /// The packet trains' capacity misled a step up of this subscriber's (congestion
    /// followed within [`AUTO_TRIAL`]): it only gates tries from then on.
    capacity_misled: bool,
    settle_until: Option<Instant>,
    /// Whether this subscriber has met congestion yet: until then it goes straight to
    /// the best layer that fits GCC's target (a new subscriber, layers that came back).
    congested_once: bool,
}

/// Quiet time before trying a higher layer (doubled after each failed try).
pub const AUTO_BACKOFF: Duration = Duration::from_secs(3);
/// The longest wait between two tries.
pub const AUTO_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A try that meets no congestion for this long keeps its layer.
pub const AUTO_TRIAL: Duration = Duration::from_secs(3);
/// How long a move down settles after its switch took place (a second of feedback, and
/// some for the link's queue).
pub const SWITCH_SETTLE: Duration = Duration::from_millis(1500);
/// Quiet time before a step up, and its trial, where packet trains show room for it.
pub const AUTO_FAST_STEP: Duration = Duration::from_secs(1);
/// After a move down, congestion is not acted on again for this long (the move waits for a
/// keyframe, the estimate for the queue to drain).
pub const AUTO_SETTLE: Duration = Duration::from_millis(2500);
/// GCC's target falling by a sixth below its highest over this span is congestion.
const PEAK_SPAN: Duration = Duration::from_secs(2);
/// Feedback older than this says nothing (the client stopped sending it): hold.
const STALE: Duration = Duration::from_millis(1500);
/// Loss (per mille of the last second's packets) that is congestion.
const LOSS_CONGESTION: u32 = 100;
/// Feedback covering fewer packets says nothing about loss.
const LOSS_MIN_PACKETS: u32 = 20;

impl AutoState {
    /// Whether a move down still settles (then the link is not probed: its queue drains).
    pub fn settling(&self, now: Instant) -> bool {
        self.settle_until.is_some_and(|t| now < t)
    }

    /// Tells it the subscriber still waits for the keyframe of the layer it moves to: a
    /// move down settles until [`SWITCH_SETTLE`] after that (the loss it measures is then
    /// the new layer's, not the backlog of the old one).
    /// A step up's trial starts when its switch takes place.
    pub fn switching(&mut self, now: Instant) {
        if let Some(t) = self.settle_until
            && now < t
        {
            self.settle_until = Some(t.max(now + SWITCH_SETTLE));
        }
        if self.trial.is_some() {
            self.trial = Some(now);
            self.quiet_since = Some(now);
        }
        self.switch_seen = Some(now);
    }

    /// The layer for a subscriber heading to layer `current` (the one it reads, or the one
    /// it is moving to), given its connection's estimate with `delivered` already its share.
    pub fn next(&mut self, board: &LayerBoard, current: Option<usize>, estimate: crate::bwe::Reading, now: Instant) -> Option<usize> {
        let live = board.ranked();
        let top = *live.last()?;
        if estimate.target == 0 {
            // No feedback (yet): nothing to adapt to.
            return Some(top);
        }
        let fitting = |budget: u64| live.iter().rev().copied().find(|&i| u64::from(board.bitrate(i)) <= budget).or(live.first().copied());
        let Some(at) = current.and_then(|c| live.iter().position(|&i| i == c)) else {
            // First pick, or its layer stopped: the best that fits the estimate.
            self.quiet_since = Some(now);
            self.trial = None;
            return fitting(estimate.target * 85 / 100);
        };
        if estimate.age > STALE {
            return current;
        }
        // A step up on the capacity's word whose switch is done: from now on, congestion
        // within AUTO_TRIAL is its doing.
        if self.capacity_pending && self.switch_seen != Some(now) {
            self.capacity_pending = false;
            self.capacity_step = Some(now);
        }
        let quiet_since = *self.quiet_since.get_or_insert(now);
        let backoff = *self.backoff.get_or_insert(AUTO_BACKOFF);
        // While a move down settles, what GCC does answers the congestion before it: its
        // targets are not kept, and the comparison starts afresh after.
        let settling = self.settle_until.is_some_and(|t| now < t);
        if settling {
            self.targets.clear();
        } else {
            self.targets.push_back((now, estimate.target));
            while self.targets.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) > PEAK_SPAN) {
                self.targets.pop_front();
            }
        }
        let peak = self.targets.iter().map(|(_, t)| *t).max().unwrap_or(estimate.target);
        let lossy = estimate.packets >= LOSS_MIN_PACKETS && estimate.loss_permille >= LOSS_CONGESTION;
        let falling = estimate.target * 6 < peak * 5;
        if lossy || falling {
            self.congested_once = true;
            self.quiet_since = Some(now);
            if settling {
                return current;
            }
            // A failed try waits twice as long before the next; other congestion leaves the wait as it is.
            if self.trial.take().is_some() {
                self.backoff = Some((backoff * 2).min(AUTO_BACKOFF_MAX));
            }
            // A queue may take longer than the fast trial to overflow.
            if self.capacity_step.is_some_and(|t| now.saturating_duration_since(t) < AUTO_TRIAL) {
                self.capacity_misled = true;
                self.capacity_step = None;
            }
            let Some(below) = at.checked_sub(1) else { return current };
            // What GCC does next answers this move, not the congestion before it.
            self.targets.clear();
            self.targets.push_back((now, estimate.target));
            self.settle_until = Some(now + AUTO_SETTLE);
            let fits = fitting(estimate.delivered * 9 / 10).and_then(|f| live.iter().position(|&i| i == f)).unwrap_or(0);
            return live.get(fits.min(below)).copied();
        }
        if !self.congested_once
            && let Some(best) = fitting(estimate.target * 85 / 100)
            && live.iter().position(|&i| i == best).is_some_and(|b| b > at)
        {
            return Some(best);
        }
        // Nothing goes up while a move down settles.
        if settling {
            return current;
        }
        // A try needs room for the next layer where packet trains show the capacity (a
        // tenth spare); unknown capacity leaves it to the try.
        let room = |i: usize| estimate.capacity == 0 || estimate.capacity / 11 * 10 >= u64::from(board.bitrate(i));
        let proven = estimate.capacity != 0 && !self.capacity_misled && live.get(at + 1).is_some_and(|&i| room(i));
        let step = if self.trial_on_capacity && !self.capacity_misled { AUTO_FAST_STEP } else { AUTO_TRIAL };
        if self.trial.is_some_and(|t| now.saturating_duration_since(t) >= step) {
            self.trial = None;
            self.backoff = Some(AUTO_BACKOFF);
            self.quiet_since = Some(now);
        }
        // (From when the trial just passed, if it did.)
        let quiet_since = self.quiet_since.unwrap_or(quiet_since);
        let wait = if proven { AUTO_FAST_STEP } else { self.backoff.unwrap_or(backoff) };
        if self.trial.is_none() && now.saturating_duration_since(quiet_since) >= wait && live.get(at + 1).is_some_and(|&i| room(i)) {
            self.trial = Some(now);
            self.trial_on_capacity = proven;
            self.capacity_pending = proven;
            self.capacity_step = None;
            self.quiet_since = Some(now);
            return live.get(at + 1).copied();
        }
        current
    }
}

#[cfg(test)]
mod tests {

    /// The SPS a real encoder writes for a picture of `width`×`height`, as an RTP
    /// payload: the NAL unit alone, and inside a STAP-A with the PPS after it.
    fn encoded_sps(encoder: &str, format: &str, width: u32, height: u32) -> Option<(Vec<u8>, Vec<u8>)> {
        let dir = std::env::temp_dir().join(format!("tessera-sps-{}-{encoder}-{format}-{width}x{height}", std::process::id()));
        let file = dir.with_extension("h264");
        let caps = format!("video/x-raw,format={format},width={width},height={height}");
        let location = format!("location={}", file.display());
        let args = [
            "30",
            "gst-launch-1.0",
            "-q",
            "videotestsrc",
            "num-buffers=1",
            "!",
            &caps,
            "!",
            encoder,
            "!",
            "video/x-h264,stream-format=byte-stream",
            "!",
            "filesink",
            &location,
        ];
        let ok = std::process::Command::new("timeout").args(args).status().ok()?.success();
        let data = std::fs::read(&file).ok();
        let _ = std::fs::remove_file(&file);
        let data = data.filter(|_| ok)?;
        // Annex B: NAL units after 00 00 01 start codes.
        let starts: Vec<usize> = data.windows(3).enumerate().filter(|(_, w)| *w == [0, 0, 1]).map(|(i, _)| i + 3).collect();
        let nal = |ty: u8| {
            starts.iter().enumerate().find(|(_, at)| data.get(**at).is_some_and(|b| b & 0x1f == ty)).map(|(i, &at)| {
                let end = starts.get(i + 1).map_or(data.len(), |next| next - 3);
                let mut n = data[at..end].to_vec();
                while n.last() == Some(&0) {
                    n.pop();
                }
                n
            })
        };
        let (sps, pps) = (nal(7)?, nal(8)?);
        let mut stap = vec![24u8];
        for n in [&sps, &pps] {
            stap.extend_from_slice(&(n.len() as u16).to_be_bytes());
            stap.extend_from_slice(n);
        }
        Some((sps, stap))
    }

    #[test]
    fn h264_picture_sizes_come_from_real_encoders_sps() {
        // x264 writes High profile (chroma format, 4:2:0 as browsers send, and 4:4:4),
        // openh264 Constrained Baseline; 180 and 90 are not multiples of 16 (cropping).
        // Needs GStreamer's encoders (scripts/install-deps.sh installs them).
        let mut checked = 0;
        for (encoder, format) in [("x264enc", "I420"), ("x264enc", "Y444"), ("openh264enc", "I420")] {
            for (w, h) in [(1280u16, 720u16), (640, 360), (320, 180), (160, 90)] {
                let Some((sps, stap)) = encoded_sps(encoder, format, u32::from(w), u32::from(h)) else {
                    eprintln!("{encoder} {format} not available: skipped");
                    continue;
                };
                assert_eq!(h264_sps_size(&sps), Some((w, h)), "{encoder} {format} {w}x{h}: {sps:02x?}");
                assert_eq!(h264_sps_size(&stap), Some((w, h)), "{encoder} {w}x{h} in a STAP-A");
                assert_eq!(VideoCodec::H264.picture_size(&stap), Some((w, h)));
                // Cut short anywhere: no size, no panic.
                for cut in 1..sps.len() - 1 {
                    let _ = h264_sps_size(&sps[..cut]);
                }
                checked += 1;
            }
        }
        assert!(checked >= 4, "no H.264 encoder to test with");
        // Not an SPS.
        assert_eq!(h264_sps_size(&[0x65, 0x88, 0x84]), None);
        assert_eq!(h264_sps_size(&[0x7c, 0x85, 0x00]), None);
        assert_eq!(h264_sps_size(&[]), None);
    }

    use super::*;

    #[test]
    fn the_publisher_is_asked_for_what_is_read() {
        let b = LayerBoard::new(1, VideoCodec::Vp8, vec![("f".into(), 10), ("h".into(), 11), ("q".into(), 12)]);
        for (i, size) in [(1280, 720), (640, 360), (320, 180)].into_iter().enumerate() {
            b.set_size(i, size);
        }
        assert_eq!(b.wanted(true, |_| false), 0b111);
        assert_eq!(b.wanted(false, |_| false), 0b100, "nobody: the lowest only");
        assert_eq!(b.wanted(false, |i| i == 1), 0b110, "h read: q and h");
        assert_eq!(b.wanted(false, |i| i == 2), 0b100);
        assert_eq!(b.wanted(false, |i| i == 0), 0b111);
        // Asked for by RID (while reading another layer): wanted too.
        b.count_choice(&LayerChoice::Rid("h".into()), true);
        assert_eq!(b.wanted(false, |i| i == 2), 0b110);
        b.count_choice(&LayerChoice::Rid("h".into()), false);
        b.count_choice(&LayerChoice::Rid("h".into()), false);
        assert_eq!(b.wanted(false, |_| false), 0b100, "never below zero");
        // Auto or a resolution may want any.
        b.count_choice(&LayerChoice::Auto, true);
        assert_eq!(b.wanted(false, |_| false), 0b111);
        b.count_choice(&LayerChoice::Auto, false);
        b.count_choice(&LayerChoice::Resolution { width: 1, height: 1 }, true);
        assert_eq!(b.wanted(false, |_| false), 0b111);
    }

    /// Layers q, h, f, all flowing, at these bitrates.
    fn flowing_at(bps: &[u32; 3]) -> LayerBoard {
        let b = LayerBoard::new(1, VideoCodec::Vp8, vec![("q".into(), 10), ("h".into(), 11), ("f".into(), 12)]);
        b.set_live_mask(0b111);
        for (i, bps) in bps.iter().enumerate() {
            b.set_bitrate(i, *bps);
        }
        b
    }

    #[test]
    fn auto_goes_down_at_once_and_up_carefully() {
        use crate::bwe::Reading;
        let (b, t0) = (flowing_at(&[100_000, 300_000, 900_000]), Instant::now());
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let clean = |target: u64, delivered: u64| Reading { target, delivered, loss_permille: 0, packets: 100, capacity: 0, age: Duration::ZERO };
        let lossy = |target: u64, delivered: u64| Reading { target, delivered, loss_permille: 200, packets: 100, capacity: 0, age: Duration::ZERO };
        let mut a = AutoState::default();
        // No feedback yet: the highest layer; a first pick with an estimate: the best that fits.
        assert_eq!(a.next(&b, None, Reading::default(), t0), Some(2));
        assert_eq!(AutoState::default().next(&b, None, clean(500_000, 0), t0), Some(1));
        // On f, clean: stays. Loss: down at once to what fits what was delivered.
        assert_eq!(a.next(&b, Some(2), clean(1_000_000, 900_000), at(0)), Some(2));
        assert_eq!(a.next(&b, Some(2), lossy(1_000_000, 400_000), at(250)), Some(1));
        // Still lossy while the move settles: no further step.
        assert_eq!(a.next(&b, Some(1), lossy(600_000, 300_000), at(1000)), Some(1));
        // GCC's lagging fall during the settling is not acted on; falling further after it is.
        assert_eq!(a.next(&b, Some(1), clean(400_000, 300_000), at(3000)), Some(1));
        assert_eq!(a.next(&b, Some(1), clean(300_000, 300_000), at(3250)), Some(0));
        // Quiet for the backoff (3 s from the last congestion): a try one layer up...
        assert_eq!(a.next(&b, Some(0), clean(400_000, 100_000), at(5000)), Some(0));
        assert_eq!(a.next(&b, Some(0), clean(400_000, 100_000), at(6300)), Some(1));
        // ...that fails: back down, and the next try waits twice as long.
        assert_eq!(a.next(&b, Some(1), lossy(400_000, 200_000), at(6500)), Some(0));
        assert_eq!(a.next(&b, Some(0), clean(400_000, 100_000), at(10_000)), Some(0));
        assert_eq!(a.next(&b, Some(0), clean(400_000, 100_000), at(12_600)), Some(1));
        // This one holds for the trial: kept, and the next step up comes after the base wait.
        assert_eq!(a.next(&b, Some(1), clean(400_000, 300_000), at(15_700)), Some(1));
        assert_eq!(a.next(&b, Some(1), clean(400_000, 300_000), at(17_500)), Some(1));
        assert_eq!(a.next(&b, Some(1), clean(400_000, 300_000), at(18_800)), Some(2));
        // The layer read stops flowing: the best that fits, at once; nothing flows: none.
        b.set_live_mask(0b011);
        assert_eq!(a.next(&b, Some(2), clean(2_000_000, 900_000), at(19_000)), Some(1));
        b.set_live_mask(0);
        assert_eq!(a.next(&b, Some(1), clean(2_000_000, 900_000), at(19_000)), None);
        // Before any congestion, straight to the best that fits (layers that came back).
        b.set_live_mask(0b111);
        assert_eq!(AutoState::default().next(&b, Some(0), clean(2_000_000, 100_000), at(0)), Some(2));
        assert_eq!(AutoState::default().next(&b, Some(0), clean(500_000, 100_000), at(0)), Some(1));
        // Stale feedback: hold.
        let mut stale = AutoState::default();
        assert_eq!(stale.next(&b, Some(1), Reading { age: Duration::from_secs(5), ..lossy(100_000, 10_000) }, at(0)), Some(1));
        // The lowest layer goes nowhere lower.
        let mut low = AutoState::default();
        assert_eq!(low.next(&b, Some(0), clean(150_000, 90_000), at(0)), Some(0));
        assert_eq!(low.next(&b, Some(0), lossy(150_000, 50_000), at(500)), Some(0));
    }

    #[test]
    fn auto_tries_a_higher_layer_only_where_the_capacity_holds_it() {
        use crate::bwe::{Reading, UNBOUNDED};
        let (b, t0) = (flowing_at(&[100_000, 300_000, 900_000]), Instant::now());
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let reading = |loss_permille: u32, capacity: u64| Reading {
            target: 1_000_000,
            delivered: 400_000,
            loss_permille,
            packets: 100,
            capacity,
            age: Duration::ZERO,
        };
        let mut a = AutoState::default();
        assert_eq!(a.next(&b, Some(2), reading(200, 600_000), at(0)), Some(1));
        // Quiet for long, but trains show 600 kbit/s: f (900 kbit/s) would not fit.
        assert_eq!(a.next(&b, Some(1), reading(0, 600_000), at(5000)), Some(1));
        assert_eq!(a.next(&b, Some(1), reading(0, 980_000), at(20_000)), Some(1), "a tenth spare is needed");
        // The link is freed: trains meet no bottleneck, and the try comes at once.
        assert_eq!(a.next(&b, Some(1), reading(0, UNBOUNDED), at(20_250)), Some(2));
        // From a lower layer the steps come a second apart, not after the backoff and the trial.
        let mut q = AutoState::default();
        assert_eq!(q.next(&b, Some(2), Reading { delivered: 150_000, ..reading(200, 150_000) }, at(0)), Some(0));
        assert_eq!(q.next(&b, Some(0), reading(0, 150_000), at(4000)), Some(0), "no room for h");
        assert_eq!(q.next(&b, Some(0), reading(0, UNBOUNDED), at(4250)), Some(1));
        assert_eq!(q.next(&b, Some(1), reading(0, UNBOUNDED), at(4750)), Some(1));
        assert_eq!(q.next(&b, Some(1), reading(0, UNBOUNDED), at(5250)), Some(1), "the trial's second");
        assert_eq!(q.next(&b, Some(1), reading(0, UNBOUNDED), at(6300)), Some(2));
        // That try fails: the trains misled it (a shaper's token bucket), so from now on
        // only the backoff and the trial, though the trains still show room.
        assert_eq!(q.next(&b, Some(2), reading(200, UNBOUNDED), at(6800)), Some(1));
        assert_eq!(q.next(&b, Some(1), reading(0, UNBOUNDED), at(9400)), Some(1));
        assert_eq!(q.next(&b, Some(1), reading(0, UNBOUNDED), at(12_900)), Some(2));
        // Unknown capacity leaves it to tries, as before.
        let mut u = AutoState::default();
        assert_eq!(u.next(&b, Some(2), reading(200, 0), at(0)), Some(1));
        assert_eq!(u.next(&b, Some(1), reading(0, 0), at(3500)), Some(2));
    }

    /// A VP8 payload: extended descriptor with a 15-bit picture id and TL0PICIDX, then a
    /// keyframe (with its size) or an interframe header.
    fn vp8(picture: u16, tl0: u8, key: bool, size: (u16, u16)) -> Vec<u8> {
        let mut p = vec![0x90, 0xC0, 0x80 | (picture >> 8) as u8, picture as u8, tl0];
        if key {
            p.extend_from_slice(&[0x00, 0x00, 0x00, 0x9d, 0x01, 0x2a]);
            p.extend_from_slice(&size.0.to_le_bytes());
            p.extend_from_slice(&size.1.to_le_bytes());
        } else {
            p.extend_from_slice(&[0x01, 0x00, 0x00]);
        }
        p.extend_from_slice(&[0xAA; 20]);
        p
    }

    fn packet(payload: Vec<u8>) -> rtp::Packet {
        rtp::Packet { header: rtp::Header { version: 2, ..Default::default() }, payload: payload.into() }
    }

    fn ids(p: &rtp::Packet) -> (u16, u8) {
        (u16::from_be_bytes([p.payload[2], p.payload[3]]) & 0x7fff, p.payload[4])
    }

    #[test]
    fn vp8_keyframes_and_their_size_are_found() {
        assert!(VideoCodec::Vp8.starts_keyframe(&vp8(5, 1, true, (640, 480))));
        assert_eq!(vp8_keyframe_size(&vp8(5, 1, true, (640, 480))), Some((640, 480)));
        assert!(!VideoCodec::Vp8.starts_keyframe(&vp8(5, 1, false, (0, 0))));
        // A continuation packet (S bit clear) is never a start.
        let mut cont = vp8(5, 1, true, (640, 480));
        cont[0] = 0x80;
        assert!(!VideoCodec::Vp8.starts_keyframe(&cont));
        // The one-byte descriptor form.
        assert!(VideoCodec::Vp8.starts_keyframe(&[0x10, 0x00, 0x00, 0x00, 0x9d, 0x01, 0x2a, 0x40, 0x01, 0xf0, 0x00]));
        assert_eq!(vp8_keyframe_size(&[0x10, 0x00, 0x00, 0x00, 0x9d, 0x01, 0x2a, 0x40, 0x01, 0xf0, 0x00]), Some((320, 240)));
        for garbage in [&[][..], &[0x90], &[0x90, 0xff], &[0x10], &[0xff; 3]] {
            assert!(!VideoCodec::Vp8.starts_keyframe(garbage));
            assert_eq!(vp8_keyframe_size(garbage), None);
        }
    }

    #[test]
    fn h264_keyframes_are_found_in_every_packetisation() {
        let h = VideoCodec::of("video/H264");
        assert!(h.starts_keyframe(&[0x65, 0x88]), "IDR slice");
        assert!(h.starts_keyframe(&[0x67, 0x42]), "SPS");
        assert!(!h.starts_keyframe(&[0x41, 0x9a]), "non-IDR slice");
        // STAP-A with SPS and PPS.
        assert!(h.starts_keyframe(&[0x78, 0x00, 0x02, 0x67, 0x42, 0x00, 0x02, 0x68, 0xce]));
        assert!(!h.starts_keyframe(&[0x78, 0x00, 0x02, 0x68, 0xce, 0x00, 0x09]));
        // FU-A: the first fragment of an IDR, not the later ones.
        assert!(h.starts_keyframe(&[0x7c, 0x85, 0x88]));
        assert!(!h.starts_keyframe(&[0x7c, 0x05, 0x88]));
        assert!(!h.starts_keyframe(&[0x7c, 0x81, 0x88]));
        assert!(!h.starts_keyframe(&[]) && !h.starts_keyframe(&[0x78, 0xff]) && !h.starts_keyframe(&[0x7c]));
        // A malformed STAP-A is trusted up to its first bad unit: a zero-length one, or
        // one cut off (the same rule as for the sizes).
        assert!(!h.starts_keyframe(&[0x78, 0x00, 0x00, 0x00, 0x02, 0x67, 0x42]), "after a zero-length unit");
        assert!(!h.starts_keyframe(&[0x78, 0x00, 0x09, 0x65, 0x88]), "cut off");
        assert!(h.starts_keyframe(&[0x78, 0x00, 0x02, 0x65, 0x88, 0x00, 0x09, 0x41]), "before a cut-off unit");
        let units: Vec<&[u8]> = stap_a_units(&[0x78, 0x00, 0x01, 0x09, 0x00, 0x02, 0x68, 0xce, 0x00]).collect();
        assert_eq!(units, [&[0x09][..], &[0x68, 0xce][..]], "a lone length byte at the end is no unit");
        assert_eq!(VideoCodec::of("video/VP9"), VideoCodec::Other);
    }

    #[test]
    fn picture_ids_go_on_across_a_switch_and_wrap() {
        let mut m = Vp8Munger::default();
        // The first layer passes untouched (no copy: the very same bytes).
        let mut p = packet(vp8(0x7ffe, 200, true, (320, 240)));
        let before = p.payload.as_ptr();
        m.munge(&mut p);
        assert_eq!((ids(&p), p.payload.as_ptr()), ((0x7ffe, 200), before));
        let mut p = packet(vp8(0x7fff, 255, false, (0, 0)));
        m.munge(&mut p);
        assert_eq!(ids(&p), (0x7fff, 255));
        // Another layer, numbered elsewhere, starts at the next numbers (wrapping).
        m.rebase();
        let mut p = packet(vp8(1234, 7, true, (640, 480)));
        m.munge(&mut p);
        assert_eq!(ids(&p), (0, 0));
        assert_eq!(vp8_keyframe_size(&p.payload), Some((640, 480)), "the rest of the payload is intact");
        let mut p = packet(vp8(1235, 8, false, (0, 0)));
        m.munge(&mut p);
        assert_eq!(ids(&p), (1, 1));
        // A late packet of an older picture keeps its place and does not rewind.
        let mut p = packet(vp8(1234, 7, false, (0, 0)));
        m.munge(&mut p);
        assert_eq!(ids(&p), (0, 0));
        m.rebase();
        let mut p = packet(vp8(50, 3, true, (160, 120)));
        m.munge(&mut p);
        assert_eq!(ids(&p), (2, 2));
    }

    #[test]
    fn seven_bit_picture_ids_stay_seven_bits() {
        let mut m = Vp8Munger::default();
        let mut p = packet(vec![0x90, 0x80, 0x7f, 0x00, 0x00, 0x00, 0xAA]);
        m.munge(&mut p);
        m.rebase();
        let mut p = packet(vec![0x90, 0x80, 0x10, 0x00, 0x00, 0x00, 0xAA]);
        m.munge(&mut p);
        assert_eq!(p.payload[2], 0x00, "0x7f + 1 wraps to 0 in 7 bits");
        assert_eq!(&p.payload[3..], &[0x00, 0x00, 0x00, 0xAA]);
    }

    #[test]
    fn garbage_payloads_are_left_alone() {
        let mut m = Vp8Munger::default();
        for g in [vec![], vec![0x90], vec![0x90, 0x80], vec![0x90, 0x80, 0x80]] {
            let mut p = packet(g.clone());
            m.rebase();
            m.munge(&mut p);
            assert_eq!(&p.payload[..], &g[..]);
        }
    }

    #[test]
    fn layers_are_chosen_among_those_flowing() {
        let b = LayerBoard::new(1, VideoCodec::Vp8, vec![("f".into(), 10), ("h".into(), 11), ("q".into(), 12)]);
        assert_eq!(b.choose(&LayerChoice::Auto), None, "nothing flows yet");
        b.set_live_mask(0b111);
        // Declared order (f first) until measured; then by bitrate while sizes are unknown.
        assert_eq!(b.ranked(), vec![0, 1, 2]);
        b.set_bitrate(0, 2_000_000);
        b.set_bitrate(1, 600_000);
        b.set_bitrate(2, 150_000);
        assert_eq!(b.ranked(), vec![2, 1, 0]);
        b.set_size(0, (1280, 720));
        b.set_size(1, (640, 360));
        b.set_size(2, (320, 180));
        assert_eq!(b.ranked(), vec![2, 1, 0]);
        assert_eq!(b.choose(&LayerChoice::Auto), Some(0));
        assert_eq!(b.choose(&LayerChoice::Rid("h".into())), Some(1));
        assert_eq!(b.choose(&LayerChoice::Resolution { width: 300, height: 200 }), Some(2));
        assert_eq!(b.choose(&LayerChoice::Resolution { width: 1920, height: 1080 }), Some(0));
        // A region of 426×240 needs h; in one of 640×480 (4:3) h is letterboxed to 640×360
        // unscaled; 800×480 needs f; a bigger one gets f.
        assert_eq!(b.choose(&LayerChoice::Fill { width: 426, height: 240 }), Some(1));
        assert_eq!(b.choose(&LayerChoice::Fill { width: 640, height: 480 }), Some(1));
        assert_eq!(b.choose(&LayerChoice::Fill { width: 800, height: 480 }), Some(0));
        assert_eq!(b.choose(&LayerChoice::Fill { width: 1920, height: 1080 }), Some(0));
        assert_eq!(b.choose(&LayerChoice::Fill { width: 0, height: 0 }), Some(2));
        // OWT's bitrate multipliers, of f's 2 Mbit/s: x0.8 (1.6) is nearest f, x0.6, x0.4
        // and x0.2 (0.4: 0.2 from h, 0.25 from q) h, x0.05 q; with f stopped, of h's.
        let by_share = |permille| b.choose(&LayerChoice::Bitrate { permille });
        assert_eq!([800, 600, 400, 200, 50, 1000].map(by_share), [Some(0), Some(1), Some(1), Some(1), Some(2), Some(0)]);
        b.set_live_mask(0b110);
        assert_eq!([1000, 500, 250].map(by_share), [Some(1), Some(2), Some(2)], "of h's 600 kbit/s");
        b.set_live_mask(0b111);
        // h stops: a subscriber that wanted it goes down to q; with q stopped too, up to f.
        b.set_live_mask(0b101);
        assert_eq!(b.choose(&LayerChoice::Rid("h".into())), Some(2));
        b.set_live_mask(0b001);
        assert_eq!(b.choose(&LayerChoice::Rid("h".into())), Some(0));
        assert_eq!(b.choose(&LayerChoice::Rid("nope".into())), Some(0));
        assert_eq!(b.index_of(12), Some(2));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        /// Whatever a publisher puts in an SPS or a STAP-A: a size or none, never a panic.
        #[test]
        fn h264_sps_size_takes_any_bytes(kind in prop_oneof![Just(0x67u8), Just(0x78u8), any::<u8>()], body in proptest::collection::vec(any::<u8>(), 0..80)) {
            let mut payload = vec![kind];
            payload.extend(body);
            if let Some((w, h)) = h264_sps_size(&payload) {
                prop_assert!(w > 0 && h > 0);
            }
        }
    }
}
