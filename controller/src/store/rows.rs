//! Stored rows decoded into records, once for both backends.
//!
//! A backend says how it reads one typed column of its rows ([`Columns`]:
//! PostgreSQL has native UUIDs, times and JSONB; SQLite keeps them as text);
//! what a row means (which columns make a [`Robot`], an [`EventRecord`], an
//! enrollment...) and how a bad row is reported is decided here. A column
//! that does not decode makes the row [`StoreError::Corrupt`], naming the
//! row by its key and the column.

use super::auth::{
    ApiTokenRecord, CertificateRecord, EnrollmentRecord, EnrollmentStatus, EnrollmentTokenRecord,
    Role, uses,
};
use super::{Snapshot, StoreError, StoredReport};
use crate::domain::robot::LastReport;
use crate::domain::{EventMetadata, EventRecord, Health, LifecycleState, Robot, RobotEvent};
use chrono::{DateTime, Utc};
use kiwi_protocol::RobotId;
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// One row of a backend, read column by column. Each error names the
/// column and what was wrong with it.
pub(crate) trait Columns {
    fn text(&self, name: &str) -> Result<String, String>;
    fn opt_text(&self, name: &str) -> Result<Option<String>, String>;
    fn int(&self, name: &str) -> Result<i64, String>;
    fn flag(&self, name: &str) -> Result<bool, String>;
    fn uuid(&self, name: &str) -> Result<Uuid, String>;
    fn opt_uuid(&self, name: &str) -> Result<Option<Uuid>, String>;
    fn time(&self, name: &str) -> Result<DateTime<Utc>, String>;
    fn opt_time(&self, name: &str) -> Result<Option<DateTime<Utc>>, String>;
    fn json<T: DeserializeOwned>(&self, name: &str) -> Result<T, String>;
    fn opt_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, String>;
    /// A key column as text, for the message about a row that does not
    /// decode (never fails: an unreadable key says so).
    fn key(&self, name: &str) -> String;
}

fn state<R: Columns>(row: &R, name: &str) -> Result<LifecycleState, String> {
    let text = row.text(name)?;
    text.parse().map_err(|e| format!("column {name}: {e}"))
}

/// A `robot_states` row.
pub(crate) fn robot<R: Columns>(row: &R) -> Result<Robot, StoreError> {
    robot_fields(row)
        .map_err(|e| StoreError::Corrupt(format!("robot_states row {}: {e}", row.key("robot_id"))))
}

fn robot_fields<R: Columns>(row: &R) -> Result<Robot, String> {
    Ok(Robot {
        robot_id: RobotId(row.uuid("robot_id")?),
        version: row.int("version")?,
        state: state(row, "state")?,
        health: row.json::<Health>("health")?,
        hostname: row.text("hostname")?,
        ip_address: row.opt_text("ip_address")?,
        robot_type: row.text("robot_type")?,
        model: row.opt_text("model")?,
        firmware_version: row.opt_text("firmware_version")?,
        agent_version: row.opt_text("agent_version")?,
        deployment_version: row.opt_text("deployment_version")?,
        hardware_id: row.text("hardware_id")?,
        mac_addresses: row.json("mac_addresses")?,
        last_heartbeat: row.opt_time("last_heartbeat")?,
        last_state_change: row.time("last_state_change")?,
        failure_count: row.int("failure_count")?,
        config: row.json("config")?,
        capabilities: row.json("capabilities")?,
        metadata: row.json("metadata")?,
        discovered_at: row.time("discovered_at")?,
        provisioned_at: row.opt_time("provisioned_at")?,
        activated_at: row.opt_time("activated_at")?,
        updated_at: row.time("updated_at")?,
        last_report_seq: row.int("last_report_seq")?,
        last_report: row.opt_json::<LastReport>("last_report")?,
    })
}

/// An `events` row.
pub(crate) fn event<R: Columns>(row: &R) -> Result<EventRecord, StoreError> {
    event_fields(row).map_err(|e| {
        StoreError::Corrupt(format!(
            "event at position {} (robot {}): {e}",
            row.key("position"),
            row.key("robot_id")
        ))
    })
}

fn event_fields<R: Columns>(row: &R) -> Result<EventRecord, String> {
    let event_type = row.text("event_type")?;
    let data: serde_json::Value = row.json("data")?;
    let event = RobotEvent::from_parts(&event_type, data)
        .map_err(|e| format!("event {event_type:?}: {e}"))?;
    Ok(EventRecord {
        position: row.int("position")?,
        event_id: row.uuid("event_id")?,
        robot_id: RobotId(row.uuid("robot_id")?),
        version: row.int("version")?,
        event,
        metadata: row.json::<EventMetadata>("metadata")?,
        recorded_at: row.time("recorded_at")?,
    })
}

