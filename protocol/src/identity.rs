//! Robot identity: the types, and the pure rules that turn clues found on a
//! robot into a stable id and a robot type.
//!
//! The agent's probes and the controller's SSH fallback gather the same clues
//! (file contents and device names) and pass them here, so that a robot is
//! identified one way whichever path found it. Nothing here reads a file.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use uuid::Uuid;

/// The namespace of version-5 robot ids. Changing it would give every robot
/// of every fleet a new id: never change it.
pub const ROBOT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6b69_7769_2d72_6f62_6f74_2d69_6473_0001);

/// A robot's stable id: a version-5 UUID of its hardware identity, so that
/// re-installing the agent, a DHCP change or a new hostname never makes a
/// second robot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RobotId(pub Uuid);

impl RobotId {
    /// The id a robot with this hardware identity has everywhere.
    pub fn from_hardware(id: &HardwareId) -> Self {
        RobotId(Uuid::new_v5(&ROBOT_ID_NAMESPACE, id.canonical().as_bytes()))
    }
}

impl fmt::Display for RobotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for RobotId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(RobotId)
    }
}

/// Where a robot's identity comes from, strongest first.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HardwareId {
    /// The Raspberry Pi's board serial (`/proc/cpuinfo` or the device tree),
    /// lower-case hex without leading zeros.
    PiSerial(String),
    /// `/etc/machine-id`: stable across reboots, changes on re-flashing.
    MachineId(String),
    /// A name given by configuration (used for simulated robots).
    Configured(String),
}

impl HardwareId {
    /// The string the robot id is derived from.
    pub fn canonical(&self) -> String {
        match self {
            HardwareId::PiSerial(s) => format!("pi-serial:{s}"),
            HardwareId::MachineId(s) => format!("machine-id:{s}"),
            HardwareId::Configured(s) => format!("configured:{s}"),
        }
    }
}

/// The kinds of robot kiwi knows. Names are the read model's `robot_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RobotType {
    Lekiwi,
    Xlerobot,
    Unknown,
}

impl RobotType {
    pub const ALL: [RobotType; 3] = [RobotType::Lekiwi, RobotType::Xlerobot, RobotType::Unknown];

    pub fn as_str(self) -> &'static str {
        match self {
            RobotType::Lekiwi => "lekiwi",
            RobotType::Xlerobot => "xlerobot",
            RobotType::Unknown => "unknown",
        }
    }
}

impl fmt::Display for RobotType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RobotType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "lekiwi" => Ok(RobotType::Lekiwi),
            "xlerobot" => Ok(RobotType::Xlerobot),
            "unknown" => Ok(RobotType::Unknown),
            other => Err(format!(
                "unknown robot type {other:?} (expected lekiwi, xlerobot or unknown)"
            )),
        }
    }
}

/// Everything a robot says about itself when it connects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    pub robot_id: RobotId,
    pub hardware_id: HardwareId,
    pub hostname: String,
    pub robot_type: RobotType,
    /// Board model, e.g. "Raspberry Pi 5 Model B Rev 1.0".
    pub model: Option<String>,
    /// Firmware or OS image version, e.g. from `/etc/os-release`.
    pub os_version: Option<String>,
    pub agent_version: String,
    pub mac_addresses: Vec<[u8; 6]>,
    pub ip_addresses: Vec<IpAddr>,
}

/// The most MAC addresses an identity lists (a robot with more interfaces
/// sends its first ones).
pub const MAX_MAC_ADDRESSES: usize = 32;
/// The most IP addresses an identity lists.
pub const MAX_IP_ADDRESSES: usize = 64;
/// The longest host name (DNS names are at most 253 characters).
pub const MAX_HOSTNAME: usize = 253;
/// The longest hardware id (`canonical()`), model, OS version and agent
/// version, in bytes.
pub const MAX_HARDWARE_ID: usize = 192;
pub const MAX_TEXT: usize = 256;
pub const MAX_AGENT_VERSION: usize = 64;

impl Identity {
    /// What a controller checks of what an agent says about itself (in its
    /// `Hello` and when it enrolls): its id must be the one its hardware
    /// identity gives, and every field must be within its bound
    /// ([`Identity::check_bounds`]).
    pub fn check(&self) -> Result<(), String> {
        self.check_bounds()?;
        let expected = RobotId::from_hardware(&self.hardware_id);
        if self.robot_id != expected {
            return Err(format!(
                "robot id {} does not match hardware identity {} (expected {expected})",
                self.robot_id,
                self.hardware_id.canonical()
            ));
        }
        Ok(())
    }

