//! `tessera serve`: loads the configuration, prepares the data folder, and runs the
//! portal and the management API until SIGINT/SIGTERM.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tessera_config::Config;
use tessera_core::ticket::TicketAuthority;
use tessera_core::token::{PortalAddress, TokenAuthority};

/// Prints a line to stdout, or nothing if stdout is gone: a server whose output pipe was
/// closed (a supervisor restarted, `| head`) goes on serving, and stops cleanly, instead of
/// panicking as `println!` does.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
use tessera_core::{Room, RoomStore, Rooms};
use tracing::{info, warn};

/// Flags of `tessera serve`; each overrides the config file.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// TOML config file (see config/tessera.example.toml); built-in defaults when absent.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Portal (signaling, demo page) address, overrides server.portal_addr.
    #[arg(long)]
    portal_addr: Option<String>,
    /// Management API address, overrides server.api_addr.
    #[arg(long)]
    api_addr: Option<String>,
    /// Data folder, overrides server.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Join the cluster on this NATS server (nats://host:4222), overrides cluster.nats_url.
    #[arg(long, value_name = "NATS_URL")]
    cluster: Option<String>,
    /// This node's roles in the cluster (portal,webrtc,mixer,recorder), overrides cluster.roles.
    #[arg(long, value_delimiter = ',')]
    roles: Option<Vec<String>>,
    /// Serve https/wss with a self-signed certificate for a LAN demo, sets tls.dev.
    #[arg(long)]
    dev_tls: bool,
}

fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(a) = &args.portal_addr {
        config.server.portal_addr = a.clone();
    }
    if let Some(a) = &args.api_addr {
        config.server.api_addr = a.clone();
    }
    if let Some(d) = &args.data_dir {
        config.server.data_dir = d.clone();
    }
    if let Some(url) = &args.cluster {
        config.cluster.nats_url = url.clone();
    }
    if let Some(roles) = &args.roles {
        config.cluster.roles = roles.iter().map(|r| r.trim().to_string()).collect();
    }
    if args.dev_tls {
        config.tls.dev = true;
    }
    config.apply_env();
    // Flags and the environment may have brought new values: check again. Errors then
    // name the key; the file is named only if the value could have come from it.
    config.validate(args.config.as_deref())?;
    config.cluster.check_roles_alone().map_err(|e| anyhow::anyhow!("config error: {e}"))?;
    config.check_turn_tls().map_err(|e| anyhow::anyhow!("config error: {e}"))?;
    config.prepare_dirs(args.config.as_deref())?;
    Ok(config)
}

/// Returns the service key: configured, or read from / generated into `<data_dir>/service.key`.
fn service_key(config: &Config) -> anyhow::Result<String> {
    if !config.service.key.is_empty() {
        return Ok(config.service.key.clone());
    }
    let path = config.server.data_dir.join("service.key");
    if let Some(key) = read_key_file(&path)? {
        return Ok(key);
    }
    let key = tessera_core::ids::random_hex(32);
    write_private(&path, &key).with_context(|| format!("writing {}", path.display()))?;
    // Printed once, at generation: later starts read the file silently.
    say!("tessera: generated a service key (saved in {}): {key}", path.display());
    Ok(key)
}

/// The TURN credentials' shared secret: configured, the cluster's (every node's TURN
/// server must accept every portal's credentials), or `<data_dir>/turn.secret`.
async fn turn_secret(config: &Config, cluster: Option<&tessera_cluster::ClusterNode>) -> anyhow::Result<String> {
    let configured = (!config.turn.secret.is_empty()).then(|| config.turn.secret.clone());
    let path = config.server.data_dir.join("turn.secret");
    let local = match &configured {
        Some(s) => Some(s.clone()),
        None => read_key_file(&path)?,
    };
    let secret = match cluster {
        Some(node) => {
            let proposed = local.clone().unwrap_or_else(|| tessera_core::ids::random_hex(32));
            let agreed = node.agree_secret("turn-secret", &proposed).await.context("agreeing on the cluster's TURN secret")?;
            if configured.as_ref().is_some_and(|c| *c != agreed) {
                anyhow::bail!("config key `turn.secret` differs from the TURN secret of the cluster at {}", config.cluster.nats_url);
            }
            agreed
        }
        None => match local {
            Some(s) => s,
            None => {
                let s = tessera_core::ids::random_hex(32);
                write_private(&path, &s).with_context(|| format!("writing {}", path.display()))?;
                s
            }
        },
    };
    Ok(secret)
}

