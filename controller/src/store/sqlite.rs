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
use super::sqlite_auth::SqliteAuthStore;
use super::{
    Append, BreakerColumns, Committed, DiscoveryResult, DiscoverySession, EventStore, Fence,
    History, PruneOutcome, SightingMethod, SightingOutcome, Snapshot, StoreError, StoredBreaker,
    StoredReport,
};
use crate::domain::robot::LastReport;
use crate::domain::{EventMetadata, EventRecord, Health, LifecycleState, Robot, RobotEvent};
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

/// The columns of `robot_states`, as [`decode_robot`] reads them.
macro_rules! robot_columns {
    () => {
        "robot_id, version, state, health, hostname, ip_address, robot_type, model, \
         firmware_version, agent_version, deployment_version, hardware_id, mac_addresses, \
         last_heartbeat, last_state_change, failure_count, config, capabilities, metadata, \
         discovered_at, provisioned_at, activated_at, updated_at, last_report_seq, last_report"
    };
}

/// The columns of `events`, as [`decode_event`] reads them.
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
        let writer = Writer {
            conn: writer,
            feed: feed.clone(),
            batches: batches.clone(),
        };
        tokio::spawn(writer.run(queue));
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
        row.as_ref().map(decode_robot).transpose()
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
        rows.iter().map(decode_robot).collect()
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
        rows.iter().map(decode_event).collect()
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
        rows.iter().map(decode_event).collect()
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
        rows.iter().map(decode_report).collect()
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
        .map(decode_event)
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
        .map(decode_report)
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
            .map(decode_snapshot)
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
        .map(decode_report)
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
        .map(decode_snapshot)
        .transpose()
}

