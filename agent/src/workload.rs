//! The robot's workload: its main service (e.g. the LeRobot host), which the
//! agent watches (is it running?) and drives (stop for maintenance, start
//! again, restart on command). On a robot it is a systemd unit driven with
//! `systemctl`; simulated agents keep its state in memory.

use kiwi_protocol::message::WorkloadState;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::process::Command;

/// How long `systemctl is-active` may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `systemctl stop/start/restart` may take (a unit's own stop
/// timeout is often longer; the agent reports a failure and the unit goes
/// on).
pub const ACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// The robot's main service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// No workload unit is configured.
    None,
    /// A systemd unit, driven with `systemctl`.
    Systemd { unit: String },
    /// An in-memory workload for simulated agents: running unless stopped.
    /// Its state changes at once; each action then takes `action_delay` to
    /// finish, as a real service takes time to stop.
    Simulated {
        state: WorkloadState,
        action_delay: Duration,
    },
}

/// Why a workload action failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    #[error("no workload unit configured")]
    NotConfigured,
    #[error("`{command}` could not run: {detail}")]
    Spawn { command: String, detail: String },
    #[error("`{command}` timed out after {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("`{command}` failed ({status}): {detail}")]
    Failed {
        command: String,
        status: String,
        detail: String,
    },
}

/// The workload actions the controller can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Stop,
    Start,
    Restart,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Stop => "stop",
            Action::Start => "start",
            Action::Restart => "restart",
        }
    }
}

impl Workload {
    /// The workload for an optional configured unit.
    pub fn from_unit(unit: Option<String>) -> Self {
        match unit {
            Some(unit) => Workload::Systemd { unit },
            None => Workload::None,
        }
    }

    /// A simulated workload, running.
    pub fn simulated() -> Self {
        Workload::Simulated {
            state: WorkloadState::Running,
            action_delay: Duration::ZERO,
        }
    }

    /// Whether the workload runs now.
    pub async fn state(&self) -> WorkloadState {
        match self {
            Workload::None => WorkloadState::NotConfigured,
            Workload::Simulated { state, .. } => *state,
            Workload::Systemd { unit } => {
                // `is-active` exits non-zero for anything but "active": its
                // answer is on stdout either way.
                match run("systemctl", &["is-active", unit], QUERY_TIMEOUT).await {
                    Ok(out) | Err(RunError::Status(out)) => {
                        parse_is_active(&String::from_utf8_lossy(&out.stdout))
                    }
                    Err(e) => {
                        tracing::debug!(unit = %unit, error = %e.into_workload_error("systemctl is-active"), "cannot query the workload");
                        WorkloadState::Unknown
                    }
                }
            }
        }
    }

    /// Stops the workload (idempotent; nothing to do without one).
    pub async fn stop(&mut self) -> Result<(), WorkloadError> {
        self.begin(Action::Stop).await
    }

    /// Starts the workload (idempotent; nothing to do without one).
    pub async fn start(&mut self) -> Result<(), WorkloadError> {
        self.begin(Action::Start).await
    }

    /// Restarts the workload; fails when none is configured.
    pub async fn restart(&mut self) -> Result<(), WorkloadError> {
        self.begin(Action::Restart).await
    }

    /// Begins `action` and gives the rest of it as a job that borrows
    /// nothing, so the link can await it beside its heartbeats: a systemd
    /// unit may take many seconds to stop. In-memory workloads are done by
    /// the time this returns.
    pub fn begin(&mut self, action: Action) -> Job {
        let done = |r| -> Job { Box::pin(std::future::ready(r)) };
        match self {
            Workload::None if action == Action::Restart => done(Err(WorkloadError::NotConfigured)),
            Workload::None => done(Ok(())),
            Workload::Simulated {
                state,
                action_delay,
            } => {
                *state = match action {
                    Action::Stop => WorkloadState::Stopped,
                    Action::Start | Action::Restart => WorkloadState::Running,
                };
                if action_delay.is_zero() {
                    done(Ok(()))
                } else {
                    let delay = *action_delay;
                    Box::pin(async move {
                        tokio::time::sleep(delay).await;
                        Ok(())
                    })
                }
            }
            Workload::Systemd { unit } => {
                let unit = unit.clone();
                Box::pin(async move {
                    let command = format!("systemctl {} {unit}", action.verb());
                    run("systemctl", &[action.verb(), &unit], ACTION_TIMEOUT)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.into_workload_error(&command))
                })
            }
        }
    }
}

