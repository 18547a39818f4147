//! What the agent reads from SDP itself (webrtc-rs parses the rest): the m-line order of
//! an offer, and which payload type a subscriber gave the publisher's codec.

/// The payload type the subscriber negotiated for the publisher's codec: the same codec
/// with the same H.264 profile and packetization mode if offered, else the same codec.
pub(crate) fn negotiated_payload_type(
    codecs: &[rtc::rtp_transceiver::rtp_sender::RTCRtpCodecParameters],
    want: &rtc::rtp_transceiver::rtp_sender::RTCRtpCodec,
) -> Option<u8> {
    let same_mime = codecs.iter().filter(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(&want.mime_type)).collect();
    same_stream(same_mime, want, |c| &c.rtp_codec.sdp_fmtp_line).first().map(|c| c.payload_type)
}

/// Of a sender's negotiated `codecs`, the one it sends `want` with and that codec's RTX,
/// or `None` when nothing would be left out (or `want` is not among them).
pub(crate) fn only_sent(
    codecs: &[rtc::rtp_transceiver::rtp_sender::RTCRtpCodecParameters],
    want: &rtc::rtp_transceiver::rtp_sender::RTCRtpCodec,
) -> Option<Vec<rtc::rtp_transceiver::rtp_sender::RTCRtpCodecParameters>> {
    let pt = negotiated_payload_type(codecs, want)?;
    let repairs = |c: &rtc::rtp_transceiver::rtp_sender::RTCRtpCodecParameters| {
        c.rtp_codec.mime_type.to_ascii_lowercase().ends_with("/rtx")
            && c.rtp_codec.sdp_fmtp_line.split(';').find_map(|kv| kv.trim().strip_prefix("apt=")).and_then(|v| v.trim().parse::<u8>().ok())
                == Some(pt)
    };
    let kept: Vec<_> = codecs.iter().filter(|c| c.payload_type == pt || repairs(c)).cloned().collect();
    (kept.len() < codecs.len()).then_some(kept)
}

/// Of `candidates`, all of `want`'s codec, those that carry the same stream: of the same
/// H.264 profile and packetization mode if any is, else all of them.
fn same_stream<'a, T>(candidates: Vec<&'a T>, want: &rtc::rtp_transceiver::rtp_sender::RTCRtpCodec, fmtp: impl Fn(&T) -> &str) -> Vec<&'a T> {
    let key = h264_key(&want.sdp_fmtp_line);
    let exact: Vec<&T> = candidates.iter().copied().filter(|c| h264_key(fmtp(c)) == key).collect();
    if exact.is_empty() { candidates } else { exact }
}

/// The H.264 parameters that decide whether two codecs carry the same stream (profile and
/// packetization mode), normalised; empty for other codecs' fmtp lines.
fn h264_key(fmtp: &str) -> Vec<String> {
    let mut k: Vec<String> = fmtp
        .split(';')
        .map(|kv| kv.trim().to_ascii_lowercase())
        .filter(|kv| kv.starts_with("profile-level-id") || kv.starts_with("packetization-mode"))
        .collect();
    k.sort();
    k
}

/// The order in which m-lines appear in an SDP, by mid.
pub(crate) fn mid_order(sdp: &str) -> Vec<String> {
    sdp.lines().filter_map(|l| l.trim().strip_prefix("a=mid:")).map(str::to_string).collect()
}

/// The simulcast layers each m-line of an offer sends (`a=simulcast:send` with its
/// `a=rid:<id> send` lines, RFC 8853), by mid, in the order the client listed them.
/// Layers with no matching `a=rid` line, and more than [`crate::simulcast::MAX_LAYERS`],
/// are left out; an m-line with fewer than two layers is not simulcast.
pub(crate) fn simulcast_rids(sdp: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for section in sdp.split("\nm=").skip(1) {
        let lines: Vec<&str> = section.lines().map(str::trim).collect();
        let Some(mid) = lines.iter().find_map(|l| l.strip_prefix("a=mid:")) else { continue };
        let declared: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("a=rid:"))
            .filter_map(|r| {
                let mut parts = r.split_whitespace();
                let id = parts.next()?;
                (parts.next() == Some("send")).then_some(id)
            })
            .collect();
        // `a=simulcast:send q;h;f`, or with a `recv` list first (RFC 8853 allows either order).
        let Some(list) = lines.iter().filter_map(|l| l.strip_prefix("a=simulcast:")).find_map(|v| {
            let mut words = v.split_whitespace();
            while let Some(direction) = words.next() {
                let list = words.next();
                if direction == "send" {
                    return list;
                }
            }
            None
        }) else {
            continue;
        };
        let mut rids: Vec<String> = Vec::new();
        // `q;h;f`, alternatives after commas, `~` for a layer that starts paused.
        for layer in list.split(';') {
            let Some(id) = layer.split(',').next().map(|id| id.trim_start_matches('~')) else { continue };
            if declared.contains(&id) && !rids.iter().any(|r| r == id) {
                rids.push(id.to_string());
            }
        }
        rids.truncate(crate::simulcast::MAX_LAYERS);
        if rids.len() > 1 {
            out.push((mid.to_string(), rids));
        }
    }
    out
}

