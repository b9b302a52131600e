//! The `permiso services …` and `permiso audit …` commands, run as the real binary against a
//! real admin plane: output for people and scripts, and one exit code per kind of failure.

use std::process::{Command, Output};

use serde_json::{json, Value};

use crate::common::{Harness, ADMIN_KEY, ROUTES};

fn permiso(h: &Harness, key: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_permiso"))
        .args(args)
        .env("PERMISO_ADMIN_URL", format!("http://{}", h.admin_addr))
        .env("PERMISO_ADMIN_API_KEY", key)
        .env("RUST_LOG", "off")
        .output()
        .expect("permiso runs")
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {stdout}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn json_of(out: &Output) -> Value {
    serde_json::from_str(&ok(out)).expect("--json prints JSON")
}

fn failed(out: &Output, code: i32, message: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(stderr.contains(message), "{message:?} not in: {stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn services_lifecycle_through_the_cli() {
    let h = Harness::start_with(ROUTES);
    let created = json_of(&permiso(
        &h,
        ADMIN_KEY,
        &[
            "services",
            "--json",
            "create",
            "--name",
            "cli-made",
            "--scope",
            "trade:read",
            "--rate-limit-per-minute",
            "50",
        ],
    ));
    let id = created["service_id"].as_str().unwrap().to_string();
    let key = created["api_key"].as_str().unwrap().to_string();
    let key_id = created["key_id"].as_str().unwrap().to_string();
    assert!(key.starts_with("svc_live_"));
    h.wait_for_status(
        "/api/v1/trades",
        Some(&key),
        200,
        std::time::Duration::from_secs(2),
    );

    // People get tables.
    let list = ok(&permiso(&h, ADMIN_KEY, &["services", "list"]));
    let header = list.lines().next().unwrap();
    assert!(
        header.starts_with("SERVICE ID") && header.contains("SCOPES"),
        "{list}"
    );
    let row = list.lines().find(|l| l.contains(&id)).unwrap();
    assert!(
        row.contains("cli-made") && row.contains("enabled") && row.contains("trade:read"),
        "{row}"
    );
    let show = ok(&permiso(&h, ADMIN_KEY, &["services", "show", &id]));
    assert!(show.contains("rate limit / min   50"), "{show}");
    assert!(
        show.contains(&key_id) && !show.contains(&key),
        "keys are listed by id, never in full"
    );

    let patched = json_of(&permiso(
        &h,
        ADMIN_KEY,
        &[
            "services",
            "--json",
            "patch",
            &id,
            "--scope",
            "trade:read",
            "--scope",
            "trade:open",
            "--rate-limit-per-minute",
            "none",
        ],
    ));
    assert_eq!(patched["scopes"], json!(["trade:read", "trade:open"]));
    assert!(patched["rate_limit_per_minute"].is_null());

    let rotated = ok(&permiso(
        &h,
        ADMIN_KEY,
        &["services", "rotate", &id, "--grace-seconds", "0"],
    ));
    assert!(
        rotated.starts_with("New API key (key_") && rotated.contains("svc_live_"),
        "{rotated}"
    );
    h.wait_for_status(
        "/api/v1/trades",
        Some(&key),
        401,
        std::time::Duration::from_secs(2),
    );

    let secret = json_of(&permiso(
        &h,
        ADMIN_KEY,
        &["services", "--json", "rotate", &id, "--secret"],
    ));
    assert!(secret["client_secret"].as_str().unwrap().starts_with("pcs_"));

    let shown = json_of(&permiso(&h, ADMIN_KEY, &["services", "--json", "show", &id]));
    let active = shown["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["status"] == "active")
        .unwrap();
    let active_id = active["key_id"].as_str().unwrap();
    let revoked = ok(&permiso(&h, ADMIN_KEY, &["services", "revoke", &id, active_id]));
    assert!(revoked.starts_with(&format!("Revoked {active_id}")), "{revoked}");

    let deleted = ok(&permiso(&h, ADMIN_KEY, &["services", "delete", &id]));
    assert!(deleted.contains("Disabled"), "{deleted}");
    let row = ok(&permiso(&h, ADMIN_KEY, &["services", "list"]));
    assert!(row
        .lines()
        .find(|l| l.contains(&id))
        .unwrap()
        .contains("disabled"));

    // Audit through the CLI: filtered listing, then the chain verified client-side.
    let entries = json_of(&permiso(&h, ADMIN_KEY, &["audit", "--json", "--target", &id]));
    let actions: Vec<&str> = entries["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "service.create",
            "service.patch",
            "key.rotate",
            "secret.rotate",
            "key.revoke",
            "service.disable"
        ]
    );
    let table = ok(&permiso(&h, ADMIN_KEY, &["audit", "--action", "key.rotate"]));
    assert!(table.starts_with("SEQ") && table.contains("admin-key"), "{table}");
    let verified = ok(&permiso(&h, ADMIN_KEY, &["audit", "verify"]));
    assert!(
        verified.starts_with("audit chain intact: 8 entries"),
        "{verified}"
    );
    let head = verified
        .lines()
        .nth(1)
        .unwrap()
        .strip_prefix("head ")
        .unwrap()
        .to_string();
    ok(&permiso(
        &h,
        ADMIN_KEY,
        &["audit", "verify", "--expect-head", &head],
    ));
    // The head kept elsewhere no longer matches: another hash at that entry, or an entry the
    // chain does not reach (someone cut it short). Both are exit 10.
    let (seq, hash) = head.split_once(':').unwrap();
    let flipped: String = hash
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i == 0 {
                if c == '0' {
                    '1'
                } else {
                    '0'
                }
            } else {
                c
            }
        })
        .collect();
    failed(
        &permiso(
            &h,
            ADMIN_KEY,
            &["audit", "verify", "--expect-head", &format!("{seq}:{flipped}")],
        ),
        10,
        "no longer has the expected hash",
    );
    let beyond = format!("{}:{hash}", seq.parse::<u64>().unwrap() + 1);
    failed(
        &permiso(&h, ADMIN_KEY, &["audit", "verify", "--expect-head", &beyond]),
        10,
        "audit chain shortened",
    );

    // Tamper with the file behind the admin plane's back: verify fails with its own code.
    let conn = rusqlite::Connection::open(h.db_path()).unwrap();
    conn.execute_batch(
        "DROP TRIGGER audit_log_no_update; UPDATE audit_log SET actor = 'nobody' WHERE seq = 5;",
    )
    .unwrap();
    failed(
        &permiso(&h, ADMIN_KEY, &["audit", "verify"]),
        10,
        "audit chain broken: entry 5",
    );
}

