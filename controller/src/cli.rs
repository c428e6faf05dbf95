//! The `kiwi-controller` command line: its commands and arguments (clap),
//! and what each does once the configuration is valid: `serve`,
//! `check-config`, `migrate`, `replay`, `prune`, `token create|list|revoke`,
//! `completions`, `manpages`. Exit codes: 0 after a clean stop, 1 on a
//! runtime error, 2 on an invalid configuration or command line. The
//! binary (`main.rs`) only calls [`main`].

use crate::config::{Config, Flags};
use crate::security::ControllerPki;
use crate::security::tokens::{
    self, DEFAULT_ENROLLMENT_TTL, DEFAULT_ENROLLMENT_USES, api_token_status,
    enrollment_token_status,
};
use crate::store::auth::Role;
use crate::{ops, serve};
use chrono::Utc;
use clap::{Args, CommandFactory, Parser, Subcommand};
use kiwi_protocol::RobotId;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
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
    /// Make, list or revoke tokens: enrollment tokens for robots, API
    /// tokens for operators.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell) on stdout.
    Completions(kiwi_service::cli::CompletionsArgs),
    /// Write the man pages of this program and of each subcommand into a
    /// directory.
    Manpages(kiwi_service::cli::ManpagesArgs),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a token and print it (only the token on stdout, once). Without
    /// --role an enrollment token (it pins this controller's CA, creating
    /// the CA in the state directory if needed); with --role an API token.
    Create(TokenCreateArgs),
    /// List every token (never their secrets).
    List(ServeArgs),
    /// Revoke an API or enrollment token by its id.
    Revoke(TokenRevokeArgs),
}

#[derive(Debug, Args, Clone)]
struct TokenCreateArgs {
    /// Make an API token with this role.
    #[arg(long, value_name = "viewer|operator|admin", value_parser = parse_role)]
    role: Option<Role>,
    /// A label of the API token (who or what uses it).
    #[arg(long, value_name = "TEXT")]
    name: Option<String>,
    /// How long the token is valid (`30m`, `24h`): an enrollment token 1h
    /// unless told, an API token forever unless told.
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
    ttl: Option<Duration>,
    /// How many robots an enrollment token admits (default 1).
    #[arg(long, value_name = "N")]
    uses: Option<u32>,
    /// Make an enrollment token for this robot only (its robot id): it
    /// enrolls no other robot, and may replace the certificate the robot
    /// holds (a token for any robot waits for an operator then).
    #[arg(long, value_name = "ROBOT_ID")]
    robot: Option<uuid::Uuid>,
    #[command(flatten)]
    store: ServeArgs,
}

#[derive(Debug, Args, Clone)]
struct TokenRevokeArgs {
    /// The token's id (the part after `kiwi-api.v1.` or `kiwi-enroll.v1.`).
    #[arg(value_name = "ID")]
    id: String,
    #[command(flatten)]
    store: ServeArgs,
}

fn parse_role(text: &str) -> Result<Role, String> {
    Role::parse(text).ok_or_else(|| format!("{text:?} is not a role (viewer, operator or admin)"))
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = kiwi_protocol::settings::parse_duration(text)?;
    tokens::check_ttl(ttl)?;
    Ok(ttl)
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
    Token(TokenTask),
}

/// A `token` command, its arguments checked.
enum TokenTask {
    CreateApi {
        role: Role,
        name: String,
        ttl: Option<Duration>,
    },
    CreateEnrollment {
        ttl: Duration,
        uses: u32,
        robot: Option<RobotId>,
    },
    List,
    Revoke(String),
}

