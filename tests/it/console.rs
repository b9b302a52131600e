//! The web console at `/console` in a real headless Chromium driven through chromedriver
//! (fantoccini): sign-in, a service created, its key rotated with a chosen grace and revoked
//! behind the in-page confirm, the audit log and the fleet, each key checked at the sidecar.
//!
//! A real browser because what matters here only exists in one: the page runs under a CSP that
//! forbids inline script and style (a violation lands in the browser log, read at the end),
//! keeps the admin key in sessionStorage and nowhere else, and verifies the audit chain itself
//! by recomputing every BLAKE3 hash in JavaScript. Needs /usr/bin/chromedriver and
//! /usr/bin/chromium (.ci/run installs them): without them the test fails, it does not skip.
//! PERMISO_CONSOLE_SCREENSHOTS=<dir> saves a PNG of each page there.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{error::CmdError, wd::WebDriverCompatibleCommand, Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{free_port, header, wait_ok, Harness, Proc, ADMIN_KEY, ROUTES};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long any one thing may take to appear in the page.
const WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);
const TRADES: &str = "/api/v1/trades";
const FIVE_S: Duration = Duration::from_secs(5);

/// The start of the sign-in page's message for a wrong key: the API's error_description.
const REFUSED: &str =
    "Sign-in refused: missing or invalid credential: send the admin key in the X-Admin-Api-Key header";
/// Whether the page's HTML holds `arguments[0]`.
const IN_PAGE: &str = "return document.body.innerHTML.includes(arguments[0]);";

/// `arguments[1]` of the element `arguments[0]` once it exists and is not hidden (`text`:
/// its text).
const SHOWN: &str = "const e = document.querySelector(arguments[0]); \
    return !!e && !e.hidden && (arguments[1] === 'text' ? e.textContent : e.getAttribute(arguments[1]));";

/// What a click on #copy-key did: 'copied' (clipboard granted), 'selected' (refused: the key
/// `arguments[0]` is selected and the operator told to press Ctrl+C), or null (not yet).
const COPY_RESULT: &str = "const b = document.querySelector('#copy-key'); \
    const hint = b.closest('.secret-row-item').querySelector('.copy-hint'); \
    if (b.textContent === 'Copied') return 'copied'; \
    return !hint.hidden && hint.textContent.includes('Ctrl+C') \
        && String(getSelection()) === arguments[0] ? 'selected' : null;";

