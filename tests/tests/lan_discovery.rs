//! Discovery of a whole /24 on the simulated LAN, end to end: a real
//! `kiwi-controller serve` in the controller namespace sweeps 10.88.0.0/24,
//! where 40 robots run `kiwi-agent` and 10 legacy robots (LeKiwi and
//! XLERobot) run only OpenSSH, and the other 203 addresses are empty. The
//! round is started and followed through the API. These tests need root
//! (`KIWI_LAN_TESTS=skip` skips them); nothing here asserts a duration.
//!
//! Build the binaries first: `cargo build -p kiwi-agent -p kiwi-controller --bins`.

use kiwi_controller::testing::sshd::ClientKey;
use kiwi_tests::lan::{Lan, LegacyKind, LegacyRobot, lan_tests_enabled};
use kiwi_tests::lan_fleet::{AGENT_URL, DiscoveryLan, LanAgent, LanController};
use kiwi_tests::{
    Api, Event, Robot, State, robot_id_for_serial, wait_for_robot, wait_ready_and_connected,
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long anything here may take (a debug build on a busy 2-core
/// machine); never a measurement.
const DEADLINE: Duration = Duration::from_secs(90);
const AGENTS: usize = 40;
const LEGACY: usize = 10;

/// Starts a discovery round through the API and follows it until it is
/// recorded; the session.
async fn discover(api: &Api) -> Value {
    api.discover(DEADLINE)
        .await
        .expect("a recorded discovery round")
}

/// The results of a session, by address (several methods may report one
/// address).
fn by_address(session: &Value) -> BTreeMap<String, Vec<Value>> {
    let mut map: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for r in session["results"].as_array().expect("results") {
        let ip = r["ip_address"].as_str().expect("an address").to_string();
        map.entry(ip).or_default().push(r.clone());
    }
    map
}

struct Fleet {
    lan: Lan,
    _key: ClientKey,
    controller: LanController,
    agents: Vec<LanAgent>,
    legacy: Vec<LegacyRobot>,
}

impl Fleet {
    /// One discovery round through the API (see [`discover`]): its session.
    fn round(&self) -> Value {
        self.controller
            .with_api(&self.lan, |api| async move { discover(&api).await })
    }

    /// Every robot of the fleet, through the API.
    fn robots(&self) -> Vec<Robot> {
        self.controller.with_api(&self.lan, |api| async move {
            api.robots().await.expect("list robots")
        })
    }

    /// The events of robot `id`, through the API.
    fn events(&self, id: Uuid) -> Vec<Event> {
        self.controller.with_api(&self.lan, move |api| async move {
            api.events(id).await.expect("the robot's events")
        })
    }

    /// The robot each host is, by its address as the fleet was built:
    /// agents by their serial, legacy robots by theirs.
    fn expected(&self) -> BTreeMap<String, Uuid> {
        let agents = self
            .agents
            .iter()
            .map(|a| (Lan::robot_ip(a.index).to_string(), a.robot_id));
        let legacy = self
            .legacy
            .iter()
            .map(|l| (l.ip.to_string(), robot_id_for_serial(&l.serial)));
        agents.chain(legacy).collect()
    }
}

/// The robots a session identified, by address (an address where two
/// different robots were identified fails the test).
fn identified(session: &Value) -> BTreeMap<String, Uuid> {
    let mut map = BTreeMap::new();
    for (ip, results) in by_address(session) {
        let ids: BTreeSet<Uuid> = results
            .iter()
            .filter(|r| r["outcome"] == "identified")
            .map(|r| {
                let id = r["robot_id"].as_str().expect("an identified robot's id");
                id.parse().expect("a robot id")
            })
            .collect();
        assert!(
            ids.len() <= 1,
            "{ip} identified as several robots: {results:#?}"
        );
        map.extend(ids.into_iter().map(|id| (ip.clone(), id)));
    }
    map
}

/// The LAN of the acceptance test (see [`DiscoveryLan`]): hosts 1..=40
/// with agents, 41..=50 legacy.
fn fleet() -> Fleet {
    let d = DiscoveryLan::start(AGENTS, LEGACY, DEADLINE).expect("the discovery LAN");
    Fleet {
        lan: d.lan,
        _key: d.key,
        controller: d.controller,
        agents: d.agents,
        legacy: d.legacy,
    }
}

#[test]
fn a_whole_subnet_is_found_and_identified_without_phantoms() {
    if !lan_tests_enabled() {
        return;
    }
    let mut f = fleet();
    let started = Instant::now();
    let session = f
        .controller
        .with_api(&f.lan, |api| async move { discover(&api).await });
    eprintln!(
        "discovery of the /24 ({AGENTS} agents, {LEGACY} legacy over SSH, 203 empty): \
         round {} ms, API round trip {:?}",
        session["duration_ms"],
        started.elapsed()
    );
    let results = by_address(&session);

    // Every host is there, and nothing else.
    let hosts: BTreeSet<String> = (1..=AGENTS + LEGACY)
        .map(|i| Lan::robot_ip(i).to_string())
        .collect();
    let seen: BTreeSet<String> = results.keys().cloned().collect();
    assert_eq!(seen, hosts, "results are exactly the 50 hosts: {session:#}");

    // Agents: identified as the robot whose agent is connected.
    for a in &f.agents {
        let ip = Lan::robot_ip(a.index).to_string();
        let id = a.robot_id.to_string();
        assert!(
            results[&ip]
                .iter()
                .any(|r| r["outcome"] == "identified" && r["robot_id"] == id.as_str()),
            "agent host {ip} identified as {id}: {:#?}",
            results[&ip]
        );
    }
    // Legacy robots: identified over SSH with the id their serial gives,
    // their type and MAC.
    for l in &f.legacy {
        let ip = l.ip.to_string();
        let id = robot_id_for_serial(&l.serial).to_string();
        let kind = match l.kind {
            LegacyKind::LeKiwi => "lekiwi",
            LegacyKind::Xlerobot => "xlerobot",
        };
        let ssh: Vec<&Value> = results[&ip]
            .iter()
            .filter(|r| r["method"] == "ssh")
            .collect();
        assert!(
            ssh.len() == 1
                && ssh[0]["outcome"] == "identified"
                && ssh[0]["robot_id"] == id.as_str()
                && ssh[0]["robot_type"] == kind
                && ssh[0]["mac_address"].is_string(),
            "legacy host {ip} identified over SSH as a {kind} ({id}): {:#?}",
            results[&ip]
        );
    }
    assert_eq!(session["robots_found"], (AGENTS + LEGACY) as i64);
    assert_eq!(
        session["new_robots"], LEGACY as i64,
        "the legacy robots are new"
    );

    // The fleet now holds all 50, each once, with the right types.
    let robots = f.controller.with_api(&f.lan, |api| async move {
        api.robots().await.expect("list robots")
    });
    assert_eq!(robots.len(), AGENTS + LEGACY, "no duplicate, no phantom");
    for l in &f.legacy {
        let id = robot_id_for_serial(&l.serial);
        let robot = robots.iter().find(|r| r.robot_id == id).expect("listed");
        assert_eq!(robot.hostname.as_deref(), Some(l.hostname.as_str()));
        assert_eq!(robot.field("ip_address"), l.ip.to_string().as_str());
    }

    // A second round changes nothing: the same robots, none new.
    let again = f
        .controller
        .with_api(&f.lan, |api| async move { discover(&api).await });
    assert_eq!(again["robots_found"], (AGENTS + LEGACY) as i64);
    assert_eq!(again["new_robots"], 0);
    assert!(f.controller.is_running());
}

#[test]
fn a_changed_host_key_is_flagged_not_trusted() {
    if !lan_tests_enabled() {
        return;
    }
    let mut f = fleet();
    let first = f
        .controller
        .with_api(&f.lan, |api| async move { discover(&api).await });
    let victim = &mut f.legacy[0];
    let ip = victim.ip.to_string();
    assert!(
        by_address(&first)[&ip]
            .iter()
            .any(|r| r["method"] == "ssh" && r["outcome"] == "identified")
    );
    victim
        .replace_host_key(&f.lan)
        .expect("a new host key for the robot");

    let second = f
        .controller
        .with_api(&f.lan, |api| async move { discover(&api).await });
    let flagged = &by_address(&second)[&ip];
    assert!(
        flagged.iter().any(|r| r["method"] == "ssh"
            && r["outcome"] == "host_key_changed"
            && r["robot_id"].is_null()
            && r["detail"].as_str().is_some_and(|d| d.contains("SHA256:"))),
        "{ip} is flagged with both fingerprints, and not identified: {flagged:#?}"
    );
    let mismatches = f.controller.with_api(&f.lan, |api| async move {
        api.metric("ssh_host_key_mismatches_total", &[])
            .await
            .expect("the metric")
    });
    assert!(
        mismatches >= 1.0,
        "ssh_host_key_mismatches_total = {mismatches}"
    );
    // The other legacy robots are still identified.
    for l in &f.legacy[1..] {
        let ip = l.ip.to_string();
        assert!(
            by_address(&second)[&ip]
                .iter()
                .any(|r| r["method"] == "ssh" && r["outcome"] == "identified"),
            "{ip}"
        );
    }
    drop(f.agents);
}

/// An address no host of the fleet starts with (10.88.0.200 and up).
fn unused_address(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 88, 0, 200 + n)
}

/// What a session recorded at `ip` that identifies a robot: nothing may
/// (a host that left an address leaves no robot behind there; the sweep
/// may still see the address `live` while the controller's neighbour table
/// vouches for it, which identifies nothing).
fn assert_no_robot_at(session: &Value, ip: &str) {
    let results = by_address(session).remove(ip).unwrap_or_default();
    assert!(
        results
            .iter()
            .all(|r| r["outcome"] != "identified" && r["robot_id"].is_null()),
        "no robot is left at the old address {ip}: {results:#?}"
    );
    if !results.is_empty() {
        eprintln!("the old address {ip} was still seen (not identified): {results:?}");
    }
}

/// The robot `id` in a list: exactly once.
fn only(robots: &[Robot], id: Uuid) -> &Robot {
    let found: Vec<&Robot> = robots.iter().filter(|r| r.robot_id == id).collect();
    assert_eq!(found.len(), 1, "robot {id} is listed once: {found:#?}");
    found[0]
}

/// Versions 1, 2, 3, ... with no gap: the robot's whole history.
fn assert_contiguous(events: &[Event]) {
    let versions: Vec<i64> = events.iter().map(|e| e.version).collect();
    let expected: Vec<i64> = (1..=events.len() as i64).collect();
    assert_eq!(versions, expected, "contiguous versions from 1");
}

#[test]
fn a_robot_whose_address_changes_keeps_its_id() {
    if !lan_tests_enabled() {
        return;
    }
    let mut f = fleet();
    let first = f.round();

    // (a) A legacy robot gets a new address and its sshd listens there.
    let legacy = &mut f.legacy[0];
    let id = robot_id_for_serial(&legacy.serial);
    let old_ip = legacy.ip.to_string();
    assert_eq!(identified(&first).get(&old_ip), Some(&id), "{first:#}");
    let new_ip = unused_address(0);
    legacy
        .move_to(&f.lan, new_ip)
        .expect("move the legacy robot");
    let new_ip = new_ip.to_string();

    let second = f.round();
    let at_new = &by_address(&second)[&new_ip];
    assert!(
        at_new.iter().any(|r| r["method"] == "ssh"
            && r["outcome"] == "identified"
            && r["robot_id"] == id.to_string().as_str()),
        "{new_ip} identified over SSH as the same robot {id}: {at_new:#?}"
    );
    assert_no_robot_at(&second, &old_ip);
    assert_eq!(second["new_robots"], 0, "no new robot: {second:#}");
    assert_eq!(second["robots_found"], (AGENTS + LEGACY) as i64);
    let robots = f.robots();
    assert_eq!(robots.len(), AGENTS + LEGACY, "no duplicate");
    assert_eq!(only(&robots, id).field("ip_address"), new_ip.as_str());
    let events = f.events(id);
    assert_contiguous(&events);
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "robot_discovered").count(),
        1,
        "discovered once: {kinds:?}"
    );
    assert!(
        events.iter().any(|e| e.kind == "robot_identity_changed"
            && e.data["ip_address"] == new_ip.as_str()
            && e.data["method"].is_null()),
        "the move is recorded as an identity change: {events:#?}"
    );

    // (b) An agent's robot gets a new address; its agent starts again
    // there.
    let agent = &mut f.agents[0];
    let id = agent.robot_id;
    let old_ip = Lan::robot_ip(agent.index);
    let new_ip = unused_address(1);
    agent.stop();
    f.lan
        .change_address(&f.lan.robot(agent.index), old_ip, new_ip)
        .expect("move the agent's robot");
    let started = Instant::now();
    agent.start(&f.lan, AGENT_URL, Some(f.controller.enroll_token()), &[]);
    let (old_ip, new_ip) = (old_ip.to_string(), new_ip.to_string());
    let at = new_ip.clone();
    f.controller.with_api(&f.lan, move |api| async move {
        wait_for_robot(
            &api,
            id,
            DEADLINE,
            "ready and connected from its new address",
            |r| r.state == State::Ready && r.connected && r.field("ip_address") == at.as_str(),
        )
        .await
    });
    eprintln!(
        "agent restarted at {new_ip}: connected again after {:?}",
        started.elapsed()
    );
    let third = f.round();
    assert_eq!(
        identified(&third).get(&new_ip),
        Some(&id),
        "{new_ip} identified as the same robot: {:#?}",
        by_address(&third).get(&new_ip)
    );
    assert_no_robot_at(&third, &old_ip);
    assert_eq!(third["new_robots"], 0, "no new robot: {third:#}");
    assert_eq!(third["robots_found"], (AGENTS + LEGACY) as i64);
    let robots = f.robots();
    assert_eq!(robots.len(), AGENTS + LEGACY, "no duplicate");
    assert_eq!(only(&robots, id).field("ip_address"), new_ip.as_str());
    let events = f.events(id);
    assert_contiguous(&events);
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == "robot_discovered")
            .count(),
        1
    );
    assert!(
        events
            .iter()
            .any(|e| e.kind == "robot_identity_changed" && e.data["ip_address"] == new_ip.as_str()),
        "the move is recorded as an identity change: {events:#?}"
    );
    assert!(f.controller.is_running());
}

