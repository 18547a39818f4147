//! The `tessera` command line: config errors as a user sees them, the service key, and
//! the room/token subcommands against a running server.

mod common;

use std::process::Command;

use common::{KEY, bin, start, start_with_env, tempdir};

fn serve_output(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin()).arg("serve").args(args).env_remove("TESSERA_SERVICE_KEY").output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn config_errors_name_file_key_and_reason() {
    let dir = tempdir();
    let cfg = dir.path().join("bad.toml");
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let cases: &[(&str, &str)] = &[
        ("[server]\nportal_addr = \"127.0.0.1:99999\"\n", "key `server.portal_addr`: port 99999 is out of range"),
        ("[portal]\nping_intervall_ms = 5\n", "unknown field `ping_intervall_ms`"),
        ("[portal]\nping_interval_ms = \"soon\"\n", "key `portal.ping_interval_ms`: invalid type"),
        ("[portal]\nreconnection_timeout_secs = -1\n", "key `portal.reconnection_timeout_secs`"),
        ("[webrtc]\nudp_port_min = 6000\nudp_port_max = 5000\n", "key `webrtc.udp_port_min`"),
        ("[webrtc]\nengine = \"per-connection\"\n", "key `webrtc.engine`: unknown variant `per-connection`, expected `workers`"),
        ("[storage]\nrecordings_dir = \"/proc/version/rec\"\n", "key `storage.recordings_dir`: cannot create folder"),
    ];
    for (text, want) in cases {
        std::fs::write(&cfg, text).unwrap();
        let (ok, stderr) = serve_output(&["--config", cfg.to_str().unwrap(), "--data-dir", data]);
        assert!(!ok, "must fail for {text:?}");
        assert!(stderr.contains(cfg.to_str().unwrap()), "names the file for {text:?}: {stderr}");
        assert!(stderr.contains(want), "wanted {want:?} for {text:?}, got: {stderr}");
    }
    let (ok, stderr) = serve_output(&["--config", dir.path().join("missing.toml").to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("missing.toml") && stderr.contains("cannot read"), "{stderr}");
}

#[test]
fn example_config_starts_the_server() {
    let dir = tempdir();
    let example = common::workspace_root().join("config/tessera.example.toml");
    let server = start(dir.path(), &["--config", example.to_str().unwrap()]);
    assert!(server.portal.starts_with("http://127.0.0.1:"));
}

#[test]
fn service_key_generated_once_and_env_overrides() {
    let dir = tempdir();
    let data = dir.path();
    let mut s = start_with_env(data, &[], &[]);
    let key = std::fs::read_to_string(data.join("service.key")).unwrap().trim().to_string();
    assert_eq!(key.len(), 64);
    // The key was printed at generation.
    assert!(s.startup.iter().any(|l| l.contains("generated a service key") && l.contains(&key)), "{:?}", s.startup);
    assert!(s.terminate());
    drop(s);
    // Second start: same key, not printed again.
    let mut s = start_with_env(data, &[], &[]);
    assert!(!s.startup.iter().any(|l| l.contains("generated")), "{:?}", s.startup);
    assert_eq!(std::fs::read_to_string(data.join("service.key")).unwrap().trim(), key);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async { common::http().get(s.url("/v1/rooms")).bearer_auth(&key).send().await.unwrap().status() });
    assert_eq!(status, 200);
    assert!(s.terminate());
    drop(s);
    // The environment variable wins over the file.
    let s = start_with_env(data, &[], &[("TESSERA_SERVICE_KEY", KEY)]);
    let (with_env, with_file) = rt.block_on(async {
        let c = common::http();
        (
            c.get(s.url("/v1/rooms")).bearer_auth(KEY).send().await.unwrap().status(),
            c.get(s.url("/v1/rooms")).bearer_auth(&key).send().await.unwrap().status(),
        )
    });
    assert_eq!((with_env.as_u16(), with_file.as_u16()), (200, 401));
}

