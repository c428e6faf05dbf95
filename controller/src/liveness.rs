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
//! The decisions are a pure step on the caller's clock ([`Sweep`]: a
//! verdict per session, then the duties due; each session's own
//! [`crate::domain::detector::Watch::assess`]); [`run`] is the timer task
//! that asks it and does what it says.

use crate::breakers::Outcome;
use crate::domain::damping::{Damping, DampingSettings, NetworkChange, NetworkState};
use crate::domain::detector::{DetectorSettings, Step};
use crate::domain::{Input, LifecycleState, Robot};
use crate::fleet::{Context, Parts};
use crate::sessions::{Session, now_ms};
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

/// How long `robot` has been `offline` at `now_ms`, when that is longer
/// than `after` (the `offline_fail_after` setting).
pub fn long_offline_ms(robot: &Robot, after: Duration, now_ms: i64) -> Option<i64> {
    let offline_ms = now_ms - robot.last_state_change.timestamp_millis();
    let limit = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
    (robot.state == LifecycleState::Offline && offline_ms > limit).then_some(offline_ms)
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

// ---------------------------------------------------------------------------
// The decisions: a pure step, on the caller's clock.

/// What the sweep decided about one connected session.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Silent past the ceiling (`timeout`): close the connection.
    Abandon { reason: String },
    /// An unusual silence: record it suspect, probe it, check its host.
    Suspect { reason: String },
    /// Heard from again after being suspect: record it.
    Cleared,
    /// The probe went unanswered: count it, close the connection.
    Lost { silent_ms: i64 },
}

/// What the sweep asks for once every session was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Duties {
    /// The network's state changed (log it, count it, publish it).
    pub network: Option<NetworkChange>,
    /// Time to look for robots offline longer than `offline_fail_after`
    /// and fail them (at most once a second; never while the network is
    /// degraded).
    pub fail_long_offline: bool,
    /// It was time, but the network is degraded: they are held (and the
    /// log says how many).
    pub long_offline_held: bool,
    /// The start-up grace just ended: robots that expect an agent and have
    /// none are lost (once).
    pub grace_over: bool,
}

/// The sweep's memory between ticks: outage damping, when the start-up
/// grace ends, when long-offline robots are next looked for. Pure: every
/// call takes `now` (milliseconds since the Unix epoch).
#[derive(Debug)]
pub struct Sweep {
    config: LivenessConfig,
    started_ms: i64,
    grace_over: bool,
    damping: Damping,
    next_fail_check_ms: i64,
}

impl Sweep {
    pub fn new(config: LivenessConfig, started_ms: i64) -> Sweep {
        Sweep {
            damping: Damping::new(config.damping),
            config,
            started_ms,
            grace_over: false,
            next_fail_check_ms: started_ms,
        }
    }

    /// One connected session at `now_ms`, last heard from at
    /// `last_seen_ms`. `assess` is its failure detector's step, asked only
    /// when the session is not already past the ceiling.
    pub fn session(
        &mut self,
        now_ms: i64,
        robot_id: RobotId,
        last_seen_ms: i64,
        suspect: bool,
        assess: impl FnOnce() -> Step,
    ) -> Option<Verdict> {
        if is_silent(last_seen_ms, now_ms, self.config.timeout) {
            let silent_ms = now_ms.saturating_sub(last_seen_ms);
            return Some(Verdict::Abandon {
                reason: format!("no heartbeat for {:.1}s", silent_ms as f64 / 1000.0),
            });
        }
        match assess() {
            Step::Nothing => {
                if !suspect {
                    self.damping.heard_from(&robot_id);
                }
                None
            }
            Step::Suspect { phi, silent_ms } => {
                self.damping.went_silent(robot_id, now_ms);
                Some(Verdict::Suspect {
                    reason: format!(
                        "silent for {:.1}s (phi {phi:.1}); probing",
                        silent_ms as f64 / 1000.0
                    ),
                })
            }
            Step::Cleared => {
                self.damping.heard_from(&robot_id);
                Some(Verdict::Cleared)
            }
            Step::Lost { silent_ms } => Some(Verdict::Lost { silent_ms }),
        }
    }

