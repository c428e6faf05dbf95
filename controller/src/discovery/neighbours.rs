//! The kernel's view of the LAN, read over rtnetlink (never through an
//! `arp` or `ip` subprocess): the IPv4 neighbour table (which hosts the
//! kernel resolved, and how sure it is) and this host's IPv4 addresses per
//! interface (which interface is on a configured network, and the source
//! address to use there).
//!
//! Everything is read in the network namespace of the calling thread: the
//! netlink socket is opened where the call is made.

use futures_util::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourState as NudState,
};
use std::net::{IpAddr, Ipv4Addr};

/// How sure the kernel is of a neighbour (the `NUD_*` states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NeighbourState {
    /// Address resolution is in progress (no MAC yet).
    Incomplete,
    /// Confirmed recently (an ARP reply or upper-layer confirmation within
    /// the base reachable time).
    Reachable,
    /// The MAC is known but not confirmed recently: it may be gone.
    Stale,
    /// Stale and in use; waiting for an upper-layer confirmation.
    Delay,
    /// Stale and being re-confirmed by unicast ARP.
    Probe,
    /// Resolution failed: nobody answered.
    Failed,
    /// No resolution needed on this link.
    NoArp,
    /// Configured statically.
    Permanent,
    /// No state.
    None,
    /// A state this build does not name (a combination, or a newer one).
    Other(u16),
}

impl NeighbourState {
    /// The kernel confirmed the host within the last reachable time: the
    /// only state that proves a host is there now.
    pub fn is_confirmed(self) -> bool {
        self == NeighbourState::Reachable
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NeighbourState::Incomplete => "incomplete",
            NeighbourState::Reachable => "reachable",
            NeighbourState::Stale => "stale",
            NeighbourState::Delay => "delay",
            NeighbourState::Probe => "probe",
            NeighbourState::Failed => "failed",
            NeighbourState::NoArp => "noarp",
            NeighbourState::Permanent => "permanent",
            NeighbourState::None => "none",
            NeighbourState::Other(_) => "other",
        }
    }
}

impl From<NudState> for NeighbourState {
    fn from(state: NudState) -> Self {
        match state {
            NudState::Incomplete => NeighbourState::Incomplete,
            NudState::Reachable => NeighbourState::Reachable,
            NudState::Stale => NeighbourState::Stale,
            NudState::Delay => NeighbourState::Delay,
            NudState::Probe => NeighbourState::Probe,
            NudState::Failed => NeighbourState::Failed,
            NudState::Noarp => NeighbourState::NoArp,
            NudState::Permanent => NeighbourState::Permanent,
            NudState::None => NeighbourState::None,
            other => NeighbourState::Other(u16::from(other)),
        }
    }
}

/// One IPv4 entry of the kernel neighbour table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: Ipv4Addr,
    /// The link-layer address, when the kernel has one that is a MAC
    /// (failed and incomplete entries have none, or an all-zero one,
    /// which is reported as `None`).
    pub mac: Option<[u8; 6]>,
    pub state: NeighbourState,
    pub ifindex: u32,
}

/// One IPv4 address of this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalAddress {
    pub ifindex: u32,
    /// The address and the prefix of the interface's subnet.
    pub net: Ipv4Net,
}

impl LocalAddress {
    pub fn address(&self) -> Ipv4Addr {
        self.net.addr()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NeighbourError {
    #[error("cannot open a netlink socket: {0}")]
    Open(#[source] std::io::Error),
    #[error("netlink request failed: {0}")]
    Netlink(#[from] rtnetlink::Error),
}

/// A netlink connection in the calling thread's namespace, whose driver
/// task is stopped when this is dropped.
struct Connection {
    handle: rtnetlink::Handle,
    driver: tokio::task::JoinHandle<()>,
}

impl Connection {
    fn open() -> Result<Self, NeighbourError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NeighbourError::Open)?;
        Ok(Connection {
            handle,
            driver: tokio::spawn(connection),
        })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// The IPv4 neighbour table (`ip -4 neighbour show`).
pub async fn neighbours() -> Result<Vec<Neighbour>, NeighbourError> {
    let connection = Connection::open()?;
    let messages: Vec<_> = connection
        .handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute()
        .try_collect()
        .await?;
    Ok(messages
        .into_iter()
        .filter_map(|m| {
            let ip = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                _ => None,
            })?;
            let mac = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(lla) => mac_from_bytes(lla),
                _ => None,
            });
            Some(Neighbour {
                ip,
                mac,
                state: m.header.state.into(),
                ifindex: m.header.ifindex,
            })
        })
        .collect())
}

/// This host's IPv4 addresses (`ip -4 address show`), loopback included.
pub async fn local_addresses() -> Result<Vec<LocalAddress>, NeighbourError> {
    let connection = Connection::open()?;
    let mut request = connection.handle.address().get();
    request.message_mut().header.family = AddressFamily::Inet;
    let messages: Vec<_> = request.execute().try_collect().await?;
    Ok(messages
        .into_iter()
        .filter_map(|m| {
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the
            // peer's on point-to-point links, so prefer the former.
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let address = local.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })
            })?;
            let net = Ipv4Net::new(address, m.header.prefix_len).ok()?;
            Some(LocalAddress {
                ifindex: m.header.index,
                net,
            })
        })
        .collect())
}

/// A unicast MAC from a link-layer address attribute: six bytes, not all
/// zero, not multicast or broadcast.
pub fn mac_from_bytes(bytes: &[u8]) -> Option<[u8; 6]> {
    let mac: [u8; 6] = bytes.try_into().ok()?;
    is_unicast_mac(&mac).then_some(mac)
}

/// Not all zero and without the group bit (so not broadcast or multicast).
pub fn is_unicast_mac(mac: &[u8; 6]) -> bool {
    *mac != [0; 6] && mac[0] & 1 == 0
}

/// `02:88:00:00:00:0b`: the protocol's one formatting of a MAC address.
pub use kiwi_protocol::identity::format_mac;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_layer_addresses_that_are_not_unicast_macs_are_dropped() {
        assert_eq!(
            mac_from_bytes(&[2, 0x88, 0, 0, 0, 0x0b]),
            Some([2, 0x88, 0, 0, 0, 0x0b])
        );
        assert_eq!(mac_from_bytes(&[0; 6]), None);
        assert_eq!(mac_from_bytes(&[0xff; 6]), None);
        assert_eq!(mac_from_bytes(&[1, 0, 0x5e, 0, 0, 1]), None);
        assert_eq!(mac_from_bytes(&[2, 0x88, 0, 0, 0]), None);
        assert_eq!(mac_from_bytes(&[]), None);
    }

    #[test]
    fn states_map_from_the_kernel_values() {
        assert_eq!(
            NeighbourState::from(NudState::from(0x02)),
            NeighbourState::Reachable
        );
        assert_eq!(
            NeighbourState::from(NudState::from(0x20)),
            NeighbourState::Failed
        );
        assert_eq!(
            NeighbourState::from(NudState::from(0x06)),
            NeighbourState::Other(0x06)
        );
        assert!(NeighbourState::Reachable.is_confirmed());
        assert!(!NeighbourState::Stale.is_confirmed());
    }

    #[test]
    fn macs_are_formatted_in_lower_case_hex() {
        assert_eq!(format_mac(&[2, 0x88, 0, 0, 0, 0xab]), "02:88:00:00:00:ab");
    }
}
