//! The QUIC transport (quinn over rustls, ALPN `kiwi/1`, the controller's
//! agent port on UDP): one bidirectional stream per connection, opened by
//! the agent, carrying records. A record is a big-endian `u32` length and
//! that many bytes: one protocol frame, or, with length 0, a liveness
//! marker ([`Incoming::Alive`]). A record over the frame cap is a protocol
//! violation, refused from its length alone.
//!
//! QUIC only announces a stream once data flows on it, so the agent opens
//! the stream with a liveness marker; the controller answers with one of
//! its own once it has admitted the robot's certificate. [`QuicConnector`]
//! waits for that answer, so that a refused certificate fails the connect
//! with the controller's reason ("revoked: the robot's certificate was
//! revoked") instead of surfacing later as a lost connection.
//!
//! The endpoint's socket is bound to the unspecified address, so that the
//! kernel picks the source address of every packet: when the robot's
//! address changes mid-session (DHCP, another access point), packets leave
//! from the new one and the controller migrates the connection. (Only the
//! simulator binds a source address of its own, `source`.)
//!
//! This is the only module of the crate that knows QUIC.

use super::{BoxError, Close, Connection, Connector, Incoming, TransportError};
use bytes::Bytes;
use kiwi_protocol::frame::close::{CLOSE_NORMAL, CLOSE_REFUSED, CLOSE_VIOLATION};
use kiwi_protocol::frame::{
    DEFAULT_MAX_FRAME, LIVENESS, RECORD_HEADER, Record, Records, record_header,
};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{ConnectionError, IdleTimeout, ReadError, TransportConfig, VarInt};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The most bytes taken from the stream at once. Bounds what is buffered
/// beyond the record being read, whatever lengths a peer declares.
const READ_CHUNK: usize = 16 * 1024;

/// Flow-control windows (per stream and per connection: there is one
/// stream): how much the controller may send before the agent's reads
/// free room. The controller sends little (acks, commands, a certificate);
/// a frame at the cap still passes, in several windows.
const RECEIVE_WINDOW: u32 = 16 * 1024;

/// The longest close reason sent (the rest is cut; a close frame must fit
/// in one packet).
const MAX_CLOSE_REASON: usize = 256;

/// Connects to the controller over QUIC. [`QuicConnector::new`] gives the
/// production values.
///
/// Clones share the endpoint (one UDP socket per address family, created
/// at the first connect).
#[derive(Debug, Clone)]
pub struct QuicConnector {
    /// The host to connect to (no brackets), and its UDP port (the agent
    /// port).
    pub host: String,
    pub port: u16,
    /// Trust and the robot's certificate; ALPN `kiwi/1`.
    pub tls: Arc<rustls::ClientConfig>,
    /// The record cap, both ways; the link's `LinkOptions::max_frame`.
    pub max_frame: usize,
    /// How long resolving, the QUIC handshake and the controller's
    /// admission may take together.
    pub connect_timeout: Duration,
    /// How often QUIC pings a quiet connection, so that its idle timeout
    /// only ends a connection whose peer is gone.
    pub keep_alive: Duration,
    /// The QUIC idle timeout this side asks for. The effective one is the
    /// smaller of both peers': the controller asks for its liveness
    /// timeout (and pings at its heartbeat interval), which usually wins.
    pub idle_timeout: Duration,
    /// The local address the endpoint binds (`None`: the unspecified
    /// address of the controller's family).
    pub source: Option<IpAddr>,
    endpoints: Arc<Mutex<Endpoints>>,
}

/// The client endpoints, one per address family, bound to the unspecified
/// address (see the module documentation) or to `source`.
#[derive(Debug, Default)]
struct Endpoints {
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
}

impl QuicConnector {
    pub fn new(host: String, port: u16, tls: Arc<rustls::ClientConfig>) -> Self {
        QuicConnector {
            host,
            port,
            tls,
            max_frame: DEFAULT_MAX_FRAME,
            connect_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            source: None,
            endpoints: Arc::default(),
        }
    }

