//! Passive discovery of agents that announce themselves on the LAN, and the
//! controller's own announcement.
//!
//! - mDNS: the controller registers `_kiwi-ctl._tcp.local.` (SRV: the agent
//!   endpoint's port; TXT: its id and the endpoint's path), so that agents
//!   with `controller = "auto"` find it, and browses `_kiwi-agent._tcp.local.`,
//!   whose TXT records say which robot is where.
//! - The UDP beacon ([`kiwi_protocol::beacon`]): it listens on the beacon
//!   port, records every beacon's robot and source address, and answers a
//!   beacon that looks for a controller, by unicast to its source, with the
//!   agent endpoint. Bad datagrams are counted and dropped; answers are
//!   throttled per source so that forged beacons cannot turn the controller
//!   into a traffic source.
//!
//! What is heard lands in [`Sightings`] (newest per robot and method,
//! bounded), which a discovery round reads through [`AnnouncedAgents`] and
//! which anyone can follow live with [`Sightings::subscribe`]. Nothing here
//! starts unless [`AnnounceSettings`] switches it on.

use super::{DiscoverySource, Sighting, SightingMethod};
use crate::metrics::AnnounceStats;
use chrono::{DateTime, Utc};
use kiwi_protocol::beacon::{self, Answer, Beacon, ControllerTxt, Datagram};
use kiwi_protocol::version::{self, ProtocolVersion};
use kiwi_protocol::{RobotId, RobotType};
use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long a sighting counts in discovery rounds by default: a robot that
/// beacons every 5 s has missed about a dozen.
pub const DEFAULT_SIGHTING_TTL: Duration = Duration::from_secs(60);

/// Most sightings kept; beyond, the oldest one makes room.
pub const MAX_SIGHTINGS: usize = 16_384;

/// At most one answer per beacon source in this time.
pub const ANSWER_EVERY: Duration = Duration::from_millis(500);

/// Sources remembered for answer throttling, at most.
const MAX_THROTTLED: usize = 8_192;

/// What the controller does on the LAN. [`AnnounceSettings::new`] switches
/// everything off; the configuration switches parts on.
#[derive(Debug, Clone)]
pub struct AnnounceSettings {
    /// Register `_kiwi-ctl._tcp` and browse `_kiwi-agent._tcp`.
    pub mdns: bool,
    /// Listen for beacons and answer those that look for a controller.
    pub beacon: bool,
    /// Where beacons are received (`0.0.0.0:8766`).
    pub beacon_listen: SocketAddr,
    /// The agent endpoint as bound. An unspecified address (`0.0.0.0`) is
    /// announced as the controller's address on the network the agent
    /// is on.
    pub agent_endpoint: SocketAddr,
    /// The agent endpoint's path.
    pub agent_path: String,
    /// This controller's id in answers and its mDNS record (unique per
    /// process).
    pub controller_id: Uuid,
}

impl AnnounceSettings {
    /// Everything off, for the agent endpoint bound at `agent_endpoint`.
    pub fn new(agent_endpoint: SocketAddr) -> Self {
        Self {
            mdns: false,
            beacon: false,
            beacon_listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, beacon::BEACON_PORT)),
            agent_endpoint,
            agent_path: "/agent".into(),
            controller_id: Uuid::new_v4(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.mdns || self.beacon
    }

    /// The agent endpoint as told to an agent at `peer`: the configured
    /// address, or when that is unspecified the local address the kernel
    /// would use to reach `peer` (found without sending anything).
    pub fn endpoint_for(&self, peer: IpAddr) -> String {
        let mut ip = self.agent_endpoint.ip();
        if ip.is_unspecified()
            && let Some(local) = local_address_towards(peer)
        {
            ip = local;
        }
        let host = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        format!(
            "wss://{host}:{}{}",
            self.agent_endpoint.port(),
            self.agent_path
        )
    }
}

/// The source address the kernel picks to reach `peer`: `connect` on a UDP
/// socket only looks up the route.
fn local_address_towards(peer: IpAddr) -> Option<IpAddr> {
    let any: SocketAddr = match peer {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect((peer, 9)).ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

/// How an agent was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Mdns,
    Beacon,
}

impl Method {
    /// How discovery results name it.
    pub fn sighting(self) -> SightingMethod {
        match self {
            Method::Mdns => SightingMethod::Mdns,
            Method::Beacon => SightingMethod::Beacon,
        }
    }

    /// Its name in discovery results, logs and metrics.
    pub fn as_str(self) -> &'static str {
        self.sighting().as_str()
    }
}

