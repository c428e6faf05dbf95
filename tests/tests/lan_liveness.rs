//! Liveness on the simulated LAN (network namespaces; needs root,
//! `KIWI_LAN_TESTS=skip` skips them), under Wi-Fi-like conditions: 1 %
//! loss on every robot's link and 2 ms ± 1 ms of delay each way.
//!
//! Build the binaries first: `cargo build -p kiwi-agent -p kiwi-controller --bins`.

use std::time::{Duration, Instant};

use kiwi_tests::lan::{Lan, lan_tests_enabled};
use kiwi_tests::lan_fleet::{AGENT_URL, LanAgent, LanController};
use kiwi_tests::{State, wait_for_robot, wait_for_state, wait_ready_and_connected, wait_until};
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

/// Plugs robot `i`'s link in or out.
fn set_link(lan: &Lan, i: usize, up: bool) {
    lan.set_link(i, up)
        .expect("plug the robot's link in or out");
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
    set_link(&lan, 1, false);
    let gone = ids[0];
    controller.with_api(&lan, move |api| async move {
        wait_for_state(&api, gone, State::Offline, Duration::from_secs(2) + MARGIN).await;
    });
    let took = unplugged.elapsed();
    eprintln!("unplugged robot offline after {took:?}");
    let reason = offline_events(&lan, &controller, &[gone]).join("\n");
    assert!(
        reason.contains("does not answer either"),
        "the robot's host was checked too: {reason}"
    );

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

/// The lifecycle transitions of `id`, oldest first, as `from->to`.
async fn transitions(api: &kiwi_tests::Api, id: Uuid) -> Vec<String> {
    api.events(id)
        .await
        .expect("events")
        .iter()
        .filter_map(|e| e.transition())
        .map(|(from, to)| format!("{}->{}", from.as_str(), to.as_str()))
        .collect()
}

/// The most failed recovery probes in a row after which `controller` said
/// (in its debug log) that it held robot `id` rather than failing it,
/// because the network was degraded.
fn held_after_failures(controller: &LanController, id: Uuid) -> Option<u64> {
    let id = id.to_string();
    controller
        .log_text()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| {
            v["robot_id"] == id.as_str()
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("recovery probes keep failing is not failed"))
        })
        .filter_map(|v| v["failures"].as_u64())
        .max()
}

/// `GET /api/v2/network`'s `state`.
async fn network_state(api: &kiwi_tests::Api) -> anyhow::Result<String> {
    let network: serde_json::Value = api.get_json("/api/v2/network").await?;
    Ok(network["state"].as_str().unwrap_or_default().to_string())
}

const PARTITION_ROBOTS: usize = 6;

