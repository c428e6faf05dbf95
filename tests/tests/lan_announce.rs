//! Agents announcing themselves on the simulated LAN, and agents with
//! `controller = "auto"` finding the controller: real `kiwi-agent run`
//! processes in robot namespaces, the controller's passive discovery
//! (mDNS browse and registration, beacon listener and answer) in the
//! controller namespace, and a real `kiwi-controller serve` there for the
//! agents to connect to. Nothing here asserts a duration: the times from
//! agent start to "seen" and "connected" are printed. These tests need root
//! (`KIWI_LAN_TESTS=skip` skips them).
//!
//! Build the binaries first: `cargo build -p kiwi-agent -p kiwi-controller --bins`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiwi_controller::discovery::announce::{
    self, AgentSighting, AnnounceSettings, Method, Sightings,
};
use kiwi_protocol::RobotId;
use kiwi_tests::lan::{Lan, lan_tests_enabled};
use kiwi_tests::lan_fleet::{AGENT_LISTEN, AGENT_URL, LanAgent, LanController};
use kiwi_tests::wait_ready_and_connected;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long anything in these tests may take (a debug build on a busy
/// 2-core machine); never a measurement.
const DEADLINE: Duration = Duration::from_secs(60);

/// The agent settings of every test: beacons each second, announce logs.
const AGENT_ENV: [(&str, &str); 2] = [
    ("KIWI_AGENT_BEACON_INTERVAL", "1s"),
    ("KIWI_LOG", "info,kiwi_agent::announce=debug"),
];

/// The controller's passive discovery, in-process in the controller
/// namespace, until the token is cancelled.
struct Passive {
    sightings: Sightings,
    shutdown: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Passive {
    fn start(lan: &Lan, mdns: bool, beacon: bool) -> Passive {
        let sightings = Sightings::new();
        let shutdown = CancellationToken::new();
        let mut settings =
            AnnounceSettings::new(AGENT_LISTEN.parse::<SocketAddr>().expect("an address"));
        settings.mdns = mdns;
        settings.beacon = beacon;
        let (s, token) = (sightings.clone(), shutdown.clone());
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = lan.spawn_in(lan.ctl(), move || async move {
            let announcer = announce::start(settings, s, token)
                .await
                .expect("start the controller's passive discovery");
            ready_tx.send(()).expect("tell the test");
            announcer.run().await;
        });
        ready
            .recv_timeout(DEADLINE)
            .expect("the passive discovery did not start");
        Passive {
            sightings,
            shutdown,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Passive {
    fn drop(&mut self) {
        self.end();
    }
}

/// Waits (in the controller namespace) until each robot is ready and
/// connected; the time each took from `since`.
fn wait_connected(
    lan: &Lan,
    controller: &LanController,
    ids: Vec<Uuid>,
    since: Instant,
) -> Vec<Duration> {
    controller.with_api(lan, move |api| async move {
        let mut took = Vec::new();
        for id in ids {
            wait_ready_and_connected(&api, id, DEADLINE).await;
            took.push(since.elapsed());
        }
        took
    })
}

/// Follows sightings (`events`, subscribed to `sightings`) until every
/// robot in `ids` was seen by `method`; when each was first seen.
async fn first_seen(
    sightings: &Sightings,
    mut events: tokio::sync::broadcast::Receiver<AgentSighting>,
    ids: &[RobotId],
    method: Method,
) -> HashMap<RobotId, Instant> {
    let mut seen: HashMap<RobotId, Instant> = HashMap::new();
    // Sightings recorded before subscribing (the time is then an upper
    // bound: the poll finds them at once).
    for id in ids {
        if sightings.get(*id, method).is_some() {
            seen.insert(*id, Instant::now());
        }
    }
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while ids.iter().any(|id| !seen.contains_key(id)) {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(s)) if s.method == method && ids.contains(&s.robot_id) => {
                seen.entry(s.robot_id).or_insert_with(Instant::now);
            }
            Ok(Ok(_)) => {}
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                for id in ids {
                    if sightings.get(*id, method).is_some() {
                        seen.entry(*id).or_insert_with(Instant::now);
                    }
                }
            }
            Ok(Err(e)) => panic!("sightings channel closed: {e}"),
            Err(_) => {
                let missing: Vec<_> = ids.iter().filter(|id| !seen.contains_key(id)).collect();
                panic!(
                    "not seen by {} within {DEADLINE:?}: {missing:?}",
                    method.as_str()
                );
            }
        }
    }
    seen
}

fn describe(label: &str, mut times: Vec<Duration>) {
    times.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{label}: n={} min={:.0}ms median={:.0}ms max={:.0}ms",
        times.len(),
        times.first().map_or(0.0, ms),
        times.get(times.len() / 2).map_or(0.0, ms),
        times.last().map_or(0.0, ms),
    );
}

/// Agents with `announce = true` are seen by the controller's beacon
/// listener and resolved by its mDNS browse, with their robot id, type and
/// address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_sees_announcing_agents_by_beacon_and_mdns() {
    if !lan_tests_enabled() {
        return;
    }
    const N: usize = 8;
    let lan = Lan::build(N).expect("build the LAN");
    let passive = Passive::start(&lan, true, true);
    let mut robots: Vec<LanAgent> = (1..=N).map(LanAgent::new).collect();
    let ids: Vec<RobotId> = robots.iter().map(|r| RobotId(r.robot_id)).collect();
    let sightings = passive.sightings.clone();
    // Both followers subscribe here, before the first agent starts.
    let beacons = {
        let (s, events, ids) = (sightings.clone(), sightings.subscribe(), ids.clone());
        tokio::spawn(async move { first_seen(&s, events, &ids, Method::Beacon).await })
    };
    let mdns = {
        let (s, events, ids) = (sightings.clone(), sightings.subscribe(), ids.clone());
        tokio::spawn(async move { first_seen(&s, events, &ids, Method::Mdns).await })
    };
    // A fixed controller that is not there: announcing does not depend on
    // being connected.
    let mut env = AGENT_ENV.to_vec();
    env.push(("KIWI_AGENT_ANNOUNCE", "true"));
    let started: Vec<Instant> = robots
        .iter_mut()
        .map(|r| {
            let at = Instant::now();
            r.start(&lan, "10.88.0.1:1", None, &env);
            at
        })
        .collect();
    let by_beacon = beacons.await.expect("beacon follower");
    let by_mdns = mdns.await.expect("mDNS follower");

    for robot in &robots {
        let id = RobotId(robot.robot_id);
        for method in [Method::Beacon, Method::Mdns] {
            let s = sightings
                .get(id, method)
                .unwrap_or_else(|| panic!("robot {} not seen by {}", robot.index, method.as_str()));
            assert_eq!(s.ip, std::net::IpAddr::V4(Lan::robot_ip(robot.index)));
            assert_eq!(s.robot_type, kiwi_protocol::RobotType::Lekiwi);
            assert_eq!(s.hostname, format!("lekiwi-{}", robot.index));
            // A fixed controller: the agent never asks for one.
            assert!(!s.seeking);
        }
    }
    let stats = sightings.stats();
    assert_eq!(stats.answers.get(), 0, "nobody asked for a controller");
    assert_eq!(stats.bad_datagrams.get(), 0);
    let since = |seen: &HashMap<RobotId, Instant>| {
        robots
            .iter()
            .zip(&started)
            .map(|(r, at)| seen[&RobotId(r.robot_id)].saturating_duration_since(*at))
            .collect::<Vec<_>>()
    };
    describe("agent start -> seen by beacon", since(&by_beacon));
    describe("agent start -> resolved by mDNS", since(&by_mdns));
    for robot in &mut robots {
        robot.stop();
    }
    passive.stop();
}

