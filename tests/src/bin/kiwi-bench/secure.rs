//! Secure links: handshakes per second and controller memory per idle
//! connected agent, for WebSocket over TLS and for QUIC, against plain
//! (unencrypted) WebSocket measured in the same run.
//!
//! - The controller is the release `kiwi-controller`, a separate process
//!   whose resident memory (`VmRSS`) is read from `/proc`.
//! - The baseline is a plain WebSocket server (`kiwi-bench
//!   --plain-ws-server`, tokio-tungstenite with the controller's buffer
//!   sizes), also a process of its own: the floor of holding a WebSocket
//!   without TLS, authentication or any session state.
//! - Handshakes: new connections opened and dropped by 4 client tasks in
//!   this process, interleaved in rounds; a handshake ends when the
//!   connection is usable (plain: the upgrade's 101; TLS WebSocket: TLS
//!   with a client certificate, the controller's admission and the 101;
//!   QUIC: the QUIC handshake with a client certificate and the
//!   controller's admission marker).
//! - Memory: N idle agents (`kiwi-agent simulate`, real agent code:
//!   heartbeats each second, no reports) enrolled and recorded before, so
//!   that a controller started afresh on the same state already holds
//!   their robots; then RSS before and after they connect, divided by N.
//!   The baseline server gets N plain WebSockets from this process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use kiwi_agent::transport::Connector as _;
use kiwi_agent::transport::quic::QuicConnector;
use kiwi_security::pki::Authority;
use kiwi_security::verify::ALPN_QUIC;
use kiwi_tests::agent_port::{self, ClientCert};
use tokio::net::{TcpListener, TcpStream};

use super::{
    Binaries, Killed, Row, clean_command, cli_token, fmt_count, free_port, log_tail, progress,
};

/// Client tasks opening connections at once.
const HANDSHAKE_WORKERS: usize = 4;
/// How long agents may take to connect before the run is abandoned.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long memory is left to settle after the last agent connected.
const SETTLE: Duration = Duration::from_secs(2);

/// The WebSocket settings of the plain baseline: the controller's.
fn plain_ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    use kiwi_controller::link::websocket::{READ_BUFFER, WRITE_BUFFER};
    let max = kiwi_protocol::frame::DEFAULT_MAX_FRAME;
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(max + 4 * 1024)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// `kiwi-bench --plain-ws-server`: accepts WebSockets on 127.0.0.1 and
/// holds them, reading until each closes; prints its address on stdout.
pub fn plain_ws_server() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        println!("{}", listener.local_addr()?);
        loop {
            let (tcp, _) = listener.accept().await?;
            tokio::spawn(async move {
                use futures_util::StreamExt as _;
                let _ = tcp.set_nodelay(true);
                if let Ok(mut ws) =
                    tokio_tungstenite::accept_async_with_config(tcp, Some(plain_ws_config())).await
                {
                    while let Some(Ok(_)) = ws.next().await {}
                }
            });
        }
    })
}

/// Resident memory of `pid`, in KiB.
pub(super) fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

/// A controller process on a given state directory.
pub(super) struct Controller {
    child: Killed,
    pub(super) api: SocketAddr,
    pub(super) agent: SocketAddr,
}

/// The settings of this section's controllers: every agent comes from
/// 127.0.0.1, so the per-address limits are lifted.
const ONE_ADDRESS: &[(&str, &str)] = &[
    ("KIWI_CONTROLLER_ENROLL_PER_MINUTE", "1000000"),
    ("KIWI_CONTROLLER_MAX_CONNECTIONS_PER_ADDRESS", "1000000"),
    ("KIWI_CONTROLLER_AUTH_FAILURES_PER_MINUTE", "1000000"),
    ("KIWI_CONTROLLER_DISCOVERY_INTERVAL", "0s"),
];

