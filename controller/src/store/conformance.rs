//! What every [`EventStore`] must do, checked once and run against each
//! backend on its own database: `sqlite/tests.rs` and `postgres/tests.rs`
//! call each check here from a test of their own, then add what only that
//! backend has (SQLite's reopening, PostgreSQL's migrations, second
//! controllers, fencing races, query plans).
//!
//! The fixtures are the appends a caller makes: events applied to the row
//! it last read, times truncated to microseconds as the fleet records them.

use super::*;
use crate::domain::event::IdentityFacts;
use crate::domain::lifecycle::Transition;
use crate::domain::{EventMetadata, LifecycleState, NewEvent, RobotEvent};
use crate::replay::{Rebuild, compare};
use chrono::TimeZone;
use kiwi_protocol::message::HealthStatus;
use serde_json::json;
use std::time::Duration;
use tokio::sync::broadcast::error::TryRecvError;

// ---------------------------------------------------------------------------
// Fixtures.

pub(crate) fn now() -> DateTime<Utc> {
    crate::fleet::truncate_micros(Utc::now())
}

pub(crate) fn robot_id(n: u32) -> RobotId {
    RobotId(Uuid::from_u128(
        0x6b69_7769_0000_0000_0000_0000_0000_0000 + u128::from(n),
    ))
}

/// Robot `n`'s identity; every tenth is an XLERobot.
pub(crate) fn facts(n: u32) -> IdentityFacts {
    IdentityFacts {
        hostname: format!("lekiwi-{n}"),
        ip_address: Some(format!("192.168.{}.{}", n / 200, n % 200 + 2)),
        robot_type: if n.is_multiple_of(10) {
            "xlerobot"
        } else {
            "lekiwi"
        }
        .into(),
        model: Some("LeKiwi".into()),
        firmware_version: Some("1.4.0".into()),
        agent_version: Some("0.1.0".into()),
        hardware_id: format!("pi:{n:08x}"),
        mac_addresses: vec![format!("b8:27:eb:00:{:02x}:{:02x}", n / 256, n % 256)],
    }
}

fn transition(from: LifecycleState, to: LifecycleState) -> Transition {
    Transition::new(from, to).expect("an allowed transition")
}

pub(crate) fn discovered(n: u32) -> RobotEvent {
    RobotEvent::RobotDiscovered {
        identity: facts(n),
        method: "agent".into(),
    }
}

pub(crate) fn provisioning_started() -> RobotEvent {
    RobotEvent::RobotProvisioningStarted {
        transition: transition(LifecycleState::Discovered, LifecycleState::Provisioning),
    }
}

pub(crate) fn provisioned() -> RobotEvent {
    RobotEvent::RobotProvisioned {
        transition: transition(LifecycleState::Provisioning, LifecycleState::Ready),
    }
}

pub(crate) fn activated() -> RobotEvent {
    RobotEvent::RobotActivated {
        transition: transition(LifecycleState::Ready, LifecycleState::Active),
        deployment_version: Some("2026.11.1".into()),
    }
}

pub(crate) fn failed_from_discovered() -> RobotEvent {
    RobotEvent::RobotFailed {
        transition: transition(LifecycleState::Discovered, LifecycleState::Failed),
        reason: "agent never answered".into(),
    }
}

/// Ready → maintenance, maintenance → ready: a transition from whichever
/// of the two the robot is in.
pub(crate) fn toggle_maintenance(state: LifecycleState) -> RobotEvent {
    match state {
        LifecycleState::Ready => RobotEvent::RobotMaintenanceStart {
            transition: transition(LifecycleState::Ready, LifecycleState::Maintenance),
            reason: Some("race".into()),
        },
        _ => RobotEvent::RobotMaintenanceEnd {
            transition: transition(LifecycleState::Maintenance, LifecycleState::Ready),
        },
    }
}

