//! Keys and certificates: the controller's CA (create, load, issue), a
//! robot's key and its certificate request, and reading the few facts kiwi
//! needs out of a certificate. Pure crypto, no files and no clock: callers
//! pass the time in.
//!
//! Conventions: every key is ECDSA P-256. A robot's certificate names the
//! robot id as its common name and as a `urn:uuid:` URI, and is good for
//! client authentication only; the controller's server certificate is good
//! for server authentication only, so neither can stand in for the other.

use crate::digest::{CaPin, KeyFingerprint, hex};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// How far back a new certificate's validity starts, for clocks that are a
/// little behind the controller's.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Why a key, request or certificate could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what}: {source}")]
    Rcgen {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn rcgen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Rcgen { what, source }
}

/// A validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From a little before `now` (for clocks that are behind: `CLOCK_SKEW`,
    /// or a tenth of `ttl` if that is less, so that a short-lived
    /// certificate is still renewed late in its life) to `now + ttl`.
    pub fn starting(now: SystemTime, ttl: Duration) -> Self {
        let skew = CLOCK_SKEW.min(ttl / 10);
        Validity {
            not_before: now.checked_sub(skew).unwrap_or(now),
            not_after: now + ttl,
        }
    }
}

/// Unix time in milliseconds (0 before 1970).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A random positive 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random generator works");
    // Positive and without a leading zero byte (RFC 5280: at most 20 octets,
    // positive).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// A new ECDSA P-256 key.
pub fn generate_key() -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(rcgen_err("cannot generate a key"))
}

/// A key from PKCS#8 PEM.
pub fn key_from_pem(pem: &str) -> Result<KeyPair, PkiError> {
    KeyPair::from_pem(pem).map_err(rcgen_err("cannot read the private key"))
}

/// The fingerprint of a key pair's public half.
pub fn key_fingerprint(key: &KeyPair) -> KeyFingerprint {
    KeyFingerprint::of(&key.subject_public_key_info())
}

/// A robot's certificate request for `robot_id`, signed by its key (the
/// controller decides what goes into the certificate; the request proves
/// the key and names the robot).
pub fn robot_csr_pem(key: &KeyPair, robot_id: Uuid) -> Result<String, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = robot_name(robot_id);
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(rcgen_err("cannot make a certificate request"))
}

/// A certificate request as the controller reads it: its signature checked
/// (the requester holds the key), its public key kept.
#[derive(Debug)]
pub struct CertificateRequest {
    csr: CertificateSigningRequestParams,
}

impl CertificateRequest {
    /// Parses and checks a PEM request.
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        CertificateSigningRequestParams::from_pem(pem)
            .map(|csr| CertificateRequest { csr })
            .map_err(rcgen_err("invalid certificate request"))
    }

    /// Parses and checks a DER request.
    pub fn from_der(der: &[u8]) -> Result<Self, PkiError> {
        CertificateSigningRequestParams::from_der(&der.into())
            .map(|csr| CertificateRequest { csr })
            .map_err(rcgen_err("invalid certificate request"))
    }

    pub fn key_fingerprint(&self) -> KeyFingerprint {
        KeyFingerprint::of(&self.csr.public_key.subject_public_key_info())
    }
}

/// A robot's certificate request as DER (sent over the link when renewing).
pub fn robot_csr_der(key: &KeyPair, robot_id: Uuid) -> Result<Vec<u8>, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = robot_name(robot_id);
    params
        .serialize_request(key)
        .map(|csr| csr.der().to_vec())
        .map_err(rcgen_err("cannot make a certificate request"))
}

fn robot_name(robot_id: Uuid) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, robot_id.to_string());
    name.push(DnType::OrganizationName, "kiwi robot");
    name
}

/// A certificate the CA issued, with what the controller records about it.
#[derive(Debug, Clone)]
pub struct Issued {
    pub der: CertificateDer<'static>,
    pub pem: String,
    pub info: CertInfo,
}

/// A server certificate and its new key.
#[derive(Debug)]
pub struct IssuedServer {
    pub cert: Issued,
    pub key_pem: String,
}

