//! Tessera's management REST API, following OWT's `/v1`: rooms, participant tokens,
//! participants and streams. Every route under `/v1` requires the service credentials
//! (see [`auth`]). Room configuration lives in the [`Rooms`] store (this node's database, or the cluster's bucket); live state (who is
//! connected, what is published) is asked of the portal through [`RoomControl`].
//!
//! The routes and bodies are documented in `docs/rest-api.md`.

// Input from the network and files must never panic this crate: no unwrap/expect/panic
// and no unchecked indexing outside tests (`./scripts/test` runs clippy with -D warnings).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

pub mod auth;
pub mod error;
mod recordings;
mod routes;
mod streams;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::{App, HttpServer, web};
use tessera_core::token::{PortalAddress, TokenAuthority};
use tessera_core::{RoomControl, Rooms};

pub use auth::Credentials;
pub use error::ApiError;

/// Largest request body accepted, in bytes; rooms with many custom layouts fit easily.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// Everything the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// Room configurations.
    pub store: Arc<dyn Rooms>,
    /// Signs participant tokens.
    pub tokens: TokenAuthority,
    /// Service credentials.
    pub credentials: Credentials,
    /// Where tokens send clients.
    pub portal: PortalAddress,
    /// Token lifetime in seconds.
    pub token_lifetime_secs: u64,
    /// Live conference state.
    pub control: Arc<dyn RoomControl>,
    /// Finds the recorder node of a room (none: this server does not record).
    pub router: Arc<dyn tessera_core::command::Router>,
    /// Wakes the server's drain (`POST /v1/drain`); none: this server cannot be drained over REST.
    pub drain: Option<Arc<tokio::sync::Notify>>,
    /// Origins allowed to call the API from a browser (`*`: any); empty: no CORS.
    pub cors_origins: Vec<String>,
    /// The nodes of this deployment (this one alone without a cluster).
    pub nodes: Arc<dyn tessera_core::node::NodeDirectory>,
    /// Renders `GET /metrics` (Prometheus text); none: no such route.
    pub metrics: Option<Arc<dyn Fn() -> String + Send + Sync>>,
}

/// Seconds since the Unix epoch.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Registers the API's routes on an actix app.
pub fn configure(state: ApiState) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| routes::configure(cfg, state)
}

/// Serves `GET /metrics` alone (a media node of a cluster, which has no API), rendered
/// by `render`; anything else is 404. The caller awaits or stops it.
pub fn serve_metrics(listener: std::net::TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) -> std::io::Result<actix_web::dev::Server> {
    let server = HttpServer::new(move || App::new().configure(routes::configure_metrics_only(render.clone()))).workers(1);
    Ok(server.listen(listener)?.disable_signals().shutdown_timeout(2).run())
}

/// Starts the API server on an already-bound listener, over TLS when `tls` is given; the
/// caller awaits or stops it.
pub fn serve(listener: std::net::TcpListener, tls: Option<rustls::ServerConfig>, state: ApiState) -> std::io::Result<actix_web::dev::Server> {
    let server = HttpServer::new(move || {
        App::new()
            .wrap(routes::cors(&state.cors_origins))
            // OWT's server (express) accepts a trailing slash on every route, and OWT's own
            // REST client sends one (`POST /v1/rooms/{room}/tokens/`).
            .wrap(actix_web::middleware::NormalizePath::trim())
            .configure(configure(state.clone()))
    })
    .workers(2)
    // An answer is written as it is ready, not held for the client's delayed ACK.
    .tcp_nodelay(true);
    let server = match tls {
        Some(tls) => server.listen_rustls_0_23(listener, tls)?,
        None => server.listen(listener)?,
    };
    let server = server.disable_signals().shutdown_timeout(5).run();
    Ok(server)
}
