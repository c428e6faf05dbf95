//! Failure detection under Wi-Fi-like conditions: how soon an unplugged
//! robot is recorded `offline`, and how often a working one is by mistake,
//! for heartbeats every 100 ms, 250 ms and 1 s, next to a fixed-timeout
//! detector given the same heartbeat arrivals.
//!
//! Each case gets a simulated LAN of its own (`kiwi_tests::lan`, needs
//! root) with 1 % loss on every robot's link and 2 ms ± 1 ms of delay each
//! way (nftables and `kiwi-netdelay`: this kernel has no `tc netem`), real
//! `kiwi-agent` processes in the robot namespaces (over QUIC, what the
//! default `auto` tries first, at every interval; over WebSocket, what
//! `auto` falls back to, at 250 ms too), and the controller in this
//! process, its threads in the controller namespace: the components
//! `kiwi-controller serve` builds, with their background tasks (liveness
//! among them) and the agent endpoint over WebSocket and QUIC, without the
//! REST API. In this process because the arrival times come from the
//! controller's own sessions: the `now_ms` each frame or liveness marker
//! gave the failure detector, read every millisecond. The
//! `kiwi-controller` process does not expose them.
//!
//! 1. Sustained: every robot connected, none unplugged. Every `offline` is
//!    a false positive, and so is every loss the replayed detectors find.
//! 2. Unplugged, in rounds: each robot's `eth0` goes down at a random
//!    moment within one heartbeat interval; its detection time runs from
//!    the moment `ip link set eth0 down` returned to the robot's `offline`
//!    in the controller's read model (what the API serves), read every
//!    millisecond. The links then come back, the agents reconnect, and
//!    the next round waits ten heartbeat intervals while their new
//!    sessions' detectors adapt.
//!
//! The recorded arrivals are then replayed session by session through the
//! controller's [`Watch`] (φ accrual and the active probe: the decision the
//! liveness sweep asks for, stepped every millisecond instead of at the
//! sweep's period) and through a fixed-timeout detector (`offline` after
//! three heartbeat intervals of silence, the classic choice: two lost
//! heartbeats are tolerated, a third means gone). Both see identical
//! input, so their ratio is the detectors' alone.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use kiwi_controller::config::Config;
use kiwi_controller::domain::LifecycleState;
use kiwi_controller::domain::damping::DampingSettings;
use kiwi_controller::domain::detector::{DetectorSettings, Step, Watch};
use kiwi_controller::fleet::Parts;
use kiwi_controller::link;
use kiwi_controller::liveness::LivenessConfig;
use kiwi_controller::security::tokens;
use kiwi_controller::serve::Components;
use kiwi_controller::sessions::now_ms;
use kiwi_protocol::RobotId;
use kiwi_security::verify::{ALPN_HTTP1, ALPN_QUIC};
use kiwi_tests::lan::{DelayGuard, Lan};
use kiwi_tests::lan_fleet::{AGENT_URL, LanAgent};
use rand::Rng as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::{Row, Stats, fmt_duration, lan_unavailable, progress};

/// How the agents talk to the controller in a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// What `auto` (the default) tries first: one arrival per heartbeat.
    Quic,
    /// What `auto` falls back to when QUIC does not answer, and keeps for
    /// five minutes (after an outage, too): the agent also answers the
    /// controller's ping every heartbeat interval with a pong, which the
    /// controller counts as an arrival a few milliseconds after the
    /// heartbeat.
    WebSocket,
}

impl Transport {
    /// The agent's `transport` setting.
    fn setting(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::WebSocket => "websocket",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Transport::Quic => "QUIC",
            Transport::WebSocket => "WebSocket",
        }
    }
}

/// One configuration measured, on a LAN of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Case {
    hb: Duration,
    transport: Transport,
}

