//! The storage services of the storage tests, always real ones:
//!
//! - [`TestDatabase`] (from `kiwi_controller::testing`, shared with the
//!   controller's own tests): a database of the test's own on the
//!   PostgreSQL server at `DATABASE_URL` (else [`DEFAULT_DATABASE_URL`]) or
//!   on a [`PgCluster`], dropped when the guard drops, also on a panic.
//! - [`RedisKeys`]: a key prefix of the test's own (`kiwi_it_<uuid>:`) on the
//!   Redis at `REDIS_URL` (else [`DEFAULT_REDIS_URL`]) or on a
//!   [`RedisServer`]; every key under it is deleted when the guard drops.
//! - [`RedisServer`]: a throwaway `redis-server` on a free loopback port that
//!   a test may freeze, kill and start again on the same port.
//! - [`PgCluster`]: a throwaway PostgreSQL cluster (`initdb`, `pg_ctl`, in a
//!   temp dir, trust authentication) on a free loopback port that a test may
//!   stop and start again on the same port.
//!
//! A service that is not there fails the test with a message that says how
//! to start or install it.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use sqlx::Connection;
use tempfile::TempDir;
use uuid::Uuid;

pub use kiwi_controller::testing::{
    DEFAULT_DATABASE_URL, TestDatabase, database_server_url, pg_connect, with_database,
};

use crate::api::Api;
use crate::process::{self, Proc};
use crate::{POLL_INTERVAL, free_port, now_ms, wait_readyz_code, wait_until_every};

/// The Redis used when `REDIS_URL` is not set.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// How long connecting to a service may take before the test fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a throwaway server may take to start or stop.
const SERVER_TIMEOUT: Duration = Duration::from_secs(60);

const HOW_TO_START_REDIS: &str = "start one (e.g. `. scripts/services.sh`, or \
     `redis-server --daemonize yes --save '' --appendonly no`), or set REDIS_URL; the \
     binaries come with `apt-get install redis-server`";

/// The Redis of the tests: `REDIS_URL` or the default.
pub fn redis_server_url() -> String {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_REDIS_URL.to_string())
}

/// An async connection to the Redis at `url`, or an error.
pub async fn redis_connect(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    match tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => anyhow::bail!("no answer within {CONNECT_TIMEOUT:?}"),
    }
}

/// `PING` on a fresh connection.
async fn redis_ping(url: &str) -> anyhow::Result<()> {
    let mut conn = redis_connect(url).await?;
    let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
    anyhow::ensure!(pong == "PONG", "PING answered {pong:?}");
    Ok(())
}

/// A Redis key prefix of one test; every key under it is deleted when this
/// guard drops.
#[derive(Debug)]
pub struct RedisKeys {
    url: String,
    prefix: String,
}

impl RedisKeys {
    /// A prefix on the tests' Redis ([`redis_server_url`]).
    pub async fn create() -> RedisKeys {
        RedisKeys::create_on(&redis_server_url()).await
    }

    /// A prefix on the Redis at `url`.
    pub async fn create_on(url: &str) -> RedisKeys {
        if let Err(e) = redis_ping(url).await {
            panic!(
                "the storage tests need a real Redis, and none answers at {url} ({e:#}): \
                 {HOW_TO_START_REDIS}"
            );
        }
        RedisKeys {
            url: url.to_string(),
            prefix: format!("kiwi_it_{}:", Uuid::new_v4().simple()),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The prefix, ending in `:` (what the controller is given).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `prefix` + `suffix`.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// A new connection to this Redis.
    pub async fn connect(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        redis_connect(&self.url).await
    }
}

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let delete = || -> redis::RedisResult<()> {
            let client = redis::Client::open(self.url.as_str())?;
            let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
            conn.set_read_timeout(Some(Duration::from_secs(2)))?;
            conn.set_write_timeout(Some(Duration::from_secs(2)))?;
            let pattern = format!("{}*", self.prefix);
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query(&mut conn)?;
                if !keys.is_empty() {
                    redis::cmd("DEL").arg(&keys).query::<i64>(&mut conn)?;
                }
                if next == 0 {
                    return Ok(());
                }
                cursor = next;
            }
        };
        if let Err(e) = delete() {
            // A throwaway server may be gone already: nothing is left then.
            eprintln!(
                "kiwi-tests: could not delete the Redis keys {}* at {}: {e}",
                self.prefix, self.url
            );
        }
    }
}

