//! Enrollment: how a robot gets its client certificate.
//!
//! - With a token (`kiwi-controller token create`): the agent checks the
//!   controller against the token's CA pin before it says anything, then
//!   sends the token, its certificate request and identity; the token is
//!   used up atomically and the certificate issued at once. A token made
//!   for one robot (`--robot`) enrolls that robot only.
//! - Without a token: the request is recorded as pending (robot identity,
//!   key fingerprint, source address) for an operator to approve or reject
//!   (`/api/v2/enrollments`); the agent asks again until it is decided.
//!   Pending requests are capped in total and per address and forgotten
//!   when nobody asked about them for a while.
//! - A token that is not made for the robot, for a robot id that already
//!   holds a valid certificate, takes nothing over: the request waits for
//!   an operator like one without a token (with the reason), the token
//!   keeps its use, and the robot's connected agent is untouched
//!   (`enrollments_total{result="held"}`, a warning in the log).
//!
//! A request is issued once: asked again after it was issued (or after the
//! robot was decommissioned, which ends its requests), it waits for an
//! operator again. A certificate issued by a token or an approval replaces
//! the robot's others (they are revoked and their sessions ended: a robot
//! has one key), and a robot already in the log gets a `robot_enrolled`
//! event saying how (token or approval, and by whom).
//!
//! Certificates are issued for the robot id of the identity (which must
//! match its hardware identity), for `client_cert_ttl`, and recorded with
//! their serial so that decommissioning can revoke them. Agents renew over
//! their authenticated link ([`Enroller::renew`]).

use super::agents::{AgentAuth, Principal};
use super::limits::{AbuseLimits, Surface};
use super::pki::ControllerPki;
use crate::domain::{EnrolledVia, Enrollment, Input, Refusal};
use crate::fleet::{Context, Fleet, FleetError};
use crate::metrics::{Metrics, ResultLabels};
use crate::sessions::SessionRegistry;
use crate::store::auth::{
    AuthStore, CertificateRecord, EnrollmentRecord, EnrollmentStatus, NewEnrollment, Noted,
    PendingCap, PendingLimits, TokenUse,
};
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

/// How long an agent refused for too many pending requests waits.
pub const PENDING_FULL_RETRY: Duration = Duration::from_secs(60);

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
    /// Too many attempts from this address, or too many requests waiting
    /// (429, retry after).
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
    /// Told about certificates a new enrollment replaces.
    pub agent_auth: Arc<AgentAuth>,
    /// Records `robot_enrolled`.
    pub fleet: Fleet,
    /// The connected agents: the sessions of replaced certificates end.
    pub sessions: Arc<SessionRegistry>,
    /// Validity of a robot's certificate.
    pub cert_ttl: Duration,
    /// Caps on requests waiting for an operator.
    pub pending: PendingLimits,
}

fn utc(t: SystemTime) -> DateTime<Utc> {
    DateTime::<Utc>::from(t)
}

/// What an enrollment request is, once read and checked.
struct Checked {
    peer: SocketAddr,
    request: EnrollRequest,
    csr: CertificateRequest,
    fingerprint: String,
    now: SystemTime,
}

impl Checked {
    fn robot_id(&self) -> RobotId {
        self.request.identity.robot_id
    }
}

/// Whether the answer to a request is a certificate, a wait, or a wait
/// that held back a token (for the metric and the log).
enum Answer {
    Issued(EnrollResponse),
    Pending(EnrollResponse),
    Held(EnrollResponse),
}

