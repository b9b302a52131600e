-- Issue 16: a credential's own expiry beside a rotation's grace end. `expires_at` stays the
-- moment it stops working (the earlier of the two), which every reader already honours;
-- `grace_ends_at` says it was rotated out (status "grace", reason grace_ended), and
-- `key_expires_at` is the expiry an admin set (kept so a later change can recompute the end).
-- Every end recorded before this migration was a rotation's grace end.
ALTER TABLE credentials ADD COLUMN grace_ends_at INTEGER;
ALTER TABLE credentials ADD COLUMN key_expires_at INTEGER;
UPDATE credentials SET grace_ends_at = expires_at WHERE expires_at IS NOT NULL;

-- Issue 16: the sidecars that sync from this database, as each last reported itself, so any
-- replica can list the fleet and tell which sidecars have applied a version.
CREATE TABLE sidecars (
    instance_id     TEXT PRIMARY KEY,
    credential      TEXT NOT NULL,
    service_id      TEXT,
    epoch           TEXT NOT NULL,
    applied_version INTEGER,
    first_seen      INTEGER NOT NULL,
    last_seen       INTEGER NOT NULL,
    report          TEXT NOT NULL
);
