//! The kiwi wire protocol and the pure rules that agent and controller share.
//!
//! Everything both programs must agree on lives here and nowhere else:
//!
//! - [`beacon`]: the UDP beacon an agent broadcasts on its subnet and a
//!   controller's answer (LAN discovery);
//! - [`frame`]: the envelope (magic, version, postcard body), the size cap
//!   checked before decoding, and a sans-I/O decoder for stream transports;
//! - [`version`]: protocol versions and their negotiation;
//! - [`message`]: the messages agent and controller exchange;
//! - [`identity`]: robot identity types and the rules that turn clues found
//!   on a robot (files, devices, serials) into a stable id and a robot type;
//! - [`settings`]: the layering of configuration (file, environment, flags)
//!   with every invalid field reported at once;
//! - [`backoff`]: the one retry policy (capped exponential, full jitter);
//! - [`invariants`]: what the codec promises for any input, as checks the
//!   property tests and the fuzz targets share.
//!
//! This crate does no I/O, reads no clock and knows no async runtime: it
//! depends on serde, postcard, uuid, toml and thiserror only.

pub mod backoff;
pub mod beacon;
pub mod frame;
pub mod identity;
pub mod invariants;
pub mod message;
pub mod settings;
pub mod version;

pub use frame::{DEFAULT_MAX_FRAME, FrameError, decode_frame, encode_frame};
pub use identity::{HardwareId, Identity, RobotId, RobotType};
pub use message::{AgentMessage, ControllerMessage};
pub use version::ProtocolVersion;
