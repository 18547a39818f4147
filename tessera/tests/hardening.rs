//! Regression tests for problems found by probing the server with bad input (issue
//! "Hardening"): each test failed before its fix. They run the real binary on loopback.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde_json::{Value, json};
use tessera_client::signaling::Signaling;

async fn json_of(res: reqwest::Response) -> (u16, Value) {
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn new_room(s: &common::Server, options: Value) -> String {
    s.new_room(options).await
}

fn login_args(token: &str) -> Value {
    json!({"token": token, "userAgent": {"sdk": {"version": "5.1", "type": "JavaScript"}}, "protocol": "1.2"})
}

/// The reason of an `('error', reason)` answer.
async fn refused(sig: &mut Signaling, name: &str, data: Value) -> String {
    let args = sig.request(name, Some(data)).await.unwrap();
    assert_eq!(args.first().and_then(Value::as_str), Some("error"), "{name} should fail: {args:?}");
    args.get(1).and_then(Value::as_str).unwrap_or_default().to_string()
}

/// #1: a JSON-patch path `/info/layout/stream` (no index) panicked a worker (slice out of
/// range) and the connection closed without an answer.
#[tokio::test]
async fn layout_path_without_index_is_a_clear_400() {
    let (_dir, s) = common::start_with_config("");
    let room = new_room(&s, json!({})).await;
    let (_alice, _) = s.join(&room, "alice").await;
    let patch = |path: &str| {
        s.client()
            .patch(s.url(&format!("/v1/rooms/{room}/streams/{room}-common")))
            .bearer_auth(common::KEY)
            .json(&json!([{"op": "replace", "path": path, "value": "x"}]))
            .send()
    };
    for path in ["/info/layout/stream", "/info/layout//stream", "/info/layout/-1/stream", "/info/layout/+0/stream"] {
        let (status, body) = json_of(patch(path).await.unwrap()).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("/info/layout/<index>/stream"), "{body}");
    }
    // The server is unharmed: a valid operation on the same stream still works.
    let (status, body) = json_of(patch("/info/layout/7/stream").await.unwrap()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("no region #7"), "{body}");
    assert!(!s.stderr.lock().unwrap().contains("panicked"), "{}", s.stderr.lock().unwrap());
}

