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

ALTER TABLE enrollment_tokens ADD COLUMN robot_id UUID;

ALTER TABLE enrollments
    DROP CONSTRAINT enrollments_status_check,
    ADD CONSTRAINT enrollments_status_check
        CHECK (status IN ('pending', 'approved', 'rejected', 'issued', 'revoked')),
    ADD COLUMN reason TEXT;

-- The pending requests of one source address (the per-address cap).
CREATE INDEX enrollments_pending_source ON enrollments (source_addr) WHERE status = 'pending';