/// An append built the way the fleet builds one: the events applied, at
/// `at`, to the row it last read.
pub(crate) fn append_at(
    current: Option<&Robot>,
    id: RobotId,
    events: Vec<RobotEvent>,
    at: DateTime<Utc>,
) -> Append {
    let base = current.map_or(0, |r| r.version);
    let events: Vec<NewEvent> = events
        .into_iter()
        .map(|event| NewEvent {
            event_id: Uuid::new_v4(),
            recorded_at: at,
            event,
            metadata: EventMetadata {
                correlation_id: Some(Uuid::new_v4()),
                causation_id: None,
                actor: "test".into(),
            },
        })
        .collect();
    let mut row = current.cloned();
    for (offset, new) in (1..).zip(&events) {
        let record = EventRecord {
            position: 0,
            event_id: new.event_id,
            robot_id: id,
            version: base + offset,
            event: new.event.clone(),
            metadata: new.metadata.clone(),
            recorded_at: new.recorded_at,
        };
        row = Some(Robot::apply(row, &record).expect("the events apply"));
    }
    Append {
        robot_id: id,
        expected_version: base,
        events,
        robot: row.expect("a robot row"),
        report: None,
    }
}

pub(crate) fn append(current: Option<&Robot>, id: RobotId, events: Vec<RobotEvent>) -> Append {
    append_at(current, id, events, now())
}

pub(crate) fn report_at(
    id: RobotId,
    seq: i64,
    telemetry: serde_json::Value,
    received_at: DateTime<Utc>,
) -> StoredReport {
    StoredReport {
        robot_id: id,
        seq,
        time: received_at - chrono::Duration::milliseconds(40),
        received_at,
        health: Health {
            status: HealthStatus::Degraded,
            reasons: vec!["cpu at 81 °C".into()],
        },
        workload: crate::domain::Workload::Running,
        maintenance: false,
        telemetry,
    }
}

pub(crate) fn report(id: RobotId, seq: i64, telemetry: serde_json::Value) -> StoredReport {
    report_at(id, seq, telemetry, now())
}

/// Adds a report and the row fields it changes, as the fleet does.
pub(crate) fn with_report(mut append: Append, report: StoredReport) -> Append {
    report.apply_to(&mut append.robot);
    append.report = Some(report);
    append
}

pub(crate) fn versions(records: &[EventRecord]) -> Vec<i64> {
    records.iter().map(|r| r.version).collect()
}

pub(crate) fn positions(records: &[EventRecord]) -> Vec<i64> {
    records.iter().map(|r| r.position).collect()
}

pub(crate) fn strictly_increasing(values: &[i64]) -> bool {
    values.windows(2).all(|w| w[0] < w[1])
}

pub(crate) async fn next_commit(feed: &mut broadcast::Receiver<Arc<Committed>>) -> Arc<Committed> {
    tokio::time::timeout(Duration::from_secs(10), feed.recv())
        .await
        .expect("a commit within 10 s")
        .expect("the feed is open and not lagging")
}

/// Commits from the feed until `events` events have come.
pub(crate) async fn commits_until(
    feed: &mut broadcast::Receiver<Arc<Committed>>,
    events: usize,
) -> Vec<Arc<Committed>> {
    let mut commits = Vec::new();
    let mut seen = 0;
    while seen < events {
        let commit = next_commit(feed).await;
        seen += commit.events.len();
        commits.push(commit);
    }
    commits
}

pub(crate) async fn all_events(store: &dyn EventStore) -> Vec<EventRecord> {
    store.events_after(0, 1_000_000).await.expect("the log")
}

/// Every robot's row rebuilt from its own history.
pub(crate) async fn assert_rows_are_their_history(store: &dyn EventStore) {
    for robot in store.robots().await.expect("rows") {
        let history = store.history(robot.robot_id, None).await.expect("history");
        assert_eq!(
            history.project().expect("the history replays"),
            Some(robot.clone()),
            "robot {}",
            robot.robot_id
        );
    }
}

/// The rows rebuilt from the snapshots, the log and the latest reports
/// equal the live rows.
pub(crate) async fn assert_rebuild_equals_live(store: &dyn EventStore) {
    let mut rebuild = Rebuild::new(store.snapshots().await.unwrap());
    for e in all_events(store).await {
        rebuild.event(&e).expect("the log replays");
    }
    let rebuilt = rebuild.finish(&store.latest_reports().await.unwrap());
    let live = store.robots().await.unwrap();
    assert_eq!(compare(&live, &rebuilt), vec![]);
    assert_eq!(rebuilt.len(), live.len());
}

