//! `kiwi-controller serve`: builds the components from the configuration,
//! binds both listeners, runs until the shutdown token is cancelled, then
//! drains under a grace timeout. This is the only place that wires things
//! together.

use crate::api::{self, AppState};
use crate::breakers::Breakers;
use crate::cache::RobotCache;
use crate::cache::redis::{CacheTtls, RedisCache};
use crate::cache::shared::SharedCache;
use crate::config::Config;
use crate::discovery::announce::{self, AnnounceSettings, AnnouncedAgents, Sightings};
use crate::discovery::lan::LanSweep;
use crate::discovery::ssh::{self, SshProbe, SshSettings};
use crate::discovery::sweep::SweepSettings;
use crate::discovery::{ConnectedAgents, Discovery, DiscoverySource};
use crate::domain::Policy;
use crate::fleet::{Fleet, Parts};
use crate::link::{self, LinkConfig, LinkState};
use crate::liveness::{self, LivenessConfig};
use crate::metrics::Metrics;
use crate::security::{AbuseLimits, AgentAuth, ControllerPki, ServerNames};
use crate::sessions::SessionRegistry;
use crate::store::EventStore;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::watch::{self, Hub};
use anyhow::Context as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long in-flight work may take to finish after shutdown was asked.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The embedded store's file inside the state directory.
pub const DATABASE_FILE: &str = "kiwi.db";

/// Where the servers listen (resolved, after binding).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub api: SocketAddr,
    pub agent: SocketAddr,
}

/// Opens the configured event store (running its migrations): PostgreSQL
/// when a database is configured, else the embedded SQLite file in the state
/// directory.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn EventStore>> {
    if let Some(url) = &config.database_url {
        let store = PostgresStore::connect(url, config.db_pool_size)
            .await
            .with_context(|| format!("cannot open the PostgreSQL store at {}", redact(url)))?;
        tracing::info!(database = %redact(url), pool = config.db_pool_size, "PostgreSQL store open");
        return Ok(Arc::new(store));
    }
    let dir = &config.state_dir;
    let open_to_others = kiwi_service::state::ensure_private_dir(dir)
        .with_context(|| format!("cannot create state directory {}", dir.display()))?;
    if let Some(mode) = open_to_others {
        tracing::warn!(state_dir = %dir.display(), mode = format!("{mode:o}"), "the state directory is open to other users (make it 0700); the files kiwi keeps in it are 0600");
    }
    let db = dir.join(DATABASE_FILE);
    let store = SqliteStore::open(&db)
        .await
        .with_context(|| format!("cannot open the embedded store {}", db.display()))?;
    // Made by an earlier version under a looser umask: private now.
    let files = ["", "-wal", "-shm"].map(|s| dir.join(format!("{DATABASE_FILE}{s}")));
    kiwi_service::state::make_private(&files.each_ref().map(|p| p.as_path()))
        .with_context(|| format!("cannot make the embedded store {} private", db.display()))?;
    tracing::info!(store = %db.display(), "embedded store open");
    Ok(Arc::new(store))
}

/// A database URL without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Every long-lived component of a controller, built from its
/// configuration but not yet running. `serve` runs them; tests and the
/// benchmark build the same thing in-process.
#[derive(Debug, Clone)]
pub struct Components {
    pub config: Config,
    pub store: Arc<dyn EventStore>,
    pub metrics: Arc<Metrics>,
    pub cache: Arc<RobotCache>,
    pub sessions: Arc<SessionRegistry>,
    pub breakers: Arc<Breakers>,
    /// Redis in front of the store, when configured.
    pub shared_cache: Option<SharedCache>,
    pub fleet: Fleet,
    pub hub: Hub,
    pub discovery: Discovery,
    /// Agents heard announcing themselves (mDNS, beacons).
    pub sightings: Sightings,
    /// The CA and server certificate.
    pub pki: Arc<ControllerPki>,
    pub limits: Arc<AbuseLimits>,
    pub agent_auth: Arc<AgentAuth>,
    pub shutdown: CancellationToken,
}