    /// Whether every field is within its bound (the sizes above) and its
    /// strings are printable: what a controller accepts from a robot.
    pub fn check_bounds(&self) -> Result<(), String> {
        let printable = |t: &str| !t.chars().any(char::is_control);
        if self.hostname.is_empty()
            || self.hostname.len() > MAX_HOSTNAME
            || !printable(&self.hostname)
        {
            return Err(format!(
                "hostname must be 1 to {MAX_HOSTNAME} printable characters"
            ));
        }
        let hardware = self.hardware_id.canonical();
        if hardware.len() > MAX_HARDWARE_ID || !printable(&hardware) {
            return Err(format!(
                "hardware id must be at most {MAX_HARDWARE_ID} printable characters"
            ));
        }
        for (name, text) in [("model", &self.model), ("os_version", &self.os_version)] {
            if let Some(t) = text
                && (t.len() > MAX_TEXT || !printable(t))
            {
                return Err(format!(
                    "{name} must be at most {MAX_TEXT} printable characters"
                ));
            }
        }
        if self.agent_version.len() > MAX_AGENT_VERSION || !printable(&self.agent_version) {
            return Err(format!(
                "agent_version must be at most {MAX_AGENT_VERSION} printable characters"
            ));
        }
        if self.mac_addresses.len() > MAX_MAC_ADDRESSES {
            return Err(format!(
                "at most {MAX_MAC_ADDRESSES} MAC addresses, not {}",
                self.mac_addresses.len()
            ));
        }
        if self.ip_addresses.len() > MAX_IP_ADDRESSES {
            return Err(format!(
                "at most {MAX_IP_ADDRESSES} IP addresses, not {}",
                self.ip_addresses.len()
            ));
        }
        Ok(())
    }
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (as in `/sys/class/net/*/address`).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = text.trim().split(':');
    for byte in &mut out {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// The Pi serial from `/proc/cpuinfo` text (`Serial : 10000000abcdef01`).
/// All-zero serials (some boards and emulators) are no identity.
pub fn pi_serial_from_cpuinfo(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if key.trim().eq_ignore_ascii_case("serial") {
            normalise_serial(value)
        } else {
            None
        }
    })
}

/// The Pi serial from the device tree's `serial-number` (NUL-terminated).
pub fn pi_serial_from_device_tree(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?;
    normalise_serial(text.trim_end_matches('\0'))
}

fn normalise_serial(raw: &str) -> Option<String> {
    let s = raw.trim().to_ascii_lowercase();
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let s = s.trim_start_matches('0');
    (!s.is_empty()).then(|| s.to_string())
}

/// The board model from the device tree's `model` or a cpuinfo `Model` line.
pub fn board_model(device_tree_model: Option<&[u8]>, cpuinfo: Option<&str>) -> Option<String> {
    let from_dt = device_tree_model
        .and_then(|raw| std::str::from_utf8(raw).ok())
        .map(|s| s.trim_end_matches('\0').trim().to_string())
        .filter(|s| !s.is_empty());
    from_dt.or_else(|| {
        cpuinfo?.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim().eq_ignore_ascii_case("model") && !value.trim().is_empty())
                .then(|| value.trim().to_string())
        })
    })
}

/// Picks the strongest hardware identity among the clues: the Pi serial
/// (cpuinfo, then device tree), else the machine id.
pub fn choose_hardware_id(
    cpuinfo: Option<&str>,
    device_tree_serial: Option<&[u8]>,
    machine_id: Option<&str>,
) -> Option<HardwareId> {
    cpuinfo
        .and_then(pi_serial_from_cpuinfo)
        .or_else(|| device_tree_serial.and_then(pi_serial_from_device_tree))
        .map(HardwareId::PiSerial)
        .or_else(|| {
            let m = machine_id?.trim().to_ascii_lowercase();
            (m.len() == 32
                && m.chars().all(|c| c.is_ascii_hexdigit())
                && m.chars().any(|c| c != '0'))
            .then_some(HardwareId::MachineId(m))
        })
}

