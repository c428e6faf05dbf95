//! The controller's certificate authority and server certificate, kept in
//! `<state_dir>/tls/`: created on first start, the server certificate
//! renewed before it expires (and whenever the configured names change),
//! served through a resolver so that a renewal takes over without a
//! restart. Keys are written with mode 0600, atomically.

use anyhow::Context as _;
use kiwi_security::CaPin;
use kiwi_security::pki::{Authority, CertInfo, Validity, certs_from_pem, private_key_from_pem};
use kiwi_security::verify::{self, certified_key};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// The directory under the state directory.
pub const TLS_DIR: &str = "tls";
const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const SERVER_CERT: &str = "server.pem";
const SERVER_KEY: &str = "server.key";

/// How long the CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long a server certificate is valid.
pub const SERVER_VALIDITY: Duration = Duration::from_secs(90 * 86_400);
/// A certificate is renewed once less than this share of its life is left.
pub const RENEW_FRACTION: f64 = 1.0 / 3.0;

/// The names and addresses the server certificate lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerNames {
    pub dns: Vec<String>,
    pub addresses: Vec<IpAddr>,
}

impl ServerNames {
    /// From configured entries: addresses where they parse, DNS names
    /// otherwise; `localhost` and the loopback addresses are always there.
    pub fn from_config(entries: &[String]) -> ServerNames {
        let mut names = ServerNames {
            dns: vec!["localhost".into()],
            addresses: vec![
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            ],
        };
        for entry in entries {
            let entry = entry.trim();
            match entry.parse::<IpAddr>() {
                Ok(ip) if !names.addresses.contains(&ip) => names.addresses.push(ip),
                Ok(_) => {}
                Err(_) if !entry.is_empty() && !names.dns.iter().any(|d| d == entry) => {
                    names.dns.push(entry.to_string());
                }
                Err(_) => {}
            }
        }
        names
    }
}

/// The CA, and the server certificate currently served.
#[derive(Debug)]
pub struct ControllerPki {
    dir: PathBuf,
    ca: Authority,
    names: ServerNames,
    server: RwLock<Served>,
}

#[derive(Debug)]
struct Served {
    key: Arc<CertifiedKey>,
    info: CertInfo,
}

impl ControllerPki {
    /// Loads the CA and server certificate from `<state_dir>/tls`, creating
    /// what is missing and renewing a server certificate that is due or
    /// lists other names.
    pub fn load_or_create(
        state_dir: &Path,
        names: ServerNames,
        now: SystemTime,
    ) -> anyhow::Result<ControllerPki> {
        kiwi_security::install_crypto_provider();
        let dir = state_dir.join(TLS_DIR);
        kiwi_security::files::private_dir(&dir)?;
        let ca = Self::load_or_create_ca(&dir, now)?;
        let served = match Self::load_server(&dir) {
            Ok(Some((served, listed))) if listed == names && !due(&served.info, now) => served,
            Ok(found) => {
                if found.is_some() {
                    tracing::info!(
                        "server certificate due for renewal or names changed; issuing a new one"
                    );
                }
                issue_server(&dir, &ca, &names, now)?
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "the stored server certificate is unusable; issuing a new one"
                );
                issue_server(&dir, &ca, &names, now)?
            }
        };
        tracing::info!(
            ca_pin = %ca.pin(),
            server_not_after = ?served.info.not_after,
            dir = %dir.display(),
            "controller CA ready"
        );
        Ok(ControllerPki {
            dir,
            ca,
            names,
            server: RwLock::new(served),
        })
    }

    /// Loads the CA only (the `token` commands need its pin and nothing
    /// else), creating it if missing.
    pub fn load_or_create_ca_only(state_dir: &Path, now: SystemTime) -> anyhow::Result<Authority> {
        let dir = state_dir.join(TLS_DIR);
        kiwi_security::files::private_dir(&dir)?;
        Self::load_or_create_ca(&dir, now)
    }

    fn load_or_create_ca(dir: &Path, now: SystemTime) -> anyhow::Result<Authority> {
        let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let cert = read(&cert_path)?;
                let key = read(&key_path)?;
                Authority::from_pem(&cert, &key)
                    .with_context(|| format!("cannot use the CA in {}", dir.display()))
            }
            (false, false) => {
                let ca = Authority::create(
                    &format!("kiwi controller CA {}", uuid::Uuid::new_v4().simple()),
                    Validity::starting(now, CA_VALIDITY),
                )?;
                // The key first: a CA certificate without its key is useless
                // and would stop the next start.
                write_private(&key_path, &ca.key_pem())?;
                write_private(&cert_path, ca.cert_pem())?;
                tracing::info!(ca_pin = %ca.pin(), "created the controller CA");
                Ok(ca)
            }
            (cert, _) => anyhow::bail!(
                "{} exists but {} does not: restore the missing file, or remove {} to create \
                 a new CA (every robot must then enroll again)",
                if cert {
                    cert_path.display()
                } else {
                    key_path.display()
                },
                if cert {
                    key_path.display()
                } else {
                    cert_path.display()
                },
                dir.display()
            ),
        }
    }

    fn load_server(dir: &Path) -> anyhow::Result<Option<(Served, ServerNames)>> {
        let (cert_path, key_path) = (dir.join(SERVER_CERT), dir.join(SERVER_KEY));
        if !cert_path.exists() || !key_path.exists() {
            return Ok(None);
        }
        let chain = certs_from_pem(&read(&cert_path)?)?;
        let key = private_key_from_pem(&read(&key_path)?)?;
        let info = CertInfo::parse(&chain[0])?;
        let listed = names_of(&chain[0])?;
        let key = certified_key(chain, &key)?;
        Ok(Some((Served { key, info }, listed)))
    }

    /// The CA certificate.
    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        self.ca.cert_der()
    }

    pub fn ca(&self) -> &Authority {
        &self.ca
    }

    pub fn pin(&self) -> CaPin {
        self.ca.pin()
    }

    /// When the served server certificate expires.
    pub fn server_not_after(&self) -> SystemTime {
        self.server
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .info
            .not_after
    }

    /// Renews the server certificate if it is due at `now`; true when it
    /// did.
    pub fn renew_if_due(&self, now: SystemTime) -> anyhow::Result<bool> {
        if !due(
            &self.server.read().unwrap_or_else(|p| p.into_inner()).info,
            now,
        ) {
            return Ok(false);
        }
        let served = issue_server(&self.dir, &self.ca, &self.names, now)?;
        tracing::info!(not_after = ?served.info.not_after, "server certificate renewed");
        *self.server.write().unwrap_or_else(|p| p.into_inner()) = served;
        Ok(true)
    }

    /// The rustls settings of the agent port for `alpn`.
    pub fn server_config(self: &Arc<Self>, alpn: &[u8]) -> rustls::ServerConfig {
        verify::server_config(Arc::new(Resolver(self.clone())), self.ca.cert_der(), alpn)
    }
}

