//! The web view in a real browser (Debian's chromium, headless) and the
//! Prometheus endpoint, against a lab whose canary halted. Needs root and
//! chromium (scripts/test installs it); a screenshot is kept in
//! target/test-artifacts/.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use wavegate_tests::lab::{Lab, eventually};

fn web(lab: &Lab) -> String {
    let lab_json: Value =
        serde_json::from_str(&std::fs::read_to_string(lab.dir.join("lab.json")).expect("lab.json")).expect("json");
    lab_json["web"]
        .as_str()
        .expect("lab.json names the web view")
        .to_owned()
}

fn get(url: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(host).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
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
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(args)
        .output()
        .expect("chromium (Debian package `chromium`, installed by scripts/test)")
}

#[test]
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
    let base = web(&lab);

    // The rollout page, as the browser renders it.
    let page = format!("{base}/rollouts/{id}");
    let dom = chromium(&lab, &["--dump-dom", &page]);
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
    let index = String::from_utf8_lossy(&chromium(&lab, &["--dump-dom", &base]).stdout).into_owned();
    assert!(
        index.contains(&format!("/rollouts/{id}")) && index.contains("halted"),
        "{index}"
    );
    let audit = String::from_utf8_lossy(&chromium(&lab, &["--dump-dom", &format!("{base}/audit")]).stdout).into_owned();
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
            &page,
        ],
    );
    let png =
        std::fs::read(&shot).unwrap_or_else(|_| panic!("no screenshot: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "not a real screenshot ({} bytes)",
        png.len()
    );

    // Operational endpoints.
    assert_eq!(get(&format!("{base}/live")).0, 200);
    assert_eq!(get(&format!("{base}/ready")).0, 200);
    let (status, metrics) = get(&format!("{base}/metrics"));
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
