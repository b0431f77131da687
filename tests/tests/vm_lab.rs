//! wavegate on a virtual machine: a qemu VM that boots the lab image's own
//! Debian kernel (TCG where this machine's KVM cannot run it), with
//! systemd as PID 1 and `/home` on a virtual disk of its own; the agent
//! installed over ssh and run by the shipped unit. One VM, sized to what it
//! costs here (about a minute to boot and as long to reboot under TCG).
//! Needs root, qemu-system-x86 and mmdebstrap (`scripts/test` installs them).

use std::time::{Duration, Instant};

use serde_json::Value;
use wavegate_tests::lab::Lab;

const LONG: Duration = Duration::from_secs(600);

fn on(lab: &Lab, host: &str, cmd: &str) -> String {
    let run = lab.exec(host, &["sh", "-c", cmd]);
    assert_eq!(run.status, 0, "`{cmd}` on {host}:\n{}\n{}", run.stdout, run.stderr);
    run.stdout.trim().to_owned()
}

#[test]
#[ignore = "needs root, qemu and mmdebstrap: scripts/test runs it"]
fn a_vm_reboots_through_a_new_kernel_boot_and_its_home_disk_is_dry_run_and_snapshotted() {
    let lab = Lab::up_extra("vm", "vm-fleet.yaml", &["--hosts", "vm"]);
    assert_eq!(
        on(&lab, "v1", "findmnt -n -o SOURCE /home"),
        "/dev/vdb",
        "/home is a disk of its own"
    );
    on(&lab, "v1", "mkdir -p /home/acme && echo v1 > /home/acme/site.txt");
    let boot = on(&lab, "v1", "cat /proc/sys/kernel/random/boot_id");
    let plan = lab.write_plan(
        "kernel",
        "name: kernel-and-site
description: a change to a customer's site and one that takes effect at the next boot
targets:
  hosts: [v1]
steps:
  - name: change and reboot
    run: echo v2 > /home/acme/site.txt && echo installed >> /var/lib/kernel-fix.log
    writes: [/home/acme, /var/lib/kernel-fix.log]
    reboot: true
    timeout: 60s
health:
  checks:
    - {name: site answers, http: \"http://127.0.0.1/\", expect_status: 200}
  bake: 300ms
  interval: 200ms
approvals: 2
",
    );
    let id = lab.submit(&plan);
    let dry = lab.wavegate_as("auditor", &["rollout", "dryrun", &id, "--output", "json"]);
    assert_eq!(dry.status, 0, "{}\n{}", dry.stdout, dry.stderr);
    assert!(
        dry.stdout.contains("/home/acme/site.txt"),
        "the dry-run saw the change on the /home disk: {}",
        dry.stdout
    );
    let approved = Instant::now();
    // Customer homes need a second approver (the shipped policy).
    for who in ["approver", "admin"] {
        let run = lab.wavegate_as(who, &["rollout", "approve", &id]);
        assert_eq!(run.status, 0, "approve as {who}:\n{}\n{}", run.stdout, run.stderr);
    }
    lab.wait_state(&id, "completed", LONG);
    let since = approved.elapsed().as_secs_f64();

    assert_ne!(
        on(&lab, "v1", "cat /proc/sys/kernel/random/boot_id"),
        boot,
        "a new boot"
    );
    let uptime: f64 = on(&lab, "v1", "cut -d' ' -f1 /proc/uptime").parse().expect("uptime");
    assert!(
        uptime < since,
        "the kernel itself booted again ({uptime} s up, {since} s since approval)"
    );
    assert_eq!(
        on(&lab, "v1", "cat /var/lib/kernel-fix.log"),
        "installed",
        "the step ran once"
    );
    assert_eq!(on(&lab, "v1", "cat /home/acme/site.txt"), "v2");
    assert_eq!(on(&lab, "v1", "systemctl is-active wavegate-agent"), "active");
    assert_eq!(
        on(
            &lab,
            "v1",
            "systemctl show --property=UnitFileState --value wavegate-agent"
        ),
        "enabled"
    );
    assert!(
        on(&lab, "v1", "journalctl -b -u wavegate-agent --no-pager -o cat").contains("Connected to the controller"),
        "the agent of this boot, started by its unit, connected"
    );

    let snaps = lab.wavegate_as("auditor", &["snapshot", "list", "--rollout", &id, "--output", "json"]);
    let snaps: Vec<Value> = serde_json::from_str(&snaps.stdout).expect("snapshot list is JSON");
    let parts = snaps[0]["parts"].as_array().expect("parts").clone();
    assert!(
        parts.iter().any(|p| p["mount"] == "/home" && p["fstype"] == "ext4"),
        "the snapshot holds /home as the filesystem it is: {parts:?}"
    );
    lab.rollback(&id);
    assert_eq!(on(&lab, "v1", "cat /home/acme/site.txt"), "v1", "and restores it");
}
