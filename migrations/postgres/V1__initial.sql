-- Permiso admin plane schema, PostgreSQL (several replicas). The same tables as schema.sql
-- (the SQLite reference, read that one for what each column means); differences: BIGINT and
-- BOOLEAN types, BYTEA hashes, a `seq` column (bigserial) where SQLite orders by rowid, a
-- case-insensitive unique index for service names, and append-only triggers in PL/pgSQL.
-- Applied by `permiso migrate` (refinery), never by a serving replica.

CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- version: bumped by every change sidecars must see, by an UPDATE of this row inside the
-- change's transaction. The row lock it takes is held until commit, so writers are serialized
-- and versions commit in increasing order (a sequence would not: a smaller number can commit
-- later, and a sidecar that read past it would miss that change forever).
INSERT INTO meta (name, value) VALUES ('version', '0');
-- epoch: random id of this database (sidecars never apply a delta across a database reset).
INSERT INTO meta (name, value) VALUES ('epoch', replace(gen_random_uuid()::text, '-', ''));

CREATE TABLE services (
    seq                   BIGSERIAL UNIQUE,          -- creation order
    id                    TEXT PRIMARY KEY,
    name                  TEXT NOT NULL,
    environment           TEXT NOT NULL CHECK (environment IN ('live', 'test')),
    description           TEXT,
    contact_email         TEXT,
    is_trusted            BOOLEAN NOT NULL DEFAULT false,
    scopes                TEXT NOT NULL,             -- JSON array
    rate_limit_per_minute BIGINT CHECK (rate_limit_per_minute > 0),
    rate_limit_per_hour   BIGINT CHECK (rate_limit_per_hour > 0),
    allowed_ips           TEXT NOT NULL,             -- JSON array of CIDRs
    disabled              BOOLEAN NOT NULL DEFAULT false,
    access_token_lifetime BIGINT NOT NULL DEFAULT 3600 CHECK (access_token_lifetime BETWEEN 60 AND 86400),
    tokens_not_before     BIGINT NOT NULL DEFAULT 0,
    created_at            BIGINT NOT NULL,
    updated_at            BIGINT NOT NULL,
    version               BIGINT NOT NULL
);

-- SQLite's COLLATE NOCASE folds ASCII only; names are ASCII (validated), so lower() agrees.
CREATE UNIQUE INDEX services_name_nocase ON services (lower(name));
CREATE INDEX services_by_version ON services (version);

CREATE TABLE tls_identities (
    seq        BIGSERIAL UNIQUE,
    identity   TEXT PRIMARY KEY,
    service_id TEXT NOT NULL REFERENCES services (id)
);
CREATE INDEX tls_identities_by_service ON tls_identities (service_id);

CREATE TABLE credentials (
    seq            BIGSERIAL UNIQUE,
    id             TEXT PRIMARY KEY,
    service_id     TEXT NOT NULL REFERENCES services (id),
    kind           TEXT NOT NULL CHECK (kind IN ('api_key', 'client_secret')),
    hash           BYTEA NOT NULL UNIQUE CHECK (length(hash) = 32),
    display_prefix TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT,
    revoked_at     BIGINT,
    last_used_at   BIGINT
);
CREATE INDEX credentials_by_service ON credentials (service_id, kind);

CREATE TABLE signing_keys (
    seq            BIGSERIAL UNIQUE,
    kid            TEXT PRIMARY KEY,
    public_x       TEXT NOT NULL,
    private_sealed BYTEA NOT NULL,
    created_at     BIGINT NOT NULL,
    activates_at   BIGINT NOT NULL
);

CREATE TABLE revoked_tokens (
    jti        TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);

-- One chain across replicas: an append holds the meta 'version' row lock (every writer takes
-- it first), so seq has no gaps and each entry's prev_hash is the entry before it.
CREATE TABLE audit_log (
    seq       BIGINT PRIMARY KEY,
    at        BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT,
    source_ip TEXT,
    change    TEXT NOT NULL,
    prev_hash BYTEA NOT NULL CHECK (length(prev_hash) = 32),
    hash      BYTEA NOT NULL CHECK (length(hash) = 32)
);
CREATE INDEX audit_by_target ON audit_log (target, seq);

CREATE FUNCTION permiso_audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END
$$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION permiso_audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION permiso_audit_log_append_only();
