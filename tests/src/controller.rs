//! A real `kiwi-controller` on loopback: its own state directory and ports,
//! kept across restarts, settings passed as `KIWI_CONTROLLER_*` variables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::POLL_INTERVAL;
use crate::api::Api;
use crate::process::{self, Confinement, Proc};
use crate::services::{RedisKeys, TestDatabase};

/// How long a controller may take from spawn to a 200 on `/readyz` (a debug
/// build on a busy 2-core machine, migrations included).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a controller may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The environment prefix of controller settings.
const ENV_PREFIX: &str = "KIWI_CONTROLLER_";

/// Settings of a test controller: a builder over its environment.
///
/// By default every kind of LAN discovery other than agents connecting is
/// switched off and the sweep network is loopback: tests only ever talk to
/// 127.0.0.1.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    env: Vec<(String, String)>,
    confinement: Confinement,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        let mut opts = ControllerOptions {
            env: Vec::new(),
            confinement: Confinement::default(),
        };
        // Nothing on the LAN (the built-in defaults already say so; the
        // test does not depend on them): no sweep, no announcements.
        for flag in [
            "enable_udp_broadcast",
            "enable_mdns",
            "enable_arp_cache_check",
            "enable_ssh_fallback",
        ] {
            opts = opts.setting(flag, "false");
        }
        // Every test robot comes from 127.0.0.1: the per-address abuse
        // limits would otherwise count them all as one host.
        opts.setting("discovery_networks", "")
            .setting("enroll_per_minute", "1000000")
            .setting("max_connections_per_address", "1000000")
    }
}

impl ControllerOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// `auto_provision`: whether a connecting agent's robot is provisioned
    /// without an operator (default true).
    pub fn auto_provision(self, on: bool) -> Self {
        self.setting("auto_provision", if on { "true" } else { "false" })
    }

    /// `heartbeat_interval` sent to agents, e.g. `"200ms"`.
    pub fn heartbeat_interval(self, value: &str) -> Self {
        self.setting("heartbeat_interval", value)
    }

    /// `liveness_timeout`: silent this long means offline, e.g. `"1s"`.
    pub fn liveness_timeout(self, value: &str) -> Self {
        self.setting("liveness_timeout", value)
    }

    /// `report_interval` sent to agents, e.g. `"200ms"`.
    pub fn report_interval(self, value: &str) -> Self {
        self.setting("report_interval", value)
    }

    /// The production storage: PostgreSQL database `db` and, when given,
    /// Redis under the key prefix of `redis`.
    pub fn storage(self, db: &TestDatabase, redis: Option<&RedisKeys>) -> Self {
        let opts = self.setting("database_url", db.url());
        match redis {
            Some(keys) => opts
                .setting("redis_url", keys.url())
                .setting("redis_prefix", keys.prefix()),
            None => opts,
        }
    }

    /// Any setting, as `KIWI_CONTROLLER_<KEY>` (dots become `__`).
    pub fn setting(self, key: &str, value: &str) -> Self {
        let name = format!(
            "{ENV_PREFIX}{}",
            key.to_ascii_uppercase().replace('.', "__")
        );
        self.raw_env(&name, value)
    }

    /// An environment variable of the controller process, as given.
    pub fn raw_env(mut self, name: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// Starts the controller with this umask (e.g. `0`: files everyone may
    /// read and write, unless the program makes its own private).
    pub fn umask(mut self, mask: u32) -> Self {
        self.confinement.umask = Some(mask);
        self
    }

    /// Starts the controller with this open-files limit, soft and hard,
    /// and without the privilege to raise it.
    pub fn open_files_limit(mut self, n: u64) -> Self {
        self.confinement.open_files = Some(n);
        self
    }

    /// Starts a controller with these settings.
    pub async fn start(self) -> Controller {
        Controller::start(self).await
    }
}

