//! The auth store on the embedded SQLite database (see [`crate::store::auth`]).
//!
//! **Writes** go through a pool of their own holding one connection,
//! opened with the options of every connection of the store (WAL,
//! `synchronous = FULL`, the busy timeout), so a committed auth write is as
//! durable as an append. Each is one `BEGIN IMMEDIATE` transaction: it
//! takes SQLite's write lock before it reads, so the check and the change
//! of a token use see no other writer in between (and a deferred
//! transaction cannot fail to upgrade when the writer commits meanwhile).
//!
//! Why a connection of their own rather than the read pool (as discovery
//! sessions are written): a burst of auth writes (a batch of robots
//! enrolling at once) would otherwise take every read connection while
//! queueing for the write lock, and fight the event writer for it many at
//! a time, each retrying on SQLite's busy handler, which is not fair (it
//! sleeps up to 100 ms between tries, so a crowd can keep the writer
//! waiting). With one connection, auth writes queue in the pool instead:
//! at most one of them waits for or holds the lock beside the writer, for
//! a few statements on local data, awaiting nothing but SQLite, so the
//! writer waits at most that long. Why not through the writer task: its
//! queue is for group-committed appends of the log and their feed; auth
//! writes are rare and publish nothing. A transaction dropped half-way (a
//! cancelled request) is rolled back by sqlx's `Transaction`, so it cannot
//! keep the lock.
//!
//! **Reads** use the store's read pool; each is one statement, so it sees
//! one committed state.

use super::rows::{read_error, timestamp, to_json, write_error};
use crate::store::StoreError;
use crate::store::auth::{
    ApiTokenRecord, AuthStore, CertificateRecord, EndedEnrollments, EnrollmentCursor,
    EnrollmentRecord, EnrollmentStatus, EnrollmentTokenRecord, NewEnrollment, Noted, PendingLimits,
    TokenUse, refused_move,
};
use crate::store::rows as decode;
use chrono::{DateTime, Utc};
use kiwi_protocol::RobotId;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqlitePool, SqlitePoolOptions};
use sqlx::{Sqlite, Transaction};
use std::time::Duration;
use uuid::Uuid;

/// How long an auth write may wait for the write connection: behind the
/// auth writes queued before it, each bounded by the busy timeout.
const WRITE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The auth store of a [`super::SqliteStore`]: its read pool, and
/// a write pool of one connection (see the module doc).
#[derive(Debug)]
pub struct SqliteAuthStore {
    reads: SqlitePool,
    writes: SqlitePool,
}

impl SqliteAuthStore {
    /// Over the store's read pool; the write connection is opened with
    /// `options` when first needed.
    pub(super) fn new(reads: SqlitePool, options: SqliteConnectOptions) -> SqliteAuthStore {
        let writes = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(WRITE_ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        SqliteAuthStore { reads, writes }
    }

    /// Closes the write connection (the read pool is the store's).
    pub(super) async fn close(&self) {
        self.writes.close().await;
    }

    /// A write transaction holding SQLite's write lock.
    async fn write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.writes
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(write_error)
    }
}

