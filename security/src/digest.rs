//! SHA-256 names for things both sides compare: the controller's CA (the
//! pin an enrollment token carries) and a robot's public key (the
//! fingerprint an operator compares before approving an enrollment).

use std::fmt;
use std::str::FromStr;

/// Lower-case hex of SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Whether `text` is exactly `len` lower-case hex digits.
pub fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A SHA-256 digest, shown as `sha256:<64 hex digits>`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Sha256Name(String);

impl Sha256Name {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Sha256Name(sha256_hex(bytes))
    }

    /// The 64 hex digits, without the `sha256:` prefix.
    pub fn hex(&self) -> &str {
        &self.0
    }

    /// From 64 hex digits (either case), without a prefix.
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let lower = text.to_ascii_lowercase();
        if is_hex(&lower, 64) {
            Ok(Sha256Name(lower))
        } else {
            Err(format!("{text:?} is not a SHA-256 digest (64 hex digits)"))
        }
    }
}

impl fmt::Display for Sha256Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

impl fmt::Debug for Sha256Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Sha256Name {
    type Err = String;

    /// `sha256:<hex>` or bare hex.
    fn from_str(text: &str) -> Result<Self, String> {
        let t = text.trim();
        Sha256Name::from_hex(t.strip_prefix("sha256:").unwrap_or(t))
    }
}

/// The pin of a controller CA: SHA-256 of its certificate (DER). An
/// enrollment token carries it so that an agent can check a controller it
/// has never seen, as `kubeadm join --discovery-token-ca-cert-hash` does.
pub type CaPin = Sha256Name;

/// A public key's fingerprint: SHA-256 of its SubjectPublicKeyInfo (DER).
/// The same value whether computed from the agent's key, its request or
/// its certificate.
pub type KeyFingerprint = Sha256Name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_print_and_parse() {
        let n = Sha256Name::of(b"abc");
        assert_eq!(
            n.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(n.to_string().parse::<Sha256Name>().unwrap(), n);
        assert_eq!(
            n.hex().to_ascii_uppercase().parse::<Sha256Name>().unwrap(),
            n
        );
        for bad in ["", "sha256:", "sha256:abc", "md5:ba78", &"g".repeat(64)] {
            assert!(bad.parse::<Sha256Name>().is_err(), "{bad} accepted");
        }
    }
}
