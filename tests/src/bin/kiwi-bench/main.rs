//! `kiwi-bench`: the performance figures of BRIEF §8 that one machine can
//! show, each measured against a baseline taken in the same run (samples of
//! the two are interleaved, so both see the same machine), written as a
//! Markdown table to `BENCHMARKS.md`.
//!
//! ```text
//! cargo build --release -p kiwi-agent -p kiwi-controller -p kiwi-tests --bins
//! cargo run --release -p kiwi-tests --bin kiwi-bench [-- --out FILE] [--quick] [--only secure|detection]
//! ```
//!
//! 1. Agent start → robot visible in the API: real `kiwi-controller` and
//!    `kiwi-agent` processes (found next to this executable) on loopback.
//!    Baseline: spawn → exit of `kiwi-agent --version`, the floor of
//!    starting that process at all.
//! 2. `GET /api/v2/robots/{id}` server side: the real API router, built as
//!    `serve` builds it, driven in-process with `tower::ServiceExt::oneshot`.
//!    Baseline: `GET /healthz` through the same router. The same pair over
//!    a kept-alive loopback HTTP connection is reported for context.
//! 3. `GET /api/v2/robots?limit=10000` over 10,000 robots created through
//!    the fleet. Baseline: `serde_json::to_vec` of the same 10,000 rows.
//! 4. Change → watch client: maintenance start/end through the HTTP API
//!    while one client follows `/api/v2/watch`; from sending the POST to
//!    the event arriving. Baseline: the POST's own response latency (the
//!    durable append it waits for).
//!
//! Secure links (`secure.rs`): handshakes per second and controller
//! memory per idle connected agent, for WebSocket over TLS and QUIC, each
//! against a plain WebSocket server measured in the same run.
//!
//! Storage (PostgreSQL and Redis, which must be running: `DATABASE_URL`,
//! else `postgres://postgres@127.0.0.1:5432/postgres`; `REDIS_URL`, else
//! `redis://127.0.0.1:6379`; both are checked before anything else runs).
//! The run creates a database of its own (`kiwi_bench_<uuid>`, dropped at
//! the end, also on error) and a Redis key prefix of its own (`kiwi_bench_<uuid>:`,
//! deleted at the end):
//!
//! 5. Durable single append through `PostgresStore` (a maintenance
//!    start/end transition with its row, one at a time, each awaited).
//!    Baseline: `BEGIN; INSERT; COMMIT` of a row with the same JSON into a
//!    plain table of the same database, through a `PgPool` of the same size.
//! 6. Group commit: 16 robots reporting at once through `Fleet::report` on
//!    PostgreSQL, each report a health change (one event). Baseline: the
//!    same 16 tasks doing single-row `BEGIN; INSERT; COMMIT` through a pool.
//! 7. `GET /api/v2/robots/{id}` served from Redis, server side (the router
//!    of a controller with PostgreSQL and Redis configured), checked to be
//!    Redis hits. Baselines: a raw Redis `GET` of the same key and a
//!    PostgreSQL primary-key read of the same row of `robot_states`.
//!
//! LAN discovery, on the simulated LAN of `kiwi_tests::lan` (network
//! namespaces; needs root, else, or with `KIWI_LAN_TESTS=skip`, its rows
//! say "not measured"), with the release binaries next to this executable
//! (`kiwi_tests::process::binary`; `KIWI_TESTS_BIN_DIR` overrides):
//!
//! 8. A whole-/24 discovery round (40 agents, 10 legacy robots identified
//!    over SSH, 203 empty addresses), its recorded `duration_ms`, each
//!    round checked for completeness. Baselines, interleaved: `arp-scan`
//!    in the controller namespace with its defaults and with
//!    `-r 1 -t 100`. The neighbour table is flushed before each.
//! 9. Agent start → robot seen by beacon and resolved by mDNS, by the
//!    controller's passive discovery running in-process in the controller
//!    namespace. Baseline: `kiwi-agent --version` in the robot namespace.
//!
//! Failure detection (`detection.rs`), on the simulated LAN too, with 1 %
//! loss and 2 ms ± 1 ms of delay: unplugged robot → `offline` (p50/p99)
//! and false `offline`s over a sustained run, for heartbeats of 100 ms,
//! 250 ms and 1 s over QUIC and of 250 ms over WebSocket; the recorded
//! heartbeat arrivals replayed through the controller's φ-accrual detector
//! and through a fixed timeout of three heartbeat intervals.
//!
//! `--quick` shrinks the sample counts (a smoke run for CI; figures from it
//! are not meant to be kept). Every loop is bounded in count and in time.

mod detection;
mod scale;
mod secure;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::future::IntoFuture as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures_util::StreamExt as _;
use http_body_util::BodyExt as _;
use kiwi_controller::breakers::Breakers;
use kiwi_controller::cache::RobotCache;
use kiwi_controller::config::Config;
use kiwi_controller::discovery::announce::{self, AnnounceSettings, Method, Sightings};
use kiwi_controller::domain::decide::CommandIntent;
use kiwi_controller::domain::event::IdentityFacts;
use kiwi_controller::domain::{
    Action, EventMetadata, EventRecord, Health, Input, LifecycleState, NewEvent, Policy, Robot,
    RobotEvent, decide,
};
use kiwi_controller::fleet::{Context, Fleet, truncate_micros};
use kiwi_controller::metrics::Metrics;
use kiwi_controller::serve::Components;
use kiwi_controller::serve::redact;
use kiwi_controller::sessions::SessionRegistry;
use kiwi_controller::store::postgres::{ACQUIRE_TIMEOUT, PostgresStore};
use kiwi_controller::store::{Append, EventStore};
use kiwi_protocol::message::{
    AgentHealth, HealthStatus, NetCounters, Report, Telemetry, WorkloadState,
};
use kiwi_protocol::{HardwareId, RobotId};
use kiwi_tests::lan::{Lan, LegacyKind, LegacyRobot, OPT_OUT_VAR};
use kiwi_tests::lan_fleet::{DiscoveryLan, LanAgent, LanController};
use kiwi_tests::services::{
    TestDatabase, database_server_url, pg_connect, redis_connect, redis_server_url,
};
use serde_json::Value;
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use uuid::Uuid;

const USAGE: &str = "usage: kiwi-bench [--out FILE] [--quick] [--only secure|detection|scale]\n\
    \n  --out FILE        where to write the Markdown table (default: BENCHMARKS.md at the workspace root)\
    \n  --quick           few samples: checks the benchmark still works (CI smoke run)\
    \n  --only SECTION    runs only that section (secure: secure links; detection: failure\
    \n                    detection; scale: a fleet against Mosquitto) and prints its rows\
    \n                    (writes no file)\
    \n\nKIWI_BENCH_KEEP=1 keeps the work directory (the logs of every process it started).\n";

/// How long one agent may take to appear before the run is abandoned.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the controller process may take to answer `/readyz`.
const CONTROLLER_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one watch event may take before the run is abandoned.
const WATCH_EVENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The poll interval of "is the robot visible yet".
const VISIBLE_POLL: Duration = Duration::from_millis(1);
/// Robots created concurrently through the fleet (they meet in group commit).
const CREATE_CONCURRENCY: usize = 512;

#[derive(Debug)]
struct Args {
    out: PathBuf,
    quick: bool,
    /// One section alone, its rows printed instead of written.
    only: Option<Only>,
}

/// The sections `--only` runs alone.
#[derive(Debug, Clone, Copy)]
enum Only {
    Secure,
    Detection,
    Scale,
}

fn parse_args() -> Result<Option<Args>> {
    let mut out = None;
    let mut quick = false;
    let mut only = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--only" => match args.next().as_deref() {
                Some("secure") => only = Some(Only::Secure),
                Some("detection") => only = Some(Only::Detection),
                Some("scale") => only = Some(Only::Scale),
                other => bail!(
                    "--only knows three sections, secure, detection and scale (not {other:?})"
                ),
            },
            "--out" => {
                out = Some(PathBuf::from(
                    args.next()
                        .ok_or_else(|| anyhow!("--out needs a file name"))?,
                ))
            }
            "-h" | "--help" => return Ok(None),
            other => match other.strip_prefix("--out=") {
                Some(path) => out = Some(PathBuf::from(path)),
                None => bail!("unknown argument {other:?}"),
            },
        }
    }
    let out = out.unwrap_or_else(|| workspace_root().join("BENCHMARKS.md"));
    Ok(Some(Args { out, quick, only }))
}

/// The workspace this binary was built from.
fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Sample counts and time budgets of one run.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    agent_starts: usize,
    get_one: usize,
    get_one_http: usize,
    fleet_robots: usize,
    list_samples: usize,
    watch_changes: usize,
    /// Durable single appends (and as many baseline inserts).
    store_appends: usize,
    /// One-second rounds of the group-commit figure (kiwi and baseline each).
    group_rounds: usize,
    /// Robots of the controller with PostgreSQL and Redis.
    storage_robots: usize,
    /// Reads of each kind from the Redis-backed controller.
    cache_gets: usize,
    /// Whole-/24 discovery rounds on the simulated LAN (and as many runs
    /// of each `arp-scan` variant).
    lan_rounds: usize,
    /// Announcing agents started one at a time on the simulated LAN.
    lan_announce_agents: usize,
    /// The most time one measurement loop may take.
    budget: Duration,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                agent_starts: 5,
                get_one: 2_000,
                get_one_http: 500,
                fleet_robots: 10_000,
                list_samples: 20,
                watch_changes: 20,
                store_appends: 200,
                group_rounds: 2,
                storage_robots: 500,
                cache_gets: 2_000,
                lan_rounds: 2,
                lan_announce_agents: 3,
                budget: Duration::from_secs(10),
            }
        } else {
            Sizes {
                agent_starts: 30,
                get_one: 20_000,
                get_one_http: 5_000,
                fleet_robots: 10_000,
                list_samples: 200,
                watch_changes: 200,
                store_appends: 2_000,
                group_rounds: 5,
                storage_robots: 1_000,
                cache_gets: 20_000,
                lan_rounds: 5,
                lan_announce_agents: 10,
                budget: Duration::from_secs(90),
            }
        }
    }
}

