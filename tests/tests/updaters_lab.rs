//! Updaters outside the rollout, on lab hosts whose Debian configuration
//! switches unattended-upgrades and apt's timers on: every place an operator
//! looks names them, a site rule refusing them refuses the plan with the
//! hosts named, and a rule holding them masks them for the rollout and
//! restores them after, in the audit log. Needs root.

use std::time::Duration;

use serde_json::Value;
use wavegate_tests::lab::{Lab, eventually};

const LONG: Duration = Duration::from_secs(90);
const DEBIAN: &[&str] = &["s1", "s2"];

/// What Debian's unattended-upgrades package and `dpkg-reconfigure
/// unattended-upgrades` leave on a host.
fn debian_updates_itself(lab: &Lab, h: &str) {
    lab.seed(
        h,
        "/etc/apt/apt.conf.d/20auto-upgrades",
        "APT::Periodic::Update-Package-Lists \"1\";\nAPT::Periodic::Unattended-Upgrade \"1\";\n",
    );
    lab.seed(h, "/usr/bin/unattended-upgrade", "#!/usr/bin/python3\n");
    let wants = lab.host_path(h, "/etc/systemd/system/timers.target.wants");
    std::fs::create_dir_all(&wants).expect("wants");
    for t in ["apt-daily.timer", "apt-daily-upgrade.timer"] {
        std::os::unix::fs::symlink(format!("/lib/systemd/system/{t}"), wants.join(t)).expect("link");
    }
    lab.seed(h, "/srv/app/.keep", "");
}

