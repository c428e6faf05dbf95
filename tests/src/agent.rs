//! Real `kiwi-agent` processes: one robot per [`Agent`] (with its own
//! prepared sys-root tree and state directory, both kept across restarts),
//! or many virtual robots per [`Simulator`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiwi_agent::credentials::{Credentials, load_or_create_key};
pub use kiwi_agent::simulate::{AgentSummary, SimulationSummary};
use kiwi_protocol::message::Report;
use kiwi_protocol::{HardwareId, RobotId};
use kiwi_security::pki::Validity;
use tempfile::TempDir;
use uuid::Uuid;

use crate::controller::{Controller, STOP_TIMEOUT};
use crate::process::{self, Confinement, Proc, write_file};

/// The environment prefix of agent settings.
const ENV_PREFIX: &str = "KIWI_AGENT_";

/// The reports in the outbox log of the agent with state directory
/// `state_dir`.
fn read_outbox(state_dir: &Path) -> anyhow::Result<Vec<Report>> {
    kiwi_agent::outbox::read_log(state_dir)
        .map_err(|e| anyhow::anyhow!("cannot read the outbox in {}: {e}", state_dir.display()))
}

/// How many of `reports` were made strictly between `after` and `before`
/// (Unix ms).
pub fn made_between(reports: &[Report], after: i64, before: i64) -> usize {
    reports
        .iter()
        .filter(|r| r.time_ms > after && r.time_ms < before)
        .count()
}

/// The robot id of a Raspberry Pi whose `/proc/cpuinfo` says `Serial: serial`:
/// the serial lower-cased without leading zeros, as a `PiSerial` hardware id.
pub fn robot_id_for_serial(serial: &str) -> Uuid {
    let normalised = serial.trim().to_ascii_lowercase();
    let normalised = normalised.trim_start_matches('0');
    RobotId::from_hardware(&HardwareId::PiSerial(normalised.to_string())).0
}

/// The robot id of virtual robot `i` of a simulator run with `prefix`.
pub fn simulated_robot_id(prefix: &str, i: usize) -> Uuid {
    let i = u32::try_from(i).expect("a simulated agent's index fits in u32");
    kiwi_agent::agent::simulated_robot_id(prefix, i).0
}

/// The serial of the `n`-th test robot: `10000000deadbe01`, `...02`, ...
pub fn test_serial(n: u32) -> String {
    format!("10000000deadbe{n:02x}")
}

/// Settings of a test agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    serial: String,
    hostname: String,
    env: Vec<(String, String)>,
    confinement: Confinement,
}

impl AgentOptions {
    /// An agent on a LeKiwi whose Pi has this serial; its hostname is
    /// `lekiwi-<last 4 hex digits>`.
    pub fn new(serial: &str) -> Self {
        let tail = &serial[serial.len().saturating_sub(4)..];
        AgentOptions {
            serial: serial.to_string(),
            hostname: format!("lekiwi-{tail}"),
            env: Vec::new(),
            confinement: Confinement::default(),
        }
    }

    pub fn hostname(mut self, hostname: &str) -> Self {
        self.hostname = hostname.to_string();
        self
    }

    /// `report_interval`, e.g. `"200ms"`.
    pub fn report_interval(self, value: &str) -> Self {
        self.setting("report_interval", value)
    }

    /// Any setting, as `KIWI_AGENT_<KEY>`.
    pub fn setting(mut self, key: &str, value: &str) -> Self {
        let name = format!(
            "{ENV_PREFIX}{}",
            key.to_ascii_uppercase().replace('.', "__")
        );
        self.env.retain(|(k, _)| *k != name);
        self.env.push((name, value.to_string()));
        self
    }

    /// Starts the agent with this umask.
    pub fn umask(mut self, mask: u32) -> Self {
        self.confinement.umask = Some(mask);
        self
    }

