//! Tessera's configuration: one TOML file in which every key has a default, so the server
//! also runs with no file at all. `config/tessera.example.toml` documents every key; a test
//! keeps it equal to [`Config::default`].
//!
//! Errors name the file, the key and the reason, because an operator reading a start-up
//! failure should not have to guess which of fifty lines is wrong.

// Input from the network and files must never panic this crate: no unwrap/expect/panic
// and no unchecked indexing outside tests (`./scripts/test` runs clippy with -D warnings).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A configuration error: which file, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file the value came from; `None` for built-in defaults and command-line flags.
    pub file: Option<PathBuf>,
    /// Dotted key path, e.g. `portal.ping_interval_ms`.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "config error in {}: key `{}`: {}", file.display(), self.key, self.reason),
            None => write!(f, "config error: key `{}`: {}", self.key, self.reason),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listening addresses and the data folder.
    pub server: Server,
    /// The management service identity and key.
    pub service: Service,
    /// Participant signaling (Socket.IO portal).
    pub portal: Portal,
    /// WebRTC media transport.
    pub webrtc: WebRtc,
    /// Where recordings go.
    pub storage: Storage,
    /// Rooms created at start.
    pub rooms: Rooms,
    /// The demo page and its dev-only token endpoint.
    pub demo: Demo,
    /// Logging.
    pub log: Log,
    /// Several nodes coordinated over NATS (off by default: one process, nothing to run beside).
    pub cluster: Cluster,
    /// Where room, participant, stream and recording events are posted.
    pub webhooks: Webhooks,
    /// https/wss for the portal and the management API.
    pub tls: Tls,
    /// The embedded TURN server and TURN credentials for clients.
    pub turn: Turn,
}

/// `[turn]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Turn {
    /// Run a TURN server (UDP) in this process, relaying to this server's media only.
    pub enabled: bool,
    /// UDP address the TURN server listens on.
    pub listen_addr: String,
    /// TCP address it also listens on for TURN over TLS (`turns:`), with the `[tls]`
    /// certificate; empty: no TLS listener.
    pub tls_addr: String,
    /// host:port clients reach it at; empty: `webrtc.public_ip`, else the listening
    /// address (the machine's main address when that is 0.0.0.0), with the listening port.
    pub public_addr: String,
    /// IP announced as the relayed address; empty: the host of `public_addr` as derived.
    pub relay_ip: String,
    /// Lowest UDP port of relayed addresses.
    pub relay_port_min: u16,
    /// Highest UDP port of relayed addresses.
    pub relay_port_max: u16,
    /// TURN realm.
    pub realm: String,
    /// Shared secret of the TURN REST API credentials (coturn's `static-auth-secret`);
    /// empty: generated into `<data_dir>/turn.secret` (a cluster's nodes agree on one).
    pub secret: String,
    /// How long the credentials handed to a participant stay valid, in seconds.
    pub credential_lifetime_secs: u64,
    /// Other TURN servers (`turn:`/`turns:` URLs) sharing `secret`, e.g. coturn with
    /// `use-auth-secret`; handed to clients with the same credentials.
    pub external_urls: Vec<String>,
}

impl Default for Turn {
    fn default() -> Self {
        Turn {
            enabled: false,
            listen_addr: "0.0.0.0:3478".into(),
            tls_addr: String::new(),
            public_addr: String::new(),
            relay_ip: String::new(),
            relay_port_min: 50000,
            relay_port_max: 50999,
            realm: "tessera".into(),
            secret: String::new(),
            credential_lifetime_secs: 86_400,
            external_urls: Vec::new(),
        }
    }
}

impl Turn {
    /// Whether clients get TURN credentials (embedded server or external ones).
    pub fn hands_out_credentials(&self) -> bool {
        self.enabled || !self.external_urls.is_empty()
    }
}

/// `[tls]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// PEM certificate chain; with `key`, the portal and the management API serve https/wss.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// Serve https with a self-signed certificate kept in `<data_dir>/dev-tls/` (LAN demos:
    /// browsers warn, but allow the camera once the warning is accepted).
    pub dev: bool,
}

impl Tls {
    /// Whether the portal and the management API serve TLS.
    pub fn enabled(&self) -> bool {
        self.dev || !self.cert.as_os_str().is_empty()
    }
}

/// `[webhooks]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Webhooks {
    /// URLs that receive every event as a signed JSON POST; empty: none.
    pub urls: Vec<String>,
}

/// The longest a participant token may live; a cluster's ledger of used tokens keeps
/// each one this long, so a token can never outlive its entry there.
pub const MAX_TOKEN_LIFETIME_SECS: u64 = 86_400;

/// `[cluster]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    /// NATS server URL (`nats://host:4222`); empty: no cluster, everything in this process.
    pub nats_url: String,
    /// This node's id in the cluster; empty: the one generated into `<data_dir>/node.id` at first start.
    pub node_id: String,
    /// Where other nodes send relayed media to this one: `ip` or `ip:port` (no port or 0:
    /// any free port, announced in the node's registry entry); empty: the address media
    /// binds to (`webrtc.bind_ip` as resolved).
    pub relay_addr: String,
    /// Sign every relayed datagram with a key the cluster shares and drop unsigned ones
    /// (set it alike on every node).
    pub relay_auth: bool,
    /// A room's new WebRTC transports go to its first webrtc node until that node holds
    /// this many more transports than the least-used one (0: each to the least-used node).
    pub room_spread: u64,
    /// Region label, for placing sessions near their portal.
    pub region: String,
    /// What this node does (`portal`, `webrtc`, `mixer`, `recorder`); empty: everything.
    pub roles: Vec<String>,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            nats_url: String::new(),
            node_id: String::new(),
            relay_addr: String::new(),
            relay_auth: false,
            // As the SFU's workers do within a node: a meeting stays on one node, a large
            // fan-out uses several.
            room_spread: 16,
            region: String::new(),
            roles: Vec::new(),
        }
    }
}

