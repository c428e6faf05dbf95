//! The shared cache tier: Redis in front of the store when configured, with
//! the health bookkeeping that keeps it coherent.
//!
//! States: `Up` (reads go to Redis first, every commit is written through),
//! `Down` (Redis broke: reads and writes skip it, a recovery task pings it),
//! `Refilling` (Redis answers again: every robot of the in-process read
//! model is put back, version-checked, while new commits are written through
//! as well; reads still skip it). Only then `Up` again. A row is never
//! served from Redis unless every commit since it was written has been
//! written through or put back, so no stale entry is ever served after a
//! newer event was acknowledged.
//!
//! Slow is not broken. A write that times out (Redis or this process is
//! busy) leaves only that robot's row in doubt: the robot is marked
//! *unsynced*, reads of it skip Redis, and a repair task puts its current
//! row back. Only a failure that is not a timeout (a broken connection, a
//! refusal: Redis may have restarted, with whatever it held) or
//! [`SLOW_PINGS`] timed-out pings in a row send the tier `Down`, which costs
//! a refill of every robot. A refill puts every robot back,
//! [`REFILL_IN_FLIGHT`] at a time, and those whose puts (or write-throughs)
//! failed meanwhile stay unsynced for the repair: so a busy Redis (or a busy
//! controller) delays only those rows, never the whole tier. Marking a
//! robot unsynced and the switch to `Up` take the same lock, so no failed
//! write is forgotten.

use crate::cache::RobotCache;
use crate::cache::redis::{RedisCache, RedisError};
use crate::domain::Robot;
use futures_util::StreamExt;
use kiwi_protocol::RobotId;
use kiwi_protocol::backoff::Backoff;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

const UP: u8 = 0;
const DOWN: u8 = 1;
const REFILLING: u8 = 2;

/// How often a down Redis is pinged, and how long repairs and refills wait
/// before putting back the robots whose puts failed: the one backoff
/// policy, from 100 ms to at most a second apart.
const RECOVERY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));

/// Puts of a refill or repair in flight at once (one multiplexed connection
/// carries them; Redis runs them one after the other).
pub const REFILL_IN_FLIGHT: usize = 32;

/// Timed-out pings in a row after which Redis counts as down, not slow (a
/// frozen Redis answers nothing at all).
pub const SLOW_PINGS: u32 = 3;

#[derive(Debug, Clone)]
pub struct SharedCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    redis: RedisCache,
    local: Arc<RobotCache>,
    state: AtomicU8,
    /// Robots whose latest row may be missing from Redis: not read from it,
    /// and put back before it counts as up (refilling) or by the repair
    /// task (up).
    unsynced: Mutex<HashSet<RobotId>>,
    /// A repair task runs.
    repairing: AtomicBool,
}

/// What the pings of a task concluded.
enum Health {
    Answers,
    /// Timed out, fewer than [`SLOW_PINGS`] times in a row so far.
    Slow,
    Broken(RedisError),
}

