//! The operator CLI: `permiso services …`, `permiso audit [verify]` and `permiso signing-keys …`
//! talk to the admin API (URL and admin key from flags or the environment). People get tables,
//! scripts get `--json` (the API's own JSON). Every failure the API can return maps to one exit
//! code and a one-line message on stderr, so scripts can branch on it.

use serde_json::{json, Value};

use crate::core::audit::{AuditEntry, Verifier};

pub mod args;
mod fleet;
pub use args::{AdminArgs, AuditCmd, AuditFilter, ServicesCmd, SigningKeysCmd};
pub use fleet::{keys, sidecars, KeysCmd, WaitArgs};

/// Exit codes; 2 is clap's own for bad usage.
pub mod exit {
    pub const UNREACHABLE: u8 = 3;
    pub const UNAUTHORIZED: u8 = 4;
    pub const NOT_FOUND: u8 = 5;
    pub const CONFLICT: u8 = 6;
    pub const INVALID: u8 = 7;
    pub const RATE_LIMITED: u8 = 8;
    pub const SERVER: u8 = 9;
    pub const CHAIN_BROKEN: u8 = 10;
    /// `--wait-applied` timed out: some live sidecar does not hold the change yet.
    pub const NOT_APPLIED: u8 = 11;
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    fn new(code: u8, message: impl Into<String>) -> CliError {
        CliError {
            code,
            message: message.into(),
        }
    }
}

struct Api {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Api {
    fn new(a: &AdminArgs) -> Result<Api, CliError> {
        // reqwest's own message for a URL without a scheme is "builder error".
        if !(a.admin_url.starts_with("http://") || a.admin_url.starts_with("https://")) {
            return Err(CliError::new(
                exit::INVALID,
                format!(
                    "--admin-url / PERMISO_ADMIN_URL {:?} needs a scheme: http://{} or https://{}",
                    a.admin_url, a.admin_url, a.admin_url
                ),
            ));
        }
        let tls = crate::tls::ClientTls {
            ca_file: a.ca_file.clone(),
            ..Default::default()
        };
        let http = crate::tls::client::http_client(
            &tls,
            reqwest::Client::builder().timeout(std::time::Duration::from_secs(30)),
        )
        .map_err(|e| CliError::new(1, e.to_string()))?;
        Ok(Api {
            base: a.admin_url.trim_end_matches('/').to_string(),
            key: a.admin_key.clone().ok_or_else(|| {
                CliError::new(
                    exit::INVALID,
                    "no admin key: set PERMISO_ADMIN_API_KEY (or pass --admin-key)",
                )
            })?,
            http,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CliError> {
        let url = format!("{}{}", self.base, path);
        let mut rb = self
            .http
            .request(method, &url)
            .header("X-Admin-Api-Key", &self.key);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.map_err(|e| {
            let why = match crate::tls::client::tls_failure(&e) {
                Some(reason) => format!("TLS failed: {reason}"),
                None => e.to_string(),
            };
            CliError::new(
                exit::UNREACHABLE,
                format!("cannot reach the admin plane at {}: {why}", self.base),
            )
        })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(v);
        }
        let code = match status.as_u16() {
            401 | 403 => exit::UNAUTHORIZED,
            404 => exit::NOT_FOUND,
            409 => exit::CONFLICT,
            429 => exit::RATE_LIMITED,
            400..=499 => exit::INVALID,
            _ => exit::SERVER,
        };
        let error = v["error"].as_str().unwrap_or("error");
        let description = v["error_description"]
            .as_str()
            .unwrap_or(status.canonical_reason().unwrap_or(""));
        Err(CliError::new(
            code,
            format!("{error} ({}): {description}", status.as_u16()),
        ))
    }
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T, CliError>>) -> Result<T, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::new(1, e.to_string()))?
        .block_on(f)
}

/// Left-aligned columns, two spaces apart.
/// One-time secrets, set apart so they are not missed in a scrollback (and in bold yellow on
/// a terminal): the API never shows them again.
fn shown_once(lines: &[String]) -> String {
    use std::io::IsTerminal;
    let head = "=== SHOWN ONCE: copy now, it cannot be shown again ===";
    let (on, off) = match std::io::stdout().is_terminal() {
        true => ("\x1b[1;33m", "\x1b[0m"),
        false => ("", ""),
    };
    let mut out = format!("{on}{head}{off}\n");
    for l in lines {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(&format!("{on}{}{off}\n", "=".repeat(head.len())));
    out
}

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    }
}

