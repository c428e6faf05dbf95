//! The SSH fallback: identify a host that runs no agent by logging in with
//! the configured key and reading the same clues the agent reads.
//!
//! One visit ([`SshProbe::identify`]) is: a TCP connection, an SSH handshake
//! (curve25519-sha256 key exchange and ed25519 host keys preferred: they
//! are the fastest), a check of the server's host key against the
//! [`KnownHosts`] store, public-key authentication as the configured user,
//! and ONE fixed, read-only shell script ([`clue_script`]) fed to `/bin/sh -s`
//! on standard input. The script prints delimited sections: the bytes of each
//! clue file (hex, via `od`) and the entry names of each clue directory,
//! under the configured `sys_root`. Nothing from the network or from users is
//! ever put into the script; the one configured part, `sys_root`, is
//! validated ([`validate_sys_root`]) as an absolute path of plain characters.
//! The output is parsed defensively ([`parse_clue_output`]): it is capped
//! ([`MAX_OUTPUT`]), and a missing header or trailer or a malformed line is a
//! clear error, never a panic. The clues are interpreted by
//! [`kiwi_protocol::identity::identify_host`], the same function the agent's
//! probe uses, so a robot gets the same id and type whichever way it was
//! found.
//!
//! **Host keys are pinned.** The first visit to an address records the
//! host's key; every later visit must present the same key, or the visit
//! ends right after the key exchange with [`SshError::HostKeyChanged`]:
//! the host is flagged and never identified (and nothing is sent to it, not
//! even the authentication). An operator who knows the change is legitimate
//! (a re-flashed robot) clears the entry with [`SshProbe::forget_host_key`]
//! (or by deleting its line while the controller is stopped); the next visit
//! records the new key.
//!
//! The store is a small file in the controller's state directory (one line
//! per address: `address key-type base64-key`, rewritten atomically), not a
//! table of the shared database, on purpose: trust in a host key is the trust
//! of one controller, which reached the host over its own network path. A
//! second controller on another segment, or one whose path is intercepted,
//! must not inherit (or overwrite) another controller's pins, and a key
//! recorded by a compromised controller must not become every controller's
//! truth. It is also readable and editable with ordinary tools, like
//! OpenSSH's `known_hosts`.
//!
//! **A circuit breaker per address** ([`crate::domain::breaker`]) keeps a
//! broken host from being hammered: after repeated failures (no connection,
//! timeouts, protocol errors, refused logins, bad output) the probe refuses
//! to visit the address at once with [`SshError::BreakerOpen`] until the open
//! timeout has passed. A changed host key is a definitive answer, not a
//! failure of the host, and does not count (so the flag stays visible in
//! every round).

use crate::domain::breaker::{Breaker, BreakerSettings, BreakerState};
use crate::domain::event::IdentityFacts;
use crate::fleet::storable;
use kiwi_protocol::identity::{
    HardwareId, HostClues, HostIdentification, MAX_USB_DEVICES, RobotId, USB_DEVICE_FILES,
    clue_paths, identify_host,
};
use russh::client;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The most output the identification script may produce; more is an error
/// (a real robot's clues are a few KiB).
pub const MAX_OUTPUT: usize = 2 << 20;

/// The most bytes read of one clue file (real ones are far smaller).
pub const MAX_CLUE_FILE: usize = 128 << 10;

/// The most names listed of one clue directory.
pub const MAX_DIR_ENTRIES: usize = 4096;

/// The most standard-error output kept for an error message.
const MAX_STDERR: usize = 4 << 10;

/// The first and last line of the script's output, and the marker of its
/// section lines.
const HEADER: &str = "@kiwi clues 1";
const TRAILER: &str = "@kiwi end";
const MARK: &str = "@kiwi ";

/// The file of the known-hosts store in the controller's state directory.
pub const KNOWN_HOSTS_FILE: &str = "ssh_known_hosts";

