//! Response bodies handed to actix in slices of at most [`CHUNK`] bytes.
//!
//! actix's HTTP/1 dispatcher copies each body chunk into its connection's write buffer
//! and keeps that buffer's capacity for the connection's life (up to 128 KiB). A
//! long-polling answer carries what was queued since the last poll, and a login answer
//! lists every participant of the room (OWT's protocol): in a room of 1000, each polling
//! client's keep-alive connection would keep a buffer the size of that one answer, ~40 KiB
//! on average. In slices, with the server's write buffer limit at [`WRITE_BUFFER`], the
//! buffer never grows past the 8 KiB it starts with. The bytes on the wire are the same.
//! (Websockets are not served through the dispatcher: see `socketio::ws`.)

use std::pin::Pin;
use std::task::{Context, Poll};

use actix_web::HttpResponse;
use actix_web::body::{BodySize, BoxBody, MessageBody};
use bytes::Bytes;

/// The largest slice handed to actix at once.
pub const CHUNK: usize = 4096;
/// The HTTP server's `h1_write_buffer_size`: the dispatcher stops taking body chunks once
/// this much waits, so it holds at most this plus one [`CHUNK`] (its initial 8 KiB).
pub const WRITE_BUFFER: usize = 4096;

/// `response` with its body handed out in slices of at most [`CHUNK`] bytes.
pub fn sliced(response: HttpResponse) -> HttpResponse {
    response.map_body(|_, body| Sliced { inner: body, rest: Bytes::new() }.boxed())
}

/// A body whose chunks are cut to [`CHUNK`] bytes (no copy: slices of the same buffer).
struct Sliced {
    inner: BoxBody,
    /// What is left of the inner body's last chunk.
    rest: Bytes,
}

impl MessageBody for Sliced {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.inner.size()
    }

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        // (An empty chunk is never passed on: in a chunked body it would read as the end.)
        while this.rest.is_empty() {
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => this.rest = chunk,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = this.rest.len().min(CHUNK);
        Poll::Ready(Some(Ok(this.rest.split_to(n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every chunk the dispatcher sees is at most `CHUNK` long, and together they are the body.
    #[actix_web::test]
    async fn a_large_body_comes_out_in_slices_that_add_up_to_it() {
        let body: Vec<u8> = (0..CHUNK * 3 + 100).map(|i| (i % 251) as u8).collect();
        let mut response = sliced(HttpResponse::Ok().body(body.clone())).into_body();
        assert_eq!(response.size(), BodySize::Sized(body.len() as u64));
        let mut seen = Vec::new();
        let mut chunks = 0;
        while let Some(chunk) = std::future::poll_fn(|cx| Pin::new(&mut response).poll_next(cx)).await {
            let chunk = chunk.unwrap();
            assert!(chunk.len() <= CHUNK && !chunk.is_empty());
            seen.extend_from_slice(&chunk);
            chunks += 1;
        }
        assert_eq!(chunks, 4);
        assert_eq!(seen, body);
    }
}