/// A partition of half the robots (their links down for several seconds)
/// degrades the network: the recovery probes keep failing but no robot is
/// failed; after healing every robot is back in the state it left (`ready`,
/// or `active` with its deployment) and its log tells the whole story. Then
/// one robot unplugged alone (the network is fine) fails its recovery probes
/// and is recorded `failed`, its circuit breaker counting the failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_of_half_the_robots_fails_none_and_all_return_but_a_robot_unplugged_alone_fails_its_probes()
 {
    if !lan_tests_enabled() {
        return;
    }
    let lan = Lan::build(PARTITION_ROBOTS).expect("build the LAN");
    let controller = LanController::start(
        &lan,
        &[
            ("HEARTBEAT_INTERVAL", "250ms"),
            ("LIVENESS_TIMEOUT", "60s"),
            // Half the robots is the partition; the default share (more
            // than 50 %) would need one more.
            ("OUTAGE_SHARE", "0.4"),
            // Only the probes may fail a robot here.
            ("OFFLINE_FAIL_AFTER", "0s"),
            ("RECOVERY_PROBE_INTERVAL", "500ms"),
            ("OFFLINE_FAIL_PROBES", "4"),
        ],
        DEADLINE,
    );
    let mut robots: Vec<LanAgent> = (1..=PARTITION_ROBOTS).map(LanAgent::new).collect();
    for r in &mut robots {
        r.start(&lan, AGENT_URL, Some(controller.enroll_token()), &[]);
    }
    let ids: Vec<Uuid> = robots.iter().map(|r| r.robot_id).collect();
    let all = ids.clone();
    controller.with_api(&lan, move |api| async move {
        for id in all {
            wait_ready_and_connected(&api, id, DEADLINE).await;
        }
    });

    // Robot 1 runs a deployment: it must come back to it.
    let deployed = ids[0];
    controller.with_api(&lan, move |api| async move {
        let body = serde_json::json!({ "deployment_version": "v7" });
        let robot = api
            .act(deployed, "activate", Some(body))
            .await
            .expect("activate");
        assert_eq!(robot.state, State::Active);
    });

    // Partition robots 1..=3.
    let half = PARTITION_ROBOTS / 2;
    for i in 1..=half {
        set_link(&lan, i, false);
    }
    let cut = ids[..half].to_vec();
    let waiting = cut.clone();
    controller.with_api(&lan, move |api| async move {
        for &id in &waiting {
            wait_for_state(&api, id, State::Offline, DEADLINE).await;
        }
        wait_until(DEADLINE, || async {
            let state = network_state(&api).await?;
            anyhow::ensure!(state == "degraded", "network {state}");
            Ok(())
        })
        .await;
    });
    // The recovery probes of every cut robot failed past the threshold and
    // the controller held it: not failed.
    for &id in &cut {
        wait_until(DEADLINE, || async {
            let failures = held_after_failures(&controller, id);
            anyhow::ensure!(
                failures.is_some(),
                "robot {id}: not yet held after its recovery probes failed"
            );
            Ok(())
        })
        .await;
    }
    controller.with_api(&lan, move |api| async move {
        let unreachable = api
            .metric("recovery_probes_total", &[("result", "unreachable")])
            .await
            .expect("metrics");
        assert!(unreachable >= 4.0, "the probes went on: {unreachable}");
        for &id in &cut {
            let robot = api.robot_required(id).await.expect("robot");
            assert_eq!(robot.state, State::Offline, "held while degraded");
        }
    });

    // Heal: every robot back, as it was, and the network normal again.
    for i in 1..=half {
        set_link(&lan, i, true);
    }
    let all = ids.clone();
    let cut = ids[..half].to_vec();
    controller.with_api(&lan, move |api| async move {
        for &id in &all {
            wait_for_robot(&api, id, DEADLINE, "back and connected", |r| {
                r.connected
                    && r.state
                        == if id == deployed {
                            State::Active
                        } else {
                            State::Ready
                        }
            })
            .await;
        }
        let robot = api.robot_required(deployed).await.expect("robot");
        assert_eq!(
            robot.field("deployment_version"),
            "v7",
            "the same deployment"
        );
        wait_until(DEADLINE, || async {
            let state = network_state(&api).await?;
            anyhow::ensure!(state == "normal", "network {state}");
            Ok(())
        })
        .await;
        for &id in &all {
            let t = transitions(&api, id).await;
            let expected: &[&str] = if id == deployed {
                &[
                    "discovered->provisioning",
                    "provisioning->ready",
                    "ready->active",
                    "active->offline",
                    "offline->ready",
                    "ready->active",
                ]
            } else if cut.contains(&id) {
                &[
                    "discovered->provisioning",
                    "provisioning->ready",
                    "ready->offline",
                    "offline->ready",
                ]
            } else {
                &["discovered->provisioning", "provisioning->ready"]
            };
            assert_eq!(t, expected, "the log of {id}");
        }
    });

    // One robot alone unplugged: the network stays normal, its probes fail
    // and it is recorded failed, its circuit counting the failures.
    let alone = ids[PARTITION_ROBOTS - 1];
    set_link(&lan, PARTITION_ROBOTS, false);
    controller.with_api(&lan, move |api| async move {
        let failed = wait_for_state(&api, alone, State::Failed, DEADLINE).await;
        assert_eq!(failed.state, State::Failed);
        let events = api.events(alone).await.expect("events");
        let last = events.last().expect("events");
        assert_eq!(last.kind, "robot_failed", "{events:#?}");
        assert!(
            last.data
                .to_string()
                .contains("recovery probes in a row found no host"),
            "{}",
            last.data
        );
        assert_eq!(network_state(&api).await.expect("network"), "normal");
        let robot: serde_json::Value = api
            .get_json(&format!("/api/v2/robots/{alone}"))
            .await
            .expect("robot");
        let circuit = &robot["circuit"];
        assert!(
            circuit["state"] == "open" || circuit["failures"].as_u64() >= Some(4),
            "the circuit counted the failed probes: {circuit}"
        );
    });
}