/// One robot's lifecycle, appended step by step as the fleet would.
pub(crate) async fn walk_lifecycle(store: &dyn EventStore, n: u32) -> Result<(), StoreError> {
    let id = robot_id(n);
    let steps = [
        vec![discovered(n)],
        vec![provisioning_started()],
        vec![provisioned()],
        vec![activated()],
    ];
    let mut current = None;
    for (step, events) in steps.into_iter().enumerate() {
        let mut next = append(current.as_ref(), id, events);
        if step == 3 {
            next = with_report(next, report(id, 1, json!({ "n": n })));
        }
        store.append(next).await?;
        current = store.robot(id).await?;
    }
    Ok(())
}

/// A discovery round with two results.
pub(crate) fn session() -> DiscoverySession {
    let started_at = now();
    DiscoverySession {
        session_id: Uuid::new_v4(),
        methods: vec!["agent".into(), "arp".into()],
        started_at,
        finished_at: started_at + chrono::Duration::milliseconds(1250),
        duration_ms: 1250,
        robots_found: 3,
        new_robots: 1,
        results: vec![
            DiscoveryResult {
                ip_address: "10.88.0.2".into(),
                robot_id: Some(robot_id(2)),
                method: SightingMethod::Ssh,
                found_at: started_at,
                mac_address: Some("02:88:00:00:00:02".into()),
                robot_type: Some("xlerobot".into()),
                outcome: SightingOutcome::Identified,
                detail: None,
            },
            DiscoveryResult {
                ip_address: "10.88.0.3".into(),
                robot_id: None,
                method: SightingMethod::Ssh,
                found_at: started_at,
                mac_address: None,
                robot_type: None,
                outcome: SightingOutcome::HostKeyChanged,
                detail: Some("host key changed".into()),
            },
        ],
    }
}

// ---------------------------------------------------------------------------
// The checks.

/// A new robot's row, events and report read back exactly as written, by
/// every read there is.
pub(crate) async fn a_new_robot_reads_back_equal(store: &dyn EventStore) {
    assert_eq!(store.head().await.unwrap(), 0);
    let id = robot_id(1);
    let mut first = append(None, id, vec![discovered(1), provisioning_started()]);
    first.robot.config = json!({"wheel_base_mm": 120.5, "motors": [1, 2, 3], "gain": 0.1,
        "big": 18446744073709551615u64, "tiny": 1e-300, "neg": -7, "text": "ünïcode"});
    first.robot.capabilities = vec!["camera".into(), "base".into()];
    first.robot.metadata = json!({"site": "lab", "shelf": 4});
    let first = with_report(first, report(id, 1, json!({"cpu_temp_c": 81.25})));
    let written = first.robot.clone();
    let written_report = first.report.clone().expect("a report");

    let records = store.append(first).await.unwrap();

    assert_eq!(versions(&records), [1, 2]);
    assert!(strictly_increasing(&positions(&records)));
    assert_eq!(records[0].recorded_at, records[1].recorded_at);
    let stored = store.robot(id).await.unwrap().expect("a stored row");
    assert_eq!(stored, written);
    assert_eq!(stored.state, LifecycleState::Provisioning);
    assert_eq!(store.robots().await.unwrap(), vec![stored.clone()]);
    assert_eq!(store.robot(robot_id(2)).await.unwrap(), None);

    assert_eq!(store.robot_events(id, 0, 10).await.unwrap(), records);
    assert_eq!(store.robot_events(id, 1, 10).await.unwrap(), records[1..]);
    assert_eq!(store.robot_events(id, 0, 1).await.unwrap(), records[..1]);
    assert_eq!(store.events_after(0, 10).await.unwrap(), records);
    assert_eq!(
        store.events_after(records[0].position, 10).await.unwrap(),
        records[1..]
    );
    assert_eq!(store.head().await.unwrap(), records[1].position);
    assert_eq!(
        store.reports(id, 0, 10).await.unwrap(),
        vec![written_report.clone()]
    );
    assert_eq!(
        store.latest_reports().await.unwrap(),
        vec![written_report.clone()]
    );
    let history = store.history(id, None).await.unwrap();
    assert_eq!(history.events, records);
    assert_eq!(history.last_report, Some(written_report));
    // Replay gives the row but for what the caller set beside the events
    // (config, capabilities, metadata).
    assert_eq!(
        history.project().unwrap(),
        Some(Robot {
            config: json!({}),
            capabilities: Vec::new(),
            metadata: json!({}),
            ..stored
        })
    );
    // Before the robot existed, it has no history.
    let before = records[0].recorded_at - chrono::Duration::seconds(1);
    assert_eq!(
        store.history(id, Some(before)).await.unwrap(),
        History::default()
    );
}

