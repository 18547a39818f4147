//! Batched UDP for a worker: up to [`BATCH`] datagrams per system call each way.
//!
//! Receiving uses `recvmmsg` through nix's safe wrapper. Sending uses `sendmmsg` directly
//! through libc: a worker's datagrams of one loop round go to many destinations (one per
//! subscriber), so GSO (one destination per call, what quinn-udp offers) does not apply,
//! and nix's `sendmmsg` result iterator reads address slots that sending leaves
//! uninitialised. Both go through tokio's `try_io`, so a full or empty socket clears
//! tokio's readiness as `try_send_to`/`try_recv_from` would.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use bytes::BytesMut;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
use socket2::SockAddr;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams per system call.
pub(crate) const BATCH: usize = 32;
/// Largest datagram read (above any MTU WebRTC uses; a longer one is dropped).
pub(crate) const MAX_DATAGRAM: usize = 2048;

/// Buffers and headers for `recvmmsg`, kept across calls (nothing is allocated per read).
pub(crate) struct RecvBatch {
    bufs: Box<[[u8; MAX_DATAGRAM]; BATCH]>,
    headers: MultiHeaders<SockaddrStorage>,
    /// Length and source of each datagram of the last read; `None` for one to skip.
    got: Vec<Option<(usize, SocketAddr)>>,
}

impl RecvBatch {
    /// Empty buffers for [`BATCH`] datagrams.
    pub(crate) fn new() -> RecvBatch {
        RecvBatch { bufs: Box::new([[0u8; MAX_DATAGRAM]; BATCH]), headers: MultiHeaders::preallocate(BATCH, None), got: Vec::with_capacity(BATCH) }
    }

    /// Reads what is waiting (up to [`BATCH`]); returns how many slots [`Self::get`] holds.
    /// `WouldBlock` when nothing is.
    pub(crate) fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let fd = socket.as_raw_fd();
        let (bufs, headers, got) = (&mut self.bufs, &mut self.headers, &mut self.got);
        got.clear();
        socket.try_io(Interest::READABLE, || {
            let mut slices = bufs.each_mut().map(|b| [IoSliceMut::new(b.as_mut_slice())]);
            let results = recvmmsg(fd, headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None).map_err(io::Error::from)?;
            for r in results {
                let from = r.address.as_ref().and_then(socket_addr);
                let whole = !r.flags.contains(MsgFlags::MSG_TRUNC);
                got.push(from.filter(|_| whole).map(|a| (r.bytes, a)));
            }
            Ok(got.len())
        })
    }

    /// Datagram `i` of the last read, copied out, with its source.
    pub(crate) fn get(&self, i: usize) -> Option<(BytesMut, SocketAddr)> {
        let (len, from) = (*self.got.get(i)?)?;
        let data = self.bufs.get(i)?.get(..len)?;
        Some((BytesMut::from(data), from))
    }
}

fn socket_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    s.as_sockaddr_in6().map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// Sends the datagrams from the front of `msgs` (up to [`BATCH`]) in one `sendmmsg`;
/// returns how many the kernel took. `WouldBlock` when the send buffer is full before the
/// first; an error on the first datagram is returned as that error (the caller skips it).
pub(crate) fn send_batch(socket: &UdpSocket, msgs: &[(BytesMut, SocketAddr)]) -> io::Result<usize> {
    let msgs = msgs.get(..msgs.len().min(BATCH)).unwrap_or(msgs);
    if msgs.is_empty() {
        return Ok(0);
    }
    // On the stack, sized for a whole batch: nothing is allocated per call.
    let unused = SockAddr::from(SocketAddr::from(([0, 0, 0, 0], 0)));
    let names: [SockAddr; BATCH] = std::array::from_fn(|i| msgs.get(i).map_or_else(|| unused.clone(), |(_, to)| SockAddr::from(*to)));
    let mut iovs: [libc::iovec; BATCH] = std::array::from_fn(|i| match msgs.get(i) {
        Some((data, _)) => libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: data.len() },
        None => libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 },
    });
    // One raw pointer for all entries (not a reborrow per entry, which would retire the
    // pointers taken before it).
    let iov_base = iovs.as_mut_ptr();
    let mut headers: [libc::mmsghdr; BATCH] = std::array::from_fn(|i| libc::mmsghdr {
        msg_hdr: libc::msghdr {
            msg_name: names.get(i).map_or(std::ptr::null_mut(), |n| n.as_ptr().cast_mut().cast()),
            msg_namelen: names.get(i).map_or(0, SockAddr::len),
            msg_iov: iov_base.wrapping_add(i),
            msg_iovlen: 1,
            msg_control: std::ptr::null_mut(),
            msg_controllen: 0,
            msg_flags: 0,
        },
        msg_len: 0,
    });
    let count = u32::try_from(msgs.len()).unwrap_or(0);
    let fd = socket.as_raw_fd();
    socket.try_io(Interest::WRITABLE, || {
        // SAFETY: the first `count` entries of `headers` (count = msgs.len() ≤ BATCH)
        // each point at a live address in `names` and one iovec in `iovs`, which points
        // into a datagram of `msgs`. All of them outlive the call, and the kernel only
        // reads them (and writes each entry's `msg_len`).
        let sent = unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), count, libc::MSG_DONTWAIT) };
        usize::try_from(sent).map_err(|_| io::Error::last_os_error())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_go_out_and_come_back_whole() {
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (to_b, to_c) = (b.local_addr().unwrap(), c.local_addr().unwrap());
        // 40 datagrams to two destinations: two calls (32 + 8), in order per destination.
        let msgs: Vec<(BytesMut, SocketAddr)> =
            (0..40u8).map(|i| (BytesMut::from(&vec![i; 100 + usize::from(i)][..]), if i % 2 == 0 { to_b } else { to_c })).collect();
        a.writable().await.unwrap(); // tokio learns readiness from the reactor first
        let first = send_batch(&a, &msgs).unwrap();
        assert_eq!(first, BATCH);
        assert_eq!(send_batch(&a, &msgs[first..]).unwrap(), 8);
        assert_eq!(send_batch(&a, &[]).unwrap(), 0);

        let mut batch = RecvBatch::new();
        for (socket, parity) in [(&b, 0u8), (&c, 1u8)] {
            let mut seen = Vec::new();
            while seen.len() < 20 {
                socket.readable().await.unwrap();
                let n = match batch.recv(socket) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => panic!("{e}"),
                };
                for i in 0..n {
                    let (data, from) = batch.get(i).unwrap();
                    assert_eq!(from, a.local_addr().unwrap());
                    assert_eq!(data.len(), 100 + usize::from(data[0]));
                    assert!(data.iter().all(|x| *x == data[0]));
                    seen.push(data[0]);
                }
            }
            assert_eq!(seen, (0..40u8).filter(|i| i % 2 == parity).collect::<Vec<_>>());
            assert!(matches!(batch.recv(socket), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
        }
    }

    #[tokio::test]
    async fn an_oversized_datagram_is_skipped() {
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = b.local_addr().unwrap();
        a.send_to(&[1u8; MAX_DATAGRAM + 10], to).await.unwrap();
        a.send_to(&[2u8; 10], to).await.unwrap();
        let mut batch = RecvBatch::new();
        let mut got = Vec::new();
        while got.len() < 2 {
            b.readable().await.unwrap();
            if let Ok(n) = batch.recv(&b) {
                got.extend((0..n).map(|i| batch.get(i).map(|(d, _)| d.to_vec())));
            }
        }
        assert_eq!(got, vec![None, Some(vec![2u8; 10])]);
    }
}
