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
use super::postgres_auth::PostgresAuthStore;
use super::{
    Append, BreakerColumns, Committed, DiscoveryResult, DiscoverySession, EventStore, Fence,
    History, PruneOutcome, SightingMethod, SightingOutcome, Snapshot, StoreError, StoredBreaker,
    StoredReport,
};
use crate::domain::robot::LastReport;
use crate::domain::{EventMetadata, EventRecord, Head, Health, LifecycleState, Robot, RobotEvent};
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
        let conn = connect_writer(&session, acquire_timeout).await?;
        let writer = Writer {
            options: session,
            connect_timeout: acquire_timeout,
            conn: Some(conn),
            batches: batches.clone(),
            heads: HashMap::new(),
        };
        tokio::spawn(writer.run(queue));
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
                    key(row, "robot_id")
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

/// Owns the writing connection: its own, outside the pool, so a batch
/// costs no pool check-out (and no liveness ping). A connection that failed
/// is dropped, and the next batch connects again.
#[derive(Debug)]
struct Writer {
    options: PgConnectOptions,
    connect_timeout: Duration,
    conn: Option<PgConnection>,
    batches: Arc<AtomicU64>,
    /// The head (version and state) of robots as this writer last wrote or
    /// read them, so that a batch needs no read before its write. Only a
    /// hint: the write itself checks each robot's row against it (the
    /// guard), and a robot whose row moved on is read again. At most
    /// [`HEAD_CACHE`] robots.
    heads: HashMap<RobotId, Head>,
}

type Outcome = Result<Vec<EventRecord>, StoreError>;

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
                shut(queue);
                if let Some(conn) = self.conn.take() {
                    let _ = conn.close().await;
                }
                let _ = done.send(());
                return;
            }
        }
    }

    /// Writes one batch and answers its callers. The feed is the
    /// listener's: it publishes each commit when PostgreSQL delivers its
    /// notifications.
    async fn commit(&mut self, batch: Vec<(Append, Reply)>) {
        let (appends, replies): (Vec<Append>, Vec<Reply>) = batch.into_iter().unzip();
        let outcomes = self.write(&appends).await;
        tracing::debug!(appends = appends.len(), "event store batch written");
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            let _ = reply.send(outcome);
        }
    }

    /// Answers every append of the batch. If the connection fails, the
    /// appends not answered yet fail with [`StoreError::Unavailable`] (a
    /// commit whose answer was lost may have happened), and the next batch
    /// connects again.
    async fn write(&mut self, appends: &[Append]) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = appends.iter().map(|_| None).collect();
        let conn = match self.conn.take() {
            Some(conn) => Ok(conn),
            None => connect_writer(&self.options, self.connect_timeout).await,
        };
        let failure = match conn {
            Ok(mut conn) => match self.attempts(&mut conn, appends, &mut outcomes).await {
                Ok(()) => {
                    self.conn = Some(conn);
                    None
                }
                Err(e) => Some(e),
            },
            Err(e) => Some(e),
        };
        if let Some(e) = &failure {
            tracing::error!(error = %e, appends = appends.len(), "event store write failed");
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(StoreError::Unavailable(match &failure {
                        Some(e) => format!("the commit failed: {e}"),
                        None => "the append was not written".into(),
                    }))
                })
            })
            .collect()
    }

    /// Writes the batch: all of it in one statement (one transaction) when
    /// the heads it knows are right, which is the usual case. Robots whose
    /// row moved on (another controller wrote them) are read and written
    /// again, up to [`WRITE_ATTEMPTS`] times; if PostgreSQL refuses the
    /// statement for one append's data, each append is written by itself
    /// so that only the culprit fails.
    ///
    /// An answer that depends on the robot's head (a conflict, an event
    /// that does not apply) is given only once the head is known to be the
    /// row's: read in this attempt, or confirmed by the guard of a write.
    async fn attempts(
        &mut self,
        conn: &mut PgConnection,
        appends: &[Append],
        outcomes: &mut [Option<Outcome>],
    ) -> Result<(), StoreError> {
        // Robots to read before planning: their head is unknown or wrong.
        let mut stale: HashSet<RobotId> = HashSet::new();
        // The heads read in this call (`None`: no row), for the answer
        // given when attempts run out.
        let mut read: HashMap<RobotId, Option<Head>> = HashMap::new();
        let mut alone = false;
        let mut attempt = 0;
        loop {
            let pending: Vec<usize> = (0..appends.len())
                .filter(|&i| outcomes[i].is_none())
                .collect();
            for &i in &pending {
                // Its answer does not depend on the robot's head.
                if let Err(e) = check_shape(&appends[i]) {
                    outcomes[i] = Some(Err(e));
                }
            }
            let pending: Vec<usize> = pending
                .into_iter()
                .filter(|&i| outcomes[i].is_none())
                .collect();
            if pending.is_empty() {
                break;
            }
            if attempt == WRITE_ATTEMPTS {
                // Another writer kept changing these robots.
                for i in pending {
                    let append = &appends[i];
                    let actual = read
                        .get(&append.robot_id)
                        .copied()
                        .flatten()
                        .map_or(0, |h| h.version);
                    outcomes[i] = Some(Err(StoreError::Conflict {
                        robot_id: append.robot_id,
                        expected: append.expected_version,
                        actual,
                    }));
                }
                break;
            }
            attempt += 1;

            // The base of each robot: read now (certain), or known (a hint).
            let mut base: HashMap<RobotId, Base> = HashMap::new();
            let mut to_read = BTreeSet::new();
            for &i in &pending {
                let append = &appends[i];
                let id = append.robot_id;
                if base.contains_key(&id) {
                    continue;
                }
                let known = if stale.contains(&id) {
                    None
                } else if let Some(head) = self.heads.get(&id) {
                    Some(Base::Known(Some(*head)))
                } else if append.expected_version == 0 {
                    // A new robot: presumably no row yet.
                    Some(Base::Known(None))
                } else {
                    None
                };
                match known {
                    Some(b) => {
                        base.insert(id, b);
                    }
                    None => {
                        to_read.insert(id.0);
                    }
                }
            }
            if !to_read.is_empty() {
                for (id, head) in read_heads(conn, &to_read).await? {
                    stale.remove(&id);
                    if let Ok(Some(h)) = head {
                        self.remember(id, h);
                    } else {
                        self.heads.remove(&id);
                    }
                    read.insert(id, head.as_ref().ok().copied().flatten());
                    base.insert(id, Base::Read(head));
                }
            }

            // Plan in queue order; appends for one robot see each other.
            let mut current: HashMap<RobotId, Result<Option<Head>, String>> =
                base.iter().map(|(id, b)| (*id, b.head())).collect();
            let mut plans: Vec<(usize, Planned)> = Vec::new();
            let mut tentative: Vec<(usize, StoreError)> = Vec::new();
            for &i in &pending {
                let append = &appends[i];
                let id = append.robot_id;
                match plan(current.get(&id), append) {
                    Ok(p) => {
                        current.insert(id, Ok(Some(p.head)));
                        plans.push((i, p));
                    }
                    Err(e) if base.get(&id).is_some_and(Base::certain) => {
                        outcomes[i] = Some(Err(e))
                    }
                    Err(e) => tentative.push((i, e)),
                }
            }

            // Write; note which robots' heads the guard confirmed.
            let mut confirmed: HashSet<RobotId> = HashSet::new();
            let mut refused = false;
            if alone {
                for (i, p) in &mut plans {
                    match write_group(conn, &mut [&mut *p]).await {
                        Ok(applied) => {
                            if !applied.is_empty() {
                                confirmed.insert(p.robot.robot_id);
                                self.batches.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            let e = append_error(conn, &appends[*i], e).await?;
                            outcomes[*i] = Some(Err(e));
                        }
                    }
                }
            } else if !plans.is_empty() {
                let mut group: Vec<&mut Planned> = plans.iter_mut().map(|(_, p)| p).collect();
                match write_group(conn, &mut group).await {
                    Ok(applied) => {
                        if !applied.is_empty() {
                            self.batches.fetch_add(1, Ordering::Relaxed);
                        }
                        confirmed = applied;
                    }
                    Err(e) => match write_error(e) {
                        StoreError::Invalid(reason) => {
                            tracing::debug!(%reason, appends = plans.len(), "a grouped write was refused; writing append by append");
                            refused = true;
                        }
                        other => return Err(other),
                    },
                }
            }
            if refused {
                // Nothing was written: plan again, and write one by one.
                alone = true;
                attempt -= 1;
                continue;
            }

            // Answers for the robots whose heads are now known right; the
            // others are read and tried again.
            for (i, p) in plans {
                let id = p.robot.robot_id;
                if outcomes[i].is_some() {
                    continue;
                }
                if confirmed.contains(&id) {
                    self.remember(id, p.head);
                    outcomes[i] = Some(Ok(p.records));
                } else {
                    stale.insert(id);
                    self.heads.remove(&id);
                }
            }
            for (i, e) in tentative {
                let id = appends[i].robot_id;
                if confirmed.contains(&id) {
                    outcomes[i] = Some(Err(e));
                } else {
                    stale.insert(id);
                    self.heads.remove(&id);
                }
            }
        }
        Ok(())
    }

    fn remember(&mut self, id: RobotId, head: Head) {
        if self.heads.len() >= HEAD_CACHE && !self.heads.contains_key(&id) {
            self.heads.clear();
        }
        self.heads.insert(id, head);
    }
}

