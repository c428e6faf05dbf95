//! Per-robot circuit breakers: one [`Breaker`] per robot around everything
//! the controller does to it (the liveness probe, commands), so that a
//! robot that keeps failing is left alone for a while instead of hammered.
//!
//! The decisions are [`crate::domain::breaker`]'s; this registry keeps one
//! per robot, forgets a closed breaker's failures after `reset_after`
//! without a new one (the original design's reset timeout: failures must be
//! consecutive *and* recent to open a circuit), persists every change of
//! state (`circuit_breakers`, so that a restarted controller or another one
//! sees an open circuit), and counts the open ones in the metrics. A store
//! that cannot be written is logged: the breaker in memory still decides.
//!
//! Robots whose breaker is closed with no failures are not kept.

use crate::domain::breaker::{Breaker, BreakerSettings, BreakerState, Moment, Refused};
use crate::metrics::{Metrics, StateLabels};
use crate::store::{EventStore, StoreError, StoredBreaker};
use chrono::{DateTime, Utc};
use kiwi_protocol::RobotId;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The original design's reset timeout: a closed breaker's failures are
/// forgotten after this long without another.
pub const RESET_AFTER: Duration = Duration::from_secs(300);

/// What the registry is configured with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CircuitSettings {
    /// Each breaker's thresholds and timeouts.
    pub breaker: BreakerSettings,
    /// A closed breaker forgets its failures after this long without one.
    pub reset_after: Duration,
}

impl Default for CircuitSettings {
    fn default() -> Self {
        CircuitSettings {
            breaker: BreakerSettings::default(),
            reset_after: RESET_AFTER,
        }
    }
}

/// How a call to a robot went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

/// One robot's breaker as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CircuitView {
    /// `closed`, `open` or `half_open`.
    pub state: &'static str,
    /// Consecutive failures counted while closed.
    pub failures: u32,
    /// Consecutive successes while half-open.
    pub successes: u32,
    /// Successes that close a half-open circuit.
    pub success_threshold: u32,
    pub opened_at: Option<DateTime<Utc>>,
    /// When an open circuit lets the next call through as a trial.
    pub retry_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
struct Tracked {
    breaker: Breaker<DateTime<Utc>>,
    last_failure: Option<DateTime<Utc>>,
}

/// Every robot's breaker.
#[derive(Debug)]
pub struct Breakers {
    settings: BreakerSettings,
    reset_after: Duration,
    entries: Mutex<HashMap<RobotId, Tracked>>,
    store: Arc<dyn EventStore>,
    metrics: Arc<Metrics>,
}

impl Breakers {
    pub fn new(
        settings: CircuitSettings,
        store: Arc<dyn EventStore>,
        metrics: Arc<Metrics>,
    ) -> Breakers {
        Breakers {
            settings: settings.breaker,
            reset_after: settings.reset_after,
            entries: Mutex::default(),
            store,
            metrics,
        }
    }

    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<RobotId, Tracked>> {
        // Every update is a single insert or remove: valid after a panic.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the persisted breakers (start-up).
    pub async fn load(&self) -> Result<(), StoreError> {
        let stored = self.store.breakers().await?;
        {
            let mut entries = self.entries();
            for b in stored {
                if b.state == (BreakerState::Closed { failures: 0 }) {
                    continue;
                }
                // A closed breaker's row was last written by a failure.
                let last_failure =
                    matches!(b.state, BreakerState::Closed { .. }).then_some(b.updated_at);
                entries.insert(
                    b.robot_id,
                    Tracked {
                        breaker: Breaker::restore(self.settings, b.state),
                        last_failure,
                    },
                );
            }
        }
        self.publish();
        Ok(())
    }

    /// The state of `robot`'s breaker.
    pub fn state(&self, robot: &RobotId) -> BreakerState<DateTime<Utc>> {
        self.entries()
            .get(robot)
            .map(|t| t.breaker.state())
            .unwrap_or(BreakerState::Closed { failures: 0 })
    }

    /// Whether `robot`'s circuit is open (calls refused until its timeout).
    pub fn is_open(&self, robot: &RobotId) -> bool {
        matches!(self.state(robot), BreakerState::Open { .. })
    }

    /// The robots whose breaker is open or half-open, with that state's
    /// name (every other robot's circuit is `closed`).
    pub fn tripped(&self) -> HashMap<RobotId, &'static str> {
        self.entries()
            .iter()
            .map(|(id, t)| (*id, t.breaker.state()))
            .filter(|(_, s)| !matches!(s, BreakerState::Closed { .. }))
            .map(|(id, s)| (id, s.as_str()))
            .collect()
    }

