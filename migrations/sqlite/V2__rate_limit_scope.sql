-- Issue 14: where a service's rate limits are counted. 'sidecar': each sidecar alone (what
-- every service did before); 'cluster': one shared count across every sidecar (Redis).
ALTER TABLE services ADD COLUMN rate_limit_scope TEXT NOT NULL DEFAULT 'sidecar'
    CHECK (rate_limit_scope IN ('sidecar', 'cluster'));