/// Commits after `result` succeeded, rolls back otherwise.
async fn finish<T>(
    tx: Transaction<'static, Sqlite>,
    result: Result<T, StoreError>,
) -> Result<T, StoreError> {
    match result {
        Ok(v) => {
            tx.commit().await.map_err(write_error)?;
            Ok(v)
        }
        Err(e) => {
            // The error is the caller's answer; a failed rollback leaves
            // nothing behind either (the connection is then closed).
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

#[async_trait::async_trait]
impl AuthStore for SqliteAuthStore {
    async fn insert_api_token(&self, token: &ApiTokenRecord) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        let written = sqlx::query(concat!(
            "INSERT INTO api_tokens (",
            api_token_columns!(),
            ") VALUES (?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(&token.id)
        .bind(&token.name)
        .bind(token.role.as_str())
        .bind(&token.secret_hash)
        .bind(timestamp(&token.created_at))
        .bind(token.expires_at.as_ref().map(timestamp))
        .bind(token.revoked_at.as_ref().map(timestamp))
        .execute(&mut *tx)
        .await
        .map(drop)
        .map_err(write_error);
        finish(tx, written).await
    }

    async fn api_token(&self, id: &str) -> Result<Option<ApiTokenRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            api_token_columns!(),
            " FROM api_tokens WHERE token_id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.reads)
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
        .fetch_all(&self.reads)
        .await
        .map_err(read_error)?
        .iter()
        .map(decode::api_token)
        .collect()
    }

    async fn revoke_api_token(&self, id: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let found = sqlx::query(
            "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE token_id = ?",
        )
        .bind(timestamp(&now))
        .bind(id)
        .execute(&mut *tx)
        .await
        .map(|done| done.rows_affected() > 0)
        .map_err(write_error);
        finish(tx, found).await
    }

    async fn insert_enrollment_token(
        &self,
        token: &EnrollmentTokenRecord,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        let written = sqlx::query(concat!(
            "INSERT INTO enrollment_tokens (",
            enrollment_token_columns!(),
            ") VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(&token.id)
        .bind(&token.secret_hash)
        .bind(timestamp(&token.created_at))
        .bind(timestamp(&token.expires_at))
        .bind(i64::from(token.uses_total))
        .bind(i64::from(token.uses_left))
        .bind(token.revoked_at.as_ref().map(timestamp))
        .bind(token.robot_id.map(|r| r.to_string()))
        .execute(&mut *tx)
        .await
        .map(drop)
        .map_err(write_error);
        finish(tx, written).await
    }

    async fn enrollment_tokens(&self) -> Result<Vec<EnrollmentTokenRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            enrollment_token_columns!(),
            " FROM enrollment_tokens ORDER BY created_at, token_id"
        ))
        .fetch_all(&self.reads)
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
        let mut tx = self.write().await?;
        let found = sqlx::query(
            "UPDATE enrollment_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE token_id = ?",
        )
        .bind(timestamp(&now))
        .bind(id)
        .execute(&mut *tx)
        .await
        .map(|done| done.rows_affected() > 0)
        .map_err(write_error);
        finish(tx, found).await
    }

    async fn enrollment_token(
        &self,
        id: &str,
    ) -> Result<Option<EnrollmentTokenRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            enrollment_token_columns!(),
            " FROM enrollment_tokens WHERE token_id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.reads)
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
        let mut tx = self.write().await?;
        let used = use_token_in(&mut tx, id, secret_hash, robot, now).await;
        finish(tx, used).await
    }

    async fn note_enrollment(
        &self,
        request: NewEnrollment<'_>,
        limits: PendingLimits,
        now: DateTime<Utc>,
    ) -> Result<Noted, StoreError> {
        let mut tx = self.write().await?;
        let noted = note_in(&mut tx, request, limits, now).await;
        finish(tx, noted).await
    }

    async fn enrollment(&self, id: Uuid) -> Result<Option<EnrollmentRecord>, StoreError> {
        let mut conn = self.reads.acquire().await.map_err(read_error)?;
        load_enrollment(&mut conn, id).await
    }

    async fn enrollments(
        &self,
        status: Option<EnrollmentStatus>,
        after: Option<EnrollmentCursor>,
        limit: u32,
    ) -> Result<Vec<EnrollmentRecord>, StoreError> {
        // Timestamps are stored as fixed-width RFC 3339 text, so they
        // compare as they sort.
        sqlx::query(concat!(
            "SELECT ",
            enrollment_columns!(),
            " FROM enrollments WHERE status = COALESCE(?, status) \
             AND (? IS NULL OR (first_seen, enrollment_id) > (?, ?)) \
             ORDER BY first_seen, enrollment_id LIMIT ?"
        ))
        .bind(status.map(EnrollmentStatus::as_str))
        .bind(after.map(|_| 1))
        .bind(after.map(|c| timestamp(&c.first_seen)))
        .bind(after.map(|c| c.id.to_string()))
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
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
        let mut tx = self.write().await?;
        let ended = async {
            let enrollments = sqlx::query(
                "UPDATE enrollments SET status = 'revoked', decided_at = ?, decided_by = ? \
                 WHERE robot_id = ? AND status IN ('pending', 'approved', 'issued')",
            )
            .bind(timestamp(&now))
            .bind(by)
            .bind(robot_id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(write_error)?
            .rows_affected();
            let tokens = sqlx::query(
                "UPDATE enrollment_tokens SET revoked_at = ? \
                 WHERE robot_id = ? AND revoked_at IS NULL",
            )
            .bind(timestamp(&now))
            .bind(robot_id.to_string())
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
        let mut tx = self.write().await?;
        let expired =
            sqlx::query("DELETE FROM enrollments WHERE status = 'pending' AND last_seen < ?")
                .bind(timestamp(&before))
                .execute(&mut *tx)
                .await
                .map(|done| done.rows_affected())
                .map_err(write_error);
        finish(tx, expired).await
    }

    async fn decide_enrollment(
        &self,
        id: Uuid,
        to: EnrollmentStatus,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<EnrollmentRecord>, StoreError> {
        let mut tx = self.write().await?;
        let decided = decide_in(&mut tx, id, to, by, now).await;
        finish(tx, decided).await
    }

    async fn insert_certificate(&self, cert: &CertificateRecord) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        let written = sqlx::query(concat!(
            "INSERT INTO certificates (",
            certificate_columns!(),
            ") VALUES (?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(&cert.serial)
        .bind(cert.robot_id.to_string())
        .bind(&cert.key_fingerprint)
        .bind(timestamp(&cert.not_before))
        .bind(timestamp(&cert.not_after))
        .bind(timestamp(&cert.issued_at))
        .bind(cert.revoked_at.as_ref().map(timestamp))
        .execute(&mut *tx)
        .await
        .map(drop)
        .map_err(write_error);
        finish(tx, written).await
    }

    async fn certificates(&self, robot_id: RobotId) -> Result<Vec<CertificateRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            certificate_columns!(),
            " FROM certificates WHERE robot_id = ? ORDER BY issued_at, serial"
        ))
        .bind(robot_id.to_string())
        .fetch_all(&self.reads)
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
        let mut tx = self.write().await?;
        let revoked = sqlx::query(
            "UPDATE certificates SET revoked_at = ? WHERE robot_id = ? AND revoked_at IS NULL",
        )
        .bind(timestamp(&now))
        .bind(robot_id.to_string())
        .execute(&mut *tx)
        .await
        .map(|done| done.rows_affected())
        .map_err(write_error);
        finish(tx, revoked).await
    }

    async fn revoked_serials(&self, now: DateTime<Utc>) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL AND not_after > ? \
             ORDER BY serial",
        )
        .bind(timestamp(&now))
        .fetch_all(&self.reads)
        .await
        .map_err(read_error)
    }
}

