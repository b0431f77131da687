//! The CLI fits the shell: completions for bash, zsh and fish, man pages
//! for every subcommand, and `--output json|yaml|table` (`text` still
//! meaning table). No lab needed.

use wavegate_tests::{fixture, wavegate};

#[test]
fn completions_cover_every_shell_and_the_new_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let run = wavegate(["completions", shell]);
        assert_eq!(run.status, 0, "{shell}: {}", run.stderr);
        assert!(run.stdout.contains("logs"), "{shell} completes `rollout logs`");
        assert!(run.stdout.contains("follow"), "{shell} completes its flags");
    }
    assert!(wavegate(["completions", "bash"]).stdout.contains("_wavegate()"));
    let run = wavegate(["completions", "tcsh-but-not-really"]);
    assert_eq!(run.status, 2, "a wrong shell is a usage error: {}", run.stderr);
}

#[test]
fn man_pages_are_written_for_every_subcommand() {
    let dir = std::env::temp_dir().join(format!("wavegate-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = wavegate(["man", "--dir", dir.to_str().expect("path")]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    for page in [
        "wavegate.1",
        "wavegate-rollout.1",
        "wavegate-rollout-logs.1",
        "wavegate-lab-up.1",
    ] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page} is a man page");
    }
    assert!(!dir.join("wavegate-lab-boot.1").exists(), "hidden commands get no page");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn read_commands_print_json_yaml_or_a_table() {
    let fleet = fixture("fleet.yaml");
    let plan = fixture("plans/good.yaml");
    let args = |out: &str| {
        wavegate([
            "plan",
            "check",
            "--fleet",
            fleet.to_str().expect("path"),
            plan.to_str().expect("path"),
            "--output",
            out,
        ])
    };
    let json = args("json");
    assert_eq!(json.status, 0, "{}", json.stderr);
    assert_eq!(json.json()["ok"], true);
    let yaml = args("yaml");
    assert_eq!(yaml.status, 0, "{}", yaml.stderr);
    assert!(yaml.stdout.lines().any(|l| l == "ok: true"), "YAML:\n{}", yaml.stdout);
    assert!(yaml.stdout.contains("targets:"), "{}", yaml.stdout);
    for table in ["table", "text"] {
        let t = args(table);
        assert_eq!(t.status, 0);
        assert!(t.stdout.contains("OK: no violations"), "{table}: {}", t.stdout);
    }
    assert_eq!(args("xml").status, 2, "an unknown format is a usage error");
}
