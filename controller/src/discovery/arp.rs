//! The sweep's own ARP: who-has requests for a list of IPv4 addresses sent
//! over a raw `AF_PACKET` socket on one interface, and the replies collected
//! until an application deadline. This decides a /24 in a fraction of a
//! second, where the kernel's own resolution takes ~3 s to give up on an
//! absent address (and the ICMP rate limit stretches a TCP sweep to 10 s).
//!
//! Opening the socket needs `CAP_NET_RAW`; without it [`ArpSweeper::open`]
//! fails with [`ArpError::NotPermitted`] and the sweep falls back to TCP.
//!
//! The packet code is sans-I/O: [`request`] builds a frame, [`parse_reply`]
//! reads one, and [`Collector`] keeps what a sweep asked for and what came
//! back. Frames from the network are untrusted: anything short, foreign or
//! unasked for is ignored, never a panic.

use pnet_datalink::{Channel, DataLinkReceiver, DataLinkSender, NetworkInterface};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV4: u16 = 0x0800;
const HTYPE_ETHERNET: u16 = 1;
const OPER_REQUEST: u16 = 1;
const OPER_REPLY: u16 = 2;
const ETHERNET_HEADER: usize = 14;
const ARP_PAYLOAD: usize = 28;
/// The minimum Ethernet frame without its FCS; requests are padded to it.
pub const FRAME_LEN: usize = 60;
const BROADCAST: [u8; 6] = [0xff; 6];

/// An ARP who-has request for `target`, broadcast from `source`.
pub fn request(source_mac: [u8; 6], source_ip: Ipv4Addr, target: Ipv4Addr) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&source_mac);
    f[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    let a = &mut f[ETHERNET_HEADER..ETHERNET_HEADER + ARP_PAYLOAD];
    a[0..2].copy_from_slice(&HTYPE_ETHERNET.to_be_bytes());
    a[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    a[4] = 6;
    a[5] = 4;
    a[6..8].copy_from_slice(&OPER_REQUEST.to_be_bytes());
    a[8..14].copy_from_slice(&source_mac);
    a[14..18].copy_from_slice(&source_ip.octets());
    // Target hardware address: unknown, left zero.
    a[24..28].copy_from_slice(&target.octets());
    f
}

/// An ARP reply: who answered, from which MAC, and to whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub sender_ip: Ipv4Addr,
    pub sender_mac: [u8; 6],
    pub target_ip: Ipv4Addr,
}

/// Reads an Ethernet frame as an IPv4-over-Ethernet ARP reply. Anything
/// else (another ethertype, a request, a truncated frame, a VLAN tag, a
/// sender MAC that is not unicast) is `None`.
pub fn parse_reply(frame: &[u8]) -> Option<Reply> {
    let ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    if ethertype != ETHERTYPE_ARP {
        return None;
    }
    let a = frame.get(ETHERNET_HEADER..ETHERNET_HEADER + ARP_PAYLOAD)?;
    let field = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
    if field(0) != HTYPE_ETHERNET
        || field(2) != ETHERTYPE_IPV4
        || a[4] != 6
        || a[5] != 4
        || field(6) != OPER_REPLY
    {
        return None;
    }
    let sender_mac: [u8; 6] = a[8..14].try_into().ok()?;
    if !super::neighbours::is_unicast_mac(&sender_mac) {
        return None;
    }
    let sender_ip = Ipv4Addr::from(<[u8; 4]>::try_from(&a[14..18]).ok()?);
    let target_ip = Ipv4Addr::from(<[u8; 4]>::try_from(&a[24..28]).ok()?);
    Some(Reply {
        sender_ip,
        sender_mac,
        target_ip,
    })
}

/// What one sweep asked for and what came back (sans I/O).
#[derive(Debug, Clone)]
pub struct Collector {
    source_ip: Ipv4Addr,
    asked: BTreeSet<Ipv4Addr>,
    found: BTreeMap<Ipv4Addr, [u8; 6]>,
}

impl Collector {
    pub fn new(source_ip: Ipv4Addr, targets: impl IntoIterator<Item = Ipv4Addr>) -> Self {
        Collector {
            source_ip,
            asked: targets.into_iter().collect(),
            found: BTreeMap::new(),
        }
    }