impl Components {
    /// Opens the store in the state directory and loads the read model.
    pub async fn build(config: Config, shutdown: CancellationToken) -> anyhow::Result<Components> {
        let store = open_store(&config).await?;
        let metrics = Arc::new(Metrics::new());
        let pki = {
            let (dir, names) = (
                config.state_dir.clone(),
                ServerNames::from_config(&config.security.tls_names),
            );
            Arc::new(
                tokio::task::spawn_blocking(move || {
                    ControllerPki::load_or_create(&dir, names, std::time::SystemTime::now())
                })
                .await
                .context("the CA set-up task failed")??,
            )
        };
        let limits = Arc::new(AbuseLimits::new(config.security.limits(), metrics.clone()));
        let agent_auth = Arc::new(AgentAuth::new(pki.clone(), limits.clone(), metrics.clone()));
        let cache = Arc::new(RobotCache::new(metrics.clone()));
        let sessions = Arc::new(SessionRegistry::default());
        let breakers = Arc::new(Breakers::new(
            config.circuit,
            store.clone(),
            metrics.clone(),
        ));
        // Redis, when configured, holds the discovery leases; it also caches
        // rows unless `enable_cache` is off (refilled from the read model
        // once it is loaded).
        let redis = match &config.redis_url {
            Some(url) => Some(
                RedisCache::connect_lazy(
                    url,
                    &config.redis_prefix,
                    CacheTtls {
                        static_ttl: config.cache_static_ttl,
                        dynamic_ttl: config.cache_dynamic_ttl,
                    },
                    metrics.clone(),
                )
                .context("invalid redis_url")?,
            ),
            None => None,
        };
        let fleet = Fleet::new(
            store.clone(),
            cache.clone(),
            sessions.clone(),
            metrics.clone(),
            breakers.clone(),
            Policy {
                auto_provision: config.auto_provision,
            },
            config.report_interval,
        );
        let robots = fleet.load().await.context("cannot load the read model")?;
        tracing::info!(robots, "read model loaded");
        let shared_cache = match (&redis, config.enable_cache) {
            (Some(redis), true) => {
                tracing::info!(prefix = %config.redis_prefix, "shared cache: Redis");
                let shared = SharedCache::new(redis.clone(), cache.clone());
                fleet.set_shared_cache(shared.clone());
                Some(shared)
            }
            _ => None,
        };
        let mut sources: Vec<Box<dyn DiscoverySource>> = Vec::new();
        if config.discovery.enable_websocket_discovery {
            sources.push(Box::new(ConnectedAgents {
                sessions: sessions.clone(),
            }));
        }
        let sightings = Sightings::with_stats(metrics.announce.clone());
        let lan = &config.discovery;
        if lan.enable_mdns || lan.enable_udp_broadcast {
            sources.push(Box::new(AnnouncedAgents {
                sightings: sightings.clone(),
                max_age: announce::DEFAULT_SIGHTING_TTL,
            }));
        }
        if !lan.networks.is_empty() {
            let ssh = if lan.enable_ssh_fallback {
                let key = lan
                    .ssh_key
                    .clone()
                    .context("enable_ssh_fallback needs ssh_key")?;
                let known_hosts = lan
                    .ssh_known_hosts
                    .clone()
                    .unwrap_or_else(|| config.state_dir.join(ssh::KNOWN_HOSTS_FILE));
                let mut settings = SshSettings::new(key, known_hosts);
                settings.user = lan.ssh_user.clone();
                settings.port = lan.ssh_port;
                settings.sys_root = lan.ssh_sys_root.clone();
                settings.connect_timeout = lan.ssh_connect_timeout;
                settings.command_timeout = lan.ssh_command_timeout;
                Some(Arc::new(
                    SshProbe::new(settings).context("cannot set up the SSH fallback")?,
                ))
            } else {
                None
            };
            let settings = SweepSettings {
                networks: lan.networks.clone(),
                agent_port: config.agent_listen.port(),
                ssh_port: lan.ssh_port,
                use_neighbour_table: lan.enable_arp_cache_check,
                // Its own ARP requests whenever the process may (else TCP).
                use_arp: true,
                arp_timeout: lan.sweep_arp_timeout,
                connect_timeout: lan.sweep_connect_timeout,
                concurrency: lan.sweep_concurrency,
                ..SweepSettings::default()
            };
            tracing::info!(networks = ?lan.networks, ssh = ssh.is_some(), "LAN sweep configured");
            sources.push(Box::new(LanSweep {
                settings,
                ssh,
                sessions: sessions.clone(),
                metrics: metrics.clone(),
            }));
        }
        let mut discovery = Discovery::new(
            fleet.clone(),
            store.clone(),
            cache.clone(),
            metrics.clone(),
            sources,
        );
        if let Some(redis) = &redis {
            // Unique per process: a restarted controller is a new holder.
            let holder = format!("controller-{}", uuid::Uuid::new_v4().simple());
            discovery = discovery.with_leases(redis.leases(), holder);
        }
        Ok(Components {
            config,
            store,
            metrics,
            cache,
            sessions,
            breakers,
            shared_cache,
            fleet,
            hub: Hub::new(),
            discovery,
            sightings,
            pki,
            limits,
            agent_auth,
            shutdown,
        })
    }

