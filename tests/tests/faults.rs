//! Faults under load: 1,000 simulated agents (one `kiwi-agent simulate`)
//! reporting every [`REPORT_INTERVAL`] while
//!
//! - the controller is killed with SIGKILL and started again: every report
//!   it had acknowledged is stored exactly once, every agent is back within
//!   [`BACK_WITHIN`] of the controller being ready, and their reconnects are
//!   spread out (no 100 ms window holds more than a fifth of them);
//! - PostgreSQL is stopped and started again: no acknowledged report is
//!   lost, and the API answers again without a controller restart;
//! - Redis is killed: not one API request fails (and once it is back, the
//!   cache is refilled and `/readyz` says ready again).
//!
//! What was acknowledged comes from the simulator's summary (written when
//! it stops), what was stored from one SQL query against the controller's
//! store, cross-checked for a few robots through the API. The store is
//! PostgreSQL throughout: the embedded SQLite store of a debug build does
//! not keep up with this load (a thousand reports a second) on two cores.
//!
//! Each test drives a thousand agents on a small machine: the tests of this
//! file take turns ([`HEAVY`]), and nextest runs them alone
//! (`.config/nextest.toml`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::ensure;
use kiwi_tests::poller::{Polled, Poller};
use kiwi_tests::{
    Api, Controller, ControllerOptions, PgCluster, RedisKeys, RedisServer, SimulationSummary,
    Simulator, SimulatorOptions, TestDatabase, made_between, now_ms, secs, wait_readyz_status,
    wait_until, wait_until_every,
};
use reqwest::StatusCode;
use sqlx::Connection;
use tokio::sync::Mutex;
use uuid::Uuid;

/// Simulated agents in every test.
const AGENTS: usize = 1_000;

/// How often every agent reports (the controller's `report_interval`,
/// which provisioned robots follow).
const REPORT_INTERVAL: &str = "1s";

/// Every agent must be welcomed again this soon after the restarted
/// controller is ready.
const BACK_WITHIN: Duration = Duration::from_secs(10);

/// The reconnect spread: no window this wide may hold more than
/// [`AGENTS`] / [`MAX_SHARE_PER_WINDOW`] of the reconnects.
const SPREAD_WINDOW_MS: i64 = 100;
const MAX_SHARE_PER_WINDOW: usize = 5;

/// The simulated agents start spread over this window.
const START_SPREAD: &str = "5s";

/// How long the load runs before a fault, and after it before the agents
/// are stopped (not assertions: time for reports to flow).
const LOAD_BEFORE: Duration = Duration::from_secs(2);
const LOAD_AFTER: Duration = Duration::from_secs(2);

/// Robots whose stored reports are also read through the API.
const CROSS_CHECKED: usize = 3;

/// One test of this file at a time: each runs a thousand agents.
static HEAVY: Mutex<()> = Mutex::const_new(());

/// A controller's settings for the load: fast reports.
fn load_options() -> ControllerOptions {
    ControllerOptions::new().report_interval(REPORT_INTERVAL)
}

/// Starts [`AGENTS`] simulated agents against `controller`, enrolled
/// beforehand and keeping their state on a tmpfs (see
/// [`SimulatorOptions::enrolled`] and
/// [`SimulatorOptions::state_in_memory`]), and waits until the controller
/// lists every one connected and reporting.
async fn start_load(controller: &Controller) -> Simulator {
    let simulator = SimulatorOptions::new(AGENTS)
        .report_interval(REPORT_INTERVAL)
        .start_spread(START_SPREAD)
        .enrolled()
        .state_in_memory()
        .start(controller);
    let started = Instant::now();
    wait_fleet_connected(controller.api(), secs(60)).await;
    eprintln!(
        "{AGENTS} simulated agents connected and reporting {:?} after the simulator started",
        started.elapsed()
    );
    simulator
}

