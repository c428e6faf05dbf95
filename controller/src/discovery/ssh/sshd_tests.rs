//! Visits to a real sshd on 127.0.0.1 (and to sockets that only pretend
//! to be one). Nothing leaves loopback.

use super::*;
use crate::testing::sshd::{
    ClientKey, RobotKind, RobotSpec, RunningSshd, SshdFixture, free_loopback_port, login_user,
};
use kiwi_protocol::RobotType;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::AsyncWriteExt;

fn settings(key: &Path, sys_root: &Path, known_hosts: &Path) -> SshSettings {
    let mut s = SshSettings::new(key, known_hosts);
    s.user = login_user();
    s.sys_root = sys_root.to_path_buf();
    s.connect_timeout = Duration::from_secs(5);
    s.command_timeout = Duration::from_secs(10);
    s
}

struct Robot {
    fixture: SshdFixture,
    sshd: Option<RunningSshd>,
}

fn robot(kind: RobotKind, n: u32, key: &ClientKey) -> Robot {
    let fixture = SshdFixture::on_loopback(RobotSpec::numbered(kind, n), &key.public_key)
        .expect("sshd fixture");
    let sshd = Some(fixture.start().expect("sshd starts"));
    Robot { fixture, sshd }
}

fn probe(robot: &Robot, key: &Path, known_hosts: &Path) -> SshProbe {
    SshProbe::new(settings(key, &robot.fixture.robot_root(), known_hosts)).unwrap()
}

/// What the agent's own probe makes of the same tree.
fn agent_view(root: &Path) -> kiwi_agent::probe::ProbedIdentity {
    let state = tempfile::tempdir().unwrap();
    kiwi_agent::probe::probe_identity(&kiwi_agent::probe::SysRoot::new(root), state.path(), None)
        .unwrap()
}

#[tokio::test]
async fn lekiwi_and_xlerobot_are_identified_as_the_agent_would() {
    let key = ClientKey::generate().unwrap();
    let state = tempfile::tempdir().unwrap();
    let known = state.path().join(KNOWN_HOSTS_FILE);
    for (kind, want) in [
        (RobotKind::LeKiwi, RobotType::Lekiwi),
        (RobotKind::Xlerobot, RobotType::Xlerobot),
    ] {
        let robot = robot(kind, 7, &key);
        let probe = probe(&robot, &key.private_key, &known);
        let started = Instant::now();
        let id = probe.identify_at(robot.fixture.listen()).await.unwrap();
        eprintln!(
            "{kind:?}: first visit (login + identify) took {:?}",
            started.elapsed()
        );
        let spec = robot.fixture.spec();
        assert_eq!(id.found.type_decision.robot_type, want, "{:?}", id.found);
        assert_eq!(id.hardware_id, HardwareId::PiSerial(spec.serial.clone()));
        assert_eq!(id.found.hostname.as_deref(), Some(spec.hostname.as_str()));
        assert_eq!(id.found.model.as_deref(), Some(crate::testing::sshd::MODEL));
        assert_eq!(
            id.host_key_fingerprint,
            robot.fixture.host_key_fingerprint()
        );
        assert!(id.host_key_recorded);

        // The shared path: the agent's probe of the same tree agrees.
        let agent = agent_view(&robot.fixture.robot_root());
        assert_eq!(id.robot_id, agent.identity.robot_id);
        assert_eq!(id.hardware_id, agent.identity.hardware_id);
        assert_eq!(id.found.type_decision, agent.type_decision);
        assert_eq!(
            id.found.hostname.as_deref(),
            Some(agent.identity.hostname.as_str())
        );
        assert_eq!(id.found.model, agent.identity.model);
        assert_eq!(id.found.os_version, agent.identity.os_version);

        let facts = id.facts();
        assert_eq!(facts.robot_type, want.as_str());
        assert_eq!(facts.ip_address.as_deref(), Some("127.0.0.1"));

        // A second visit passes the host-key check without recording.
        let started = Instant::now();
        let again = probe.identify_at(robot.fixture.listen()).await.unwrap();
        eprintln!(
            "{kind:?}: second visit (login + identify) took {:?}",
            started.elapsed()
        );
        assert!(!again.host_key_recorded);
        assert_eq!(again.robot_id, id.robot_id);
        assert_eq!(again.host_key_fingerprint, id.host_key_fingerprint);
    }
    // Both addresses are pinned in the file.
    assert_eq!(KnownHosts::open(&known).unwrap().fingerprints().len(), 2);
}

