//! The secure transports on the simulated LAN (network namespaces; needs
//! root, `KIWI_LAN_TESTS=skip` skips them): a robot whose address changes
//! mid-session keeps its QUIC session (connection migration), and an
//! `auto` agent whose UDP is blocked connects over WebSocket instead.
//!
//! Build the binaries first: `cargo build -p kiwi-agent -p kiwi-controller --bins`.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use kiwi_tests::lan::{Lan, lan_tests_enabled};
use kiwi_tests::lan_fleet::{AGENT_URL, LanAgent, LanController};
use kiwi_tests::{Robot, wait_ready_and_connected, wait_until};

/// How long anything in these tests may take (a debug build on a busy
/// 2-core machine); never a measurement.
const DEADLINE: Duration = Duration::from_secs(60);

/// Fast liveness, so that a connection that did not survive shows quickly.
const CONTROLLER: [(&str, &str); 2] = [("HEARTBEAT_INTERVAL", "200ms"), ("LIVENESS_TIMEOUT", "2s")];

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_robot_whose_address_changes_keeps_its_quic_session() {
    if !lan_tests_enabled() {
        return;
    }
    let lan = Lan::build(1).expect("build the LAN");
    let controller = LanController::start(&lan, &CONTROLLER, DEADLINE);
    let mut robot = LanAgent::new(1);
    robot.start(
        &lan,
        AGENT_URL,
        Some(controller.enroll_token()),
        &[("KIWI_AGENT_TRANSPORT", "quic")],
    );
    let id = robot.robot_id;
    let before: Robot = controller.with_api(&lan, move |api| async move {
        wait_ready_and_connected(&api, id, DEADLINE).await
    });

    let moved_to = Ipv4Addr::new(10, 88, 0, 200);
    lan.change_address(&lan.robot(1), Lan::robot_ip(1), moved_to)
        .expect("move the robot");
    let moved_at = chrono::Utc::now();

    // Heartbeats keep arriving from the new address for several liveness
    // timeouts: the old path is gone, so only a migrated connection can
    // carry them.
    let after = controller.with_api(&lan, move |api| async move {
        wait_until(DEADLINE, || async {
            let robot = api.robot_required(id).await?;
            let seen: chrono::DateTime<chrono::Utc> =
                serde_json::from_value(robot.field("last_seen").clone())?;
            anyhow::ensure!(robot.connected, "not connected");
            anyhow::ensure!(
                seen > moved_at + chrono::Duration::seconds(5),
                "last seen {seen}, moved at {moved_at}"
            );
            Ok(robot)
        })
        .await
    });
    assert_eq!(
        after.version, before.version,
        "nothing was recorded: {after:?}"
    );
    let events = controller.with_api(&lan, move |api| async move { api.events(id).await });
    let events = events.expect("events");
    assert!(
        !events.iter().any(|e| e.kind == "robot_offline"),
        "the robot went offline: {events:#?}"
    );
    let agent_log = robot.log_text();
    assert_eq!(
        count(&agent_log, "connected to the controller"),
        1,
        "the agent reconnected:\n{agent_log}"
    );
    assert_eq!(count(&agent_log, "controller link down"), 0, "{agent_log}");
    let ctl_log = controller.log_text();
    assert_eq!(
        count(&ctl_log, "\"message\":\"agent connected\""),
        1,
        "{ctl_log}"
    );
    assert_eq!(count(&ctl_log, "agent connection ended"), 0, "{ctl_log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_udp_blocked_an_auto_agent_connects_over_websocket() {
    if !lan_tests_enabled() {
        return;
    }
    let lan = Lan::build(1).expect("build the LAN");
    let controller = LanController::start(&lan, &CONTROLLER, DEADLINE);
    // A firewall on the robot drops its UDP to the agent port.
    let mut nft = lan.command(&lan.robot(1), "nft");
    nft.args(["-f", "-"]);
    kiwi_tests::lan::run_with_stdin(
        nft,
        "table inet kiwi_block {\n  chain out {\n    type filter hook output priority 0; policy accept;\n    \
         udp dport 8765 counter drop\n  }\n}\n",
    )
    .expect("block UDP");

    let mut robot = LanAgent::new(1);
    let started = Instant::now();
    robot.start(
        &lan,
        AGENT_URL,
        Some(controller.enroll_token()),
        &[("KIWI_AGENT_TRANSPORT", "auto")],
    );
    let id = robot.robot_id;
    let (websocket, quic) = controller.with_api(&lan, move |api| async move {
        wait_ready_and_connected(&api, id, DEADLINE).await;
        let count = async |transport| {
            api.metric("agent_handshakes_total", &[("transport", transport)])
                .await
                .expect("metrics")
        };
        (count("websocket").await, count("quic").await)
    });
    println!(
        "auto agent with UDP blocked: start -> connected {:?}",
        started.elapsed()
    );
    assert_eq!(
        (websocket, quic),
        (1.0, 0.0),
        "connected once, over WebSocket"
    );
    let log = robot.log_text();
    assert!(log.contains("QUIC does not answer"), "{log}");
    assert_eq!(count(&log, "connected to the controller"), 1, "{log}");
}
