//! What only the embedded store does; what every store does is in
//! [`crate::store::conformance`], run here on a temporary database.

use super::*;
use crate::domain::LifecycleState;
use crate::store::conformance::*;
use std::path::PathBuf;
use tempfile::TempDir;
use tokio::sync::broadcast::error::TryRecvError;

async fn open_temp() -> (TempDir, PathBuf, SqliteStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("kiwi.db");
    let store = SqliteStore::open(&path).await.expect("open");
    (dir, path, store)
}

crate::store::conformance::conformance_tests!(async {
    let (dir, _path, store) = open_temp().await;
    (dir, store)
});

/// Fifty robots' appends at once take fewer transactions than appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_group_committed() {
    let (_dir, _path, store) = open_temp().await;
    let store = Arc::new(store);
    concurrent_appends_lose_and_duplicate_nothing(store.clone()).await;
    let batches = store.batches_committed();
    assert!(batches < 200, "{batches} transactions for 200 appends");
}

#[tokio::test]
async fn two_appends_for_one_robot_in_one_batch() {
    let (_dir, _path, store) = open_temp().await;
    let id = robot_id(9);
    let first = append(None, id, vec![discovered(9)]);
    let second = append(Some(&first.robot), id, vec![provisioning_started()]);
    let before = store.batches_committed();

    // Both are queued before the writer runs (one thread), so they
    // share a transaction.
    let (a, b) = tokio::join!(store.append(first), store.append(second));

    assert_eq!(versions(&a.unwrap()), [1]);
    assert_eq!(versions(&b.unwrap()), [2]);
    assert_eq!(store.batches_committed(), before + 1);
    let stored = store.robot(id).await.unwrap().expect("a row");
    assert_eq!(stored.version, 2);
    assert_eq!(stored.state, LifecycleState::Provisioning);
    let events = store.robot_events(id, 0, 10).await.unwrap();
    assert_eq!(Robot::replay(&events).unwrap(), Some(stored));
}

#[tokio::test]
async fn a_failed_commit_fails_the_whole_batch_and_publishes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("kiwi.db");
    let store = SqliteStore::open_with(&path, Duration::from_millis(100))
        .await
        .expect("open");
    let mut feed = store.subscribe();
    // Another process holds SQLite's write lock past the busy timeout.
    let mut blocker = connect_options(&path, Duration::ZERO)
        .connect()
        .await
        .expect("a second connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut blocker)
        .await
        .expect("the write lock");

    let (a, b) = tokio::join!(
        store.append(append(None, robot_id(1), vec![discovered(1)])),
        store.append(append(None, robot_id(2), vec![discovered(2)]))
    );
    assert!(matches!(a, Err(StoreError::Unavailable(_))), "{a:?}");
    assert!(matches!(b, Err(StoreError::Unavailable(_))), "{b:?}");
    assert!(matches!(feed.try_recv(), Err(TryRecvError::Empty)));

    sqlx::query("ROLLBACK")
        .execute(&mut blocker)
        .await
        .expect("release");
    let records = store
        .append(append(None, robot_id(1), vec![discovered(1)]))
        .await
        .expect("the store recovers");
    assert_eq!(next_commit(&mut feed).await.events, records);
    assert_eq!(store.events_after(0, 10).await.unwrap(), records);
    assert_eq!(store.robot(robot_id(2)).await.unwrap(), None);
}

