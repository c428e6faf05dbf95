//! Abuse limits per source address: enrollment attempts, failed
//! authentications (a budget per surface: the API, enrollment and the
//! agent port), and connections held at once. Each refusal is counted in
//! `rate_limited_total{limit}`.
//!
//! A failure budget never refuses valid credentials: an address that spent
//! its budget on one surface (one bad client behind a NAT) still gets in
//! with a valid token or certificate, there and on the other surfaces.
//! What the budget changes is the answer to more bad credentials from it:
//! told to wait (429 and `Retry-After`) instead of why, and logged at
//! debug level (a flood of them does not flood the log).
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
    /// Failed authentications per address, surface and minute before more
    /// bad credentials from the address are told to wait.
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

/// Where a credential was presented: each has its own failure budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Surface {
    /// API tokens on the REST port.
    Api,
    /// Enrollment tokens (`POST /enroll`).
    Enroll,
    /// Client certificates on the agent port.
    Agent,
}

impl Surface {
    const ALL: [Surface; 3] = [Surface::Api, Surface::Enroll, Surface::Agent];

    /// The `surface` label of `auth_failures_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Surface::Api => "api",
            Surface::Enroll => "enroll",
            Surface::Agent => "agent",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

type Keyed<C> =
    RateLimiter<IpAddr, HashMapStateStore<IpAddr>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The abuse limits of one controller.
pub struct AbuseLimits<C: Clock = DefaultClock> {
    settings: LimitSettings,
    clock: C,
    enroll: Keyed<C>,
    /// One failure budget per [`Surface`].
    failures: [Keyed<C>; 3],
    /// Addresses whose budget on a surface ran out, and until when.
    blocked: Mutex<HashMap<(Surface, IpAddr), C::Instant>>,
    /// Agent-port connections.
    connections: Connections,
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
        let budget = || {
            RateLimiter::hashmap_with_clock(
                per_minute(settings.auth_failures_per_minute),
                clock.clone(),
            )
        };
        AbuseLimits {
            enroll: RateLimiter::hashmap_with_clock(
                per_minute(settings.enroll_per_minute),
                clock.clone(),
            ),
            failures: [budget(), budget(), budget()],
            connections: Connections::new(
                ConnectionCaps {
                    per_address: settings.connections_per_address,
                    total: None,
                },
                metrics.clone(),
                ConnectionLimitNames {
                    per_address: "connections_per_address",
                    total: "connections",
                },
            ),
            settings,
            clock,
            blocked: Mutex::default(),
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

    /// Records a failed authentication from `ip` on `surface`; once its
    /// budget there is spent the address is blocked there until it
    /// refills.
    pub fn auth_failed(&self, surface: Surface, ip: IpAddr) {
        if let Err(not_until) = self.failures[surface.index()].check_key(&ip) {
            let until = not_until.earliest_possible();
            self.blocked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((surface, ip), until);
        }
    }

    /// `Some(retry after)` while `ip` is blocked on `surface` for failed
    /// authentications (counted as a refusal). Only ever asked about a
    /// credential already found bad.
    pub fn blocked(&self, surface: Surface, ip: IpAddr) -> Option<Duration> {
        let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        let until = *blocked.get(&(surface, ip))?;
        let now = self.clock.now();
        if until <= now {
            blocked.remove(&(surface, ip));
            return None;
        }
        drop(blocked);
        self.metrics.limited("auth_failures");
        Some(until.duration_since(now).into())
    }

    /// Takes one of `ip`'s agent-port connection slots, given back when
    /// the returned slot drops; `None` (counted) when all are taken.
    pub fn open_connection(&self, ip: IpAddr) -> Option<ConnectionSlot> {
        self.connections.open(ip).ok()
    }

    /// Forgets buckets that are full again (call now and then so that the
    /// tables do not grow with every address ever seen).
    pub fn tidy(&self) {
        self.enroll.retain_recent();
        for surface in Surface::ALL {
            self.failures[surface.index()].retain_recent();
        }
        let now = self.clock.now();
        self.blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, until| *until > now);
    }
}

/// How many connections a port holds at once: from one address, and in
/// all (`None`: no cap of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCaps {
    pub per_address: usize,
    pub total: Option<usize>,
}

