//! Liveness: a robot whose agent dies or hangs goes `offline` within the
//! liveness timeout (plus a margin for a busy machine), and comes back
//! `ready` under the same id when its agent returns.

use std::time::{Duration, Instant};

use kiwi_tests::{
    Agent, Controller, ControllerOptions, Event, State, secs, test_serial, wait_for_state,
    wait_ready_and_connected,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_agent_with_an_open_connection_goes_offline() {
    let controller = controller().await;
    let api = controller.api();
    let mut agent = Agent::start(&controller, &test_serial(3));
    let id = agent.robot_id();
    wait_ready_and_connected(api, id, secs(30)).await;

    // SIGSTOP keeps the TCP connection open: only the missing heartbeats
    // can tell the controller.
    let paused_at = Instant::now();
    agent.pause();
    wait_for_state(api, id, State::Offline, LIVENESS_TIMEOUT + MARGIN).await;
    eprintln!("offline {:?} after SIGSTOP", paused_at.elapsed());

    agent.resume();
    wait_ready_and_connected(api, id, secs(30)).await;
    assert_listed_once(&controller, &[id]).await;
    assert_offline_then_ready(&transitions(&controller, id).await);
}
