//! Abuse limits per source address: enrollment attempts, failed
//! authentications (agents and API), and connections held at once on the
//! agent port. Each refusal is counted in `rate_limited_total{limit}`.
//!
//! The rates are token buckets (governor) over an injectable clock, so the
//! tests run on a simulated one.

use crate::metrics::Metrics;
use governor::clock::{Clock, DefaultClock, FakeRelativeClock, Reference as _};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The limits, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSettings {
    /// Enrollment requests per address and minute (a burst of this many).
    pub enroll_per_minute: u32,
    /// Failed authentications per address and minute before the address
    /// is refused until its budget refills.
    pub auth_failures_per_minute: u32,
    /// Agent-port connections one address may hold at once.
    pub connections_per_address: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            enroll_per_minute: 10,
            auth_failures_per_minute: 20,
            connections_per_address: 16,
        }
    }
}

type Keyed<C> =
    RateLimiter<IpAddr, HashMapStateStore<IpAddr>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The abuse limits of one controller.
pub struct AbuseLimits<C: Clock = DefaultClock> {
    settings: LimitSettings,
    clock: C,
    enroll: Keyed<C>,
    failures: Keyed<C>,
    /// Addresses whose failure budget ran out, and until when.
    blocked: Mutex<HashMap<IpAddr, C::Instant>>,
    connections: Arc<Mutex<HashMap<IpAddr, usize>>>,
    metrics: Arc<Metrics>,
}

impl<C: Clock> std::fmt::Debug for AbuseLimits<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbuseLimits")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN))
}

impl AbuseLimits<DefaultClock> {
    pub fn new(settings: LimitSettings, metrics: Arc<Metrics>) -> Self {
        AbuseLimits::with_clock(settings, metrics, DefaultClock::default())
    }
}

impl AbuseLimits<FakeRelativeClock> {
    /// Limits on a simulated clock (tests).
    pub fn simulated(settings: LimitSettings, metrics: Arc<Metrics>) -> Self {
        AbuseLimits::with_clock(settings, metrics, FakeRelativeClock::default())
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }
}

impl<C: Clock + Clone> AbuseLimits<C> {
    pub fn with_clock(settings: LimitSettings, metrics: Arc<Metrics>, clock: C) -> Self {
        AbuseLimits {
            enroll: RateLimiter::hashmap_with_clock(
                per_minute(settings.enroll_per_minute),
                clock.clone(),
            ),
            failures: RateLimiter::hashmap_with_clock(
                per_minute(settings.auth_failures_per_minute),
                clock.clone(),
            ),
            settings,
            clock,
            blocked: Mutex::default(),
            connections: Arc::default(),
            metrics,
        }
    }

    /// Whether `ip` may try to enroll now; `Err` says when to try again.
    pub fn allow_enrollment(&self, ip: IpAddr) -> Result<(), Duration> {
        self.enroll.check_key(&ip).map_err(|not_until| {
            self.metrics.limited("enroll_rate");
            not_until.wait_time_from(self.clock.now())
        })
    }

    /// Records a failed authentication from `ip`; once its budget is spent
    /// the address is blocked until it refills.
    pub fn auth_failed(&self, ip: IpAddr) {
        if let Err(not_until) = self.failures.check_key(&ip) {
            let until = not_until.earliest_possible();
            self.blocked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(ip, until);
        }
    }

    /// `Some(retry after)` while `ip` is blocked for failed
    /// authentications (counted as a refusal).
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        let until = *blocked.get(&ip)?;
        let now = self.clock.now();
        if until <= now {
            blocked.remove(&ip);
            return None;
        }
        drop(blocked);
        self.metrics.limited("auth_failures");
        Some(until.duration_since(now).into())
    }

    /// Takes one of `ip`'s agent-port connection slots, given back when
    /// the returned slot drops; `None` (counted) when all are taken.
    pub fn open_connection(&self, ip: IpAddr) -> Option<ConnectionSlot> {
        let mut conns = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let held = conns.entry(ip).or_insert(0);
        if *held >= self.settings.connections_per_address {
            drop(conns);
            self.metrics.limited("connections_per_address");
            return None;
        }
        *held += 1;
        Some(ConnectionSlot {
            ip,
            connections: self.connections.clone(),
        })
    }

    /// Forgets buckets that are full again (call now and then so that the
    /// tables do not grow with every address ever seen).
    pub fn tidy(&self) {
        self.enroll.retain_recent();
        self.failures.retain_recent();
        let now = self.clock.now();
        self.blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, until| *until > now);
    }
}

/// One connection held by an address; released on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    ip: IpAddr,
    connections: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut conns = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = conns.get_mut(&self.ip) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                conns.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> AbuseLimits<FakeRelativeClock> {
        AbuseLimits::simulated(
            LimitSettings {
                enroll_per_minute: 3,
                auth_failures_per_minute: 2,
                connections_per_address: 2,
            },
            Arc::new(Metrics::new()),
        )
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 88, 0, 5));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 88, 0, 6));

    #[test]
    fn enrollment_attempts_are_limited_per_address() {
        let l = limits();
        for _ in 0..3 {
            assert!(l.allow_enrollment(A).is_ok());
        }
        let wait = l.allow_enrollment(A).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert!(
            l.allow_enrollment(B).is_ok(),
            "another address is not affected"
        );
        l.advance(Duration::from_secs(20));
        assert!(
            l.allow_enrollment(A).is_ok(),
            "one more after a third of a minute"
        );
        assert!(
            l.metrics
                .encode()
                .contains("rate_limited_total{limit=\"enroll_rate\"} 1")
        );
    }

    #[test]
    fn failed_authentications_block_an_address_for_a_while() {
        let l = limits();
        l.auth_failed(A);
        l.auth_failed(A);
        assert_eq!(l.blocked(A), None, "within the budget");
        l.auth_failed(A);
        let wait = l.blocked(A).expect("blocked after the budget is spent");
        assert!(wait <= Duration::from_secs(30), "{wait:?}");
        assert_eq!(l.blocked(B), None);
        l.advance(wait);
        assert_eq!(l.blocked(A), None, "unblocked once the budget refilled");
        l.tidy();
    }

    #[test]
    fn connections_per_address_are_capped_and_given_back() {
        let l = limits();
        let one = l.open_connection(A).unwrap();
        let _two = l.open_connection(A).unwrap();
        assert!(l.open_connection(A).is_none());
        assert!(l.open_connection(B).is_some());
        drop(one);
        assert!(l.open_connection(A).is_some());
        assert!(
            l.metrics
                .encode()
                .contains("rate_limited_total{limit=\"connections_per_address\"} 1")
        );
    }
}
