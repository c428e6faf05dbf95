//! What an operator action or an observation of a robot means: the events
//! to append and the commands to send. Pure: the robot's current row and the
//! input in, a [`Decision`] or a [`Refusal`] out.

use super::event::{Enrollment, IdentityFacts, RobotEvent};
use super::lifecycle::{LifecycleState, Transition};
use super::robot::{Health, Robot};
use kiwi_protocol::message::HealthStatus;
use serde::Serialize;

use LifecycleState::*;

/// The operator actions of the state machine (`POST /robots/{id}/...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Provision,
    Activate { deployment_version: Option<String> },
    Deactivate,
    MaintenanceStart { reason: Option<String> },
    MaintenanceEnd,
    Recover,
    Fail { reason: String },
}

impl Action {
    /// The action's name in the API path.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Provision => "provision",
            Action::Activate { .. } => "activate",
            Action::Deactivate => "deactivate",
            Action::MaintenanceStart { .. } => "maintenance/start",
            Action::MaintenanceEnd => "maintenance/end",
            Action::Recover => "recover",
            Action::Fail { .. } => "fail",
        }
    }

    /// Where this action takes a robot in state `from`, or `None` when the
    /// action does not apply there. Every target is checked against the
    /// transition table as well.
    pub fn target(&self, from: LifecycleState) -> Option<LifecycleState> {
        let to = match (self, from) {
            (Action::Provision, Discovered | Failed) => Provisioning,
            (Action::Activate { .. }, Ready) => Active,
            (Action::Deactivate, Active) => Ready,
            (Action::MaintenanceStart { .. }, Ready | Active) => Maintenance,
            (Action::MaintenanceEnd, Maintenance) => Ready,
            (Action::Recover, Offline) => Ready,
            (Action::Recover, Failed) => Provisioning,
            (Action::Fail { .. }, _) => Failed,
            _ => return None,
        };
        from.can_move_to(to).then_some(to)
    }

    fn samples() -> [Action; 7] {
        [
            Action::Provision,
            Action::Activate {
                deployment_version: None,
            },
            Action::Deactivate,
            Action::MaintenanceStart { reason: None },
            Action::MaintenanceEnd,
            Action::Recover,
            Action::Fail {
                reason: String::new(),
            },
        ]
    }
}

/// Something that happened to or was asked of a robot.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Operator(Action),
    /// An agent completed its handshake with these identity facts.
    AgentConnected {
        facts: IdentityFacts,
    },
    /// Discovery identified a host without an agent (e.g. over SSH) with
    /// these identity facts, found by `method`.
    HostSighted {
        facts: IdentityFacts,
        method: String,
    },
    /// The agent's connection ended or went silent.
    AgentLost {
        reason: String,
    },
    /// The failure detector finds the connected agent's silence unusual:
    /// the robot is suspect while an active probe confirms or clears it.
    AgentSilent {
        reason: String,
    },
    /// A suspect robot's agent was heard from again.
    AgentHeardAgain,
    /// The robot has been `offline` longer than the controller waits, or
    /// its host failed the recovery probes in a row.
    OfflineTooLong {
        reason: String,
    },
    /// A report arrived with the agent's own view of its health.
    AgentReported {
        health: Health,
    },
    /// The robot was given a certificate by a token or an approval
    /// (recorded for a robot already known; refused as unknown otherwise).
    Enrolled {
        enrollment: Enrollment,
    },
    /// The agent answered a command.
    CommandAnswered {
        command: CommandIntent,
        error: Option<String>,
    },
}

/// A command the controller should send to the robot's agent once the
/// decision's events are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandIntent {
    Provision,
    EnterMaintenance,
    LeaveMaintenance,
    RestartWorkload,
    Ping,
}

/// Settings the decisions depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Provision robots whose agent connects, without waiting for an operator.
    pub auto_provision: bool,
}

/// The outcome of [`decide`]: events to append (in order), then commands.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    pub events: Vec<RobotEvent>,
    pub commands: Vec<CommandIntent>,
}

