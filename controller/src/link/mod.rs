//! The agent endpoint: the protocol logic of one agent connection, over any
//! [`transport::AgentTransport`] (this build: [`websocket`], a WebSocket at
//! `/agent` on the agent port, one frame per binary message).
//!
//! A connection must open with a `Hello`; the controller negotiates the
//! version (or refuses with the versions it speaks), records the robot's
//! arrival through the fleet, answers `Welcome`, and then relays reports,
//! heartbeats, command results and commands until the connection ends.
//! Any bad frame closes only its own connection, with a logged reason and a
//! count in `agent_frames_rejected_total`.

pub mod quic;
pub mod transport;
pub mod websocket;

pub use websocket::serve;

use crate::breakers::{Breakers, Outcome};
use crate::domain::Input;
use crate::domain::event::IdentityFacts;
use crate::fleet::{Context, Fleet, FleetError, storable};
use crate::metrics::{Metrics, ReasonLabels};
use crate::security::{AgentAuth, Principal};
use crate::sessions::{Session, SessionRegistry, now_ms};
use governor::Quota;
use kiwi_protocol::frame;
use kiwi_protocol::identity::format_mac;
use kiwi_protocol::message::{
    Ack, AgentMessage, Command, CommandOutcome, ControllerMessage, Hello, IssuedCertificate,
    Reject, RejectReason, RenewRefused, Welcome,
};
use kiwi_protocol::version::{self, ProtocolVersion};
use kiwi_protocol::{Identity, RobotId};
use kiwi_security::verify::CertRefusal;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use transport::{AgentTransport, Incoming, TransportError};

/// Settings of the agent endpoint.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub heartbeat_interval: Duration,
    /// How long a new connection may take to send its `Hello`.
    pub handshake_timeout: Duration,
    pub max_frame: usize,
    pub max_agents: usize,
    /// Arrivals (a `Hello` being recorded) at once; more are shed with a
    /// `Reject { Overloaded, retry_after }`.
    pub max_arrivals: usize,
    /// Reports per second one agent may send, and its burst; faster ones
    /// are paced (its connection is not read until the next is due).
    pub report_rate: NonZeroU32,
    pub report_burst: NonZeroU32,
}

#[derive(Debug)]
pub struct LinkState {
    pub fleet: Fleet,
    /// The connected agents (the same registry the fleet holds).
    pub sessions: Arc<SessionRegistry>,
    pub breakers: Arc<Breakers>,
    /// Admits agents by their client certificates (every transport).
    pub auth: Arc<AgentAuth>,
    /// Issues certificates: `POST /enroll`, and renewals over the link.
    pub enroller: Arc<crate::security::Enroller>,
    pub metrics: Arc<Metrics>,
    pub config: LinkConfig,
    /// Permits for arrivals being recorded (`config.max_arrivals`).
    pub arrivals: Arc<Semaphore>,
    /// Cancelled at shutdown: connections close without recording robots
    /// as lost (the controller is leaving, not the robots).
    pub shutdown: CancellationToken,
}

/// What a shed agent is told to wait before it tries again (it adds its
/// own jitter, so the shed ones do not return together).
const SHED_RETRY_AFTER: Duration = Duration::from_secs(2);

/// One agent's report pace.
type ReportPace = governor::DefaultDirectRateLimiter;

/// Outbound messages queued per agent before commands are refused.
const OUTBOUND_QUEUE: usize = 64;

/// How a connection ended.
enum End {
    /// The agent said goodbye (with its planned downtime, if any).
    Goodbye {
        reason: String,
        back_in_s: Option<u32>,
    },
    /// The connection was lost or closed.
    Lost(String),
}

/// The context of what an agent's session records: its session id is
/// the correlation id.
fn session_context(session: &Session) -> Context {
    Context {
        actor: "agent",
        correlation_id: Some(session.session_id),
        causation_id: None,
    }
}

