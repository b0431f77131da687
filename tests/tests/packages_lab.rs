//! Real patches in a lab: a dry-run that fails blocks its step; an apt
//! package step fetches from a local repository (on loopback), dry-runs the
//! upgrade offline, rolls out and rolls back byte for byte; a broken version
//! is refused by its dry-run. Needs root, dpkg and apt-utils
//! (`scripts/test` installs them).

use std::time::Duration;

use wavegate_lab::repo::{self, Repo};
use wavegate_tests::lab::Lab;

const LONG: Duration = Duration::from_secs(120);
const HOSTS: &[&str] = &["w1", "bk1", "s1"];

/// A host with apt pointed at one of the repository's suites and wgtest
/// 1.0 installed by dpkg.
fn apt_host(lab: &Lab, repo: &Repo, host: &str, suite: &str) {
    let agent = wavegate_tests::wavegate_bin().with_file_name("wavegate-agent");
    repo::seed_host(&lab.dir, host, repo, suite, Some(&agent)).unwrap_or_else(|e| panic!("{e:#}"));
}

fn version(lab: &Lab, host: &str) -> String {
    let run = lab.exec(host, &["dpkg", "-s", "wgtest"]);
    assert_eq!(run.status, 0, "{}\n{}", run.stdout, run.stderr);
    run.stdout
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .unwrap_or_default()
        .to_owned()
}

/// Every host file but apt's own download cache and package lists (the
/// fetch fills those; they are not part of what a rollback restores).
fn files_but_the_cache(lab: &Lab) -> std::collections::BTreeMap<String, (Vec<u8>, u32, u32)> {
    lab.all_host_files()
        .into_iter()
        .filter(|(k, _)| !k.contains(":/var/cache/apt") && !k.contains(":/var/lib/apt"))
        .collect()
}

const UPGRADE: &str = "name: wgtest-fix
targets:
  groups: [g-web, g-backup, g-dns]
steps:
  - name: upgrade wgtest
    packages: {manager: apt, upgrade: [wgtest]}
    timeout: 2m
waves:
  - size: 1
  - size: 100%
