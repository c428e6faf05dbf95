//! Discovery rounds: ask every configured source which robots it can see,
//! record the round as a discovery session (start, end, duration, counts,
//! methods) and time it in `robot_discovery_duration_seconds`.
//!
//! Sources implement [`DiscoverySource`]. This build has one: the agents
//! connected to the agent endpoint (robots announce themselves by
//! connecting). LAN sources (neighbour table, sweep, SSH) plug in here.

pub mod announce;
pub mod arp;
pub mod lan;
pub mod neighbours;
pub mod ssh;
pub mod sweep;

use crate::cache::RobotCache;
use crate::cache::redis::{Lease, Leases};
use crate::domain::Input;
use crate::domain::event::IdentityFacts;
use crate::fleet::{Context, Fleet, truncate_micros};
use crate::metrics::Metrics;
use crate::sessions::SessionRegistry;
use crate::store::{DiscoveryResult, DiscoverySession, EventStore, Fence, StoreError};
use chrono::Utc;
use kiwi_protocol::RobotId;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What a source saw at one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    pub ip_address: String,
    /// The robot there, when the source knows it.
    pub robot_id: Option<RobotId>,
    /// How it was seen.
    pub method: SightingMethod,
    pub mac_address: Option<String>,
    pub robot_type: Option<String>,
    /// A host identified without an agent (over SSH): its identity, which
    /// the round records as the robot's (discovered, or changed).
    pub facts: Option<IdentityFacts>,
    pub outcome: Outcome,
    /// Why, for an operator.
    pub detail: Option<String>,
}

impl Sighting {
    /// A robot whose identity the source knows.
    pub fn robot(ip_address: String, robot_id: RobotId, method: SightingMethod) -> Self {
        Sighting {
            ip_address,
            robot_id: Some(robot_id),
            method,
            mac_address: None,
            robot_type: None,
            facts: None,
            outcome: Outcome::Identified,
            detail: None,
        }
    }
}

pub use crate::store::SightingMethod;
/// What became of an address in a round (the store's vocabulary).
pub use crate::store::SightingOutcome as Outcome;

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
    pub sessions: Arc<SessionRegistry>,
}

#[async_trait::async_trait]
impl DiscoverySource for ConnectedAgents {
    fn method(&self) -> &'static str {
        "agent"
    }

    async fn discover(&self) -> Result<Vec<Sighting>, String> {
        Ok(self
            .sessions
            .snapshot()
            .into_iter()
            .map(|s| Sighting::robot(s.peer.ip().to_string(), s.robot_id, SightingMethod::Agent))
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

/// Where an on-demand round is (`GET /api/v2/discoveries/{id}`) before it
/// is recorded, or when it could not be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoundStatus {
    Running,
    /// Not recorded: why.
    Failed(String),
}

/// What [`Discovery::start`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// The round runs (or was already running) under this session id.
    Running(Uuid),
    /// Another controller holds the discovery lease.
    HeldElsewhere,
}

/// Rounds not recorded that `GET /api/v2/discoveries/{id}` can still
/// report (the newest failures; running rounds are always kept).
const FAILED_ROUNDS_KEPT: usize = 64;

#[derive(Debug, Clone)]
pub struct Discovery {
    fleet: Fleet,
    store: Arc<dyn EventStore>,
    cache: Arc<RobotCache>,
    metrics: Arc<Metrics>,
    sources: Arc<Vec<Box<dyn DiscoverySource>>>,
    /// One round at a time in this process.
    running: Arc<tokio::sync::Mutex<()>>,
    /// With Redis: the leases and this controller's holder name.
    leases: Option<(Leases, String)>,
    /// On-demand rounds running or failed, by session id, oldest first.
    rounds: Arc<std::sync::Mutex<Vec<(Uuid, RoundStatus)>>>,
}

/// A round that holds the process's turn and, with leases, the discovery
/// lease: ready to run.
struct Pending {
    _turn: tokio::sync::OwnedMutexGuard<()>,
    lease: Option<(Leases, Lease)>,
    session_id: Uuid,
}

impl Discovery {
    pub fn new(
        fleet: Fleet,
        store: Arc<dyn EventStore>,
        cache: Arc<RobotCache>,
        metrics: Arc<Metrics>,
        sources: Vec<Box<dyn DiscoverySource>>,
    ) -> Self {
        Discovery {
            fleet,
            store,
            cache,
            metrics,
            sources: Arc::new(sources),
            running: Arc::default(),
            leases: None,
            rounds: Arc::default(),
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
        let turn = self.running.clone().lock_owned().await;
        match self.prepare(turn).await {
            Some(pending) => self.run_pending(pending).await.map(Round::Done),
            None => Ok(Round::HeldElsewhere),
        }
    }

    /// Starts a round in the background (`POST /api/v2/discover`) and
    /// answers at once with its session id; a round already running in this
    /// process is answered with its own id.
    pub async fn start(&self) -> Started {
        let turn = match self.running.clone().try_lock_owned() {
            Ok(turn) => turn,
            Err(_) => {
                if let Some(id) = self.running_round() {
                    return Started::Running(id);
                }
                // A periodic round holds the turn: wait for it.
                self.running.clone().lock_owned().await
            }
        };
        let Some(pending) = self.prepare(turn).await else {
            return Started::HeldElsewhere;
        };
        let id = pending.session_id;
        self.set_status(id, Some(RoundStatus::Running));
        let this = self.clone();
        tokio::spawn(async move {
            let status = match this.run_pending(pending).await {
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(session_id = %id, error = %e, "discovery round not recorded");
                    Some(RoundStatus::Failed(e.to_string()))
                }
            };
            this.set_status(id, status);
        });
        Started::Running(id)
    }