/// One agent connection, from `Hello` to its end.
#[derive(Debug)]
pub struct Connection<T> {
    state: Arc<LinkState>,
    peer: SocketAddr,
    /// Whose certificate the agent presented (checked by the transport
    /// with [`AgentAuth::admit`] before this connection was made).
    principal: Principal,
    transport: T,
}

impl<T: AgentTransport> Connection<T> {
    pub fn new(state: Arc<LinkState>, transport: T, principal: Principal) -> Self {
        Connection {
            peer: transport.peer(),
            state,
            principal,
            transport,
        }
    }

    /// Serves the connection until it ends.
    pub async fn run(mut self) {
        let Some((hello, version)) = Box::pin(self.handshake()).await else {
            return;
        };
        let robot_id = hello.identity.robot_id;
        // Shed load rather than fall over: when too many arrivals are
        // being recorded at once (a controller restart with a large
        // fleet, a slow store), later ones are told to come back.
        let Ok(arriving) = self.state.arrivals.clone().try_acquire_owned() else {
            self.state
                .metrics
                .agent_connections_refused
                .get_or_create(&ReasonLabels {
                    reason: "overloaded",
                })
                .inc();
            tracing::info!(%robot_id, peer = %self.peer, "too many arrivals at once; agent told to retry");
            Box::pin(self.reject(RejectReason::Overloaded, Some(SHED_RETRY_AFTER))).await;
            return;
        };
        let (tx, mut outbound) = mpsc::channel(OUTBOUND_QUEUE);
        let session = Session::new(
            robot_id,
            self.peer,
            tx,
            self.state.shutdown.child_token(),
            self.state.config.heartbeat_interval,
        )
        .with_cert_serial(self.principal.serial.clone());
        let sessions = self.state.sessions.clone();
        if let Some(old) = sessions.register(session.clone()) {
            old.close("replaced by a new connection from the same robot");
        }
        self.state.metrics.agent_connections.inc();
        // Boxed: the Hello, the robot's row, its events and the store's
        // future are needed only to welcome the agent; an idle
        // connection's task keeps neither them nor room for them.
        let welcomed = Box::pin(self.welcome(hello, version, &session)).await;
        drop(arriving);
        let end = match welcomed {
            Ok(()) => self.serve_session(version, &session, &mut outbound).await,
            Err(reason) => Err(reason),
        }
        .unwrap_or_else(End::Lost);
        self.state.metrics.agent_connections.dec();
        if session.is_abandoned() {
            self.transport.abandon();
        } else {
            self.transport.close().await;
        }
        if !sessions.remove_if_current(&robot_id, session.session_id)
            || self.state.shutdown.is_cancelled()
        {
            return;
        }
        let ctx = session_context(&session);
        let reason = match end {
            End::Goodbye {
                back_in_s: Some(secs),
                reason,
            } => {
                tracing::info!(%robot_id, reason, back_in_s = secs, "agent left for planned downtime");
                sessions.plan_absence(robot_id, now_ms() + i64::from(secs) * 1000);
                return;
            }
            End::Goodbye { reason, .. } => format!("agent said goodbye: {reason}"),
            End::Lost(reason) => session.close_reason().unwrap_or(reason),
        };
        tracing::info!(%robot_id, peer = %self.peer, reason, "agent connection ended");
        // The store's futures are large and this one runs once: boxed, so
        // that every idle connection's task does not carry room for it.
        if let Err(e) = Box::pin(self.state.fleet.lose_if_absent(robot_id, reason, &ctx)).await {
            tracing::error!(%robot_id, error = %e, "could not record the robot as lost");
        }
    }

    /// Refuses a frame: counts it, logs why, closes the connection.
    async fn refuse(&mut self, reason: &'static str, detail: &str) {
        self.state.metrics.frame_rejected(reason);
        tracing::warn!(peer = %self.peer, reason, detail, "agent frame refused; closing the connection");
        self.transport.close().await;
    }

