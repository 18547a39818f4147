//! Janus under test: Debian's `janus` 1.1 with only its VideoRoom plugin and HTTP
//! transport, started by the bench with its own configuration, driven through the Janus
//! HTTP API (one session per participant, one long poll per session for its events).
//!
//! Janus's ICE library (libnice) gathers no candidate on a loopback interface, so the
//! bench's network namespace carries a bridge `b0` holding two loopback-range addresses
//! (see `isolate`); Janus gathers on it and the load generator binds the other address.
//! Every packet stays in 127.0.0.0/8.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use tessera_client::light::LightPeer;
use tessera_client::peer::{Connection, PublishOptions, Publisher, Subscriber};
use tokio::sync::{Mutex, mpsc};

use super::{Keep, Launch, PeerKind, Process, Server, Sub, scratch_dir};

/// The one VideoRoom the bench uses, defined in the generated plugin configuration.
const ROOM: u64 = 1234;
/// The interface (made by `isolate`) Janus gathers candidates on.
pub const ICE_INTERFACE: &str = "b0";

/// A running Janus.
pub struct Janus {
    process: Process,
    base: String,
    http: reqwest::Client,
    client_ip: String,
}

/// Files in `folder` named `lib*.so` except `keep`: what Janus must not load.
fn all_but(folder: &str, keep: &str) -> String {
    let mut names: Vec<String> = std::fs::read_dir(folder)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".so") && n != keep).collect())
        .unwrap_or_default();
    names.sort();
    names.join(",")
}