/// A report is stored once per (robot, seq), whatever is resent; pages
/// follow the sequence.
pub(crate) async fn reports_are_deduplicated_and_paged(store: &dyn EventStore) {
    let id = robot_id(4);
    store
        .append(append(None, id, vec![discovered(4)]))
        .await
        .unwrap();
    let mut current = store.robot(id).await.unwrap().expect("a row");
    let original = report(id, 1, json!({"battery_v": 12.4}));
    let resent = report(id, 1, json!({"battery_v": 0.0}));
    let mut sent = vec![original.clone()];
    for next in [original.clone(), resent]
        .into_iter()
        .chain((2..=5).map(|seq| report(id, seq, json!({ "seq": seq }))))
    {
        if next.seq > 1 {
            sent.push(next.clone());
        }
        let records = store
            .append(with_report(append(Some(&current), id, vec![]), next))
            .await
            .unwrap();
        assert!(records.is_empty());
        current = store.robot(id).await.unwrap().expect("a row");
    }
    assert_eq!(store.reports(id, 0, 100).await.unwrap(), sent);
    let seqs = |reports: Vec<StoredReport>| reports.iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(seqs(store.reports(id, 0, 2).await.unwrap()), [1, 2]);
    assert_eq!(seqs(store.reports(id, 2, 2).await.unwrap()), [3, 4]);
    assert_eq!(seqs(store.reports(id, 4, 2).await.unwrap()), [5]);
    assert!(store.reports(id, 5, 2).await.unwrap().is_empty());
    assert!(store.reports(robot_id(5), 0, 10).await.unwrap().is_empty());
    assert_eq!(current.last_report_seq, 5);
    assert_eq!(current.version, 1);
    assert_eq!(seqs(store.latest_reports().await.unwrap()), [5]);
}

/// Two appends made from the same row: one is written, the other is a
/// conflict naming the versions. Returns the row after the winner.
pub(crate) async fn of_two_appends_at_one_version_one_wins(store: &dyn EventStore) -> Robot {
    let id = robot_id(7);
    store
        .append(append(None, id, vec![discovered(7)]))
        .await
        .unwrap();
    let current = store.robot(id).await.unwrap().expect("a row");
    let provision = append(Some(&current), id, vec![provisioning_started()]);
    let fail = append(Some(&current), id, vec![failed_from_discovered()]);

    let (a, b) = tokio::join!(store.append(provision), store.append(fail));

    let (winner, loser) = match (a, b) {
        (Ok(won), Err(lost)) => (won, lost),
        (Err(lost), Ok(won)) => (won, lost),
        other => panic!("expected exactly one success, got {other:?}"),
    };
    assert_eq!(versions(&winner), [2]);
    assert!(
        matches!(
            loser,
            StoreError::Conflict { robot_id, expected: 1, actual: 2 } if robot_id == id
        ),
        "{loser:?}"
    );
    let events = store.robot_events(id, 0, 10).await.unwrap();
    assert_eq!(versions(&events), [1, 2]);
    assert_eq!(events[1], winner[0]);
    let stored = store.robot(id).await.unwrap().expect("a row");
    assert_eq!(stored.version, 2);
    assert_eq!(Robot::replay(&events).unwrap(), Some(stored.clone()));
    stored
}

