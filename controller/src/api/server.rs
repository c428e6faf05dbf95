//! The API port's HTTP server: the router served over HTTP/1.1 by hyper
//! with the limits a port open to the LAN needs, which a plain
//! `axum::serve` does not have.
//!
//! - **Connections held at once** are capped per source address
//!   (`api_max_connections_per_address`) and in all (`api_max_connections`,
//!   never more than the open-files limit leaves beside the agents:
//!   [`connection_budget`]), so that no client, and no crowd of them, can
//!   take the file descriptors the agent port and the store need. A
//!   connection over a cap is answered at once with a 503 problem and
//!   closed, without reading it (`rate_limited_total{limit}`).
//! - **A request's head** must arrive within `api_header_read_timeout` of
//!   its first byte (a client that sends it a byte at a time is closed);
//! - **a kept-alive connection** waiting for its next request is closed
//!   after `api_idle_timeout` (also a new connection that sends nothing).
//!   A request in flight, a watch stream included, is never timed out by
//!   either. Closes are counted in `api_connections_closed_total{reason}`.
//!
//! The timing of a connection is [`Phase`] (pure: what is due when), fed
//! by the socket (its first bytes after a pause start a head) and by the
//! service (a request starts; its response body is done).

use crate::listen::Acceptor;
use crate::metrics::{Metrics, ReasonLabels};
use crate::security::{ConnectionCap, ConnectionCaps, ConnectionLimitNames, Connections};
use axum::Router;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

/// File descriptors kept for what is not a connection: the store's and
/// Redis's connections, the listeners, discovery's sockets, files.
pub const RESERVED_FDS: u64 = 256;

/// The most refused connections given a moment to read their 503 before
/// they are closed (beyond it, a refused connection is closed at once).
const LINGERING_REFUSALS: usize = 64;

/// How long a refused connection is given to read its 503.
const LINGER: Duration = Duration::from_millis(500);

/// The limits of the API port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerSettings {
    /// Connections held at once in all (already within the budget).
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

/// How many API connections fit in `nofile` file descriptors beside
/// `max_agents` agent connections: at most `configured`; what is left
/// beside the agents, but never less than a quarter of what is usable (a
/// controller whose limit cannot hold `max_agents` still serves its API,
/// and its agents keep three quarters).
pub fn connection_budget(nofile: u64, max_agents: usize, configured: usize) -> usize {
    let usable = nofile.saturating_sub(RESERVED_FDS);
    let beside_agents = usable.saturating_sub(u64::try_from(max_agents).unwrap_or(u64::MAX));
    let budget = beside_agents.max(usable / 4).max(1);
    usize::try_from(budget)
        .unwrap_or(usize::MAX)
        .min(configured)
}

/// Where a connection stands, for its timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for a request since then (a new connection, or the last
    /// response was sent).
    Idle(Instant),
    /// The first bytes of a request's head arrived then.
    Head(Instant),
    /// This many requests are being answered (their response bodies are
    /// not done yet).
    Busy(usize),
}

/// Why a connection was closed by its timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// No request for `idle_timeout`.
    Idle,
    /// A head not complete `header_read_timeout` after its first byte.
    Header,
}

impl Timeout {
    /// The `reason` label of `api_connections_closed_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Timeout::Idle => "idle",
            Timeout::Header => "header_timeout",
        }
    }
}

impl Phase {
    /// When the connection is to be closed, and why, if nothing happens
    /// before; `None` while a request is answered.
    pub fn deadline(self, settings: &ServerSettings) -> Option<(Instant, Timeout)> {
        match self {
            Phase::Idle(since) => Some((since + settings.idle_timeout, Timeout::Idle)),
            Phase::Head(since) => Some((since + settings.header_read_timeout, Timeout::Header)),
            Phase::Busy(_) => None,
        }
    }

    /// Bytes arrived at `now`: after a pause, they start a head.
    pub fn read(self, now: Instant) -> Phase {
        match self {
            Phase::Idle(_) => Phase::Head(now),
            other => other,
        }
    }