#[test]
fn a_legacy_robot_that_starts_the_agent_keeps_its_id_and_history() {
    if !lan_tests_enabled() {
        return;
    }
    let f = fleet();
    let first = f.round();
    // Host 41, a LeKiwi: the agent's files below are a LeKiwi's, so only
    // the agent is new, not the robot's type.
    let legacy = &f.legacy[0];
    let index = AGENTS + 1;
    assert_eq!(
        (legacy.kind, legacy.ip),
        (LegacyKind::LeKiwi, Lan::robot_ip(index))
    );
    let id = robot_id_for_serial(&legacy.serial);
    let ip = legacy.ip.to_string();
    assert_eq!(identified(&first).get(&ip), Some(&id), "{first:#}");
    let before = f.events(id);
    assert!(
        matches!(&before[..], [e] if e.kind == "robot_discovered" && e.data["method"] == "ssh"),
        "found over SSH: {before:#?}"
    );

    // The robot gets the agent (same serial); sshd keeps running.
    let mut agent = LanAgent::with_serial(index, &legacy.serial);
    assert_eq!(agent.robot_id, id, "the agent computes the same id");
    let started = Instant::now();
    agent.start(&f.lan, AGENT_URL, Some(f.controller.enroll_token()), &[]);
    f.controller.with_api(&f.lan, move |api| async move {
        wait_ready_and_connected(&api, id, DEADLINE).await
    });
    eprintln!(
        "the agent of the legacy robot {ip}: ready after {:?}",
        started.elapsed()
    );

    let robots = f.robots();
    assert_eq!(robots.len(), AGENTS + LEGACY, "no new robot");
    let robot = only(&robots, id);
    assert_eq!(robot.field("ip_address"), ip.as_str());
    assert!(robot.field("agent_version").is_string(), "{robot:#?}");
    let events = f.events(id);
    assert_contiguous(&events);
    assert_eq!(
        events[..before.len()],
        before[..],
        "the history found over SSH is kept"
    );
    let after: Vec<&str> = events[before.len()..]
        .iter()
        .map(|e| e.kind.as_str())
        .collect();
    assert!(
        !after.contains(&"robot_discovered")
            && after.contains(&"robot_identity_changed")
            && after.contains(&"robot_provisioned"),
        "then the agent's events (identity, provisioning): {after:?}"
    );
    let changed = events[before.len()..]
        .iter()
        .find(|e| e.kind == "robot_identity_changed")
        .expect("an identity change");
    assert!(changed.data["agent_version"].is_string(), "{changed:#?}");

    // A round now finds it by its agent: still the same robot, none new.
    let second = f.round();
    assert_eq!(identified(&second).get(&ip), Some(&id), "{second:#}");
    assert_eq!(second["new_robots"], 0);
    assert_eq!(second["robots_found"], (AGENTS + LEGACY) as i64);
    assert_eq!(f.robots().len(), AGENTS + LEGACY);
    drop(agent);
}

