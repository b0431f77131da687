//! `wavegate plan check` from outside: every refusal FORMATS.md promises, with
//! its code, its exit status, its location and a fix a new operator can act on.

use serde_json::Value;
use wavegate_tests::{Run, fixture, wavegate};

fn check(plan: &str) -> Run {
    check_with(plan, "fleet.yaml")
}

fn check_with(plan: &str, fleet: &str) -> Run {
    wavegate([
        "plan".as_ref(),
        "check".as_ref(),
        "--fleet".as_ref(),
        fixture(fleet).as_os_str(),
        fixture(&format!("plans/{plan}.yaml")).as_os_str(),
        "--output".as_ref(),
        "json".as_ref(),
    ])
}

fn codes(report: &Value) -> Vec<String> {
    report["violations"]
        .as_array()
        .expect("violations")
        .iter()
        .map(|v| v["code"].as_str().unwrap_or("").to_owned())
        .collect()
}

fn hosts(v: &Value) -> Vec<&str> {
    v["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .filter_map(Value::as_str)
        .collect()
}

/// Run `plan`, expect exactly one violation with `code` and `status`, and that
/// it says where and how to fix it. Returns the violation.
fn refused_once(plan: &str, code: &str, status: i32) -> Value {
    let run = check(plan);
    assert_eq!(run.status, status, "{plan}: exit status\n{}", run.stdout);
    let report = run.json();
    assert_eq!(report["ok"], false);
    assert_eq!(codes(&report), [code], "{plan}: {:#}", report["violations"]);
    let v = report["violations"][0].clone();
    assert!(
        v["file"].as_str().is_some_and(|f| f.ends_with(&format!("{plan}.yaml"))),
        "{plan}: file named: {v:#}"
    );
    assert!(
        v["message"].as_str().is_some_and(|m| m.len() > 20),
        "{plan}: message: {v:#}"
    );
    assert!(v["fix"].as_str().is_some_and(|m| m.len() > 10), "{plan}: fix: {v:#}");
    v
}

#[test]
fn a_good_plan_passes_with_targets_and_waves() {
    let run = check("good");
    assert_eq!(run.status, 0, "{}", run.stdout);
    let r = run.json();
    assert_eq!(r["ok"], true);
    assert_eq!(r["targets"], serde_json::json!(["b1", "b2", "bb1", "p1", "p2"]));
    let waves = r["waves"].as_array().expect("waves");
    assert_eq!(waves[0]["index"], 1);
    assert_eq!(waves[0]["hosts"].as_array().map(Vec::len), Some(1), "canary of size 1");
    let wave_of = |h: &str| {
        waves
            .iter()
            .position(|w| w["hosts"].as_array().is_some_and(|a| a.iter().any(|x| x == h)))
    };
    assert!(wave_of("b1") > wave_of("p1") && wave_of("bb1") > wave_of("b1") && wave_of("b2") > wave_of("p2"));
    assert_eq!(r["violations"], serde_json::json!([]));
}

#[test]
fn no_targets() {
    let v = refused_once("no-targets", "targets-missing", 3);
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("never defaults to all hosts"),
        "{v:#}"
    );
}

#[test]
fn targets_resolving_to_nothing() {
    refused_once("targets-resolve-to-nothing", "targets-missing", 3);
}

#[test]
fn empty_label_selector_is_not_everything() {
    refused_once("empty-labels-select-nothing", "targets-missing", 3);
}

#[test]
fn unknown_host_is_named_with_its_position() {
    let v = refused_once("unknown-host", "unknown-host", 3);
    assert_eq!(hosts(&v), ["p3"]);
    assert_eq!((v["line"].as_u64(), v["column"].as_u64()), (Some(3), Some(15)), "{v:#}");
    assert!(
        v["fix"].as_str().unwrap_or("").contains("did you mean `p1`")
            || v["fix"].as_str().unwrap_or("").contains("`p2`"),
        "{v:#}"
    );
}

#[test]
fn unknown_group() {
    let v = refused_once("unknown-group", "unknown-group", 3);
    assert!(v["message"].as_str().unwrap_or("").contains("g-webb"));
    assert_eq!(v["line"], 3);
}

#[test]
fn unknown_label() {
    let v = refused_once("unknown-label", "unknown-label", 3);
    assert!(v["message"].as_str().unwrap_or("").contains("os: debian13"), "{v:#}");
}

#[test]
fn expect_count_mismatch_lists_what_was_resolved() {
    let v = refused_once("expect-count-mismatch", "expect-count-mismatch", 3);
    assert_eq!(hosts(&v), ["p1", "p2"]);
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("resolve to 2 hosts but `expect_count` is 3"),
        "{v:#}"
    );
}

