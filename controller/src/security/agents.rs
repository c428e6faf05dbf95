//! Admitting agents: the check every agent connection passes, whatever its
//! transport, before its first frame is read. The TLS handshake has proved
//! that the agent holds the key of the certificate it presented; here the
//! certificate must come from this controller's CA, be within its validity
//! period, name a robot, and not be revoked. Every refusal is logged with
//! the peer, transport and reason, counted in
//! `auth_failures_total{surface="agent",reason}`, and charged to the
//! address's failure budget on the agent port; once that is spent, its
//! refusals say when to try again and are logged at debug level (a valid
//! certificate is admitted whatever the budget).

use super::limits::{AbuseLimits, Surface};
use super::pki::ControllerPki;
use crate::metrics::{Metrics, TransportLabels};
use kiwi_protocol::RobotId;
use kiwi_security::KeyFingerprint;
use kiwi_security::verify::{CertRefusal, check_robot_chain};
use rustls_pki_types::CertificateDer;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// The robot an authenticated connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub robot_id: RobotId,
    /// The certificate's serial (hex), for revocation.
    pub serial: String,
    pub not_after: SystemTime,
    pub key_fingerprint: KeyFingerprint,
}

/// A refused agent: why, and how long it should wait when its address
/// spent its failure budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRefusal {
    pub refusal: CertRefusal,
    pub retry_after: Option<Duration>,
}

/// The agent-side authentication of one controller.
#[derive(Debug)]
pub struct AgentAuth {
    pki: Arc<ControllerPki>,
    limits: Arc<AbuseLimits>,
    metrics: Arc<Metrics>,
    /// Serials of revoked certificates that have not expired.
    revoked: RwLock<HashSet<String>>,
}

impl AgentAuth {
    pub fn new(pki: Arc<ControllerPki>, limits: Arc<AbuseLimits>, metrics: Arc<Metrics>) -> Self {
        AgentAuth {
            pki,
            limits,
            metrics,
            revoked: RwLock::default(),
        }
    }

    pub fn pki(&self) -> &Arc<ControllerPki> {
        &self.pki
    }

    pub fn limits(&self) -> &Arc<AbuseLimits> {
        &self.limits
    }

    /// Checks the certificate chain an agent presented (`None`: none) and
    /// returns whose it is, or logs, counts and returns the refusal.
    pub fn admit(
        &self,
        peer: SocketAddr,
        transport: &'static str,
        chain: Option<&[CertificateDer<'_>]>,
    ) -> Result<Principal, AgentRefusal> {
        let checked = check_robot_chain(
            self.pki.ca_cert(),
            chain.unwrap_or_default(),
            SystemTime::now(),
        )
        .and_then(|info| {
            if self.is_revoked(&info.serial) {
                return Err(CertRefusal::Revoked);
            }
            Ok(Principal {
                robot_id: RobotId(info.robot_id.ok_or(CertRefusal::NoRobotId)?),
                serial: info.serial,
                not_after: info.not_after,
                key_fingerprint: info.key_fingerprint,
            })
        });
        if let Ok(p) = &checked {
            self.metrics
                .agent_handshakes
                .get_or_create(&TransportLabels { transport })
                .inc();
            tracing::debug!(%peer, transport, robot_id = %p.robot_id, "agent authenticated");
        }
        checked.map_err(|refusal| {
            let retry_after = self.refused(peer, transport, &refusal);
            AgentRefusal {
                refusal,
                retry_after,
            }
        })
    }

    /// Logs, counts and charges a refusal of an agent (also used when the
    /// `Hello` names another robot than the certificate); `Some(wait)` when
    /// the address has spent its failure budget on the agent port.
    pub fn refused(
        &self,
        peer: SocketAddr,
        transport: &'static str,
        refusal: &CertRefusal,
    ) -> Option<Duration> {
        self.metrics
            .auth_failed(Surface::Agent.as_str(), refusal.reason());
        self.limits.auth_failed(Surface::Agent, peer.ip());
        let blocked = self.limits.blocked(Surface::Agent, peer.ip());
        if blocked.is_some() {
            tracing::debug!(%peer, transport, reason = refusal.reason(), detail = %refusal, "agent refused (address over its failed-authentication budget)");
        } else {
            tracing::warn!(%peer, transport, reason = refusal.reason(), detail = %refusal, "agent refused");
        }
        blocked
    }

    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(serial)
    }

