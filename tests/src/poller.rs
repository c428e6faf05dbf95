//! Traffic during a fault: a background task that makes one API request
//! after another, at a steady pace, and keeps every failure with the time
//! it happened, so a test can say "not one request failed while …".

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{now_ms, wait_until};

/// What a [`Poller`] saw, once stopped.
#[derive(Debug)]
pub struct Polled {
    /// Requests made (answered or failed).
    pub total: usize,
    /// Each failure as `"<Unix ms>: <what went wrong>"`, in order.
    pub failures: Vec<String>,
    /// The slowest request.
    pub slowest: Duration,
}

/// Runs `check` every `every` (a request that takes longer delays the next
/// one) until stopped.
#[derive(Debug)]
pub struct Poller {
    stop: CancellationToken,
    made: Arc<AtomicUsize>,
    task: JoinHandle<(Vec<String>, Duration)>,
}

impl Poller {
    /// Starts polling: `check` makes one request and says what was wrong
    /// with its answer, if anything.
    pub fn start<F, Fut>(every: Duration, check: F) -> Poller
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send,
    {
        let stop = CancellationToken::new();
        let made = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (stop, made) = (stop.clone(), made.clone());
            async move {
                let mut failures = Vec::new();
                let mut slowest = Duration::ZERO;
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return (failures, slowest),
                        _ = tick.tick() => {}
                    }
                    let (at, started) = (now_ms(), Instant::now());
                    if let Err(e) = check().await {
                        failures.push(format!("{at}: {e:#}"));
                    }
                    slowest = slowest.max(started.elapsed());
                    made.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Poller { stop, made, task }
    }

    /// Requests made so far.
    pub fn made(&self) -> usize {
        self.made.load(Ordering::SeqCst)
    }

    /// Waits (up to `timeout`) until `more` requests were made after now.
    pub async fn wait_for_more(&self, more: usize, timeout: Duration) {
        let target = self.made() + more;
        wait_until(timeout, || async move {
            let made = self.made();
            anyhow::ensure!(made >= target, "{made} requests made, waiting for {target}");
            Ok(())
        })
        .await;
    }

    /// Stops polling and says what was seen.
    pub async fn stop(self) -> Polled {
        self.stop.cancel();
        let (failures, slowest) = self.task.await.expect("the poller task");
        Polled {
            total: self.made.load(Ordering::SeqCst),
            failures,
            slowest,
        }
    }
}