impl TokenCommand {
    /// The store arguments and the checked task, or what is wrong with
    /// the arguments.
    fn check(self) -> Result<(ServeArgs, TokenTask), String> {
        match self {
            TokenCommand::Create(a) => {
                let task = match a.role {
                    Some(role) => {
                        if a.uses.is_some() {
                            return Err("--uses applies to enrollment tokens (no --role); \
                                 API tokens are not counted"
                                .into());
                        }
                        if a.robot.is_some() {
                            return Err("--robot applies to enrollment tokens (no --role)".into());
                        }
                        let name = a.name.unwrap_or_default();
                        tokens::check_name(&name).map_err(|e| format!("--name: {e}"))?;
                        TokenTask::CreateApi {
                            role,
                            name,
                            ttl: a.ttl,
                        }
                    }
                    None => {
                        if a.name.is_some() {
                            return Err("--name applies to API tokens (with --role)".into());
                        }
                        let uses = a.uses.unwrap_or(DEFAULT_ENROLLMENT_USES);
                        tokens::check_uses(uses).map_err(|e| format!("--uses: {e}"))?;
                        TokenTask::CreateEnrollment {
                            ttl: a.ttl.unwrap_or(DEFAULT_ENROLLMENT_TTL),
                            uses,
                            robot: a.robot.map(RobotId),
                        }
                    }
                };
                Ok((a.store, task))
            }
            TokenCommand::List(store) => Ok((store, TokenTask::List)),
            TokenCommand::Revoke(a) => {
                let id = a.id.trim().to_string();
                if id.len() != kiwi_security::token::ID_HEX
                    || !id.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(format!(
                        "{id:?} is not a token id ({} hex digits)",
                        kiwi_security::token::ID_HEX
                    ));
                }
                Ok((a.store, TokenTask::Revoke(id.to_ascii_lowercase())))
            }
        }
    }
}

/// glibc's malloc arenas the controller allows itself (glibc's default is
/// eight per core). Each runtime worker would otherwise allocate from an
/// arena of its own, and a connection set up on one worker and served on
/// another leaves its freed memory scattered over several, which showed as
/// about 3 KiB more resident memory per idle agent (BENCHMARKS.md, "Secure
/// links") with no gain in handshake throughput. `MALLOC_ARENA_MAX` in the
/// environment overrides it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_ARENAS: libc::c_int = 2;

/// Applies [`MALLOC_ARENAS`]; called first thing, before any thread exists.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: `mallopt` only sets one of glibc's allocator tunables; it
    // takes no pointers and is called while the process is single-threaded.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

/// File descriptors the controller keeps beside its agents' connections:
/// API and watch clients, the store's and Redis's connections, discovery.
const NOFILE_HEADROOM: u64 = 4_096;