#[tokio::test]
async fn a_changed_host_key_is_flagged_not_trusted() {
    let key = ClientKey::generate().unwrap();
    let state = tempfile::tempdir().unwrap();
    let known = state.path().join(KNOWN_HOSTS_FILE);
    let mut robot = robot(RobotKind::LeKiwi, 1, &key);
    let addr = robot.fixture.listen();
    let probe = probe(&robot, &key.private_key, &known);
    let first = probe.identify_at(addr).await.unwrap();
    let old_fingerprint = first.host_key_fingerprint.clone();

    // The same address comes back with another host key.
    robot.sshd.take().unwrap().stop();
    let new_fingerprint = robot.fixture.new_host_key().unwrap();
    assert_ne!(new_fingerprint, old_fingerprint);
    robot.sshd = Some(robot.fixture.start().unwrap());

    for probe in [probe, self::probe(&robot, &key.private_key, &known)] {
        // Twice, and also by a probe that only has the file: flagged
        // every time, with no identity, and the breaker stays closed.
        for _ in 0..2 {
            match probe.identify_at(addr).await {
                Err(SshError::HostKeyChanged {
                    address,
                    expected_fingerprint,
                    found_fingerprint,
                }) => {
                    assert_eq!(address, addr);
                    assert_eq!(expected_fingerprint, old_fingerprint);
                    assert_eq!(found_fingerprint, new_fingerprint);
                }
                other => panic!("expected HostKeyChanged, got {other:?}"),
            }
        }
        assert_eq!(probe.breaker_state(addr), None);
    }
    // The pin is unchanged on disk.
    let pinned = KnownHosts::open(&known).unwrap().fingerprints();
    assert_eq!(pinned, vec![(addr, old_fingerprint)]);

    // The operator accepts the new key: the next visit records it.
    let probe = self::probe(&robot, &key.private_key, &known);
    assert!(probe.forget_host_key(addr).unwrap());
    let id = probe.identify_at(addr).await.unwrap();
    assert!(id.host_key_recorded);
    assert_eq!(id.host_key_fingerprint, new_fingerprint);
    assert_eq!(id.robot_id, first.robot_id);
}

#[tokio::test]
async fn a_wrong_client_key_is_refused_cleanly() {
    let key = ClientKey::generate().unwrap();
    let other = ClientKey::generate().unwrap();
    let state = tempfile::tempdir().unwrap();
    let robot = robot(RobotKind::Xlerobot, 2, &key);
    let probe = probe(
        &robot,
        &other.private_key,
        &state.path().join(KNOWN_HOSTS_FILE),
    );
    match probe.identify_at(robot.fixture.listen()).await {
        Err(SshError::AuthRejected { address, user }) => {
            assert_eq!(address, robot.fixture.listen());
            assert_eq!(user, login_user());
        }
        other => panic!("expected AuthRejected, got {other:?}"),
    }
    // Nothing was learnt from a host that did not let us in.
    assert_eq!(probe.known_hosts().fingerprints(), vec![]);
}

