//! Webhooks: a receiver started by the test gets a room's events in order, each signed
//! with the service key; a receiver that is down slows nothing.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_client::peer::Publisher;

/// One request as the receiver got it: its headers (lower-case names) and body.
#[derive(Clone, Debug)]
struct Received {
    headers: Vec<(String, String)>,
    body: String,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A plain HTTP/1.1 receiver on a thread: answers 200 to every POST and keeps it.
fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    receiver_with(None)
}

/// Like [`receiver`], over TLS with `tls` when given (an `https://localhost` URL).
fn receiver_with(tls: Option<Arc<rustls::ServerConfig>>) -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = if tls.is_some() { format!("https://localhost:{port}/hooks") } else { format!("http://127.0.0.1:{port}/hooks") };
    let got = Arc::new(Mutex::new(Vec::new()));
    let keep = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let keep = keep.clone();
            let tls = tls.clone();
            std::thread::spawn(move || match tls {
                Some(config) => {
                    let Ok(conn) = rustls::ServerConnection::new(config) else { return };
                    serve_requests(rustls::StreamOwned::new(conn, stream), keep);
                }
                None => serve_requests(stream, keep),
            });
        }
    });
    (url, got)
}

/// Reads requests off one connection until it closes, answering each 200.
fn serve_requests(stream: impl Read + Write, keep: Arc<Mutex<Vec<Received>>>) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (n, v) = h.split_once(':').unwrap();
            headers.push((n.trim().to_lowercase(), v.trim().to_string()));
        }
        let len: usize = headers.iter().find(|(n, _)| n == "content-length").map(|(_, v)| v.parse().unwrap()).unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        keep.lock().unwrap().push(Received { headers, body: String::from_utf8(body).unwrap() });
        let out = reader.get_mut();
        if out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").and_then(|()| out.flush()).is_err() {
            return;
        }
    }
}

/// The events received so far for `room`, as JSON.
fn events_of(got: &Arc<Mutex<Vec<Received>>>, room: &str) -> Vec<Value> {
    got.lock().unwrap().iter().map(|r| serde_json::from_str::<Value>(&r.body).unwrap()).filter(|v| v["room"] == room).collect()
}

