//! Scale: a fleet of agents on one controller, against the Mosquitto MQTT
//! broker carrying the same fleet's status messages, both measured in the
//! same run.
//!
//! - kiwi: the release `kiwi-controller` on its embedded default store
//!   (SQLite), a process of its own, with auto-provisioning on; `N` agents
//!   of one `kiwi-agent simulate` (the real agent code, TLS WebSocket, a
//!   client certificate each, issued beforehand as enrollment would), each
//!   from a loopback address of its own (`--source-network`), heartbeating
//!   every second (the controller's default) and reporting every 30 s (its
//!   default). Measured once every robot is `ready`: the controller's CPU
//!   time and resident memory over a window, heartbeat-to-visible latency
//!   (a bare agent of this process heartbeats, `GET /api/v2/robots/{id}`
//!   polled until its `last_seen` shows it), the list of every robot, and
//!   the watch stream's fan-out to 100 SSE clients.
//! - Mosquitto: a broker of this run's own (`mosquitto -c`, loopback only,
//!   no persistence), `N` MQTT clients of this process each publishing a
//!   status message of its robot every second (QoS 0) and one subscriber to
//!   all of them: the broker's CPU time and resident memory over the same
//!   window, and publish-to-subscriber latency.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use futures_util::{SinkExt as _, StreamExt as _};
use kiwi_controller::testing::messages;
use kiwi_protocol::frame::{DEFAULT_MAX_FRAME, decode_frame, encode_frame};
use kiwi_protocol::message::{Heartbeat, Welcome};
use kiwi_protocol::{AgentMessage, ControllerMessage, version};
use kiwi_tests::agent_port;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::secure::{Controller, read_ca, rss_kib, stop_simulator};
use super::{
    Binaries, Killed, Row, Stats, bearer_headers, clean_command, cli_token, fmt_count,
    fmt_duration, follow_watch, free_port, log_tail, metric, open_watch, progress, ratio,
};

/// Every simulated robot connects from an address of this network (16,382
/// host addresses).
const SOURCE_NETWORK: &str = "127.1.0.0/18";
/// The id prefix of the simulated robots.
const PREFIX: &str = "scale";
/// How long the fleet may take to connect and be provisioned.
const FLEET_TIMEOUT: Duration = Duration::from_secs(240);
/// How long memory and CPU are left to settle after the fleet is in place.
const SETTLE: Duration = Duration::from_secs(5);
/// Watch clients of the fan-out figure.
const SSE_CLIENTS: usize = 100;
/// The MQTT topic of robot `id`'s status, and the subscriber's filter.
const MQTT_FILTER: &str = "kiwi/+/status";
/// How long one change may take to reach every watch client.
const FAN_OUT_TIMEOUT: Duration = Duration::from_secs(10);

/// The sizes of one run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    agents: usize,
    /// The agents connect spread over this.
    start_spread: Duration,
    /// CPU time is measured over this window.
    window: Duration,
    heartbeats: usize,
    lists: usize,
    changes: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                agents: 1_000,
                start_spread: Duration::from_secs(2),
                window: Duration::from_secs(5),
                heartbeats: 30,
                lists: 10,
                changes: 10,
            }
        } else {
            Plan {
                agents: 10_000,
                start_spread: Duration::from_secs(20),
                window: Duration::from_secs(30),
                heartbeats: 200,
                lists: 50,
                changes: 50,
            }
        }
    }
}

/// CPU time (user + system) of `pid` so far.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count after its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("no ')' in /proc/<pid>/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .context("short /proc/<pid>/stat")?
            .parse()
            .context("a tick count in /proc/<pid>/stat")
    };
    // utime and stime are fields 14 and 15; `fields[0]` is field 3.
    let total = ticks(11)? + ticks(12)?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?
        .filter(|hz| *hz > 0)
        .unwrap_or(100);
    Ok(Duration::from_secs_f64(total as f64 / hz as f64))
}

/// What a server process used over a window.
#[derive(Debug, Clone, Copy)]
struct Usage {
    /// CPU time ÷ wall time: 1.0 is one core busy.
    cores: f64,
    /// Resident memory at the end of the window.
    rss_kib: u64,
}