/// The cases of a full run: every interval over QUIC, and the target's
/// interval over WebSocket too (the agents' transport changes what the
/// detector sees).
const CASES: [Case; 4] = [
    Case {
        hb: Duration::from_millis(100),
        transport: Transport::Quic,
    },
    Case {
        hb: TARGET_HEARTBEAT,
        transport: Transport::Quic,
    },
    Case {
        hb: Duration::from_secs(1),
        transport: Transport::Quic,
    },
    Case {
        hb: TARGET_HEARTBEAT,
        transport: Transport::WebSocket,
    },
];
/// Loss on each robot's link, in percent of frames.
const LOSS_PERCENT: f64 = 1.0;
/// Delay each way, and its uniform jitter.
const DELAY: Duration = Duration::from_millis(2);
const JITTER: Duration = Duration::from_millis(1);
/// The fixed-timeout baseline: `offline` after this many heartbeat
/// intervals without an arrival.
const FIXED_TIMEOUT_HEARTBEATS: u32 = 3;
/// The controller's ceiling far away, so that only the failure detector
/// decides (as in `tests/tests/lan_liveness.rs`).
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a set-up step may take (the LAN, agents connecting, agents
/// back after a round) before the run is abandoned.
const DEADLINE: Duration = Duration::from_secs(60);
/// How often the recorder reads the sessions and the read model.
const RECORD_POLL: Duration = Duration::from_millis(1);
/// How often a wait checks the robots.
const WAIT_POLL: Duration = Duration::from_millis(10);
/// Agents retry soon once their link is back (the reconnection is not
/// what is measured).
const AGENT_RECONNECT: [(&str, &str); 2] = [
    ("KIWI_AGENT_RECONNECT_BASE", "100ms"),
    ("KIWI_AGENT_RECONNECT_CAP", "1s"),
];
/// BRIEF §8: at 250 ms heartbeats, `offline` within 2 s (p99) and no false
/// positive in 10 minutes under 1 % loss and 2 ms ± jitter.
const TARGET_HEARTBEAT: Duration = Duration::from_millis(250);
const TARGET_P99: Duration = Duration::from_secs(2);
const TARGET_EXPOSURE: Duration = Duration::from_secs(600);

/// Sizes of one run.
#[derive(Debug, Clone)]
struct Plan {
    cases: Vec<Case>,
    robots: usize,
    /// The sustained phase; robots × this is the exposure to false
    /// positives.
    sustained: Duration,
    /// Unplug rounds (each gives one sample per robot).
    rounds: usize,
    /// Heartbeat intervals a reconnected robot runs before the next round.
    settle_heartbeats: u32,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                // 250 ms over QUIC.
                cases: vec![CASES[1]],
                robots: 3,
                sustained: Duration::from_secs(4),
                rounds: 1,
                settle_heartbeats: 0,
            }
        } else {
            // 10 robots × 60 s: the 10 minutes of the target.
            Plan {
                cases: CASES.to_vec(),
                robots: 10,
                sustained: Duration::from_secs(60),
                rounds: 4,
                settle_heartbeats: 10,
            }
        }
    }

    /// How long the recorder may run at heartbeat `hb`: everything the
    /// run may wait for, and a margin.
    fn record_limit(&self, hb: Duration) -> Duration {
        let round = hb + offline_deadline(hb) + DEADLINE + hb * self.settle_heartbeats;
        // Setting up, then the phases, then a margin.
        DEADLINE * 2 + self.sustained + round * u32::try_from(self.rounds).unwrap_or(u32::MAX)
    }
}

/// How long unplugged robots may take to be recorded `offline`.
fn offline_deadline(hb: Duration) -> Duration {
    hb * 20 + Duration::from_secs(10)
}

/// The figures of one case.
#[derive(Debug)]
struct Measured {
    case: Case,
    robots: usize,
    /// The sustained phase as it ran.
    sustained: Duration,
    /// Unplug rounds.
    rounds: usize,
    // Sustained phase.
    controller_offline: usize,
    controller_suspicions: u64,
    phi_lost: usize,
    phi_suspicions: usize,
    fixed_offline: usize,
    /// Time between arrivals.
    gaps: Stats,
    arrivals_per_second: f64,
    // Unplugged, from the moment the link went down.
    controller: Stats,
    phi: Stats,
    fixed: Stats,
    // Unplugged, from the robot's last arrival.
    controller_after_last: Stats,
    phi_after_last: Stats,
    phi_suspect_after_last: Stats,
    /// How long `ip link set eth0 down` took.
    unplug_command: Stats,
}

/// The section's rows: two per case.
pub(super) async fn failure_detection(quick: bool) -> Result<Vec<Row>> {
    if let Some(why) = lan_unavailable() {
        progress(&format!(
            "failure detection: SKIPPED ({why}): it needs root for network namespaces; \
             its rows say \"not measured\""
        ));
        let note = format!(
            "not measured in this run ({why}): the simulated LAN is built from network \
             namespaces, which needs root"
        );
        return Ok(CASES
            .iter()
            .flat_map(|&case| not_measured(case, "not measured: needs root", &note))
            .collect());
    }
    let plan = Plan::new(quick);
    tokio::task::spawn_blocking(move || {
        let mut rows = Vec::new();
        for case in CASES {
            if !plan.cases.contains(&case) {
                let note = format!(
                    "not measured in --quick (only {} over QUIC, as a smoke run)",
                    fmt_duration(TARGET_HEARTBEAT)
                );
                rows.extend(not_measured(case, "not measured in --quick", &note));
                continue;
            }
            let what = format!(
                "failure detection at {} heartbeats over {}",
                fmt_duration(case.hb),
                case.transport.name()
            );
            progress(&format!(
                "{what}: {} robots, {} sustained, {} unplug round(s)",
                plan.robots,
                fmt_duration(plan.sustained),
                plan.rounds
            ));
            let started = Instant::now();
            let m = measure(&plan, case).context(what)?;
            progress(&format!(
                "  unplugged -> offline p50 {} (fixed {}), false offline {} (fixed {}), in {}",
                fmt_duration(m.controller.p50),
                fmt_duration(m.fixed.p50),
                m.controller_offline,
                m.fixed_offline,
                fmt_duration(started.elapsed())
            ));
            rows.extend(m.rows());
        }
        Ok(rows)
    })
    .await
    .map_err(|e| anyhow!("the failure-detection section panicked (see above): {e}"))?
}