/// A `robot_reports` row.
pub(crate) fn report<R: Columns>(row: &R) -> Result<StoredReport, StoreError> {
    report_fields(row).map_err(|e| {
        StoreError::Corrupt(format!(
            "report {} of robot {}: {e}",
            row.key("seq"),
            row.key("robot_id")
        ))
    })
}

fn report_fields<R: Columns>(row: &R) -> Result<StoredReport, String> {
    Ok(StoredReport {
        robot_id: RobotId(row.uuid("robot_id")?),
        seq: row.int("seq")?,
        time: row.time("time")?,
        received_at: row.time("received_at")?,
        health: row.json("health")?,
        workload: crate::domain::Workload::parse(&row.text("workload")?)?,
        maintenance: row.flag("maintenance")?,
        telemetry: row.json("telemetry")?,
    })
}

/// A `robot_snapshots` row.
pub(crate) fn snapshot<R: Columns>(row: &R) -> Result<Snapshot, StoreError> {
    let fields = || -> Result<Snapshot, String> {
        Ok(Snapshot {
            robot: row.json("robot")?,
            taken_at: row.time("taken_at")?,
        })
    };
    fields()
        .map_err(|e| StoreError::Corrupt(format!("snapshot of robot {}: {e}", row.key("robot_id"))))
}

/// An `api_tokens` row.
pub(crate) fn api_token<R: Columns>(row: &R) -> Result<ApiTokenRecord, StoreError> {
    let fields = || -> Result<ApiTokenRecord, String> {
        let role = row.text("role")?;
        Ok(ApiTokenRecord {
            id: row.text("token_id")?,
            name: row.text("name")?,
            role: Role::parse(&role).ok_or_else(|| format!("column role: {role:?}"))?,
            secret_hash: row.text("secret_hash")?,
            created_at: row.time("created_at")?,
            expires_at: row.opt_time("expires_at")?,
            revoked_at: row.opt_time("revoked_at")?,
        })
    };
    fields().map_err(|e| StoreError::Corrupt(format!("api token {}: {e}", row.key("token_id"))))
}

/// An `enrollment_tokens` row.
pub(crate) fn enrollment_token<R: Columns>(row: &R) -> Result<EnrollmentTokenRecord, StoreError> {
    let fields = || -> Result<EnrollmentTokenRecord, String> {
        Ok(EnrollmentTokenRecord {
            id: row.text("token_id")?,
            secret_hash: row.text("secret_hash")?,
            created_at: row.time("created_at")?,
            expires_at: row.time("expires_at")?,
            uses_total: uses(row.int("uses_total")?, "uses_total")?,
            uses_left: uses(row.int("uses_left")?, "uses_left")?,
            revoked_at: row.opt_time("revoked_at")?,
            robot_id: row.opt_uuid("robot_id")?.map(RobotId),
        })
    };
    fields()
        .map_err(|e| StoreError::Corrupt(format!("enrollment token {}: {e}", row.key("token_id"))))
}

/// An `enrollments` row.
pub(crate) fn enrollment<R: Columns>(row: &R) -> Result<EnrollmentRecord, StoreError> {
    let fields = || -> Result<EnrollmentRecord, String> {
        let status = row.text("status")?;
        Ok(EnrollmentRecord {
            id: row.uuid("enrollment_id")?,
            robot_id: RobotId(row.uuid("robot_id")?),
            key_fingerprint: row.text("key_fingerprint")?,
            identity: row.json("identity")?,
            source_addr: row.text("source_addr")?,
            status: EnrollmentStatus::parse(&status)
                .ok_or_else(|| format!("column status: {status:?}"))?,
            first_seen: row.time("first_seen")?,
            last_seen: row.time("last_seen")?,
            decided_at: row.opt_time("decided_at")?,
            decided_by: row.opt_text("decided_by")?,
            reason: row.opt_text("reason")?,
        })
    };
    fields()
        .map_err(|e| StoreError::Corrupt(format!("enrollment {}: {e}", row.key("enrollment_id"))))
}

/// An `issued_certificates` row.
pub(crate) fn certificate<R: Columns>(row: &R) -> Result<CertificateRecord, StoreError> {
    let fields = || -> Result<CertificateRecord, String> {
        Ok(CertificateRecord {
            serial: row.text("serial")?,
            robot_id: RobotId(row.uuid("robot_id")?),
            key_fingerprint: row.text("key_fingerprint")?,
            not_before: row.time("not_before")?,
            not_after: row.time("not_after")?,
            issued_at: row.time("issued_at")?,
            revoked_at: row.opt_time("revoked_at")?,
        })
    };
    fields().map_err(|e| StoreError::Corrupt(format!("certificate {}: {e}", row.key("serial"))))
}
