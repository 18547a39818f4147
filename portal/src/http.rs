//! The portal's HTTP server: Socket.IO at `/socket.io/`, plus whatever the binary adds
//! (demo page, JS SDK, dev token endpoint).
//!
//! Built from actix-http's parts rather than actix-web's `HttpServer` for one reason: a
//! request to upgrade the connection (a websocket) is handed to the Socket.IO server with
//! the connection itself ([`SocketIo::on_upgrade`]), so actix's HTTP/1 dispatcher and its
//! buffers do not stay under each participant's websocket for its whole life.

use actix_http::HttpService;
use actix_service::{fn_factory, fn_service, map_config};
use actix_web::dev::AppConfig;
use actix_web::{App, web};

use crate::Portal;
use crate::socketio::SocketIo;

/// Starts the portal HTTP server on an already-bound listener, over TLS (https/wss) when
/// `tls` is given. `extra` registers further routes on the same address.
pub fn serve<F>(
    listener: std::net::TcpListener,
    tls: Option<rustls::ServerConfig>,
    portal: Portal,
    extra: F,
) -> std::io::Result<actix_web::dev::Server>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    serve_socketio(listener, tls, portal.socketio().clone(), 2, extra)
}

/// Serves `sio` (and `extra`'s routes) on `listener` with `workers` threads.
pub fn serve_socketio<F>(
    listener: std::net::TcpListener,
    tls: Option<rustls::ServerConfig>,
    sio: SocketIo,
    workers: usize,
    extra: F,
) -> std::io::Result<actix_web::dev::Server>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    // One factory for both listeners; a macro because the plain and TLS services differ in
    // the connection type their upgrade takes.
    macro_rules! service {
        ($sio:expr, $extra:expr) => {{
            let (routes, extra, sio) = ($sio.clone(), $extra.clone(), $sio.clone());
            let app = App::new().configure(move |cfg| routes.configure(cfg)).configure(extra);
            // actix-web's server gives the app the listener's address and scheme; the portal
            // asks neither of its requests (no `connection_info`, no `url_for`).
            let app = map_config(app, |()| AppConfig::default());
            let upgrade = fn_factory(move || {
                let sio = sio.clone();
                async move { Ok::<_, ()>(fn_service(move |(req, framed)| sio.clone().on_upgrade(req, framed))) }
            });
            HttpService::build()
                // With the socket.io bodies' slices (see `socketio::chunks`): polling
                // connections' buffers stay small.
                .h1_write_buffer_size(crate::socketio::chunks::WRITE_BUFFER)
                // Signaling is small messages back to back (an answer, then a notification):
                // with Nagle's algorithm the second waits for the client's delayed ACK, 40 ms
                // on Linux (Node, which OWT's portal ran on, turns it off too).
                .tcp_nodelay(true)
                .upgrade(upgrade)
                .finish(app)
        }};
    }
    let builder = actix_server::Server::build().workers(workers).disable_signals().shutdown_timeout(3);
    let builder = match tls {
        Some(tls) => builder.listen("tessera-portal", listener, move || service!(sio, extra).rustls_0_23(tls.clone()))?,
        None => builder.listen("tessera-portal", listener, move || service!(sio, extra).tcp())?,
    };
    Ok(builder.run())
}
