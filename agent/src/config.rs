//! The agent's configuration: the typed settings of `kiwi-agent run`, read
//! from `/etc/kiwi/agent.toml`, then `KIWI_AGENT_*` environment variables,
//! then command-line flags (each layer overriding the one before), and
//! validated as a whole before anything connects.
//!
//! The layering itself is [`kiwi_protocol::settings`]; this module only names
//! the keys, parses each into its type and checks the rules between them.

use kiwi_protocol::RobotType;
use kiwi_protocol::settings::{FieldError, FieldErrors, Layers, Origin, parse_duration};
use kiwi_security::token::EnrollmentToken;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The config file read when `--config` is not given (only if it exists).
pub const DEFAULT_CONFIG_FILE: &str = "/etc/kiwi/agent.toml";
/// The prefix of the environment variables that set agent keys.
pub const ENV_PREFIX: &str = "KIWI_AGENT_";
/// The default state directory (outbox, persisted flags, generated id).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kiwi-agent";
/// The default periodic report interval.
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(30);
/// The default bound of the outbox, in unacknowledged reports.
pub const DEFAULT_OUTBOX_CAPACITY: usize = 10_000;
/// The default first reconnect ceiling.
pub const DEFAULT_RECONNECT_BASE: Duration = Duration::from_millis(100);
/// The default cap of the reconnect backoff. With full jitter, a fleet
/// whose controller comes back after an outage of any length is back within
/// this (and spread over it: 1,000 robots make about 12 attempts per
/// 100 ms), well inside the controller's `startup_grace`.
pub const DEFAULT_RECONNECT_CAP: Duration = Duration::from_secs(8);
/// The default interval between two UDP beacons (when announcing).
pub const DEFAULT_BEACON_INTERVAL: Duration = Duration::from_secs(5);
/// The shortest beacon interval accepted: a fleet of hundreds of robots
/// must not flood its subnet.
pub const MIN_BEACON_INTERVAL: Duration = Duration::from_millis(100);

/// Every key the agent reads, as written in the file (and, upper-cased with
/// the prefix, in the environment).
pub const KEYS: &[&str] = &[
    "controller",
    "transport",
    "state_dir",
    "sys_root",
    "robot_type",
    "workload_unit",
    "report_interval",
    "outbox_capacity",
    "reconnect_base",
    "reconnect_cap",
    "announce",
    "beacon_interval",
    "beacon_port",
    "enroll_token",
];

/// The flags of `kiwi-agent run`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunFlags {
    /// Config file (default /etc/kiwi/agent.toml, read only if it exists).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Controller address, host:port or wss://host:port[/path], or `auto`
    /// (find it on the LAN by mDNS or the UDP beacon).
    #[arg(long, value_name = "URL")]
    pub controller: Option<String>,
    /// State directory (outbox, persisted flags).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Prefix for /proc, /sys, /dev and /etc (tests and simulations).
    #[arg(long, value_name = "DIR")]
    pub sys_root: Option<PathBuf>,
}

/// The controller's agent port, parsed from `host[:port]`,
/// `wss://host[:port][/path]` or `quic://host[:port]`. Every link is TLS:
/// the scheme only spells the address (the `transport` setting picks
/// WebSocket or QUIC); `ws://` is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerUrl {
    /// A host name or an IP address (IPv6 in brackets).
    pub host: String,
    pub port: u16,
    /// The path as given (empty when none was given).
    pub path: String,
}

impl ControllerUrl {
    /// The path agents connect to when the address names none.
    pub const DEFAULT_PATH: &'static str = "/agent";

    /// The agent port when an address names none (TCP and UDP).
    pub const DEFAULT_PORT: u16 = 8765;

    /// The WebSocket URL the link connects to: the given path, or `/agent`
    /// when the path is empty or `/`.
    pub fn endpoint(&self) -> String {
        let path = if self.path.is_empty() || self.path == "/" {
            Self::DEFAULT_PATH
        } else {
            self.path.as_str()
        };
        format!("wss://{}:{}{}", self.host, self.port, path)
    }

    /// The enrollment URL on the same port.
    pub fn enroll_endpoint(&self) -> String {
        format!(
            "https://{}:{}{}",
            self.host,
            self.port,
            kiwi_security::enroll::ENROLL_PATH
        )
    }

