//! Who is on the other end of a TLS connection, for both transports
//! (WebSocket over TLS and QUIC use the same rustls configurations).
//!
//! **Controller side.** The TLS handshake asks every client for a
//! certificate but lets one without a certificate through, and checks only
//! that the client holds the key of the certificate it presents
//! ([`OptionalClientCert`]). The chain is then checked by the controller
//! itself ([`check_robot_chain`]) before anything reaches the agent
//! endpoint, so that each refusal (no certificate, another CA, expired,
//! revoked) is logged with its reason, counted, and explained to the agent,
//! instead of ending as an anonymous TLS alert. Enrollment needs the
//! anonymous path: an agent without a certificate may only enroll.
//!
//! **Agent side.** [`ControllerVerifier`] trusts exactly one CA: the one it
//! stored at enrollment, or, while enrolling, the one whose pin the token
//! carries (or, for an enrollment an operator approves by fingerprint, the
//! one offered first). Host names are not checked: the CA is private to one
//! controller and only signs server certificates for it, and robots reach
//! the controller by changing addresses (DHCP, mDNS) that a certificate
//! cannot list in advance.

use crate::digest::CaPin;
use crate::pki::CertInfo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// ALPN of the QUIC transport.
pub const ALPN_QUIC: &[u8] = b"kiwi/1";
/// ALPN of WebSocket over TLS.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Installs the ring crypto provider for the process (idempotent). Call it
/// first thing in every binary and test that uses TLS.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

fn unix_time(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap_or_default())
}

/// Why the controller refuses an agent's certificate. [`CertRefusal::reason`]
/// is the metric label and the word in the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertRefusal {
    #[error("no client certificate (enroll the robot first: `kiwi-agent enroll`)")]
    NoCertificate,
    #[error("the client certificate was not issued by this controller's CA")]
    UnknownCa,
    #[error("the client certificate has expired")]
    Expired,
    #[error("the client certificate is not valid yet (is the robot's clock right?)")]
    NotYetValid,
    #[error("the certificate is not a robot client certificate")]
    WrongUsage,
    #[error("the client certificate names no robot id")]
    NoRobotId,
    #[error("the robot's certificate was revoked")]
    Revoked,
    #[error("the robot id {hello} does not match the certificate's {cert}")]
    IdentityMismatch { cert: uuid::Uuid, hello: uuid::Uuid },
    #[error("invalid client certificate: {0}")]
    Invalid(String),
}

impl CertRefusal {
    pub fn reason(&self) -> &'static str {
        match self {
            CertRefusal::NoCertificate => "no_certificate",
            CertRefusal::UnknownCa => "unknown_ca",
            CertRefusal::Expired => "expired",
            CertRefusal::NotYetValid => "not_yet_valid",
            CertRefusal::WrongUsage => "wrong_usage",
            CertRefusal::NoRobotId => "no_robot_id",
            CertRefusal::Revoked => "revoked",
            CertRefusal::IdentityMismatch { .. } => "identity_mismatch",
            CertRefusal::Invalid(_) => "invalid_certificate",
        }
    }
}

/// Checks an agent's certificate chain (leaf first) against the CA at
/// `now`: issued by it, in its validity period, for client authentication,
/// naming a robot. Revocation is the caller's (it needs the store).
pub fn check_robot_chain(
    ca: &CertificateDer<'_>,
    chain: &[CertificateDer<'_>],
    now: SystemTime,
) -> Result<CertInfo, CertRefusal> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(CertRefusal::NoCertificate);
    };
    let anchor = webpki::anchor_from_trusted_cert(ca)
        .map_err(|e| CertRefusal::Invalid(format!("the CA certificate is unusable: {e}")))?;
    let end_entity =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| CertRefusal::Invalid(e.to_string()))?;
    end_entity
        .verify_for_usage(
            algorithms().all,
            &[anchor],
            intermediates,
            unix_time(now),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::UnknownIssuer => CertRefusal::UnknownCa,
            webpki::Error::CertExpired { .. } => CertRefusal::Expired,
            webpki::Error::CertNotValidYet { .. } => CertRefusal::NotYetValid,
            webpki::Error::RequiredEkuNotFoundContext(_) => CertRefusal::WrongUsage,
            other => CertRefusal::Invalid(other.to_string()),
        })?;
    let info = CertInfo::parse(leaf).map_err(|e| CertRefusal::Invalid(e.to_string()))?;
    if info.robot_id.is_none() {
        return Err(CertRefusal::NoRobotId);
    }
    Ok(info)
}

