//! What both kiwi programs need to run as a service, in one place: logging
//! ([`logging`]: journald under systemd, JSON lines on stderr otherwise),
//! the systemd notification protocol ([`systemd`]: readiness, watchdog,
//! stopping), the open-files limit ([`limits`]), private state
//! directories ([`state`]) and the shell completions and man pages
//! generated from the programs' own command-line definitions ([`cli`]).

pub mod cli;
pub mod limits;
pub mod logging;
pub mod state;
pub mod systemd;
