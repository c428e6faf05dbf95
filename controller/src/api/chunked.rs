//! Large JSON bodies (lists of thousands of robots) written in chunks.
//!
//! A list of 10,000 robots is about 12 MiB. Written into one buffer, every
//! request would allocate that much afresh, which the allocator maps from
//! the system page by page; written in chunks of [`CHUNK`] bytes, the
//! buffers come from memory the allocator reuses, and each goes to the
//! socket as it is, without being copied into one. The body declares its
//! exact length, so HTTP/1.1 sends a `Content-Length`, not chunked
//! transfer coding.

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The size a chunk is closed at (below glibc's threshold for mapping an
/// allocation of its own).
pub const CHUNK: usize = 64 * 1024;

/// A JSON document being written in chunks.
#[derive(Debug, Default)]
pub struct ChunkedJson {
    done: VecDeque<Bytes>,
    len: u64,
    current: Vec<u8>,
}

impl ChunkedJson {
    pub fn new() -> ChunkedJson {
        ChunkedJson::default()
    }

    /// The buffer to write the next piece into: the current chunk, or a
    /// new one once the current is full (a piece is never split, so a
    /// chunk may end a little past [`CHUNK`]).
    pub fn buf(&mut self) -> &mut Vec<u8> {
        if self.current.len() >= CHUNK {
            self.close_chunk();
        }
        if self.current.capacity() == 0 {
            self.current.reserve(CHUNK + CHUNK / 4);
        }
        &mut self.current
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf().extend_from_slice(bytes);
    }

    fn close_chunk(&mut self) {
        let chunk = std::mem::take(&mut self.current);
        if !chunk.is_empty() {
            self.len += chunk.len() as u64;
            self.done.push_back(Bytes::from(chunk));
        }
    }

    /// A `200 application/json` response of the document.
    pub fn into_response(mut self) -> Response {
        self.close_chunk();
        let body = Chunks {
            remaining: self.len,
            chunks: self.done,
        };
        (
            [(header::CONTENT_TYPE, "application/json")],
            Body::new(body),
        )
            .into_response()
    }
}

/// A body of ready chunks, of known length.
struct Chunks {
    chunks: VecDeque<Bytes>,
    remaining: u64,
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let next = self.chunks.pop_front();
        if let Some(chunk) = &next {
            self.remaining -= chunk.len() as u64;
        }
        Poll::Ready(next.map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use http_body_util::BodyExt as _;

    #[tokio::test]
    async fn chunks_add_up_to_the_document() {
        let mut doc = ChunkedJson::new();
        doc.extend(b"[");
        let mut expected = b"[".to_vec();
        for i in 0..20_000 {
            let piece = format!(
                "{}{{\"n\":{i},\"pad\":\"{}\"}}",
                if i > 0 { "," } else { "" },
                "x".repeat(i % 50)
            );
            doc.extend(piece.as_bytes());
            expected.extend_from_slice(piece.as_bytes());
        }
        doc.extend(b"]");
        expected.push(b']');
        let response = doc.into_response();
        let body = response.into_body();
        assert_eq!(body.size_hint().exact(), Some(expected.len() as u64));
        let mut frames = 0;
        let mut got = Vec::new();
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let data = frame.expect("a frame").into_data().expect("data");
            assert!(data.len() <= CHUNK + 128, "a chunk of {} bytes", data.len());
            got.extend_from_slice(&data);
            frames += 1;
        }
        assert!(frames > 1);
        assert_eq!(got, expected);
        serde_json::from_slice::<serde_json::Value>(&got).expect("valid JSON");
    }

    #[tokio::test]
    async fn an_empty_document_has_no_frames() {
        let response = ChunkedJson::new().into_response();
        let body = response.into_body();
        assert_eq!(body.size_hint().exact(), Some(0));
        assert!(body.collect().await.expect("body").to_bytes().is_empty());
    }
}
