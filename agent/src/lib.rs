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
pub mod decide;
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
use config::{ControllerSetting, Transport};
use kiwi_protocol::backoff::Backoff;
use tokio_util::sync::CancellationToken;

/// `kiwi-agent run` once its configuration is valid: identifies the robot,
/// opens its state and runs the link until `shutdown` is cancelled.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    tracing::info!(
        controller = %cfg.controller,
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
    let lan_shutdown = shutdown.child_token();
    let lan = announce::start(
        &cfg.announce,
        agent.identity(),
        cfg.controller.is_auto(),
        connected_rx.clone(),
        lan_shutdown.clone(),
    )
    .await;
    match (&cfg.controller, cfg.transport) {
        (ControllerSetting::Url(url), Transport::WebSocket) => {
            let connector = WebSocketConnector::new(url.endpoint());
            link::run(&mut agent, &connector, &opts, &shutdown).await;
        }
        (ControllerSetting::Auto, Transport::WebSocket) => {
            let connector =
                announce::AutoConnector::new(&cfg.state_dir, lan.finds(), WebSocketConnector::new);
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