#[tokio::test]
async fn no_sshd_fails_at_once() {
    let key = ClientKey::generate().unwrap();
    let state = tempfile::tempdir().unwrap();
    let s = settings(
        &key.private_key,
        Path::new("/"),
        &state.path().join(KNOWN_HOSTS_FILE),
    );
    let probe = SshProbe::new(s).unwrap();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port().unwrap()));
    match probe.identify_at(addr).await {
        Err(SshError::Connect { source, .. }) => {
            assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused);
        }
        other => panic!("expected a refused connection, got {other:?}"),
    }
}

/// A listener on 127.0.0.1 that answers every connection with `reply`
/// (then keeps it open without reading); counts connections.
async fn fake_server(reply: Vec<u8>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let reply = reply.clone();
            tokio::spawn(async move {
                let _ = socket.write_all(&reply).await;
                // Hold the connection until the client gives up.
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    (addr, count)
}

fn short_probe(key: &ClientKey, dir: &Path) -> SshProbe {
    let mut s = settings(
        &key.private_key,
        Path::new("/"),
        &dir.join(KNOWN_HOSTS_FILE),
    );
    s.connect_timeout = Duration::from_secs(1);
    s.command_timeout = Duration::from_secs(1);
    SshProbe::new(s).unwrap()
}

#[tokio::test]
async fn garbage_and_silence_are_errors_not_hangs() {
    let key = ClientKey::generate().unwrap();
    let state = tempfile::tempdir().unwrap();
    let probe = short_probe(&key, state.path());
    let random: Vec<u8> = (0..64 * 1024).map(|_| rand::random::<u8>()).collect();
    let mut banner_then_garbage = b"SSH-2.0-OpenSSH_9.2\r\n".to_vec();
    banner_then_garbage.extend_from_slice(&random[..4096]);
    let cases = [
        ("random bytes", random),
        ("a banner, then random bytes", banner_then_garbage),
        (
            "a banner, then silence",
            b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(),
        ),
        ("silence", Vec::new()),
    ];
    for (what, reply) in cases {
        let (addr, _) = fake_server(reply).await;
        // The test's own bound: far above the probe's timeouts.
        let result = tokio::time::timeout(Duration::from_secs(30), probe.identify_at(addr))
            .await
            .unwrap_or_else(|_| panic!("{what}: the probe hung"));
        let err = result.expect_err(what);
        assert!(err.counts_against_host(), "{what}: {err}");
        eprintln!("{what}: {err}");
    }
}

#[tokio::test]
async fn the_breaker_opens_and_then_refuses_without_connecting() {
    let key = ClientKey::generate().unwrap();
    let state = tempfile::tempdir().unwrap();
    let probe = short_probe(&key, state.path());
    let (addr, connections) = fake_server(b"not ssh at all\r\n".repeat(64)).await;
    let threshold = probe.settings().breaker.failure_threshold as usize;
    for i in 0..threshold {
        let err = probe.identify_at(addr).await.unwrap_err();
        assert!(
            !matches!(err, SshError::BreakerOpen { .. }),
            "attempt {i}: {err}"
        );
    }
    assert_eq!(connections.load(Ordering::SeqCst), threshold);
    assert_eq!(probe.breaker_state(addr).map(|s| s.as_str()), Some("open"));
    for _ in 0..3 {
        match probe.identify_at(addr).await {
            Err(SshError::BreakerOpen { address, retry_in }) => {
                assert_eq!(address, addr);
                assert!(retry_in <= probe.settings().breaker.open_timeout);
            }
            other => panic!("expected BreakerOpen, got {other:?}"),
        }
    }
    // Refused without a connection.
    assert_eq!(connections.load(Ordering::SeqCst), threshold);
    // Other addresses are not affected; a reset lets the address in.
    assert_eq!(
        probe.breaker_state(SocketAddr::from((Ipv4Addr::LOCALHOST, 1))),
        None
    );
    probe.reset_breaker(addr);
    assert!(!matches!(
        probe.identify_at(addr).await,
        Err(SshError::BreakerOpen { .. })
    ));
    assert_eq!(connections.load(Ordering::SeqCst), threshold + 1);
}