/// The controller's certificate authority.
pub struct Authority {
    cert: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("pin", &self.pin())
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// A new CA named `name`, valid for `validity`.
    pub fn create(name: &str, validity: Validity) -> Result<Authority, PkiError> {
        let key = generate_key()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "kiwi");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before.into();
        params.not_after = validity.not_after.into();
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err("cannot create the CA certificate"))?;
        Ok(Authority {
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority, PkiError> {
        let key = key_from_pem(key_pem)?;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| PkiError::Invalid(format!("cannot read the CA certificate: {e}")))?;
        let info = CertInfo::parse(&cert)?;
        if info.key_fingerprint != key_fingerprint(&key) {
            return Err(PkiError::Invalid(
                "the CA key does not belong to the CA certificate".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&cert, key)
            .map_err(rcgen_err("cannot use the CA certificate"))?;
        Ok(Authority {
            cert,
            cert_pem: cert_pem.to_string(),
            issuer,
        })
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key as PKCS#8 PEM (to keep it; never to send it).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// What enrollment tokens pin.
    pub fn pin(&self) -> CaPin {
        CaPin::of(&self.cert)
    }

    /// A server certificate (and a new key) for the given DNS names and
    /// addresses.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        addresses: &[IpAddr],
        validity: Validity,
    ) -> Result<IssuedServer, PkiError> {
        let key = generate_key()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "kiwi controller");
        dn.push(DnType::OrganizationName, "kiwi");
        params.distinguished_name = dn;
        for name in dns_names {
            let ia5 = name
                .as_str()
                .try_into()
                .map_err(|_| PkiError::Invalid(format!("{name:?} is not a valid DNS name")))?;
            params.subject_alt_names.push(SanType::DnsName(ia5));
        }
        params
            .subject_alt_names
            .extend(addresses.iter().copied().map(SanType::IpAddress));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = self.sign(params, &key, validity)?;
        Ok(IssuedServer {
            cert,
            key_pem: key.serialize_pem(),
        })
    }

    /// A robot's client certificate for the key in `request`.
    pub fn issue_robot(
        &self,
        request: &CertificateRequest,
        robot_id: Uuid,
        validity: Validity,
    ) -> Result<Issued, PkiError> {
        self.issue_robot_for(&request.csr.public_key, robot_id, validity)
    }

    /// A robot's client certificate for a public key (tests use a key pair
    /// directly).
    pub fn issue_robot_for(
        &self,
        public_key: &impl PublicKeyData,
        robot_id: Uuid,
        validity: Validity,
    ) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = robot_name(robot_id);
        let uri = format!("urn:uuid:{robot_id}")
            .try_into()
            .map_err(|_| PkiError::Invalid("the robot id is not ASCII".into()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, public_key, validity)
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        public_key: &impl PublicKeyData,
        validity: Validity,
    ) -> Result<Issued, PkiError> {
        params.not_before = validity.not_before.into();
        params.not_after = validity.not_after.into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(rcgen_err("cannot sign the certificate"))?;
        let info = CertInfo::parse(cert.der())?;
        Ok(Issued {
            pem: cert.pem(),
            der: cert.der().clone(),
            info,
        })
    }
}

/// What kiwi reads out of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The serial number, lower-case hex.
    pub serial: String,
    /// The robot id of a robot certificate (its common name).
    pub robot_id: Option<Uuid>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub key_fingerprint: KeyFingerprint,
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<CertInfo, PkiError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| PkiError::Invalid(format!("cannot read the certificate: {e}")))?;
        let tbs = &cert.tbs_certificate;
        let robot_id = tbs
            .subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .and_then(|cn| Uuid::parse_str(cn).ok());
        let time = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
            } else {
                UNIX_EPOCH
            }
        };
        Ok(CertInfo {
            serial: hex(tbs.raw_serial()),
            robot_id,
            not_before: time(tbs.validity.not_before),
            not_after: time(tbs.validity.not_after),
            key_fingerprint: KeyFingerprint::of(tbs.subject_pki.raw),
        })
    }

    /// Whether less than `fraction` of the validity period is left at `now`
    /// (a certificate past its end counts as due).
    pub fn renewal_due(&self, now: SystemTime, fraction: f64) -> bool {
        let total = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        match self.not_after.duration_since(now) {
            Ok(left) => left.as_secs_f64() < total.as_secs_f64() * fraction,
            Err(_) => true,
        }
    }
}

/// Every certificate in a PEM text, in order.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Invalid(format!("cannot read certificates: {e}")))?;
    if certs.is_empty() {
        return Err(PkiError::Invalid("no certificate in the PEM text".into()));
    }
    Ok(certs)
}

/// A private key from PEM, for rustls.
pub fn private_key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::Invalid(format!("cannot read the private key: {e}")))
}

/// PEM of one DER certificate.
pub fn cert_pem(der: &CertificateDer<'_>) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn year() -> Duration {
        Duration::from_secs(365 * 86_400)
    }

    #[test]
    fn a_ca_issues_robot_and_server_certificates() {
        let now = SystemTime::now();
        let ca = Authority::create("test CA", Validity::starting(now, year())).unwrap();
        let again = Authority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.pin(), ca.pin());

        let robot = Uuid::new_v4();
        let key = generate_key().unwrap();
        let request = CertificateRequest::from_pem(&robot_csr_pem(&key, robot).unwrap()).unwrap();
        assert_eq!(request.key_fingerprint(), key_fingerprint(&key));
        let der_request =
            CertificateRequest::from_der(&robot_csr_der(&key, robot).unwrap()).unwrap();
        assert_eq!(der_request.key_fingerprint(), key_fingerprint(&key));
        let issued = again
            .issue_robot(
                &request,
                robot,
                Validity::starting(now, Duration::from_secs(3600)),
            )
            .unwrap();
        assert_eq!(issued.info.robot_id, Some(robot));
        assert_eq!(issued.info.key_fingerprint, key_fingerprint(&key));
        assert_eq!(issued.info.serial.len(), 32);
        assert_eq!(
            certs_from_pem(&issued.pem).unwrap(),
            vec![issued.der.clone()]
        );
        assert_eq!(cert_pem(&issued.der), issued.pem.replace("\r\n", "\n"));
        assert!(!issued.info.renewal_due(now, 1.0 / 3.0));
        assert!(
            issued
                .info
                .renewal_due(now + Duration::from_secs(3000), 1.0 / 3.0)
        );
        assert!(
            issued
                .info
                .renewal_due(now + Duration::from_secs(7200), 1.0 / 3.0)
        );

        let server = ca
            .issue_server(
                &["localhost".into()],
                &["127.0.0.1".parse().unwrap()],
                Validity::starting(now, year()),
            )
            .unwrap();
        assert_eq!(server.cert.info.robot_id, None);
        assert!(private_key_from_pem(&server.key_pem).is_ok());
    }

    #[test]
    fn a_key_that_is_not_the_cas_is_refused() {
        let v = Validity::starting(SystemTime::now(), year());
        let a = Authority::create("a", v).unwrap();
        let b = Authority::create("b", v).unwrap();
        assert!(Authority::from_pem(a.cert_pem(), &b.key_pem()).is_err());
        assert!(CertificateRequest::from_pem("not a request").is_err());
        assert!(CertificateRequest::from_der(b"\x30\x03\x02\x01\x00").is_err());
        assert!(certs_from_pem("").is_err());
    }
}