/// A headless Chromium behind a chromedriver of its own, with blocking methods: each one
/// `block_on`s a small current-thread runtime, so the harness's blocking HTTP client is never
/// used inside it. Lookups are retried until `WAIT`: the console re-renders after each write,
/// so an element found a moment ago can be stale.
struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    shots: Option<PathBuf>,
    _chromedriver: Proc,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start(h: &Harness) -> Browser {
        if !Path::new(CHROMEDRIVER).exists() {
            panic!("chromedriver not installed (apt-get install chromium chromium-driver; .ci/run installs them)");
        }
        let port = free_port().port();
        let log = std::fs::File::create(h.dir.path().join("chromedriver.log")).unwrap();
        let chromedriver = Proc(
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .spawn()
                .unwrap_or_else(|e| panic!("starting {CHROMEDRIVER}: {e}")),
        );
        let url = format!("http://127.0.0.1:{port}");
        // /status answers 200 once chromedriver accepts sessions.
        wait_ok(&h.http, &format!("{url}/status"), "chromedriver");
        let profile = tempfile::tempdir().unwrap();
        let Value::Object(caps) = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                format!("--user-data-dir={}", profile.path().display()), "--window-size=1280,900",
            ]},
            "goog:loggingPrefs": {"browser": "ALL"},
        }) else {
            unreachable!()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(caps);
        let client = rt
            .block_on(builder.connect(&url))
            .unwrap_or_else(|e| panic!("no browser session from chromedriver at {url}: {e}"));
        let shots = std::env::var_os("PERMISO_CONSOLE_SCREENSHOTS").map(PathBuf::from);
        if let Some(dir) = &shots {
            std::fs::create_dir_all(dir).unwrap();
        }
        let client = Some(client);
        Browser {
            rt,
            client,
            shots,
            _chromedriver: chromedriver,
            _profile: profile,
        }
    }

    fn c(&self) -> Client {
        self.client.clone().expect("browser session open")
    }

    /// Runs `f` until it succeeds, for up to `WAIT`.
    fn retry<T, R: Future<Output = Result<T, CmdError>>>(&self, what: &str, f: impl Fn(Client) -> R) -> T {
        let started = Instant::now();
        loop {
            match self.rt.block_on(f(self.c())) {
                Ok(v) => return v,
                Err(_) if started.elapsed() < WAIT => std::thread::sleep(POLL),
                Err(e) => panic!("{what}: {e}\npage: {}", self.page_state()),
            }
        }
    }

    fn goto(&self, url: &str) {
        self.retry(url, |c| async move { c.goto(url).await })
    }

    fn click(&self, css: &str) {
        self.retry(css, |c| async move { find(&c, css).await?.click().await })
    }

    fn type_into(&self, css: &str, text: &str) {
        self.retry(css, |c| async move {
            let el = find(&c, css).await?;
            el.clear().await?;
            el.send_keys(text).await
        })
    }

    fn select(&self, css: &str, value: &str) {
        self.retry(css, |c| async move {
            find(&c, css).await?.select_by_value(value).await
        })
    }

    fn text(&self, css: &str) -> String {
        self.retry(css, |c| async move { find(&c, css).await?.text().await })
    }

    fn js(&self, script: &str, args: &[Value]) -> Value {
        let r = self.rt.block_on(self.c().execute(script, args.to_vec()));
        r.unwrap_or_else(|e| panic!("script {script:?}: {e}"))
    }

    /// Polls `script` (a function body) until it returns something other than null, false
    /// or ""; returns that.
    fn until(&self, what: &str, script: &str, args: &[Value]) -> Value {
        let started = Instant::now();
        loop {
            let v = self.js(script, args);
            if !matches!(v, Value::Null | Value::Bool(false)) && v != "" {
                return v;
            }
            if started.elapsed() > WAIT {
                panic!("waited for {what}\npage: {}", self.page_state());
            }
            std::thread::sleep(POLL);
        }
    }

    /// `what` (`text` or an attribute) of `css` once it is shown.
    fn shown(&self, css: &str, what: &str) -> String {
        let v = self.until(&format!("{what} of {css}"), SHOWN, &[json!(css), json!(what)]);
        v.as_str().unwrap_or_else(|| panic!("{css}: {v}")).to_string()
    }

    /// Waits until the key row `key_id` shows `status`.
    fn key_row(&self, key_id: &str, status: &str) {
        let css = format!("tr.key-row[data-key-id=\"{key_id}\"][data-status=\"{status}\"]");
        self.shown(&css, "data-status");
    }

    /// Where the page is and what it shows, for failure messages.
    fn page_state(&self) -> String {
        let script =
            "return `${location.hash} | banner: ${document.querySelector('#error-text')?.textContent} \
            | ${document.querySelector('#view')?.innerText.slice(0, 800)}`";
        match self.rt.block_on(self.c().execute(script, vec![])) {
            Ok(v) => v.as_str().unwrap_or_default().to_string(),
            Err(e) => format!("(unreadable: {e})"),
        }
    }

    /// A PNG of the window as `name` in $PERMISO_CONSOLE_SCREENSHOTS, when it is set.
    fn shot(&self, name: &str) {
        let Some(dir) = &self.shots else { return };
        let png = self.rt.block_on(self.c().screenshot());
        std::fs::write(dir.join(name), png.unwrap_or_else(|e| panic!("screenshot: {e}"))).unwrap();
    }

    /// The browser's console log (chromedriver's own command: W3C WebDriver has none, so
    /// fantoccini has no method for it).
    fn browser_log(&self) -> Vec<Value> {
        for endpoint in ["se/log", "log"] {
            if let Ok(Value::Array(entries)) = self.rt.block_on(self.c().issue_cmd(BrowserLog(endpoint))) {
                return entries;
            }
        }
        panic!("chromedriver gave no browser log (POST /session/{{id}}/se/log nor /log)");
    }

    fn close(mut self) {
        let c = self.client.take().unwrap();
        self.rt.block_on(c.close()).expect("closing the browser session");
    }
}

