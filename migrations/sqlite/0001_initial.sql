-- The embedded event store: the log, the read model, reports and discovery
-- sessions. This file is the only definition of the SQLite schema.
--
-- Conventions: tables are STRICT, so a value of the wrong type is refused on
-- write. Timestamps are RFC 3339 text in UTC with exactly nine fractional
-- digits (`2026-11-01T12:00:00.123456789Z`): lossless, and ordered like the
-- instants they name. JSON columns hold serde_json text. Nothing refers to
-- `robot_states` by foreign key: it is a projection of `events` and may be
-- emptied and rebuilt by replaying the log.

-- The append-only log. `position` is the global order; AUTOINCREMENT makes
-- SQLite never hand out a position again, even after the highest row was
-- deleted. (robot_id, version) is the optimistic-concurrency key.
CREATE TABLE events (
    position    INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT    NOT NULL UNIQUE,
    robot_id    TEXT    NOT NULL,
    version     INTEGER NOT NULL CHECK (version >= 1),
    event_type  TEXT    NOT NULL,
    data        TEXT    NOT NULL,
    metadata    TEXT    NOT NULL,
    recorded_at TEXT    NOT NULL,
    UNIQUE (robot_id, version)
) STRICT;

-- The read model: one row per robot, updated in the same transaction as
-- its events. Column names are the original design's.
CREATE TABLE robot_states (
    robot_id           TEXT    PRIMARY KEY,
    version            INTEGER NOT NULL CHECK (version >= 0),
    state              TEXT    NOT NULL CHECK (state IN (
                           'discovered', 'provisioning', 'ready', 'active',
                           'maintenance', 'offline', 'failed')),
    health             TEXT    NOT NULL,
    hostname           TEXT    NOT NULL,
    ip_address         TEXT,
    robot_type         TEXT    NOT NULL,
    model              TEXT,
    firmware_version   TEXT,
    agent_version      TEXT,
    deployment_version TEXT,
    hardware_id        TEXT    NOT NULL,
    mac_addresses      TEXT    NOT NULL,
    last_heartbeat     TEXT,
    last_state_change  TEXT    NOT NULL,
    failure_count      INTEGER NOT NULL DEFAULT 0,
    config             TEXT    NOT NULL,
    capabilities       TEXT    NOT NULL,
    metadata           TEXT    NOT NULL,
    discovered_at      TEXT    NOT NULL,
    provisioned_at     TEXT,
    activated_at       TEXT,
    updated_at         TEXT    NOT NULL,
    last_report_seq    INTEGER NOT NULL DEFAULT 0,
    last_report        TEXT
) STRICT;

CREATE INDEX robot_states_state ON robot_states (state);
CREATE INDEX robot_states_robot_type ON robot_states (robot_type);
CREATE INDEX robot_states_ip_address ON robot_states (ip_address);

-- Agent reports, deduplicated by (robot_id, seq): a report resent after a
-- reconnect is stored once.
CREATE TABLE robot_reports (
    robot_id    TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    time        TEXT    NOT NULL,
    received_at TEXT    NOT NULL,
    health      TEXT    NOT NULL,
    workload    TEXT    NOT NULL,
    maintenance INTEGER NOT NULL CHECK (maintenance IN (0, 1)),
    telemetry   TEXT    NOT NULL,
    PRIMARY KEY (robot_id, seq)
) STRICT, WITHOUT ROWID;

-- One row per discovery round.
CREATE TABLE discovery_sessions (
    session_id   TEXT    PRIMARY KEY,
    methods      TEXT    NOT NULL,
    started_at   TEXT    NOT NULL,
    finished_at  TEXT    NOT NULL,
    duration_ms  INTEGER NOT NULL,
    robots_found INTEGER NOT NULL,
    new_robots   INTEGER NOT NULL
) STRICT;

CREATE INDEX discovery_sessions_started_at ON discovery_sessions (started_at);
