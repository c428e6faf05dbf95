//! Protocol versions and their negotiation.
//!
//! Rules (see ARCHITECTURE.md, "Wire format"): a shipped message is never
//! changed; a new minor version may only append enum variants; anything else
//! is a new major version. The handshake messages (`Hello`, `Welcome`,
//! `Reject`) are frozen forever and always travel in frames stamped with
//! [`HANDSHAKE`], so that any two peers can at least tell each other which
//! versions they speak.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A protocol version: `major` changes break the encoding, `minor` changes
/// only append enum variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProtocolVersion {
    pub major: u8,
    pub minor: u8,
}

impl ProtocolVersion {
    pub const fn new(major: u8, minor: u8) -> Self {
        Self { major, minor }
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The version this build speaks best. 1.1 added certificate renewal
/// (`RenewCertificate`, `Certificate`, `RenewRefused`).
pub const CURRENT: ProtocolVersion = ProtocolVersion::new(1, 1);

/// The first version with certificate renewal over the link.
pub const RENEWAL: ProtocolVersion = ProtocolVersion::new(1, 1);

/// The version stamped on handshake frames (`Hello`, `Welcome`, `Reject`).
pub const HANDSHAKE: ProtocolVersion = ProtocolVersion::new(1, 0);

/// Every version this build can encode and decode, highest minor per major.
pub const SUPPORTED: &[ProtocolVersion] = &[CURRENT];

/// Whether frames stamped with `version` can be decoded by this build: the
/// major must be known; a higher minor of a known major is accepted (it can
/// only add variants, which fail to decode individually).
pub fn can_decode(version: ProtocolVersion) -> bool {
    SUPPORTED.iter().any(|s| s.major == version.major)
}

/// Picks the version to speak with a peer that offers `offered`, from the
/// versions in `supported`: the highest common major, at the lower of the two
/// minors. `None` when there is no common major.
pub fn negotiate(
    offered: &[ProtocolVersion],
    supported: &[ProtocolVersion],
) -> Option<ProtocolVersion> {
    offered
        .iter()
        .filter_map(|o| {
            supported
                .iter()
                .find(|s| s.major == o.major)
                .map(|s| ProtocolVersion::new(o.major, o.minor.min(s.minor)))
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_highest_common_major_at_lower_minor() {
        let ours = [ProtocolVersion::new(1, 3), ProtocolVersion::new(2, 1)];
        let offered = [
            ProtocolVersion::new(1, 5),
            ProtocolVersion::new(2, 4),
            ProtocolVersion::new(3, 0),
        ];
        assert_eq!(negotiate(&offered, &ours), Some(ProtocolVersion::new(2, 1)));
        assert_eq!(
            negotiate(&[ProtocolVersion::new(1, 0)], &ours),
            Some(ProtocolVersion::new(1, 0))
        );
    }

    #[test]
    fn no_common_major_is_refused() {
        assert_eq!(negotiate(&[ProtocolVersion::new(9, 0)], SUPPORTED), None);
        assert_eq!(negotiate(&[], SUPPORTED), None);
    }

    #[test]
    fn unknown_major_cannot_be_decoded() {
        assert!(can_decode(ProtocolVersion::new(1, 7)));
        assert!(!can_decode(ProtocolVersion::new(2, 0)));
    }
}
