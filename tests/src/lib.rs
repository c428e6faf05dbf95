//! The cross-crate test harness: real `kiwi-controller` and `kiwi-agent`
//! processes on loopback, driven through their public interfaces (the REST
//! API, the watch stream, the agent WebSocket speaking the real protocol,
//! and signals).
//!
//! A test builds what it needs and owns it; every process dies when its
//! handle drops, also when the test panics, and then the tail of its log is
//! printed:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use kiwi_tests::{Agent, ControllerOptions, State, test_serial, wait_until, secs};
//! let controller = ControllerOptions::new().liveness_timeout("1s").start().await;
//! let agent = Agent::start(&controller, &test_serial(1));
//! let robot = wait_until(secs(20), || async {
//!     let robot = controller.api().robot_required(agent.robot_id()).await?;
//!     anyhow::ensure!(robot.state == State::Ready, "state is {}", robot.state);
//!     Ok(robot)
//! })
//! .await;
//! # Ok(()) }
//! ```
//!
//! The LAN discovery tests use [`lan`]: a simulated robot LAN built from
//! network namespaces (needs root), with real `sshd` servers posing as
//! robots without an agent.
//!
//! Conditions are awaited with [`wait_until`] (poll, deadline, then a panic
//! that says what was last seen), never with a sleep standing in for an
//! assertion.

pub mod agent;
pub mod agent_port;
pub mod api;
pub mod browser;
pub mod controller;
pub mod lan;
pub mod lan_fleet;
pub mod poller;
pub mod process;
pub mod raw_http;
pub mod services;
pub mod watch;

use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

pub use agent::{
    Agent, AgentOptions, AgentSummary, SimulationSummary, Simulator, SimulatorOptions,
    made_between, robot_id_for_serial, simulated_robot_id, test_serial,
};
pub use api::{Api, Event, Health, HealthStatus, Problem, Report, Robot, State};
pub use controller::{Controller, ControllerOptions};
pub use services::{PgCluster, RedisKeys, RedisServer, TestDatabase};
pub use watch::{Resume, SseEvent, Watch};

/// How often [`wait_until`] checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// `Duration::from_secs`, short for deadlines.
pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The wall clock in Unix milliseconds (what report times and the
/// simulator's summary are given in).
pub fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    i64::try_from(since.as_millis()).expect("milliseconds fit in i64")
}

/// A loopback port that was free a moment ago. The probe socket is closed
/// again, so the port can be handed to a child process (and reused by the
/// same child after a restart).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a probe socket on 127.0.0.1:0")
        .port()
}

/// Polls `check` every [`POLL_INTERVAL`] until it returns `Ok`, and returns
/// its value. `Err` means "not yet" and says what was seen; if the
/// condition does not hold within `timeout`, this panics with the last
/// such message.
pub async fn wait_until<T, F, Fut>(timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    wait_until_every(timeout, POLL_INTERVAL, check).await
}

/// [`wait_until`] with another polling interval (for expensive checks, such
/// as listing hundreds of robots on a busy machine).
pub async fn wait_until_every<T, F, Fut>(timeout: Duration, interval: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        // A check that hangs past the deadline is a failure too.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(interval);
        let outcome = match tokio::time::timeout(left, check()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(anyhow::anyhow!("the check itself did not finish in time")),
        };
        match outcome {
            Ok(value) => return value,
            Err(e) if Instant::now() >= deadline => {
                panic!(
                    "condition not met within {timeout:?} (waited {:?}); last seen: {e:#}",
                    start.elapsed()
                )
            }
            Err(_) => tokio::time::sleep(interval).await,
        }
    }
}

/// Waits until robot `id` exists and `pred` holds for it, and returns it.
/// `what` names the condition in the failure message.
pub async fn wait_for_robot(
    api: &Api,
    id: Uuid,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Robot) -> bool,
) -> Robot {
    let pred = &pred;
    wait_until(timeout, move || async move {
        let robot = api.robot_required(id).await?;
        anyhow::ensure!(
            pred(&robot),
            "robot {id} is not {what}: state {}, connected {}, health {:?}, version {}",
            robot.state,
            robot.connected,
            robot.health.status,
            robot.version
        );
        Ok(robot)
    })
    .await
}

/// Waits until robot `id` is in `state` and returns it.
pub async fn wait_for_state(api: &Api, id: Uuid, state: State, timeout: Duration) -> Robot {
    wait_for_robot(api, id, timeout, state.as_str(), |r| r.state == state).await
}

/// Waits until robot `id` is `ready` with its agent connected.
pub async fn wait_ready_and_connected(api: &Api, id: Uuid, timeout: Duration) -> Robot {
    wait_for_robot(api, id, timeout, "ready and connected", |r| {
        r.state == State::Ready && r.connected
    })
    .await
}

/// Waits until `GET /readyz` answers 200 with `"status": status` (`ready`
/// or `degraded`) and returns its body.
pub async fn wait_readyz_status(api: &Api, status: &str, timeout: Duration) -> serde_json::Value {
    wait_until(timeout, || async move {
        let (code, body) = api.readyz().await?;
        anyhow::ensure!(
            code == reqwest::StatusCode::OK && body["status"] == status,
            "GET /readyz answered {code} {body}, waiting for 200 with status {status:?}"
        );
        Ok(body)
    })
    .await
}

/// Waits until `GET /readyz` answers `code` (whatever its body says) and
/// returns the body.
pub async fn wait_readyz_code(
    api: &Api,
    code: reqwest::StatusCode,
    timeout: Duration,
) -> serde_json::Value {
    wait_until(timeout, || async move {
        let (answered, body) = api.readyz().await?;
        anyhow::ensure!(
            answered == code,
            "GET /readyz answered {answered} {body}, waiting for {code}"
        );
        Ok(body)
    })
    .await
}

/// Runs `f` and fails if it does not finish within `timeout`.
pub async fn within<T>(timeout: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, f).await {
        Ok(value) => value,
        Err(_) => panic!("{what} did not finish within {timeout:?}"),
    }
}
