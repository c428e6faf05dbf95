//! The watch hub: every stored event, in log order, for `GET /api/v2/watch`.
//!
//! The projector follows the store's commit feed, updates the cache first
//! and only then publishes, so a client that reacts to an event by reading
//! the robot never gets an older row. A subscriber resumes from a position:
//! it subscribes to the hub first, reads the log after its position from the
//! store, then follows the hub, skipping what it already sent; nothing is
//! missed in between and nothing is sent twice.

use crate::cache::RobotCache;
use crate::domain::EventRecord;
use crate::store::{Committed, EventStore, StoreError};
use bytes::Bytes;
use std::sync::{Arc, OnceLock};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

/// One event ready to send: serialised once for every client.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchItem {
    pub position: i64,
    pub event_type: &'static str,
    /// The event as API JSON.
    pub json: Bytes,
}

impl WatchItem {
    pub fn new(record: &EventRecord) -> WatchItem {
        WatchItem {
            position: record.position,
            event_type: record.event.type_name(),
            json: Bytes::from(serde_json::to_vec(record).unwrap_or_else(|_| b"{}".to_vec())),
        }
    }
}

#[derive(Debug, Clone)]
enum HubMessage {
    Event(Arc<WatchItem>),
    /// The projector fell behind the store and skipped commits: subscribers
    /// must read the log again from their position.
    Resync,
}

/// Publishes events to watch clients.
#[derive(Debug, Clone)]
pub struct Hub {
    tx: broadcast::Sender<HubMessage>,
    /// How many subscriptions follow the hub live (see [`Hub::following`]).
    following: Arc<watch::Sender<usize>>,
}

/// Events buffered per hub before a slow subscriber is made to catch up
/// from the store.
const HUB_CAPACITY: usize = 8192;

/// Events read from the store per catch-up query.
const CATCH_UP_PAGE: u32 = 1000;

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Hub {
        Hub {
            tx: broadcast::channel(HUB_CAPACITY).0,
            following: Arc::new(watch::channel(0).0),
        }
    }

    pub fn receivers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// How many subscriptions follow the hub live: they know where they
    /// start and have caught up with the log, so every event published from
    /// then on reaches them. Lets a test publish only once a subscriber is
    /// there, instead of guessing how long that takes.
    pub fn following(&self) -> watch::Receiver<usize> {
        self.following.subscribe()
    }
}

/// Counts a subscription among those following the hub while it lives.
struct Following<'a>(&'a Hub);

impl<'a> Following<'a> {
    fn enter(hub: &'a Hub) -> Self {
        hub.following.send_modify(|n| *n += 1);
        Following(hub)
    }
}

impl Drop for Following<'_> {
    fn drop(&mut self) {
        self.0.following.send_modify(|n| *n -= 1);
    }
}

