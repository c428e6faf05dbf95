//! kiwi-security: what the agent and the controller share about trust.
//!
//! - [`digest`]: CA pins and key fingerprints (`sha256:<hex>`);
//! - [`token`]: enrollment and API token formats, secret hashing;
//! - [`pki`]: keys, certificate requests, the controller's CA, reading
//!   certificates;
//! - [`verify`]: the TLS policies of both sides (optional client
//!   certificates checked after the handshake; the agent's one trusted CA)
//!   and their rustls configurations;
//! - [`enroll`]: the JSON exchange of `POST /enroll`;
//! - [`files`]: private files (0600 in a 0700 directory, written whole).
//!
//! No network I/O and no clock (time is passed in); [`files`] is its only
//! file operation.

pub mod digest;
pub mod enroll;
pub mod files;
pub mod pki;
pub mod token;
pub mod verify;

pub use digest::{CaPin, KeyFingerprint, Sha256Name};
pub use verify::install_crypto_provider;