/// Where a robot's head came from in one attempt.
#[derive(Debug, Clone)]
enum Base {
    /// Read in this attempt: what the row says (`None`: no row), or why it
    /// does not decode.
    Read(Result<Option<Head>, String>),
    /// Remembered from an earlier write or read, or presumed absent: to be
    /// confirmed by the write's guard.
    Known(Option<Head>),
}

impl Base {
    fn head(&self) -> Result<Option<Head>, String> {
        match self {
            Base::Read(head) => head.clone(),
            Base::Known(head) => Ok(*head),
        }
    }

    fn certain(&self) -> bool {
        matches!(self, Base::Read(_))
    }
}

/// The heads of `ids` (a robot without a row: `None`; one whose state does
/// not decode: why).
async fn read_heads(
    conn: &mut PgConnection,
    ids: &BTreeSet<Uuid>,
) -> Result<Vec<(RobotId, Result<Option<Head>, String>)>, StoreError> {
    let rows: Vec<(Uuid, i64, String)> = sqlx::query_as(
        "SELECT robot_id, version, state FROM robot_states WHERE robot_id = ANY($1)",
    )
    .bind(ids.iter().copied().collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await
    .map_err(read_error)?;
    let mut heads: HashMap<Uuid, Result<Option<Head>, String>> =
        ids.iter().map(|id| (*id, Ok(None))).collect();
    for (id, version, state) in rows {
        let head = LifecycleState::from_str(&state)
            .map(|state| Some(Head { version, state }))
            .map_err(|e| format!("robot_states row {id}: state: {e}"));
        heads.insert(id, head);
    }
    Ok(heads.into_iter().map(|(id, h)| (RobotId(id), h)).collect())
}

async fn connect_writer(
    options: &PgConnectOptions,
    timeout: Duration,
) -> Result<PgConnection, StoreError> {
    tokio::time::timeout(timeout, options.connect())
        .await
        .map_err(|_| {
            StoreError::Unavailable(format!(
                "cannot connect the writer: no answer within {timeout:?}"
            ))
        })?
        .map_err(|e| unavailable("cannot connect the writer", &e))
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

/// An append that passed the checks, ready to write.
#[derive(Debug)]
struct Planned {
    robot: Robot,
    /// The robot's version the append was checked against.
    expected_version: i64,
    /// The robot's head after it.
    head: Head,
    /// Positions are filled in by the write.
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
    /// The commit notification, without its positions (see [`notice_body`]).
    notice: String,
}

/// What an append that PostgreSQL refused is answered: a version already
/// in the log is a conflict; the rest is the caller's data.
async fn append_error(
    conn: &mut PgConnection,
    append: &Append,
    e: sqlx::Error,
) -> Result<StoreError, StoreError> {
    let version_taken = e
        .as_database_error()
        .and_then(|db| db.constraint())
        .is_some_and(|c| c == "events_robot_version");
    let e = write_error(e);
    if !matches!(e, StoreError::Invalid(_)) {
        return Err(e);
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
    .map_err(read_error)?;
    Ok(StoreError::Conflict {
        robot_id: append.robot_id,
        expected: append.expected_version,
        actual,
    })
}

/// Checks one append (whose shape was checked) against the robot's head
/// (`None`: no robot yet) and prepares it.
fn plan(
    current: Option<&Result<Option<Head>, String>>,
    append: &Append,
) -> Result<Planned, StoreError> {
    let stored = match current {
        None => None,
        Some(Ok(head)) => *head,
        Some(Err(e)) => return Err(StoreError::Corrupt(e.clone())),
    };
    let actual = stored.map_or(0, |h| h.version);
    if actual != append.expected_version {
        return Err(StoreError::Conflict {
            robot_id: append.robot_id,
            expected: append.expected_version,
            actual,
        });
    }
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
        notice: notice_body(&robot, &records),
    };
    Ok(Planned {
        head: robot.head(),
        robot,
        expected_version: append.expected_version,
        records,
        report: append.report.clone(),
        json,
    })
}

/// Writes planned appends with one statement, one transaction: per robot,
/// the row (the last of the robot's appends) if the stored row is still at
/// the version the first was checked against (the guard), and only then
/// its reports (the first of each (robot, seq), later ones being resends)
/// and its events, in order, whose positions it fills in. Returns the
/// robots written; the others' rows moved on.
async fn write_group(
    conn: &mut PgConnection,
    plans: &mut [&mut Planned],
) -> Result<HashSet<RobotId>, sqlx::Error> {
    let mut last_of: HashMap<RobotId, usize> = HashMap::new();
    let mut guards: Vec<(Uuid, i64)> = Vec::new();
    for (i, p) in plans.iter().enumerate() {
        let id = p.robot.robot_id;
        if last_of.insert(id, i).is_none() {
            // No row is at version -1: a new robot's guard holds only if
            // no row exists.
            let guard = if p.expected_version == 0 {
                -1
            } else {
                p.expected_version
            };
            guards.push((id.0, guard));
        }
    }
    let mut rows = RowArrays::default();
    let mut reports = ReportArrays::default();
    let mut events = EventArrays::default();
    let mut notices_robot = Vec::with_capacity(plans.len());
    let mut notices_body = Vec::with_capacity(plans.len());
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
            events.append.push(i as i64 + 1);
        }
        notices_robot.push(p.robot.robot_id.0);
        notices_body.push(p.json.notice.as_str());
    }
    let (guard_ids, guard_versions): (Vec<Uuid>, Vec<i64>) = guards.into_iter().unzip();
    let written = sqlx::query(WRITE_GROUP)
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
        .bind(guard_ids)
        .bind(guard_versions)
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
        .bind(events.append)
        .bind(notices_robot)
        .bind(notices_body)
        .fetch_all(&mut *conn)
        .await?;
    let mut applied = HashSet::new();
    for row in &written {
        let ord: i64 = row.try_get("ord")?;
        let positions: Vec<i64> = row.try_get("positions")?;
        let p = usize::try_from(ord - 1)
            .ok()
            .and_then(|i| plans.get_mut(i))
            .ok_or_else(|| sqlx::Error::Protocol(format!("the write answered append {ord}")))?;
        if positions.len() != p.records.len() {
            return Err(sqlx::Error::Protocol(format!(
                "{} positions for {} events of robot {}",
                positions.len(),
                p.records.len(),
                p.robot.robot_id
            )));
        }
        for (record, position) in p.records.iter_mut().zip(positions) {
            record.position = position;
        }
        applied.insert(p.robot.robot_id);
    }
    Ok(applied)
}