/// How the controller logs in to hosts without an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshSettings {
    /// The user to log in as.
    pub user: String,
    /// The port tried on every address.
    pub port: u16,
    /// The private key (OpenSSH format, unencrypted; ed25519 or ECDSA).
    pub private_key: PathBuf,
    /// Where the host's clue files are: `/` on a real robot, a prepared
    /// tree in tests. Valid when [`validate_sys_root`] accepts it.
    pub sys_root: PathBuf,
    /// The limit of TCP connect, handshake, host-key check and login.
    pub connect_timeout: Duration,
    /// The limit of running the identification script and reading its
    /// output.
    pub command_timeout: Duration,
    /// The known-hosts file (e.g. `<state_dir>/ssh_known_hosts`).
    pub known_hosts: PathBuf,
    /// The breaker kept per address.
    pub breaker: BreakerSettings,
}

impl SshSettings {
    /// Settings with the defaults: user `root`, port 22, sys_root `/`, 5 s to
    /// log in, 10 s for the script, the original design's breaker.
    pub fn new(private_key: impl Into<PathBuf>, known_hosts: impl Into<PathBuf>) -> Self {
        SshSettings {
            user: "root".into(),
            port: 22,
            private_key: private_key.into(),
            sys_root: PathBuf::from("/"),
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(10),
            known_hosts: known_hosts.into(),
            breaker: BreakerSettings::default(),
        }
    }
}

/// Why a host could not be identified over SSH.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The host presented another key than the one recorded for its
    /// address: flagged, not trusted, not identified.
    #[error(
        "SSH host key of {address} changed: recorded {expected_fingerprint}, presented \
         {found_fingerprint}; the host is not trusted (clear its known-hosts entry if the \
         change is intended)"
    )]
    HostKeyChanged {
        address: SocketAddr,
        expected_fingerprint: String,
        found_fingerprint: String,
    },
    /// The address's breaker is open: not visited.
    #[error(
        "circuit breaker of {address} is open after repeated failures; next try in {retry_in:?}"
    )]
    BreakerOpen {
        address: SocketAddr,
        retry_in: Duration,
    },
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: SocketAddr,
        source: io::Error,
    },
    #[error("{address}: no answer within {timeout:?} while {stage}")]
    Timeout {
        address: SocketAddr,
        stage: &'static str,
        timeout: Duration,
    },
    #[error("{address}: SSH failed while {stage}: {message}")]
    Protocol {
        address: SocketAddr,
        stage: &'static str,
        message: String,
    },
    #[error("{address}: the configured key was refused for user {user:?}")]
    AuthRejected { address: SocketAddr, user: String },
    #[error("{address}: the identification script failed: {detail}")]
    Command { address: SocketAddr, detail: String },
    #[error("{address}: unusable identification output: {source}")]
    Output {
        address: SocketAddr,
        source: OutputError,
    },
    /// The host answered but has no Pi serial and no valid machine id, so
    /// no stable robot id can be derived.
    #[error("{address}: no hardware identity (no Pi serial, no valid machine id)")]
    NoHardwareId { address: SocketAddr },
    #[error("SSH private key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("SSH known hosts {path}: {message}")]
    KnownHosts { path: PathBuf, message: String },
    #[error("ssh sys_root {0:?} must be an absolute path of letters, digits and . _ - + / only")]
    InvalidSysRoot(PathBuf),
}

impl SshError {
    /// Whether this error says the host is broken or unreachable (and so
    /// counts against its breaker). A changed host key, a host without
    /// hardware identity and the controller's own configuration do not.
    pub fn counts_against_host(&self) -> bool {
        matches!(
            self,
            SshError::Connect { .. }
                | SshError::Timeout { .. }
                | SshError::Protocol { .. }
                | SshError::AuthRejected { .. }
                | SshError::Command { .. }
                | SshError::Output { .. }
        )
    }
}

