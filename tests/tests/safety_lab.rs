//! The safety gate on lab hosts, with the real controller, CLI and agents:
//! the 2012 incident replayed, its variant that hides from the sandbox, and a
//! legitimate cleanup that runs and is rolled back byte for byte. Needs root.

use std::time::Duration;

use serde_json::Value;
use wavegate_tests::lab::{Lab, eventually};

const LONG: Duration = Duration::from_secs(90);
const HOSTS: &[&str] = &["p1", "p2", "p3", "p4", "b1", "b2", "b3", "bb1", "s1", "s2"];

/// Customer data on every host, and the update program's config and script.
fn seed_hosting_provider(lab: &Lab, script: &str) {
    for h in HOSTS {
        for customer in ["acme", "bluefin", "corvid"] {
            lab.seed(
                h,
                &format!("/home/{customer}/public_html/index.html"),
                &format!("<h1>{customer} on {h}</h1>\n"),
            );
            lab.seed(
                h,
                &format!("/home/{customer}/Maildir/cur/1.eml"),
                &format!("From: client@{customer}\n\norder 42\n"),
            );
        }
        lab.seed(h, "/opt/update/conf/version", "1.0\n");
        lab.seed(h, "/opt/update/update.sh", script);
    }
}

const UPDATE_PLAN: &str = "name: vuln-fix-2012
description: the update program, replayed
targets:
  groups: [g-web, g-mail, g-backup, g-archive]
steps:
  - name: vulnerability fix
    run: sh /opt/update/update.sh
    writes: [/opt/update/conf]
    timeout: 30s
waves:
  - size: 1
  - size: 50%
health:
  bake: 200ms
  interval: 100ms
