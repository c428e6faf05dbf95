//! The notification protocol against a fake systemd: a datagram socket
//! named by `NOTIFY_SOCKET`. A test binary of its own with one test, since
//! it sets the process environment.

use kiwi_service::systemd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[test]
fn notifies_ready_watchdog_and_stopping_on_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    #[allow(unsafe_code)]
    // SAFETY: this is the only test of this binary and no other thread
    // exists yet, so nothing reads the environment while it changes.
    unsafe {
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", "200000");
        std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
    }
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };

    systemd::ready();
    assert_eq!(next(), "READY=1\n");
    assert_eq!(
        systemd::watchdog_interval(),
        Some(Duration::from_millis(200))
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let shutdown = CancellationToken::new();
    rt.block_on(async {
        systemd::supervise(shutdown.clone());
        tokio::time::sleep(Duration::from_millis(250)).await;
        shutdown.cancel();
        // The task says STOPPING=1 as soon as it runs again.
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    });
    // Pets at half the interval: one at once, one 100 ms later, ...
    assert_eq!(next(), "WATCHDOG=1\n");
    assert_eq!(next(), "WATCHDOG=1\n");
    // ... until the shutdown.
    let mut last = next();
    while last == "WATCHDOG=1\n" {
        last = next();
    }
    assert_eq!(last, "STOPPING=1\n");
}
