//! Attacks on the real controller binary, as an outsider on the network
//! would make them, each with the answer kiwi must give. One test per
//! hole found (and closed); the file grows with every new one.
//!
//! Every test starts its own controller on loopback; addresses other than
//! 127.0.0.1 used as sources are loopback addresses too (127.0.0.0/8).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use kiwi_tests::agent_port::{self, hour, robot_cert};
use kiwi_tests::raw_http::KeepAlive;
use kiwi_tests::{
    Agent, AgentOptions, Api, ControllerOptions, secs, test_serial, wait_ready_and_connected,
    wait_until,
};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use uuid::Uuid;

/// A second "host" of the test: another loopback address.
const ELSEWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// A third.
const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 66));

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

// ---------------------------------------------------------------------------
// Helpers.

/// The robot's pending enrollment request, once listed.
async fn pending_request(api: &Api, robot: Uuid) -> Value {
    wait_until(secs(30), || async {
        let list: Value = api.get_json("/api/v2/enrollments?status=pending").await?;
        list["enrollments"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["robot_id"] == robot.to_string().as_str())
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{robot} not pending yet: {list}"))
    })
    .await
}

async fn post(api: &Api, path: &str) -> kiwi_tests::api::RawResponse {
    let raw = api.request(Method::POST, path, None).await.expect(path);
    assert_eq!(raw.status, StatusCode::OK, "{path}: {}", raw.body);
    raw
}

async fn approve(api: &Api, request: &Value) {
    let id = request["id"].as_str().expect("an enrollment id");
    post(api, &format!("/api/v2/enrollments/{id}/approve")).await;
}

async fn decommission(api: &Api, robot: Uuid) -> Value {
    let raw = post(api, &format!("/api/v2/robots/{robot}/decommission")).await;
    let answer: Value = serde_json::from_str(&raw.body).expect("JSON");
    wait_until(secs(20), || async {
        let r = api.robot_required(robot).await?;
        anyhow::ensure!(!r.connected, "still connected");
        Ok(())
    })
    .await;
    answer
}

async fn connected(api: &Api, robot: Uuid) {
    wait_until(secs(30), || async {
        let r = api.robot_required(robot).await?;
        anyhow::ensure!(r.connected, "not connected: {}", r.state);
        Ok(())
    })
    .await;
}

/// The robot's `robot_enrolled` events (their data).
async fn enrolled_events(api: &Api, robot: Uuid) -> Vec<Value> {
    api.events(robot)
        .await
        .expect("events")
        .into_iter()
        .filter(|e| e.kind == "robot_enrolled")
        .map(|e| e.data)
        .collect()
}

fn admin_token_id(api: &Api) -> String {
    let token: kiwi_security::token::ApiToken = api
        .token()
        .expect("the harness's admin token")
        .parse()
        .expect("an API token");
    token.id
}

fn enrollment_token_id(text: &str) -> String {
    let token: kiwi_security::token::EnrollmentToken = text.parse().expect("an enrollment token");
    token.id
}

// ---------------------------------------------------------------------------
// 2. Re-enrollment after decommission.

/// Before, decommissioning revoked the certificates but left the robot's
/// enrollment `issued`: the same key asking again (certificate deleted,
/// key kept) got a new certificate and connected. Now decommissioning ends
/// the robot's requests, a request is issued once, and the robot comes
/// back only by an operator's approval or a new token, which its events
/// say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decommissioned_robot_does_not_enroll_itself_again() {
    let controller = ControllerOptions::new().start().await;
    let api = controller.api();
    let mut agent = AgentOptions::new(&test_serial(1))
        .setting("enroll_token", "")
        .start(&controller);
    let robot = agent.robot_id();
    let first = pending_request(api, robot).await;
    approve(api, &first).await;
    wait_ready_and_connected(api, robot, secs(30)).await;

    let answer = decommission(api, robot).await;
    assert_eq!(answer["enrollments_ended"], 1, "{answer}");
    let ended: Value = api
        .get_json("/api/v2/enrollments?status=revoked")
        .await
        .expect("enrollments");
    assert_eq!(ended["enrollments"][0]["id"], first["id"], "{ended}");

    // The same key asks again, its certificate deleted.
    agent.kill();
    let cert = agent.state_dir().join("tls/robot.pem");
    std::fs::remove_file(&cert).expect("the robot's certificate");
    agent.start_again();
    let again = pending_request(api, robot).await;
    assert_eq!(again["id"], first["id"], "the same request, asked again");
    assert_eq!(again["key_fingerprint"], first["key_fingerprint"]);
    assert_eq!(again["decided_by"], Value::Null, "{again}");
    assert!(!cert.exists(), "a certificate was issued by itself");
    assert!(!api.robot_required(robot).await.expect("robot").connected);
    assert!(enrolled_events(api, robot).await.is_empty());

    // An operator's approval brings it back; its events say so.
    approve(api, &again).await;
    connected(api, robot).await;
    let events = enrolled_events(api, robot).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["via"], "approval");
    assert_eq!(events[0]["enrollment_id"], first["id"]);
    assert_eq!(
        events[0]["approved_by"],
        format!("api-token:{}", admin_token_id(api)).as_str()
    );
    assert_eq!(events[0]["key_fingerprint"], first["key_fingerprint"]);

    // Decommissioned again, it comes back with a new token (on a new key).
    decommission(api, robot).await;
    agent.kill();
    let token = controller.create_token(&["--uses", "1"]);
    let _back = AgentOptions::new(&test_serial(1))
        .setting("enroll_token", &token)
        .start(&controller);
    connected(api, robot).await;
    let events = enrolled_events(api, robot).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1]["via"], "token");
    assert_eq!(events[1]["token_id"], enrollment_token_id(&token).as_str());
}

