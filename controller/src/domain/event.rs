//! The events of the event log: every change to a robot, and nothing else
//! (heartbeats and telemetry are not events).
//!
//! Event type names are the original design's where they exist
//! (`robot_discovered`, `robot_provisioned`, ...); the ones it lacked for the
//! full state machine are added (`robot_provisioning_started`,
//! `robot_offline`, `robot_identity_changed`, `robot_health_changed`).
//! Stored events are never rewritten: new kinds may be added, shipped ones
//! keep their names and fields.

use super::lifecycle::Transition;
use super::robot::Health;
use chrono::{DateTime, Utc};
use kiwi_protocol::RobotId;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What happened to a robot. Serialised as `{"type": ..., "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum RobotEvent {
    /// First sighting: the robot enters the log in state `discovered`.
    RobotDiscovered {
        #[serde(flatten)]
        identity: IdentityFacts,
        /// How it was found (`agent`, later `arp`, `sweep`, `ssh`).
        method: String,
    },
    /// Its identity facts changed (new IP, hostname, agent version, ...).
    RobotIdentityChanged {
        #[serde(flatten)]
        identity: IdentityFacts,
    },
    RobotProvisioningStarted {
        #[serde(flatten)]
        transition: Transition,
    },
    RobotProvisioned {
        #[serde(flatten)]
        transition: Transition,
    },
    RobotActivated {
        #[serde(flatten)]
        transition: Transition,
        deployment_version: Option<String>,
    },
    RobotDeactivated {
        #[serde(flatten)]
        transition: Transition,
    },
    RobotMaintenanceStart {
        #[serde(flatten)]
        transition: Transition,
        reason: Option<String>,
    },
    RobotMaintenanceEnd {
        #[serde(flatten)]
        transition: Transition,
    },
    RobotOffline {
        #[serde(flatten)]
        transition: Transition,
        reason: String,
    },
    RobotRecovered {
        #[serde(flatten)]
        transition: Transition,
    },
    RobotFailed {
        #[serde(flatten)]
        transition: Transition,
        reason: String,
    },
    RobotHealthChanged {
        health: Health,
    },
    /// The robot was given a client certificate by a token or an operator's
    /// approval (not a renewal over its link): after a decommission, this
    /// is how it came back. Recorded for robots already in the log.
    RobotEnrolled {
        #[serde(flatten)]
        enrollment: Enrollment,
    },
}

/// How a robot got a certificate, as `robot_enrolled` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    pub via: EnrolledVia,
    /// The token used, with `via = token`.
    pub token_id: Option<String>,
    /// The request an operator approved, with `via = approval`.
    pub enrollment_id: Option<Uuid>,
    /// Who approved it (`api-token:<id>`), with `via = approval`.
    pub approved_by: Option<String>,
    /// The new certificate's serial (hex) and the key it certifies.
    pub certificate_serial: String,
    pub key_fingerprint: String,
    /// Certificates of the robot this one replaced (revoked as it was
    /// issued: a robot has one key).
    pub certificates_revoked: u64,
}

/// What let a robot enroll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrolledVia {
    Token,
    Approval,
}

impl RobotEvent {
    /// The stored `type` name.
    pub fn type_name(&self) -> &'static str {
        match self {
            RobotEvent::RobotDiscovered { .. } => "robot_discovered",
            RobotEvent::RobotIdentityChanged { .. } => "robot_identity_changed",
            RobotEvent::RobotProvisioningStarted { .. } => "robot_provisioning_started",
            RobotEvent::RobotProvisioned { .. } => "robot_provisioned",
            RobotEvent::RobotActivated { .. } => "robot_activated",
            RobotEvent::RobotDeactivated { .. } => "robot_deactivated",
            RobotEvent::RobotMaintenanceStart { .. } => "robot_maintenance_start",
            RobotEvent::RobotMaintenanceEnd { .. } => "robot_maintenance_end",
            RobotEvent::RobotOffline { .. } => "robot_offline",
            RobotEvent::RobotRecovered { .. } => "robot_recovered",
            RobotEvent::RobotFailed { .. } => "robot_failed",
            RobotEvent::RobotHealthChanged { .. } => "robot_health_changed",
            RobotEvent::RobotEnrolled { .. } => "robot_enrolled",
        }
    }

    /// The lifecycle transition this event records, if any.
    pub fn transition(&self) -> Option<Transition> {
        match self {
            RobotEvent::RobotProvisioningStarted { transition }
            | RobotEvent::RobotProvisioned { transition }
            | RobotEvent::RobotActivated { transition, .. }
            | RobotEvent::RobotDeactivated { transition }
            | RobotEvent::RobotMaintenanceStart { transition, .. }
            | RobotEvent::RobotMaintenanceEnd { transition }
            | RobotEvent::RobotOffline { transition, .. }
            | RobotEvent::RobotRecovered { transition }
            | RobotEvent::RobotFailed { transition, .. } => Some(*transition),
            RobotEvent::RobotDiscovered { .. }
            | RobotEvent::RobotIdentityChanged { .. }
            | RobotEvent::RobotHealthChanged { .. }
            | RobotEvent::RobotEnrolled { .. } => None,
        }
    }

    /// Splits into the stored `type` and `data` columns.
    pub fn to_parts(&self) -> (&'static str, serde_json::Value) {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        let data = value
            .get_mut("data")
            .map(serde_json::Value::take)
            .unwrap_or_else(|| serde_json::json!({}));
        (self.type_name(), data)
    }

    /// Rebuilds from the stored `type` and `data` columns.
    pub fn from_parts(type_name: &str, data: serde_json::Value) -> Result<Self, serde_json::Error> {
        serde_json::from_value(serde_json::json!({ "type": type_name, "data": data }))
    }
}

/// What a robot says about itself, as recorded in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityFacts {
    pub hostname: String,
    pub ip_address: Option<String>,
    pub robot_type: String,
    pub model: Option<String>,
    pub firmware_version: Option<String>,
    pub agent_version: Option<String>,
    pub hardware_id: String,
    pub mac_addresses: Vec<String>,
}

/// Why an event was appended: the request or session that caused it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EventMetadata {
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    /// Who asked: `operator`, `agent`, `liveness`, ...
    pub actor: String,
}

/// An event about to be appended.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event: RobotEvent,
    pub metadata: EventMetadata,
    /// When it happened, as decided by the caller (who computes the robot's
    /// row with the same time); the store records exactly this value.
    pub recorded_at: DateTime<Utc>,
}

/// An event as stored: its global position and its version in the robot's
/// stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Position in the global log: strictly increasing, the watch stream's id.
    pub position: i64,
    pub event_id: Uuid,
    pub robot_id: RobotId,
    /// Version of the robot after this event: 1 for its first event, then
    /// +1 per event, unique per robot.
    pub version: i64,
    #[serde(flatten)]
    pub event: RobotEvent,
    pub metadata: EventMetadata,
    pub recorded_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::lifecycle::LifecycleState;

    #[test]
    fn parts_round_trip() {
        let ev = RobotEvent::RobotFailed {
            transition: Transition::new(LifecycleState::Ready, LifecycleState::Failed).unwrap(),
            reason: "motor bus gone".into(),
        };
        let (t, data) = ev.to_parts();
        assert_eq!(t, "robot_failed");
        assert_eq!(
            data,
            serde_json::json!({"from": "ready", "to": "failed", "reason": "motor bus gone"})
        );
        assert_eq!(RobotEvent::from_parts(t, data).unwrap(), ev);
        assert!(RobotEvent::from_parts("robot_exploded", serde_json::json!({})).is_err());
    }
}
