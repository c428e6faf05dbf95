//! The `kiwi-controller` binary: parses the command line, sets up logging,
//! and hands over to the library. Exit codes: 0 after a clean stop, 1 on a
//! runtime error, 2 on an invalid configuration.

use clap::{Args, Parser, Subcommand};
use kiwi_controller::config::{Config, Flags};
use kiwi_controller::{ops, serve};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "kiwi-controller",
    version,
    about = "The kiwi edge controller for robot fleets"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Validate the configuration and exit (0: valid, 2: invalid).
    CheckConfig(ServeArgs),
    /// Apply the store's migrations and exit.
    Migrate(ServeArgs),
    /// Rebuild the read model from the event log and compare it with the
    /// live one (exit 0: identical, 1: they differ or the log does not replay).
    Replay(ServeArgs),
    /// Fold events older than a time into per-robot snapshots and delete
    /// them (replay still gives the same read model).
    Prune(PruneArgs),
}

#[derive(Debug, Args, Clone)]
struct PruneArgs {
    /// Prune events recorded before this: an RFC 3339 time or an age
    /// (`30d`, `12h`).
    #[arg(long, value_name = "TIME|AGE")]
    before: String,
    #[command(flatten)]
    store: ServeArgs,
}

#[derive(Debug, Args, Clone, Default)]
struct ServeArgs {
    /// Configuration file (default: /etc/kiwi/controller.toml if it exists).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory (the embedded store lives here).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Address of the REST API, watch stream and metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    api_listen: Option<String>,
    /// Address of the agents' WebSocket endpoint.
    #[arg(long, value_name = "ADDR:PORT")]
    agent_listen: Option<String>,
}

impl ServeArgs {
    fn flags(&self) -> Flags {
        Flags {
            config: self.config.clone(),
            state_dir: self.state_dir.clone(),
            api_listen: self.api_listen.clone(),
            agent_listen: self.agent_listen.clone(),
        }
    }
}

fn init_logging() {
    let filter = std::env::var("KIWI_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
}

fn load(args: &ServeArgs) -> Result<Config, ExitCode> {
    Config::load(&args.flags(), std::env::vars()).map_err(|e| {
        eprint!("kiwi-controller: {e}");
        ExitCode::from(2)
    })
}

/// What to do once the configuration is valid.
enum Task {
    Serve,
    Migrate,
    Replay,
    Prune(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (args, task) = match cli.command {
        Some(Command::Serve(a)) => (a, Some(Task::Serve)),
        Some(Command::CheckConfig(a)) => (a, None),
        Some(Command::Migrate(a)) => (a, Some(Task::Migrate)),
        Some(Command::Replay(a)) => (a, Some(Task::Replay)),
        Some(Command::Prune(p)) => (p.store, Some(Task::Prune(p.before))),
        None => (cli.serve, Some(Task::Serve)),
    };
    let config = match load(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(task) = task else {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    };
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kiwi-controller: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let outcome = match task {
            Task::Serve => {
                let shutdown = CancellationToken::new();
                tokio::spawn(serve::cancel_on_signal(shutdown.clone()));
                serve::serve(config, shutdown, |_| {})
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
            Task::Migrate => serve::open_store(&config).await.map(|_| {
                println!("migrations applied");
                ExitCode::SUCCESS
            }),
            Task::Replay => replay(&config).await,
            Task::Prune(before) => prune(&config, &before).await,
        };
        outcome.unwrap_or_else(|e| {
            tracing::error!(error = format!("{e:#}"), "kiwi-controller stopped");
            eprintln!("kiwi-controller: {e:#}");
            ExitCode::FAILURE
        })
    })
}

async fn replay(config: &Config) -> anyhow::Result<ExitCode> {
    let store = serve::open_store(config).await?;
    let check = ops::replay_check(store.as_ref()).await?;
    for d in &check.differences {
        println!(
            "robot {} differs:\n  live:    {}\n  rebuilt: {}",
            d.robot_id,
            serde_json::to_string(&d.live).unwrap_or_default(),
            serde_json::to_string(&d.rebuilt).unwrap_or_default()
        );
    }
    println!(
        "replayed {} events of {} robots: {} difference(s)",
        check.events,
        check.robots,
        check.differences.len()
    );
    Ok(if check.differences.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn prune(config: &Config, before: &str) -> anyhow::Result<ExitCode> {
    let before = match ops::parse_before(before, chrono::Utc::now()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("kiwi-controller: --before: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let store = serve::open_store(config).await?;
    let outcome = store.prune(before).await?;
    println!(
        "pruned before {}: {} robots snapshotted, {} events and {} reports removed",
        before.to_rfc3339(),
        outcome.robots,
        outcome.events_removed,
        outcome.reports_removed
    );
    Ok(ExitCode::SUCCESS)
}