/// Runs `kiwi-controller token create --state-dir <state_dir> <args>` with
/// the controller's environment and returns the token it printed; its
/// stderr goes to the controller's log.
pub fn token_create(
    opts: &ControllerOptions,
    state_dir: &Path,
    log: &Path,
    args: &[&str],
) -> String {
    let mut command = Command::new(process::binary("kiwi-controller"));
    process::scrub_env(&mut command);
    let output = command
        .arg("token")
        .arg("create")
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .envs(opts.env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run kiwi-controller token create");
    let stderr = String::from_utf8_lossy(&output.stderr);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        use std::io::Write as _;
        let _ = f.write_all(stderr.as_bytes());
    }
    assert!(
        output.status.success(),
        "kiwi-controller token create {args:?} failed ({}): {stderr}",
        output.status
    );
    let token = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        !token.is_empty() && !token.contains('\n'),
        "token create printed {token:?}"
    );
    token
}

/// Two distinct loopback addresses whose ports were free a moment ago (both
/// probe sockets are held at once, so the ports differ).
pub fn two_loopback_addrs() -> (SocketAddr, SocketAddr) {
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let (a, b) = (bind(), bind());
    let addr = |l: &std::net::TcpListener| l.local_addr().expect("a bound address");
    (addr(&a), addr(&b))
}

/// Why a controller did not come up.
#[derive(Debug)]
struct StartError {
    /// The log says a listen address was taken (worth new ports).
    address_in_use: bool,
    message: String,
}

/// A running (or stopped, between restarts) controller.
#[derive(Debug)]
pub struct Controller {
    opts: ControllerOptions,
    api_addr: SocketAddr,
    agent_addr: SocketAddr,
    api: Api,
    /// An admin API token (the client `api()` sends it).
    admin_token: String,
    /// An enrollment token with uses for every agent a test starts.
    enroll_token: String,
    proc: Option<Proc>,
    log: PathBuf,
    state_dir: PathBuf,
    /// Holds the state directory and the log; removed when the controller
    /// handle drops (after the process is killed).
    dir: TempDir,
}

impl Controller {
    /// Starts a controller on fresh loopback ports and waits for `/readyz`.
    pub async fn start(opts: ControllerOptions) -> Controller {
        let dir = tempfile::Builder::new()
            .prefix("kiwi-controller-")
            .tempdir()
            .expect("a temp dir for the controller");
        // Made by the controller itself (private, as outside a test).
        let state_dir = dir.path().join("state");
        let log = dir.path().join("controller.log");
        // Ports are picked once and kept, so restarts come back on the same
        // addresses. Another process may grab a port between our probe and
        // the controller's bind; then try again with new ones.
        let (api_addr, agent_addr) = two_loopback_addrs();
        let admin_token = token_create(
            &opts,
            &state_dir,
            &log,
            &["--role", "admin", "--name", "tests"],
        );
        let enroll_token = token_create(
            &opts,
            &state_dir,
            &log,
            &["--ttl", "24h", "--uses", "1000000"],
        );
        let mut controller = Controller {
            opts,
            api_addr,
            agent_addr,
            api: Api::with_token(&format!("http://{api_addr}"), Some(&admin_token)),
            admin_token,
            enroll_token,
            proc: None,
            log,
            state_dir,
            dir,
        };
        const ATTEMPTS: u32 = 3;
        for attempt in 1..=ATTEMPTS {
            match controller.spawn_and_wait_ready().await {
                Ok(()) => break,
                Err(e) if attempt < ATTEMPTS && e.address_in_use => {
                    eprintln!("kiwi-tests: {}; trying new ports", e.message);
                    (controller.api_addr, controller.agent_addr) = two_loopback_addrs();
                    controller.api = Api::with_token(
                        &format!("http://{}", controller.api_addr),
                        Some(&controller.admin_token),
                    );
                }
                Err(e) => panic!("{}", e.message),
            }
        }
        controller
    }

