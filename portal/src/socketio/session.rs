//! One task per Engine.IO session: owns the transport state (its websocket itself), the
//! heartbeat and the Socket.IO layer. HTTP handlers talk to it over a channel, so no lock
//! is ever held across an `.await`.

use std::collections::VecDeque;
use std::future::pending;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until, timeout};

use super::engine::{Eio, Packet as EPacket};
use super::packet::{Packet as SPacket, PacketError, PacketType};
use super::server::{HttpError, Inner};
use super::socket::{CloseRequest, Control, Event, Incoming, OutRx, OutTx, Socket, SocketHandle};
use super::ws::{WsConn, WsIn};

/// How long the session waits for the application to take the `Closed` notification.
const CLOSED_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) type PollReply = Result<String, HttpError>;
/// Where a polling POST's outcome goes.
pub(crate) type PostReply = oneshot::Sender<Result<(), HttpError>>;

/// Requests from the HTTP handlers. The larger ones are boxed: a channel's first block
/// holds 32 of its messages, and every session has this channel for its whole life.
pub(crate) enum Cmd {
    /// A long-polling GET waiting for packets.
    Poll(oneshot::Sender<PollReply>),
    /// Packets delivered by a polling POST.
    Post(Box<(Vec<EPacket>, PostReply)>),
    /// A websocket opened with this sid (upgrade probe).
    Upgrade(Box<WsConn>),
    /// The HTTP layer saw a protocol error: close the session.
    Fail(String),
}

/// The HTTP side's end of a session task's command queue.
pub(crate) type CmdTx = futures_channel::mpsc::Sender<Cmd>;
/// The session task's end of it.
pub(crate) type CmdRx = futures_channel::mpsc::Receiver<Cmd>;

struct Connected {
    id: String,
    events: futures_channel::mpsc::Sender<Incoming>,
}

enum Ev {
    CloseRequested,
    Cmd(Option<Cmd>),
    Ws(WsIn),
    Probe(WsIn),
    Out(String),
    PollGone,
    Timer,
}

pub(crate) struct SessionTask {
    sid: String,
    /// Engine.IO 3 (Socket.IO v2 client: the client pings, "/" is connected at once) or 4.
    eio: Eio,
    io: Arc<Inner>,
    control: Arc<Control>,
    cmd_rx: CmdRx,
    /// Kept so that `out_rx` never reports "all senders gone".
    out_tx: OutTx,
    out_rx: OutRx,
    /// Packets ready to go out on the transport, in order.
    queue: VecDeque<EPacket>,
    ws: Option<WsConn>,
    poll: Option<oneshot::Sender<PollReply>>,
    /// Boxed: it exists only during an upgrade, and the session holds its slot for life.
    probe: Option<Box<WsConn>>,
    probe_deadline: Option<Instant>,
    /// The probe answered `3probe`: polling is paused until the client sends `5`.
    upgrading: bool,
    /// v4: when the server sends its next ping.
    next_ping: Option<Instant>,
    /// v4: when the pong to the last ping is overdue; v3: when the client's next ping (or
    /// any packet) is overdue.
    pong_deadline: Option<Instant>,
    connect_deadline: Option<Instant>,
    socket: Option<Connected>,
    /// Binary attachments of rejected binary packets still to swallow.
    skip_binary: usize,
    /// Set while a graceful close drains the queue: (reason, deadline).
    closing: Option<(String, Instant)>,
}

impl SessionTask {
    /// A new session; `ws` is set for websocket-only sessions, whose first frame is `open`.
    pub(crate) fn new(
        sid: String,
        eio: Eio,
        io: Arc<Inner>,
        control: Arc<Control>,
        cmd_rx: CmdRx,
        ws: Option<WsConn>,
        open: Option<EPacket>,
    ) -> SessionTask {
        let now = Instant::now();
        let (out_tx, out_rx) = futures_channel::mpsc::unbounded();
        // v4: the server pings; v3: the client pings and the server watches for it.
        let (next_ping, pong_deadline) = match eio {
            Eio::V4 => (Some(now + io.config.ping_interval), None),
            Eio::V3 => (None, Some(now + io.config.ping_interval + io.config.ping_timeout)),
        };
        SessionTask {
            next_ping,
            connect_deadline: Some(now + io.config.connect_timeout),
            sid,
            eio,
            io,
            control,
            cmd_rx,
            out_tx,
            out_rx,
            queue: open.into_iter().collect(),
            ws,
            poll: None,
            probe: None,
            probe_deadline: None,
            upgrading: false,
            pong_deadline,
            socket: None,
            skip_binary: 0,
            closing: None,
        }
    }

