//! What only the PostgreSQL store does; what every store does is in
//! [`crate::store::conformance`], run here too. Against a real
//! PostgreSQL: each test creates its own database (`kiwi_test_<uuid>`)
//! from the maintenance connection (`DATABASE_URL`, else the local
//! server) and drops it at the end, also on panic.

use super::*;
use crate::store::conformance::*;
use crate::testing::TestDatabase;
use serde_json::json;
use sqlx::AssertSqlSafe;
use std::collections::BTreeSet;
use std::time::Instant;
use tokio::sync::broadcast::error::TryRecvError;

/// A store on a database of this test's own.
async fn store_on(db: &TestDatabase) -> PostgresStore {
    PostgresStore::connect(db.url(), 8)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", db.url()))
}

crate::store::conformance::conformance_tests!(async {
    let db = TestDatabase::create().await;
    let store = store_on(&db).await;
    (db, store)
});

// -----------------------------------------------------------------------
// 1. Migrations.

/// What the schema is, as the catalog says.
async fn catalog(pool: &PgPool) -> Vec<String> {
    let mut lines: Vec<String> = sqlx::query_scalar(
        "SELECT 'table ' || tablename FROM pg_tables WHERE schemaname = 'public' \
         UNION ALL SELECT 'index ' || indexname || ': ' || indexdef FROM pg_indexes \
         WHERE schemaname = 'public' \
         UNION ALL SELECT 'constraint ' || conrelid::regclass::text || '.' || conname || ': ' \
         || pg_get_constraintdef(oid) FROM pg_constraint \
         WHERE connamespace = 'public'::regnamespace \
         UNION ALL SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type \
         || ' ' || is_nullable || ' ' || COALESCE(column_default, '') \
         FROM information_schema.columns WHERE table_schema = 'public' \
         UNION ALL SELECT 'migration ' || version || ' ' || description || ' ' \
         || encode(checksum, 'hex') FROM _sqlx_migrations",
    )
    .fetch_all(pool)
    .await
    .expect("the catalog");
    lines.sort();
    lines
}

/// sqlx's migrator lock key for a database (CRC-32 of its name times
/// a constant), to show that migrations wait for it.
fn migrator_lock_id(database: &str) -> i64 {
    let mut crc = 0xffff_ffff_u32;
    for byte in database.bytes() {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    0x3d32_ad9e * i64::from(!crc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_once_to_an_empty_database_and_again_change_nothing() {
    let db = TestDatabase::create().await;
    // Two controllers starting at once on an empty database.
    let (a, b) = tokio::join!(
        PostgresStore::connect(db.url(), 2),
        PostgresStore::connect(db.url(), 2)
    );
    let (a, b) = (a.expect("first controller"), b.expect("second controller"));
    let before = catalog(&a.pool).await;
    for table in [
        "events",
        "robot_states",
        "robot_reports",
        "robot_snapshots",
        "fences",
        "circuit_breakers",
        "discovery_sessions",
        "discovery_results",
    ] {
        assert!(
            before.contains(&format!("table {table}")),
            "missing table {table}: {before:#?}"
        );
    }
    for index in [
        "robot_states_state",
        "robot_states_robot_type",
        "robot_states_ip_address",
        "events_recorded_at",
        "events_robot_version",
        "robot_reports_received_at",
    ] {
        assert!(
            before
                .iter()
                .any(|l| l.starts_with(&format!("index {index}:"))),
            "missing index {index}"
        );
    }

    a.migrate().await.expect("a second run");
    b.migrate().await.expect("a third run");
    assert_eq!(catalog(&a.pool).await, before);

    // The migrator waits for its lock: held elsewhere, a run cannot
    // finish until it is released.
    let mut holder = PgConnection::connect(db.url()).await.expect("a connection");
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(migrator_lock_id(db.name()))
        .execute(&mut holder)
        .await
        .expect("take the migrator's lock");
    let waiting = tokio::spawn(async move {
        let result = a.migrate().await;
        (a, result)
    });
    // Wait until the migrator is seen blocked on that lock, then check
    // that it has not finished.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let blocked: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
             WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database() \
             AND ((l.classid::bigint << 32) | l.objid::bigint) = $1 AND l.objsubid = 1)",
        )
        .bind(migrator_lock_id(db.name()))
        .fetch_one(&mut holder)
        .await
        .expect("the lock table");
        if blocked {
            break;
        }
        assert!(!waiting.is_finished(), "migrate ran without the lock");
        assert!(
            Instant::now() < deadline,
            "the migrator never waited for its lock"
        );
        tokio::task::yield_now().await;
    }
    assert!(!waiting.is_finished(), "migrate ran without the lock");
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(migrator_lock_id(db.name()))
        .execute(&mut holder)
        .await
        .expect("release the lock");
    let (a, result) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("migrate ends once the lock is free")
        .expect("the task ran");
    result.expect("the migration run");
    assert_eq!(catalog(&a.pool).await, before);
    a.close().await;
    b.close().await;
}

