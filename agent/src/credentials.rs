//! The robot's TLS identity, in `<state_dir>/tls/`: its private key
//! (`robot.key`, made on the robot, mode 0600, never sent anywhere), its
//! client certificate (`robot.pem`), and the controller CA it trusts
//! (`controller-ca.pem`, stored at enrollment).
//!
//! The certificate is served to TLS through a resolver, so a renewal
//! ([`Credentials::install`]) takes effect on the next connection of every
//! transport.

use anyhow::Context as _;
use kiwi_security::KeyFingerprint;
use kiwi_security::pki::{
    CertInfo, cert_pem, certs_from_pem, generate_key, key_fingerprint, key_from_pem, robot_csr_der,
};
use kiwi_security::verify::{self, ControllerTrust, ControllerVerifier, check_robot_chain};
use rcgen::KeyPair;
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;
use uuid::Uuid;

pub const TLS_DIR: &str = "tls";
const KEY_FILE: &str = "robot.key";
const CERT_FILE: &str = "robot.pem";
const CA_FILE: &str = "controller-ca.pem";

/// A certificate is renewed once less than this share of its life is left.
pub const RENEW_FRACTION: f64 = 1.0 / 3.0;

/// The directory of the TLS files, created with mode 0700.
pub fn tls_dir(state_dir: &Path) -> anyhow::Result<PathBuf> {
    let dir = state_dir.join(TLS_DIR);
    kiwi_security::files::private_dir(&dir)?;
    Ok(dir)
}

/// The robot's key: read, or made once and kept (mode 0600).
pub fn load_or_create_key(state_dir: &Path) -> anyhow::Result<KeyPair> {
    let path = tls_dir(state_dir)?.join(KEY_FILE);
    if path.exists() {
        let pem = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return key_from_pem(&pem)
            .with_context(|| format!("{} is not a usable key", path.display()));
    }
    let key = generate_key()?;
    write_private(&path, &key.serialize_pem())?;
    tracing::info!(key_fingerprint = %key_fingerprint(&key), "made the robot's key");
    Ok(key)
}

/// The robot's enrolled identity.
#[derive(Debug)]
pub struct Credentials {
    dir: PathBuf,
    key: KeyPair,
    ca: CertificateDer<'static>,
    current: RwLock<Current>,
}

#[derive(Debug)]
struct Current {
    info: CertInfo,
    certified: Arc<CertifiedKey>,
}

impl Credentials {
    /// The stored credentials, or `None` when the robot has not enrolled.
    pub fn load(state_dir: &Path) -> anyhow::Result<Option<Credentials>> {
        let dir = state_dir.join(TLS_DIR);
        let (key, cert, ca) = (dir.join(KEY_FILE), dir.join(CERT_FILE), dir.join(CA_FILE));
        if !cert.exists() || !ca.exists() || !key.exists() {
            return Ok(None);
        }
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let key = key_from_pem(&read(&key)?)?;
        let ca = certs_from_pem(&read(&ca)?)?.remove(0);
        let chain = certs_from_pem(&read(&cert)?)?;
        let current = current(&key, &ca, chain, None)
            .with_context(|| format!("the certificate in {} is not usable", dir.display()))?;
        Ok(Some(Credentials {
            dir,
            key,
            ca,
            current: RwLock::new(current),
        }))
    }

    /// Stores what enrollment gave: the certificate for `key` and the CA
    /// that issued it.
    pub fn store(
        state_dir: &Path,
        key: KeyPair,
        cert: CertificateDer<'static>,
        ca: CertificateDer<'static>,
    ) -> anyhow::Result<Credentials> {
        let dir = tls_dir(state_dir)?;
        let current = current(&key, &ca, vec![cert.clone()], None)?;
        write_private(&dir.join(CA_FILE), &cert_pem(&ca))?;
        write_private(&dir.join(CERT_FILE), &cert_pem(&cert))?;
        Ok(Credentials {
            dir,
            key,
            ca,
            current: RwLock::new(current),
        })
    }

