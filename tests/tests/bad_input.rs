//! Bad input from the network: on the agent port (garbage, oversized,
//! foreign and malformed frames, a handshake in no common version) each
//! closes only the connection that sent it, is counted, and leaves a real
//! agent beside it untouched; on the REST API each gets a 4xx
//! problem+json, never a 5xx, promptly.

use std::net::IpAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use kiwi_protocol::frame::{DEFAULT_MAX_FRAME, decode_frame, encode_frame};
use kiwi_protocol::message::{Goodbye, Heartbeat, Hello, RejectReason};
use kiwi_protocol::version::{HANDSHAKE, SUPPORTED};
use kiwi_protocol::{
    AgentMessage, ControllerMessage, HardwareId, Identity, ProtocolVersion, RobotId, RobotType,
};
use kiwi_tests::agent_port;
use kiwi_tests::api::{PROBLEM_JSON, RawResponse};
use kiwi_tests::raw_http::{self, Framing};
use kiwi_tests::{
    Agent, Api, Controller, ControllerOptions, Event, State, secs, test_serial,
    wait_ready_and_connected, wait_until, within,
};
use reqwest::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// How long the controller may take to close a bad connection or answer a
/// bad request.
const PROMPTLY: Duration = Duration::from_secs(10);

/// The metric counting refused frames, labelled by `reason`.
const REJECTED: &str = "agent_frames_rejected_total";

/// An identity no real agent has.
fn stranger(name: &str) -> Identity {
    let hardware_id = HardwareId::Configured(format!("bad-input-{name}"));
    Identity {
        robot_id: RobotId::from_hardware(&hardware_id),
        hardware_id,
        hostname: format!("stranger-{name}"),
        robot_type: RobotType::Lekiwi,
        model: None,
        os_version: None,
        agent_version: "0.0.0-test".into(),
        mac_addresses: vec![[2, 0x88, 0, 0, 0, 0xee]],
        ip_addresses: vec![IpAddr::from([127, 0, 0, 1])],
    }
}

fn hello(name: &str, versions: Vec<ProtocolVersion>) -> AgentMessage {
    AgentMessage::Hello(Hello {
        identity: stranger(name),
        versions,
        last_acked_seq: 0,
    })
}

type Ws = kiwi_tests::agent_port::AgentWs;

/// A WebSocket to the agent endpoint with a valid certificate for the
/// stranger robot `name` (bad input comes from enrolled robots too).
async fn connect(controller: &Controller, name: &str) -> Ws {
    let ca = controller.ca();
    let cert = agent_port::robot_cert(&ca, stranger(name).robot_id.0, agent_port::hour());
    within(
        PROMPTLY,
        "the WebSocket handshake",
        agent_port::connect_ws(controller.agent_addr(), ca.cert_der(), Some(cert)),
    )
    .await
    .unwrap_or_else(|e| panic!("connect to the agent endpoint: {e:?}"))
}