/// Why an input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no such robot")]
    UnknownRobot,
    #[error(
        "cannot {action} a robot in state {from}; allowed from {from}: {}",
        if allowed_actions.is_empty() { "nothing".to_string() } else { allowed_actions.join(", ") }
    )]
    Forbidden {
        action: &'static str,
        from: LifecycleState,
        /// Actions that are allowed from `from`.
        allowed_actions: Vec<&'static str>,
        /// States a robot may move to from `from`.
        allowed_states: Vec<LifecycleState>,
    },
}

fn transition(from: LifecycleState, to: LifecycleState) -> Transition {
    // Callers only pass pairs they checked against the table (via
    // `Action::target` or a match on the current state); a mismatch is a
    // bug in this module, caught by the exhaustive tests below.
    Transition::new(from, to)
        .unwrap_or_else(|e| panic!("decide produced a forbidden transition: {e}"))
}

/// Decides what `input` means for `robot` (`None`: not seen before).
pub fn decide(robot: Option<&Robot>, input: Input, policy: Policy) -> Result<Decision, Refusal> {
    decide_recalling(robot, input, policy, Recall::default())
}

/// What the robot's log says that its row does not, for the decisions that
/// need it (the caller reads it from the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recall {
    /// The state an `offline` robot was in when it went offline.
    pub before_offline: Option<LifecycleState>,
}