#[test]
fn a_throttled_address_gets_the_rate_limited_exit_code() {
    let h = Harness::start_custom(ROUTES, |a| a.auth_failures_per_minute_per_ip = 1);
    failed(
        &permiso(&h, "wrong-key", &["services", "list"]),
        4,
        "unauthorized (401)",
    );
    failed(
        &permiso(&h, ADMIN_KEY, &["services", "list"]),
        8,
        "rate_limited (429)",
    );
}

#[test]
fn every_api_failure_has_its_exit_code_and_message() {
    let h = Harness::start_with(ROUTES);
    // The table output sets the one-time secrets apart, with a paste-ready line.
    let plain = ok(&permiso(
        &h,
        ADMIN_KEY,
        &["services", "create", "--name", "pasted"],
    ));
    let export = plain
        .lines()
        .find(|l| l.starts_with("export KEY="))
        .unwrap_or_else(|| panic!("{plain}"));
    let vars: std::collections::HashMap<&str, &str> = export["export ".len()..]
        .split(' ')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    assert!(plain.contains("=== SHOWN ONCE"), "{plain}");
    assert!(
        vars["KEY"].starts_with("svc_live_") && vars["SECRET"].starts_with("pcs_"),
        "{export}"
    );
    let shown = json_of(&permiso(
        &h,
        ADMIN_KEY,
        &["services", "--json", "show", vars["SID"]],
    ));
    assert_eq!(shown["service_name"], "pasted", "SID is the service's id");
    assert!(
        plain.contains(&format!(
            "API key ({}): {}",
            shown["keys"][0]["key_id"].as_str().unwrap(),
            vars["KEY"]
        )),
        "{plain}"
    );

    let a = json_of(&permiso(
        &h,
        ADMIN_KEY,
        &["services", "--json", "create", "--name", "dup"],
    ));
    let id = a["service_id"].as_str().unwrap();

    failed(
        &permiso(&h, "wrong-key", &["services", "list"]),
        4,
        "unauthorized (401)",
    );
    failed(
        &permiso(&h, ADMIN_KEY, &["services", "show", "srv_doesnotexist00000000"]),
        5,
        "not_found (404)",
    );
    failed(
        &permiso(&h, ADMIN_KEY, &["services", "create", "--name", "dup"]),
        6,
        "already exists",
    );
    failed(
        &permiso(
            &h,
            ADMIN_KEY,
            &["services", "create", "--name", "bad", "--scope", "NOT A SCOPE"],
        ),
        7,
        "invalid_request (400)",
    );
    failed(
        &permiso(&h, ADMIN_KEY, &["services", "patch", id]),
        7,
        "nothing to change",
    );
    failed(
        &permiso(&h, ADMIN_KEY, &["services", "show", "../audit"]),
        7,
        "not a valid id",
    );
    failed(
        &permiso(
            &h,
            ADMIN_KEY,
            &["services", "patch", id, "--rate-limit-per-hour", "lots"],
        ),
        7,
        "takes a number",
    );
    let unreachable = Command::new(env!("CARGO_BIN_EXE_permiso"))
        .args([
            "services",
            "--admin-url",
            "http://127.0.0.1:1",
            "--admin-key",
            ADMIN_KEY,
            "list",
        ])
        .output()
        .unwrap();
    failed(&unreachable, 3, "cannot reach the admin plane");
    // Bad usage is clap's exit code 2.
    assert_eq!(
        permiso(&h, ADMIN_KEY, &["services", "rotate"]).status.code(),
        Some(2)
    );
    // None of the refused commands wrote anything: only the harness's, "pasted"'s and "dup"'s
    // creates.
    let audited = json_of(&permiso(
        &h,
        ADMIN_KEY,
        &["audit", "--json", "--action", "service.create"],
    ));
    assert_eq!(audited["entries"].as_array().unwrap().len(), 3);
}

