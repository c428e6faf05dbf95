//! The production event store: PostgreSQL, shared by several controllers.
//!
//! The schema lives only in `migrations/postgres/`, applied by
//! [`PostgresStore::connect`] (and [`PostgresStore::migrate`]) on a
//! dedicated connection: sqlx's migrator holds a session advisory lock while
//! it runs, so controllers starting together apply each migration once, and
//! closing that connection releases the lock even when a migration failed.
//!
//! **Group commit.** Every append goes over a bounded channel to one writer
//! task per store. It takes the first waiting append, drains whatever else
//! is queued (up to [`BATCH_CAP`]) and writes them all in one transaction,
//! so a burst of appends from many robots costs one commit (one WAL flush).
//! No caller is answered before the `COMMIT` that holds its data; if the
//! transaction fails, every caller of the batch gets
//! [`StoreError::Unavailable`]. The writer locks the batch's robot rows
//! (`SELECT ... FOR UPDATE`), checks every append against them in memory
//! exactly as the SQLite backend does (version, shape, events applying to
//! the stored row, lifecycle state), and writes the appends that pass with
//! one statement. Should that statement fail (a reused event id, a value
//! PostgreSQL refuses), the batch is written again with a savepoint per
//! append, so the culprit is answered with its error and the rest commits.
//! Appends for the same robot in one batch see each other, in queue order.
//!
//! **Position order across controllers.** Positions come from an identity
//! column, and an identity value is taken when a row is inserted, not when
//! its transaction commits. Two controllers committing at once could then
//! make position 11 visible before position 10, and a reader that resumed
//! after 11 would never see 10. So every write transaction starts with
//! `pg_advisory_xact_lock(LOG_LOCK)`: all transactions that append to the
//! log, from every controller, run one after the other, and take their
//! positions in that order. PostgreSQL releases transaction locks only after
//! the commit is visible to new snapshots, so whoever takes the lock next
//! sees every earlier commit, and its positions are higher than every
//! position already visible: positions become visible in position order.
//! The lock is taken by its own statement before the rows are read, so the
//! reads of a READ COMMITTED transaction see the previous holder's commit.
//! Group commit keeps the lock's cost per event small.
//!
//! **The feed across controllers.** Inside each write transaction the
//! writer calls `pg_notify('kiwi_commits', ...)` once per successful append,
//! in position order. PostgreSQL delivers notifications at commit, in commit
//! order, which (by the lock above) is position order. Each payload carries
//! the whole commit (its events with their positions, and the robot's row)
//! when it fits in a notification (8000 bytes), else a reference (robot,
//! version, positions) that the listener resolves by reading the log and
//! the row. A listener task per store (its own connection, `LISTEN`)
//! publishes one [`Committed`] per notification on
//! [`EventStore::subscribe`], for this controller's commits as for
//! everyone else's, so the feed is one stream in position order, whoever
//! wrote. Notifications sent while the listener was disconnected are lost;
//! so after every reconnection (with capped exponential backoff and jitter)
//! it catches up in one snapshot: the events after the last position it
//! published, grouped into runs of one robot (each with the robot's current
//! row), then every row that changed without events (reports). A
//! notification that arrives after the catch-up for something it already
//! covered is skipped: events at or below the last position, rows no newer
//! (by version and report sequence) than the last one published.
//!
//! **Times** are `TIMESTAMPTZ`, which keeps microseconds: a time with finer
//! digits is truncated when it is written (the fleet truncates the times it
//! records, so a row read back equals the row written). Structured values
//! are JSONB.
//!
//! **Errors.** A connection, pool or I/O failure (what a stopped server
//! produces) is [`StoreError::Unavailable`]; stored data that does not
//! decode is [`StoreError::Corrupt`], naming the robot or position.

use super::{
    Append, Committed, DiscoverySession, EventStore, Fence, History, PruneOutcome, Snapshot,
    StoreError, StoredReport,
};
use crate::domain::robot::LastReport;
use crate::domain::{EventMetadata, EventRecord, Health, LifecycleState, Robot, RobotEvent};
use chrono::{DateTime, Utc};
use kiwi_protocol::RobotId;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sqlx::migrate::Migrator;
use sqlx::postgres::{
    PgConnectOptions, PgConnection, PgListener, PgNotification, PgPool, PgPoolOptions, PgRow,
};
use sqlx::{ConnectOptions, Connection, Postgres, Row};
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

/// The most appends written in one transaction.
pub const BATCH_CAP: usize = 256;
/// Appends waiting for the writer; a full queue makes `append` wait.
const WRITE_QUEUE: usize = 1024;
/// Commits a slow subscriber may fall behind before it lags.
const FEED_CAPACITY: usize = 4096;
/// How long getting a connection may take (connecting included) before an
/// operation fails with [`StoreError::Unavailable`].
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest any statement may run, waiting for locks included.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(15);
/// A session that stays idle inside a transaction this long is ended by
/// the server, so a stalled controller cannot hold the log lock forever.
const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(15);
/// The first and the longest wait before the listener reconnects.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Events read per query when the listener catches up.
const CATCH_UP_PAGE: u32 = 5000;
/// PostgreSQL refuses notification payloads of 8000 bytes or more.
const NOTIFY_PAYLOAD_MAX: usize = 7999;

/// The notification channel of commits.
macro_rules! channel {
    () => {
        "kiwi_commits"
    };
}
pub const CHANNEL: &str = channel!();

/// The key of the transaction advisory lock that every transaction writing
/// the log takes first (see the module doc). Part of the schema's
/// contract: every controller version sharing a database must use it.
/// `0x6b697769_6c6f6701`: "kiwi" "log" 1.
macro_rules! log_lock {
    () => {
        "7739031370491668225"
    };
}
/// The key of the transaction advisory lock that serialises prunes, so two
/// cannot fold one robot concurrently and leave an older snapshot.
const PRUNE_LOCK: i64 = 0x6b69_7769_7072_0001;

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

/// The columns of `robot_reports`, as [`decode_report`] reads them.
macro_rules! report_columns {
    () => {
        "robot_id, seq, time, received_at, health, workload, maintenance, telemetry"
    };
}

/// Robots in one state, for a caller that filters in the database (the
/// API's `?state=` filter without a cache); backed by an index.
pub const ROBOTS_BY_STATE: &str = concat!(
    "SELECT ",
    robot_columns!(),
    " FROM robot_states WHERE state = $1"
);
/// Robots of one type (the API's `?type=` filter); backed by an index.
pub const ROBOTS_BY_TYPE: &str = concat!(
    "SELECT ",
    robot_columns!(),
    " FROM robot_states WHERE robot_type = $1"
);
/// The robot at an address; backed by an index.
pub const ROBOTS_BY_IP: &str = concat!(
    "SELECT ",
    robot_columns!(),
    " FROM robot_states WHERE ip_address = $1"
);
const ROBOT_EVENTS: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events WHERE robot_id = $1 AND version > $2 ORDER BY version LIMIT $3"
);
const EVENTS_AFTER: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events WHERE position > $1 ORDER BY position LIMIT $2"
);

static MIGRATOR: Migrator = sqlx::migrate!("../migrations/postgres");

type Reply = oneshot::Sender<Result<Vec<EventRecord>, StoreError>>;