fn detection_metric(case: Case) -> String {
    format!(
        "Unplugged robot → `offline`, heartbeat {}, {} (1 % loss, 2 ± 1 ms)",
        fmt_duration(case.hb),
        case.transport.name()
    )
}

fn false_positive_metric(case: Case) -> String {
    format!(
        "False `offline`, no robot unplugged, heartbeat {}, {} (1 % loss, 2 ± 1 ms)",
        fmt_duration(case.hb),
        case.transport.name()
    )
}

fn detection_target(hb: Duration) -> String {
    if hb == TARGET_HEARTBEAT {
        format!("p99 ≤ {}", fmt_duration(TARGET_P99))
    } else {
        "—".into()
    }
}

fn false_positive_target(hb: Duration) -> String {
    if hb == TARGET_HEARTBEAT {
        format!("0 in {} min", TARGET_EXPOSURE.as_secs() / 60)
    } else {
        "—".into()
    }
}

/// The two rows of a case that was not measured.
fn not_measured(case: Case, short: &str, note: &str) -> [Row; 2] {
    let row = |metric: String, target: String| Row {
        metric,
        kiwi: short.into(),
        baseline: "—".into(),
        ratio: "—".into(),
        target,
        met: None,
        note: note.into(),
    };
    [
        row(detection_metric(case), detection_target(case.hb)),
        row(false_positive_metric(case), false_positive_target(case.hb)),
    ]
}

