//! The active sweep on a simulated LAN (see `kiwi_tests::lan`): 50 robot
//! hosts on 10.88.0.0/24 and 203 empty addresses, swept from the
//! controller's namespace. Every present host is found with its MAC, no
//! absent address is taken for a host, and the agent and SSH port flags
//! match the listeners; the TCP fallback (no ARP of our own) decides every
//! address as well. Durations are printed, not asserted (speed belongs to
//! the benchmarks).

use std::net::{Ipv4Addr, TcpListener, TcpStream};

use std::time::Duration;

use kiwi_controller::discovery::neighbours::{self, NeighbourState};
use kiwi_controller::discovery::sweep::{FoundBy, Ipv4Net, SweepReport, SweepSettings, sweep};
use kiwi_tests::lan::{Lan, lan_tests_enabled};

const ROBOTS: usize = 50;
const AGENT_PORT: u16 = 8765;
const SSH_PORT: u16 = 22;

fn has_agent(i: usize) -> bool {
    (1..=10).contains(&i)
}

fn has_sshd(i: usize) -> bool {
    (11..=20).contains(&i)
}

/// The LAN with listeners: robots 1–10 on the agent port, 11–20 on the SSH
/// port, the rest present but listening on neither. The listeners were
/// created inside the robots' namespaces; the kernel completes connects
/// into their backlog, so nobody needs to accept.
fn lan_with_listeners() -> (Lan, Vec<TcpListener>) {
    // `build` returns once every link carries traffic.
    let lan = Lan::build(ROBOTS).expect("build the simulated LAN");
    let listeners = (1..=ROBOTS)
        .filter_map(|i| {
            let port = if has_agent(i) {
                AGENT_PORT
            } else if has_sshd(i) {
                SSH_PORT
            } else {
                return None;
            };
            Some(
                lan.in_namespace(&lan.robot(i), || {
                    TcpListener::bind((Lan::robot_ip(i), port))
                })
                .unwrap_or_else(|e| panic!("listen on robot {i} port {port}: {e}")),
            )
        })
        .collect();
    (lan, listeners)
}

fn settings() -> SweepSettings {
    SweepSettings {
        networks: vec![Ipv4Net::new(Ipv4Addr::new(10, 88, 0, 0), 24).unwrap()],
        ..SweepSettings::default()
    }
}

/// Runs the sweep inside the controller's namespace.
fn sweep_in_ctl(lan: &Lan, settings: SweepSettings) -> SweepReport {
    lan.spawn_in(lan.ctl(), move || async move { sweep(&settings).await })
        .join()
        .expect("the sweep thread")
        .expect("the sweep")
}

/// Every robot found once, nothing else, with the right port flags; the
/// MACs checked when `with_macs`.
fn assert_every_robot(report: &SweepReport, with_macs: bool) {
    assert_eq!(report.decided_addresses, 253, "the /24 less .0, .1, .255");
    let found: Vec<Ipv4Addr> = report.hosts.iter().map(|h| h.ip).collect();
    let expected: Vec<Ipv4Addr> = (1..=ROBOTS).map(Lan::robot_ip).collect();
    assert_eq!(
        found, expected,
        "live hosts (no phantom among the 203 absent)"
    );
    for (i, host) in (1..=ROBOTS).zip(&report.hosts) {
        if with_macs {
            assert_eq!(host.mac, Some(Lan::robot_mac(i)), "MAC of robot {i}");
        }
        assert_eq!(
            host.agent_port_open,
            has_agent(i),
            "agent port of robot {i}"
        );
        assert_eq!(host.ssh_port_open, has_sshd(i), "SSH port of robot {i}");
    }
}

#[test]
fn the_arp_sweep_finds_every_host_with_its_mac_and_its_ports() {
    if !lan_tests_enabled() {
        return;
    }
    let (lan, _listeners) = lan_with_listeners();

    let report = sweep_in_ctl(&lan, settings());
    println!(
        "ARP sweep of 10.88.0.0/24 ({ROBOTS} hosts, 203 empty): {:?}",
        report.duration
    );
    assert!(report.arp_used, "ARP was used (root has CAP_NET_RAW)");
    assert_eq!(report.arp_fallback, None);
    assert_every_robot(&report, true);
    assert!(
        report.hosts.iter().all(|h| h.found_by == FoundBy::Arp),
        "a fresh LAN: every host answered our ARP: {:?}",
        report.hosts
    );

    // The port probes made the kernel resolve every robot: the next sweep
    // finds them in the neighbour table and asks only the empty addresses.
    let again = sweep_in_ctl(&lan, settings());
    println!(
        "second sweep, hosts in the neighbour table: {:?}",
        again.duration
    );
    assert_every_robot(&again, true);
    assert!(
        again.hosts.iter().all(|h| h.found_by == FoundBy::Neighbour),
        "{:?}",
        again.hosts
    );
}

