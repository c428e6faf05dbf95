//! Attacks on the real controller binary, as an outsider on the network
//! would make them, each with the answer kiwi must give. One test per
//! hole found (and closed); the file grows with every new one.
//!
//! Every test starts its own controller on loopback; addresses other than
//! 127.0.0.1 used as sources are loopback addresses too (127.0.0.0/8).

use std::time::Duration;

use kiwi_tests::ControllerOptions;
use kiwi_tests::raw_http::KeepAlive;

/// How long one answer may take before the attack counts as a hang.
const ANSWER: Duration = Duration::from_secs(10);

/// The sample lines of a Prometheus text exposition (one per series).
fn series(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.rsplit_once(' ').map_or(l, |(name, _)| name))
        .collect()
}

/// Sends `count` requests with made-up methods (`M<n>XXX /healthz`, no
/// token) over `connections` kept-alive connections.
async fn made_up_methods(
    addr: std::net::SocketAddr,
    first: usize,
    count: usize,
    connections: usize,
) {
    let per = count.div_ceil(connections);
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            tokio::spawn(async move {
                let mut conn = KeepAlive::connect(addr).await.expect("connect");
                let start = first + c * per;
                for n in start..(start + per).min(first + count) {
                    let head = format!("M{n:09}XXX /healthz HTTP/1.1\r\nHost: kiwi\r\n\r\n");
                    let answer = conn.exchange(&head, ANSWER).await.expect("an answer");
                    assert_eq!(answer.status.as_u16(), 405, "{}", answer.body);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a sender");
    }
}

/// 1. Metric label flood: before, every made-up HTTP method became a new
///    series of `api_request_duration_seconds` (20,000 of them grew
///    `/metrics` by 76 MB). Now methods outside the standard set are
///    `other`: 20,000 distinct methods add no series and almost no bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_http_methods_add_no_metric_series() {
    let controller = ControllerOptions::new().start().await;
    let api = controller.api();
    let addr = controller.api_addr();
    // The series this test's own requests create: one made-up method, and
    // a scrape (counted after it answers, so seen by the next one).
    made_up_methods(addr, 0, 1, 1).await;
    api.metrics_text().await.expect("GET /metrics");
    let before = api.metrics_text().await.expect("GET /metrics");

    made_up_methods(addr, 1, 20_000, 8).await;

    let after = api.metrics_text().await.expect("GET /metrics");
    assert_eq!(series(&before), series(&after), "the set of series changed");
    assert!(
        after.len() <= before.len() + 512,
        "/metrics grew from {} to {} bytes",
        before.len(),
        after.len()
    );
    let other = kiwi_tests::api::metric_sum(
        &after,
        "api_request_duration_seconds_count",
        &[
            ("method", "other"),
            ("route", "/healthz"),
            ("status", "405"),
        ],
    );
    assert_eq!(other, 20_001.0, "every made-up method counted as other");
}
