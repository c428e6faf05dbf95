//! The agent endpoint: a WebSocket at `/agent` on the agent port, one
//! protocol frame per binary message.
//!
//! A connection must open with a `Hello`; the controller negotiates the
//! version (or refuses with the versions it speaks), records the robot's
//! arrival through the fleet, answers `Welcome`, and then relays reports,
//! heartbeats, command results and commands until the connection ends.
//! Any bad frame closes only its own connection, with a logged reason and a
//! count in `agent_frames_rejected_total`.

pub mod session;

use crate::domain::Input;
use crate::domain::event::IdentityFacts;
use crate::fleet::{Context, Fleet, FleetError};
use crate::metrics::{Metrics, ReasonLabels};
use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use axum::routing::get;
use hyper_util::rt::TokioIo;
use kiwi_protocol::frame;
use kiwi_protocol::identity::format_mac;
use kiwi_protocol::message::{
    Ack, AgentMessage, CommandOutcome, ControllerMessage, Hello, Reject, RejectReason, Welcome,
};
use kiwi_protocol::version::{self, ProtocolVersion};
use kiwi_protocol::{Identity, RobotId};
use session::{Session, now_ms};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Settings of the agent endpoint.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub heartbeat_interval: Duration,
    /// How long a new connection may take to send its `Hello`.
    pub handshake_timeout: Duration,
    pub max_frame: usize,
    pub max_agents: usize,
}

#[derive(Debug)]
pub struct LinkState {
    pub fleet: Fleet,
    pub metrics: Arc<Metrics>,
    pub config: LinkConfig,
    /// Cancelled at shutdown: connections close without recording robots
    /// as lost (the controller is leaving, not the robots).
    pub shutdown: CancellationToken,
}

/// Outbound messages queued per agent before commands are refused.
const OUTBOUND_QUEUE: usize = 64;

/// WebSocket buffers: explicit and small, so that thousands of idle agents
/// cost little memory (tungstenite's defaults are 128 KiB each).
const WS_BUFFER: usize = 4 * 1024;

pub fn router(state: Arc<LinkState>) -> Router {
    Router::new()
        .route("/agent", get(upgrade))
        .with_state(state)
}

/// Accepts agent connections until `state.shutdown`. Each TCP connection is
/// served by hyper directly (rather than `axum::serve`) so that a peer that
/// does not even speak HTTP is noticed, logged and counted like any other
/// bad frame.
pub async fn serve(listener: TcpListener, state: Arc<LinkState>) {
    let app = router(state.clone());
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = state.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors or similar: back off briefly
                    // instead of spinning.
                    tracing::warn!(error = %e, "accepting an agent connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let metrics = state.metrics.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                app.clone().oneshot(req)
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .max_buf_size(16 * 1024)
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
            if let Err(e) = served {
                if e.is_parse() || e.is_parse_too_large() || e.is_timeout() {
                    let reason = if e.is_timeout() { "handshake_timeout" } else { "not_http" };
                    metrics.frame_rejected(reason);
                    tracing::warn!(%peer, reason, error = %e, "agent port: refused a connection that is not a WebSocket handshake");
                } else {
                    tracing::debug!(%peer, error = %e, "agent connection ended with an error");
                }
            }
        });
    }
    connections.close();
}

async fn upgrade(
    ws: WebSocketUpgrade,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(state): State<Arc<LinkState>>,
) -> Response {
    let max = state.config.max_frame;
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(WS_BUFFER)
        .max_write_buffer_size(max + WS_BUFFER)
        .on_upgrade(move |socket| async move {
            Connection {
                state,
                peer,
                socket,
            }
            .run()
            .await
        })
}

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

struct Connection {
    state: Arc<LinkState>,
    peer: SocketAddr,
    socket: WebSocket,
}

impl Connection {
    async fn run(mut self) {
        let Some((hello, version)) = self.handshake().await else {
            return;
        };
        let robot_id = hello.identity.robot_id;
        let (tx, mut outbound) = mpsc::channel(OUTBOUND_QUEUE);
        let session = Session::new(robot_id, self.peer, tx, self.state.shutdown.child_token());
        let sessions = self.state.fleet.sessions().clone();
        if let Some(old) = sessions.register(session.clone()) {
            old.close("replaced by a new connection from the same robot");
        }
        self.state.metrics.agent_connections.inc();
        let end = match self
            .established(&hello, version, &session, &mut outbound)
            .await
        {
            Ok(end) => end,
            Err(reason) => End::Lost(reason),
        };
        self.state.metrics.agent_connections.dec();
        let _ = self.socket.send(Message::Close(None)).await;
        if !sessions.remove_if_current(&robot_id, session.session_id)
            || self.state.shutdown.is_cancelled()
        {
            return;
        }
        let ctx = Context {
            actor: "agent",
            correlation_id: Some(session.session_id),
            causation_id: None,
        };
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
        if let Err(e) = self
            .state
            .fleet
            .apply(robot_id, Input::AgentLost { reason }, &ctx)
            .await
        {
            tracing::error!(%robot_id, error = %e, "could not record the robot as lost");
        }
    }

