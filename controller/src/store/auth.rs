//! The auth store: security records kept in the event store's database
//! (API tokens, enrollment tokens, enrollment requests, issued client
//! certificates), behind one trait with one backend per database
//! ([`super::sqlite::auth`], [`super::postgres::auth`]); reached through
//! [`super::EventStore::auth`].
//!
//! Secrets are never stored: a token's `secret_hash` is the lower-case hex
//! SHA-256 of its secret part, computed by the caller, and compared here
//! in constant time. The rules that decide a token use and an enrollment's
//! moves are the plain functions of this module
//! ([`EnrollmentTokenRecord::judge_use`], [`EnrollmentStatus::can_become`]);
//! the backends apply them inside the transaction that changes the row.

use super::StoreError;
use chrono::{DateTime, Utc};
use kiwi_protocol::RobotId;
use uuid::Uuid;

/// Roles of API tokens, weakest first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    /// The stored (and JSON) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// The role of a stored name; `None` for anything else.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// A bearer token of the REST API (`api_tokens`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApiTokenRecord {
    /// The public token id (a short random string, the primary key).
    pub id: String,
    /// The operator's label, may be empty.
    pub name: String,
    pub role: Role,
    /// Lower-case hex SHA-256 of the secret part; never serialised.
    #[serde(skip)]
    pub secret_hash: String,
    pub created_at: DateTime<Utc>,
    /// Unusable from this instant on, when set.
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A token that lets an agent enroll without an operator's approval
/// (`enrollment_tokens`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EnrollmentTokenRecord {
    pub id: String,
    /// Lower-case hex SHA-256 of the secret part; never serialised.
    #[serde(skip)]
    pub secret_hash: String,
    pub created_at: DateTime<Utc>,
    /// Unusable from this instant on (`expires_at <= now` is expired).
    pub expires_at: DateTime<Utc>,
    pub uses_total: u32,
    /// Never more than `uses_total`; each accepted use takes one.
    pub uses_left: u32,
    pub revoked_at: Option<DateTime<Utc>>,
    /// The one robot this token enrolls (`token create --robot`); `None`:
    /// any robot.
    pub robot_id: Option<RobotId>,
}

impl EnrollmentTokenRecord {
    /// What using this token with `secret_hash` for `robot` at `now` gives,
    /// without changing anything: the refusal first in the order
    /// WrongSecret, Revoked, Expired, UsedUp, WrongRobot, else `Accepted`
    /// with the uses left after this one. The backends apply it to the row
    /// they hold locked and store `uses_left` of an acceptance.
    pub fn judge_use(&self, secret_hash: &str, robot: RobotId, now: DateTime<Utc>) -> TokenUse {
        if !hashes_equal(&self.secret_hash, secret_hash) {
            TokenUse::WrongSecret
        } else if self.revoked_at.is_some() {
            TokenUse::Revoked
        } else if self.expires_at <= now {
            TokenUse::Expired
        } else if self.uses_left == 0 {
            TokenUse::UsedUp
        } else if self.robot_id.is_some_and(|bound| bound != robot) {
            TokenUse::WrongRobot
        } else {
            TokenUse::Accepted {
                uses_left: self.uses_left - 1,
            }
        }
    }
}

/// Compares two hashes in time that depends only on their lengths (which
/// are public: every hash is 64 hex digits).
fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |diff, (x, y)| diff | (x ^ y))
            == 0
}

/// The outcome of trying to use an enrollment token (one atomic step:
/// a successful use decrements `uses_left`; concurrent uses of a token with
/// one use left: exactly one wins, also across controllers on PostgreSQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUse {
    /// The use was taken; `uses_left` is what remains after it.
    Accepted {
        uses_left: u32,
    },
    Unknown,
    WrongSecret,
    Expired,
    UsedUp,
    Revoked,
    /// The token was made for another robot.
    WrongRobot,
}

/// Where an enrollment request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrollmentStatus {
    Pending,
    Approved,
    Rejected,
    Issued,
    /// Ended by decommissioning the robot.
    Revoked,
}

