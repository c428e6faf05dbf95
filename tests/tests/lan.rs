//! The simulated LAN itself: every robot is reachable from the controller
//! namespace with the MAC it was given, broadcasts reach the robots, a full
//! /24 builds and leaves nothing behind (also when a test panics), legacy
//! robots accept SSH key logins, loss rules cut a robot off and give it
//! back, and a delay slows a robot down until its guard drops. These tests
//! need root (`KIWI_LAN_TESTS=skip` skips them).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiwi_tests::lan::{Lan, LegacyKind, lan_tests_enabled};
use kiwi_tests::{POLL_INTERVAL, secs};

/// A port the tests listen on inside robot namespaces.
const PORT: u16 = 7000;

/// The names `ip netns list` shows that start with `prefix`.
fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let output = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    assert!(output.status.success(), "ip netns list failed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// The run's name prefix (the controller namespace is `<prefix>ctl`).
fn prefix_of(lan: &Lan) -> String {
    lan.ctl()
        .strip_suffix("ctl")
        .expect("the controller namespace ends in ctl")
        .to_string()
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Runs `command` to its end, killing it after `timeout`.
fn output_within(mut command: Command, timeout: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    if wait_exit(&mut child, timeout).is_none() {
        let _ = child.kill();
        let output = child.wait_with_output().expect("reap the child");
        panic!(
            "{command:?} did not finish within {timeout:?}; stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The outputs here are a few lines: the child never blocks on a full pipe.
    child.wait_with_output().expect("collect the output")
}

/// Waits up to `timeout` for `child` to exit.
fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Accepts one connection, waiting at most `timeout` for it.
fn accept_within(listener: &TcpListener, timeout: Duration) -> (TcpStream, SocketAddr) {
    listener.set_nonblocking(true).expect("set_nonblocking");
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).expect("set_nonblocking");
                return (stream, peer);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(POLL_INTERVAL);
            }
            Err(e) => panic!("no connection accepted within {timeout:?}: {e}"),
        }
    }
}

/// A TCP listener on robot `i`'s address, created inside its namespace.
fn listen_on_robot(lan: &Lan, i: usize) -> TcpListener {
    lan.in_namespace(&lan.robot(i), || {
        TcpListener::bind((Lan::robot_ip(i), PORT)).expect("bind in the robot namespace")
    })
}

fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, timeout)
}

