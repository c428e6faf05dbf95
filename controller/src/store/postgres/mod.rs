//! The production event store: PostgreSQL, shared by several controllers.
//!
//! The schema lives only in `migrations/postgres/`, applied by
//! [`PostgresStore::connect`] (and [`PostgresStore::migrate`]) on a
//! dedicated connection: sqlx's migrator holds a session advisory lock while
//! it runs, so controllers starting together apply each migration once, and
//! closing that connection releases the lock even when a migration failed.
//!
//! **Group commit.** Every append goes over a bounded channel to one writer
//! task per store, which owns a connection of its own (outside the pool:
//! a store opens `pool_size` + 2 connections, the writer's and the
//! listener's included). It takes the first waiting append, drains
//! whatever else is queued (up to [`BATCH_CAP`]) and writes them all with
//! one statement, run on its own: one transaction, one round trip, so a
//! burst of appends from many robots costs one commit (one WAL flush), and
//! a single append costs no more round trips than `INSERT` alone. No
//! caller is answered before the commit that holds its data (PostgreSQL
//! answers the statement only once its commit is durable); if the
//! connection fails, the callers not answered yet get
//! [`StoreError::Unavailable`] and the writer reconnects for the next
//! batch.
//!
//! **Optimistic concurrency.** The writer checks each append in memory
//! against the robot's head (its version and lifecycle state: all that
//! [`Robot::apply`] checks, see [`Head::next`]), exactly as the SQLite
//! backend does; appends for the same robot in one batch see each other,
//! in queue order. The heads come from what the writer wrote or read
//! before (a robot it has not seen is read first). They are only a hint:
//! the statement writes a robot's row, and only then its events and
//! report, only if the stored row is still at the version the append was
//! checked against (the guard, evaluated by `ON CONFLICT` on the newest
//! row version). A robot whose row moved on (another controller wrote it)
//! is left out of that transaction, read again and written in the next
//! attempt; an answer that depends on the head (a conflict, an event that
//! does not apply) is given only once the head was read or confirmed by a
//! guard. Should PostgreSQL refuse the statement (a reused event id, a
//! value it does not accept), each append is written again by itself, so
//! that only the culprit is answered with its error. The unique
//! (robot_id, version) constraint stays as the backstop: a violation is
//! answered as a conflict.
//!
//! **Position order across controllers.** Positions come from an identity
//! column, and an identity value is taken when a row is inserted, not when
//! its transaction commits. Two controllers committing at once could then
//! make position 11 visible before position 10, and a reader that resumed
//! after 11 would never see 10. So every write statement takes
//! `pg_advisory_xact_lock(LOG_LOCK)` before it writes anything: all
//! transactions that append to the log or change `robot_states`, from
//! every controller, run one after the other, and draw their positions in
//! that order. PostgreSQL releases transaction locks only after the commit
//! is visible to new snapshots, so positions become visible in position
//! order. Group commit keeps the lock's cost per event small.
//!
//! **The feed across controllers.** The write statement calls
//! `pg_notify('kiwi_commits', ...)` once per written append, in position
//! order. PostgreSQL delivers notifications at commit, in commit order,
//! which (by the lock above) is position order. Each payload carries the
//! whole commit (its events, numbered from the first and last positions the
//! statement puts in front, and the robot's row) when it fits in a
//! notification (8000 bytes), else a reference (robot, version, positions)
//! that the listener resolves by reading the log and the row. A listener task per store (its own connection, `LISTEN`)
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

use super::auth::AuthStore;
use super::checks::{check_against_log, check_shape, records_of};
use super::{
    Append, BreakerColumns, Committed, DiscoveryResult, DiscoverySession, EventStore, Fence,
    History, PruneOutcome, SightingMethod, SightingOutcome, Snapshot, StoreError, StoredBreaker,
    StoredReport,
};
use crate::domain::{EventRecord, Head, LifecycleState, Robot};
use crate::store::rows::{self as decode, Columns};
use auth::PostgresAuthStore;
use chrono::{DateTime, Utc};
use kiwi_protocol::RobotId;
use kiwi_protocol::backoff::Backoff;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sqlx::migrate::Migrator;
use sqlx::postgres::{
    PgConnectOptions, PgConnection, PgListener, PgNotification, PgPool, PgPoolOptions, PgRow,
};
use sqlx::{ConnectOptions, Connection, Postgres, Row};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