#[test]
fn the_neighbour_table_shows_a_robot_after_the_controller_talked_to_it() {
    if !lan_tests_enabled() {
        return;
    }
    let (lan, _listeners) = lan_with_listeners();
    let robot = Lan::robot_ip(3);
    let (before, after, local) = lan
        .spawn_in(lan.ctl(), move || async move {
            let before = neighbours::neighbours()
                .await
                .expect("read the neighbour table");
            let talk = tokio::task::spawn_blocking(move || {
                TcpStream::connect_timeout(&(robot, AGENT_PORT).into(), Duration::from_secs(5))
            });
            talk.await
                .unwrap()
                .expect("connect to robot 3's agent port");
            let after = neighbours::neighbours()
                .await
                .expect("read the neighbour table");
            let local = neighbours::local_addresses()
                .await
                .expect("read the addresses");
            (before, after, local)
        })
        .join()
        .expect("the namespace thread");

    assert!(
        before.iter().all(|n| n.ip != robot),
        "robot 3 is unknown before: {before:?}"
    );
    let entry = after
        .iter()
        .find(|n| n.ip == robot)
        .unwrap_or_else(|| panic!("robot 3 is in the table after: {after:?}"));
    assert_eq!(entry.mac, Some(Lan::robot_mac(3)));
    assert_eq!(entry.state, NeighbourState::Reachable);
    let eth0 = local
        .iter()
        .find(|l| l.address() == Lan::ctl_ip())
        .unwrap_or_else(|| panic!("10.88.0.1 is one of ours: {local:?}"));
    assert_eq!(eth0.net.prefix_len(), 24);
    assert_eq!(eth0.ifindex, entry.ifindex, "robot 3 is on eth0");
    assert!(local.iter().any(|l| l.address().is_loopback()));
}

#[test]
fn without_arp_tcp_connects_decide_every_address() {
    if !lan_tests_enabled() {
        return;
    }
    let (lan, _listeners) = lan_with_listeners();

    // TCP, then the neighbour table for the MACs.
    let report = sweep_in_ctl(
        &lan,
        SweepSettings {
            use_arp: false,
            ..settings()
        },
    );
    println!(
        "TCP fallback sweep, liveness timeout {:?}: {:?}",
        SweepSettings::default().liveness_timeout,
        report.duration
    );
    assert!(!report.arp_used);
    assert_every_robot(&report, true);
    assert!(
        report.hosts.iter().all(|h| h.found_by == FoundBy::Tcp),
        "every robot accepted or refused the connect: {:?}",
        report.hosts
    );
}

#[test]
fn tcp_alone_decides_every_address_too() {
    if !lan_tests_enabled() {
        return;
    }
    let (lan, _listeners) = lan_with_listeners();

    let report = sweep_in_ctl(
        &lan,
        SweepSettings {
            use_arp: false,
            use_neighbour_table: false,
            liveness_timeout: Duration::from_millis(300),
            ..settings()
        },
    );
    println!(
        "TCP-only sweep, liveness timeout 300ms: {:?}",
        report.duration
    );
    assert!(!report.arp_used);
    assert_every_robot(&report, false);
    assert!(report.hosts.iter().all(|h| h.mac.is_none()));
}

#[test]
fn a_network_larger_than_a_16_is_refused() {
    if !lan_tests_enabled() {
        return;
    }
    let lan = Lan::build(1).expect("build the simulated LAN");
    // Refused before anything is sent: the links need not be up.
    let result = lan
        .spawn_in(lan.ctl(), || async {
            sweep(&SweepSettings {
                networks: vec![Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 8).unwrap()],
                ..SweepSettings::default()
            })
            .await
        })
        .join()
        .expect("the namespace thread");
    let error = result.expect_err("a /8 is refused");
    assert!(error.to_string().contains("too large"), "{error}");
}
