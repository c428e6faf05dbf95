//! Controller configuration: `/etc/kiwi/controller.toml` (or `--config`),
//! then `KIWI_CONTROLLER_*` environment variables, then flags. Validated as a
//! whole before any port is bound; every invalid field is reported at once.
//!
//! The built-in defaults keep everything on loopback and switch off every
//! LAN feature: the packaged configuration switches them on.

use crate::discovery::sweep;
use kiwi_protocol::settings::{FieldErrors, Layers, Origin, Reader, parse_duration};
use std::net::SocketAddr;
use std::num::NonZeroU32;
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
    "offline_fail_after",
    "outage_share",
    "recovery_probe_interval",
    "recovery_probe_port",
    "offline_fail_probes",
    "circuit_failure_threshold",
    "circuit_success_threshold",
    "circuit_open_timeout",
    "circuit_half_open_timeout",
    "circuit_reset_after",
    "report_interval",
    "auto_provision",
    "discovery_interval",
    "api_body_limit",
    "api_max_connections",
    "api_max_connections_per_address",
    "api_header_read_timeout",
    "api_idle_timeout",
    "watch_client_queue",
    "max_agents",
    "max_arrivals",
    "agent_report_rate",
    "agent_report_burst",
    "database_url",
    "db_pool_size",
    "redis_url",
    "redis_prefix",
    "enable_cache",
    "cache_static_ttl",
    "cache_dynamic_ttl",
    "discovery_networks",
    "enable_websocket_discovery",
    "enable_udp_broadcast",
    "enable_mdns",
    "enable_arp_cache_check",
    "enable_ssh_fallback",
    "beacon_port",
    "sweep_concurrency",
    "sweep_arp_timeout",
    "sweep_connect_timeout",
    "ssh_user",
    "ssh_key",
    "ssh_port",
    "ssh_sys_root",
    "ssh_known_hosts",
    "ssh_connect_timeout",
    "ssh_command_timeout",
    "tls_names",
    "enable_quic",
    "client_cert_ttl",
    "enroll_per_minute",
    "auth_failures_per_minute",
    "max_connections_per_address",
    "max_pending_enrollments",
    "max_pending_enrollments_per_address",
    "pending_enrollment_ttl",
    "metrics_require_token",
];

/// The original design's environment variables, honoured below the
/// `KIWI_CONTROLLER_*` ones. `DB_*` and `REDIS_HOST`/`REDIS_PORT`/`REDIS_DB`
/// are composed into `database_url` and `redis_url`.
pub const LEGACY_ENV: &[&str] = &[
    "DATABASE_URL",
    "DB_HOST",
    "DB_PORT",
    "DB_NAME",
    "DB_USER",
    "DB_PASSWORD",
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_DB",
    "DISCOVERY_NETWORK",
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
    /// An `offline` robot is recorded `failed` after this long (0: never
    /// automatically), unless the network is degraded (outage damping).
    pub offline_fail_after: Duration,
    /// More than this share of the robots silent at once (within 10 s)
    /// declares the network degraded.
    pub outage_share: f64,
    /// Recovery probes of offline robots: how often, and how many failures
    /// in a row make one `failed`.
    pub recovery: crate::domain::recovery::RecoverySettings,
    /// The TCP port the recovery probe connects to (the robots' SSH).
    pub recovery_probe_port: u16,
    /// Each robot's circuit breaker (the original design's 5, 3, 30 s,
    /// 60 s, 300 s).
    pub circuit: crate::breakers::CircuitSettings,
    /// How often agents send a report when nothing changed.
    pub report_interval: Duration,
    /// Provision robots whose agent connects without waiting for an operator.
    pub auto_provision: bool,
    /// Continuous discovery period (0: only on demand).
    pub discovery_interval: Duration,
    /// Largest accepted REST request body, in bytes.
    pub api_body_limit: usize,
    /// API connections held at once, in all (never more than the
    /// open-files limit leaves beside `max_agents`: see
    /// [`crate::api::server::connection_budget`]) and from one address.
    pub api_max_connections: usize,
    pub api_max_connections_per_address: usize,
    /// How long a client may take to send a request's head, from its first
    /// byte.
    pub api_header_read_timeout: Duration,
    /// How long a kept-alive API connection may wait for its next request.
    pub api_idle_timeout: Duration,
    /// Events queued per watch client; a client further behind is told
    /// where to resume and disconnected.
    pub watch_client_queue: usize,
    /// Most agent connections held at once; more are refused with retry-after.
    pub max_agents: usize,
    /// Agent arrivals recorded at once; more are told to retry later.
    pub max_arrivals: usize,
    /// Reports per second one agent may send (burst: `agent_report_burst`);
    /// faster ones are paced.
    pub agent_report_rate: NonZeroU32,
    pub agent_report_burst: NonZeroU32,
    /// PostgreSQL connection URL; `None`: the embedded SQLite store.
    pub database_url: Option<String>,
    /// Connections in the PostgreSQL pool.
    pub db_pool_size: u32,
    /// Redis connection URL; `None`: no shared cache.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key (several fleets may share one Redis).
    pub redis_prefix: String,
    /// Use Redis when it is configured.
    pub enable_cache: bool,
    /// TTL of identity data in Redis (IP index, state and type sets).
    pub cache_static_ttl: Duration,
    /// TTL of robot rows in Redis.
    pub cache_dynamic_ttl: Duration,
    /// LAN discovery (off by default: the built-in defaults stay on
    /// loopback).
    pub discovery: DiscoveryConfig,
    /// TLS, enrollment, tokens and abuse limits.
    pub security: SecurityConfig,
}

