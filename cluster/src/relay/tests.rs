//! Two relays on loopback, connected directly (no NATS): an exporter with a stream and an
//! importer that takes it, sometimes through a proxy that loses packets.

use super::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use tessera_core::media::Need;

/// Asks one exporter directly; optionally through a proxy address (both ways).
struct Direct {
    exporter: Weak<Relay>,
    via: Option<SocketAddr>,
}

#[async_trait::async_trait]
impl Control for Direct {
    fn node_id(&self) -> String {
        "test".into()
    }

    async fn ask(&self, request: &ExportRequest) -> Result<ExportReply, ImportError> {
        let exporter = self.exporter.upgrade().ok_or_else(|| ImportError::NotFound(request.stream.clone()))?;
        let mut request = request.clone();
        if let Some(via) = self.via {
            request.to = via;
        }
        match exporter.export(request) {
            Ok(mut reply) => {
                if let Some(via) = self.via {
                    reply.from = via;
                }
                Ok(reply)
            }
            Err(ExportError::NoStream(s)) => Err(ImportError::NotFound(s)),
            Err(e) => Err(ImportError::Failed { stream: String::new(), reason: e.to_string() }),
        }
    }
}

fn socket() -> std::net::UdpSocket {
    bind("127.0.0.1:0".parse().unwrap()).unwrap()
}

fn vp8() -> CodecInfo {
    CodecInfo { mime_type: "video/VP8".into(), clock_rate: 90000, channels: 0, fmtp: String::new(), payload_type: Some(96) }
}

fn rtp(seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 96];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 42]);
    p.extend_from_slice(format!("payload {seq}").as_bytes());
    p
}

struct Pair {
    exporter: Arc<Relay>,
    importer: Arc<Relay>,
    sink: Arc<dyn RtpSink>,
    keyframes: Arc<AtomicUsize>,
    from: Arc<LocalStreams>,
    into: Arc<LocalStreams>,
}

/// An exporter offering stream `s` (video) in room `r`, and an importer asking it.
fn pair(secrets: (Option<&[u8]>, Option<&[u8]>), via: Option<SocketAddr>) -> Pair {
    let from = LocalStreams::new();
    let keyframes = Arc::new(AtomicUsize::new(0));
    let k = keyframes.clone();
    let on_keyframe = Arc::new(move || {
        k.fetch_add(1, Ordering::Relaxed);
    });
    let sink =
        from.publish_local("r", "s", vec![LocalTrack { kind: MediaKind::Video, codec: vp8(), on_keyframe, rid: None, on_need: None }]).remove(0);
    let nobody = Arc::new(Direct { exporter: Weak::new(), via: None });
    let exporter = Relay::new(nobody, socket(), secrets.0, from.clone()).unwrap();
    let into = LocalStreams::new();
    let control = Arc::new(Direct { exporter: Arc::downgrade(&exporter), via });
    let importer = Relay::new(control, socket(), secrets.1, into.clone()).unwrap();
    Pair { exporter, importer, sink, keyframes, from, into }
}

/// Sends packets until the tap gets one (the export starts as the importer registers).
async fn first_packet(p: &Pair, tap: &mut tessera_core::media::Tap) -> u16 {
    for seq in 0..200u16 {
        p.sink.send(&rtp(seq));
        if let Ok(Some(got)) = tokio::time::timeout(Duration::from_millis(10), tap.recv()).await {
            return wire::rtp_seq(&got).unwrap();
        }
    }
    panic!("nothing crossed the relay");
}

