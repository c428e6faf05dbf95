//! Liveness: notices robots that went silent.
//!
//! Every established session has a failure detector
//! ([`crate::domain::detector`], phi accrual) fed by everything the agent
//! sends. The sweep asks each one, several times per heartbeat interval:
//!
//! 1. a silence the detector finds unusual makes the robot `suspect`
//!    (health, recorded) and sends it an active probe over its link (a
//!    `Ping` command, which the agent answers);
//! 2. anything heard from the agent clears the suspicion (recorded);
//! 3. a probe unanswered for [`LivenessConfig::probe_timeout`] closes the
//!    connection, which records the robot `offline`; its host is checked
//!    meanwhile (TCP), and the reason says whether it answered;
//! 4. whatever the detector says, a silence of `timeout` (the
//!    `liveness_timeout` setting) closes the connection: a ceiling for links
//!    so erratic that the detector keeps waiting.
//!
//! A clean disconnect needs no sweep: the connection ends and records it at
//! once. A robot away on planned downtime that is not back by its deadline
//! is recorded as lost; and after start-up, robots that expect an agent but
//! have none once the grace period is over are recorded as lost. Heartbeats
//! never reach the store: the sessions hold them in memory.
//!
//! The decisions are plain functions of `now` ([`is_silent`],
//! [`crate::domain::detector::Watch::assess`]); [`run`] is the timer.

use crate::breakers::Outcome;
use crate::domain::damping::{Damping, DampingSettings, NetworkChange};
use crate::domain::detector::{DetectorSettings, Step};
use crate::domain::{Input, LifecycleState};
use crate::fleet::{Context, Fleet};
use crate::link::session::{Session, now_ms};
use futures_util::StreamExt as _;
use kiwi_protocol::RobotId;
use kiwi_protocol::message::{Command, CommandKind};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Whether a session last heard from at `last_seen_ms` is overdue at `now_ms`.
pub fn is_silent(last_seen_ms: i64, now_ms: i64, timeout: Duration) -> bool {
    now_ms.saturating_sub(last_seen_ms) > i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)
}

/// Records written at once by one sweep (suspicions, clearings).
const SWEEP_WRITES: usize = 64;

#[derive(Debug, Clone)]
pub struct LivenessConfig {
    /// The ceiling: a connected agent silent this long is lost.
    pub timeout: Duration,
    pub startup_grace: Duration,
    /// The heartbeat interval agents were told to use.
    pub heartbeat: Duration,
    pub detector: DetectorSettings,
    /// `offline` this long becomes `failed` (zero: never automatically).
    pub offline_fail_after: Duration,
    pub damping: DampingSettings,
    /// While a suspect agent's probe is out, its host is checked too (a
    /// TCP connection to this port of its address), so that `offline`
    /// says whether the robot or only its agent stopped answering.
    pub host_port: u16,
}

impl LivenessConfig {
    /// How long a suspect robot has to answer the probe: two heartbeat
    /// intervals, at least 500 ms (room for a TCP retransmission, whose
    /// timeout is at least 200 ms on Linux) and at most 5 s.
    pub fn probe_timeout(&self) -> Duration {
        (2 * self.heartbeat).clamp(Duration::from_millis(500), Duration::from_secs(5))
    }

    /// How often the sweep runs: four times per heartbeat interval, at
    /// least every second.
    pub fn period(&self) -> Duration {
        (self.heartbeat / 4).clamp(Duration::from_millis(20), Duration::from_secs(1))
    }
}

/// What one session's assessment asks the sweep to record.
enum Record {
    Suspect(Session, String),
    Cleared(Session),
}