    /// After every session was seen: what else is due at `now_ms`, with
    /// `connected` sessions open.
    pub fn duties(&mut self, now_ms: i64, connected: usize) -> Duties {
        // The robots watched are the connected ones and those silent
        // without a connection.
        let watched = connected + self.damping.silent();
        let network = self.damping.assess(now_ms, watched);
        let look = now_ms >= self.next_fail_check_ms && !self.config.offline_fail_after.is_zero();
        if now_ms >= self.next_fail_check_ms {
            self.next_fail_check_ms = now_ms + 1000;
        }
        let held = self.damping.state().is_degraded();
        let grace_over =
            !self.grace_over && is_silent(self.started_ms, now_ms, self.config.startup_grace);
        self.grace_over |= grace_over;
        Duties {
            network,
            fail_long_offline: look && !held,
            long_offline_held: look && held,
            grace_over,
        }
    }

    /// The network as damping sees it now.
    pub fn network(&self) -> NetworkState {
        self.damping.state()
    }
}

// ---------------------------------------------------------------------------
// The effects: a timer task that asks the sweep and does what it says.

/// What one session's verdict asks the sweep to record.
enum Record {
    Suspect(Session, String),
    Cleared(Session),
}

/// Runs the sweeps until `cancel`.
pub async fn run(p: Parts, config: LivenessConfig, cancel: CancellationToken) {
    let p = &p;
    let mut tick = tokio::time::interval(config.period());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let probe_timeout = config.probe_timeout();
    let mut sweep = Sweep::new(config.clone(), now_ms());
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
        p.sessions.for_each(|s| {
            let verdict = sweep.session(now, s.robot_id, s.last_seen_ms(), s.is_suspect(), || {
                s.assess(now, &config.detector, probe_timeout)
            });
            if let Some(verdict) = verdict {
                due.push((s.clone(), verdict));
            }
        });
        for (s, verdict) in due {
            match verdict {
                Verdict::Abandon { reason } => s.abandon(reason),
                Verdict::Suspect { reason } => {
                    probe(p, &s).await;
                    let host = SocketAddr::new(s.peer.ip(), config.host_port);
                    host_checks.insert(
                        s.robot_id,
                        // Done before the probe's own timeout.
                        tokio::spawn(crate::recovery::host_answers(host, probe_timeout * 3 / 4)),
                    );
                    tracing::info!(robot_id = %s.robot_id, reason, "agent suspect");
                    p.metrics.liveness_suspected.inc();
                    records.push(Record::Suspect(s, reason));
                }
                Verdict::Cleared => {
                    // The probe's own result (a command result) is what
                    // the circuit breaker counts as a success.
                    if let Some(check) = host_checks.remove(&s.robot_id) {
                        check.abort();
                    }
                    tracing::info!(robot_id = %s.robot_id, "suspect agent answered");
                    records.push(Record::Cleared(s));
                }
                Verdict::Lost { silent_ms } => {
                    p.metrics.liveness_confirmed.inc();
                    p.breakers
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
            let keep = p.sessions.is_connected(id);
            if !keep {
                check.abort();
            }
            keep
        });
        record_all(p, records).await;
        trial_probes(p).await;
        let duties = sweep.duties(now, p.sessions.len());
        if let Some(change) = duties.network {
            publish_network(p, change, sweep.network());
        }
        if duties.fail_long_offline {
            fail_long_offline(p, &config, now).await;
        }
        if duties.long_offline_held {
            log_long_offline_held(p, &config, now);
        }
        for robot_id in p.sessions.take_overdue_absences(now) {
            if !p.sessions.is_connected(&robot_id) {
                lose(p, robot_id, "did not return from planned downtime".into()).await;
            }
        }
        if duties.grace_over {
            for robot in p.cache.all() {
                let id = robot.robot_id;
                if robot.state.expects_presence()
                    && !p.sessions.is_connected(&id)
                    && !p.sessions.is_planned_absent(&id)
                {
                    lose(
                        p,
                        id,
                        "no agent connection since the controller started".into(),
                    )
                    .await;
                }
            }
        }
    }
}

