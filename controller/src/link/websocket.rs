//! The WebSocket transport of the agent endpoint, over TLS: `GET /agent`
//! upgraded to a WebSocket, one protocol frame per binary message, and
//! `POST /enroll` (the one thing an agent without a certificate may do).
//! Served by hyper directly so that peers that do not even speak TLS or
//! HTTP are noticed and counted like any other bad input.
//!
//! Before TLS: an address over its connection cap is dropped. After TLS:
//! the upgrade is refused (401/403 with the reason, 429 once the address
//! spent its failure budget) unless
//! [`AgentAuth::admit`](crate::security::AgentAuth::admit) accepts the
//! client certificate; a valid one is admitted whatever the budget.

use super::transport::{AgentTransport, Incoming, TransportError};
use super::{Connection, LinkState};
use crate::api::extract::ApiBody;
use crate::api::problem::{self, Problem};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use kiwi_security::enroll::{AGENT_PATH, ENROLL_PATH, MAX_ENROLL_BODY};
use rustls_pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// WebSocket buffers: explicit and small, so that thousands of idle agents
/// cost little memory (tungstenite's defaults are 128 KiB each). Agents
/// send small frames: the read buffer grows for a larger one while it is
/// read; frames are written as they are sent (no write buffering).
pub const READ_BUFFER: usize = 1024;
/// See [`READ_BUFFER`].
pub const WRITE_BUFFER: usize = 0;

/// How long a new TCP connection may take to send its HTTP upgrade request.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the TLS handshake of a new connection may take.
const TLS_TIMEOUT: Duration = Duration::from_secs(10);

/// The client certificate chain a connection presented (empty: none).
#[derive(Debug, Clone, Default)]
pub struct PeerCertificates(pub Arc<Vec<CertificateDer<'static>>>);

/// The agent port's HTTP side: every answer it gives is problem+json
/// (`api::problem`), as the API's are.
pub fn router(state: Arc<LinkState>) -> Router {
    Router::new()
        .route(AGENT_PATH, get(upgrade))
        .route(ENROLL_PATH, post(enroll))
        .fallback(problem::no_route)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_ENROLL_BODY))
        .with_state(state)
}

/// Accepts agent connections over TLS until `state.shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<LinkState>, tls: Arc<rustls::ServerConfig>) {
    let acceptor = TlsAcceptor::from(tls);
    let app = router(state.clone());
    let connections = TaskTracker::new();
    let mut listener = crate::listen::Acceptor::new(listener, "agent");
    loop {
        let (stream, peer) = tokio::select! {
            () = state.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let Some(slot) = state.auth.limits().open_connection(peer.ip()) else {
            tracing::warn!(%peer, "agent port: address holds too many connections; refused");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let metrics = state.metrics.clone();
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(TLS_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    metrics.frame_rejected("tls_handshake");
                    tracing::warn!(%peer, error = %e, "agent port: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics.frame_rejected("handshake_timeout");
                    tracing::warn!(%peer, "agent port: TLS handshake timed out");
                    return;
                }
            };
            let certs = PeerCertificates(Arc::new(
                stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                    .unwrap_or_default(),
            ));
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    req.extensions_mut().insert(certs.clone());
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
    Extension(PeerCertificates(certs)): Extension<PeerCertificates>,
    State(state): State<Arc<LinkState>>,
) -> Response {
    let principal = match state.auth.admit(peer, "websocket", Some(&certs)) {
        Ok(p) => p,
        Err(refused) => return Problem::from(refused).into_response(),
    };
    let max = state.config.max_frame;
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(max + 4 * 1024)
        .on_upgrade(move |socket| {
            Connection::new(state, WsTransport { socket, peer }, principal).run()
        })
}

/// `POST /enroll`: see [`crate::security::enroll`]. Refusals are problems
/// whose `reason` and `detail` the agent reads (`EnrollRefusal`).
async fn enroll(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(state): State<Arc<LinkState>>,
    ApiBody(body): ApiBody,
) -> Response {
    match state.enroller.enroll(peer, &body).await {
        Ok(answer @ kiwi_security::enroll::EnrollResponse::Issued { .. }) => {
            (StatusCode::OK, Json(answer)).into_response()
        }
        Ok(answer) => (StatusCode::ACCEPTED, Json(answer)).into_response(),
        Err(e) => Problem::from(e).into_response(),
    }
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
            Some(Ok(Message::Binary(b))) => Ok(Incoming::Frame(b)),
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

    fn name(&self) -> &'static str {
        "websocket"
    }
}
