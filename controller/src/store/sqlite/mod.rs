//! The embedded event store: one SQLite file in the controller's state
//! directory.
//!
//! **Durability.** The database runs in WAL mode with `synchronous = FULL`:
//! a transaction is committed only once its WAL frames are fsynced, so an
//! append that was answered survives a crash or a power loss. WAL also lets
//! the small read pool run beside the writer without blocking it. The schema
//! lives only in `migrations/sqlite/`, applied by [`SqliteStore::open`].
//!
//! **Group commit.** Every append goes over a bounded channel to one writer
//! task, which owns the only writing connection. It takes the first waiting
//! append, drains whatever else is already queued (up to [`BATCH_CAP`]) and
//! writes them all in one `BEGIN IMMEDIATE` transaction, so a burst of
//! appends from many robots costs one fsync. Each append runs inside its own
//! savepoint: a version conflict or an invalid append is rolled back alone
//! and answered with its error while the rest of the batch commits. Appends
//! for the same robot in one batch see each other, in queue order. No caller
//! is answered before the commit that holds its data; if that commit fails,
//! every caller of the batch gets [`StoreError::Unavailable`].
//!
//! **Checks.** Besides the version, the writer applies the new events to the
//! stored row ([`Robot::apply`]) and refuses an append whose events do not
//! apply or whose row is in another lifecycle state than they lead to: the
//! row stays what a replay of the log gives. Events are stored exactly as
//! the caller made them, `recorded_at` included, and the row exactly as
//! given. Timestamps are kept to the nanosecond, so what is read back
//! compares equal to what was written.
//!
//! **The feed.** After the commit and after the answers, the writer
//! publishes one [`Committed`] per successful append, in log order, on a
//! broadcast channel ([`EventStore::subscribe`]).

use super::auth::AuthStore;
use super::checks::{check_against_log, check_shape, records_of};
use super::{
    Append, BreakerColumns, Committed, DiscoveryResult, DiscoverySession, EventStore, Fence,
    History, PruneOutcome, SightingMethod, SightingOutcome, Snapshot, StoreError, StoredBreaker,
    StoredReport,
};
use crate::domain::{EventRecord, Robot};
use crate::store::rows::{self as decode, Columns};
use auth::SqliteAuthStore;
use chrono::{DateTime, SecondsFormat, Utc};
use kiwi_protocol::RobotId;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Row, Sqlite};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use uuid::Uuid;

/// The most appends written in one transaction.
pub const BATCH_CAP: usize = 256;
/// Appends waiting for the writer; a full queue makes `append` wait.
const WRITE_QUEUE: usize = 1024;
/// Commits a slow subscriber may fall behind before it lags.
const FEED_CAPACITY: usize = 4096;
const READ_CONNECTIONS: u32 = 4;
/// How long a connection waits for SQLite's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The columns of `robot_states`, as [`decode::robot`] reads them.
macro_rules! robot_columns {
    () => {
        "robot_id, version, state, health, hostname, ip_address, robot_type, model, \
         firmware_version, agent_version, deployment_version, hardware_id, mac_addresses, \
         last_heartbeat, last_state_change, failure_count, config, capabilities, metadata, \
         discovered_at, provisioned_at, activated_at, updated_at, last_report_seq, last_report"
    };
}

/// The columns of `events`, as [`decode::event`] reads them.
macro_rules! event_columns {
    () => {
        "position, event_id, robot_id, version, event_type, data, metadata, recorded_at"
    };
}

static MIGRATOR: Migrator = sqlx::migrate!("../migrations/sqlite");

type Reply = oneshot::Sender<Result<Vec<EventRecord>, StoreError>>;

#[derive(Debug)]
enum WriteRequest {
    /// Boxed: a row is large, and the queue holds many requests.
    Append { append: Box<Append>, reply: Reply },
    /// Finish what is queued before it, close the connection, then answer.
    Close { done: oneshot::Sender<()> },
}

