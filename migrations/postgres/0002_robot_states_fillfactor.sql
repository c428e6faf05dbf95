-- The read model's rows are rewritten on every report. Free space left in
-- each page lets PostgreSQL update a row in place (a HOT update) without
-- touching the indexes, since reports do not change the indexed columns
-- (state, robot_type, ip_address). Applies to pages written from now on.
ALTER TABLE robot_states SET (fillfactor = 70);
