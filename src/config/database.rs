//! `[admin_plane] database`: a SQLite file (the default) or a `postgres://` URL. The password of
//! a PostgreSQL URL never sits in the config file: it comes from `PERMISO_DATABASE_PASSWORD`
//! or `database_password_file` (read at start, not here: validation does no I/O).

use std::path::PathBuf;
use std::str::FromStr;

use super::{invalid, ConfigError};

/// Where the admin plane keeps its state.
#[derive(Debug, Clone)]
pub enum Database {
    Sqlite(PathBuf),
    Postgres(Box<Postgres>),
}

#[derive(Debug, Clone)]
pub struct Postgres {
    /// Host, port, user, database and options from the URL; no password.
    pub config: tokio_postgres::Config,
    /// The URL without credentials, for logs.
    pub display: String,
    pub password_file: Option<PathBuf>,
    pub pool_size: usize,
}

impl Database {
    pub fn is_postgres(&self) -> bool {
        matches!(self, Database::Postgres(_))
    }

    /// For logs: the file, or the URL without credentials.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite(p) => p.display().to_string(),
            Database::Postgres(p) => p.display.clone(),
        }
    }
}

pub fn parse(value: &str, password_file: Option<&str>, pool_size: usize) -> Result<Database, ConfigError> {
    const KEY: &str = "admin_plane.database";
    if !(1..=256).contains(&pool_size) {
        return Err(invalid("admin_plane.database_pool_size", "must be 1..=256"));
    }
    let is_url = value.starts_with("postgres://") || value.starts_with("postgresql://");
    if !is_url {
        if value.contains("://") {
            return Err(invalid(KEY, "a URL must start with postgres:// or postgresql://"));
        }
        if password_file.is_some() {
            return Err(invalid(
                "admin_plane.database_password_file",
                "only for a postgres:// database",
            ));
        }
        if value.is_empty() {
            return Err(invalid(KEY, "must name a SQLite file or a postgres:// URL"));
        }
        return Ok(Database::Sqlite(PathBuf::from(value)));
    }
    let config = tokio_postgres::Config::from_str(value).map_err(|e| invalid(KEY, e.to_string()))?;
    if config.get_password().is_some() {
        return Err(invalid(
            KEY,
            "the URL carries a password: put it in PERMISO_DATABASE_PASSWORD or database_password_file, never in the config file",
        ));
    }
    if config.get_dbname().is_none_or(str::is_empty) {
        return Err(invalid(
            KEY,
            "the URL must name a database (postgres://user@host/dbname)",
        ));
    }
    // No TLS client for PostgreSQL yet: a URL that asks for it would fail at the first
    // connection; refuse it now, with the reason.
    if !matches!(
        config.get_ssl_mode(),
        tokio_postgres::config::SslMode::Disable | tokio_postgres::config::SslMode::Prefer
    ) {
        return Err(invalid(
            KEY,
            "sslmode=require is not supported yet: reach PostgreSQL over loopback or a private network",
        ));
    }
    let host = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    let display = format!(
        "postgres://{}@{host}:{}/{}",
        config.get_user().unwrap_or(""),
        config.get_ports().first().copied().unwrap_or(5432),
        config.get_dbname().unwrap_or("")
    );
    Ok(Database::Postgres(Box::new(Postgres {
        config,
        display,
        password_file: password_file.map(PathBuf::from),
        pool_size,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_files_and_postgres_urls() {
        assert!(
            matches!(parse("permiso.db", None, 16).unwrap(), Database::Sqlite(p) if p == std::path::Path::new("permiso.db"))
        );
        let pg = parse(
            "postgres://permiso@db.internal:5433/permiso",
            Some("/run/secrets/pg"),
            8,
        )
        .unwrap();
        let Database::Postgres(p) = pg else { panic!() };
        assert_eq!(p.display, "postgres://permiso@db.internal:5433/permiso");
        assert_eq!(p.pool_size, 8);
        assert_eq!(p.password_file, Some(PathBuf::from("/run/secrets/pg")));
        assert!(p.config.get_password().is_none());
        assert!(parse("postgresql://u@h/d", None, 16).unwrap().is_postgres());
    }

    #[test]
    fn refused_with_the_reason() {
        for (value, file, pool, why) in [
            ("postgres://u:secret@h/d", None, 16, "password"),
            ("postgres://u@h", None, 16, "name a database"),
            ("postgres://u@h/d?sslmode=require", None, 16, "sslmode"),
            ("postgres://u@h/d", None, 0, "1..=256"),
            ("permiso.db", None, 257, "1..=256"),
            ("mysql://u@h/d", None, 16, "postgres://"),
            ("", None, 16, "SQLite file"),
            ("permiso.db", Some("/pw"), 16, "only for a postgres"),
        ] {
            let e = parse(value, file, pool).unwrap_err().to_string();
            assert!(e.contains(why), "{value}: {e}");
            assert!(!e.contains("secret"), "the password reached the error: {e}");
        }
    }
}
