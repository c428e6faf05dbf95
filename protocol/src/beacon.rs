//! The UDP beacon: the datagram an agent broadcasts on its subnet so that a
//! controller can see it (and, when the agent is looking for one, tell it
//! where to connect), and the controller's unicast answer.
//!
//! A datagram is `b"KWBN"`, the beacon format's version (major, minor: one
//! byte each) and a postcard-encoded [`Datagram`]. As with frames (see
//! [`crate::frame`]): the size cap ([`MAX_DATAGRAM`]) is checked before
//! anything is decoded, decoding never panics on any input, the body must be
//! consumed exactly, a minor version may only append enum variants, and
//! golden-byte tests pin the encoding. The beacon has its own magic and
//! version, independent of the link's: a beacon is never mistaken for a
//! frame, and either format can move on alone.
//!
//! Anything on the LAN can send datagrams to the beacon port: a receiver
//! treats every decoded field as a claim, not a fact (the source address of
//! the datagram is what the kernel saw).

use crate::identity::{RobotId, RobotType};
use crate::version::ProtocolVersion;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The UDP port beacons are sent to (and controllers listen on).
pub const BEACON_PORT: u16 = 8766;

/// The four bytes every beacon datagram starts with.
pub const MAGIC: [u8; 4] = *b"KWBN";

/// Length of the fixed header: magic and version.
pub const HEADER_LEN: usize = 6;

/// The version of the beacon format this build writes.
pub const VERSION: ProtocolVersion = ProtocolVersion::new(1, 0);

/// The cap on a datagram, header included: small enough for one unfragmented
/// IPv4 datagram on any Ethernet or Wi-Fi link (1500-byte MTU, less 28 bytes
/// of IP and UDP headers, with room to spare).
pub const MAX_DATAGRAM: usize = 1200;

/// Longest text field the encoder accepts (host names are at most 253
/// bytes; versions and fingerprints are far shorter).
pub const MAX_TEXT: usize = 255;

/// Most protocol versions one beacon lists.
pub const MAX_VERSIONS: usize = 16;

/// What an agent says about itself on the subnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beacon {
    pub robot_id: RobotId,
    pub robot_type: RobotType,
    pub hostname: String,
    pub agent_version: String,
    /// The link protocol versions the agent speaks.
    pub protocol_versions: Vec<ProtocolVersion>,
    /// The fingerprint of the agent's key (`SHA256:...`), once agents have
    /// one (enrollment).
    pub key_fingerprint: Option<String>,
    /// A TCP port the agent listens on, if any.
    pub listen_port: Option<u16>,
    /// Counts this agent process's beacons; a controller's answer echoes it.
    pub seq: u32,
    /// The agent is looking for a controller: controllers answer only
    /// beacons that ask.
    pub seeking: bool,
}

/// A controller's answer to a seeking beacon, sent by unicast to the
/// beacon's source address and port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The answering controller's id (stable for one controller process).
    pub controller_id: Uuid,
    /// Where agents connect: `wss://ip:port/path`.
    pub agent_endpoint: String,
    /// The `seq` of the beacon answered.
    pub seq: u32,
}

/// Everything that travels on the beacon port. Append variants only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Datagram {
    Beacon(Beacon),
    Answer(Answer),
}

impl Datagram {
    /// A short stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Datagram::Beacon(_) => "beacon",
            Datagram::Answer(_) => "answer",
        }
    }
}

/// Why a datagram was refused. The receiver counts it and drops it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BeaconError {
    #[error("datagram of {len} bytes exceeds the cap of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("datagram of {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    Truncated { len: usize },
    #[error("bad magic {found:02x?} (expected \"KWBN\")")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported beacon version {found}")]
    UnsupportedVersion { found: ProtocolVersion },
    #[error("malformed body: {0}")]
    Malformed(String),
    #[error("{extra} trailing bytes after the datagram")]
    TrailingBytes { extra: usize },
    #[error("datagram cannot be encoded: {0}")]
    Encode(String),
}

impl BeaconError {
    /// A short stable label for metrics (`reason` label values).
    pub fn kind(&self) -> &'static str {
        match self {
            BeaconError::TooLarge { .. } => "too_large",
            BeaconError::Truncated { .. } => "truncated",
            BeaconError::BadMagic { .. } => "bad_magic",
            BeaconError::UnsupportedVersion { .. } => "unsupported_version",
            BeaconError::Malformed(_) => "malformed",
            BeaconError::TrailingBytes { .. } => "trailing_bytes",
            BeaconError::Encode(_) => "encode",
        }
    }
}

