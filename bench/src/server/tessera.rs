//! Tessera under test: the real binary, started with a bench configuration, driven through
//! its portal (Client-Portal protocol over Socket.IO) and management API like any client.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;
use tessera_client::light;
use tessera_client::peer::{Connection, PublishOptions, Publisher, Subscriber};
use tessera_client::signaling::Signaling;

use super::{Keep, Launch, PeerKind, Process, Server, Sub, scratch_dir};

const KEY: &str = "bench-service-key-0123456789";

/// Where the server's log goes: the file `TESSERA_BENCH_SERVER_LOG` names (appended;
/// `RUST_LOG` chooses what is logged), else nowhere.
fn server_log() -> Stdio {
    let file = std::env::var_os("TESSERA_BENCH_SERVER_LOG").and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).ok());
    file.map_or_else(Stdio::null, Stdio::from)
}

/// A running Tessera.
pub struct Tessera {
    process: Process,
    /// Portal base URL.
    pub portal: String,
    /// Management API base URL.
    pub api: String,
    http: reqwest::Client,
    client_ip: String,
}

impl Tessera {
    /// Starts the binary on ephemeral loopback ports and waits until it listens.
    pub fn start(launch: &Launch) -> anyhow::Result<Tessera> {
        Tessera::start_with(launch, "")
    }

    /// [`Tessera::start`] with more `[portal]` settings (TOML lines).
    pub fn start_with(launch: &Launch, portal: &str) -> anyhow::Result<Tessera> {
        Tessera::start_configured(launch, portal, "")
    }

    /// [`Tessera::start`] with more tables (TOML), e.g. a `[cluster]` one.
    pub fn start_with_config(launch: &Launch, tables: &str) -> anyhow::Result<Tessera> {
        Tessera::start_configured(launch, "", tables)
    }