impl EnrollmentStatus {
    /// Every status.
    pub const ALL: [EnrollmentStatus; 5] = [
        EnrollmentStatus::Pending,
        EnrollmentStatus::Approved,
        EnrollmentStatus::Rejected,
        EnrollmentStatus::Issued,
        EnrollmentStatus::Revoked,
    ];

    /// The stored (and JSON) name.
    pub fn as_str(self) -> &'static str {
        match self {
            EnrollmentStatus::Pending => "pending",
            EnrollmentStatus::Approved => "approved",
            EnrollmentStatus::Rejected => "rejected",
            EnrollmentStatus::Issued => "issued",
            EnrollmentStatus::Revoked => "revoked",
        }
    }

    /// The status of a stored name; `None` for anything else.
    pub fn parse(s: &str) -> Option<EnrollmentStatus> {
        match s {
            "pending" => Some(EnrollmentStatus::Pending),
            "approved" => Some(EnrollmentStatus::Approved),
            "rejected" => Some(EnrollmentStatus::Rejected),
            "issued" => Some(EnrollmentStatus::Issued),
            "revoked" => Some(EnrollmentStatus::Revoked),
            _ => None,
        }
    }

    /// The only moves a decision makes: Pending → Approved | Rejected,
    /// Approved → Issued | Rejected, and decommissioning: Pending,
    /// Approved or Issued → Revoked. Rejected is final.
    pub fn can_become(self, to: EnrollmentStatus) -> bool {
        use EnrollmentStatus::{Approved, Issued, Pending, Rejected, Revoked};
        matches!(
            (self, to),
            (Pending, Approved | Rejected | Revoked)
                | (Approved, Issued | Rejected | Revoked)
                | (Issued, Revoked)
        )
    }

    /// The status of a request when its robot asks again with the same
    /// key: a request that was issued or revoked starts over as pending
    /// (a certificate is never issued twice by itself: an operator
    /// decides again); any other keeps its status.
    pub fn asked_again(self) -> EnrollmentStatus {
        match self {
            EnrollmentStatus::Issued | EnrollmentStatus::Revoked => EnrollmentStatus::Pending,
            other => other,
        }
    }
}

/// Caps on the requests waiting for an operator, which anyone who reaches
/// the agent port can make: in total and per source address. A robot
/// asking again about its own request is never refused by them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingLimits {
    pub total: u32,
    pub per_address: u32,
}

impl PendingLimits {
    /// The cap one more pending request would exceed, given how many are
    /// pending in total and from its address.
    pub fn exceeded(&self, total: i64, from_address: i64) -> Option<PendingCap> {
        if total >= i64::from(self.total) {
            Some(PendingCap::Total)
        } else if from_address >= i64::from(self.per_address) {
            Some(PendingCap::PerAddress)
        } else {
            None
        }
    }
}

/// A request to enroll that waits for an operator, as
/// [`AuthStore::note_enrollment`] records it.
#[derive(Debug, Clone, Copy)]
pub struct NewEnrollment<'a> {
    pub robot_id: RobotId,
    /// `sha256:<hex>` of the agent's public key.
    pub key_fingerprint: &'a str,
    pub identity: &'a serde_json::Value,
    pub source_addr: &'a str,
    /// Why it waits although it came with a token; `None` for a plain
    /// request.
    pub reason: Option<&'a str>,
}

/// What [`AuthStore::note_enrollment`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Noted {
    /// The request as stored now (its status says what to answer).
    Recorded(EnrollmentRecord),
    /// A new pending request would exceed a cap; nothing was stored.
    TooMany(PendingCap),
}

/// Which cap of [`PendingLimits`] a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingCap {
    Total,
    PerAddress,
}

/// Where a page of [`AuthStore::enrollments`] starts: after the request
/// first seen at `first_seen` with id `id` (the list's order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnrollmentCursor {
    pub first_seen: DateTime<Utc>,
    pub id: Uuid,
}

