//! The security chores of a running controller: follow revocations made
//! anywhere (this controller's API, another controller on the same
//! database, the CLI) and end the sessions they concern; renew the server
//! certificate before it expires; forget idle abuse-limit buckets and the
//! enrollment requests nobody asked about for `pending_enrollment_ttl`.

use super::{AbuseLimits, AgentAuth, ControllerPki};
use crate::sessions::SessionRegistry;
use crate::store::auth::AuthStore;
use chrono::Utc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// How often revocations are read from the store.
pub const REVOCATION_REFRESH: Duration = Duration::from_secs(5);

/// How often the server certificate's expiry is checked.
pub const RENEWAL_CHECK: Duration = Duration::from_secs(3600);

/// How often stale enrollment requests are forgotten.
pub const ENROLLMENT_EXPIRY_CHECK: Duration = Duration::from_secs(60);

/// Runs until `shutdown` is cancelled; pending enrollment requests not
/// asked about for `pending_ttl` are forgotten.
pub async fn run(
    store: Arc<dyn AuthStore>,
    auth: Arc<AgentAuth>,
    sessions: Arc<SessionRegistry>,
    pki: Arc<ControllerPki>,
    limits: Arc<AbuseLimits>,
    pending_ttl: Duration,
    shutdown: CancellationToken,
) {
    let mut revocations = tokio::time::interval(REVOCATION_REFRESH);
    revocations.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renewal = tokio::time::interval(RENEWAL_CHECK);
    renewal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first round a period after the start: nothing is due at once.
    let period = ENROLLMENT_EXPIRY_CHECK
        .min(pending_ttl / 2)
        .max(Duration::from_millis(100));
    let mut expiry = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = expiry.tick() => {
                let before = chrono::Duration::from_std(pending_ttl)
                    .ok()
                    .and_then(|ttl| Utc::now().checked_sub_signed(ttl));
                if let Some(before) = before {
                    match store.expire_enrollments(before).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(expired = n, ttl = ?pending_ttl, "forgot enrollment requests nobody asked about"),
                        Err(e) => tracing::warn!(error = %e, "cannot expire enrollment requests"),
                    }
                }
            }
            _ = revocations.tick() => {
                match store.revoked_serials(Utc::now()).await {
                    Ok(serials) => {
                        let new = auth.set_revoked(serials);
                        if !new.is_empty() {
                            end_revoked_sessions(&sessions, &new);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read revoked certificates; keeping the known ones"),
                }
                limits.tidy();
            }
            _ = renewal.tick() => {
                let pki = pki.clone();
                match tokio::task::spawn_blocking(move || pki.renew_if_due(SystemTime::now())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::error!(error = format!("{e:#}"), "cannot renew the server certificate"),
                    Err(e) => tracing::error!(error = %e, "server certificate renewal task failed"),
                }
            }
        }
    }
}

/// Ends every session whose certificate is among `serials`.
pub fn end_revoked_sessions(sessions: &SessionRegistry, serials: &[String]) {
    for session in sessions.snapshot() {
        if session
            .cert_serial
            .as_ref()
            .is_some_and(|s| serials.contains(s))
        {
            tracing::info!(robot_id = %session.robot_id, "certificate revoked: ending the robot's session");
            session.close("certificate revoked");
        }
    }
}
