//! `[sidecar]` (routes, sync, tokens, egress, TLS) validated into `SidecarConfig`.

use super::*;

/// Reads the sidecar's sync key from its file or environment variable.
pub fn read_sync_credential(s: &file::Sync) -> Result<Secret, ConfigError> {
    let value = match &s.credential_file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| invalid("sidecar.sync.credential_file", format!("{p}: {e}")))?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        None => std::env::var(&s.credential_env).map_err(|_| {
            invalid(
                "sidecar.sync.credential_env",
                format!("environment variable {} is not set", s.credential_env),
            )
        })?,
    };
    if value.is_empty() {
        return Err(invalid("sidecar.sync", "the sync credential is empty"));
    }
    Ok(Secret::new(value))
}

/// `mode = "enforce" | "shadow"`: true for shadow.
fn shadow_mode(field: &str, mode: &str) -> Result<bool, ConfigError> {
    match mode {
        "enforce" => Ok(false),
        "shadow" => Ok(true),
        _ => Err(invalid(field, "mode must be \"enforce\" or \"shadow\"")),
    }
}

fn build_routes(routes: &[file::Route], case_sensitive: bool, mode: &str) -> Result<RouteTable, ConfigError> {
    let shadow_all = shadow_mode("sidecar.mode", mode)?;
    let mut out = Vec::with_capacity(routes.len());
    for (i, r) in routes.iter().enumerate() {
        let field = format!("sidecar.routes[{i}]");
        if !r.prefix.starts_with('/') {
            return Err(invalid(
                field,
                format!("prefix {:?} must start with '/'", r.prefix),
            ));
        }
        // Requests are routed on their canonical path, so a prefix in another spelling could
        // never match.
        match crate::core::path::canonicalize(&r.prefix) {
            Ok(c) if c == r.prefix => {}
            Ok(c) => {
                return Err(invalid(
                    &field,
                    format!(
                        "prefix {:?} is not in canonical form; write it as {c:?}",
                        r.prefix
                    ),
                ))
            }
            Err(e) => {
                return Err(invalid(
                    &field,
                    format!("prefix {:?}: {}", r.prefix, e.describe()),
                ))
            }
        }
        let methods: Vec<String> = r.methods.iter().map(|m| m.to_ascii_uppercase()).collect();
        if let Some(m) = methods
            .iter()
            .find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()))
        {
            return Err(invalid(&field, format!("method {m:?} is not a method name")));
        }
        let access = match (r.public, r.scopes.is_empty()) {
            (true, true) => Access::Public,
            (true, false) => return Err(invalid(field, "a public route cannot require scopes")),
            (false, true) => {
                return Err(invalid(
                    field,
                    "a protected route needs at least one scope (or public = true)",
                ))
            }
            (false, false) => Access::Scopes(
                r.scopes
                    .iter()
                    .map(|s| Scope::parse(s).map_err(|e| invalid(&field, e.to_string())))
                    .collect::<Result<_, _>>()?,
            ),
        };
        if r.forward_authorization && access != Access::Public {
            return Err(invalid(
                field,
                "forward_authorization applies to public routes only (protected routes never forward the credential)",
            ));
        }
        if r.trusted && access == Access::Public {
            return Err(invalid(field, "trusted applies to protected routes only"));
        }
        let mut route = Route::new(methods, r.prefix.clone(), access);
        route.forward_authorization = r.forward_authorization;
        route.trusted = r.trusted;
        route.shadow = match &r.mode {
            Some(m) => shadow_mode(&field, m)?,
            None => shadow_all,
        };
        out.push(route);
    }
    Ok(RouteTable::with_case(out, case_sensitive).shadowing_unmatched(shadow_all))
}

fn read_secret(
    field: &str,
    env: &Option<String>,
    file: &Option<String>,
) -> Result<Option<Secret>, ConfigError> {
    let value = match (env, file) {
        (Some(_), Some(_)) => return Err(invalid(field, "set the _env or the _file form, not both")),
        (Some(var), None) => std::env::var(var)
            .map_err(|_| invalid(field, format!("environment variable {var} is not set")))?,
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| invalid(field, format!("{path}: {e}")))?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        (None, None) => return Ok(None),
    };
    if value.is_empty() {
        return Err(invalid(field, "the credential is empty"));
    }
    Ok(Some(Secret::new(value)))
}

