//! The link to the controller, shared by `run` and `simulate`: connect, say
//! `Hello`, read the `Welcome` (or `Reject`), resend what the controller has
//! not acknowledged, then heartbeat, report, answer commands, and reconnect
//! forever with capped exponential backoff and full jitter.
//!
//! This module only encodes and decodes frames, moves them and keeps time.
//! What carries the frames is a [`Connector`] (see [`crate::transport`]);
//! what to report and when, how to read the handshake and how long to wait
//! are decided in [`crate::decide`]; what a command or an ack does is
//! [`crate::agent`].

use crate::agent::{Agent, Execution, unix_ms};
use crate::credentials::Credentials;
use crate::decide::{self, Handshake, Reconnect, SessionEnd};
use crate::transport::{Close, Connection, Connector, Incoming, TransportError};
use kiwi_protocol::backoff::Backoff;
use kiwi_protocol::frame::{self, DEFAULT_MAX_FRAME};
use kiwi_protocol::message::{
    AgentMessage, Command, CommandOutcome, CommandResult, ControllerMessage, Goodbye, Heartbeat,
    Hello, RenewCertificate, Report,
};
use kiwi_protocol::version::{self, ProtocolVersion};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How the link behaves, whatever the transport. [`LinkOptions::new`] gives
/// the production values; connecting is the [`Connector`]'s business.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub backoff: Backoff,
    /// How often telemetry, health and workload are sampled.
    pub sample_interval: Duration,
    /// How long the controller may take to answer `Hello` (and the
    /// agent to send it).
    pub handshake_timeout: Duration,
    /// How long a clean close (after `Goodbye`) may take.
    pub close_timeout: Duration,
    /// The frame cap, both ways. The connector should cap its messages the
    /// same.
    pub max_frame: usize,
    /// Told `true` once the controller welcomed the agent and `false` when
    /// that session ends (LAN discovery stops and resumes on it).
    pub connected: Option<tokio::sync::watch::Sender<bool>>,
    /// The robot's certificate, renewed over the link before it expires
    /// (with a controller that speaks protocol 1.1).
    pub credentials: Option<std::sync::Arc<Credentials>>,
}

impl LinkOptions {
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            sample_interval: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(1),
            max_frame: DEFAULT_MAX_FRAME,
            connected: None,
            credentials: None,
        }
    }
}

