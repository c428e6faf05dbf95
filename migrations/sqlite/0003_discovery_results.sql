-- What each discovery round found, one row per address and method: the
-- robot (when identified), how it was found, and what became of the
-- address (identified, live without an identity, host key changed, ...).
CREATE TABLE discovery_results (
    session_id  TEXT    NOT NULL REFERENCES discovery_sessions (session_id) ON DELETE CASCADE,
    ordinal     INTEGER NOT NULL,
    ip_address  TEXT    NOT NULL,
    robot_id    TEXT,
    method      TEXT    NOT NULL,
    found_at    TEXT    NOT NULL,
    mac_address TEXT,
    robot_type  TEXT,
    outcome     TEXT    NOT NULL,
    detail      TEXT,
    PRIMARY KEY (session_id, ordinal)
) STRICT;

CREATE INDEX discovery_results_robot_id ON discovery_results (robot_id);