    /// Spawns the process and waits for a 200 on `/readyz`. On failure,
    /// the error carries the log tail.
    async fn spawn_and_wait_ready(&mut self) -> Result<(), StartError> {
        assert!(self.proc.is_none(), "the controller is already running");
        let mut command = self
            .opts
            .confinement
            .command(&process::binary("kiwi-controller"));
        command
            .arg("serve")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--api-listen")
            .arg(self.api_addr.to_string())
            .arg("--agent-listen")
            .arg(self.agent_addr.to_string());
        command.envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        self.proc = Some(Proc::spawn("kiwi-controller", command, &self.log));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let proc = self.proc.as_mut().expect("just spawned");
            if let Some(status) = proc.exit_status() {
                self.proc = None;
                let tail = process::log_tail(&self.log, 40);
                return Err(StartError {
                    address_in_use: tail.contains("in use"),
                    message: format!(
                        "kiwi-controller exited before it was ready ({status}); log tail:\n{tail}"
                    ),
                });
            }
            if let Ok(resp) = self.api.get("/readyz").await
                && resp.status() == reqwest::StatusCode::OK
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StartError {
                    address_in_use: false,
                    message: format!(
                        "kiwi-controller not ready (GET /readyz != 200) within \
                         {READY_TIMEOUT:?}; log tail:\n{}",
                        process::log_tail(&self.log, 40)
                    ),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The REST client of this controller, with an admin token.
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// The admin API token of [`api`](Self::api).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// An enrollment token good for every agent of a test.
    pub fn enroll_token(&self) -> &str {
        &self.enroll_token
    }

    /// Runs `kiwi-controller token create <args>` on this controller's
    /// state (and database) and returns the token it printed.
    pub fn create_token(&self, args: &[&str]) -> String {
        token_create(&self.opts, &self.state_dir, &self.log, args)
    }

    /// The controller's CA (from its state directory), to issue test
    /// certificates with.
    pub fn ca(&self) -> kiwi_security::pki::Authority {
        let dir = self.state_dir.join("tls");
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .unwrap_or_else(|e| panic!("read the controller's {f}: {e}"))
        };
        kiwi_security::pki::Authority::from_pem(&read("ca.pem"), &read("ca.key"))
            .expect("the controller's CA")
    }

    /// The API address (`127.0.0.1:port`).
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The agent address (`127.0.0.1:port`).
    pub fn agent_addr(&self) -> SocketAddr {
        self.agent_addr
    }

    /// What agents are given as `--controller`: `127.0.0.1:port`.
    pub fn agent_controller_arg(&self) -> String {
        self.agent_addr.to_string()
    }

    /// The agent WebSocket endpoint: `wss://127.0.0.1:port/agent`.
    pub fn agent_ws_url(&self) -> String {
        format!("wss://{}/agent", self.agent_addr)
    }

    /// The state directory (kept across restarts).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The log file (stderr and stdout of every start, appended).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The temp dir holding state and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// Kills the controller with SIGKILL (no clean shutdown).
    pub fn kill(&mut self) {
        let mut proc = self.proc.take().expect("the controller is not running");
        proc.kill_and_reap();
    }

    /// Stops the controller with SIGTERM and asserts that it exits with
    /// status 0 within [`STOP_TIMEOUT`].
    pub async fn stop(&mut self) {
        let mut proc = self.proc.take().expect("the controller is not running");
        proc.signal(libc::SIGTERM);
        let status = proc.wait_exit(STOP_TIMEOUT).await;
        let status = status.unwrap_or_else(|| {
            panic!(
                "{} (pid {}) did not exit within {STOP_TIMEOUT:?} of SIGTERM; log tail:\n{}",
                proc.name(),
                proc.pid(),
                process::log_tail(&self.log, 40)
            )
        });
        assert!(
            status.success(),
            "kiwi-controller exited with {status} after SIGTERM (expected 0); log tail:\n{}",
            process::log_tail(&self.log, 40)
        );
    }

    /// Starts the controller again (same ports, same state directory) after
    /// [`kill`](Self::kill) or [`stop`](Self::stop), and waits for `/readyz`.
    pub async fn start_again(&mut self) {
        if let Err(e) = self.spawn_and_wait_ready().await {
            panic!("restarting the controller failed: {}", e.message);
        }
    }

    /// SIGTERM, wait for a clean exit, start again.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill_and_reap();
        }
        process::report_log_on_panic("kiwi-controller log", &self.log);
    }
}