    /// Starts the agent against `controller`.
    pub fn start(self, controller: &Controller) -> Agent {
        Agent::start_with(controller, self)
    }
}

/// One `kiwi-agent run` process and the robot it pretends to run on.
#[derive(Debug)]
pub struct Agent {
    opts: AgentOptions,
    controller_arg: String,
    /// The controller's enrollment token, given to the agent unless the
    /// options set `enroll_token` themselves.
    enroll_token: String,
    robot_id: Uuid,
    proc: Option<Proc>,
    sys_root: PathBuf,
    state_dir: PathBuf,
    log: PathBuf,
    dir: TempDir,
}

impl Agent {
    /// Starts an agent with default options for the robot with this Pi
    /// serial.
    pub fn start(controller: &Controller, serial: &str) -> Agent {
        Agent::start_with(controller, AgentOptions::new(serial))
    }

    /// Prepares the robot's sys-root tree and state directory and starts the
    /// agent. Nothing is awaited: tests wait for the robot in the API.
    pub fn start_with(controller: &Controller, opts: AgentOptions) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("kiwi-agent-")
            .tempdir()
            .expect("a temp dir for the agent");
        let sys_root = dir.path().join("sys-root");
        // Made by the agent itself (private, as outside a test).
        let state_dir = dir.path().join("state");
        prepare_lekiwi_sys_root(&sys_root, &opts.serial, &opts.hostname);
        let mut agent = Agent {
            robot_id: robot_id_for_serial(&opts.serial),
            controller_arg: controller.agent_controller_arg(),
            enroll_token: controller.enroll_token().to_string(),
            opts,
            proc: None,
            sys_root,
            state_dir,
            log: dir.path().join("agent.log"),
            dir,
        };
        agent.start_again();
        agent
    }

    /// The id the controller must give this robot.
    pub fn robot_id(&self) -> Uuid {
        self.robot_id
    }

    pub fn hostname(&self) -> &str {
        &self.opts.hostname
    }

    pub fn serial(&self) -> &str {
        &self.opts.serial
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn sys_root(&self) -> &Path {
        &self.sys_root
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// Waits up to `timeout` for the agent to exit on its own; its status,
    /// or `None` if it still runs.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let status = self
            .proc
            .as_mut()
            .expect("the agent is not running")
            .wait_exit(timeout)
            .await;
        if status.is_some() {
            self.proc = None;
        }
        status
    }

    /// Everything the agent logged so far (all runs).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The reports in the agent's outbox log, read while it runs (see
    /// [`kiwi_agent::outbox::read_log`]): every report it made, whether or
    /// not it could send it, until its log is compacted.
    pub fn outbox(&self) -> anyhow::Result<Vec<Report>> {
        read_outbox(&self.state_dir)
    }

    /// Kills the agent with SIGKILL: it cannot say goodbye.
    pub fn kill(&mut self) {
        let mut proc = self.proc.take().expect("the agent is not running");
        proc.kill_and_reap();
    }

    /// Freezes the agent (SIGSTOP): its connection stays open but it says
    /// nothing, as a hung robot or a dead Wi-Fi link would.
    pub fn pause(&mut self) {
        self.proc
            .as_mut()
            .expect("the agent is not running")
            .signal(libc::SIGSTOP);
    }

    /// Lets a paused agent run again (SIGCONT).
    pub fn resume(&mut self) {
        self.proc
            .as_mut()
            .expect("the agent is not running")
            .signal(libc::SIGCONT);
    }

    /// Stops the agent with SIGTERM and asserts a clean exit (status 0).
    pub async fn stop(&mut self) {
        let mut proc = self.proc.take().expect("the agent is not running");
        proc.signal(libc::SIGTERM);
        let status = proc.wait_exit(STOP_TIMEOUT).await.unwrap_or_else(|| {
            panic!(
                "kiwi-agent did not exit within {STOP_TIMEOUT:?} of SIGTERM; log tail:\n{}",
                process::log_tail(&self.log, 40)
            )
        });
        assert!(
            status.success(),
            "kiwi-agent exited with {status} after SIGTERM (expected 0); log tail:\n{}",
            process::log_tail(&self.log, 40)
        );
    }

    /// Starts the agent again with the same sys-root and state directory.
    pub fn start_again(&mut self) {
        assert!(self.proc.is_none(), "the agent is already running");
        let mut command = self
            .opts
            .confinement
            .command(&process::binary("kiwi-agent"));
        command
            .arg("run")
            .arg("--controller")
            .arg(&self.controller_arg)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--sys-root")
            .arg(&self.sys_root);
        command.env("KIWI_AGENT_ENROLL_TOKEN", &self.enroll_token);
        command.envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        self.proc = Some(Proc::spawn("kiwi-agent", command, &self.log));
    }

    /// SIGTERM, wait for a clean exit, start again.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill_and_reap();
        }
        process::report_log_on_panic(
            &format!("kiwi-agent log of {}", self.opts.hostname),
            &self.log,
        );
    }
}