/// The statement of [`write_group`]. Run on its own (autocommit), it is one
/// transaction and one round trip: PostgreSQL answers only after the
/// commit is durable.
///
/// 1. `lock`: the log lock (see the module doc), taken before any row is
///    written, as the first thing every insert reads.
/// 2. `robots`: the rows, each written only if the stored row is at the
///    robot's guard version (evaluated on the newest row version, as
///    `ON CONFLICT` does, so a commit just before the lock is seen).
/// 3. `reports` and `written` (the events, inserted in array order, which
///    is the order their identity values are drawn in) only for robots
///    whose row was written.
/// 4. One notification per written append, in append order (`applied` is
///    materialised in that order), whose payload is the append's notice
///    with its first and last positions put in front.
const WRITE_GROUP: &str = concat!(
    "WITH lock AS MATERIALIZED (SELECT pg_advisory_xact_lock(",
    log_lock!(),
    ") AS held),
guards AS (SELECT * FROM UNNEST($26::uuid[], $27::int8[]) AS g (robot_id, version)),
robots AS (
    INSERT INTO robot_states (robot_id, version, state, health, hostname, ip_address,
        robot_type, model, firmware_version, agent_version, deployment_version, hardware_id,
        mac_addresses, last_heartbeat, last_state_change, failure_count, config, capabilities,
        metadata, discovered_at, provisioned_at, activated_at, updated_at, last_report_seq,
        last_report)
    SELECT r.* FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::jsonb[], $5::text[],
        $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
        $13::jsonb[], $14::timestamptz[], $15::timestamptz[], $16::int8[], $17::jsonb[],
        $18::jsonb[], $19::jsonb[], $20::timestamptz[], $21::timestamptz[], $22::timestamptz[],
        $23::timestamptz[], $24::int8[], $25::jsonb[]) AS r CROSS JOIN lock
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
    WHERE robot_states.version
        = (SELECT g.version FROM guards g WHERE g.robot_id = robot_states.robot_id)
    RETURNING robot_id
),
reports AS (
    INSERT INTO robot_reports (robot_id, seq, time, received_at, health, workload,
        maintenance, telemetry)
    SELECT p.* FROM UNNEST($28::uuid[], $29::int8[], $30::timestamptz[], $31::timestamptz[],
        $32::jsonb[], $33::text[], $34::bool[], $35::jsonb[])
        AS p (robot_id, seq, time, received_at, health, workload, maintenance, telemetry)
    WHERE p.robot_id IN (SELECT robot_id FROM robots)
    ON CONFLICT (robot_id, seq) DO NOTHING
),
input AS (
    SELECT * FROM UNNEST($36::uuid[], $37::uuid[], $38::int8[], $39::text[], $40::jsonb[],
        $41::jsonb[], $42::timestamptz[], $43::int8[]) WITH ORDINALITY
        AS e (event_id, robot_id, version, event_type, data, metadata, recorded_at, append, ord)
),
written AS (
    INSERT INTO events (event_id, robot_id, version, event_type, data, metadata, recorded_at)
    SELECT e.event_id, e.robot_id, e.version, e.event_type, e.data, e.metadata, e.recorded_at
    FROM input e
    WHERE e.robot_id IN (SELECT robot_id FROM robots)
    ORDER BY e.ord
    RETURNING event_id, position
),
applied AS MATERIALIZED (
    SELECT n.ord, n.body,
        COALESCE(array_agg(w.position ORDER BY e.ord) FILTER (WHERE w.position IS NOT NULL),
            '{}') AS positions
    FROM UNNEST($44::uuid[], $45::text[]) WITH ORDINALITY AS n (robot_id, body, ord)
    LEFT JOIN input e ON e.append = n.ord
    LEFT JOIN written w ON w.event_id = e.event_id
    WHERE n.robot_id IN (SELECT robot_id FROM robots)
    GROUP BY n.ord, n.body
    ORDER BY n.ord
)
SELECT a.ord, a.positions, pg_notify('",
    channel!(),
    "', concat('{\"first\":', COALESCE(a.positions[1]::text, 'null'),
    ',\"last\":', COALESCE(a.positions[cardinality(a.positions)]::text, 'null'),
    ',', a.body))::text AS notified
FROM applied a"
);

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
        self.workload.push(r.workload.as_str().to_string());
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
    /// The (1-based) index of the event's append in the statement.
    append: Vec<i64>,
}

// ---------------------------------------------------------------------------
// Notifications and the listener task.

/// The payload of one commit notification: one append. `events` and
/// `robot` are there when the whole commit fits in a notification; else
/// the listener reads them (a reference: positions `first..=last`). The
/// writer sends the rest without the positions, which the write statement
/// puts in front (see [`notice_body`]): a full notice's events carry
/// position 0, and are numbered `first..=last` by [`Notice::positioned`].
#[derive(Debug, Deserialize)]
struct Notice {
    /// The positions of the append's events (none: a report only).
    first: Option<i64>,
    last: Option<i64>,
    robot_id: RobotId,
    #[serde(default)]
    events: Option<Vec<EventRecord>>,
    #[serde(default)]
    robot: Option<Robot>,
}

impl Notice {
    /// The whole commit, its events numbered, if the notice carries it and
    /// its positions account for every event.
    fn positioned(&mut self) -> Option<(Vec<EventRecord>, Robot)> {
        let (mut events, robot) = (self.events.take()?, self.robot.take()?);
        match (self.first, self.last) {
            (None, None) if events.is_empty() => {}
            (Some(first), Some(last))
                if usize::try_from(last - first + 1).is_ok_and(|n| n == events.len()) =>
            {
                for (event, position) in events.iter_mut().zip(first..) {
                    event.position = position;
                }
            }
            _ => return None,
        }
        Some((events, robot))
    }
}

/// What the writer notifies of an append, without the opening brace and
/// the positions (`{"first":..,"last":..,` is put in front by the write
/// statement): `"robot_id":..,"events":[..],"robot":{..}}` when the
/// notification will fit, else the reference `"robot_id":..}`.
#[derive(Debug, Serialize)]
struct NoticeBody<'a> {
    robot_id: RobotId,
    version: i64,
    report_seq: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    events: Option<&'a [EventRecord]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    robot: Option<&'a Robot>,
}

/// Room for `{"first":<i64>,"last":<i64>,` in front of a notice's body.
const POSITIONS_ROOM: usize = 64;

