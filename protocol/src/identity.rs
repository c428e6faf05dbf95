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

    #[test]
    fn mac_round_trip() {
        let mac = parse_mac("02:88:00:00:00:0a\n").unwrap();
        assert_eq!(format_mac(&mac), "02:88:00:00:00:0a");
        assert_eq!(parse_mac("02:88:00"), None);
        assert_eq!(parse_mac("02:88:00:00:00:0a:ff"), None);
    }
}
