//! Controller configuration: `/etc/kiwi/controller.toml` (or `--config`),
//! then `KIWI_CONTROLLER_*` environment variables, then flags. Validated as a
//! whole before any port is bound; every invalid field is reported at once.
//!
//! The built-in defaults keep everything on loopback and switch off every
//! LAN feature: the packaged configuration switches them on.

use kiwi_protocol::settings::{FieldErrors, Layers, Origin, Reader, parse_duration};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Prefix of the environment variables that set controller settings.
pub const ENV_PREFIX: &str = "KIWI_CONTROLLER_";

/// The configuration file read when none is given and it exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/kiwi/controller.toml";

/// Every setting key (the names in the TOML file).
pub const KEYS: &[&str] = &[
    "api_listen",
    "agent_listen",
    "state_dir",
    "heartbeat_interval",
    "liveness_timeout",
    "startup_grace",
    "report_interval",
    "auto_provision",
    "discovery_interval",
    "api_body_limit",
    "max_agents",
];

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// REST API, watch stream, health and metrics.
    pub api_listen: SocketAddr,
    /// The agents' WebSocket endpoint.
    pub agent_listen: SocketAddr,
    /// Where the embedded store lives.
    pub state_dir: PathBuf,
    /// The heartbeat interval agents are told to use.
    pub heartbeat_interval: Duration,
    /// A connected agent silent this long is considered gone.
    pub liveness_timeout: Duration,
    /// After start-up, how long robots that expect an agent have to
    /// reconnect before they are recorded offline.
    pub startup_grace: Duration,
    /// How often agents send a report when nothing changed.
    pub report_interval: Duration,
    /// Provision robots whose agent connects without waiting for an operator.
    pub auto_provision: bool,
    /// Continuous discovery period (0: only on demand).
    pub discovery_interval: Duration,
    /// Largest accepted REST request body, in bytes.
    pub api_body_limit: usize,
    /// Most agent connections held at once; more are refused with retry-after.
    pub max_agents: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            api_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            agent_listen: SocketAddr::from(([127, 0, 0, 1], 8765)),
            state_dir: PathBuf::from("/var/lib/kiwi-controller"),
            heartbeat_interval: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(5),
            startup_grace: Duration::from_secs(45),
            report_interval: Duration::from_secs(30),
            auto_provision: true,
            discovery_interval: Duration::from_secs(30),
            api_body_limit: 64 * 1024,
            max_agents: 20_000,
        }
    }
}

/// Values given as command-line flags (highest precedence).
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub api_listen: Option<String>,
    pub agent_listen: Option<String>,
}

fn duration(r: &mut Reader<'_>, key: &str, default: Duration) -> Duration {
    r.parse_with(key, parse_duration).unwrap_or(default)
}

