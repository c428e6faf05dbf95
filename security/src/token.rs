//! The secrets operators hand out: enrollment tokens (given to a robot once,
//! so that it can get its certificate) and API tokens (sent as
//! `Authorization: Bearer`). Both are `<id>.<secret>` with a recognisable
//! prefix; the controller stores the id and a hash of the secret only.
//!
//! ```text
//! kiwi-enroll.v1.<id>.<secret>.<ca pin hex>
//! kiwi-api.v1.<id>.<secret>
//! ```
//!
//! An enrollment token also carries the pin of the controller's CA, so the
//! agent can tell the real controller from anything else on the LAN before
//! it sends anything.

use crate::digest::{CaPin, Sha256Name, hex, is_hex, sha256_hex};
use ring::rand::{SecureRandom, SystemRandom};
use std::fmt;
use std::str::FromStr;

/// Hex digits of a token id (64 bits: unique enough, short to show).
pub const ID_HEX: usize = 16;
/// Hex digits of a token secret (128 bits).
pub const SECRET_HEX: usize = 32;

const ENROLL_PREFIX: &str = "kiwi-enroll.v1.";
const API_PREFIX: &str = "kiwi-api.v1.";

/// Why a token's text was refused. Never shows the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenFormatError {
    #[error("not a kiwi {expected} token (it should start with {prefix:?})")]
    Prefix {
        expected: &'static str,
        prefix: &'static str,
    },
    #[error("malformed {expected} token: {detail}")]
    Malformed {
        expected: &'static str,
        detail: &'static str,
    },
}

/// `n` random bytes from the system's secure generator, as hex.
fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buf)
        .expect("the system random generator works");
    hex(&buf)
}

/// The stored form of a secret: SHA-256 hex. Secrets are 128 random bits,
/// so a fast hash is enough (nothing to brute-force).
pub fn hash_secret(secret: &str) -> String {
    sha256_hex(secret.as_bytes())
}

/// Compares a presented secret with a stored hash in time independent of
/// where they differ.
pub fn secret_matches(secret: &str, stored_hash: &str) -> bool {
    let presented = hash_secret(secret);
    presented.len() == stored_hash.len()
        && presented
            .bytes()
            .zip(stored_hash.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The parts of `id.secret...` after a prefix, checked.
fn split_id_secret<'a>(
    rest: &'a str,
    expected: &'static str,
) -> Result<(&'a str, &'a str, &'a str), TokenFormatError> {
    let malformed = |detail| TokenFormatError::Malformed { expected, detail };
    let (id, rest) = rest.split_once('.').ok_or(malformed("no secret"))?;
    let (secret, tail) = rest.split_once('.').unwrap_or((rest, ""));
    if !is_hex(id, ID_HEX) {
        return Err(malformed("the id is not 16 hex digits"));
    }
    if !is_hex(secret, SECRET_HEX) {
        return Err(malformed("the secret is not 32 hex digits"));
    }
    Ok((id, secret, tail))
}

/// A one-time (or N-time) enrollment token.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollmentToken {
    pub id: String,
    pub secret: String,
    /// The controller CA the agent must find.
    pub ca_pin: CaPin,
}

impl EnrollmentToken {
    /// A new random token pinning `ca_pin`.
    pub fn generate(ca_pin: CaPin) -> Self {
        EnrollmentToken {
            id: random_hex(ID_HEX / 2),
            secret: random_hex(SECRET_HEX / 2),
            ca_pin,
        }
    }

    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }
}

impl fmt::Display for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{ENROLL_PREFIX}{}.{}.{}",
            self.id,
            self.secret,
            self.ca_pin.hex()
        )
    }
}

impl fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollmentToken")
            .field("id", &self.id)
            .field("secret", &"***")
            .field("ca_pin", &self.ca_pin)
            .finish()
    }
}

impl FromStr for EnrollmentToken {
    type Err = TokenFormatError;