/// The acceptance test of `controller = "auto"`: with no address
/// configured, an agent finds the real controller (here by its answer to a
/// beacon, after the remembered address did not answer), enrolls,
/// connects, and remembers it; restarted against the controller after it
/// stopped answering beacons and announcing itself, it connects by the
/// remembered address alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_agent_finds_the_controller_by_beacon_and_remembers_it() {
    if !lan_tests_enabled() {
        return;
    }
    let lan = Lan::build(1).expect("build the LAN");
    let controller = LanController::start(&lan, &[("ENABLE_UDP_BROADCAST", "true")], DEADLINE);
    let mut robot = LanAgent::new(1);
    // A stale remembered controller that no longer answers.
    std::fs::write(
        robot.state_dir().join("controller"),
        "wss://10.88.0.1:1/agent\n",
    )
    .expect("write a stale remembered controller");

    let started = Instant::now();
    robot.start(&lan, "auto", Some(controller.enroll_token()), &AGENT_ENV);
    let took = wait_connected(&lan, &controller, vec![robot.robot_id], started);
    describe("auto agent start -> connected (beacon answer)", took);
    let log = robot.log_text();
    assert!(log.contains("does not answer; discovering"), "{log}");
    assert!(log.contains("\"via\":\"beacon\""), "{log}");
    let remembered = std::fs::read_to_string(robot.state_dir().join("controller"))
        .expect("the agent remembers the controller");
    assert_eq!(remembered.trim(), format!("wss://{AGENT_URL}/agent"));

    // Restart against the same controller with LAN discovery off.
    robot.stop();
    let controller = controller.restart_with(&lan, &[], DEADLINE);
    let started = Instant::now();
    robot.start(&lan, "auto", Some(controller.enroll_token()), &AGENT_ENV);
    let took = wait_connected(&lan, &controller, vec![robot.robot_id], started);
    let log = robot.log_text();
    assert!(log.contains("remembered controller"), "{log}");
    assert!(
        !log.contains("connecting to a discovered controller"),
        "{log}"
    );
    describe("auto agent restart -> connected (remembered)", took);
}

/// `controller = "auto"` by mDNS alone: the controller's `_kiwi-ctl._tcp`
/// service leads the agent to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_agent_finds_the_controller_by_mdns() {
    if !lan_tests_enabled() {
        return;
    }
    let lan = Lan::build(1).expect("build the LAN");
    let controller = LanController::start(&lan, &[("ENABLE_MDNS", "true")], DEADLINE);
    let mut robot = LanAgent::new(1);
    let started = Instant::now();
    robot.start(&lan, "auto", Some(controller.enroll_token()), &AGENT_ENV);
    let took = wait_connected(&lan, &controller, vec![robot.robot_id], started);
    describe("auto agent start -> connected (mDNS)", took);
    let log = robot.log_text();
    assert!(log.contains("\"via\":\"mdns\""), "{log}");
    assert!(robot.state_dir().join("controller").is_file());
}
