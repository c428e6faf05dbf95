//! The systemd notification protocol (`sd_notify(3)`) for `Type=notify`
//! units: `READY=1` once the program serves, `WATCHDOG=1` at half the
//! unit's `WatchdogSec=` while its runtime answers, `STOPPING=1` when it
//! shuts down. Every call is a no-op when `NOTIFY_SOCKET` is not set (not
//! run by systemd), and a failure to notify is logged, never fatal.

use sd_notify::NotifyState;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn notify(state: NotifyState<'_>, what: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, &[state]) {
        tracing::warn!(error = %e, "cannot tell systemd {what}");
    }
}

/// Tells systemd that start-up is over and the program serves.
pub fn ready() {
    notify(NotifyState::Ready, "READY=1");
}

/// Tells systemd that the program is shutting down.
pub fn stopping() {
    notify(NotifyState::Stopping, "STOPPING=1");
}

/// The watchdog interval systemd asks for, if any: `WATCHDOG_USEC`, unless
/// `WATCHDOG_PID` names another process (as `sd_watchdog_enabled(3)` reads
/// them: an unset `WATCHDOG_PID` means this process).
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok()?.parse::<u64>().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Under systemd (`NOTIFY_SOCKET` set), a task of the current runtime that
/// pets the watchdog at half its interval while the unit has one (a runtime
/// that stops scheduling tasks stops petting, and systemd restarts the
/// program) and says `STOPPING=1` once `shutdown` is cancelled.
pub fn supervise(shutdown: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let mut pets = watchdog_interval().map(|interval| {
        tracing::info!(interval = ?interval, "systemd watchdog enabled");
        let mut tick = tokio::time::interval(interval / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    tokio::spawn(async move {
        loop {
            let pet = async {
                match &mut pets {
                    Some(tick) => {
                        tick.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => {
                    stopping();
                    return;
                }
                () = pet => notify(NotifyState::Watchdog, "WATCHDOG=1"),
            }
        }
    });
}