// ---------------------------------------------------------------------------
// 3. Enrollment takeover.

/// Before, a simulator with a connected robot's hardware identity enrolled
/// with a fresh one-use token, got a certificate for that robot, and the
/// two agents pushed each other off. Now a token for any robot does not
/// issue for a robot that holds a valid certificate: the request waits for
/// an operator (with why), the token keeps its use, and the real robot's
/// session is untouched. A token made for one robot (`--robot`) enrolls no
/// other, and may replace that robot's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_any_robot_cannot_take_a_connected_robot_over() {
    let controller = ControllerOptions::new().start().await;
    let api = controller.api();
    let real = Agent::start(&controller, &test_serial(1));
    let robot = real.robot_id();
    wait_ready_and_connected(api, robot, secs(30)).await;
    let handshakes = api
        .metric("agent_handshakes_total", &[])
        .await
        .expect("metrics");
    let events = api.events(robot).await.expect("events").len();

    let token = controller.create_token(&["--uses", "1"]);
    let mut impostor = AgentOptions::new(&test_serial(1))
        .setting("enroll_token", &token)
        .start(&controller);
    let held = pending_request(api, robot).await;
    let reason = held["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("already holds a valid certificate")
            && reason.contains(&enrollment_token_id(&token)),
        "{held}"
    );
    assert!(
        api.metric("enrollments_total", &[("result", "held")])
            .await
            .expect("metrics")
            >= 1.0
    );
    let log = std::fs::read_to_string(controller.log_path()).unwrap_or_default();
    assert!(
        log.contains("enrollment held for an operator"),
        "no log line says so"
    );
    // The impostor keeps asking (and waiting): nothing changes.
    wait_until(secs(20), || async {
        let n = api
            .metric("enrollments_total", &[("result", "held")])
            .await?;
        anyhow::ensure!(n >= 2.0, "asked {n} times");
        Ok(())
    })
    .await;
    assert!(!impostor.state_dir().join("tls/robot.pem").exists());
    let tokens: Value = api.get_json("/api/v2/tokens").await.expect("tokens");
    let left = tokens["enrollment_tokens"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|t| t["id"] == enrollment_token_id(&token).as_str())
        })
        .map(|t| t["uses_left"].clone());
    assert_eq!(left, Some(serde_json::json!(1)), "the token kept its use");
    let now = api.robot_required(robot).await.expect("robot");
    assert!(now.connected);
    assert_eq!(api.events(robot).await.expect("events").len(), events);
    assert_eq!(
        api.metric("agent_handshakes_total", &[])
            .await
            .expect("metrics"),
        handshakes,
        "the real robot was never pushed off"
    );
    impostor.kill();

    // A token made for this robot enrolls no other...
    let bound = controller.create_token(&["--robot", &robot.to_string()]);
    let mut other = AgentOptions::new(&test_serial(2))
        .setting("enroll_token", &bound)
        .start(&controller);
    let status = other.wait_exit(secs(20)).await.expect("refused, it stops");
    assert!(!status.success());
    assert!(
        other.log_text().contains("made for another robot"),
        "{}",
        other.log_text()
    );
    // ...and replaces this robot's certificate: the operator's choice.
    let _replacement = AgentOptions::new(&test_serial(1))
        .setting("enroll_token", &bound)
        .start(&controller);
    wait_until(secs(30), || async {
        let events = enrolled_events(api, robot).await;
        anyhow::ensure!(events.len() == 1, "{events:?}");
        anyhow::ensure!(events[0]["token_id"] == enrollment_token_id(&bound).as_str());
        anyhow::ensure!(events[0]["certificates_revoked"] == 1, "{events:?}");
        Ok(())
    })
    .await;
    connected(api, robot).await;
    wait_until(secs(20), || async {
        let log = real.log_text();
        anyhow::ensure!(
            log.contains("revoked"),
            "the replaced agent is not refused yet"
        );
        Ok(())
    })
    .await;
}