/// The remainder of a workload action, owning everything it needs.
pub type Job = Pin<Box<dyn Future<Output = Result<(), WorkloadError>> + Send>>;

/// Maps `systemctl is-active` output to a workload state.
pub fn parse_is_active(stdout: &str) -> WorkloadState {
    match stdout.lines().next().unwrap_or("").trim() {
        "active" => WorkloadState::Running,
        "failed" => WorkloadState::Failed,
        "inactive" | "deactivating" => WorkloadState::Stopped,
        _ => WorkloadState::Unknown,
    }
}

/// Why a command did not succeed.
#[derive(Debug)]
pub enum RunError {
    Spawn(std::io::Error),
    Timeout(Duration),
    /// It ran and exited unsuccessfully.
    Status(std::process::Output),
}

impl RunError {
    fn into_workload_error(self, command: &str) -> WorkloadError {
        let command = command.to_string();
        match self {
            RunError::Spawn(e) => WorkloadError::Spawn {
                command,
                detail: e.to_string(),
            },
            RunError::Timeout(after) => WorkloadError::Timeout { command, after },
            RunError::Status(out) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let stdout = String::from_utf8_lossy(&out.stdout);
                let detail = if stderr.trim().is_empty() {
                    stdout.trim().to_string()
                } else {
                    stderr.trim().to_string()
                };
                WorkloadError::Failed {
                    command,
                    status: out.status.to_string(),
                    detail,
                }
            }
        }
    }
}

/// Runs `program args` with a timeout, killing it when the time is up.
pub async fn run(
    program: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<std::process::Output, RunError> {
    let child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(timeout, child).await {
        Err(_) => Err(RunError::Timeout(timeout)),
        Ok(Err(e)) => Err(RunError::Spawn(e)),
        Ok(Ok(out)) if out.status.success() => Ok(out),
        Ok(Ok(out)) => Err(RunError::Status(out)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_active_mapping() {
        assert_eq!(parse_is_active("active\n"), WorkloadState::Running);
        assert_eq!(parse_is_active("failed\n"), WorkloadState::Failed);
        assert_eq!(parse_is_active("inactive\n"), WorkloadState::Stopped);
        assert_eq!(parse_is_active("deactivating"), WorkloadState::Stopped);
        assert_eq!(parse_is_active("activating\n"), WorkloadState::Unknown);
        assert_eq!(parse_is_active(""), WorkloadState::Unknown);
    }

    #[tokio::test]
    async fn none_and_simulated() {
        let mut w = Workload::from_unit(None);
        assert_eq!(w.state().await, WorkloadState::NotConfigured);
        assert!(w.stop().await.is_ok());
        assert_eq!(
            w.restart().await.unwrap_err().to_string(),
            "no workload unit configured"
        );

        let mut w = Workload::simulated();
        assert_eq!(w.state().await, WorkloadState::Running);
        w.stop().await.unwrap();
        assert_eq!(w.state().await, WorkloadState::Stopped);
        w.restart().await.unwrap();
        assert_eq!(w.state().await, WorkloadState::Running);
    }

    #[tokio::test]
    async fn commands_time_out_and_report_failures() {
        let out = run("sh", &["-c", "echo active"], Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            parse_is_active(&String::from_utf8_lossy(&out.stdout)),
            WorkloadState::Running
        );
        let err = run("sh", &["-c", "sleep 5"], Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::Timeout(_)));
        let err = run(
            "sh",
            &["-c", "echo nope >&2; exit 3"],
            Duration::from_secs(5),
        )
        .await
        .unwrap_err()
        .into_workload_error("x");
        assert!(
            matches!(&err, WorkloadError::Failed { detail, .. } if detail == "nope"),
            "{err:?}"
        );
        let err = run("/nonexistent/kiwi-systemctl", &[], Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::Spawn(_)));
    }
}