/// `sleep 600` in robot `i`'s namespace, returned once it runs there
/// (`ip netns exec` has entered the namespace and executed `sleep`).
fn sleeper_in(lan: &Lan, i: usize) -> Child {
    let mut child = lan
        .command(&lan.robot(i), "sleep")
        .arg("600")
        .spawn()
        .expect("start sleep");
    let comm = format!("/proc/{}/comm", child.id());
    let deadline = Instant::now() + secs(10);
    while std::fs::read_to_string(&comm).map_or(true, |c| c.trim() != "sleep") {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("sleep did not start in robot {i} within 10 s");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    child
}

#[test]
fn every_robot_answers_the_controller_with_its_own_mac() {
    if !lan_tests_enabled() {
        return;
    }
    const ROBOTS: usize = 20;
    let started = Instant::now();
    let lan = Lan::build(ROBOTS).expect("build the LAN");
    eprintln!("{ROBOTS} robots built in {:?}", started.elapsed());

    let listeners: Vec<TcpListener> = (1..=ROBOTS).map(|i| listen_on_robot(&lan, i)).collect();
    lan.in_namespace(lan.ctl(), || {
        for i in 1..=ROBOTS {
            let addr = SocketAddr::from((Lan::robot_ip(i), PORT));
            let mut stream = connect(addr, secs(5))
                .unwrap_or_else(|e| panic!("robot {i} ({addr}) does not answer: {e}"));
            stream
                .write_all(&[u8::try_from(i).expect("small")])
                .expect("send");
        }
    });
    for (index, listener) in listeners.iter().enumerate() {
        let i = index + 1;
        let (mut stream, peer) = accept_within(listener, secs(5));
        assert_eq!(
            peer.ip(),
            Lan::ctl_ip(),
            "robot {i} sees the controller's address"
        );
        stream.set_read_timeout(Some(secs(5))).expect("timeout");
        let mut byte = [0u8];
        stream.read_exact(&mut byte).expect("read");
        assert_eq!(usize::from(byte[0]), i, "robot {i} got its own connection");
    }

    // The controller learned every robot's MAC by ARP.
    let mut ip = lan.command(lan.ctl(), "ip");
    ip.args(["neigh", "show", "dev", "eth0"]);
    let neighbours = String::from_utf8(output_within(ip, secs(10)).stdout).expect("utf-8");
    for i in 1..=ROBOTS {
        let expected = format!(
            "{} lladdr {}",
            Lan::robot_ip(i),
            mac_text(Lan::robot_mac(i))
        );
        assert!(
            neighbours
                .lines()
                .any(|l| l.starts_with(&format!("{expected} "))),
            "no `{expected}` in the controller's neighbours:\n{neighbours}"
        );
    }

    // No IPv6 chatter: no host and no switch port has an IPv6 address.
    for ns in [
        lan.ctl().to_string(),
        lan.robot(1),
        lan.robot(ROBOTS),
        lan.switch(),
    ] {
        let mut ip = lan.command(&ns, "ip");
        ip.args(["-6", "-o", "addr", "show", "scope", "link"]);
        let v6 = String::from_utf8(output_within(ip, secs(10)).stdout).expect("utf-8");
        assert!(
            v6.trim().is_empty(),
            "{ns} has IPv6 link-local addresses:\n{v6}"
        );
    }
}

#[test]
fn broadcasts_from_the_controller_reach_every_robot() {
    if !lan_tests_enabled() {
        return;
    }
    const ROBOTS: usize = 20;
    let lan = Lan::build(ROBOTS).expect("build the LAN");

    // Each robot listens on a tokio socket of its own namespace and reports
    // the first two datagrams it gets.
    let (ready_tx, ready_rx) = mpsc::channel();
    let robots: Vec<_> = (1..=ROBOTS)
        .map(|i| {
            let ready = ready_tx.clone();
            lan.spawn_in(&lan.robot(i), move || async move {
                let socket = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, PORT))
                    .await
                    .expect("bind");
                ready.send(i).expect("report readiness");
                let mut got = Vec::new();
                let mut buf = [0u8; 64];
                for _ in 0..2 {
                    match tokio::time::timeout(secs(10), socket.recv_from(&mut buf)).await {
                        Ok(Ok((n, from))) => got.push((buf[..n].to_vec(), from)),
                        Ok(Err(e)) => panic!("robot {i}: recv failed: {e}"),
                        Err(_) => break,
                    }
                }
                got
            })
        })
        .collect();
    for _ in 0..ROBOTS {
        ready_rx
            .recv_timeout(secs(10))
            .expect("every robot binds its socket");
    }

    lan.in_namespace(lan.ctl(), || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        socket.set_broadcast(true).expect("SO_BROADCAST");
        socket
            .send_to(b"subnet", (Ipv4Addr::new(10, 88, 0, 255), PORT))
            .expect("send to the subnet's broadcast address");
        // Only inside the namespace: its default route is the LAN's eth0.
        socket
            .send_to(b"limited", (Ipv4Addr::BROADCAST, PORT))
            .expect("send to 255.255.255.255");
    });

    for (index, robot) in robots.into_iter().enumerate() {
        let i = index + 1;
        let got = robot.join().expect("the robot thread ends");
        let payloads: Vec<&[u8]> = got.iter().map(|(data, _)| data.as_slice()).collect();
        assert_eq!(
            payloads,
            [b"subnet".as_slice(), b"limited".as_slice()],
            "robot {i} received both broadcasts"
        );
        for (_, from) in &got {
            assert_eq!(
                from.ip(),
                Lan::ctl_ip(),
                "robot {i}: sent by the controller"
            );
        }
    }
}

