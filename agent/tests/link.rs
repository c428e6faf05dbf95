//! The agent's link against a fake controller on 127.0.0.1 that speaks the
//! real protocol through kiwi-protocol: handshake, heartbeats, reports,
//! commands, resending until acknowledged, retry-after and the idle timeout.
//! (The real controller is tested against real agents in the `tests`
//! crate; this crate does not own it.)

use futures_util::{SinkExt, StreamExt};
use kiwi_agent::Agent;
use kiwi_agent::config::ControllerUrl;
use kiwi_agent::link::{self, LinkOptions};
use kiwi_agent::transport::WebSocketConnector;
use kiwi_agent::workload::Workload;
use kiwi_protocol::backoff::Backoff;
use kiwi_protocol::frame::{self, DEFAULT_MAX_FRAME};
use kiwi_protocol::message::{
    Ack, AgentMessage, Command, CommandKind, CommandOutcome, ControllerMessage, DesiredConfig,
    Hello, Reject, RejectReason, Report, Welcome, WorkloadState,
};
use kiwi_protocol::version::{self, CURRENT, ProtocolVersion};
use kiwi_security::pki::{Authority, Validity};
use kiwi_security::verify::{self, ControllerTrust, ControllerVerifier};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(5);
const HEARTBEAT_MS: u32 = 100;

/// A controller stand-in over TLS, with its own CA and server certificate
/// (it does not ask for the agent's).
struct FakeController {
    listener: TcpListener,
    ca: Authority,
    acceptor: TlsAcceptor,
}

/// Where the agent connects, and the TLS settings that trust the fake.
#[derive(Clone)]
struct Endpoint {
    url: ControllerUrl,
    tls: Arc<rustls::ClientConfig>,
}

impl FakeController {
    async fn start() -> Self {
        kiwi_security::install_crypto_provider();
        let now = SystemTime::now();
        let ca =
            Authority::create("fake", Validity::starting(now, Duration::from_secs(3600))).unwrap();
        let server = ca
            .issue_server(
                &[],
                &["127.0.0.1".parse().unwrap()],
                Validity::starting(now, Duration::from_secs(3600)),
            )
            .unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![server.cert.der.clone(), ca.cert_der().clone()],
                kiwi_security::pki::private_key_from_pem(&server.key_pem).unwrap(),
            )
            .unwrap();
        Self {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            ca,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        }
    }

    fn endpoint(&self) -> Endpoint {
        let url = self
            .listener
            .local_addr()
            .unwrap()
            .to_string()
            .parse()
            .unwrap();
        let verifier = ControllerVerifier::new(ControllerTrust::Ca(self.ca.cert_der().clone()));
        Endpoint {
            url,
            tls: Arc::new(verify::client_config(verifier, None, verify::ALPN_HTTP1).unwrap()),
        }
    }

    async fn accept(&self) -> Conn {
        let (tcp, _) = tokio::time::timeout(WAIT, self.listener.accept())
            .await
            .expect("agent did not connect in time")
            .unwrap();
        let tls = self.acceptor.accept(tcp).await.unwrap();
        let ws = tokio_tungstenite::accept_async(tls).await.unwrap();
        Conn { ws }
    }
}

struct Conn {
    ws: WebSocketStream<tokio_rustls::server::TlsStream<TcpStream>>,
}

