//! The event store: the append-only log of robot events and the read model
//! (`robot_states`) kept in the same transaction, behind one trait with one
//! backend per database.
//!
//! - [`sqlite`]: the embedded default, a file in the state directory.
//! - [`postgres`]: production, shared by several controllers.
//!
//! Rows are decoded once for both (`rows`, over each backend's column
//! readers); what every backend must do is one suite run against each
//! (`conformance`, in tests).
//!
//! Every backend group-commits: appends arriving together are written in one
//! transaction, and each caller is answered only after that commit. Each
//! backend publishes what it committed, in log order, on [`EventStore::subscribe`];
//! the watch stream and the cache follow that feed.

pub mod auth;
mod checks;
#[cfg(test)]
pub(crate) mod conformance;
pub mod postgres;
mod rows;
pub mod sqlite;

use crate::domain::breaker::BreakerState;
use crate::domain::robot::{ApplyError, LastReport};
use crate::domain::{EventRecord, Health, NewEvent, Robot};
use auth::AuthStore;
use chrono::{DateTime, Utc};
use kiwi_protocol::RobotId;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::broadcast;
use uuid::Uuid;

/// One robot's changes, written atomically: its new events (possibly none),
/// its read-model row as it is after them, and optionally a report.
#[derive(Debug, Clone)]
pub struct Append {
    pub robot_id: RobotId,
    /// The robot's version the caller decided on (0: a new robot). The
    /// append fails with [`StoreError::Conflict`] if the stored version
    /// differs (optimistic concurrency).
    pub expected_version: i64,
    /// Appended with versions `expected_version + 1 ..`.
    pub events: Vec<NewEvent>,
    /// The read-model row after the events; its `version` must equal
    /// `expected_version + events.len()`.
    pub robot: Robot,
    /// A report to store with the change, deduplicated by (robot, seq).
    pub report: Option<StoredReport>,
}

/// What one append committed, as published on the store's feed.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The appended events with their positions, in log order.
    pub events: Vec<EventRecord>,
    /// The robot's read-model row after them.
    pub robot: Arc<Robot>,
}

/// A report as stored (`robot_reports`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredReport {
    pub robot_id: RobotId,
    pub seq: i64,
    /// When the agent made it.
    pub time: DateTime<Utc>,
    /// When the controller stored it.
    pub received_at: DateTime<Utc>,
    pub health: Health,
    pub workload: crate::domain::Workload,
    pub maintenance: bool,
    pub telemetry: serde_json::Value,
}

/// One discovery round, as recorded (`discovery_sessions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscoverySession {
    pub session_id: Uuid,
    /// The sources asked, e.g. `agent`.
    pub methods: Vec<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub robots_found: i64,
    pub new_robots: i64,
    /// What was found at each address, in the order found.
    #[serde(default)]
    pub results: Vec<DiscoveryResult>,
}

/// How an address was seen in a discovery round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SightingMethod {
    /// Its agent is connected.
    Agent,
    /// Its agent announced itself by mDNS.
    Mdns,
    /// Its agent's UDP beacon was heard.
    Beacon,
    /// A confirmed entry of the kernel neighbour table.
    Neighbour,
    /// It answered the sweep's own ARP request.
    Arp,
    /// It accepted or refused a TCP connect.
    Tcp,
    /// It was identified over SSH (the fallback for robots without an agent).
    Ssh,
}

impl SightingMethod {
    const ALL: [SightingMethod; 7] = [
        SightingMethod::Agent,
        SightingMethod::Mdns,
        SightingMethod::Beacon,
        SightingMethod::Neighbour,
        SightingMethod::Arp,
        SightingMethod::Tcp,
        SightingMethod::Ssh,
    ];

    /// The stored (and JSON) name.
    pub fn as_str(self) -> &'static str {
        match self {
            SightingMethod::Agent => "agent",
            SightingMethod::Mdns => "mdns",
            SightingMethod::Beacon => "beacon",
            SightingMethod::Neighbour => "neighbour",
            SightingMethod::Arp => "arp",
            SightingMethod::Tcp => "tcp",
            SightingMethod::Ssh => "ssh",
        }
    }

    /// The method of a stored name; an error names anything else.
    pub fn parse(s: &str) -> Result<SightingMethod, String> {
        SightingMethod::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown discovery method {s:?}"))
    }
}

/// What became of an address in a discovery round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SightingOutcome {
    /// A robot, identified.
    Identified,
    /// A live host that is not (yet) identified as a robot.
    Live,
    /// The host's SSH key is not the one recorded: flagged, not trusted.
    HostKeyChanged,
    /// The host answered but could not be identified (the detail says why).
    Failed,
}

impl SightingOutcome {
    const ALL: [SightingOutcome; 4] = [
        SightingOutcome::Identified,
        SightingOutcome::Live,
        SightingOutcome::HostKeyChanged,
        SightingOutcome::Failed,
    ];

