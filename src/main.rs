//! The `permiso` binary: `admin`, `sidecar` and `dev`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use permiso::config::{self, AdminConfig, SidecarConfig};
use permiso::core::clock::SystemClock;

#[derive(Parser)]
#[command(name = "permiso", version, about = "Service-to-service auth gateway")]
struct Cli {
    /// Log as JSON lines instead of human-readable text (overrides `[log] format`).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the admin plane (needs PERMISO_ADMIN_API_KEY).
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
    /// Run a sidecar in front of one service.
    Sidecar {
        #[arg(long, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Admin plane + demo MT5 service + sidecar in one process, with a walkthrough.
    Dev(permiso::dev::DevArgs),
    /// A bare pingora proxy without auth, with the sidecar's settings (load-test baseline).
    #[command(hide = true)]
    Passthrough {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        upstream: std::net::SocketAddr,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Manage the access-token signing keys through the admin API.
    SigningKeys {
        #[command(subcommand)]
        action: SigningKeysAction,
        /// Admin plane base URL.
        #[arg(long, env = "PERMISO_ADMIN_URL", default_value = "http://127.0.0.1:8000")]
        admin_url: String,
        /// The admin key.
        #[arg(long, env = "PERMISO_ADMIN_API_KEY", hide_env_values = true)]
        admin_key: String,
    },
}

#[derive(Subcommand)]
enum SigningKeysAction {
    /// List keys: which signs, which are published.
    List,
    /// Publish a new key now; it signs after admin_plane.signing_key_publish_delay_seconds.
    Rotate,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The config file may choose the log format, so read it before logging starts.
    let file = match &cli.command {
        Command::Admin { config: Some(p), .. } | Command::Sidecar { config: p } => Some(config::load_file(p)?),
        _ => None,
    };
    let json = cli.log_json || file.as_ref().is_some_and(|f| f.log.format == config::file::LogFormat::Json);
    permiso::telemetry::init(json);
    match cli.command {
        Command::Admin {
            config,
            listen,
            database,
        } => {
            let _ = config;
            let mut file = file.unwrap_or_default();
            if let Some(l) = listen {
                file.admin_plane.listen = l;
            }
            if let Some(d) = database {
                file.admin_plane.database = d;
            }
            let cfg = AdminConfig::from_file(&file.admin_plane, std::env::var("PERMISO_ADMIN_API_KEY").ok())?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(cfg.listen)
                    .await
                    .with_context(|| format!("binding {}", cfg.listen))?;
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    shutdown_signal().await;
                    let _ = tx.send(true);
                });
                permiso::admin::serve(listener, cfg, Arc::new(SystemClock), rx).await
            })
        }
        Command::Sidecar { config } => {
            let file = file.context("config was read above")?;
            let sc = file
                .sidecar
                .as_ref()
                .with_context(|| format!("{} has no [sidecar] section", config.display()))?;
            let credential = config::read_sync_credential(&sc.sync)?;
            let cfg = SidecarConfig::from_file(sc, credential)?;
            permiso::sidecar::run(cfg, Arc::new(SystemClock))
        }
        Command::Dev(args) => permiso::dev::run(args),
        Command::Passthrough {
            listen,
            upstream,
            threads,
        } => {
            permiso::sidecar::passthrough::run(listen, upstream, threads);
            Ok(())
        }
        Command::SigningKeys {
            action,
            admin_url,
            admin_key,
        } => {
            let (method, path) = match action {
                SigningKeysAction::List => (reqwest::Method::GET, "/auth/admin/signing-keys"),
                SigningKeysAction::Rotate => (reqwest::Method::POST, "/auth/admin/signing-keys/rotate"),
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let url = format!("{}{}", admin_url.trim_end_matches('/'), path);
                let resp = reqwest::Client::new()
                    .request(method, &url)
                    .header("X-Admin-Api-Key", admin_key)
                    .send()
                    .await
                    .with_context(|| format!("calling {url}"))?;
                let status = resp.status();
                let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
                println!("{}", serde_json::to_string_pretty(&body)?);
                if !status.is_success() {
                    anyhow::bail!("admin plane answered {status}");
                }
                Ok(())
            })
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
