//! Configuration in two layers: `file::*` mirrors config.toml with serde defaults; `Config`
//! types are validated once (addresses resolved, scopes and routes parsed) and are what the
//! program uses. Bad config is an error, never a panic.

mod admin;
pub mod database;
pub mod file;
pub mod ratelimit;
mod sidecar;
pub use database::Database;
pub use ratelimit::RateLimitConfig;
pub use sidecar::read_sync_credential;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::core::key::{Environment, Secret};
use crate::core::routes::{Access, Route, RouteTable};
use crate::core::scope::Scope;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Validated admin plane settings.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub database: Database,
    /// From PERMISO_DATABASE_PASSWORD (read by the binary); else `database_password_file`.
    pub database_password: Option<Secret>,
    pub rotation_grace: Duration,
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_requests_per_connection: u32,
    pub max_connections: usize,
    pub sync_max_wait: Duration,
    pub sidecar_stale_after: Duration,
    /// `/console` is served.
    pub console: bool,
    pub sync_max_concurrent_per_credential: usize,
    pub max_active_keys_per_service: u32,
    pub admin_api_key: Secret,
    /// None: "http://<bound address>".
    pub issuer: Option<String>,
    pub token_audience: String,
    pub signing_key_publish_delay: Duration,
    pub token_rate_per_ip: std::num::NonZeroU32,
    pub client_auth_failures_per_minute: u32,
    pub client_auth_failures_per_minute_per_ip: u32,
    pub auth_failures_per_minute_per_ip: u32,
    pub audited_auth_failures_per_minute: u32,
    /// From PERMISO_SIGNING_KEK (read by the binary, like the admin key); None means the
    /// `<database>.kek` file.
    pub signing_kek: Option<Secret>,
    pub tls: Option<crate::tls::ServerTls>,
}

/// Validated sidecar settings.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    pub listen: SocketAddr,
    pub tls: Option<crate::tls::ServerTls>,
    /// How sync, usage reports and egress token fetches reach the admin plane.
    pub sync_tls: crate::tls::ClientTls,
    pub upstream: SocketAddr,
    pub environment: Environment,
    pub snapshot_file: PathBuf,
    pub threads: usize,
    pub max_requests_per_connection: u32,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_rate_grace: Duration,
    pub body_min_rate: u64,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    pub admin_listen: Option<SocketAddr>,
    pub ready_max_snapshot_age: Duration,
    pub metrics_max_service_labels: usize,
    pub usage_report_interval: Duration,
    pub admin_url: String,
    pub sync_credential: Secret,
    pub sync_wait: Duration,
    pub routes: RouteTable,
    pub forwarded_for: ForwardedFor,
    pub tokens: TokenSettings,
    pub egress: Option<EgressConfig>,
    pub rate_limit: RateLimitConfig,
}

/// How the sidecar sets `X-Forwarded-For` and `Forwarded` for the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedFor {
    /// The TCP peer only.
    Overwrite,
    /// The caller's values, then the TCP peer.
    Append,
}

/// Validated egress settings, with credentials already read.
#[derive(Debug, Clone)]
pub struct EgressConfig {
    pub listen: SocketAddr,
    pub retry_deadline: Duration,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    pub destinations: Vec<EgressDestination>,
}

#[derive(Debug, Clone)]
pub struct EgressDestination {
    pub name: String,
    /// Without a trailing '/'.
    pub url: String,
    pub tls: crate::tls::ClientTls,
    pub credential: EgressCredential,
}

#[derive(Debug, Clone)]
pub enum EgressCredential {
    ApiKey(Secret),
    ClientCredentials {
        client_id: String,
        secret: Secret,
        scopes: Vec<String>,
        token_url: String,
    },
}

/// How a sidecar checks JWT access tokens.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    pub audience: String,
    pub leeway_secs: i64,
    pub cache_entries: usize,
    pub early_sync_min_interval: Duration,
}

pub const MIN_ADMIN_KEY_LEN: usize = 24;

pub fn load_file(path: &Path) -> Result<file::FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_file(&text, path)
}