// -----------------------------------------------------------------------
// 2. Round trips, conflicts, refusals, corruption.

/// The conformance check's two racing appends share one transaction; and
/// a writer that skipped the log lock is still caught by the unique
/// (robot_id, version) constraint.
#[tokio::test]
async fn racing_appends_share_a_batch_and_the_constraint_is_the_backstop() {
    let db = TestDatabase::create().await;
    let store = store_on(&db).await;
    let stored = of_two_appends_at_one_version_one_wins(&store).await;
    let id = stored.robot_id;
    assert_eq!(
        store.batches_committed(),
        2,
        "the first append, then both racers in one transaction"
    );

    // A writer that skipped the log lock took version 3 behind the
    // row's back: the unique (robot_id, version) constraint still
    // turns the next append at version 2 into a conflict.
    sqlx::query(
        "INSERT INTO events (event_id, robot_id, version, event_type, data, metadata, \
         recorded_at) VALUES ($1, $2, 3, 'robot_health_changed', '{}', '{}', now())",
    )
    .bind(Uuid::new_v4())
    .bind(id.0)
    .execute(&store.pool)
    .await
    .expect("a rogue event");
    let late = store
        .append(append(Some(&stored), id, vec![provisioned()]))
        .await;
    assert!(
        matches!(
            late,
            Err(StoreError::Conflict {
                expected: 2,
                actual: 3,
                ..
            })
        ),
        "{late:?}"
    );
    assert_eq!(store.robot(id).await.unwrap(), Some(stored));
    store.close().await;
}

/// Each writer remembers the heads it wrote; a robot written by another
/// controller since is caught by the write's guard, read again, and
/// answered from what the row says.
#[tokio::test]
async fn a_head_changed_by_another_controller_is_read_again() {
    let db = TestDatabase::create().await;
    let (one, two) = (store_on(&db).await, store_on(&db).await);
    let id = robot_id(8);
    one.append(append(None, id, vec![discovered(8)]))
        .await
        .unwrap();
    let at_1 = one.robot(id).await.unwrap().expect("a row");
    // `two` has never seen the robot: it reads it before checking.
    let step = two
        .append(append(Some(&at_1), id, vec![provisioning_started()]))
        .await
        .expect("appended through the second controller");
    assert_eq!(versions(&step), [2]);
    let at_2 = two.robot(id).await.unwrap().expect("a row");

    // `one` still remembers version 1: an append made from that row
    // is a conflict, found by the guard and confirmed by a read.
    let stale = one
        .append(append(Some(&at_1), id, vec![failed_from_discovered()]))
        .await;
    assert!(
        matches!(
            stale,
            Err(StoreError::Conflict {
                expected: 1,
                actual: 2,
                ..
            })
        ),
        "{stale:?}"
    );
    // And one made from the current row is written, although `one`
    // had remembered an older head.
    let before = one.batches_committed();
    let next = one
        .append(append(Some(&at_2), id, vec![provisioned()]))
        .await
        .expect("appended from the current row");
    assert_eq!(versions(&next), [3]);
    assert_eq!(one.batches_committed(), before + 1);

    // A robot created by the other controller meanwhile: a first
    // append for it is a conflict, not a second robot_discovered.
    let other = robot_id(9);
    two.append(append(None, other, vec![discovered(9)]))
        .await
        .unwrap();
    let twice = one.append(append(None, other, vec![discovered(9)])).await;
    assert!(
        matches!(
            twice,
            Err(StoreError::Conflict {
                expected: 0,
                actual: 1,
                ..
            })
        ),
        "{twice:?}"
    );

    let events = all_events(&one).await;
    assert_eq!(
        events
            .iter()
            .map(|e| (e.robot_id, e.version))
            .collect::<Vec<_>>(),
        [(id, 1), (id, 2), (id, 3), (other, 1)]
    );
    assert_rows_are_their_history(&one).await;
    one.close().await;
    two.close().await;
}

