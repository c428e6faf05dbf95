//! The QUIC transport of the agent endpoint: the agent port's UDP side
//! (quinn over rustls, ALPN `kiwi/1`). Each connection carries one
//! bidirectional stream, opened by the agent, of records: a big-endian
//! `u32` length and that many bytes, one protocol frame, or, with length 0,
//! a liveness marker ([`Incoming::Alive`]). A record over the frame cap is
//! refused from its length alone, before any of it is buffered.
//!
//! Before the handshake: an address over its failure budget or its
//! connection cap is refused, and an address QUIC has not validated yet is
//! sent a Retry first, so that spoofed packets cannot hold another
//! address's connection slots. After the handshake: the client certificate
//! goes through [`AgentAuth::admit`](crate::security::AgentAuth::admit); a
//! refusal closes the connection with [`CLOSE_REFUSED`] and the reason
//! (`revoked: the robot's certificate was revoked`), which the agent logs.
//!
//! QUIC only announces a stream once data flows on it, so the agent opens
//! the stream with a liveness marker (skipped here); the controller answers
//! with its own marker, which tells the agent it was admitted.
//!
//! Connection migration is on: an agent whose address changes mid-session
//! keeps its connection (the session's address stays the one it connected
//! from).

use super::transport::{AgentTransport, Incoming, TransportError};
use super::{Connection, LinkState};
use anyhow::Context as _;
use bytes::Bytes;
use kiwi_protocol::frame::close::{CLOSE_NORMAL, CLOSE_REFUSED, CLOSE_SHUTDOWN, CLOSE_VIOLATION};
use kiwi_protocol::frame::{FrameError, LIVENESS, RECORD_HEADER, Record, Records, record_header};
use kiwi_security::verify::CertRefusal;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{ConnectionError, IdleTimeout, ReadError, TransportConfig, VarInt};
use rustls_pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::TaskTracker;

/// How long the QUIC handshake may take, and then the agent's opening of
/// its stream.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long closing waits for the agent to receive what was sent last
/// (a `Reject`, or the end of the stream after its `Goodbye`).
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// At shutdown: how long connections may take to end on their own before
/// the endpoint closes the rest, and then how long the endpoint may take
/// to tell their agents.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);
const SHUTDOWN_IDLE: Duration = Duration::from_secs(1);

/// The most bytes taken from the stream at once. Bounds what is buffered
/// beyond the record being read, whatever lengths an agent declares.
const READ_CHUNK: usize = 16 * 1024;

/// Flow-control windows (per stream and per connection: there is one
/// stream): how much an agent may send before the controller's reads free
/// room. Agents send reports of a few hundred bytes; a frame at the cap
/// still passes, in several windows. This bounds what an agent can make
/// the controller buffer.
const RECEIVE_WINDOW: u32 = 16 * 1024;

/// Bytes buffered for an incoming connection before it is accepted
/// (handshake packets that arrive early; there is no 0-RTT data): per
/// connection and in total (quinn's defaults: 10 MiB and 100 MiB).
const INCOMING_BUFFER: u64 = 64 * 1024;
const INCOMING_BUFFER_TOTAL: u64 = 16 * 1024 * 1024;

/// The longest close reason sent (a close frame must fit in one packet).
const MAX_CLOSE_REASON: usize = 256;

/// What the QUIC side takes from the configuration.
#[derive(Debug, Clone)]
pub struct QuicSettings {
    /// QUIC pings a quiet connection this often: the heartbeat interval.
    pub keep_alive: Duration,
    /// A connection silent this long is gone: the liveness timeout. The
    /// effective idle timeout is the smaller of both peers' (agents ask
    /// for 10 s).
    pub idle_timeout: Duration,
    /// The record cap: the frame cap.
    pub max_frame: usize,
}

/// The QUIC settings of the controller's side. Everything is set
/// explicitly, since quinn's defaults suit bulk transfers (100 streams of
/// each kind, 1.25 MB stream windows, an unlimited connection window),
/// not thousands of idle agents.
fn transport_config(settings: &QuicSettings) -> anyhow::Result<TransportConfig> {
    let idle = IdleTimeout::try_from(settings.idle_timeout)
        .context("the liveness timeout is too long for QUIC")?;
    let mut transport = TransportConfig::default();
    transport
        .keep_alive_interval(Some(settings.keep_alive))
        .max_idle_timeout(Some(idle))
        // The agent opens one stream; the controller opens none.
        .max_concurrent_bidi_streams(VarInt::from_u32(1))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(RECEIVE_WINDOW))
        // One whole record at the cap may wait for acknowledgement; the
        // next send waits for room.
        .send_window((settings.max_frame + RECORD_HEADER) as u64)
        // Frames travel on the stream only.
        .datagram_receive_buffer_size(None)
        .datagram_send_buffer_size(0);
    Ok(transport)
}

