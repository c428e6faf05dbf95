//! `kiwi-agent simulate`: many virtual agents in one process, the load
//! generator for tests and benchmarks. Each has its own identity, fake
//! telemetry that drifts a little, a simulated workload and its own durable
//! outbox, and talks to the controller through exactly the link code `run`
//! uses (so it reconnects with the one backoff policy and resends what was
//! not acknowledged).
//!
//! With `--summary FILE`, what each agent went through is written there at
//! exit ([`SimulationSummary`]): how far the controller acknowledged its
//! reports and when it was welcomed, so that a test can check what an
//! acknowledgement promised against what the controller stored.

use crate::agent::{self, Agent, unix_ms};
use crate::config::{
    ControllerUrl, DEFAULT_RECONNECT_BASE, DEFAULT_RECONNECT_CAP, Transport, parse_controller,
    parse_positive_duration, parse_transport,
};
use crate::credentials::Credentials;
use crate::link::{self, LinkOptions};
use anyhow::Context;
use ipnet::IpNet;
use kiwi_protocol::backoff::Backoff;
use kiwi_protocol::settings::parse_duration;
use kiwi_security::token::EnrollmentToken;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Agents start spread evenly over this window by default, so hundreds do
/// not connect in the same millisecond.
pub const START_SPREAD: Duration = Duration::from_secs(1);

/// The flags of `kiwi-agent simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// How many virtual agents to run.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub count: u32,
    /// Controller address, host:port or wss://host:port[/path].
    #[arg(long, value_name = "URL", value_parser = parse_controller)]
    pub controller: ControllerUrl,
    /// `auto`, `quic` or `websocket`.
    #[arg(long, value_name = "TRANSPORT", default_value = "auto", value_parser = parse_transport)]
    pub transport: Transport,
    /// The enrollment token agents without a certificate enroll with (it
    /// needs a use per agent: `token create --uses N`).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "KIWI_AGENT_ENROLL_TOKEN",
        hide_env_values = true
    )]
    pub enroll_token: Option<EnrollmentToken>,
    /// Where the agents keep their state (default: a temporary directory
    /// removed on exit).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Agent `i` is identified as `{prefix}-{i}`.
    #[arg(long, value_name = "TEXT", default_value = "sim", value_parser = parse_prefix)]
    pub id_prefix: String,
    /// Periodic report interval of each agent.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_positive_duration)]
    pub report_interval: Duration,
    /// Outbox bound of each agent, in unacknowledged reports.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub outbox_capacity: u32,
    /// The agents start spread evenly over this window (a slower start
    /// lets a controller enroll a large fleet without a crowd at its door).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub start_spread: Duration,
    /// Write a JSON summary of the run here at exit: per agent, the
    /// highest report seq the controller acknowledged and when it was
    /// welcomed.
    #[arg(long, value_name = "FILE")]
    pub summary: Option<PathBuf>,
    /// Connect from the addresses of this network, one per agent in turn
    /// (e.g. `127.1.0.0/18`: every loopback address is local, so each
    /// simulated robot can have an address of its own, as on a LAN, and
    /// ten thousand connections do not share one address's ports).
    #[arg(long, value_name = "CIDR", value_parser = parse_source_network)]
    pub source_network: Option<IpNet>,
}

/// What `--summary` holds: one entry per agent that was set up, in index
/// order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimulationSummary {
    pub agents: Vec<AgentSummary>,
}

/// What one simulated agent went through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSummary {
    /// Agent `index` is `{prefix}-{index}`.
    pub index: u32,
    pub robot_id: uuid::Uuid,
    /// The controller acknowledged every report up to this seq (acks are
    /// cumulative); 0: none. With `dropped` 0, the acknowledged reports
    /// are exactly `1..=acked_seq`.
    pub acked_seq: u64,
    /// Reports still unacknowledged in the outbox when the agent stopped.
    pub unacked: u64,
    /// Reports dropped unacknowledged because the outbox was full.
    pub dropped: u64,
    /// Each time the controller welcomed the agent (Unix ms, wall clock),
    /// in order.
    pub connected_at_ms: Vec<i64>,
}

impl AgentSummary {
    /// An agent that never got as far as its link (shut down first).
    fn idle(index: u32, prefix: &str) -> Self {
        Self {
            index,
            robot_id: agent::simulated_robot_id(prefix, index).0,
            acked_seq: 0,
            unacked: 0,
            dropped: 0,
            connected_at_ms: Vec::new(),
        }
    }
}

