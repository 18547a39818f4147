//! The application-facing side of a connected Socket.IO socket.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::Notify;

// The three queues of a session (the handles' packets out, the client's events in, the
// HTTP side's commands) are futures' channels, not tokio's: tokio's allocates a block of
// 32 slots when made (and keeps a second one once it has carried 32 messages), ~1.3 KB
// a queue; futures' allocates per message and holds a few dozen bytes when empty. A
// portal keeps the three for each participant's whole life.

/// Encoded packets from a socket's handles to its session task. The channel is unbounded;
/// [`Control`] counts what waits in it, and a handle closes a client that lets
/// `outgoing_queue` packets pile up.
pub(crate) type OutTx = futures_channel::mpsc::UnboundedSender<String>;
/// The session task's end of [`OutTx`].
pub(crate) type OutRx = futures_channel::mpsc::UnboundedReceiver<String>;

use super::packet::Packet;

/// A socket that completed the Socket.IO CONNECT to `/`.
#[derive(Debug)]
pub struct Socket {
    pub id: String,
    pub handle: SocketHandle,
    /// Everything the client sends; ends with [`Incoming::Closed`].
    ///
    /// Dropping this receiver while the socket is open closes the socket.
    pub events: futures_channel::mpsc::Receiver<Incoming>,
}

/// What a client sent, or that its transport closed.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// An EVENT packet (boxed: every message in a socket's queue is the size of the largest).
    Event(Box<Event>),
    /// The client sent a packet that is not a valid event (e.g. first element not a string, binary packet); the socket stays open.
    Invalid { reason: String },
    /// Transport closed (client disconnect, ping timeout, transport error, server close). Last message.
    Closed { reason: String },
}

/// An EVENT packet from the client.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The first array element.
    pub name: String,
    /// The rest.
    pub args: Vec<Value>,
    /// `Some(id)` when the client wants an acknowledgement.
    pub ack: Option<u64>,
}

/// Returned when sending on a socket that is closed (or closing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("socket closed")]
pub struct SocketClosed;

/// Why the server side asked a session to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseRequest {
    /// `SocketHandle::disconnect`: send a Socket.IO DISCONNECT first.
    Disconnect,
    /// The outgoing queue overflowed (slow client).
    Overflow,
    /// `SocketIo::close_all`.
    Shutdown,
    /// `SocketHandle::drop_transport`: closed as if the network failed, so the client
    /// reconnects and resumes with `relogin`.
    Abandon,
}

/// Shared between a session task and the handles that can close it.
#[derive(Debug, Default)]
pub(crate) struct Control {
    closed: AtomicBool,
    request: Mutex<Option<CloseRequest>>,
    notify: Notify,
    /// Packets queued by the handles and not yet taken by the session task.
    queued: AtomicUsize,
    /// This session's place among the unauthenticated ones, until login or close.
    unauthenticated: Mutex<Option<super::server::Unauthenticated>>,
}

impl Control {
    /// Asks the session task to close; the first request wins.
    pub(crate) fn request_close(&self, request: CloseRequest) {
        self.closed.store(true, Ordering::SeqCst);
        if let Ok(mut slot) = self.request.lock() {
            slot.get_or_insert(request);
        }
        self.notify.notify_one();
    }

    /// Counts a packet a handle queues; false (and not counted) when `limit` wait already.
    fn queue_one(&self, limit: usize) -> bool {
        self.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).is_ok()
    }

    /// The session task took a queued packet.
    pub(crate) fn took_one(&self) {
        let _ = self.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    pub(crate) fn take_request(&self) -> Option<CloseRequest> {
        self.request.lock().ok().and_then(|mut slot| slot.take())
    }

    /// Resolves when a close was requested (a request made before the call is not lost).
    pub(crate) async fn requested(&self) {
        self.notify.notified().await
    }

    pub(crate) fn mark_closed(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.authenticated();
    }

    pub(crate) fn hold_unauthenticated(&self, place: super::server::Unauthenticated) {
        *self.unauthenticated.lock().unwrap_or_else(|p| p.into_inner()) = Some(place);
    }

    /// Frees the session's place among the unauthenticated ones (idempotent).
    pub(crate) fn authenticated(&self) {
        let place = self.unauthenticated.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(place);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct HandleInner {
    id: String,
    /// Encoded Socket.IO packets, carried in Engine.IO messages by the session task.
    out: OutTx,
    /// Most packets waiting in `out` before the client counts as too slow.
    limit: usize,
    control: Arc<Control>,
}

/// A cheap, cloneable handle to send on a socket or close it. Never blocks, never panics.
#[derive(Debug, Clone)]
pub struct SocketHandle {
    inner: Arc<HandleInner>,
}

impl SocketHandle {
    pub(crate) fn new(id: String, out: OutTx, limit: usize, control: Arc<Control>) -> SocketHandle {
        SocketHandle { inner: Arc::new(HandleInner { id, out, limit, control }) }
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Queues an EVENT `[event, ...args]`. A full queue (slow client) closes the socket.
    pub fn emit(&self, event: &str, args: Vec<Value>) -> Result<(), SocketClosed> {
        self.send(Packet::event(event, args))
    }

    /// Queues an ACK for the client's event `id`.
    pub fn ack(&self, id: u64, args: Vec<Value>) -> Result<(), SocketClosed> {
        self.send(Packet::ack(id, args))
    }

    /// Sends a Socket.IO DISCONNECT then closes the transport.
    pub fn disconnect(&self) {
        self.inner.control.request_close(CloseRequest::Disconnect);
    }

    pub fn is_closed(&self) -> bool {
        self.inner.control.is_closed()
    }

    /// Closes the transport without a Socket.IO DISCONNECT, as a network failure would:
    /// a client reconnects by itself and resumes its session with `relogin` (used when the
    /// room's home node was lost and another takes the room over).
    pub fn drop_transport(&self) {
        self.inner.control.request_close(CloseRequest::Abandon);
    }

    /// Tells the server this socket has authenticated (logged in): it no longer counts
    /// against the caps on connections waiting to log in.
    pub fn authenticated(&self) {
        self.inner.control.authenticated();
    }

    fn send(&self, packet: Packet) -> Result<(), SocketClosed> {
        if self.is_closed() {
            return Err(SocketClosed);
        }
        if !self.inner.control.queue_one(self.inner.limit) {
            tracing::debug!(socket = %self.inner.id, "outgoing queue full, closing slow client");
            self.inner.control.request_close(CloseRequest::Overflow);
            return Err(SocketClosed);
        }
        match self.inner.out.unbounded_send(packet.encode()) {
            Ok(()) => Ok(()),
            Err(_) => {
                // The session task has ended.
                self.inner.control.mark_closed();
                Err(SocketClosed)
            }
        }
    }
}

#[cfg(test)]
impl SocketHandle {
    /// A handle whose packets go to the receiver returned with it, for unit tests of the
    /// layers above; a packet beyond `limit` overflows (the receiver does not count what it
    /// takes, as the session task does).
    pub(crate) fn for_test(id: &str, limit: usize) -> (SocketHandle, OutRx) {
        let (out, rx) = futures_channel::mpsc::unbounded();
        (SocketHandle::new(id.to_string(), out, limit, Arc::new(Control::default())), rx)
    }
}
