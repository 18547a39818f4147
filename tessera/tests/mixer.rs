//! The mixer end to end: real VP8/Opus publishers (GStreamer encoders) over WebRTC,
//! a subscriber to the room's mixed stream decoding what it receives.

mod common;

use common::mix::{is, quadrants, wait_for_mix};

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tessera_client::media::{Frame, LiveFormat, decode_opus, decode_vp8, live_source, live_source_with, tone_power};
use tessera_client::peer::{PublishOptions, Publisher, Received, Subscriber};
use tessera_client::signaling::Signaling;

const CONFIG: &str = "[portal]\nreconnection_timeout_secs = 2\n[webrtc]\nbind_ip = \"127.0.0.1\"\n";

async fn join(s: &common::Server, room: &str, user: &str) -> Signaling {
    s.join(room, user).await.0
}

fn snapshot(log: &std::sync::Mutex<Vec<Received>>) -> Vec<Received> {
    log.lock().unwrap().clone()
}

fn last_frame(packets: &[Received]) -> Frame {
    let frames = decode_vp8(packets).unwrap();
    assert!(frames.len() > 5, "decoded only {} frames", frames.len());
    frames.last().unwrap().clone()
}

/// The mixed stream of `room`'s `common` view, as REST shows it.
async fn mixed_stream(s: &common::Server, room: &str) -> Value {
    s.client().get(s.url(&format!("/v1/rooms/{room}/streams/{room}-common"))).bearer_auth(common::KEY).send().await.unwrap().json().await.unwrap()
}