/// The RTX payload types of the m-sections of the given mids, each with the payload type
/// it repairs (`apt`), once each.
pub(crate) fn rtx_repairs(sdp: &str, mids: &[&str]) -> Vec<(u8, u8)> {
    let mut out = Vec::new();
    for section in MediaSection::all(sdp).filter(|s| mids.contains(&s.mid)) {
        for f in section.formats.iter().filter(|f| f.is_rtx()) {
            if let (Ok(rtx), Some(Ok(apt))) = (f.pt.parse::<u8>(), f.repairs().map(str::parse::<u8>))
                && !out.contains(&(rtx, apt))
            {
                out.push((rtx, apt));
            }
        }
    }
    out
}

/// An offer with each m-line the server sends a known codec on (`sending`: mid → the
/// publisher's codec) cut down to that codec and its RTX: what the server keeps of the
/// client's offer, and answers, is then a tenth of a browser's full list. The codec is
/// matched as [`negotiated_payload_type`] matches it ([`same_stream`], and the same clock
/// rate); an m-line that does not offer it is left
/// whole (the subscription then fails as before, with its error). The first audio and the
/// first video m-line are never cut: rtc fixes the codecs a connection may ever use from
/// those of the first remote description that has them, so cutting them would keep a
/// transport opened by a subscription from later taking a stream of another codec, or
/// publishing.
pub(crate) fn only_sent_codecs(sdp: &str, sending: &std::collections::HashMap<String, rtc::rtp_transceiver::rtp_sender::RTCRtpCodec>) -> String {
    if sending.is_empty() {
        return sdp.to_string();
    }
    let mut seen = Vec::new();
    retain_formats(sdp, |kind, mid, formats| {
        if !seen.contains(&kind) {
            seen.push(kind);
            return None;
        }
        let want = sending.get(mid)?;
        let subtype = want.mime_type.rsplit('/').next().unwrap_or_default();
        let same = formats.iter().filter(|f| f.name().eq_ignore_ascii_case(subtype) && f.clock_rate() == Some(want.clock_rate)).collect();
        let main = same_stream(same, want, |f| f.fmtp);
        if main.is_empty() {
            return None;
        }
        Some(with_repairs(&main, formats))
    })
}

/// A description with each publication m-line (`accept`: mid → the room's `mediaIn`) cut
/// down to the codecs the room accepts and their RTX: applied to the answer, the client
/// sends only those. (OWT's agent also answers a publication with the room's codecs, but
/// one codec per m-line, without RTX and without looking at H.264 profiles.) An m-line
/// that has none of them is an error naming it and what the room accepts; stopped
/// m-lines (port 0) and other m-lines are left as they are.
pub(crate) fn only_accepted(sdp: &str, accept: &[(&str, &tessera_core::room::MediaIn)]) -> Result<String, String> {
    if accept.is_empty() {
        return Ok(sdp.to_string());
    }
    // A stopped m-line (port 0) carries nothing: it is left as it is.
    let stopped: Vec<&str> = sdp
        .split("\nm=")
        .skip(1)
        .filter(|section| section.split(' ').nth(1) == Some("0"))
        .filter_map(|section| section.lines().find_map(|l| l.trim().strip_prefix("a=mid:")))
        .collect();
    let mut refused = None;
    let out = retain_formats(sdp, |kind, mid, formats| {
        if stopped.contains(&mid) {
            return None;
        }
        let (_, media_in) = accept.iter().find(|(m, _)| *m == mid)?;
        let main: Vec<&Format<'_>> = formats.iter().filter(|f| !f.is_rtx() && f.accepted_by(kind, media_in)).collect();
        if main.is_empty() {
            let names: Vec<String> = match kind {
                "audio" => media_in.audio.iter().map(|a| a.codec.clone()).collect(),
                _ => media_in.video.iter().map(|v| v.profile.as_ref().map_or(v.codec.clone(), |p| format!("{}/{p}", v.codec))).collect(),
            };
            refused.get_or_insert(format!("the offer's m-line {mid} has no {kind} codec the room accepts (mediaIn: {})", names.join(", ")));
            return None;
        }
        Some(with_repairs(&main, formats))
    });
    match refused {
        Some(reason) => Err(reason),
        None => Ok(out),
    }
}

