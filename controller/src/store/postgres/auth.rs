//! The auth store on PostgreSQL (see [`crate::store::auth`]), shared by every
//! controller on the database.
//!
//! It uses the store's pool (with its statement and idle-in-transaction
//! timeouts) and never the log's advisory lock: auth records are not part
//! of the log. A change that depends on what is stored (a token use, an
//! enrollment's move) locks the row first (`SELECT ... FOR UPDATE`),
//! decides with the rules of [`crate::store::auth`] and writes in the same
//! transaction: a concurrent one, from this controller or another, waits
//! for the lock and then reads the committed row, so of two uses of a
//! token's last use exactly one is accepted. Upserts and revocations are
//! single statements. Times are `TIMESTAMPTZ` (microseconds).

use super::rows::{read_error, write_error};
use crate::store::StoreError;
use crate::store::auth::{
    ApiTokenRecord, AuthStore, CertificateRecord, EndedEnrollments, EnrollmentCursor,
    EnrollmentRecord, EnrollmentStatus, EnrollmentTokenRecord, NewEnrollment, Noted, PendingLimits,
    TokenUse, refused_move,
};
use crate::store::rows as decode;
use chrono::{DateTime, Utc};
use kiwi_protocol::RobotId;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

/// The columns of `api_tokens`, as [`decode::api_token`] reads them.
macro_rules! api_token_columns {
    () => {
        "token_id, name, role, secret_hash, created_at, expires_at, revoked_at"
    };
}

/// The columns of `enrollment_tokens`, as [`decode::enrollment_token`] reads them.
macro_rules! enrollment_token_columns {
    () => {
        "token_id, secret_hash, created_at, expires_at, uses_total, uses_left, revoked_at, \
         robot_id"
    };
}

/// The columns of `enrollments`, as [`decode::enrollment`] reads them.
macro_rules! enrollment_columns {
    () => {
        "enrollment_id, robot_id, key_fingerprint, identity, source_addr, status, first_seen, \
         last_seen, decided_at, decided_by, reason"
    };
}

/// The columns of `certificates`, as [`decode::certificate`] reads them.
macro_rules! certificate_columns {
    () => {
        "serial, robot_id, key_fingerprint, not_before, not_after, issued_at, revoked_at"
    };
}

/// The auth store of a [`super::PostgresStore`], over its pool.
#[derive(Debug)]
pub struct PostgresAuthStore {
    pool: PgPool,
}

impl PostgresAuthStore {
    pub(super) fn new(pool: PgPool) -> PostgresAuthStore {
        PostgresAuthStore { pool }
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool.begin().await.map_err(write_error)
    }
}