/// Encodes one datagram, refusing text fields longer than [`MAX_TEXT`],
/// more than [`MAX_VERSIONS`] versions, and anything over [`MAX_DATAGRAM`].
pub fn encode(datagram: &Datagram) -> Result<Vec<u8>, BeaconError> {
    check_limits(datagram)?;
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION.major);
    out.push(VERSION.minor);
    let out = postcard::to_extend(datagram, out).map_err(|e| BeaconError::Encode(e.to_string()))?;
    if out.len() > MAX_DATAGRAM {
        return Err(BeaconError::TooLarge {
            len: out.len(),
            max: MAX_DATAGRAM,
        });
    }
    Ok(out)
}

fn check_limits(datagram: &Datagram) -> Result<(), BeaconError> {
    let too_long = |name: &str, text: &str| {
        (text.len() > MAX_TEXT).then(|| {
            BeaconError::Encode(format!(
                "{name} is {} bytes long (at most {MAX_TEXT})",
                text.len()
            ))
        })
    };
    let problem = match datagram {
        Datagram::Beacon(b) => too_long("hostname", &b.hostname)
            .or_else(|| too_long("agent_version", &b.agent_version))
            .or_else(|| {
                b.key_fingerprint
                    .as_deref()
                    .and_then(|f| too_long("key_fingerprint", f))
            })
            .or_else(|| {
                (b.protocol_versions.len() > MAX_VERSIONS).then(|| {
                    BeaconError::Encode(format!(
                        "{} protocol versions (at most {MAX_VERSIONS})",
                        b.protocol_versions.len()
                    ))
                })
            }),
        Datagram::Answer(a) => too_long("agent_endpoint", &a.agent_endpoint),
    };
    problem.map_or(Ok(()), Err)
}

/// Decodes one datagram: size cap first, then header, then the body, which
/// must be consumed exactly. Never panics.
pub fn decode(bytes: &[u8]) -> Result<Datagram, BeaconError> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(BeaconError::TooLarge {
            len: bytes.len(),
            max: MAX_DATAGRAM,
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(BeaconError::Truncated { len: bytes.len() });
    }
    let found = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if found != MAGIC {
        return Err(BeaconError::BadMagic { found });
    }
    let version = ProtocolVersion::new(bytes[4], bytes[5]);
    // A higher minor of the same major only appends variants, which then
    // fail to decode on their own.
    if version.major != VERSION.major {
        return Err(BeaconError::UnsupportedVersion { found: version });
    }
    let (datagram, rest) = postcard::take_from_bytes::<Datagram>(&bytes[HEADER_LEN..])
        .map_err(|e| BeaconError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(BeaconError::TrailingBytes { extra: rest.len() });
    }
    Ok(datagram)
}

/// The DNS-SD service type agents register (`controller = "auto"` or
/// `announce = true`).
pub const AGENT_SERVICE: &str = "_kiwi-agent._tcp.local.";

/// The DNS-SD service type controllers register; its SRV record names the
/// agent endpoint's port and its TXT record the path.
pub const CONTROLLER_SERVICE: &str = "_kiwi-ctl._tcp.local.";

/// The version of the TXT record layouts below (RFC 6763 `txtvers`).
pub const TXT_VERSION: &str = "1";

/// TXT record keys.
pub mod txt {
    pub const TXT_VERSION: &str = "txtvers";
    pub const ROBOT_ID: &str = "id";
    pub const ROBOT_TYPE: &str = "type";
    pub const HOSTNAME: &str = "host";
    pub const AGENT_VERSION: &str = "ver";
    pub const PROTOCOLS: &str = "proto";
    pub const FINGERPRINT: &str = "fp";
    pub const CONTROLLER_ID: &str = "id";
    pub const PATH: &str = "path";
}

