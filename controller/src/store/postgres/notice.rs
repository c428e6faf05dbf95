//! The payload of a commit notification, as the writer sends it and the follower reads it.

use super::*;

// ---------------------------------------------------------------------------
// Notifications and the listener task.

/// The payload of one commit notification: one append. `events` and
/// `robot` are there when the whole commit fits in a notification; else
/// the listener reads them (a reference: positions `first..=last`). The
/// writer sends the rest without the positions, which the write statement
/// puts in front (see [`notice_body`]): a full notice's events carry
/// position 0, and are numbered `first..=last` by [`Notice::positioned`].
#[derive(Debug, Deserialize)]
pub(super) struct Notice {
    /// The positions of the append's events (none: a report only).
    pub(super) first: Option<i64>,
    pub(super) last: Option<i64>,
    pub(super) robot_id: RobotId,
    #[serde(default)]
    pub(super) events: Option<Vec<EventRecord>>,
    #[serde(default)]
    pub(super) robot: Option<Robot>,
}

impl Notice {
    /// The whole commit, its events numbered, if the notice carries it and
    /// its positions account for every event.
    pub(super) fn positioned(&mut self) -> Option<(Vec<EventRecord>, Robot)> {
        let (mut events, robot) = (self.events.take()?, self.robot.take()?);
        match (self.first, self.last) {
            (None, None) if events.is_empty() => {}
            (Some(first), Some(last))
                if usize::try_from(last - first + 1).is_ok_and(|n| n == events.len()) =>
            {
                for (event, position) in events.iter_mut().zip(first..) {
                    event.position = position;
                }
            }
            _ => return None,
        }
        Some((events, robot))
    }
}

/// What the writer notifies of an append, without the opening brace and
/// the positions (`{"first":..,"last":..,` is put in front by the write
/// statement): `"robot_id":..,"events":[..],"robot":{..}}` when the
/// notification will fit, else the reference `"robot_id":..}`.
#[derive(Debug, Serialize)]
pub(super) struct NoticeBody<'a> {
    robot_id: RobotId,
    version: i64,
    report_seq: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    events: Option<&'a [EventRecord]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    robot: Option<&'a Robot>,
}

/// Room for `{"first":<i64>,"last":<i64>,` in front of a notice's body.
pub(super) const POSITIONS_ROOM: usize = 64;

/// The body of an append's notification: the whole commit if it fits,
/// else a reference.
pub(super) fn notice_body(robot: &Robot, records: &[EventRecord]) -> String {
    let mut body = NoticeBody {
        robot_id: robot.robot_id,
        version: robot.version,
        report_seq: robot.last_report_seq,
        events: Some(records),
        robot: Some(robot),
    };
    let text = match serde_json::to_string(&body) {
        Ok(full) if full.len() + POSITIONS_ROOM <= NOTIFY_PAYLOAD_MAX => full,
        _ => {
            body.events = None;
            body.robot = None;
            // Ids and numbers only: serialising cannot fail.
            serde_json::to_string(&body).unwrap_or_default()
        }
    };
    text.strip_prefix('{').unwrap_or(&text).to_string()
}
