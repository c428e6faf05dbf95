//! The follower: `LISTEN`s for commit notifications, catches up after a lost connection, and publishes the feed (see the module doc of [`super`]).

use super::*;

/// Follows the commit notifications and publishes the feed.
#[derive(Debug)]
pub(super) struct Follower {
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
    /// Starts following: listens first, then reads where the log ends (a
    /// commit after this point is notified, one before it is below the
    /// baseline), then publishes from a task of its own until `stop`.
    pub(super) async fn start(
        pool: PgPool,
        listen_pool: PgPool,
        feed: broadcast::Sender<Arc<Committed>>,
        stop: CancellationToken,
    ) -> Result<(), StoreError> {
        let mut follower = Follower {
            pool,
            listen_pool,
            feed,
            last_seen: 0,
            published: HashMap::new(),
            stop,
        };
        let listener = follower.listen().await?;
        follower.baseline().await?;
        tokio::spawn(follower.run(listener));
        Ok(())
    }

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
            .map(decode::event)
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
        .map(decode::robot)
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
        .map(|row| decode::robot(row).map(|r| (r.robot_id, Arc::new(r))))
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
pub(super) async fn freshness(
    conn: &mut PgConnection,
) -> Result<HashMap<RobotId, (i64, i64)>, StoreError> {
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