impl Drop for Browser {
    /// On a failed test: end the session, so that chromedriver stops its Chromium, before the
    /// `Proc` kills chromedriver.
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self.rt.block_on(tokio::time::timeout(FIVE_S, c.close()));
        }
    }
}

async fn find(c: &Client, css: &str) -> Result<Element, CmdError> {
    c.find(Locator::Css(css)).await
}

/// `POST /session/{id}/<endpoint>` with `{"type": "browser"}`: chromedriver's log command.
#[derive(Debug)]
struct BrowserLog(&'static str);

/// `url::ParseError` (url is no dependency of ours) through reqwest's re-export of the one
/// url 2 crate, which fantoccini uses too; reqwest's `Method` is http 1's, as fantoccini's.
type UrlParseError = <reqwest::Url as std::str::FromStr>::Err;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(&self, base: &reqwest::Url, session: Option<&str>) -> Result<reqwest::Url, UrlParseError> {
        base.join(&format!("session/{}/{}", session.unwrap_or_default(), self.0))
    }

    fn method_and_body(&self, _: &reqwest::Url) -> (Method, Option<String>) {
        (Method::POST, Some(r#"{"type":"browser"}"#.to_string()))
    }
}

/// `admin_plane.console` is off by default (a 404 like any unknown path), and when on every
/// file comes with the headers the page relies on.
#[test]
fn the_console_is_off_unless_configured_and_its_files_carry_their_headers() {
    let off = Harness::start();
    let r = off.http.get(off.admin_url("/console")).send().unwrap();
    assert_eq!(r.status(), 404);
    let on = Harness::start_custom(ROUTES, |a| a.console = true);
    for (path, media) in [
        ("/console", "text/html"),
        ("/console/", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/app.css", "text/css"),
    ] {
        let r = on.http.get(on.admin_url(path)).send().unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(header(&r, "content-type").unwrap().starts_with(media), "{path}");
        assert_eq!(
            header(&r, "content-security-policy"),
            Some(permiso::admin::console::CSP)
        );
        assert_eq!(header(&r, "x-frame-options"), Some("DENY"));
        assert_eq!(header(&r, "cache-control"), Some("no-store"));
        assert_eq!(header(&r, "x-content-type-options"), Some("nosniff"));
        assert_eq!(header(&r, "referrer-policy"), Some("no-referrer"));
    }
    assert_eq!(
        on.http
            .get(on.admin_url("/console/other.js"))
            .send()
            .unwrap()
            .status(),
        404
    );
}

#[test]
fn the_console_walks_an_operator_through_a_key_lifecycle_in_a_real_browser() {
    let h = Harness::start_custom(ROUTES, |a| a.console = true);
    let page = h.http.get(h.admin_url("/console")).send().unwrap();
    let csp = header(&page, "content-security-policy");
    assert_eq!(csp, Some(permiso::admin::console::CSP));
    let b = Browser::start(&h);

    // Sign-in: a wrong key is refused in the API's own words, and nothing is kept.
    b.goto(&h.admin_url("/console"));
    b.type_into("#admin-key", "adm_not_the_admin_key");
    b.click("#login");
    let refused = b.shown("#login-error", "text");
    assert!(refused.starts_with(REFUSED), "{refused}");
    let at = b.js("return location.hash + ' ' + sessionStorage.length;", &[]);
    assert_eq!(at, "#/login 0", "a refused key is not kept");
    // The right key opens the services; by default it is kept in the page's memory only
    // ("keep it for this tab" is opt-in), never in localStorage, a cookie or the URL.
    b.type_into("#admin-key", ADMIN_KEY);
    b.click("#login");
    b.shown("tr.service-row", "data-service-id");
    let kept = "return [sessionStorage.getItem('permiso.console.admin-key'), localStorage.length, \
                document.cookie, location.href.includes(arguments[0])];";
    assert_eq!(b.js(kept, &[json!(ADMIN_KEY)]), json!([null, 0, "", false]));
    b.shot("console-services.png");

    // Create a service: its key is shown once, can be copied, and works at the sidecar.
    b.click("#new-service");
    b.type_into("#create-name", "console-made");
    b.type_into("#create-scopes", "trade:read");
    b.click("#create-submit");
    let key = b.shown("#one-time-key", "text");
    assert!(key.starts_with("svc_live_"), "{key}");
    let export = b.text("#one-time-export");
    assert!(export.contains(&format!("export KEY={key} SID=")), "{export}");
    b.click("#copy-key");
    let copied = b.until("the copy button's answer", COPY_RESULT, &[json!(key)]);
    eprintln!("copy: {copied} (headless Chromium may refuse the clipboard)");
    b.shot("console-created.png");
    let sid = b.shown("#open-created", "href").replace("#/services/", "");
    assert!(export.contains(&format!("SID={sid}")), "{export}");
    let (_, made) = h.admin_req(Method::GET, &format!("/auth/admin/services/{sid}"), None);
    assert_eq!(made["service_name"], "console-made", "{made}");
    assert_eq!(made["scopes"], json!(["trade:read"]), "{made}");
    let old_id = made["keys"][0]["key_id"].as_str().unwrap().to_string();
    h.wait_for_status(TRADES, Some(&key), 200, FIVE_S);

    // The service's page: the one-time key went with the view that showed it.
    b.click("#open-created");
    b.key_row(&old_id, "active");
    assert_eq!(b.shown("#service-detail", "data-service-id"), sid);
    assert_eq!(b.js(IN_PAGE, &[json!(key)]), false, "key outlived its view");

    // Rotate with a 24 h grace: the old key keeps working until then, the new one works too.
    b.select("#rotate-grace", "86400");
    let grace = b.js("return document.querySelector('#rotate-grace').value;", &[]);
    assert_eq!(grace, "86400");
    b.click("#rotate-key");
    b.key_row(&old_id, "grace");
    let new_key = b.text("#one-time-key");
    assert!(new_key.starts_with("svc_live_") && new_key != key, "{new_key}");
    let ends = permiso::admin::model::rfc3339(h.clock_secs() as i64 + 86_400).replace('T', " ");
    let panel = b.text("#one-time");
    let stop = format!("Previous ones stop at {ends}");
    assert!(panel.contains(&stop), "not a 24 h grace: {panel}");
    b.shot("console-service.png");
    h.wait_for_status(TRADES, Some(&new_key), 200, FIVE_S);
    assert_eq!(h.get(TRADES, Some(&key)).status(), 200, "old key in grace");

    // A secret hidden once stays hidden: rotating the client secret next shows that secret
    // alone (found in review: the hidden key came back with the next rotation).
    b.click("#one-time-done");
    assert_eq!(
        b.js(IN_PAGE, &[json!(new_key)]),
        false,
        "hidden, yet still in the page"
    );
    b.click("#rotate-secret");
    let secret = b.shown("#one-time-secret", "text");
    assert!(secret.starts_with("pcs_"), "{secret}");
    assert_eq!(
        b.js(IN_PAGE, &[json!(new_key)]),
        false,
        "the hidden key came back"
    );
    b.click("#one-time-done");

    // Revoke the old key behind the confirm: the sidecar refuses it, the new key still works.
    b.click(&format!("button.revoke-key[data-key-id=\"{old_id}\"]"));
    b.click("#confirm-yes");
    b.key_row(&old_id, "revoked");
    let status = b.text("#write-status");
    assert!(status.contains(&format!("Key {old_id} revoked")), "{status}");
    h.wait_for_status(TRADES, Some(&key), 401, FIVE_S);
    assert_eq!(h.get(TRADES, Some(&new_key)).status(), 200);

    // The audit log holds each step, and the page's own check of the chain ends at the head
    // the admin plane stores.
    b.click("#nav-audit");
    let rows = "const a = [...document.querySelectorAll('tr.audit-row')].map(r => r.dataset.action); \
                return a.length ? a : null;";
    let actions = b.until("the audit rows", rows, &[]);
    let actions = actions.as_array().unwrap();
    for action in ["service.create", "key.rotate", "key.revoke"] {
        assert!(actions.contains(&json!(action)), "no {action}: {actions:?}");
    }
    b.click("#verify-chain");
    let done = "const s = document.querySelector('#chain-status').dataset.state; \
                return ['ok', 'broken', 'error'].includes(s) && s;";
    let state = b.until("the chain verification", done, &[]);
    let chain = b.text("#chain-status");
    assert_eq!(state, "ok", "{chain}");
    assert!(chain.contains("Chain verified"), "{chain}");
    let (_, log) = h.admin_req(Method::GET, "/auth/admin/audit?limit=1000", None);
    let last = log["entries"].as_array().unwrap().last().unwrap();
    let head = format!("{}:{}", last["seq"], last["hash"].as_str().unwrap());
    assert_eq!(b.text("#chain-head"), head);
    b.shot("console-audit.png");

    // Someone with the database rewrites an entry (past the append-only trigger): the page
    // shows the chain broken at that entry.
    let drop_trigger = if crate::common::on_postgres() {
        "DROP TRIGGER audit_log_no_update ON audit_log"
    } else {
        "DROP TRIGGER audit_log_no_update"
    };
    h.exec_sql(&format!(
        "{drop_trigger}; UPDATE audit_log SET actor = 'someone-else' WHERE seq = 2;"
    ))
    .unwrap();
    b.click("#verify-chain");
    let again = "const s = document.querySelector('#chain-status').dataset.state; \
                 return ['broken', 'error'].includes(s) && s;";
    let state = b.until("the chain found broken", again, &[]);
    let chain = b.text("#chain-status");
    assert_eq!(state, "broken", "{chain}");
    assert!(chain.contains("BROKEN at seq 2"), "{chain}");
    let marked =
        "return [...document.querySelectorAll('tr.audit-row.chain-broken')].map(r => r.dataset.seq);";
    assert_eq!(
        b.js(marked, &[]),
        json!(["2"]),
        "the broken entry is the one marked"
    );

    // The fleet: the harness's sidecar reports with every sync.
    b.click("#nav-fleet");
    assert_eq!(b.shown("tr.sidecar-row", "data-status"), "live");
    let summary = b.text("#fleet-summary");
    assert!(summary.contains("1 live"), "{summary}");
    b.shot("console-fleet.png");

    // Logging out drops the key from the tab.
    b.click("#logout");
    b.shown("#admin-key", "id");
    let stored = b.js("return sessionStorage.length + localStorage.length;", &[]);
    assert_eq!(stored, 0);

    // No CSP violation and no script error: the only failed load is the refused sign-in
    // (which also shows that the log is really read).
    let mut refusals = 0;
    for entry in b.browser_log() {
        let level = entry["level"].as_str().unwrap_or("?");
        let message = entry["message"].as_str().unwrap_or("");
        if message.contains("status of 401") {
            refusals += 1;
        } else {
            let csp = message.contains("Content Security Policy") || message.contains("Refused to");
            assert!(!csp && level != "SEVERE", "in the browser log: {level} {message}");
        }
    }
    assert!(refusals > 0, "the refused sign-in is not in the browser log");
    b.close();
}