/// Whether an H.264 fmtp line's `profile-level-id` is of OWT's profile `name`: `CB`
/// (constrained baseline: profile_idc 66 with constraint_set1), `B` (baseline, constrained
/// or not), `M` (main, 77) or `H` (high, 100). An unknown name accepts any profile; a line
/// without `profile-level-id` is baseline (RFC 6184's default, 420010).
fn h264_profile_is(fmtp: &str, name: &str) -> bool {
    let id = fmtp.split(';').find_map(|kv| kv.trim().strip_prefix("profile-level-id=")).unwrap_or("420010");
    let byte = |i: usize| id.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok());
    let (Some(idc), Some(iop)) = (byte(0), byte(2)) else { return false };
    match name.to_ascii_uppercase().as_str() {
        "CB" => idc == 0x42 && iop & 0x40 != 0,
        "B" => idc == 0x42,
        "M" => idc == 0x4d,
        "H" => idc == 0x64,
        _ => true,
    }
}

/// The payload types of `main` and of the RTX formats among `formats` that repair them:
/// what an m-line cut down to `main` keeps.
fn with_repairs(main: &[&Format<'_>], formats: &[Format<'_>]) -> Vec<String> {
    let repairs = formats.iter().filter(|f| f.is_rtx() && main.iter().any(|m| f.repairs() == Some(m.pt)));
    main.iter().copied().chain(repairs).map(|f| f.pt.to_string()).collect()
}

/// One format of an m-line: its payload type and what its `a=rtpmap` and `a=fmtp` say.
struct Format<'a> {
    pt: &'a str,
    rtpmap: &'a str,
    fmtp: &'a str,
}

impl Format<'_> {
    /// The encoding name (`VP8`, `rtx`).
    fn name(&self) -> &str {
        self.rtpmap.split('/').next().unwrap_or_default().trim()
    }

    fn clock_rate(&self) -> Option<u32> {
        self.rtpmap.split('/').nth(1).and_then(|c| c.trim().parse().ok())
    }

    fn is_rtx(&self) -> bool {
        self.name().eq_ignore_ascii_case("rtx")
    }

    /// Whether a room's `mediaIn` lists this format for an m-line of `kind`: the codec by
    /// name, with the sample rate and channels where the room names them (G.722's RTP clock
    /// is 8000 for its 16 kHz, so its rate is not compared), and an H.264 profile where the
    /// room names one (`CB`, `B`, `M`, `H`, from `profile-level-id`).
    fn accepted_by(&self, kind: &str, media_in: &tessera_core::room::MediaIn) -> bool {
        let name = self.name();
        match kind {
            "audio" => media_in.audio.iter().any(|a| {
                let channels = self.rtpmap.split('/').nth(2).and_then(|c| c.trim().parse().ok()).unwrap_or(1u32);
                a.codec.eq_ignore_ascii_case(name)
                    && (name.eq_ignore_ascii_case("g722") || a.sample_rate.is_none_or(|r| self.clock_rate() == Some(r)))
                    && a.channel_num.is_none_or(|c| c == channels)
            }),
            "video" => media_in.video.iter().any(|v| {
                v.codec.eq_ignore_ascii_case(name)
                    && v.profile.as_deref().is_none_or(|p| !name.eq_ignore_ascii_case("h264") || h264_profile_is(self.fmtp, p))
            }),
            _ => false,
        }
    }

    /// The payload type an RTX format repairs (`apt=`).
    fn repairs(&self) -> Option<&str> {
        self.fmtp.split(';').find_map(|kv| kv.trim().strip_prefix("apt=")).map(str::trim)
    }
}

/// An m-section that has a mid: its media kind, mid and formats.
struct MediaSection<'s> {
    kind: &'s str,
    mid: &'s str,
    formats: Vec<Format<'s>>,
}

impl<'s> MediaSection<'s> {
    /// One part of `sdp.split_inclusive("\nm=")` after the session part (it starts
    /// with the m= line's media, its "m=" having gone with the part before).
    fn parse(section: &'s str) -> Option<MediaSection<'s>> {
        // A format attribute's payload type and value.
        let value = |line: &'s str, prefix: &str| -> Option<(&'s str, &'s str)> {
            let rest = line.trim().strip_prefix(prefix)?;
            Some(rest.split_once(' ').unwrap_or((rest, "")))
        };
        let kind = section.split(' ').next().unwrap_or_default();
        let mid = section.lines().find_map(|l| l.trim().strip_prefix("a=mid:"))?;
        let fmtps: Vec<(&str, &str)> = section.lines().filter_map(|l| value(l, "a=fmtp:")).collect();
        let formats = section
            .lines()
            .filter_map(|l| value(l, "a=rtpmap:"))
            .map(|(pt, rtpmap)| Format { pt, rtpmap, fmtp: fmtps.iter().find(|(p, _)| *p == pt).map_or("", |(_, f)| *f) })
            .collect();
        Some(MediaSection { kind, mid, formats })
    }

