//! The gate on lab hosts laid out like hosting servers: customer homes and
//! databases on filesystems of their own (`lab up --fs`), real ext4, xfs and
//! btrfs on loop devices, with the real controller, CLI and agents. Needs
//! root, e2fsprogs, xfsprogs, btrfs-progs and bindfs (`scripts/test`
//! installs them).

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use wavegate_tests::lab::{Lab, eventually};

const LONG: Duration = Duration::from_secs(90);

/// The filesystem type mounted at a host path, as the machine sees it.
fn fstype(lab: &Lab, host: &str, path: &str) -> String {
    let out = Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE", "--mountpoint"])
        .arg(lab.host_path(host, path))
        .output()
        .expect("findmnt");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn submit(lab: &Lab, plan: &str) -> wavegate_tests::Run {
    lab.wavegate_as("submitter", &["rollout", "submit", plan, "--output", "json"])
}

/// Two approvals: plans that change customer data need a second person.
fn approve_twice(lab: &Lab, id: &str) {
    for who in ["approver", "admin"] {
        let run = lab.wavegate_as(who, &["rollout", "approve", id]);
        assert_eq!(run.status, 0, "approve as {who}:\n{}\n{}", run.stdout, run.stderr);
    }
}

fn snapshots(lab: &Lab, id: &str) -> Vec<Value> {
    lab.wavegate_as("auditor", &["snapshot", "list", "--rollout", id, "--output", "json"])
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn seed_customers(lab: &Lab, hosts: &[&str]) {
    for h in hosts {
        for c in ["acme", "bluefin", "corvid"] {
            lab.seed(
                h,
                &format!("/home/{c}/public_html/index.html"),
                &format!("<h1>{c} on {h}</h1>\n"),
            );
            lab.seed(
                h,
                &format!("/home/{c}/Maildir/cur/1.eml"),
                &format!("From: client@{c}\n\norder 42\n"),
            );
        }
    }
}

const DISK_HOSTS: &[&str] = &["w1", "bk1", "s1"];

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn the_2012_program_is_refused_on_hosts_whose_homes_are_filesystems_of_their_own() {
    let lab = Lab::up_fs("disks-2012", "lab-fleet.yaml", &["/home=ext4", "/var/lib/mysql=xfs"]);
    let hosts = ["p1", "p2", "p3", "p4", "b1", "b2", "b3", "bb1", "s1", "s2"];
    for h in hosts {
        assert_eq!(fstype(&lab, h, "/home"), "ext4", "{h}'s /home is its own ext4");
        assert_eq!(
            fstype(&lab, h, "/var/lib/mysql"),
            "xfs",
            "{h}'s /var/lib/mysql is its own xfs"
        );
        assert!(
            lab.host_path(h, "/")
                .join("../disks")
                .read_dir()
                .expect("disks")
                .count()
                >= 2,
            "the images lie under hosts/{h}/disks"
        );
    }
    seed_customers(&lab, &hosts);
    for h in hosts {
        lab.seed(h, "/etc/postfix/version", "1.0\n");
        // The target line is empty, and the static lint only sees `sh FILE`.
        lab.seed(
            h,
            "/opt/update/update.sh",
            &wavegate_lab::demo::update_2012("/etc/postfix/version"),
        );
    }
    let before = lab.all_host_files();
    assert!(
        before.keys().any(|k| k.ends_with(":/home/acme/Maildir/cur/1.eml")),
        "the customer files are on the /home filesystems"
    );
    let plan = lab.write_plan(
        "replay",
        "name: vuln-fix-2012
targets:
  groups: [g-web, g-mail, g-backup, g-archive]
steps:
  - name: vulnerability fix
    run: sh /opt/update/update.sh
    writes: [/etc/postfix]
    timeout: 30s
waves:
  - size: 1
  - size: 50%
health:
  bake: 200ms
  interval: 100ms
",
    );
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &plan]);
    assert_eq!(run.status, 3, "refused:\n{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("OUTSIDE the write set: 6 effects, 6 files deleted"),
        "the refusal counts the /home files:\n{}",
        run.stdout
    );
    assert!(run.stdout.contains("/home/acme"), "and names them:\n{}", run.stdout);
    let id = lab
        .wavegate_as("auditor", &["rollout", "list", "--output", "json"])
        .json()[0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let reports = lab
        .wavegate_as("auditor", &["rollout", "dryrun", &id, "--output", "json"])
        .json();
    assert_eq!(reports[0]["report"]["outside_deleted"]["count"], 6, "{reports:#}");
    assert_eq!(
        lab.all_host_files(),
        before,
        "a refused submission changed a file on some host's filesystems"
    );
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_cleanup_on_a_home_filesystem_is_held_to_its_budget_and_rolled_back_byte_for_byte() {
    let lab = Lab::up_fs(
        "disks-cleanup",
        "disks-fleet.yaml",
        &["/home=ext4", "/var/lib/mysql=xfs"],
    );
    seed_customers(&lab, DISK_HOSTS);
    for h in DISK_HOSTS {
        for i in 0..30 {
            lab.seed(
                h,
                &format!("/home/t1/tmp/sess-{i:02}"),
                &format!("session {i} on {h}\n"),
            );
        }
    }
    let before = lab.all_host_files();
    let cleanup = |name: &str, run: &str| {
        lab.write_plan(
            name,
            &format!(
                "name: {name}
targets:
  groups: [g-web, g-backup, g-dns]
steps:
  - name: purge sessions
    run: {run}
    writes: [/home/t1/tmp]
    max_deletions: 5
waves:
  - size: 1
  - size: 100%
health:
  bake: 100ms
  interval: 50ms
approvals: 2
"
            ),
        )
    };
    let all = cleanup("purge-all", "rm -f /home/t1/tmp/*");
    let run = submit(&lab, &all);
    assert_eq!(
        run.status, 3,
        "30 deletions over a budget of 5:\n{}\n{}",
        run.stdout, run.stderr
    );
    assert!(
        run.stdout.contains("deletes 30 files; max_deletions is 5"),
        "30 counted:\n{}",
        run.stdout
    );
    assert_eq!(lab.all_host_files(), before);

    let three = cleanup(
        "purge-three",
        "rm -f /home/t1/tmp/sess-00 /home/t1/tmp/sess-01 /home/t1/tmp/sess-02",
    );
    let id = lab.submit_path(&three);
    approve_twice(&lab, &id);
    lab.wait_state(&id, "completed", LONG);
    for h in DISK_HOSTS {
        assert!(lab.read_host(h, "/home/t1/tmp/sess-00").is_none(), "ran on {h}");
        assert!(
            lab.read_host(h, "/home/t1/tmp/sess-03").is_some(),
            "only three went on {h}"
        );
    }
    for s in snapshots(&lab, &id) {
        let parts = s["parts"].as_array().expect("parts");
        assert_eq!(parts.len(), 1, "{s:#}");
        assert_eq!(parts[0]["mount"], "/home", "{s:#}");
        assert_eq!(parts[0]["fstype"], "ext4", "{s:#}");
        assert_eq!(parts[0]["backend"], "tar+zstd", "{s:#}");
    }
    lab.rollback(&id);
    assert_eq!(
        lab.all_host_files(),
        before,
        "the rollback restored every file byte for byte"
    );
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn an_undeclared_write_to_the_database_filesystem_fails_read_only_and_a_declared_one_is_snapshotted() {
    let lab = Lab::up_fs("disks-mysql", "disks-fleet.yaml", &["/home=ext4", "/var/lib/mysql=xfs"]);
    for h in DISK_HOSTS {
        lab.seed(h, "/var/lib/mysql/shop/orders.ibd", &format!("orders of {h}\n"));
        lab.seed(h, "/etc/mysql/my.cnf", "[mysqld]\n");
    }
    // It writes the database only when it finds a file in /run, which the
    // real run sees and the dry-run (a private /run) does not, so the
    // dry-run sees a harmless tuning change.
    for h in DISK_HOSTS {
        lab.seed(h, "/run/mysqld-up", "yes\n");
    }
    let before = lab.all_host_files();
    let sneaky = lab.write_plan(
        "sneaky",
        "name: mysql-tuning
targets:
  groups: [g-web, g-backup, g-dns]
steps:
  - name: tune
    run: \"echo 'innodb_buffer_pool_size = 1G' >> /etc/mysql/my.cnf; if test -e /run/mysqld-up; then echo gone > /var/lib/mysql/shop/orders.ibd; fi\"
    writes: [/etc/mysql]
waves:
  - size: 1
health:
  bake: 100ms
  interval: 50ms
",
    );
    let id = lab.submit_path(&sneaky);
    lab.approve(&id);
    let status = lab.wait_state(&id, "halted", LONG);
    let reason = status["halt_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("Read-only file system"), "failed read-only: {reason}");
    let canary = status["waves"][0]["hosts"][0]["id"]
        .as_str()
        .expect("canary")
        .to_owned();
    eventually(LONG, "the canary to be rolled back", || {
        (lab.status(&id)["waves"][0]["hosts"][0]["rolled_back"] == true).then_some(())
    });
    assert_eq!(
        lab.all_host_files(),
        before,
        "every file is as before ({canary} rolled back, the database untouched)"
    );

    let declared = lab.write_plan(
        "declared",
        "name: mysql-migrate
targets:
  groups: [g-web, g-backup, g-dns]
steps:
  - name: migrate
    run: echo 'orders v2' > /var/lib/mysql/shop/orders.ibd
    writes: [/var/lib/mysql/shop]
waves:
  - size: 1
  - size: 100%
health:
  bake: 100ms
  interval: 50ms
approvals: 2
",
    );
    let id = lab.submit_path(&declared);
    approve_twice(&lab, &id);
    lab.wait_state(&id, "completed", LONG);
    for h in DISK_HOSTS {
        assert_eq!(
            lab.read_host(h, "/var/lib/mysql/shop/orders.ibd").as_deref(),
            Some("orders v2\n")
        );
    }
    let snaps = snapshots(&lab, &id);
    assert_eq!(snaps.len(), DISK_HOSTS.len(), "{snaps:#?}");
    for s in &snaps {
        let p = &s["parts"][0];
        assert_eq!(
            (p["mount"].as_str(), p["fstype"].as_str()),
            (Some("/var/lib/mysql"), Some("xfs")),
            "{s:#}"
        );
        assert_eq!(p["backend"], "tar+zstd");
        assert!(s["files"].as_u64().unwrap_or(0) >= 2, "{s:#}");
    }
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_btrfs_home_gets_btrfs_snapshots_and_a_rollback_restores_it_byte_for_byte() {
    let lab = Lab::up_fs("disks-btrfs", "disks-fleet.yaml", &["/home=btrfs:256M"]);
    assert_eq!(fstype(&lab, "w1", "/home"), "btrfs");
    seed_customers(&lab, DISK_HOSTS);
    for h in DISK_HOSTS {
        for i in 0..10 {
            lab.seed(h, &format!("/home/acme/tmp/cache-{i}"), &format!("cache {i}\n"));
        }
    }
    let before = lab.all_host_files();
    let plan = lab.write_plan(
        "btrfs-cleanup",
        "name: acme-cache
targets:
  groups: [g-web, g-backup, g-dns]
steps:
  - name: rotate cache
    run: rm -f /home/acme/tmp/cache-0 /home/acme/tmp/cache-1 && echo rotated > /home/acme/tmp/stamp
    writes: [/home/acme/tmp]
    max_deletions: 2
waves:
  - size: 1
  - size: 100%
health:
  bake: 100ms
  interval: 50ms
approvals: 2
",
    );
    let id = lab.submit_path(&plan);
    approve_twice(&lab, &id);
    lab.wait_state(&id, "completed", LONG);
    for s in snapshots(&lab, &id) {
        assert_eq!(s["backend"], "btrfs:/home", "{s:#}");
        assert_eq!(s["parts"][0]["fstype"], "btrfs", "{s:#}");
    }
    let list = lab.wavegate_as("auditor", &["snapshot", "list", "--rollout", &id]);
    assert!(
        list.stdout.contains("btrfs:/home"),
        "shown in `snapshot list`:\n{}",
        list.stdout
    );
    let audit = lab.wavegate_as("auditor", &["audit", "log", "--rollout", &id]);
    assert!(
        audit.stdout.contains("taken and verified (btrfs:/home)"),
        "the backend is in the audit log:\n{}",
        audit.stdout
    );
    assert_eq!(
        lab.read_host("w1", "/home/acme/tmp/stamp").as_deref(),
        Some("rotated\n")
    );
    lab.rollback(&id);
    assert_eq!(
        lab.all_host_files(),
        before,
        "the rollback restored every file byte for byte"
    );
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_mount_the_sandbox_cannot_overlay_blocks_every_step_that_could_touch_it() {
    let lab = Lab::up("disks-fuse", "disks-fleet.yaml");
    for h in DISK_HOSTS {
        lab.seed(h, "/srv/export/shared.txt", "shared\n");
        lab.seed(h, "/etc/app/app.conf", "a = 1\n");
    }
    // On w1, a FUSE view of /srv/export at /srv/share.
    std::fs::create_dir_all(lab.host_path("w1", "/srv/share")).expect("mount point");
    let ok = Command::new("bindfs")
        .arg(lab.host_path("w1", "/srv/export"))
        .arg(lab.host_path("w1", "/srv/share"))
        .status()
        .expect("bindfs");
    assert!(ok.success());
    let plan = |name: &str, untouchable: &str| {
        lab.write_plan(
            name,
            &format!(
                "name: {name}
targets:
  hosts: [w1]
steps:
  - name: refresh share cache
    run: cat /srv/share/shared.txt > /dev/null
    writes: [/srv/share/cache]
  - name: app config
    run: echo 'a = 2' > /etc/app/app.conf
    writes: [/etc/app]
  - name: srv layout
    run: ls /srv
    writes: [/srv]
{untouchable}waves:
  - size: 1
health:
  bake: 100ms
  interval: 50ms
"
            ),
        )
    };
    let run = submit(&lab, &plan("fuse", ""));
    assert_eq!(run.status, 3, "{}\n{}", run.stdout, run.stderr);
    let id = lab
        .wavegate_as("auditor", &["rollout", "list", "--output", "json"])
        .json()[0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let reports = lab
        .wavegate_as("auditor", &["rollout", "dryrun", &id, "--output", "json"])
        .json();
    let by_step = |step: &str| -> Value {
        reports
            .as_array()
            .expect("reports")
            .iter()
            .find(|r| r["step"] == step)
            .cloned()
            .unwrap_or_else(|| panic!("no report for {step}: {reports:#}"))
    };
    for step in ["refresh share cache", "srv layout"] {
        let r = by_step(step);
        assert_eq!(r["blocked"], true, "{r:#}");
        let why = r["reasons"].to_string();
        assert!(
            why.contains("/srv/share") && why.contains("FUSE"),
            "the mount is named: {why}"
        );
    }
    assert_eq!(
        by_step("app config")["blocked"],
        false,
        "a step that cannot reach it is not blocked"
    );

    // Listed as untouchable, the steps that only read it are fine.
    let read_only = lab.write_plan(
        "fuse-untouchable",
        "name: fuse-untouchable
targets:
  hosts: [w1]
steps:
  - name: app config
    run: cat /srv/share/shared.txt > /etc/app/app.conf
    writes: [/etc/app]
  - name: srv layout
    run: ls /srv
    writes: [/srv]
untouchable: [/srv/share]
waves:
  - size: 1
health:
  bake: 100ms
  interval: 50ms
",
    );
    let id = lab.submit_path(&read_only);
    lab.approve(&id);
    lab.wait_state(&id, "completed", LONG);
    assert_eq!(lab.read_host("w1", "/etc/app/app.conf").as_deref(), Some("shared\n"));
}
