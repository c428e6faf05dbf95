//! The seam between the agent protocol and what carries it. A transport
//! delivers whole protocol frames from one agent and takes frames back; the
//! connection logic in [`super`] never sees WebSocket (or, later, QUIC)
//! types. [`super::websocket`] is this build's transport.

use std::future::Future;
use std::net::SocketAddr;

/// What a transport read from the agent.
#[derive(Debug)]
pub enum Incoming {
    /// One whole protocol frame (not yet decoded or checked). `Bytes`, so
    /// that a transport hands over what it read without copying it.
    Frame(bytes::Bytes),
    /// Transport-level liveness (a WebSocket ping or pong): the agent is
    /// there, but sent no frame.
    Alive,
    /// The agent closed the connection.
    Closed,
}

/// Why a transport could not go on.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer broke the transport's rules (an oversized or text message):
    /// bad input, counted in `agent_frames_rejected_total{reason}`.
    #[error("{detail}")]
    Refused {
        reason: &'static str,
        detail: String,
    },
    /// The connection failed (reset, broken pipe): nobody's fault.
    #[error("{0}")]
    Failed(String),
}

/// One agent connection that carries protocol frames.
pub trait AgentTransport: Send {
    /// The next thing the agent sent. Cancel-safe: used inside `select!`.
    fn recv(&mut self) -> impl Future<Output = Result<Incoming, TransportError>> + Send;

    /// Sends one whole frame.
    fn send(&mut self, frame: Vec<u8>) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Lets the agent see a live controller when there is nothing to send
    /// (a WebSocket ping); called every heartbeat interval.
    fn keepalive(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Closes the connection (best effort), letting what was sent arrive
    /// first where the transport can wait for that.
    fn close(&mut self) -> impl Future<Output = ()> + Send;

    /// Closes the connection of an agent that stopped answering: nothing
    /// is waited for (there is nobody to deliver to).
    fn abandon(&mut self) {}

    /// The agent's address as this side sees it.
    fn peer(&self) -> SocketAddr;

    /// The transport's name for logs and metrics (`websocket`, `quic`).
    fn name(&self) -> &'static str;
}