impl SharedCache {
    /// Starts `Down`: whatever Redis holds from before this process is not
    /// trusted until the read model has been put back.
    pub fn new(redis: RedisCache, local: Arc<RobotCache>) -> SharedCache {
        let c = SharedCache {
            inner: Arc::new(Inner {
                redis,
                local,
                state: AtomicU8::new(DOWN),
                unsynced: Mutex::new(HashSet::new()),
                repairing: AtomicBool::new(false),
            }),
        };
        c.start_recovery();
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

    fn unsynced(&self) -> MutexGuard<'_, HashSet<RobotId>> {
        self.inner
            .unsynced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads one robot from Redis: `Ok(None)` is a miss, `Err(())` means
    /// "not usable now, read elsewhere".
    pub async fn get(&self, id: RobotId) -> Result<Option<Robot>, ()> {
        if !self.is_up() || self.unsynced().contains(&id) {
            return Err(());
        }
        match self.inner.redis.get(id).await {
            Ok(found) => Ok(found),
            Err(e) => {
                if e.is_timeout() {
                    // Slow: read elsewhere; the repair task's pings tell
                    // slow from frozen.
                    self.start_repair();
                } else {
                    self.fail(&e);
                }
                Err(())
            }
        }
    }

    /// Writes a committed row through (skipped while Redis is down; the
    /// refill covers it). The caller has already put it in the read model.
    pub async fn put(&self, robot: &Robot) {
        if self.state() == DOWN {
            return;
        }
        let Err(e) = self.inner.redis.put(robot).await else {
            return;
        };
        let state = {
            let mut unsynced = self.unsynced();
            let state = self.state();
            if state != DOWN {
                unsynced.insert(robot.robot_id);
            }
            state
        };
        match state {
            // Unsynced: the refill hands it to the repair.
            REFILLING if e.is_timeout() => {}
            // Redis broke: the refill must not declare it up; the recovery
            // starts over.
            REFILLING => self.inner.state.store(DOWN, Ordering::Release),
            UP if e.is_timeout() => self.start_repair(),
            UP => self.fail(&e),
            _ => {}
        }
    }

    fn fail(&self, e: &RedisError) {
        let before = self.inner.state.swap(DOWN, Ordering::AcqRel);
        // Only a failure while up starts a recovery task: while refilling,
        // the running task sees `DOWN` and goes back to pinging.
        if before == UP {
            tracing::warn!(error = %e, "Redis failed; serving from the store until it is back");
            self.start_recovery();
        }
    }

    /// Pings Redis once. `slow` counts the timed-out pings in a row before
    /// this one: the [`SLOW_PINGS`]th in a row counts as broken.
    async fn check(&self, slow: &mut u32) -> Health {
        match self.inner.redis.ping().await {
            Ok(()) => {
                *slow = 0;
                Health::Answers
            }
            Err(e) if e.is_timeout() && *slow + 1 < SLOW_PINGS => {
                *slow += 1;
                Health::Slow
            }
            Err(e) => Health::Broken(e),
        }
    }

    /// While up, puts the unsynced robots back (one task at a time).
    fn start_repair(&self) {
        if self.inner.repairing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut round = 0;
            let mut slow = 0;
            loop {
                if this.state() != UP {
                    // A recovery or a refill has taken over.
                    this.inner.repairing.store(false, Ordering::Release);
                    return;
                }
                match this.check(&mut slow).await {
                    Health::Broken(e) => {
                        this.inner.repairing.store(false, Ordering::Release);
                        this.fail(&e);
                        return;
                    }
                    Health::Slow => {}
                    Health::Answers => {
                        let ids: Vec<RobotId> = this.unsynced().iter().copied().collect();
                        let failed: HashSet<RobotId> =
                            this.put_back(ids.clone()).await.into_iter().collect();
                        let left = {
                            let mut unsynced = this.unsynced();
                            for id in ids.iter().filter(|id| !failed.contains(id)) {
                                unsynced.remove(id);
                            }
                            if unsynced.is_empty() {
                                // Under the lock: a write that fails from
                                // now on sees no repair and starts one.
                                this.inner.repairing.store(false, Ordering::Release);
                            }
                            unsynced.len()
                        };
                        if left == 0 {
                            tracing::debug!(robots = ids.len(), "Redis rows repaired");
                            return;
                        }
                    }
                }
                tokio::time::sleep(RECOVERY.delay(round, rand::random::<f64>())).await;
                round = round.saturating_add(1);
            }
        });
    }

    fn start_recovery(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut attempt = 0;
            loop {
                if this.inner.redis.ping().await.is_ok() && this.refill().await {
                    return;
                }
                tokio::time::sleep(RECOVERY.delay(attempt, rand::random::<f64>())).await;
                attempt = attempt.saturating_add(1);
            }
        });
    }

    /// Puts the whole read model back and declares Redis up, handing the
    /// robots whose puts failed (they stay unsynced, never read from Redis)
    /// to a repair; `false` if Redis broke meanwhile (the tier is `Down`
    /// again).
    async fn refill(&self) -> bool {
        // Commits from now on are written through (a failed one marks its
        // robot unsynced); everything before is in the read model and is
        // put back now.
        self.unsynced().clear();
        self.inner.state.store(REFILLING, Ordering::Release);
        let started = std::time::Instant::now();
        let all: Vec<RobotId> = self.inner.local.all().iter().map(|r| r.robot_id).collect();
        let robots = all.len();
        let failed = self.put_back(all).await;
        let (up, unsynced) = {
            // Under the lock failed write-throughs take: a write that fails
            // from now on sees `Up` and repairs.
            let mut unsynced = self.unsynced();
            unsynced.extend(failed);
            let up = self
                .inner
                .state
                .compare_exchange(REFILLING, UP, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            (up, unsynced.len())
        };
        if !up {
            return false;
        }
        tracing::info!(
            robots,
            unsynced,
            took = ?started.elapsed(),
            "Redis is back and refilled"
        );
        if unsynced > 0 {
            self.start_repair();
        }
        true
    }

    /// Robots whose row Redis may not have (read from the store instead)
    /// until a repair puts them back.
    pub fn unsynced_robots(&self) -> usize {
        self.unsynced().len()
    }

    /// Puts these robots' current rows (from the read model) into Redis, a
    /// few at a time; returns the ones whose put failed.
    async fn put_back(&self, ids: Vec<RobotId>) -> Vec<RobotId> {
        let (redis, local) = (&self.inner.redis, &self.inner.local);
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