// ---------------------------------------------------------------------------
// 4. REST connection exhaustion.

/// Opens `n` connections from `source` that send nothing.
async fn idle_connections(
    addr: SocketAddr,
    source: IpAddr,
    n: usize,
) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        match kiwi_tests::raw_http::connect_from(addr, Some(source)).await {
            Ok(s) => held.push(s),
            Err(e) => panic!("connection {} from {source}: {e:#}", held.len()),
        }
    }
    held
}

/// Whether the controller closed `stream` (it reads end of file or a
/// reset, not just a refusal's answer).
async fn closed_by_peer(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(secs(30), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Before, the REST port had no header-read timeout, no idle timeout and
/// no connection cap: on a controller limited to 2,048 open files, 2,100
/// idle API connections made `/healthz` time out and agents fail to
/// connect ("Too many open files"). Now one address holds at most
/// `api_max_connections_per_address`, the API's total stays within what
/// the open-files limit leaves beside the agents, a refused connection is
/// told so (503 problem), and everyone else is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_and_slow_api_connections_leave_room_for_everyone_else() {
    raise_own_open_files(8_192);
    // 400 of the 448 connections a 2,048-file limit leaves the API
    // (`connection_budget`) may come from one address here, so that both
    // kinds of attack below are held; the timeouts are long, so that what
    // is held does not depend on how fast this machine opens 3,300
    // connections (the next test times them out).
    let controller = ControllerOptions::new()
        .open_files_limit(2_048)
        .setting("api_max_connections_per_address", "400")
        .setting("api_header_read_timeout", "10m")
        .setting("api_idle_timeout", "10m")
        .start()
        .await;
    let api = controller.api();
    let addr = controller.api_addr();

    // 300 connections that send a head a byte at a time, and 3,000 that
    // send nothing, all from one address: 400 are held, 2,900 refused.
    let mut slow = idle_connections(addr, ATTACKER, 300).await;
    {
        use tokio::io::AsyncWriteExt as _;
        for s in &mut slow {
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: ki").await;
        }
    }
    let _idle = idle_connections(addr, ATTACKER, 3_000).await;
    wait_until(secs(30), || async {
        let refused = api
            .metric(
                "rate_limited_total",
                &[("limit", "api_connections_per_address")],
            )
            .await?;
        anyhow::ensure!(refused >= 2_900.0, "{refused} refused");
        Ok(())
    })
    .await;
    // A refused connection is told why.
    let mut extra = KeepAlive::connect_from(addr, Some(ATTACKER))
        .await
        .expect("connect");
    let told = extra
        .exchange("GET /healthz HTTP/1.1\r\nHost: kiwi\r\n\r\n", ANSWER)
        .await
        .expect("an answer");
    assert_eq!(told.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        told.content_type.as_deref(),
        Some("application/problem+json")
    );

    // Everyone else is served: the API from other addresses...
    for _ in 0..20 {
        let answer = tokio::time::timeout(secs(5), api.get("/healthz"))
            .await
            .expect("/healthz answers promptly")
            .expect("/healthz");
        assert_eq!(answer.status(), StatusCode::OK);
    }
    // ...and a new robot enrolls and connects.
    let agent = Agent::start(&controller, &test_serial(1));
    wait_ready_and_connected(api, agent.robot_id(), secs(30)).await;
    let log = std::fs::read_to_string(controller.log_path()).unwrap_or_default();
    assert!(
        !log.contains("Too many open files"),
        "the controller ran out of files"
    );
}

/// Before, a connection that sent nothing, or a head a byte at a time, was
/// never closed. Now a head must arrive within `api_header_read_timeout`
/// of its first byte, and a kept-alive connection waits for its next
/// request at most `api_idle_timeout`; a request being answered (a watch
/// stream) is never timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_and_idle_api_connections_are_closed_but_streams_are_not() {
    let controller = ControllerOptions::new()
        .setting("api_header_read_timeout", "1s")
        .setting("api_idle_timeout", "2s")
        .start()
        .await;
    let api = controller.api();
    let addr = controller.api_addr();
    let mut slow = idle_connections(addr, ATTACKER, 5).await;
    {
        use tokio::io::AsyncWriteExt as _;
        for s in &mut slow {
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: ki").await;
        }
    }
    let mut idle = idle_connections(addr, ATTACKER, 5).await;
    // A watch stream outlives both timeouts.
    let mut watch = kiwi_tests::Watch::connect(api, kiwi_tests::Resume::Fresh)
        .await
        .expect("a watch stream");
    for s in slow.iter_mut().chain(idle.iter_mut()) {
        assert!(closed_by_peer(s).await, "a connection was kept open");
    }
    let text = api.metrics_text().await.expect("metrics");
    let by = |reason| {
        kiwi_tests::api::metric_sum(&text, "api_connections_closed_total", &[("reason", reason)])
    };
    // (The test's own API client's kept-alive connection may be one of
    // the idle ones.)
    assert!(by("header_timeout") >= 5.0 && by("idle") >= 5.0, "{text}");
    // The stream still delivers: a change made now reaches it.
    let agent = Agent::start(&controller, &test_serial(1));
    wait_ready_and_connected(api, agent.robot_id(), secs(30)).await;
    let event = watch
        .next(secs(30))
        .await
        .expect("the stream delivers after the timeouts");
    assert_eq!(event.event, "robot_discovered", "{event:?}");
}