impl Measured {
    fn rows(&self) -> [Row; 2] {
        let hb = self.case.hb;
        let fixed = hb * FIXED_TIMEOUT_HEARTBEATS;
        let liveness = liveness_config(hb);
        let conditions = format!(
            "{} robots (real `kiwi-agent` over {}) on the simulated LAN, 1 % loss on \
             each robot's link and 2 ms ± 1 ms of delay each way, against the controller's \
             components run in this process in the controller namespace (liveness sweep every \
             {}, probe timeout {}, `liveness_timeout` {} so that only the failure detector \
             decides)",
            self.robots,
            self.case.transport.name(),
            fmt_duration(liveness.period()),
            fmt_duration(liveness.probe_timeout()),
            fmt_duration(LIVENESS_TIMEOUT)
        );
        let detection = Row {
            metric: detection_metric(self.case),
            kiwi: format!(
                "controller p50 {} · p99 {} (n = {}); φ replayed p50 {} · p99 {}",
                fmt_duration(self.controller.p50),
                fmt_duration(self.controller.p99),
                self.controller.n,
                fmt_duration(self.phi.p50),
                fmt_duration(self.phi.p99)
            ),
            baseline: format!(
                "fixed {} timeout, same arrivals: p50 {} · p99 {}",
                fmt_duration(fixed),
                fmt_duration(self.fixed.p50),
                fmt_duration(self.fixed.p99)
            ),
            ratio: format!(
                "p50 {} · p99 {} (φ ÷ fixed)",
                times(self.phi.p50, self.fixed.p50),
                times(self.phi.p99, self.fixed.p99)
            ),
            target: detection_target(hb),
            met: (hb == TARGET_HEARTBEAT).then_some(self.controller.p99 <= TARGET_P99),
            note: format!(
                "{conditions}; {} rounds, each robot's `eth0` set down at a random moment within \
                 one heartbeat interval. Controller: from `ip link set eth0 down` returning (it \
                 took p50 {}) to the robot `offline` in the read model, read every millisecond; \
                 counted from the robot's last arrival instead, p50 {} · p99 {}. φ replayed: the \
                 recorded arrivals of each session through the controller's `Watch` (φ ≥ 8: \
                 suspect and probe; the probe unanswered for {}: lost), stepped every \
                 millisecond, from the same moment; from the last arrival, suspect p50 {} · p99 \
                 {} and lost p50 {} · p99 {}. Fixed: `offline` {} after the last arrival (three \
                 heartbeat intervals, the classic choice), from the same moment. The replays \
                 leave out what the controller adds to its detector's decision (the sweep's \
                 period, recording the state)",
                self.rounds,
                fmt_duration(self.unplug_command.p50),
                fmt_duration(self.controller_after_last.p50),
                fmt_duration(self.controller_after_last.p99),
                fmt_duration(liveness.probe_timeout()),
                fmt_duration(self.phi_suspect_after_last.p50),
                fmt_duration(self.phi_suspect_after_last.p99),
                fmt_duration(self.phi_after_last.p50),
                fmt_duration(self.phi_after_last.p99),
                fmt_duration(fixed)
            ),
        };
        let exposure = self.sustained * u32::try_from(self.robots).unwrap_or(u32::MAX);
        let false_positives = Row {
            metric: false_positive_metric(self.case),
            kiwi: format!(
                "controller {} in {} robots × {} ({} φ suspicion(s) probed); φ replayed {} ({} \
                 suspicion(s))",
                self.controller_offline,
                self.robots,
                fmt_duration(self.sustained),
                self.controller_suspicions,
                self.phi_lost,
                self.phi_suspicions
            ),
            baseline: format!(
                "fixed {}, same arrivals: {}",
                fmt_duration(fixed),
                self.fixed_offline
            ),
            ratio: if self.phi_lost == 0 && self.fixed_offline == 0 {
                "— (both 0)".into()
            } else {
                format!("{} vs {} (φ vs fixed)", self.phi_lost, self.fixed_offline)
            },
            target: false_positive_target(hb),
            met: (hb == TARGET_HEARTBEAT && exposure >= TARGET_EXPOSURE)
                .then_some(self.controller_offline == 0),
            note: format!(
                "{conditions}; every robot connected for {}, none unplugged: {:.1} arrivals per \
                 robot per second (all the agent sent: heartbeats, reports on change and, over \
                 WebSocket, the pongs answering the controller's pings), gaps between them p50 \
                 {} · p99 {} · max {}. Controller: robots recorded `offline`, and the probes its \
                 φ suspicions sent; replayed: the losses `Watch` and the fixed timeout find in \
                 the same arrivals{}",
                fmt_duration(self.sustained),
                self.arrivals_per_second,
                fmt_duration(self.gaps.p50),
                fmt_duration(self.gaps.p99),
                fmt_duration(self.gaps.max),
                if exposure < TARGET_EXPOSURE && hb == TARGET_HEARTBEAT {
                    format!(
                        " (too short to test the target's {}: no verdict)",
                        fmt_duration(TARGET_EXPOSURE)
                    )
                } else {
                    String::new()
                }
            ),
        };
        [detection, false_positives]
    }
}

/// `a ÷ b` as a ratio.
fn times(a: Duration, b: Duration) -> String {
    if b.is_zero() {
        return "—".into();
    }
    format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64())
}

/// The liveness settings `serve` derives for heartbeat `hb` (the ones the
/// replay needs: detector and probe timeout).
fn liveness_config(hb: Duration) -> LivenessConfig {
    LivenessConfig {
        timeout: LIVENESS_TIMEOUT,
        startup_grace: Duration::ZERO,
        heartbeat: hb,
        detector: DetectorSettings::for_heartbeat(hb),
        offline_fail_after: Duration::ZERO,
        damping: DampingSettings::default(),
        host_port: 22,
    }
}

/// The controller's settings: agents at 10.88.0.1:8765 with `hb`
/// heartbeats, the liveness ceiling far away, discovery on demand only,
/// and no start-up grace running out during the run.
fn controller_config(state_dir: &Path, hb: Duration) -> Config {
    Config {
        state_dir: state_dir.to_path_buf(),
        agent_listen: SocketAddr::from((Lan::ctl_ip(), 8765)),
        heartbeat_interval: hb,
        liveness_timeout: LIVENESS_TIMEOUT,
        startup_grace: Duration::from_secs(24 * 3600),
        discovery_interval: Duration::ZERO,
        ..Config::default()
    }
}

// ------------------------------------------------------------ the run

/// One robot unplugged: which, and when (the controller's clock, ms).
#[derive(Debug, Clone, Copy)]
struct Unplug {
    robot: usize,
    at_ms: i64,
}

/// What one case's run recorded.
#[derive(Debug)]
struct Recorded {
    traces: Vec<RobotTrace>,
    /// The sustained phase (ms, the controller's clock).
    sustained: (i64, i64),
    /// Suspicions the controller's liveness sweep counted meanwhile.
    controller_suspicions: u64,
    unplugs: Vec<Unplug>,
    /// How long each `ip link set eth0 down` took.
    unplug_command: Vec<Duration>,
}

