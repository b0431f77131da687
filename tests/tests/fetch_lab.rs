//! Nothing real before approval: a step's `fetch` at submit changes nothing
//! on the host but a staging cache in the agent's state directory; after
//! approval the real run puts exactly what was fetched (and dry-run) in
//! place, after checking its digest again; a staging cache changed between
//! submit and approval is refused. Needs root (namespaces), like every lab.

use std::time::Duration;

use wavegate_tests::lab::Lab;

const LONG: Duration = Duration::from_secs(90);

/// The fetch writes a "package" into a cache; the step installs it from
/// there, without the network.
const PLAN: &str = r#"name: fetch-then-install
targets:
  hosts: [s1, s2]
  expect_count: 2
steps:
  - name: install
    fetch: "mkdir -p /var/cache/app && echo 'app 2.0' > /var/cache/app/app.pkg && rm -f /var/cache/app/old.pkg"
    fetch_writes: [/var/cache/app]
    run: "mkdir -p /srv/app && cp /var/cache/app/app.pkg /srv/app/installed"
    writes: [/srv/app]
    timeout: 20s
waves:
  - size: 1
  - size: 100%
health:
  checks:
    - {name: installed, exec: "grep -q 'app 2.0' /srv/app/installed"}
  bake: 300ms
  interval: 100ms
"#;

fn staged_trees(lab: &Lab, host: &str) -> Vec<std::path::PathBuf> {
    let dir = lab.dir.join("hosts").join(host).join("agent").join("fetch");
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path().join("root")).collect())
        .unwrap_or_default()
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_fetch_at_submit_changes_nothing_and_the_real_run_uses_exactly_what_it_fetched() {
    let lab = Lab::up("fetch-staged", "lab-fleet.yaml");
    for h in ["s1", "s2"] {
        lab.seed(h, "/var/cache/app/old.pkg", "app 1.0\n");
    }
    let before = lab.all_host_files();
    let plan = lab.write_plan("fetch", PLAN);
    let id = lab.submit_path(&plan);
    let canary = lab.waves(&id)[0][0].clone();
    // Submitted, dry-run, not approved: every host file is as it was.
    assert_eq!(lab.all_host_files(), before, "the submit-time fetch changed a host");
    let trees = staged_trees(&lab, &canary);
    assert_eq!(trees.len(), 1, "one staging cache on the canary: {trees:?}");
    assert_eq!(
        std::fs::read_to_string(trees[0].join("var/cache/app/app.pkg"))
            .ok()
            .as_deref(),
        Some("app 2.0\n"),
        "the staging cache holds what the fetch wrote"
    );
    let dry = lab.wavegate_as("auditor", &["rollout", "dryrun", &id, "--output", "json"]);
    assert!(
        dry.stdout.contains("staging cache"),
        "the dry-run report says the fetch was staged:\n{}",
        dry.stdout
    );
    lab.approve(&id);
    lab.wait_state(&id, "completed", LONG);
    for h in ["s1", "s2"] {
        assert_eq!(
            lab.host_lines(h, "/srv/app/installed"),
            ["app 2.0"],
            "{h} installed the fetched file"
        );
        assert_eq!(
            lab.host_lines(h, "/var/cache/app/app.pkg"),
            ["app 2.0"],
            "{h}'s cache holds it"
        );
        assert!(
            lab.read_host(h, "/var/cache/app/old.pkg").is_none(),
            "{h}: the fetch's deletion is carried out after approval too"
        );
    }
    assert!(
        staged_trees(&lab, &canary).is_empty(),
        "an adopted staging cache is removed"
    );
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_staging_cache_changed_between_submit_and_approval_is_refused() {
    let lab = Lab::up("fetch-tampered", "lab-fleet.yaml");
    let plan = lab.write_plan("fetch", PLAN);
    let id = lab.submit_path(&plan);
    let canary = lab.waves(&id)[0][0].clone();
    let trees = staged_trees(&lab, &canary);
    assert_eq!(trees.len(), 1, "{trees:?}");
    // Someone with the agent's state directory swaps what will be put in place.
    std::fs::write(trees[0].join("var/cache/app/app.pkg"), "app 2.0-evil\n").expect("tamper");
    lab.approve(&id);
    let st = lab.wait_state(&id, "halted", LONG);
    assert!(
        st.to_string().contains("changed since it was checked at submit"),
        "the halt says why: {st:#}"
    );
    assert!(
        lab.read_host(&canary, "/srv/app/installed").is_none(),
        "the step never ran with the changed cache"
    );
    assert!(
        lab.read_host(&canary, "/var/cache/app/app.pkg").is_none(),
        "nothing of the changed cache was put in place"
    );
}
