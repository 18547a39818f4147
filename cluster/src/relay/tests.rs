//! Two relays on loopback, connected directly (no NATS): an exporter with a stream and an
//! importer that takes it, sometimes through a proxy that loses packets.

use super::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize};

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
    let sink = from.publish_local("r", "s", vec![LocalTrack { kind: MediaKind::Video, codec: vp8(), on_keyframe }]).remove(0);
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
    let request = ExportRequest { room: room.clone(), stream: "s".into(), to: p.exporter.addr(), auth: false, channels: vec![(MediaKind::Video, 1)] };
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