#[tokio::test]
async fn a_stream_crosses_intact_with_keyframe_requests_back_and_ends_at_its_origin() {
    let p = pair((None, None), None);
    let room = RoomId::from("r");
    assert_eq!(p.importer.import(&room, "nope").await, Err(ImportError::NotFound("nope".into())));
    assert_eq!(p.importer.import(&"other-room".into(), "s").await, Err(ImportError::NotFound("s".into())), "a stream of another room is not given");
    p.importer.import(&room, "s").await.unwrap();
    p.importer.import(&room, "s").await.unwrap();
    assert_eq!(p.importer.counts(), (1, 0), "imported once");
    assert_eq!(p.exporter.counts(), (0, 1));
    let mut tap = p.into.tap("s", MediaKind::Video).unwrap();
    assert_eq!(tap.codec, vp8());
    let first = first_packet(&p, &mut tap).await;
    for seq in first + 1..first + 300 {
        p.sink.send(&rtp(seq));
        let got = tokio::time::timeout(Duration::from_secs(1), tap.recv()).await.unwrap().unwrap();
        assert_eq!(&got[..], &rtp(seq)[..], "packet {seq} byte for byte, in order");
    }
    // The tap on the importer and the importer's own request after registering asked the
    // origin for pictures (plus the exporter's tap itself).
    let deadline = Instant::now() + Duration::from_secs(2);
    // Throttled at the origin: three requests at once make a keyframe now and one deferred.
    while p.keyframes.load(Ordering::Relaxed) < 2 {
        assert!(Instant::now() < deadline, "keyframe requests did not cross back: {}", p.keyframes.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = p.keyframes.load(Ordering::Relaxed);
    p.into.request_keyframe("s");
    let deadline = Instant::now() + Duration::from_secs(2);
    while p.keyframes.load(Ordering::Relaxed) == before {
        assert!(Instant::now() < deadline, "a consumer's keyframe request did not reach the origin");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(p.importer.counters.nacked.load(Ordering::Relaxed), 0, "no loss on loopback");
    // An exporter refuses to pass on a stream it imported itself.
    let request = ExportRequest {
        room: room.clone(),
        stream: "s".into(),
        to: p.exporter.addr(),
        auth: false,
        channels: vec![(MediaKind::Video, 1)],
        layer_channels: vec![],
    };
    assert_eq!(p.importer.export(request), Err(ExportError::NoStream("s".into())));
    // The stream ends at its origin: it ends at the importer, and its consumer hears so.
    p.from.unpublish_local("s");
    assert_eq!(tokio::time::timeout(Duration::from_secs(2), tap.recv()).await.unwrap(), None);
    assert!(p.into.stream_room("s").is_none());
    let deadline = Instant::now() + Duration::from_secs(2);
    while p.exporter.counts() != (0, 0) || p.importer.counts() != (0, 0) {
        assert!(Instant::now() < deadline, "export {:?} / import {:?} left over", p.exporter.counts(), p.importer.counts());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Forwards datagrams between the exporter and the importer, both ways, dropping the first
/// transmission of every 7th RTP packet, and everything once `cut`.
async fn lossy_proxy(proxy: UdpSocket, exporter: SocketAddr, importer: SocketAddr, dropped: Arc<Mutex<HashSet<u16>>>, cut: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 2048];
    loop {
        let Ok((n, src)) = proxy.recv_from(&mut buf).await else { return };
        if cut.load(Ordering::Relaxed) {
            continue;
        }
        let datagram = &buf[..n];
        let to = if src == exporter { importer } else { exporter };
        if src == exporter && datagram[1] == Kind::Rtp as u8 {
            let seq = wire::rtp_seq(&datagram[wire::HEADER..]).unwrap();
            if seq % 7 == 3 && dropped.lock().unwrap().insert(seq) {
                continue;
            }
        }
        let _ = proxy.send_to(datagram, to).await;
    }
}

#[tokio::test]
async fn lost_packets_are_asked_again_and_repaired() {
    let proxy = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let via = proxy.local_addr().unwrap();
    let p = pair((None, None), Some(via));
    let dropped = Arc::new(Mutex::new(HashSet::new()));
    tokio::spawn(lossy_proxy(proxy, p.exporter.addr(), p.importer.addr(), dropped.clone(), Arc::default()));
    p.importer.import(&"r".into(), "s").await.unwrap();
    let mut tap = p.into.tap("s", MediaKind::Video).unwrap();
    let first = first_packet(&p, &mut tap).await;
    let last = first + 400;
    let mut got = HashSet::new();
    for seq in first + 1..=last {
        p.sink.send(&rtp(seq));
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    while got.len() < usize::from(last - first) {
        match tokio::time::timeout(Duration::from_secs(2), tap.recv()).await {
            Ok(Some(packet)) => {
                let seq = wire::rtp_seq(&packet).unwrap();
                assert_eq!(&packet[..], &rtp(seq)[..]);
                got.insert(seq);
            }
            _ => break,
        }
    }
    let lost: Vec<u16> = (first + 1..=last).filter(|s| !got.contains(s)).collect();
    let dropped = dropped.lock().unwrap().len();
    assert!(dropped > 50, "the proxy dropped {dropped}");
    assert!(lost.is_empty(), "{} of {dropped} dropped packets never repaired: {lost:?}", lost.len());
    assert!(p.importer.counters.nacked.load(Ordering::Relaxed) >= dropped as u64);
}

#[tokio::test]
async fn authenticated_relays_drop_forgeries_and_refuse_a_mismatch() {
    let secret = b"the cluster's relay key".as_slice();
    let p = pair((Some(secret), Some(secret)), None);
    p.importer.import(&"r".into(), "s").await.unwrap();
    let mut tap = p.into.tap("s", MediaKind::Video).unwrap();
    let first = first_packet(&p, &mut tap).await;
    // A forged packet on the import's channel, from another socket, unsigned and signed
    // with a wrong key: dropped, the real stream goes on.
    let channel = *p.importer.imports.lock().unwrap().by_channel.keys().next().unwrap();
    let forger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = Vec::new();
    let dropped_before = p.importer.counters.dropped.load(Ordering::Relaxed);
    for key in [None, Some(Key::new(b"wrong"))] {
        wire::encode(&mut buf, Kind::Rtp, channel, &rtp(9999), key.as_ref());
        forger.send_to(&buf, p.importer.addr()).await.unwrap();
    }
    p.sink.send(&rtp(first + 1));
    let got = tokio::time::timeout(Duration::from_secs(1), tap.recv()).await.unwrap().unwrap();
    assert_eq!(&got[..], &rtp(first + 1)[..]);
    let deadline = Instant::now() + Duration::from_secs(1);
    while p.importer.counters.dropped.load(Ordering::Relaxed) < dropped_before + 2 {
        assert!(Instant::now() < deadline, "forged datagrams were not counted as dropped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // An importer without authentication is refused by one with it, with the reason.
    let unsigned = pair((Some(secret), None), None);
    match unsigned.importer.import(&"r".into(), "s").await {
        Err(ImportError::Failed { reason, .. }) => assert!(reason.contains("relay_auth"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

/// The exporting node vanishes (the link is cut): the import ends after the lease and its
/// consumers hear so, instead of waiting for packets forever; the exporter, hearing
/// nothing from its importer either, stops sending.
#[tokio::test]
async fn an_import_ends_when_its_exporter_goes_silent() {
    let proxy = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let via = proxy.local_addr().unwrap();
    let p = pair((None, None), Some(via));
    let cut = Arc::new(AtomicBool::new(false));
    tokio::spawn(lossy_proxy(proxy, p.exporter.addr(), p.importer.addr(), Arc::default(), cut.clone()));
    p.importer.import(&"r".into(), "s").await.unwrap();
    let mut tap = p.into.tap("s", MediaKind::Video).unwrap();
    first_packet(&p, &mut tap).await;
    // A silent track (a muted publisher) keeps the import: the exporter says it is alive.
    tokio::time::sleep(LEASE + Duration::from_secs(1)).await;
    assert_eq!(p.importer.counts(), (1, 0), "a silent but alive export is kept");
    cut.store(true, Ordering::Relaxed);
    let cut_at = Instant::now();
    assert_eq!(tokio::time::timeout(LEASE + Duration::from_secs(3), tap.recv()).await.unwrap(), None);
    // The lease runs from the last keepalive heard (sent every second; later on a loaded machine).
    assert!(cut_at.elapsed() >= LEASE - 2 * KEEPALIVE, "ended after the lease, not before ({:?})", cut_at.elapsed());
    assert!(p.into.stream_room("s").is_none());
    let deadline = Instant::now() + Duration::from_secs(4);
    while p.exporter.counts() != (0, 0) {
        assert!(Instant::now() < deadline, "the exporter kept sending to a silent importer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An origin whose video has three simulcast layers, each kept as a stream `s/<rid>` of a
/// [`LocalStreams`] (which knows no layers itself); `s`'s top layer is `f`.
struct ThreeLayers {
    streams: Arc<LocalStreams>,
    /// The layer taps made (RID, tap id) and the idle calls (tap id, idle), in order.
    tapped: Mutex<Vec<(String, u64)>>,
    idles: Mutex<Vec<(u64, bool)>>,
    /// The layer choices made on its taps (tap id, choice), in order.
    choices: Mutex<Vec<(u64, LayerChoice)>>,
}

const RIDS: [&str; 3] = ["q", "h", "f"];

impl StreamSource for ThreeLayers {
    fn tap(&self, stream: &str, kind: MediaKind) -> Option<tessera_core::media::Tap> {
        let tap = self.streams.tap(&format!("{stream}/f"), kind)?;
        self.tapped.lock().unwrap().push(("*".to_string(), tap.sink_id));
        Some(tap)
    }
    fn set_tap_layer(&self, _stream: &str, _kind: MediaKind, sink_id: u64, layer: LayerChoice) {
        self.choices.lock().unwrap().push((sink_id, layer));
    }
    fn untap(&self, stream: &str, kind: MediaKind, sink_id: u64) {
        for rid in RIDS {
            self.streams.untap(&format!("{stream}/{rid}"), kind, sink_id);
        }
    }
    fn request_keyframe(&self, stream: &str) {
        for rid in RIDS {
            self.streams.request_keyframe(&format!("{stream}/{rid}"));
        }
    }
    fn stream_room(&self, stream: &str) -> Option<RoomId> {
        self.streams.stream_room(&format!("{stream}/f"))
    }
    fn publish_local(&self, room: &str, stream: &str, tracks: Vec<LocalTrack>) -> Vec<Arc<dyn RtpSink>> {
        self.streams.publish_local(room, stream, tracks)
    }
    fn unpublish_local(&self, stream: &str) {
        self.streams.unpublish_local(stream)
    }
    fn layers(&self, _stream: &str) -> Vec<String> {
        RIDS.iter().map(|r| r.to_string()).collect()
    }
    fn tap_layer(&self, stream: &str, rid: &str) -> Option<tessera_core::media::Tap> {
        let tap = self.streams.tap(&format!("{stream}/{rid}"), MediaKind::Video)?;
        self.tapped.lock().unwrap().push((rid.to_string(), tap.sink_id));
        Some(tap)
    }
    fn set_tap_idle(&self, _stream: &str, _kind: MediaKind, sink_id: u64, idle: bool) {
        self.idles.lock().unwrap().push((sink_id, idle));
    }
    fn request_layer_keyframe(&self, stream: &str, rid: &str) {
        self.streams.request_keyframe(&format!("{stream}/{rid}"));
    }
}

/// An importer's source that keeps what it was given: each track's RID, and its sink
/// tapped (every packet kept by track).
struct Keeps {
    layers: bool,
    given: Mutex<Vec<Given>>,
}

/// One track an importer gave [`Keeps`]: its RID, the packets that came, its keyframe request.
struct Given {
    rid: Option<String>,
    kept: Arc<Mutex<Vec<Vec<u8>>>>,
    on_keyframe: Arc<dyn Fn() + Send + Sync>,
    on_need: Option<tessera_core::media::NeedFn>,
}

struct KeptSink(Arc<Mutex<Vec<Vec<u8>>>>);

impl RtpSink for KeptSink {
    fn send(&self, packet: &[u8]) {
        self.0.lock().unwrap().push(packet.to_vec());
    }
    fn has_consumers(&self) -> bool {
        true
    }
}

impl StreamSource for Keeps {
    fn tap(&self, _: &str, _: MediaKind) -> Option<tessera_core::media::Tap> {
        None
    }
    fn untap(&self, _: &str, _: MediaKind, _: u64) {}
    fn request_keyframe(&self, _: &str) {}
    fn stream_room(&self, _: &str) -> Option<RoomId> {
        None
    }
    fn publish_local(&self, _room: &str, _stream: &str, tracks: Vec<LocalTrack>) -> Vec<Arc<dyn RtpSink>> {
        let mut given = self.given.lock().unwrap();
        tracks
            .into_iter()
            .map(|t| {
                let kept = Arc::new(Mutex::new(Vec::new()));
                given.push(Given { rid: t.rid, kept: kept.clone(), on_keyframe: t.on_keyframe, on_need: t.on_need });
                Arc::new(KeptSink(kept)) as Arc<dyn RtpSink>
            })
            .collect()
    }
    fn unpublish_local(&self, _: &str) {}
    fn takes_layers(&self) -> bool {
        self.layers
    }
}

/// A simulcast video crosses layer by layer to an importer whose consumers choose layers
/// (an SFU): each layer on its own channel, byte for byte, and a keyframe request for one
/// layer reaches that layer's producer only, and a layer nobody needs idles its tap at the
/// origin. An importer that does not take layers (a mixer-only node) gets one layer, the
/// one its consumers agree on (the top one until they choose).
#[tokio::test]
async fn a_simulcast_video_crosses_layer_by_layer() {
    for takes_layers in [true, false] {
        let streams = LocalStreams::new();
        let mut sinks = Vec::new();
        let mut keyframes = Vec::new();
        for rid in RIDS {
            let count = Arc::new(AtomicUsize::new(0));
            let k = count.clone();
            let on_keyframe = Arc::new(move || {
                k.fetch_add(1, Ordering::Relaxed);
            });
            let track = LocalTrack { kind: MediaKind::Video, codec: vp8(), on_keyframe, rid: None, on_need: None };
            sinks.push(streams.publish_local("r", &format!("s/{rid}"), vec![track]).remove(0));
            keyframes.push(count);
        }
        let origin = Arc::new(ThreeLayers { streams, tapped: Mutex::default(), idles: Mutex::default(), choices: Mutex::default() });
        let nobody = Arc::new(Direct { exporter: Weak::new(), via: None });
        let exporter = Relay::new(nobody, socket(), None, origin.clone()).unwrap();
        let into = Arc::new(Keeps { layers: takes_layers, given: Mutex::default() });
        let control = Arc::new(Direct { exporter: Arc::downgrade(&exporter), via: None });
        let importer = Relay::new(control, socket(), None, into.clone()).unwrap();
        importer.import(&"r".into(), "s").await.unwrap();
        let rids: Vec<Option<String>> = into.given.lock().unwrap().iter().map(|g| g.rid.clone()).collect();
        if takes_layers {
            assert_eq!(rids, RIDS.map(|r| Some(r.to_string())), "one track per layer, in the origin's order");
            assert_eq!(exporter.counts(), (0, 3));
        } else {
            assert_eq!(rids, [None], "the top layer alone");
        }
        // Each layer's packets carry its own payload: layer i sends seq 1000 * (i + 1) + n.
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut n = 0u16;
        loop {
            for (i, sink) in sinks.iter().enumerate() {
                sink.send(&rtp(1000 * (i as u16 + 1) + n));
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
            let given = into.given.lock().unwrap();
            if given.iter().all(|g| g.kept.lock().unwrap().len() >= 20) {
                for (i, g) in given.iter().enumerate() {
                    let layer = if takes_layers { i } else { 2 };
                    for p in g.kept.lock().unwrap().iter() {
                        let seq = wire::rtp_seq(p).unwrap();
                        assert_eq!(seq / 1000, layer as u16 + 1, "layer {layer}'s channel carries its packets only");
                        assert_eq!(&p[..], &rtp(seq)[..], "byte for byte");
                    }
                }
                break;
            }
            drop(given);
            assert!(Instant::now() < deadline, "the layers did not all cross");
        }
        if takes_layers {
            // Settle the requests made at the start (the taps', the importer's), then ask h.
            tokio::time::sleep(Duration::from_millis(800)).await;
            let before: Vec<usize> = keyframes.iter().map(|k| k.load(Ordering::Relaxed)).collect();
            (into.given.lock().unwrap()[1].on_keyframe)();
            let deadline = Instant::now() + Duration::from_secs(2);
            while keyframes[1].load(Ordering::Relaxed) == before[1] {
                assert!(Instant::now() < deadline, "h's keyframe request did not cross");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
            let after: Vec<usize> = keyframes.iter().map(|k| k.load(Ordering::Relaxed)).collect();
            assert_eq!((after[0], after[2]), (before[0], before[2]), "q and f were not asked");
            // Nobody on the importer needs f: its tap at the origin idles (so the
            // publisher may pause it), said once however often it is repeated; then f is
            // needed again.
            let f_tap = origin.tapped.lock().unwrap().iter().find(|(rid, _)| rid == "f").map(|t| t.1).unwrap();
            let f_need = into.given.lock().unwrap()[2].on_need.clone().expect("a layer says whether it is needed");
            assert!(into.given.lock().unwrap().iter().all(|g| g.on_need.is_some()));
            let f_wanted = |w: bool| f_need(Need::Layer(w));
            f_wanted(false);
            f_wanted(false);
            let deadline = Instant::now() + Duration::from_secs(3);
            while origin.idles.lock().unwrap().is_empty() {
                assert!(Instant::now() < deadline, "f's tap was not idled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Keepalives (every second) repeat the state; it is passed on once.
            tokio::time::sleep(KEEPALIVE + Duration::from_millis(300)).await;
            assert_eq!(*origin.idles.lock().unwrap(), [(f_tap, true)]);
            f_wanted(true);
            let deadline = Instant::now() + Duration::from_secs(3);
            while origin.idles.lock().unwrap().len() < 2 {
                assert!(Instant::now() < deadline, "f's tap was not woken");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(*origin.idles.lock().unwrap(), [(f_tap, true), (f_tap, false)]);
        } else {
            // The consumers there agree on a layer (a mixer's region): the origin's tap on the
            // whole video takes it, once however often keepalives repeat it.
            let tap = origin.tapped.lock().unwrap().iter().find(|(what, _)| what == "*").map(|t| t.1).unwrap();
            let need = into.given.lock().unwrap()[0].on_need.clone().expect("a video says which layer it needs");
            let fill = LayerChoice::Fill { width: 320, height: 240 };
            need(Need::Choice(fill.clone()));
            need(Need::Choice(fill.clone()));
            let deadline = Instant::now() + Duration::from_secs(3);
            while origin.choices.lock().unwrap().is_empty() {
                assert!(Instant::now() < deadline, "the choice did not cross");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(KEEPALIVE + Duration::from_millis(300)).await;
            need(Need::Choice(LayerChoice::Auto));
            let deadline = Instant::now() + Duration::from_secs(3);
            while origin.choices.lock().unwrap().len() < 2 {
                assert!(Instant::now() < deadline, "the second choice did not cross");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(*origin.choices.lock().unwrap(), [(tap, fill), (tap, LayerChoice::Auto)]);
        }
    }
}
