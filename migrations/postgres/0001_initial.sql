-- The PostgreSQL event store: the log, the read model, reports, snapshots,
-- fencing tokens, circuit breakers and discovery. This file is the only
-- definition of the PostgreSQL schema; `kiwi-controller migrate` and every
-- controller start apply it through sqlx's migrator, which records what it
-- applied in `_sqlx_migrations` (so a second run changes nothing) and holds
-- a session advisory lock while it runs (so two controllers starting at
-- once do not race).
--
-- Conventions: identifiers are UUID, times TIMESTAMPTZ (microseconds: the
-- controller truncates the times it records to microseconds, so what is
-- read back equals what was written), structured values JSONB. Nothing
-- refers to `robot_states` by foreign key: it is a projection of `events`
-- and may be emptied and rebuilt by replaying the log. Every index is
-- created with CREATE INDEX (the original design's inline INDEX clauses
-- are MySQL syntax, which PostgreSQL refuses).

-- The append-only log. `position` is the global order: an identity never
-- hands out a value twice, even after rollbacks or deletes (gaps are
-- possible, reuse is not). (robot_id, version) is the optimistic-concurrency
-- key and the index of per-robot reads.
CREATE TABLE events (
    position    BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    UUID        NOT NULL,
    robot_id    UUID        NOT NULL,
    version     BIGINT      NOT NULL CHECK (version >= 1),
    event_type  TEXT        NOT NULL,
    data        JSONB       NOT NULL,
    -- correlation_id, causation_id, actor.
    metadata    JSONB       NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL,
    CONSTRAINT events_event_id UNIQUE (event_id),
    CONSTRAINT events_robot_version UNIQUE (robot_id, version)
);

-- Pruning by age and state-at-an-instant reads.
CREATE INDEX events_recorded_at ON events (recorded_at);

-- The read model: one row per robot, updated in the same transaction as
-- its events. Column names are the original design's.
CREATE TABLE robot_states (
    robot_id           UUID        PRIMARY KEY,
    version            BIGINT      NOT NULL CHECK (version >= 0),
    state              TEXT        NOT NULL CHECK (state IN (
                           'discovered', 'provisioning', 'ready', 'active',
                           'maintenance', 'offline', 'failed')),
    health             JSONB       NOT NULL,
    hostname           TEXT        NOT NULL,
    ip_address         TEXT,
    robot_type         TEXT        NOT NULL,
    model              TEXT,
    firmware_version   TEXT,
    agent_version      TEXT,
    deployment_version TEXT,
    hardware_id        TEXT        NOT NULL,
    mac_addresses      JSONB       NOT NULL,
    last_heartbeat     TIMESTAMPTZ,
    last_state_change  TIMESTAMPTZ NOT NULL,
    failure_count      BIGINT      NOT NULL DEFAULT 0,
    config             JSONB       NOT NULL,
    capabilities       JSONB       NOT NULL,
    metadata           JSONB       NOT NULL,
    discovered_at      TIMESTAMPTZ NOT NULL,
    provisioned_at     TIMESTAMPTZ,
    activated_at       TIMESTAMPTZ,
    updated_at         TIMESTAMPTZ NOT NULL,
    last_report_seq    BIGINT      NOT NULL DEFAULT 0,
    last_report        JSONB
);

-- The API's list filters.
CREATE INDEX robot_states_state ON robot_states (state);
CREATE INDEX robot_states_robot_type ON robot_states (robot_type);
CREATE INDEX robot_states_ip_address ON robot_states (ip_address);

-- Agent reports, deduplicated by (robot_id, seq): a report resent after a
-- reconnect is stored once.
CREATE TABLE robot_reports (
    robot_id    UUID        NOT NULL,
    seq         BIGINT      NOT NULL,
    time        TIMESTAMPTZ NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    health      JSONB       NOT NULL,
    workload    TEXT        NOT NULL,
    maintenance BOOLEAN     NOT NULL,
    telemetry   JSONB       NOT NULL,
    PRIMARY KEY (robot_id, seq)
);

-- Pruning by age and state-at-an-instant reads.
CREATE INDEX robot_reports_received_at ON robot_reports (robot_id, received_at);

-- A robot's row as of one version: `prune` folds the events before it into
-- the snapshot and deletes them, so that replay (snapshot, then the
-- remaining events, then the latest report) still gives the live row. One
-- snapshot per robot: the newest.
CREATE TABLE robot_snapshots (
    robot_id UUID        PRIMARY KEY,
    version  BIGINT      NOT NULL CHECK (version >= 1),
    robot    JSONB       NOT NULL,
    taken_at TIMESTAMPTZ NOT NULL
);

-- The highest fencing token used per leased resource (e.g. the sweep of a
-- network): a write under a lower token comes from a controller that lost
-- its lease, and is refused.
CREATE TABLE fences (
    resource TEXT   PRIMARY KEY,
    token    BIGINT NOT NULL CHECK (token >= 0)
);

-- Per-robot circuit breakers (closed, open, half-open), persisted so that
-- a restarted controller, or another one, sees an open breaker.
CREATE TABLE circuit_breakers (
    robot_id      UUID        PRIMARY KEY,
    state         TEXT        NOT NULL CHECK (state IN ('closed', 'open', 'half_open')),
    failure_count INTEGER     NOT NULL DEFAULT 0 CHECK (failure_count >= 0),
    success_count INTEGER     NOT NULL DEFAULT 0 CHECK (success_count >= 0),
    opened_at     TIMESTAMPTZ,
    updated_at    TIMESTAMPTZ NOT NULL
);

-- One row per discovery round.
CREATE TABLE discovery_sessions (
    session_id   UUID        PRIMARY KEY,
    -- The sources asked, e.g. ["agent", "arp"].
    methods      JSONB       NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL,
    finished_at  TIMESTAMPTZ NOT NULL,
    duration_ms  BIGINT      NOT NULL,
    robots_found BIGINT      NOT NULL,
    new_robots   BIGINT      NOT NULL
);

CREATE INDEX discovery_sessions_started_at ON discovery_sessions (started_at);

-- What one discovery round found: a robot (when identified) at an address,
-- by one method.
CREATE TABLE discovery_results (
    result_id  BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id UUID        NOT NULL REFERENCES discovery_sessions (session_id) ON DELETE CASCADE,
    robot_id   UUID,
    ip_address TEXT        NOT NULL,
    method     TEXT        NOT NULL,
    found_at   TIMESTAMPTZ NOT NULL
);

CREATE INDEX discovery_results_session_id ON discovery_results (session_id);
CREATE INDEX discovery_results_robot_id ON discovery_results (robot_id);
