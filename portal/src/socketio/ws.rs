//! The websocket transport on the connection itself: actix hands the portal the raw
//! connection at the upgrade (`socketio::server::SocketIo::on_upgrade`), and the session
//! task reads and writes its frames with actix-http's websocket codec.
//!
//! Why not a handler on actix-web's dispatcher (`actix-ws`): the dispatcher keeps two
//! 8 KiB buffers for the connection's whole life, and `actix-ws` adds a reader task and
//! two channels in between; a portal holds one websocket per participant, so that was
//! ~20 KB a participant for a connection that is idle nearly all the time. Here the read
//! buffer grows for a burst or a large message and shrinks back to a few hundred bytes
//! when it is drained, and a frame to send is written from a buffer of its own size,
//! dropped once written.

use std::io;
use std::time::Duration;

use actix_codec::{AsyncRead, AsyncWrite, Decoder as _, Encoder as _};
use actix_http::ws::{CloseCode, Codec, Frame, Item, Message, ProtocolError};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::timeout;

use super::engine::{Eio, Packet as EPacket};

/// How much room a read asks for when the buffer has less: an idle connection holds this.
/// Small, as a participant's requests are: a larger message (an SDP offer) has its
/// frame header read first, and the codec then reserves room for the whole frame.
const READ_ROOM: usize = 256;
/// A drained read buffer larger than this (a burst, a large message) is let go: else each
/// connection would keep what its largest message needed (the offer, ~3 KB), for life.
const KEEP_AT_MOST: usize = READ_ROOM;
/// How long a close frame may take to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection the portal reads and writes itself (plain TCP or TLS). `Send`: a polling
/// session's upgrade may arrive on another of actix's worker threads.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What arrives on a websocket.
#[derive(Debug)]
pub(crate) enum WsIn {
    Packet(EPacket),
    /// The client pinged at the websocket level: the session answers with a pong.
    Ping(Bytes),
    Error(String),
    Closed,
}

/// One websocket: the connection, its codec, and a message still arriving in fragments.
pub(crate) struct WsConn {
    io: Box<dyn Io>,
    codec: Codec,
    eio: Eio,
    read: BytesMut,
    /// A fragmented message so far: whether it is text, and its bytes.
    partial: Option<(bool, BytesMut)>,
    /// Largest message, whole or in fragments.
    max: usize,
    /// The client closed, or the connection failed: nothing more is read.
    ended: bool,
    /// A close frame went out (an answer to the client's): a second one is a protocol
    /// error to browsers ("Close received after close").
    close_sent: bool,
}

impl WsConn {
    /// A websocket on `io`, after the handshake; `read` holds what the client sent after
    /// its request, if anything.
    pub(crate) fn new(io: Box<dyn Io>, read: BytesMut, eio: Eio, max: usize) -> WsConn {
        WsConn { io, codec: Codec::new().max_size(max), eio, read, partial: None, max, ended: false, close_sent: false }
    }

    /// The next Engine.IO packet, ping or end. Cancel-safe: what was read stays buffered.
    pub(crate) async fn recv(&mut self) -> WsIn {
        if self.ended {
            return std::future::pending().await;
        }
        let got = self.next_message().await;
        if matches!(got, WsIn::Error(_) | WsIn::Closed) {
            self.ended = true;
        }
        got
    }