/// CPU and memory of `pid` over `window`.
async fn usage_over(pid: u32, window: Duration) -> Result<Usage> {
    let (t0, c0) = (Instant::now(), cpu_time(pid)?);
    tokio::time::sleep(window).await;
    let (t1, c1) = (Instant::now(), cpu_time(pid)?);
    Ok(Usage {
        cores: (c1 - c0).as_secs_f64() / (t1 - t0).as_secs_f64(),
        rss_kib: rss_kib(pid)?,
    })
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

// ---------------------------------------------------------- Mosquitto

/// A Mosquitto broker of this run's own.
struct Mosquitto {
    child: Killed,
    port: u16,
}

impl Mosquitto {
    /// Starts `mosquitto -c` with a configuration of its own: loopback, no
    /// persistence, no connection limit, Nagle off (as kiwi's sockets).
    async fn start(dir: &Path) -> Result<Mosquitto> {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .context("no mosquitto binary (apt-get install mosquitto)")?;
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_connections -1\nset_tcp_nodelay true\nlog_dest stderr\n\
                 log_type error\nlog_type warning\n"
            ),
        )?;
        let log = dir.join("mosquitto.log");
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let mut child = Killed(cmd.spawn().context("cannot start mosquitto")?);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.0.try_wait()? {
                bail!("mosquitto exited ({status}): {}", log_tail(&log, 10));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(Mosquitto { child, port });
            }
            ensure!(
                Instant::now() < deadline,
                "mosquitto does not listen on {port}: {}",
                log_tail(&log, 10)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }
}

fn mqtt_options(id: String, port: u16) -> MqttOptions {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_clean_session(true);
    opts
}

/// A robot's status message, comparable to what a kiwi agent says every
/// second (and more: kiwi's heartbeat carries only the agent's clock).
fn status_payload(robot: usize, sent_us: u64) -> String {
    format!(
        "{{\"robot_id\":\"{}\",\"state\":\"ready\",\"health\":\"healthy\",\
         \"workload\":\"running\",\"sent_us\":{sent_us}}}",
        kiwi_agent::agent::simulated_robot_id(PREFIX, u32::try_from(robot).unwrap_or(0)).0
    )
}

/// The `sent_us` of a status message.
fn sent_us(payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    let (_, tail) = text.rsplit_once("\"sent_us\":")?;
    tail.trim_end_matches('}').parse().ok()
}

/// `n` MQTT clients publishing their robot's status every second, started
/// spread over `spread`; `connected` counts their CONNACKs.
fn mqtt_fleet(
    port: u16,
    n: usize,
    spread: Duration,
    connected: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let (connected, stop) = (connected.clone(), stop.clone());
        let offset = spread.mul_f64(i as f64 / n as f64);
        tasks.spawn(async move {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(offset) => {}
            }
            let (client, mut events) =
                AsyncClient::new(mqtt_options(format!("robot-{i}"), port), 4);
            let topic = format!(
                "kiwi/{}/status",
                kiwi_agent::agent::simulated_robot_id(PREFIX, u32::try_from(i).unwrap_or(0)).0
            );
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    event = events.poll() => match event {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            connected.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        // The event loop reconnects at the next poll.
                        Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                    },
                    _ = tick.tick() => {
                        let _ = client.try_publish(
                            topic.as_str(),
                            QoS::AtMostOnce,
                            false,
                            status_payload(i, unix_us()),
                        );
                    }
                }
            }
            let _ = client.try_disconnect();
        });
    }
    tasks
}

/// What the subscriber saw.
#[derive(Debug, Default)]
struct Received {
    messages: usize,
    /// Publish → subscriber, while recording.
    latencies: Vec<Duration>,
}

/// The one subscriber to every robot's status; records while `recording`
/// is set.
async fn mqtt_subscriber(
    port: u16,
    recording: Arc<std::sync::atomic::AtomicBool>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<Received>> {
    let (client, mut events) = AsyncClient::new(mqtt_options("subscriber".into(), port), 16);
    client.subscribe(MQTT_FILTER, QoS::AtMostOnce).await?;
    // Wait for the subscription to be acknowledged before the fleet starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.poll()).await {
            Err(_) => bail!("the broker did not acknowledge the subscription"),
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("the subscriber cannot connect: {e}"),
        }
    }
    Ok(tokio::spawn(async move {
        let _client = client;
        let mut got = Received::default();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                event = events.poll() => match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if recording.load(Ordering::Relaxed) {
                            got.messages += 1;
                            if let Some(sent) = sent_us(&p.payload) {
                                got.latencies.push(Duration::from_micros(unix_us().saturating_sub(sent)));
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                },
            }
        }
        got
    }))
}

/// What the broker did with the fleet.
struct BrokerFigures {
    idle_rss_kib: u64,
    usage: Usage,
    received: Received,
    connect_took: Duration,
}