/// Follows the store's commit feed: cache first, then the hub. Runs until
/// `cancel`.
pub async fn run_projector(
    store: Arc<dyn EventStore>,
    cache: Arc<RobotCache>,
    hub: Hub,
    cancel: CancellationToken,
) {
    let mut feed = store.subscribe();
    loop {
        let msg = tokio::select! {
            () = cancel.cancelled() => return,
            m = feed.recv() => m,
        };
        match msg {
            Ok(committed) => project(&cache, &hub, &committed),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    skipped = n,
                    "projector fell behind the store; reloading the cache"
                );
                match store.robots().await {
                    Ok(robots) => {
                        for r in robots {
                            cache.put(Arc::new(r));
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cache reload failed"),
                }
                let _ = hub.tx.send(HubMessage::Resync);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn project(cache: &RobotCache, hub: &Hub, committed: &Committed) {
    cache.put(committed.robot.clone());
    for e in &committed.events {
        // No receivers is fine: nobody is watching.
        let _ = hub.tx.send(HubMessage::Event(Arc::new(WatchItem::new(e))));
    }
}

/// Where a subscriber starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// After this position (0: the whole log).
    After(i64),
    /// Only events stored from now on.
    Now,
}

/// A watch client's events, in position order, without gaps or
/// duplicates; then, if the client fell too far behind, where it should
/// resume.
#[derive(Debug)]
pub struct Subscription {
    pub events: mpsc::Receiver<Result<Arc<WatchItem>, StoreError>>,
    lagged: Arc<OnceLock<i64>>,
}

impl Subscription {
    /// Once `events` has ended: the position to resume after when the
    /// subscription was ended because the client did not keep up (the
    /// last event it was given), `None` otherwise.
    pub fn lagged(&self) -> Option<i64> {
        self.lagged.get().copied()
    }

    /// The events, and what [`Subscription::lagged`] answers once they
    /// have ended.
    #[allow(clippy::type_complexity)]
    pub fn split(
        self,
    ) -> (
        mpsc::Receiver<Result<Arc<WatchItem>, StoreError>>,
        impl FnOnce() -> Option<i64> + Send + 'static,
    ) {
        let lagged = self.lagged;
        (self.events, move || lagged.get().copied())
    }
}

/// Streams events after `from` into a bounded channel. Ends when the
/// receiver is dropped, when the client is too slow to keep `queue` events
/// buffered (it is given everything queued, then told where to resume:
/// nobody else waits for it), or on a store error.
pub fn subscribe(store: Arc<dyn EventStore>, hub: &Hub, from: Start, queue: usize) -> Subscription {
    let (tx, rx) = mpsc::channel(queue);
    let lagged = Arc::new(OnceLock::new());
    let hub = hub.clone();
    let mark = lagged.clone();
    tokio::spawn(async move {
        match follow(store, hub, from, &tx).await {
            Ok(Stop::ClientGone) => {}
            Ok(Stop::TooSlow { resume_after }) => {
                let _ = mark.set(resume_after);
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
            }
        }
    });
    Subscription { events: rx, lagged }
}

enum Stop {
    ClientGone,
    /// The client's queue was full; it has everything up to `resume_after`.
    TooSlow {
        resume_after: i64,
    },
}

async fn follow(
    store: Arc<dyn EventStore>,
    hub: Hub,
    from: Start,
    tx: &mpsc::Sender<Result<Arc<WatchItem>, StoreError>>,
) -> Result<Stop, StoreError> {
    // Subscribe before reading the log: whatever commits after this point
    // is in `rx`, whatever committed before is in the store.
    let mut rx = hub.tx.subscribe();
    let mut last = match from {
        Start::After(p) => p,
        Start::Now => store.head().await?,
    };
    loop {
        if catch_up(&store, &mut last, tx).await?.is_err() {
            return Ok(Stop::ClientGone);
        }
        // Follow the hub until it says we missed something.
        let _following = Following::enter(&hub);
        loop {
            let msg = tokio::select! {
                () = tx.closed() => return Ok(Stop::ClientGone),
                m = rx.recv() => m,
            };
            match msg {
                Ok(HubMessage::Event(item)) => {
                    if item.position <= last {
                        continue;
                    }
                    // Without waiting: a client whose queue is full is too
                    // slow; it is given what is queued and told where to
                    // resume, rather than held here while the hub moves on.
                    let position = item.position;
                    match tx.try_send(Ok(item)) {
                        Ok(()) => last = position,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            return Ok(Stop::TooSlow { resume_after: last });
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            return Ok(Stop::ClientGone);
                        }
                    }
                }
                Ok(HubMessage::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    rx = hub.tx.subscribe();
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(Stop::ClientGone),
            }
        }
    }
}

async fn catch_up(
    store: &Arc<dyn EventStore>,
    last: &mut i64,
    tx: &mpsc::Sender<Result<Arc<WatchItem>, StoreError>>,
) -> Result<Result<(), ()>, StoreError> {
    loop {
        let page = store.events_after(*last, CATCH_UP_PAGE).await?;
        if page.is_empty() {
            return Ok(Ok(()));
        }
        for rec in &page {
            // Catching up may wait for the client: it is reading history.
            if tx.send(Ok(Arc::new(WatchItem::new(rec)))).await.is_err() {
                return Ok(Err(()));
            }
            *last = rec.position;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    fn item(position: i64) -> HubMessage {
        HubMessage::Event(Arc::new(WatchItem {
            position,
            event_type: "robot_discovered",
            json: Bytes::from_static(b"{}"),
        }))
    }

    async fn empty_store(dir: &std::path::Path) -> Arc<dyn EventStore> {
        Arc::new(SqliteStore::open(&dir.join("kiwi.db")).await.unwrap())
    }

    /// Waits until `n` subscriptions follow the hub.
    async fn following(hub: &Hub, n: usize) {
        let mut following = hub.following();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            following.wait_for(|f| *f >= n),
        )
        .await
        .expect("the subscriptions follow the hub")
        .expect("the hub is there");
    }

    /// The fleet puts its own commit in the cache; the projector, seeing
    /// the same commit on the feed, leaves it (one write per commit), and
    /// writes a commit it did not see made (another controller's).
    #[tokio::test]
    async fn the_projector_writes_only_commits_the_cache_does_not_hold() {
        use crate::store::conformance::{append, discovered, provisioning_started, robot_id};
        let dir = tempfile::tempdir().unwrap();
        let store = empty_store(dir.path()).await;
        let cache = Arc::new(RobotCache::new(Arc::new(crate::metrics::Metrics::new())));
        let hub = Hub::new();
        let mut feed = store.subscribe();
        // The projector's step on the next commit of the feed.
        let project_next = async |feed: &mut broadcast::Receiver<Arc<Committed>>| {
            project(&cache, &hub, &feed.recv().await.expect("a commit"));
        };

        // This controller's commit: the fleet writes the cache itself.
        let id = robot_id(1);
        let mine = append(None, id, vec![discovered(1)]);
        let row = Arc::new(mine.robot.clone());
        store.append(mine).await.unwrap();
        assert!(cache.put(row.clone()), "the fleet's write");
        project_next(&mut feed).await;
        let held = cache.peek(&id).expect("the row");
        assert!(
            Arc::ptr_eq(&held.robot, &row),
            "the projector wrote the same commit again"
        );

        // Another controller's commit: only the projector writes it.
        let theirs = append(Some(&row), id, vec![provisioning_started()]);
        let newer = theirs.robot.clone();
        store.append(theirs).await.unwrap();
        project_next(&mut feed).await;
        assert_eq!(*cache.peek(&id).expect("the row").robot, newer);
        assert!(!cache.put(Arc::new(newer)), "already held");
    }

    #[tokio::test]
    async fn a_client_that_does_not_keep_up_gets_its_queue_and_where_to_resume() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::new();
        let store = empty_store(dir.path()).await;
        let mut slow = subscribe(store.clone(), &hub, Start::After(0), 4);
        let mut fast = subscribe(store, &hub, Start::After(0), 4);
        following(&hub, 2).await;
        let mut fast_got = Vec::new();
        for p in 1..=20 {
            hub.tx.send(item(p)).unwrap();
            // The fast client reads as events come; the slow one never.
            let got = fast.events.recv().await.unwrap().unwrap();
            fast_got.push(got.position);
        }
        assert_eq!(fast_got, (1..=20).collect::<Vec<_>>());
        let mut slow_got = Vec::new();
        while let Some(got) = slow.events.recv().await {
            slow_got.push(got.unwrap().position);
        }
        assert_eq!(slow_got, [1, 2, 3, 4], "everything queued, in order");
        assert_eq!(slow.lagged(), Some(4), "resume after the last one given");
        assert_eq!(fast.lagged(), None);
    }
}
