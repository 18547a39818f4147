//! Regressions of the state kept twice on both sides of the portal/media seam (issue
//! "Typed control protocol and media seam"): the media side now reports every session it
//! ends, with its room, and the room controller forgets exactly those.

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_client::peer::{PublishOptions, Publisher, Subscriber};
use tessera_client::signaling::Signaling;

const CONFIG: &str = "[portal]\nreconnection_timeout_secs = 5\n[webrtc]\nbind_ip = \"127.0.0.1\"\n";

async fn room(s: &common::Server, options: Value) -> String {
    s.new_room(options).await
}

async fn join(s: &common::Server, room: &str, user: &str) -> Signaling {
    s.join(room, user).await.0
}

/// The reason of an `('error', reason)` answer, or None for `ok`.
async fn refusal(sig: &mut Signaling, name: &str, data: Value) -> Option<String> {
    let args = sig.request(name, Some(data)).await.unwrap();
    match args.first().and_then(Value::as_str) {
        Some("ok") => None,
        _ => Some(args.get(1).and_then(Value::as_str).unwrap_or_default().to_string()),
    }
}

/// A transport that closes under a subscription and a publication that never flowed:
/// the subscription's end used to name no room (so the portal kept it), and the pending
/// publication kept counting against `inputLimit` for the participant's whole stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_transport_frees_its_subscriptions_and_pending_publications() {
    let (_dir, s) = common::start_with_config(CONFIG);
    let room = room(&s, json!({"inputLimit": 2})).await;
    let mut alice = join(&s, &room, "alice").await;
    let publisher = Publisher::start(&mut alice, PublishOptions { audio: true, video: true, data: false, tag: 1, h264: false }, None).await.unwrap();

    let mut bob = join(&s, &room, "bob").await;
    let sub = Subscriber::start(&mut bob, &publisher.stream_id, true, true, false).await.unwrap();
    let transport = sub.conn.transport.clone().unwrap();
    // A publication announced on the same transport that never gets its media.
    let pending = bob
        .ok(
            "publish",
            Some(json!({"media": {"tracks": [{"type": "video", "mid": "9", "source": "camera"}]}, "transport": {"id": transport, "type": "webrtc"}})),
        )
        .await
        .unwrap();
    assert_eq!(pending["transportId"], transport.as_str());
    // alice's stream + bob's pending publication fill the room's two inputs.
    let mut carol = join(&s, &room, "carol").await;
    let full = json!({"media": {"tracks": [{"type": "audio", "mid": "0", "source": "mic"}]}});
    assert_eq!(refusal(&mut carol, "publish", full.clone()).await.as_deref(), Some("Too many inputs"));

    // bob's peer connection goes away (his socket stays): the server's transport closes.
    sub.conn.close().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st: Value = s.client().get(s.url("/v1/stats")).bearer_auth(common::KEY).send().await.unwrap().json().await.unwrap();
        if st["media"]["transports"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "bob's transport was not closed: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The room controller forgot both sessions and the transport.
    let unsub = refusal(&mut bob, "unsubscribe", json!({"id": sub.id})).await;
    assert_eq!(unsub.as_deref(), Some(format!("Subscription does NOT exist: {}", sub.id).as_str()));
    let unpub = refusal(&mut bob, "unpublish", json!({"id": pending["id"]})).await;
    assert!(unpub.as_deref().is_some_and(|r| r.starts_with("Publication does NOT exist")), "{unpub:?}");
    let soac = refusal(&mut bob, "soac", json!({"id": transport, "signaling": {"type": "offer", "sdp": "v=0"}})).await;
    assert_eq!(soac.as_deref(), Some(format!("Transport does NOT exist: {transport}").as_str()));
    // ...so the seat it held is free again.
    let ok = carol.ok("publish", Some(full)).await;
    assert!(ok.is_ok(), "{ok:?}");
    // alice's stream was never disturbed.
    let streams: Value =
        s.client().get(s.url(&format!("/v1/rooms/{room}/streams"))).bearer_auth(common::KEY).send().await.unwrap().json().await.unwrap();
    assert!(streams.as_array().unwrap().iter().any(|st| st["id"] == publisher.stream_id.as_str()), "{streams}");
}
