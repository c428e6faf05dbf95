//! The shared cache tier: Redis in front of the store when configured, with
//! the health bookkeeping that keeps it coherent.
//!
//! States: `Up` (reads go to Redis first, every commit is written through),
//! `Down` (a Redis operation failed: reads and writes skip Redis, a recovery
//! task pings it), `Refilling` (Redis answers again: every robot of the
//! in-process read model is put back, version-checked, while new commits are
//! written through as well; reads still skip it). Only then `Up` again. A
//! row is never served from Redis unless every commit since it was written
//! has been written through or refilled, so no stale entry is ever served
//! after a newer event was acknowledged.
//!
//! A refill survives a busy Redis or a busy controller: robots are put back
//! [`REFILL_IN_FLIGHT`] at a time; one whose put (or whose write-through,
//! while refilling) fails is remembered and put again from the read model,
//! after a pause, until none is left. Only a failed ping sends the tier back
//! to `Down`. The switch to `Up` happens under the same lock the
//! write-through failures take, so no failed write is forgotten.

use crate::cache::RobotCache;
use crate::domain::Robot;
use crate::redis::RedisCache;
use futures_util::StreamExt;
use kiwi_protocol::RobotId;
use kiwi_protocol::backoff::Backoff;
use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

const UP: u8 = 0;
const DOWN: u8 = 1;
const REFILLING: u8 = 2;

/// How often a down Redis is pinged, and how long a refill waits before
/// putting back the robots whose puts failed: the one backoff policy, from
/// 100 ms to at most a second apart.
const RECOVERY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));

/// Puts of a refill in flight at once (one multiplexed connection carries
/// them; Redis runs them one after the other).
pub const REFILL_IN_FLIGHT: usize = 32;

#[derive(Debug, Clone)]
pub struct SharedCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    redis: RedisCache,
    state: AtomicU8,
    /// Robots whose latest row may be missing from Redis although the
    /// refill already passed them: put again before `Up`.
    unsynced: Mutex<HashSet<RobotId>>,
}

impl SharedCache {
    /// Starts `Down`: whatever Redis holds from before this process is not
    /// trusted until the read model has been put back.
    pub fn new(redis: RedisCache, local: Arc<RobotCache>) -> SharedCache {
        let c = SharedCache {
            inner: Arc::new(Inner {
                redis,
                state: AtomicU8::new(DOWN),
                unsynced: Mutex::new(HashSet::new()),
            }),
        };
        c.start_recovery(local);
        c
    }

    fn state(&self) -> u8 {
        self.inner.state.load(Ordering::Acquire)
    }

    /// Whether reads may use Redis.
    pub fn is_up(&self) -> bool {
        self.state() == UP
    }

    /// A short word for `/readyz`.
    pub fn status(&self) -> &'static str {
        match self.state() {
            UP => "up",
            REFILLING => "refilling",
            _ => "down",
        }
    }

    fn unsynced(&self) -> std::sync::MutexGuard<'_, HashSet<RobotId>> {
        self.inner
            .unsynced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads one robot from Redis: `Ok(None)` is a miss, `Err(())` means
    /// "not usable now, read elsewhere".
    pub async fn get(&self, id: RobotId, local: &Arc<RobotCache>) -> Result<Option<Robot>, ()> {
        if !self.is_up() {
            return Err(());
        }
        self.inner.redis.get(id).await.map_err(|e| {
            self.fail(&e, local);
        })
    }

    /// Writes a committed row through (skipped while Redis is down; the
    /// refill covers it). The caller has already put it in `local`.
    pub async fn put(&self, robot: &Robot, local: &Arc<RobotCache>) {
        if self.state() == DOWN {
            return;
        }
        let Err(e) = self.inner.redis.put(robot).await else {
            return;
        };
        let mut unsynced = self.unsynced();
        match self.state() {
            // The refill puts it back before it declares Redis up.
            REFILLING => {
                unsynced.insert(robot.robot_id);
            }
            UP => {
                drop(unsynced);
                self.fail(&e, local);
            }
            _ => {}
        }
    }

    fn fail(&self, e: &crate::redis::RedisError, local: &Arc<RobotCache>) {
        let before = self.inner.state.swap(DOWN, Ordering::AcqRel);
        // Only a failure while up starts a recovery task: while refilling,
        // the running task sees `DOWN` and goes back to pinging.
        if before == UP {
            tracing::warn!(error = %e, "Redis failed; serving from the store until it is back");
            self.start_recovery(local.clone());
        }
    }

    fn start_recovery(&self, local: Arc<RobotCache>) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut attempt = 0;
            loop {
                if this.inner.redis.ping().await.is_ok() && this.refill(&local).await {
                    return;
                }
                tokio::time::sleep(RECOVERY.delay(attempt, rand::random::<f64>())).await;
                attempt = attempt.saturating_add(1);
            }
        });
    }

    /// Puts the whole read model back and declares Redis up; `false` if
    /// Redis stopped answering meanwhile (the tier is `Down` again).
    async fn refill(&self, local: &Arc<RobotCache>) -> bool {
        // Commits from now on are written through; everything before is
        // in `local` and is put back now.
        self.unsynced().clear();
        self.inner.state.store(REFILLING, Ordering::Release);
        let started = std::time::Instant::now();
        let mut pending: Vec<RobotId> = local.all().iter().map(|r| r.robot_id).collect();
        let robots = pending.len();
        let mut round = 0;
        loop {
            let failed = self.put_back(local, pending).await;
            // Under the lock write-through failures take: either a failed
            // write is seen here, or it sees `Up` afterwards and goes
            // `Down` itself.
            let again = {
                let mut unsynced = self.unsynced();
                unsynced.extend(failed);
                if unsynced.is_empty() {
                    let up = self.inner.state.compare_exchange(
                        REFILLING,
                        UP,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    ControlFlow::Break(up.is_ok())
                } else {
                    ControlFlow::Continue(unsynced.drain().collect::<Vec<_>>())
                }
            };
            let again = match again {
                ControlFlow::Continue(again) => again,
                ControlFlow::Break(false) => return false,
                ControlFlow::Break(true) => {
                    tracing::info!(
                        robots,
                        rounds = round + 1,
                        took = ?started.elapsed(),
                        "Redis is back and refilled"
                    );
                    return true;
                }
            };
            pending = again;
            tracing::debug!(
                left = pending.len(),
                "Redis refill: some puts failed; putting them again"
            );
            tokio::time::sleep(RECOVERY.delay(round, rand::random::<f64>())).await;
            round = round.saturating_add(1);
            if let Err(e) = self.inner.redis.ping().await {
                tracing::warn!(error = %e, "Redis refill interrupted");
                self.inner.state.store(DOWN, Ordering::Release);
                return false;
            }
        }
    }

    /// Puts these robots' current rows (from `local`) into Redis, a few at
    /// a time; returns the ones whose put failed.
    async fn put_back(&self, local: &Arc<RobotCache>, ids: Vec<RobotId>) -> Vec<RobotId> {
        let redis = &self.inner.redis;
        futures_util::stream::iter(ids)
            .map(|id| async move {
                // A robot gone from the read model has nothing to put back.
                let robot = local.peek(&id)?;
                redis.put(&robot.robot).await.err().map(|_| id)
            })
            .buffer_unordered(REFILL_IN_FLIGHT)
            .filter_map(std::future::ready)
            .collect()
            .await
    }
}
