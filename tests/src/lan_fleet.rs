//! Kiwi's own programs on the simulated LAN ([`crate::lan`]): a real
//! `kiwi-controller serve` in the controller namespace (agent endpoint on
//! 10.88.0.1, API on that namespace's loopback) and real `kiwi-agent run`
//! processes in robot namespaces, each with its own system root, state
//! directory and log. Processes die when their handles drop; a failing test
//! prints the tail of their logs.

use crate::Api;
use crate::agent::{prepare_lekiwi_sys_root, robot_id_for_serial, test_serial};
use crate::lan::{Lan, LegacyKind, LegacyRobot};
use crate::process::{Proc, binary, log_tail};
use anyhow::Context as _;
use kiwi_controller::testing::sshd::ClientKey;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tempfile::TempDir;
use uuid::Uuid;

/// The controller's agent endpoint, inside the controller namespace.
pub const AGENT_LISTEN: &str = "10.88.0.1:8765";
/// The controller's agent endpoint as agents are told it.
pub const AGENT_URL: &str = "10.88.0.1:8765";
/// The controller's API, reachable only inside the controller namespace.
pub const API_LISTEN: &str = "127.0.0.1:8080";

/// A process in a namespace: killed on drop, its log tail printed if the
/// test is failing.
#[derive(Debug)]
pub struct LanProcess {
    proc: Proc,
    log: PathBuf,
}

