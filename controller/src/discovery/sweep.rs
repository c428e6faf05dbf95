//! An active sweep of the configured networks (`discovery.networks`, the
//! original design's `DISCOVERY_NETWORK`): decide which addresses have a
//! live host, then which of those have the agent port and the SSH port
//! open.
//!
//! Liveness is decided without waiting on the kernel's ARP failure time
//! (~3 s an absent address, stretched to ~10 s a /24 by the ICMP rate
//! limit):
//! 1. the kernel neighbour table: a `reachable` entry is a host confirmed
//!    within the last few seconds;
//! 2. the sweep's own ARP over a raw socket (needs `CAP_NET_RAW`), on the
//!    interface that is on the network, with a second chance for slow
//!    replies;
//! 3. otherwise (no `CAP_NET_RAW`, ARP switched off, or a routed network)
//!    TCP connects to the agent port under an application timeout with
//!    bounded concurrency: an accepted or refused connection is a live host;
//!    the neighbour table, read again afterwards, adds the MACs and the hosts
//!    that dropped the connect.
//!
//! Only addresses inside the configured networks are ever touched, never a
//! network's network or broadcast address or one of this host's own
//! addresses. With no networks configured nothing is sent at all. Sockets
//! open in the calling thread's network namespace.
//!
//! Planning and merging are pure ([`plan`], [`Liveness`]); [`sweep`] is the
//! I/O around them.

use super::SightingMethod;
use super::arp::{self, ArpSettings};
use super::neighbours::{self, LocalAddress, NeighbourError};
use super::{Outcome, Sighting};
use futures_util::StreamExt;
pub use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// The widest network a sweep accepts (a /16: 65,534 addresses).
pub const MIN_PREFIX_LEN: u8 = 16;
/// The most addresses one sweep decides, over all its networks.
pub const MAX_ADDRESSES: u64 = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepSettings {
    /// The networks to sweep; empty (the default) sweeps nothing.
    pub networks: Vec<Ipv4Net>,
    pub agent_port: u16,
    pub ssh_port: u16,
    /// Consult the kernel neighbour table (`enable_arp_cache_check`): before
    /// the sweep, and after a TCP fallback for the MACs.
    pub use_neighbour_table: bool,
    /// Send the sweep's own ARP requests when the process may
    /// (`CAP_NET_RAW`); off forces the TCP fallback.
    pub use_arp: bool,
    /// How long to wait for ARP replies after the last request of a round.
    pub arp_timeout: Duration,
    /// ARP rounds after the first for the addresses that did not answer.
    pub arp_retries: u32,
    /// TCP fallback: how long a connect may take before the address counts
    /// as absent.
    pub liveness_timeout: Duration,
    /// Port probes of live hosts: how long a connect may take before the
    /// port counts as not open.
    pub connect_timeout: Duration,
    /// Connects in flight at once (TCP fallback and port probes).
    pub concurrency: usize,
}

impl Default for SweepSettings {
    fn default() -> Self {
        SweepSettings {
            networks: Vec::new(),
            agent_port: 8765,
            ssh_port: 22,
            use_neighbour_table: true,
            use_arp: true,
            arp_timeout: ArpSettings::default().timeout,
            arp_retries: ArpSettings::default().retries,
            liveness_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(300),
            concurrency: 256,
        }
    }
}

/// How a live host was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FoundBy {
    /// A confirmed entry of the kernel neighbour table.
    Neighbour,
    /// It answered the sweep's own ARP request.
    Arp,
    /// It accepted or refused a TCP connect.
    Tcp,
}