impl Conn {
    /// The next agent message and the version its frame carried.
    async fn recv(&mut self) -> (ProtocolVersion, AgentMessage) {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("no message from the agent in time")
                .expect("agent closed")
                .unwrap();
            match msg {
                Message::Binary(bytes) => {
                    return frame::decode_frame(&bytes, DEFAULT_MAX_FRAME).unwrap();
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    async fn hello(&mut self) -> Hello {
        match self.recv().await {
            (v, AgentMessage::Hello(h)) => {
                assert_eq!(v, version::HANDSHAKE);
                h
            }
            other => panic!("expected Hello, got {other:?}"),
        }
    }

    async fn send(&mut self, message: ControllerMessage) {
        let bytes = frame::encode_frame(CURRENT, &message, DEFAULT_MAX_FRAME).unwrap();
        self.ws.send(Message::Binary(bytes.into())).await.unwrap();
    }

    async fn welcome(&mut self, maintenance: bool) {
        self.send(ControllerMessage::Welcome(Welcome {
            session_id: Uuid::new_v4(),
            version: CURRENT,
            heartbeat_interval_ms: HEARTBEAT_MS,
            config: DesiredConfig {
                maintenance,
                report_interval_ms: 0,
                settings: Vec::new(),
            },
        }))
        .await;
    }

    async fn command(&mut self, kind: CommandKind) -> Uuid {
        let command_id = Uuid::new_v4();
        self.send(ControllerMessage::Command(Command { command_id, kind }))
            .await;
        command_id
    }

    /// Messages until the next heartbeat (excluded), skipping none.
    async fn until_heartbeat(&mut self) -> Vec<AgentMessage> {
        let mut out = Vec::new();
        loop {
            match self.recv().await.1 {
                AgentMessage::Heartbeat(_) => return out,
                other => out.push(other),
            }
        }
    }

    /// The next message that is not a heartbeat.
    async fn next_non_heartbeat(&mut self) -> AgentMessage {
        loop {
            match self.recv().await.1 {
                AgentMessage::Heartbeat(_) => continue,
                other => return other,
            }
        }
    }
}

fn reports(messages: &[AgentMessage]) -> Vec<&Report> {
    messages
        .iter()
        .filter_map(|m| match m {
            AgentMessage::Report(r) => Some(r),
            _ => None,
        })
        .collect()
}

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<Agent>,
    _state: tempfile::TempDir,
}

fn start_agent(endpoint: Endpoint) -> Running {
    start_agent_with(endpoint, Duration::ZERO)
}

/// An agent whose workload actions take `action_delay`.
fn start_agent_with(endpoint: Endpoint, action_delay: Duration) -> Running {
    let state = tempfile::tempdir().unwrap();
    let mut agent = Agent::simulated(0, "t", state.path(), Duration::from_secs(600), 100)
        .unwrap()
        .with_workload(Workload::Simulated {
            state: WorkloadState::Running,
            action_delay,
        });
    let connector = WebSocketConnector::new(&endpoint.url, endpoint.tls);
    let mut opts = LinkOptions::new(Backoff::new(
        Duration::from_millis(20),
        Duration::from_millis(100),
    ));
    opts.sample_interval = Duration::from_millis(20);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        link::run(&mut agent, &connector, &opts, &token).await;
        agent
    });
    Running {
        shutdown,
        task,
        _state: state,
    }
}

#[tokio::test]
async fn handshake_heartbeats_reports_commands_and_goodbye() {
    let ctl = FakeController::start().await;
    let agent = start_agent(ctl.endpoint());
    let mut conn = ctl.accept().await;

    let hello = conn.hello().await;
    assert_eq!(hello.identity.hostname, "t-00000");
    assert_eq!(
        hello.identity.hardware_id,
        kiwi_protocol::HardwareId::Configured("t-0".into())
    );
    assert_eq!(hello.versions, version::SUPPORTED.to_vec());
    assert_eq!(hello.last_acked_seq, 0);

    conn.welcome(false).await;
    // The first observation is reported at once, then heartbeats follow at
    // the interval the controller gave.
    let (v, first) = conn.recv().await;
    assert_eq!(v, CURRENT);
    match first {
        AgentMessage::Report(r) => {
            assert_eq!(r.seq, 1);
            assert!(!r.maintenance);
        }
        other => panic!("expected the first report, got {other:?}"),
    }
    // Gaps measured on the agent's clock (stamped when sent), so that a
    // slow reader here cannot squeeze them.
    let mut beats = Vec::new();
    while beats.len() < 4 {
        if let (_, AgentMessage::Heartbeat(h)) = conn.recv().await {
            beats.push(h.time_ms);
        }
    }
    for pair in beats.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            (i64::from(HEARTBEAT_MS) - 10..=1000).contains(&gap),
            "heartbeat gap {gap} ms at an interval of {HEARTBEAT_MS} ms"
        );
    }

    let id = conn.command(CommandKind::EnterMaintenance).await;
    match conn.next_non_heartbeat().await {
        AgentMessage::CommandResult(r) => {
            assert_eq!(r.command_id, id);
            assert_eq!(r.outcome, CommandOutcome::Done);
        }
        other => panic!("expected a command result, got {other:?}"),
    }
    match conn.next_non_heartbeat().await {
        AgentMessage::Report(r) => {
            assert_eq!(r.seq, 2);
            assert!(r.maintenance);
        }
        other => panic!("expected a report of the change, got {other:?}"),
    }
    let id = conn.command(CommandKind::RestartWorkload).await;
    match conn.next_non_heartbeat().await {
        AgentMessage::CommandResult(r) => {
            assert_eq!(r.command_id, id);
            assert!(matches!(r.outcome, CommandOutcome::Failed { .. }));
        }
        other => panic!("expected a command result, got {other:?}"),
    }

    agent.shutdown.cancel();
    match conn.next_non_heartbeat().await {
        AgentMessage::Goodbye(g) => {
            assert_eq!(g.reason, "shutdown");
            assert_eq!(g.back_in_s, None);
        }
        other => panic!("expected Goodbye, got {other:?}"),
    }
    let agent = tokio::time::timeout(WAIT, agent.task)
        .await
        .unwrap()
        .unwrap();
    assert!(agent.maintenance());
}

