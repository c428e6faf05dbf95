//! The agent's decisions, apart from its effects: when to send a report and
//! why, how to read the controller's answer to `Hello`, how long to wait
//! before reconnecting, and what a desired configuration asks to change.
//!
//! Everything here is plain data in, plain data out: no I/O, no clock (the
//! caller passes `now`), no randomness (the caller passes a uniform number),
//! so it is tested with plain `#[test]`s.

use kiwi_protocol::backoff::Backoff;
use kiwi_protocol::message::{
    AgentHealth, ControllerMessage, DesiredConfig, RejectReason, Welcome, WorkloadState,
};
use kiwi_protocol::version;
use std::time::{Duration, Instant};

/// The heartbeat interval used when a controller sends 0.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
/// The shortest heartbeat interval the agent accepts, whatever the
/// controller asks.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(10);

/// What the report decision looks at: the state a report carries apart from
/// its telemetry.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub health: AgentHealth,
    pub workload: WorkloadState,
    pub maintenance: bool,
}

/// Why a report is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportReason {
    /// Nothing was reported since the agent started.
    First,
    /// These parts of the state changed (`health`, `workload`,
    /// `maintenance`).
    Changed(Vec<&'static str>),
    /// The report interval passed with no change.
    Periodic,
}

impl ReportReason {
    pub fn describe(&self) -> String {
        match self {
            ReportReason::First => "first".into(),
            ReportReason::Changed(parts) => format!("changed: {}", parts.join(", ")),
            ReportReason::Periodic => "periodic".into(),
        }
    }
}

/// The parts of the state that differ between two observations.
pub fn changes(before: &Observed, after: &Observed) -> Vec<&'static str> {
    let mut out = Vec::new();
    if before.health != after.health {
        out.push("health");
    }
    if before.workload != after.workload {
        out.push("workload");
    }
    if before.maintenance != after.maintenance {
        out.push("maintenance");
    }
    out
}

/// Remembers what was last reported and when.
#[derive(Debug, Clone, Default)]
pub struct ReportTracker {
    last: Option<(Observed, Instant)>,
}

impl ReportTracker {
    /// Whether a report is due at `now` for `observed`: on the first
    /// observation, on a change, or when `interval` passed since the last.
    pub fn decide(
        &self,
        now: Instant,
        observed: &Observed,
        interval: Duration,
    ) -> Option<ReportReason> {
        let Some((last, at)) = &self.last else {
            return Some(ReportReason::First);
        };
        let changed = changes(last, observed);
        if !changed.is_empty() {
            Some(ReportReason::Changed(changed))
        } else if now.saturating_duration_since(*at) >= interval {
            Some(ReportReason::Periodic)
        } else {
            None
        }
    }

    /// Records that `observed` was reported at `now`.
    pub fn record(&mut self, now: Instant, observed: Observed) {
        self.last = Some((observed, now));
    }
}

/// The heartbeat interval to use for what the controller asked.
pub fn heartbeat_interval(ms: u32) -> Duration {
    if ms == 0 {
        DEFAULT_HEARTBEAT
    } else {
        Duration::from_millis(u64::from(ms)).max(MIN_HEARTBEAT)
    }
}

/// A connection without a frame read (or written) for this long is lost.
pub fn idle_timeout(heartbeat: Duration) -> Duration {
    heartbeat.saturating_mul(3)
}

/// The controller's answer to `Hello`.
#[derive(Debug, Clone, PartialEq)]
pub enum Handshake {
    Welcome(Welcome),
    Rejected {
        reason: RejectReason,
        retry_after: Option<Duration>,
    },
    /// Anything else breaks the protocol.
    Violation(String),
}

