//! Outage damping: when many robots go silent at once, the network is the
//! likelier culprit than the robots.
//!
//! A Wi-Fi access point that reboots silences the whole fleet for a minute.
//! Without damping, every robot would be recorded `offline` and then
//! `failed`, and an operator would come back to a fleet to re-provision.
//! With it, the controller notices that more than a share of its robots
//! (default half) went silent within a short window, declares the network
//! degraded, keeps probing, and holds the automatic `offline → failed`
//! transitions until enough robots are back.
//!
//! [`Damping`] is the decision alone: the caller tells it which robots went
//! silent and which came back, with `now`, and how many robots it watches;
//! it answers whether the network is degraded. Recovery has hysteresis:
//! the network is healthy again only when the robots still silent are at
//! most half the share that tripped it, so a fleet coming back in waves
//! does not flap.

use kiwi_protocol::RobotId;
use std::collections::HashMap;
use std::time::Duration;

/// When the network is declared degraded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DampingSettings {
    /// The share of the watched robots (0 to 1) that must go silent within
    /// `window` (more than this share) to declare the network degraded.
    pub share: f64,
    /// How close together the silences must be.
    pub window: Duration,
    /// Fewer watched robots than this never trip damping (in a fleet of
    /// two, one robot failing is not an outage).
    pub min_robots: usize,
}

impl Default for DampingSettings {
    fn default() -> Self {
        DampingSettings {
            share: 0.5,
            window: Duration::from_secs(10),
            min_robots: 3,
        }
    }
}

impl DampingSettings {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.share.is_finite() && self.share > 0.0 && self.share < 1.0) {
            return Err(format!(
                "damping share must be between 0 and 1, exclusive (is {})",
                self.share
            ));
        }
        if self.window.is_zero() {
            return Err("damping window must be longer than 0".into());
        }
        Ok(())
    }
}

/// The network as damping sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkState {
    #[default]
    Normal,
    /// Declared at `since_ms`, when `silent` of `watched` robots were silent.
    Degraded {
        since_ms: i64,
        silent: usize,
        watched: usize,
    },
}

impl NetworkState {
    pub fn is_degraded(&self) -> bool {
        matches!(self, NetworkState::Degraded { .. })
    }
}

/// What an update changed, for the log, the metrics and the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkChange {
    Degraded { silent: usize, watched: usize },
    Recovered { silent: usize, watched: usize },
}

/// The damping state of one controller.
#[derive(Debug, Clone)]
pub struct Damping {
    settings: DampingSettings,
    /// Robots silent now, with when each went silent.
    silent: HashMap<RobotId, i64>,
    state: NetworkState,
}

impl Damping {
    pub fn new(settings: DampingSettings) -> Damping {
        Damping {
            settings,
            silent: HashMap::new(),
            state: NetworkState::Normal,
        }
    }

    pub fn state(&self) -> NetworkState {
        self.state
    }

    /// Robots silent now.
    pub fn silent(&self) -> usize {
        self.silent.len()
    }

    /// `robot` went silent at `now_ms` (kept from its first silence until
    /// it is heard from again).
    pub fn went_silent(&mut self, robot: RobotId, now_ms: i64) {
        self.silent.entry(robot).or_insert(now_ms);
    }

    /// `robot` was heard from again (or left the fleet).
    pub fn heard_from(&mut self, robot: &RobotId) {
        self.silent.remove(robot);
    }