    async fn send_frame(
        &mut self,
        version: ProtocolVersion,
        msg: &ControllerMessage,
    ) -> Result<(), String> {
        let bytes = frame::encode_frame(version, msg, self.state.config.max_frame)
            .map_err(|e| e.to_string())?;
        self.transport
            .send(bytes)
            .await
            .map_err(|e| format!("send failed: {e}"))
    }

    async fn reject(&mut self, reason: RejectReason, retry_after: Option<Duration>) {
        let msg = ControllerMessage::Reject(Reject {
            reason,
            retry_after_ms: retry_after.map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
        });
        let _ = self.send_frame(version::HANDSHAKE, &msg).await;
        self.transport.close().await;
    }

    /// Reads the `Hello` and negotiates a version; `None` when the
    /// connection was refused (already answered and counted).
    async fn handshake(&mut self) -> Option<(Hello, ProtocolVersion)> {
        let first =
            tokio::time::timeout(self.state.config.handshake_timeout, self.transport.recv()).await;
        let bytes = match first {
            Err(_) => {
                self.refuse("handshake_timeout", "no Hello in time").await;
                return None;
            }
            Ok(Ok(Incoming::Frame(b))) => b,
            Ok(Ok(Incoming::Closed)) | Ok(Err(TransportError::Failed(_))) => return None,
            Ok(Ok(Incoming::Alive)) => {
                self.refuse("protocol_violation", "expected a Hello frame")
                    .await;
                return None;
            }
            Ok(Err(TransportError::Refused { reason, detail })) => {
                self.refuse(reason, &detail).await;
                return None;
            }
        };
        let hello = match frame::decode_frame::<AgentMessage>(&bytes, self.state.config.max_frame) {
            Ok((_, AgentMessage::Hello(h))) => h,
            Ok((_, other)) => {
                let detail = format!("expected Hello, got {}", message_name(&other));
                self.state.metrics.frame_rejected("protocol_violation");
                self.reject(RejectReason::ProtocolViolation { detail }, None)
                    .await;
                return None;
            }
            Err(e) => {
                self.refuse(e.kind(), &e.to_string()).await;
                return None;
            }
        };
        let Some(version) = version::negotiate(&hello.versions, version::SUPPORTED) else {
            self.state.metrics.frame_rejected("no_common_version");
            tracing::warn!(peer = %self.peer, offered = ?hello.versions, "agent speaks no version we know");
            self.reject(
                RejectReason::UnsupportedVersion {
                    supported: version::SUPPORTED.to_vec(),
                },
                None,
            )
            .await;
            return None;
        };
        if hello.identity.robot_id != self.principal.robot_id {
            let refusal = CertRefusal::IdentityMismatch {
                cert: self.principal.robot_id.0,
                hello: hello.identity.robot_id.0,
            };
            let _ = self
                .state
                .auth
                .refused(self.peer, self.transport.name(), &refusal);
            self.reject(
                RejectReason::ProtocolViolation {
                    detail: refusal.to_string(),
                },
                None,
            )
            .await;
            return None;
        }
        if let Err(detail) = hello.identity.check() {
            self.state.metrics.frame_rejected("bad_identity");
            tracing::warn!(peer = %self.peer, detail, "agent identity refused");
            self.reject(RejectReason::ProtocolViolation { detail }, None)
                .await;
            return None;
        }
        if self.state.sessions.len() >= self.state.config.max_agents {
            self.state
                .metrics
                .agent_connections_refused
                .get_or_create(&ReasonLabels {
                    reason: "max_agents",
                })
                .inc();
            self.reject(RejectReason::Overloaded, Some(Duration::from_secs(5)))
                .await;
            return None;
        }
        Some((hello, version))
    }

