//! Rebuilding the read model from the log: a robot's row is its snapshot
//! (if older events were pruned), its events applied in order with
//! [`Robot::apply`], then its latest report. Used by `kiwi-controller
//! replay` (rebuild everything, compare with the live read model) and by
//! `GET /api/v2/robots/{id}?at=` (one robot as it was at an instant).
//!
//! Pure: no I/O; the store supplies the inputs.

use crate::domain::robot::ApplyError;
use crate::domain::{EventRecord, Robot};
use crate::store::{Snapshot, StoredReport};
use kiwi_protocol::RobotId;
use std::collections::BTreeMap;

/// Incrementally rebuilds every row from snapshots, the whole log in
/// position order, and each robot's latest report.
#[derive(Debug, Default)]
pub struct Rebuild {
    rows: BTreeMap<RobotId, Robot>,
}

/// An event that does not apply, with where it is in the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event at position {position} (robot {robot_id}): {error}")]
pub struct ReplayError {
    pub position: i64,
    pub robot_id: RobotId,
    pub error: ApplyError,
}

impl Rebuild {
    pub fn new(snapshots: Vec<Snapshot>) -> Self {
        Rebuild {
            rows: snapshots
                .into_iter()
                .map(|s| (s.robot.robot_id, s.robot))
                .collect(),
        }
    }

    /// Applies the next event of the log. Events at or below a snapshot's
    /// version are already folded into it.
    pub fn event(&mut self, e: &EventRecord) -> Result<(), ReplayError> {
        if self
            .rows
            .get(&e.robot_id)
            .is_some_and(|r| e.version <= r.version)
        {
            return Ok(());
        }
        let current = self.rows.remove(&e.robot_id);
        let row = Robot::apply(current, e).map_err(|error| ReplayError {
            position: e.position,
            robot_id: e.robot_id,
            error,
        })?;
        self.rows.insert(e.robot_id, row);
        Ok(())
    }

    /// Adds the latest reports and returns the rows.
    pub fn finish(mut self, latest_reports: &[StoredReport]) -> BTreeMap<RobotId, Robot> {
        for rep in latest_reports {
            if let Some(r) = self.rows.get_mut(&rep.robot_id)
                && rep.seq >= r.last_report_seq
            {
                rep.apply_to(r);
            }
        }
        self.rows
    }
}

/// One robot whose live row differs from its rebuilt row.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub robot_id: RobotId,
    pub live: Option<Robot>,
    pub rebuilt: Option<Robot>,
}

/// Every robot whose live row is not exactly its rebuilt row.
pub fn compare(live: &[Robot], rebuilt: &BTreeMap<RobotId, Robot>) -> Vec<Difference> {
    let live: BTreeMap<RobotId, &Robot> = live.iter().map(|r| (r.robot_id, r)).collect();
    let mut ids: Vec<RobotId> = live.keys().chain(rebuilt.keys()).copied().collect();
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter()
        .filter_map(|id| {
            let l = live.get(&id).copied();
            let r = rebuilt.get(&id);
            (l != r).then(|| Difference {
                robot_id: id,
                live: l.cloned(),
                rebuilt: r.cloned(),
            })
        })
        .collect()
}