/// Protocol versions as TXT text: `1.0,1.1`.
pub fn format_versions(versions: &[ProtocolVersion]) -> String {
    versions
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses `1.0,1.1`; at most [`MAX_VERSIONS`].
pub fn parse_versions(text: &str) -> Result<Vec<ProtocolVersion>, String> {
    let versions = text
        .split(',')
        .filter(|v| !v.trim().is_empty())
        .map(|v| {
            let (major, minor) = v
                .trim()
                .split_once('.')
                .ok_or_else(|| format!("invalid protocol version {v:?}"))?;
            let num = |n: &str| {
                n.parse::<u8>()
                    .map_err(|_| format!("invalid protocol version {v:?}"))
            };
            Ok(ProtocolVersion::new(num(major)?, num(minor)?))
        })
        .collect::<Result<Vec<_>, String>>()?;
    if versions.len() > MAX_VERSIONS {
        return Err(format!("more than {MAX_VERSIONS} protocol versions"));
    }
    Ok(versions)
}

/// The TXT record of an agent's `_kiwi-agent._tcp` service: what its beacon
/// says, apart from the beacon's sequence and seeking flag.
pub fn agent_txt(beacon: &Beacon) -> Vec<(String, String)> {
    let mut out = vec![
        (txt::TXT_VERSION.into(), TXT_VERSION.into()),
        (txt::ROBOT_ID.into(), beacon.robot_id.to_string()),
        (txt::ROBOT_TYPE.into(), beacon.robot_type.as_str().into()),
        (txt::HOSTNAME.into(), beacon.hostname.clone()),
        (txt::AGENT_VERSION.into(), beacon.agent_version.clone()),
        (
            txt::PROTOCOLS.into(),
            format_versions(&beacon.protocol_versions),
        ),
    ];
    if let Some(fp) = &beacon.key_fingerprint {
        out.push((txt::FINGERPRINT.into(), fp.clone()));
    }
    out
}

/// Reads an agent's TXT record back (`get` looks a key up). The robot id
/// is required; the rest defaults when missing. Values are claims of
/// whoever answered the query, checked for form only.
pub fn beacon_from_txt(get: impl Fn(&str) -> Option<String>) -> Result<Beacon, String> {
    let id = get(txt::ROBOT_ID).ok_or("no robot id in the TXT record")?;
    let robot_id = id
        .parse::<RobotId>()
        .map_err(|e| format!("invalid robot id {id:?}: {e}"))?;
    let robot_type = match get(txt::ROBOT_TYPE) {
        Some(t) => t.parse::<RobotType>()?,
        None => RobotType::Unknown,
    };
    let bounded = |key: &str| get(key).filter(|v| v.len() <= MAX_TEXT).unwrap_or_default();
    let protocol_versions = match get(txt::PROTOCOLS) {
        Some(v) => parse_versions(&v)?,
        None => Vec::new(),
    };
    Ok(Beacon {
        robot_id,
        robot_type,
        hostname: bounded(txt::HOSTNAME),
        agent_version: bounded(txt::AGENT_VERSION),
        protocol_versions,
        key_fingerprint: get(txt::FINGERPRINT).filter(|v| !v.is_empty() && v.len() <= MAX_TEXT),
        listen_port: None,
        seq: 0,
        seeking: false,
    })
}

/// What a controller's `_kiwi-ctl._tcp` TXT record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerTxt {
    pub controller_id: Uuid,
    /// The agent endpoint's path (`/agent`).
    pub path: String,
    pub protocol_versions: Vec<ProtocolVersion>,
}

impl ControllerTxt {
    pub fn to_txt(&self) -> Vec<(String, String)> {
        vec![
            (txt::TXT_VERSION.into(), TXT_VERSION.into()),
            (txt::CONTROLLER_ID.into(), self.controller_id.to_string()),
            (txt::PATH.into(), self.path.clone()),
            (
                txt::PROTOCOLS.into(),
                format_versions(&self.protocol_versions),
            ),
        ]
    }