    /// A request's head is complete: it is being answered.
    pub fn request_started(self) -> Phase {
        match self {
            Phase::Busy(n) => Phase::Busy(n + 1),
            Phase::Idle(_) | Phase::Head(_) => Phase::Busy(1),
        }
    }

    /// A response was sent (or dropped) at `now`.
    pub fn request_done(self, now: Instant) -> Phase {
        match self {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(now),
        }
    }
}

/// A connection's phase, shared by its socket, its service and its
/// watchdog.
#[derive(Debug)]
struct Activity {
    phase: Mutex<Phase>,
    changed: Notify,
}

impl Activity {
    fn new(now: Instant) -> Self {
        Activity {
            phase: Mutex::new(Phase::Idle(now)),
            changed: Notify::new(),
        }
    }

    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, step: impl FnOnce(Phase) -> Phase) {
        let mut phase = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        let next = step(*phase);
        if next != *phase {
            *phase = next;
            drop(phase);
            self.changed.notify_one();
        }
    }
}

/// Resolves with the reason once the connection's phase has stayed past
/// its deadline.
async fn watchdog(activity: &Activity, settings: &ServerSettings) -> Timeout {
    loop {
        let changed = activity.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        match activity.phase().deadline(settings) {
            None => changed.await,
            Some((at, why)) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {
                        if activity.phase().deadline(settings).is_some_and(|(at, _)| at <= Instant::now()) {
                            return why;
                        }
                    }
                    () = &mut changed => {}
                }
            }
        }
    }
}

/// The socket of a connection, telling its activity when bytes arrive.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.update(|p| p.read(Instant::now()));
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A request being answered: done when dropped (with its response body,
/// once sent, or with the request's future, if the client went away).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> Self {
        activity.update(Phase::request_started);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.update(|p| p.request_done(Instant::now()));
    }
}

/// A response body that keeps its request in flight until it is sent.
struct Tracked {
    inner: axum::body::Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `router` on `listener` until `shutdown`: then accepts no more,
/// lets requests in flight finish (streams end with `shutdown`) and
/// returns when every connection is closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: ServerSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let caps = Connections::new(
        ConnectionCaps {
            per_address: settings.max_connections_per_address,
            total: Some(settings.max_connections),
        },
        metrics.clone(),
        ConnectionLimitNames {
            per_address: "api_connections_per_address",
            total: "api_connections",
        },
    );
    let refusals = Refusals::new();
    let connections = TaskTracker::new();
    let mut acceptor = Acceptor::new(listener, "API");
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = acceptor.accept() => accepted,
        };
        let slot = match caps.open(peer.ip()) {
            Ok(slot) => slot,
            Err(cap) => {
                tracing::debug!(%peer, ?cap, "API connection over a cap; refused");
                refusals.refuse(stream, cap, &connections);
                continue;
            }
        };
        let (router, metrics, shutdown) = (router.clone(), metrics.clone(), shutdown.clone());
        connections.spawn(async move {
            let _slot = slot;
            metrics.api_connections.inc();
            connection(stream, peer, router, settings, &metrics, shutdown).await;
            metrics.api_connections.dec();
        });
    }
    connections.close();
    connections.wait().await;
}

/// Serves one connection until it ends, its timeouts close it, or
/// shutdown.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    settings: ServerSettings,
    metrics: &Metrics,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new(Instant::now()));
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let in_flight = InFlight::start(activity.clone());
            let router = router.clone();
            async move {
                let response = router.oneshot(req).await?;
                Ok::<_, std::convert::Infallible>(response.map(|inner| {
                    axum::body::Body::new(Tracked {
                        inner,
                        _in_flight: in_flight,
                    })
                }))
            }
        })
    };
    let io = TokioIo::new(Watched {
        stream,
        activity: activity.clone(),
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // Never sooner than ours (hyper's own default is 30 s).
        .header_read_timeout(settings.idle_timeout + settings.header_read_timeout)
        .serve_connection(io, service);
    tokio::pin!(served);
    let ended = tokio::select! {
        ended = served.as_mut() => ended,
        why = watchdog(&activity, &settings) => {
            metrics
                .api_connections_closed
                .get_or_create(&ReasonLabels { reason: why.as_str() })
                .inc();
            tracing::debug!(%peer, reason = why.as_str(), "API connection closed");
            return;
        }
        () = shutdown.cancelled() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "API connection ended with an error");
    }
}

