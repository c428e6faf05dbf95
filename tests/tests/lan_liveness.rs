//! Liveness on the simulated LAN (network namespaces; needs root,
//! `KIWI_LAN_TESTS=skip` skips them), under Wi-Fi-like conditions: 1 %
//! loss on every robot's link and 2 ms ± 1 ms of delay each way.
//!
//! Build the binaries first: `cargo build -p kiwi-agent -p kiwi-controller --bins`.

use std::time::{Duration, Instant};

use kiwi_tests::lan::{Lan, lan_tests_enabled};
use kiwi_tests::lan_fleet::{AGENT_URL, LanAgent, LanController};
use kiwi_tests::{State, wait_for_state, wait_ready_and_connected};
use uuid::Uuid;

/// How long anything in these tests may take (a debug build on a busy
/// 2-core machine); never a measurement.
const DEADLINE: Duration = Duration::from_secs(60);
/// What a loaded 2-core machine may add to a bound the design promises.
const MARGIN: Duration = Duration::from_secs(2);
const ROBOTS: usize = 4;
/// The sustained run under loss, in which no robot may go offline.
const SUSTAINED: Duration = Duration::from_secs(20);

/// 250 ms heartbeats; the fixed ceiling far away, so that only the failure
/// detector decides.
const CONTROLLER: [(&str, &str); 2] =
    [("HEARTBEAT_INTERVAL", "250ms"), ("LIVENESS_TIMEOUT", "60s")];

/// `robot_offline` events of `ids`.
fn offline_events(lan: &Lan, controller: &LanController, ids: &[Uuid]) -> Vec<String> {
    let ids = ids.to_vec();
    controller.with_api(lan, move |api| async move {
        let mut out = Vec::new();
        for id in ids {
            for e in api.events(id).await.expect("events") {
                if e.kind == "robot_offline" {
                    out.push(format!("{id}: {}", e.data));
                }
            }
        }
        out
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wifi_loss_makes_no_robot_offline_and_an_unplugged_one_is_offline_within_two_seconds() {
    if !lan_tests_enabled() {
        return;
    }
    let lan = Lan::build(ROBOTS).expect("build the LAN");
    let controller = LanController::start(&lan, &CONTROLLER, DEADLINE);
    let mut robots: Vec<LanAgent> = (1..=ROBOTS).map(LanAgent::new).collect();
    for r in &mut robots {
        r.start(&lan, AGENT_URL, Some(controller.enroll_token()), &[]);
    }
    let ids: Vec<Uuid> = robots.iter().map(|r| r.robot_id).collect();
    let wait_ids = ids.clone();
    controller.with_api(&lan, move |api| async move {
        for id in wait_ids {
            wait_ready_and_connected(&api, id, DEADLINE).await;
        }
    });

    lan.set_loss(1.0).expect("1 % loss");
    let _delays: Vec<_> = (1..=ROBOTS)
        .map(|i| {
            lan.set_delay(i, Duration::from_millis(2), Duration::from_millis(1))
                .expect("2 ms ± 1 ms delay")
        })
        .collect();
    tokio::time::sleep(SUSTAINED).await;
    let offline = offline_events(&lan, &controller, &ids);
    assert!(
        offline.is_empty(),
        "no robot may go offline on a lossy but working link: {offline:#?}"
    );

    // Unplug robot 1: its link goes down, nothing more arrives from it.
    let unplugged = Instant::now();
    let status = lan
        .command(&lan.robot(1), "ip")
        .args(["link", "set", "eth0", "down"])
        .status()
        .expect("run ip");
    assert!(status.success(), "ip link set eth0 down: {status}");
    let gone = ids[0];
    controller.with_api(&lan, move |api| async move {
        wait_for_state(&api, gone, State::Offline, Duration::from_secs(2) + MARGIN).await;
    });
    let took = unplugged.elapsed();
    eprintln!("unplugged robot offline after {took:?}");

    let others = ids[1..].to_vec();
    let states = controller.with_api(&lan, move |api| async move {
        let mut states = Vec::new();
        for id in others {
            states.push(api.robot_required(id).await.expect("robot").state);
        }
        states
    });
    assert!(
        states.iter().all(|s| *s == State::Ready),
        "the others stay ready: {states:?}"
    );
}