/// Commits after `result` succeeded, rolls back otherwise.
async fn finish<T>(
    tx: Transaction<'static, Postgres>,
    result: Result<T, StoreError>,
) -> Result<T, StoreError> {
    match result {
        Ok(v) => {
            tx.commit().await.map_err(write_error)?;
            Ok(v)
        }
        Err(e) => {
            // The error is the caller's answer; a failed rollback leaves
            // nothing behind either (the server ends the transaction with
            // the connection).
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

#[async_trait::async_trait]
impl AuthStore for PostgresAuthStore {
    async fn insert_api_token(&self, token: &ApiTokenRecord) -> Result<(), StoreError> {
        sqlx::query(concat!(
            "INSERT INTO api_tokens (",
            api_token_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(&token.id)
        .bind(&token.name)
        .bind(token.role.as_str())
        .bind(&token.secret_hash)
        .bind(token.created_at)
        .bind(token.expires_at)
        .bind(token.revoked_at)
        .execute(&self.pool)
        .await
        .map_err(write_error)?;
        Ok(())
    }

    async fn api_token(&self, id: &str) -> Result<Option<ApiTokenRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            api_token_columns!(),
            " FROM api_tokens WHERE token_id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(read_error)?
        .as_ref()
        .map(decode::api_token)
        .transpose()
    }

    async fn api_tokens(&self) -> Result<Vec<ApiTokenRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            api_token_columns!(),
            " FROM api_tokens ORDER BY created_at, token_id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(read_error)?
        .iter()
        .map(decode::api_token)
        .collect()
    }

    async fn revoke_api_token(&self, id: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, $2) WHERE token_id = $1",
        )
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(write_error)?;
        Ok(done.rows_affected() > 0)
    }

    async fn insert_enrollment_token(
        &self,
        token: &EnrollmentTokenRecord,
    ) -> Result<(), StoreError> {
        sqlx::query(concat!(
            "INSERT INTO enrollment_tokens (",
            enrollment_token_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(&token.id)
        .bind(&token.secret_hash)
        .bind(token.created_at)
        .bind(token.expires_at)
        .bind(i64::from(token.uses_total))
        .bind(i64::from(token.uses_left))
        .bind(token.revoked_at)
        .bind(token.robot_id.map(|r| r.0))
        .execute(&self.pool)
        .await
        .map_err(write_error)?;
        Ok(())
    }

    async fn enrollment_tokens(&self) -> Result<Vec<EnrollmentTokenRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            enrollment_token_columns!(),
            " FROM enrollment_tokens ORDER BY created_at, token_id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(read_error)?
        .iter()
        .map(decode::enrollment_token)
        .collect()
    }

    async fn revoke_enrollment_token(
        &self,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE enrollment_tokens SET revoked_at = COALESCE(revoked_at, $2) \
             WHERE token_id = $1",
        )
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(write_error)?;
        Ok(done.rows_affected() > 0)
    }

    async fn enrollment_token(
        &self,
        id: &str,
    ) -> Result<Option<EnrollmentTokenRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            enrollment_token_columns!(),
            " FROM enrollment_tokens WHERE token_id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(read_error)?
        .as_ref()
        .map(decode::enrollment_token)
        .transpose()
    }

    async fn use_enrollment_token(
        &self,
        id: &str,
        secret_hash: &str,
        robot: RobotId,
        now: DateTime<Utc>,
    ) -> Result<TokenUse, StoreError> {
        let mut tx = self.begin().await?;
        let used = use_token_in(&mut tx, id, secret_hash, robot, now).await;
        finish(tx, used).await
    }

    async fn note_enrollment(
        &self,
        request: NewEnrollment<'_>,
        limits: PendingLimits,
        now: DateTime<Utc>,
    ) -> Result<Noted, StoreError> {
        let mut tx = self.begin().await?;
        let noted = note_in(&mut tx, request, limits, now).await;
        finish(tx, noted).await
    }

    async fn enrollment(&self, id: Uuid) -> Result<Option<EnrollmentRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            enrollment_columns!(),
            " FROM enrollments WHERE enrollment_id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(read_error)?
        .as_ref()
        .map(decode::enrollment)
        .transpose()
    }

    async fn enrollments(
        &self,
        status: Option<EnrollmentStatus>,
        after: Option<EnrollmentCursor>,
        limit: u32,
    ) -> Result<Vec<EnrollmentRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            enrollment_columns!(),
            " FROM enrollments WHERE ($1::TEXT IS NULL OR status = $1) \
             AND ($2::TIMESTAMPTZ IS NULL OR (first_seen, enrollment_id) > ($2, $3)) \
             ORDER BY first_seen, enrollment_id LIMIT $4"
        ))
        .bind(status.map(EnrollmentStatus::as_str))
        .bind(after.map(|c| c.first_seen))
        .bind(after.map(|c| c.id))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(read_error)?
        .iter()
        .map(decode::enrollment)
        .collect()
    }

    async fn end_enrollments(
        &self,
        robot_id: RobotId,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<EndedEnrollments, StoreError> {
        let mut tx = self.begin().await?;
        let ended = async {
            let enrollments = sqlx::query(
                "UPDATE enrollments SET status = 'revoked', decided_at = $2, decided_by = $3 \
                 WHERE robot_id = $1 AND status IN ('pending', 'approved', 'issued')",
            )
            .bind(robot_id.0)
            .bind(now)
            .bind(by)
            .execute(&mut *tx)
            .await
            .map_err(write_error)?
            .rows_affected();
            let tokens = sqlx::query(
                "UPDATE enrollment_tokens SET revoked_at = $2 \
                 WHERE robot_id = $1 AND revoked_at IS NULL",
            )
            .bind(robot_id.0)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(write_error)?
            .rows_affected();
            Ok(EndedEnrollments {
                enrollments,
                tokens,
            })
        }
        .await;
        finish(tx, ended).await
    }

    async fn expire_enrollments(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done =
            sqlx::query("DELETE FROM enrollments WHERE status = 'pending' AND last_seen < $1")
                .bind(before)
                .execute(&self.pool)
                .await
                .map_err(write_error)?;
        Ok(done.rows_affected())
    }

    async fn decide_enrollment(
        &self,
        id: Uuid,
        to: EnrollmentStatus,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<EnrollmentRecord>, StoreError> {
        let mut tx = self.begin().await?;
        let decided = decide_in(&mut tx, id, to, by, now).await;
        finish(tx, decided).await
    }

    async fn insert_certificate(&self, cert: &CertificateRecord) -> Result<(), StoreError> {
        sqlx::query(concat!(
            "INSERT INTO certificates (",
            certificate_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(&cert.serial)
        .bind(cert.robot_id.0)
        .bind(&cert.key_fingerprint)
        .bind(cert.not_before)
        .bind(cert.not_after)
        .bind(cert.issued_at)
        .bind(cert.revoked_at)
        .execute(&self.pool)
        .await
        .map_err(write_error)?;
        Ok(())
    }

    async fn certificates(&self, robot_id: RobotId) -> Result<Vec<CertificateRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            certificate_columns!(),
            " FROM certificates WHERE robot_id = $1 ORDER BY issued_at, serial"
        ))
        .bind(robot_id.0)
        .fetch_all(&self.pool)
        .await
        .map_err(read_error)?
        .iter()
        .map(decode::certificate)
        .collect()
    }

    async fn revoke_certificates(
        &self,
        robot_id: RobotId,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE certificates SET revoked_at = $2 WHERE robot_id = $1 AND revoked_at IS NULL",
        )
        .bind(robot_id.0)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(write_error)?;
        Ok(done.rows_affected())
    }

    async fn revoked_serials(&self, now: DateTime<Utc>) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL AND not_after > $1 \
             ORDER BY serial",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(read_error)
    }
}

