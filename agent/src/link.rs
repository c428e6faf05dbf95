//! The WebSocket link to the controller, shared by `run` and `simulate`:
//! connect, say `Hello`, read the `Welcome` (or `Reject`), resend what the
//! controller has not acknowledged, then heartbeat, report, answer commands,
//! and reconnect forever with capped exponential backoff and full jitter.
//!
//! This module only moves frames and keeps time. What to report and when,
//! how to read the handshake and how long to wait are decided in
//! [`crate::decide`]; what a command or an ack does is [`crate::agent`].

use crate::agent::{Agent, Execution, unix_ms};
use crate::decide::{self, Handshake, Reconnect, SessionEnd};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use kiwi_protocol::backoff::Backoff;
use kiwi_protocol::frame::{self, DEFAULT_MAX_FRAME};
use kiwi_protocol::message::{
    AgentMessage, Command, CommandOutcome, CommandResult, ControllerMessage, Goodbye, Heartbeat,
    Hello, Report,
};
use kiwi_protocol::version::{self, ProtocolVersion};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Sink = SplitSink<Ws, Message>;
type Stream = SplitStream<Ws>;

/// How the link behaves. [`LinkOptions::new`] gives the production values.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// The `ws://` URL to connect to (see `ControllerUrl::endpoint`).
    pub endpoint: String,
    pub backoff: Backoff,
    /// How often telemetry, health and workload are sampled.
    pub sample_interval: Duration,
    pub connect_timeout: Duration,
    /// How long the controller may take to answer `Hello`.
    pub handshake_timeout: Duration,
    /// How long a clean close (after `Goodbye`) may take.
    pub close_timeout: Duration,
    /// The frame cap, both ways.
    pub max_frame: usize,
}

