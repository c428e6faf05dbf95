//! The robot aggregate: the read model row of one robot, and the one
//! function that changes it, [`Robot::apply`]. Replaying a robot's events
//! through `apply` from nothing gives its current row; the store keeps the
//! row updated in the same transaction as the events.

use super::event::{EventRecord, IdentityFacts, RobotEvent};
use super::lifecycle::LifecycleState;
use chrono::{DateTime, Utc};
use kiwi_protocol::RobotId;
use kiwi_protocol::message::HealthStatus;
use serde::{Deserialize, Serialize};

/// Health: an attribute beside the lifecycle state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    #[serde(with = "health_status")]
    pub status: HealthStatus,
    pub reasons: Vec<String>,
}

impl Health {
    pub fn healthy() -> Self {
        Health {
            status: HealthStatus::Healthy,
            reasons: Vec::new(),
        }
    }

    pub fn suspect(reason: impl Into<String>) -> Self {
        Health {
            status: HealthStatus::Suspect,
            reasons: vec![reason.into()],
        }
    }

    pub fn unreachable(reason: impl Into<String>) -> Self {
        Health {
            status: HealthStatus::Unreachable,
            reasons: vec![reason.into()],
        }
    }
}

/// `HealthStatus` as the lower-case names of the API.
pub mod health_status {
    use kiwi_protocol::message::HealthStatus;
    use serde::{Deserialize, Deserializer, Serializer};

    pub const ALL: [HealthStatus; 4] = [
        HealthStatus::Healthy,
        HealthStatus::Degraded,
        HealthStatus::Suspect,
        HealthStatus::Unreachable,
    ];

    pub fn parse(s: &str) -> Result<HealthStatus, String> {
        ALL.into_iter().find(|h| h.as_str() == s).ok_or_else(|| {
            format!("unknown health {s:?} (expected healthy, degraded, suspect or unreachable)")
        })
    }

    pub fn serialize<S: Serializer>(h: &HealthStatus, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(h.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<HealthStatus, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Whether the robot's main service (its workload) runs, as its agent
/// last reported it; stored and shown by name (`running`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    Running,
    Stopped,
    Failed,
    /// No workload unit is configured on the robot.
    NotConfigured,
    Unknown,
}

impl Workload {
    /// The stored (and JSON) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Running => "running",
            Workload::Stopped => "stopped",
            Workload::Failed => "failed",
            Workload::NotConfigured => "not_configured",
            Workload::Unknown => "unknown",
        }
    }

    /// The state of a stored name; an error names anything else.
    pub fn parse(s: &str) -> Result<Workload, String> {
        [
            Workload::Running,
            Workload::Stopped,
            Workload::Failed,
            Workload::NotConfigured,
            Workload::Unknown,
        ]
        .into_iter()
        .find(|w| w.as_str() == s)
        .ok_or_else(|| format!("unknown workload state {s:?}"))
    }
}

impl From<kiwi_protocol::message::WorkloadState> for Workload {
    fn from(w: kiwi_protocol::message::WorkloadState) -> Self {
        use kiwi_protocol::message::WorkloadState as W;
        match w {
            W::Running => Workload::Running,
            W::Stopped => Workload::Stopped,
            W::Failed => Workload::Failed,
            W::NotConfigured => Workload::NotConfigured,
            W::Unknown => Workload::Unknown,
        }
    }
}

/// The latest report an agent sent, as kept in the read model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastReport {
    pub seq: i64,
    pub time: DateTime<Utc>,
    pub workload: Workload,
    pub maintenance: bool,
    pub telemetry: serde_json::Value,
}