    /// The endpoint for `addr`'s family, created on first use.
    fn endpoint(&self, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let (slot, unspecified) = match addr {
            SocketAddr::V4(_) => (&mut endpoints.v4, IpAddr::from(Ipv4Addr::UNSPECIFIED)),
            SocketAddr::V6(_) => (&mut endpoints.v6, IpAddr::from(Ipv6Addr::UNSPECIFIED)),
        };
        let bind = match self.source {
            None => SocketAddr::new(unspecified, 0),
            Some(source) if source.is_ipv4() == addr.is_ipv4() => SocketAddr::new(source, 0),
            Some(source) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{addr} is not of the family of the source address {source}"),
                ));
            }
        };
        if let Some(endpoint) = slot {
            return Ok(endpoint.clone());
        }
        let endpoint = quinn::Endpoint::client(bind)?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// Drops the endpoint for `addr`'s family (its socket failed), so that
    /// the next connect makes a new one.
    fn forget_endpoint(&self, addr: SocketAddr) {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        match addr {
            SocketAddr::V4(_) => endpoints.v4 = None,
            SocketAddr::V6(_) => endpoints.v6 = None,
        }
    }

    fn client_config(&self) -> Result<quinn::ClientConfig, BoxError> {
        let crypto = QuicClientConfig::try_from(self.tls.clone())?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(self.transport_config()?));
        Ok(config)
    }

    /// The QUIC settings of the agent's side.
    fn transport_config(&self) -> Result<TransportConfig, BoxError> {
        let mut transport = TransportConfig::default();
        transport
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(Some(IdleTimeout::try_from(self.idle_timeout)?))
            // The controller opens no streams.
            .max_concurrent_bidi_streams(VarInt::from_u32(0))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(VarInt::from_u32(RECEIVE_WINDOW))
            .receive_window(VarInt::from_u32(RECEIVE_WINDOW))
            // One whole record at the cap may wait for acknowledgement.
            .send_window((self.max_frame + RECORD_HEADER) as u64)
            // Frames travel on the stream only.
            .datagram_receive_buffer_size(None)
            .datagram_send_buffer_size(0);
        Ok(transport)
    }

    async fn open(&self) -> Result<QuicConnection, BoxError> {
        let addr = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", self.host))?;
        let config = self.client_config()?;
        // The controller's verifier ignores names, but rustls needs a valid
        // one: a host that is not a valid DNS name goes by its address.
        let name = match rustls_pki_types::ServerName::try_from(self.host.as_str()) {
            Ok(_) => self.host.clone(),
            Err(_) => addr.ip().to_string(),
        };
        let connecting = match self
            .endpoint(addr)?
            .connect_with(config.clone(), addr, &name)
        {
            Err(quinn::ConnectError::EndpointStopping) => {
                // The endpoint's socket failed: start over with a new one.
                self.forget_endpoint(addr);
                self.endpoint(addr)?.connect_with(config, addr, &name)?
            }
            other => other?,
        };
        let connection = connecting.await?;
        let (mut send, recv) = connection.open_bi().await?;
        // Announces the stream to the controller.
        send.write_all(&LIVENESS).await?;
        let mut conn = QuicConnection {
            connection,
            send,
            recv,
            records: Records::new(self.max_frame),
            pending: None,
        };
        // The controller's first record says it admitted the robot; a
        // refusal closes the connection with the reason.
        match conn.recv().await {
            Ok(Incoming::Alive) => Ok(conn),
            Ok(Incoming::Frame(frame)) => {
                conn.pending = Some(frame);
                Ok(conn)
            }
            Ok(Incoming::Closed(why)) => Err(refusal(&conn.connection, why).into()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Why the controller closed a connection before admitting it, as a
/// sentence.
fn refusal(connection: &quinn::Connection, why: Option<String>) -> String {
    match connection.close_reason() {
        Some(ConnectionError::ApplicationClosed(close))
            if close.error_code == VarInt::from_u32(CLOSE_REFUSED) =>
        {
            format!(
                "the controller refused the robot: {}",
                String::from_utf8_lossy(&close.reason)
            )
        }
        _ => format!(
            "the controller closed the connection before admitting the robot ({})",
            why.as_deref().unwrap_or("no reason")
        ),
    }
}

impl Connector for QuicConnector {
    type Conn = QuicConnection;

    async fn connect(&self) -> Result<QuicConnection, TransportError> {
        match tokio::time::timeout(self.connect_timeout, self.open()).await {
            Err(_) => Err(TransportError::ConnectTimeout {
                endpoint: self.describe(),
            }),
            Ok(Err(error)) => Err(TransportError::Connect {
                endpoint: self.describe(),
                error,
            }),
            Ok(Ok(conn)) => Ok(conn),
        }
    }

    fn describe(&self) -> String {
        if self.host.contains(':') {
            format!("quic://[{}]:{}", self.host, self.port)
        } else {
            format!("quic://{}:{}", self.host, self.port)
        }
    }
}

/// One QUIC connection to the controller and its one stream.
#[derive(Debug)]
pub struct QuicConnection {
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    records: Records,
    /// A frame that arrived in place of the controller's admission marker.
    pending: Option<Vec<u8>>,
}

impl QuicConnection {
    /// How a read error ends the connection.
    fn read_failed(&self, e: ReadError) -> Result<Incoming, TransportError> {
        match e {
            ReadError::ConnectionLost(lost) => match lost {
                ConnectionError::ApplicationClosed(close) => Ok(Incoming::Closed(describe_close(
                    close.error_code,
                    &close.reason,
                ))),
                ConnectionError::ConnectionClosed(close) => {
                    Ok(Incoming::Closed(Some(close.to_string())))
                }
                ConnectionError::LocallyClosed => Ok(Incoming::Closed(None)),
                other => Err(TransportError::Read(other.into())),
            },
            other => Err(TransportError::Read(other.into())),
        }
    }
}

/// `<code>: <reason>` of an application close, or `None` for a normal
/// close without a reason.
fn describe_close(code: VarInt, reason: &[u8]) -> Option<String> {
    if code == VarInt::from_u32(CLOSE_NORMAL) && reason.is_empty() {
        return None;
    }
    Some(format!("{code}: {}", String::from_utf8_lossy(reason)))
}

impl Connection for QuicConnection {
    async fn send(&mut self, frame: Vec<u8>) -> Result<(), TransportError> {
        let header = record_header(frame.len())
            .ok_or_else(|| TransportError::Write("a frame longer than 4 GiB".into()))?;
        let mut record = [Bytes::copy_from_slice(&header), Bytes::from(frame)];
        self.send
            .write_all_chunks(&mut record)
            .await
            .map_err(|e| TransportError::Write(e.into()))
    }

    // Cancel-safe: the only await is `RecvStream::read_chunk`, which is,
    // and what it returns goes into `records` before anything else awaits.
    async fn recv(&mut self) -> Result<Incoming, TransportError> {
        if let Some(frame) = self.pending.take() {
            return Ok(Incoming::Frame(frame));
        }
        loop {
            match self.records.next() {
                Ok(Some(Record::Alive)) => return Ok(Incoming::Alive),
                Ok(Some(Record::Frame(frame))) => return Ok(Incoming::Frame(frame)),
                Ok(None) => {}
                Err(e) => return Err(TransportError::Violation(e.to_string())),
            }
            match self.recv.read_chunk(READ_CHUNK, true).await {
                Ok(Some(chunk)) => {
                    if let Err(e) = self.records.push(&chunk.bytes) {
                        return Err(TransportError::Violation(e.to_string()));
                    }
                }
                // The controller finished its side of the stream.
                Ok(None) => return Ok(Incoming::Closed(None)),
                Err(e) => return self.read_failed(e),
            }
        }
    }

    // A marker is not answered: the controller sends its own every
    // heartbeat interval whatever the agent does, which is what keeps a
    // healthy connection inside the link's idle timeout. QUIC's own pings
    // (`keep_alive`) keep the connection itself from idling out.
    async fn keepalive(&mut self) -> Result<(), TransportError> {
        self.send
            .write_all(&LIVENESS)
            .await
            .map_err(|e| TransportError::Write(e.into()))
    }

    async fn close(&mut self, why: Close<'_>) {
        match why {
            // What was sent (a Goodbye) is still delivered; the controller
            // closes the connection once it has read it.
            Close::Normal => {
                let _ = self.send.finish();
            }
            Close::Violation(reason) => self.connection.close(
                VarInt::from_u32(CLOSE_VIOLATION),
                truncated(reason, MAX_CLOSE_REASON).as_bytes(),
            ),
        }
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn truncated(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiwi_security::pki::{Authority, Validity};
    use kiwi_security::verify::{ALPN_QUIC, ControllerTrust, ControllerVerifier, client_config};
    use std::time::SystemTime;

    /// What the test's server holds: its endpoint and connection (kept
    /// open) and its side of the stream.
    type Server = (quinn::Endpoint, quinn::Connection, quinn::SendStream);

    /// A QUIC server on loopback that accepts one connection and hands its
    /// stream to the test, and a connector trusting it.
    async fn loopback() -> (QuicConnector, tokio::task::JoinHandle<Server>) {
        kiwi_security::install_crypto_provider();
        let now = SystemTime::now();
        let ca =
            Authority::create("test", Validity::starting(now, Duration::from_secs(3600))).unwrap();
        let server = ca
            .issue_server(
                &["localhost".into()],
                &[],
                Validity::starting(now, Duration::from_secs(3600)),
            )
            .unwrap();
        let key = kiwi_security::pki::private_key_from_pem(&server.key_pem).unwrap();
        let mut tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![server.cert.der.clone()], key)
            .unwrap();
        tls.alpn_protocols = vec![ALPN_QUIC.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let endpoint = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(crypto)),
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        )
        .unwrap();
        let port = endpoint.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let connection = endpoint.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = connection.accept_bi().await.unwrap();
            let mut opening = [1; 4];
            recv.read_exact(&mut opening).await.unwrap();
            assert_eq!(
                opening, LIVENESS,
                "the agent opens the stream with a marker"
            );
            send.write_all(&LIVENESS).await.unwrap();
            (endpoint, connection, send)
        });
        let client = client_config(
            ControllerVerifier::new(ControllerTrust::Ca(ca.cert_der().clone())),
            None,
            ALPN_QUIC,
        )
        .unwrap();
        let connector = QuicConnector::new("127.0.0.1".into(), port, Arc::new(client));
        (connector, task)
    }

    #[tokio::test]
    async fn recv_loses_nothing_when_cancelled() {
        let (connector, server) = loopback().await;
        assert_eq!(
            connector.describe(),
            format!("quic://127.0.0.1:{}", connector.port)
        );
        let mut conn = connector.connect().await.unwrap();
        let (_endpoint, _connection, mut send) = server.await.unwrap();
        let whole = kiwi_protocol::frame::encode_record(b"a frame cut in two");
        // Half a record, then a recv that gives up waiting for the rest.
        send.write_all(&whole[..9]).await.unwrap();
        let cancelled = tokio::time::timeout(Duration::from_millis(200), conn.recv()).await;
        assert!(cancelled.is_err(), "no whole record yet: {cancelled:?}");
        send.write_all(&whole[9..]).await.unwrap();
        send.write_all(&LIVENESS).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), conn.recv()).await;
        assert_eq!(
            next.unwrap().unwrap(),
            Incoming::Frame(b"a frame cut in two".to_vec())
        );
        assert_eq!(conn.recv().await.unwrap(), Incoming::Alive);
        send.finish().unwrap();
        assert_eq!(conn.recv().await.unwrap(), Incoming::Closed(None));
    }

    #[tokio::test]
    async fn an_unreachable_controller_times_out() {
        let (mut connector, _server) = loopback().await;
        // Nobody listens on the port after the server's.
        connector.port = connector.port.wrapping_add(1).max(1);
        connector.connect_timeout = Duration::from_millis(300);
        let e = connector.connect().await.unwrap_err();
        assert!(
            matches!(
                e,
                TransportError::ConnectTimeout { .. } | TransportError::Connect { .. }
            ),
            "{e}"
        );
    }

    #[test]
    fn close_reasons_are_cut_at_characters() {
        assert_eq!(truncated("héllo", 2), "h");
        assert_eq!(truncated("hello", 10), "hello");
        assert_eq!(describe_close(VarInt::from_u32(0), b""), None);
        assert_eq!(
            describe_close(VarInt::from_u32(CLOSE_REFUSED), b"revoked: gone").as_deref(),
            Some("16: revoked: gone")
        );
    }
}