/// The roles a node can have.
pub const ROLES: [&str; 4] = ["portal", "webrtc", "mixer", "recorder"];

impl Cluster {
    /// `relay_addr` as an address (port 0 when none is given); `None` when it is empty or
    /// not an address.
    pub fn relay_socket(&self) -> Option<std::net::SocketAddr> {
        let a = self.relay_addr.as_str();
        a.parse::<std::net::SocketAddr>().ok().or_else(|| a.parse::<std::net::IpAddr>().ok().map(|ip| std::net::SocketAddr::new(ip, 0)))
    }

    /// Checked once flags and the environment are applied (`--cluster` may bring the URL):
    /// a node without a cluster must run every role.
    pub fn check_roles_alone(&self) -> Result<(), String> {
        if self.nats_url.is_empty() && !ROLES.iter().all(|r| self.has_role(r)) {
            return Err("key `cluster.roles`: a server without a cluster (cluster.nats_url) runs every role".into());
        }
        Ok(())
    }

    /// This node's roles: the configured ones, or all of them.
    pub fn roles(&self) -> Vec<String> {
        if self.roles.is_empty() { ROLES.iter().map(|r| r.to_string()).collect() } else { self.roles.clone() }
    }

    /// Whether this node has `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.is_empty() || self.roles.iter().any(|r| r == role)
    }
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Portal (Socket.IO signaling), demo page and JS SDK address.
    pub portal_addr: String,
    /// Management REST API address.
    pub api_addr: String,
    /// Folder for the room store, the generated service key and (by default) recordings.
    pub data_dir: PathBuf,
    /// Origins whose pages may call the management API from a browser (CORS); empty: none.
    pub api_cors_origins: Vec<String>,
    /// On SIGTERM/SIGINT: refuse new logins and sessions (`/readyz` answers 503), let
    /// running ones go on for up to this many seconds (less once everyone left), then stop.
    /// 0: stop at once.
    pub drain_timeout_secs: u64,
    /// Serve Prometheus metrics at `/metrics` on the management API address, without
    /// credentials (scrapers send none): keep that address private.
    pub metrics: bool,
    /// Where a node without the portal role (a media node of a cluster, which has no API)
    /// serves `GET /metrics`; empty: nowhere. Portal nodes serve it on `api_addr`.
    pub metrics_addr: String,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            portal_addr: "127.0.0.1:8080".into(),
            api_addr: "127.0.0.1:3000".into(),
            data_dir: "tessera-data".into(),
            api_cors_origins: Vec::new(),
            drain_timeout_secs: 0,
            metrics: true,
            metrics_addr: String::new(),
        }
    }
}

/// `[service]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Service {
    /// Service id for OWT's MAuth scheme (`mauth_serviceid`).
    pub id: String,
    /// Service key; empty means: read `<data_dir>/service.key`, generating it at first start.
    /// The environment variable `TESSERA_SERVICE_KEY` overrides both.
    pub key: String,
}

impl Default for Service {
    fn default() -> Self {
        Service { id: "tessera".into(), key: String::new() }
    }
}

/// `[portal]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Portal {
    /// host:port written into tokens so clients find the portal; empty means `server.portal_addr`.
    pub public_host: String,
    /// Whether clients must reach the portal over https/wss (a TLS proxy in front); always
    /// so when Tessera serves TLS itself (`[tls]`).
    pub secure: bool,
    /// How long a participant token stays valid, in seconds.
    pub token_lifetime_secs: u64,
    /// How long a reconnection ticket stays valid, in seconds.
    pub reconnection_ticket_lifetime_secs: u64,
    /// How long a participant whose socket dropped stays in the room, in seconds.
    pub reconnection_timeout_secs: u64,
    /// How long a connected socket may stay without logging in, in seconds.
    pub login_timeout_secs: u64,
    /// Socket.IO ping interval, in milliseconds.
    pub ping_interval_ms: u64,
    /// Socket.IO ping timeout, in milliseconds.
    pub ping_timeout_ms: u64,
    /// Largest message a client may send, in bytes.
    pub max_message_bytes: u64,
    /// Requests per second a client is served (burst twice that); the excess is refused.
    pub max_requests_per_sec: u32,
    /// Most connections that have not logged in yet, in total.
    pub max_unauthenticated_sessions: u32,
    /// Most connections that have not logged in yet from one client address.
    pub max_unauthenticated_sessions_per_address: u32,
    /// Origins whose pages may reach the portal (Socket.IO, JS SDK) from a browser; `*`: any.
    pub cors_origins: Vec<String>,
}

