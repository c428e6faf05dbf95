//! The production storage, against a real PostgreSQL and a real Redis:
//!
//! - two controllers on one database and one Redis see the same fleet, a
//!   watch client on one sees every change made through the other, in order
//!   and without gaps, and only one of them runs a discovery round at a
//!   time; `kiwi-controller replay` agrees with the live read model after;
//! - Redis killed during traffic costs no API error, `/readyz` says
//!   degraded, and cache hits resume once it is back;
//! - PostgreSQL stopped during agent traffic: `/readyz` is 503 while it is
//!   down, the controller recovers without a restart, and every report the
//!   agents made, during the outage too, is stored exactly once.
//!
//! Each test has its own database and Redis key prefix (see
//! `kiwi_tests::services`); the shared servers come from `DATABASE_URL` and
//! `REDIS_URL` (`scripts/services.sh`), else localhost's default ports.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, ensure};
use kiwi_tests::api::RawResponse;
use kiwi_tests::poller::{Polled, Poller};
use kiwi_tests::services::run_controller_command;
use kiwi_tests::{
    Agent, AgentOptions, Api, Controller, ControllerOptions, Event, POLL_INTERVAL, PgCluster,
    RedisKeys, RedisServer, Resume, State, TestDatabase, Watch, made_between, now_ms, secs,
    test_serial, wait_for_robot, wait_ready_and_connected, wait_readyz_status, wait_until,
};
use reqwest::{Method, StatusCode, header};
use serde_json::Value;
use uuid::Uuid;

/// The problem type of a discovery round refused because another
/// controller holds the lease.
const DISCOVERY_IN_PROGRESS: &str = "urn:kiwi:problem:discovery-in-progress";

/// What one `POST /api/v2/discover` came to.
#[derive(Debug)]
enum DiscoverOutcome {
    /// 202, then the session recorded under the id it gave.
    Session(Value),
    /// 409 `discovery-in-progress`.
    InProgress,
}

/// `POST /api/v2/discover`, its answer checked for shape: a 202 carries the
/// session id (and `Location`), which `GET /api/v2/discoveries/{id}`
/// follows until the round is recorded; a 409 is a well-formed
/// `discovery-in-progress` problem with a `Retry-After`. Anything else
/// fails.
async fn discover(api: &Api, expected_robots: i64) -> anyhow::Result<DiscoverOutcome> {
    let resp = api
        .http()
        .post(api.url("/api/v2/discover"))
        .send()
        .await
        .context("POST /api/v2/discover")?;
    let status = resp.status();
    let header_of = |name| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let retry_after = header_of(header::RETRY_AFTER);
    let location = header_of(header::LOCATION);
    let content_type = header_of(header::CONTENT_TYPE);
    let body = resp.text().await.context("body of POST /api/v2/discover")?;
    let raw = RawResponse {
        status,
        content_type,
        body,
    };
    match status {
        StatusCode::ACCEPTED => {
            let body: Value = serde_json::from_str(&raw.body)
                .with_context(|| format!("POST /api/v2/discover: 202 with body {}", raw.body))?;
            let id = body["session_id"]
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
                .with_context(|| format!("a 202 carries a session_id: {body}"))?;
            let path = format!("/api/v2/discoveries/{id}");
            ensure!(
                location.as_deref() == Some(path.as_str()),
                "Location of the 202 is {path}: {location:?}"
            );
            let session = wait_until(secs(30), || {
                let path = path.clone();
                async move {
                    let followed: Value = api
                        .http()
                        .get(api.url(&path))
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
                        .await?;
                    ensure!(followed["status"] == "done", "GET {path}: {followed}");
                    Ok(followed["session"].clone())
                }
            })
            .await;
            ensure!(
                session["session_id"].as_str() == Some(id.to_string().as_str()),
                "the recorded session has the id of the 202: {session}"
            );
            ensure!(
                session["methods"] == serde_json::json!(["agent"]),
                "with LAN discovery off, rounds ask the connected agents only: {session}"
            );
            let started = kiwi_tests::api::timestamp_ms(&session["started_at"]);
            let finished = kiwi_tests::api::timestamp_ms(&session["finished_at"]);
            ensure!(
                started.is_some() && finished.is_some() && started <= finished,
                "started_at <= finished_at: {session}"
            );
            ensure!(
                session["duration_ms"].as_i64().is_some_and(|d| d >= 0),
                "duration_ms: {session}"
            );
            ensure!(
                session["robots_found"].as_i64() == Some(expected_robots),
                "a round finds the {expected_robots} agents connected to this controller: {session}"
            );
            ensure!(
                session["new_robots"].as_i64() == Some(0),
                "every robot was known before the round: {session}"
            );
            let results = session["results"].as_array().context("results")?;
            ensure!(
                results.len() as i64 == expected_robots
                    && results.iter().all(|r| r["method"] == "agent"
                        && r["outcome"] == "identified"
                        && r["robot_id"].is_string()),
                "one identified result per connected agent: {session}"
            );
            Ok(DiscoverOutcome::Session(session))
        }
        StatusCode::CONFLICT => {
            let problem = raw.problem();
            problem.check_well_formed()?;
            ensure!(
                problem.member("type") == DISCOVERY_IN_PROGRESS,
                "409 of POST /api/v2/discover is {DISCOVERY_IN_PROGRESS}: {problem}"
            );
            ensure!(
                retry_after
                    .as_deref()
                    .is_some_and(|v| v.trim().parse::<u64>().is_ok()),
                "409 discovery-in-progress says when to retry (Retry-After: {retry_after:?})"
            );
            Ok(DiscoverOutcome::InProgress)
        }
        _ => anyhow::bail!("POST /api/v2/discover: {}", raw.problem()),
    }
}