fn cli(server: &common::Server, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin()).args(args).args(["--api", &server.api, "--key", KEY]).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn room_and_token_subcommands() {
    let dir = tempdir();
    let server = start(dir.path(), &[]);
    let (ok, out, err) = cli(&server, &["room", "create", "class", "--options", r#"{"participantLimit": 30}"#]);
    assert!(ok, "{err}");
    let room: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(room["participantLimit"], 30);
    let id = room["id"].as_str().unwrap();

    let (ok, out, _) = cli(&server, &["room", "list"]);
    assert!(ok);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);

    let (ok, out, err) = cli(&server, &["token", "create", "--room", id, "--user", "ann", "--role", "viewer"]);
    assert!(ok, "{err}");
    assert!(common_token_ok(out.trim()));

    let (ok, _, err) = cli(&server, &["token", "create", "--room", id, "--user", "ann", "--role", "emperor"]);
    assert!(!ok);
    assert!(err.contains("400") && err.contains("emperor"), "{err}");

    let (ok, out, _) = cli(&server, &["room", "delete", id]);
    assert!(ok);
    assert!(out.contains("deleted"));
    let (ok, _, err) = cli(&server, &["room", "delete", id]);
    assert!(!ok);
    assert!(err.contains("404"), "{err}");

    // Wrong key: a clear 401.
    let out = Command::new(bin()).args(["room", "list", "--api", &server.api, "--key", "nope"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

fn common_token_ok(token: &str) -> bool {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(token)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["tokenId"].is_string() && v["signature"].is_string())
}

#[test]
fn help_is_clear() {
    let out = Command::new(bin()).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["serve", "room", "token"] {
        assert!(text.contains(word), "{text}");
    }
    let out = Command::new(bin()).args(["serve", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--config", "--portal-addr", "--api-addr", "--data-dir"] {
        assert!(text.contains(flag), "{text}");
    }
}

/// `tessera drain` drains a running server as SIGTERM does: with no one in, it stops at
/// once (not at its 30 s timeout), cleanly.
#[test]
fn drain_subcommand_stops_an_idle_server_cleanly() {
    let (_dir, mut server) = common::start_with_config("[server]\ndrain_timeout_secs = 30\n");
    let (ok, out, err) = cli(&server, &["drain"]);
    assert!(ok, "{err}");
    assert!(out.contains("draining"), "{out}");
    let asked = std::time::Instant::now();
    let status = loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            break status;
        }
        assert!(asked.elapsed() < std::time::Duration::from_secs(10), "the server did not stop after the drain");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
    let printed: Vec<String> = server.lines.try_iter().collect();
    assert!(printed.iter().any(|l| l.starts_with("tessera: draining for up to 30 s (0 participants)")), "{printed:?}");
    assert!(printed.iter().any(|l| l == "tessera: stopped"), "{printed:?}");
}

/// With several addresses and no `webrtc.bind_ip`, the SFU binds the default route's, not
/// whichever sorts first: checked in a network namespace with two
/// veth ends (no packet is sent; binding is all that happens) and the default route on the
/// second address.
#[test]
fn workers_engine_binds_the_default_routes_address() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let script = format!(
        "ip link set lo up && ip link add v0 type veth peer name v1 \
         && ip addr add 10.8.8.8/24 dev v0 && ip addr add 10.9.9.9/24 dev v1 \
         && ip link set v0 up && ip link set v1 up && ip route add default dev v1 \
         && exec timeout 3 {} serve --portal-addr 127.0.0.1:0 --api-addr 127.0.0.1:0 --data-dir {}",
        bin(),
        data.display()
    );
    let out = Command::new("unshare").args(["-n", "sh", "-c", &script]).env("TESSERA_SERVICE_KEY", KEY).env("NO_COLOR", "1").output().unwrap();
    let log = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let ready = log.lines().find(|l| l.contains("webrtc-agent ready")).unwrap_or_else(|| panic!("no ready line:\n{log}"));
    assert!(ready.contains("10.9.9.9:40000") && !ready.contains("10.8.8.8"), "{ready}");
    assert!(log.contains("webrtc.bind_ip is not set"), "the log says why: {log}");
}

/// curl over https trusting only `ca`: (exit success, HTTP status, body).
fn curl_https(ca: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl").arg("-sS").arg("--cacert").arg(ca).args(["-w", "\n%{http_code}"]).args(args).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (out.status.success(), code.to_string(), body.to_string())
}

/// SHA-256 of a PEM certificate's DER, as the server prints it.
fn pem_fingerprint(pem: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    sha2::Sha256::digest(der).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// Opens a websocket-only Socket.IO session over TLS (trusting `cert`) and connects `/`:
/// returns the server's CONNECT answer.
async fn socketio_over_wss(cert: &std::path::Path, portal: &str) -> String {
    use futures_util::{SinkExt, StreamExt};
    use std::sync::Arc;
    use tokio_tungstenite::tungstenite::Message;
    let tls = common::tls_trusting(cert);
    let at = portal.trim_start_matches("https://").trim_end_matches('/');
    let tcp = tokio::net::TcpStream::connect(at).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.unwrap();
    let url = format!("wss://{at}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), stream).await.unwrap();
    let text = |m: Option<Result<Message, _>>| m.unwrap().unwrap().into_text().unwrap().to_string();
    let open = text(ws.next().await);
    assert!(open.starts_with("0{") && open.contains("\"sid\""), "{open}");
    ws.send(Message::text("40")).await.unwrap();
    text(ws.next().await)
}

#[test]
fn dev_tls_serves_portal_and_api_over_https() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let mut server = start(&data, &["--dev-tls"]);
    assert!(server.api.starts_with("https://") && server.portal.starts_with("https://"), "{} {}", server.api, server.portal);
    let cert = data.join("dev-tls/cert.pem");
    let fingerprint = pem_fingerprint(&std::fs::read_to_string(&cert).unwrap());
    let printed = server.startup.iter().find(|l| l.starts_with("tessera: TLS with self-signed certificate")).cloned().unwrap_or_default();
    assert!(printed.contains(&fingerprint), "{printed:?} vs {fingerprint}");

    // The API over https: curl verifies the chain and the name against the certificate.
    let (ok, code, body) = curl_https(&cert, &[&format!("{}/v1/rooms", server.api)]);
    assert!(ok && code == "401", "{code} {body}");
    let localhost_api = server.api.replace("127.0.0.1", "localhost");
    let (ok, code, _) = curl_https(&cert, &[&format!("{localhost_api}/v1/rooms/")]);
    assert!(ok && code == "401", "{code}");
    // The portal too, and its tokens send clients to https/wss.
    let (ok, code, token) = curl_https(
        &cert,
        &["-X", "POST", "-H", "Content-Type: application/json", "-d", r#"{"user":"alice"}"#, &format!("{}/dev/token", server.portal)],
    );
    assert!(ok && code == "200", "{code} {token}");
    use base64::Engine;
    let token: serde_json::Value = serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(token.trim()).unwrap()).unwrap();
    assert_eq!(token["secure"], true, "{token}");
    // Socket.IO over wss: the websocket is served on the TLS connection itself.
    let opened = tokio::runtime::Runtime::new().unwrap().block_on(socketio_over_wss(&cert, &server.portal));
    assert!(opened.starts_with("40{\"sid\":"), "{opened}");
    // No cleartext beside it.
    let plain = Command::new("curl").args(["-sS", "-m", "5", &format!("{}/v1/rooms", server.api.replace("https://", "http://"))]).output().unwrap();
    assert!(!plain.status.success() || plain.stdout.is_empty(), "{:?}", String::from_utf8_lossy(&plain.stdout));
    // The CLI over https: it trusts the dev certificate of its --data-dir, or --ca-cert.
    let (ok, out, err) = cli(&server, &["room", "list", "--data-dir", data.to_str().unwrap()]);
    assert!(ok && out.contains("\"dev\""), "{out}{err}");
    let (ok, _, err) = cli(&server, &["room", "list", "--ca-cert", cert.to_str().unwrap(), "--data-dir", "/nonexistent"]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&server, &["room", "list", "--data-dir", "/nonexistent"]);
    assert!(!ok && err.contains("cannot reach the management API"), "an untrusted certificate is refused: {err}");
    assert!(server.terminate());

    // The certificate is kept, so a browser that accepted it keeps accepting it.
    let mut again = start(&data, &["--dev-tls"]);
    assert!(again.startup.iter().any(|l| l.contains(&fingerprint)), "{:?}", again.startup);
    assert!(again.terminate());
}

#[test]
fn tls_refuses_to_start_with_a_bad_certificate_naming_the_file() {
    let dir = tempdir();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let one = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = write("cert.pem", &one.cert.pem());
    let other_key = write("other-key.pem", &other.signing_key.serialize_pem());
    let garbage = write("garbage.pem", "not a certificate\n");
    let missing = dir.path().join("missing.pem").display().to_string();

    let err = common::refused_start(&format!("[tls]\ncert = \"{missing}\"\nkey = \"{other_key}\"\n"), &[]);
    assert!(err.contains("tls.cert") && err.contains(&missing) && err.contains("No such file"), "{err}");
    let err = common::refused_start(&format!("[tls]\ncert = \"{garbage}\"\nkey = \"{other_key}\"\n"), &[]);
    assert!(err.contains("tls.cert") && err.contains(&garbage) && err.contains("no PEM CERTIFICATE"), "{err}");
    let err = common::refused_start(&format!("[tls]\ncert = \"{cert}\"\nkey = \"{garbage}\"\n"), &[]);
    assert!(err.contains("tls.key") && err.contains(&garbage), "{err}");
    let err = common::refused_start(&format!("[tls]\ncert = \"{cert}\"\nkey = \"{other_key}\"\n"), &[]);
    assert!(err.contains(&cert) && err.contains(&other_key), "a key of another certificate: {err}");
    let err = common::refused_start(&format!("[tls]\ncert = \"{cert}\"\n"), &[]);
    assert!(err.contains("tls.key") && err.contains("needed"), "{err}");
    let err = common::refused_start(&format!("[tls]\ncert = \"{cert}\"\nkey = \"{other_key}\"\n"), &["--dev-tls"]);
    assert!(err.contains("tls.dev"), "{err}");
    // TURN over TLS without a certificate, and on IPv6.
    let err = common::refused_start("[turn]\nenabled = true\ntls_addr = \"127.0.0.1:0\"\n", &[]);
    assert!(err.contains("turn.tls_addr") && err.contains("needs a certificate"), "{err}");
    let err = common::refused_start("[turn]\nenabled = true\ntls_addr = \"[::1]:0\"\n", &["--dev-tls"]);
    assert!(err.contains("turn.tls_addr") && err.contains("IPv4"), "{err}");
}

/// A server whose stdout was closed (its supervisor's pipe gone) still stops cleanly on
/// SIGTERM: what it prints then is dropped, not a panic.
#[test]
fn a_closed_stdout_does_not_stop_the_server_from_stopping_cleanly() {
    use std::io::BufRead as _;
    let dir = common::tempdir();
    let mut child = Command::new(bin())
        .args(["serve", "--portal-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("TESSERA_SERVICE_KEY", KEY)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("portal listening on") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "the server did not start");
    }
    drop(stdout);
    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}\n{stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
