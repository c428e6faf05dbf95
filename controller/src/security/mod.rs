//! Who may talk to the controller.
//!
//! - [`pki`]: the controller's CA and server certificate in the state
//!   directory (created on first start, renewed before expiry);
//! - [`agents`]: admitting an agent connection by its client certificate
//!   (both transports), revocation;
//! - [`limits`]: abuse limits per source address;
//!
//! The formats and checks both programs share live in `kiwi-security`.

pub mod agents;
pub mod enroll;
pub mod limits;
pub mod pki;
pub mod tokens;
pub mod upkeep;

pub use agents::{AgentAuth, Principal};
pub use enroll::{EnrollError, EnrollErrorKind, Enroller};
pub use limits::{
    AbuseLimits, ConnectionCap, ConnectionCaps, ConnectionLimitNames, ConnectionSlot, Connections,
    LimitSettings, Surface,
};
pub use pki::{ControllerPki, ServerNames};
pub use tokens::{ApiAuth, ApiRefusal, Caller};
