//! Nodes coordinated over NATS: a real `nats-server` (Debian's, with JetStream) started by
//! the test, Tessera nodes joining it, inside a network namespace of the test's own.

mod common;

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A `nats-server` with JetStream on a free loopback port, stopped when dropped.
struct Nats {
    child: Child,
    host: String,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nats {
    fn start() -> Nats {
        Self::start_at("127.0.0.1")
    }

    /// On `host` (an address of this namespace).
    fn start_at(host: &str) -> Nats {
        let dir = common::tempdir();
        let port = free_port();
        let child = Self::spawn(host, port, &dir);
        Nats { child, host: host.to_string(), port, _dir: dir }
    }

    /// Stops the server; [`Nats::restart`] starts it again on its port and its store.
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.child = Self::spawn(&self.host, self.port, &self._dir);
    }

    fn spawn(host: &str, port: u16, dir: &tempfile::TempDir) -> Child {
        let child = Command::new("nats-server")
            .args(["-a", host, "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is installed (scripts/install-deps.sh --test)");
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect((host, port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    fn url(&self) -> String {
        format!("nats://{}:{}", self.host, self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn nodes(s: &common::Server) -> Value {
    try_nodes(s).await.expect("the node list (200)")
}

/// The node list, or `None` while the node answers 503 (its NATS unreachable).
async fn try_nodes(s: &common::Server) -> Option<Value> {
    let res = s.client().get(s.url("/v1/cluster/nodes")).bearer_auth(common::KEY).timeout(Duration::from_secs(10)).send().await.unwrap();
    match res.status().as_u16() {
        200 => Some(res.json().await.unwrap()),
        503 => None,
        other => panic!("GET /v1/cluster/nodes answered {other}"),
    }
}

fn ids(v: &Value) -> Vec<String> {
    v["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap().to_string()).collect()
}

/// Node `id`'s entry in a node list (`null` if it is not there).
fn node(v: &Value, id: &str) -> Value {
    v["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).cloned().unwrap_or_default()
}

/// Polls the node list (as `s` sees it) until `found` gives something, and returns that;
/// fails after `within` saying it never saw `what`, with the last list.
async fn until_nodes<T>(s: &common::Server, within: Duration, what: &str, found: impl Fn(&Value) -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        let v = nodes(s).await;
        if let Some(t) = found(&v) {
            return t;
        }
        assert!(Instant::now() < deadline, "never saw {what} within {within:?}: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the node list (as `s` sees it) has exactly `want`.
async fn wait_nodes(s: &common::Server, want: &[&str], within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v = try_nodes(s).await;
        if let Some(v) = &v
            && ids(v) == want
        {
            return v.clone();
        }
        assert!(Instant::now() < deadline, "nodes {:?}, wanted {want:?} within {within:?}", v.as_ref().map(ids));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Nodes register with their roles and load, see each other, leave at once on SIGTERM
/// and expire after the TTL on SIGKILL; a node id in use is refused; without a cluster the
/// list holds this node alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_report_and_leave() {
    if !common::in_own_netns("nodes_join_report_and_leave") {
        return;
    }
    // Alone: this node, every role, its id kept in the data folder.
    let (dir, mut alone) = common::start_with_config("[webrtc]\nbind_ip = \"127.0.0.1\"\n");
    let v = nodes(&alone).await;
    let id = std::fs::read_to_string(dir.path().join("data/node.id")).unwrap().trim().to_string();
    assert_eq!(ids(&v), vec![id.clone()]);
    assert_eq!(v["self"], id.as_str());
    assert_eq!(v["nodes"][0]["roles"], serde_json::json!(["portal", "webrtc", "mixer", "recorder"]));
    assert!(alone.terminate());

    let nats = Nats::start();
    let url = nats.url();
    let join = |id: &str| {
        let cfg = format!("[webrtc]\nbind_ip = \"127.0.0.1\"\n[cluster]\nnode_id = \"{id}\"\nregion = \"lab\"\n");
        let (dir, s) = common::start_with_config_args(&cfg, &["--cluster", &url]);
        assert!(s.startup.iter().any(|l| l.contains(&format!("node `{id}` joined the cluster"))), "{:?}", s.startup);
        (dir, s)
    };
    let (_a_dir, mut a) = join("alpha");
    let (_b_dir, mut b) = join("bravo");
    let (_c_dir, mut c) = join("charlie");
    let v = wait_nodes(&a, &["alpha", "bravo", "charlie"], Duration::from_secs(5)).await;
    assert_eq!(v["self"], "alpha");
    for n in v["nodes"].as_array().unwrap() {
        assert_eq!(n["region"], "lab");
        let relay = n["relayAddr"].as_str().unwrap();
        assert!(relay.starts_with("127.0.0.1:") && !relay.ends_with(":0"), "the bound relay socket: {relay}");
        assert_eq!(n["draining"], false);
        assert!(n["load"]["transports"].is_u64(), "{n}");
    }
    // Any node answers with the same list.
    assert_eq!(ids(&nodes(&b).await), ids(&v));

    // Load travels: a participant publishing on bravo shows up in bravo's next report.
    let room = b.new_room(serde_json::json!({})).await;
    let (mut sig, _) = b.join(&room, "p").await;
    let _p = tessera_client::peer::Publisher::start(&mut sig, common::av(1), None).await.unwrap();
    until_nodes(&a, Duration::from_secs(6), "bravo's load show its publisher", |v| {
        let load = &node(v, "bravo")["load"];
        (load["transports"] == 1 && load["publications"].as_u64() >= Some(1)).then_some(())
    })
    .await;

    // The same id twice: refused (after waiting out a TTL in case it was its own crashed
    // predecessor), with the id and the other instance named.
    let cfg = "[webrtc]\nbind_ip = \"127.0.0.1\"\n[cluster]\nnode_id = \"alpha\"\n".to_string();
    let dup_dir = common::tempdir();
    std::fs::write(dup_dir.path().join("t.toml"), &cfg).unwrap();
    let started = Instant::now();
    let out = Command::new(common::bin())
        .args(["serve", "--portal-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0", "--cluster", &url, "--config"])
        .arg(dup_dir.path().join("t.toml"))
        .arg("--data-dir")
        .arg(dup_dir.path().join("data"))
        .env("TESSERA_SERVICE_KEY", common::KEY)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("node id `alpha` is in use by another running node"), "{err}");
    assert!(started.elapsed() >= Duration::from_secs(9), "it waited a TTL first: {:?}", started.elapsed());

    // SIGTERM: gone from the list at once. SIGKILL: gone once its entry expires (10 s).
    assert!(b.terminate());
    wait_nodes(&a, &["alpha", "charlie"], Duration::from_secs(2)).await;
    let killed = Instant::now();
    c.child.kill().unwrap();
    let _ = c.child.wait();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ids(&nodes(&a).await), vec!["alpha", "charlie"], "a killed node stays listed until its entry expires");
    wait_nodes(&a, &["alpha"], Duration::from_secs(12)).await;
    let gone_after = killed.elapsed();
    assert!(gone_after <= Duration::from_secs(13), "{gone_after:?}");
    println!("killed node gone from the list after {gone_after:?}");

    // NATS goes away: the list answers 503 with the reason, the node keeps serving; NATS
    // comes back empty (memory storage): the node registers again by itself.
    let port = nats.port;
    drop(nats);
    let asked = Instant::now();
    let res = a.client().get(a.url("/v1/cluster/nodes")).bearer_auth(common::KEY).timeout(Duration::from_secs(10)).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert!(asked.elapsed() < Duration::from_secs(5), "answered in {:?}", asked.elapsed());
    let body: Value = res.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("node registry is unreachable"), "{body}");
    assert_eq!(a.client().get(a.url("/v1/stats")).bearer_auth(common::KEY).send().await.unwrap().status(), 200);
    let dir = common::tempdir();
    let nats = Nats { child: Nats::spawn("127.0.0.1", port, &dir), host: "127.0.0.1".into(), port, _dir: dir };
    let back = Instant::now();
    wait_nodes(&a, &["alpha"], Duration::from_secs(15)).await;
    println!("registered again {:?} after NATS came back", back.elapsed());

    // A stop with NATS away does not wait for it (recordings and sessions close as usual).
    drop(nats);
    let stopping = Instant::now();
    assert!(a.terminate(), "a clean exit with NATS away");
    assert!(stopping.elapsed() < Duration::from_secs(8), "stopped in {:?}", stopping.elapsed());
}

/// A node refuses to start on a NATS it cannot reach, naming the URL and the reason; and a
/// malformed URL is a config error naming the key.
#[test]
fn bad_nats_url_refuses_to_start() {
    if !common::in_own_netns("bad_nats_url_refuses_to_start") {
        return;
    }
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    for (args, want) in [
        (vec!["--cluster", url.as_str()], format!("cannot connect to NATS at {url}")),
        (vec!["--cluster", "http://127.0.0.1:4222"], "key `cluster.nats_url`: `http://127.0.0.1:4222` is not a nats:// or tls:// URL".to_string()),
    ] {
        let dir = common::tempdir();
        let out = Command::new(common::bin())
            .args(["serve", "--portal-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(&args)
            .env("TESSERA_SERVICE_KEY", common::KEY)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {args:?}");
        assert!(err.contains(&want), "wanted {want:?} in:\n{err}");
    }
}

/// Waits until `s` answers `GET path` with `status`.
async fn wait_status(s: &common::Server, path: &str, status: u16, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let res = s.client().get(s.url(path)).bearer_auth(common::KEY).timeout(Duration::from_secs(10)).send().await.unwrap();
        if res.status().as_u16() == status {
            return res.json().await.unwrap_or(Value::Null);
        }
        assert!(Instant::now() < deadline, "GET {path} never answered {status} (last: {})", res.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST /v1/rooms` on `s` (bounded: NATS may be away).
async fn create_room(s: &common::Server, name: &str) -> reqwest::Response {
    let body = serde_json::json!({"name": name});
    s.client().post(s.url("/v1/rooms")).bearer_auth(common::KEY).json(&body).timeout(Duration::from_secs(15)).send().await.unwrap()
}

/// Logs in at `s`'s portal with `token`: the login result or the portal's error.
async fn login(s: &common::Server, token: &str) -> Result<Value, String> {
    joined(s, token).await.map(|(_, info)| info)
}

/// Like [`login`], keeping the connection.
async fn joined(s: &common::Server, token: &str) -> Result<(tessera_client::signaling::Signaling, Value), String> {
    let mut sig = tessera_client::signaling::Signaling::connect(&s.portal).await.unwrap();
    let login = serde_json::json!({"token": token, "userAgent": {"sdk": {"type": "Rust", "version": "1"}}, "protocol": "1.2"});
    let info = sig.ok("login", Some(login)).await.map_err(|e| e.to_string())?;
    Ok((sig, info))
}

/// Rooms, tokens, the service key and the ticket key are the cluster's: a room made or
/// changed on one node is the same on the others, names are unique cluster-wide, a token
/// from one node's REST API logs in on another node's portal once and nowhere else, a
/// node without a key takes the cluster's and one with another key is refused. With NATS
/// away, rooms still read (and participants join rooms they know) but changes and logins
/// fail with a clear error; NATS back (with its disk), everything is there and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_tokens_and_keys_are_shared() {
    if !common::in_own_netns("rooms_tokens_and_keys_are_shared") {
        return;
    }
    let mut nats = Nats::start();
    let url = nats.url();
    let cfg = "[webrtc]\nbind_ip = \"127.0.0.1\"\n";
    // The first node has rooms of its own from before the cluster: they seed it.
    let (a_dir, mut a) = common::start_with_config(cfg);
    let early = a.new_room(serde_json::json!({})).await;
    assert!(a.terminate());
    let a = common::start(&a_dir.path().join("data"), &["--config", a_dir.path().join("t.toml").to_str().unwrap(), "--cluster", &url]);
    let (_b_dir, b) = common::start_with_config_args(cfg, &["--cluster", &url]);
    wait_status(&b, &format!("/v1/rooms/{early}"), 200, Duration::from_secs(1)).await;

    // Made on one node, seen on the other; changed there, seen back.
    let room = a.new_room(serde_json::json!({"participantLimit": 5})).await;
    let started = Instant::now();
    let seen = wait_status(&b, &format!("/v1/rooms/{room}"), 200, Duration::from_secs(2)).await;
    println!("a room made on one node was seen on another after {:?}", started.elapsed());
    assert_eq!(seen["participantLimit"], 5);
    let res = b
        .client()
        .put(b.url(&format!("/v1/rooms/{room}")))
        .bearer_auth(common::KEY)
        .json(&serde_json::json!({"participantLimit": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(2);
    while wait_status(&a, &format!("/v1/rooms/{room}"), 200, Duration::from_secs(1)).await["participantLimit"] != 7 {
        assert!(Instant::now() < deadline, "the change made on b never reached a");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Names are unique across the cluster.
    let name = seen["name"].as_str().unwrap().to_string();
    let res = b.client().post(b.url("/v1/rooms")).bearer_auth(common::KEY).json(&serde_json::json!({"name": name})).send().await.unwrap();
    assert_eq!(res.status(), 409);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["message"], format!("a room named `{name}` exists"));
    let listed: Value = b.client().get(b.url("/v1/rooms")).bearer_auth(common::KEY).send().await.unwrap().json().await.unwrap();
    let listed: Vec<&str> = listed.as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    // (Node b may make the default room `dev` while a seeds the cluster: it may come between.)
    let at = |id: &str| listed.iter().position(|r| *r == id);
    assert!(at(&early).is_some_and(|e| Some(e) < at(&room)) && listed.last() == Some(&room.as_str()), "creation order: {listed:?}");

    // A token from a's REST API logs in at b's portal, once; then nowhere.
    let token = a.token(&room, "ann", "presenter").await;
    let info = login(&b, &token).await.expect("a's token logs in at b");
    assert_eq!(info["user"], "ann");
    for s in [&a, &b] {
        let err = login(s, &token).await.unwrap_err();
        assert!(err.contains("Token already used"), "{err}");
    }

    // A node without a key takes the cluster's (and keeps it for the CLI); one configured
    // with another key is refused, naming the key.
    let c_dir = common::tempdir();
    std::fs::write(c_dir.path().join("t.toml"), cfg).unwrap();
    let c = common::start_with_env(&c_dir.path().join("data"), &["--config", c_dir.path().join("t.toml").to_str().unwrap(), "--cluster", &url], &[]);
    assert_eq!(std::fs::read_to_string(c_dir.path().join("data/service.key")).unwrap().trim(), common::KEY);
    assert!(c.startup.iter().any(|l| l.contains("uses the cluster's service key")), "{:?}", c.startup);
    wait_status(&c, &format!("/v1/rooms/{room}"), 200, Duration::from_secs(1)).await;
    let out = Command::new(common::bin())
        .args(["serve", "--portal-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0", "--cluster", &url, "--config"])
        .arg(c_dir.path().join("t.toml"))
        .arg("--data-dir")
        .arg(c_dir.path().join("other"))
        .env("TESSERA_SERVICE_KEY", "another-service-key-0123456789")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("`service.key` (or TESSERA_SERVICE_KEY) differs from the service key of the cluster"), "{err}");
    drop(c);

    // Deleted on one node, gone on the other.
    assert_eq!(a.client().delete(a.url(&format!("/v1/rooms/{early}"))).bearer_auth(common::KEY).send().await.unwrap().status(), 200);
    wait_status(&b, &format!("/v1/rooms/{early}"), 404, Duration::from_secs(2)).await;

    // NATS away: reads answer from each node's copy; a change answers 503 within seconds
    // and a login fails with the reason, leaving the token unspent.
    let spare = a.token(&room, "bob", "presenter").await;
    nats.stop();
    wait_status(&b, &format!("/v1/rooms/{room}"), 200, Duration::from_secs(1)).await;
    let asked = Instant::now();
    let res = create_room(&a, "while-away").await;
    assert_eq!(res.status(), 503);
    assert!(asked.elapsed() < Duration::from_secs(8), "answered in {:?}", asked.elapsed());
    let err = login(&b, &spare).await.unwrap_err();
    assert!(err.contains("Login unavailable, retry later"), "{err}");

    // NATS back with its disk: the rooms are there, changes work, the unspent token logs in.
    nats.restart();
    let back = Instant::now();
    let deadline = back + Duration::from_secs(15);
    loop {
        let res = create_room(&a, "after-return").await;
        if res.status() == 200 {
            let made: Value = res.json().await.unwrap();
            wait_status(&b, &format!("/v1/rooms/{}", made["id"].as_str().unwrap()), 200, Duration::from_secs(5)).await;
            break;
        }
        assert!(Instant::now() < deadline, "room changes never worked again: {}", res.status());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!("room changes worked again {:?} after NATS came back", back.elapsed());
    assert_eq!(login(&b, &spare).await.expect("the unspent token logs in")["user"], "bob");
    // What was refused while NATS was away did not happen later.
    let listed: Value = a.client().get(a.url("/v1/rooms")).bearer_auth(common::KEY).send().await.unwrap().json().await.unwrap();
    assert!(listed.as_array().unwrap().iter().all(|r| r["name"] != "while-away"), "{listed}");
    wait_status(&b, &format!("/v1/rooms/{room}"), 200, Duration::from_secs(1)).await;
}

/// Roles on separate nodes: a portal-only node places its room on a node running the
/// SFU, mixer and recorder, and drives them over NATS. A publisher and a subscriber join
/// through the portal; the media flows through the other node; the room's mixed stream
/// (made there) plays; a recording made there decodes and downloads through the portal,
/// during and after the meeting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_drives_media_on_another_node() {
    if !common::in_own_netns("portal_drives_media_on_another_node") {
        return;
    }
    let nats = Nats::start();
    let url = nats.url();
    // The media node has an address of its own: clients must reach it, not the portal.
    let media_cfg = "[webrtc]\nbind_ip = \"127.0.0.2\"\n[cluster]\nnode_id = \"media1\"\nroles = [\"webrtc\", \"mixer\", \"recorder\"]\n";
    let (media_dir, media) = common::start_with_config_args(media_cfg, &["--cluster", &url]);
    assert!(media.startup.iter().any(|l| l.contains("node `media1` serves webrtc,mixer,recorder (no portal)")), "{:?}", media.startup);
    let portal_cfg = "[cluster]\nnode_id = \"portal1\"\nroles = [\"portal\"]\n";
    let (_portal_dir, p) = common::start_with_config_args(portal_cfg, &["--cluster", &url]);
    let v = wait_nodes(&p, &["media1", "portal1"], Duration::from_secs(5)).await;
    let roles = |id: &str| v["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).unwrap()["roles"].clone();
    assert_eq!(roles("portal1"), serde_json::json!(["portal"]));
    assert_eq!(roles("media1"), serde_json::json!(["webrtc", "mixer", "recorder"]));
    let media_node = v["nodes"].as_array().unwrap().iter().find(|n| n["id"] == "media1").unwrap().clone();
    let relay = media_node["relayAddr"].as_str().unwrap();
    assert!(relay.starts_with("127.0.0.2:") && !relay.ends_with(":0"), "the bound relay socket: {relay}");

    let room = p.new_room(serde_json::json!({})).await;
    let (mut psig, _) = p.join(&room, "pub").await;
    let (publisher, sender) = publish_sending(&mut psig, 1, 120).await;
    // The forward stream, through the media node.
    let (mut ssig, _) = p.join(&room, "sub").await;
    let sub = tessera_client::peer::Subscriber::start(&mut ssig, &publisher.stream_id, true, true, false).await.unwrap();
    sub.wait_until("video from the media node", Duration::from_secs(5), |r| r.iter().filter(|p| p.kind == "video").count() > 30).await.unwrap();
    let tagged = sub.packets("video").iter().filter(|p| tessera_client::peer::Marker::find(&p.payload).is_some_and(|m| m.tag == 1)).count();
    assert!(tagged > 30, "the publisher's own payloads arrive ({tagged})");
    let stats: Value = p.client().get(p.url("/v1/stats")).bearer_auth(common::KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(stats["media"]["transports"], 2, "the media node's counts, asked over NATS: {stats}");

    // The room's mixed stream, made on the media node.
    let (mut vsig, _) = p.join(&room, "viewer").await;
    let mixed = tessera_client::peer::Subscriber::start(&mut vsig, &format!("{room}-common"), true, true, false).await.unwrap();
    mixed.wait_until("mixed video", Duration::from_secs(8), |r| r.iter().filter(|p| p.kind == "video").count() > 20).await.unwrap();

    // A recording, made on the media node, in its data folder.
    let body = serde_json::json!({"container": "mkv", "media": {"audio": {"from": publisher.stream_id}, "video": {"from": publisher.stream_id}}});
    let res = p.client().post(p.url(&format!("/v1/rooms/{room}/recordings"))).bearer_auth(common::KEY).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let rec: Value = res.json().await.unwrap();
    let file = std::path::PathBuf::from(rec["storage"]["file"].as_str().unwrap());
    assert!(file.starts_with(media_dir.path()), "{}", file.display());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let res = p
        .client()
        .delete(p.url(&format!("/v1/rooms/{room}/recordings/{}", rec["id"].as_str().unwrap())))
        .bearer_auth(common::KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let out = Command::new("gst-discoverer-1.0").arg(&file).output().expect("gst-discoverer-1.0 (gstreamer1.0-tools)");
    let report = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(report.contains("vp8") && report.contains("opus"), "{report}");
    // Downloaded through the portal: the media node's file, byte for byte, read over NATS.
    let res = p
        .client()
        .get(p.url(&format!("/v1/rooms/{room}/recordings/{}/file", rec["id"].as_str().unwrap())))
        .bearer_auth(common::KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "video/x-matroska");
    let downloaded = res.bytes().await.unwrap();
    let on_disk = std::fs::read(&file).unwrap();
    assert!(on_disk.len() > tessera_core::command::MAX_RECORDING_CHUNK as usize, "a recording larger than one chunk: {} bytes", on_disk.len());
    assert!(downloaded[..] == on_disk[..], "downloaded {} bytes, the file has {}", downloaded.len(), on_disk.len());
    let res = p.client().get(p.url(&format!("/v1/rooms/{room}/recordings/nope/file"))).bearer_auth(common::KEY).send().await.unwrap();
    assert_eq!(res.status(), 404);

    // NATS away for 10 s is in `three_nodes_on_a_bridge`.
    sender.abort();

    // After the meeting (everyone left, the room no longer placed anywhere) the recording
    // still downloads through the portal, from the node that made it.
    for sig in [&mut psig, &mut ssig, &mut vsig] {
        sig.ok("logout", None).await.unwrap();
    }
    until_nodes(&p, Duration::from_secs(10), "the room end on media1", |v| {
        let load = &node(v, "media1")["load"];
        (load["transports"] == 0 && load["views"] == 0).then_some(())
    })
    .await;
    let res = p
        .client()
        .get(p.url(&format!("/v1/rooms/{room}/recordings/{}/file", rec["id"].as_str().unwrap())))
        .bearer_auth(common::KEY)
        .send()
        .await
        .unwrap();
    let status = res.status();
    let body = res.bytes().await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body[..body.len().min(300)]));
    assert!(body[..] == on_disk[..], "the download after the meeting differs from the file");
    drop(media);
}

/// Roles other than all of them need a cluster; a relay address must be one.
#[test]
fn roles_need_a_cluster() {
    for (cfg, key, want) in [
        ("[cluster]\nroles = [\"portal\"]\n", "cluster.roles", "a server without a cluster (cluster.nats_url) runs every role"),
        ("[cluster]\nroles = [\"sfu\"]\n", "cluster.roles", "`sfu` is not a role"),
        ("[cluster]\nrelay_addr = \"relay.example\"\n", "cluster.relay_addr", "`relay.example` is not an IP address or IP:port"),
    ] {
        let err = common::refused_start(cfg, &[]);
        assert!(err.contains(key) && err.contains(want), "{cfg}: {err}");
    }
}

/// The mixer and recorder on a node without the SFU: the room's sessions are on node 1
/// (portal + webrtc), its mixed view and recording on node 3 (mixer + recorder). The
/// publisher's stream crosses to node 3 over the media relay (authenticated), the mixed
/// stream made there crosses back to node 1's SFU for its subscriber: red and 440 Hz in,
/// red and 440 Hz out. The recording made on node 3 from the relayed stream decodes and
/// downloads through node 1's portal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixer_and_recorder_take_streams_over_the_relay() {
    if !common::in_own_netns("mixer_and_recorder_take_streams_over_the_relay") {
        return;
    }
    let nats = Nats::start();
    let url = nats.url();
    let n3_cfg = "[cluster]\nnode_id = \"n3\"\nroles = [\"mixer\", \"recorder\"]\nrelay_addr = \"127.0.0.3\"\nrelay_auth = true\n";
    let (n3_dir, n3) = common::start_with_config_args(n3_cfg, &["--cluster", &url]);
    assert!(n3.startup.iter().any(|l| l.contains("media relay on 127.0.0.3:") && l.contains("(authenticated)")), "{:?}", n3.startup);
    let n1_cfg = "[webrtc]\nbind_ip = \"127.0.0.1\"\n[cluster]\nnode_id = \"n1\"\nroles = [\"portal\", \"webrtc\"]\nrelay_auth = true\n";
    let (_n1_dir, p) = common::start_with_config_args(n1_cfg, &["--cluster", &url]);
    let v = wait_nodes(&p, &["n1", "n3"], Duration::from_secs(5)).await;
    let relay_of = |id: &str| v["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).unwrap()["relayAddr"].as_str().unwrap().to_string();
    assert!(relay_of("n3").starts_with("127.0.0.3:"), "{v}");
    assert!(relay_of("n1").starts_with("127.0.0.1:"), "{v}");

    // The view has a lower layer too (`video.layers`).
    let room = p.new_room(serde_json::json!({"views": [{"label": "common", "video": {"layers": ["x1/2"]}}]})).await;
    let (mut psig, _) = p.join(&room, "pub").await;
    let publisher = std::sync::Arc::new(tessera_client::peer::Publisher::start(&mut psig, common::av(1), None).await.unwrap());
    let _source = tessera_client::media::live_source(publisher.clone(), (255, 0, 0), 440).unwrap();

    // The mixed stream, made on n3 from the relayed publication, relayed back to n1's SFU.
    let (mut vsig, _) = p.join(&room, "viewer").await;
    let mixed = tessera_client::peer::Subscriber::start(&mut vsig, &format!("{room}-common"), true, true, false).await.unwrap();
    let started = Instant::now();
    let frames = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let packets = mixed.received.lock().unwrap().clone();
        let frames = tessera_client::media::decode_vp8(&packets).unwrap();
        let red = |f: &tessera_client::media::Frame| {
            let (r, g, b) = f.around(f.width / 2, f.height / 2);
            r > 150 && g < 90 && b < 90
        };
        // On auto it may start on the half layer while n1 learns the layers (the first
        // to arrive over the relay), then it moves up.
        if frames.len() > 10 && frames.last().is_some_and(|f| red(f) && (f.width, f.height) == (640, 480)) {
            break (frames, packets);
        }
        if started.elapsed() > Duration::from_secs(15) {
            let f = frames.last().map(|f| f.around(f.width / 2, f.height / 2));
            panic!("no red mixed picture from n3: {} frames, last centre {f:?}; n3:\n{}", frames.len(), n3.stderr.lock().unwrap());
        }
    };
    println!("mixed picture from n3 after {:?}", started.elapsed());
    let (frames, packets) = frames;
    let last = frames.last().unwrap();
    assert_eq!((last.width, last.height), (640, 480));
    let pcm = tessera_client::media::decode_opus(&packets).unwrap();
    let (p440, p1000) = (tessera_client::media::tone_power(&pcm, 440.0, 48000.0), tessera_client::media::tone_power(&pcm, 1000.0, 48000.0));
    assert!(pcm.len() > 9600 && p440 > 20.0 * p1000, "the publisher's 440 Hz in the mix: {p440} vs {p1000} ({} samples)", pcm.len());
    // The view's half layer, by its RID, relayed from n3 as a simulcast layer is.
    let half = tessera_client::peer::Subscriber::start_video(&mut vsig, &format!("{room}-common-video-x1_2"), Value::Null).await.unwrap();
    let took = common::mix::wait_for_mix(&half, Duration::from_secs(10), "a red 320x240 picture of the half layer", |f| {
        (f.width, f.height) == (320, 240) && common::mix::is(f.around(f.width / 2, f.height / 2), "red")
    })
    .await;
    println!("the mix's half layer from n3 after {took:?}");

    // A recording of the forward stream, made on n3 from the relayed packets.
    let body = serde_json::json!({"container": "mkv", "media": {"audio": {"from": publisher.stream_id}, "video": {"from": publisher.stream_id}}});
    let res = p.client().post(p.url(&format!("/v1/rooms/{room}/recordings"))).bearer_auth(common::KEY).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let rec: Value = res.json().await.unwrap();
    let file = std::path::PathBuf::from(rec["storage"]["file"].as_str().unwrap());
    assert!(file.starts_with(n3_dir.path()), "{}", file.display());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let path = format!("/v1/rooms/{room}/recordings/{}", rec["id"].as_str().unwrap());
    let res = p.client().delete(p.url(&path)).bearer_auth(common::KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let out = Command::new("gst-discoverer-1.0").arg(&file).output().expect("gst-discoverer-1.0 (gstreamer1.0-tools)");
    let report = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(report.contains("vp8") && report.contains("opus"), "{report}");
    let duration = report.lines().find(|l| l.contains("duration:")).unwrap_or_default().to_string();
    assert!(duration.contains("0:00:02") || duration.contains("0:00:03"), "about 3 s recorded: {duration}");
    let res = p.client().get(p.url(&format!("{path}/file"))).bearer_auth(common::KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.bytes().await.unwrap()[..] == std::fs::read(&file).unwrap()[..], "downloaded through n1's portal");

    // Everyone leaves: the view stops, and the relayed streams are released on both sides.
    for sig in [&mut psig, &mut vsig] {
        sig.ok("logout", None).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = n3.stderr.lock().unwrap().clone();
        if log.contains("imported stream released") && log.contains("export ended") {
            break;
        }
        assert!(Instant::now() < deadline, "n3 did not release its relayed streams:\n{log}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(n3);
}

/// A mixer on a node without the SFU takes a simulcast input's layers as a local one does:
/// the lowest layer that fills the input's region (the relay carries one layer, the one the
/// mixer node's consumers agree on, chosen at the origin).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mixer_node_mixes_the_layer_that_fills_the_region() {
    use common::mix::{is, quadrants, wait_for_mix};
    use tessera_client::media::Frame;
    use tessera_client::simulcast::{SimulcastPublisher, THREE_LAYERS};
    if !common::in_own_netns("a_mixer_node_mixes_the_layer_that_fills_the_region") {
        return;
    }
    let nats = Nats::start();
    let url = nats.url();
    let n3_cfg = "[cluster]\nnode_id = \"n3\"\nroles = [\"mixer\"]\nrelay_addr = \"127.0.0.3\"\n";
    let (_n3_dir, _n3) = common::start_with_config_args(n3_cfg, &["--cluster", &url]);
    let n1_cfg = "[webrtc]\nbind_ip = \"127.0.0.1\"\n[cluster]\nnode_id = \"n1\"\nroles = [\"portal\", \"webrtc\"]\n";
    let (_n1_dir, p) = common::start_with_config_args(n1_cfg, &["--cluster", &url]);
    wait_nodes(&p, &["n1", "n3"], Duration::from_secs(5)).await;

    // Layers q 160×120 blue, h 320×240 green, f 640×480 red; the view is 640×480.
    let room = p.new_room(serde_json::json!({})).await;
    let (mut psig, _) = p.join(&room, "layers").await;
    let _layers = SimulcastPublisher::start(&mut psig, &THREE_LAYERS).await.unwrap();
    let (mut vsig, _) = p.join(&room, "viewer").await;
    let sub = tessera_client::peer::Subscriber::start(&mut vsig, &format!("{room}-common"), false, true, false).await.unwrap();
    let centre = |f: &Frame| f.around(f.width / 2, f.height / 2);
    // Alone, it fills the view: only f covers 640×480.
    let t = wait_for_mix(&sub, Duration::from_secs(10), "alone, from f", |f| is(centre(f), "red")).await;
    println!("alone: f after {t:?}");
    // A second input: the 2×2 template, a quarter (320×240) each, which h fills.
    let (mut ysig, _) = p.join(&room, "yellow").await;
    let y = std::sync::Arc::new(tessera_client::peer::Publisher::start(&mut ysig, common::av(2), None).await.unwrap());
    let y_src = tessera_client::media::live_source(y.clone(), (255, 255, 0), 1000).unwrap();
    let t = wait_for_mix(&sub, Duration::from_secs(8), "in a quarter, from h", |f| {
        let q = quadrants(f);
        is(q[0], "green") && is(q[1], "yellow")
    })
    .await;
    println!("in a quarter: h after {t:?}");
    // Alone again: back to f.
    y.stop(&mut ysig).await.unwrap();
    drop(y_src);
    let t = wait_for_mix(&sub, Duration::from_secs(8), "alone again, from f", |f| is(centre(f), "red")).await;
    println!("alone again: f after {t:?}");
}

/// Media nodes m1 (127.0.0.2) and m2 (127.0.0.3), each with `extra` at the head of its
/// config, and a portal-only node p, on the NATS at `url`, once all three are listed.
async fn two_media_nodes_and_a_portal(url: &str, extra: &str) -> [(tempfile::TempDir, common::Server); 3] {
    let media = |id: &str, ip: &str| {
        let cfg = format!("{extra}[webrtc]\nbind_ip = \"{ip}\"\n[cluster]\nnode_id = \"{id}\"\nroles = [\"webrtc\", \"mixer\", \"recorder\"]\n");
        common::start_with_config_args(&cfg, &["--cluster", url])
    };
    let (m1, m2) = (media("m1", "127.0.0.2"), media("m2", "127.0.0.3"));
    let p = common::start_with_config_args("[cluster]\nnode_id = \"p\"\nroles = [\"portal\"]\n", &["--cluster", url]);
    wait_nodes(&p.1, &["m1", "m2", "p"], Duration::from_secs(5)).await;
    [m1, m2, p]
}

/// The node whose report shows at least `transports` transports (within 6 s).
async fn node_with_transports(p: &common::Server, transports: u64) -> String {
    until_nodes(p, Duration::from_secs(6), &format!("a node with {transports} transports"), |v| {
        let busy = v["nodes"].as_array().unwrap().iter().find(|n| n["load"]["transports"].as_u64() >= Some(transports));
        busy.map(|n| n["id"].as_str().unwrap().to_string())
    })
    .await
}

/// A media node dies (SIGKILL): once NATS has said for 2 s that it is gone, the portal tells the
/// room's participants their transports failed and removes the streams; publishing and
/// subscribing again places the room on the surviving media node, and media flows (the
/// forward stream, and the room's mixed stream made anew there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_media_node_is_replaced() {
    if !common::in_own_netns("a_dead_media_node_is_replaced") {
        return;
    }
    let nats = Nats::start();
    let [(_d1, m1), (_d2, m2), (_dp, p)] = two_media_nodes_and_a_portal(&nats.url(), "").await;

    let room = p.new_room(serde_json::json!({})).await;
    let (mut psig, _) = p.join(&room, "pub").await;
    let publisher = tessera_client::peer::Publisher::start(&mut psig, common::av(1), None).await.unwrap();
    let (mut ssig, _) = p.join(&room, "sub").await;
    let sub = tessera_client::peer::Subscriber::start(&mut ssig, &publisher.stream_id, true, true, false).await.unwrap();
    let send = |p: std::sync::Arc<tessera_client::peer::Publisher>| tokio::spawn(async move { p.send_for(Duration::from_secs(20), 30, 1000).await });
    let publisher = std::sync::Arc::new(publisher);
    let _sending = send(publisher.clone());
    sub.wait_until("video", Duration::from_secs(5), |r| r.iter().filter(|p| p.kind == "video").count() > 20).await.unwrap();

    // Which node carries the room: the one whose report shows the transports.
    let busy = node_with_transports(&p, 2).await;
    let (mut dead, survivor) = if busy == "m1" { (m1, m2) } else { (m2, m1) };
    let killed = Instant::now();
    dead.child.kill().unwrap();
    let _ = dead.child.wait();

    // The subscriber is told its transport failed, and the stream is removed.
    let failed = ssig.wait_for("transport error", Duration::from_secs(10), |n| n.event == "progress" && n.data["status"] == "error").await.unwrap();
    assert_eq!(failed.data["data"], format!("webrtc node `{busy}` is gone"));
    ssig.wait_for("stream removed", Duration::from_secs(2), |n| {
        n.event == "stream" && n.data["status"] == "remove" && n.data["id"] == publisher.stream_id.as_str()
    })
    .await
    .unwrap();
    println!("participants told {:?} after the media node was killed", killed.elapsed());

    // Again: placed on the survivor, media within 5 s of subscribing.
    let again = std::sync::Arc::new(tessera_client::peer::Publisher::start(&mut psig, common::av(2), None).await.unwrap());
    let _sending = send(again.clone());
    let resubscribed = Instant::now();
    let sub = tessera_client::peer::Subscriber::start(&mut ssig, &again.stream_id, true, true, false).await.unwrap();
    sub.wait_until("video again", Duration::from_secs(5), |r| r.iter().filter(|p| p.kind == "video").count() > 20).await.unwrap();
    println!("media again {:?} after resubscribing", resubscribed.elapsed());
    let (mut vsig, _) = p.join(&room, "viewer").await;
    let mixed = tessera_client::peer::Subscriber::start(&mut vsig, &format!("{room}-common"), true, true, false).await.unwrap();
    mixed.wait_until("mixed video again", Duration::from_secs(8), |r| r.iter().filter(|p| p.kind == "video").count() > 20).await.unwrap();
    let survivor_id = if busy == "m1" { "m2" } else { "m1" };
    until_nodes(&p, Duration::from_secs(5), "the survivor report the room", |v| {
        let load = &node(v, survivor_id)["load"];
        (load["transports"].as_u64() >= Some(3) && load["views"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    drop(survivor);
}

/// A media node told to stop with a drain timeout (SIGTERM, `server.drain_timeout_secs`)
/// is reported draining, gets no new room, keeps its running media until its participants
/// leave, and then exits by itself, long before the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_media_node_finishes_its_rooms_then_stops() {
    if !common::in_own_netns("a_draining_media_node_finishes_its_rooms_then_stops") {
        return;
    }
    let nats = Nats::start();
    let [(_d1, m1), (_d2, m2), (_dp, p)] = two_media_nodes_and_a_portal(&nats.url(), "[server]\ndrain_timeout_secs = 60\n").await;

    let room = p.new_room(serde_json::json!({})).await;
    let (mut psig, _) = p.join(&room, "pub").await;
    let (publisher, sending) = publish_sending(&mut psig, 1, 60).await;
    let (mut ssig, _) = p.join(&room, "sub").await;
    let sub = tessera_client::peer::Subscriber::start(&mut ssig, &publisher.stream_id, true, true, false).await.unwrap();
    sub.wait_until("video", Duration::from_secs(5), |r| r.iter().filter(|p| p.kind == "video").count() > 20).await.unwrap();
    let busy = node_with_transports(&p, 2).await;
    let busy = busy.as_str();
    let other = if busy == "m1" { "m2" } else { "m1" };
    let (mut draining, _rest) = if busy == "m1" { (m1, m2) } else { (m2, m1) };
    let _ = Command::new("kill").arg("-TERM").arg(draining.child.id().to_string()).status();

    // Reported draining within a heartbeat or two.
    until_nodes(&p, Duration::from_secs(6), &format!("{busy} report draining"), |v| (node(v, busy)["draining"] == true).then_some(())).await;
    // A new room goes to the other node.
    let room2 = p.new_room(serde_json::json!({})).await;
    let (mut qsig, _) = p.join(&room2, "pub2").await;
    let _second = tessera_client::peer::Publisher::start(&mut qsig, common::av(2), None).await.unwrap();
    let v = until_nodes(&p, Duration::from_secs(6), &format!("the new room reach {other}"), |v| {
        (node(v, other)["load"]["transports"].as_u64() >= Some(1)).then(|| v.clone())
    })
    .await;
    assert_eq!(node(&v, busy)["load"]["transports"], 2, "nothing new on the draining node: {v}");
    // The running room goes on, and the node stays up meanwhile.
    let before = sub.packets("video").len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(sub.packets("video").len() > before + 40, "video went on while draining");
    assert!(draining.child.try_wait().unwrap().is_none(), "the draining node stopped before its room ended");

    // Its participants leave: it stops by itself, cleanly.
    sending.abort();
    ssig.ok("logout", None).await.unwrap();
    psig.ok("logout", None).await.unwrap();
    let left = Instant::now();
    let status = loop {
        if let Some(status) = draining.child.try_wait().unwrap() {
            break status;
        }
        assert!(left.elapsed() < Duration::from_secs(20), "the drained node did not stop after its participants left");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.success(), "{status:?}");
    println!("the drained node stopped {:?} after its last participants left", left.elapsed());
    // It left the cluster (ids listed in order).
    wait_nodes(&p, &[other, "p"], Duration::from_secs(5)).await;
}

/// Waits until node `id` reports `transports` WebRTC transports (within 6 s).
async fn wait_transports(p: &common::Server, id: &str, transports: u64) {
    until_nodes(p, Duration::from_secs(6), &format!("node {id} report {transports} transports"), |v| {
        (node(v, id)["load"]["transports"].as_u64() == Some(transports)).then_some(())
    })
    .await;
}

/// Publishes synthetic audio and video tagged `tag` on `sig` and sends for `secs` (30
/// frames/s of 1000 bytes); the task ends early if the connection goes.
async fn publish_sending(
    sig: &mut tessera_client::signaling::Signaling,
    tag: u32,
    secs: u64,
) -> (std::sync::Arc<tessera_client::peer::Publisher>, tokio::task::JoinHandle<()>) {
    let publisher = std::sync::Arc::new(tessera_client::peer::Publisher::start(sig, common::av(tag), None).await.unwrap());
    let pb = publisher.clone();
    let sending = tokio::spawn(async move {
        let _ = pb.send_for(Duration::from_secs(secs), 30, 1000).await;
    });
    (publisher, sending)
}

/// One value of `/metrics` (a series without labels).
async fn metric(s: &common::Server, name: &str) -> f64 {
    let text = s.client().get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// A room over two webrtc nodes (`room_spread = 0`: each transport on the least-used
/// node): the publisher on n1, subscribers on n2 get its payloads byte for byte over the
/// media relay, which carries the stream once however many subscribers n2 has. (A node's
/// death is in `three_nodes_on_a_bridge`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_spreads_over_webrtc_nodes() {
    if !common::in_own_netns("a_room_spreads_over_webrtc_nodes") {
        return;
    }
    let nats = Nats::start();
    let [_n2, (_n1_dir, p)] = two_webrtc_nodes(&nats.url()).await;

    let room = p.new_room(serde_json::json!({"views": []})).await;
    let (mut psig, _) = p.join(&room, "pub").await;
    let (publisher, _sending) = publish_sending(&mut psig, 7, 120).await;
    // Each transport goes to the least-used node, once the last one shows in the reports.
    wait_transports(&p, "n1", 1).await;
    let subscribe = |name: &'static str| {
        let (p, room, stream) = (&p, room.clone(), publisher.stream_id.clone());
        async move {
            let (mut sig, _) = p.join(&room, name).await;
            let sub = tessera_client::peer::Subscriber::start(&mut sig, &stream, true, true, false).await.unwrap();
            (sig, sub)
        }
    };
    let (_asig, a) = subscribe("a").await;
    wait_transports(&p, "n2", 1).await;
    let (_bsig, b) = subscribe("b").await;
    wait_transports(&p, "n1", 2).await;
    let (_csig, c) = subscribe("c").await;
    wait_transports(&p, "n2", 2).await;
    let tagged = |s: &tessera_client::peer::Subscriber| {
        s.packets("video").iter().filter(|p| tessera_client::peer::Marker::find(&p.payload).is_some_and(|m| m.tag == 7)).count()
    };
    for (name, s) in [("a (n2)", &a), ("b (n1)", &b), ("c (n2)", &c)] {
        s.wait_until(name, Duration::from_secs(5), |r| r.iter().filter(|p| p.kind == "video").count() > 30).await.unwrap();
        assert!(tagged(s) > 30, "{name} gets the publisher's own payloads ({})", tagged(s));
    }
    // The stream crosses once: n1 exports its two tracks, not two per subscriber on n2.
    assert_eq!(metric(&p, "tessera_relay_exported_tracks").await, 2.0);
    assert!(metric(&p, "tessera_relay_packets_sent_total").await > 60.0);
}

/// Webrtc nodes n2 (127.0.0.2, `/metrics` on `server.metrics_addr`) and n1 (127.0.0.1, with
/// the portal; `room_spread = 0`: each transport on the least-used node, n1 on a tie) on the
/// NATS at `url`, once both are listed.
async fn two_webrtc_nodes(url: &str) -> [(tempfile::TempDir, common::Server); 2] {
    let n2_cfg = "[server]\nmetrics_addr = \"127.0.0.2:0\"\n[webrtc]\nbind_ip = \"127.0.0.2\"\n[cluster]\nnode_id = \"n2\"\nroles = [\"webrtc\"]\n";
    let n2 = common::start_with_config_args(n2_cfg, &["--cluster", url]);
    let n1_cfg = "[webrtc]\nbind_ip = \"127.0.0.1\"\n[cluster]\nnode_id = \"n1\"\nroles = [\"portal\", \"webrtc\"]\nroom_spread = 0\n";
    let n1 = common::start_with_config_args(n1_cfg, &["--cluster", url]);
    wait_nodes(&n1.1, &["n1", "n2"], Duration::from_secs(5)).await;
    [n2, n1]
}

/// A room without views and a webrtc-rs publisher of three VP8 layers in it (160×120 blue,
/// 320×240 green, 640×480 red), its transport on n1.
async fn simulcast_room(
    p: &common::Server,
    held: &[&str],
) -> (String, tessera_client::signaling::Signaling, tessera_client::simulcast::SimulcastPublisher) {
    use tessera_client::simulcast::{SimulcastPublisher, THREE_LAYERS};
    let room = p.new_room(serde_json::json!({"views": []})).await;
    let (mut psig, _) = p.join(&room, "pub").await;
    let publisher = SimulcastPublisher::start_holding(&mut psig, &THREE_LAYERS, held).await.unwrap();
    wait_transports(p, "n1", 1).await;
    (room, psig, publisher)
}

/// A simulcast stream published on n1 crosses to n2 layer by layer, so subscribers on n2
/// choose their layer as they would on n1: by RID, by resolution or `auto`, switch at a
/// keyframe with their numbering continuous, and move off a layer that stops at the
/// publisher and back when it returns. (`room_spread = 0`: transports alternate between
/// the nodes, n2 first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simulcast_layers_are_chosen_on_another_node() {
    use common::layers::{check_layered_video, runs, wait_for_picture};
    use tessera_client::peer::Subscriber;
    if !common::in_own_netns("simulcast_layers_are_chosen_on_another_node") {
        return;
    }
    const Q: (usize, usize, &str) = (160, 120, "blue");
    const H: (usize, usize, &str) = (320, 240, "green");
    const F: (usize, usize, &str) = (640, 480, "red");
    let nats = Nats::start();
    let [(_n2_dir, n2), (_n1_dir, p)] = two_webrtc_nodes(&nats.url()).await;

    let (room, _psig, publisher) = simulcast_room(&p, &[]).await;
    let layer = |rid: &str| format!("{}-video-{rid}", publisher.stream_id);
    // Every layer's keyframe seen at the origin (their sizes rank them).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (mut ssig, _) = p.join(&room, "sub").await;
    let resolution = |w: u32, h: u32| serde_json::json!({"parameters": {"resolution": {"width": w, "height": h}}});
    let q = Subscriber::start_video(&mut ssig, &layer("q"), Value::Null).await.unwrap();
    wait_transports(&p, "n2", 1).await;
    let f_here = Subscriber::start_video(&mut ssig, &layer("f"), Value::Null).await.unwrap();
    wait_transports(&p, "n1", 2).await;
    let h = Subscriber::start_video(&mut ssig, &publisher.stream_id, resolution(300, 200)).await.unwrap();
    wait_transports(&p, "n2", 2).await;
    let auto = Subscriber::start_video(&mut ssig, &publisher.stream_id, Value::Null).await.unwrap();
    wait_transports(&p, "n1", 3).await;
    let auto2 = Subscriber::start_video(&mut ssig, &publisher.stream_id, Value::Null).await.unwrap();
    wait_transports(&p, "n2", 3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // n2 had said it needed q only (its first subscriber's layer): a later subscriber there
    // may start on a lower layer until its own flows again, moving up at its keyframe.
    let climbed = |got: Vec<(usize, usize, &'static str)>, to, what: &str| {
        assert!(got.last() == Some(&to) && got.windows(2).all(|w| w[0].0 < w[1].0), "{what}: {got:?}");
        got
    };
    assert_eq!(runs(&check_layered_video(&q, 0)), [Q], "q on n2");
    let h_start = climbed(runs(&check_layered_video(&h, 2)), H, "h by resolution on n2");
    let auto2_start = climbed(runs(&check_layered_video(&auto2, 2)), F, "auto on n2");
    assert_eq!(runs(&check_layered_video(&f_here, 0)), [F], "f on n1");
    assert_eq!(runs(&check_layered_video(&auto, 0)), [F], "auto on n1");
    // The video crosses once, layer by layer: three tracks, whatever n2's subscribers take
    // (a media node serves its own `/metrics`).
    assert_eq!(metric(&p, "tessera_relay_exported_tracks").await, 3.0);
    assert_eq!(metric(&n2, "tessera_relay_imported_streams").await, 1.0);
    assert_eq!(metric(&n2, "tessera_transports{state=\"connected\"}").await, 3.0);
    let res = n2.client().get(n2.url("/v1/rooms")).send().await.unwrap();
    assert_eq!(res.status(), 404, "a media node has no API");

    // q moves up to f on n2, at a keyframe of f.
    let update = |id: &str, video: Value| serde_json::json!({"id": id, "operation": "update", "data": {"video": video}});
    ssig.ok("subscription-control", Some(update(&q.id, serde_json::json!({"from": layer("f")})))).await.unwrap();
    let up = wait_for_picture(&q, F, Duration::from_secs(3)).await;
    // The top layer stops at the publisher: n2's subscribers on it move down, and back up
    // when it returns.
    publisher.stop_layer("f", true);
    let moved = wait_for_picture(&auto2, H, Duration::from_secs(5)).await;
    wait_for_picture(&q, H, Duration::from_secs(2)).await;
    publisher.stop_layer("f", false);
    let back = wait_for_picture(&auto2, F, Duration::from_secs(8)).await;
    wait_for_picture(&q, F, Duration::from_secs(2)).await;
    println!("on n2: up in {up:?}, off the stopped layer in {moved:?}, back in {back:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(runs(&check_layered_video(&q, 3)), [Q, F, H, F]);
    assert_eq!(runs(&check_layered_video(&auto2, 4)), [auto2_start, vec![H, F]].concat());
    assert_eq!(runs(&check_layered_video(&h, 2)), h_start, "a subscriber of another layer is not disturbed");
}

/// A layer the publisher declared but has not sent yet when another node imports the
/// stream does not end the import: the exporter's tap on it waits for the layer, counts as
/// wanting it (so the origin asks the publisher for it, as a browser that had not started
/// its top layer yet would be asked), and carries it once it flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_layer_that_starts_late_reaches_another_node() {
    use common::layers::{asked_layers, check_layered_video, runs, wait_for_picture};
    use tessera_client::peer::Subscriber;
    if !common::in_own_netns("a_layer_that_starts_late_reaches_another_node") {
        return;
    }
    const F: (usize, usize, &str) = (640, 480, "red");
    let nats = Nats::start();
    let [(_n2_dir, n2), (_n1_dir, p)] = two_webrtc_nodes(&nats.url()).await;

    // f is held back; nobody subscribes yet, so the publisher is told to send q only.
    let (room, mut psig, publisher) = simulcast_room(&p, &["f"]).await;
    let id = publisher.stream_id.clone();
    assert_eq!(asked_layers(&mut psig, &id, &publisher).await, ["q"], "nobody takes it");
    // A subscriber on `auto` on n2 may want any layer: the origin asks for all three, f
    // included although it never flowed (the publisher then starts it, as the JS client does).
    let (mut ssig, _) = p.join(&room, "sub").await;
    let auto = Subscriber::start_video(&mut ssig, &id, Value::Null).await.unwrap();
    wait_transports(&p, "n2", 1).await;
    let mut seen = Vec::new();
    while seen.last().is_none_or(|l: &Vec<String>| !l.iter().any(|r| r == "f")) {
        assert!(seen.len() < 5, "the publisher was never asked for f: {seen:?}");
        seen.push(asked_layers(&mut psig, &id, &publisher).await);
    }
    let asked = Instant::now();
    let up = wait_for_picture(&auto, F, Duration::from_secs(8)).await;
    println!("asked {seen:?}; the late layer reached n2's subscriber {up:?} after it was asked for ({:?})", asked.elapsed());
    // One import, three tracks: the held layer's channel was kept all along.
    assert_eq!(metric(&n2, "tessera_relay_imported_streams").await, 1.0);
    assert_eq!(metric(&p, "tessera_relay_exported_tracks").await, 3.0);
    let got = runs(&check_layered_video(&auto, 3));
    assert!(got.last() == Some(&F) && got.windows(2).all(|w| w[0].0 < w[1].0), "{got:?}");
}

/// Layers that no subscriber on another node takes are paused at the publisher, as they
/// are for subscribers on its own node: the importing node tells the origin which relayed
/// layers it needs (its keepalives), and the origin counts only those.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simulcast_layers_nobody_takes_on_another_node_are_paused() {
    use common::layers::{asked_layers, check_layered_video, runs, wait_for_picture};
    use tessera_client::peer::Subscriber;
    if !common::in_own_netns("simulcast_layers_nobody_takes_on_another_node_are_paused") {
        return;
    }
    const H: (usize, usize, &str) = (320, 240, "green");
    const F: (usize, usize, &str) = (640, 480, "red");
    let nats = Nats::start();
    let [_n2, (_n1_dir, p)] = two_webrtc_nodes(&nats.url()).await;

    let (room, mut psig, publisher) = simulcast_room(&p, &[]).await;
    let id = publisher.stream_id.clone();
    assert_eq!(asked_layers(&mut psig, &id, &publisher).await, ["q"], "nobody takes it");
    // Asked until the publisher is told `want`, acting on each message as the JS client does.
    let until = async |psig: &mut tessera_client::signaling::Signaling, want: &[&str]| {
        let mut seen = Vec::new();
        loop {
            let got = asked_layers(psig, &id, &publisher).await;
            seen.push(got.clone());
            if got == want {
                return seen;
            }
            assert!(seen.len() < 5, "the publisher was never told {want:?}: {seen:?}");
        }
    };
    // A subscriber by RID h on n2: the layers up to h, not f, however the import began.
    let (mut ssig, _) = p.join(&room, "sub").await;
    let h = Subscriber::start_video(&mut ssig, &format!("{id}-video-h"), Value::Null).await.unwrap();
    wait_transports(&p, "n2", 1).await;
    println!("h on n2: {:?}", until(&mut psig, &["q", "h"]).await);
    wait_for_picture(&h, H, Duration::from_secs(5)).await;
    // A subscriber by RID q on n1 changes nothing; one on `auto` on n2 may want any: f
    // comes back, and it reaches f.
    let _q = Subscriber::start_video(&mut ssig, &format!("{id}-video-q"), Value::Null).await.unwrap();
    wait_transports(&p, "n1", 2).await;
    let auto = Subscriber::start_video(&mut ssig, &id, Value::Null).await.unwrap();
    wait_transports(&p, "n2", 2).await;
    println!("auto on n2: {:?}", until(&mut psig, &["q", "h", "f"]).await);
    wait_for_picture(&auto, F, Duration::from_secs(8)).await;
    // It leaves: f is paused again; h's subscriber goes on undisturbed.
    ssig.ok("unsubscribe", Some(serde_json::json!({"id": auto.id}))).await.unwrap();
    println!("auto gone: {:?}", until(&mut psig, &["q", "h"]).await);
    let before = h.packets("video").len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(h.packets("video").len() > before + 20, "h's subscriber stalled");
    let h_runs = runs(&check_layered_video(&h, 1));
    assert!(h_runs == [H] || h_runs == [(160, 120, "blue"), H], "{h_runs:?}");
}

/// The cluster issue's three-node test: each node in a network namespace of its own on a
/// bridge (127.0.2.x; `common::bridge`), NATS and the test's clients at 127.0.2.254.
/// Node 1 runs the portal and an SFU, node 2 an SFU, node 3 the mixer and recorder
/// (`room_spread = 0`: each transport on the least-used node). A publisher lands on node 1;
/// a subscriber placed on node 2 receives the very payloads node 1's subscriber does, and
/// decodes the publisher's red picture; the room's mixed stream, made on node 3, plays red
/// for a subscriber on node 2; a recording made on node 3 decodes. Node 2 killed: its
/// subscribers are told, subscribe again and get media from node 1 within 5 s. NATS
/// stopped for 10 s: media flows on, then control works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_a_bridge() {
    if !common::in_own_netns("three_nodes_on_a_bridge") {
        return;
    }
    use common::bridge::{Bridge, HOST};
    use tessera_client::peer::{Publisher, Subscriber};
    let mut bridge = Bridge::new();
    for n in 1..=3 {
        bridge.add(n);
    }
    let mut nats = Nats::start_at(HOST);
    let url = nats.url();
    tessera_client::peer::set_default_ice_ip(HOST);
    let mut node = |n: u8, roles: &str, extra: &str| {
        let dir = common::tempdir();
        let ip = Bridge::ip(n);
        let cfg = format!("[webrtc]\nbind_ip = \"{ip}\"\n[cluster]\nnode_id = \"n{n}\"\nroles = [{roles}]\n{extra}");
        let path = dir.path().join("t.toml");
        std::fs::write(&path, cfg).unwrap();
        let args = ["--config", path.to_str().unwrap(), "--cluster", &url];
        let s = common::start_in(&bridge.enter(n), &ip, &dir.path().join("data"), &args, &[("TESSERA_SERVICE_KEY", common::KEY)]);
        (dir, s)
    };
    let (_d3, n3) = node(3, "\"mixer\", \"recorder\"", "");
    let (_d2, mut n2) = node(2, "\"webrtc\"", "");
    let (_d1, p) = node(1, "\"portal\", \"webrtc\"", "room_spread = 0\n");
    let v = wait_nodes(&p, &["n1", "n2", "n3"], Duration::from_secs(5)).await;
    for n in v["nodes"].as_array().unwrap() {
        let id = n["id"].as_str().unwrap();
        assert!(n["relayAddr"].as_str().unwrap().starts_with(&format!("127.0.2.{}:", &id[1..])), "{n}");
    }

    let room = p.new_room(serde_json::json!({})).await;
    let (mut psig, _) = p.join(&room, "pub").await;
    let publisher = std::sync::Arc::new(Publisher::start(&mut psig, common::av(1), None).await.unwrap());
    let _source = tessera_client::media::live_source(publisher.clone(), (255, 0, 0), 440).unwrap();
    wait_transports(&p, "n1", 1).await;
    let subscribe = |name: &'static str, stream: String| {
        let (p, room) = (&p, room.clone());
        async move {
            let (mut sig, _) = p.join(&room, name).await;
            let sub = Subscriber::start(&mut sig, &stream, true, true, false).await.unwrap();
            (sig, sub)
        }
    };
    let (mut on2sig, on2) = subscribe("on-n2", publisher.stream_id.clone()).await;
    wait_transports(&p, "n2", 1).await;
    let (mut on1sig, on1) = subscribe("on-n1", publisher.stream_id.clone()).await;
    wait_transports(&p, "n1", 2).await;
    for (name, s) in [("n1", &on1), ("n2", &on2)] {
        s.wait_until(name, Duration::from_secs(8), |r| r.iter().filter(|p| p.kind == "video").count() > 60).await.unwrap();
    }
    // What the publisher sent, byte for byte, on both nodes: every video packet n2's
    // subscriber got (relayed), and every one n1's got (forwarded there).
    let sent: std::collections::HashSet<bytes::Bytes> =
        publisher.sent.lock().unwrap().iter().filter(|((k, _), _)| *k == "video").map(|(_, p)| p.clone()).collect();
    for (name, s) in [("n1", &on1), ("n2", &on2)] {
        let got = s.packets("video");
        let differ = got.iter().filter(|p| !sent.contains(&p.payload)).count();
        assert_eq!(differ, 0, "{differ} of the {} video payloads {name}'s subscriber got are not what the publisher sent", got.len());
    }
    let red = |packets: &[tessera_client::peer::Received]| {
        let frames = tessera_client::media::decode_vp8(packets).unwrap();
        frames.last().is_some_and(|f| {
            let (r, g, b) = f.around(f.width / 2, f.height / 2);
            r > 150 && g < 90 && b < 90
        })
    };
    assert!(red(&on2.received.lock().unwrap()), "n2's subscriber decodes the publisher's red picture");

    // The mixed stream: made on n3 from the relayed publication, subscribed on n2.
    let (mut vsig, viewer) = subscribe("viewer", format!("{room}-common")).await;
    wait_transports(&p, "n2", 2).await;
    let started = Instant::now();
    while !red(&viewer.received.lock().unwrap()) {
        assert!(started.elapsed() < Duration::from_secs(15), "no red mixed picture on n2 ({} packets)", viewer.packets("video").len());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("mixed picture from n3 on n2 after {:?}", started.elapsed());

    // A recording made on n3.
    let body = serde_json::json!({"container": "mkv", "media": {"audio": {"from": publisher.stream_id}, "video": {"from": publisher.stream_id}}});
    let res = p.client().post(p.url(&format!("/v1/rooms/{room}/recordings"))).bearer_auth(common::KEY).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let rec: Value = res.json().await.unwrap();
    let file = std::path::PathBuf::from(rec["storage"]["file"].as_str().unwrap());
    assert!(file.starts_with(_d3.path()), "made on n3: {}", file.display());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let path = format!("/v1/rooms/{room}/recordings/{}", rec["id"].as_str().unwrap());
    assert_eq!(p.client().delete(p.url(&path)).bearer_auth(common::KEY).send().await.unwrap().status(), 200);
    let out = Command::new("gst-discoverer-1.0").arg(&file).output().expect("gst-discoverer-1.0 (gstreamer1.0-tools)");
    let report = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(report.contains("vp8") && report.contains("opus"), "{report}");
    // Decoded: about 3 s of the publisher's red picture (15 fps), and its audio.
    let decoded = common::files::decode_file(&file, true);
    let red = decoded.video.iter().filter(|(_, _, (r, g, b))| *r > 150 && *g < 90 && *b < 90).count();
    assert!(red > 25 && red + 3 >= decoded.video.len(), "{red} red frames of {} in the recording", decoded.video.len());
    assert!(decoded.audio_buffers > 50, "{} audio buffers in the recording", decoded.audio_buffers);

    // n2 dies: its two subscribers are told; subscribing again lands on n1, media within 5 s.
    let killed = Instant::now();
    n2.child.kill().unwrap();
    let _ = n2.child.wait();
    for (name, sig) in [("on-n2", &mut on2sig), ("viewer", &mut vsig)] {
        let failed =
            sig.wait_for("transport error", Duration::from_secs(10), |n| n.event == "progress" && n.data["status"] == "error").await.unwrap();
        assert_eq!(failed.data["data"], "webrtc node `n2` is gone", "{name}");
    }
    println!("n2's subscribers told {:?} after it was killed", killed.elapsed());
    // Nobody else is: the publisher and n1's subscriber go on.
    for (name, sig) in [("publisher", &mut psig), ("on-n1", &mut on1sig)] {
        let told = sig
            .wait_for("nothing", Duration::from_millis(200), |n| {
                (n.event == "progress" && n.data["status"] == "error") || (n.event == "stream" && n.data["status"] == "remove")
            })
            .await;
        assert!(told.is_err(), "{name} was told: {:?}", told.map(|n| n.data));
    }
    let again = Instant::now();
    let on2_again = Subscriber::start(&mut on2sig, &publisher.stream_id, true, true, false).await.unwrap();
    on2_again.wait_until("video again", Duration::from_secs(5), |r| r.iter().filter(|p| p.kind == "video").count() > 20).await.unwrap();
    println!("media again {:?} after subscribing again (on n1), {:?} after the kill", again.elapsed(), killed.elapsed());

    // NATS away for 10 s: media keeps flowing; control works again once it is back.
    let (b1, b2) = (on1.packets("video").len(), on2_again.packets("video").len());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (a1, a2) = (on1.packets("video").len(), on2_again.packets("video").len());
    println!("video in the second before NATS stopped: on n1 {} packets, again on n1 {}", a1 - b1, a2 - b2);
    nats.stop();
    let before = on1.packets("video").len();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = on1.packets("video").len() - before;
    // The live source sends about 15 video packets a second.
    assert!(during > 100, "video went on while NATS was away ({during} packets in 10 s)");
    nats.restart();
    let back = Instant::now();
    loop {
        let res = p
            .client()
            .post(p.url(&format!("/v1/rooms/{room}/tokens")))
            .bearer_auth(common::KEY)
            .json(&serde_json::json!({"user": "late", "role": "presenter"}))
            .send()
            .await;
        if let Ok(r) = res
            && r.status() == 200
            && let Ok((mut sig, _)) = joined(&p, &r.text().await.unwrap()).await
            && let Ok(late) = Subscriber::start(&mut sig, &publisher.stream_id, true, true, false).await
        {
            late.wait_until("video after NATS came back", Duration::from_secs(5), |r| r.iter().filter(|p| p.kind == "video").count() > 20)
                .await
                .unwrap();
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(15), "no control after NATS came back");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!("a new subscriber had video {:?} after NATS came back", back.elapsed());
    // Long enough after NATS came back for a node wrongly found gone to be reported (the
    // portal gives a node up only after 8 s and more of silence): video goes on, no failure.
    let before = on1.packets("video").len();
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(on1.packets("video").len() > before + 100, "video went on after NATS came back");
    for (name, sig) in [("publisher", &mut psig), ("on-n1", &mut on1sig)] {
        let failure = sig.wait_for("no failure", Duration::from_millis(100), |n| n.event == "progress" && n.data["status"] == "error").await;
        assert!(failure.is_err(), "the {name} was told of a failure: {:?}", failure.map(|n| n.data));
    }
    drop(n3);
}

/// The participants of one room on several portal nodes: the room has one home (the node
/// its first participant came through), and a participant who joins through another
/// portal is in the same room there — sees and is seen, talks, subscribes to the streams
/// published at the home, shows in the REST API of either node — and resumes with its
/// ticket through any portal. The home killed: the other portal tells its participants
/// their transports failed and drops their connections; their relogin takes the room
/// over there, seats them again (once), and the room goes on with media.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_has_one_home_among_portals() {
    if !common::in_own_netns("a_room_has_one_home_among_portals") {
        return;
    }
    let nats = Nats::start();
    let url = nats.url();
    let cfg = |id: &str| format!("[webrtc]\nbind_ip = \"127.0.0.1\"\n[cluster]\nnode_id = \"{id}\"\n");
    let (_a_dir, mut a) = common::start_with_config_args(&cfg("alpha"), &["--cluster", &url]);
    let (_b_dir, b) = common::start_with_config_args(&cfg("bravo"), &["--cluster", &url]);
    wait_nodes(&b, &["alpha", "bravo"], Duration::from_secs(5)).await;
    let room = a.new_room(serde_json::json!({"views": []})).await;
    wait_status(&b, &format!("/v1/rooms/{room}"), 200, Duration::from_secs(2)).await;

    // Ann comes through alpha, which becomes the room's home, and publishes.
    let (mut ann, ann_info) = a.join(&room, "ann").await;
    let (publisher, _sending) = publish_sending(&mut ann, 3, 120).await;
    // Bob comes through bravo: the same room, with Ann and her stream in it.
    let (mut bob, bob_info) = b.join(&room, "bob").await;
    let users =
        |info: &Value| info["room"]["participants"].as_array().unwrap().iter().map(|p| p["user"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(users(&bob_info), ["ann", "bob"], "{bob_info}");
    let streams = bob_info["room"]["streams"].as_array().unwrap();
    assert!(streams.iter().any(|s| s["id"] == publisher.stream_id.as_str()), "{bob_info}");
    ann.wait_for("bob's join", Duration::from_secs(5), |n| n.event == "participant" && n.data["data"]["user"] == "bob").await.unwrap();
    let sub = tessera_client::peer::Subscriber::start(&mut bob, &publisher.stream_id, true, true, false).await.unwrap();
    sub.wait_until("ann's video at bob", Duration::from_secs(5), |r| r.iter().filter(|p| p.kind == "video").count() > 30).await.unwrap();
    let tagged = sub.packets("video").iter().filter(|p| tessera_client::peer::Marker::find(&p.payload).is_some_and(|m| m.tag == 3)).count();
    assert!(tagged > 30, "bob gets ann's own payloads ({tagged})");
    bob.ok("text", Some(serde_json::json!({"to": "all", "message": "hello from bravo"}))).await.unwrap();
    ann.wait_for("bob's text", Duration::from_secs(5), |n| n.event == "text" && n.data["message"] == "hello from bravo").await.unwrap();
    // Both nodes' REST APIs show the one room; its media is where the home placed it.
    for s in [&a, &b] {
        let list: Value =
            s.client().get(s.url(&format!("/v1/rooms/{room}/participants"))).bearer_auth(common::KEY).send().await.unwrap().json().await.unwrap();
        let mut names: Vec<&str> = list.as_array().unwrap().iter().map(|p| p["user"].as_str().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["ann", "bob"], "{list}");
        let list: Value =
            s.client().get(s.url(&format!("/v1/rooms/{room}/streams"))).bearer_auth(common::KEY).send().await.unwrap().json().await.unwrap();
        assert!(list.as_array().unwrap().iter().any(|s| s["id"] == publisher.stream_id.as_str()), "{list}");
    }
    wait_transports(&b, "alpha", 2).await;
    // A view added through bravo's REST API starts at alpha, the room's home, at once.
    let put = b.client().put(b.url(&format!("/v1/rooms/{room}"))).bearer_auth(common::KEY).json(&serde_json::json!({"views": [{"label": "common"}]}));
    assert_eq!(put.send().await.unwrap().status(), 200);
    let mixed = format!("{room}-common");
    ann.wait_for("the view added over bravo", Duration::from_secs(5), |n| {
        n.event == "stream" && n.data["status"] == "add" && n.data["id"] == mixed.as_str()
    })
    .await
    .unwrap();

    // Bob's connection to bravo dies; alpha hears of it from bravo, what Ann says then waits
    // for him, and he resumes through alpha with his ticket.
    let bob_id = bob_info["id"].as_str().unwrap().to_string();
    bob.kill().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&a, "tessera_participants_reconnecting").await != 1.0 {
        assert!(Instant::now() < deadline, "alpha never heard that bob's socket on bravo closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ann.ok("text", Some(serde_json::json!({"to": bob_id, "message": "while you were away"}))).await.unwrap();
    let mut bob = tessera_client::signaling::Signaling::connect(&a.portal).await.unwrap();
    let next = bob.ok("relogin", Some(bob_info["reconnectionTicket"].clone())).await.unwrap();
    assert!(next.as_str().is_some_and(|t| !t.is_empty()), "relogin answers the next ticket: {next}");
    bob.wait_for("the text said while away", Duration::from_secs(5), |n| n.event == "text" && n.data["message"] == "while you were away")
        .await
        .unwrap();

    // Carl comes through bravo and subscribes; then alpha, the home, is killed.
    let (mut carl, carl_info) = b.join(&room, "carl").await;
    let csub = tessera_client::peer::Subscriber::start(&mut carl, &publisher.stream_id, false, true, false).await.unwrap();
    csub.wait_until("ann's video at carl", Duration::from_secs(5), |r| r.iter().filter(|p| p.kind == "video").count() > 10).await.unwrap();
    drop(ann_info);
    let killed = Instant::now();
    a.child.kill().unwrap();
    let told =
        carl.wait_for("carl's transport failed", Duration::from_secs(8), |n| n.event == "progress" && n.data["status"] == "error").await.unwrap();
    println!("carl told his transport failed {:?} after the home died: {}", killed.elapsed(), told.data);
    assert!(carl.wait_for("the connection to drop", Duration::from_secs(5), |_| false).await.unwrap_err().to_string().contains("connection closed"));
    // His relogin through bravo: bravo takes the room over and seats him again.
    let mut carl = tessera_client::signaling::Signaling::connect(&b.portal).await.unwrap();
    let next = carl.ok("relogin", Some(carl_info["reconnectionTicket"].clone())).await.unwrap();
    println!("carl resumed {:?} after the home died", killed.elapsed());
    assert!(next.as_str().is_some_and(|t| !t.is_empty()), "{next}");
    // The room goes on at bravo: Dave sees Carl, Carl publishes and Dave gets it.
    let (mut dave, dave_info) = b.join(&room, "dave").await;
    assert_eq!(users(&dave_info), ["carl", "dave"], "{dave_info}");
    let (carl_pub, _carl_sending) = publish_sending(&mut carl, 4, 60).await;
    let dsub = tessera_client::peer::Subscriber::start(&mut dave, &carl_pub.stream_id, false, true, false).await.unwrap();
    dsub.wait_until("carl's video at dave", Duration::from_secs(8), |r| r.iter().filter(|p| p.kind == "video").count() > 30).await.unwrap();
    println!("media again {:?} after the home died", killed.elapsed());
    // Seated again once only: after he logs out, his old ticket does not bring him back.
    carl.ok("logout", None).await.unwrap();
    let mut again = tessera_client::signaling::Signaling::connect(&b.portal).await.unwrap();
    let err = again.ok("relogin", Some(carl_info["reconnectionTicket"].clone())).await.unwrap_err().to_string();
    assert!(err.contains("Reconnection ticket already used"), "{err}");
    let list: Value =
        b.client().get(b.url(&format!("/v1/rooms/{room}/participants"))).bearer_auth(common::KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(list.as_array().unwrap().iter().map(|p| p["user"].as_str().unwrap()).collect::<Vec<_>>(), ["dave"], "{list}");
}

/// What a dead home placed on a node that lives on ends there: a participant who never
/// comes back (Ann, whose client keeps its peer connection up) loses her transport once
/// another node holds the room, while the participants the new home seats again keep
/// theirs; in a room nobody comes back to, its participant's transport and its view end
/// once nobody has held it for a while. (Alpha is a portal only, so every transport and
/// view is on bravo.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_homes_participants_leave_the_nodes_that_live_on() {
    if !common::in_own_netns("a_dead_homes_participants_leave_the_nodes_that_live_on") {
        return;
    }
    let nats = Nats::start();
    let url = nats.url();
    // Bravo first: alpha's first look at the node list finds it.
    let (_b_dir, b) = common::start_with_config_args("[webrtc]\nbind_ip = \"127.0.0.1\"\n[cluster]\nnode_id = \"bravo\"\n", &["--cluster", &url]);
    let (_a_dir, mut a) = common::start_with_config_args("[cluster]\nnode_id = \"alpha\"\nroles = [\"portal\"]\n", &["--cluster", &url]);
    for s in [&a, &b] {
        wait_nodes(s, &["alpha", "bravo"], Duration::from_secs(5)).await;
    }
    let room = a.new_room(serde_json::json!({"views": []})).await;
    wait_status(&b, &format!("/v1/rooms/{room}"), 200, Duration::from_secs(2)).await;

    // Ann comes through alpha (the room's home) and publishes; Bob through bravo subscribes.
    let (mut ann, _ann_info) = a.join(&room, "ann").await;
    let (publisher, _sending) = publish_sending(&mut ann, 3, 60).await;
    let (mut bob, bob_info) = b.join(&room, "bob").await;
    let sub = tessera_client::peer::Subscriber::start(&mut bob, &publisher.stream_id, false, true, false).await.unwrap();
    sub.wait_until("ann's video at bob", Duration::from_secs(5), |r| r.iter().filter(|p| p.kind == "video").count() > 10).await.unwrap();
    // A second room, with a view (mixed on bravo), that nobody comes back to: Dan alone.
    let room2 = a.new_room(serde_json::json!({})).await;
    let (mut dan, _) = a.join(&room2, "dan").await;
    let (_dan_pub, _dan_sending) = publish_sending(&mut dan, 5, 60).await;
    let metrics = async || b.client().get(b.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let view_of_room2 = format!("tessera_mixer_view_running{{room=\"{room2}\"");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !metrics().await.contains(&view_of_room2) {
        assert!(Instant::now() < deadline, "room 2's view never ran on bravo");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_transports(&b, "bravo", 3).await;

    let killed = Instant::now();
    a.child.kill().unwrap();
    let _ = a.child.wait();
    bob.wait_for("bob's transport failed", Duration::from_secs(8), |n| n.event == "progress" && n.data["status"] == "error").await.unwrap();
    let mut bob = tessera_client::signaling::Signaling::connect(&b.portal).await.unwrap();
    bob.ok("relogin", Some(bob_info["reconnectionTicket"].clone())).await.unwrap();
    let (bob_pub, _bob_sending) = publish_sending(&mut bob, 4, 60).await;
    // Ann's and Dan's transports end although their clients still hold them (Ann's when
    // bravo takes her room over, Dan's once nobody has held his for 12 s), and so does room
    // 2's view; Bob's new transport stays.
    let deadline = killed + Duration::from_secs(22);
    while metric(&b, "tessera_transports{state=\"connected\"}").await != 1.0 {
        if Instant::now() >= deadline {
            let log = b.stderr.lock().unwrap().clone();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            panic!(
                "the lost home's transports never ended on bravo: {}\n{}",
                metric(&b, "tessera_transports{state=\"connected\"}").await,
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("the dead home's participants left bravo {:?} after the kill", killed.elapsed());
    while metric(&b, "tessera_mixer_views").await != 0.0 {
        assert!(Instant::now() < deadline, "the lost home's view never stopped on bravo");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("its view stopped {:?} after the kill", killed.elapsed());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(metric(&b, "tessera_transports{state=\"connected\"}").await, 1.0, "the new home's transport is kept");
    let (mut cat, _) = b.join(&room, "cat").await;
    let csub = tessera_client::peer::Subscriber::start(&mut cat, &bob_pub.stream_id, false, true, false).await.unwrap();
    csub.wait_until("bob's video at cat", Duration::from_secs(5), |r| r.iter().filter(|p| p.kind == "video").count() > 10).await.unwrap();
}

/// A TCP relay between one node and NATS that the test can cut: its connections close (so
/// NATS forgets that node's subscriptions at once, as when its link fails) and new ones
/// are closed on arrival until it is restored.
struct NatsLink {
    addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    kill: tokio::sync::watch::Sender<u64>,
}

impl NatsLink {
    async fn to(nats: &Nats) -> NatsLink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = format!("{}:{}", nats.host, nats.port);
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (kill, _) = tokio::sync::watch::channel(0u64);
        let (is_cut, killer) = (cut.clone(), kill.clone());
        tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                if is_cut.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let (upstream, mut killed) = (upstream.clone(), killer.subscribe());
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = killed.changed() => {}
                    }
                });
            }
        });
        NatsLink { addr, cut, kill }
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Cuts the link for `secs`, then restores it.
    async fn cut_for(&self, secs: f64) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        self.kill.send_modify(|n| *n += 1);
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A media node whose own NATS link drops for a moment keeps its sessions (it is back on
/// NATS before the portals give it up); a room's home cut off from NATS for longer than
/// the media node waits for it learns, once back, that its participants' transports
/// there ended meanwhile, and tells them. (Alpha is a portal only, so every transport is
/// on bravo; each node reaches NATS through a link the test can cut.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_cut_off_from_nats_learns_what_ended_meanwhile() {
    if !common::in_own_netns("a_home_cut_off_from_nats_learns_what_ended_meanwhile") {
        return;
    }
    let nats = Nats::start();
    let (a_link, b_link) = (NatsLink::to(&nats).await, NatsLink::to(&nats).await);
    let (_b_dir, b) =
        common::start_with_config_args("[webrtc]\nbind_ip = \"127.0.0.1\"\n[cluster]\nnode_id = \"bravo\"\n", &["--cluster", &b_link.url()]);
    let (_a_dir, a) = common::start_with_config_args("[cluster]\nnode_id = \"alpha\"\nroles = [\"portal\"]\n", &["--cluster", &a_link.url()]);
    for s in [&a, &b] {
        wait_nodes(s, &["alpha", "bravo"], Duration::from_secs(5)).await;
    }
    let room = a.new_room(serde_json::json!({"views": []})).await;
    let (mut ann, _) = a.join(&room, "ann").await;
    let (publisher, _sending) = publish_sending(&mut ann, 3, 120).await;
    let (mut bob, _) = a.join(&room, "bob").await;
    let sub = tessera_client::peer::Subscriber::start(&mut bob, &publisher.stream_id, false, true, false).await.unwrap();
    sub.wait_until("ann's video at bob", Duration::from_secs(5), |r| r.iter().filter(|p| p.kind == "video").count() > 10).await.unwrap();
    wait_transports(&a, "bravo", 2).await;
    let video = || sub.received.lock().unwrap().iter().filter(|p| p.kind == "video").count();

    // Bravo's link drops for 1.5 s: nobody is told anything, and media flows throughout.
    let before = video();
    b_link.cut_for(1.5).await;
    let during = video();
    assert!(during > before + 20, "video stopped while bravo's NATS link was down: {before} → {during} packets");
    let failed = |n: &tessera_client::signaling::Notification| n.event == "progress" && n.data["status"] == "error";
    assert!(ann.wait_for("a failure", Duration::from_secs(5), failed).await.is_err(), "bravo was given up after a 1.5 s blip");
    assert_eq!(metric(&b, "tessera_transports{state=\"connected\"}").await, 2.0);

    // Alpha's link is cut for 16 s: nobody holds the room meanwhile, so bravo ends what
    // alpha placed there after 12 s (events saying so go to nobody)...
    let cut = Instant::now();
    a_link.cut_for(16.0).await;
    assert_eq!(metric(&b, "tessera_transports{state=\"connected\"}").await, 0.0, "bravo kept the cut-off home's transports");
    // ...and alpha, back, learns it and tells Ann and Bob.
    let back = Instant::now();
    let told = ann.wait_for("ann told her transport ended", Duration::from_secs(12), failed).await.unwrap();
    assert!(told.data["data"].as_str().unwrap().contains("cut off"), "{:?}", told.data);
    bob.wait_for("bob told his transport ended", Duration::from_secs(3), failed).await.unwrap();
    println!("cut {:?}; told {:?} after the link came back", back - cut, back.elapsed());
    bob.wait_for("ann's stream removed", Duration::from_secs(3), |n| n.event == "stream" && n.data["status"] == "remove").await.unwrap();
    // They publish and subscribe again, on bravo: Bob at once, by the id Ann has. The home
    // adds a stream before it tells the publisher `ready` (and then everyone `stream add`,
    // OWT's order), so the id is good as soon as Ann has it, whether Bob was told or not
    // (this raced when `ready` and the stream's addition were two events).
    let (publisher, _sending) = publish_sending(&mut ann, 4, 60).await;
    let sub = tessera_client::peer::Subscriber::start(&mut bob, &publisher.stream_id, false, true, false).await.unwrap();
    sub.wait_until("ann's video at bob again", Duration::from_secs(5), |r| r.iter().filter(|p| p.kind == "video").count() > 10).await.unwrap();
}