/// Runs the agent's link over `connector` until `shutdown` is cancelled:
/// on shutdown while connected, says `Goodbye` and closes. Reports keep
/// being sampled and stored while disconnected.
pub async fn run<C: Connector>(
    agent: &mut Agent,
    connector: &C,
    opts: &LinkOptions,
    shutdown: &CancellationToken,
) {
    agent.resume().await;
    let mut reconnect = Reconnect::default();
    loop {
        let end = session(agent, connector, opts, shutdown).await;
        if let Some(connected) = &opts.connected {
            connected.send_if_modified(|c| std::mem::replace(c, false));
        }
        let unit: f64 = rand::random();
        let Some(delay) = reconnect.after(&end, &opts.backoff, unit) else {
            return;
        };
        match &end {
            SessionEnd::Shutdown => return,
            SessionEnd::Lost { welcomed, reason } => tracing::warn!(
                controller = %connector.describe(),
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

/// Why reading from the controller ended a connection.
enum ReadFailure {
    /// The controller broke the protocol (a bad frame, or the transport's
    /// own rules): it is told so before the connection is dropped.
    Violation(String),
    /// The connection is gone: closed, reset or failed.
    Gone(String),
}

impl From<TransportError> for ReadFailure {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Violation(_) => ReadFailure::Violation(e.to_string()),
            e => ReadFailure::Gone(e.to_string()),
        }
    }
}

/// One connection, from connect to its end.
async fn session<C: Connector>(
    agent: &mut Agent,
    connector: &C,
    opts: &LinkOptions,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let lost = |welcomed, reason: String| SessionEnd::Lost { welcomed, reason };
    // Connecting can take a while (a QUIC attempt that gets no answer, a
    // slow TLS handshake): the robot keeps being sampled meanwhile, so no
    // change goes unreported.
    let every = sample_every(agent, opts);
    let mut sample = tokio::time::interval_at(Instant::now() + every, every);
    sample.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let connect = connector.connect();
    tokio::pin!(connect);
    let mut conn = loop {
        tokio::select! {
            () = shutdown.cancelled() => return SessionEnd::Shutdown,
            r = &mut connect => match r {
                Err(e) => return lost(false, e.to_string()),
                Ok(conn) => break conn,
            },
            _ = sample.tick() => {
                agent.observe(std::time::Instant::now()).await;
            }
        }
    };

    let hello = AgentMessage::Hello(Hello {
        identity: agent.identity().clone(),
        versions: version::SUPPORTED.to_vec(),
        last_acked_seq: agent.outbox().settled(),
    });
    let write_timeout = opts.handshake_timeout;
    if let Err(Lost(reason)) = send(
        &mut conn,
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
            let _ = tokio::time::timeout(opts.close_timeout, conn.close(Close::Normal)).await;
            return SessionEnd::Shutdown;
        }
        r = tokio::time::timeout(opts.handshake_timeout, next_message(&mut conn, opts.max_frame)) => r,
    };
    let welcome = match first {
        Err(_) => return lost(false, "no answer to Hello in time".into()),
        Ok(Err(failure)) => {
            return lost(false, give_up(&mut conn, failure, opts.close_timeout).await);
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
                let failure = ReadFailure::Violation(reason);
                return lost(false, give_up(&mut conn, failure, opts.close_timeout).await);
            }
        },
    };

    let heartbeat = decide::heartbeat_interval(welcome.heartbeat_interval_ms);
    tracing::info!(
        controller = %connector.describe(),
        session_id = %welcome.session_id,
        version = %welcome.version,
        heartbeat_ms = heartbeat.as_millis() as u64,
        "connected to the controller"
    );
    if let Some(connected) = &opts.connected {
        connected.send_replace(true);
    }
    let mut conn = Connected {
        conn,
        version: welcome.version,
        max_frame: opts.max_frame,
        heartbeat,
        idle: decide::idle_timeout(heartbeat),
        last_read: Instant::now(),
        job: None,
        queued: VecDeque::new(),
        renewal: Renewal::default(),
        credentials: opts.credentials.clone(),
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
    // Everything the session logs carries its id, which is also the
    // correlation id of the events the controller records for it.
    let session = tracing::info_span!("session", correlation_id = %welcome.session_id);
    match conn.serve(agent, opts, shutdown).instrument(session).await {
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
struct Connected<C> {
    conn: C,
    version: ProtocolVersion,
    max_frame: usize,
    heartbeat: Duration,
    idle: Duration,
    last_read: Instant,
    /// At most one workload action runs at a time; commands that arrive
    /// meanwhile wait in `queued`, in order.
    job: Option<InFlight>,
    queued: VecDeque<Command>,
    renewal: Renewal,
    credentials: Option<std::sync::Arc<Credentials>>,
}

/// Certificate renewal over this connection.
#[derive(Debug, Default)]
struct Renewal {
    /// When the last request was sent (one at a time).
    asked: Option<Instant>,
    /// Not before this (after a refusal).
    not_before: Option<Instant>,
}

/// How long a renewal request may stay unanswered before it is sent again,
/// and how long to wait after the controller could not renew.
const RENEWAL_RETRY: Duration = Duration::from_secs(60);

/// The outcome of the job in flight; never ready without one.
async fn job_outcome(job: &mut Option<InFlight>) -> CommandOutcome {
    match job {
        Some(j) => j.outcome.as_mut().await,
        None => std::future::pending().await,
    }
}

impl<C: Connection> Connected<C> {
    async fn send(&mut self, message: &AgentMessage) -> Result<(), Lost> {
        send(
            &mut self.conn,
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
                r = tokio::time::timeout_at(read_deadline, next_received(&mut self.conn, self.max_frame)) => {
                    let received = match r {
                        Err(_) => return Err(End::Lost(format!("nothing from the controller for {:?}", self.idle))),
                        Ok(Err(failure)) => {
                            return Err(End::Lost(give_up(&mut self.conn, failure, opts.close_timeout).await));
                        }
                        Ok(Ok(received)) => received,
                    };
                    self.last_read = Instant::now();
                    if let Received::Message(message) = received {
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
                    self.renew_if_due().await?;
                    // A controller only answers reports and commands; a
                    // transport-level ping gets an answer from any healthy
                    // peer and so keeps the read side from idling out.
                    if self.last_read.elapsed() >= self.heartbeat {
                        bounded_write(self.idle, self.conn.keepalive()).await?;
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
            ControllerMessage::Certificate(issued) => {
                self.renewal.asked = None;
                let Some(creds) = self.credentials.clone() else {
                    return Ok(());
                };
                let cert = rustls_pki_types::CertificateDer::from(issued.cert_der);
                match tokio::task::spawn_blocking(move || creds.install(cert)).await {
                    Ok(Ok(())) => {
                        tracing::info!(not_after_ms = issued.not_after_ms, "certificate renewed")
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "the renewed certificate is not usable; keeping the current one"
                        );
                        self.renewal.not_before = Some(Instant::now() + RENEWAL_RETRY);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "installing the renewed certificate failed")
                    }
                }
                Ok(())
            }
            ControllerMessage::RenewRefused(r) => {
                tracing::warn!(reason = r.reason, retry_in = ?RENEWAL_RETRY, "the controller could not renew the certificate");
                self.renewal.asked = None;
                self.renewal.not_before = Some(Instant::now() + RENEWAL_RETRY);
                Ok(())
            }
            ControllerMessage::Welcome(_) => {
                Err(End::Lost("protocol violation: a second Welcome".into()))
            }
        }
    }

    /// Asks for a new certificate when the current one is due for renewal
    /// (one request at a time; the controller must speak 1.1).
    async fn renew_if_due(&mut self) -> Result<(), Lost> {
        let Some(creds) = &self.credentials else {
            return Ok(());
        };
        let now = Instant::now();
        let waiting = self.renewal.asked.is_some_and(|t| now < t + RENEWAL_RETRY)
            || self.renewal.not_before.is_some_and(|t| now < t);
        if self.version < version::RENEWAL
            || waiting
            || !creds.renewal_due(std::time::SystemTime::now())
        {
            return Ok(());
        }
        let csr_der = match creds.renewal_request() {
            Ok(csr) => csr,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "cannot make a renewal request");
                self.renewal.not_before = Some(now + RENEWAL_RETRY);
                return Ok(());
            }
        };
        tracing::info!(not_after = ?creds.not_after(), "asking the controller to renew the certificate");
        self.renewal.asked = Some(now);
        self.send(&AgentMessage::RenewCertificate(RenewCertificate {
            csr_der,
        }))
        .await
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
        // Goodbye is read before the connection goes away.
        let closing = async {
            self.conn.close(Close::Normal).await;
            while let Ok(Incoming::Frame(_) | Incoming::Alive) = self.conn.recv().await {}
        };
        let _ = tokio::time::timeout(close_timeout, closing).await;
        tracing::info!("said goodbye to the controller");
    }
}

/// Encodes one message and sends it as one frame.
async fn send<C: Connection>(
    conn: &mut C,
    version: ProtocolVersion,
    message: &AgentMessage,
    max_frame: usize,
    timeout: Duration,
) -> Result<(), Lost> {
    let bytes = frame::encode_frame(version, message, max_frame)
        .map_err(|e| Lost(format!("cannot encode a frame: {e}")))?;
    bounded_write(timeout, conn.send(bytes)).await
}

/// Waits for a write at most `timeout`.
async fn bounded_write(
    timeout: Duration,
    write: impl Future<Output = Result<(), TransportError>>,
) -> Result<(), Lost> {
    match tokio::time::timeout(timeout, write).await {
        Err(_) => Err(Lost(format!("write timed out after {timeout:?}"))),
        Ok(Err(e)) => Err(Lost(e.to_string())),
        Ok(Ok(())) => Ok(()),
    }
}

/// Ends a connection that could not be read on: a controller that broke
/// the protocol is told why (best effort, bounded in time). The reason, for
/// the log.
async fn give_up<C: Connection>(conn: &mut C, failure: ReadFailure, timeout: Duration) -> String {
    match failure {
        ReadFailure::Violation(reason) => {
            let _ = tokio::time::timeout(timeout, conn.close(Close::Violation(&reason))).await;
            reason
        }
        ReadFailure::Gone(reason) => reason,
    }
}

/// What the controller sent: a message, or only a sign that the
/// connection is alive (a transport-level ping or pong).
enum Received {
    Message(ControllerMessage),
    Alive,
}

/// The next thing the controller sent. A closed or broken connection, a
/// transport violation or a bad frame ends the connection. Cancel-safe, as
/// [`Connection::recv`] is.
async fn next_received<C: Connection>(
    conn: &mut C,
    max_frame: usize,
) -> Result<Received, ReadFailure> {
    match conn.recv().await? {
        Incoming::Frame(bytes) => frame::decode_frame::<ControllerMessage>(&bytes, max_frame)
            .map(|(_, m)| Received::Message(m))
            .map_err(|e| ReadFailure::Violation(format!("bad frame from the controller: {e}"))),
        Incoming::Alive => Ok(Received::Alive),
        Incoming::Closed(None) => Err(ReadFailure::Gone("connection closed".into())),
        Incoming::Closed(Some(why)) => Err(ReadFailure::Gone(format!(
            "controller closed the connection ({why})"
        ))),
    }
}

/// The next controller message, skipping signs of life.
async fn next_message<C: Connection>(
    conn: &mut C,
    max_frame: usize,
) -> Result<ControllerMessage, ReadFailure> {
    loop {
        if let Received::Message(m) = next_received(conn, max_frame).await? {
            return Ok(m);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The link's session logic over an in-memory transport: a test double
    //! of the transport seam this crate owns, so that the protocol side of
    //! the link is checked without a network. The real transport is covered
    //! against a fake controller in `tests/link.rs`.

    use super::*;
    use kiwi_protocol::message::{Ack, DesiredConfig, Welcome};
    use kiwi_protocol::version::CURRENT;
    use tokio::sync::{Mutex, mpsc};
    use tokio::task::JoinHandle;

    const WAIT: Duration = Duration::from_secs(5);

    /// What the agent did on an in-memory connection.
    #[derive(Debug)]
    enum Sent {
        Frame(Vec<u8>),
        Keepalive,
        /// `close`, with the violation's reason if it was one.
        Close(Option<String>),
    }

    struct MemConnection {
        to_controller: mpsc::UnboundedSender<Sent>,
        from_controller: mpsc::UnboundedReceiver<Incoming>,
    }

    impl MemConnection {
        fn put(&self, sent: Sent) -> Result<(), TransportError> {
            self.to_controller
                .send(sent)
                .map_err(|_| TransportError::Write("the controller side is gone".into()))
        }
    }

    impl Connection for MemConnection {
        async fn send(&mut self, frame: Vec<u8>) -> Result<(), TransportError> {
            self.put(Sent::Frame(frame))
        }

        async fn recv(&mut self) -> Result<Incoming, TransportError> {
            // `mpsc::UnboundedReceiver::recv` is cancel-safe.
            Ok(self
                .from_controller
                .recv()
                .await
                .unwrap_or(Incoming::Closed(None)))
        }

        async fn keepalive(&mut self) -> Result<(), TransportError> {
            self.put(Sent::Keepalive)
        }

        async fn close(&mut self, why: Close<'_>) {
            let reason = match why {
                Close::Normal => None,
                Close::Violation(reason) => Some(reason.to_string()),
            };
            let _ = self.put(Sent::Close(reason));
        }
    }

    /// Hands out the connections the test offers, in order; waits for one
    /// when there is none yet.
    struct MemConnector {
        offered: Mutex<mpsc::UnboundedReceiver<MemConnection>>,
    }

    impl Connector for MemConnector {
        type Conn = MemConnection;

        async fn connect(&self) -> Result<MemConnection, TransportError> {
            self.offered
                .lock()
                .await
                .recv()
                .await
                .ok_or_else(|| TransportError::ConnectTimeout {
                    endpoint: self.describe(),
                })
        }

        fn describe(&self) -> String {
            "memory".into()
        }
    }

    /// The controller's end of one in-memory connection.
    struct Peer {
        sent: mpsc::UnboundedReceiver<Sent>,
        reply: mpsc::UnboundedSender<Incoming>,
    }

    impl Peer {
        /// What the agent did next; `None` once it dropped the connection.
        async fn next(&mut self) -> Option<Sent> {
            tokio::time::timeout(WAIT, self.sent.recv())
                .await
                .expect("nothing from the agent in time")
        }

        /// The next message, skipping keepalives and heartbeats.
        async fn message(&mut self) -> (ProtocolVersion, AgentMessage) {
            loop {
                match self.next().await.expect("the agent dropped the connection") {
                    Sent::Frame(bytes) => match frame::decode_frame(&bytes, DEFAULT_MAX_FRAME) {
                        Ok((_, AgentMessage::Heartbeat(_))) => continue,
                        Ok(decoded) => return decoded,
                        Err(e) => panic!("the agent sent a bad frame: {e}"),
                    },
                    Sent::Keepalive => continue,
                    Sent::Close(why) => panic!("the agent closed the connection: {why:?}"),
                }
            }
        }

        fn send(&self, message: ControllerMessage) {
            let bytes = frame::encode_frame(CURRENT, &message, DEFAULT_MAX_FRAME).unwrap();
            self.reply.send(Incoming::Frame(bytes)).unwrap();
        }

        fn welcome(&self, heartbeat_interval_ms: u32) {
            self.send(ControllerMessage::Welcome(Welcome {
                session_id: uuid::Uuid::new_v4(),
                version: CURRENT,
                heartbeat_interval_ms,
                config: DesiredConfig {
                    maintenance: false,
                    report_interval_ms: 0,
                    settings: Vec::new(),
                },
            }));
        }
    }

    struct Running {
        shutdown: CancellationToken,
        task: JoinHandle<Agent>,
        offer: mpsc::UnboundedSender<MemConnection>,
        _state: tempfile::TempDir,
    }

    impl Running {
        /// Offers the agent one more connection; its controller end.
        fn offer(&self) -> Peer {
            let (to_controller, sent) = mpsc::unbounded_channel();
            let (reply, from_controller) = mpsc::unbounded_channel();
            let conn = MemConnection {
                to_controller,
                from_controller,
            };
            assert!(self.offer.send(conn).is_ok(), "the link task ended");
            Peer { sent, reply }
        }

        async fn stop(self) -> Agent {
            self.shutdown.cancel();
            tokio::time::timeout(WAIT, self.task)
                .await
                .expect("the link did not stop in time")
                .unwrap()
        }
    }

    fn start() -> Running {
        let state = tempfile::tempdir().unwrap();
        let mut agent =
            Agent::simulated(0, "mem", state.path(), Duration::from_secs(600), 100).unwrap();
        let (offer, offered) = mpsc::unbounded_channel();
        let connector = MemConnector {
            offered: Mutex::new(offered),
        };
        let opts = LinkOptions::new(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(50),
        ));
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            run(&mut agent, &connector, &opts, &token).await;
            agent
        });
        Running {
            shutdown,
            task,
            offer,
            _state: state,
        }
    }

    #[tokio::test]
    async fn handshake_ack_and_goodbye_over_any_transport() {
        let agent = start();
        let mut ctl = agent.offer();

        match ctl.message().await {
            (v, AgentMessage::Hello(hello)) => {
                assert_eq!(v, version::HANDSHAKE);
                assert_eq!(hello.last_acked_seq, 0);
            }
            other => panic!("expected Hello, got {other:?}"),
        }
        ctl.welcome(100);
        match ctl.message().await {
            (v, AgentMessage::Report(r)) => {
                assert_eq!(v, CURRENT);
                assert_eq!(r.seq, 1);
            }
            other => panic!("expected the first report, got {other:?}"),
        }
        ctl.send(ControllerMessage::Ack(Ack { seq: 1 }));
        // Messages are handled in order: the answer means the Ack was too.
        let command_id = uuid::Uuid::new_v4();
        ctl.send(ControllerMessage::Command(Command {
            command_id,
            kind: kiwi_protocol::message::CommandKind::Ping,
        }));
        match ctl.message().await {
            (_, AgentMessage::CommandResult(r)) => assert_eq!(r.command_id, command_id),
            other => panic!("expected the command's result, got {other:?}"),
        }

        agent.shutdown.cancel();
        assert!(matches!(ctl.message().await, (_, AgentMessage::Goodbye(_))));
        assert!(matches!(ctl.next().await, Some(Sent::Close(None))));
        // The controller closes its side too: the link is done at once.
        drop(ctl.reply);
        let agent = agent.stop().await;
        assert_eq!(agent.outbox().acked(), 1);
        assert!(agent.outbox().pending().is_empty());
    }

    #[tokio::test]
    async fn a_bad_frame_is_told_to_the_controller_and_the_link_reconnects() {
        let agent = start();
        let mut ctl = agent.offer();
        assert!(matches!(ctl.message().await, (_, AgentMessage::Hello(_))));
        ctl.welcome(100);
        ctl.reply
            .send(Incoming::Frame(b"not a frame".to_vec()))
            .unwrap();
        let reason = loop {
            match ctl.next().await {
                Some(Sent::Close(Some(reason))) => break reason,
                Some(Sent::Frame(_) | Sent::Keepalive) => continue,
                other => panic!("expected a close for the bad frame, got {other:?}"),
            }
        };
        assert!(
            reason.starts_with("bad frame from the controller"),
            "{reason}"
        );
        assert!(ctl.next().await.is_none(), "the connection was not dropped");

        let mut again = agent.offer();
        match again.message().await {
            (_, AgentMessage::Hello(hello)) => assert_eq!(hello.last_acked_seq, 0),
            other => panic!("expected Hello, got {other:?}"),
        }
        agent.stop().await;
    }

    #[tokio::test]
    async fn signs_of_life_hold_the_link_until_they_stop() {
        let agent = start();
        let mut ctl = agent.offer();
        assert!(matches!(ctl.message().await, (_, AgentMessage::Hello(_))));
        // Idle timeout: three heartbeats, 600 ms.
        ctl.welcome(200);

        // Answer every keepalive, send no frame: the link stays up well
        // past the idle timeout.
        let until = Instant::now() + Duration::from_millis(1500);
        let mut keepalives = 0;
        while Instant::now() < until {
            match ctl.next().await {
                Some(Sent::Keepalive) => {
                    keepalives += 1;
                    ctl.reply.send(Incoming::Alive).unwrap();
                }
                Some(Sent::Frame(_)) => {}
                other => panic!("the link ended while the controller was alive: {other:?}"),
            }
        }
        assert!(keepalives >= 2, "only {keepalives} keepalives");

        // Silence: the link gives up, without a close (nobody to tell).
        loop {
            match ctl.next().await {
                Some(Sent::Frame(_) | Sent::Keepalive) => {}
                Some(Sent::Close(why)) => panic!("unexpected close: {why:?}"),
                None => break,
            }
        }
        agent.stop().await;
    }
}
