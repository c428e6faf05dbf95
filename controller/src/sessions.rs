//! The session registry: which robots have an agent connected right now,
//! how to reach each one, and when each was last heard from.
//!
//! Liveness data lives here, in memory: heartbeats are never events and
//! never touch the store.

use crate::domain::damping::NetworkState;
use crate::domain::decide::CommandIntent;
use crate::domain::detector::{DetectorSettings, Step, Watch};
use chrono::Utc;
use kiwi_protocol::RobotId;
use kiwi_protocol::message::Command;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Milliseconds since the Unix epoch, the unit of `last_seen`.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// One established agent connection.
#[derive(Debug, Clone)]
pub struct Session {
    pub session_id: Uuid,
    pub robot_id: RobotId,
    pub peer: SocketAddr,
    /// Commands for the agent; the connection task writes them in order.
    /// Boxed: the queue's first block of slots is allocated with the
    /// session, so a slot costs a pointer, not a whole command.
    pub outbound: mpsc::Sender<Box<Command>>,
    /// Cancelling ends the connection (replaced, timed out, shutting down).
    pub cancel: CancellationToken,
    /// Arrivals and the failure detector over them.
    watch: Arc<Mutex<Watch>>,
    /// Commands sent and not yet answered.
    pending: Arc<Mutex<HashMap<Uuid, CommandIntent>>>,
    /// Why the connection was ended from our side, if it was.
    closing: Arc<Mutex<Option<Closing>>>,
    /// The serial of the client certificate the agent connected with.
    pub cert_serial: Option<String>,
}

impl Session {
    /// A session whose agent was told to send heartbeats every `heartbeat`.
    pub fn new(
        robot_id: RobotId,
        peer: SocketAddr,
        outbound: mpsc::Sender<Box<Command>>,
        cancel: CancellationToken,
        heartbeat: Duration,
    ) -> Session {
        Session {
            session_id: Uuid::new_v4(),
            robot_id,
            peer,
            outbound,
            cancel,
            watch: Arc::new(Mutex::new(Watch::new(now_ms(), heartbeat))),
            pending: Arc::default(),
            closing: Arc::default(),
            cert_serial: None,
        }
    }

    /// The session of an agent that connected with this certificate.
    pub fn with_cert_serial(mut self, serial: String) -> Session {
        self.cert_serial = Some(serial);
        self
    }

    fn watch(&self) -> std::sync::MutexGuard<'_, Watch> {
        // A Watch is plain numbers, valid even if a holder panicked.
        self.watch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that the agent was heard from.
    pub fn touch(&self, now_ms: i64) {
        self.watch().arrival(now_ms);
    }

    pub fn last_seen_ms(&self) -> i64 {
        self.watch().detector().last_ms()
    }

    /// Whether the failure detector holds the agent suspect (a probe out).
    pub fn is_suspect(&self) -> bool {
        self.watch().is_suspect()
    }

    /// The liveness sweep's question about this session at `now_ms`.
    pub fn assess(
        &self,
        now_ms: i64,
        settings: &DetectorSettings,
        probe_timeout: Duration,
    ) -> Step {
        self.watch().assess(now_ms, settings, probe_timeout)
    }

    /// Ends the connection from our side, keeping the first reason given.
    pub fn close(&self, reason: impl Into<String>) {
        self.end(reason.into(), false);
    }

    /// Ends the connection of an agent that stopped answering: the
    /// connection is dropped without waiting for anything to be delivered.
    pub fn abandon(&self, reason: impl Into<String>) {
        self.end(reason.into(), true);
    }

    fn end(&self, reason: String, abandoned: bool) {
        let mut c = self.closing.lock().unwrap_or_else(|p| p.into_inner());
        if c.is_none() {
            *c = Some(Closing { reason, abandoned });
        }
        drop(c);
        self.cancel.cancel();
    }

    fn closing(&self) -> Option<Closing> {
        self.closing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn close_reason(&self) -> Option<String> {
        self.closing().map(|c| c.reason)
    }

    /// Whether the connection was ended because the agent stopped
    /// answering ([`Session::abandon`]).
    pub fn is_abandoned(&self) -> bool {
        self.closing().is_some_and(|c| c.abandoned)
    }

    /// Takes the intent of an answered command.
    pub fn answered(&self, command_id: Uuid) -> Option<CommandIntent> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&command_id)
    }

    /// Whether a command of `intent` was sent and not yet answered.
    pub fn awaits(&self, intent: CommandIntent) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|i| *i == intent)
    }

    /// Queues a command; fails when the agent's queue is full or closed (the
    /// command is then reconciled when the agent next connects).
    pub fn send_command(&self, intent: CommandIntent, command: Command) -> Result<(), String> {
        let id = command.command_id;
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, intent);
        self.outbound.try_send(Box::new(command)).map_err(|e| {
            self.answered(id);
            format!("agent queue: {e}")
        })
    }
}