/// Two controllers, one PostgreSQL database, one Redis, two agents each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_share_one_database_and_one_redis() {
    let db = TestDatabase::create().await;
    let keys = RedisKeys::create().await;
    // No periodic rounds: only the test's requests take the discovery lease.
    let opts = ControllerOptions::new()
        .storage(&db, Some(&keys))
        .setting("discovery_interval", "0s");
    // Started together: both migrate the same empty database at once.
    let (mut first, mut second) = tokio::join!(opts.clone().start(), opts.start());

    let on_first: Vec<Agent> = (1..=2)
        .map(|n| Agent::start(&first, &test_serial(n)))
        .collect();
    let on_second: Vec<Agent> = (3..=4)
        .map(|n| Agent::start(&second, &test_serial(n)))
        .collect();
    for agent in &on_first {
        wait_ready_and_connected(first.api(), agent.robot_id(), secs(30)).await;
    }
    for agent in &on_second {
        wait_ready_and_connected(second.api(), agent.robot_id(), secs(30)).await;
    }
    let all: BTreeSet<Uuid> = on_first
        .iter()
        .chain(&on_second)
        .map(Agent::robot_id)
        .collect();

    // Both list every robot, each ready, whichever controller its agent
    // is connected to.
    for (name, controller) in [("first", &first), ("second", &second)] {
        let api = controller.api();
        let all = &all;
        wait_until(secs(30), move || async move {
            let robots = api.robots().await?;
            let listed: BTreeSet<Uuid> = robots.iter().map(|r| r.robot_id).collect();
            ensure!(
                listed == *all,
                "the {name} controller lists {listed:?}, expected {all:?}"
            );
            let not_ready: Vec<_> = robots
                .iter()
                .filter(|r| r.state != State::Ready)
                .map(|r| (r.robot_id, r.state))
                .collect();
            ensure!(
                not_ready.is_empty(),
                "the {name} controller lists robots not ready: {not_ready:?}"
            );
            Ok(())
        })
        .await;
    }

    // A watch client on the second controller, connected before the
    // changes, from the end of the log as the first controller sees it.
    let robot = on_first[0].robot_id();
    let head = first
        .api()
        .all_events()
        .await
        .expect("the event log")
        .last()
        .expect("there are events")
        .position;
    let mut watch = Watch::connect(second.api(), Resume::After(head))
        .await
        .expect("watch the second controller");

    // Changes through the first controller's API.
    let steps = [
        ("activate", None, State::Active),
        (
            "maintenance/start",
            Some(serde_json::json!({"reason": "storage test"})),
            State::Maintenance,
        ),
        ("maintenance/end", None, State::Ready),
    ];
    for (action, body, to) in steps {
        let after = first
            .api()
            .act(robot, action, body)
            .await
            .unwrap_or_else(|e| panic!("{action} through the first controller: {e:#}"));
        assert_eq!(after.state, to, "{action}: {after:#?}");
    }

    let watched = watch
        .collect_until(secs(20), |events| {
            events.iter().any(|e| {
                e.robot_id == robot && e.transition() == Some((State::Maintenance, State::Ready))
            })
        })
        .await
        .unwrap_or_else(|e| panic!("the watch on the second controller: {e:#}"));
    let positions: Vec<i64> = watched.iter().map(|e| e.position).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "SSE ids on the second controller are strictly increasing: {positions:?}"
    );
    assert!(
        positions.first().is_some_and(|&p| p > head),
        "resumed after {head}, the watch starts later: {positions:?}"
    );
    let transitions: Vec<(State, State)> = watched
        .iter()
        .filter(|e| e.robot_id == robot)
        .filter_map(Event::transition)
        .collect();
    assert_eq!(
        transitions,
        vec![
            (State::Ready, State::Active),
            (State::Active, State::Maintenance),
            (State::Maintenance, State::Ready),
        ],
        "the second controller's watch shows the first controller's changes of {robot}, in order"
    );
    // No gap: what the watch delivered is exactly the stored log between
    // the resume point and its last event.
    let last = *positions.last().expect("events were watched");
    let stored: Vec<Event> = first
        .api()
        .all_events()
        .await
        .expect("the event log")
        .into_iter()
        .filter(|e| e.position > head && e.position <= last)
        .collect();
    let stored_positions: Vec<i64> = stored.iter().map(|e| e.position).collect();
    assert_eq!(
        positions, stored_positions,
        "the watch on the second controller delivers every stored event after {head}, no gap"
    );
    assert_eq!(
        watched, stored,
        "the watched events are the stored ones, field for field"
    );
    eprintln!(
        "watch on the second controller: {} events at positions {}..={last}, as stored",
        watched.len(),
        head + 1
    );
    drop(watch);

    check_discovery_lease(&first, &second, &keys, &db).await;

    // After the traffic: the read model replays from the log.
    first.stop().await;
    second.stop().await;
    let replay = run_controller_command(
        &["replay"],
        &[("KIWI_CONTROLLER_DATABASE_URL", db.url())],
        secs(60),
    )
    .await;
    assert!(
        replay.status.success(),
        "kiwi-controller replay on the shared database exits 0, not {}; output:\n{}",
        replay.status,
        replay.output
    );
    drop(on_first);
    drop(on_second);
}

