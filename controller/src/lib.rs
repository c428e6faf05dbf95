//! kiwi-controller: the edge service. See ARCHITECTURE.md for the codemap.
//!
//! Decisions live in [`domain`] (pure); [`fleet`] applies them; the store,
//! the cache, the agent link, liveness, discovery and the API are effects
//! around it; [`serve`] wires them together.

pub mod api;
pub mod breakers;
pub mod cache;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod domain;
pub mod fleet;
pub mod link;
pub mod listen;
pub mod liveness;
pub mod metrics;
pub mod ops;
pub mod recovery;
pub mod replay;
pub mod security;
pub mod serve;
pub mod sessions;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod watch;
