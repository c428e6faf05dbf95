//! Liveness: a robot whose agent dies or hangs goes `offline` within the
//! liveness timeout (plus a margin for a busy machine), and comes back
//! `ready` under the same id when its agent returns.

use std::time::{Duration, Instant};

use anyhow::ensure;
use kiwi_tests::{
    Agent, Controller, ControllerOptions, Event, State, secs, test_serial, wait_for_state,
    wait_ready_and_connected, wait_until,
};
use uuid::Uuid;

/// The liveness timeout the controller is given.
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(1);
/// What a loaded 2-core machine may add to it.
const MARGIN: Duration = Duration::from_secs(3);

async fn controller() -> Controller {
    ControllerOptions::new()
        .heartbeat_interval("200ms")
        .liveness_timeout("1s")
        .start()
        .await
}

/// The robot's transitions, oldest first.
async fn transitions(controller: &Controller, id: Uuid) -> Vec<(String, State, State)> {
    controller
        .api()
        .events(id)
        .await
        .expect("events")
        .iter()
        .filter_map(|e: &Event| e.transition().map(|(f, t)| (e.kind.clone(), f, t)))
        .collect()
}

/// The robot list holds each of `ids` exactly once and nothing else.
async fn assert_listed_once(controller: &Controller, ids: &[Uuid]) {
    let robots = controller.api().robots().await.expect("list robots");
    let mut listed: Vec<Uuid> = robots.iter().map(|r| r.robot_id).collect();
    listed.sort();
    let mut expected = ids.to_vec();
    expected.sort();
    assert_eq!(listed, expected, "each robot is listed exactly once");
}

/// The last two transitions are ready → offline (`robot_offline`) and
/// offline → ready.
fn assert_offline_then_ready(t: &[(String, State, State)]) {
    let tail: Vec<(State, State)> = t[t.len().saturating_sub(2)..]
        .iter()
        .map(|(_, from, to)| (*from, *to))
        .collect();
    assert_eq!(
        tail,
        vec![
            (State::Ready, State::Offline),
            (State::Offline, State::Ready)
        ],
        "transitions: {t:?}"
    );
    assert_eq!(t[t.len() - 2].0, "robot_offline", "transitions: {t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_goes_offline_and_comes_back_under_the_same_id() {
    let controller = controller().await;
    let api = controller.api();
    let mut victim = Agent::start(&controller, &test_serial(1));
    let bystander = Agent::start(&controller, &test_serial(2));
    let id = victim.robot_id();
    wait_ready_and_connected(api, id, secs(30)).await;
    wait_ready_and_connected(api, bystander.robot_id(), secs(30)).await;

    let killed_at = Instant::now();
    victim.kill();
    let offline = wait_for_state(api, id, State::Offline, LIVENESS_TIMEOUT + MARGIN).await;
    let took = killed_at.elapsed();
    assert!(!offline.connected, "an offline robot is not connected");
    eprintln!("offline {took:?} after SIGKILL");

    let neighbour = api
        .robot_required(bystander.robot_id())
        .await
        .expect("the bystander");
    assert_eq!(neighbour.state, State::Ready, "the bystander is untouched");
    assert!(neighbour.connected);

    // Same sys-root, same state dir: the same robot, not a second one.
    victim.start_again();
    let back = wait_ready_and_connected(api, id, secs(30)).await;
    assert_eq!(back.robot_id, id);
    assert_listed_once(&controller, &[id, bystander.robot_id()]).await;

    assert_offline_then_ready(&transitions(&controller, id).await);
    assert!(
        !transitions(&controller, bystander.robot_id())
            .await
            .iter()
            .any(|(_, _, to)| *to == State::Offline),
        "the bystander never went offline"
    );
}

/// Starts agent `serial`, waits until it is ready, stops it with SIGSTOP
/// (its TCP connection stays open: only its silence can tell) and waits
/// until its robot is offline, at most `within`.
async fn hang_until_offline(
    controller: &Controller,
    serial: u32,
    within: Duration,
) -> (Agent, Uuid) {
    let api = controller.api();
    let mut agent = Agent::start(controller, &test_serial(serial));
    let id = agent.robot_id();
    wait_ready_and_connected(api, id, secs(30)).await;
    let paused_at = Instant::now();
    agent.pause();
    wait_for_state(api, id, State::Offline, within).await;
    eprintln!("offline {:?} after SIGSTOP", paused_at.elapsed());
    (agent, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_agent_with_an_open_connection_goes_offline() {
    let controller = controller().await;
    let (mut agent, id) = hang_until_offline(&controller, 3, LIVENESS_TIMEOUT + MARGIN).await;
    let api = controller.api();
    agent.resume();
    wait_ready_and_connected(api, id, secs(30)).await;
    assert_listed_once(&controller, &[id]).await;
    assert_offline_then_ready(&transitions(&controller, id).await);
}

/// The failure detector's path, with the fixed ceiling far away: a hung
/// agent at 250 ms heartbeats is recorded suspect, probed over its link,
/// and offline once the probe goes unanswered, within two seconds of going
/// silent (plus the margin); its events tell that story in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_agent_is_suspected_probed_then_offline() {
    let controller = ControllerOptions::new()
        .heartbeat_interval("250ms")
        .liveness_timeout("60s")
        .start()
        .await;
    let (mut agent, id) = hang_until_offline(&controller, 4, Duration::from_secs(2) + MARGIN).await;
    let api = controller.api();

    let events = api.events(id).await.expect("events");
    let suspect = events
        .iter()
        .position(|e| {
            e.kind == "robot_health_changed"
                && e.data.pointer("/health/status").and_then(|s| s.as_str()) == Some("suspect")
        })
        .unwrap_or_else(|| panic!("no suspect health recorded: {events:#?}"));
    let offline = events
        .iter()
        .position(|e| e.kind == "robot_offline")
        .expect("robot_offline recorded");
    assert!(suspect < offline, "suspect before offline: {events:#?}");
    let reason = events[offline].data.to_string();
    assert!(
        reason.contains("probe went unanswered"),
        "offline because the probe went unanswered: {reason}"
    );
    // The machine is up (its address refuses or accepts connections): the
    // reason says it is the agent that stopped answering.
    assert!(
        reason.contains("answers (the agent does not)"),
        "the host was checked: {reason}"
    );
    let metrics = api.metrics_text().await.expect("metrics");
    for name in [
        "liveness_suspected_total",
        "liveness_probes_total",
        "liveness_confirmed_total",
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(name) && !l.ends_with(" 0")),
            "{name} counted: {metrics}"
        );
    }

    agent.resume();
    wait_ready_and_connected(api, id, secs(30)).await;
    assert_offline_then_ready(&transitions(&controller, id).await);
}

