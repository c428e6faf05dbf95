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
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};
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
        }
    }

    pub fn receivers(&self) -> usize {
        self.tx.receiver_count()
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

/// Streams events after `from` into a bounded channel, in position order,
/// without gaps or duplicates. Ends when the receiver is dropped, when the
/// client is too slow to keep `queue` events buffered, or on a store error.
pub fn subscribe(
    store: Arc<dyn EventStore>,
    hub: &Hub,
    from: Start,
    queue: usize,
) -> mpsc::Receiver<Result<Arc<WatchItem>, StoreError>> {
    let (tx, rx) = mpsc::channel(queue);
    let hub = hub.clone();
    tokio::spawn(async move {
        if let Err(e) = follow(store, hub, from, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    rx
}

enum Stop {
    ClientGone,
}

async fn follow(
    store: Arc<dyn EventStore>,
    hub: Hub,
    from: Start,
    tx: &mpsc::Sender<Result<Arc<WatchItem>, StoreError>>,
) -> Result<(), StoreError> {
    // Subscribe before reading the log: whatever commits after this point
    // is in `rx`, whatever committed before is in the store.
    let mut rx = hub.tx.subscribe();
    let mut last = match from {
        Start::After(p) => p,
        Start::Now => store.head().await?,
    };
    loop {
        match catch_up(&store, &mut last, tx).await? {
            Ok(()) => {}
            Err(Stop::ClientGone) => return Ok(()),
        }
        // Follow the hub until it says we missed something.
        loop {
            let msg = tokio::select! {
                () = tx.closed() => return Ok(()),
                m = rx.recv() => m,
            };
            match msg {
                Ok(HubMessage::Event(item)) => {
                    if item.position <= last {
                        continue;
                    }
                    last = item.position;
                    if send(tx, Ok(item)).is_err() {
                        return Ok(());
                    }
                }
                Ok(HubMessage::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    rx = hub.tx.subscribe();
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
}

/// Sends without waiting: a client whose queue is full is too slow and is
/// dropped (it resumes from its last event id).
fn send(
    tx: &mpsc::Sender<Result<Arc<WatchItem>, StoreError>>,
    item: Result<Arc<WatchItem>, StoreError>,
) -> Result<(), Stop> {
    tx.try_send(item).map_err(|_| Stop::ClientGone)
}

async fn catch_up(
    store: &Arc<dyn EventStore>,
    last: &mut i64,
    tx: &mpsc::Sender<Result<Arc<WatchItem>, StoreError>>,
) -> Result<Result<(), Stop>, StoreError> {
    loop {
        let page = store.events_after(*last, CATCH_UP_PAGE).await?;
        if page.is_empty() {
            return Ok(Ok(()));
        }
        for rec in &page {
            // Catching up may wait for the client: it is reading history.
            if tx.send(Ok(Arc::new(WatchItem::new(rec)))).await.is_err() {
                return Ok(Err(Stop::ClientGone));
            }
            *last = rec.position;
        }
    }
}