/// Janus's module folders (Debian's multiarch layout).
fn lib_dir() -> anyhow::Result<String> {
    for d in ["/usr/lib/x86_64-linux-gnu/janus", "/usr/lib/aarch64-linux-gnu/janus", "/usr/lib/janus", "/opt/janus/lib/janus"] {
        if std::path::Path::new(d).join("plugins").is_dir() {
            return Ok(d.to_string());
        }
    }
    bail!("Janus's plugin folder was not found: install the Debian package `janus` (scripts/install-deps.sh --test)")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Janus {
    /// Writes a configuration (VideoRoom + HTTP on 127.0.0.1 only) and starts Janus.
    pub async fn start(launch: &Launch) -> anyhow::Result<Janus> {
        let dir = scratch_dir("janus")?;
        let lib = lib_dir()?;
        let port = free_port()?;
        let jcfg = format!(
            r#"general: {{
	configs_folder = "{dir}"
	plugins_folder = "{lib}/plugins"
	transports_folder = "{lib}/transports"
	events_folder = "{lib}/events"
	loggers_folder = "{lib}/loggers"
	debug_level = 3
	session_timeout = 0
	event_loops = {loops}
}}
media: {{
	rtp_port_range = "20000-60000"
}}
nat: {{
	nice_debug = false
	ice_enforce_list = "{iface}"
	ignore_mdns = true
}}
plugins: {{
	disable = "{plugins}"
}}
transports: {{
	disable = "{transports}"
}}
events: {{
	broadcast = false
	disable = "{events}"
}}
loggers: {{
	disable = "{loggers}"
}}
"#,
            dir = dir.display(),
            iface = ICE_INTERFACE,
            // One media loop per CPU Janus may use, instead of a thread per peer connection:
            // Janus's own advice for many peers, and what Tessera's runtime does too.
            loops = if launch.pin_cpu.is_some() { 1 } else { crate::isolate::cpus() },
            plugins = all_but(&format!("{lib}/plugins"), "libjanus_videoroom.so"),
            transports = all_but(&format!("{lib}/transports"), "libjanus_http.so"),
            events = all_but(&format!("{lib}/events"), ""),
            loggers = all_but(&format!("{lib}/loggers"), ""),
        );
        std::fs::write(dir.join("janus.jcfg"), jcfg)?;
        std::fs::write(
            dir.join("janus.transport.http.jcfg"),
            format!(
                "general: {{\n\tjson = \"plain\"\n\tbase_path = \"/janus\"\n\thttp = true\n\tport = {port}\n\tip = \"127.0.0.1\"\n\thttps = false\n}}\nadmin: {{\n\tadmin_http = false\n}}\n"
            ),
        )?;
        // Same treatment as Tessera's dev room: no bitrate cap, keyframes only on demand
        // (a new subscriber), VP8 and Opus.
        std::fs::write(
            dir.join("janus.plugin.videoroom.jcfg"),
            format!(
                "general: {{\n}}\nroom-{ROOM}: {{\n\tdescription = \"bench\"\n\tpublishers = 64\n\tbitrate = 0\n\tfir_freq = 0\n\tvideocodec = \"vp8\"\n\taudiocodec = \"opus\"\n\tnotify_joining = false\n\trecord = false\n}}\n"
            ),
        )?;
        let log = std::fs::File::create(dir.join("janus.log"))?;
        let child = launch
            .command(&launch.janus_bin)
            .arg("-F")
            .arg(&dir)
            .arg("-C")
            .arg(dir.join("janus.jcfg"))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", launch.janus_bin.display()))?;
        let janus = Janus {
            process: Process::new(child, dir, launch.cpu_quota, "janus")?,
            base: format!("http://127.0.0.1:{port}/janus"),
            http: reqwest::Client::new(),
            client_ip: launch.client_ip.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = janus.http.get(format!("{}/info", janus.base)).timeout(Duration::from_secs(1)).send().await;
            if up.is_ok_and(|r| r.status().is_success()) {
                return Ok(janus);
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(janus.process.dir.join("janus.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                bail!("Janus did not answer on {} within 10 s; its log ends:\n{}", janus.base, tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn session(&self) -> anyhow::Result<Session> {
        Session::create(self.http.clone(), &self.base).await
    }
}

static TRANSACTION: AtomicU64 = AtomicU64::new(1);

/// One Janus API session with one plugin handle, and the task that long-polls its events.
struct Session {
    http: reqwest::Client,
    url: String,
    handle: u64,
    events: Mutex<(mpsc::UnboundedReceiver<Value>, Vec<Value>)>,
    poller: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

async fn call(http: &reqwest::Client, url: &str, mut body: Value) -> anyhow::Result<Value> {
    body["transaction"] = json!(format!("t{}", TRANSACTION.fetch_add(1, Ordering::Relaxed)));
    let res: Value = http.post(url).json(&body).timeout(Duration::from_secs(10)).send().await?.error_for_status()?.json().await?;
    if res["janus"] == "error" {
        bail!("Janus refused {}: {}", body["janus"], res["error"]);
    }
    Ok(res)
}

impl Session {
    /// Creates a session, attaches the VideoRoom plugin and starts polling.
    async fn create(http: reqwest::Client, base: &str) -> anyhow::Result<Session> {
        let created = call(&http, base, json!({"janus": "create"})).await?;
        let id = created["data"]["id"].as_u64().ok_or_else(|| anyhow!("Janus create answered {created}"))?;
        let url = format!("{base}/{id}");
        let attached = call(&http, &url, json!({"janus": "attach", "plugin": "janus.plugin.videoroom"})).await?;
        let handle = attached["data"]["id"].as_u64().ok_or_else(|| anyhow!("Janus attach answered {attached}"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (poll_http, poll_url) = (http.clone(), url.clone());
        let poller = tokio::spawn(async move {
            loop {
                // Janus answers a long poll after 30 s without events with a keepalive.
                let got = poll_http.get(format!("{poll_url}?maxev=20")).timeout(Duration::from_secs(40)).send().await;
                let Ok(res) = got else { break };
                let Ok(v) = res.json::<Value>().await else { break };
                let list = match v {
                    Value::Array(a) => a,
                    other => vec![other],
                };
                for ev in list {
                    if tx.send(ev).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Session { http, url, handle, events: Mutex::new((rx, Vec::new())), poller })
    }

    /// Sends a plugin message (with a JSEP, if any) to this session's handle.
    async fn message(&self, body: Value, jsep: Option<Value>) -> anyhow::Result<Value> {
        let mut msg = json!({"janus": "message", "body": body});
        if let Some(j) = jsep {
            msg["jsep"] = j;
        }
        call(&self.http, &format!("{}/{}", self.url, self.handle), msg).await
    }

    /// Waits for an event of this handle that `pred` accepts; fails on a plugin error.
    async fn wait(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let mut guard = self.events.lock().await;
        let (rx, backlog) = &mut *guard;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut i = 0;
        loop {
            while i < backlog.len() {
                let ev = &backlog[i];
                if ev["sender"].as_u64() == Some(self.handle) {
                    if let Some(err) = ev["plugindata"]["data"].get("error").cloned() {
                        let ev = backlog.remove(i);
                        bail!("Janus refused while waiting for {what}: {err} ({})", ev["plugindata"]["data"]["error_code"]);
                    }
                    if pred(ev) {
                        return Ok(backlog.remove(i));
                    }
                }
                i += 1;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(ev)) => backlog.push(ev),
                Ok(None) => bail!("Janus session closed while waiting for {what}"),
                Err(_) => bail!("timed out after {timeout:?} waiting for Janus {what}"),
            }
        }
    }
}

impl Server for Janus {
    fn pid(&self) -> u32 {
        self.process.child.id()
    }

    async fn publish(&self, user: &str, tag: u32) -> anyhow::Result<(Arc<Publisher>, Keep)> {
        let session = self.session().await?;
        let conn = Connection::new_on_baseline_srtp(&self.client_ip).await?;
        let prepared = Publisher::prepare(PublishOptions { audio: true, video: true, data: false, tag, h264: false }, conn).await?;
        session
            .message(
                json!({"request": "joinandconfigure", "room": ROOM, "ptype": "publisher", "display": user}),
                Some(json!({"type": "offer", "sdp": prepared.offer, "trickle": false})),
            )
            .await?;
        let joined = session.wait("publisher answer", Duration::from_secs(10), |e| e["jsep"]["type"] == "answer").await?;
        let feed = joined["plugindata"]["data"]["id"].as_u64().ok_or_else(|| anyhow!("Janus joined without a feed id: {joined}"))?;
        let sdp = joined["jsep"]["sdp"].as_str().ok_or_else(|| anyhow!("Janus answer without sdp"))?.to_string();
        prepared.conn.apply_answer(sdp).await?;
        let publisher = Arc::new(prepared.finish(feed.to_string()).await?);
        // Janus refuses subscriptions to a feed until it receives the feed's media: send
        // until it says so (as Tessera's publish waits for its `ready`).
        let sending = {
            let p = publisher.clone();
            tokio::spawn(async move {
                loop {
                    p.send_video(600).await;
                    p.send_audio().await;
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            })
        };
        let got = session
            .wait("publisher media", Duration::from_secs(10), |e| e["janus"] == "media" && e["type"] == "video" && e["receiving"] == true)
            .await;
        sending.abort();
        got?;
        Ok((publisher, Box::new(session)))
    }

    async fn subscribe(&self, _user: &str, stream: &str, peer: PeerKind) -> anyhow::Result<(Sub, Keep)> {
        let feed: u64 = stream.parse().with_context(|| format!("`{stream}` is not a Janus feed id"))?;
        let session = self.session().await?;
        session.message(json!({"request": "join", "room": ROOM, "ptype": "subscriber", "streams": [{"feed": feed}]}), None).await?;
        let attached = session.wait("subscriber offer", Duration::from_secs(10), |e| e["jsep"]["type"] == "offer").await?;
        let offer = attached["jsep"]["sdp"].as_str().ok_or_else(|| anyhow!("Janus offer without sdp"))?.to_string();
        let id = format!("janus-{}", session.handle);
        let sub = match peer {
            PeerKind::Full => {
                let conn = Connection::new_on_baseline_srtp(&self.client_ip).await?;
                let answer = conn.answer(offer).await?;
                session.message(json!({"request": "start"}), Some(json!({"type": "answer", "sdp": answer, "trickle": false}))).await?;
                let received = conn.received.clone();
                Sub::Full(Subscriber { conn, id, received, data: Default::default() })
            }
            PeerKind::Light { decrypts } => {
                let mut light = LightPeer::new(&self.client_ip, decrypts).await?;
                let answer = light.answer(offer.clone())?;
                session.message(json!({"request": "start"}), Some(json!({"type": "answer", "sdp": answer, "trickle": false}))).await?;
                Sub::Light(light.start(id, &offer))
            }
        };
        Ok((sub, Box::new(session)))
    }
}
