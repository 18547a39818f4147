//! TURN over TLS (`turns:`, RFC 5766 §2.1 / RFC 6062's framing of the client leg) for the
//! embedded TURN server: clients behind firewalls that pass only TLS on TCP (port 443)
//! reach it. webrtc-rs's TURN server reads and writes datagrams through a [`Conn`]; this
//! one accepts TLS connections and turns their byte streams into messages: a STUN message
//! is its 20-byte header plus the length it gives, a ChannelData message its 4-byte header
//! plus the length padded to 4 bytes (RFC 5766 §11.5). Relays to peers stay UDP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc};
use tracing::debug;
use webrtc_util::Conn;

/// Most TLS connections at once; beyond it new ones are closed at once.
const MAX_CONNECTIONS: usize = 2048;
/// Most TLS connections at once from one address, so one host cannot take every slot,
/// while an office behind one NAT (a relay per publication and per subscription of each
/// participant) still fits.
const MAX_PER_ADDRESS: usize = 256;
/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages waiting for the TURN server, over all connections.
const INCOMING: usize = 1024;
/// Messages waiting to be written to one connection; beyond it they are dropped, as a
/// congested UDP path would.
const OUTGOING: usize = 256;
/// The TURN server reads at most this much of a message (its inbound MTU): a longer one is
/// garbage, and its connection is closed.
const MAX_MESSAGE: usize = 1500;
/// A connection that sends nothing this long (no allocation refreshes, no data) is closed;
/// clients refresh every few minutes.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// The first message must come this soon after the handshake.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

type Writers = Arc<std::sync::Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>>;

/// The TLS listener, as one datagram-like [`Conn`] for the TURN server.
pub struct TlsTurnConn {
    local: SocketAddr,
    incoming: Mutex<mpsc::Receiver<(Vec<u8>, SocketAddr)>>,
    writers: Writers,
    accept: tokio::task::JoinHandle<()>,
}

impl TlsTurnConn {
    /// Accepts TLS connections on `listener` with `tls`.
    pub fn start(listener: TcpListener, tls: Arc<rustls::ServerConfig>) -> std::io::Result<TlsTurnConn> {
        let local = listener.local_addr()?;
        let (tx, incoming) = mpsc::channel(INCOMING);
        let writers: Writers = Arc::default();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let accept = tokio::spawn(accept_loop(listener, acceptor, tx, writers.clone()));
        Ok(TlsTurnConn { local, incoming: Mutex::new(incoming), writers, accept })
    }
}

impl Drop for TlsTurnConn {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, tx: mpsc::Sender<(Vec<u8>, SocketAddr)>, writers: Writers) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_address: Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>> = Arc::default();
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, say: rest instead of spinning.
                debug!(error = %e, "TURN TLS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Counted from the accept, handshakes included, for the connection's whole life.
        let Some(per_address) = PerAddress::take(&per_address, from.ip()) else {
            debug!(from = %from, "TURN TLS connection refused: too many from this address");
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (acceptor, tx, writers) = (acceptor.clone(), tx.clone(), writers.clone());
        tokio::spawn(async move {
            let _permit = (permit, per_address);
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await else {
                debug!(from = %from, "TURN TLS handshake failed");
                return;
            };
            let (mut read, mut write) = tokio::io::split(tls);
            let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(OUTGOING);
            if let Ok(mut w) = writers.lock() {
                w.insert(from, out_tx.clone());
            }
            let writer = tokio::spawn(async move {
                while let Some(message) = out_rx.recv().await {
                    if write.write_all(&message).await.is_err() {
                        break;
                    }
                    // tokio-rustls may keep encrypted bytes buffered: out before waiting.
                    if out_rx.is_empty() && write.flush().await.is_err() {
                        break;
                    }
                }
            });
            let mut wait = FIRST_MESSAGE_TIMEOUT;
            while let Ok(Some(message)) = tokio::time::timeout(wait, read_message(&mut read)).await {
                wait = IDLE_TIMEOUT;
                if tx.send((message, from)).await.is_err() {
                    break;
                }
            }
            if let Ok(mut w) = writers.lock()
                && w.get(&from).is_some_and(|s| s.same_channel(&out_tx))
            {
                w.remove(&from);
            }
            writer.abort();
        });
    }
}

/// One connection's place in the count of its address; given back when dropped.
struct PerAddress {
    counts: Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl PerAddress {
    fn take(counts: &Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>>, ip: std::net::IpAddr) -> Option<PerAddress> {
        let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.entry(ip).or_default();
        if *n >= MAX_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(PerAddress { counts: counts.clone(), ip })
    }
}

impl Drop for PerAddress {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = c.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

/// One STUN or ChannelData message off the stream; `None` at its end or on garbage.
async fn read_message(read: &mut (impl AsyncReadExt + Unpin)) -> Option<Vec<u8>> {
    let mut head = [0u8; 4];
    read.read_exact(&mut head).await.ok()?;
    let length = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let rest = match head[0] >> 6 {
        // STUN: 20-byte header in all.
        0 => 16 + length,
        // ChannelData (channel numbers 0x4000..0x7FFF), padded to 4 bytes over TCP.
        1 => length.div_ceil(4) * 4,
        _ => return None,
    };
    if 4 + rest > MAX_MESSAGE + 3 {
        return None;
    }
    let mut message = Vec::with_capacity(4 + rest);
    message.extend_from_slice(&head);
    message.resize(4 + rest, 0);
    read.read_exact(&mut message[4..]).await.ok()?;
    if head[0] >> 6 == 1 {
        // The server parses the unpadded length.
        message.truncate(4 + length);
    }
    Some(message)
}

#[async_trait::async_trait]
impl Conn for TlsTurnConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(webrtc_util::Error::Other("a listener does not connect".into()))
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.recv_from(buf).await?.0)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let (message, from) = self.incoming.lock().await.recv().await.ok_or(webrtc_util::Error::ErrClosedListener)?;
        let n = message.len().min(buf.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), message.get(..n)) {
            dst.copy_from_slice(src);
        }
        Ok((n, from))
    }

    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        Err(webrtc_util::Error::Other("send needs a peer address".into()))
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        let Some(writer) = self.writers.lock().ok().and_then(|w| w.get(&target).cloned()) else {
            // The client's connection closed: like a datagram to a host that went away.
            return Ok(buf.len());
        };
        let mut message = buf.to_vec();
        if buf.first().is_some_and(|b| b >> 6 == 1) {
            message.resize(buf.len().div_ceil(4) * 4, 0);
        }
        let _ = writer.try_send(message);
        Ok(buf.len())
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.local)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        self.accept.abort();
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_are_cut_at_their_lengths() {
        // A STUN binding request (no attributes), then ChannelData of 5 bytes padded to 8.
        let mut stream = vec![0x00, 0x01, 0x00, 0x00];
        stream.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
        stream.extend_from_slice(&[7; 12]);
        stream.extend_from_slice(&[0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0]);
        stream.extend_from_slice(&[0xC0, 0, 0, 0]);
        let mut read = &stream[..];
        assert_eq!(read_message(&mut read).await.map(|m| m.len()), Some(20));
        assert_eq!(read_message(&mut read).await, Some(vec![0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5]));
        assert_eq!(read_message(&mut read).await, None, "not STUN nor ChannelData");
        let mut short: &[u8] = &[0x00, 0x01, 0x00, 0x08, 0, 0];
        assert_eq!(read_message(&mut short).await, None, "cut short");
        let mut long: &[u8] = &[0x00, 0x01, 0x07, 0xD0];
        assert_eq!(read_message(&mut long).await, None, "longer than the server reads");
    }
}
