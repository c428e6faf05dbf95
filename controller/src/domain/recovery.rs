//! Recovery probes of offline robots, as decisions: which robots are due a
//! probe, and when failed probes in a row make an offline robot `failed`.
//!
//! A robot recorded `offline` has no agent connection to probe; its host is
//! probed instead (see `crate::recovery`), every `interval`. Each failure in
//! a row counts; any success starts the count again; a robot that is no
//! longer offline is forgotten. After `fail_after` failures in a row the
//! robot is to be recorded `failed`, except while the network is degraded
//! (outage damping): then the count goes on but nothing is failed until it
//! recovers. Time is passed in (milliseconds); nothing here reads a clock.

use kiwi_protocol::RobotId;
use std::collections::HashMap;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoverySettings {
    /// How often an offline robot is probed (zero: never).
    pub interval: Duration,
    /// Failed probes in a row that make an offline robot `failed` (zero:
    /// never, only `offline_fail_after` does).
    pub fail_after: u32,
}

impl Default for RecoverySettings {
    fn default() -> Self {
        RecoverySettings {
            interval: Duration::from_secs(15),
            fail_after: 0,
        }
    }
}

/// What a probe's outcome asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Nothing,
    /// Record the robot `failed`: this many probes in a row failed.
    Fail {
        failures: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Track {
    due_ms: i64,
    failures: u32,
}

/// Every offline robot's probing.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    settings: RecoverySettings,
    robots: HashMap<RobotId, Track>,
}

impl Recovery {
    pub fn new(settings: RecoverySettings) -> Recovery {
        Recovery {
            settings,
            robots: HashMap::new(),
        }
    }

    fn interval_ms(&self) -> i64 {
        i64::try_from(self.settings.interval.as_millis()).unwrap_or(i64::MAX)
    }

    /// The robots of `offline` (those offline now) due a probe at `now`.
    /// A robot seen offline for the first time is due one interval later;
    /// robots no longer offline are forgotten.
    pub fn due(&mut self, now: i64, offline: impl IntoIterator<Item = RobotId>) -> Vec<RobotId> {
        if self.settings.interval.is_zero() {
            self.robots.clear();
            return Vec::new();
        }
        let interval = self.interval_ms();
        let mut seen = HashMap::with_capacity(self.robots.len());
        let mut due = Vec::new();
        for id in offline {
            let mut track = self.robots.get(&id).copied().unwrap_or(Track {
                due_ms: now.saturating_add(interval),
                failures: 0,
            });
            if now >= track.due_ms {
                due.push(id);
                track.due_ms = now.saturating_add(interval);
            }
            seen.insert(id, track);
        }
        self.robots = seen;
        due
    }

    /// Records how `robot`'s probe went; `degraded` holds any `Fail`.
    pub fn record(&mut self, robot: RobotId, reachable: bool, degraded: bool) -> Verdict {
        let Some(track) = self.robots.get_mut(&robot) else {
            // No longer offline while the probe ran.
            return Verdict::Nothing;
        };
        if reachable {
            track.failures = 0;
            return Verdict::Nothing;
        }
        track.failures = track.failures.saturating_add(1);
        let over = self.settings.fail_after > 0 && track.failures >= self.settings.fail_after;
        if over && !degraded {
            Verdict::Fail {
                failures: track.failures,
            }
        } else {
            Verdict::Nothing
        }
    }

    /// Failed probes in a row of `robot` so far.
    pub fn failures(&self, robot: &RobotId) -> u32 {
        self.robots.get(robot).map_or(0, |t| t.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn robot(n: u128) -> RobotId {
        RobotId(Uuid::from_u128(n))
    }

    fn recovery(interval_ms: u64, fail_after: u32) -> Recovery {
        Recovery::new(RecoverySettings {
            interval: Duration::from_millis(interval_ms),
            fail_after,
        })
    }

    #[test]
    fn an_offline_robot_is_probed_every_interval_from_one_interval_on() {
        let mut r = recovery(1000, 3);
        let a = robot(1);
        assert!(r.due(0, [a]).is_empty(), "not at once");
        assert!(r.due(999, [a]).is_empty());
        assert_eq!(r.due(1000, [a]), [a]);
        assert!(r.due(1500, [a]).is_empty());
        assert_eq!(r.due(2000, [a]), [a]);
    }

    #[test]
    fn failures_in_a_row_fail_the_robot_and_a_success_starts_again() {
        let mut r = recovery(1000, 3);
        let a = robot(1);
        r.due(0, [a]);
        assert_eq!(r.record(a, false, false), Verdict::Nothing);
        assert_eq!(r.record(a, false, false), Verdict::Nothing);
        assert_eq!(r.record(a, true, false), Verdict::Nothing);
        assert_eq!(r.failures(&a), 0);
        assert_eq!(r.record(a, false, false), Verdict::Nothing);
        assert_eq!(r.record(a, false, false), Verdict::Nothing);
        assert_eq!(r.record(a, false, false), Verdict::Fail { failures: 3 });
    }

    #[test]
    fn a_degraded_network_holds_the_verdict_until_it_recovers() {
        let mut r = recovery(1000, 2);
        let a = robot(1);
        r.due(0, [a]);
        for _ in 0..5 {
            assert_eq!(r.record(a, false, true), Verdict::Nothing);
        }
        assert_eq!(r.failures(&a), 5, "the count goes on");
        assert_eq!(r.record(a, false, false), Verdict::Fail { failures: 6 });
    }

    #[test]
    fn a_robot_back_online_is_forgotten_and_starts_afresh() {
        let mut r = recovery(1000, 2);
        let (a, b) = (robot(1), robot(2));
        r.due(0, [a, b]);
        r.record(a, false, false);
        // `a` came back: only `b` is offline now.
        assert!(r.due(500, [b]).is_empty());
        assert_eq!(r.failures(&a), 0);
        assert_eq!(r.record(a, false, false), Verdict::Nothing, "not tracked");
        // Offline again: counted from zero, due one interval later.
        assert!(r.due(600, [a, b]).is_empty());
        assert_eq!(r.due(1600, [a, b]), [a, b]);
    }

    #[test]
    fn zero_interval_or_threshold_turn_parts_off() {
        let mut off = recovery(0, 3);
        assert!(off.due(10_000, [robot(1)]).is_empty());
        let mut never = recovery(1000, 0);
        never.due(0, [robot(1)]);
        for _ in 0..100 {
            assert_eq!(never.record(robot(1), false, false), Verdict::Nothing);
        }
    }
}