    /// Takes a frame from the wire. Only a reply to us from an address we
    /// asked about counts; the first MAC seen for an address is kept (a
    /// second one is an address conflict, not a reason to flap).
    /// Returns whether the frame decided a new address.
    pub fn handle_frame(&mut self, frame: &[u8]) -> bool {
        let Some(reply) = parse_reply(frame) else {
            return false;
        };
        if reply.target_ip != self.source_ip || !self.asked.contains(&reply.sender_ip) {
            return false;
        }
        if let Some(mac) = self.found.get(&reply.sender_ip) {
            if *mac != reply.sender_mac {
                tracing::debug!(
                    ip = %reply.sender_ip,
                    first = %super::neighbours::format_mac(mac),
                    other = %super::neighbours::format_mac(&reply.sender_mac),
                    "two MACs answered ARP for one address; keeping the first",
                );
            }
            return false;
        }
        self.found.insert(reply.sender_ip, reply.sender_mac);
        true
    }

    /// The addresses asked about that have not answered yet, in order.
    pub fn pending(&self) -> Vec<Ipv4Addr> {
        self.asked
            .iter()
            .filter(|ip| !self.found.contains_key(ip))
            .copied()
            .collect()
    }

    pub fn is_done(&self) -> bool {
        self.found.len() == self.asked.len()
    }

    pub fn into_found(self) -> BTreeMap<Ipv4Addr, [u8; 6]> {
        self.found
    }
}

/// How a sweep paces and waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpSettings {
    /// How long to wait for replies after the last request of a round.
    pub timeout: Duration,
    /// Further rounds for the addresses that did not answer (a second
    /// chance for a slow reply on a loaded machine).
    pub retries: u32,
    /// Requests sent back to back before the socket is drained (which also
    /// paces the sending, so the switch and the kernel's backlog are not
    /// overrun).
    pub burst: usize,
}