    fn current(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The robot id the certificate names.
    pub fn robot_id(&self) -> Option<Uuid> {
        self.current().info.robot_id
    }

    pub fn key_fingerprint(&self) -> KeyFingerprint {
        key_fingerprint(&self.key)
    }

    pub fn not_after(&self) -> SystemTime {
        self.current().info.not_after
    }

    /// The serial of the certificate in use (hex).
    pub fn serial(&self) -> String {
        self.current().info.serial.clone()
    }

    /// Whether the certificate should be renewed at `now`.
    pub fn renewal_due(&self, now: SystemTime) -> bool {
        self.current().info.renewal_due(now, RENEW_FRACTION)
    }

    /// A certificate request for the same key and robot (DER), to send
    /// over the link.
    pub fn renewal_request(&self) -> anyhow::Result<Vec<u8>> {
        let robot = self.robot_id().context("the certificate names no robot")?;
        Ok(robot_csr_der(&self.key, robot)?)
    }

    /// Checks and installs a renewed certificate: issued by the stored CA
    /// for this key and robot, valid now. Stored before it is used.
    pub fn install(&self, cert: CertificateDer<'static>) -> anyhow::Result<()> {
        let robot = self.robot_id();
        let next = current(&self.key, &self.ca, vec![cert.clone()], robot)?;
        write_private(&self.dir.join(CERT_FILE), &cert_pem(&cert))?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    /// TLS settings for `alpn` that trust the stored CA and present the
    /// current certificate.
    pub fn client_config(self: &Arc<Self>, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
        Arc::new(verify::client_config_with(
            ControllerVerifier::new(ControllerTrust::Ca(self.ca.clone())),
            Arc::new(Resolver(self.clone())),
            alpn,
        ))
    }
}

/// Checks a certificate against the key, CA and robot, and makes it
/// servable.
fn current(
    key: &KeyPair,
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    robot: Option<Uuid>,
) -> anyhow::Result<Current> {
    let info = CertInfo::parse(&chain[0])?;
    if info.key_fingerprint != key_fingerprint(key) {
        anyhow::bail!("the certificate is not for the robot's key");
    }
    if let Some(robot) = robot
        && info.robot_id != Some(robot)
    {
        anyhow::bail!("the certificate names another robot");
    }
    // An expired certificate is still loaded (the controller will say so
    // and the operator re-enrolls); one from another CA is not.
    match check_robot_chain(ca, &chain, SystemTime::now()) {
        Ok(_) | Err(verify::CertRefusal::Expired | verify::CertRefusal::NotYetValid) => {}
        Err(e) => anyhow::bail!("{e}"),
    }
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let certified = verify::certified_key(chain, &private)?;
    Ok(Current { info, certified })
}

#[derive(Debug)]
struct Resolver(Arc<Credentials>);

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Writes a private file (see [`kiwi_security::files`]).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    Ok(kiwi_security::files::write_private(path, text)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiwi_security::pki::{Authority, Validity};
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::Duration;

    #[test]
    fn credentials_are_kept_checked_and_renewed() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let ca =
            Authority::create("ca", Validity::starting(now, Duration::from_secs(86_400))).unwrap();
        assert!(Credentials::load(dir.path()).unwrap().is_none());
        let key = load_or_create_key(dir.path()).unwrap();
        let again = load_or_create_key(dir.path()).unwrap();
        assert_eq!(
            key_fingerprint(&key),
            key_fingerprint(&again),
            "the key is made once"
        );
        let mode = |f: &str| {
            std::fs::metadata(dir.path().join(TLS_DIR).join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(KEY_FILE), 0o600);

        let robot = Uuid::new_v4();
        let hour = Validity::starting(now, Duration::from_secs(3600));
        let cert = ca.issue_robot_for(&key, robot, hour).unwrap();
        let creds = Credentials::store(dir.path(), key, cert.der, ca.cert_der().clone()).unwrap();
        assert_eq!(creds.robot_id(), Some(robot));
        assert!(!creds.renewal_due(now));
        assert!(creds.renewal_due(now + Duration::from_secs(3000)));

        // A renewal for the same key installs and persists.
        let creds = Arc::new(Credentials::load(dir.path()).unwrap().unwrap());
        let request =
            kiwi_security::pki::CertificateRequest::from_der(&creds.renewal_request().unwrap())
                .unwrap();
        let renewed = ca
            .issue_robot(
                &request,
                robot,
                Validity::starting(now, Duration::from_secs(7200)),
            )
            .unwrap();
        creds.install(renewed.der.clone()).unwrap();
        assert_eq!(creds.serial(), renewed.info.serial);
        assert_eq!(
            Credentials::load(dir.path()).unwrap().unwrap().serial(),
            renewed.info.serial
        );
        let _config = creds.client_config(verify::ALPN_HTTP1);

        // Not for this key, or for another robot: refused, nothing changes.
        let other_key = generate_key().unwrap();
        let foreign = ca.issue_robot_for(&other_key, robot, hour).unwrap();
        assert!(creds.install(foreign.der).is_err());
        let other_robot = ca
            .issue_robot_for(&creds.key, Uuid::new_v4(), hour)
            .unwrap();
        assert!(creds.install(other_robot.der).is_err());
        assert_eq!(creds.serial(), renewed.info.serial);
    }
}
