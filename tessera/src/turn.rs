//! The embedded TURN server (`[turn] enabled`): webrtc-rs's `turn` crate on one UDP
//! socket, checking TURN REST API credentials with the shared secret (no user database),
//! and relaying only to this server's own media addresses: an open relay would let any
//! participant reach whatever the machine can reach (its loopback services, the LAN).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tessera_config::Config;
use tracing::{debug, info};
use turn::auth::{AuthHandler, generate_auth_key};
use turn::relay::RelayAddressGenerator;
use turn::relay::relay_range::RelayAddressGeneratorRanges;
use turn::server::Server;
use turn::server::config::{ConnConfig, ServerConfig};
use webrtc_util::Conn;
use webrtc_util::vnet::net::Net;

/// A running TURN server.
pub struct Turn {
    server: Server,
    /// The URLs clients are given: `turn:` (UDP), and `turns:` with a TLS listener.
    pub urls: Vec<String>,
    /// The bound UDP address.
    pub bound: SocketAddr,
    /// The bound TLS address, if any.
    pub tls_bound: Option<SocketAddr>,
}

impl Turn {
    /// Starts the server; `media` are the SFU's addresses, the only peers it relays to;
    /// `tls` serves `turn.tls_addr`.
    pub async fn start(config: &Config, secret: &[u8], media: &[SocketAddr], tls: Option<Arc<rustls::ServerConfig>>) -> anyhow::Result<Turn> {
        let t = &config.turn;
        let socket =
            tokio::net::UdpSocket::bind(&t.listen_addr).await.with_context(|| format!("turn.listen_addr: cannot listen on {}", t.listen_addr))?;
        let bound = socket.local_addr()?;
        let public = public_addr(config, bound);
        // Announced in relayed addresses: configured, else the host clients reach us by
        // when it is an address, else this machine's public or main address (never 0.0.0.0).
        let relay_ip: IpAddr = match t.relay_ip.parse() {
            Ok(ip) => ip,
            Err(_) => public.rsplit_once(':').and_then(|(h, _)| h.parse().ok()).unwrap_or_else(|| public_ip(config, bound)),
        };
        // Peers: the SFU's sockets, by their bound and announced addresses.
        let mut allowed: HashSet<SocketAddr> = media.iter().copied().collect();
        if let Ok(ip) = config.webrtc.public_ip.parse::<IpAddr>() {
            allowed.extend(media.iter().map(|a| SocketAddr::new(ip, a.port())));
        }
        let allowed = Arc::new(allowed);
        // Both listeners allocate from the same range; a port taken by the other is retried.
        let relays = || {
            let ranges = RelayAddressGeneratorRanges {
                relay_address: relay_ip,
                min_port: t.relay_port_min,
                max_port: t.relay_port_max,
                max_retries: 20,
                address: bound.ip().to_string(),
                net: Arc::new(Net::new(None)),
            };
            Box::new(MediaOnly { inner: ranges, allowed: allowed.clone() })
        };
        let mut conn_configs = vec![ConnConfig { conn: Arc::new(socket), relay_addr_generator: relays() }];
        let mut urls = vec![format!("turn:{public}?transport=udp")];
        let mut tls_bound = None;
        if let (false, Some(tls)) = (t.tls_addr.is_empty(), tls) {
            let listener =
                tokio::net::TcpListener::bind(&t.tls_addr).await.with_context(|| format!("turn.tls_addr: cannot listen on {}", t.tls_addr))?;
            let at = listener.local_addr()?;
            conn_configs.push(ConnConfig { conn: Arc::new(crate::turn_tls::TlsTurnConn::start(listener, tls)?), relay_addr_generator: relays() });
            let host = public.rsplit_once(':').map_or(public.as_str(), |(h, _)| h);
            urls.push(format!("turns:{host}:{}?transport=tcp", at.port()));
            tls_bound = Some(at);
        }
        let server = Server::new(ServerConfig {
            conn_configs,
            realm: t.realm.clone(),
            auth_handler: Arc::new(RestCredentials { secret: secret.to_vec() }),
            channel_bind_timeout: Duration::ZERO,
            alloc_close_notify: None,
        })
        .await
        .map_err(|e| anyhow::anyhow!("TURN server: {e}"))?;
        info!(addr = %bound, tls = ?tls_bound, urls = ?urls, relay_ports = ?(t.relay_port_min, t.relay_port_max), "TURN server listening");
        Ok(Turn { server, urls, bound, tls_bound })
    }

