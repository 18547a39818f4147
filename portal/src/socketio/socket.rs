//! The application-facing side of a connected Socket.IO socket.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::{Notify, mpsc};

use super::packet::Packet;

/// A socket that completed the Socket.IO CONNECT to `/`.
#[derive(Debug)]
pub struct Socket {
    pub id: String,
    pub handle: SocketHandle,
    /// Everything the client sends; ends with [`Incoming::Closed`].
    ///
    /// Dropping this receiver while the socket is open closes the socket.
    pub events: mpsc::Receiver<Incoming>,
}

/// What a client sent, or that its transport closed.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// An EVENT packet (boxed: a socket's channel holds its messages in blocks of 32).
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
    out: mpsc::Sender<String>,
    control: Arc<Control>,
}

/// A cheap, cloneable handle to send on a socket or close it. Never blocks, never panics.
#[derive(Debug, Clone)]
pub struct SocketHandle {
    inner: Arc<HandleInner>,
}

impl SocketHandle {
    pub(crate) fn new(id: String, out: mpsc::Sender<String>, control: Arc<Control>) -> SocketHandle {
        SocketHandle { inner: Arc::new(HandleInner { id, out, control }) }
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
        match self.inner.out.try_send(packet.encode()) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!(socket = %self.inner.id, "outgoing queue full, closing slow client");
                self.inner.control.request_close(CloseRequest::Overflow);
                Err(SocketClosed)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.inner.control.mark_closed();
                Err(SocketClosed)
            }
        }
    }
}

#[cfg(test)]
impl SocketHandle {
    /// A handle whose packets go to `out`, for unit tests of the layers above.
    pub(crate) fn for_test(id: &str, out: mpsc::Sender<String>) -> SocketHandle {
        SocketHandle::new(id.to_string(), out, Arc::new(Control::default()))
    }
}
