//! The agent on the LAN: making the robot known, and finding the controller
//! when `controller = "auto"`.
//!
//! Announcing (`announce = true`, or `controller = "auto"`) is two things:
//! a DNS-SD service `_kiwi-agent._tcp.local.` whose TXT record carries the
//! robot's id, type, host name, agent version and protocol versions, and a
//! UDP beacon ([`kiwi_protocol::beacon`]) sent every `beacon_interval` to
//! the broadcast address of each IPv4 network the robot is on.
//!
//! Finding the controller: first the address remembered in the state
//! directory (file `controller`, written after each welcome), so that a
//! restart does not depend on multicast; then whatever LAN discovery heard
//! first, an mDNS resolution of `_kiwi-ctl._tcp.local.` or a controller's
//! answer to a beacon that asked for one (a beacon asks while the agent is
//! not connected). [`AutoConnector`] does this in front of any transport.
//!
//! Nothing here is started unless configured: built-in defaults never send
//! anything beyond the configured controller.

use crate::config::{AnnounceConfig, ControllerUrl, parse_controller};
use crate::state::write_atomic;
use crate::transport::{Connector, TransportError};
use kiwi_protocol::Identity;
use kiwi_protocol::beacon::{self, Answer, Beacon, ControllerTxt, Datagram};
use kiwi_protocol::version;
use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The file in the state directory that holds the last controller the
/// agent was welcomed by (`wss://host:port/path`).
pub const REMEMBERED_FILE: &str = "controller";

/// The longest host name announced: keeps the TXT record's `host=` entry
/// and the beacon within their limits.
const MAX_ANNOUNCED_HOSTNAME: usize = 200;

/// How the agent heard of a controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Remembered,
    Mdns,
    Beacon,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Remembered => "remembered",
            Via::Mdns => "mdns",
            Via::Beacon => "beacon",
        }
    }
}

/// A controller LAN discovery heard of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub url: ControllerUrl,
    pub via: Via,
    pub controller_id: Option<Uuid>,
}

/// Counters of the agent's LAN side, for logs and tests.
#[derive(Debug, Default)]
pub struct AnnounceStats {
    pub beacons_sent: AtomicU64,
    pub answers: AtomicU64,
    /// Datagrams received on the beacon socket that were not a usable
    /// answer (counted, then dropped).
    pub bad_datagrams: AtomicU64,
}

// ---------------------------------------------------------------------
// Pure parts.

/// The beacon this agent sends (its `seq` and `seeking` change per send),
/// with the fingerprint of the robot's key when it has one.
pub fn beacon_template(identity: &Identity, key_fingerprint: Option<String>) -> Beacon {
    let mut hostname = identity.hostname.clone();
    if hostname.len() > MAX_ANNOUNCED_HOSTNAME {
        let mut end = MAX_ANNOUNCED_HOSTNAME;
        while !hostname.is_char_boundary(end) {
            end -= 1;
        }
        hostname.truncate(end);
    }
    Beacon {
        robot_id: identity.robot_id,
        robot_type: identity.robot_type,
        hostname,
        agent_version: identity.agent_version.chars().take(64).collect(),
        protocol_versions: version::SUPPORTED.to_vec(),
        key_fingerprint,
        listen_port: None,
        seq: 0,
        seeking: false,
    }
}

/// One IPv4 address of a network interface, as far as broadcasting cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    pub name: String,
    pub up: bool,
    pub loopback: bool,
    /// The interface can broadcast (`IFF_BROADCAST`).
    pub broadcast_capable: bool,
    pub addr: Ipv4Addr,
    pub netmask: Option<Ipv4Addr>,
    /// The broadcast address the kernel reports, if any.
    pub broadcast: Option<Ipv4Addr>,
}

/// Where beacons go: the subnet broadcast address of every IPv4 network on
/// an interface that is up, not loopback, and can broadcast; never
/// 255.255.255.255 (which follows the default route, wherever it leads),
/// and nothing for /31 and /32 networks (no broadcast address).
pub fn broadcast_targets(addrs: &[IfAddr]) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = addrs
        .iter()
        .filter(|a| a.up && !a.loopback && a.broadcast_capable)
        .filter_map(|a| {
            let mask = u32::from(a.netmask?);
            if mask.leading_ones() > 30 || mask.count_ones() != mask.leading_ones() {
                return None;
            }
            let computed = Ipv4Addr::from(u32::from(a.addr) | !mask);
            // The kernel's answer wins when it is inside the network.
            Some(match a.broadcast {
                Some(b) if u32::from(b) & mask == u32::from(a.addr) & mask => b,
                _ => computed,
            })
        })
        .filter(|b| !b.is_broadcast() && !b.is_loopback() && !b.is_unspecified())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The IPv4 addresses of this host's interfaces (in the caller's network
