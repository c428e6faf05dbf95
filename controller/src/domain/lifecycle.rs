//! The lifecycle state machine: exact state names, exactly the allowed
//! transitions.
//!
//! ```text
//! discovered → provisioning → ready → active → maintenance
//!                                       ↓
//!                                    offline → failed
//! ```
//!
//! Health (healthy, degraded, suspect, unreachable) is not a state: it is an
//! attribute of the robot beside its state.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleState {
    Discovered,
    Provisioning,
    Ready,
    Active,
    Maintenance,
    Offline,
    Failed,
}

use LifecycleState::*;

impl LifecycleState {
    pub const ALL: [LifecycleState; 7] = [
        Discovered,
        Provisioning,
        Ready,
        Active,
        Maintenance,
        Offline,
        Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Discovered => "discovered",
            Provisioning => "provisioning",
            Ready => "ready",
            Active => "active",
            Maintenance => "maintenance",
            Offline => "offline",
            Failed => "failed",
        }
    }

    /// The states this one may move to. This table is the only definition of
    /// the allowed transitions.
    pub fn allowed_targets(self) -> &'static [LifecycleState] {
        match self {
            Discovered => &[Provisioning, Failed],
            Provisioning => &[Ready, Failed],
            Ready => &[Active, Maintenance, Offline, Failed],
            Active => &[Ready, Maintenance, Offline, Failed],
            Maintenance => &[Ready, Failed],
            Offline => &[Ready, Failed],
            Failed => &[Provisioning],
        }
    }

    pub fn can_move_to(self, to: LifecycleState) -> bool {
        self.allowed_targets().contains(&to)
    }

    /// Whether an agent connection is expected in this state, so that losing
    /// it means the robot went offline.
    pub fn expects_presence(self) -> bool {
        matches!(self, Ready | Active)
    }
}

impl fmt::Display for LifecycleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LifecycleState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LifecycleState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown state {s:?} (expected one of: {})",
                    LifecycleState::ALL.map(|s| s.as_str()).join(", ")
                )
            })
    }
}

/// A transition that the table allows; the only way to build one is
/// [`Transition::new`] (or decoding one from the log, which goes through
/// it), so an event can only carry an allowed transition. Its fields are
/// private, which the compiler holds:
///
/// ```compile_fail
/// use kiwi_controller::domain::lifecycle::{LifecycleState, Transition};
/// // maintenance -> active is not in the table: this must not compile.
/// let t = Transition { from: LifecycleState::Maintenance, to: LifecycleState::Active };
/// ```
///
/// ```
/// use kiwi_controller::domain::lifecycle::{LifecycleState, Transition};
/// let t = Transition::new(LifecycleState::Maintenance, LifecycleState::Ready).unwrap();
/// assert_eq!((t.from(), t.to()), (LifecycleState::Maintenance, LifecycleState::Ready));
/// assert!(Transition::new(LifecycleState::Maintenance, LifecycleState::Active).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawTransition")]
pub struct Transition {
    from: LifecycleState,
    to: LifecycleState,
}

#[derive(Deserialize)]
struct RawTransition {
    from: LifecycleState,
    to: LifecycleState,
}

impl TryFrom<RawTransition> for Transition {
    type Error = ForbiddenTransition;
    fn try_from(raw: RawTransition) -> Result<Self, Self::Error> {
        Transition::new(raw.from, raw.to)
    }
}

/// A transition the table does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transition from {from} to {to} is not allowed (from {from} a robot may go to: {})", allowed_list(*from))]
pub struct ForbiddenTransition {
    pub from: LifecycleState,
    pub to: LifecycleState,
}

pub fn allowed_list(from: LifecycleState) -> String {
    from.allowed_targets()
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Transition {
    pub fn new(from: LifecycleState, to: LifecycleState) -> Result<Self, ForbiddenTransition> {
        if from.can_move_to(to) {
            Ok(Transition { from, to })
        } else {
            Err(ForbiddenTransition { from, to })
        }
    }

    /// The state it leaves.
    pub fn from(self) -> LifecycleState {
        self.from
    }

    /// The state it enters.
    pub fn to(self) -> LifecycleState {
        self.to
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_the_allowed_transitions() {
        let allowed = [
            (Discovered, Provisioning),
            (Discovered, Failed),
            (Provisioning, Ready),
            (Provisioning, Failed),
            (Ready, Active),
            (Ready, Maintenance),
            (Ready, Offline),
            (Ready, Failed),
            (Active, Ready),
            (Active, Maintenance),
            (Active, Offline),
            (Active, Failed),
            (Maintenance, Ready),
            (Maintenance, Failed),
            (Offline, Ready),
            (Offline, Failed),
            (Failed, Provisioning),
        ];
        for from in LifecycleState::ALL {
            for to in LifecycleState::ALL {
                let expected = allowed.contains(&(from, to));
                assert_eq!(
                    Transition::new(from, to).is_ok(),
                    expected,
                    "{from} -> {to} should be {}",
                    if expected { "allowed" } else { "refused" }
                );
            }
        }
    }

    #[test]
    fn a_forbidden_transition_does_not_decode_from_the_log() {
        let good: Transition =
            serde_json::from_value(serde_json::json!({"from": "maintenance", "to": "ready"}))
                .unwrap();
        assert_eq!((good.from(), good.to()), (Maintenance, Ready));
        assert!(
            serde_json::from_value::<Transition>(
                serde_json::json!({"from": "maintenance", "to": "active"})
            )
            .is_err()
        );
    }

    #[test]
    fn names_round_trip_and_refusal_names_allowed_targets() {
        for s in LifecycleState::ALL {
            assert_eq!(s.as_str().parse::<LifecycleState>(), Ok(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("Ready".parse::<LifecycleState>().is_err());
        let err = Transition::new(Maintenance, Active).unwrap_err();
        assert_eq!(
            err.to_string(),
            "transition from maintenance to active is not allowed (from maintenance a robot may go to: ready, failed)"
        );
    }
}
