//! The checks every backend makes on an append before writing it, the same
//! way: its shape (row, report and robot agree; versions add up), and that
//! its events apply to the stored robot (through [`Head::next`], the checks
//! of [`Robot::apply`]).

use super::{Append, StoreError};
use crate::domain::{EventRecord, Head, Robot};

/// The contract of [`Append`] that does not need the database.
pub(super) fn check_shape(append: &Append) -> Result<(), StoreError> {
    let id = append.robot_id;
    if append.robot.robot_id != id {
        return Err(StoreError::Invalid(format!(
            "append for robot {id} carries the row of robot {}",
            append.robot.robot_id
        )));
    }
    let expected_row_version = append.expected_version + append.events.len() as i64;
    if append.robot.version != expected_row_version {
        return Err(StoreError::Invalid(format!(
            "robot {id}: row version {} after {} events from version {} (expected {expected_row_version})",
            append.robot.version,
            append.events.len(),
            append.expected_version
        )));
    }
    if let Some(report) = &append.report
        && report.robot_id != id
    {
        return Err(StoreError::Invalid(format!(
            "append for robot {id} carries a report of robot {}",
            report.robot_id
        )));
    }
    Ok(())
}

/// The append's events as they will be stored; positions are filled in by
/// the insert.
pub(super) fn records_of(append: &Append) -> Vec<EventRecord> {
    (1..)
        .zip(&append.events)
        .map(|(offset, new)| EventRecord {
            position: 0,
            event_id: new.event_id,
            robot_id: append.robot_id,
            version: append.expected_version + offset,
            event: new.event.clone(),
            metadata: new.metadata.clone(),
            recorded_at: new.recorded_at,
        })
        .collect()
}

/// Refuses events that do not apply to the stored robot (its head: see
/// [`Head::next`]), a first append without events, and a row in another
/// state than the events lead to.
pub(super) fn check_against_log(
    robot: &Robot,
    stored: Option<Head>,
    records: &[EventRecord],
) -> Result<(), StoreError> {
    let id = robot.robot_id;
    let mut projected = stored;
    for record in records {
        projected = Some(Head::next(projected, record).map_err(|e| {
            StoreError::Invalid(format!("robot {id}: event version {}: {e}", record.version))
        })?);
    }
    let Some(projected) = projected else {
        return Err(StoreError::Invalid(format!(
            "robot {id} has no events: its first append must record robot_discovered"
        )));
    };
    if projected.state != robot.state {
        return Err(StoreError::Invalid(format!(
            "robot {id}: row says {} but its events leave it {}",
            robot.state, projected.state
        )));
    }
    Ok(())
}
