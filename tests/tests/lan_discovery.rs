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
use kiwi_tests::lan_fleet::{AGENT_URL, LanAgent, LanController};
use kiwi_tests::{Api, robot_id_for_serial, wait_ready_and_connected, wait_until};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
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
    let resp = api
        .http()
        .post(api.url("/api/v2/discover"))
        .send()
        .await
        .expect("POST /api/v2/discover");
    assert_eq!(resp.status(), reqwest::StatusCode::ACCEPTED);
    let body: Value = resp.json().await.expect("a JSON body");
    let id = body["session_id"]
        .as_str()
        .expect("a session id")
        .to_string();
    wait_until(DEADLINE, || {
        let path = format!("/api/v2/discoveries/{id}");
        async move {
            let followed: Value = api.get_json(&path).await?;
            anyhow::ensure!(followed["status"] == "done", "{path}: {followed}");
            Ok(followed["session"].clone())
        }
    })
    .await
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

/// The LAN of the acceptance test: hosts 1..=40 with agents, 41..=50
/// legacy (odd: LeKiwi, even: XLERobot), the controller sweeping the /24
/// and identifying legacy robots over SSH.
fn fleet() -> Fleet {
    let lan = Lan::build(AGENTS + LEGACY).expect("build the LAN");
    let key = ClientKey::generate().expect("a client key");
    let legacy: Vec<LegacyRobot> = (AGENTS + 1..=AGENTS + LEGACY)
        .map(|i| {
            let kind = if i % 2 == 1 {
                LegacyKind::LeKiwi
            } else {
                LegacyKind::Xlerobot
            };
            lan.legacy_robot(i, kind, &key.public_key)
                .unwrap_or_else(|e| panic!("legacy robot {i}: {e:#}"))
        })
        .collect();
    let key_path = key.private_key.display().to_string();
    let controller = LanController::start(
        &lan,
        &[
            ("DISCOVERY_NETWORKS", "10.88.0.0/24"),
            ("DISCOVERY_INTERVAL", "0s"),
            ("ENABLE_SSH_FALLBACK", "true"),
            ("SSH_KEY", &key_path),
            ("SSH_SYS_ROOT", "/run/kiwi-robot"),
        ],
        DEADLINE,
    );
    let mut agents: Vec<LanAgent> = (1..=AGENTS).map(LanAgent::new).collect();
    for agent in &mut agents {
        agent.start(&lan, AGENT_URL, &[]);
    }
    let ids: Vec<Uuid> = agents.iter().map(|a| a.robot_id).collect();
    controller.with_api(&lan, move |api| async move {
        for id in ids {
            wait_ready_and_connected(&api, id, DEADLINE).await;
        }
    });
    Fleet {
        lan,
        _key: key,
        controller,
        agents,
        legacy,
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