    /// The session's life. The task holds this future while the participant is connected,
    /// mostly idle in [`SessionTask::next_event`]: what runs between two events (handling
    /// one, flushing, connecting, closing) is boxed, so that the task keeps only what
    /// waiting needs. Not an `async fn`: one keeps its by-value `self` twice (the argument,
    /// and the local it is moved to), where an `async move` block keeps the one it captured.
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn run(mut self) -> impl std::future::Future<Output = ()> {
        async move {
            // Socket.IO v2 (over Engine.IO 3): the server connects "/" without waiting for a
            // CONNECT, right after the open packet.
            if self.eio == Eio::V3 {
                let _ = Box::pin(self.connect()).await;
            }
            let reason = loop {
                // Flush first: a websocket-only session starts with the open packet queued.
                if !self.queue.is_empty()
                    && let Err(reason) = Box::pin(self.flush()).await
                {
                    break self.closing.take().map_or(reason, |c| c.0);
                }
                if let Some((reason, _)) = &self.closing
                    && self.queue.is_empty()
                {
                    break reason.clone();
                }
                let ev = self.next_event().await;
                if let Err(reason) = Box::pin(self.handle(ev)).await {
                    break self.closing.take().map_or(reason, |c| c.0);
                }
            };
            Box::pin(self.finish(reason)).await;
        }
    }

    async fn next_event(&mut self) -> Ev {
        let take_out = self.closing.is_none() && (self.ws.is_some() || (self.poll.is_some() && !self.upgrading));
        let deadline = [self.next_ping, self.pong_deadline, self.connect_deadline, self.probe_deadline]
            .into_iter()
            .chain([self.closing.as_ref().map(|c| c.1)])
            .flatten()
            .min();
        tokio::select! {
            biased;
            () = self.control.requested() => Ev::CloseRequested,
            cmd = self.cmd_rx.next() => Ev::Cmd(cmd),
            m = recv_ws(self.ws.as_mut()) => Ev::Ws(m),
            // Boxed for the same reason as `probe`; made only during an upgrade.
            m = async {
                match self.probe.as_mut() {
                    Some(p) => Box::pin(p.recv()).await,
                    None => pending().await,
                }
            } => Ev::Probe(m),
            Some(s) = self.out_rx.next(), if take_out => Ev::Out(s),
            () = poll_gone(&mut self.poll) => Ev::PollGone,
            () = sleep_opt(deadline) => Ev::Timer,
        }
    }

