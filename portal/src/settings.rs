//! Portal settings, derived from the `[portal]` and `[webrtc]` config sections.

use std::time::Duration;

use crate::socketio::SocketIoConfig;

/// How the portal behaves; see `config/tessera.example.toml` for each value's meaning.
#[derive(Debug, Clone)]
pub struct PortalSettings {
    /// Reconnection ticket lifetime.
    pub ticket_lifetime: Duration,
    /// How long a dropped participant keeps their place.
    pub reconnection_timeout: Duration,
    /// How long a socket may stay without logging in.
    pub login_timeout: Duration,
    /// Requests per second a client is served (burst twice that); past it, requests are refused.
    pub max_requests_per_sec: u32,
    /// Socket.IO transport settings.
    pub socketio: SocketIoConfig,
    /// STUN/TURN servers for clients (RTCIceServer objects), sent in the login result.
    pub ice_servers: Vec<serde_json::Value>,
    /// TURN servers whose credentials each participant gets at login; set by the binary,
    /// which knows the secret.
    pub turn: Option<TurnGrant>,
}

/// TURN servers sharing one secret (TURN REST API credentials).
#[derive(Clone)]
pub struct TurnGrant {
    /// `turn:`/`turns:` URLs.
    pub urls: Vec<String>,
    /// The shared secret.
    pub secret: Vec<u8>,
    /// How long a participant's credentials stay valid.
    pub lifetime: Duration,
}

impl std::fmt::Debug for TurnGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("TurnGrant").field("urls", &self.urls).field("lifetime", &self.lifetime).finish_non_exhaustive()
    }
}

impl Default for PortalSettings {
    fn default() -> Self {
        PortalSettings::from_config(&tessera_config::Config::default())
    }
}

impl PortalSettings {
    /// Settings from a loaded configuration.
    pub fn from_config(c: &tessera_config::Config) -> Self {
        let p = &c.portal;
        PortalSettings {
            ticket_lifetime: Duration::from_secs(p.reconnection_ticket_lifetime_secs),
            reconnection_timeout: Duration::from_secs(p.reconnection_timeout_secs),
            login_timeout: Duration::from_secs(p.login_timeout_secs),
            max_requests_per_sec: p.max_requests_per_sec,
            socketio: SocketIoConfig {
                ping_interval: Duration::from_millis(p.ping_interval_ms),
                ping_timeout: Duration::from_millis(p.ping_timeout_ms),
                max_payload: usize::try_from(p.max_message_bytes).unwrap_or(usize::MAX),
                max_unauthenticated: usize::try_from(p.max_unauthenticated_sessions).unwrap_or(usize::MAX),
                max_unauthenticated_per_address: usize::try_from(p.max_unauthenticated_sessions_per_address).unwrap_or(usize::MAX),
                cors_origins: p.cors_origins.clone(),
                ..SocketIoConfig::default()
            },
            ice_servers: c
                .webrtc
                .ice_servers
                .iter()
                .map(|s| {
                    if s.username.is_empty() {
                        serde_json::json!({"urls": s.urls})
                    } else {
                        serde_json::json!({"urls": s.urls, "username": s.username, "credential": s.credential})
                    }
                })
                .collect(),
            turn: None,
        }
    }
}