/// A client's TLS settings: a certificate and its key go together.
fn client_tls(
    field: &str,
    ca: &Option<String>,
    cert: &Option<String>,
    key: &Option<String>,
) -> Result<crate::tls::ClientTls, ConfigError> {
    if cert.is_some() != key.is_some() {
        return Err(invalid(field, "client_cert_file and client_key_file go together"));
    }
    Ok(crate::tls::ClientTls {
        ca_file: ca.as_ref().map(PathBuf::from),
        client_cert_file: cert.as_ref().map(PathBuf::from),
        client_key_file: key.as_ref().map(PathBuf::from),
    })
}

fn build_egress(e: &file::Egress, admin_url: &str) -> Result<EgressConfig, ConfigError> {
    let listen = resolve("sidecar.egress.listen", &e.listen)?;
    if !listen.ip().is_loopback() && !e.allow_non_loopback {
        return Err(invalid(
            "sidecar.egress.listen",
            "must be a loopback address (anyone who reaches it calls out with this service's credentials); set allow_non_loopback to override",
        ));
    }
    if e.destinations.is_empty() {
        return Err(invalid("sidecar.egress.destinations", "no destinations"));
    }
    let mut destinations = Vec::new();
    for (name, d) in &e.destinations {
        let field = format!("sidecar.egress.destinations.{name}");
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                &field,
                "a destination name is letters, digits, '-' and '_'",
            ));
        }
        if !(d.url.starts_with("http://") || d.url.starts_with("https://")) {
            return Err(invalid(&field, "url must be http:// or https://"));
        }
        let key = read_secret(&format!("{field}.api_key"), &d.api_key_env, &d.api_key_file)?;
        let secret = read_secret(
            &format!("{field}.client_secret"),
            &d.client_secret_env,
            &d.client_secret_file,
        )?;
        let credential = match (key, &d.client_id, secret) {
            (Some(k), None, None) => EgressCredential::ApiKey(k),
            (None, Some(id), Some(secret)) => {
                for s in &d.scopes {
                    Scope::parse(s).map_err(|e| invalid(&field, e.to_string()))?;
                }
                EgressCredential::ClientCredentials {
                    client_id: id.clone(),
                    secret,
                    scopes: d.scopes.clone(),
                    token_url: d.token_url.clone().unwrap_or_else(|| format!("{admin_url}/oauth/token")),
                }
            }
            _ => {
                return Err(invalid(
                    field,
                    "needs exactly one credential: api_key_env/api_key_file, or client_id with client_secret_env/client_secret_file",
                ))
            }
        };
        destinations.push(EgressDestination {
            tls: client_tls(&field, &d.ca_file, &d.client_cert_file, &d.client_key_file)?,
            name: name.clone(),
            url: d.url.trim_end_matches('/').to_string(),
            credential,
        });
    }
    Ok(EgressConfig {
        listen,
        retry_deadline: Duration::from_millis(e.retry_deadline_ms),
        request_timeout: Duration::from_millis(e.request_timeout_ms.max(1)),
        max_body_bytes: e.max_body_bytes,
        breaker_failures: e.breaker_failures.max(1),
        breaker_cooldown: Duration::from_millis(e.breaker_cooldown_ms),
        destinations,
    })
}