#[test]
fn primary_and_backup_in_one_explicit_wave() {
    let v = refused_once("pair-same-wave", "pair-same-wave", 3);
    assert_eq!(hosts(&v), ["b1", "p1"]);
    assert_eq!(v["line"], 7, "points at the offending wave: {v:#}");
}

#[test]
fn backup_of_a_backup_in_the_wave_of_the_first_primary() {
    let run = check("chain-same-wave");
    assert_eq!(run.status, 3);
    let r = run.json();
    let pair = r["violations"]
        .as_array()
        .expect("violations")
        .iter()
        .find(|v| v["code"] == "pair-same-wave")
        .unwrap_or_else(|| panic!("no pair-same-wave: {r:#}"));
    assert_eq!(hosts(pair), ["bb1", "p1"]);
    assert!(
        pair["message"].as_str().unwrap_or("").contains("through a chain"),
        "{pair:#}"
    );
    // bb1 also sits before b1, which it backs up directly.
    assert!(codes(&r).contains(&"backup-before-primary".to_string()), "{r:#}");
}

#[test]
fn backup_before_its_primary() {
    let v = refused_once("backup-before-primary", "backup-before-primary", 3);
    assert_eq!(hosts(&v), ["b2", "p2"]);
}

#[test]
fn step_without_writes() {
    let v = refused_once("writes-missing", "writes-missing", 3);
    assert_eq!(v["field"], "steps[0].writes");
}

#[test]
fn writes_the_whole_filesystem() {
    let v = refused_once("writes-root", "writes-invalid", 3);
    assert!(
        v["message"].as_str().unwrap_or("").contains("whole filesystem"),
        "{v:#}"
    );
    assert_eq!((v["line"].as_u64(), v["column"].as_u64()), (Some(6), Some(14)));
}

#[test]
fn relative_writes() {
    let v = refused_once("writes-relative", "writes-invalid", 3);
    assert!(v["message"].as_str().unwrap_or("").contains("relative"), "{v:#}");
}

#[test]
fn misspelt_field_is_bad_input_with_a_suggestion() {
    let v = refused_once("misspelt-field", "parse-error", 2);
    assert_eq!(v["line"], 7);
    assert!(
        v["fix"].as_str().unwrap_or("").contains("did you mean `max_deletions`"),
        "{v:#}"
    );
}

#[test]
fn broken_yaml_is_bad_input_with_a_position() {
    let v = refused_once("broken-yaml", "parse-error", 2);
    assert!(v["line"].as_u64().is_some(), "{v:#}");
}

#[test]
fn inventory_with_a_cycle() {
    let run = check_with("good", "fleet-cycle.yaml");
    assert_eq!(run.status, 3, "{}", run.stdout);
    let r = run.json();
    let v = &r["violations"][0];
    assert_eq!(v["code"], "inventory-invalid", "{r:#}");
    assert_eq!(hosts(v), ["b1", "b2"]);
    assert!(v["file"].as_str().unwrap_or("").ends_with("fleet-cycle.yaml"));
    assert!(v["message"].as_str().unwrap_or("").contains("cycle"));
}

#[test]
fn every_problem_is_reported_in_one_run() {
    let run = check("many-problems");
    assert_eq!(run.status, 2, "a parse-error among them makes it bad input");
    let mut got = codes(&run.json());
    got.sort();
    assert_eq!(
        got,
        [
            "parse-error",
            "unknown-group",
            "unknown-host",
            "writes-invalid",
            "writes-invalid",
            "writes-missing"
        ],
        "{}",
        run.stdout
    );
}

