//! The hand-written Socket.IO server against the official `socket.io-client` (node), plus a
//! few raw protocol checks over HTTP.
//!
//! The node part needs `npm ci` in `tests/node` once.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tessera_portal::socketio::{Event, Incoming, Socket, SocketIo, SocketIoConfig};
use tokio::sync::mpsc;

const MAX_PAYLOAD: usize = 100_000;

fn test_config() -> SocketIoConfig {
    SocketIoConfig {
        ping_interval: Duration::from_millis(300),
        ping_timeout: Duration::from_millis(1000),
        max_payload: MAX_PAYLOAD,
        connect_timeout: Duration::from_secs(5),
        ..SocketIoConfig::default()
    }
}

/// "echo" → ack('ok', ...args); "ping-me" → emit "pong-you"; "bye" → disconnect.
async fn echo_app(mut sockets: mpsc::Receiver<Socket>) {
    while let Some(mut socket) = sockets.recv().await {
        tokio::spawn(async move {
            let handle = socket.handle.clone();
            while let Some(ev) = socket.events.next().await {
                match ev {
                    Incoming::Event(event) => match *event {
                        Event { name, args, ack } if name == "echo" => {
                            if let Some(id) = ack {
                                let mut reply = vec![json!("ok")];
                                reply.extend(args);
                                let _ = handle.ack(id, reply);
                            }
                        }
                        Event { name, args, .. } if name == "ping-me" => {
                            let _ = handle.emit("pong-you", args);
                        }
                        Event { name, .. } if name == "bye" => handle.disconnect(),
                        Event { .. } => {}
                    },
                    Incoming::Invalid { .. } => {}
                    Incoming::Closed { .. } => break,
                }
            }
        });
    }
}

struct TestServer {
    url: String,
    io: SocketIo,
    handle: ServerHandle,
}

/// The portal's own HTTP server (websockets on the upgraded connection) for `io` alone.
fn serve(io: &SocketIo, workers: usize) -> (std::net::SocketAddr, actix_web::dev::Server) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("bound address");
    let server = tessera_portal::http::serve_socketio(listener, None, io.clone(), workers, |_| {}).expect("serve");
    (addr, server)
}

async fn start_server() -> TestServer {
    let (io, sockets) = SocketIo::new(test_config());
    tokio::spawn(echo_app(sockets));
    let (addr, server) = serve(&io, 2);
    let handle = server.handle();
    tokio::spawn(server);
    TestServer { url: format!("http://{addr}"), io, handle }
}

async fn wait_for_no_sessions(io: &SocketIo) {
    for _ in 0..100 {
        if io.session_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} session(s) still open", io.session_count());
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[actix_rt::test]
async fn official_client_interop() {
    let root = workspace_root();
    let node_dir = root.join("tests/node");
    assert!(node_dir.join("node_modules/socket.io-client").is_dir(), "tests/node/node_modules is missing: run `npm ci` in {}", node_dir.display());
    let server = start_server().await;

    let child = tokio::process::Command::new("node")
        .args(["--test", "--test-force-exit", "tests/node/socketio-echo.test.mjs"])
        .current_dir(&root)
        .env("TESSERA_SIO_URL", &server.url)
        .env("TESSERA_SIO_MAX_PAYLOAD", MAX_PAYLOAD.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), child)
        .await
        .expect("node test timed out")
        .expect("could not run `node` (is Node.js 20+ installed?)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "node tests failed ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}", output.status);

    wait_for_no_sessions(&server.io).await;
    server.handle.stop(true).await;
}

/// GET or POST on /socket.io/ with a query; returns (status, body).
async fn request(client: &reqwest::Client, method: reqwest::Method, url: &str, body: &str) -> (u16, String) {
    let response = client.request(method, url).body(body.to_owned()).send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, String) {
    request(client, reqwest::Method::GET, url, "").await
}

async fn post(client: &reqwest::Client, url: &str, body: &str) -> (u16, String) {
    request(client, reqwest::Method::POST, url, body).await
}

/// Polling handshake; returns the sid.
async fn handshake(client: &reqwest::Client, base: &str) -> String {
    let (status, body) = get(client, &format!("{base}/socket.io/?EIO=4&transport=polling")).await;
    assert_eq!(status, 200, "{body}");
    let open: Value = serde_json::from_str(body.strip_prefix('0').expect("open packet")).expect("open json");
    assert_eq!(open["upgrades"], json!(["websocket"]));
    assert_eq!(open["pingInterval"], json!(300));
    assert_eq!(open["pingTimeout"], json!(1000));
    assert_eq!(open["maxPayload"], json!(MAX_PAYLOAD));
    open["sid"].as_str().expect("sid").to_owned()
}