/// The controller's client-certificate policy: ask, do not require, check
/// possession of the key; the chain is checked after the handshake by
/// [`check_robot_chain`] (see the module documentation).
#[derive(Debug)]
pub struct OptionalClientCert {
    hints: Vec<DistinguishedName>,
}

impl OptionalClientCert {
    /// `ca` is named to clients as the CA to pick a certificate for. The
    /// name travels as a DER `Name` (a SEQUENCE): webpki's subject is the
    /// contents without that outer SEQUENCE, which OpenSSL-based clients
    /// refuse to parse.
    pub fn new(ca: &CertificateDer<'_>) -> Self {
        let hints = webpki::anchor_from_trusted_cert(ca)
            .map(|a| vec![DistinguishedName::in_sequence(a.subject.as_ref())])
            .unwrap_or_default();
        OptionalClientCert { hints }
    }
}

impl ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Checked after the handshake (check_robot_chain), where the
        // refusal can be logged with its peer and reason.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// The controller's TLS settings: certificates from `certs` (the server
/// certificate first, then the CA, so that enrolling agents can find the CA
/// they pin; a resolver lets a renewed certificate take over without a
/// restart) and optional client certificates. `alpn`: [`ALPN_HTTP1`] for
/// WebSocket, [`ALPN_QUIC`] for QUIC.
pub fn server_config(
    certs: Arc<dyn rustls::server::ResolvesServerCert>,
    ca: &CertificateDer<'_>,
    alpn: &[u8],
) -> ServerConfig {
    install_crypto_provider();
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(Arc::new(OptionalClientCert::new(ca)))
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![alpn.to_vec()];
    // No session resumption: every agent connection is a full handshake
    // with its certificate checked again (revocation, expiry), and the
    // server keeps no ticket or session cache per connection.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config
}

/// A certificate chain and key in the form rustls serves them.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'static>,
) -> Result<Arc<rustls::sign::CertifiedKey>, rustls::Error> {
    let signing = rustls::crypto::ring::sign::any_supported_type(key)?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(chain, signing)))
}

/// Which CA an agent trusts.
#[derive(Debug, Clone)]
pub enum ControllerTrust {
    /// The CA stored at enrollment.
    Ca(CertificateDer<'static>),
    /// Enrolling with a token: the CA in the offered chain with this pin.
    Pin(CaPin),
    /// Enrolling without a token (an operator approves the robot by its key
    /// fingerprint and sees the CA pin the agent logs): the CA the
    /// controller offers.
    FirstUse,
}

/// The controller the agent found did not present the expected CA.
#[derive(Debug, thiserror::Error)]
#[error(
    "the controller's CA ({offered}) is not the one the enrollment token pins ({pinned}): \
     refusing to talk to it"
)]
pub struct PinMismatch {
    pub pinned: CaPin,
    pub offered: String,
}

/// The agent's check of the controller's certificate (see the module
/// documentation). Remembers the CA it accepted, for the agent to store.
#[derive(Debug)]
pub struct ControllerVerifier {
    trust: ControllerTrust,
    accepted: Mutex<Option<CertificateDer<'static>>>,
    /// Why the last controller certificate was refused, in words (rustls
    /// only carries it as a debug string).
    refused: Mutex<Option<String>>,
}

impl ControllerVerifier {
    pub fn new(trust: ControllerTrust) -> Arc<Self> {
        Arc::new(ControllerVerifier {
            trust,
            accepted: Mutex::new(None),
            refused: Mutex::new(None),
        })
    }