/// Appends that do not fit the robot (version, state, robot, no events, a
/// reused event id) are refused as invalid and change nothing.
pub(crate) async fn invalid_appends_are_refused_and_change_nothing(store: &dyn EventStore) {
    let id = robot_id(3);
    let mut wrong_version = append(None, id, vec![discovered(3)]);
    wrong_version.robot.version = 5;
    let mut no_events = append(None, id, vec![discovered(3)]);
    no_events.events.clear();
    no_events.robot.version = 0;
    let mut wrong_state = append(None, id, vec![discovered(3)]);
    wrong_state.robot.state = LifecycleState::Active;
    let mut wrong_robot = append(None, id, vec![discovered(3)]);
    wrong_robot.robot.robot_id = robot_id(4);
    for bad in [wrong_version, no_events, wrong_state, wrong_robot] {
        let result = store.append(bad).await;
        assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
    }
    assert_eq!(store.head().await.unwrap(), 0);
    assert_eq!(store.robots().await.unwrap(), vec![]);

    let first = append(None, id, vec![discovered(3)]);
    let reused_id = first.events[0].event_id;
    store.append(first).await.unwrap();
    let current = store.robot(id).await.unwrap().expect("a row");
    let mut reused = append(Some(&current), id, vec![provisioning_started()]);
    reused.events[0].event_id = reused_id;
    let result = store.append(reused).await;
    assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
    assert_eq!(store.robot(id).await.unwrap(), Some(current));
    assert_eq!(store.events_after(0, 10).await.unwrap().len(), 1);
}

/// Every commit reaches the feed once, in log order, with the row it
/// left (a report-only commit too); a new subscriber starts from now.
pub(crate) async fn the_feed_carries_every_commit_in_order_with_its_row(store: &dyn EventStore) {
    let mut feed = store.subscribe();
    let (a, b) = (robot_id(1), robot_id(2));
    let mut appended = Vec::new();
    appended.push(
        store
            .append(append(None, a, vec![discovered(1)]))
            .await
            .unwrap(),
    );
    appended.push(
        store
            .append(append(None, b, vec![discovered(2)]))
            .await
            .unwrap(),
    );
    let row_a = store.robot(a).await.unwrap().expect("a row");
    appended.push(
        store
            .append(append(
                Some(&row_a),
                a,
                vec![provisioning_started(), provisioned()],
            ))
            .await
            .unwrap(),
    );
    let row_b = store.robot(b).await.unwrap().expect("a row");
    appended.push(
        store
            .append(with_report(
                append(Some(&row_b), b, vec![]),
                report(b, 1, json!({})),
            ))
            .await
            .unwrap(),
    );

    let mut commits = Vec::new();
    for records in &appended {
        let commit = next_commit(&mut feed).await;
        assert_eq!(&commit.events, records);
        if let Some(last) = records.last() {
            assert_eq!(commit.robot.robot_id, last.robot_id);
            assert_eq!(commit.robot.version, last.version);
        }
        commits.push(commit);
    }
    let fed: Vec<EventRecord> = commits.iter().flat_map(|c| c.events.clone()).collect();
    assert_eq!(fed.len(), 4);
    assert!(strictly_increasing(&positions(&fed)));
    assert_eq!(
        Some((*commits[2].robot).clone()),
        store.robot(a).await.unwrap()
    );
    assert_eq!(
        Some((*commits[3].robot).clone()),
        store.robot(b).await.unwrap()
    );
    assert_eq!(commits[3].robot.robot_id, b);
    assert_eq!(commits[3].robot.last_report_seq, 1);
    assert!(matches!(feed.try_recv(), Err(TryRecvError::Empty)));
    assert!(matches!(
        store.subscribe().try_recv(),
        Err(TryRecvError::Empty)
    ));
}