/// The agent port's UDP side, bound to `listen`. `tls` must offer ALPN
/// `kiwi/1` (`ControllerPki::server_config(ALPN_QUIC)`).
pub fn endpoint(
    listen: SocketAddr,
    tls: rustls::ServerConfig,
    settings: &QuicSettings,
) -> anyhow::Result<quinn::Endpoint> {
    let crypto =
        QuicServerConfig::try_from(tls).context("the TLS configuration cannot serve QUIC")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server
        .transport_config(Arc::new(transport_config(settings)?))
        // Robots roam between access points and renew DHCP leases.
        .migration(true)
        .incoming_buffer_size(INCOMING_BUFFER)
        .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    quinn::Endpoint::server(server, listen)
        .with_context(|| format!("cannot listen on {listen} (agent_listen, UDP for QUIC)"))
}

/// Accepts agent connections on `endpoint` until `state.shutdown`.
pub async fn serve(endpoint: quinn::Endpoint, state: Arc<LinkState>) {
    let connections = TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            () = state.shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
        };
        let peer = incoming.remote_address();
        if !incoming.remote_address_validated() && incoming.may_retry() {
            // Stateless: the agent's QUIC stack answers with the token.
            if let Err(e) = incoming.retry() {
                e.into_incoming().refuse();
            }
            continue;
        }
        let Some(slot) = state.auth.limits().open_connection(peer.ip()) else {
            tracing::warn!(%peer, "agent port (QUIC): address holds too many connections; refused");
            incoming.refuse();
            continue;
        };
        let state = state.clone();
        connections.spawn(async move {
            let _slot = slot;
            if let Some((transport, principal)) = admit(incoming, peer, &state).await {
                Connection::new(state, transport, principal).run().await;
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(SHUTDOWN_DRAIN, connections.wait()).await;
    endpoint.close(
        VarInt::from_u32(CLOSE_SHUTDOWN),
        b"the controller is shutting down",
    );
    let _ = tokio::time::timeout(SHUTDOWN_IDLE, endpoint.wait_idle()).await;
}

/// Completes the handshake, admits the certificate and accepts the
/// agent's stream; `None` when the connection ended (logged and counted).
async fn admit(
    incoming: quinn::Incoming,
    peer: SocketAddr,
    state: &LinkState,
) -> Option<(QuicTransport, crate::security::Principal)> {
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "agent port (QUIC): connection attempt failed");
            return None;
        }
    };
    let connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            state.metrics.frame_rejected("tls_handshake");
            tracing::warn!(%peer, error = %e, "agent port (QUIC): handshake failed");
            return None;
        }
        Err(_) => {
            state.metrics.frame_rejected("handshake_timeout");
            tracing::warn!(%peer, "agent port (QUIC): handshake timed out");
            return None;
        }
    };
    let certs = connection
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|certs| *certs)
        .unwrap_or_default();
    let principal = match state.auth.admit(peer, "quic", Some(&certs)) {
        Ok(p) => p,
        Err(refused) => {
            connection.close(
                VarInt::from_u32(CLOSE_REFUSED),
                &refusal_reason(&refused.refusal),
            );
            return None;
        }
    };
    let (mut send, recv) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connection.accept_bi())
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "agent port (QUIC): closed before opening its stream");
            return None;
        }
        Err(_) => {
            state.metrics.frame_rejected("handshake_timeout");
            tracing::warn!(%peer, "agent port (QUIC): no stream opened in time");
            connection.close(
                VarInt::from_u32(CLOSE_VIOLATION),
                b"no stream opened in time",
            );
            return None;
        }
    };
    // Tells the agent it was admitted (4 bytes: buffered at once).
    if let Err(e) = send.write_all(&LIVENESS).await {
        tracing::debug!(%peer, error = %e, "agent port (QUIC): connection lost after admission");
        return None;
    }
    let transport = QuicTransport {
        connection,
        send,
        recv,
        records: Records::new(state.config.max_frame),
        opened: false,
        peer,
    };
    Some((transport, principal))
}

/// The close reason of a refused certificate: `<reason>: <sentence>`, cut
/// to fit a close frame.
fn refusal_reason(refusal: &CertRefusal) -> Vec<u8> {
    let text = format!("{}: {}", refusal.reason(), refusal);
    let mut end = text.len().min(MAX_CLOSE_REASON);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.as_bytes()[..end].to_vec()
}