async fn mosquitto_phase(plan: &Plan, dir: &Path) -> Result<BrokerFigures> {
    let broker = Mosquitto::start(dir).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss_kib = rss_kib(broker.pid())?;
    let stop = CancellationToken::new();
    let recording = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let subscriber = mqtt_subscriber(broker.port, recording.clone(), stop.clone()).await?;
    let connected = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let fleet = mqtt_fleet(
        broker.port,
        plan.agents,
        plan.start_spread,
        connected.clone(),
        stop.clone(),
    );
    loop {
        let now = connected.load(Ordering::Relaxed);
        if now >= plan.agents {
            break;
        }
        ensure!(
            t0.elapsed() < FLEET_TIMEOUT,
            "{now} of {} MQTT clients connected after {FLEET_TIMEOUT:?}",
            plan.agents
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_took = t0.elapsed();
    progress(&format!(
        "  {} MQTT clients connected in {}",
        fmt_count(plan.agents),
        fmt_duration(connect_took)
    ));
    tokio::time::sleep(SETTLE).await;
    recording.store(true, Ordering::Relaxed);
    let usage = usage_over(broker.pid(), plan.window).await?;
    recording.store(false, Ordering::Relaxed);
    stop.cancel();
    fleet.join_all().await;
    let received = subscriber.await?;
    drop(broker);
    Ok(BrokerFigures {
        idle_rss_kib,
        usage,
        received,
        connect_took,
    })
}

// ---------------------------------------------------------------- kiwi

/// A bare agent of this process: the WebSocket after the handshake.
struct ProbeAgent {
    ws: agent_port::AgentWs,
    version: kiwi_protocol::ProtocolVersion,
    robot_id: kiwi_protocol::RobotId,
}

impl ProbeAgent {
    async fn connect(agent_addr: SocketAddr, state: &Path) -> Result<ProbeAgent> {
        let ca = read_ca(state)?;
        let robot_id = messages::robot_id("scale-probe");
        let cert = agent_port::robot_cert(&ca, robot_id.0, agent_port::hour());
        let mut ws = agent_port::connect_ws(agent_addr, ca.cert_der(), Some(cert))
            .await
            .map_err(|e| match e {
                Ok(refused) => anyhow!("refused: {} {}", refused.status, refused.body),
                Err(e) => e,
            })?;
        let hello = encode_frame(
            version::HANDSHAKE,
            &messages::hello("scale-probe"),
            DEFAULT_MAX_FRAME,
        )?;
        ws.send(Message::Binary(hello.into())).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, ws.next())
                .await
                .context("no Welcome within 10 s")?
                .context("the controller closed the probe's connection")??;
            if let Message::Binary(bytes) = msg {
                match decode_frame::<ControllerMessage>(&bytes, DEFAULT_MAX_FRAME)? {
                    (_, ControllerMessage::Welcome(Welcome { version, .. })) => {
                        return Ok(ProbeAgent {
                            ws,
                            version,
                            robot_id,
                        });
                    }
                    (_, other) => bail!("expected a Welcome, got {other:?}"),
                }
            }
        }
    }

    /// Sends a heartbeat; returns when it was sent (Unix ms).
    async fn heartbeat(&mut self) -> Result<i64> {
        let now = kiwi_agent::agent::unix_ms();
        let frame = encode_frame(
            self.version,
            &AgentMessage::Heartbeat(Heartbeat { time_ms: now }),
            DEFAULT_MAX_FRAME,
        )?;
        self.ws.send(Message::Binary(frame.into())).await?;
        Ok(now)
    }

    /// Reads (and drops) what the controller sent, so that its pings are
    /// answered.
    async fn drain(&mut self) {
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(Duration::from_millis(1), self.ws.next()).await
        {}
    }
}

/// From a heartbeat sent to `GET /api/v2/robots/{id}` showing it in
/// `last_seen`, polled back to back.
async fn heartbeat_to_visible(
    plan: &Plan,
    probe: &mut ProbeAgent,
    client: &reqwest::Client,
    api: SocketAddr,
) -> Result<Vec<Duration>> {
    let url = format!("http://{api}/api/v2/robots/{}", probe.robot_id);
    let mut samples = Vec::with_capacity(plan.heartbeats);
    for _ in 0..plan.heartbeats {
        probe.drain().await;
        // Apart from the last one by more than a millisecond (`last_seen`
        // is in milliseconds), at random moments.
        tokio::time::sleep(Duration::from_millis(20 + rand::random::<u64>() % 30)).await;
        let t0 = Instant::now();
        let sent_ms = probe.heartbeat().await?;
        loop {
            let body: serde_json::Value = client.get(&url).send().await?.json().await?;
            let seen = body["last_seen"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.timestamp_millis());
            if seen.is_some_and(|ms| ms >= sent_ms) {
                samples.push(t0.elapsed());
                break;
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(5),
                "the heartbeat sent at {sent_ms} not visible after 5 s: {body}"
            );
        }
    }
    Ok(samples)
}

