//! Security of the agent port and the API, end to end against real
//! processes: who is refused (with a reason in the log, a metric, and
//! nothing reaching the state machine), over both transports; enrollment
//! by token and by approval; revocation; renewal; API roles.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiwi_agent::transport::quic::QuicConnector;
use kiwi_agent::transport::{Connection as _, Connector as _, Incoming};
use kiwi_security::pki::Authority;
use kiwi_security::token::EnrollmentToken;
use kiwi_security::verify::ALPN_QUIC;
use kiwi_tests::agent_port::{self, ClientCert, expired, hour, robot_cert};
use kiwi_tests::{
    Agent, AgentOptions, Api, Controller, ControllerOptions, HealthStatus, State, secs,
    test_serial, wait_ready_and_connected, wait_until,
};
use reqwest::{Method, StatusCode};
use uuid::Uuid;

/// How long a refusal may take to show in the metrics and the log.
const PROMPTLY: Duration = Duration::from_secs(10);

async fn auth_failures(api: &Api, surface: &str, reason: &str) -> f64 {
    api.metric(
        "auth_failures_total",
        &[("surface", surface), ("reason", reason)],
    )
    .await
    .expect("GET /metrics")
}

/// Connects over QUIC with `tls` and returns the text of the refusal (the
/// controller closes the connection with a reason right after the
/// handshake).
async fn quic_refusal(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> String {
    let connector = QuicConnector::new(addr.ip().to_string(), addr.port(), tls);
    let mut conn = match connector.connect().await {
        Err(e) => return e.to_string(),
        Ok(conn) => conn,
    };
    let read = tokio::time::timeout(PROMPTLY, async {
        loop {
            match conn.recv().await {
                Ok(Incoming::Alive) => continue,
                Ok(Incoming::Closed(why)) => return why.unwrap_or_default(),
                Ok(Incoming::Frame(f)) => return format!("unexpected frame of {} bytes", f.len()),
                Err(e) => return e.to_string(),
            }
        }
    });
    read.await
        .expect("the controller closes a refused QUIC connection promptly")
}

/// The refusals over WebSocket (the upgrade is answered 401/403 with the
/// reason) and QUIC (the connection is closed with it).
async fn assert_refused(controller: &Controller, cert: Option<ClientCert>, reason: &str) {
    let api = controller.api();
    let before = auth_failures(api, "agent", reason).await;
    let ca = controller.ca();
    match agent_port::connect_ws(controller.agent_addr(), ca.cert_der(), cert.clone()).await {
        Err(Ok(refused)) => {
            assert!(
                matches!(refused.status, 401 | 403),
                "{reason}: the WebSocket upgrade was answered {}",
                refused.status
            );
            assert!(
                refused.body.contains(reason),
                "{reason}: the refusal does not say why: {}",
                refused.body
            );
        }
        Ok(_) => panic!("{reason}: the WebSocket upgrade was accepted"),
        Err(Err(e)) => panic!("{reason}: {e:#}"),
    }
    let text = quic_refusal(
        controller.agent_addr(),
        agent_port::tls(ca.cert_der(), cert, ALPN_QUIC),
    )
    .await;
    assert!(
        text.contains(reason),
        "{reason}: QUIC was closed with {text:?}"
    );
    wait_until(PROMPTLY, || async {
        let now = auth_failures(api, "agent", reason).await;
        anyhow::ensure!(
            now >= before + 2.0,
            "auth_failures_total{{agent,{reason}}} = {now}"
        );
        Ok(())
    })
    .await;
    let log = std::fs::read_to_string(controller.log_path()).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("agent refused") && l.contains(&format!("\"reason\":\"{reason}\""))),
        "{reason}: no log line says why"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_without_a_valid_certificate_are_refused_over_both_transports() {
    let controller = ControllerOptions::new().start().await;
    let ca = controller.ca();
    let robot = Uuid::new_v4();
    let other = Authority::create("another controller", hour()).expect("a CA");

    assert_refused(&controller, None, "no_certificate").await;
    assert_refused(
        &controller,
        Some(robot_cert(&other, robot, hour())),
        "unknown_ca",
    )
    .await;
    assert_refused(
        &controller,
        Some(robot_cert(&ca, robot, expired())),
        "expired",
    )
    .await;

    // Nothing reached the state machine.
    let api = controller.api();
    assert!(api.robots().await.expect("robots").is_empty());
    assert_eq!(
        api.metric("events_appended_total", &[])
            .await
            .expect("metrics"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decommissioned_robot_is_cut_off_and_refused_over_both_transports() {
    for (n, transport) in [(1, "websocket"), (2, "quic")] {
        let controller = ControllerOptions::new().start().await;
        let api = controller.api();
        let mut agent = AgentOptions::new(&test_serial(n))
            .setting("transport", transport)
            .start(&controller);
        let id = agent.robot_id();
        wait_ready_and_connected(api, id, secs(30)).await;
        let handshakes = api
            .metric("agent_handshakes_total", &[("transport", transport)])
            .await
            .expect("metrics");
        assert!(handshakes >= 1.0, "{transport}: connected over {transport}");

        let raw = api
            .request(
                Method::POST,
                &format!("/api/v2/robots/{id}/decommission"),
                None,
            )
            .await
            .expect("decommission");
        assert_eq!(raw.status, StatusCode::OK, "{transport}: {}", raw.body);
        wait_until(PROMPTLY, || async {
            let robot = api.robot_required(id).await?;
            anyhow::ensure!(!robot.connected, "{transport}: still connected");
            anyhow::ensure!(robot.state == State::Failed, "{transport}: {}", robot.state);
            // The end of its connection is recorded too (its health), just
            // after the session is gone.
            anyhow::ensure!(
                robot.health.status == HealthStatus::Unreachable,
                "{transport}: health {:?}",
                robot.health
            );
            Ok(())
        })
        .await;
        let events = api.events(id).await.expect("events").len();
        // The agent keeps trying; each attempt is refused as revoked.
        wait_until(secs(20), || async {
            let n = auth_failures(api, "agent", "revoked").await;
            anyhow::ensure!(n >= 2.0, "{transport}: {n} revoked refusals so far");
            Ok(())
        })
        .await;
        assert_eq!(
            api.events(id).await.expect("events").len(),
            events,
            "{transport}: a refused connection recorded something"
        );
        assert!(!api.robot_required(id).await.expect("robot").connected);
        let log = agent.log_text();
        assert!(
            log.contains("revoked"),
            "{transport}: the agent's log does not say why:\n{log}"
        );
        agent.kill();
    }
}

/// When the certificate `agent` holds now ends (Unix ms).
fn certificate_end_ms(agent: &Agent) -> i64 {
    let path = agent
        .state_dir()
        .join(kiwi_agent::credentials::TLS_DIR)
        .join("robot.pem");
    let pem = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read the agent's certificate {}: {e}", path.display()));
    let certs = kiwi_security::pki::certs_from_pem(&pem).expect("the agent's certificate");
    let info = kiwi_security::pki::CertInfo::parse(&certs[0]).expect("a readable certificate");
    kiwi_security::pki::unix_ms(info.not_after)
}

/// `kiwi-agent enroll` exits, refused, and its output says why.
async fn refused_enrollment(controller: &Controller, serial: &str, token: &str, why: &str) {
    let mut agent = AgentOptions::new(serial)
        .setting("enroll_token", token)
        .start(controller);
    let status = agent
        .wait_exit(secs(20))
        .await
        .unwrap_or_else(|| panic!("the agent with a bad token ({why}) keeps running"));
    assert!(!status.success(), "{why}: the agent exited with {status}");
    let log = agent.log_text();
    assert!(log.contains(why), "{why}: not in the agent's log:\n{log}");
    assert!(
        controller
            .api()
            .robot(agent.robot_id())
            .await
            .expect("robot")
            .is_none(),
        "{why}: a refused robot was recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_tokens_are_used_once_expire_and_pin_the_controller() {
    let controller = ControllerOptions::new().start().await;
    let api = controller.api();

    // One use: the first robot enrolls, the second is refused.
    let once = controller.create_token(&["--uses", "1"]);
    let first = AgentOptions::new(&test_serial(1))
        .setting("enroll_token", &once)
        .start(&controller);
    wait_ready_and_connected(api, first.robot_id(), secs(30)).await;
    refused_enrollment(&controller, &test_serial(2), &once, "already used").await;
    assert!(auth_failures(api, "enroll", "used_token").await >= 1.0);

    // Expired: used once the controller lists it expired.
    let short = controller.create_token(&["--ttl", "1s"]);
    let short_id = short.parse::<EnrollmentToken>().expect("a token").id;
    wait_until(secs(10), || async {
        let tokens: serde_json::Value = api.get_json("/api/v2/tokens").await?;
        let status = tokens["enrollment_tokens"]
            .as_array()
            .and_then(|all| all.iter().find(|t| t["id"] == short_id.as_str()))
            .map(|t| t["status"].clone());
        anyhow::ensure!(
            status.as_ref().is_some_and(|s| s == "expired"),
            "enrollment token {short_id}: status {status:?}"
        );
        Ok(())
    })
    .await;
    refused_enrollment(&controller, &test_serial(3), &short, "expired").await;
    assert!(auth_failures(api, "enroll", "expired_token").await >= 1.0);

    // A token that pins another CA: the agent refuses the controller and
    // sends nothing (the token keeps its use).
    let fresh = controller.create_token(&["--uses", "1"]);
    let mut forged: EnrollmentToken = fresh.parse().expect("a token");
    forged.ca_pin = Authority::create("elsewhere", hour()).expect("a CA").pin();
    refused_enrollment(
        &controller,
        &test_serial(4),
        &forged.to_string(),
        "is not the one the enrollment token pins",
    )
    .await;
    let tokens: serde_json::Value = api.get_json("/api/v2/tokens").await.expect("tokens");
    let left = tokens["enrollment_tokens"]
        .as_array()
        .and_then(|all| all.iter().find(|t| t["id"] == forged.id.as_str()))
        .map(|t| t["uses_left"].clone());
    assert_eq!(
        left,
        Some(serde_json::json!(1)),
        "the pinned-away token was not used: {tokens}"
    );
    // …and the real token still works.
    let fourth = AgentOptions::new(&test_serial(5))
        .setting("enroll_token", &fresh)
        .start(&controller);
    wait_ready_and_connected(api, fourth.robot_id(), secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_a_robot_waits_for_an_operator() {
    let controller = ControllerOptions::new().start().await;
    let api = controller.api();
    let approved = AgentOptions::new(&test_serial(1))
        .setting("enroll_token", "")
        .start(&controller);
    let mut rejected = AgentOptions::new(&test_serial(2))
        .setting("enroll_token", "")
        .start(&controller);

    let pending = |id: Uuid| async move {
        wait_until(secs(20), || async {
            let list: serde_json::Value =
                api.get_json("/api/v2/enrollments?status=pending").await?;
            list["enrollments"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["robot_id"] == id.to_string().as_str())
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("{id} not pending yet: {list}"))
        })
        .await
    };
    let first = pending(approved.robot_id()).await;
    let fingerprint = first["key_fingerprint"].as_str().expect("a fingerprint");
    assert!(
        approved.log_text().contains(fingerprint),
        "the agent logs the fingerprint the operator compares"
    );
    assert!(
        api.robot(approved.robot_id())
            .await
            .expect("robot")
            .is_none()
    );

    let approve = format!(
        "/api/v2/enrollments/{}/approve",
        first["id"].as_str().expect("id")
    );
    let raw = api
        .request(Method::POST, &approve, None)
        .await
        .expect("approve");
    assert_eq!(raw.status, StatusCode::OK, "{}", raw.body);
    wait_ready_and_connected(api, approved.robot_id(), secs(30)).await;

    let second = pending(rejected.robot_id()).await;
    let reject = format!(
        "/api/v2/enrollments/{}/reject",
        second["id"].as_str().expect("id")
    );
    let raw = api
        .request(Method::POST, &reject, None)
        .await
        .expect("reject");
    assert_eq!(raw.status, StatusCode::OK, "{}", raw.body);
    let status = rejected
        .wait_exit(secs(20))
        .await
        .expect("a rejected agent stops");
    assert!(!status.success());
    assert!(rejected.log_text().contains("rejected"));
    assert!(
        api.robot(rejected.robot_id())
            .await
            .expect("robot")
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_renewed_over_the_link_before_they_expire() {
    let controller = ControllerOptions::new()
        .setting("client_cert_ttl", "15s")
        .heartbeat_interval("200ms")
        .start()
        .await;
    let api = controller.api();
    let mut agents: Vec<Agent> = Vec::new();
    // When the certificate each agent enrolled with ends (or a later one,
    // should it already be renewed).
    let mut first_end_ms = Vec::new();
    for (n, transport) in [(1, "websocket"), (2, "quic")] {
        let agent = AgentOptions::new(&test_serial(n))
            .setting("transport", transport)
            .start(&controller);
        wait_ready_and_connected(api, agent.robot_id(), secs(30)).await;
        first_end_ms.push(certificate_end_ms(&agent));
        wait_until(secs(20), || async {
            let log = agent.log_text();
            anyhow::ensure!(
                log.contains("certificate renewed"),
                "{transport}: not renewed yet"
            );
            Ok(())
        })
        .await;
        agents.push(agent);
    }
    assert_eq!(agents.len(), 2);
    // Past the first certificates' end, both are still connected (the
    // controller hears from them after it) and never went offline.
    for ((n, agent), end_ms) in (1..).zip(&agents).zip(&first_end_ms) {
        let id = kiwi_tests::robot_id_for_serial(&test_serial(n));
        let robot = wait_until(secs(30), || async {
            let robot = api.robot_required(id).await?;
            let last_seen = kiwi_tests::api::timestamp_ms(robot.field("last_seen"));
            anyhow::ensure!(
                !robot.connected || last_seen.is_some_and(|t| t > *end_ms),
                "robot {id}: last heard from at {last_seen:?}, the first certificate ends at \
                 {end_ms} (Unix ms)"
            );
            Ok(robot)
        })
        .await;
        assert!(
            robot.connected && robot.state == State::Ready,
            "{robot:?}\nagent log:\n{}",
            agent.log_text()
        );
        let events = api.events(id).await.expect("events");
        assert!(
            !events.iter().any(|e| e.kind == "robot_offline"),
            "{events:#?}"
        );
    }
    // Restarted, each connects with its renewed certificate (the first one
    // has expired and would be refused).
    let expired_before = auth_failures(api, "agent", "expired").await;
    for agent in &mut agents {
        agent.kill();
        agent.start_again();
    }
    for agent in &agents {
        wait_until(secs(30), || async {
            let log = agent.log_text();
            anyhow::ensure!(
                log.matches("connected to the controller").count() >= 2,
                "not reconnected yet"
            );
            Ok(())
        })
        .await;
        wait_ready_and_connected(api, agent.robot_id(), secs(30)).await;
    }
    assert_eq!(auth_failures(api, "agent", "expired").await, expired_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_wants_a_token_with_a_strong_enough_role() {
    let controller = ControllerOptions::new().start().await;
    let agent = Agent::start(&controller, &test_serial(1));
    wait_ready_and_connected(controller.api(), agent.robot_id(), secs(30)).await;
    let anonymous = controller.api().as_token(None);
    let raw = anonymous
        .request(Method::GET, "/api/v2/robots", None)
        .await
        .expect("GET");
    assert_eq!(raw.status, StatusCode::UNAUTHORIZED, "{}", raw.body);
    for open in ["/healthz", "/readyz", "/metrics"] {
        let status = anonymous.get(open).await.expect("GET").status();
        assert_eq!(status, StatusCode::OK, "{open} stays open");
    }
    let viewer = controller.create_token(&["--role", "viewer"]);
    let viewer = controller.api().as_token(Some(&viewer));
    assert_eq!(viewer.robots().await.expect("a viewer reads").len(), 1);
    let start = format!("/api/v2/robots/{}/maintenance/start", agent.robot_id());
    let raw = viewer
        .request(Method::POST, &start, None)
        .await
        .expect("POST");
    assert_eq!(raw.status, StatusCode::FORBIDDEN, "{}", raw.body);
    let operator = controller.create_token(&["--role", "operator"]);
    let operator = controller.api().as_token(Some(&operator));
    let raw = operator
        .request(Method::POST, &start, None)
        .await
        .expect("POST");
    assert_eq!(raw.status, StatusCode::OK, "{}", raw.body);
    let raw = operator
        .request(Method::GET, "/api/v2/tokens", None)
        .await
        .expect("GET");
    assert_eq!(raw.status, StatusCode::FORBIDDEN, "{}", raw.body);
    assert!(
        controller
            .api()
            .metric("auth_failures_total", &[("surface", "api")])
            .await
            .expect("metrics")
            >= 3.0
    );
}

/// Sends a bare `POST /enroll` over TLS (no client certificate) and returns
/// the status code of the answer.
async fn enroll_status(controller: &Controller) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let ca = controller.ca();
    let mut tls = agent_port::connect_tls(
        controller.agent_addr(),
        agent_port::tls(ca.cert_der(), None, kiwi_security::verify::ALPN_HTTP1),
    )
    .await
    .expect("TLS to the agent port");
    tls.write_all(
        b"POST /enroll HTTP/1.1\r\nHost: kiwi\r\nContent-Type: application/json\r\n\
          Content-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await
    .expect("send");
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuse_limits_hold_per_address_and_are_counted() {
    let controller = ControllerOptions::new()
        .setting("enroll_per_minute", "2")
        .setting("max_connections_per_address", "2")
        .setting("auth_failures_per_minute", "3")
        .start()
        .await;
    let api = controller.api();
    let limited = async |limit: &str| {
        api.metric("rate_limited_total", &[("limit", limit)])
            .await
            .expect("metrics")
    };

    // Enrollment attempts: two a minute, then 429.
    assert_eq!(enroll_status(&controller).await, 400, "a malformed request");
    assert_eq!(enroll_status(&controller).await, 400);
    assert_eq!(enroll_status(&controller).await, 429, "over the rate");
    assert!(limited("enroll_rate").await >= 1.0);

    // Connections held at once: two, then the third is dropped (WebSocket
    // and QUIC alike).
    let ca = controller.ca();
    let cert = || Some(robot_cert(&ca, Uuid::new_v4(), hour()));
    let tls = |cert| agent_port::tls(ca.cert_der(), cert, kiwi_security::verify::ALPN_HTTP1);
    let first = agent_port::connect_tls(controller.agent_addr(), tls(cert()))
        .await
        .expect("first");
    let second = agent_port::connect_tls(controller.agent_addr(), tls(cert()))
        .await
        .expect("second");
    assert!(
        agent_port::connect_tls(controller.agent_addr(), tls(cert()))
            .await
            .is_err(),
        "a third connection from the address"
    );
    let quic = QuicConnector::new(
        controller.agent_addr().ip().to_string(),
        controller.agent_addr().port(),
        agent_port::tls(ca.cert_der(), cert(), ALPN_QUIC),
    );
    assert!(
        quic.connect().await.is_err(),
        "a third connection over QUIC"
    );
    assert!(limited("connections_per_address").await >= 2.0);
    drop((first, second));

    // Failed authentications: three a minute; then more bad certificates
    // from the address are told to wait (429), while a valid one still
    // gets in (the attack suite tests the same on every surface).
    // (The connections above give their slots back as the controller
    // notices they closed: retry until four refusals were counted.)
    wait_until(PROMPTLY, || async {
        let _ = agent_port::connect_ws(controller.agent_addr(), ca.cert_der(), None).await;
        let n = auth_failures(api, "agent", "no_certificate").await;
        anyhow::ensure!(n >= 4.0, "{n} refusals counted");
        Ok(())
    })
    .await;
    wait_until(PROMPTLY, || async {
        match agent_port::connect_ws(controller.agent_addr(), ca.cert_der(), None).await {
            Err(Ok(refused)) => anyhow::ensure!(
                refused.status == 429 && refused.body.contains("no_certificate"),
                "answered {} {}",
                refused.status,
                refused.body
            ),
            Ok(_) => anyhow::bail!("a connection without a certificate got in"),
            Err(Err(e)) => anyhow::bail!("{e:#}"),
        }
        anyhow::ensure!(limited("auth_failures").await >= 1.0, "not counted yet");
        Ok(())
    })
    .await;
    wait_until(PROMPTLY, || async {
        agent_port::connect_ws(controller.agent_addr(), ca.cert_der(), cert())
            .await
            .map(drop)
            .map_err(|e| anyhow::anyhow!("a valid certificate was refused: {e:?}"))
    })
    .await;
}