impl Enroller {
    /// Answers one `POST /enroll` body from `peer`.
    pub async fn enroll(
        &self,
        peer: SocketAddr,
        body: &[u8],
    ) -> Result<EnrollResponse, EnrollError> {
        let mut answer = self.enroll_inner(peer, body).await;
        let result = match &mut answer {
            Ok(Answer::Issued(r)) => {
                if let EnrollResponse::Issued { robot_id, .. } = r {
                    tracing::info!(%peer, %robot_id, "robot enrolled: certificate issued");
                }
                "issued"
            }
            Ok(Answer::Pending(r) | Answer::Held(r)) => {
                if let EnrollResponse::Pending {
                    enrollment_id,
                    key_fingerprint,
                    ..
                } = r
                {
                    tracing::info!(%peer, %enrollment_id, key_fingerprint, "enrollment waits for an operator");
                }
                if matches!(answer, Ok(Answer::Held(_))) {
                    "held"
                } else {
                    "pending"
                }
            }
            Err(e) => {
                let failed = matches!(
                    e.kind,
                    EnrollErrorKind::Unauthorized | EnrollErrorKind::Forbidden
                );
                let blocked = failed.then(|| {
                    self.metrics.auth_failed(Surface::Enroll.as_str(), e.reason);
                    self.limits.auth_failed(Surface::Enroll, peer.ip());
                    self.limits.blocked(Surface::Enroll, peer.ip())
                });
                match blocked.flatten() {
                    // Over the address's budget: told to wait, quietly.
                    Some(wait) => {
                        e.kind = EnrollErrorKind::TooMany(wait);
                        e.detail = format!(
                            "{}; too many failed enrollments from this address",
                            e.detail
                        );
                        tracing::debug!(%peer, reason = e.reason, detail = %e.detail, "enrollment refused");
                    }
                    None => {
                        tracing::warn!(%peer, reason = e.reason, detail = %e.detail, "enrollment refused");
                    }
                }
                "refused"
            }
        };
        self.metrics
            .enrollments
            .get_or_create(&ResultLabels { result })
            .inc();
        answer.map(|a| match a {
            Answer::Issued(r) | Answer::Pending(r) | Answer::Held(r) => r,
        })
    }

    async fn enroll_inner(&self, peer: SocketAddr, body: &[u8]) -> Result<Answer, EnrollError> {
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
        request
            .identity
            .check()
            .map_err(|d| EnrollError::new(BadRequest, "bad_identity", d))?;
        let csr = CertificateRequest::from_pem(&request.csr_pem)
            .map_err(|e| EnrollError::new(BadRequest, "invalid_csr", e.to_string()))?;
        let checked = Checked {
            peer,
            fingerprint: csr.key_fingerprint().to_string(),
            csr,
            request,
            now: SystemTime::now(),
        };
        match checked.request.token.as_deref() {
            Some(text) => {
                let token: EnrollmentToken =
                    text.parse()
                        .map_err(|e: kiwi_security::token::TokenFormatError| {
                            EnrollError::new(Unauthorized, "invalid_token", e.to_string())
                        })?;
                self.by_token(&checked, &token).await
            }
            None => self.by_approval(&checked, None).await,
        }
    }

