-- Permiso admin plane schema (SQLite, WAL), version 1 of its migrations; later versions are
-- migrations/sqlite/V<n>__*.sql (V2: services.rate_limit_scope).
-- Secrets are never stored in clear: credentials.hash is the blake3 hash of an API key or a
-- client secret; signing_keys.private_sealed is sealed with a key-encryption key kept outside
-- the database.

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
    access_token_lifetime INTEGER NOT NULL DEFAULT 3600 CHECK (access_token_lifetime BETWEEN 60 AND 86400),
    -- Access tokens issued (iat) before this are refused: set when the service is disabled, so
    -- re-enabling it does not bring its old tokens back. (Databases from before this column
    -- get it added at start: see Store::open.)
    tokens_not_before     INTEGER NOT NULL DEFAULT 0,
    created_at            INTEGER NOT NULL,         -- unix seconds
    updated_at            INTEGER NOT NULL,
    version               INTEGER NOT NULL          -- meta.version of the last change
) STRICT;

CREATE INDEX IF NOT EXISTS services_by_version ON services (version);

-- API keys (kind 'api_key') and OAuth2 client secrets (kind 'client_secret') share one
-- lifecycle: issue, rotate with a grace window, revoke.
-- Client-certificate identities (canonical: spiffe://<domain>/<path> or dns:<name>), each
-- belonging to one service at most: a certificate carrying it authenticates as that service.
CREATE TABLE IF NOT EXISTS tls_identities (
    identity   TEXT PRIMARY KEY,
    service_id TEXT NOT NULL REFERENCES services(id)
);
CREATE INDEX IF NOT EXISTS tls_identities_by_service ON tls_identities (service_id);

CREATE TABLE IF NOT EXISTS credentials (
    id             TEXT PRIMARY KEY,
    service_id     TEXT NOT NULL REFERENCES services (id),
    kind           TEXT NOT NULL CHECK (kind IN ('api_key', 'client_secret')),
    hash           BLOB NOT NULL UNIQUE CHECK (length(hash) = 32),
    display_prefix TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER,                         -- end of a rotation grace window; NULL = none
    revoked_at     INTEGER,
    last_used_at   INTEGER
) STRICT;

CREATE INDEX IF NOT EXISTS credentials_by_service ON credentials (service_id, kind);

-- Ed25519 keys that sign access tokens. A key is published (JWKS, sync) from creation and
-- signs from activates_at; it stays published until the last token it signed has expired.
CREATE TABLE IF NOT EXISTS signing_keys (
    kid            TEXT PRIMARY KEY,
    public_x       TEXT NOT NULL,                   -- base64url Ed25519 public key
    private_sealed BLOB NOT NULL,                   -- XChaCha20-Poly1305(nonce || ciphertext) of PKCS#8
    created_at     INTEGER NOT NULL,
    activates_at   INTEGER NOT NULL
) STRICT;

-- Revoked access tokens, kept only until the token would have expired anyway.
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti        TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
) STRICT;

-- Every admin action and every failed admin authentication, append-only. Each row's hash covers
-- the previous row's hash and its own fields (core/audit.rs), so an edit, removal or reorder
-- breaks the chain; `permiso audit verify` checks it. The triggers refuse updates and deletes
-- through SQL (someone who can write the file directly is caught by the chain instead).
CREATE TABLE IF NOT EXISTS audit_log (
    seq       INTEGER PRIMARY KEY,               -- 1, 2, 3, ... without gaps
    at        INTEGER NOT NULL,                  -- unix seconds
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT,
    source_ip TEXT,
    change    TEXT NOT NULL,                     -- JSON object
    prev_hash BLOB NOT NULL CHECK (length(prev_hash) = 32),
    hash      BLOB NOT NULL CHECK (length(hash) = 32)
) STRICT;

CREATE INDEX IF NOT EXISTS audit_by_target ON audit_log (target, seq);

CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;

CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
