//! Two controllers sharing a real 3-member etcd cluster (on loopback, this
//! test's own, started by `scripts/etcd-cluster`), one leading, one
//! standing by, over a lab of real agents and mutual TLS.
//!
//! - The leader SIGKILLed at each kind of transition (frozen there by a
//!   failpoint first): the standby takes over and the rollout completes,
//!   every step run exactly once, the audit log verifying.
//! - The leader cut off from etcd (its client traffic dropped) while its
//!   agents still reach it: once its lease could have expired it sends
//!   nothing more, as every host's own journal shows, and the standby
//!   finishes.
//! - An etcd member killed mid-rollout changes nothing; quorum lost stops
//!   all dispatch, `/ready` says why, and the rollout goes on when the
//!   quorum is back.
//!
//! Needs root and Debian's etcd-server (`scripts/test` installs it).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use wavegate_tests::etcd::EtcdCluster;
use wavegate_tests::lab::{Lab, eventually};
use wavegate_tests::proxy::Proxy;

const LONG: Duration = Duration::from_secs(120);
const TARGETS: &[&str] = &["p1", "p2", "p3", "p4", "b1", "b2", "b3", "bb1"];
/// The lab's leadership lease.
const TTL: Duration = Duration::from_secs(3);

/// A lab and its etcd cluster (the lab goes down first).
struct Ha {
    lab: Lab,
    etcd: EtcdCluster,
}