#[derive(Debug)]
enum WriteRequest {
    /// Boxed: a row is large, and the queue holds many requests.
    Append { append: Box<Append>, reply: Reply },
    /// Finish what is queued before it, then answer.
    Close { done: oneshot::Sender<()> },
}

/// The PostgreSQL event store. Reads go through the pool; appends through
/// the writer task; the feed comes from the listener task. Both tasks end
/// when the store is closed or dropped.
#[derive(Debug)]
pub struct PostgresStore {
    pool: PgPool,
    /// The listener's own pool of one connection.
    listen_pool: PgPool,
    /// Options without the session timeouts, for the migrator.
    options: PgConnectOptions,
    acquire_timeout: Duration,
    writes: mpsc::Sender<WriteRequest>,
    feed: broadcast::Sender<Arc<Committed>>,
    batches: Arc<AtomicU64>,
    stop: CancellationToken,
    /// Stops the listener when the store is dropped without `close`.
    _stop_on_drop: DropGuard,
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`)
    /// with a pool of `pool_size` connections (plus one for the listener),
    /// applies the migrations and starts the writer and listener tasks.
    /// Needs a Tokio runtime. An unreachable server fails within
    /// [`ACQUIRE_TIMEOUT`] with [`StoreError::Unavailable`].
    pub async fn connect(url: &str, pool_size: u32) -> Result<PostgresStore, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Invalid(format!("bad PostgreSQL URL: {e}")))?;
        PostgresStore::open(options, pool_size, ACQUIRE_TIMEOUT).await
    }

    async fn open(
        options: PgConnectOptions,
        pool_size: u32,
        acquire_timeout: Duration,
    ) -> Result<PostgresStore, StoreError> {
        if pool_size == 0 {
            return Err(StoreError::Invalid(
                "the PostgreSQL pool needs at least one connection".into(),
            ));
        }
        let options = options.application_name("kiwi-controller");
        let session = options.clone().options([
            (
                "statement_timeout",
                format!("{}ms", STATEMENT_TIMEOUT.as_millis()),
            ),
            (
                "idle_in_transaction_session_timeout",
                format!("{}ms", IDLE_IN_TRANSACTION_TIMEOUT.as_millis()),
            ),
        ]);
        let pool = PgPoolOptions::new()
            .max_connections(pool_size)
            .acquire_timeout(acquire_timeout)
            .connect_with(session.clone())
            .await
            .map_err(|e| unavailable("cannot connect to PostgreSQL", &e))?;
        migrate_with(&options, acquire_timeout).await?;
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(acquire_timeout)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(session)
            .await
            .map_err(|e| unavailable("cannot connect to PostgreSQL", &e))?;

        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let stop = CancellationToken::new();
        let mut follower = Follower {
            pool: pool.clone(),
            listen_pool: listen_pool.clone(),
            feed: feed.clone(),
            last_seen: 0,
            published: HashMap::new(),
            stop: stop.clone(),
        };
        // Listen before reading where the log ends: a commit after this
        // point is notified, one before it is below the baseline.
        let listener = follower.listen().await?;
        follower.baseline().await?;
        tokio::spawn(follower.run(listener));

        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        let batches = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            pool: pool.clone(),
            batches: batches.clone(),
        };
        tokio::spawn(writer.run(queue));
        Ok(PostgresStore {
            pool,
            listen_pool,
            options,
            acquire_timeout,
            writes,
            feed,
            batches,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
        })
    }

    /// Applies the migrations not applied yet (what `connect` does too).
    /// Safe to run from several controllers at once.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        migrate_with(&self.options, self.acquire_timeout).await
    }

    /// Writes what is queued, stops the listener, then closes every
    /// connection. Later appends and reads fail with
    /// [`StoreError::Unavailable`].
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.writes.send(WriteRequest::Close { done }).await.is_ok() {
            // An error means the writer is already gone: closed either way.
            let _ = closed.await;
        }
        self.stop.cancel();
        self.listen_pool.close().await;
        self.pool.close().await;
    }

    /// How many write transactions were committed since `connect`.
    pub fn batches_committed(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
}

/// Runs the migrator on a connection of its own, closed afterwards: the
/// migrator's session advisory lock ends with it, even after a failure.
async fn migrate_with(options: &PgConnectOptions, timeout: Duration) -> Result<(), StoreError> {
    let mut conn = tokio::time::timeout(timeout, options.connect())
        .await
        .map_err(|_| {
            StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL to migrate: no answer within {timeout:?}"
            ))
        })?
        .map_err(|e| unavailable("cannot connect to PostgreSQL to migrate", &e))?;
    MIGRATOR
        .run(&mut conn)
        .await
        .map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => unavailable("cannot migrate", &e),
            other => StoreError::Corrupt(format!("cannot migrate the database: {other}")),
        })?;
    conn.close()
        .await
        .map_err(|e| unavailable("closing the migration connection", &e))
}

#[async_trait::async_trait]
impl EventStore for PostgresStore {
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
            " FROM robot_states WHERE robot_id = $1"
        ))
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await
        .map_err(read_error)?;
        row.as_ref().map(decode_robot).transpose()
    }

    async fn robots(&self) -> Result<Vec<Robot>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            robot_columns!(),
            " FROM robot_states ORDER BY robot_id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(read_error)?
        .iter()
        .map(decode_robot)
        .collect()
    }

    async fn robot_events(
        &self,
        id: RobotId,
        after_version: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        sqlx::query(ROBOT_EVENTS)
            .bind(id.0)
            .bind(after_version)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(read_error)?
            .iter()
            .map(decode_event)
            .collect()
    }

    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<EventRecord>, StoreError> {
        events_after_in(&self.pool, after, limit).await
    }

    async fn head(&self) -> Result<i64, StoreError> {
        head_in(&self.pool).await
    }

    async fn reports(
        &self,
        id: RobotId,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<StoredReport>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            report_columns!(),
            " FROM robot_reports WHERE robot_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        ))
        .bind(id.0)
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(read_error)?
        .iter()
        .map(decode_report)
        .collect()
    }

    async fn record_discovery(
        &self,
        session: &DiscoverySession,
        fence: Option<&Fence>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(write_error)?;
        if let Some(f) = fence {
            let token = i64::try_from(f.token)
                .map_err(|_| StoreError::Invalid(format!("fencing token {} too large", f.token)))?;
            // One statement, so two controllers racing cannot both pass:
            // the conflicting row is locked before the WHERE is checked
            // against its latest committed token.
            let accepted: Option<i64> = sqlx::query_scalar(
                "INSERT INTO fences (resource, token) VALUES ($1, $2) \
                 ON CONFLICT (resource) DO UPDATE SET token = EXCLUDED.token \
                 WHERE fences.token <= EXCLUDED.token RETURNING token",
            )
            .bind(&f.resource)
            .bind(token)
            .fetch_optional(&mut *tx)
            .await
            .map_err(write_error)?;
            if accepted.is_none() {
                let current: i64 =
                    sqlx::query_scalar("SELECT token FROM fences WHERE resource = $1")
                        .bind(&f.resource)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(write_error)?;
                return Err(StoreError::Fenced {
                    resource: f.resource.clone(),
                    token: f.token,
                    current: u64::try_from(current).unwrap_or(0),
                });
            }
        }
        sqlx::query(
            "INSERT INTO discovery_sessions \
             (session_id, methods, started_at, finished_at, duration_ms, robots_found, new_robots) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (session_id) DO UPDATE SET methods = EXCLUDED.methods, \
             started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at, \
             duration_ms = EXCLUDED.duration_ms, robots_found = EXCLUDED.robots_found, \
             new_robots = EXCLUDED.new_robots",
        )
        .bind(session.session_id)
        .bind(to_json(&session.methods)?)
        .bind(session.started_at)
        .bind(session.finished_at)
        .bind(session.duration_ms)
        .bind(session.robots_found)
        .bind(session.new_robots)
        .execute(&mut *tx)
        .await
        .map_err(write_error)?;
        tx.commit().await.map_err(write_error)
    }

    async fn history(&self, id: RobotId, at: Option<DateTime<Utc>>) -> Result<History, StoreError> {
        // One snapshot for the snapshot, the events and the report.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(read_error)?;
        let snapshot = load_snapshot(&mut tx, id).await?;
        let after_version = snapshot.as_ref().map_or(0, |s| s.robot.version);
        let events = sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE robot_id = $1 AND version > $2 \
             AND ($3::timestamptz IS NULL OR recorded_at <= $3) ORDER BY version"
        ))
        .bind(id.0)
        .bind(after_version)
        .bind(at)
        .fetch_all(&mut *tx)
        .await
        .map_err(read_error)?
        .iter()
        .map(decode_event)
        .collect::<Result<Vec<_>, _>>()?;
        let last_report = sqlx::query(concat!(
            "SELECT ",
            report_columns!(),
            " FROM robot_reports WHERE robot_id = $1 \
             AND ($2::timestamptz IS NULL OR received_at <= $2) ORDER BY seq DESC LIMIT 1"
        ))
        .bind(id.0)
        .bind(at)
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
            .fetch_all(&self.pool)
            .await
            .map_err(read_error)?
            .iter()
            .map(decode_snapshot)
            .collect()
    }

    async fn latest_reports(&self) -> Result<Vec<StoredReport>, StoreError> {
        sqlx::query(concat!(
            "SELECT DISTINCT ON (robot_id) ",
            report_columns!(),
            " FROM robot_reports ORDER BY robot_id, seq DESC"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(read_error)?
        .iter()
        .map(decode_report)
        .collect()
    }

    async fn prune(&self, before: DateTime<Utc>) -> Result<PruneOutcome, StoreError> {
        let ids: Vec<Uuid> =
            sqlx::query_scalar("SELECT DISTINCT robot_id FROM events WHERE recorded_at < $1")
                .bind(before)
                .fetch_all(&self.pool)
                .await
                .map_err(read_error)?;
        let mut outcome = PruneOutcome::default();
        for id in ids {
            let mut tx = self.pool.begin().await.map_err(write_error)?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(PRUNE_LOCK)
                .execute(&mut *tx)
                .await
                .map_err(write_error)?;
            if let Some(n) = fold_into_snapshot(&mut tx, RobotId(id), before).await? {
                outcome.robots += 1;
                outcome.events_removed += n;
            }
            tx.commit().await.map_err(write_error)?;
        }
        outcome.reports_removed = sqlx::query(
            "DELETE FROM robot_reports r WHERE r.received_at < $1 AND r.seq < \
             (SELECT MAX(r2.seq) FROM robot_reports r2 WHERE r2.robot_id = r.robot_id)",
        )
        .bind(before)
        .execute(&self.pool)
        .await
        .map_err(write_error)?
        .rows_affected();
        Ok(outcome)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(read_error)?;
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Committed>> {
        self.feed.subscribe()
    }
}

async fn events_after_in<'c, E>(
    executor: E,
    after: i64,
    limit: u32,
) -> Result<Vec<EventRecord>, StoreError>
where
    E: sqlx::Executor<'c, Database = Postgres>,
{
    sqlx::query(EVENTS_AFTER)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(executor)
        .await
        .map_err(read_error)?
        .iter()
        .map(decode_event)
        .collect()
}

async fn head_in<'c, E>(executor: E) -> Result<i64, StoreError>
where
    E: sqlx::Executor<'c, Database = Postgres>,
{
    sqlx::query_scalar("SELECT COALESCE(MAX(position), 0)::int8 FROM events")
        .fetch_one(executor)
        .await
        .map_err(read_error)
}

// ---------------------------------------------------------------------------
// History and pruning.

async fn load_snapshot(
    conn: &mut PgConnection,
    id: RobotId,
) -> Result<Option<Snapshot>, StoreError> {
    sqlx::query("SELECT robot_id, robot, taken_at FROM robot_snapshots WHERE robot_id = $1")
        .bind(id.0)
        .fetch_optional(&mut *conn)
        .await
        .map_err(read_error)?
        .as_ref()
        .map(decode_snapshot)
        .transpose()
}

fn decode_snapshot(row: &PgRow) -> Result<Snapshot, StoreError> {
    let fields = || -> Result<Snapshot, String> {
        Ok(Snapshot {
            robot: json_col(row, "robot")?,
            taken_at: col(row, "taken_at")?,
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
    conn: &mut PgConnection,
    id: RobotId,
    cutoff: DateTime<Utc>,
) -> Result<Option<u64>, StoreError> {
    let upto: Option<i64> = sqlx::query_scalar(
        "SELECT MAX(version) FROM events WHERE robot_id = $1 AND recorded_at < $2",
    )
    .bind(id.0)
    .bind(cutoff)
    .fetch_one(&mut *conn)
    .await
    .map_err(write_error)?;
    let Some(upto) = upto else {
        return Ok(None);
    };
    let snapshot = load_snapshot(conn, id).await?;
    let after = snapshot.as_ref().map_or(0, |s| s.robot.version);
    let events = sqlx::query(concat!(
        "SELECT ",
        event_columns!(),
        " FROM events WHERE robot_id = $1 AND version > $2 AND version <= $3 ORDER BY version"
    ))
    .bind(id.0)
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
        "INSERT INTO robot_snapshots (robot_id, version, robot, taken_at) \
         VALUES ($1, $2, $3, $4) \
         ON CONFLICT (robot_id) DO UPDATE SET version = EXCLUDED.version, \
         robot = EXCLUDED.robot, taken_at = EXCLUDED.taken_at",
    )
    .bind(id.0)
    .bind(robot.version)
    .bind(to_json(&robot)?)
    .bind(Utc::now())
    .execute(&mut *conn)
    .await
    .map_err(write_error)?;
    let removed = sqlx::query("DELETE FROM events WHERE robot_id = $1 AND version <= $2")
        .bind(id.0)
        .bind(upto)
        .execute(&mut *conn)
        .await
        .map_err(write_error)?
        .rows_affected();
    Ok(Some(removed))
}

// ---------------------------------------------------------------------------
// The writer task.

#[derive(Debug)]
struct Writer {
    pool: PgPool,
    batches: Arc<AtomicU64>,
}

impl Writer {
    async fn run(self, mut queue: mpsc::Receiver<WriteRequest>) {
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
                shut(queue);
                let _ = done.send(());
                return;
            }
        }
    }

    /// Writes one batch in one transaction and answers its callers. The
    /// feed is the listener's: it publishes this commit when PostgreSQL
    /// delivers its notifications.
    async fn commit(&self, batch: Vec<(Append, Reply)>) {
        let (appends, replies): (Vec<Append>, Vec<Reply>) = batch.into_iter().unzip();
        let count = appends.len();
        let written = match write_batch(&self.pool, &appends, Mode::Together).await {
            Err(BatchError::Refused(e)) => {
                tracing::debug!(error = %e, appends = count, "a grouped write was refused; writing the batch append by append");
                write_batch(&self.pool, &appends, Mode::OneByOne).await
            }
            other => other,
        };
        let outcomes = match written {
            Ok(outcomes) => outcomes,
            Err(BatchError::Refused(e) | BatchError::Failed(e)) => {
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
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            let _ = reply.send(outcome);
        }
    }
}

/// Refuses what is still queued.
fn shut(mut queue: mpsc::Receiver<WriteRequest>) {
    queue.close();
    while let Ok(request) = queue.try_recv() {
        if let WriteRequest::Close { done } = request {
            let _ = done.send(());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// All the appends that pass the checks in one statement.
    Together,
    /// Each append in its own savepoint.
    OneByOne,
}

#[derive(Debug)]
enum BatchError {
    /// PostgreSQL refused the grouped write because of one append's data:
    /// worth writing again one by one.
    Refused(StoreError),
    /// The transaction failed (connection lost, timeout, ...).
    Failed(StoreError),
}

/// A robot row as the batch sees it: stored, or written earlier in the
/// batch.
#[derive(Debug, Clone)]
enum Current {
    Row(Box<Robot>),
    /// The stored row does not decode: appends to it fail.
    Corrupt(String),
}

/// An append that passed the checks, ready to write.
#[derive(Debug)]
struct Planned {
    robot: Robot,
    /// Positions are filled in by the insert.
    records: Vec<EventRecord>,
    report: Option<StoredReport>,
    json: PlannedJson,
}

/// The JSONB values of a planned append, encoded before the transaction
/// so that an unencodable value fails only its own append.
#[derive(Debug)]
struct PlannedJson {
    health: serde_json::Value,
    mac_addresses: serde_json::Value,
    capabilities: serde_json::Value,
    last_report: Option<serde_json::Value>,
    /// Per event: type, data, metadata.
    events: Vec<(&'static str, serde_json::Value, serde_json::Value)>,
    report_health: Option<serde_json::Value>,
}

/// One transaction for the whole batch. The outer error fails the whole
/// batch; the inner results are each append's own.
async fn write_batch(
    pool: &PgPool,
    appends: &[Append],
    mode: Mode,
) -> Result<Vec<Result<Vec<EventRecord>, StoreError>>, BatchError> {
    let failed = |e: sqlx::Error| BatchError::Failed(read_error(e));
    // The log lock first, in a statement of its own (see the module doc).
    let mut tx = pool
        .begin_with(concat!("BEGIN; SELECT pg_advisory_xact_lock(", log_lock!(), ")"))
        .await
        .map_err(failed)?;
    let mut current = lock_rows(&mut tx, appends).await?;

    let mut plans: Vec<Result<Planned, StoreError>> = Vec::with_capacity(appends.len());
    match mode {
        Mode::Together => {
            for append in appends {
                let planned = plan(current.get(&append.robot_id), append);
                if let Ok(p) = &planned {
                    current.insert(append.robot_id, Current::Row(Box::new(p.robot.clone())));
                }
                plans.push(planned);
            }
            let mut ok: Vec<&mut Planned> = plans.iter_mut().filter_map(|p| p.as_mut().ok()).collect();
            if !ok.is_empty() {
                write_rows(&mut tx, &mut ok).await.map_err(|e| {
                    let e = write_error(e);
                    match e {
                        StoreError::Invalid(_) => BatchError::Refused(e),
                        other => BatchError::Failed(other),
                    }
                })?;
            }
        }
        Mode::OneByOne => {
            for append in appends {
                let mut planned = plan(current.get(&append.robot_id), append);
                if let Ok(p) = &mut planned {
                    let mut savepoint = tx.begin().await.map_err(failed)?;
                    match write_rows(&mut savepoint, &mut [&mut *p]).await {
                        Ok(()) => {
                            savepoint.commit().await.map_err(failed)?;
                            current.insert(append.robot_id, Current::Row(Box::new(p.robot.clone())));
                        }
                        Err(e) => {
                            savepoint.rollback().await.map_err(failed)?;
                            planned = Err(append_error(&mut tx, append, e).await?);
                        }
                    }
                }
                plans.push(planned);
            }
        }
    }

    let notices: Vec<String> = plans
        .iter()
        .filter_map(|p| p.as_ref().ok())
        .map(notice)
        .collect();
    if !notices.is_empty() {
        sqlx::query(concat!(
            "SELECT pg_notify('",
            channel!(),
            "', payload) FROM UNNEST($1::text[]) AS payload"
        ))
        .bind(notices)
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
    }
    tx.commit().await.map_err(failed)?;
    Ok(plans
        .into_iter()
        .map(|p| p.map(|planned| planned.records))
        .collect())
}

/// Locks and reads the rows of every robot the batch appends to.
async fn lock_rows(
    conn: &mut PgConnection,
    appends: &[Append],
) -> Result<HashMap<RobotId, Current>, BatchError> {
    let ids: Vec<Uuid> = appends
        .iter()
        .map(|a| a.robot_id.0)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let rows = sqlx::query(concat!(
        "SELECT ",
        robot_columns!(),
        " FROM robot_states WHERE robot_id = ANY($1) ORDER BY robot_id FOR UPDATE"
    ))
    .bind(ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| BatchError::Failed(read_error(e)))?;
    let mut current = HashMap::with_capacity(rows.len());
    for row in &rows {
        let id: Uuid = row
            .try_get("robot_id")
            .map_err(|e| BatchError::Failed(read_error(e)))?;
        let entry = match decode_robot(row) {
            Ok(robot) => Current::Row(Box::new(robot)),
            Err(e) => Current::Corrupt(e.to_string()),
        };
        current.insert(RobotId(id), entry);
    }
    Ok(current)
}

/// What an append that PostgreSQL refused is answered: a version taken by
/// a writer that did not hold the log lock is a conflict; the rest is the
/// caller's data.
async fn append_error(
    conn: &mut PgConnection,
    append: &Append,
    e: sqlx::Error,
) -> Result<StoreError, BatchError> {
    let version_taken = e
        .as_database_error()
        .and_then(|db| db.constraint())
        .is_some_and(|c| c == "events_robot_version");
    let e = write_error(e);
    if !matches!(e, StoreError::Invalid(_)) {
        return Err(BatchError::Failed(e));
    }
    if !version_taken {
        return Ok(e);
    }
    let actual: i64 = sqlx::query_scalar(
        "SELECT COALESCE(MAX(version), 0)::int8 FROM events WHERE robot_id = $1",
    )
    .bind(append.robot_id.0)
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| BatchError::Failed(read_error(e)))?;
    Ok(StoreError::Conflict {
        robot_id: append.robot_id,
        expected: append.expected_version,
        actual,
    })
}

/// Checks one append against the robot's current row and prepares it.
fn plan(current: Option<&Current>, append: &Append) -> Result<Planned, StoreError> {
    let stored = match current {
        None => None,
        Some(Current::Row(robot)) => Some((**robot).clone()),
        Some(Current::Corrupt(e)) => return Err(StoreError::Corrupt(e.clone())),
    };
    let actual = stored.as_ref().map_or(0, |r| r.version);
    if actual != append.expected_version {
        return Err(StoreError::Conflict {
            robot_id: append.robot_id,
            expected: append.expected_version,
            actual,
        });
    }
    check_shape(append)?;
    let records = records_of(append);
    check_against_log(&append.robot, stored, &records)?;
    let robot = append.robot.clone();
    let json = PlannedJson {
        health: to_json(&robot.health)?,
        mac_addresses: to_json(&robot.mac_addresses)?,
        capabilities: to_json(&robot.capabilities)?,
        last_report: robot.last_report.as_ref().map(to_json).transpose()?,
        events: records
            .iter()
            .map(|r| {
                let (event_type, data) = r.event.to_parts();
                Ok((event_type, data, to_json(&r.metadata)?))
            })
            .collect::<Result<_, StoreError>>()?,
        report_health: append
            .report
            .as_ref()
            .map(|r| to_json(&r.health))
            .transpose()?,
    };
    Ok(Planned {
        robot,
        records,
        report: append.report.clone(),
        json,
    })
}

/// The contract of [`Append`] that does not need the database.
fn check_shape(append: &Append) -> Result<(), StoreError> {
    let id = append.robot_id;
    if append.robot.robot_id != id {
        return Err(StoreError::Invalid(format!(
            "append for robot {id} carries the row of robot {}",
            append.robot.robot_id
        )));
    }
    let expected_row_version = append.expected_version + append.events.len() as i64;
    if append.robot.version != expected_row_version {
        return Err(StoreError::Invalid(format!(
            "robot {id}: row version {} after {} events from version {} (expected {expected_row_version})",
            append.robot.version,
            append.events.len(),
            append.expected_version
        )));
    }
    if let Some(report) = &append.report
        && report.robot_id != id
    {
        return Err(StoreError::Invalid(format!(
            "append for robot {id} carries a report of robot {}",
            report.robot_id
        )));
    }
    Ok(())
}

/// The append's events as they will be stored; positions are filled in by
/// the insert.
fn records_of(append: &Append) -> Vec<EventRecord> {
    (1..)
        .zip(&append.events)
        .map(|(offset, new)| EventRecord {
            position: 0,
            event_id: new.event_id,
            robot_id: append.robot_id,
            version: append.expected_version + offset,
            event: new.event.clone(),
            metadata: new.metadata.clone(),
            recorded_at: new.recorded_at,
        })
        .collect()
}

/// Refuses events that do not apply to the stored row, a first append
/// without events, and a row in another state than the events lead to.
fn check_against_log(
    robot: &Robot,
    stored: Option<Robot>,
    records: &[EventRecord],
) -> Result<(), StoreError> {
    let id = robot.robot_id;
    let mut projected = stored;
    for record in records {
        projected = Some(Robot::apply(projected, record).map_err(|e| {
            StoreError::Invalid(format!("robot {id}: event version {}: {e}", record.version))
        })?);
    }
    let Some(projected) = projected else {
        return Err(StoreError::Invalid(format!(
            "robot {id} has no events: its first append must record robot_discovered"
        )));
    };
    if projected.state != robot.state {
        return Err(StoreError::Invalid(format!(
            "robot {id}: row says {} but its events leave it {}",
            robot.state, projected.state
        )));
    }
    Ok(())
}

/// Writes planned appends with one statement: the rows (the last of each
/// robot), the reports (the first of each (robot, seq), later ones being
/// resends), and the events in order, whose positions it fills in.
async fn write_rows(conn: &mut PgConnection, plans: &mut [&mut Planned]) -> Result<(), sqlx::Error> {
    let mut last_of: HashMap<RobotId, usize> = HashMap::new();
    for (i, p) in plans.iter().enumerate() {
        last_of.insert(p.robot.robot_id, i);
    }
    let mut rows = RowArrays::default();
    let mut reports = ReportArrays::default();
    let mut events = EventArrays::default();
    let mut seen_reports = HashSet::new();
    for (i, p) in plans.iter().enumerate() {
        if last_of.get(&p.robot.robot_id) == Some(&i) {
            rows.push(&p.robot, &p.json);
        }
        if let (Some(report), Some(health)) = (&p.report, &p.json.report_health)
            && seen_reports.insert((report.robot_id, report.seq))
        {
            reports.push(report, health);
        }
        for (record, (event_type, data, metadata)) in p.records.iter().zip(&p.json.events) {
            events.event_id.push(record.event_id);
            events.robot_id.push(record.robot_id.0);
            events.version.push(record.version);
            events.event_type.push(event_type);
            events.data.push(data.clone());
            events.metadata.push(metadata.clone());
            events.recorded_at.push(record.recorded_at);
        }
    }
    let positions: Vec<(Uuid, i64)> = sqlx::query_as(WRITE_ROWS)
        .bind(rows.robot_id)
        .bind(rows.version)
        .bind(rows.state)
        .bind(rows.health)
        .bind(rows.hostname)
        .bind(rows.ip_address)
        .bind(rows.robot_type)
        .bind(rows.model)
        .bind(rows.firmware_version)
        .bind(rows.agent_version)
        .bind(rows.deployment_version)
        .bind(rows.hardware_id)
        .bind(rows.mac_addresses)
        .bind(rows.last_heartbeat)
        .bind(rows.last_state_change)
        .bind(rows.failure_count)
        .bind(rows.config)
        .bind(rows.capabilities)
        .bind(rows.metadata)
        .bind(rows.discovered_at)
        .bind(rows.provisioned_at)
        .bind(rows.activated_at)
        .bind(rows.updated_at)
        .bind(rows.last_report_seq)
        .bind(rows.last_report)
        .bind(reports.robot_id)
        .bind(reports.seq)
        .bind(reports.time)
        .bind(reports.received_at)
        .bind(reports.health)
        .bind(reports.workload)
        .bind(reports.maintenance)
        .bind(reports.telemetry)
        .bind(events.event_id)
        .bind(events.robot_id)
        .bind(events.version)
        .bind(events.event_type)
        .bind(events.data)
        .bind(events.metadata)
        .bind(events.recorded_at)
        .fetch_all(&mut *conn)
        .await?;
    let positions: HashMap<Uuid, i64> = positions.into_iter().collect();
    for p in plans.iter_mut() {
        for record in &mut p.records {
            record.position = positions.get(&record.event_id).copied().ok_or_else(|| {
                sqlx::Error::Protocol(format!("no position returned for event {}", record.event_id))
            })?;
        }
    }
    Ok(())
}

/// The rows, the reports and the events of a batch in one statement. The
/// events are inserted in array order (`ORDER BY ord`), which is the order
/// their identity values are drawn in: positions follow queue order.
const WRITE_ROWS: &str = "\
WITH robots AS (
    INSERT INTO robot_states (robot_id, version, state, health, hostname, ip_address,
        robot_type, model, firmware_version, agent_version, deployment_version, hardware_id,
        mac_addresses, last_heartbeat, last_state_change, failure_count, config, capabilities,
        metadata, discovered_at, provisioned_at, activated_at, updated_at, last_report_seq,
        last_report)
    SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::jsonb[], $5::text[],
        $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
        $13::jsonb[], $14::timestamptz[], $15::timestamptz[], $16::int8[], $17::jsonb[],
        $18::jsonb[], $19::jsonb[], $20::timestamptz[], $21::timestamptz[], $22::timestamptz[],
        $23::timestamptz[], $24::int8[], $25::jsonb[])
    ON CONFLICT (robot_id) DO UPDATE SET version = EXCLUDED.version, state = EXCLUDED.state,
        health = EXCLUDED.health, hostname = EXCLUDED.hostname,
        ip_address = EXCLUDED.ip_address, robot_type = EXCLUDED.robot_type,
        model = EXCLUDED.model, firmware_version = EXCLUDED.firmware_version,
        agent_version = EXCLUDED.agent_version,
        deployment_version = EXCLUDED.deployment_version, hardware_id = EXCLUDED.hardware_id,
        mac_addresses = EXCLUDED.mac_addresses, last_heartbeat = EXCLUDED.last_heartbeat,
        last_state_change = EXCLUDED.last_state_change, failure_count = EXCLUDED.failure_count,
        config = EXCLUDED.config, capabilities = EXCLUDED.capabilities,
        metadata = EXCLUDED.metadata, discovered_at = EXCLUDED.discovered_at,
        provisioned_at = EXCLUDED.provisioned_at, activated_at = EXCLUDED.activated_at,
        updated_at = EXCLUDED.updated_at, last_report_seq = EXCLUDED.last_report_seq,
        last_report = EXCLUDED.last_report
), reports AS (
    INSERT INTO robot_reports (robot_id, seq, time, received_at, health, workload,
        maintenance, telemetry)
    SELECT * FROM UNNEST($26::uuid[], $27::int8[], $28::timestamptz[], $29::timestamptz[],
        $30::jsonb[], $31::text[], $32::bool[], $33::jsonb[])
    ON CONFLICT (robot_id, seq) DO NOTHING
)
INSERT INTO events (event_id, robot_id, version, event_type, data, metadata, recorded_at)
SELECT e.event_id, e.robot_id, e.version, e.event_type, e.data, e.metadata, e.recorded_at
FROM UNNEST($34::uuid[], $35::uuid[], $36::int8[], $37::text[], $38::jsonb[], $39::jsonb[],
    $40::timestamptz[]) WITH ORDINALITY
    AS e (event_id, robot_id, version, event_type, data, metadata, recorded_at, ord)
ORDER BY e.ord
RETURNING event_id, position";

/// `robot_states` rows as column arrays, for `UNNEST`.
#[derive(Debug, Default)]
struct RowArrays {
    robot_id: Vec<Uuid>,
    version: Vec<i64>,
    state: Vec<&'static str>,
    health: Vec<serde_json::Value>,
    hostname: Vec<String>,
    ip_address: Vec<Option<String>>,
    robot_type: Vec<String>,
    model: Vec<Option<String>>,
    firmware_version: Vec<Option<String>>,
    agent_version: Vec<Option<String>>,
    deployment_version: Vec<Option<String>>,
    hardware_id: Vec<String>,
    mac_addresses: Vec<serde_json::Value>,
    last_heartbeat: Vec<Option<DateTime<Utc>>>,
    last_state_change: Vec<DateTime<Utc>>,
    failure_count: Vec<i64>,
    config: Vec<serde_json::Value>,
    capabilities: Vec<serde_json::Value>,
    metadata: Vec<serde_json::Value>,
    discovered_at: Vec<DateTime<Utc>>,
    provisioned_at: Vec<Option<DateTime<Utc>>>,
    activated_at: Vec<Option<DateTime<Utc>>>,
    updated_at: Vec<DateTime<Utc>>,
    last_report_seq: Vec<i64>,
    last_report: Vec<Option<serde_json::Value>>,
}

impl RowArrays {
    fn push(&mut self, r: &Robot, json: &PlannedJson) {
        self.robot_id.push(r.robot_id.0);
        self.version.push(r.version);
        self.state.push(r.state.as_str());
        self.health.push(json.health.clone());
        self.hostname.push(r.hostname.clone());
        self.ip_address.push(r.ip_address.clone());
        self.robot_type.push(r.robot_type.clone());
        self.model.push(r.model.clone());
        self.firmware_version.push(r.firmware_version.clone());
        self.agent_version.push(r.agent_version.clone());
        self.deployment_version.push(r.deployment_version.clone());
        self.hardware_id.push(r.hardware_id.clone());
        self.mac_addresses.push(json.mac_addresses.clone());
        self.last_heartbeat.push(r.last_heartbeat);
        self.last_state_change.push(r.last_state_change);
        self.failure_count.push(r.failure_count);
        self.config.push(r.config.clone());
        self.capabilities.push(json.capabilities.clone());
        self.metadata.push(r.metadata.clone());
        self.discovered_at.push(r.discovered_at);
        self.provisioned_at.push(r.provisioned_at);
        self.activated_at.push(r.activated_at);
        self.updated_at.push(r.updated_at);
        self.last_report_seq.push(r.last_report_seq);
        self.last_report.push(json.last_report.clone());
    }
}

/// `robot_reports` rows as column arrays, for `UNNEST`.
#[derive(Debug, Default)]
struct ReportArrays {
    robot_id: Vec<Uuid>,
    seq: Vec<i64>,
    time: Vec<DateTime<Utc>>,
    received_at: Vec<DateTime<Utc>>,
    health: Vec<serde_json::Value>,
    workload: Vec<String>,
    maintenance: Vec<bool>,
    telemetry: Vec<serde_json::Value>,
}

impl ReportArrays {
    fn push(&mut self, r: &StoredReport, health: &serde_json::Value) {
        self.robot_id.push(r.robot_id.0);
        self.seq.push(r.seq);
        self.time.push(r.time);
        self.received_at.push(r.received_at);
        self.health.push(health.clone());
        self.workload.push(r.workload.clone());
        self.maintenance.push(r.maintenance);
        self.telemetry.push(r.telemetry.clone());
    }
}

/// `events` rows as column arrays, for `UNNEST`.
#[derive(Debug, Default)]
struct EventArrays {
    event_id: Vec<Uuid>,
    robot_id: Vec<Uuid>,
    version: Vec<i64>,
    event_type: Vec<&'static str>,
    data: Vec<serde_json::Value>,
    metadata: Vec<serde_json::Value>,
    recorded_at: Vec<DateTime<Utc>>,
}

// ---------------------------------------------------------------------------
// Notifications and the listener task.

/// The payload of one commit notification: one append. `events` and
/// `robot` are there when the whole commit fits in a notification; else
/// the listener reads them (a reference: positions `first..=last`).
#[derive(Debug, Serialize, Deserialize)]
struct Notice {
    robot_id: RobotId,
    version: i64,
    report_seq: i64,
    /// The positions of the append's events (none: a report only).
    first: Option<i64>,
    last: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    events: Option<Vec<EventRecord>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    robot: Option<Robot>,
}

/// The notification of one written append: the whole commit if it fits,
/// else a reference.
fn notice(planned: &Planned) -> String {
    let mut notice = Notice {
        robot_id: planned.robot.robot_id,
        version: planned.robot.version,
        report_seq: planned.robot.last_report_seq,
        first: planned.records.first().map(|r| r.position),
        last: planned.records.last().map(|r| r.position),
        events: Some(planned.records.clone()),
        robot: Some(planned.robot.clone()),
    };
    if let Ok(full) = serde_json::to_string(&notice)
        && full.len() <= NOTIFY_PAYLOAD_MAX
    {
        return full;
    }
    notice.events = None;
    notice.robot = None;
    // Ids and numbers only: serialising cannot fail.
    serde_json::to_string(&notice).unwrap_or_default()
}

/// Follows the commit notifications and publishes the feed.
#[derive(Debug)]
struct Follower {
    pool: PgPool,
    listen_pool: PgPool,
    feed: broadcast::Sender<Arc<Committed>>,
    /// The highest position published (or below the feed's start).
    last_seen: i64,
    /// Per robot, the freshest (version, report sequence) published.
    published: HashMap<RobotId, (i64, i64)>,
    stop: CancellationToken,
}

impl Follower {
    /// A new connection listening on the channel.
    async fn listen(&self) -> Result<PgListener, StoreError> {
        let mut listener = PgListener::connect_with(&self.listen_pool)
            .await
            .map_err(|e| unavailable("cannot connect the commit listener", &e))?;
        // A lost connection is handled here (reconnect, then catch up), not
        // by the listener on its own.
        listener.eager_reconnect(false);
        listener
            .listen(CHANNEL)
            .await
            .map_err(|e| unavailable("cannot LISTEN for commits", &e))?;
        Ok(listener)
    }

    /// Where the feed starts: the log's head and every row's freshness.
    async fn baseline(&mut self) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(read_error)?;
        self.last_seen = head_in(&mut *tx).await?;
        self.published = freshness(&mut tx).await?;
        tx.commit().await.map_err(read_error)?;
        Ok(())
    }

    async fn run(mut self, first: PgListener) {
        let stop = self.stop.clone();
        let mut listener = Some(first);
        let mut backoff = Backoff::default();
        loop {
            let Some(active) = listener.as_mut() else {
                let resumed = tokio::select! {
                    () = stop.cancelled() => return,
                    resumed = self.resume() => resumed,
                };
                match resumed {
                    Ok(l) => {
                        tracing::info!(position = self.last_seen, "commit listener reconnected and caught up");
                        listener = Some(l);
                        backoff.reset();
                    }
                    Err(e) => {
                        let wait = backoff.next_wait();
                        tracing::warn!(error = %e, retry_in = ?wait, "commit listener cannot reconnect");
                        tokio::select! {
                            () = self.stop.cancelled() => return,
                            () = tokio::time::sleep(wait) => {}
                        }
                    }
                }
                continue;
            };
            let received = tokio::select! {
                () = self.stop.cancelled() => return,
                received = active.try_recv() => received,
            };
            let lost = match received {
                Ok(Some(first)) => {
                    let mut batch = vec![first];
                    while let Some(next) = active.next_buffered() {
                        batch.push(next);
                    }
                    match self.handle(batch).await {
                        Ok(()) => None,
                        Err(e) => Some(e),
                    }
                }
                Ok(None) => Some(StoreError::Unavailable("connection lost".into())),
                Err(e) => Some(unavailable("receiving notifications", &e)),
            };
            if let Some(e) = lost {
                // Notifications may be missed from here on: start over with
                // a new connection and catch up from the last position.
                tracing::warn!(error = %e, position = self.last_seen, "commit listener lost its place; reconnecting");
                listener = None;
            }
        }
    }

    /// Listens again, then publishes what was committed meanwhile.
    async fn resume(&mut self) -> Result<PgListener, StoreError> {
        let listener = self.listen().await?;
        self.catch_up().await?;
        Ok(listener)
    }

    async fn handle(&mut self, batch: Vec<PgNotification>) -> Result<(), StoreError> {
        for n in batch {
            let notice: Notice = serde_json::from_str(n.payload()).map_err(|e| {
                StoreError::Corrupt(format!("commit notification {:?}: {e}", n.payload()))
            })?;
            match (notice.events, notice.robot) {
                (Some(events), Some(robot)) => self.publish(events, Arc::new(robot)),
                _ => self.resolve(notice.robot_id, notice.first, notice.last).await?,
            }
        }
        Ok(())
    }

    /// Publishes a commit whose notification was a reference.
    async fn resolve(
        &mut self,
        id: RobotId,
        first: Option<i64>,
        last: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(read_error)?;
        let events = match (first, last) {
            (Some(first), Some(last)) => sqlx::query(concat!(
                "SELECT ",
                event_columns!(),
                " FROM events WHERE position BETWEEN $1 AND $2 ORDER BY position"
            ))
            .bind(first)
            .bind(last)
            .fetch_all(&mut *tx)
            .await
            .map_err(read_error)?
            .iter()
            .map(decode_event)
            .collect::<Result<Vec<_>, _>>()?,
            _ => Vec::new(),
        };
        let robot = sqlx::query(concat!(
            "SELECT ",
            robot_columns!(),
            " FROM robot_states WHERE robot_id = $1"
        ))
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(read_error)?
        .as_ref()
        .map(decode_robot)
        .transpose()?;
        tx.commit().await.map_err(read_error)?;
        match robot {
            Some(robot) => self.publish(events, Arc::new(robot)),
            None => tracing::error!(robot_id = %id, "a committed robot has no row; not published"),
        }
        Ok(())
    }

    /// Publishes, in one snapshot, the events after the last position
    /// published (runs of one robot, each with the robot's row) and then
    /// the rows that changed without events.
    async fn catch_up(&mut self) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(read_error)?;
        let mut events = Vec::new();
        let mut after = self.last_seen;
        loop {
            let page = events_after_in(&mut *tx, after, CATCH_UP_PAGE).await?;
            let full = page.len() == CATCH_UP_PAGE as usize;
            if let Some(last) = page.last() {
                after = last.position;
            }
            events.extend(page);
            if !full {
                break;
            }
        }
        let fresh = freshness(&mut tx).await?;
        let mut changed: Vec<Uuid> = events.iter().map(|e| e.robot_id.0).collect();
        changed.extend(
            fresh
                .iter()
                .filter(|(id, f)| self.published.get(id).is_none_or(|p| p < *f))
                .map(|(id, _)| id.0),
        );
        changed.sort_unstable();
        changed.dedup();
        let rows: HashMap<RobotId, Arc<Robot>> = sqlx::query(concat!(
            "SELECT ",
            robot_columns!(),
            " FROM robot_states WHERE robot_id = ANY($1)"
        ))
        .bind(changed)
        .fetch_all(&mut *tx)
        .await
        .map_err(read_error)?
        .iter()
        .map(|row| decode_robot(row).map(|r| (r.robot_id, Arc::new(r))))
        .collect::<Result<_, _>>()?;
        tx.commit().await.map_err(read_error)?;

        let mut events = events.into_iter().peekable();
        while let Some(first) = events.next() {
            let id = first.robot_id;
            let mut run = vec![first];
            while let Some(next) = events.next_if(|e| e.robot_id == id) {
                run.push(next);
            }
            match rows.get(&id) {
                Some(robot) => self.publish(run, robot.clone()),
                None => tracing::error!(robot_id = %id, "a robot with events has no row; not published"),
            }
        }
        let mut quiet: Vec<&Arc<Robot>> = rows.values().collect();
        quiet.sort_by_key(|r| r.robot_id);
        for robot in quiet {
            self.publish(Vec::new(), robot.clone());
        }
        Ok(())
    }

    /// Publishes one commit, without what was already published.
    fn publish(&mut self, mut events: Vec<EventRecord>, robot: Arc<Robot>) {
        events.retain(|e| e.position > self.last_seen);
        let fresh = (robot.version, robot.last_report_seq);
        let known = self.published.get(&robot.robot_id).copied();
        if events.is_empty() && known.is_some_and(|k| k >= fresh) {
            return;
        }
        if let Some(last) = events.last() {
            self.last_seen = last.position;
        }
        self.published
            .insert(robot.robot_id, known.map_or(fresh, |k| k.max(fresh)));
        // No subscriber is not an error: nobody is watching yet.
        let _ = self.feed.send(Arc::new(Committed { events, robot }));
    }
}

/// Every row's (version, report sequence).
async fn freshness(conn: &mut PgConnection) -> Result<HashMap<RobotId, (i64, i64)>, StoreError> {
    let rows: Vec<(Uuid, i64, i64)> =
        sqlx::query_as("SELECT robot_id, version, last_report_seq FROM robot_states")
            .fetch_all(&mut *conn)
            .await
            .map_err(read_error)?;
    Ok(rows
        .into_iter()
        .map(|(id, version, seq)| (RobotId(id), (version, seq)))
        .collect())
}

/// Capped exponential backoff with jitter.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_START,
        }
    }
}

impl Backoff {
    fn reset(&mut self) {
        self.next = BACKOFF_START;
    }

    /// The next wait: between half and all of the current step.
    fn next_wait(&mut self) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(BACKOFF_MAX);
        step.mul_f64(rand::random_range(0.5..=1.0))
    }
}

// ---------------------------------------------------------------------------
// Encoding and decoding.

fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(value)
        .map_err(|e| StoreError::Invalid(format!("cannot encode as JSON: {e}")))
}

fn decode_robot(row: &PgRow) -> Result<Robot, StoreError> {
    robot_fields(row).map_err(|e| {
        StoreError::Corrupt(format!("robot_states row {}: {e}", key(row, "robot_id")))
    })
}

fn robot_fields(row: &PgRow) -> Result<Robot, String> {
    Ok(Robot {
        robot_id: RobotId(col(row, "robot_id")?),
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
        last_heartbeat: col(row, "last_heartbeat")?,
        last_state_change: col(row, "last_state_change")?,
        failure_count: col(row, "failure_count")?,
        config: col(row, "config")?,
        capabilities: json_col(row, "capabilities")?,
        metadata: col(row, "metadata")?,
        discovered_at: col(row, "discovered_at")?,
        provisioned_at: col(row, "provisioned_at")?,
        activated_at: col(row, "activated_at")?,
        updated_at: col(row, "updated_at")?,
        last_report_seq: col(row, "last_report_seq")?,
        last_report: opt_json_col::<LastReport>(row, "last_report")?,
    })
}

fn decode_event(row: &PgRow) -> Result<EventRecord, StoreError> {
    event_fields(row).map_err(|e| {
        StoreError::Corrupt(format!(
            "event at position {} (robot {}): {e}",
            key(row, "position"),
            key(row, "robot_id")
        ))
    })
}

fn event_fields(row: &PgRow) -> Result<EventRecord, String> {
    let event_type: String = col(row, "event_type")?;
    let data: serde_json::Value = col(row, "data")?;
    let event = RobotEvent::from_parts(&event_type, data)
        .map_err(|e| format!("event {event_type:?}: {e}"))?;
    Ok(EventRecord {
        position: col(row, "position")?,
        event_id: col(row, "event_id")?,
        robot_id: RobotId(col(row, "robot_id")?),
        version: col(row, "version")?,
        event,
        metadata: json_col::<EventMetadata>(row, "metadata")?,
        recorded_at: col(row, "recorded_at")?,
    })
}

fn decode_report(row: &PgRow) -> Result<StoredReport, StoreError> {
    report_fields(row).map_err(|e| {
        StoreError::Corrupt(format!(
            "report {} of robot {}: {e}",
            key(row, "seq"),
            key(row, "robot_id")
        ))
    })
}

fn report_fields(row: &PgRow) -> Result<StoredReport, String> {
    Ok(StoredReport {
        robot_id: RobotId(col(row, "robot_id")?),
        seq: col(row, "seq")?,
        time: col(row, "time")?,
        received_at: col(row, "received_at")?,
        health: json_col(row, "health")?,
        workload: col(row, "workload")?,
        maintenance: col(row, "maintenance")?,
        telemetry: col(row, "telemetry")?,
    })
}

/// A key column as text, for error messages about the row.
fn key(row: &PgRow, name: &str) -> String {
    if let Ok(id) = row.try_get::<Uuid, _>(name) {
        id.to_string()
    } else if let Ok(number) = row.try_get::<i64, _>(name) {
        number.to_string()
    } else {
        format!("with an unreadable {name}")
    }
}

fn col<'r, T>(row: &'r PgRow, name: &str) -> Result<T, String>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(name).map_err(|e| format!("column {name}: {e}"))
}

fn json_col<T: DeserializeOwned>(row: &PgRow, name: &str) -> Result<T, String> {
    let value: serde_json::Value = col(row, name)?;
    serde_json::from_value(value).map_err(|e| format!("column {name}: {e}"))
}

fn opt_json_col<T: DeserializeOwned>(row: &PgRow, name: &str) -> Result<Option<T>, String> {
    let value: Option<serde_json::Value> = col(row, name)?;
    value
        .map(|v| serde_json::from_value(v).map_err(|e| format!("column {name}: {e}")))
        .transpose()
}

fn state_col(row: &PgRow, name: &str) -> Result<LifecycleState, String> {
    let text: String = col(row, name)?;
    text.parse().map_err(|e| format!("column {name}: {e}"))
}

// ---------------------------------------------------------------------------
// Errors.

fn unavailable(context: &str, e: &sqlx::Error) -> StoreError {
    StoreError::Unavailable(format!("{context}: {e}"))
}

/// PostgreSQL's own report that stored data is damaged (class XX:
/// `data_corrupted`, `index_corrupted`).
fn is_corruption(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code == "XX001" || code == "XX002")
}

/// A read that failed: damaged data is corrupt; everything else (lost
/// connection, pool timeout, server shutting down, statement timeout) is
/// worth retrying.
fn read_error(e: sqlx::Error) -> StoreError {
    if is_corruption(&e) || matches!(e, sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_))
    {
        StoreError::Corrupt(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

/// A write that failed: a constraint or a value PostgreSQL refuses (class
/// 23 integrity violation, class 22 data exception) or that cannot be
/// encoded is the caller's; the rest is the database's.
fn write_error(e: sqlx::Error) -> StoreError {
    if let Some(db) = e.as_database_error()
        && let Some(code) = db.code()
        && (code.starts_with("23") || code.starts_with("22"))
    {
        return StoreError::Invalid(db.message().to_string());
    }
    if let sqlx::Error::Encode(cause) = &e {
        return StoreError::Invalid(format!("cannot encode a value: {cause}"));
    }
    read_error(e)
}
