//! Operator commands that work on the store directly: `replay` (rebuild the
//! read model from the log and compare it with the live one) and `prune`
//! (fold old events into snapshots). The rebuilding itself is
//! [`crate::replay`]; this module feeds it from a store.

use crate::domain::Robot;
use crate::replay::{Difference, Rebuild, ReplayError, compare};
use crate::store::{EventStore, StoreError};
use chrono::{DateTime, Utc};
use kiwi_protocol::RobotId;
use kiwi_protocol::settings::parse_duration;
use std::collections::BTreeMap;

/// Events read per page while replaying the whole log.
const REPLAY_PAGE: u32 = 5000;

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Replay(#[from] ReplayError),
}

/// Every robot's row rebuilt from snapshots, the whole log and the latest
/// reports, and how many events were read.
pub async fn rebuild(store: &dyn EventStore) -> Result<(BTreeMap<RobotId, Robot>, u64), OpsError> {
    let mut rebuild = Rebuild::new(store.snapshots().await?);
    let mut after = 0;
    let mut events = 0u64;
    loop {
        let page = store.events_after(after, REPLAY_PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        events += page.len() as u64;
        for e in &page {
            rebuild.event(e)?;
        }
    }
    let reports = store.latest_reports().await?;
    Ok((rebuild.finish(&reports), events))
}

/// The outcome of `kiwi-controller replay`.
#[derive(Debug)]
pub struct ReplayCheck {
    pub robots: usize,
    pub events: u64,
    pub differences: Vec<Difference>,
}

/// Rebuilds the read model and compares it with the live one.
pub async fn replay_check(store: &dyn EventStore) -> Result<ReplayCheck, OpsError> {
    let (rebuilt, events) = rebuild(store).await?;
    let live = store.robots().await?;
    Ok(ReplayCheck {
        robots: rebuilt.len().max(live.len()),
        events,
        differences: compare(&live, &rebuilt),
    })
}

/// Parses `--before`: an RFC 3339 time, or an age such as `30d`, `12h`, `90m`.
pub fn parse_before(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let age = match text.trim().strip_suffix('d') {
        Some(days) => days
            .trim()
            .parse::<u64>()
            .map(|d| std::time::Duration::from_secs(d * 86_400))
            .map_err(|_| format!("invalid age {text:?}")),
        None => parse_duration(text),
    }
    .map_err(|e| format!("{e} (expected an RFC 3339 time or an age such as 30d, 12h)"))?;
    let age = chrono::Duration::from_std(age).map_err(|e| format!("age {text:?}: {e}"))?;
    Ok(now - age)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn before_takes_times_and_ages() {
        let now = Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap();
        assert_eq!(
            parse_before("30d", now).unwrap(),
            Utc.with_ymd_and_hms(2026, 10, 29, 12, 0, 0).unwrap()
        );
        assert_eq!(
            parse_before("2h", now).unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 0).unwrap()
        );
        assert_eq!(
            parse_before("2026-11-01T00:00:00Z", now).unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap()
        );
        assert!(parse_before("last tuesday", now).is_err());
    }
}
