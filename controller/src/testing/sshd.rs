//! A real OpenSSH server standing in for a robot without an agent: the
//! fixture of the SSH fallback's tests.
//!
//! [`SshdFixture::new`] prepares a directory (under the system's temporary
//! directory, removed on drop) holding:
//!
//! - `sshd_config`, with absolute paths only: `ListenAddress` the given
//!   address, `HostKey` a throwaway ed25519 key made by `ssh-keygen`,
//!   `AuthorizedKeysFile` a throwaway `authorized_keys` holding the given
//!   client key, key authentication only, `StrictModes no` (the files live
//!   in a temporary directory), `UsePAM no`, `PidFile none`;
//! - `run/kiwi-robot/`: the robot's identifying files laid out as a system
//!   root (the layout the agent's `--sys-root` reads): `proc/cpuinfo` (with
//!   `Serial` and `Model : Raspberry Pi 4 Model B Rev 1.4`),
//!   `proc/device-tree/serial-number`, `proc/device-tree/model`,
//!   `etc/machine-id`, `etc/hostname`, `etc/os-release`, `dev/ttyACM0`
//!   (an XLERobot also `dev/ttyACM1` and a RealSense camera under
//!   `sys/bus/usb/devices/2-1/`) as regular files;
//! - `run/sshd/`: the empty privilege-separation directory;
//! - `home/`: an empty directory to stand for the login user's home.
//!
//! [`SshdFixture::sshd_command`] is `sshd -D -e -f <dir>/sshd_config` (the
//! absolute path of `sshd`, which it needs to re-execute itself).
//!
//! **On loopback** ([`SshdFixture::on_loopback`] and [`SshdFixture::start`]):
//! sshd listens on `127.0.0.1:<free port>` in the test's own namespaces,
//! needs the host's `/run/sshd` (created when missing), and the robot's
//! files are at [`SshdFixture::robot_root`] (`<dir>/run/kiwi-robot`): the
//! controller's `sys_root` must be set to that path.
//!
//! **In a robot's network namespace** (the LAN harness): build the fixture
//! with the robot's address (`10.88.0.(i+1):22`) and start
//! [`SshdFixture::sshd_command`]'s program and arguments in a private mount
//! and UTS namespace of the robot's network namespace, with
//! [`SshdFixture::run_dir`] bind-mounted over `/run` (which provides
//! `/run/sshd` and puts the robot's files at [`NAMESPACE_ROBOT_ROOT`],
//! the `sys_root` the controller uses there), [`SshdFixture::home_dir`]
//! bind-mounted over the login user's home (the host's shell start-up files
//! made each login twice as slow), and the host name set to the spec's. For
//! example: `ip netns exec <ns> unshare --uts --mount sh -c 'hostname H &&
//! mount --bind <run_dir> /run && mount --bind <home_dir> /root && exec
//! /usr/sbin/sshd -D -e -f <config>'`. The configuration and keys live
//! outside `<dir>/run`, so they stay visible after the bind mounts. The
//! fingerprint to expect is [`SshdFixture::host_key_fingerprint`] and the
//! robot's serial and host name are in [`SshdFixture::spec`].

use anyhow::{Context, bail};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where the robot's files appear inside a robot namespace (with the
/// fixture's `run` directory bound over `/run`).
pub const NAMESPACE_ROBOT_ROOT: &str = "/run/kiwi-robot";

/// The board model every fixture robot has.
pub const MODEL: &str = "Raspberry Pi 4 Model B Rev 1.4";

/// How long [`SshdFixture::start`] waits for sshd to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The kinds of robot a fixture can stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RobotKind {
    /// One motor bus (`ttyACM0`).
    LeKiwi,
    /// Two arm buses (`ttyACM0`, `ttyACM1`) and a RealSense camera.
    Xlerobot,
}