    /// The REST API router. It keeps its own cache of API tokens: build
    /// it once per server.
    pub fn api_router(&self) -> axum::Router {
        api::router(AppState {
            fleet: self.fleet.clone(),
            store: self.store.clone(),
            cache: self.cache.clone(),
            sessions: self.sessions.clone(),
            breakers: self.breakers.clone(),
            shared_cache: self.shared_cache.clone(),
            metrics: self.metrics.clone(),
            hub: self.hub.clone(),
            discovery: self.discovery.clone(),
            started: Instant::now(),
            body_limit: self.config.api_body_limit,
            watch_queue: self.config.watch_client_queue,
            shutdown: self.shutdown.clone(),
            api_auth: Arc::new(crate::security::ApiAuth::new(
                self.store.auth(),
                self.limits.clone(),
            )),
            pki: self.pki.clone(),
            agent_auth: self.agent_auth.clone(),
            metrics_require_token: self.config.security.metrics_require_token,
        })
    }

    /// The API port's limits: its connection cap within what the
    /// open-files limit now in force leaves beside `max_agents`
    /// ([`api::server::connection_budget`]).
    pub fn api_server_settings(&self) -> api::server::ServerSettings {
        let c = &self.config;
        let max_connections = match kiwi_service::limits::current_nofile() {
            Ok(nofile) => {
                let budget =
                    api::server::connection_budget(nofile, c.max_agents, c.api_max_connections);
                if budget < c.api_max_connections {
                    tracing::warn!(
                        open_files = nofile,
                        max_agents = c.max_agents,
                        api_max_connections = c.api_max_connections,
                        capped_at = budget,
                        "the open-files limit leaves the API fewer connections than api_max_connections beside max_agents agents (raise LimitNOFILE)"
                    );
                }
                budget
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the open-files limit");
                c.api_max_connections
            }
        };
        tracing::info!(
            max_connections,
            per_address = c.api_max_connections_per_address,
            "API connection caps"
        );
        api::server::ServerSettings {
            max_connections,
            max_connections_per_address: c.api_max_connections_per_address,
            header_read_timeout: c.api_header_read_timeout,
            idle_timeout: c.api_idle_timeout,
        }
    }

