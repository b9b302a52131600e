//! The command line's shape: every command, flag and help text (clap derive), with an example
//! at the end of each command's `--help`. What the commands do lives beside (`cli`, `fleet`);
//! the binary's `main` only dispatches.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::fleet::{KeysCmd, WaitArgs};

#[derive(Parser)]
#[command(name = "permiso", version, about = "Service-to-service auth gateway")]
#[command(
    after_help = "Example:\n  permiso dev                      # the whole product on one machine, with a walkthrough\n  permiso services list --admin-url http://127.0.0.1:8000"
)]
pub struct Cli {
    /// Log as JSON lines instead of human-readable text (overrides `[log] format`).
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the admin plane (needs PERMISO_ADMIN_API_KEY).
    #[command(
        after_help = "Example:\n  PERMISO_ADMIN_API_KEY=$(openssl rand -hex 32) permiso admin --config config.toml"
    )]
    Admin {
        /// Config file; its [admin_plane] section is used. Defaults apply without one.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides admin_plane.listen.
        #[arg(long)]
        listen: Option<String>,
        /// Overrides admin_plane.database.
        #[arg(long)]
        database: Option<String>,
    },
    /// Apply the database's schema migrations (PostgreSQL replicas never migrate on their own;
    /// a SQLite database is migrated by `permiso admin` at start too).
    #[command(after_help = "Example:\n  permiso migrate --database postgres://permiso@db.internal/permiso")]
    Migrate {
        /// Config file; its [admin_plane] database is used.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides admin_plane.database.
        #[arg(long)]
        database: Option<String>,
    },
    /// Run a sidecar in front of one service.
    #[command(after_help = "Example:\n  permiso sidecar --config /etc/permiso/mt5-sidecar.toml")]
    Sidecar {
        /// Config file with a [sidecar] section (SIGHUP reloads it).
        #[arg(long, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Admin plane + demo MT5 service + sidecar in one process, with a walkthrough.
    #[command(
        after_help = "Example:\n  permiso dev                      # then follow the printed steps\n  permiso dev --self-test --tls     # walk every step over HTTPS and exit"
    )]
    Dev(crate::dev::DevArgs),
    /// Forwarding without auth on the sidecar's HTTP/1 path (the load bench's baseline).
    #[command(hide = true)]
    Passthrough {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        upstream: std::net::SocketAddr,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// pingora's own reverse proxy (pingora-proxy, a shared upstream pool) instead: the
        /// sidecar's path before issue 15.
        #[arg(long)]
        pingora_proxy: bool,
    },
    /// Manage service accounts through the admin API (tables, or --json).
    #[command(
        after_help = "Example:\n  permiso services create --name mt5-api --scope trade:read --scope account:read\n  permiso services list --json | jq -r '.services[].service_id'"
    )]
    Services {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: ServicesCmd,
    },
    /// Read the audit log (filters below), or `audit verify` its hash chain.
    #[command(
        after_help = "Example:\n  permiso audit --action key.revoke --since 2026-12-01T00:00:00Z\n  permiso audit verify"
    )]
    Audit {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        filter: AuditFilter,
        #[command(subcommand)]
        cmd: Option<AuditCmd>,
    },
    /// The sidecars syncing from the admin plane: version applied, lag, last seen, routes' scopes.
    #[command(after_help = "Example:\n  permiso sidecars")]
    Sidecars {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Credentials across every service (`keys list --status grace --used-since 1h`).
    #[command(after_help = "Example:\n  permiso keys list --status grace --used-since 1h")]
    Keys {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Print shell completions: `permiso completions bash > /etc/bash_completion.d/permiso`.
    #[command(
        after_help = "Example:\n  permiso completions bash > /etc/bash_completion.d/permiso\n  permiso completions zsh > \"${fpath[1]}/_permiso\""
    )]
    Completions {
        /// The shell to print completions for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the admin API's OpenAPI 3.1 document (the one served at /openapi.json).
    #[command(after_help = "Example:\n  permiso openapi --out docs/openapi.json")]
    Openapi {
        /// Write it to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Manage the access-token signing keys through the admin API.
    #[command(after_help = "Example:\n  permiso signing-keys list\n  permiso signing-keys rotate")]
    SigningKeys {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: SigningKeysCmd,
    },
}

#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// Admin plane base URL (before or after the subcommand).
    #[arg(
        long,
        env = "PERMISO_ADMIN_URL",
        default_value = "http://127.0.0.1:8000",
        global = true
    )]
    pub admin_url: String,
    /// The admin key. Prefer the environment variable: arguments show in `ps`. (Optional
    /// here so it may follow the subcommand; every command needs it.)
    #[arg(long, env = "PERMISO_ADMIN_API_KEY", hide_env_values = true, global = true)]
    pub admin_key: Option<String>,
    /// PEM CA bundle the admin plane's certificate must chain to (https:// admin URLs).
    /// Default: the system roots.
    #[arg(long, env = "PERMISO_CA_FILE", global = true)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ServicesCmd {
    /// Register a service; prints its API key and client secret once.
    #[command(
        after_help = "Example:\n  permiso services create --name mt5-api --scope trade:read --rate-limit-per-minute 600"
    )]
    Create {
        /// The service's name (unique; letters, digits, '-', '_').
        #[arg(long)]
        name: String,
        /// "live" or "test".
        #[arg(long, default_value = "live")]
        environment: String,
        /// A scope to grant (repeat for several).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Requests a minute the service may make (default: unlimited).
        #[arg(long)]
        rate_limit_per_minute: Option<u32>,
        /// Requests an hour the service may make (default: unlimited).
        #[arg(long)]
        rate_limit_per_hour: Option<u32>,
        /// Where the limits are counted: "sidecar" (each sidecar alone, the default) or
        /// "cluster" (one count shared by every sidecar with the Redis limiter).
        #[arg(long, value_parser = ["sidecar", "cluster"])]
        rate_limit_scope: Option<String>,
        /// A CIDR the service may call from (repeat for several; none means anywhere).
        #[arg(long = "allowed-ip")]
        allowed_ips: Vec<String>,
        /// Free text shown in listings.
        #[arg(long)]
        description: Option<String>,
        /// Who to call about this service.
        #[arg(long)]
        contact_email: Option<String>,
        /// Routes marked `trusted = true` admit it.
        #[arg(long)]
        trusted: bool,
        /// The first key and client secret stop working after this many seconds.
        #[arg(long, conflicts_with = "expires_at")]
        ttl_seconds: Option<u64>,
        /// ... or at this time (RFC 3339).
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// All services, in creation order.
    #[command(after_help = "Example:\n  permiso services list")]
    List,
    /// One service with its keys and client secrets.
    #[command(after_help = "Example:\n  permiso services show svc_01HZX4")]
    Show {
        /// The service's id (`permiso services list` shows it).
        service_id: String,
    },
    /// Change some fields; the rest stay as they are.
    #[command(
        after_help = "Example:\n  permiso services patch svc_01HZX4 --scope trade:read --rate-limit-per-minute none --wait-applied"
    )]
    Patch {
        /// The service's id.
        service_id: String,
        /// Replaces the scopes (repeat for several).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Removes every scope.
        #[arg(long, conflicts_with = "scopes")]
        clear_scopes: bool,
        /// A number, or "none" for unlimited.
        #[arg(long)]
        rate_limit_per_minute: Option<String>,
        /// A number, or "none" for unlimited.
        #[arg(long)]
        rate_limit_per_hour: Option<String>,
        /// "sidecar" or "cluster".
        #[arg(long, value_parser = ["sidecar", "cluster"])]
        rate_limit_scope: Option<String>,
        /// Replaces the allowed source ranges (repeat for several).
        #[arg(long = "allowed-ip")]
        allowed_ips: Vec<String>,
        /// Allows every source address again.
        #[arg(long, conflicts_with = "allowed_ips")]
        any_ip: bool,
        /// Replaces the description.
        #[arg(long)]
        description: Option<String>,
        /// Enables a disabled service again (its keys work again).
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        /// Disables the service: its keys and tokens stop working; `--enable` undoes it.
        #[arg(long)]
        disable: bool,
        /// "true" or "false": routes marked `trusted = true` admit it or not.
        #[arg(long)]
        trusted: Option<bool>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Issue a new API key (or client secret); the old ones work for the grace period.
    #[command(
        after_help = "Example:\n  permiso services rotate svc_01HZX4 --grace-seconds 86400\n  permiso keys list --status grace --used-since 1h   # who still uses the old key"
    )]
    Rotate {
        /// The service's id.
        service_id: String,
        /// Seconds the old credentials keep working (default: the admin plane's, 7 days).
        #[arg(long)]
        grace_seconds: Option<u64>,
        /// Rotate the OAuth2 client secret instead of the API key.
        #[arg(long)]
        secret: bool,
        /// The new credential stops working after this many seconds.
        #[arg(long, conflicts_with = "expires_at")]
        ttl_seconds: Option<u64>,
        /// ... or at this time (RFC 3339).
        #[arg(long)]
        expires_at: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Revoke one API key at once.
    #[command(after_help = "Example:\n  permiso services revoke svc_01HZX4 key_01HZX5 --wait-applied")]
    Revoke {
        /// The service's id.
        service_id: String,
        /// The key's id (`key_…`, from `services show`), never the key itself.
        key_id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Set when one API key (`key_…`) or client secret (`sec_…`) stops working by itself.
    #[command(
        after_help = "Example:\n  permiso services expire svc_01HZX4 key_01HZX5 --expires-at 2027-01-31T00:00:00Z"
    )]
    Expire {
        /// The service's id.
        service_id: String,
        /// The key's (`key_…`) or client secret's (`sec_…`) id.
        key_id: String,
        /// Stops working this many seconds from now.
        #[arg(long, conflicts_with_all = ["expires_at", "never"])]
        ttl_seconds: Option<u64>,
        /// RFC 3339.
        #[arg(long, conflicts_with = "never")]
        expires_at: Option<String>,
        /// Remove its own expiry (a rotation's grace end still applies).
        #[arg(long)]
        never: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Disable the service: every key stops working; the record stays for the audit trail.
    #[command(after_help = "Example:\n  permiso services delete svc_01HZX4")]
    Delete {
        /// The service's id.
        service_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Check the whole hash chain from the first entry; prints the head to keep elsewhere.
    #[command(
        after_help = "Example:\n  permiso audit verify --expect-head 1234:9f2c…   # the head an earlier verify printed"
    )]
    Verify {
        /// A head printed by an earlier verify ("SEQ:HASH"); fails unless it is still in the chain.
        #[arg(long)]
        expect_head: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct AuditFilter {
    /// "admin-key", "service:<id>/<key_id>", "client:<id>", "unauthenticated" or "system".
    #[arg(long)]
    pub actor: Option<String>,
    /// e.g. service.create, service.patch, service.disable, key.rotate, key.revoke,
    /// secret.rotate, token.revoke, signing_key.rotate, auth.failed.
    #[arg(long)]
    pub action: Option<String>,
    /// A service id or signing key id.
    #[arg(long)]
    pub target: Option<String>,
    /// RFC 3339 (as every output prints times) or Unix seconds.
    #[arg(long, value_parser = time_arg)]
    pub since: Option<i64>,
    /// RFC 3339 or Unix seconds.
    #[arg(long, value_parser = time_arg)]
    pub until: Option<i64>,
    /// At most this many entries, oldest first.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Start after this sequence number (the last SEQ of the previous listing).
    #[arg(long, default_value_t = 0)]
    pub after: u64,
}

#[derive(Debug, Subcommand)]
pub enum SigningKeysCmd {
    /// List keys: which signs, which are published.
    #[command(after_help = "Example:\n  permiso signing-keys list")]
    List,
    /// Publish a new key now; it signs after admin_plane.signing_key_publish_delay_seconds.
    #[command(after_help = "Example:\n  permiso signing-keys rotate")]
    Rotate,
}

/// `--since` / `--until`: RFC 3339 or Unix seconds.
fn time_arg(s: &str) -> Result<i64, String> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp())
        .map_err(|_| format!("{s:?} is neither RFC 3339 (2026-12-02T10:00:00Z) nor Unix seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag and argument of every command says what it is for, and every command's
    /// `--help` ends with an example (hidden ones, kept for benchmarks, aside).
    #[test]
    fn every_flag_has_help_and_every_command_an_example() {
        Cli::command().debug_assert();
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                    missing.push(format!("{path} --{id}: no help line"));
                }
            }
            let example = cmd.get_after_help().map(|h| h.to_string()).unwrap_or_default();
            if !example.contains("Example") || !example.contains("permiso") {
                missing.push(format!("{path}: no example after its help"));
            }
            for sub in cmd.get_subcommands() {
                if sub.is_hide_set() || sub.get_name() == "help" {
                    continue;
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "permiso", &mut missing);
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }

    #[test]
    fn times_are_rfc3339_or_unix_seconds() {
        assert_eq!(time_arg("1800000000"), Ok(1_800_000_000));
        assert_eq!(time_arg("2027-01-15T08:00:00Z"), Ok(1_800_000_000));
        assert_eq!(time_arg("2027-01-15T09:00:00+01:00"), Ok(1_800_000_000));
        assert!(time_arg("yesterday").is_err());
    }
}
