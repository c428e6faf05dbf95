//! Liveness: notices robots that went silent. A connected agent that has
//! not been heard from for `liveness_timeout` has its connection closed
//! (which records it as lost); a robot away on planned downtime that is not
//! back by its deadline is recorded as lost; and after start-up, robots that
//! expect an agent but have none once the grace period is over are recorded
//! as lost. Heartbeats never reach the store: the session registry holds
//! them in memory.
//!
//! The decisions are plain functions of `now`; [`run`] is the timer.

use crate::fleet::{Context, Fleet};
use crate::link::session::now_ms;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Whether a session last heard from at `last_seen_ms` is overdue at `now_ms`.
pub fn is_silent(last_seen_ms: i64, now_ms: i64, timeout: Duration) -> bool {
    now_ms.saturating_sub(last_seen_ms) > i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)
}

#[derive(Debug, Clone)]
pub struct LivenessConfig {
    pub timeout: Duration,
    pub startup_grace: Duration,
}

/// Runs the sweeps until `cancel`.
pub async fn run(fleet: Fleet, config: LivenessConfig, cancel: CancellationToken) {
    let started = now_ms();
    let period = (config.timeout / 4).max(Duration::from_millis(20));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut grace_over = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        for s in fleet.sessions().snapshot() {
            if is_silent(s.last_seen_ms(), now, config.timeout) {
                let silent_for =
                    Duration::from_millis(u64::try_from(now - s.last_seen_ms()).unwrap_or(0));
                s.close(format!("no heartbeat for {:.1}s", silent_for.as_secs_f64()));
            }
        }
        for robot_id in fleet.sessions().take_overdue_absences(now) {
            if !fleet.sessions().is_connected(&robot_id) {
                lose(
                    &fleet,
                    robot_id,
                    "did not return from planned downtime".into(),
                )
                .await;
            }
        }
        if !grace_over && is_silent(started, now, config.startup_grace) {
            grace_over = true;
            for robot in fleet.cache().all() {
                let id = robot.robot_id;
                if robot.state.expects_presence()
                    && !fleet.sessions().is_connected(&id)
                    && !fleet.sessions().is_planned_absent(&id)
                {
                    lose(
                        &fleet,
                        id,
                        "no agent connection since the controller started".into(),
                    )
                    .await;
                }
            }
        }
    }
}

async fn lose(fleet: &Fleet, robot_id: kiwi_protocol::RobotId, reason: String) {
    let ctx = Context::new("liveness");
    if let Err(e) = fleet.lose_if_absent(robot_id, reason, &ctx).await {
        tracing::error!(%robot_id, error = %e, "could not record a silent robot");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_measured_against_the_timeout() {
        let t = Duration::from_millis(1000);
        assert!(!is_silent(10_000, 10_999, t));
        assert!(!is_silent(10_000, 11_000, t));
        assert!(is_silent(10_000, 11_001, t));
        // A clock that stepped back never counts as silence.
        assert!(!is_silent(10_000, 9_000, t));
    }
}