/// What the robot-type rule looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeClues {
    /// An explicit type from configuration or `/etc/kiwi/robot-type`.
    pub declared: Option<String>,
    /// Names of serial devices under `/dev` (e.g. `ttyACM0`).
    pub serial_devices: Vec<String>,
    /// Whether an Intel RealSense camera is attached (USB vendor 8086 with a
    /// RealSense product, or a `/dev/v4l/by-id` name mentioning RealSense).
    pub realsense: bool,
    /// Number of servos found on the motor bus, when something counted them.
    pub servo_count: Option<u32>,
}

/// The result of the robot-type rule, with the reason an operator can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeDecision {
    pub robot_type: RobotType,
    pub reason: String,
}

/// Whether a `/dev` name is a serial motor bus: `ttyACM*` (USB CDC adapters
/// of Feetech/Dynamixel buses) or `ttyAMA*` (the Pi's UART).
pub fn is_motor_bus(dev_name: &str) -> bool {
    dev_name.starts_with("ttyACM") || dev_name.starts_with("ttyAMA")
}

/// The robot-type rule: a declared type wins; two motor buses and a
/// RealSense camera make an XLERobot; one motor bus (with 9 servos when they
/// were counted) makes a LeKiwi; anything else is unknown.
pub fn detect_robot_type(clues: &TypeClues) -> TypeDecision {
    if let Some(declared) = &clues.declared
        && let Ok(t) = declared.parse::<RobotType>()
    {
        return TypeDecision {
            robot_type: t,
            reason: format!("declared as {t}"),
        };
    }
    let mut buses: Vec<&str> = clues
        .serial_devices
        .iter()
        .map(String::as_str)
        .filter(|d| is_motor_bus(d))
        .collect();
    buses.sort_unstable();
    if buses.len() >= 2 && clues.realsense {
        return TypeDecision {
            robot_type: RobotType::Xlerobot,
            reason: format!(
                "two arm buses ({}) and a RealSense camera",
                buses.join(", ")
            ),
        };
    }
    if !buses.is_empty() {
        match clues.servo_count {
            Some(n) if n != 9 => {}
            Some(_) => {
                return TypeDecision {
                    robot_type: RobotType::Lekiwi,
                    reason: format!("motor bus {} with 9 servos", buses[0]),
                };
            }
            None if buses.len() == 1 => {
                return TypeDecision {
                    robot_type: RobotType::Lekiwi,
                    reason: format!("one motor bus ({})", buses[0]),
                };
            }
            None => {}
        }
    }
    TypeDecision {
        robot_type: RobotType::Unknown,
        reason: format!(
            "{} motor bus(es), {} RealSense camera{}",
            buses.len(),
            if clues.realsense { "a" } else { "no" },
            clues
                .servo_count
                .map(|n| format!(", {n} servos"))
                .unwrap_or_default()
        ),
    }
}

/// USB product ids of Intel RealSense cameras (vendor 8086), for devices
/// whose `product` string does not say so.
pub const REALSENSE_PRODUCT_IDS: &[&str] = &[
    "0ad1", "0ad2", "0ad3", "0ad4", "0ad5", "0af6", "0afe", "0aff", "0b00", "0b01", "0b03", "0b07",
    "0b0c", "0b0d", "0b3a", "0b3d", "0b48", "0b49", "0b4b", "0b4d", "0b52", "0b5b", "0b5c", "0b64",
    "0b68", "0b6a", "0b6b",
];

/// The files and directories under a system root that hold identity clues,
/// relative to the root. The agent reads them directly; the controller's SSH
/// fallback has a remote shell print them. [`HostClues::gather`] asks for
/// exactly these (and, per USB device, [`USB_DEVICE_FILES`]).
pub mod clue_paths {
    pub const CPUINFO: &str = "proc/cpuinfo";
    /// Device-tree serial numbers, in the order they are tried.
    pub const DEVICE_TREE_SERIALS: [&str; 2] = [
        "sys/firmware/devicetree/base/serial-number",
        "proc/device-tree/serial-number",
    ];
    pub const DEVICE_TREE_MODEL: &str = "proc/device-tree/model";
    pub const MACHINE_ID: &str = "etc/machine-id";
    pub const HOSTNAME: &str = "etc/hostname";
    pub const KERNEL_HOSTNAME: &str = "proc/sys/kernel/hostname";
    pub const OS_RELEASE: &str = "etc/os-release";
    pub const DECLARED_TYPE: &str = "etc/kiwi/robot-type";
    /// A directory: its entry names are the device names.
    pub const DEV: &str = "dev";
    /// A directory of USB devices, each a directory holding
    /// [`USB_DEVICE_FILES`](super::USB_DEVICE_FILES).
    pub const USB_DEVICES: &str = "sys/bus/usb/devices";
    /// A directory: names of video devices by id (RealSense cameras say so).
    pub const V4L_BY_ID: &str = "dev/v4l/by-id";
}