    /// The m-sections of `sdp` that have a mid, in order.
    fn all(sdp: &'s str) -> impl Iterator<Item = MediaSection<'s>> {
        sdp.split_inclusive("\nm=").skip(1).filter_map(MediaSection::parse)
    }
}

/// Rewrites each m-section for which `keep(kind, mid, formats)` names the payload types to
/// keep (`kind`: the m-line's media, `audio`, `video`…; asked of every m-section in order):
/// the others leave its m= line with their `a=rtpmap`, `a=fmtp` and `a=rtcp-fb` lines.
/// Sections it answers `None` for, and everything else, are left as they are (line
/// endings included).
fn retain_formats<'s>(sdp: &'s str, mut keep: impl FnMut(&'s str, &str, &[Format<'_>]) -> Option<Vec<String>>) -> String {
    let mut out = String::with_capacity(sdp.len());
    let mut sections = sdp.split_inclusive("\nm=");
    if let Some(session) = sections.next() {
        out.push_str(session);
    }
    for section in sections {
        let Some(MediaSection { kind, mid, formats }) = MediaSection::parse(section) else {
            out.push_str(section);
            continue;
        };
        let Some(kept) = keep(kind, mid, &formats) else {
            out.push_str(section);
            continue;
        };
        let dropped = |pt: &str| formats.iter().any(|f| f.pt == pt) && !kept.iter().any(|k| k == pt);
        let names_dropped = |l: &str| {
            ["a=rtpmap:", "a=fmtp:", "a=rtcp-fb:"]
                .iter()
                .any(|p| l.trim().strip_prefix(p).and_then(|r| r.split([' ', '\r']).next()).is_some_and(dropped))
        };
        for (i, line) in section.split_inclusive('\n').enumerate() {
            if i == 0 {
                // The m= line (its "m=" went with the previous part): the formats dropped go.
                let ending = &line[line.trim_end().len()..];
                let kept: Vec<&str> = line.trim_end().split(' ').enumerate().filter(|(n, f)| *n < 3 || !dropped(f)).map(|(_, f)| f).collect();
                out.push_str(&kept.join(" "));
                out.push_str(ending);
            } else if !names_dropped(line) {
                out.push_str(line);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec(mime: &str, clock_rate: u32, fmtp: &str) -> rtc::rtp_transceiver::rtp_sender::RTCRtpCodec {
        rtc::rtp_transceiver::rtp_sender::RTCRtpCodec { mime_type: mime.into(), clock_rate, sdp_fmtp_line: fmtp.into(), ..Default::default() }
    }

    /// An audio m-line of a browser's offer to receive.
    fn audio(mid: u8) -> String {
        format!(
            "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 0 8\r\nc=IN IP4 0.0.0.0\r\na=mid:{mid}\r\na=recvonly\r\na=rtpmap:111 opus/48000/2\r\n\
             a=rtcp-fb:111 transport-cc\r\na=fmtp:111 minptime=10;useinbandfec=1\r\na=rtpmap:63 red/48000/2\r\na=fmtp:63 111/111\r\n\
             a=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
        )
    }

    /// A video m-line of a browser's offer to receive: three codecs and their RTX.
    fn video(mid: u8) -> String {
        format!(
            "m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103 127 125\r\nc=IN IP4 0.0.0.0\r\na=mid:{mid}\r\na=recvonly\r\n\
             a=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack\r\na=rtcp-fb:96 nack pli\r\na=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n\
             a=rtpmap:102 H264/90000\r\na=rtcp-fb:102 nack\r\na=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f\r\n\
             a=rtpmap:103 rtx/90000\r\na=fmtp:103 apt=102\r\n\
             a=rtpmap:127 H264/90000\r\na=fmtp:127 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n\
             a=rtpmap:125 rtx/90000\r\na=fmtp:125 apt=127\r\na=rtcp-fb:* ccm fir\r\n"
        )
    }

    /// Two audio and three video m-lines, interleaved.
    fn offer() -> String {
        let head = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1 2 3 4\r\n";
        [head.to_string(), audio(0), video(1), video(2), audio(3), video(4)].concat()
    }

    fn h264_cb() -> rtc::rtp_transceiver::rtp_sender::RTCRtpCodec {
        codec("video/H264", 90000, "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f")
    }

    #[test]
    fn an_offer_keeps_only_what_is_sent_on_each_subscription() {
        let opus = codec("audio/opus", 48000, "minptime=10;useinbandfec=1");
        let sending = std::collections::HashMap::from([
            ("0".to_string(), opus.clone()),
            ("1".to_string(), h264_cb()),
            ("2".to_string(), h264_cb()),
            ("3".to_string(), opus),
        ]);
        let (offer, out) = (offer(), only_sent_codecs(&offer(), &sending));
        let section = |sdp: &str, n: usize| sdp.split("\r\nm=").nth(n).unwrap().to_string();
        assert!(out.starts_with("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1 2 3 4\r\n"));
        // The first of each kind stays whole: rtc takes the connection's codecs from them.
        assert_eq!(section(&out, 1), section(&offer, 1));
        assert_eq!(section(&out, 2), section(&offer, 2));
        // The same profile's H.264 (not the first one offered) and its RTX; `rtcp-fb:*` stays.
        assert_eq!(
            section(&out, 3),
            "video 9 UDP/TLS/RTP/SAVPF 127 125\r\nc=IN IP4 0.0.0.0\r\na=mid:2\r\na=recvonly\r\n\
             a=rtpmap:127 H264/90000\r\na=fmtp:127 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n\
             a=rtpmap:125 rtx/90000\r\na=fmtp:125 apt=127\r\na=rtcp-fb:* ccm fir"
        );
        assert_eq!(
            section(&out, 4),
            "audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:3\r\na=recvonly\r\na=rtpmap:111 opus/48000/2\r\n\
             a=rtcp-fb:111 transport-cc\r\na=fmtp:111 minptime=10;useinbandfec=1"
        );
        assert_eq!(section(&out, 5), section(&offer, 5), "an m-line nothing is sent on is left whole");
        // What it keeps still parses, and still offers the codec.
        let parsed = rtc::sdp::SessionDescription::unmarshal(&mut std::io::Cursor::new(out.as_bytes())).unwrap();
        assert_eq!(parsed.media_descriptions[2].media_name.formats, ["127", "125"]);
    }

    #[test]
    fn a_publication_is_answered_with_the_codecs_the_room_accepts() {
        use tessera_core::room::MediaIn;
        let offer = offer();
        let section = |sdp: &str, n: usize| sdp.split("\r\nm=").nth(n).unwrap().to_string();
        let room = |audio: &[&str], video: &[(&str, Option<&str>)]| -> MediaIn {
            serde_json::from_value(serde_json::json!({
                "audio": audio.iter().map(|c| serde_json::json!({"codec": c})).collect::<Vec<_>>(),
                "video": video.iter().map(|(c, p)| match p {
                    Some(p) => serde_json::json!({"codec": c, "profile": p}),
                    None => serde_json::json!({"codec": c}),
                }).collect::<Vec<_>>(),
            }))
            .unwrap()
        };
        // The default room keeps VP8 and both H.264 with their RTX, Opus, PCMU and PCMA (not RED).
        let default = MediaIn::default();
        let out = only_accepted(&offer, &[("0", &default), ("1", &default)]).unwrap();
        assert!(section(&out, 1).starts_with("audio 9 UDP/TLS/RTP/SAVPF 111 0 8\r\n"), "{out}");
        assert!(!section(&out, 1).contains("red/48000"));
        assert!(section(&out, 2).starts_with("video 9 UDP/TLS/RTP/SAVPF 96 97 102 103 127 125\r\n"), "{out}");
        assert_eq!(section(&out, 3), section(&offer, 3), "other m-lines are left as they are");
        // H.264 constrained baseline only: the 42e01f format and its RTX.
        let cb = room(&["opus"], &[("h264", Some("CB"))]);
        let out = only_accepted(&offer, &[("1", &cb)]).unwrap();
        assert!(section(&out, 2).starts_with("video 9 UDP/TLS/RTP/SAVPF 127 125\r\n"), "{out}");
        assert!(!section(&out, 2).contains("VP8"));
        let parsed = rtc::sdp::SessionDescription::unmarshal(&mut std::io::Cursor::new(out.as_bytes())).unwrap();
        assert_eq!(parsed.media_descriptions[1].media_name.formats, ["127", "125"]);
        // Baseline takes both baseline H.264 formats; main takes none of them.
        let b = room(&["opus"], &[("h264", Some("B"))]);
        assert!(section(&only_accepted(&offer, &[("1", &b)]).unwrap(), 2).starts_with("video 9 UDP/TLS/RTP/SAVPF 102 103 127 125\r\n"));
        let main = room(&["opus"], &[("h264", Some("M"))]);
        let err = only_accepted(&offer, &[("1", &main)]).unwrap_err();
        assert_eq!(err, "the offer's m-line 1 has no video codec the room accepts (mediaIn: h264/M)");
        // A stopped m-line carries nothing: left as it is, not refused.
        let stopped = offer.replacen("m=video 9 ", "m=video 0 ", 1);
        assert_eq!(only_accepted(&stopped, &[("1", &main)]).unwrap(), stopped);
        // An audio m-line without the room's codec, with the room's sample rate checked.
        let g722 = room(&["g722"], &[("vp8", None)]);
        assert_eq!(only_accepted(&offer, &[("0", &g722)]).unwrap_err(), "the offer's m-line 0 has no audio codec the room accepts (mediaIn: g722)");
        let mut opus_mono = room(&["opus"], &[]);
        opus_mono.audio[0].channel_num = Some(1);
        assert!(only_accepted(&offer, &[("0", &opus_mono)]).is_err());
        assert_eq!(only_accepted(&offer, &[]).unwrap(), offer);
    }

    #[test]
    fn h264_profiles_are_read_from_profile_level_id() {
        assert!(h264_profile_is("packetization-mode=1;profile-level-id=42e01f", "CB"));
        assert!(h264_profile_is("profile-level-id=42e01f", "B"));
        assert!(!h264_profile_is("profile-level-id=42001f", "CB"));
        assert!(h264_profile_is("profile-level-id=4d001f", "M"));
        assert!(h264_profile_is("profile-level-id=640c1f", "h"));
        assert!(!h264_profile_is("profile-level-id=640c1f", "B"));
        // RFC 6184's default when the line names none: baseline.
        assert!(h264_profile_is("packetization-mode=1", "B"));
        assert!(!h264_profile_is("profile-level-id=zz", "B"));
    }

    #[test]
    fn an_offer_without_the_sent_codec_is_left_whole() {
        let offer = offer();
        let sending = std::collections::HashMap::from([("2".to_string(), codec("video/AV1", 90000, ""))]);
        assert_eq!(only_sent_codecs(&offer, &sending), offer);
        // Another profile of the codec: any H.264 is kept rather than none.
        let sending =
            std::collections::HashMap::from([("2".to_string(), codec("video/H264", 90000, "packetization-mode=1;profile-level-id=640c1f"))]);
        let out = only_sent_codecs(&offer, &sending);
        assert!(out.contains("m=video 9 UDP/TLS/RTP/SAVPF 102 103 127 125\r\nc=IN IP4 0.0.0.0\r\na=mid:2\r\n"), "{out}");
        assert_eq!(only_sent_codecs(&offer, &Default::default()), offer);
    }

    #[test]
    fn a_sender_keeps_the_codec_it_sends_and_its_rtx() {
        let params = |pt: u8, mime: &str, fmtp: &str| rtc::rtp_transceiver::rtp_sender::RTCRtpCodecParameters {
            rtp_codec: codec(mime, 90000, fmtp),
            payload_type: pt,
        };
        let negotiated = vec![
            params(96, "video/VP8", ""),
            params(97, "video/rtx", "apt=96"),
            params(102, "video/H264", "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f"),
            params(103, "video/rtx", "apt=102"),
            params(127, "video/H264", "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"),
            params(125, "video/rtx", "apt=127"),
        ];
        let pts = |kept: Option<Vec<rtc::rtp_transceiver::rtp_sender::RTCRtpCodecParameters>>| {
            kept.map(|k| k.iter().map(|c| c.payload_type).collect::<Vec<_>>())
        };
        assert_eq!(pts(only_sent(&negotiated, &codec("video/VP8", 90000, ""))), Some(vec![96, 97]));
        // The same H.264 profile, not the first H.264 listed.
        assert_eq!(pts(only_sent(&negotiated, &h264_cb())), Some(vec![127, 125]));
        // Not negotiated: nothing to cut to (the subscription is refused elsewhere).
        assert_eq!(pts(only_sent(&negotiated, &codec("video/AV1", 90000, ""))), None);
        // Nothing left out: nothing to change.
        assert_eq!(pts(only_sent(&negotiated[..2], &codec("video/VP8", 90000, ""))), None);
        let opus = rtc::rtp_transceiver::rtp_sender::RTCRtpCodecParameters { rtp_codec: codec("audio/opus", 48000, ""), payload_type: 111 };
        assert_eq!(pts(only_sent(&[opus.clone(), params(0, "audio/PCMU", "")], &opus.rtp_codec)), Some(vec![111]));
    }

    #[test]
    fn rtx_repairs_of_the_named_sections_only() {
        let sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96 97 98 99\r\na=mid:0\r\na=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack\r\n\
                   a=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\na=rtcp-fb:97 nack\r\na=rtpmap:98 H264/90000\r\n\
                   a=rtpmap:99 rtx/90000\r\na=fmtp:99 apt=98\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96 97 100\r\na=mid:1\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n\
                   a=rtpmap:100 rtx/90000\r\na=fmtp:100 apt=nonsense\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96 101\r\na=mid:2\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:101 rtx/90000\r\na=fmtp:101 apt=96\r\n";
        assert_eq!(rtx_repairs(sdp, &["0"]), vec![(97, 96), (99, 98)]);
        // Once each; a malformed apt is not a repair; section 2 not asked for.
        assert_eq!(rtx_repairs(sdp, &["0", "1"]), vec![(97, 96), (99, 98)]);
        assert_eq!(rtx_repairs(sdp, &["2"]), vec![(101, 96)]);
        assert!(rtx_repairs(sdp, &["9"]).is_empty());
        assert!(rtx_repairs("garbage", &["0"]).is_empty());
    }

    #[test]
    fn simulcast_layers_by_mid() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\n\
                   a=rid:q send\r\na=rid:h send max-width=640\r\na=rid:f send\r\na=rid:x recv\r\na=simulcast:send q;~h;f,x;zz\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=rid:a send\r\na=simulcast:send a\r\n";
        assert_eq!(simulcast_rids(sdp), vec![("1".to_string(), vec!["q".to_string(), "h".to_string(), "f".to_string()])]);
        assert!(simulcast_rids("garbage\nm=\na=simulcast:send").is_empty());
        let recv_first =
            "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:v\r\na=rid:a send\r\na=rid:b send\r\na=rid:c recv\r\na=simulcast:recv c send a;b\r\n";
        assert_eq!(simulcast_rids(recv_first), vec![("v".to_string(), vec!["a".to_string(), "b".to_string()])]);
    }

    #[test]
    fn mids_in_order() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\n";
        assert_eq!(mid_order(sdp), vec!["1", "0"]);
    }

    #[test]
    fn h264_streams_match_on_profile_and_packetization_mode() {
        let key = h264_key("level-asymmetry-allowed=1; packetization-mode=1;profile-level-id=42E01F");
        assert_eq!(key, vec!["packetization-mode=1", "profile-level-id=42e01f"]);
        assert_eq!(key, h264_key("profile-level-id=42e01f;packetization-mode=1"));
        assert_ne!(key, h264_key("profile-level-id=42e01f;packetization-mode=0"));
        assert!(h264_key("minptime=10;useinbandfec=1").is_empty());
    }
}

/// Property tests of the SDP helpers, and of the parsers (webrtc-rs's) that read what
/// clients send: SDP offers, ICE candidates and RTCP feedback.
#[cfg(test)]
mod proptests {
    use super::*;
    use crate::feedback::is_keyframe_request;
    use proptest::prelude::*;
    use rtc::peer_connection::sdp::RTCSessionDescription;
    use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodecParameters};

    fn config() -> ProptestConfig {
        ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() }
    }

    fn text(max: usize) -> impl Strategy<Value = String> {
        prop::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter)
    }

    const OFFER: &str = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n\