    /// Re-evaluates at `now_ms` with `watched` robots expected to be heard
    /// from; returns the change, if any.
    pub fn assess(&mut self, now_ms: i64, watched: usize) -> Option<NetworkChange> {
        let watched = watched.max(self.silent.len());
        match self.state {
            NetworkState::Normal => {
                if watched < self.settings.min_robots {
                    return None;
                }
                let window = i64::try_from(self.settings.window.as_millis()).unwrap_or(i64::MAX);
                let recent = self
                    .silent
                    .values()
                    .filter(|&&at| now_ms.saturating_sub(at) <= window)
                    .count();
                if recent as f64 > self.settings.share * watched as f64 {
                    let silent = self.silent.len();
                    self.state = NetworkState::Degraded {
                        since_ms: now_ms,
                        silent,
                        watched,
                    };
                    return Some(NetworkChange::Degraded { silent, watched });
                }
                None
            }
            NetworkState::Degraded { .. } => {
                let silent = self.silent.len();
                if silent as f64 <= self.settings.share / 2.0 * watched as f64 {
                    self.state = NetworkState::Normal;
                    return Some(NetworkChange::Recovered { silent, watched });
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiwi_protocol::HardwareId;

    fn robot(i: usize) -> RobotId {
        RobotId::from_hardware(&HardwareId::Configured(format!("r{i}")))
    }

    fn damping() -> Damping {
        Damping::new(DampingSettings::default())
    }

    #[test]
    fn a_few_robots_going_silent_is_not_an_outage() {
        let mut d = damping();
        for i in 0..5 {
            d.went_silent(robot(i), 1_000);
        }
        assert_eq!(d.assess(1_000, 10), None);
        assert!(!d.state().is_degraded());
    }

    #[test]
    fn more_than_half_silent_within_the_window_is_an_outage() {
        let mut d = damping();
        for i in 0..6 {
            d.went_silent(robot(i), 1_000 + i as i64 * 500);
        }
        assert_eq!(
            d.assess(4_000, 10),
            Some(NetworkChange::Degraded {
                silent: 6,
                watched: 10
            })
        );
        assert!(d.state().is_degraded());
        // Asking again changes nothing.
        assert_eq!(d.assess(4_100, 10), None);
    }

    #[test]
    fn silences_spread_over_more_than_the_window_are_separate_failures() {
        let mut d = damping();
        for i in 0..6 {
            // One robot every 5 s: never more than 3 within 10 s.
            d.went_silent(robot(i), i as i64 * 5_000);
        }
        assert_eq!(d.assess(25_000, 10), None);
    }

    #[test]
    fn recovery_needs_most_robots_back_not_just_one() {
        let mut d = damping();
        for i in 0..8 {
            d.went_silent(robot(i), 1_000);
        }
        assert!(d.assess(1_000, 10).is_some());
        // Half come back: 4 of 10 still silent, more than a quarter.
        for i in 0..4 {
            d.heard_from(&robot(i));
        }
        assert_eq!(d.assess(5_000, 10), None);
        assert!(d.state().is_degraded());
        // Two more: 2 of 10, at most a quarter.
        d.heard_from(&robot(4));
        d.heard_from(&robot(5));
        assert_eq!(
            d.assess(6_000, 10),
            Some(NetworkChange::Recovered {
                silent: 2,
                watched: 10
            })
        );
        assert!(!d.state().is_degraded());
    }

    #[test]
    fn a_tiny_fleet_never_trips_damping() {
        let mut d = damping();
        d.went_silent(robot(0), 0);
        d.went_silent(robot(1), 0);
        assert_eq!(d.assess(0, 2), None);
    }

    #[test]
    fn a_robot_silent_twice_counts_once_from_its_first_silence() {
        let mut d = damping();
        d.went_silent(robot(0), 0);
        d.went_silent(robot(0), 60_000);
        for i in 1..3 {
            d.went_silent(robot(i), 60_000);
        }
        // Robot 0 went silent long before the window: 2 recent of 4 is not
        // more than half.
        assert_eq!(d.assess(60_000, 4), None);
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        assert!(DampingSettings::default().validate().is_ok());
        for share in [0.0, 1.0, -0.5, f64::NAN] {
            let s = DampingSettings {
                share,
                ..DampingSettings::default()
            };
            assert!(s.validate().is_err(), "{share}");
        }
        let s = DampingSettings {
            window: Duration::ZERO,
            ..DampingSettings::default()
        };
        assert!(s.validate().is_err());
    }
}