    /// Refuses a frame: counts it, logs why, closes the connection.
    async fn refuse(&mut self, reason: &str, detail: &str) {
        self.state.metrics.frame_rejected(reason);
        tracing::warn!(peer = %self.peer, reason, detail, "agent frame refused; closing the connection");
        let _ = self.socket.send(Message::Close(None)).await;
    }

    async fn send_frame(
        &mut self,
        version: ProtocolVersion,
        msg: &ControllerMessage,
    ) -> Result<(), String> {
        let bytes = frame::encode_frame(version, msg, self.state.config.max_frame)
            .map_err(|e| e.to_string())?;
        self.socket
            .send(Message::Binary(bytes.into()))
            .await
            .map_err(|e| format!("send failed: {e}"))
    }

    async fn reject(&mut self, reason: RejectReason, retry_after: Option<Duration>) {
        let msg = ControllerMessage::Reject(Reject {
            reason,
            retry_after_ms: retry_after.map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
        });
        let _ = self.send_frame(version::HANDSHAKE, &msg).await;
        let _ = self.socket.send(Message::Close(None)).await;
    }

    /// Reads the `Hello` and negotiates a version; `None` when the
    /// connection was refused (already answered and counted).
    async fn handshake(&mut self) -> Option<(Hello, ProtocolVersion)> {
        let first =
            tokio::time::timeout(self.state.config.handshake_timeout, self.socket.recv()).await;
        let bytes = match first {
            Err(_) => {
                self.refuse("handshake_timeout", "no Hello in time").await;
                return None;
            }
            Ok(None) => return None,
            Ok(Some(Err(e))) => {
                if let Some(reason) = refused_by_websocket(&e) {
                    self.refuse(reason, &e.to_string()).await;
                }
                return None;
            }
            Ok(Some(Ok(Message::Binary(b)))) => b,
            Ok(Some(Ok(_))) => {
                self.refuse("not_binary", "expected a binary Hello frame")
                    .await;
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
        if let Err(detail) = check_identity(&hello.identity) {
            self.state.metrics.frame_rejected("bad_identity");
            tracing::warn!(peer = %self.peer, detail, "agent identity refused");
            self.reject(RejectReason::ProtocolViolation { detail }, None)
                .await;
            return None;
        }
        if self.state.fleet.sessions().len() >= self.state.config.max_agents {
            self.state
                .metrics
                .agent_connections_refused
                .get_or_create(&ReasonLabels {
                    reason: "max_agents".into(),
                })
                .inc();
            self.reject(RejectReason::Overloaded, Some(Duration::from_secs(5)))
                .await;
            return None;
        }
        Some((hello, version))
    }

    async fn established(
        &mut self,
        hello: &Hello,
        version: ProtocolVersion,
        session: &Session,
        outbound: &mut mpsc::Receiver<ControllerMessage>,
    ) -> Result<End, String> {
        let robot_id = hello.identity.robot_id;
        let ctx = Context {
            actor: "agent",
            correlation_id: Some(session.session_id),
            causation_id: None,
        };
        let facts = facts(&hello.identity, self.peer);
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
        let welcome = ControllerMessage::Welcome(Welcome {
            session_id: session.session_id,
            version,
            heartbeat_interval_ms: u32::try_from(self.state.config.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            config: self.state.fleet.desired_config(&applied.robot.robot),
        });
        self.send_frame(version::HANDSHAKE, &welcome).await?;
        tracing::info!(%robot_id, peer = %self.peer, %version, state = %applied.robot.robot.state, "agent connected");

        let mut ping = tokio::time::interval(self.state.config.heartbeat_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = session.cancel.cancelled() => {
                    return Ok(End::Lost(session.close_reason().unwrap_or_else(|| "controller shutting down".into())));
                }
                Some(msg) = outbound.recv() => self.send_frame(version, &msg).await?,
                _ = ping.tick() => {
                    // Lets the agent see a live controller between acks.
                    self.socket.send(Message::Ping(Default::default())).await.map_err(|e| e.to_string())?;
                }
                incoming = self.socket.recv() => {
                    let bytes = match incoming {
                        None => return Ok(End::Lost("connection closed".into())),
                        Some(Err(e)) => {
                            if let Some(reason) = refused_by_websocket(&e) {
                                self.refuse(reason, &e.to_string()).await;
                            }
                            return Ok(End::Lost(format!("connection error: {e}")));
                        }
                        Some(Ok(Message::Close(_))) => return Ok(End::Lost("connection closed by the agent".into())),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                            session.touch(now_ms());
                            continue;
                        }
                        Some(Ok(Message::Text(_))) => {
                            self.refuse("not_binary", "text message").await;
                            return Ok(End::Lost("protocol violation: text message".into()));
                        }
                        Some(Ok(Message::Binary(b))) => b,
                    };
                    session.touch(now_ms());
                    let msg = match frame::decode_frame::<AgentMessage>(&bytes, self.state.config.max_frame) {
                        Ok((_, m)) => m,
                        Err(e) => {
                            self.refuse(e.kind(), &e.to_string()).await;
                            return Ok(End::Lost(format!("bad frame: {e}")));
                        }
                    };
                    if let Some(end) = self.handle(robot_id, version, session, &ctx, msg).await? {
                        return Ok(end);
                    }
                }
            }
        }
    }

    /// Handles one message of an established session; `Some` ends it.
    async fn handle(
        &mut self,
        robot_id: RobotId,
        version: ProtocolVersion,
        session: &Session,
        ctx: &Context,
        msg: AgentMessage,
    ) -> Result<Option<End>, String> {
        match msg {
            AgentMessage::Heartbeat(_) => {}
            AgentMessage::Report(report) => {
                match self.state.fleet.report(robot_id, &report, ctx).await {
                    Ok(seq) => {
                        let ack = ControllerMessage::Ack(Ack {
                            seq: u64::try_from(seq).unwrap_or(0),
                        });
                        self.send_frame(version, &ack).await?;
                    }
                    Err(FleetError::Store(e)) => {
                        // Unacknowledged reports stay in the agent's outbox and
                        // are resent after it reconnects.
                        return Err(format!("report not stored: {e}"));
                    }
                    Err(FleetError::Refused(r)) => return Err(format!("report refused: {r}")),
                }
            }
            AgentMessage::CommandResult(result) => {
                let error = match result.outcome {
                    CommandOutcome::Done => None,
                    CommandOutcome::Failed { error } => Some(error),
                };
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

/// The WebSocket layer enforces the frame cap itself (so that an oversized
/// message is never buffered whole); its refusals are bad frames like any
/// other. `None` for errors that are not the peer's fault (a reset socket).
fn refused_by_websocket(e: &axum::Error) -> Option<&'static str> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let source = std::error::Error::source(e)?;
    match source.downcast_ref::<WsError>()? {
        WsError::Capacity(_) => Some("too_large"),
        WsError::Protocol(_) | WsError::Utf8(_) => Some("websocket_protocol"),
        _ => None,
    }
}

fn message_name(m: &AgentMessage) -> &'static str {
    match m {
        AgentMessage::Hello(_) => "Hello",
        AgentMessage::Report(_) => "Report",
        AgentMessage::Heartbeat(_) => "Heartbeat",
        AgentMessage::CommandResult(_) => "CommandResult",
        AgentMessage::Goodbye(_) => "Goodbye",
    }
}

/// Longest hostname accepted (DNS names are at most 253 characters).
const MAX_HOSTNAME: usize = 253;

/// Checks what an agent says about itself: its id must be the one its
/// hardware identity gives, and its strings must be sane.
fn check_identity(id: &Identity) -> Result<(), String> {
    let expected = RobotId::from_hardware(&id.hardware_id);
    if id.robot_id != expected {
        return Err(format!(
            "robot id {} does not match hardware identity {} (expected {expected})",
            id.robot_id,
            id.hardware_id.canonical()
        ));
    }
    if id.hostname.is_empty()
        || id.hostname.len() > MAX_HOSTNAME
        || id.hostname.chars().any(char::is_control)
    {
        return Err("hostname must be 1 to 253 printable characters".into());
    }
    Ok(())
}

fn facts(id: &Identity, peer: SocketAddr) -> IdentityFacts {
    IdentityFacts {
        hostname: id.hostname.clone(),
        // The address the controller reaches the robot at.
        ip_address: Some(peer.ip().to_string()),
        robot_type: id.robot_type.as_str().to_string(),
        model: id.model.clone(),
        firmware_version: id.os_version.clone(),
        agent_version: Some(id.agent_version.clone()),
        hardware_id: id.hardware_id.canonical(),
        mac_addresses: id.mac_addresses.iter().map(format_mac).collect(),
    }
}