#[tokio::test]
async fn values_postgres_refuses_fail_only_their_own_append() {
    let db = TestDatabase::create().await;
    let store = store_on(&db).await;
    let id = robot_id(3);

    // Values PostgreSQL itself refuses, in one batch with good appends:
    // the grouped write fails, and the batch is written append by
    // append (a transaction each) so that only the culprits are refused.
    let first = append(None, id, vec![discovered(3)]);
    let reused_id = first.events[0].event_id;
    let mut nul = append(None, robot_id(5), vec![discovered(5)]);
    nul.robot.hostname = "bad\0name".into();
    let mut reused = append(None, robot_id(6), vec![discovered(6)]);
    reused.events[0].event_id = reused_id;
    let good = append(None, robot_id(7), vec![discovered(7)]);
    let before = store.batches_committed();
    let (first, nul, reused, good) = tokio::join!(
        store.append(first),
        store.append(nul),
        store.append(reused),
        store.append(good)
    );
    assert_eq!(
        store.batches_committed(),
        before + 2,
        "one transaction per good append"
    );
    let first = first.expect("the first append");
    let good = good.expect("the good append");
    assert!(matches!(nul, Err(StoreError::Invalid(_))), "{nul:?}");
    assert!(matches!(reused, Err(StoreError::Invalid(_))), "{reused:?}");
    assert!(first[0].position < good[0].position);
    assert_eq!(
        all_events(&store).await,
        [first.clone(), good.clone()].concat()
    );
    let ids: Vec<RobotId> = store
        .robots()
        .await
        .unwrap()
        .iter()
        .map(|r| r.robot_id)
        .collect();
    assert_eq!(ids, [id, robot_id(7)]);
    store.close().await;
}

#[tokio::test]
async fn circuit_breakers_are_kept_and_a_corrupt_one_is_reported() {
    let db = TestDatabase::create().await;
    let store = store_on(&db).await;
    breakers_round_trip(&store).await;
    sqlx::query("UPDATE circuit_breakers SET opened_at = NULL WHERE state = 'open'")
        .execute(&store.pool)
        .await
        .unwrap();
    let err = store.breakers().await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt(m) if m.contains("no opened_at")),
        "{err:?}"
    );
    store.close().await;
}

#[tokio::test]
async fn corrupt_rows_are_reported_not_skipped() {
    let db = TestDatabase::create().await;
    let store = store_on(&db).await;
    let (a, b) = (robot_id(1), robot_id(2));
    store
        .append(append(None, a, vec![discovered(1)]))
        .await
        .unwrap();
    let event_b = store
        .append(append(None, b, vec![discovered(2)]))
        .await
        .unwrap();
    sqlx::query("UPDATE robot_states SET health = '{\"status\": 5}' WHERE robot_id = $1")
        .bind(a.0)
        .execute(&store.pool)
        .await
        .expect("corrupt a row");

    let err = store.robot(a).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt(m) if m.contains(&a.to_string()) && m.contains("health")),
        "{err:?}"
    );
    assert!(matches!(store.robots().await, Err(StoreError::Corrupt(_))));
    let current = store.robot(b).await.unwrap().expect("a row");
    // Appends are checked against the row's version and state only, and
    // write the whole row: the next append to the robot repairs it.
    let mut before = current.clone();
    before.robot_id = a;
    let repair = append(Some(&before), a, vec![provisioning_started()]);
    let repaired = repair.robot.clone();
    store
        .append(repair)
        .await
        .expect("the append is checked by version and state");
    assert_eq!(store.robot(a).await.unwrap(), Some(repaired));
    store
        .append(append(Some(&current), b, vec![provisioning_started()]))
        .await
        .expect("other robots are unaffected");

    sqlx::query("UPDATE events SET data = '[1, 2]' WHERE position = $1")
        .bind(event_b[0].position)
        .execute(&store.pool)
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
    store.close().await;
}

// -----------------------------------------------------------------------
// 3. Concurrent writers.