/// Fifty robots walked through their lifecycle at once: every append is
/// written once, each robot's versions have no gap, every row is its
/// history, and the feed carries the log exactly.
pub(crate) async fn concurrent_appends_lose_and_duplicate_nothing(store: Arc<dyn EventStore>) {
    let mut feed = store.subscribe();
    let tasks: Vec<_> = (0..50)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { walk_lifecycle(&*store, n).await })
        })
        .collect();
    for task in tasks {
        task.await
            .expect("the task ran")
            .expect("every append succeeds");
    }
    let log = all_events(&*store).await;
    assert_eq!(log.len(), 200);
    assert!(strictly_increasing(&positions(&log)));
    assert_eq!(store.head().await.unwrap(), log[199].position);
    for n in 0..50 {
        let id = robot_id(n);
        let events = store.robot_events(id, 0, 100).await.unwrap();
        assert_eq!(versions(&events), [1, 2, 3, 4]);
        let stored = store.robot(id).await.unwrap().expect("a row");
        assert_eq!(stored.state, LifecycleState::Active);
        assert_eq!(stored.last_report_seq, 1);
    }
    assert_rows_are_their_history(&*store).await;
    let fed: Vec<EventRecord> = commits_until(&mut feed, log.len())
        .await
        .iter()
        .flat_map(|c| c.events.clone())
        .collect();
    assert_eq!(fed, log);
}

/// Saving a breaker replaces the robot's previous one; every state reads
/// back exactly, in robot order.
pub(crate) async fn breakers_round_trip(store: &dyn EventStore) {
    let at = |secs: i64| {
        // Microseconds: what PostgreSQL keeps.
        Utc.timestamp_opt(1_800_000_000 + secs, 123_456_000)
            .unwrap()
    };
    let (a, b) = (RobotId(Uuid::from_u128(1)), RobotId(Uuid::from_u128(2)));
    assert_eq!(store.breakers().await.unwrap(), []);
    let saved = [
        (a, BreakerState::Closed { failures: 4 }),
        (b, BreakerState::Open { opened_at: at(1) }),
        (
            a,
            BreakerState::HalfOpen {
                since: at(2),
                successes: 2,
            },
        ),
    ];
    for (i, (robot_id, state)) in saved.into_iter().enumerate() {
        let stored = StoredBreaker {
            robot_id,
            state,
            updated_at: at(i as i64),
        };
        store.save_breaker(&stored).await.unwrap();
    }
    let read = store.breakers().await.unwrap();
    assert_eq!(
        read,
        [
            StoredBreaker {
                robot_id: a,
                state: BreakerState::HalfOpen {
                    since: at(2),
                    successes: 2
                },
                updated_at: at(2),
            },
            StoredBreaker {
                robot_id: b,
                state: BreakerState::Open { opened_at: at(1) },
                updated_at: at(1),
            },
        ]
    );
}

/// A discovery round reads back with its results in order; recorded again
/// under its id, it is replaced (results too); an unknown id is none.
pub(crate) async fn discovery_sessions_are_recorded_once_per_id(store: &dyn EventStore) {
    let mut session = session();
    session.results.truncate(1);
    store.record_discovery(&session, None).await.unwrap();
    assert_eq!(
        store.discovery(session.session_id).await.unwrap(),
        Some(session.clone())
    );
    session.robots_found = 4;
    session.results.push(DiscoveryResult {
        ip_address: "10.88.0.3".into(),
        robot_id: None,
        method: SightingMethod::Arp,
        found_at: session.started_at,
        mac_address: None,
        robot_type: None,
        outcome: SightingOutcome::Live,
        detail: Some("no agent, SSH closed".into()),
    });
    store.record_discovery(&session, None).await.unwrap();
    assert_eq!(
        store.discovery(session.session_id).await.unwrap(),
        Some(session.clone()),
        "replaced, results in order"
    );
    assert_eq!(store.discovery(Uuid::new_v4()).await.unwrap(), None);
}