    /// The host without IPv6 brackets (for resolving and TLS).
    pub fn bare_host(&self) -> &str {
        self.host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host)
    }
}

impl fmt::Display for ControllerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "wss://{}:{}{}", self.host, self.port, self.path)
    }
}

impl std::str::FromStr for ControllerUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_controller(text)
    }
}

/// Where `kiwi-agent run` finds its controller: a fixed address, or `auto`
/// (LAN discovery: the remembered address, then mDNS and the beacon).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControllerSetting {
    Url(ControllerUrl),
    Auto,
}

impl ControllerSetting {
    /// The fixed address, unless `auto`.
    pub fn url(&self) -> Option<&ControllerUrl> {
        match self {
            ControllerSetting::Url(u) => Some(u),
            ControllerSetting::Auto => None,
        }
    }

    pub fn is_auto(&self) -> bool {
        matches!(self, ControllerSetting::Auto)
    }
}

impl fmt::Display for ControllerSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControllerSetting::Url(u) => u.fmt(f),
            ControllerSetting::Auto => f.write_str("auto"),
        }
    }
}

impl std::str::FromStr for ControllerSetting {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_controller_setting(text)
    }
}

/// Parses the `controller` key: `auto` or an address.
pub fn parse_controller_setting(text: &str) -> Result<ControllerSetting, String> {
    if text.trim().eq_ignore_ascii_case("auto") {
        Ok(ControllerSetting::Auto)
    } else {
        parse_controller(text).map(ControllerSetting::Url)
    }
}

/// Parses a controller address (see [`ControllerUrl`]), refusing with a
/// clear message `ws://` (links are always TLS) and `auto`, which only
/// [`parse_controller_setting`] (`kiwi-agent run`) accepts.
pub fn parse_controller(text: &str) -> Result<ControllerUrl, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("auto") {
        return Err(
            "`auto` (LAN discovery of the controller) is only available to \
             `kiwi-agent run`; give the controller's address as host:port"
                .into(),
        );
    }
    let lower = t.to_ascii_lowercase();
    if lower.starts_with("ws://") {
        return Err(format!(
            "plain ws:// is not accepted: every link to the controller is TLS; \
             use wss://{} or host:port",
            &t[5..]
        ));
    }
    let rest = if lower.starts_with("wss://") {
        &t[6..]
    } else if lower.starts_with("quic://") {
        &t[7..]
    } else if lower.contains("://") {
        return Err(format!(
            "invalid controller address {t:?} (expected host:port or wss://host:port[/path])"
        ));
    } else {
        t
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(format!("controller address {t:?} has no host"));
    }
    if authority.contains('@') || t.chars().any(char::is_whitespace) {
        return Err(format!(
            "invalid controller address {t:?} (expected host:port or wss://host:port[/path])"
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let end = v6
            .find(']')
            .ok_or_else(|| format!("controller address {t:?} has an unclosed `[`"))?;
        let host = &authority[..end + 2];
        let after = &v6[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("invalid controller address {t:?}")),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() || host.contains(':') && !host.starts_with('[') {
        return Err(format!("controller address {t:?} has no valid host"));
    }
    let port = match port {
        None => ControllerUrl::DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("invalid port {p:?} in {t:?}")),
            Ok(port) => port,
        },
    };
    Ok(ControllerUrl {
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

/// How the agent talks to the controller (always over TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket over TLS (TCP).
    WebSocket,
    /// QUIC (UDP).
    Quic,
    /// QUIC, falling back to WebSocket within a second when UDP is blocked.
    Auto,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Quic => "quic",
            Transport::Auto => "auto",
        }
    }
}

/// Parses `transport`: `auto` (the default), `quic` or `websocket`.
pub fn parse_transport(text: &str) -> Result<Transport, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "websocket" | "ws" | "wss" => Ok(Transport::WebSocket),
        "quic" => Ok(Transport::Quic),
        "auto" => Ok(Transport::Auto),
        other => Err(format!(
            "unknown transport {other:?} (expected `auto`, `quic` or `websocket`)"
        )),
    }
}

