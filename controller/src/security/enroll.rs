//! Enrollment: how a robot gets its client certificate.
//!
//! - With a token (`kiwi-controller token create`): the agent checks the
//!   controller against the token's CA pin before it says anything, then
//!   sends the token, its certificate request and identity; the token is
//!   used up atomically and the certificate issued at once.
//! - Without a token: the request is recorded as pending (robot identity,
//!   key fingerprint, source address) for an operator to approve or reject
//!   (`/api/v2/enrollments`); the agent asks again until it is decided.
//!
//! Certificates are issued for the robot id of the identity (which must
//! match its hardware identity), for `client_cert_ttl`, and recorded with
//! their serial so that decommissioning can revoke them. Agents renew over
//! their authenticated link ([`Enroller::renew`]).

use super::agents::Principal;
use super::limits::AbuseLimits;
use super::pki::ControllerPki;
use crate::metrics::{Metrics, ResultLabels};
use crate::store::auth::{AuthStore, CertificateRecord, EnrollmentStatus, TokenUse};
use chrono::{DateTime, Utc};
use kiwi_protocol::RobotId;
use kiwi_security::enroll::{EnrollRequest, EnrollResponse};
use kiwi_security::pki::{CertificateRequest, Issued, Validity, unix_ms};
use kiwi_security::token::EnrollmentToken;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How long a pending agent waits before asking again.
pub const PENDING_RETRY: Duration = Duration::from_secs(5);

/// Why an enrollment was refused; the transport turns it into a status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollError {
    pub kind: EnrollErrorKind,
    /// Machine-readable, also the metric label.
    pub reason: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollErrorKind {
    /// The request itself is malformed (400).
    BadRequest,
    /// The token is not good (401).
    Unauthorized,
    /// An operator rejected the robot (403).
    Forbidden,
    /// Too many attempts from this address (429, retry after).
    TooMany(Duration),
    /// The store cannot answer now (503).
    Unavailable,
}

impl EnrollError {
    fn new(kind: EnrollErrorKind, reason: &'static str, detail: impl Into<String>) -> Self {
        EnrollError {
            kind,
            reason,
            detail: detail.into(),
        }
    }

    fn store(e: impl std::fmt::Display) -> Self {
        EnrollError::new(
            EnrollErrorKind::Unavailable,
            "store_unavailable",
            format!("cannot record the enrollment now: {e}"),
        )
    }
}

/// Issues robots their certificates.
#[derive(Debug)]
pub struct Enroller {
    pub store: Arc<dyn AuthStore>,
    pub pki: Arc<ControllerPki>,
    pub limits: Arc<AbuseLimits>,
    pub metrics: Arc<Metrics>,
    /// Validity of a robot's certificate.
    pub cert_ttl: Duration,
}

fn utc(t: SystemTime) -> DateTime<Utc> {
    DateTime::<Utc>::from(t)
}

impl Enroller {
    /// Answers one `POST /enroll` body from `peer`.
    pub async fn enroll(
        &self,
        peer: SocketAddr,
        body: &[u8],
    ) -> Result<EnrollResponse, EnrollError> {
        let answer = self.enroll_inner(peer, body).await;
        let result = match &answer {
            Ok(EnrollResponse::Issued { robot_id, .. }) => {
                tracing::info!(%peer, %robot_id, "robot enrolled: certificate issued");
                "issued"
            }
            Ok(EnrollResponse::Pending {
                enrollment_id,
                key_fingerprint,
                ..
            }) => {
                tracing::info!(%peer, %enrollment_id, key_fingerprint, "enrollment waits for an operator");
                "pending"
            }
            Err(e) => {
                if matches!(
                    e.kind,
                    EnrollErrorKind::Unauthorized | EnrollErrorKind::Forbidden
                ) {
                    self.metrics.auth_failed("enroll", e.reason);
                    self.limits.auth_failed(peer.ip());
                }
                tracing::warn!(%peer, reason = e.reason, detail = %e.detail, "enrollment refused");
                "refused"
            }
        };
        self.metrics
            .enrollments
            .get_or_create(&ResultLabels { result })
            .inc();
        answer
    }