impl Config {
    /// Loads the layers and validates them.
    pub fn load<I>(flags: &Flags, env: I) -> Result<Config, FieldErrors>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut layers = Layers::new();
        let file = flags.config.clone().or_else(|| {
            Path::new(DEFAULT_CONFIG_FILE)
                .exists()
                .then(|| PathBuf::from(DEFAULT_CONFIG_FILE))
        });
        if let Some(path) = &file {
            let shown = path.display().to_string();
            match std::fs::read_to_string(path) {
                Ok(text) => layers.add_toml(&text, &shown),
                Err(e) => layers.set("<file>", "", Origin::File(format!("{shown}: {e}"))),
            }
        }
        layers.add_env(ENV_PREFIX, KEYS, env);
        if let Some(d) = &flags.state_dir {
            layers.set(
                "state_dir",
                d.display().to_string(),
                Origin::Flag("state-dir".into()),
            );
        }
        if let Some(a) = &flags.api_listen {
            layers.set("api_listen", a.clone(), Origin::Flag("api-listen".into()));
        }
        if let Some(a) = &flags.agent_listen {
            layers.set(
                "agent_listen",
                a.clone(),
                Origin::Flag("agent-listen".into()),
            );
        }
        Self::from_layers(&layers)
    }

    fn from_layers(layers: &Layers) -> Result<Config, FieldErrors> {
        let d = Config::default();
        let mut r = layers.reader();
        if r.raw("<file>").is_some() {
            r.error("<file>", "cannot read the configuration file");
        }
        let c = Config {
            api_listen: r.get_or("api_listen", d.api_listen),
            agent_listen: r.get_or("agent_listen", d.agent_listen),
            state_dir: r.get_or("state_dir", d.state_dir),
            heartbeat_interval: duration(&mut r, "heartbeat_interval", d.heartbeat_interval),
            liveness_timeout: duration(&mut r, "liveness_timeout", d.liveness_timeout),
            startup_grace: duration(&mut r, "startup_grace", d.startup_grace),
            report_interval: duration(&mut r, "report_interval", d.report_interval),
            auto_provision: r.get_or("auto_provision", d.auto_provision),
            discovery_interval: duration(&mut r, "discovery_interval", d.discovery_interval),
            api_body_limit: r.get_or("api_body_limit", d.api_body_limit),
            max_agents: r.get_or("max_agents", d.max_agents),
        };
        if c.heartbeat_interval < Duration::from_millis(50)
            || c.heartbeat_interval > Duration::from_secs(3600)
        {
            r.error("heartbeat_interval", "must be between 50ms and 1h");
        }
        if c.liveness_timeout <= c.heartbeat_interval {
            r.error(
                "liveness_timeout",
                format!(
                    "must be longer than heartbeat_interval ({:?}), or every robot would flap",
                    c.heartbeat_interval
                ),
            );
        }
        if c.report_interval < Duration::from_millis(100) {
            r.error("report_interval", "must be at least 100ms");
        }
        if c.api_body_limit < 1024 {
            r.error("api_body_limit", "must be at least 1024 bytes");
        }
        if c.max_agents == 0 {
            r.error("max_agents", "must be at least 1");
        }
        if c.api_listen == c.agent_listen {
            r.error("agent_listen", "must differ from api_listen");
        }
        r.finish().map(|()| c)
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

    #[test]
    fn defaults_stay_on_loopback() {
        let c = Config::load(
            &Flags {
                config: Some(PathBuf::from("/dev/null")),
                ..Flags::default()
            },
            env(&[]),
        )
        .unwrap();
        assert!(c.api_listen.ip().is_loopback());
        assert!(c.agent_listen.ip().is_loopback());
        assert_eq!(c.api_listen.port(), 8080);
        assert_eq!(c.agent_listen.port(), 8765);
    }

    #[test]
    fn layers_override_in_order_and_errors_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "api_listen = \"127.0.0.1:9000\"\nheartbeat_interval = \"250ms\"\nauto_provision = false\n",
        )
        .unwrap();
        let flags = Flags {
            config: Some(file.clone()),
            api_listen: Some("127.0.0.1:9100".into()),
            ..Flags::default()
        };
        let c = Config::load(&flags, env(&[("KIWI_CONTROLLER_LIVENESS_TIMEOUT", "2s")])).unwrap();
        assert_eq!(c.api_listen.port(), 9100);
        assert_eq!(c.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(c.liveness_timeout, Duration::from_secs(2));
        assert!(!c.auto_provision);

        std::fs::write(
            &file,
            "api_listen = \"nowhere\"\nheartbeat_interval = \"soon\"\ncolour = 1\n",
        )
        .unwrap();
        let err = Config::load(
            &flags_with(&file),
            env(&[("KIWI_CONTROLLER_MAX_AGENTS", "0")]),
        )
        .unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
        for f in ["api_listen", "heartbeat_interval", "max_agents", "colour"] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }

    fn flags_with(file: &Path) -> Flags {
        Flags {
            config: Some(file.to_path_buf()),
            ..Flags::default()
        }
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err =
            Config::load(&flags_with(Path::new("/nonexistent/kiwi.toml")), env(&[])).unwrap_err();
        assert_eq!(err.0[0].field, "<file>");
    }
}