/// An announcing agent, as last heard by one method. Everything but `ip`,
/// `method` and the times is the agent's claim.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSighting {
    pub robot_id: RobotId,
    /// The beacon's source address, or the address the mDNS record names.
    pub ip: IpAddr,
    pub method: Method,
    pub seen_at: DateTime<Utc>,
    pub robot_type: RobotType,
    pub hostname: String,
    pub agent_version: String,
    pub protocol_versions: Vec<ProtocolVersion>,
    pub key_fingerprint: Option<String>,
    /// The agent was looking for a controller (beacons only).
    pub seeking: bool,
}

impl AgentSighting {
    fn from_beacon(b: Beacon, ip: IpAddr, method: Method) -> Self {
        Self {
            robot_id: b.robot_id,
            ip,
            method,
            seen_at: Utc::now(),
            robot_type: b.robot_type,
            hostname: b.hostname,
            agent_version: b.agent_version,
            protocol_versions: b.protocol_versions,
            key_fingerprint: b.key_fingerprint,
            seeking: b.seeking,
        }
    }
}

/// Each robot's newest sighting by each method, with when it was recorded.
type SightingMap = HashMap<(RobotId, Method), (Instant, AgentSighting)>;

/// The announcing agents heard of: the newest sighting per robot and
/// method, at most [`MAX_SIGHTINGS`]. A cheap handle; clones share.
#[derive(Debug, Clone)]
pub struct Sightings {
    map: Arc<Mutex<SightingMap>>,
    events: broadcast::Sender<AgentSighting>,
    stats: AnnounceStats,
}

impl Default for Sightings {
    fn default() -> Self {
        Self::new()
    }
}

impl Sightings {
    pub fn new() -> Self {
        Self::with_stats(AnnounceStats::default())
    }

    /// Counting into `stats` (e.g. the counters the metrics export).
    pub fn with_stats(stats: AnnounceStats) -> Self {
        Self {
            map: Arc::default(),
            events: broadcast::channel(1024).0,
            stats,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SightingMap> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a sighting (replacing the robot's previous one by the same
    /// method) and tells subscribers.
    pub fn record(&self, sighting: AgentSighting) {
        {
            let mut map = self.lock();
            let key = (sighting.robot_id, sighting.method);
            if map.len() >= MAX_SIGHTINGS
                && !map.contains_key(&key)
                && let Some(oldest) = map.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| *k)
            {
                map.remove(&oldest);
            }
            map.insert(key, (Instant::now(), sighting.clone()));
        }
        let _ = self.events.send(sighting);
    }

    /// The sightings of at most `max_age` ago, oldest robot id first.
    pub fn snapshot(&self, max_age: Duration) -> Vec<AgentSighting> {
        let now = Instant::now();
        let mut out: Vec<AgentSighting> = self
            .lock()
            .values()
            .filter(|(at, _)| now.duration_since(*at) <= max_age)
            .map(|(_, s)| s.clone())
            .collect();
        out.sort_by(|a, b| {
            (a.robot_id, a.method.sighting().as_str())
                .cmp(&(b.robot_id, b.method.sighting().as_str()))
        });
        out
    }

    /// The newest sighting of `robot_id` by `method`.
    pub fn get(&self, robot_id: RobotId, method: Method) -> Option<AgentSighting> {
        self.lock().get(&(robot_id, method)).map(|(_, s)| s.clone())
    }

    /// Every sighting from now on (a slow subscriber misses some: it is
    /// told how many by `RecvError::Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<AgentSighting> {
        self.events.subscribe()
    }

    pub fn stats(&self) -> &AnnounceStats {
        &self.stats
    }
}

/// The announcing agents as a discovery source: every robot heard of by
/// mDNS or beacon within `max_age` (one sighting per method).
#[derive(Debug, Clone)]
pub struct AnnouncedAgents {
    pub sightings: Sightings,
    pub max_age: Duration,
}

#[async_trait::async_trait]
impl DiscoverySource for AnnouncedAgents {
    fn method(&self) -> &'static str {
        "announce"
    }

