//! Large JSON bodies (lists of thousands of robots), sent without being
//! assembled.
//!
//! A list of 10,000 robots is about 12 MiB, nearly all of it the robots'
//! cached JSON. Copying that into one buffer per request is most of what
//! a list costs; here the cached rows go out as they are (`Bytes` shared
//! with the cache) between small pieces written into buffers of
//! [`CHUNK`] bytes. The body declares its exact length, so HTTP/1.1 sends
//! a `Content-Length`, not chunked transfer coding.

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The buffer the small pieces are written into is renewed with this much
/// room when it runs low.
pub const CHUNK: usize = 64 * 1024;

/// A JSON document being written: a sequence of frames.
#[derive(Debug, Default)]
pub struct ChunkedJson {
    done: VecDeque<Bytes>,
    len: u64,
    /// Small pieces not yet closed into a frame.
    current: BytesMut,
}

impl ChunkedJson {
    pub fn new() -> ChunkedJson {
        ChunkedJson::default()
    }

    /// Where to write the next small piece.
    pub fn buf(&mut self) -> &mut BytesMut {
        if self.current.capacity() - self.current.len() < CHUNK / 16 {
            self.current.reserve(CHUNK);
        }
        &mut self.current
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf().extend_from_slice(bytes);
    }

    /// Appends `bytes` as a frame of its own, without copying it.
    pub fn push_shared(&mut self, bytes: Bytes) {
        self.close_piece();
        self.len += bytes.len() as u64;
        self.done.push_back(bytes);
    }

    /// Makes the small pieces written so far a frame; the rest of their
    /// buffer takes the next ones.
    fn close_piece(&mut self) {
        if !self.current.is_empty() {
            let piece = self.current.split().freeze();
            self.len += piece.len() as u64;
            self.done.push_back(piece);
        }
    }

    /// A `200 application/json` response of the document.
    pub fn into_response(mut self) -> Response {
        self.close_piece();
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
            if i > 0 {
                doc.extend(b",");
                expected.push(b',');
            }
            if i % 3 == 0 {
                let shared = Bytes::from(format!("{{\"shared\":{i}}}"));
                expected.extend_from_slice(&shared);
                doc.push_shared(shared);
            } else {
                let piece = format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 50));
                doc.extend(piece.as_bytes());
                expected.extend_from_slice(piece.as_bytes());
            }
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
            assert!(data.len() <= CHUNK, "a frame of {} bytes", data.len());
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