/// Who may connect, and how hard they may try.
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityConfig {
    /// Extra DNS names and addresses of the server certificate (it always
    /// lists `localhost` and the loopback addresses).
    pub tls_names: Vec<String>,
    /// Serve QUIC on the agent port's UDP side too.
    pub enable_quic: bool,
    /// How long a robot's client certificate is valid (agents renew it
    /// over their link when a third is left).
    pub client_cert_ttl: Duration,
    pub enroll_per_minute: u32,
    pub auth_failures_per_minute: u32,
    pub max_connections_per_address: usize,
    /// Enrollment requests waiting for an operator (anyone on the agent
    /// port can make one): at most this many in all and from one address;
    /// one nobody asked about for `pending_enrollment_ttl` is forgotten.
    pub max_pending_enrollments: u32,
    pub max_pending_enrollments_per_address: u32,
    pub pending_enrollment_ttl: Duration,
    /// Ask for a (viewer) API token on `/metrics` too.
    pub metrics_require_token: bool,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        let limits = crate::security::LimitSettings::default();
        SecurityConfig {
            tls_names: Vec::new(),
            enable_quic: true,
            client_cert_ttl: Duration::from_secs(7 * 86_400),
            enroll_per_minute: limits.enroll_per_minute,
            auth_failures_per_minute: limits.auth_failures_per_minute,
            max_connections_per_address: limits.connections_per_address,
            max_pending_enrollments: 1000,
            max_pending_enrollments_per_address: 16,
            pending_enrollment_ttl: Duration::from_secs(86_400),
            metrics_require_token: false,
        }
    }
}

impl SecurityConfig {
    /// The caps on enrollment requests waiting for an operator.
    pub fn pending_limits(&self) -> crate::store::auth::PendingLimits {
        crate::store::auth::PendingLimits {
            total: self.max_pending_enrollments,
            per_address: self.max_pending_enrollments_per_address,
        }
    }

    pub fn limits(&self) -> crate::security::LimitSettings {
        crate::security::LimitSettings {
            enroll_per_minute: self.enroll_per_minute,
            auth_failures_per_minute: self.auth_failures_per_minute,
            connections_per_address: self.max_connections_per_address,
        }
    }
}

