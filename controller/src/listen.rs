//! Accepting TCP connections, the same way on the API port and the agent
//! port: a failed accept (out of file descriptors, most often) is logged
//! and followed by a pause that grows (the one backoff policy, 10 ms to
//! 1 s) instead of a spin that would take a core while nothing can be
//! accepted.

use kiwi_protocol::backoff::Backoff;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Pauses after failed accepts.
const ACCEPT_BACKOFF: Backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));

/// Accepts on one listener, pausing after failures.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    /// What it accepts, for the log (`API`, `agent`).
    what: &'static str,
    failures: u32,
}

impl Acceptor {
    pub fn new(listener: TcpListener, what: &'static str) -> Self {
        Acceptor {
            listener,
            what,
            failures: 0,
        }
    }

    /// The next connection; retries (after a pause) until one comes.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.failures = 0;
                    return accepted;
                }
                Err(e) => {
                    let wait = ACCEPT_BACKOFF.delay(self.failures, rand::random::<f64>());
                    self.failures = self.failures.saturating_add(1);
                    tracing::warn!(error = %e, retry_in = ?wait, port = self.what, "accepting a connection failed");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}
