//! The audit trail of a full lab rollout, from the auditor's side: it
//! records who did what and what ran, it verifies live and offline, every
//! kind of tampering with an export is detected and named, and the auditor
//! can change nothing (each attempt is refused and recorded). Needs root.

use std::time::Duration;

use serde_json::Value;
use wavegate_tests::lab::Lab;

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_full_rollouts_audit_log_verifies_offline_and_tampering_is_named() {
    let lab = Lab::up("audit", "lab-fleet.yaml");
    let id = lab.submit("lab/three-waves.yaml");
    lab.approve(&id);
    lab.wait_state(&id, "completed", Duration::from_secs(90));

    // The auditor can change nothing; each attempt is refused and recorded.
    for action in [
        &["rollout", "approve", &id][..],
        &["rollout", "resume", &id],
        &["rollout", "abort", &id],
        &["rollout", "rollback", &id],
    ] {
        let run = lab.wavegate_as("auditor", action);
        assert_eq!(run.status, 3, "{action:?}: {}", run.stderr);
    }

    let log = lab.wavegate_as("auditor", &["audit", "log", "--output", "json"]);
    assert_eq!(log.status, 0, "{}", log.stderr);
    let records: Vec<Value> = log
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let kinds = |k: &str| records.iter().filter(|r| r["body"]["kind"] == k).count();
    assert_eq!(kinds("submit"), 1);
    let submit = records.iter().find(|r| r["body"]["kind"] == "submit").expect("submit");
    assert_eq!(submit["body"]["actor"], "submitter");
    assert_eq!(submit["body"]["data"]["targets"].as_array().map(Vec::len), Some(8));
    let text: Vec<&str> = records.iter().filter_map(|r| r["body"]["text"].as_str()).collect();
    assert!(
        text.iter().any(|t| t.contains("approved by approver")),
        "approval recorded"
    );
    assert!(
        text.iter().any(|t| t.contains("wave 3 confirmed healthy")),
        "wave confirmation recorded"
    );
    for action in [
        "tried approving",
        "tried resuming",
        "tried aborting",
        "tried rolling back",
    ] {
        assert!(
            text.iter().any(|t| t.contains(action)),
            "refusal `{action}` recorded: {text:#?}"
        );
    }
    let step = records
        .iter()
        .filter(|r| r["body"]["kind"] == "host" && r["body"]["host"] == "b3")
        .filter_map(|r| r["body"]["data"]["results"].as_array().and_then(|a| a.first().cloned()))
        .next()
        .expect("b3's step result is in the log");
    assert_eq!(step["exit_code"], 0);
    assert_eq!(step["output_sha256"].as_str().map(str::len), Some(64));

    // Live verification, then an export verified offline with the
    // controller's public key.
    assert_eq!(lab.wavegate_as("auditor", &["audit", "verify"]).status, 0);
    let key = lab
        .wavegate_as("auditor", &["audit", "pubkey"])
        .stdout
        .trim()
        .to_owned();
    assert_eq!(key.len(), 64);
    let file = lab.dir.join("audit.jsonl");
    let f = file.to_str().expect("path");
    assert_eq!(lab.wavegate_as("auditor", &["audit", "export", "--file", f]).status, 0);
    let verify = |path: &str| wavegate_tests::wavegate(["audit", "verify", "--file", path, "--public-key", &key]);
    let run = verify(f);
    assert_eq!(run.status, 0, "{}{}", run.stdout, run.stderr);

    // Tampering with the export: each is detected, naming the first bad record.
    let lines: Vec<String> = std::fs::read_to_string(&file)
        .expect("export")
        .lines()
        .map(str::to_owned)
        .collect();
    let record_line = |seq: u64| {
        lines
            .iter()
            .position(|l| l.contains(&format!("\"seq\":{seq},")))
            .expect("record line")
    };
    let write_variant = |name: &str, lines: &[String]| {
        let p = lab.dir.join(name);
        std::fs::write(&p, lines.join("\n") + "\n").expect("write");
        p.display().to_string()
    };
    let mut edited = lines.clone();
    let i = record_line(5);
    let pos = edited[i].find("\"text\":\"").expect("text") + 8;
    let mut bytes = edited[i].clone().into_bytes();
    bytes[pos] = if bytes[pos] == b'X' { b'Y' } else { b'X' };
    edited[i] = String::from_utf8(bytes).expect("utf-8");
    let mut removed = lines.clone();
    removed.remove(record_line(7));
    let mut swapped = lines.clone();
    swapped.swap(record_line(3), record_line(4));
    for (name, variant, seq) in [("edited", edited, 5), ("removed", removed, 7), ("swapped", swapped, 3)] {
        let run = verify(&write_variant(&format!("{name}.jsonl"), &variant));
        assert_eq!(run.status, 1, "{name}: {}", run.stdout);
        assert!(
            run.stdout.contains(&format!("record {seq}:")),
            "{name} must name record {seq}: {}",
            run.stdout
        );
    }
    // Another key does not vouch for the controller's log.
    let run = wavegate_tests::wavegate(["audit", "verify", "--file", f, "--public-key", &"ab".repeat(32)]);
    assert_ne!(run.status, 0, "{}", run.stdout);

    // An export of one rollout (other bodies left out) still verifies.
    let one = lab.dir.join("one.jsonl");
    let o = one.to_str().expect("path");
    assert_eq!(
        lab.wavegate_as("auditor", &["audit", "export", "--rollout", &id, "--file", o])
            .status,
        0
    );
    assert_eq!(verify(o).status, 0);
    let report = lab.wavegate_as("auditor", &["audit", "report", &id]);
    assert!(
        report.stdout.contains("SUBMITTED by submitter") && report.stdout.contains("wave 2 confirmed healthy"),
        "{}",
        report.stdout
    );
}