impl LinkOptions {
    pub fn new(endpoint: impl Into<String>, backoff: Backoff) -> Self {
        Self {
            endpoint: endpoint.into(),
            backoff,
            sample_interval: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(1),
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

/// The WebSocket settings: messages and frames capped at the frame cap, and
/// small buffers, since an agent sends little and a simulator holds many.
pub fn ws_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(2 * max_frame + 4 * 1024)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

/// Runs the agent's link until `shutdown` is cancelled: on shutdown while
/// connected, says `Goodbye` and closes. Reports keep being sampled and
/// stored while disconnected.
pub async fn run(agent: &mut Agent, opts: &LinkOptions, shutdown: &CancellationToken) {
    agent.resume().await;
    let mut reconnect = Reconnect::default();
    loop {
        let end = session(agent, opts, shutdown).await;
        let unit: f64 = rand::random();
        let Some(delay) = reconnect.after(&end, &opts.backoff, unit) else {
            return;
        };
        match &end {
            SessionEnd::Shutdown => return,
            SessionEnd::Lost { welcomed, reason } => tracing::warn!(
                reason = %reason,
                was_connected = welcomed,
                retry_in_ms = delay.as_millis() as u64,
                attempt = reconnect.attempt(),
                "controller link down"
            ),
            SessionEnd::Rejected {
                reason,
                retry_after,
                ..
            } => tracing::warn!(
                reason = %reason,
                retry_after_ms = retry_after.map(|d| d.as_millis() as u64),
                retry_in_ms = delay.as_millis() as u64,
                "controller rejected the agent"
            ),
        }
        let every = sample_every(agent, opts);
        if !wait_offline(agent, delay, every, shutdown).await {
            return;
        }
    }
}

/// How often to sample: the configured sampling interval, or more often when
/// reports are due more often than that (never below 50 ms).
fn sample_every(agent: &Agent, opts: &LinkOptions) -> Duration {
    opts.sample_interval
        .min(agent.report_interval())
        .max(Duration::from_millis(50))
}

/// Waits `delay` while still sampling (reports made offline go to the
/// outbox and are sent after reconnecting). The first sample is taken at
/// once: reconnect delays are often shorter than the sampling interval, and
/// a fresh timer per attempt would then never fire during an outage.
/// `false` when shutting down.
async fn wait_offline(
    agent: &mut Agent,
    delay: Duration,
    sample_interval: Duration,
    shutdown: &CancellationToken,
) -> bool {
    let until = Instant::now() + delay;
    let mut sample = tokio::time::interval(sample_interval);
    sample.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep_until(until) => return true,
            _ = sample.tick() => {
                agent.observe(std::time::Instant::now()).await;
            }
        }
    }
}

/// A connection that lost its way: the reason, for the log.
struct Lost(String);

/// One connection, from connect to its end.
async fn session(
    agent: &mut Agent,
    opts: &LinkOptions,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let lost = |welcomed, reason: String| SessionEnd::Lost { welcomed, reason };
    let connect = tokio_tungstenite::connect_async_with_config(
        opts.endpoint.as_str(),
        Some(ws_config(opts.max_frame)),
        true,
    );
    let ws = tokio::select! {
        () = shutdown.cancelled() => return SessionEnd::Shutdown,
        r = tokio::time::timeout(opts.connect_timeout, connect) => match r {
            Err(_) => return lost(false, format!("connecting to {} timed out", opts.endpoint)),
            Ok(Err(e)) => return lost(false, format!("cannot connect to {}: {e}", opts.endpoint)),
            Ok(Ok((ws, _response))) => ws,
        },
    };
    let (mut sink, mut stream) = ws.split();

    let hello = AgentMessage::Hello(Hello {
        identity: agent.identity().clone(),
        versions: version::SUPPORTED.to_vec(),
        last_acked_seq: agent.outbox().settled(),
    });
    let write_timeout = opts.handshake_timeout;
    if let Err(Lost(reason)) = send(
        &mut sink,
        version::HANDSHAKE,
        &hello,
        opts.max_frame,
        write_timeout,
    )
    .await
    {
        return lost(false, format!("cannot send Hello: {reason}"));
    }

    let first = tokio::select! {
        () = shutdown.cancelled() => {
            let _ = tokio::time::timeout(opts.close_timeout, sink.close()).await;
            return SessionEnd::Shutdown;
        }
        r = tokio::time::timeout(opts.handshake_timeout, next_message(&mut stream, opts.max_frame)) => r,
    };
    let welcome = match first {
        Err(_) => return lost(false, "no answer to Hello in time".into()),
        Ok(Err(Lost(reason))) => {
            close_with(&mut sink, CloseCode::Protocol, &reason, opts.close_timeout).await;
            return lost(false, reason);
        }
        Ok(Ok(message)) => match decide::classify_handshake(message) {
            Handshake::Welcome(w) => w,
            Handshake::Rejected {
                reason,
                retry_after,
            } => {
                return SessionEnd::Rejected {
                    welcomed: false,
                    reason,
                    retry_after,
                };
            }
            Handshake::Violation(reason) => {
                close_with(&mut sink, CloseCode::Protocol, &reason, opts.close_timeout).await;
                return lost(false, reason);
            }
        },
    };

    let heartbeat = decide::heartbeat_interval(welcome.heartbeat_interval_ms);
    tracing::info!(
        session_id = %welcome.session_id,
        version = %welcome.version,
        heartbeat_ms = heartbeat.as_millis() as u64,
        "connected to the controller"
    );
    let mut conn = Connected {
        sink,
        stream,
        version: welcome.version,
        max_frame: opts.max_frame,
        heartbeat,
        idle: decide::idle_timeout(heartbeat),
        last_read: Instant::now(),
        job: None,
        queued: VecDeque::new(),
    };
    // Reconciling may stop or start the workload: that runs as a job beside
    // the heartbeats, like a command's.
    match agent.begin_desired(&welcome.config) {
        Execution::Finished(CommandOutcome::Done) => {}
        Execution::Finished(CommandOutcome::Failed { error }) => {
            tracing::warn!(error = %error, "could not apply the controller's desired configuration");
        }
        Execution::Running(outcome) => {
            conn.job = Some(InFlight {
                command: None,
                outcome,
            });
        }
    }
    match conn.serve(agent, opts, shutdown).await {
        Ok(()) => SessionEnd::Shutdown,
        Err(End::Lost(reason)) => lost(true, reason),
        Err(End::Rejected(r)) => SessionEnd::Rejected {
            welcomed: true,
            reason: r.reason,
            retry_after: r
                .retry_after_ms
                .map(|ms| Duration::from_millis(u64::from(ms))),
        },
    }
}

/// Why a welcomed connection ended (other than shutdown).
enum End {
    Lost(String),
    Rejected(kiwi_protocol::message::Reject),
}

impl From<Lost> for End {
    fn from(Lost(reason): Lost) -> Self {
        End::Lost(reason)
    }
}

/// Commands waiting while another one's workload action runs. Beyond this
/// the agent answers "busy" at once.
pub const MAX_QUEUED_COMMANDS: usize = 32;

/// A workload action in progress: for a command (answered when it ends) or
/// for reconciling the desired configuration (`command` is `None`).
struct InFlight {
    command: Option<Command>,
    outcome: Pin<Box<dyn Future<Output = CommandOutcome> + Send>>,
}

/// A connection after `Welcome`.
struct Connected {
    sink: Sink,
    stream: Stream,
    version: ProtocolVersion,
    max_frame: usize,
    heartbeat: Duration,
    idle: Duration,
    last_read: Instant,
    /// At most one workload action runs at a time; commands that arrive
    /// meanwhile wait in `queued`, in order.
    job: Option<InFlight>,
    queued: VecDeque<Command>,
}

/// The outcome of the job in flight; never ready without one.
async fn job_outcome(job: &mut Option<InFlight>) -> CommandOutcome {
    match job {
        Some(j) => j.outcome.as_mut().await,
        None => std::future::pending().await,
    }
}

impl Connected {
    async fn send(&mut self, message: &AgentMessage) -> Result<(), Lost> {
        send(
            &mut self.sink,
            self.version,
            message,
            self.max_frame,
            self.idle,
        )
        .await
    }