    fn from_str(text: &str) -> Result<Self, TokenFormatError> {
        const EXPECTED: &str = "enrollment";
        let rest = text
            .trim()
            .strip_prefix(ENROLL_PREFIX)
            .ok_or(TokenFormatError::Prefix {
                expected: EXPECTED,
                prefix: ENROLL_PREFIX,
            })?;
        let (id, secret, pin) = split_id_secret(rest, EXPECTED)?;
        let ca_pin = Sha256Name::from_hex(pin).map_err(|_| TokenFormatError::Malformed {
            expected: EXPECTED,
            detail: "the CA pin is not 64 hex digits",
        })?;
        Ok(EnrollmentToken {
            id: id.to_string(),
            secret: secret.to_string(),
            ca_pin,
        })
    }
}

/// An API token (`Authorization: Bearer kiwi-api.v1.…`).
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub id: String,
    pub secret: String,
}

impl ApiToken {
    pub fn generate() -> Self {
        ApiToken {
            id: random_hex(ID_HEX / 2),
            secret: random_hex(SECRET_HEX / 2),
        }
    }

    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }
}

impl fmt::Display for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{API_PREFIX}{}.{}", self.id, self.secret)
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiToken")
            .field("id", &self.id)
            .field("secret", &"***")
            .finish()
    }
}

impl FromStr for ApiToken {
    type Err = TokenFormatError;

    fn from_str(text: &str) -> Result<Self, TokenFormatError> {
        const EXPECTED: &str = "API";
        let rest = text
            .trim()
            .strip_prefix(API_PREFIX)
            .ok_or(TokenFormatError::Prefix {
                expected: EXPECTED,
                prefix: API_PREFIX,
            })?;
        let (id, secret, tail) = split_id_secret(rest, EXPECTED)?;
        if !tail.is_empty() {
            return Err(TokenFormatError::Malformed {
                expected: EXPECTED,
                detail: "trailing characters",
            });
        }
        Ok(ApiToken {
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tokens_round_trip_and_hide_their_secret() {
        let pin = Sha256Name::of(b"ca");
        let t = EnrollmentToken::generate(pin.clone());
        let text = t.to_string();
        assert!(text.starts_with("kiwi-enroll.v1."), "{text}");
        assert_eq!(text.parse::<EnrollmentToken>().unwrap(), t);
        assert!(!format!("{t:?}").contains(&t.secret));
        assert_ne!(EnrollmentToken::generate(pin).secret, t.secret);

        let a = ApiToken::generate();
        assert_eq!(a.to_string().parse::<ApiToken>().unwrap(), a);
        assert!(!format!("{a:?}").contains(&a.secret));
        assert!(secret_matches(&a.secret, &a.secret_hash()));
        assert!(!secret_matches(&t.secret, &a.secret_hash()));
        assert!(!secret_matches(&a.secret, "short"));
    }

    #[test]
    fn malformed_tokens_say_what_is_wrong() {
        let api = ApiToken::generate().to_string();
        let enroll = EnrollmentToken::generate(Sha256Name::of(b"ca")).to_string();
        assert!(matches!(
            enroll.parse::<ApiToken>(),
            Err(TokenFormatError::Prefix { .. })
        ));
        assert!(matches!(
            api.parse::<EnrollmentToken>(),
            Err(TokenFormatError::Prefix { .. })
        ));
        let cut = &enroll[..enroll.len() - 1];
        assert_eq!(
            cut.parse::<EnrollmentToken>().unwrap_err().to_string(),
            "malformed enrollment token: the CA pin is not 64 hex digits"
        );
        assert!(format!("{api}x").parse::<ApiToken>().is_err());
        assert!(format!("{api}.x").parse::<ApiToken>().is_err());
        assert!("kiwi-api.v1.zz.yy".parse::<ApiToken>().is_err());
    }

    proptest! {
        #[test]
        fn parsing_never_panics(text in ".{0,200}") {
            let _ = text.parse::<ApiToken>();
            let _ = text.parse::<EnrollmentToken>();
        }
    }
}