/// A change of the network's state (outage damping) is logged, counted
/// and published (the API's `GET /api/v2/network`, the `network_degraded`
/// gauge).
fn publish_network(p: &Parts, change: NetworkChange, state: NetworkState) {
    match change {
        NetworkChange::Degraded { silent, watched } => {
            tracing::warn!(
                silent,
                watched,
                "network degraded: most robots went silent at once; holding automatic offline -> failed until they are back"
            );
            p.metrics.network_degraded.set(1);
        }
        NetworkChange::Recovered { silent, watched } => {
            tracing::info!(silent, watched, "network recovered");
            p.metrics.network_degraded.set(0);
        }
    }
    p.sessions.set_network(state);
}

/// Records `failed` the robots `offline` for longer than
/// `offline_fail_after`, unless the network is degraded (then they wait:
/// an access point rebooting does not fail the fleet).
async fn fail_long_offline(p: &Parts, config: &LivenessConfig, now: i64) {
    for robot in p.cache.all() {
        let Some(offline_ms) = long_offline_ms(&robot, config.offline_fail_after, now) else {
            continue;
        };
        let reason = format!(
            "offline for {:.0}s (offline_fail_after is {:?})",
            offline_ms as f64 / 1000.0,
            config.offline_fail_after
        );
        let ctx = Context::new("liveness");
        let input = Input::OfflineTooLong { reason };
        if let Err(e) = Box::pin(p.fleet.apply(robot.robot_id, input, &ctx)).await {
            tracing::warn!(robot_id = %robot.robot_id, error = %e, "could not record a long-offline robot as failed");
        }
    }
}

/// Says (debug) how many robots offline longer than `offline_fail_after`
/// a degraded network holds from being failed.
fn log_long_offline_held(p: &Parts, config: &LivenessConfig, now: i64) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let held = p
        .cache
        .all()
        .iter()
        .filter(|r| long_offline_ms(r, config.offline_fail_after, now).is_some())
        .count();
    if held > 0 {
        tracing::debug!(
            held,
            "network degraded: robots offline longer than offline_fail_after are not failed"
        );
    }
}

/// Sends a suspect session's agent a `Ping`: any answer (the result, a
/// heartbeat, a report) clears the suspicion. Not sent while the robot's
/// circuit is open (the probe's timeout then decides).
async fn probe(p: &Parts, session: &Session) {
    if let Err(refused) = p.breakers.allow(session.robot_id, chrono::Utc::now()).await {
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
    p.metrics.liveness_probes.inc();
}

/// Robots whose circuit is open but whose agent is connected (it came
/// back, or its commands failed) are probed once the open timeout has
/// passed: one `Ping` at a time, each answer a success of the half-open
/// breaker, until enough close it.
async fn trial_probes(p: &Parts) {
    for id in p.breakers.tripped().into_keys() {
        let Some(session) = p.sessions.get(&id) else {
            continue;
        };
        if !session.is_suspect() && !session.awaits(crate::domain::decide::CommandIntent::Ping) {
            probe(p, &session).await;
        }
    }
}

/// Records the sweep's suspicions and clearings, a bounded number at once
/// (an outage can make hundreds of robots suspect in one sweep).
async fn record_all(p: &Parts, records: Vec<Record>) {
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
            if let Err(e) = Box::pin(p.fleet.apply(session.robot_id, input, &ctx)).await {
                tracing::warn!(robot_id = %session.robot_id, error = %e, "could not record the agent's liveness");
            }
        })
        .await;
}

