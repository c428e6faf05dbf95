//! The in-process read-model cache: every robot's current row, with its
//! JSON serialised once per change so that reads and lists only copy bytes.
//!
//! Coherence: an entry is replaced only by a row at least as new (by
//! aggregate version, then report sequence), so a late writer can never put
//! back an older row after a newer one was stored.
//!
//! The shared tier in front of the store, when Redis is configured, lives
//! beside it: [`redis`] (rows, indexes and leases in Redis) and [`shared`]
//! (the tier's health, which keeps Redis coherent across outages).

pub mod redis;
pub mod shared;

use crate::domain::{LifecycleState, Robot};
use crate::metrics::Metrics;
use bytes::Bytes;
use kiwi_protocol::RobotId;
use kiwi_protocol::message::HealthStatus;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};

/// One cached robot: the row and its JSON.
#[derive(Debug, Clone)]
pub struct Entry {
    pub robot: Arc<Robot>,
    /// `serde_json` of `robot`; always a JSON object.
    pub json: Bytes,
}

impl Entry {
    pub fn new(robot: Arc<Robot>) -> Entry {
        // A `Robot` always serialises (no maps with non-string keys).
        let json = serde_json::to_vec(&*robot).unwrap_or_else(|_| b"{}".to_vec());
        Entry {
            robot,
            json: Bytes::from(json),
        }
    }

    fn freshness(&self) -> (i64, i64) {
        (self.robot.version, self.robot.last_report_seq)
    }
}

/// Filters of a robot list; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub state: Option<LifecycleState>,
    pub robot_type: Option<String>,
    pub health: Option<HealthStatus>,
}

impl Filter {
    pub fn matches(&self, r: &Robot) -> bool {
        self.state.is_none_or(|s| r.state == s)
            && self.robot_type.as_deref().is_none_or(|t| r.robot_type == t)
            && self.health.is_none_or(|h| r.health.status == h)
    }
}

#[derive(Debug)]
pub struct RobotCache {
    entries: RwLock<BTreeMap<RobotId, Entry>>,
    metrics: Arc<Metrics>,
}

impl RobotCache {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        RobotCache {
            entries: RwLock::new(BTreeMap::new()),
            metrics,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<RobotId, Entry>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (inserts are single operations), so a poisoned lock is still valid.
        self.entries.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads one robot, counting a hit or a miss.
    pub fn get(&self, id: &RobotId) -> Option<Entry> {
        let found = self.read().get(id).cloned();
        match found {
            Some(_) => self.metrics.cache_hits.inc(),
            None => self.metrics.cache_misses.inc(),
        };
        found
    }

    /// Reads one robot for internal bookkeeping, without counting it as an
    /// API cache hit or miss.
    pub fn peek(&self, id: &RobotId) -> Option<Entry> {
        self.read().get(id).cloned()
    }

    /// Stores `robot` unless the cache already holds it or a newer row (by
    /// version and report sequence). Returns whether it was stored. A commit
    /// is written once: by the fleet when it made it, or by the projector
    /// when another controller did (the projector finds this controller's
    /// own commits already here, under a read lock).
    pub fn put(&self, robot: Arc<Robot>) -> bool {
        let entry = Entry::new(robot);
        let held = |old: &Entry| old.freshness() >= entry.freshness();
        if self.read().get(&entry.robot.robot_id).is_some_and(held) {
            return false;
        }
        let new_state = entry.robot.state;
        let mut map = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let old_state = match map.get(&entry.robot.robot_id) {
            Some(old) if held(old) => return false,
            Some(old) => Some(old.robot.state),
            None => None,
        };
        map.insert(entry.robot.robot_id, entry);
        drop(map);
        if old_state != Some(new_state) {
            if let Some(old) = old_state {
                self.count(old, -1);
            }
            self.count(new_state, 1);
        }
        true
    }

    /// Keeps the per-state gauges equal to the cache's counts.
    fn count(&self, state: LifecycleState, delta: i64) {
        match state {
            LifecycleState::Active => self.metrics.active_robots.inc_by(delta),
            LifecycleState::Failed => self.metrics.failed_robots.inc_by(delta),
            _ => 0,
        };
        self.metrics
            .robots_by_state
            .get_or_create(&crate::metrics::StateLabels {
                state: state.as_str(),
            })
            .inc_by(delta);
    }

    /// A page of robots in id order after `cursor`, and the cursor of the
    /// next page.
    pub fn list(
        &self,
        filter: &Filter,
        cursor: Option<RobotId>,
        limit: usize,
    ) -> (Vec<Entry>, Option<RobotId>) {
        let map = self.read();
        let start = match cursor {
            Some(c) => Bound::Excluded(c),
            None => Bound::Unbounded,
        };
        let mut page = Vec::with_capacity(limit.min(map.len()));
        let mut more = false;
        for (_, e) in map.range((start, Bound::Unbounded)) {
            if !filter.matches(&e.robot) {
                continue;
            }
            if page.len() == limit {
                more = true;
                break;
            }
            page.push(e.clone());
        }
        let next = if more {
            page.last().map(|e| e.robot.robot_id)
        } else {
            None
        };
        (page, next)
    }

    /// Every robot (for counts and sweeps).
    pub fn all(&self) -> Vec<Arc<Robot>> {
        self.read().values().map(|e| e.robot.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