/// Writes the files a LeKiwi on a Raspberry Pi 5 shows its agent: the board
/// serial in `proc/cpuinfo`, a hostname, one motor bus (`dev/ttyACM0`), and
/// plausible telemetry sources.
pub fn prepare_lekiwi_sys_root(root: &Path, serial: &str, hostname: &str) {
    write_file(
        &root.join("proc/cpuinfo"),
        &format!(
            "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n\
             CPU implementer\t: 0x41\n\nHardware\t: BCM2835\nRevision\t: d04170\n\
             Serial\t\t: {serial}\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"
        ),
    );
    write_file(&root.join("etc/hostname"), &format!("{hostname}\n"));
    write_file(&root.join("dev/ttyACM0"), "");
    write_file(
        &root.join("etc/os-release"),
        "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\n\
         VERSION_ID=\"12\"\nID=debian\n",
    );
    write_file(&root.join("proc/loadavg"), "0.12 0.08 0.05 1/187 4242\n");
    write_file(
        &root.join("proc/meminfo"),
        "MemTotal:        8245384 kB\nMemFree:         6123456 kB\nMemAvailable:    7012345 kB\n",
    );
    write_file(&root.join("proc/uptime"), "12345.67 45678.90\n");
    write_file(
        &root.join("sys/class/thermal/thermal_zone0/temp"),
        "48500\n",
    );
}

/// Settings of a [`Simulator`]: a builder over `kiwi-agent simulate`'s
/// flags.
#[derive(Debug, Clone)]
pub struct SimulatorOptions {
    count: usize,
    prefix: String,
    report_interval: Option<String>,
    start_spread: Option<String>,
    source_network: Option<String>,
    enrolled: bool,
    state_in_memory: bool,
}

/// How long the certificates of [`SimulatorOptions::enrolled`] agents are
/// valid: far longer than a test, so no agent asks to renew.
const ENROLLED_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// A tmpfs, where [`SimulatorOptions::state_in_memory`] keeps the agents'
/// state.
const MEMORY_DIR: &str = "/dev/shm";

impl SimulatorOptions {
    /// `count` virtual robots with the default id prefix.
    pub fn new(count: usize) -> Self {
        SimulatorOptions {
            count,
            prefix: Simulator::DEFAULT_PREFIX.to_string(),
            report_interval: None,
            start_spread: None,
            source_network: None,
            enrolled: false,
            state_in_memory: false,
        }
    }

