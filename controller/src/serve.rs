//! `kiwi-controller serve`: builds the components from the configuration,
//! binds both listeners, runs until the shutdown token is cancelled, then
//! drains under a grace timeout. This is the only place that wires things
//! together.

use crate::api::{self, AppState};
use crate::cache::RobotCache;
use crate::config::Config;
use crate::discovery::{ConnectedAgents, Discovery};
use crate::domain::Policy;
use crate::fleet::Fleet;
use crate::link::session::SessionRegistry;
use crate::link::{self, LinkConfig, LinkState};
use crate::liveness::{self, LivenessConfig};
use crate::metrics::Metrics;
use crate::store::EventStore;
use crate::store::sqlite::SqliteStore;
use crate::watch::{self, Hub};
use anyhow::Context as _;
use std::net::SocketAddr;
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

/// Runs the controller until `shutdown` is cancelled. `on_bound` hears the
/// addresses once both listeners are bound.
pub async fn serve(
    config: Config,
    shutdown: CancellationToken,
    on_bound: impl FnOnce(Bound),
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "cannot create state directory {}",
            config.state_dir.display()
        )
    })?;
    let db = config.state_dir.join(DATABASE_FILE);
    let store: Arc<dyn EventStore> = Arc::new(
        SqliteStore::open(&db)
            .await
            .with_context(|| format!("cannot open the embedded store {}", db.display()))?,
    );
    let metrics = Arc::new(Metrics::new());
    let cache = Arc::new(RobotCache::new(metrics.clone()));
    let sessions = Arc::new(SessionRegistry::default());
    let fleet = Fleet::new(
        store.clone(),
        cache.clone(),
        sessions.clone(),
        metrics.clone(),
        Policy {
            auto_provision: config.auto_provision,
        },
        config.report_interval,
    );
    let robots = fleet.load().await.context("cannot load the read model")?;
    tracing::info!(robots, store = %db.display(), "read model loaded");

    let api_listener = TcpListener::bind(config.api_listen)
        .await
        .with_context(|| format!("cannot listen on {} (api_listen)", config.api_listen))?;
    let agent_listener = TcpListener::bind(config.agent_listen)
        .await
        .with_context(|| format!("cannot listen on {} (agent_listen)", config.agent_listen))?;
    let bound = Bound {
        api: api_listener.local_addr()?,
        agent: agent_listener.local_addr()?,
    };

    let hub = Hub::new();
    let tasks = TaskTracker::new();
    tasks.spawn(watch::run_projector(
        store.clone(),
        cache.clone(),
        hub.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(liveness::run(
        fleet.clone(),
        LivenessConfig {
            timeout: config.liveness_timeout,
            startup_grace: config.startup_grace,
        },
        shutdown.clone(),
    ));
    let discovery = Discovery::new(
        fleet.clone(),
        metrics.clone(),
        vec![Box::new(ConnectedAgents {
            fleet: fleet.clone(),
        })],
    );
    tasks.spawn(
        discovery
            .clone()
            .run(config.discovery_interval, shutdown.clone()),
    );

    let app = api::router(AppState {
        fleet: fleet.clone(),
        metrics: metrics.clone(),
        hub,
        discovery,
        started: Instant::now(),
        body_limit: config.api_body_limit,
        shutdown: shutdown.clone(),
    });
    let link_state = Arc::new(LinkState {
        fleet: fleet.clone(),
        metrics: metrics.clone(),
        config: LinkConfig {
            heartbeat_interval: config.heartbeat_interval,
            handshake_timeout: Duration::from_secs(10),
            max_frame: kiwi_protocol::DEFAULT_MAX_FRAME,
            max_agents: config.max_agents,
        },
        shutdown: shutdown.clone(),
    });
    let api_server = tokio::spawn(
        axum::serve(api_listener, app)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future(),
    );
    let agent_server = tokio::spawn(link::serve(agent_listener, link_state));
    tracing::info!(api = %bound.api, agent = %bound.agent, "kiwi-controller listening");
    on_bound(bound);

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    sessions.close_all("controller shutting down");
    tasks.close();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = api_server.await;
        let _ = agent_server.await;
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
