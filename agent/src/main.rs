//! The `kiwi-agent` binary: parses the command line, sets up logging and
//! signal handling, and hands over to the library. Exit codes: 0 after a
//! clean shutdown, 2 for an invalid configuration or command line, 1 for
//! anything else.

use clap::{CommandFactory, Parser, Subcommand};
use kiwi_agent::config::{self, RunFlags};
use kiwi_agent::simulate::{self, SimulateArgs};
use kiwi_security::token::EnrollmentToken;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "kiwi-agent", version, about = "The kiwi robot-side agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent of this robot.
    Run(RunFlags),
    /// Run N virtual agents against a controller (load generator).
    Simulate(SimulateArgs),
    /// Enroll this robot with a controller: make its key (kept on the
    /// robot), get its client certificate, store both in the state
    /// directory. Without a token, waits until an operator approves it.
    Enroll(EnrollArgs),
    /// Validate the configuration and exit (0: valid, 2: invalid).
    CheckConfig(RunFlags),
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell) on stdout.
    Completions(kiwi_service::cli::CompletionsArgs),
    /// Write the man pages of this program and of each subcommand into a
    /// directory.
    Manpages(kiwi_service::cli::ManpagesArgs),
}

#[derive(Debug, clap::Args)]
struct EnrollArgs {
    /// The enrollment token from `kiwi-controller token create` (it pins
    /// the controller's CA), or `-` to read it from standard input. Given
    /// here it shows in the process list: prefer `-`, `--token-file` or
    /// `KIWI_AGENT_ENROLL_TOKEN`. Without a token the robot waits for an
    /// operator's approval.
    #[arg(value_name = "TOKEN")]
    token: Option<String>,
    /// Read the enrollment token from this file (`-`: standard input).
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    run: RunFlags,
}

impl EnrollArgs {
    /// The token the command was given, from wherever it was given:
    /// `Ok(None)` when none was (then the configuration's `enroll_token`,
    /// else an operator's approval).
    fn token(&self) -> Result<Option<EnrollmentToken>, String> {
        let text = match (&self.token, &self.token_file) {
            (Some(t), _) if t == "-" => read_token_from("standard input", std::io::stdin())?,
            (Some(t), _) => {
                tracing::warn!(
                    "the enrollment token was given on the command line, where other users \
                     can see it (ps); give it on standard input (`-`), with --token-file or \
                     in KIWI_AGENT_ENROLL_TOKEN"
                );
                t.clone()
            }
            (None, Some(path)) if path.as_os_str() == "-" => {
                read_token_from("standard input", std::io::stdin())?
            }
            (None, Some(path)) => {
                let file = std::fs::File::open(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                read_token_from(&path.display().to_string(), file)?
            }
            (None, None) => return Ok(None),
        };
        text.trim()
            .parse()
            .map(Some)
            .map_err(|e| format!("not an enrollment token: {e}"))
    }
}

/// The first non-empty line of `input` (at most 4 KiB are read).
fn read_token_from(what: &str, input: impl std::io::Read) -> Result<String, String> {
    use std::io::Read as _;
    let mut text = String::new();
    input
        .take(4096)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the token from {what}: {e}"))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
        .ok_or_else(|| format!("no enrollment token in {what}"))
}

fn main() -> ExitCode {
    kiwi_service::state::private_umask();
    let cli = Cli::parse();
    let env = || {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
    };
    // The commands that talk to a person print and exit before any logging.
    let command = match cli.command {
        Command::CheckConfig(flags) => {
            return match config::load(&flags, env()) {
                Ok(_) => {
                    println!("configuration is valid");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kiwi-agent: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Completions(a) => {
            kiwi_service::cli::print_completions(Cli::command(), a.shell);
            return ExitCode::SUCCESS;
        }
        Command::Manpages(a) => {
            return kiwi_service::cli::manpages_command(Cli::command(), &a.dir);
        }
        other => other,
    };
    kiwi_service::logging::init("kiwi-agent", "info");
    let result = match command {
        Command::CheckConfig(_) | Command::Completions(_) | Command::Manpages(_) => Ok(()),
        Command::Run(flags) => {
            // Validate before anything starts or connects.
            match config::load(&flags, env()) {
                Ok(cfg) => runtime(false).and_then(|rt| {
                    rt.block_on(async {
                        let shutdown = shutdown_on_signals()?;
                        kiwi_service::systemd::supervise(shutdown.clone());
                        kiwi_agent::run(cfg, shutdown).await
                    })
                }),
                Err(e) => {
                    tracing::error!(error = %e, "invalid configuration");
                    return ExitCode::from(2);
                }
            }
        }
        Command::Enroll(args) => {
            let cfg = match config::load(&args.run, env()) {
                Ok(cfg) => cfg,
                Err(e) => {
                    tracing::error!(error = %e, "invalid configuration");
                    return ExitCode::from(2);
                }
            };
            let Some(url) = cfg.controller.url().cloned() else {
                tracing::error!("enroll needs the controller's address (--controller host:port)");
                return ExitCode::from(2);
            };
            let given = match args.token() {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "no usable enrollment token");
                    return ExitCode::from(2);
                }
            };
            runtime(false).and_then(|rt| {
                rt.block_on(async {
                    let shutdown = shutdown_on_signals()?;
                    kiwi_security::install_crypto_provider();
                    let token = given.or(cfg.enroll_token.clone());
                    let agent = tokio::task::spawn_blocking(move || {
                        kiwi_agent::Agent::from_config(&cfg).map(|a| (a, cfg))
                    })
                    .await??;
                    let (agent, cfg) = agent;
                    let creds = kiwi_agent::enroll::enroll(
                        &cfg.state_dir,
                        agent.identity(),
                        &url,
                        token.as_ref(),
                        Some(5),
                        None,
                        &shutdown,
                    )
                    .await?;
                    println!(
                        "enrolled robot {} (certificate valid until {:?})",
                        agent.identity().robot_id,
                        creds.not_after()
                    );
                    anyhow::Ok(())
                })
            })
        }
        Command::Simulate(args) => runtime(true).and_then(|rt| {
            rt.block_on(async {
                let shutdown = shutdown_on_signals()?;
                simulate::simulate(args, shutdown).await
            })
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "kiwi-agent failed");
            ExitCode::FAILURE
        }
    }
}

/// One robot needs one thread; a simulator of hundreds uses every core.
fn runtime(multi_thread: bool) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    Ok(builder.enable_all().build()?)
}

/// A token cancelled on SIGTERM or SIGINT.
fn shutdown_on_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
        cancel.cancel();
    });
    Ok(token)
}
