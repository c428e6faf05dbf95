//! The messages agent and controller exchange.
//!
//! Versioning rules: never change a shipped struct or variant; only append
//! enum variants (a minor version). The golden-byte tests at the bottom pin
//! the encoding so that a change to it is a conscious version bump.

use crate::identity::Identity;
use crate::version::ProtocolVersion;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Agent → controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    Hello(Hello),
    Report(Report),
    Heartbeat(Heartbeat),
    CommandResult(CommandResult),
    Goodbye(Goodbye),
    /// Since 1.1: asks for a new client certificate before the current one
    /// expires.
    RenewCertificate(RenewCertificate),
}

/// The tag postcard gives [`AgentMessage::Heartbeat`]: its variant index,
/// pinned by the golden tests like the rest of the encoding.
const HEARTBEAT_TAG: u8 = 2;

impl AgentMessage {
    /// Whether `frame` is a `Heartbeat` that [`crate::decode_frame`] would
    /// accept, checked without building the message: the most frequent
    /// frame of an established session is handled without allocating.
    pub fn is_heartbeat_frame(frame: &[u8], max: usize) -> bool {
        crate::frame::decode_header(frame, max).is_ok()
            && frame.get(crate::frame::HEADER_LEN) == Some(&HEARTBEAT_TAG)
            && matches!(
                postcard::take_from_bytes::<Heartbeat>(&frame[crate::frame::HEADER_LEN + 1..]),
                Ok((_, rest)) if rest.is_empty()
            )
    }
}

/// Controller → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControllerMessage {
    Welcome(Welcome),
    Ack(Ack),
    Command(Command),
    Reject(Reject),
    /// Since 1.1: the answer to `RenewCertificate`.
    Certificate(IssuedCertificate),
    /// Since 1.1: `RenewCertificate` could not be answered now; the agent
    /// asks again later.
    RenewRefused(RenewRefused),
}

/// The agent's first message on every connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub identity: Identity,
    /// Versions the agent speaks, in any order.
    pub versions: Vec<ProtocolVersion>,
    /// The highest sequence number the controller acknowledged to this agent
    /// (0: none). Reports above it are resent after the handshake.
    pub last_acked_seq: u64,
}

/// A report of the robot's state. Sent on change and periodically; kept in
/// the agent's durable outbox until acknowledged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Per-agent sequence number, from 1, without gaps.
    pub seq: u64,
    /// When the agent made the report (Unix time, milliseconds).
    pub time_ms: i64,
    pub health: AgentHealth,
    pub workload: WorkloadState,
    /// Whether the agent is holding the robot in maintenance.
    pub maintenance: bool,
    pub telemetry: Telemetry,
}

/// The agent's own view of its health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentHealth {
    pub status: HealthStatus,
    /// Why the status is not `Healthy`, in words an operator can read.
    pub reasons: Vec<String>,
}

/// Health of a robot: an attribute beside its lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HealthStatus {
    Healthy,
    Degraded,
    /// Silent for longer than expected; not yet confirmed gone.
    Suspect,
    /// Confirmed unreachable.
    Unreachable,
}

impl HealthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Suspect => "suspect",
            HealthStatus::Unreachable => "unreachable",
        }
    }
}

/// Whether the robot's main service (its workload) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WorkloadState {
    Running,
    Stopped,
    Failed,
    /// No workload unit is configured on this robot.
    NotConfigured,
    Unknown,
}

impl WorkloadState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadState::Running => "running",
            WorkloadState::Stopped => "stopped",
            WorkloadState::Failed => "failed",
            WorkloadState::NotConfigured => "not_configured",
            WorkloadState::Unknown => "unknown",
        }
    }
}

/// Telemetry read from `/proc` and `/sys`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Telemetry {
    pub load_1m: f32,
    pub load_5m: f32,
    pub load_15m: f32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub disk_total_bytes: u64,
    pub disk_available_bytes: u64,
    /// SoC temperature in °C, when the robot has a thermal zone.
    pub temperature_c: Option<f32>,
    pub uptime_s: u64,
    pub network: Vec<NetCounters>,
}

/// Byte counters of one network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    pub interface: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Liveness only: never stored as an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The agent's clock (Unix time, milliseconds), to show clock skew.
    pub time_ms: i64,
}