/// An id prefix must make safe directory names.
pub fn parse_prefix(text: &str) -> Result<String, String> {
    let valid = !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !text.starts_with('.');
    if valid {
        Ok(text.to_string())
    } else {
        Err(format!(
            "invalid id prefix {text:?} (letters, digits, '-', '_', '.'; at most 64)"
        ))
    }
}

/// A source network must have addresses to give out.
pub fn parse_source_network(text: &str) -> Result<IpNet, String> {
    let net: IpNet = text
        .parse()
        .map_err(|e| format!("invalid network {text:?}: {e} (expected e.g. 127.1.0.0/18)"))?;
    if net.hosts().next().is_none() {
        return Err(format!("network {net} has no host addresses"));
    }
    Ok(net)
}

/// The source addresses of `count` agents: the host addresses of `net` in
/// order, starting again from the first when there are fewer than agents.
pub fn source_addresses(net: &IpNet, count: u32) -> Vec<IpAddr> {
    let hosts: Vec<IpAddr> = net.hosts().take(count as usize).collect();
    (0..count as usize)
        .map(|i| hosts[i % hosts.len()])
        .collect()
}

/// File descriptors the simulator needs beside one per agent (its
/// connection or QUIC socket): an outbox is open only while a report is
/// appended (on a runtime thread, so a few at once), and reconnects and
/// enrollments come and go.
const FDS_HEADROOM: u64 = 1_024;

/// When agent `index` of `count` starts, relative to the first, when they
/// start spread evenly over `spread`.
pub fn start_offset(index: u32, count: u32, spread: Duration) -> Duration {
    if count <= 1 {
        return Duration::ZERO;
    }
    spread.mul_f64(f64::from(index) / f64::from(count))
}