/// namespace).
pub fn interface_addrs() -> Vec<IfAddr> {
    use nix::net::if_::InterfaceFlags;
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let v4 = |s: Option<nix::sys::socket::SockaddrStorage>| {
        s.and_then(|s| s.as_sockaddr_in().map(|a| a.ip()))
    };
    addrs
        .filter_map(|a| {
            let addr = v4(a.address)?;
            Some(IfAddr {
                up: a.flags.contains(InterfaceFlags::IFF_UP),
                loopback: a.flags.contains(InterfaceFlags::IFF_LOOPBACK),
                broadcast_capable: a.flags.contains(InterfaceFlags::IFF_BROADCAST),
                netmask: v4(a.netmask),
                broadcast: v4(a.broadcast),
                addr,
                name: a.interface_name,
            })
        })
        .collect()
}

/// A controller from its answer to a beacon. An endpoint on an unspecified
/// address (`0.0.0.0`) means the address the answer came from.
pub fn found_from_answer(answer: &Answer, source: SocketAddr) -> Result<Found, String> {
    let mut url = parse_controller(&answer.agent_endpoint)?;
    if url
        .host
        .parse::<IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified())
    {
        url.host = host_text(source.ip());
    }
    Ok(Found {
        url,
        via: Via::Beacon,
        controller_id: Some(answer.controller_id),
    })
}

/// A controller from an mDNS resolution of `_kiwi-ctl._tcp`: its
/// addresses (an IPv4 one not on loopback preferred), port and TXT record.
pub fn found_from_service(
    addresses: &[IpAddr],
    port: u16,
    txt: impl Fn(&str) -> Option<String>,
) -> Result<Found, String> {
    let record = ControllerTxt::from_txt(txt)?;
    if port == 0 {
        return Err("the controller's service has port 0".into());
    }
    let mut sorted = addresses.to_vec();
    sorted.sort_by_key(|ip| (!ip.is_ipv4(), ip.is_loopback(), *ip));
    let ip = sorted
        .first()
        .ok_or("the controller's service has no address")?;
    let url = parse_controller(&format!("wss://{}:{port}{}", host_text(*ip), record.path))?;
    Ok(Found {
        url,
        via: Via::Mdns,
        controller_id: Some(record.controller_id),
    })
}

fn host_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// The controller remembered in `state_dir`, if the file holds a valid
/// address (a damaged file is ignored, with a warning).
/// The controller to enroll with when `controller = "auto"`: the next one
/// found on the LAN (a remembered one is not used: the robot has never
/// been welcomed with its current credentials); `None` once `shutdown` is
/// cancelled.
pub async fn first_controller(
    mut finds: watch::Receiver<Option<Found>>,
    shutdown: &CancellationToken,
) -> Option<ControllerUrl> {
    tracing::info!("looking for a controller on the LAN to enroll with");
    loop {
        if let Some(found) = finds.borrow_and_update().as_ref() {
            return Some(found.url.clone());
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            changed = finds.changed() => if changed.is_err() {
                // Nothing will ever be found (announcing is off).
                shutdown.cancelled().await;
                return None;
            },
        }
    }
}

pub fn read_remembered(state_dir: &Path) -> Option<ControllerUrl> {
    let path = state_dir.join(REMEMBERED_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the remembered controller");
            return None;
        }
    };
    match parse_controller(text.trim()) {
        Ok(url) => Some(url),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring the remembered controller");
            None
        }
    }
}

/// Remembers `url` in `state_dir` (crash-safe). Blocking.
pub fn remember(state_dir: &Path, url: &ControllerUrl) -> io::Result<()> {
    write_atomic(
        &state_dir.join(REMEMBERED_FILE),
        format!("{url}\n").as_bytes(),
    )
}

// ---------------------------------------------------------------------
// The beacon.

/// Where and how often beacons go.
pub struct BeaconOptions {
    pub interval: Duration,
    /// The addresses to send each beacon to, asked again before every
    /// send (interfaces come and go). [`subnet_broadcasts`] in production.
    pub targets: Box<dyn Fn() -> Vec<SocketAddr> + Send>,
}

impl std::fmt::Debug for BeaconOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BeaconOptions")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