/// The outcome of a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub command_id: Uuid,
    pub outcome: CommandOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutcome {
    Done,
    Failed { error: String },
}

/// The agent is leaving on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye {
    pub reason: String,
    /// Planned downtime (e.g. charging): expected back within this many
    /// seconds, and not a failure until then.
    pub back_in_s: Option<u32>,
}

/// A certificate request (DER, PKCS#10) for the robot's key; the controller
/// issues the certificate for the robot of the connection's current one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewCertificate {
    pub csr_der: Vec<u8>,
}

/// A renewed client certificate (DER).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    pub cert_der: Vec<u8>,
    /// When it expires (Unix time, milliseconds).
    pub not_after_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewRefused {
    pub reason: String,
}

/// The controller's answer to a valid `Hello`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub session_id: Uuid,
    /// The version both sides speak from now on.
    pub version: ProtocolVersion,
    pub heartbeat_interval_ms: u32,
    pub config: DesiredConfig,
}

/// What the controller wants the robot to be: reconciled idempotently by the
/// agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DesiredConfig {
    /// Hold the robot in maintenance (workload stopped).
    pub maintenance: bool,
    /// How often to send a periodic report even when nothing changed.
    pub report_interval_ms: u32,
    /// Free-form settings the operator gave this robot.
    pub settings: Vec<(String, String)>,
}

/// The highest contiguous sequence number the controller has stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub command_id: Uuid,
    pub kind: CommandKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandKind {
    /// Apply this configuration and report ready.
    Provision {
        config: DesiredConfig,
    },
    EnterMaintenance,
    LeaveMaintenance,
    RestartWorkload,
    Ping,
}

impl CommandKind {
    pub fn name(&self) -> &'static str {
        match self {
            CommandKind::Provision { .. } => "provision",
            CommandKind::EnterMaintenance => "enter_maintenance",
            CommandKind::LeaveMaintenance => "leave_maintenance",
            CommandKind::RestartWorkload => "restart_workload",
            CommandKind::Ping => "ping",
        }
    }
}

