//! ICE over TCP for a worker (RFC 6544, the passive side): clients whose network blocks
//! UDP connect to the worker's TCP port (the same number as its UDP port) and carry the
//! same STUN, DTLS and SRTP packets, each preceded by a 16-bit length (RFC 4571).
//!
//! Each accepted connection gets a task on the worker's runtime that splits the stream
//! into frames for the worker loop and writes the worker's packets back, framed. The
//! worker owns the routing: a connection reaches a peer connection only after a binding
//! request signed with that peer's ICE password arrives on it (as for UDP addresses), and
//! one that has not done so within [`UNBOUND_TIMEOUT`] is closed. This is the fallback
//! path: it costs a task hop and a copy per packet that the UDP path does not.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tracing::debug;

/// Largest frame accepted from a client (RFC 4571 allows 65535; WebRTC packets stay
/// under an MTU, so anything this large is not one of ours).
pub(crate) const MAX_FRAME: usize = 8192;
/// Connection tasks alive on one worker at once (closed ones whose last frames are still
/// being written count too); further connections are closed on accept.
pub(crate) const MAX_CONNECTIONS: usize = 4096;
/// A write to a client that takes longer than this (it stopped reading) ends its connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection must send a signed binding request within this time, or it is closed.
pub(crate) const UNBOUND_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued towards one client before new ones are dropped (a stalled reader must
/// not grow memory; media is loss-tolerant and DTLS retransmits).
const SEND_QUEUE: usize = 1024;
/// Frames queued from all connections to the worker loop.
pub(crate) const EVENT_QUEUE: usize = 4096;

/// What a connection task tells its worker.
#[derive(Debug)]
pub(crate) enum TcpEvent {
    /// One RFC 4571 frame (a STUN, DTLS or SRTP packet).
    Frame { from: SocketAddr, serial: u64, data: BytesMut },
    /// The connection ended (closed by the client, an error, or a bad frame).
    Closed { from: SocketAddr, serial: u64 },
}

/// One accepted connection, as the worker sees it.
struct Conn {
    /// Tells this connection from an earlier one of the same address.
    serial: u64,
    tx: mpsc::Sender<Bytes>,
    /// The peer connection it carries, once a signed binding request named it.
    peer: Option<u32>,
}

/// A worker's ICE-TCP connections, by client address.
pub(crate) struct Conns {
    conns: HashMap<SocketAddr, Conn>,
    /// Connection tasks still running.
    live: Arc<AtomicUsize>,
    events: mpsc::Sender<TcpEvent>,
    next_serial: u64,
    /// Frames dropped because a client's queue was full.
    pub(crate) drops: u64,
}

impl Conns {
    /// An empty set whose connection tasks report on `events`.
    pub(crate) fn new(events: mpsc::Sender<TcpEvent>) -> Conns {
        Conns { conns: HashMap::new(), live: Arc::new(AtomicUsize::new(0)), events, next_serial: 0, drops: 0 }
    }

    /// Takes an accepted connection and starts its task; returns its serial, or `None`
    /// when the worker is at [`MAX_CONNECTIONS`] (the stream is dropped, i.e. closed).
    pub(crate) fn accept(&mut self, stream: TcpStream, from: SocketAddr) -> Option<u64> {
        if self.live.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            debug!(%from, "ICE-TCP connection refused: too many connections");
            return None;
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        self.live.fetch_add(1, Ordering::Relaxed);
        let live = Live(self.live.clone());
        let events = self.events.clone();
        tokio::spawn(async move {
            let _live = live;
            run(stream, from, serial, rx, events).await;
        });
        // A new connection from an address replaces an old one; dropping the old sender ends its task.
        self.conns.insert(from, Conn { serial, tx, peer: None });
        Some(serial)
    }

    /// The peer connection a client address is bound to.
    pub(crate) fn peer_of(&self, from: SocketAddr) -> Option<u32> {
        self.conns.get(&from).and_then(|c| c.peer)
    }

    /// Binds a connection to a peer connection; returns the peer it carried before, if another.
    pub(crate) fn bind(&mut self, from: SocketAddr, peer: u32) -> Option<u32> {
        let c = self.conns.get_mut(&from)?;
        c.peer.replace(peer).filter(|old| *old != peer)
    }

    /// Queues one packet to a client, framed; dropped when its queue is full or it is gone.
    pub(crate) fn send(&mut self, to: SocketAddr, packet: &[u8]) {
        let Some(c) = self.conns.get(&to) else { return };
        let Some(frame) = frame(packet) else { return };
        if c.tx.try_send(frame).is_err() {
            self.drops += 1;
        }
    }

    /// Closes a connection (after the frames already queued to it are written).
    pub(crate) fn close(&mut self, from: SocketAddr) {
        self.conns.remove(&from);
    }

    /// Forgets a connection its task reported closed; returns the peer it carried.
    pub(crate) fn closed(&mut self, from: SocketAddr, serial: u64) -> Option<u32> {
        if self.conns.get(&from).is_some_and(|c| c.serial == serial) {
            return self.conns.remove(&from).and_then(|c| c.peer);
        }
        None
    }

    /// Closes a connection still unbound after [`UNBOUND_TIMEOUT`].
    pub(crate) fn expire_unbound(&mut self, from: SocketAddr, serial: u64) {
        if self.conns.get(&from).is_some_and(|c| c.serial == serial && c.peer.is_none()) {
            debug!(%from, "ICE-TCP connection closed: no signed binding request");
            self.conns.remove(&from);
        }
    }

    /// Whether a frame comes from the connection the worker knows at that address (not
    /// from one it already replaced or closed).
    pub(crate) fn is_current(&self, from: SocketAddr, serial: u64) -> bool {
        self.conns.get(&from).is_some_and(|c| c.serial == serial)
    }

    /// Connection tasks still running.
    #[cfg(test)]
    fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Open connections.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.conns.len()
    }
}