fn decode_snapshot(row: &SqliteRow) -> Result<Snapshot, StoreError> {
    let fields = || -> Result<Snapshot, String> {
        Ok(Snapshot {
            robot: json_col(row, "robot")?,
            taken_at: time_col(row, "taken_at")?,
        })
    };
    fields().map_err(|e| {
        StoreError::Corrupt(format!("snapshot of robot {}: {e}", key(row, "robot_id")))
    })
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
    .map(decode_event)
    .collect::<Result<Vec<_>, _>>()?;
    let history = History {
        snapshot,
        events,
        last_report: None,
    };
    let robot = crate::replay::project(&history)
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

// ---------------------------------------------------------------------------
// The writer task.

/// Owns the only writing connection.
struct Writer {
    conn: SqliteConnection,
    feed: broadcast::Sender<Arc<Committed>>,
    batches: Arc<AtomicU64>,
}

impl Writer {
    async fn run(mut self, mut queue: mpsc::Receiver<WriteRequest>) {
        while let Some(first) = queue.recv().await {
            let mut batch = Vec::new();
            let mut close = None;
            match first {
                WriteRequest::Append { append, reply } => batch.push((*append, reply)),
                WriteRequest::Close { done } => close = Some(done),
            }
            while close.is_none() && batch.len() < BATCH_CAP {
                match queue.try_recv() {
                    Ok(WriteRequest::Append { append, reply }) => batch.push((*append, reply)),
                    Ok(WriteRequest::Close { done }) => close = Some(done),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.commit(batch).await;
            }
            if let Some(done) = close {
                self.shut(queue).await;
                let _ = done.send(());
                return;
            }
        }
        self.shut(queue).await;
    }

    /// Refuses what is still queued and closes the connection, which
    /// checkpoints the WAL if it is the last one.
    async fn shut(self, mut queue: mpsc::Receiver<WriteRequest>) {
        queue.close();
        while let Ok(request) = queue.try_recv() {
            if let WriteRequest::Close { done } = request {
                let _ = done.send(());
            }
        }
        if let Err(e) = self.conn.close().await {
            tracing::warn!(error = %e, "closing the event store's writer connection failed");
        }
    }

    /// Writes one batch in one transaction, answers its callers, then
    /// publishes what it committed.
    async fn commit(&mut self, batch: Vec<(Append, Reply)>) {
        let (appends, replies): (Vec<Append>, Vec<Reply>) = batch.into_iter().unzip();
        let count = appends.len();
        let outcomes = match write_batch(&mut self.conn, appends).await {
            Ok(outcomes) => outcomes,
            Err(e) => {
                tracing::error!(error = %e, appends = count, "event store commit failed");
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Unavailable(format!(
                        "the commit failed: {e}"
                    ))));
                }
                return;
            }
        };
        self.batches.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(appends = count, "event store batch committed");
        let mut published = Vec::with_capacity(count);
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            match outcome {
                Ok(committed) => {
                    let _ = reply.send(Ok(committed.events.clone()));
                    published.push(Arc::new(committed));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        for committed in published {
            // No subscriber is not an error: nobody is watching yet.
            let _ = self.feed.send(committed);
        }
    }
}

/// One transaction for the whole batch, one savepoint per append. The outer
/// error fails the whole batch; the inner results are each append's own.
async fn write_batch(
    conn: &mut SqliteConnection,
    appends: Vec<Append>,
) -> Result<Vec<Result<Committed, StoreError>>, sqlx::Error> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let mut outcomes = Vec::with_capacity(appends.len());
    for append in appends {
        let mut savepoint = tx.begin().await?;
        match write_append(&mut savepoint, append).await {
            Ok(committed) => {
                savepoint.commit().await?;
                outcomes.push(Ok(committed));
            }
            Err(e) => {
                savepoint.rollback().await?;
                outcomes.push(Err(e));
            }
        }
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// Checks and writes one append: events, row, report.
async fn write_append(
    conn: &mut SqliteConnection,
    append: Append,
) -> Result<Committed, StoreError> {
    let stored = load_robot(conn, append.robot_id).await?;
    let actual = stored.as_ref().map_or(0, |r| r.version);
    if actual != append.expected_version {
        return Err(StoreError::Conflict {
            robot_id: append.robot_id,
            expected: append.expected_version,
            actual,
        });
    }
    check_shape(&append)?;
    let mut records = records_of(&append);
    check_against_log(&append.robot, stored.as_ref().map(Robot::head), &records)?;
    let robot = append.robot;
    upsert_robot(conn, &robot).await?;
    for record in &mut records {
        record.position = insert_event(conn, record).await?;
    }
    if let Some(report) = &append.report {
        insert_report(conn, report).await?;
    }
    Ok(Committed {
        events: records,
        robot: Arc::new(robot),
    })
}

async fn load_robot(conn: &mut SqliteConnection, id: RobotId) -> Result<Option<Robot>, StoreError> {
    let row = sqlx::query(concat!(
        "SELECT ",
        robot_columns!(),
        " FROM robot_states WHERE robot_id = ?"
    ))
    .bind(id.to_string())
    .fetch_optional(&mut *conn)
    .await
    .map_err(write_error)?;
    row.as_ref().map(decode_robot).transpose()
}

async fn upsert_robot(conn: &mut SqliteConnection, robot: &Robot) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO robot_states (robot_id, version, state, health, hostname, ip_address, \
         robot_type, model, firmware_version, agent_version, deployment_version, hardware_id, \
         mac_addresses, last_heartbeat, last_state_change, failure_count, config, capabilities, \
         metadata, discovered_at, provisioned_at, activated_at, updated_at, last_report_seq, \
         last_report) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (robot_id) DO UPDATE SET version = excluded.version, \
         state = excluded.state, health = excluded.health, hostname = excluded.hostname, \
         ip_address = excluded.ip_address, robot_type = excluded.robot_type, \
         model = excluded.model, firmware_version = excluded.firmware_version, \
         agent_version = excluded.agent_version, \
         deployment_version = excluded.deployment_version, hardware_id = excluded.hardware_id, \
         mac_addresses = excluded.mac_addresses, last_heartbeat = excluded.last_heartbeat, \
         last_state_change = excluded.last_state_change, \
         failure_count = excluded.failure_count, config = excluded.config, \
         capabilities = excluded.capabilities, metadata = excluded.metadata, \
         discovered_at = excluded.discovered_at, provisioned_at = excluded.provisioned_at, \
         activated_at = excluded.activated_at, updated_at = excluded.updated_at, \
         last_report_seq = excluded.last_report_seq, last_report = excluded.last_report",
    )
    .bind(robot.robot_id.to_string())
    .bind(robot.version)
    .bind(robot.state.as_str())
    .bind(to_json(&robot.health)?)
    .bind(robot.hostname.clone())
    .bind(robot.ip_address.clone())
    .bind(robot.robot_type.clone())
    .bind(robot.model.clone())
    .bind(robot.firmware_version.clone())
    .bind(robot.agent_version.clone())
    .bind(robot.deployment_version.clone())
    .bind(robot.hardware_id.clone())
    .bind(to_json(&robot.mac_addresses)?)
    .bind(robot.last_heartbeat.as_ref().map(timestamp))
    .bind(timestamp(&robot.last_state_change))
    .bind(robot.failure_count)
    .bind(to_json(&robot.config)?)
    .bind(to_json(&robot.capabilities)?)
    .bind(to_json(&robot.metadata)?)
    .bind(timestamp(&robot.discovered_at))
    .bind(robot.provisioned_at.as_ref().map(timestamp))
    .bind(robot.activated_at.as_ref().map(timestamp))
    .bind(timestamp(&robot.updated_at))
    .bind(robot.last_report_seq)
    .bind(robot.last_report.as_ref().map(to_json).transpose()?)
    .execute(&mut *conn)
    .await
    .map_err(write_error)?;
    Ok(())
}

async fn insert_event(
    conn: &mut SqliteConnection,
    record: &EventRecord,
) -> Result<i64, StoreError> {
    let (event_type, data) = record.event.to_parts();
    sqlx::query_scalar(
        "INSERT INTO events (event_id, robot_id, version, event_type, data, metadata, recorded_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING position",
    )
    .bind(record.event_id.to_string())
    .bind(record.robot_id.to_string())
    .bind(record.version)
    .bind(event_type)
    .bind(data.to_string())
    .bind(to_json(&record.metadata)?)
    .bind(timestamp(&record.recorded_at))
    .fetch_one(&mut *conn)
    .await
    .map_err(write_error)
}

/// Stores a report unless one with its (robot, seq) is already stored.
async fn insert_report(
    conn: &mut SqliteConnection,
    report: &StoredReport,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO robot_reports \
         (robot_id, seq, time, received_at, health, workload, maintenance, telemetry) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (robot_id, seq) DO NOTHING",
    )
    .bind(report.robot_id.to_string())
    .bind(report.seq)
    .bind(timestamp(&report.time))
    .bind(timestamp(&report.received_at))
    .bind(to_json(&report.health)?)
    .bind(report.workload.as_str())
    .bind(report.maintenance)
    .bind(report.telemetry.to_string())
    .execute(&mut *conn)
    .await
    .map_err(write_error)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Encoding and decoding.

