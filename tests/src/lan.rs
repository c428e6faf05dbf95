//! A simulated robot LAN built from network namespaces, for the discovery
//! tests: a switch namespace holding a bridge, a controller namespace and up
//! to 253 robot namespaces, each host joined to the switch by a veth pair.
//!
//! ```text
//! netns <prefix>ctl            netns <prefix>sw                  netns <prefix>r<i>
//! eth0 10.88.0.1/24 <--veth--> c0 ─┐
//!                                  br0 (no IP, stp off,
//!                     r1..rN ──────┘  mcast_snooping 0,  <--veth--> eth0 10.88.0.(i+1)/24
//!                                     IGMP dropped)                 MAC 02:88:00:00:00:(i+1)
//! ```
//!
//! The subnet exists only inside these namespaces: nothing is created in
//! the root namespace except the names under `/run/netns`, and every
//! broadcast, multicast, ARP request or sweep a test makes stays on this
//! bridge. Each host has `default dev eth0` (so 255.255.255.255 and
//! multicast have a way out) and no IPv6 addresses (`addrgenmode none`),
//! and the bridge drops IGMP: without that, the chatter of a few hundred
//! hosts overflows the kernel's backlog and real ARP replies get lost.
//!
//! Names carry a prefix unique to the run, `kw<pid in hex>x<counter>-`, so
//! parallel test processes do not collide (the subnet is the same in each
//! LAN; they cannot see each other). [`Lan`]'s `Drop` kills every process
//! in its namespaces and deletes them, also when the test panics; a LAN
//! left behind by a test process that was killed is removed by the next
//! [`Lan::build`] (its owner's pid is in the prefix).
//!
//! Code runs inside a namespace on a thread of its own
//! ([`Lan::in_namespace`], [`Lan::spawn_in`]): a network namespace belongs
//! to a thread, and sockets stay in the namespace where they were created.
//! Programs run inside one through [`Lan::command`].
//!
//! [`Lan::legacy_robot`] starts a real OpenSSH server in a robot namespace,
//! posing as a robot without the kiwi agent (see [`LegacyRobot`]).
//!
//! Wi-Fi-like conditions: [`Lan::set_loss`] drops frames at the switch;
//! [`Lan::set_delay`] delays a robot's packets through NFQUEUE and the
//! `kiwi-netdelay` program (this kernel has no `tc netem`).
//!
//! Creating namespaces needs root; every LAN test starts with
//! `if !lan_tests_enabled() { return; }` (see [`lan_tests_enabled`]).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nix::net::if_::InterfaceFlags;
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use kiwi_controller::testing::sshd::{RobotSpec, SshdFixture};

use crate::POLL_INTERVAL;
use crate::process::{Proc, log_tail, report_log_on_panic};

/// The environment variable that lets a non-root run skip the LAN tests.
pub const OPT_OUT_VAR: &str = "KIWI_LAN_TESTS";

/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// The first characters of every namespace name this harness makes.
const NAME_TAG: &str = "kw";

/// The most robots a /24 holds next to the controller (.1) and broadcast.
pub const MAX_ROBOTS: usize = 253;

/// How many `ip` processes configure namespaces at the same time.
const PARALLEL_IP: usize = 32;

/// How long the links of a new LAN may take to come up.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a legacy robot's sshd may take to listen.
const SSHD_START_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether the LAN tests can run here: `true` as root. Otherwise they
/// cannot, and this panics (a test that needs the LAN must not pass
/// silently) unless `KIWI_LAN_TESTS=skip` is set, in which case it says so
/// on stderr and returns `false`.
pub fn lan_tests_enabled() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var(OPT_OUT_VAR).is_ok_and(|v| v.trim() == "skip") {
        // Straight to stderr, not through `eprintln!`, which the test
        // harness captures and hides for a test that passes.
        let _ = writeln!(
            std::io::stderr(),
            "kiwi-tests: SKIPPED a LAN test (not root, and {OPT_OUT_VAR}=skip): \
             it needs root for network namespaces"
        );
        return false;
    }
    panic!(
        "the LAN tests need root: they build a simulated robot LAN from network namespaces \
         (`ip netns add`, veths, a bridge, nftables, sshd). Run them as root, or set \
         {OPT_OUT_VAR}=skip to skip them (they then print that they were skipped)"
    );
}

/// A simulated LAN: switch, controller and `robots` robot namespaces.
/// Dropping it kills every process in its namespaces and deletes them.
#[derive(Debug)]
pub struct Lan {
    /// `kw<pid hex>x<counter>-`.
    prefix: String,
    /// `<prefix>ctl`.
    ctl: String,
    robots: usize,
}

