//! Real rollouts: the real `wavegate` controller and CLI and one real
//! `wavegate-agent` process per lab host, over mutual-TLS gRPC. Every claim
//! about hosts is checked on the hosts' own files. Needs root (mount
//! namespaces); CI runs as root.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use wavegate_tests::lab::{Lab, eventually};

const LONG: Duration = Duration::from_secs(90);

/// Which wave (1-based) each host is in, from a status object.
fn wave_of(status: &Value) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for w in status["waves"].as_array().expect("waves") {
        for h in w["hosts"].as_array().expect("hosts") {
            out.insert(
                h["id"].as_str().expect("id").to_owned(),
                w["index"].as_u64().expect("index"),
            );
        }
    }
    out
}

fn host_state(status: &Value, host: &str) -> String {
    for w in status["waves"].as_array().expect("waves") {
        for h in w["hosts"].as_array().expect("hosts") {
            if h["id"] == host {
                return h["state"].as_str().unwrap_or_default().to_owned();
            }
        }
    }
    panic!("{host} is not in the rollout: {status:#}");
}

/// The nanosecond timestamp a three-waves step wrote on a host.
fn marked_at(lab: &Lab, host: &str) -> u128 {
    let lines = lab.marker_lines(host);
    assert_eq!(lines.len(), 1, "{host} ran its step {} times: {lines:?}", lines.len());
    lines[0]
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .expect("timestamp")
}

