-- Per-robot circuit breakers (see `controller/src/breakers.rs`), one row
-- per robot whose breaker is not closed-and-clean, replaced on every change
-- of state. Times as in 0001_initial.sql (RFC 3339 text with nine
-- fractional digits); a half-open breaker keeps its `since` in `opened_at`.
CREATE TABLE circuit_breakers (
    robot_id      TEXT    PRIMARY KEY,
    state         TEXT    NOT NULL CHECK (state IN ('closed', 'open', 'half_open')),
    failure_count INTEGER NOT NULL DEFAULT 0 CHECK (failure_count >= 0),
    success_count INTEGER NOT NULL DEFAULT 0 CHECK (success_count >= 0),
    opened_at     TEXT,
    updated_at    TEXT    NOT NULL
) STRICT;
