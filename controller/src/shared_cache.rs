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

use crate::cache::RobotCache;
use crate::domain::Robot;
use crate::redis::RedisCache;
use kiwi_protocol::RobotId;
use kiwi_protocol::backoff::Backoff;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

const UP: u8 = 0;
const DOWN: u8 = 1;
const REFILLING: u8 = 2;

/// How often a down Redis is pinged: the one backoff policy, from 100 ms
/// to at most a second apart.
const RECOVERY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));

#[derive(Debug, Clone)]
pub struct SharedCache {
    redis: RedisCache,
    state: Arc<AtomicU8>,
}

impl SharedCache {
    /// Starts `Refilling`: whatever Redis holds from before this process is
    /// not trusted until the read model has been put back.
    pub fn new(redis: RedisCache, local: Arc<RobotCache>) -> SharedCache {
        let c = SharedCache {
            redis,
            state: Arc::new(AtomicU8::new(DOWN)),
        };
        c.start_recovery(local);
        c
    }

    /// Whether reads may use Redis.
    pub fn is_up(&self) -> bool {
        self.state.load(Ordering::Acquire) == UP
    }

    /// A short word for `/readyz`.
    pub fn status(&self) -> &'static str {
        match self.state.load(Ordering::Acquire) {
            UP => "up",
            REFILLING => "refilling",
            _ => "down",
        }
    }

    /// Reads one robot from Redis: `Ok(None)` is a miss, `Err(())` means
    /// "not usable now, read elsewhere".
    pub async fn get(&self, id: RobotId, local: &Arc<RobotCache>) -> Result<Option<Robot>, ()> {
        if !self.is_up() {
            return Err(());
        }
        self.redis.get(id).await.map_err(|e| {
            self.fail(&e, local);
        })
    }

    /// Writes a committed row through (skipped while Redis is down; the
    /// refill covers it). The caller has already put it in `local`.
    pub async fn put(&self, robot: &Robot, local: &Arc<RobotCache>) {
        if self.state.load(Ordering::Acquire) == DOWN {
            return;
        }
        if let Err(e) = self.redis.put(robot).await {
            self.fail(&e, local);
        }
    }

    fn fail(&self, e: &crate::redis::RedisError, local: &Arc<RobotCache>) {
        let before = self.state.swap(DOWN, Ordering::AcqRel);
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
                if this.redis.ping().await.is_ok() {
                    // Commits from now on are written through; everything
                    // before is in `local` and is put back now.
                    this.state.store(REFILLING, Ordering::Release);
                    let robots = local.all();
                    let mut ok = true;
                    for r in &robots {
                        if this.state.load(Ordering::Acquire) == DOWN {
                            ok = false;
                            break;
                        }
                        if let Err(e) = this.redis.put(r).await {
                            tracing::warn!(error = %e, "Redis refill interrupted");
                            this.state.store(DOWN, Ordering::Release);
                            ok = false;
                            break;
                        }
                    }
                    if ok
                        && this
                            .state
                            .compare_exchange(REFILLING, UP, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                    {
                        tracing::info!(robots = robots.len(), "Redis is back and refilled");
                        return;
                    }
                }
                tokio::time::sleep(RECOVERY.delay(attempt, rand::random::<f64>())).await;
                attempt = attempt.saturating_add(1);
            }
        });
    }
}