/// The body of an append's notification: the whole commit if it fits,
/// else a reference.
fn notice_body(robot: &Robot, records: &[EventRecord]) -> String {
    let mut body = NoticeBody {
        robot_id: robot.robot_id,
        version: robot.version,
        report_seq: robot.last_report_seq,
        events: Some(records),
        robot: Some(robot),
    };
    let text = match serde_json::to_string(&body) {
        Ok(full) if full.len() + POSITIONS_ROOM <= NOTIFY_PAYLOAD_MAX => full,
        _ => {
            body.events = None;
            body.robot = None;
            // Ids and numbers only: serialising cannot fail.
            serde_json::to_string(&body).unwrap_or_default()
        }
    };
    text.strip_prefix('{').unwrap_or(&text).to_string()
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
        // Failed reconnections in a row.
        let mut attempt = 0u32;
        loop {
            let Some(active) = listener.as_mut() else {
                let resumed = tokio::select! {
                    () = stop.cancelled() => return,
                    resumed = self.resume() => resumed,
                };
                match resumed {
                    Ok(l) => {
                        tracing::info!(
                            position = self.last_seen,
                            "commit listener reconnected and caught up"
                        );
                        listener = Some(l);
                        attempt = 0;
                    }
                    Err(e) => {
                        let wait = RECONNECT.delay(attempt, rand::random());
                        attempt = attempt.saturating_add(1);
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
                    self.handle(batch).await.err()
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
            let mut notice: Notice = serde_json::from_str(n.payload()).map_err(|e| {
                StoreError::Corrupt(format!("commit notification {:?}: {e}", n.payload()))
            })?;
            match notice.positioned() {
                Some((events, robot)) => self.publish(events, Arc::new(robot)),
                None => {
                    self.resolve(notice.robot_id, notice.first, notice.last)
                        .await?
                }
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
                None => {
                    tracing::error!(robot_id = %id, "a robot with events has no row; not published")
                }
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

// ---------------------------------------------------------------------------
// Encoding and decoding.

fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(value)
        .map_err(|e| StoreError::Invalid(format!("cannot encode as JSON: {e}")))
}

fn decode_robot(row: &PgRow) -> Result<Robot, StoreError> {
    robot_fields(row)
        .map_err(|e| StoreError::Corrupt(format!("robot_states row {}: {e}", key(row, "robot_id"))))
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
        workload: crate::domain::Workload::parse(&col::<String>(row, "workload")?)?,
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

pub(super) fn col<'r, T>(row: &'r PgRow, name: &str) -> Result<T, String>
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
pub(super) fn read_error(e: sqlx::Error) -> StoreError {
    if is_corruption(&e) || matches!(e, sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_)) {
        StoreError::Corrupt(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

/// A write that failed: a constraint or a value PostgreSQL refuses (class
/// 23 integrity violation, class 22 data exception) or that cannot be
/// encoded is the caller's; the rest is the database's.
pub(super) fn write_error(e: sqlx::Error) -> StoreError {
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

#[cfg(test)]
mod tests {
    //! Against a real PostgreSQL: each test creates its own database
    //! (`kiwi_test_<uuid>`) from the maintenance connection (`DATABASE_URL`,
    //! else the local server) and drops it at the end, also on panic.

    use super::*;
    use crate::domain::NewEvent;
    use crate::domain::event::IdentityFacts;
    use crate::domain::lifecycle::Transition;
    use crate::replay::{Rebuild, apply_report, compare, project};
    use crate::testing::TestDatabase;
    use kiwi_protocol::message::HealthStatus;
    use serde_json::json;
    use sqlx::AssertSqlSafe;
    use std::collections::BTreeSet;
    use std::time::Instant;
    use tokio::sync::broadcast::error::TryRecvError;

    /// A store on a database of this test's own.
    async fn store_on(db: &TestDatabase) -> PostgresStore {
        PostgresStore::connect(db.url(), 8)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", db.url()))
    }

    fn now() -> DateTime<Utc> {
        crate::fleet::truncate_micros(Utc::now())
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
            robot_type: if n.is_multiple_of(10) {
                "xlerobot"
            } else {
                "lekiwi"
            }
            .into(),
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

    /// Ready → maintenance, maintenance → ready: a transition from
    /// whichever of the two the robot is in.
    fn toggle_maintenance(state: LifecycleState) -> RobotEvent {
        match state {
            LifecycleState::Ready => RobotEvent::RobotMaintenanceStart {
                transition: transition(LifecycleState::Ready, LifecycleState::Maintenance),
                reason: Some("race".into()),
            },
            _ => RobotEvent::RobotMaintenanceEnd {
                transition: transition(LifecycleState::Maintenance, LifecycleState::Ready),
            },
        }
    }

    /// An append built the way the fleet builds one: the events applied,
    /// at `at`, to the row it last read.
    fn append_at(
        current: Option<&Robot>,
        id: RobotId,
        events: Vec<RobotEvent>,
        at: DateTime<Utc>,
    ) -> Append {
        let base = current.map_or(0, |r| r.version);
        let events: Vec<NewEvent> = events
            .into_iter()
            .map(|event| NewEvent {
                event_id: Uuid::new_v4(),
                recorded_at: at,
                event,
                metadata: EventMetadata {
                    correlation_id: Some(Uuid::new_v4()),
                    causation_id: None,
                    actor: "test".into(),
                },
            })
            .collect();
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

    fn append(current: Option<&Robot>, id: RobotId, events: Vec<RobotEvent>) -> Append {
        append_at(current, id, events, now())
    }

    fn report_at(
        id: RobotId,
        seq: i64,
        telemetry: serde_json::Value,
        received_at: DateTime<Utc>,
    ) -> StoredReport {
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

    fn report(id: RobotId, seq: i64, telemetry: serde_json::Value) -> StoredReport {
        report_at(id, seq, telemetry, now())
    }

    /// Adds a report and the row fields it changes, as the fleet does.
    fn with_report(mut append: Append, report: StoredReport) -> Append {
        apply_report(&mut append.robot, &report);
        append.report = Some(report);
        append
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

    /// Commits from the feed until `events` events have come.
    async fn commits_until(
        feed: &mut broadcast::Receiver<Arc<Committed>>,
        events: usize,
    ) -> Vec<Arc<Committed>> {
        let mut commits = Vec::new();
        let mut seen = 0;
        while seen < events {
            let commit = next_commit(feed).await;
            seen += commit.events.len();
            commits.push(commit);
        }
        commits
    }

    async fn all_events(store: &PostgresStore) -> Vec<EventRecord> {
        store.events_after(0, 1_000_000).await.expect("the log")
    }

    /// Every robot's row rebuilt from its own history.
    async fn assert_rows_are_their_history(store: &PostgresStore) {
        for robot in store.robots().await.expect("rows") {
            let history = store.history(robot.robot_id, None).await.expect("history");
            assert_eq!(
                project(&history).expect("the history replays"),
                Some(robot.clone()),
                "robot {}",
                robot.robot_id
            );
        }
    }

    // -----------------------------------------------------------------------
    // 1. Migrations.

    /// What the schema is, as the catalog says.
    async fn catalog(pool: &PgPool) -> Vec<String> {
        let mut lines: Vec<String> = sqlx::query_scalar(
            "SELECT 'table ' || tablename FROM pg_tables WHERE schemaname = 'public' \
             UNION ALL SELECT 'index ' || indexname || ': ' || indexdef FROM pg_indexes \
             WHERE schemaname = 'public' \
             UNION ALL SELECT 'constraint ' || conrelid::regclass::text || '.' || conname || ': ' \
             || pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE connamespace = 'public'::regnamespace \
             UNION ALL SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type \
             || ' ' || is_nullable || ' ' || COALESCE(column_default, '') \
             FROM information_schema.columns WHERE table_schema = 'public' \
             UNION ALL SELECT 'migration ' || version || ' ' || description || ' ' \
             || encode(checksum, 'hex') FROM _sqlx_migrations",
        )
        .fetch_all(pool)
        .await
        .expect("the catalog");
        lines.sort();
        lines
    }

    /// sqlx's migrator lock key for a database (CRC-32 of its name times
    /// a constant), to show that migrations wait for it.
    fn migrator_lock_id(database: &str) -> i64 {
        let mut crc = 0xffff_ffff_u32;
        for byte in database.bytes() {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        0x3d32_ad9e * i64::from(!crc)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migrations_apply_once_to_an_empty_database_and_again_change_nothing() {
        let db = TestDatabase::create().await;
        // Two controllers starting at once on an empty database.
        let (a, b) = tokio::join!(
            PostgresStore::connect(db.url(), 2),
            PostgresStore::connect(db.url(), 2)
        );
        let (a, b) = (a.expect("first controller"), b.expect("second controller"));
        let before = catalog(&a.pool).await;
        for table in [
            "events",
            "robot_states",
            "robot_reports",
            "robot_snapshots",
            "fences",
            "circuit_breakers",
            "discovery_sessions",
            "discovery_results",
        ] {
            assert!(
                before.contains(&format!("table {table}")),
                "missing table {table}: {before:#?}"
            );
        }
        for index in [
            "robot_states_state",
            "robot_states_robot_type",
            "robot_states_ip_address",
            "events_recorded_at",
            "events_robot_version",
            "robot_reports_received_at",
        ] {
            assert!(
                before
                    .iter()
                    .any(|l| l.starts_with(&format!("index {index}:"))),
                "missing index {index}"
            );
        }

        a.migrate().await.expect("a second run");
        b.migrate().await.expect("a third run");
        assert_eq!(catalog(&a.pool).await, before);

        // The migrator waits for its lock: held elsewhere, a run cannot
        // finish until it is released.
        let mut holder = PgConnection::connect(db.url()).await.expect("a connection");
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(migrator_lock_id(db.name()))
            .execute(&mut holder)
            .await
            .expect("take the migrator's lock");
        let waiting = tokio::spawn(async move {
            let result = a.migrate().await;
            (a, result)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "migrate ran without the lock");
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(migrator_lock_id(db.name()))
            .execute(&mut holder)
            .await
            .expect("release the lock");
        let (a, result) = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("migrate ends once the lock is free")
            .expect("the task ran");
        result.expect("the migration run");
        assert_eq!(catalog(&a.pool).await, before);
        a.close().await;
        b.close().await;
    }

    // -----------------------------------------------------------------------
    // 2. Round trips, conflicts, refusals, corruption.

    #[tokio::test]
    async fn a_new_robot_is_stored_and_read_back_equal() {
        let db = TestDatabase::create().await;
        let store = store_on(&db).await;
        assert_eq!(store.head().await.unwrap(), 0);
        let id = robot_id(1);
        let mut first = append(None, id, vec![discovered(1), provisioning_started()]);
        first.robot.config = json!({"wheel_base_mm": 120.5, "motors": [1, 2, 3], "gain": 0.1,
            "big": 18446744073709551615u64, "tiny": 1e-300, "neg": -7, "text": "ünïcode"});
        first.robot.capabilities = vec!["camera".into(), "base".into()];
        first.robot.metadata = json!({"site": "lab", "shelf": 4});
        let first = with_report(first, report(id, 1, json!({"cpu_temp_c": 81.25})));
        let written = first.robot.clone();
        let written_report = first.report.clone().expect("a report");

        let records = store.append(first).await.unwrap();

        assert_eq!(versions(&records), [1, 2]);
        assert!(strictly_increasing(&positions(&records)));
        let stored = store.robot(id).await.unwrap().expect("a stored row");
        assert_eq!(stored, written);
        assert_eq!(store.robots().await.unwrap(), vec![stored.clone()]);
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
        assert_eq!(
            store.reports(id, 0, 10).await.unwrap(),
            vec![written_report.clone()]
        );
        assert_eq!(
            store.latest_reports().await.unwrap(),
            vec![written_report.clone()]
        );
        let history = store.history(id, None).await.unwrap();
        assert_eq!(history.events, records);
        assert_eq!(history.last_report, Some(written_report));
        // Replay gives the row but for what the caller set beside the
        // events (config, capabilities, metadata).
        assert_eq!(
            project(&history).unwrap(),
            Some(Robot {
                config: json!({}),
                capabilities: Vec::new(),
                metadata: json!({}),
                ..stored
            })
        );
        // Before the robot existed, it has no history.
        let before = records[0].recorded_at - chrono::Duration::seconds(1);
        assert_eq!(
            store.history(id, Some(before)).await.unwrap(),
            History::default()
        );
        store.close().await;
    }

    #[tokio::test]
    async fn reports_are_deduplicated_by_robot_and_seq_and_paged() {
        let db = TestDatabase::create().await;
        let store = store_on(&db).await;
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
        assert_eq!(current.last_report_seq, 5);
        assert_eq!(current.version, 1);
        assert_eq!(seqs(store.latest_reports().await.unwrap()), [5]);
        store.close().await;
    }

    #[tokio::test]
    async fn of_two_appends_at_one_version_exactly_one_wins() {
        let db = TestDatabase::create().await;
        let store = store_on(&db).await;
        let id = robot_id(7);
        store
            .append(append(None, id, vec![discovered(7)]))
            .await
            .unwrap();
        let current = store.robot(id).await.unwrap().expect("a row");
        let provision = append(Some(&current), id, vec![provisioning_started()]);
        let fail = append(Some(&current), id, vec![failed_from_discovered()]);
        let before = store.batches_committed();

        let (a, b) = tokio::join!(store.append(provision), store.append(fail));

        let (winner, loser) = match (a, b) {
            (Ok(won), Err(lost)) => (won, lost),
            (Err(lost), Ok(won)) => (won, lost),
            other => panic!("expected exactly one success, got {other:?}"),
        };
        // Both were queued before the writer ran: one transaction.
        assert_eq!(store.batches_committed(), before + 1);
        assert_eq!(versions(&winner), [2]);
        assert!(
            matches!(
                loser,
                StoreError::Conflict { robot_id, expected: 1, actual: 2 } if robot_id == id
            ),
            "{loser:?}"
        );
        let events = store.robot_events(id, 0, 10).await.unwrap();
        assert_eq!(versions(&events), [1, 2]);
        assert_eq!(events[1], winner[0]);
        let stored = store.robot(id).await.unwrap().expect("a row");
        assert_eq!(Robot::replay(&events).unwrap(), Some(stored.clone()));

        // A writer that skipped the log lock took version 3 behind the
        // row's back: the unique (robot_id, version) constraint still
        // turns the next append at version 2 into a conflict.
        sqlx::query(
            "INSERT INTO events (event_id, robot_id, version, event_type, data, metadata, \
             recorded_at) VALUES ($1, $2, 3, 'robot_health_changed', '{}', '{}', now())",
        )
        .bind(Uuid::new_v4())
        .bind(id.0)
        .execute(&store.pool)
        .await
        .expect("a rogue event");
        let late = store
            .append(append(Some(&stored), id, vec![provisioned()]))
            .await;
        assert!(
            matches!(
                late,
                Err(StoreError::Conflict {
                    expected: 2,
                    actual: 3,
                    ..
                })
            ),
            "{late:?}"
        );
        assert_eq!(store.robot(id).await.unwrap(), Some(stored));
        store.close().await;
    }

    /// Each writer remembers the heads it wrote; a robot written by another
    /// controller since is caught by the write's guard, read again, and
    /// answered from what the row says.
    #[tokio::test]
    async fn a_head_changed_by_another_controller_is_read_again() {
        let db = TestDatabase::create().await;
        let (one, two) = (store_on(&db).await, store_on(&db).await);
        let id = robot_id(8);
        one.append(append(None, id, vec![discovered(8)]))
            .await
            .unwrap();
        let at_1 = one.robot(id).await.unwrap().expect("a row");
        // `two` has never seen the robot: it reads it before checking.
        let step = two
            .append(append(Some(&at_1), id, vec![provisioning_started()]))
            .await
            .expect("appended through the second controller");
        assert_eq!(versions(&step), [2]);
        let at_2 = two.robot(id).await.unwrap().expect("a row");

        // `one` still remembers version 1: an append made from that row
        // is a conflict, found by the guard and confirmed by a read.
        let stale = one
            .append(append(Some(&at_1), id, vec![failed_from_discovered()]))
            .await;
        assert!(
            matches!(
                stale,
                Err(StoreError::Conflict {
                    expected: 1,
                    actual: 2,
                    ..
                })
            ),
            "{stale:?}"
        );
        // And one made from the current row is written, although `one`
        // had remembered an older head.
        let before = one.batches_committed();
        let next = one
            .append(append(Some(&at_2), id, vec![provisioned()]))
            .await
            .expect("appended from the current row");
        assert_eq!(versions(&next), [3]);
        assert_eq!(one.batches_committed(), before + 1);

        // A robot created by the other controller meanwhile: a first
        // append for it is a conflict, not a second robot_discovered.
        let other = robot_id(9);
        two.append(append(None, other, vec![discovered(9)]))
            .await
            .unwrap();
        let twice = one.append(append(None, other, vec![discovered(9)])).await;
        assert!(
            matches!(
                twice,
                Err(StoreError::Conflict {
                    expected: 0,
                    actual: 1,
                    ..
                })
            ),
            "{twice:?}"
        );

        let events = all_events(&one).await;
        assert_eq!(
            events
                .iter()
                .map(|e| (e.robot_id, e.version))
                .collect::<Vec<_>>(),
            [(id, 1), (id, 2), (id, 3), (other, 1)]
        );
        assert_rows_are_their_history(&one).await;
        one.close().await;
        two.close().await;
    }

    #[tokio::test]
    async fn refused_appends_change_nothing_and_do_not_fail_their_batch() {
        let db = TestDatabase::create().await;
        let store = store_on(&db).await;
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

        // Values PostgreSQL itself refuses, in one batch with good appends:
        // the grouped write fails, and the batch is written append by
        // append (a transaction each) so that only the culprits are refused.
        let first = append(None, id, vec![discovered(3)]);
        let reused_id = first.events[0].event_id;
        let mut nul = append(None, robot_id(5), vec![discovered(5)]);
        nul.robot.hostname = "bad\0name".into();
        let mut reused = append(None, robot_id(6), vec![discovered(6)]);
        reused.events[0].event_id = reused_id;
        let good = append(None, robot_id(7), vec![discovered(7)]);
        let before = store.batches_committed();
        let (first, nul, reused, good) = tokio::join!(
            store.append(first),
            store.append(nul),
            store.append(reused),
            store.append(good)
        );
        assert_eq!(
            store.batches_committed(),
            before + 2,
            "one transaction per good append"
        );
        let first = first.expect("the first append");
        let good = good.expect("the good append");
        assert!(matches!(nul, Err(StoreError::Invalid(_))), "{nul:?}");
        assert!(matches!(reused, Err(StoreError::Invalid(_))), "{reused:?}");
        assert!(first[0].position < good[0].position);
        assert_eq!(
            all_events(&store).await,
            [first.clone(), good.clone()].concat()
        );
        let ids: Vec<RobotId> = store
            .robots()
            .await
            .unwrap()
            .iter()
            .map(|r| r.robot_id)
            .collect();
        assert_eq!(ids, [id, robot_id(7)]);
        store.close().await;
    }

    #[tokio::test]
    async fn circuit_breakers_are_kept_and_a_corrupt_one_is_reported() {
        let db = TestDatabase::create().await;
        let store = store_on(&db).await;
        crate::store::conformance::breakers_round_trip(&store).await;
        sqlx::query("UPDATE circuit_breakers SET opened_at = NULL WHERE state = 'open'")
            .execute(&store.pool)
            .await
            .unwrap();
        let err = store.breakers().await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains("no opened_at")),
            "{err:?}"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn corrupt_rows_are_reported_not_skipped() {
        let db = TestDatabase::create().await;
        let store = store_on(&db).await;
        let (a, b) = (robot_id(1), robot_id(2));
        store
            .append(append(None, a, vec![discovered(1)]))
            .await
            .unwrap();
        let event_b = store
            .append(append(None, b, vec![discovered(2)]))
            .await
            .unwrap();
        sqlx::query("UPDATE robot_states SET health = '{\"status\": 5}' WHERE robot_id = $1")
            .bind(a.0)
            .execute(&store.pool)
            .await
            .expect("corrupt a row");

        let err = store.robot(a).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains(&a.to_string()) && m.contains("health")),
            "{err:?}"
        );
        assert!(matches!(store.robots().await, Err(StoreError::Corrupt(_))));
        let current = store.robot(b).await.unwrap().expect("a row");
        // Appends are checked against the row's version and state only, and
        // write the whole row: the next append to the robot repairs it.
        let mut before = current.clone();
        before.robot_id = a;
        let repair = append(Some(&before), a, vec![provisioning_started()]);
        let repaired = repair.robot.clone();
        store
            .append(repair)
            .await
            .expect("the append is checked by version and state");
        assert_eq!(store.robot(a).await.unwrap(), Some(repaired));
        store
            .append(append(Some(&current), b, vec![provisioning_started()]))
            .await
            .expect("other robots are unaffected");

        sqlx::query("UPDATE events SET data = '[1, 2]' WHERE position = $1")
            .bind(event_b[0].position)
            .execute(&store.pool)
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
        store.close().await;
    }

    // -----------------------------------------------------------------------
    // 3. Concurrent writers.

    /// One robot's lifecycle, appended step by step as the fleet would.
    async fn walk_lifecycle(store: &PostgresStore, n: u32) -> Result<(), StoreError> {
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

    /// Appends `wins` maintenance toggles to a ready robot, reloading and
    /// deciding again after every conflict. Returns the conflicts seen.
    async fn race(store: &PostgresStore, id: RobotId, wins: u32) -> Result<u32, StoreError> {
        let mut conflicts = 0;
        let mut won = 0;
        while won < wins {
            let current = store.robot(id).await?.expect("the racing robot");
            let next = append(Some(&current), id, vec![toggle_maintenance(current.state)]);
            match store.append(next).await {
                Ok(_) => won += 1,
                Err(StoreError::Conflict { .. }) => conflicts += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(conflicts)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_lose_and_duplicate_nothing() {
        let db = TestDatabase::create().await;
        let store = Arc::new(store_on(&db).await);
        let mut feed = store.subscribe();
        let racer = robot_id(1000);
        let mut current = None;
        for events in [
            vec![discovered(1000)],
            vec![provisioning_started()],
            vec![provisioned()],
        ] {
            store
                .append(append(current.as_ref(), racer, events))
                .await
                .unwrap();
            current = store.robot(racer).await.unwrap();
        }
        let before = store.batches_committed();

        let walkers: Vec<_> = (0..50)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move { walk_lifecycle(&store, n).await })
            })
            .collect();
        let racers: Vec<_> = (0..10)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { race(&store, racer, 5).await })
            })
            .collect();
        for task in walkers {
            task.await
                .expect("the task ran")
                .expect("every append succeeds");
        }
        let mut conflicts = 0;
        for task in racers {
            conflicts += task.await.expect("the task ran").expect("the racer wins");
        }

        let log = all_events(&store).await;
        assert_eq!(log.len(), 3 + 50 * 4 + 50);
        assert!(strictly_increasing(&positions(&log)));
        let ids: HashSet<Uuid> = log.iter().map(|e| e.event_id).collect();
        assert_eq!(ids.len(), log.len(), "an event was stored twice");
        let mut by_robot: HashMap<RobotId, Vec<i64>> = HashMap::new();
        for e in &log {
            by_robot.entry(e.robot_id).or_default().push(e.version);
        }
        for (id, versions) in &by_robot {
            let expected: Vec<i64> = (1..=versions.len() as i64).collect();
            assert_eq!(versions, &expected, "robot {id}");
        }
        for n in 0..50 {
            assert_eq!(by_robot[&robot_id(n)], [1, 2, 3, 4]);
        }
        let raced = store.robot(racer).await.unwrap().expect("the racer");
        assert_eq!(raced.version, 3 + 50, "one version per successful append");
        assert_rows_are_their_history(&store).await;
        let appends = 3 + 50 * 4 + 50 + conflicts;
        let batches = store.batches_committed() - before + 3;
        assert!(
            batches < u64::from(appends),
            "{batches} transactions for {appends} appends"
        );

        // The feed: every event once, in position order, each with its row.
        let commits = commits_until(&mut feed, log.len()).await;
        let fed: Vec<EventRecord> = commits.iter().flat_map(|c| c.events.clone()).collect();
        assert_eq!(fed, log);
        for commit in &commits {
            if let Some(last) = commit.events.last() {
                assert_eq!(commit.robot.version, last.version);
            }
        }
        store.close().await;
    }

    // -----------------------------------------------------------------------
    // 4. Two controllers on one database.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_controller_sees_every_commit_in_order_with_its_row() {
        let db = TestDatabase::create().await;
        let first = Arc::new(store_on(&db).await);
        let second = Arc::new(store_on(&db).await);
        let mut feed_first = first.subscribe();
        let mut feed_second = second.subscribe();

        // Robots appended through both controllers at once.
        let tasks: Vec<_> = (0..20_u32)
            .map(|n| {
                let store = if n.is_multiple_of(4) {
                    second.clone()
                } else {
                    first.clone()
                };
                tokio::spawn(async move { walk_lifecycle(&store, n).await })
            })
            .collect();
        for task in tasks {
            task.await
                .expect("the task ran")
                .expect("every append succeeds");
        }
        // A report only (no event), and a commit too big for a
        // notification (published by reference).
        let id = robot_id(3);
        let row = first.robot(id).await.unwrap().expect("a row");
        first
            .append(with_report(
                append(Some(&row), id, vec![]),
                report(id, 2, json!({"battery_v": 11.9})),
            ))
            .await
            .unwrap();
        let big_id = robot_id(500);
        let mut big = append(None, big_id, vec![discovered(500)]);
        big.robot.config = json!({ "blob": "x".repeat(12_000) });
        first.append(big).await.unwrap();

        let log = all_events(&first).await;
        assert_eq!(log.len(), 20 * 4 + 1);
        for feed in [&mut feed_second, &mut feed_first] {
            let mut commits = commits_until(feed, log.len()).await;
            // The report-only commit comes before the big one.
            let fed: Vec<EventRecord> = commits.iter().flat_map(|c| c.events.clone()).collect();
            assert_eq!(fed, log, "every event once, in position order");
            let report_only = commits
                .iter()
                .find(|c| c.events.is_empty())
                .expect("the report-only commit");
            assert_eq!(report_only.robot.robot_id, id);
            assert_eq!(report_only.robot.last_report_seq, 2);
            for commit in &commits {
                if let Some(last) = commit.events.last() {
                    assert_eq!(commit.robot.robot_id, last.robot_id);
                    assert_eq!(commit.robot.version, last.version);
                }
            }
            let last = commits.pop().expect("commits");
            assert_eq!(
                Some((*last.robot).clone()),
                second.robot(big_id).await.unwrap()
            );
            assert!(matches!(feed.try_recv(), Err(TryRecvError::Empty)));
        }
        first.close().await;
        second.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_feed_catches_up_after_its_connection_is_lost() {
        let db = TestDatabase::create().await;
        let writer = store_on(&db).await;
        let reader = store_on(&db).await;
        let mut feed = reader.subscribe();
        writer
            .append(append(None, robot_id(1), vec![discovered(1)]))
            .await
            .unwrap();
        assert_eq!(next_commit(&mut feed).await.events.len(), 1);

        // Every connection to the database is cut (a failover, a restart):
        // commits made meanwhile reach the reader's feed after it
        // reconnects, in order, without gaps.
        let mut admin = crate::testing::pg_connect(db.server_url())
            .await
            .expect("maintenance connection");
        let cut = async |admin: &mut PgConnection| {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(db.name())
            .execute(admin)
            .await
            .expect("terminate the connections");
        };
        cut(&mut admin).await;
        let mut appended = Vec::new();
        for n in 2..=6 {
            let result = loop {
                // The pool may hand out a connection that just died: the
                // store answers Unavailable, and a retry reconnects.
                match writer
                    .append(append(None, robot_id(n), vec![discovered(n)]))
                    .await
                {
                    Err(StoreError::Unavailable(_)) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => break other,
                }
            };
            appended.extend(result.expect("the append"));
            if n == 3 {
                cut(&mut admin).await;
            }
        }
        let row = writer.robot(robot_id(1)).await.unwrap().expect("a row");
        writer
            .append(with_report(
                append(Some(&row), robot_id(1), vec![]),
                report(robot_id(1), 1, json!({})),
            ))
            .await
            .unwrap();

        let commits = commits_until(&mut feed, appended.len()).await;
        let fed: Vec<EventRecord> = commits.iter().flat_map(|c| c.events.clone()).collect();
        assert_eq!(fed, appended);
        // The report-only commit arrives too (now or with the catch-up).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let commit = tokio::time::timeout_at(deadline.into(), feed.recv())
                .await
                .expect("the report-only commit")
                .expect("the feed");
            if commit.robot.robot_id == robot_id(1) && commit.robot.last_report_seq == 1 {
                assert!(commit.events.is_empty());
                break;
            }
        }
        let _ = admin.close().await;
        writer.close().await;
        reader.close().await;
    }

    // -----------------------------------------------------------------------
    // 5. Fencing.

    fn session() -> DiscoverySession {
        let started_at = now();
        DiscoverySession {
            session_id: Uuid::new_v4(),
            methods: vec!["agent".into(), "arp".into()],
            started_at,
            finished_at: started_at + chrono::Duration::milliseconds(1250),
            duration_ms: 1250,
            robots_found: 3,
            new_robots: 1,
            results: vec![
                DiscoveryResult {
                    ip_address: "10.88.0.2".into(),
                    robot_id: Some(robot_id(2)),
                    method: crate::store::SightingMethod::Ssh,
                    found_at: started_at,
                    mac_address: Some("02:88:00:00:00:02".into()),
                    robot_type: Some("xlerobot".into()),
                    outcome: crate::store::SightingOutcome::Identified,
                    detail: None,
                },
                DiscoveryResult {
                    ip_address: "10.88.0.3".into(),
                    robot_id: None,
                    method: crate::store::SightingMethod::Ssh,
                    found_at: started_at,
                    mac_address: None,
                    robot_type: None,
                    outcome: crate::store::SightingOutcome::HostKeyChanged,
                    detail: Some("host key changed".into()),
                },
            ],
        }
    }

    fn fence(token: u64) -> Fence {
        Fence {
            resource: "sweep:192.168.0.0/24".into(),
            token,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_fencing_token_is_refused() {
        let db = TestDatabase::create().await;
        let store = Arc::new(store_on(&db).await);
        let sessions = async || -> i64 {
            sqlx::query_scalar("SELECT COUNT(*) FROM discovery_sessions")
                .fetch_one(&store.pool)
                .await
                .expect("count")
        };

        let first = session();
        store
            .record_discovery(&first, Some(&fence(5)))
            .await
            .unwrap();
        assert_eq!(
            store.discovery(first.session_id).await.unwrap(),
            Some(first.clone()),
            "read back with its results, in order"
        );
        assert_eq!(store.discovery(Uuid::new_v4()).await.unwrap(), None);
        let stale = store.record_discovery(&session(), Some(&fence(4))).await;
        assert!(
            matches!(
                &stale,
                Err(StoreError::Fenced { token: 4, current: 5, resource }) if resource == "sweep:192.168.0.0/24"
            ),
            "{stale:?}"
        );
        assert_eq!(sessions().await, 1, "the stale write left nothing");
        store
            .record_discovery(&session(), Some(&fence(6)))
            .await
            .unwrap();
        store
            .record_discovery(&session(), Some(&fence(6)))
            .await
            .unwrap();
        store.record_discovery(&session(), None).await.unwrap();
        let other = Fence {
            resource: "sweep:10.0.0.0/24".into(),
            token: 1,
        };
        store
            .record_discovery(&session(), Some(&other))
            .await
            .unwrap();
        assert_eq!(sessions().await, 5);

        // Two holders racing: the higher token always ends up recorded,
        // and the lower one is refused if it comes second.
        let (s7, s8) = (store.clone(), store.clone());
        let (r7, r8) = tokio::join!(
            tokio::spawn(async move { s7.record_discovery(&session(), Some(&fence(7))).await }),
            tokio::spawn(async move { s8.record_discovery(&session(), Some(&fence(8))).await })
        );
        r8.unwrap().expect("token 8");
        assert!(matches!(
            r7.unwrap(),
            Ok(()) | Err(StoreError::Fenced { .. })
        ));
        let token: i64 = sqlx::query_scalar("SELECT token FROM fences WHERE resource = $1")
            .bind("sweep:192.168.0.0/24")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(token, 8);

        // A session is recorded once per id, as last written.
        let mut again = session();
        store.record_discovery(&again, None).await.unwrap();
        again.robots_found = 9;
        store.record_discovery(&again, None).await.unwrap();
        let (found, methods, started): (i64, serde_json::Value, DateTime<Utc>) = sqlx::query_as(
            "SELECT robots_found, methods, started_at FROM discovery_sessions WHERE session_id = $1",
        )
        .bind(again.session_id)
        .fetch_one(&store.pool)
        .await
        .unwrap();
        assert_eq!(found, 9);
        assert_eq!(methods, json!(["agent", "arp"]));
        assert_eq!(started, again.started_at);
        store.close().await;
    }

    // -----------------------------------------------------------------------
    // 6. Pruning keeps replay exact.

    async fn assert_rebuild_equals_live(store: &PostgresStore) {
        let mut rebuild = Rebuild::new(store.snapshots().await.unwrap());
        for e in all_events(store).await {
            rebuild.event(&e).expect("the log replays");
        }
        let rebuilt = rebuild.finish(&store.latest_reports().await.unwrap());
        let live = store.robots().await.unwrap();
        assert_eq!(compare(&live, &rebuilt), vec![]);
        assert_eq!(rebuilt.len(), live.len());
    }

    #[tokio::test]
    async fn pruning_keeps_replay_equal_to_the_live_rows() {
        let db = TestDatabase::create().await;
        let store = store_on(&db).await;
        let old = now() - chrono::Duration::days(3);
        let recent = now();
        // Robots 1..=5: old history, then recent events and reports.
        for n in 1..=5 {
            let id = robot_id(n);
            let a = append_at(None, id, vec![discovered(n), provisioning_started()], old);
            let a = with_report(a, report_at(id, 1, json!({"n": 1}), old));
            store.append(a).await.unwrap();
            let row = store.robot(id).await.unwrap().unwrap();
            let a = append_at(Some(&row), id, vec![], old);
            let a = with_report(a, report_at(id, 2, json!({"n": 2}), old));
            store.append(a).await.unwrap();
            let row = store.robot(id).await.unwrap().unwrap();
            let a = append_at(Some(&row), id, vec![provisioned(), activated()], recent);
            let a = with_report(a, report_at(id, 3, json!({"n": 3}), recent));
            store.append(a).await.unwrap();
        }
        // Robot 6: only old events; robot 7: only recent ones.
        store
            .append(append_at(None, robot_id(6), vec![discovered(6)], old))
            .await
            .unwrap();
        store
            .append(append_at(None, robot_id(7), vec![discovered(7)], recent))
            .await
            .unwrap();
        assert_rebuild_equals_live(&store).await;
        let live = store.robots().await.unwrap();

        let outcome = store
            .prune(recent - chrono::Duration::days(1))
            .await
            .unwrap();
        assert_eq!(
            outcome,
            PruneOutcome {
                robots: 6,
                events_removed: 5 * 2 + 1,
                reports_removed: 5 * 2,
            }
        );
        assert_eq!(store.robots().await.unwrap(), live);
        assert_eq!(store.snapshots().await.unwrap().len(), 6);
        assert_eq!(all_events(&store).await.len(), 5 * 2 + 1);
        assert_rebuild_equals_live(&store).await;
        assert_rows_are_their_history(&store).await;

        // Pruning everything, then again: still exact, and idempotent.
        let outcome = store
            .prune(recent + chrono::Duration::seconds(1))
            .await
            .unwrap();
        assert_eq!(outcome.robots, 6);
        assert_eq!(outcome.events_removed, 5 * 2 + 1);
        assert_eq!(all_events(&store).await, vec![]);
        assert_rebuild_equals_live(&store).await;
        assert_rows_are_their_history(&store).await;
        let outcome = store
            .prune(recent + chrono::Duration::seconds(1))
            .await
            .unwrap();
        assert_eq!(outcome, PruneOutcome::default());
        assert_eq!(store.robots().await.unwrap(), live);

        // Appends go on from the snapshot's version.
        let row = store.robot(robot_id(6)).await.unwrap().unwrap();
        let records = store
            .append(append(
                Some(&row),
                robot_id(6),
                vec![provisioning_started()],
            ))
            .await
            .unwrap();
        assert_eq!(versions(&records), [2]);
        assert_rebuild_equals_live(&store).await;
        store.close().await;
    }

    // -----------------------------------------------------------------------
    // 7. Indexes.

    /// Every index a plan uses.
    fn index_names(plan: &serde_json::Value, out: &mut BTreeSet<String>) {
        match plan {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    if k == "Index Name" {
                        out.insert(v.as_str().unwrap_or_default().to_string());
                    }
                    index_names(v, out);
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| index_names(v, out)),
            _ => {}
        }
    }

    #[tokio::test]
    async fn the_store_queries_use_indexes() {
        let db = TestDatabase::create().await;
        let store = store_on(&db).await;
        let appends = (0..600).map(|n| {
            let mut events = vec![discovered(n)];
            if n.is_multiple_of(50) {
                events.push(provisioning_started());
            }
            store.append(append(None, robot_id(n), events))
        });
        for result in futures_util::future::join_all(appends).await {
            result.expect("append");
        }
        let mut conn = store.pool.acquire().await.unwrap();
        sqlx::query("ANALYZE").execute(&mut *conn).await.unwrap();
        sqlx::query("SET enable_seqscan = off")
            .execute(&mut *conn)
            .await
            .unwrap();
        let cutoff = now() - chrono::Duration::days(1);
        let cases: Vec<(&str, String, sqlx::postgres::PgArguments)> = {
            use sqlx::Arguments;
            let args = |f: &dyn Fn(&mut sqlx::postgres::PgArguments)| {
                let mut a = sqlx::postgres::PgArguments::default();
                f(&mut a);
                a
            };
            vec![
                (
                    "robot_states_state",
                    ROBOTS_BY_STATE.into(),
                    args(&|a| a.add("provisioning").unwrap()),
                ),
                (
                    "robot_states_robot_type",
                    ROBOTS_BY_TYPE.into(),
                    args(&|a| a.add("xlerobot").unwrap()),
                ),
                (
                    "robot_states_ip_address",
                    ROBOTS_BY_IP.into(),
                    args(&|a| a.add("192.168.1.7").unwrap()),
                ),
                (
                    "events_robot_version",
                    ROBOT_EVENTS.into(),
                    args(&|a| {
                        a.add(robot_id(7).0).unwrap();
                        a.add(0_i64).unwrap();
                        a.add(100_i64).unwrap();
                    }),
                ),
                (
                    "events_pkey",
                    EVENTS_AFTER.into(),
                    args(&|a| {
                        a.add(300_i64).unwrap();
                        a.add(100_i64).unwrap();
                    }),
                ),
                (
                    "events_recorded_at",
                    "SELECT DISTINCT robot_id FROM events WHERE recorded_at < $1".into(),
                    args(&|a| a.add(cutoff).unwrap()),
                ),
                (
                    "robot_reports_pkey",
                    "SELECT robot_id, seq FROM robot_reports WHERE robot_id = $1 AND seq > $2 \
                     ORDER BY seq LIMIT 10"
                        .into(),
                    args(&|a| {
                        a.add(robot_id(7).0).unwrap();
                        a.add(0_i64).unwrap();
                    }),
                ),
            ]
        };
        for (index, sql, arguments) in cases {
            let plan: serde_json::Value = sqlx::query_scalar_with(
                AssertSqlSafe(format!("EXPLAIN (FORMAT JSON) {sql}")),
                arguments,
            )
            .fetch_one(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("EXPLAIN {sql}: {e}"));
            let mut used = BTreeSet::new();
            index_names(&plan, &mut used);
            assert!(
                used.contains(index),
                "{sql} uses {used:?}, not {index}: {plan}"
            );
        }
        drop(conn);
        store.close().await;
    }

    // -----------------------------------------------------------------------
    // 8. An unreachable server.

    #[tokio::test]
    async fn an_unreachable_server_is_unavailable_quickly() {
        let port = {
            let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            socket.local_addr().expect("its address").port()
        };
        let started = Instant::now();
        let result =
            PostgresStore::connect(&format!("postgres://postgres@127.0.0.1:{port}/kiwi"), 2).await;
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
        assert!(
            started.elapsed() < ACQUIRE_TIMEOUT + Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );

        // A closed store answers Unavailable too.
        let db = TestDatabase::create().await;
        let store = store_on(&db).await;
        store.close().await;
        let appended = store
            .append(append(None, robot_id(1), vec![discovered(1)]))
            .await;
        assert!(
            matches!(appended, Err(StoreError::Unavailable(_))),
            "{appended:?}"
        );
        assert!(matches!(
            store.ping().await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.robot(robot_id(1)).await,
            Err(StoreError::Unavailable(_))
        ));
    }

    #[test]
    fn the_log_lock_key_is_the_documented_one() {
        assert_eq!(log_lock!().parse::<i64>(), Ok(0x6b69_7769_6c6f_6701));
    }

    /// The payload as the write statement assembles it.
    fn payload(first: Option<i64>, last: Option<i64>, body: &str) -> String {
        let n = |p: Option<i64>| p.map_or("null".to_string(), |p| p.to_string());
        format!("{{\"first\":{},\"last\":{},{body}", n(first), n(last))
    }

    #[test]
    fn a_commit_notice_round_trips() {
        let id = robot_id(1);
        let mut a = append(None, id, vec![discovered(1), provisioning_started()]);
        a.robot.config = json!({"gain": 0.1, "big": 18446744073709551615u64});
        let a = with_report(a, report(id, 3, json!({"t": [1.5, -2]})));
        let mut planned = plan(None, &a).expect("a valid append");
        let body = planned.json.notice.clone();
        assert!(body.starts_with("\"robot_id\":"), "{body}");

        let mut parsed: Notice =
            serde_json::from_str(&payload(Some(10), Some(11), &body)).expect("a notice");
        let (events, robot) = parsed.positioned().expect("the whole commit");
        for (i, r) in planned.records.iter_mut().enumerate() {
            r.position = 10 + i as i64;
        }
        assert_eq!(events, planned.records);
        assert_eq!(robot, planned.robot);

        // Positions that do not account for every event: read instead.
        for (first, last) in [(Some(10), Some(12)), (Some(10), None), (None, None)] {
            let mut parsed: Notice =
                serde_json::from_str(&payload(first, last, &body)).expect("a notice");
            assert!(parsed.positioned().is_none(), "{first:?}..{last:?}");
        }

        planned.robot.metadata = json!({"blob": "y".repeat(NOTIFY_PAYLOAD_MAX)});
        let body = notice_body(&planned.robot, &planned.records);
        let full = payload(Some(i64::MIN), Some(i64::MIN), &body);
        assert!(full.len() <= NOTIFY_PAYLOAD_MAX, "{}", full.len());
        let mut reference: Notice = serde_json::from_str(&full).expect("a notice");
        assert!(reference.events.is_none() && reference.robot.is_none());
        assert_eq!(reference.robot_id, id);
        assert!(reference.positioned().is_none());
    }
}