/// What discovery rounds and the passive listeners do. Everything that
/// sends to the LAN is off unless configured.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveryConfig {
    /// Networks the sweep covers (the original design's
    /// `DISCOVERY_NETWORK`); none: no sweep.
    pub networks: Vec<ipnet::Ipv4Net>,
    /// Count connected agents in discovery rounds.
    pub enable_websocket_discovery: bool,
    /// Listen for agents' UDP beacons and answer them.
    pub enable_udp_broadcast: bool,
    /// Register `_kiwi-ctl._tcp` and browse `_kiwi-agent._tcp` over mDNS.
    pub enable_mdns: bool,
    /// Read the kernel neighbour table before sweeping (the sweep sends its
    /// own ARP requests whenever it has `CAP_NET_RAW`, else TCP connects).
    pub enable_arp_cache_check: bool,
    /// Identify live hosts without an agent over SSH.
    pub enable_ssh_fallback: bool,
    /// The UDP port of agent beacons.
    pub beacon_port: u16,
    /// Most probes in flight during a sweep.
    pub sweep_concurrency: usize,
    /// How long the sweep waits for ARP replies (then once more for the
    /// addresses that did not answer).
    pub sweep_arp_timeout: Duration,
    /// How long one TCP probe may take.
    pub sweep_connect_timeout: Duration,
    pub ssh_user: String,
    /// The private key the controller logs in with.
    pub ssh_key: Option<PathBuf>,
    pub ssh_port: u16,
    /// Where the identifying files are on the hosts (`/` on a robot).
    pub ssh_sys_root: PathBuf,
    /// Host keys seen, checked on later visits (default: in `state_dir`).
    pub ssh_known_hosts: Option<PathBuf>,
    /// The limit of connecting, the host-key check and the login.
    pub ssh_connect_timeout: Duration,
    /// The limit of running the identification script.
    pub ssh_command_timeout: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            networks: Vec::new(),
            enable_websocket_discovery: true,
            enable_udp_broadcast: false,
            enable_mdns: false,
            enable_arp_cache_check: true,
            enable_ssh_fallback: false,
            beacon_port: 8766,
            sweep_concurrency: 256,
            sweep_arp_timeout: Duration::from_millis(150),
            sweep_connect_timeout: Duration::from_millis(300),
            ssh_user: "root".into(),
            ssh_key: None,
            ssh_port: 22,
            ssh_sys_root: PathBuf::from("/"),
            ssh_known_hosts: None,
            ssh_connect_timeout: Duration::from_secs(5),
            ssh_command_timeout: Duration::from_secs(10),
        }
    }
}

