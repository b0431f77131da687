//! The controller SIGKILLed at every kind of state transition of a rollout,
//! then restarted on the same data. A failpoint (`WAVEGATE_FAILPOINT`)
//! freezes it right at the transition, the test kills it there, and the
//! restarted controller must: run no step twice, lose no result, and either
//! finish the rollout or keep it halted with its reason. Real processes over
//! mutual TLS; every claim is checked on the hosts' own files. Needs root.

use std::time::Duration;

use serde_json::Value;
use wavegate_tests::fixture;
use wavegate_tests::lab::{Lab, eventually};

const LONG: Duration = Duration::from_secs(90);
const TARGETS: &[&str] = &["p1", "p2", "p3", "p4", "b1", "b2", "b3", "bb1"];

fn host_states(status: &Value) -> Vec<(String, String)> {
    status["waves"]
        .as_array()
        .expect("waves")
        .iter()
        .flat_map(|w| w["hosts"].as_array().expect("hosts").iter())
        .map(|h| {
            (
                h["id"].as_str().unwrap_or_default().to_owned(),
                h["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// After the restart the rollout finishes: every target healthy, its step
/// run exactly once, and the standalone hosts never touched.
fn finishes_once(lab: &Lab, id: &str) {
    let status = lab.wait_state(id, "completed", LONG);
    for (host, state) in host_states(&status) {
        assert_eq!(state, "healthy", "{host} after the restart: {status:#}");
    }
    for h in TARGETS {
        assert_eq!(lab.marker_lines(h).len(), 1, "{h} must have run its step exactly once");
    }
    assert_eq!(
        lab.marker_lines("s1").len() + lab.marker_lines("s2").len(),
        0,
        "non-targets untouched"
    );
    lab.audit_verifies();
}

/// Submit and approve, the approval in the background (the failpoint may
/// freeze it); returns the rollout id.
fn submit_and_approve(lab: &Lab) -> String {
    let id = lab.submit("lab/three-waves.yaml");
    let mut approve = lab.spawn_as("approver", &["rollout", "approve", &id]);
    // Either it returns (the failpoint is later) or the kill ends it.
    std::thread::spawn(move || approve.wait());
    id
}

/// Crash at a point a running rollout passes, restart, and check it ends.
fn crash_while_running(point: &str) {
    let lab = Lab::up_with(point, "lab-fleet.yaml", "10s", &[("WAVEGATE_FAILPOINT", point)]);
    let id = submit_and_approve(&lab);
    lab.wait_failpoint(point);
    lab.restart_controller();
    finishes_once(&lab, &id);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn killed_after_the_approval_commits_the_rollout_runs_after_the_restart() {
    crash_while_running("approval-committed");
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn killed_when_a_wave_starts_it_continues() {
    crash_while_running("wave-start-committed");
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn killed_after_a_step_id_is_stored_but_before_it_is_sent_the_step_runs_once() {
    crash_while_running("step-persisted");
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn killed_when_the_bake_starts_the_bake_runs_again() {
    crash_while_running("bake-committed");
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn killed_after_a_wave_is_confirmed_the_next_wave_runs() {
    crash_while_running("wave-confirmed");
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn killed_during_submit_before_anything_is_stored_nothing_half_exists() {
    let point = "submit-dry-run-done";
    let lab = Lab::up_with(
        "submit-early",
        "lab-fleet.yaml",
        "10s",
        &[("WAVEGATE_FAILPOINT", point)],
    );
    let plan = fixture("lab/three-waves.yaml");
    let submit = lab.spawn_as("submitter", &["rollout", "submit", plan.to_str().expect("utf-8")]);
    lab.wait_failpoint(point);
    lab.restart_controller();
    let out = submit.wait_with_output().expect("submit ends");
    assert!(
        !out.status.success(),
        "a submit whose controller died cannot report success"
    );
    let list = lab.wavegate_as("auditor", &["rollout", "list", "--output", "json"]);
    assert_eq!(list.status, 0, "{}", list.stderr);
    assert_eq!(
        list.json().as_array().map(Vec::len),
        Some(0),
        "no rollout half-created: {}",
        list.stdout
    );
    for h in TARGETS {
        assert_eq!(lab.marker_lines(h).len(), 0, "{h} was changed by a submit");
    }
    // The controller works: the same plan goes through from the start.
    let id = lab.submit("lab/three-waves.yaml");
    lab.approve(&id);
    finishes_once(&lab, &id);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn killed_after_submit_commits_the_rollout_waits_for_approval() {
    let point = "submit-committed";
    let lab = Lab::up_with("submit-late", "lab-fleet.yaml", "10s", &[("WAVEGATE_FAILPOINT", point)]);
    let plan = fixture("lab/three-waves.yaml");
    let submit = lab.spawn_as("submitter", &["rollout", "submit", plan.to_str().expect("utf-8")]);
    lab.wait_failpoint(point);
    lab.restart_controller();
    let _ = submit.wait_with_output();
    let list = lab.wavegate_as("auditor", &["rollout", "list", "--output", "json"]);
    let rollouts = list.json();
    let rollouts = rollouts.as_array().expect("a list");
    assert_eq!(rollouts.len(), 1, "the committed submission survives: {}", list.stdout);
    assert_eq!(rollouts[0]["state"], "awaiting_approval");
    let id = rollouts[0]["id"].as_str().expect("id").to_owned();
    for h in TARGETS {
        assert_eq!(lab.marker_lines(h).len(), 0, "{h} changed before any approval");
    }
    lab.approve(&id);
    finishes_once(&lab, &id);
}

/// A failing canary (health check) halts; `on_failure: rollback` restores it.
fn halted_canary(point: &str) -> (Lab, String, String) {
    let lab = Lab::up_with(point, "lab-fleet.yaml", "10s", &[("WAVEGATE_FAILPOINT", point)]);
    let id = lab.submit("lab/canary-fails.yaml");
    let canary = lab.status(&id)["waves"][0]["hosts"][0]["id"]
        .as_str()
        .expect("canary")
        .to_owned();
    let mut approve = lab.spawn_as("approver", &["rollout", "approve", &id]);
    std::thread::spawn(move || approve.wait());
    lab.wait_failpoint(point);
    lab.restart_controller();
    (lab, id, canary)
}

/// The rollout stays halted with its reason, the canary is restored from its
/// snapshot, and no host after the canary was touched.
fn stays_halted_and_rolled_back(lab: &Lab, id: &str, canary: &str) {
    let status = lab.wait_state(id, "halted", LONG);
    let reason = status["halt_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("canary") && reason.contains(canary),
        "the halt reason survives the crash: {reason}"
    );
    eventually(LONG, "the canary to be rolled back", || {
        let s = lab.status(id);
        let events = s["events"].to_string();
        (events.contains("rolled back from its snapshot") && lab.marker_lines(canary).is_empty()).then_some(())
    });
    for h in TARGETS.iter().filter(|h| **h != canary) {
        assert_eq!(lab.marker_lines(h).len(), 0, "{h} ran although the canary failed");
    }
    // Still halted: nothing resumed on its own.
    assert_eq!(lab.status(id)["state"], "halted");
    lab.audit_verifies();
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn killed_right_after_a_halt_commits_it_stays_halted_and_rolls_back() {
    let (lab, id, canary) = halted_canary("halt-committed");
    stays_halted_and_rolled_back(&lab, &id, &canary);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn killed_during_the_rollback_the_rollback_completes_after_the_restart() {
    let (lab, id, canary) = halted_canary("rollback-restored");
    stays_halted_and_rolled_back(&lab, &id, &canary);
}

/// A rollback a person asked for and others approved is carried out to the
/// end even when the controller is killed in the middle of it: the request
/// found running after the restart restores its hosts again and is done.
#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn killed_during_an_approved_rollback_request_it_finishes_after_the_restart() {
    let lab = Lab::up_with(
        "rollback-request",
        "lab-fleet.yaml",
        "10s",
        &[("WAVEGATE_FAILPOINT", "rollback-restored")],
    );
    let id = lab.submit("lab/three-waves.yaml");
    lab.approve(&id);
    lab.wait_state(&id, "completed", LONG);
    for h in TARGETS {
        assert_eq!(lab.marker_lines(h).len(), 1, "{h} ran its step");
    }
    let asked = lab.wavegate_as("submitter", &["rollout", "rollback", &id]);
    assert_eq!(asked.status, 0, "{}\n{}", asked.stdout, asked.stderr);
    let digest = lab.status(&id)["rollback_requests"][0]["preview_digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    // The approval starts the restore; the controller stops dead after the
    // first host is restored, and is killed there.
    let mut approve = lab.spawn_as(
        "approver",
        &["rollout", "rollback", &id, "--approve", "--preview", &digest],
    );
    std::thread::spawn(move || approve.wait());
    lab.wait_failpoint("rollback-restored");
    lab.restart_controller();
    eventually(LONG, "the rollback request to be done", || {
        (lab.status(&id)["rollback_requests"][0]["state"] == "done").then_some(())
    });
    for h in TARGETS {
        assert_eq!(lab.marker_lines(h).len(), 0, "{h} was not restored");
    }
    let events = lab.status(&id)["events"].to_string();
    assert!(
        events.contains("rollback request 1 done: every host restored"),
        "{events}"
    );
    lab.audit_verifies();
}