    /// The stored (and JSON) name.
    pub fn as_str(self) -> &'static str {
        match self {
            SightingOutcome::Identified => "identified",
            SightingOutcome::Live => "live",
            SightingOutcome::HostKeyChanged => "host_key_changed",
            SightingOutcome::Failed => "failed",
        }
    }

    /// The outcome of a stored name; an error names anything else.
    pub fn parse(s: &str) -> Result<SightingOutcome, String> {
        SightingOutcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| format!("unknown discovery outcome {s:?}"))
    }
}

/// What a discovery round found at one address by one method
/// (`discovery_results`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoveryResult {
    pub ip_address: String,
    /// The robot, when the address was identified.
    pub robot_id: Option<RobotId>,
    pub method: SightingMethod,
    pub found_at: DateTime<Utc>,
    pub mac_address: Option<String>,
    pub robot_type: Option<String>,
    pub outcome: SightingOutcome,
    /// Why, for an operator (e.g. the SSH error).
    pub detail: Option<String>,
}

/// A robot's row as of one version, standing in for the events before it
/// that were pruned. Replaying a robot starts from its snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The row as of `robot.version`.
    pub robot: Robot,
    pub taken_at: DateTime<Utc>,
}

/// One robot's history up to an instant: everything needed to rebuild its
/// row as it was then ([`History::project`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct History {
    /// The latest snapshot taken at or before the instant.
    pub snapshot: Option<Snapshot>,
    /// Events after the snapshot's version recorded at or before the
    /// instant, oldest first.
    pub events: Vec<EventRecord>,
    /// The report with the highest sequence number received at or before
    /// the instant.
    pub last_report: Option<StoredReport>,
}

impl History {
    /// The robot's row as it was (`None`: it did not exist yet): its
    /// snapshot, its events applied in order with [`Robot::apply`], then
    /// its latest report.
    pub fn project(&self) -> Result<Option<Robot>, ApplyError> {
        let mut robot = self.snapshot.as_ref().map(|s| s.robot.clone());
        for e in &self.events {
            robot = Some(Robot::apply(robot, e)?);
        }
        if let (Some(r), Some(rep)) = (robot.as_mut(), &self.last_report)
            && rep.seq >= r.last_report_seq
        {
            rep.apply_to(r);
        }
        Ok(robot)
    }
}

impl StoredReport {
    /// Puts the report's fields into a row: what `Fleet::report` stores
    /// with it.
    pub fn apply_to(&self, robot: &mut Robot) {
        robot.last_report_seq = self.seq;
        robot.last_heartbeat = Some(self.received_at);
        robot.last_report = Some(LastReport {
            seq: self.seq,
            time: self.time,
            workload: self.workload,
            maintenance: self.maintenance,
            telemetry: self.telemetry.clone(),
        });
        robot.updated_at = robot.updated_at.max(self.received_at);
    }
}

/// One robot's circuit breaker as persisted (`circuit_breakers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBreaker {
    pub robot_id: RobotId,
    pub state: BreakerState<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// A `circuit_breakers` row's columns, as both backends store them:
/// `state`, `failure_count`, `success_count`, `opened_at` (a half-open
/// breaker's `since` is kept in `opened_at`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerColumns {
    pub state: &'static str,
    pub failure_count: i64,
    pub success_count: i64,
    pub opened_at: Option<DateTime<Utc>>,
}

impl BreakerColumns {
    pub fn of(state: &BreakerState<DateTime<Utc>>) -> BreakerColumns {
        let (failure_count, success_count, opened_at) = match *state {
            BreakerState::Closed { failures } => (i64::from(failures), 0, None),
            BreakerState::Open { opened_at } => (0, 0, Some(opened_at)),
            BreakerState::HalfOpen { since, successes } => (0, i64::from(successes), Some(since)),
        };
        BreakerColumns {
            state: state.as_str(),
            failure_count,
            success_count,
            opened_at,
        }
    }

    /// The state a row describes; a row that contradicts itself (an open
    /// breaker with no `opened_at`, an unknown state, a negative count) is
    /// an error naming what is wrong.
    pub fn decode(
        state: &str,
        failure_count: i64,
        success_count: i64,
        opened_at: Option<DateTime<Utc>>,
    ) -> Result<BreakerState<DateTime<Utc>>, String> {
        let count = |name: &str, n: i64| {
            u32::try_from(n).map_err(|_| format!("{name} {n} is out of range"))
        };
        let since = || opened_at.ok_or_else(|| format!("a {state} breaker has no opened_at"));
        match state {
            "closed" => Ok(BreakerState::Closed {
                failures: count("failure_count", failure_count)?,
            }),
            "open" => Ok(BreakerState::Open {
                opened_at: since()?,
            }),
            "half_open" => Ok(BreakerState::HalfOpen {
                since: since()?,
                successes: count("success_count", success_count)?,
            }),
            other => Err(format!("unknown breaker state {other:?}")),
        }
    }
}

/// What a prune removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PruneOutcome {
    /// Robots whose older events were folded into a snapshot.
    pub robots: u64,
    pub events_removed: u64,
    pub reports_removed: u64,
}

