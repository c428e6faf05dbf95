//! Discovery rounds: ask every configured source which robots it can see,
//! record the round as a discovery session (start, end, duration, counts,
//! methods) and time it in `robot_discovery_duration_seconds`.
//!
//! Sources implement [`DiscoverySource`]. This build has one: the agents
//! connected to the agent endpoint (robots announce themselves by
//! connecting). LAN sources (neighbour table, sweep, SSH) plug in here.

use crate::fleet::{Fleet, truncate_micros};
use crate::metrics::Metrics;
use crate::redis::Leases;
use crate::store::{DiscoverySession, Fence, StoreError};
use chrono::Utc;
use kiwi_protocol::RobotId;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A robot a source can see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    pub robot_id: RobotId,
    pub ip_address: Option<String>,
}

/// A way of finding robots.
#[async_trait::async_trait]
pub trait DiscoverySource: Send + Sync + std::fmt::Debug {
    /// The `method` recorded in discovery sessions.
    fn method(&self) -> &'static str;
    async fn discover(&self) -> Result<Vec<Sighting>, String>;
}

/// Robots whose agent is connected right now.
#[derive(Debug)]
pub struct ConnectedAgents {
    pub fleet: Fleet,
}

#[async_trait::async_trait]
impl DiscoverySource for ConnectedAgents {
    fn method(&self) -> &'static str {
        "agent"
    }

    async fn discover(&self) -> Result<Vec<Sighting>, String> {
        Ok(self
            .fleet
            .sessions()
            .snapshot()
            .into_iter()
            .map(|s| Sighting {
                robot_id: s.robot_id,
                ip_address: Some(s.peer.ip().to_string()),
            })
            .collect())
    }
}

/// The lease every controller takes before a discovery round, so that only
/// one of several controllers sharing a store runs it at a time.
pub const DISCOVERY_LEASE: &str = "discovery";

/// How long a round's lease lasts unless renewed (it is renewed while the
/// round runs).
const LEASE_TTL: Duration = Duration::from_secs(10);

/// What a discovery round came to.
#[derive(Debug, Clone)]
pub enum Round {
    Done(DiscoverySession),
    /// Another controller holds the discovery lease.
    HeldElsewhere,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The lease was lost while the round ran: its results were not
    /// recorded (another controller may be running the round now).
    #[error("the discovery lease was lost during the round; results not recorded")]
    LeaseLost,
}

#[derive(Debug, Clone)]
pub struct Discovery {
    fleet: Fleet,
    metrics: Arc<Metrics>,
    sources: Arc<Vec<Box<dyn DiscoverySource>>>,
    /// One round at a time in this process.
    running: Arc<tokio::sync::Mutex<()>>,
    /// With Redis: the leases and this controller's holder name.
    leases: Option<(Leases, String)>,
}

impl Discovery {
    pub fn new(
        fleet: Fleet,
        metrics: Arc<Metrics>,
        sources: Vec<Box<dyn DiscoverySource>>,
    ) -> Self {
        Discovery {
            fleet,
            metrics,
            sources: Arc::new(sources),
            running: Arc::default(),
            leases: None,
        }
    }

    /// Takes a lease in Redis before each round (several controllers).
    pub fn with_leases(mut self, leases: Leases, holder: String) -> Self {
        self.leases = Some((leases, holder));
        self
    }

    /// Runs one round over every source and records it, holding the
    /// discovery lease when there are leases (and fencing the record with
    /// its token, so a controller that lost the lease cannot record).
    pub async fn round(&self) -> Result<Round, DiscoveryError> {
        let _one_at_a_time = self.running.lock().await;
        let Some((leases, holder)) = &self.leases else {
            return Ok(Round::Done(self.run_sources(None).await?));
        };
        let lease = match leases.acquire(DISCOVERY_LEASE, holder, LEASE_TTL).await {
            Ok(Some(lease)) => lease,
            Ok(None) => return Ok(Round::HeldElsewhere),
            Err(e) => {
                // Redis is down: rounds from several controllers may then
                // overlap, which costs work, not correctness.
                tracing::warn!(error = %e, "no discovery lease (Redis unavailable); running unfenced");
                return Ok(Round::Done(self.run_sources(None).await?));
            }
        };
        let stop = CancellationToken::new();
        let lost = leases.hold(&lease, &stop);
        let fence = lease.fence();
        let outcome = tokio::select! {
            () = lost.cancelled(), if !stop.is_cancelled() => Err(DiscoveryError::LeaseLost),
            r = self.run_sources(Some(&fence)) => r.map(Round::Done).map_err(DiscoveryError::from),
        };
        stop.cancel();
        if let Err(e) = leases.release(lease).await {
            tracing::debug!(error = %e, "discovery lease not released; it expires by itself");
        }
        outcome
    }

    async fn run_sources(&self, fence: Option<&Fence>) -> Result<DiscoverySession, StoreError> {
        let started_at = truncate_micros(Utc::now());
        let clock = Instant::now();
        let mut found = BTreeSet::new();
        let mut methods = Vec::new();
        for source in self.sources.iter() {
            methods.push(source.method().to_string());
            match source.discover().await {
                Ok(sightings) => found.extend(sightings.into_iter().map(|s| s.robot_id)),
                Err(e) => {
                    tracing::warn!(method = source.method(), error = %e, "discovery source failed")
                }
            }
        }
        let new_robots = found
            .iter()
            .filter(|id| {
                self.fleet
                    .cache()
                    .peek(id)
                    .is_some_and(|e| e.robot.discovered_at >= started_at)
            })
            .count();
        let elapsed = clock.elapsed();
        self.metrics
            .robot_discovery_duration_seconds
            .observe(elapsed.as_secs_f64());
        let session = DiscoverySession {
            session_id: Uuid::new_v4(),
            methods,
            started_at,
            finished_at: truncate_micros(Utc::now()),
            duration_ms: i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX),
            robots_found: found.len() as i64,
            new_robots: new_robots as i64,
        };
        self.fleet.store().record_discovery(&session, fence).await?;
        Ok(session)
    }

    /// Continuous discovery every `period` until `cancel`.
    pub async fn run(self, period: Duration, cancel: CancellationToken) {
        if period.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.round().await {
                Ok(Round::Done(_)) => {}
                Ok(Round::HeldElsewhere) => {
                    tracing::debug!("discovery round skipped: another controller holds the lease");
                }
                Err(e) => tracing::warn!(error = %e, "discovery round not recorded"),
            }
        }
    }
}