/// Runs both phases of `case` and replays what was recorded.
fn measure(plan: &Plan, case: Case) -> Result<Measured> {
    let hb = case.hb;
    let lan = Lan::build(plan.robots)?;
    let dir = tempfile::Builder::new()
        .prefix("kiwi-bench-detection-")
        .tempdir()
        .context("cannot create a state directory")?;
    let controller = NamespacedController::start(&lan, controller_config(dir.path(), hb))?;
    let fleet = controller.fleet.clone();
    let mut agents: Vec<LanAgent> = (1..=plan.robots).map(LanAgent::new).collect();
    let ids: Vec<RobotId> = agents.iter().map(|a| RobotId(a.robot_id)).collect();
    // From before the agents connect: each session's detector is replayed
    // from its start, as the controller's ran.
    let recorder = Recorder::start(fleet.clone(), ids.clone(), plan.record_limit(hb));
    let env: Vec<(&str, &str)> = AGENT_RECONNECT
        .into_iter()
        .chain([("KIWI_AGENT_TRANSPORT", case.transport.setting())])
        .collect();
    for agent in &mut agents {
        agent.start(&lan, AGENT_URL, Some(&controller.enroll_token), &env);
    }
    wait_for(&fleet, &ids, DEADLINE, "connected and ready", ready).with_context(|| {
        let log = agents[0].log_text();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        format!(
            "the log of robot 1's agent ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })?;
    lan.set_loss(LOSS_PERCENT)?;
    let delays = (1..=plan.robots)
        .map(|i| lan.set_delay(i, DELAY, JITTER))
        .collect::<Result<Vec<DelayGuard>>>()?;

    // 1. Sustained: nobody unplugged.
    let metrics = fleet.metrics.clone();
    let suspected_before = metrics.liveness_suspected.get();
    let from = now_ms();
    std::thread::sleep(plan.sustained);
    let to = now_ms();
    let controller_suspicions = metrics.liveness_suspected.get() - suspected_before;

    // 2. Unplugged, in rounds.
    let mut unplugs = Vec::new();
    let mut unplug_command = Vec::new();
    let mut rng = rand::rng();
    for round in 0..plan.rounds {
        if round > 0 {
            std::thread::sleep(hb * plan.settle_heartbeats);
        }
        let mut order: Vec<(Duration, usize)> = (1..=plan.robots)
            .map(|i| (hb.mul_f64(rng.random::<f64>()), i))
            .collect();
        order.sort_unstable();
        let start = Instant::now();
        for (offset, robot) in order {
            std::thread::sleep((start + offset).saturating_duration_since(Instant::now()));
            let t = Instant::now();
            lan.set_link(robot, false)?;
            unplugs.push(Unplug {
                robot,
                at_ms: now_ms(),
            });
            unplug_command.push(t.elapsed());
        }
        wait_for(&fleet, &ids, offline_deadline(hb), "offline", |f, id| {
            state(f, id) == Some(LifecycleState::Offline)
        })?;
        // After the last round the LAN goes: nothing to come back to.
        if round + 1 < plan.rounds {
            for robot in 1..=plan.robots {
                lan.set_link(robot, true)?;
            }
            wait_for(&fleet, &ids, DEADLINE, "back, connected and ready", ready)?;
        }
    }
    let recorded = Recorded {
        traces: recorder.stop()?,
        sustained: (from, to),
        controller_suspicions,
        unplugs,
        unplug_command,
    };
    drop(delays);
    drop(agents);
    controller.stop();
    drop(lan);
    analyse(plan, case, &recorded)
}

fn state(fleet: &Parts, id: &RobotId) -> Option<LifecycleState> {
    fleet.cache.peek(id).map(|e| e.robot.state)
}

fn ready(fleet: &Parts, id: &RobotId) -> bool {
    state(fleet, id) == Some(LifecycleState::Ready) && fleet.sessions.is_connected(id)
}

/// Waits until `done` holds for every robot of `ids`, at most `within`.
fn wait_for(
    fleet: &Parts,
    ids: &[RobotId],
    within: Duration,
    what: &str,
    done: impl Fn(&Parts, &RobotId) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let missing = ids.iter().filter(|id| !done(fleet, id)).count();
        if missing == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{missing} of {} robots not {what} within {}",
                ids.len(),
                fmt_duration(within)
            );
        }
        std::thread::sleep(WAIT_POLL);
    }
}

// ------------------------------------------- the controller, in-process

