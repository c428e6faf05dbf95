//! The robot's identity: hardware id, host name, addresses, model, OS and
//! robot type, gathered from the system root and decided by the shared rules
//! of [`kiwi_protocol::identity`].

use super::SysRoot;
use crate::state::write_atomic;
use kiwi_protocol::identity::{
    self, HardwareId, HostClues, Identity, RobotId, RobotType, TypeDecision,
};
use std::io;
use std::net::IpAddr;
use std::path::Path;

pub use kiwi_protocol::identity::{REALSENSE_PRODUCT_IDS, pretty_name};

/// The file in the state directory that keeps a generated hardware id for
/// robots without a Pi serial or machine id.
pub const GENERATED_ID_FILE: &str = "hardware-id";

/// An identity and why the robot got its type.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbedIdentity {
    pub identity: Identity,
    pub type_decision: TypeDecision,
}

/// Probes the robot's identity under `root`. Only persisting a generated id
/// (when the robot has no hardware identity at all) can fail.
pub fn probe_identity(
    root: &SysRoot,
    state_dir: &Path,
    robot_type_override: Option<RobotType>,
) -> io::Result<ProbedIdentity> {
    let clues = host_clues(root, robot_type_override);
    if let Some(d) = &clues.declared_type
        && let Err(e) = d.trim().parse::<RobotType>()
    {
        tracing::warn!(declared = %d.trim(), error = %e, "ignoring the declared robot type");
    }
    let found = identity::identify_host(&clues);
    let hardware_id = match found.hardware_id {
        Some(id) => id,
        None => HardwareId::Configured(load_or_generate_id(state_dir)?),
    };
    let identity = Identity {
        robot_id: RobotId::from_hardware(&hardware_id),
        hardware_id,
        hostname: found.hostname.unwrap_or_else(|| "localhost".to_string()),
        robot_type: found.type_decision.robot_type,
        model: found.model,
        os_version: found.os_version,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        mac_addresses: mac_addresses(root),
        ip_addresses: live_ip_addresses(),
    };
    Ok(ProbedIdentity {
        identity,
        type_decision: found.type_decision,
    })
}

/// The identity clues under `root`, gathered by the shared
/// [`HostClues::gather`] (the controller's SSH fallback gathers the same
/// paths from a remote shell). A configured robot type stands in for the
/// declared one; on the live system the kernel's host name backs up the
/// files.
pub fn host_clues(root: &SysRoot, robot_type_override: Option<RobotType>) -> HostClues {
    let mut clues = HostClues::gather(|rel| root.read_bytes(rel), |rel| root.list(rel));
    if let Some(t) = robot_type_override {
        clues.declared_type = Some(t.as_str().to_string());
    }
    if clues.kernel_hostname.is_none() && root.is_live() {
        clues.kernel_hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok());
    }
    clues
}

/// The id generated once for a robot without hardware identity, kept in the
/// state directory so it stays the same across restarts.
pub fn load_or_generate_id(state_dir: &Path) -> io::Result<String> {
    let path = state_dir.join(GENERATED_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic()) {
                return Ok(id.to_string());
            }
            tracing::warn!(path = %path.display(), "generated hardware id file is malformed; making a new id");
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    std::fs::create_dir_all(state_dir)?;
    write_atomic(&path, format!("{id}\n").as_bytes())?;
    tracing::warn!(
        path = %path.display(),
        id = %id,
        "no Pi serial or machine id found; generated a hardware id (keep the state directory to keep the robot's id)"
    );
    Ok(id)
}

fn mac_addresses(root: &SysRoot) -> Vec<[u8; 6]> {
    let mut macs = Vec::new();
    for iface in root.list("sys/class/net") {
        if iface == "lo" {
            continue;
        }
        let Some(text) = root.read_text(&format!("sys/class/net/{iface}/address")) else {
            continue;
        };
        match identity::parse_mac(&text) {
            Some(mac) if mac != [0; 6] && !macs.contains(&mac) => macs.push(mac),
            Some(_) => {}
            None => tracing::debug!(interface = %iface, "malformed MAC address"),
        }
        if macs.len() == identity::MAX_MAC_ADDRESSES {
            break;
        }
    }
    macs
}