/// Lets this test process hold thousands of sockets.
fn raise_own_open_files(n: u64) {
    let now = kiwi_service::limits::raise_nofile_limit(n).expect("the open-files limit");
    assert!(now.soft >= n, "cannot open {n} files: {now:?}");
}

// ---------------------------------------------------------------------------
// 5. The agent port's TLS with OpenSSL.

/// Before, the CA name in the agent port's CertificateRequest lacked its
/// outer SEQUENCE, and `openssl s_client` (like Python's `ssl`) failed the
/// handshake with an ASN.1 error. Now an OpenSSL client completes it, with
/// a valid client certificate (the WebSocket upgrade is accepted) and
/// without (enrollment answers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_clients_complete_the_agent_ports_handshake() {
    let controller = ControllerOptions::new().start().await;
    let ca = controller.ca();
    let dir = tempfile::tempdir().expect("a temp dir");
    let key = kiwi_security::pki::generate_key().expect("a key");
    let cert = ca
        .issue_robot_for(&key, Uuid::new_v4(), hour())
        .expect("a certificate");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let ca_file = write("ca.pem", ca.cert_pem());
    let cert_file = write("robot.pem", &cert.pem);
    let key_file = write("robot.key", &key.serialize_pem());
    let upgrade = "GET /agent HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                   Sec-WebSocket-Version: 13\r\n\r\n";
    let answer = s_client(
        controller.agent_addr(),
        &ca_file,
        Some((&cert_file, &key_file)),
        upgrade,
    )
    .await;
    assert!(
        answer.contains("HTTP/1.1 101"),
        "the upgrade with a client certificate:\n{answer}"
    );
    let enroll = "POST /enroll HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                  Content-Length: 2\r\n\r\n{}";
    let answer = s_client(controller.agent_addr(), &ca_file, None, enroll).await;
    assert!(
        answer.contains("HTTP/1.1 400") && answer.contains("application/problem+json"),
        "enrollment without a client certificate:\n{answer}"
    );
}

/// Runs `openssl s_client` against `addr`, sends `request` once the
/// handshake is done, and returns what it printed (with the answer's
/// head) and its errors.
async fn s_client(
    addr: SocketAddr,
    ca: &std::path::Path,
    cert: Option<(&std::path::Path, &std::path::Path)>,
    request: &str,
) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut command = tokio::process::Command::new("openssl");
    command
        .args([
            "s_client",
            "-quiet",
            "-verify_return_error",
            "-alpn",
            "http/1.1",
        ])
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-servername")
        .arg("localhost")
        .arg("-CAfile")
        .arg(ca);
    if let Some((cert, key)) = cert {
        command.arg("-cert").arg(cert).arg("-key").arg(key);
    }
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl (Debian's openssl package)");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(request.as_bytes()).await.expect("write");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(secs(10), async {
        let mut buf = [0u8; 4096];
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            match stdout.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        // The rest of a short answer (a problem's body).
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(300), stdout.read(&mut buf)).await
        {
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    drop(stdin);
    let _ = child.start_kill();
    let mut err = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = tokio::time::timeout(secs(5), stderr.read_to_string(&mut err)).await;
    }
    format!("{}\n--- stderr:\n{err}", String::from_utf8_lossy(&out))
}