fn ha(name: &str, env: &[(&str, &str)]) -> Ha {
    let etcd = EtcdCluster::start(name).expect("a local etcd cluster");
    let lab = Lab::up_ha(name, "lab-fleet.yaml", &etcd.url, 2, env, &[]);
    Ha { lab, etcd }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The rollout completes on the new leader: every target healthy, its step
/// run exactly once (one marker line, one journaled step command), the
/// others untouched, the audit log verifying.
fn finishes_once(lab: &Lab, id: &str) {
    let status = lab.wait_state(id, "completed", LONG);
    for w in status["waves"].as_array().expect("waves") {
        for h in w["hosts"].as_array().expect("hosts") {
            assert_eq!(h["state"], "healthy", "{status:#}");
        }
    }
    for h in TARGETS {
        assert_eq!(lab.marker_lines(h).len(), 1, "{h} must have run its step exactly once");
        let steps: Vec<Value> = lab
            .jobs(h)
            .into_iter()
            .filter(|j| {
                j["command_id"]
                    .as_str()
                    .is_some_and(|c| c.starts_with(&format!("{id}:")) && c.contains(":step"))
            })
            .collect();
        assert_eq!(steps.len(), 1, "{h} journaled one step command, not {steps:#?}");
    }
    assert_eq!(
        lab.marker_lines("s1").len() + lab.marker_lines("s2").len(),
        0,
        "non-targets untouched"
    );
    lab.audit_verifies();
}

/// Freeze the leader at `point`, SIGKILL it there, and see the standby
/// take over and finish.
fn failover_at(point: &str, plan: &str) -> (Ha, String) {
    let once = std::env::temp_dir().join(format!("wavegate-fp-{point}-{}", std::process::id()));
    let _ = std::fs::remove_file(&once);
    let once_s = once.display().to_string();
    let h = ha(
        &format!("ha-{point}"),
        &[("WAVEGATE_FAILPOINT", point), ("WAVEGATE_FAILPOINT_ONCE", &once_s)],
    );
    let lab = &h.lab;
    let id = lab.submit(plan);
    let mut approve = lab.spawn_as("approver", &["rollout", "approve", &id]);
    std::thread::spawn(move || approve.wait());
    let frozen = lab.wait_failpoint_of(point, 2);
    assert_eq!(frozen, 1, "the leader (the first controller) is the one that acts");
    lab.kill_controller(1);
    lab.wait_leader(2, LONG);
    // Its log says so too; the line may land a moment after its role
    // changes.
    eventually(LONG, "controller 2's log to say it leads", || {
        lab.log("controller-2")
            .contains("This controller leads now")
            .then_some(())
    });
    (h, id)
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn leader_killed_after_the_approval_commits() {
    let (h, id) = failover_at("approval-committed", "lab/three-waves.yaml");
    finishes_once(&h.lab, &id);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn leader_killed_when_a_wave_starts() {
    let (h, id) = failover_at("wave-start-committed", "lab/three-waves.yaml");
    finishes_once(&h.lab, &id);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn leader_killed_after_a_step_id_is_stored_before_it_is_sent() {
    let (h, id) = failover_at("step-persisted", "lab/three-waves.yaml");
    finishes_once(&h.lab, &id);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn leader_killed_when_the_bake_starts() {
    let (h, id) = failover_at("bake-committed", "lab/three-waves.yaml");
    finishes_once(&h.lab, &id);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn leader_killed_after_a_wave_is_confirmed() {
    let (h, id) = failover_at("wave-confirmed", "lab/three-waves.yaml");
    finishes_once(&h.lab, &id);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn leader_killed_after_a_halt_commits_the_successor_keeps_it_halted_and_rolls_back() {
    let (h, id) = failover_at("halt-committed", "lab/canary-fails.yaml");
    let lab = &h.lab;
    let status = lab.wait_state(&id, "halted", LONG);
    let canary = status["waves"][0]["hosts"][0]["id"]
        .as_str()
        .expect("canary")
        .to_owned();
    eventually(LONG, "the canary to be rolled back by the new leader", || {
        let s = lab.status(&id);
        (s["events"].to_string().contains("rolled back from its snapshot") && lab.marker_lines(&canary).is_empty())
            .then_some(())
    });
    for t in ["p1", "p2", "p3", "p4", "b1", "b2", "b3"]
        .iter()
        .filter(|t| **t != canary)
    {
        assert_eq!(lab.marker_lines(t).len(), 0, "{t} ran although the canary failed");
    }
    assert_eq!(lab.status(&id)["state"], "halted");
    lab.audit_verifies();
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn leader_killed_after_submit_commits_the_rollout_awaits_approval_on_the_successor() {
    let point = "submit-committed";
    let once = std::env::temp_dir().join(format!("wavegate-fp-{point}-{}", std::process::id()));
    let _ = std::fs::remove_file(&once);
    let once_s = once.display().to_string();
    let h = ha(
        "ha-submit",
        &[("WAVEGATE_FAILPOINT", point), ("WAVEGATE_FAILPOINT_ONCE", &once_s)],
    );
    let lab = &h.lab;
    let plan = wavegate_tests::fixture("lab/three-waves.yaml");
    let submit = lab.spawn_as("submitter", &["rollout", "submit", plan.to_str().expect("utf-8")]);
    assert_eq!(lab.wait_failpoint_of(point, 2), 1);
    lab.kill_controller(1);
    let _ = submit.wait_with_output();
    lab.wait_leader(2, LONG);
    let list = lab.wavegate_as("auditor", &["rollout", "list", "--output", "json"]);
    let rollouts = list.json();
    let rollouts = rollouts.as_array().expect("a list");
    assert_eq!(rollouts.len(), 1, "the committed submission survives: {}", list.stdout);
    assert_eq!(rollouts[0]["state"], "awaiting_approval");
    let id = rollouts[0]["id"].as_str().expect("id").to_owned();
    lab.approve(&id);
    finishes_once(lab, &id);
}

/// Wait until the rollout's first wave is confirmed and the second has
/// started: the rollout is in full flight.
fn in_flight(lab: &Lab, id: &str) {
    eventually(LONG, "wave 1 confirmed and wave 2 under way", || {
        let s = lab.status(id);
        (s["waves"][0]["state"] == "confirmed" && s["waves"][1]["state"] != "pending").then_some(())
    });
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_leader_cut_off_from_etcd_sends_nothing_once_its_lease_could_have_expired() {
    let etcd = EtcdCluster::start("ha-partition").expect("a local etcd cluster");
    // The first controller reaches etcd only through proxies the test can
    // cut; the second directly. Agents reach both.
    let proxies: Vec<Proxy> = (1..=3).map(|n| Proxy::start(etcd.member(n))).collect();
    let via = format!(
        "1=etcd://{}",
        proxies.iter().map(|p| p.addr.to_string()).collect::<Vec<_>>().join(",")
    );
    let lab = Lab::up_ha(
        "ha-partition",
        "lab-fleet.yaml",
        &etcd.url,
        2,
        &[],
        &["--controller-store", &via],
    );
    let [first, second] = <[String; 2]>::try_from(lab.controllers()).expect("two controllers");
    let id = lab.submit("lab/long-bakes.yaml");
    lab.approve(&id);
    in_flight(&lab, &id);
    let cut_ms = now_ms();
    for p in &proxies {
        p.partition();
    }
    lab.wait_leader(2, LONG);
    let status = lab.wait_state(&id, "completed", LONG);
    // Every host's journal: what the cut-off leader sent, it sent before
    // its lease could have expired; the rest came from the new leader.
    let deadline = cut_ms + TTL.as_millis() as u64;
    let mut from_first = 0;
    let mut from_second = 0;
    for h in TARGETS {
        for j in lab.jobs(h) {
            let at = j["accepted_ms"].as_u64().unwrap_or(u64::MAX);
            let from = j["from"].as_str().unwrap_or_default();
            if from == first {
                from_first += 1;
                assert!(
                    at < deadline,
                    "{h} accepted {} from the cut-off leader {} ms after the cut (lease {TTL:?})",
                    j["command_id"],
                    at.saturating_sub(cut_ms)
                );
            } else if from == second {
                from_second += 1;
            }
        }
    }
    assert!(from_first > 0, "the first controller led before the cut");
    assert!(
        from_second > 0,
        "the second controller finished the rollout: {status:#}"
    );
    for h in TARGETS {
        assert_eq!(lab.marker_lines(h).len(), 1, "{h} ran its step exactly once");
    }
    // Back in touch, the old leader finds its lease gone: it stands by.
    for p in &proxies {
        p.heal();
    }
    eventually(LONG, "the old leader to stand by", || {
        let roles = lab.roles();
        roles.iter().any(|(u, r)| *u == first && r == "standby").then_some(())
    });
    assert!(
        lab.log("controller").contains("restarting as a standby"),
        "{}",
        lab.log("controller")
    );
    lab.audit_verifies();
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn one_etcd_member_killed_mid_rollout_changes_nothing() {
    let h = ha("ha-member", &[]);
    let (lab, etcd) = (&h.lab, &h.etcd);
    let id = lab.submit("lab/long-bakes.yaml");
    lab.approve(&id);
    in_flight(lab, &id);
    // The first member is the one each client asks first.
    etcd.kill(1).expect("kill a member");
    finishes_once(lab, &id);
    let roles = lab.roles();
    assert!(
        roles.iter().filter(|(_, r)| r == "leader").count() == 1
            && roles.iter().any(|(u, r)| *u == lab.controllers()[0] && r == "leader"),
        "the leader stayed the leader: {roles:?}"
    );
}

/// `/ready` of the first controller, asked with the auditor's certificate
/// (without one it says whether, not why).
fn ready(lab: &Lab) -> (u16, String) {
    let r = lab.web_as("auditor", "/ready");
    (r.status, r.body)
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn quorum_lost_stops_all_dispatch_ready_says_why_and_it_goes_on_when_quorum_returns() {
    let h = ha("ha-quorum", &[]);
    let (lab, etcd) = (&h.lab, &h.etcd);
    assert_eq!(ready(lab).0, 200, "the leader is ready");
    let id = lab.submit("lab/long-bakes.yaml");
    lab.approve(&id);
    in_flight(lab, &id);
    etcd.kill(2).expect("kill a member");
    etcd.kill(3).expect("kill a member");
    // First the store cannot be read; once the lease could have expired,
    // the leader knows it may not act, and says so.
    let why = eventually(LONG, "/ready to say the leader cannot act", || {
        let (code, body) = ready(lab);
        (code == 503 && body.contains("lease")).then_some(body)
    });
    assert!(
        why.contains("sends nothing") || why.contains("in time"),
        "/ready says why: {why}"
    );
    let anyone = lab.web_get("/ready", &[]);
    assert_eq!(
        (anyone.status, anyone.body.as_str()),
        (503, "not ready\n"),
        "without a certificate /ready says whether, not why"
    );
    // Nothing is sent while the quorum is gone: the hosts' files and
    // journals stay as they are, however long it lasts.
    let before: Vec<(usize, usize)> = TARGETS
        .iter()
        .map(|h| (lab.marker_lines(h).len(), lab.jobs(h).len()))
        .collect();
    let until = std::time::Instant::now() + 2 * TTL;
    while std::time::Instant::now() < until {
        let now: Vec<(usize, usize)> = TARGETS
            .iter()
            .map(|h| (lab.marker_lines(h).len(), lab.jobs(h).len()))
            .collect();
        assert_eq!(now, before, "a host was sent something while etcd had no quorum");
        assert_eq!(ready(lab).0, 503, "still not ready without a quorum");
        std::thread::sleep(Duration::from_millis(200));
    }
    etcd.start_member(2).expect("start a member");
    etcd.start_member(3).expect("start a member");
    eventually(LONG, "/ready again once the quorum is back", || {
        (ready(lab).0 == 200).then_some(())
    });
    finishes_once(lab, &id);
}