fn main() -> ExitCode {
    // The plain WebSocket server of the secure-links baseline runs as a
    // process of its own: this executable, started by the benchmark.
    if std::env::args().nth(1).as_deref() == Some("--plain-ws-server") {
        return match secure::plain_ws_server() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kiwi-bench --plain-ws-server: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprint!("kiwi-bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // The scale section holds ten thousand connections of its own.
    if let Err(e) = kiwi_service::limits::raise_nofile_limit(65_536) {
        eprintln!("kiwi-bench: cannot raise the open-files limit: {e}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kiwi-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiwi-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<()> {
    let sizes = Sizes::new(args.quick);
    let started = Instant::now();
    let mut work = tempfile::Builder::new()
        .prefix("kiwi-bench-")
        .tempdir()
        .context("cannot create a work directory")?;
    // Logs of every process the run started are in there.
    if std::env::var_os("KIWI_BENCH_KEEP").is_some() {
        work.disable_cleanup(true);
        progress(&format!(
            "keeping {} (KIWI_BENCH_KEEP)",
            work.path().display()
        ));
    }
    if let Some(only) = args.only {
        let rows = match only {
            Only::Secure => {
                progress("secure links: handshakes and memory per idle agent (real processes)");
                secure::secure_links(args.quick, &work.path().join("secure")).await?
            }
            Only::Detection => detection::failure_detection(args.quick).await?,
            Only::Scale => {
                scale::scale(args.quick, &work.path().join("scale"))
                    .await?
                    .0
            }
        };
        for row in rows {
            println!(
                "{}: {} (baseline {}, ratio {}, target {}){}",
                row.metric,
                row.kiwi,
                row.baseline,
                row.ratio,
                row.target,
                if row.note.is_empty() {
                    String::new()
                } else {
                    format!("\n  {}", row.note)
                }
            );
        }
        return Ok(());
    }
    let mut rows = Vec::new();

    // Fail now, not after the other figures, when a service is missing.
    let services = Services::check().await?;

    progress("1/7 agent start -> robot visible in the API (real processes)");
    rows.push(agent_start(&sizes, &work.path().join("agent-start")).await?);

    progress(&format!(
        "creating {} robots through the fleet (in-process controller)",
        sizes.fleet_robots
    ));
    let ctl = InProcess::start(&work.path().join("in-process")).await?;
    let t = Instant::now();
    let ids = create_robots(&ctl.fleet, sizes.fleet_robots, sizes.budget).await?;
    let created_in = t.elapsed();
    progress(&format!(
        "  {} robots ready in {}",
        ids.len(),
        fmt_duration(created_in)
    ));
    let http = ctl.serve_loopback().await?;

    progress("2/7 GET /api/v2/robots/{id}");
    rows.extend(get_one(&sizes, &ctl, http, &ids).await?);

    progress("3/7 GET /api/v2/robots?limit=10000");
    rows.push(list_all(&sizes, &ctl).await?);

    progress("4/7 change -> watch client");
    rows.push(change_to_watch(&sizes, http, &ctl.bearer, ids[0]).await?);

    ctl.stop().await;
    drop(ctl);

    progress("secure links: handshakes and memory per idle agent (real processes)");
    let secure_rows = secure::secure_links(args.quick, &work.path().join("secure")).await?;

    let (storage_rows, storage_info) = storage(&sizes, &services, work.path()).await?;

    let lan_rows = lan_discovery(sizes).await?;

    let detection_rows = detection::failure_detection(args.quick).await?;

    progress("scale: a fleet on one controller against Mosquitto (real processes)");
    let (scale_rows, scale_info) = scale::scale(args.quick, &work.path().join("scale")).await?;

    let tables = Tables {
        scale_rows,
        scale_info,
        rows,
        secure_rows,
        storage_rows,
        storage_info,
        lan_rows,
        detection_rows,
    };
    let md = markdown(args, &sizes, &tables, created_in, started.elapsed());
    std::fs::write(&args.out, &md)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    print!("{md}");
    progress(&format!(
        "wrote {} in {}",
        args.out.display(),
        fmt_duration(started.elapsed())
    ));
    Ok(())
}

fn progress(msg: &str) {
    eprintln!("kiwi-bench: {msg}");
}

// ---------------------------------------------------------------- figures

/// Percentiles of a set of samples (nearest rank on the sorted samples).
#[derive(Debug, Clone, Copy)]
struct Stats {
    n: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Stats {
    fn of(mut samples: Vec<Duration>) -> Result<Stats> {
        ensure!(!samples.is_empty(), "no samples");
        samples.sort_unstable();
        Ok(Stats {
            n: samples.len(),
            p50: percentile(&samples, 50.0),
            p99: percentile(&samples, 99.0),
            max: samples[samples.len() - 1],
        })
    }

    fn show(&self) -> String {
        format!(
            "p50 {} · p99 {} · max {} (n = {})",
            fmt_duration(self.p50),
            fmt_duration(self.p99),
            fmt_duration(self.max),
            self.n
        )
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

fn fmt_duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 10.0 {
        format!("{us:.2} µs")
    } else if us < 1_000.0 {
        format!("{us:.1} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn ratio(kiwi: Duration, baseline: Duration, which: &str) -> String {
    let b = baseline.as_secs_f64();
    if b <= 0.0 {
        return "—".into();
    }
    let r = kiwi.as_secs_f64() / b;
    if r < 1.0 {
        format!("{r:.2}× ({which})")
    } else {
        format!("{r:.1}× ({which})")
    }
}

/// `10000` as `10,000`.
fn fmt_count(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One line of the table.
#[derive(Debug)]
struct Row {
    metric: String,
    kiwi: String,
    baseline: String,
    ratio: String,
    target: String,
    /// `None`: reported for context, no target.
    met: Option<bool>,
    /// Anything worth knowing about how it was measured.
    note: String,
}

// ---------------------------------------------------- 1. agent start

#[derive(Debug)]
struct Binaries {
    controller: PathBuf,
    agent: PathBuf,
}

impl Binaries {
    /// `kiwi-controller` and `kiwi-agent` next to this executable (the same
    /// profile's target directory).
    fn find() -> Result<Binaries> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let dir = exe
            .parent()
            .ok_or_else(|| anyhow!("{} has no directory", exe.display()))?;
        let controller = dir.join("kiwi-controller");
        let agent = dir.join("kiwi-agent");
        for b in [&controller, &agent] {
            ensure!(
                b.is_file(),
                "{} is missing: build the binaries first with \
                 `cargo build --release -p kiwi-agent -p kiwi-controller -p kiwi-tests --bins`",
                b.display()
            );
        }
        Ok(Binaries { controller, agent })
    }
}

/// A command without inherited kiwi or database settings, so the run does
/// not depend on the caller's environment (the processes use the embedded
/// store).
fn clean_command(program: &Path) -> Command {
    let mut c = Command::new(program);
    kiwi_tests::process::scrub_env(&mut c);
    c.stdin(Stdio::null()).stdout(Stdio::null());
    c
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A child process that is killed and reaped when dropped.
#[derive(Debug)]
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `kiwi-controller serve` process on loopback.
#[derive(Debug)]
struct ControllerProcess {
    api: SocketAddr,
    agent: SocketAddr,
    /// An admin API token.
    admin: String,
    /// An enrollment token with a use for every agent of the run.
    enroll: String,
    _child: Killed,
}

/// `kiwi-controller token create --state-dir <state> <args>`: the token.
fn cli_token(bin: &Path, state: &Path, args: &[&str]) -> Result<String> {
    let out = clean_command(bin)
        .arg("token")
        .arg("create")
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .context("cannot run kiwi-controller token create")?;
    ensure!(
        out.status.success(),
        "kiwi-controller token create {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

fn free_port() -> Result<u16> {
    Ok(StdTcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ControllerProcess {
    async fn start(bin: &Path, dir: &Path, client: &reqwest::Client) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let log = dir.join("controller.log");
        let mut last_error = anyhow!("not started");
        // A port probed free may be taken before the controller binds it:
        // then try other ports.
        for attempt in 0..3 {
            let api = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let agent = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let state = dir.join(format!("state-{attempt}"));
            let admin = cli_token(bin, &state, &["--role", "admin"])?;
            let enroll = cli_token(bin, &state, &["--ttl", "2h", "--uses", "1000000"])?;
            let mut cmd = clean_command(bin);
            // Every agent of the run comes from 127.0.0.1.
            cmd.env("KIWI_CONTROLLER_ENROLL_PER_MINUTE", "1000000")
                .env("KIWI_CONTROLLER_MAX_CONNECTIONS_PER_ADDRESS", "1000000")
                .env("KIWI_CONTROLLER_AUTH_FAILURES_PER_MINUTE", "1000000");
            cmd.arg("serve")
                .arg("--state-dir")
                .arg(&state)
                .arg("--api-listen")
                .arg(api.to_string())
                .arg("--agent-listen")
                .arg(agent.to_string())
                .stderr(std::fs::File::create(&log)?);
            let mut child = Killed(
                cmd.spawn()
                    .with_context(|| format!("cannot start {}", bin.display()))?,
            );
            let deadline = Instant::now() + CONTROLLER_READY_TIMEOUT;
            let ready = format!("http://{api}/readyz");
            loop {
                if let Some(status) = child.0.try_wait()? {
                    last_error = anyhow!(
                        "kiwi-controller exited before it was ready ({status}); log tail:\n{}",
                        log_tail(&log, 20)
                    );
                    break;
                }
                if let Ok(r) = client.get(&ready).send().await
                    && r.status() == reqwest::StatusCode::OK
                {
                    return Ok(ControllerProcess {
                        api,
                        agent,
                        admin,
                        enroll,
                        _child: child,
                    });
                }
                if Instant::now() > deadline {
                    bail!(
                        "kiwi-controller not ready within {CONTROLLER_READY_TIMEOUT:?}; log tail:\n{}",
                        log_tail(&log, 20)
                    );
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Err(last_error)
    }
}

/// The robot id of a Pi with this `/proc/cpuinfo` serial.
fn robot_id_for_serial(serial: &str) -> RobotId {
    let s = serial.trim().to_ascii_lowercase();
    RobotId::from_hardware(&HardwareId::PiSerial(s.trim_start_matches('0').to_string()))
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// A LeKiwi's Raspberry Pi as the agent sees it under `--sys-root`.
fn prepare_sys_root(root: &Path, serial: &str, hostname: &str) -> Result<()> {
    write_file(
        &root.join("proc/cpuinfo"),
        &format!(
            "processor\t: 0\nHardware\t: BCM2835\nRevision\t: d04170\n\
             Serial\t\t: {serial}\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"
        ),
    )?;
    write_file(&root.join("etc/hostname"), &format!("{hostname}\n"))?;
    write_file(&root.join("dev/ttyACM0"), "")?;
    write_file(&root.join("proc/loadavg"), "0.12 0.08 0.05 1/187 4242\n")?;
    write_file(
        &root.join("proc/meminfo"),
        "MemTotal:        8245384 kB\nMemFree:         6123456 kB\nMemAvailable:    7012345 kB\n",
    )?;
    write_file(&root.join("proc/uptime"), "12345.67 45678.90\n")?;
    Ok(())
}

/// Spawn → exit of `kiwi-agent --version`: what starting the process costs
/// before it does anything.
async fn version_floor(agent: &Path) -> Result<Duration> {
    let mut cmd = clean_command(agent);
    cmd.arg("--version").stderr(Stdio::null());
    tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let status = cmd.status().context("cannot run kiwi-agent --version")?;
        let took = t0.elapsed();
        ensure!(
            status.success(),
            "kiwi-agent --version exited with {status}"
        );
        Ok(took)
    })
    .await?
}

/// Starts one agent and times spawn → first 200 on its robot.
async fn one_agent_start(
    bins: &Binaries,
    ctl: &ControllerProcess,
    client: &reqwest::Client,
    dir: &Path,
    n: usize,
) -> Result<Duration> {
    let serial = format!("10000000beef00{n:02x}");
    let root = dir.join("sys-root");
    let state = dir.join("state");
    prepare_sys_root(&root, &serial, &format!("lekiwi-bench-{n:02}"))?;
    std::fs::create_dir_all(&state)?;
    let log = dir.join("agent.log");
    let url = format!(
        "http://{}/api/v2/robots/{}",
        ctl.api,
        robot_id_for_serial(&serial)
    );
    // Enrolled first (once in a robot's life, not timed): the agent start
    // measured is that of an enrolled robot.
    let enrolled = clean_command(&bins.agent)
        .arg("enroll")
        .env("KIWI_AGENT_ENROLL_TOKEN", &ctl.enroll)
        .arg("--controller")
        .arg(ctl.agent.to_string())
        .arg("--state-dir")
        .arg(&state)
        .arg("--sys-root")
        .arg(&root)
        .stderr(std::fs::File::create(dir.join("enroll.log"))?)
        .status()
        .context("cannot run kiwi-agent enroll")?;
    ensure!(
        enrolled.success(),
        "kiwi-agent enroll failed; log tail:\n{}",
        log_tail(&dir.join("enroll.log"), 20)
    );
    let mut cmd = clean_command(&bins.agent);
    cmd.arg("run")
        .arg("--controller")
        .arg(ctl.agent.to_string())
        .arg("--state-dir")
        .arg(&state)
        .arg("--sys-root")
        .arg(&root)
        .stderr(std::fs::File::create(&log)?);

    let t0 = Instant::now();
    let mut child = Killed(cmd.spawn().context("cannot start kiwi-agent")?);
    loop {
        let resp = client
            .get(&url)
            .bearer_auth(&ctl.admin)
            .send()
            .await
            .context("GET of the robot failed")?;
        let status = resp.status();
        resp.bytes().await?;
        match status {
            reqwest::StatusCode::OK => return Ok(t0.elapsed()),
            reqwest::StatusCode::NOT_FOUND => {}
            other => bail!("GET {url} answered {other}"),
        }
        if let Some(exit) = child.0.try_wait()? {
            bail!(
                "kiwi-agent exited ({exit}) before its robot appeared; log tail:\n{}",
                log_tail(&log, 20)
            );
        }
        if t0.elapsed() > AGENT_START_TIMEOUT {
            bail!(
                "robot of agent {n} not visible within {AGENT_START_TIMEOUT:?}; agent log tail:\n{}",
                log_tail(&log, 20)
            );
        }
        tokio::time::sleep(VISIBLE_POLL).await;
    }
}

async fn agent_start(sizes: &Sizes, dir: &Path) -> Result<Row> {
    let bins = Binaries::find()?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        .build()?;
    let ctl = ControllerProcess::start(&bins.controller, &dir.join("controller"), &client).await?;
    // Open the kept-alive connection the polls will use.
    client
        .get(format!("http://{}/healthz", ctl.api))
        .send()
        .await?
        .bytes()
        .await?;

    let mut starts = Vec::new();
    let mut floors = Vec::new();
    let deadline = Instant::now() + sizes.budget;
    // Sample 0 warms the page cache and the controller; it is not kept.
    for n in 0..=sizes.agent_starts {
        if n > 1 && Instant::now() > deadline {
            progress("  time budget spent; stopping early");
            break;
        }
        let floor = version_floor(&bins.agent).await?;
        let start =
            one_agent_start(&bins, &ctl, &client, &dir.join(format!("agent-{n:02}")), n).await?;
        if n > 0 {
            floors.push(floor);
            starts.push(start);
            progress(&format!(
                "  agent {n}: visible after {} (floor {})",
                fmt_duration(start),
                fmt_duration(floor)
            ));
        }
        // Let the controller record the killed agent's loss before the next.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kiwi = Stats::of(starts)?;
    let base = Stats::of(floors)?;
    Ok(Row {
        metric: "Agent start → robot visible in the API".into(),
        kiwi: kiwi.show(),
        baseline: format!("`kiwi-agent --version` spawn → exit: {}", base.show()),
        ratio: ratio(kiwi.p50, base.p50, "p50"),
        target: "p50 ≤ 50 ms".into(),
        met: Some(kiwi.p50 <= Duration::from_millis(50)),
        note: format!(
            "real processes on loopback; from spawning `kiwi-agent run` to the first 200 of \
             `GET /api/v2/robots/{{id}}`, polled every {} ms over a kept-alive connection",
            VISIBLE_POLL.as_millis()
        ),
    })
}

// --------------------------------------------- in-process controller

/// The controller's components as `serve` builds them
/// (`kiwi_controller::serve::Components`), with its background tasks, but
/// without the agent endpoint: nothing here has an agent, so liveness gets
/// a start-up grace longer than the run and discovery runs on demand only.
#[derive(Debug)]
struct InProcess {
    fleet: Fleet,
    cache: Arc<RobotCache>,
    shared_cache: Option<kiwi_controller::cache::shared::SharedCache>,
    router: Router,
    /// `Bearer <admin API token>`: every API request carries it, so the
    /// figures include checking it, as for an operator.
    bearer: String,
    metrics: Arc<Metrics>,
    /// The API port's limits, as `serve` gives them.
    server: kiwi_controller::api::server::ServerSettings,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl InProcess {
    /// The embedded (SQLite) controller in `dir`.
    async fn start(dir: &Path) -> Result<InProcess> {
        InProcess::with_config(Config {
            state_dir: dir.to_path_buf(),
            ..in_process_config()
        })
        .await
    }

    async fn with_config(config: Config) -> Result<InProcess> {
        let shutdown = CancellationToken::new();
        let c = Components::build(config, shutdown.clone()).await?;
        let tasks = TaskTracker::new();
        c.spawn_background(&tasks);
        let (token, _) = kiwi_controller::security::tokens::create_api_token(
            c.store.auth().as_ref(),
            kiwi_controller::store::auth::Role::Admin,
            "bench",
            None,
        )
        .await?;
        Ok(InProcess {
            fleet: c.fleet.clone(),
            cache: c.cache.clone(),
            shared_cache: c.shared_cache.clone(),
            router: c.api_router(),
            bearer: format!("Bearer {token}"),
            metrics: c.metrics.clone(),
            server: c.api_server_settings(),
            shutdown,
            tasks,
        })
    }

    /// Stops the background tasks (and the loopback server) and waits a
    /// little for them to end.
    async fn stop(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
    }

    /// Serves the same router on a loopback port with a plain
    /// `axum::serve` (no connection caps, no timeouts): the baseline of
    /// the API port's own server.
    async fn serve_loopback_plain(&self) -> Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(
            axum::serve(
                listener,
                self.router
                    .clone()
                    .into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(self.shutdown.clone().cancelled_owned())
            .into_future(),
        );
        Ok(addr)
    }

    /// Serves the same router on a loopback port, as `serve` does.
    async fn serve_loopback(&self) -> Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(kiwi_controller::api::server::serve(
            listener,
            self.router.clone(),
            self.server,
            self.metrics.clone(),
            self.shutdown.clone(),
        ));
        Ok(addr)
    }

    /// One request through the router; the time covers routing, the
    /// handler and collecting the response body.
    async fn call(&self, uri: &str) -> Result<(Duration, StatusCode, usize)> {
        let req = Request::builder()
            .uri(uri)
            .header("authorization", &self.bearer)
            .body(Body::empty())?;
        let svc = self.router.clone();
        let t0 = Instant::now();
        let resp = match svc.oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let status = resp.status();
        // Every frame of the body, as a server writes them to its socket
        // (not copied into one buffer, which is the client's work).
        let mut body = resp.into_body();
        let mut len = 0;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                len += data.len();
            }
        }
        let took = t0.elapsed();
        Ok((took, status, len))
    }
}

/// Default headers that send `bearer` as the `Authorization`.
fn bearer_headers(bearer: &str) -> Result<reqwest::header::HeaderMap> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(bearer)?,
    );
    Ok(headers)
}

fn lekiwi_report(seq: u64) -> Report {
    Report {
        seq,
        time_ms: chrono::Utc::now().timestamp_millis(),
        health: AgentHealth {
            status: HealthStatus::Healthy,
            reasons: Vec::new(),
        },
        workload: WorkloadState::Running,
        maintenance: false,
        telemetry: Telemetry {
            load_1m: 0.42,
            load_5m: 0.31,
            load_15m: 0.27,
            memory_total_bytes: 8_443_273_216,
            memory_available_bytes: 7_180_640_256,
            disk_total_bytes: 62_534_975_488,
            disk_available_bytes: 48_318_382_080,
            temperature_c: Some(48.5),
            uptime_s: 12_345,
            network: vec![NetCounters {
                interface: "wlan0".into(),
                rx_bytes: 1_234_567_890,
                tx_bytes: 987_654_321,
            }],
        },
    }
}

/// The in-process controller's settings: no agents here, so liveness gets
/// a start-up grace longer than the run and discovery runs on demand only.
fn in_process_config() -> Config {
    Config {
        startup_grace: Duration::from_secs(24 * 3600),
        discovery_interval: Duration::ZERO,
        ..Config::default()
    }
}

/// One LeKiwi robot as its agent would create it: connected (discovered,
/// provisioning), provisioned (ready), one report (telemetry in the row).
async fn create_robot(fleet: Fleet, i: usize) -> Result<RobotId> {
    let serial = format!("20000000{i:08x}");
    let hw = HardwareId::PiSerial(serial.trim_start_matches('0').to_string());
    let id = RobotId::from_hardware(&hw);
    let facts = IdentityFacts {
        hostname: format!("lekiwi-{i:05}"),
        ip_address: Some(format!("10.42.{}.{}", i / 250, i % 250 + 1)),
        robot_type: "lekiwi".into(),
        model: Some("Raspberry Pi 5 Model B Rev 1.0".into()),
        firmware_version: Some("2025-11-05".into()),
        agent_version: Some(env!("CARGO_PKG_VERSION").into()),
        hardware_id: hw.canonical(),
        mac_addresses: vec![format!(
            "2c:cf:67:{:02x}:{:02x}:{:02x}",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff
        )],
    };
    let ctx = Context::new("agent");
    fleet
        .apply(id, Input::AgentConnected { facts }, &ctx)
        .await?;
    fleet
        .apply(
            id,
            Input::CommandAnswered {
                command: CommandIntent::Provision,
                error: None,
            },
            &ctx,
        )
        .await?;
    fleet.report(id, &lekiwi_report(1), &ctx).await?;
    Ok(id)
}

async fn create_robots(fleet: &Fleet, count: usize, budget: Duration) -> Result<Vec<RobotId>> {
    let deadline = Instant::now() + budget.max(Duration::from_secs(60));
    let mut ids = Vec::with_capacity(count);
    let mut next = 0;
    while next < count {
        ensure!(
            Instant::now() < deadline,
            "creating {count} robots took longer than {budget:?}"
        );
        let end = (next + CREATE_CONCURRENCY).min(count);
        let mut set = tokio::task::JoinSet::new();
        for i in next..end {
            set.spawn(create_robot(fleet.clone(), i));
        }
        while let Some(r) = set.join_next().await {
            ids.push(r??);
        }
        next = end;
    }
    ids.sort_unstable();
    Ok(ids)
}

// ------------------------------------------------ 2. GET one robot

async fn get_one(
    sizes: &Sizes,
    ctl: &InProcess,
    http: SocketAddr,
    ids: &[RobotId],
) -> Result<Vec<Row>> {
    ensure!(!ids.is_empty(), "no robots to read");
    let uris: Vec<String> = ids
        .iter()
        .map(|id| format!("/api/v2/robots/{id}"))
        .collect();
    // Spread the reads over the fleet rather than hitting one entry.
    let pick = |i: usize| &uris[(i * 7_919) % uris.len()];

    // Warm up: allocator, caches, branch predictors.
    for i in 0..(sizes.get_one / 10).max(100) {
        ctl.call(pick(i)).await?;
        ctl.call("/healthz").await?;
    }
    let mut robot = Vec::with_capacity(sizes.get_one);
    let mut health = Vec::with_capacity(sizes.get_one);
    let mut body_len = 0;
    let deadline = Instant::now() + sizes.budget;
    for i in 0..sizes.get_one {
        if i > 100 && Instant::now() > deadline {
            progress("  time budget spent; stopping early");
            break;
        }
        let (t, status, _) = ctl.call("/healthz").await?;
        ensure!(status == StatusCode::OK, "/healthz answered {status}");
        health.push(t);
        let (t, status, len_robot) = ctl.call(pick(i)).await?;
        ensure!(status == StatusCode::OK, "{} answered {status}", pick(i));
        robot.push(t);
        body_len = len_robot;
    }
    let kiwi = Stats::of(robot)?;
    let base = Stats::of(health)?;
    progress(&format!("  in-process: {}", kiwi.show()));

    // The same over a real loopback connection, for context.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .default_headers(bearer_headers(&ctl.bearer)?)
        .build()?;
    let get = |path: String| {
        let client = client.clone();
        async move {
            let t0 = Instant::now();
            let resp = client.get(format!("http://{http}{path}")).send().await?;
            let status = resp.status();
            resp.bytes().await?;
            let took = t0.elapsed();
            ensure!(
                status == reqwest::StatusCode::OK,
                "{path} answered {status}"
            );
            Ok::<_, anyhow::Error>(took)
        }
    };
    for i in 0..(sizes.get_one_http / 10).max(50) {
        get(pick(i).clone()).await?;
        get("/healthz".into()).await?;
    }
    let mut robot_http = Vec::with_capacity(sizes.get_one_http);
    let mut health_http = Vec::with_capacity(sizes.get_one_http);
    let deadline = Instant::now() + sizes.budget;
    for i in 0..sizes.get_one_http {
        if i > 100 && Instant::now() > deadline {
            progress("  time budget spent; stopping early");
            break;
        }
        health_http.push(get("/healthz".into()).await?);
        robot_http.push(get(pick(i).clone()).await?);
    }
    let kiwi_http = Stats::of(robot_http)?;
    let base_http = Stats::of(health_http)?;
    progress(&format!("  loopback HTTP: {}", kiwi_http.show()));

    // What the API port's own server (connection caps, header and idle
    // timeouts) costs a request: the same `GET /healthz` over it and over
    // a plain `axum::serve` of the same router, interleaved.
    let plain = ctl.serve_loopback_plain().await?;
    let at = |addr: SocketAddr| {
        let client = client.clone();
        async move {
            let t0 = Instant::now();
            let resp = client.get(format!("http://{addr}/healthz")).send().await?;
            let status = resp.status();
            resp.bytes().await?;
            let took = t0.elapsed();
            ensure!(
                status == reqwest::StatusCode::OK,
                "/healthz answered {status}"
            );
            Ok::<_, anyhow::Error>(took)
        }
    };
    for _ in 0..(sizes.get_one_http / 10).max(50) {
        at(http).await?;
        at(plain).await?;
    }
    let mut ours = Vec::with_capacity(sizes.get_one_http);
    let mut axums = Vec::with_capacity(sizes.get_one_http);
    let deadline = Instant::now() + sizes.budget;
    for i in 0..sizes.get_one_http {
        if i > 100 && Instant::now() > deadline {
            progress("  time budget spent; stopping early");
            break;
        }
        axums.push(at(plain).await?);
        ours.push(at(http).await?);
    }
    let ours = Stats::of(ours)?;
    let axums = Stats::of(axums)?;
    progress(&format!("  the API's server: {}", ours.show()));

    Ok(vec![
        Row {
            metric: "`GET /api/v2/robots/{id}`, server side".into(),
            kiwi: kiwi.show(),
            baseline: format!("`GET /healthz`, same router: {}", base.show()),
            ratio: ratio(kiwi.p50, base.p50, "p50"),
            target: "p50 ≤ 200 µs".into(),
            met: Some(kiwi.p50 <= Duration::from_micros(200)),
            note: format!(
                "the real API router (as `serve` builds it) driven in-process with \
                 `tower::ServiceExt::oneshot`, every frame of the body read; reads spread over \
                 {} cached robots; response ≈ {body_len} bytes",
                fmt_count(ids.len())
            ),
        },
        Row {
            metric: "`GET /api/v2/robots/{id}` over loopback HTTP (context)".into(),
            kiwi: kiwi_http.show(),
            baseline: format!("`GET /healthz`, same connection: {}", base_http.show()),
            ratio: ratio(kiwi_http.p50, base_http.p50, "p50"),
            target: "—".into(),
            met: None,
            note: "client round trip on one kept-alive HTTP/1.1 connection (reqwest ↔ the \
                   API port's server, `api::server::serve`, on 127.0.0.1), client and server \
                   in one process"
                .into(),
        },
        Row {
            metric: "`GET /healthz` over loopback HTTP, the API port's server".into(),
            kiwi: ours.show(),
            baseline: format!("plain `axum::serve` of the same router: {}", axums.show()),
            ratio: ratio(ours.p50, axums.p50, "p50"),
            target: "—".into(),
            met: None,
            note: "what the API port's own server (`api::server::serve`: connection caps per \
                   address and in all, the header-read and idle timeouts, a request's activity \
                   tracked) costs a request: the same request on one kept-alive connection to \
                   each, interleaved, client and servers in one process"
                .into(),
        },
    ])
}

// ------------------------------------------------- 3. list 10,000

async fn list_all(sizes: &Sizes, ctl: &InProcess) -> Result<Row> {
    let count = sizes.fleet_robots;
    let uri = format!("/api/v2/robots?limit={count}");
    // Check once that the list is what it claims to be.
    let req = Request::builder()
        .uri(&uri)
        .header("authorization", &ctl.bearer)
        .body(Body::empty())?;
    let resp = match ctl.router.clone().oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    ensure!(
        resp.status() == StatusCode::OK,
        "{uri} answered {}",
        resp.status()
    );
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await?;
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    let listed = v["robots"].as_array().map_or(0, Vec::len);
    ensure!(listed == count, "{uri} listed {listed} robots, not {count}");
    let body_len = body.len();

    let rows_arc = ctl.cache.all();
    let rows: Vec<&Robot> = rows_arc.iter().map(|r| r.as_ref()).collect();
    ensure!(rows.len() == count, "the cache holds {} robots", rows.len());

    for _ in 0..3 {
        ctl.call(&uri).await?;
        std::hint::black_box(serde_json::to_vec(&rows)?);
    }
    let mut list = Vec::with_capacity(sizes.list_samples);
    let mut ser = Vec::with_capacity(sizes.list_samples);
    let mut ser_len = 0;
    let deadline = Instant::now() + sizes.budget;
    for i in 0..sizes.list_samples {
        if i > 10 && Instant::now() > deadline {
            progress("  time budget spent; stopping early");
            break;
        }
        let t0 = Instant::now();
        let json = serde_json::to_vec(&rows)?;
        ser.push(t0.elapsed());
        ser_len = std::hint::black_box(json).len();
        let (t, status, _) = ctl.call(&uri).await?;
        ensure!(status == StatusCode::OK, "{uri} answered {status}");
        list.push(t);
    }
    let kiwi = Stats::of(list)?;
    let base = Stats::of(ser)?;
    progress(&format!("  list: {}", kiwi.show()));
    Ok(Row {
        metric: format!(
            "List {} robots (`GET /api/v2/robots?limit={count}`)",
            fmt_count(count)
        ),
        kiwi: kiwi.show(),
        baseline: format!(
            "`serde_json::to_vec` of the same {} rows: {}",
            fmt_count(count),
            base.show()
        ),
        ratio: ratio(kiwi.p50, base.p50, "p50"),
        target: "p50 ≤ 5 ms".into(),
        met: Some(kiwi.p50 <= Duration::from_millis(5)),
        note: format!(
            "in-process through the router, every frame of the body read (the cached rows come \
             as frames of their own between small written pieces, as the server writes them to \
             its socket); {} ready robots with one report each, created through the fleet; response {:.1} MiB, plain serialisation \
             {:.1} MiB",
            fmt_count(count),
            body_len as f64 / 1_048_576.0,
            ser_len as f64 / 1_048_576.0
        ),
    })
}

// ------------------------------------------------ 4. change → watch

/// One server-sent event and when its bytes arrived.
#[derive(Debug)]
struct Sse {
    event: String,
    data: String,
    at: Instant,
}

/// `GET /api/v2/watch` of the API at `api`, answered 200.
async fn open_watch(client: &reqwest::Client, api: SocketAddr) -> Result<reqwest::Response> {
    let resp = client
        .get(format!("http://{api}/api/v2/watch"))
        .header("accept", "text/event-stream")
        .send()
        .await?;
    ensure!(
        resp.status() == reqwest::StatusCode::OK,
        "/api/v2/watch answered {}",
        resp.status()
    );
    Ok(resp)
}

/// The value of an unlabelled or labelled sample in Prometheus text.
fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Reads `/api/v2/watch` and forwards every event with its arrival time.
async fn follow_watch(resp: reqwest::Response, tx: mpsc::UnboundedSender<Sse>) {
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut event = String::new();
    let mut data = String::new();
    while let Some(Ok(chunk)) = stream.next().await {
        let at = Instant::now();
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !data.is_empty() || !event.is_empty() {
                    let sse = Sse {
                        event: std::mem::take(&mut event),
                        data: std::mem::take(&mut data),
                        at,
                    };
                    if tx.send(sse).is_err() {
                        return;
                    }
                }
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim_start().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
    }
}

async fn change_to_watch(
    sizes: &Sizes,
    http: SocketAddr,
    bearer: &str,
    id: RobotId,
) -> Result<Row> {
    let client = reqwest::Client::builder()
        .default_headers(bearer_headers(bearer)?)
        .build()?;
    let resp = open_watch(&client, http).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(follow_watch(resp, tx));
    let id_text = id.to_string();

    let mut to_event = Vec::with_capacity(sizes.watch_changes);
    let mut to_answer = Vec::with_capacity(sizes.watch_changes);
    let deadline = Instant::now() + sizes.budget;
    // Four unmeasured changes first (an even number: the robot stays ready).
    let warm_up = 4;
    for k in 0..(sizes.watch_changes + warm_up) {
        if k > warm_up + 10 && k % 2 == 0 && Instant::now() > deadline {
            progress("  time budget spent; stopping early");
            break;
        }
        let (action, expected) = if k % 2 == 0 {
            ("maintenance/start", "robot_maintenance_start")
        } else {
            ("maintenance/end", "robot_maintenance_end")
        };
        let url = format!("http://{http}/api/v2/robots/{id}/{action}");
        let t0 = Instant::now();
        let resp = client.post(&url).send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        let answered = t0.elapsed();
        ensure!(
            status == reqwest::StatusCode::OK,
            "POST {url} answered {status}: {text}"
        );
        let seen = loop {
            let wait = WATCH_EVENT_TIMEOUT.saturating_sub(t0.elapsed());
            let sse = tokio::time::timeout(wait, rx.recv())
                .await
                .map_err(|_| anyhow!("no {expected} event within {WATCH_EVENT_TIMEOUT:?}"))?
                .ok_or_else(|| anyhow!("the watch stream ended"))?;
            if sse.event != expected {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&sse.data)?;
            if v["robot_id"].as_str() == Some(id_text.as_str()) {
                break sse.at;
            }
        };
        if k >= warm_up {
            to_event.push(seen.saturating_duration_since(t0));
            to_answer.push(answered);
        }
    }
    reader.abort();
    let kiwi = Stats::of(to_event)?;
    let base = Stats::of(to_answer)?;
    progress(&format!("  change -> watch: {}", kiwi.show()));
    Ok(Row {
        metric: "Change on a robot → watch client".into(),
        kiwi: kiwi.show(),
        baseline: format!("the POST's own response (durable append): {}", base.show()),
        ratio: ratio(kiwi.p99, base.p99, "p99"),
        target: "p99 ≤ 50 ms".into(),
        met: Some(kiwi.p99 <= Duration::from_millis(50)),
        note: "`POST /api/v2/robots/{id}/maintenance/start` and `/end` alternately over loopback \
               HTTP; from sending the POST to the matching event arriving at one \
               `/api/v2/watch` client"
            .into(),
    })
}

// ------------------------------------------------------------ storage

/// How long the Redis tier of a fresh controller may take to come up.
const REDIS_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// Robots reporting at once in the group-commit figure.
const ROBOTS_AT_ONCE: usize = 16;
/// One round of the group-commit figure (kiwi and baseline alternate).
const GROUP_ROUND: Duration = Duration::from_secs(1);
/// The most operations one task does in one round (the round's time bounds
/// it long before).
const GROUP_ROUND_CAP: u64 = 1_000_000;
/// The plain table of the baselines: one row per append, no index but
/// the primary key.
const PLAIN_TABLE: &str = "\
CREATE TABLE bench_plain_appends (
    id          BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    UUID        NOT NULL,
    robot_id    UUID        NOT NULL,
    event_type  TEXT        NOT NULL,
    data        JSONB       NOT NULL,
    metadata    JSONB       NOT NULL,
    robot       JSONB       NOT NULL,
    report      JSONB,
    recorded_at TIMESTAMPTZ NOT NULL
)";
const PLAIN_INSERT: &str = "\
INSERT INTO bench_plain_appends (event_id, robot_id, event_type, data, metadata, robot, report,
    recorded_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
/// The primary-key read of the Redis figure's baseline.
const PK_READ: &str = "SELECT * FROM robot_states WHERE robot_id = $1";

/// One field of Redis `INFO <section>`.
async fn redis_info(
    conn: &mut redis::aio::MultiplexedConnection,
    section: &str,
    field: &str,
) -> Result<String> {
    let info: String = redis::cmd("INFO").arg(section).query_async(conn).await?;
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| anyhow!("Redis INFO {section} has no {field}"))
}

/// The PostgreSQL server and the Redis of the storage figures.
#[derive(Debug, Clone)]
struct Services {
    /// A URL of a database on the server this user may connect to.
    pg_server: String,
    redis: String,
}

impl Services {
    /// Both services, checked to answer.
    async fn check() -> Result<Services> {
        let pg_server = database_server_url();
        let redis = redis_server_url();
        let conn = pg_connect(&pg_server).await.with_context(|| {
            format!(
                "the storage figures need PostgreSQL, and none answers at {} (set DATABASE_URL, \
                 or start one, e.g. `. scripts/services.sh`)",
                redact(&pg_server)
            )
        })?;
        let _ = conn.close().await;
        let ping = async {
            let mut conn = redis_connect(&redis).await?;
            let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
            ensure!(pong == "PONG", "PING answered {pong:?}");
            Ok(())
        };
        ping.await.with_context(|| {
            format!(
                "the storage figures need Redis, and none answers at {} (set REDIS_URL, or start \
                 one, e.g. `. scripts/services.sh`)",
                redact(&redis)
            )
        })?;
        Ok(Services { pg_server, redis })
    }
}

/// The run's own Redis key prefix; every key under it is deleted when this
/// guard drops.
#[derive(Debug)]
struct RedisPrefix {
    url: String,
    /// Ends in `:`.
    prefix: String,
}

impl RedisPrefix {
    fn new(url: &str) -> RedisPrefix {
        RedisPrefix {
            url: url.to_string(),
            prefix: format!("kiwi_bench_{}:", Uuid::new_v4().simple()),
        }
    }

    /// Deletes every key under the prefix; returns how many.
    fn delete_all(&self) -> redis::RedisResult<usize> {
        let client = redis::Client::open(self.url.as_str())?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        conn.set_write_timeout(Some(Duration::from_secs(2)))?;
        let pattern = format!("{}*", self.prefix);
        let mut cursor = 0u64;
        let mut deleted = 0;
        // Bounded: SCAN ends after one pass over the keyspace.
        for _ in 0..1_000_000 {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)?;
            if !keys.is_empty() {
                deleted += redis::cmd("DEL").arg(&keys).query::<usize>(&mut conn)?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(deleted)
    }
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        match self.delete_all() {
            Ok(n) => progress(&format!("deleted {n} Redis keys {}*", self.prefix)),
            Err(e) => progress(&format!(
                "could not delete the Redis keys {}* at {}: {e}",
                self.prefix,
                redact(&self.url)
            )),
        }
    }
}

/// The servers the storage figures come from.
#[derive(Debug, Default)]
struct StorageInfo {
    /// Where the servers are (passwords redacted).
    servers: String,
    postgres: String,
    fsync: String,
    synchronous_commit: String,
    wal_sync_method: String,
    redis: String,
    pool_size: u32,
}

impl StorageInfo {
    async fn read(pool: &PgPool, redis_url: &str, pool_size: u32) -> Result<StorageInfo> {
        let (postgres, fsync, synchronous_commit, wal_sync_method): (
            String,
            String,
            String,
            String,
        ) = sqlx::query_as(
            "SELECT current_setting('server_version'), current_setting('fsync'), \
                 current_setting('synchronous_commit'), current_setting('wal_sync_method')",
        )
        .fetch_one(pool)
        .await
        .context("cannot read the PostgreSQL settings")?;
        let mut conn = redis_connect(redis_url).await?;
        let redis = redis_info(&mut conn, "server", "redis_version").await?;
        Ok(StorageInfo {
            servers: String::new(),
            postgres,
            fsync,
            synchronous_commit,
            wal_sync_method,
            redis,
            pool_size,
        })
    }

    /// Whether a commit waits for the WAL flush.
    fn durable(&self) -> bool {
        self.fsync == "on" && !matches!(self.synchronous_commit.as_str(), "off" | "local")
    }
}

/// A pool like the store's read pool (same size and acquire timeout), for
/// the baselines.
async fn baseline_pool(url: &str, pool_size: u32) -> Result<PgPool> {
    let options: PgConnectOptions = url.parse()?;
    PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options.application_name("kiwi-bench-baseline"))
        .await
        .context("cannot open the baseline pool")
}

/// What one append writes, as a row of the plain table: the same JSON.
#[derive(Debug, Clone)]
struct PlainRow {
    robot_id: Uuid,
    event_type: &'static str,
    data: serde_json::Value,
    metadata: serde_json::Value,
    robot: serde_json::Value,
    report: Option<serde_json::Value>,
}

impl PlainRow {
    fn of(robot: &Robot, event: &NewEvent, report: Option<serde_json::Value>) -> Result<PlainRow> {
        let (event_type, data) = event.event.to_parts();
        Ok(PlainRow {
            robot_id: robot.robot_id.0,
            event_type,
            data,
            metadata: serde_json::to_value(&event.metadata)?,
            robot: serde_json::to_value(robot)?,
            report,
        })
    }

    /// The size of its JSON values, serialised.
    fn json_bytes(&self) -> usize {
        let len = |v: &serde_json::Value| v.to_string().len();
        len(&self.data)
            + len(&self.metadata)
            + len(&self.robot)
            + self.report.as_ref().map_or(0, len)
    }
}

/// `BEGIN; INSERT …; COMMIT` of one row through the pool; the time covers
/// all three.
async fn plain_insert(pool: &PgPool, row: &PlainRow) -> Result<Duration> {
    let t0 = Instant::now();
    let mut tx = pool.begin().await?;
    sqlx::query(PLAIN_INSERT)
        .bind(Uuid::new_v4())
        .bind(row.robot_id)
        .bind(row.event_type)
        .bind(&row.data)
        .bind(&row.metadata)
        .bind(&row.robot)
        .bind(row.report.as_ref())
        .bind(truncate_micros(chrono::Utc::now()))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(t0.elapsed())
}

/// The append the fleet would make for `input` on `row`, built as
/// `Fleet::apply` builds it (decide, then the row after the events), with
/// the row it leaves and its plain-table equivalent.
fn plan_append(row: &Robot, input: Input) -> Result<(Append, Robot, PlainRow)> {
    let decision = decide(
        Some(row),
        input,
        Policy {
            auto_provision: true,
        },
    )?;
    ensure!(
        decision.events.len() == 1,
        "expected one event, decided {:?}",
        decision.events
    );
    let now = truncate_micros(chrono::Utc::now());
    let metadata = EventMetadata {
        correlation_id: Some(Uuid::new_v4()),
        causation_id: None,
        actor: "operator".into(),
    };
    let mut next = row.clone();
    let mut events = Vec::with_capacity(decision.events.len());
    for (i, event) in decision.events.into_iter().enumerate() {
        let new = NewEvent {
            event_id: Uuid::new_v4(),
            event,
            metadata: metadata.clone(),
            recorded_at: now,
        };
        let record = EventRecord {
            position: 0,
            event_id: new.event_id,
            robot_id: row.robot_id,
            version: row.version + 1 + i as i64,
            event: new.event.clone(),
            metadata: metadata.clone(),
            recorded_at: now,
        };
        next = Robot::apply(Some(next), &record)?;
        events.push(new);
    }
    let plain = PlainRow::of(&next, &events[0], None)?;
    let append = Append {
        robot_id: row.robot_id,
        expected_version: row.version,
        events,
        robot: next.clone(),
        report: None,
    };
    Ok((append, next, plain))
}

/// Runs the storage figures on a database and a key prefix of their own,
/// removed again whatever happens.
async fn storage(
    sizes: &Sizes,
    services: &Services,
    work: &Path,
) -> Result<(Vec<Row>, StorageInfo)> {
    // The run's own database, dropped when this guard drops (also on an
    // error or a panic).
    let db = TestDatabase::create_on(&services.pg_server).await;
    let keys = RedisPrefix::new(&services.redis);
    progress(&format!(
        "storage: database {} on {}, Redis prefix {} on {}",
        db.name(),
        redact(&services.pg_server),
        keys.prefix,
        redact(&keys.url)
    ));
    let pool_size = Config::default().db_pool_size;
    let pool = baseline_pool(db.url(), pool_size).await?;
    sqlx::query(PLAIN_TABLE).execute(&pool).await?;
    let mut info = StorageInfo::read(&pool, &keys.url, pool_size).await?;
    info.servers = format!(
        "{} and {}",
        redact(&services.pg_server),
        redact(&services.redis)
    );
    progress(&format!(
        "  PostgreSQL {} (fsync {}, synchronous_commit {}), Redis {}",
        info.postgres, info.fsync, info.synchronous_commit, info.redis
    ));

    let store = Arc::new(
        PostgresStore::connect(db.url(), pool_size)
            .await
            .with_context(|| format!("cannot open the PostgreSQL store on {}", db.name()))?,
    );
    let metrics = Arc::new(Metrics::new());
    let dyn_store: Arc<dyn EventStore> = store.clone();
    let breakers = Arc::new(Breakers::new(
        Config::default().circuit,
        dyn_store.clone(),
        metrics.clone(),
    ));
    let fleet = Fleet::new(
        dyn_store,
        Arc::new(RobotCache::new(metrics.clone())),
        Arc::new(SessionRegistry::default()),
        metrics.clone(),
        breakers,
        Policy {
            auto_provision: true,
        },
        Config::default().report_interval,
    );
    let mut rows = Vec::new();
    progress("5/7 durable single append (PostgreSQL)");
    rows.push(durable_append(sizes, &fleet, &store, &pool, &info).await?);
    progress("6/7 group commit, 16 robots reporting at once (PostgreSQL)");
    rows.push(group_commit(sizes, &fleet, &store, &metrics, &pool).await?);
    drop(fleet);
    store.close().await;

    progress("7/7 GET /api/v2/robots/{id} from the Redis cache");
    let ctl = InProcess::with_config(Config {
        state_dir: work.join("pg-controller"),
        database_url: Some(db.url().to_string()),
        db_pool_size: pool_size,
        redis_url: Some(keys.url.clone()),
        redis_prefix: keys.prefix.clone(),
        enable_cache: true,
        ..in_process_config()
    })
    .await
    .context("cannot start the in-process controller on PostgreSQL and Redis")?;
    let cached = cached_get(sizes, &ctl, &keys, &pool).await;
    ctl.stop().await;
    drop(ctl);
    rows.push(cached?);
    pool.close().await;
    Ok((rows, info))
}

// ---------------------------------------- 5. durable single append

async fn durable_append(
    sizes: &Sizes,
    fleet: &Fleet,
    store: &PostgresStore,
    pool: &PgPool,
    info: &StorageInfo,
) -> Result<Row> {
    let id = create_robot(fleet.clone(), 0).await?;
    let mut row: Robot = fleet
        .robot(id)
        .await?
        .ok_or_else(|| anyhow!("robot {id} missing right after its creation"))?
        .robot
        .as_ref()
        .clone();
    ensure!(
        row.state == LifecycleState::Ready,
        "robot {id} is {}, not ready",
        row.state
    );
    let warm_up = 20;
    let mut kiwi = Vec::with_capacity(sizes.store_appends);
    let mut base = Vec::with_capacity(sizes.store_appends);
    let mut json_bytes = 0;
    let batches_before = store.batches_committed();
    let deadline = Instant::now() + sizes.budget;
    for k in 0..(warm_up + sizes.store_appends) {
        if k > warm_up + 20 && Instant::now() > deadline {
            progress("  time budget spent; stopping early");
            break;
        }
        let input = if row.state == LifecycleState::Maintenance {
            Input::Operator(Action::MaintenanceEnd)
        } else {
            Input::Operator(Action::MaintenanceStart {
                reason: Some("wheel motor service".into()),
            })
        };
        let (append, next, plain) = plan_append(&row, input)?;
        json_bytes = plain.json_bytes();
        let append_once = async {
            let t0 = Instant::now();
            store.append(append).await?;
            anyhow::Ok(t0.elapsed())
        };
        // Alternate which goes first, so neither always follows the other.
        let (t_kiwi, t_base) = if k % 2 == 0 {
            let a = append_once.await?;
            (a, plain_insert(pool, &plain).await?)
        } else {
            let b = plain_insert(pool, &plain).await?;
            (append_once.await?, b)
        };
        row = next;
        if k >= warm_up {
            kiwi.push(t_kiwi);
            base.push(t_base);
        }
    }
    let appends = kiwi.len() + warm_up;
    let batches = store.batches_committed() - batches_before;
    ensure!(
        batches as usize >= appends,
        "{appends} appends awaited one at a time were committed in only {batches} transactions"
    );
    let kiwi = Stats::of(kiwi)?;
    let base = Stats::of(base)?;
    progress(&format!("  append: {}", kiwi.show()));
    progress(&format!("  plain:  {}", base.show()));
    let p50_ratio = kiwi.p50.as_secs_f64() / base.p50.as_secs_f64().max(1e-9);
    Ok(Row {
        metric: "Durable single append (PostgreSQL)".into(),
        kiwi: kiwi.show(),
        baseline: format!(
            "`BEGIN; INSERT; COMMIT` of the same JSON into a plain table: {}",
            base.show()
        ),
        ratio: format!(
            "{} · {}",
            ratio(kiwi.p50, base.p50, "p50"),
            ratio(kiwi.p99, base.p99, "p99")
        ),
        target: "p50 ratio ≤ 1.5; p99 ≤ 10 ms".into(),
        met: Some(p50_ratio <= 1.5 && kiwi.p99 <= Duration::from_millis(10)),
        note: format!(
            "`EventStore::append` on `PostgresStore` (the writer task: one statement on its own, \
             so one transaction and one round trip, taking the log lock, writing the row \
             under its version guard, the event, and its `pg_notify`), one robot, one append \
             at a time, each awaited: a maintenance start or end (one event and the robot's \
             row), built as `Fleet::apply` builds it. The baseline inserts the same JSON \
             (event data, metadata and the row, ≈ {json_bytes} bytes) as one row of a table \
             with only a primary key, `BEGIN`, `INSERT`, `COMMIT` on a `PgPool` of {} \
             connections (as the store's read pool), same database; the two alternate; \
             fsync {}, synchronous_commit {}{}",
            info.pool_size,
            info.fsync,
            info.synchronous_commit,
            if info.durable() {
                ""
            } else {
                " (**commits are not flushed: these are not durable figures**)"
            }
        ),
    })
}

// ------------------------------------------------ 6. group commit

/// A report whose health differs from the previous one's (even sequence
/// numbers degraded, odd ones healthy), so each is one event.
fn flipping_report(seq: u64) -> Report {
    let mut r = lekiwi_report(seq);
    if seq.is_multiple_of(2) {
        r.health = AgentHealth {
            status: HealthStatus::Degraded,
            reasons: vec!["battery at 18%".into()],
        };
    }
    r
}

/// 16 robots reporting through the fleet for `len`; returns the reports
/// stored and the wall time until the last one was answered.
async fn kiwi_round(
    fleet: &Fleet,
    ids: &[RobotId],
    seqs: &mut [u64],
    len: Duration,
) -> Result<(u64, Duration)> {
    let start = Instant::now();
    let deadline = start + len;
    let mut set = tokio::task::JoinSet::new();
    for (k, (&id, &first)) in ids.iter().zip(seqs.iter()).enumerate() {
        let fleet = fleet.clone();
        set.spawn(async move {
            let ctx = Context::new("agent");
            let mut seq = first;
            let mut n = 0u64;
            while n < GROUP_ROUND_CAP && Instant::now() < deadline {
                fleet.report(id, &flipping_report(seq), &ctx).await?;
                seq += 1;
                n += 1;
            }
            anyhow::Ok((k, seq, n))
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        let (k, seq, n) = r??;
        seqs[k] = seq;
        total += n;
    }
    Ok((total, start.elapsed()))
}

/// The same 16 tasks inserting plain rows for `len`.
async fn plain_round(pool: &PgPool, rows: &[PlainRow], len: Duration) -> Result<(u64, Duration)> {
    let start = Instant::now();
    let deadline = start + len;
    let mut set = tokio::task::JoinSet::new();
    for row in rows {
        let (pool, row) = (pool.clone(), row.clone());
        set.spawn(async move {
            let mut n = 0u64;
            while n < GROUP_ROUND_CAP && Instant::now() < deadline {
                plain_insert(&pool, &row).await?;
                n += 1;
            }
            anyhow::Ok(n)
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        total += r??;
    }
    Ok((total, start.elapsed()))
}

fn per_second(n: u64, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64().max(1e-9)
}

async fn group_commit(
    sizes: &Sizes,
    fleet: &Fleet,
    store: &PostgresStore,
    metrics: &Metrics,
    pool: &PgPool,
) -> Result<Row> {
    let mut ids = Vec::with_capacity(ROBOTS_AT_ONCE);
    let mut plain = Vec::with_capacity(ROBOTS_AT_ONCE);
    for i in 0..ROBOTS_AT_ONCE {
        let id = create_robot(fleet.clone(), 1_000 + i).await?;
        let row = fleet
            .robot(id)
            .await?
            .ok_or_else(|| anyhow!("robot {id} missing right after its creation"))?
            .robot;
        // What one of its reports writes: a health change, the report, the row.
        let event = NewEvent {
            event_id: Uuid::new_v4(),
            event: RobotEvent::RobotHealthChanged {
                health: Health {
                    status: HealthStatus::Degraded,
                    reasons: vec!["battery at 18%".into()],
                },
            },
            metadata: EventMetadata {
                correlation_id: Some(Uuid::new_v4()),
                causation_id: None,
                actor: "agent".into(),
            },
            recorded_at: truncate_micros(chrono::Utc::now()),
        };
        let report = serde_json::to_value(flipping_report(2))?;
        plain.push(PlainRow::of(&row, &event, Some(report))?);
        ids.push(id);
    }
    // create_robot stored report 1.
    let mut seqs = vec![2u64; ROBOTS_AT_ONCE];

    // Unmeasured: connections, caches.
    kiwi_round(fleet, &ids, &mut seqs, Duration::from_millis(200)).await?;
    plain_round(pool, &plain, Duration::from_millis(200)).await?;

    let events_before = metrics.events_appended.get();
    let batches_before = store.batches_committed();
    let (mut reports, mut kiwi_time) = (0u64, Duration::ZERO);
    let (mut inserts, mut base_time) = (0u64, Duration::ZERO);
    for round in 0..sizes.group_rounds {
        if round % 2 == 0 {
            let (n, t) = kiwi_round(fleet, &ids, &mut seqs, GROUP_ROUND).await?;
            (reports, kiwi_time) = (reports + n, kiwi_time + t);
            let (n, t) = plain_round(pool, &plain, GROUP_ROUND).await?;
            (inserts, base_time) = (inserts + n, base_time + t);
        } else {
            let (n, t) = plain_round(pool, &plain, GROUP_ROUND).await?;
            (inserts, base_time) = (inserts + n, base_time + t);
            let (n, t) = kiwi_round(fleet, &ids, &mut seqs, GROUP_ROUND).await?;
            (reports, kiwi_time) = (reports + n, kiwi_time + t);
        }
    }
    let events = metrics.events_appended.get() - events_before;
    let batches = store.batches_committed() - batches_before;
    ensure!(events > 0, "the reports appended no events");
    let kiwi_rate = per_second(events, kiwi_time);
    let base_rate = per_second(inserts, base_time);
    let per_commit = reports as f64 / batches.max(1) as f64;
    progress(&format!(
        "  kiwi: {kiwi_rate:.0} durable events/s ({} reports, {} commits)",
        fmt_count(reports as usize),
        fmt_count(batches as usize)
    ));
    progress(&format!("  plain: {base_rate:.0} rows/s"));
    Ok(Row {
        metric: "Group commit: 16 robots reporting at once (PostgreSQL)".into(),
        kiwi: format!(
            "{} durable events/s ({} events in {}; {per_commit:.1} reports per commit)",
            fmt_count(kiwi_rate.round() as usize),
            fmt_count(events as usize),
            fmt_duration(kiwi_time)
        ),
        baseline: format!(
            "16 tasks, single-row `BEGIN; INSERT; COMMIT`: {} rows/s ({} rows in {})",
            fmt_count(base_rate.round() as usize),
            fmt_count(inserts as usize),
            fmt_duration(base_time)
        ),
        ratio: format!("{:.2}× (throughput)", kiwi_rate / base_rate.max(1e-9)),
        target: "≥ 4,000 durable events/s".into(),
        met: Some(kiwi_rate >= 4_000.0),
        note: format!(
            "16 tasks, one per robot, each calling `Fleet::report` (awaited) as fast as it can \
             on a fleet over `PostgresStore`; each report flips the robot's health, so each \
             is one event plus the report and the row, answered once committed; events \
             counted by `events_appended`. {} one-second rounds each, kiwi and baseline \
             alternating; the baseline's 16 tasks insert rows with the same JSON (≈ {} bytes) \
             through a `PgPool` of {} connections",
            sizes.group_rounds,
            plain[0].json_bytes(),
            Config::default().db_pool_size
        ),
    })
}

// -------------------------------- 7. GET one robot from the Redis cache

async fn cached_get(
    sizes: &Sizes,
    ctl: &InProcess,
    keys: &RedisPrefix,
    pool: &PgPool,
) -> Result<Row> {
    let shared = ctl
        .shared_cache
        .as_ref()
        .ok_or_else(|| anyhow!("the controller has no Redis tier"))?
        .clone();
    let waited = Instant::now();
    while !shared.is_up() {
        ensure!(
            waited.elapsed() < REDIS_UP_TIMEOUT,
            "the controller's Redis tier is not up within {REDIS_UP_TIMEOUT:?} (status: {})",
            shared.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    progress(&format!(
        "  creating {} robots through the fleet (PostgreSQL, written through to Redis)",
        sizes.storage_robots
    ));
    let t = Instant::now();
    let ids = create_robots(&ctl.fleet, sizes.storage_robots, sizes.budget).await?;
    progress(&format!(
        "  {} robots ready in {}",
        ids.len(),
        fmt_duration(t.elapsed())
    ));
    ensure!(
        shared.is_up(),
        "Redis went {} while robots were created",
        shared.status()
    );

    let conn = redis_connect(&keys.url).await?;
    let mut info_conn = conn.clone();
    let uris: Vec<String> = ids
        .iter()
        .map(|id| format!("/api/v2/robots/{id}"))
        .collect();
    let redis_keys: Vec<String> = ids
        .iter()
        .map(|id| format!("{}robot:{id}", keys.prefix))
        .collect();
    let pick = |i: usize| (i * 7_919) % ids.len();

    let redis_get = |key: String| {
        let mut conn = conn.clone();
        async move {
            let t0 = Instant::now();
            let v: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
            let took = t0.elapsed();
            let v = v.ok_or_else(|| anyhow!("Redis has no {key}"))?;
            anyhow::Ok((took, v.len()))
        }
    };
    let pg_read = |id: RobotId| async move {
        let t0 = Instant::now();
        let row = sqlx::query(PK_READ).bind(id.0).fetch_optional(pool).await?;
        let took = t0.elapsed();
        ensure!(row.is_some(), "robot_states has no row {id}");
        anyhow::Ok(took)
    };

    // Every robot is in Redis.
    for key in &redis_keys {
        redis_get(key.clone()).await?;
    }
    for i in 0..(sizes.cache_gets / 10).max(100) {
        let j = pick(i);
        let (_, status, _) = ctl.call(&uris[j]).await?;
        ensure!(status == StatusCode::OK, "{} answered {status}", uris[j]);
        redis_get(redis_keys[j].clone()).await?;
        pg_read(ids[j]).await?;
    }

    let hits_before = ctl.metrics.cache_hits.get();
    let misses_before = ctl.metrics.cache_misses.get();
    let errors_before = ctl.metrics.redis_errors.get();
    let server_hits_before: u64 = redis_info(&mut info_conn, "stats", "keyspace_hits")
        .await?
        .parse()?;
    let mut api = Vec::with_capacity(sizes.cache_gets);
    let mut raw = Vec::with_capacity(sizes.cache_gets);
    let mut pg = Vec::with_capacity(sizes.cache_gets);
    let (mut body_len, mut value_len) = (0, 0);
    let deadline = Instant::now() + sizes.budget;
    for i in 0..sizes.cache_gets {
        if i > 100 && Instant::now() > deadline {
            progress("  time budget spent; stopping early");
            break;
        }
        let j = pick(i);
        // Rotate the order of the three reads.
        for step in 0..3 {
            match (i + step) % 3 {
                0 => {
                    let (t, status, len) = ctl.call(&uris[j]).await?;
                    ensure!(status == StatusCode::OK, "{} answered {status}", uris[j]);
                    api.push(t);
                    body_len = len;
                }
                1 => {
                    let (t, len) = redis_get(redis_keys[j].clone()).await?;
                    raw.push(t);
                    value_len = len;
                }
                _ => pg.push(pg_read(ids[j]).await?),
            }
        }
    }
    let hits = ctl.metrics.cache_hits.get() - hits_before;
    let misses = ctl.metrics.cache_misses.get() - misses_before;
    let errors = ctl.metrics.redis_errors.get() - errors_before;
    let server_hits = redis_info(&mut info_conn, "stats", "keyspace_hits")
        .await?
        .parse::<u64>()?
        .saturating_sub(server_hits_before);
    let reads = api.len() as u64;
    ensure!(
        shared.is_up() && errors == 0 && misses == 0 && hits >= reads,
        "the reads did not all come from Redis: {reads} reads, {hits} cache hits, {misses} \
         misses, {errors} Redis errors, Redis tier {}",
        shared.status()
    );
    ensure!(
        server_hits >= reads + raw.len() as u64,
        "Redis counted {server_hits} keyspace hits for {reads} API reads and {} raw GETs",
        raw.len()
    );
    let kiwi = Stats::of(api)?;
    let raw = Stats::of(raw)?;
    let pg = Stats::of(pg)?;
    progress(&format!("  API from Redis: {}", kiwi.show()));
    progress(&format!("  raw Redis GET:  {}", raw.show()));
    progress(&format!("  PostgreSQL PK:  {}", pg.show()));
    Ok(Row {
        metric: "`GET /api/v2/robots/{id}` from the Redis cache, server side".into(),
        kiwi: kiwi.show(),
        baseline: format!(
            "raw Redis `GET` of the same key: {}; PostgreSQL primary-key read of the same \
             row: {}",
            raw.show(),
            pg.show()
        ),
        ratio: format!(
            "{} vs Redis · {} vs PostgreSQL",
            ratio(kiwi.p50, raw.p50, "p50"),
            ratio(kiwi.p50, pg.p50, "p50")
        ),
        target: "p50 ≤ 200 µs".into(),
        met: Some(kiwi.p50 <= Duration::from_micros(200)),
        note: format!(
            "the API router of an in-process controller with `database_url` and `redis_url` \
             set (`Components::build`), driven with `tower::ServiceExt::oneshot`, body \
             collected; reads spread over {} robots created through the fleet and written \
             through to Redis. Every read was a Redis hit: `cache_hits_total` rose by {} for \
             {} reads, no miss, no Redis error, and Redis's own `keyspace_hits` rose by {} \
             (API reads and raw `GET`s). Raw `GET`: the redis crate on a multiplexed \
             connection, value {value_len} bytes (the API's response {body_len} bytes); \
             primary-key read: `SELECT * FROM robot_states WHERE robot_id = $1` through a \
             `PgPool`; the three reads rotate",
            fmt_count(ids.len()),
            fmt_count(hits as usize),
            fmt_count(reads as usize),
            fmt_count(server_hits as usize)
        ),
    })
}

// ------------------------------------------- LAN discovery (needs root)

/// Hosts of the /24 that run `kiwi-agent` (1..=40) and legacy robots with
/// only sshd (41..=50), as in `tests/tests/lan_discovery.rs`.
const LAN_AGENTS: usize = 40;
const LAN_LEGACY: usize = 10;
/// Addresses a sweep of 10.88.0.0/24 decides: all but the network, the
/// broadcast and the controller's own.
const LAN_ADDRESSES: usize = 253;
/// How long the LAN's setup steps (sshd, controller, agents connecting) and
/// one round or one announce may take before the run is abandoned.
const LAN_DEADLINE: Duration = Duration::from_secs(60);
const LAN_METRICS: [&str; 3] = [
    "Discovery of a /24: 50 robots (10 legacy over SSH), 203 empty addresses",
    "Agent start → robot seen by beacon",
    "Agent start → robot resolved by mDNS",
];

/// Why the LAN section cannot run here, if it cannot: it builds network
/// namespaces, which needs root; `KIWI_LAN_TESTS=skip` skips it too.
fn lan_unavailable() -> Option<String> {
    if std::env::var(OPT_OUT_VAR).is_ok_and(|v| v.trim() == "skip") {
        return Some(format!("{OPT_OUT_VAR}=skip"));
    }
    (!nix::unistd::geteuid().is_root()).then(|| "not root".to_string())
}

/// The LAN rows, written as "not measured" when the section cannot run.
fn lan_not_measured(why: &str) -> Vec<Row> {
    LAN_METRICS
        .iter()
        .map(|metric| Row {
            metric: (*metric).into(),
            kiwi: "not measured: needs root".into(),
            baseline: "—".into(),
            ratio: "—".into(),
            target: if metric.starts_with("Discovery") {
                "p50 ≤ 1.0 s".into()
            } else {
                "—".into()
            },
            met: None,
            note: format!(
                "not measured in this run ({why}): the simulated LAN is built from network \
                 namespaces, which needs root"
            ),
        })
        .collect()
}

/// The LAN section: the simulated LAN of `kiwi_tests::lan` with the real
/// (release) binaries found next to this executable. Blocking: run it on a
/// blocking thread. A harness panic (a LAN that cannot be built, a
/// controller that does not start) comes back as an error.
async fn lan_discovery(sizes: Sizes) -> Result<Vec<Row>> {
    if let Some(why) = lan_unavailable() {
        progress(&format!(
            "LAN discovery: SKIPPED ({why}): it needs root for network namespaces; \
             its rows say \"not measured\""
        ));
        return Ok(lan_not_measured(&why));
    }
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        progress(&format!(
            "LAN 1/2 discovery of 10.88.0.0/24 vs arp-scan ({})",
            lan_binary("kiwi-controller").display()
        ));
        let discovery = lan_full_discovery(&sizes)?;
        progress("LAN 2/2 agent start -> seen by beacon and resolved by mDNS");
        let announce = lan_announce(&sizes, &handle)?;
        Ok(std::iter::once(discovery).chain(announce).collect())
    })
    .await
    .map_err(|e| anyhow!("the LAN section panicked (see above): {e}"))?
}

/// `kiwi_tests::process::binary`, which the harness uses: next to this
/// executable (the release build), unless `KIWI_TESTS_BIN_DIR` says
/// otherwise.
fn lan_binary(name: &str) -> PathBuf {
    kiwi_tests::process::binary(name)
}

/// Empties the controller namespace's neighbour table, so that a sweep or
/// an `arp-scan` starts with no cached address.
fn flush_neighbours(ctl: &str) -> Result<()> {
    let status = Command::new("ip")
        .args(["-n", ctl, "neigh", "flush", "all"])
        .stdin(Stdio::null())
        .status()
        .context("cannot run ip neigh flush")?;
    ensure!(status.success(), "ip -n {ctl} neigh flush all: {status}");
    Ok(())
}

/// One `arp-scan -I eth0 10.88.0.0/24 <extra>` in the controller namespace:
/// its wall time (spawn → exit, `ip netns exec` included) and the
/// addresses it found.
fn arp_scan(lan: &Lan, extra: &[&str]) -> Result<(Duration, BTreeSet<Ipv4Addr>)> {
    flush_neighbours(lan.ctl())?;
    let mut command = lan.command(lan.ctl(), "arp-scan");
    command
        .args(["-I", "eth0"])
        .args(extra)
        .arg("10.88.0.0/24")
        .stdin(Stdio::null());
    let t0 = Instant::now();
    let output = command
        .output()
        .context("cannot run arp-scan (Debian package `arp-scan`)")?;
    let took = t0.elapsed();
    ensure!(
        output.status.success(),
        "arp-scan {extra:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    // Lines "10.88.0.2\t02:88:00:00:00:02\t(vendor)"; the rest is banner.
    let found = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split('\t').next()?.parse::<Ipv4Addr>().ok())
        .collect();
    Ok((took, found))
}

/// One discovery round through the API, in the controller namespace, the
/// neighbour table flushed just before: the session and the API's wall
/// time from the POST to seeing the round done.
fn lan_round(lan: &Lan, controller: &LanController) -> Result<(Value, Duration)> {
    let ctl = lan.ctl().to_string();
    controller.with_api(lan, move |api| async move {
        flush_neighbours(&ctl)?;
        let t0 = Instant::now();
        let session = api.discover(LAN_DEADLINE).await?;
        Ok((session, t0.elapsed()))
    })
}

/// Checks that a round found exactly the 50 hosts, identified every agent
/// host and every legacy robot over SSH (type and MAC included); its
/// `duration_ms`.
fn check_round(session: &Value, agents: &[LanAgent], legacy: &[LegacyRobot]) -> Result<Duration> {
    let mut by_ip: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for r in session["results"]
        .as_array()
        .ok_or_else(|| anyhow!("a session without results: {session}"))?
    {
        let ip = r["ip_address"]
            .as_str()
            .ok_or_else(|| anyhow!("a result without an address: {r}"))?;
        by_ip.entry(ip).or_default().push(r);
    }
    let hosts: BTreeSet<String> = (1..=LAN_AGENTS + LAN_LEGACY)
        .map(|i| Lan::robot_ip(i).to_string())
        .collect();
    let seen: BTreeSet<String> = by_ip.keys().map(|ip| (*ip).to_string()).collect();
    ensure!(
        seen == hosts,
        "the round did not report exactly the {} hosts: missing {:?}, phantoms {:?}",
        hosts.len(),
        hosts.difference(&seen).collect::<Vec<_>>(),
        seen.difference(&hosts).collect::<Vec<_>>()
    );
    for a in agents {
        let ip = Lan::robot_ip(a.index).to_string();
        let id = a.robot_id.to_string();
        ensure!(
            by_ip[ip.as_str()]
                .iter()
                .any(|r| r["outcome"] == "identified" && r["robot_id"] == id.as_str()),
            "agent host {ip} not identified as {id}: {:?}",
            by_ip[ip.as_str()]
        );
    }
    for l in legacy {
        let ip = l.ip.to_string();
        let id = kiwi_tests::robot_id_for_serial(&l.serial).to_string();
        let kind = match l.kind {
            LegacyKind::LeKiwi => "lekiwi",
            LegacyKind::Xlerobot => "xlerobot",
        };
        ensure!(
            by_ip[ip.as_str()].iter().any(|r| r["method"] == "ssh"
                && r["outcome"] == "identified"
                && r["robot_id"] == id.as_str()
                && r["robot_type"] == kind
                && r["mac_address"].is_string()),
            "legacy robot {ip} not identified over SSH as a {kind} ({id}): {:?}",
            by_ip[ip.as_str()]
        );
    }
    let ms = session["duration_ms"]
        .as_u64()
        .ok_or_else(|| anyhow!("a session without duration_ms: {session}"))?;
    Ok(Duration::from_millis(ms))
}

/// Checks the controller's log line of sweep `n` (1-based): every address
/// of the /24 decided, by the sweep's own ARP.
fn check_sweep_log(log: &str, n: usize) -> Result<()> {
    let line = log
        .lines()
        .filter(|l| l.contains("sweep done"))
        .nth(n - 1)
        .ok_or_else(|| anyhow!("no \"sweep done\" line for round {n} in the controller's log"))?;
    ensure!(
        line.contains(&format!("\"decided\":{LAN_ADDRESSES}")) && line.contains("\"arp\":true"),
        "round {n} did not decide all {LAN_ADDRESSES} addresses by ARP: {line}"
    );
    Ok(())
}

/// Figure LAN 1: whole-/24 discovery rounds against `arp-scan`, interleaved.
fn lan_full_discovery(sizes: &Sizes) -> Result<Row> {
    let setup = Instant::now();
    let DiscoveryLan {
        agents,
        legacy,
        controller,
        key: _key,
        lan,
    } = DiscoveryLan::start(LAN_AGENTS, LAN_LEGACY, LAN_DEADLINE)?;
    progress(&format!(
        "  LAN up: {LAN_AGENTS} agents connected, {LAN_LEGACY} legacy sshd robots, in {}",
        fmt_duration(setup.elapsed())
    ));

    let hosts: BTreeSet<Ipv4Addr> = (1..=LAN_AGENTS + LAN_LEGACY).map(Lan::robot_ip).collect();
    let fast: [&str; 4] = ["-r", "1", "-t", "100"];
    let mut kiwi = Vec::new();
    let mut api_walls = Vec::new();
    let mut scan_default = Vec::new();
    let mut scan_fast = Vec::new();
    for n in 1..=sizes.lan_rounds {
        // Rotate which of the three goes first, so none is always right
        // after another's traffic.
        for step in 0..3 {
            match (n + step) % 3 {
                0 => {
                    let (took, found) = arp_scan(&lan, &[])?;
                    ensure!(
                        found == hosts,
                        "arp-scan (defaults) found {} addresses, not the {} hosts: {found:?}",
                        found.len(),
                        hosts.len()
                    );
                    scan_default.push(took);
                }
                1 => {
                    let (took, found) = arp_scan(&lan, &fast)?;
                    ensure!(
                        found == hosts,
                        "arp-scan -r 1 -t 100 found {} addresses, not the {} hosts: {found:?}",
                        found.len(),
                        hosts.len()
                    );
                    scan_fast.push(took);
                }
                _ => {
                    let (session, wall) = lan_round(&lan, &controller)?;
                    let took = check_round(&session, &agents, &legacy)
                        .with_context(|| format!("discovery round {n}"))?;
                    check_sweep_log(&controller.log_text(), n)?;
                    progress(&format!(
                        "  round {n}: duration_ms {} (API wall {}), all {} hosts, {} legacy over SSH",
                        took.as_millis(),
                        fmt_duration(wall),
                        hosts.len(),
                        legacy.len()
                    ));
                    kiwi.push(took);
                    api_walls.push(wall);
                }
            }
        }
        progress(&format!(
            "  arp-scan round {n}: defaults {}, -r 1 -t 100 {}",
            fmt_duration(scan_default[n - 1]),
            fmt_duration(scan_fast[n - 1])
        ));
    }
    let first = kiwi[0];
    let k = Stats::of(kiwi)?;
    let api = Stats::of(api_walls)?;
    let d = Stats::of(scan_default)?;
    let f = Stats::of(scan_fast)?;
    drop(agents);
    drop(controller);
    drop(legacy);
    drop(lan);
    Ok(Row {
        metric: LAN_METRICS[0].into(),
        kiwi: format!("round `duration_ms`: {}", k.show()),
        baseline: format!(
            "`arp-scan -I eth0 10.88.0.0/24`, defaults: {}; with `-r 1 -t 100`: {}",
            d.show(),
            f.show()
        ),
        ratio: format!(
            "{} vs defaults · {} vs `-r 1 -t 100`",
            ratio(k.p50, d.p50, "p50"),
            ratio(k.p50, f.p50, "p50")
        ),
        target: "p50 ≤ 1.0 s".into(),
        met: Some(k.p50 <= Duration::from_secs(1)),
        note: format!(
            "the simulated LAN of `kiwi_tests::lan` (network namespaces, one bridge): \
             10.88.0.0/24 with {LAN_AGENTS} hosts running the release `kiwi-agent` (connected), \
             {LAN_LEGACY} legacy robots running only OpenSSH (LeKiwi and XLERobot alternately) \
             and 203 empty addresses; a release `kiwi-controller serve` in the controller \
             namespace with `DISCOVERY_NETWORKS=10.88.0.0/24` and the SSH fallback, each round \
             started with `POST /api/v2/discover`. The figure is the session's `duration_ms` \
             (all discovery sources, the sweep and the SSH identifications included); each \
             round is checked to report exactly the 50 hosts, every agent host identified, \
             all {LAN_LEGACY} legacy robots identified over SSH (id, type and MAC), and the \
             sweep to have decided all {LAN_ADDRESSES} addresses by ARP, else the run fails. \
             The API's wall time from the POST to seeing the round done (polled every {} ms) \
             was {}. Before every kiwi round and every `arp-scan` the controller namespace's \
             neighbour table is flushed (`ip -n <ctl> neigh flush all`), so neither starts \
             from a warm ARP cache; the agents' own traffic can refill it during a round. The \
             controller's SSH known hosts are empty before round 1 (the 10 host keys are \
             learnt and the 10 robots created then: {}) and warm after it. `arp-scan` runs in \
             the controller namespace (`ip netns exec`, whose start is in its wall time), is \
             checked to find exactly the 50 hosts each time, and only finds addresses: it \
             identifies nothing. The three alternate, {} rounds each",
            kiwi_tests::api::DISCOVERY_POLL.as_millis(),
            api.show(),
            fmt_duration(first),
            sizes.lan_rounds
        ),
    })
}

/// Figure LAN 2: `kiwi-agent run` with `KIWI_AGENT_ANNOUNCE=true`, one at
/// a time, against the controller's passive discovery (beacon listener and
/// mDNS browse) running in-process in the controller namespace.
fn lan_announce(sizes: &Sizes, rt: &tokio::runtime::Handle) -> Result<Vec<Row>> {
    let n = sizes.lan_announce_agents;
    let lan = Lan::build(n)?;
    let sightings = Sightings::new();
    let shutdown = CancellationToken::new();
    let mut settings = AnnounceSettings::new(SocketAddr::from((Lan::ctl_ip(), 8765)));
    settings.mdns = true;
    settings.beacon = true;
    let (s, token) = (sightings.clone(), shutdown.clone());
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let passive = lan.spawn_in(lan.ctl(), move || async move {
        match announce::start(settings, s, token).await {
            Ok(announcer) => {
                let _ = ready_tx.send(Ok(()));
                announcer.run().await;
            }
            Err(e) => {
                let _ = ready_tx.send(Err(anyhow!("{e}")));
            }
        }
    });
    let outcome = ready
        .recv_timeout(LAN_DEADLINE)
        .context("the passive discovery did not start")
        .and_then(|started| started.context("cannot start the passive discovery"))
        .and_then(|()| announce_samples(&lan, n, &sightings, rt));
    shutdown.cancel();
    let _ = passive.join();
    drop(lan);
    let samples = outcome?;
    let floor = Stats::of(samples.floors)?;
    let b = Stats::of(samples.beacons)?;
    let m = Stats::of(samples.mdns)?;
    let baseline = format!(
        "`kiwi-agent --version` spawn → exit in the robot namespace: {}",
        floor.show()
    );
    let common = format!(
        "{n} robots of the simulated LAN, one at a time: a release `kiwi-agent run` with \
         `KIWI_AGENT_ANNOUNCE=true` (default beacon interval, a fixed controller address that \
         is not answering: announcing does not wait for a connection) started in the robot's \
         namespace with `ip netns exec`; the controller's passive discovery \
         (`kiwi_controller::discovery::announce`, beacon listener and mDNS browse, as \
         `ENABLE_UDP_BROADCAST` and `ENABLE_MDNS` run it) in-process in the controller \
         namespace; from just before the spawn to the `seen_at` of the robot's first \
         sighting by that method. Baseline: `ip netns exec <robot> kiwi-agent --version`, \
         spawn → exit, before each agent"
    );
    Ok(vec![
        Row {
            metric: LAN_METRICS[1].into(),
            kiwi: b.show(),
            baseline: baseline.clone(),
            ratio: ratio(b.p50, floor.p50, "p50"),
            target: "—".into(),
            met: None,
            note: format!("{common}; the first beacon goes out as the announcer starts"),
        },
        Row {
            metric: LAN_METRICS[2].into(),
            kiwi: m.show(),
            baseline,
            ratio: ratio(m.p50, floor.p50, "p50"),
            target: "—".into(),
            met: None,
            note: format!(
                "{common}; the agent registers its service without RFC 6762 probing (its \
                 instance and host names are unique per robot), so it is announced at once; \
                 with probing it would come 0.75–1 s later"
            ),
        },
    ])
}

/// Per agent: spawn → exit of `kiwi-agent --version` (the floor), and
/// spawn → first sighting by beacon and by mDNS.
#[derive(Debug, Default)]
struct AnnounceSamples {
    floors: Vec<Duration>,
    beacons: Vec<Duration>,
    mdns: Vec<Duration>,
}

/// Agents 1..=`n` started one at a time: for each, the version floor and
/// the times from spawn to the first beacon and the first mDNS sighting.
fn announce_samples(
    lan: &Lan,
    n: usize,
    sightings: &Sightings,
    rt: &tokio::runtime::Handle,
) -> Result<AnnounceSamples> {
    let mut samples = AnnounceSamples::default();
    for i in 1..=n {
        let floor = version_floor_in(lan, &lan.robot(i))?;
        let mut agent = LanAgent::new(i);
        let id = RobotId(agent.robot_id);
        let mut events = sightings.subscribe();
        let spawned = chrono::Utc::now();
        // A fixed controller that is not there: announcing does not
        // depend on being connected.
        agent.start(lan, "10.88.0.1:1", None, &[("KIWI_AGENT_ANNOUNCE", "true")]);
        let seen = rt.block_on(async {
            let mut seen: BTreeMap<&'static str, chrono::DateTime<chrono::Utc>> = BTreeMap::new();
            let deadline = tokio::time::Instant::now() + LAN_DEADLINE;
            while seen.len() < 2 {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Ok(Ok(s)) if s.robot_id == id => {
                        seen.entry(s.method.as_str()).or_insert(s.seen_at);
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => bail!("sightings: {e}"),
                    Err(_) => bail!(
                        "agent {i} not seen by both beacon and mDNS within \
                         {LAN_DEADLINE:?} (seen by {:?}); its log:\n{}",
                        seen.keys().collect::<Vec<_>>(),
                        agent.log_text()
                    ),
                }
            }
            Ok(seen)
        })?;
        let since = |method: Method| -> Result<Duration> {
            let at = seen[method.as_str()];
            (at - spawned)
                .to_std()
                .map_err(|_| anyhow!("agent {i} seen by {} before it started", method.as_str()))
        };
        let (b, m) = (since(Method::Beacon)?, since(Method::Mdns)?);
        progress(&format!(
            "  agent {i}: beacon {}, mDNS {} (floor {})",
            fmt_duration(b),
            fmt_duration(m),
            fmt_duration(floor)
        ));
        samples.floors.push(floor);
        samples.beacons.push(b);
        samples.mdns.push(m);
        agent.stop();
    }
    Ok(samples)
}

/// Spawn → exit of `ip netns exec <ns> kiwi-agent --version`: the floor of
/// starting the agent in a robot namespace at all.
fn version_floor_in(lan: &Lan, ns: &str) -> Result<Duration> {
    let mut command = lan.command(ns, lan_binary("kiwi-agent"));
    command
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let t0 = Instant::now();
    let status = command
        .status()
        .context("cannot run kiwi-agent --version")?;
    let took = t0.elapsed();
    ensure!(
        status.success(),
        "kiwi-agent --version exited with {status}"
    );
    Ok(took)
}

// ------------------------------------------------------------ report

/// The machine the figures come from.
fn machine() -> Vec<(&'static str, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_string())
        })
    };
    let cpu = field("model name")
        .or_else(|| field("Model"))
        .or_else(|| field("Hardware"))
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                let kb: f64 = l
                    .strip_prefix("MemTotal:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()?;
                Some(format!("{:.1} GiB", kb / 1_048_576.0))
            })
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("Linux {}", s.trim()))
        .unwrap_or_else(|_| "unknown".into());
    let rustc = Command::new("rustc")
        .arg("--version")
        .current_dir(workspace_root())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    vec![
        ("CPU", cpu),
        ("Cores (nproc)", cores.to_string()),
        ("Memory", memory),
        ("Kernel", kernel),
        ("rustc", rustc),
        (
            "Date",
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        ),
    ]
}

fn table(md: &mut String, rows: &[Row]) {
    let _ = writeln!(
        md,
        "| Metric | kiwi | Baseline (same run) | Ratio | Target | Met? |\n|---|---|---|---|---|---|"
    );
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            r.metric, r.kiwi, r.baseline, r.ratio, r.target, met
        );
    }
}

/// The figures of a run, by section.
#[derive(Debug)]
struct Tables {
    /// Loopback and in-process figures (1–4).
    rows: Vec<Row>,
    /// TLS WebSocket and QUIC against plain WebSocket.
    secure_rows: Vec<Row>,
    storage_rows: Vec<Row>,
    storage_info: StorageInfo,
    /// The simulated LAN (8–9), or "not measured" rows.
    lan_rows: Vec<Row>,
    /// Failure detection on the simulated LAN, or "not measured" rows.
    detection_rows: Vec<Row>,
    /// A fleet on one controller against Mosquitto, and its description.
    scale_rows: Vec<Row>,
    scale_info: String,
}

fn markdown(
    args: &Args,
    sizes: &Sizes,
    tables: &Tables,
    created_in: Duration,
    total: Duration,
) -> String {
    let Tables {
        rows,
        secure_rows,
        storage_rows,
        storage_info: storage,
        lan_rows,
        detection_rows,
        scale_rows,
        scale_info,
    } = tables;
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `kiwi-bench` (`cargo run --release -p kiwi-tests --bin kiwi-bench{}`), \
         {}. Every baseline was measured in the same run, its samples interleaved with \
         kiwi's, so both saw the same machine. Percentiles are nearest-rank over all samples; \
         ratios are kiwi ÷ baseline. The run took {}.\n",
        if args.quick { " -- --quick" } else { "" },
        if args.quick {
            "a **quick smoke run**: few samples, figures not meant to be kept"
        } else {
            "a full run"
        },
        fmt_duration(total)
    );
    table(&mut md, rows);
    let _ = writeln!(md, "\n## Secure links\n");
    let _ = writeln!(
        md,
        "The release `kiwi-controller` as a process of its own (memory is its `VmRSS`), \
         agents and clients on loopback; the baseline is a plain WebSocket server with the \
         controller's WebSocket buffer sizes and malloc arenas, also a process of its own \
         (`kiwi-bench --plain-ws-server`): what holding a WebSocket costs without TLS, authentication or \
         session state.\n"
    );
    table(&mut md, secure_rows);
    let _ = writeln!(md, "\n## Storage: PostgreSQL and Redis\n");
    let _ = writeln!(
        md,
        "PostgreSQL {} (fsync {}, synchronous_commit {}, wal_sync_method {}) and Redis {} \
         ({}), in a database (`kiwi_bench_<uuid>`) and under a key prefix of the run's \
         own, both removed at its end. Pools: {} connections, as `db_pool_size` by default.\n",
        storage.postgres,
        storage.fsync,
        storage.synchronous_commit,
        storage.wal_sync_method,
        storage.redis,
        storage.servers,
        storage.pool_size
    );
    table(&mut md, storage_rows);
    let _ = writeln!(md, "\n## LAN discovery (simulated LAN)\n");
    let _ = writeln!(
        md,
        "A robot LAN built from network namespaces on this machine (`kiwi_tests::lan`: one \
         bridge, the controller at 10.88.0.1, robots at 10.88.0.2 and up, no loss), with the \
         release `kiwi-controller` and `kiwi-agent` and real OpenSSH servers as legacy robots. \
         Needs root; without it these rows say \"not measured\".\n"
    );
    table(&mut md, lan_rows);
    let _ = writeln!(md, "\n## Failure detection (simulated Wi-Fi LAN)\n");
    let _ = writeln!(
        md,
        "The same simulated LAN, one per case, with 1 % loss on every robot's link and \
         2 ms ± 1 ms of delay each way, real `kiwi-agent` processes and the \
         controller's components in this process (its sessions are where the heartbeat \
         arrivals are read). The recorded arrivals are replayed through the controller's \
         φ-accrual detector (with its active probe) and through a fixed timeout of three \
         heartbeat intervals: the ratio compares the two detectors on identical input. \
         Needs root; without it these rows say \"not measured\".\n"
    );
    table(&mut md, detection_rows);
    let _ = writeln!(
        md,
        "\n## Scale: a fleet on one controller, against an MQTT broker\n"
    );
    let _ = writeln!(md, "{scale_info}\n");
    table(&mut md, scale_rows);
    let _ = writeln!(md, "\n## How each figure is measured\n");
    for r in rows
        .iter()
        .chain(secure_rows)
        .chain(storage_rows)
        .chain(lan_rows)
        .chain(detection_rows)
        .chain(scale_rows)
    {
        let _ = writeln!(md, "- **{}**: {}.", r.metric, r.note);
    }
    let _ = writeln!(
        md,
        "- The in-process controller (figures 2–4) is `kiwi_controller::serve::Components`, \
         what `serve` runs (SQLite store in WAL mode with `synchronous = FULL`, cache, fleet, \
         watch projector, liveness, API router), without the agent endpoint: its robots have \
         no agent, so liveness gets a start-up grace longer than the run and discovery runs \
         on demand only. Its {} robots were created through \
         `Fleet::apply`/`Fleet::report`, {} at a time (group commit), in {}.",
        fmt_count(sizes.fleet_robots),
        CREATE_CONCURRENCY,
        fmt_duration(created_in)
    );
    let _ = writeln!(md, "\n## Machine\n");
    for (k, v) in machine() {
        let _ = writeln!(md, "- {k}: {v}");
    }
    md
}