/// Why a session was ended from the controller's side.
#[derive(Debug, Clone)]
struct Closing {
    reason: String,
    abandoned: bool,
}

/// Every established session, by robot, and the robots away on planned
/// downtime with the time they promised to be back by.
#[derive(Debug, Default)]
pub struct SessionRegistry {
    sessions: Mutex<HashMap<RobotId, Session>>,
    planned: Mutex<HashMap<RobotId, i64>>,
    /// The network as outage damping last judged it (the liveness sweep
    /// writes it; the API and the offline → failed rule read it).
    network: Mutex<NetworkState>,
}

impl SessionRegistry {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<RobotId, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session, returning the one it replaces (which the caller
    /// closes: one connection per robot).
    pub fn register(&self, session: Session) -> Option<Session> {
        self.planned_map().remove(&session.robot_id);
        self.map().insert(session.robot_id, session)
    }

    fn planned_map(&self) -> std::sync::MutexGuard<'_, HashMap<RobotId, i64>> {
        self.planned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that the robot left on purpose and is due back by `deadline_ms`.
    pub fn plan_absence(&self, robot_id: RobotId, deadline_ms: i64) {
        self.planned_map().insert(robot_id, deadline_ms);
    }

    /// Whether the robot is away on planned downtime.
    pub fn is_planned_absent(&self, robot_id: &RobotId) -> bool {
        self.planned_map().contains_key(robot_id)
    }

    /// Takes the robots whose planned downtime ended before `now_ms`.
    pub fn take_overdue_absences(&self, now_ms: i64) -> Vec<RobotId> {
        let mut planned = self.planned_map();
        let due: Vec<RobotId> = planned
            .iter()
            .filter(|(_, deadline)| **deadline < now_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in &due {
            planned.remove(id);
        }
        due
    }

    /// Removes the robot's session if it is still `session_id`; false when a
    /// newer connection already replaced it.
    pub fn remove_if_current(&self, robot_id: &RobotId, session_id: Uuid) -> bool {
        let mut map = self.map();
        match map.get(robot_id) {
            Some(s) if s.session_id == session_id => {
                map.remove(robot_id);
                true
            }
            _ => false,
        }
    }

    pub fn get(&self, robot_id: &RobotId) -> Option<Session> {
        self.map().get(robot_id).cloned()
    }

    /// When the robot's agent was last heard from, if it is connected.
    pub fn last_seen_ms(&self, robot_id: &RobotId) -> Option<i64> {
        self.map().get(robot_id).map(Session::last_seen_ms)
    }

    /// [`last_seen_ms`](Self::last_seen_ms) of many robots, in their
    /// order, under one lock (a list of thousands).
    pub fn last_seen_many<'a>(
        &self,
        robot_ids: impl IntoIterator<Item = &'a RobotId>,
    ) -> Vec<Option<i64>> {
        let map = self.map();
        robot_ids
            .into_iter()
            .map(|id| map.get(id).map(Session::last_seen_ms))
            .collect()
    }

    pub fn network(&self) -> NetworkState {
        *self.network.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_network(&self, state: NetworkState) {
        *self.network.lock().unwrap_or_else(|p| p.into_inner()) = state;
    }

    pub fn is_connected(&self, robot_id: &RobotId) -> bool {
        self.map().contains_key(robot_id)
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of every session, for sweeps.
    pub fn snapshot(&self) -> Vec<Session> {
        self.map().values().cloned().collect()
    }

    /// Calls `f` on every session, under the registry's lock: for a sweep
    /// over thousands of sessions that acts on few of them, without cloning
    /// each (`f` clones those it keeps). `f` must not call back into the
    /// registry.
    pub fn for_each(&self, mut f: impl FnMut(&Session)) {
        for s in self.map().values() {
            f(s);
        }
    }

    /// Ends every session (shutdown).
    pub fn close_all(&self, reason: &str) {
        for s in self.snapshot() {
            s.close(reason);
        }
    }
}