    /// Records the agent's arrival and sends the `Welcome`.
    async fn welcome(
        &mut self,
        hello: Hello,
        version: ProtocolVersion,
        session: &Session,
    ) -> Result<(), String> {
        let robot_id = hello.identity.robot_id;
        let ctx = session_context(session);
        let facts = facts(&hello.identity, self.peer);
        drop(hello);
        let applied = match self
            .state
            .fleet
            .apply(robot_id, Input::AgentConnected { facts }, &ctx)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(%robot_id, error = %e, "cannot record the agent's arrival");
                self.reject(RejectReason::Overloaded, Some(Duration::from_secs(2)))
                    .await;
                return Err(format!("arrival not recorded: {e}"));
            }
        };
        tracing::info!(%robot_id, peer = %self.peer, %version, state = %applied.robot.robot.state, "agent connected");
        let welcome = ControllerMessage::Welcome(Welcome {
            session_id: session.session_id,
            version,
            heartbeat_interval_ms: u32::try_from(self.state.config.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            config: self.state.fleet.desired_config(&applied.robot.robot),
        });
        drop(applied);
        self.send_frame(version::HANDSHAKE, &welcome).await
    }

    /// The established session: frames from the agent, commands for it and
    /// keep-alives, until it ends. This loop is what an idle connection's
    /// task holds, so everything rare (handling a message, refusing one,
    /// sending a command) runs in a boxed future of its own.
    async fn serve_session(
        &mut self,
        version: ProtocolVersion,
        session: &Session,
        outbound: &mut mpsc::Receiver<Box<Command>>,
    ) -> Result<End, String> {
        let robot_id = session.robot_id;
        let ctx = session_context(session);
        let mut ping = tokio::time::interval(self.state.config.heartbeat_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let pace = ReportPace::direct(
            Quota::per_second(self.state.config.report_rate)
                .allow_burst(self.state.config.report_burst),
        );
        loop {
            tokio::select! {
                () = session.cancel.cancelled() => {
                    return Ok(End::Lost(session.close_reason().unwrap_or_else(|| "controller shutting down".into())));
                }
                Some(command) = outbound.recv() => {
                    let msg = ControllerMessage::Command(*command);
                    Box::pin(self.send_frame(version, &msg)).await?;
                }
                _ = ping.tick() => {
                    self.transport.keepalive().await.map_err(|e| e.to_string())?;
                }
                incoming = self.transport.recv() => {
                    let bytes = match incoming {
                        Ok(Incoming::Closed) => return Ok(End::Lost("connection closed by the agent".into())),
                        Ok(Incoming::Alive) => {
                            session.touch(now_ms());
                            continue;
                        }
                        Ok(Incoming::Frame(b)) => b,
                        Err(TransportError::Failed(e)) => return Ok(End::Lost(format!("connection error: {e}"))),
                        Err(TransportError::Refused { reason, detail }) => {
                            Box::pin(self.refuse(reason, &detail)).await;
                            return Ok(End::Lost(format!("bad input: {detail}")));
                        }
                    };
                    session.touch(now_ms());
                    // The most frequent frame, once per heartbeat interval
                    // from every agent: it only feeds the failure detector
                    // (the touch above), so it is handled here, without
                    // decoding it into a message or allocating.
                    if AgentMessage::is_heartbeat_frame(&bytes, self.state.config.max_frame) {
                        continue;
                    }
                    // Boxed: handling a message awaits the store, whose
                    // futures are large; an idle connection holds none.
                    let handled = Box::pin(self.handle_frame(robot_id, version, session, &ctx, &pace, bytes));
                    if let Some(end) = handled.await? {
                        return Ok(end);
                    }
                }
            }
        }
    }

    /// Decodes and handles one frame of an established session; `Some`
    /// ends it.
    async fn handle_frame(
        &mut self,
        robot_id: RobotId,
        version: ProtocolVersion,
        session: &Session,
        ctx: &Context,
        pace: &ReportPace,
        bytes: bytes::Bytes,
    ) -> Result<Option<End>, String> {
        let msg = match frame::decode_frame::<AgentMessage>(&bytes, self.state.config.max_frame) {
            Ok((_, m)) => m,
            Err(e) => {
                self.refuse(e.kind(), &e.to_string()).await;
                return Ok(Some(End::Lost(format!("bad frame: {e}"))));
            }
        };
        drop(bytes);
        self.handle(robot_id, version, session, ctx, pace, msg)
            .await
    }

    /// Handles one message of an established session; `Some` ends it.
    async fn handle(
        &mut self,
        robot_id: RobotId,
        version: ProtocolVersion,
        session: &Session,
        ctx: &Context,
        pace: &ReportPace,
        msg: AgentMessage,
    ) -> Result<Option<End>, String> {
        match msg {
            AgentMessage::Heartbeat(_) => {}
            AgentMessage::Report(report) => {
                if pace.check().is_err() {
                    // Too fast: this connection is not read until the
                    // report is due; the agent keeps the rest in its
                    // outbox (TCP and QUIC flow control push back).
                    self.state.metrics.limited("agent_reports");
                    pace.until_ready().await;
                }
                match self.state.fleet.report(robot_id, &report, ctx).await {
                    Ok(seq) => {
                        let ack = ControllerMessage::Ack(Ack {
                            seq: u64::try_from(seq).unwrap_or(0),
                        });
                        self.send_frame(version, &ack).await?;
                    }
                    Err(FleetError::Store(e)) => {
                        // Unacknowledged reports stay in the agent's outbox and
                        // are resent after it reconnects, which it is told
                        // to do after a while, not at once.
                        self.reject(RejectReason::Overloaded, Some(SHED_RETRY_AFTER))
                            .await;
                        return Err(format!("report not stored: {e}"));
                    }
                    Err(FleetError::Refused(r)) => return Err(format!("report refused: {r}")),
                }
            }
            AgentMessage::CommandResult(result) => {
                let error = match result.outcome {
                    CommandOutcome::Done => None,
                    CommandOutcome::Failed { error } => Some(storable(&error)),
                };
                let outcome = if error.is_some() {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                self.state
                    .breakers
                    .record(robot_id, outcome, chrono::Utc::now())
                    .await;
                match session.answered(result.command_id) {
                    Some(command) => {
                        if let Some(e) = &error {
                            tracing::warn!(%robot_id, ?command, error = e, "agent reports a failed command");
                        }
                        self.state
                            .fleet
                            .apply(robot_id, Input::CommandAnswered { command, error }, ctx)
                            .await
                            .map_err(|e| format!("command result not recorded: {e}"))?;
                    }
                    None => {
                        tracing::warn!(%robot_id, command_id = %result.command_id, "result for an unknown command")
                    }
                }
            }
            AgentMessage::Goodbye(g) => {
                return Ok(Some(End::Goodbye {
                    reason: g.reason,
                    back_in_s: g.back_in_s,
                }));
            }
            AgentMessage::RenewCertificate(request) => {
                let answer = match self
                    .state
                    .enroller
                    .renew(&self.principal, &request.csr_der)
                    .await
                {
                    Ok(issued) => ControllerMessage::Certificate(IssuedCertificate {
                        cert_der: issued.der.to_vec(),
                        not_after_ms: kiwi_security::pki::unix_ms(issued.info.not_after),
                    }),
                    Err(e) => {
                        tracing::warn!(%robot_id, reason = e.reason, detail = %e.detail, "certificate renewal refused");
                        ControllerMessage::RenewRefused(RenewRefused { reason: e.detail })
                    }
                };
                self.send_frame(version, &answer).await?;
            }
            AgentMessage::Hello(_) => {
                self.state.metrics.frame_rejected("protocol_violation");
                self.reject(
                    RejectReason::ProtocolViolation {
                        detail: "Hello sent twice".into(),
                    },
                    None,
                )
                .await;
                return Ok(Some(End::Lost("protocol violation: second Hello".into())));
            }
        }
        Ok(None)
    }
}

fn message_name(m: &AgentMessage) -> &'static str {
    match m {
        AgentMessage::Hello(_) => "Hello",
        AgentMessage::Report(_) => "Report",
        AgentMessage::Heartbeat(_) => "Heartbeat",
        AgentMessage::CommandResult(_) => "CommandResult",
        AgentMessage::Goodbye(_) => "Goodbye",
        AgentMessage::RenewCertificate(_) => "RenewCertificate",
    }
}