/// Reads the first message of a connection.
pub fn classify_handshake(message: ControllerMessage) -> Handshake {
    match message {
        ControllerMessage::Welcome(w) if version::can_decode(w.version) => Handshake::Welcome(w),
        ControllerMessage::Welcome(w) => Handshake::Violation(format!(
            "controller chose version {}, which this agent does not speak",
            w.version
        )),
        ControllerMessage::Reject(r) => Handshake::Rejected {
            reason: r.reason,
            retry_after: r
                .retry_after_ms
                .map(|ms| Duration::from_millis(u64::from(ms))),
        },
        ControllerMessage::Ack(_) => Handshake::Violation("Ack before Welcome".into()),
        ControllerMessage::Command(_) => Handshake::Violation("Command before Welcome".into()),
        ControllerMessage::Certificate(_) | ControllerMessage::RenewRefused(_) => {
            Handshake::Violation("certificate renewal before Welcome".into())
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEnd {
    /// The agent is shutting down.
    Shutdown,
    /// Connecting failed, or the connection broke.
    Lost { welcomed: bool, reason: String },
    /// The controller refused the agent (before or after `Welcome`).
    Rejected {
        welcomed: bool,
        reason: RejectReason,
        retry_after: Option<Duration>,
    },
}

/// The reconnection policy's memory: how many attempts failed in a row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reconnect {
    attempt: u32,
}

impl Reconnect {
    /// The wait before the next connection attempt after `end` (`None` when
    /// the agent is shutting down), given `unit` uniform in `[0, 1)`. A
    /// session that got a `Welcome` resets the attempt counter; a
    /// controller's retry-after is a floor.
    pub fn after(&mut self, end: &SessionEnd, backoff: &Backoff, unit: f64) -> Option<Duration> {
        let (welcomed, retry_after) = match end {
            SessionEnd::Shutdown => return None,
            SessionEnd::Lost { welcomed, .. } => (*welcomed, None),
            SessionEnd::Rejected {
                welcomed,
                retry_after,
                ..
            } => (*welcomed, *retry_after),
        };
        if welcomed {
            self.attempt = 0;
        }
        let delay = backoff.delay_with_retry_after(self.attempt, retry_after, unit);
        self.attempt = self.attempt.saturating_add(1);
        Some(delay)
    }

    /// Failed attempts in a row so far.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// What a desired configuration asks the agent to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reconcile {
    /// Enter (`true`) or leave (`false`) maintenance; `None`: already so.
    pub maintenance: Option<bool>,
    /// A new periodic report interval; `None`: keep the current one.
    pub report_interval: Option<Duration>,
}

/// Compares what the controller wants with what the agent is. Applying the
/// result and reconciling again gives an empty change: it is idempotent.
pub fn reconcile(desired: &DesiredConfig, maintenance: bool, interval: Duration) -> Reconcile {
    let wanted_interval = Duration::from_millis(u64::from(desired.report_interval_ms));
    Reconcile {
        maintenance: (desired.maintenance != maintenance).then_some(desired.maintenance),
        report_interval: (desired.report_interval_ms != 0 && wanted_interval != interval)
            .then_some(wanted_interval),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiwi_protocol::message::{Ack, HealthStatus, Reject};
    use kiwi_protocol::version::{CURRENT, ProtocolVersion};

    fn observed(status: HealthStatus, workload: WorkloadState, maintenance: bool) -> Observed {
        Observed {
            health: AgentHealth {
                status,
                reasons: if status == HealthStatus::Healthy {
                    vec![]
                } else {
                    vec!["hot".into()]
                },
            },
            workload,
            maintenance,
        }
    }

    #[test]
    fn reports_first_on_change_and_periodically() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(30);
        let fine = observed(HealthStatus::Healthy, WorkloadState::Running, false);
        let mut tracker = ReportTracker::default();
        assert_eq!(
            tracker.decide(t0, &fine, interval),
            Some(ReportReason::First)
        );
        tracker.record(t0, fine.clone());
        assert_eq!(
            tracker.decide(t0 + Duration::from_secs(1), &fine, interval),
            None
        );
        assert_eq!(
            tracker.decide(t0 + interval, &fine, interval),
            Some(ReportReason::Periodic)
        );
        let hot = observed(HealthStatus::Degraded, WorkloadState::Running, false);
        assert_eq!(
            tracker.decide(t0 + Duration::from_secs(1), &hot, interval),
            Some(ReportReason::Changed(vec!["health"]))
        );
        let stopped = observed(HealthStatus::Healthy, WorkloadState::Stopped, true);
        let reason = tracker
            .decide(t0 + Duration::from_secs(1), &stopped, interval)
            .unwrap();
        assert_eq!(
            reason,
            ReportReason::Changed(vec!["workload", "maintenance"])
        );
        assert_eq!(reason.describe(), "changed: workload, maintenance");
        // A different reason text is a change too.
        let mut other_reason = hot.clone();
        other_reason.health.reasons = vec!["cold".into()];
        assert_eq!(changes(&hot, &other_reason), vec!["health"]);
    }

    #[test]
    fn heartbeat_and_idle() {
        assert_eq!(heartbeat_interval(0), DEFAULT_HEARTBEAT);
        assert_eq!(heartbeat_interval(1), MIN_HEARTBEAT);
        assert_eq!(heartbeat_interval(250), Duration::from_millis(250));
        assert_eq!(
            idle_timeout(Duration::from_millis(250)),
            Duration::from_millis(750)
        );
    }

    #[test]
    fn handshake_answers() {
        let w = Welcome {
            session_id: uuid::Uuid::nil(),
            version: CURRENT,
            heartbeat_interval_ms: 100,
            config: DesiredConfig::default(),
        };
        assert_eq!(
            classify_handshake(ControllerMessage::Welcome(w.clone())),
            Handshake::Welcome(w.clone())
        );
        let foreign = Welcome {
            version: ProtocolVersion::new(9, 0),
            ..w
        };
        assert!(matches!(
            classify_handshake(ControllerMessage::Welcome(foreign)),
            Handshake::Violation(_)
        ));
        assert_eq!(
            classify_handshake(ControllerMessage::Reject(Reject {
                reason: RejectReason::Overloaded,
                retry_after_ms: Some(1500),
            })),
            Handshake::Rejected {
                reason: RejectReason::Overloaded,
                retry_after: Some(Duration::from_millis(1500)),
            }
        );
        assert!(matches!(
            classify_handshake(ControllerMessage::Ack(Ack { seq: 1 })),
            Handshake::Violation(_)
        ));
    }

    #[test]
    fn reconnect_backs_off_resets_after_welcome_and_honours_retry_after() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut r = Reconnect::default();
        let lost = |welcomed| SessionEnd::Lost {
            welcomed,
            reason: "x".into(),
        };
        // With unit just below 1 the delay is (almost) the ceiling.
        let u = 0.999_999;
        let d0 = r.after(&lost(false), &b, u).unwrap();
        let d1 = r.after(&lost(false), &b, u).unwrap();
        let d2 = r.after(&lost(false), &b, u).unwrap();
        assert!(d0 < d1 && d1 < d2, "{d0:?} {d1:?} {d2:?}");
        for _ in 0..10 {
            assert!(r.after(&lost(false), &b, u).unwrap() <= Duration::from_secs(1));
        }
        assert_eq!(r.after(&lost(true), &b, u).unwrap(), d0);
        assert_eq!(r.attempt(), 1);
        let rejected = SessionEnd::Rejected {
            welcomed: false,
            reason: RejectReason::Overloaded,
            retry_after: Some(Duration::from_secs(5)),
        };
        assert!(r.after(&rejected, &b, 0.0).unwrap() >= Duration::from_secs(5));
        assert!(r.after(&rejected, &b, u).unwrap() < Duration::from_secs(6));
        assert_eq!(r.after(&SessionEnd::Shutdown, &b, u), None);
    }

    #[test]
    fn reconcile_is_idempotent() {
        let interval = Duration::from_secs(30);
        let desired = DesiredConfig {
            maintenance: true,
            report_interval_ms: 5_000,
            settings: vec![],
        };
        let plan = reconcile(&desired, false, interval);
        assert_eq!(plan.maintenance, Some(true));
        assert_eq!(plan.report_interval, Some(Duration::from_secs(5)));
        assert_eq!(
            reconcile(&desired, true, Duration::from_secs(5)),
            Reconcile::default()
        );
        // A zero interval keeps the agent's own.
        let keep = DesiredConfig::default();
        assert_eq!(reconcile(&keep, false, interval), Reconcile::default());
        assert_eq!(reconcile(&keep, true, interval).maintenance, Some(false));
    }
}