// ---------------------------------------------------------------------------
// 6. Failure budgets per surface.

/// Before, one failed-authentication budget per address covered the API,
/// enrollment and the agent port, and a blocked address was refused even
/// with a valid token (an admin got 429; behind one NAT, one bad client
/// locked every robot out). Now valid credentials always pass, and each
/// surface has its own budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_credentials_pass_whatever_an_address_failed_and_budgets_are_per_surface() {
    let controller = ControllerOptions::new()
        .setting("auth_failures_per_minute", "3")
        .start()
        .await;
    let api = controller.api();
    let from =
        |source: IpAddr, token: Option<&str>| Api::with_token_from(api.base(), token, Some(source));

    // The API budget of one address, spent with bad tokens.
    let guesser = from(ATTACKER, Some("kiwi-api.v1.0123456789abcdef.nope"));
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            guesser
                .request(Method::GET, "/api/v2/robots", None)
                .await
                .expect("GET")
                .status,
        );
    }
    assert_eq!(statuses[..3], [StatusCode::UNAUTHORIZED; 3], "{statuses:?}");
    assert_eq!(statuses[4], StatusCode::TOO_MANY_REQUESTS, "{statuses:?}");
    // An admin at that address is served.
    let admin = from(ATTACKER, Some(controller.admin_token()));
    let raw = admin
        .request(Method::GET, "/api/v2/tokens", None)
        .await
        .expect("GET");
    assert_eq!(raw.status, StatusCode::OK, "{}", raw.body);

    // The agent port's budget is its own: a bad certificate from that
    // address is refused with its reason, not told to wait...
    let ca = controller.ca();
    let stream = agent_port::connect_tls_from(
        controller.agent_addr(),
        Some(ATTACKER),
        agent_port::tls(ca.cert_der(), None, kiwi_security::verify::ALPN_HTTP1),
    )
    .await
    .expect("TLS");
    let request = format!("wss://{}/agent", controller.agent_addr());
    let refused = {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        let req = request.into_client_request().expect("a request");
        match tokio_tungstenite::client_async(req, stream).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
            other => panic!("not refused: {:?}", other.map(|_| ())),
        }
    };
    assert_eq!(refused, 401, "the agent port has its own budget");
    // ...and once it is spent too, a valid certificate still gets in.
    for _ in 0..5 {
        let _ = agent_port::connect_ws(controller.agent_addr(), ca.cert_der(), None).await;
    }
    match agent_port::connect_ws(controller.agent_addr(), ca.cert_der(), None).await {
        Err(Ok(r)) => assert_eq!(r.status, 429, "{}", r.body),
        other => panic!("not refused: {:?}", other.map(|_| ())),
    }
    let valid = robot_cert(&ca, Uuid::new_v4(), hour());
    agent_port::connect_ws(controller.agent_addr(), ca.cert_der(), Some(valid))
        .await
        .map(drop)
        .unwrap_or_else(|e| panic!("a valid certificate was refused: {e:?}"));
    // Enrollment has its own budget too: bad tokens from the attacker are
    // refused with why, then told to wait; a valid token from it enrolls.
    let bad = kiwi_security::token::EnrollmentToken::generate(ca.pin()).to_string();
    let mut statuses = Vec::new();
    for n in 0..5 {
        let body = agent_port::enroll_request(&format!("guess-{n}"), Some(&bad), 1);
        let answer = agent_port::post_enroll(
            controller.agent_addr(),
            ca.cert_der(),
            Some(ATTACKER),
            &body,
        )
        .await
        .expect("an answer");
        statuses.push(answer.status);
    }
    assert_eq!(statuses[..3], [StatusCode::UNAUTHORIZED; 3], "{statuses:?}");
    assert_eq!(statuses[4], StatusCode::TOO_MANY_REQUESTS, "{statuses:?}");
    let good = controller.create_token(&["--uses", "1"]);
    let body = agent_port::enroll_request("from-the-attackers-address", Some(&good), 1);
    let answer = agent_port::post_enroll(
        controller.agent_addr(),
        ca.cert_der(),
        Some(ATTACKER),
        &body,
    )
    .await
    .expect("an answer");
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    // Enrollment with a valid token from 127.0.0.1 (the agent's address,
    // over its own agent-port budget) works, and the robot connects.
    let agent = Agent::start(&controller, &test_serial(1));
    wait_ready_and_connected(api, agent.robot_id(), secs(30)).await;
    // The API at 127.0.0.1 was never charged for the agent port's failures.
    let raw = controller
        .api()
        .as_token(Some("kiwi-api.v1.0123456789abcdef.nope"))
        .request(Method::GET, "/api/v2/robots", None)
        .await
        .expect("GET");
    assert_eq!(raw.status, StatusCode::UNAUTHORIZED, "{}", raw.body);
}

