//! The one component that applies an operator action or an observation to a
//! robot: decide (pure, [`crate::domain::decide`]), append to the store
//! (durable, group-committed), update the cache, and send the resulting
//! commands to the robot's agent. The watch stream is fed by the store's
//! commit feed (see [`crate::watch`]), so it sees changes in log order.
//!
//! Inputs for one robot are serialised by a per-robot lock; inputs for
//! different robots run concurrently and meet in the store's group commit.

use crate::breakers::{Breakers, Outcome};
use crate::cache::shared::SharedCache;
use crate::cache::{Entry, RobotCache};
use crate::domain::decide::CommandIntent;
use crate::domain::{
    EventMetadata, EventRecord, Health, Input, LifecycleState, NewEvent, Policy, Recall, Refusal,
    Robot, RobotEvent, decide_recalling,
};
use crate::metrics::{Metrics, TransitionLabels};
use crate::sessions::SessionRegistry;
use crate::store::{Append, EventStore, StoreError, StoredReport};
use chrono::{DateTime, TimeZone, Utc};
use kiwi_protocol::RobotId;
use kiwi_protocol::message::{AgentHealth, Command, CommandKind, DesiredConfig, Report};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Who caused an input, recorded in each event's metadata.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub actor: &'static str,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
}

impl Context {
    /// A context of its own: a new correlation id.
    pub fn new(actor: &'static str) -> Self {
        Context::correlated(actor, Uuid::new_v4())
    }

