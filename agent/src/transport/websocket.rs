//! The WebSocket transport (`wss://`: tokio-tungstenite over tokio-rustls):
//! one protocol frame per binary message. Pings and pongs are liveness
//! (tungstenite answers the controller's pings itself); a text message or
//! one over the frame cap is a protocol violation. A controller that
//! refuses the robot's certificate answers the upgrade with 401/403 and a
//! reason, which ends up in the connect error.
//!
//! This is the only module of the crate that knows WebSocket.

use super::{BoxError, Close, Connection, Connector, Incoming, TransportError};
use futures_util::{SinkExt, StreamExt};
use kiwi_protocol::frame::DEFAULT_MAX_FRAME;
use kiwi_security::enroll::EnrollRefusal;
use rustls_pki_types::ServerName;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The WebSocket settings: messages and frames capped at the frame cap, and
/// small buffers, since an agent sends little and a simulator holds many.
pub fn ws_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(2 * max_frame + 4 * 1024)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

/// Connects to a `wss://` endpoint. [`WebSocketConnector::new`] gives the
/// production values.
#[derive(Debug, Clone)]
pub struct WebSocketConnector {
    /// The host to connect to (no brackets), and its port.
    pub host: String,
    pub port: u16,
    /// The `wss://` URL of the upgrade (see `ControllerUrl::endpoint`).
    pub endpoint: String,
    /// Trust and the robot's certificate.
    pub tls: Arc<rustls::ClientConfig>,
    /// The message cap, both ways; the link's `LinkOptions::max_frame`.
    pub max_frame: usize,
    /// How long TCP connect, TLS and the WebSocket upgrade may take
    /// together.
    pub connect_timeout: Duration,
    /// The local address to connect from (`None`: the system's choice).
    pub source: Option<IpAddr>,
}

impl WebSocketConnector {
    pub fn new(url: &crate::config::ControllerUrl, tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            host: url.bare_host().to_string(),
            port: url.port,
            endpoint: url.endpoint(),
            tls,
            max_frame: DEFAULT_MAX_FRAME,
            connect_timeout: Duration::from_secs(10),
            source: None,
        }
    }

    async fn open(&self) -> Result<WebSocketConnection, BoxError> {
        let tcp = super::tcp_connect(&self.host, self.port, self.source).await?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.host.clone())?;
        let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await?;
        let request = self.endpoint.as_str().into_client_request()?;
        match tokio_tungstenite::client_async_with_config(
            request,
            stream,
            Some(ws_config(self.max_frame)),
        )
        .await
        {
            Ok((ws, _response)) => Ok(WebSocketConnection { ws, closing: false }),
            Err(WsError::Http(response)) => {
                let status = response.status();
                let why = response
                    .body()
                    .as_deref()
                    .and_then(|b| serde_json::from_slice::<EnrollRefusal>(b).ok())
                    .map_or_else(
                        || format!("HTTP {status}"),
                        |r| format!("{} ({})", r.detail, r.reason),
                    );
                Err(format!("the controller refused the connection: {why}").into())
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl Connector for WebSocketConnector {
    type Conn = WebSocketConnection;

    async fn connect(&self) -> Result<WebSocketConnection, TransportError> {
        match tokio::time::timeout(self.connect_timeout, self.open()).await {
            Err(_) => Err(TransportError::ConnectTimeout {
                endpoint: self.endpoint.clone(),
            }),
            Ok(Err(error)) => Err(TransportError::Connect {
                endpoint: self.endpoint.clone(),
                error,
            }),
            Ok(Ok(conn)) => Ok(conn),
        }
    }

    fn describe(&self) -> String {
        self.endpoint.clone()
    }
}

/// One WebSocket to the controller. Unsplit: the link never reads and
/// writes at the same time, and tungstenite answers pings (and the close
/// handshake) when it next reads or writes.
#[derive(Debug)]
pub struct WebSocketConnection {
    ws: WebSocketStream<TlsStream<TcpStream>>,
    /// Set once the agent sent its close: the controller's answering close
    /// is then not the end; the end is the controller dropping the TCP
    /// connection, as the server does first (RFC 6455, 7.1.1).
    closing: bool,
}

impl Connection for WebSocketConnection {
    async fn send(&mut self, frame: Vec<u8>) -> Result<(), TransportError> {
        self.ws
            .send(Message::Binary(frame.into()))
            .await
            .map_err(|e| TransportError::Write(e.into()))
    }

    // Cancel-safe: the only await is `StreamExt::next`, which is, and
    // nothing read is held across it.
    async fn recv(&mut self) -> Result<Incoming, TransportError> {
        loop {
            let message = match self.ws.next().await {
                None => return Ok(Incoming::Closed(None)),
                Some(Err(e)) => return Err(read_error(e)),
                Some(Ok(m)) => m,
            };
            return match message {
                Message::Binary(bytes) => Ok(Incoming::Frame(bytes.into())),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(Incoming::Alive),
                Message::Text(_) => Err(TransportError::Violation("a text message".into())),
                Message::Close(_) if self.closing => continue,
                Message::Close(frame) => Ok(Incoming::Closed(Some(frame.map_or_else(
                    || "no reason".to_string(),
                    |f| format!("{}: {}", f.code, f.reason),
                )))),
            };
        }
    }

    async fn keepalive(&mut self) -> Result<(), TransportError> {
        self.ws
            .send(Message::Ping(Vec::new().into()))
            .await
            .map_err(|e| TransportError::Write(e.into()))
    }

    async fn close(&mut self, why: Close<'_>) {
        self.closing = true;
        let frame = match why {
            Close::Normal => None,
            Close::Violation(reason) => {
                // A close reason must fit a control frame (125 bytes with
                // the code).
                let mut reason = reason.to_string();
                while reason.len() > 120 {
                    reason.pop();
                }
                Some(CloseFrame {
                    code: CloseCode::Protocol,
                    reason: reason.into(),
                })
            }
        };
        let _ = self.ws.close(frame).await;
    }
}

/// Sorts a read error: the controller's fault, or a connection gone.
fn read_error(e: WsError) -> TransportError {
    match e {
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            TransportError::Read(e.into())
        }
        WsError::Capacity(_) | WsError::Protocol(_) | WsError::Utf8(_) | WsError::AttackAttempt => {
            TransportError::Violation(e.to_string())
        }
        e => TransportError::Read(e.into()),
    }
}