#[tokio::test]
async fn unacknowledged_reports_are_resent_until_acked() {
    let ctl = FakeController::start().await;
    let agent = start_agent(ctl.endpoint());

    let mut conn = ctl.accept().await;
    conn.hello().await;
    conn.welcome(false).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match conn.next_non_heartbeat().await {
            AgentMessage::Report(r) => {
                seen.push(r.seq);
                if r.seq == 1 {
                    // A change makes the second report.
                    conn.command(CommandKind::EnterMaintenance).await;
                }
            }
            AgentMessage::CommandResult(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, vec![1, 2]);
    // Cut the link without an Ack.
    drop(conn);

    let mut conn = ctl.accept().await;
    assert_eq!(conn.hello().await.last_acked_seq, 0);
    conn.welcome(true).await;
    let resent = conn.until_heartbeat().await;
    let seqs: Vec<u64> = reports(&resent).iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![1, 2]);
    assert!(reports(&resent)[1].maintenance);
    conn.send(ControllerMessage::Ack(Ack { seq: 2 })).await;
    // Commands are handled in order, so its result means the Ack was too.
    conn.command(CommandKind::Ping).await;
    assert!(matches!(
        conn.next_non_heartbeat().await,
        AgentMessage::CommandResult(_)
    ));
    drop(conn);

    let mut conn = ctl.accept().await;
    assert_eq!(conn.hello().await.last_acked_seq, 2);
    conn.welcome(true).await;
    let after_ack = conn.until_heartbeat().await;
    assert!(
        reports(&after_ack).is_empty(),
        "acknowledged reports resent: {after_ack:?}"
    );
    agent.shutdown.cancel();
    let agent = tokio::time::timeout(WAIT, agent.task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(agent.outbox().acked(), 2);
    assert!(agent.outbox().pending().is_empty());
}

#[tokio::test]
async fn reject_with_retry_after_delays_the_reconnect() {
    let ctl = FakeController::start().await;
    let agent = start_agent(ctl.endpoint());

    let mut conn = ctl.accept().await;
    conn.hello().await;
    let retry_after = Duration::from_millis(600);
    conn.send(ControllerMessage::Reject(Reject {
        reason: RejectReason::Overloaded,
        retry_after_ms: Some(retry_after.as_millis() as u32),
    }))
    .await;
    let rejected_at = Instant::now();
    drop(conn);

    let mut conn = ctl.accept().await;
    let waited = rejected_at.elapsed();
    assert!(
        waited >= retry_after,
        "reconnected after {waited:?}, before the retry-after of {retry_after:?}"
    );
    conn.hello().await;
    agent.shutdown.cancel();
    tokio::time::timeout(WAIT, agent.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_silent_controller_is_left_after_the_idle_timeout() {
    let ctl = FakeController::start().await;
    let agent = start_agent(ctl.endpoint());

    let mut conn = ctl.accept().await;
    conn.hello().await;
    conn.welcome(false).await;
    // Stop reading: the agent's pings go unanswered and nothing else comes.
    let silent_from = Instant::now();
    let mut next = ctl.accept().await;
    let gone_after = silent_from.elapsed();
    let idle = Duration::from_millis(3 * u64::from(HEARTBEAT_MS));
    assert!(
        gone_after >= idle,
        "reconnected after {gone_after:?}, before the idle timeout {idle:?}"
    );
    next.hello().await;
    drop(conn);
    agent.shutdown.cancel();
    tokio::time::timeout(WAIT, agent.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn slow_workload_actions_do_not_stop_heartbeats_and_commands_stay_in_order() {
    let ctl = FakeController::start().await;
    let agent = start_agent_with(ctl.endpoint(), Duration::from_millis(500));

    let mut conn = ctl.accept().await;
    conn.hello().await;
    conn.welcome(false).await;
    assert!(matches!(conn.recv().await.1, AgentMessage::Report(_)));
    let slow = conn.command(CommandKind::EnterMaintenance).await;
    let ping = conn.command(CommandKind::Ping).await;
    let mut heartbeats_before_result = 0;
    let mut results = Vec::new();
    while results.len() < 2 {
        match conn.recv().await.1 {
            AgentMessage::Heartbeat(_) if results.is_empty() => heartbeats_before_result += 1,
            AgentMessage::CommandResult(r) => {
                assert_eq!(r.outcome, CommandOutcome::Done);
                results.push(r.command_id);
            }
            _ => {}
        }
    }
    // 500 ms of stopping at a 100 ms heartbeat interval.
    assert!(
        heartbeats_before_result >= 3,
        "only {heartbeats_before_result} heartbeats while the workload stopped"
    );
    assert_eq!(results, vec![slow, ping]);
    agent.shutdown.cancel();
    tokio::time::timeout(WAIT, agent.task)
        .await
        .unwrap()
        .unwrap();
}