    fn start_configured(launch: &Launch, portal: &str, tables: &str) -> anyhow::Result<Tessera> {
        let dir = scratch_dir("tessera")?;
        let cfg = dir.join("bench.toml");
        std::fs::write(
            &cfg,
            format!(
                "[webrtc]\nbind_ip = \"{}\"\nbandwidth_estimation = {}\nworkers = {}\n[portal]\nmax_requests_per_sec = 1000\n{portal}[log]\nlevel = \"warn\"\n{tables}",
                launch.server_ip, launch.bandwidth_estimation, launch.workers
            ),
        )?;
        let mut child = launch
            .command(&launch.tessera_bin)
            .args(["serve", "--portal-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0", "--config"])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .env("TESSERA_SERVICE_KEY", KEY)
            .stdout(Stdio::piped())
            .stderr(server_log())
            .spawn()
            .with_context(|| format!("starting {}", launch.tessera_bin.display()))?;
        let stdout = child.stdout.take().context("server stdout")?;
        // Owned from here on: an error below kills it and removes its folder.
        let mut process = Process::new(child, dir, launch.cpu_quota, "tessera")?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut portal, mut api) = (None, None);
        while portal.is_none() || api.is_none() {
            let Some(Ok(line)) = lines.next() else { bail!("tessera exited before listening") };
            if let Some(a) = line.strip_prefix("tessera: portal listening on ") {
                portal = Some(a.to_string());
            }
            if let Some(a) = line.strip_prefix("tessera: management API listening on ") {
                api = Some(a.to_string());
            }
        }
        std::thread::spawn(move || for _ in lines {});
        if let Some(q) = launch.worker_quota {
            // The workers are running once the server listens.
            process.limit_threads("tessera-worker-", q, launch.workers)?;
        }
        Ok(Tessera {
            process,
            portal: portal.unwrap_or_default(),
            api: api.unwrap_or_default(),
            // Idle connections are dropped before the API's own keep-alive (5 s) ends them:
            // reusing one the server is closing fails the request.
            http: reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(2)).build()?,
            client_ip: launch.client_ip.clone(),
        })
    }

    /// A management API POST with the service key; fails on an error status.
    async fn api_post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<reqwest::Response> {
        let res = send_retrying(self.http.post(format!("{}{path}", self.api)).bearer_auth(KEY).json(body).timeout(Duration::from_secs(10))).await?;
        Ok(res.error_for_status()?)
    }

    /// A management API call with the service key; the JSON answer (a string answer as a
    /// JSON string). Fails on an error status, with the server's message.
    pub async fn api(&self, method: reqwest::Method, path: &str, body: Option<&serde_json::Value>) -> anyhow::Result<serde_json::Value> {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.api)).bearer_auth(KEY).timeout(Duration::from_secs(10));
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = send_retrying(req).await.with_context(|| format!("{method} {path}"))?;
        let status = res.status();
        let text = res.text().await?;
        if !status.is_success() {
            bail!("{method} {path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    /// Creates a room with `options` (OWT room options); returns its id.
    pub async fn create_room(&self, name: &str, options: serde_json::Value) -> anyhow::Result<String> {
        let room: serde_json::Value = self.api_post("/v1/rooms", &json!({"name": name, "options": options})).await?.json().await?;
        room["_id"].as_str().map(str::to_string).ok_or_else(|| anyhow::anyhow!("room created without an id: {room}"))
    }

    /// Logs `user` into the dev room as a presenter.
    pub async fn join(&self, user: &str) -> anyhow::Result<Signaling> {
        self.join_room("dev", user).await
    }

    /// Creates a room whose `common` view mixes at `width`×`height`, `fps`; returns its id.
    pub async fn create_mix_room(&self, width: u32, height: u32, fps: u32) -> anyhow::Result<String> {
        self.create_named_mix_room(&format!("mix-{width}x{height}@{fps}"), width, height, fps).await
    }

    /// [`Tessera::create_mix_room`] named `name` (room names are unique).
    pub async fn create_named_mix_room(&self, name: &str, width: u32, height: u32, fps: u32) -> anyhow::Result<String> {
        self.create_layered_mix_room(name, width, height, fps, &[]).await
    }

    /// [`Tessera::create_named_mix_room`] whose view has lower `layers` (`"x1/2"`, ...).
    pub async fn create_layered_mix_room(&self, name: &str, width: u32, height: u32, fps: u32, layers: &[&str]) -> anyhow::Result<String> {
        let video = json!({"parameters": {"resolution": {"width": width, "height": height}, "framerate": fps}, "layers": layers});
        self.create_room(name, json!({"views": [{"label": "common", "video": video}]})).await
    }

    /// Logs `user` into `room` as a presenter.
    pub async fn join_room(&self, room: &str, user: &str) -> anyhow::Result<Signaling> {
        let token = self.api_post(&format!("/v1/rooms/{room}/tokens"), &json!({"user": user, "role": "presenter"})).await?.text().await?;
        let mut sig = Signaling::connect(&self.portal).await?;
        sig.ok("login", Some(json!({"token": token, "protocol": "1.2"}))).await?;
        Ok(sig)
    }

    /// The address the bench's clients bind to.
    pub fn client_ip(&self) -> &str {
        &self.client_ip
    }

    /// A peer connection bound where the bench's clients live.
    pub async fn connection(&self) -> anyhow::Result<Connection> {
        Connection::new_on_baseline_srtp(&self.client_ip).await
    }
}

impl Server for Tessera {
    fn pid(&self) -> u32 {
        self.process.child.id()
    }
    async fn publish(&self, user: &str, tag: u32) -> anyhow::Result<(Arc<Publisher>, Keep)> {
        let mut sig = self.join(user).await?;
        let opts = PublishOptions { audio: true, video: true, data: false, tag, h264: false };
        let p = Publisher::start(&mut sig, opts, Some(self.connection().await?)).await?;
        sig.discard_notifications();
        Ok((Arc::new(p), Box::new(sig)))
    }
    async fn subscribe(&self, user: &str, stream: &str, peer: PeerKind) -> anyhow::Result<(Sub, Keep)> {
        let mut sig = self.join(user).await?;
        let s = match peer {
            PeerKind::Full => Sub::Full(Subscriber::start_on(&mut sig, self.connection().await?, stream, true, true, false).await?),
            PeerKind::Light { decrypts } => Sub::Light(light::subscribe(&mut sig, &self.client_ip, stream, decrypts).await?),
        };
        // Kept only to stay in the room: the others' joins it is told of are not read.
        sig.discard_notifications();
        Ok((s, Box::new(sig)))
    }
}

/// Sends `req`, and once more when it failed before any answer came (not on a timeout).
/// The API (actix) answers a connection that carried no request for 5 s with a `408` and
/// closes it (docs/rest-api.md); the HTTP client may have opened one for a request that
/// another connection then served, keep it idle, and send the next request into the 408
/// racing in ("received unexpected message from connection") — seen with the server's
/// core saturated, whose cached clock makes actix's timers fire early.
async fn send_retrying(req: reqwest::RequestBuilder) -> reqwest::Result<reqwest::Response> {
    let again = req.try_clone();
    match req.send().await {
        Err(e) if !e.is_timeout() && (e.is_request() || e.is_connect()) => match again {
            Some(again) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                again.send().await
            }
            None => Err(e),
        },
        other => other,
    }
}