/// Checks a systemd unit name (`lerobot-host.service`, `robot@1`).
pub fn parse_unit(text: &str) -> Result<String, String> {
    let t = text.trim();
    let valid = !t.is_empty()
        && t.len() <= 255
        && !t.starts_with('-')
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '@' | '-' | '\\'));
    if valid {
        Ok(t.to_string())
    } else {
        Err(format!("invalid systemd unit name {t:?}"))
    }
}

/// How the agent makes itself known on the LAN (see [`crate::announce`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceConfig {
    /// Register `_kiwi-agent._tcp.local.` and send UDP beacons. On when
    /// `announce = true`, and always with `controller = "auto"` (the
    /// controller answers beacons that look for it).
    pub enabled: bool,
    /// Valid when at least [`MIN_BEACON_INTERVAL`].
    pub beacon_interval: Duration,
    /// The UDP port beacons go to (the controller's beacon port).
    pub beacon_port: u16,
}

impl Default for AnnounceConfig {
    /// Off: built-in defaults never send anything to the LAN.
    fn default() -> Self {
        Self {
            enabled: false,
            beacon_interval: DEFAULT_BEACON_INTERVAL,
            beacon_port: kiwi_protocol::beacon::BEACON_PORT,
        }
    }
}

/// The validated configuration of `kiwi-agent run`.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub controller: ControllerSetting,
    pub transport: Transport,
    pub state_dir: PathBuf,
    pub sys_root: PathBuf,
    /// Overrides robot-type detection when set.
    pub robot_type: Option<RobotType>,
    /// The systemd unit of the robot's main service, when it has one.
    pub workload_unit: Option<String>,
    /// Valid when non-zero.
    pub report_interval: Duration,
    /// Valid when non-zero.
    pub outbox_capacity: usize,
    /// Valid when non-zero and not above `reconnect_cap`.
    pub reconnect_base: Duration,
    pub reconnect_cap: Duration,
    pub announce: AnnounceConfig,
    /// An enrollment token to enroll with when the robot has no
    /// certificate yet (kept out of logs).
    pub enroll_token: Option<EnrollmentToken>,
}

/// Why the configuration cannot be used. Every variant makes the process
/// exit with code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(#[from] FieldErrors),
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Loads the configuration: the file (`--config`, else the default one if it
/// exists), then the `KIWI_AGENT_*` variables in `env`, then `flags`.
pub fn load<I>(flags: &RunFlags, env: I) -> Result<AgentConfig, ConfigError>
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut layers = Layers::new();
    let (path, explicit) = match &flags.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => layers.add_toml(&text, &path.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ConfigError::Invalid(FieldErrors(vec![FieldError {
                field: "config".into(),
                origin: Some(Origin::Flag("config".into())),
                message: format!("config file {} does not exist", path.display()),
            }])));
        }
        Err(source) => return Err(ConfigError::Read { path, source }),
    }
    layers.add_env(ENV_PREFIX, KEYS, env);
    if let Some(c) = &flags.controller {
        layers.set("controller", c.clone(), Origin::Flag("controller".into()));
    }
    if let Some(d) = &flags.state_dir {
        layers.set(
            "state_dir",
            d.display().to_string(),
            Origin::Flag("state-dir".into()),
        );
    }
    if let Some(d) = &flags.sys_root {
        layers.set(
            "sys_root",
            d.display().to_string(),
            Origin::Flag("sys-root".into()),
        );
    }
    from_layers(&layers)
}

