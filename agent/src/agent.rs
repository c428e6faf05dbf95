//! One agent, apart from its transport: its identity, where its telemetry
//! comes from, its workload, its persisted flags and its outbox, and what it
//! does with the controller's acks, commands and desired configuration.
//!
//! The link ([`crate::link`]) moves frames and keeps time; it calls into an
//! [`Agent`] for everything else. `run` builds one agent from the real
//! system, `simulate` builds many from fake telemetry, and both share this
//! code and the link.

use crate::config::AgentConfig;
use crate::decide::{self, Observed, ReportTracker};
use crate::outbox::{Outbox, OutboxError};
use crate::probe::{self, FakeTelemetry, SysRoot, TelemetryProbe};
use crate::state::StateStore;
use crate::workload::{Action, Workload};
use anyhow::Context;
use kiwi_protocol::message::{CommandKind, CommandOutcome, DesiredConfig, Report, Telemetry};
use kiwi_protocol::{Identity, RobotType};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where an agent's telemetry comes from.
#[derive(Debug)]
pub enum TelemetrySource {
    /// Files under a system root.
    Probe(TelemetryProbe),
    /// Numbers that drift a little, for simulated agents.
    Simulated(Box<FakeTelemetry>),
}

impl TelemetrySource {
    async fn sample(&mut self) -> Telemetry {
        match self {
            TelemetrySource::Probe(p) => {
                let p = p.clone();
                // Reading /proc and statvfs block; keep them off the
                // runtime's threads.
                tokio::task::spawn_blocking(move || p.sample())
                    .await
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "telemetry sampling task failed");
                        Telemetry::default()
                    })
            }
            TelemetrySource::Simulated(f) => f.next_sample(),
        }
    }
}

/// The outbox, reached from async code: every operation that writes runs
/// on the blocking pool (it fsyncs).
#[derive(Debug, Clone)]
pub struct OutboxHandle(Arc<Mutex<Outbox>>);

impl OutboxHandle {
    pub fn new(outbox: Outbox) -> Self {
        Self(Arc::new(Mutex::new(outbox)))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Outbox) -> T) -> T {
        // A panic while holding the lock cannot leave the outbox half
        // updated in memory in a way that matters: its files are the truth.
        let mut guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut guard)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Outbox) -> Result<T, OutboxError> + Send + 'static,
    ) -> anyhow::Result<T> {
        let this = self.clone();
        let result = tokio::task::spawn_blocking(move || this.with(f))
            .await
            .context("outbox task failed")?;
        Ok(result?)
    }

    pub async fn push(&self, report: Report) -> anyhow::Result<Report> {
        self.blocking(move |o| o.push(report)).await
    }

    pub async fn ack(&self, seq: u64) -> anyhow::Result<()> {
        self.blocking(move |o| o.ack(seq)).await
    }

    /// The unacknowledged reports, in order.
    pub fn pending(&self) -> Vec<Report> {
        self.with(|o| o.pending())
    }

    /// What `Hello.last_acked_seq` carries (see [`Outbox::settled`]).
    pub fn settled(&self) -> u64 {
        self.with(|o| o.settled())
    }

    /// The highest seq the controller acknowledged.
    pub fn acked(&self) -> u64 {
        self.with(|o| o.acked())
    }

    /// Reports dropped unacknowledged for lack of room (see
    /// [`Outbox::dropped_total`]).
    pub fn dropped_total(&self) -> u64 {
        self.with(|o| o.dropped_total())
    }
}

/// One agent's state and behaviour.
#[derive(Debug)]
pub struct Agent {
    identity: Identity,
    telemetry: TelemetrySource,
    workload: Workload,
    state: StateStore,
    outbox: OutboxHandle,
    report_interval: Duration,
    tracker: ReportTracker,
}

