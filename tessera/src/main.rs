//! The `tessera` binary: `tessera serve` runs the conference server (portal, SFU, mixer,
//! management API) in one process; the other subcommands are a small client of the
//! management API for operators and scripts.

mod cli_client;
mod metrics;
mod node;
mod portal_routes;
mod serve;
mod tls;
mod turn;
mod turn_tls;
mod webhooks;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Tessera, a WebRTC conference server (OWT-compatible portal and REST API).
#[derive(Parser, Debug)]
#[command(name = "tessera", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server. With no --config it runs on built-in defaults: portal and demo
    /// page on 127.0.0.1:8080, management API on 127.0.0.1:3000, room "dev".
    Serve(serve::ServeArgs),
    /// Manage rooms through the running server's management API.
    Room {
        #[command(subcommand)]
        action: RoomAction,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Issue participant tokens through the running server's management API.
    Token {
        #[command(subcommand)]
        action: TokenAction,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Drains a running server, as SIGTERM does: no new logins or sessions, the running ones
    /// go on for up to `server.drain_timeout_secs`, then it stops.
    Drain {
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
enum RoomAction {
    /// Create a room; prints it as JSON.
    Create {
        /// Room name (unique).
        name: String,
        /// Room options as OWT JSON, e.g. '{"participantLimit": 10}'.
        #[arg(long)]
        options: Option<String>,
    },
    /// List rooms as JSON.
    List,
    /// Delete a room by id.
    Delete {
        /// Room id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum TokenAction {
    /// Create a participant token; prints the token string.
    Create {
        /// Room id.
        #[arg(long)]
        room: String,
        /// User name shown to others.
        #[arg(long)]
        user: String,
        /// Role in the room (presenter, viewer, ...).
        #[arg(long, default_value = "presenter")]
        role: String,
    },
}

/// Where the management API is and how to authenticate.
#[derive(clap::Args, Debug, Clone)]
struct ApiArgs {
    /// Management API base URL.
    #[arg(long, env = "TESSERA_API", default_value = "http://127.0.0.1:3000", global = true)]
    api: String,
    /// Service key; defaults to $TESSERA_SERVICE_KEY, else <data-dir>/service.key.
    #[arg(long, env = "TESSERA_SERVICE_KEY", hide_env_values = true, global = true)]
    key: Option<String>,
    /// Data folder to read service.key from when no key is given (and dev-tls/cert.pem,
    /// trusted for an https API when no --ca-cert is given).
    #[arg(long, default_value = "tessera-data", global = true)]
    data_dir: PathBuf,
    /// PEM certificate(s) to trust for an https API, beside the system's roots.
    #[arg(long, global = true)]
    ca_cert: Option<PathBuf>,
}

/// jemalloc, for less memory per subscriber than glibc's malloc (see the `jemalloc` feature).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // One TLS provider for the process (the servers, the CLI's and the webhooks' https
    // client): ring, which webrtc's DTLS already brings. Fails only if one is set already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tessera: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Room { action, api } => cli_client::room(action, api).await,
            Command::Token { action, api } => cli_client::token(action, api).await,
            Command::Drain { api } => cli_client::drain(api).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
