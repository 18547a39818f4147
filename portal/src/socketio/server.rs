//! The Engine.IO transports over actix-web: long-polling GET/POST, and websocket on the
//! connection actix hands over at the upgrade.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix_codec::Framed;
use actix_http::body::BodySize;
use actix_http::{ConnectionType, Request, Response, h1};
use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;
use bytes::BytesMut;
use futures_util::SinkExt as _;
use futures_util::StreamExt as _;
use rand::RngCore as _;
use tokio::sync::{mpsc, oneshot};

use super::engine::{Eio, OpenInfo, Packet as EPacket};
use super::session::{Cmd, CmdTx, SessionTask};
use super::socket::{CloseRequest, Control, Socket};
use super::ws::{Io, WsConn};

/// Capacity of a session's command channel (HTTP requests waiting on the session task).
const CMD_QUEUE: usize = 16;
/// Capacity of the stream of newly connected sockets.
const SOCKETS_QUEUE: usize = 64;
/// Where Socket.IO is served: polling requests (actix routes) and websocket upgrades alike.
const PATHS: [&str; 2] = ["/socket.io/", "/socket.io"];

/// Tunables of the Socket.IO server.
#[derive(Debug, Clone)]
pub struct SocketIoConfig {
    /// The server pings every `ping_interval`.
    pub ping_interval: Duration,
    /// ...and closes the session when no pong came back within `ping_timeout`.
    pub ping_timeout: Duration,
    /// Largest accepted HTTP POST body or websocket message, in bytes.
    pub max_payload: usize,
    /// Time for the client to send the Socket.IO CONNECT after the handshake.
    pub connect_timeout: Duration,
    /// Time for a websocket upgrade probe to complete.
    pub upgrade_timeout: Duration,
    /// Packets a socket may have queued for the client before it is closed as too slow.
    pub outgoing_queue: usize,
    /// Events that may wait for the application before the session stops reading.
    pub incoming_queue: usize,
    /// Most sessions not yet marked authenticated ([`super::SocketHandle::authenticated`]), in total.
    pub max_unauthenticated: usize,
    /// ...and per client address.
    pub max_unauthenticated_per_address: usize,
    /// Origins allowed to reach `/socket.io/` from a browser (`*`: any); empty: no CORS.
    pub cors_origins: Vec<String>,
}

impl Default for SocketIoConfig {
    fn default() -> Self {
        SocketIoConfig {
            ping_interval: Duration::from_millis(25_000),
            ping_timeout: Duration::from_millis(20_000),
            max_payload: 1_000_000,
            connect_timeout: Duration::from_secs(45),
            upgrade_timeout: Duration::from_secs(10),
            outgoing_queue: 1024,
            incoming_queue: 256,
            max_unauthenticated: 2000,
            max_unauthenticated_per_address: 100,
            cors_origins: vec!["*".into()],
        }
    }
}

/// The HTTP-level errors of the reference server (`engine.io` `Server.errors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HttpError {
    UnknownTransport,
    UnknownSid,
    BadHandshakeMethod,
    BadRequest,
    UnsupportedProtocolVersion,
    PayloadTooLarge,
    /// Too many sessions that have not authenticated (engine.io's `FORBIDDEN`, as its
    /// `allowRequest` refusal answers).
    Forbidden,
}