    async fn send_report(&mut self, report: Report) -> Result<(), Lost> {
        self.send(&AgentMessage::Report(report)).await
    }

    async fn serve(
        &mut self,
        agent: &mut Agent,
        opts: &LinkOptions,
        shutdown: &CancellationToken,
    ) -> Result<(), End> {
        let pending = agent.outbox().pending();
        if !pending.is_empty() {
            tracing::info!(
                count = pending.len(),
                first_seq = pending[0].seq,
                "resending unacknowledged reports"
            );
        }
        for report in pending {
            self.send_report(report).await?;
        }
        let start = Instant::now();
        let mut heartbeat = tokio::time::interval_at(start + self.heartbeat, self.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut sample = tokio::time::interval(sample_every(agent, opts));
        sample.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let read_deadline = self.last_read + self.idle;
            let has_job = self.job.is_some();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    self.goodbye(opts.close_timeout).await;
                    return Ok(());
                }
                r = tokio::time::timeout_at(read_deadline, next_incoming(&mut self.stream, self.max_frame)) => {
                    let incoming = match r {
                        Err(_) => return Err(End::Lost(format!("nothing from the controller for {:?}", self.idle))),
                        Ok(Err(Lost(reason))) => {
                            close_with(&mut self.sink, CloseCode::Protocol, &reason, opts.close_timeout).await;
                            return Err(End::Lost(reason));
                        }
                        Ok(Ok(incoming)) => incoming,
                    };
                    self.last_read = Instant::now();
                    if let Incoming::Message(message) = incoming {
                        self.handle(agent, message).await?;
                    }
                }
                outcome = job_outcome(&mut self.job), if has_job => {
                    if let Some(done) = self.job.take() {
                        self.finish(agent, done.command, outcome).await?;
                    }
                    while self.job.is_none() {
                        let Some(next) = self.queued.pop_front() else { break };
                        self.begin(agent, next).await?;
                    }
                }
                _ = heartbeat.tick() => {
                    self.send(&AgentMessage::Heartbeat(Heartbeat { time_ms: unix_ms() })).await?;
                    // A controller only answers reports and commands; a
                    // WebSocket ping gets a pong from any healthy peer and
                    // so keeps the read side from idling out.
                    if self.last_read.elapsed() >= self.heartbeat {
                        match tokio::time::timeout(self.idle, self.sink.send(Message::Ping(Vec::new().into()))).await {
                            Err(_) => return Err(End::Lost("write timed out".into())),
                            Ok(Err(e)) => return Err(End::Lost(format!("write failed: {e}"))),
                            Ok(Ok(())) => {}
                        }
                    }
                }
                _ = sample.tick() => {
                    if let Some(report) = agent.observe(std::time::Instant::now()).await {
                        self.send_report(report).await?;
                    }
                }
            }
        }
    }

    async fn handle(&mut self, agent: &mut Agent, message: ControllerMessage) -> Result<(), End> {
        match message {
            ControllerMessage::Ack(ack) => {
                agent.ack(ack.seq).await;
                Ok(())
            }
            ControllerMessage::Command(command) if self.job.is_some() => {
                if self.queued.len() < MAX_QUEUED_COMMANDS {
                    self.queued.push_back(command);
                    Ok(())
                } else {
                    let outcome = CommandOutcome::Failed {
                        error: format!(
                            "agent busy: {MAX_QUEUED_COMMANDS} commands already waiting"
                        ),
                    };
                    self.finish(agent, Some(command), outcome).await
                }
            }
            ControllerMessage::Command(command) => self.begin(agent, command).await,
            ControllerMessage::Reject(r) => Err(End::Rejected(r)),
            ControllerMessage::Welcome(_) => {
                Err(End::Lost("protocol violation: a second Welcome".into()))
            }
        }
    }

    /// Starts a command: answered at once, or once its job ends.
    async fn begin(&mut self, agent: &mut Agent, command: Command) -> Result<(), End> {
        match agent.begin(&command.kind) {
            Execution::Finished(outcome) => self.finish(agent, Some(command), outcome).await,
            Execution::Running(outcome) => {
                self.job = Some(InFlight {
                    command: Some(command),
                    outcome,
                });
                Ok(())
            }
        }
    }

    /// Answers a finished command (if it was one) and reports what it
    /// changed.
    async fn finish(
        &mut self,
        agent: &mut Agent,
        command: Option<Command>,
        outcome: CommandOutcome,
    ) -> Result<(), End> {
        match command {
            Some(command) => {
                tracing::info!(
                    command_id = %command.command_id,
                    command = command.kind.name(),
                    outcome = ?outcome,
                    "command executed"
                );
                self.send(&AgentMessage::CommandResult(CommandResult {
                    command_id: command.command_id,
                    outcome,
                }))
                .await?;
            }
            None => {
                if let CommandOutcome::Failed { error } = outcome {
                    tracing::warn!(error = %error, "could not apply the controller's desired configuration");
                }
            }
        }
        if let Some(report) = agent.observe(std::time::Instant::now()).await {
            self.send_report(report).await?;
        }
        Ok(())
    }

    async fn goodbye(&mut self, close_timeout: Duration) {
        let bye = AgentMessage::Goodbye(Goodbye {
            reason: "shutdown".into(),
            back_in_s: None,
        });
        if let Err(Lost(reason)) = self.send(&bye).await {
            tracing::debug!(reason = %reason, "could not say goodbye");
            return;
        }
        // Close, then wait (briefly) for the controller's close so the
        // Goodbye is read before the socket goes away.
        let closing = async {
            let _ = self.sink.close().await;
            while let Some(Ok(_)) = self.stream.next().await {}
        };
        let _ = tokio::time::timeout(close_timeout, closing).await;
        tracing::info!("said goodbye to the controller");
    }
}