#[test]
fn a_full_subnet_builds_and_tears_down_without_leftovers() {
    if !lan_tests_enabled() {
        return;
    }
    let started = Instant::now();
    let lan = Lan::build(253).expect("build the LAN");
    let built = started.elapsed();
    let prefix = prefix_of(&lan);
    assert_eq!(
        namespaces_with_prefix(&prefix).len(),
        255,
        "switch, controller and 253 robots"
    );

    // The last robot is there: a closed port answers with a refusal (after
    // ARP found it), not a timeout or "no route".
    let refused = lan.in_namespace(lan.ctl(), || {
        connect(SocketAddr::from((Lan::robot_ip(253), 9)), secs(5)).map(drop)
    });
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionRefused),
        "robot 253 (10.88.0.254) refuses a closed port"
    );

    // A process left running in a namespace is killed by the teardown.
    let mut sleeper = sleeper_in(&lan, 253);

    let started = Instant::now();
    drop(lan);
    let torn_down = started.elapsed();
    eprintln!("253 robots: built in {built:?}, torn down in {torn_down:?}");
    assert_eq!(namespaces_with_prefix(&prefix), Vec::<String>::new());
    let status = wait_exit(&mut sleeper, secs(10)).expect("the process in robot 253 is killed");
    assert!(!status.success(), "killed, not finished: {status}");
}

#[test]
fn a_panicking_test_still_tears_its_lan_down() {
    if !lan_tests_enabled() {
        return;
    }
    let prefix = Mutex::new(None);
    let sleeper: Mutex<Option<Child>> = Mutex::new(None);
    let outcome = std::panic::catch_unwind(|| {
        let lan = Lan::build(3).expect("build the LAN");
        *prefix.lock().expect("lock") = Some(prefix_of(&lan));
        let child = sleeper_in(&lan, 2);
        *sleeper.lock().expect("lock") = Some(child);
        panic!("a test fails while its LAN is up");
    });
    assert!(outcome.is_err(), "the closure panicked");
    let prefix = prefix
        .into_inner()
        .expect("lock")
        .expect("the LAN was built");
    assert_eq!(namespaces_with_prefix(&prefix), Vec::<String>::new());
    let mut child = sleeper
        .into_inner()
        .expect("lock")
        .expect("sleep was started");
    let status = wait_exit(&mut child, secs(10)).expect("the process in robot 2 is killed");
    assert!(!status.success(), "killed, not finished: {status}");
}

/// A fresh ed25519 client key pair in `dir`: (private key path, public key).
fn client_key(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let key = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiwi-lan-test", "-f"])
        .arg(&key)
        .stdin(Stdio::null())
        .status()
        .expect("run ssh-keygen");
    assert!(status.success(), "ssh-keygen failed");
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("read the public key");
    (key, public)
}

/// `ssh` from the controller namespace to `root@ip`, running `remote`.
fn ssh(lan: &Lan, key: &Path, ip: Ipv4Addr, remote: &str) -> Output {
    let mut ssh = lan.command(lan.ctl(), "ssh");
    ssh.args(["-F", "/dev/null", "-i"])
        .arg(key)
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg(format!("root@{ip}"))
        .arg(remote);
    output_within(ssh, secs(20))
}