    async fn handle(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::CloseRequested => self.on_close_request(),
            Ev::Cmd(None) => Err("server closed".to_owned()),
            Ev::Cmd(Some(cmd)) => self.on_cmd(cmd).await,
            Ev::Ws(WsIn::Packet(p)) => self.on_packet(p).await,
            Ev::Ws(WsIn::Ping(data)) => match self.ws.as_mut() {
                Some(ws) => ws.pong(data, self.io.config.ping_timeout).await,
                None => Ok(()),
            },
            Ev::Ws(WsIn::Error(e)) => Err(e),
            Ev::Ws(WsIn::Closed) => Err("transport close".to_owned()),
            Ev::Probe(m) => {
                self.on_probe(m).await;
                Ok(())
            }
            Ev::Out(s) => {
                self.queue_out(s);
                Ok(())
            }
            Ev::PollGone => Err("poll connection closed prematurely".to_owned()),
            Ev::Timer => self.on_timer().await,
        }
    }

    /// Queues a packet a handle sent for the transport, counting it off the handles'
    /// bound (every packet taken from `out_rx` goes through here).
    fn queue_out(&mut self, s: String) {
        self.control.took_one();
        self.queue.push_back(EPacket::Message(s));
    }

    /// Takes everything the handles have sent so far.
    fn drain_out(&mut self) {
        while let Ok(s) = self.out_rx.try_recv() {
            self.queue_out(s);
        }
    }

    fn on_close_request(&mut self) -> Result<(), String> {
        match self.control.take_request() {
            Some(CloseRequest::Disconnect) if self.closing.is_none() => {
                // Deliver what the application queued before the DISCONNECT.
                self.drain_out();
                self.queue.push_back(EPacket::Message(SPacket::disconnect("/").encode()));
                self.queue.push_back(EPacket::Close);
                let grace = self.io.config.ping_interval + self.io.config.ping_timeout;
                self.closing = Some(("server namespace disconnect".to_owned(), Instant::now() + grace));
                Ok(())
            }
            Some(CloseRequest::Abandon) if self.closing.is_none() => {
                // What was queued goes out, then the transport closes with no Socket.IO
                // DISCONNECT: the client takes it for a lost connection and reconnects.
                self.drain_out();
                self.queue.push_back(EPacket::Close);
                let grace = self.io.config.ping_interval + self.io.config.ping_timeout;
                self.closing = Some(("transport dropped for the client to reconnect".to_owned(), Instant::now() + grace));
                Ok(())
            }
            Some(CloseRequest::Disconnect | CloseRequest::Abandon) | None => Ok(()),
            Some(CloseRequest::Overflow) => Err("outgoing queue overflow".to_owned()),
            Some(CloseRequest::Shutdown) => Err("server shutting down".to_owned()),
        }
    }

    async fn on_cmd(&mut self, cmd: Cmd) -> Result<(), String> {
        match cmd {
            Cmd::Poll(tx) => {
                if self.ws.is_some() {
                    let _ = tx.send(Err(HttpError::BadRequest));
                } else if self.poll.is_some() {
                    let _ = tx.send(Err(HttpError::BadRequest));
                    return Err("overlap from client".to_owned());
                } else if self.upgrading {
                    let _ = tx.send(Ok(self.eio.encode_payload(&[EPacket::Noop])));
                } else {
                    self.poll = Some(tx);
                }
                Ok(())
            }
            Cmd::Post(post) => {
                let (packets, tx) = *post;
                if self.ws.is_some() {
                    let _ = tx.send(Err(HttpError::BadRequest));
                    return Ok(());
                }
                for p in packets {
                    if let Err(e) = self.on_packet(p).await {
                        let _ = tx.send(Err(HttpError::BadRequest));
                        return Err(e);
                    }
                }
                let _ = tx.send(Ok(()));
                Ok(())
            }
            Cmd::Upgrade(conn) => {
                if self.ws.is_some() || self.probe.is_some() || self.closing.is_some() {
                    tracing::debug!(sid = %self.sid, "refusing a second websocket for the session");
                    conn.close().await;
                } else {
                    tracing::debug!(sid = %self.sid, "websocket upgrade probe started");
                    self.probe = Some(conn);
                    self.probe_deadline = Some(Instant::now() + self.io.config.upgrade_timeout);
                }
                Ok(())
            }
            Cmd::Fail(reason) => Err(reason),
        }
    }

    async fn on_probe(&mut self, m: WsIn) {
        match m {
            WsIn::Packet(EPacket::Ping(data)) if data == "probe" && !self.upgrading => {
                let sent = match self.probe.as_mut() {
                    Some(p) => p.send(&EPacket::Pong(data), self.io.config.ping_timeout).await,
                    None => Err(String::new()),
                };
                if sent.is_err() {
                    self.drop_probe().await;
                    return;
                }
                self.upgrading = true;
                if let Some(tx) = self.poll.take() {
                    let _ = tx.send(Ok(self.eio.encode_payload(&[EPacket::Noop])));
                }
            }
            WsIn::Packet(EPacket::Upgrade) if self.upgrading => {
                if let Some(conn) = self.probe.take() {
                    tracing::debug!(sid = %self.sid, "upgraded to websocket");
                    self.ws = Some(*conn);
                }
                self.probe_deadline = None;
                self.upgrading = false;
                if let Some(tx) = self.poll.take() {
                    let _ = tx.send(Ok(self.eio.encode_payload(&[EPacket::Noop])));
                }
            }
            WsIn::Ping(data) => {
                if let Some(p) = self.probe.as_mut()
                    && p.pong(data, self.io.config.ping_timeout).await.is_err()
                {
                    self.drop_probe().await;
                }
            }
            other => {
                tracing::debug!(sid = %self.sid, ?other, "websocket upgrade aborted");
                self.drop_probe().await;
            }
        }
    }

    async fn drop_probe(&mut self) {
        self.upgrading = false;
        self.probe_deadline = None;
        if let Some(conn) = self.probe.take() {
            conn.close().await;
        }
    }

    async fn on_timer(&mut self) -> Result<(), String> {
        let now = Instant::now();
        let due = |d: Option<Instant>| d.is_some_and(|d| d <= now);
        if let Some((reason, deadline)) = &self.closing
            && *deadline <= now
        {
            return Err(reason.clone());
        }
        if due(self.pong_deadline) {
            return Err("ping timeout".to_owned());
        }
        if due(self.connect_deadline) {
            return Err("connect timeout".to_owned());
        }
        if due(self.probe_deadline) {
            tracing::debug!(sid = %self.sid, "websocket upgrade timed out");
            self.drop_probe().await;
        }
        if due(self.next_ping) {
            self.queue.push_back(EPacket::Ping(String::new()));
            self.next_ping = None;
            self.pong_deadline = Some(now + self.io.config.ping_timeout);
        }
        Ok(())
    }

    /// An Engine.IO packet from the client on the active transport.
    async fn on_packet(&mut self, p: EPacket) -> Result<(), String> {
        tracing::trace!(sid = %self.sid, kind = p.kind(), "engine.io packet in");
        if self.eio == Eio::V3 {
            // As engine.io 3.x: any packet shows the client alive, not only its pings.
            self.pong_deadline = Some(Instant::now() + self.io.config.ping_interval + self.io.config.ping_timeout);
        }
        match p {
            EPacket::Close => Err("transport close".to_owned()),
            // A v3 client does not answer pings (the server sends none): nothing to do.
            EPacket::Pong(_) if self.eio == Eio::V3 => Ok(()),
            EPacket::Pong(_) => {
                self.pong_deadline = None;
                if self.next_ping.is_none() {
                    self.next_ping = Some(Instant::now() + self.io.config.ping_interval);
                }
                Ok(())
            }
            EPacket::Ping(data) => {
                self.queue.push_back(EPacket::Pong(data));
                Ok(())
            }
            EPacket::Message(s) => self.on_message(&s).await,
            EPacket::Binary(_) => {
                if self.skip_binary > 0 {
                    self.skip_binary -= 1;
                    Ok(())
                } else {
                    self.deliver(Incoming::Invalid { reason: "unexpected binary message".to_owned() }).await
                }
            }
            EPacket::Noop | EPacket::Upgrade => Ok(()),
            EPacket::Open(_) => Err("parse error: open packet from client".to_owned()),
        }
    }

    /// A Socket.IO packet.
    async fn on_message(&mut self, s: &str) -> Result<(), String> {
        let p = match SPacket::decode(s) {
            Ok(p) => p,
            Err(PacketError::Binary { attachments, .. }) => {
                self.skip_binary = self.skip_binary.saturating_add(attachments);
                let reason = "binary packets are not supported".to_owned();
                return self.deliver(Incoming::Invalid { reason }).await;
            }
            Err(e) => return Err(format!("parse error: {e}")),
        };
        let root = p.nsp == "/";
        match p.kind {
            PacketType::Connect if !root => {
                self.queue.push_back(EPacket::Message(self.connect_error(&p.nsp, "Invalid namespace").encode()));
                Ok(())
            }
            PacketType::Connect if self.socket.is_none() && self.closing.is_none() => self.connect().await,
            PacketType::Disconnect if root && self.socket.is_some() => Err("client namespace disconnect".to_owned()),
            PacketType::Event if root => match p.into_event() {
                Ok((name, args, ack)) => self.deliver(Incoming::Event(Box::new(Event { name, args, ack }))).await,
                Err(reason) => self.deliver(Incoming::Invalid { reason }).await,
            },
            PacketType::Ack | PacketType::ConnectError if root => {
                let reason = format!("unexpected {:?} packet", p.kind);
                self.deliver(Incoming::Invalid { reason }).await
            }
            _ => {
                tracing::trace!(sid = %self.sid, kind = ?p.kind, nsp = ?p.nsp.chars().take(64).collect::<String>(), "ignored socket.io packet");
                Ok(())
            }
        }
    }

    /// CONNECT to `/`: hands a new [`Socket`] to the application.
    async fn connect(&mut self) -> Result<(), String> {
        let id = super::server::generate_id();
        // futures' channel holds one more than asked (a slot for its one sender).
        let (events_tx, events_rx) = futures_channel::mpsc::channel(self.io.config.incoming_queue.saturating_sub(1));
        let handle = SocketHandle::new(id.clone(), self.out_tx.clone(), self.io.config.outgoing_queue.max(1), self.control.clone());
        let ok = match self.eio {
            // Socket.IO v2 answers (and announces) "/" with a bare `0`.
            Eio::V3 => SPacket::new(PacketType::Connect, "/", None, None),
            Eio::V4 => SPacket::connect_ok("/", &id),
        };
        self.queue.push_back(EPacket::Message(ok.encode()));
        let socket = Socket { id: id.clone(), handle, events: events_rx };
        match timeout(self.io.config.ping_timeout, self.io.sockets_tx.send(socket)).await {
            Ok(Ok(())) => {
                tracing::debug!(sid = %self.sid, socket = %id, "socket.io socket connected");
                self.socket = Some(Connected { id, events: events_tx });
                self.connect_deadline = None;
            }
            _ => {
                tracing::debug!(sid = %self.sid, "application not accepting sockets");
                self.queue.pop_back();
                self.queue.push_back(EPacket::Message(self.connect_error("/", "Server unavailable").encode()));
            }
        }
        Ok(())
    }

    /// A refused CONNECT: v5 `4<nsp>,{"message":…}`; v2 `4<nsp>,"…"` (ERROR packet),
    /// named without the query string a v2 client appends to the namespace.
    fn connect_error(&self, nsp: &str, message: &str) -> SPacket {
        match self.eio {
            Eio::V4 => SPacket::connect_error(nsp, message),
            Eio::V3 => {
                let nsp = nsp.split('?').next().unwrap_or(nsp);
                SPacket::new(PacketType::ConnectError, nsp, None, Some(serde_json::Value::String(message.to_owned())))
            }
        }
    }

    /// Passes an event to the application; waits at most `ping_timeout` for queue space.
    async fn deliver(&mut self, ev: Incoming) -> Result<(), String> {
        let Some(socket) = &mut self.socket else { return Ok(()) };
        match timeout(self.io.config.ping_timeout, socket.events.send(ev)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("socket events receiver dropped".to_owned()),
            Err(_) => Err("incoming queue overflow".to_owned()),
        }
    }

    /// Writes queued packets to the active transport.
    async fn flush(&mut self) -> Result<(), String> {
        if let Some(ws) = self.ws.as_mut() {
            while let Some(p) = self.queue.pop_front() {
                ws.send(&p, self.io.config.ping_timeout).await?;
            }
        } else if !self.upgrading && !self.queue.is_empty() && self.poll.is_some() {
            if self.closing.is_none() {
                self.drain_out();
            }
            // A close packet travels alone: socket.io-client handles the packets of a payload
            // on the next tick, so a DISCONNECT batched with `1` would be reported as
            // "transport close".
            let take = match self.queue.iter().position(|p| *p == EPacket::Close) {
                Some(0) => 1,
                Some(i) => i,
                None => self.queue.len(),
            };
            let packets: Vec<EPacket> = self.queue.drain(..take).collect();
            tracing::trace!(sid = %self.sid, count = packets.len(), "answering poll");
            if let Some(tx) = self.poll.take()
                && tx.send(Ok(self.eio.encode_payload(&packets))).is_err()
            {
                return Err("poll connection closed prematurely".to_owned());
            }
        }
        Ok(())
    }

    async fn finish(mut self, reason: String) {
        self.control.mark_closed();
        self.io.remove_session(&self.sid);
        tracing::debug!(sid = %self.sid, socket = ?self.socket.as_ref().map(|s| &s.id), %reason, "session closed");
        if let Some(tx) = self.poll.take() {
            let _ = tx.send(Ok(self.eio.encode_payload(&[EPacket::Close])));
        }
        if let Some(ws) = self.ws.take() {
            ws.close().await;
        }
        if let Some(conn) = self.probe.take() {
            conn.close().await;
        }
        if let Some(mut socket) = self.socket.take() {
            let _ = timeout(CLOSED_DELIVERY_TIMEOUT, socket.events.send(Incoming::Closed { reason })).await;
        }
    }
}

impl Drop for SessionTask {
    fn drop(&mut self) {
        // Also covers a task dropped by a runtime shutdown.
        self.control.mark_closed();
        self.io.remove_session(&self.sid);
    }
}

async fn recv_ws(ws: Option<&mut WsConn>) -> WsIn {
    match ws {
        Some(ws) => ws.recv().await,
        None => pending().await,
    }
}

async fn poll_gone(poll: &mut Option<oneshot::Sender<PollReply>>) {
    match poll {
        Some(tx) => tx.closed().await,
        None => pending().await,
    }
}

async fn sleep_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => pending().await,
    }
}
