-- History that survives pruning, and fencing tokens.
--
-- A snapshot is a robot's row as of one version: `prune` folds the events
-- before it into the snapshot and deletes them, so that replay (snapshot,
-- then the remaining events, then the latest report) still gives the live
-- row. One snapshot per robot: the newest.
CREATE TABLE robot_snapshots (
    robot_id TEXT    PRIMARY KEY,
    version  INTEGER NOT NULL CHECK (version >= 1),
    robot    TEXT    NOT NULL,
    taken_at TEXT    NOT NULL
) STRICT;

-- The highest fencing token used per leased resource (e.g. the sweep of a
-- network): a write under a lower token comes from a controller that lost
-- its lease, and is refused.
CREATE TABLE fences (
    resource TEXT    PRIMARY KEY,
    token    INTEGER NOT NULL
) STRICT;

-- For pruning by age and for state-at-an-instant reads.
CREATE INDEX events_recorded_at ON events (recorded_at);
CREATE INDEX robot_reports_received_at ON robot_reports (robot_id, received_at);