/// The `limit` labels a [`Connections`] counts its refusals under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimitNames {
    pub per_address: &'static str,
    pub total: &'static str,
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionCap {
    PerAddress,
    Total,
}

#[derive(Debug, Default)]
struct Held {
    by_address: HashMap<IpAddr, usize>,
    total: usize,
}

/// The connections one port holds, per address and in all.
#[derive(Debug, Clone)]
pub struct Connections {
    caps: ConnectionCaps,
    names: ConnectionLimitNames,
    held: Arc<Mutex<Held>>,
    metrics: Arc<Metrics>,
}

impl Connections {
    pub fn new(caps: ConnectionCaps, metrics: Arc<Metrics>, names: ConnectionLimitNames) -> Self {
        Connections {
            caps,
            names,
            held: Arc::default(),
            metrics,
        }
    }

    /// Takes a slot for a connection from `ip`, given back when it drops;
    /// `Err` (counted under the cap's name) when a cap is reached.
    pub fn open(&self, ip: IpAddr) -> Result<ConnectionSlot, ConnectionCap> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let refused = if self.caps.total.is_some_and(|cap| held.total >= cap) {
            Some((ConnectionCap::Total, self.names.total))
        } else if held.by_address.get(&ip).copied().unwrap_or(0) >= self.caps.per_address {
            Some((ConnectionCap::PerAddress, self.names.per_address))
        } else {
            None
        };
        if let Some((cap, name)) = refused {
            drop(held);
            self.metrics.limited(name);
            return Err(cap);
        }
        *held.by_address.entry(ip).or_insert(0) += 1;
        held.total += 1;
        Ok(ConnectionSlot {
            ip,
            held: self.held.clone(),
        })
    }

    /// Connections held now.
    pub fn total(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// One connection held by an address; released on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    ip: IpAddr,
    held: Arc<Mutex<Held>>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.total = held.total.saturating_sub(1);
        if let Some(n) = held.by_address.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.by_address.remove(&self.ip);
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
    fn failed_authentications_block_an_address_on_one_surface_for_a_while() {
        let l = limits();
        l.auth_failed(Surface::Api, A);
        l.auth_failed(Surface::Api, A);
        assert_eq!(l.blocked(Surface::Api, A), None, "within the budget");
        l.auth_failed(Surface::Api, A);
        let wait = l
            .blocked(Surface::Api, A)
            .expect("blocked after the budget is spent");
        assert!(wait <= Duration::from_secs(30), "{wait:?}");
        assert_eq!(l.blocked(Surface::Api, B), None, "another address");
        for other in [Surface::Enroll, Surface::Agent] {
            assert_eq!(l.blocked(other, A), None, "{other:?} has its own budget");
        }
        l.advance(wait);
        assert_eq!(
            l.blocked(Surface::Api, A),
            None,
            "unblocked once the budget refilled"
        );
        l.tidy();
    }

    #[test]
    fn a_port_caps_its_connections_in_all_and_per_address() {
        let metrics = Arc::new(Metrics::new());
        let c = Connections::new(
            ConnectionCaps {
                per_address: 2,
                total: Some(3),
            },
            metrics.clone(),
            ConnectionLimitNames {
                per_address: "api_connections_per_address",
                total: "api_connections",
            },
        );
        let a1 = c.open(A).unwrap();
        let _a2 = c.open(A).unwrap();
        assert_eq!(c.open(A).unwrap_err(), ConnectionCap::PerAddress);
        let _b1 = c.open(B).unwrap();
        assert_eq!(c.open(B).unwrap_err(), ConnectionCap::Total);
        assert_eq!(c.total(), 3);
        drop(a1);
        assert!(c.open(B).is_ok());
        let text = metrics.encode();
        assert!(text.contains("rate_limited_total{limit=\"api_connections_per_address\"} 1"));
        assert!(text.contains("rate_limited_total{limit=\"api_connections\"} 1"));
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
