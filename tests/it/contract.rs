//! The admin API against its own published contract: schemathesis (from PyPI) reads the
//! admin plane's `/openapi.json` and sends it generated requests, valid and invalid, for every
//! operation. The run fails on any 5xx, any status, content type, header or body the document
//! does not describe, any schema-violating request that is accepted, any endpoint that works
//! without its credential, and any refused request that wrote something
//! (`contract/hooks.py`: the sync version and the audit log, failed logins aside).
//!
//! Bounded for CI (`PERMISO_CONTRACT_EXAMPLES` per operation, 200 by default, with a fixed
//! seed); what earlier runs found is kept as plain regression tests beside the code that was
//! fixed. The throttles on failed credentials are raised here: the admin clock does not move
//! in tests, and the point is to reach every handler, not to watch 429s.

use std::process::Command;

use serde_json::json;

use crate::common::{python_venv, Harness, ADMIN_KEY, ROUTES};

#[test]
fn the_admin_api_keeps_its_openapi_contract_under_schemathesis() {
    let h = Harness::start_custom(ROUTES, |a| {
        a.auth_failures_per_minute_per_ip = 1_000_000;
        a.client_auth_failures_per_minute = 1_000_000;
        a.client_auth_failures_per_minute_per_ip = 1_000_000;
        a.token_requests_per_minute_per_ip = 1_000_000;
        a.audited_auth_failures_per_minute = 1_000_000;
        // A generated long poll must not hold the run for the default 30 s.
        a.sync_max_wait_seconds = 1;
    });
    // Real ids for the path parameters, half of the time (the rest are generated).
    let a = h.create(json!({"service_name": "contract-a", "scopes": ["trade:read"]}));
    let b = h.create(
        json!({"service_name": "contract-b", "scopes": ["account:read"], "rate_limit_per_minute": 60}),
    );
    let (_, shown) = h.admin_req(
        reqwest::Method::GET,
        &format!("/auth/admin/services/{}", b.service_id),
        None,
    );
    let secret_id = shown["client_secrets"][0]["key_id"].as_str().unwrap().to_string();
    let out = h.dir.path().join("schemathesis");
    std::fs::create_dir_all(&out).unwrap();
    let config = out.join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            "[cache]\nenabled = false\n\n\
             [checks]\nenabled = false\n\
             not_a_server_error.enabled = true\n\
             status_code_conformance.enabled = true\n\
             content_type_conformance.enabled = true\n\
             response_schema_conformance.enabled = true\n\
             response_headers_conformance.enabled = true\n\
             negative_data_rejection.enabled = true\n\
             # A request refused for its size (413) or its slowness (408) is refused too; a\n\
             # 5xx never counts as a refusal here.\n\
             negative_data_rejection.expected-statuses = \
             [\"400\", \"401\", \"403\", \"404\", \"405\", \"406\", \"408\", \"409\", \"413\", \"415\", \"422\", \"428\", \"429\"]\n\
             ignored_auth.enabled = true\n\
             refused_request_writes_nothing.enabled = true\n\n\
             # RFC 6749 §2.3: a broken Authorization header beside client credentials in the\n\
             # form is two authentication methods, invalid_request (400), not a 401.\n\
             [[operations]]\n\
             include-path-regex = \"^/oauth/(introspect|revoke|token)$|^/auth/service-token$\"\n\
             checks.ignored_auth.enabled = false\n\n\
             [dictionaries.services]\nvalues = [\"{}\", \"{}\"]\n\n\
             [dictionaries.keys]\nvalues = [\"{}\", \"{}\", \"{}\"]\n\n\
             [parameters]\n\"path.id\" = {{ dictionary = \"services\", probability = 0.5 }}\n\
             \"path.key_id\" = {{ dictionary = \"keys\", probability = 0.5 }}\n",
            a.service_id, b.service_id, a.key_id, b.key_id, secret_id
        ),
    )
    .unwrap();
    let py = python_venv("schemathesis-venv", "schemathesis", "schemathesis==4.32.5");
    let st = py.parent().unwrap().join("schemathesis");
    let base = h.admin_url("");
    let examples = std::env::var("PERMISO_CONTRACT_EXAMPLES").unwrap_or_else(|_| "200".into());
    let hooks = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/contract/hooks.py");
    let run = Command::new(&st)
        .current_dir(&out)
        .env("SCHEMATHESIS_HOOKS", hooks)
        .env("PERMISO_CONTRACT_BASE", &base)
        .env("PERMISO_CONTRACT_ADMIN_KEY", ADMIN_KEY)
        .env("PERMISO_CONTRACT_JUDGED_FILE", out.join("judged"))
        .env("HYPOTHESIS_STORAGE_DIRECTORY", out.join("hypothesis"))
        .args(["--config-file", config.to_str().unwrap(), "--no-color", "run"])
        .arg(format!("{base}/openapi.json"))
        .args(["--url", &base])
        .args(["-H", &format!("X-Admin-Api-Key: {ADMIN_KEY}")])
        // Checks are chosen in the config file: one named on the command line would override
        // the per-operation exception above.
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", &examples, "--seed", "17", "--workers", "1"])
        .args(["--request-timeout", "10", "--generation-database", "none"])
        .output()
        .expect("running schemathesis");
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    std::fs::write(out.join("run.log"), &log).unwrap();
    assert!(
        run.status.success(),
        "schemathesis found problems (exit {:?}):\n{log}",
        run.status.code()
    );
    // A vacuous pass (nothing generated, an operation left out) is no pass: every operation
    // of the document was tested, and every generated case passed.
    let doc: serde_json::Value = h
        .http
        .get(format!("{base}/openapi.json"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let operations: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_object().unwrap().len())
        .sum();
    assert!(operations >= 26, "{operations} operations in the document");
    assert!(
        log.contains(&format!("Tested: {operations}\n")),
        "not every operation was tested:\n{log}"
    );
    let cases = log
        .lines()
        .find_map(|l| {
            let (generated, rest) = l.trim().split_once(" generated, ")?;
            let passed = rest.split_once(" passed")?.0;
            (generated == passed)
                .then(|| generated.parse::<u64>().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no \"N generated, N passed\" line:\n{log}"));
    assert!(cases >= 10 * operations as u64, "only {cases} cases:\n{log}");
    // The write check really judged refusals (hooks loaded, hooks called).
    let judged: u64 = std::fs::read_to_string(out.join("judged"))
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        judged > operations as u64,
        "refused_request_writes_nothing judged {judged} refusals"
    );
}