    /// A context that continues `correlation_id` (an API request's, an
    /// agent session's).
    pub fn correlated(actor: &'static str, correlation_id: Uuid) -> Self {
        Context {
            actor,
            correlation_id: Some(correlation_id),
            causation_id: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The result of an applied input: the robot as stored after it, and the
/// events appended (possibly none).
#[derive(Debug, Clone)]
pub struct Applied {
    pub robot: Entry,
    pub events: Vec<EventRecord>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn EventStore>,
    cache: Arc<RobotCache>,
    sessions: Arc<SessionRegistry>,
    metrics: Arc<Metrics>,
    policy: Policy,
    report_interval: Duration,
    /// Redis in front of the store, when configured; set once, after the
    /// read model is loaded (Redis is refilled from it).
    shared: std::sync::OnceLock<SharedCache>,
    breakers: Arc<Breakers>,
    locks: Mutex<HashMap<RobotId, Arc<tokio::sync::Mutex<()>>>>,
}

/// The fleet and the parts it works with, for the tasks that act on it
/// beside the API and the link (liveness, recovery): made once by
/// `serve::Components`, the same parts the fleet was built with.
#[derive(Debug, Clone)]
pub struct Parts {
    pub fleet: Fleet,
    pub sessions: Arc<SessionRegistry>,
    pub cache: Arc<RobotCache>,
    pub breakers: Arc<Breakers>,
    pub metrics: Arc<Metrics>,
}

/// A cheap, cloneable handle.
#[derive(Debug, Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

/// How many times an append that lost an optimistic-concurrency race is
/// decided again on the fresh row before the conflict is reported.
const CONFLICT_RETRIES: usize = 3;

impl Fleet {
    /// A fleet over its parts, each made once by `serve::Components`
    /// (which hands the same parts to the tasks that need them): the
    /// store, the in-process read model, the connected agents, the
    /// metrics and the circuit breakers (Redis in front of the store, when
    /// configured, comes later: [`Fleet::set_shared_cache`]).
    pub fn new(
        store: Arc<dyn EventStore>,
        cache: Arc<RobotCache>,
        sessions: Arc<SessionRegistry>,
        metrics: Arc<Metrics>,
        breakers: Arc<Breakers>,
        policy: Policy,
        report_interval: Duration,
    ) -> Fleet {
        Fleet {
            inner: Arc::new(Inner {
                store,
                cache,
                sessions,
                metrics,
                policy,
                report_interval,
                shared: std::sync::OnceLock::new(),
                breakers,
                locks: Mutex::default(),
            }),
        }
    }

    /// Puts Redis in front of the store. Call once, after [`Fleet::load`]:
    /// Redis is refilled from the loaded read model before it is read.
    pub fn set_shared_cache(&self, shared: SharedCache) {
        if self.inner.shared.set(shared).is_err() {
            tracing::warn!("shared cache already set; keeping the first");
        }
    }

    /// Fills the cache from the store's read model and the circuit
    /// breakers from theirs (start-up).
    pub async fn load(&self) -> Result<usize, StoreError> {
        self.inner.breakers.load().await?;
        let robots = self.inner.store.robots().await?;
        let n = robots.len();
        for r in robots {
            self.inner.cache.put(Arc::new(r));
        }
        Ok(n)
    }

    /// One robot for decisions: from the in-process read model, else read
    /// through from the store. (Optimistic concurrency catches a row that is
    /// stale because another controller changed it.)
    pub async fn robot(&self, id: RobotId) -> Result<Option<Entry>, StoreError> {
        if let Some(e) = self.inner.cache.peek(&id) {
            return Ok(Some(e));
        }
        self.load_one(id).await
    }

    async fn load_one(&self, id: RobotId) -> Result<Option<Entry>, StoreError> {
        Ok(self.inner.store.robot(id).await?.map(|r| {
            let r = Arc::new(r);
            self.inner.cache.put(r.clone());
            Entry::new(r)
        }))
    }

    /// One robot for the API: Redis first when it is up (read-through: a
    /// miss is loaded from the store and written back), else the in-process
    /// read model, else the store. Counts cache hits and misses.
    pub async fn read(&self, id: RobotId) -> Result<Option<Entry>, StoreError> {
        let local = &self.inner.cache;
        if let Some(shared) = self.inner.shared.get() {
            match shared.get(id).await {
                Ok(Some(r)) => return Ok(Some(Entry::new(Arc::new(r)))),
                Ok(None) => {
                    let loaded = self.load_one(id).await?;
                    if let Some(e) = &loaded {
                        shared.put(&e.robot).await;
                    }
                    return Ok(loaded);
                }
                Err(()) => {}
            }
        }
        if let Some(e) = local.get(&id) {
            return Ok(Some(e));
        }
        self.load_one(id).await
    }

    fn lock_for(&self, id: RobotId) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .clone()
    }

    /// Applies one input to one robot and sends the commands it calls for.
    pub async fn apply(
        &self,
        id: RobotId,
        input: Input,
        ctx: &Context,
    ) -> Result<Applied, FleetError> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let (applied, commands) = self.apply_locked(id, input, None, ctx).await?;
        self.dispatch(&applied.robot.robot, &commands).await;
        Ok(applied)
    }

    /// Records the robot as lost unless its agent is connected, checked under
    /// the robot's lock: an agent registers its session before its arrival
    /// is applied, so an arrival racing with this is applied after it and
    /// wins.
    pub async fn lose_if_absent(
        &self,
        id: RobotId,
        reason: String,
        ctx: &Context,
    ) -> Result<Option<Applied>, FleetError> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        if self.inner.sessions.is_connected(&id) {
            return Ok(None);
        }
        let (applied, commands) = self
            .apply_locked(id, Input::AgentLost { reason }, None, ctx)
            .await?;
        self.dispatch(&applied.robot.robot, &commands).await;
        Ok(Some(applied))
    }