    /// Reads the record back. A missing path means `/agent`; a path must
    /// start with `/` and be printable ASCII without spaces.
    pub fn from_txt(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let id = get(txt::CONTROLLER_ID).ok_or("no controller id in the TXT record")?;
        let controller_id =
            Uuid::parse_str(&id).map_err(|e| format!("invalid controller id {id:?}: {e}"))?;
        let path = get(txt::PATH).unwrap_or_else(|| "/agent".into());
        if !path.starts_with('/')
            || path.len() > MAX_TEXT
            || !path.chars().all(|c| c.is_ascii_graphic())
        {
            return Err(format!("invalid agent endpoint path {path:?}"));
        }
        let protocol_versions = match get(txt::PROTOCOLS) {
            Some(v) => parse_versions(&v)?,
            None => Vec::new(),
        };
        Ok(ControllerTxt {
            controller_id,
            path,
            protocol_versions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn beacon() -> Beacon {
        Beacon {
            robot_id: RobotId(Uuid::from_u128(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10)),
            robot_type: RobotType::Lekiwi,
            hostname: "lk-1".into(),
            agent_version: "0.1.0".into(),
            protocol_versions: vec![ProtocolVersion::new(1, 0)],
            key_fingerprint: None,
            listen_port: None,
            seq: 1,
            seeking: true,
        }
    }

    fn answer() -> Answer {
        Answer {
            controller_id: Uuid::from_u128(0xa0a1_a2a3_a4a5_a6a7_a8a9_aaab_acad_aeaf),
            agent_endpoint: "wss://10.88.0.1:8765/agent".into(),
            seq: 300,
        }
    }

    #[test]
    fn round_trip() {
        for d in [
            Datagram::Beacon(beacon()),
            Datagram::Beacon(Beacon {
                key_fingerprint: Some("SHA256:abc".into()),
                listen_port: Some(9000),
                robot_type: RobotType::Xlerobot,
                seeking: false,
                seq: u32::MAX,
                ..beacon()
            }),
            Datagram::Answer(answer()),
        ] {
            let bytes = encode(&d).unwrap();
            assert!(bytes.len() <= MAX_DATAGRAM);
            assert_eq!(decode(&bytes).unwrap(), d);
        }
    }

    /// The encoding is pinned: a change here is a new beacon version.
    #[test]
    fn golden_bytes() {
        let b = encode(&Datagram::Beacon(beacon())).unwrap();
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            &b"KWBN"[..], &[1, 0],
            &[0],                                   // Datagram::Beacon
            &[16, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], // robot id
            &[0],                                   // Lekiwi
            &[4], b"lk-1",
            &[5], b"0.1.0",
            &[1, 1, 0],                             // [1.0]
            &[0],                                   // no fingerprint
            &[0],                                   // no listen port
            &[1],                                   // seq
            &[1],                                   // seeking
        ]
        .concat();
        assert_eq!(b, expected);

        let a = encode(&Datagram::Answer(answer())).unwrap();
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            &b"KWBN"[..], &[1, 0],
            &[1],                                   // Datagram::Answer
            &[16, 0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7,
              0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf],
            &[26], b"wss://10.88.0.1:8765/agent",
            &[0xac, 0x02],                          // seq 300 (varint)
        ]
        .concat();
        assert_eq!(a, expected);
    }

    #[test]
    fn refuses_bad_header_size_and_trailing_bytes() {
        let good = encode(&Datagram::Beacon(beacon())).unwrap();

        let mut bad = good.clone();
        bad[0] = b'K';
        bad[1] = b'I';
        assert!(matches!(decode(&bad), Err(BeaconError::BadMagic { .. })));

        let mut bad = good.clone();
        bad[4] = 2;
        assert_eq!(
            decode(&bad).unwrap_err(),
            BeaconError::UnsupportedVersion {
                found: ProtocolVersion::new(2, 0)
            }
        );
        // A newer minor of the same major is read.
        let mut newer = good.clone();
        newer[5] = 3;
        assert!(decode(&newer).is_ok());

        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            decode(&trailing).unwrap_err(),
            BeaconError::TrailingBytes { extra: 1 }
        );
        assert_eq!(
            decode(&good[..4]).unwrap_err(),
            BeaconError::Truncated { len: 4 }
        );
        assert!(matches!(
            decode(&good[..good.len() - 1]),
            Err(BeaconError::Malformed(_))
        ));
        assert!(matches!(
            decode(&vec![0u8; MAX_DATAGRAM + 1]),
            Err(BeaconError::TooLarge { .. })
        ));
        // A link frame is not a beacon.
        assert!(matches!(
            decode(b"KIWI\x01\x00\x00"),
            Err(BeaconError::BadMagic { .. })
        ));
        // An unknown variant (appended by a newer minor) fails alone.
        assert!(matches!(
            decode(b"KWBN\x01\x01\x07"),
            Err(BeaconError::Malformed(_))
        ));
    }