a=msid-semantic: WMS\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n\
a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=ice-options:trickle\r\n\
a=fingerprint:sha-256 AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99\r\n\
a=setup:actpass\r\na=mid:0\r\na=sendonly\r\na=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n\
a=ssrc:1 cname:x\r\nm=video 9 UDP/TLS/RTP/SAVPF 96 102\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=sendonly\r\na=rtcp-mux\r\n\
a=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack pli\r\na=rtpmap:102 H264/90000\r\n\
a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n\
a=candidate:1 1 udp 2130706431 10.0.0.5 40000 typ host\r\na=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid\r\n";

    /// SDP-looking text: lines of the offer above, cut, repeated and mixed with junk.
    fn sdp_like() -> impl Strategy<Value = String> {
        let lines: Vec<&'static str> = OFFER.split("\r\n").filter(|l| !l.is_empty()).collect();
        let line = prop_oneof![
            4 => prop::sample::select(lines.clone()).prop_map(str::to_string),
            2 => (prop::sample::select(lines), any::<prop::sample::Index>(), text(6)).prop_map(|(l, cut, junk)| {
                let cut = cut.index(l.len() + 1);
                format!("{}{junk}", l.get(..cut).unwrap_or(l))
            }),
            1 => "[a-z]=[ -~]{0,20}",
            1 => text(20),
        ];
        (prop::collection::vec(line, 0..30), prop::sample::select(&["\r\n", "\n", "\r"][..]))
            .prop_map(|(lines, eol)| lines.iter().map(|l| format!("{l}{eol}")).collect::<String>())
    }

    fn fmtp() -> impl Strategy<Value = String> {
        let part = prop_oneof![
            prop::sample::select(&["profile-level-id=42e01f", "profile-level-id=42E01F", "profile-level-id=640c1f", "profile-level-id=4d001f"][..]),
            prop::sample::select(&["packetization-mode=1", "packetization-mode=0", " packetization-mode=1 "][..]),
            prop::sample::select(&["level-asymmetry-allowed=1", "minptime=10", "", "=", ";"][..]),
        ];
        prop_oneof![4 => prop::collection::vec(part, 0..4).prop_map(|p| p.join(";")), 1 => text(20)]
    }

    fn codec(mime: impl Strategy<Value = &'static str>) -> impl Strategy<Value = RTCRtpCodec> {
        (mime, fmtp()).prop_map(|(mime_type, sdp_fmtp_line)| RTCRtpCodec {
            mime_type: mime_type.to_string(),
            clock_rate: 90000,
            sdp_fmtp_line,
            ..Default::default()
        })
    }

    fn mimes() -> impl Strategy<Value = &'static str> {
        prop::sample::select(&["video/H264", "video/h264", "video/VP8", "audio/opus", "video/AV1", ""][..])
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn mid_order_lists_the_mid_lines(sdp in prop_oneof![sdp_like(), text(60)]) {
            let mids = mid_order(&sdp);
            prop_assert_eq!(mids.len(), sdp.lines().filter(|l| l.trim().starts_with("a=mid:")).count());
            for m in &mids {
                let line = format!("a=mid:{m}");
                prop_assert!(sdp.contains(&line), "{:?} is not in the SDP", m);
            }
        }

        #[test]
        fn negotiated_payload_type_prefers_the_same_h264_stream(
            want in codec(mimes()),
            offered in prop::collection::vec((codec(mimes()), any::<u8>()), 0..6),
        ) {
            let codecs: Vec<RTCRtpCodecParameters> =
                offered.into_iter().map(|(rtp_codec, payload_type)| RTCRtpCodecParameters { rtp_codec, payload_type }).collect();
            let same: Vec<&RTCRtpCodecParameters> = codecs.iter().filter(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(&want.mime_type)).collect();
            match negotiated_payload_type(&codecs, &want) {
                None => prop_assert!(same.is_empty()),
                Some(pt) => {
                    prop_assert!(same.iter().any(|c| c.payload_type == pt), "{} is not a payload type of the same codec", pt);
                    let exact = same.iter().find(|c| h264_key(&c.rtp_codec.sdp_fmtp_line) == h264_key(&want.sdp_fmtp_line));
                    let expected = exact.or(same.first()).map(|c| c.payload_type);
                    prop_assert_eq!(Some(pt), expected);
                }
            }
        }

        #[test]
        fn cutting_an_offer_down_keeps_what_it_does_not_name(
            sdp in prop_oneof![sdp_like(), text(80)],
            sent in prop::collection::vec(("[0-3]", codec(mimes())), 0..3),
        ) {
            let sending: std::collections::HashMap<String, RTCRtpCodec> = sent.into_iter().collect();
            let out = only_sent_codecs(&sdp, &sending);
            // Only format lines go: every other line is kept, in order.
            let others = |s: &str| s.lines().filter(|l| !["a=rtpmap:", "a=fmtp:", "a=rtcp-fb:"].iter().any(|p| l.trim().starts_with(p))).map(|l| {
                if l.starts_with("m=") { l.split(' ').take(3).collect::<Vec<_>>().join(" ") } else { l.to_string() }
            }).collect::<Vec<_>>();
            prop_assert_eq!(others(&out), others(&sdp));
            prop_assert!(out.len() <= sdp.len());
        }

        #[test]
        fn sdp_offers_parse_or_fail_cleanly(sdp in prop_oneof![sdp_like(), text(80)]) {
            if let Ok(offer) = RTCSessionDescription::offer(sdp) {
                let _ = offer.unmarshal();
            }
        }

        #[test]
        fn ice_candidates_parse_or_fail_cleanly(line in prop_oneof![
            "(candidate:)?[0-9a-z]{0,4} [0-9]{0,2} (udp|tcp|UDP|x) [0-9]{0,10} [0-9a-f.:]{0,20} [0-9]{0,6} typ (host|srflx|relay|x)( raddr [0-9.]{0,15} rport [0-9]{0,6})?( tcptype (active|passive|so))?( generation [0-9])?",
            text(60),
        ]) {
            let _ = rtc::ice::candidate::unmarshal_candidate(&line);
        }

        #[test]
        fn rtcp_feedback_parses_or_fails_cleanly(
            packets in prop::collection::vec((192u8..=207, 0u8..32, any::<bool>(), prop::collection::vec(any::<u8>(), 0..40)), 1..4),
            raw in prop::collection::vec(any::<u8>(), 0..80),
            use_raw in prop::bool::weighted(0.2),
        ) {
            // Mostly RTCP headers (version 2, a real packet type, a length that may lie)
            // in front of random bodies.
            let bytes: Vec<u8> = if use_raw {
                raw
            } else {
                packets
                    .iter()
                    .flat_map(|(pt, count, honest, body)| {
                        let words = if *honest { body.len() / 4 } else { usize::from(*count) };
                        let mut p = vec![0x80 | count, *pt, 0, u8::try_from(words).unwrap_or(255)];
                        p.extend_from_slice(&body[..body.len() / 4 * 4]);
                        p
                    })
                    .collect()
            };
            if let Ok(parsed) = rtc::rtcp::packet::unmarshal(&mut &bytes[..]) {
                for p in &parsed {
                    let _ = is_keyframe_request(p.as_ref());
                }
            }
        }
    }
}