    /// The id prefix of the simulated robots.
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }

    /// `--report-interval`, e.g. `"500ms"` (a provisioned robot follows the
    /// controller's `report_interval` instead).
    pub fn report_interval(mut self, value: &str) -> Self {
        self.report_interval = Some(value.to_string());
        self
    }

    /// `--start-spread`: the agents start spread evenly over this window,
    /// e.g. `"5s"` (default one second).
    pub fn start_spread(mut self, value: &str) -> Self {
        self.start_spread = Some(value.to_string());
        self
    }

    /// `--source-network`, e.g. `"127.3.0.0/29"`: the agents connect from
    /// its addresses in turn.
    pub fn source_network(mut self, cidr: &str) -> Self {
        self.source_network = Some(cidr.to_string());
        self
    }

    /// Gives every agent a client certificate from the controller's CA
    /// before it starts, as enrollment would: the agents connect at once.
    /// For tests of what comes after enrolling (`simulate.rs` covers a
    /// fleet enrolling).
    pub fn enrolled(mut self) -> Self {
        self.enrolled = true;
        self
    }

    /// Keeps the agents' state (outboxes included) on a tmpfs: a thousand
    /// robots have a thousand disks, and one disk syncing a thousand
    /// outboxes would slow the machine the controller runs on.
    pub fn state_in_memory(mut self) -> Self {
        self.state_in_memory = true;
        self
    }

    /// Starts the simulator against `controller`.
    pub fn start(self, controller: &Controller) -> Simulator {
        Simulator::start_with(controller, self)
    }
}

/// A `kiwi-agent simulate` process: `count` virtual robots.
#[derive(Debug)]
pub struct Simulator {
    count: usize,
    prefix: String,
    proc: Option<Proc>,
    log: PathBuf,
    summary: PathBuf,
    /// The agents' state directory (the root of theirs).
    state_dir: PathBuf,
    /// The agents' state on a tmpfs, if kept there.
    _memory: Option<TempDir>,
    dir: TempDir,
}

impl Simulator {
    /// The default id prefix of simulated robots.
    pub const DEFAULT_PREFIX: &'static str = "sim";

    /// Starts `count` virtual agents against `controller`.
    pub fn start(controller: &Controller, count: usize) -> Simulator {
        SimulatorOptions::new(count).start(controller)
    }

    /// Starts `count` virtual agents whose ids derive from `prefix`.
    pub fn start_with_prefix(controller: &Controller, count: usize, prefix: &str) -> Simulator {
        SimulatorOptions::new(count)
            .prefix(prefix)
            .start(controller)
    }

    /// Starts the virtual agents `opts` describes; they write their summary
    /// (see [`summary`](Self::summary)) when they stop.
    pub fn start_with(controller: &Controller, opts: SimulatorOptions) -> Simulator {
        let dir = tempfile::Builder::new()
            .prefix("kiwi-simulate-")
            .tempdir()
            .expect("a temp dir for the simulator");
        let memory = opts.state_in_memory.then(|| {
            tempfile::Builder::new()
                .prefix("kiwi-simulate-")
                .tempdir_in(MEMORY_DIR)
                .unwrap_or_else(|e| panic!("a temp dir on the tmpfs {MEMORY_DIR}: {e}"))
        });
        let state_dir = memory
            .as_ref()
            .map_or_else(|| dir.path().join("state"), |m| m.path().join("state"));
        std::fs::create_dir_all(&state_dir).expect("create the simulator state dir");
        if opts.enrolled {
            enroll_simulated(controller, &state_dir, &opts.prefix, opts.count);
        }
        let log = dir.path().join("simulate.log");
        let summary = dir.path().join("summary.json");
        let mut command = Command::new(process::binary("kiwi-agent"));
        command
            .arg("simulate")
            .arg("--count")
            .arg(opts.count.to_string())
            .arg("--controller")
            .arg(controller.agent_controller_arg())
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--id-prefix")
            .arg(&opts.prefix)
            .arg("--summary")
            .arg(&summary)
            .env("KIWI_AGENT_ENROLL_TOKEN", controller.enroll_token());
        if let Some(interval) = &opts.report_interval {
            command.arg("--report-interval").arg(interval);
        }
        if let Some(spread) = &opts.start_spread {
            command.arg("--start-spread").arg(spread);
        }
        if let Some(net) = &opts.source_network {
            command.arg("--source-network").arg(net);
        }
        let proc = Proc::spawn("kiwi-agent simulate", command, &log);
        Simulator {
            count: opts.count,
            prefix: opts.prefix,
            proc: Some(proc),
            log,
            summary,
            state_dir,
            _memory: memory,
            dir,
        }
    }

