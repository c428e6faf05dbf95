-- What each discovery round found at each address: besides the robot and
-- the method, the MAC address, the robot type, what became of the address
-- (identified, live without an identity, host key changed, ...) and why.
ALTER TABLE discovery_results
    ADD COLUMN mac_address TEXT,
    ADD COLUMN robot_type  TEXT,
    ADD COLUMN outcome     TEXT NOT NULL DEFAULT 'found',
    ADD COLUMN detail      TEXT;