/// Discovery rounds on two controllers: a lease held elsewhere makes both
/// answer 409; concurrent rounds never both lose (at most one 409 per
/// pair), and every 200, and only those, recorded its session.
async fn check_discovery_lease(
    first: &Controller,
    second: &Controller,
    keys: &RedisKeys,
    db: &TestDatabase,
) {
    let mut sessions: Vec<Value> = Vec::new();

    // A holder that is neither controller (the lease key as documented in
    // controller/src/cache/redis.rs): both must refuse to run a round.
    let lease_key = keys.key("lease:discovery");
    let mut redis = keys.connect().await.expect("connect to Redis");
    let set: Option<String> = redis::cmd("SET")
        .arg(&lease_key)
        .arg("1#kiwi-tests")
        .arg("NX")
        .arg("PX")
        .arg(30_000)
        .query_async(&mut redis)
        .await
        .expect("SET the discovery lease");
    assert_eq!(
        set.as_deref(),
        Some("OK"),
        "nobody holds the discovery lease before the test takes it"
    );
    let (a, b) = tokio::join!(discover(first.api(), 2), discover(second.api(), 2));
    for (name, outcome) in [("first", a), ("second", b)] {
        let outcome = outcome.unwrap_or_else(|e| panic!("discover on the {name}: {e:#}"));
        assert!(
            matches!(outcome, DiscoverOutcome::InProgress),
            "the {name} controller runs a round while another holder has the lease: {outcome:?}"
        );
    }
    let _: i64 = redis::cmd("DEL")
        .arg(&lease_key)
        .query_async(&mut redis)
        .await
        .expect("DEL the discovery lease");

    // Concurrent rounds on both. Rounds are short, so they do not always
    // overlap: up to 40 pairs, stopping early once one was refused.
    let mut refused = 0;
    for pair in 1..=40 {
        let (a, b) = tokio::join!(discover(first.api(), 2), discover(second.api(), 2));
        let a = a.unwrap_or_else(|e| panic!("pair {pair}, discover on the first: {e:#}"));
        let b = b.unwrap_or_else(|e| panic!("pair {pair}, discover on the second: {e:#}"));
        let mut in_progress = 0;
        for outcome in [a, b] {
            match outcome {
                DiscoverOutcome::Session(s) => sessions.push(s),
                DiscoverOutcome::InProgress => in_progress += 1,
            }
        }
        assert!(
            in_progress <= 1,
            "pair {pair}: both controllers answered 409 discovery-in-progress, though \
             nobody else holds the lease"
        );
        refused += in_progress;
        if refused > 0 && pair >= 5 {
            break;
        }
    }
    eprintln!(
        "discovery: {} rounds recorded, {refused} refused with 409 while the other ran",
        sessions.len()
    );

    // Every 202 recorded its session, and nothing else was recorded.
    let answered: BTreeSet<Uuid> = sessions
        .iter()
        .map(|s| Uuid::parse_str(s["session_id"].as_str().expect("checked")).expect("checked"))
        .collect();
    assert_eq!(
        answered.len(),
        sessions.len(),
        "session ids are unique: {sessions:#?}"
    );
    let mut conn = db.connect().await.expect("connect to the test database");
    let recorded: Vec<Uuid> = sqlx::query_scalar("SELECT session_id FROM discovery_sessions")
        .fetch_all(&mut conn)
        .await
        .expect("read discovery_sessions");
    let recorded: BTreeSet<Uuid> = recorded.into_iter().collect();
    assert_eq!(
        recorded, answered,
        "discovery_sessions holds exactly the sessions of the rounds answered 200"
    );
}