/// The most appends written in one transaction.
pub const BATCH_CAP: usize = 256;
/// The most robot heads the writer remembers (see `Writer::heads`): about
/// 40 bytes each.
const HEAD_CACHE: usize = 65_536;
/// How many times a batch is written for robots whose row moved on under
/// it (another controller wrote them) before they are answered with a
/// conflict.
const WRITE_ATTEMPTS: usize = 3;
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
/// How the listener waits before reconnecting: the one backoff policy,
/// from 100 ms up to 5 s.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
/// Events read per query when the listener catches up.
const CATCH_UP_PAGE: u32 = 5000;
/// PostgreSQL refuses notification payloads of 8000 bytes or more.
const NOTIFY_PAYLOAD_MAX: usize = 7999;

/// The notification channel of commits (a macro, to be spliced into SQL).
macro_rules! channel {
    () => {
        "kiwi_commits"
    };
}
/// The channel every controller's writer notifies its commits on.
pub const CHANNEL: &str = channel!();

/// The key of the transaction advisory lock that every transaction writing
/// the log takes first (see the module doc). Part of the schema's
/// contract: every controller version sharing a database must use it.
/// `0x6b697769_6c6f6701` ("kiwi", "lo", 1), in decimal to be spliced into
/// SQL.
macro_rules! log_lock {
    () => {
        "7739848729287419649"
    };
}
/// The key of the transaction advisory lock that serialises prunes, so two
/// cannot fold one robot concurrently and leave an older snapshot.
const PRUNE_LOCK: i64 = 0x6b69_7769_7072_0001;

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

