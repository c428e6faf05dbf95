//! kiwi-agent: the robot-side daemon. It identifies the robot, samples its
//! telemetry and health, keeps every report in a durable outbox until the
//! controller acknowledges it, holds a link to the controller (over
//! WebSocket today) and obeys its lifecycle commands. `simulate` runs many
//! virtual agents through the same code.
//!
//! Codemap:
//!
//! - [`config`]: the layered, validated settings of `kiwi-agent run`;
//! - [`probe`]: identity, telemetry and health, read under a system root;
//! - [`workload`]: the robot's main service (a systemd unit);
//! - [`state`]: persisted flags (maintenance, provisioned configuration);
//! - [`outbox`]: the durable bounded outbox of reports;
//! - [`decide`]: the pure decisions (when to report, reconnect delays,
//!   handshake, reconciliation);
//! - [`agent`]: one agent's behaviour apart from its transport;
//! - [`link`]: the link to the controller (handshake, resending, heartbeats,
//!   commands, reconnecting), shared by `run` and `simulate`; it speaks the
//!   protocol over any [`transport`];
//! - [`transport`]: the [`transport::Connector`] and
//!   [`transport::Connection`] traits that carry frames, and their one
//!   implementation, WebSocket (the only module that knows it);
//! - [`announce`]: the robot on the LAN (mDNS service, UDP beacon) and
//!   finding the controller when `controller = "auto"`;
//! - [`simulate`]: many virtual agents in one process.

pub mod agent;
pub mod announce;
pub mod config;
pub mod credentials;
pub mod decide;
pub mod enroll;
pub mod link;
pub mod outbox;
pub mod probe;
pub mod simulate;
pub mod state;
pub mod transport;
pub mod workload;

pub use agent::Agent;
pub use config::{AgentConfig, ConfigError};
pub use link::LinkOptions;
pub use transport::WebSocketConnector;

use anyhow::Context;
use config::{ControllerSetting, ControllerUrl, Transport};
use credentials::Credentials;
use kiwi_protocol::backoff::Backoff;
use kiwi_security::verify::{ALPN_HTTP1, ALPN_QUIC};
use std::net::IpAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use transport::choose::ChosenConnector;
use transport::quic::QuicConnector;

/// The connector of one controller address over `transport`, presenting
/// `credentials`, connecting from `source` when given.
pub fn connector_for(
    url: &ControllerUrl,
    transport: Transport,
    credentials: &Arc<Credentials>,
    source: Option<IpAddr>,
) -> ChosenConnector {
    let mut websocket = WebSocketConnector::new(url, credentials.client_config(ALPN_HTTP1));
    websocket.source = source;
    let mut quic = QuicConnector::new(
        url.bare_host().to_string(),
        url.port,
        credentials.client_config(ALPN_QUIC),
    );
    quic.source = source;
    ChosenConnector::new(transport, websocket, quic)
}

