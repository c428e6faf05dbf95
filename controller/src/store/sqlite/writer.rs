//! The writer task: the only writing connection, group commit, the commit feed (see the module doc of [`super`]).

use super::*;

// ---------------------------------------------------------------------------
// The writer task.

/// Owns the only writing connection.
pub(super) struct Writer {
    conn: SqliteConnection,
    feed: broadcast::Sender<Arc<Committed>>,
    batches: Arc<AtomicU64>,
}

impl Writer {
    /// Starts the writer's task on `conn`: it writes what comes on `queue`
    /// until the queue closes.
    pub(super) fn start(
        conn: SqliteConnection,
        feed: broadcast::Sender<Arc<Committed>>,
        batches: Arc<AtomicU64>,
        queue: mpsc::Receiver<WriteRequest>,
    ) {
        tokio::spawn(
            Writer {
                conn,
                feed,
                batches,
            }
            .run(queue),
        );
    }

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
pub(super) async fn write_batch(
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
pub(super) async fn write_append(
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

pub(super) async fn load_robot(
    conn: &mut SqliteConnection,
    id: RobotId,
) -> Result<Option<Robot>, StoreError> {
    let row = sqlx::query(concat!(
        "SELECT ",
        robot_columns!(),
        " FROM robot_states WHERE robot_id = ?"
    ))
    .bind(id.to_string())
    .fetch_optional(&mut *conn)
    .await
    .map_err(write_error)?;
    row.as_ref().map(decode::robot).transpose()
}

pub(super) async fn upsert_robot(
    conn: &mut SqliteConnection,
    robot: &Robot,
) -> Result<(), StoreError> {
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

pub(super) async fn insert_event(
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
pub(super) async fn insert_report(
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
