//! The circuit breaker: closed, open, half-open, as a plain state machine.
//!
//! A breaker guards everything the controller does to one robot or address
//! (probes, SSH logins, commands) so that a broken host is not hammered:
//!
//! - **closed**: calls go through; `failure_threshold` consecutive failures
//!   open it (a success resets the count);
//! - **open**: calls are refused at once until `open_timeout` has passed
//!   since it opened; the first call after that moves it to half-open;
//! - **half-open**: trial calls go through; `success_threshold` consecutive
//!   successes close it, any failure opens it again, and so does a half-open
//!   period that has not closed within `half_open_timeout` (a host that
//!   answers too rarely to prove itself is treated as still broken).
//!
//! Like everything in [`crate::domain`], it reads no clock: the caller
//! passes `now` in, an [`std::time::Instant`] in a running controller or a
//! simulated one in tests (any [`Moment`]). Its state is a value
//! ([`BreakerState`]) that the store can persist (`circuit_breakers`).

use std::time::{Duration, Instant};

/// A point in time the breaker can compute with: [`Instant`], or a
/// simulated or persisted clock.
pub trait Moment: Copy + Ord {
    /// This moment plus `d`.
    fn plus(self, d: Duration) -> Self;
}

impl Moment for Instant {
    fn plus(self, d: Duration) -> Self {
        self.checked_add(d).unwrap_or(self)
    }
}

impl Moment for chrono::DateTime<chrono::Utc> {
    fn plus(self, d: Duration) -> Self {
        chrono::TimeDelta::from_std(d)
            .ok()
            .and_then(|d| self.checked_add_signed(d))
            .unwrap_or(self)
    }
}

/// The thresholds and timeouts of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open a closed breaker (at least 1).
    pub failure_threshold: u32,
    /// Consecutive successes that close a half-open breaker (at least 1).
    pub success_threshold: u32,
    /// How long an open breaker refuses before it lets a trial call through.
    pub open_timeout: Duration,
    /// How long a half-open breaker may take to prove the host healthy
    /// before it opens again.
    pub half_open_timeout: Duration,
}

impl Default for BreakerSettings {
    /// The original design's defaults: 5 failures, 3 successes, 30 s open,
    /// 60 s half-open.
    fn default() -> Self {
        BreakerSettings {
            failure_threshold: 5,
            success_threshold: 3,
            open_timeout: Duration::from_secs(30),
            half_open_timeout: Duration::from_secs(60),
        }
    }
}

/// Where a breaker is, with what each state needs to remember.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState<T> {
    /// Calls go through; `failures` consecutive failures so far.
    Closed { failures: u32 },
    /// Calls are refused until `opened_at + open_timeout`.
    Open { opened_at: T },
    /// Trial calls go through; `successes` consecutive successes since
    /// `since`.
    HalfOpen { since: T, successes: u32 },
}

impl<T> BreakerState<T> {
    /// The state's name as stored and shown: `closed`, `open`, `half_open`.
    pub fn as_str(&self) -> &'static str {
        match self {
            BreakerState::Closed { .. } => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }
}

/// A call the breaker refused, and when it will let one through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused<T> {
    /// The earliest moment a trial call will be let through.
    pub retry_at: T,
}

/// One circuit breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker<T = Instant> {
    settings: BreakerSettings,
    state: BreakerState<T>,
}

impl<T: Moment> Breaker<T> {
    /// A closed breaker. Thresholds of 0 are taken as 1.
    pub fn new(settings: BreakerSettings) -> Self {
        Self::restore(settings, BreakerState::Closed { failures: 0 })
    }

    /// A breaker in a persisted state.
    pub fn restore(mut settings: BreakerSettings, state: BreakerState<T>) -> Self {
        settings.failure_threshold = settings.failure_threshold.max(1);
        settings.success_threshold = settings.success_threshold.max(1);
        Breaker { settings, state }
    }

    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    /// The state as of the last call (an open breaker whose timeout has
    /// passed stays `Open` until [`Breaker::allow`] is asked).
    pub fn state(&self) -> BreakerState<T> {
        self.state
    }

    /// Whether a call may go out at `now`. An open breaker past its timeout
    /// turns half-open and lets this call through as a trial; a half-open
    /// breaker past its half-open timeout opens again and refuses.
    pub fn allow(&mut self, now: T) -> Result<(), Refused<T>> {
        match self.state {
            BreakerState::Closed { .. } => Ok(()),
            BreakerState::Open { opened_at } => {
                let retry_at = opened_at.plus(self.settings.open_timeout);
                if now >= retry_at {
                    self.state = BreakerState::HalfOpen {
                        since: now,
                        successes: 0,
                    };
                    Ok(())
                } else {
                    Err(Refused { retry_at })
                }
            }
            BreakerState::HalfOpen { since, .. } => {
                if now >= since.plus(self.settings.half_open_timeout) {
                    self.open(now);
                    Err(Refused {
                        retry_at: now.plus(self.settings.open_timeout),
                    })
                } else {
                    Ok(())
                }
            }
        }
    }