    /// The ids of the simulated robots, in index order.
    pub fn robot_ids(&self) -> Vec<Uuid> {
        (0..self.count)
            .map(|i| simulated_robot_id(&self.prefix, i))
            .collect()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The reports in each virtual agent's outbox log, in index order (see
    /// [`Agent::outbox`]).
    pub fn outboxes(&self) -> anyhow::Result<Vec<Vec<Report>>> {
        (0..u32::try_from(self.count)?)
            .map(|i| {
                read_outbox(&kiwi_agent::agent::simulated_state_dir(
                    &self.state_dir,
                    &self.prefix,
                    i,
                ))
            })
            .collect()
    }

    /// Stops the simulator with SIGTERM within a deadline.
    pub async fn stop(&mut self, timeout: Duration) {
        let mut proc = self.proc.take().expect("the simulator is not running");
        proc.signal(libc::SIGTERM);
        let status = proc.wait_exit(timeout).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "kiwi-agent simulate did not exit cleanly within {timeout:?} of SIGTERM ({status:?})"
        );
    }

    /// What every virtual agent went through (written when the simulator
    /// stopped: call after [`stop`](Self::stop)), checked to hold each of
    /// them once, in index order.
    pub fn summary(&self) -> SimulationSummary {
        assert!(
            self.proc.is_none(),
            "the simulator writes its summary at exit"
        );
        let bytes = std::fs::read(&self.summary).unwrap_or_else(|e| {
            panic!(
                "read the simulator's summary {}: {e}",
                self.summary.display()
            )
        });
        let summary: SimulationSummary =
            serde_json::from_slice(&bytes).expect("the simulator's summary is valid JSON");
        let indices: Vec<u32> = summary.agents.iter().map(|a| a.index).collect();
        let expected: Vec<u32> = (0..u32::try_from(self.count).expect("count fits")).collect();
        assert_eq!(
            indices, expected,
            "the summary has every simulated agent once"
        );
        summary
    }
}

/// Stores, for each of the `count` simulated agents with `prefix`, a key
/// and a client certificate issued by `controller`'s CA where the agent
/// looks for its credentials, as enrolling would.
fn enroll_simulated(controller: &Controller, state_dir: &Path, prefix: &str, count: usize) {
    issue_simulated_credentials(&controller.ca(), state_dir, prefix, count)
        .expect("credentials for the simulated agents");
}

/// Gives the simulated agents `{prefix}-0` to `{prefix}-{count - 1}` of
/// `kiwi-agent simulate --state-dir state_dir` a key and a certificate
/// from `ca`, as enrollment would.
pub fn issue_simulated_credentials(
    ca: &kiwi_security::pki::Authority,
    state_dir: &Path,
    prefix: &str,
    count: usize,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let validity = Validity::starting(std::time::SystemTime::now(), ENROLLED_CERT_TTL);
    for i in 0..u32::try_from(count).context("a count fits in u32")? {
        let dir = kiwi_agent::agent::simulated_state_dir(state_dir, prefix, i);
        let robot = kiwi_agent::agent::simulated_robot_id(prefix, i).0;
        let key = load_or_create_key(&dir).context("a key for a simulated agent")?;
        let issued = ca
            .issue_robot_for(&key, robot, validity)
            .context("a certificate for a simulated agent")?;
        Credentials::store(&dir, key, issued.der, ca.cert_der().clone())
            .context("store a simulated agent's credentials")?;
    }
    Ok(())
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill_and_reap();
        }
        process::report_log_on_panic("kiwi-agent simulate log", &self.log);
    }
}