impl Default for Portal {
    fn default() -> Self {
        Portal {
            public_host: String::new(),
            secure: false,
            token_lifetime_secs: 180,
            reconnection_ticket_lifetime_secs: 600,
            reconnection_timeout_secs: 60,
            login_timeout_secs: 180,
            ping_interval_ms: 25_000,
            ping_timeout_ms: 20_000,
            max_message_bytes: 1_000_000,
            max_requests_per_sec: 50,
            max_unauthenticated_sessions: 2000,
            max_unauthenticated_sessions_per_address: 100,
            cors_origins: vec!["*".into()],
        }
    }
}

/// `[webrtc]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebRtc {
    /// Lowest UDP port for media.
    pub udp_port_min: u16,
    /// Highest UDP port for media.
    pub udp_port_max: u16,
    /// Address media is bound to; empty: 127.0.0.1 when loopback is all there is, else the default route's address.
    pub bind_ip: String,
    /// Public IP announced in candidates (behind 1:1 NAT); empty announces the bound addresses.
    pub public_ip: String,
    /// STUN/TURN servers handed to clients in the login result.
    pub ice_servers: Vec<IceServer>,
    /// The forwarding engine: `workers` (worker threads with one socket each on ports
    /// `udp_port_min + i`, ICE-lite), the only one since `per-connection` was removed.
    pub engine: WebRtcEngine,
    /// Worker threads of the `workers` engine; 0: one per CPU the process may use.
    pub workers: usize,
    /// The `workers` engine also accepts ICE over TCP (RFC 6544, passive) on each worker's
    /// port number, for clients whose network blocks UDP.
    pub ice_tcp: bool,
    /// Estimate each subscriber's bandwidth (transport-wide congestion control feedback,
    /// GCC), so a simulcast subscriber on `auto` gets the highest layer its link carries.
    pub bandwidth_estimation: bool,
}

/// Whether `id` can name a node (it becomes a NATS key and subject token).
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The SFU's forwarding engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WebRtcEngine {
    /// webrtc-rs's sans-I/O core on worker threads, one UDP port per worker.
    #[default]
    Workers,
}

impl std::str::FromStr for WebRtcEngine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "workers" => Ok(WebRtcEngine::Workers),
            "per-connection" => Err("the per-connection engine was removed; `workers` is the engine".into()),
            other => Err(format!("`{other}` is not an engine (`workers`)")),
        }
    }
}

impl Default for WebRtc {
    fn default() -> Self {
        WebRtc {
            udp_port_min: 40000,
            udp_port_max: 49999,
            bind_ip: String::new(),
            public_ip: String::new(),
            ice_servers: Vec::new(),
            engine: WebRtcEngine::Workers,
            workers: 0,
            ice_tcp: true,
            bandwidth_estimation: true,
        }
    }
}

/// One STUN/TURN server, as in `RTCIceServer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IceServer {
    /// `stun:` / `turn:` URLs.
    pub urls: Vec<String>,
    /// TURN user name.
    #[serde(default)]
    pub username: String,
    /// TURN credential.
    #[serde(default)]
    pub credential: String,
}

/// `[storage]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// Folder for recordings; empty means `<data_dir>/recordings`.
    pub recordings_dir: PathBuf,
}

impl Default for Storage {
    fn default() -> Self {
        Storage { recordings_dir: PathBuf::new() }
    }
}

/// `[rooms]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rooms {
    /// Id (and name) of a room created at start if missing, with the default view; empty disables it.
    pub default_room: String,
}

impl Default for Rooms {
    fn default() -> Self {
        Rooms { default_room: "dev".into() }
    }
}

/// When the dev-only token endpoint of the demo page is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DevTokens {
    /// On only while the portal listens on a loopback address.
    Auto,
    /// Always on: anyone who reaches the portal can get a token.
    On,
    /// Off.
    Off,
}

/// `[demo]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Demo {
    /// Serve the demo page at `/`.
    pub enabled: bool,
    /// The dev token endpoint (`POST /dev/token`) the demo page uses to join without a backend.
    pub dev_tokens: DevTokens,
    /// Rooms the dev endpoints may serve besides `rooms.default_room`.
    pub dev_rooms: Vec<String>,
}

impl Default for Demo {
    fn default() -> Self {
        Demo { enabled: true, dev_tokens: DevTokens::Auto, dev_rooms: Vec::new() }
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// `tracing` filter, e.g. `info` or `tessera_portal=debug,info`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log { level: "info".into() }
    }
}

