//! The binary's own smoke tests (they also make `cargo test` build the binary
//! that the workspace's end-to-end tests drive).

use std::process::Command;

fn wavegate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wavegate"))
        .args(args)
        .output()
        .expect("run wavegate")
}

#[test]
fn help_lists_plan_check() {
    let out = wavegate(&["plan", "check", "--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--fleet") && text.contains("--policies") && text.contains("--output"),
        "{text}"
    );
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(wavegate(&["plan", "check"]).status.code(), Some(2));
    assert_eq!(wavegate(&["no-such-command"]).status.code(), Some(2));
    assert_eq!(
        wavegate(&["plan", "check", "--fleet", "f", "p", "--output", "xml"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn shipped_policy_list_matches_the_policies_directory() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("policies/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .filter_map(|p| p.file_name().map(|n| format!("policies/{}", n.to_string_lossy())))
        .collect();
    on_disk.sort();
    let mut built_in: Vec<String> = wavegate::policies::SHIPPED
        .iter()
        .map(|(n, _)| (*n).to_owned())
        .collect();
    built_in.sort();
    assert_eq!(built_in, on_disk, "add new policies/ files to policies::SHIPPED");
}

#[test]
fn the_controller_units_command_line_parses() {
    use clap::Parser as _;
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/wavegate-controller.service"),
    )
    .expect("unit");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let args: Vec<&str> = exec.split_whitespace().collect();
    if let Err(e) = wavegate::cli::Cli::try_parse_from(&args) {
        panic!("deploy/systemd/wavegate-controller.service runs a command wavegate does not accept:\n{e}");
    }
}