impl HttpError {
    fn response(self) -> HttpResponse {
        let (code, message) = match self {
            HttpError::UnknownTransport => (0, "Transport unknown"),
            HttpError::UnknownSid => (1, "Session ID unknown"),
            HttpError::BadHandshakeMethod => (2, "Bad handshake method"),
            HttpError::BadRequest => (3, "Bad request"),
            HttpError::UnsupportedProtocolVersion => (5, "Unsupported protocol version"),
            HttpError::PayloadTooLarge => return HttpResponse::new(StatusCode::PAYLOAD_TOO_LARGE),
            HttpError::Forbidden => {
                return HttpResponse::Forbidden().json(serde_json::json!({ "code": 4, "message": "Too many connections waiting to log in" }));
            }
        };
        HttpResponse::BadRequest().json(serde_json::json!({ "code": code, "message": message }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Polling,
    WebSocket,
}

struct Query {
    transport: Transport,
    sid: Option<String>,
    /// Engine.IO 3 or 4; a session keeps the version of its handshake.
    eio: Eio,
}

fn parse_query(query: &str) -> Result<Query, HttpError> {
    let map = web::Query::<HashMap<String, String>>::from_query(query).map_err(|_| HttpError::BadRequest)?.into_inner();
    let transport = match map.get("transport").map(String::as_str) {
        Some("polling") => Transport::Polling,
        Some("websocket") => Transport::WebSocket,
        _ => return Err(HttpError::UnknownTransport),
    };
    let eio = map.get("EIO").and_then(|v| Eio::from_query(v)).ok_or(HttpError::UnsupportedProtocolVersion)?;
    Ok(Query { transport, sid: map.get("sid").cloned(), eio })
}

/// A random 20-character URL-safe id (120 bits).
pub(crate) fn generate_id() -> String {
    let mut bytes = [0u8; 15];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[derive(Clone)]
struct Entry {
    eio: Eio,
    cmd: CmdTx,
    control: Arc<Control>,
    posting: Arc<AtomicBool>,
}

/// Counts sessions that have not authenticated yet, in total and per client address, so
/// a flood of handshakes cannot hold unbounded memory for the login timeout.
#[derive(Debug)]
pub(crate) struct Admission {
    max_total: usize,
    max_per_address: usize,
    counts: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl Admission {
    fn new(config: &SocketIoConfig) -> Self {
        Admission {
            max_total: config.max_unauthenticated,
            max_per_address: config.max_unauthenticated_per_address,
            counts: Mutex::new((0, HashMap::new())),
        }
    }

    /// Admits one more unauthenticated session from `addr`, or refuses it.
    fn admit(self: &Arc<Self>, addr: Option<IpAddr>) -> Option<Unauthenticated> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (total, by_addr) = &mut *counts;
        if *total >= self.max_total {
            return None;
        }
        if let Some(addr) = addr {
            let n = by_addr.entry(addr).or_insert(0);
            if *n >= self.max_per_address {
                return None;
            }
            *n += 1;
        }
        *total += 1;
        Some(Unauthenticated { admission: self.clone(), addr })
    }

    /// Sessions admitted and not yet authenticated or closed.
    pub(crate) fn count(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

/// One admitted unauthenticated session; dropping it (login or close) frees its place.
#[derive(Debug)]
pub(crate) struct Unauthenticated {
    admission: Arc<Admission>,
    addr: Option<IpAddr>,
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        let mut counts = self.admission.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (total, by_addr) = &mut *counts;
        *total = total.saturating_sub(1);
        if let Some(addr) = self.addr
            && let Some(n) = by_addr.get_mut(&addr)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by_addr.remove(&addr);
            }
        }
    }
}

/// Shared server state.
pub(crate) struct Inner {
    pub(crate) config: SocketIoConfig,
    pub(crate) sockets_tx: mpsc::Sender<Socket>,
    sessions: Mutex<HashMap<String, Entry>>,
    admission: Arc<Admission>,
}

impl Inner {
    fn sessions(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn remove_session(&self, sid: &str) {
        self.sessions().remove(sid);
    }
}

/// The Socket.IO server: cheap to clone, shared by all actix workers.
#[derive(Clone)]
pub struct SocketIo {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SocketIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketIo").field("sessions", &self.session_count()).finish_non_exhaustive()
    }
}

/// Why an upgrade request is refused.
enum Refused {
    /// Not the Socket.IO path.
    NotFound,
    /// An engine.io error (engine.io answers these the same over any transport).
    Engine(HttpError),
}

/// A websocket handshake that passed: the 101 response, and what the connection is for.
struct Upgrade {
    response: Response<()>,
    then: Then,
}

enum Then {
    /// A new session on this websocket alone.
    Open { eio: Eio, pending: Unauthenticated },
    /// The upgrade of a polling session.
    Upgrade { entry: Entry },
}

impl Then {
    fn eio(&self) -> Eio {
        match self {
            Then::Open { eio, .. } => *eio,
            Then::Upgrade { entry } => entry.eio,
        }
    }
}

/// Clears the "POST in progress" flag of a session when the request ends.
struct PostingGuard(Arc<AtomicBool>);

impl Drop for PostingGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl SocketIo {
    /// Returns the server and the stream of sockets that completed the Socket.IO CONNECT to "/".
    pub fn new(config: SocketIoConfig) -> (SocketIo, mpsc::Receiver<Socket>) {
        let (sockets_tx, sockets_rx) = mpsc::channel(SOCKETS_QUEUE);
        let admission = Arc::new(Admission::new(&config));
        let inner = Inner { config, sockets_tx, sessions: Mutex::new(HashMap::new()), admission };
        (SocketIo { inner: Arc::new(inner) }, sockets_rx)
    }

    /// Registers the /socket.io/ routes on an actix App: polling GET/POST. Websockets come
    /// through [`crate::http::serve_socketio`]'s upgrade, to [`SocketIo::on_upgrade`].
    pub fn configure(&self, cfg: &mut web::ServiceConfig) {
        for path in PATHS {
            let (get, post) = (self.clone(), self.clone());
            cfg.service(
                web::resource(path)
                    .wrap(cors(&self.inner.config.cors_origins))
                    .route(web::get().to(move |req: HttpRequest| {
                        let io = get.clone();
                        async move { io.on_get(req).await }
                    }))
                    .route(web::post().to(move |req: HttpRequest, body: web::Payload| {
                        let io = post.clone();
                        async move { io.on_post(req, body).await }
                    })),
            );
        }
    }

    /// Closes every session (server shutdown).
    pub fn close_all(&self) {
        let entries: Vec<Entry> = self.inner.sessions().values().cloned().collect();
        tracing::debug!(count = entries.len(), "closing all socket.io sessions");
        for entry in entries {
            entry.control.request_close(CloseRequest::Shutdown);
        }
    }

    /// Number of open Engine.IO sessions.
    pub fn session_count(&self) -> usize {
        self.inner.sessions().len()
    }

    /// Number of open sessions that have not authenticated yet.
    pub fn unauthenticated_count(&self) -> usize {
        self.inner.admission.count()
    }

    pub fn config(&self) -> &SocketIoConfig {
        &self.inner.config
    }

    fn entry(&self, sid: &str) -> Option<Entry> {
        self.inner.sessions().get(sid).cloned()
    }

    /// Admits one more session from `addr` while it has not logged in, or refuses it.
    fn admit(&self, addr: Option<IpAddr>) -> Result<Unauthenticated, HttpError> {
        self.inner.admission.admit(addr).ok_or_else(|| {
            tracing::warn!(client = ?addr, "too many connections waiting to log in; handshake refused");
            HttpError::Forbidden
        })
    }

    async fn on_get(self, req: HttpRequest) -> HttpResponse {
        let query = match parse_query(req.query_string()) {
            Ok(q) => q,
            Err(e) => return e.response(),
        };
        match (query.transport, query.sid) {
            (Transport::Polling, None) => {
                let pending = match self.admit(req.peer_addr().map(|a| a.ip())) {
                    Ok(pending) => pending,
                    Err(refused) => return refused.response(),
                };
                let open = self.start_session(query.eio, None, pending);
                HttpResponse::Ok().content_type("text/plain; charset=UTF-8").body(query.eio.encode_payload(&[open]))
            }
            (Transport::Polling, Some(sid)) => self.poll(&sid).await,
            // A websocket comes with `Connection: Upgrade`, which actix hands to `on_upgrade`.
            (Transport::WebSocket, _) => HttpError::BadRequest.response(),
        }
    }

    /// Creates a session and spawns its task; returns the open packet.
    fn start_session(&self, eio: Eio, ws: Option<WsConn>, pending: Unauthenticated) -> EPacket {
        let sid = generate_id();
        let config = &self.inner.config;
        let upgrades: &[&str] = if ws.is_some() { &[] } else { &["websocket"] };
        let open = OpenInfo {
            sid: &sid,
            upgrades,
            ping_interval: u64::try_from(config.ping_interval.as_millis()).unwrap_or(u64::MAX),
            ping_timeout: u64::try_from(config.ping_timeout.as_millis()).unwrap_or(u64::MAX),
            max_payload: config.max_payload,
        }
        .packet();
        let control = Arc::new(Control::default());
        control.hold_unauthenticated(pending);
        let (cmd_tx, cmd_rx) = futures_channel::mpsc::channel(CMD_QUEUE);
        let entry = Entry { eio, cmd: cmd_tx, control: control.clone(), posting: Arc::new(AtomicBool::new(false)) };
        self.inner.sessions().insert(sid.clone(), entry);
        tracing::debug!(%sid, websocket = ws.is_some(), ?eio, "engine.io session opened");
        let first = ws.is_some().then(|| open.clone());
        let task = SessionTask::new(sid, eio, self.inner.clone(), control, cmd_rx, ws, first);
        actix_web::rt::spawn(task.run());
        open
    }

    async fn poll(&self, sid: &str) -> HttpResponse {
        let Some(entry) = self.entry(sid) else { return HttpError::UnknownSid.response() };
        let (tx, rx) = oneshot::channel();
        if send_cmd(&entry.cmd, Cmd::Poll(tx)).await.is_err() {
            return HttpError::UnknownSid.response();
        }
        let payload = match rx.await {
            Ok(Ok(payload)) => payload,
            Ok(Err(e)) => return e.response(),
            Err(_) => entry.eio.encode_payload(&[EPacket::Close]),
        };
        super::chunks::sliced(HttpResponse::Ok().content_type("text/plain; charset=UTF-8").body(payload))
    }

    /// A request to upgrade its connection, which actix hands over whole: a websocket that
    /// opens a session, or one that upgrades a polling session (`sid`). Anything else gets
    /// its HTTP error on the connection, which then closes.
    pub(crate) async fn on_upgrade<T: Io + 'static>(self, req: Request, mut framed: Framed<T, h1::Codec>) -> Result<(), actix_web::Error> {
        let answer = match self.upgrade_to(&req) {
            Ok(Upgrade { response, then }) => {
                framed.send((response, BodySize::None).into()).await?;
                let parts = framed.into_parts();
                // What the client sent after its request, if anything, without the 8 KiB
                // buffer actix read it into.
                let read = BytesMut::from(&parts.read_buf[..]);
                let conn = WsConn::new(Box::new(parts.io), read, then.eio(), self.inner.config.max_payload);
                match then {
                    Then::Open { eio, pending } => {
                        self.start_session(eio, Some(conn), pending);
                    }
                    Then::Upgrade { entry } => {
                        // Refused: the session ended meanwhile.
                        if let Err(Cmd::Upgrade(conn)) = send_cmd(&entry.cmd, Cmd::Upgrade(Box::new(conn))).await {
                            conn.close().await;
                        }
                    }
                }
                return Ok(());
            }
            Err(Refused::NotFound) => HttpResponse::NotFound().finish(),
            Err(Refused::Engine(e)) => e.response(),
        };
        let (mut head, body) = Response::from(answer).into_parts();
        // The connection is this handler's and ends with it: say so, or the codec answers
        // `connection: upgrade` (the request's type) and the client pools a connection that
        // is about to close, and its next request on it fails with a reset.
        head.head_mut().set_connection_type(ConnectionType::Close);
        let body = actix_web::body::to_bytes(body).await.unwrap_or_default();
        framed.send((head, BodySize::Sized(body.len() as u64)).into()).await?;
        framed.send(h1::Message::Chunk(Some(body))).await?;
        framed.send(h1::Message::Chunk(None)).await?;
        Ok(())
    }

    /// What an upgrade request leads to, or the error it gets.
    fn upgrade_to(&self, req: &Request) -> Result<Upgrade, Refused> {
        if !PATHS.contains(&req.path()) {
            return Err(Refused::NotFound);
        }
        let query = parse_query(req.uri().query().unwrap_or_default()).map_err(Refused::Engine)?;
        if query.transport != Transport::WebSocket {
            return Err(Refused::Engine(HttpError::BadRequest));
        }
        let then = match query.sid {
            None => Then::Open { eio: query.eio, pending: self.admit(req.peer_addr().map(|a| a.ip())).map_err(Refused::Engine)? },
            Some(sid) => Then::Upgrade { entry: self.entry(&sid).ok_or(Refused::Engine(HttpError::UnknownSid))? },
        };
        let response = actix_http::ws::handshake(req.head()).map_err(|_| Refused::Engine(HttpError::BadRequest))?.finish().drop_body();
        Ok(Upgrade { response, then })
    }

    async fn on_post(self, req: HttpRequest, mut body: web::Payload) -> HttpResponse {
        let query = match parse_query(req.query_string()) {
            Ok(q) => q,
            Err(e) => return e.response(),
        };
        let Some(sid) = query.sid else { return HttpError::BadHandshakeMethod.response() };
        let Some(entry) = self.entry(&sid) else { return HttpError::UnknownSid.response() };
        if query.transport != Transport::Polling {
            return HttpError::BadRequest.response();
        }
        if entry.posting.swap(true, Ordering::SeqCst) {
            return fail(&entry, "data request overlap from client", HttpError::BadRequest).await;
        }
        let _guard = PostingGuard(entry.posting.clone());

        let max = self.inner.config.max_payload;
        let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|len| len > max) {
            return fail(&entry, "payload too large", HttpError::PayloadTooLarge).await;
        }
        let mut buf = Vec::new();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else {
                return fail(&entry, "transport error", HttpError::BadRequest).await;
            };
            if buf.len() + chunk.len() > max {
                return fail(&entry, "payload too large", HttpError::PayloadTooLarge).await;
            }
            buf.extend_from_slice(&chunk);
        }
        let Ok(text) = std::str::from_utf8(&buf) else {
            return fail(&entry, "parse error: invalid UTF-8", HttpError::BadRequest).await;
        };
        let packets = match entry.eio.decode_payload(text) {
            Ok(p) => p,
            Err(e) => return fail(&entry, &format!("parse error: {e}"), HttpError::BadRequest).await,
        };
        let (tx, rx) = oneshot::channel();
        if send_cmd(&entry.cmd, Cmd::Post(Box::new((packets, tx)))).await.is_err() {
            return HttpError::UnknownSid.response();
        }
        match rx.await {
            Ok(Ok(())) => HttpResponse::Ok().content_type("text/html").body("ok"),
            Ok(Err(e)) => e.response(),
            Err(_) => HttpError::BadRequest.response(),
        }
    }
}