/// Redis killed while the API serves a robot every 20 ms: not one error,
/// `/readyz` degraded; Redis back: ready again and cache hits resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_during_traffic_costs_no_api_error() {
    let db = TestDatabase::create().await;
    let mut redis = RedisServer::start().await;
    let keys = RedisKeys::create_on(&redis.url()).await;
    let controller = ControllerOptions::new()
        .storage(&db, Some(&keys))
        .start()
        .await;
    let api = controller.api();
    let agent = Agent::start(&controller, &test_serial(1));
    let robot = agent.robot_id();
    wait_ready_and_connected(api, robot, secs(30)).await;
    wait_readyz_status(api, "ready", secs(20)).await;
    let hits = api.metric("cache_hits_total", &[]).await.expect("metrics");
    wait_until(secs(10), || async move {
        api.robot_required(robot).await?;
        let now = api.metric("cache_hits_total", &[]).await?;
        ensure!(now > hits, "cache_hits_total is {now}, was {hits}");
        Ok(())
    })
    .await;

    // Traffic: GET the robot every 20 ms, keeping every failure.
    let poller = Poller::start(Duration::from_millis(20), {
        let api = api.clone();
        move || {
            let api = api.clone();
            async move {
                let raw = api
                    .request(Method::GET, &format!("/api/v2/robots/{robot}"), None)
                    .await?;
                ensure!(raw.status == StatusCode::OK, "{}", raw.problem());
                let id = serde_json::from_str::<Value>(&raw.body)
                    .ok()
                    .and_then(|v| v["robot_id"].as_str().map(str::to_string));
                ensure!(
                    id.as_deref() == Some(robot.to_string().as_str()),
                    "200 with body {}",
                    raw.body
                );
                Ok(())
            }
        }
    });
    poller.wait_for_more(10, secs(10)).await;

    let killed_at = now_ms();
    redis.kill();
    let degraded = wait_readyz_status(api, "degraded", secs(15)).await;
    eprintln!("/readyz with Redis killed: {degraded}");
    // Some traffic with Redis gone.
    poller.wait_for_more(25, secs(15)).await;

    redis.start_again().await;
    let restarted_at = now_ms();
    wait_readyz_status(api, "ready", secs(30)).await;
    let hits = api.metric("cache_hits_total", &[]).await.expect("metrics");
    wait_until(secs(15), || async move {
        let now = api.metric("cache_hits_total", &[]).await?;
        ensure!(
            now > hits,
            "cache_hits_total is {now}, was {hits} when /readyz said ready again"
        );
        Ok(())
    })
    .await;

    let Polled {
        total, failures, ..
    } = poller.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {total} GET /api/v2/robots/{robot} failed (Redis killed at {killed_at}, back at \
         {restarted_at}, Unix ms): {:#?}",
        failures.len(),
        &failures[..failures.len().min(20)]
    );
    assert!(total >= 35, "only {total} requests were made");
}