    /// Where an on-demand round is, if it is running or failed (a recorded
    /// one is read from the store).
    pub fn status(&self, id: Uuid) -> Option<RoundStatus> {
        self.rounds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(r, _)| *r == id)
            .map(|(_, s)| s.clone())
    }

    fn running_round(&self) -> Option<Uuid> {
        self.rounds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(_, s)| *s == RoundStatus::Running)
            .map(|(id, _)| *id)
    }

    fn set_status(&self, id: Uuid, status: Option<RoundStatus>) {
        let mut rounds = self.rounds.lock().unwrap_or_else(|p| p.into_inner());
        rounds.retain(|(r, _)| *r != id);
        if let Some(status) = status {
            rounds.push((id, status));
        }
        while rounds
            .iter()
            .filter(|(_, s)| *s != RoundStatus::Running)
            .count()
            > FAILED_ROUNDS_KEPT
        {
            if let Some(oldest) = rounds.iter().position(|(_, s)| *s != RoundStatus::Running) {
                rounds.remove(oldest);
            }
        }
    }

    /// Takes the discovery lease, when there are leases: `None` when
    /// another controller holds it.
    async fn prepare(&self, turn: tokio::sync::OwnedMutexGuard<()>) -> Option<Pending> {
        let session_id = Uuid::new_v4();
        let Some((leases, holder)) = &self.leases else {
            return Some(Pending {
                _turn: turn,
                lease: None,
                session_id,
            });
        };
        let lease = match leases.acquire(DISCOVERY_LEASE, holder, LEASE_TTL).await {
            Ok(Some(lease)) => Some((leases.clone(), lease)),
            Ok(None) => return None,
            Err(e) => {
                // Redis is down: rounds from several controllers may then
                // overlap, which costs work, not correctness.
                tracing::warn!(error = %e, "no discovery lease (Redis unavailable); running unfenced");
                None
            }
        };
        Some(Pending {
            _turn: turn,
            lease,
            session_id,
        })
    }

    async fn run_pending(&self, pending: Pending) -> Result<DiscoverySession, DiscoveryError> {
        let Some((leases, lease)) = pending.lease else {
            return Ok(self.run_sources(pending.session_id, None).await?);
        };
        let stop = CancellationToken::new();
        let lost = leases.hold(&lease, &stop);
        let fence = lease.fence();
        let outcome = tokio::select! {
            () = lost.cancelled(), if !stop.is_cancelled() => Err(DiscoveryError::LeaseLost),
            r = self.run_sources(pending.session_id, Some(&fence)) => r.map_err(DiscoveryError::from),
        };
        stop.cancel();
        if let Err(e) = leases.release(lease).await {
            tracing::debug!(error = %e, "discovery lease not released; it expires by itself");
        }
        outcome
    }

    async fn run_sources(
        &self,
        session_id: Uuid,
        fence: Option<&Fence>,
    ) -> Result<DiscoverySession, StoreError> {
        let started_at = truncate_micros(Utc::now());
        let clock = Instant::now();
        let mut found = BTreeSet::new();
        let mut methods = Vec::new();
        let mut results = Vec::new();
        let ctx = Context::new("discovery");
        for source in self.sources.iter() {
            methods.push(source.method().to_string());
            let sightings = match source.discover().await {
                Ok(sightings) => sightings,
                Err(e) => {
                    tracing::warn!(method = source.method(), error = %e, "discovery source failed");
                    continue;
                }
            };
            for s in sightings {
                if let (Some(id), Some(facts)) = (s.robot_id, s.facts.clone()) {
                    let input = Input::HostSighted {
                        facts,
                        method: s.method.as_str().to_string(),
                    };
                    if let Err(e) = self.fleet.apply(id, input, &ctx).await {
                        tracing::warn!(robot_id = %id, ip = %s.ip_address, error = %e, "a sighted robot was not recorded");
                    }
                }
                if s.outcome == Outcome::HostKeyChanged {
                    tracing::warn!(ip = %s.ip_address, detail = ?s.detail, "SSH host key changed: host flagged, not trusted");
                }
                found.extend(s.robot_id);
                results.push(DiscoveryResult {
                    ip_address: s.ip_address,
                    robot_id: s.robot_id,
                    method: s.method,
                    found_at: truncate_micros(Utc::now()),
                    mac_address: s.mac_address,
                    robot_type: s.robot_type,
                    outcome: s.outcome,
                    detail: s.detail,
                });
            }
        }
        let new_robots = found
            .iter()
            .filter(|id| {
                self.cache
                    .peek(id)
                    .is_some_and(|e| e.robot.discovered_at >= started_at)
            })
            .count();
        let elapsed = clock.elapsed();
        self.metrics
            .robot_discovery_duration_seconds
            .observe(elapsed.as_secs_f64());
        let session = DiscoverySession {
            session_id,
            methods,
            started_at,
            finished_at: truncate_micros(Utc::now()),
            duration_ms: i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX),
            robots_found: found.len() as i64,
            new_robots: new_robots as i64,
            results,
        };
        self.store.record_discovery(&session, fence).await?;
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