impl FoundBy {
    /// How discovery results name it.
    pub fn method(self) -> SightingMethod {
        match self {
            FoundBy::Neighbour => SightingMethod::Neighbour,
            FoundBy::Arp => SightingMethod::Arp,
            FoundBy::Tcp => SightingMethod::Tcp,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveHost {
    pub ip: Ipv4Addr,
    pub mac: Option<[u8; 6]>,
    pub found_by: FoundBy,
    pub agent_port_open: bool,
    pub ssh_port_open: bool,
}

impl LiveHost {
    /// The host as a discovery result: live, not identified.
    pub fn sighting(&self) -> Sighting {
        Sighting {
            ip_address: self.ip.to_string(),
            robot_id: None,
            method: self.found_by.method(),
            mac_address: self.mac.as_ref().map(neighbours::format_mac),
            robot_type: None,
            facts: None,
            outcome: Outcome::Live,
            detail: Some(format!(
                "agent port {}, ssh port {}",
                if self.agent_port_open {
                    "open"
                } else {
                    "closed"
                },
                if self.ssh_port_open { "open" } else { "closed" },
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// The live hosts, by address.
    pub hosts: Vec<LiveHost>,
    /// Addresses decided (live or absent): every address swept.
    pub decided_addresses: usize,
    pub duration: Duration,
    /// Whether the sweep's own ARP decided any address.
    pub arp_used: bool,
    /// Why the sweep's own ARP was not used where it was wanted (no
    /// `CAP_NET_RAW`, typically): those addresses went to TCP.
    pub arp_fallback: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(
        "network {network} is too large to sweep (at most a /{MIN_PREFIX_LEN}, {MAX_ADDRESSES} addresses)"
    )]
    NetworkTooLarge { network: Ipv4Net },
    #[error("the networks hold {addresses} addresses; a sweep decides at most {MAX_ADDRESSES}")]
    TooManyAddresses { addresses: u64 },
    #[error("cannot read this host's addresses: {0}")]
    LocalAddresses(#[source] NeighbourError),
}

/// The addresses on one interface: asked by ARP from `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkTargets {
    pub ifindex: u32,
    /// This host's address on the interface.
    pub source: Ipv4Addr,
    pub targets: Vec<Ipv4Addr>,
}

/// What a sweep will ask, decided before anything is sent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Every address to decide, ascending, without duplicates.
    pub targets: Vec<Ipv4Addr>,
    /// The on-link addresses, by interface.
    pub links: Vec<LinkTargets>,
    /// The addresses on no local subnet (routed): TCP only.
    pub routed: Vec<Ipv4Addr>,
}

/// Refuses networks wider than a /16, or more than [`MAX_ADDRESSES`] in
/// all, before anything is enumerated.
pub fn validate(networks: &[Ipv4Net]) -> Result<(), SweepError> {
    let mut addresses = 0u64;
    for network in networks {
        if network.prefix_len() < MIN_PREFIX_LEN {
            return Err(SweepError::NetworkTooLarge { network: *network });
        }
        addresses += 1u64 << (32 - u32::from(network.prefix_len()));
    }
    if addresses > MAX_ADDRESSES {
        return Err(SweepError::TooManyAddresses { addresses });
    }
    Ok(())
}

/// The addresses to sweep and the interface to ask each one on. Skips each
/// network's network and broadcast address (below a /31) and this host's
/// own addresses; an address is on the interface with the narrowest local
/// subnet that contains it.
pub fn plan(networks: &[Ipv4Net], local: &[LocalAddress]) -> Result<Plan, SweepError> {
    validate(networks)?;
    let own: BTreeSet<Ipv4Addr> = local.iter().map(|l| l.address()).collect();
    let targets: BTreeSet<Ipv4Addr> = networks
        .iter()
        .flat_map(|n| n.trunc().hosts())
        .filter(|ip| !own.contains(ip))
        .collect();
    let mut links: BTreeMap<(u32, Ipv4Addr), Vec<Ipv4Addr>> = BTreeMap::new();
    let mut routed = Vec::new();
    for &ip in &targets {
        let link = local
            .iter()
            .filter(|l| !l.address().is_loopback() && l.net.trunc().contains(&ip))
            .max_by_key(|l| l.net.prefix_len());
        match link {
            Some(l) => links.entry((l.ifindex, l.address())).or_default().push(ip),
            None => routed.push(ip),
        }
    }
    Ok(Plan {
        targets: targets.into_iter().collect(),
        links: links
            .into_iter()
            .map(|((ifindex, source), targets)| LinkTargets {
                ifindex,
                source,
                targets,
            })
            .collect(),
        routed,
    })
}

/// What came of a TCP connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    /// Accepted: a host, listening.
    Open,
    /// Refused: a host, not listening.
    Closed,
    /// No answer in time, or unreachable: no evidence of a host.
    Silent,
}

impl PortState {
    pub fn proves_host(self) -> bool {
        self != PortState::Silent
    }
}

/// The live hosts found so far, merged from every source (pure). The
/// first source to find a host names it; a later one may add its MAC.
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    hosts: BTreeMap<Ipv4Addr, (Option<[u8; 6]>, FoundBy)>,
}

impl Liveness {
    pub fn found(&mut self, ip: Ipv4Addr, mac: Option<[u8; 6]>, by: FoundBy) {
        let entry = self.hosts.entry(ip).or_insert((mac, by));
        if entry.0.is_none() {
            entry.0 = mac;
        }
    }

    pub fn contains(&self, ip: &Ipv4Addr) -> bool {
        self.hosts.contains_key(ip)
    }

    /// `targets` less the hosts already found.
    pub fn undecided(&self, targets: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
        targets
            .iter()
            .filter(|ip| !self.contains(ip))
            .copied()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The hosts with their port states (a port without a state is not
    /// open).
    pub fn into_hosts(
        self,
        agent: &BTreeMap<Ipv4Addr, PortState>,
        ssh: &BTreeMap<Ipv4Addr, PortState>,
    ) -> Vec<LiveHost> {
        self.hosts
            .into_iter()
            .map(|(ip, (mac, found_by))| LiveHost {
                ip,
                mac,
                found_by,
                agent_port_open: agent.get(&ip) == Some(&PortState::Open),
                ssh_port_open: ssh.get(&ip) == Some(&PortState::Open),
            })
            .collect()
    }
}

/// Sweeps `settings.networks`. See the module documentation for the order
/// of the steps. Fails only on configuration (a network too large) or when
/// this host's own addresses cannot be read; a failing step otherwise
/// falls back to the next one.
pub async fn sweep(settings: &SweepSettings) -> Result<SweepReport, SweepError> {
    let started = Instant::now();
    validate(&settings.networks)?;
    if settings.networks.is_empty() {
        return Ok(SweepReport {
            hosts: Vec::new(),
            decided_addresses: 0,
            duration: started.elapsed(),
            arp_used: false,
            arp_fallback: None,
        });
    }
    let local = neighbours::local_addresses()
        .await
        .map_err(SweepError::LocalAddresses)?;
    let plan = plan(&settings.networks, &local)?;
    let targets: BTreeSet<Ipv4Addr> = plan.targets.iter().copied().collect();
    let mut live = Liveness::default();

    if settings.use_neighbour_table {
        for n in read_neighbours().await {
            if n.state.is_confirmed() && targets.contains(&n.ip) {
                live.found(n.ip, n.mac, FoundBy::Neighbour);
            }
        }
    }

    let mut tcp_targets = plan.routed.clone();
    let mut arp_used = false;
    let mut arp_fallback = None;
    for link in &plan.links {
        let ask = live.undecided(&link.targets);
        if ask.is_empty() {
            continue;
        }
        if !settings.use_arp {
            tcp_targets.extend(ask);
            continue;
        }
        let arp_settings = ArpSettings {
            timeout: settings.arp_timeout,
            retries: settings.arp_retries,
            ..ArpSettings::default()
        };
        match arp::resolve(link.ifindex, link.source, ask.clone(), arp_settings).await {
            Ok(found) => {
                arp_used = true;
                for (ip, mac) in found {
                    live.found(ip, Some(mac), FoundBy::Arp);
                }
            }
            Err(e) => {
                tracing::info!(ifindex = link.ifindex, error = %e, "sweep without its own ARP: TCP connects instead");
                arp_fallback.get_or_insert_with(|| e.to_string());
                tcp_targets.extend(ask);
            }
        }
    }

    let mut agent = BTreeMap::new();
    if !tcp_targets.is_empty() {
        tcp_targets.sort_unstable();
        agent = connect_all(
            &tcp_targets,
            settings.agent_port,
            settings.liveness_timeout,
            settings.concurrency,
        )
        .await;
        for (ip, state) in &agent {
            if state.proves_host() {
                live.found(*ip, None, FoundBy::Tcp);
            }
        }
        if settings.use_neighbour_table {
            // The connects made the kernel resolve every address: a
            // confirmed entry now gives the MAC, and proves a host that
            // dropped the connect.
            let asked: BTreeSet<_> = tcp_targets.iter().collect();
            for n in read_neighbours().await {
                if n.state.is_confirmed() && n.mac.is_some() && asked.contains(&n.ip) {
                    live.found(n.ip, n.mac, FoundBy::Neighbour);
                }
            }
        }
    }

    // Ports, for the live hosts only (the TCP fallback already knows the
    // agent port of the hosts it reached).
    let hosts: Vec<Ipv4Addr> = live.hosts.keys().copied().collect();
    let agent_unknown: Vec<Ipv4Addr> = hosts
        .iter()
        .filter(|ip| agent.get(ip).is_none_or(|s| !s.proves_host()))
        .copied()
        .collect();
    let probe_ports = |targets: &[Ipv4Addr], port: u16| {
        let timeout = settings.connect_timeout;
        with_second_chance(
            targets.to_vec(),
            settings.concurrency.div_ceil(2),
            move |ip, again| {
                let timeout = if again {
                    timeout.max(SECOND_CHANCE_TIMEOUT)
                } else {
                    timeout
                };
                probe(ip, port, timeout)
            },
        )
    };
    let (agent_probed, ssh) = tokio::join!(
        probe_ports(&agent_unknown, settings.agent_port),
        probe_ports(&hosts, settings.ssh_port),
    );
    agent.extend(agent_probed);

    Ok(SweepReport {
        hosts: live.into_hosts(&agent, &ssh),
        decided_addresses: plan.targets.len(),
        duration: started.elapsed(),
        arp_used,
        arp_fallback,
    })
}

/// The neighbour table, or nothing (with a warning) when it cannot be read:
/// the sweep then decides by its own means.
async fn read_neighbours() -> Vec<neighbours::Neighbour> {
    match neighbours::neighbours().await {
        Ok(table) => table,
        Err(e) => {
            tracing::warn!(error = %e, "kernel neighbour table not readable; sweeping without it");
            Vec::new()
        }
    }
}

/// Connects to `port` of every address, `concurrency` at a time, each
/// under `timeout`.
pub async fn connect_all(
    targets: &[Ipv4Addr],
    port: u16,
    timeout: Duration,
    concurrency: usize,
) -> BTreeMap<Ipv4Addr, PortState> {
    futures_util::stream::iter(targets.iter().copied())
        .map(|ip| async move { (ip, probe(ip, port, timeout).await) })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await
}

/// How long the second chance of a port probe may take: past the kernel's
/// first retransmit (1 s) of a lost ARP request (the sweep's own ARP does
/// not fill the kernel's neighbour table, so the connect resolves the
/// address again).
pub const SECOND_CHANCE_TIMEOUT: Duration = Duration::from_millis(1200);

/// Probes a port of every live host, `concurrency` at a time, and probes
/// again, once, those that gave no answer (`probe(ip, true)`: the second
/// time): the host is known to be there, so silence is most likely an ARP
/// exchange, SYN or SYN-ACK lost on a lossy link (the kernel's own
/// retransmits come only after 1 s, past the first probe's timeout), and a
/// port missed this way would leave a robot unidentified for the whole
/// round. An answer (open or refused) is final. Costs nothing when every
/// live host answers.
async fn with_second_chance<F, Fut>(
    targets: Vec<Ipv4Addr>,
    concurrency: usize,
    probe: F,
) -> BTreeMap<Ipv4Addr, PortState>
where
    F: Fn(Ipv4Addr, bool) -> Fut,
    Fut: Future<Output = PortState>,
{
    let probe = &probe;
    let probe_all = |targets: Vec<Ipv4Addr>, again: bool| {
        futures_util::stream::iter(targets)
            .map(move |ip| {
                let fut = probe(ip, again);
                async move { (ip, fut.await) }
            })
            .buffer_unordered(concurrency.max(1))
            .collect::<BTreeMap<_, _>>()
    };
    let mut states = probe_all(targets, false).await;
    let silent: Vec<Ipv4Addr> = states
        .iter()
        .filter(|(_, s)| **s == PortState::Silent)
        .map(|(ip, _)| *ip)
        .collect();
    if !silent.is_empty() {
        states.extend(probe_all(silent, true).await);
    }
    states
}

/// One connect, closed at once.
pub async fn probe(ip: Ipv4Addr, port: u16, timeout: Duration) -> PortState {
    let addr = SocketAddr::from((ip, port));
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_stream)) => PortState::Open,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => PortState::Closed,
        Ok(Err(_)) | Err(_) => PortState::Silent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn local(ifindex: u32, s: &str) -> LocalAddress {
        LocalAddress {
            ifindex,
            net: net(s),
        }
    }

    #[test]
    fn a_24_is_its_hosts_less_our_own_address() {
        let plan = plan(
            &[net("10.88.0.0/24")],
            &[local(1, "127.0.0.1/8"), local(2, "10.88.0.1/24")],
        )
        .unwrap();
        assert_eq!(plan.targets.len(), 253);
        assert_eq!(plan.targets.first(), Some(&ip("10.88.0.2")));
        assert_eq!(plan.targets.last(), Some(&ip("10.88.0.254")));
        assert!(!plan.targets.contains(&ip("10.88.0.0")));
        assert!(!plan.targets.contains(&ip("10.88.0.255")));
        assert!(!plan.targets.contains(&ip("10.88.0.1")));
        assert_eq!(
            plan.links,
            vec![LinkTargets {
                ifindex: 2,
                source: ip("10.88.0.1"),
                targets: plan.targets.clone(),
            }]
        );
        assert!(plan.routed.is_empty());
    }

    #[test]
    fn a_network_on_no_interface_is_routed_and_stays_inside_its_bounds() {
        let plan = plan(&[net("192.0.2.8/29")], &[local(2, "10.88.0.1/24")]).unwrap();
        assert_eq!(
            plan.routed,
            (9..=14)
                .map(|i| Ipv4Addr::new(192, 0, 2, i))
                .collect::<Vec<_>>()
        );
        assert!(plan.links.is_empty());
        assert_eq!(plan.targets, plan.routed);
    }

    #[test]
    fn a_network_given_with_host_bits_is_its_whole_network() {
        let plan = plan(&[net("10.88.0.77/30")], &[]).unwrap();
        assert_eq!(plan.targets, vec![ip("10.88.0.77"), ip("10.88.0.78")]);
    }

    #[test]
    fn overlapping_networks_are_swept_once_and_split_by_interface() {
        let plan = plan(
            &[
                net("10.88.0.0/24"),
                net("10.88.0.0/25"),
                net("10.88.1.0/30"),
            ],
            &[local(2, "10.88.0.1/24"), local(3, "10.88.1.1/30")],
        )
        .unwrap();
        assert_eq!(plan.targets.len(), 253 + 1);
        assert_eq!(plan.links.len(), 2);
        assert_eq!(plan.links[0].targets.len(), 253);
        assert_eq!(
            plan.links[1],
            LinkTargets {
                ifindex: 3,
                source: ip("10.88.1.1"),
                targets: vec![ip("10.88.1.2")],
            }
        );
    }

    #[test]
    fn the_narrowest_local_subnet_wins() {
        let plan = plan(
            &[net("10.88.0.0/24")],
            &[local(2, "10.88.0.1/16"), local(3, "10.88.0.129/25")],
        )
        .unwrap();
        let on = |i: u32| {
            plan.links
                .iter()
                .find(|l| l.ifindex == i)
                .map(|l| l.targets.len())
        };
        // .128 to .254 less our .129; .2 to .127.
        assert_eq!(on(3), Some(126));
        assert_eq!(on(2), Some(126));
    }

    #[test]
    fn wide_networks_are_refused_before_anything_is_enumerated() {
        assert!(matches!(
            plan(&[net("10.0.0.0/8")], &[]),
            Err(SweepError::NetworkTooLarge { .. })
        ));
        assert!(plan(&[net("10.88.0.0/16")], &[]).is_ok());
        assert!(matches!(
            plan(&[net("10.88.0.0/16"), net("10.89.0.0/24")], &[]),
            Err(SweepError::TooManyAddresses { .. })
        ));
        assert_eq!(plan(&[], &[]).unwrap(), Plan::default());
    }

    #[test]
    fn point_to_point_networks_keep_both_addresses() {
        assert_eq!(plan(&[net("10.88.0.4/31")], &[]).unwrap().targets.len(), 2);
        assert_eq!(plan(&[net("10.88.0.4/32")], &[]).unwrap().targets.len(), 1);
    }

    #[test]
    fn the_first_source_names_a_host_and_a_later_one_adds_its_mac() {
        let mut live = Liveness::default();
        let mac = [2, 0x88, 0, 0, 0, 3];
        live.found(ip("10.88.0.3"), None, FoundBy::Tcp);
        live.found(ip("10.88.0.3"), Some(mac), FoundBy::Neighbour);
        live.found(ip("10.88.0.2"), Some(mac), FoundBy::Arp);
        live.found(
            ip("10.88.0.2"),
            Some([2, 0, 0, 0, 0, 9]),
            FoundBy::Neighbour,
        );
        assert_eq!(
            live.undecided(&[ip("10.88.0.2"), ip("10.88.0.4")]),
            vec![ip("10.88.0.4")]
        );
        let agent = BTreeMap::from([
            (ip("10.88.0.2"), PortState::Open),
            (ip("10.88.0.3"), PortState::Closed),
        ]);
        let ssh = BTreeMap::from([(ip("10.88.0.3"), PortState::Open)]);
        let hosts = live.into_hosts(&agent, &ssh);
        assert_eq!(
            hosts,
            vec![
                LiveHost {
                    ip: ip("10.88.0.2"),
                    mac: Some(mac),
                    found_by: FoundBy::Arp,
                    agent_port_open: true,
                    ssh_port_open: false,
                },
                LiveHost {
                    ip: ip("10.88.0.3"),
                    mac: Some(mac),
                    found_by: FoundBy::Tcp,
                    agent_port_open: false,
                    ssh_port_open: true,
                },
            ]
        );
    }

    #[test]
    fn a_live_host_becomes_a_live_sighting_with_its_mac() {
        let s = LiveHost {
            ip: ip("10.88.0.2"),
            mac: Some([2, 0x88, 0, 0, 0, 2]),
            found_by: FoundBy::Arp,
            agent_port_open: false,
            ssh_port_open: true,
        }
        .sighting();
        assert_eq!(s.ip_address, "10.88.0.2");
        assert_eq!(s.method, SightingMethod::Arp);
        assert_eq!(s.mac_address.as_deref(), Some("02:88:00:00:00:02"));
        assert_eq!(s.outcome, Outcome::Live);
        assert!(s.robot_id.is_none());
    }

    #[tokio::test]
    async fn a_silent_port_gets_a_second_chance_and_an_answer_is_final() {
        use std::sync::Mutex;
        // .2 is lost once then open, .3 silent twice, .4 refused, .5 open.
        let calls: Mutex<Vec<Ipv4Addr>> = Mutex::default();
        let states = with_second_chance(
            vec![
                ip("10.88.0.2"),
                ip("10.88.0.3"),
                ip("10.88.0.4"),
                ip("10.88.0.5"),
            ],
            2,
            |target, again| {
                let mut calls = calls.lock().unwrap();
                calls.push(target);
                let tries = calls.iter().filter(|c| **c == target).count();
                assert_eq!(again, tries == 2, "the second probe is marked as such");
                let state = match (target.octets()[3], tries) {
                    (2, 1) | (3, _) => PortState::Silent,
                    (4, _) => PortState::Closed,
                    _ => PortState::Open,
                };
                async move { state }
            },
        )
        .await;
        assert_eq!(
            states.into_iter().collect::<Vec<_>>(),
            vec![
                (ip("10.88.0.2"), PortState::Open),
                (ip("10.88.0.3"), PortState::Silent),
                (ip("10.88.0.4"), PortState::Closed),
                (ip("10.88.0.5"), PortState::Open),
            ]
        );
        let mut calls = calls.into_inner().unwrap();
        calls.sort();
        assert_eq!(
            calls,
            [
                "10.88.0.2",
                "10.88.0.2",
                "10.88.0.3",
                "10.88.0.3",
                "10.88.0.4",
                "10.88.0.5"
            ]
            .map(ip),
            "only the silent ones are probed again, once"
        );
    }

    #[tokio::test]
    async fn no_networks_sweep_nothing() {
        let report = sweep(&SweepSettings::default()).await.unwrap();
        assert!(report.hosts.is_empty());
        assert_eq!(report.decided_addresses, 0);
        assert!(!report.arp_used);
    }
}
