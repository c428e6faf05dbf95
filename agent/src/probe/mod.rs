//! Probes: everything the agent learns about its robot by reading files
//! under a system root (`/` on a robot, a prepared tree in tests and
//! simulations), turned into an identity, telemetry and a health verdict.
//!
//! The rules that turn clues into an identity or a robot type live in
//! [`kiwi_protocol::identity`], shared with the controller's SSH fallback;
//! this module only gathers the clues. A missing or malformed file never
//! fails a probe: it gives `None` or 0 and a debug log line.
//!
//! The telemetry of `kiwi-agent simulate`'s virtual agents is not probed
//! but made up: [`FakeTelemetry`].

pub mod health;
pub mod identity;
pub mod telemetry;

pub use health::evaluate as evaluate_health;
pub use identity::{ProbedIdentity, probe_identity};
pub use telemetry::{FakeTelemetry, TelemetryProbe};

use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest file a probe reads; anything longer is cut (real `/proc` and
/// `/sys` files are far smaller, so only garbage is affected).
const MAX_FILE: u64 = 1 << 20;

/// A system root: `/`, or a prepared tree standing in for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysRoot(PathBuf);

impl SysRoot {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    /// The root itself.
    pub fn root(&self) -> &Path {
        &self.0
    }

    /// Whether this is the live system (`/`), whose sockets and host name
    /// are the robot's own.
    pub fn is_live(&self) -> bool {
        self.0 == Path::new("/")
    }

    /// `rel` (written as an absolute path or not) under the root.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel.trim_start_matches('/'))
    }

    /// The bytes of a file, or `None` (with a debug log) when it cannot be
    /// read.
    pub fn read_bytes(&self, rel: &str) -> Option<Vec<u8>> {
        let path = self.path(rel);
        let mut out = Vec::new();
        match std::fs::File::open(&path).and_then(|f| f.take(MAX_FILE).read_to_end(&mut out)) {
            Ok(_) => Some(out),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "probe file unreadable");
                None
            }
        }
    }

    /// The text of a file, or `None` (with a debug log) when it cannot be
    /// read or is not UTF-8.
    pub fn read_text(&self, rel: &str) -> Option<String> {
        let bytes = self.read_bytes(rel)?;
        match String::from_utf8(bytes) {
            Ok(s) => Some(s),
            Err(_) => {
                tracing::debug!(path = %self.path(rel).display(), "probe file is not UTF-8");
                None
            }
        }
    }

    /// The names in a directory, sorted; empty when it cannot be listed.
    pub fn list(&self, rel: &str) -> Vec<String> {
        let path = self.path(rel);
        let mut names: Vec<String> = match std::fs::read_dir(&path) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect(),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "probe directory unreadable");
                Vec::new()
            }
        };
        names.sort();
        names
    }
}

#[cfg(test)]
pub(crate) mod testtree {
    //! Prepared system trees for the probe tests.

    use std::path::Path;

    pub fn write(root: &Path, rel: &str, content: impl AsRef<[u8]>) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    pub const PI_CPUINFO: &str = "processor\t: 0\nBogoMIPS\t: 108.00\n\
        Hardware\t: BCM2835\nRevision\t: d04170\nSerial\t\t: 10000000c0ffee01\n\
        Model\t\t: Raspberry Pi 5 Model B Rev 1.0\n";
}