/// Pruning folds old events into snapshots and deletes old reports, and
/// the rows rebuilt from what is left still equal the live rows; pruning
/// again changes nothing, and appends go on from a snapshot's version.
pub(crate) async fn pruning_keeps_replay_equal_to_the_live_rows(store: &dyn EventStore) {
    let old = now() - chrono::Duration::days(3);
    let recent = now();
    // Robots 1..=5: old history, then recent events and reports.
    for n in 1..=5 {
        let id = robot_id(n);
        let a = append_at(None, id, vec![discovered(n), provisioning_started()], old);
        let a = with_report(a, report_at(id, 1, json!({"n": 1}), old));
        store.append(a).await.unwrap();
        let row = store.robot(id).await.unwrap().unwrap();
        let a = append_at(Some(&row), id, vec![], old);
        let a = with_report(a, report_at(id, 2, json!({"n": 2}), old));
        store.append(a).await.unwrap();
        let row = store.robot(id).await.unwrap().unwrap();
        let a = append_at(Some(&row), id, vec![provisioned(), activated()], recent);
        let a = with_report(a, report_at(id, 3, json!({"n": 3}), recent));
        store.append(a).await.unwrap();
    }
    // Robot 6: only old events; robot 7: only recent ones.
    store
        .append(append_at(None, robot_id(6), vec![discovered(6)], old))
        .await
        .unwrap();
    store
        .append(append_at(None, robot_id(7), vec![discovered(7)], recent))
        .await
        .unwrap();
    assert_rebuild_equals_live(store).await;
    let live = store.robots().await.unwrap();

    let outcome = store
        .prune(recent - chrono::Duration::days(1))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        PruneOutcome {
            robots: 6,
            events_removed: 5 * 2 + 1,
            reports_removed: 5 * 2,
        }
    );
    assert_eq!(store.robots().await.unwrap(), live);
    assert_eq!(store.snapshots().await.unwrap().len(), 6);
    assert_eq!(all_events(store).await.len(), 5 * 2 + 1);
    assert_rebuild_equals_live(store).await;
    assert_rows_are_their_history(store).await;

    // Pruning everything, then again: still exact, and idempotent.
    let outcome = store
        .prune(recent + chrono::Duration::seconds(1))
        .await
        .unwrap();
    assert_eq!(outcome.robots, 6);
    assert_eq!(outcome.events_removed, 5 * 2 + 1);
    assert_eq!(all_events(store).await, vec![]);
    assert_rebuild_equals_live(store).await;
    assert_rows_are_their_history(store).await;
    let outcome = store
        .prune(recent + chrono::Duration::seconds(1))
        .await
        .unwrap();
    assert_eq!(outcome, PruneOutcome::default());
    assert_eq!(store.robots().await.unwrap(), live);

    // Appends go on from the snapshot's version.
    let row = store.robot(robot_id(6)).await.unwrap().unwrap();
    let records = store
        .append(append(
            Some(&row),
            robot_id(6),
            vec![provisioning_started()],
        ))
        .await
        .unwrap();
    assert_eq!(versions(&records), [2]);
    assert_rebuild_equals_live(store).await;
}

/// Declares one `#[tokio::test]` per conformance check for a backend:
/// `$open` is a future giving `(guard, store)`, the guard kept alive (a
/// temporary directory, a test database) until the check is done and the
/// store closed.
macro_rules! conformance_tests {
    ($open:expr) => {
        mod conformance {
            use super::*;
            use crate::store::conformance as check;

            crate::store::conformance::conformance_checks!(
                $open;
                a_new_robot_reads_back_equal,
                reports_are_deduplicated_and_paged,
                of_two_appends_at_one_version_one_wins,
                invalid_appends_are_refused_and_change_nothing,
                the_feed_carries_every_commit_in_order_with_its_row,
                breakers_round_trip,
                discovery_sessions_are_recorded_once_per_id,
                pruning_keeps_replay_equal_to_the_live_rows,
            );

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_appends_lose_and_duplicate_nothing() {
                let (_guard, store) = $open.await;
                let store = std::sync::Arc::new(store);
                check::concurrent_appends_lose_and_duplicate_nothing(store.clone()).await;
                store.close().await;
            }
        }
    };
}

/// One `#[tokio::test]` per check that takes the store by reference,
/// named as the check.
macro_rules! conformance_checks {
    ($open:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let (_guard, store) = $open.await;
                check::$name(&store).await;
                store.close().await;
            }
        )*
    };
}
pub(crate) use conformance_checks;
pub(crate) use conformance_tests;
