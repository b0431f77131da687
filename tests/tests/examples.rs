//! Every example plan in the repository is checked by the real binary against
//! the example fleet and the shipped policies, and must give the exit status
//! and violation codes its own header promises (`# expect-exit:` and
//! `# expect-codes:`). Every policy file is loaded.

use std::path::PathBuf;

use wavegate_tests::{repo_root, wavegate};

fn header(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("# {key}:")).map(|v| v.trim().to_owned()))
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_plan_does_what_its_header_says() {
    let plans = yaml_files("examples/plans");
    assert!(plans.len() >= 8, "expected the example plans, found {plans:?}");
    let mut good = 0;
    for plan in plans {
        let text = std::fs::read_to_string(&plan).expect("read example");
        let name = plan.display().to_string();
        assert!(header(&text, "Shows").is_some(), "{name}: needs a `# Shows:` line");
        let exit: i32 = header(&text, "expect-exit")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{name}: needs `# expect-exit:`"));
        let mut want: Vec<String> = header(&text, "expect-codes")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let run = wavegate([
            "plan".as_ref(),
            "check".as_ref(),
            "--fleet".as_ref(),
            "examples/fleet.yaml".as_ref(),
            plan.as_os_str(),
            "--output".as_ref(),
            "json".as_ref(),
        ]);
        assert_eq!(run.status, exit, "{name}\n{}", run.stdout);
        let report = run.json();
        let mut got: Vec<String> = report["violations"]
            .as_array()
            .expect("violations")
            .iter()
            .map(|v| v["code"].as_str().unwrap_or_default().to_owned())
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{name}: {:#}", report["violations"]);
        if exit == 0 {
            good += 1;
            assert!(
                !report["waves"].as_array().expect("waves").is_empty(),
                "{name}: a good plan has waves"
            );
        }
    }
    assert!(good >= 2, "the examples include good plans");
}

#[test]
fn every_policy_directory_loads() {
    for dir in ["policies", "policies/examples"] {
        let run = wavegate([
            "plan",
            "check",
            "--fleet",
            "examples/fleet.yaml",
            "examples/plans/good-openssl-web.yaml",
            "--policies",
            dir,
            "--output",
            "json",
        ]);
        let report = run.json();
        let bad_input: Vec<_> = report["violations"]
            .as_array()
            .expect("violations")
            .iter()
            .filter(|v| v["code"] == "parse-error")
            .collect();
        assert!(bad_input.is_empty(), "{dir} does not load: {bad_input:#?}");
        assert!(
            report["policies"].as_array().is_some_and(|p| !p.is_empty()),
            "{dir}: no rules loaded"
        );
    }
}

#[test]
fn shipped_default_is_the_policies_directory() {
    let args = |extra: &[&str]| {
        let mut a = vec![
            "plan",
            "check",
            "--fleet",
            "examples/fleet.yaml",
            "examples/plans/bad-protected-home.yaml",
            "--output",
            "json",
        ];
        a.extend_from_slice(extra);
        wavegate(a).json()
    };
    let built_in = args(&[]);
    let from_dir = args(&["--policies", "policies"]);
    assert_eq!(
        built_in["policies"], from_dir["policies"],
        "the binary's built-in policies differ from policies/"
    );
    assert_eq!(
        built_in["violations"].as_array().map(Vec::len),
        from_dir["violations"].as_array().map(Vec::len)
    );
}

#[test]
fn the_strict_example_policy_refuses_what_the_default_allows() {
    let run = wavegate([
        "plan",
        "check",
        "--fleet",
        "examples/fleet.yaml",
        "examples/plans/good-cleanup-declared.yaml",
        "--policies",
        "policies/examples",
        "--output",
        "json",
    ]);
    assert_eq!(run.status, 3, "{}", run.stdout);
    let codes: Vec<String> = run.json()["violations"]
        .as_array()
        .expect("v")
        .iter()
        .map(|v| v["code"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(codes.contains(&"policy:long-bake".to_owned()), "{codes:?}");
}