pub fn parse_file(text: &str, path: &Path) -> Result<file::FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(e),
    })
}

fn resolve(field: &str, addr: &str) -> Result<SocketAddr, ConfigError> {
    addr.to_socket_addrs()
        .map_err(|e| invalid(field, format!("{addr:?}: {e}")))?
        .next()
        .ok_or_else(|| invalid(field, format!("{addr:?} resolves to nothing")))
}

/// A TLS listener's settings: both files named, a CA exactly when client certificates are
/// asked for. The files themselves are read at start (and on reload), not here.
fn server_tls(field: &str, t: &file::ServerTls) -> Result<crate::tls::ServerTls, ConfigError> {
    use crate::tls::ClientAuth;
    if t.cert_file.is_empty() || t.key_file.is_empty() {
        return Err(invalid(field, "cert_file and key_file are both required"));
    }
    let client_auth = match t.client_auth {
        file::ClientAuthMode::Off => ClientAuth::Off,
        file::ClientAuthMode::Optional => ClientAuth::Optional,
        file::ClientAuthMode::Required => ClientAuth::Required,
    };
    match (client_auth, &t.client_ca_file) {
        (ClientAuth::Off, Some(_)) => {
            return Err(invalid(
                format!("{field}.client_ca_file"),
                "set while client_auth is \"off\": no client certificate would be asked for; set client_auth = \"optional\" or \"required\"",
            ))
        }
        (ClientAuth::Optional | ClientAuth::Required, None) => {
            return Err(invalid(
                format!("{field}.client_ca_file"),
                "required when client_auth is \"optional\" or \"required\"",
            ))
        }
        _ => {}
    }
    Ok(crate::tls::ServerTls {
        cert_file: PathBuf::from(&t.cert_file),
        key_file: PathBuf::from(&t.key_file),
        client_ca_file: t.client_ca_file.as_ref().map(PathBuf::from),
        client_auth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_toml_is_valid() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"));
        let f = load_file(path).unwrap();
        AdminConfig::from_file(&f.admin_plane, Some("x".repeat(32))).unwrap();
        assert_eq!(f.admin_plane.rotation_grace_seconds, 604_800);
        let sc = SidecarConfig::from_file(f.sidecar.as_ref().unwrap(), Secret::new("k".into())).unwrap();
        assert!(sc.routes.find("GET", "/health").is_some());
        assert!(sc.routes.find("GET", "/api/v1/trades").is_some());
    }

    #[test]
    fn example_configs_parse() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"));
        let mut n = 0;
        for sub in [dir.to_path_buf(), dir.join("compose")] {
            for entry in std::fs::read_dir(&sub).unwrap() {
                let p = entry.unwrap().path();
                if p.extension().is_some_and(|e| e == "toml") {
                    let f = load_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                    // The admin plane's validated as `permiso admin` would (the certificate
                    // files are read at start, not here).
                    if p.file_name().is_some_and(|n| n == "admin.toml") {
                        let a = AdminConfig::from_file(&f.admin_plane, Some("x".repeat(32)))
                            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                        assert!(a.tls.is_some(), "{}: the example serves HTTPS", p.display());
                    } else {
                        // Parsed only: validating a sidecar file reads the egress key files,
                        // which examples/setup.sh writes (tests/it/e2e.rs starts them).
                        let s = f.sidecar.as_ref().unwrap_or_else(|| panic!("{}", p.display()));
                        assert!(s.tls.is_some(), "{}: the example serves HTTPS", p.display());
                    }
                    n += 1;
                }
            }
        }
        assert_eq!(n, 6);
    }

    #[test]
    fn egress_must_bind_loopback_and_name_one_credential() {
        std::env::set_var("PERMISO_TEST_EGRESS_KEY", "svc_live_x");
        let base = "[sidecar.egress]\nlisten = \"{L}\"\n[sidecar.egress.destinations.a]\nurl = \"http://127.0.0.1:9\"\n{C}\n[[sidecar.routes]]\nprefix = \"/x\"\npublic = true\n";
        let cfg = |listen: &str, cred: &str| sidecar(&base.replace("{L}", listen).replace("{C}", cred));
        assert!(cfg("127.0.0.1:9100", "api_key_env = \"PERMISO_TEST_EGRESS_KEY\"")
            .unwrap()
            .egress
            .is_some());
        assert!(
            cfg("0.0.0.0:9100", "api_key_env = \"PERMISO_TEST_EGRESS_KEY\"").is_err(),
            "non-loopback"
        );
        assert!(cfg("127.0.0.1:9100", "").is_err(), "no credential");
        assert!(cfg(
            "127.0.0.1:9100",
            "api_key_env = \"PERMISO_TEST_EGRESS_KEY\"\nclient_id = \"srv_a\"\nclient_secret_env = \"PERMISO_TEST_EGRESS_KEY\""
        )
        .is_err(), "two credentials");
        assert!(
            cfg("127.0.0.1:9100", "api_key_env = \"PERMISO_TEST_UNSET_VAR\"").is_err(),
            "unset variable"
        );
    }

    #[test]
    fn tls_settings_name_a_ca_exactly_when_client_certificates_are_asked_for() {
        let route = "[[sidecar.routes]]\nprefix = \"/x\"\npublic = true\n";
        let tls = |extra: &str| {
            sidecar(&format!(
                "[sidecar.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n{extra}\n{route}"
            ))
        };
        let off = tls("").unwrap().tls.unwrap();
        assert_eq!(off.client_auth, crate::tls::ClientAuth::Off);
        assert_eq!(off.cert_file, PathBuf::from("c.pem"));
        let err = |extra: &str| match tls(extra) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("{extra:?} accepted: {other:?}"),
        };
        assert_eq!(
            err("client_ca_file = \"ca.pem\""),
            "sidecar.tls.client_ca_file",
            "a CA that does nothing"
        );
        assert_eq!(err("client_auth = \"optional\""), "sidecar.tls.client_ca_file");
        assert_eq!(err("client_auth = \"required\""), "sidecar.tls.client_ca_file");
        assert!(tls("client_auth = \"sometimes\"\nclient_ca_file = \"ca.pem\"").is_err());
        let req = tls("client_auth = \"required\"\nclient_ca_file = \"ca.pem\"")
            .unwrap()
            .tls
            .unwrap();
        assert_eq!(req.client_auth, crate::tls::ClientAuth::Required);
        assert!(
            sidecar(&format!("[sidecar.tls]\ncert_file = \"c.pem\"\n{route}")).is_err(),
            "no key_file"
        );
        // Client side: a certificate needs its key.
        let sync = |extra: &str| {
            let text = format!("[sidecar]\nupstream = \"127.0.0.1:1\"\n[sidecar.sync]\nadmin_url = \"https://a\"\n{extra}\n{route}");
            let f = parse_file(&text, std::path::Path::new("t.toml")).unwrap();
            SidecarConfig::from_file(f.sidecar.as_ref().unwrap(), Secret::new("k".into()))
        };
        assert!(sync("client_cert_file = \"c.pem\"").is_err());
        let ok =
            sync("ca_file = \"ca.pem\"\nclient_cert_file = \"c.pem\"\nclient_key_file = \"k.pem\"").unwrap();
        assert_eq!(ok.sync_tls.ca_file, Some(PathBuf::from("ca.pem")));
    }

    fn sidecar(extra: &str) -> Result<SidecarConfig, ConfigError> {
        let text = format!(
            "[sidecar]\nupstream = \"127.0.0.1:8001\"\n[sidecar.sync]\nadmin_url = \"http://127.0.0.1:8000\"\n{extra}"
        );
        let f = parse_file(&text, Path::new("t.toml"))?;
        SidecarConfig::from_file(f.sidecar.as_ref().unwrap(), Secret::new("k".into()))
    }

    #[test]
    fn bad_configs_are_errors() {
        assert!(sidecar("").is_err(), "no routes");
        assert!(
            sidecar("[[sidecar.routes]]\nprefix = \"/x\"\n").is_err(),
            "no scopes, not public"
        );
        assert!(sidecar("[[sidecar.routes]]\nprefix = \"/x\"\npublic = true\nscopes = [\"a:b\"]\n").is_err());
        assert!(sidecar("[[sidecar.routes]]\nprefix = \"x\"\npublic = true\n").is_err());
        assert!(sidecar("[[sidecar.routes]]\nprefix = \"/x\"\nscopes = [\"a::b\"]\n").is_err());
        assert!(sidecar("[[sidecar.routes]]\nprefix = \"/x\"\npublic = true\nbogus = 1\n").is_err());
        assert!(sidecar("[[sidecar.routes]]\nprefix = \"/x\"\npublic = true\n").is_ok());
        // Prefixes must be canonical: requests are routed on their canonical path.
        for bad in [
            "/a/../b", "/a;b", "/a%2fb", "/a//b", "/%61", "/a%3a", "/a.", "/a%c3",
        ] {
            let err = sidecar(&format!(
                "[[sidecar.routes]]\nprefix = \"{bad}\"\npublic = true\n"
            ))
            .unwrap_err();
            assert!(err.to_string().contains("prefix"), "{bad}: {err}");
        }
        assert!(sidecar("[[sidecar.routes]]\nprefix = \"/caf%C3%A9\"\npublic = true\n").is_ok());
        assert!(
            sidecar(
                "[[sidecar.routes]]\nprefix = \"/x\"\nscopes = [\"a:b\"]\nforward_authorization = true\n"
            )
            .is_err(),
            "forward_authorization on a protected route"
        );
        let text = "[sidecar]\nupstream = \"127.0.0.1:8001\"\ncase_sensitive_routes = true\n[sidecar.sync]\nadmin_url = \"http://127.0.0.1:8000\"\n[[sidecar.routes]]\nprefix = \"/x\"\npublic = true\nforward_authorization = true\n";
        let f = parse_file(text, Path::new("t.toml")).unwrap();
        let opt_in = SidecarConfig::from_file(f.sidecar.as_ref().unwrap(), Secret::new("k".into())).unwrap();
        assert!(opt_in.routes.case_sensitive());
        assert!(matches!(
            opt_in.routes.find("GET", "/x").map(|r| r.forward_authorization),
            Some(true)
        ));
        assert!(opt_in.routes.find("GET", "/X").is_none());
        let append = parse_file(
            &text.replace("case_sensitive_routes = true", "forwarded_for = \"append\""),
            Path::new("t.toml"),
        )
        .unwrap();
        let append =
            SidecarConfig::from_file(append.sidecar.as_ref().unwrap(), Secret::new("k".into())).unwrap();
        assert_eq!(append.forwarded_for, ForwardedFor::Append);
        let bad = parse_file(
            &text.replace("case_sensitive_routes = true", "forwarded_for = \"keep\""),
            Path::new("t.toml"),
        )
        .unwrap();
        assert!(SidecarConfig::from_file(bad.sidecar.as_ref().unwrap(), Secret::new("k".into())).is_err());
        assert!(!sidecar("[[sidecar.routes]]\nprefix = \"/x\"\npublic = true\n")
            .unwrap()
            .routes
            .case_sensitive());
        let port_zero = "[sidecar]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\n[sidecar.sync]\nadmin_url = \"http://127.0.0.1:2\"\n[[sidecar.routes]]\nprefix = \"/\"\npublic = true\n";
        let f = parse_file(port_zero, Path::new("t.toml")).unwrap();
        let err = SidecarConfig::from_file(f.sidecar.as_ref().unwrap(), Secret::new("k".into())).unwrap_err();
        assert!(err.to_string().contains("sidecar.listen"), "{err}");
        assert!(AdminConfig::from_file(&file::AdminPlane::default(), None).is_err());
        assert!(AdminConfig::from_file(&file::AdminPlane::default(), Some("short".into())).is_err());
    }
}