/// Checks a token use on the locked row and takes it, inside a transaction.
async fn use_token_in(
    conn: &mut PgConnection,
    id: &str,
    secret_hash: &str,
    robot: RobotId,
    now: DateTime<Utc>,
) -> Result<TokenUse, StoreError> {
    let Some(row) = sqlx::query(concat!(
        "SELECT ",
        enrollment_token_columns!(),
        " FROM enrollment_tokens WHERE token_id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(write_error)?
    else {
        return Ok(TokenUse::Unknown);
    };
    let outcome = decode::enrollment_token(&row)?.judge_use(secret_hash, robot, now);
    if let TokenUse::Accepted { uses_left } = outcome {
        sqlx::query("UPDATE enrollment_tokens SET uses_left = $2 WHERE token_id = $1")
            .bind(id)
            .bind(i64::from(uses_left))
            .execute(&mut *conn)
            .await
            .map_err(write_error)?;
    }
    Ok(outcome)
}

/// The transaction advisory lock that serialises enrollment requests
/// across controllers, so that the caps of [`PendingLimits`] hold exactly
/// (requests are rare: a pending agent asks every few seconds).
const ENROLLMENT_LOCK: i64 = 0x6b69_7769_656e_726c;

/// Records an enrollment request, inside a transaction (see
/// [`AuthStore::note_enrollment`]).
async fn note_in(
    conn: &mut PgConnection,
    request: NewEnrollment<'_>,
    limits: PendingLimits,
    now: DateTime<Utc>,
) -> Result<Noted, StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ENROLLMENT_LOCK)
        .execute(&mut *conn)
        .await
        .map_err(write_error)?;
    let existing = sqlx::query(concat!(
        "SELECT ",
        enrollment_columns!(),
        " FROM enrollments WHERE robot_id = $1 AND key_fingerprint = $2 FOR UPDATE"
    ))
    .bind(request.robot_id.0)
    .bind(request.key_fingerprint)
    .fetch_optional(&mut *conn)
    .await
    .map_err(write_error)?
    .as_ref()
    .map(decode::enrollment)
    .transpose()?;
    let status = existing
        .as_ref()
        .map_or(EnrollmentStatus::Pending, |e| e.status.asked_again());
    let becomes_pending = status == EnrollmentStatus::Pending
        && existing
            .as_ref()
            .is_none_or(|e| e.status != EnrollmentStatus::Pending);
    if becomes_pending {
        let (total, here): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE source_addr = $1) FROM enrollments \
             WHERE status = 'pending'",
        )
        .bind(request.source_addr)
        .fetch_one(&mut *conn)
        .await
        .map_err(write_error)?;
        if let Some(cap) = limits.exceeded(total, here) {
            return Ok(Noted::TooMany(cap));
        }
    }
    let row = match existing {
        Some(e) => {
            let restart = status != e.status;
            sqlx::query(concat!(
                "UPDATE enrollments SET identity = $2, source_addr = $3, last_seen = $4, \
                 reason = $5, status = $6, \
                 decided_at = CASE WHEN $7 THEN NULL ELSE decided_at END, \
                 decided_by = CASE WHEN $7 THEN NULL ELSE decided_by END \
                 WHERE enrollment_id = $1 RETURNING ",
                enrollment_columns!()
            ))
            .bind(e.id)
            .bind(request.identity)
            .bind(request.source_addr)
            .bind(now)
            .bind(request.reason)
            .bind(status.as_str())
            .bind(restart)
            .fetch_one(&mut *conn)
            .await
        }
        None => {
            sqlx::query(concat!(
                "INSERT INTO enrollments (enrollment_id, robot_id, key_fingerprint, identity, \
                 source_addr, status, first_seen, last_seen, reason) \
                 VALUES ($1, $2, $3, $4, $5, 'pending', $6, $6, $7) RETURNING ",
                enrollment_columns!()
            ))
            .bind(Uuid::new_v4())
            .bind(request.robot_id.0)
            .bind(request.key_fingerprint)
            .bind(request.identity)
            .bind(request.source_addr)
            .bind(now)
            .bind(request.reason)
            .fetch_one(&mut *conn)
            .await
        }
    }
    .map_err(write_error)?;
    decode::enrollment(&row).map(Noted::Recorded)
}

