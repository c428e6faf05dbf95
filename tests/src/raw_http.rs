//! A bare HTTP/1.1 client for requests an ordinary client cannot send
//! faithfully: a body the server refuses before reading it all. reqwest
//! gives up with "broken pipe" when the server answers early and closes
//! while the body is still being written, losing the answer; here the body
//! is written by one task while another reads, so the answer is kept.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::api::RawResponse;

/// How the body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length: <len>`.
    ContentLength,
    /// `Transfer-Encoding: chunked`, in chunks of 64 KiB.
    Chunked,
}

/// Sends `method path` with `body` to `addr` and returns the answer, read
/// while the body is still being written. Errors writing the body (the
/// server closed early) are ignored; only the answer counts.
#[allow(clippy::too_many_arguments)]
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    token: Option<&str>,
    body: Vec<u8>,
    framing: Framing,
    timeout: Duration,
) -> anyhow::Result<RawResponse> {
    let stream = connect_from(addr, None).await?;
    let (mut reader, mut writer) = stream.into_split();
    let framing_header = match framing {
        Framing::ContentLength => format!("Content-Length: {}", body.len()),
        Framing::Chunked => "Transfer-Encoding: chunked".to_string(),
    };
    let authorization =
        token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\n\
         {authorization}{framing_header}\r\nConnection: close\r\n\r\n"
    );
    let writing = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await?;
        for chunk in body.chunks(64 * 1024) {
            match framing {
                Framing::ContentLength => writer.write_all(chunk).await?,
                Framing::Chunked => {
                    writer
                        .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                        .await?;
                    writer.write_all(chunk).await?;
                    writer.write_all(b"\r\n").await?;
                }
            }
        }
        if framing == Framing::Chunked {
            writer.write_all(b"0\r\n\r\n").await?;
        }
        writer.flush().await?;
        // Keep the write side open: closing it could end the exchange
        // before the answer is read.
        Ok::<_, std::io::Error>(writer)
    });

    let read = async {
        let mut received = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if let Some(response) = parse_response(&received)? {
                return Ok(response);
            }
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
        // The connection ended: whatever was received must be the answer.
        match parse_response(&received)? {
            Some(response) => Ok(response),
            None => bail!(
                "the connection ended without a complete answer ({} bytes: {:?})",
                received.len(),
                String::from_utf8_lossy(&received[..received.len().min(300)])
            ),
        }
    };
    let outcome = tokio::time::timeout(timeout, read)
        .await
        .with_context(|| format!("no answer to {method} {path} within {timeout:?}"))?;
    writing.abort();
    outcome
}

/// A TCP connection to `addr`, from the loopback address `source` when
/// given (a test's second "host": any of 127.0.0.0/8).
pub async fn connect_from(addr: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let stream = match source {
        None => TcpStream::connect(addr).await,
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await
        }
    };
    let stream = stream.with_context(|| format!("connect to {addr} from {source:?}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One kept-alive HTTP/1.1 connection that sends requests as written
/// (any method token, any head) and reads one answer per request.
#[derive(Debug)]
pub struct KeepAlive {
    stream: TcpStream,
    received: Vec<u8>,
}

impl KeepAlive {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<KeepAlive> {
        KeepAlive::connect_from(addr, None).await
    }

    /// [`connect`](Self::connect) from the loopback address `source`.
    pub async fn connect_from(
        addr: SocketAddr,
        source: Option<IpAddr>,
    ) -> anyhow::Result<KeepAlive> {
        let stream = connect_from(addr, source).await?;
        Ok(KeepAlive {
            stream,
            received: Vec::new(),
        })
    }

    /// Sends `head` (a request head ending in an empty line, no body) and
    /// reads its answer (a body framed by `Content-Length`).
    pub async fn exchange(&mut self, head: &str, timeout: Duration) -> anyhow::Result<RawResponse> {
        self.stream.write_all(head.as_bytes()).await?;
        let read = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                if let Some((response, used)) = parse_response_framed(&self.received)? {
                    self.received.drain(..used);
                    return Ok(response);
                }
                match self.stream.read(&mut buf).await? {
                    0 => bail!("the connection ended before the answer was complete"),
                    n => self.received.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(timeout, read)
            .await
            .with_context(|| format!("no answer within {timeout:?}"))?
    }
}

/// A complete answer at the start of `bytes` (framed by its
/// `Content-Length`), or `None` if more are needed.
pub(crate) fn parse_complete(bytes: &[u8]) -> anyhow::Result<Option<RawResponse>> {
    Ok(parse_response_framed(bytes)?.map(|(r, _)| r))
}

/// Parses one answer framed by `Content-Length` (0 without one) at the
/// start of `bytes`: the answer and how many bytes it took, or `None` if
/// more are needed.
fn parse_response_framed(bytes: &[u8]) -> anyhow::Result<Option<(RawResponse, usize)>> {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&bytes[..end]);
    let length = head
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let used = end + 4 + length;
    if bytes.len() < used {
        return Ok(None);
    }
    Ok(parse_response(&bytes[..used])?.map(|r| (r, used)))
}

/// Parses a complete answer (status line, headers, and a body framed by
/// `Content-Length`), or `None` if more bytes are needed. Without a
/// `Content-Length` the body runs to the end of what was received.
fn parse_response(bytes: &[u8]) -> anyhow::Result<Option<RawResponse>> {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&bytes[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let status = StatusCode::from_u16(code).context("status code")?;
    let mut content_type = None;
    let mut content_length = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-type") {
                content_type = Some(value.to_string());
            } else if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse::<usize>().ok();
            }
        }
    }
    if status.is_informational() {
        // `100 Continue` and the like precede the real answer.
        return parse_response(&bytes[end + 4..]);
    }
    let body = &bytes[end + 4..];
    let body = match content_length {
        Some(len) if body.len() < len => return Ok(None),
        Some(len) => &body[..len],
        None => body,
    };
    Ok(Some(RawResponse {
        status,
        content_type,
        body: String::from_utf8_lossy(body).into_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_complete_answers_only() {
        let full = b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/problem+json\r\n\
                     content-length: 2\r\n\r\n{}";
        assert!(parse_response(&full[..full.len() - 1]).unwrap().is_none());
        let r = parse_response(full).unwrap().unwrap();
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(r.content_type.as_deref(), Some("application/problem+json"));
        assert_eq!(r.body, "{}");
        let with_continue =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            parse_response(with_continue).unwrap().unwrap().status,
            StatusCode::OK
        );
    }
}
