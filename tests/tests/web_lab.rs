//! The web view in a real browser (Debian's chromium, headless) and the
//! Prometheus endpoint, against a lab whose canary halted, over TLS with
//! the controller's certificate. Nothing but `/live` and `/ready` is served
//! without a client certificate from the lab's CA or a session from the
//! one-time login link; agents' certificates, foreign `Host` names and
//! used-up links are refused. Needs root and chromium (scripts/test
//! installs it); a screenshot is kept in target/test-artifacts/.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use wavegate_tests::lab::{Http, Lab, eventually};

const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn security_headers(what: &str, r: &Http) {
    for (name, want) in [
        ("content-security-policy", CSP),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
    ] {
        assert_eq!(r.header(name), Some(want), "{what}: {name} in\n{}", r.head);
    }
    assert!(
        r.header("strict-transport-security")
            .is_some_and(|v| v.starts_with("max-age=")),
        "{what}: HSTS in\n{}",
        r.head
    );
}

fn chromium(lab: &Lab, args: &[&str]) -> std::process::Output {
    let profile = lab.dir.join("chromium-profile");
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            // The lab's CA is not the system's; curl checks the chain.
            "--ignore-certificate-errors",
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(args)
        .output()
        .expect("chromium (Debian package `chromium`, installed by scripts/test)")
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn the_web_view_shows_a_halted_rollout_in_a_real_browser_and_metrics_parse() {
    let lab = Lab::up("web", "lab-fleet.yaml");
    let id = lab.submit("lab/canary-fails.yaml");
    lab.approve(&id);
    lab.wait_state(&id, "halted", Duration::from_secs(90));
    eventually(Duration::from_secs(60), "the canary's rollback", || {
        (lab.status(&id)["waves"][0]["hosts"][0]["rolled_back"] == true).then_some(())
    });
    let canary = lab.status(&id)["waves"][0]["hosts"][0]["id"]
        .as_str()
        .expect("canary")
        .to_owned();
    let base = lab.web();
    assert!(base.starts_with("https://"), "the web view is served over TLS: {base}");

    // Nothing without a certificate or a session, and the refusal says how
    // to log in and nothing else.
    for path in [
        "/".to_owned(),
        format!("/rollouts/{id}"),
        "/audit".into(),
        "/metrics".into(),
        "/login".into(),
        "/no-such-page".into(),
    ] {
        let r = lab.web_get(&path, &[]);
        assert_eq!(r.status, 401, "{path} without credentials: {r:?}");
        assert!(
            r.body.contains("login link") && !r.body.contains(&id) && !r.body.contains(&canary),
            "{path}: {}",
            r.body
        );
        security_headers(&path, &r);
    }
    // /live and /ready answer anyone, and say nothing more.
    let live = lab.web_get("/live", &[]);
    assert_eq!((live.status, live.body.as_str()), (200, "ok\n"), "{live:?}");
    let ready = lab.web_get("/ready", &[]);
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"), "{ready:?}");
    // An agent's certificate (from the same CA) is no operator's.
    for path in ["/", "/metrics"] {
        let r = lab.web_get(path, &lab.cert_args(&format!("agent-{canary}")));
        assert_eq!(r.status, 403, "{path} with an agent's certificate: {r:?}");
    }
    // A name the view does not serve is refused, even with a good
    // certificate (a DNS-rebinding page would send its own name).
    let mut rebound = lab.cert_args("auditor");
    rebound.extend(["-H".into(), "Host: rebound.example:80".into()]);
    let r = lab.web_get("/", &rebound);
    assert_eq!(r.status, 421, "a foreign Host: {r:?}");
    assert!(!r.body.contains(&id), "{}", r.body);
    let port = base.rsplit(':').next().expect("a port");
    let mut local = lab.cert_args("auditor");
    local.extend(["-H".into(), format!("Host: localhost:{port}")]);
    assert_eq!(lab.web_get("/", &local).status, 200, "localhost is one of its names");
    // With the auditor's certificate: the page, with the headers.
    let page = lab.web_as("auditor", &format!("/rollouts/{id}"));
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.body.contains("Halted:"), "{}", page.body);
    security_headers("the rollout page", &page);

    // The browser logs in through the link `lab up` recorded and lands on
    // the rollout page it asked for.
    let lab_json: Value =
        serde_json::from_str(&std::fs::read_to_string(lab.dir.join("lab.json")).expect("lab.json")).expect("json");
    let link = lab_json["web_login"]
        .as_str()
        .expect("lab.json has the login link")
        .to_owned();
    assert!(link.starts_with(&format!("{base}/login?token=")), "{link}");
    assert_eq!(
        lab.web_login(),
        link,
        "the login file holds the same link until it is used"
    );
    let dom = chromium(&lab, &["--dump-dom", &format!("{link}&next=/rollouts/{id}")]);
    let dom = String::from_utf8_lossy(&dom.stdout);
    for want in [
        "Halted:",
        "healthy-flag",
        &canary,
        "rolled back",
        "Dry-run reports",
        "untouched",
        "snapshot pinned",
        "Events",
    ] {
        assert!(dom.contains(want), "the rollout page does not show {want:?}:\n{dom}");
    }
    // The link is used up; the next one is in the login file.
    let again = lab.web_get(&link, &[]);
    assert_eq!(again.status, 401, "a login link works once: {again:?}");
    let next = lab.web_login();
    assert_ne!(next, link, "a fresh link for the next person");

    // The session cookie: what it is, that it opens the view, and that a
    // redirect never leaves the view.
    let r = lab.web_get(&format!("{next}&next=//evil.example/"), &[]);
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location"), Some("/"), "only local paths are followed");
    let cookie = r.header("set-cookie").expect("a session cookie").to_owned();
    for part in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(cookie.contains(part), "{part} in {cookie}");
    }
    let pair = cookie.split(';').next().expect("name=value").to_owned();
    let audit = lab.web_get("/audit", &["-H".into(), format!("Cookie: {pair}")]);
    assert_eq!(audit.status, 200, "{audit:?}");
    assert!(audit.body.contains("Verified:"), "{}", audit.body);
    let (name, _) = pair.split_once('=').expect("name=value");
    let forged = lab.web_get("/audit", &["-H".into(), format!("Cookie: {name}={}", "a".repeat(64))]);
    assert_eq!(forged.status, 401, "a made-up session: {forged:?}");

    let index =
        String::from_utf8_lossy(&chromium(&lab, &["--dump-dom", &format!("{}&next=/", lab.web_login())]).stdout)
            .into_owned();
    assert!(
        index.contains(&format!("/rollouts/{id}")) && index.contains("halted"),
        "{index}"
    );
    let audit =
        String::from_utf8_lossy(&chromium(&lab, &["--dump-dom", &format!("{}&next=/audit", lab.web_login())]).stdout)
            .into_owned();
    assert!(
        audit.contains("Verified:") && audit.contains("approved by approver"),
        "{audit}"
    );

    // A screenshot kept as a test artifact.
    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let shot = artifacts.join("rollout-halted.png");
    let _ = std::fs::remove_file(&shot);
    let out = chromium(
        &lab,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1400,1100",
            &format!("{}&next=/rollouts/{id}", lab.web_login()),
        ],
    );
    let png =
        std::fs::read(&shot).unwrap_or_else(|_| panic!("no screenshot: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "not a real screenshot ({} bytes)",
        png.len()
    );

    // Prometheus scrapes with a client certificate.
    let scrape = lab.web_as("auditor", "/metrics");
    let (status, metrics) = (scrape.status, scrape.body);
    assert_eq!(status, 200);
    let mut samples = std::collections::BTreeMap::new();
    for line in metrics.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number in {line}"));
        assert!(!name.contains("host="), "a host id must never be a label: {line}");
        samples.insert(name.to_owned(), value);
    }
    let v = |k: &str| *samples.get(k).unwrap_or_else(|| panic!("no sample {k} in:\n{metrics}"));
    assert_eq!(v("wavegate_controller_rollouts{state=\"halted\"}"), 1.0);
    assert_eq!(v("wavegate_controller_waves_halted_total"), 1.0);
    assert_eq!(
        v("wavegate_controller_steps_total{outcome=\"ok\"}"),
        1.0,
        "the canary's one step"
    );
    assert_eq!(v("wavegate_controller_agents_connected"), 10.0);
    assert!(v("wavegate_controller_audit_records") > 10.0);
    assert!(
        v("wavegate_controller_snapshot_pinned_bytes") > 0.0,
        "the halted canary's snapshot is pinned"
    );
    assert_eq!(v("wavegate_controller_dry_runs_blocked_total"), 0.0);
    assert_eq!(v("wavegate_controller_step_duration_seconds_count"), 1.0);
    assert!(samples.contains_key("wavegate_controller_wave_duration_seconds_count"));
}