/// Runs `args.count` agents until `shutdown` is cancelled; each says
/// `Goodbye` when connected. Fails if any agent could not be set up.
pub async fn simulate(args: SimulateArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let temp;
    let state_root = match &args.state_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create state directory {}", dir.display()))?;
            dir.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("kiwi-simulate-")
                .tempdir()
                .context("cannot create a temporary state directory")?;
            temp.path().to_path_buf()
        }
    };
    kiwi_security::install_crypto_provider();
    let wanted = u64::from(args.count) + FDS_HEADROOM;
    match kiwi_service::limits::raise_nofile_limit(wanted) {
        Ok(limit) if limit.is_short() => tracing::warn!(
            soft = limit.soft,
            wanted,
            "the open-files limit is below what {} agents may need; some may fail to connect",
            args.count
        ),
        Ok(limit) => tracing::debug!(soft = limit.soft, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
    let sources = args
        .source_network
        .map(|net| source_addresses(&net, args.count));
    let opts = LinkOptions::new(Backoff::new(DEFAULT_RECONNECT_BASE, DEFAULT_RECONNECT_CAP));
    tracing::info!(
        count = args.count,
        controller = %args.controller,
        transport = args.transport.as_str(),
        state_dir = %state_root.display(),
        "starting simulated agents"
    );
    let mut tasks = JoinSet::new();
    for index in 0..args.count {
        let mut opts = opts.clone();
        let (url, transport, token) = (
            args.controller.clone(),
            args.transport,
            args.enroll_token.clone(),
        );
        let shutdown = shutdown.clone();
        let prefix = args.id_prefix.clone();
        let root = state_root.clone();
        let interval = args.report_interval;
        let capacity = args.outbox_capacity as usize;
        let offset = start_offset(index, args.count, args.start_spread);
        let source = sources.as_ref().map(|s| s[index as usize]);
        let span = tracing::info_span!("sim", agent = %format!("{prefix}-{index}"));
        tasks.spawn(
            async move {
                let idle = AgentSummary::idle(index, &prefix);
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(idle),
                    () = tokio::time::sleep(offset) => {}
                }
                let dir = agent::simulated_state_dir(&root, &prefix, index);
                let mut agent = tokio::task::spawn_blocking(move || {
                    Agent::simulated(index, &prefix, &root, interval, capacity)
                })
                .await
                .context("agent set-up task failed")??;
                let stored = {
                    let dir = dir.clone();
                    tokio::task::spawn_blocking(move || Credentials::load(&dir))
                        .await
                        .context("credentials task failed")??
                };
                let credentials = match stored {
                    Some(c) => Arc::new(c),
                    None => match crate::enroll::enroll(
                        &dir,
                        agent.identity(),
                        &url,
                        token.as_ref(),
                        None,
                        source,
                        &shutdown,
                    )
                    .await
                    {
                        Ok(c) => Arc::new(c),
                        Err(_) if shutdown.is_cancelled() => return Ok(idle),
                        Err(e) => return Err(e),
                    },
                };
                let connector = crate::connector_for(&url, transport, &credentials, source);
                opts.credentials = Some(credentials);
                let (connected, welcomes) = watch::channel(false);
                opts.connected = Some(connected);
                let link = async {
                    link::run(&mut agent, &connector, &opts, &shutdown).await;
                    // Dropping the sender ends the recorder.
                    opts.connected = None;
                };
                let ((), connected_at_ms) = tokio::join!(link, record_welcomes(welcomes));
                let outbox = agent.outbox();
                anyhow::Ok(AgentSummary {
                    acked_seq: outbox.acked(),
                    unacked: outbox.pending().len() as u64,
                    dropped: outbox.dropped_total(),
                    connected_at_ms,
                    ..idle
                })
            }
            .instrument(span),
        );
    }
    let mut failed = 0usize;
    let mut first_error = None;
    let mut summary = SimulationSummary::default();
    while let Some(joined) = tasks.join_next().await {
        let result = joined
            .context("simulated agent task failed")
            .and_then(|r| r);
        match result {
            Ok(agent) => summary.agents.push(agent),
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "simulated agent failed");
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    tracing::info!(count = args.count, failed, "simulated agents stopped");
    if let Some(path) = &args.summary {
        summary.agents.sort_by_key(|a| a.index);
        write_summary(path, &summary)?;
    }
    match first_error {
        Some(e) => Err(e.context(format!(
            "{failed} of {} simulated agents failed",
            args.count
        ))),
        None => Ok(()),
    }
}

/// The times (Unix ms) at which the link said it was welcomed, until its
/// sender is dropped.
async fn record_welcomes(mut welcomes: watch::Receiver<bool>) -> Vec<i64> {
    let mut at = Vec::new();
    while welcomes.changed().await.is_ok() {
        if *welcomes.borrow_and_update() {
            at.push(unix_ms());
        }
    }
    at
}

/// Writes the summary atomically: a reader never sees half of it.
fn write_summary(path: &Path, summary: &SimulationSummary) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec(summary).context("cannot encode the summary")?;
    crate::state::write_atomic(path, &bytes)
        .with_context(|| format!("cannot write the summary to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_spread_over_a_second() {
        assert_eq!(start_offset(0, 1, START_SPREAD), Duration::ZERO);
        assert_eq!(start_offset(0, 500, START_SPREAD), Duration::ZERO);
        assert_eq!(
            start_offset(250, 500, START_SPREAD),
            Duration::from_millis(500)
        );
        assert!(start_offset(499, 500, START_SPREAD) < START_SPREAD);
        let ten = Duration::from_secs(10);
        assert_eq!(start_offset(500, 1000, ten), Duration::from_secs(5));
        assert_eq!(start_offset(7, 1000, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn source_addresses_go_round_the_network() {
        let net = parse_source_network("127.1.0.0/30").expect("valid");
        let ip = |s: &str| s.parse::<IpAddr>().expect("address");
        assert_eq!(
            source_addresses(&net, 5),
            vec![
                ip("127.1.0.1"),
                ip("127.1.0.2"),
                ip("127.1.0.1"),
                ip("127.1.0.2"),
                ip("127.1.0.1")
            ]
        );
        let big = parse_source_network("127.1.0.0/18").expect("valid");
        let spread = source_addresses(&big, 10_000);
        assert_eq!(spread[0], ip("127.1.0.1"));
        assert_eq!(spread[9_999], ip("127.1.39.16"));
        assert!(parse_source_network("127.1.0.1/32").is_ok());
        assert!(parse_source_network("not a network").is_err());
    }

    #[test]
    fn prefixes() {
        assert!(parse_prefix("sim").is_ok());
        assert!(parse_prefix("bench_1.a-b").is_ok());
        assert!(parse_prefix("").is_err());
        assert!(parse_prefix("../x").is_err());
        assert!(parse_prefix("a/b").is_err());
    }
}