impl EnrollmentCursor {
    /// The cursor after `record`.
    pub fn after(record: &EnrollmentRecord) -> EnrollmentCursor {
        EnrollmentCursor {
            first_seen: record.first_seen,
            id: record.id,
        }
    }

    /// The opaque text of the API (`<unix ns>.<uuid>`: every digit the
    /// store keeps, so the page after it starts exactly after it).
    pub fn encode(&self) -> String {
        let nanos = self.first_seen.timestamp_nanos_opt().unwrap_or(i64::MAX);
        format!("{nanos}.{}", self.id.simple())
    }

    /// Reads [`encode`](Self::encode)'s text; `None` for anything else.
    pub fn decode(text: &str) -> Option<EnrollmentCursor> {
        let (nanos, id) = text.split_once('.')?;
        Some(EnrollmentCursor {
            first_seen: DateTime::from_timestamp_nanos(nanos.parse().ok()?),
            id: Uuid::try_parse(id).ok()?,
        })
    }
}

/// What ending a robot's enrollments did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct EndedEnrollments {
    /// Requests moved to `revoked`.
    pub enrollments: u64,
    /// Unused tokens made for the robot, revoked.
    pub tokens: u64,
}

/// An agent that asked to enroll without a token, keyed by (robot_id, key_fingerprint).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EnrollmentRecord {
    pub id: Uuid,
    pub robot_id: RobotId,
    /// `sha256:<hex>` of the agent's public key.
    pub key_fingerprint: String,
    /// The agent's identity as JSON (hostname, type, addresses...), as of
    /// its latest request.
    pub identity: serde_json::Value,
    /// The IP address the latest request came from.
    pub source_addr: String,
    pub status: EnrollmentStatus,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// When and by whom it was approved or rejected (`None` while pending;
    /// issuing keeps the approval's).
    pub decided_at: Option<DateTime<Utc>>,
    pub decided_by: Option<String>,
    /// Why it waits for an operator although it came with a token (the
    /// robot already holds a valid certificate); `None` for a plain request.
    pub reason: Option<String>,
}

/// A client certificate issued to a robot (`certificates`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertificateRecord {
    /// The serial number in hex, unique.
    pub serial: String,
    pub robot_id: RobotId,
    pub key_fingerprint: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    pub issued_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The error of a refused [`AuthStore::decide_enrollment`].
pub(crate) fn refused_move(id: Uuid, from: EnrollmentStatus, to: EnrollmentStatus) -> StoreError {
    StoreError::InvalidTransition(format!(
        "enrollment {id} is {}: it cannot become {}",
        from.as_str(),
        to.as_str()
    ))
}

/// Security records in the event store's database. Implementations are
/// cheap to share (`Arc<dyn AuthStore>`). Times are stored as given
/// (PostgreSQL keeps microseconds: a caller that compares what it wrote
/// with what it reads truncates its times first, as the fleet does).
#[async_trait::async_trait]
pub trait AuthStore: Send + Sync + std::fmt::Debug {
    /// A token with an id already stored is refused ([`StoreError::Invalid`]).
    async fn insert_api_token(&self, token: &ApiTokenRecord) -> Result<(), StoreError>;
    async fn api_token(&self, id: &str) -> Result<Option<ApiTokenRecord>, StoreError>;
    /// Every API token, ordered by created_at, id.
    async fn api_tokens(&self) -> Result<Vec<ApiTokenRecord>, StoreError>;
    /// Sets revoked_at (if not yet revoked); false when no such token.
    async fn revoke_api_token(&self, id: &str, now: DateTime<Utc>) -> Result<bool, StoreError>;

