//! Codecs as the three sides name them: webrtc-rs's `RTCRtpCodec`, the media seam's
//! [`CodecInfo`] (mixer, recorder), and OWT's track format in stream descriptions.

use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;
use tessera_core::media::CodecInfo;
use tessera_core::room::{AudioFormat, VideoFormat};
use tessera_core::stream::TrackFormat;

/// The codec as the media seam describes it.
pub(crate) fn codec_info(codec: &RTCRtpCodec, payload_type: Option<u8>) -> CodecInfo {
    CodecInfo {
        mime_type: codec.mime_type.clone(),
        clock_rate: codec.clock_rate,
        channels: codec.channels,
        fmtp: codec.sdp_fmtp_line.clone(),
        payload_type,
    }
}

/// The codec as webrtc-rs negotiates it.
pub(crate) fn rtc_codec(codec: &CodecInfo) -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: codec.mime_type.clone(),
        clock_rate: codec.clock_rate,
        channels: codec.channels,
        sdp_fmtp_line: codec.fmtp.clone(),
        ..Default::default()
    }
}

/// The format of a negotiated codec.
pub(crate) fn codec_format(codec: &RTCRtpCodec) -> TrackFormat {
    let mime = codec.mime_type.to_ascii_lowercase();
    let name = mime.split('/').nth(1).unwrap_or(&mime).to_string();
    if mime.starts_with("audio/") {
        let channels = (codec.channels > 0).then_some(u32::from(codec.channels));
        TrackFormat::Audio(AudioFormat { codec: name, sample_rate: Some(codec.clock_rate), channel_num: channels })
    } else if name == "h264" {
        TrackFormat::Video(VideoFormat { codec: name, profile: Some(h264_profile(&codec.sdp_fmtp_line).to_string()) })
    } else {
        TrackFormat::Video(VideoFormat { codec: name, profile: None })
    }
}

/// OWT's H.264 profile name from an fmtp line's `profile-level-id`.
fn h264_profile(fmtp: &str) -> &'static str {
    let id = fmtp
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case("profile-level-id"))
        .map(|(_, v)| v.to_ascii_lowercase())
        .unwrap_or_default();
    match id.get(..4) {
        Some("42e0") | Some("42c0") => "CB",
        Some("4200") | Some("4280") => "B",
        Some("4d00") | Some("4d40") => "M",
        Some("6400") => "H",
        _ => "CB",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let opus = RTCRtpCodec { mime_type: "audio/opus".into(), clock_rate: 48000, channels: 2, ..Default::default() };
        assert_eq!(codec_format(&opus), TrackFormat::Audio(AudioFormat { codec: "opus".into(), sample_rate: Some(48000), channel_num: Some(2) }));
        let vp8 = RTCRtpCodec { mime_type: "video/VP8".into(), clock_rate: 90000, ..Default::default() };
        assert_eq!(codec_format(&vp8), TrackFormat::Video(VideoFormat { codec: "vp8".into(), profile: None }));
        let h264 = RTCRtpCodec {
            mime_type: "video/H264".into(),
            clock_rate: 90000,
            sdp_fmtp_line: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f".into(),
            ..Default::default()
        };
        assert_eq!(codec_format(&h264), TrackFormat::Video(VideoFormat { codec: "h264".into(), profile: Some("CB".into()) }));
    }
}

/// Property tests: OWT's format object is built from any negotiated codec without a panic.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn codec_format_names_the_codec(
            mime in prop_oneof!["(audio|video|AUDIO|Video|x)?/?[A-Za-z0-9]{0,6}(/[a-z]{0,3})?", "\\PC{0,12}"],
            fmtp in prop_oneof!["((profile-level-id|PROFILE-LEVEL-ID|x)=[0-9a-fA-F]{0,8}|packetization-mode=1| ?;)*", "\\PC{0,20}"],
            clock_rate in any::<u32>(),
            channels in any::<u16>(),
        ) {
            let codec = RTCRtpCodec { mime_type: mime.clone(), clock_rate, channels, sdp_fmtp_line: fmtp.clone(), ..Default::default() };
            let f = codec_format(&codec);
            let lower = mime.to_ascii_lowercase();
            let name = lower.split('/').nth(1).unwrap_or(&lower);
            match &f {
                TrackFormat::Audio(a) => {
                    prop_assert!(lower.starts_with("audio/"));
                    prop_assert_eq!(a.codec.as_str(), name);
                    prop_assert_eq!(a.sample_rate, Some(clock_rate));
                }
                TrackFormat::Video(v) => {
                    prop_assert!(!lower.starts_with("audio/"));
                    prop_assert_eq!(v.codec.as_str(), name);
                    if name == "h264" {
                        prop_assert!(["CB", "B", "M", "H"].contains(&v.profile.as_deref().unwrap_or_default()), "{:?}", f);
                    }
                }
            }
            prop_assert!(["CB", "B", "M", "H"].contains(&h264_profile(&fmtp)));
        }

        #[test]
        fn h264_profile_reads_the_profile_idc(prefix in prop::sample::select(&["42e0", "42c0", "4200", "4280", "4d00", "4d40", "6400"][..]), level in "[0-9a-f]{2}", upper in any::<bool>()) {
            let id = format!("{prefix}{level}");
            let id = if upper { id.to_ascii_uppercase() } else { id };
            let expected = match prefix {
                "42e0" | "42c0" => "CB",
                "4200" | "4280" => "B",
                "4d00" | "4d40" => "M",
                _ => "H",
            };
            prop_assert_eq!(h264_profile(&format!("packetization-mode=1; profile-level-id={id}")), expected);
        }
    }
}
