//! The `permiso` binary: `admin`, `sidecar` and `dev`.
#![forbid(unsafe_code)]

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use permiso::cli;
use permiso::cli::args::{Cli, Command};
use permiso::config::{self, AdminConfig, SidecarConfig};
use permiso::core::clock::SystemClock;

/// mimalloc for the whole process (see Cargo.toml for why).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Prints a CLI command's output, or its error on stderr with its exit code.
fn finish(r: Result<String, cli::CliError>) -> anyhow::Result<()> {
    match r {
        Ok(out) => {
            print!("{out}");
            Ok(())
        }
        Err(e) => {
            eprintln!("error: {}", e.message);
            std::process::exit(i32::from(e.code));
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One rustls crypto provider (ring) for the process, before anything builds a TLS config.
    permiso::tls::install_default_provider();
    // The config file may choose the log format, so read it before logging starts.
    let file = match &cli.command {
        Command::Admin { config: Some(p), .. }
        | Command::Migrate { config: Some(p), .. }
        | Command::Sidecar { config: p } => Some(config::load_file(p)?),
        _ => None,
    };
    let json = cli.log_json
        || file
            .as_ref()
            .is_some_and(|f| f.log.format == config::file::LogFormat::Json);
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
            let mut cfg =
                AdminConfig::from_file(&file.admin_plane, std::env::var("PERMISO_ADMIN_API_KEY").ok())?;
            // Set (even empty) means "use this KEK": an empty or malformed value is refused at
            // start rather than silently replaced by the file beside the database.
            cfg.signing_kek = std::env::var("PERMISO_SIGNING_KEK")
                .ok()
                .map(permiso::core::key::Secret::new);
            cfg.database_password = std::env::var("PERMISO_DATABASE_PASSWORD")
                .ok()
                .map(permiso::core::key::Secret::new);
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
        Command::Migrate { config: _, database } => {
            let mut file = file.unwrap_or_default();
            if let Some(d) = database {
                file.admin_plane.database = d;
            }
            let db = config::database::parse(
                &file.admin_plane.database,
                file.admin_plane.database_password_file.as_deref(),
                file.admin_plane.database_pool_size,
                file.admin_plane.database_ca_file.as_deref(),
            )?;
            let password = std::env::var("PERMISO_DATABASE_PASSWORD")
                .ok()
                .map(permiso::core::key::Secret::new);
            let rt = tokio::runtime::Runtime::new()?;
            let report = rt.block_on(permiso::admin::storage::migrate(&db, password.as_ref()))?;
            println!("{report}");
            Ok(())
        }
        Command::Sidecar { config } => {
            // The same steps at start and on every SIGHUP.
            let load = move || -> anyhow::Result<SidecarConfig> {
                let file = config::load_file(&config)?;
                let sc = file
                    .sidecar
                    .as_ref()
                    .with_context(|| format!("{} has no [sidecar] section", config.display()))?;
                Ok(SidecarConfig::from_file(
                    sc,
                    config::read_sync_credential(&sc.sync)?,
                )?)
            };
            let cfg = load()?;
            permiso::sidecar::run(cfg, Arc::new(SystemClock), Box::new(load))
        }
        Command::Dev(args) => permiso::dev::run(args),
        Command::Passthrough {
            listen,
            upstream,
            threads,
            pingora_proxy,
        } => {
            use permiso::sidecar::passthrough::{run, Engine};
            let engine = if pingora_proxy {
                Engine::PingoraProxy
            } else {
                Engine::H1
            };
            run(listen, upstream, threads, engine);
            Ok(())
        }
        Command::Services { admin, cmd } => finish(cli::services(&admin, &cmd)),
        Command::Audit { admin, filter, cmd } => finish(cli::audit(&admin, &filter, cmd.as_ref())),
        Command::SigningKeys { admin, cmd } => finish(cli::signing_keys(&admin, &cmd)),
        Command::Sidecars { admin } => finish(cli::sidecars(&admin)),
        Command::Openapi { out } => {
            let doc = permiso::admin::openapi::document();
            match out {
                Some(path) => {
                    std::fs::write(&path, doc).with_context(|| format!("writing {}", path.display()))
                }
                None => {
                    print!("{doc}");
                    Ok(())
                }
            }
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            use std::io::Write;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "permiso", &mut script);
            // `permiso completions bash | head` closing the pipe early is not an error.
            match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                r => Ok(r?),
            }
        }
        Command::Keys { admin, cmd } => finish(cli::keys(&admin, &cmd)),
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