/// Appends `wins` maintenance toggles to a ready robot, reloading and
/// deciding again after every conflict. Returns the conflicts seen.
async fn race(store: &PostgresStore, id: RobotId, wins: u32) -> Result<u32, StoreError> {
    let mut conflicts = 0;
    let mut won = 0;
    while won < wins {
        let current = store.robot(id).await?.expect("the racing robot");
        let next = append(Some(&current), id, vec![toggle_maintenance(current.state)]);
        match store.append(next).await {
            Ok(_) => won += 1,
            Err(StoreError::Conflict { .. }) => conflicts += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(conflicts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_lose_and_duplicate_nothing() {
    let db = TestDatabase::create().await;
    let store = Arc::new(store_on(&db).await);
    let mut feed = store.subscribe();
    let racer = robot_id(1000);
    let mut current = None;
    for events in [
        vec![discovered(1000)],
        vec![provisioning_started()],
        vec![provisioned()],
    ] {
        store
            .append(append(current.as_ref(), racer, events))
            .await
            .unwrap();
        current = store.robot(racer).await.unwrap();
    }
    let before = store.batches_committed();

    let walkers: Vec<_> = (0..50)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { walk_lifecycle(&*store, n).await })
        })
        .collect();
    let racers: Vec<_> = (0..10)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { race(&store, racer, 5).await })
        })
        .collect();
    for task in walkers {
        task.await
            .expect("the task ran")
            .expect("every append succeeds");
    }
    let mut conflicts = 0;
    for task in racers {
        conflicts += task.await.expect("the task ran").expect("the racer wins");
    }

    let log = all_events(&*store).await;
    assert_eq!(log.len(), 3 + 50 * 4 + 50);
    assert!(strictly_increasing(&positions(&log)));
    let ids: HashSet<Uuid> = log.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), log.len(), "an event was stored twice");
    let mut by_robot: HashMap<RobotId, Vec<i64>> = HashMap::new();
    for e in &log {
        by_robot.entry(e.robot_id).or_default().push(e.version);
    }
    for (id, versions) in &by_robot {
        let expected: Vec<i64> = (1..=versions.len() as i64).collect();
        assert_eq!(versions, &expected, "robot {id}");
    }
    for n in 0..50 {
        assert_eq!(by_robot[&robot_id(n)], [1, 2, 3, 4]);
    }
    let raced = store.robot(racer).await.unwrap().expect("the racer");
    assert_eq!(raced.version, 3 + 50, "one version per successful append");
    assert_rows_are_their_history(&*store).await;
    let appends = 3 + 50 * 4 + 50 + conflicts;
    let batches = store.batches_committed() - before + 3;
    assert!(
        batches < u64::from(appends),
        "{batches} transactions for {appends} appends"
    );

    // The feed: every event once, in position order, each with its row.
    let commits = commits_until(&mut feed, log.len()).await;
    let fed: Vec<EventRecord> = commits.iter().flat_map(|c| c.events.clone()).collect();
    assert_eq!(fed, log);
    for commit in &commits {
        if let Some(last) = commit.events.last() {
            assert_eq!(commit.robot.version, last.version);
        }
    }
    store.close().await;
}