/// [`decide`], with what the log recalls: an `offline` robot whose agent
/// returns goes back to where it was (`ready`, or through `ready` to
/// `active` with its recorded deployment).
pub fn decide_recalling(
    robot: Option<&Robot>,
    input: Input,
    policy: Policy,
    recall: Recall,
) -> Result<Decision, Refusal> {
    let mut d = Decision::default();
    match input {
        Input::AgentConnected { facts } => match robot {
            None => {
                d.events.push(RobotEvent::RobotDiscovered {
                    identity: facts,
                    method: "agent".into(),
                });
                if policy.auto_provision {
                    d.events.push(RobotEvent::RobotProvisioningStarted {
                        transition: transition(Discovered, Provisioning),
                    });
                    d.commands.push(CommandIntent::Provision);
                }
            }
            Some(r) => {
                if facts != r.identity_facts() {
                    d.events
                        .push(RobotEvent::RobotIdentityChanged { identity: facts });
                }
                match r.state {
                    Offline => {
                        d.events.push(RobotEvent::RobotRecovered {
                            transition: transition(Offline, Ready),
                        });
                        if recall.before_offline == Some(Active) {
                            // Its deployment resumes (the version recorded
                            // stays); offline -> active is not a transition.
                            d.events.push(RobotEvent::RobotActivated {
                                transition: transition(Ready, Active),
                                deployment_version: None,
                            });
                        }
                    }
                    Discovered if policy.auto_provision => {
                        d.events.push(RobotEvent::RobotProvisioningStarted {
                            transition: transition(Discovered, Provisioning),
                        });
                        d.commands.push(CommandIntent::Provision);
                    }
                    Provisioning => d.commands.push(CommandIntent::Provision),
                    _ => {}
                }
                // Back in touch: a robot that was not offline (recovery
                // resets health itself) is reachable again.
                let unreachable = matches!(
                    r.health.status,
                    HealthStatus::Unreachable | HealthStatus::Suspect
                );
                if r.state != Offline && unreachable {
                    d.events.push(RobotEvent::RobotHealthChanged {
                        health: Health::healthy(),
                    });
                }
            }
        },
        Input::HostSighted { facts, method } => match robot {
            None => d.events.push(RobotEvent::RobotDiscovered {
                identity: facts,
                method,
            }),
            Some(r) => {
                // What a sighting cannot know (the agent's and firmware's
                // versions) stays as recorded.
                let recorded = r.identity_facts();
                let merged = IdentityFacts {
                    model: facts.model.or(recorded.model.clone()),
                    firmware_version: facts.firmware_version.or(recorded.firmware_version.clone()),
                    agent_version: facts.agent_version.or(recorded.agent_version.clone()),
                    mac_addresses: if facts.mac_addresses.is_empty() {
                        recorded.mac_addresses.clone()
                    } else {
                        facts.mac_addresses
                    },
                    ..facts
                };
                if merged != recorded {
                    d.events
                        .push(RobotEvent::RobotIdentityChanged { identity: merged });
                }
            }
        },
        Input::AgentLost { reason } => {
            let r = robot.ok_or(Refusal::UnknownRobot)?;
            if r.state.expects_presence() {
                d.events.push(RobotEvent::RobotOffline {
                    transition: transition(r.state, Offline),
                    reason,
                });
            } else if r.state != Offline && r.health.status != HealthStatus::Unreachable {
                d.events.push(RobotEvent::RobotHealthChanged {
                    health: Health::unreachable(reason),
                });
            }
        }
        Input::AgentSilent { reason } => {
            let r = robot.ok_or(Refusal::UnknownRobot)?;
            let known = matches!(
                r.health.status,
                HealthStatus::Suspect | HealthStatus::Unreachable
            );
            if r.state != Offline && !known {
                d.events.push(RobotEvent::RobotHealthChanged {
                    health: Health::suspect(reason),
                });
            }
        }
        Input::AgentHeardAgain => {
            let r = robot.ok_or(Refusal::UnknownRobot)?;
            // Healthy until the agent's next report says otherwise.
            if r.state != Offline && r.health.status == HealthStatus::Suspect {
                d.events.push(RobotEvent::RobotHealthChanged {
                    health: Health::healthy(),
                });
            }
        }
        Input::OfflineTooLong { reason } => {
            let r = robot.ok_or(Refusal::UnknownRobot)?;
            // A robot back in the meantime is not failed.
            if r.state == Offline {
                d.events.push(RobotEvent::RobotFailed {
                    transition: transition(Offline, Failed),
                    reason,
                });
            }
        }
        Input::AgentReported { health } => {
            let r = robot.ok_or(Refusal::UnknownRobot)?;
            if r.state != Offline && r.health != health {
                d.events.push(RobotEvent::RobotHealthChanged { health });
            }
        }
        Input::Enrolled { enrollment } => {
            robot.ok_or(Refusal::UnknownRobot)?;
            d.events.push(RobotEvent::RobotEnrolled { enrollment });
        }
        Input::CommandAnswered { command, error } => {
            let r = robot.ok_or(Refusal::UnknownRobot)?;
            if command == CommandIntent::Provision && r.state == Provisioning {
                d.events.push(match error {
                    None => RobotEvent::RobotProvisioned {
                        transition: transition(Provisioning, Ready),
                    },
                    Some(error) => RobotEvent::RobotFailed {
                        transition: transition(Provisioning, Failed),
                        reason: format!("provisioning failed: {error}"),
                    },
                });
            }
        }
        Input::Operator(action) => {
            let r = robot.ok_or(Refusal::UnknownRobot)?;
            let Some(to) = action.target(r.state) else {
                return Err(Refusal::Forbidden {
                    action: action.name(),
                    from: r.state,
                    allowed_actions: Action::samples()
                        .iter()
                        .filter(|a| a.target(r.state).is_some())
                        .map(Action::name)
                        .collect(),
                    allowed_states: r.state.allowed_targets().to_vec(),
                });
            };
            let t = transition(r.state, to);
            match action {
                Action::Provision => {
                    d.events
                        .push(RobotEvent::RobotProvisioningStarted { transition: t });
                    d.commands.push(CommandIntent::Provision);
                }
                Action::Activate { deployment_version } => {
                    d.events.push(RobotEvent::RobotActivated {
                        transition: t,
                        deployment_version,
                    })
                }
                Action::Deactivate => d
                    .events
                    .push(RobotEvent::RobotDeactivated { transition: t }),
                Action::MaintenanceStart { reason } => {
                    d.events.push(RobotEvent::RobotMaintenanceStart {
                        transition: t,
                        reason,
                    });
                    d.commands.push(CommandIntent::EnterMaintenance);
                }
                Action::MaintenanceEnd => {
                    d.events
                        .push(RobotEvent::RobotMaintenanceEnd { transition: t });
                    d.commands.push(CommandIntent::LeaveMaintenance);
                }
                Action::Recover => {
                    d.events.push(RobotEvent::RobotRecovered { transition: t });
                    if to == Provisioning {
                        d.commands.push(CommandIntent::Provision);
                    }
                }
                Action::Fail { reason } => d.events.push(RobotEvent::RobotFailed {
                    transition: t,
                    reason,
                }),
            }
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::{EventMetadata, EventRecord};
    use chrono::{TimeZone, Utc};
    use kiwi_protocol::RobotId;
    use proptest::prelude::*;
    use uuid::Uuid;

    fn facts(host: &str) -> IdentityFacts {
        IdentityFacts {
            hostname: host.into(),
            ip_address: Some("127.0.0.1".into()),
            robot_type: "lekiwi".into(),
            model: None,
            firmware_version: None,
            agent_version: Some("0.1.0".into()),
            hardware_id: "pi-serial:1".into(),
            mac_addresses: vec![],
        }
    }

    #[test]
    fn an_offline_robot_returns_to_the_state_it_left() {
        let mut clock = 0;
        let d = decide(None, Input::AgentConnected { facts: facts("a") }, AUTO).unwrap();
        let r = apply_all(None, &d, &mut clock).unwrap();
        let d = decide(
            Some(&r),
            Input::CommandAnswered {
                command: CommandIntent::Provision,
                error: None,
            },
            AUTO,
        )
        .unwrap();
        let ready = apply_all(Some(r), &d, &mut clock).unwrap();
        let activate = Input::Operator(Action::Activate {
            deployment_version: Some("v7".into()),
        });
        let d = decide(Some(&ready), activate, AUTO).unwrap();
        let active = apply_all(Some(ready.clone()), &d, &mut clock).unwrap();
        for (before, expected) in [(ready, Ready), (active, Active)] {
            let lost = Input::AgentLost {
                reason: "gone".into(),
            };
            let d = decide(Some(&before), lost, AUTO).unwrap();
            let offline = apply_all(Some(before.clone()), &d, &mut clock).unwrap();
            assert_eq!(offline.state, Offline);
            let back = Input::AgentConnected { facts: facts("a") };
            let recall = Recall {
                before_offline: Some(before.state),
            };
            let d = decide_recalling(Some(&offline), back.clone(), AUTO, recall).unwrap();
            let again = apply_all(Some(offline.clone()), &d, &mut clock).unwrap();
            assert_eq!(again.state, expected);
            assert_eq!(again.deployment_version, before.deployment_version);
            // Without the log's word it comes back ready.
            let d = decide(Some(&offline), back, AUTO).unwrap();
            assert_eq!(
                apply_all(Some(offline), &d, &mut clock).unwrap().state,
                Ready
            );
        }
    }

    /// Applies a decision's events as the store would, with a simulated clock.
    fn apply_all(robot: Option<Robot>, d: &Decision, clock: &mut i64) -> Option<Robot> {
        let mut robot = robot;
        for ev in &d.events {
            *clock += 1;
            let version = robot.as_ref().map_or(0, |r| r.version) + 1;
            let rec = EventRecord {
                position: *clock,
                event_id: Uuid::new_v4(),
                robot_id: RobotId(Uuid::from_u128(7)),
                version,
                event: ev.clone(),
                metadata: EventMetadata::default(),
                recorded_at: Utc.timestamp_opt(*clock, 0).unwrap(),
            };
            robot = Some(Robot::apply(robot, &rec).expect("decided events always apply"));
        }
        robot
    }

    const AUTO: Policy = Policy {
        auto_provision: true,
    };
    const MANUAL: Policy = Policy {
        auto_provision: false,
    };

    fn robot_in(state: LifecycleState) -> Robot {
        let mut clock = 0;
        let mut r = apply_all(
            None,
            &decide(None, Input::AgentConnected { facts: facts("a") }, MANUAL).unwrap(),
            &mut clock,
        )
        .unwrap();
        r.state = state;
        r
    }

    #[test]
    fn every_action_from_every_state_follows_the_table() {
        for from in LifecycleState::ALL {
            for action in Action::samples() {
                let r = robot_in(from);
                match decide(Some(&r), Input::Operator(action.clone()), MANUAL) {
                    Ok(d) => {
                        let t = d.events[0].transition().unwrap();
                        assert_eq!(t.from(), from);
                        assert!(from.can_move_to(t.to()));
                        assert_eq!(Some(t.to()), action.target(from));
                    }
                    Err(Refusal::Forbidden {
                        allowed_actions,
                        allowed_states,
                        ..
                    }) => {
                        assert_eq!(action.target(from), None);
                        assert!(!allowed_actions.contains(&action.name()));
                        assert_eq!(allowed_states, from.allowed_targets());
                    }
                    Err(e) => panic!("unexpected {e}"),
                }
            }
        }
    }

    #[test]
    fn every_allowed_transition_is_reachable_by_some_input() {
        // Operator actions plus the agent-driven moves (provisioned, offline).
        let mut reached = std::collections::BTreeSet::new();
        for from in LifecycleState::ALL {
            for action in Action::samples() {
                if let Some(to) = action.target(from) {
                    reached.insert((from, to));
                }
            }
        }
        reached.insert((Provisioning, Ready)); // CommandAnswered(Provision)
        reached.insert((Ready, Offline)); // AgentLost
        reached.insert((Active, Offline));
        for from in LifecycleState::ALL {
            for &to in from.allowed_targets() {
                assert!(reached.contains(&(from, to)), "{from} -> {to} unreachable");
            }
        }
    }

    #[test]
    fn agent_lifecycle() {
        let mut clock = 0;
        let d = decide(None, Input::AgentConnected { facts: facts("a") }, AUTO).unwrap();
        assert_eq!(d.commands, vec![CommandIntent::Provision]);
        let r = apply_all(None, &d, &mut clock).unwrap();
        assert_eq!(r.state, Provisioning);

        let d = decide(
            Some(&r),
            Input::CommandAnswered {
                command: CommandIntent::Provision,
                error: None,
            },
            AUTO,
        )
        .unwrap();
        let r = apply_all(Some(r), &d, &mut clock).unwrap();
        assert_eq!(r.state, Ready);
        assert!(r.provisioned_at.is_some());

        let d = decide(
            Some(&r),
            Input::AgentLost {
                reason: "closed".into(),
            },
            AUTO,
        )
        .unwrap();
        let r = apply_all(Some(r), &d, &mut clock).unwrap();
        assert_eq!(r.state, Offline);
        assert_eq!(r.health.status, HealthStatus::Unreachable);
        assert_eq!(r.failure_count, 1);

        // Back with a new hostname: identity change, then recovered.
        let d = decide(Some(&r), Input::AgentConnected { facts: facts("b") }, AUTO).unwrap();
        assert_eq!(d.events.len(), 2);
        let r = apply_all(Some(r), &d, &mut clock).unwrap();
        assert_eq!((r.state, r.hostname.as_str()), (Ready, "b"));
        assert_eq!(r.health, Health::healthy());

        // Same identity again: nothing to record.
        let d = decide(Some(&r), Input::AgentConnected { facts: facts("b") }, AUTO).unwrap();
        assert_eq!(d, Decision::default());

        let degraded = Health {
            status: HealthStatus::Degraded,
            reasons: vec!["hot".into()],
        };
        let d = decide(
            Some(&r),
            Input::AgentReported {
                health: degraded.clone(),
            },
            AUTO,
        )
        .unwrap();
        let r = apply_all(Some(r), &d, &mut clock).unwrap();
        assert_eq!(r.health, degraded);
        let d = decide(Some(&r), Input::AgentReported { health: degraded }, AUTO).unwrap();
        assert!(d.events.is_empty());
    }

    /// A silent agent makes its robot suspect (once), hearing from it again
    /// clears that, and an offline robot's health is not touched.
    #[test]
    fn silence_makes_a_robot_suspect_until_it_is_heard_again() {
        let mut clock = 0;
        let d = decide(None, Input::AgentConnected { facts: facts("a") }, AUTO).unwrap();
        let r = apply_all(None, &d, &mut clock).unwrap();
        let silent = || Input::AgentSilent {
            reason: "silent for 0.9 s".into(),
        };
        let d = decide(Some(&r), silent(), AUTO).unwrap();
        let r = apply_all(Some(r), &d, &mut clock).unwrap();
        assert_eq!(r.health, Health::suspect("silent for 0.9 s"));
        assert_eq!(
            decide(Some(&r), silent(), AUTO).unwrap(),
            Decision::default()
        );
        let d = decide(Some(&r), Input::AgentHeardAgain, AUTO).unwrap();
        let r = apply_all(Some(r), &d, &mut clock).unwrap();
        assert_eq!(r.health, Health::healthy());
        assert_eq!(
            decide(Some(&r), Input::AgentHeardAgain, AUTO).unwrap(),
            Decision::default()
        );
        let lost = Input::AgentLost {
            reason: "gone".into(),
        };
        let d = decide(Some(&r), lost, AUTO).unwrap();
        let r = apply_all(Some(r), &d, &mut clock).unwrap();
        assert_eq!(
            decide(Some(&r), silent(), AUTO).unwrap(),
            Decision::default()
        );
        assert_eq!(
            decide(None, Input::AgentHeardAgain, AUTO),
            Err(Refusal::UnknownRobot)
        );
    }

    /// A legacy robot found over SSH: discovered once, its address followed
    /// when it moves, what SSH cannot see kept, and its later agent is the
    /// same robot.
    #[test]
    fn a_sighted_host_is_one_robot_wherever_it_moves() {
        let mut clock = 0;
        let sighted = |ip: &str| {
            let mut f = facts("legacy");
            f.ip_address = Some(ip.into());
            f.agent_version = None;
            Input::HostSighted {
                facts: f,
                method: "ssh".into(),
            }
        };
        let d = decide(None, sighted("10.88.0.5"), AUTO).unwrap();
        assert!(
            matches!(&d.events[..], [RobotEvent::RobotDiscovered { method, .. }] if method == "ssh")
        );
        assert!(d.commands.is_empty(), "no agent to provision");
        let r = apply_all(None, &d, &mut clock).unwrap();
        assert_eq!(
            (r.state, r.ip_address.as_deref()),
            (Discovered, Some("10.88.0.5"))
        );

        assert_eq!(
            decide(Some(&r), sighted("10.88.0.5"), AUTO).unwrap(),
            Decision::default()
        );
        let d = decide(Some(&r), sighted("10.88.0.9"), AUTO).unwrap();
        assert!(matches!(
            &d.events[..],
            [RobotEvent::RobotIdentityChanged { .. }]
        ));
        let r = apply_all(Some(r), &d, &mut clock).unwrap();
        assert_eq!(r.ip_address.as_deref(), Some("10.88.0.9"));

        // It starts the agent: same robot, provisioned, its agent version
        // recorded; a later SSH sighting does not forget that version.
        let mut with_agent = facts("legacy");
        with_agent.ip_address = Some("10.88.0.9".into());
        let d = decide(Some(&r), Input::AgentConnected { facts: with_agent }, AUTO).unwrap();
        let r = apply_all(Some(r), &d, &mut clock).unwrap();
        assert_eq!(r.state, Provisioning);
        assert_eq!(r.agent_version.as_deref(), Some("0.1.0"));
        assert_eq!(
            decide(Some(&r), sighted("10.88.0.9"), AUTO).unwrap(),
            Decision::default()
        );
    }

    /// Two robots that swap addresses stay two robots: each is decided by
    /// its own id, and each records its new address.
    #[test]
    fn robots_that_swap_addresses_keep_their_ids() {
        let mut clock = 0;
        let sighted = |host: &str, hw: &str, ip: &str| {
            let mut f = facts(host);
            f.hardware_id = hw.into();
            f.ip_address = Some(ip.into());
            Input::HostSighted {
                facts: f,
                method: "ssh".into(),
            }
        };
        let a = apply_all(
            None,
            &decide(None, sighted("a", "pi-serial:a", "10.0.0.1"), AUTO).unwrap(),
            &mut clock,
        )
        .unwrap();
        let b = apply_all(
            None,
            &decide(None, sighted("b", "pi-serial:b", "10.0.0.2"), AUTO).unwrap(),
            &mut clock,
        )
        .unwrap();
        let d = decide(Some(&a), sighted("a", "pi-serial:a", "10.0.0.2"), AUTO).unwrap();
        let a = apply_all(Some(a), &d, &mut clock).unwrap();
        let d = decide(Some(&b), sighted("b", "pi-serial:b", "10.0.0.1"), AUTO).unwrap();
        let b = apply_all(Some(b), &d, &mut clock).unwrap();
        assert_eq!(
            (a.hostname.as_str(), a.ip_address.as_deref()),
            ("a", Some("10.0.0.2"))
        );
        assert_eq!(
            (b.hostname.as_str(), b.ip_address.as_deref()),
            ("b", Some("10.0.0.1"))
        );
        assert_eq!((a.version, b.version), (2, 2), "one identity change each");
    }

    #[test]
    fn failed_provisioning_fails_the_robot() {
        let r = robot_in(Provisioning);
        let d = decide(
            Some(&r),
            Input::CommandAnswered {
                command: CommandIntent::Provision,
                error: Some("disk full".into()),
            },
            AUTO,
        )
        .unwrap();
        assert!(
            matches!(&d.events[0], RobotEvent::RobotFailed { reason, .. } if reason.contains("disk full"))
        );
    }

    fn input_strategy() -> impl Strategy<Value = Input> {
        prop_oneof![
            Just(Input::Operator(Action::Provision)),
            Just(Input::Operator(Action::Activate {
                deployment_version: Some("v1".into())
            })),
            Just(Input::Operator(Action::Deactivate)),
            Just(Input::Operator(Action::MaintenanceStart { reason: None })),
            Just(Input::Operator(Action::MaintenanceEnd)),
            Just(Input::Operator(Action::Recover)),
            Just(Input::Operator(Action::Fail { reason: "x".into() })),
            prop_oneof![Just("a"), Just("b")]
                .prop_map(|h| Input::AgentConnected { facts: facts(h) }),
            prop_oneof![Just("10.0.0.1"), Just("10.0.0.2")].prop_map(|ip| {
                let mut f = facts("legacy");
                f.ip_address = Some(ip.into());
                Input::HostSighted {
                    facts: f,
                    method: "ssh".into(),
                }
            }),
            Just(Input::AgentLost {
                reason: "gone".into()
            }),
            Just(Input::AgentSilent {
                reason: "silent".into()
            }),
            Just(Input::AgentHeardAgain),
            Just(Input::OfflineTooLong {
                reason: "offline for 10m".into()
            }),
            Just(Input::AgentReported {
                health: Health::healthy()
            }),
            Just(Input::AgentReported {
                health: Health {
                    status: HealthStatus::Degraded,
                    reasons: vec!["hot".into()]
                }
            }),
            prop_oneof![Just(None), Just(Some("boom".to_string()))].prop_map(|error| {
                Input::CommandAnswered {
                    command: CommandIntent::Provision,
                    error,
                }
            }),
        ]
    }

    proptest! {
        /// Random sequences of commands and observations keep the
        /// invariants: every event applies, versions strictly increase, and
        /// a failed robot is only ever left through provisioning.
        #[test]
        fn random_sequences_keep_invariants(
            auto in any::<bool>(),
            inputs in proptest::collection::vec(input_strategy(), 1..60),
        ) {
            let policy = Policy { auto_provision: auto };
            let mut clock = 0;
            let mut robot: Option<Robot> = None;
            for input in inputs {
                let before = robot.clone();
                match decide(robot.as_ref(), input, policy) {
                    Ok(d) => {
                        robot = apply_all(robot, &d, &mut clock);
                        if let (Some(b), Some(a)) = (&before, &robot) {
                            prop_assert!(a.version >= b.version);
                            prop_assert_eq!(a.version - b.version, d.events.len() as i64);
                            if b.state == Failed && a.state != Failed {
                                prop_assert_eq!(d.events[0].transition().map(|t| t.to()), Some(Provisioning));
                            }
                        }
                        if d.events.is_empty() {
                            prop_assert_eq!(&before, &robot);
                        }
                    }
                    Err(_) => prop_assert_eq!(&before, &robot),
                }
            }
        }
    }
}