    async fn discover(&self) -> Result<Vec<Sighting>, String> {
        Ok(self
            .sightings
            .snapshot(self.max_age)
            .into_iter()
            .map(|s| {
                let mut out = Sighting::robot(s.ip.to_string(), s.robot_id, s.method.sighting());
                out.robot_type = Some(s.robot_type.as_str().to_string());
                out
            })
            .collect())
    }
}

/// The controller's `_kiwi-ctl._tcp` service. Its instance and host names
/// carry the controller's random id, so probing for conflicts is skipped
/// (it would only delay agents by ~1 s).
pub fn controller_service(settings: &AnnounceSettings) -> Result<ServiceInfo, mdns_sd::Error> {
    let id = settings.controller_id.simple().to_string();
    let record = ControllerTxt {
        controller_id: settings.controller_id,
        path: settings.agent_path.clone(),
        protocol_versions: version::SUPPORTED.to_vec(),
    };
    let ip = settings.agent_endpoint.ip();
    let txt = record.to_txt();
    let mut info = if ip.is_unspecified() {
        ServiceInfo::new(
            beacon::CONTROLLER_SERVICE,
            &format!("kiwi-controller-{}", &id[..8]),
            &format!("kiwi-ctl-{id}.local."),
            (),
            settings.agent_endpoint.port(),
            txt.as_slice(),
        )?
        .enable_addr_auto()
    } else {
        ServiceInfo::new(
            beacon::CONTROLLER_SERVICE,
            &format!("kiwi-controller-{}", &id[..8]),
            &format!("kiwi-ctl-{id}.local."),
            ip,
            settings.agent_endpoint.port(),
            txt.as_slice(),
        )?
    };
    info.set_requires_probe(false);
    Ok(info)
}

/// The controller's LAN side, set up and ready to run.
pub struct Announcer {
    settings: AnnounceSettings,
    sightings: Sightings,
    beacon: Option<UdpSocket>,
    mdns: Option<ServiceDaemon>,
    shutdown: CancellationToken,
}

/// Sets up what `settings` switches on: binds the beacon socket (an error
/// when it cannot be bound, so that it is reported before serving) and
/// starts the mDNS responder (a warning when it cannot start: mDNS is a
/// convenience, not the liveness path). Call it on the thread, and so in the
/// network namespace, the listeners should live in.
pub async fn start(
    settings: AnnounceSettings,
    sightings: Sightings,
    shutdown: CancellationToken,
) -> anyhow::Result<Announcer> {
    use anyhow::Context;
    let beacon = if settings.beacon {
        let socket = UdpSocket::bind(settings.beacon_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen for beacons on {} (beacon_listen)",
                    settings.beacon_listen
                )
            })?;
        Some(socket)
    } else {
        None
    };
    let mdns = if settings.mdns {
        if settings.agent_endpoint.ip().is_loopback() {
            tracing::warn!(
                agent_endpoint = %settings.agent_endpoint,
                "the agent endpoint is on loopback: agents on the LAN cannot reach it"
            );
        }
        match ServiceDaemon::new() {
            Ok(daemon) => {
                let _ = daemon.disable_interface(IfKind::IPv6);
                match controller_service(&settings).and_then(|info| daemon.register(info)) {
                    Ok(()) => tracing::info!(
                        service = beacon::CONTROLLER_SERVICE,
                        endpoint = %settings.agent_endpoint,
                        "registered the mDNS service"
                    ),
                    Err(e) => tracing::warn!(error = %e, "cannot register the mDNS service"),
                }
                Some(daemon)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start mDNS; no mDNS discovery");
                None
            }
        }
    } else {
        None
    };
    Ok(Announcer {
        settings,
        sightings,
        beacon,
        mdns,
        shutdown,
    })
}

impl std::fmt::Debug for Announcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcer")
            .field("settings", &self.settings)
            .field("beacon", &self.beacon_addr())
            .field("mdns", &self.mdns.is_some())
            .finish_non_exhaustive()
    }
}