/// Parses `10.88.0.0/24, 10.89.0.0/24` (a TOML list arrives joined by
/// commas). Host bits are cleared; what a sweep refuses (a network larger
/// than a /16, too many addresses in all) is refused here already.
pub fn parse_networks(text: &str) -> Result<Vec<ipnet::Ipv4Net>, String> {
    let mut networks = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let net: ipnet::Ipv4Net = part
            .parse()
            .map_err(|e| format!("{part:?} is not an IPv4 network like 10.88.0.0/24: {e}"))?;
        let net = net.trunc();
        if !networks.contains(&net) {
            networks.push(net);
        }
    }
    sweep::validate(&networks).map_err(|e| e.to_string())?;
    Ok(networks)
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
            offline_fail_after: Duration::from_secs(600),
            outage_share: 0.5,
            recovery: crate::domain::recovery::RecoverySettings::default(),
            recovery_probe_port: 22,
            circuit: crate::breakers::CircuitSettings::default(),
            report_interval: Duration::from_secs(30),
            auto_provision: true,
            discovery_interval: Duration::from_secs(30),
            api_body_limit: 64 * 1024,
            api_max_connections: 1024,
            api_max_connections_per_address: 128,
            api_header_read_timeout: Duration::from_secs(10),
            api_idle_timeout: Duration::from_secs(60),
            watch_client_queue: 1024,
            max_agents: 20_000,
            max_arrivals: 256,
            agent_report_rate: NonZeroU32::new(50).unwrap_or(NonZeroU32::MIN),
            agent_report_burst: NonZeroU32::new(500).unwrap_or(NonZeroU32::MIN),
            database_url: None,
            db_pool_size: 10,
            redis_url: None,
            redis_prefix: "kiwi:".into(),
            enable_cache: true,
            cache_static_ttl: Duration::from_secs(3600),
            cache_dynamic_ttl: Duration::from_secs(300),
            discovery: DiscoveryConfig::default(),
            security: SecurityConfig::default(),
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
        let env: Vec<(String, String)> = env.into_iter().collect();
        add_legacy_env(&mut layers, &env);
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
            offline_fail_after: duration(&mut r, "offline_fail_after", d.offline_fail_after),
            outage_share: r.get_or("outage_share", d.outage_share),
            recovery: crate::domain::recovery::RecoverySettings {
                interval: duration(&mut r, "recovery_probe_interval", d.recovery.interval),
                fail_after: r.get_or("offline_fail_probes", d.recovery.fail_after),
            },
            recovery_probe_port: r.get_or("recovery_probe_port", d.recovery_probe_port),
            circuit: crate::breakers::CircuitSettings {
                breaker: crate::domain::breaker::BreakerSettings {
                    failure_threshold: r.get_or(
                        "circuit_failure_threshold",
                        d.circuit.breaker.failure_threshold,
                    ),
                    success_threshold: r.get_or(
                        "circuit_success_threshold",
                        d.circuit.breaker.success_threshold,
                    ),
                    open_timeout: duration(
                        &mut r,
                        "circuit_open_timeout",
                        d.circuit.breaker.open_timeout,
                    ),
                    half_open_timeout: duration(
                        &mut r,
                        "circuit_half_open_timeout",
                        d.circuit.breaker.half_open_timeout,
                    ),
                },
                reset_after: duration(&mut r, "circuit_reset_after", d.circuit.reset_after),
            },
            report_interval: duration(&mut r, "report_interval", d.report_interval),
            auto_provision: r.get_or("auto_provision", d.auto_provision),
            discovery_interval: duration(&mut r, "discovery_interval", d.discovery_interval),
            api_body_limit: r.get_or("api_body_limit", d.api_body_limit),
            api_max_connections: r.get_or("api_max_connections", d.api_max_connections),
            api_max_connections_per_address: r.get_or(
                "api_max_connections_per_address",
                d.api_max_connections_per_address,
            ),
            api_header_read_timeout: duration(
                &mut r,
                "api_header_read_timeout",
                d.api_header_read_timeout,
            ),
            api_idle_timeout: duration(&mut r, "api_idle_timeout", d.api_idle_timeout),
            watch_client_queue: r.get_or("watch_client_queue", d.watch_client_queue),
            max_agents: r.get_or("max_agents", d.max_agents),
            max_arrivals: r.get_or("max_arrivals", d.max_arrivals),
            agent_report_rate: r.get_or("agent_report_rate", d.agent_report_rate),
            agent_report_burst: r.get_or("agent_report_burst", d.agent_report_burst),
            database_url: r
                .raw("database_url")
                .map(str::to_string)
                .filter(|u| !u.is_empty()),
            db_pool_size: r.get_or("db_pool_size", d.db_pool_size),
            redis_url: r
                .raw("redis_url")
                .map(str::to_string)
                .filter(|u| !u.is_empty()),
            redis_prefix: r.raw("redis_prefix").map_or(d.redis_prefix, str::to_string),
            enable_cache: r.get_or("enable_cache", d.enable_cache),
            cache_static_ttl: duration(&mut r, "cache_static_ttl", d.cache_static_ttl),
            cache_dynamic_ttl: duration(&mut r, "cache_dynamic_ttl", d.cache_dynamic_ttl),
            discovery: discovery_from(&mut r, d.discovery),
            security: security_from(&mut r, d.security),
        };
        if let Some(u) = &c.database_url
            && !(u.starts_with("postgres://") || u.starts_with("postgresql://"))
        {
            r.error("database_url", "must be a postgres:// URL");
        }
        if let Some(u) = &c.redis_url
            && !u.starts_with("redis://")
        {
            r.error("redis_url", "must be a redis:// URL");
        }
        if !(1..=500).contains(&c.db_pool_size) {
            r.error("db_pool_size", "must be between 1 and 500");
        }
        if c.cache_static_ttl.is_zero() || c.cache_dynamic_ttl.is_zero() {
            r.error("cache_dynamic_ttl", "cache TTLs must be longer than zero");
        }
        if c.heartbeat_interval < Duration::from_millis(50)
            || c.heartbeat_interval > Duration::from_secs(3600)
        {
            r.error("heartbeat_interval", "must be between 50ms and 1h");
        }
        if c.circuit.breaker.failure_threshold == 0 {
            r.error("circuit_failure_threshold", "must be 1 or more");
        }
        if c.circuit.breaker.success_threshold == 0 {
            r.error("circuit_success_threshold", "must be 1 or more");
        }
        if !(c.outage_share.is_finite() && c.outage_share > 0.0 && c.outage_share < 1.0) {
            r.error(
                "outage_share",
                format!("must be between 0 and 1, exclusive (is {})", c.outage_share),
            );
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
        if c.watch_client_queue == 0 {
            r.error("watch_client_queue", "must be at least 1");
        }
        if c.api_max_connections == 0 || c.api_max_connections_per_address == 0 {
            r.error(
                "api_max_connections",
                "api_max_connections and api_max_connections_per_address must be at least 1",
            );
        }
        if c.api_header_read_timeout.is_zero() || c.api_idle_timeout.is_zero() {
            r.error(
                "api_header_read_timeout",
                "api_header_read_timeout and api_idle_timeout must be longer than zero",
            );
        }
        if c.api_body_limit < 1024 {
            r.error("api_body_limit", "must be at least 1024 bytes");
        }
        if c.max_arrivals == 0 {
            r.error("max_arrivals", "must be at least 1");
        }
        if c.max_agents == 0 {
            r.error("max_agents", "must be at least 1");
        }
        if c.api_listen == c.agent_listen {
            r.error("agent_listen", "must differ from api_listen");
        }
        let sec = &c.security;
        if sec.client_cert_ttl < Duration::from_secs(10) {
            r.error("client_cert_ttl", "must be at least 10s");
        }
        if sec.enroll_per_minute == 0 || sec.auth_failures_per_minute == 0 {
            r.error(
                "enroll_per_minute",
                "enroll_per_minute and auth_failures_per_minute must be at least 1",
            );
        }
        if sec.max_pending_enrollments == 0 || sec.max_pending_enrollments_per_address == 0 {
            r.error(
                "max_pending_enrollments",
                "max_pending_enrollments and max_pending_enrollments_per_address must be at least 1",
            );
        }
        if sec.pending_enrollment_ttl < Duration::from_secs(1) {
            r.error("pending_enrollment_ttl", "must be at least 1s");
        }
        if sec.max_connections_per_address == 0 {
            r.error("max_connections_per_address", "must be at least 1");
        }
        let lan = &c.discovery;
        if lan.enable_ssh_fallback && lan.ssh_key.is_none() {
            r.error(
                "ssh_key",
                "enable_ssh_fallback needs the private key the controller logs in with",
            );
        }
        if crate::discovery::ssh::validate_sys_root(&lan.ssh_sys_root).is_err() {
            r.error(
                "ssh_sys_root",
                "must be an absolute path of letters, digits and . _ - + / only",
            );
        }
        if !(1..=4096).contains(&lan.sweep_concurrency) {
            r.error("sweep_concurrency", "must be between 1 and 4096");
        }
        if lan.sweep_arp_timeout.is_zero() || lan.sweep_connect_timeout.is_zero() {
            r.error(
                "sweep_connect_timeout",
                "sweep timeouts must be longer than zero",
            );
        }
        r.finish().map(|()| c)
    }
}