/// A fencing token for work only one controller may do at a time (a lease
/// holder's proof): the store refuses a write whose token is lower than the
/// highest it has seen for the same resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub resource: String,
    pub token: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer changed the robot first: reload and decide again.
    #[error("robot {robot_id} is at version {actual}, not {expected}")]
    Conflict {
        robot_id: RobotId,
        expected: i64,
        actual: i64,
    },
    /// The database cannot be reached or refused the work; worth retrying.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data that does not decode: never silently skipped.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// A caller broke the contract (e.g. a row whose version does not match).
    #[error("invalid append: {0}")]
    Invalid(String),
    /// A write under a fencing token older than one already used: the
    /// writer lost its lease to another controller.
    #[error("fencing token {token} for {resource} is stale (the store has seen {current})")]
    Fenced {
        resource: String,
        token: u64,
        current: u64,
    },
    /// A move a record's state does not allow (e.g. approving an
    /// enrollment that was rejected): refused, nothing changed.
    #[error("invalid transition: {0}")]
    InvalidTransition(String),
}

/// The event store. Implementations are cheap to share (`Arc<dyn EventStore>`).
#[async_trait::async_trait]
pub trait EventStore: Send + Sync + std::fmt::Debug + 'static {
    /// Appends atomically (group-committed with concurrent appends) and
    /// answers once durable, with the stored events.
    async fn append(&self, append: Append) -> Result<Vec<EventRecord>, StoreError>;

    /// One robot's read-model row.
    async fn robot(&self, id: RobotId) -> Result<Option<Robot>, StoreError>;

    /// Every read-model row, ordered by robot id.
    async fn robots(&self) -> Result<Vec<Robot>, StoreError>;

    /// A robot's events with version > `after_version`, oldest first.
    async fn robot_events(
        &self,
        id: RobotId,
        after_version: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError>;

    /// Events of all robots with position > `after`, in log order.
    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<EventRecord>, StoreError>;

    /// The highest position in the log (0 when empty).
    async fn head(&self) -> Result<i64, StoreError>;

    /// A robot's reports with seq > `after_seq`, oldest first.
    async fn reports(
        &self,
        id: RobotId,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<StoredReport>, StoreError>;

    /// Records a discovery round. With a fence, refuses (`Fenced`) when a
    /// higher token for the same resource was already used, and remembers
    /// this token otherwise, in the same transaction.
    async fn record_discovery(
        &self,
        session: &DiscoverySession,
        fence: Option<&Fence>,
    ) -> Result<(), StoreError>;

    /// A recorded discovery round with its results.
    async fn discovery(&self, id: Uuid) -> Result<Option<DiscoverySession>, StoreError>;

    /// One robot's history up to `at` (`None`: everything).
    async fn history(&self, id: RobotId, at: Option<DateTime<Utc>>) -> Result<History, StoreError>;

    /// The current snapshot of every robot that has one.
    async fn snapshots(&self) -> Result<Vec<Snapshot>, StoreError>;

    /// Each robot's report with the highest sequence number.
    async fn latest_reports(&self) -> Result<Vec<StoredReport>, StoreError>;

    /// Folds every robot's events recorded before `before` into a snapshot
    /// (the row replayed up to them) and deletes them, one robot per
    /// transaction; also deletes reports received before `before` except
    /// each robot's latest. Replaying afterwards gives the same rows.
    async fn prune(&self, before: DateTime<Utc>) -> Result<PruneOutcome, StoreError>;

    /// Every persisted circuit breaker.
    async fn breakers(&self) -> Result<Vec<StoredBreaker>, StoreError>;

    /// Writes `breaker`'s state, replacing the robot's previous one.
    async fn save_breaker(&self, breaker: &StoredBreaker) -> Result<(), StoreError>;

    /// Whether the database answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// The feed of commits, in log order, from now on.
    fn subscribe(&self) -> broadcast::Receiver<Arc<Committed>>;

    /// The security records kept in the same database.
    fn auth(&self) -> Arc<dyn AuthStore>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_rows_that_contradict_themselves_are_refused() {
        let now = Utc::now();
        for state in [
            BreakerState::Closed { failures: 3 },
            BreakerState::Open { opened_at: now },
            BreakerState::HalfOpen {
                since: now,
                successes: 1,
            },
        ] {
            let c = BreakerColumns::of(&state);
            let back =
                BreakerColumns::decode(c.state, c.failure_count, c.success_count, c.opened_at);
            assert_eq!(back, Ok(state));
        }
        let err = BreakerColumns::decode("open", 0, 0, None).unwrap_err();
        assert!(err.contains("no opened_at"), "{err}");
        let err = BreakerColumns::decode("ajar", 0, 0, None).unwrap_err();
        assert!(err.contains("ajar"), "{err}");
        let err = BreakerColumns::decode("closed", -1, 0, None).unwrap_err();
        assert!(err.contains("failure_count -1"), "{err}");
    }
}