    /// The fleet and its parts, for the tasks that act on it beside the
    /// API and the link.
    pub fn parts(&self) -> Parts {
        Parts {
            fleet: self.fleet.clone(),
            sessions: self.sessions.clone(),
            cache: self.cache.clone(),
            breakers: self.breakers.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// The agent endpoint's shared state.
    pub fn link_state(&self) -> Arc<LinkState> {
        Arc::new(LinkState {
            fleet: self.fleet.clone(),
            sessions: self.sessions.clone(),
            breakers: self.breakers.clone(),
            auth: self.agent_auth.clone(),
            enroller: Arc::new(crate::security::Enroller {
                store: self.store.auth(),
                pki: self.pki.clone(),
                limits: self.limits.clone(),
                metrics: self.metrics.clone(),
                agent_auth: self.agent_auth.clone(),
                fleet: self.fleet.clone(),
                sessions: self.sessions.clone(),
                cert_ttl: self.config.security.client_cert_ttl,
                pending: self.config.security.pending_limits(),
            }),
            metrics: self.metrics.clone(),
            config: LinkConfig {
                heartbeat_interval: self.config.heartbeat_interval,
                handshake_timeout: Duration::from_secs(10),
                max_frame: kiwi_protocol::DEFAULT_MAX_FRAME,
                max_agents: self.config.max_agents,
                max_arrivals: self.config.max_arrivals,
                report_rate: self.config.agent_report_rate,
                report_burst: self.config.agent_report_burst,
            },
            arrivals: Arc::new(tokio::sync::Semaphore::new(self.config.max_arrivals)),
            shutdown: self.shutdown.clone(),
        })
    }

    /// Starts the background tasks (projector, liveness, continuous
    /// discovery) on `tasks`; they stop when `shutdown` is cancelled.
    pub fn spawn_background(&self, tasks: &TaskTracker) {
        tasks.spawn(watch::run_projector(
            self.store.clone(),
            self.cache.clone(),
            self.hub.clone(),
            self.shutdown.clone(),
        ));
        tasks.spawn(crate::recovery::run(
            self.parts(),
            self.config.recovery,
            self.config.recovery_probe_port,
            self.shutdown.clone(),
        ));
        tasks.spawn(liveness::run(
            self.parts(),
            LivenessConfig {
                timeout: self.config.liveness_timeout,
                startup_grace: self.config.startup_grace,
                heartbeat: self.config.heartbeat_interval,
                detector: crate::domain::detector::DetectorSettings::for_heartbeat(
                    self.config.heartbeat_interval,
                ),
                offline_fail_after: self.config.offline_fail_after,
                damping: crate::domain::damping::DampingSettings {
                    share: self.config.outage_share,
                    ..Default::default()
                },
                host_port: self.config.recovery_probe_port,
            },
            self.shutdown.clone(),
        ));
        tasks.spawn(
            self.discovery
                .clone()
                .run(self.config.discovery_interval, self.shutdown.clone()),
        );
        tasks.spawn(crate::security::upkeep::run(
            self.store.auth(),
            self.agent_auth.clone(),
            self.sessions.clone(),
            self.pki.clone(),
            self.limits.clone(),
            self.config.security.pending_enrollment_ttl,
            self.shutdown.clone(),
        ));
    }
}

/// Runs the controller until `shutdown` is cancelled. `on_bound` hears the
/// addresses once both listeners are bound.
pub async fn serve(
    config: Config,
    shutdown: CancellationToken,
    on_bound: impl FnOnce(Bound),
) -> anyhow::Result<()> {
    let c = Components::build(config, shutdown.clone()).await?;
    let api_listener = TcpListener::bind(c.config.api_listen)
        .await
        .with_context(|| format!("cannot listen on {} (api_listen)", c.config.api_listen))?;
    let agent_listener = TcpListener::bind(c.config.agent_listen)
        .await
        .with_context(|| format!("cannot listen on {} (agent_listen)", c.config.agent_listen))?;
    let bound = Bound {
        api: api_listener.local_addr()?,
        agent: agent_listener.local_addr()?,
    };
    let tasks = TaskTracker::new();
    c.spawn_background(&tasks);
    let lan = &c.config.discovery;
    let mut announce = AnnounceSettings::new(bound.agent);
    announce.mdns = lan.enable_mdns;
    announce.beacon = lan.enable_udp_broadcast;
    announce.beacon_listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, lan.beacon_port));
    if announce.enabled() {
        let announcer = announce::start(announce, c.sightings.clone(), shutdown.clone()).await?;
        tasks.spawn(announcer.run());
    }
    let api_server = tokio::spawn(api::server::serve(
        api_listener,
        c.api_router(),
        c.api_server_settings(),
        c.metrics.clone(),
        shutdown.clone(),
    ));
    let link_state = c.link_state();
    // QUIC on the same port number, UDP side.
    let quic_server = if c.config.security.enable_quic {
        let settings = link::quic::QuicSettings {
            keep_alive: c.config.heartbeat_interval,
            idle_timeout: c.config.liveness_timeout,
            max_frame: kiwi_protocol::DEFAULT_MAX_FRAME,
        };
        let endpoint = link::quic::endpoint(
            bound.agent,
            c.pki.server_config(kiwi_security::verify::ALPN_QUIC),
            &settings,
        )?;
        Some(tokio::spawn(link::quic::serve(
            endpoint,
            link_state.clone(),
        )))
    } else {
        None
    };
    let tls = Arc::new(c.pki.server_config(kiwi_security::verify::ALPN_HTTP1));
    let agent_server = tokio::spawn(link::serve(agent_listener, link_state, tls));
    tracing::info!(api = %bound.api, agent = %bound.agent, "kiwi-controller listening");
    on_bound(bound);

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    c.sessions.close_all("controller shutting down");
    tasks.close();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = api_server.await;
        let _ = agent_server.await;
        if let Some(quic) = quic_server {
            let _ = quic.await;
        }
        tasks.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; leaving anyway");
    }
    Ok(())
}

/// Cancels `token` on SIGTERM or SIGINT.
pub async fn cancel_on_signal(token: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "stop requested"),
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "stop requested"),
    }
    token.cancel();
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_the_log() {
        assert_eq!(
            redact("postgres://kiwi:s3cret@db:5432/kiwi"),
            "postgres://kiwi:***@db:5432/kiwi"
        );
        assert_eq!(redact("postgres://kiwi@db/kiwi"), "postgres://kiwi@db/kiwi");
        assert_eq!(redact("postgres://db/kiwi"), "postgres://db/kiwi");
    }
}