fn names(events: &[Value]) -> Vec<String> {
    events.iter().map(|e| e["event"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_events_arrive_in_order_and_signed() {
    let (url, got) = receiver();
    // A receiver that is down: nothing listens on this port.
    let dead = format!("http://127.0.0.1:{}/down", std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
    let config = format!("[webrtc]\nbind_ip = \"127.0.0.1\"\n[webhooks]\nurls = [\"{dead}\", \"{url}\"]\n");
    let (_dir, s) = common::start_with_config(&config);
    let room = s.new_room(json!({})).await;

    let joined = Instant::now();
    let (mut sig, info) = s.join(&room, "ann").await;
    assert!(joined.elapsed() < Duration::from_secs(2), "a dead receiver does not slow a login: {:?}", joined.elapsed());
    let me = info["id"].as_str().unwrap().to_string();
    let publisher = Arc::new(Publisher::start(&mut sig, common::av(1), None).await.unwrap());
    let sending = {
        let p = publisher.clone();
        tokio::spawn(async move { p.send_for(Duration::from_secs(4), 30, 1000).await })
    };
    sig.wait_for("stream add", Duration::from_secs(5), |n| n.event == "stream" && n.data["status"] == "add").await.unwrap();
    let body = json!({"container": "mkv", "media": {"audio": {"from": publisher.stream_id}, "video": {"from": publisher.stream_id}}});
    let rec: Value = s
        .client()
        .post(s.url(&format!("/v1/rooms/{room}/recordings")))
        .bearer_auth(common::KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rec_id = rec["id"].as_str().unwrap();
    let res = s.client().delete(s.url(&format!("/v1/rooms/{room}/recordings/{rec_id}"))).bearer_auth(common::KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    sending.await.unwrap().unwrap();
    sig.ok("logout", None).await.unwrap();

    let want = [
        "room_started",
        "participant_joined",
        "stream_published",
        "stream_published",
        "recording_started",
        "recording_finished",
        "participant_left",
        "stream_unpublished",
        "stream_unpublished",
        "room_ended",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    let events = loop {
        let events = events_of(&got, &room);
        if events.len() >= want.len() {
            break events;
        }
        assert!(Instant::now() < deadline, "events so far: {:?}", names(&events));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(names(&events), want, "{events:#?}");
    assert_eq!(events[1]["participant"], me.as_str());
    assert_eq!(events[1]["user"], "ann");
    assert_eq!(events[1]["role"], "presenter");
    assert_eq!(events[2]["kind"], "mixed");
    assert_eq!(events[2]["stream"], format!("{room}-common"));
    assert_eq!(
        (events[3]["kind"].as_str(), events[3]["stream"].as_str(), events[3]["owner"].as_str()),
        (Some("forward"), Some(publisher.stream_id.as_str()), Some(me.as_str()))
    );
    assert_eq!(events[4]["recording"], rec_id);
    assert_eq!(events[5]["state"], "stopped");
    assert!(events[5]["duration"].as_f64().unwrap() > 1.5, "{}", events[5]);
    assert!(events[5]["size"].as_u64().unwrap() > 1000, "{}", events[5]);
    assert_eq!(events[5]["file"], rec["storage"]["file"]);
    assert!(events.iter().all(|e| e["id"].is_string() && e["createdAt"].is_u64()));

    // Every request is signed over its timestamp and body with the service key, and fresh.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    for r in got.lock().unwrap().iter() {
        let ts = r.header("x-tessera-timestamp").unwrap();
        assert!(now.abs_diff(ts.parse().unwrap()) < 60, "{ts}");
        let want = format!("v1={}", tessera_core::crypto::hmac_sha256_hex(common::KEY.as_bytes(), format!("{ts}.{}", r.body).as_bytes()));
        assert_eq!(r.header("x-tessera-signature"), Some(want.as_str()));
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    // A body changed in transit would not verify.
    let r = got.lock().unwrap().iter().find(|r| r.body.contains("\"user\":\"ann\"")).cloned().unwrap();
    let forged = tessera_core::crypto::hmac_sha256_hex(
        common::KEY.as_bytes(),
        format!("{}.{}", r.header("x-tessera-timestamp").unwrap(), r.body.replace("ann", "eve")).as_bytes(),
    );
    assert_ne!(r.header("x-tessera-signature"), Some(format!("v1={forged}").as_str()));
}

/// Webhooks over https reach a receiver whose certificate the machine trusts (here a
/// test CA given through SSL_CERT_FILE, which the system roots are read from); a URL that
/// is not http(s) is refused at start naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhooks_reach_a_trusted_receiver() {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = common::tempdir();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, made.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(made.signing_key.serialize_der()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![made.cert.der().clone()], key)
        .unwrap();
    let (url, got) = receiver_with(Some(Arc::new(tls)));
    let config = dir.path().join("t.toml");
    std::fs::write(&config, format!("[webrtc]\nbind_ip = \"127.0.0.1\"\n[webhooks]\nurls = [\"{url}\"]\n")).unwrap();
    let s = common::start_with_env(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
        &[("TESSERA_SERVICE_KEY", common::KEY), ("SSL_CERT_FILE", ca.to_str().unwrap())],
    );
    let room = s.new_room(json!({})).await;
    let (_sig, _) = s.join(&room, "ann").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while events_of(&got, &room).len() < 2 {
        assert!(Instant::now() < deadline, "over https so far: {:?}", names(&events_of(&got, &room)));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(names(&events_of(&got, &room))[..2], ["room_started", "participant_joined"]);
    let r = got.lock().unwrap()[0].clone();
    let ts = r.header("x-tessera-timestamp").unwrap();
    let want = format!("v1={}", tessera_core::crypto::hmac_sha256_hex(common::KEY.as_bytes(), format!("{ts}.{}", r.body).as_bytes()));
    assert_eq!(r.header("x-tessera-signature"), Some(want.as_str()));

    let err = common::refused_start("[webhooks]\nurls = [\"ftp://example.invalid/h\"]\n", &[]);
    assert!(err.contains("key `webhooks.urls`") && err.contains("not an http:// or https:// URL"), "{err}");
}