fn facts(id: &Identity, peer: SocketAddr) -> IdentityFacts {
    let text = |t: &Option<String>| t.as_deref().map(storable);
    IdentityFacts {
        hostname: id.hostname.clone(),
        // The address the controller reaches the robot at.
        ip_address: Some(peer.ip().to_string()),
        robot_type: id.robot_type.as_str().to_string(),
        model: text(&id.model),
        firmware_version: text(&id.os_version),
        agent_version: Some(storable(&id.agent_version)),
        hardware_id: storable(&id.hardware_id.canonical()),
        mac_addresses: id.mac_addresses.iter().map(format_mac).collect(),
    }
}

#[cfg(test)]
mod tests {
    //! The connection logic over an in-memory transport (a pair of channels),
    //! apart from any socket; the WebSocket path is covered end to end by the
    //! cross-crate tests.

    use super::*;
    use crate::config::Config;
    use crate::serve::Components;
    use kiwi_protocol::HardwareId;
    use kiwi_protocol::message::{HealthStatus, Heartbeat};

    #[derive(Debug)]
    struct Channels {
        from_agent: mpsc::Receiver<Incoming>,
        to_agent: mpsc::Sender<Vec<u8>>,
    }

    impl AgentTransport for Channels {
        async fn recv(&mut self) -> Result<Incoming, TransportError> {
            Ok(self.from_agent.recv().await.unwrap_or(Incoming::Closed))
        }
        async fn send(&mut self, frame: Vec<u8>) -> Result<(), TransportError> {
            self.to_agent
                .send(frame)
                .await
                .map_err(|e| TransportError::Failed(e.to_string()))
        }
        async fn keepalive(&mut self) -> Result<(), TransportError> {
            Ok(())
        }
        async fn close(&mut self) {}
        fn peer(&self) -> SocketAddr {
            SocketAddr::from(([127, 0, 0, 9], 4000))
        }

