//! Client-Portal signaling over Socket.IO v5 on the websocket transport. The Socket.IO
//! framing is written here independently of the server's codec, so tests using this
//! client check the server against a second implementation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Vec<Value>>>>>;

/// A notification from the portal: event name and its data.
#[derive(Debug, Clone)]
pub struct Notification {
    /// Event name (`participant`, `stream`, `progress`, `text`, `drop`).
    pub event: String,
    /// First argument (or null).
    pub data: Value,
}

/// A connected Socket.IO client.
pub struct Signaling {
    out: mpsc::Sender<String>,
    pending: Pending,
    next_id: u64,
    /// Notifications in arrival order; `None` once the connection is gone.
    pub notifications: mpsc::Receiver<Notification>,
    /// Notifications received while waiting for others, oldest first.
    pub backlog: Vec<Notification>,
    /// The writer and reader tasks (aborted by [`Signaling::kill`]).
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// A second descriptor of the TCP socket, so [`Signaling::kill`] can reset it.
    socket: Option<std::net::TcpStream>,
    /// Ends the task [`Signaling::discard_notifications`] started when this is dropped.
    discarding: Option<oneshot::Sender<()>>,
}

impl Signaling {
    /// Connects to a portal base URL such as `http://127.0.0.1:8080`.
    pub async fn connect(portal: &str) -> anyhow::Result<Signaling> {
        let ws_url = format!("{}/socket.io/?EIO=4&transport=websocket", portal.replacen("http", "ws", 1));
        // tungstenite zeroes its whole read buffer (128 KiB by default) before every read,
        // data or not: 4 KiB holds any signalling message's chunk (larger ones take several
        // reads) and keeps a load generator of thousands of participants off memset. Small
        // messages back to back (an answer, then candidates) go out at once, as browsers send.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
        let (ws, _) =
            tokio_tungstenite::connect_async_with_config(&ws_url, Some(config), true).await.with_context(|| format!("connecting {ws_url}"))?;
        let socket = {
            use std::os::fd::AsFd;
            ws.get_ref().get_ref().as_fd().try_clone_to_owned().ok().map(std::net::TcpStream::from)
        };
        let (mut sink, mut stream) = ws.split();
        // Engine.IO open packet, then Socket.IO CONNECT to "/".
        let open = next_text(&mut stream).await?;
        if !open.starts_with('0') {
            bail!("expected an Engine.IO open packet, got {open:?}");
        }
        sink.send(Message::text("40")).await?;
        let connected = next_text(&mut stream).await?;
        if !connected.starts_with("40") {
            bail!("expected a Socket.IO CONNECT answer, got {connected:?}");
        }
        let (out_tx, mut out_rx) = mpsc::channel::<String>(256);
        let (note_tx, note_rx) = mpsc::channel::<Notification>(4096);
        let pending: Pending = Arc::default();
        let pend = pending.clone();
        let pong = out_tx.clone();
        let writer = tokio::spawn(async move {
            while let Some(msg) = out_rx.recv().await {
                if sink.send(Message::text(msg)).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let reader = tokio::spawn(async move {
            while let Ok(text) = next_text(&mut stream).await {
                match text.as_bytes().first() {
                    Some(b'2') => {
                        let _ = pong.send("3".into()).await;
                    }
                    Some(b'4') => {
                        if let Some(n) = handle_socketio(&text[1..], &pend)
                            && note_tx.send(n).await.is_err()
                        {
                            break;
                        }
                    }
                    Some(b'1') => break,
                    _ => {}
                }
            }
            // Connection gone: fail every waiting request.
            pend.lock().map(|mut p| p.clear()).ok();
        });
        Ok(Signaling {
            out: out_tx,
            pending,
            next_id: 0,
            notifications: note_rx,
            backlog: Vec::new(),
            tasks: vec![writer, reader],
            socket,
            discarding: None,
        })
    }

    /// Sends a request and waits for its ack arguments (e.g. `["ok", data]`).
    pub async fn request(&mut self, name: &str, data: Option<Value>) -> anyhow::Result<Vec<Value>> {
        let id = self.next_id;
        self.next_id += 1;
        let mut args = vec![Value::String(name.into())];
        if let Some(d) = data {
            args.push(d);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().map_err(|_| anyhow!("poisoned"))?.insert(id, tx);
        self.out.send(format!("42{id}{}", Value::Array(args))).await.map_err(|_| anyhow!("connection closed"))?;
        tokio::time::timeout(Duration::from_secs(15), rx)
            .await
            .map_err(|_| anyhow!("no answer to {name} within 15 s"))?
            .map_err(|_| anyhow!("connection closed before the answer to {name}"))
    }

    /// Sends a request and returns the data of an `ok` answer, or the error reason.
    pub async fn ok(&mut self, name: &str, data: Option<Value>) -> anyhow::Result<Value> {
        let args = self.request(name, data).await?;
        match args.first().and_then(Value::as_str) {
            Some("ok") => Ok(args.get(1).cloned().unwrap_or(Value::Null)),
            _ => bail!("{name} failed: {}", args.get(1).cloned().unwrap_or(Value::Null)),
        }
    }

    /// Waits for the first notification matching `pred` (looking at the backlog first);
    /// others received meanwhile go to the backlog.
    pub async fn wait_for(&mut self, what: &str, timeout: Duration, mut pred: impl FnMut(&Notification) -> bool) -> anyhow::Result<Notification> {
        if let Some(i) = self.backlog.iter().position(&mut pred) {
            return Ok(self.backlog.remove(i));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let n = tokio::time::timeout_at(deadline, self.notifications.recv())
                .await
                .map_err(|_| anyhow!("timed out waiting for {what}"))?
                .ok_or_else(|| anyhow!("connection closed while waiting for {what}"))?;
            if pred(&n) {
                return Ok(n);
            }
            self.backlog.push(n);
        }
    }

    /// Drops every notification from now on (and the backlog), for a participant kept only
    /// to stay in the room. Unread, they fill the queue (4096), whose reader then stops —
    /// pings unanswered, the server's queue to it growing — and a load generator's
    /// thousands of participants each held megabytes of others' joins. Waiting for a
    /// notification afterwards fails as on a closed connection; dropping the `Signaling`
    /// still ends the connection.
    pub fn discard_notifications(&mut self) {
        let (closed_tx, closed) = mpsc::channel(1);
        drop(closed_tx);
        let mut incoming = std::mem::replace(&mut self.notifications, closed);
        self.backlog.clear();
        let (stop_tx, mut stop) = oneshot::channel::<()>();
        self.discarding = Some(stop_tx);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    n = incoming.recv() => if n.is_none() { break },
                    _ = &mut stop => break,
                }
            }
        });
    }