/// With 5 % loss on every robot port, up to three rounds find all 50.
///
/// What counts as found: a legacy robot is found only when a round
/// identifies it over SSH at its address. An agent's host is identified in
/// a round when its agent is connected at that moment (by the agent
/// source, and by the sweep through the connection); under loss an agent
/// may be between two connections then, and the sweep records its host as
/// `live` (no agent or SSH to identify it by). Such a robot is not lost:
/// the sweep saw its host and its agent identifies it again as soon as it
/// reconnects. So an agent's robot passes when some round identified it,
/// or when some round saw its address live and its agent is connected
/// again at the end. Every result must be at one of the 50 addresses, and
/// name the robot that is there.
#[test]
fn with_packet_loss_all_robots_are_found_within_three_sweeps() {
    if !lan_tests_enabled() {
        return;
    }
    let f = fleet();
    f.lan.set_loss(5.0).expect("5 % loss on the switch");
    let expected = f.expected();
    let mut found: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut rounds = 0;
    while rounds < 3 && found.len() < expected.len() {
        rounds += 1;
        let session = f.round();
        let results = by_address(&session);
        let phantoms: Vec<&String> = results
            .keys()
            .filter(|ip| !expected.contains_key(*ip))
            .collect();
        assert!(phantoms.is_empty(), "results at {phantoms:?}: {session:#}");
        for (ip, id) in identified(&session) {
            assert_eq!(id, expected[&ip], "{ip} identified as another robot");
            found.entry(ip).or_insert(rounds);
        }
        seen.extend(results.keys().cloned());
        // What the addresses not identified in this round showed.
        let identified_now = identified(&session);
        let missed: Vec<String> = expected
            .keys()
            .filter(|ip| !identified_now.contains_key(*ip))
            .map(|ip| match results.get(ip) {
                None => format!("{ip}: no result"),
                Some(rs) => {
                    let what: Vec<String> = rs
                        .iter()
                        .map(|r| format!("{} {} ({})", r["method"], r["outcome"], r["detail"]))
                        .collect();
                    format!("{ip}: {}", what.join(", "))
                }
            })
            .collect();
        eprintln!(
            "with 5 % loss, round {rounds}: {} ms, {} of {} identified, {} found so far; \
             not identified in this round: {missed:?}",
            session["duration_ms"],
            session["robots_found"],
            expected.len(),
            found.len()
        );
    }
    let missing: Vec<&String> = expected
        .keys()
        .filter(|ip| !found.contains_key(*ip))
        .collect();
    eprintln!(
        "with 5 % loss: {} of {} robots identified in {rounds} round(s); not identified: {missing:?}",
        found.len(),
        expected.len()
    );

    for l in &f.legacy {
        let ip = l.ip.to_string();
        assert!(
            found.contains_key(&ip),
            "legacy robot {ip} identified over SSH"
        );
    }
    let agents: BTreeMap<String, Uuid> = f
        .agents
        .iter()
        .map(|a| (Lan::robot_ip(a.index).to_string(), a.robot_id))
        .filter(|(ip, _)| !found.contains_key(ip))
        .collect();
    for ip in agents.keys() {
        assert!(
            seen.contains(ip),
            "agent host {ip} neither identified nor seen"
        );
    }
    let robots = f.controller.with_api(&f.lan, move |api| async move {
        for id in agents.values() {
            wait_for_robot(&api, *id, DEADLINE, "connected again", |r| r.connected).await;
        }
        api.robots().await.expect("list robots")
    });
    assert_eq!(robots.len(), AGENTS + LEGACY, "no duplicate, no phantom");
    let listed: BTreeSet<Uuid> = robots.iter().map(|r| r.robot_id).collect();
    let hosts: BTreeSet<Uuid> = expected.values().copied().collect();
    assert_eq!(listed, hosts, "the fleet is the 50 robots");
}