/// The files read in each USB device's directory.
pub const USB_DEVICE_FILES: [&str; 3] = ["idVendor", "idProduct", "product"];

/// At most this many USB devices are looked at (a robot has a handful).
pub const MAX_USB_DEVICES: usize = 64;

/// One USB device as sysfs describes it (`sys/bus/usb/devices/<name>`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsbDevice {
    /// The sysfs name, e.g. `2-1`.
    pub name: String,
    pub id_vendor: Option<String>,
    pub id_product: Option<String>,
    pub product: Option<String>,
}

impl UsbDevice {
    /// Whether this is an Intel RealSense camera: vendor 8086 and a product
    /// string or product id that says so.
    pub fn is_realsense(&self) -> bool {
        let norm = |s: &Option<String>| s.as_deref().map(|s| s.trim().to_ascii_lowercase());
        norm(&self.id_vendor).as_deref() == Some("8086")
            && (norm(&self.product).is_some_and(|p| p.contains("realsense"))
                || norm(&self.id_product)
                    .is_some_and(|p| REALSENSE_PRODUCT_IDS.contains(&p.as_str())))
    }
}

/// The raw clues a host yields about itself, as found under its system
/// root: file texts and directory entry names, not yet interpreted. The agent
/// gathers them from its own files, the controller's SSH fallback from a
/// remote shell's output; [`identify_host`] interprets both the same way.
///
/// A file that is missing or unreadable is `None`; a text file that is not
/// UTF-8 is `None` too (as if unreadable).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostClues {
    /// `proc/cpuinfo`.
    pub cpuinfo: Option<String>,
    /// The device-tree serial numbers found, in the order of
    /// [`clue_paths::DEVICE_TREE_SERIALS`] (raw bytes, NUL-terminated).
    pub device_tree_serials: Vec<Vec<u8>>,
    /// `proc/device-tree/model` (raw bytes, NUL-terminated).
    pub device_tree_model: Option<Vec<u8>>,
    /// `etc/machine-id`.
    pub machine_id: Option<String>,
    /// `etc/hostname`.
    pub hostname: Option<String>,
    /// `proc/sys/kernel/hostname` (or the live host name, where the gatherer
    /// can ask the kernel).
    pub kernel_hostname: Option<String>,
    /// `etc/os-release`.
    pub os_release: Option<String>,
    /// Entry names of `dev`.
    pub dev_names: Vec<String>,
    /// The devices of `sys/bus/usb/devices` that have an `idVendor`.
    pub usb_devices: Vec<UsbDevice>,
    /// Entry names of `dev/v4l/by-id`.
    pub v4l_by_id: Vec<String>,
    /// `etc/kiwi/robot-type`, or a type given by configuration.
    pub declared_type: Option<String>,
}

impl HostClues {
    /// Gathers the clues through `read` (the bytes of a file, path relative
    /// to the system root, `None` when unreadable) and `list` (the entry names
    /// of a directory, empty when it cannot be listed). Both programs gather
    /// through this one function, so they ask for the same paths.
    pub fn gather(
        read: impl Fn(&str) -> Option<Vec<u8>>,
        list: impl Fn(&str) -> Vec<String>,
    ) -> HostClues {
        let text = |rel: &str| read(rel).and_then(|b| String::from_utf8(b).ok());
        let usb_devices = list(clue_paths::USB_DEVICES)
            .into_iter()
            // Interfaces (`1-1:1.0`) have no idVendor; skip them unread.
            .filter(|name| !name.contains(':') && !name.contains('/'))
            .take(MAX_USB_DEVICES)
            .filter_map(|name| {
                let file = |f: &str| text(&format!("{}/{name}/{f}", clue_paths::USB_DEVICES));
                let id_vendor = file("idVendor")?;
                Some(UsbDevice {
                    id_vendor: Some(id_vendor),
                    id_product: file("idProduct"),
                    product: file("product"),
                    name,
                })
            })
            .collect();
        HostClues {
            cpuinfo: text(clue_paths::CPUINFO),
            device_tree_serials: clue_paths::DEVICE_TREE_SERIALS
                .iter()
                .filter_map(|p| read(p))
                .collect(),
            device_tree_model: read(clue_paths::DEVICE_TREE_MODEL),
            machine_id: text(clue_paths::MACHINE_ID),
            hostname: text(clue_paths::HOSTNAME),
            kernel_hostname: text(clue_paths::KERNEL_HOSTNAME),
            os_release: text(clue_paths::OS_RELEASE),
            dev_names: list(clue_paths::DEV),
            usb_devices,
            v4l_by_id: list(clue_paths::V4L_BY_ID),
            declared_type: text(clue_paths::DECLARED_TYPE),
        }
    }

