//! The LAN source of discovery rounds: sweep the configured networks
//! ([`sweep`](super::sweep)), then decide what each live host is.
//!
//! - A host whose agent is connected to this controller is that robot.
//! - A host with SSH open (and no agent port) is identified over SSH
//!   ([`ssh`](super::ssh)) when the fallback is on: its clues go through the
//!   rules the agent uses, so the robot gets the id its agent would give it,
//!   and the round records it (discovered, or its identity changed: a new
//!   address, say). A changed host key is flagged, never trusted.
//! - Anything else is a live host, recorded with what the sweep saw.
//!
//! SSH visits run in parallel (at most [`SSH_CONCURRENCY`]); each address
//! has its own circuit breaker in the probe, so a broken host is not
//! hammered round after round.

use super::SightingMethod;
use super::neighbours::format_mac;
use super::ssh::{SshError, SshProbe};
use super::sweep::{LiveHost, SweepSettings, sweep};
use super::{DiscoverySource, Outcome, Sighting};
use crate::metrics::Metrics;
use crate::sessions::SessionRegistry;
use futures_util::StreamExt;
use kiwi_protocol::RobotId;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// SSH identifications in flight at once.
pub const SSH_CONCURRENCY: usize = 16;

#[derive(Debug)]
pub struct LanSweep {
    pub settings: SweepSettings,
    /// `None`: the SSH fallback is off.
    pub ssh: Option<Arc<SshProbe>>,
    pub sessions: Arc<SessionRegistry>,
    pub metrics: Arc<Metrics>,
}

#[async_trait::async_trait]
impl DiscoverySource for LanSweep {
    fn method(&self) -> &'static str {
        "sweep"
    }

    async fn discover(&self) -> Result<Vec<Sighting>, String> {
        let report = sweep(&self.settings).await.map_err(|e| e.to_string())?;
        tracing::info!(
            hosts = report.hosts.len(),
            decided = report.decided_addresses,
            duration_ms = report.duration.as_millis() as u64,
            arp = report.arp_used,
            arp_fallback = ?report.arp_fallback,
            "sweep done"
        );
        let connected: HashMap<IpAddr, RobotId> = self
            .sessions
            .snapshot()
            .into_iter()
            .map(|s| (s.peer.ip(), s.robot_id))
            .collect();
        let mut sightings = Vec::with_capacity(report.hosts.len());
        let mut to_visit = Vec::new();
        for host in report.hosts {
            if let Some(id) = connected.get(&IpAddr::V4(host.ip)) {
                let mut s = host.sighting();
                s.robot_id = Some(*id);
                s.outcome = Outcome::Identified;
                s.detail = Some("its agent is connected".into());
                sightings.push(s);
            } else if host.ssh_port_open && !host.agent_port_open && self.ssh.is_some() {
                to_visit.push(host);
            } else {
                sightings.push(host.sighting());
            }
        }
        if let Some(ssh) = &self.ssh {
            let visited: Vec<Sighting> = futures_util::stream::iter(to_visit)
                .map(|host| {
                    let ssh = ssh.clone();
                    async move { visit(&ssh, &host).await }
                })
                .buffer_unordered(SSH_CONCURRENCY)
                .collect()
                .await;
            for s in &visited {
                if s.outcome == Outcome::HostKeyChanged {
                    self.metrics.ssh_host_key_mismatches.inc();
                }
            }
            sightings.extend(visited);
        }
        sightings.sort_by_key(|s| s.ip_address.parse::<IpAddr>().ok());
        Ok(sightings)
    }
}

/// Identifies one host over SSH.
async fn visit(ssh: &SshProbe, host: &LiveHost) -> Sighting {
    let mac = host.mac.as_ref().map(format_mac);
    match ssh.identify(IpAddr::V4(host.ip)).await {
        Ok(found) => {
            let mut facts = found.facts();
            if facts.mac_addresses.is_empty() {
                facts.mac_addresses = mac.iter().cloned().collect();
            }
            Sighting {
                ip_address: host.ip.to_string(),
                robot_id: Some(found.robot_id),
                method: SightingMethod::Ssh,
                mac_address: mac,
                robot_type: Some(facts.robot_type.clone()),
                detail: Some(found.found.type_decision.reason.clone()),
                facts: Some(facts),
                outcome: Outcome::Identified,
            }
        }
        Err(e) => {
            let outcome = match &e {
                SshError::HostKeyChanged { .. } => Outcome::HostKeyChanged,
                _ => Outcome::Failed,
            };
            tracing::debug!(ip = %host.ip, error = %e, "SSH identification failed");
            Sighting {
                ip_address: host.ip.to_string(),
                robot_id: None,
                method: SightingMethod::Ssh,
                mac_address: mac,
                robot_type: None,
                facts: None,
                outcome,
                detail: Some(e.to_string()),
            }
        }
    }
}