    /// Adds revoked serials (this controller revoked them).
    pub fn add_revoked(&self, serials: impl IntoIterator<Item = String>) {
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(serials);
    }

    /// Replaces the revoked serials with the store's list; returns the
    /// serials that are new to this controller.
    pub fn set_revoked(&self, serials: Vec<String>) -> Vec<String> {
        let mut revoked = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        let new = serials
            .iter()
            .filter(|s| !revoked.contains(*s))
            .cloned()
            .collect();
        *revoked = serials.into_iter().collect();
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::limits::LimitSettings;
    use crate::security::pki::ServerNames;
    use kiwi_security::pki::{Authority, Validity, generate_key};
    use std::time::Duration;
    use uuid::Uuid;

    fn auth() -> (AgentAuth, tempfile::TempDir, Arc<Metrics>) {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let pki = ControllerPki::load_or_create(
            dir.path(),
            ServerNames::from_config(&[]),
            SystemTime::now(),
        )
        .unwrap();
        let limits = Arc::new(AbuseLimits::new(LimitSettings::default(), metrics.clone()));
        (
            AgentAuth::new(Arc::new(pki), limits, metrics.clone()),
            dir,
            metrics,
        )
    }

    #[test]
    fn admits_its_robots_and_refuses_the_rest_with_a_reason() {
        let (auth, _dir, metrics) = auth();
        let peer: SocketAddr = "10.88.0.9:40000".parse().unwrap();
        let now = SystemTime::now();
        let robot = Uuid::new_v4();
        let key = generate_key().unwrap();
        let cert = auth
            .pki()
            .ca()
            .issue_robot_for(
                &key,
                robot,
                Validity::starting(now, Duration::from_secs(600)),
            )
            .unwrap();
        let p = auth
            .admit(peer, "quic", Some(std::slice::from_ref(&cert.der)))
            .unwrap();
        assert_eq!(p.robot_id, RobotId(robot));
        assert_eq!(p.serial, cert.info.serial);

        assert_eq!(
            auth.admit(peer, "websocket", None).map_err(|r| r.refusal),
            Err(CertRefusal::NoCertificate)
        );
        let other =
            Authority::create("x", Validity::starting(now, Duration::from_secs(600))).unwrap();
        let foreign = other
            .issue_robot_for(
                &key,
                robot,
                Validity::starting(now, Duration::from_secs(600)),
            )
            .unwrap();
        assert_eq!(
            auth.admit(peer, "websocket", Some(&[foreign.der]))
                .map_err(|r| r.refusal),
            Err(CertRefusal::UnknownCa)
        );
        auth.add_revoked([cert.info.serial.clone()]);
        assert_eq!(
            auth.admit(peer, "quic", Some(std::slice::from_ref(&cert.der)))
                .map_err(|r| r.refusal),
            Err(CertRefusal::Revoked)
        );
        assert_eq!(auth.set_revoked(vec![]), Vec::<String>::new());
        assert!(
            auth.admit(peer, "quic", Some(std::slice::from_ref(&cert.der)))
                .is_ok()
        );
        assert_eq!(
            auth.set_revoked(vec![cert.info.serial.clone()]),
            vec![cert.info.serial]
        );

        let text = metrics.encode();
        for line in [
            "auth_failures_total{surface=\"agent\",reason=\"no_certificate\"} 1",
            "auth_failures_total{surface=\"agent\",reason=\"unknown_ca\"} 1",
            "auth_failures_total{surface=\"agent\",reason=\"revoked\"} 1",
            "agent_handshakes_total{transport=\"quic\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }
}