/// What makes one fixture robot itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RobotSpec {
    pub kind: RobotKind,
    /// The Pi serial as `/proc/cpuinfo` shows it: 16 lower-case hex digits,
    /// no leading zero (so it is also the normalised serial).
    pub serial: String,
    pub hostname: String,
    /// 32 lower-case hex digits.
    pub machine_id: String,
}

impl RobotSpec {
    /// Robot number `n` of its kind: serial `10000000a<n:07x>` (LeKiwi) or
    /// `10000000b<n:07x>` (XLERobot), host name `lekiwi-<n>` or
    /// `xlerobot-<n>`.
    pub fn numbered(kind: RobotKind, n: u32) -> Self {
        let (tag, name) = match kind {
            RobotKind::LeKiwi => ('a', "lekiwi"),
            RobotKind::Xlerobot => ('b', "xlerobot"),
        };
        RobotSpec {
            kind,
            serial: format!("10000000{tag}{n:07x}"),
            hostname: format!("{name}-{n}"),
            machine_id: format!("6b697769{tag}{n:023x}"),
        }
    }
}

/// A directory under the system's temporary directory, removed on drop.
#[derive(Debug)]
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(prefix: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A throwaway ed25519 key pair `ssh-keygen` made, for the controller to
/// log in with.
#[derive(Debug)]
pub struct ClientKey {
    _dir: ScratchDir,
    /// The private key file (OpenSSH format, no passphrase).
    pub private_key: PathBuf,
    /// The public key line (`ssh-ed25519 AAAA... comment`), for
    /// `authorized_keys`.
    pub public_key: String,
}

impl ClientKey {
    pub fn generate() -> anyhow::Result<Self> {
        let dir = ScratchDir::new("kiwi-ssh-client")?;
        let private_key = dir.0.join("id_ed25519");
        keygen(&private_key, "kiwi-controller-test")?;
        let public_key = read_public_key(&private_key)?;
        Ok(ClientKey {
            _dir: dir,
            private_key,
            public_key,
        })
    }
}

/// One robot's sshd configuration, keys and files. See the module doc.
#[derive(Debug)]
pub struct SshdFixture {
    dir: ScratchDir,
    spec: RobotSpec,
    listen: SocketAddr,
    host_key_fingerprint: String,
}

impl SshdFixture {
    /// A fixture whose sshd will listen on `listen` and let in the holder
    /// of `authorized_key` (a public key line).
    pub fn new(spec: RobotSpec, listen: SocketAddr, authorized_key: &str) -> anyhow::Result<Self> {
        let dir = ScratchDir::new("kiwi-sshd")?;
        let mut fixture = SshdFixture {
            dir,
            spec,
            listen,
            host_key_fingerprint: String::new(),
        };
        fixture.write_robot_tree()?;
        std::fs::create_dir_all(fixture.run_dir().join("sshd"))?;
        std::fs::create_dir_all(fixture.home_dir())?;
        std::fs::write(
            fixture.authorized_keys(),
            format!("{}\n", authorized_key.trim()),
        )?;
        fixture.new_host_key()?;
        fixture.write_config()?;
        Ok(fixture)
    }

    /// A fixture on `127.0.0.1` and a port that was free a moment ago.
    pub fn on_loopback(spec: RobotSpec, authorized_key: &str) -> anyhow::Result<Self> {
        let port = free_loopback_port()?;
        Self::new(
            spec,
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            authorized_key,
        )
    }

    /// The fixture's directory.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    pub fn spec(&self) -> &RobotSpec {
        &self.spec
    }

    /// The address sshd listens on.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Makes sshd listen on `listen` instead (a robot whose address
    /// changed): rewrites the configuration; a running sshd keeps the old
    /// address until restarted.
    pub fn set_listen(&mut self, listen: SocketAddr) -> anyhow::Result<()> {
        self.listen = listen;
        self.write_config()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir().join("sshd_config")
    }

    pub fn host_key_path(&self) -> PathBuf {
        self.dir().join("ssh_host_ed25519_key")
    }

    /// `<dir>/run`: bound over `/run` in a robot namespace.
    pub fn run_dir(&self) -> PathBuf {
        self.dir().join("run")
    }

    /// `<dir>/home`: an empty directory to bind over the user's home.
    pub fn home_dir(&self) -> PathBuf {
        self.dir().join("home")
    }

    /// The robot's files seen from outside a robot namespace
    /// (`<dir>/run/kiwi-robot`): the `sys_root` of loopback tests.
    pub fn robot_root(&self) -> PathBuf {
        self.run_dir().join("kiwi-robot")
    }

    /// The host key's fingerprint as `ssh-keygen -l` prints it
    /// (`SHA256:<base64>`).
    pub fn host_key_fingerprint(&self) -> &str {
        &self.host_key_fingerprint
    }

    /// Replaces the host key with a new one (a re-flashed robot, or an
    /// impostor); a running sshd keeps the old one until restarted.
    /// Returns the new fingerprint.
    pub fn new_host_key(&mut self) -> anyhow::Result<String> {
        let key = self.host_key_path();
        for path in [key.clone(), key.with_extension("pub")] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        keygen(&key, &format!("{}-host", self.spec.hostname))?;
        self.host_key_fingerprint = fingerprint_of(&key.with_extension("pub"))?;
        Ok(self.host_key_fingerprint.clone())
    }

    /// `sshd -D -e -f <config>`: in the foreground, logging to standard
    /// error.
    pub fn sshd_command(&self) -> Command {
        let mut cmd = Command::new(sshd_program());
        cmd.arg("-D").arg("-e").arg("-f").arg(self.config_path());
        cmd
    }

    /// Starts sshd here (in the caller's network namespace; for loopback
    /// tests) and returns once it listens. Creates `/run/sshd` when
    /// missing. As root, sshd runs in a private mount namespace with
    /// [`SshdFixture::home_dir`] bound over the login user's home, so the
    /// host's shell start-up files neither slow down nor disturb a login.
    pub fn start(&self) -> anyhow::Result<RunningSshd> {
        std::fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
        let mut cmd = match user_home(&login_user()) {
            Some(home) if is_root() => {
                let mut cmd = Command::new("unshare");
                cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg("mount --bind \"$1\" \"$2\" && exec \"$3\" -D -e -f \"$4\"")
                    .arg("sh")
                    .arg(self.home_dir())
                    .arg(home)
                    .arg(sshd_program())
                    .arg(self.config_path());
                cmd
            }
            _ => self.sshd_command(),
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting sshd")?;
        let log = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().context("sshd's standard error")?;
        let log_writer = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("Server listening on") {
                    let _ = ready_tx.send(());
                }
                let mut log = log_writer.lock().unwrap_or_else(|e| e.into_inner());
                // Keep the log of a long test bounded.
                if log.len() < 1 << 20 {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let running = RunningSshd { child, log };
        if ready_rx.recv_timeout(START_TIMEOUT).is_err() {
            bail!(
                "sshd did not start listening on {} within {START_TIMEOUT:?}; its log:\n{}",
                self.listen,
                running.log()
            );
        }
        Ok(running)
    }

    fn authorized_keys(&self) -> PathBuf {
        self.dir().join("authorized_keys")
    }

    fn write_config(&self) -> anyhow::Result<()> {
        let mut config = format!(
            "ListenAddress {listen}\n\
             HostKey {host_key}\n\
             AuthorizedKeysFile {authorized_keys}\n\
             PidFile none\n\
             StrictModes no\n\
             UsePAM no\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             UseDNS no\n\
             PrintMotd no\n\
             PrintLastLog no\n\
             X11Forwarding no\n\
             AllowTcpForwarding no\n\
             LogLevel INFO\n",
            listen = self.listen,
            host_key = self.host_key_path().display(),
            authorized_keys = self.authorized_keys().display(),
        );
        // OpenSSH 9.8 and later penalise addresses whose connections fail,
        // which the tests do on purpose.
        if sshd_version().is_some_and(|v| v >= (9, 8)) {
            config.push_str("PerSourcePenalties no\n");
        }
        std::fs::write(self.config_path(), config)?;
        Ok(())
    }

    fn write_robot_tree(&self) -> anyhow::Result<()> {
        let s = &self.spec;
        let root = self.robot_root();
        let write = |rel: &str, content: &[u8]| -> anyhow::Result<()> {
            let path = root.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))
        };
        write(
            "proc/cpuinfo",
            format!(
                "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n\
                 CPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd08\n\n\
                 Hardware\t: BCM2835\nRevision\t: c03114\nSerial\t\t: {}\nModel\t\t: {MODEL}\n",
                s.serial
            )
            .as_bytes(),
        )?;
        write(
            "proc/device-tree/serial-number",
            format!("{}\0", s.serial).as_bytes(),
        )?;
        write("proc/device-tree/model", format!("{MODEL}\0").as_bytes())?;
        write("etc/machine-id", format!("{}\n", s.machine_id).as_bytes())?;
        write("etc/hostname", format!("{}\n", s.hostname).as_bytes())?;
        write(
            "etc/os-release",
            b"PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\n\
              VERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\nID=debian\n",
        )?;
        write("dev/ttyACM0", b"")?;
        if s.kind == RobotKind::Xlerobot {
            write("dev/ttyACM1", b"")?;
            write("sys/bus/usb/devices/2-1/idVendor", b"8086\n")?;
            write("sys/bus/usb/devices/2-1/idProduct", b"0b3a\n")?;
            write(
                "sys/bus/usb/devices/2-1/product",
                b"Intel(R) RealSense(TM) Depth Camera 435i\n",
            )?;
        }
        Ok(())
    }
}