fn security_from(r: &mut Reader<'_>, d: SecurityConfig) -> SecurityConfig {
    SecurityConfig {
        tls_names: r.raw("tls_names").map_or(d.tls_names, |t| {
            t.split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .collect()
        }),
        enable_quic: r.get_or("enable_quic", d.enable_quic),
        client_cert_ttl: duration(r, "client_cert_ttl", d.client_cert_ttl),
        enroll_per_minute: r.get_or("enroll_per_minute", d.enroll_per_minute),
        auth_failures_per_minute: r.get_or("auth_failures_per_minute", d.auth_failures_per_minute),
        max_connections_per_address: r
            .get_or("max_connections_per_address", d.max_connections_per_address),
        max_pending_enrollments: r.get_or("max_pending_enrollments", d.max_pending_enrollments),
        max_pending_enrollments_per_address: r.get_or(
            "max_pending_enrollments_per_address",
            d.max_pending_enrollments_per_address,
        ),
        pending_enrollment_ttl: duration(r, "pending_enrollment_ttl", d.pending_enrollment_ttl),
        metrics_require_token: r.get_or("metrics_require_token", d.metrics_require_token),
    }
}

fn discovery_from(r: &mut Reader<'_>, d: DiscoveryConfig) -> DiscoveryConfig {
    DiscoveryConfig {
        networks: r
            .parse_with("discovery_networks", parse_networks)
            .unwrap_or(d.networks),
        enable_websocket_discovery: r
            .get_or("enable_websocket_discovery", d.enable_websocket_discovery),
        enable_udp_broadcast: r.get_or("enable_udp_broadcast", d.enable_udp_broadcast),
        enable_mdns: r.get_or("enable_mdns", d.enable_mdns),
        enable_arp_cache_check: r.get_or("enable_arp_cache_check", d.enable_arp_cache_check),
        enable_ssh_fallback: r.get_or("enable_ssh_fallback", d.enable_ssh_fallback),
        beacon_port: r.get_or("beacon_port", d.beacon_port),
        sweep_concurrency: r.get_or("sweep_concurrency", d.sweep_concurrency),
        sweep_arp_timeout: duration(r, "sweep_arp_timeout", d.sweep_arp_timeout),
        sweep_connect_timeout: duration(r, "sweep_connect_timeout", d.sweep_connect_timeout),
        ssh_user: r.raw("ssh_user").map_or(d.ssh_user, str::to_string),
        ssh_key: r
            .raw("ssh_key")
            .filter(|k| !k.is_empty())
            .map(PathBuf::from),
        ssh_port: r.get_or("ssh_port", d.ssh_port),
        ssh_sys_root: r.get_or("ssh_sys_root", d.ssh_sys_root),
        ssh_known_hosts: r
            .raw("ssh_known_hosts")
            .filter(|k| !k.is_empty())
            .map(PathBuf::from),
        ssh_connect_timeout: duration(r, "ssh_connect_timeout", d.ssh_connect_timeout),
        ssh_command_timeout: duration(r, "ssh_command_timeout", d.ssh_command_timeout),
    }
}

