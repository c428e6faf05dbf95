-- Security records: API tokens, enrollment tokens, enrollment requests
-- and issued client certificates (see `controller/src/store/auth.rs`).
-- Secrets are never stored: `secret_hash` is the lower-case hex SHA-256 of
-- a token's secret part, computed by the caller. Conventions as in
-- 0001_initial.sql (UUID, TIMESTAMPTZ, JSONB). Counts of uses are BIGINT
-- so that every u32 fits.

-- Bearer tokens of the REST API. `role` is the weakest-first enum of
-- `Role`; a token is usable while neither expired nor revoked.
CREATE TABLE api_tokens (
    token_id    TEXT        PRIMARY KEY,
    name        TEXT        NOT NULL,
    role        TEXT        NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    secret_hash TEXT        NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ,
    revoked_at  TIMESTAMPTZ
);

-- Tokens that let an agent enroll without an operator's approval, each
-- good for `uses_total` enrollments until `expires_at`. A use locks the
-- row (`SELECT ... FOR UPDATE`), checks it and decrements `uses_left` in
-- one transaction, so controllers sharing the database cannot overspend a
-- token.
CREATE TABLE enrollment_tokens (
    token_id    TEXT        PRIMARY KEY,
    secret_hash TEXT        NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL,
    uses_total  BIGINT      NOT NULL CHECK (uses_total >= 0),
    uses_left   BIGINT      NOT NULL CHECK (uses_left >= 0 AND uses_left <= uses_total),
    revoked_at  TIMESTAMPTZ
);

-- Agents that asked to enroll without a token, one row per robot and key:
-- pending until an operator approves or rejects, issued once a certificate
-- was handed out.
CREATE TABLE enrollments (
    enrollment_id   UUID        PRIMARY KEY,
    robot_id        UUID        NOT NULL,
    key_fingerprint TEXT        NOT NULL,
    -- The agent's identity as it announced it (hostname, type, addresses).
    identity        JSONB       NOT NULL,
    source_addr     TEXT        NOT NULL,
    status          TEXT        NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'issued')),
    first_seen      TIMESTAMPTZ NOT NULL,
    last_seen       TIMESTAMPTZ NOT NULL,
    decided_at      TIMESTAMPTZ,
    decided_by      TEXT,
    CONSTRAINT enrollments_robot_key UNIQUE (robot_id, key_fingerprint)
);

CREATE INDEX enrollments_status ON enrollments (status, first_seen);

-- Client certificates issued to robots; `serial` is the certificate's
-- serial number in hex.
CREATE TABLE certificates (
    serial          TEXT        PRIMARY KEY,
    robot_id        UUID        NOT NULL,
    key_fingerprint TEXT        NOT NULL,
    not_before      TIMESTAMPTZ NOT NULL,
    not_after       TIMESTAMPTZ NOT NULL,
    issued_at       TIMESTAMPTZ NOT NULL,
    revoked_at      TIMESTAMPTZ
);

CREATE INDEX certificates_robot_id ON certificates (robot_id, issued_at);
-- The revocation list: revoked certificates not expired yet.
CREATE INDEX certificates_revoked ON certificates (not_after) WHERE revoked_at IS NOT NULL;
