//! Maintenance windows on lab hosts: a window that closes during the
//! rollout leaves the next wave waiting (shown in the status and the
//! audit trail, its hosts untouched), and that wave runs in the next
//! window. `rollout notices` exports who is touched when. Needs root.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wavegate_tests::lab::{Lab, eventually};

const LONG: Duration = Duration::from_secs(90);

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

/// A Unix time as a UTC time of day, HH:MM:SS.
fn hms(t: u64) -> String {
    let s = t % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_wave_that_no_longer_fits_its_window_waits_for_the_next_one() {
    let lab = Lab::up("windows", "lab-fleet.yaml");
    for h in ["s1", "s2", "bb1"] {
        lab.seed(h, "/srv/app/.keep", "");
    }
    let now = now_s();
    // Window A is open now and closes in 30 s: wave 1 (one host, expected
    // up to 16.2 s: its step's time limit and the bake) fits it if it
    // starts within 13.8 s, whatever the machine's load; wave 2 (two hosts
    // one at a time, expected up to 32.2 s) is longer than all of A, so
    // it can only wait. Window B opens in 34 s and is long enough for it.
    let (a_end, b_start, b_end) = (now + 30, now + 34, now + 90);
    let plan = format!(
        "name: nightly
targets:
  hosts: [s1, s2, bb1]
steps:
  - name: patch
    run: sleep 1 && date +%s > /srv/app/patched-at
    writes: [/srv/app]
    timeout: 16s
waves:
  - hosts: [s1]
  - hosts: [s2, bb1]
max_in_flight: 1
health:
  bake: 200ms
  interval: 100ms
windows:
  - {{start: \"{}\", end: \"{}\", tz: UTC}}
  - {{start: \"{}\", end: \"{}\", tz: UTC}}
",
        hms(now - 60),
        hms(a_end),
        hms(b_start),
        hms(b_end)
    );
    let path = lab.write_plan("nightly", &plan);
    let check = wavegate_tests::wavegate([
        "plan".as_ref(),
        "check".as_ref(),
        "--fleet".as_ref(),
        wavegate_tests::fixture("lab-fleet.yaml").as_os_str(),
        "--policies".as_ref(),
        lab.dir.join("policies").as_os_str(),
        path.as_ref(),
    ]);
    assert_eq!(check.status, 0, "{}", check.stdout);
    assert!(
        check.stdout.contains("wave 2 runs only inside plan: daily")
            && check.stdout.contains("(expected to take up to 32s200ms)"),
        "{}",
        check.stdout
    );
    let id = lab.submit_path(&path);
    lab.approve(&id);

    // Wave 1 runs in window A; wave 2 then waits for B, untouched.
    let waiting = eventually(LONG, "wave 2 to wait for its window", || {
        let s = lab.status(&id);
        s["waves"][1]["waiting"].as_str().map(str::to_owned)
    });
    assert!(
        waiting.contains("waits for its maintenance window: starts at"),
        "{waiting}"
    );
    let text = lab.wavegate_as("auditor", &["rollout", "status", &id]);
    assert!(
        text.stdout.contains("waits for its maintenance window"),
        "{}",
        text.stdout
    );
    let s1_at: u64 = lab
        .read_host("s1", "/srv/app/patched-at")
        .and_then(|t| t.trim().parse().ok())
        .expect("wave 1 ran");
    assert!(s1_at < a_end, "wave 1 ran in window A ({s1_at} < {a_end})");
    for h in ["s2", "bb1"] {
        assert_eq!(lab.read_host(h, "/srv/app/patched-at"), None, "{h} waits with its wave");
    }
    let status = lab.wait_state(&id, "completed", LONG);
    for h in ["s2", "bb1"] {
        let at: u64 = lab
            .read_host(h, "/srv/app/patched-at")
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| panic!("{h} was patched"));
        assert!(
            at >= b_start,
            "{h} was patched at {at}, before window B opened at {b_start}"
        );
    }
    let events = status["events"].to_string();
    assert!(events.contains("wave 2 waits for its maintenance window"), "{events}");
    assert!(
        events.contains("wave 2: its maintenance window is open, and it fits"),
        "{events}"
    );

    // Who to tell, and when: per customer label (here, the os label).
    let csv = lab.wavegate_as("auditor", &["rollout", "notices", &id, "--label", "os"]);
    assert_eq!(csv.status, 0, "{}", csv.stderr);
    let lines: Vec<&str> = csv.stdout.lines().collect();
    assert_eq!(lines[0], "customer,host,wave,state,windows,not_before");
    assert!(
        lines.iter().any(|l| l.starts_with("debian12,s2,2,healthy,")),
        "{}",
        csv.stdout
    );
    let json = lab.wavegate_as(
        "auditor",
        &["rollout", "notices", &id, "--label", "os", "--output", "json"],
    );
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(v["customers"][0]["customer"], "debian12");
    assert_eq!(v["customers"][0]["hosts"].as_array().map(Vec::len), Some(3));
    lab.audit_verifies();
}

/// A wave paused mid-way and resumed when what is left of it no longer
/// fits the window: its hosts not yet started wait for the next window.
#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_wave_resumed_after_its_window_closes_waits_for_the_next_one() {
    let lab = Lab::up("windows-resume", "lab-fleet.yaml");
    for h in ["s1", "s2", "bb1"] {
        lab.seed(h, "/srv/app/.keep", "");
    }
    let now = now_s();
    // Wave 2 (two hosts one at a time, expected up to 6.2 s) fits window A
    // if it starts within 15.8 s, after the canary's 3 s. Paused once its
    // first host has started and resumed 17 s in, what is left of it no
    // longer fits; window B opens 26 s in.
    let (a_end, b_start) = (now + 22, now + 26);
    let plan = format!(
        "name: resumed
targets:
  hosts: [s1, s2, bb1]
steps:
  - name: patch
    run: touch /srv/app/started && sleep 2 && date +%s > /srv/app/patched-at
    writes: [/srv/app]
    timeout: 3s
waves:
  - hosts: [s1]
  - hosts: [s2, bb1]
max_in_flight: 1
health:
  bake: 200ms
  interval: 100ms
windows:
  - {{start: \"{}\", end: \"{}\", tz: UTC}}
  - {{start: \"{}\", end: \"{}\", tz: UTC}}
",
        hms(now - 60),
        hms(a_end),
        hms(b_start),
        hms(now + 90)
    );
    let path = lab.write_plan("resumed", &plan);
    let id = lab.submit_path(&path);
    lab.approve(&id);
    let first = eventually(LONG, "wave 2's first host to start its step", || {
        ["s2", "bb1"]
            .into_iter()
            .find(|h| lab.read_host(h, "/srv/app/started").is_some())
    });
    let pause = lab.wavegate_as("submitter", &["rollout", "pause", &id]);
    assert_eq!(pause.status, 0, "{}", pause.stderr);
    eventually(LONG, "17 s to pass", || (now_s() >= now + 17).then_some(()));
    let resume = lab.wavegate_as("approver", &["rollout", "resume", &id]);
    assert_eq!(resume.status, 0, "{}", resume.stderr);
    lab.wait_state(&id, "completed", LONG);
    for h in ["s2", "bb1"].into_iter().filter(|h| *h != first) {
        let at: u64 = lab
            .read_host(h, "/srv/app/patched-at")
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| panic!("{h} was patched"));
        assert!(
            at >= b_start,
            "{h} was patched at {at}, before window B opened at {b_start}"
        );
    }
    let events = lab.status(&id)["events"].to_string();
    assert!(events.contains("wave 2 waits for its maintenance window"), "{events}");
}