// -----------------------------------------------------------------------
// 4. Two controllers on one database.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_controller_sees_every_commit_in_order_with_its_row() {
    let db = TestDatabase::create().await;
    let first = Arc::new(store_on(&db).await);
    let second = Arc::new(store_on(&db).await);
    let mut feed_first = first.subscribe();
    let mut feed_second = second.subscribe();

    // Robots appended through both controllers at once.
    let tasks: Vec<_> = (0..20_u32)
        .map(|n| {
            let store = if n.is_multiple_of(4) {
                second.clone()
            } else {
                first.clone()
            };
            tokio::spawn(async move { walk_lifecycle(&*store, n).await })
        })
        .collect();
    for task in tasks {
        task.await
            .expect("the task ran")
            .expect("every append succeeds");
    }
    // A report only (no event), and a commit too big for a
    // notification (published by reference).
    let id = robot_id(3);
    let row = first.robot(id).await.unwrap().expect("a row");
    first
        .append(with_report(
            append(Some(&row), id, vec![]),
            report(id, 2, json!({"battery_v": 11.9})),
        ))
        .await
        .unwrap();
    let big_id = robot_id(500);
    let mut big = append(None, big_id, vec![discovered(500)]);
    big.robot.config = json!({ "blob": "x".repeat(12_000) });
    first.append(big).await.unwrap();

    let log = all_events(&*first).await;
    assert_eq!(log.len(), 20 * 4 + 1);
    for feed in [&mut feed_second, &mut feed_first] {
        let mut commits = commits_until(feed, log.len()).await;
        // The report-only commit comes before the big one.
        let fed: Vec<EventRecord> = commits.iter().flat_map(|c| c.events.clone()).collect();
        assert_eq!(fed, log, "every event once, in position order");
        let report_only = commits
            .iter()
            .find(|c| c.events.is_empty())
            .expect("the report-only commit");
        assert_eq!(report_only.robot.robot_id, id);
        assert_eq!(report_only.robot.last_report_seq, 2);
        for commit in &commits {
            if let Some(last) = commit.events.last() {
                assert_eq!(commit.robot.robot_id, last.robot_id);
                assert_eq!(commit.robot.version, last.version);
            }
        }
        let last = commits.pop().expect("commits");
        assert_eq!(
            Some((*last.robot).clone()),
            second.robot(big_id).await.unwrap()
        );
        assert!(matches!(feed.try_recv(), Err(TryRecvError::Empty)));
    }
    first.close().await;
    second.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_catches_up_after_its_connection_is_lost() {
    let db = TestDatabase::create().await;
    let writer = store_on(&db).await;
    let reader = store_on(&db).await;
    let mut feed = reader.subscribe();
    writer
        .append(append(None, robot_id(1), vec![discovered(1)]))
        .await
        .unwrap();
    assert_eq!(next_commit(&mut feed).await.events.len(), 1);

    // Every connection to the database is cut (a failover, a restart):
    // commits made meanwhile reach the reader's feed after it
    // reconnects, in order, without gaps.
    let mut admin = crate::testing::pg_connect(db.server_url())
        .await
        .expect("maintenance connection");
    let cut = async |admin: &mut PgConnection| {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(db.name())
        .execute(admin)
        .await
        .expect("terminate the connections");
    };
    cut(&mut admin).await;
    let mut appended = Vec::new();
    for n in 2..=6 {
        let result = loop {
            // The pool may hand out a connection that just died: the
            // store answers Unavailable, and a retry reconnects.
            match writer
                .append(append(None, robot_id(n), vec![discovered(n)]))
                .await
            {
                Err(StoreError::Unavailable(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => break other,
            }
        };
        appended.extend(result.expect("the append"));
        if n == 3 {
            cut(&mut admin).await;
        }
    }
    let row = writer.robot(robot_id(1)).await.unwrap().expect("a row");
    writer
        .append(with_report(
            append(Some(&row), robot_id(1), vec![]),
            report(robot_id(1), 1, json!({})),
        ))
        .await
        .unwrap();

    let commits = commits_until(&mut feed, appended.len()).await;
    let fed: Vec<EventRecord> = commits.iter().flat_map(|c| c.events.clone()).collect();
    assert_eq!(fed, appended);
    // The report-only commit arrives too (now or with the catch-up).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let commit = tokio::time::timeout_at(deadline.into(), feed.recv())
            .await
            .expect("the report-only commit")
            .expect("the feed");
        if commit.robot.robot_id == robot_id(1) && commit.robot.last_report_seq == 1 {
            assert!(commit.events.is_empty());
            break;
        }
    }
    let _ = admin.close().await;
    writer.close().await;
    reader.close().await;
}

// -----------------------------------------------------------------------
// 5. Fencing.

fn fence(token: u64) -> Fence {
    Fence {
        resource: "sweep:192.168.0.0/24".into(),
        token,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_fencing_token_is_refused() {
    let db = TestDatabase::create().await;
    let store = Arc::new(store_on(&db).await);
    let sessions = async || -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM discovery_sessions")
            .fetch_one(&store.pool)
            .await
            .expect("count")
    };

    let first = session();
    store
        .record_discovery(&first, Some(&fence(5)))
        .await
        .unwrap();
    assert_eq!(
        store.discovery(first.session_id).await.unwrap(),
        Some(first.clone()),
        "read back with its results, in order"
    );
    assert_eq!(store.discovery(Uuid::new_v4()).await.unwrap(), None);
    let stale = store.record_discovery(&session(), Some(&fence(4))).await;
    assert!(
        matches!(
            &stale,
            Err(StoreError::Fenced { token: 4, current: 5, resource }) if resource == "sweep:192.168.0.0/24"
        ),
        "{stale:?}"
    );
    assert_eq!(sessions().await, 1, "the stale write left nothing");
    store
        .record_discovery(&session(), Some(&fence(6)))
        .await
        .unwrap();
    store
        .record_discovery(&session(), Some(&fence(6)))
        .await
        .unwrap();
    store.record_discovery(&session(), None).await.unwrap();
    let other = Fence {
        resource: "sweep:10.0.0.0/24".into(),
        token: 1,
    };
    store
        .record_discovery(&session(), Some(&other))
        .await
        .unwrap();
    assert_eq!(sessions().await, 5);

    // Two holders racing: the higher token always ends up recorded,
    // and the lower one is refused if it comes second.
    let (s7, s8) = (store.clone(), store.clone());
    let (r7, r8) = tokio::join!(
        tokio::spawn(async move { s7.record_discovery(&session(), Some(&fence(7))).await }),
        tokio::spawn(async move { s8.record_discovery(&session(), Some(&fence(8))).await })
    );
    r8.unwrap().expect("token 8");
    assert!(matches!(
        r7.unwrap(),
        Ok(()) | Err(StoreError::Fenced { .. })
    ));
    let token: i64 = sqlx::query_scalar("SELECT token FROM fences WHERE resource = $1")
        .bind("sweep:192.168.0.0/24")
        .fetch_one(&store.pool)
        .await
        .unwrap();
    assert_eq!(token, 8);

    // A session is recorded once per id, as last written.
    let mut again = session();
    store.record_discovery(&again, None).await.unwrap();
    again.robots_found = 9;
    store.record_discovery(&again, None).await.unwrap();
    let (found, methods, started): (i64, serde_json::Value, DateTime<Utc>) = sqlx::query_as(
        "SELECT robots_found, methods, started_at FROM discovery_sessions WHERE session_id = $1",
    )
    .bind(again.session_id)
    .fetch_one(&store.pool)
    .await
    .unwrap();
    assert_eq!(found, 9);
    assert_eq!(methods, json!(["agent", "arp"]));
    assert_eq!(started, again.started_at);
    store.close().await;
}

// -----------------------------------------------------------------------
// 6. Indexes.

/// Every index a plan uses.
fn index_names(plan: &serde_json::Value, out: &mut BTreeSet<String>) {
    match plan {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                if k == "Index Name" {
                    out.insert(v.as_str().unwrap_or_default().to_string());
                }
                index_names(v, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| index_names(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_store_queries_use_indexes() {
    let db = TestDatabase::create().await;
    let store = store_on(&db).await;
    let appends = (0..600).map(|n| {
        let mut events = vec![discovered(n)];
        if n.is_multiple_of(50) {
            events.push(provisioning_started());
        }
        store.append(append(None, robot_id(n), events))
    });
    for result in futures_util::future::join_all(appends).await {
        result.expect("append");
    }
    let mut conn = store.pool.acquire().await.unwrap();
    sqlx::query("ANALYZE").execute(&mut *conn).await.unwrap();
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let cutoff = now() - chrono::Duration::days(1);
    let cases: Vec<(&str, String, sqlx::postgres::PgArguments)> = {
        use sqlx::Arguments;
        let args = |f: &dyn Fn(&mut sqlx::postgres::PgArguments)| {
            let mut a = sqlx::postgres::PgArguments::default();
            f(&mut a);
            a
        };
        vec![
            (
                "robot_states_state",
                ROBOTS_BY_STATE.into(),
                args(&|a| a.add("provisioning").unwrap()),
            ),
            (
                "robot_states_robot_type",
                ROBOTS_BY_TYPE.into(),
                args(&|a| a.add("xlerobot").unwrap()),
            ),
            (
                "robot_states_ip_address",
                ROBOTS_BY_IP.into(),
                args(&|a| a.add("192.168.1.7").unwrap()),
            ),
            (
                "events_robot_version",
                ROBOT_EVENTS.into(),
                args(&|a| {
                    a.add(robot_id(7).0).unwrap();
                    a.add(0_i64).unwrap();
                    a.add(100_i64).unwrap();
                }),
            ),
            (
                "events_pkey",
                EVENTS_AFTER.into(),
                args(&|a| {
                    a.add(300_i64).unwrap();
                    a.add(100_i64).unwrap();
                }),
            ),
            (
                "events_recorded_at",
                "SELECT DISTINCT robot_id FROM events WHERE recorded_at < $1".into(),
                args(&|a| a.add(cutoff).unwrap()),
            ),
            (
                "robot_reports_pkey",
                "SELECT robot_id, seq FROM robot_reports WHERE robot_id = $1 AND seq > $2 \
                 ORDER BY seq LIMIT 10"
                    .into(),
                args(&|a| {
                    a.add(robot_id(7).0).unwrap();
                    a.add(0_i64).unwrap();
                }),
            ),
        ]
    };
    for (index, sql, arguments) in cases {
        let plan: serde_json::Value = sqlx::query_scalar_with(
            AssertSqlSafe(format!("EXPLAIN (FORMAT JSON) {sql}")),
            arguments,
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("EXPLAIN {sql}: {e}"));
        let mut used = BTreeSet::new();
        index_names(&plan, &mut used);
        assert!(
            used.contains(index),
            "{sql} uses {used:?}, not {index}: {plan}"
        );
    }
    drop(conn);
    store.close().await;
}

// -----------------------------------------------------------------------
// 7. An unreachable server.

#[tokio::test]
async fn an_unreachable_server_is_unavailable_quickly() {
    let port = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        socket.local_addr().expect("its address").port()
    };
    let started = Instant::now();
    let result =
        PostgresStore::connect(&format!("postgres://postgres@127.0.0.1:{port}/kiwi"), 2).await;
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    assert!(
        started.elapsed() < ACQUIRE_TIMEOUT + Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    // A closed store answers Unavailable too.
    let db = TestDatabase::create().await;
    let store = store_on(&db).await;
    store.close().await;
    let appended = store
        .append(append(None, robot_id(1), vec![discovered(1)]))
        .await;
    assert!(
        matches!(appended, Err(StoreError::Unavailable(_))),
        "{appended:?}"
    );
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.robot(robot_id(1)).await,
        Err(StoreError::Unavailable(_))
    ));
}

#[test]
fn the_log_lock_key_is_the_documented_one() {
    assert_eq!(log_lock!().parse::<i64>(), Ok(0x6b69_7769_6c6f_6701));
}

/// The payload as the write statement assembles it.
fn payload(first: Option<i64>, last: Option<i64>, body: &str) -> String {
    let n = |p: Option<i64>| p.map_or("null".to_string(), |p| p.to_string());
    format!("{{\"first\":{},\"last\":{},{body}", n(first), n(last))
}

#[test]
fn a_commit_notice_round_trips() {
    let id = robot_id(1);
    let mut a = append(None, id, vec![discovered(1), provisioning_started()]);
    a.robot.config = json!({"gain": 0.1, "big": 18446744073709551615u64});
    let a = with_report(a, report(id, 3, json!({"t": [1.5, -2]})));
    let mut planned = plan(None, &a).expect("a valid append");
    let body = planned.json.notice.clone();
    assert!(body.starts_with("\"robot_id\":"), "{body}");

    let mut parsed: Notice =
        serde_json::from_str(&payload(Some(10), Some(11), &body)).expect("a notice");
    let (events, robot) = parsed.positioned().expect("the whole commit");
    for (i, r) in planned.records.iter_mut().enumerate() {
        r.position = 10 + i as i64;
    }
    assert_eq!(events, planned.records);
    assert_eq!(robot, planned.robot);

    // Positions that do not account for every event: read instead.
    for (first, last) in [(Some(10), Some(12)), (Some(10), None), (None, None)] {
        let mut parsed: Notice =
            serde_json::from_str(&payload(first, last, &body)).expect("a notice");
        assert!(parsed.positioned().is_none(), "{first:?}..{last:?}");
    }

    planned.robot.metadata = json!({"blob": "y".repeat(NOTIFY_PAYLOAD_MAX)});
    let body = notice_body(&planned.robot, &planned.records);
    let full = payload(Some(i64::MIN), Some(i64::MIN), &body);
    assert!(full.len() <= NOTIFY_PAYLOAD_MAX, "{}", full.len());
    let mut reference: Notice = serde_json::from_str(&full).expect("a notice");
    assert!(reference.events.is_none() && reference.robot.is_none());
    assert_eq!(reference.robot_id, id);
    assert!(reference.positioned().is_none());
}