    /// `robot`'s breaker for the API.
    pub fn view(&self, robot: &RobotId) -> CircuitView {
        let state = self.state(robot);
        let (failures, successes, opened_at, retry_at) = match state {
            BreakerState::Closed { failures } => (failures, 0, None, None),
            BreakerState::Open { opened_at } => (
                0,
                0,
                Some(opened_at),
                Some(opened_at.plus(self.settings.open_timeout)),
            ),
            BreakerState::HalfOpen { since, successes } => (0, successes, Some(since), None),
        };
        CircuitView {
            state: state.as_str(),
            failures,
            successes,
            success_threshold: self.settings.success_threshold,
            opened_at,
            retry_at,
        }
    }

    /// Whether a call to `robot` may go out at `now` (an open breaker past
    /// its timeout lets this one through as a trial).
    pub async fn allow(
        &self,
        robot: RobotId,
        now: DateTime<Utc>,
    ) -> Result<(), Refused<DateTime<Utc>>> {
        let (answer, changed) = {
            let mut entries = self.entries();
            let Some(t) = entries.get_mut(&robot) else {
                return Ok(());
            };
            let before = t.breaker.state();
            let answer = t.breaker.allow(now);
            let after = t.breaker.state();
            (answer, (before.as_str() != after.as_str()).then_some(after))
        };
        if let Some(state) = changed {
            self.persist(robot, state, now).await;
        }
        answer
    }

    /// Records how a call to `robot` went at `now`.
    pub async fn record(&self, robot: RobotId, outcome: Outcome, now: DateTime<Utc>) {
        let changed = {
            let mut entries = self.entries();
            if outcome == Outcome::Success && !entries.contains_key(&robot) {
                return;
            }
            let t = entries.entry(robot).or_insert_with(|| Tracked {
                breaker: Breaker::new(self.settings),
                last_failure: None,
            });
            let before = t.breaker.state();
            match outcome {
                Outcome::Success => t.breaker.record_success(now),
                Outcome::Failure => {
                    let stale = t
                        .last_failure
                        .is_some_and(|at| now >= at.plus(self.reset_after));
                    if stale && matches!(before, BreakerState::Closed { .. }) {
                        t.breaker.reset();
                    }
                    t.breaker.record_failure(now);
                    t.last_failure = Some(now);
                }
            }
            let after = t.breaker.state();
            if after == (BreakerState::Closed { failures: 0 }) {
                entries.remove(&robot);
            }
            (before != after).then_some((before, after))
        };
        if let Some((before, after)) = changed {
            if before.as_str() != after.as_str() {
                tracing::info!(
                    robot_id = %robot,
                    from = before.as_str(),
                    to = after.as_str(),
                    "circuit breaker changed"
                );
            }
            self.persist(robot, after, now).await;
        }
    }

    /// An operator's reset: closed, no failures counted.
    pub async fn reset(&self, robot: RobotId, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.entries().remove(&robot);
        self.publish();
        self.store
            .save_breaker(&StoredBreaker {
                robot_id: robot,
                state: BreakerState::Closed { failures: 0 },
                updated_at: now,
            })
            .await
    }

    async fn persist(
        &self,
        robot: RobotId,
        state: BreakerState<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) {
        self.publish();
        let stored = StoredBreaker {
            robot_id: robot,
            state,
            updated_at: now,
        };
        if let Err(e) = self.store.save_breaker(&stored).await {
            tracing::warn!(robot_id = %robot, error = %e, "could not store the circuit breaker; kept in memory");
        }
    }