impl Config {
    /// Loads `path`, or the built-in defaults when `path` is `None`, and validates it.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            let config = Config::default();
            config.validate(None)?;
            return Ok(config);
        };
        let err = |key: &str, reason: String| ConfigError { file: Some(path.to_path_buf()), key: key.into(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err("(file)", format!("cannot read: {e}")))?;
        let config = Config::parse(&text).map_err(|mut e| {
            e.file = Some(path.to_path_buf());
            e
        })?;
        config.validate(Some(path))?;
        Ok(config)
    }

    /// Parses TOML text (without validating values).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
            file: None,
            key: "(syntax)".into(),
            reason: e.message().to_string() + &line_of(text, e.span()),
        })?;
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = key_name(e.path().to_string());
            ConfigError { file: None, key, reason: friendlier(e.into_inner().to_string()) }
        })
    }

    /// Applies `TESSERA_SERVICE_KEY` from the environment, if set and non-empty.
    pub fn apply_env(&mut self) {
        if let Ok(key) = std::env::var("TESSERA_SERVICE_KEY")
            && !key.is_empty()
        {
            self.service.key = key;
        }
    }

    /// Checks values that parse but make no sense. `file` is only used in error messages.
    pub fn validate(&self, file: Option<&Path>) -> Result<(), ConfigError> {
        let err = |key: &str, reason: String| ConfigError { file: file.map(Path::to_path_buf), key: key.into(), reason };
        check_addr(&self.server.portal_addr).map_err(|r| err("server.portal_addr", r))?;
        check_addr(&self.server.api_addr).map_err(|r| err("server.api_addr", r))?;
        if !self.server.metrics_addr.is_empty() {
            check_addr(&self.server.metrics_addr).map_err(|r| err("server.metrics_addr", r))?;
        }
        if self.server.data_dir.as_os_str().is_empty() {
            return Err(err("server.data_dir", "must not be empty".into()));
        }
        if self.server.drain_timeout_secs > 86_400 {
            return Err(err("server.drain_timeout_secs", format!("{} is more than a day", self.server.drain_timeout_secs)));
        }
        if self.service.id.is_empty() {
            return Err(err("service.id", "must not be empty".into()));
        }
        let c = &self.cluster;
        let nats_scheme = ["nats://", "tls://"].iter().any(|p| c.nats_url.starts_with(p));
        if !c.nats_url.is_empty() && !nats_scheme {
            return Err(err("cluster.nats_url", format!("`{}` is not a nats:// or tls:// URL", c.nats_url)));
        }
        if !c.node_id.is_empty() && !valid_node_id(&c.node_id) {
            return Err(err("cluster.node_id", format!("`{}`: use 1-64 letters, digits, `-` or `_`", c.node_id)));
        }
        let t = &self.tls;
        match (t.cert.as_os_str().is_empty(), t.key.as_os_str().is_empty()) {
            (false, true) => return Err(err("tls.key", "is needed with tls.cert".into())),
            (true, false) => return Err(err("tls.cert", "is needed with tls.key".into())),
            (false, false) if t.dev => return Err(err("tls.dev", "set either tls.dev or tls.cert and tls.key, not both".into())),
            _ => {}
        }
        let turn = &self.turn;
        if turn.enabled {
            check_addr(&turn.listen_addr).map_err(|r| err("turn.listen_addr", r))?;
            if !turn.listen_addr.parse::<SocketAddr>().is_ok_and(|a| a.is_ipv4()) {
                // webrtc-rs's relay allocation takes IPv4 addresses only.
                return Err(err("turn.listen_addr", format!("`{}` must be an IPv4 address:port", turn.listen_addr.escape_debug())));
            }
            if !turn.public_addr.is_empty() && turn.public_addr.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
                return Err(err("turn.public_addr", format!("`{}` must be host:port", turn.public_addr.escape_debug())));
            }
            if !turn.relay_ip.is_empty() && turn.relay_ip.parse::<std::net::IpAddr>().is_err() {
                return Err(err("turn.relay_ip", format!("`{}` is not an IP address", turn.relay_ip.escape_debug())));
            }
            if !turn.tls_addr.is_empty() && !turn.tls_addr.parse::<SocketAddr>().is_ok_and(|a| a.is_ipv4()) {
                return Err(err("turn.tls_addr", format!("`{}` must be an IPv4 address:port", turn.tls_addr.escape_debug())));
            }
            if turn.relay_port_min == 0 || turn.relay_port_min > turn.relay_port_max {
                return Err(err("turn.relay_port_min", format!("{}..{} is not a port range", turn.relay_port_min, turn.relay_port_max)));
            }
            if turn.relay_port_min <= self.webrtc.udp_port_max && self.webrtc.udp_port_min <= turn.relay_port_max {
                return Err(err("turn.relay_port_min", "the relay ports overlap webrtc.udp_port_min..udp_port_max".into()));
            }
            if turn.realm.is_empty() {
                return Err(err("turn.realm", "must not be empty".into()));
            }
        }
        if turn.hands_out_credentials() && !(60..=7 * 86_400).contains(&turn.credential_lifetime_secs) {
            return Err(err("turn.credential_lifetime_secs", "must be between 60 and 604800 (a week)".into()));
        }
        if let Some(bad) = turn.external_urls.iter().find(|u| !(u.starts_with("turn:") || u.starts_with("turns:"))) {
            return Err(err("turn.external_urls", format!("`{}` is not a turn: or turns: URL", bad.escape_debug())));
        }
        if !turn.secret.is_empty() && turn.secret.len() < 16 {
            return Err(err("turn.secret", "must be at least 16 characters (or empty to generate one)".into()));
        }
        for url in &self.webhooks.urls {
            let host = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")).unwrap_or_default();
            if host.is_empty() || host.starts_with('/') {
                return Err(err("webhooks.urls", format!("`{}` is not an http:// or https:// URL", url.escape_debug())));
            }
        }
        if let Some(bad) = c.roles.iter().find(|r| !ROLES.contains(&r.as_str())) {
            return Err(err("cluster.roles", format!("`{}` is not a role (portal, webrtc, mixer, recorder)", bad.escape_debug())));
        }
        if self.turn.enabled && !c.has_role("webrtc") {
            // It relays to this process's own media only.
            return Err(err("turn.enabled", "the TURN server runs on nodes with the webrtc role".into()));
        }
        if !c.relay_addr.is_empty() {
            match c.relay_socket() {
                None => return Err(err("cluster.relay_addr", format!("`{}` is not an IP address or IP:port", c.relay_addr.escape_debug()))),
                // Other nodes send to it, and check packets come from it.
                Some(a) if a.ip().is_unspecified() => {
                    return Err(err(
                        "cluster.relay_addr",
                        format!("`{}`: name the address other nodes reach this one at", c.relay_addr.escape_debug()),
                    ));
                }
                Some(_) => {}
            }
        }
        if !self.service.key.is_empty() && self.service.key.len() < 16 {
            return Err(err("service.key", "must be at least 16 characters (or empty to generate one)".into()));
        }
        for (key, origins) in [("portal.cors_origins", &self.portal.cors_origins), ("server.api_cors_origins", &self.server.api_cors_origins)] {
            if let Some(bad) = origins.iter().find(|o| !valid_origin(o)) {
                return Err(err(key, format!("`{}` is not `*` or an origin like `https://app.example.com[:port]`", bad.escape_debug())));
            }
        }
        let p = &self.portal;
        if !p.public_host.is_empty() && !p.public_host.contains(':') {
            return Err(err("portal.public_host", format!("`{}` must be host:port", p.public_host)));
        }
        let positive = [
            ("portal.token_lifetime_secs", p.token_lifetime_secs),
            ("portal.reconnection_ticket_lifetime_secs", p.reconnection_ticket_lifetime_secs),
            ("portal.login_timeout_secs", p.login_timeout_secs),
            ("portal.ping_interval_ms", p.ping_interval_ms),
            ("portal.ping_timeout_ms", p.ping_timeout_ms),
            ("portal.max_requests_per_sec", u64::from(p.max_requests_per_sec)),
            ("portal.max_unauthenticated_sessions", u64::from(p.max_unauthenticated_sessions)),
            ("portal.max_unauthenticated_sessions_per_address", u64::from(p.max_unauthenticated_sessions_per_address)),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(err(key, "must be greater than 0".into()));
            }
        }
        if p.token_lifetime_secs > MAX_TOKEN_LIFETIME_SECS {
            // Tokens are for joining now; a cluster's ledger of used tokens keeps each one a day.
            return Err(err("portal.token_lifetime_secs", format!("{} is more than {MAX_TOKEN_LIFETIME_SECS} (a day)", p.token_lifetime_secs)));
        }
        if p.max_message_bytes < 1024 {
            return Err(err("portal.max_message_bytes", "must be at least 1024".into()));
        }
        if p.reconnection_ticket_lifetime_secs <= 60 {
            // The OWT SDK refreshes a ticket 60 s before it expires.
            return Err(err("portal.reconnection_ticket_lifetime_secs", "must be more than 60 (clients refresh 60 s before expiry)".into()));
        }
        let w = &self.webrtc;
        if w.udp_port_min == 0 || w.udp_port_min > w.udp_port_max {
            return Err(err("webrtc.udp_port_min", format!("range {}..{} is empty or starts at 0", w.udp_port_min, w.udp_port_max)));
        }
        if w.workers > 256 {
            return Err(err("webrtc.workers", format!("{} is more than 256 threads", w.workers)));
        }
        if w.workers > usize::from(w.udp_port_max - w.udp_port_min) + 1 {
            return Err(err("webrtc.workers", format!("{} workers need {} ports; udp_port_min..udp_port_max has fewer", w.workers, w.workers)));
        }
        for (key, ip) in [("webrtc.bind_ip", &w.bind_ip), ("webrtc.public_ip", &w.public_ip)] {
            if !ip.is_empty() && ip.parse::<std::net::IpAddr>().is_err() {
                return Err(err(key, format!("`{ip}` is not an IP address")));
            }
        }
        for (i, s) in w.ice_servers.iter().enumerate() {
            if s.urls.is_empty() || s.urls.iter().any(|u| !(u.starts_with("stun:") || u.starts_with("turn:") || u.starts_with("turns:"))) {
                return Err(err(&format!("webrtc.ice_servers[{i}].urls"), "need one or more stun:/turn:/turns: URLs".into()));
            }
        }
        if tracing_filter_invalid(&self.log.level) {
            return Err(err("log.level", format!("`{}` is not a log filter", self.log.level)));
        }
        Ok(())
    }

    /// The folder recordings are written to.
    pub fn recordings_dir(&self) -> PathBuf {
        if self.storage.recordings_dir.as_os_str().is_empty() { self.server.data_dir.join("recordings") } else { self.storage.recordings_dir.clone() }
    }

    /// Checked once flags are applied (`--dev-tls` may bring the certificate): TURN over
    /// TLS needs one.
    pub fn check_turn_tls(&self) -> Result<(), String> {
        if self.turn.enabled && !self.turn.tls_addr.is_empty() && !self.tls.enabled() {
            return Err("key `turn.tls_addr`: TURN over TLS needs a certificate: set [tls] cert and key, or tls.dev (--dev-tls)".into());
        }
        Ok(())
    }

    /// The host:port put into tokens.
    pub fn portal_public_host(&self, bound: SocketAddr) -> String {
        if self.portal.public_host.is_empty() { bound.to_string() } else { self.portal.public_host.clone() }
    }

    /// Whether the dev token endpoint is on, given the address the portal is bound to.
    pub fn dev_tokens_enabled(&self, bound: SocketAddr) -> bool {
        match self.demo.dev_tokens {
            DevTokens::On => true,
            DevTokens::Off => false,
            DevTokens::Auto => bound.ip().is_loopback(),
        }
    }

    /// Creates the data and recordings folders if needed and checks that they are writable,
    /// so a bad path fails at start rather than at the first recording.
    pub fn prepare_dirs(&self, file: Option<&Path>) -> Result<(), ConfigError> {
        let check = |key: &str, dir: &Path| -> Result<(), ConfigError> {
            let err = |reason: String| ConfigError { file: file.map(Path::to_path_buf), key: key.into(), reason };
            std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create folder {}: {e}", dir.display())))?;
            let probe = dir.join(format!(".tessera-write-test-{}", std::process::id()));
            std::fs::write(&probe, b"ok").map_err(|e| err(format!("folder {} is not writable: {e}", dir.display())))?;
            let _ = std::fs::remove_file(&probe);
            Ok(())
        };
        check("server.data_dir", &self.server.data_dir)?;
        let rec_key = if self.storage.recordings_dir.as_os_str().is_empty() { "server.data_dir" } else { "storage.recordings_dir" };
        check(rec_key, &self.recordings_dir())
    }
}