/// Waits until the controller holds [`AGENTS`] agent connections and lists
/// [`AGENTS`] robots, every one connected with a report stored.
async fn wait_fleet_connected(api: &Api, timeout: Duration) {
    // The gauge is cheap; listing a thousand robots is not, on a busy
    // debug build: list only once the gauge says all are there.
    wait_until_every(timeout, Duration::from_millis(250), || async move {
        let connections = api.metric("agent_connections", &[]).await?;
        ensure!(
            connections >= AGENTS as f64,
            "{connections} agent connections"
        );
        let page = api.robots_page("limit=1000").await?;
        let connected = page.robots.iter().filter(|r| r.connected).count();
        let reporting = page
            .robots
            .iter()
            .filter(|r| r.connected && r.last_report_seq > 0)
            .count();
        ensure!(
            page.robots.len() == AGENTS && reporting == AGENTS,
            "{} robots listed, {connected} connected, {reporting} connected and reporting",
            page.robots.len()
        );
        Ok(())
    })
    .await;
}

/// `GET /api/v2/robots?limit=1000` answers with all [`AGENTS`] robots.
async fn list_fleet(api: &Api) -> anyhow::Result<()> {
    let page = api.robots_page("limit=1000").await?;
    ensure!(
        page.robots.len() == AGENTS,
        "{} robots listed",
        page.robots.len()
    );
    Ok(())
}

/// How one robot's reports are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stored {
    rows: i64,
    distinct_seqs: i64,
    min_seq: i64,
    max_seq: i64,
}

/// Per robot: its report rows, distinct seqs and seq range.
const STORED_REPORTS: &str = "SELECT robot_id, COUNT(*), COUNT(DISTINCT seq), MIN(seq), MAX(seq) \
     FROM robot_reports GROUP BY robot_id";

/// The stored reports in the PostgreSQL database `db`.
async fn stored_reports_postgres(db: &TestDatabase) -> BTreeMap<Uuid, Stored> {
    let mut conn = db.connect().await.expect("connect to the test database");
    let rows: Vec<(Uuid, i64, i64, i64, i64)> = sqlx::query_as(STORED_REPORTS)
        .fetch_all(&mut conn)
        .await
        .expect("count the stored reports");
    rows.into_iter()
        .map(|(id, rows, distinct_seqs, min_seq, max_seq)| {
            let stored = Stored {
                rows,
                distinct_seqs,
                min_seq,
                max_seq,
            };
            (id, stored)
        })
        .collect()
}

