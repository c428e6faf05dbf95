//! A bare client of the controller's agent port, for tests that speak to it
//! by hand (bad input, refused certificates): TLS with a certificate the
//! test issues from the controller's own CA (or any other), then a
//! WebSocket at `/agent`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use kiwi_security::pki::{Authority, Validity, generate_key};
use kiwi_security::verify::{self, ALPN_HTTP1, ControllerTrust, ControllerVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use uuid::Uuid;

/// A WebSocket to the agent endpoint over TLS.
pub type AgentWs = WebSocketStream<TlsStream<TcpStream>>;

/// A client certificate and its key.
#[derive(Debug)]
pub struct ClientCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for ClientCert {
    fn clone(&self) -> Self {
        ClientCert {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// A certificate for `robot` from `ca`, valid from `now - before` for
/// `lifetime` (a lifetime that ended before now makes an expired one).
pub fn robot_cert(ca: &Authority, robot: Uuid, validity: Validity) -> ClientCert {
    let key = generate_key().expect("a key");
    let cert = ca
        .issue_robot_for(&key, robot, validity)
        .expect("a certificate");
    ClientCert {
        chain: vec![cert.der],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

/// Valid for an hour from now.
pub fn hour() -> Validity {
    Validity::starting(SystemTime::now(), Duration::from_secs(3600))
}

/// Ended an hour ago.
pub fn expired() -> Validity {
    let start = SystemTime::now() - Duration::from_secs(7200);
    Validity {
        not_before: start,
        not_after: start + Duration::from_secs(3600),
    }
}

/// TLS settings that trust `ca` and present `cert` (none: no certificate).
pub fn tls(
    ca: &CertificateDer<'static>,
    cert: Option<ClientCert>,
    alpn: &[u8],
) -> Arc<rustls::ClientConfig> {
    kiwi_security::install_crypto_provider();
    let verifier = ControllerVerifier::new(ControllerTrust::Ca(ca.clone()));
    Arc::new(
        verify::client_config(verifier, cert.map(|c| (c.chain, c.key)), alpn)
            .expect("client TLS settings"),
    )
}

/// Opens TLS to `addr` with `tls`.
pub async fn connect_tls(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    connect_tls_from(addr, None, tls).await
}

/// Opens TLS to `addr` with `tls`, from the loopback address `source` when
/// given (a test's second "host").
pub async fn connect_tls_from(
    addr: SocketAddr,
    source: Option<IpAddr>,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let tcp = crate::raw_http::connect_from(addr, source).await?;
    // As the agent does: small frames go out at once (without it, Nagle's
    // algorithm holds the request behind TLS's Finished until it is acked).
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    let name = ServerName::try_from(addr.ip().to_string()).expect("an IP is a server name");
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .context("TLS handshake")
}

/// Why the agent endpoint refused an upgrade: HTTP status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub body: String,
}

/// TLS with `cert`, then the WebSocket upgrade at `/agent`. `Err(Ok(_))`
/// is the controller's refusal of the upgrade; `Err(Err(_))` anything else.
pub async fn connect_ws(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    cert: Option<ClientCert>,
) -> Result<AgentWs, Result<Refused, anyhow::Error>> {
    let stream = connect_tls(addr, tls(ca, cert, ALPN_HTTP1))
        .await
        .map_err(Err)?;
    let request = format!("wss://{addr}/agent")
        .into_client_request()
        .map_err(|e| Err(e.into()))?;
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(Ok(Refused {
            status: response.status().as_u16(),
            body: response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default(),
        })),
        Err(e) => Err(Err(e.into())),
    }
}

/// Sends one HTTP request (`head` ends with its empty line; `body` after
/// it) over TLS without a client certificate, from `source` when given,
/// and returns the answer.
pub async fn exchange(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    source: Option<IpAddr>,
    head: &str,
    body: &[u8],
) -> anyhow::Result<crate::api::RawResponse> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = connect_tls_from(addr, source, tls(ca, None, ALPN_HTTP1)).await?;
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(done) = crate::raw_http::parse_complete(&answer)? {
                return Ok(done);
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        crate::raw_http::parse_complete(&answer)?.ok_or_else(|| {
            anyhow::anyhow!("no complete answer: {:?}", String::from_utf8_lossy(&answer))
        })
    });
    read.await.context("no answer in time")?
}

/// `POST /enroll` with `body` (JSON) over TLS, from `source` when given.
pub async fn post_enroll(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    source: Option<IpAddr>,
    body: &[u8],
) -> anyhow::Result<crate::api::RawResponse> {
    let head = format!(
        "POST /enroll HTTP/1.1\r\nHost: kiwi\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    exchange(addr, ca, source, &head, body).await
}

/// An enrollment request (no token unless given) of a simulated robot
/// named `name`, with a new key, and extra MAC addresses when asked for.
pub fn enroll_request(name: &str, token: Option<&str>, macs: usize) -> Vec<u8> {
    use kiwi_protocol::{HardwareId, Identity, RobotId, RobotType};
    let hardware_id = HardwareId::Configured(name.to_string());
    let robot_id = RobotId::from_hardware(&hardware_id);
    let key = generate_key().expect("a key");
    let identity = Identity {
        robot_id,
        hardware_id,
        hostname: name.to_string(),
        robot_type: RobotType::Lekiwi,
        model: None,
        os_version: None,
        agent_version: "0.1.0".into(),
        mac_addresses: (0..macs)
            .map(|n| [2, 0, 0, 0, (n >> 8) as u8, n as u8])
            .collect(),
        ip_addresses: vec![],
    };
    serde_json::to_vec(&kiwi_security::enroll::EnrollRequest {
        token: token.map(str::to_string),
        csr_pem: kiwi_security::pki::robot_csr_pem(&key, robot_id.0).expect("a CSR"),
        identity,
    })
    .expect("JSON")
}
