//! The `kiwi-controller` binary: parses the command line, sets up logging,
//! and hands over to the library. Exit codes: 0 after a clean stop, 1 on a
//! runtime error, 2 on an invalid configuration.

use clap::{Args, Parser, Subcommand};
use kiwi_controller::config::{Config, Flags};
use kiwi_controller::serve;
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (args, check_only) = match cli.command {
        Some(Command::Serve(a)) => (a, false),
        Some(Command::CheckConfig(a)) => (a, true),
        None => (cli.serve, false),
    };
    let config = match load(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if check_only {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kiwi-controller: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(serve::cancel_on_signal(shutdown.clone()));
        match serve::serve(config, shutdown, |_| {}).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "kiwi-controller stopped");
                eprintln!("kiwi-controller: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}