/// The controller as `kiwi-controller serve` runs it (its components, its
/// background tasks, its agent endpoint over WebSocket and QUIC), without
/// the REST API, on a multi-threaded runtime like `serve`'s whose threads
/// were started in the LAN's controller namespace: a thread inherits the
/// namespace of the thread that starts it, and a socket belongs to the
/// namespace of the thread that makes it.
struct NamespacedController {
    /// `None` once stopped.
    runtime: Option<tokio::runtime::Runtime>,
    fleet: Parts,
    /// An enrollment token for the run's agents.
    enroll_token: String,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// What the controller's start hands back.
type Started = (Parts, String, CancellationToken, TaskTracker);

impl NamespacedController {
    fn start(lan: &Lan, config: Config) -> Result<NamespacedController> {
        // Started, and its sockets made, on a thread in the namespace.
        let (runtime, started) = lan.in_namespace(lan.ctl(), || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the controller's runtime")?;
            let started = runtime.block_on(serve_agents(config));
            anyhow::Ok((runtime, started))
        })?;
        let (fleet, enroll_token, shutdown, tasks) =
            started.context("cannot start the controller")?;
        Ok(NamespacedController {
            runtime: Some(runtime),
            fleet,
            enroll_token,
            shutdown,
            tasks,
        })
    }

    /// Ends the connections and the background tasks, then the runtime.
    fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        self.fleet.sessions.close_all("benchmark over");
        self.shutdown.cancel();
        self.tasks.close();
        let tasks = self.tasks.clone();
        runtime.block_on(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
        });
        runtime.shutdown_timeout(Duration::from_secs(5));
    }
}

impl Drop for NamespacedController {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// What `serve` starts, minus the REST API and LAN announcements; and an
/// enrollment token.
async fn serve_agents(config: Config) -> Result<Started> {
    let shutdown = CancellationToken::new();
    let c = Components::build(config, shutdown.clone()).await?;
    let tasks = TaskTracker::new();
    c.spawn_background(&tasks);
    let listen = c.config.agent_listen;
    let tcp = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let quic = link::quic::endpoint(
        listen,
        c.pki.server_config(ALPN_QUIC),
        &link::quic::QuicSettings {
            keep_alive: c.config.heartbeat_interval,
            idle_timeout: c.config.liveness_timeout,
            max_frame: kiwi_protocol::DEFAULT_MAX_FRAME,
        },
    )?;
    let state = c.link_state();
    tasks.spawn(link::quic::serve(quic, state.clone()));
    tasks.spawn(link::serve(
        tcp,
        state,
        Arc::new(c.pki.server_config(ALPN_HTTP1)),
    ));
    let (token, _) = tokens::create_enrollment_token(
        c.store.auth().as_ref(),
        c.pki.pin(),
        Duration::from_secs(3600),
        1000,
        None,
    )
    .await
    .context("cannot create an enrollment token")?;
    Ok((c.parts(), token.to_string(), shutdown, tasks))
}

// ---------------------------------------------------------- recording

/// One robot as the controller saw it.
#[derive(Debug, Default)]
struct RobotTrace {
    /// Its sessions, oldest first.
    sessions: Vec<SessionTrace>,
    /// When it was seen entering `offline` (ms, the controller's clock).
    offline_ms: Vec<i64>,
}

/// One session's arrivals: the times (ms, the controller's clock) its
/// failure detector was given, oldest first. The first is the session's
/// start, where the controller's detector starts too.
#[derive(Debug)]
struct SessionTrace {
    id: Uuid,
    arrivals: Vec<i64>,
}

/// Reads every robot's session (the last arrival its failure detector was
/// given) and lifecycle state every [`RECORD_POLL`], on a thread of its
/// own, until stopped or `limit`. Two arrivals within one poll would show
/// as one; at two arrivals per heartbeat interval that is rare, and the
/// later one is the one kept.
struct Recorder {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<RobotTrace>>,
}

impl Recorder {
    fn start(fleet: Parts, ids: Vec<RobotId>, limit: Duration) -> Recorder {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut traces: Vec<RobotTrace> = ids.iter().map(|_| RobotTrace::default()).collect();
            let mut offline = vec![false; ids.len()];
            let deadline = Instant::now() + limit;
            while !stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
                for (k, id) in ids.iter().enumerate() {
                    let trace = &mut traces[k];
                    if let Some(session) = fleet.sessions.get(id) {
                        let last = session.last_seen_ms();
                        match trace.sessions.last_mut() {
                            Some(s) if s.id == session.session_id => {
                                if s.arrivals.last() != Some(&last) {
                                    s.arrivals.push(last);
                                }
                            }
                            _ => trace.sessions.push(SessionTrace {
                                id: session.session_id,
                                arrivals: vec![last],
                            }),
                        }
                    }
                    let now_offline = state(&fleet, id) == Some(LifecycleState::Offline);
                    if now_offline && !offline[k] {
                        trace.offline_ms.push(now_ms());
                    }
                    offline[k] = now_offline;
                }
                std::thread::sleep(RECORD_POLL);
            }
            traces
        });
        Recorder { stop, thread }
    }

    fn stop(self) -> Result<Vec<RobotTrace>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the recorder panicked"))
    }
}