/// The live system's non-loopback addresses (link-local IPv6 left out: it
/// is useless without its interface).
fn live_ip_addresses() -> Vec<IpAddr> {
    let addrs = match nix::ifaddrs::getifaddrs() {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(error = %e, "getifaddrs failed");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for a in addrs {
        let Some(addr) = a.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let link_local_v6 = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
        if ip.is_loopback() || ip.is_unspecified() || link_local_v6 || out.contains(&ip) {
            continue;
        }
        out.push(ip);
        if out.len() == identity::MAX_IP_ADDRESSES {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::testtree::{PI_CPUINFO, write};

    fn probe(root: &Path, state: &Path) -> ProbedIdentity {
        probe_identity(&SysRoot::new(root), state, None).unwrap()
    }

    #[test]
    fn lekiwi_tree() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let r = root.path();
        write(r, "proc/cpuinfo", PI_CPUINFO);
        write(
            r,
            "proc/device-tree/model",
            "Raspberry Pi 5 Model B Rev 1.0\0",
        );
        write(r, "dev/ttyACM0", "");
        write(r, "dev/tty1", "");
        write(r, "etc/hostname", "kiwi-07\n");
        write(
            r,
            "etc/os-release",
            "NAME=\"Debian\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
        );
        write(r, "etc/machine-id", "0123456789abcdef0123456789abcdef\n");
        write(r, "sys/class/net/eth0/address", "d8:3a:dd:00:00:01\n");
        write(r, "sys/class/net/lo/address", "00:00:00:00:00:00\n");
        write(r, "sys/class/net/wlan0/address", "00:00:00:00:00:00\n");
        let p = probe(r, state.path());
        let id = &p.identity;
        assert_eq!(
            id.hardware_id,
            HardwareId::PiSerial("10000000c0ffee01".into())
        );
        assert_eq!(id.robot_id, RobotId::from_hardware(&id.hardware_id));
        assert_eq!(
            id.robot_type,
            RobotType::Lekiwi,
            "{}",
            p.type_decision.reason
        );
        assert_eq!(id.hostname, "kiwi-07");
        assert_eq!(id.model.as_deref(), Some("Raspberry Pi 5 Model B Rev 1.0"));
        assert_eq!(
            id.os_version.as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(id.mac_addresses, vec![[0xd8, 0x3a, 0xdd, 0, 0, 1]]);
        assert_eq!(id.agent_version, env!("CARGO_PKG_VERSION"));
        // A Pi serial needs no generated id.
        assert!(!state.path().join(GENERATED_ID_FILE).exists());
    }

    #[test]
    fn xlerobot_tree_and_overrides() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let r = root.path();
        write(
            r,
            "sys/firmware/devicetree/base/serial-number",
            "00000000abcd1234\0",
        );
        write(r, "dev/ttyACM0", "");
        write(r, "dev/ttyACM1", "");
        write(r, "sys/bus/usb/devices/2-1/idVendor", "8086\n");
        write(r, "sys/bus/usb/devices/2-1/idProduct", "0b3a\n");
        write(
            r,
            "sys/bus/usb/devices/2-1/product",
            "Intel(R) RealSense(TM) Depth Camera 435i\n",
        );
        write(r, "sys/bus/usb/devices/1-1/idVendor", "1a86\n");
        write(r, "proc/sys/kernel/hostname", "xle-1\n");
        let p = probe(r, state.path());
        assert_eq!(
            p.identity.hardware_id,
            HardwareId::PiSerial("abcd1234".into())
        );
        assert_eq!(
            p.identity.robot_type,
            RobotType::Xlerobot,
            "{}",
            p.type_decision.reason
        );
        assert_eq!(p.identity.hostname, "xle-1");

        // The camera found by its product id alone, or by its v4l name.
        let realsense = || host_clues(&SysRoot::new(r), None).realsense();
        std::fs::remove_file(r.join("sys/bus/usb/devices/2-1/product")).unwrap();
        assert!(realsense());
        std::fs::remove_dir_all(r.join("sys/bus/usb")).unwrap();
        assert!(!realsense());
        write(
            r,
            "dev/v4l/by-id/usb-Intel_R__RealSense_TM__Depth_Camera_435i-video-index0",
            "",
        );
        assert!(realsense());

        // The config override and the declared file win over the clues.
        let p = probe_identity(&SysRoot::new(r), state.path(), Some(RobotType::Lekiwi)).unwrap();
        assert_eq!(p.identity.robot_type, RobotType::Lekiwi);
        write(r, "etc/kiwi/robot-type", "unknown\n");
        assert_eq!(
            probe(r, state.path()).identity.robot_type,
            RobotType::Unknown
        );
    }

    #[test]
    fn machine_id_only() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        write(
            root.path(),
            "etc/machine-id",
            "0123456789ABCDEF0123456789abcdef\n",
        );
        let p = probe(root.path(), state.path());
        assert_eq!(
            p.identity.hardware_id,
            HardwareId::MachineId("0123456789abcdef0123456789abcdef".into())
        );
        assert_eq!(p.identity.robot_type, RobotType::Unknown);
        assert_eq!(p.identity.model, None);
    }

    #[test]
    fn nothing_at_all_gets_a_stable_generated_id() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let a = probe(root.path(), state.path()).identity;
        let b = probe(root.path(), state.path()).identity;
        assert!(matches!(a.hardware_id, HardwareId::Configured(_)));
        assert_eq!(a.hardware_id, b.hardware_id);
        assert_eq!(a.robot_id, b.robot_id);
        assert_eq!(a.hostname, "localhost");
        assert_eq!(a.os_version, None);
        assert!(a.mac_addresses.is_empty());
        // Another state directory is another robot.
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            probe(root.path(), other.path()).identity.robot_id,
            a.robot_id
        );
    }

    #[test]
    fn garbage_files_never_panic() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let r = root.path();
        write(r, "proc/cpuinfo", [0xff, 0xfe, 0x00, 0x80]);
        write(r, "proc/device-tree/serial-number", "zzzz\0");
        write(r, "proc/device-tree/model", [0xc3, 0x28]);
        write(r, "etc/machine-id", "not-a-machine-id");
        write(r, "etc/hostname", "\n\n");
        write(r, "etc/os-release", "PRETTY_NAME=\n=\n");
        write(r, "etc/kiwi/robot-type", "tank");
        write(r, "sys/class/net/eth0/address", "zz:zz");
        write(r, "sys/bus/usb/devices/1-1/idVendor", [0xff; 10]);
        // A directory where a file is expected.
        std::fs::create_dir_all(r.join("sys/class/net/eth1/address")).unwrap();
        std::fs::write(state.path().join(GENERATED_ID_FILE), "\n").unwrap();
        let p = probe(r, state.path());
        assert!(matches!(p.identity.hardware_id, HardwareId::Configured(_)));
        assert_eq!(p.identity.robot_type, RobotType::Unknown);
        assert_eq!(p.identity.model, None);
        assert_eq!(p.identity.os_version, None);
        assert!(p.identity.mac_addresses.is_empty());
        assert_eq!(p.identity.hostname, "localhost");
    }

    #[test]
    fn os_release_pretty_name() {
        assert_eq!(
            pretty_name("ID=debian\nPRETTY_NAME='Raspbian 11'\n").as_deref(),
            Some("Raspbian 11")
        );
        assert_eq!(pretty_name("ID=debian\n"), None);
    }
}