impl Agent {
    /// Assembles an agent. The provisioned report interval, if any, wins
    /// over `report_interval`.
    pub fn new(
        identity: Identity,
        telemetry: TelemetrySource,
        workload: Workload,
        state: StateStore,
        outbox: Outbox,
        report_interval: Duration,
    ) -> Self {
        let report_interval = state
            .provisioned()
            .filter(|c| c.report_interval_ms > 0)
            .map_or(report_interval, |c| {
                Duration::from_millis(u64::from(c.report_interval_ms))
            });
        Self {
            identity,
            telemetry,
            workload,
            state,
            outbox: OutboxHandle::new(outbox),
            report_interval,
            tracker: ReportTracker::default(),
        }
    }

    /// The agent of this robot, from its configuration: probes the identity
    /// and opens the state. Blocking (it reads files and may fsync).
    pub fn from_config(cfg: &AgentConfig) -> anyhow::Result<Self> {
        let open_to_others =
            kiwi_service::state::ensure_private_dir(&cfg.state_dir).with_context(|| {
                format!("cannot create state directory {}", cfg.state_dir.display())
            })?;
        if let Some(mode) = open_to_others {
            tracing::warn!(state_dir = %cfg.state_dir.display(), mode = format!("{mode:o}"), "the state directory is open to other users (make it 0700); the files kiwi keeps in it are 0600");
        }
        let root = SysRoot::new(&cfg.sys_root);
        let probed = probe::probe_identity(&root, &cfg.state_dir, cfg.robot_type)
            .context("cannot establish the robot's identity")?;
        tracing::info!(
            robot_id = %probed.identity.robot_id,
            hardware_id = %probed.identity.hardware_id.canonical(),
            hostname = %probed.identity.hostname,
            robot_type = %probed.identity.robot_type,
            type_reason = %probed.type_decision.reason,
            "identified the robot"
        );
        let state = StateStore::open(&cfg.state_dir)
            .with_context(|| format!("cannot open the state in {}", cfg.state_dir.display()))?;
        let outbox = Outbox::open(&cfg.state_dir, cfg.outbox_capacity)?;
        Ok(Self::new(
            probed.identity,
            TelemetrySource::Probe(TelemetryProbe::new(root, &cfg.state_dir)),
            Workload::from_unit(cfg.workload_unit.clone()),
            state,
            outbox,
            cfg.report_interval,
        ))
    }

    /// A simulated agent number `index`: identity `Configured("{prefix}-{index}")`,
    /// host name `{prefix}-{index:05}`, LeKiwi and XLERobot alternating,
    /// fake telemetry, a simulated workload, and its own state and outbox in
    /// `<state_root>/{prefix}-{index}/`.
    pub fn simulated(
        index: u32,
        prefix: &str,
        state_root: &Path,
        report_interval: Duration,
        outbox_capacity: usize,
    ) -> anyhow::Result<Self> {
        let dir = simulated_state_dir(state_root, prefix, index);
        let state = StateStore::open(&dir)
            .with_context(|| format!("cannot open the state in {}", dir.display()))?;
        let outbox = Outbox::open(&dir, outbox_capacity)?;
        let robot_type = if index.is_multiple_of(2) {
            RobotType::Lekiwi
        } else {
            RobotType::Xlerobot
        };
        let hardware_id = simulated_hardware_id(prefix, index);
        let b = index.to_be_bytes();
        let identity = Identity {
            robot_id: kiwi_protocol::RobotId::from_hardware(&hardware_id),
            hardware_id,
            hostname: format!("{prefix}-{index:05}"),
            robot_type,
            model: Some("Raspberry Pi 5 Model B Rev 1.0 (simulated)".into()),
            os_version: Some("Debian GNU/Linux 12 (bookworm)".into()),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            // Locally administered, unique per index.
            mac_addresses: vec![[0x02, 0x6b, b[0], b[1], b[2], b[3]]],
            ip_addresses: Vec::new(),
        };
        Ok(Self::new(
            identity,
            TelemetrySource::Simulated(Box::new(FakeTelemetry::new(u64::from(index)))),
            Workload::simulated(),
            state,
            outbox,
            report_interval,
        ))
    }

