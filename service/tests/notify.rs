//! The notification protocol against a fake systemd: a datagram socket
//! named by `NOTIFY_SOCKET`. A test binary of its own with one test, since
//! it sets the process environment.

use kiwi_service::systemd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The next notification on `socket`.
async fn next(socket: &tokio::net::UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
        .await
        .expect("a notification in time")
        .expect("a notification");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn notifies_ready_watchdog_and_stopping_on_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_nonblocking(true).unwrap();
    #[allow(unsafe_code)]
    // SAFETY: this is the only test of this binary and no other thread
    // exists yet, so nothing reads the environment while it changes.
    unsafe {
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", "200000");
        std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let socket = tokio::net::UnixDatagram::from_std(socket).unwrap();
        systemd::ready();
        assert_eq!(next(&socket).await, "READY=1\n");
        assert_eq!(
            systemd::watchdog_interval(),
            Some(Duration::from_millis(200))
        );
        let shutdown = CancellationToken::new();
        systemd::supervise(shutdown.clone());
        // Pets at half the interval: one at once, one 100 ms later, ...
        assert_eq!(next(&socket).await, "WATCHDOG=1\n");
        assert_eq!(next(&socket).await, "WATCHDOG=1\n");
        // ... until the shutdown.
        shutdown.cancel();
        let mut last = next(&socket).await;
        while last == "WATCHDOG=1\n" {
            last = next(&socket).await;
        }
        assert_eq!(last, "STOPPING=1\n");
    });
}
