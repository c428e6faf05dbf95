//! The controller's decisions, kept apart from every effect.
//!
//! Nothing in this module does I/O or reads a clock: time comes in as `now`,
//! and the results are values (events to append, commands to send, refusals
//! to report). The [`crate::fleet`] module carries the decisions out.
//!
//! - [`lifecycle`]: the seven states and exactly the allowed transitions;
//! - [`event`]: the event types stored in the event log;
//! - [`robot`]: the robot aggregate (the read model row) and how an event
//!   changes it;
//! - [`decide`]: what an operator action or an observation of a robot means;
//! - [`breaker`]: the circuit breaker (closed, open, half-open);
//! - [`detector`]: the failure detector of one robot (phi accrual);
//! - [`damping`]: outage damping (many robots silent at once: the network);
//! - [`recovery`]: recovery probes of offline robots (who is due, when
//!   failed probes make a robot `failed`).

pub mod breaker;
pub mod damping;
pub mod decide;
pub mod detector;
pub mod event;
pub mod lifecycle;
pub mod recovery;
pub mod robot;

pub use decide::{Action, Decision, Input, Policy, Recall, Refusal, decide, decide_recalling};
pub use event::{EnrolledVia, Enrollment, EventMetadata, EventRecord, NewEvent, RobotEvent};
pub use lifecycle::LifecycleState;
pub use robot::{Head, Health, Robot, Workload};