    /// Whether a RealSense camera is attached (by USB, or by a
    /// `/dev/v4l/by-id` name mentioning RealSense).
    pub fn realsense(&self) -> bool {
        self.usb_devices.iter().any(UsbDevice::is_realsense)
            || self
                .v4l_by_id
                .iter()
                .any(|n| n.to_ascii_lowercase().contains("realsense"))
    }

    /// What the robot-type rule looks at.
    pub fn type_clues(&self) -> TypeClues {
        TypeClues {
            declared: self
                .declared_type
                .as_deref()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_string),
            serial_devices: self
                .dev_names
                .iter()
                .filter(|n| n.starts_with("tty"))
                .cloned()
                .collect(),
            realsense: self.realsense(),
            servo_count: None,
        }
    }
}

/// What the clues say about a host: everything of an [`Identity`] that the
/// host's files decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdentification {
    /// The strongest hardware identity, or `None` when the host has no Pi
    /// serial and no valid machine id (the agent then generates one; the SSH
    /// fallback cannot identify the host).
    pub hardware_id: Option<HardwareId>,
    pub type_decision: TypeDecision,
    /// The first line of `etc/hostname`, else of the kernel's host name.
    pub hostname: Option<String>,
    /// Board model, e.g. "Raspberry Pi 4 Model B Rev 1.4".
    pub model: Option<String>,
    /// `PRETTY_NAME` of os-release.
    pub os_version: Option<String>,
}

impl HostIdentification {
    /// The robot id of the hardware identity, when there is one.
    pub fn robot_id(&self) -> Option<RobotId> {
        self.hardware_id.as_ref().map(RobotId::from_hardware)
    }
}

/// The one interpretation of a host's clues, used by the agent's probe and
/// the controller's SSH fallback alike.
pub fn identify_host(clues: &HostClues) -> HostIdentification {
    let dt_serial = clues
        .device_tree_serials
        .iter()
        .find(|raw| pi_serial_from_device_tree(raw).is_some())
        .or(clues.device_tree_serials.first());
    let first_line = |text: &Option<String>| {
        text.as_deref()
            .and_then(|t| t.lines().next())
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_string)
    };
    HostIdentification {
        hardware_id: choose_hardware_id(
            clues.cpuinfo.as_deref(),
            dt_serial.map(Vec::as_slice),
            clues.machine_id.as_deref(),
        ),
        type_decision: detect_robot_type(&clues.type_clues()),
        hostname: first_line(&clues.hostname)
            .or_else(|| first_line(&clues.kernel_hostname))
            .map(|h| clamp(h, MAX_HOSTNAME)),
        model: board_model(clues.device_tree_model.as_deref(), clues.cpuinfo.as_deref())
            .map(|m| clamp(m, MAX_TEXT)),
        os_version: clues
            .os_release
            .as_deref()
            .and_then(pretty_name)
            .map(|v| clamp(v, MAX_TEXT)),
    }
}