/// The subnet broadcast addresses of this host's networks, at `port`.
pub fn subnet_broadcasts(port: u16) -> impl Fn() -> Vec<SocketAddr> + Send {
    move || {
        broadcast_targets(&interface_addrs())
            .into_iter()
            .map(|ip| SocketAddr::V4(SocketAddrV4::new(ip, port)))
            .collect()
    }
}

/// Sends beacons from `socket` until `shutdown`: one at once, then every
/// interval, and one at once whenever the agent starts seeking (`seeking`
/// turns true). Answers to them are published on `found` (when given:
/// only an agent with `controller = "auto"` listens); anything else
/// received is counted and dropped.
pub async fn run_beacon(
    socket: UdpSocket,
    template: Beacon,
    opts: BeaconOptions,
    mut seeking: watch::Receiver<bool>,
    found: Option<watch::Sender<Option<Found>>>,
    stats: Arc<AnnounceStats>,
    shutdown: CancellationToken,
) {
    let mut beacon = template;
    let mut tick = tokio::time::interval(opts.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut buf = vec![0u8; beacon::MAX_DATAGRAM + 1];
    let mut seeking_open = true;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            changed = seeking.changed(), if seeking_open => {
                if changed.is_err() {
                    seeking_open = false;
                    continue;
                }
                if !*seeking.borrow_and_update() {
                    continue;
                }
                tick.reset();
            }
            r = socket.recv_from(&mut buf) => {
                match r {
                    Ok((len, source)) => take_answer(&buf[..len], source, found.as_ref(), &stats),
                    Err(e) => {
                        tracing::debug!(error = %e, "beacon socket receive failed");
                        // An ICMP error from an earlier send can surface
                        // here; do not spin on a persistent one.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                continue;
            }
        }
        beacon.seq = beacon.seq.wrapping_add(1);
        beacon.seeking = *seeking.borrow();
        let bytes = match beacon::encode(&Datagram::Beacon(beacon.clone())) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode the beacon; beacons stopped");
                return;
            }
        };
        let targets = (opts.targets)();
        if targets.is_empty() {
            tracing::debug!("no IPv4 network with a broadcast address: beacon not sent");
        }
        for target in targets {
            match socket.send_to(&bytes, target).await {
                Ok(_) => {
                    stats.beacons_sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!(%target, error = %e, "cannot send the beacon"),
            }
        }
    }
}

fn take_answer(
    bytes: &[u8],
    source: SocketAddr,
    found: Option<&watch::Sender<Option<Found>>>,
    stats: &AnnounceStats,
) {
    let bad = |why: String| {
        stats.bad_datagrams.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%source, reason = %why, "dropped a datagram on the beacon socket");
    };
    let answer = match beacon::decode(bytes) {
        Ok(Datagram::Answer(a)) => a,
        Ok(other) => return bad(format!("unexpected {}", other.kind())),
        Err(e) => return bad(e.to_string()),
    };
    stats.answers.fetch_add(1, Ordering::Relaxed);
    let Some(found) = found else { return };
    match found_from_answer(&answer, source) {
        Ok(f) => publish(found, f),
        Err(e) => bad(format!("unusable answer: {e}")),
    }
}

/// Publishes a find unless it only repeats the current one.
fn publish(found: &watch::Sender<Option<Found>>, f: Found) {
    found.send_if_modified(|current| {
        if current.as_ref() == Some(&f) {
            return false;
        }
        tracing::info!(
            controller = %f.url.endpoint(),
            via = f.via.as_str(),
            controller_id = ?f.controller_id,
            "heard of a controller"
        );
        *current = Some(f);
        true
    });
}

// ---------------------------------------------------------------------
// mDNS.

/// The agent's `_kiwi-agent._tcp` service: instance name the robot id, host
/// name `kiwi-<robot id>.local.` (both unique per robot, so probing for
/// conflicts is skipped: it would only delay the announcement by ~1 s),
/// the addresses of the interfaces it answers on, and port 0 while the
/// agent listens on nothing.
pub fn agent_service(template: &Beacon) -> Result<ServiceInfo, mdns_sd::Error> {
    let host = format!("kiwi-{}.local.", template.robot_id.0.simple());
    let mut info = ServiceInfo::new(
        beacon::AGENT_SERVICE,
        &template.robot_id.to_string(),
        &host,
        (),
        template.listen_port.unwrap_or(0),
        beacon::agent_txt(template).as_slice(),
    )?
    .enable_addr_auto();
    info.set_requires_probe(false);
    Ok(info)
}

