//! History on the embedded store: replay rebuilds exactly the live read
//! model (also over 100,000 events and after pruning), the state of a robot
//! at a past instant, and fencing tokens.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use chrono::{DateTime, Utc};
use http_body_util::BodyExt;
use kiwi_controller::config::Config;
use kiwi_controller::domain::decide::CommandIntent;
use kiwi_controller::domain::event::IdentityFacts;
use kiwi_controller::domain::{Action, Input};
use kiwi_controller::fleet::{Context, Fleet, truncate_micros};
use kiwi_controller::ops;
use kiwi_controller::security::tokens::create_api_token;
use kiwi_controller::serve::Components;
use kiwi_controller::store::auth::Role;
use kiwi_controller::store::{DiscoverySession, Fence, StoreError};
use kiwi_controller::testing::TestDatabase;
use kiwi_protocol::message::{AgentHealth, HealthStatus, Report, Telemetry, WorkloadState};
use kiwi_protocol::{HardwareId, RobotId};
use serde_json::Value;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use uuid::Uuid;

async fn components(dir: &std::path::Path) -> Components {
    let config = Config {
        state_dir: dir.to_path_buf(),
        auto_provision: false,
        discovery_interval: Duration::ZERO,
        ..Config::default()
    };
    Components::build(config, CancellationToken::new())
        .await
        .unwrap()
}

fn id(n: u32) -> RobotId {
    RobotId::from_hardware(&HardwareId::Configured(format!("history-{n}")))
}

fn facts(n: u32) -> IdentityFacts {
    IdentityFacts {
        hostname: format!("robot-{n}"),
        ip_address: Some("127.0.0.1".into()),
        robot_type: "lekiwi".into(),
        model: None,
        firmware_version: None,
        agent_version: Some("0.1.0".into()),
        hardware_id: format!("configured:history-{n}"),
        mac_addresses: vec![],
    }
}

async fn apply(fleet: &Fleet, n: u32, input: Input) {
    fleet
        .apply(id(n), input, &Context::new("test"))
        .await
        .unwrap();
}

async fn make_ready(fleet: &Fleet, n: u32) {
    apply(fleet, n, Input::AgentConnected { facts: facts(n) }).await;
    apply(fleet, n, Input::Operator(Action::Provision)).await;
    apply(
        fleet,
        n,
        Input::CommandAnswered {
            command: CommandIntent::Provision,
            error: None,
        },
    )
    .await;
}

async fn report(fleet: &Fleet, n: u32, seq: u64, degraded: bool) {
    let health = if degraded {
        AgentHealth {
            status: HealthStatus::Degraded,
            reasons: vec!["hot".into()],
        }
    } else {
        AgentHealth {
            status: HealthStatus::Healthy,
            reasons: vec![],
        }
    };
    let r = Report {
        seq,
        time_ms: Utc::now().timestamp_millis(),
        health,
        workload: WorkloadState::Running,
        maintenance: false,
        telemetry: Telemetry {
            uptime_s: seq,
            ..Telemetry::default()
        },
    };
    fleet
        .report(id(n), &r, &Context::new("agent"))
        .await
        .unwrap();
}

/// Returns once the time commits are recorded with (the wall clock, in
/// whole microseconds) is past `t`: whatever is committed from then on is
/// recorded after `t`. Waits at most a microsecond (or a step of the clock
/// backwards).
async fn past(t: DateTime<Utc>) {
    while truncate_micros(Utc::now()) <= t {
        tokio::task::yield_now().await;
    }
}

/// A GET with a (new) viewer token.
async fn get(c: &Components, uri: &str) -> (StatusCode, Value) {
    let (token, _) = create_api_token(c.store.auth().as_ref(), Role::Viewer, "history", None)
        .await
        .unwrap();
    let resp = c
        .api_router()
        .oneshot(
            Request::get(uri)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn replay_matches_the_live_read_model_and_prune_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = components(dir.path()).await;
    for n in 0..5 {
        make_ready(&c.fleet, n).await;
        for seq in 1..=4 {
            report(&c.fleet, n, seq, seq % 2 == 0).await;
        }
    }
    apply(
        &c.fleet,
        1,
        Input::Operator(Action::Activate {
            deployment_version: Some("v7".into()),
        }),
    )
    .await;
    apply(
        &c.fleet,
        2,
        Input::AgentLost {
            reason: "cable".into(),
        },
    )
    .await;

    let check = ops::replay_check(c.store.as_ref()).await.unwrap();
    assert!(check.differences.is_empty(), "{:#?}", check.differences);
    assert_eq!(check.robots, 5);

    // Everything up to now folds into snapshots; later changes go on top.
    let cut = Utc::now();
    past(cut).await;
    apply(
        &c.fleet,
        1,
        Input::Operator(Action::MaintenanceStart { reason: None }),
    )
    .await;
    report(&c.fleet, 3, 5, false).await;
    let outcome = c.store.prune(cut).await.unwrap();
    assert_eq!(outcome.robots, 5);
    assert!(outcome.events_removed >= 5 * 5, "{outcome:?}");
    assert_eq!(
        outcome.reports_removed,
        4 * 3 + 4,
        "old reports go except each robot's latest; robot 3 reported again after the cut, so all four of its old ones go"
    );
    let check = ops::replay_check(c.store.as_ref()).await.unwrap();
    assert!(
        check.differences.is_empty(),
        "after prune: {:#?}",
        check.differences
    );
    // Only the event after the cut is left in robot 1's stream.
    let left = c.store.robot_events(id(1), 0, 100).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].event.type_name(), "robot_maintenance_start");
    // A second prune with nothing old is a no-op that keeps replay exact.
    assert_eq!(c.store.prune(cut).await.unwrap().events_removed, 0);
    assert!(
        ops::replay_check(c.store.as_ref())
            .await
            .unwrap()
            .differences
            .is_empty()
    );
}