/// Answers connections over a cap: a 503 problem written at once, then
/// closed (after a moment to read it, for a few at a time).
struct Refusals {
    per_address: Bytes,
    total: Bytes,
    lingering: Arc<Semaphore>,
}

impl Refusals {
    fn new() -> Self {
        let answer = |detail: &str| {
            let body = serde_json::json!({
                "type": "urn:kiwi:problem:unavailable",
                "title": "Service unavailable",
                "status": 503,
                "detail": detail,
                "reason": "too_many_connections",
            })
            .to_string();
            Bytes::from(format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {}\r\nretry-after: 5\r\n\
                 connection: close\r\ncontent-length: {}\r\n\r\n{body}",
                super::problem::CONTENT_TYPE,
                body.len()
            ))
        };
        Refusals {
            per_address: answer(
                "this address holds too many connections to the API; close some and try again",
            ),
            total: answer("the API holds as many connections as it may; try again shortly"),
            lingering: Arc::new(Semaphore::new(LINGERING_REFUSALS)),
        }
    }

    fn refuse(&self, stream: TcpStream, cap: ConnectionCap, tasks: &TaskTracker) {
        let answer = match cap {
            ConnectionCap::PerAddress => &self.per_address,
            ConnectionCap::Total => &self.total,
        };
        // A new socket's send buffer takes the whole answer at once.
        let _ = stream.try_write(answer);
        let Ok(permit) = self.lingering.clone().try_acquire_owned() else {
            return;
        };
        // Closing with the request unread would reset the connection, and
        // the client could lose the answer: read what it sent, briefly.
        tasks.spawn(async move {
            let _permit = permit;
            let mut stream = stream;
            let _ = tokio::time::timeout(LINGER, async {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let _ = stream.shutdown().await;
                let mut sink = [0u8; 4096];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: ServerSettings = ServerSettings {
        max_connections: 10,
        max_connections_per_address: 2,
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
    };

    #[test]
    fn the_api_never_takes_what_the_agents_need() {
        // Room for both: the configured cap.
        assert_eq!(connection_budget(65_536, 20_000, 1024), 1024);
        // A limit that holds the agents and more: what is left beside them.
        assert_eq!(connection_budget(30_000, 20_000, 20_000), 9_744);
        // A limit too small for max_agents: a quarter of what is usable.
        assert_eq!(connection_budget(2_048, 20_000, 1024), 448);
        assert_eq!(connection_budget(1_024, 20_000, 1024), 192);
        assert_eq!(connection_budget(100, 20_000, 1024), 1);
        assert_eq!(connection_budget(u64::MAX, usize::MAX, 7), 7);
    }

    #[test]
    fn an_idle_connection_and_a_slow_head_are_timed_out_a_request_never() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let idle = Phase::Idle(t0);
        assert_eq!(idle.deadline(&SETTINGS), Some((t0 + s(60), Timeout::Idle)));
        // The first byte of a head starts the header timeout; more bytes
        // do not extend it.
        let head = idle.read(t0 + s(5));
        assert_eq!(head, Phase::Head(t0 + s(5)));
        assert_eq!(head.read(t0 + s(9)), head);
        assert_eq!(
            head.deadline(&SETTINGS),
            Some((t0 + s(15), Timeout::Header))
        );
        // Being answered: no deadline, however long (a watch stream), and
        // bytes read meanwhile (a body, a pipelined request) change nothing.
        let busy = head.request_started();
        assert_eq!(busy, Phase::Busy(1));
        assert_eq!(busy.deadline(&SETTINGS), None);
        assert_eq!(busy.read(t0 + s(500)), busy);
        let two = busy.request_started();
        assert_eq!(two.request_done(t0 + s(600)), Phase::Busy(1));
        // Answered: idle again from then.
        let after = busy.request_done(t0 + s(700));
        assert_eq!(after, Phase::Idle(t0 + s(700)));
        assert_eq!(
            after.deadline(&SETTINGS),
            Some((t0 + s(760), Timeout::Idle))
        );
    }
}