/// Reads and validates every key of `layers`, reporting all problems at once.
pub fn from_layers(layers: &Layers) -> Result<AgentConfig, ConfigError> {
    let mut r = layers.reader();
    let controller = r.parse_with("controller", parse_controller_setting);
    let controller_missing = r.raw("controller").is_none();
    let transport = r
        .parse_with("transport", parse_transport)
        .unwrap_or(Transport::Auto);
    let state_dir = r
        .parse_with("state_dir", parse_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let sys_root = r
        .parse_with("sys_root", parse_dir)
        .unwrap_or_else(|| PathBuf::from("/"));
    let robot_type = r.parse_with("robot_type", |s| s.parse::<RobotType>());
    let workload_unit = r.parse_with("workload_unit", parse_unit);
    let report_interval = r
        .parse_with("report_interval", parse_positive_duration)
        .unwrap_or(DEFAULT_REPORT_INTERVAL);
    let outbox_capacity = r
        .parse_with("outbox_capacity", |s| match s.trim().parse::<usize>() {
            Ok(0) => Err("must be greater than 0".to_string()),
            Ok(n) => Ok(n),
            Err(e) => Err(format!("invalid value {s:?}: {e}")),
        })
        .unwrap_or(DEFAULT_OUTBOX_CAPACITY);
    let reconnect_base = r.parse_with("reconnect_base", parse_positive_duration);
    let reconnect_cap = r.parse_with("reconnect_cap", parse_positive_duration);
    if let (Some(base), Some(cap)) = (reconnect_base, reconnect_cap)
        && base > cap
    {
        r.error(
            "reconnect_base",
            format!("must not exceed reconnect_cap ({base:?} > {cap:?})"),
        );
    }
    if controller_missing {
        r.error(
            "controller",
            "required: the controller's address, host:port, or `auto` \
             (set it in the file, with KIWI_AGENT_CONTROLLER or --controller)",
        );
    }
    let defaults = AnnounceConfig::default();
    let announce = r.parse_with("announce", parse_bool).unwrap_or(false)
        || controller.as_ref().is_some_and(ControllerSetting::is_auto);
    let beacon_interval = r
        .parse_with("beacon_interval", |s| {
            let d = parse_duration(s)?;
            if d < MIN_BEACON_INTERVAL {
                Err(format!("must be at least {MIN_BEACON_INTERVAL:?}"))
            } else {
                Ok(d)
            }
        })
        .unwrap_or(defaults.beacon_interval);
    let beacon_port = r
        .parse_with("beacon_port", |s| match s.trim().parse::<u16>() {
            Ok(0) => Err("must not be 0".to_string()),
            Ok(p) => Ok(p),
            Err(e) => Err(format!("invalid port {s:?}: {e}")),
        })
        .unwrap_or(defaults.beacon_port);
    let enroll_token = r
        .parse_with("enroll_token", |t| {
            if t.trim().is_empty() {
                return Ok(None);
            }
            t.parse::<EnrollmentToken>()
                .map(Some)
                .map_err(|e| e.to_string())
        })
        .flatten();
    r.finish()?;
    // `finish` has already refused a missing or invalid controller; this
    // only keeps the types honest.
    let controller = controller.ok_or_else(|| {
        ConfigError::Invalid(FieldErrors(vec![FieldError {
            field: "controller".into(),
            origin: None,
            message: "required".into(),
        }]))
    })?;
    Ok(AgentConfig {
        controller,
        transport,
        state_dir,
        sys_root,
        robot_type,
        workload_unit,
        report_interval,
        outbox_capacity,
        reconnect_base: reconnect_base.unwrap_or(DEFAULT_RECONNECT_BASE),
        reconnect_cap: reconnect_cap.unwrap_or(DEFAULT_RECONNECT_CAP),
        announce: AnnounceConfig {
            enabled: announce,
            beacon_interval,
            beacon_port,
        },
        enroll_token,
    })
}

/// `true` or `false` (also `1`/`0`, `yes`/`no`, `on`/`off`, any case).
pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("invalid value {text:?} (expected true or false)")),
    }
}

fn parse_dir(text: &str) -> Result<PathBuf, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(Path::new(t).to_path_buf())
}