/// The SQLite event store. Reads go through a small pool; appends through
/// the writer task, which ends when the store is closed or dropped.
/// Discovery sessions, rare and not part of the log, are written through
/// the pool, waiting for the writer's lock under the busy timeout.
/// Security records are written through a pool of their own
/// ([`SqliteAuthStore`]).
#[derive(Debug)]
pub struct SqliteStore {
    reads: SqlitePool,
    writes: mpsc::Sender<WriteRequest>,
    feed: broadcast::Sender<Arc<Committed>>,
    batches: Arc<AtomicU64>,
    auth: Arc<SqliteAuthStore>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `path`, applies the
    /// migrations and starts the writer task. Needs a Tokio runtime.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(path, BUSY_TIMEOUT).await
    }

    async fn open_with(path: &Path, busy_timeout: Duration) -> Result<SqliteStore, StoreError> {
        let options = connect_options(path, busy_timeout);
        let mut writer = options
            .connect()
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        MIGRATOR.run(&mut writer).await.map_err(|e| {
            StoreError::Unavailable(format!("cannot migrate {}: {e}", path.display()))
        })?;
        let reads = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let batches = Arc::new(AtomicU64::new(0));
        Writer::start(writer, feed.clone(), batches.clone(), queue);
        let auth = Arc::new(SqliteAuthStore::new(reads.clone(), options));
        Ok(SqliteStore {
            reads,
            writes,
            feed,
            batches,
            auth,
        })
    }

    /// Writes what is queued, then closes every connection. Later appends
    /// and reads fail with [`StoreError::Unavailable`].
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.writes.send(WriteRequest::Close { done }).await.is_ok() {
            // An error means the writer is already gone: closed either way.
            let _ = closed.await;
        }
        self.auth.close().await;
        self.reads.close().await;
    }

    /// How many write transactions were committed since `open`.
    pub fn batches_committed(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
}

fn connect_options(path: &Path, busy_timeout: Duration) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(busy_timeout)
}