/// The key in `<data_dir>/service.key`, if the file exists.
fn read_key_file(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(k) if k.trim().len() >= 16 => Ok(Some(k.trim().to_string())),
        Ok(_) => anyhow::bail!("{} holds no usable key (need at least 16 characters); delete it to generate a new one", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The service key of a cluster node: every node must accept the same credentials and
/// sign tokens with the same key. The first node to join sets it (its configured key, or
/// its `service.key` file, or a new one); the others use it, refusing to start if they
/// were configured with another; a node without a configured key keeps the cluster's in
/// its `service.key`, so the CLI on that machine finds it.
async fn cluster_service_key(config: &Config, node: &tessera_cluster::ClusterNode) -> anyhow::Result<String> {
    let configured = (!config.service.key.is_empty()).then(|| config.service.key.clone());
    let path = config.server.data_dir.join("service.key");
    let local = match &configured {
        Some(_) => None,
        None => read_key_file(&path)?,
    };
    let proposed = configured.clone().or_else(|| local.clone()).unwrap_or_else(|| tessera_core::ids::random_hex(32));
    let agreed = node.agree_secret("service-key", &proposed).await.context("agreeing on the cluster's service key")?;
    match configured {
        Some(k) if k != agreed => anyhow::bail!(
            "config key `service.key` (or TESSERA_SERVICE_KEY) differs from the service key of the cluster at {} (set by the \
             first node that joined it): give every node the same key, or leave it unset to use the cluster's",
            config.cluster.nats_url
        ),
        Some(_) => {}
        None if local.as_deref() == Some(agreed.as_str()) => {}
        None => {
            if local.is_some() {
                std::fs::remove_file(&path).with_context(|| format!("replacing {}", path.display()))?;
            }
            write_private(&path, &agreed).with_context(|| format!("writing {}", path.display()))?;
            if agreed == proposed {
                // Printed once, at generation, as for a single node.
                say!("tessera: generated the cluster's service key (saved in {}): {agreed}", path.display());
            } else {
                say!("tessera: this node uses the cluster's service key (saved in {})", path.display());
            }
        }
    }
    Ok(agreed)
}

pub(crate) fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")
}

/// Creates the configured default room when it is missing.
async fn ensure_default_room(config: &Config, store: &dyn Rooms) -> anyhow::Result<()> {
    let id = &config.rooms.default_room;
    if id.is_empty() || store.get(id).is_some() {
        return Ok(());
    }
    if !tessera_core::ids::is_valid_id(id) {
        anyhow::bail!("config key `rooms.default_room`: `{id}` must be letters, digits, '-' or '_'");
    }
    let room = Room::from_options(id.clone(), id.clone(), serde_json::json!({})).with_context(|| format!("default room `{id}`"))?;
    match store.create(room).await {
        Ok(_) => info!(room = %id, "default room created"),
        Err(tessera_core::StoreError::Conflict(why)) => {
            // Another node of the cluster is creating it: it reaches this node's copy of
            // the rooms within moments.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while store.get(id).is_none() {
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!("creating default room `{id}`: {why}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Err(e) => return Err(e).with_context(|| format!("creating default room `{id}`")),
    }
    Ok(())
}

fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr} for the {what}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// webrtc-rs warns once per packet in normal situations (e.g. media before DTLS is up);
/// keep its crates at `error` unless the filter names them.
const QUIET_DEPS: [&str; 6] = ["rtc", "rtc_ice", "rtc_dtls", "rtc_srtp", "rtc_sctp", "webrtc"];

fn with_quiet_deps(filter: &str) -> String {
    let mut f = filter.to_string();
    for dep in QUIET_DEPS {
        if !filter.split(',').any(|d| d.trim().starts_with(&format!("{dep}=")) || d.trim().starts_with(&format!("{dep}::"))) {
            f.push_str(&format!(",{dep}=error"));
        }
    }
    f
}

fn init_tracing(level: &str) {
    let from_env = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
    let filter = tracing_subscriber::EnvFilter::try_new(with_quiet_deps(from_env.as_deref().unwrap_or(level)))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// SIGINT/SIGTERM, installed before the server says it listens: a signal sent right
/// after that line must stop it cleanly, not kill it with the default action.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Signals { term: signal(SignalKind::terminate()).ok(), int: signal(SignalKind::interrupt()).ok() }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Waits for SIGINT or SIGTERM.
    async fn wait(&mut self) {
        #[cfg(unix)]
        {
            let term = async {
                match &mut self.term {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let int = async {
                match &mut self.int {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = term => {}
                _ = int => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs the server until a shutdown signal.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut signals = Signals::install();
    let config = load_config(&args)?;
    init_tracing(&config.log.level);
    let local_rooms = RoomStore::open(config.server.data_dir.join("rooms.db"))?;
    // Without a cluster a node has every role (checked by the config).
    let is_portal = config.cluster.has_role("portal");
    // Before anything binds: a bad certificate stops the start naming the file.
    let tls = if is_portal || !config.turn.tls_addr.is_empty() { crate::tls::load(&config)? } else { None };
    let listeners = if is_portal {
        let portal_listener = bind(&config.server.portal_addr, "portal")?;
        let api_listener = bind(&config.server.api_addr, "management API")?;
        Some((portal_listener, api_listener))
    } else {
        None
    };

    // The SFU is the media node for sessions and, through the media seam, the source of
    // streams for the mixer and recorder; the mixer's stream updates go to the portal with
    // the SFU's events.
    let (sfu, agent_events) = if config.cluster.has_role("webrtc") {
        let settings = tessera_webrtc_agent::AgentSettings::from_config(&config);
        let (sfu, events) =
            tessera_webrtc_agent::WorkerAgent::new(settings, config.webrtc.workers).map_err(|e| anyhow::anyhow!("webrtc workers: {e}"))?;
        (Some(sfu), Some(events))
    } else {
        (None, None)
    };
    // Without the SFU (a mixer or recorder node of a cluster) streams live in a plain
    // fan-out: the mixer's own, and those the relay brings from other nodes.
    let streams: Option<Arc<dyn tessera_core::media::StreamSource>> = match &sfu {
        Some(sfu) => Some(sfu.clone()),
        None if config.cluster.has_role("mixer") || config.cluster.has_role("recorder") => Some(tessera_cluster::relay::LocalStreams::new()),
        None => None,
    };
    let (mixer_events, agent_events) = match (&sfu, agent_events) {
        (Some(sfu), events) => (Some(sfu.event_sender()), events),
        (None, _) if config.cluster.has_role("mixer") => {
            let (tx, rx) = tokio::sync::mpsc::channel(1024);
            (Some(tx), Some(rx))
        }
        (None, events) => (None, events),
    };
    let mixer = match (&streams, mixer_events) {
        (Some(streams), Some(events)) if config.cluster.has_role("mixer") => Some(tessera_mixer::Mixer::new(streams.clone(), events)),
        _ => None,
    };
    let recorder = match &streams {
        Some(streams) if config.cluster.has_role("recorder") => Some(tessera_recorder::Recorder::new(streams.clone(), config.recordings_dir())),
        _ => None,
    };

    // This node's load, for the node list and (in a cluster) its heartbeat.
    let load = {
        let (sfu, mixer, cpu) = (sfu.clone(), mixer.clone(), crate::node::CpuMeter::new());
        Arc::new(move || {
            let m = sfu.as_ref().map(|s| s.stats()).unwrap_or_default();
            tessera_core::node::NodeLoad {
                cpu_pct: cpu.sample(),
                transports: m.transports,
                publications: m.publications + m.local_streams,
                subscriptions: m.subscriptions,
                views: mixer.as_ref().map_or(0, |m| m.view_count()),
            }
        })
    };
    let node_id = crate::node::node_id(&config.cluster.node_id, &config.server.data_dir)?;
    // A media node of a cluster binds its relay socket before joining, so its entry names it.
    let relay_socket = match (&streams, config.cluster.nats_url.is_empty()) {
        (Some(_), false) => {
            let addr = match config.cluster.relay_socket() {
                Some(a) => a,
                None => {
                    let ips = tessera_webrtc_agent::AgentSettings::from_config(&config).bind_ips;
                    let ip = tessera_webrtc_agent::net::primary_ip(&ips).unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
                    if ip.is_unspecified() {
                        anyhow::bail!("config key `cluster.relay_addr`: webrtc.bind_ip is {ip}; name the address other nodes reach this one at");
                    }
                    SocketAddr::new(ip, 0)
                }
            };
            Some(tessera_cluster::relay::bind(addr)?)
        }
        _ => None,
    };
    let cluster = if config.cluster.nats_url.is_empty() {
        None
    } else {
        let relay_addr = relay_socket.as_ref().and_then(|s| s.local_addr().ok()).map(|a| a.to_string()).unwrap_or_default();
        let roles = config.cluster.roles().iter().filter_map(|r| r.parse().ok()).collect();
        let settings = tessera_cluster::ClusterSettings {
            nats_url: config.cluster.nats_url.clone(),
            node_id: node_id.clone(),
            roles,
            relay_addr,
            region: config.cluster.region.clone(),
        };
        let node = tessera_cluster::ClusterNode::join(settings).await?;
        let load = load.clone();
        node.spawn_heartbeat(move || load());
        say!("tessera: node `{node_id}` joined the cluster at {} as {}", config.cluster.nats_url, config.cluster.roles().join(","));
        Some(node)
    };
    // The relay: streams of other nodes for this node's subscribers, mixer and recorder;
    // this node's streams for theirs.
    let mut relay = None;
    if let (Some(node), Some(socket), Some(streams)) = (&cluster, relay_socket, &streams) {
        let key = match config.cluster.relay_auth {
            true => Some(node.agree_secret("relay-key", &tessera_core::ids::random_hex(32)).await.context("the cluster's relay key")?),
            false => None,
        };
        let started = tessera_cluster::relay::Relay::start(node.clone(), socket, key.as_deref().map(str::as_bytes), streams.clone())?;
        say!("tessera: media relay on {} ({})", started.addr(), if key.is_some() { "authenticated" } else { "unauthenticated" });
        let importer: Arc<dyn tessera_core::media::StreamImporter> = started.clone();
        relay = Some(started);
        if let Some(sfu) = &sfu {
            sfu.set_importer(importer.clone());
        }
        if let Some(mixer) = &mixer {
            mixer.set_importer(importer.clone());
        }
        if let Some(recorder) = &recorder {
            recorder.set_importer(importer);
        }
    }
    // The service key signs tokens and webhooks: this node's, or the cluster's. Only a
    // portal may set the cluster's; a media node reads it, for its webhooks only.
    let key = match (&cluster, is_portal) {
        (None, _) => Some(service_key(&config)?),
        (Some(node), true) => Some(cluster_service_key(&config, node).await?),
        (Some(node), false) if !config.webhooks.urls.is_empty() => node.secret("service-key").await?,
        (Some(_), false) => None,
    };
    let hooks = match &key {
        Some(key) if !config.webhooks.urls.is_empty() => Some(crate::webhooks::Webhooks::start(&config.webhooks.urls, key)?),
        None if !config.webhooks.urls.is_empty() => {
            warn!("webhooks are off on this node: the cluster has no service key yet (start a portal node first)");
            None
        }
        _ => None,
    };
    if let (Some(hooks), Some(recorder)) = (&hooks, &recorder) {
        recorder.set_hooks(hooks.clone());
    }
    let turn_secret = match config.turn.hands_out_credentials() {
        true => Some(turn_secret(&config, cluster.as_deref()).await?),
        false => None,
    };
    let turn = match (&turn_secret, &sfu) {
        (Some(secret), Some(sfu)) if config.turn.enabled => {
            let tls = tls.as_ref().map(|t| Arc::new(t.server.clone()));
            Some(crate::turn::Turn::start(&config, secret.as_bytes(), sfu.addrs(), tls).await?)
        }
        _ => None,
    };
    if let Some(t) = &turn {
        let tls = t.tls_bound.map(|a| format!(" and {a} (TLS)")).unwrap_or_default();
        say!("tessera: TURN server listening on {}{tls} ({})", t.bound, t.urls.join(", "));
    }
    // This node's own parts; in a cluster they also serve other nodes' portals over NATS,
    // and this node's portal places rooms on any node's parts.
    let local = tessera_core::command::LocalRouter {
        agent: sfu.clone().map(|s| s as Arc<dyn tessera_core::command::MediaNode>),
        mixer: mixer.clone().map(|m| m as Arc<dyn tessera_core::command::MixNode>),
        recorder: recorder.clone().map(|r| r as Arc<dyn tessera_core::command::RecorderNode>),
    };
    let (router, portal_events): (Arc<dyn tessera_core::command::Router>, _) = match &cluster {
        // One process: every node is local and commands pass as values.
        None => (Arc::new(local), agent_events),
        Some(node) => {
            let (to_portal, portal_events) = tokio::sync::mpsc::channel(1024);
            let served = tessera_cluster::rpc::Served { media: local.agent.clone(), mixer: local.mixer.clone(), recorder: local.recorder.clone() };
            let own = tessera_cluster::rpc::serve(node, served, agent_events, is_portal.then(|| to_portal.clone()));
            let local = tessera_core::command::LocalRouter { agent: own.media, mixer: own.mixer, recorder: own.recorder };
            if is_portal {
                tessera_cluster::rpc::receive_events(node.client(), &node_id, to_portal.clone());
            }
            let lost = is_portal.then(|| to_portal.clone());
            (tessera_cluster::router::ClusterRouter::new(node.clone(), local, config.cluster.room_spread, lost), Some(portal_events))
        }
    };
    let (Some((portal_listener, api_listener)), true) = (listeners, is_portal) else {
        // A media node: it serves its parts to the portals until told to stop (and its own
        // `/metrics` where asked: it has no API).
        let metrics_server = match config.server.metrics && !config.server.metrics_addr.is_empty() {
            true => {
                let listener = bind(&config.server.metrics_addr, "metrics (server.metrics_addr)")?;
                let bound = listener.local_addr()?;
                let sources = crate::metrics::Sources {
                    portal: None,
                    sfu: sfu.clone(),
                    mixer: mixer.clone(),
                    recorder: recorder.clone(),
                    relay: relay.clone(),
                };
                let metrics = crate::metrics::Metrics::install(sources)?;
                let server = tessera_management_api::serve_metrics(listener, Arc::new(move || metrics.render()))?;
                say!("tessera: metrics listening on http://{bound}/metrics");
                let handle = server.handle();
                tokio::spawn(server);
                Some(handle)
            }
            false => None,
        };
        say!("tessera: node `{node_id}` serves {} (no portal)", config.cluster.roles().join(","));
        info!(node = %node_id, "media node started");
        signals.wait().await;
        let drain = Duration::from_secs(config.server.drain_timeout_secs);
        if let (Some(node), false) = (&cluster, drain.is_zero()) {
            // Portals place nothing new here from the next heartbeat on; what runs goes on
            // until its participants leave (and recordings end), the timeout, or a second
            // signal. Rooms already placed here keep their sessions here until they empty.
            node.set_draining(true);
            let busy = || {
                let transports = sfu.as_ref().map_or(0, |s| s.stats().transports);
                let recording = recorder.as_ref().map_or(0, |r| r.counts().0);
                (transports, recording)
            };
            let (transports, recording) = busy();
            say!("tessera: draining for up to {} s ({transports} transports, {recording} recordings)", drain.as_secs());
            info!(timeout_secs = drain.as_secs(), transports, recording, "media node draining");
            let deadline = tokio::time::Instant::now() + drain;
            loop {
                if busy() == (0, 0) {
                    info!("drained: no transport or recording left");
                    break;
                }
                tokio::select! {
                    _ = signals.wait() => { info!("second signal: stopping now"); break; }
                    _ = tokio::time::sleep_until(deadline) => { info!(busy = ?busy(), "drain timeout"); break; }
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
        if let Some(node) = &cluster {
            node.leave().await;
        }
        if let Some(recorder) = &recorder {
            recorder.shutdown().await;
        }
        if let Some(t) = &turn {
            t.stop().await;
        }
        if let Some(hooks) = &hooks {
            hooks.flush(Duration::from_secs(5)).await;
        }
        if let Some(handle) = metrics_server {
            handle.stop(true).await;
        }
        say!("tessera: stopped");
        return Ok(());
    };
    let key = key.ok_or_else(|| anyhow::anyhow!("a portal node has a service key"))?;
    let portal_bound: SocketAddr = portal_listener.local_addr()?;
    let api_bound: SocketAddr = api_listener.local_addr()?;
    // Rooms, the service key, used tokens and the ticket key: this node's own, or the
    // cluster's (shared by every node, so any portal admits any participant).
    let (store, admission_parts): (Arc<dyn Rooms>, _) = match &cluster {
        None => (Arc::new(local_rooms), None),
        Some(node) => {
            let rooms = node.rooms(local_rooms.list()).await.context("the cluster's rooms")?;
            let ledger = node.token_ledger().await.context("the cluster's token ledger")?;
            let ticket_key = node.agree_secret("ticket-key", &tessera_core::ids::random_hex(32)).await.context("the cluster's ticket key")?;
            (rooms, Some((Arc::new(ledger), TicketAuthority::with_key(ticket_key.as_bytes()))))
        }
    };
    ensure_default_room(&config, store.as_ref()).await?;
    let tokens = TokenAuthority::new(key.as_bytes());
    let admission = match admission_parts {
        None => tessera_portal::Admission::local(tokens.clone()),
        Some((ledger, tickets)) => tessera_portal::Admission { tokens: tokens.clone(), ledger, tickets },
    };
    let nodes: Arc<dyn tessera_core::node::NodeDirectory> = match &cluster {
        Some(node) => node.clone(),
        None => Arc::new(crate::node::LocalNode::new(node_id, Box::new(move || load()))),
    };
    let mut portal_settings = tessera_portal::PortalSettings::from_config(&config);
    if let Some(secret) = &turn_secret {
        let mut urls: Vec<String> = turn.iter().flat_map(|t| t.urls.clone()).collect();
        urls.extend(config.turn.external_urls.iter().cloned());
        portal_settings.turn = Some(tessera_portal::settings::TurnGrant {
            urls,
            secret: secret.as_bytes().to_vec(),
            lifetime: Duration::from_secs(config.turn.credential_lifetime_secs),
        });
    }
    let portal = tessera_portal::Portal::new(portal_settings, store.clone(), admission, router.clone(), portal_events);
    if let Some(hooks) = &hooks {
        portal.set_hooks(hooks.clone());
    }
    // In a cluster each live room has one home among the portal nodes (docs/cluster.md).
    if let Some(node) = &cluster {
        let homes = tessera_cluster::homes::ClusterHomes::start(node.clone()).await.context("the cluster's room homes")?;
        homes.serve(Arc::new(portal.clone()));
        portal.set_homes(homes);
    }
    let drain_requested = Arc::new(tokio::sync::Notify::new());
    let api_state = tessera_management_api::ApiState {
        store: store.clone(),
        tokens: tokens.clone(),
        credentials: tessera_management_api::Credentials { service_id: config.service.id.clone(), service_key: key.clone() },
        portal: PortalAddress { host: config.portal_public_host(portal_bound), secure: config.portal.secure || tls.is_some() },
        token_lifetime_secs: config.portal.token_lifetime_secs,
        control: portal.control(),
        router,
        drain: Some(drain_requested.clone()),
        cors_origins: config.server.api_cors_origins.clone(),
        nodes,
        metrics: match config.server.metrics {
            true => {
                let sources = crate::metrics::Sources {
                    portal: Some(portal.clone()),
                    sfu: sfu.clone(),
                    mixer: mixer.clone(),
                    recorder: recorder.clone(),
                    relay: relay.clone(),
                };
                let metrics = crate::metrics::Metrics::install(sources)?;
                Some(Arc::new(move || metrics.render()))
            }
            false => None,
        },
    };
    let dev_tokens = config.dev_tokens_enabled(portal_bound).then(|| crate::portal_routes::DevTokens {
        store: store.clone(),
        tokens: tokens.clone(),
        portal: api_state.portal.clone(),
        lifetime_secs: config.portal.token_lifetime_secs,
        default_room: config.rooms.default_room.clone(),
        extra_rooms: config.demo.dev_rooms.clone(),
        any_ip_host: config.demo.dev_tokens == tessera_config::DevTokens::On,
        control: portal.control(),
    });
    let api_server = tessera_management_api::serve(api_listener, tls.as_ref().map(|t| t.server.clone()), api_state)?;
    let portal_server = tessera_portal::http::serve(
        portal_listener,
        tls.as_ref().map(|t| t.server.clone()),
        portal.clone(),
        crate::portal_routes::configure(config.demo.enabled, dev_tokens.clone(), config.portal.cors_origins.clone(), portal.clone()),
    )?;

    let scheme = if tls.is_some() { "https" } else { "http" };
    if let Some(dev) = &dev_tokens {
        let mut rooms = vec![dev.default_room.clone()];
        rooms.extend(dev.extra_rooms.iter().cloned());
        // Loud on purpose: anyone who reaches the portal can join these rooms as presenter.
        say!(
            "tessera: WARNING: dev endpoints /dev/token and /dev/layout are ON for room(s) {rooms:?}: anyone who reaches \
             {scheme}://{portal_bound} can join them as presenter. Turn them off with `[demo] dev_tokens = \"off\"`."
        );
        warn!(rooms = ?rooms, portal = %portal_bound, "dev token endpoint is on");
    }
    if let Some(tls) = &tls {
        let what = if tls.self_signed { "self-signed certificate" } else { "certificate" };
        say!("tessera: TLS with {what} {} (SHA-256 {})", tls.cert_path.display(), tls.fingerprint);
    }
    say!("tessera: portal listening on {scheme}://{portal_bound}");
    say!("tessera: management API listening on {scheme}://{api_bound}");
    if !config.rooms.default_room.is_empty() {
        say!("tessera: default room `{}`", config.rooms.default_room);
    }
    info!(portal = %portal_bound, api = %api_bound, data_dir = ?config.server.data_dir, "tessera started");

    let api_handle = api_server.handle();
    let portal_handle = portal_server.handle();
    let api_task = tokio::spawn(api_server);
    let portal_task = tokio::spawn(portal_server);
    tokio::select! {
        _ = signals.wait() => info!("shutdown signal received"),
        _ = drain_requested.notified() => info!("drain requested (POST /v1/drain)"),
        r = portal_task => { anyhow::bail!("portal server stopped unexpectedly: {r:?}") }
    }
    let drain = Duration::from_secs(config.server.drain_timeout_secs);
    if !drain.is_zero() {
        // Refuse new logins and sessions; what runs goes on until everyone left, the
        // timeout, or a second signal.
        portal.drain();
        if let Some(node) = &cluster {
            node.set_draining(true);
        }
        say!("tessera: draining for up to {} s ({} participants)", drain.as_secs(), portal.participant_count());
        info!(timeout_secs = drain.as_secs(), participants = portal.participant_count(), "draining");
        let deadline = tokio::time::Instant::now() + drain;
        loop {
            if portal.participant_count() == 0 {
                info!("drained: no participant left");
                break;
            }
            tokio::select! {
                _ = signals.wait() => { info!("second signal: stopping now"); break; }
                _ = tokio::time::sleep_until(deadline) => { info!(participants = portal.participant_count(), "drain timeout"); break; }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
    // Out of the cluster first, so no one places anything here any more.
    if let Some(node) = &cluster {
        node.leave().await;
    }
    // Recordings first, while their sources still flow, so every file is finalised.
    if let Some(recorder) = &recorder {
        recorder.shutdown().await;
    }
    portal.shutdown().await;
    if let Some(t) = &turn {
        t.stop().await;
    }
    // What the stop itself caused (participants left, recordings finished) still goes out.
    if let Some(hooks) = &hooks {
        hooks.flush(Duration::from_secs(5)).await;
    }
    portal_handle.stop(true).await;
    api_handle.stop(true).await;
    let _ = api_task.await;
    info!("tessera stopped");
    say!("tessera: stopped");
    Ok(())
}