/// One agent's QUIC connection and its stream.
#[derive(Debug)]
pub struct QuicTransport {
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    records: Records,
    /// Whether the agent's opening marker (or a first frame) was read.
    opened: bool,
    /// The agent's address when it connected.
    peer: SocketAddr,
}

impl QuicTransport {
    /// How a read error ends the connection.
    fn read_failed(&self, e: ReadError) -> Result<Incoming, TransportError> {
        match e {
            ReadError::ConnectionLost(ConnectionError::ApplicationClosed(close)) => {
                if close.error_code != VarInt::from_u32(CLOSE_NORMAL) {
                    tracing::info!(
                        peer = %self.peer,
                        code = %close.error_code,
                        reason = %String::from_utf8_lossy(&close.reason),
                        "agent closed its QUIC connection with an error"
                    );
                }
                Ok(Incoming::Closed)
            }
            ReadError::ConnectionLost(
                ConnectionError::ConnectionClosed(_) | ConnectionError::LocallyClosed,
            ) => Ok(Incoming::Closed),
            other => Err(TransportError::Failed(other.to_string())),
        }
    }
}

fn too_large(e: &FrameError) -> TransportError {
    TransportError::Refused {
        reason: e.kind(),
        detail: format!("QUIC record refused: {e}"),
    }
}

impl AgentTransport for QuicTransport {
    // Cancel-safe: the only await is `RecvStream::read_chunk`, which is,
    // and what it returns goes into `records` before anything else awaits.
    async fn recv(&mut self) -> Result<Incoming, TransportError> {
        loop {
            match self.records.next() {
                Ok(Some(Record::Alive)) if !self.opened => self.opened = true,
                Ok(Some(Record::Alive)) => return Ok(Incoming::Alive),
                Ok(Some(Record::Frame(frame))) => {
                    self.opened = true;
                    return Ok(Incoming::Frame(frame.into()));
                }
                Ok(None) => match self.recv.read_chunk(READ_CHUNK, true).await {
                    Ok(Some(chunk)) => {
                        if let Err(e) = self.records.push(&chunk.bytes) {
                            return Err(too_large(&e));
                        }
                    }
                    // The agent finished its side of the stream.
                    Ok(None) => return Ok(Incoming::Closed),
                    Err(e) => return self.read_failed(e),
                },
                Err(e) => return Err(too_large(&e)),
            }
        }
    }

    async fn send(&mut self, frame: Vec<u8>) -> Result<(), TransportError> {
        let header = record_header(frame.len())
            .ok_or_else(|| TransportError::Failed("a frame longer than 4 GiB".into()))?;
        let mut record = [Bytes::copy_from_slice(&header), Bytes::from(frame)];
        self.send
            .write_all_chunks(&mut record)
            .await
            .map_err(|e| TransportError::Failed(e.to_string()))
    }

    /// A liveness marker: the agent's link counts it as activity.
    async fn keepalive(&mut self) -> Result<(), TransportError> {
        self.send
            .write_all(&LIVENESS)
            .await
            .map_err(|e| TransportError::Failed(e.to_string()))
    }

    /// Ends the stream, waits (briefly) until the agent has received all
    /// of it or closed the connection, then closes the connection.
    async fn close(&mut self) {
        let _ = self.send.finish();
        let delivered = self.send.stopped();
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            tokio::select! {
                _ = delivered => {}
                _ = self.connection.closed() => {}
            }
        })
        .await;
        self.connection.close(VarInt::from_u32(CLOSE_NORMAL), b"");
    }

    fn abandon(&mut self) {
        self.connection.close(VarInt::from_u32(CLOSE_NORMAL), b"");
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn name(&self) -> &'static str {
        "quic"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_reasons_fit_a_close_frame() {
        let reason = refusal_reason(&CertRefusal::Revoked);
        assert_eq!(reason, b"revoked: the robot's certificate was revoked");
        let long = refusal_reason(&CertRefusal::Invalid("é".repeat(400)));
        assert!(long.len() <= MAX_CLOSE_REASON);
        assert!(std::str::from_utf8(&long).is_ok());
    }

    #[test]
    fn the_opening_marker_and_records_split_anywhere() {
        let mut records = Records::new(1024);
        let mut stream = LIVENESS.to_vec();
        stream.extend(5u32.to_be_bytes());
        stream.extend(b"hello");
        let mut out = Vec::new();
        for byte in &stream {
            records.push(std::slice::from_ref(byte)).unwrap();
            while let Some(r) = records.next().unwrap() {
                out.push(r);
            }
        }
        assert_eq!(out, [Record::Alive, Record::Frame(b"hello".to_vec())]);
        assert!(records.push(&2000u32.to_be_bytes()).is_err());
    }
}
