//! Child processes of the binaries under test: found next to the test
//! executable, their output appended to a log file, signalled by pid, and
//! killed (SIGKILL) when their handle drops, also while a test panics.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::POLL_INTERVAL;

/// How many log lines a failing test prints per process.
const LOG_TAIL_LINES: usize = 60;

/// The path of one of the workspace's binaries (`kiwi-controller`,
/// `kiwi-agent`), found in the target profile directory that holds the
/// running test executable (`target/<profile>/deps/<test>` or, under
/// nextest, the same layout). `KIWI_TESTS_BIN_DIR` overrides the search.
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("KIWI_TESTS_BIN_DIR") {
        let path = Path::new(&dir).join(name);
        assert!(
            path.is_file(),
            "{} does not exist (KIWI_TESTS_BIN_DIR); build the binaries first: \
             cargo build --workspace --bins",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().expect("the path of the test executable");
    exe.ancestors()
        .skip(1)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no `{name}` binary next to {}; build the binaries first: \
                 cargo build --workspace --bins",
                exe.display()
            )
        })
}

/// How a test confines a program it starts, as an operator's shell or a
/// service manager might: its umask, its open-files limit (then without
/// the privilege to raise it, as a service without `CAP_SYS_RESOURCE`).
/// Applied by util-linux's `prlimit` and `setpriv` and `sh`, which each
/// exec the next, so the process is still the program's pid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Confinement {
    pub umask: Option<u32>,
    pub open_files: Option<u64>,
}

impl Confinement {
    /// A command that runs `program` confined so.
    pub fn command(&self, program: &Path) -> Command {
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(n) = self.open_files {
            argv.extend([
                "prlimit".into(),
                format!("--nofile={n}:{n}").into(),
                "--".into(),
                "setpriv".into(),
                "--bounding-set=-sys_resource".into(),
                "--".into(),
            ]);
        }
        if let Some(mask) = self.umask {
            argv.extend([
                "sh".into(),
                "-c".into(),
                format!("umask {mask:03o} && exec \"$0\" \"$@\"").into(),
            ]);
        }
        argv.push(program.into());
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        command
    }
}

/// A running child process. Dropping it kills the process with SIGKILL and
/// reaps it.
#[derive(Debug)]
pub(crate) struct Proc {
    name: String,
    child: Child,
    /// The exit status, once reaped.
    exited: Option<ExitStatus>,
}

/// Settings must come from the test alone: drops the caller's kiwi and
/// database variables from `command`, so that a developer's shell (or the
/// test script's own `DATABASE_URL`) cannot change what is tested or point
/// a test at a real database.
pub fn scrub_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("KIWI_") && !key.starts_with("KIWI_TESTS_")
            || key.starts_with("DB_")
            || key.starts_with("REDIS_")
            || key == "DATABASE_URL"
            || key == "DISCOVERY_NETWORK"
        {
            command.env_remove(key.as_ref());
        }
    }
}

impl Proc {
    /// Starts `command` with stdout and stderr appended to `log` (after a
    /// header line naming the start, so restarts stay apart in the file).
    pub(crate) fn spawn(name: &str, mut command: Command, log: &Path) -> Proc {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open log {}: {e}", log.display()));
        writeln!(file, "=== kiwi-tests: starting {name}: {command:?}")
            .expect("write the log header");
        let stderr = file.try_clone().expect("clone the log file handle");
        scrub_env(&mut command);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(stderr));
        let child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot start {name}: {e} (build the binaries first: cargo build --workspace --bins)")
        });
        Proc {
            name: name.to_string(),
            child,
            exited: None,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs (reaping it if it has exited).
    pub(crate) fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// The exit status, if the process has exited.
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process, unless it has
    /// already been reaped (its pid could then belong to someone else).
    pub(crate) fn signal(&mut self, signal: i32) {
        if self.exit_status().is_some() {
            return;
        }
        send_signal(self.pid(), signal);
    }

    /// Waits up to `timeout` for the process to exit.
    pub(crate) async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// SIGKILL, then reap: the process is gone when this returns.
    pub(crate) fn kill_and_reap(&mut self) {
        if self.exited.is_some() {
            return;
        }
        self.signal(libc::SIGKILL);
        if let Ok(status) = self.child.wait() {
            self.exited = Some(status);
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// Sends `signal` to every process of the process group `group` (a child
/// started with `process_group(0)`: its pid), e.g. a script and what it
/// started.
pub fn signal_group(group: u32, signal: i32) {
    let pid = libc::pid_t::try_from(group).expect("pids fit in pid_t");
    send_signal_raw(-pid, signal);
}

/// Sends a signal to a process we started.
fn send_signal(pid: u32, signal: i32) {
    let pid = libc::pid_t::try_from(pid).expect("pids fit in pid_t");
    send_signal_raw(pid, signal);
}

/// kill(2) of `pid` (negative: a process group).
#[allow(
    unsafe_code,
    reason = "kill(2) has no safe std wrapper for signals other than SIGKILL; \
              it only reads its two integer arguments"
)]
fn send_signal_raw(pid: libc::pid_t, signal: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    // The pid is that of a child we have not reaped yet (or the group it
    // leads), so it cannot have been reused by another process.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        // ESRCH: it exited between the check and the signal.
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ESRCH),
            "kill({pid}, {signal}) failed: {err}"
        );
    }
}

/// The last `n` lines of a log file (or why it cannot be read).
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Prints the tail of a process's log to stderr when the current thread is
/// panicking (a failing test), so the failure shows what the binary said.
pub(crate) fn report_log_on_panic(what: &str, log: &Path) {
    if std::thread::panicking() {
        eprintln!(
            "\n----- last {LOG_TAIL_LINES} lines of {what} ({}) -----\n{}\n----- end of {what} -----",
            log.display(),
            log_tail(log, LOG_TAIL_LINES)
        );
    }
}

/// Creates `path`'s parent directories and writes `contents` to it.
pub(crate) fn write_file(path: &Path, contents: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
    }
    let mut file =
        File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    file.write_all(contents.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
