//! The portal's HTTP server: Socket.IO at `/socket.io/`, plus whatever the binary adds
//! (demo page, JS SDK, dev token endpoint).

use actix_web::{App, HttpServer, web};

use crate::Portal;

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
    let server = HttpServer::new(move || {
        let sio = portal.socketio().clone();
        let extra = extra.clone();
        App::new().configure(move |cfg| sio.configure(cfg)).configure(extra)
    })
    .workers(2)
    // With the socket.io bodies' slices (see `socketio::chunks`): connection buffers stay small.
    .h1_write_buffer_size(crate::socketio::chunks::WRITE_BUFFER);
    let server = match tls {
        Some(tls) => server.listen_rustls_0_23(listener, tls)?,
        None => server.listen(listener)?,
    };
    let server = server.disable_signals().shutdown_timeout(3).run();
    Ok(server)
}