const PAIRS: &[(&str, &str)] = &[("p1", "b1"), ("p2", "b2"), ("p3", "b3"), ("p4", "b3"), ("b1", "bb1")];
const TARGETS: &[&str] = &["p1", "p2", "p3", "p4", "b1", "b2", "b3", "bb1"];

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_three_wave_rollout_runs_every_host_once_and_backups_after_their_primaries() {
    let lab = Lab::up("three-waves", "lab-fleet.yaml");
    let id = lab.submit("lab/three-waves.yaml");
    assert_eq!(lab.status(&id)["state"], "awaiting_approval");
    assert!(
        lab.read_host("p1", "/etc/wavegate-marker").is_none(),
        "nothing runs before approval"
    );
    lab.approve(&id);
    let status = lab.wait_state(&id, "completed", LONG);

    let waves = status["waves"].as_array().expect("waves");
    assert_eq!(waves.len(), 3, "{status:#}");
    assert!(waves.iter().all(|w| w["state"] == "confirmed"));
    for h in TARGETS {
        assert_eq!(host_state(&status, h), "healthy");
        marked_at(&lab, h);
    }
    for h in ["s1", "s2"] {
        assert!(
            lab.read_host(h, "/etc/wavegate-marker").is_none(),
            "{h} is not a target and must be untouched"
        );
    }
    // Backups run in a later wave, and (on the hosts' own clocks) only after
    // the primary's wave has baked for its 300 ms.
    let wave = wave_of(&status);
    for (primary, backup) in PAIRS {
        assert!(
            wave[*backup] > wave[*primary],
            "{backup} must be in a later wave than {primary}"
        );
        let gap = marked_at(&lab, backup).saturating_sub(marked_at(&lab, primary));
        assert!(
            gap >= 300_000_000,
            "{backup} ran {gap} ns after {primary}, before its wave could be confirmed"
        );
    }
    // The event log shows each wave confirmed before the next one started.
    let events: Vec<&str> = status["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let pos = |needle: &str| {
        events
            .iter()
            .position(|e| e.contains(needle))
            .unwrap_or_else(|| panic!("no event {needle:?}: {events:#?}"))
    };
    assert!(pos("wave 1 confirmed") < pos("wave 2 started"));
    assert!(pos("wave 2 confirmed") < pos("wave 3 started"));
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_failing_canary_halts_the_rollout_and_nothing_else_runs_until_a_person_resumes() {
    let lab = Lab::up("canary", "lab-fleet.yaml");
    let id = lab.submit("lab/canary-fails.yaml");
    lab.approve(&id);
    let status = lab.wait_state(&id, "halted", LONG);
    let canary = status["waves"][0]["hosts"][0]["id"]
        .as_str()
        .expect("canary")
        .to_owned();
    let reason = status["halt_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("canary") && reason.contains("healthy-flag") && reason.contains(&canary),
        "halt reason: {reason}"
    );
    assert_eq!(host_state(&status, &canary), "failed");
    // on_failure: rollback (the default): the canary is restored from its snapshot.
    let status = eventually(LONG, "the canary to be rolled back", || {
        let s = lab.status(&id);
        (s["waves"][0]["hosts"][0]["rolled_back"] == true).then_some(s)
    });
    assert!(
        lab.read_host(&canary, "/etc/wavegate-marker").is_none(),
        "the rollback removed what the step created"
    );
    assert_eq!(
        status["waves"][0]["hosts"][0]["snapshot"], "pinned",
        "the snapshot of a halted wave stays pinned"
    );

    // Nothing moves: watched for a while, no other host gets a step.
    let others: Vec<&str> = ["p1", "p2", "p3", "p4", "b1", "b2", "b3"]
        .into_iter()
        .filter(|h| *h != canary)
        .collect();
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        for h in &others {
            assert!(
                lab.read_host(h, "/etc/wavegate-marker").is_none(),
                "{h} received a step after the halt"
            );
        }
        let s = lab.status(&id);
        assert_eq!(s["state"], "halted");
        for h in &others {
            assert_eq!(host_state(&s, h), "untouched");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // An auditor cannot resume it.
    let run = lab.wavegate_as("auditor", &["rollout", "resume", &id]);
    assert_eq!(run.status, 3, "{}", run.stderr);
    assert_eq!(lab.status(&id)["state"], "halted");

    // A person fixes the cause and resumes: the canary is checked again (its
    // step is not rerun) and the rollout completes.
    for h in ["p1", "p2", "p3", "p4", "b1", "b2", "b3"] {
        std::fs::write(lab.host_path(h, "/etc/healthy"), "ok\n").expect("fix the cause");
    }
    let run = lab.wavegate_as("approver", &["rollout", "resume", &id]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    lab.wait_state(&id, "completed", LONG);
    for h in ["p1", "p2", "p3", "p4", "b1", "b2", "b3"] {
        assert_eq!(lab.marker_lines(h).len(), 1, "{h} ran its step once");
    }
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_step_past_its_timeout_is_killed_and_halts_the_canary() {
    let lab = Lab::up("timeout", "lab-fleet.yaml");
    let id = lab.submit("lab/step-timeout.yaml");
    lab.approve(&id);
    let status = lab.wait_state(&id, "halted", LONG);
    assert!(
        status["halt_reason"].as_str().unwrap_or_default().contains("timed_out"),
        "{status:#}"
    );
    let canary = status["waves"][0]["hosts"][0]["id"]
        .as_str()
        .expect("canary")
        .to_owned();
    assert_eq!(
        lab.marker_lines(&canary),
        ["start"],
        "the step was killed, never reaching its last line"
    );
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn approvals_come_from_another_person_and_bind_to_the_plan() {
    let lab = Lab::up("approvals", "lab-fleet.yaml");
    // The admin may submit and approve, but never its own rollout.
    let plan = wavegate_tests::fixture("lab/one-host.yaml");
    let run = lab.wavegate_as(
        "admin",
        &["rollout", "submit", plan.to_str().expect("path"), "--output", "json"],
    );
    assert_eq!(run.status, 0, "{}", run.stderr);
    let id = run.json()["id"].as_str().expect("id").to_owned();
    let hash = run.json()["plan_hash"].as_str().expect("hash").to_owned();
    let run = lab.wavegate_as("admin", &["rollout", "approve", &id]);
    assert_eq!(run.status, 3, "self-approval must be refused: {}", run.stdout);
    assert!(run.stderr.contains("cannot approve"), "{}", run.stderr);
    // An auditor and the submitter role cannot approve either.
    assert_eq!(lab.wavegate_as("auditor", &["rollout", "approve", &id]).status, 3);
    assert_eq!(lab.wavegate_as("submitter", &["rollout", "approve", &id]).status, 3);
    let s = lab.status(&id);
    assert_eq!(s["state"], "awaiting_approval");
    assert_eq!(s["approvers"], serde_json::json!([]));
    assert!(
        s["events"].to_string().contains("refused approval by admin"),
        "the refusal is recorded: {s:#}"
    );

    // A changed plan is a new rollout; the approval of the old one does not
    // carry over, and an approval for the old hash is refused.
    let id2 = lab.submit("lab/one-host-changed.yaml");
    let run = lab.wavegate_as("approver", &["rollout", "approve", &id2, "--plan-hash", &hash]);
    assert_eq!(run.status, 3, "{}", run.stdout);
    assert!(run.stderr.contains("plan changed"), "{}", run.stderr);
    assert_eq!(lab.status(&id2)["state"], "awaiting_approval");
    assert!(
        lab.read_host("s1", "/etc/wavegate-marker").is_none(),
        "nothing ran without a valid approval"
    );

    // The right hash is accepted and the rollout runs.
    let run = lab.wavegate_as("approver", &["rollout", "approve", &id, "--plan-hash", &hash]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    lab.wait_state(&id, "completed", LONG);
    assert_eq!(lab.marker_lines("s1"), ["patched"]);

    // No flag skips a gate; the attempt is refused.
    let run = lab.wavegate_as(
        "submitter",
        &["rollout", "submit", plan.to_str().expect("path"), "--skip-canary"],
    );
    assert_eq!(run.status, 3, "{}", run.stdout);
    assert!(run.stderr.contains("nothing skips the canary"), "{}", run.stderr);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn an_agent_killed_during_a_step_does_not_run_it_twice_and_its_outcome_arrives() {
    let lab = Lab::up("agent-kill", "lab-fleet.yaml");
    let id = lab.submit("lab/slow-step.yaml");
    lab.approve(&id);
    eventually(LONG, "the step to start on s2", || {
        (lab.marker_lines("s2") == ["start"]).then_some(())
    });
    let args = lab.kill9(&["wavegate-agent", "--host-id", "s2"], "exec-step");
    lab.respawn(&args, "agent-s2-restarted");
    let status = lab.wait_state(&id, "completed", LONG);
    assert_eq!(host_state(&status, "s2"), "healthy");
    assert_eq!(
        lab.marker_lines("s2"),
        ["start", "done"],
        "the step ran exactly once, to its end"
    );
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_controller_killed_mid_wave_continues_where_it_stopped() {
    let lab = Lab::up("controller-kill", "lab-fleet.yaml");
    let id = lab.submit("lab/slow-waves.yaml");
    lab.approve(&id);
    // Wait until wave 2 is under way on at least one host.
    let status = eventually(LONG, "wave 2 to be running", || {
        let s = lab.status(&id);
        let wave2: Vec<String> = s["waves"][1]["hosts"]
            .as_array()?
            .iter()
            .filter_map(|h| h["id"].as_str().map(str::to_owned))
            .collect();
        (s["waves"][1]["state"] == "running" && wave2.iter().any(|h| !lab.marker_lines(h).is_empty())).then_some(s)
    });
    assert_eq!(status["state"], "running");
    lab.restart_controller();
    let status = lab.wait_state(&id, "completed", LONG);
    for h in TARGETS {
        assert_eq!(host_state(&status, h), "healthy", "{h} was skipped");
        assert_eq!(
            lab.marker_lines(h).len(),
            1,
            "{h} ran its step {} times",
            lab.marker_lines(h).len()
        );
    }
    assert!(lab.read_host("s1", "/etc/wavegate-marker").is_none());
}

#[test]
fn agents_and_clients_without_the_right_certificate_are_refused() {
    let lab = Lab::up("certs", "lab-fleet.yaml");
    let certs = lab.dir.join("certs");
    let agent_bin = wavegate_tests::wavegate_bin().with_file_name("wavegate-agent");
    let start_agent = |host_id: &str, cert_of: &str, log: &str| {
        let args: Vec<String> = vec![
            agent_bin.display().to_string(),
            "--controller".into(),
            lab.controller(),
            "--ca".into(),
            certs.join("ca.pem").display().to_string(),
            "--cert".into(),
            certs.join(format!("agent-{cert_of}.pem")).display().to_string(),
            "--key".into(),
            certs.join(format!("agent-{cert_of}.key")).display().to_string(),
            "--host-id".into(),
            host_id.into(),
            "--host-root".into(),
            lab.dir.join("hosts/s1/root").display().to_string(),
            "--state-dir".into(),
            lab.dir.join(format!("impostor-{log}")).display().to_string(),
        ];
        lab.respawn(&args, log);
    };
    // Another host's certificate.
    start_agent("s1", "s2", "impostor");
    eventually(Duration::from_secs(30), "the impostor to be refused", || {
        lab.log("impostor")
            .contains("this certificate is for host `s2`, not `s1`")
            .then_some(())
    });
    // A certificate for a host that is not in the inventory.
    let run = wavegate_tests::wavegate([
        "certs",
        "issue",
        "agent",
        "ghost",
        "--dir",
        certs.to_str().expect("path"),
    ]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    start_agent("ghost", "ghost", "ghost");
    eventually(Duration::from_secs(30), "the ghost to be refused", || {
        lab.log("ghost")
            .contains("`ghost` is not in the inventory")
            .then_some(())
    });
    // A client with no certificate at all.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let refused = rt.block_on(async {
        let ca = std::fs::read_to_string(certs.join("ca.pem")).expect("ca");
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name("localhost");
        let endpoint = tonic::transport::Endpoint::from_shared(lab.controller())
            .expect("url")
            .tls_config(tls)
            .expect("tls");
        match endpoint.connect().await {
            Err(_) => true,
            Ok(channel) => {
                let mut client = wavegate_proto::v1::operator_service_client::OperatorServiceClient::new(channel);
                client.list(wavegate_proto::v1::ListRequest {}).await.is_err()
            }
        }
    });
    assert!(refused, "a client without a certificate must not get an answer");
}

#[test]
#[ignore = "needs root (namespaces, mounts): scripts/test runs it"]
fn with_max_in_flight_five_a_failing_wave_of_fifty_runs_its_step_on_at_most_five_hosts() {
    let lab = Lab::up("in-flight", "fifty-fleet.yaml");
    let wave2: Vec<String> = (0..50).map(|i| format!("w{i:02}")).collect();
    // The first host of the wave fails at once; the others take 3 s. Only
    // the real run sees these files (a dry-run has a /run of its own).
    lab.seed("w00", "/run/wg-fail", "yes\n");
    for h in &wave2[1..] {
        lab.seed(h, "/run/wg-slow", "yes\n");
    }
    let plan = lab.write_plan(
        "in-flight",
        "name: in-flight
targets:
  groups: [g-fifty]
  expect_count: 51
steps:
  - name: slow or failing
    run: |
      if test -e /run/wg-fail; then echo failing on purpose; exit 1; fi
      if test -e /run/wg-slow; then sleep 3; fi
      mkdir -p /srv/inflight && echo ran > /srv/inflight/ran
    writes: [/srv/inflight]
    timeout: 60s
waves:
  - size: 1
  - size: 100%
max_in_flight: 5
failure_budget: {canary: 0, wave: 0}
health: {bake: 0s}
on_failure: halt
",
    );
    let fleet = wavegate_tests::fixture("fifty-fleet.yaml");
    let policies = lab.dir.join("policies");
    let check = lab.wavegate_as(
        "submitter",
        &[
            "plan",
            "check",
            "--fleet",
            &fleet.display().to_string(),
            "--policies",
            &policies.display().to_string(),
            &plan,
        ],
    );
    let table = check.stdout.lines().find(|l| l.starts_with("2 ")).unwrap_or_default();
    assert!(
        check.stdout.contains("AT ONCE") && table.split_whitespace().nth(4) == Some("5"),
        "plan check shows each wave's number:\n{}\n{}",
        check.stdout,
        check.stderr
    );
    let id = lab.submit(&plan);
    assert_eq!(lab.status(&id)["waves"][1]["max_in_flight"], 5);
    lab.approve(&id);
    let status = lab.wait_state(&id, "halted", LONG);
    let reason = status["halt_reason"].as_str().unwrap_or_default().to_owned();
    assert!(
        reason.contains("wave 2: 1 of 50 hosts failed, budget 0; last: w00"),
        "{reason}"
    );
    let named: Vec<String> = reason
        .split_once("; in flight at the halt: ")
        .map(|(_, l)| l.split(", ").map(str::to_owned).collect())
        .unwrap_or_default();
    assert!(named.len() <= 4, "at most max_in_flight - 1 others: {reason}");
    // Those steps were sent before the halt and finish; nothing else runs.
    // (The file the step writes is there, empty, from before its real run:
    // the agent lays out what the dry-run saw created. Its content says
    // the step got that far.)
    let ran = |h: &str| lab.read_host(h, "/srv/inflight/ran").as_deref() == Some("ran\n");
    eventually(LONG, "the steps in flight to finish", || {
        named.iter().all(|h| ran(h)).then_some(())
    });
    let s = lab.status(&id);
    let hosts = s["waves"][1]["hosts"].as_array().expect("hosts");
    let states: BTreeMap<&str, &str> = hosts
        .iter()
        .map(|h| (h["id"].as_str().unwrap_or(""), h["state"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(states["w00"], "failed", "{reason}");
    let ran_on: Vec<&String> = wave2.iter().filter(|h| ran(h)).collect();
    assert_eq!(
        ran_on,
        named.iter().collect::<Vec<_>>(),
        "the halt names exactly the other hosts that ran the step"
    );
    // Every other host never got the step: no agent of theirs journaled
    // one. (A host whose step id was stored in the moment of the halt is
    // `running` without having been sent it; at most four such.)
    for h in wave2.iter().filter(|h| *h != "w00" && !named.contains(h)) {
        assert!(
            lab.jobs(h).is_empty(),
            "{h} was not named, yet its agent journaled a step"
        );
    }
    let untouched = states.values().filter(|s| **s == "untouched").count();
    assert!(untouched >= 45, "{states:?}");
}