/// A controller that fails robots offline for more than a second, with
/// heartbeats every 250 ms; it logs (debug) when it holds such robots
/// because the network is degraded.
async fn failing_controller() -> Controller {
    ControllerOptions::new()
        .heartbeat_interval("250ms")
        .liveness_timeout("60s")
        .setting("offline_fail_after", "1s")
        .raw_env("KIWI_LOG", "info,kiwi_controller::liveness=debug")
        .start()
        .await
}

/// The most robots `controller` has said (in its log) it held offline past
/// `offline_fail_after` in one check, because the network was degraded.
fn most_held(controller: &Controller) -> u64 {
    std::fs::read_to_string(controller.log_path())
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| {
            v["message"].as_str().is_some_and(|m| {
                m.contains("offline longer than offline_fail_after are not failed")
            })
        })
        .filter_map(|v| v["held"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Starts `n` agents (serials from `first`) and waits until each is ready.
async fn ready_agents(controller: &Controller, first: u32, n: u32) -> Vec<Agent> {
    let mut agents = Vec::new();
    for serial in first..first + n {
        agents.push(Agent::start(controller, &test_serial(serial)));
    }
    for a in &agents {
        wait_ready_and_connected(controller.api(), a.robot_id(), secs(30)).await;
    }
    agents
}

/// The network as `GET /api/v2/network` reports it.
async fn network_state(controller: &Controller) -> String {
    let v: serde_json::Value = controller
        .api()
        .get_json("/api/v2/network")
        .await
        .expect("network");
    v["state"].as_str().unwrap_or_default().to_string()
}

/// Waits (bounded) until the network is in `state`.
async fn wait_network(controller: &Controller, state: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = network_state(controller).await;
        if now == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "network still {now}, not {state}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_robot_offline_longer_than_offline_fail_after_is_failed() {
    let controller = failing_controller().await;
    let api = controller.api();
    let mut agents = ready_agents(&controller, 10, 4).await;
    let victim = agents[0].robot_id();
    agents[0].kill();
    wait_for_state(api, victim, State::Offline, MARGIN).await;
    wait_for_state(api, victim, State::Failed, Duration::from_secs(2) + MARGIN).await;
    let events = api.events(victim).await.expect("events");
    let failed = events
        .iter()
        .find(|e| e.kind == "robot_failed")
        .expect("robot_failed recorded");
    assert!(
        failed.data.to_string().contains("offline for"),
        "failed for being offline: {}",
        failed.data
    );
    for a in &agents[1..] {
        let r = api.robot_required(a.robot_id()).await.expect("robot");
        assert_eq!(r.state, State::Ready, "the others are untouched");
    }
    assert_eq!(network_state(&controller).await, "normal");
}

/// Four robots of six going silent at once look like the network, not the
/// robots: the network is declared degraded, the silent robots go offline
/// but none is failed while it lasts, and when they come back every robot
/// is ready again and the network normal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn most_robots_silent_at_once_degrade_the_network_and_none_is_failed() {
    let controller = failing_controller().await;
    let api = controller.api();
    let mut agents = ready_agents(&controller, 20, 6).await;
    for a in &mut agents[..4] {
        a.pause();
    }
    for a in &agents[..4] {
        wait_for_state(
            api,
            a.robot_id(),
            State::Offline,
            Duration::from_secs(2) + MARGIN,
        )
        .await;
    }
    wait_network(&controller, "degraded", MARGIN).await;
    assert_eq!(
        api.metric("network_degraded", &[]).await.expect("metric"),
        1.0
    );
    // The controller has checked the four silent robots once they were all
    // offline longer than offline_fail_after, and held them: nobody is
    // failed while degraded.
    wait_until(secs(20), || async {
        let held = most_held(&controller);
        ensure!(
            held >= 4,
            "at most {held} robots held offline past offline_fail_after so far"
        );
        Ok(())
    })
    .await;
    for a in &agents {
        let r = api.robot_required(a.robot_id()).await.expect("robot");
        assert_ne!(
            r.state,
            State::Failed,
            "{} failed during the outage",
            r.robot_id
        );
    }
    for a in &mut agents[..4] {
        a.resume();
    }
    for a in &agents {
        wait_ready_and_connected(api, a.robot_id(), secs(30)).await;
    }
    wait_network(&controller, "normal", MARGIN).await;
    for a in &agents[..4] {
        assert_offline_then_ready(&transitions(&controller, a.robot_id()).await);
    }
}
