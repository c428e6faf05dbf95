-- Enrollment hardening (see `controller/src/store/auth.rs`):
--
-- - `enrollment_tokens.robot_id`: a token made for one robot
--   (`token create --robot <id>`) enrolls that robot only; NULL: any.
-- - `enrollments.status` gains `revoked`: decommissioning ends every
--   enrollment of the robot. An `issued` or `revoked` request asked again
--   starts over as `pending` (an operator decides again); nothing issues a
--   second certificate by itself.
-- - `enrollments.reason`: why a request waits for an operator although it
--   came with a token (the robot already holds a valid certificate).
--
-- SQLite cannot change a CHECK constraint in place: the table is rebuilt.

ALTER TABLE enrollment_tokens ADD COLUMN robot_id TEXT;

CREATE TABLE enrollments_new (
    enrollment_id   TEXT PRIMARY KEY,
    robot_id        TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    identity        TEXT NOT NULL,
    source_addr     TEXT NOT NULL,
    status          TEXT NOT NULL
        CHECK (status IN ('pending', 'approved', 'rejected', 'issued', 'revoked')),
    first_seen      TEXT NOT NULL,
    last_seen       TEXT NOT NULL,
    decided_at      TEXT,
    decided_by      TEXT,
    reason          TEXT,
    UNIQUE (robot_id, key_fingerprint)
) STRICT;

INSERT INTO enrollments_new (enrollment_id, robot_id, key_fingerprint, identity, source_addr,
                             status, first_seen, last_seen, decided_at, decided_by)
SELECT enrollment_id, robot_id, key_fingerprint, identity, source_addr,
       status, first_seen, last_seen, decided_at, decided_by
FROM enrollments;

DROP TABLE enrollments;
ALTER TABLE enrollments_new RENAME TO enrollments;

CREATE INDEX enrollments_status ON enrollments (status, first_seen);
-- The pending requests of one source address (the per-address cap).
CREATE INDEX enrollments_pending_source ON enrollments (source_addr) WHERE status = 'pending';