impl Announcer {
    /// Where beacons are received, when listening.
    pub fn beacon_addr(&self) -> Option<SocketAddr> {
        self.beacon.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// Runs until the shutdown token is cancelled, then withdraws the mDNS
    /// service.
    pub async fn run(self) {
        let Announcer {
            settings,
            sightings,
            beacon,
            mdns,
            shutdown,
        } = self;
        let browse = async {
            if let Some(daemon) = &mdns {
                browse_agents(daemon, &sightings, &shutdown).await;
            }
        };
        let listen = async {
            if let Some(socket) = beacon {
                listen_for_beacons(socket, &settings, &sightings, &shutdown).await;
            }
        };
        tokio::join!(browse, listen);
        if let Some(daemon) = mdns
            && let Ok(done) = daemon.shutdown()
        {
            let _ = tokio::time::timeout(Duration::from_secs(1), done.recv_async()).await;
        }
    }
}

/// Follows `_kiwi-agent._tcp` until shutdown.
async fn browse_agents(
    daemon: &ServiceDaemon,
    sightings: &Sightings,
    shutdown: &CancellationToken,
) {
    let events = match daemon.browse(beacon::AGENT_SERVICE) {
        Ok(events) => events,
        Err(e) => {
            tracing::warn!(error = %e, "cannot browse for agents over mDNS");
            return;
        }
    };
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = events.recv_async() => event,
        };
        match event {
            Ok(ServiceEvent::ServiceResolved(service)) => {
                let addresses: Vec<IpAddr> =
                    service.addresses.iter().map(|a| a.to_ip_addr()).collect();
                let txt = |key: &str| service.get_property_val_str(key).map(str::to_string);
                match sighting_from_service(&addresses, txt) {
                    Ok(s) => {
                        sightings.stats.mdns_resolved.inc();
                        tracing::debug!(robot_id = %s.robot_id, ip = %s.ip, "agent resolved over mDNS");
                        sightings.record(s);
                    }
                    Err(e) => {
                        sightings.stats.mdns_bad.inc();
                        tracing::debug!(service = %service.fullname, reason = %e, "ignoring an agent service");
                    }
                }
            }
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("the mDNS browse for agents ended");
                return;
            }
        }
    }
}

/// An agent's sighting from its resolved `_kiwi-agent._tcp` service: its
/// TXT record, and an IPv4 address not on loopback (else any).
pub fn sighting_from_service(
    addresses: &[IpAddr],
    txt: impl Fn(&str) -> Option<String>,
) -> Result<AgentSighting, String> {
    let b = beacon::beacon_from_txt(txt)?;
    let mut sorted = addresses.to_vec();
    sorted.sort_by_key(|ip| (!ip.is_ipv4(), ip.is_loopback(), *ip));
    let ip = *sorted.first().ok_or("the service has no address")?;
    Ok(AgentSighting::from_beacon(b, ip, Method::Mdns))
}

/// Receives beacons until shutdown.
async fn listen_for_beacons(
    socket: UdpSocket,
    settings: &AnnounceSettings,
    sightings: &Sightings,
    shutdown: &CancellationToken,
) {
    if let Ok(addr) = socket.local_addr() {
        tracing::info!(%addr, "listening for agent beacons");
    }
    let mut buf = vec![0u8; beacon::MAX_DATAGRAM + 1];
    let mut throttle = Throttle::default();
    let stats = &sightings.stats;
    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => return,
            r = socket.recv_from(&mut buf) => r,
        };
        let (len, source) = match received {
            Ok(r) => r,
            Err(e) => {
                // E.g. an ICMP error for an earlier answer; never spin.
                tracing::debug!(error = %e, "beacon socket receive failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let b = match beacon::decode(&buf[..len]) {
            Ok(Datagram::Beacon(b)) => b,
            Ok(other) => {
                stats.bad_datagrams.inc();
                tracing::debug!(%source, kind = other.kind(), "unexpected datagram on the beacon port");
                continue;
            }
            Err(e) => {
                stats.bad_datagrams.inc();
                tracing::debug!(%source, reason = e.kind(), error = %e, "bad datagram on the beacon port");
                continue;
            }
        };
        stats.beacons.inc();
        let (seeking, seq) = (b.seeking, b.seq);
        sightings.record(AgentSighting::from_beacon(b, source.ip(), Method::Beacon));
        if !seeking {
            continue;
        }
        if !throttle.allow(source, Instant::now()) {
            stats.answers_throttled.inc();
            continue;
        }
        let answer = Datagram::Answer(Answer {
            controller_id: settings.controller_id,
            agent_endpoint: settings.endpoint_for(source.ip()),
            seq,
        });
        match beacon::encode(&answer) {
            Ok(bytes) => match socket.send_to(&bytes, source).await {
                Ok(_) => {
                    stats.answers.inc();
                }
                Err(e) => tracing::debug!(%source, error = %e, "cannot answer a beacon"),
            },
            Err(e) => tracing::warn!(error = %e, "cannot encode the beacon answer"),
        }
    }
}