/// Moves an enrollment on its locked row, inside a transaction.
async fn decide_in(
    conn: &mut PgConnection,
    id: Uuid,
    to: EnrollmentStatus,
    by: &str,
    now: DateTime<Utc>,
) -> Result<Option<EnrollmentRecord>, StoreError> {
    let Some(row) = sqlx::query(concat!(
        "SELECT ",
        enrollment_columns!(),
        " FROM enrollments WHERE enrollment_id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(write_error)?
    else {
        return Ok(None);
    };
    let current = decode::enrollment(&row)?;
    if !current.status.can_become(to) {
        return Err(refused_move(id, current.status, to));
    }
    let (decided_at, decided_by) = if to == EnrollmentStatus::Issued {
        (current.decided_at, current.decided_by)
    } else {
        (Some(now), Some(by.to_string()))
    };
    let row = sqlx::query(concat!(
        "UPDATE enrollments SET status = $2, decided_at = $3, decided_by = $4 \
         WHERE enrollment_id = $1 RETURNING ",
        enrollment_columns!()
    ))
    .bind(id)
    .bind(to.as_str())
    .bind(decided_at)
    .bind(decided_by)
    .fetch_one(&mut *conn)
    .await
    .map_err(write_error)?;
    decode::enrollment(&row).map(Some)
}

// ---------------------------------------------------------------------------
// Decoding.