/// Runs the mDNS side until `shutdown`: registers the agent's service and,
/// when `found` is given, browses `_kiwi-ctl._tcp` and publishes every
/// controller it resolves. The responder runs on its own thread (started
/// here, in the caller's network namespace); it is shut down at the end,
/// which withdraws the service.
pub async fn run_mdns(
    template: Beacon,
    found: Option<watch::Sender<Option<Found>>>,
    shutdown: CancellationToken,
) {
    let daemon = match ServiceDaemon::new() {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start mDNS; announcing by beacon only");
            return;
        }
    };
    // Beacons are IPv4 too; IPv6 adds only chatter on a robot LAN.
    let _ = daemon.disable_interface(IfKind::IPv6);
    match agent_service(&template).and_then(|info| daemon.register(info)) {
        Ok(()) => tracing::info!(
            service = beacon::AGENT_SERVICE,
            "registered the mDNS service"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot register the mDNS service"),
    }
    if let Some(found) = found {
        match daemon.browse(beacon::CONTROLLER_SERVICE) {
            Ok(events) => loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    event = events.recv_async() => match event {
                        Ok(ServiceEvent::ServiceResolved(service)) => {
                            let addresses: Vec<IpAddr> =
                                service.addresses.iter().map(|a| a.to_ip_addr()).collect();
                            let txt = |key: &str| {
                                service.get_property_val_str(key).map(str::to_string)
                            };
                            match found_from_service(&addresses, service.port, txt) {
                                Ok(f) => publish(&found, f),
                                Err(e) => tracing::debug!(
                                    service = %service.fullname, reason = %e,
                                    "ignoring a controller service"
                                ),
                            }
                        }
                        Ok(_) => {}
                        Err(_) => {
                            tracing::warn!("the mDNS browse ended");
                            shutdown.cancelled().await;
                            break;
                        }
                    }
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot browse for the controller over mDNS");
                shutdown.cancelled().await;
            }
        }
    } else {
        shutdown.cancelled().await;
    }
    // Withdraws the service (goodbye packets) and stops the thread.
    if let Ok(done) = daemon.shutdown() {
        let _ = tokio::time::timeout(Duration::from_secs(1), done.recv_async()).await;
    }
}

// ---------------------------------------------------------------------
// Wiring.

/// The LAN side of a running agent.
#[derive(Debug)]
pub struct Lan {
    pub stats: Arc<AnnounceStats>,
    finds: watch::Receiver<Option<Found>>,
    tasks: JoinSet<()>,
}

impl Lan {
    /// What discovery heard of (always `None` unless `controller = "auto"`).
    pub fn finds(&self) -> watch::Receiver<Option<Found>> {
        self.finds.clone()
    }

    /// Waits for the tasks to end (after `shutdown` was cancelled).
    pub async fn stopped(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Starts announcing as `announce` says (nothing when it is off) and, when
/// `seek` (`controller = "auto"`), listening for controllers. `connected`
/// is the link's state: beacons ask for a controller while it is false.
pub async fn start(
    announce: &AnnounceConfig,
    identity: &Identity,
    key_fingerprint: Option<String>,
    seek: bool,
    connected: watch::Receiver<bool>,
    shutdown: CancellationToken,
) -> Lan {
    let (found_tx, finds) = watch::channel(None);
    let stats = Arc::new(AnnounceStats::default());
    let mut tasks = JoinSet::new();
    if announce.enabled {
        let template = beacon_template(identity, key_fingerprint);
        let found = seek.then(|| found_tx.clone());
        tasks.spawn(run_mdns(template.clone(), found.clone(), shutdown.clone()));
        match beacon_socket().await {
            Ok(socket) => {
                let seeking = seeking_signal(seek, connected, shutdown.clone(), &mut tasks);
                tasks.spawn(run_beacon(
                    socket,
                    template,
                    BeaconOptions {
                        interval: announce.beacon_interval,
                        targets: Box::new(subnet_broadcasts(announce.beacon_port)),
                    },
                    seeking,
                    found,
                    stats.clone(),
                    shutdown,
                ));
            }
            Err(e) => tracing::warn!(error = %e, "cannot open the beacon socket; no beacons"),
        }
        tracing::info!(
            beacon_interval_ms = announce.beacon_interval.as_millis() as u64,
            beacon_port = announce.beacon_port,
            seeking = seek,
            "announcing on the LAN"
        );
    }
    Lan {
        stats,
        finds,
        tasks,
    }
}

/// A socket for beacons: any address, an ephemeral port (answers come back
/// to it), broadcast allowed.
pub async fn beacon_socket() -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    socket.set_broadcast(true)?;
    Ok(socket)
}

/// `true` while the agent looks for a controller: with `seek`, whenever
/// the link is not connected; never otherwise.
fn seeking_signal(
    seek: bool,
    mut connected: watch::Receiver<bool>,
    shutdown: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(seek && !*connected.borrow());
    if seek {
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    r = connected.changed() => {
                        if r.is_err() {
                            return;
                        }
                        let seeking = !*connected.borrow_and_update();
                        tx.send_if_modified(|s| std::mem::replace(s, seeking) != seeking);
                    }
                }
            }
        });
    }
    rx
}