/// #2: a client-chosen event name with a newline and ANSI escapes reached the log raw
/// (flood warning), forging a separate ERROR line.
#[tokio::test]
async fn client_strings_cannot_forge_log_lines() {
    let (_dir, s) = common::start_with_config("[portal]\nmax_requests_per_sec = 2\n");
    let mut sig = Signaling::connect(&s.portal).await.unwrap();
    let forged = "x\u{1b}[31mred\u{1b}[0m\n2026-12-01T00:00:00Z ERROR tessera: FORGED-LINE";
    for _ in 0..8 {
        // The flood closes the socket partway; later sends may fail.
        let _ = tokio::time::timeout(Duration::from_millis(500), sig.request(forged, Some(json!({})))).await;
    }
    // Room names with control characters are refused or logged escaped too.
    let res = s
        .client()
        .post(s.url("/v1/rooms"))
        .bearer_auth(common::KEY)
        .json(&json!({"name": "evil\nERROR FORGED-ROOM \u{1b}[2J"}))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(res).await;
    if status == 200 {
        // A room whose name holds control characters must still be logged escaped.
        let id = body["id"].as_str().unwrap().to_string();
        let _ = s.client().delete(s.url(&format!("/v1/rooms/{id}"))).bearer_auth(common::KEY).send().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = s.stderr.lock().unwrap().clone();
    assert!(log.contains("request flood"), "the flood warning should be logged:\n{log}");
    for line in log.lines() {
        assert!(!line.contains("FORGED-LINE") || line.contains("request flood"), "forged line: {line:?}");
        assert!(!line.starts_with("ERROR FORGED-ROOM"), "forged line: {line:?}");
        assert!(!line.contains("\u{1b}[31mred") && !line.contains("\u{1b}[2J"), "raw escape from a client: {line:?}");
    }
}

/// OWT's JS SDK sends bursts (every subscribe, offer and candidate of a busy room at once,
/// and its candidates again after each answer): a burst past the limit is refused, not
/// disconnected, and repeated candidates do not count. Only a client that goes on
/// sending while refused is disconnected.
#[tokio::test]
async fn request_bursts_are_refused_and_only_a_sustained_flood_disconnects() {
    let (_dir, s) = common::start_with_config("[portal]\nmax_requests_per_sec = 5\n");
    let room = new_room(&s, json!({})).await;
    let (mut alice, _) = s.join(&room, "alice").await;
    let (mut bob, info) = s.join(&room, "bob").await;
    let published = alice.ok("publish", Some(json!({"media": {"tracks": [{"type": "audio", "mid": "0", "source": "mic"}]}}))).await.unwrap();
    let transport = published["transportId"].as_str().unwrap().to_string();
    let candidate = json!({"id": transport, "signaling": {"type": "candidate",
        "candidate": {"candidate": "a=candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host", "sdpMid": "0", "sdpMLineIndex": 0}}});
    // Far more repeats than the burst of 10: each answered ok.
    for i in 0..40 {
        let args = alice.request("soac", Some(candidate.clone())).await.unwrap();
        assert_eq!(args.first().and_then(Value::as_str), Some("ok"), "repeat #{i}: {args:?}");
    }
    // A burst past the limit: some served, the rest refused, the session kept.
    let mut answers = Vec::new();
    for i in 0..20 {
        let args = bob.request("text", Some(json!({"to": "all", "message": format!("burst {i}")}))).await.unwrap();
        answers.push(args);
    }
    let refused_count = answers.iter().filter(|a| a.get(1).and_then(Value::as_str) == Some("Too many requests")).count();
    let served = answers.iter().filter(|a| a.first().and_then(Value::as_str) == Some("ok")).count();
    assert!(served >= 8 && refused_count >= 8 && served + refused_count == 20, "{answers:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    bob.ok("text", Some(json!({"to": "all", "message": "after the burst"}))).await.unwrap();
    let text = alice.wait_for("bob's text", Duration::from_secs(5), |n| n.event == "text" && n.data["message"] == "after the burst").await.unwrap();
    assert_eq!(text.data["from"], info["id"]);
    // Going on while refused: disconnected (20 refusals are forgiven at 5/s; 4 x 5 = 20).
    let mut closed = false;
    for _ in 0..200 {
        match tokio::time::timeout(Duration::from_secs(2), bob.request("text", Some(json!({"to": "all", "message": "spam"})))).await {
            Ok(Ok(_)) => {}
            _ => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "a sustained flood should close the socket");
    // Alice, in the same room, is unharmed.
    alice.ok("text", Some(json!({"to": "all", "message": "still here"}))).await.unwrap();
    assert!(s.stderr.lock().unwrap().contains("request flood"));
}

/// #3: a reconnection ticket used for a successful relogin worked again on another socket,
/// taking the participant over.
#[tokio::test]
async fn reconnection_ticket_works_once() {
    let (_dir, s) = common::start_with_config("[portal]\nreconnection_timeout_secs = 10\n");
    let room = new_room(&s, json!({})).await;
    let (alice, info) = s.join(&room, "alice").await;
    let (mut bob, _) = s.join(&room, "bob").await;
    let ticket = info["reconnectionTicket"].as_str().unwrap().to_string();
    alice.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut resumed = Signaling::connect(&s.portal).await.unwrap();
    let next = resumed.ok("relogin", Some(json!(ticket))).await.unwrap();
    let next = next.as_str().expect("relogin answers the next ticket").to_string();
    assert_ne!(next, ticket);

    // The attacker replays the spent ticket on a third socket while the session is live.
    let mut thief = Signaling::connect(&s.portal).await.unwrap();
    let reason = refused(&mut thief, "relogin", json!(ticket)).await;
    assert_eq!(reason, "Reconnection ticket already used");

    // The live session is undisturbed: its text reaches bob, and bob saw no leave.
    resumed.ok("text", Some(json!({"to": "all", "message": "still me"}))).await.unwrap();
    let text = bob.wait_for("alice's text", Duration::from_secs(5), |n| n.event == "text").await.unwrap();
    assert_eq!(text.data["message"], "still me");
    assert_eq!(text.data["from"], info["id"]);
    assert!(!bob.drain().iter().any(|n| n.event == "participant" && n.data["action"] == "leave"), "{:?}", bob.backlog);

    // The next ticket works (once), and a refreshed one too.
    let refreshed = resumed.ok("refreshReconnectionTicket", None).await.unwrap();
    assert!(refreshed.as_str().is_some());
    resumed.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = Signaling::connect(&s.portal).await.unwrap();
    again.ok("relogin", Some(json!(next))).await.unwrap();
    let mut replay = Signaling::connect(&s.portal).await.unwrap();
    assert_eq!(refused(&mut replay, "relogin", json!(next)).await, "Reconnection ticket already used");
    // A ticket issued before the relogin (the refreshed one) is void now too.
    let mut old = Signaling::connect(&s.portal).await.unwrap();
    assert_eq!(refused(&mut old, "relogin", refreshed).await, "Reconnection ticket already used");
    again.ok("text", Some(json!({"to": "all", "message": "back"}))).await.unwrap();
    bob.wait_for("second text", Duration::from_secs(5), |n| n.event == "text" && n.data["message"] == "back").await.unwrap();
}

/// #4: `/dev/token` minted presenter tokens for any room whatever the `Host` (DNS rebinding).
#[tokio::test]
async fn dev_endpoints_only_for_loopback_names_and_the_dev_room() {
    let (_dir, s) = common::start_with_config("");
    assert!(
        s.startup.iter().any(|l| l.contains("WARNING") && l.contains("/dev/token") && l.contains("dev_tokens")),
        "start must say loudly that the dev endpoints are on: {:?}",
        s.startup
    );
    let other = new_room(&s, json!({})).await;
    let authority = s.portal.trim_start_matches("http://").to_string();
    let port = authority.rsplit(':').next().unwrap().to_string();
    let post = |path: &str, host: Option<String>, origin: Option<&str>, body: Value| {
        let mut req = s.client().post(format!("{}{path}", s.portal)).json(&body);
        if let Some(h) = host {
            req = req.header("Host", h);
        }
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        req.send()
    };
    // The demo page's own request works.
    let ok = post("/dev/token", None, Some(&format!("http://{authority}")), json!({"user": "me"})).await.unwrap();
    assert_eq!(ok.status(), 200);
    let ok = post("/dev/token", Some(format!("localhost:{port}")), None, json!({"user": "me"})).await.unwrap();
    assert_eq!(ok.status(), 200);
    // A rebinding attacker's name, a foreign page, another room: refused.
    for (host, origin, body) in [
        (Some(format!("attacker.example:{port}")), None, json!({"user": "x"})),
        (Some(format!("localhost.attacker.example:{port}")), None, json!({"user": "x"})),
        (None, Some("http://attacker.example"), json!({"user": "x"})),
        (None, None, json!({"user": "x", "room": other})),
    ] {
        let (status, body) = json_of(post("/dev/token", host.clone(), origin, body).await.unwrap()).await;
        assert_eq!(status, 403, "{host:?} {origin:?}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().starts_with("dev endpoint:"), "{body}");
    }
    let (status, _) =
        json_of(post("/dev/layout", Some(format!("attacker.example:{port}")), None, json!({"template": "lecture"})).await.unwrap()).await;
    assert_eq!(status, 403);
    let (status, _) = json_of(post("/dev/layout", None, None, json!({"template": "lecture", "room": other})).await.unwrap()).await;
    assert_eq!(status, 403);

    // Configured rooms are allowed; off means gone.
    let (_d2, s2) = common::start_with_config(&format!("[demo]\ndev_rooms = [\"{other}\"]\n"));
    let res = s2.client().post(format!("{}/dev/token", s2.portal)).json(&json!({"user": "x", "room": other})).send().await.unwrap();
    // That room does not exist on this fresh server: allowed, then not found.
    assert_eq!(res.status(), 404);
    let (_d3, s3) = common::start_with_config("[demo]\ndev_tokens = \"off\"\n");
    assert!(!s3.startup.iter().any(|l| l.contains("WARNING")), "{:?}", s3.startup);
    let res = s3.client().post(format!("{}/dev/token", s3.portal)).json(&json!({"user": "x"})).send().await.unwrap();
    assert_eq!(res.status(), 404);
}

/// #5: a login refused with "Room is full" spent the token.
#[tokio::test]
async fn full_room_does_not_spend_the_token() {
    let (_dir, s) = common::start_with_config("");
    let room = new_room(&s, json!({"participantLimit": 1})).await;
    let (mut alice, _) = s.join(&room, "alice").await;
    let bob_token = s.token(&room, "bob", "presenter").await;
    let mut bob = Signaling::connect(&s.portal).await.unwrap();
    assert_eq!(refused(&mut bob, "login", login_args(&bob_token)).await, "Room is full");
    alice.ok("logout", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut bob = Signaling::connect(&s.portal).await.unwrap();
    let info = bob.ok("login", Some(login_args(&bob_token))).await.unwrap();
    assert_eq!(info["user"], "bob");
    // Once it has logged in, the token is spent.
    let mut again = Signaling::connect(&s.portal).await.unwrap();
    assert_eq!(refused(&mut again, "login", login_args(&bob_token)).await, "Token already used");
    // A room with no seats at all leaves nothing behind either.
    let closed = new_room(&s, json!({"participantLimit": 0})).await;
    let t = s.token(&closed, "carol", "presenter").await;
    let mut carol = Signaling::connect(&s.portal).await.unwrap();
    assert_eq!(refused(&mut carol, "login", login_args(&t)).await, "Room is full");
    let stats: Value = s.client().get(s.url("/v1/stats")).bearer_auth(common::KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(stats["rooms"], 1, "{stats}");
}

/// #6: Engine.IO sessions that never log in were uncapped.
#[tokio::test]
async fn unauthenticated_sessions_are_capped_per_address_and_in_total() {
    let (_dir, s) = common::start_with_config("[portal]\nmax_unauthenticated_sessions = 8\nmax_unauthenticated_sessions_per_address = 5\n");
    common::http();
    let from = |last: u8| reqwest::Client::builder().local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))).build().unwrap();
    let handshake = |c: reqwest::Client| {
        let url = format!("{}/socket.io/?EIO=4&transport=polling", s.portal);
        async move {
            let res = c.get(url).send().await.unwrap();
            let status = res.status().as_u16();
            (status, res.text().await.unwrap())
        }
    };
    let a = from(1);
    for i in 0..4 {
        let (status, body) = handshake(a.clone()).await;
        assert_eq!(status, 200, "handshake {i}: {body}");
        assert!(body.starts_with('0'), "{body}");
    }
    // A fifth from the same address logs in, which frees its place.
    let room = new_room(&s, json!({})).await;
    let (_alice, _) = s.join(&room, "alice").await;
    assert_eq!(handshake(a.clone()).await.0, 200);
    let (status, body) = handshake(a.clone()).await;
    assert_eq!(status, 403, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["code"], 4, "engine.io's FORBIDDEN: {err}");
    // Another address has its own allowance, up to the total of 8.
    let b = from(2);
    for _ in 0..3 {
        assert_eq!(handshake(b.clone()).await.0, 200);
    }
    assert_eq!(handshake(b.clone()).await.0, 403, "total cap");
    // Logged-in clients are not affected by the caps.
    let stats: Value = s.client().get(s.url("/v1/stats")).bearer_auth(common::KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(stats["participants"], 1, "{stats}");
}

/// #7: `?per_page=-1` answered plain text; unknown fields in token and recording bodies
/// were ignored.
#[tokio::test]
async fn small_rest_gaps() {
    let (_dir, s) = common::start_with_config("");
    let get = |q: &str| s.client().get(s.url(&format!("/v1/rooms?{q}"))).bearer_auth(common::KEY).send();
    for q in ["per_page=-1", "page=x", "per_page=1e3"] {
        let res = get(q).await.unwrap();
        assert_eq!(res.headers()["content-type"], "application/json", "{q}");
        let (status, body) = json_of(res).await;
        assert_eq!(status, 400, "{q}: {body}");
        assert_eq!(body["error"]["code"], 1201, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("query"), "{body}");
    }
    let post = |path: &str, body: Value| s.client().post(s.url(path)).bearer_auth(common::KEY).json(&body).send();
    let (status, body) = json_of(post("/v1/rooms/dev/tokens", json!({"user": "a", "role": "presenter", "rol": "x"})).await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("unknown field `rol`"), "{body}");
    // OWT's `preference` is accepted.
    let res = post("/v1/rooms/dev/tokens", json!({"user": "a", "role": "presenter", "preference": {"isp": "x", "region": "y"}})).await.unwrap();
    assert_eq!(res.status(), 200);
    for (body, field) in [
        (json!({"media": {"video": {"from": "s"}}, "containr": "mkv"}), "containr"),
        (json!({"media": {"vide": {"from": "s"}}}), "media.vide"),
        (json!({"media": {"video": {"from": "s", "form": 1}}}), "media.video.form"),
    ] {
        let (status, res) = json_of(post("/v1/rooms/dev/recordings", body.clone()).await.unwrap()).await;
        assert_eq!(status, 400, "{body}: {res}");
        assert!(res["error"]["message"].as_str().unwrap().contains(&format!("unknown field `{field}`")), "{res}");
    }
}

/// A participant kept only to stay in the room (a load generator's thousands) reads none of
/// the notifications it is sent: with them discarded, its connection goes on answering
/// past the client's 4096-notification queue (kept, the reader stopped there: requests
/// unanswered, pings too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_discards_notifications_stays_responsive() {
    let (_dir, s) = common::start_with_config("[portal]\nmax_requests_per_sec = 5000\n");
    let room = s.new_room(json!({"views": []})).await;
    let (mut quiet, _) = s.join(&room, "quiet").await;
    let (mut talker, _) = s.join(&room, "talker").await;
    quiet.discard_notifications();
    talker.discard_notifications();
    for i in 0..4200 {
        talker.ok("text", Some(json!({"to": "all", "message": format!("m{i}")}))).await.unwrap();
    }
    let answered = tokio::time::timeout(Duration::from_secs(5), quiet.ok("text", Some(json!({"to": "all", "message": "still here"})))).await;
    assert!(matches!(answered, Ok(Ok(_))), "the quiet participant's request went unanswered: {answered:?}");
    assert!(quiet.wait_for("anything", Duration::from_millis(100), |_| true).await.is_err(), "notifications are discarded");
}
