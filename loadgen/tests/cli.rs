//! The load generator's command line. (Being an integration test of this
//! package also makes `cargo test --workspace` build `wavegate-loadgen`,
//! which the end-to-end tests in `tests/tests/loadgen.rs` run.)

use std::process::Command;

fn loadgen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wavegate-loadgen"))
        .args(args)
        .output()
        .expect("run wavegate-loadgen")
}

#[test]
fn it_names_every_benchmark() {
    let out = loadgen(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["agents", "memory", "rollout", "failover", "halt", "agent-idle"] {
        assert!(help.contains(cmd), "`{cmd}` missing from:\n{help}");
    }
}

#[test]
fn a_bad_size_is_refused_with_the_flag_named() {
    let out = loadgen(&["rollout", "--hosts", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--hosts"), "{err}");
}
