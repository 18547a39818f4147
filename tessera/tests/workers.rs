//! The forwarding engine's own promises: one UDP socket per worker however many peers
//! connect, subscribers spread over the workers, media crossing from the publisher's
//! worker to the others intact, and routes that forged checks cannot move. (Everything
//! else about forwarding is the SFU suite.)

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tessera_client::peer::{Marker, Publisher, Subscriber, is_vp8_keyframe};

const SUBSCRIBERS: usize = 40;

fn config(base: u16) -> String {
    format!("[webrtc]\nbind_ip = \"127.0.0.1\"\nengine = \"workers\"\nworkers = 2\nudp_port_min = {base}\nudp_port_max = {}\n", base + 99)
}

/// Log text without terminal colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The UDP sockets the process holds, as `ss` lists them (local address:port).
fn udp_sockets(pid: u32) -> Vec<String> {
    let out = std::process::Command::new("ss").args(["-uanp"]).output().expect("ss (iproute2) is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    let tag = format!("pid={pid},");
    text.lines().filter(|l| l.contains(&tag)).filter_map(|l| l.split_whitespace().nth(3).map(str::to_string)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_subscribers_on_two_workers_use_two_ports_and_get_every_packet() {
    // A port block of its own, so a parallel test's server cannot take these ports.
    let base = 47_000 + (std::process::id() % 20) as u16 * 100;
    let (_dir, s) = common::start_with_config(&config(base));
    let room = s.new_room(json!({})).await;
    let (mut psig, _) = s.join(&room, "pub").await;
    let publisher = Arc::new(Publisher::start(&mut psig, common::av(1), None).await.unwrap());
    psig.wait_for("stream add", Duration::from_secs(5), |n| n.event == "stream" && n.data["status"] == "add").await.unwrap();

    let sender = {
        let p = publisher.clone();
        tokio::spawn(async move { p.send_for(Duration::from_secs(60), 30, 800).await })
    };
    let mut subs = Vec::new();
    let mut sigs = Vec::new();
    for i in 0..SUBSCRIBERS {
        let (mut sig, _) = s.join(&room, &format!("sub{i}")).await;
        subs.push(Subscriber::start(&mut sig, &publisher.stream_id, true, true, false).await.unwrap());
        sigs.push(sig);
    }
    for (i, sub) in subs.iter().enumerate() {
        sub.wait_until(&format!("subscriber {i}: a keyframe"), Duration::from_secs(5), |r| {
            r.iter().any(|p| p.kind == "video" && is_vp8_keyframe(&p.payload))
        })
        .await
        .unwrap();
    }

    let sockets = udp_sockets(s.child.id());
    assert_eq!(sockets.len(), 2, "one socket per worker: {sockets:?}");
    // Two ports of the configured range (the first ones free: the range overlaps the
    // kernel's ephemeral ports, which other tests' outgoing connections may hold).
    let ports: HashSet<u16> = sockets.iter().filter_map(|a| a.rsplit(':').next().and_then(|p| p.parse().ok())).collect();
    assert_eq!(ports.len(), 2, "{sockets:?}");
    assert!(ports.iter().all(|p| (base..=base + 99).contains(p)), "{sockets:?}");
    // Both workers carry transports (the room outgrew its first worker).
    let log = strip_ansi(&s.stderr.lock().unwrap());
    for w in 0..2 {
        let on_w = log.lines().filter(|l| l.contains("transport connected") && l.contains(&format!("worker={w}"))).count();
        assert!(on_w >= 10, "worker {w} connected {on_w} transports");
    }
    let stats: Value = s.client().get(s.url("/v1/stats")).bearer_auth(common::KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(stats["media"]["transports"], json!(SUBSCRIBERS + 1), "{stats}");

    // Every subscriber — on the publisher's worker or the other one — gets the
    // publisher's payloads byte for byte, and (nearly) all of those sent over two seconds.
    let newest = || publisher.sent.lock().unwrap().keys().filter(|(k, _)| *k == "video").map(|(_, i)| *i).max().unwrap_or(0);
    let from = newest();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The last 100 ms may still be on their way.
    let to = newest().saturating_sub(10);
    assert!(to > from + 30, "the publisher sends ({from}..{to})");
    sender.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = publisher.sent.lock().unwrap().clone();
    for (i, sub) in subs.iter().enumerate() {
        let got = sub.packets("video");
        let mut in_window = 0;
        for r in &got {
            let m = Marker::find(&r.payload).expect("marker in payload");
            assert_eq!(&r.payload[..], &sent[&("video", m.index)][..], "subscriber {i}: packet {} differs", m.index);
            if (from..=to).contains(&m.index) {
                in_window += 1;
            }
        }
        let expected = (from..=to).filter(|n| sent.contains_key(&("video", *n))).count();
        assert!(in_window * 10 >= expected * 9, "subscriber {i} got {in_window} of the {expected} video packets sent in the window");
        assert!(!sub.packets("audio").is_empty(), "subscriber {i}: no audio");
    }
}

/// The figure: a server with 300 subscribers on 2 workers holds exactly two UDP
/// sockets. Light peers (the load generator's) keep the test cheap; the publisher sends
/// 10 video frames a second, and every subscriber gets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hundred_subscribers_on_two_workers_use_two_udp_sockets() {
    const MANY: usize = 300;
    let base = 45_000 + (std::process::id() % 20) as u16 * 100;
    let (_dir, s) = common::start_with_config(&config(base));
    let room = s.new_room(json!({})).await;
    let (mut psig, _) = s.join(&room, "pub").await;
    let publisher = Arc::new(Publisher::start(&mut psig, common::av(4), None).await.unwrap());
    let sender = {
        let p = publisher.clone();
        tokio::spawn(async move {
            loop {
                p.send_video(600).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut subs = Vec::new();
    let names: Vec<String> = (0..MANY).map(|i| format!("light{i}")).collect();
    for batch in names.chunks(10) {
        let joins = batch.iter().map(|name| {
            let (s, room, stream) = (&s, &room, &publisher.stream_id);
            async move {
                let (mut sig, _) = s.join(room, name).await;
                let sub = tessera_client::light::subscribe(&mut sig, "127.0.0.1", stream, false).await;
                (sig, sub)
            }
        });
        for (sig, sub) in futures_util::future::join_all(joins).await {
            subs.push((sig, sub.expect("light subscribe")));
        }
    }
    let sockets = udp_sockets(s.child.id());
    assert_eq!(sockets.len(), 2, "one socket per worker with {MANY} subscribers: {sockets:?}");
    let stats: Value = s.client().get(s.url("/v1/stats")).bearer_auth(common::KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(stats["media"]["transports"], json!(MANY + 1), "{stats}");
    let log = strip_ansi(&s.stderr.lock().unwrap());
    for w in 0..2 {
        let on_w = log.lines().filter(|l| l.contains("transport connected") && l.contains(&format!("worker={w}"))).count();
        assert!(on_w >= 100, "worker {w} connected {on_w} transports");
    }
    let counts = |subs: &[(tessera_client::signaling::Signaling, tessera_client::light::LightSubscriber)]| -> Vec<usize> {
        subs.iter().map(|(_, l)| l.received.lock().unwrap().iter().filter(|r| r.kind == "video").count()).collect()
    };
    let before = counts(&subs);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = counts(&subs);
    sender.abort();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        // 10 frames a second: about 20 in the window.
        assert!(a - b >= 15, "subscriber {i} got {} video packets in 2 s", a - b);
    }
}

/// The server ufrag and port in an answer SDP.
fn ice_of(sdp: &str) -> (String, u16) {
    let ufrag = sdp.lines().find_map(|l| l.trim().strip_prefix("a=ice-ufrag:")).expect("ufrag in answer").to_string();
    let port = sdp
        .lines()
        .find_map(|l| l.trim().strip_prefix("a=candidate:"))
        .and_then(|c| c.split_whitespace().nth(5))
        .and_then(|p| p.parse().ok())
        .expect("candidate port in answer");
    (ufrag, port)
}

/// An unsigned binding request naming `ufrag`, as anyone who saw one check in clear could forge.
fn forged_check(ufrag: &str) -> Vec<u8> {
    use rtc::stun::attributes::ATTR_USERNAME;
    use rtc::stun::message::{BINDING_REQUEST, Message, TransactionId};
    use rtc::stun::textattrs::TextAttribute;
    let mut m = Message::new();
    let user = TextAttribute::new(ATTR_USERNAME, format!("{ufrag}:attacker"));
    m.build(&[Box::new(TransactionId::new()), Box::new(BINDING_REQUEST), Box::new(user)]).unwrap();
    m.raw
}

/// The ufrag travels in clear in every check: a forged, unsigned check from another
/// address must not steal the publisher's route (its media would then be dropped), over
/// UDP or over an ICE-TCP connection; a TCP frame of a bad length closes that connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_check_cannot_redirect_a_publisher() {
    let base = 48_000 + (std::process::id() % 20) as u16 * 50;
    let cfg = format!("[webrtc]\nbind_ip = \"127.0.0.1\"\nengine = \"workers\"\nworkers = 1\nudp_port_min = {base}\nudp_port_max = {}\n", base + 49);
    let (_dir, s) = common::start_with_config(&cfg);
    let room = s.new_room(json!({})).await;
    let (mut psig, _) = s.join(&room, "pub").await;
    let publisher = Arc::new(Publisher::start(&mut psig, common::av(2), None).await.unwrap());
    let sender = {
        let p = publisher.clone();
        tokio::spawn(async move { p.send_for(Duration::from_secs(60), 30, 800).await })
    };
    let (mut sig, _) = s.join(&room, "sub").await;
    let sub = Subscriber::start(&mut sig, &publisher.stream_id, false, true, false).await.unwrap();
    sub.wait_until("video", Duration::from_secs(5), |r| r.iter().filter(|p| p.kind == "video").count() > 20).await.unwrap();

    let answer = publisher.conn.pc.remote_description().await.expect("the publisher has the server's answer");
    let (ufrag, port) = ice_of(&answer.sdp);
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let check = forged_check(&ufrag);
    let mut framed = u16::try_from(check.len()).unwrap().to_be_bytes().to_vec();
    framed.extend_from_slice(&check);
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("the worker accepts ICE-TCP on its port");
    let flood = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        loop {
            let _ = attacker.send_to(&check, ("127.0.0.1", port)).await;
            let _ = tcp.write_all(&framed).await;
            let _ = tcp.write_all(&[0, 4, 0x16, 0xfe, 0xfd, 0]).await; // a DTLS-looking frame on an unbound connection
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = sub.packets("video").len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = sub.packets("video").len() - before;
    flood.abort();
    sender.abort();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut bad = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        bad.write_all(&[0xff, 0xff]).await.unwrap(); // 65535: more than any WebRTC packet
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(2), bad.read_to_end(&mut rest)).await;
        assert!(matches!(closed, Ok(Ok(0))), "a frame of 65535 bytes should close the connection: {closed:?}");
    }
    // 30 frames/s of one packet each: about 60 in two seconds.
    assert!(during >= 50, "the subscriber got {during} video packets in 2 s while forged checks flew");
}

/// The load generator's light peers (rtc sans-I/O, `tessera_client::light`) subscribe like
/// any client: one reading RTP headers in clear sees the publisher's packets with
/// continuous sequence numbers; one decrypting reads the publisher's markers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn light_peers_receive_the_stream() {
    let (_dir, s) = common::start_with_config("[webrtc]\nbind_ip = \"127.0.0.1\"\n");
    let room = s.new_room(json!({})).await;
    let (mut psig, _) = s.join(&room, "pub").await;
    let publisher = Arc::new(Publisher::start(&mut psig, common::av(3), None).await.unwrap());
    let sender = {
        let p = publisher.clone();
        tokio::spawn(async move { p.send_for(Duration::from_secs(30), 30, 800).await })
    };
    let mut subs = Vec::new();
    for decrypts in [false, true] {
        let (mut sig, _) = s.join(&room, &format!("light-{decrypts}")).await;
        let sub = tessera_client::light::subscribe(&mut sig, "127.0.0.1", &publisher.stream_id, decrypts).await.expect("light subscribe");
        subs.push((sig, sub));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    sender.abort();
    for (_, sub) in &subs {
        let log = sub.received.lock().unwrap().clone();
        let video: Vec<_> = log.iter().filter(|r| r.kind == "video").collect();
        assert!(video.len() > 40, "decrypts={}: {} video packets in 2 s", sub.decrypts, video.len());
        assert!(log.iter().any(|r| r.kind == "audio"), "decrypts={}: no audio", sub.decrypts);
        let gaps = video.windows(2).filter(|w| w[1].header.sequence_number != w[0].header.sequence_number.wrapping_add(1)).count();
        assert_eq!(gaps, 0, "decrypts={}: sequence numbers continuous", sub.decrypts);
        let marked = video.iter().filter(|r| Marker::find(&r.payload).is_some_and(|m| m.tag == 3)).count();
        if sub.decrypts {
            assert_eq!(marked, video.len(), "every decrypted packet carries the publisher's marker");
        } else {
            assert_eq!(marked, 0, "payloads are not read");
            assert!(video.iter().all(|r| r.size > 800), "sizes of the SRTP packets: {:?}", video.first().map(|r| r.size));
        }
    }
}