        fn name(&self) -> &'static str {
            "channels"
        }
    }

    struct Peer {
        tx: mpsc::Sender<Incoming>,
        rx: mpsc::Receiver<Vec<u8>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Peer {
        async fn send(&self, msg: &AgentMessage) {
            let f = frame::encode_frame(version::CURRENT, msg, frame::DEFAULT_MAX_FRAME).unwrap();
            self.tx.send(Incoming::Frame(f.into())).await.unwrap();
        }
        async fn next(&mut self) -> ControllerMessage {
            let f = tokio::time::timeout(Duration::from_secs(5), self.rx.recv())
                .await
                .expect("an answer in time")
                .expect("connection open");
            frame::decode_frame::<ControllerMessage>(&f, frame::DEFAULT_MAX_FRAME)
                .unwrap()
                .1
        }
    }

    async fn components(dir: &std::path::Path) -> Components {
        components_with(dir, |_| {}).await
    }

    async fn components_with(
        dir: &std::path::Path,
        change: impl FnOnce(&mut Config),
    ) -> Components {
        let mut config = Config {
            state_dir: dir.to_path_buf(),
            auto_provision: false,
            ..Config::default()
        };
        change(&mut config);
        Components::build(config, CancellationToken::new())
            .await
            .unwrap()
    }

    use crate::testing::messages::{hello, report};

    /// The principal of an agent whose certificate names `name`'s robot.
    fn principal(name: &str) -> Principal {
        Principal {
            robot_id: RobotId::from_hardware(&HardwareId::Configured(name.into())),
            serial: "01".into(),
            not_after: std::time::SystemTime::now() + Duration::from_secs(3600),
            key_fingerprint: kiwi_security::KeyFingerprint::of(b"key"),
        }
    }

    fn connect(c: &Components) -> Peer {
        connect_as(c, "link-test")
    }

    /// An idle connection's task holds the `run` future: the rare, large
    /// steps (the handshake, the welcome, handling a message) are boxed out
    /// of it, so that thousands of idle agents cost little (BENCHMARKS.md,
    /// "Secure links"). A step added inline would show here first. The
    /// bound is 1 KiB and the 8 bytes by which a frame's `Bytes` is larger
    /// than a `Vec` (the price of handing a WebSocket message over without
    /// copying it).
    #[tokio::test]
    async fn an_idle_connection_holds_a_small_future() {
        let dir = tempfile::tempdir().unwrap();
        let c = components(dir.path()).await;
        let (conn, _tx, _rx) = channel_connection(&c, "size");
        let size = std::mem::size_of_val(&conn.run());
        assert!(size <= 1024 + 8, "Connection::run's future is {size} bytes");
    }

    /// A connection of `name`'s robot over channels: the connection, the
    /// agent's sending side and its receiving side.
    fn channel_connection(
        c: &Components,
        name: &str,
    ) -> (
        Connection<Channels>,
        mpsc::Sender<Incoming>,
        mpsc::Receiver<Vec<u8>>,
    ) {
        let (tx, from_agent) = mpsc::channel(16);
        let (to_agent, rx) = mpsc::channel(16);
        let conn = Connection::new(
            c.link_state(),
            Channels {
                from_agent,
                to_agent,
            },
            principal(name),
        );
        (conn, tx, rx)
    }

    fn connect_as(c: &Components, name: &str) -> Peer {
        let (conn, tx, rx) = channel_connection(c, name);
        Peer {
            tx,
            rx,
            task: tokio::spawn(conn.run()),
        }
    }

    /// Too many arrivals at once: the agent is told to come back later,
    /// and nothing reaches the state machine.
    #[tokio::test]
    async fn arrivals_beyond_the_limit_are_shed_with_a_retry_after() {
        let dir = tempfile::tempdir().unwrap();
        let c = components(dir.path()).await;
        let state = c.link_state();
        // Every permit taken, as if that many arrivals were being recorded.
        let _busy = state
            .arrivals
            .clone()
            .try_acquire_many_owned(u32::try_from(c.config.max_arrivals).unwrap())
            .unwrap();
        let (tx, from_agent) = mpsc::channel(16);
        let (to_agent, rx) = mpsc::channel(16);
        let channels = Channels {
            from_agent,
            to_agent,
        };
        let task = tokio::spawn(Connection::new(state, channels, principal("shed")).run());
        let mut peer = Peer { tx, rx, task };
        peer.send(&hello("shed")).await;
        assert_eq!(
            peer.next().await,
            ControllerMessage::Reject(Reject {
                reason: RejectReason::Overloaded,
                retry_after_ms: Some(2000),
            })
        );
        peer.task.await.unwrap();
        let id = RobotId::from_hardware(&HardwareId::Configured("shed".into()));
        assert!(!c.sessions.is_connected(&id));
        assert!(
            c.fleet.robot(id).await.unwrap().is_none(),
            "nothing recorded"
        );
        let text = c.metrics.encode();
        assert!(
            text.contains("agent_connections_refused_total{reason=\"overloaded\"} 1"),
            "{text}"
        );
    }

    /// An agent reporting faster than its rate is paced, not refused:
    /// every report is stored and acknowledged, none sooner than its rate
    /// allows, and the pacing is counted.
    #[tokio::test]
    async fn reports_faster_than_the_rate_are_paced() {
        let dir = tempfile::tempdir().unwrap();
        let c = components_with(dir.path(), |config| {
            config.agent_report_rate = NonZeroU32::new(10).unwrap();
            config.agent_report_burst = NonZeroU32::new(2).unwrap();
        })
        .await;
        let mut peer = connect(&c);
        peer.send(&hello("link-test")).await;
        assert!(matches!(peer.next().await, ControllerMessage::Welcome(_)));
        let started = std::time::Instant::now();
        for seq in 1..=8 {
            peer.send(&report(seq)).await;
        }
        for seq in 1..=8 {
            assert_eq!(peer.next().await, ControllerMessage::Ack(Ack { seq }));
        }
        // Two at once, then one per 100 ms: six intervals at least.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(590), "paced: took {took:?}");
        let id = RobotId::from_hardware(&HardwareId::Configured("link-test".into()));
        assert_eq!(c.store.reports(id, 0, 10).await.unwrap().len(), 8);
        // Each report that had to wait is counted (six when the store
        // keeps up; fewer when it is slower than the pace itself).
        let paced = c
            .metrics
            .rate_limited
            .get_or_create(&crate::metrics::LimitLabels {
                limit: "agent_reports",
            })
            .get();
        assert!((1..=6).contains(&paced), "{paced} reports paced");
    }

    #[tokio::test]
    async fn handshake_reports_and_acks() {
        let dir = tempfile::tempdir().unwrap();
        let c = components(dir.path()).await;
        let mut peer = connect(&c);
        peer.send(&hello("link-test")).await;
        let ControllerMessage::Welcome(w) = peer.next().await else {
            panic!("expected Welcome");
        };
        assert_eq!(w.version, version::CURRENT);
        assert_eq!(w.heartbeat_interval_ms, 1000);
        let id = RobotId::from_hardware(&HardwareId::Configured("link-test".into()));
        assert!(c.sessions.is_connected(&id));
        peer.send(&AgentMessage::Heartbeat(Heartbeat { time_ms: 1 }))
            .await;
        peer.send(&report(1)).await;
        assert_eq!(peer.next().await, ControllerMessage::Ack(Ack { seq: 1 }));
        // A resent report is acknowledged again and stored once.
        peer.send(&report(1)).await;
        assert_eq!(peer.next().await, ControllerMessage::Ack(Ack { seq: 1 }));
        peer.send(&report(2)).await;
        assert_eq!(peer.next().await, ControllerMessage::Ack(Ack { seq: 2 }));
        let stored = c.store.reports(id, 0, 10).await.unwrap();
        assert_eq!(stored.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);

        // The agent closes: it was discovered (no auto-provision), so its
        // health, not its state, records the loss.
        peer.tx.send(Incoming::Closed).await.unwrap();
        peer.task.await.unwrap();
        assert!(!c.sessions.is_connected(&id));
        let robot = c.fleet.robot(id).await.unwrap().unwrap();
        assert_eq!(robot.robot.health.status, HealthStatus::Unreachable);
    }

    #[tokio::test]
    async fn bad_input_is_refused_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let c = components(dir.path()).await;

        let peer = connect(&c);
        peer.tx
            .send(Incoming::Frame(b"KIWX\x01\x00junk".to_vec().into()))
            .await
            .unwrap();
        peer.task.await.unwrap();

        let mut peer = connect(&c);
        peer.send(&report(1)).await;
        assert!(matches!(
            peer.next().await,
            ControllerMessage::Reject(Reject {
                reason: RejectReason::ProtocolViolation { .. },
                ..
            })
        ));
        peer.task.await.unwrap();

        let peer = connect(&c);
        peer.tx
            .send(Incoming::Frame(
                vec![0; frame::DEFAULT_MAX_FRAME + 1].into(),
            ))
            .await
            .unwrap();
        peer.task.await.unwrap();

        let text = c.metrics.encode();
        for reason in ["bad_magic", "protocol_violation", "too_large"] {
            let line = format!("agent_frames_rejected_total{{reason=\"{reason}\"}} 1");
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        assert!(c.cache.is_empty(), "no robot was recorded from bad input");
    }
}