/// Raises the open-files limit to what `max_agents` connections need (the
/// soft limit a service starts with is usually 1,024).
fn raise_nofile_limit(config: &Config) {
    let wanted = u64::try_from(config.max_agents)
        .unwrap_or(u64::MAX)
        .saturating_add(NOFILE_HEADROOM);
    match kiwi_service::limits::raise_nofile_limit(wanted) {
        Ok(limit) if limit.is_short() => tracing::warn!(
            soft = limit.soft,
            hard = limit.hard,
            wanted,
            "the open-files limit is below what max_agents connections need (raise LimitNOFILE)"
        ),
        Ok(limit) => tracing::info!(soft = limit.soft, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
}

/// Runs the command the process was given.
pub fn main() -> ExitCode {
    kiwi_service::state::private_umask();
    limit_malloc_arenas();
    let cli = Cli::parse();
    let (args, task) = match cli.command {
        Some(Command::Completions(a)) => {
            kiwi_service::cli::print_completions(Cli::command(), a.shell);
            return ExitCode::SUCCESS;
        }
        Some(Command::Manpages(a)) => {
            return kiwi_service::cli::manpages_command(Cli::command(), &a.dir);
        }
        Some(Command::Serve(a)) => (a, Some(Task::Serve)),
        Some(Command::CheckConfig(a)) => (a, None),
        Some(Command::Migrate(a)) => (a, Some(Task::Migrate)),
        Some(Command::Replay(a)) => (a, Some(Task::Replay)),
        Some(Command::Prune(p)) => (p.store, Some(Task::Prune(p.before))),
        Some(Command::Token(t)) => match t.check() {
            Ok((a, task)) => (a, Some(Task::Token(task))),
            Err(e) => {
                eprintln!("kiwi-controller: {e}");
                return ExitCode::from(2);
            }
        },
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
    // The token commands talk to a person: only warnings go to the log.
    kiwi_service::logging::init(
        "kiwi-controller",
        if matches!(task, Task::Token(_)) {
            "warn"
        } else {
            "info"
        },
    );
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
                raise_nofile_limit(&config);
                let shutdown = CancellationToken::new();
                tokio::spawn(serve::cancel_on_signal(shutdown.clone()));
                kiwi_service::systemd::supervise(shutdown.clone());
                serve::serve(config, shutdown, |_| kiwi_service::systemd::ready())
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
            Task::Migrate => serve::open_store(&config).await.map(|_| {
                println!("migrations applied");
                ExitCode::SUCCESS
            }),
            Task::Replay => replay(&config).await,
            Task::Prune(before) => prune(&config, &before).await,
            Task::Token(task) => token(&config, task).await,
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

async fn token(config: &Config, task: TokenTask) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    let store = serve::open_store(config).await?;
    let auth = store.auth();
    match task {
        TokenTask::CreateApi { role, name, ttl } => {
            let (token, record) = tokens::create_api_token(auth.as_ref(), role, &name, ttl)
                .await
                .context("cannot store the token")?;
            println!("{token}");
            let expires = record.expires_at.map_or_else(
                || "never expires".to_string(),
                |t| {
                    format!(
                        "expires {}",
                        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    )
                },
            );
            eprintln!(
                "API token {} ({} role{}), {expires}. It is shown only now; send it as \
                 `Authorization: Bearer <token>`.",
                record.id,
                role.as_str(),
                if name.is_empty() {
                    String::new()
                } else {
                    format!(", {name:?}")
                },
            );
        }
        TokenTask::CreateEnrollment { ttl, uses, robot } => {
            let dir = config.state_dir.clone();
            let ca = tokio::task::spawn_blocking(move || {
                ControllerPki::load_or_create_ca_only(&dir, std::time::SystemTime::now())
            })
            .await
            .context("the CA task failed")?
            .context("cannot load or create the controller's CA")?;
            let (token, record) =
                tokens::create_enrollment_token(auth.as_ref(), ca.pin(), ttl, uses, robot)
                    .await
                    .context("cannot store the token")?;
            println!("{token}");
            let agent = config.agent_listen;
            let controller = if agent.ip().is_unspecified() {
                format!("<this controller's address>:{}", agent.port())
            } else {
                agent.to_string()
            };
            let whom = robot.map_or_else(
                || format!("{uses} robot(s)"),
                |r| format!("robot {r} only ({uses} use(s))"),
            );
            eprintln!(
                "Enrollment token {} for {whom}, expires {}. It pins CA {}. \
                 On the robot: kiwi-agent enroll --controller {controller} (the token on \
                 standard input or in KIWI_AGENT_ENROLL_TOKEN)",
                record.id,
                record
                    .expires_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                ca.pin(),
            );
        }
        TokenTask::List => {
            let now = Utc::now();
            let rows: Vec<[String; 8]> = auth
                .api_tokens()
                .await?
                .iter()
                .map(|t| {
                    [
                        "api".into(),
                        t.id.clone(),
                        t.role.as_str().into(),
                        t.name.clone(),
                        t.created_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                        t.expires_at.map_or_else(
                            || "never".into(),
                            |e| e.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                        ),
                        "-".into(),
                        api_token_status(t, now).into(),
                    ]
                })
                .chain(auth.enrollment_tokens().await?.iter().map(|t| {
                    [
                        "enrollment".into(),
                        t.id.clone(),
                        "-".into(),
                        t.robot_id
                            .map_or_else(String::new, |r| format!("robot {r}")),
                        t.created_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                        t.expires_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                        format!("{}/{}", t.uses_left, t.uses_total),
                        enrollment_token_status(t, now).into(),
                    ]
                }))
                .collect();
            print!(
                "{}",
                table(
                    [
                        "KIND",
                        "ID",
                        "ROLE",
                        "NAME",
                        "CREATED",
                        "EXPIRES",
                        "USES LEFT",
                        "STATUS"
                    ],
                    &rows,
                )
            );
        }
        TokenTask::Revoke(id) => {
            let now = Utc::now();
            if auth.revoke_api_token(&id, now).await? {
                println!("revoked API token {id}");
            } else if auth.revoke_enrollment_token(&id, now).await? {
                println!("revoked enrollment token {id}");
            } else {
                eprintln!("kiwi-controller: no token {id}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Rows under a header, in columns as wide as their widest cell.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (cell, w) in cells.zip(widths) {
            text.push_str(&format!("{cell:<w$}  "));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}
