//! When each RTP packet reached a full peer's socket: the kernel's receive timestamp
//! (`SO_TIMESTAMPNS`, which quinn-udp under webrtc-rs already turns on and reads), kept
//! by SSRC and sequence number until the packet comes out of the peer decrypted.
//!
//! A load generator running many peers on one core decrypts and dispatches their copies
//! of a packet one after another; a clock read when the track hands over the packet
//! would count that queue as the server's latency, and a server that sends all copies
//! at once would be charged for the generator's work. The kernel's timestamp is taken
//! when the datagram is queued to the socket, before any of the generator's work.

use std::fmt::Debug;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use webrtc::runtime::{AsyncInterval, AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, JoinHandle, RecvMeta, Runtime, TokioRuntime, Transmit};

/// Slots in the table (a power of two): more than any peer has in flight between the
/// socket and its track reader.
const SLOTS: usize = 4096;

/// Arrival times by SSRC and sequence number, each taken once.
#[derive(Debug)]
pub struct Arrivals {
    slots: Mutex<Vec<Slot>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    ssrc: u32,
    seq: u16,
    /// Microseconds since the Unix epoch; 0: empty.
    at_us: u64,
}

fn slot_of(ssrc: u32, seq: u16) -> usize {
    (ssrc.wrapping_mul(0x9E37_79B9) ^ u32::from(seq)) as usize & (SLOTS - 1)
}

impl Default for Arrivals {
    fn default() -> Self {
        Arrivals { slots: Mutex::new(vec![Slot::default(); SLOTS]) }
    }
}

impl Arrivals {
    /// Notes the arrival of a datagram if it is RTP (RFC 7983: first byte 128–191, and not
    /// RTCP's packet types 192–223 in the second, RFC 5761).
    fn note(&self, datagram: &[u8], at: Duration) {
        let (Some(&[first, second, s0, s1]), Some(ssrc)) = (datagram.first_chunk::<4>(), datagram.get(8..12)) else { return };
        if !(128..=191).contains(&first) || (192..=223).contains(&second) {
            return;
        }
        let seq = u16::from_be_bytes([s0, s1]);
        let ssrc = u32::from_be_bytes([ssrc[0], ssrc[1], ssrc[2], ssrc[3]]);
        if let Ok(mut slots) = self.slots.lock() {
            slots[slot_of(ssrc, seq)] = Slot { ssrc, seq, at_us: at.as_micros() as u64 };
        }
    }

    /// When the packet `ssrc`/`seq` reached the socket, if it was noted and not taken yet
    /// (a retransmitted copy, or one whose slot a later packet took, has none).
    pub fn take(&self, ssrc: u32, seq: u16) -> Option<u64> {
        let mut slots = self.slots.lock().ok()?;
        let slot = &mut slots[slot_of(ssrc, seq)];
        if slot.at_us == 0 || slot.ssrc != ssrc || slot.seq != seq {
            return None;
        }
        Some(std::mem::take(slot).at_us)
    }
}

/// What every call is handed on to.
static TOKIO: TokioRuntime = TokioRuntime;

/// webrtc-rs's tokio runtime, whose UDP sockets note the RTP arrivals into `arrivals`.
#[derive(Debug)]
pub(crate) struct StampingRuntime {
    arrivals: Arc<Arrivals>,
}

impl StampingRuntime {
    pub(crate) fn new(arrivals: Arc<Arrivals>) -> Self {
        StampingRuntime { arrivals }
    }
}

impl Runtime for StampingRuntime {
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        TOKIO.spawn(future)
    }
    fn spawn_reactor(&self, pool_size: usize, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        TOKIO.spawn_reactor(pool_size, future)
    }
    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Ok(Arc::new(StampingSocket { inner: TOKIO.wrap_udp_socket(socket)?, arrivals: self.arrivals.clone() }))
    }
    fn wrap_tcp_listener(&self, listener: std::net::TcpListener) -> io::Result<Arc<dyn AsyncTcpListener>> {
        TOKIO.wrap_tcp_listener(listener)
    }
    fn connect_tcp<'a>(&'a self, remote: SocketAddr) -> Pin<Box<dyn Future<Output = io::Result<Arc<dyn AsyncTcpStream>>> + Send + 'a>> {
        TOKIO.connect_tcp(remote)
    }
    fn resolve_host<'a>(&'a self, host: &'a str) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        TOKIO.resolve_host(host)
    }
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        TOKIO.sleep(duration)
    }
    fn interval(&self, period: Duration) -> Box<dyn AsyncInterval> {
        TOKIO.interval(period)
    }
    fn block_on(&self, future: Pin<Box<dyn Future<Output = ()> + '_>>) {
        TOKIO.block_on(future)
    }
    fn yield_now(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        TOKIO.yield_now()
    }
    fn name(&self) -> &'static str {
        "tokio (stamping RTP arrivals)"
    }
}

/// Has the kernel record each datagram's receive time on a plain socket (`SO_TIMESTAMPNS`),
/// for [`try_recv_stamped`] to read.
pub fn record_arrivals(socket: &tokio::net::UdpSocket) -> io::Result<()> {
    nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::ReceiveTimestampns, &true).map_err(io::Error::from)
}

/// One datagram read from a plain socket.
#[derive(Debug, Clone, Copy)]
pub struct Stamped {
    /// Its length.
    pub len: usize,
    /// Its sender (`None` if the kernel named none).
    pub from: Option<SocketAddr>,
    /// The kernel's receive time, since the Unix epoch, where the socket records it
    /// ([`record_arrivals`]).
    pub at: Option<Duration>,
}