impl SidecarConfig {
    /// `credential` is passed in so tests and `permiso dev` can hand one over directly.
    pub fn from_file(f: &file::Sidecar, credential: Secret) -> Result<Self, ConfigError> {
        let environment = Environment::parse(&f.environment)
            .ok_or_else(|| invalid("sidecar.environment", "must be \"live\" or \"test\""))?;
        if f.threads == 0 || f.threads > 256 {
            return Err(invalid("sidecar.threads", "must be 1..=256"));
        }
        if !(f.sync.admin_url.starts_with("http://") || f.sync.admin_url.starts_with("https://")) {
            return Err(invalid(
                "sidecar.sync.admin_url",
                "must be an http:// or https:// URL",
            ));
        }
        if f.sync.wait_seconds == 0 || f.sync.wait_seconds > 300 {
            return Err(invalid("sidecar.sync.wait_seconds", "must be 1..=300"));
        }
        if f.max_requests_per_connection == 0 {
            return Err(invalid(
                "sidecar.max_requests_per_connection",
                "must be at least 1",
            ));
        }
        if f.usage_report_interval_ms < 10 {
            return Err(invalid("sidecar.usage_report_interval_ms", "must be at least 10"));
        }
        if f.routes.is_empty() {
            return Err(invalid(
                "sidecar.routes",
                "no routes: every request would be denied",
            ));
        }
        Ok(SidecarConfig {
            listen: {
                let a = resolve("sidecar.listen", &f.listen)?;
                if a.port() == 0 {
                    // pingora would pick a port and never say which.
                    return Err(invalid("sidecar.listen", "needs an explicit port (not 0)"));
                }
                a
            },
            upstream: resolve("sidecar.upstream", &f.upstream)?,
            environment,
            snapshot_file: PathBuf::from(&f.snapshot_file),
            threads: f.threads,
            max_requests_per_connection: f.max_requests_per_connection,
            header_read_timeout: match f.header_read_timeout_ms {
                0 => return Err(invalid("sidecar.header_read_timeout_ms", "must be at least 1")),
                ms => Duration::from_millis(ms),
            },
            idle_timeout: match f.idle_timeout_ms {
                0 => return Err(invalid("sidecar.idle_timeout_ms", "must be at least 1")),
                ms => Duration::from_millis(ms),
            },
            body_rate_grace: Duration::from_millis(f.body_rate_grace_ms),
            body_min_rate: match f.body_min_rate_bytes_per_second {
                0 => {
                    return Err(invalid(
                        "sidecar.body_min_rate_bytes_per_second",
                        "must be at least 1",
                    ))
                }
                n => n,
            },
            max_connections: match f.max_connections {
                0 => return Err(invalid("sidecar.max_connections", "must be at least 1")),
                n => n,
            },
            shutdown_grace: Duration::from_secs(f.shutdown_grace_seconds),
            admin_listen: f
                .admin_listen
                .as_deref()
                .map(|a| resolve("sidecar.admin_listen", a))
                .transpose()?,
            ready_max_snapshot_age: Duration::from_secs(f.ready_max_snapshot_age_seconds),
            metrics_max_service_labels: f.metrics_max_service_labels,
            usage_report_interval: Duration::from_millis(f.usage_report_interval_ms),
            admin_url: f.sync.admin_url.trim_end_matches('/').to_string(),
            tls: f.tls.as_ref().map(|t| server_tls("sidecar.tls", t)).transpose()?,
            sync_tls: client_tls(
                "sidecar.sync",
                &f.sync.ca_file,
                &f.sync.client_cert_file,
                &f.sync.client_key_file,
            )?,
            sync_credential: credential,
            sync_wait: Duration::from_secs(f.sync.wait_seconds),
            routes: build_routes(&f.routes, f.case_sensitive_routes, &f.mode)?,
            forwarded_for: match f.forwarded_for.as_str() {
                "overwrite" => ForwardedFor::Overwrite,
                "append" => ForwardedFor::Append,
                _ => {
                    return Err(invalid(
                        "sidecar.forwarded_for",
                        "must be \"overwrite\" or \"append\"",
                    ))
                }
            },
            egress: f
                .egress
                .as_ref()
                .map(|e| build_egress(e, f.sync.admin_url.trim_end_matches('/')))
                .transpose()?,
            rate_limit: RateLimitConfig::from_file(&f.rate_limit)?,
            tokens: {
                let t = &f.tokens;
                if t.audience.is_empty() {
                    return Err(invalid("sidecar.tokens.audience", "must not be empty"));
                }
                if t.leeway_seconds > 300 {
                    return Err(invalid("sidecar.tokens.leeway_seconds", "must be at most 300"));
                }
                TokenSettings {
                    audience: t.audience.clone(),
                    leeway_secs: t.leeway_seconds as i64,
                    cache_entries: t.cache_entries,
                    early_sync_min_interval: Duration::from_millis(t.early_sync_min_interval_ms),
                }
            },
        })
    }
}