    /// Moves every notification received so far into the backlog and returns it.
    pub fn drain(&mut self) -> &[Notification] {
        while let Ok(n) = self.notifications.try_recv() {
            self.backlog.push(n);
        }
        &self.backlog
    }

    /// Closes the connection (like a network drop: no logout).
    pub async fn close(&self) {
        let _ = self.out.send("1".into()).await;
    }

    /// Kills the connection like a network loss: the reader and writer tasks are aborted
    /// and the TCP connection is reset, without a WebSocket close frame or an Engine.IO /
    /// Socket.IO close packet (unlike [`Signaling::close`]). The server learns of it from
    /// the reset, or at its ping timeout. Waiting requests fail and `notifications` ends.
    pub async fn kill(&mut self) {
        if let Some(socket) = self.socket.take() {
            // Zero linger: closing the socket's last descriptor sends RST, not FIN.
            if let Ok(s) = tokio::net::TcpStream::from_std(socket) {
                let _ = s.set_zero_linger();
            }
        }
        self.stop_tasks().await;
    }

    /// Like [`Signaling::kill`], but the TCP connection stays open and silent, as when the
    /// network drops everything or the client froze: not even a reset is sent, so the
    /// server notices only at its ping timeout, or when a `relogin` takes the participant
    /// over and closes it. Returns the socket; dropping it closes the connection.
    pub async fn kill_silently(&mut self) -> Option<std::net::TcpStream> {
        let socket = self.socket.take();
        self.stop_tasks().await;
        socket
    }

    async fn stop_tasks(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
            // Returns once the task is dropped, and with it its half of the socket.
            let _ = t.await;
        }
        self.pending.lock().map(|mut p| p.clear()).ok();
    }
}

async fn next_text<S>(stream: &mut S) -> anyhow::Result<String>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
            Some(Ok(Message::Close(_))) | None => bail!("connection closed"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// Handles one Socket.IO packet (without the Engine.IO `4`); returns a notification for events.
fn handle_socketio(p: &str, pending: &Pending) -> Option<Notification> {
    let kind = p.as_bytes().first().copied()?;
    if kind == b'1' {
        return Some(Notification { event: "disconnect".into(), data: Value::Null });
    }
    let rest = &p[1..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let id: Option<u64> = rest[..digits].parse().ok();
    let json: Value = serde_json::from_str(&rest[digits..]).ok()?;
    match kind {
        b'2' => {
            let arr = json.as_array()?;
            let event = arr.first()?.as_str()?.to_string();
            Some(Notification { event, data: arr.get(1).cloned().unwrap_or(Value::Null) })
        }
        b'3' => {
            let tx = pending.lock().ok()?.remove(&id?)?;
            let _ = tx.send(json.as_array().cloned().unwrap_or_default());
            None
        }
        _ => None,
    }
}