#[tokio::test]
async fn a_tampered_read_model_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let c = components(dir.path()).await;
    make_ready(&c.fleet, 1).await;
    drop(c);
    // Change the live row behind the store's back.
    let db = dir.path().join(kiwi_controller::serve::DATABASE_FILE);
    let status = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg("UPDATE robot_states SET state = 'active'")
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => panic!("sqlite3 (Debian package sqlite3) is needed for this test: {other:?}"),
    }
    let c = components(dir.path()).await;
    let check = ops::replay_check(c.store.as_ref()).await.unwrap();
    assert_eq!(check.differences.len(), 1);
    assert_eq!(check.differences[0].robot_id, id(1));
}

#[tokio::test]
async fn state_at_an_instant() {
    let dir = tempfile::tempdir().unwrap();
    let c = components(dir.path()).await;
    let before_anything = Utc::now();
    past(before_anything).await;
    make_ready(&c.fleet, 1).await;
    report(&c.fleet, 1, 1, false).await;
    let when_ready = Utc::now();
    past(when_ready).await;
    apply(
        &c.fleet,
        1,
        Input::Operator(Action::Activate {
            deployment_version: None,
        }),
    )
    .await;
    report(&c.fleet, 1, 2, true).await;

    let at = |t: chrono::DateTime<Utc>| {
        format!(
            "/api/v2/robots/{}?at={}",
            id(1),
            t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .replace('+', "%2B")
        )
    };
    let (status, then) = get(&c, &at(when_ready)).await;
    assert_eq!(status, StatusCode::OK, "{then}");
    assert_eq!(then["state"], "ready");
    assert_eq!(then["health"]["status"], "healthy");
    assert_eq!(then["last_report_seq"], 1);
    let (_, now) = get(&c, &at(Utc::now())).await;
    assert_eq!(now["state"], "active");
    assert_eq!(now["health"]["status"], "degraded");
    assert_eq!(now["last_report_seq"], 2);
    // The live row and the row at "now" agree.
    let (_, live) = get(&c, &format!("/api/v2/robots/{}", id(1))).await;
    for field in [
        "state",
        "version",
        "health",
        "last_report_seq",
        "updated_at",
    ] {
        assert_eq!(live[field], now[field], "{field}");
    }

    let (status, _) = get(&c, &at(before_anything)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = get(&c, &format!("/api/v2/robots/{}?at=yesterday", id(1))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    c.store.prune(Utc::now()).await.unwrap();
    let (status, body) = get(&c, &at(when_ready)).await;
    assert_eq!(status, StatusCode::GONE, "{body}");
    let (status, after_prune) = get(&c, &at(Utc::now())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(after_prune["state"], "active");
}

#[tokio::test]
async fn stale_fencing_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = components(dir.path()).await;
    let session = |n: i64| DiscoverySession {
        session_id: Uuid::new_v4(),
        methods: vec!["sweep".into()],
        started_at: Utc::now(),
        finished_at: Utc::now(),
        duration_ms: n,
        robots_found: n,
        new_robots: 0,
        results: Vec::new(),
    };
    let fence = |token| Fence {
        resource: "sweep:10.88.0.0/24".into(),
        token,
    };
    c.store
        .record_discovery(&session(1), Some(&fence(5)))
        .await
        .unwrap();
    match c.store.record_discovery(&session(2), Some(&fence(4))).await {
        Err(StoreError::Fenced {
            token: 4,
            current: 5,
            ..
        }) => {}
        other => panic!("expected a stale fence, got {other:?}"),
    }
    c.store
        .record_discovery(&session(3), Some(&fence(6)))
        .await
        .unwrap();
    // Another resource has its own tokens.
    let other = Fence {
        resource: "sweep:10.99.0.0/24".into(),
        token: 1,
    };
    c.store
        .record_discovery(&session(4), Some(&other))
        .await
        .unwrap();
}

/// 100 robots, each through 1,003 events, then a full replay.
async fn hundred_thousand_events(c: Components) {
    const ROBOTS: u32 = 100;
    const CYCLES: u32 = 500; // two events each, plus three to become ready
    let mut tasks = Vec::new();
    for n in 0..ROBOTS {
        let fleet = c.fleet.clone();
        tasks.push(tokio::spawn(async move {
            make_ready(&fleet, n).await;
            for _ in 0..CYCLES {
                apply(
                    &fleet,
                    n,
                    Input::Operator(Action::MaintenanceStart { reason: None }),
                )
                .await;
                apply(&fleet, n, Input::Operator(Action::MaintenanceEnd)).await;
            }
            report(&fleet, n, 1, false).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let head = c.store.head().await.unwrap();
    assert!(head >= 100_000, "only {head} events");
    let check = ops::replay_check(c.store.as_ref()).await.unwrap();
    assert_eq!(check.events, u64::try_from(head).unwrap());
    assert_eq!(check.robots, ROBOTS as usize);
    assert!(
        check.differences.is_empty(),
        "{:#?}",
        check.differences.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_a_hundred_thousand_events_embedded() {
    let dir = tempfile::tempdir().unwrap();
    hundred_thousand_events(components(dir.path()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_a_hundred_thousand_events_postgres() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        state_dir: dir.path().to_path_buf(),
        auto_provision: false,
        discovery_interval: Duration::ZERO,
        database_url: Some(db.url().to_string()),
        ..Config::default()
    };
    let c = Components::build(config, CancellationToken::new())
        .await
        .unwrap();
    hundred_thousand_events(c).await;
}