health:
  checks:
    - {name: wgtest answers, exec: \"/opt/wgtest/bin/wgtest | grep -qx 'wgtest 1.1'\"}
  bake: 100ms
  interval: 50ms
";

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_dry_run_that_fails_is_blocked_and_one_allowed_to_fail_is_reported_and_runs() {
    let lab = Lab::up("dry-run-fails", "disks-fleet.yaml");
    for h in HOSTS {
        lab.seed(h, "/etc/app/app.conf", "a = 1\n");
        // The real run sees the host's /run; the dry-run has a private one.
        lab.seed(h, "/run/license-server", "up\n");
    }
    let step = "test -e /run/license-server || { echo 'checking the license'; echo 'license server unreachable' >&2; exit 3; }; echo 'a = 2' > /etc/app/app.conf";
    let plan = |name: &str, extra: &str| {
        lab.write_plan(
            name,
            &format!(
                "name: {name}
targets:
  groups: [g-web, g-backup, g-dns]
steps:
  - name: licensed update
    run: \"{step}\"
    writes: [/etc/app]
{extra}waves:
  - size: 1
  - size: 100%
health:
  bake: 100ms
  interval: 50ms
"
            ),
        )
    };
    let before = lab.all_host_files();
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &plan("fails", "")]);
    assert_eq!(run.status, 3, "blocked:\n{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("exited with status 3"),
        "its exit code:\n{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("license server unreachable"),
        "the last lines of its output:\n{}",
        run.stdout
    );
    assert_eq!(lab.all_host_files(), before, "nothing ran");

    let allowed = plan(
        "allowed",
        "    dry_run: {allow_failure: \"the license server cannot be reached from the sandbox\"}\n",
    );
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &allowed, "--output", "json"]);
    assert_eq!(run.status, 0, "{}\n{}", run.stdout, run.stderr);
    let v = run.json();
    let summaries = v["dry_runs"].to_string();
    assert!(
        summaries.contains("its dry-run exited 3, allowed: the license server cannot be reached"),
        "reported, never silently: {summaries}"
    );
    let id = v["id"].as_str().expect("id").to_owned();
    lab.approve(&id);
    lab.wait_state(&id, "completed", LONG);
    for h in HOSTS {
        assert_eq!(
            lab.read_host(h, "/etc/app/app.conf").as_deref(),
            Some("a = 2\n"),
            "ran on {h}"
        );
    }
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn an_apt_upgrade_rolls_out_and_a_rollback_restores_the_old_version_byte_for_byte() {
    let lab = Lab::up("apt-upgrade", "disks-fleet.yaml");
    let repo = Repo::start(&lab.dir.join("repo")).expect("the local repository");
    for h in HOSTS {
        apt_host(&lab, &repo, h, "good");
        assert_eq!(version(&lab, h), "1.0");
    }
    let before = files_but_the_cache(&lab);
    let plan = lab.write_plan("upgrade", UPGRADE);

    let check = wavegate_tests::wavegate([
        "plan",
        "check",
        "--fleet",
        wavegate_tests::fixture("disks-fleet.yaml").to_str().expect("path"),
        "--policies",
        lab.dir.join("policies").to_str().expect("path"),
        &plan,
    ]);
    assert_eq!(check.status, 0, "{}\n{}", check.stdout, check.stderr);
    assert!(
        check.stdout.contains("package step, apt: upgrade wgtest"),
        "plan check shows the package step:\n{}",
        check.stdout
    );
    assert!(
        check.stdout.contains("/var/lib/dpkg"),
        "and its state:\n{}",
        check.stdout
    );

    let run = lab.wavegate_as("submitter", &["rollout", "submit", &plan]);
    assert_eq!(run.status, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("packages: wgtest 1.0 -> 1.1"),
        "the submit-time dry-run lists the change:\n{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("/opt/wgtest/bin/wgtest"),
        "and the files dpkg would replace:\n{}",
        run.stdout
    );
    let id = run
        .stdout
        .split_whitespace()
        .nth(2)
        .expect("submitted: rollout ID")
        .to_owned();
    let reports = lab
        .wavegate_as("auditor", &["rollout", "dryrun", &id, "--output", "json"])
        .json();
    let r = &reports[0]["report"];
    assert_eq!(r["packages"][0]["to"], "1.1", "{r:#}");
    assert!(
        r["implied_writes"].to_string().contains("/opt/wgtest/bin"),
        "the write set holds the package's directories: {r:#}"
    );
    assert!(
        reports[0]["fetch"]["ran"] == true && reports[0]["fetch"]["outcome"] == "ok",
        "the fetch ran first and is recorded: {:#}",
        reports[0]
    );
    lab.approve(&id);
    lab.wait_state(&id, "completed", LONG);
    for h in HOSTS {
        assert_eq!(version(&lab, h), "1.1", "dpkg -s on {h}");
        assert_eq!(lab.read_host(h, "/opt/wgtest/share/VERSION").as_deref(), Some("1.1\n"));
    }
    let audit = lab.wavegate_as("auditor", &["audit", "log", "--rollout", &id, "--output", "json"]);
    assert!(audit.stdout.contains(":fetch"), "the fetch is in the audit log");

    lab.rollback(&id);
    for h in HOSTS {
        assert_eq!(version(&lab, h), "1.0", "dpkg -s on {h} after the rollback");
    }
    assert_eq!(
        files_but_the_cache(&lab),
        before,
        "the package database and the files are back byte for byte"
    );
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_broken_version_is_refused_at_submit_naming_the_directory_it_would_empty() {
    let lab = Lab::up("apt-broken", "disks-fleet.yaml");
    let repo = Repo::start(&lab.dir.join("repo")).expect("the local repository");
    for h in HOSTS {
        apt_host(&lab, &repo, h, "broken");
        lab.seed(h, "/srv/customer-data/acme.sql", "INSERT INTO orders VALUES (42);\n");
        lab.seed(h, "/srv/customer-data/bluefin.sql", "INSERT INTO orders VALUES (7);\n");
    }
    let before = files_but_the_cache(&lab);
    let plan = lab.write_plan("broken", &UPGRADE.replace("wgtest 1.1", "wgtest 1.2"));
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &plan]);
    assert_eq!(run.status, 3, "refused:\n{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("it would empty /srv/customer-data"),
        "the directory it would empty is named:\n{}",
        run.stdout
    );
    assert!(run.stdout.contains("package wgtest 1.0 -> 1.2"), "{}", run.stdout);
    assert_eq!(files_but_the_cache(&lab), before, "nothing changed on any host");
    for h in HOSTS {
        assert_eq!(version(&lab, h), "1.0");
    }
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_package_step_fails_named_when_the_manager_is_locked_or_the_package_missing() {
    let lab = Lab::up("apt-locked", "disks-fleet.yaml");
    let repo = Repo::start(&lab.dir.join("repo")).expect("the local repository");
    apt_host(&lab, &repo, "w1", "good");
    let plan = lab.write_plan(
        "missing",
        &UPGRADE
            .replace("upgrade: [wgtest]", "upgrade: [wgtest-missing]")
            .replace("groups: [g-web, g-backup, g-dns]", "hosts: [w1]"),
    );
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &plan]);
    assert_eq!(run.status, 3, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains("package wgtest-missing is not installed on this host"),
        "{}",
        run.stdout
    );
    // Another apt holds the lock (a flock on dpkg's lock file, as apt does).
    let lock = lab.host_path("w1", "/var/lib/dpkg/lock-frontend");
    let mut holder = std::process::Command::new("python3")
        .args([
            "-c",
            "import fcntl,sys,time; f=open(sys.argv[1],'w'); fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(300)",
        ])
        .arg(&lock)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.as_mut().expect("stdout")),
        &mut line,
    )
    .expect("read");
    assert_eq!(line.trim(), "held");
    let plan = lab.write_plan(
        "locked",
        &UPGRADE.replace("groups: [g-web, g-backup, g-dns]", "hosts: [w1]"),
    );
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &plan]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(run.status, 3, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains("the package manager is locked: /var/lib/dpkg/lock-frontend is held by process"),
        "{}",
        run.stdout
    );
}