/// Reads one queued datagram into `buf` without waiting (`None`: nothing queued), with its
/// sender and the kernel's receive time.
pub fn try_recv_stamped(socket: &tokio::net::UdpSocket, buf: &mut [u8]) -> io::Result<Option<Stamped>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
    use std::os::fd::AsRawFd;
    let got = socket.try_io(tokio::io::Interest::READABLE, || {
        let mut iov = [IoSliceMut::new(buf)];
        let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
        let msg = recvmsg::<SockaddrStorage>(socket.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)?;
        let at = msg.cmsgs().ok().and_then(|mut c| {
            c.find_map(|m| match m {
                ControlMessageOwned::ScmTimestampns(t) => {
                    Some(Duration::new(u64::try_from(t.tv_sec()).unwrap_or(0), u32::try_from(t.tv_nsec()).unwrap_or(0)))
                }
                _ => None,
            })
        });
        let from = msg.address.as_ref().and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6))))
        });
        Ok(Stamped { len: msg.bytes, from, at })
    });
    match got {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// [`try_recv_stamped`], waiting for a datagram.
pub async fn recv_stamped(socket: &tokio::net::UdpSocket, buf: &mut [u8]) -> io::Result<Stamped> {
    loop {
        socket.readable().await?;
        if let Some(got) = try_recv_stamped(socket, buf)? {
            return Ok(got);
        }
    }
}

/// A socket of webrtc-rs's tokio runtime that notes each RTP datagram's kernel timestamp.
#[derive(Debug)]
struct StampingSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    arrivals: Arc<Arrivals>,
}

impl AsyncUdpSocket for StampingSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
    fn poll_send(&self, cx: &mut Context<'_>, transmit: &Transmit<'_>) -> Poll<io::Result<usize>> {
        self.inner.poll_send(cx, transmit)
    }
    fn poll_recv(&self, cx: &mut Context<'_>, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> Poll<io::Result<usize>> {
        let polled = self.inner.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(n)) = polled {
            for (buf, m) in bufs.iter().zip(meta.iter()).take(n) {
                let Some(at) = m.timestamp else { continue };
                // GRO may have coalesced several datagrams of one flow, `stride` bytes each.
                for datagram in buf.get(..m.len).unwrap_or_default().chunks(m.stride.max(1)) {
                    self.arrivals.note(datagram, at);
                }
            }
        }
        polled
    }
    fn max_gso_segments(&self) -> usize {
        self.inner.max_gso_segments()
    }
    fn max_gro_segments(&self) -> usize {
        self.inner.max_gro_segments()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtp(second: u8, seq: u16, ssrc: u32) -> Vec<u8> {
        let mut p = vec![0x80, second];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(b"payload");
        p
    }

    #[tokio::test]
    async fn a_plain_socket_gives_the_kernel_receive_time_and_sender() {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sender = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(try_recv_stamped(&socket, &mut buf).unwrap().is_none(), "nothing queued yet");
        record_arrivals(&socket).unwrap();
        // The kernel turns receive stamping on for the machine a moment later (deferred
        // work); until then it stamps a datagram when it is read.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        sender.send_to(b"datagram", socket.local_addr().unwrap()).await.unwrap();
        // Read well after it was queued: the stamp is the queueing time, not the read's.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let got = recv_stamped(&socket, &mut buf).await.unwrap();
        let read = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        assert_eq!((got.len, &buf[..got.len]), (8, &b"datagram"[..]));
        assert_eq!(got.from, Some(sender.local_addr().unwrap()));
        let at = got.at.expect("SO_TIMESTAMPNS gives a stamp");
        assert!(
            at >= before - Duration::from_millis(5) && at + Duration::from_millis(40) <= read,
            "stamped {at:?}, sent after {before:?}, read at {read:?}"
        );
    }

    #[test]
    fn rtp_arrivals_are_taken_once_by_ssrc_and_sequence() {
        let a = Arrivals::default();
        a.note(&rtp(96, 7, 0xabcd), Duration::from_micros(1_000_000));
        a.note(&rtp(96 | 0x80, 8, 0xabcd), Duration::from_micros(1_000_500));
        assert_eq!(a.take(0xabcd, 7), Some(1_000_000));
        assert_eq!(a.take(0xabcd, 7), None, "taken once: a retransmitted copy gets no stamp");
        assert_eq!(a.take(0xabcd, 8), Some(1_000_500), "the marker bit set");
        assert_eq!(a.take(0x1234, 8), None);
    }

    #[test]
    fn rtcp_stun_dtls_and_short_datagrams_are_not_noted() {
        let a = Arrivals::default();
        // RTCP receiver report (PT 201), then a STUN binding request and a DTLS record.
        a.note(&rtp(201, 7, 0xabcd), Duration::from_secs(1));
        assert_eq!(a.take(0xabcd, 7), None);
        let mut stun = rtp(96, 7, 0xabcd);
        stun[0] = 0x00;
        a.note(&stun, Duration::from_secs(1));
        let mut dtls = rtp(96, 7, 0xabcd);
        dtls[0] = 22;
        a.note(&dtls, Duration::from_secs(1));
        a.note(&[0x80, 96, 0, 7], Duration::from_secs(1));
        assert_eq!(a.take(0xabcd, 7), None);
    }
}
