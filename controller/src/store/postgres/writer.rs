//! The group-commit writer: one task, one connection, one statement per batch, checked against the heads it remembers (see the module doc of [`super`]).

use super::*;

// ---------------------------------------------------------------------------
// The writer task.

/// Owns the writing connection: its own, outside the pool, so a batch
/// costs no pool check-out (and no liveness ping). A connection that failed
/// is dropped, and the next batch connects again.
#[derive(Debug)]
pub(super) struct Writer {
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

pub(super) type Outcome = Result<Vec<EventRecord>, StoreError>;

impl Writer {
    /// Connects the writer and starts its task, which writes what comes on
    /// `queue` until the queue closes.
    pub(super) async fn start(
        options: PgConnectOptions,
        connect_timeout: Duration,
        batches: Arc<AtomicU64>,
        queue: mpsc::Receiver<WriteRequest>,
    ) -> Result<(), StoreError> {
        let conn = connect_writer(&options, connect_timeout).await?;
        let writer = Writer {
            options,
            connect_timeout,
            conn: Some(conn),
            batches,
            heads: HashMap::new(),
        };
        tokio::spawn(writer.run(queue));
        Ok(())
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
pub(super) enum Base {
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
pub(super) async fn read_heads(
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

pub(super) async fn connect_writer(
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
pub(super) fn shut(mut queue: mpsc::Receiver<WriteRequest>) {
    queue.close();
    while let Ok(request) = queue.try_recv() {
        if let WriteRequest::Close { done } = request {
            let _ = done.send(());
        }
    }
}

/// An append that passed the checks, ready to write.
#[derive(Debug)]
pub(super) struct Planned {
    pub(super) robot: Robot,
    /// The robot's version the append was checked against.
    expected_version: i64,
    /// The robot's head after it.
    head: Head,
    /// Positions are filled in by the write.
    pub(super) records: Vec<EventRecord>,
    report: Option<StoredReport>,
    pub(super) json: PlannedJson,
}

/// The JSONB values of a planned append, encoded before the transaction
/// so that an unencodable value fails only its own append.
#[derive(Debug)]
pub(super) struct PlannedJson {
    health: serde_json::Value,
    mac_addresses: serde_json::Value,
    capabilities: serde_json::Value,
    last_report: Option<serde_json::Value>,
    /// Per event: type, data, metadata.
    events: Vec<(&'static str, serde_json::Value, serde_json::Value)>,
    report_health: Option<serde_json::Value>,
    /// The commit notification, without its positions (see [`notice_body`]).
    pub(super) notice: String,
}

/// What an append that PostgreSQL refused is answered: a version already
/// in the log is a conflict; the rest is the caller's data.
pub(super) async fn append_error(
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
pub(super) fn plan(
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
pub(super) async fn write_group(
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
pub(super) const WRITE_GROUP: &str = concat!(
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
pub(super) struct RowArrays {
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
pub(super) struct ReportArrays {
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
pub(super) struct EventArrays {
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