/// What is wrong with the identification script's output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputError {
    #[error("more than {MAX_OUTPUT} bytes")]
    TooLarge,
    #[error("not the identification script's output (no header line)")]
    NoHeader,
    #[error("output ends early (no trailer line)")]
    Truncated,
    #[error("line {line}: {problem}")]
    Malformed { line: usize, problem: String },
}

/// A host identified over SSH.
#[derive(Debug, Clone, PartialEq)]
pub struct SshIdentification {
    pub address: SocketAddr,
    pub robot_id: RobotId,
    pub hardware_id: HardwareId,
    /// Everything the clues said (type with its reason, hostname, model,
    /// OS), decided by the rules the agent uses.
    pub found: HostIdentification,
    /// The host key's fingerprint as `ssh-keygen -l` shows it
    /// (`SHA256:<base64>`).
    pub host_key_fingerprint: String,
    /// Whether this visit recorded the host key (first visit).
    pub host_key_recorded: bool,
}

impl SshIdentification {
    /// The identity facts a discovery round records for this host. The
    /// host name falls back to the address when the host has none.
    pub fn facts(&self) -> IdentityFacts {
        let text = |t: &Option<String>| t.as_deref().map(storable);
        IdentityFacts {
            hostname: self
                .found
                .hostname
                .as_deref()
                .map_or_else(|| self.address.ip().to_string(), storable),
            ip_address: Some(self.address.ip().to_string()),
            robot_type: self.found.type_decision.robot_type.as_str().to_string(),
            model: text(&self.found.model),
            firmware_version: text(&self.found.os_version),
            agent_version: None,
            hardware_id: storable(&self.hardware_id.canonical()),
            mac_addresses: Vec::new(),
        }
    }
}

/// Checks that `sys_root` may be put into the script: absolute, at most 256
/// bytes, only ASCII letters, digits and `. _ - + /` (so no quote, space,
/// `$`, backslash or other shell syntax can occur).
pub fn validate_sys_root(sys_root: &Path) -> Result<String, SshError> {
    let bad = || SshError::InvalidSysRoot(sys_root.to_path_buf());
    let s = sys_root.to_str().ok_or_else(bad)?;
    let plain = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-+/".contains(&b));
    if !s.starts_with('/') || s.len() > 256 || !plain {
        return Err(bad());
    }
    Ok(s.trim_end_matches('/').to_string())
}

/// The one identification script, for a validated `sys_root`. It only
/// reads: `od` of the clue files, `ls` of the clue directories, and the
/// three files of each USB device (at most [`MAX_USB_DEVICES`]). The paths
/// are [`kiwi_protocol::identity::clue_paths`], the ones the agent reads.
pub fn clue_script(sys_root: &Path) -> Result<String, SshError> {
    let root = validate_sys_root(sys_root)?;
    let mut s = String::new();
    // `write!` to a String cannot fail.
    let _ = write!(
        s,
        "R='{root}'\n\
         LC_ALL=C; export LC_ALL\n\
         f() {{ if [ -f \"$R/$1\" ] && [ -r \"$R/$1\" ]; then printf '{MARK}F %s\\n' \"$1\"; \
         od -An -v -tx1 -N {MAX_CLUE_FILE} \"$R/$1\" 2>/dev/null; printf '{MARK}.\\n'; fi; }}\n\
         d() {{ if [ -d \"$R/$1\" ]; then printf '{MARK}D %s\\n' \"$1\"; \
         ls -1q \"$R/$1\" 2>/dev/null | head -n {MAX_DIR_ENTRIES}; printf '{MARK}.\\n'; fi; }}\n\
         printf '{HEADER}\\n'\n"
    );
    let mut files = vec![clue_paths::CPUINFO];
    files.extend(clue_paths::DEVICE_TREE_SERIALS);
    files.extend([
        clue_paths::DEVICE_TREE_MODEL,
        clue_paths::MACHINE_ID,
        clue_paths::HOSTNAME,
        clue_paths::KERNEL_HOSTNAME,
        clue_paths::OS_RELEASE,
        clue_paths::DECLARED_TYPE,
    ]);
    for f in files {
        let _ = writeln!(s, "f {f}");
    }
    for d in [
        clue_paths::DEV,
        clue_paths::V4L_BY_ID,
        clue_paths::USB_DEVICES,
    ] {
        let _ = writeln!(s, "d {d}");
    }
    let usb = clue_paths::USB_DEVICES;
    let _ = write!(
        s,
        "n=0\n\
         for p in \"$R\"/{usb}/*; do\n\
         u=${{p##*/}}\n\
         case $u in *:*) continue ;; esac\n\
         [ -f \"$p/idVendor\" ] || continue\n\
         n=$((n+1)); [ $n -le {MAX_USB_DEVICES} ] || break\n"
    );
    for file in USB_DEVICE_FILES {
        let _ = writeln!(s, "f \"{usb}/$u/{file}\"");
    }
    let _ = write!(s, "done\nprintf '{TRAILER}\\n'\n");
    Ok(s)
}