// ----------------------------------------------------------- replaying

/// What φ accrual decided over one session's arrivals (ms).
#[derive(Debug, Default)]
struct PhiVerdicts {
    /// Suspicions: the liveness sweep would probe the robot.
    suspect: Vec<i64>,
    /// Losses: the probe went unanswered, the robot would be `offline`.
    lost: Vec<i64>,
}

/// Replays `arrivals` through the controller's [`Watch`] for heartbeat
/// `hb`, asking it every millisecond from the first arrival to `until`.
/// After a loss the controller drops the connection and the agent's next
/// one gets a fresh detector: so does the replay, at the next arrival.
fn replay_phi(arrivals: &[i64], hb: Duration, until: i64) -> PhiVerdicts {
    let mut verdicts = PhiVerdicts::default();
    let Some(&first) = arrivals.first() else {
        return verdicts;
    };
    let liveness = liveness_config(hb);
    let probe_timeout = liveness.probe_timeout();
    let mut watch = Some(Watch::new(first, hb));
    let mut next = 1;
    for now in first..=until {
        while let Some(&at) = arrivals.get(next).filter(|&&at| at <= now) {
            match &mut watch {
                Some(w) => w.arrival(at),
                None => watch = Some(Watch::new(at, hb)),
            }
            next += 1;
        }
        let Some(w) = &mut watch else {
            continue;
        };
        match w.assess(now, &liveness.detector, probe_timeout) {
            Step::Suspect { .. } => verdicts.suspect.push(now),
            Step::Lost { .. } => {
                verdicts.lost.push(now);
                watch = None;
            }
            Step::Nothing | Step::Cleared => {}
        }
    }
    verdicts
}