/// RFC 3339 in UTC with nine fractional digits: lossless, and fixed-width
/// so that text order is time order.
pub(super) fn timestamp(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

pub(super) fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::Invalid(format!("cannot encode as JSON: {e}")))
}

fn decode_robot(row: &SqliteRow) -> Result<Robot, StoreError> {
    robot_fields(row)
        .map_err(|e| StoreError::Corrupt(format!("robot_states row {}: {e}", key(row, "robot_id"))))
}

fn robot_fields(row: &SqliteRow) -> Result<Robot, String> {
    Ok(Robot {
        robot_id: RobotId(uuid_col(row, "robot_id")?),
        version: col(row, "version")?,
        state: state_col(row, "state")?,
        health: json_col::<Health>(row, "health")?,
        hostname: col(row, "hostname")?,
        ip_address: col(row, "ip_address")?,
        robot_type: col(row, "robot_type")?,
        model: col(row, "model")?,
        firmware_version: col(row, "firmware_version")?,
        agent_version: col(row, "agent_version")?,
        deployment_version: col(row, "deployment_version")?,
        hardware_id: col(row, "hardware_id")?,
        mac_addresses: json_col(row, "mac_addresses")?,
        last_heartbeat: opt_time_col(row, "last_heartbeat")?,
        last_state_change: time_col(row, "last_state_change")?,
        failure_count: col(row, "failure_count")?,
        config: json_col(row, "config")?,
        capabilities: json_col(row, "capabilities")?,
        metadata: json_col(row, "metadata")?,
        discovered_at: time_col(row, "discovered_at")?,
        provisioned_at: opt_time_col(row, "provisioned_at")?,
        activated_at: opt_time_col(row, "activated_at")?,
        updated_at: time_col(row, "updated_at")?,
        last_report_seq: col(row, "last_report_seq")?,
        last_report: opt_json_col::<LastReport>(row, "last_report")?,
    })
}

fn decode_event(row: &SqliteRow) -> Result<EventRecord, StoreError> {
    event_fields(row).map_err(|e| {
        StoreError::Corrupt(format!("event at position {}: {e}", key(row, "position")))
    })
}

fn event_fields(row: &SqliteRow) -> Result<EventRecord, String> {
    let event_type: String = col(row, "event_type")?;
    let data: serde_json::Value = json_col(row, "data")?;
    let event = RobotEvent::from_parts(&event_type, data)
        .map_err(|e| format!("event {event_type:?}: {e}"))?;
    Ok(EventRecord {
        position: col(row, "position")?,
        event_id: uuid_col(row, "event_id")?,
        robot_id: RobotId(uuid_col(row, "robot_id")?),
        version: col(row, "version")?,
        event,
        metadata: json_col::<EventMetadata>(row, "metadata")?,
        recorded_at: time_col(row, "recorded_at")?,
    })
}

fn decode_report(row: &SqliteRow) -> Result<StoredReport, StoreError> {
    report_fields(row).map_err(|e| {
        StoreError::Corrupt(format!(
            "report {} of robot {}: {e}",
            key(row, "seq"),
            key(row, "robot_id")
        ))
    })
}

fn report_fields(row: &SqliteRow) -> Result<StoredReport, String> {
    Ok(StoredReport {
        robot_id: RobotId(uuid_col(row, "robot_id")?),
        seq: col(row, "seq")?,
        time: time_col(row, "time")?,
        received_at: time_col(row, "received_at")?,
        health: json_col(row, "health")?,
        workload: crate::domain::Workload::parse(&col::<String>(row, "workload")?)?,
        maintenance: col(row, "maintenance")?,
        telemetry: json_col(row, "telemetry")?,
    })
}

/// A key column as text, for error messages about the row.
pub(super) fn key(row: &SqliteRow, name: &str) -> String {
    if let Ok(text) = row.try_get::<String, _>(name) {
        text
    } else if let Ok(number) = row.try_get::<i64, _>(name) {
        number.to_string()
    } else {
        format!("with an unreadable {name}")
    }
}

pub(super) fn col<'r, T>(row: &'r SqliteRow, name: &str) -> Result<T, String>
where
    T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    row.try_get(name).map_err(|e| format!("column {name}: {e}"))
}

pub(super) fn json_col<T: DeserializeOwned>(row: &SqliteRow, name: &str) -> Result<T, String> {
    let text: String = col(row, name)?;
    serde_json::from_str(&text).map_err(|e| format!("column {name}: {e}"))
}

fn opt_json_col<T: DeserializeOwned>(row: &SqliteRow, name: &str) -> Result<Option<T>, String> {
    let text: Option<String> = col(row, name)?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| format!("column {name}: {e}")))
        .transpose()
}

pub(super) fn uuid_col(row: &SqliteRow, name: &str) -> Result<Uuid, String> {
    let text: String = col(row, name)?;
    Uuid::parse_str(&text).map_err(|e| format!("column {name}: {e}"))
}

fn state_col(row: &SqliteRow, name: &str) -> Result<LifecycleState, String> {
    let text: String = col(row, name)?;
    text.parse().map_err(|e| format!("column {name}: {e}"))
}

fn parse_time(text: &str, name: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("column {name}: {text:?}: {e}"))
}