#[tokio::test]
async fn everything_survives_a_reopen_and_positions_are_never_reused() {
    let (dir, path, store) = open_temp().await;
    let first = store
        .append(append(
            None,
            robot_id(1),
            vec![discovered(1), provisioning_started()],
        ))
        .await
        .unwrap();
    let second = store
        .append(append(None, robot_id(2), vec![discovered(2)]))
        .await
        .unwrap();
    let row = store.robot(robot_id(1)).await.unwrap().expect("a row");
    let head = store.head().await.unwrap();
    assert_eq!(head, second[0].position);
    store.close().await;
    let after_close = store
        .append(append(None, robot_id(5), vec![discovered(5)]))
        .await;
    assert!(
        matches!(after_close, Err(StoreError::Unavailable(_))),
        "{after_close:?}"
    );
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    drop(store);

    // The newest event vanishes (say, an operator's repair by hand): its
    // position must still never be handed out again.
    let mut raw = connect_options(&path, BUSY_TIMEOUT)
        .connect()
        .await
        .expect("a raw connection");
    for sql in [
        "DELETE FROM events WHERE robot_id = ?",
        "DELETE FROM robot_states WHERE robot_id = ?",
    ] {
        sqlx::query(sql)
            .bind(robot_id(2).to_string())
            .execute(&mut raw)
            .await
            .expect("delete");
    }
    raw.close().await.expect("close");

    let store = SqliteStore::open(&path).await.expect("reopen");
    assert_eq!(store.robot(robot_id(1)).await.unwrap(), Some(row));
    assert_eq!(store.robot_events(robot_id(1), 0, 10).await.unwrap(), first);
    let third = store
        .append(append(None, robot_id(3), vec![discovered(3)]))
        .await
        .unwrap();
    assert_eq!(third[0].position, head + 1);

    // A restart without a clean close (the process just went away).
    drop(store);
    let store = SqliteStore::open(&path).await.expect("reopen again");
    assert_eq!(store.head().await.unwrap(), head + 1);
    assert_eq!(store.robot_events(robot_id(3), 0, 10).await.unwrap(), third);
    drop(dir);
}

#[tokio::test]
async fn corrupt_rows_are_reported_not_skipped() {
    let (_dir, _path, store) = open_temp().await;
    let (a, b) = (robot_id(1), robot_id(2));
    store
        .append(append(None, a, vec![discovered(1)]))
        .await
        .unwrap();
    let event_b = store
        .append(append(None, b, vec![discovered(2)]))
        .await
        .unwrap();
    sqlx::query("UPDATE robot_states SET health = '{\"status\": ' WHERE robot_id = ?")
        .bind(a.to_string())
        .execute(&store.reads)
        .await
        .expect("corrupt a row");

    let err = store.robot(a).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt(m) if m.contains(&a.to_string()) && m.contains("health")),
        "{err:?}"
    );
    assert!(matches!(store.robots().await, Err(StoreError::Corrupt(_))));
    assert!(store.robot(b).await.unwrap().is_some());
    let current = store.robot(b).await.unwrap().expect("a row");
    let mut stale = current.clone();
    stale.robot_id = a;
    let refused = store
        .append(append(Some(&stale), a, vec![provisioning_started()]))
        .await;
    assert!(
        matches!(refused, Err(StoreError::Corrupt(_))),
        "{refused:?}"
    );
    store
        .append(append(Some(&current), b, vec![provisioning_started()]))
        .await
        .expect("other robots are unaffected");

    sqlx::query("UPDATE events SET data = '[1, 2' WHERE position = ?")
        .bind(event_b[0].position)
        .execute(&store.reads)
        .await
        .expect("corrupt an event");
    let err = store.robot_events(b, 0, 10).await.unwrap_err();
    let position = format!("position {}", event_b[0].position);
    assert!(
        matches!(&err, StoreError::Corrupt(m) if m.contains(&position)),
        "{err:?}"
    );
    assert!(matches!(
        store.events_after(0, 10).await,
        Err(StoreError::Corrupt(_))
    ));
}

#[tokio::test]
async fn circuit_breakers_are_kept_and_a_corrupt_one_is_reported() {
    let (_dir, _path, store) = open_temp().await;
    breakers_round_trip(&store).await;
    sqlx::query("UPDATE circuit_breakers SET opened_at = NULL WHERE state = 'open'")
        .execute(&store.reads)
        .await
        .unwrap();
    let err = store.breakers().await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt(m) if m.contains("no opened_at")),
        "{err:?}"
    );
}