    /// Replaces the workload (e.g. a simulated one with slow actions).
    pub fn with_workload(mut self, workload: Workload) -> Self {
        self.workload = workload;
        self
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The outbox, shared (tests and the link read it).
    pub fn outbox(&self) -> &OutboxHandle {
        &self.outbox
    }

    pub fn maintenance(&self) -> bool {
        self.state.maintenance()
    }

    pub fn report_interval(&self) -> Duration {
        self.report_interval
    }

    /// Brings the workload in line with the persisted flags after a start:
    /// a robot that was in maintenance keeps its workload stopped.
    pub async fn resume(&mut self) {
        if self.state.maintenance()
            && let Err(e) = self.workload.stop().await
        {
            tracing::warn!(error = %e, "in maintenance, but the workload could not be stopped");
        }
    }

    /// Samples telemetry, health and workload; when a report is due, numbers
    /// it, stores it in the outbox and returns it for sending.
    pub async fn observe(&mut self, now: Instant) -> Option<Report> {
        let telemetry = self.telemetry.sample().await;
        let workload = self.workload.state().await;
        let health = probe::evaluate_health(&telemetry, workload);
        let observed = Observed {
            health,
            workload,
            maintenance: self.state.maintenance(),
        };
        let reason = self.tracker.decide(now, &observed, self.report_interval)?;
        let report = Report {
            seq: 0,
            time_ms: unix_ms(),
            health: observed.health.clone(),
            workload,
            maintenance: observed.maintenance,
            telemetry,
        };
        match self.outbox.push(report).await {
            Ok(stored) => {
                tracing::debug!(seq = stored.seq, reason = %reason.describe(), "report");
                self.tracker.record(now, observed);
                Some(stored)
            }
            Err(e) => {
                // The next sample tries again; the agent keeps its link.
                tracing::error!(error = format!("{e:#}"), "cannot store a report");
                None
            }
        }
    }

    /// Records the controller's ack.
    pub async fn ack(&mut self, seq: u64) {
        if let Err(e) = self.outbox.ack(seq).await {
            tracing::error!(seq, error = format!("{e:#}"), "cannot record an ack");
        }
    }

    /// Begins a controller command: the agent's own state changes (and is
    /// persisted) at once; a workload action that takes time is returned as
    /// a job to await off the link loop.
    pub fn begin(&mut self, kind: &CommandKind) -> Execution {
        match kind {
            CommandKind::Provision { config } => match self.state.set_provisioned(config) {
                Ok(()) => self.begin_desired(config),
                Err(e) => {
                    Execution::failed(format!("cannot store the provisioned configuration: {e}"))
                }
            },
            CommandKind::EnterMaintenance => self.begin_maintenance(true),
            CommandKind::LeaveMaintenance => self.begin_maintenance(false),
            CommandKind::RestartWorkload if self.state.maintenance() => Execution::failed(
                "the robot is in maintenance; leave maintenance to run its workload".into(),
            ),
            CommandKind::RestartWorkload => {
                let job = self.workload.begin(Action::Restart);
                Execution::Running(Box::pin(async move {
                    match job.await {
                        Ok(()) => CommandOutcome::Done,
                        Err(e) => CommandOutcome::Failed {
                            error: e.to_string(),
                        },
                    }
                }))
            }
            CommandKind::Ping => Execution::Finished(CommandOutcome::Done),
        }
    }

    /// Executes a controller command to the end.
    pub async fn execute(&mut self, kind: &CommandKind) -> CommandOutcome {
        self.begin(kind).finish().await
    }

    /// Begins reconciling with the controller's desired configuration;
    /// idempotent.
    pub fn begin_desired(&mut self, desired: &DesiredConfig) -> Execution {
        let plan = decide::reconcile(desired, self.state.maintenance(), self.report_interval);
        if let Some(interval) = plan.report_interval {
            tracing::info!(?interval, "report interval set by the controller");
            self.report_interval = interval;
        }
        match plan.maintenance {
            Some(on) => self.begin_maintenance(on),
            None => Execution::Finished(CommandOutcome::Done),
        }
    }

    /// Reconciles with the controller's desired configuration to the end.
    pub async fn apply_desired(&mut self, desired: &DesiredConfig) -> Result<(), String> {
        match self.begin_desired(desired).finish().await {
            CommandOutcome::Done => Ok(()),
            CommandOutcome::Failed { error } => Err(error),
        }
    }

    /// Enters or leaves maintenance: the flag is persisted first, so that a
    /// failed workload action is retried by the next reconcile or restart.
    fn begin_maintenance(&mut self, on: bool) -> Execution {
        if let Err(e) = self.state.set_maintenance(on) {
            return Execution::failed(format!("cannot persist the maintenance flag: {e}"));
        }
        tracing::info!(
            maintenance = on,
            "maintenance {}",
            if on { "entered" } else { "left" }
        );
        let job = self
            .workload
            .begin(if on { Action::Stop } else { Action::Start });
        Execution::Running(Box::pin(async move {
            match job.await {
                Ok(()) => CommandOutcome::Done,
                Err(e) if on => CommandOutcome::Failed {
                    error: format!("in maintenance, but the workload could not be stopped: {e}"),
                },
                Err(e) => CommandOutcome::Failed {
                    error: format!(
                        "out of maintenance, but the workload could not be started: {e}"
                    ),
                },
            }
        }))
    }
}

/// The hardware id of simulated agent `index`: `Configured("{prefix}-{index}")`.
fn simulated_hardware_id(prefix: &str, index: u32) -> kiwi_protocol::HardwareId {
    kiwi_protocol::HardwareId::Configured(format!("{prefix}-{index}"))
}

/// Where simulated agent `index` keeps its state (its outbox, flags and
/// credentials) under the simulator's `state_root`.
pub fn simulated_state_dir(state_root: &Path, prefix: &str, index: u32) -> PathBuf {
    state_root.join(format!("{prefix}-{index}"))
}

/// The robot id of simulated agent `index` (what [`Agent::simulated`] gives
/// it).
pub fn simulated_robot_id(prefix: &str, index: u32) -> kiwi_protocol::RobotId {
    kiwi_protocol::RobotId::from_hardware(&simulated_hardware_id(prefix, index))
}

/// A command's outcome, now or once its workload action finishes.
pub enum Execution {
    Finished(CommandOutcome),
    /// A workload action still running; the future borrows nothing.
    Running(Pin<Box<dyn Future<Output = CommandOutcome> + Send>>),
}

impl Execution {
    fn failed(error: String) -> Self {
        Execution::Finished(CommandOutcome::Failed { error })
    }