    /// Enrollment with a token: issued at once, unless the robot already
    /// holds a valid certificate and the token was not made for it (then
    /// the request waits for an operator and the token keeps its use).
    async fn by_token(
        &self,
        checked: &Checked,
        token: &EnrollmentToken,
    ) -> Result<Answer, EnrollError> {
        use EnrollErrorKind::Unauthorized;
        if token.ca_pin != self.pki.pin() {
            return Err(EnrollError::new(
                Unauthorized,
                "wrong_ca",
                "the token pins another controller's CA",
            ));
        }
        let robot_id = checked.robot_id();
        let now = utc(checked.now);
        let hash = token.secret_hash();
        if let Some(held) = self.valid_certificate(robot_id, now).await? {
            let record = self
                .store
                .enrollment_token(&token.id)
                .await
                .map_err(EnrollError::store)?;
            let judged = record
                .as_ref()
                .map_or(TokenUse::Unknown, |r| r.judge_use(&hash, robot_id, now));
            let made_for_it = record.as_ref().and_then(|r| r.robot_id) == Some(robot_id);
            if matches!(judged, TokenUse::Accepted { .. }) && !made_for_it {
                let reason = format!(
                    "came with enrollment token {}, but robot {robot_id} already holds a valid \
                     certificate (serial {}, until {}); approving replaces it",
                    token.id,
                    held.serial,
                    held.not_after.to_rfc3339()
                );
                tracing::warn!(
                    peer = %checked.peer,
                    %robot_id,
                    token_id = %token.id,
                    serial = %held.serial,
                    "enrollment held for an operator: the robot already holds a valid certificate"
                );
                return match self.by_approval(checked, Some(&reason)).await? {
                    Answer::Pending(r) => Ok(Answer::Held(r)),
                    other => Ok(other),
                };
            }
            // A refusal is the token's own (below, as without a
            // certificate); a token made for this robot replaces it.
        }
        let used = self
            .store
            .use_enrollment_token(&token.id, &hash, robot_id, now)
            .await
            .map_err(EnrollError::store)?;
        let (reason, detail) = match used {
            TokenUse::Accepted { .. } => {
                let via = Enrollment {
                    via: EnrolledVia::Token,
                    token_id: Some(token.id.clone()),
                    enrollment_id: None,
                    approved_by: None,
                    certificate_serial: String::new(),
                    key_fingerprint: checked.fingerprint.clone(),
                    certificates_revoked: 0,
                };
                return self.issue(checked, via).await.map(Answer::Issued);
            }
            TokenUse::Unknown => ("unknown_token", "no such enrollment token"),
            TokenUse::WrongSecret => ("invalid_token", "the token's secret is wrong"),
            TokenUse::Expired => ("expired_token", "the enrollment token has expired"),
            TokenUse::UsedUp => ("used_token", "the enrollment token was already used"),
            TokenUse::Revoked => ("revoked_token", "the enrollment token was revoked"),
            TokenUse::WrongRobot => (
                "wrong_robot",
                "the enrollment token was made for another robot",
            ),
        };
        Err(EnrollError::new(Unauthorized, reason, detail))
    }

    /// Enrollment by an operator's approval: records the request (or finds
    /// it) and answers as its status says.
    async fn by_approval(
        &self,
        checked: &Checked,
        reason: Option<&str>,
    ) -> Result<Answer, EnrollError> {
        let identity = serde_json::to_value(&checked.request.identity).unwrap_or_default();
        let source = checked.peer.ip().to_string();
        let noted = self
            .store
            .note_enrollment(
                NewEnrollment {
                    robot_id: checked.robot_id(),
                    key_fingerprint: &checked.fingerprint,
                    identity: &identity,
                    source_addr: &source,
                    reason,
                },
                self.pending,
                utc(checked.now),
            )
            .await
            .map_err(EnrollError::store)?;
        let record = match noted {
            Noted::Recorded(record) => record,
            Noted::TooMany(cap) => {
                let detail = match cap {
                    PendingCap::Total => format!(
                        "{} enrollment requests already wait for an operator; try again later",
                        self.pending.total
                    ),
                    PendingCap::PerAddress => format!(
                        "{} enrollment requests from {source} already wait for an operator; \
                         try again later",
                        self.pending.per_address
                    ),
                };
                self.metrics.limited("pending_enrollments");
                return Err(EnrollError::new(
                    EnrollErrorKind::TooMany(PENDING_FULL_RETRY),
                    "too_many_pending",
                    detail,
                ));
            }
        };
        match record.status {
            EnrollmentStatus::Approved => self.issue_approved(checked, &record).await,
            EnrollmentStatus::Rejected => Err(EnrollError::new(
                EnrollErrorKind::Forbidden,
                "rejected",
                "an operator rejected this robot's enrollment",
            )),
            // `note_enrollment` turns an issued or revoked request asked
            // again into a pending one: nothing is issued without a
            // decision.
            EnrollmentStatus::Pending | EnrollmentStatus::Issued | EnrollmentStatus::Revoked => {
                Ok(Answer::Pending(EnrollResponse::Pending {
                    enrollment_id: record.id,
                    key_fingerprint: checked.fingerprint.clone(),
                    retry_after_s: u32::try_from(PENDING_RETRY.as_secs()).unwrap_or(5),
                }))
            }
        }
    }