/// Every report the controller acknowledged to an agent is stored exactly
/// once: each robot's stored seqs are `1..=n` without a duplicate, with `n`
/// at least its acknowledged seq (acks are cumulative, and no agent dropped
/// a report unacknowledged). Returns the acknowledged reports in all.
fn check_acked_stored_once(summary: &SimulationSummary, stored: &BTreeMap<Uuid, Stored>) -> u64 {
    let mut wrong = Vec::new();
    let mut acked = 0;
    for agent in &summary.agents {
        acked += agent.acked_seq;
        if agent.dropped > 0 {
            wrong.push(format!(
                "agent {} dropped {} reports unacknowledged (outbox full)",
                agent.index, agent.dropped
            ));
        }
        let found = stored.get(&agent.robot_id).copied();
        let Some(s) = found else {
            if agent.acked_seq > 0 {
                wrong.push(format!(
                    "agent {} ({}): {} reports acknowledged, none stored",
                    agent.index, agent.robot_id, agent.acked_seq
                ));
            }
            continue;
        };
        let max_seq = u64::try_from(s.max_seq).unwrap_or(0);
        let exactly_1_to_n = s.rows == s.distinct_seqs && s.min_seq == 1 && s.max_seq == s.rows;
        if !exactly_1_to_n || max_seq < agent.acked_seq {
            wrong.push(format!(
                "agent {} ({}): acknowledged up to seq {}, stored {s:?}",
                agent.index, agent.robot_id, agent.acked_seq
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} agents' acknowledged reports are not stored exactly once; the first: {:#?}",
        wrong.len(),
        summary.agents.len(),
        &wrong[..wrong.len().min(20)]
    );
    acked
}

/// The API agrees with the SQL count for the first [`CROSS_CHECKED`]
/// robots: their reports are listed as seqs `1..=n`.
async fn cross_check_through_api(
    api: &Api,
    summary: &SimulationSummary,
    stored: &BTreeMap<Uuid, Stored>,
) {
    for agent in summary.agents.iter().take(CROSS_CHECKED) {
        let id = agent.robot_id;
        let seqs: Vec<i64> = api
            .reports(id)
            .await
            .expect("reports through the API")
            .iter()
            .map(|r| i64::try_from(r.seq).expect("a seq fits in i64"))
            .collect();
        let n = stored.get(&id).map_or(0, |s| s.rows);
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "robot {id}: the API lists the reports the store holds"
        );
    }
}

/// Stops the simulator, waits until the controller has ended every agent's
/// session (so every report it received is stored or refused: a session
/// handles its frames in order, the goodbye last), and returns the
/// simulator's summary, in which every agent was welcomed at least once.
async fn stop_load(simulator: &mut Simulator, api: &Api) -> SimulationSummary {
    simulator.stop(secs(30)).await;
    wait_until(secs(30), || async move {
        let connections = api.metric("agent_connections", &[]).await?;
        ensure!(connections == 0.0, "{connections} agent connections");
        Ok(())
    })
    .await;
    let summary = simulator.summary();
    let never = summary
        .agents
        .iter()
        .filter(|a| a.connected_at_ms.is_empty())
        .count();
    assert_eq!(never, 0, "every simulated agent was welcomed at least once");
    summary
}

/// The most of `times` (sorted) within any window of `width` ms, and where
/// that window starts.
fn busiest_window(times: &[i64], width: i64) -> (usize, i64) {
    let mut best = (0, times.first().copied().unwrap_or(0));
    let mut start = 0;
    for (end, &t) in times.iter().enumerate() {
        while t - times[start] >= width {
            start += 1;
        }
        if end + 1 - start > best.0 {
            best = (end + 1 - start, times[start]);
        }
    }
    best
}

/// How many of `times` fall into each `width` ms bucket from `from` on.
fn histogram(times: &[i64], from: i64, width: i64) -> Vec<usize> {
    let mut buckets = Vec::new();
    for &t in times {
        let i = usize::try_from((t - from).max(0) / width).expect("a bucket index fits");
        if buckets.len() <= i {
            buckets.resize(i + 1, 0);
        }
        buckets[i] += 1;
    }
    buckets
}

/// How long `/readyz` took to answer 200 with `"status": status`, or `None`
/// if it did not within `timeout`.
async fn readyz_within(api: &Api, status: &str, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    let ready = async {
        loop {
            if let Ok((StatusCode::OK, body)) = api.readyz().await
                && body["status"] == status
            {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(timeout, ready).await.ok()
}

/// SIGKILL the controller under load: acknowledged reports are stored
/// exactly once, every agent is back within 10 s of the controller being
/// ready, and the reconnects are spread out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_under_load_keeps_every_acknowledged_report() {
    let _heavy = HEAVY.lock().await;
    let db = TestDatabase::create().await;
    let mut controller = load_options().storage(&db, None).start().await;
    let mut simulator = start_load(&controller).await;
    tokio::time::sleep(LOAD_BEFORE).await;

    let killed_at = now_ms();
    controller.kill();
    // Not an assertion: the outage, while agents retry and keep reporting
    // into their outboxes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spawned_at = now_ms();
    controller.start_again().await;
    let ready_at = now_ms();
    eprintln!(
        "controller killed at {killed_at}, spawned again {} ms later, ready after {} ms more",
        spawned_at - killed_at,
        ready_at - spawned_at
    );
    let api = controller.api().clone();
    let waited = Instant::now();
    wait_fleet_connected(&api, secs(60)).await;
    eprintln!(
        "the API lists all {AGENTS} connected and reporting {:?} after the controller was ready",
        waited.elapsed()
    );
    tokio::time::sleep(LOAD_AFTER).await;
    assert!(controller.is_running(), "the controller still runs");

    let summary = stop_load(&mut simulator, &api).await;
    // Each agent's first welcome after the kill: its reconnect.
    let mut back: Vec<(i64, u32)> = summary
        .agents
        .iter()
        .map(|a| {
            let at = a
                .connected_at_ms
                .iter()
                .copied()
                .find(|&t| t > killed_at)
                .unwrap_or_else(|| {
                    panic!(
                        "agent {} was not welcomed again after the kill at {killed_at} \
                         (welcomed at {:?})",
                        a.index, a.connected_at_ms
                    )
                });
            (at, a.index)
        })
        .collect();
    back.sort_unstable();
    let times: Vec<i64> = back.iter().map(|&(t, _)| t).collect();
    let (last_at, last_index) = *back.last().expect("agents");
    let (busiest, busiest_from) = busiest_window(&times, SPREAD_WINDOW_MS);
    let buckets = histogram(&times, ready_at, SPREAD_WINDOW_MS);
    eprintln!(
        "reconnects: first {} ms, last {} ms after the controller was ready (agent {last_index}); \
         busiest {SPREAD_WINDOW_MS} ms window: {busiest} reconnects from {} ms; \
         per {SPREAD_WINDOW_MS} ms from ready: {buckets:?}",
        times[0] - ready_at,
        last_at - ready_at,
        busiest_from - ready_at,
    );
    let back_within = i64::try_from(BACK_WITHIN.as_millis()).expect("fits");
    assert!(
        last_at - ready_at <= back_within,
        "agent {last_index} was welcomed again {} ms after the controller was ready; all must be \
         back within {BACK_WITHIN:?}",
        last_at - ready_at
    );
    assert!(
        busiest <= AGENTS / MAX_SHARE_PER_WINDOW,
        "{busiest} of {AGENTS} reconnects fell into the {SPREAD_WINDOW_MS} ms from {busiest_from} \
         (Unix ms); at most a {MAX_SHARE_PER_WINDOW}th may; per {SPREAD_WINDOW_MS} ms from the \
         restart at {ready_at}: {buckets:?}"
    );

    let stored = stored_reports_postgres(&db).await;
    cross_check_through_api(&api, &summary, &stored).await;
    let acked = check_acked_stored_once(&summary, &stored);
    let rows: i64 = stored.values().map(|s| s.rows).sum();
    eprintln!("{acked} reports acknowledged, all stored exactly once ({rows} stored in all)");
    controller.stop().await;
}

/// PostgreSQL stopped under load until the agents have made a report each
/// on average, and started again: the controller answers again without a
/// restart and loses no acknowledged report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_loses_no_acknowledged_report() {
    let _heavy = HEAVY.lock().await;
    let mut pg = PgCluster::start().await;
    let db = TestDatabase::create_on(&pg.server_url()).await;
    let mut controller = load_options().storage(&db, None).start().await;
    let api = controller.api().clone();
    let mut simulator = start_load(&controller).await;
    tokio::time::sleep(LOAD_BEFORE).await;

    // Down until the agents have made a report each on average (kept in
    // their outboxes: the controller cannot store them). Reading a thousand
    // outboxes is not free: four times a second.
    let (down_at, up_at) = pg
        .outage_until(&api, Duration::from_millis(250), |down_at| {
            let simulator = &simulator;
            async move {
                let now = now_ms();
                let made: usize = simulator
                    .outboxes()?
                    .iter()
                    .map(|reports| made_between(reports, down_at, now))
                    .sum();
                ensure!(
                    made >= AGENTS,
                    "{made} reports made since PostgreSQL went down at {down_at}"
                );
                Ok(())
            }
        })
        .await;
    let recovered = Instant::now();
    wait_until(secs(30), || list_fleet(&api)).await;
    eprintln!(
        "PostgreSQL down {down_at}..{up_at} (Unix ms); /readyz answered 200 once it was started \
         again, and the robot list {:?} after that",
        recovered.elapsed()
    );
    wait_fleet_connected(&api, secs(60)).await;
    eprintln!(
        "all {AGENTS} connected and reporting {:?} after PostgreSQL was started again",
        recovered.elapsed()
    );
    tokio::time::sleep(LOAD_AFTER).await;
    assert!(
        controller.is_running(),
        "the controller was not restarted and still runs"
    );

    let summary = stop_load(&mut simulator, &api).await;
    let stored = stored_reports_postgres(&db).await;
    cross_check_through_api(&api, &summary, &stored).await;
    let acked = check_acked_stored_once(&summary, &stored);
    // Reports made while PostgreSQL was down reached the store after it
    // came back: it was down until they had made one per agent.
    let mut conn = db.connect().await.expect("connect to the test database");
    let during: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM robot_reports \
         WHERE time > to_timestamp($1 / 1000.0) AND time < to_timestamp($2 / 1000.0)",
    )
    .bind(down_at as f64)
    .bind(up_at as f64)
    .fetch_one(&mut conn)
    .await
    .expect("count the reports made during the outage");
    let _ = conn.close().await;
    eprintln!(
        "{acked} reports acknowledged, all stored exactly once; {during} of the stored were made \
         while PostgreSQL was down"
    );
    assert!(
        during >= i64::try_from(AGENTS).expect("fits"),
        "only {during} reports made during the outage were stored; the agents had made at \
         least one per agent"
    );
    controller.stop().await;
}

/// How long the cache may take to be refilled and `/readyz` to say ready
/// again once Redis is back.
const REDIS_RECOVERY: Duration = Duration::from_secs(30);

/// Redis killed under load: the robot list, polled throughout (Redis up,
/// down, back and refilling), never fails; `/readyz` says degraded while
/// it is down, and ready again once the cache is refilled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_costs_no_api_error() {
    let _heavy = HEAVY.lock().await;
    let db = TestDatabase::create().await;
    let mut redis = RedisServer::start().await;
    let keys = RedisKeys::create_on(&redis.url()).await;
    let mut controller = load_options().storage(&db, Some(&keys)).start().await;
    let api = controller.api().clone();
    let mut simulator = start_load(&controller).await;
    // Asserted at the end, after what the issue asks for.
    let ready_before = readyz_within(&api, "ready", secs(20)).await;

    // The list, polled every 50 ms by one client, keeping every failure.
    let poller = Poller::start(Duration::from_millis(50), {
        let api = api.clone();
        move || {
            let api = api.clone();
            async move { list_fleet(&api).await }
        }
    });
    poller.wait_for_more(5, secs(30)).await;

    let killed_at = now_ms();
    redis.kill();
    let degraded = wait_readyz_status(&api, "degraded", secs(15)).await;
    eprintln!("/readyz with Redis killed: {degraded}");
    // Some traffic with Redis gone.
    poller.wait_for_more(10, secs(30)).await;
    redis.start_again().await;
    let restarted_at = now_ms();
    // Asserted at the end: the API must not fail while the cache is
    // refilled either, which the poller checks meanwhile.
    let ready_after = readyz_within(&api, "ready", REDIS_RECOVERY).await;
    poller.wait_for_more(5, secs(30)).await;

    let Polled {
        total,
        failures,
        slowest,
    } = poller.stop().await;
    eprintln!(
        "{total} lists of {AGENTS} robots, {} failed, the slowest took {slowest:?} (Redis killed \
         at {killed_at}, back at {restarted_at}, Unix ms)",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {total} GET /api/v2/robots failed (Redis killed at {killed_at}, back at \
         {restarted_at}, Unix ms): {:#?}",
        failures.len(),
        &failures[..failures.len().min(20)]
    );
    assert!(controller.is_running(), "the controller still runs");

    let summary = stop_load(&mut simulator, &api).await;
    let stored = stored_reports_postgres(&db).await;
    let acked = check_acked_stored_once(&summary, &stored);
    eprintln!("{acked} reports acknowledged, all stored exactly once");
    eprintln!(
        "/readyz ready: before the kill after {ready_before:?}, after Redis came back after \
         {ready_after:?}"
    );
    let (code, body) = api.readyz().await.expect("GET /readyz");
    assert!(
        ready_before.is_some(),
        "/readyz did not say ready within 20 s under load, before Redis was killed (the cache \
         was not in use); now, with the agents stopped: {code} {body}"
    );
    assert!(
        ready_after.is_some(),
        "/readyz did not say ready within {REDIS_RECOVERY:?} of Redis coming back under load \
         (the cache was not refilled); now, with the agents stopped: {code} {body}"
    );
    controller.stop().await;
}

#[test]
fn busiest_window_slides() {
    assert_eq!(busiest_window(&[], 100), (0, 0));
    assert_eq!(busiest_window(&[5], 100), (1, 5));
    // [0, 100) holds three; [50, 150) holds four: 50, 60, 120, 149.
    assert_eq!(busiest_window(&[0, 50, 60, 120, 149, 400], 100), (4, 50));
    assert_eq!(busiest_window(&[0, 100, 200], 100), (1, 0));
    assert_eq!(
        histogram(&[100, 150, 250, 900], 100, 100),
        vec![2, 1, 0, 0, 0, 0, 0, 0, 1]
    );
}