/// A running sshd; killed (and reaped) on drop.
#[derive(Debug)]
pub struct RunningSshd {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl RunningSshd {
    /// What sshd wrote to standard error so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The process id of the listening sshd.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops sshd and waits for it to end.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RunningSshd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP port on 127.0.0.1 that was free when asked.
pub fn free_loopback_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// The user the tests log in as: the one running them.
pub fn login_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".to_string())
}

/// Whether this process runs as root (the owner of `/proc/self`).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The home directory of `user` from `/etc/passwd`, when it exists.
fn user_home(user: &str) -> Option<PathBuf> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[0] == user)
        .map(|f| PathBuf::from(f[5]))
        .filter(|h| h.is_absolute() && h.is_dir())
}

/// The absolute path of `sshd` (it must be started by one).
fn sshd_program() -> PathBuf {
    let default = PathBuf::from("/usr/sbin/sshd");
    if default.exists() {
        return default;
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("sshd"))
        .find(|p| p.is_absolute() && p.exists())
        .unwrap_or(default)
}

/// The installed OpenSSH's version, e.g. `(9, 2)`.
fn sshd_version() -> Option<(u32, u32)> {
    let out = Command::new(sshd_program()).arg("-V").output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    let rest = text.split("OpenSSH_").nth(1)?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn keygen(path: &Path, comment: &str) -> anyhow::Result<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("running ssh-keygen (apt-get install openssh-client)")?;
    if !out.status.success() {
        bail!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn read_public_key(private_key: &Path) -> anyhow::Result<String> {
    let path = private_key.with_extension("pub");
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_string())
}

/// `SHA256:<base64>` of a public key file, as `ssh-keygen -l` prints it.
fn fingerprint_of(public_key: &Path) -> anyhow::Result<String> {
    let out = Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(public_key)
        .output()
        .context("running ssh-keygen -l")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .filter(|f| f.starts_with("SHA256:"))
        .map(str::to_string)
        .with_context(|| format!("unexpected ssh-keygen -l output {text:?}"))
}