/// Checks a token use and takes it, inside a write transaction.
async fn use_token_in(
    conn: &mut SqliteConnection,
    id: &str,
    secret_hash: &str,
    robot: RobotId,
    now: DateTime<Utc>,
) -> Result<TokenUse, StoreError> {
    let Some(row) = sqlx::query(concat!(
        "SELECT ",
        enrollment_token_columns!(),
        " FROM enrollment_tokens WHERE token_id = ?"
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
        sqlx::query("UPDATE enrollment_tokens SET uses_left = ? WHERE token_id = ?")
            .bind(i64::from(uses_left))
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(write_error)?;
    }
    Ok(outcome)
}

/// Records an enrollment request, inside a write transaction (see
/// [`AuthStore::note_enrollment`]): the transaction holds SQLite's write
/// lock, so the counts and the insert see no other writer in between.
async fn note_in(
    conn: &mut SqliteConnection,
    request: NewEnrollment<'_>,
    limits: PendingLimits,
    now: DateTime<Utc>,
) -> Result<Noted, StoreError> {
    let robot = request.robot_id.to_string();
    let existing = sqlx::query(concat!(
        "SELECT ",
        enrollment_columns!(),
        " FROM enrollments WHERE robot_id = ? AND key_fingerprint = ?"
    ))
    .bind(&robot)
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
            "SELECT COUNT(*), COALESCE(SUM(source_addr = ?), 0) FROM enrollments \
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
    let identity = to_json(request.identity)?;
    let row = match existing {
        Some(e) => {
            let restart = status != e.status;
            sqlx::query(concat!(
                "UPDATE enrollments SET identity = ?, source_addr = ?, last_seen = ?, \
                 reason = ?, status = ?, \
                 decided_at = CASE WHEN ? THEN NULL ELSE decided_at END, \
                 decided_by = CASE WHEN ? THEN NULL ELSE decided_by END \
                 WHERE enrollment_id = ? RETURNING ",
                enrollment_columns!()
            ))
            .bind(identity)
            .bind(request.source_addr)
            .bind(timestamp(&now))
            .bind(request.reason)
            .bind(status.as_str())
            .bind(restart)
            .bind(restart)
            .bind(e.id.to_string())
            .fetch_one(&mut *conn)
            .await
        }
        None => {
            sqlx::query(concat!(
                "INSERT INTO enrollments (enrollment_id, robot_id, key_fingerprint, identity, \
                 source_addr, status, first_seen, last_seen, reason) \
                 VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?) RETURNING ",
                enrollment_columns!()
            ))
            .bind(Uuid::new_v4().to_string())
            .bind(&robot)
            .bind(request.key_fingerprint)
            .bind(identity)
            .bind(request.source_addr)
            .bind(timestamp(&now))
            .bind(timestamp(&now))
            .bind(request.reason)
            .fetch_one(&mut *conn)
            .await
        }
    }
    .map_err(write_error)?;
    decode::enrollment(&row).map(Noted::Recorded)
}

/// Moves an enrollment, inside a write transaction.
async fn decide_in(
    conn: &mut SqliteConnection,
    id: Uuid,
    to: EnrollmentStatus,
    by: &str,
    now: DateTime<Utc>,
) -> Result<Option<EnrollmentRecord>, StoreError> {
    let Some(current) = load_enrollment(conn, id).await? else {
        return Ok(None);
    };
    if !current.status.can_become(to) {
        return Err(refused_move(id, current.status, to));
    }
    let (decided_at, decided_by) = if to == EnrollmentStatus::Issued {
        (current.decided_at, current.decided_by.clone())
    } else {
        (Some(now), Some(by.to_string()))
    };
    let row = sqlx::query(concat!(
        "UPDATE enrollments SET status = ?, decided_at = ?, decided_by = ? \
         WHERE enrollment_id = ? RETURNING ",
        enrollment_columns!()
    ))
    .bind(to.as_str())
    .bind(decided_at.as_ref().map(timestamp))
    .bind(decided_by)
    .bind(id.to_string())
    .fetch_one(&mut *conn)
    .await
    .map_err(write_error)?;
    decode::enrollment(&row).map(Some)
}

async fn load_enrollment(
    conn: &mut SqliteConnection,
    id: Uuid,
) -> Result<Option<EnrollmentRecord>, StoreError> {
    sqlx::query(concat!(
        "SELECT ",
        enrollment_columns!(),
        " FROM enrollments WHERE enrollment_id = ?"
    ))
    .bind(id.to_string())
    .fetch_optional(&mut *conn)
    .await
    .map_err(read_error)?
    .as_ref()
    .map(decode::enrollment)
    .transpose()
}

// ---------------------------------------------------------------------------
// Decoding.