/// `GET /api/v2/robots?limit=…` of the whole fleet over loopback HTTP.
async fn list_fleet(
    plan: &Plan,
    client: &reqwest::Client,
    api: SocketAddr,
    robots: usize,
) -> Result<(Vec<Duration>, usize)> {
    let url = format!("http://{api}/api/v2/robots?limit={robots}");
    let check: serde_json::Value = client.get(&url).send().await?.json().await?;
    let items = check["robots"].as_array().map_or(0, Vec::len);
    ensure!(
        items == robots,
        "the list holds {items} robots, expected {robots}"
    );
    let mut samples = Vec::with_capacity(plan.lists);
    let mut bytes = 0;
    for _ in 0..plan.lists {
        let t0 = Instant::now();
        let resp = client.get(&url).send().await?;
        ensure!(
            resp.status() == reqwest::StatusCode::OK,
            "list answered {}",
            resp.status()
        );
        bytes = resp.bytes().await?.len();
        samples.push(t0.elapsed());
    }
    Ok((samples, bytes))
}

/// Changes one robot `plan.changes` times (maintenance start and end);
/// for each change and each of [`SSE_CLIENTS`] watch clients, the time
/// from sending the POST to the event reaching that client.
async fn watch_fan_out(
    plan: &Plan,
    client: &reqwest::Client,
    api: SocketAddr,
    robot: uuid::Uuid,
) -> Result<Vec<Duration>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, super::Sse)>();
    let mut readers = JoinSet::new();
    for c in 0..SSE_CLIENTS {
        let resp = open_watch(client, api).await?;
        let (one_tx, mut one_rx) = mpsc::unbounded_channel();
        let tx = tx.clone();
        readers.spawn(follow_watch(resp, one_tx));
        readers.spawn(async move {
            while let Some(sse) = one_rx.recv().await {
                if tx.send((c, sse)).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let id = robot.to_string();
    let mut samples = Vec::with_capacity(plan.changes * SSE_CLIENTS);
    for k in 0..plan.changes {
        let (action, expected) = if k % 2 == 0 {
            ("maintenance/start", "robot_maintenance_start")
        } else {
            ("maintenance/end", "robot_maintenance_end")
        };
        let url = format!("http://{api}/api/v2/robots/{robot}/{action}");
        let t0 = Instant::now();
        let resp = client.post(&url).send().await?;
        let status = resp.status();
        ensure!(
            status == reqwest::StatusCode::OK,
            "POST {url} answered {status}: {}",
            resp.text().await?
        );
        let mut reached = BTreeMap::new();
        while reached.len() < SSE_CLIENTS {
            let left = FAN_OUT_TIMEOUT.saturating_sub(t0.elapsed());
            let (c, sse) = tokio::time::timeout(left, rx.recv())
                .await
                .map_err(|_| {
                    anyhow!(
                        "{expected} reached {} of {SSE_CLIENTS} watch clients within {FAN_OUT_TIMEOUT:?}",
                        reached.len()
                    )
                })?
                .context("the watch streams ended")?;
            if sse.event != expected {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&sse.data)?;
            if v["robot_id"].as_str() == Some(id.as_str()) {
                reached
                    .entry(c)
                    .or_insert(sse.at.saturating_duration_since(t0));
            }
        }
        samples.extend(reached.into_values());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    readers.abort_all();
    Ok(samples)
}

/// What the controller did with the fleet.
struct KiwiFigures {
    idle_rss_kib: u64,
    /// Restarted on the same store: every robot loaded, no agent.
    loaded_rss_kib: u64,
    /// And then with every agent connected again.
    reconnected_rss_kib: u64,
    usage: Usage,
    connect_took: Duration,
    ready_took: Duration,
    heartbeat: Stats,
    list: Stats,
    list_bytes: usize,
    fan_out: Stats,
    /// Reports stored during the window (`agent_reports_total`).
    reports_per_s: f64,
}

/// Waits until `count` robots are `ready` and as many agents connected.
async fn wait_fleet(
    ctl: &Controller,
    client: &reqwest::Client,
    count: usize,
    t0: Instant,
) -> Result<(Duration, Duration)> {
    let mut connected_at = None;
    loop {
        let text = ctl.metrics(client).await?;
        let connected = metric(&text, "agent_connections").unwrap_or(0.0) as usize;
        let ready = metric(&text, "robots{state=\"ready\"}").unwrap_or(0.0) as usize;
        if connected >= count && connected_at.is_none() {
            connected_at = Some(t0.elapsed());
        }
        if let Some(c) = connected_at
            && ready >= count
        {
            return Ok((c, t0.elapsed()));
        }
        ensure!(
            t0.elapsed() < FLEET_TIMEOUT,
            "after {FLEET_TIMEOUT:?}: {connected} of {count} agents connected, {ready} robots ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `kiwi-agent simulate` of the plan's fleet against `ctl`.
fn simulate(
    bins: &Binaries,
    plan: &Plan,
    ctl: &Controller,
    agents_dir: &Path,
    log: &Path,
) -> Result<Killed> {
    let mut cmd = clean_command(&bins.agent);
    cmd.arg("simulate")
        .arg("--count")
        .arg(plan.agents.to_string())
        .arg("--id-prefix")
        .arg(PREFIX)
        .arg("--controller")
        .arg(ctl.agent.to_string())
        .arg("--transport")
        .arg("websocket")
        .arg("--state-dir")
        .arg(agents_dir)
        .arg("--source-network")
        .arg(SOURCE_NETWORK)
        .arg("--start-spread")
        .arg(format!("{}ms", plan.start_spread.as_millis()))
        .env("KIWI_LOG", "warn")
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)?,
        );
    Ok(Killed(
        cmd.spawn().context("cannot start kiwi-agent simulate")?,
    ))
}

async fn kiwi_phase(plan: &Plan, dir: &Path) -> Result<KiwiFigures> {
    let bins = Binaries::find()?;
    std::fs::create_dir_all(dir)?;
    let state = dir.join("controller");
    let log = dir.join("controller.log");
    let admin = cli_token(&bins.controller, &state, &["--role", "admin"])?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let env = [
        ("KIWI_CONTROLLER_AUTO_PROVISION", "true"),
        ("KIWI_CONTROLLER_DISCOVERY_INTERVAL", "0s"),
    ];
    let ctl = Controller::start(&bins.controller, &state, &log, &http, &env).await?;
    tokio::time::sleep(SETTLE).await;
    let idle_rss_kib = rss_kib(ctl.pid())?;

    // Certificates for the fleet, as enrollment would give them, on a
    // tmpfs (ten thousand robots have ten thousand disks).
    let memory = tempfile::Builder::new()
        .prefix("kiwi-bench-scale-")
        .tempdir_in("/dev/shm")
        .context("a directory on /dev/shm")?;
    let agents_dir = memory.path().join("agents");
    let ca = read_ca(&state)?;
    let (dir_for_certs, n) = (agents_dir.clone(), plan.agents);
    let t = Instant::now();
    tokio::task::spawn_blocking(move || {
        kiwi_tests::agent::issue_simulated_credentials(&ca, &dir_for_certs, PREFIX, n)
    })
    .await??;
    progress(&format!(
        "  {} client certificates issued in {}",
        fmt_count(n),
        fmt_duration(t.elapsed())
    ));

    let sim_log = dir.join("simulate.log");
    let t0 = Instant::now();
    let sim = simulate(&bins, plan, &ctl, &agents_dir, &sim_log)?;
    let (connect_took, ready_took) = wait_fleet(&ctl, &http, plan.agents, t0)
        .await
        .with_context(|| format!("simulate log: {}", log_tail(&sim_log, 10)))?;
    progress(&format!(
        "  {} agents connected in {}, every robot ready in {}",
        fmt_count(plan.agents),
        fmt_duration(connect_took),
        fmt_duration(ready_took)
    ));
    tokio::time::sleep(SETTLE).await;
    let reports = |text: String| metric(&text, "agent_reports_total").unwrap_or(0.0);
    let before = reports(ctl.metrics(&http).await?);
    let usage = usage_over(ctl.pid(), plan.window).await?;
    let after = reports(ctl.metrics(&http).await?);
    progress(&format!(
        "  controller: {:.1} % of one core, RSS {} KiB ({} KiB with no agents)",
        usage.cores * 100.0,
        usage.rss_kib,
        idle_rss_kib
    ));

    let api_client = reqwest::Client::builder()
        .no_proxy()
        .default_headers(bearer_headers(&format!("Bearer {admin}"))?)
        .build()?;
    let mut probe = ProbeAgent::connect(ctl.agent, &state).await?;
    let heartbeat = Stats::of(heartbeat_to_visible(plan, &mut probe, &api_client, ctl.api).await?)?;
    progress(&format!("  heartbeat -> visible: {}", heartbeat.show()));
    // The first page of `N` robots (the probe's robot makes one more).
    let (list, list_bytes) = list_fleet(plan, &api_client, ctl.api, plan.agents).await?;
    let list = Stats::of(list)?;
    progress(&format!("  list: {}", list.show()));
    let robot = kiwi_agent::agent::simulated_robot_id(PREFIX, 0).0;
    let fan_out = Stats::of(watch_fan_out(plan, &api_client, ctl.api, robot).await?)?;
    progress(&format!(
        "  change -> {SSE_CLIENTS} watch clients: {}",
        fan_out.show()
    ));
    drop(probe);

    // The cost of the connections alone: the same fleet on a controller
    // started again on the same store (every robot loaded, none connected),
    // before and after the agents are back.
    stop_simulator(sim).await?;
    ctl.stop().await?;
    let ctl = Controller::start(&bins.controller, &state, &log, &http, &env).await?;
    tokio::time::sleep(SETTLE).await;
    let loaded_rss_kib = rss_kib(ctl.pid())?;
    let sim = simulate(&bins, plan, &ctl, &agents_dir, &sim_log)?;
    wait_fleet(&ctl, &http, plan.agents, Instant::now())
        .await
        .with_context(|| format!("simulate log: {}", log_tail(&sim_log, 10)))?;
    tokio::time::sleep(SETTLE).await;
    let reconnected_rss_kib = rss_kib(ctl.pid())?;
    progress(&format!(
        "  restarted on the same store: RSS {loaded_rss_kib} KiB, {reconnected_rss_kib} KiB \
         with the agents back"
    ));
    drop(sim);
    drop(ctl);
    Ok(KiwiFigures {
        loaded_rss_kib,
        reconnected_rss_kib,
        idle_rss_kib,
        usage,
        connect_took,
        ready_took,
        heartbeat,
        list,
        list_bytes,
        fan_out,
        reports_per_s: (after - before) / plan.window.as_secs_f64(),
    })
}

// --------------------------------------------------------------- rows

/// What a missed target is missed by (empty when it is met).
fn missed_by(value: f64, limit: f64, unit: &str) -> String {
    if value <= limit {
        String::new()
    } else {
        format!("; {:.1}{unit} over the target", value - limit)
    }
}

/// What a ratio above the allowed one is missed by (empty when it is not).
fn ratio_missed_by(ratio: f64, allowed: f64) -> String {
    if ratio <= allowed {
        String::new()
    } else {
        format!("; {:.1}× the {allowed:.0}× allowed", ratio / allowed)
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The rows of this section, and its description.
pub async fn scale(quick: bool, dir: &Path) -> Result<(Vec<Row>, String)> {
    let plan = Plan::new(quick);
    let n = plan.agents;
    let cores = std::thread::available_parallelism().map_or(2, |c| c.get()) as f64;
    progress(&format!(
        "  Mosquitto: {} MQTT clients at 1 Hz and one subscriber",
        fmt_count(n)
    ));
    let broker = mosquitto_phase(&plan, &dir.join("mosquitto")).await?;
    progress(&format!(
        "  Mosquitto: {:.1} % of one core, RSS {} KiB ({} KiB idle), {} messages in {}",
        broker.usage.cores * 100.0,
        broker.usage.rss_kib,
        broker.idle_rss_kib,
        fmt_count(broker.received.messages),
        fmt_duration(plan.window)
    ));
    progress(&format!("  kiwi: {} agents", fmt_count(n)));
    let kiwi = kiwi_phase(&plan, &dir.join("kiwi")).await?;

    let delivered = Stats::of(broker.received.latencies.clone())?;
    let share = |u: Usage| u.cores / cores;
    let kiwi_per_agent = kiwi.usage.rss_kib.saturating_sub(kiwi.idle_rss_kib) as f64 / n as f64;
    let kiwi_per_connection =
        kiwi.reconnected_rss_kib.saturating_sub(kiwi.loaded_rss_kib) as f64 / n as f64;
    let broker_per_client =
        broker.usage.rss_kib.saturating_sub(broker.idle_rss_kib) as f64 / n as f64;
    let fleet = fmt_count(n);
    let cpu_target = 0.25;
    let rows = vec![
        Row {
            metric: format!("Controller CPU, {fleet} WebSocket agents at 1 Hz"),
            kiwi: format!(
                "{:.1} % of the {cores:.0} cores ({:.1} % of one core){}",
                share(kiwi.usage) * 100.0,
                kiwi.usage.cores * 100.0,
                missed_by(share(kiwi.usage) * 100.0, cpu_target * 100.0, " points")
            ),
            baseline: format!(
                "Mosquitto, {fleet} MQTT clients at 1 Hz + 1 subscriber: {:.1} % of the {cores:.0} cores",
                share(broker.usage) * 100.0
            ),
            ratio: format!(
                "{:.2}× (CPU){}",
                kiwi.usage.cores / broker.usage.cores.max(1e-6),
                ratio_missed_by(kiwi.usage.cores / broker.usage.cores.max(1e-6), 2.0)
            ),
            target: "≤ 25 % of 2 cores; ≤ 2× the broker".into(),
            met: Some(
                share(kiwi.usage) <= cpu_target && kiwi.usage.cores <= 2.0 * broker.usage.cores,
            ),
            note: format!(
                "CPU time (user + system, `/proc/<pid>/stat`) of the controller process over {} \
                 once every robot was `ready`, divided by the wall time; the agents send a \
                 heartbeat every second (the controller's default `heartbeat_interval`) and the \
                 controller pings each one as often, and they report every 30 s (default \
                 `report_interval`: {:.0} reports stored per second in the window); every link \
                 is TLS with a client certificate, the broker's plain TCP. The broker's figure is \
                 over the same length of window, its clients connected and publishing ({} \
                 messages reached the subscriber, {:.0}/s)",
                fmt_duration(plan.window),
                kiwi.reports_per_s,
                fmt_count(broker.received.messages),
                broker.received.messages as f64 / plan.window.as_secs_f64()
            ),
        },
        Row {
            metric: format!("Controller memory, {fleet} agents connected"),
            kiwi: format!("{} RSS", mib(kiwi.usage.rss_kib)),
            baseline: format!("Mosquitto: {} RSS", mib(broker.usage.rss_kib)),
            ratio: format!(
                "{:.2}× (RSS){}",
                kiwi.usage.rss_kib as f64 / broker.usage.rss_kib.max(1) as f64,
                ratio_missed_by(
                    kiwi.usage.rss_kib as f64 / broker.usage.rss_kib.max(1) as f64,
                    2.0
                )
            ),
            target: "≤ 2× the broker".into(),
            met: Some(kiwi.usage.rss_kib <= 2 * broker.usage.rss_kib),
            note: "resident memory (`VmRSS`) at the end of the CPU window; the controller holds \
                   every robot's row (and its serialised JSON) in its read model besides the \
                   connections; kernel socket buffers are in neither figure"
                .into(),
        },
        Row {
            metric: format!("Controller memory per idle agent, {fleet} connected"),
            kiwi: format!(
                "{kiwi_per_connection:.1} KiB{}",
                missed_by(kiwi_per_connection, 16.0, " KiB")
            ),
            baseline: format!("Mosquitto: {broker_per_client:.1} KiB per client"),
            ratio: format!("{:.1}×", kiwi_per_connection / broker_per_client.max(0.1)),
            target: "≤ 16 KiB".into(),
            met: Some(kiwi_per_connection <= 16.0),
            note: format!(
                "the controller started again on the same store after the run (every robot \
                 loaded, no agent: {} KiB), then with the {fleet} agents connected again ({} \
                 KiB): the difference ÷ {fleet}; the broker's: (RSS with its clients − RSS \
                 with none) ÷ {fleet} ({} → {} KiB)",
                kiwi.loaded_rss_kib,
                kiwi.reconnected_rss_kib,
                broker.idle_rss_kib,
                broker.usage.rss_kib
            ),
        },
        Row {
            metric: "Controller memory per robot with its agent".into(),
            kiwi: format!("{kiwi_per_agent:.1} KiB"),
            baseline: format!("Mosquitto: {broker_per_client:.1} KiB per client"),
            ratio: format!("{:.1}×", kiwi_per_agent / broker_per_client.max(0.1)),
            target: "—".into(),
            met: None,
            note: format!(
                "(RSS with the {fleet} agents connected − RSS before the first arrived) ÷ \
                 {fleet}, on the controller whose robots these arrivals created: {} → {} KiB; \
                 besides the connections, each robot's row and its serialised JSON in the read \
                 model, its session and failure detector, and the events of the arrivals still \
                 in the watch hub's buffer",
                kiwi.idle_rss_kib, kiwi.usage.rss_kib
            ),
        },
        Row {
            metric: "Controller memory with no agents".into(),
            kiwi: format!("{} RSS", mib(kiwi.idle_rss_kib)),
            baseline: format!("Mosquitto, no clients: {}", mib(broker.idle_rss_kib)),
            ratio: format!(
                "{:.1}×",
                kiwi.idle_rss_kib as f64 / broker.idle_rss_kib.max(1) as f64
            ),
            target: "≤ 50 MB".into(),
            met: Some(kiwi.idle_rss_kib * 1024 <= 50_000_000),
            note: format!(
                "`kiwi-controller serve` on its embedded store (SQLite), its CA made, {} after \
                 `/readyz` answered 200",
                fmt_duration(SETTLE)
            ),
        },
        Row {
            metric: format!("Heartbeat → visible in the API, {fleet} agents connected"),
            kiwi: kiwi.heartbeat.show(),
            baseline: format!(
                "MQTT publish → subscriber, {fleet} clients: {}",
                delivered.show()
            ),
            ratio: ratio(kiwi.heartbeat.p50, delivered.p50, "p50"),
            target: "—".into(),
            met: None,
            note: "one more agent (a bare TLS WebSocket client of the benchmark) sends a \
                   `Heartbeat` at random moments 20–50 ms apart; from sending it to the first \
                   `GET /api/v2/robots/{id}` (polled back to back over loopback HTTP) whose \
                   `last_seen` is at or after it. The broker's figure: every status message the \
                   subscriber received in the window, from the client's publish (its timestamp in \
                   the message) to its arrival"
                .into(),
        },
        Row {
            metric: format!("List {fleet} robots under load, over loopback HTTP"),
            kiwi: kiwi.list.show(),
            baseline: "—".into(),
            ratio: "—".into(),
            target: "—".into(),
            met: None,
            note: format!(
                "`GET /api/v2/robots?limit={}` (a page of {fleet} of the {} robots: the probe's \
                 is one more) while the fleet heartbeats, body read whole by the client ({:.1} \
                 MiB); the server-side figure with its target is in the first table",
                n,
                fmt_count(n + 1),
                kiwi.list_bytes as f64 / (1024.0 * 1024.0)
            ),
        },
        Row {
            metric: format!("Change → {SSE_CLIENTS} watch clients, {fleet} agents connected"),
            kiwi: format!(
                "{}{}",
                kiwi.fan_out.show(),
                missed_by(kiwi.fan_out.p99.as_secs_f64() * 1e3, 50.0, " ms (p99)")
            ),
            baseline: "—".into(),
            ratio: "—".into(),
            target: "p99 ≤ 50 ms".into(),
            met: Some(kiwi.fan_out.p99 <= Duration::from_millis(50)),
            note: format!(
                "{SSE_CLIENTS} `/api/v2/watch` clients over loopback HTTP; {} changes of one \
                 robot (`maintenance/start` and `/end` alternately, each also a command to its \
                 agent), 50 ms apart; for every change and every client, from sending the POST \
                 to the event reaching that client",
                plan.changes
            ),
        },
    ];
    let description = format!(
        "One `kiwi-agent simulate` of {fleet} agents (TLS WebSocket, a client certificate each, \
         each from its own loopback address in {SOURCE_NETWORK}) against the release \
         `kiwi-controller` on its embedded store with auto-provisioning: they connected in {} \
         and every robot was `ready` (discovered, provisioned by command, answered) after {}. \
         The baseline is Mosquitto {} (a broker of the run's own, loopback, no persistence) with \
         {fleet} MQTT clients of the benchmark (rumqttc), each publishing a status message of \
         about 150 bytes every second at QoS 0, and one subscriber to all of them (connected in \
         {}). Both servers are processes of their own; the load generators share the machine \
         with them.",
        fmt_duration(kiwi.connect_took),
        fmt_duration(kiwi.ready_took),
        mosquitto_version(),
        fmt_duration(broker.connect_took),
    );
    Ok((rows, description))
}

/// `mosquitto -h`'s version line.
fn mosquitto_version() -> String {
    Command::new("/usr/sbin/mosquitto")
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .chain(String::from_utf8_lossy(&o.stderr).lines())
                .find_map(|l| l.strip_prefix("mosquitto version ").map(str::to_string))
        })
        .unwrap_or_else(|| "(version unknown)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_sent_time_back() {
        assert_eq!(
            sent_us(status_payload(7, 1_234_567).as_bytes()),
            Some(1_234_567)
        );
        assert_eq!(sent_us(b"{}"), None);
    }

    #[test]
    fn reads_metrics() {
        let text = "# HELP x\nagent_connections 12\nrobots{state=\"ready\"} 10000\nrobots{state=\"offline\"} 3\n";
        assert_eq!(metric(text, "agent_connections"), Some(12.0));
        assert_eq!(metric(text, "robots{state=\"ready\"}"), Some(10_000.0));
        assert_eq!(metric(text, "robots{state=\"failed\"}"), None);
    }

    #[test]
    fn says_by_how_much_a_target_is_missed() {
        assert_eq!(missed_by(24.0, 25.0, " points"), "");
        assert_eq!(
            missed_by(27.7, 25.0, " points"),
            "; 2.7 points over the target"
        );
        assert_eq!(ratio_missed_by(1.5, 2.0), "");
        assert_eq!(ratio_missed_by(4.72, 2.0), "; 2.4× the 2× allowed");
    }

    #[test]
    fn reads_this_process_cpu_time() {
        let pid = std::process::id();
        let before = cpu_time(pid).expect("cpu time");
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(cpu_time(pid).expect("cpu time") >= before);
    }
}
