-- Permiso admin plane schema (SQLite, WAL). Applied at startup; every statement is idempotent.
-- Secrets are never stored: api_keys.hash is the blake3 hash of the key.

CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

-- epoch: random id of this database, so sidecars never apply a delta across a database reset.
-- version: bumped by every change that sidecars must see.
INSERT OR IGNORE INTO meta (name, value) VALUES ('version', '0');

CREATE TABLE IF NOT EXISTS services (
    id                    TEXT PRIMARY KEY,
    name                  TEXT NOT NULL UNIQUE COLLATE NOCASE,
    environment           TEXT NOT NULL CHECK (environment IN ('live', 'test')),
    description           TEXT,
    contact_email         TEXT,
    is_trusted            INTEGER NOT NULL DEFAULT 0 CHECK (is_trusted IN (0, 1)),
    scopes                TEXT NOT NULL,            -- JSON array of scope strings
    rate_limit_per_minute INTEGER CHECK (rate_limit_per_minute > 0),
    rate_limit_per_hour   INTEGER CHECK (rate_limit_per_hour > 0),
    allowed_ips           TEXT NOT NULL,            -- JSON array of CIDRs; empty = anywhere
    disabled              INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
    created_at            INTEGER NOT NULL,         -- unix seconds
    updated_at            INTEGER NOT NULL,
    version               INTEGER NOT NULL          -- meta.version of the last change
) STRICT;

CREATE INDEX IF NOT EXISTS services_by_version ON services (version);

CREATE TABLE IF NOT EXISTS api_keys (
    id             TEXT PRIMARY KEY,
    service_id     TEXT NOT NULL REFERENCES services (id),
    hash           BLOB NOT NULL UNIQUE CHECK (length(hash) = 32),
    display_prefix TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER,                         -- end of a rotation grace window; NULL = none
    revoked_at     INTEGER,
    last_used_at   INTEGER
) STRICT;

CREATE INDEX IF NOT EXISTS api_keys_by_service ON api_keys (service_id);