/// Runs the sweeps until `cancel`.
pub async fn run(fleet: Fleet, config: LivenessConfig, cancel: CancellationToken) {
    let started = now_ms();
    let mut tick = tokio::time::interval(config.period());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let probe_timeout = config.probe_timeout();
    let mut grace_over = false;
    let mut damping = Damping::new(config.damping);
    let mut next_fail_check = started;
    // Host checks of suspect agents, by robot.
    let mut host_checks: HashMap<RobotId, JoinHandle<bool>> = HashMap::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let mut records = Vec::new();
        // One pass over every session, cloning only those that need
        // something done (a few): the sweep runs four times per heartbeat
        // interval over the whole fleet.
        let mut due = Vec::new();
        fleet.sessions().for_each(|s| {
            if is_silent(s.last_seen_ms(), now, config.timeout) {
                due.push((s.clone(), None));
                return;
            }
            match s.assess(now, &config.detector, probe_timeout) {
                Step::Nothing => {
                    if !s.is_suspect() {
                        damping.heard_from(&s.robot_id);
                    }
                }
                step => due.push((s.clone(), Some(step))),
            }
        });
        for (s, step) in due {
            let Some(step) = step else {
                let silent_ms = now.saturating_sub(s.last_seen_ms());
                s.abandon(format!(
                    "no heartbeat for {:.1}s",
                    silent_ms as f64 / 1000.0
                ));
                continue;
            };
            match step {
                Step::Nothing => {}
                Step::Suspect { phi, silent_ms } => {
                    damping.went_silent(s.robot_id, now);
                    probe(&fleet, &s).await;
                    let host = SocketAddr::new(s.peer.ip(), config.host_port);
                    host_checks.insert(
                        s.robot_id,
                        // Done before the probe's own timeout.
                        tokio::spawn(crate::recovery::host_answers(host, probe_timeout * 3 / 4)),
                    );
                    let reason = format!(
                        "silent for {:.1}s (phi {phi:.1}); probing",
                        silent_ms as f64 / 1000.0
                    );
                    tracing::info!(robot_id = %s.robot_id, reason, "agent suspect");
                    fleet.metrics().liveness_suspected.inc();
                    records.push(Record::Suspect(s, reason));
                }
                Step::Cleared => {
                    // The probe's own result (a command result) is what
                    // the circuit breaker counts as a success.
                    damping.heard_from(&s.robot_id);
                    if let Some(check) = host_checks.remove(&s.robot_id) {
                        check.abort();
                    }
                    tracing::info!(robot_id = %s.robot_id, "suspect agent answered");
                    records.push(Record::Cleared(s));
                }
                Step::Lost { silent_ms } => {
                    fleet.metrics().liveness_confirmed.inc();
                    fleet
                        .breakers()
                        .record(s.robot_id, Outcome::Failure, chrono::Utc::now())
                        .await;
                    let host = match host_checks.remove(&s.robot_id) {
                        Some(check) if check.is_finished() => match check.await {
                            Ok(true) => {
                                format!("; its host {} answers (the agent does not)", s.peer.ip())
                            }
                            Ok(false) => {
                                format!("; its host {} does not answer either", s.peer.ip())
                            }
                            Err(_) => String::new(),
                        },
                        Some(check) => {
                            check.abort();
                            String::new()
                        }
                        None => String::new(),
                    };
                    s.abandon(format!(
                        "silent for {:.1}s and the probe went unanswered for {:.1}s{host}",
                        silent_ms as f64 / 1000.0,
                        probe_timeout.as_secs_f64()
                    ));
                }
            }
        }
        // Checks of robots no longer connected are dropped.
        host_checks.retain(|id, check| {
            let keep = fleet.sessions().is_connected(id);
            if !keep {
                check.abort();
            }
            keep
        });
        record_all(&fleet, records).await;
        trial_probes(&fleet).await;
        judge_network(&fleet, &mut damping, now);
        if now >= next_fail_check {
            next_fail_check = now + 1000;
            fail_long_offline(&fleet, &config, now).await;
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

/// Outage damping: the robots watched are the connected ones and those
/// silent without a connection; a change is logged, counted and published
/// (the API's `GET /api/v2/network`, the `network_degraded` gauge).
fn judge_network(fleet: &Fleet, damping: &mut Damping, now: i64) {
    let sessions = fleet.sessions();
    let watched = sessions.len() + damping.silent();
    match damping.assess(now, watched) {
        Some(NetworkChange::Degraded { silent, watched }) => {
            tracing::warn!(
                silent,
                watched,
                "network degraded: most robots went silent at once; holding automatic offline -> failed until they are back"
            );
            fleet.metrics().network_degraded.set(1);
        }
        Some(NetworkChange::Recovered { silent, watched }) => {
            tracing::info!(silent, watched, "network recovered");
            fleet.metrics().network_degraded.set(0);
        }
        None => return,
    }
    sessions.set_network(damping.state());
}

/// Records `failed` the robots `offline` for longer than
/// `offline_fail_after`, unless the network is degraded (then they wait:
/// an access point rebooting does not fail the fleet).
async fn fail_long_offline(fleet: &Fleet, config: &LivenessConfig, now: i64) {
    if config.offline_fail_after.is_zero() {
        return;
    }
    let limit = i64::try_from(config.offline_fail_after.as_millis()).unwrap_or(i64::MAX);
    let overdue = |robot: &crate::domain::Robot| {
        robot.state == LifecycleState::Offline
            && now - robot.last_state_change.timestamp_millis() > limit
    };
    if fleet.sessions().network().is_degraded() {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let held = fleet.cache().all().iter().filter(|r| overdue(r)).count();
            if held > 0 {
                tracing::debug!(
                    held,
                    "network degraded: robots offline longer than offline_fail_after are not failed"
                );
            }
        }
        return;
    }
    for robot in fleet.cache().all() {
        if !overdue(&robot) {
            continue;
        }
        let offline_ms = now - robot.last_state_change.timestamp_millis();
        let reason = format!(
            "offline for {:.0}s (offline_fail_after is {:?})",
            offline_ms as f64 / 1000.0,
            config.offline_fail_after
        );
        let ctx = Context::new("liveness");
        let input = Input::OfflineTooLong { reason };
        if let Err(e) = Box::pin(fleet.apply(robot.robot_id, input, &ctx)).await {
            tracing::warn!(robot_id = %robot.robot_id, error = %e, "could not record a long-offline robot as failed");
        }
    }
}

/// Sends a suspect session's agent a `Ping`: any answer (the result, a
/// heartbeat, a report) clears the suspicion. Not sent while the robot's
/// circuit is open (the probe's timeout then decides).
async fn probe(fleet: &Fleet, session: &Session) {
    if let Err(refused) = fleet
        .breakers()
        .allow(session.robot_id, chrono::Utc::now())
        .await
    {
        tracing::debug!(robot_id = %session.robot_id, retry_at = %refused.retry_at, "circuit open; probe not sent");
        return;
    }
    let command = Command {
        command_id: uuid::Uuid::new_v4(),
        kind: CommandKind::Ping,
    };
    if let Err(e) = session.send_command(crate::domain::decide::CommandIntent::Ping, command) {
        // A full queue is itself a sign of trouble: the probe's timeout
        // decides.
        tracing::debug!(robot_id = %session.robot_id, error = e, "probe not sent");
    }
    fleet.metrics().liveness_probes.inc();
}

/// Robots whose circuit is open but whose agent is connected (it came
/// back, or its commands failed) are probed once the open timeout has
/// passed: one `Ping` at a time, each answer a success of the half-open
/// breaker, until enough close it.
async fn trial_probes(fleet: &Fleet) {
    for id in fleet.breakers().tripped().into_keys() {
        let Some(session) = fleet.sessions().get(&id) else {
            continue;
        };
        if !session.is_suspect() && !session.awaits(crate::domain::decide::CommandIntent::Ping) {
            probe(fleet, &session).await;
        }
    }
}

/// Records the sweep's suspicions and clearings, a bounded number at once
/// (an outage can make hundreds of robots suspect in one sweep).
async fn record_all(fleet: &Fleet, records: Vec<Record>) {
    futures_util::stream::iter(records)
        .for_each_concurrent(SWEEP_WRITES, |record| async move {
            let (session, input) = match record {
                Record::Suspect(s, reason) => (s, Input::AgentSilent { reason }),
                Record::Cleared(s) => (s, Input::AgentHeardAgain),
            };
            let ctx = Context {
                actor: "liveness",
                correlation_id: Some(session.session_id),
                causation_id: None,
            };
            if let Err(e) = Box::pin(fleet.apply(session.robot_id, input, &ctx)).await {
                tracing::warn!(robot_id = %session.robot_id, error = %e, "could not record the agent's liveness");
            }
        })
        .await;
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

    fn config(heartbeat_ms: u64) -> LivenessConfig {
        LivenessConfig {
            timeout: Duration::from_secs(5),
            startup_grace: Duration::from_secs(15),
            heartbeat: Duration::from_millis(heartbeat_ms),
            detector: DetectorSettings::for_heartbeat(Duration::from_millis(heartbeat_ms)),
            offline_fail_after: Duration::from_secs(600),
            damping: DampingSettings::default(),
            host_port: 22,
        }
    }

    #[test]
    fn the_sweep_and_the_probe_follow_the_heartbeat_within_bounds() {
        let c = config(250);
        assert_eq!(
            c.period(),
            Duration::from_millis(62) + Duration::from_micros(500)
        );
        assert_eq!(c.probe_timeout(), Duration::from_millis(500));
        assert_eq!(config(10).period(), Duration::from_millis(20));
        assert_eq!(config(10).probe_timeout(), Duration::from_millis(500));
        assert_eq!(config(60_000).period(), Duration::from_secs(1));
        assert_eq!(config(60_000).probe_timeout(), Duration::from_secs(5));
    }

    /// At 250 ms heartbeats a robot that stops is suspect, probed and lost
    /// well within two seconds of its last heartbeat, counting the sweep's
    /// period, on a simulated clock.
    #[test]
    fn an_unplugged_robot_is_lost_within_two_seconds_at_250_ms_heartbeats() {
        use crate::domain::detector::Watch;
        let c = config(250);
        let mut w = Watch::new(0, c.heartbeat);
        for i in 1..=100 {
            w.arrival(i * 250);
        }
        let last = 100 * 250;
        let period = c.period().as_millis() as i64;
        let lost_at = (1..)
            .map(|k| last + k * period)
            .find(|&now| {
                matches!(
                    w.assess(now, &c.detector, c.probe_timeout()),
                    Step::Lost { .. }
                )
            })
            .unwrap();
        assert!(lost_at - last < 2_000, "lost after {} ms", lost_at - last);
    }
}