/// The SHA256 fingerprint of the ed25519 host key `ip`:22 shows the
/// controller namespace (`ssh-keyscan`, then `ssh-keygen -lf -`).
fn scanned_fingerprint(lan: &Lan, ip: Ipv4Addr) -> String {
    let mut keyscan = lan.command(lan.ctl(), "ssh-keyscan");
    keyscan
        .args(["-T", "5", "-t", "ed25519"])
        .arg(ip.to_string());
    let scanned = output_within(keyscan, secs(20));
    let mut keygen = Command::new("ssh-keygen")
        .args(["-lf", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run ssh-keygen");
    keygen
        .stdin
        .take()
        .expect("stdin")
        .write_all(&scanned.stdout)
        .expect("feed ssh-keygen");
    let listed = keygen.wait_with_output().expect("ssh-keygen ends");
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    listed
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no fingerprint for {ip}'s scanned key: {listed:?}"))
        .to_string()
}

#[test]
fn a_legacy_robot_accepts_a_key_login_from_the_controller_namespace() {
    if !lan_tests_enabled() {
        return;
    }
    let keys = tempfile::tempdir().expect("a directory for the client keys");
    let (key, public) = client_key(keys.path(), "id_ed25519");
    let (other_key, _) = client_key(keys.path(), "other");
    let lan = Lan::build(3).expect("build the LAN");
    let started = Instant::now();
    let lekiwi = lan
        .legacy_robot(1, LegacyKind::LeKiwi, &public)
        .expect("start a LeKiwi");
    let mut xlerobot = lan
        .legacy_robot(2, LegacyKind::Xlerobot, &public)
        .expect("start an XLERobot");
    eprintln!("two legacy robots up in {:?}", started.elapsed());
    assert_ne!(lekiwi.serial, xlerobot.serial);
    assert_ne!(lekiwi.host_key_fingerprint, xlerobot.host_key_fingerprint);

    for robot in [&lekiwi, &xlerobot] {
        let started = Instant::now();
        let output = ssh(
            &lan,
            &key,
            robot.ip,
            "cat /run/kiwi-robot/etc/hostname; hostname; \
             sed -n 's/^Serial[[:space:]]*: //p' /run/kiwi-robot/proc/cpuinfo; \
             ls /run/kiwi-robot/dev",
        );
        let took = started.elapsed();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "ssh to {} failed ({}): {}\nsshd's log:\n{}",
            robot.ip,
            output.status,
            String::from_utf8_lossy(&output.stderr),
            robot.log()
        );
        let lines: Vec<&str> = stdout.lines().collect();
        let devices = match robot.kind {
            LegacyKind::LeKiwi => vec!["ttyACM0"],
            LegacyKind::Xlerobot => vec!["ttyACM0", "ttyACM1"],
        };
        let mut expected = vec![
            robot.hostname.as_str(),
            robot.hostname.as_str(),
            robot.serial.as_str(),
        ];
        expected.extend(devices);
        assert_eq!(lines, expected, "what {:?} says about itself", robot.kind);
        eprintln!("ssh login + command on {} took {took:?}", robot.ip);

        // The host key it shows is the one it reports.
        assert_eq!(
            scanned_fingerprint(&lan, robot.ip),
            robot.host_key_fingerprint
        );

        // Key-only: another key is refused.
        let refused = ssh(&lan, &other_key, robot.ip, "true");
        assert!(!refused.status.success(), "a foreign key logs in");
    }

    let output = ssh(
        &lan,
        &key,
        xlerobot.ip,
        "cat /run/kiwi-robot/sys/bus/usb/devices/2-1/idVendor",
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "8086");

    // A new host key (a re-flashed robot or an impostor) is what it shows.
    let old = xlerobot.host_key_fingerprint.clone();
    xlerobot
        .replace_host_key(&lan)
        .expect("restart with a new host key");
    assert_ne!(xlerobot.host_key_fingerprint, old);
    assert_eq!(
        scanned_fingerprint(&lan, xlerobot.ip),
        xlerobot.host_key_fingerprint
    );

    // None of it reached the host.
    assert!(
        !Path::new("/run/kiwi-robot").exists(),
        "the host's /run is untouched"
    );

    // Dropping the robot stops its sshd.
    let ip = lekiwi.ip;
    drop(lekiwi);
    let deadline = Instant::now() + secs(10);
    lan.in_namespace(lan.ctl(), || {
        loop {
            match connect(SocketAddr::from((ip, 22)), secs(2)) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
                other if Instant::now() >= deadline => {
                    panic!("sshd on {ip} still answers after the drop: {other:?}")
                }
                _ => std::thread::sleep(POLL_INTERVAL),
            }
        }
    });
}