#[test]
fn text_output_names_file_line_and_fix() {
    let run = wavegate([
        "plan".as_ref(),
        "check".as_ref(),
        "--fleet".as_ref(),
        fixture("fleet.yaml").as_os_str(),
        fixture("plans/pair-same-wave.yaml").as_os_str(),
    ]);
    assert_eq!(run.status, 3);
    assert!(
        run.stdout.contains("pair-same-wave.yaml:7:5: [pair-same-wave]"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("fix: move `b1`"), "{}", run.stdout);
    assert!(
        run.stdout.contains("WAVE") && run.stdout.contains("FAILURE DOMAINS"),
        "{}",
        run.stdout
    );
}

#[test]
fn unreadable_files_and_bad_flags_are_bad_input() {
    let run = wavegate([
        "plan",
        "check",
        "--fleet",
        "/nonexistent/fleet.yaml",
        "/nonexistent/plan.yaml",
        "--output",
        "json",
    ]);
    assert_eq!(run.status, 2);
    let r = run.json();
    assert_eq!(codes(&r), ["parse-error", "parse-error"]);
    assert!(
        r["violations"][0]["message"]
            .as_str()
            .unwrap_or("")
            .contains("cannot read")
    );

    let run = wavegate(["plan", "check", "--no-such-flag"]);
    assert_eq!(run.status, 2, "{}", run.stderr);

    let run = wavegate([
        "plan",
        "check",
        "--fleet",
        "x",
        "y",
        "--policies",
        "/nonexistent/policies",
    ]);
    assert_eq!(run.status, 2, "{}", run.stdout);
}

/// `plan check` on a plan written here (in a temporary directory), in
/// `--output` form `output`.
fn check_written(name: &str, yaml: &str, output: &str) -> Run {
    let dir = std::env::temp_dir().join(format!("wavegate-plan-check-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("plan.yaml");
    std::fs::write(&path, yaml).expect("plan");
    let run = wavegate([
        "plan".as_ref(),
        "check".as_ref(),
        "--fleet".as_ref(),
        fixture("fleet.yaml").as_os_str(),
        path.as_os_str(),
        "--output".as_ref(),
        output.as_ref(),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    run
}

/// Names and reasons are shown on operators' terminals: a control
/// character in one (a newline that would forge a line of `rollout list`,
/// an escape sequence, a bidirectional override) is refused, with the
/// field named, and the report shows it escaped.
#[test]
fn control_characters_in_names_and_reasons_are_refused_with_the_field_named() {
    let cases = [
        ("plan name", "name: \"fix\\nr0099  completed  all-good\"\n", "name"),
        ("step name", "name: fix\n", "steps[0].name"),
        ("check name", "name: fix\n", "health.checks[0].name"),
        ("allow_failure", "name: fix\n", "steps[0].dry_run.allow_failure"),
    ];
    for (what, head, field) in cases {
        let step = if what == "step name" {
            "\"patch\\e]0;pwned\\a\""
        } else {
            "patch"
        };
        let check = if what == "check name" { "\"web\\u202e\"" } else { "web" };
        let why = if what == "allow_failure" {
            "\"needs the license server\\r\\e[2Kall fine\""
        } else {
            "\"needs the license server\""
        };
        let plan = format!(
            "{head}targets: {{hosts: [p1]}}
steps:
  - name: {step}
    run: /usr/local/sbin/patch
    writes: [/etc/app]
    dry_run: {{allow_failure: {why}}}
health:
  checks:
    - {{name: {check}, tcp: \"127.0.0.1:25\"}}
"
        );
        let run = check_written("control", &plan, "json");
        assert_eq!(run.status, 2, "{what}: bad input\n{}", run.stdout);
        let r = run.json();
        let v = r["violations"]
            .as_array()
            .expect("violations")
            .iter()
            .find(|v| v["field"] == field)
            .unwrap_or_else(|| panic!("{what}: no violation names `{field}`: {r:#}"))
            .clone();
        assert_eq!(v["code"], "parse-error", "{what}: {v:#}");
        assert!(
            v["message"].as_str().unwrap_or("").contains("control character"),
            "{what}: {v:#}"
        );
        assert_eq!(codes(&r).len(), 1, "{what}: only that: {r:#}");

        let run = check_written("control", &plan, "table");
        assert_eq!(run.status, 2, "{what}");
        assert!(
            !run.stdout.chars().any(|c| c.is_control() && c != '\n'),
            "{what}: the report shows it escaped:\n{:?}",
            run.stdout
        );
        assert!(
            run.stdout.contains(&format!("(field `{field}`)")),
            "{what}:\n{}",
            run.stdout
        );
        assert!(
            !run.stdout.lines().any(|l| l.starts_with("r0099")),
            "{what}: no line forged:\n{}",
            run.stdout
        );
    }
}

/// A name the inventory does not know is quoted in its violation; a
/// newline or an escape sequence in it stays on the violation's line.
#[test]
fn an_unknown_host_with_escapes_is_quoted_inert() {
    let plan = "name: fix
targets: {hosts: [\"p9\\e[2J\\nOK: no violations; the plan may be submitted.\\u202e\"]}
steps:
  - {name: patch, run: /usr/local/sbin/patch, writes: [/etc/app]}
";
    let run = check_written("unknown-escapes", plan, "table");
    assert_eq!(run.status, 3, "{}", run.stdout);
    assert!(
        !run.stdout
            .chars()
            .any(|c| wavegate_domain::text::is_active(c) && c != '\n'),
        "{:?}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("p9\\x1b[2J\\nOK: no violations; the plan may be submitted.\\u{202e}"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.lines().any(|l| l.starts_with("OK: ")), "{}", run.stdout);
    // JSON keeps the name as written, every control an escape.
    let run = check_written("unknown-escapes", plan, "json");
    assert!(
        !run.stdout
            .chars()
            .any(|c| wavegate_domain::text::is_active(c) && c != '\n'),
        "{:?}",
        run.stdout
    );
    assert!(run.stdout.contains("\\u202e"), "{}", run.stdout);
    assert!(
        run.json().to_string().contains("\\u001b[2J"),
        "the name reads back as written: {}",
        run.stdout
    );
}

/// Before: `wavegate ... | head -1` panicked with a backtrace when the reader
/// went away. Now the program ends quietly, as Unix tools do.
#[test]
fn a_reader_that_went_away_ends_the_cli_quietly() {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = std::process::Command::new(wavegate_tests::wavegate_bin())
        .args(["plan", "check", "--fleet"])
        .arg(wavegate_tests::repo_root().join("examples/fleet.yaml"))
        .arg(wavegate_tests::repo_root().join("examples/plans/good-explicit-mail.yaml"))
        .stdout(writer)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(stderr.is_empty(), "nothing said: {stderr}");
}

#[test]
fn a_step_only_for_backups_is_refused_on_a_selection_that_holds_a_primary() {
    let v = refused_once("role-mismatch", "role-mismatch", 3);
    // p1 by name, and s1 (standalone) by its label: both named, the
    // backups (b1, b2, bb1) are not.
    assert_eq!(hosts(&v), ["p1", "s1"], "{v:#}");
    let msg = v["message"].as_str().unwrap_or("");
    assert!(msg.contains("only for backup") && msg.contains("p1 (primary)"), "{v:#}");
    assert_eq!(v["field"], "steps[0].only_roles");
    assert_eq!(v["line"], 12, "at the step's only_roles: {v:#}");
    assert!(v["fix"].as_str().unwrap_or("").contains("where"), "{v:#}");
}

#[test]
fn where_narrows_a_union_to_the_hosts_that_meet_every_condition() {
    let run = check("where-narrows");
    assert_eq!(run.status, 0, "{}", run.stdout);
    let r = run.json();
    assert_eq!(r["targets"], serde_json::json!(["b1", "b2", "bb1"]));
    assert_eq!(r["steps"][0]["only_roles"], serde_json::json!(["backup"]));
}

#[test]
fn where_names_unknown_groups_and_roles_where_they_are_written() {
    let run = check("where-unknown");
    assert_eq!(run.status, 2, "a word that is not a role is bad input\n{}", run.stdout);
    let report = run.json();
    let vs = report["violations"].as_array().expect("violations");
    let role = vs
        .iter()
        .find(|v| v["field"] == "targets.where.role")
        .unwrap_or_else(|| panic!("the role is named: {vs:#?}"));
    assert!(
        role["message"]
            .as_str()
            .unwrap_or("")
            .contains("`replica` is not a role"),
        "{role:#}"
    );
    assert_eq!(role["line"], 6);
    let group = vs
        .iter()
        .find(|v| v["code"] == "unknown-group")
        .unwrap_or_else(|| panic!("the group is named: {vs:#?}"));
    assert_eq!(group["field"], "targets.where.groups");
    assert_eq!(group["line"], 5);
}

#[test]
fn a_wave_longer_than_its_maintenance_window_is_refused_with_its_expected_time() {
    let run = check("window-unfit");
    assert_eq!(run.status, 3, "{}", run.stdout);
    let report = run.json();
    let v: Vec<&Value> = report["violations"]
        .as_array()
        .expect("violations")
        .iter()
        .filter(|v| v["code"] == "window-unfit")
        .collect();
    // Each wave needs 20m of step and 15m of bake: 35m, in a 30m window.
    assert_eq!(v.len(), 2, "{report:#}");
    let msg = v[0]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("35m") && msg.contains("mon,tue,wed,thu,fri 02:00-02:30 Europe/Berlin"),
        "{msg}"
    );
    assert_eq!(v[0]["line"], 11, "at the windows");
    assert_eq!(report["waves"][0]["expected_ms"], 35 * 60 * 1000);
}

#[test]
fn a_window_in_an_unknown_time_zone_is_bad_input_at_its_line() {
    let v = refused_once("window-bad", "parse-error", 2);
    assert!(v["message"].as_str().unwrap_or("").contains("Europe/Berln"), "{v:#}");
    assert_eq!(v["line"], 6);
}