/// The columns of `robot_reports`, as [`decode::report`] reads them.
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
    /// Security records, over the read pool.
    auth: Arc<PostgresAuthStore>,
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`)
    /// with a pool of `pool_size` connections for reads (plus one each for
    /// the writer and the listener), applies the migrations and starts the
    /// writer and listener tasks.
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
            .connect_with(session.clone())
            .await
            .map_err(|e| unavailable("cannot connect to PostgreSQL", &e))?;

        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let stop = CancellationToken::new();
        Follower::start(
            pool.clone(),
            listen_pool.clone(),
            feed.clone(),
            stop.clone(),
        )
        .await?;

        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        let batches = Arc::new(AtomicU64::new(0));
        Writer::start(session, acquire_timeout, batches.clone(), queue).await?;
        Ok(PostgresStore {
            auth: Arc::new(PostgresAuthStore::new(pool.clone())),
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
    // `run_direct` is `run` on a connection: the same locking and
    // bookkeeping, but its future is `Send` for every lifetime, so a
    // caller may spawn `connect` (`run`'s `Acquire` bound is not general
    // enough for that).
    MIGRATOR
        .run_direct(None, &mut conn, false)
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
        row.as_ref().map(decode::robot).transpose()
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
        .map(decode::robot)
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
            .map(decode::event)
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
        .map(decode::report)
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
        sqlx::query("DELETE FROM discovery_results WHERE session_id = $1")
            .bind(session.session_id)
            .execute(&mut *tx)
            .await
            .map_err(write_error)?;
        if !session.results.is_empty() {
            let r = &session.results;
            sqlx::query(
                "INSERT INTO discovery_results (session_id, ip_address, robot_id, method, \
                 found_at, mac_address, robot_type, outcome, detail) \
                 SELECT $1, r.ip_address, r.robot_id, r.method, r.found_at, r.mac_address, \
                 r.robot_type, r.outcome, r.detail FROM UNNEST($2::text[], $3::uuid[], $4::text[], \
                 $5::timestamptz[], $6::text[], $7::text[], $8::text[], $9::text[]) \
                 WITH ORDINALITY AS r (ip_address, robot_id, method, found_at, mac_address, \
                 robot_type, outcome, detail, ord) ORDER BY r.ord",
            )
            .bind(session.session_id)
            .bind(r.iter().map(|x| x.ip_address.clone()).collect::<Vec<_>>())
            .bind(
                r.iter()
                    .map(|x| x.robot_id.map(|id| id.0))
                    .collect::<Vec<_>>(),
            )
            .bind(r.iter().map(|x| x.method.as_str()).collect::<Vec<_>>())
            .bind(r.iter().map(|x| x.found_at).collect::<Vec<_>>())
            .bind(r.iter().map(|x| x.mac_address.clone()).collect::<Vec<_>>())
            .bind(r.iter().map(|x| x.robot_type.clone()).collect::<Vec<_>>())
            .bind(r.iter().map(|x| x.outcome.as_str()).collect::<Vec<_>>())
            .bind(r.iter().map(|x| x.detail.clone()).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await
            .map_err(write_error)?;
        }
        tx.commit().await.map_err(write_error)
    }

    async fn discovery(&self, id: Uuid) -> Result<Option<DiscoverySession>, StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(read_error)?;
        let row = sqlx::query(
            "SELECT session_id, methods, started_at, finished_at, duration_ms, robots_found, \
             new_robots FROM discovery_sessions WHERE session_id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(read_error)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let corrupt = |e: String| StoreError::Corrupt(format!("discovery session {id}: {e}"));
        let mut session = DiscoverySession {
            session_id: col(&row, "session_id").map_err(corrupt)?,
            methods: json_col(&row, "methods").map_err(corrupt)?,
            started_at: col(&row, "started_at").map_err(corrupt)?,
            finished_at: col(&row, "finished_at").map_err(corrupt)?,
            duration_ms: col(&row, "duration_ms").map_err(corrupt)?,
            robots_found: col(&row, "robots_found").map_err(corrupt)?,
            new_robots: col(&row, "new_robots").map_err(corrupt)?,
            results: Vec::new(),
        };
        let rows = sqlx::query(
            "SELECT ip_address, robot_id, method, found_at, mac_address, robot_type, outcome, \
             detail FROM discovery_results WHERE session_id = $1 ORDER BY result_id",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .map_err(read_error)?;
        tx.commit().await.map_err(read_error)?;
        for row in &rows {
            let robot_id: Option<Uuid> = col(row, "robot_id").map_err(corrupt)?;
            session.results.push(DiscoveryResult {
                ip_address: col(row, "ip_address").map_err(corrupt)?,
                robot_id: robot_id.map(RobotId),
                method: col::<String>(row, "method")
                    .and_then(|m| SightingMethod::parse(&m))
                    .map_err(corrupt)?,
                found_at: col(row, "found_at").map_err(corrupt)?,
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
        .map(decode::event)
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
            .fetch_all(&self.pool)
            .await
            .map_err(read_error)?
            .iter()
            .map(decode::snapshot)
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
        .map(decode::report)
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

    async fn breakers(&self) -> Result<Vec<StoredBreaker>, StoreError> {
        sqlx::query(
            "SELECT robot_id, state, failure_count, success_count, opened_at, updated_at \
             FROM circuit_breakers ORDER BY robot_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(read_error)?
        .iter()
        .map(|row| {
            let decoded = (|| {
                let state: String = col(row, "state")?;
                let failures: i32 = col(row, "failure_count")?;
                let successes: i32 = col(row, "success_count")?;
                Ok::<_, String>(StoredBreaker {
                    robot_id: RobotId(col(row, "robot_id")?),
                    state: BreakerColumns::decode(
                        &state,
                        i64::from(failures),
                        i64::from(successes),
                        col(row, "opened_at")?,
                    )?,
                    updated_at: col(row, "updated_at")?,
                })
            })();
            decoded.map_err(|e| {
                StoreError::Corrupt(format!(
                    "circuit breaker of robot {}: {e}",
                    row.key("robot_id")
                ))
            })
        })
        .collect()
    }

    async fn save_breaker(&self, breaker: &StoredBreaker) -> Result<(), StoreError> {
        let c = BreakerColumns::of(&breaker.state);
        let count = |n: i64| {
            i32::try_from(n)
                .map_err(|_| StoreError::Invalid(format!("breaker count {n} too large")))
        };
        sqlx::query(
            "INSERT INTO circuit_breakers \
             (robot_id, state, failure_count, success_count, opened_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (robot_id) DO UPDATE SET state = EXCLUDED.state, \
             failure_count = EXCLUDED.failure_count, success_count = EXCLUDED.success_count, \
             opened_at = EXCLUDED.opened_at, updated_at = EXCLUDED.updated_at",
        )
        .bind(breaker.robot_id.0)
        .bind(c.state)
        .bind(count(c.failure_count)?)
        .bind(count(c.success_count)?)
        .bind(c.opened_at)
        .bind(breaker.updated_at)
        .execute(&self.pool)
        .await
        .map_err(write_error)?;
        Ok(())
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

    fn auth(&self) -> Arc<dyn AuthStore> {
        self.auth.clone()
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
        .map(decode::event)
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
        .map(decode::snapshot)
        .transpose()
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

mod follower;
mod notice;
mod rows;
mod writer;
use follower::*;
use notice::*;
use rows::*;
use writer::*;
pub mod auth;
#[cfg(test)]
mod tests;