#[test]
fn full_loss_cuts_a_robot_off_and_no_loss_restores_it() {
    if !lan_tests_enabled() {
        return;
    }
    let lan = Lan::build(2).expect("build the LAN");
    let _listener = listen_on_robot(&lan, 1);
    let addr = SocketAddr::from((Lan::robot_ip(1), PORT));
    let reach =
        |timeout: Duration| lan.in_namespace(lan.ctl(), || connect(addr, timeout).map(drop));

    reach(secs(5)).expect("robot 1 answers before any loss");

    lan.set_loss(5.0).expect("5 % loss");
    let mut nft = lan.command(&lan.switch(), "nft");
    nft.args(["list", "table", "bridge", "kiwi_loss"]);
    let rules = String::from_utf8(output_within(nft, secs(10)).stdout).expect("utf-8");
    assert_eq!(
        rules.matches("numgen random mod 10000 < 500").count(),
        2,
        "one rule per direction:\n{rules}"
    );

    lan.set_loss(100.0).expect("100 % loss");
    let cut = reach(secs(1));
    assert!(cut.is_err(), "robot 1 still answers at 100 % loss");

    lan.set_loss(0.0).expect("no loss");
    let deadline = Instant::now() + secs(15);
    loop {
        match reach(secs(1)) {
            Ok(()) => break,
            Err(e) if Instant::now() >= deadline => {
                panic!("robot 1 does not answer again after the loss was removed: {e}")
            }
            Err(_) => {}
        }
    }
}

/// `samples` TCP connect round trips from the controller namespace to
/// `listener` (on robot 1), each connection accepted and closed before
/// the next; sorted.
fn connect_round_trips(lan: &Lan, listener: &TcpListener, samples: usize) -> Vec<Duration> {
    let addr = SocketAddr::from((Lan::robot_ip(1), PORT));
    let mut round_trips = lan.in_namespace(lan.ctl(), || {
        (0..samples)
            .map(|_| {
                let started = Instant::now();
                let stream = connect(addr, secs(5))
                    .unwrap_or_else(|e| panic!("robot 1 ({addr}) does not answer: {e}"));
                let took = started.elapsed();
                drop(accept_within(listener, secs(5)));
                drop(stream);
                took
            })
            .collect::<Vec<_>>()
    });
    round_trips.sort();
    round_trips
}

#[test]
fn a_delay_slows_a_robot_down_and_its_guard_restores_it() {
    if !lan_tests_enabled() {
        return;
    }
    const SAMPLES: usize = 21;
    let delay = Duration::from_millis(50);
    let jitter = Duration::from_millis(10);
    let lan = Lan::build(2).expect("build the LAN");
    let listener = listen_on_robot(&lan, 1);

    let guard = lan
        .set_delay(1, delay, jitter)
        .expect("delay robot 1's traffic");
    let mut iptables = lan.command(&lan.robot(1), "iptables");
    iptables.arg("-S");
    let rules = String::from_utf8(output_within(iptables, secs(10)).stdout).expect("utf-8");
    assert_eq!(
        rules.matches("-j NFQUEUE").count(),
        2,
        "one rule per direction:\n{rules}"
    );
    let delayed = connect_round_trips(&lan, &listener, SAMPLES);
    let median = delayed[SAMPLES / 2];
    eprintln!(
        "connect round trips with {delay:?} ± {jitter:?} each way: min {:?}, median {median:?}, max {:?}",
        delayed[0],
        delayed[SAMPLES - 1]
    );
    assert!(
        median >= Duration::from_millis(40),
        "median round trip {median:?} with a {delay:?} delay: {delayed:?}"
    );
    // The SYN (in) and the SYN-ACK (out) are each held at least
    // `delay - jitter`: a lower bound, whatever the machine's load.
    assert!(
        delayed[0] >= 2 * (delay - jitter),
        "a round trip took {:?}, less than two one-way delays: {delayed:?}",
        delayed[0]
    );

    drop(guard);
    let mut iptables = lan.command(&lan.robot(1), "iptables");
    iptables.arg("-S");
    let rules = String::from_utf8(output_within(iptables, secs(10)).stdout).expect("utf-8");
    assert!(!rules.contains("NFQUEUE"), "rules left behind:\n{rules}");
    let restored = connect_round_trips(&lan, &listener, SAMPLES);
    let median = restored[SAMPLES / 2];
    eprintln!(
        "connect round trips after the guard dropped: min {:?}, median {median:?}, max {:?}",
        restored[0],
        restored[SAMPLES - 1]
    );
    assert!(
        median < Duration::from_millis(10),
        "median round trip {median:?} after the delay was removed: {restored:?}"
    );
}