/// The path of `program` on `PATH`.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// A throwaway `redis-server` (no persistence) on a loopback port of its
/// own, killed when this handle drops.
#[derive(Debug)]
pub struct RedisServer {
    binary: PathBuf,
    port: u16,
    proc: Option<Proc>,
    log: PathBuf,
    dir: TempDir,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    pub async fn start() -> RedisServer {
        let binary = find_on_path("redis-server").unwrap_or_else(|| {
            panic!(
                "no `redis-server` on PATH; install it with `apt-get install redis-server` \
                 (the storage tests start throwaway servers from it)"
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("kiwi-redis-")
            .tempdir()
            .expect("a temp dir for redis-server");
        let mut server = RedisServer {
            binary,
            port: free_port(),
            proc: None,
            log: dir.path().join("redis.log"),
            dir,
        };
        server.start_again().await;
        server
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// Starts the server (again, after [`kill`](Self::kill)) on the same
    /// port, empty, and waits until it answers `PING`.
    pub async fn start_again(&mut self) {
        assert!(self.proc.is_none(), "redis-server is already running");
        let mut command = Command::new(&self.binary);
        command
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(self.dir.path());
        self.proc = Some(Proc::spawn("redis-server", command, &self.log));
        let deadline = Instant::now() + SERVER_TIMEOUT;
        loop {
            let proc = self.proc.as_mut().expect("just spawned");
            if let Some(status) = proc.exit_status() {
                self.proc = None;
                panic!(
                    "redis-server on port {} exited at start ({status}); log tail:\n{}",
                    self.port,
                    process::log_tail(&self.log, 30)
                );
            }
            match redis_ping(&self.url()).await {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => panic!(
                    "redis-server on port {} does not answer PING within {SERVER_TIMEOUT:?} \
                     ({e:#}); log tail:\n{}",
                    self.port,
                    process::log_tail(&self.log, 30)
                ),
                Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// Kills the server with SIGKILL: connections break, data is gone.
    pub fn kill(&mut self) {
        let mut proc = self.proc.take().expect("redis-server is not running");
        proc.kill_and_reap();
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&mut self) {
        self.proc
            .as_mut()
            .expect("redis-server is not running")
            .signal(libc::SIGSTOP);
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&mut self) {
        self.proc
            .as_mut()
            .expect("redis-server is not running")
            .signal(libc::SIGCONT);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill_and_reap();
        }
        process::report_log_on_panic("redis-server log", &self.log);
    }
}

/// The newest installed PostgreSQL server binaries
/// (`/usr/lib/postgresql/<version>/bin`).
fn postgres_bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server binaries (initdb, pg_ctl) under {}/<version>/bin; install \
             them with `apt-get install postgresql` (the storage tests start throwaway \
             clusters from them)",
            root.display()
        )
    })
}

/// The output of a finished command, for failure messages.
fn describe(status: ExitStatus, output: &std::process::Output) -> String {
    format!(
        "{status}; stdout: {}; stderr: {}",
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    )
}

/// A throwaway PostgreSQL cluster in a temp dir: trust authentication, user
/// `postgres`, loopback only, on a port of its own that it keeps across
/// [`stop`](Self::stop) and [`start_again`](Self::start_again). Stopped
/// (`-m immediate`) and removed when this handle drops.
#[derive(Debug)]
pub struct PgCluster {
    bin: PathBuf,
    port: u16,
    /// `initdb` and the server refuse to run as root: then every command
    /// runs as the `postgres` user.
    as_postgres: bool,
    data: PathBuf,
    /// Socket directory and server log (owned by the server's user).
    run: PathBuf,
    running: bool,
    dir: TempDir,
}

impl PgCluster {
    /// Creates a cluster with `initdb` and starts it on a free port.
    pub async fn start() -> PgCluster {
        let bin = postgres_bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("kiwi-pg-")
            .tempdir()
            .expect("a temp dir for the PostgreSQL cluster");
        // The owner of a file we just made is who we run as.
        let as_postgres = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(dir.path())
                .expect("metadata of the temp dir")
                .uid()
                == 0
        };
        let data = dir.path().join("data");
        let run = dir.path().join("run");
        for d in [&data, &run] {
            std::fs::create_dir(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
        }
        if as_postgres {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("make the cluster's temp dir reachable for the postgres user");
            let output = tokio::process::Command::new("chown")
                .arg("postgres:")
                .arg(&data)
                .arg(&run)
                .output()
                .await
                .expect("run chown");
            assert!(
                output.status.success(),
                "chown postgres: {} {} failed ({}); running as root, the cluster needs the \
                 `postgres` user (it comes with `apt-get install postgresql`)",
                data.display(),
                run.display(),
                describe(output.status, &output)
            );
        }
        let mut cluster = PgCluster {
            bin,
            port: free_port(),
            as_postgres,
            data,
            run,
            running: false,
            dir,
        };
        let initdb = cluster
            .command("initdb")
            .arg("-D")
            .arg(&cluster.data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
            .output()
            .await
            .expect("run initdb");
        assert!(
            initdb.status.success(),
            "initdb -D {} failed: {}",
            cluster.data.display(),
            describe(initdb.status, &initdb)
        );
        cluster.start_again().await;
        cluster
    }

    /// A command running `program` of the server binaries, as the `postgres`
    /// user when we are root.
    fn command(&self, program: &str) -> tokio::process::Command {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut c = tokio::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            tokio::process::Command::new(path)
        };
        // A working directory the postgres user may enter; no stray PG*
        // variables of the caller.
        command.current_dir(self.dir.path()).kill_on_drop(true);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                command.env_remove(&key);
            }
        }
        command
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn server_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server log.
    pub fn log_path(&self) -> PathBuf {
        self.run.join("postgres.log")
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Starts the server (again) on the same port and waits until it
    /// accepts connections.
    pub async fn start_again(&mut self) {
        assert!(!self.running, "the PostgreSQL cluster is already running");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.run.display()
        );
        let output = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.log_path())
            .arg("-w")
            .arg("-t")
            .arg(SERVER_TIMEOUT.as_secs().to_string())
            .arg("-o")
            .arg(options)
            .arg("start")
            .output()
            .await
            .expect("run pg_ctl start");
        assert!(
            output.status.success(),
            "pg_ctl start (port {}) failed: {}; server log tail:\n{}",
            self.port,
            describe(output.status, &output),
            process::log_tail(&self.log_path(), 30)
        );
        self.running = true;
        let deadline = Instant::now() + SERVER_TIMEOUT;
        loop {
            match pg_connect(&self.server_url()).await {
                Ok(conn) => {
                    let _ = conn.close().await;
                    return;
                }
                Err(e) if Instant::now() >= deadline => panic!(
                    "the PostgreSQL cluster on port {} does not accept connections within \
                     {SERVER_TIMEOUT:?} ({e:#}); server log tail:\n{}",
                    self.port,
                    process::log_tail(&self.log_path(), 30)
                ),
                Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// Stops the server with `pg_ctl stop -m fast` (sessions are ended,
    /// committed data is kept) and waits until it is down.
    pub async fn stop(&mut self) {
        assert!(self.running, "the PostgreSQL cluster is not running");
        let output = self.pg_ctl_stop("fast").await.expect("run pg_ctl stop");
        assert!(
            output.status.success(),
            "pg_ctl stop -m fast (port {}) failed: {}; server log tail:\n{}",
            self.port,
            describe(output.status, &output),
            process::log_tail(&self.log_path(), 30)
        );
        self.running = false;
    }

    /// An outage as the controller behind `api` sees it: stops the
    /// server, waits (up to 15 s) until `GET /readyz` answers 503, keeps it
    /// down until `over(down_at)` holds (polled every `every`, up to 60 s;
    /// `down_at` is when the outage began, Unix ms), starts it again and
    /// waits (up to 30 s) until `/readyz` answers 200. Returns when it went
    /// down and when it was started again (Unix ms).
    pub async fn outage_until<F, Fut>(
        &mut self,
        api: &Api,
        every: Duration,
        mut over: F,
    ) -> (i64, i64)
    where
        F: FnMut(i64) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let down_at = now_ms();
        self.stop().await;
        wait_readyz_code(
            api,
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(15),
        )
        .await;
        wait_until_every(Duration::from_secs(60), every, || over(down_at)).await;
        let up_at = now_ms();
        self.start_again().await;
        wait_readyz_code(api, StatusCode::OK, Duration::from_secs(30)).await;
        (down_at, up_at)
    }

    async fn pg_ctl_stop(&self, mode: &str) -> std::io::Result<std::process::Output> {
        self.command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "-t"])
            .arg(SERVER_TIMEOUT.as_secs().to_string())
            .arg("stop")
            .output()
            .await
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        process::report_log_on_panic("PostgreSQL log", &self.log_path());
        if !self.running {
            return;
        }
        // No async here: the same command, blocking.
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"));
            c
        } else {
            Command::new(self.bin.join("pg_ctl"))
        };
        let stopped = command
            .current_dir(self.dir.path())
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .output();
        if !stopped.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!(
                "kiwi-tests: could not stop the PostgreSQL cluster in {}: {stopped:?}",
                self.data.display()
            );
        }
    }
}

/// How a `kiwi-controller` command (not `serve`) ended: its exit status and
/// what it wrote (stdout and stderr).
#[derive(Debug)]
pub struct CommandOutcome {
    pub status: ExitStatus,
    pub output: String,
}

/// Runs `kiwi-controller <args…>` with `env` (and none of the caller's
/// kiwi, database or Redis variables) and waits up to `timeout` for it to
/// exit; a command still running then is killed and fails the test.
pub async fn run_controller_command(
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> CommandOutcome {
    let dir = tempfile::Builder::new()
        .prefix("kiwi-controller-cmd-")
        .tempdir()
        .expect("a temp dir for the command");
    let log = dir.path().join("command.log");
    let mut command = Command::new(process::binary("kiwi-controller"));
    command.args(args);
    command.envs(env.iter().copied());
    let mut proc = Proc::spawn("kiwi-controller", command, &log);
    let status = proc.wait_exit(timeout).await;
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!("kiwi-controller {args:?} did not exit within {timeout:?}; output:\n{output}")
    });
    CommandOutcome { status, output }
}