    /// Stores a report (deduplicated by sequence number) with whatever it
    /// changes, and returns the sequence number to acknowledge.
    pub async fn report(
        &self,
        id: RobotId,
        report: &Report,
        ctx: &Context,
    ) -> Result<i64, FleetError> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let seq = i64::try_from(report.seq).unwrap_or(i64::MAX);
        let current = self.robot(id).await?.ok_or(Refusal::UnknownRobot)?;
        if seq <= current.robot.last_report_seq {
            self.inner.metrics.agent_reports_duplicate.inc();
            return Ok(current.robot.last_report_seq);
        }
        let now = Utc::now();
        let health = agent_health(&report.health);
        let time = Utc
            .timestamp_millis_opt(report.time_ms)
            .single()
            .unwrap_or(now);
        let mut telemetry_in = report.telemetry.clone();
        for n in &mut telemetry_in.network {
            n.interface = storable(&n.interface);
        }
        let telemetry = serde_json::to_value(&telemetry_in).unwrap_or_default();
        let stored = StoredReport {
            robot_id: id,
            seq,
            time,
            received_at: now,
            health: health.clone(),
            workload: report.workload.into(),
            maintenance: report.maintenance,
            telemetry: telemetry.clone(),
        };
        let (applied, commands) = self
            .apply_locked(id, Input::AgentReported { health }, Some(stored), ctx)
            .await?;
        self.inner.metrics.agent_reports.inc();
        self.dispatch(&applied.robot.robot, &commands).await;
        Ok(applied.robot.robot.last_report_seq.max(seq))
    }

    async fn apply_locked(
        &self,
        id: RobotId,
        input: Input,
        report: Option<StoredReport>,
        ctx: &Context,
    ) -> Result<(Applied, Vec<CommandIntent>), FleetError> {
        let mut attempt = 0;
        loop {
            let current = self.robot(id).await?;
            let current_robot = current.as_ref().map(|e| e.robot.as_ref());
            let recall = match (&input, current_robot) {
                (Input::AgentConnected { .. }, Some(r)) if r.state == LifecycleState::Offline => {
                    Recall {
                        before_offline: self.state_before_offline(id, r.version).await?,
                    }
                }
                _ => Recall::default(),
            };
            let decision =
                decide_recalling(current_robot, input.clone(), self.inner.policy, recall)?;
            if decision.events.is_empty() && report.is_none() {
                let robot = current.ok_or(Refusal::UnknownRobot)?;
                return Ok((
                    Applied {
                        robot,
                        events: Vec::new(),
                    },
                    decision.commands,
                ));
            }
            match self
                .commit(id, current_robot, decision.events, report.clone(), ctx)
                .await
            {
                Ok(applied) => return Ok((applied, decision.commands)),
                Err(StoreError::Conflict { .. }) if attempt < CONFLICT_RETRIES => {
                    attempt += 1;
                    if let Some(fresh) = self.inner.store.robot(id).await? {
                        self.inner.cache.put(Arc::new(fresh));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The state an offline robot (at `version`) left when it went
    /// offline: the source of its last transition, which is the last
    /// `robot_offline` (nothing moves an offline robot but its return or
    /// its failure). Read from the robot's latest events; `None` when they
    /// were pruned.
    async fn state_before_offline(
        &self,
        id: RobotId,
        version: i64,
    ) -> Result<Option<LifecycleState>, StoreError> {
        const LOOK_BACK: u32 = 32;
        let events = self
            .inner
            .store
            .robot_events(id, (version - i64::from(LOOK_BACK)).max(0), LOOK_BACK)
            .await?;
        Ok(events.iter().rev().find_map(|e| match &e.event {
            RobotEvent::RobotOffline { transition, .. } => Some(transition.from()),
            _ => None,
        }))
    }

    /// Appends `events` (and `report`) for a robot whose current row is
    /// `current`, then updates the cache.
    async fn commit(
        &self,
        id: RobotId,
        current: Option<&Robot>,
        events: Vec<RobotEvent>,
        report: Option<StoredReport>,
        ctx: &Context,
    ) -> Result<Applied, StoreError> {
        let now = truncate_micros(Utc::now());
        let expected_version = current.map_or(0, |r| r.version);
        let metadata = EventMetadata {
            correlation_id: ctx.correlation_id,
            causation_id: ctx.causation_id,
            actor: ctx.actor.to_string(),
        };
        let new_events: Vec<NewEvent> = events
            .into_iter()
            .map(|event| NewEvent {
                event_id: Uuid::new_v4(),
                event,
                metadata: metadata.clone(),
                recorded_at: now,
            })
            .collect();
        // The row after the events, computed exactly as replay would.
        let mut row = current.cloned();
        for (i, e) in new_events.iter().enumerate() {
            let tentative = EventRecord {
                position: 0,
                event_id: e.event_id,
                robot_id: id,
                version: expected_version + 1 + i as i64,
                event: e.event.clone(),
                metadata: e.metadata.clone(),
                recorded_at: now,
            };
            row = Some(Robot::apply(row, &tentative).map_err(|err| {
                StoreError::Invalid(format!("decided event does not apply: {err}"))
            })?);
        }
        let mut row = row.ok_or_else(|| StoreError::Invalid("no robot to append to".into()))?;
        let mut report = report;
        if let Some(rep) = &mut report {
            // Stored with the time of this commit, so that replay (which
            // applies the latest report the same way) gives this very row.
            rep.received_at = now;
            rep.apply_to(&mut row);
        }
        let started = Instant::now();
        let records = self
            .inner
            .store
            .append(Append {
                robot_id: id,
                expected_version,
                events: new_events,
                robot: row.clone(),
                report,
            })
            .await?;
        let m = &self.inner.metrics;
        m.event_append_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        m.events_appended.inc_by(records.len() as u64);
        for r in &records {
            tracing::info!(
                event_type = r.event.type_name(),
                aggregate_id = %id,
                correlation_id = ctx.correlation_id.map(tracing::field::display),
                version = r.version,
                position = r.position,
                actor = ctx.actor,
                "event recorded"
            );
            if let RobotEvent::RobotDiscovered { .. } = r.event {
                m.robots_discovered.inc();
            }
            if let Some(t) = r.event.transition() {
                m.robot_state_transitions
                    .get_or_create(&TransitionLabels {
                        from: t.from().as_str(),
                        to: t.to().as_str(),
                    })
                    .inc();
            }
        }
        let row = Arc::new(row);
        self.inner.cache.put(row.clone());
        if let Some(shared) = self.inner.shared.get() {
            shared.put(&row).await;
        }
        Ok(Applied {
            robot: Entry::new(row),
            events: records,
        })
    }

    /// What the controller wants this robot to be, as sent to its agent.
    pub fn desired_config(&self, robot: &Robot) -> DesiredConfig {
        let settings = robot
            .config
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                        (k.clone(), v)
                    })
                    .collect()
            })
            .unwrap_or_default();
        DesiredConfig {
            maintenance: robot.state == crate::domain::LifecycleState::Maintenance,
            report_interval_ms: u32::try_from(self.inner.report_interval.as_millis())
                .unwrap_or(u32::MAX),
            settings,
        }
    }

    /// Sends commands to the robot's agent if it is connected. A command
    /// that cannot be sent now is not lost: the desired state is stored, and
    /// the agent is reconciled when it next connects.
    async fn dispatch(&self, robot: &Robot, commands: &[CommandIntent]) {
        if commands.is_empty() {
            return;
        }
        let Some(session) = self.inner.sessions.get(&robot.robot_id) else {
            tracing::debug!(robot_id = %robot.robot_id, ?commands, "agent not connected; commands wait for its return");
            return;
        };
        if let Err(refused) = self
            .inner
            .breakers
            .allow(robot.robot_id, chrono::Utc::now())
            .await
        {
            // What was decided is stored: the agent is brought to it when
            // it reconnects, or when the circuit lets calls through again.
            tracing::info!(robot_id = %robot.robot_id, ?commands, retry_at = %refused.retry_at, "circuit open; commands not sent");
            return;
        }
        for &intent in commands {
            let kind = match intent {
                CommandIntent::Provision => CommandKind::Provision {
                    config: self.desired_config(robot),
                },
                CommandIntent::EnterMaintenance => CommandKind::EnterMaintenance,
                CommandIntent::LeaveMaintenance => CommandKind::LeaveMaintenance,
                CommandIntent::RestartWorkload => CommandKind::RestartWorkload,
                CommandIntent::Ping => CommandKind::Ping,
            };
            let command = Command {
                command_id: Uuid::new_v4(),
                kind,
            };
            if let Err(e) = session.send_command(intent, command) {
                tracing::warn!(robot_id = %robot.robot_id, ?intent, error = %e, "command not sent; reconciled on reconnect");
                self.inner
                    .breakers
                    .record(robot.robot_id, Outcome::Failure, chrono::Utc::now())
                    .await;
            }
        }
    }
}

/// The health an agent reports about itself.
fn agent_health(h: &AgentHealth) -> Health {
    Health {
        status: h.status,
        reasons: h.reasons.iter().map(|r| storable(r)).collect(),
    }
}

/// Text from the network made storable everywhere: NUL characters (which
/// PostgreSQL refuses in text and JSON) become U+FFFD. Without this, one
/// such report could never be stored, and so never acknowledged.
pub fn storable(text: &str) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text.to_string()
    }
}

/// Stored times keep microseconds (the database's precision), so a row read
/// back equals the row written.
pub fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    let micros = t.timestamp_micros();
    Utc.timestamp_micros(micros).single().unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::storable;

    #[test]
    fn nul_never_reaches_the_store() {
        assert_eq!(storable("eth0"), "eth0");
        assert_eq!(storable("et\0h0"), "et\u{FFFD}h0");
    }
}