/// One robot as the read model (`robot_states`) holds it. Field names are
/// the original design's where they exist.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Robot {
    pub robot_id: RobotId,
    /// Version of the aggregate: the version of its last event.
    pub version: i64,
    pub state: LifecycleState,
    pub health: Health,
    pub hostname: String,
    pub ip_address: Option<String>,
    pub robot_type: String,
    pub model: Option<String>,
    pub firmware_version: Option<String>,
    pub agent_version: Option<String>,
    pub deployment_version: Option<String>,
    pub hardware_id: String,
    pub mac_addresses: Vec<String>,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub last_state_change: DateTime<Utc>,
    pub failure_count: i64,
    pub config: serde_json::Value,
    pub capabilities: Vec<String>,
    pub metadata: serde_json::Value,
    pub discovered_at: DateTime<Utc>,
    pub provisioned_at: Option<DateTime<Utc>>,
    pub activated_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// The highest report sequence number stored for this robot (0: none).
    pub last_report_seq: i64,
    pub last_report: Option<LastReport>,
}

/// An event that cannot apply to the robot as it is: a bug or a corrupt log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("event {event} needs an existing robot")]
    NoRobot { event: &'static str },
    #[error("robot already exists, cannot apply {event}")]
    AlreadyExists { event: &'static str },
    #[error("event {event} moves from {from} but the robot is {actual}")]
    WrongState {
        event: &'static str,
        from: LifecycleState,
        actual: LifecycleState,
    },
    #[error("event version {got} does not follow robot version {have}")]
    VersionGap { have: i64, got: i64 },
}

/// The part of a robot that decides whether an event applies to it: its
/// version and lifecycle state. The store checks appends against it
/// without reading the whole row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub version: i64,
    pub state: LifecycleState,
}

impl Head {
    /// Checks one event against a robot at `head` (`None` before its first
    /// event) and gives the head after it. Every check of [`Robot::apply`]
    /// is made here.
    pub fn next(head: Option<Head>, record: &EventRecord) -> Result<Head, ApplyError> {
        let name = record.event.type_name();
        let current = match (head, &record.event) {
            (None, RobotEvent::RobotDiscovered { .. }) => Head {
                version: 0,
                state: LifecycleState::Discovered,
            },
            (Some(_), RobotEvent::RobotDiscovered { .. }) => {
                return Err(ApplyError::AlreadyExists { event: name });
            }
            (None, _) => return Err(ApplyError::NoRobot { event: name }),
            (Some(h), _) => h,
        };
        if record.version != current.version + 1 {
            return Err(ApplyError::VersionGap {
                have: current.version,
                got: record.version,
            });
        }
        let state = match record.event.transition() {
            Some(t) if t.from() != current.state => {
                return Err(ApplyError::WrongState {
                    event: name,
                    from: t.from(),
                    actual: current.state,
                });
            }
            Some(t) => t.to(),
            None => current.state,
        };
        Ok(Head {
            version: record.version,
            state,
        })
    }
}

impl Robot {
    /// A robot's first row, from its `robot_discovered` event.
    fn discovered(robot_id: RobotId, facts: &IdentityFacts, at: DateTime<Utc>) -> Robot {
        Robot {
            robot_id,
            version: 0,
            state: LifecycleState::Discovered,
            health: Health::healthy(),
            hostname: facts.hostname.clone(),
            ip_address: facts.ip_address.clone(),
            robot_type: facts.robot_type.clone(),
            model: facts.model.clone(),
            firmware_version: facts.firmware_version.clone(),
            agent_version: facts.agent_version.clone(),
            deployment_version: None,
            hardware_id: facts.hardware_id.clone(),
            mac_addresses: facts.mac_addresses.clone(),
            last_heartbeat: None,
            last_state_change: at,
            failure_count: 0,
            config: serde_json::json!({}),
            capabilities: Vec::new(),
            metadata: serde_json::json!({}),
            discovered_at: at,
            provisioned_at: None,
            activated_at: None,
            updated_at: at,
            last_report_seq: 0,
            last_report: None,
        }
    }

    /// The identity facts currently recorded, to compare with new ones.
    pub fn identity_facts(&self) -> IdentityFacts {
        IdentityFacts {
            hostname: self.hostname.clone(),
            ip_address: self.ip_address.clone(),
            robot_type: self.robot_type.clone(),
            model: self.model.clone(),
            firmware_version: self.firmware_version.clone(),
            agent_version: self.agent_version.clone(),
            hardware_id: self.hardware_id.clone(),
            mac_addresses: self.mac_addresses.clone(),
        }
    }

