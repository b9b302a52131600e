//! Versioned schema migrations (refinery), one list per backend. Version 1 of SQLite is
//! schema.sql, the readable reference; PostgreSQL's is migrations/postgres/V1__initial.sql.
//! Later changes are `migrations/{sqlite,postgres}/V<n>__…sql`, one per backend. refinery records what ran in
//! `refinery_schema_history` and refuses a database whose applied migrations differ from ours
//! (edited or missing ones).
//!
//! SQLite (one process) migrates itself at start. PostgreSQL replicas never do: `permiso
//! migrate` applies, and a replica only checks, refusing to serve on a schema older or newer
//! than it knows, so two replicas of different releases cannot both write.

use refinery::{Migration, Runner};

use super::{StoreError, StoreResult};

const SQLITE: [(&str, &str); 3] = [
    ("V1__initial", include_str!("../../../schema.sql")),
    (
        "V2__rate_limit_scope",
        include_str!("../../../migrations/sqlite/V2__rate_limit_scope.sql"),
    ),
    (
        "V3__key_lifecycle",
        include_str!("../../../migrations/sqlite/V3__key_lifecycle.sql"),
    ),
];
const POSTGRES: [(&str, &str); 3] = [
    (
        "V1__initial",
        include_str!("../../../migrations/postgres/V1__initial.sql"),
    ),
    (
        "V2__rate_limit_scope",
        include_str!("../../../migrations/postgres/V2__rate_limit_scope.sql"),
    ),
    (
        "V3__key_lifecycle",
        include_str!("../../../migrations/postgres/V3__key_lifecycle.sql"),
    ),
];

fn runner(list: &[(&str, &str)]) -> Runner {
    let migrations: Vec<Migration> = list
        .iter()
        .map(|(name, sql)| Migration::unapplied(name, sql).expect("migration names are V<n>__<name>"))
        .collect();
    Runner::new(&migrations)
}

/// The schema version this binary knows for each backend.
pub fn known(postgres: bool) -> u32 {
    let list: &[(&str, &str)] = if postgres { &POSTGRES } else { &SQLITE };
    list.len() as u32
}

fn err(e: refinery::Error) -> StoreError {
    StoreError::Schema(format!("schema migration: {e}"))
}

/// Compares the applied version with the known one.
pub fn judge(applied: Option<u32>, known: u32) -> StoreResult<()> {
    match applied {
        Some(a) if a > known => Err(StoreError::Schema(format!(
            "the database schema is at version {a}, newer than this binary knows ({known}): upgrade permiso"
        ))),
        Some(a) if a == known => Ok(()),
        a => Err(StoreError::Schema(format!(
            "the database schema is at version {}, this binary needs {known}: run `permiso migrate`",
            a.unwrap_or(0)
        ))),
    }
}

/// Brings a SQLite database to the current schema. Databases from before versioned
/// migrations (schema.sql applied at every start) are already at version 1: its statements
/// are idempotent, so recording it is all that happens to them.
pub fn sqlite(conn: &mut rusqlite::Connection) -> StoreResult<()> {
    let r = runner(&SQLITE);
    // A newer binary's database must not be touched by an older one.
    let applied = r
        .get_last_applied_migration(conn)
        .ok()
        .flatten()
        .map(|m| m.version());
    if let Some(a) = applied.filter(|a| *a > known(false)) {
        return judge(Some(a), known(false));
    }
    r.run(conn).map_err(err)?;
    Ok(())
}

/// Applies PostgreSQL migrations (`permiso migrate`). Returns the versions applied now.
pub async fn postgres_apply(client: &mut tokio_postgres::Client) -> StoreResult<Vec<u32>> {
    let r = runner(&POSTGRES);
    let applied = postgres_applied(client).await?;
    if let Some(a) = applied.filter(|a| *a > known(true)) {
        return judge(Some(a), known(true)).map(|_| vec![]);
    }
    let report = r.run_async(client).await.map_err(err)?;
    Ok(report.applied_migrations().iter().map(|m| m.version()).collect())
}

/// The last applied PostgreSQL migration, None on a database never migrated.
pub async fn postgres_applied(client: &mut tokio_postgres::Client) -> StoreResult<Option<u32>> {
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_name = 'refinery_schema_history' AND table_schema = current_schema())",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let v: Option<i32> = client
        .query_one("SELECT max(version) FROM refinery_schema_history", &[])
        .await?
        .get(0);
    Ok(v.map(|v| v as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_refuses_an_older_or_newer_schema() {
        assert!(judge(Some(1), 1).is_ok());
        let older = judge(None, 1).unwrap_err().to_string();
        assert!(
            older.contains("version 0") && older.contains("permiso migrate"),
            "{older}"
        );
        let behind = judge(Some(1), 2).unwrap_err().to_string();
        assert!(behind.contains("run `permiso migrate`"), "{behind}");
        let newer = judge(Some(3), 2).unwrap_err().to_string();
        assert!(newer.contains("newer") && newer.contains("upgrade"), "{newer}");
    }

    #[test]
    fn a_version_1_sqlite_database_gains_the_rate_limit_scope() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        runner(&SQLITE[..1]).run(&mut conn).unwrap();
        conn.execute(
            "INSERT INTO services (id, name, environment, scopes, allowed_ips, created_at, updated_at, version)
             VALUES ('srv_old', 'old', 'live', '[]', '[]', 1, 1, 1)",
            [],
        )
        .unwrap();
        sqlite(&mut conn).unwrap();
        let scope: String = conn
            .query_row(
                "SELECT rate_limit_scope FROM services WHERE id = 'srv_old'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            scope, "sidecar",
            "existing services keep being counted by each sidecar"
        );
        let bad = conn.execute("UPDATE services SET rate_limit_scope = 'global'", []);
        assert!(bad.is_err(), "the column only takes the two scopes");
    }

    /// Every end recorded before version 3 was a rotation's grace end: it stays one.
    #[test]
    fn a_version_2_sqlite_database_keeps_its_grace_ends() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        runner(&SQLITE[..2]).run(&mut conn).unwrap();
        conn.execute_batch(
            "INSERT INTO services (id, name, environment, scopes, allowed_ips, created_at, updated_at, version)
               VALUES ('srv_old', 'old', 'live', '[]', '[]', 1, 1, 1);
             INSERT INTO credentials (id, service_id, kind, hash, display_prefix, created_at, expires_at)
               VALUES ('key_rotated', 'srv_old', 'api_key', zeroblob(32), 'svc_live_AAAA', 1, 500),
                      ('key_plain', 'srv_old', 'api_key', randomblob(32), 'svc_live_BBBB', 1, NULL);",
        )
        .unwrap();
        sqlite(&mut conn).unwrap();
        let ends: Vec<(String, Option<i64>, Option<i64>)> = conn
            .prepare("SELECT id, grace_ends_at, key_expires_at FROM credentials ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            ends,
            [
                ("key_plain".into(), None, None),
                ("key_rotated".into(), Some(500), None)
            ]
        );
        let n: i64 = conn
            .query_row("SELECT count(*) FROM sidecars", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn sqlite_migrates_once_and_refuses_a_newer_database() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        sqlite(&mut conn).unwrap();
        sqlite(&mut conn).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM refinery_schema_history", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, known(false) as i64);
        conn.execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) VALUES (9, 'future', '2026-01-01T00:00:00Z', '0')",
            [],
        )
        .unwrap();
        let e = sqlite(&mut conn).unwrap_err().to_string();
        assert!(e.contains("newer"), "{e}");
    }
}