/// `kiwi-agent run` once its configuration is valid: identifies the robot,
/// enrolls it if it has no certificate yet, opens its state and runs the
/// link until `shutdown` is cancelled.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    kiwi_security::install_crypto_provider();
    tracing::info!(
        controller = %cfg.controller,
        transport = cfg.transport.as_str(),
        state_dir = %cfg.state_dir.display(),
        sys_root = %cfg.sys_root.display(),
        workload_unit = cfg.workload_unit.as_deref().unwrap_or("-"),
        version = env!("CARGO_PKG_VERSION"),
        "kiwi-agent starting"
    );
    let mut opts = LinkOptions::new(Backoff::new(cfg.reconnect_base, cfg.reconnect_cap));
    let (connected, connected_rx) = tokio::sync::watch::channel(false);
    opts.connected = Some(connected);
    let (mut agent, cfg) =
        tokio::task::spawn_blocking(move || Agent::from_config(&cfg).map(|agent| (agent, cfg)))
            .await
            .context("agent set-up task failed")??;
    let stored = {
        let dir = cfg.state_dir.clone();
        tokio::task::spawn_blocking(move || Credentials::load(&dir))
            .await
            .context("credentials task failed")??
    };
    // The key exists before the robot enrolls: its fingerprint is
    // announced so that an operator can match a pending enrollment.
    let fingerprint = {
        let dir = cfg.state_dir.clone();
        tokio::task::spawn_blocking(move || credentials::load_or_create_key(&dir))
            .await
            .context("key task failed")??
    };
    let fingerprint = kiwi_security::pki::key_fingerprint(&fingerprint).to_string();
    let lan_shutdown = shutdown.child_token();
    let lan = announce::start(
        &cfg.announce,
        agent.identity(),
        Some(fingerprint),
        cfg.controller.is_auto(),
        connected_rx.clone(),
        lan_shutdown.clone(),
    )
    .await;
    // Running: the robot announces itself and keeps its reports from now
    // on, whether or not it is enrolled or connected yet.
    kiwi_service::systemd::ready();
    let credentials = match stored {
        Some(c) => Arc::new(c),
        None => match enroll_first(&cfg, &agent, &lan, &shutdown).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                lan_shutdown.cancel();
                lan.stopped().await;
                if shutdown.is_cancelled() {
                    tracing::info!(error = format!("{e:#}"), "stopped before enrolling");
                    return Ok(());
                }
                return Err(e);
            }
        },
    };
    if credentials.robot_id() != Some(agent.identity().robot_id.0) {
        anyhow::bail!(
            "the stored certificate names robot {} but this robot is {}: remove {} and enroll again",
            credentials
                .robot_id()
                .map_or_else(|| "-".into(), |r| r.to_string()),
            agent.identity().robot_id,
            cfg.state_dir.join(credentials::TLS_DIR).display()
        );
    }
    opts.credentials = Some(credentials.clone());
    match &cfg.controller {
        ControllerSetting::Url(url) => {
            let connector = connector_for(url, cfg.transport, &credentials, None);
            link::run(&mut agent, &connector, &opts, &shutdown).await;
        }
        ControllerSetting::Auto => {
            let (transport, creds) = (cfg.transport, credentials.clone());
            let connector = announce::AutoConnector::new(&cfg.state_dir, lan.finds(), move |url| {
                connector_for(url, transport, &creds, None)
            });
            let mut connected = connected_rx;
            let remember = async {
                while connected.changed().await.is_ok() {
                    if *connected.borrow_and_update() {
                        connector.welcomed().await;
                    }
                }
            };
            tokio::select! {
                () = link::run(&mut agent, &connector, &opts, &shutdown) => {}
                () = remember => {}
            }
        }
    }
    lan_shutdown.cancel();
    lan.stopped().await;
    tracing::info!("kiwi-agent stopped");
    Ok(())
}

/// Enrolls a robot that has no certificate: with its fixed controller, or
/// with the controllers found on the LAN one after the other
/// (`controller = "auto"`).
async fn enroll_first(
    cfg: &AgentConfig,
    agent: &Agent,
    lan: &announce::Lan,
    shutdown: &CancellationToken,
) -> anyhow::Result<Credentials> {
    let token = cfg.enroll_token.as_ref();
    if let ControllerSetting::Url(url) = &cfg.controller {
        return enroll::enroll(
            &cfg.state_dir,
            agent.identity(),
            url,
            token,
            None,
            None,
            shutdown,
        )
        .await;
    }
    let backoff = Backoff::new(cfg.reconnect_base, cfg.reconnect_cap);
    let mut attempt = 0;
    loop {
        let Some(url) = announce::first_controller(lan.finds(), shutdown).await else {
            anyhow::bail!("stopped while looking for a controller");
        };
        match enroll::enroll(
            &cfg.state_dir,
            agent.identity(),
            &url,
            token,
            Some(3),
            None,
            shutdown,
        )
        .await
        {
            Ok(c) => return Ok(c),
            Err(e) if shutdown.is_cancelled() => return Err(e),
            Err(e) => tracing::warn!(
                controller = %url,
                error = format!("{e:#}"),
                "cannot enroll with this controller; looking for another"
            ),
        }
        tokio::select! {
            () = shutdown.cancelled() => anyhow::bail!("stopped while enrolling"),
            () = tokio::time::sleep(backoff.delay(attempt, rand::random::<f64>())) => {}
        }
        attempt = attempt.saturating_add(1);
    }
}
