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
    /// CA bundle the server's certificate must chain to with `sslmode=require` (TLS is used
    /// then only, always verified); None: the system roots.
    pub ca_file: Option<PathBuf>,
}

impl Postgres {
    /// Whether the password and the data may cross a network in clear: TLS not required
    /// (`sslmode` disable or prefer) and a host that is not this machine.
    pub fn clear_to_another_host(&self) -> bool {
        use tokio_postgres::config::{Host, SslMode};
        let required = matches!(self.config.get_ssl_mode(), SslMode::Require);
        !required
            && self.config.get_hosts().iter().any(|h| match h {
                Host::Tcp(name) => !matches!(name.as_str(), "localhost" | "127.0.0.1" | "::1"),
                Host::Unix(_) => false,
            })
    }
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

pub fn parse(
    value: &str,
    password_file: Option<&str>,
    pool_size: usize,
    ca_file: Option<&str>,
) -> Result<Database, ConfigError> {
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
        if ca_file.is_some() {
            return Err(invalid(
                "admin_plane.database_ca_file",
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
    // The CA is only used for TLS, and TLS only with sslmode=require: a CA without it would be
    // accepted and do nothing (a plain connection the operator believes verified).
    if ca_file.is_some() && !matches!(config.get_ssl_mode(), tokio_postgres::config::SslMode::Require) {
        return Err(invalid(
            "admin_plane.database_ca_file",
            "needs ?sslmode=require in the database URL (without it no TLS is used)",
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
        ca_file: ca_file.map(PathBuf::from),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_files_and_postgres_urls() {
        assert!(
            matches!(parse("permiso.db", None, 16, None).unwrap(), Database::Sqlite(p) if p == std::path::Path::new("permiso.db"))
        );
        let pg = parse(
            "postgres://permiso@db.internal:5433/permiso",
            Some("/run/secrets/pg"),
            8,
            None,
        )
        .unwrap();
        let Database::Postgres(p) = pg else { panic!() };
        assert_eq!(p.display, "postgres://permiso@db.internal:5433/permiso");
        assert_eq!(p.pool_size, 8);
        assert_eq!(p.password_file, Some(PathBuf::from("/run/secrets/pg")));
        assert!(p.config.get_password().is_none());
        assert!(parse("postgresql://u@h/d", None, 16, None).unwrap().is_postgres());
    }

    #[test]
    fn refused_with_the_reason() {
        assert!(parse("postgres://u@h/d?sslmode=require", None, 16, Some("/ca.pem")).is_ok());
        let e = parse("permiso.db", None, 16, Some("/ca.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("only for a postgres"), "{e}");
        let clear = |url: &str| match parse(url, None, 16, None).unwrap() {
            Database::Postgres(p) => p.clear_to_another_host(),
            Database::Sqlite(_) => unreachable!(),
        };
        assert!(clear("postgres://u@db.internal/d"));
        assert!(clear("postgres://u@db.internal/d?sslmode=prefer"));
        assert!(!clear("postgres://u@db.internal/d?sslmode=require"));
        assert!(!clear("postgres://u@127.0.0.1/d"));
        assert!(!clear("postgres://u@localhost/d?sslmode=disable"));
        for (value, file, pool, why) in [
            ("postgres://u:secret@h/d", None, 16, "password"),
            ("postgres://u@h", None, 16, "name a database"),
            ("postgres://u@h/d", None, 0, "1..=256"),
            ("permiso.db", None, 257, "1..=256"),
            ("mysql://u@h/d", None, 16, "postgres://"),
            ("", None, 16, "SQLite file"),
            ("permiso.db", Some("/pw"), 16, "only for a postgres"),
        ] {
            let e = parse(value, file, pool, None).unwrap_err().to_string();
            assert!(e.contains(why), "{value}: {e}");
            assert!(!e.contains("secret"), "the password reached the error: {e}");
        }
    }
}