impl Controller {
    /// `kiwi-controller serve` on loopback ports with the settings `env`;
    /// returns once `/readyz` answers 200.
    pub(super) async fn start(
        bin: &Path,
        state: &Path,
        log: &Path,
        http: &reqwest::Client,
        env: &[(&str, &str)],
    ) -> Result<Controller> {
        let api = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let agent = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut cmd = clean_command(bin);
        cmd.envs(env.iter().copied())
            .arg("serve")
            .arg("--state-dir")
            .arg(state)
            .arg("--api-listen")
            .arg(api.to_string())
            .arg("--agent-listen")
            .arg(agent.to_string())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)?,
            );
        let mut child = Killed(cmd.spawn().context("cannot start kiwi-controller")?);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.0.try_wait()? {
                bail!(
                    "kiwi-controller exited ({status}); log tail:\n{}",
                    log_tail(log, 20)
                );
            }
            if let Ok(r) = http.get(format!("http://{api}/readyz")).send().await
                && r.status() == reqwest::StatusCode::OK
            {
                return Ok(Controller { child, api, agent });
            }
            ensure!(
                Instant::now() < deadline,
                "kiwi-controller not ready; log tail:\n{}",
                log_tail(log, 20)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Its `/metrics`, as text.
    pub(super) async fn metrics(&self, http: &reqwest::Client) -> Result<String> {
        Ok(http
            .get(format!("http://{}/metrics", self.api))
            .send()
            .await?
            .text()
            .await?)
    }

    /// The `agent_connections` gauge.
    async fn connections(&self, http: &reqwest::Client) -> Result<u64> {
        let text = self.metrics(http).await?;
        Ok(super::metric(&text, "agent_connections").unwrap_or(0.0) as u64)
    }

    async fn wait_connections(&self, http: &reqwest::Client, n: u64) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            let now = self.connections(http).await?;
            if now == n {
                return Ok(t0.elapsed());
            }
            ensure!(
                t0.elapsed() < CONNECT_TIMEOUT,
                "{now} of {n} agents connected after {CONNECT_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM and wait (a clean stop keeps the robots for the next start).
    pub(super) async fn stop(mut self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.0.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.0.try_wait()?.is_none() {
            ensure!(Instant::now() < deadline, "kiwi-controller did not stop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

/// `kiwi-agent simulate` of `count` agents named `prefix-<i>` over
/// `transport`.
#[allow(clippy::too_many_arguments)]
fn simulate(
    bins: &Binaries,
    ctl: &Controller,
    state: &Path,
    prefix: &str,
    count: usize,
    transport: &str,
    token: Option<&str>,
    log: &Path,
) -> Result<Killed> {
    let mut cmd = clean_command(&bins.agent);
    cmd.arg("simulate")
        .arg("--count")
        .arg(count.to_string())
        .arg("--id-prefix")
        .arg(prefix)
        .arg("--controller")
        .arg(ctl.agent.to_string())
        .arg("--transport")
        .arg(transport)
        .arg("--state-dir")
        .arg(state)
        .arg("--report-interval")
        .arg("1h")
        .stderr(std::fs::File::create(log)?);
    if let Some(token) = token {
        cmd.env("KIWI_AGENT_ENROLL_TOKEN", token);
    }
    Ok(Killed(
        cmd.spawn().context("cannot start kiwi-agent simulate")?,
    ))
}

/// Stops a simulator with SIGTERM (its agents say goodbye).
pub(super) async fn stop_simulator(mut sim: Killed) -> Result<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(sim.0.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while sim.0.try_wait()?.is_none() {
        ensure!(
            Instant::now() < deadline,
            "kiwi-agent simulate did not stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The plain baseline server process and its address.
fn start_plain_server() -> Result<(Killed, SocketAddr)> {
    use std::io::BufRead as _;
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("--plain-ws-server")
        // The allocator setting the controller gives itself (its
        // `MALLOC_ARENAS`), so that both sides are measured alike.
        .env("MALLOC_ARENA_MAX", "2")
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null())
        .spawn()
        .context("cannot start the plain WebSocket server")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let child = Killed(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .parse()
        .with_context(|| format!("the plain server said {line:?}"))?;
    Ok((child, addr))
}

async fn plain_ws(addr: SocketAddr) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{addr}/agent"),
        tcp,
        Some(plain_ws_config()),
    )
    .await?;
    Ok(ws)
}

/// Which connection a handshake opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Plain,
    TlsWebSocket,
    Quic,
}

/// `per_worker` handshakes of `kind` from each of the workers; the time
/// they took together.
async fn handshakes(
    kind: Kind,
    per_worker: usize,
    plain: SocketAddr,
    ctl: SocketAddr,
    ca: &Authority,
    certs: &[ClientCert],
) -> Result<Duration> {
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for cert in certs.iter().take(HANDSHAKE_WORKERS) {
        let cert = cert.clone();
        let ca = ca.cert_der().clone();
        let quic_tls = agent_port::tls(&ca, Some(cert.clone()), ALPN_QUIC);
        tasks.spawn(async move {
            let quic = QuicConnector::new(ctl.ip().to_string(), ctl.port(), quic_tls);
            for _ in 0..per_worker {
                match kind {
                    Kind::Plain => drop(plain_ws(plain).await?),
                    Kind::TlsWebSocket => {
                        match agent_port::connect_ws(ctl, &ca, Some(cert.clone())).await {
                            Ok(ws) => drop(ws),
                            Err(Ok(refused)) => bail!("refused: {refused:?}"),
                            Err(Err(e)) => return Err(e),
                        }
                    }
                    Kind::Quic => drop(quic.connect().await?),
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(t0.elapsed())
}

/// The rows of this section.
pub async fn secure_links(quick: bool, dir: &Path) -> Result<Vec<Row>> {
    let bins = Binaries::find()?;
    let agents = if quick { 200 } else { 1_000 };
    let rounds = if quick { 3 } else { 10 };
    let per_round = if quick { 10 } else { 25 };
    std::fs::create_dir_all(dir)?;
    let http = reqwest::Client::builder().build()?;
    let state = dir.join("controller");
    let log = dir.join("controller.log");
    let sim_state = dir.join("agents");
    let enroll = cli_token(
        &bins.controller,
        &state,
        &["--ttl", "2h", "--uses", "1000000"],
    )?;

    // Enroll and record the agents once, in two halves.
    progress(&format!("  enrolling {agents} simulated agents"));
    let half = agents / 2;
    let ctl = Controller::start(&bins.controller, &state, &log, &http, ONE_ADDRESS).await?;
    let first = simulate(
        &bins,
        &ctl,
        &sim_state,
        "a",
        half,
        "websocket",
        Some(&enroll),
        &dir.join("enroll-a.log"),
    )?;
    let second = simulate(
        &bins,
        &ctl,
        &sim_state,
        "b",
        half,
        "websocket",
        Some(&enroll),
        &dir.join("enroll-b.log"),
    )?;
    ctl.wait_connections(&http, (2 * half) as u64).await?;
    stop_simulator(first).await?;
    stop_simulator(second).await?;
    ctl.stop().await?;

    // Memory per idle agent, each transport on a controller started
    // afresh: the resident memory after the first half connected and after
    // the second, so that one-time growth (tables, the runtime's threads)
    // is not charged to the agents.
    let mut memory = Vec::new();
    for transport in ["websocket", "quic"] {
        let ctl = Controller::start(&bins.controller, &state, &log, &http, ONE_ADDRESS).await?;
        let first = simulate(
            &bins,
            &ctl,
            &sim_state,
            "a",
            half,
            transport,
            None,
            &dir.join(format!("{transport}-a.log")),
        )?;
        ctl.wait_connections(&http, half as u64).await?;
        tokio::time::sleep(SETTLE).await;
        let before = rss_kib(ctl.pid())?;
        let second = simulate(
            &bins,
            &ctl,
            &sim_state,
            "b",
            half,
            transport,
            None,
            &dir.join(format!("{transport}-b.log")),
        )?;
        let took = ctl.wait_connections(&http, (2 * half) as u64).await?;
        tokio::time::sleep(SETTLE).await;
        let after = rss_kib(ctl.pid())?;
        progress(&format!(
            "  {transport}: {half} more agents connected in {took:?}; RSS {before} -> {after} KiB"
        ));
        memory.push((before, after));
        stop_simulator(first).await?;
        stop_simulator(second).await?;
        ctl.stop().await?;
    }
    let (plain_server, plain) = start_plain_server()?;
    let mut held = Vec::with_capacity(2 * half);
    for _ in 0..half {
        held.push(plain_ws(plain).await?);
    }
    tokio::time::sleep(SETTLE).await;
    let before = rss_kib(plain_server.0.id())?;
    for _ in 0..half {
        held.push(plain_ws(plain).await?);
    }
    tokio::time::sleep(SETTLE).await;
    let after = rss_kib(plain_server.0.id())?;
    drop(held);
    let plain_memory = (before, after);

    // Handshakes, interleaved.
    let ctl = Controller::start(&bins.controller, &state, &log, &http, ONE_ADDRESS).await?;
    let ca = read_ca(&state)?;
    let certs: Vec<ClientCert> = (0..HANDSHAKE_WORKERS)
        .map(|_| agent_port::robot_cert(&ca, uuid::Uuid::new_v4(), agent_port::hour()))
        .collect();
    let mut spent = [Duration::ZERO; 3];
    // One unmeasured round warms both servers up.
    for round in 0..=rounds {
        for (i, kind) in [Kind::Plain, Kind::TlsWebSocket, Kind::Quic]
            .into_iter()
            .enumerate()
        {
            let took = handshakes(kind, per_round, plain, ctl.agent, &ca, &certs).await?;
            if round > 0 {
                spent[i] += took;
            }
        }
    }
    drop(ctl);
    drop(plain_server);
    let n = (rounds * per_round * HANDSHAKE_WORKERS) as f64;
    let rate = |d: Duration| n / d.as_secs_f64();
    let (plain_rate, ws_rate, quic_rate) = (rate(spent[0]), rate(spent[1]), rate(spent[2]));
    let per_agent =
        |(before, after): (u64, u64)| (after.saturating_sub(before)) as f64 / half as f64;
    let plain_kib = per_agent(plain_memory);
    let handshake_row = |name: &str, kiwi: f64| Row {
        metric: format!("Agent handshakes per second, {name}"),
        kiwi: format!("{kiwi:.0}/s"),
        baseline: format!("plain WebSocket: {plain_rate:.0}/s"),
        ratio: format!("{:.2}× (rate)", kiwi / plain_rate),
        target: "—".into(),
        met: None,
        note: format!(
            "{} new connections by {HANDSHAKE_WORKERS} client tasks, in {rounds} rounds interleaved \
             with the baseline's; a handshake ends when the connection is usable (TLS 1.3 with an \
             ECDSA P-256 client certificate and the controller's admission check included)",
            fmt_count(n as usize)
        ),
    };
    let memory_row = |name: &str, kib: f64, target: f64, (before, after): (u64, u64)| Row {
        metric: format!("Controller memory per idle agent, {name}"),
        kiwi: format!("{kib:.1} KiB"),
        baseline: format!("plain WebSocket server: {plain_kib:.1} KiB per connection"),
        ratio: format!("{:.1}×", kib / plain_kib.max(0.1)),
        target: format!("≤ {target:.0} KiB"),
        met: Some(kib <= target),
        note: format!(
            "resident memory of the controller process with {} idle simulated agents connected \
             and with {} ({before} → {after} KiB; kernel socket buffers are not in it), divided by \
             the difference; their robots were loaded from the store at start",
            fmt_count(half),
            fmt_count(2 * half)
        ),
    };
    Ok(vec![
        handshake_row("TLS WebSocket", ws_rate),
        handshake_row("QUIC", quic_rate),
        memory_row("TLS WebSocket", per_agent(memory[0]), 16.0, memory[0]),
        memory_row("QUIC", per_agent(memory[1]), 48.0, memory[1]),
    ])
}

/// The controller's CA, from its state directory.
pub(super) fn read_ca(state: &Path) -> Result<Authority> {
    let dir: PathBuf = state.join("tls");
    let read =
        |f: &str| std::fs::read_to_string(dir.join(f)).with_context(|| format!("cannot read {f}"));
    Ok(Authority::from_pem(&read("ca.pem")?, &read("ca.key")?)?)
}