/// Counts a connection task as alive until it ends.
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A packet with its RFC 4571 length prefix; `None` if it cannot be framed (over 65535 bytes).
fn frame(packet: &[u8]) -> Option<Bytes> {
    let len = u16::try_from(packet.len()).ok()?;
    let mut out = BytesMut::with_capacity(packet.len() + 2);
    out.put_u16(len);
    out.put_slice(packet);
    Some(out.freeze())
}

/// One connection: frames in to the worker, frames out to the client, until either side ends.
async fn run(stream: TcpStream, from: SocketAddr, serial: u64, rx: mpsc::Receiver<Bytes>, events: mpsc::Sender<TcpEvent>) {
    // Media is latency-bound; Nagle would hold small packets back.
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    tokio::select! {
        () = read_frames(r, from, serial, &events) => {}
        () = write_frames(w, rx) => {}
    }
    let _ = events.send(TcpEvent::Closed { from, serial }).await;
}

async fn read_frames(r: OwnedReadHalf, from: SocketAddr, serial: u64, events: &mpsc::Sender<TcpEvent>) {
    let mut r = BufReader::with_capacity(16 * 1024, r);
    loop {
        let len = match r.read_u16().await {
            Ok(len) => usize::from(len),
            Err(_) => return,
        };
        if len == 0 || len > MAX_FRAME {
            debug!(%from, len, "ICE-TCP connection closed: bad frame length");
            return;
        }
        let mut data = BytesMut::zeroed(len);
        if r.read_exact(&mut data).await.is_err() {
            return;
        }
        if events.send(TcpEvent::Frame { from, serial, data }).await.is_err() {
            return;
        }
    }
}

async fn write_frames(mut w: OwnedWriteHalf, mut rx: mpsc::Receiver<Bytes>) {
    while let Some(frame) = rx.recv().await {
        // A client that stops reading must not hold the task, its socket and its queue.
        if !matches!(tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&frame)).await, Ok(Ok(()))) {
            return;
        }
    }
    // The worker closed the connection: what it queued is written; say goodbye.
    let _ = tokio::time::timeout(WRITE_TIMEOUT, w.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (Conns, mpsc::Receiver<TcpEvent>, TcpStream, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, from) = listener.accept().await.unwrap();
        let (tx, rx) = mpsc::channel(16);
        let mut conns = Conns::new(tx);
        conns.accept(stream, from).unwrap();
        (conns, rx, client, from)
    }

    #[tokio::test]
    async fn frames_both_ways() {
        let (mut conns, mut rx, mut client, from) = pair().await;
        // Two frames in one write, the second split across writes.
        client.write_all(&[0, 3, 1, 2, 3, 0, 2, 9]).await.unwrap();
        client.write_all(&[8]).await.unwrap();
        for want in [&[1u8, 2, 3][..], &[9, 8][..]] {
            match rx.recv().await.unwrap() {
                TcpEvent::Frame { from: f, data, .. } => {
                    assert_eq!(f, from);
                    assert_eq!(&data[..], want);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        conns.send(from, &[7, 7, 7, 7]);
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [0, 4, 7, 7, 7, 7]);
        // Closing from the worker writes what was queued, then ends the stream.
        conns.send(from, &[5]);
        conns.close(from);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, [0, 1, 5]);
        // The task is gone once the client closed too.
        drop(client);
        for _ in 0..100 {
            if conns.live() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(conns.live(), 0, "the connection task ended");
    }

    #[tokio::test]
    async fn oversized_or_empty_frame_closes() {
        for header in [[0x20u8, 0x01], [0, 0]] {
            let (mut conns, mut rx, mut client, from) = pair().await;
            client.write_all(&header).await.unwrap();
            match rx.recv().await.unwrap() {
                TcpEvent::Closed { from: f, serial } => {
                    assert_eq!(f, from);
                    assert_eq!(conns.closed(f, serial), None);
                    assert_eq!(conns.len(), 0);
                }
                other => panic!("unexpected {other:?}"),
            }
            let mut rest = Vec::new();
            let _ = client.read_to_end(&mut rest).await;
            assert!(rest.is_empty());
        }
    }

    #[tokio::test]
    async fn binding_and_expiry() {
        let (mut conns, _rx, _client, from) = pair().await;
        assert_eq!(conns.peer_of(from), None);
        conns.expire_unbound(from, 99); // another connection's timer: nothing happens
        assert_eq!(conns.len(), 1);
        assert_eq!(conns.bind(from, 4), None);
        assert_eq!(conns.bind(from, 5), Some(4));
        conns.expire_unbound(from, 0); // bound: stays
        assert_eq!(conns.peer_of(from), Some(5));
        let (mut conns, _rx, _client, from) = pair().await;
        conns.expire_unbound(from, 0);
        assert_eq!(conns.len(), 0);
    }
}