/// A duration that must be greater than zero.
pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d.is_zero() {
        Err("must be greater than 0".into())
    } else {
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn flags_with_file(text: &str) -> (tempfile::NamedTempFile, RunFlags) {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        let flags = RunFlags {
            config: Some(file.path().to_path_buf()),
            ..Default::default()
        };
        (file, flags)
    }

    fn invalid_fields(err: ConfigError) -> Vec<String> {
        match err {
            ConfigError::Invalid(e) => e.0.into_iter().map(|f| f.field).collect(),
            other => panic!("expected invalid configuration, got {other}"),
        }
    }

    #[test]
    fn file_env_and_flags_layer_in_order() {
        let (_f, mut flags) = flags_with_file(
            "controller = \"10.0.0.1:7000\"\nstate_dir = \"/from/file\"\n\
             report_interval = \"5s\"\nworkload_unit = \"lerobot-host.service\"\n",
        );
        flags.state_dir = Some("/from/flag".into());
        let cfg = load(
            &flags,
            env(&[
                ("KIWI_AGENT_CONTROLLER", "wss://127.0.0.1:7100/x"),
                ("KIWI_AGENT_STATE_DIR", "/from/env"),
                ("KIWI_AGENT_ROBOT_TYPE", "XLERobot"),
                ("UNRELATED", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(
            cfg.controller.url().map(ControllerUrl::endpoint).as_deref(),
            Some("wss://127.0.0.1:7100/x")
        );
        assert_eq!(cfg.state_dir, PathBuf::from("/from/flag"));
        assert_eq!(cfg.robot_type, Some(RobotType::Xlerobot));
        assert_eq!(cfg.report_interval, Duration::from_secs(5));
        assert_eq!(cfg.workload_unit.as_deref(), Some("lerobot-host.service"));
        assert_eq!(cfg.sys_root, PathBuf::from("/"));
        assert_eq!(cfg.outbox_capacity, DEFAULT_OUTBOX_CAPACITY);
        assert_eq!(cfg.reconnect_base, DEFAULT_RECONNECT_BASE);
        assert_eq!(cfg.reconnect_cap, DEFAULT_RECONNECT_CAP);
        assert_eq!(cfg.transport, Transport::Auto);
        assert_eq!(cfg.enroll_token, None);
        // Nothing goes to the LAN unless configured.
        assert_eq!(cfg.announce, AnnounceConfig::default());
        assert!(!cfg.announce.enabled);
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let (_f, flags) = flags_with_file(
            "transport = \"udp\"\noutbox_capacity = 0\nreport_interval = \"soon\"\n\
             reconnect_base = \"10s\"\nreconnect_cap = \"1s\"\nbogus = 1\n",
        );
        let err = load(&flags, env(&[("KIWI_AGENT_ROBOT_TYPE", "tank")])).unwrap_err();
        let text = err.to_string();
        let mut fields = invalid_fields(err);
        fields.sort();
        assert_eq!(
            fields,
            vec![
                "bogus",
                "controller",
                "outbox_capacity",
                "reconnect_base",
                "report_interval",
                "robot_type",
                "transport"
            ]
        );
        assert!(
            text.contains("expected `auto`, `quic` or `websocket`"),
            "{text}"
        );
        assert!(text.contains("KIWI_AGENT_ROBOT_TYPE"), "{text}");
    }

    #[test]
    fn missing_explicit_file_is_an_error_but_default_is_optional() {
        let flags = RunFlags {
            config: Some("/nonexistent/kiwi/agent.toml".into()),
            controller: Some("127.0.0.1:1".into()),
            ..Default::default()
        };
        let err = load(&flags, Vec::new()).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert_eq!(invalid_fields(err), vec!["config"]);
    }

    #[test]
    fn controller_addresses() {
        let u = parse_controller("127.0.0.1:8080").unwrap();
        assert_eq!(u.endpoint(), "wss://127.0.0.1:8080/agent");
        assert_eq!(u.enroll_endpoint(), "https://127.0.0.1:8080/enroll");
        let u = parse_controller("wss://ctl.lan:8080/").unwrap();
        assert_eq!(u.endpoint(), "wss://ctl.lan:8080/agent");
        let u = parse_controller("wss://ctl.lan/v2/agents").unwrap();
        assert_eq!(u.endpoint(), "wss://ctl.lan:8765/v2/agents");
        let u = parse_controller("quic://ctl.lan").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("ctl.lan", 8765));
        let u = parse_controller("[::1]:9000").unwrap();
        assert_eq!(u.endpoint(), "wss://[::1]:9000/agent");
        assert_eq!(u.bare_host(), "::1");
        let u = parse_controller("ctl.lan").unwrap();
        assert_eq!(u.port, ControllerUrl::DEFAULT_PORT);

        // `auto` is a setting of `run`, not an address (`simulate` needs one).
        let auto = parse_controller("auto").unwrap_err();
        assert!(auto.contains("LAN discovery"), "{auto}");
        assert!(auto.contains("kiwi-agent run"), "{auto}");
        assert_eq!(
            parse_controller_setting(" AUTO "),
            Ok(ControllerSetting::Auto)
        );
        assert_eq!(
            "h:1".parse::<ControllerSetting>().unwrap().to_string(),
            "wss://h:1"
        );
        // Plain WebSocket is refused, saying what to write instead.
        let plain = parse_controller("ws://h:1").unwrap_err();
        assert!(
            plain.contains("TLS") && plain.contains("wss://h:1"),
            "{plain}"
        );
        for bad in [
            "http://h:1",
            "wss://",
            "wss://h:0",
            "wss://h:port",
            "wss://u@h:1",
            "h:0",
            "[::1",
            "::1:80",
        ] {
            assert!(parse_controller(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn transports_and_units() {
        assert_eq!(parse_transport("WebSocket"), Ok(Transport::WebSocket));
        assert_eq!(parse_transport("quic"), Ok(Transport::Quic));
        assert_eq!(parse_transport(" auto"), Ok(Transport::Auto));
        assert!(parse_transport("carrier-pigeon").is_err());
        assert!(parse_unit("robot@1.service").is_ok());
        assert!(parse_unit("-x").is_err());
        assert!(parse_unit("a b").is_err());
        assert!(parse_unit("").is_err());
    }

    #[test]
    fn enroll_tokens_are_checked_and_may_be_empty() {
        let token = EnrollmentToken::generate(kiwi_security::Sha256Name::of(b"ca"));
        let mut layers = Layers::new();
        layers.add_env(
            ENV_PREFIX,
            KEYS,
            env(&[
                ("KIWI_AGENT_CONTROLLER", "127.0.0.1:1"),
                ("KIWI_AGENT_ENROLL_TOKEN", &token.to_string()),
            ]),
        );
        assert_eq!(from_layers(&layers).unwrap().enroll_token, Some(token));
        let mut layers = Layers::new();
        layers.add_env(
            ENV_PREFIX,
            KEYS,
            env(&[
                ("KIWI_AGENT_CONTROLLER", "127.0.0.1:1"),
                ("KIWI_AGENT_ENROLL_TOKEN", ""),
            ]),
        );
        assert_eq!(from_layers(&layers).unwrap().enroll_token, None);
        let mut layers = Layers::new();
        layers.add_env(
            ENV_PREFIX,
            KEYS,
            env(&[
                ("KIWI_AGENT_CONTROLLER", "127.0.0.1:1"),
                ("KIWI_AGENT_ENROLL_TOKEN", "kiwi-api.v1.x"),
            ]),
        );
        let err = from_layers(&layers).unwrap_err().to_string();
        assert!(
            err.contains("enroll_token") && !err.contains("kiwi-api.v1.x."),
            "{err}"
        );
    }

    #[test]
    fn auto_controller_from_env_switches_announcing_on() {
        let mut layers = Layers::new();
        layers.add_env(ENV_PREFIX, KEYS, env(&[("KIWI_AGENT_CONTROLLER", "auto")]));
        let cfg = from_layers(&layers).unwrap();
        assert_eq!(cfg.controller, ControllerSetting::Auto);
        assert!(cfg.announce.enabled);
        assert_eq!(cfg.announce.beacon_interval, DEFAULT_BEACON_INTERVAL);
        assert_eq!(cfg.announce.beacon_port, 8766);
    }

    #[test]
    fn announce_settings() {
        let (_f, flags) = flags_with_file(
            "controller = \"10.0.0.1:7000\"\nannounce = true\nbeacon_interval = \"250ms\"\n",
        );
        let cfg = load(&flags, env(&[("KIWI_AGENT_BEACON_PORT", "9766")])).unwrap();
        assert_eq!(
            cfg.announce,
            AnnounceConfig {
                enabled: true,
                beacon_interval: Duration::from_millis(250),
                beacon_port: 9766,
            }
        );

        // `announce = false` cannot switch it off for `auto`.
        let (_f, flags) = flags_with_file("controller = \"auto\"\nannounce = false\n");
        assert!(load(&flags, Vec::new()).unwrap().announce.enabled);

        let (_f, flags) = flags_with_file(
            "controller = \"auto\"\nannounce = \"maybe\"\nbeacon_interval = \"10ms\"\n\
             beacon_port = 0\n",
        );
        let mut fields = invalid_fields(load(&flags, Vec::new()).unwrap_err());
        fields.sort();
        assert_eq!(fields, vec!["announce", "beacon_interval", "beacon_port"]);
    }
}