    async fn insert_enrollment_token(
        &self,
        token: &EnrollmentTokenRecord,
    ) -> Result<(), StoreError>;
    /// Every enrollment token, ordered by created_at, id.
    async fn enrollment_tokens(&self) -> Result<Vec<EnrollmentTokenRecord>, StoreError>;
    /// Sets revoked_at (if not yet revoked); false when no such token.
    async fn revoke_enrollment_token(
        &self,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    /// One enrollment token, without using it.
    async fn enrollment_token(&self, id: &str)
    -> Result<Option<EnrollmentTokenRecord>, StoreError>;
    /// Checks id, secret hash, expiry (expires_at <= now is expired), revocation, uses and the
    /// robot it was made for, and consumes one use atomically if all pass
    /// ([`EnrollmentTokenRecord::judge_use`]; Unknown before every other refusal).
    async fn use_enrollment_token(
        &self,
        id: &str,
        secret_hash: &str,
        robot: RobotId,
        now: DateTime<Utc>,
    ) -> Result<TokenUse, StoreError>;

    /// Records a request for (robot_id, key_fingerprint). A request already
    /// stored gets the new last_seen (= `now`), identity, source_addr and
    /// reason, and its status [`EnrollmentStatus::asked_again`]: one that
    /// starts over as pending loses its decision. A new one is inserted as
    /// pending (new uuid, first_seen = last_seen = now). A request that
    /// becomes pending (new, or starting over) is refused with
    /// [`Noted::TooMany`] when it would exceed `limits` (pending requests
    /// in total, and from its source address), storing nothing.
    async fn note_enrollment(
        &self,
        request: NewEnrollment<'_>,
        limits: PendingLimits,
        now: DateTime<Utc>,
    ) -> Result<Noted, StoreError>;
    async fn enrollment(&self, id: Uuid) -> Result<Option<EnrollmentRecord>, StoreError>;
    /// At most `limit` requests after `after`, ordered by first_seen, id;
    /// `status` filters when Some.
    async fn enrollments(
        &self,
        status: Option<EnrollmentStatus>,
        after: Option<EnrollmentCursor>,
        limit: u32,
    ) -> Result<Vec<EnrollmentRecord>, StoreError>;
    /// Ends every request of the robot that is not final (pending,
    /// approved, issued become revoked, decided at `now` by `by`) and
    /// revokes every unused token made for it, in one transaction.
    async fn end_enrollments(
        &self,
        robot_id: RobotId,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<EndedEnrollments, StoreError>;
    /// Forgets pending requests not asked about since `before` (their agent
    /// went away); returns how many.
    async fn expire_enrollments(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;
    /// Moves an enrollment to `to`, only along the moves of
    /// [`EnrollmentStatus::can_become`],
    /// setting decided_at = `now` and decided_by = `by`, except when it
    /// becomes Issued: that keeps the approval's decided_at and decided_by.
    /// Returns the record after the change; `Ok(None)` when no such id; any
    /// other move is refused with [`StoreError::InvalidTransition`] and
    /// changes nothing.
    async fn decide_enrollment(
        &self,
        id: Uuid,
        to: EnrollmentStatus,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<EnrollmentRecord>, StoreError>;

    /// A certificate with a serial already stored is refused ([`StoreError::Invalid`]).
    async fn insert_certificate(&self, cert: &CertificateRecord) -> Result<(), StoreError>;
    /// The robot's certificates, ordered by issued_at, serial.
    async fn certificates(&self, robot_id: RobotId) -> Result<Vec<CertificateRecord>, StoreError>;
    /// Revokes every not-yet-revoked certificate of the robot; returns how many.
    async fn revoke_certificates(
        &self,
        robot_id: RobotId,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError>;
    /// Serials of revoked certificates whose not_after is after `now`
    /// (expired ones need no revocation), in serial order.
    async fn revoked_serials(&self, now: DateTime<Utc>) -> Result<Vec<String>, StoreError>;
}

/// A stored count of uses (`u32` by contract).
pub(crate) fn uses(value: i64, name: &str) -> Result<u32, String> {
    u32::try_from(value).map_err(|_| format!("column {name}: {value} is not a count of uses"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn token(uses_left: u32) -> EnrollmentTokenRecord {
        EnrollmentTokenRecord {
            id: "t1".into(),
            secret_hash: "ab".repeat(32),
            created_at: Utc.timestamp_opt(1_000, 0).unwrap(),
            expires_at: Utc.timestamp_opt(2_000, 0).unwrap(),
            uses_total: 3,
            uses_left,
            revoked_at: None,
            robot_id: None,
        }
    }

    #[test]
    fn auth_token_use_refusals_come_in_order() {
        let now = Utc.timestamp_opt(1_500, 0).unwrap();
        let good = "ab".repeat(32);
        let bad = "cd".repeat(32);
        let (robot, other) = (RobotId(Uuid::from_u128(1)), RobotId(Uuid::from_u128(2)));
        assert_eq!(
            token(3).judge_use(&good, robot, now),
            TokenUse::Accepted { uses_left: 2 }
        );
        assert_eq!(token(3).judge_use(&bad, robot, now), TokenUse::WrongSecret);
        assert_eq!(token(3).judge_use("ab", robot, now), TokenUse::WrongSecret);
        let mut t = token(0);
        t.robot_id = Some(robot);
        t.revoked_at = Some(now);
        let late = t.expires_at;
        assert_eq!(t.judge_use(&bad, other, late), TokenUse::WrongSecret);
        assert_eq!(t.judge_use(&good, other, late), TokenUse::Revoked);
        t.revoked_at = None;
        assert_eq!(t.judge_use(&good, other, late), TokenUse::Expired);
        assert_eq!(t.judge_use(&good, other, now), TokenUse::UsedUp);
        t.uses_left = 1;
        assert_eq!(t.judge_use(&good, other, now), TokenUse::WrongRobot);
        assert_eq!(
            t.judge_use(&good, robot, now),
            TokenUse::Accepted { uses_left: 0 }
        );
    }

    #[test]
    fn enrollment_cursors_round_trip_and_refuse_anything_else() {
        let c = EnrollmentCursor {
            first_seen: Utc.timestamp_opt(1_700_000_000, 123_456_000).unwrap(),
            id: Uuid::from_u128(0xabc),
        };
        assert_eq!(EnrollmentCursor::decode(&c.encode()), Some(c));
        for bad in [
            "",
            ".",
            "x.y",
            "1.",
            "1.not-a-uuid",
            "99999999999999999999.0",
        ] {
            assert_eq!(EnrollmentCursor::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_request_asked_again_never_issues_twice_by_itself() {
        use EnrollmentStatus::*;
        assert_eq!(Issued.asked_again(), Pending);
        assert_eq!(Revoked.asked_again(), Pending);
        for kept in [Pending, Approved, Rejected] {
            assert_eq!(kept.asked_again(), kept);
        }
    }

    #[test]
    fn auth_names_round_trip_and_roles_order_weakest_first() {
        for role in [Role::Viewer, Role::Operator, Role::Admin] {
            assert_eq!(Role::parse(role.as_str()), Some(role));
            assert_eq!(
                serde_json::to_value(role).unwrap(),
                serde_json::json!(role.as_str())
            );
        }
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        assert_eq!(Role::parse("Admin"), None);
        use EnrollmentStatus::{Approved, Issued, Pending, Rejected, Revoked};
        for status in EnrollmentStatus::ALL {
            assert_eq!(EnrollmentStatus::parse(status.as_str()), Some(status));
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                serde_json::json!(status.as_str())
            );
        }
        let allowed: Vec<_> = EnrollmentStatus::ALL
            .iter()
            .flat_map(|&from| {
                EnrollmentStatus::ALL
                    .into_iter()
                    .filter(move |&to| from.can_become(to))
                    .map(move |to| (from, to))
            })
            .collect();
        assert_eq!(
            allowed,
            [
                (Pending, Approved),
                (Pending, Rejected),
                (Pending, Revoked),
                (Approved, Rejected),
                (Approved, Issued),
                (Approved, Revoked),
                (Issued, Revoked),
            ]
        );
    }
}