/// The controller refuses the connection (and closes it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    pub reason: RejectReason,
    /// Do not reconnect before this many milliseconds (plus jitter).
    pub retry_after_ms: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// None of the offered versions is spoken here; these are.
    UnsupportedVersion { supported: Vec<ProtocolVersion> },
    /// The controller is shedding load.
    Overloaded,
    /// The peer broke the protocol (e.g. a `Report` before `Hello`).
    ProtocolViolation { detail: String },
    /// The controller is shutting down.
    ShuttingDown,
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejectReason::UnsupportedVersion { supported } => {
                let list: Vec<String> = supported.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "unsupported protocol version (controller speaks {})",
                    list.join(", ")
                )
            }
            RejectReason::Overloaded => f.write_str("controller overloaded"),
            RejectReason::ProtocolViolation { detail } => write!(f, "protocol violation: {detail}"),
            RejectReason::ShuttingDown => f.write_str("controller shutting down"),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Golden bytes: if one of these fails, the wire format changed. That is
    //! only allowed together with a new protocol version (see version.rs).

    use super::*;
    use crate::frame::{DEFAULT_MAX_FRAME, decode_frame, encode_frame};
    use crate::identity::{HardwareId, RobotId, RobotType};
    use crate::version::{CURRENT, ProtocolVersion};

    /// The version the first goldens were written at: their bytes must
    /// never change.
    const V1_0: ProtocolVersion = ProtocolVersion::new(1, 0);
    use std::net::{IpAddr, Ipv4Addr};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn golden<T>(msg: &T, expected_hex: &str)
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        golden_at(V1_0, msg, expected_hex);
    }

    fn golden_at<T>(version: ProtocolVersion, msg: &T, expected_hex: &str)
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let bytes = encode_frame(version, msg, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(hex(&bytes), expected_hex, "encoding of {msg:?} changed");
        let (_, back): (_, T) = decode_frame(&bytes, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(&back, msg);
    }

    fn identity() -> Identity {
        let hw = HardwareId::PiSerial("c0ffee".into());
        Identity {
            robot_id: RobotId(Uuid::from_u128(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10)),
            hardware_id: hw,
            hostname: "kiwi1".into(),
            robot_type: RobotType::Lekiwi,
            model: Some("Pi5".into()),
            os_version: None,
            agent_version: "0.1.0".into(),
            mac_addresses: vec![[2, 0x88, 0, 0, 0, 1]],
            ip_addresses: vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))],
        }
    }

    #[test]
    fn golden_hello() {
        golden(
            &AgentMessage::Hello(Hello {
                identity: identity(),
                versions: vec![V1_0],
                last_acked_seq: 300,
            }),
            "4b4957490100\
             00\
             100102030405060708090a0b0c0d0e0f10\
             0006633066666565\
             056b69776931\
             00\
             0103506935\
             00\
             05302e312e30\
             01028800000001\
             01007f000001\
             010100\
             ac02",
        );
    }

    #[test]
    fn golden_report() {
        golden(
            &AgentMessage::Report(Report {
                seq: 7,
                time_ms: 1_700_000_000_000,
                health: AgentHealth {
                    status: HealthStatus::Degraded,
                    reasons: vec!["hot".into()],
                },
                workload: WorkloadState::Running,
                maintenance: false,
                telemetry: Telemetry {
                    load_1m: 0.5,
                    load_5m: 0.25,
                    load_15m: 0.0,
                    memory_total_bytes: 1024,
                    memory_available_bytes: 512,
                    disk_total_bytes: 10,
                    disk_available_bytes: 5,
                    temperature_c: Some(50.0),
                    uptime_s: 60,
                    network: vec![NetCounters {
                        interface: "eth0".into(),
                        rx_bytes: 1,
                        tx_bytes: 2,
                    }],
                },
            }),
            "4b4957490100\
             01\
             07\
             80a0abfef962\
             01\
             0103686f74\
             00\
             00\
             0000003f\
             0000803e\
             00000000\
             8008\
             8004\
             0a\
             05\
             0100004842\
             3c\
             010465746830\
             0102",
        );
    }

    #[test]
    fn golden_small_messages() {
        golden(
            &AgentMessage::Heartbeat(Heartbeat { time_ms: -1 }),
            "4b495749010002\
             01",
        );
        golden(
            &AgentMessage::Goodbye(Goodbye {
                reason: "charging".into(),
                back_in_s: Some(600),
            }),
            "4b495749010004\
             086368617267696e67\
             01d804",
        );
        golden(
            &AgentMessage::CommandResult(CommandResult {
                command_id: Uuid::from_u128(1),
                outcome: CommandOutcome::Failed { error: "no".into() },
            }),
            "4b495749010003\
             1000000000000000000000000000000001\
             01026e6f",
        );
        golden(
            &ControllerMessage::Ack(Ack { seq: 128 }),
            "4b4957490100018001",
        );
        golden(
            &ControllerMessage::Welcome(Welcome {
                session_id: Uuid::from_u128(2),
                version: V1_0,
                heartbeat_interval_ms: 250,
                config: DesiredConfig {
                    maintenance: true,
                    report_interval_ms: 30_000,
                    settings: vec![("a".into(), "b".into())],
                },
            }),
            "4b495749010000\
             1000000000000000000000000000000002\
             0100\
             fa01\
             01\
             b0ea01\
             0101610162",
        );
        golden(
            &ControllerMessage::Command(Command {
                command_id: Uuid::from_u128(3),
                kind: CommandKind::EnterMaintenance,
            }),
            "4b495749010002\
             1000000000000000000000000000000003\
             01",
        );
        golden(
            &ControllerMessage::Reject(Reject {
                reason: RejectReason::UnsupportedVersion {
                    supported: vec![V1_0],
                },
                retry_after_ms: Some(1000),
            }),
            "4b495749010003\
             00\
             010100\
             01e807",
        );
    }

    #[test]
    fn golden_certificate_renewal() {
        assert_eq!(CURRENT, ProtocolVersion::new(1, 1));
        golden_at(
            CURRENT,
            &AgentMessage::RenewCertificate(RenewCertificate {
                csr_der: vec![0x30, 0x01, 0x00],
            }),
            "4b495749010105\
             03300100",
        );
        golden_at(
            CURRENT,
            &ControllerMessage::Certificate(IssuedCertificate {
                cert_der: vec![0x30],
                not_after_ms: 1,
            }),
            "4b495749010104\
             0130\
             02",
        );
        golden_at(
            CURRENT,
            &ControllerMessage::RenewRefused(RenewRefused {
                reason: "busy".into(),
            }),
            "4b495749010105\
             0462757379",
        );
    }
}