/// Issue 17's first-hour fixes in the CLI: a URL without a scheme is named, signing keys list
/// as a table, and audit times read RFC 3339 as every output prints them.
#[test]
fn first_hour_rough_edges_of_the_cli() {
    let h = Harness::start_with(ROUTES);
    let out = Command::new(env!("CARGO_BIN_EXE_permiso"))
        .args(["services", "list"])
        .env("PERMISO_ADMIN_URL", h.admin_addr.to_string())
        .env("PERMISO_ADMIN_API_KEY", ADMIN_KEY)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    failed(&out, 7, "needs a scheme: http://");
    let table = ok(&permiso(&h, ADMIN_KEY, &["signing-keys", "list"]));
    assert!(table.starts_with("KID") && table.contains("signing"), "{table}");
    let v = json_of(&permiso(&h, ADMIN_KEY, &["signing-keys", "list", "--json"]));
    assert!(v["signing_kid"].is_string());
    let rotated = ok(&permiso(&h, ADMIN_KEY, &["signing-keys", "rotate"]));
    assert!(
        rotated.contains("pending") && rotated.contains("signs from"),
        "{rotated}"
    );
    // Audit times: RFC 3339 as printed, or Unix seconds; anything else is a usage error.
    let all = json_of(&permiso(
        &h,
        ADMIN_KEY,
        &["audit", "--json", "--since", "2000-01-01T00:00:00Z"],
    ));
    assert!(!all["entries"].as_array().unwrap().is_empty(), "{all}");
    let none = json_of(&permiso(
        &h,
        ADMIN_KEY,
        &["audit", "--json", "--until", "2000-01-01T00:00:00+02:00"],
    ));
    assert!(none["entries"].as_array().unwrap().is_empty(), "{none}");
    let bad = permiso(&h, ADMIN_KEY, &["audit", "--since", "yesterday"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("neither RFC 3339"));
}

/// `--admin-url` and `--admin-key` go before or after the subcommand; without a key the
/// message says how to give one.
#[test]
fn admin_flags_go_before_or_after_the_subcommand() {
    let h = Harness::start_with(ROUTES);
    let url = format!("http://{}", h.admin_addr);
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_permiso"))
            .args(args)
            .env_remove("PERMISO_ADMIN_URL")
            .env_remove("PERMISO_ADMIN_API_KEY")
            .env("RUST_LOG", "off")
            .output()
            .unwrap()
    };
    for args in [
        vec!["services", "--admin-url", &url, "--admin-key", ADMIN_KEY, "list"],
        vec!["services", "list", "--admin-url", &url, "--admin-key", ADMIN_KEY],
        vec!["sidecars", "--admin-key", ADMIN_KEY, "--admin-url", &url],
    ] {
        let out = run(&args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    failed(
        &run(&["services", "list", "--admin-url", &url]),
        7,
        "set PERMISO_ADMIN_API_KEY",
    );
}

/// `permiso completions bash|zsh|fish` prints a completion script naming the commands.
#[test]
fn shell_completions_name_the_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(env!("CARGO_BIN_EXE_permiso"))
            .args(["completions", shell])
            .output()
            .unwrap();
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shell}");
        for word in ["services", "sidecars", "wait-applied", "signing-keys"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
        if shell == "bash" {
            // bash itself parses it.
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("permiso.bash");
            std::fs::write(&file, script.as_bytes()).unwrap();
            let check = Command::new("bash").arg("-n").arg(&file).output().unwrap();
            assert!(
                check.status.success(),
                "{}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
    }
}
