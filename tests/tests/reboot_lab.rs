//! Reboots in a lab: a step with `reboot: true` ends with its host
//! rebooting (in a lab: every process of the host killed, the agent started
//! again with a new boot id), the controller waits for the new boot, then
//! checks health; a host that does not come back fails its wave; a
//! controller killed while a host reboots neither reboots it twice nor runs
//! its step twice. Needs root.

use std::time::Duration;

use wavegate_tests::lab::{Lab, eventually};

const LONG: Duration = Duration::from_secs(120);
const HOSTS: &[&str] = &["w1", "bk1", "s1"];

/// The step starts a daemon of its own (a new session, so it outlives the
/// step) and the health check passes only once that daemon is gone: health
/// is checked after the reboot, which killed it.
fn plan(waves: &str, step_extra: &str) -> String {
    format!(
        "name: kernel-fix
targets:
  groups: [g-web, g-backup, g-dns]
steps:
  - name: install kernel
    run: \"echo installed >> /var/lib/kernel/marker; setsid sleep 600 < /dev/null > /dev/null 2>&1 & echo $! > /var/lib/kernel/old-daemon.pid{step_extra}\"
    writes: [/var/lib/kernel]
    reboot: true
    reboot_timeout: 30s
waves:
{waves}
health:
  checks:
    - {{name: old processes gone, exec: \"! kill -0 $(cat /var/lib/kernel/old-daemon.pid) 2>/dev/null\"}}
  bake: 100ms
  interval: 50ms
"
    )
}

/// How many times a host was rebooted (its `lab boot` says so in its log).
fn reboots(lab: &Lab, host: &str) -> usize {
    lab.log(&format!("agent-{host}")).matches(" rebooted").count()
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn every_host_of_three_waves_comes_back_with_a_new_boot_id_and_nothing_runs_twice() {
    let lab = Lab::up("reboot-waves", "disks-fleet.yaml");
    for h in HOSTS {
        std::fs::create_dir_all(lab.host_path(h, "/var/lib/kernel")).expect("mkdir");
    }
    let before: Vec<String> = HOSTS.iter().map(|h| lab.boot_id(h)).collect();
    let plan = lab.write_plan("reboot", &plan("  - size: 1\n  - size: 1\n  - size: 1", ""));
    let id = lab.submit_path(&plan);
    assert_eq!(lab.waves(&id).len(), 3, "three waves");
    lab.approve(&id);
    let status = lab.wait_state(&id, "completed", LONG);
    for (h, old) in HOSTS.iter().zip(&before) {
        let now = lab.boot_id(h);
        assert_ne!(&now, old, "{h} has a new boot id");
        assert_eq!(reboots(&lab, h), 1, "{h} rebooted once");
        assert_eq!(
            lab.host_lines(h, "/var/lib/kernel/marker"),
            ["installed"],
            "{h} ran its step once"
        );
        let host = status["waves"]
            .as_array()
            .expect("waves")
            .iter()
            .flat_map(|w| w["hosts"].as_array().cloned().unwrap_or_default())
            .find(|x| x["id"] == *h)
            .expect("host");
        assert_eq!(host["state"], "healthy", "{host:#}");
    }
    let events = status["events"].to_string();
    for h in HOSTS {
        assert!(
            events.contains(&format!("host {h} back after its reboot (boot {})", lab.boot_id(h))),
            "the new boot is recorded for {h}: {events}"
        );
    }
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_host_that_does_not_come_back_fails_its_wave_and_halts_the_rollout() {
    let lab = Lab::up("reboot-lost", "disks-fleet.yaml");
    for h in HOSTS {
        std::fs::create_dir_all(lab.host_path(h, "/var/lib/kernel")).expect("mkdir");
    }
    let plan = lab.write_plan(
        "reboot",
        &plan("  - size: 1\n  - size: 100%", "; sleep 2").replace("reboot_timeout: 30s", "reboot_timeout: 3s"),
    );
    let id = lab.submit_path(&plan);
    let canary = lab.waves(&id)[0][0].clone();
    lab.approve(&id);
    eventually(LONG, "the canary's step to start", || {
        (!lab.host_lines(&canary, "/var/lib/kernel/marker").is_empty()).then_some(())
    });
    // The host's machine goes away while its step runs: its agent reboots
    // it, and nothing ever starts the agent again.
    let machine: Vec<i32> = lab
        .pids_all(&[&format!("hosts/{canary}/boot-id")])
        .into_iter()
        .filter(|(_, a)| a.get(1).is_some_and(|x| x == "lab") && a.get(2).is_some_and(|x| x == "boot"))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(machine.len(), 1, "one lab boot process for {canary}");
    let ok = std::process::Command::new("kill")
        .args(["-9", &machine[0].to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
    let status = lab.wait_state(&id, "halted", LONG);
    let reason = status["halt_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("did not come back after reboot"), "{reason}");
    assert!(reason.contains(&canary), "{reason}");
    for w in status["waves"].as_array().expect("waves").iter().skip(1) {
        for h in w["hosts"].as_array().expect("hosts") {
            assert_eq!(
                h["state"], "untouched",
                "{} was touched after the canary failed",
                h["id"]
            );
        }
    }
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_controller_killed_while_a_host_reboots_neither_reboots_it_twice_nor_runs_its_step_twice() {
    let lab = Lab::up_with(
        "reboot-crash",
        "disks-fleet.yaml",
        "10s",
        &[("WAVEGATE_FAILPOINT", "reboot-pending")],
    );
    for h in HOSTS {
        std::fs::create_dir_all(lab.host_path(h, "/var/lib/kernel")).expect("mkdir");
    }
    let plan = lab.write_plan("reboot", &plan("  - size: 1\n  - size: 100%", ""));
    let id = lab.submit_path(&plan);
    let canary = lab.waves(&id)[0][0].clone();
    let approve = lab.spawn_as("approver", &["rollout", "approve", &id]);
    lab.wait_failpoint("reboot-pending");
    lab.restart_controller();
    let mut approve = approve;
    let _ = approve.kill();
    let _ = approve.wait();
    let status = lab.wait_state(&id, "completed", LONG);
    for h in HOSTS {
        assert_eq!(reboots(&lab, h), 1, "{h} rebooted once");
        assert_eq!(
            lab.host_lines(h, "/var/lib/kernel/marker"),
            ["installed"],
            "{h} ran its step once"
        );
    }
    assert!(
        status["events"]
            .to_string()
            .contains(&format!("host {canary} back after its reboot")),
        "{status:#}"
    );
}
