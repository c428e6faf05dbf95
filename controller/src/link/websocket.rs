//! The WebSocket transport of the agent endpoint: `GET /agent` upgraded to a
//! WebSocket, one protocol frame per binary message, served by hyper
//! directly so that peers that do not even speak HTTP are noticed and
//! counted like any other bad input.

use super::transport::{AgentTransport, Incoming, TransportError};
use super::{Connection, LinkState};
use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use axum::routing::get;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// WebSocket buffers: explicit and small, so that thousands of idle agents
/// cost little memory (tungstenite's defaults are 128 KiB each).
const WS_BUFFER: usize = 4 * 1024;

/// How long a new TCP connection may take to send its HTTP upgrade request.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

pub fn router(state: Arc<LinkState>) -> Router {
    Router::new()
        .route("/agent", get(upgrade))
        .with_state(state)
}

/// Accepts agent connections until `state.shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<LinkState>) {
    let app = router(state.clone());
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = state.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors or similar: back off briefly
                    // instead of spinning.
                    tracing::warn!(error = %e, "accepting an agent connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let metrics = state.metrics.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    app.clone().oneshot(req)
                },
            );
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .max_buf_size(16 * 1024)
                .header_read_timeout(UPGRADE_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
            if let Err(e) = served {
                if e.is_parse() || e.is_parse_too_large() || e.is_timeout() {
                    let reason = if e.is_timeout() {
                        "handshake_timeout"
                    } else {
                        "not_http"
                    };
                    metrics.frame_rejected(reason);
                    tracing::warn!(%peer, reason, error = %e, "agent port: refused a connection that is not a WebSocket handshake");
                } else {
                    tracing::debug!(%peer, error = %e, "agent connection ended with an error");
                }
            }
        });
    }
    connections.close();
}

async fn upgrade(
    ws: WebSocketUpgrade,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(state): State<Arc<LinkState>>,
) -> Response {
    let max = state.config.max_frame;
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(WS_BUFFER)
        .max_write_buffer_size(max + WS_BUFFER)
        .on_upgrade(move |socket| Connection::new(state, WsTransport { socket, peer }).run())
}

/// One agent's WebSocket.
pub struct WsTransport {
    socket: WebSocket,
    peer: SocketAddr,
}

impl std::fmt::Debug for WsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsTransport")
            .field("peer", &self.peer)
            .finish()
    }
}

fn failed(e: axum::Error) -> TransportError {
    // The WebSocket layer enforces the frame cap itself (an oversized
    // message is never buffered whole); its refusals are bad input.
    use tokio_tungstenite::tungstenite::Error as WsError;
    let refused = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<WsError>())
        .and_then(|ws| match ws {
            WsError::Capacity(_) => Some("too_large"),
            WsError::Protocol(_) | WsError::Utf8(_) => Some("websocket_protocol"),
            _ => None,
        });
    match refused {
        Some(reason) => TransportError::Refused {
            reason,
            detail: e.to_string(),
        },
        None => TransportError::Failed(e.to_string()),
    }
}

impl AgentTransport for WsTransport {
    async fn recv(&mut self) -> Result<Incoming, TransportError> {
        match self.socket.recv().await {
            None | Some(Ok(Message::Close(_))) => Ok(Incoming::Closed),
            Some(Err(e)) => Err(failed(e)),
            Some(Ok(Message::Binary(b))) => Ok(Incoming::Frame(b.into())),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(Incoming::Alive),
            Some(Ok(Message::Text(_))) => Err(TransportError::Refused {
                reason: "not_binary",
                detail: "text message (frames travel in binary messages)".into(),
            }),
        }
    }

    async fn send(&mut self, frame: Vec<u8>) -> Result<(), TransportError> {
        self.socket
            .send(Message::Binary(frame.into()))
            .await
            .map_err(failed)
    }

    async fn keepalive(&mut self) -> Result<(), TransportError> {
        self.socket
            .send(Message::Ping(Default::default()))
            .await
            .map_err(failed)
    }

    async fn close(&mut self) {
        let _ = self.socket.send(Message::Close(None)).await;
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }
}