/// Validates `host:port`, with a clear message for ports past 65535 (which `SocketAddr`
/// would only call "invalid socket address syntax").
fn check_addr(addr: &str) -> Result<SocketAddr, String> {
    if let Some((_, port)) = addr.rsplit_once(':')
        && let Ok(n) = port.parse::<u64>()
        && n > 65535
    {
        return Err(format!("port {n} is out of range (0-65535)"));
    }
    addr.parse::<SocketAddr>().map_err(|_| format!("`{addr}` is not an IP:port address (e.g. 127.0.0.1:8080)"))
}

/// A serde path as a key name. An unknown key written `""` in the file ends the path with
/// an empty segment (`""` alone, or `portal.` after a section), which would name nothing.
fn key_name(path: String) -> String {
    if path.is_empty() || path.ends_with('.') { format!("{path}\"\"") } else { path }
}

/// Rejects obviously broken filters without pulling tracing-subscriber into this crate.
fn tracing_filter_invalid(filter: &str) -> bool {
    filter.trim().is_empty() || filter.chars().any(|c| c.is_whitespace() || c == ';')
}

/// Serde's messages for a negative number in an unsigned field say "expected u64"; say it plainly.
fn friendlier(message: String) -> String {
    if message.starts_with("invalid value: integer `-") && (message.contains("expected u") || message.contains("expected an unsigned")) {
        format!("{message} (negative values are not allowed)")
    } else {
        message
    }
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(s) => {
            let line = text.as_bytes().iter().take(s.start).filter(|&&b| b == b'\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

/// `*` or `scheme://host[:port]` with nothing after (what browsers send as `Origin`).
fn valid_origin(o: &str) -> bool {
    if o == "*" {
        return true;
    }
    let Some((scheme, authority)) = o.split_once("://") else { return false };
    !scheme.is_empty()
        && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.')
        && !authority.is_empty()
        && !authority.contains(['/', '?', '#', ' '])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> ConfigError {
        match Config::parse(text) {
            Ok(c) => c.validate(Some(Path::new("t.toml"))).unwrap_err(),
            Err(e) => e,
        }
    }

    #[test]
    fn empty_file_is_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        Config::default().validate(None).unwrap();
    }

    #[test]
    fn example_file_documents_every_key_with_its_default() {
        let text = include_str!("../tessera.example.toml");
        let parsed = Config::parse(text).unwrap();
        assert_eq!(parsed, Config::default(), "example values must equal the defaults");
        // Every key of the default config must appear (uncommented) in the example.
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        let example: toml::Table = text.parse().unwrap();
        fn keys(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
            if let toml::Value::Table(t) = v {
                for (k, v) in t {
                    keys(&format!("{prefix}{k}."), v, out);
                }
            } else {
                out.push(prefix.trim_end_matches('.').to_string());
            }
        }
        let (mut want, mut have) = (Vec::new(), Vec::new());
        keys("", &defaults, &mut want);
        keys("", &toml::Value::Table(example), &mut have);
        want.sort();
        have.sort();
        assert_eq!(want, have);
        // And every key has a comment line right above it.
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let l = line.trim();
            if !l.is_empty() && !l.starts_with('#') && !l.starts_with('[') {
                assert!(i > 0 && lines[i - 1].trim().starts_with('#'), "key on line {} has no doc comment: {l}", i + 1);
            }
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse_err("[portal]\nping_interval = 5\n");
        assert_eq!(e.key, "portal.ping_interval");
        assert!(e.reason.contains("unknown field `ping_interval`"), "{e}");
        let e = parse_err("bogus = 1\n");
        assert!(e.reason.contains("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = parse_err("[portal]\nping_interval_ms = \"fast\"\n");
        assert_eq!(e.key, "portal.ping_interval_ms");
        assert!(e.reason.contains("invalid type"), "{e}");
    }

    #[test]
    fn negative_value_is_named() {
        let e = parse_err("[portal]\nreconnection_timeout_secs = -3\n");
        assert_eq!(e.key, "portal.reconnection_timeout_secs");
        assert!(e.reason.contains("negative"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = parse_err("[server]\nportal_addr = \"127.0.0.1:70000\"\n");
        assert_eq!(e.key, "server.portal_addr");
        assert!(e.reason.contains("out of range"), "{e}");
        assert_eq!(e.to_string(), "config error in t.toml: key `server.portal_addr`: port 70000 is out of range (0-65535)");
        let e = parse_err("[webrtc]\nudp_port_min = 5000\nudp_port_max = 4000\n");
        assert_eq!(e.key, "webrtc.udp_port_min");
        let e = parse_err("[webrtc]\nudp_port_max = 70000\n");
        assert_eq!(e.key, "webrtc.udp_port_max");
        let e = parse_err("[portal]\nping_timeout_ms = 0\n");
        assert_eq!(e.key, "portal.ping_timeout_ms");
        let e = parse_err("[demo]\ndev_tokens = \"maybe\"\n");
        assert_eq!(e.key, "demo.dev_tokens");
        let e = parse_err("[portal]\ntoken_lifetime_secs = 86401\n");
        assert_eq!(e.key, "portal.token_lifetime_secs");
        assert!(e.reason.contains("a day"), "{e}");
    }

    #[test]
    fn empty_key_is_named() {
        // Found by proptests: the key was "" (top level) or "portal." (in a section).
        let e = parse_err("\"\" = 1\n");
        assert_eq!(e.key, "\"\"");
        assert!(e.reason.contains("unknown field ``"), "{e}");
        assert_eq!(parse_err("[portal]\n\"\" = 1\n").key, "portal.\"\"");
        assert_eq!(parse_err("[\"\"]\nx = 1\n").key, "\"\"");
    }

    #[test]
    fn syntax_error_has_line() {
        let e = parse_err("[server]\nportal_addr = \n");
        assert_eq!(e.key, "(syntax)");
        assert!(e.reason.contains("line 2"), "{e}");
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("my.toml");
        std::fs::write(&path, "[log]\nlevel = \"\"\n").unwrap();
        let e = Config::load(Some(&path)).unwrap_err();
        assert_eq!(e.file.as_deref(), Some(path.as_path()));
        assert_eq!(e.key, "log.level");
        let e = Config::load(Some(&dir.path().join("missing.toml"))).unwrap_err();
        assert!(e.reason.contains("cannot read"), "{e}");
    }

    #[test]
    fn unwritable_storage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "x").unwrap();
        let mut c = Config::default();
        c.server.data_dir = dir.path().join("data");
        c.storage.recordings_dir = blocker.join("rec");
        let e = c.prepare_dirs(Some(Path::new("x.toml"))).unwrap_err();
        assert_eq!(e.key, "storage.recordings_dir");
        c.storage.recordings_dir = PathBuf::new();
        c.prepare_dirs(None).unwrap();
        assert!(dir.path().join("data/recordings").is_dir());
    }

    #[test]
    fn dev_tokens_auto_follows_loopback() {
        let c = Config::default();
        assert!(c.dev_tokens_enabled("127.0.0.1:8080".parse().unwrap()));
        assert!(!c.dev_tokens_enabled("0.0.0.0:8080".parse().unwrap()));
    }
}

/// Property tests: no text makes the parser panic, every error names a key that exists in
/// the document (or the syntax line, or the file), and an accepted config writes back to
/// TOML and parses to itself.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> ProptestConfig {
        ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() }
    }

    /// Every (section, key, default value) of the configuration.
    fn known_keys() -> Vec<(String, String, toml::Value)> {
        let Ok(toml::Value::Table(root)) = toml::Value::try_from(Config::default()) else { panic!("defaults are a table") };
        let mut out = Vec::new();
        for (section, t) in root {
            if let toml::Value::Table(t) = t {
                for (k, v) in t {
                    out.push((section.clone(), k, v));
                }
            }
        }
        // Keys whose default is an empty list still need an element type to fuzz.
        out.push(("webrtc".into(), "ice_servers".into(), toml::Value::Array(vec![ice_server_example()])));
        out
    }

    fn ice_server_example() -> toml::Value {
        toml::Value::Table(toml::toml! { urls = ["stun:stun.example:3478"] username = "u" credential = "c" })
    }

    /// Any TOML value, nested at most 2 deep.
    fn any_toml() -> BoxedStrategy<toml::Value> {
        let leaf = prop_oneof![
            any::<i64>().prop_map(toml::Value::Integer),
            (-1i64..70_000).prop_map(toml::Value::Integer),
            any::<f64>().prop_map(toml::Value::Float),
            any::<bool>().prop_map(toml::Value::Boolean),
            plausible_string().prop_map(toml::Value::String),
        ];
        leaf.prop_recursive(2, 12, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(toml::Value::Array),
                prop::collection::btree_map("[a-z_]{1,8}", inner, 0..3).prop_map(|m| toml::Value::Table(m.into_iter().collect())),
            ]
        })
        .boxed()
    }

    fn plausible_string() -> BoxedStrategy<String> {
        prop_oneof![
            3 => prop::sample::select(
                &[
                    "", "127.0.0.1:8080", "0.0.0.0:0", "[::1]:3000", "127.0.0.1:70000", "localhost:80", "10.0.0.1", "::1", "not an ip", "*",
                    "https://app.example.com", "http://x:8080/path", "stun:stun.example:3478", "turn:t.example", "info", "debug,tessera=trace",
                    "bad filter", "auto", "on", "off", "maybe", "tessera-data", "0123456789abcdef", "short", "host:443",
                ][..],
            )
            .prop_map(str::to_string),
            1 => prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
        ]
        .boxed()
    }

    /// A value like `default` (same type, other contents), or any value at all.
    fn value_like(default: toml::Value) -> BoxedStrategy<toml::Value> {
        let typed = match default {
            toml::Value::Integer(_) => {
                prop_oneof![6 => (-2i64..70_000).prop_map(toml::Value::Integer), 1 => any::<i64>().prop_map(toml::Value::Integer)].boxed()
            }
            toml::Value::Boolean(_) => any::<bool>().prop_map(toml::Value::Boolean).boxed(),
            toml::Value::String(_) => plausible_string().prop_map(toml::Value::String).boxed(),
            toml::Value::Array(items) => match items.first().cloned() {
                Some(first) => prop::collection::vec(value_like(first), 0..3).prop_map(toml::Value::Array).boxed(),
                None => prop::collection::vec(plausible_string().prop_map(toml::Value::String), 0..3).prop_map(toml::Value::Array).boxed(),
            },
            toml::Value::Table(t) => {
                let fields: Vec<_> =
                    t.into_iter().map(|(k, v)| prop::option::weighted(0.8, value_like(v)).prop_map(move |v| (k.clone(), v))).collect();
                fields.prop_map(|fields| toml::Value::Table(fields.into_iter().filter_map(|(k, v)| Some((k, v?))).collect())).boxed()
            }
            other => Just(other).boxed(),
        };
        prop_oneof![12 => typed, 1 => any_toml()].boxed()
    }

    /// Documents made of real sections and keys with random values, and now and then an
    /// unknown section or key.
    fn document() -> BoxedStrategy<toml::Table> {
        let keys: Vec<_> = known_keys()
            .into_iter()
            .map(|(s, k, v)| prop::option::weighted(0.15, value_like(v)).prop_map(move |v| (s.clone(), k.clone(), v)))
            .collect();
        let stray = prop::option::weighted(0.1, ("[a-z_]{0,8}", "[a-z_]{0,8}", any_toml()));
        (keys, stray)
            .prop_map(|(keys, stray)| {
                let mut doc = toml::Table::new();
                let entries = keys.into_iter().filter_map(|(s, k, v)| Some((s, k, v?))).chain(stray);
                for (section, key, value) in entries {
                    if let toml::Value::Table(t) = doc.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new())) {
                        t.insert(key, value);
                    }
                }
                doc
            })
            .boxed()
    }

    /// Whether a serde path such as `webrtc.ice_servers[0].urls` leads to a value of `doc`.
    fn resolves(doc: &toml::Table, path: &str) -> bool {
        let mut here = toml::Value::Table(doc.clone());
        for part in path.split('.') {
            let (name, indexes) = match part.find('[') {
                Some(i) => part.split_at(i),
                None => (part, ""),
            };
            // An empty key is written `""` in error keys.
            let name = if name == "\"\"" { "" } else { name };
            let Some(next) = here.get(name).cloned() else { return false };
            here = next;
            for index in indexes.split('[').filter(|s| !s.is_empty()) {
                let Some(next) = index.trim_end_matches(']').parse::<usize>().ok().and_then(|i| here.get(i).cloned()) else { return false };
                here = next;
            }
        }
        true
    }

    fn valid_keys() -> Vec<String> {
        known_keys().into_iter().map(|(s, k, _)| format!("{s}.{k}")).collect()
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn arbitrary_text_never_panics(text in prop_oneof![
            prop::collection::vec(any::<char>(), 0..80).prop_map(String::from_iter),
            "[\\[\\]a-z_=\"'\\n .0-9#{},:*-]{0,80}",
        ]) {
            match Config::parse(&text) {
                Ok(c) => { let _ = c.validate(None); }
                Err(e) => prop_assert!(!e.key.is_empty() && !e.reason.is_empty() && e.file.is_none(), "{:?}", e),
            }
        }

        #[test]
        fn documents_parse_or_name_a_key_of_theirs(doc in document()) {
            let text = toml::to_string(&doc).unwrap();
            match Config::parse(&text) {
                Ok(config) => {
                    // What was accepted writes back as TOML that reads the same.
                    let again = toml::to_string(&config).unwrap();
                    prop_assert_eq!(Config::parse(&again), Ok(config.clone()), "rewritten as {}", again);
                    let file = Path::new("fuzz.toml");
                    if let Err(e) = config.validate(Some(file)) {
                        prop_assert_eq!(e.file.as_deref(), Some(file));
                        let section_key = e.key.split('[').next().unwrap_or_default().to_string();
                        prop_assert!(valid_keys().contains(&section_key), "validation error names no config key: {:?}", e);
                        prop_assert!(!e.reason.is_empty());
                    }
                }
                Err(e) => {
                    prop_assert!(e.key != "(syntax)", "valid TOML refused as a syntax error: {:?}\n{}", e, text);
                    prop_assert!(resolves(&doc, &e.key), "error key {:?} is not in the document: {:?}\n{}", e.key, e, text);
                    prop_assert!(!e.reason.is_empty());
                }
            }
        }

        #[test]
        fn load_names_the_file(doc in document(), garbage in prop::option::weighted(0.3, "[\\[\\]=\"a-z \\n]{1,20}")) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("t.toml");
            let text = toml::to_string(&doc).unwrap() + garbage.as_deref().unwrap_or("");
            std::fs::write(&path, &text).unwrap();
            if let Err(e) = Config::load(Some(&path)) {
                prop_assert_eq!(e.file.as_deref(), Some(path.as_path()), "{:?}", e);
            }
        }
    }
}