#[async_trait::async_trait]
impl EventStore for SqliteStore {
    async fn append(&self, append: Append) -> Result<Vec<EventRecord>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(WriteRequest::Append {
                append: Box::new(append),
                reply,
            })
            .await
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        answer.await.map_err(|_| {
            StoreError::Unavailable("the store closed before the append was written".into())
        })?
    }

    async fn robot(&self, id: RobotId) -> Result<Option<Robot>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            robot_columns!(),
            " FROM robot_states WHERE robot_id = ?"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.reads)
        .await
        .map_err(read_error)?;
        row.as_ref().map(decode::robot).transpose()
    }

    async fn robots(&self) -> Result<Vec<Robot>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            robot_columns!(),
            " FROM robot_states ORDER BY robot_id"
        ))
        .fetch_all(&self.reads)
        .await
        .map_err(read_error)?;
        rows.iter().map(decode::robot).collect()
    }

    async fn robot_events(
        &self,
        id: RobotId,
        after_version: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE robot_id = ? AND version > ? ORDER BY version LIMIT ?"
        ))
        .bind(id.to_string())
        .bind(after_version)
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await
        .map_err(read_error)?;
        rows.iter().map(decode::event).collect()
    }

    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<EventRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE position > ? ORDER BY position LIMIT ?"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await
        .map_err(read_error)?;
        rows.iter().map(decode::event).collect()
    }

    async fn head(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
            .fetch_one(&self.reads)
            .await
            .map_err(read_error)
    }

    async fn reports(
        &self,
        id: RobotId,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<StoredReport>, StoreError> {
        let rows = sqlx::query(
            "SELECT robot_id, seq, time, received_at, health, workload, maintenance, telemetry \
             FROM robot_reports WHERE robot_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(id.to_string())
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await
        .map_err(read_error)?;
        rows.iter().map(decode::report).collect()
    }

    async fn record_discovery(
        &self,
        session: &DiscoverySession,
        fence: Option<&Fence>,
    ) -> Result<(), StoreError> {
        let mut conn = self.reads.acquire().await.map_err(read_error)?;
        immediate(&mut conn).await?;
        let written = record_discovery_in(&mut conn, session, fence).await;
        finish(&mut conn, written).await
    }

    async fn discovery(&self, id: Uuid) -> Result<Option<DiscoverySession>, StoreError> {
        let mut tx = self.reads.begin().await.map_err(read_error)?;
        let session = load_discovery(&mut tx, id).await?;
        tx.commit().await.map_err(read_error)?;
        Ok(session)
    }

    async fn history(&self, id: RobotId, at: Option<DateTime<Utc>>) -> Result<History, StoreError> {
        // One read transaction: snapshot, events and report from one state.
        let mut tx = self.reads.begin().await.map_err(read_error)?;
        let snapshot = load_snapshot(&mut *tx, id).await?;
        let after_version = snapshot.as_ref().map_or(0, |s| s.robot.version);
        let until = at.map_or_else(|| "9999".to_string(), |t| timestamp(&t));
        let events = sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE robot_id = ? AND version > ? AND recorded_at <= ? ORDER BY version"
        ))
        .bind(id.to_string())
        .bind(after_version)
        .bind(&until)
        .fetch_all(&mut *tx)
        .await
        .map_err(read_error)?
        .iter()
        .map(decode::event)
        .collect::<Result<Vec<_>, _>>()?;
        let last_report = sqlx::query(
            "SELECT robot_id, seq, time, received_at, health, workload, maintenance, telemetry \
             FROM robot_reports WHERE robot_id = ? AND received_at <= ? ORDER BY seq DESC LIMIT 1",
        )
        .bind(id.to_string())
        .bind(&until)
        .fetch_optional(&mut *tx)
        .await
        .map_err(read_error)?
        .as_ref()
        .map(decode::report)
        .transpose()?;
        tx.commit().await.map_err(read_error)?;
        Ok(History {
            snapshot,
            events,
            last_report,
        })
    }

    async fn snapshots(&self) -> Result<Vec<Snapshot>, StoreError> {
        sqlx::query("SELECT robot_id, robot, taken_at FROM robot_snapshots ORDER BY robot_id")
            .fetch_all(&self.reads)
            .await
            .map_err(read_error)?
            .iter()
            .map(decode::snapshot)
            .collect()
    }

    async fn latest_reports(&self) -> Result<Vec<StoredReport>, StoreError> {
        sqlx::query(
            "SELECT r.robot_id, r.seq, r.time, r.received_at, r.health, r.workload, \
             r.maintenance, r.telemetry FROM robot_reports r \
             JOIN (SELECT robot_id, MAX(seq) AS seq FROM robot_reports GROUP BY robot_id) m \
             ON r.robot_id = m.robot_id AND r.seq = m.seq ORDER BY r.robot_id",
        )
        .fetch_all(&self.reads)
        .await
        .map_err(read_error)?
        .iter()
        .map(decode::report)
        .collect()
    }

    async fn prune(&self, before: DateTime<Utc>) -> Result<PruneOutcome, StoreError> {
        let cutoff = timestamp(&before);
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT robot_id FROM events WHERE recorded_at < ?")
                .bind(&cutoff)
                .fetch_all(&self.reads)
                .await
                .map_err(read_error)?;
        let mut outcome = PruneOutcome::default();
        let mut conn = self.reads.acquire().await.map_err(read_error)?;
        for raw in ids {
            let id: RobotId = raw
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("robot id {raw:?} in events: {e}")))?;
            immediate(&mut conn).await?;
            let folded = fold_into_snapshot(&mut conn, id, &cutoff).await;
            if let Some(n) = finish(&mut conn, folded).await? {
                outcome.robots += 1;
                outcome.events_removed += n;
            }
        }
        immediate(&mut conn).await?;
        let reports = sqlx::query(
            "DELETE FROM robot_reports WHERE received_at < ? AND seq < \
             (SELECT MAX(seq) FROM robot_reports r2 WHERE r2.robot_id = robot_reports.robot_id)",
        )
        .bind(&cutoff)
        .execute(&mut *conn)
        .await
        .map(|r| r.rows_affected())
        .map_err(write_error);
        outcome.reports_removed = finish(&mut conn, reports).await?;
        Ok(outcome)
    }

    async fn breakers(&self) -> Result<Vec<StoredBreaker>, StoreError> {
        sqlx::query(
            "SELECT robot_id, state, failure_count, success_count, opened_at, updated_at \
             FROM circuit_breakers ORDER BY robot_id",
        )
        .fetch_all(&self.reads)
        .await
        .map_err(read_error)?
        .iter()
        .map(|row| {
            let decoded = (|| {
                let state: String = col(row, "state")?;
                Ok::<_, String>(StoredBreaker {
                    robot_id: RobotId(uuid_col(row, "robot_id")?),
                    state: BreakerColumns::decode(
                        &state,
                        col(row, "failure_count")?,
                        col(row, "success_count")?,
                        opt_time_col(row, "opened_at")?,
                    )?,
                    updated_at: time_col(row, "updated_at")?,
                })
            })();
            decoded.map_err(|e| {
                let id = row.try_get::<String, _>("robot_id").unwrap_or_default();
                StoreError::Corrupt(format!("circuit breaker of robot {id}: {e}"))
            })
        })
        .collect()
    }

    async fn save_breaker(&self, breaker: &StoredBreaker) -> Result<(), StoreError> {
        let c = BreakerColumns::of(&breaker.state);
        // One statement: atomic on its own, waiting for the writer's lock
        // within the busy timeout.
        sqlx::query(
            "INSERT INTO circuit_breakers \
             (robot_id, state, failure_count, success_count, opened_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (robot_id) DO UPDATE SET state = excluded.state, \
             failure_count = excluded.failure_count, success_count = excluded.success_count, \
             opened_at = excluded.opened_at, updated_at = excluded.updated_at",
        )
        .bind(breaker.robot_id.to_string())
        .bind(c.state)
        .bind(c.failure_count)
        .bind(c.success_count)
        .bind(c.opened_at.as_ref().map(timestamp))
        .bind(timestamp(&breaker.updated_at))
        .execute(&self.reads)
        .await
        .map_err(write_error)?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.reads)
            .await
            .map_err(read_error)?;
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Committed>> {
        self.feed.subscribe()
    }

    fn auth(&self) -> Arc<dyn AuthStore> {
        self.auth.clone()
    }
}