/// `text` without control characters, cut to at most `max` bytes (on a
/// character boundary): what a host says about itself fits an
/// [`Identity`]'s bounds.
fn clamp(text: String, max: usize) -> String {
    let mut text: String = text.chars().filter(|c| !c.is_control()).collect();
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

/// `PRETTY_NAME` from os-release text, unquoted.
pub fn pretty_name(os_release: &str) -> Option<String> {
    os_release.lines().find_map(|line| {
        let value = line.trim().strip_prefix("PRETTY_NAME=")?;
        let v = value.trim().trim_matches('"').trim_matches('\'').trim();
        (!v.is_empty()).then(|| v.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_from_cpuinfo_and_device_tree() {
        let cpuinfo = "processor\t: 0\nHardware\t: BCM2835\nSerial\t\t: 10000000ABCDEF01\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n";
        assert_eq!(
            pi_serial_from_cpuinfo(cpuinfo).as_deref(),
            Some("10000000abcdef01")
        );
        assert_eq!(pi_serial_from_cpuinfo("Serial : 0000000000000000\n"), None);
        assert_eq!(
            pi_serial_from_device_tree(b"00000000c0ffee42\0").as_deref(),
            Some("c0ffee42")
        );
        assert_eq!(
            board_model(None, Some(cpuinfo)).as_deref(),
            Some("Raspberry Pi 4 Model B Rev 1.4")
        );
        assert_eq!(
            board_model(Some(b"Raspberry Pi 5 Model B Rev 1.0\0"), Some(cpuinfo)).as_deref(),
            Some("Raspberry Pi 5 Model B Rev 1.0")
        );
    }

    #[test]
    fn what_a_host_says_is_kept_within_the_bounds_an_identity_checks() {
        let long = format!("Pi {}\u{7}é", "x".repeat(MAX_TEXT));
        let clues = HostClues {
            hostname: Some(format!("{}\n", "h".repeat(300))),
            device_tree_model: Some(long.clone().into_bytes()),
            os_release: Some(format!("PRETTY_NAME=\"{long}\"\n")),
            machine_id: Some("0123456789abcdef0123456789abcdef".into()),
            ..Default::default()
        };
        let found = identify_host(&clues);
        let identity = Identity {
            robot_id: RobotId::from_hardware(found.hardware_id.as_ref().unwrap()),
            hardware_id: found.hardware_id.unwrap(),
            hostname: found.hostname.unwrap(),
            robot_type: found.type_decision.robot_type,
            model: found.model,
            os_version: found.os_version,
            agent_version: "0.1.0".into(),
            mac_addresses: vec![[2, 0, 0, 0, 0, 1]; MAX_MAC_ADDRESSES],
            ip_addresses: vec![],
        };
        assert_eq!(identity.check_bounds(), Ok(()));
        assert_eq!(identity.check(), Ok(()));
        assert_eq!(identity.hostname.len(), MAX_HOSTNAME);
        let claimed = Identity {
            robot_id: RobotId(uuid::Uuid::from_u128(7)),
            ..identity.clone()
        };
        assert!(claimed.check().unwrap_err().contains("does not match"));
        let too_many = Identity {
            mac_addresses: vec![[2, 0, 0, 0, 0, 1]; MAX_MAC_ADDRESSES + 1],
            ..identity.clone()
        };
        assert!(too_many.check_bounds().unwrap_err().contains("MAC"));
        let long_version = Identity {
            agent_version: "9".repeat(MAX_AGENT_VERSION + 1),
            ..identity
        };
        assert!(long_version.check_bounds().is_err());
    }

    #[test]
    fn identity_prefers_pi_serial_and_is_stable() {
        let a = choose_hardware_id(
            Some("Serial: 1000000012345678"),
            None,
            Some("0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        assert_eq!(a, HardwareId::PiSerial("1000000012345678".into()));
        let b = choose_hardware_id(None, None, Some("0123456789ABCDEF0123456789abcdef\n")).unwrap();
        assert_eq!(
            b,
            HardwareId::MachineId("0123456789abcdef0123456789abcdef".into())
        );
        assert_eq!(choose_hardware_id(None, None, Some("not-an-id")), None);
        // Pinned: this id must never change, or every robot gets a new one.
        assert_eq!(
            RobotId::from_hardware(&a).to_string(),
            RobotId::from_hardware(&HardwareId::PiSerial("1000000012345678".into())).to_string()
        );
        assert_ne!(RobotId::from_hardware(&a), RobotId::from_hardware(&b));
    }

    #[test]
    fn robot_type_rules() {
        let dev = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let lekiwi = TypeClues {
            serial_devices: dev(&["ttyACM0", "tty1"]),
            ..Default::default()
        };
        assert_eq!(detect_robot_type(&lekiwi).robot_type, RobotType::Lekiwi);
        let xle = TypeClues {
            serial_devices: dev(&["ttyACM0", "ttyACM1"]),
            realsense: true,
            ..Default::default()
        };
        assert_eq!(detect_robot_type(&xle).robot_type, RobotType::Xlerobot);
        let two_buses_no_camera = TypeClues {
            serial_devices: dev(&["ttyACM0", "ttyACM1"]),
            ..Default::default()
        };
        assert_eq!(
            detect_robot_type(&two_buses_no_camera).robot_type,
            RobotType::Unknown
        );
        let wrong_servos = TypeClues {
            serial_devices: dev(&["ttyAMA0"]),
            servo_count: Some(6),
            ..Default::default()
        };
        assert_eq!(
            detect_robot_type(&wrong_servos).robot_type,
            RobotType::Unknown
        );
        let declared = TypeClues {
            declared: Some("XLERobot".into()),
            ..Default::default()
        };
        assert_eq!(detect_robot_type(&declared).robot_type, RobotType::Xlerobot);
        assert_eq!(
            detect_robot_type(&TypeClues::default()).robot_type,
            RobotType::Unknown
        );
    }

    /// The clues of the contract's simulated LeKiwi (`/run/kiwi-robot`).
    fn lekiwi_clues() -> HostClues {
        HostClues {
            cpuinfo: Some(
                "processor\t: 0\nHardware\t: BCM2835\nRevision\t: c03114\n\
                 Serial\t\t: 100000000000a001\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
                    .into(),
            ),
            device_tree_serials: vec![b"100000000000a001\0".to_vec()],
            device_tree_model: Some(b"Raspberry Pi 4 Model B Rev 1.4\0".to_vec()),
            machine_id: Some("0123456789abcdef0123456789abcdef\n".into()),
            hostname: Some("lekiwi-1\n".into()),
            kernel_hostname: None,
            os_release: Some("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n".into()),
            dev_names: vec!["null".into(), "ttyACM0".into(), "ttyS0".into()],
            usb_devices: vec![],
            v4l_by_id: vec![],
            declared_type: None,
        }
    }

    #[test]
    fn identify_host_golden() {
        let id = identify_host(&lekiwi_clues());
        assert_eq!(
            id.hardware_id,
            Some(HardwareId::PiSerial("100000000000a001".into()))
        );
        // Pinned: the id every path (agent, SSH) must give this robot.
        assert_eq!(
            id.robot_id().unwrap().to_string(),
            "f1d8c0eb-8754-5be9-886e-cd43a70b263c"
        );
        assert_eq!(id.type_decision.robot_type, RobotType::Lekiwi);
        assert_eq!(id.type_decision.reason, "one motor bus (ttyACM0)");
        assert_eq!(id.hostname.as_deref(), Some("lekiwi-1"));
        assert_eq!(id.model.as_deref(), Some("Raspberry Pi 4 Model B Rev 1.4"));
        assert_eq!(
            id.os_version.as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );

        let mut xle = lekiwi_clues();
        xle.cpuinfo = Some("Serial : 100000000000b002\n".into());
        xle.dev_names.push("ttyACM1".into());
        xle.usb_devices = vec![UsbDevice {
            name: "2-1".into(),
            id_vendor: Some("8086\n".into()),
            id_product: Some("0b3a\n".into()),
            product: Some("Intel(R) RealSense(TM) Depth Camera 435i\n".into()),
        }];
        let id = identify_host(&xle);
        assert_eq!(
            id.robot_id().unwrap().to_string(),
            "70c02f33-2ab2-557a-b630-2cfdb3e177e0"
        );
        assert_eq!(id.type_decision.robot_type, RobotType::Xlerobot);
        assert_eq!(
            id.type_decision.reason,
            "two arm buses (ttyACM0, ttyACM1) and a RealSense camera"
        );
        // The cpuinfo model is used when the device tree has none.
        xle.device_tree_model = None;
        xle.cpuinfo = Some("Serial : 100000000000b002\nModel : Raspberry Pi 5\n".into());
        assert_eq!(identify_host(&xle).model.as_deref(), Some("Raspberry Pi 5"));
    }

    #[test]
    fn identify_host_fallbacks() {
        // No serial anywhere: the machine id; the kernel host name when
        // etc/hostname is blank; a declared type wins over the devices.
        let clues = HostClues {
            device_tree_serials: vec![b"zz\0".to_vec(), b"0000000000000000\0".to_vec()],
            machine_id: Some("0123456789ABCDEF0123456789abcdef".into()),
            hostname: Some("\n".into()),
            kernel_hostname: Some("from-kernel\n".into()),
            dev_names: vec!["ttyACM0".into()],
            declared_type: Some(" xlerobot\n".into()),
            ..Default::default()
        };
        let id = identify_host(&clues);
        assert_eq!(
            id.hardware_id,
            Some(HardwareId::MachineId(
                "0123456789abcdef0123456789abcdef".into()
            ))
        );
        assert_eq!(id.hostname.as_deref(), Some("from-kernel"));
        assert_eq!(id.type_decision.robot_type, RobotType::Xlerobot);
        assert_eq!(id.type_decision.reason, "declared as xlerobot");

        // The second device-tree serial counts when the first is garbage.
        let clues = HostClues {
            device_tree_serials: vec![b"zz\0".to_vec(), b"00000000abcd1234\0".to_vec()],
            ..Default::default()
        };
        assert_eq!(
            identify_host(&clues).hardware_id,
            Some(HardwareId::PiSerial("abcd1234".into()))
        );

        // Nothing at all: no identity, unknown type, nothing invented.
        let id = identify_host(&HostClues::default());
        assert_eq!(id.hardware_id, None);
        assert_eq!(id.robot_id(), None);
        assert_eq!(id.type_decision.robot_type, RobotType::Unknown);
        assert_eq!((id.hostname, id.model, id.os_version), (None, None, None));
    }

    #[test]
    fn gather_asks_for_the_clue_paths() {
        use std::collections::BTreeMap;
        let files: BTreeMap<&str, &[u8]> = [
            ("proc/cpuinfo", &b"Serial : 100000000000a001\n"[..]),
            ("proc/device-tree/serial-number", b"100000000000a001\0"),
            ("etc/hostname", b"xle-9\n"),
            ("etc/machine-id", &[0xff, 0xfe][..]),
            ("sys/bus/usb/devices/2-1/idVendor", b"8086\n"),
            ("sys/bus/usb/devices/2-1/idProduct", b"0b3a\n"),
            ("sys/bus/usb/devices/1-1/idVendor", b"1a86\n"),
        ]
        .into_iter()
        .collect();
        let dirs: BTreeMap<&str, Vec<&str>> = [
            ("dev", vec!["ttyACM0", "ttyACM1", "v4l"]),
            ("sys/bus/usb/devices", vec!["1-1", "2-1", "2-1:1.0", "usb1"]),
        ]
        .into_iter()
        .collect();
        let clues = HostClues::gather(
            |p| files.get(p).map(|b| b.to_vec()),
            |d| {
                dirs.get(d)
                    .map(|v| v.iter().map(|s| s.to_string()).collect())
                    .unwrap_or_default()
            },
        );
        assert_eq!(clues.device_tree_serials.len(), 1);
        // Not UTF-8: as if unreadable.
        assert_eq!(clues.machine_id, None);
        assert_eq!(
            clues
                .usb_devices
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>(),
            ["1-1", "2-1"]
        );
        assert!(clues.realsense());
        let id = identify_host(&clues);
        assert_eq!(id.type_decision.robot_type, RobotType::Xlerobot);
        assert_eq!(id.hostname.as_deref(), Some("xle-9"));
    }

    #[test]
    fn realsense_by_product_id_or_v4l_name() {
        let mut d = UsbDevice {
            name: "2-1".into(),
            id_vendor: Some("8086".into()),
            id_product: Some("0B3A".into()),
            product: None,
        };
        assert!(d.is_realsense());
        d.id_product = Some("1234".into());
        assert!(!d.is_realsense());
        d.product = Some("Intel RealSense D405".into());
        assert!(d.is_realsense());
        d.id_vendor = Some("1a86".into());
        assert!(!d.is_realsense());
        let clues = HostClues {
            v4l_by_id: vec!["usb-Intel_R__RealSense_TM__Depth_Camera_435i-video-index0".into()],
            ..Default::default()
        };
        assert!(clues.realsense());
        assert_eq!(
            pretty_name("ID=debian\nPRETTY_NAME='Raspbian 11'\n").as_deref(),
            Some("Raspbian 11")
        );
        assert_eq!(pretty_name("ID=debian\n"), None);
    }

    #[test]
    fn mac_round_trip() {
        let mac = parse_mac("02:88:00:00:00:0a\n").unwrap();
        assert_eq!(format_mac(&mac), "02:88:00:00:00:0a");
        assert_eq!(parse_mac("02:88:00"), None);
        assert_eq!(parse_mac("02:88:00:00:00:0a:ff"), None);
    }
}