// ---------------------------------------------------------------------------
// 7. Pending enrollments.

/// Before, anyone on the agent port could leave any number of pending
/// requests, for ever, with a 700-entry MAC list, and the list of them was
/// one unpaged answer (2 MB after 200 requests). Now pending requests are
/// capped per address and in total, expire, every identity field is
/// bounded, and the list is paged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_enrollments_are_capped_bounded_paged_and_expire() {
    let controller = ControllerOptions::new()
        .setting("max_pending_enrollments", "5")
        .setting("max_pending_enrollments_per_address", "3")
        .setting("pending_enrollment_ttl", "3s")
        .start()
        .await;
    let api = controller.api();
    let ca = controller.ca();
    let addr = controller.agent_addr();
    let enroll = |name: String, source: Option<IpAddr>, macs: usize| {
        let ca = ca.cert_der().clone();
        async move {
            let body = agent_port::enroll_request(&name, None, macs);
            agent_port::post_enroll(addr, &ca, source, &body)
                .await
                .expect("an answer")
        }
    };

    // A 700-entry MAC list is refused, with the bound.
    let huge = enroll("flood-macs".into(), None, 700).await;
    assert_eq!(huge.status, StatusCode::BAD_REQUEST, "{}", huge.body);
    assert!(huge.body.contains("MAC"), "{}", huge.body);
    assert_eq!(
        huge.content_type.as_deref(),
        Some("application/problem+json")
    );

    // Three from one address, then that address is told to wait.
    for n in 0..3 {
        let a = enroll(format!("flood-a{n}"), None, 1).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    }
    let fourth = enroll("flood-a3".into(), None, 1).await;
    assert_eq!(
        fourth.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        fourth.body
    );
    assert!(fourth.body.contains("too_many_pending"), "{}", fourth.body);
    // Two more from elsewhere, then the total is reached.
    for n in 0..2 {
        let a = enroll(format!("flood-b{n}"), Some(ELSEWHERE), 1).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    }
    let sixth = enroll("flood-c0".into(), Some(ATTACKER), 1).await;
    assert_eq!(
        sixth.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        sixth.body
    );

    // Paged.
    let page: Value = api
        .get_json("/api/v2/enrollments?limit=2")
        .await
        .expect("a page");
    assert_eq!(page["enrollments"].as_array().map(Vec::len), Some(2));
    let cursor = page["next_cursor"].as_str().expect("a next page");
    let rest: Value = api
        .get_json(&format!("/api/v2/enrollments?limit=10&cursor={cursor}"))
        .await
        .expect("the rest");
    assert_eq!(rest["enrollments"].as_array().map(Vec::len), Some(3));
    assert_eq!(rest["next_cursor"], Value::Null);

    // Nobody asks about them again: they expire, and there is room again.
    wait_until(secs(30), || async {
        let list: Value = api.get_json("/api/v2/enrollments").await?;
        let n = list["enrollments"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(n == 0, "{n} requests left");
        Ok(())
    })
    .await;
    let later = enroll("flood-a3".into(), None, 1).await;
    assert_eq!(later.status, StatusCode::ACCEPTED, "{}", later.body);
}

// ---------------------------------------------------------------------------
// 8. Every answer the application controls is problem+json.