    /// Sets the `circuit_breakers{state}` gauges.
    fn publish(&self) {
        let (mut open, mut half_open) = (0, 0);
        for t in self.entries().values() {
            match t.breaker.state() {
                BreakerState::Open { .. } => open += 1,
                BreakerState::HalfOpen { .. } => half_open += 1,
                BreakerState::Closed { .. } => {}
            }
        }
        for (state, n) in [("open", open), ("half_open", half_open)] {
            self.metrics
                .circuit_breakers
                .get_or_create(&StateLabels { state })
                .set(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use chrono::TimeZone;
    use kiwi_protocol::HardwareId;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    fn robot() -> RobotId {
        RobotId::from_hardware(&HardwareId::Configured("breaker-test".into()))
    }

    async fn breakers(dir: &std::path::Path) -> (Breakers, Arc<Metrics>) {
        let store: Arc<dyn EventStore> =
            Arc::new(SqliteStore::open(&dir.join("kiwi.db")).await.unwrap());
        let metrics = Arc::new(Metrics::new());
        let b = Breakers::new(CircuitSettings::default(), store, metrics.clone());
        (b, metrics)
    }

    fn open_gauge(m: &Metrics) -> i64 {
        m.circuit_breakers
            .get_or_create(&StateLabels { state: "open" })
            .get()
    }

    /// The acceptance, on a simulated clock and a real store: five
    /// failed probes in a row open the circuit; after the open timeout one
    /// probe is let through; three successes close it. Every state is
    /// persisted, so a fresh registry reads it back.
    #[tokio::test]
    async fn five_failures_open_one_trial_after_the_timeout_three_successes_close() {
        let dir = tempfile::tempdir().unwrap();
        let (b, metrics) = breakers(dir.path()).await;
        let r = robot();
        for i in 0..4 {
            assert!(b.allow(r, at(i)).await.is_ok());
            b.record(r, Outcome::Failure, at(i)).await;
        }
        assert_eq!(b.state(&r), BreakerState::Closed { failures: 4 });
        b.record(r, Outcome::Failure, at(4)).await;
        assert_eq!(b.state(&r), BreakerState::Open { opened_at: at(4) });
        assert_eq!(open_gauge(&metrics), 1);
        assert_eq!(b.view(&r).retry_at, Some(at(34)));

        // Refused until the open timeout (30 s); persisted meanwhile.
        assert_eq!(b.allow(r, at(20)).await, Err(Refused { retry_at: at(34) }));
        let (again, _) = breakers(dir.path()).await;
        again.load().await.unwrap();
        assert_eq!(again.state(&r), BreakerState::Open { opened_at: at(4) });

        // One trial after the timeout, then three successes close it.
        assert!(b.allow(r, at(34)).await.is_ok());
        assert!(matches!(b.state(&r), BreakerState::HalfOpen { .. }));
        for i in 0..3 {
            b.record(r, Outcome::Success, at(35 + i)).await;
        }
        assert_eq!(b.state(&r), BreakerState::Closed { failures: 0 });
        assert_eq!(open_gauge(&metrics), 0);
        let (again, _) = breakers(dir.path()).await;
        again.load().await.unwrap();
        assert_eq!(again.state(&r), BreakerState::Closed { failures: 0 });
    }

    #[tokio::test]
    async fn failures_far_apart_do_not_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let (b, _) = breakers(dir.path()).await;
        let r = robot();
        for i in 0..10 {
            // One failure every 301 s: never two within the reset timeout.
            b.record(r, Outcome::Failure, at(i * 301)).await;
        }
        assert_eq!(b.state(&r), BreakerState::Closed { failures: 1 });
    }

    #[tokio::test]
    async fn a_reset_closes_an_open_circuit_and_is_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let (b, metrics) = breakers(dir.path()).await;
        let r = robot();
        for i in 0..5 {
            b.record(r, Outcome::Failure, at(i)).await;
        }
        assert!(b.is_open(&r));
        b.reset(r, at(6)).await.unwrap();
        assert!(!b.is_open(&r));
        assert_eq!(open_gauge(&metrics), 0);
        let (again, _) = breakers(dir.path()).await;
        again.load().await.unwrap();
        assert_eq!(again.state(&r), BreakerState::Closed { failures: 0 });
        assert_eq!(again.view(&r).state, "closed");
    }

    #[tokio::test]
    async fn successes_of_an_untracked_robot_cost_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (b, _) = breakers(dir.path()).await;
        b.record(robot(), Outcome::Success, at(0)).await;
        assert!(b.entries().is_empty());
    }
}