/// Serves whatever server certificate is current.
#[derive(Debug)]
struct Resolver(Arc<ControllerPki>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .server
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .key
                .clone(),
        )
    }
}

fn due(info: &CertInfo, now: SystemTime) -> bool {
    info.renewal_due(now, RENEW_FRACTION)
}

fn issue_server(
    dir: &Path,
    ca: &Authority,
    names: &ServerNames,
    now: SystemTime,
) -> anyhow::Result<Served> {
    let issued = ca.issue_server(
        &names.dns,
        &names.addresses,
        Validity::starting(now, SERVER_VALIDITY),
    )?;
    let chain_pem = format!("{}{}", issued.cert.pem, ca.cert_pem());
    write_private(&dir.join(SERVER_KEY), &issued.key_pem)?;
    write_private(&dir.join(SERVER_CERT), &chain_pem)?;
    let key = certified_key(
        vec![issued.cert.der.clone(), ca.cert_der().clone()],
        &private_key_from_pem(&issued.key_pem)?,
    )?;
    Ok(Served {
        key,
        info: issued.cert.info,
    })
}

/// The DNS names and addresses a certificate lists.
fn names_of(der: &[u8]) -> anyhow::Result<ServerNames> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("cannot read the server certificate: {e}"))?;
    let mut names = ServerNames {
        dns: Vec::new(),
        addresses: Vec::new(),
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => names.dns.push((*d).to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => names.addresses.push(IpAddr::from(<[u8; 4]>::try_from(*b)?)),
                    16 => names
                        .addresses
                        .push(IpAddr::from(<[u8; 16]>::try_from(*b)?)),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(names)
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Writes a private file (see [`kiwi_security::files`]).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    Ok(kiwi_security::files::write_private(path, text)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_ca_is_created_once_and_kept_private() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let names = ServerNames::from_config(&["ctl.lan".into(), "10.88.0.1".into()]);
        let first = ControllerPki::load_or_create(dir.path(), names.clone(), now).unwrap();
        let tls = dir.path().join(TLS_DIR);
        assert_eq!(mode(&tls), 0o700);
        for file in [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY] {
            assert_eq!(mode(&tls.join(file)), 0o600, "{file}");
        }
        let not_after = first.server_not_after();
        let again = ControllerPki::load_or_create(dir.path(), names.clone(), now).unwrap();
        assert_eq!(again.pin(), first.pin(), "the CA is kept");
        assert_eq!(
            again.server_not_after(),
            not_after,
            "a valid server cert is kept"
        );
        assert_eq!(
            names_of(&again.server.read().unwrap().key.cert[0]).unwrap(),
            names
        );

        // Other names: a new server certificate from the same CA.
        let other = ServerNames::from_config(&["ctl2.lan".into()]);
        let renamed = ControllerPki::load_or_create(dir.path(), other, now).unwrap();
        assert_eq!(renamed.pin(), first.pin());
        assert_ne!(
            renamed.server.read().unwrap().info.serial,
            again.server.read().unwrap().info.serial
        );
    }

    #[test]
    fn the_server_certificate_is_renewed_before_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let pki = Arc::new(
            ControllerPki::load_or_create(dir.path(), ServerNames::from_config(&[]), now).unwrap(),
        );
        assert!(
            !pki.renew_if_due(now + Duration::from_secs(30 * 86_400))
                .unwrap()
        );
        let later = now + Duration::from_secs(70 * 86_400);
        assert!(pki.renew_if_due(later).unwrap());
        assert!(pki.server_not_after() > later + Duration::from_secs(80 * 86_400));
        // A restart at that time keeps the renewed one.
        let again = ControllerPki::load_or_create(dir.path(), ServerNames::from_config(&[]), later)
            .unwrap();
        assert_eq!(again.server_not_after(), pki.server_not_after());
    }

    #[test]
    fn a_half_missing_ca_is_an_error_not_a_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        ControllerPki::load_or_create_ca_only(dir.path(), now).unwrap();
        std::fs::remove_file(dir.path().join(TLS_DIR).join(CA_KEY)).unwrap();
        let e = ControllerPki::load_or_create_ca_only(dir.path(), now).unwrap_err();
        assert!(format!("{e:#}").contains("does not"), "{e:#}");
    }
}
