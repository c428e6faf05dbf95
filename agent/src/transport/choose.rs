//! The `transport` setting: QUIC, WebSocket, or `auto` — QUIC first, and
//! WebSocket within a second when QUIC does not answer (UDP blocked by a
//! firewall or access point). After such a fallback, WebSocket is used
//! straight away for a while before QUIC is tried again, so that every
//! reconnect does not pay the QUIC attempt.

use super::quic::{QuicConnection, QuicConnector};
use super::websocket::{WebSocketConnection, WebSocketConnector};
use super::{Close, Connection, Connector, Incoming, TransportError};
use crate::config::Transport;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long `auto` waits for QUIC before trying WebSocket.
pub const QUIC_ATTEMPT: Duration = Duration::from_millis(600);

/// How long `auto` sticks to WebSocket after QUIC did not answer.
pub const FALLBACK_HOLD: Duration = Duration::from_secs(300);

/// A connection over whichever transport was chosen.
#[derive(Debug)]
pub enum AnyConnection {
    /// Boxed: a WebSocket connection is much larger than a QUIC one.
    WebSocket(Box<WebSocketConnection>),
    Quic(QuicConnection),
}

impl AnyConnection {
    /// `websocket` or `quic`.
    pub fn transport(&self) -> &'static str {
        match self {
            AnyConnection::WebSocket(_) => "websocket",
            AnyConnection::Quic(_) => "quic",
        }
    }
}

impl Connection for AnyConnection {
    async fn send(&mut self, frame: Vec<u8>) -> Result<(), TransportError> {
        match self {
            AnyConnection::WebSocket(c) => c.send(frame).await,
            AnyConnection::Quic(c) => c.send(frame).await,
        }
    }

    async fn recv(&mut self) -> Result<Incoming, TransportError> {
        match self {
            AnyConnection::WebSocket(c) => c.recv().await,
            AnyConnection::Quic(c) => c.recv().await,
        }
    }

    async fn keepalive(&mut self) -> Result<(), TransportError> {
        match self {
            AnyConnection::WebSocket(c) => c.keepalive().await,
            AnyConnection::Quic(c) => c.keepalive().await,
        }
    }

    async fn close(&mut self, why: Close<'_>) {
        match self {
            AnyConnection::WebSocket(c) => c.close(why).await,
            AnyConnection::Quic(c) => c.close(why).await,
        }
    }
}

/// Connects over the configured transport.
#[derive(Debug)]
pub struct ChosenConnector {
    pub transport: Transport,
    pub websocket: WebSocketConnector,
    pub quic: QuicConnector,
    /// Until when `auto` goes straight to WebSocket.
    fallback_until: Mutex<Option<Instant>>,
}

impl ChosenConnector {
    pub fn new(transport: Transport, websocket: WebSocketConnector, quic: QuicConnector) -> Self {
        ChosenConnector {
            transport,
            websocket,
            quic,
            fallback_until: Mutex::new(None),
        }
    }

    fn holding_fallback(&self) -> bool {
        let mut until = self
            .fallback_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match *until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *until = None;
                false
            }
            None => false,
        }
    }

    async fn websocket(&self) -> Result<AnyConnection, TransportError> {
        self.websocket
            .connect()
            .await
            .map(|c| AnyConnection::WebSocket(Box::new(c)))
    }
}

impl Connector for ChosenConnector {
    type Conn = AnyConnection;

    async fn connect(&self) -> Result<AnyConnection, TransportError> {
        match self.transport {
            Transport::WebSocket => self.websocket().await,
            Transport::Quic => self.quic.connect().await.map(AnyConnection::Quic),
            Transport::Auto if self.holding_fallback() => self.websocket().await,
            Transport::Auto => {
                match tokio::time::timeout(QUIC_ATTEMPT, self.quic.connect()).await {
                    Ok(Ok(conn)) => return Ok(AnyConnection::Quic(conn)),
                    Ok(Err(e)) => tracing::info!(
                        error = %e,
                        "QUIC failed; trying WebSocket"
                    ),
                    Err(_) => tracing::info!(
                        after = ?QUIC_ATTEMPT,
                        hold = ?FALLBACK_HOLD,
                        "QUIC does not answer (UDP blocked?); using WebSocket"
                    ),
                }
                let conn = self.websocket().await?;
                *self
                    .fallback_until
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + FALLBACK_HOLD);
                Ok(conn)
            }
        }
    }

    fn describe(&self) -> String {
        match self.transport {
            Transport::WebSocket => self.websocket.describe(),
            Transport::Quic => self.quic.describe(),
            Transport::Auto => format!(
                "{} (or {})",
                self.quic.describe(),
                self.websocket.describe()
            ),
        }
    }
}