    /// A call that went out succeeded.
    pub fn record_success(&mut self, _now: T) {
        self.state = match self.state {
            BreakerState::Closed { .. } => BreakerState::Closed { failures: 0 },
            BreakerState::HalfOpen { since, successes } => {
                let successes = successes.saturating_add(1);
                if successes >= self.settings.success_threshold {
                    BreakerState::Closed { failures: 0 }
                } else {
                    BreakerState::HalfOpen { since, successes }
                }
            }
            // A call let through before the breaker opened came back late:
            // it proves little, the breaker stays open.
            open @ BreakerState::Open { .. } => open,
        };
    }

    /// A call that went out failed.
    pub fn record_failure(&mut self, now: T) {
        match self.state {
            BreakerState::Closed { failures } => {
                let failures = failures.saturating_add(1);
                if failures >= self.settings.failure_threshold {
                    self.open(now);
                } else {
                    self.state = BreakerState::Closed { failures };
                }
            }
            BreakerState::HalfOpen { .. } => self.open(now),
            BreakerState::Open { .. } => {}
        }
    }

    /// An operator's reset: closed, with no failures counted.
    pub fn reset(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
    }

    fn open(&mut self, now: T) {
        self.state = BreakerState::Open { opened_at: now };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated clock: seconds since the test began.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    struct T(Duration);

    impl Moment for T {
        fn plus(self, d: Duration) -> Self {
            T(self.0 + d)
        }
    }

    fn at(secs: u64) -> T {
        T(Duration::from_secs(secs))
    }

    fn breaker() -> Breaker<T> {
        Breaker::new(BreakerSettings::default())
    }

    #[test]
    fn defaults_are_the_original_designs() {
        let s = BreakerSettings::default();
        assert_eq!((s.failure_threshold, s.success_threshold), (5, 3));
        assert_eq!(s.open_timeout, Duration::from_secs(30));
        assert_eq!(s.half_open_timeout, Duration::from_secs(60));
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let mut b = breaker();
        for _ in 0..4 {
            assert_eq!(b.allow(at(0)), Ok(()));
            b.record_failure(at(0));
        }
        // A success in between resets the count.
        b.record_success(at(1));
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
        for i in 0..5 {
            assert_eq!(b.allow(at(2)), Ok(()));
            b.record_failure(at(2));
            assert_eq!(b.state().as_str(), if i < 4 { "closed" } else { "open" });
        }
        assert_eq!(b.allow(at(3)), Err(Refused { retry_at: at(32) }));
        assert_eq!(b.allow(at(31)), Err(Refused { retry_at: at(32) }));
    }

    #[test]
    fn half_open_closes_after_enough_successes() {
        let mut b = breaker();
        for _ in 0..5 {
            b.record_failure(at(0));
        }
        assert_eq!(b.allow(at(30)), Ok(()));
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen {
                since: at(30),
                successes: 0
            }
        );
        b.record_success(at(30));
        assert_eq!(b.allow(at(31)), Ok(()));
        b.record_success(at(31));
        assert_eq!(b.state().as_str(), "half_open");
        assert_eq!(b.allow(at(32)), Ok(()));
        b.record_success(at(32));
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
    }

    #[test]
    fn half_open_failure_reopens() {
        let mut b = breaker();
        for _ in 0..5 {
            b.record_failure(at(0));
        }
        assert_eq!(b.allow(at(40)), Ok(()));
        b.record_success(at(40));
        b.record_failure(at(41));
        assert_eq!(b.state(), BreakerState::Open { opened_at: at(41) });
        assert_eq!(b.allow(at(42)), Err(Refused { retry_at: at(71) }));
    }

    #[test]
    fn half_open_that_does_not_prove_itself_reopens() {
        let mut b = breaker();
        for _ in 0..5 {
            b.record_failure(at(0));
        }
        assert_eq!(b.allow(at(30)), Ok(()));
        b.record_success(at(30));
        assert_eq!(b.allow(at(89)), Ok(()));
        assert_eq!(b.allow(at(90)), Err(Refused { retry_at: at(120) }));
        assert_eq!(b.state(), BreakerState::Open { opened_at: at(90) });
    }

    #[test]
    fn late_results_and_reset() {
        let mut b = breaker();
        for _ in 0..5 {
            b.record_failure(at(0));
        }
        // A success of a call from before the breaker opened changes nothing.
        b.record_success(at(1));
        b.record_failure(at(2));
        assert_eq!(b.state(), BreakerState::Open { opened_at: at(0) });
        b.reset();
        assert_eq!(b.allow(at(3)), Ok(()));
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
    }

    #[test]
    fn zero_thresholds_mean_one() {
        let mut b: Breaker<T> = Breaker::new(BreakerSettings {
            failure_threshold: 0,
            success_threshold: 0,
            ..Default::default()
        });
        b.record_failure(at(0));
        assert_eq!(b.state().as_str(), "open");
        assert_eq!(b.allow(at(30)), Ok(()));
        b.record_success(at(30));
        assert_eq!(b.state().as_str(), "closed");
    }

    #[test]
    fn works_with_real_and_persisted_clocks() {
        let mut b: Breaker<chrono::DateTime<chrono::Utc>> = Breaker::new(BreakerSettings {
            failure_threshold: 1,
            ..Default::default()
        });
        let t0 = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
        b.record_failure(t0);
        let refused = b.allow(t0).unwrap_err();
        assert_eq!(refused.retry_at - t0, chrono::TimeDelta::seconds(30));
    }
}