    async fn enroll_inner(
        &self,
        peer: SocketAddr,
        body: &[u8],
    ) -> Result<EnrollResponse, EnrollError> {
        use EnrollErrorKind::*;
        if let Err(wait) = self.limits.allow_enrollment(peer.ip()) {
            return Err(EnrollError::new(
                TooMany(wait),
                "rate_limited",
                format!(
                    "too many enrollment attempts from {}; try again later",
                    peer.ip()
                ),
            ));
        }
        let request: EnrollRequest = serde_json::from_slice(body).map_err(|e| {
            EnrollError::new(
                BadRequest,
                "invalid_request",
                format!("invalid enrollment request: {e}"),
            )
        })?;
        crate::link::check_identity(&request.identity)
            .map_err(|d| EnrollError::new(BadRequest, "bad_identity", d))?;
        let csr = CertificateRequest::from_pem(&request.csr_pem)
            .map_err(|e| EnrollError::new(BadRequest, "invalid_csr", e.to_string()))?;
        let robot_id = request.identity.robot_id;
        let now = SystemTime::now();
        match request.token.as_deref() {
            Some(text) => {
                let token: EnrollmentToken =
                    text.parse()
                        .map_err(|e: kiwi_security::token::TokenFormatError| {
                            EnrollError::new(Unauthorized, "invalid_token", e.to_string())
                        })?;
                if token.ca_pin != self.pki.pin() {
                    return Err(EnrollError::new(
                        Unauthorized,
                        "wrong_ca",
                        "the token pins another controller's CA",
                    ));
                }
                let used = self
                    .store
                    .use_enrollment_token(&token.id, &token.secret_hash(), utc(now))
                    .await
                    .map_err(EnrollError::store)?;
                let (reason, detail) = match used {
                    TokenUse::Accepted { .. } => return self.issue(&csr, robot_id, now).await,
                    TokenUse::Unknown => ("unknown_token", "no such enrollment token"),
                    TokenUse::WrongSecret => ("invalid_token", "the token's secret is wrong"),
                    TokenUse::Expired => ("expired_token", "the enrollment token has expired"),
                    TokenUse::UsedUp => ("used_token", "the enrollment token was already used"),
                    TokenUse::Revoked => ("revoked_token", "the enrollment token was revoked"),
                };
                Err(EnrollError::new(Unauthorized, reason, detail))
            }
            None => {
                let identity = serde_json::to_value(&request.identity).unwrap_or_default();
                let fingerprint = csr.key_fingerprint().to_string();
                let record = self
                    .store
                    .note_enrollment(
                        robot_id,
                        &fingerprint,
                        &identity,
                        &peer.ip().to_string(),
                        utc(now),
                    )
                    .await
                    .map_err(EnrollError::store)?;
                match record.status {
                    EnrollmentStatus::Pending => Ok(EnrollResponse::Pending {
                        enrollment_id: record.id,
                        key_fingerprint: fingerprint,
                        retry_after_s: u32::try_from(PENDING_RETRY.as_secs()).unwrap_or(5),
                    }),
                    EnrollmentStatus::Rejected => Err(EnrollError::new(
                        Forbidden,
                        "rejected",
                        "an operator rejected this robot's enrollment",
                    )),
                    EnrollmentStatus::Approved | EnrollmentStatus::Issued => {
                        let issued = self.issue(&csr, robot_id, now).await?;
                        if record.status == EnrollmentStatus::Approved {
                            self.store
                                .decide_enrollment(
                                    record.id,
                                    EnrollmentStatus::Issued,
                                    "controller",
                                    utc(now),
                                )
                                .await
                                .map_err(EnrollError::store)?;
                        }
                        Ok(issued)
                    }
                }
            }
        }
    }

    async fn issue(
        &self,
        csr: &CertificateRequest,
        robot_id: RobotId,
        now: SystemTime,
    ) -> Result<EnrollResponse, EnrollError> {
        let issued = self.issue_cert(csr, robot_id, now).await?;
        Ok(EnrollResponse::Issued {
            robot_id: robot_id.0,
            certificate_pem: issued.pem,
            ca_pem: self.pki.ca().cert_pem().to_string(),
            not_after_ms: unix_ms(issued.info.not_after),
        })
    }

    /// Signs and records a certificate for `robot_id`.
    async fn issue_cert(
        &self,
        csr: &CertificateRequest,
        robot_id: RobotId,
        now: SystemTime,
    ) -> Result<Issued, EnrollError> {
        let issued = self
            .pki
            .ca()
            .issue_robot(csr, robot_id.0, Validity::starting(now, self.cert_ttl))
            .map_err(|e| {
                EnrollError::new(EnrollErrorKind::BadRequest, "invalid_csr", e.to_string())
            })?;
        self.store
            .insert_certificate(&CertificateRecord {
                serial: issued.info.serial.clone(),
                robot_id,
                key_fingerprint: issued.info.key_fingerprint.to_string(),
                not_before: utc(issued.info.not_before),
                not_after: utc(issued.info.not_after),
                issued_at: utc(now),
                revoked_at: None,
            })
            .await
            .map_err(EnrollError::store)?;
        self.metrics.certificates_issued.inc();
        Ok(issued)
    }

    /// A new certificate for an authenticated agent (renewal over its
    /// link), for the robot its current certificate names.
    pub async fn renew(
        &self,
        principal: &Principal,
        csr_der: &[u8],
    ) -> Result<Issued, EnrollError> {
        let csr = CertificateRequest::from_der(csr_der).map_err(|e| {
            EnrollError::new(EnrollErrorKind::BadRequest, "invalid_csr", e.to_string())
        })?;
        let issued = self
            .issue_cert(&csr, principal.robot_id, SystemTime::now())
            .await?;
        tracing::info!(robot_id = %principal.robot_id, serial = %issued.info.serial, "robot certificate renewed");
        Ok(issued)
    }
}