async fn lose(p: &Parts, robot_id: kiwi_protocol::RobotId, reason: String) {
    let ctx = Context::new("liveness");
    if let Err(e) = p.fleet.lose_if_absent(robot_id, reason, &ctx).await {
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

    #[test]
    fn only_robots_offline_longer_than_the_setting_are_long_offline() {
        use crate::store::conformance::{append, discovered};
        use chrono::{TimeZone, Utc};
        let mut robot = append(None, id(1), vec![discovered(1)]).robot;
        robot.last_state_change = Utc.timestamp_millis_opt(10_000).unwrap();
        let after = Duration::from_secs(600);
        let limit = 10_000 + 600_000;
        assert_eq!(
            long_offline_ms(&robot, after, limit + 1),
            None,
            "not offline"
        );
        robot.state = LifecycleState::Offline;
        assert_eq!(long_offline_ms(&robot, after, limit), None);
        assert_eq!(long_offline_ms(&robot, after, limit + 1), Some(600_001));
    }

    fn id(n: u128) -> RobotId {
        RobotId(uuid::Uuid::from_u128(n))
    }

    /// A session past the ceiling is abandoned without asking its
    /// detector; the detector's steps become verdicts with their reasons.
    #[test]
    fn each_session_gets_the_verdict_its_silence_calls_for() {
        let mut sweep = Sweep::new(config(250), 0);
        let now = 100_000;
        let not_asked = || -> Step { panic!("a session past the ceiling is not assessed") };
        assert_eq!(
            sweep.session(now, id(1), now - 5_001, false, not_asked),
            Some(Verdict::Abandon {
                reason: "no heartbeat for 5.0s".into()
            })
        );
        assert_eq!(
            sweep.session(now, id(2), now - 100, false, || Step::Nothing),
            None
        );
        assert_eq!(
            sweep.session(now, id(3), now - 900, false, || Step::Suspect {
                phi: 9.25,
                silent_ms: 900
            }),
            Some(Verdict::Suspect {
                reason: "silent for 0.9s (phi 9.2); probing".into()
            })
        );
        assert_eq!(
            sweep.session(now, id(3), now - 10, true, || Step::Cleared),
            Some(Verdict::Cleared)
        );
        assert_eq!(
            sweep.session(now, id(4), now - 1_500, true, || Step::Lost {
                silent_ms: 1_500
            }),
            Some(Verdict::Lost { silent_ms: 1_500 })
        );
    }

    /// Most robots suspect at once degrade the network: robots offline too
    /// long are not failed meanwhile; once they are heard from again it
    /// recovers. Long-offline robots are looked for once a second, the end
    /// of the start-up grace is announced once.
    #[test]
    fn duties_follow_the_clock_and_the_network() {
        let c = config(250);
        let grace = c.startup_grace.as_millis() as i64;
        let mut sweep = Sweep::new(c, 0);
        let period = 62;
        let mut now = 0;
        let first = sweep.duties(now, 10);
        assert_eq!(
            first,
            Duties {
                network: None,
                fail_long_offline: true,
                long_offline_held: false,
                grace_over: false
            }
        );
        now += period;
        assert!(!sweep.duties(now, 10).fail_long_offline, "once a second");
        now = 1_000;
        assert!(sweep.duties(now, 10).fail_long_offline);

        // Six of ten robots go silent in one sweep, and their probes go
        // unanswered.
        now = 2_000;
        for n in 0..6 {
            let verdict = sweep.session(now, id(n), now - 900, false, || Step::Suspect {
                phi: 9.0,
                silent_ms: 900,
            });
            assert!(matches!(verdict, Some(Verdict::Suspect { .. })));
        }
        // While their connections are open they count twice (connected
        // and silent); once closed, six of ten watched are silent.
        assert_eq!(sweep.duties(now, 10).network, None);
        now += period;
        let degraded = sweep.duties(now, 4);
        assert_eq!(
            degraded.network,
            Some(NetworkChange::Degraded {
                silent: 6,
                watched: 10
            })
        );
        assert!(sweep.network().is_degraded());
        now = 3_500;
        let held = sweep.duties(now, 4);
        assert!(!held.fail_long_offline, "held while degraded");
        assert!(held.long_offline_held);

        // They answer again.
        for n in 0..6 {
            assert_eq!(
                sweep.session(now, id(n), now - 10, true, || Step::Cleared),
                Some(Verdict::Cleared)
            );
        }
        let recovered = sweep.duties(now, 10);
        assert!(
            matches!(recovered.network, Some(NetworkChange::Recovered { .. })),
            "{recovered:?}"
        );
        assert_eq!(sweep.network(), NetworkState::Normal);
        assert!(!recovered.fail_long_offline, "looked at 3.5 s, held");
        assert!(sweep.duties(4_500, 10).fail_long_offline, "a second later");

        // The grace ends once.
        assert!(!sweep.duties(grace, 10).grace_over);
        assert!(sweep.duties(grace + 1, 10).grace_over);
        assert!(!sweep.duties(grace + 2_000, 10).grace_over);
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
