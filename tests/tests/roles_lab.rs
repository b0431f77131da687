//! Roles in a plan, on lab hosts with real agents: a step for backups only
//! is refused at plan check when its selection holds a primary, runs only on
//! the hosts a `where:` leaves, and is refused by the primary's own agent
//! when a forged inventory calls that primary a backup. Needs root.

use std::time::Duration;

use wavegate_tests::lab::Lab;

const LONG: Duration = Duration::from_secs(90);

/// A replica's wipe, with a selection that is a union: g-web (the
/// primaries p1 and p2) and g-backup.
fn wipe_plan(targets: &str) -> String {
    format!(
        "name: wipe-replicas
targets:
{targets}
steps:
  - name: wipe the replica's data
    run: rm -rf /var/lib/db/data && mkdir -p /var/lib/db/data && echo resynced > /var/lib/db/data/state
    writes: [/var/lib/db]
    max_deletions: 10
    only_roles: [backup]
waves:
  - size: 1
  - size: 100%
health:
  bake: 100ms
  interval: 50ms
"
    )
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_step_for_backups_never_runs_on_a_primary_whatever_the_inventory_says() {
    let lab = Lab::up("roles", "lab-fleet.yaml");
    let hosts = ["p1", "p2", "b1", "b2", "b3"];
    for h in hosts {
        lab.seed(h, "/var/lib/db/data/state", &format!("customer data on {h}\n"));
    }
    let before = lab.all_host_files();

    // 1. The union holds p1 and p2: refused before anything runs, with the
    //    primaries named.
    let union = lab.write_plan("union", &wipe_plan("  groups: [g-web, g-backup]"));
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &union]);
    assert_eq!(run.status, 3, "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("[role-mismatch]"), "{}", run.stdout);
    assert!(
        run.stdout.contains("p1 (primary), p2 (primary)"),
        "the primaries are named:\n{}",
        run.stdout
    );
    assert_eq!(lab.all_host_files(), before, "a refused plan changed a host");

    // 2. Narrowed with `where`, it runs on the backups and only there.
    let narrowed = lab.write_plan(
        "narrowed",
        &wipe_plan("  groups: [g-web, g-backup]\n  where: {role: backup}"),
    );
    let id = lab.submit_path(&narrowed);
    lab.approve(&id);
    lab.wait_state(&id, "completed", LONG);
    for h in ["b1", "b2", "b3"] {
        assert_eq!(
            lab.read_host(h, "/var/lib/db/data/state").as_deref(),
            Some("resynced\n"),
            "{h}"
        );
    }
    for h in ["p1", "p2"] {
        assert_eq!(
            lab.read_host(h, "/var/lib/db/data/state"),
            Some(format!("customer data on {h}\n")),
            "{h} is a primary and was not a target"
        );
    }

    // 3. A forged inventory calls p1 a backup (and its backup b1 the
    //    primary). The controller believes it and plan check passes; p1's
    //    own agent, told its role on its host, refuses the step in the
    //    dry-run, and nothing of p1 changes.
    let fleet = std::fs::read_to_string(wavegate_tests::fixture("lab-fleet.yaml")).expect("fleet");
    let forged = fleet
        .replace(
            "failure_domain: rack-a, role: primary}",
            "failure_domain: rack-a, role: backup, backup_of: [b1]}",
        )
        .replace(
            "failure_domain: rack-e, role: backup, backup_of: [p1]}",
            "failure_domain: rack-e, role: primary}",
        );
    assert_ne!(forged, fleet, "the fixture changed: the forgery no longer applies");
    let forged_path = lab.dir.join("forged-fleet.yaml");
    std::fs::write(&forged_path, forged).expect("forged fleet");
    lab.restart_controller_with(&[("--fleet", forged_path.to_str().expect("utf-8"))]);
    let p1_before = lab.read_host("p1", "/var/lib/db/data/state");
    let forged_plan = lab.write_plan("forged", &wipe_plan("  hosts: [p1]"));
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &forged_plan]);
    assert_ne!(run.status, 0, "{}\n{}", run.stdout, run.stderr);
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(
        !said.contains("[role-mismatch]"),
        "the forged inventory fools plan check:\n{said}"
    );
    assert!(
        said.contains("refused by the agent") && said.contains("p1 is a primary"),
        "the agent's refusal is shown:\n{said}"
    );
    assert_eq!(lab.read_host("p1", "/var/lib/db/data/state"), p1_before);
    let approved = lab
        .wavegate_as("auditor", &["rollout", "list", "--output", "json"])
        .json();
    let refused = approved
        .as_array()
        .expect("rollouts")
        .iter()
        .find(|r| r["plan"] == "wipe-replicas" && r["state"] != "completed")
        .unwrap_or_else(|| panic!("the forged submission is kept: {approved:#}"));
    let run = lab.wavegate_as("approver", &["rollout", "approve", refused["id"].as_str().expect("id")]);
    assert_ne!(
        run.status, 0,
        "a refused dry-run can never be approved:\n{}",
        run.stdout
    );
    assert_eq!(lab.read_host("p1", "/var/lib/db/data/state"), p1_before);
    lab.audit_verifies();
}
