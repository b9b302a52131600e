//! `config::parse_file` on arbitrary text, then `SidecarConfig::from_file` and
//! `AdminConfig::from_file` on what parses: bad config is an error, never a panic.
//!
//! Two things are neutralised before validation so a run stays local and bounded:
//! - addresses that are not literal `ip:port` and would go to the system resolver (a DNS
//!   lookup per input) are replaced by a literal loopback address; the ones std refuses
//!   without a lookup (no port, bad port) are kept, so those errors are still exercised;
//! - `*_file` credential paths are redirected to two files this target writes (one with a
//!   credential, one empty), so the fuzzer cannot make it read /dev/zero or block on a FIFO.
#![no_main]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use permiso::config::{self, file, AdminConfig, SidecarConfig};
use permiso::core::key::Secret;

/// Set in the environment so seeds using `api_key_env = "PERMISO_FUZZ_KEY"` reach the end.
const ENV_VAR: &str = "PERMISO_FUZZ_KEY";

struct Files {
    credential: String,
    empty: String,
}

fn files() -> &'static Files {
    static F: OnceLock<Files> = OnceLock::new();
    F.get_or_init(|| {
        std::env::set_var(ENV_VAR, "svc_live_fuzz-credential");
        // One fixed directory (no litter per run); written by rename so parallel fuzz jobs
        // never read a half-written file.
        let dir: PathBuf = std::env::temp_dir().join("permiso-fuzz-config");
        std::fs::create_dir_all(&dir).expect("temp dir");
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            let tmp = dir.join(format!("{name}.{}", std::process::id()));
            std::fs::write(&tmp, text).expect("write");
            std::fs::rename(&tmp, &path).expect("rename");
            path
        };
        let credential = write("credential", "svc_live_fuzz-credential\nsecond line\n");
        let empty = write("empty", "");
        Files {
            credential: credential.to_string_lossy().into_owned(),
            empty: empty.to_string_lossy().into_owned(),
        }
    })
}

/// What `str::to_socket_addrs` would send to getaddrinfo becomes a literal address.
fn no_lookup(addr: &mut String) {
    if addr.parse::<SocketAddr>().is_ok() {
        return;
    }
    if let Some((_, port)) = addr.rsplit_once(':') {
        if port.parse::<u16>().is_ok() {
            *addr = "127.0.0.1:9".into();
        }
    }
}

fn local_file(path: &mut Option<String>) {
    if let Some(p) = path {
        let f = files();
        *p = if p.len() % 2 == 0 {
            f.credential.clone()
        } else {
            f.empty.clone()
        };
    }
}

fn sanitize_sidecar(s: &mut file::Sidecar) {
    no_lookup(&mut s.listen);
    no_lookup(&mut s.upstream);
    if let Some(a) = &mut s.admin_listen {
        no_lookup(a);
    }
    if let Some(e) = &mut s.egress {
        no_lookup(&mut e.listen);
        for d in e.destinations.values_mut() {
            local_file(&mut d.api_key_file);
            local_file(&mut d.client_secret_file);
        }
    }
    // `credential_file` is only read by `read_sync_credential`, which this target does not call.
}

/// `PERMISO_FUZZ_DEBUG=1` prints what each input led to (for checking what the seeds reach).
fn debug() -> bool {
    static D: OnceLock<bool> = OnceLock::new();
    *D.get_or_init(|| std::env::var_os("PERMISO_FUZZ_DEBUG").is_some())
}

fuzz_target!(|data: &[u8]| {
    let _ = files();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parsed = match config::parse_file(text, Path::new("fuzz.toml")) {
        Ok(p) => p,
        Err(e) => {
            if debug() {
                eprintln!("parse_file: {e}");
            }
            return;
        }
    };

    no_lookup(&mut parsed.admin_plane.listen);
    for key in [
        None,
        Some("short".to_string()),
        Some("k".repeat(config::MIN_ADMIN_KEY_LEN)),
    ] {
        let admin = AdminConfig::from_file(&parsed.admin_plane, key);
        if debug() {
            eprintln!("AdminConfig: {:?}", admin.as_ref().map(|a| a.listen));
        }
        if let Ok(admin) = admin {
            assert!(admin.max_body_bytes >= 1024);
            assert!(!admin.token_audience.is_empty());
        }
    }

    if let Some(sidecar) = &mut parsed.sidecar {
        sanitize_sidecar(sidecar);
        let sc = SidecarConfig::from_file(sidecar, Secret::new("svc_live_sync".into()));
        if debug() {
            eprintln!(
                "SidecarConfig: {:?}",
                sc.as_ref()
                    .map(|c| (c.listen, c.routes.len(), c.egress.is_some()))
            );
        }
        if let Ok(sc) = sc {
            assert!(!sc.routes.is_empty());
            assert!(sc.admin_url.starts_with("http://") || sc.admin_url.starts_with("https://"));
            assert!((1..=256).contains(&sc.threads));
            let _ = sc.routes.find("GET", "/health");
        }
    }
});
