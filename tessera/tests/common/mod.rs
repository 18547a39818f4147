//! Test harness: starts the real `tessera` binary on ephemeral loopback ports with its
//! own data folder, and talks to it over HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub mod bridge;
pub mod files;
pub mod layers;
pub mod mix;

pub const KEY: &str = "test-service-key-0123456789";

/// Publishing camera and microphone with this marker tag.
pub fn av(tag: u32) -> tessera_client::peer::PublishOptions {
    tessera_client::peer::PublishOptions { audio: true, video: true, data: false, tag, h264: false }
}

pub struct Server {
    pub child: Child,
    pub api: String,
    pub portal: String,
    pub lines: mpsc::Receiver<String>,
    /// Stdout lines printed before the server listened.
    pub startup: Vec<String>,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tessera")
}

/// Starts a server with `config` as its TOML file, in a fresh directory kept alive as long
/// as the returned guard.
pub fn start_with_config(config: &str) -> (tempfile::TempDir, Server) {
    start_with_config_args(config, &[])
}

/// Like [`start_with_config`], with extra command-line arguments.
pub fn start_with_config_args(config: &str, extra: &[&str]) -> (tempfile::TempDir, Server) {
    let dir = tempdir();
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, config).unwrap();
    let mut args = vec!["--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    let s = start(&dir.path().join("data"), &args);
    (dir, s)
}

/// Starts `tessera serve` with the given extra args and data dir, waiting until it listens.
pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
    start_with_env(data_dir, extra, &[("TESSERA_SERVICE_KEY", KEY)])
}

pub fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
    start_in(&[], "127.0.0.1", data_dir, extra, env)
}

/// Starts the server with `prefix` before it (e.g. `nsenter -t PID -n`: in another
/// network namespace), its portal and API listening on `ip`.
pub fn start_in(prefix: &[String], ip: &str, data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let mut cmd = match prefix.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(bin());
            c
        }
        None => Command::new(bin()),
    };
    let (portal_addr, api_addr) = (format!("{ip}:0"), format!("{ip}:0"));
    cmd.args(["serve", "--portal-addr", &portal_addr, "--api-addr", &api_addr, "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env_remove("TESSERA_SERVICE_KEY")
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn tessera");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let err_buf = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let eb = err_buf.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if std::env::var("TESSERA_TEST_VERBOSE").is_ok() {
                eprintln!("[server] {line}");
            }
            eb.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut api, mut portal) = (None, None);
    let mut startup = Vec::new();
    while api.is_none() || portal.is_none() {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                startup.push(line.clone());
                // A cluster node without the portal role has no portal, and no API: its
                // HTTP server, if any, serves `/metrics` alone.
                if let Some(a) = line.strip_prefix("tessera: metrics listening on ") {
                    api = Some(a.trim_end_matches("/metrics").to_string());
                }
                if line.ends_with("(no portal)") {
                    api.get_or_insert_with(String::new);
                    portal = Some(String::new());
                }
                if let Some(a) = line.strip_prefix("tessera: management API listening on ") {
                    api = Some(a.to_string());
                }
                if let Some(a) = line.strip_prefix("tessera: portal listening on ") {
                    portal = Some(a.to_string());
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start; stderr:\n{}", err_buf.lock().unwrap());
            }
        }
    }
    Server { child, api: api.unwrap(), portal: portal.unwrap(), lines: rx, startup, stderr: err_buf }
}

impl Server {
    /// A management API call with the service key: its status, and its body as JSON (or as
    /// a JSON string when it is not JSON).
    pub async fn api(&self, method: reqwest::Method, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        let mut req = self.client().request(method, self.url(path)).bearer_auth(KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status success.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        for _ in 0..100 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        false
    }

    /// Creates a room with a unique name and these OWT room options; returns its id.
    pub async fn new_room(&self, options: serde_json::Value) -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!("room-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let res = self
            .client()
            .post(self.url("/v1/rooms"))
            .bearer_auth(KEY)
            .json(&serde_json::json!({"name": name, "options": options}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "creating a room");
        let v: serde_json::Value = res.json().await.unwrap();
        v["id"].as_str().unwrap().to_string()
    }

    /// Logs `user` into `room` as a presenter on a new Socket.IO connection; returns the
    /// connection and the login result.
    pub async fn join(&self, room: &str, user: &str) -> (tessera_client::signaling::Signaling, serde_json::Value) {
        let token = self.token(room, user, "presenter").await;
        let mut sig = tessera_client::signaling::Signaling::connect(&self.portal).await.unwrap();
        let login = serde_json::json!({"token": token, "userAgent": {"sdk": {"type": "Rust", "version": "1"}}, "protocol": "1.2"});
        let info = sig.ok("login", Some(login)).await.unwrap();
        (sig, info)
    }

    pub fn client(&self) -> reqwest::Client {
        http()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.api, path)
    }

    /// Issues a token for `user` with `role` in `room` over REST.
    pub async fn token(&self, room: &str, user: &str, role: &str) -> String {
        let res = self
            .client()
            .post(self.url(&format!("/v1/rooms/{room}/tokens")))
            .bearer_auth(KEY)
            .json(&serde_json::json!({"user": user, "role": role}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.text().await.unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `tessera serve` with `config` as its file and `extra` flags, expecting it to refuse
/// to start; returns what it wrote to stderr.
#[allow(dead_code)]
pub fn refused_start(config: &str, extra: &[&str]) -> String {
    let dir = tempdir();
    std::fs::write(dir.path().join("t.toml"), config).unwrap();
    let out = Command::new(bin())
        .args(["serve", "--portal-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0", "--config"])
        .arg(dir.path().join("t.toml"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(extra)
        .env_remove("TESSERA_SERVICE_KEY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "it started with {config:?}: {err}");
    err
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The network namespace of the run that started the test's own (so the inner run can
/// tell it is not on the host's).
pub const OUTER_NETNS: &str = "TESSERA_TEST_OUTER_NETNS";

/// Runs the calling test again inside a fresh network namespace holding only loopback
/// (`unshare -n`), for tests that must not share the host's network (cluster tests).
/// Returns `true` in that inner run, where the test does its work; in the outer run it
/// waits for the inner one, fails if it failed, and returns `false`.
pub fn in_own_netns(test: &str) -> bool {
    if std::env::var("TESSERA_TEST_NETNS").is_ok() {
        return true;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let script = format!("ip link set lo up && exec {} {test} --exact --nocapture --test-threads=1", exe.display());
    let outer = std::fs::read_link("/proc/self/ns/net").unwrap_or_default();
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .env("TESSERA_TEST_NETNS", "1")
        .env(OUTER_NETNS, outer)
        .output()
        .expect("run unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stdout.contains("1 passed"), "{test} in its network namespace failed:\n{stdout}\n{stderr}");
    println!("{stdout}");
    if std::env::var("TESSERA_TEST_VERBOSE").is_ok() {
        eprintln!("{stderr}");
    }
    false
}

/// A reqwest client. The workspace's reqwest has rustls without a built-in crypto provider
/// (the server installs ring at start), so a process that builds clients installs it first.
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// A TLS client configuration that trusts the certificates of the PEM file at `cert` (a
/// server's `--dev-tls` certificate).
pub fn tls_trusting(cert: &Path) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&std::fs::read(cert).unwrap()) {
        roots.add(c.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}