// ---------------------------------------------------------------------------
// History, pruning and fences (written through the pool under
// `BEGIN IMMEDIATE`, waiting for the writer's lock within the busy timeout).

/// Starts a write transaction at once (a deferred one could fail to upgrade
/// when the writer commits in between).
async fn immediate(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *conn)
        .await
        .map_err(write_error)?;
    Ok(())
}

/// Commits after `result` succeeded, rolls back otherwise.
async fn finish<T>(
    conn: &mut SqliteConnection,
    result: Result<T, StoreError>,
) -> Result<T, StoreError> {
    match result {
        Ok(v) => {
            sqlx::query("COMMIT")
                .execute(&mut *conn)
                .await
                .map_err(write_error)?;
            Ok(v)
        }
        Err(e) => {
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            Err(e)
        }
    }
}

async fn record_discovery_in(
    conn: &mut SqliteConnection,
    session: &DiscoverySession,
    fence: Option<&Fence>,
) -> Result<(), StoreError> {
    if let Some(f) = fence {
        let token = i64::try_from(f.token)
            .map_err(|_| StoreError::Invalid(format!("fencing token {} too large", f.token)))?;
        let current: Option<i64> =
            sqlx::query_scalar("SELECT token FROM fences WHERE resource = ?")
                .bind(&f.resource)
                .fetch_optional(&mut *conn)
                .await
                .map_err(write_error)?;
        if let Some(current) = current.filter(|c| *c > token) {
            return Err(StoreError::Fenced {
                resource: f.resource.clone(),
                token: f.token,
                current: u64::try_from(current).unwrap_or(0),
            });
        }
        sqlx::query(
            "INSERT INTO fences (resource, token) VALUES (?, ?) \
             ON CONFLICT (resource) DO UPDATE SET token = excluded.token",
        )
        .bind(&f.resource)
        .bind(token)
        .execute(&mut *conn)
        .await
        .map_err(write_error)?;
    }
    sqlx::query(
        "INSERT INTO discovery_sessions \
         (session_id, methods, started_at, finished_at, duration_ms, robots_found, new_robots) \
         VALUES (?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (session_id) DO UPDATE SET methods = excluded.methods, \
         started_at = excluded.started_at, finished_at = excluded.finished_at, \
         duration_ms = excluded.duration_ms, robots_found = excluded.robots_found, \
         new_robots = excluded.new_robots",
    )
    .bind(session.session_id.to_string())
    .bind(to_json(&session.methods)?)
    .bind(timestamp(&session.started_at))
    .bind(timestamp(&session.finished_at))
    .bind(session.duration_ms)
    .bind(session.robots_found)
    .bind(session.new_robots)
    .execute(&mut *conn)
    .await
    .map_err(write_error)?;
    sqlx::query("DELETE FROM discovery_results WHERE session_id = ?")
        .bind(session.session_id.to_string())
        .execute(&mut *conn)
        .await
        .map_err(write_error)?;
    for (ordinal, r) in session.results.iter().enumerate() {
        sqlx::query(
            "INSERT INTO discovery_results (session_id, ordinal, ip_address, robot_id, method, \
             found_at, mac_address, robot_type, outcome, detail) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(session.session_id.to_string())
        .bind(ordinal as i64)
        .bind(&r.ip_address)
        .bind(r.robot_id.map(|id| id.to_string()))
        .bind(r.method.as_str())
        .bind(timestamp(&r.found_at))
        .bind(&r.mac_address)
        .bind(&r.robot_type)
        .bind(r.outcome.as_str())
        .bind(&r.detail)
        .execute(&mut *conn)
        .await
        .map_err(write_error)?;
    }
    Ok(())
}

/// A recorded discovery round and its results, in the order found.
async fn load_discovery(
    conn: &mut SqliteConnection,
    id: Uuid,
) -> Result<Option<DiscoverySession>, StoreError> {
    let Some(row) = sqlx::query(
        "SELECT session_id, methods, started_at, finished_at, duration_ms, robots_found, \
         new_robots FROM discovery_sessions WHERE session_id = ?",
    )
    .bind(id.to_string())
    .fetch_optional(&mut *conn)
    .await
    .map_err(read_error)?
    else {
        return Ok(None);
    };
    let corrupt = |e: String| StoreError::Corrupt(format!("discovery session {id}: {e}"));
    let mut session = DiscoverySession {
        session_id: uuid_col(&row, "session_id").map_err(corrupt)?,
        methods: json_col(&row, "methods").map_err(corrupt)?,
        started_at: time_col(&row, "started_at").map_err(corrupt)?,
        finished_at: time_col(&row, "finished_at").map_err(corrupt)?,
        duration_ms: col(&row, "duration_ms").map_err(corrupt)?,
        robots_found: col(&row, "robots_found").map_err(corrupt)?,
        new_robots: col(&row, "new_robots").map_err(corrupt)?,
        results: Vec::new(),
    };
    let rows = sqlx::query(
        "SELECT ip_address, robot_id, method, found_at, mac_address, robot_type, outcome, \
         detail FROM discovery_results WHERE session_id = ? ORDER BY ordinal",
    )
    .bind(id.to_string())
    .fetch_all(&mut *conn)
    .await
    .map_err(read_error)?;
    for row in &rows {
        let robot_id: Option<String> = col(row, "robot_id").map_err(corrupt)?;
        session.results.push(DiscoveryResult {
            ip_address: col(row, "ip_address").map_err(corrupt)?,
            robot_id: robot_id
                .map(|t| t.parse::<Uuid>().map(RobotId))
                .transpose()
                .map_err(|e| corrupt(format!("robot_id: {e}")))?,
            method: col::<String>(row, "method")
                .and_then(|m| SightingMethod::parse(&m))
                .map_err(corrupt)?,
            found_at: time_col(row, "found_at").map_err(corrupt)?,
            mac_address: col(row, "mac_address").map_err(corrupt)?,
            robot_type: col(row, "robot_type").map_err(corrupt)?,
            outcome: col::<String>(row, "outcome")
                .and_then(|o| SightingOutcome::parse(&o))
                .map_err(corrupt)?,
            detail: col(row, "detail").map_err(corrupt)?,
        });
    }
    Ok(Some(session))
}

async fn load_snapshot<'c, E>(executor: E, id: RobotId) -> Result<Option<Snapshot>, StoreError>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    sqlx::query("SELECT robot_id, robot, taken_at FROM robot_snapshots WHERE robot_id = ?")
        .bind(id.to_string())
        .fetch_optional(executor)
        .await
        .map_err(read_error)?
        .as_ref()
        .map(decode::snapshot)
        .transpose()
}