/// Before, `/ui/%ff%fe` was a 400 in plain text, an oversized `/enroll` a
/// 413 in plain text, and 404 and 405 on the agent port empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_a_problem_on_both_ports() {
    let controller = ControllerOptions::new().start().await;
    let api = controller.api();
    let problem = |what: &str, status: u16, raw: &kiwi_tests::api::RawResponse| {
        assert_eq!(raw.status.as_u16(), status, "{what}: {}", raw.body);
        assert_eq!(
            raw.content_type.as_deref(),
            Some("application/problem+json"),
            "{what}"
        );
        let body: Value = serde_json::from_str(&raw.body).expect("JSON");
        assert_eq!(body["status"], status, "{what}: {body}");
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{what}"
        );
    };
    let raw = api
        .as_token(None)
        .request(Method::GET, "/ui/%ff%fe", None)
        .await
        .expect("GET");
    problem("/ui/%ff%fe", 400, &raw);

    let ca = controller.ca();
    let addr = controller.agent_addr();
    let big = vec![b'x'; 64 * 1024];
    let raw = agent_port::post_enroll(addr, ca.cert_der(), None, &big)
        .await
        .expect("an answer");
    problem("an oversized /enroll", 413, &raw);
    for (what, head, status) in [
        (
            "GET /nope",
            "GET /nope HTTP/1.1\r\nHost: kiwi\r\nConnection: close\r\n\r\n",
            404,
        ),
        (
            "PUT /enroll",
            "PUT /enroll HTTP/1.1\r\nHost: kiwi\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            405,
        ),
    ] {
        let raw = agent_port::exchange(addr, ca.cert_der(), None, head, b"")
            .await
            .expect("an answer");
        problem(what, status, &raw);
    }
}

// ---------------------------------------------------------------------------
// 9. Hygiene.

/// Before, `kiwi-agent enroll` took its token only on the command line
/// (where `ps` shows it). Now it reads it from standard input, a file or
/// the environment, and warns when it is given on the command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enroll_command_keeps_its_token_out_of_the_process_list() {
    let controller = ControllerOptions::new().start().await;
    let enroll =
        |serial: &str, token_arg: Option<&str>, stdin: Option<&str>, file: Option<&str>| {
            let dir = tempfile::tempdir().expect("a temp dir");
            let root = dir.path().join("sys-root");
            kiwi_tests::agent::prepare_lekiwi_sys_root(&root, serial, "lekiwi-enroll");
            let mut command = std::process::Command::new(kiwi_tests::process::binary("kiwi-agent"));
            kiwi_tests::process::scrub_env(&mut command);
            command
                .arg("enroll")
                .arg("--controller")
                .arg(controller.agent_controller_arg())
                .arg("--state-dir")
                .arg(dir.path().join("state"))
                .arg("--sys-root")
                .arg(&root);
            if let Some(t) = token_arg {
                command.arg(t);
            }
            if let Some(text) = file {
                let path = dir.path().join("token");
                std::fs::write(&path, format!("{text}\n")).expect("write");
                command.arg("--token-file").arg(path);
            }
            command
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let mut child = command.spawn().expect("kiwi-agent enroll");
            {
                use std::io::Write as _;
                let mut input = child.stdin.take().expect("stdin");
                if let Some(text) = stdin {
                    input
                        .write_all(format!("{text}\n").as_bytes())
                        .expect("stdin");
                }
            }
            let out = child.wait_with_output().expect("kiwi-agent enroll");
            (out, dir)
        };
    let warning = "given on the command line";
    let token = || controller.create_token(&["--uses", "1"]);

    let (out, _dir) = enroll(&test_serial(1), Some("-"), Some(&token()), None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "from standard input: {err}");
    assert!(!err.contains(warning), "{err}");

    let (out, _dir) = enroll(&test_serial(2), None, None, Some(&token()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "from a file: {err}");
    assert!(!err.contains(warning), "{err}");

    let (out, _dir) = enroll(&test_serial(3), Some(&token()), None, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "on the command line: {err}");
    assert!(err.contains(warning), "no warning: {err}");
}

/// Before, the store and state files were made with the process's umask
/// (world-readable under the usual 022). Now the controller's and the
/// agent's state are private whatever the umask: files 0600 in 0700
/// directories, also under umask 000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_files_are_private_whatever_the_umask() {
    let controller = ControllerOptions::new().umask(0).start().await;
    let agent = AgentOptions::new(&test_serial(1))
        .umask(0)
        .start(&controller);
    wait_ready_and_connected(controller.api(), agent.robot_id(), secs(30)).await;
    for dir in [controller.state_dir(), agent.state_dir()] {
        let mut open = Vec::new();
        private_tree(dir, &mut open);
        assert!(open.is_empty(), "open to others: {open:#?}");
    }
}

