//! The process's own resource limits: one connection is one file
//! descriptor, and the soft limit a service starts with (1,024 under
//! systemd and most shells) is far below a fleet. The controller (for
//! `max_agents` connections) and the agent's simulator (for its agents)
//! raise theirs before they accept or open connections.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// The open-files limit after [`raise_nofile_limit`], and whether it is
/// below what was wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit now in force.
    pub soft: u64,
    /// The hard limit now in force.
    pub hard: u64,
    /// What the caller asked for.
    pub wanted: u64,
}

impl NofileLimit {
    /// Whether the limit now in force is below what was wanted.
    pub fn is_short(&self) -> bool {
        self.soft < self.wanted
    }
}

/// What to set, given the current limits and what is wanted: the soft
/// limit up to `wanted` (never down); the hard limit up to `wanted` only if
/// `privileged` (raising a hard limit needs `CAP_SYS_RESOURCE`), else the
/// soft limit stops at the hard one. `None`: nothing to change.
pub fn plan_nofile(soft: u64, hard: u64, wanted: u64, privileged: bool) -> Option<(u64, u64)> {
    if soft >= wanted {
        return None;
    }
    let hard = if privileged { hard.max(wanted) } else { hard };
    let soft = wanted.min(hard);
    Some((soft, hard))
}

/// This process's open-files limit now in force (the soft one).
pub fn current_nofile() -> std::io::Result<u64> {
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

/// Raises this process's open-files limit towards `wanted`: the soft limit
/// up to the hard one, and the hard one too where the process may (root).
/// Never lowers a limit. Returns what is in force afterwards.
pub fn raise_nofile_limit(wanted: u64) -> std::io::Result<NofileLimit> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let Some((new_soft, new_hard)) = plan_nofile(soft, hard, wanted, true) else {
        return Ok(NofileLimit { soft, hard, wanted });
    };
    // Raising the hard limit is refused without the privilege: then the
    // soft limit goes as far as the hard one allows.
    let (soft, hard) = match setrlimit(Resource::RLIMIT_NOFILE, new_soft, new_hard) {
        Ok(()) => (new_soft, new_hard),
        Err(_) => {
            let (s, h) = plan_nofile(soft, hard, wanted, false).unwrap_or((soft, hard));
            setrlimit(Resource::RLIMIT_NOFILE, s, h)?;
            (s, h)
        }
    };
    Ok(NofileLimit { soft, hard, wanted })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_only_upwards() {
        assert_eq!(plan_nofile(4096, 8192, 1024, true), None);
        assert_eq!(plan_nofile(1024, 8192, 4096, false), Some((4096, 8192)));
        assert_eq!(plan_nofile(1024, 2048, 4096, false), Some((2048, 2048)));
        assert_eq!(plan_nofile(1024, 2048, 4096, true), Some((4096, 4096)));
        assert_eq!(plan_nofile(1024, 65536, 4096, true), Some((4096, 65536)));
    }

    #[test]
    fn raises_this_process_soft_limit() {
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        // Asking for no more than the hard limit always works.
        let wanted = hard.min(soft.saturating_add(16));
        let now = raise_nofile_limit(wanted).expect("raise");
        assert!(now.soft >= wanted, "{now:?}");
        assert!(!now.is_short());
        assert_eq!(
            getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit").0,
            now.soft
        );
        // Asking for less never lowers it.
        let again = raise_nofile_limit(1).expect("raise");
        assert_eq!(again.soft, now.soft);
    }
}