#[actix_rt::test]
async fn raw_protocol_errors() {
    let server = start_server().await;
    let client = http();
    let base = &server.url;

    for version in ["2", "5", ""] {
        let (status, body) = get(&client, &format!("{base}/socket.io/?EIO={version}&transport=polling")).await;
        assert_eq!(status, 400);
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), json!({"code": 5, "message": "Unsupported protocol version"}));
    }

    let (status, body) = get(&client, &format!("{base}/socket.io/?EIO=4&transport=polling&sid=nope")).await;
    assert_eq!(status, 400);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), json!({"code": 1, "message": "Session ID unknown"}));

    let (status, body) = post(&client, &format!("{base}/socket.io/?EIO=4&transport=polling&sid=nope"), "40").await;
    assert_eq!((status, body.contains("\"code\":1")), (400, true), "{body}");

    let (status, body) = get(&client, &format!("{base}/socket.io/?EIO=4&transport=carrier-pigeon")).await;
    assert_eq!(status, 400);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), json!({"code": 0, "message": "Transport unknown"}));

    let (status, _) = get(&client, &format!("{base}/socket.io/?EIO=4&transport=websocket")).await;
    assert_eq!(status, 400, "websocket handshake without an upgrade");

    // Requests to upgrade the connection, which the portal answers on the connection itself.
    let upgrade = |path: &str, key: bool| {
        let mut request =
            client.get(format!("{base}{path}")).header("Connection", "Upgrade").header("Upgrade", "websocket").header("Sec-WebSocket-Version", "13");
        if key {
            request = request.header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==");
        }
        async move {
            let response = request.send().await.expect("answered");
            // A refusal ends the connection, and says so: a client must not pool it.
            let connection = response.headers().get("connection").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            assert_eq!(connection, "close", "a refused upgrade's connection header");
            (response.status().as_u16(), response.text().await.unwrap_or_default())
        }
    };
    let engine_error = |body: &str| serde_json::from_str::<Value>(body).ok().and_then(|v| v["code"].as_u64());
    let (status, body) = upgrade("/socket.io/?EIO=4&transport=websocket&sid=nope", true).await;
    assert_eq!((status, engine_error(&body)), (400, Some(1)), "unknown sid: {body}");
    let (status, body) = upgrade("/socket.io/?EIO=5&transport=websocket", true).await;
    assert_eq!((status, engine_error(&body)), (400, Some(5)), "unsupported version: {body}");
    let (status, body) = upgrade("/socket.io/?EIO=4&transport=polling", true).await;
    assert_eq!((status, engine_error(&body)), (400, Some(3)), "polling asks no upgrade: {body}");
    let (status, body) = upgrade("/socket.io/?EIO=4&transport=websocket", false).await;
    assert_eq!((status, engine_error(&body)), (400, Some(3)), "no websocket key: {body}");
    let (status, _) = upgrade("/elsewhere", true).await;
    assert_eq!(status, 404);
    assert_eq!(server.io.session_count(), 0, "no refused upgrade left a session");

    server.handle.stop(true).await;
}