impl LanProcess {
    pub fn spawn(name: &str, command: Command, log: &Path) -> LanProcess {
        LanProcess {
            proc: Proc::spawn(name, command, log),
            log: log.to_path_buf(),
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for LanProcess {
    fn drop(&mut self) {
        self.proc.kill_and_reap();
        if std::thread::panicking() {
            eprintln!(
                "\n----- log of {} ({}) -----\n{}\n----- end -----",
                self.proc.name(),
                self.log.display(),
                log_tail(&self.log, 40)
            );
        }
    }
}

/// `kiwi-controller serve` in the controller namespace.
#[derive(Debug)]
pub struct LanController {
    process: LanProcess,
    /// An admin API token (what `with_api` clients send).
    admin_token: String,
    /// An enrollment token with uses for every agent of a test.
    enroll_token: String,
    dir: TempDir,
}

impl LanController {
    /// Starts it with `settings` as `KIWI_CONTROLLER_*` variables (e.g.
    /// `("DISCOVERY_NETWORKS", "10.88.0.0/24")`) and waits until `/readyz`
    /// answers 200.
    pub fn start(lan: &Lan, settings: &[(&str, &str)], deadline: Duration) -> LanController {
        let dir = tempfile::Builder::new()
            .prefix("kiwi-lan-controller-")
            .tempdir()
            .expect("a temp dir");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).expect("create the controller state dir");
        let log = dir.path().join("controller.log");
        let opts = settings.iter().fold(
            crate::controller::ControllerOptions::new(),
            |o, (key, value)| o.setting(key, value),
        );
        let admin_token =
            crate::controller::token_create(&opts, &state, &log, &["--role", "admin"]);
        let enroll_token = crate::controller::token_create(
            &opts,
            &state,
            &log,
            &["--ttl", "24h", "--uses", "100000"],
        );
        Self::spawn(lan, dir, admin_token, enroll_token, settings, deadline)
    }

    /// Stops this controller and starts it again with other `settings` on
    /// the same state (its CA, tokens and robots), as an operator changing
    /// its configuration would.
    pub fn restart_with(
        self,
        lan: &Lan,
        settings: &[(&str, &str)],
        deadline: Duration,
    ) -> LanController {
        let LanController {
            process,
            admin_token,
            enroll_token,
            dir,
        } = self;
        drop(process);
        Self::spawn(lan, dir, admin_token, enroll_token, settings, deadline)
    }

    fn spawn(
        lan: &Lan,
        dir: TempDir,
        admin_token: String,
        enroll_token: String,
        settings: &[(&str, &str)],
        deadline: Duration,
    ) -> LanController {
        let state = dir.path().join("state");
        let log = dir.path().join("controller.log");
        let mut command = lan.command(lan.ctl(), binary("kiwi-controller"));
        command
            .arg("serve")
            .arg("--state-dir")
            .arg(&state)
            .arg("--api-listen")
            .arg(API_LISTEN)
            .arg("--agent-listen")
            .arg(AGENT_LISTEN)
            .env(
                "KIWI_LOG",
                "info,kiwi_controller::discovery=debug,kiwi_controller::recovery=debug",
            );
        for (key, value) in settings {
            command.env(format!("KIWI_CONTROLLER_{key}"), value);
        }
        let process = LanProcess::spawn("kiwi-controller", command, &log);
        let controller = LanController {
            process,
            admin_token,
            enroll_token,
            dir,
        };
        controller.with_api(lan, move |api| async move {
            crate::wait_until(deadline, || async {
                let status = api.get("/readyz").await?.status();
                anyhow::ensure!(status == reqwest::StatusCode::OK, "/readyz: {status}");
                Ok(())
            })
            .await;
        });
        controller
    }

    /// Runs `f` with an API client in the controller namespace (where the
    /// API listens) and returns what it returns.
    pub fn with_api<T, F, Fut>(&self, lan: &Lan, f: F) -> T
    where
        F: FnOnce(Api) -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let token = self.admin_token.clone();
        lan.spawn_in(lan.ctl(), move || async move {
            f(Api::with_token(
                &format!("http://{API_LISTEN}"),
                Some(&token),
            ))
            .await
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// An enrollment token for the agents of a test.
    pub fn enroll_token(&self) -> &str {
        &self.enroll_token
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }
}

/// A LeKiwi with the agent: its system root, state directory and, while
/// started, its `kiwi-agent run` in robot namespace `index`.
#[derive(Debug)]
pub struct LanAgent {
    pub index: usize,
    pub serial: String,
    pub robot_id: Uuid,
    sys_root: PathBuf,
    state_dir: PathBuf,
    dir: TempDir,
    process: Option<LanProcess>,
    runs: usize,
}

impl LanAgent {
    /// The files of robot `index` (serial [`test_serial`]`(index)`).
    pub fn new(index: usize) -> LanAgent {
        let serial = test_serial(u32::try_from(index).expect("small index"));
        Self::with_serial(index, &serial)
    }

    /// The files of a robot on host `index` with this Pi serial (a robot
    /// that was legacy before keeps its serial, and so its id).
    pub fn with_serial(index: usize, serial: &str) -> LanAgent {
        let dir = tempfile::Builder::new()
            .prefix("kiwi-lan-agent-")
            .tempdir()
            .expect("a temp dir");
        let sys_root = dir.path().join("sys-root");
        let state_dir = dir.path().join("state");
        std::fs::create_dir_all(&state_dir).expect("create the state dir");
        prepare_lekiwi_sys_root(&sys_root, serial, &format!("lekiwi-{index}"));
        LanAgent {
            index,
            serial: serial.to_string(),
            robot_id: robot_id_for_serial(serial),
            sys_root,
            state_dir,
            dir,
            process: None,
            runs: 0,
        }
    }

    /// Starts `kiwi-agent run --controller <controller>` in the robot's
    /// namespace, enrolling with `token` if it has no certificate yet,
    /// with `env` added (e.g. `KIWI_AGENT_ANNOUNCE`).
    pub fn start(
        &mut self,
        lan: &Lan,
        controller: &str,
        token: Option<&str>,
        env: &[(&str, &str)],
    ) {
        self.runs += 1;
        let mut command = lan.command(&lan.robot(self.index), binary("kiwi-agent"));
        command
            .arg("run")
            .arg("--controller")
            .arg(controller)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--sys-root")
            .arg(&self.sys_root);
        if let Some(token) = token {
            command.env("KIWI_AGENT_ENROLL_TOKEN", token);
        }
        command.envs(env.iter().copied());
        let log = self.dir.path().join(format!("agent-{}.log", self.runs));
        self.process = Some(LanProcess::spawn(
            &format!("kiwi-agent {}", self.index),
            command,
            &log,
        ));
    }

    pub fn stop(&mut self) {
        self.process = None;
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn log_text(&self) -> String {
        self.process
            .as_ref()
            .map(LanProcess::log_text)
            .unwrap_or_default()
    }
}

/// The discovery LAN of the acceptance tests and the benchmark: hosts
/// `1..=agents` run `kiwi-agent` (connected and ready when `start`
/// returns), the next `legacy` hosts are legacy robots (odd host numbers a
/// LeKiwi, even an XLERobot) that let the controller in with `key`, and the
/// controller sweeps 10.88.0.0/24 and identifies legacy robots over SSH,
/// with rounds on demand only. Processes stop before the LAN goes.
#[derive(Debug)]
pub struct DiscoveryLan {
    pub agents: Vec<LanAgent>,
    pub legacy: Vec<LegacyRobot>,
    pub controller: LanController,
    pub key: ClientKey,
    pub lan: Lan,
}

impl DiscoveryLan {
    pub fn start(agents: usize, legacy: usize, deadline: Duration) -> anyhow::Result<DiscoveryLan> {
        let lan = Lan::build(agents + legacy)?;
        let key = ClientKey::generate().context("cannot make an SSH client key")?;
        let legacy: Vec<LegacyRobot> = (agents + 1..=agents + legacy)
            .map(|i| {
                let kind = if i % 2 == 1 {
                    LegacyKind::LeKiwi
                } else {
                    LegacyKind::Xlerobot
                };
                lan.legacy_robot(i, kind, &key.public_key)
                    .with_context(|| format!("legacy robot {i}"))
            })
            .collect::<anyhow::Result<_>>()?;
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
            deadline,
        );
        let mut agents: Vec<LanAgent> = (1..=agents).map(LanAgent::new).collect();
        for agent in &mut agents {
            agent.start(&lan, AGENT_URL, Some(controller.enroll_token()), &[]);
        }
        let ids: Vec<Uuid> = agents.iter().map(|a| a.robot_id).collect();
        controller.with_api(&lan, move |api| async move {
            for id in ids {
                crate::wait_ready_and_connected(&api, id, deadline).await;
            }
        });
        Ok(DiscoveryLan {
            agents,
            legacy,
            controller,
            key,
            lan,
        })
    }
}