/// Encodes and sends one frame as one binary message.
async fn send(
    sink: &mut Sink,
    version: ProtocolVersion,
    message: &AgentMessage,
    max_frame: usize,
    timeout: Duration,
) -> Result<(), Lost> {
    let bytes = frame::encode_frame(version, message, max_frame)
        .map_err(|e| Lost(format!("cannot encode a frame: {e}")))?;
    match tokio::time::timeout(timeout, sink.send(Message::Binary(bytes.into()))).await {
        Err(_) => Err(Lost(format!("write timed out after {timeout:?}"))),
        Ok(Err(e)) => Err(Lost(format!("write failed: {e}"))),
        Ok(Ok(())) => Ok(()),
    }
}

/// What the controller sent: a message, or a WebSocket control frame (a
/// ping or pong, answered by tungstenite itself) that only shows the
/// connection is alive.
enum Incoming {
    Message(ControllerMessage),
    Control,
}

/// The next thing the controller sent. A closed or broken connection, a
/// text message or a bad frame ends the connection.
async fn next_incoming(stream: &mut Stream, max_frame: usize) -> Result<Incoming, Lost> {
    let message = match stream.next().await {
        None => return Err(Lost("connection closed".into())),
        Some(Err(e)) => return Err(Lost(format!("read failed: {e}"))),
        Some(Ok(m)) => m,
    };
    match message {
        Message::Binary(bytes) => frame::decode_frame::<ControllerMessage>(&bytes, max_frame)
            .map(|(_, m)| Incoming::Message(m))
            .map_err(|e| Lost(format!("bad frame from the controller: {e}"))),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(Incoming::Control),
        Message::Text(_) => Err(Lost("protocol violation: a text message".into())),
        Message::Close(frame) => {
            let why = frame.map_or_else(
                || "no reason".to_string(),
                |f| format!("{}: {}", f.code, f.reason),
            );
            Err(Lost(format!("controller closed the connection ({why})")))
        }
    }
}

/// The next controller message, skipping control frames.
async fn next_message(stream: &mut Stream, max_frame: usize) -> Result<ControllerMessage, Lost> {
    loop {
        if let Incoming::Message(m) = next_incoming(stream, max_frame).await? {
            return Ok(m);
        }
    }
}

/// Closes with a code and a reason (best effort, bounded in time).
async fn close_with(sink: &mut Sink, code: CloseCode, reason: &str, timeout: Duration) {
    // A close reason must fit a control frame (125 bytes with the code).
    let mut reason = reason.to_string();
    while reason.len() > 120 {
        reason.pop();
    }
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(timeout, sink.send(Message::Close(Some(frame)))).await;
}