impl Default for ArpSettings {
    fn default() -> Self {
        ArpSettings {
            timeout: Duration::from_millis(150),
            retries: 1,
            burst: 16,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArpError {
    #[error("no CAP_NET_RAW: cannot open a raw socket for ARP ({0})")]
    NotPermitted(#[source] io::Error),
    #[error("no interface with index {0}")]
    NoInterface(u32),
    #[error("interface {0} has no MAC address")]
    NoMac(String),
    #[error("interface {0} does not give an Ethernet channel")]
    NotEthernet(String),
    #[error("ARP socket I/O on {interface}: {source}")]
    Io {
        interface: String,
        #[source]
        source: io::Error,
    },
}

/// How long one receive waits when nothing arrives; also the pause
/// between bursts of requests.
const POLL: Duration = Duration::from_millis(1);

/// An open raw socket on one interface, with the address to ask from.
pub struct ArpSweeper {
    interface: String,
    mac: [u8; 6],
    source_ip: Ipv4Addr,
    tx: Box<dyn DataLinkSender>,
    rx: Box<dyn DataLinkReceiver>,
}

impl std::fmt::Debug for ArpSweeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArpSweeper")
            .field("interface", &self.interface)
            .field("mac", &super::neighbours::format_mac(&self.mac))
            .field("source_ip", &self.source_ip)
            .finish_non_exhaustive()
    }
}

impl ArpSweeper {
    /// Opens a raw socket on interface `ifindex`, in the calling thread's
    /// network namespace, asking from `source_ip` (this host's address on
    /// that interface).
    pub fn open(ifindex: u32, source_ip: Ipv4Addr) -> Result<Self, ArpError> {
        let interface = pnet_datalink::interfaces()
            .into_iter()
            .find(|i| i.index == ifindex)
            .ok_or(ArpError::NoInterface(ifindex))?;
        Self::open_on(interface, source_ip)
    }

    fn open_on(interface: NetworkInterface, source_ip: Ipv4Addr) -> Result<Self, ArpError> {
        let name = interface.name.clone();
        let mac = interface
            .mac
            .map(|m| m.octets())
            .filter(super::neighbours::is_unicast_mac)
            .ok_or_else(|| ArpError::NoMac(name.clone()))?;
        let config = pnet_datalink::Config {
            read_timeout: Some(POLL),
            write_timeout: Some(Duration::from_millis(100)),
            promiscuous: false,
            read_buffer_size: 2048,
            ..Default::default()
        };
        match pnet_datalink::channel(&interface, config) {
            Ok(Channel::Ethernet(tx, rx)) => Ok(ArpSweeper {
                interface: name,
                mac,
                source_ip,
                tx,
                rx,
            }),
            Ok(_) => Err(ArpError::NotEthernet(name)),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(ArpError::NotPermitted(e)),
            Err(e) => Err(ArpError::Io {
                interface: name,
                source: e,
            }),
        }
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Asks every target, waits `settings.timeout` after the last request,
    /// asks the silent ones again (`settings.retries` times) and returns
    /// who answered. Blocking: call it off the async runtime (see
    /// [`resolve`]). Replies to an earlier round still count in a later one.
    pub fn sweep(
        &mut self,
        targets: &[Ipv4Addr],
        settings: &ArpSettings,
    ) -> Result<BTreeMap<Ipv4Addr, [u8; 6]>, ArpError> {
        let mut collector = Collector::new(self.source_ip, targets.iter().copied());
        for _round in 0..=settings.retries {
            if collector.is_done() {
                break;
            }
            for chunk in collector.pending().chunks(settings.burst.max(1)) {
                for &target in chunk {
                    self.send(&request(self.mac, self.source_ip, target))?;
                }
                self.drain(&mut collector, Instant::now() + POLL)?;
            }
            let deadline = Instant::now() + settings.timeout;
            while !collector.is_done() && Instant::now() < deadline {
                self.drain(&mut collector, deadline)?;
            }
        }
        Ok(collector.into_found())
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), ArpError> {
        match self.tx.send_to(frame, None) {
            Some(Ok(())) | None => Ok(()),
            // A full queue drops this request; the retry round asks again.
            Some(Err(e))
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::TimedOut
                    || e.raw_os_error() == Some(105) =>
            {
                tracing::debug!(interface = %self.interface, error = %e, "ARP request not sent");
                Ok(())
            }
            Some(Err(e)) => Err(self.io(e)),
        }
    }

    /// Reads frames until the socket is quiet for [`POLL`] or `until`.
    fn drain(&mut self, collector: &mut Collector, until: Instant) -> Result<(), ArpError> {
        loop {
            match self.rx.next() {
                Ok(frame) => {
                    collector.handle_frame(frame);
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
            if Instant::now() >= until {
                return Ok(());
            }
        }
    }

    fn io(&self, source: io::Error) -> ArpError {
        ArpError::Io {
            interface: self.interface.clone(),
            source,
        }
    }
}

/// Opens a sweeper on `ifindex` (in the calling thread's namespace) and
/// runs [`ArpSweeper::sweep`] on the blocking pool.
pub async fn resolve(
    ifindex: u32,
    source_ip: Ipv4Addr,
    targets: Vec<Ipv4Addr>,
    settings: ArpSettings,
) -> Result<BTreeMap<Ipv4Addr, [u8; 6]>, ArpError> {
    let mut sweeper = ArpSweeper::open(ifindex, source_ip)?;
    let interface = sweeper.interface.clone();
    tokio::task::spawn_blocking(move || sweeper.sweep(&targets, &settings))
        .await
        .map_err(|e| ArpError::Io {
            interface,
            source: io::Error::other(e),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUR_MAC: [u8; 6] = [2, 0x88, 0, 0, 0, 1];
    const OUR_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);

    /// A reply as a host would send it.
    fn reply(sender_mac: [u8; 6], sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
        let mut f = request(sender_mac, sender_ip, target_ip).to_vec();
        f[0..6].copy_from_slice(&OUR_MAC);
        f[ETHERNET_HEADER + 6..ETHERNET_HEADER + 8].copy_from_slice(&OPER_REPLY.to_be_bytes());
        f[ETHERNET_HEADER + 18..ETHERNET_HEADER + 24].copy_from_slice(&OUR_MAC);
        f
    }

    #[test]
    fn a_request_has_the_wire_layout_of_arp() {
        let f = request(OUR_MAC, OUR_IP, Ipv4Addr::new(10, 88, 0, 7));
        let expected: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0x88, 0, 0, 0, 1, 0x08, 0x06, // Ethernet
            0, 1, 0x08, 0, 6, 4, 0, 1, // htype, ptype, hlen, plen, request
            2, 0x88, 0, 0, 0, 1, 10, 88, 0, 1, // sender
            0, 0, 0, 0, 0, 0, 10, 88, 0, 7, // target
        ];
        assert_eq!(&f[..42], &expected);
        assert!(f[42..].iter().all(|&b| b == 0), "padding is zero");
        // A request is not a reply.
        assert_eq!(parse_reply(&f), None);
    }

    #[test]
    fn a_reply_is_read() {
        let mac = [2, 0x88, 0, 0, 0, 7];
        let ip = Ipv4Addr::new(10, 88, 0, 7);
        assert_eq!(
            parse_reply(&reply(mac, ip, OUR_IP)),
            Some(Reply {
                sender_ip: ip,
                sender_mac: mac,
                target_ip: OUR_IP
            })
        );
        // Without the Ethernet padding too.
        assert!(parse_reply(&reply(mac, ip, OUR_IP)[..42]).is_some());
    }

    #[test]
    fn truncated_and_foreign_frames_are_ignored() {
        let good = reply([2, 0x88, 0, 0, 0, 7], Ipv4Addr::new(10, 88, 0, 7), OUR_IP);
        for len in 0..42 {
            assert_eq!(parse_reply(&good[..len]), None, "truncated to {len}");
        }
        let mut ipv4 = good.clone();
        ipv4[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        assert_eq!(parse_reply(&ipv4), None);
        let mut vlan = good.clone();
        vlan[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
        assert_eq!(parse_reply(&vlan), None);
        let mut ipv6_arp = good.clone();
        ipv6_arp[ETHERNET_HEADER + 2..ETHERNET_HEADER + 4]
            .copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(parse_reply(&ipv6_arp), None);
        let mut long_addresses = good.clone();
        long_addresses[ETHERNET_HEADER + 4] = 8;
        assert_eq!(parse_reply(&long_addresses), None);
        let zero_mac = reply([0; 6], Ipv4Addr::new(10, 88, 0, 7), OUR_IP);
        assert_eq!(parse_reply(&zero_mac), None);
        let multicast_mac = reply([1, 0, 0x5e, 0, 0, 1], Ipv4Addr::new(10, 88, 0, 7), OUR_IP);
        assert_eq!(parse_reply(&multicast_mac), None);
    }

    #[test]
    fn only_replies_to_us_from_asked_addresses_count() {
        let asked = [Ipv4Addr::new(10, 88, 0, 2), Ipv4Addr::new(10, 88, 0, 3)];
        let mut c = Collector::new(OUR_IP, asked);
        // Not asked about.
        assert!(!c.handle_frame(&reply(
            [2, 0, 0, 0, 0, 9],
            Ipv4Addr::new(10, 88, 0, 9),
            OUR_IP
        )));
        // Asked about, but answering someone else.
        assert!(!c.handle_frame(&reply(
            [2, 0, 0, 0, 0, 2],
            asked[0],
            Ipv4Addr::new(10, 88, 0, 50)
        )));
        // A request from an asked address is not an answer.
        assert!(!c.handle_frame(&request([2, 0, 0, 0, 0, 2], asked[0], OUR_IP)));
        assert!(!c.handle_frame(&[]));
        assert!(!c.handle_frame(&[0xff; 3]));
        assert_eq!(c.pending(), asked.to_vec());

        assert!(c.handle_frame(&reply([2, 0, 0, 0, 0, 2], asked[0], OUR_IP)));
        // A second MAC for the same address does not replace the first.
        assert!(!c.handle_frame(&reply([2, 0, 0, 0, 0, 0x22], asked[0], OUR_IP)));
        assert_eq!(c.pending(), vec![asked[1]]);
        assert!(!c.is_done());
        assert!(c.handle_frame(&reply([2, 0, 0, 0, 0, 3], asked[1], OUR_IP)));
        assert!(c.is_done());
        let found = c.into_found();
        assert_eq!(found[&asked[0]], [2, 0, 0, 0, 0, 2]);
        assert_eq!(found[&asked[1]], [2, 0, 0, 0, 0, 3]);
    }

    #[test]
    fn an_empty_sweep_is_done_at_once() {
        let c = Collector::new(OUR_IP, []);
        assert!(c.is_done());
        assert!(c.pending().is_empty());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_handled_without_panic(frame in proptest::collection::vec(proptest::num::u8::ANY, 0..128)) {
            let mut c = Collector::new(OUR_IP, [Ipv4Addr::new(10, 88, 0, 2)]);
            let _ = parse_reply(&frame);
            let _ = c.handle_frame(&frame);
        }
    }
}