    #[test]
    fn encoder_refuses_oversized_fields() {
        let long = Datagram::Beacon(Beacon {
            hostname: "h".repeat(MAX_TEXT + 1),
            ..beacon()
        });
        assert!(matches!(encode(&long), Err(BeaconError::Encode(_))));
        let many = Datagram::Beacon(Beacon {
            protocol_versions: vec![ProtocolVersion::new(1, 0); MAX_VERSIONS + 1],
            ..beacon()
        });
        assert!(matches!(encode(&many), Err(BeaconError::Encode(_))));
        // Every field at its limit still fits one datagram.
        let full = Datagram::Beacon(Beacon {
            hostname: "h".repeat(MAX_TEXT),
            agent_version: "v".repeat(MAX_TEXT),
            key_fingerprint: Some("f".repeat(MAX_TEXT)),
            protocol_versions: vec![ProtocolVersion::new(255, 255); MAX_VERSIONS],
            listen_port: Some(u16::MAX),
            seq: u32::MAX,
            ..beacon()
        });
        let bytes = encode(&full).unwrap();
        assert!(bytes.len() <= MAX_DATAGRAM, "{}", bytes.len());
        let long = Datagram::Answer(Answer {
            agent_endpoint: "x".repeat(MAX_TEXT + 1),
            ..answer()
        });
        assert!(matches!(encode(&long), Err(BeaconError::Encode(_))));
    }

    fn lookup(pairs: &[(String, String)]) -> impl Fn(&str) -> Option<String> + '_ {
        |key| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    #[test]
    fn txt_records_round_trip() {
        let b = Beacon {
            key_fingerprint: Some("SHA256:xyz".into()),
            protocol_versions: vec![ProtocolVersion::new(1, 0), ProtocolVersion::new(2, 3)],
            ..beacon()
        };
        let pairs = agent_txt(&b);
        assert!(pairs.contains(&("proto".into(), "1.0,2.3".into())));
        assert!(pairs.contains(&("type".into(), "lekiwi".into())));
        let back = beacon_from_txt(lookup(&pairs)).unwrap();
        assert_eq!(
            back,
            Beacon {
                seq: 0,
                seeking: false,
                ..b
            }
        );

        let ctl = ControllerTxt {
            controller_id: answer().controller_id,
            path: "/agent".into(),
            protocol_versions: vec![ProtocolVersion::new(1, 0)],
        };
        assert_eq!(ControllerTxt::from_txt(lookup(&ctl.to_txt())).unwrap(), ctl);
    }

    #[test]
    fn bad_txt_records_are_refused() {
        let none: Vec<(String, String)> = Vec::new();
        assert!(beacon_from_txt(lookup(&none)).is_err());
        let bad_id = vec![("id".to_string(), "robot-7".to_string())];
        assert!(beacon_from_txt(lookup(&bad_id)).is_err());
        let mut bad_type = agent_txt(&beacon());
        bad_type.retain(|(k, _)| k != "type");
        bad_type.push(("type".into(), "tank".into()));
        assert!(beacon_from_txt(lookup(&bad_type)).is_err());
        let mut bad_proto = agent_txt(&beacon());
        bad_proto.retain(|(k, _)| k != "proto");
        bad_proto.push(("proto".into(), "1.x".into()));
        assert!(beacon_from_txt(lookup(&bad_proto)).is_err());

        let id = answer().controller_id.to_string();
        for path in ["agent", "/a b", "/\u{e9}"] {
            let pairs = vec![("id".to_string(), id.clone()), ("path".into(), path.into())];
            assert!(ControllerTxt::from_txt(lookup(&pairs)).is_err(), "{path}");
        }
        let pairs = vec![("id".to_string(), id)];
        assert_eq!(
            ControllerTxt::from_txt(lookup(&pairs)).unwrap().path,
            "/agent"
        );
        assert!(parse_versions(&vec!["1.0"; MAX_VERSIONS + 1].join(",")).is_err());
        assert_eq!(parse_versions(""), Ok(Vec::new()));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn arbitrary_bodies_behind_a_good_header_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..1300),
        ) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&[VERSION.major, VERSION.minor]);
            bytes.extend_from_slice(&body);
            let _ = decode(&bytes);
        }

        #[test]
        fn beacons_round_trip(
            id in any::<u128>(),
            hostname in "[a-z0-9-]{0,64}",
            fingerprint in proptest::option::of("[A-Za-z0-9:+/=]{0,80}"),
            listen_port in proptest::option::of(any::<u16>()),
            seq in any::<u32>(),
            seeking in any::<bool>(),
        ) {
            let d = Datagram::Beacon(Beacon {
                robot_id: RobotId(Uuid::from_u128(id)),
                hostname,
                key_fingerprint: fingerprint,
                listen_port,
                seq,
                seeking,
                ..beacon()
            });
            let bytes = encode(&d).unwrap();
            prop_assert_eq!(decode(&bytes).unwrap(), d);
        }
    }
}