/// The clue files (path → bytes) and directories (path → names) of the
/// script's output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClueOutput {
    pub files: BTreeMap<String, Vec<u8>>,
    pub dirs: BTreeMap<String, Vec<String>>,
}

impl ClueOutput {
    /// The clues, gathered by the same function as the agent's.
    pub fn host_clues(&self) -> HostClues {
        HostClues::gather(
            |p| self.files.get(p).cloned(),
            |d| self.dirs.get(d).cloned().unwrap_or_default(),
        )
    }
}

/// Parses the script's output. Never panics; anything but the script's
/// format is an error.
pub fn parse_clue_output(output: &[u8]) -> Result<ClueOutput, OutputError> {
    enum Section {
        None,
        File(String, Vec<u8>),
        Dir(String, Vec<String>),
    }
    if output.len() > MAX_OUTPUT {
        return Err(OutputError::TooLarge);
    }
    let mut out = ClueOutput::default();
    let mut lines = output.split(|&b| b == b'\n').enumerate();
    // Whatever a login shell printed before the script ran (a noisy
    // start-up file) is skipped.
    if !lines.any(|(_, line)| line == HEADER.as_bytes()) {
        return Err(OutputError::NoHeader);
    }
    let mut section = Section::None;
    for (i, raw) in lines {
        let line = i + 1;
        let malformed = |problem: &str| OutputError::Malformed {
            line,
            problem: problem.to_string(),
        };
        let control = raw.strip_prefix(MARK.as_bytes());
        match (&mut section, control) {
            (Section::None, Some(rest)) if rest == &TRAILER.as_bytes()[MARK.len()..] => {
                return Ok(out);
            }
            (Section::None, Some(rest)) => {
                let rest = std::str::from_utf8(rest).map_err(|_| malformed("not UTF-8"))?;
                let (kind, path) = rest
                    .split_once(' ')
                    .ok_or_else(|| malformed("a section line without a path"))?;
                if path.is_empty() || path.len() > 512 {
                    return Err(malformed("a bad section path"));
                }
                section = match kind {
                    "F" => Section::File(path.to_string(), Vec::new()),
                    "D" => Section::Dir(path.to_string(), Vec::new()),
                    _ => return Err(malformed("an unknown section kind")),
                };
            }
            (Section::None, None) if raw.is_empty() => {}
            (Section::None, None) => {
                return Err(malformed("text outside a section"));
            }
            (_, Some(b".")) => match std::mem::replace(&mut section, Section::None) {
                Section::File(path, bytes) => {
                    out.files.insert(path, bytes);
                }
                Section::Dir(path, names) => {
                    out.dirs.insert(path, names);
                }
                Section::None => {}
            },
            (_, Some(_)) => return Err(malformed("a section line inside a section")),
            (Section::File(_, bytes), None) => {
                for word in raw.split(|b| b.is_ascii_whitespace()) {
                    match word {
                        [] => {}
                        [hi, lo] => {
                            let digit = |c: u8| (c as char).to_digit(16);
                            let (Some(h), Some(l)) = (digit(*hi), digit(*lo)) else {
                                return Err(malformed("not a hex byte"));
                            };
                            // Two hex digits are at most 0xff.
                            bytes.push(u8::try_from(h * 16 + l).unwrap_or(u8::MAX));
                        }
                        _ => return Err(malformed("not a hex byte")),
                    }
                }
                if bytes.len() > MAX_CLUE_FILE {
                    return Err(malformed("a clue file beyond its size cap"));
                }
            }
            (Section::Dir(_, names), None) => {
                if names.len() >= MAX_DIR_ENTRIES {
                    return Err(malformed("too many directory entries"));
                }
                if !raw.is_empty() {
                    names.push(String::from_utf8_lossy(raw).into_owned());
                }
            }
        }
    }
    Err(OutputError::Truncated)
}

