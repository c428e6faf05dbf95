//! The seam between the link and what carries its frames. A transport
//! connects to the controller, sends whole protocol frames, delivers whole
//! frames back and tells the link when the connection shows life or ends;
//! [`crate::link`] speaks the protocol over it and never sees a socket or a
//! WebSocket type.
//!
//! Two transports carry the frames: [`websocket`] (`wss://`, one frame per
//! binary message) and [`quic`] (QUIC, length-prefixed frames on one
//! bidirectional stream); [`choose`] picks one per the `transport` setting.
//! Encoding, decoding and every timeout except connecting stay in the link,
//! so that all transports behave alike.

pub mod choose;
pub mod quic;
pub mod websocket;

pub use quic::QuicConnector;
pub use websocket::WebSocketConnector;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use tokio::net::{TcpSocket, TcpStream};

/// Opens a TCP connection to `host:port`, from the local address `local`
/// when one is given (`kiwi-agent simulate --source-network` spreads its
/// agents over many loopback addresses, as a fleet comes from many hosts).
pub async fn tcp_connect(
    host: &str,
    port: u16,
    local: Option<IpAddr>,
) -> std::io::Result<TcpStream> {
    let Some(local) = local else {
        return TcpStream::connect((host, port)).await;
    };
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        if addr.is_ipv4() != local.is_ipv4() {
            continue;
        }
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(local, 0))?;
        match socket.connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{host} has no address of the family of the source address {local}"),
        )
    }))
}

/// Opens connections to the controller. One per link; cheap to share.
pub trait Connector: Send + Sync {
    type Conn: Connection;

    /// Opens one connection, bounded by the connector's own connect timeout
    /// ([`TransportError::ConnectTimeout`]).
    fn connect(&self) -> impl Future<Output = Result<Self::Conn, TransportError>> + Send;

    /// Where this connects to, for the log (e.g. the `ws://` URL).
    fn describe(&self) -> String;
}

/// One connection to the controller, carrying protocol frames both ways.
///
/// The link bounds every call in time itself; a slow peer makes a call wait,
/// it is never an error of its own here.
pub trait Connection: Send {
    /// Sends one whole protocol frame.
    fn send(&mut self, frame: Vec<u8>) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// The next thing the controller sent.
    ///
    /// Must be cancel-safe: the link awaits it inside `tokio::select!`
    /// beside its timers, so dropping it before it completes must lose
    /// nothing.
    fn recv(&mut self) -> impl Future<Output = Result<Incoming, TransportError>> + Send;

    /// Asks the controller for a transport-level sign of life (a WebSocket
    /// ping), which a healthy peer answers even when it has nothing to say:
    /// `recv` then yields [`Incoming::Alive`]. The link calls it when the
    /// controller has been quiet for a heartbeat interval, so that only a
    /// dead peer reaches the idle timeout.
    fn keepalive(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Tells the controller that the agent is closing, and why, then
    /// returns once that is sent (best effort: a connection that cannot
    /// even close is gone anyway). It does not wait for the controller's
    /// side: after it, `recv` yields what was still in flight and then
    /// [`Incoming::Closed`] once the controller has closed too.
    fn close(&mut self, why: Close<'_>) -> impl Future<Output = ()> + Send;
}

/// What [`Connection::recv`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// One whole protocol frame, not yet checked or decoded.
    Frame(Vec<u8>),
    /// Transport-level liveness without a frame (a WebSocket ping or pong):
    /// counts as activity for the idle timeout.
    Alive,
    /// The connection ended. `Some` says how the controller closed it, for
    /// the log (a WebSocket close code and reason); `None` when it simply
    /// ended.
    Closed(Option<String>),
}

/// Why the agent closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close<'a> {
    /// Nothing went wrong: the agent is leaving (after `Goodbye`, or while
    /// shutting down during the handshake).
    Normal,
    /// The controller broke the protocol; the text is for its log and may
    /// be shortened to fit the transport.
    Violation(&'a str),
}

/// The error of a boxed cause, whatever the transport's library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a transport could not go on. The messages are complete sentences
/// for the log, causes included.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Connecting (resolving, TCP, the WebSocket upgrade) failed.
    #[error("cannot connect to {endpoint}: {error}")]
    Connect { endpoint: String, error: BoxError },
    /// Connecting took longer than the connector's connect timeout.
    #[error("connecting to {endpoint} timed out")]
    ConnectTimeout { endpoint: String },
    /// The controller broke the transport's own protocol: a text message,
    /// a message over the frame cap, a malformed WebSocket frame. Worth
    /// telling it ([`Close::Violation`]) before leaving.
    #[error("protocol violation: {0}")]
    Violation(String),
    /// Reading failed: the connection is gone (reset, closed without a
    /// closing handshake, I/O error).
    #[error("read failed: {0}")]
    Read(BoxError),
    /// Writing failed: the connection is gone.
    #[error("write failed: {0}")]
    Write(BoxError),
}

#[cfg(test)]
mod tests {
    /// The seam holds: the link speaks the protocol and knows no transport,
    /// and neither it nor the code around it uses the WebSocket library
    /// (only [`super::websocket`] does).
    #[test]
    fn only_the_websocket_transport_knows_websocket() {
        let link = include_str!("../link.rs").to_ascii_lowercase();
        assert!(!link.contains("websocket"), "link.rs names WebSocket");
        for (file, source) in [
            ("link.rs", include_str!("../link.rs")),
            ("agent.rs", include_str!("../agent.rs")),
            ("decide.rs", include_str!("../decide.rs")),
            ("simulate.rs", include_str!("../simulate.rs")),
            ("lib.rs", include_str!("../lib.rs")),
            ("transport/mod.rs", include_str!("mod.rs")),
        ] {
            // The code before any test module: this test names the library.
            let code = source.split("#[cfg(test)]").next().unwrap_or(source);
            assert!(
                !code.contains("tungstenite"),
                "{file} uses tungstenite outside the WebSocket transport"
            );
        }
    }
}