pub(super) fn time_col(row: &SqliteRow, name: &str) -> Result<DateTime<Utc>, String> {
    let text: String = col(row, name)?;
    parse_time(&text, name)
}

pub(super) fn opt_time_col(row: &SqliteRow, name: &str) -> Result<Option<DateTime<Utc>>, String> {
    let text: Option<String> = col(row, name)?;
    text.map(|t| parse_time(&t, name)).transpose()
}

// ---------------------------------------------------------------------------
// Errors.

/// SQLite's own report that the file is damaged or not a database.
fn is_corruption(e: &sqlx::Error) -> bool {
    const SQLITE_CORRUPT: i64 = 11;
    const SQLITE_NOTADB: i64 = 26;
    e.as_database_error()
        .and_then(|db| db.code())
        .and_then(|code| code.parse::<i64>().ok())
        .is_some_and(|code| matches!(code & 0xff, SQLITE_CORRUPT | SQLITE_NOTADB))
}

pub(super) fn read_error(e: sqlx::Error) -> StoreError {
    if is_corruption(&e) {
        StoreError::Corrupt(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

/// An error inside one append. A constraint the checks above did not catch
/// (a reused event id) is the caller's; the rest is the database's.
pub(super) fn write_error(e: sqlx::Error) -> StoreError {
    match e.as_database_error() {
        Some(db) if db.is_unique_violation() || db.is_check_violation() => {
            StoreError::Invalid(db.message().to_string())
        }
        _ => read_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::NewEvent;
    use crate::domain::event::IdentityFacts;
    use crate::domain::lifecycle::Transition;
    use kiwi_protocol::message::HealthStatus;
    use serde_json::json;
    use std::path::PathBuf;
    use tempfile::TempDir;
    use tokio::sync::broadcast::error::TryRecvError;

    async fn open_temp() -> (TempDir, PathBuf, SqliteStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("kiwi.db");
        let store = SqliteStore::open(&path).await.expect("open");
        (dir, path, store)
    }

    fn robot_id(n: u32) -> RobotId {
        RobotId(Uuid::from_u128(
            0x6b69_7769_0000_0000_0000_0000_0000_0000 + u128::from(n),
        ))
    }

    fn facts(n: u32) -> IdentityFacts {
        IdentityFacts {
            hostname: format!("lekiwi-{n}"),
            ip_address: Some(format!("192.168.{}.{}", n / 200, n % 200 + 2)),
            robot_type: "lekiwi".into(),
            model: Some("LeKiwi".into()),
            firmware_version: Some("1.4.0".into()),
            agent_version: Some("0.1.0".into()),
            hardware_id: format!("pi:{n:08x}"),
            mac_addresses: vec![format!("b8:27:eb:00:{:02x}:{:02x}", n / 256, n % 256)],
        }
    }

    fn transition(from: LifecycleState, to: LifecycleState) -> Transition {
        Transition::new(from, to).expect("an allowed transition")
    }

    fn discovered(n: u32) -> RobotEvent {
        RobotEvent::RobotDiscovered {
            identity: facts(n),
            method: "agent".into(),
        }
    }

    fn provisioning_started() -> RobotEvent {
        RobotEvent::RobotProvisioningStarted {
            transition: transition(LifecycleState::Discovered, LifecycleState::Provisioning),
        }
    }

    fn provisioned() -> RobotEvent {
        RobotEvent::RobotProvisioned {
            transition: transition(LifecycleState::Provisioning, LifecycleState::Ready),
        }
    }

    fn activated() -> RobotEvent {
        RobotEvent::RobotActivated {
            transition: transition(LifecycleState::Ready, LifecycleState::Active),
            deployment_version: Some("2026.11.1".into()),
        }
    }

    fn failed_from_discovered() -> RobotEvent {
        RobotEvent::RobotFailed {
            transition: transition(LifecycleState::Discovered, LifecycleState::Failed),
            reason: "agent never answered".into(),
        }
    }

    fn new_event(event: RobotEvent, recorded_at: DateTime<Utc>) -> NewEvent {
        NewEvent {
            event_id: Uuid::new_v4(),
            recorded_at,
            event,
            metadata: EventMetadata {
                correlation_id: Some(Uuid::new_v4()),
                causation_id: None,
                actor: "test".into(),
            },
        }
    }

    /// An append built the way a caller builds one: the events applied, with
    /// the caller's own clock, to the row it last read.
    fn append(current: Option<&Robot>, id: RobotId, events: Vec<RobotEvent>) -> Append {
        let now = Utc::now();
        let base = current.map_or(0, |r| r.version);
        let events: Vec<NewEvent> = events.into_iter().map(|e| new_event(e, now)).collect();
        let mut row = current.cloned();
        for (offset, new) in (1..).zip(&events) {
            let record = EventRecord {
                position: 0,
                event_id: new.event_id,
                robot_id: id,
                version: base + offset,
                event: new.event.clone(),
                metadata: new.metadata.clone(),
                recorded_at: new.recorded_at,
            };
            row = Some(Robot::apply(row, &record).expect("the events apply"));
        }
        Append {
            robot_id: id,
            expected_version: base,
            events,
            robot: row.expect("a robot row"),
            report: None,
        }
    }

    fn report(id: RobotId, seq: i64, telemetry: serde_json::Value) -> StoredReport {
        let received_at = Utc::now();
        StoredReport {
            robot_id: id,
            seq,
            time: received_at - chrono::Duration::milliseconds(40),
            received_at,
            health: Health {
                status: HealthStatus::Degraded,
                reasons: vec!["cpu at 81 °C".into()],
            },
            workload: crate::domain::Workload::Running,
            maintenance: false,
            telemetry,
        }
    }

    /// Adds a report and the row fields a report changes.
    fn with_report(mut append: Append, report: StoredReport) -> Append {
        append.robot.last_report_seq = report.seq;
        append.robot.last_heartbeat = Some(report.received_at);
        append.robot.last_report = Some(LastReport {
            seq: report.seq,
            time: report.time,
            workload: report.workload,
            maintenance: report.maintenance,
            telemetry: report.telemetry.clone(),
        });
        append.report = Some(report);
        append
    }

    fn without_report_fields(mut robot: Robot) -> Robot {
        robot.last_heartbeat = None;
        robot.last_report_seq = 0;
        robot.last_report = None;
        robot
    }

    fn versions(records: &[EventRecord]) -> Vec<i64> {
        records.iter().map(|r| r.version).collect()
    }

    fn positions(records: &[EventRecord]) -> Vec<i64> {
        records.iter().map(|r| r.position).collect()
    }

    fn strictly_increasing(values: &[i64]) -> bool {
        values.windows(2).all(|w| w[0] < w[1])
    }

    async fn next_commit(feed: &mut broadcast::Receiver<Arc<Committed>>) -> Arc<Committed> {
        tokio::time::timeout(Duration::from_secs(10), feed.recv())
            .await
            .expect("a commit within 10 s")
            .expect("the feed is open and not lagging")
    }

    #[tokio::test]
    async fn a_new_robot_is_stored_and_read_back_equal() {
        let (_dir, _path, store) = open_temp().await;
        assert_eq!(store.head().await.unwrap(), 0);
        let id = robot_id(1);
        let mut first = append(None, id, vec![discovered(1), provisioning_started()]);
        first.robot.config = json!({"wheel_base_mm": 120.5, "motors": [1, 2, 3]});
        first.robot.capabilities = vec!["camera".into(), "base".into()];
        first.robot.metadata = json!({"site": "lab", "shelf": 4});
        let first = with_report(first, report(id, 1, json!({"cpu_temp_c": 81.25})));
        let written = first.robot.clone();

        let records = store.append(first).await.unwrap();

        assert_eq!(versions(&records), [1, 2]);
        assert!(strictly_increasing(&positions(&records)));
        assert_eq!(records[0].recorded_at, records[1].recorded_at);
        let stored = store.robot(id).await.unwrap().expect("a stored row");
        assert_eq!(stored, written);
        assert_eq!(stored.state, LifecycleState::Provisioning);
        assert_eq!(stored.updated_at, records[1].recorded_at);
        assert_eq!(
            Robot::replay(&records).unwrap(),
            Some(without_report_fields(Robot {
                config: json!({}),
                capabilities: Vec::new(),
                metadata: json!({}),
                ..written
            }))
        );
        assert_eq!(store.robots().await.unwrap(), vec![stored]);
        assert_eq!(store.robot(robot_id(2)).await.unwrap(), None);

        assert_eq!(store.robot_events(id, 0, 10).await.unwrap(), records);
        assert_eq!(store.robot_events(id, 1, 10).await.unwrap(), records[1..]);
        assert_eq!(store.robot_events(id, 0, 1).await.unwrap(), records[..1]);
        assert_eq!(store.events_after(0, 10).await.unwrap(), records);
        assert_eq!(
            store.events_after(records[0].position, 10).await.unwrap(),
            records[1..]
        );
        assert_eq!(store.head().await.unwrap(), records[1].position);
    }

    #[tokio::test]
    async fn of_two_appends_at_one_version_exactly_one_wins() {
        let (_dir, _path, store) = open_temp().await;
        let id = robot_id(7);
        store
            .append(append(None, id, vec![discovered(7)]))
            .await
            .unwrap();
        let current = store.robot(id).await.unwrap().expect("a row");
        let provision = append(Some(&current), id, vec![provisioning_started()]);
        let fail = append(Some(&current), id, vec![failed_from_discovered()]);

        let (a, b) = tokio::join!(store.append(provision), store.append(fail));

        let (winner, loser) = match (a, b) {
            (Ok(won), Err(lost)) => (won, lost),
            (Err(lost), Ok(won)) => (won, lost),
            other => panic!("expected exactly one success, got {other:?}"),
        };
        assert_eq!(versions(&winner), [2]);
        assert!(
            matches!(
                loser,
                StoreError::Conflict { robot_id, expected: 1, actual: 2 } if robot_id == id
            ),
            "{loser:?}"
        );
        let stored = store.robot(id).await.unwrap().expect("a row");
        assert_eq!(stored.version, 2);
        let events = store.robot_events(id, 0, 10).await.unwrap();
        assert_eq!(versions(&events), [1, 2]);
        assert_eq!(events[1], winner[0]);
        assert_eq!(Robot::replay(&events).unwrap(), Some(stored));
    }

    #[tokio::test]
    async fn invalid_appends_are_refused_and_change_nothing() {
        let (_dir, _path, store) = open_temp().await;
        let id = robot_id(3);

        let mut wrong_version = append(None, id, vec![discovered(3)]);
        wrong_version.robot.version = 5;
        let mut no_events = append(None, id, vec![discovered(3)]);
        no_events.events.clear();
        no_events.robot.version = 0;
        let mut wrong_state = append(None, id, vec![discovered(3)]);
        wrong_state.robot.state = LifecycleState::Active;
        let mut wrong_robot = append(None, id, vec![discovered(3)]);
        wrong_robot.robot.robot_id = robot_id(4);
        for bad in [wrong_version, no_events, wrong_state, wrong_robot] {
            let result = store.append(bad).await;
            assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
        }
        assert_eq!(store.head().await.unwrap(), 0);
        assert_eq!(store.robots().await.unwrap(), vec![]);

        let first = append(None, id, vec![discovered(3)]);
        let reused_id = first.events[0].event_id;
        store.append(first).await.unwrap();
        let current = store.robot(id).await.unwrap().expect("a row");
        let mut reused = append(Some(&current), id, vec![provisioning_started()]);
        reused.events[0].event_id = reused_id;
        let result = store.append(reused).await;
        assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
        assert_eq!(store.robot(id).await.unwrap(), Some(current));
        assert_eq!(store.events_after(0, 10).await.unwrap().len(), 1);
    }

    /// One robot's lifecycle, appended step by step as the fleet would.
    async fn walk_lifecycle(store: &SqliteStore, n: u32) -> Result<(), StoreError> {
        let id = robot_id(n);
        let steps = [
            vec![discovered(n)],
            vec![provisioning_started()],
            vec![provisioned()],
            vec![activated()],
        ];
        let mut current = None;
        for (step, events) in steps.into_iter().enumerate() {
            let mut next = append(current.as_ref(), id, events);
            if step == 3 {
                next = with_report(next, report(id, 1, json!({ "n": n })));
            }
            store.append(next).await?;
            current = store.robot(id).await?;
        }
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_group_committed() {
        let (_dir, _path, store) = open_temp().await;
        let store = Arc::new(store);
        let mut feed = store.subscribe();

        let tasks: Vec<_> = (0..50)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move { walk_lifecycle(&store, n).await })
            })
            .collect();
        for task in tasks {
            task.await
                .expect("the task ran")
                .expect("every append succeeds");
        }

        let mut fed = Vec::new();
        for _ in 0..200 {
            fed.extend(next_commit(&mut feed).await.events.iter().cloned());
        }
        assert_eq!(fed.len(), 200);
        assert!(strictly_increasing(&positions(&fed)));
        assert_eq!(store.events_after(0, 1000).await.unwrap(), fed);
        assert_eq!(store.head().await.unwrap(), fed[199].position);
        let batches = store.batches_committed();
        assert!(batches < 200, "{batches} transactions for 200 appends");

        for n in 0..50 {
            let id = robot_id(n);
            let events = store.robot_events(id, 0, 100).await.unwrap();
            assert_eq!(versions(&events), [1, 2, 3, 4]);
            let stored = store.robot(id).await.unwrap().expect("a row");
            assert_eq!(stored.state, LifecycleState::Active);
            assert_eq!(stored.last_report_seq, 1);
            assert_eq!(
                Robot::replay(&events).unwrap(),
                Some(without_report_fields(stored))
            );
        }
    }

    #[tokio::test]
    async fn two_appends_for_one_robot_in_one_batch() {
        let (_dir, _path, store) = open_temp().await;
        let id = robot_id(9);
        let first = append(None, id, vec![discovered(9)]);
        let second = append(Some(&first.robot), id, vec![provisioning_started()]);
        let before = store.batches_committed();

        // Both are queued before the writer runs (one thread), so they
        // share a transaction.
        let (a, b) = tokio::join!(store.append(first), store.append(second));

        assert_eq!(versions(&a.unwrap()), [1]);
        assert_eq!(versions(&b.unwrap()), [2]);
        assert_eq!(store.batches_committed(), before + 1);
        let stored = store.robot(id).await.unwrap().expect("a row");
        assert_eq!(stored.version, 2);
        assert_eq!(stored.state, LifecycleState::Provisioning);
        let events = store.robot_events(id, 0, 10).await.unwrap();
        assert_eq!(Robot::replay(&events).unwrap(), Some(stored));
    }

    #[tokio::test]
    async fn a_failed_commit_fails_the_whole_batch_and_publishes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("kiwi.db");
        let store = SqliteStore::open_with(&path, Duration::from_millis(100))
            .await
            .expect("open");
        let mut feed = store.subscribe();
        // Another process holds SQLite's write lock past the busy timeout.
        let mut blocker = connect_options(&path, Duration::ZERO)
            .connect()
            .await
            .expect("a second connection");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut blocker)
            .await
            .expect("the write lock");

        let (a, b) = tokio::join!(
            store.append(append(None, robot_id(1), vec![discovered(1)])),
            store.append(append(None, robot_id(2), vec![discovered(2)]))
        );
        assert!(matches!(a, Err(StoreError::Unavailable(_))), "{a:?}");
        assert!(matches!(b, Err(StoreError::Unavailable(_))), "{b:?}");
        assert!(matches!(feed.try_recv(), Err(TryRecvError::Empty)));

        sqlx::query("ROLLBACK")
            .execute(&mut blocker)
            .await
            .expect("release");
        let records = store
            .append(append(None, robot_id(1), vec![discovered(1)]))
            .await
            .expect("the store recovers");
        assert_eq!(next_commit(&mut feed).await.events, records);
        assert_eq!(store.events_after(0, 10).await.unwrap(), records);
        assert_eq!(store.robot(robot_id(2)).await.unwrap(), None);
    }

    #[tokio::test]
    async fn everything_survives_a_reopen_and_positions_are_never_reused() {
        let (dir, path, store) = open_temp().await;
        let first = store
            .append(append(
                None,
                robot_id(1),
                vec![discovered(1), provisioning_started()],
            ))
            .await
            .unwrap();
        let second = store
            .append(append(None, robot_id(2), vec![discovered(2)]))
            .await
            .unwrap();
        let row = store.robot(robot_id(1)).await.unwrap().expect("a row");
        let head = store.head().await.unwrap();
        assert_eq!(head, second[0].position);
        store.close().await;
        let after_close = store
            .append(append(None, robot_id(5), vec![discovered(5)]))
            .await;
        assert!(
            matches!(after_close, Err(StoreError::Unavailable(_))),
            "{after_close:?}"
        );
        assert!(matches!(
            store.ping().await,
            Err(StoreError::Unavailable(_))
        ));
        drop(store);

        // The newest event vanishes (say, an operator's repair by hand): its
        // position must still never be handed out again.
        let mut raw = connect_options(&path, BUSY_TIMEOUT)
            .connect()
            .await
            .expect("a raw connection");
        for sql in [
            "DELETE FROM events WHERE robot_id = ?",
            "DELETE FROM robot_states WHERE robot_id = ?",
        ] {
            sqlx::query(sql)
                .bind(robot_id(2).to_string())
                .execute(&mut raw)
                .await
                .expect("delete");
        }
        raw.close().await.expect("close");

        let store = SqliteStore::open(&path).await.expect("reopen");
        assert_eq!(store.robot(robot_id(1)).await.unwrap(), Some(row));
        assert_eq!(store.robot_events(robot_id(1), 0, 10).await.unwrap(), first);
        let third = store
            .append(append(None, robot_id(3), vec![discovered(3)]))
            .await
            .unwrap();
        assert_eq!(third[0].position, head + 1);

        // A restart without a clean close (the process just went away).
        drop(store);
        let store = SqliteStore::open(&path).await.expect("reopen again");
        assert_eq!(store.head().await.unwrap(), head + 1);
        assert_eq!(store.robot_events(robot_id(3), 0, 10).await.unwrap(), third);
        drop(dir);
    }

    #[tokio::test]
    async fn reports_are_deduplicated_and_paged() {
        let (_dir, _path, store) = open_temp().await;
        let id = robot_id(4);
        store
            .append(append(None, id, vec![discovered(4)]))
            .await
            .unwrap();
        let mut current = store.robot(id).await.unwrap().expect("a row");
        let original = report(id, 1, json!({"battery_v": 12.4}));
        let resent = report(id, 1, json!({"battery_v": 0.0}));
        let mut sent = vec![original.clone()];
        for next in [original.clone(), resent]
            .into_iter()
            .chain((2..=5).map(|seq| report(id, seq, json!({ "seq": seq }))))
        {
            if next.seq > 1 {
                sent.push(next.clone());
            }
            let records = store
                .append(with_report(append(Some(&current), id, vec![]), next))
                .await
                .unwrap();
            assert!(records.is_empty());
            current = store.robot(id).await.unwrap().expect("a row");
        }

        assert_eq!(store.reports(id, 0, 100).await.unwrap(), sent);
        let seqs = |reports: Vec<StoredReport>| reports.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(store.reports(id, 0, 2).await.unwrap()), [1, 2]);
        assert_eq!(seqs(store.reports(id, 2, 2).await.unwrap()), [3, 4]);
        assert_eq!(seqs(store.reports(id, 4, 2).await.unwrap()), [5]);
        assert!(store.reports(id, 5, 2).await.unwrap().is_empty());
        assert!(store.reports(robot_id(5), 0, 10).await.unwrap().is_empty());
        assert_eq!(current.last_report_seq, 5);
        assert_eq!(current.version, 1);
    }

    #[tokio::test]
    async fn the_feed_carries_every_commit_in_order_with_its_row() {
        let (_dir, _path, store) = open_temp().await;
        let mut feed = store.subscribe();
        let (a, b) = (robot_id(1), robot_id(2));

        let mut appended = Vec::new();
        appended.push(
            store
                .append(append(None, a, vec![discovered(1)]))
                .await
                .unwrap(),
        );
        appended.push(
            store
                .append(append(None, b, vec![discovered(2)]))
                .await
                .unwrap(),
        );
        let row_a = store.robot(a).await.unwrap().expect("a row");
        appended.push(
            store
                .append(append(
                    Some(&row_a),
                    a,
                    vec![provisioning_started(), provisioned()],
                ))
                .await
                .unwrap(),
        );
        let row_b = store.robot(b).await.unwrap().expect("a row");
        appended.push(
            store
                .append(with_report(
                    append(Some(&row_b), b, vec![]),
                    report(b, 1, json!({})),
                ))
                .await
                .unwrap(),
        );

        let mut commits = Vec::new();
        for records in &appended {
            let commit = next_commit(&mut feed).await;
            assert_eq!(&commit.events, records);
            if let Some(last) = records.last() {
                assert_eq!(commit.robot.robot_id, last.robot_id);
                assert_eq!(commit.robot.version, last.version);
            }
            commits.push(commit);
        }
        let fed: Vec<EventRecord> = commits.iter().flat_map(|c| c.events.clone()).collect();
        assert_eq!(fed.len(), 4);
        assert!(strictly_increasing(&positions(&fed)));
        assert_eq!(
            Some((*commits[2].robot).clone()),
            store.robot(a).await.unwrap()
        );
        assert_eq!(
            Some((*commits[3].robot).clone()),
            store.robot(b).await.unwrap()
        );
        assert_eq!(commits[3].robot.last_report_seq, 1);
        assert!(matches!(feed.try_recv(), Err(TryRecvError::Empty)));
        // A new subscriber starts from now, not from the beginning.
        assert!(matches!(
            store.subscribe().try_recv(),
            Err(TryRecvError::Empty)
        ));
    }

    #[tokio::test]
    async fn corrupt_rows_are_reported_not_skipped() {
        let (_dir, _path, store) = open_temp().await;
        let (a, b) = (robot_id(1), robot_id(2));
        store
            .append(append(None, a, vec![discovered(1)]))
            .await
            .unwrap();
        let event_b = store
            .append(append(None, b, vec![discovered(2)]))
            .await
            .unwrap();
        sqlx::query("UPDATE robot_states SET health = '{\"status\": ' WHERE robot_id = ?")
            .bind(a.to_string())
            .execute(&store.reads)
            .await
            .expect("corrupt a row");

        let err = store.robot(a).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains(&a.to_string()) && m.contains("health")),
            "{err:?}"
        );
        assert!(matches!(store.robots().await, Err(StoreError::Corrupt(_))));
        assert!(store.robot(b).await.unwrap().is_some());
        let current = store.robot(b).await.unwrap().expect("a row");
        let mut stale = current.clone();
        stale.robot_id = a;
        let refused = store
            .append(append(Some(&stale), a, vec![provisioning_started()]))
            .await;
        assert!(
            matches!(refused, Err(StoreError::Corrupt(_))),
            "{refused:?}"
        );
        store
            .append(append(Some(&current), b, vec![provisioning_started()]))
            .await
            .expect("other robots are unaffected");

        sqlx::query("UPDATE events SET data = '[1, 2' WHERE position = ?")
            .bind(event_b[0].position)
            .execute(&store.reads)
            .await
            .expect("corrupt an event");
        let err = store.robot_events(b, 0, 10).await.unwrap_err();
        let position = format!("position {}", event_b[0].position);
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains(&position)),
            "{err:?}"
        );
        assert!(matches!(
            store.events_after(0, 10).await,
            Err(StoreError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn circuit_breakers_are_kept_and_a_corrupt_one_is_reported() {
        let (_dir, _path, store) = open_temp().await;
        crate::store::conformance::breakers_round_trip(&store).await;
        sqlx::query("UPDATE circuit_breakers SET opened_at = NULL WHERE state = 'open'")
            .execute(&store.reads)
            .await
            .unwrap();
        let err = store.breakers().await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains("no opened_at")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn discovery_sessions_are_recorded_once_per_id() {
        let (_dir, _path, store) = open_temp().await;
        store.ping().await.unwrap();
        let started_at = Utc::now();
        let mut session = DiscoverySession {
            session_id: Uuid::new_v4(),
            methods: vec!["agent".into(), "arp".into()],
            started_at,
            finished_at: started_at + chrono::Duration::milliseconds(1250),
            duration_ms: 1250,
            robots_found: 3,
            new_robots: 1,
            results: vec![DiscoveryResult {
                ip_address: "10.88.0.2".into(),
                robot_id: Some(RobotId(Uuid::from_u128(2))),
                method: crate::store::SightingMethod::Ssh,
                found_at: started_at,
                mac_address: Some("02:88:00:00:00:02".into()),
                robot_type: Some("lekiwi".into()),
                outcome: crate::store::SightingOutcome::Identified,
                detail: None,
            }],
        };
        store.record_discovery(&session, None).await.unwrap();
        session.robots_found = 4;
        session.results.push(DiscoveryResult {
            ip_address: "10.88.0.3".into(),
            robot_id: None,
            method: crate::store::SightingMethod::Arp,
            found_at: started_at,
            mac_address: None,
            robot_type: None,
            outcome: crate::store::SightingOutcome::Live,
            detail: Some("no agent, SSH closed".into()),
        });
        store.record_discovery(&session, None).await.unwrap();

        let rows = sqlx::query(
            "SELECT session_id, methods, started_at, finished_at, duration_ms, robots_found, \
             new_robots FROM discovery_sessions",
        )
        .fetch_all(&store.reads)
        .await
        .unwrap();
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        let read = DiscoverySession {
            session_id: uuid_col(row, "session_id").unwrap(),
            methods: json_col(row, "methods").unwrap(),
            started_at: time_col(row, "started_at").unwrap(),
            finished_at: time_col(row, "finished_at").unwrap(),
            duration_ms: col(row, "duration_ms").unwrap(),
            robots_found: col(row, "robots_found").unwrap(),
            new_robots: col(row, "new_robots").unwrap(),
            results: session.results.clone(),
        };
        assert_eq!(read, session);
        let mut conn = store.reads.acquire().await.unwrap();
        let loaded = load_discovery(&mut conn, session.session_id).await.unwrap();
        assert_eq!(
            loaded.as_ref(),
            Some(&session),
            "results replaced, in order"
        );
        assert_eq!(store.discovery(Uuid::new_v4()).await.unwrap(), None);
    }
}