/// The fingerprint of a public key as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The persisted host keys, one per address. See the module doc for why a
/// file of this controller's.
#[derive(Debug)]
pub struct KnownHosts {
    path: PathBuf,
    entries: Mutex<BTreeMap<SocketAddr, PublicKey>>,
}

impl KnownHosts {
    /// The store at `path` (a missing file is an empty store). A malformed
    /// line is an error, not skipped: skipping it would silently trust
    /// whatever key the host presents next.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, SshError> {
        let path = path.into();
        let error = |message: String| SshError::KnownHosts {
            path: path.clone(),
            message,
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(error(e.to_string())),
        };
        let mut entries = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |what: &str| error(format!("line {}: {what}", i + 1));
            let mut words = line.split_whitespace();
            let (Some(addr), Some(kind), Some(b64), None) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                return Err(bad("expected `address key-type base64-key`"));
            };
            let addr: SocketAddr = addr.parse().map_err(|_| bad("bad address"))?;
            let key = PublicKey::from_openssh(&format!("{kind} {b64}"))
                .map_err(|e| bad(&format!("bad key: {e}")))?;
            if key.algorithm().as_str() != kind {
                return Err(bad("key type does not match the key"));
            }
            entries.insert(addr, key);
        }
        Ok(KnownHosts {
            path,
            entries: Mutex::new(entries),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key recorded for `address`.
    pub fn get(&self, address: SocketAddr) -> Option<PublicKey> {
        self.lock().get(&address).cloned()
    }

    /// Every address with the fingerprint of its key.
    pub fn fingerprints(&self) -> Vec<(SocketAddr, String)> {
        self.lock()
            .iter()
            .map(|(a, k)| (*a, fingerprint(k)))
            .collect()
    }

    /// Records `key` for `address` and rewrites the file atomically.
    pub fn record(&self, address: SocketAddr, key: PublicKey) -> Result<(), SshError> {
        let mut entries = self.lock();
        let previous = entries.insert(address, key);
        self.persist(&entries).inspect_err(|_| {
            // Memory and file stay the same when the file cannot be written.
            match &previous {
                Some(k) => entries.insert(address, k.clone()),
                None => entries.remove(&address),
            };
        })
    }

    /// Forgets the key of `address` (the operator's way to accept a changed
    /// key); true when there was one.
    pub fn forget(&self, address: SocketAddr) -> Result<bool, SshError> {
        let mut entries = self.lock();
        let Some(previous) = entries.remove(&address) else {
            return Ok(false);
        };
        self.persist(&entries).inspect_err(|_| {
            entries.insert(address, previous.clone());
        })?;
        Ok(true)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SocketAddr, PublicKey>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn persist(&self, entries: &BTreeMap<SocketAddr, PublicKey>) -> Result<(), SshError> {
        let error = |message: String| SshError::KnownHosts {
            path: self.path.clone(),
            message,
        };
        let mut text = String::from(
            "# Host keys pinned by kiwi-controller's SSH fallback: address key-type base64-key.\n\
             # Delete a line to accept a host's new key on its next visit.\n",
        );
        for (addr, key) in entries {
            let openssh = key.to_openssh().map_err(|e| error(e.to_string()))?;
            // `to_openssh` gives `type base64 [comment]`; the comment is not
            // part of the pin.
            let mut words = openssh.split_whitespace();
            let (Some(kind), Some(b64)) = (words.next(), words.next()) else {
                return Err(error("unexpected key encoding".into()));
            };
            let _ = writeln!(text, "{addr} {kind} {b64}");
        }
        write_atomic(&self.path, text.as_bytes()).map_err(|e| error(e.to_string()))
    }
}

/// Writes `path` by writing a temporary file beside it, syncing it and
/// renaming it over `path`, so a crash leaves the old or the new file.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().map_or_else(
        || "known_hosts".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The SSH fallback: logs in to hosts and identifies them, pinning host
/// keys and keeping a breaker per address. Cheap to share behind an `Arc`;
/// visits to different addresses run in parallel.
#[derive(Debug)]
pub struct SshProbe {
    settings: SshSettings,
    config: Arc<client::Config>,
    key: Arc<PrivateKey>,
    script: String,
    known_hosts: Arc<KnownHosts>,
    breakers: Mutex<HashMap<SocketAddr, Breaker<Instant>>>,
}

impl SshProbe {
    /// Loads the key and the known hosts and checks `sys_root`.
    pub fn new(settings: SshSettings) -> Result<Self, SshError> {
        let script = clue_script(&settings.sys_root)?;
        let key = russh::keys::load_secret_key(&settings.private_key, None).map_err(|e| {
            SshError::Key {
                path: settings.private_key.clone(),
                message: e.to_string(),
            }
        })?;
        let known_hosts = Arc::new(KnownHosts::open(&settings.known_hosts)?);
        // curve25519 first: with it, OpenSSH's client took 0.14-0.16 s for
        // a key login and one command on these machines, 0.21-0.25 s with
        // its default order. ed25519 host keys are russh's first choice
        // already.
        let preferred = russh::Preferred {
            kex: Cow::Owned(vec![
                russh::kex::CURVE25519,
                russh::kex::CURVE25519_PRE_RFC_8731,
                russh::kex::MLKEM768X25519_SHA256,
                russh::kex::DH_G14_SHA256,
                russh::kex::EXTENSION_SUPPORT_AS_CLIENT,
                russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
            ]),
            ..Default::default()
        };
        let config = client::Config {
            preferred,
            // A session the probe forgot about still ends.
            inactivity_timeout: Some(settings.connect_timeout + settings.command_timeout),
            nodelay: true,
            ..Default::default()
        };
        Ok(SshProbe {
            config: Arc::new(config),
            key: Arc::new(key),
            script,
            known_hosts,
            breakers: Mutex::new(HashMap::new()),
            settings,
        })
    }

    pub fn settings(&self) -> &SshSettings {
        &self.settings
    }

    pub fn known_hosts(&self) -> &KnownHosts {
        &self.known_hosts
    }

    /// Forgets the recorded host key of `address` (an operator accepting a
    /// changed key); true when there was one.
    pub fn forget_host_key(&self, address: SocketAddr) -> Result<bool, SshError> {
        self.known_hosts.forget(address)
    }

    /// The breaker of `address`, if it has seen a failure.
    pub fn breaker_state(&self, address: SocketAddr) -> Option<BreakerState<Instant>> {
        self.breakers().get(&address).map(Breaker::state)
    }

    /// An operator's reset of the breaker of `address`.
    pub fn reset_breaker(&self, address: SocketAddr) {
        self.breakers().remove(&address);
    }

    /// Identifies the host at `ip` on the configured port.
    pub async fn identify(&self, ip: IpAddr) -> Result<SshIdentification, SshError> {
        self.identify_at(SocketAddr::new(ip, self.settings.port))
            .await
    }

    /// Identifies the host at `address`, unless its breaker is open.
    pub async fn identify_at(&self, address: SocketAddr) -> Result<SshIdentification, SshError> {
        {
            let now = Instant::now();
            let mut breakers = self.breakers();
            if let Some(b) = breakers.get_mut(&address)
                && let Err(refused) = b.allow(now)
            {
                return Err(SshError::BreakerOpen {
                    address,
                    retry_in: refused.retry_at.saturating_duration_since(now),
                });
            }
        }
        let result = self.visit(address).await;
        let now = Instant::now();
        let mut breakers = self.breakers();
        match &result {
            Err(e) if e.counts_against_host() => breakers
                .entry(address)
                .or_insert_with(|| Breaker::new(self.settings.breaker))
                .record_failure(now),
            Err(SshError::HostKeyChanged { .. }) => {}
            _ => {
                if let Some(b) = breakers.get_mut(&address) {
                    b.record_success(now);
                    // A closed breaker without failures is the default:
                    // forget it, so the map only holds troubled addresses.
                    if b.state() == (BreakerState::Closed { failures: 0 }) {
                        breakers.remove(&address);
                    }
                }
            }
        }
        result
    }

    fn breakers(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Breaker<Instant>>> {
        self.breakers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One visit: log in, run the script, identify.
    async fn visit(&self, address: SocketAddr) -> Result<SshIdentification, SshError> {
        let s = &self.settings;
        let pinned = self.known_hosts.get(address);
        let seen = Arc::new(Mutex::new(None));
        let handler = Pinning {
            pinned: pinned.clone(),
            seen: seen.clone(),
        };
        let login = async {
            let tcp = tokio::net::TcpStream::connect(address)
                .await
                .map_err(|source| SshError::Connect { address, source })?;
            let _ = tcp.set_nodelay(true);
            let mut session = client::connect_stream(self.config.clone(), tcp, handler)
                .await
                .map_err(|e| match e {
                    PinError::Changed { expected, found } => SshError::HostKeyChanged {
                        address,
                        expected_fingerprint: expected,
                        found_fingerprint: found,
                    },
                    PinError::Ssh(e) => protocol(address, "handshaking", e),
                })?;
            let auth = session
                .authenticate_publickey(
                    s.user.clone(),
                    PrivateKeyWithHashAlg::new(self.key.clone(), None),
                )
                .await
                .map_err(|e| protocol(address, "authenticating", e))?;
            if !auth.success() {
                return Err(SshError::AuthRejected {
                    address,
                    user: s.user.clone(),
                });
            }
            Ok(session)
        };
        let started = Instant::now();
        let session = tokio::time::timeout(s.connect_timeout, login)
            .await
            .map_err(|_| SshError::Timeout {
                address,
                stage: "logging in",
                timeout: s.connect_timeout,
            })??;
        let logged_in = Instant::now();
        // The key was checked in the handshake: the one presented is the
        // pinned one, or there was none and it is recorded now.
        let presented = seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| SshError::Protocol {
                address,
                stage: "handshaking",
                message: "no host key presented".into(),
            })?;
        let host_key_fingerprint = fingerprint(&presented);
        let host_key_recorded = pinned.is_none();
        if host_key_recorded {
            let store = self.known_hosts.clone();
            tokio::task::spawn_blocking(move || store.record(address, presented))
                .await
                .map_err(|e| SshError::KnownHosts {
                    path: self.known_hosts.path.clone(),
                    message: e.to_string(),
                })??;
        }

        let output = tokio::time::timeout(s.command_timeout, run_script(&session, &self.script))
            .await
            .map_err(|_| SshError::Timeout {
                address,
                stage: "running the identification script",
                timeout: s.command_timeout,
            })?
            .map_err(|e| match e {
                ScriptError::Ssh(e) => protocol(address, "running the identification script", e),
                ScriptError::Output(source) => SshError::Output { address, source },
                ScriptError::Failed(detail) => SshError::Command { address, detail },
            })?;
        // The host is done with; a failed goodbye changes nothing.
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            session.disconnect(russh::Disconnect::ByApplication, "", "en"),
        )
        .await;

        let found = identify_host(&output.host_clues());
        tracing::debug!(
            %address,
            login_ms = logged_in.duration_since(started).as_millis() as u64,
            script_ms = logged_in.elapsed().as_millis() as u64,
            robot_type = %found.type_decision.robot_type,
            "host identified over SSH"
        );
        let Some(hardware_id) = found.hardware_id.clone() else {
            return Err(SshError::NoHardwareId { address });
        };
        Ok(SshIdentification {
            address,
            robot_id: RobotId::from_hardware(&hardware_id),
            hardware_id,
            found,
            host_key_fingerprint,
            host_key_recorded,
        })
    }
}

fn protocol(address: SocketAddr, stage: &'static str, e: russh::Error) -> SshError {
    SshError::Protocol {
        address,
        stage,
        message: e.to_string(),
    }
}

enum ScriptError {
    Ssh(russh::Error),
    Output(OutputError),
    Failed(String),
}

/// Feeds the script to `/bin/sh -s` and collects its output (capped).
async fn run_script(
    session: &client::Handle<Pinning>,
    script: &str,
) -> Result<ClueOutput, ScriptError> {
    let mut channel = session
        .channel_open_session()
        .await
        .map_err(ScriptError::Ssh)?;
    channel
        .exec(true, "LC_ALL=C exec /bin/sh -s")
        .await
        .map_err(ScriptError::Ssh)?;
    channel
        .data_bytes(script.as_bytes().to_vec())
        .await
        .map_err(ScriptError::Ssh)?;
    channel.eof().await.map_err(ScriptError::Ssh)?;
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let mut status = None;
    while let Some(msg) = channel.wait().await {
        match msg {
            russh::ChannelMsg::Data { data } => {
                if stdout.len() + data.len() > MAX_OUTPUT {
                    let _ = channel.close().await;
                    return Err(ScriptError::Output(OutputError::TooLarge));
                }
                stdout.extend_from_slice(&data);
            }
            russh::ChannelMsg::ExtendedData { data, .. } => {
                let room = MAX_STDERR.saturating_sub(stderr.len());
                stderr.extend_from_slice(&data[..data.len().min(room)]);
            }
            russh::ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            russh::ChannelMsg::Failure => {
                return Err(ScriptError::Failed(
                    "the host refused to run a command".into(),
                ));
            }
            _ => {}
        }
    }
    match parse_clue_output(&stdout) {
        Ok(out) => Ok(out),
        Err(e) if status.is_some_and(|s| s != 0) || stdout.is_empty() => {
            let stderr = String::from_utf8_lossy(&stderr);
            Err(ScriptError::Failed(format!(
                "exit status {}, {e}; stderr: {:?}",
                status.map_or_else(|| "unknown".to_string(), |s| s.to_string()),
                stderr.trim()
            )))
        }
        Err(e) => Err(ScriptError::Output(e)),
    }
}

/// The handshake's host-key check against the pinned key.
#[derive(Debug)]
struct Pinning {
    pinned: Option<PublicKey>,
    /// The key the host presented (kept once it passed).
    seen: Arc<Mutex<Option<PublicKey>>>,
}

#[derive(Debug)]
enum PinError {
    Ssh(russh::Error),
    Changed { expected: String, found: String },
}

impl From<russh::Error> for PinError {
    fn from(e: russh::Error) -> Self {
        PinError::Ssh(e)
    }
}

impl client::Handler for Pinning {
    type Error = PinError;

    async fn check_server_key(
        &mut self,
        server_key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, PinError> {
        // No certificate algorithm is advertised, so a certificate is not
        // expected; refuse one rather than guess what it means.
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = server_key else {
            return Ok(false);
        };
        match &self.pinned {
            Some(pinned) if pinned.key_data() != key.key_data() => Err(PinError::Changed {
                expected: fingerprint(pinned),
                found: fingerprint(key),
            }),
            _ => {
                *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = Some(key.clone());
                Ok(true)
            }
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod sshd_tests;