    /// What [`Robot::apply`] checks an event against.
    pub fn head(&self) -> Head {
        Head {
            version: self.version,
            state: self.state,
        }
    }

    /// Applies one stored event to the robot it belongs to (`None` before
    /// its first event). Versions must follow without gaps, and a transition
    /// must start from the robot's current state: the checks of
    /// [`Head::next`], which `apply` makes first.
    pub fn apply(robot: Option<Robot>, record: &EventRecord) -> Result<Robot, ApplyError> {
        let head = Head::next(robot.as_ref().map(Robot::head), record)?;
        let at = record.recorded_at;
        let mut robot = match (robot, &record.event) {
            (Some(r), _) => r,
            (None, RobotEvent::RobotDiscovered { identity, .. }) => {
                Robot::discovered(record.robot_id, identity, at)
            }
            // `Head::next` refused this already.
            (None, event) => {
                return Err(ApplyError::NoRobot {
                    event: event.type_name(),
                });
            }
        };
        if record.event.transition().is_some() {
            robot.state = head.state;
            robot.last_state_change = at;
        }
        match &record.event {
            RobotEvent::RobotDiscovered { .. } => {}
            RobotEvent::RobotIdentityChanged { identity } => {
                robot.hostname = identity.hostname.clone();
                robot.ip_address = identity.ip_address.clone();
                robot.robot_type = identity.robot_type.clone();
                robot.model = identity.model.clone();
                robot.firmware_version = identity.firmware_version.clone();
                robot.agent_version = identity.agent_version.clone();
                robot.hardware_id = identity.hardware_id.clone();
                robot.mac_addresses = identity.mac_addresses.clone();
            }
            RobotEvent::RobotProvisioningStarted { .. } => {}
            RobotEvent::RobotProvisioned { .. } => robot.provisioned_at = Some(at),
            RobotEvent::RobotActivated {
                deployment_version, ..
            } => {
                robot.activated_at = Some(at);
                if deployment_version.is_some() {
                    robot.deployment_version = deployment_version.clone();
                }
            }
            RobotEvent::RobotDeactivated { .. }
            | RobotEvent::RobotMaintenanceStart { .. }
            | RobotEvent::RobotMaintenanceEnd { .. } => {}
            RobotEvent::RobotOffline { reason, .. } => {
                robot.failure_count += 1;
                robot.health = Health::unreachable(reason.clone());
            }
            RobotEvent::RobotRecovered { .. } => robot.health = Health::healthy(),
            RobotEvent::RobotFailed { .. } => robot.failure_count += 1,
            RobotEvent::RobotHealthChanged { health } => robot.health = health.clone(),
            RobotEvent::RobotEnrolled { .. } => {}
        }
        robot.version = record.version;
        robot.updated_at = at;
        Ok(robot)
    }

    /// Rebuilds a robot from its whole stream (the projection, for replay).
    pub fn replay<'a>(
        events: impl IntoIterator<Item = &'a EventRecord>,
    ) -> Result<Option<Robot>, ApplyError> {
        let mut robot = None;
        for e in events {
            robot = Some(Robot::apply(robot, e)?);
        }
        Ok(robot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiwi_protocol::message::WorkloadState;

    #[test]
    fn workload_states_have_one_name_each_and_come_from_the_agents() {
        for (w, name) in [
            (WorkloadState::Running, "running"),
            (WorkloadState::Stopped, "stopped"),
            (WorkloadState::Failed, "failed"),
            (WorkloadState::NotConfigured, "not_configured"),
            (WorkloadState::Unknown, "unknown"),
        ] {
            let ours = Workload::from(w);
            assert_eq!(ours.as_str(), name);
            assert_eq!(Workload::parse(name), Ok(ours));
            assert_eq!(serde_json::to_value(ours).unwrap(), serde_json::json!(name));
        }
        assert!(Workload::parse("Running").is_err());
    }
}