/// Folds one robot's events recorded before `cutoff` into its snapshot and
/// deletes them; `None` when it had none. Folds by version (up to the
/// newest old event), so a clock that stepped back cannot leave a gap.
async fn fold_into_snapshot(
    conn: &mut SqliteConnection,
    id: RobotId,
    cutoff: &str,
) -> Result<Option<u64>, StoreError> {
    let upto: Option<i64> = sqlx::query_scalar(
        "SELECT MAX(version) FROM events WHERE robot_id = ? AND recorded_at < ?",
    )
    .bind(id.to_string())
    .bind(cutoff)
    .fetch_one(&mut *conn)
    .await
    .map_err(write_error)?;
    let Some(upto) = upto else {
        return Ok(None);
    };
    let snapshot = load_snapshot(&mut *conn, id).await?;
    let after = snapshot.as_ref().map_or(0, |s| s.robot.version);
    let events = sqlx::query(concat!(
        "SELECT ",
        event_columns!(),
        " FROM events WHERE robot_id = ? AND version > ? AND version <= ? ORDER BY version"
    ))
    .bind(id.to_string())
    .bind(after)
    .bind(upto)
    .fetch_all(&mut *conn)
    .await
    .map_err(write_error)?
    .iter()
    .map(decode::event)
    .collect::<Result<Vec<_>, _>>()?;
    let history = History {
        snapshot,
        events,
        last_report: None,
    };
    let robot = history
        .project()
        .map_err(|e| StoreError::Corrupt(format!("robot {id}: its events do not replay: {e}")))?
        .ok_or_else(|| StoreError::Corrupt(format!("robot {id}: nothing to snapshot")))?;
    sqlx::query(
        "INSERT INTO robot_snapshots (robot_id, version, robot, taken_at) VALUES (?, ?, ?, ?) \
         ON CONFLICT (robot_id) DO UPDATE SET version = excluded.version, \
         robot = excluded.robot, taken_at = excluded.taken_at",
    )
    .bind(id.to_string())
    .bind(robot.version)
    .bind(to_json(&robot)?)
    .bind(timestamp(&Utc::now()))
    .execute(&mut *conn)
    .await
    .map_err(write_error)?;
    let removed = sqlx::query("DELETE FROM events WHERE robot_id = ? AND version <= ?")
        .bind(id.to_string())
        .bind(upto)
        .execute(&mut *conn)
        .await
        .map_err(write_error)?
        .rows_affected();
    Ok(Some(removed))
}

pub mod auth;
mod rows;
mod writer;
use rows::*;
use writer::*;
#[cfg(test)]
mod tests;
