//! Checks of a subscriber's simulcast video: continuity across layer switches, every
//! frame decodable, and which layer (size and colour) each picture came from.

use std::time::{Duration, Instant};

use tessera_client::peer::Subscriber;
use tessera_client::signaling::Signaling;

/// A layered subscriber's video, checked: sequence numbers without a gap, timestamps never
/// going back, picture ids one per frame going up by one (across layer switches too), the
/// first packet a keyframe, and every frame decodable (`switches` frames at most may be
/// cut short where the old layer was left mid-frame). Returns each decoded picture's size
/// and the name of its colour.
pub fn check_layered_video(sub: &Subscriber, switches: usize) -> Vec<(usize, usize, &'static str)> {
    use tessera_webrtc_agent::simulcast::{vp8_keyframe_size, vp8_picture_id};
    let packets = sub.packets("video");
    assert!(!packets.is_empty(), "no video");
    // The server starts a leg on a keyframe once its side of DTLS is done; the client's
    // side finishes when the server's last flight reaches it, so that first keyframe can
    // come a moment too early for the client to decrypt (a browser drops it too), and the
    // frames after it until the keyframe asked for at connect time are undecodable. Only
    // in that first moment: what precedes the first keyframe must have come within
    // `EARLY_WINDOW` of the first packet, and is left out of the checks below.
    const EARLY_WINDOW_US: u64 = 300_000;
    let first_key = packets.iter().position(|p| vp8_keyframe_size(&p.payload).is_some());
    let early = first_key.filter(|k| packets.get(*k).is_some_and(|p| p.arrived_us.saturating_sub(packets[0].arrived_us) <= EARLY_WINDOW_US));
    if let Some(k) = early.filter(|k| *k > 0) {
        println!("{k} packet(s) came before the first keyframe, within {EARLY_WINDOW_US} µs of the first");
    }
    let packets = &packets[early.unwrap_or(0)..];
    assert!(
        vp8_keyframe_size(&packets[0].payload).is_some(),
        "the first packet (past {EARLY_WINDOW_US} µs) does not start a keyframe: {:02x?}",
        packets
            .iter()
            .take(4)
            .map(|p| (p.header.sequence_number, p.header.timestamp, p.arrived_us, p.payload.get(..12).unwrap_or_default().to_vec()))
            .collect::<Vec<_>>()
    );
    continuous(packets);
    for w in packets.windows(2) {
        let (a, b) = (&w[0].header, &w[1].header);
        let (pa, pb) = (vp8_picture_id(&w[0].payload).expect("picture id"), vp8_picture_id(&w[1].payload).expect("picture id"));
        if a.timestamp == b.timestamp {
            assert_eq!(pa, pb, "one picture id per frame");
        } else {
            assert_eq!(pb, (pa + 1) & 0x7fff, "picture ids jump from {pa} to {pb}");
        }
    }
    let sent = packets.iter().filter(|p| p.header.marker).count();
    let frames = tessera_client::media::decode_vp8(packets).unwrap();
    assert!(frames.len() <= sent && frames.len() + switches + 1 >= sent, "{} of {sent} frames decoded", frames.len());
    frames.iter().map(picture).collect()
}

/// Sequence numbers without a gap and timestamps never going back, across switches.
fn continuous(packets: &[tessera_client::peer::Received]) {
    for w in packets.windows(2) {
        let (a, b) = (&w[0].header, &w[1].header);
        assert_eq!(b.sequence_number, a.sequence_number.wrapping_add(1), "a gap in the sequence");
        assert!(b.timestamp.wrapping_sub(a.timestamp) < 0x8000_0000, "timestamp went back: {} -> {}", a.timestamp, b.timestamp);
    }
}

/// A decoded picture's size and the name of its (solid) colour.
pub fn picture(f: &tessera_client::media::Frame) -> (usize, usize, &'static str) {
    let name = match f.around(f.width / 2, f.height / 2) {
        (r, g, b) if r > 150 && g <= 150 && b <= 150 => "red",
        (r, g, b) if r <= 150 && g > 150 && b <= 150 => "green",
        (r, g, b) if r <= 150 && g <= 150 && b > 150 => "blue",
        _ => "other",
    };
    (f.width, f.height, name)
}

/// Runs of equal items, in order.
pub fn runs<T: PartialEq + Copy>(items: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for i in items {
        if out.last() != Some(i) {
            out.push(*i);
        }
    }
    out
}

/// A layered H.264 subscriber's video, checked as [`check_layered_video`] checks VP8
/// (H.264 has no picture ids): sequence numbers without a gap, timestamps never going
/// back, the first packet an IDR with its sequence parameter set, and every frame
/// decodable (`switches` frames at most cut short). Returns each picture's size and colour.
pub fn check_layered_h264(sub: &Subscriber, switches: usize) -> Vec<(usize, usize, &'static str)> {
    use tessera_webrtc_agent::simulcast::h264_sps_size;
    let packets = sub.packets("video");
    assert!(!packets.is_empty(), "no video");
    assert!(
        h264_sps_size(&packets[0].payload).is_some(),
        "the first packet does not start an IDR with its SPS: {:02x?}",
        &packets[0].payload.get(..8)
    );
    continuous(&packets);
    // Frames by timestamp: a payloader may mark the packet of an IDR's parameter sets too.
    let mut sent: Vec<u32> = packets.iter().filter(|p| p.header.marker).map(|p| p.header.timestamp).collect();
    sent.dedup();
    let frames = tessera_client::media::decode_h264(&packets).unwrap();
    let lost: Vec<&u32> = sent.iter().filter(|ts| !frames.iter().any(|f| f.timestamp == **ts)).collect();
    assert!(
        frames.len() <= sent.len() && frames.len() + switches + 1 >= sent.len(),
        "{} of {} frames decoded; the timestamps of those not decoded: {lost:?}",
        frames.len(),
        sent.len()
    );
    frames.iter().map(picture).collect()
}

/// Waits until the subscriber's last decoded picture is `want` (size and colour).
pub async fn wait_for_picture(sub: &Subscriber, want: (usize, usize, &'static str), within: Duration) -> Duration {
    wait_for_picture_in(sub, want, within, tessera_client::media::decode_vp8).await
}

/// [`wait_for_picture`] for video that `decode` decodes.
pub async fn wait_for_picture_in(
    sub: &Subscriber,
    want: (usize, usize, &'static str),
    within: Duration,
    decode: fn(&[tessera_client::peer::Received]) -> anyhow::Result<Vec<tessera_client::media::Frame>>,
) -> Duration {
    let start = Instant::now();
    loop {
        let packets = sub.packets("video");
        let last = decode(&packets).unwrap().last().map(picture);
        if last == Some(want) {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "no {want:?} picture within {within:?}; last {last:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The next `video.layers` update the server sends the publisher of `stream`; the test
/// acts on it as Tessera's JS client does (the other layers stop being sent).
pub async fn asked_layers(psig: &mut Signaling, stream: &str, p: &tessera_client::simulcast::SimulcastPublisher) -> Vec<String> {
    let n = psig
        .wait_for("video.layers", Duration::from_secs(5), |n| {
            n.event == "stream" && n.data["id"] == stream && n.data["data"]["field"] == "video.layers"
        })
        .await
        .unwrap();
    let active: Vec<String> = n.data["data"]["value"]["active"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect();
    for rid in ["q", "h", "f"] {
        p.stop_layer(rid, !active.iter().any(|a| a == rid));
    }
    active
}