/// The reports of `id` are 1..=N without gaps or duplicates, N agreeing
/// with `last_report_seq`; returns the seqs of those made in
/// `(down_at, up_at)`.
async fn check_reports_exactly_once(api: &Api, id: Uuid, down_at: i64, up_at: i64) -> Vec<u64> {
    // Reports leave an agent's outbox in order: once one made after the
    // outage is stored, everything made during it must be too.
    wait_until(secs(30), move || async move {
        let reports = api.reports(id).await?;
        let newest = reports.iter().filter_map(|r| r.time_ms()).max();
        ensure!(
            newest.is_some_and(|t| t > up_at),
            "robot {id}: {} reports, the newest made at {newest:?}, none after the outage \
             ended at {up_at}",
            reports.len()
        );
        Ok(())
    })
    .await;
    // Reports keep arriving: list them between two reads of the robot.
    let floor = api.robot_required(id).await.expect("robot").last_report_seq;
    let reports = api.reports(id).await.expect("reports");
    let ceiling = api.robot_required(id).await.expect("robot").last_report_seq;
    let seqs: Vec<u64> = reports.iter().map(|r| r.seq).collect();
    let n = u64::try_from(seqs.len()).expect("a count fits in u64");
    assert_eq!(
        seqs,
        (1..=n).collect::<Vec<_>>(),
        "robot {id}: report seqs are 1..={n}, no gap, no duplicate"
    );
    assert!(
        floor <= n && n <= ceiling,
        "robot {id}: last_report_seq ({floor} before listing, {ceiling} after) disagrees with \
         the {n} stored reports"
    );
    for r in &reports {
        assert_eq!(r.robot_id, id, "report {} belongs to its robot", r.seq);
        assert!(r.time_ms().is_some(), "report {} has a time: {r:?}", r.seq);
    }
    reports
        .iter()
        .filter(|r| r.time_ms().is_some_and(|t| t > down_at && t < up_at))
        .map(|r| r.seq)
        .collect()
}

/// PostgreSQL stopped while agents report every 200 ms, until each has
/// made three reports: the controller says so on `/readyz`, recovers by
/// itself, and loses or duplicates no report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_during_agent_traffic_loses_no_report() {
    let mut pg = PgCluster::start().await;
    let db = TestDatabase::create_on(&pg.server_url()).await;
    let mut controller = ControllerOptions::new()
        .storage(&db, None)
        .report_interval("200ms")
        .start()
        .await;
    let api = controller.api().clone();
    let agents: Vec<Agent> = (1..=2)
        .map(|n| {
            AgentOptions::new(&test_serial(n))
                .report_interval("200ms")
                .start(&controller)
        })
        .collect();
    let ids: Vec<Uuid> = agents.iter().map(Agent::robot_id).collect();
    for &id in &ids {
        wait_ready_and_connected(&api, id, secs(30)).await;
        wait_for_robot(&api, id, secs(20), "reporting", |r| r.last_report_seq >= 3).await;
    }
    let (code, body) = api.readyz().await.expect("GET /readyz");
    assert_eq!(code, StatusCode::OK, "/readyz before the outage: {body}");

    // Down until every agent has made three reports meanwhile (kept in its
    // outbox: the controller cannot store them).
    let (down_at, up_at) = pg
        .outage_until(&api, POLL_INTERVAL, |down_at| {
            let agents = &agents;
            async move {
                let now = now_ms();
                for agent in agents {
                    let made = made_between(&agent.outbox()?, down_at, now);
                    ensure!(
                        made >= 3,
                        "robot {}: {made} reports made since PostgreSQL went down at {down_at}",
                        agent.robot_id()
                    );
                }
                Ok(())
            }
        })
        .await;
    assert!(
        controller.is_running(),
        "the controller survives the outage"
    );

    let mut during = Vec::new();
    for &id in &ids {
        let seqs = check_reports_exactly_once(&api, id, down_at, up_at).await;
        during.push((id, seqs));
    }
    eprintln!("reports made during the outage {down_at}..{up_at} (Unix ms), by robot: {during:?}");
    // The outage lasted until each agent had made three reports: all of
    // them were stored after it.
    assert!(
        during.iter().all(|(_, seqs)| seqs.len() >= 3),
        "reports made during the outage {down_at}..{up_at} (Unix ms) and stored, by robot: \
         {during:?}; each agent had made at least 3"
    );
    assert!(controller.is_running(), "the controller was not restarted");
    drop(agents);
}