    /// Waits for the outcome.
    pub async fn finish(self) -> CommandOutcome {
        match self {
            Execution::Finished(outcome) => outcome,
            Execution::Running(job) => job.await,
        }
    }
}

impl std::fmt::Debug for Execution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Execution::Finished(outcome) => f.debug_tuple("Finished").field(outcome).finish(),
            Execution::Running(_) => f.write_str("Running"),
        }
    }
}

/// Now as Unix milliseconds.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiwi_protocol::message::{HealthStatus, WorkloadState};

    fn sim(dir: &Path) -> Agent {
        Agent::simulated(3, "t", dir, Duration::from_secs(30), 100).unwrap()
    }

    #[tokio::test]
    async fn reports_on_first_sample_and_on_change_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = sim(dir.path());
        assert_eq!(a.identity().hostname, "t-00003");
        assert_eq!(a.identity().robot_type, RobotType::Xlerobot);
        let t0 = Instant::now();
        let r = a.observe(t0).await.unwrap();
        assert_eq!(r.seq, 1);
        assert_eq!(r.workload, WorkloadState::Running);
        assert_eq!(r.health.status, HealthStatus::Healthy);
        assert!(a.observe(t0 + Duration::from_secs(1)).await.is_none());

        assert_eq!(
            a.execute(&CommandKind::EnterMaintenance).await,
            CommandOutcome::Done
        );
        let r = a.observe(t0 + Duration::from_secs(2)).await.unwrap();
        assert_eq!(
            (r.seq, r.maintenance, r.workload),
            (2, true, WorkloadState::Stopped)
        );
        assert!(matches!(
            a.execute(&CommandKind::RestartWorkload).await,
            CommandOutcome::Failed { .. }
        ));
        assert_eq!(a.outbox().pending().len(), 2);
        a.ack(2).await;
        assert!(a.outbox().pending().is_empty());
        assert!(a.observe(t0 + Duration::from_secs(31)).await.is_none());
        assert!(a.observe(t0 + Duration::from_secs(32)).await.is_some());
    }

    #[tokio::test]
    async fn provision_persists_and_reconciles() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = sim(dir.path());
        let config = DesiredConfig {
            maintenance: true,
            report_interval_ms: 2_000,
            settings: vec![("camera".into(), "on".into())],
        };
        let outcome = a
            .execute(&CommandKind::Provision {
                config: config.clone(),
            })
            .await;
        assert_eq!(outcome, CommandOutcome::Done);
        assert!(a.maintenance());
        assert_eq!(a.report_interval(), Duration::from_secs(2));
        // Applying the same desired state again changes nothing.
        a.apply_desired(&config).await.unwrap();
        assert!(a.maintenance());
        drop(a);

        let mut a = sim(dir.path());
        assert!(a.maintenance());
        assert_eq!(a.report_interval(), Duration::from_secs(2));
        a.resume().await;
        let r = a.observe(Instant::now()).await.unwrap();
        assert_eq!(r.workload, WorkloadState::Stopped);
        let stored: DesiredConfig = serde_json::from_slice(
            &std::fs::read(dir.path().join("t-3").join("provisioned-config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(stored, config);
        a.apply_desired(&DesiredConfig::default()).await.unwrap();
        assert!(!a.maintenance());
        assert_eq!(a.execute(&CommandKind::Ping).await, CommandOutcome::Done);
    }

    #[tokio::test]
    async fn real_agent_from_a_prepared_tree() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        crate::probe::testtree::write(
            root.path(),
            "etc/machine-id",
            "0123456789abcdef0123456789abcdef",
        );
        crate::probe::testtree::write(
            root.path(),
            "proc/meminfo",
            "MemTotal: 1000 kB\nMemAvailable: 10 kB\n",
        );
        let cfg = crate::config::AgentConfig {
            controller: "127.0.0.1:1".parse().unwrap(),
            transport: crate::config::Transport::WebSocket,
            state_dir: state.path().to_path_buf(),
            sys_root: root.path().to_path_buf(),
            robot_type: None,
            workload_unit: None,
            report_interval: Duration::from_secs(30),
            outbox_capacity: 10,
            reconnect_base: Duration::from_millis(100),
            reconnect_cap: Duration::from_secs(1),
            announce: crate::config::AnnounceConfig::default(),
            enroll_token: None,
        };
        let mut a = Agent::from_config(&cfg).unwrap();
        let r = a.observe(Instant::now()).await.unwrap();
        assert_eq!(r.workload, WorkloadState::NotConfigured);
        assert_eq!(r.health.status, HealthStatus::Degraded);
        // The prepared tree's memory is low; disk space is the real state
        // directory's, so a nearly full machine may add its reason.
        assert_eq!(
            r.health.reasons.first().map(String::as_str),
            Some(crate::probe::health::REASON_MEMORY)
        );
        assert!(
            r.health.reasons[1..]
                .iter()
                .all(|reason| reason == crate::probe::health::REASON_DISK),
            "{:?}",
            r.health.reasons
        );
        assert_eq!(
            a.execute(&CommandKind::RestartWorkload).await,
            CommandOutcome::Failed {
                error: "no workload unit configured".into()
            }
        );
    }
}