// ---------------------------------------------------------------------
// Connecting with `controller = "auto"`.

/// A [`Connector`] for `controller = "auto"`: tries the remembered
/// controller, then the newest one LAN discovery heard of (waiting up to
/// `find_timeout` for one), and connects through the transport `make`
/// builds for that endpoint.
pub struct AutoConnector<C> {
    state_dir: PathBuf,
    finds: watch::Receiver<Option<Found>>,
    make: Box<dyn Fn(&ControllerUrl) -> C + Send + Sync>,
    /// Tried first; cleared when it does not answer, set again after a
    /// welcome.
    remembered: Mutex<Option<ControllerUrl>>,
    /// The controller of the last connection made.
    current: Mutex<Option<ControllerUrl>>,
    pub find_timeout: Duration,
    /// How long the remembered controller may take to accept before
    /// discovery is asked instead (shorter than the transport's connect
    /// timeout: on a LAN a live controller accepts in milliseconds, and a
    /// vanished host would otherwise hold discovery back for seconds).
    pub remembered_timeout: Duration,
}

impl<C> std::fmt::Debug for AutoConnector<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutoConnector")
            .field("state_dir", &self.state_dir)
            .field("remembered", &self.remembered)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<C: Connector> AutoConnector<C> {
    /// Reads the remembered controller from `state_dir` (blocking, one
    /// small file).
    pub fn new(
        state_dir: &Path,
        finds: watch::Receiver<Option<Found>>,
        make: impl Fn(&ControllerUrl) -> C + Send + Sync + 'static,
    ) -> Self {
        let remembered = read_remembered(state_dir);
        if let Some(url) = &remembered {
            tracing::info!(controller = %url.endpoint(), "remembered controller");
        }
        Self {
            state_dir: state_dir.to_path_buf(),
            finds,
            make: Box::new(make),
            remembered: Mutex::new(remembered),
            current: Mutex::new(None),
            find_timeout: Duration::from_secs(5),
            remembered_timeout: Duration::from_secs(2),
        }
    }

    /// The controller of the last connection made.
    pub fn current(&self) -> Option<ControllerUrl> {
        lock(&self.current).clone()
    }

    /// Called once the controller welcomed the agent: remembers it (in
    /// memory and in the state directory, when it changed).
    pub async fn welcomed(&self) {
        let Some(url) = self.current() else { return };
        let changed = {
            let mut remembered = lock(&self.remembered);
            let changed = remembered.as_ref() != Some(&url);
            *remembered = Some(url.clone());
            changed
        };
        if changed || read_remembered_async(&self.state_dir).await.as_ref() != Some(&url) {
            let dir = self.state_dir.clone();
            let saved = url.clone();
            match tokio::task::spawn_blocking(move || remember(&dir, &saved)).await {
                Ok(Ok(())) => {
                    tracing::info!(controller = %url.endpoint(), "remembered the controller");
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot remember the controller"),
                Err(e) => tracing::warn!(error = %e, "cannot remember the controller"),
            }
        }
    }

    /// The newest find, waiting up to `find_timeout` for a first one.
    async fn next_find(&self) -> Option<Found> {
        let mut finds = self.finds.clone();
        let wait = async {
            loop {
                if let Some(f) = finds.borrow_and_update().clone() {
                    return Some(f);
                }
                if finds.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(self.find_timeout, wait)
            .await
            .ok()
            .flatten()
    }

    async fn connect_to(&self, url: &ControllerUrl) -> Result<C::Conn, TransportError> {
        let conn = (self.make)(url).connect().await?;
        *lock(&self.current) = Some(url.clone());
        Ok(conn)
    }
}

async fn read_remembered_async(dir: &Path) -> Option<ControllerUrl> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || read_remembered(&dir))
        .await
        .ok()
        .flatten()
}

impl<C: Connector> Connector for AutoConnector<C> {
    type Conn = C::Conn;

    async fn connect(&self) -> Result<C::Conn, TransportError> {
        let remembered = lock(&self.remembered).clone();
        let mut failed = None;
        if let Some(url) = remembered {
            let attempt = tokio::time::timeout(self.remembered_timeout, self.connect_to(&url));
            let result = attempt.await.unwrap_or_else(|_| {
                Err(TransportError::ConnectTimeout {
                    endpoint: url.endpoint(),
                })
            });
            match result {
                Ok(conn) => return Ok(conn),
                Err(e) => {
                    tracing::info!(
                        controller = %url.endpoint(), error = %e,
                        "the remembered controller does not answer; discovering"
                    );
                    *lock(&self.remembered) = None;
                    failed = Some((url, e));
                }
            }
        }
        let Some(found) = self.next_find().await else {
            return Err(failed
                .map(|(_, e)| e)
                .unwrap_or_else(|| TransportError::Connect {
                    endpoint: "auto".into(),
                    error: format!(
                        "no controller found on the LAN (mDNS, beacon) within {:?}",
                        self.find_timeout
                    )
                    .into(),
                }));
        };
        // Do not knock twice on the same closed door in one attempt.
        if let Some((url, e)) = failed
            && url == found.url
        {
            return Err(e);
        }
        tracing::info!(
            controller = %found.url.endpoint(),
            via = found.via.as_str(),
            "connecting to a discovered controller"
        );
        self.connect_to(&found.url).await
    }

    fn describe(&self) -> String {
        self.current()
            .map_or_else(|| "auto".to_string(), |u| u.endpoint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{Close, Connection, Incoming};
    use kiwi_protocol::{HardwareId, RobotId, RobotType};

    fn identity() -> Identity {
        let hardware_id = HardwareId::Configured("announce-test".into());
        Identity {
            robot_id: RobotId::from_hardware(&hardware_id),
            hardware_id,
            hostname: "lk-7".into(),
            robot_type: RobotType::Lekiwi,
            model: None,
            os_version: None,
            agent_version: "0.1.0".into(),
            mac_addresses: Vec::new(),
            ip_addresses: Vec::new(),
        }
    }

    fn ifaddr(name: &str, addr: [u8; 4], prefix: u32, bcast: Option<[u8; 4]>) -> IfAddr {
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        IfAddr {
            name: name.into(),
            up: true,
            loopback: false,
            broadcast_capable: true,
            addr: addr.into(),
            netmask: Some(mask.into()),
            broadcast: bcast.map(Into::into),
        }
    }

    #[test]
    fn beacons_go_to_subnet_broadcasts_only() {
        let lo = IfAddr {
            loopback: true,
            ..ifaddr("lo", [127, 0, 0, 1], 8, None)
        };
        let down = IfAddr {
            up: false,
            ..ifaddr("eth1", [10, 1, 0, 5], 24, None)
        };
        let ptp = IfAddr {
            broadcast_capable: false,
            ..ifaddr("wg0", [10, 2, 0, 1], 24, None)
        };
        let addrs = vec![
            lo,
            down,
            ptp,
            ifaddr("eth0", [10, 88, 0, 2], 24, Some([10, 88, 0, 255])),
            // No broadcast reported: computed from the mask.
            ifaddr("wlan0", [192, 168, 7, 9], 22, None),
            // A broadcast outside the network is not believed.
            ifaddr("eth2", [172, 20, 0, 9], 16, Some([10, 0, 0, 255])),
            // No broadcast on /31, /32 or /0.
            ifaddr("p2p", [10, 3, 0, 0], 31, None),
            ifaddr("host", [10, 4, 0, 1], 32, None),
            ifaddr("zero", [10, 5, 0, 1], 0, None),
            // The same network twice is one target.
            ifaddr("eth0", [10, 88, 0, 3], 24, Some([10, 88, 0, 255])),
        ];
        assert_eq!(
            broadcast_targets(&addrs),
            vec![
                Ipv4Addr::new(10, 88, 0, 255),
                Ipv4Addr::new(172, 20, 255, 255),
                Ipv4Addr::new(192, 168, 7, 255),
            ]
        );
        let no_mask = IfAddr {
            netmask: None,
            ..ifaddr("x", [10, 9, 0, 1], 24, None)
        };
        assert!(broadcast_targets(&[no_mask]).is_empty());
    }

    #[test]
    fn answers_and_services_become_controllers() {
        let id = Uuid::from_u128(7);
        let answer = Answer {
            controller_id: id,
            agent_endpoint: "wss://10.88.0.1:8765/agent".into(),
            seq: 3,
        };
        let from: SocketAddr = "10.88.0.1:8766".parse().unwrap();
        let f = found_from_answer(&answer, from).unwrap();
        assert_eq!(f.url.endpoint(), "wss://10.88.0.1:8765/agent");
        assert_eq!((f.via, f.controller_id), (Via::Beacon, Some(id)));
        let unspecified = Answer {
            agent_endpoint: "wss://0.0.0.0:9000".into(),
            ..answer.clone()
        };
        assert_eq!(
            found_from_answer(&unspecified, from)
                .unwrap()
                .url
                .endpoint(),
            "wss://10.88.0.1:9000/agent"
        );
        for bad in ["auto", "http://x:1", "wss://h:0"] {
            let a = Answer {
                agent_endpoint: bad.into(),
                ..answer.clone()
            };
            assert!(found_from_answer(&a, from).is_err(), "{bad}");
        }

        let txt = ControllerTxt {
            controller_id: id,
            path: "/agent".into(),
            protocol_versions: version::SUPPORTED.to_vec(),
        }
        .to_txt();
        let get = |k: &str| txt.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let addrs: Vec<IpAddr> = vec![
            "fe80::1".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
            "10.88.0.1".parse().unwrap(),
        ];
        let f = found_from_service(&addrs, 8765, get).unwrap();
        assert_eq!(f.url.endpoint(), "wss://10.88.0.1:8765/agent");
        assert_eq!(f.via, Via::Mdns);
        assert!(found_from_service(&[], 8765, get).is_err());
        assert!(found_from_service(&addrs, 0, get).is_err());
        assert!(found_from_service(&addrs, 1, |_| None).is_err());
        let v6: Vec<IpAddr> = vec!["fe80::1".parse().unwrap()];
        assert_eq!(
            found_from_service(&v6, 8765, get).unwrap().url.endpoint(),
            "wss://[fe80::1]:8765/agent"
        );
    }

    #[test]
    fn the_announcement_fits_its_limits() {
        let mut id = identity();
        id.hostname = "é".repeat(300);
        let b = beacon_template(&id, None);
        assert!(b.hostname.len() <= MAX_ANNOUNCED_HOSTNAME);
        beacon::encode(&Datagram::Beacon(b.clone())).unwrap();
        // Building the service info checks the TXT limits (and binds nothing).
        let info = agent_service(&b).unwrap();
        assert_eq!(info.get_type(), beacon::AGENT_SERVICE);
        assert_eq!(
            info.get_property_val_str("id"),
            Some(id.robot_id.to_string().as_str())
        );
    }

    #[test]
    fn the_remembered_controller_survives_and_garbage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_remembered(dir.path()), None);
        let url = parse_controller("wss://10.88.0.1:8765/agent").unwrap();
        remember(dir.path(), &url).unwrap();
        assert_eq!(read_remembered(dir.path()), Some(url));
        std::fs::write(dir.path().join(REMEMBERED_FILE), "not a url").unwrap();
        assert_eq!(read_remembered(dir.path()), None);
    }

    /// Beacons and answers over loopback only: a stand-in controller
    /// socket on 127.0.0.1 is the only target.
    #[tokio::test]
    async fn beacons_are_sent_and_answers_heard() {
        let controller = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = controller.local_addr().unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (seeking_tx, seeking) = watch::channel(true);
        let (found_tx, mut finds) = watch::channel(None);
        let stats = Arc::new(AnnounceStats::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_beacon(
            socket,
            beacon_template(&identity(), Some("sha256:ab".into())),
            BeaconOptions {
                interval: Duration::from_secs(3600),
                targets: Box::new(move || vec![target]),
            },
            seeking,
            Some(found_tx),
            stats.clone(),
            shutdown.clone(),
        ));
        let mut buf = [0u8; 2048];
        let (len, agent) = controller.recv_from(&mut buf).await.unwrap();
        let Datagram::Beacon(b) = beacon::decode(&buf[..len]).unwrap() else {
            panic!("not a beacon");
        };
        assert_eq!((b.seq, b.seeking), (1, true));
        assert_eq!(b.robot_id, identity().robot_id);
        assert_eq!(b.hostname, "lk-7");

        // Garbage and a beacon are counted and dropped; an answer is heard.
        controller.send_to(b"junk", agent).await.unwrap();
        controller.send_to(&buf[..len], agent).await.unwrap();
        let answer = Datagram::Answer(Answer {
            controller_id: Uuid::from_u128(9),
            agent_endpoint: "wss://127.0.0.1:8765".into(),
            seq: b.seq,
        });
        controller
            .send_to(&beacon::encode(&answer).unwrap(), agent)
            .await
            .unwrap();
        let f = tokio::time::timeout(Duration::from_secs(5), finds.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap()
            .clone()
            .unwrap();
        assert_eq!(f.url.endpoint(), "wss://127.0.0.1:8765/agent");
        assert_eq!(stats.bad_datagrams.load(Ordering::Relaxed), 2);

        // Connected: the next beacon (at once when seeking again) asks
        // for nothing; seeking again sends one at once.
        seeking_tx.send_replace(false);
        seeking_tx.send_replace(true);
        let (len, _) = controller.recv_from(&mut buf).await.unwrap();
        let Datagram::Beacon(b) = beacon::decode(&buf[..len]).unwrap() else {
            panic!("not a beacon");
        };
        assert_eq!(b.seq, 2);
        shutdown.cancel();
        task.await.unwrap();
    }

    /// One test's network: the endpoints it declares up, and every endpoint
    /// its connectors tried, in order. Each test has its own, so tests
    /// running at the same time cannot see each other's attempts.
    #[derive(Default)]
    struct FakeNet {
        up: Mutex<Vec<String>>,
        tried: Mutex<Vec<String>>,
    }

    impl FakeNet {
        /// What an [`AutoConnector`] makes its transports with: connectors
        /// on this network.
        fn connectors(
            self: &Arc<Self>,
        ) -> impl Fn(&ControllerUrl) -> FakeConnector + Send + Sync + 'static {
            let net = Arc::clone(self);
            move |url: &ControllerUrl| FakeConnector {
                endpoint: url.endpoint(),
                net: Arc::clone(&net),
            }
        }
    }

    /// A transport that connects only to the endpoints its network lists as
    /// up, recording every attempt there.
    struct FakeConnector {
        endpoint: String,
        net: Arc<FakeNet>,
    }

    struct FakeConnection;

    impl Connection for FakeConnection {
        async fn send(&mut self, _frame: Vec<u8>) -> Result<(), TransportError> {
            Ok(())
        }
        async fn recv(&mut self) -> Result<Incoming, TransportError> {
            Ok(Incoming::Closed(None))
        }
        async fn keepalive(&mut self) -> Result<(), TransportError> {
            Ok(())
        }
        async fn close(&mut self, _why: Close<'_>) {}
    }

    impl Connector for FakeConnector {
        type Conn = FakeConnection;
        async fn connect(&self) -> Result<FakeConnection, TransportError> {
            lock(&self.net.tried).push(self.endpoint.clone());
            if lock(&self.net.up).contains(&self.endpoint) {
                Ok(FakeConnection)
            } else {
                Err(TransportError::Connect {
                    endpoint: self.endpoint.clone(),
                    error: "refused".into(),
                })
            }
        }
        fn describe(&self) -> String {
            self.endpoint.clone()
        }
    }

    #[tokio::test]
    async fn auto_tries_the_remembered_controller_then_discovery() {
        let dir = tempfile::tempdir().unwrap();
        let old = parse_controller("wss://10.0.0.1:1").unwrap();
        let new = parse_controller("wss://10.0.0.2:2").unwrap();
        remember(dir.path(), &old).unwrap();
        let net = Arc::new(FakeNet::default());
        let (found_tx, finds) = watch::channel(None);
        let mut auto = AutoConnector::new(dir.path(), finds, net.connectors());
        auto.find_timeout = Duration::from_millis(50);
        *lock(&net.up) = vec![old.endpoint()];

        // The remembered controller answers: no discovery needed.
        auto.connect().await.unwrap();
        assert_eq!(auto.describe(), old.endpoint());
        auto.welcomed().await;

        // It moved: the remembered address fails, nothing found yet.
        *lock(&net.up) = vec![new.endpoint()];
        lock(&net.tried).clear();
        assert!(auto.connect().await.is_err());
        assert_eq!(*lock(&net.tried), vec![old.endpoint()]);

        // Discovery finds the new one: connected, then remembered.
        found_tx.send_replace(Some(Found {
            url: new.clone(),
            via: Via::Mdns,
            controller_id: None,
        }));
        lock(&net.tried).clear();
        auto.connect().await.unwrap();
        assert_eq!(*lock(&net.tried), vec![new.endpoint()]);
        auto.welcomed().await;
        assert_eq!(read_remembered(dir.path()), Some(new.clone()));

        // A restart starts from the remembered address.
        let (_tx, finds) = watch::channel(None);
        let again = AutoConnector::new(dir.path(), finds, net.connectors());
        lock(&net.tried).clear();
        again.connect().await.unwrap();
        assert_eq!(*lock(&net.tried), vec![new.endpoint()]);
    }
}
