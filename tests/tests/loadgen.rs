//! The load generator end to end at a size CI can afford: real mutual-TLS
//! sessions for 60 hosts against a real controller. It fails unless every
//! host got its step exactly once and ended healthy, and unless no step
//! arrived after a halt. Speed is not judged here; BENCHMARKS.md does that.

use std::process::Command;

use wavegate_tests::{Run, wavegate_bin};

fn loadgen(args: &[&str]) -> Run {
    let bin = wavegate_bin().with_file_name("wavegate-loadgen");
    Command::new(&bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()))
        .into()
}

#[test]
fn a_rollout_over_sixty_simulated_hosts_steps_each_once() {
    let run = loadgen(&["rollout", "--hosts", "60"]);
    assert_eq!(run.status, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("every host got exactly one step and ended healthy"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("3.0 commands per host"),
        "dry-run, snapshot, step: {}",
        run.stdout
    );
}

#[test]
fn a_halt_stops_every_later_step() {
    let run = loadgen(&["halt", "--hosts", "60", "--runs", "3"]);
    assert_eq!(run.status, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains("real steps that arrived after the observed halt: 0"),
        "{}",
        run.stdout
    );
}