/// When a fixed timeout of `timeout_ms` declares the robot `offline` over
/// `arrivals`, up to `until`: `timeout_ms` after an arrival that no other
/// followed within it.
fn replay_fixed(arrivals: &[i64], timeout_ms: i64, until: i64) -> Vec<i64> {
    let mut offline: Vec<i64> = arrivals
        .windows(2)
        .filter(|w| w[1] - w[0] > timeout_ms)
        .map(|w| w[0] + timeout_ms)
        .collect();
    if let Some(&last) = arrivals.last()
        && until - last > timeout_ms
    {
        offline.push(last + timeout_ms);
    }
    offline
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// The first of `times` at or after `from`.
fn first_from(times: &[i64], from: i64) -> Option<i64> {
    times.iter().copied().find(|&t| t >= from)
}

/// The figures from what was recorded.
fn analyse(plan: &Plan, case: Case, recorded: &Recorded) -> Result<Measured> {
    let hb = case.hb;
    let Recorded {
        traces,
        sustained: (from, to),
        controller_suspicions,
        unplugs,
        unplug_command,
    } = recorded;
    let (from, to) = (*from, *to);
    let fixed_ms = ms(hb * FIXED_TIMEOUT_HEARTBEATS);
    let in_window = |t: &i64| (from..=to).contains(t);

    // Sustained.
    let mut controller_offline = 0;
    let (mut phi_lost, mut phi_suspicions, mut fixed_offline) = (0, 0, 0);
    let mut gaps = Vec::new();
    let mut arrivals_in_window = 0usize;
    for trace in traces {
        controller_offline += trace.offline_ms.iter().filter(|t| in_window(t)).count();
        for session in &trace.sessions {
            let a = &session.arrivals;
            if a.first().is_none_or(|&f| f > to) || a.last().is_none_or(|&l| l < from) {
                continue;
            }
            let phi = replay_phi(a, hb, to);
            phi_lost += phi.lost.iter().filter(|t| in_window(t)).count();
            phi_suspicions += phi.suspect.iter().filter(|t| in_window(t)).count();
            fixed_offline += replay_fixed(a, fixed_ms, to)
                .iter()
                .filter(|t| in_window(t))
                .count();
            arrivals_in_window += a.iter().filter(|t| in_window(t)).count();
            gaps.extend(
                a.windows(2)
                    .filter(|w| w[0] >= from && w[1] <= to)
                    .map(|w| millis(w[1] - w[0])),
            );
        }
    }
    let window_s = (to - from) as f64 / 1000.0;
    let arrivals_per_second = arrivals_in_window as f64 / plan.robots as f64 / window_s;

    // Unplugged.
    let horizon = ms(offline_deadline(hb));
    let mut controller = Vec::new();
    let mut controller_after_last = Vec::new();
    let mut phi = Vec::new();
    let mut phi_after_last = Vec::new();
    let mut phi_suspect_after_last = Vec::new();
    let mut fixed = Vec::new();
    for u in unplugs {
        let trace = &traces[u.robot - 1];
        let seen_offline = first_from(&trace.offline_ms, u.at_ms).ok_or_else(|| {
            let last_arrival = trace
                .sessions
                .iter()
                .flat_map(|s| s.arrivals.iter())
                .filter(|&&t| t <= u.at_ms)
                .max();
            anyhow!(
                "robot {} unplugged at {} was never seen offline after it (seen offline at {:?} \
                 ms from the unplug; its last arrival before: {:?} ms)",
                u.robot,
                u.at_ms,
                trace
                    .offline_ms
                    .iter()
                    .map(|t| t - u.at_ms)
                    .collect::<Vec<_>>(),
                last_arrival.map(|t| t - u.at_ms)
            )
        })?;
        // The session the robot was in when unplugged, and its arrivals
        // up to then.
        let session = trace
            .sessions
            .iter()
            .rev()
            .find(|s| s.arrivals.first().is_some_and(|&f| f <= u.at_ms))
            .ok_or_else(|| anyhow!("no session of robot {} before its unplug", u.robot))?;
        let arrivals: Vec<i64> = session
            .arrivals
            .iter()
            .copied()
            .take_while(|&t| t <= seen_offline)
            .collect();
        let last = arrivals
            .iter()
            .copied()
            .rfind(|&t| t <= u.at_ms)
            .unwrap_or(u.at_ms);
        let until = u.at_ms + horizon;
        let from_unplug = |t: i64| millis((t - u.at_ms).max(0));

        controller.push(from_unplug(seen_offline));
        controller_after_last.push(millis(seen_offline - last));

        let verdicts = replay_phi(&arrivals, hb, until);
        let lost = first_from(&verdicts.lost, last)
            .ok_or_else(|| anyhow!("the replayed φ never lost robot {}", u.robot))?;
        phi.push(from_unplug(lost));
        phi_after_last.push(millis(lost - last));
        if let Some(suspect) = first_from(&verdicts.suspect, last) {
            phi_suspect_after_last.push(millis(suspect - last));
        }
        let timeout = first_from(&replay_fixed(&arrivals, fixed_ms, until), last)
            .ok_or_else(|| anyhow!("the fixed timeout never fired for robot {}", u.robot))?;
        fixed.push(from_unplug(timeout));
    }

    Ok(Measured {
        case,
        robots: plan.robots,
        sustained: millis(to - from),
        rounds: plan.rounds,
        controller_offline,
        controller_suspicions: *controller_suspicions,
        phi_lost,
        phi_suspicions,
        fixed_offline,
        gaps: Stats::of(gaps).context("no arrivals in the sustained phase")?,
        arrivals_per_second,
        controller: Stats::of(controller)?,
        phi: Stats::of(phi)?,
        fixed: Stats::of(fixed)?,
        controller_after_last: Stats::of(controller_after_last)?,
        phi_after_last: Stats::of(phi_after_last)?,
        phi_suspect_after_last: Stats::of(phi_suspect_after_last)?,
        unplug_command: Stats::of(unplug_command.clone())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixed_timeout_fires_after_a_silence_longer_than_it() {
        assert_eq!(replay_fixed(&[0, 100, 200], 300, 400), Vec::<i64>::new());
        assert_eq!(replay_fixed(&[0, 100, 500, 600], 300, 700), vec![400]);
        assert_eq!(replay_fixed(&[0, 100], 300, 1_000), vec![400]);
    }

    #[test]
    fn replayed_phi_loses_a_silent_robot_once_and_a_regular_one_never() {
        let hb = Duration::from_millis(250);
        let regular: Vec<i64> = (0..200).map(|i| i * 125).collect();
        let end = *regular.last().expect("arrivals");
        let quiet = replay_phi(&regular, hb, end);
        assert!(quiet.suspect.is_empty() && quiet.lost.is_empty());
        let silent = replay_phi(&regular, hb, end + 10_000);
        assert_eq!(silent.lost.len(), 1, "{silent:?}");
        let lost_after = silent.lost[0] - end;
        // Suspect within a second, then the 500 ms probe timeout.
        assert!((500..2_000).contains(&lost_after), "{lost_after} ms");
        assert!(silent.suspect[0] < silent.lost[0]);
    }
}