async fn layout_of(s: &common::Server, room: &str) -> Value {
    mixed_stream(s, room).await["info"]["layout"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_view_composes_colours_and_tones_follows_layout_changes() {
    let (_dir, s) = common::start_with_config(CONFIG);
    let room = "dev";
    let mixed_id = format!("{room}-common");

    // Two publishers: red + 440 Hz, blue + 1000 Hz.
    let mut asig = join(&s, room, "red").await;
    let a = Arc::new(Publisher::start(&mut asig, PublishOptions { audio: true, video: true, data: false, tag: 1, h264: false }, None).await.unwrap());
    let _a_src = live_source(a.clone(), (255, 0, 0), 440).unwrap();
    let mut bsig = join(&s, room, "blue").await;
    let b = Arc::new(Publisher::start(&mut bsig, PublishOptions { audio: true, video: true, data: false, tag: 2, h264: false }, None).await.unwrap());
    let _b_src = live_source(b.clone(), (0, 0, 255), 1000).unwrap();

    // Both are mixed automatically, in join order.
    let mut vsig = join(&s, room, "viewer").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let l = layout_of(&s, room).await;
        if l[0]["stream"] == a.stream_id.as_str() && l[1]["stream"] == b.stream_id.as_str() {
            assert_eq!(l.as_array().unwrap().len(), 4, "two inputs use the 2×2 fluid template: {l}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not mixed: {l}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sub = Subscriber::start(&mut vsig, &mixed_id, true, true, false).await.unwrap();
    let started = tokio::time::Instant::now();
    // Both inputs appear within a couple of seconds (each needs a keyframe from its publisher).
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let frames = decode_vp8(&snapshot(&sub.received)).unwrap();
        let ok = frames.last().is_some_and(|f| {
            let q = quadrants(f);
            is(q[0], "red") && is(q[1], "blue")
        });
        if ok || started.elapsed() > Duration::from_secs(6) {
            eprintln!("both inputs shown after {:?}", started.elapsed());
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = snapshot(&sub.received);
    let f = last_frame(&before);
    assert_eq!((f.width, f.height), (640, 480));
    let q = quadrants(&f);
    assert!(is(q[0], "red"), "region 1 shows the first publisher: {q:?}");
    assert!(is(q[1], "blue"), "region 2 shows the second: {q:?}");
    assert!(is(q[2], "black") && is(q[3], "black"), "empty regions show the background: {q:?}");

    // Audio holds both tones.
    let pcm = decode_opus(&before).unwrap();
    assert!(pcm.len() > 48000, "decoded {} samples from {} audio packets", pcm.len(), before.iter().filter(|p| p.kind == "audio").count());
    let (p440, p1000, p700, p2500) =
        (tone_power(&pcm, 440.0, 48000.0), tone_power(&pcm, 1000.0, 48000.0), tone_power(&pcm, 700.0, 48000.0), tone_power(&pcm, 2500.0, 48000.0));
    assert!(p440 > 20.0 * p700 && p440 > 20.0 * p2500, "440 Hz present: {p440} vs {p700}/{p2500}");
    assert!(p1000 > 20.0 * p700 && p1000 > 20.0 * p2500, "1000 Hz present: {p1000} vs {p700}/{p2500}");

    // Swap over REST (OWT: put a stream into region #0); everyone is told.
    let res = s
        .client()
        .patch(s.url(&format!("/v1/rooms/{room}/streams/{mixed_id}")))
        .bearer_auth(common::KEY)
        .json(&json!([{"op": "replace", "path": "/info/layout/0/stream", "value": b.stream_id}]))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let updated: Value = res.json().await.unwrap();
    assert_eq!(updated["info"]["layout"][0]["stream"], b.stream_id.as_str());
    assert_eq!(updated["info"]["layout"][1]["stream"], a.stream_id.as_str());
    let note = vsig
        .wait_for("layout update", Duration::from_secs(3), |n| {
            n.event == "stream"
                && n.data["id"] == mixed_id.as_str()
                && n.data["data"]["field"] == "video.layout"
                && n.data["data"]["value"][0]["stream"] == b.stream_id.as_str()
        })
        .await
        .unwrap();
    assert_eq!(note.data["status"], "update");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let q = quadrants(&last_frame(&snapshot(&sub.received)));
    assert!(is(q[0], "blue") && is(q[1], "red"), "swapped: {q:?}");

    // A bad PATCH is refused precisely.
    let res = s
        .client()
        .patch(s.url(&format!("/v1/rooms/{room}/streams/{mixed_id}")))
        .bearer_auth(common::KEY)
        .json(&json!([{"op": "replace", "path": "/info/layout/9/stream", "value": a.stream_id}]))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);

    // A corrupt input (undecodable "VP8") joins: it takes the free region, the mix goes on.
    let mut csig = join(&s, room, "garbage").await;
    let c =
        Arc::new(Publisher::start(&mut csig, PublishOptions { audio: false, video: true, data: false, tag: 3, h264: false }, None).await.unwrap());
    let cc = c.clone();
    let garbage = tokio::spawn(async move { cc.send_for(Duration::from_secs(5), 30, 900).await.unwrap() });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let l = layout_of(&s, room).await;
    assert_eq!(l[2]["stream"], c.stream_id.as_str(), "{l}");
    let frames_before = decode_vp8(&snapshot(&sub.received)).unwrap().len();
    let q = quadrants(&last_frame(&snapshot(&sub.received)));
    assert!(is(q[0], "blue") && is(q[1], "red"), "good inputs unharmed by a corrupt one: {q:?}");

    // The red publisher leaves: its region goes to background, the others stay in place.
    a.stop(&mut asig).await.unwrap();
    drop(_a_src);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let l = layout_of(&s, room).await;
    assert_eq!(l[0]["stream"], b.stream_id.as_str(), "{l}");
    assert_eq!(l[1]["stream"], c.stream_id.as_str(), "{l}");
    let all = snapshot(&sub.received);
    let frames = decode_vp8(&all).unwrap();
    assert!(frames.len() > frames_before + 30, "mix keeps producing frames: {} -> {}", frames_before, frames.len());
    let q = quadrants(frames.last().unwrap());
    assert!(is(q[0], "blue"), "blue stays: {q:?}");
    assert!(is(q[1], "black"), "the leaver's region is background: {q:?}");
    garbage.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_simulcast_input_is_mixed_from_the_lowest_layer_that_fills_its_region() {
    use tessera_client::simulcast::{SimulcastPublisher, THREE_LAYERS};
    let (_dir, s) = common::start_with_config(CONFIG);
    let room = "dev";
    let mixed_id = format!("{room}-common");
    // Layers q 160×120 blue, h 320×240 green, f 640×480 red; the view is 640×480.
    let mut psig = join(&s, room, "layers").await;
    let p = SimulcastPublisher::start(&mut psig, &THREE_LAYERS).await.unwrap();
    let mut vsig = join(&s, room, "viewer").await;
    let sub = Subscriber::start(&mut vsig, &mixed_id, false, true, false).await.unwrap();
    let centre = |f: &Frame| f.around(f.width / 2, f.height / 2);
    // Alone, it fills the view: only f covers 640×480.
    let t = wait_for_mix(&sub, Duration::from_secs(8), "alone, from f", |f| is(centre(f), "red")).await;
    println!("alone: f after {t:?}");
    // A second input: the 2×2 template, a quarter (320×240) each, which h fills.
    let mut ysig = join(&s, room, "yellow").await;
    let y = Arc::new(Publisher::start(&mut ysig, PublishOptions { audio: true, video: true, data: false, tag: 2, h264: false }, None).await.unwrap());
    let y_src = live_source(y.clone(), (255, 255, 0), 1000).unwrap();
    let t = wait_for_mix(&sub, Duration::from_secs(6), "in a quarter, from h", |f| {
        let q = quadrants(f);
        is(q[0], "green") && is(q[1], "yellow")
    })
    .await;
    println!("in a quarter: h after {t:?}");
    // Held there (not a passing picture before the move back up).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let q = quadrants(&last_frame(&snapshot(&sub.received)));
    assert!(is(q[0], "green") && is(q[1], "yellow"), "{q:?}");
    // Alone again: back to f.
    y.stop(&mut ysig).await.unwrap();
    drop(y_src);
    let t = wait_for_mix(&sub, Duration::from_secs(6), "alone again, from f", |f| is(centre(f), "red")).await;
    println!("alone again: f after {t:?}");
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loudest_input_becomes_active_and_takes_the_primary_region() {
    let (_dir, s) = common::start_with_config(CONFIG);
    let created: Value = s
        .client()
        .post(s.url("/v1/rooms"))
        .bearer_auth(common::KEY)
        .json(&json!({"name": "speakers", "options": {"views": [{"label": "common", "audio": {"vad": true}, "video": {"keepActiveInputPrimary": true}}]}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let room = created["_id"].as_str().unwrap().to_string();
    let mixed_id = format!("{room}-common");

    // A quiet red publisher joins first (primary region), a loud blue one second.
    let opts = |tag| PublishOptions { audio: true, video: true, data: false, tag, h264: false };
    let mut asig = join(&s, &room, "quiet").await;
    let a = Arc::new(Publisher::start(&mut asig, opts(1), None).await.unwrap());
    let _a_src = live_source_with(a.clone(), (255, 0, 0), 440, LiveFormat { volume: 0.02, ..Default::default() }).unwrap();
    let mut bsig = join(&s, &room, "loud").await;
    let b = Arc::new(Publisher::start(&mut bsig, opts(2), None).await.unwrap());
    let _b_src = live_source_with(b.clone(), (0, 0, 255), 1000, LiveFormat { volume: 0.5, ..Default::default() }).unwrap();
    let mut vsig = join(&s, &room, "viewer").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while layout_of(&s, &room).await[1]["stream"] != b.stream_id.as_str() {
        assert!(tokio::time::Instant::now() < deadline, "not mixed in join order");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sub = Subscriber::start(&mut vsig, &mixed_id, true, true, false).await.unwrap();

    // The loud one is detected and moved into the primary region; the room is told both.
    let active = vsig
        .wait_for("activeInput update", Duration::from_secs(8), |n| {
            n.event == "stream" && n.data["id"] == mixed_id.as_str() && n.data["data"]["field"] == "activeInput"
        })
        .await
        .unwrap();
    assert_eq!(active.data["data"]["value"], b.stream_id.as_str(), "{:?}", active.data);
    vsig.wait_for("layout update", Duration::from_secs(3), |n| {
        n.event == "stream" && n.data["data"]["field"] == "video.layout" && n.data["data"]["value"][0]["stream"] == b.stream_id.as_str()
    })
    .await
    .unwrap();
    let info = mixed_stream(&s, &room).await;
    assert_eq!(info["info"]["activeInput"], b.stream_id.as_str(), "{info}");
    assert_eq!(info["info"]["layout"][0]["stream"], b.stream_id.as_str(), "{info}");
    assert_eq!(info["info"]["layout"][1]["stream"], a.stream_id.as_str(), "{info}");

    // And the picture follows: blue in region 1, red in region 2.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let q = quadrants(&last_frame(&snapshot(&sub.received)));
    assert!(is(q[0], "blue") && is(q[1], "red"), "speaker in the primary region: {q:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_view_with_layers_serves_each_layer_at_its_size() {
    let (_dir, s) = common::start_with_config(CONFIG);
    let room = s.new_room(json!({"views": [{"label": "common", "audio": false, "video": {"layers": ["x1/2", "x1/4"]}}]})).await;
    let mixed_id = format!("{room}-common");
    let mut asig = join(&s, &room, "red").await;
    let a =
        Arc::new(Publisher::start(&mut asig, PublishOptions { audio: false, video: true, data: false, tag: 1, h264: false }, None).await.unwrap());
    let _a_src = live_source(a.clone(), (255, 0, 0), 440).unwrap();

    // The mixed stream lists one video track per layer, with its RID, id and size.
    let (mut vsig, login) = s.join(&room, "viewer").await;
    let mixed = login["room"]["streams"].as_array().unwrap().iter().find(|st| st["id"] == mixed_id.as_str()).unwrap().clone();
    let layers: Vec<(String, String, u64, u64)> = mixed["media"]["tracks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let r = &t["parameters"]["resolution"];
            (
                t["rid"].as_str().unwrap_or("").into(),
                t["id"].as_str().unwrap_or("").into(),
                r["width"].as_u64().unwrap(),
                r["height"].as_u64().unwrap(),
            )
        })
        .collect();
    let id = |rid: &str| format!("{mixed_id}-video-{rid}");
    assert_eq!(
        layers,
        vec![("x1".into(), id("x1"), 640, 480), ("x1_2".into(), id("x1_2"), 320, 240), ("x1_4".into(), id("x1_4"), 160, 120)],
        "{mixed}"
    );

    // A subscriber of the half layer by its track id decodes 320×240 pictures of the mix;
    // one asking a resolution gets the nearest layer.
    let half = Subscriber::start_video(&mut vsig, &id("x1_2"), Value::Null).await.unwrap();
    let red = |f: &Frame| is(f.around(f.width / 2, f.height / 2), "red");
    wait_for_mix(&half, Duration::from_secs(8), "the half layer", |f| (f.width, f.height) == (320, 240) && red(f)).await;
    let near = Subscriber::start_video(&mut vsig, &mixed_id, json!({"parameters": {"resolution": {"width": 150, "height": 100}}})).await.unwrap();
    wait_for_mix(&near, Duration::from_secs(8), "the quarter layer by resolution", |f| (f.width, f.height) == (160, 120) && red(f)).await;
    // And the full one to a subscriber naming the stream (auto, on a fast link).
    let full = Subscriber::start_video(&mut vsig, &mixed_id, Value::Null).await.unwrap();
    wait_for_mix(&full, Duration::from_secs(8), "the full layer", |f| (f.width, f.height) == (640, 480) && red(f)).await;
    // Each goes on decoding its layer.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (sub, size) in [(&half, (320, 240)), (&near, (160, 120)), (&full, (640, 480))] {
        let frames = decode_vp8(&sub.packets("video")).unwrap();
        assert_eq!(frames.last().map(|f| (f.width, f.height)), Some(size));
        assert!(frames.len() > 10, "decoded {} frames", frames.len());
    }
}
