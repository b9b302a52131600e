//! `permiso sidecars`, `permiso keys list` and `--wait-applied`: the fleet and key-lifecycle
//! views of issue 16, for people (tables) and scripts (`--json`, exit codes).

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::{block_on, exit, table, text, AdminArgs, Api, CliError};

/// `--wait-applied`: after a write, wait until every live sidecar holds its version.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Wait until every live sidecar has applied the change; exit 11 naming the stragglers
    /// when the timeout passes first.
    #[arg(long)]
    pub wait_applied: bool,
    /// Seconds `--wait-applied` waits at most.
    #[arg(long, default_value_t = 30)]
    pub wait_timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Credentials across every service by lifecycle state.
    #[command(after_help = "Example:\n  permiso keys list --status grace --used-since 1h")]
    List {
        /// Only "grace": rotated-out keys still working.
        #[arg(long, value_parser = ["grace"])]
        status: String,
        /// Only keys used since then: a duration back from now (90s, 15m, 1h, 7d) or RFC 3339.
        #[arg(long)]
        used_since: Option<String>,
    },
}

/// The warnings of a write's answer, one line each ("" when none).
pub(super) fn warnings(v: &Value) -> String {
    v["warnings"]
        .as_array()
        .map(|w| w.iter().map(|w| format!("warning: {}\n", text(w))).collect())
        .unwrap_or_default()
}

/// `out` after the write, and with `--wait-applied` once every live sidecar has its version.
pub(super) async fn after_write(
    api: &Api,
    wait: &WaitArgs,
    written: &Value,
    what: &str,
    out: String,
) -> Result<String, CliError> {
    if !wait.wait_applied {
        return Ok(out);
    }
    let version = written["version"]
        .as_u64()
        .ok_or_else(|| CliError::new(exit::SERVER, "the admin plane's answer has no version"))?;
    let deadline = Instant::now() + Duration::from_secs(wait.wait_timeout);
    loop {
        let p = api
            .call(
                reqwest::Method::GET,
                &format!("/auth/admin/changes/{version}"),
                None,
            )
            .await?;
        if p["complete"] == true {
            return Ok(format!(
                "{out}{what} (version {version}) {}\n",
                text(&p["summary"])
            ));
        }
        if Instant::now() >= deadline {
            let pending: Vec<String> = p["pending"]
                .as_array()
                .map(|a| a.iter().map(text).collect())
                .unwrap_or_default();
            let named = name_stragglers(api, &pending).await;
            return Err(CliError::new(
                exit::NOT_APPLIED,
                format!(
                    "{what} (version {version}) not applied everywhere within {}s: {}; waiting for {}",
                    wait.wait_timeout,
                    text(&p["summary"]),
                    named
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// "sc_… (upstream 10.0.0.5:8001, version 11)" for each straggler.
async fn name_stragglers(api: &Api, pending: &[String]) -> String {
    let fleet = api
        .call(reqwest::Method::GET, "/auth/admin/sidecars", None)
        .await
        .unwrap_or(Value::Null);
    let about = |id: &str| {
        fleet["sidecars"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["instance_id"] == id))
            .map(|s| {
                format!(
                    " (upstream {}, version {}, last seen {})",
                    text(&s["upstream"]),
                    text(&s["version_applied"]),
                    text(&s["last_seen"])
                )
            })
            .unwrap_or_default()
    };
    pending
        .iter()
        .map(|id| format!("{id}{}", about(id)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `permiso sidecars`: the fleet, one row per sidecar.
pub fn sidecars(args: &AdminArgs) -> Result<String, CliError> {
    let api = Api::new(args)?;
    block_on(async {
        let v = api
            .call(reqwest::Method::GET, "/auth/admin/sidecars", None)
            .await?;
        if args.json {
            return Ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n");
        }
        let rows: Vec<Vec<String>> = v["sidecars"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        let scopes: Vec<String> = s["routes"]
                            .as_array()
                            .map(|r| {
                                r.iter()
                                    .flat_map(|r| r["scopes"].as_array().cloned().unwrap_or_default())
                                    .map(|s| text(&s))
                                    .collect()
                            })
                            .unwrap_or_default();
                        let mut scopes = scopes;
                        scopes.sort();
                        scopes.dedup();
                        vec![
                            text(&s["instance_id"]),
                            text(&s["status"]),
                            text(&s["upstream"]),
                            text(&s["environment"]),
                            text(&s["mode"]),
                            text(&s["version_applied"]),
                            text(&s["lag_versions"]),
                            format!("{}s ago", text(&s["seconds_since_seen"])),
                            text(&s["sync_key_id"]),
                            if scopes.is_empty() {
                                "-".into()
                            } else {
                                scopes.join(" ")
                            },
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(format!(
            "{}{} live, {} stale; admin plane at version {}\n",
            table(
                &[
                    "INSTANCE",
                    "STATUS",
                    "UPSTREAM",
                    "ENV",
                    "MODE",
                    "VERSION",
                    "LAG",
                    "SEEN",
                    "SYNC KEY",
                    "ROUTE SCOPES"
                ],
                &rows
            ),
            text(&v["live"]),
            text(&v["stale"]),
            text(&v["current_version"])
        ))
    })
}

/// `permiso keys list --status grace [--used-since 1h]`.
pub fn keys(args: &AdminArgs, cmd: &KeysCmd) -> Result<String, CliError> {
    let api = Api::new(args)?;
    let KeysCmd::List { status, used_since } = cmd;
    block_on(async {
        let mut q: Vec<String> = vec![format!("status={status}")];
        if let Some(u) = used_since {
            q.push(format!(
                "used_since={}",
                form_urlencoded::byte_serialize(u.as_bytes()).collect::<String>()
            ));
        }
        let v = api
            .call(
                reqwest::Method::GET,
                &format!("/auth/admin/keys?{}", q.join("&")),
                None,
            )
            .await?;
        if args.json {
            return Ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n");
        }
        let keys = v["keys"].as_array().cloned().unwrap_or_default();
        let rows: Vec<Vec<String>> = keys
            .iter()
            .map(|k| {
                [
                    "service_id",
                    "service_name",
                    "key_id",
                    "kind",
                    "prefix",
                    "expires_at",
                    "last_used_at",
                ]
                .iter()
                .map(|f| text(&k[*f]))
                .collect()
            })
            .collect();
        Ok(table(
            &[
                "SERVICE ID",
                "NAME",
                "KEY ID",
                "KIND",
                "PREFIX",
                "ENDS",
                "LAST USED",
            ],
            &rows,
        ) + &format!("{} in grace\n", json!(keys.len())))
    })
}