    /// Issues the certificate of an approved request and marks it issued
    /// (once: a request issued is never issued again by itself).
    async fn issue_approved(
        &self,
        checked: &Checked,
        record: &EnrollmentRecord,
    ) -> Result<Answer, EnrollError> {
        let marked = self
            .store
            .decide_enrollment(
                record.id,
                EnrollmentStatus::Issued,
                "controller",
                utc(checked.now),
            )
            .await;
        match marked {
            Ok(Some(_)) => {}
            // Decided otherwise meanwhile (rejected, revoked, or issued
            // by another controller): ask again.
            Ok(None) | Err(crate::store::StoreError::InvalidTransition(_)) => {
                return Ok(Answer::Pending(EnrollResponse::Pending {
                    enrollment_id: record.id,
                    key_fingerprint: checked.fingerprint.clone(),
                    retry_after_s: u32::try_from(PENDING_RETRY.as_secs()).unwrap_or(5),
                }));
            }
            Err(e) => return Err(EnrollError::store(e)),
        }
        let via = Enrollment {
            via: EnrolledVia::Approval,
            token_id: None,
            enrollment_id: Some(record.id),
            approved_by: record.decided_by.clone(),
            certificate_serial: String::new(),
            key_fingerprint: checked.fingerprint.clone(),
            certificates_revoked: 0,
        };
        self.issue(checked, via).await.map(Answer::Issued)
    }

    /// The robot's newest certificate that is neither revoked nor expired.
    async fn valid_certificate(
        &self,
        robot_id: RobotId,
        now: DateTime<Utc>,
    ) -> Result<Option<CertificateRecord>, EnrollError> {
        Ok(self
            .store
            .certificates(robot_id)
            .await
            .map_err(EnrollError::store)?
            .into_iter()
            .rfind(|c| c.revoked_at.is_none() && c.not_after > now))
    }

    /// Revokes the robot's valid certificates (a new enrollment replaces
    /// them) here and in the store, and ends the sessions that use them;
    /// returns how many.
    async fn replace_certificates(
        &self,
        robot_id: RobotId,
        now: DateTime<Utc>,
    ) -> Result<u64, EnrollError> {
        let serials: Vec<String> = self
            .store
            .certificates(robot_id)
            .await
            .map_err(EnrollError::store)?
            .into_iter()
            .filter(|c| c.revoked_at.is_none() && c.not_after > now)
            .map(|c| c.serial)
            .collect();
        if serials.is_empty() {
            return Ok(0);
        }
        let revoked = self
            .store
            .revoke_certificates(robot_id, now)
            .await
            .map_err(EnrollError::store)?;
        self.agent_auth.add_revoked(serials.iter().cloned());
        super::upkeep::end_revoked_sessions(&self.sessions, &serials);
        self.metrics.certificates_revoked.inc_by(revoked);
        tracing::info!(%robot_id, revoked, "the robot's previous certificates are revoked: a new enrollment replaces them");
        Ok(revoked)
    }

    /// Issues the certificate of an accepted enrollment: the robot's
    /// previous ones are revoked, the new one signed and recorded, and the
    /// robot's log (when it is in it) says how.
    async fn issue(
        &self,
        checked: &Checked,
        mut enrollment: Enrollment,
    ) -> Result<EnrollResponse, EnrollError> {
        let robot_id = checked.robot_id();
        enrollment.certificates_revoked = self
            .replace_certificates(robot_id, utc(checked.now))
            .await?;
        let issued = self.issue_cert(&checked.csr, robot_id, checked.now).await?;
        enrollment.certificate_serial = issued.info.serial.clone();
        let ctx = Context::new("enrollment");
        match self
            .fleet
            .apply(robot_id, Input::Enrolled { enrollment }, &ctx)
            .await
        {
            // A robot not in the log yet enters it when its agent connects.
            Ok(_) | Err(FleetError::Refused(Refusal::UnknownRobot)) => {}
            Err(e) => {
                tracing::error!(%robot_id, error = %e, "certificate issued, but robot_enrolled could not be recorded");
            }
        }
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