    /// The CA of the last controller certificate this accepted.
    pub fn accepted_ca(&self) -> Option<CertificateDer<'static>> {
        self.accepted.lock().map_or(None, |ca| ca.clone())
    }

    /// Why the last controller certificate was refused, as a sentence.
    pub fn refusal(&self) -> Option<String> {
        self.refused.lock().map_or(None, |r| r.clone())
    }

    fn anchor_for<'a>(
        &'a self,
        intermediates: &'a [CertificateDer<'a>],
    ) -> Result<CertificateDer<'a>, rustls::Error> {
        match &self.trust {
            ControllerTrust::Ca(ca) => Ok(ca.clone()),
            ControllerTrust::Pin(pin) => intermediates
                .iter()
                .find(|c| CaPin::of(c) == *pin)
                .cloned()
                .ok_or_else(|| {
                    let offered = intermediates
                        .last()
                        .map_or_else(|| "no CA".to_string(), |c| CaPin::of(c).to_string());
                    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                        Arc::new(PinMismatch {
                            pinned: pin.clone(),
                            offered,
                        }),
                    )))
                }),
            ControllerTrust::FirstUse => {
                intermediates
                    .last()
                    .cloned()
                    .ok_or(rustls::Error::InvalidCertificate(
                        CertificateError::UnknownIssuer,
                    ))
            }
        }
    }
}

impl ServerCertVerifier for ControllerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let checked = self.check(end_entity, intermediates, now);
        if let Ok(mut refused) = self.refused.lock() {
            *refused = checked.as_ref().err().map(|e| match e {
                rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(why))) => {
                    format!("the controller's certificate was refused: {why}")
                }
                other => format!("the controller's certificate was refused: {other}"),
            });
        }
        checked
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

impl ControllerVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = self.anchor_for(intermediates)?;
        let anchor = webpki::anchor_from_trusted_cert(&ca)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))?;
        let leaf = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        leaf.verify_for_usage(
            algorithms().all,
            &[anchor],
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            rustls::Error::InvalidCertificate(match e {
                webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
                webpki::Error::CertExpired { .. } => CertificateError::Expired,
                webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
                other => CertificateError::Other(OtherError(Arc::new(other))),
            })
        })?;
        if let Ok(mut accepted) = self.accepted.lock() {
            *accepted = Some(ca.into_owned());
        }
        Ok(ServerCertVerified::assertion())
    }
}

