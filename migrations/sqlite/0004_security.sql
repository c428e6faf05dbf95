-- Security records: API tokens, enrollment tokens, enrollment requests
-- and issued client certificates (see `controller/src/store/auth.rs`).
-- Secrets are never stored: `secret_hash` is the lower-case hex SHA-256 of
-- a token's secret part, computed by the caller. Times and JSON as in
-- 0001_initial.sql (RFC 3339 text with nine fractional digits, serde_json
-- text); robot ids and enrollment ids are hyphenated UUID text.

-- Bearer tokens of the REST API. `role` is the weakest-first enum of
-- `Role`; a token is usable while neither expired nor revoked.
CREATE TABLE api_tokens (
    token_id    TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    secret_hash TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    expires_at  TEXT,
    revoked_at  TEXT
) STRICT;

-- Tokens that let an agent enroll without an operator's approval, each
-- good for `uses_total` enrollments until `expires_at`. A use decrements
-- `uses_left` in the transaction that checks it.
CREATE TABLE enrollment_tokens (
    token_id    TEXT    PRIMARY KEY,
    secret_hash TEXT    NOT NULL,
    created_at  TEXT    NOT NULL,
    expires_at  TEXT    NOT NULL,
    uses_total  INTEGER NOT NULL CHECK (uses_total >= 0),
    uses_left   INTEGER NOT NULL CHECK (uses_left >= 0 AND uses_left <= uses_total),
    revoked_at  TEXT
) STRICT;

-- Agents that asked to enroll without a token, one row per robot and key:
-- pending until an operator approves or rejects, issued once a certificate
-- was handed out.
CREATE TABLE enrollments (
    enrollment_id   TEXT PRIMARY KEY,
    robot_id        TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    identity        TEXT NOT NULL,
    source_addr     TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'issued')),
    first_seen      TEXT NOT NULL,
    last_seen       TEXT NOT NULL,
    decided_at      TEXT,
    decided_by      TEXT,
    UNIQUE (robot_id, key_fingerprint)
) STRICT;

CREATE INDEX enrollments_status ON enrollments (status, first_seen);

-- Client certificates issued to robots; `serial` is the certificate's
-- serial number in hex.
CREATE TABLE certificates (
    serial          TEXT PRIMARY KEY,
    robot_id        TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    not_before      TEXT NOT NULL,
    not_after       TEXT NOT NULL,
    issued_at       TEXT NOT NULL,
    revoked_at      TEXT
) STRICT;

CREATE INDEX certificates_robot_id ON certificates (robot_id, issued_at);
-- The revocation list: revoked certificates not expired yet.
CREATE INDEX certificates_revoked ON certificates (not_after) WHERE revoked_at IS NOT NULL;
