//! Recovery probes of offline robots: a TCP connection to the port
//! `recovery_probe_port` of the address the robot was last seen at, every
//! `recovery_probe_interval`, through the robot's circuit breaker.
//!
//! A host that accepts or refuses the connection is there (a refusal is an
//! answer); a connection that times out or is unreachable is a failed
//! probe. The decisions (who is due, when failures in a row make an offline
//! robot `failed`, held while the network is degraded) are
//! [`crate::domain::recovery`]'s. A success does not bring the robot back:
//! only its agent does; it only starts the count of failures again.

use crate::breakers::Outcome;
use crate::domain::recovery::{Recovery, RecoverySettings, Verdict};
use crate::domain::{Input, LifecycleState};
use crate::fleet::{Context, Parts};
use crate::metrics::ResultLabels;
use crate::sessions::now_ms;
use futures_util::StreamExt as _;
use kiwi_protocol::RobotId;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Probes running at once.
const CONCURRENT_PROBES: usize = 32;

/// How long a probe may take: at most 2 s, and never longer than the
/// interval between probes.
fn probe_timeout(interval: Duration) -> Duration {
    interval.min(Duration::from_secs(2))
}

/// Whether a host answers a TCP connection to `address` within `timeout`.
pub async fn host_answers(address: SocketAddr, timeout: Duration) -> bool {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Err(_) => false,
    }
}

/// Runs the probes until `cancel`.
pub async fn run(p: Parts, settings: RecoverySettings, port: u16, cancel: CancellationToken) {
    if settings.interval.is_zero() {
        return;
    }
    let mut recovery = Recovery::new(settings);
    // Often enough that a robot is probed close to when it is due.
    let tick_every = (settings.interval / 4).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = probe_timeout(settings.interval);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let offline: Vec<(RobotId, Option<IpAddr>)> = p
            .cache
            .all()
            .iter()
            .filter(|r| r.state == LifecycleState::Offline)
            .map(|r| {
                let ip = r.ip_address.as_deref().and_then(|a| a.parse().ok());
                (r.robot_id, ip)
            })
            .collect();
        let due = recovery.due(now_ms(), offline.iter().map(|(id, _)| *id));
        if due.is_empty() {
            continue;
        }
        let targets: Vec<(RobotId, SocketAddr)> = due
            .into_iter()
            .filter_map(|id| {
                let ip = offline.iter().find(|(o, _)| *o == id)?.1?;
                Some((id, SocketAddr::new(ip, port)))
            })
            .collect();
        let results: Vec<(RobotId, SocketAddr, Option<bool>)> = futures_util::stream::iter(targets)
            .map(|(id, address)| {
                let p = &p;
                async move { (id, address, probe(p, id, address, timeout).await) }
            })
            .buffer_unordered(CONCURRENT_PROBES)
            .collect()
            .await;
        let degraded = p.sessions.network().is_degraded();
        for (id, address, answered) in results {
            let Some(reachable) = answered else {
                continue;
            };
            match recovery.record(id, reachable, degraded) {
                Verdict::Fail { failures } => {
                    let reason =
                        format!("{failures} recovery probes in a row found no host at {address}");
                    tracing::warn!(robot_id = %id, reason, "offline robot failed");
                    let input = Input::OfflineTooLong { reason };
                    if let Err(e) =
                        Box::pin(p.fleet.apply(id, input, &Context::new("recovery"))).await
                    {
                        tracing::warn!(robot_id = %id, error = %e, "could not record an unreachable robot as failed");
                    }
                }
                Verdict::Nothing => {
                    let failures = recovery.failures(&id);
                    if degraded && settings.fail_after > 0 && failures >= settings.fail_after {
                        tracing::debug!(
                            robot_id = %id,
                            failures,
                            "network degraded: an offline robot whose recovery probes keep failing is not failed"
                        );
                    }
                }
            }
        }
    }
}

/// One probe through the robot's circuit breaker: `None` when the breaker
/// refused it, else whether the host answered.
async fn probe(p: &Parts, id: RobotId, address: SocketAddr, timeout: Duration) -> Option<bool> {
    let outcome = |o: &'static str| ResultLabels { result: o };
    if let Err(refused) = p.breakers.allow(id, chrono::Utc::now()).await {
        tracing::debug!(robot_id = %id, retry_at = %refused.retry_at, "circuit open; recovery probe not sent");
        p.metrics
            .recovery_probes
            .get_or_create(&outcome("skipped"))
            .inc();
        return None;
    }
    let reachable = host_answers(address, timeout).await;
    let (label, result) = if reachable {
        ("reachable", Outcome::Success)
    } else {
        ("unreachable", Outcome::Failure)
    };
    p.metrics
        .recovery_probes
        .get_or_create(&outcome(label))
        .inc();
    p.breakers.record(id, result, chrono::Utc::now()).await;
    tracing::debug!(robot_id = %id, %address, reachable, "recovery probe");
    Some(reachable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_is_a_host_a_silent_address_is_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        assert!(host_answers(open, Duration::from_secs(2)).await);
        drop(listener);
        // Nothing listens there now: the kernel refuses, the host is up.
        assert!(host_answers(open, Duration::from_secs(2)).await);
        assert_eq!(
            probe_timeout(Duration::from_millis(500)),
            Duration::from_millis(500)
        );
        assert_eq!(
            probe_timeout(Duration::from_secs(15)),
            Duration::from_secs(2)
        );
    }
}
