//! The QUIC transport end to end on loopback: the agent's
//! `QuicConnector`/`QuicConnection` against the controller's
//! `link::quic::serve`, in one process, with certificates from the
//! controller's own CA (and a foreign one).

use kiwi_agent::transport::{Close, Connection, Connector, Incoming, QuicConnector};
use kiwi_controller::config::Config;
use kiwi_controller::link::quic::{self, QuicSettings};
use kiwi_controller::serve::Components;
use kiwi_controller::sessions::now_ms;
use kiwi_controller::testing::messages::{hello, report};
use kiwi_protocol::frame::{self, DEFAULT_MAX_FRAME};
use kiwi_protocol::message::{Ack, AgentMessage, ControllerMessage, Goodbye, Reject, RejectReason};
use kiwi_protocol::version;
use kiwi_protocol::{HardwareId, RobotId};
use kiwi_security::pki::{Authority, Validity, generate_key};
use kiwi_security::verify::{ALPN_QUIC, ControllerTrust, ControllerVerifier, client_config};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

const HOUR: Duration = Duration::from_secs(3600);

/// A controller serving QUIC on a free loopback port.
struct Controller {
    c: Components,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

async fn controller() -> Controller {
    kiwi_security::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        state_dir: dir.path().to_path_buf(),
        // No Provision command in the way of the acks.
        auto_provision: false,
        ..Config::default()
    };
    let c = Components::build(config, CancellationToken::new())
        .await
        .unwrap();
    let settings = QuicSettings {
        keep_alive: c.config.heartbeat_interval,
        idle_timeout: c.config.liveness_timeout,
        max_frame: DEFAULT_MAX_FRAME,
    };
    let endpoint = quic::endpoint(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        c.pki.server_config(ALPN_QUIC),
        &settings,
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let server = tokio::spawn(quic::serve(endpoint, c.link_state()));
    Controller {
        c,
        addr,
        server,
        _dir: dir,
    }
}

type ClientIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// A certificate from `ca` for `name`'s robot, valid over `validity`.
fn robot_cert(ca: &Authority, name: &str, validity: Validity) -> ClientIdentity {
    let key = generate_key().unwrap();
    let cert = ca
        .issue_robot_for(&key, robot_id(name).0, validity)
        .unwrap();
    (
        vec![cert.der],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

fn now_for_an_hour() -> Validity {
    Validity::starting(SystemTime::now(), HOUR)
}

fn robot_id(name: &str) -> RobotId {
    RobotId::from_hardware(&HardwareId::Configured(name.into()))
}

impl Controller {
    fn tls(&self, identity: Option<ClientIdentity>) -> Arc<rustls::ClientConfig> {
        let verifier = ControllerVerifier::new(ControllerTrust::Ca(self.c.pki.ca_cert().clone()));
        Arc::new(client_config(verifier, identity, ALPN_QUIC).unwrap())
    }

    fn connector(&self, identity: Option<ClientIdentity>) -> QuicConnector {
        let mut connector =
            QuicConnector::new("127.0.0.1".into(), self.addr.port(), self.tls(identity));
        connector.connect_timeout = Duration::from_secs(5);
        connector
    }

    /// A connector presenting a good certificate for `name`.
    fn robot(&self, name: &str) -> QuicConnector {
        self.connector(Some(robot_cert(self.c.pki.ca(), name, now_for_an_hour())))
    }

    fn metric(&self, line: &str) -> bool {
        self.c.metrics.encode().lines().any(|l| l == line)
    }
}

async fn send(conn: &mut impl Connection, v: version::ProtocolVersion, msg: &AgentMessage) {
    let bytes = frame::encode_frame(v, msg, DEFAULT_MAX_FRAME).unwrap();
    conn.send(bytes).await.unwrap();
}

/// The next controller message, skipping liveness.
async fn next(conn: &mut impl Connection) -> ControllerMessage {
    loop {
        let got = tokio::time::timeout(Duration::from_secs(5), conn.recv())
            .await
            .expect("an answer in time")
            .expect("readable");
        match got {
            Incoming::Alive => continue,
            Incoming::Frame(f) => {
                return frame::decode_frame::<ControllerMessage>(&f, DEFAULT_MAX_FRAME)
                    .unwrap()
                    .1;
            }
            Incoming::Closed(why) => panic!("closed: {why:?}"),
        }
    }
}

/// Reads until the connection ends; what it said when it did.
async fn closed(conn: &mut impl Connection) -> Option<String> {
    loop {
        let got = tokio::time::timeout(Duration::from_secs(5), conn.recv())
            .await
            .expect("closed in time");
        match got {
            Ok(Incoming::Closed(why)) => return why,
            Ok(_) => continue,
            Err(e) => panic!("read failed instead of a close: {e}"),
        }
    }
}

#[tokio::test]
async fn an_agent_is_welcomed_and_its_reports_acknowledged() {
    let ctl = controller().await;
    let connector = ctl.robot("quic-robot");
    assert_eq!(
        connector.describe(),
        format!("quic://127.0.0.1:{}", ctl.addr.port())
    );
    let mut conn = connector.connect().await.unwrap();
    send(&mut conn, version::HANDSHAKE, &hello("quic-robot")).await;
    let ControllerMessage::Welcome(welcome) = next(&mut conn).await else {
        panic!("expected Welcome");
    };
    assert_eq!(welcome.version, version::CURRENT);
    let id = robot_id("quic-robot");
    assert!(ctl.c.sessions.is_connected(&id));
    assert!(ctl.metric("agent_handshakes_total{transport=\"quic\"} 1"));

    send(&mut conn, welcome.version, &report(1)).await;
    assert_eq!(
        next(&mut conn).await,
        ControllerMessage::Ack(Ack { seq: 1 })
    );

    // Liveness both ways: the controller's markers arrive every heartbeat
    // interval, and the agent's touch its session.
    let alive = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if conn.recv().await.unwrap() == Incoming::Alive {
                return;
            }
        }
    })
    .await;
    assert!(alive.is_ok(), "no liveness marker from the controller");
    let before = ctl.c.sessions.last_seen_ms(&id).unwrap();
    // Arrivals are recorded in wall-clock milliseconds: one recorded from
    // the next millisecond on is seen to move `last_seen`.
    while now_ms() <= before {
        tokio::task::yield_now().await;
    }
    conn.keepalive().await.unwrap();
    let touched = tokio::time::timeout(Duration::from_secs(2), async {
        while ctl.c.sessions.last_seen_ms(&id).unwrap() <= before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(touched.is_ok(), "the agent's liveness marker was not seen");

    // Goodbye: delivered although the agent closes right after, and the
    // controller then ends the connection.
    let bye = AgentMessage::Goodbye(Goodbye {
        reason: "charging".into(),
        back_in_s: Some(60),
    });
    send(&mut conn, welcome.version, &bye).await;
    conn.close(Close::Normal).await;
    assert_eq!(closed(&mut conn).await, None);
    let left = tokio::time::timeout(Duration::from_secs(3), async {
        while !ctl.c.sessions.is_planned_absent(&id) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(left.is_ok(), "the Goodbye was not read");
    assert!(!ctl.c.sessions.is_connected(&id));
}

#[tokio::test]
async fn refused_certificates_close_with_their_reason() {
    let ctl = controller().await;
    let other = Authority::create("another", now_for_an_hour()).unwrap();
    let past = Validity {
        not_before: SystemTime::now() - 2 * HOUR,
        not_after: SystemTime::now() - HOUR,
    };
    let revoked = robot_cert(ctl.c.pki.ca(), "quic-revoked", now_for_an_hour());
    let serial = kiwi_security::pki::CertInfo::parse(&revoked.0[0])
        .unwrap()
        .serial;
    ctl.c.agent_auth.add_revoked([serial]);
    let cases = [
        ("no_certificate", None),
        ("revoked", Some(revoked)),
        (
            "unknown_ca",
            Some(robot_cert(&other, "quic-foreign", now_for_an_hour())),
        ),
        (
            "expired",
            Some(robot_cert(ctl.c.pki.ca(), "quic-expired", past)),
        ),
    ];
    for (reason, identity) in cases {
        let e = ctl.connector(identity).connect().await.unwrap_err();
        let text = e.to_string();
        assert!(text.contains(reason), "{reason}: {text}");
        assert!(text.contains("refused"), "{reason}: {text}");
        let line = format!("auth_failures_total{{surface=\"agent\",reason=\"{reason}\"}} 1");
        assert!(ctl.metric(&line), "{line} missing");
    }
    assert!(ctl.c.sessions.is_empty());
}

#[tokio::test]
async fn a_hello_for_another_robot_is_rejected_before_the_close() {
    let ctl = controller().await;
    let mut conn = ctl.robot("quic-a").connect().await.unwrap();
    send(&mut conn, version::HANDSHAKE, &hello("quic-b")).await;
    assert!(matches!(
        next(&mut conn).await,
        ControllerMessage::Reject(Reject {
            reason: RejectReason::ProtocolViolation { .. },
            ..
        })
    ));
    assert_eq!(closed(&mut conn).await, None);
    assert!(ctl.metric("auth_failures_total{surface=\"agent\",reason=\"identity_mismatch\"} 1"));
}

/// A raw QUIC client with a good certificate, for bytes the agent's
/// transport would never send.
async fn raw_stream(
    ctl: &Controller,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
) {
    let tls = ctl.tls(Some(robot_cert(
        ctl.c.pki.ca(),
        "quic-raw",
        now_for_an_hour(),
    )));
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let connection = endpoint
        .connect(ctl.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&[0; 4]).await.unwrap();
    let mut admitted = [1; 4];
    recv.read_exact(&mut admitted).await.unwrap();
    assert_eq!(admitted, [0; 4], "the controller's admission marker");
    (endpoint, connection, send, recv)
}

#[tokio::test]
async fn an_oversized_record_is_refused_from_its_length() {
    let ctl = controller().await;
    let (_endpoint, connection, mut send, mut recv) = raw_stream(&ctl).await;
    // Only the length: 4 GiB would never be buffered, and the controller
    // does not wait for it.
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1024))
        .await
        .expect("the controller ends the stream");
    assert!(rest.is_ok_and(|r| r.is_empty()));
    let closed = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
    assert!(closed.is_ok(), "the controller closes the connection");
    assert!(ctl.metric("agent_frames_rejected_total{reason=\"too_large\"} 1"));
    assert!(ctl.c.cache.is_empty(), "nothing was recorded");
}

#[tokio::test]
async fn shutdown_closes_connections_and_the_endpoint() {
    let ctl = controller().await;
    let mut conn = ctl.robot("quic-shutdown").connect().await.unwrap();
    send(&mut conn, version::HANDSHAKE, &hello("quic-shutdown")).await;
    assert!(matches!(
        next(&mut conn).await,
        ControllerMessage::Welcome(_)
    ));
    let mut late = ctl.robot("quic-late");
    late.connect_timeout = Duration::from_millis(500);
    let Controller { c, server, .. } = ctl;
    c.sessions.close_all("controller shutting down");
    c.shutdown.cancel();
    closed(&mut conn).await;
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns after shutdown")
        .unwrap();
    assert!(late.connect().await.is_err(), "the endpoint is closed");
}