";

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn the_2012_replay_is_refused_by_the_first_waves_dry_run_and_nothing_changes() {
    let lab = Lab::up("replay-2012", "lab-fleet.yaml");
    // The line naming the target servers is missing, and nothing stops the
    // delete: it runs against every customer's home.
    seed_hosting_provider(&lab, &wavegate_lab::demo::update_2012("/opt/update/conf/version"));
    let before = lab.all_host_files();
    let plan = lab.write_plan("replay", UPDATE_PLAN);
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &plan]);
    assert_eq!(
        run.status, 3,
        "the submission must be refused:\n{}\n{}",
        run.stdout, run.stderr
    );
    assert!(run.stdout.contains("BLOCKED"), "{}", run.stdout);
    assert!(
        run.stdout.contains("OUTSIDE the write set: 6 effects, 6 files deleted"),
        "counts shown:\n{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("/home/acme"),
        "the report names the /home paths:\n{}",
        run.stdout
    );
    assert_eq!(
        lab.all_host_files(),
        before,
        "a refused submission changed a file on some host"
    );

    // The refused rollout is kept with its reports and can never be approved.
    let list = lab
        .wavegate_as("auditor", &["rollout", "list", "--output", "json"])
        .json();
    let id = list[0]["id"].as_str().expect("id").to_owned();
    assert_eq!(list[0]["state"], "refused");
    let run = lab.wavegate_as("approver", &["rollout", "approve", &id]);
    assert_eq!(run.status, 3, "{}", run.stderr);
    let run = lab.wavegate_as("auditor", &["rollout", "dryrun", &id, "--output", "json"]);
    let reports: Value = run.json();
    let r = &reports[0];
    assert_eq!(r["blocked"], true);
    assert_eq!(r["report"]["outside_deleted"]["count"], 6, "{r:#}");
    assert!(
        r["report"]["modified"]["sample"]
            .to_string()
            .contains("/opt/update/conf/version"),
        "{r:#}"
    );
    assert_eq!(lab.all_host_files(), before);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_delete_that_hides_from_the_sandbox_fails_confined_on_the_canary_and_is_rolled_back() {
    let lab = Lab::up("variant-2012", "lab-fleet.yaml");
    // Deletes only when it finds a file in /run: the dry-run (a private
    // /run) sees a harmless update; the real run tries the delete. (It
    // used to ask the network; a real run has none now either.)
    seed_hosting_provider(
        &lab,
        "set -e\necho 1.1 > /opt/update/conf/version\n\
         if test -e /run/update-server-up; then rm -rf /home/*; fi\n",
    );
    for h in HOSTS {
        lab.seed(h, "/run/update-server-up", "yes\n");
    }
    let before = lab.all_host_files();
    let plan = lab.write_plan("variant", UPDATE_PLAN);
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &plan, "--output", "json"]);
    assert_eq!(
        run.status, 0,
        "the dry-run sees nothing wrong:\n{}\n{}",
        run.stdout, run.stderr
    );
    let id = run.json()["id"].as_str().expect("id").to_owned();
    lab.approve(&id);
    let status = lab.wait_state(&id, "halted", LONG);
    let canary = status["waves"][0]["hosts"][0]["id"]
        .as_str()
        .expect("canary")
        .to_owned();
    eventually(LONG, "the canary to be rolled back", || {
        (lab.status(&id)["waves"][0]["hosts"][0]["rolled_back"] == true).then_some(())
    });
    let reason = status["halt_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("Read-only file system"),
        "the confined run failed read-only: {reason}"
    );
    let s = lab.status(&id);
    for w in s["waves"].as_array().expect("waves").iter().skip(1) {
        for h in w["hosts"].as_array().expect("hosts") {
            assert_eq!(
                h["state"], "untouched",
                "{} was touched after the canary failed",
                h["id"]
            );
        }
    }
    assert_eq!(
        lab.all_host_files(),
        before,
        "every file on every host must be byte-identical to before (canary {canary} rolled back)"
    );
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_legitimate_cleanup_runs_and_a_rollback_restores_it_byte_for_byte() {
    let lab = Lab::up("cleanup", "lab-fleet.yaml");
    for h in ["s1", "s2"] {
        for i in 0..5 {
            lab.seed(
                h,
                &format!("/var/cache/app/old-{i}.tmp"),
                &format!("cache {i} on {h}\n"),
            );
        }
        lab.seed(h, "/var/cache/app/keep.conf", "keep = yes\n");
    }
    let before = lab.all_host_files();
    let plan = lab.write_plan(
        "cleanup",
        "name: cache-cleanup
targets:
  groups: [g-dns]
steps:
  - name: purge old cache files
    run: rm -f /var/cache/app/old-*.tmp
    writes: [/var/cache/app]
    max_deletions: 5
waves:
  - size: 1
health:
  checks:
    - {name: config kept, exec: \"test -f /var/cache/app/keep.conf\"}
  bake: 100ms
  interval: 50ms
",
    );
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &plan, "--output", "json"]);
    assert_eq!(run.status, 0, "{}\n{}", run.stdout, run.stderr);
    let id = run.json()["id"].as_str().expect("id").to_owned();
    lab.approve(&id);
    lab.wait_state(&id, "completed", LONG);
    for h in ["s1", "s2"] {
        assert!(
            lab.read_host(h, "/var/cache/app/old-0.tmp").is_none(),
            "the cleanup ran on {h}"
        );
        assert!(lab.read_host(h, "/var/cache/app/keep.conf").is_some());
    }
    let snaps = lab
        .wavegate_as("auditor", &["snapshot", "list", "--rollout", &id, "--output", "json"])
        .json();
    assert_eq!(snaps.as_array().map(Vec::len), Some(2), "{snaps:#}");
    assert!(
        snaps.as_array().expect("list").iter().all(|s| s["state"] == "retained"),
        "confirmed waves retain: {snaps:#}"
    );

    // An auditor may not roll back. Undoing a completed rollout is a
    // change like the rollout itself: one person alone cannot do it.
    assert_eq!(lab.wavegate_as("auditor", &["rollout", "rollback", &id]).status, 3);
    let after = lab.all_host_files();
    let asked = lab.wavegate_as("approver", &["rollout", "rollback", &id]);
    assert_eq!(asked.status, 0, "{}\n{}", asked.stdout, asked.stderr);
    assert_eq!(lab.all_host_files(), after, "asking for a rollback changes nothing");
    assert!(
        asked.stdout.contains("removed") && asked.stdout.contains("/var/cache/app/old-0.tmp"),
        "the request shows what a restore would bring back:\n{}",
        asked.stdout
    );
    let status = lab.status(&id);
    let q = &status["rollback_requests"][0];
    assert_eq!(q["state"], "awaiting_approval", "{status:#}");
    assert_eq!(
        q["preview"][0]["total"], 5,
        "five deleted files come back per host: {q:#}"
    );
    let digest = q["preview_digest"].as_str().expect("digest").to_owned();
    let own = lab.wavegate_as(
        "approver",
        &["rollout", "rollback", &id, "--approve", "--preview", &digest],
    );
    assert_eq!(own.status, 3, "the person who asked approved it:\n{}", own.stderr);
    let stale = lab.wavegate_as("admin", &["rollout", "rollback", &id, "--approve", "--preview", "0000"]);
    assert_eq!(
        stale.status, 3,
        "an approval of another preview counted:\n{}",
        stale.stderr
    );
    assert_eq!(lab.all_host_files(), after, "refused approvals change nothing");
    let run = lab.wavegate_as(
        "admin",
        &["rollout", "rollback", &id, "--approve", "--preview", &digest],
    );
    assert_eq!(run.status, 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(
        lab.all_host_files(),
        before,
        "the rollback restored every file byte for byte"
    );
    assert_eq!(lab.status(&id)["rollback_requests"][0]["state"], "done");
    // Its own entries in the audit log, and the refusals; the log verifies.
    let log = lab.wavegate_as("auditor", &["audit", "log", "--rollout", &id, "--output", "json"]);
    let requests = log
        .stdout
        .lines()
        .filter(|l| l.contains("\"kind\":\"rollback_request\""))
        .count();
    assert!(requests >= 3, "asked, approved and done are recorded:\n{}", log.stdout);
    let refusals = lab.wavegate_as("auditor", &["audit", "log", "--output", "json"]);
    assert!(
        refusals
            .stdout
            .contains("asked for this rollback and cannot approve it"),
        "the one-person approval is in the audit log"
    );
    let verify = lab.wavegate_as("auditor", &["audit", "verify"]);
    assert_eq!(verify.status, 0, "{}\n{}", verify.stdout, verify.stderr);
}
