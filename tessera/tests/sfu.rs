//! The SFU end to end: real `tessera` binary, real WebRTC peers (webrtc-rs 0.21) on
//! 127.0.0.1, signaling through the real portal.

mod common;

use common::layers::{asked_layers, check_layered_h264, check_layered_video, runs, wait_for_picture, wait_for_picture_in};

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_client::peer::{Connection, Marker, PublishOptions, Publisher, Subscriber, is_vp8_keyframe, keyframes_by_tag};
use tessera_client::signaling::Signaling;

const CONFIG: &str = "[portal]\nreconnection_timeout_secs = 2\n[webrtc]\nbind_ip = \"127.0.0.1\"\n";

async fn stats(s: &common::Server) -> Value {
    s.client().get(s.url("/v1/stats")).bearer_auth(common::KEY).send().await.unwrap().json().await.unwrap()
}

/// Checks every received packet's payload against what the publisher sent, byte for byte.
fn assert_payloads_match(p: &Publisher, sub: &Subscriber, kind: &'static str) -> usize {
    let sent = p.sent.lock().unwrap();
    let got = sub.packets(kind);
    for r in &got {
        let m = Marker::find(&r.payload).expect("marker in payload");
        let original = sent.get(&(kind, m.index)).expect("packet was sent");
        assert_eq!(&r.payload[..], &original[..], "{kind} packet {} differs", m.index);
    }
    got.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_publisher_three_subscribers_mute_unpublish() {
    let (_dir, s) = common::start_with_config(CONFIG);
    let room = s.new_room(json!({})).await;
    let (mut psig, pinfo) = s.join(&room, "pub").await;
    let publisher = Arc::new(Publisher::start(&mut psig, common::av(7), None).await.unwrap());

    // Everyone (the publisher too) hears of the stream.
    let add = psig.wait_for("stream add", Duration::from_secs(5), |n| n.event == "stream" && n.data["status"] == "add").await.unwrap();
    let info = &add.data["data"];
    assert_eq!(info["id"], publisher.stream_id.as_str());
    assert_eq!(info["type"], "forward");
    assert_eq!(info["info"]["owner"], pinfo["id"]);
    assert_eq!(info["info"]["attributes"]["tag"], 7);
    let kinds: Vec<&str> = info["media"]["tracks"].as_array().unwrap().iter().map(|t| t["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["audio", "video"]);
    assert_eq!(info["media"]["tracks"][1]["format"]["codec"], "vp8");
    assert_eq!(info["media"]["tracks"][0]["format"]["codec"], "opus");

    // REST lists it, beside the room's mixed stream.
    let forward = |v: &Value| -> Vec<String> {
        v.as_array().unwrap().iter().filter(|s| s["type"] == "forward").map(|s| s["id"].as_str().unwrap().to_string()).collect()
    };
    let listed: Value =
        s.client().get(s.url(&format!("/v1/rooms/{room}/streams"))).bearer_auth(common::KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(forward(&listed), vec![publisher.stream_id.clone()]);
    assert!(listed.as_array().unwrap().iter().any(|s| s["id"] == format!("{room}-common") && s["type"] == "mixed"));

    let sender = {
        let p = publisher.clone();
        tokio::spawn(async move { p.send_for(Duration::from_secs(6), 30, 1000).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut subs = Vec::new();
    let mut sigs = Vec::new();
    for i in 0..3 {
        let (mut sig, _) = s.join(&room, &format!("sub{i}")).await;
        if i == 2 {
            // A late joiner.
            tokio::time::sleep(Duration::from_millis(800)).await;
        }
        let joined_at = Instant::now();
        let sub = Subscriber::start(&mut sig, &publisher.stream_id, true, true, false).await.unwrap();
        // A picture within a second: a keyframe arrives without waiting for the publisher's own schedule.
        sub.wait_until("first keyframe", Duration::from_secs(1) + Duration::from_millis(500), |r| {
            r.iter().any(|p| p.kind == "video" && is_vp8_keyframe(&p.payload))
        })
        .await
        .unwrap();
        assert!(joined_at.elapsed() < Duration::from_secs(3));
        subs.push(sub);
        sigs.push(sig);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Mute video: everyone is told, video stops, audio goes on.
    psig.ok("stream-control", Some(json!({"id": publisher.stream_id, "operation": "pause", "data": "video"}))).await.unwrap();
    let upd = sigs[0].wait_for("mute update", Duration::from_secs(3), |n| n.event == "stream" && n.data["status"] == "update").await.unwrap();
    assert_eq!(upd.data["data"], json!({"field": "video.status", "value": "inactive"}));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (v0, a0) = (subs[0].packets("video").len(), subs[0].packets("audio").len());
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (v1, a1) = (subs[0].packets("video").len(), subs[0].packets("audio").len());
    assert_eq!(v0, v1, "no video while muted");
    assert!(a1 > a0 + 20, "audio continues while video is muted ({a0} -> {a1})");
    let last_seq = subs[0].packets("video").last().unwrap().header.sequence_number;
    psig.ok("stream-control", Some(json!({"id": publisher.stream_id, "operation": "play", "data": "video"}))).await.unwrap();
    subs[0].wait_until("video after unmute", Duration::from_secs(2), |r| r.iter().filter(|p| p.kind == "video").count() > v1 + 5).await.unwrap();
    let after = subs[0].packets("video");
    // The first packet after unmute continues the sequence (no gap for the receiver to chase).
    assert_eq!(after[v1].header.sequence_number, last_seq.wrapping_add(1));

    let _ = sender.await;
    for sub in &subs {
        let video = assert_payloads_match(&publisher, sub, "video");
        let audio = assert_payloads_match(&publisher, sub, "audio");
        assert!(video > 60, "video packets: {video}");
        assert!(audio > 100, "audio packets: {audio}");
        // One SSRC per track towards each subscriber.
        let ssrcs: std::collections::HashSet<u32> = sub.packets("video").iter().map(|p| p.header.ssrc).collect();
        assert_eq!(ssrcs.len(), 1);
    }

    // Unpublish: the others get a remove; REST no longer lists it.
    publisher.stop(&mut psig).await.unwrap();
    let rm = sigs[1].wait_for("stream remove", Duration::from_secs(3), |n| n.event == "stream" && n.data["status"] == "remove").await.unwrap();
    assert_eq!(rm.data["id"], publisher.stream_id.as_str());
    let listed: Value =
        s.client().get(s.url(&format!("/v1/rooms/{room}/streams"))).bearer_auth(common::KEY).send().await.unwrap().json().await.unwrap();
    assert!(forward(&listed).is_empty(), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_publishers_at_once_every_subscriber_gets_keyframes_fast() {
    let (_dir, s) = common::start_with_config(CONFIG);
    let room = s.new_room(json!({})).await;
    // Ten publishers publish at the same moment.
    let mut starts = Vec::new();
    for i in 0..10u32 {
        let (s_portal, s_api_token) = (s.portal.clone(), s.token(&room, &format!("p{i}"), "presenter").await);
        starts.push(tokio::spawn(async move {
            let mut sig = Signaling::connect(&s_portal).await.unwrap();
            sig.ok("login", Some(json!({"token": s_api_token, "protocol": "1.2"}))).await.unwrap();
            let p = Publisher::start(&mut sig, PublishOptions { audio: false, video: true, data: false, tag: i, h264: false }, None).await.unwrap();
            (sig, Arc::new(p))
        }));
    }
    let mut pubs = Vec::new();
    for h in starts {
        pubs.push(h.await.unwrap());
    }
    let mut senders = Vec::new();
    for (_, p) in &pubs {
        let p = p.clone();
        // Publishers send their first keyframe now; later ones only when asked.
        senders.push(tokio::spawn(async move { p.send_for(Duration::from_secs(60), 20, 600).await.unwrap() }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    for viewer in 0..2 {
        let (mut sig, _) = s.join(&room, &format!("viewer{viewer}")).await;
        let started = Instant::now();
        let mut subs = Vec::new();
        for (_, p) in &pubs {
            subs.push(Subscriber::start(&mut sig, &p.stream_id, false, true, false).await.unwrap());
        }
        for (i, sub) in subs.iter().enumerate() {
            sub.wait_until("keyframe", Duration::from_secs(2), |r| r.iter().any(|p| p.kind == "video" && is_vp8_keyframe(&p.payload)))
                .await
                .unwrap_or_else(|e| {
                    let v = sub.packets("video");
                    panic!(
                        "viewer {viewer} stream {i}: {e}; {} video packets, keyframes by tag {:?}, publisher got {} PLIs, elapsed {:?}",
                        v.len(),
                        keyframes_by_tag(&v),
                        pubs[i].1.keyframe_requests.load(std::sync::atomic::Ordering::Relaxed),
                        started.elapsed()
                    )
                });
            let kf = keyframes_by_tag(&sub.packets("video"));
            assert!(kf.get(&(i as u32)).copied().unwrap_or(0) >= 1, "keyframe of publisher {i}");
        }
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    for h in senders {
        h.abort();
    }
    // Keyframe requests were throttled: far fewer than one per packet.
    for (_, p) in &pubs {
        let n = p.keyframe_requests.load(std::sync::atomic::Ordering::Relaxed);
        assert!((1..=20).contains(&n), "keyframe requests to one publisher: {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_channel_messages_arrive_intact_and_in_order() {
    let (_dir, s) = common::start_with_config(CONFIG);
    let room = s.new_room(json!({})).await;
    let (mut psig, _) = s.join(&room, "pub").await;
    let p = Publisher::start(&mut psig, PublishOptions { audio: false, video: false, data: true, tag: 1, h264: false }, None).await.unwrap();
    let (mut ssig, info) = s.join(&room, "sub").await;
    // A data stream without media is OWT's data stream: `data: true`, no tracks.
    let listed = info["room"]["streams"].as_array().unwrap().iter().find(|v| v["id"] == p.stream_id.as_str()).unwrap().clone();
    assert_eq!((listed["data"].clone(), listed["info"]["dataChannel"].clone()), (json!(true), json!(true)), "{listed}");
    assert_eq!(listed["media"]["tracks"], json!([]), "{listed}");
    let sub = Subscriber::start(&mut ssig, &p.stream_id, false, false, true).await.unwrap();
    // With media too, no top-level `data`: OWT's JS SDK refuses to subscribe to a stream
    // that is both (`A remote stream is either a data stream or a media stream`).
    let (mut msig, _) = s.join(&room, "media-and-data").await;
    let both = Publisher::start(&mut msig, PublishOptions { audio: true, video: false, data: true, tag: 2, h264: false }, None).await.unwrap();
    let add = ssig
        .wait_for("the media and data stream", Duration::from_secs(5), |n| n.event == "stream" && n.data["id"] == both.stream_id.as_str())
        .await
        .unwrap();
    let announced = &add.data["data"];
    assert!(announced.get("data").is_none(), "{announced}");
    assert_eq!(announced["info"]["dataChannel"], json!(true), "{announced}");
    assert_eq!(announced["media"]["tracks"][0]["type"], "audio", "{announced}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dc = p.data.as_ref().unwrap();
    let mut expected = Vec::new();
    for i in 0..100u32 {
        let text = format!("message {i}");
        dc.send_text(&text).await.unwrap();
        expected.push((true, text.into_bytes()));
        if i % 10 == 0 {
            let bin: Vec<u8> = (0..(i as usize * 100 + 1)).map(|b| (b % 251) as u8).collect();
            dc.send(bytes::BytesMut::from(&bin[..])).await.unwrap();
            expected.push((false, bin));
        }
    }
    let big: Vec<u8> = (0..64 * 1024).map(|b| (b % 253) as u8).collect();
    dc.send(bytes::BytesMut::from(&big[..])).await.unwrap();
    expected.push((false, big));
    let deadline = Instant::now() + Duration::from_secs(10);
    while sub.data.lock().unwrap().len() < expected.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = sub.data.lock().unwrap().clone();
    assert_eq!(got.len(), expected.len());
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, e, "message {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vanished_peer_leaves_the_others_working_and_is_freed() {
    let (_dir, s) = common::start_with_config(CONFIG);
    let room = s.new_room(json!({})).await;
    let baseline_fds = fd_count(s.child.id());
    let (mut good_sig, _) = s.join(&room, "good").await;
    let good = Arc::new(Publisher::start(&mut good_sig, common::av(1), None).await.unwrap());
    let (mut bad_sig, _) = s.join(&room, "bad").await;
    let bad = Arc::new(Publisher::start(&mut bad_sig, common::av(2), None).await.unwrap());
    let g = good.clone();
    let good_sender = tokio::spawn(async move { g.send_for(Duration::from_secs(8), 30, 800).await.unwrap() });
    let b = bad.clone();
    let bad_sender = tokio::spawn(async move { b.send_for(Duration::from_secs(8), 30, 800).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (mut vsig, _) = s.join(&room, "viewer").await;
    let from_good = Subscriber::start(&mut vsig, &good.stream_id, true, true, false).await.unwrap();
    let from_bad = Subscriber::start(&mut vsig, &bad.stream_id, true, true, false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!from_bad.packets("video").is_empty());
    let st = stats(&s).await;
    assert_eq!(st["media"]["transports"], 4, "{st}");

    // The bad peer vanishes: no unpublish, no logout, sockets just gone.
    bad_sender.abort();
    bad.conn.close().await;
    bad_sig.close().await;
    let rm = vsig.wait_for("stream remove", Duration::from_secs(15), |n| n.event == "stream" && n.data["status"] == "remove").await.unwrap();
    assert_eq!(rm.data["id"], bad.stream_id.as_str());
    let before = from_good.packets("video").len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(from_good.packets("video").len() > before + 5, "the good stream keeps flowing");

    // Its transport, publication and the subscription to it are gone.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let st = stats(&s).await;
        if st["media"]["transports"] == 3 && st["media"]["publications"] == 1 && st["participants"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "resources not freed: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = good_sender.await;
    // Everyone leaves: every media object and socket is freed.
    good.conn.close().await;
    from_good.conn.close().await;
    from_bad.conn.close().await;
    good_sig.close().await;
    vsig.close().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = stats(&s).await;
        let m = &st["media"];
        let media_empty = m["transports"] == 0 && m["publications"] == 0 && m["subscriptions"] == 0 && m["local_streams"] == 0;
        if media_empty && st["participants"] == 0 && st["sockets"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "not freed: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // UDP sockets closed too: the server's descriptor count is back near where it started.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = fd_count(s.child.id());
    assert!(after <= baseline_fds + 4, "descriptors: {baseline_fds} at start, {after} after everyone left");
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_signaling_is_refused_precisely() {
    let (_dir, s) = common::start_with_config(CONFIG);
    let room = s.new_room(json!({})).await;
    let (mut sig, _) = s.join(&room, "x").await;
    // Garbage SDP on a transport that exists.
    let ack = sig.ok("publish", Some(json!({"media": {"tracks": [{"type": "video", "mid": "0", "source": "camera"}]}}))).await.unwrap();
    let transport = ack["transportId"].as_str().unwrap().to_string();
    let r = sig.request("soac", Some(json!({"id": transport, "signaling": {"type": "offer", "sdp": "this is not sdp"}}))).await.unwrap();
    assert_eq!(r[0], "error");
    assert!(r[1].as_str().unwrap().contains("invalid SDP offer"), "{r:?}");
    // Someone else's or unknown transport.
    let r = sig.request("soac", Some(json!({"id": "nope", "signaling": {"type": "offer", "sdp": "v=0"}}))).await.unwrap();
    assert_eq!(r, vec![json!("error"), json!("Transport does NOT exist: nope")]);
    // Subscribing to a stream that does not exist.
    let r = sig.request("subscribe", Some(json!({"media": {"tracks": [{"type": "video", "mid": "0", "from": "ghost"}]}}))).await.unwrap();
    assert_eq!(r, vec![json!("error"), json!("Stream does NOT exist: ghost")]);
    // Bad shapes.
    let r = sig.request("publish", Some(json!({"media": {"tracks": [{"type": "smell", "mid": "0"}]}}))).await.unwrap();
    assert_eq!(r[0], "error");
    let r = sig.request("soac", Some(json!({"id": transport, "signaling": {"type": "answer", "sdp": "v=0"}}))).await.unwrap();
    assert_eq!(r[0], "error");
    // The room still works: a real publication goes through.
    let (mut sig2, _) = s.join(&room, "y").await;
    let p = Publisher::start(&mut sig2, common::av(3), None).await.unwrap();
    assert!(!p.stream_id.is_empty());

    // An operator stops it over REST: everyone is told, the publisher included.
    let url = s.url(&format!("/v1/rooms/{room}/streams/{}", p.stream_id));
    let res = s.client().delete(&url).bearer_auth(common::KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let rm = sig.wait_for("stream remove", Duration::from_secs(3), |n| n.event == "stream" && n.data["status"] == "remove").await.unwrap();
    assert_eq!(rm.data["id"], p.stream_id.as_str());
    let res = s.client().delete(&url).bearer_auth(common::KEY).send().await.unwrap();
    assert_eq!(res.status(), 404);
    // A mixed stream cannot be deleted that way.
    let res = s.client().delete(s.url(&format!("/v1/rooms/{room}/streams/{room}-common"))).bearer_auth(common::KEY).send().await.unwrap();
    assert_eq!(res.status(), 400);
}

/// OWT JS SDK 5.x style: one RTCPeerConnection per client for its publication and all
/// its subscriptions, renegotiated with a fresh offer per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_transport_carries_publication_and_subscriptions() {
    let (_dir, s) = common::start_with_config(CONFIG);
    let room = s.new_room(json!({})).await;
    let (mut asig, _) = s.join(&room, "alice").await;
    let (mut bsig, _) = s.join(&room, "bob").await;
    let (mut csig, _) = s.join(&room, "carol").await;
    let mut alice = Publisher::start(&mut asig, common::av(1), None).await.unwrap();
    let mut bob = Publisher::start(&mut bsig, common::av(2), None).await.unwrap();
    let carol = Publisher::start(&mut csig, PublishOptions { audio: false, video: true, data: false, tag: 3, h264: false }, None).await.unwrap();
    let alice_transport = alice.conn.transport.clone().unwrap();
    assert_eq!(alice_transport, alice.stream_id, "the first session's id names the transport");

    // Each subscribes to the others on its publishing connection.
    let sub_ab = alice.conn.subscribe(&mut asig, &bob.stream_id, true, true, false).await.unwrap();
    let sub_ac = alice.conn.subscribe(&mut asig, &carol.stream_id, false, true, false).await.unwrap();
    let sub_ba = bob.conn.subscribe(&mut bsig, &alice.stream_id, true, true, false).await.unwrap();
    assert_eq!(alice.conn.transport.as_deref(), Some(alice_transport.as_str()), "same transport reused");
    assert_ne!(sub_ab, sub_ac);
    let st = stats(&s).await;
    assert_eq!(st["media"]["transports"], 3, "{st}");
    assert_eq!(st["media"]["subscriptions"], 3, "{st}");
    let _ = sub_ba;
    // A transport opened by a subscription takes a stream of another codec later: Erin
    // subscribes to Carol's VP8, then on the same transport to Dave's H.264 (the server
    // keeps the first video m-line of an offer whole: rtc takes a connection's codecs from it).
    let (mut dsig, _) = s.join(&room, "dave").await;
    let (mut esig, _) = s.join(&room, "erin").await;
    let dave = Publisher::start(&mut dsig, PublishOptions { audio: false, video: true, data: false, tag: 4, h264: true }, None).await.unwrap();
    let mut erin = Subscriber::start(&mut esig, &carol.stream_id, false, true, false).await.unwrap();
    erin.conn.subscribe(&mut esig, &dave.stream_id, false, true, false).await.unwrap();
    // Carol's stream again on the same transport: each subscription is its own MediaStream
    // (msid), or a browser would put both video tracks into one (OWT's JS SDK hands
    // `event.streams[0]` to the app) and a re-subscription would join the ended one's.
    let again = erin.conn.subscribe(&mut esig, &carol.stream_id, false, true, false).await.unwrap();
    let answer = erin.conn.pc.remote_description().await.unwrap().sdp;
    let msids: Vec<&str> = answer.lines().filter_map(|l| l.strip_prefix("a=msid:")).filter_map(|l| l.split(' ').next()).collect();
    assert_eq!(msids.len(), 3, "{answer}");
    assert!(msids.contains(&erin.id.as_str()) && msids.contains(&again.as_str()), "msid stream ids {msids:?}, subscriptions {} and {again}", erin.id);
    assert!(!msids.contains(&carol.stream_id.as_str()), "{msids:?}");

    let (alice, bob, carol, dave) = (Arc::new(alice), Arc::new(bob), Arc::new(carol), Arc::new(dave));
    let mut tasks = Vec::new();
    for p in [alice.clone(), bob.clone(), carol.clone(), dave.clone()] {
        tasks.push(tokio::spawn(async move { p.send_for(Duration::from_secs(3), 30, 700).await.unwrap() }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tags = |log: &Arc<std::sync::Mutex<Vec<tessera_client::peer::Received>>>, kind: &str| {
        let mut m = std::collections::HashMap::new();
        for r in log.lock().unwrap().iter().filter(|r| r.kind == kind) {
            if let Some(mk) = Marker::find(&r.payload) {
                *m.entry(mk.tag).or_insert(0usize) += 1;
            }
        }
        m
    };
    let a_video = tags(&alice.conn.received, "video");
    let a_audio = tags(&alice.conn.received, "audio");
    assert!(a_video.get(&2).copied().unwrap_or(0) > 50, "alice gets bob's video: {a_video:?}");
    assert!(a_video.get(&3).copied().unwrap_or(0) > 50, "alice gets carol's video: {a_video:?}");
    assert!(a_audio.get(&2).copied().unwrap_or(0) > 80, "alice gets bob's audio: {a_audio:?}");
    assert!(!a_video.contains_key(&1), "alice does not get her own stream back");
    let b_video = tags(&bob.conn.received, "video");
    assert!(b_video.get(&1).copied().unwrap_or(0) > 50, "bob gets alice's video: {b_video:?}");
    let e_video = tags(&erin.conn.received, "video");
    assert!(e_video.get(&3).copied().unwrap_or(0) > 50, "erin gets carol's VP8: {e_video:?}");
    assert!(e_video.get(&4).copied().unwrap_or(0) > 50, "erin gets dave's H.264 on the same transport: {e_video:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h264_is_forwarded_with_the_subscribers_payload_type() {
    let (_dir, s) = common::start_with_config(CONFIG);
    let room = s.new_room(json!({})).await;
    let (mut psig, _) = s.join(&room, "pub").await;
    let p = Arc::new(Publisher::start(&mut psig, PublishOptions { audio: false, video: true, data: false, tag: 9, h264: true }, None).await.unwrap());
    let add = psig.wait_for("stream add", Duration::from_secs(5), |n| n.event == "stream" && n.data["status"] == "add").await.unwrap();
    assert_eq!(add.data["data"]["media"]["tracks"][0]["format"], json!({"codec": "h264", "profile": "CB"}));
    let (mut ssig, _) = s.join(&room, "sub").await;
    let sub = Subscriber::start(&mut ssig, &p.stream_id, false, true, false).await.unwrap();
    let pp = p.clone();
    tokio::spawn(async move { pp.send_for(Duration::from_secs(2), 30, 500).await.unwrap() }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = assert_payloads_match(&p, &sub, "video");
    assert!(n > 40, "h264 packets: {n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_room_takes_only_the_codecs_of_its_media_in() {
    let (_dir, s) = common::start_with_config(CONFIG);
    let room = s.new_room(json!({"mediaIn": {"audio": [], "video": [{"codec": "h264", "profile": "CB"}]}})).await;
    // No audio codec accepted: publishing audio is refused as OWT refuses it.
    let (mut asig, _) = s.join(&room, "with-audio").await;
    let refused = Publisher::start(&mut asig, PublishOptions { audio: true, video: true, data: false, tag: 1, h264: true }, None).await;
    let err = format!("{:#}", refused.err().expect("audio must be refused"));
    assert!(err.contains("Audio is forbiden"), "{err}");
    // A publisher offering only VP8: its offer is refused, naming the m-line and the room's codecs.
    let (mut vsig, _) = s.join(&room, "vp8").await;
    let refused = Publisher::start(&mut vsig, PublishOptions { audio: false, video: true, data: false, tag: 2, h264: false }, None).await;
    let err = format!("{:#}", refused.err().expect("VP8 must be refused"));
    assert!(err.contains("the offer's m-line 0 has no video codec the room accepts (mediaIn: h264/CB)"), "{err}");
    // ...and its publication ends with that reason, as OWT's SDK learns it (a `progress`
    // error: the SDK does not read the `soac` answer); it is gone, its input free again.
    let failed = vsig
        .wait_for("the refused publication's error", Duration::from_secs(5), |n| n.event == "progress" && n.data["status"] == "error")
        .await
        .unwrap();
    let id = failed.data["sessionId"].as_str().unwrap().to_string();
    assert!(failed.data["data"].as_str().unwrap().contains("has no video codec the room accepts"), "{:?}", failed.data);
    let again = vsig.request("unpublish", Some(json!({"id": id}))).await.unwrap();
    assert_eq!(again, [json!("error"), json!(format!("Publication does NOT exist: {id}"))]);
    // H.264 constrained baseline goes through, to a subscriber, byte for byte.
    let (mut psig, _) = s.join(&room, "h264").await;
    let p = Arc::new(Publisher::start(&mut psig, PublishOptions { audio: false, video: true, data: false, tag: 3, h264: true }, None).await.unwrap());
    let (mut ssig, _) = s.join(&room, "sub").await;
    let sub = Subscriber::start(&mut ssig, &p.stream_id, false, true, false).await.unwrap();
    let pp = p.clone();
    tokio::spawn(async move { pp.send_for(Duration::from_secs(1), 30, 500).await.unwrap() }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = assert_payloads_match(&p, &sub, "video");
    assert!(n > 20, "h264 packets: {n}");
    // A subscriber whose offer has no H.264 is told so (Tessera does not transcode), rather
    // than left with a subscription that never plays; the room goes on.
    let (mut nsig, _) = s.join(&room, "no-h264").await;
    let conn = Connection::vp8_only("127.0.0.1").await.unwrap();
    let refused = Subscriber::start_on(&mut nsig, conn, &p.stream_id, false, true, false).await;
    let err = format!("{:#}", refused.err().expect("a subscriber without H.264 must be refused"));
    assert!(err.contains("video/H264"), "{err}");
    let before = sub.packets("video").len();
    let pp = p.clone();
    tokio::spawn(async move { pp.send_for(Duration::from_millis(500), 30, 500).await.unwrap() }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sub.packets("video").len() > before + 5, "the first subscriber still receives");
}

/// Parses Prometheus text format 0.0.4 strictly: every line a comment, `# HELP`, `# TYPE`
/// or a sample of a declared family with a float value. Returns sample → value.
fn parse_prometheus(text: &str) -> std::collections::HashMap<String, f64> {
    let name_ok = |n: &str| {
        let mut c = n.chars();
        c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':') && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    };
    let mut typed = std::collections::HashSet::new();
    let mut samples = std::collections::HashMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
            assert!(name_ok(name) && ["counter", "gauge", "summary", "histogram", "untyped"].contains(&kind), "{line:?}");
            assert!(typed.insert(name.to_string()), "family typed twice: {line:?}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            assert!(name_ok(rest.split(' ').next().unwrap()), "{line:?}");
            continue;
        }
        assert!(!line.starts_with('#') || line.starts_with("# "), "{line:?}");
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("sample without value {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "bad metric name in {line:?}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}')).unwrap_or_else(|| panic!("bad labels {line:?}"));
            for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                assert!(name_ok(k) && v.starts_with('"'), "bad label {pair:?} in {line:?}");
            }
        }
        let family = ["_sum", "_count", "_bucket"].iter().find_map(|s| name.strip_suffix(s)).filter(|f| typed.contains(*f)).unwrap_or(name);
        assert!(typed.contains(family), "sample of an undeclared family: {line:?}");
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("value not a float: {line:?}"));
        assert!(samples.insert(series.to_string(), v).is_none(), "sample twice: {line:?}");
    }
    samples
}

async fn scrape(s: &common::Server) -> std::collections::HashMap<String, f64> {
    let res = s.client().get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    parse_prometheus(&res.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_parse_and_move_with_publish_and_subscribe() {
    let (_dir, s) = common::start_with_config(CONFIG);
    let m0 = scrape(&s).await;
    let get = |m: &std::collections::HashMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    assert_eq!(get(&m0, "tessera_participants"), 0.0);
    assert!(get(&m0, "process_resident_memory_bytes") > 1e6, "{m0:?}");

    let room = s.new_room(json!({})).await;
    let (mut psig, _) = s.join(&room, "pub").await;
    let publisher = Arc::new(Publisher::start(&mut psig, common::av(3), None).await.unwrap());
    let sender = {
        let p = publisher.clone();
        tokio::spawn(async move { p.send_for(Duration::from_secs(6), 30, 1000).await.unwrap() })
    };
    let (mut ssig, _) = s.join(&room, "sub").await;
    let sub = Subscriber::start(&mut ssig, &publisher.stream_id, true, true, false).await.unwrap();
    let mixed = Subscriber::start(&mut ssig, &format!("{room}-common"), false, true, false).await.unwrap();
    sub.wait_until("video", Duration::from_secs(5), |r| r.iter().filter(|p| p.kind == "video").count() > 30).await.unwrap();
    mixed.wait_until("mixed video", Duration::from_secs(10), |r| r.iter().filter(|p| p.kind == "video").count() > 30).await.unwrap();
    // A forged token is refused, and counted as such.
    let mut forged = Signaling::connect(&s.portal).await.unwrap();
    let refused = forged.request("login", Some(json!({"token": "Zm9yZ2Vk", "protocol": "1.2"}))).await.unwrap();
    assert_eq!(refused[0], "error", "{refused:?}");
    // Receiver reports come about once a second.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let m1 = scrape(&s).await;
    assert_eq!(get(&m1, "tessera_rooms"), 1.0);
    assert_eq!(get(&m1, "tessera_participants"), 2.0);
    assert_eq!(get(&m1, "tessera_publications"), 1.0);
    assert_eq!(get(&m1, "tessera_subscriptions"), 2.0);
    assert_eq!(get(&m1, r#"tessera_logins_total{kind="login",result="ok"}"#), 2.0, "{m1:?}");
    assert_eq!(get(&m1, r#"tessera_logins_total{kind="login",result="invalid"}"#), 1.0, "{m1:?}");
    assert!(get(&m1, r#"tessera_transports{state="connected"}"#) >= 2.0, "{m1:?}");
    let received = get(&m1, "tessera_rtp_packets_received_total");
    let forwarded = (sub.packets("video").len() + sub.packets("audio").len()) as f64;
    assert!(received >= forwarded * 0.9 && received > 100.0, "rtp in {received}, forwarded to one subscriber {forwarded}");
    assert!(get(&m1, "tessera_packets_received_total") > received, "{m1:?}");
    assert!(get(&m1, "tessera_bytes_sent_total") > get(&m0, "tessera_bytes_sent_total") + 50_000.0, "{m1:?}");
    assert!(get(&m1, "tessera_client_fraction_lost_count") > 0.0, "subscribers' receiver reports: {m1:?}");
    let frames = format!(r#"tessera_mixer_frames_total{{room="{room}",view="common"}}"#);
    let f1 = get(&m1, &frames);
    assert!(f1 > 10.0, "{frames}: {m1:?}");
    let timed = format!(r#"tessera_mixer_encode_seconds_count{{room="{room}",view="common"}}"#);
    let encode = format!(r#"tessera_mixer_encode_seconds_sum{{room="{room}",view="common"}}"#);
    let mean_encode = get(&m1, &encode) / get(&m1, &timed);
    assert!(mean_encode > 0.0 && mean_encode < 0.5, "mean encode time {mean_encode} s");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m2 = scrape(&s).await;
    let fps = get(&m2, &frames) - f1;
    println!(
        "metrics: rtp in {received}, rtt samples {}, mean rtt {:.4} s, reports {}, nacks in {}, keyframe requests in {}, plis out {}, mix fps {fps}, mean encode {:.4} s",
        get(&m2, "tessera_client_rtt_seconds_count"),
        get(&m2, "tessera_client_rtt_seconds_sum") / get(&m2, "tessera_client_rtt_seconds_count").max(1.0),
        get(&m2, "tessera_client_fraction_lost_count"),
        get(&m2, "tessera_nacks_received_total"),
        get(&m2, "tessera_keyframe_requests_received_total"),
        get(&m2, "tessera_plis_sent_total"),
        mean_encode
    );
    assert!(fps > 5.0, "the mix encodes about 24 frames a second, counted {fps} in a second");
    assert!(get(&m2, "tessera_rtp_packets_received_total") > received);
    let _ = sender.await;
}

/// The candidates a relay-only connection gathers with these ICE servers.
async fn relay_candidates(ice: &Value) -> Vec<String> {
    let probe = tessera_client::peer::Connection::relay_only("127.0.0.1", ice).await.unwrap();
    probe.pc.create_data_channel("probe", None).await.unwrap();
    let offer = probe.make_offer().await.unwrap();
    probe.close().await;
    offer.lines().filter(|l| l.starts_with("a=candidate")).map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn turn_relays_publish_and_subscribe_and_refuses_bad_credentials() {
    let config = format!("{CONFIG}[turn]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\nrelay_port_min = 51000\nrelay_port_max = 51999\n");
    let (dir, s) = common::start_with_config(&config);
    assert!(s.startup.iter().any(|l| l.starts_with("tessera: TURN server listening on 127.0.0.1:")), "{:?}", s.startup);
    let room = s.new_room(json!({})).await;
    let (mut psig, pinfo) = s.join(&room, "pub").await;
    // Credentials of this participant, valid for a day (TURN REST API).
    let ice = &pinfo["iceServers"];
    let turn = &ice[0];
    assert!(turn["urls"][0].as_str().unwrap().starts_with("turn:127.0.0.1:"), "{ice}");
    let user = turn["username"].as_str().unwrap();
    let (expiry, participant) = user.split_once(':').unwrap();
    assert_eq!(participant, pinfo["id"].as_str().unwrap());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!((now + 86_000..=now + 86_500).contains(&expiry.parse::<u64>().unwrap()), "{user}");

    // Publisher and subscriber may only use relayed candidates: media crosses the TURN server.
    let candidates = relay_candidates(ice).await;
    assert!(!candidates.is_empty() && candidates.iter().all(|c| c.contains("typ relay")), "{candidates:?}");
    let conn = tessera_client::peer::Connection::relay_only("127.0.0.1", ice).await.unwrap();
    let publisher = Arc::new(Publisher::start(&mut psig, common::av(5), Some(conn)).await.unwrap());
    let sender = {
        let p = publisher.clone();
        tokio::spawn(async move { p.send_for(Duration::from_secs(5), 30, 1000).await.unwrap() })
    };
    let (mut ssig, sinfo) = s.join(&room, "sub").await;
    let conn = tessera_client::peer::Connection::relay_only("127.0.0.1", &sinfo["iceServers"]).await.unwrap();
    let sub = Subscriber::start_on(&mut ssig, conn, &publisher.stream_id, true, true, false).await.unwrap();
    sub.wait_until("video through TURN", Duration::from_secs(8), |r| r.iter().filter(|p| p.kind == "video").count() > 30).await.unwrap();
    let _ = sender.await;
    let (video, audio) = (assert_payloads_match(&publisher, &sub, "video"), assert_payloads_match(&publisher, &sub, "audio"));
    println!("through TURN: {video} video and {audio} audio packets, all intact");
    assert!(video > 30 && audio > 50, "{video} video, {audio} audio packets");

    // A wrong credential, an expired one, and a user name of no participant scheme get no relay.
    let mut wrong = ice.clone();
    wrong[0]["credential"] = json!("d3JvbmcgY3JlZGVudGlhbA==");
    assert!(relay_candidates(&wrong).await.is_empty(), "a wrong credential got a relay");
    let secret = std::fs::read_to_string(dir.path().join("data/turn.secret")).unwrap();
    let (user, credential) = tessera_core::crypto::turn_credentials(secret.trim().as_bytes(), participant, now - 10);
    let mut expired = ice.clone();
    expired[0]["username"] = json!(user);
    expired[0]["credential"] = json!(credential);
    assert!(relay_candidates(&expired).await.is_empty(), "expired credentials got a relay");
    let mut schemeless = ice.clone();
    schemeless[0]["username"] = json!("alice");
    assert!(relay_candidates(&schemeless).await.is_empty(), "a user name without expiry got a relay");
}

/// Video packets a subscriber got so far.
fn video_count(sub: &Subscriber) -> usize {
    sub.packets("video").len()
}

/// Checks that `sub`'s video stops (audio going on) or flows again, over ~1 s.
async fn expect_video(sub: &Subscriber, flowing: bool, what: &str) {
    if flowing {
        let before = video_count(sub);
        sub.wait_until(what, Duration::from_secs(3), |r| r.iter().filter(|p| p.kind == "video").count() > before + 10).await.unwrap();
        return;
    }
    // What was in flight when the pause landed may still arrive.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (v0, a0) = (video_count(sub), sub.packets("audio").len());
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (v1, a1) = (video_count(sub), sub.packets("audio").len());
    assert_eq!(v0, v1, "{what}: video still flows");
    assert!(a1 > a0 + 15, "{what}: audio stopped too ({a0} -> {a1})");
}

/// OWT's REST controls on live media: a stream's video muted and unmuted from the server
/// (`/v1.1` StreamUpdate), a subscriber's and a publisher's video permission revoked and
/// granted again (ParticipantUpdate): a real subscriber loses and regains video each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_mutes_streams_and_permissions_take_effect_on_live_media() {
    let (_dir, s) = common::start_with_config(CONFIG);
    let all = json!({"audio": true, "video": true});
    let room = s
        .new_room(json!({"roles": [
            {"role": "presenter", "publish": all, "subscribe": all},
            {"role": "admin", "publish": all, "subscribe": all}
        ]}))
        .await;
    let (mut psig, pinfo) = s.join(&room, "pub").await;
    let publisher = Arc::new(Publisher::start(&mut psig, common::av(9), None).await.unwrap());
    let sender = {
        let p = publisher.clone();
        tokio::spawn(async move { p.send_for(Duration::from_secs(14), 30, 1000).await.unwrap() })
    };
    let (mut ssig, sinfo) = s.join(&room, "sub").await;
    let sub = Subscriber::start(&mut ssig, &publisher.stream_id, true, true, false).await.unwrap();
    expect_video(&sub, true, "video at first").await;
    let c = s.client();
    let stream_url = s.url(&format!("/v1.1/rooms/{room}/streams/{}", publisher.stream_id));
    let patch = |url: String, ops: Value| c.patch(url).bearer_auth(common::KEY).json(&ops).send();

    // Server-side mute over /v1.1: everyone told, video stops, the stream says inactive.
    let res = patch(stream_url.clone(), json!([{"op": "replace", "path": "/media/video/status", "value": "inactive"}])).await.unwrap();
    assert_eq!(res.status(), 200);
    let updated: Value = res.json().await.unwrap();
    assert_eq!(updated["media"]["video"]["status"], "inactive", "{updated}");
    assert_eq!(updated["media"]["video"]["original"][0]["format"]["codec"], "vp8", "{updated}");
    let upd = ssig.wait_for("mute update", Duration::from_secs(3), |n| n.event == "stream" && n.data["status"] == "update").await.unwrap();
    assert_eq!(upd.data["data"], json!({"field": "video.status", "value": "inactive"}));
    expect_video(&sub, false, "muted over REST").await;
    let res = patch(stream_url.clone(), json!([{"op": "replace", "path": "/media/video/status", "value": "active"}])).await.unwrap();
    assert_eq!(res.status(), 200);
    expect_video(&sub, true, "unmuted over REST").await;
    let res = patch(stream_url.clone(), json!([{"op": "replace", "path": "/media/video/status", "value": "paused"}])).await.unwrap();
    assert_eq!(res.status(), 400);

    // The subscriber may no longer receive video: it stops; asking for it again is refused.
    let sub_url = s.url(&format!("/v1/rooms/{room}/participants/{}", sinfo["id"].as_str().unwrap()));
    let res = patch(sub_url.clone(), json!([{"op": "replace", "path": "/permission/subscribe/video", "value": false}])).await.unwrap();
    assert_eq!(res.status(), 200);
    expect_video(&sub, false, "subscribe.video revoked").await;
    let play = ssig.request("subscription-control", Some(json!({"id": sub.id, "operation": "play", "data": "video"}))).await.unwrap();
    assert_eq!(play, vec![json!("error"), json!("unauthorized")]);
    let res =
        patch(sub_url.clone(), json!([{"op": "replace", "path": "/permission/subscribe", "value": {"audio": true, "video": true}}])).await.unwrap();
    assert_eq!(res.status(), 200);
    expect_video(&sub, true, "subscribe.video granted again").await;
    // A pause of the subscriber's own stays when a revoked right comes back.
    ssig.ok("subscription-control", Some(json!({"id": sub.id, "operation": "pause", "data": "video"}))).await.unwrap();
    for value in [false, true] {
        let res = patch(sub_url.clone(), json!([{"op": "replace", "path": "/permission/subscribe/video", "value": value}])).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    expect_video(&sub, false, "paused by the subscriber, through a revocation and a grant").await;
    ssig.ok("subscription-control", Some(json!({"id": sub.id, "operation": "play", "data": "video"}))).await.unwrap();
    expect_video(&sub, true, "played by the subscriber").await;

    // The publisher may no longer publish video: its video pauses for everyone, and returns.
    let pub_url = s.url(&format!("/v1/rooms/{room}/participants/{}", pinfo["id"].as_str().unwrap()));
    let res = patch(pub_url.clone(), json!([{"op": "replace", "path": "/permission/publish/video", "value": false}])).await.unwrap();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["permission"]["publish"], json!({"audio": true, "video": false}), "{body}");
    expect_video(&sub, false, "publish.video revoked").await;
    let play = psig.request("stream-control", Some(json!({"id": publisher.stream_id, "operation": "play", "data": "video"}))).await.unwrap();
    assert_eq!(play, vec![json!("error"), json!("unauthorized")]);
    let res = patch(pub_url, json!([{"op": "replace", "path": "/permission/publish/video", "value": true}])).await.unwrap();
    assert_eq!(res.status(), 200);
    expect_video(&sub, true, "publish.video granted again").await;
    let listed: Value = c
        .get(s.url(&format!("/v1/rooms/{room}/streams/{}", publisher.stream_id)))
        .bearer_auth(common::KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["media"]["video"]["status"], "active", "{listed}");

    // An admin pauses and plays another participant's stream (OWT lets admins do so).
    let token = s.token(&room, "boss", "admin").await;
    let mut asig = Signaling::connect(&s.portal).await.unwrap();
    asig.ok("login", Some(json!({"token": token, "protocol": "1.2"}))).await.unwrap();
    asig.ok("stream-control", Some(json!({"id": publisher.stream_id, "operation": "pause", "data": "video"}))).await.unwrap();
    expect_video(&sub, false, "paused by an admin").await;
    asig.ok("stream-control", Some(json!({"id": publisher.stream_id, "operation": "play", "data": "video"}))).await.unwrap();
    expect_video(&sub, true, "played by an admin").await;
    sender.abort();
}

/// A TURN client's leg over TLS, as webrtc-rs's TURN client wants it (a datagram `Conn`):
/// messages framed as RFC 5766 §11.5 says for streams.
struct TlsTurnClient {
    read: tokio::sync::Mutex<tokio::io::ReadHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>,
    write: tokio::sync::Mutex<tokio::io::WriteHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>,
    server: std::net::SocketAddr,
    local: std::net::SocketAddr,
}

#[async_trait::async_trait]
impl webrtc_util::Conn for TlsTurnClient {
    async fn connect(&self, _: std::net::SocketAddr) -> webrtc_util::Result<()> {
        Ok(())
    }
    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.recv_from(buf).await?.0)
    }
    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, std::net::SocketAddr)> {
        use tokio::io::AsyncReadExt;
        let mut read = self.read.lock().await;
        let mut head = [0u8; 4];
        read.read_exact(&mut head).await?;
        let length = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let rest = if head[0] >> 6 == 0 { 16 + length } else { length.div_ceil(4) * 4 };
        let mut body = vec![0; rest];
        read.read_exact(&mut body).await?;
        let n = if head[0] >> 6 == 0 { 4 + rest } else { 4 + length };
        buf[..4].copy_from_slice(&head);
        buf[4..n].copy_from_slice(&body[..n - 4]);
        Ok((n, self.server))
    }
    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        self.send_to(buf, self.server).await
    }
    async fn send_to(&self, buf: &[u8], _: std::net::SocketAddr) -> webrtc_util::Result<usize> {
        use tokio::io::AsyncWriteExt;
        let mut message = buf.to_vec();
        if buf[0] >> 6 == 1 {
            message.resize(buf.len().div_ceil(4) * 4, 0);
        }
        self.write.lock().await.write_all(&message).await?;
        Ok(buf.len())
    }
    fn local_addr(&self) -> webrtc_util::Result<std::net::SocketAddr> {
        Ok(self.local)
    }
    fn remote_addr(&self) -> Option<std::net::SocketAddr> {
        Some(self.server)
    }
    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// Allocates a relay on the TURN server behind `conn`; the error is the server's refusal.
async fn allocate(
    conn: Arc<dyn webrtc_util::Conn + Send + Sync>,
    server: std::net::SocketAddr,
    user: &str,
    password: &str,
) -> anyhow::Result<(turn::client::Client, impl webrtc_util::Conn)> {
    let client = turn::client::Client::new(turn::client::ClientConfig {
        stun_serv_addr: String::new(),
        turn_serv_addr: server.to_string(),
        username: user.into(),
        password: password.into(),
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn,
        vnet: None,
    })
    .await?;
    client.listen().await?;
    let relay = tokio::time::timeout(Duration::from_secs(5), client.allocate()).await??;
    Ok((client, relay))
}

/// TURN over TLS and UDP at the protocol level: allocations with the participant's
/// credentials succeed on both legs (and fail with a wrong one), relayed datagrams reach
/// the SFU (its packet counter moves), and nothing is relayed to any other address.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn turn_over_tls_and_udp_relays_to_the_media_only() {
    use webrtc_util::Conn;
    let config = format!(
        "{CONFIG}[turn]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\ntls_addr = \"127.0.0.1:0\"\nrelay_port_min = 52000\nrelay_port_max = 52999\n"
    );
    let (dir, s) = common::start_with_config_args(&config, &["--dev-tls"]);
    let line = s.startup.iter().find(|l| l.starts_with("tessera: TURN server listening on")).cloned().unwrap_or_default();
    let addr = |after: &str| -> std::net::SocketAddr { line.split(after).nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse().unwrap() };
    let (udp_at, tls_at) = (addr("listening on "), addr(" and "));
    assert!(line.contains(&format!("turns:127.0.0.1:{}?transport=tcp", tls_at.port())), "{line}");
    let secret = std::fs::read_to_string(dir.path().join("data/turn.secret")).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (user, password) = tessera_core::crypto::turn_credentials(secret.trim().as_bytes(), "p1", now + 600);

    // The SFU's worker sockets, from its start-up log (escape codes removed).
    let log = s.stderr.lock().unwrap().clone();
    let plain: String = log.split('\u{1b}').map(|p| p.split_once('m').map_or(p, |(_, rest)| rest)).collect();
    let media: std::net::SocketAddr = plain.split("addrs=[").nth(1).and_then(|r| r.split([',', ']']).next()).unwrap().trim().parse().unwrap();

    // A TLS client trusting the server's dev certificate.
    let cert_at = dir.path().join("data/dev-tls/cert.pem");
    let tls = common::tls_trusting(&cert_at);
    let tls_conn = || async {
        let tcp = tokio::net::TcpStream::connect(tls_at).await.unwrap();
        let local = tcp.local_addr().unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls.clone())).connect(name, tcp).await.unwrap();
        let (read, write) = tokio::io::split(stream);
        Arc::new(TlsTurnClient { read: read.into(), write: write.into(), server: tls_at, local }) as Arc<dyn webrtc_util::Conn + Send + Sync>
    };

    common::http();
    let api = reqwest::Client::builder()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&std::fs::read(&cert_at).unwrap()).unwrap())
        .build()
        .unwrap();
    let received = || async {
        let text = api.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
        let line = text.lines().find(|l| l.starts_with("tessera_packets_received_total ")).unwrap().to_string();
        line.rsplit(' ').next().unwrap().parse::<f64>().unwrap()
    };

    let spy = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for (leg, conn, server) in [
        ("TLS", tls_conn().await, tls_at),
        ("UDP", Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap()) as Arc<dyn webrtc_util::Conn + Send + Sync>, udp_at),
    ] {
        let (client, relay) = allocate(conn, server, &user, &password).await.unwrap_or_else(|e| panic!("{leg}: {e}"));
        let relayed = relay.local_addr().unwrap();
        assert!(relayed.ip().is_loopback() && (52000..=52999).contains(&relayed.port()), "{leg}: {relayed}");
        let before = received().await;
        for _ in 0..10 {
            relay.send_to(b"relayed through TURN", media).await.unwrap();
            relay.send_to(b"not for you", spy.local_addr().unwrap()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = received().await;
        assert!(after >= before + 10.0, "{leg}: the SFU got {} of 10 relayed datagrams", after - before);
        let mut buf = [0u8; 64];
        let spied = tokio::time::timeout(Duration::from_millis(300), spy.recv_from(&mut buf)).await;
        assert!(spied.is_err(), "{leg}: a datagram was relayed to an address that is not the server's media");
        client.close().await.unwrap();
    }
    // A wrong password gets no relay, on either leg.
    let wrong = allocate(tls_conn().await, tls_at, &user, "d3JvbmcgcGFzc3dvcmQ=").await;
    assert!(wrong.is_err(), "a wrong credential got a relay over TLS");
    let udp = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    assert!(allocate(udp, udp_at, &user, "d3JvbmcgcGFzc3dvcmQ=").await.is_err(), "a wrong credential got a relay over UDP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simulcast_layers_are_chosen_and_switched_on_keyframes() {
    use tessera_client::simulcast::{SimulcastPublisher, THREE_LAYERS};
    const Q: (usize, usize, &str) = (160, 120, "blue");
    const H: (usize, usize, &str) = (320, 240, "green");
    const F: (usize, usize, &str) = (640, 480, "red");
    let (_dir, s) = common::start_with_config(CONFIG);
    let room = s.new_room(json!({})).await;
    let (mut psig, _) = s.join(&room, "pub").await;
    let p = SimulcastPublisher::start(&mut psig, &THREE_LAYERS).await.unwrap();
    // The answer receives the three layers, with RTX and the repaired RID that names each
    // layer's RTX flow (restored by the server: webrtc-agent/src/rtx_in.rs).
    assert!(p.answer.contains("a=simulcast:recv q;h;f"), "{}", p.answer);
    assert!(p.answer.contains(" rtx/90000") && p.answer.contains("sdes:repaired-rtp-stream-id"), "{}", p.answer);
    // The stream lists one video track per layer, each with its RID and its own id.
    let add = psig.wait_for("stream add", Duration::from_secs(5), |n| n.event == "stream" && n.data["status"] == "add").await.unwrap();
    let tracks = add.data["data"]["media"]["tracks"].as_array().unwrap().clone();
    let rids: Vec<&str> = tracks.iter().map(|t| t["rid"].as_str().unwrap()).collect();
    assert_eq!(rids, ["q", "h", "f"]);
    for t in &tracks {
        assert_eq!((t["type"].as_str(), t["format"]["codec"].as_str()), (Some("video"), Some("vp8")));
        assert_eq!(t["id"], format!("{}-video-{}", p.stream_id, t["rid"].as_str().unwrap()));
    }
    let layer = |rid: &str| format!("{}-video-{rid}", p.stream_id);
    // Let the server see a keyframe of every layer (their sizes rank them); the stream's
    // description then carries them (REST in OWT's v1.1 shape, and a `stream update` of
    // the whole stream to everyone).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, v11) = s.api(reqwest::Method::GET, &format!("/v1.1/rooms/{room}/streams/{}", p.stream_id), None).await;
    let sizes: Vec<(&str, u64, u64)> = v11["media"]["video"]["original"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["simulcastRid"].as_str().unwrap_or("?"),
                o["parameters"]["resolution"]["width"].as_u64().unwrap_or(0),
                o["parameters"]["resolution"]["height"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(sizes, [("q", 160, 120), ("h", 320, 240), ("f", 640, 480)], "{v11}");
    psig.wait_for("stream update with f's size", Duration::from_secs(2), |n| {
        n.event == "stream"
            && n.data["data"]["field"] == "."
            && n.data["data"]["value"]["media"]["tracks"][2]["parameters"]["resolution"]["width"] == 640
    })
    .await
    .unwrap();

    // By a layer's track id (OWT's `from` for a RID), by resolution, and the server's pick.
    let (mut ssig, _) = s.join(&room, "sub").await;
    let q = Subscriber::start_video(&mut ssig, &layer("q"), Value::Null).await.unwrap();
    let h = Subscriber::start_video(&mut ssig, &p.stream_id, json!({"parameters": {"resolution": {"width": 300, "height": 200}}})).await.unwrap();
    let auto = Subscriber::start_video(&mut ssig, &p.stream_id, Value::Null).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(runs(&check_layered_video(&q, 0)), [Q]);
    assert_eq!(runs(&check_layered_video(&h, 0)), [H]);
    assert_eq!(runs(&check_layered_video(&auto, 0)), [F]);

    // Bad requests get precise errors and change nothing.
    let r = ssig.request("subscribe", Some(json!({"media": {"tracks": [{"type": "video", "mid": "0", "from": layer("zz")}]}}))).await.unwrap();
    assert_eq!(r, vec![json!("error"), json!(format!("Stream does NOT exist: {}", layer("zz")))]);
    let update = |id: &str, video: Value| json!({"id": id, "operation": "update", "data": {"video": video}});
    let r = ssig.request("subscription-control", Some(update(&q.id, json!({"from": format!("{room}-common")})))).await.unwrap();
    assert_eq!(r[0], "error");
    assert!(r[1].as_str().unwrap().contains("cannot change the source stream"), "{r:?}");
    let r = ssig.request("subscription-control", Some(update(&q.id, json!({"parameters": {"resolution": {"width": "big"}}})))).await.unwrap();
    assert_eq!(r[0], "error", "{r:?}");
    // A re-offer that renames a flowing publication's layer is refused (its subscribers
    // are on those layers), and the layers flow on as before.
    let renamed = p.offer.replace("a=rid:f send", "a=rid:x send").replace("a=simulcast:send q;h;f", "a=simulcast:send q;h;x");
    assert!(renamed.contains("a=rid:x send") && renamed.contains("a=simulcast:send q;h;x"), "{}", p.offer);
    let transport = p.conn.transport.clone().unwrap();
    let r = psig.request("soac", Some(json!({"id": transport, "signaling": {"type": "offer", "sdp": renamed}}))).await.unwrap();
    assert_eq!(r[0], "error", "{r:?}");
    let refusal = r[1].as_str().unwrap_or_default();
    assert!(refusal.contains("cannot change") && refusal.contains("RIDs [q,h,f], offered [q,h,x]"), "{r:?}");
    let r = ssig.request("subscription-control", Some(update(&q.id, json!({"parameters": {"bitrate": "fast"}})))).await.unwrap();
    assert!(r[0] == "error" && r[1].as_str().unwrap_or_default().contains("parameters.bitrate must be a multiplier"), "{r:?}");
    // By bit rate, OWT's multiplier of the top layer's: the least share is the lowest layer.
    let by_rate = Subscriber::start_video(&mut ssig, &p.stream_id, json!({"parameters": {"bitrate": "x0.001"}})).await.unwrap();
    let (q_before, auto_before) = (q.packets("video").len(), auto.packets("video").len());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(q.packets("video").len() > q_before + 5 && auto.packets("video").len() > auto_before + 5, "video stopped after the refused re-offer");
    assert_eq!(runs(&check_layered_video(&q, 0)), [Q], "q after the refused re-offer");
    assert_eq!(runs(&check_layered_video(&auto, 0)), [F], "auto after the refused re-offer");

    // q moves up to f, h down to q by resolution: each at a keyframe of its new layer.
    ssig.ok("subscription-control", Some(update(&q.id, json!({"from": layer("f")})))).await.unwrap();
    ssig.ok("subscription-control", Some(update(&h.id, json!({"parameters": {"resolution": {"width": 160, "height": 120}}})))).await.unwrap();
    let up = wait_for_picture(&q, F, Duration::from_secs(3)).await;
    let down = wait_for_picture(&h, Q, Duration::from_secs(3)).await;
    println!("switched up in {up:?}, down in {down:?}");
    assert_eq!(runs(&check_layered_video(&q, 1)), [Q, F]);
    assert_eq!(runs(&check_layered_video(&h, 1)), [H, Q]);
    ssig.ok("subscription-control", Some(update(&by_rate.id, json!({"parameters": {"bitrate": "x1.0"}})))).await.unwrap();
    wait_for_picture(&by_rate, F, Duration::from_secs(3)).await;
    assert_eq!(runs(&check_layered_video(&by_rate, 1)), [Q, F], "by bit rate: x0.001, then x1.0");

    // The top layer stops (as a browser's does when its uplink shrinks): its subscribers
    // move to the next layer down, and back up when it returns.
    p.stop_layer("f", true);
    let moved = wait_for_picture(&auto, H, Duration::from_secs(4)).await;
    wait_for_picture(&q, H, Duration::from_secs(2)).await;
    // A recording started now starts on h, and moves to f with everyone when it returns.
    let recordings = format!("/v1/rooms/{room}/recordings");
    let (_, rec) = s.api(reqwest::Method::POST, &recordings, Some(json!({"media": {"video": {"from": p.stream_id}}}))).await;
    let (rec_id, rec_file) = (rec["id"].as_str().unwrap().to_string(), rec["storage"]["file"].as_str().unwrap().to_string());
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.stop_layer("f", false);
    // (`auto` goes up carefully: after 3 s without congestion.)
    let back = wait_for_picture(&auto, F, Duration::from_secs(7)).await;
    wait_for_picture(&q, F, Duration::from_secs(2)).await;
    println!("moved off the stopped layer in {moved:?}, back in {back:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.api(reqwest::Method::DELETE, &format!("{recordings}/{rec_id}"), None).await.0, 200);
    let sizes = common::files::decode_file(std::path::Path::new(&rec_file), false).sizes();
    assert!(sizes.len() > 40, "{} frames recorded", sizes.len());
    assert_eq!(runs(&sizes), [(320, 240), (640, 480)], "the recording's picture sizes, in order");
    assert_eq!(runs(&check_layered_video(&auto, 2)), [F, H, F]);
    assert_eq!(runs(&check_layered_video(&q, 3)), [Q, F, H, F]);
    assert_eq!(runs(&check_layered_video(&h, 1)), [H, Q], "a subscriber of another layer is not disturbed");

    // h grows to 480×360 mid-stream: the stream's description says so, and a subscriber
    // that moves to h gets the new pictures, every frame decodable.
    p.resize("h", 480, 360).unwrap();
    psig.wait_for("stream update with h's new size", Duration::from_secs(4), |n| {
        n.event == "stream"
            && n.data["data"]["field"] == "."
            && n.data["data"]["value"]["media"]["tracks"][1]["parameters"]["resolution"]["width"] == 480
    })
    .await
    .unwrap();
    let (_, v11) = s.api(reqwest::Method::GET, &format!("/v1.1/rooms/{room}/streams/{}", p.stream_id), None).await;
    let h_size = &v11["media"]["video"]["original"][1]["parameters"]["resolution"];
    assert_eq!((h_size["width"].as_u64(), h_size["height"].as_u64()), (Some(480), Some(360)), "{v11}");
    ssig.ok("subscription-control", Some(update(&h.id, json!({"from": layer("h")})))).await.unwrap();
    wait_for_picture(&h, (480, 360, "green"), Duration::from_secs(3)).await;
    assert_eq!(runs(&check_layered_video(&h, 2)), [H, Q, (480, 360, "green")]);
}

/// The width of the newest VP8 keyframe among `packets` from index `from` on (a layered
/// subscriber changes layer only at a keyframe, so this is the layer it reads), with its index.
fn newest_keyframe_width(packets: &[tessera_client::peer::Received], from: usize) -> Option<(usize, u16)> {
    packets.iter().enumerate().skip(from).rev().find_map(|(i, p)| tessera_webrtc_agent::simulcast::vp8_keyframe_size(&p.payload).map(|(w, _)| (i, w)))
}

/// Frames received from index `from` on, per picture width (the width of the keyframe that
/// began each layer's run).
fn frames_by_width(packets: &[tessera_client::peer::Received], from: usize) -> std::collections::BTreeMap<u16, usize> {
    let mut width = newest_keyframe_width(packets.get(..from).unwrap_or_default(), 0).map_or(0, |(_, w)| w);
    let mut out = std::collections::BTreeMap::new();
    for p in packets.iter().skip(from) {
        if let Some((w, _)) = tessera_webrtc_agent::simulcast::vp8_keyframe_size(&p.payload) {
            width = w;
        }
        if p.header.marker {
            *out.entry(width).or_insert(0) += 1;
        }
    }
    out
}

/// H.264 simulcast, as Chromium and Safari send it: the layers are ranked by the sizes in
/// their sequence parameter sets (cropping applied: x264 codes 160×120 as 160×128 and
/// crops), each decodes at its size and colour, and a subscriber moves between layers at
/// IDRs with continuous sequence numbers and timestamps, every frame decodable; a layer
/// that stops moves its subscribers down to the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h264_simulcast_layers_are_ranked_by_their_sps_and_switched_at_idrs() {
    use tessera_client::simulcast::{SimulcastPublisher, THREE_LAYERS};
    const Q: (usize, usize, &str) = (160, 120, "blue");
    const H: (usize, usize, &str) = (320, 240, "green");
    const F: (usize, usize, &str) = (640, 480, "red");
    let h264 = tessera_client::media::decode_h264;
    let (_dir, s) = common::start_with_config(CONFIG);
    let room = s.new_room(json!({})).await;
    let (mut psig, _) = s.join(&room, "pub").await;
    let p = SimulcastPublisher::start_h264(&mut psig, &THREE_LAYERS).await.unwrap();
    assert!(p.answer.contains("a=simulcast:recv q;h;f") && p.answer.contains("H264"), "{}", p.answer);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, v11) = s.api(reqwest::Method::GET, &format!("/v1.1/rooms/{room}/streams/{}", p.stream_id), None).await;
    let layers: Vec<(&str, &str, u64, u64)> = v11["media"]["video"]["original"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["simulcastRid"].as_str().unwrap_or("?"),
                o["format"]["codec"].as_str().unwrap_or("?"),
                o["parameters"]["resolution"]["width"].as_u64().unwrap_or(0),
                o["parameters"]["resolution"]["height"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(layers, [("q", "h264", 160, 120), ("h", "h264", 320, 240), ("f", "h264", 640, 480)], "{v11}");

    let layer = |rid: &str| format!("{}-video-{rid}", p.stream_id);
    let (mut ssig, _) = s.join(&room, "sub").await;
    let q = Subscriber::start_video(&mut ssig, &layer("q"), Value::Null).await.unwrap();
    let auto = Subscriber::start_video(&mut ssig, &p.stream_id, Value::Null).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(runs(&check_layered_h264(&q, 0)), [Q]);
    assert_eq!(runs(&check_layered_h264(&auto, 0)), [F]);

    let update = |id: &str, video: Value| json!({"id": id, "operation": "update", "data": {"video": video}});
    ssig.ok("subscription-control", Some(update(&q.id, json!({"from": layer("f")})))).await.unwrap();
    let up = wait_for_picture_in(&q, F, Duration::from_secs(3), h264).await;
    p.stop_layer("f", true);
    let moved = wait_for_picture_in(&auto, H, Duration::from_secs(4), h264).await;
    wait_for_picture_in(&q, H, Duration::from_secs(2), h264).await;
    println!("h264: q up to f in {up:?}; off the stopped f in {moved:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runs(&check_layered_h264(&q, 2)), [Q, F, H]);
    assert_eq!(runs(&check_layered_h264(&auto, 1)), [F, H]);
}

/// Waits until the subscriber's newest keyframe is `width` wide; returns how long it took.
async fn wait_for_layer(sub: &Subscriber, width: u16, within: Duration, what: &str) -> Duration {
    let start = Instant::now();
    loop {
        let packets = sub.packets("video");
        if newest_keyframe_width(&packets, 0).is_some_and(|(_, w)| w == width) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{what}: not on the {width}-wide layer within {within:?} (newest keyframe {:?})",
            newest_keyframe_width(&packets, 0)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `auto` follows the subscriber's bandwidth estimate (GCC on its TWCC feedback): the
/// server in a namespace of its own, what it sends to the subscriber limited (`tc` htb;
/// this kernel has no netem), then freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simulcast_auto_follows_the_subscribers_bandwidth() {
    use common::bridge::{Bridge, HOST};
    use tessera_client::simulcast::{SimulcastPublisher, THREE_NOISY_LAYERS};
    if !common::in_own_netns("simulcast_auto_follows_the_subscribers_bandwidth") {
        return;
    }
    let mut bridge = Bridge::new();
    bridge.add(1);
    tessera_client::peer::set_default_ice_ip(HOST);
    let dir = common::tempdir();
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, format!("[webrtc]\nbind_ip = \"{}\"\n", Bridge::ip(1))).unwrap();
    let s = common::start_in(
        &bridge.enter(1),
        &Bridge::ip(1),
        &dir.path().join("data"),
        &["--config", cfg.to_str().unwrap()],
        &[("TESSERA_SERVICE_KEY", common::KEY)],
    );
    let room = s.new_room(json!({"views": []})).await;
    let (mut psig, _) = s.join(&room, "pub").await;
    let p = SimulcastPublisher::start(&mut psig, &THREE_NOISY_LAYERS).await.unwrap();
    // The layers' bitrates are measured (80, 250, 700 kbit/s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The subscriber on an address of its own, so its link alone can be limited.
    const SUBSCRIBER: &str = "127.0.2.253";
    let add = std::process::Command::new("ip").args(["addr", "add", &format!("{SUBSCRIBER}/32"), "dev", "br0"]).status().unwrap();
    assert!(add.success());
    let (mut ssig, _) = s.join(&room, "sub").await;
    let conn = tessera_client::peer::Connection::new_on(SUBSCRIBER).await.unwrap();
    let sub = Subscriber::start_video_on(&mut ssig, conn, &p.stream_id, Value::Null).await.unwrap();
    let first = wait_for_layer(&sub, 640, Duration::from_secs(5), "free link").await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // What the server sends to the subscriber limited to 450 kbit/s, behind a queue of 20
    // packets (the publisher's way and its keyframe requests stay free): the top layer no
    // longer fits.
    let node = bridge.enter(1);
    let tc = |args: &str| {
        let out = std::process::Command::new(&node[0]).args(&node[1..]).args(["sh", "-c", &format!("tc {args}")]).output().unwrap();
        assert!(out.status.success(), "tc {args}: {}", String::from_utf8_lossy(&out.stderr));
    };
    tc("qdisc add dev eth0 root handle 1: htb default 10");
    tc("class add dev eth0 parent 1: classid 1:10 htb rate 1gbit");
    tc("class add dev eth0 parent 1: classid 1:20 htb rate 450kbit ceil 450kbit");
    tc("qdisc add dev eth0 parent 1:20 handle 20: pfifo limit 20");
    tc(&format!("filter add dev eth0 parent 1: protocol ip u32 match ip dst {SUBSCRIBER}/32 flowid 1:20"));
    let down = wait_for_layer(&sub, 320, Duration::from_secs(6), "limited link").await;
    // While the limit holds it stays below the top layer (but for a short try up now and then).
    let held_from = sub.packets("video").len();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let held = frames_by_width(&sub.packets("video"), held_from);
    tc("qdisc del dev eth0 root");
    let freed_at = sub.packets("video").len();
    let up = wait_for_layer(&sub, 640, Duration::from_secs(20), "freed link").await;
    println!(
        "auto: on f {first:?} after subscribing; down to h {down:?} after the limit; frames by width while it held {held:?}; back on f {up:?} after it was lifted"
    );
    let below: usize = held.iter().filter(|(w, _)| **w < 640).map(|(_, n)| n).sum();
    assert!(below * 10 >= held.values().sum::<usize>() * 7, "below the top layer for less than 70 % of the frames while limited: {held:?}");
    // The issue's bound (1.85–2.2 s measured here: the estimator's one-second loss window,
    // then the next keyframe of h).
    assert!(down <= Duration::from_secs(3), "down after {down:?}");
    assert!(up <= Duration::from_secs(15), "up after {up:?}");

    // Once back on f, every frame decodes (from a keyframe sent after the link was freed:
    // the move up may have been a trial that met the limit); and in sequence order
    // (retransmissions of what was lost arrive late) timestamps and picture ids never go
    // back, across every switch.
    let lifted_us = tessera_client::peer::now_us();
    let clean_start = loop {
        let packets = sub.packets("video");
        let found = packets.iter().enumerate().skip(freed_at).find_map(|(i, p)| {
            (p.arrived_us > lifted_us + 300_000 && tessera_webrtc_agent::simulcast::vp8_keyframe_size(&p.payload).map(|(w, _)| w) == Some(640))
                .then_some(i)
        });
        if let Some(i) = found {
            break i;
        }
        assert!(tessera_client::peer::now_us() < lifted_us + 8_000_000, "no keyframe of f after the link was freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let packets = sub.packets("video");
    let tail = &packets[clean_start..];
    let sent = tail.iter().filter(|p| p.header.marker).count();
    let decoded = tessera_client::media::decode_vp8(tail).unwrap();
    assert!(sent >= 30 && decoded.len() + 2 >= sent && decoded.iter().all(|f| f.width == 640), "{} of {sent} frames decoded", decoded.len());
    let mut in_order: Vec<(i64, &tessera_client::peer::Received)> = Vec::new();
    let mut highest: Option<i64> = None;
    for p in &packets {
        let s = i64::from(p.header.sequence_number);
        let seq = match highest {
            None => s,
            Some(h) => [h - (h & 0xffff) - 0x10000 + s, h - (h & 0xffff) + s, h - (h & 0xffff) + 0x10000 + s]
                .into_iter()
                .min_by_key(|c| (c - h).abs())
                .unwrap_or(s),
        };
        highest = Some(highest.map_or(seq, |h| h.max(seq)));
        in_order.push((seq, p));
    }
    in_order.sort_by_key(|(seq, _)| *seq);
    in_order.dedup_by_key(|(seq, _)| *seq);
    for w in in_order.windows(2) {
        let (a, b) = (w[0].1, w[1].1);
        assert!(b.header.timestamp.wrapping_sub(a.header.timestamp) < 0x8000_0000, "timestamp went back at {}", w[1].0);
        let (pa, pb) = (tessera_webrtc_agent::simulcast::vp8_picture_id(&a.payload), tessera_webrtc_agent::simulcast::vp8_picture_id(&b.payload));
        if let (Some(pa), Some(pb)) = (pa, pb) {
            assert!(pb.wrapping_sub(pa) & 0x7fff < 0x4000, "picture id went back: {pa} -> {pb}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simulcast_layers_nobody_takes_are_paused_at_the_publisher() {
    use tessera_client::simulcast::{SimulcastPublisher, THREE_LAYERS};
    const H: (usize, usize, &str) = (320, 240, "green");
    const F: (usize, usize, &str) = (640, 480, "red");
    let (_dir, s) = common::start_with_config(CONFIG);
    // No views: nothing mixes (a mix takes the top layer).
    let room = s.new_room(json!({"views": []})).await;
    let (mut psig, _) = s.join(&room, "pub").await;
    let p = SimulcastPublisher::start(&mut psig, &THREE_LAYERS).await.unwrap();
    let id = p.stream_id.clone();
    // Nobody takes it: the lowest layer only (kept, so a subscriber starts at once).
    assert_eq!(asked_layers(&mut psig, &id, &p).await, ["q"]);
    // A subscriber asks for h by RID: h comes back, and it moves there.
    let (mut ssig, _) = s.join(&room, "sub").await;
    let h = Subscriber::start_video(&mut ssig, &format!("{id}-video-h"), Value::Null).await.unwrap();
    assert_eq!(asked_layers(&mut psig, &id, &p).await, ["q", "h"]);
    wait_for_picture(&h, H, Duration::from_secs(5)).await;
    // One on auto may want any: every layer, and it reaches f.
    let auto = Subscriber::start_video(&mut ssig, &id, Value::Null).await.unwrap();
    assert_eq!(asked_layers(&mut psig, &id, &p).await, ["q", "h", "f"]);
    let reached = wait_for_picture(&auto, F, Duration::from_secs(5)).await;
    println!("the auto subscriber reached f {reached:?} after subscribing");
    // It pauses its video: it wants no layer, and f is not sent any more; it resumes: f
    // again, and its picture comes back (the subscription moving up from h on auto, f
    // having stopped meanwhile), every frame decodable.
    ssig.ok("subscription-control", Some(json!({"id": auto.id, "operation": "pause", "data": "video"}))).await.unwrap();
    assert_eq!(asked_layers(&mut psig, &id, &p).await, ["q", "h"]);
    let paused = auto.packets("video").len();
    ssig.ok("subscription-control", Some(json!({"id": auto.id, "operation": "play", "data": "video"}))).await.unwrap();
    assert_eq!(asked_layers(&mut psig, &id, &p).await, ["q", "h", "f"]);
    auto.wait_until("video after resuming", Duration::from_secs(5), |r| r.iter().filter(|p| p.kind == "video").count() > paused + 30).await.unwrap();
    let back = Instant::now();
    while runs(&check_layered_video(&auto, 6)).last() != Some(&F) {
        assert!(back.elapsed() < Duration::from_secs(10), "auto did not come back to f: {:?}", runs(&check_layered_video(&auto, 6)));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // It leaves: f is not sent any more, and h's subscriber goes on undisturbed.
    ssig.ok("unsubscribe", Some(json!({"id": auto.id}))).await.unwrap();
    assert_eq!(asked_layers(&mut psig, &id, &p).await, ["q", "h"]);
    let before = h.packets("video").len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(h.packets("video").len() > before + 20, "h's subscriber stalled");
    // (It waited on q if h had stopped before it subscribed.)
    let h_runs = runs(&check_layered_video(&h, 1));
    assert!(h_runs == [H] || h_runs == [(160, 120, "blue"), H], "{h_runs:?}");
}