/// The agent's TLS settings: trust per `verifier`, and the robot's
/// certificate chain and key when it has them (enrolling agents have none).
pub fn client_config(
    verifier: Arc<ControllerVerifier>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[u8],
) -> Result<ClientConfig, rustls::Error> {
    install_crypto_provider();
    let builder = ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// The agent's TLS settings with the robot's certificate from `certs`
/// (a resolver, so that a renewed certificate is used by the next
/// connection without rebuilding anything).
pub fn client_config_with(
    verifier: Arc<ControllerVerifier>,
    certs: Arc<dyn rustls::client::ResolvesClientCert>,
    alpn: &[u8],
) -> ClientConfig {
    install_crypto_provider();
    let mut config = ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(certs);
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Authority, Validity, generate_key};
    use std::time::Duration;
    use uuid::Uuid;

    fn hour() -> Duration {
        Duration::from_secs(3600)
    }

    #[test]
    fn robot_chains_are_checked_with_a_reason() {
        let now = SystemTime::now();
        let ca = Authority::create("ours", Validity::starting(now, hour() * 24)).unwrap();
        let other = Authority::create("theirs", Validity::starting(now, hour() * 24)).unwrap();
        let key = generate_key().unwrap();
        let robot = Uuid::new_v4();
        let good = ca
            .issue_robot_for(&key, robot, Validity::starting(now, hour()))
            .unwrap();
        let info = check_robot_chain(ca.cert_der(), std::slice::from_ref(&good.der), now).unwrap();
        assert_eq!(info.robot_id, Some(robot));

        assert_eq!(
            check_robot_chain(ca.cert_der(), &[], now),
            Err(CertRefusal::NoCertificate)
        );
        let foreign = other
            .issue_robot_for(&key, robot, Validity::starting(now, hour()))
            .unwrap();
        assert_eq!(
            check_robot_chain(ca.cert_der(), &[foreign.der], now),
            Err(CertRefusal::UnknownCa)
        );
        assert_eq!(
            check_robot_chain(
                ca.cert_der(),
                std::slice::from_ref(&good.der),
                now + hour() * 2
            ),
            Err(CertRefusal::Expired)
        );
        assert_eq!(
            check_robot_chain(ca.cert_der(), &[good.der], now - hour()),
            Err(CertRefusal::NotYetValid)
        );
        let server = ca
            .issue_server(&["localhost".into()], &[], Validity::starting(now, hour()))
            .unwrap();
        assert_eq!(
            check_robot_chain(ca.cert_der(), &[server.cert.der], now),
            Err(CertRefusal::WrongUsage)
        );
        assert!(matches!(
            check_robot_chain(ca.cert_der(), &[CertificateDer::from(vec![1, 2, 3])], now),
            Err(CertRefusal::Invalid(_))
        ));
    }

    #[test]
    fn the_ca_named_to_clients_is_a_whole_der_name() {
        let ca = Authority::create(
            "kiwi test CA",
            Validity::starting(SystemTime::now(), hour()),
        )
        .unwrap();
        let policy = OptionalClientCert::new(ca.cert_der());
        let [hint] = policy.root_hint_subjects() else {
            panic!("one hint: {:?}", policy.root_hint_subjects())
        };
        let name = hint.as_ref();
        // A SEQUENCE whose length covers the rest, as it is in the
        // certificate (which holds it verbatim, as subject and issuer).
        assert_eq!(name[0], 0x30, "{name:02x?}");
        let len = match name[1] {
            short @ 0..=0x7f => usize::from(short) + 2,
            0x81 => usize::from(name[2]) + 3,
            0x82 => usize::from(u16::from_be_bytes([name[2], name[3]])) + 4,
            other => panic!("length form {other:#x}"),
        };
        assert_eq!(len, name.len());
        let cert = ca.cert_der().as_ref();
        assert!(cert.windows(name.len()).any(|w| w == name));
    }

    #[test]
    fn the_agent_trusts_only_its_controllers_ca() {
        let now = SystemTime::now();
        let ca = Authority::create("ours", Validity::starting(now, hour() * 24)).unwrap();
        let other = Authority::create("theirs", Validity::starting(now, hour() * 24)).unwrap();
        let server = ca
            .issue_server(&["localhost".into()], &[], Validity::starting(now, hour()))
            .unwrap();
        let chain = [ca.cert_der().clone()];
        let name = ServerName::try_from("10.1.2.3").unwrap();
        let check = |trust: ControllerTrust| {
            let v = ControllerVerifier::new(trust);
            let r = v.verify_server_cert(&server.cert.der, &chain, &name, &[], unix_time(now));
            (r.map(|_| ()), v.accepted_ca())
        };
        let (ok, accepted) = check(ControllerTrust::Ca(ca.cert_der().clone()));
        assert!(ok.is_ok(), "{ok:?}");
        assert_eq!(accepted.as_ref(), Some(ca.cert_der()));
        assert!(check(ControllerTrust::Pin(ca.pin())).0.is_ok());
        assert!(check(ControllerTrust::FirstUse).0.is_ok());
        let v = ControllerVerifier::new(ControllerTrust::Pin(other.pin()));
        let refused = v.verify_server_cert(&server.cert.der, &chain, &name, &[], unix_time(now));
        assert!(refused.is_err());
        let text = v.refusal().expect("a reason");
        assert!(
            text.contains("is not the one the enrollment token pins"),
            "{text}"
        );
        assert!(v.accepted_ca().is_none());
        let (refused, _) = check(ControllerTrust::Ca(other.cert_der().clone()));
        assert!(refused.is_err());
        // A robot's certificate cannot pose as the controller.
        let robot = ca
            .issue_robot_for(
                &generate_key().unwrap(),
                Uuid::new_v4(),
                Validity::starting(now, hour()),
            )
            .unwrap();
        let v = ControllerVerifier::new(ControllerTrust::Ca(ca.cert_der().clone()));
        assert!(
            v.verify_server_cert(&robot.der, &chain, &name, &[], unix_time(now))
                .is_err()
        );
    }
}