/// CORS for pages served on other origins (OWT apps load their page from their own web
/// server and start Socket.IO with long-polling, which the browser gates on these headers).
/// The origin is echoed rather than `*` so clients using `withCredentials` work too; the
/// portal uses no cookies, so credentials grant nothing.
/// Other origins get no CORS headers (the browser then refuses), never an error: the
/// portal's own pages send an `Origin` too. No origins configured: no CORS at all.
pub fn cors(origins: &[String]) -> actix_web::middleware::Condition<actix_cors::Cors> {
    let mut cors = actix_cors::Cors::default()
        .allowed_methods(["GET", "POST"])
        .allow_any_header()
        .supports_credentials()
        .block_on_origin_mismatch(false)
        .max_age(86_400);
    for origin in origins {
        cors = if origin == "*" { cors.allow_any_origin() } else { cors.allowed_origin(origin) };
    }
    actix_web::middleware::Condition::new(!origins.is_empty(), cors)
}

/// Closes the session for a protocol error seen by the HTTP layer and answers with `error`.
async fn fail(entry: &Entry, reason: &str, error: HttpError) -> HttpResponse {
    let _ = send_cmd(&entry.cmd, Cmd::Fail(reason.to_owned())).await;
    error.response()
}

/// Hands a command to a session task, waiting for room in its queue; the command back if
/// the session has ended.
async fn send_cmd(tx: &CmdTx, cmd: Cmd) -> Result<(), Cmd> {
    // futures' `Sender` sends through `&mut`: each call sends on its own clone.
    let mut tx = tx.clone();
    if std::future::poll_fn(|cx| tx.poll_ready(cx)).await.is_err() {
        return Err(cmd);
    }
    tx.try_send(cmd).map_err(futures_channel::mpsc::TrySendError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_validation_matches_reference_errors() {
        assert_eq!(parse_query("EIO=2&transport=polling").err(), Some(HttpError::UnsupportedProtocolVersion));
        assert_eq!(parse_query("EIO=5&transport=polling").err(), Some(HttpError::UnsupportedProtocolVersion));
        assert_eq!(parse_query("transport=polling").err(), Some(HttpError::UnsupportedProtocolVersion));
        assert_eq!(parse_query("EIO=3&transport=polling").unwrap().eio, Eio::V3);
        assert_eq!(parse_query("EIO=4&transport=polling").unwrap().eio, Eio::V4);
        assert_eq!(parse_query("EIO=4&transport=flash").err(), Some(HttpError::UnknownTransport));
        let q = parse_query("EIO=4&transport=websocket&sid=abc&t=x").unwrap();
        assert_eq!((q.transport, q.sid.as_deref()), (Transport::WebSocket, Some("abc")));
    }

    #[test]
    fn ids_are_url_safe_and_unique() {
        let (a, b) = (generate_id(), generate_id());
        assert_eq!(a.len(), 20);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }
}

/// Property tests: the handshake query of any request gives a transport or an engine.io error.
#[cfg(test)]
mod proptests {
    use super::*;
    use crate::socketio::packet::proptests::{config, text};
    use proptest::prelude::*;

    /// Query strings from engine.io's keys and values (some percent- or plus-encoded).
    fn pairs() -> impl Strategy<Value = Vec<(&'static str, &'static str)>> {
        let key = prop::sample::select(&["EIO", "transport", "sid", "t", "b64"][..]);
        let value = prop::sample::select(&["4", "3", "2", "%34", "%33", "polling", "websocket", "web+socket", "flash", "abc", "a%20b", ""][..]);
        prop::collection::vec((key, value), 0..5)
    }

    fn decoded(v: &str) -> String {
        v.replace("%34", "4").replace("%33", "3").replace("%20", " ").replace('+', " ")
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn any_query_parses_or_is_refused(q in prop_oneof![text(40), "[A-Za-z0-9=&%+;_.-]{0,40}"]) {
            // Refusals are engine.io's errors; what passes names a transport.
            if let Err(e) = parse_query(&q) {
                prop_assert!(matches!(e, HttpError::BadRequest | HttpError::UnknownTransport | HttpError::UnsupportedProtocolVersion), "{:?}", e);
            }
        }

        #[test]
        fn queries_follow_engine_io(pairs in pairs()) {
            let q = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
            // The last occurrence of a key counts.
            let last = |key: &str| pairs.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| decoded(v));
            let expected = match last("transport").as_deref() {
                Some("polling") => Ok(Transport::Polling),
                Some("websocket") => Ok(Transport::WebSocket),
                _ => Err(HttpError::UnknownTransport),
            }
            .and_then(|t| match last("EIO").as_deref() {
                Some("3") => Ok((t, Eio::V3)),
                Some("4") => Ok((t, Eio::V4)),
                _ => Err(HttpError::UnsupportedProtocolVersion),
            });
            let got = parse_query(&q);
            prop_assert_eq!(got.as_ref().map(|p| (p.transport, p.eio)).map_err(|e| *e), expected, "{}", q);
            if let Ok(p) = got {
                prop_assert_eq!(p.sid, last("sid"));
            }
        }
    }
}