    async fn next_message(&mut self) -> WsIn {
        loop {
            match self.codec.decode(&mut self.read) {
                Ok(Some(frame)) => {
                    if let Some(got) = self.on_frame(frame).await {
                        self.shrink();
                        return got;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(ProtocolError::Overflow) => return WsIn::Error("payload too large".to_owned()),
                Err(e) => return WsIn::Error(format!("transport error: {e}")),
            }
            if self.read.capacity() - self.read.len() < READ_ROOM / 4 {
                self.read.reserve(READ_ROOM);
            }
            match self.io.read_buf(&mut self.read).await {
                Ok(0) => return WsIn::Closed,
                Ok(_) => {}
                Err(e) => return WsIn::Error(format!("transport error: {e}")),
            }
        }
    }

    /// What a frame completes, if anything.
    async fn on_frame(&mut self, frame: Frame) -> Option<WsIn> {
        match frame {
            Frame::Text(b) => Some(self.message(true, &b)),
            Frame::Binary(b) => Some(self.message(false, &b)),
            Frame::Continuation(Item::FirstText(b)) => self.begin(true, b),
            Frame::Continuation(Item::FirstBinary(b)) => self.begin(false, b),
            Frame::Continuation(Item::Continue(b)) => self.append(&b).err(),
            Frame::Continuation(Item::Last(b)) => {
                if let Err(e) = self.append(&b) {
                    return Some(e);
                }
                let (text, whole) = self.partial.take()?;
                Some(self.message(text, &whole))
            }
            Frame::Ping(b) => Some(WsIn::Ping(b)),
            Frame::Pong(_) => None,
            Frame::Close(reason) => {
                // Answer the close as RFC 6455 asks (with its code), then end.
                let code = reason.map_or(CloseCode::Normal, |r| r.code);
                // Boxed: a session waits in `recv` nearly all its life, and this write would
                // make that wait's future as large as a write's.
                let _ = Box::pin(self.write(Message::Close(Some(code.into())), CLOSE_TIMEOUT)).await;
                Some(WsIn::Closed)
            }
        }
    }

    fn begin(&mut self, text: bool, first: Bytes) -> Option<WsIn> {
        self.partial = Some((text, BytesMut::from(&first[..])));
        None
    }

    fn append(&mut self, more: &[u8]) -> Result<(), WsIn> {
        let Some((_, so_far)) = self.partial.as_mut() else { return Ok(()) };
        if so_far.len() + more.len() > self.max {
            return Err(WsIn::Error("payload too large".to_owned()));
        }
        so_far.extend_from_slice(more);
        Ok(())
    }

    /// A whole message as an Engine.IO packet.
    fn message(&self, text: bool, bytes: &[u8]) -> WsIn {
        let decoded = if text {
            match std::str::from_utf8(bytes) {
                Ok(s) => self.eio.decode_packet(s),
                Err(_) => return WsIn::Error("transport error: invalid UTF-8 in a text message".to_owned()),
            }
        } else {
            self.eio.decode_binary_frame(bytes)
        };
        match decoded {
            Ok(p) => WsIn::Packet(p),
            Err(e) => WsIn::Error(format!("parse error: {e}")),
        }
    }

    /// Lets a drained buffer that a burst grew go.
    fn shrink(&mut self) {
        if self.read.is_empty() && self.read.capacity() > KEEP_AT_MOST {
            self.read = BytesMut::new();
        }
    }

    /// Sends one Engine.IO packet as one text or binary message.
    pub(crate) async fn send(&mut self, p: &EPacket, limit: Duration) -> Result<(), String> {
        tracing::trace!(kind = p.kind(), "engine.io packet out (websocket)");
        let message = match p {
            EPacket::Binary(bytes) => Message::Binary(self.eio.binary_frame(bytes).into()),
            other => Message::Text(self.eio.encode_packet(other).into()),
        };
        self.write(message, limit).await
    }

    /// Answers a websocket ping.
    pub(crate) async fn pong(&mut self, data: Bytes, limit: Duration) -> Result<(), String> {
        self.write(Message::Pong(data), limit).await
    }

    /// Sends a close frame unless one went out already (best effort), and shuts the
    /// connection down.
    pub(crate) async fn close(mut self) {
        if !self.close_sent {
            let _ = self.write(Message::Close(Some(CloseCode::Normal.into())), CLOSE_TIMEOUT).await;
        }
        let _ = timeout(CLOSE_TIMEOUT, self.io.shutdown()).await;
    }

    /// Writes one message from a buffer of its own size. A write that does not finish in
    /// `limit` leaves the stream mid-frame: the caller ends the session then.
    async fn write(&mut self, message: Message, limit: Duration) -> Result<(), String> {
        self.close_sent |= matches!(message, Message::Close(_));
        let mut frame = BytesMut::new();
        self.codec.encode(message, &mut frame).map_err(|e| format!("transport error: {e}"))?;
        let io = &mut self.io;
        let written = timeout(limit, async move {
            io.write_all(&frame).await?;
            io.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(io_reason(&e)),
            Err(_) => Err("transport error: websocket write timed out".to_owned()),
        }
    }
}

fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => "transport close".to_owned(),
        _ => format!("transport error: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    /// A client end that writes masked frames, as a browser does, and reads the server's.
    struct Client {
        io: DuplexStream,
        codec: Codec,
        read: BytesMut,
    }

    impl Client {
        async fn send(&mut self, message: Message) {
            let mut frame = BytesMut::new();
            self.codec.encode(message, &mut frame).unwrap();
            self.io.write_all(&frame).await.unwrap();
        }

        async fn frame(&mut self) -> Frame {
            loop {
                if let Some(frame) = self.codec.decode(&mut self.read).unwrap() {
                    return frame;
                }
                assert_ne!(self.io.read_buf(&mut self.read).await.unwrap(), 0, "the server closed");
            }
        }
    }

    fn pair(max: usize) -> (WsConn, Client) {
        let (server, client) = tokio::io::duplex(64 * 1024);
        let conn = WsConn::new(Box::new(server), BytesMut::new(), Eio::V4, max);
        (conn, Client { io: client, codec: Codec::new().client_mode(), read: BytesMut::new() })
    }

    fn message(got: WsIn) -> String {
        match got {
            WsIn::Packet(EPacket::Message(s)) => s,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn messages_whole_and_in_fragments_pings_and_a_close_are_read_and_answered() {
        let (mut conn, mut client) = pair(1000);
        client.send(Message::Text("4hello".into())).await;
        assert_eq!(message(conn.recv().await), "hello");
        client.send(Message::Binary(Bytes::from_static(b"\xff\x00"))).await;
        assert!(matches!(conn.recv().await, WsIn::Packet(EPacket::Binary(b)) if b == b"\xff\x00"), "Engine.IO 4: the bytes as they are");

        // A message in three fragments, a ping between them (control frames may interleave).
        let big = "x".repeat(600);
        client.send(Message::Continuation(Item::FirstText(Bytes::from(format!("4{}", &big[..200]))))).await;
        client.send(Message::Continuation(Item::Continue(Bytes::copy_from_slice(&big.as_bytes()[200..400])))).await;
        client.send(Message::Ping(Bytes::from_static(b"are you there"))).await;
        client.send(Message::Continuation(Item::Last(Bytes::copy_from_slice(&big.as_bytes()[400..])))).await;
        let Some(WsIn::Ping(data)) = Some(conn.recv().await) else { panic!("no ping") };
        conn.pong(data, Duration::from_secs(1)).await.unwrap();
        assert!(matches!(client.frame().await, Frame::Pong(b) if &b[..] == b"are you there"));
        assert_eq!(message(conn.recv().await), big);
        // What a burst grew is let go once it is read.
        assert!(conn.read.capacity() <= KEEP_AT_MOST);

        conn.send(&EPacket::Message("42[\"x\"]".into()), Duration::from_secs(1)).await.unwrap();
        assert!(matches!(client.frame().await, Frame::Text(b) if &b[..] == b"442[\"x\"]"));

        client.send(Message::Close(Some(CloseCode::Away.into()))).await;
        assert!(matches!(conn.recv().await, WsIn::Closed));
        assert!(matches!(client.frame().await, Frame::Close(Some(r)) if r.code == CloseCode::Away), "the close is answered with its code");
        // The session then closes its side: no second close frame, only the end.
        conn.close().await;
        let mut rest = Vec::new();
        client.io.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty() && client.read.is_empty(), "nothing after the answered close: {rest:?}");
    }

    #[tokio::test]
    async fn too_large_messages_bad_text_and_garbage_end_the_connection_with_a_reason() {
        let (mut conn, mut client) = pair(100);
        client.send(Message::Text("4".repeat(101).into())).await;
        assert!(matches!(conn.recv().await, WsIn::Error(e) if e == "payload too large"));

        // Fragments that add up to more than the most, each under it.
        let (mut conn, mut client) = pair(100);
        client.send(Message::Continuation(Item::FirstText(Bytes::from("4".repeat(60))))).await;
        client.send(Message::Continuation(Item::Last(Bytes::from("x".repeat(60))))).await;
        assert!(matches!(conn.recv().await, WsIn::Error(e) if e == "payload too large"));

        let (mut conn, mut client) = pair(100);
        let mut frame = BytesMut::new();
        client.codec.encode(Message::Text("4ok".into()), &mut frame).unwrap();
        // The same frame with a payload that is not UTF-8 (masked like the rest).
        let mask_at = frame.len() - 3 - 4;
        let mask: [u8; 4] = frame[mask_at..mask_at + 4].try_into().unwrap();
        for (i, b) in [b'4', 0xff, 0xfe].iter().enumerate() {
            frame[mask_at + 4 + i] = b ^ mask[i % 4];
        }
        client.io.write_all(&frame).await.unwrap();
        assert!(matches!(conn.recv().await, WsIn::Error(e) if e.contains("UTF-8")));

        // Bytes that are no frame at all (unmasked, from a client).
        let (mut conn, mut client) = pair(100);
        client.io.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(matches!(conn.recv().await, WsIn::Error(e) if e.starts_with("transport error")));

        // A client that goes away.
        let (mut conn, client) = pair(100);
        drop(client);
        assert!(matches!(conn.recv().await, WsIn::Closed));
    }
}