fn fleet(lab: &Lab) -> Value {
    let run = lab.wavegate_as("auditor", &["fleet", "status", "--output", "json"]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    run.json()
}

fn kinds(fleet: &Value, host: &str) -> Vec<String> {
    fleet
        .as_array()
        .expect("hosts")
        .iter()
        .find(|h| h["id"] == host)
        .and_then(|h| h["updaters"].as_array())
        .map(|l| l.iter().filter_map(|u| u["kind"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

const PLAN: &str = "name: patch-dns
targets:
  hosts: [s1, s2]
steps:
  - name: patch
    # What the step sees of apt's and systemd's configuration while it runs.
    run: ls /etc/apt/apt.conf.d > /srv/app/seen && (readlink /etc/systemd/system/apt-daily-upgrade.timer || echo unmasked) >> /srv/app/seen
    writes: [/srv/app]
waves:
  - size: 1
  - size: 100%
health:
  bake: 100ms
  interval: 50ms
";

fn rule(lab: &Lab, action: &str) {
    std::fs::write(
        lab.dir.join("policies/updaters.yaml"),
        format!("rules:\n  - id: updaters-{action}\n    kind: updaters\n    action: {action}\n"),
    )
    .expect("policy");
    lab.restart_controller();
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn unattended_upgrades_are_named_everywhere_refused_and_held_for_a_rollout() {
    let lab = Lab::up("updaters", "lab-fleet.yaml");
    for h in DEBIAN {
        debian_updates_itself(&lab, h);
    }
    // The agents look again with their heartbeats.
    let f = eventually(LONG, "the agents report their updaters", || {
        let f = fleet(&lab);
        DEBIAN
            .iter()
            .all(|h| kinds(&f, h) == ["unattended-upgrades", "apt-daily", "apt-daily"])
            .then_some(f)
    });
    assert!(kinds(&f, "p1").is_empty(), "p1 updates only through wavegate: {f:#}");

    // The fleet and one host, as an operator reads them.
    let table = lab.wavegate_as("auditor", &["fleet", "status"]);
    let s1_row = table.stdout.lines().find(|l| l.starts_with("s1 ")).unwrap_or("");
    assert!(s1_row.contains("unattended-upgrades, apt-daily"), "{}", table.stdout);
    assert!(
        table.stdout.contains("2 host(s) change on their own schedule"),
        "{}",
        table.stdout
    );
    let one = lab.wavegate_as("auditor", &["fleet", "status", "s1"]);
    assert!(
        one.stdout
            .contains("/etc/apt/apt.conf.d/20auto-upgrades:2: APT::Periodic::Unattended-Upgrade \"1\";"),
        "the evidence, file and line:\n{}",
        one.stdout
    );
    assert!(
        one.stdout
            .contains("enabled by /etc/systemd/system/timers.target.wants/apt-daily-upgrade.timer"),
        "{}",
        one.stdout
    );
    // The metric and the web view.
    let scrape = lab.web_as("auditor", "/metrics");
    assert!(
        scrape
            .body
            .contains("wavegate_controller_hosts_with_updaters{kind=\"unattended-upgrades\"} 2"),
        "{}",
        scrape.body
    );
    let index = lab.web_as("auditor", "/");
    assert!(index.body.contains("Updaters outside the rollout") && index.body.contains("20auto-upgrades"));

    // Without a site rule plan check (asking the lab's controller) and the
    // submit go ahead and name them.
    let plan = lab.write_plan("patch-dns", PLAN);
    let check = |lab: &Lab| {
        lab.wavegate_as(
            "submitter",
            &[
                "plan",
                "check",
                "--fleet",
                wavegate_tests::fixture("lab-fleet.yaml").to_str().expect("utf-8"),
                "--policies",
                lab.dir.join("policies").to_str().expect("utf-8"),
                &plan,
            ],
        )
    };
    let run = check(&lab);
    assert_eq!(run.status, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains("note: s2 has updaters outside the rollout: unattended-upgrades"),
        "{}",
        run.stdout
    );
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &plan]);
    assert_eq!(run.status, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains("note: s1 has updaters outside the rollout: unattended-upgrades"),
        "{}",
        run.stdout
    );
    let id = run.stdout.split_whitespace().nth(2).expect("id").to_owned();
    let abort = lab.wavegate_as("submitter", &["rollout", "abort", &id]);
    assert_eq!(abort.status, 0, "{}", abort.stderr);

    // A rule refusing them refuses the plan, naming the hosts.
    rule(&lab, "refuse");
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &plan, "--output", "json"]);
    assert_eq!(run.status, 3, "{}\n{}", run.stdout, run.stderr);
    let report = run.json();
    let v = &report["violations"][0];
    assert_eq!(v["code"], "policy:updaters-refuse", "{report:#}");
    assert_eq!(v["hosts"], serde_json::json!(["s1", "s2"]));
    assert!(
        v["message"].as_str().unwrap_or("").contains("20auto-upgrades:2"),
        "{v:#}"
    );
    let run = check(&lab);
    assert_eq!(
        run.status, 3,
        "plan check refuses it as the submit does:\n{}",
        run.stdout
    );
    assert!(run.stdout.contains("[policy:updaters-refuse]"), "{}", run.stdout);

    // A rule holding them: masked from the start to the end, restored after.
    rule(&lab, "hold");
    let before: Vec<_> = DEBIAN
        .iter()
        .map(|h| lab.read_host(h, "/etc/apt/apt.conf.d/20auto-upgrades"))
        .collect();
    let id = lab.submit_path(&plan);
    lab.approve(&id);
    let status = lab.wait_state(&id, "completed", LONG);
    for h in DEBIAN {
        let seen = lab.read_host(h, "/srv/app/seen").unwrap_or_default();
        assert!(
            seen.contains("99zz-wavegate-hold-") && seen.contains("/dev/null"),
            "{h}'s step ran with apt's periodic runs off and the timer masked:\n{seen}"
        );
    }
    eventually(LONG, "the hold to be released", || {
        DEBIAN
            .iter()
            .all(|h| {
                let dir = lab.host_path(h, "/etc/apt/apt.conf.d");
                let left = std::fs::read_dir(dir)
                    .map(|d| {
                        d.flatten()
                            .any(|e| e.file_name().to_string_lossy().starts_with("99zz-wavegate"))
                    })
                    .unwrap_or(true);
                !left
                    && std::fs::symlink_metadata(lab.host_path(h, "/etc/systemd/system/apt-daily-upgrade.timer"))
                        .is_err()
            })
            .then_some(())
    });
    let after: Vec<_> = DEBIAN
        .iter()
        .map(|h| lab.read_host(h, "/etc/apt/apt.conf.d/20auto-upgrades"))
        .collect();
    assert_eq!(before, after, "the host's own setting is never touched");
    let events = lab.status(&id)["events"].to_string();
    assert!(
        events.contains("updaters outside the rollout held on 2 of 2 targets (site rule updaters-hold)"),
        "{events}"
    );
    assert!(events.contains("apt-daily-upgrade.timer masked"), "{events}");
    assert!(
        events.contains("updaters outside the rollout released on 2 host(s)"),
        "{events}"
    );
    assert!(events.contains("apt-daily-upgrade.timer unmasked"), "{events}");
    assert_eq!(status["state"], "completed");
    let log = lab.wavegate_as("auditor", &["audit", "log"]);
    assert!(
        log.stdout.contains("updaters outside the rollout released"),
        "{}",
        log.stdout
    );
    lab.audit_verifies();
}