/// Reads until the controller closes the connection, which it must do
/// within [`PROMPTLY`]; returns the protocol frames it sent before.
async fn frames_until_closed(ws: &mut Ws, case: &str) -> Vec<ControllerMessage> {
    let mut frames = Vec::new();
    within(
        PROMPTLY,
        &format!("{case}: closing the connection"),
        async {
            while let Some(msg) = ws.next().await {
                match msg {
                    Ok(Message::Binary(bytes)) => {
                        let (_, frame): (_, ControllerMessage) =
                            decode_frame(&bytes, DEFAULT_MAX_FRAME).unwrap_or_else(|e| {
                                panic!("{case}: the controller sent an undecodable frame: {e}")
                            });
                        frames.push(frame);
                    }
                    Ok(Message::Close(_)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        },
    )
    .await;
    frames
}

/// The real agent's robot is still ready, connected, and never went
/// offline; the controller still runs.
async fn assert_bystander_untouched(controller: &mut Controller, id: Uuid, case: &str) {
    assert!(controller.is_running(), "{case}: the controller died");
    let robot = controller
        .api()
        .robot_required(id)
        .await
        .expect("the bystander robot");
    assert!(
        robot.state == State::Ready && robot.connected,
        "{case}: the real agent's robot is {} (connected {})",
        robot.state,
        robot.connected
    );
    let events = controller.api().events(id).await.expect("events");
    assert!(
        !events.iter().any(|e: &Event| e.kind == "robot_offline"),
        "{case}: the real agent's robot went offline: {events:#?}"
    );
}

/// Waits until the rejection counter for `reason` (all reasons when `None`)
/// is above `before`.
async fn assert_counted(api: &Api, reason: Option<&'static str>, before: f64, case: &str) {
    wait_until(PROMPTLY, move || async move {
        let labels: Vec<(&str, &str)> = reason.map(|r| ("reason", r)).into_iter().collect();
        let now = api.metric(REJECTED, &labels).await?;
        anyhow::ensure!(
            now > before,
            "{case}: {REJECTED}{{reason={reason:?}}} is {now}, was {before}"
        );
        Ok(())
    })
    .await;
}

async fn rejected(api: &Api, reason: Option<&str>) -> f64 {
    let labels: Vec<(&str, &str)> = reason.map(|r| ("reason", r)).into_iter().collect();
    api.metric(REJECTED, &labels).await.expect("GET /metrics")
}

/// A controller with one real agent beside the bad peers.
struct Setup {
    controller: Controller,
    /// Kept alive for the test's length.
    _agent: Agent,
    bystander: Uuid,
}

async fn setup() -> Setup {
    let controller = ControllerOptions::new()
        .heartbeat_interval("200ms")
        .start()
        .await;
    let agent = Agent::start(&controller, &test_serial(1));
    let bystander = agent.robot_id();
    wait_ready_and_connected(controller.api(), bystander, secs(30)).await;
    Setup {
        controller,
        _agent: agent,
        bystander,
    }
}

impl Setup {
    /// The bystander is untouched, it is the only robot, the API is alive.
    async fn assert_only_bystander(&mut self, case: &str) {
        assert_bystander_untouched(&mut self.controller, self.bystander, case).await;
        let robots = self.controller.api().robots().await.expect("robots");
        assert_eq!(
            robots.iter().map(|r| r.robot_id).collect::<Vec<_>>(),
            vec![self.bystander],
            "{case}: only the real agent's robot exists"
        );
        let ok = self
            .controller
            .api()
            .get("/healthz")
            .await
            .expect("GET /healthz");
        assert_eq!(ok.status(), StatusCode::OK, "{case}: /healthz");
    }

    /// Sends one binary message and checks that only this connection is
    /// closed (with nothing but a `Reject` before), that the refusal is
    /// counted under `reason` (any reason when `None`), and that nothing
    /// else changed.
    async fn refuse_frame(&mut self, case: &str, bytes: Vec<u8>, reason: Option<&'static str>) {
        let before = rejected(self.controller.api(), reason).await;
        let mut ws = connect(&self.controller, "frames").await;
        match ws.send(Message::binary(bytes)).await {
            Ok(()) => {}
            // The controller may refuse a frame from its header and close
            // while the rest is still on its way: that is the refusal too.
            Err(tokio_tungstenite::tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) => {}
            Err(e) => panic!("{case}: sending failed: {e}"),
        }
        let answers = frames_until_closed(&mut ws, case).await;
        for answer in &answers {
            assert!(
                matches!(answer, ControllerMessage::Reject(_)),
                "{case}: the controller answered {answer:?}"
            );
        }
        assert_counted(self.controller.api(), reason, before, case).await;
        self.assert_only_bystander(case).await;
    }
}

/// A valid frame (a heartbeat) to corrupt.
fn valid_frame() -> Vec<u8> {
    encode_frame(
        HANDSHAKE,
        &AgentMessage::Heartbeat(Heartbeat { time_ms: 1 }),
        DEFAULT_MAX_FRAME,
    )
    .expect("encode a heartbeat")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_garbage_closes_only_that_connection() {
    let mut setup = setup().await;
    let case = "raw TCP garbage";
    let api = setup.controller.api().clone();
    let before = rejected(&api, None).await;
    let mut tcp = TcpStream::connect(setup.controller.agent_addr())
        .await
        .expect("connect over TCP");
    tcp.write_all(b"\x00\xff\x13KIWI garbage \x01\x02\x03\r\n\r\n")
        .await
        .expect("write garbage");
    within(PROMPTLY, "raw garbage: closing the connection", async {
        let mut buf = [0u8; 1024];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert_counted(&api, None, before, case).await;
    setup.assert_only_bystander(case).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_message_closes_only_that_connection() {
    setup()
        .await
        .refuse_frame(
            "garbage message",
            b"\x9c\x01\xffthis is no frame at all\x00\x00".to_vec(),
            None,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_over_64_kib_closes_only_that_connection() {
    let too_large = encode_frame(
        HANDSHAKE,
        &AgentMessage::Goodbye(Goodbye {
            reason: "x".repeat(DEFAULT_MAX_FRAME + 4096),
            back_in_s: None,
        }),
        usize::MAX,
    )
    .expect("encode an oversized frame");
    assert!(too_large.len() > DEFAULT_MAX_FRAME);
    setup()
        .await
        .refuse_frame("frame over 64 KiB", too_large, Some("too_large"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_magic_closes_only_that_connection() {
    let mut bad_magic = valid_frame();
    bad_magic[..4].copy_from_slice(b"KIWO");
    setup()
        .await
        .refuse_frame("wrong magic", bad_magic, Some("bad_magic"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_major_version_closes_only_that_connection() {
    let mut foreign_major = encode_frame(
        HANDSHAKE,
        &hello("major", SUPPORTED.to_vec()),
        DEFAULT_MAX_FRAME,
    )
    .expect("encode a hello");
    foreign_major[4] = 9;
    foreign_major[5] = 0;
    setup()
        .await
        .refuse_frame(
            "major version 9.0",
            foreign_major,
            Some("unsupported_version"),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_body_closes_only_that_connection() {
    let mut malformed = valid_frame()[..6].to_vec();
    // Variant 42 of AgentMessage does not exist.
    malformed.extend_from_slice(&[0x2a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    setup()
        .await
        .refuse_frame("malformed body", malformed, Some("malformed"))
        .await;
}

/// A well-formed Hello in a version the controller does not speak gets a
/// Reject that says which versions it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_in_unknown_versions_is_rejected_with_the_supported_ones() {
    let mut setup = setup().await;
    let case = "hello offering only 9.0";
    let api = setup.controller.api().clone();
    let before = rejected(&api, None).await;
    let mut ws = connect(&setup.controller, "versions").await;
    let frame = encode_frame(
        HANDSHAKE,
        &hello("versions", vec![ProtocolVersion::new(9, 0)]),
        DEFAULT_MAX_FRAME,
    )
    .expect("encode a hello");
    ws.send(Message::binary(frame)).await.expect("send hello");
    let answers = frames_until_closed(&mut ws, case).await;
    match answers.as_slice() {
        [ControllerMessage::Reject(reject)] => match &reject.reason {
            RejectReason::UnsupportedVersion { supported } => {
                assert_eq!(supported, SUPPORTED, "{case}: {reject:?}");
            }
            other => panic!("{case}: rejected for {other:?}"),
        },
        other => panic!("{case}: expected one Reject, got {other:?}"),
    }
    assert_counted(&api, None, before, case).await;
    let stranger_id = RobotId::from_hardware(&stranger("versions").hardware_id).0;
    assert!(
        api.robot(stranger_id)
            .await
            .expect("GET the stranger")
            .is_none(),
        "{case}: a refused handshake must not register a robot"
    );
    setup.assert_only_bystander(case).await;
}

/// A request the API must refuse with one of `statuses`.
struct BadRequest {
    case: &'static str,
    method: Method,
    path: String,
    body: Option<(&'static str, Vec<u8>)>,
    statuses: &'static [u16],
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_problem_json() {
    let controller = ControllerOptions::new().start().await;
    let api = controller.api();
    let agent = Agent::start(&controller, &test_serial(2));
    let id = agent.robot_id();
    wait_ready_and_connected(api, id, secs(30)).await;
    let fail = format!("/api/v2/robots/{id}/fail");

    let json = |bytes: &[u8]| Some(("application/json", bytes.to_vec()));
    let cases = [
        BadRequest {
            case: "malformed JSON",
            method: Method::POST,
            path: fail.clone(),
            body: json(b"{\"reason\": \"oops"),
            statuses: &[400, 422],
        },
        BadRequest {
            case: "unknown field",
            method: Method::POST,
            path: fail.clone(),
            body: json(br#"{"reason": "x", "blast_radius": 9}"#),
            statuses: &[400, 422],
        },
        BadRequest {
            case: "invalid UUID in the path",
            method: Method::GET,
            path: "/api/v2/robots/not-a-uuid".to_string(),
            body: None,
            statuses: &[400],
        },
        BadRequest {
            case: "invalid UUID in an action path",
            method: Method::POST,
            path: "/api/v2/robots/12345/provision".to_string(),
            body: None,
            statuses: &[400],
        },
    ];
    for BadRequest {
        case,
        method,
        path,
        body,
        statuses,
    } in cases
    {
        let raw = within(PROMPTLY, case, api.request(method, &path, body))
            .await
            .unwrap_or_else(|e| panic!("{case}: {e:#}"));
        check_problem(case, &raw, statuses);
    }

    // A body far over the limit, announced by its length and not: the
    // controller may answer before reading it all, so a bare client reads
    // the answer while still writing.
    for framing in [Framing::ContentLength, Framing::Chunked] {
        let case = format!("10 MiB body ({framing:?})");
        let raw = raw_http::send(
            controller.api_addr(),
            "POST",
            &fail,
            "application/json",
            api.token(),
            big_json_body(10 * 1024 * 1024),
            framing,
            PROMPTLY,
        )
        .await
        .unwrap_or_else(|e| panic!("{case}: {e:#}"));
        check_problem(&case, &raw, &[413]);
    }

    // None of it reached the state machine.
    let robot = api.robot_required(id).await.expect("robot");
    assert_eq!(robot.state, State::Ready, "the robot was not failed");
    assert!(controller.api().get("/healthz").await.is_ok());
}

/// The answer is a well-formed problem+json with one of `statuses`.
fn check_problem(case: &str, raw: &RawResponse, statuses: &[u16]) {
    let problem = raw.problem();
    assert!(
        statuses.contains(&raw.status.as_u16()),
        "{case}: expected one of {statuses:?}, got {problem}"
    );
    assert!(
        raw.content_type
            .as_deref()
            .is_some_and(|ct| ct.starts_with(PROBLEM_JSON)),
        "{case}: content type {:?}",
        raw.content_type
    );
    problem
        .check_well_formed()
        .unwrap_or_else(|e| panic!("{case}: {e:#}"));
}

/// A syntactically valid JSON object of about `len` bytes.
fn big_json_body(len: usize) -> Vec<u8> {
    let mut body = br#"{"reason": ""#.to_vec();
    body.resize(len - 2, b'a');
    body.extend_from_slice(b"\"}");
    body
}
