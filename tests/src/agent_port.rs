//! A bare client of the controller's agent port, for tests that speak to it
//! by hand (bad input, refused certificates): TLS with a certificate the
//! test issues from the controller's own CA (or any other), then a
//! WebSocket at `/agent`.

use std::net::SocketAddr;
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
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
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