/// At most one answer per source per [`ANSWER_EVERY`].
#[derive(Debug, Default)]
struct Throttle {
    last: HashMap<SocketAddr, Instant>,
}

impl Throttle {
    fn allow(&mut self, source: SocketAddr, now: Instant) -> bool {
        if self.last.len() >= MAX_THROTTLED {
            self.last
                .retain(|_, at| now.duration_since(*at) < ANSWER_EVERY);
        }
        match self.last.get(&source) {
            Some(at) if now.duration_since(*at) < ANSWER_EVERY => false,
            _ => {
                self.last.insert(source, now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiwi_protocol::HardwareId;

    fn beacon_of(n: u32, seeking: bool) -> Beacon {
        Beacon {
            robot_id: RobotId::from_hardware(&HardwareId::Configured(format!("b-{n}"))),
            robot_type: RobotType::Xlerobot,
            hostname: format!("xle-{n}"),
            agent_version: "0.1.0".into(),
            protocol_versions: version::SUPPORTED.to_vec(),
            key_fingerprint: None,
            listen_port: None,
            seq: 7,
            seeking,
        }
    }

    #[test]
    fn endpoints_name_a_reachable_address() {
        let s = AnnounceSettings::new("10.88.0.1:8765".parse().unwrap());
        assert!(!s.enabled());
        assert_eq!(
            s.endpoint_for("10.88.0.9".parse().unwrap()),
            "wss://10.88.0.1:8765/agent"
        );
        // Unspecified: the address towards the peer (loopback here; this
        // only asks the routing table).
        let any = AnnounceSettings::new("0.0.0.0:9000".parse().unwrap());
        assert_eq!(
            any.endpoint_for("127.0.0.1".parse().unwrap()),
            "wss://127.0.0.1:9000/agent"
        );
    }

    #[test]
    fn the_service_record_builds_without_binding() {
        let s = AnnounceSettings::new("10.88.0.1:8765".parse().unwrap());
        let info = controller_service(&s).unwrap();
        assert_eq!(info.get_type(), beacon::CONTROLLER_SERVICE);
        assert_eq!(info.get_port(), 8765);
        assert_eq!(info.get_property_val_str("path"), Some("/agent"));
        let id = s.controller_id.to_string();
        assert_eq!(info.get_property_val_str("id"), Some(id.as_str()));
        let auto =
            controller_service(&AnnounceSettings::new("0.0.0.0:1".parse().unwrap())).unwrap();
        assert!(auto.is_addr_auto());
    }

    #[test]
    fn agent_services_become_sightings() {
        let b = beacon_of(1, false);
        let txt = beacon::agent_txt(&b);
        let get = |k: &str| txt.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let addrs: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "10.88.0.2".parse().unwrap()];
        let s = sighting_from_service(&addrs, get).unwrap();
        assert_eq!(s.robot_id, b.robot_id);
        assert_eq!(s.ip, "10.88.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(
            (s.method, s.robot_type),
            (Method::Mdns, RobotType::Xlerobot)
        );
        assert_eq!(s.hostname, "xle-1");
        assert!(sighting_from_service(&[], get).is_err());
        assert!(sighting_from_service(&addrs, |_| None).is_err());
    }

    #[test]
    fn sightings_are_bounded_and_age_out_of_rounds() {
        let sightings = Sightings::new();
        let mut events = sightings.subscribe();
        let s = AgentSighting::from_beacon(
            beacon_of(1, false),
            "10.88.0.2".parse().unwrap(),
            Method::Beacon,
        );
        sightings.record(s.clone());
        sightings.record(AgentSighting {
            method: Method::Mdns,
            ..s.clone()
        });
        sightings.record(s.clone());
        assert_eq!(sightings.snapshot(Duration::from_secs(60)).len(), 2);
        assert!(sightings.snapshot(Duration::ZERO).len() <= 2);
        assert_eq!(events.try_recv().unwrap().robot_id, s.robot_id);
        assert_eq!(sightings.get(s.robot_id, Method::Beacon).unwrap().ip, s.ip);

        for n in 0..(MAX_SIGHTINGS as u32 + 10) {
            sightings.record(AgentSighting::from_beacon(
                beacon_of(n + 100, false),
                "10.88.0.3".parse().unwrap(),
                Method::Beacon,
            ));
        }
        assert_eq!(sightings.lock().len(), MAX_SIGHTINGS);
    }

    #[test]
    fn answers_are_throttled_per_source() {
        let mut t = Throttle::default();
        let a: SocketAddr = "10.88.0.2:40000".parse().unwrap();
        let b: SocketAddr = "10.88.0.3:40000".parse().unwrap();
        let now = Instant::now();
        assert!(t.allow(a, now));
        assert!(!t.allow(a, now + Duration::from_millis(100)));
        assert!(t.allow(b, now + Duration::from_millis(100)));
        assert!(t.allow(a, now + ANSWER_EVERY));
    }

    #[tokio::test]
    async fn announced_agents_are_a_discovery_source() {
        let sightings = Sightings::new();
        let s = AgentSighting::from_beacon(
            beacon_of(4, true),
            "10.88.0.5".parse().unwrap(),
            Method::Beacon,
        );
        sightings.record(s.clone());
        let source = AnnouncedAgents {
            sightings,
            max_age: DEFAULT_SIGHTING_TTL,
        };
        let found = source.discover().await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].robot_id, Some(s.robot_id));
        assert_eq!(found[0].ip_address, "10.88.0.5");
        assert_eq!(found[0].method, SightingMethod::Beacon);
        assert_eq!(found[0].robot_type.as_deref(), Some("xlerobot"));
    }

    /// The beacon listener on loopback only (mDNS off): beacons are
    /// recorded, a seeking one is answered by unicast, bad datagrams are
    /// counted and dropped.
    #[tokio::test]
    async fn beacons_are_heard_and_seeking_ones_answered() {
        let mut settings = AnnounceSettings::new("127.0.0.1:8765".parse().unwrap());
        settings.beacon = true;
        settings.beacon_listen = "127.0.0.1:0".parse().unwrap();
        let sightings = Sightings::new();
        let shutdown = CancellationToken::new();
        let announcer = start(settings.clone(), sightings.clone(), shutdown.clone())
            .await
            .unwrap();
        let addr = announcer.beacon_addr().unwrap();
        let task = tokio::spawn(announcer.run());

        let agent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        agent.send_to(b"KWBN\x01\x00\xff", addr).await.unwrap();
        agent.send_to(&[0u8; 2000], addr).await.unwrap();
        let quiet = beacon::encode(&Datagram::Beacon(beacon_of(1, false))).unwrap();
        agent.send_to(&quiet, addr).await.unwrap();
        let seeking = beacon_of(2, true);
        agent
            .send_to(
                &beacon::encode(&Datagram::Beacon(seeking.clone())).unwrap(),
                addr,
            )
            .await
            .unwrap();
        let mut buf = [0u8; 2048];
        let (len, from) = tokio::time::timeout(Duration::from_secs(5), agent.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(from, addr);
        match beacon::decode(&buf[..len]).unwrap() {
            Datagram::Answer(a) => {
                assert_eq!(a.controller_id, settings.controller_id);
                assert_eq!(a.agent_endpoint, "wss://127.0.0.1:8765/agent");
                assert_eq!(a.seq, 7);
            }
            other => panic!("expected an answer, got {other:?}"),
        }
        // In order: the answer means every earlier datagram was handled.
        let stats = sightings.stats();
        assert_eq!(stats.bad_datagrams.get(), 2);
        assert_eq!(stats.beacons.get(), 2);
        assert_eq!(stats.answers.get(), 1);
        let seen = sightings.snapshot(DEFAULT_SIGHTING_TTL);
        assert_eq!(seen.len(), 2);
        assert!(seen.iter().all(|s| s.ip == IpAddr::from([127, 0, 0, 1])));
        assert!(
            sightings
                .get(seeking.robot_id, Method::Beacon)
                .unwrap()
                .seeking
        );

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