/// Collects what under `dir` (itself included) is not private: a
/// directory other than 0700, a file other than 0600.
fn private_tree(dir: &std::path::Path, open: &mut Vec<String>) {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::symlink_metadata(dir).expect("metadata");
    let mode = meta.permissions().mode() & 0o777;
    if meta.is_dir() {
        if mode != 0o700 {
            open.push(format!("{} {mode:o}", dir.display()));
        }
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            private_tree(&entry.expect("an entry").path(), open);
        }
    } else if mode != 0o600 {
        open.push(format!("{} {mode:o}", dir.display()));
    }
}

/// Before, `GET /api/v2/watch?after=` a position the log had not reached
/// was a stream that never delivered. Now it is a 400 naming the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_position_beyond_the_head_is_refused_with_the_head() {
    let controller = ControllerOptions::new().start().await;
    let api = controller.api();
    let agent = Agent::start(&controller, &test_serial(1));
    wait_ready_and_connected(api, agent.robot_id(), secs(30)).await;
    let head = api
        .all_events()
        .await
        .expect("events")
        .iter()
        .map(|e| e.position)
        .max()
        .expect("a head");
    let raw = api
        .request(
            Method::GET,
            &format!("/api/v2/watch?after={}", head + 1000),
            None,
        )
        .await
        .expect("GET");
    assert_eq!(raw.status, StatusCode::BAD_REQUEST, "{}", raw.body);
    let body: Value = serde_json::from_str(&raw.body).expect("a problem");
    assert!(body["head"].as_i64().is_some_and(|h| h >= head), "{body}");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&body["head"].to_string())),
        "{body}"
    );
}

/// Before, `scripts/demo` wrote the admin token with the shell's umask
/// (0644 under the usual 022). Now the token, like the demo's whole state,
/// is readable by its user only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_keeps_its_admin_token_private() {
    use std::os::unix::fs::PermissionsExt as _;
    use std::os::unix::process::CommandExt as _;
    let dir = tempfile::tempdir().expect("a temp dir");
    let state = dir.path().join("demo");
    let bin = kiwi_tests::process::binary("kiwi-controller");
    let bin = bin.parent().expect("the binaries' directory");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository");
    for attempt in 1..=3 {
        let (api_addr, agent_addr) = kiwi_tests::controller::two_loopback_addrs();
        let log = dir.path().join(format!("demo-{attempt}.log"));
        let mut command = std::process::Command::new("sh");
        kiwi_tests::process::scrub_env(&mut command);
        command
            .args(["-c", "umask 022 && exec bash scripts/demo 1"])
            .current_dir(repo)
            .env("KIWI_DEMO_STATE", &state)
            .env("KIWI_DEMO_BIN", bin)
            .env("KIWI_CONTROLLER_API_LISTEN", api_addr.to_string())
            .env("KIWI_CONTROLLER_AGENT_LISTEN", agent_addr.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log).expect("a log"))
            .stderr(std::process::Stdio::null())
            .process_group(0);
        let mut demo = command.spawn().expect("scripts/demo");
        let group = demo.id();
        let stop = move || kiwi_tests::process::signal_group(group, libc::SIGTERM);
        let api = Api::new(&format!("http://{api_addr}"));
        let up = tokio::time::timeout(secs(60), async {
            loop {
                if demo.try_wait().ok().flatten().is_some() {
                    return false;
                }
                let token_written =
                    std::fs::metadata(state.join("admin-token")).is_ok_and(|m| m.len() > 0);
                if token_written
                    && api
                        .get("/readyz")
                        .await
                        .is_ok_and(|r| r.status() == StatusCode::OK)
                {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .unwrap_or(false);
        if !up {
            stop();
            let _ = demo.wait();
            let text = std::fs::read_to_string(state.join("controller.log")).unwrap_or_default();
            if attempt < 3 && text.contains("in use") {
                continue;
            }
            panic!("the demo did not come up:\n{text}");
        }
        let mode = |p: &std::path::Path| {
            std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
        };
        let token_file = state.join("admin-token");
        let token = std::fs::read_to_string(&token_file).expect("the admin token");
        let modes = (
            mode(&token_file),
            mode(&state),
            mode(&state.join("controller/kiwi.db")),
        );
        let robots = api
            .as_token(Some(token.trim()))
            .request(Method::GET, "/api/v2/robots", None)
            .await
            .expect("GET");
        stop();
        let _ = demo.wait();
        assert_eq!(modes, (0o600, 0o700, 0o600), "admin-token, state, store");
        assert_eq!(
            robots.status,
            StatusCode::OK,
            "the token works: {}",
            robots.body
        );
        return;
    }
}