    /// Ends every allocation and stops listening.
    pub async fn stop(&self) {
        if let Err(e) = self.server.close().await {
            debug!(error = %e, "TURN server close");
        }
    }
}

/// host:port in the URL clients get: `turn.public_addr`, else the public or bound IP with
/// the bound port.
fn public_addr(config: &Config, bound: SocketAddr) -> String {
    let t = &config.turn;
    if !t.public_addr.is_empty() {
        return t.public_addr.clone();
    }
    SocketAddr::new(public_ip(config, bound), bound.port()).to_string()
}

/// `webrtc.public_ip`, else the bound address, else (bound to 0.0.0.0) the machine's main one.
fn public_ip(config: &Config, bound: SocketAddr) -> IpAddr {
    match config.webrtc.public_ip.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) if bound.ip().is_unspecified() => {
            let ips = tessera_webrtc_agent::net::bind_ips(None);
            tessera_webrtc_agent::net::primary_ip(&ips).unwrap_or(bound.ip())
        }
        Err(_) => bound.ip(),
    }
}

/// Checks `<expiry>:<participant>` user names against the shared secret.
struct RestCredentials {
    secret: Vec<u8>,
}

impl AuthHandler for RestCredentials {
    fn auth_handle(&self, username: &str, realm: &str, src: SocketAddr) -> Result<Vec<u8>, turn::Error> {
        let expiry = username.split(':').next().and_then(|e| e.parse::<u64>().ok());
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        match expiry {
            None => {
                debug!(user = ?username, from = %src, "TURN user name without an expiry refused");
                Err(turn::Error::Other("user name is not <expiry>:<participant>".into()))
            }
            Some(e) if e < now => {
                debug!(user = ?username, from = %src, "expired TURN credentials refused");
                Err(turn::Error::Other("credentials expired".into()))
            }
            Some(_) => {
                // The key a client with the right credential derives; a wrong one fails the
                // message integrity check, and the server answers 401.
                Ok(generate_auth_key(username, realm, &tessera_core::crypto::turn_password(&self.secret, username)))
            }
        }
    }
}

/// Relayed addresses whose sockets only talk to `allowed` peers.
struct MediaOnly {
    inner: RelayAddressGeneratorRanges,
    allowed: Arc<HashSet<SocketAddr>>,
}

#[async_trait::async_trait]
impl RelayAddressGenerator for MediaOnly {
    fn validate(&self) -> Result<(), turn::Error> {
        self.inner.validate()
    }

    async fn allocate_conn(&self, use_ipv4: bool, requested_port: u16) -> Result<(Arc<dyn Conn + Send + Sync>, SocketAddr), turn::Error> {
        let (conn, addr) = self.inner.allocate_conn(use_ipv4, requested_port).await?;
        Ok((Arc::new(PeerFilter { inner: conn, allowed: self.allowed.clone() }), addr))
    }
}

/// A relay socket that drops what goes to, or comes from, anyone but the allowed peers.
struct PeerFilter {
    inner: Arc<dyn Conn + Send + Sync>,
    allowed: Arc<HashSet<SocketAddr>>,
}

#[async_trait::async_trait]
impl Conn for PeerFilter {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        self.inner.connect(addr).await
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.recv_from(buf).await?.0)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        loop {
            let (n, from) = self.inner.recv_from(buf).await?;
            if self.allowed.contains(&from) {
                return Ok((n, from));
            }
            debug!(from = %from, "TURN relay: datagram from a peer that is not this server's media dropped");
        }
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        self.inner.send(buf).await
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        if !self.allowed.contains(&target) {
            // As a firewall would: silently, so a client cannot probe what lies behind.
            debug!(to = %target, "TURN relay: datagram to a peer that is not this server's media dropped");
            return Ok(buf.len());
        }
        self.inner.send_to(buf, target).await
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        self.inner.remote_addr()
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        self.inner.close().await
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}
