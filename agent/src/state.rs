//! The agent's small persisted state: the maintenance flag and the last
//! configuration the controller provisioned, kept as JSON files in the state
//! directory so that a restart (or a reboot) resumes exactly, plus the one
//! crash-safe way this crate replaces a file.

use kiwi_protocol::message::DesiredConfig;
use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const MAINTENANCE_FILE: &str = "maintenance.json";
const PROVISIONED_FILE: &str = "provisioned-config.json";

#[derive(Debug, Serialize, Deserialize)]
struct MaintenanceFile {
    maintenance: bool,
}

/// The persisted agent-side flags. Every setter writes through before it
/// returns.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    maintenance: bool,
    provisioned: Option<DesiredConfig>,
}

impl StateStore {
    /// Opens (creating the directory if needed). A file that cannot be parsed
    /// is treated as absent, with a warning: a torn write must not keep the
    /// agent from starting.
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let maintenance = read_json::<MaintenanceFile>(&dir.join(MAINTENANCE_FILE))?
            .is_some_and(|m| m.maintenance);
        let provisioned = read_json::<DesiredConfig>(&dir.join(PROVISIONED_FILE))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            maintenance,
            provisioned,
        })
    }

    /// The directory the state lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the agent holds the robot in maintenance.
    pub fn maintenance(&self) -> bool {
        self.maintenance
    }

    /// Persists the maintenance flag (a no-op when unchanged).
    pub fn set_maintenance(&mut self, on: bool) -> io::Result<()> {
        if self.maintenance == on {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&MaintenanceFile { maintenance: on })?;
        write_atomic(&self.dir.join(MAINTENANCE_FILE), &bytes)?;
        self.maintenance = on;
        Ok(())
    }

    /// The configuration last provisioned by the controller.
    pub fn provisioned(&self) -> Option<&DesiredConfig> {
        self.provisioned.as_ref()
    }

    /// Persists a provisioned configuration.
    pub fn set_provisioned(&mut self, config: &DesiredConfig) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(config)?;
        write_atomic(&self.dir.join(PROVISIONED_FILE), &bytes)?;
        self.provisioned = Some(config.clone());
        Ok(())
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable state file");
                Ok(None)
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the
/// new content: write a temporary file beside it, sync it, rename it over,
/// then sync the directory so the rename itself is durable.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?
        .to_os_string();
    name.push(".tmp");
    let tmp = dir.join(name);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Makes a directory's entries (creations, renames) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_survive_reopen_and_garbage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = StateStore::open(dir.path()).unwrap();
        assert!(!s.maintenance());
        assert!(s.provisioned().is_none());
        s.set_maintenance(true).unwrap();
        let cfg = DesiredConfig {
            maintenance: true,
            report_interval_ms: 5000,
            settings: vec![("k".into(), "v".into())],
        };
        s.set_provisioned(&cfg).unwrap();

        let s = StateStore::open(dir.path()).unwrap();
        assert!(s.maintenance());
        assert_eq!(s.provisioned(), Some(&cfg));

        std::fs::write(dir.path().join(MAINTENANCE_FILE), b"{not json").unwrap();
        std::fs::write(dir.path().join(PROVISIONED_FILE), b"").unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        assert!(!s.maintenance());
        assert!(s.provisioned().is_none());
    }
}