impl Lan {
    /// Builds a LAN with `robots` robot hosts (1 to 253), after removing the
    /// leftovers of dead test processes. Takes about a second for 253.
    pub fn build(robots: usize) -> anyhow::Result<Lan> {
        ensure!(
            (1..=MAX_ROBOTS).contains(&robots),
            "a LAN holds 1 to {MAX_ROBOTS} robots, not {robots}"
        );
        remove_leftovers();
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NAME_TAG}{:x}x{seq}-", std::process::id());
        let lan = Lan {
            ctl: format!("{prefix}ctl"),
            prefix,
            robots,
        };
        // From here on, a failure drops `lan`, which removes what exists.
        lan.create().context("cannot build the simulated LAN")?;
        Ok(lan)
    }

    /// The namespace of the controller host (`eth0`, 10.88.0.1).
    pub fn ctl(&self) -> &str {
        &self.ctl
    }

    /// The namespace of robot `i` (1-based).
    pub fn robot(&self, i: usize) -> String {
        assert!(
            (1..=self.robots).contains(&i),
            "robot {i} does not exist: this LAN has robots 1 to {}",
            self.robots
        );
        format!("{}r{i}", self.prefix)
    }

    /// The namespace of the switch (bridge `br0`, ports `c0` and `r<i>`).
    pub fn switch(&self) -> String {
        format!("{}sw", self.prefix)
    }

    /// How many robot hosts this LAN has.
    pub fn robots(&self) -> usize {
        self.robots
    }

    /// The controller's address, 10.88.0.1.
    pub fn ctl_ip() -> Ipv4Addr {
        Ipv4Addr::new(10, 88, 0, 1)
    }

    /// Robot `i`'s address, 10.88.0.(i+1).
    pub fn robot_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 88, 0, host_octet(i))
    }

    /// Robot `i`'s MAC address, 02:88:00:00:00:(i+1).
    pub fn robot_mac(i: usize) -> [u8; 6] {
        [0x02, 0x88, 0, 0, 0, host_octet(i)]
    }

    /// `ip netns exec <ns> <program>`: a command that runs inside namespace
    /// `ns` (one of this LAN's), with a private mount namespace.
    pub fn command(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        self.check_ns(ns);
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).arg(program);
        command
    }

    /// Runs `f` on a thread that has entered namespace `ns`, and returns its
    /// value (a panic in `f` is passed on). Sockets `f` creates stay in `ns`
    /// and may be returned and used from any thread.
    pub fn in_namespace<T: Send>(&self, ns: &str, f: impl FnOnce() -> T + Send) -> T {
        self.check_ns(ns);
        let path = netns_path(ns);
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name(format!("netns {ns}"))
                .spawn_scoped(scope, move || {
                    enter_namespace(&path);
                    f()
                })
                .expect("spawn a thread");
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Starts a thread that enters namespace `ns` and runs the future made
    /// by `fut` on a current-thread tokio runtime of its own. Make the
    /// future end (e.g. with a cancellation token) before the LAN drops:
    /// a thread still inside a namespace keeps it alive.
    pub fn spawn_in<F>(
        &self,
        ns: &str,
        fut: impl FnOnce() -> F + Send + 'static,
    ) -> JoinHandle<F::Output>
    where
        F: Future,
        F::Output: Send + 'static,
    {
        self.check_ns(ns);
        let path = netns_path(ns);
        std::thread::Builder::new()
            .name(format!("netns {ns}"))
            .spawn(move || {
                enter_namespace(&path);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build a current-thread tokio runtime");
                runtime.block_on(fut())
            })
            .expect("spawn a thread")
    }

    /// Makes every robot's link lossy, like Wi-Fi: the switch drops each
    /// frame entering or leaving a robot port (`r<i>`) with probability
    /// `percent` / 100 (nftables, bridge family, `numgen random`). A frame
    /// between the controller and a robot crosses one robot port, so it is
    /// lost with exactly that probability; the controller's own port stays
    /// clean. ARP is dropped too. Replaces the previous setting; `0.0`
    /// removes the loss.
    pub fn set_loss(&self, percent: f64) -> anyhow::Result<()> {
        ensure!(
            (0.0..=100.0).contains(&percent),
            "loss must be between 0 and 100 percent, not {percent}"
        );
        // Parts per 10,000, the resolution of the rule.
        let parts = (percent * 100.0).round() as u32;
        let mut script = String::from("table bridge kiwi_loss\ndelete table bridge kiwi_loss\n");
        if parts > 0 {
            let condition = if parts >= 10_000 {
                String::new()
            } else {
                format!("numgen random mod 10000 < {parts} ")
            };
            write!(
                script,
                "table bridge kiwi_loss {{\n  chain forward {{\n    \
                 type filter hook forward priority -5; policy accept;\n    \
                 iifname \"r*\" {condition}counter drop\n    \
                 oifname \"r*\" {condition}counter drop\n  }}\n}}\n"
            )
            .expect("write to a String");
        }
        self.nft(&script)
            .with_context(|| format!("cannot set the loss to {percent}%"))
    }

    /// Plugs robot `robot`'s link in or out: its `eth0` goes up or down
    /// (`ip link set`), as a cable pulled or a robot out of Wi-Fi range.
    /// While it is down nothing leaves or reaches the robot; its address
    /// stays, so programs on it carry on once it is up again.
    pub fn set_link(&self, robot: usize, up: bool) -> anyhow::Result<()> {
        let state = if up { "up" } else { "down" };
        let status = self
            .command(&self.robot(robot), "ip")
            .args(["link", "set", "eth0", state])
            .stdin(Stdio::null())
            .status()
            .context("cannot run ip")?;
        ensure!(
            status.success(),
            "ip link set eth0 {state} in robot {robot}: {status}"
        );
        Ok(())
    }

    /// Gives the host in namespace `ns` (one of this LAN's robots) the
    /// address `to` instead of `from`, as a new DHCP lease would: `eth0`
    /// keeps its MAC, and programs bound to `from` stop working (restart
    /// them). `to` must be a host address of 10.88.0.0/24 above those the
    /// LAN's hosts start with (10.88.0.(robots + 2) and up), so that it is
    /// unused unless a test already moved a host there.
    pub fn change_address(&self, ns: &str, from: Ipv4Addr, to: Ipv4Addr) -> anyhow::Result<()> {
        let [a, b, c, d] = to.octets();
        ensure!(
            [a, b, c] == [10, 88, 0] && usize::from(d) > self.robots + 1 && d < 255,
            "{to} is not a free host address of this LAN (10.88.0.{}-254)",
            self.robots + 2
        );
        let mut command = self.command(ns, "ip");
        command.args(["-batch", "-"]);
        // The old address goes first: deleting a primary address also
        // deletes the secondaries of its subnet.
        run_with_stdin(
            command,
            &format!(
                "addr del {from}/24 dev eth0
                 addr add {to}/24 brd + dev eth0
                 route replace default dev eth0
"
            ),
        )
        .with_context(|| format!("cannot move {ns} from {from} to {to}"))
    }

    /// Starts a legacy robot on host `i`: a real OpenSSH server on
    /// 10.88.0.(i+1):22 that lets `root` in with the key `authorized_key`
    /// (a public key line), with the robot's identifying files under
    /// `/run/kiwi-robot/` (see [`LegacyRobot`]). Its serial, host name and
    /// machine id are those of `RobotSpec::numbered(kind, i)`. Returns
    /// once sshd accepts connections.
    pub fn legacy_robot(
        &self,
        i: usize,
        kind: LegacyKind,
        authorized_key: &str,
    ) -> anyhow::Result<LegacyRobot> {
        let ns = self.robot(i);
        let number = u32::try_from(i).expect("at most 253");
        let fixture = SshdFixture::new(
            RobotSpec::numbered(kind, number),
            SocketAddr::from((Self::robot_ip(i), 22)),
            authorized_key,
        )
        .with_context(|| format!("cannot prepare the sshd of robot {i}"))?;
        let mut robot = LegacyRobot {
            host_key_fingerprint: fixture.host_key_fingerprint().to_string(),
            serial: fixture.spec().serial.clone(),
            hostname: fixture.spec().hostname.clone(),
            machine_id: fixture.spec().machine_id.clone(),
            kind,
            ip: Self::robot_ip(i),
            ns,
            log: fixture.dir().join("sshd.log"),
            sshd: None,
            fixture,
        };
        robot.start(self)?;
        Ok(robot)
    }

    /// Panics unless `ns` is one of this LAN's namespaces: code and traffic
    /// of the tests stay inside them.
    fn check_ns(&self, ns: &str) {
        assert!(
            ns.starts_with(&self.prefix) && Path::new(NETNS_DIR).join(ns).exists(),
            "{ns} is not a namespace of this LAN (prefix {})",
            self.prefix
        );
    }

    /// Every namespace of this LAN, switch first.
    fn namespaces(&self) -> Vec<String> {
        let mut names = vec![self.switch(), self.ctl().to_string()];
        names.extend((1..=self.robots).map(|i| format!("{}r{i}", self.prefix)));
        names
    }

    fn create(&self) -> anyhow::Result<()> {
        let sw = self.switch();
        let ctl = self.ctl().to_string();
        // One `ip` for the namespaces and the veths, each end created
        // directly in its final namespace (named and addressed there).
        let mut script = String::new();
        for ns in self.namespaces() {
            writeln!(script, "netns add {ns}").expect("write to a String");
        }
        writeln!(
            script,
            "link add name eth0 netns {ctl} address 02:88:00:00:00:01 type veth peer name c0 netns {sw}"
        )
        .expect("write to a String");
        for i in 1..=self.robots {
            writeln!(
                script,
                "link add name eth0 netns {p}r{i} address {mac} type veth peer name r{i} netns {sw}",
                p = self.prefix,
                mac = format_mac(Self::robot_mac(i)),
            )
            .expect("write to a String");
        }
        ip_batch(&[], &script).context("cannot create the namespaces and veths")?;

        // Then one `ip -n NS` per namespace for what has to be done inside
        // it (address generation can only be switched off there, and before
        // the link goes up).
        let mut switch = String::from(
            "link set lo up\n\
             link add name br0 type bridge stp_state 0 mcast_snooping 0\n\
             link set br0 addrgenmode none\n\
             link set br0 up\n",
        );
        let ports =
            std::iter::once("c0".to_string()).chain((1..=self.robots).map(|i| format!("r{i}")));
        for port in ports {
            writeln!(
                switch,
                "link set {port} addrgenmode none\nlink set {port} master br0 up"
            )
            .expect("write to a String");
        }
        let mut jobs = vec![(sw.clone(), switch), (ctl, host_script(Self::ctl_ip()))];
        jobs.extend((1..=self.robots).map(|i| (self.robot(i), host_script(Self::robot_ip(i)))));
        for chunk in jobs.chunks(PARALLEL_IP) {
            let children = chunk
                .iter()
                .map(|(ns, script)| spawn_ip_batch(&["-n", ns], script))
                .collect::<anyhow::Result<Vec<_>>>()?;
            for ((ns, _), child) in chunk.iter().zip(children) {
                finish_ip_batch(child).with_context(|| format!("cannot configure {ns}"))?;
            }
        }

        self.nft(
            "table bridge kiwi_lan {\n  chain forward {\n    \
             type filter hook forward priority -10; policy accept;\n    \
             ip protocol igmp drop\n  }\n}\n",
        )
        .context("cannot install the switch's IGMP filter")?;
        self.wait_until_up()
    }

    /// Waits until every link carries traffic. The kernel applies carrier
    /// changes later, in a global work item that is rate-limited (about
    /// once a second when busy, e.g. while another test builds its LAN):
    /// until then a host's `eth0` has no working queue and a bridge port
    /// does not forward, so a first broadcast would vanish.
    fn wait_until_up(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + LINK_UP_TIMEOUT;
        let mut hosts = vec![self.ctl().to_string()];
        hosts.extend((1..=self.robots).map(|i| self.robot(i)));
        loop {
            hosts = hosts_without_carrier(hosts);
            if hosts.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "eth0 of {} host(s) has no carrier after {LINK_UP_TIMEOUT:?}, e.g. in {}",
                    hosts.len(),
                    hosts[0]
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        let ports = self.robots + 1;
        loop {
            let output = Command::new("bridge")
                .args(["-n", &self.switch(), "-o", "link", "show"])
                .stdin(Stdio::null())
                .output()
                .context("cannot run bridge (iproute2)")?;
            let listing = String::from_utf8_lossy(&output.stdout);
            let forwarding = listing
                .lines()
                .filter(|l| l.contains("master br0") && l.contains("state forwarding"))
                .count();
            if forwarding == ports {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{forwarding} of {ports} switch ports forward after {LINK_UP_TIMEOUT:?}:\n{listing}"
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Runs an nftables script in the switch namespace.
    fn nft(&self, script: &str) -> anyhow::Result<()> {
        let mut command = self.command(&self.switch(), "nft");
        command.args(["-f", "-"]);
        run_with_stdin(command, script)
    }

    fn teardown(&self) {
        remove_namespaces(&self.namespaces());
    }

    /// Delays robot `robot`'s traffic like a Wi-Fi link: every IPv4 packet
    /// that leaves or enters its `eth0` is held for `delay` plus a uniform
    /// jitter in `[-jitter, +jitter]`, so a round trip between the robot
    /// and another host takes about twice `delay`. Packets of one flow
    /// keep their order; different flows may be reordered. ARP is not
    /// delayed. `jitter` must not exceed `delay`.
    ///
    /// The `kiwi-netdelay` program (found like the other binaries, see
    /// [`crate::process::binary`]) binds NFQUEUE queue 0 in the robot's
    /// namespace, then iptables rules in its OUTPUT and INPUT chains send
    /// `eth0`'s packets there, with `--queue-bypass`: if the program dies,
    /// packets pass undelayed. One delay per robot at a time (a second
    /// cannot bind the queue); dropping the [`DelayGuard`] removes the
    /// rules and stops the program.
    pub fn set_delay(
        &self,
        robot: usize,
        delay: Duration,
        jitter: Duration,
    ) -> anyhow::Result<DelayGuard> {
        ensure!(
            jitter <= delay,
            "the jitter ({jitter:?}) must not exceed the delay ({delay:?})"
        );
        let ns = self.robot(robot);
        let dir = tempfile::Builder::new()
            .prefix("kiwi-netdelay-")
            .tempdir()
            .context("cannot make a directory for kiwi-netdelay's log")?;
        let log = dir.path().join("kiwi-netdelay.log");
        let millis = |d: Duration| format!("{}", d.as_secs_f64() * 1000.0);
        let mut command = self.command(&ns, crate::process::binary("kiwi-netdelay"));
        command
            .args(["--queue", &DELAY_QUEUE.to_string()])
            .args(["--delay", &millis(delay)])
            .args(["--jitter", &millis(jitter)]);
        let program = Proc::spawn(&format!("kiwi-netdelay in {ns}"), command, &log);
        // From here on, a failure drops the guard, which undoes the rest.
        let mut guard = DelayGuard {
            ns,
            rules: Vec::new(),
            program: Some(program),
            log,
            _dir: dir,
        };
        guard.wait_until_bound()?;
        for rule in delay_rules() {
            iptables(&guard.ns, "-I", &rule)
                .with_context(|| format!("cannot add the delay rule in {}", guard.ns))?;
            guard.rules.push(rule);
        }
        Ok(guard)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// The NFQUEUE queue number the delay uses (queues are per namespace).
const DELAY_QUEUE: u16 = 0;

/// How long `kiwi-netdelay` may take to bind its queue.
const NETDELAY_START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `kiwi-netdelay` may take to release what it holds and exit.
const NETDELAY_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The iptables rules (chain first) that send a robot's `eth0` traffic to
/// the delay queue.
fn delay_rules() -> [Vec<String>; 2] {
    let rule = |chain: &str, direction: &str| {
        [chain, direction, "eth0", "-j", "NFQUEUE", "--queue-num"]
            .into_iter()
            .map(str::to_string)
            .chain([DELAY_QUEUE.to_string(), "--queue-bypass".to_string()])
            .collect()
    };
    [rule("OUTPUT", "-o"), rule("INPUT", "-i")]
}

/// `iptables -w <op> <rule>` in namespace `ns` (iptables-nft or legacy,
/// whichever `iptables` is here; both have NFQUEUE).
fn iptables(ns: &str, op: &str, rule: &[String]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(["netns", "exec", ns, "iptables", "-w", op])
        .args(rule)
        .stdin(Stdio::null())
        .output()
        .context("cannot run iptables")?;
    ensure!(
        output.status.success(),
        "iptables {op} {} failed ({}): {}",
        rule.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// A robot's delay (see [`Lan::set_delay`]). Dropping it removes the
/// iptables rules, then stops `kiwi-netdelay` with SIGTERM (it releases
/// the packets it holds first), or SIGKILL if it does not exit in time.
#[derive(Debug)]
pub struct DelayGuard {
    /// The robot's namespace.
    ns: String,
    /// The rules installed so far.
    rules: Vec<Vec<String>>,
    /// `None` once stopped.
    program: Option<Proc>,
    log: PathBuf,
    /// Holds the log; removed on drop.
    _dir: tempfile::TempDir,
}

impl DelayGuard {
    /// What `kiwi-netdelay` logged so far.
    pub fn log(&self) -> String {
        log_tail(&self.log, usize::MAX)
    }

    /// Waits until `kiwi-netdelay` says it has bound its queue: only then
    /// may the rules go in, or packets would bypass it.
    fn wait_until_bound(&mut self) -> anyhow::Result<()> {
        let ready = format!("kiwi-netdelay: queue {DELAY_QUEUE} bound");
        let deadline = Instant::now() + NETDELAY_START_TIMEOUT;
        let program = self.program.as_mut().expect("started");
        loop {
            if fs::read_to_string(&self.log).is_ok_and(|log| log.contains(&ready)) {
                return Ok(());
            }
            if let Some(status) = program.exit_status() {
                bail!(
                    "kiwi-netdelay in {} exited ({status}):\n{}",
                    self.ns,
                    log_tail(&self.log, 20)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "kiwi-netdelay in {} did not bind its queue within {NETDELAY_START_TIMEOUT:?}:\n{}",
                    self.ns,
                    log_tail(&self.log, 20)
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for DelayGuard {
    fn drop(&mut self) {
        report_log_on_panic(&format!("kiwi-netdelay in {}", self.ns), &self.log);
        // A LAN dropped first took the namespace, its rules and the
        // program with it.
        if netns_path(&self.ns).exists() {
            for rule in std::mem::take(&mut self.rules) {
                if let Err(e) = iptables(&self.ns, "-D", &rule) {
                    eprintln!("kiwi-tests: {e:#}");
                }
            }
        }
        let Some(mut program) = self.program.take() else {
            return;
        };
        program.signal(libc::SIGTERM);
        let deadline = Instant::now() + NETDELAY_STOP_TIMEOUT;
        while program.exit_status().is_none() && Instant::now() < deadline {
            std::thread::sleep(POLL_INTERVAL);
        }
        // Dropping `program` kills it if it is still there.
    }
}

/// What a legacy robot is, which decides its devices (one servo bus for
/// a LeKiwi; two and a RealSense camera for an XLERobot). The SSH
/// fixture's robot kind.
pub use kiwi_controller::testing::sshd::RobotKind as LegacyKind;

/// A robot without the kiwi agent, reachable by SSH: a real `sshd` on
/// 10.88.0.(i+1):22 in robot namespace i, with its own host name (UTS
/// namespace), a throwaway ed25519 host key and key-only login for `root`.
///
/// In sshd's private mount namespace, a directory of the robot's own is
/// bound over `/run` and an empty one over root's home. The robot's
/// identifying files are under `/run/kiwi-robot/`, laid out as a system
/// root (what the agent's `--sys-root` reads): `proc/cpuinfo` (with
/// `Serial` and `Model`), `proc/device-tree/{serial-number,model}`,
/// `etc/{machine-id,hostname,os-release}`, `dev/ttyACM0` (and `ttyACM1`
/// and `sys/bus/usb/devices/2-1/` with a RealSense camera for an
/// XLERobot).
///
/// Dropping it stops sshd; the LAN's teardown ends any session left.
#[derive(Debug)]
pub struct LegacyRobot {
    /// The host key's fingerprint as `ssh-keygen -l` prints it
    /// (`SHA256:` and unpadded base64).
    pub host_key_fingerprint: String,
    /// The Raspberry Pi serial (16 lowercase hex digits, no leading zero).
    pub serial: String,
    /// The host name (`hostname` and `/run/kiwi-robot/etc/hostname`).
    pub hostname: String,
    /// `/run/kiwi-robot/etc/machine-id` (32 hex digits).
    pub machine_id: String,
    pub kind: LegacyKind,
    /// Where sshd listens (port 22).
    pub ip: Ipv4Addr,
    /// The robot's network namespace.
    ns: String,
    /// sshd's standard error, appended over restarts.
    log: PathBuf,
    /// `None` only while (re)starting.
    sshd: Option<Proc>,
    /// The configuration, keys and the robot's files (removed on drop).
    fixture: SshdFixture,
}

impl LegacyRobot {
    /// What sshd logged so far (`-e`: its messages go to this file).
    pub fn log(&self) -> String {
        log_tail(&self.log, usize::MAX)
    }

    /// The SSH fixture behind this robot (its files, config and keys).
    pub fn fixture(&self) -> &SshdFixture {
        &self.fixture
    }

    /// Gives the robot a new host key (a re-flashed robot, or an impostor
    /// at its address) and restarts its sshd with it; returns once the new
    /// sshd accepts connections. `host_key_fingerprint` is updated.
    pub fn replace_host_key(&mut self, lan: &Lan) -> anyhow::Result<()> {
        self.stop();
        self.host_key_fingerprint = self
            .fixture
            .new_host_key()
            .context("cannot make a new host key")?;
        self.start(lan)
    }

    /// Moves the robot to address `new_ip` (see [`Lan::change_address`]:
    /// its DHCP lease changed) and restarts its sshd there, with the same
    /// host key and files; returns once the new sshd accepts connections.
    /// `ip` is updated.
    pub fn move_to(&mut self, lan: &Lan, new_ip: Ipv4Addr) -> anyhow::Result<()> {
        self.stop();
        lan.change_address(&self.ns, self.ip, new_ip)?;
        self.ip = new_ip;
        self.fixture
            .set_listen(SocketAddr::from((new_ip, 22)))
            .context("cannot rewrite sshd's configuration")?;
        self.start(lan)
    }

    fn stop(&mut self) {
        if let Some(mut sshd) = self.sshd.take() {
            sshd.kill_and_reap();
        }
    }

    /// Starts sshd in a private mount and UTS namespace inside the robot's
    /// network namespace (`ip netns exec` makes the mount namespace, so the
    /// binds are seen by this sshd and its sessions alone), and waits until
    /// it accepts connections.
    fn start(&mut self, lan: &Lan) -> anyhow::Result<()> {
        let sshd = self.fixture.sshd_command();
        let script = r#"set -e
hostname "$1"
mount --bind "$2" /run
mount --bind "$3" "$4"
shift 4
exec "$@""#;
        let mut command = lan.command(&self.ns, "unshare");
        command
            .args(["--uts", "--", "/bin/sh", "-c", script, "sh"])
            .arg(&self.hostname)
            .arg(self.fixture.run_dir())
            .arg(self.fixture.home_dir())
            .arg(root_home())
            .arg(sshd.get_program())
            .args(sshd.get_args());
        let name = format!("sshd of {} ({})", self.hostname, self.ip);
        let sshd = self.sshd.insert(Proc::spawn(&name, command, &self.log));
        wait_for_sshd(lan, &self.ns, self.ip, sshd, &self.log)
    }
}

impl Drop for LegacyRobot {
    fn drop(&mut self) {
        report_log_on_panic(&format!("the sshd of {}", self.hostname), &self.log);
        self.stop();
    }
}

/// Waits until sshd accepts connections and sends its banner. The check
/// connects from inside the robot's own namespace, so that it leaves no
/// neighbour entry in the controller's ARP table (discovery tests look
/// there).
fn wait_for_sshd(
    lan: &Lan,
    ns: &str,
    ip: Ipv4Addr,
    sshd: &mut Proc,
    log: &Path,
) -> anyhow::Result<()> {
    let addr = SocketAddr::from((ip, 22));
    let deadline = Instant::now() + SSHD_START_TIMEOUT;
    let outcome = lan.in_namespace(ns, || {
        loop {
            if let Some(status) = sshd.exit_status() {
                bail!("sshd exited ({status})");
            }
            let last = match banner(addr) {
                Ok(line) if line.starts_with("SSH-") => return Ok(()),
                Ok(line) => format!("unexpected banner {line:?}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                bail!("sshd does not accept connections on {addr} within {SSHD_START_TIMEOUT:?}: {last}");
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    });
    outcome.with_context(|| format!("sshd's log:\n{}", log_tail(log, 40)))
}

/// The first line a server sends on `addr`.
fn banner(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 256];
    let mut seen = Vec::new();
    while !seen.contains(&b'\n') && seen.len() < buf.len() {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&seen).trim_end().to_string())
}

/// Root's home directory.
fn root_home() -> PathBuf {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(0))
        .ok()
        .flatten()
        .map(|root| root.dir)
        .filter(|home| home.is_absolute() && home.is_dir())
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// The last octet of host `i`'s address (the controller is 1).
fn host_octet(i: usize) -> u8 {
    assert!(
        (1..=MAX_ROBOTS).contains(&i),
        "robot numbers run from 1 to {MAX_ROBOTS}, not {i}"
    );
    u8::try_from(i + 1).expect("at most 254")
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The `ip -batch` lines that configure a host's `eth0` inside its
/// namespace: no IPv6 address, up, the address, and a default route so
/// that broadcast and multicast have an interface.
fn host_script(ip: Ipv4Addr) -> String {
    format!(
        "link set lo up\n\
         link set eth0 addrgenmode none\n\
         link set eth0 up\n\
         addr add {ip}/24 brd + dev eth0\n\
         route add default dev eth0\n"
    )
}

/// Those of `hosts` (namespace names) whose `eth0` is not yet running
/// (carrier on and the kernel's link work done), checked from one thread
/// that enters each namespace in turn.
fn hosts_without_carrier(hosts: Vec<String>) -> Vec<String> {
    std::thread::spawn(move || {
        hosts
            .into_iter()
            .filter(|ns| {
                enter_namespace(&netns_path(ns));
                let running = nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
                    addrs.any(|a| {
                        a.interface_name == "eth0" && a.flags.contains(InterfaceFlags::IFF_RUNNING)
                    })
                });
                !running
            })
            .collect()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn netns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

/// Moves the calling thread into the named network namespace.
fn enter_namespace(path: &Path) {
    let file = fs::File::open(path)
        .unwrap_or_else(|e| panic!("cannot open the namespace {}: {e}", path.display()));
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("cannot enter the namespace {}: {e}", path.display()));
}

fn ip_batch(args: &[&str], script: &str) -> anyhow::Result<()> {
    finish_ip_batch(spawn_ip_batch(args, script)?)
}

/// Starts `ip ARGS -batch -` with `script` on its standard input.
fn spawn_ip_batch(args: &[&str], script: &str) -> anyhow::Result<std::process::Child> {
    let mut command = Command::new("ip");
    command.args(args).args(["-batch", "-"]);
    spawn_with_stdin(command, script)
}

fn finish_ip_batch(child: std::process::Child) -> anyhow::Result<()> {
    finish(child, "ip -batch")
}

pub fn run_with_stdin(command: Command, input: &str) -> anyhow::Result<()> {
    let what = format!("{:?}", command.get_program());
    finish(spawn_with_stdin(command, input)?, &what)
}

fn spawn_with_stdin(mut command: Command, input: &str) -> anyhow::Result<std::process::Child> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // The scripts are far smaller than a pipe's buffer, and the child reads
    // all of its input before it ends.
    stdin
        .write_all(input.as_bytes())
        .with_context(|| format!("cannot write to {command:?}"))?;
    drop(stdin);
    Ok(child)
}

fn finish(child: std::process::Child, what: &str) -> anyhow::Result<()> {
    let output = child
        .wait_with_output()
        .with_context(|| format!("cannot wait for {what}"))?;
    ensure!(
        output.status.success(),
        "{what} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// Deletes the named namespaces and kills every process inside them.
///
/// The names go first, so that no process can enter one any more (an
/// `ip netns exec` just started would otherwise slip in after the kill);
/// the namespaces themselves end with their last process.
fn remove_namespaces(names: &[String]) {
    let inodes: HashSet<u64> = names
        .iter()
        .filter_map(|ns| fs::metadata(netns_path(ns)).ok())
        .map(|m| m.ino())
        .collect();
    delete_namespaces(names);
    // A process may fork while the first pass runs; a few more passes
    // catch its children.
    for _ in 0..3 {
        if kill_processes_in(&inodes) == 0 {
            break;
        }
    }
}

/// SIGKILLs every process (other than this one) whose network namespace
/// has one of `inodes`, in one pass over /proc; returns how many.
fn kill_processes_in(inodes: &HashSet<u64>) -> usize {
    let mut killed = 0;
    if inodes.is_empty() {
        return killed;
    }
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return killed;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if u32::try_from(pid) == Ok(me) {
            continue;
        }
        // "net:[4026532281]"; gone or a zombie: nothing to do.
        let Ok(link) = fs::read_link(entry.path().join("ns/net")) else {
            continue;
        };
        let inode = link
            .to_str()
            .and_then(|l| l.strip_prefix("net:["))
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|l| l.parse::<u64>().ok());
        if inode.is_some_and(|ino| inodes.contains(&ino)) {
            // ESRCH: it ended meanwhile.
            if nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                killed += 1;
            }
        }
    }
    killed
}

/// Deletes the named namespaces (missing ones are fine).
///
/// `/run/netns` stays mounted (the first `ip netns add` bind-mounts it onto
/// itself): unmounting it when it looks empty races with a parallel test
/// process's `ip netns add`, which then mounts it again over a namespace it
/// has just made, hiding that one's mount so it can never be deleted.
fn delete_namespaces(names: &[String]) {
    let mut script = String::new();
    for ns in names {
        writeln!(script, "netns del {ns}").expect("write to a String");
    }
    // `-force` goes on past the names that are already gone.
    if let Err(e) = ip_batch(&["-force"], &script) {
        let still_there: Vec<&String> = names.iter().filter(|n| netns_path(n).exists()).collect();
        if !still_there.is_empty() {
            eprintln!("kiwi-tests: cannot delete namespaces {still_there:?}: {e:#}");
        }
    }
}

/// Removes the namespaces of LANs whose test process is gone (killed
/// before its `Drop` ran), and the processes in them.
fn remove_leftovers() {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    let stale: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| {
            owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        })
        .collect();
    if stale.is_empty() {
        return;
    }
    remove_namespaces(&stale);
}

/// The pid in a namespace name of this harness (`kw<pid hex>x<n>-...`).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_TAG)?;
    let (pid, rest) = rest.split_once('x')?;
    let (seq, _) = rest.split_once('-')?;
    if pid.is_empty() || seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    u32::from_str_radix(pid, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_carry_their_owner() {
        assert_eq!(owner_pid("kw1a2bx0-ctl"), Some(0x1a2b));
        assert_eq!(owner_pid("kw1a2bx12-r253"), Some(0x1a2b));
        assert_eq!(owner_pid("kw1a2bx-ctl"), None);
        assert_eq!(owner_pid("kwzzx0-ctl"), None);
        assert_eq!(owner_pid("kwtest"), None);
        assert_eq!(owner_pid("other"), None);
    }

    #[test]
    fn addresses_follow_the_host_number() {
        assert_eq!(Lan::robot_ip(1), Ipv4Addr::new(10, 88, 0, 2));
        assert_eq!(Lan::robot_ip(253), Ipv4Addr::new(10, 88, 0, 254));
        assert_eq!(format_mac(Lan::robot_mac(253)), "02:88:00:00:00:fe");
    }
}
