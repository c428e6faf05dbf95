//! A program's state directory is private: whatever the umask it was
//! started with, what it creates there is readable by its own user only
//! (files 0600, directories 0700). systemd gives the packaged services
//! `UMask=0077` and a 0700 `StateDirectory=`; this does the same for a
//! program started by hand, by a script or by a test.

use nix::sys::stat::{Mode, umask};
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::Path;

/// Makes every file and directory this process creates from now on
/// private to its user (umask 077). Call first thing in `main`.
pub fn private_umask() {
    umask(Mode::from_bits_truncate(0o077));
}

/// Creates `dir` (and missing parents) with mode 0700. An existing
/// directory is left as it is (it may be shared, e.g. given by mistake):
/// `Ok(Some(mode))` says it is open to others, for the caller to warn.
pub fn ensure_private_dir(dir: &Path) -> io::Result<Option<u32>> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    Ok((mode & 0o077 != 0).then_some(mode))
}

/// Makes the existing files `paths` private (0600), skipping those that do
/// not exist: files a program keeps from an earlier version made under a
/// looser umask.
pub fn make_private(paths: &[&Path]) -> io::Result<()> {
    for path in paths {
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_directories_are_made_private_and_shared_ones_are_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let new = root.path().join("a/b/state");
        assert_eq!(ensure_private_dir(&new).unwrap(), None);
        assert_eq!(mode(&new), 0o700);
        let shared = root.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(ensure_private_dir(&shared).unwrap(), Some(0o755));
        assert_eq!(mode(&shared), 0o755, "left as it was");

        let file = new.join("kiwi.db");
        std::fs::write(&file, "x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        make_private(&[&file, &new.join("kiwi.db-wal")]).unwrap();
        assert_eq!(mode(&file), 0o600);
    }
}
