//! A client of the watch stream (`GET /api/v2/watch`, Server-Sent Events):
//! connects (optionally resuming), parses the text stream itself and hands
//! each event to the test through a channel.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures_util::StreamExt;
use reqwest::{StatusCode, header};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::api::{Api, Event};

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// No resume point: whatever the server sends a new client.
    Fresh,
    /// Header `Last-Event-ID: <position>`.
    LastEventId(i64),
    /// Query `?after=<position>`.
    After(i64),
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `id:` field, if the event had one.
    pub id: Option<String>,
    /// The `event:` field (`message` when absent, as in browsers).
    pub event: String,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

impl SseEvent {
    /// The `id:` as an event position.
    pub fn position(&self) -> anyhow::Result<i64> {
        let id = self.id.as_deref().context("SSE event without an id")?;
        id.trim()
            .parse()
            .with_context(|| format!("SSE id {id:?} is not a position"))
    }

    /// The `data:` as a stored event, checked against `id:` and `event:`.
    pub fn parsed(&self) -> anyhow::Result<Event> {
        let event: Event = serde_json::from_str(&self.data)
            .with_context(|| format!("SSE data is not an Event: {}", self.data))?;
        let position = self.position()?;
        ensure!(
            event.position == position,
            "SSE id {position} differs from the event's position {}",
            event.position
        );
        ensure!(
            event.kind == self.event,
            "SSE event type {:?} differs from the event's type {:?}",
            self.event,
            event.kind
        );
        Ok(event)
    }
}

/// A sans-I/O parser of the `text/event-stream` format: feed it bytes as
/// they arrive, take whole events. Comments (`:` lines) are skipped; lines
/// end with `\n` or `\r\n`.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    id: Option<String>,
    event: Option<String>,
    data: Vec<String>,
    /// Number of comment lines seen (keep-alives).
    pub comments: usize,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes and returns the events they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=nl).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if let Some(event) = self.line(&line) {
                out.push(event);
            }
        }
        out
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            if self.data.is_empty() && self.event.is_none() && self.id.is_none() {
                return None;
            }
            let event = SseEvent {
                id: self.id.take(),
                event: self.event.take().unwrap_or_else(|| "message".into()),
                data: std::mem::take(&mut self.data).join("\n"),
            };
            return Some(event);
        }
        if line.starts_with(':') {
            self.comments += 1;
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => self.id = Some(value.to_string()),
            "event" => self.event = Some(value.to_string()),
            "data" => self.data.push(value.to_string()),
            // `retry` and unknown fields do not concern these tests.
            _ => {}
        }
        None
    }
}

/// A connected watch client. Dropping it closes the connection.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::UnboundedReceiver<anyhow::Result<SseEvent>>,
    task: JoinHandle<()>,
}

impl Watch {
    /// Connects to `/api/v2/watch` and returns once the server answered
    /// 200 with `text/event-stream` (so it is subscribed).
    pub async fn connect(api: &Api, resume: Resume) -> anyhow::Result<Watch> {
        // The stream is long-lived: no overall timeout, only on connecting.
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("a reqwest client")?;
        let path = match resume {
            Resume::After(p) => format!("/api/v2/watch?after={p}"),
            Resume::Fresh | Resume::LastEventId(_) => "/api/v2/watch".to_string(),
        };
        let mut req = http
            .get(api.url(&path))
            .header(header::ACCEPT, "text/event-stream");
        if let Resume::LastEventId(p) = resume {
            req = req.header("Last-Event-ID", p.to_string());
        }
        if let Some(token) = api.token() {
            req = req.bearer_auth(token);
        }
        let resp = tokio::time::timeout(Duration::from_secs(15), req.send())
            .await
            .context("GET /api/v2/watch: no answer within 15 s")?
            .context("GET /api/v2/watch")?;
        ensure!(
            resp.status() == StatusCode::OK,
            "GET {path}: {}",
            resp.status()
        );
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        ensure!(
            content_type.starts_with("text/event-stream"),
            "GET {path}: content type {content_type:?}, expected text/event-stream"
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut parser = SseParser::new();
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(bytes) => {
                        for event in parser.push(&bytes) {
                            if tx.send(Ok(event)).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(anyhow::Error::new(e).context("watch stream broke")));
                        return;
                    }
                }
            }
            let _ = tx.send(Err(anyhow::anyhow!("the server ended the watch stream")));
        });
        Ok(Watch { rx, task })
    }

    /// The next event, waiting at most `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<SseEvent> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => bail!("the watch stream is closed"),
            Err(_) => bail!("no watch event within {timeout:?}"),
        }
    }

    /// The next event, parsed.
    pub async fn next_event(&mut self, timeout: Duration) -> anyhow::Result<Event> {
        self.next(timeout).await?.parsed()
    }

    /// Receives events until `done` holds for all received so far, or fails
    /// at `timeout` saying what was received.
    pub async fn collect_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[Event]) -> bool,
    ) -> anyhow::Result<Vec<Event>> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while !done(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self.next_event(left).await.with_context(|| {
                let summary: Vec<String> = got
                    .iter()
                    .map(|e: &Event| format!("{}:{}", e.position, e.kind))
                    .collect();
                format!("received so far: [{}]", summary.join(", "))
            })?;
            got.push(event);
        }
        Ok(got)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_split_anywhere() {
        let text = ": keep-alive\n\nid: 1\nevent: robot_discovered\ndata: {\"a\":1}\n\n\
                    id:2\r\nevent: robot_failed\r\ndata: x\r\ndata: y\r\n\r\n";
        let bytes = text.as_bytes();
        for split in 0..bytes.len() {
            let mut p = SseParser::new();
            let mut events = p.push(&bytes[..split]);
            events.extend(p.push(&bytes[split..]));
            assert_eq!(
                events,
                vec![
                    SseEvent {
                        id: Some("1".into()),
                        event: "robot_discovered".into(),
                        data: "{\"a\":1}".into(),
                    },
                    SseEvent {
                        id: Some("2".into()),
                        event: "robot_failed".into(),
                        data: "x\ny".into(),
                    },
                ],
                "split at {split}"
            );
            assert_eq!(p.comments, 1);
        }
    }
}