/// Percent-encodes a URL user-info or path part.
fn url_part(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Honours the original design's variables: `DATABASE_URL` and `REDIS_URL`
/// as they are, or URLs composed from `DB_*` and `REDIS_*`.
fn add_legacy_env(layers: &mut Layers, env: &[(String, String)]) {
    let get = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    if let Some(url) = get("DATABASE_URL") {
        layers.set("database_url", url, Origin::Env("DATABASE_URL".into()));
    } else if get("DB_HOST").is_some() || get("DB_NAME").is_some() {
        let user = get("DB_USER").map(url_part);
        let password = get("DB_PASSWORD").map(url_part);
        let credentials = match (user, password) {
            (Some(u), Some(p)) => format!("{u}:{p}@"),
            (Some(u), None) => format!("{u}@"),
            (None, _) => String::new(),
        };
        let url = format!(
            "postgres://{credentials}{}:{}/{}",
            get("DB_HOST").unwrap_or("localhost"),
            get("DB_PORT").unwrap_or("5432"),
            url_part(get("DB_NAME").unwrap_or("kiwi")),
        );
        layers.set(
            "database_url",
            url,
            Origin::Env("DB_HOST/DB_PORT/DB_NAME/DB_USER/DB_PASSWORD".into()),
        );
    }
    if let Some(networks) = get("DISCOVERY_NETWORK") {
        layers.set(
            "discovery_networks",
            networks,
            Origin::Env("DISCOVERY_NETWORK".into()),
        );
    }
    if let Some(url) = get("REDIS_URL") {
        layers.set("redis_url", url, Origin::Env("REDIS_URL".into()));
    } else if let Some(host) = get("REDIS_HOST") {
        let url = format!(
            "redis://{host}:{}/{}",
            get("REDIS_PORT").unwrap_or("6379"),
            get("REDIS_DB").unwrap_or("0"),
        );
        layers.set(
            "redis_url",
            url,
            Origin::Env("REDIS_HOST/REDIS_PORT/REDIS_DB".into()),
        );
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
        // Nothing is sent to the LAN unless configured.
        let lan = &c.discovery;
        assert!(lan.networks.is_empty());
        assert!(!lan.enable_udp_broadcast && !lan.enable_mdns && !lan.enable_ssh_fallback);
    }

    #[test]
    fn lan_discovery_is_switched_on_by_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "discovery_networks = [\"10.88.0.7/24\", \"10.89.0.0/24\"]\n\
             enable_udp_broadcast = true\nenable_ssh_fallback = true\n\
             ssh_key = \"/etc/kiwi/id_ed25519\"\nssh_sys_root = \"/run/kiwi-robot\"\n\
             sweep_arp_timeout = \"100ms\"\n",
        )
        .unwrap();
        let flags = Flags {
            config: Some(file),
            ..Flags::default()
        };
        let c = Config::load(&flags, env(&[])).unwrap();
        let lan = &c.discovery;
        let nets: Vec<String> = lan.networks.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["10.88.0.0/24", "10.89.0.0/24"], "host bits cleared");
        assert!(lan.enable_udp_broadcast && lan.enable_ssh_fallback);
        assert_eq!(
            lan.ssh_key.as_deref(),
            Some(Path::new("/etc/kiwi/id_ed25519"))
        );
        assert_eq!(lan.ssh_sys_root, Path::new("/run/kiwi-robot"));
        assert_eq!(lan.sweep_arp_timeout, Duration::from_millis(100));

        // The original design's variable, below KIWI_CONTROLLER_*.
        let c = Config::load(&flags, env(&[("DISCOVERY_NETWORK", "10.90.0.0/25")])).unwrap();
        assert_eq!(c.discovery.networks[0].to_string(), "10.90.0.0/25");
        let c = Config::load(
            &flags,
            env(&[
                ("DISCOVERY_NETWORK", "10.90.0.0/25"),
                ("KIWI_CONTROLLER_DISCOVERY_NETWORKS", "10.91.0.0/24"),
            ]),
        )
        .unwrap();
        assert_eq!(c.discovery.networks[0].to_string(), "10.91.0.0/24");
    }

    #[test]
    fn bad_discovery_settings_are_refused_together() {
        let flags = Flags {
            config: Some(PathBuf::from("/dev/null")),
            ..Flags::default()
        };
        let e = Config::load(
            &flags,
            env(&[
                ("KIWI_CONTROLLER_DISCOVERY_NETWORKS", "10.0.0.0/8"),
                ("KIWI_CONTROLLER_ENABLE_SSH_FALLBACK", "true"),
                ("KIWI_CONTROLLER_SSH_SYS_ROOT", "relative/root"),
            ]),
        )
        .unwrap_err()
        .to_string();
        for field in ["discovery_networks", "ssh_key", "ssh_sys_root"] {
            assert!(e.contains(field), "{field} in {e}");
        }
        assert!(parse_networks("10.88.0.0/24, nonsense").is_err());
        assert!(parse_networks("").unwrap().is_empty());
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
    fn original_design_variables_are_honoured() {
        let none = Flags {
            config: Some(PathBuf::from("/dev/null")),
            ..Flags::default()
        };
        let c = Config::load(
            &none,
            env(&[
                ("DB_HOST", "db.lan"),
                ("DB_PORT", "5433"),
                ("DB_NAME", "lekiwi_robots"),
                ("DB_USER", "lekiwi"),
                ("DB_PASSWORD", "p@ss word"),
                ("REDIS_HOST", "cache.lan"),
                ("REDIS_DB", "2"),
            ]),
        )
        .unwrap();
        assert_eq!(
            c.database_url.as_deref(),
            Some("postgres://lekiwi:p%40ss%20word@db.lan:5433/lekiwi_robots")
        );
        assert_eq!(c.redis_url.as_deref(), Some("redis://cache.lan:6379/2"));
        // DATABASE_URL wins over DB_*, and KIWI_CONTROLLER_* over both.
        let c = Config::load(
            &none,
            env(&[
                ("DB_HOST", "db.lan"),
                ("DATABASE_URL", "postgres://a@b/c"),
                ("REDIS_URL", "redis://r:1/0"),
                ("KIWI_CONTROLLER_REDIS_URL", "redis://k:2/0"),
            ]),
        )
        .unwrap();
        assert_eq!(c.database_url.as_deref(), Some("postgres://a@b/c"));
        assert_eq!(c.redis_url.as_deref(), Some("redis://k:2/0"));
        let err = Config::load(&none, env(&[("DATABASE_URL", "mysql://x")])).unwrap_err();
        assert_eq!(err.0[0].field, "database_url");
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err =
            Config::load(&flags_with(Path::new("/nonexistent/kiwi.toml")), env(&[])).unwrap_err();
        assert_eq!(err.0[0].field, "<file>");
    }
}