#[actix_rt::test]
async fn garbage_post_closes_only_that_session() {
    let server = start_server().await;
    let client = http();
    let base = &server.url;
    let bad = handshake(&client, base).await;
    let good = handshake(&client, base).await;
    assert_eq!(server.io.session_count(), 2);
    let url = |sid: &str| format!("{base}/socket.io/?EIO=4&transport=polling&sid={sid}");

    let (status, _) = post(&client, &url(&bad), "garbage!!").await;
    assert_eq!(status, 400);
    // The bad session is gone...
    let mut gone = false;
    for _ in 0..50 {
        let (status, body) = get(&client, &url(&bad)).await;
        if status == 400 {
            assert!(body.contains("\"code\":1"), "{body}");
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "garbage did not close the session");

    // ...the other one still works: CONNECT, a namespace error, an event with an ack.
    assert_eq!(post(&client, &url(&good), "40\u{1e}40/admin,").await, (200, "ok".to_owned()));
    let (status, body) = get(&client, &url(&good)).await;
    assert_eq!(status, 200);
    let packets: Vec<&str> = body.split('\u{1e}').filter(|p| *p != "2").collect();
    assert_eq!(packets.len(), 2, "{body}");
    let connect: Value = serde_json::from_str(packets[0].strip_prefix("40").expect("CONNECT reply")).unwrap();
    assert_eq!(connect["sid"].as_str().map(str::len), Some(20));
    assert_eq!(packets[1], "44/admin,{\"message\":\"Invalid namespace\"}");

    assert_eq!(post(&client, &url(&good), "3\u{1e}4212[\"echo\",\"x\"]").await, (200, "ok".to_owned()));
    let mut body = String::new();
    for _ in 0..5 {
        let (status, b) = get(&client, &url(&good)).await;
        assert_eq!(status, 200, "{b}");
        body.push_str(&b);
        if b.contains("\"ok\"") {
            break;
        }
        post(&client, &url(&good), "3").await;
    }
    assert!(body.contains("4312[\"ok\",\"x\"]"), "{body}");
    assert_eq!(server.io.session_count(), 1);

    // A second long-poll while one is pending is a protocol error that closes the session.
    let mut overlapped = false;
    for _ in 0..10 {
        let first = {
            let client = client.clone();
            let url = url(&good);
            tokio::spawn(async move { get(&client, &url).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        if first.is_finished() {
            // Answered at once (a queued ping): pong and try again.
            post(&client, &url(&good), "3").await;
            continue;
        }
        let (status, _) = get(&client, &url(&good)).await;
        assert_eq!(status, 400);
        let (status, body) = first.await.unwrap();
        assert_eq!(status, 200);
        assert!(body.ends_with('1'), "pending poll answered with close: {body}");
        overlapped = true;
        break;
    }
    assert!(overlapped, "could not hold a long-poll open");
    wait_for_no_sessions(&server.io).await;

    server.handle.stop(true).await;
}

/// A server without the echo app: the test takes the sockets itself.
async fn start_bare(config: SocketIoConfig) -> (String, SocketIo, mpsc::Receiver<Socket>, ServerHandle) {
    let (io, sockets) = SocketIo::new(config);
    let (addr, server) = serve(&io, 1);
    let base = format!("http://{addr}");
    let handle = server.handle();
    tokio::spawn(server);
    (base, io, sockets, handle)
}

#[actix_rt::test]
async fn slow_client_is_closed_when_its_queue_overflows() {
    let (base, io, mut sockets, handle) = start_bare(SocketIoConfig { outgoing_queue: 8, ..test_config() }).await;
    let client = http();
    let sid = handshake(&client, &base).await;
    let url = format!("{base}/socket.io/?EIO=4&transport=polling&sid={sid}");
    assert_eq!(post(&client, &url, "40").await.0, 200);
    let mut socket = tokio::time::timeout(Duration::from_secs(5), sockets.recv()).await.unwrap().unwrap();
    // Nobody polls: the queue fills up, then the socket is closed instead of growing.
    let sent = (0..100).take_while(|i| socket.handle.emit("flood", vec![json!(i)]).is_ok()).count();
    assert_eq!(sent, 8);
    assert!(socket.handle.is_closed());
    let ev = tokio::time::timeout(Duration::from_secs(5), socket.events.recv()).await.unwrap().unwrap();
    assert_eq!(ev, Incoming::Closed { reason: "outgoing queue overflow".into() });
    assert!(socket.events.next().await.is_none(), "Closed is the last message");
    assert_eq!(io.session_count(), 0);
    handle.stop(true).await;
}

#[actix_rt::test]
async fn close_all_and_handles_after_close() {
    let (base, io, mut sockets, handle) = start_bare(test_config()).await;
    let client = http();
    let sid = handshake(&client, &base).await;
    let url = format!("{base}/socket.io/?EIO=4&transport=polling&sid={sid}");
    assert_eq!(post(&client, &url, "40{\"token\":\"t\"}").await.0, 200);
    let mut socket = tokio::time::timeout(Duration::from_secs(5), sockets.recv()).await.unwrap().unwrap();
    assert_eq!(socket.handle.id(), socket.id);
    assert!(socket.handle.emit("hello", vec![json!(1)]).is_ok());

    // An invalid event keeps the socket open.
    assert_eq!(post(&client, &url, "42[1,2]").await.0, 200);
    let ev = tokio::time::timeout(Duration::from_secs(5), socket.events.recv()).await.unwrap().unwrap();
    assert!(matches!(ev, Incoming::Invalid { .. }), "{ev:?}");

    io.close_all();
    let ev = tokio::time::timeout(Duration::from_secs(5), socket.events.recv()).await.unwrap().unwrap();
    assert_eq!(ev, Incoming::Closed { reason: "server shutting down".into() });
    assert!(socket.handle.is_closed());
    assert!(socket.handle.emit("late", vec![]).is_err());
    assert!(socket.handle.ack(1, vec![]).is_err());
    socket.handle.disconnect();
    assert_eq!(io.session_count(), 0);
    handle.stop(true).await;
}

#[actix_rt::test]
async fn silent_clients_time_out() {
    let server = start_server().await;
    let client = http();
    // Never polls, so never answers the ping: closed after ping_interval + ping_timeout.
    let sid = handshake(&client, &server.url).await;
    assert_eq!(server.io.session_count(), 1);
    wait_for_no_sessions(&server.io).await;
    let (status, body) = get(&client, &format!("{}/socket.io/?EIO=4&transport=polling&sid={sid}", server.url)).await;
    assert_eq!((status, body.contains("\"code\":1")), (400, true), "{body}");
    server.handle.stop(true).await;
}

/// Splits an Engine.IO 3 payload (`<length>:<packet>` records, lengths in UTF-16 units).
fn eio3_records(mut body: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some((len, rest)) = body.split_once(':') {
        let len: usize = len.parse().expect("record length");
        let end = rest.char_indices().scan(0, |units, (i, c)| {
            *units += c.len_utf16();
            Some((i + c.len_utf8(), *units))
        });
        let end = if len == 0 { 0 } else { end.take_while(|(_, u)| *u <= len).last().expect("record").0 };
        out.push(rest[..end].to_owned());
        body = &rest[end..];
    }
    assert!(body.is_empty(), "trailing bytes {body:?}");
    out
}

#[actix_rt::test]
async fn engine_io_3_polling_raw() {
    let server = start_server().await;
    let client = http();
    let base = &server.url;
    let (status, body) = get(&client, &format!("{base}/socket.io/?EIO=3&transport=polling&t=x")).await;
    assert_eq!(status, 200, "{body}");
    let records = eio3_records(&body);
    assert_eq!(records.len(), 1, "{body}");
    let open: Value = serde_json::from_str(records[0].strip_prefix('0').expect("open packet")).unwrap();
    assert_eq!(open["upgrades"], json!(["websocket"]));
    assert_eq!((open["pingInterval"].clone(), open["pingTimeout"].clone()), (json!(300), json!(1000)));
    let sid = open["sid"].as_str().unwrap().to_owned();
    let url = format!("{base}/socket.io/?EIO=3&transport=polling&sid={sid}");

    // Socket.IO v2: "/" is connected without a CONNECT from the client; the server never pings.
    assert_eq!(get(&client, &url).await, (200, "2:40".to_owned()));
    // The client pings, the server answers; a CONNECT to "/" is tolerated, other namespaces
    // are refused with a v2 ERROR packet (named without the query string).
    assert_eq!(post(&client, &url, "1:22:407:40/a?b,").await, (200, "ok".to_owned()));
    assert_eq!(get(&client, &url).await, (200, "1:324:44/a,\"Invalid namespace\"".to_owned()));
    // Events and acks are framed as in v5; lengths count UTF-16 units ("🎉" is two).
    assert_eq!(post(&client, &url, "18:4212[\"echo\",\"é🎉\"]").await, (200, "ok".to_owned()));
    assert_eq!(get(&client, &url).await, (200, "16:4312[\"ok\",\"é🎉\"]".to_owned()));
    // A record length that does not match is a parse error that closes the session.
    let bad = handshake_v3(&client, base).await;
    let bad_url = format!("{base}/socket.io/?EIO=3&transport=polling&sid={bad}");
    assert_eq!(post(&client, &bad_url, "2:4🎉").await.0, 400);
    assert_eq!(get(&client, &bad_url).await.0, 400, "session closed");

    // A client that stops pinging is closed after pingInterval + pingTimeout (1.3 s); a
    // pending poll is answered with the close packet.
    let started = std::time::Instant::now();
    let (status, body) = get(&client, &url).await;
    assert_eq!((status, body.as_str()), (200, "1:1"));
    assert!(started.elapsed() >= Duration::from_millis(1000), "closed after {:?}", started.elapsed());
    wait_for_no_sessions(&server.io).await;
    server.handle.stop(true).await;
}

#[actix_rt::test]
async fn engine_io_3_pings_keep_the_session() {
    let server = start_server().await;
    let client = http();
    let sid = handshake_v3(&client, &server.url).await;
    let url = format!("{}/socket.io/?EIO=3&transport=polling&sid={sid}", server.url);
    assert_eq!(get(&client, &url).await, (200, "2:40".to_owned()));
    // Pinging every 300 ms for 2.5 s (twice the timeout) keeps the session open.
    for _ in 0..8 {
        assert_eq!(post(&client, &url, "1:2").await, (200, "ok".to_owned()));
        assert_eq!(get(&client, &url).await, (200, "1:3".to_owned()));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(server.io.session_count(), 1);
    // DISCONNECT then close: the session ends.
    post(&client, &url, "2:411:1").await;
    wait_for_no_sessions(&server.io).await;
    server.handle.stop(true).await;
}

async fn handshake_v3(client: &reqwest::Client, base: &str) -> String {
    let (status, body) = get(client, &format!("{base}/socket.io/?EIO=3&transport=polling")).await;
    assert_eq!(status, 200, "{body}");
    let records = eio3_records(&body);
    let open: Value = serde_json::from_str(records[0].strip_prefix('0').expect("open packet")).unwrap();
    open["sid"].as_str().expect("sid").to_owned()
}

/// A reqwest client, with the crypto provider the workspace's rustls-no-provider reqwest needs.
fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}