fn service_rows(services: &[Value]) -> String {
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            vec![
                text(&s["service_id"]),
                text(&s["service_name"]),
                text(&s["environment"]),
                if s["disabled"] == true {
                    "disabled".into()
                } else {
                    "enabled".into()
                },
                text(&s["scopes"]),
            ]
        })
        .collect();
    table(&["SERVICE ID", "NAME", "ENV", "STATE", "SCOPES"], &rows)
}

fn show_service(s: &Value) -> String {
    let mut out = String::new();
    for (label, field) in [
        ("service id", "service_id"),
        ("name", "service_name"),
        ("environment", "environment"),
        ("disabled", "disabled"),
        ("scopes", "scopes"),
        ("rate limit / min", "rate_limit_per_minute"),
        ("rate limit / hour", "rate_limit_per_hour"),
        ("rate limit scope", "rate_limit_scope"),
        ("allowed ips", "allowed_ips"),
        ("client id", "client_id"),
        ("created", "created_at"),
        ("updated", "updated_at"),
    ] {
        out.push_str(&format!("{label:<18} {}\n", text(&s[field])));
    }
    for (title, field) in [("API keys", "keys"), ("Client secrets", "client_secrets")] {
        let rows: Vec<Vec<String>> = s[field]
            .as_array()
            .map(|ks| {
                ks.iter()
                    .map(|k| {
                        [
                            "key_id",
                            "prefix",
                            "status",
                            "created_at",
                            "expires_at",
                            "last_used_at",
                        ]
                        .iter()
                        .map(|f| text(&k[*f]))
                        .collect()
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push_str(&format!("\n{title}\n"));
        out.push_str(&table(
            &["ID", "PREFIX", "STATUS", "CREATED", "EXPIRES", "LAST USED"],
            &rows,
        ));
    }
    out
}

fn limit(field: &str, v: &Option<String>) -> Result<Option<Value>, CliError> {
    match v.as_deref() {
        None => Ok(None),
        Some("none") => Ok(Some(Value::Null)),
        Some(n) => n
            .parse::<u32>()
            .map(|n| Some(json!(n)))
            .map_err(|_| CliError::new(exit::INVALID, format!("--{field} takes a number or \"none\""))),
    }
}

fn patch_body(cmd: &ServicesCmd) -> Result<Value, CliError> {
    let ServicesCmd::Patch {
        scopes,
        clear_scopes,
        rate_limit_per_minute,
        rate_limit_per_hour,
        rate_limit_scope,
        allowed_ips,
        any_ip,
        description,
        enable,
        disable,
        trusted,
        ..
    } = cmd
    else {
        unreachable!("only called for patch")
    };
    let mut body = serde_json::Map::new();
    if !scopes.is_empty() || *clear_scopes {
        body.insert("scopes".into(), json!(scopes));
    }
    if let Some(v) = limit("rate-limit-per-minute", rate_limit_per_minute)? {
        body.insert("rate_limit_per_minute".into(), v);
    }
    if let Some(v) = limit("rate-limit-per-hour", rate_limit_per_hour)? {
        body.insert("rate_limit_per_hour".into(), v);
    }
    if let Some(s) = rate_limit_scope {
        body.insert("rate_limit_scope".into(), json!(s));
    }
    if !allowed_ips.is_empty() || *any_ip {
        body.insert("allowed_ips".into(), json!(allowed_ips));
    }
    if let Some(d) = description {
        body.insert("description".into(), json!(d));
    }
    if *enable || *disable {
        body.insert("disabled".into(), json!(*disable));
    }
    if let Some(t) = trusted {
        body.insert("is_trusted".into(), json!(t));
    }
    if body.is_empty() {
        return Err(CliError::new(
            exit::INVALID,
            "nothing to change: give at least one option",
        ));
    }
    Ok(Value::Object(body))
}

/// Ids go into URL paths: refuse anything that could change the path.
fn path_id(id: &str) -> Result<&str, CliError> {
    if !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Ok(id)
    } else {
        Err(CliError::new(exit::INVALID, format!("{id:?} is not a valid id")))
    }
}

/// Runs one `permiso services` command; returns what to print on stdout.
pub fn services(args: &AdminArgs, cmd: &ServicesCmd) -> Result<String, CliError> {
    use reqwest::Method;
    let api = Api::new(args)?;
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    block_on(async {
        match cmd {
            ServicesCmd::Create {
                name,
                environment,
                scopes,
                rate_limit_per_minute,
                rate_limit_per_hour,
                rate_limit_scope,
                allowed_ips,
                description,
                contact_email,
                trusted,
                ttl_seconds,
                expires_at,
            } => {
                let mut body = json!({"service_name": name, "environment": environment, "scopes": scopes});
                if *trusted {
                    body["is_trusted"] = json!(true);
                }
                for (k, v) in [
                    ("rate_limit_per_minute", rate_limit_per_minute.map(|n| json!(n))),
                    ("rate_limit_per_hour", rate_limit_per_hour.map(|n| json!(n))),
                    ("rate_limit_scope", rate_limit_scope.as_ref().map(|s| json!(s))),
                    (
                        "allowed_ips",
                        (!allowed_ips.is_empty()).then(|| json!(allowed_ips)),
                    ),
                    ("description", description.as_ref().map(|d| json!(d))),
                    ("contact_email", contact_email.as_ref().map(|d| json!(d))),
                    ("ttl_seconds", ttl_seconds.map(|n| json!(n))),
                    ("expires_at", expires_at.as_ref().map(|d| json!(d))),
                ] {
                    if let Some(v) = v {
                        body[k] = v;
                    }
                }
                let v = api.call(Method::POST, "/auth/admin/services", Some(body)).await?;
                if args.json {
                    return Ok(pretty(&v));
                }
                Ok(format!(
                    "{}{}\n{}",
                    fleet::warnings(&v),
                    show_service(&v),
                    shown_once(&[
                        format!("API key ({}): {}", text(&v["key_id"]), text(&v["api_key"])),
                        format!(
                            "Client secret ({}): {}",
                            text(&v["client_secret_id"]),
                            text(&v["client_secret"])
                        ),
                        format!(
                            "export KEY={} SID={} SECRET={}",
                            text(&v["api_key"]),
                            text(&v["service_id"]),
                            text(&v["client_secret"])
                        ),
                    ]),
                ))
            }
            ServicesCmd::List => {
                let mut all = Vec::new();
                let mut cursor: Option<String> = None;
                loop {
                    let path = match &cursor {
                        None => "/auth/admin/services?limit=200".to_string(),
                        Some(c) => format!("/auth/admin/services?limit=200&cursor={}", path_id(c)?),
                    };
                    let v = api.call(Method::GET, &path, None).await?;
                    all.extend(v["services"].as_array().cloned().unwrap_or_default());
                    match v["next_cursor"].as_str() {
                        Some(c) => cursor = Some(c.to_string()),
                        None => break,
                    }
                }
                Ok(if args.json {
                    pretty(&json!({ "services": all }))
                } else {
                    service_rows(&all)
                })
            }
            ServicesCmd::Show { service_id } => {
                let v = api
                    .call(
                        Method::GET,
                        &format!("/auth/admin/services/{}", path_id(service_id)?),
                        None,
                    )
                    .await?;
                Ok(if args.json { pretty(&v) } else { show_service(&v) })
            }
            ServicesCmd::Patch { service_id, wait, .. } => {
                let body = patch_body(cmd)?;
                let v = api
                    .call(
                        Method::PATCH,
                        &format!("/auth/admin/services/{}", path_id(service_id)?),
                        Some(body),
                    )
                    .await?;
                let out = if args.json {
                    pretty(&v)
                } else {
                    fleet::warnings(&v) + &show_service(&v)
                };
                fleet::after_write(&api, wait, &v, "patch", out).await
            }
            ServicesCmd::Expire {
                service_id,
                key_id,
                ttl_seconds,
                expires_at,
                never,
                wait,
            } => {
                let body = match (ttl_seconds, expires_at, never) {
                    (Some(t), None, false) => json!({ "ttl_seconds": t }),
                    (None, Some(at), false) => json!({ "expires_at": at }),
                    (None, None, true) => json!({ "expires_at": null }),
                    _ => {
                        return Err(CliError::new(
                            exit::INVALID,
                            "give one of --ttl-seconds, --expires-at, --never",
                        ))
                    }
                };
                let v = api
                    .call(
                        Method::PATCH,
                        &format!(
                            "/auth/admin/services/{}/keys/{}",
                            path_id(service_id)?,
                            path_id(key_id)?
                        ),
                        Some(body),
                    )
                    .await?;
                let out = if args.json {
                    pretty(&v)
                } else {
                    format!(
                        "{} ({}) stops working at {}.\n",
                        text(&v["key_id"]),
                        text(&v["status"]),
                        text(&v["expires_at"])
                    )
                };
                fleet::after_write(&api, wait, &v, "expiry change", out).await
            }
            ServicesCmd::Rotate {
                service_id,
                grace_seconds,
                secret,
                ttl_seconds,
                expires_at,
                wait,
            } => {
                let what = if *secret { "secret/rotate" } else { "rotate" };
                let mut body = serde_json::Map::new();
                for (k, v) in [
                    ("grace_seconds", grace_seconds.map(|g| json!(g))),
                    ("ttl_seconds", ttl_seconds.map(|g| json!(g))),
                    ("expires_at", expires_at.as_ref().map(|g| json!(g))),
                ] {
                    if let Some(v) = v {
                        body.insert(k.into(), v);
                    }
                }
                let body = (!body.is_empty()).then_some(Value::Object(body));
                let v = api
                    .call(
                        Method::POST,
                        &format!("/auth/admin/services/{}/{what}", path_id(service_id)?),
                        body,
                    )
                    .await?;
                if args.json {
                    return fleet::after_write(&api, wait, &v, "rotation", pretty(&v)).await;
                }
                let (new_id, new, ends) = if *secret {
                    (
                        &v["client_secret_id"],
                        &v["client_secret"],
                        &v["old_secrets_expire_at"],
                    )
                } else {
                    (&v["key_id"], &v["api_key"], &v["old_keys_expire_at"])
                };
                let out = format!(
                    "New {} ({}): {}\n{}Old ones stop working at {}.\n",
                    if *secret { "client secret" } else { "API key" },
                    text(new_id),
                    text(new),
                    shown_once(&[format!(
                        "export {}={}",
                        if *secret { "SECRET" } else { "KEY" },
                        text(new)
                    )]),
                    text(ends)
                );
                fleet::after_write(&api, wait, &v, "rotation", out).await
            }
            ServicesCmd::Revoke {
                service_id,
                key_id,
                wait,
            } => {
                let v = api
                    .call(
                        Method::POST,
                        &format!(
                            "/auth/admin/services/{}/keys/{}/revoke",
                            path_id(service_id)?,
                            path_id(key_id)?
                        ),
                        None,
                    )
                    .await?;
                let out = if args.json {
                    pretty(&v)
                } else {
                    format!("Revoked {} at {}.\n", text(&v["key_id"]), text(&v["revoked_at"]))
                };
                fleet::after_write(&api, wait, &v, "revocation", out).await
            }
            ServicesCmd::Delete { service_id } => {
                let v = api
                    .call(
                        Method::DELETE,
                        &format!("/auth/admin/services/{}", path_id(service_id)?),
                        None,
                    )
                    .await?;
                Ok(if args.json {
                    pretty(&v)
                } else {
                    format!(
                        "Disabled {}: every key of it stops working.\n",
                        text(&v["service_id"])
                    )
                })
            }
        }
    })
}

/// Walks the audit log from entry `after` + 1, page by page, handing each page to `each`
/// (so a long chain is never held whole), until `want` entries or the end.
async fn audit_pages(
    api: &Api,
    filter: &str,
    mut after: u64,
    mut want: usize,
    mut each: impl FnMut(Vec<AuditEntry>) -> Result<(), CliError>,
) -> Result<(), CliError> {
    while want > 0 {
        let page = want.min(1000);
        let v = api
            .call(
                reqwest::Method::GET,
                &format!("/auth/admin/audit?limit={page}&after={after}{filter}"),
                None,
            )
            .await?;
        let entries: Vec<AuditEntry> = serde_json::from_value(v["entries"].clone())
            .map_err(|e| CliError::new(exit::SERVER, format!("unexpected audit page: {e}")))?;
        want = want.saturating_sub(entries.len());
        each(entries)?;
        match v["next_after"].as_u64() {
            Some(n) => after = n,
            None => break,
        }
    }
    Ok(())
}

/// `permiso audit` (list, filtered) and `permiso audit verify`.
pub fn audit(args: &AdminArgs, filter: &AuditFilter, cmd: Option<&AuditCmd>) -> Result<String, CliError> {
    let api = Api::new(args)?;
    block_on(async {
        match cmd {
            None => {
                let mut q = String::new();
                for (k, v) in [
                    ("actor", filter.actor.clone()),
                    ("action", filter.action.clone()),
                    ("target", filter.target.clone()),
                    ("since", filter.since.map(|n| n.to_string())),
                    ("until", filter.until.map(|n| n.to_string())),
                ] {
                    if let Some(v) = v {
                        q.push_str(&format!(
                            "&{k}={}",
                            form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()
                        ));
                    }
                }
                let mut entries = Vec::new();
                audit_pages(&api, &q, filter.after, filter.limit, |page| {
                    entries.extend(page);
                    Ok(())
                })
                .await?;
                if args.json {
                    return Ok(serde_json::to_string_pretty(&json!({ "entries": entries }))
                        .unwrap_or_default()
                        + "\n");
                }
                let rows: Vec<Vec<String>> = entries
                    .iter()
                    .map(|e| {
                        vec![
                            e.seq.to_string(),
                            crate::admin::model::rfc3339(e.at),
                            e.actor.clone(),
                            e.action.clone(),
                            e.target.clone().unwrap_or_else(|| "-".into()),
                            e.source_ip.clone().unwrap_or_else(|| "-".into()),
                            e.change.to_string(),
                        ]
                    })
                    .collect();
                Ok(table(
                    &["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "SOURCE", "CHANGE"],
                    &rows,
                ))
            }
            Some(AuditCmd::Verify { expect_head }) => {
                let expected = match expect_head {
                    None => None,
                    Some(h) => {
                        let (seq, hash) = h
                            .split_once(':')
                            .and_then(|(s, h)| Some((s.parse::<u64>().ok()?, h.to_ascii_lowercase())))
                            .ok_or_else(|| CliError::new(exit::INVALID, "--expect-head takes SEQ:HASH"))?;
                        Some((seq, hash))
                    }
                };
                let mut v = Verifier::default();
                audit_pages(&api, "", 0, usize::MAX, |page| {
                    for e in &page {
                        v.push(e).map_err(|err| {
                            CliError::new(exit::CHAIN_BROKEN, format!("audit chain broken: {err}"))
                        })?;
                        if let Some((seq, hash)) = &expected {
                            if e.seq == *seq && e.hash != *hash {
                                return Err(CliError::new(
                                    exit::CHAIN_BROKEN,
                                    format!(
                                        "audit chain rewritten: entry {seq} no longer has the expected hash"
                                    ),
                                ));
                            }
                        }
                    }
                    Ok(())
                })
                .await?;
                let head = v.finish();
                if let Some((seq, _)) = &expected {
                    if *seq > head.seq {
                        return Err(CliError::new(
                            exit::CHAIN_BROKEN,
                            format!(
                                "audit chain shortened: expected entry {seq}, chain ends at {}",
                                head.seq
                            ),
                        ));
                    }
                }
                Ok(if args.json {
                    serde_json::to_string_pretty(&json!({"intact": true, "entries": head.entries, "head": format!("{}:{}", head.seq, head.hash)})).unwrap_or_default() + "\n"
                } else {
                    format!(
                        "audit chain intact: {} entries\nhead {}:{}\n",
                        head.entries, head.seq, head.hash
                    )
                })
            }
        }
    })
}

/// `permiso signing-keys list|rotate`: the API's JSON either way (it is already a summary).
pub fn signing_keys(args: &AdminArgs, cmd: &SigningKeysCmd) -> Result<String, CliError> {
    let api = Api::new(args)?;
    let (method, path) = match cmd {
        SigningKeysCmd::List => (reqwest::Method::GET, "/auth/admin/signing-keys"),
        SigningKeysCmd::Rotate => (reqwest::Method::POST, "/auth/admin/signing-keys/rotate"),
    };
    block_on(async {
        let v = api.call(method, path, None).await?;
        if args.json {
            return Ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n");
        }
        let rows: Vec<Vec<String>> = v["keys"]
            .as_array()
            .map(|keys| {
                keys.iter()
                    .map(|k| {
                        ["kid", "status", "created_at", "activates_at"]
                            .iter()
                            .map(|f| text(&k[*f]))
                            .collect()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut out = table(&["KID", "STATUS", "CREATED", "SIGNS FROM"], &rows);
        if let Some(kid) = v["new_kid"].as_str() {
            out.push_str(&format!(
                "New key {kid} is published now and signs from {}.\n",
                text(&v["new_key_signs_from"])
            ));
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["A", "LONGER"],
            &[vec!["wide-cell".into(), "x".into()], vec!["b".into(), "y".into()]],
        );
        assert_eq!(t, "A          LONGER\nwide-cell  x\nb          y\n");
    }

    #[test]
    fn ids_with_path_characters_are_refused() {
        assert!(path_id("srv_abc-1").is_ok());
        for bad in ["", "../admin", "a/b", "a?b", "a b"] {
            assert_eq!(path_id(bad).unwrap_err().code, exit::INVALID, "{bad}");
        }
    }
}
