//! wavegate on hosts booted like servers: each lab host a systemd-nspawn
//! container with systemd as PID 1, D-Bus, journald, sshd, nginx and
//! postfix, from a Debian 12 image built with mmdebstrap; the agent
//! installed over ssh and run by the shipped unit. Needs root,
//! systemd-container and mmdebstrap (`scripts/test` installs them); the
//! image is built once (about 40 s) and cached.

use std::time::Duration;

use wavegate_lab::repo::ServiceRepo;
use wavegate_tests::lab::Lab;

const LONG: Duration = Duration::from_secs(180);
const HOSTS: &[&str] = &["w1", "w2", "bk1", "bk2"];

fn booted(name: &str) -> Lab {
    Lab::up_extra(
        name,
        "booted-fleet.yaml",
        &["--hosts", "container", "--fs", "/home=ext4"],
    )
}

/// A command on a booted host over its sshd; its stdout, trimmed.
fn on(lab: &Lab, host: &str, cmd: &str) -> String {
    let run = lab.exec(host, &["sh", "-c", cmd]);
    assert_eq!(run.status, 0, "`{cmd}` on {host}:\n{}\n{}", run.stdout, run.stderr);
    run.stdout.trim().to_owned()
}

fn main_pid(lab: &Lab, host: &str, unit: &str) -> String {
    on(lab, host, &format!("systemctl show --property=MainPID --value {unit}"))
}

fn nginx_version(lab: &Lab, host: &str) -> String {
    on(lab, host, "dpkg-query -W -f '${Version}' nginx")
}

/// The lab bridge's address (the controller's, and the repository's).
fn gateway(lab: &Lab) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lab.dir.join("containers.json")).expect("containers.json"))
            .expect("json");
    v["gateway"].as_str().expect("gateway").to_owned()
}

fn point_apt_at(lab: &Lab, repo: &ServiceRepo, suite: &str) {
    for h in HOSTS {
        on(
            lab,
            h,
            &format!(
                "printf '%s' '{}' > /etc/apt/sources.list.d/wavegate-lab.list",
                repo.source(suite).trim()
            ),
        );
    }
}

fn nginx_plan(lab: &Lab, name: &str) -> String {
    lab.write_plan(
        name,
        &format!(
            "name: {name}
description: nginx through apt, web tier first, backups last
targets:
  groups: [g-web, g-backup]
  expect_count: 4
steps:
  - name: upgrade nginx
    packages: {{manager: apt, upgrade: [nginx]}}
    timeout: 2m
waves:
  - size: 1
  - size: 100%
health:
  checks:
    - {{name: site answers, http: \"http://127.0.0.1/\", expect_status: 200}}
  bake: 300ms
  interval: 100ms
on_failure: rollback
"
        ),
    )
}

#[test]
#[ignore = "needs root, systemd-nspawn and mmdebstrap: scripts/test runs it"]
fn the_2012_program_is_refused_on_booted_hosts_and_nothing_changes() {
    let lab = booted("booted-2012");
    for h in HOSTS {
        for c in ["acme", "bluefin"] {
            lab.seed(
                h,
                &format!("/home/{c}/public_html/index.html"),
                &format!("<h1>{c}</h1>\n"),
            );
        }
        lab.seed(h, "/opt/update/conf/version", "2012-06-01\n");
        lab.seed(
            h,
            "/opt/update/update.sh",
            &wavegate_lab::demo::update_2012("/opt/update/conf/version"),
        );
    }
    let listing = |lab: &Lab| {
        HOSTS
            .iter()
            .map(|h| on(lab, h, "find /home /opt/update -type f | sort | xargs md5sum"))
            .collect::<Vec<_>>()
    };
    let before = listing(&lab);
    let plan = lab.write_plan(
        "replay",
        "name: vuln-fix-2012-06-20
targets:
  groups: [g-web, g-backup]
steps:
  - name: vulnerability fix
    run: sh /opt/update/update.sh
    writes: [/opt/update/conf]
    timeout: 30s
",
    );
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &plan]);
    assert_eq!(run.status, 3, "refused:\n{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("/home/acme"),
        "the refusal names the customers' data:\n{}",
        run.stdout
    );
    assert_eq!(listing(&lab), before, "nothing on any host changed");
    for h in HOSTS {
        assert_eq!(on(&lab, h, "cat /proc/1/comm"), "systemd", "{h} is a booted host");
        let failed = on(&lab, h, "systemctl --failed --no-legend --plain");
        eprintln!(
            "{h}: {} (failed units: {failed:?})",
            on(&lab, h, "systemctl is-system-running || true")
        );
    }
}

#[test]
#[ignore = "needs root, systemd-nspawn and mmdebstrap: scripts/test runs it"]
fn a_real_service_is_upgraded_through_apt_its_dry_run_leaves_it_alone_and_the_real_run_restarts_it() {
    let lab = booted("booted-apt");
    let repo = ServiceRepo::start(&lab.dir.join("repo"), &gateway(&lab)).unwrap_or_else(|e| panic!("{e:#}"));
    point_apt_at(&lab, &repo, "good");
    let pids: Vec<String> = HOSTS.iter().map(|h| main_pid(&lab, h, "nginx")).collect();
    assert!(pids.iter().all(|p| p != "0"), "nginx runs on every host: {pids:?}");

    let plan = nginx_plan(&lab, "nginx-update");
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &plan, "--output", "json"]);
    assert_eq!(run.status, 0, "{}\n{}", run.stdout, run.stderr);
    let v = run.json();
    let id = v["id"].as_str().expect("id").to_owned();
    let dry = v["dry_runs"].to_string();
    assert!(dry.contains(&repo.good), "the dry-run names the new version: {dry}");
    assert!(
        dry.contains("nginx.service"),
        "the dry-run says the maintainer scripts ask for a restart: {dry}"
    );
    let after_dry: Vec<String> = HOSTS.iter().map(|h| main_pid(&lab, h, "nginx")).collect();
    assert_eq!(after_dry, pids, "the dry-run left every live nginx alone");
    for h in HOSTS {
        assert_eq!(
            nginx_version(&lab, h),
            repo.installed,
            "{h} not upgraded by the dry-run"
        );
    }

    lab.approve(&id);
    lab.wait_state(&id, "completed", LONG);
    for (h, before) in HOSTS.iter().zip(&pids) {
        assert_eq!(nginx_version(&lab, h), repo.good, "{h} upgraded");
        let now = main_pid(&lab, h, "nginx");
        assert!(now != "0" && now != *before, "{h}: nginx restarted ({before} -> {now})");
        assert_eq!(
            on(&lab, h, "curl -fsS -o /dev/null -w '%{http_code}' http://127.0.0.1/"),
            "200"
        );
    }
    lab.audit_verifies();
}

#[test]
#[ignore = "needs root, systemd-nspawn and mmdebstrap: scripts/test runs it"]
fn a_broken_service_update_halts_on_its_canary_which_is_rolled_back_and_serves_again() {
    let lab = booted("booted-broken");
    let repo = ServiceRepo::start(&lab.dir.join("repo"), &gateway(&lab)).unwrap_or_else(|e| panic!("{e:#}"));
    point_apt_at(&lab, &repo, "broken");
    let pids: Vec<String> = HOSTS.iter().map(|h| main_pid(&lab, h, "nginx")).collect();
    let plan = nginx_plan(&lab, "nginx-broken");
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &plan, "--output", "json"]);
    assert_eq!(
        run.status, 0,
        "no dry-run can see that it will not start:\n{}\n{}",
        run.stdout, run.stderr
    );
    let v = run.json();
    let id = v["id"].as_str().expect("id").to_owned();
    let canary = lab.waves(&id)[0][0].clone();
    lab.approve(&id);
    let status = lab.wait_state(&id, "halted", LONG);
    assert!(
        status["halt_reason"]
            .to_string()
            .contains("systemctl restart nginx.service failed"),
        "the halt names the restart that failed: {}",
        status["halt_reason"]
    );
    wavegate_tests::lab::eventually(LONG, "the canary to be rolled back", || {
        (lab.status(&id)["waves"][0]["hosts"][0]["rolled_back"] == true).then_some(())
    });
    assert_eq!(
        nginx_version(&lab, &canary),
        repo.installed,
        "the canary has its old nginx back"
    );
    assert_eq!(on(&lab, &canary, "systemctl is-active nginx"), "active", "and runs it");
    assert_eq!(
        on(
            &lab,
            &canary,
            "curl -fsS -o /dev/null -w '%{http_code}' http://127.0.0.1/"
        ),
        "200"
    );
    for (h, before) in HOSTS.iter().zip(&pids) {
        if *h != canary {
            assert_eq!(nginx_version(&lab, h), repo.installed, "{h} was never touched");
            assert_eq!(main_pid(&lab, h, "nginx"), *before, "{h}'s nginx never restarted");
        }
    }
}

#[test]
#[ignore = "needs root, systemd-nspawn and mmdebstrap: scripts/test runs it"]
fn a_reboot_step_reboots_every_host_through_systemd_and_the_agent_comes_back_under_its_unit() {
    let lab = booted("booted-reboot");
    let boots: Vec<String> = HOSTS
        .iter()
        .map(|h| on(&lab, h, "cat /proc/sys/kernel/random/boot_id"))
        .collect();
    let plan = lab.write_plan(
        "kernel",
        "name: kernel-fix
description: a fix that takes effect at the next boot
targets:
  groups: [g-web, g-backup]
  expect_count: 4
steps:
  - name: install and reboot
    run: echo installed >> /var/lib/kernel-fix.log
    writes: [/var/lib/kernel-fix.log]
    reboot: true
    timeout: 30s
waves:
  - size: 1
  - size: 100%
health:
  checks:
    - {name: site answers, http: \"http://127.0.0.1/\", expect_status: 200}
  bake: 300ms
  interval: 100ms
",
    );
    let id = lab.submit(&plan);
    lab.approve(&id);
    lab.wait_state(&id, "completed", LONG);
    for (h, before) in HOSTS.iter().zip(&boots) {
        let now = on(&lab, h, "cat /proc/sys/kernel/random/boot_id");
        assert_ne!(now, *before, "{h} booted again");
        assert_eq!(
            on(&lab, h, "cat /var/lib/kernel-fix.log"),
            "installed",
            "{h} ran the step once"
        );
        assert_eq!(on(&lab, h, "systemctl is-active wavegate-agent"), "active");
        assert_eq!(
            on(
                &lab,
                h,
                "systemctl show --property=UnitFileState --value wavegate-agent"
            ),
            "enabled",
            "{h}'s agent came back by itself, started by its unit at boot"
        );
        let journal = on(&lab, h, "journalctl -b -u wavegate-agent --no-pager -o cat");
        assert!(
            journal.contains("Connected to the controller"),
            "{h}: the agent of this boot connected: {journal}"
        );
    }
}

/// Each attempt prints `reached X` or `refused X`: a raw connect to every
/// socket of the live systemd, D-Bus and journald, then systemctl and a
/// signal to nginx.
const REACH: &str = r#"for s in /run/systemd/private /run/dbus/system_bus_socket /run/systemd/journal/stdout /run/systemd/journal/socket /run/systemd/notify /run/app.sock; do if python3 -c "import socket,sys; k=socket.SOCK_DGRAM if sys.argv[1].endswith(('notify','journal/socket')) else socket.SOCK_STREAM; c=socket.socket(socket.AF_UNIX,k); c.connect(sys.argv[1])" $s 2>/dev/null; then echo "reached $s"; else echo "refused $s"; fi; done; if systemctl stop nginx 2>/dev/null; then echo 'reached systemctl'; else echo 'refused systemctl'; fi; if kill -TERM $(cat /run/nginx.pid) 2>/dev/null; then echo 'reached kill'; else echo 'refused kill'; fi"#;

#[test]
#[ignore = "needs root, systemd-nspawn and mmdebstrap: scripts/test runs it"]
fn no_step_reaches_the_live_systemd_neither_in_its_dry_run_nor_in_its_real_run() {
    let lab = booted("booted-sockets");
    let pids: Vec<String> = HOSTS.iter().map(|h| main_pid(&lab, h, "nginx")).collect();
    // An application's own socket, which a health check may ask and a step
    // may not; bound through Debian's /var/run -> /run link.
    on(
        &lab,
        "w1",
        "systemd-run --unit app-sock python3 -c \"import socket,time; s=socket.socket(socket.AF_UNIX); s.bind('/var/run/app.sock'); s.listen(8); time.sleep(3600)\" && for i in $(seq 100); do [ -S /run/app.sock ] && break; sleep 0.1; done; [ -S /run/app.sock ]",
    );
    let plan = lab.write_plan(
        "reach",
        &format!(
            "name: reach
description: a step that tries every way to the service manager
targets:
  hosts: [w1]
steps:
  - name: reach
    run: 'mkdir -p /srv/reach && ( {} ) > /srv/reach/log'
    writes: [/srv/reach]
    timeout: 60s
health:
  checks:
    - name: the app's socket answers, the service manager's does not
      exec: \"python3 -c 'import socket; socket.socket(socket.AF_UNIX).connect(\\\"/run/app.sock\\\")' && ! python3 -c 'import socket; socket.socket(socket.AF_UNIX).connect(\\\"/run/systemd/private\\\")'\"
  bake: 100ms
  interval: 50ms
",
            REACH.replace('\'', "''")
        ),
    );
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &plan, "--output", "json"]);
    assert_eq!(run.status, 0, "{}\n{}", run.stdout, run.stderr);
    let id = run.json()["id"].as_str().expect("id").to_owned();
    assert_eq!(main_pid(&lab, "w1", "nginx"), pids[0], "the dry-run reached nothing");
    lab.approve(&id);
    lab.wait_state(&id, "completed", LONG);
    let log = on(&lab, "w1", "cat /srv/reach/log");
    assert!(log.lines().count() >= 8, "every attempt was made: {log}");
    assert!(!log.contains("reached"), "the real run reached the live system: {log}");
    for (h, before) in HOSTS.iter().zip(&pids) {
        assert_eq!(main_pid(&lab, h, "nginx"), *before, "{h}'s nginx is untouched");
    }
}

/// Debian's own apt timers on booted hosts: reported with the links that
/// enable them, held through systemd for a rollout (masked and stopped),
/// and enabled and running again after it.
#[test]
#[ignore = "needs root, systemd-nspawn and mmdebstrap: scripts/test runs it"]
fn debians_apt_timers_are_reported_held_through_systemd_and_restored() {
    let lab = booted("booted-updaters");
    for h in HOSTS {
        assert_eq!(
            on(&lab, h, "systemctl is-enabled apt-daily-upgrade.timer"),
            "enabled",
            "{h}"
        );
        assert_eq!(
            on(&lab, h, "systemctl is-active apt-daily-upgrade.timer"),
            "active",
            "{h}"
        );
    }
    let reported = wavegate_tests::lab::eventually(LONG, "the agents to report their apt timers", || {
        let run = lab.wavegate_as("auditor", &["fleet", "status", "w1"]);
        run.stdout.contains("apt-daily-upgrade.timer").then_some(run.stdout)
    });
    assert!(
        reported.contains("enabled by /etc/systemd/system/timers.target.wants/apt-daily-upgrade.timer"),
        "{reported}"
    );
    std::fs::write(
        lab.dir.join("policies/updaters.yaml"),
        "rules:\n  - {id: hold-updaters, kind: updaters, action: hold}\n",
    )
    .expect("policy");
    lab.restart_controller();
    let plan = lab.write_plan(
        "slow-fix",
        "name: slow-fix
targets:
  hosts: [w1, w2]
steps:
  - name: fix
    run: sleep 6 && echo fixed > /var/lib/slow-fix
    writes: [/var/lib/slow-fix]
    timeout: 30s
waves:
  - size: 1
  - size: 100%
health:
  bake: 300ms
  interval: 100ms
",
    );
    let id = lab.submit(&plan);
    lab.approve(&id);
    // While the canary's step runs, systemd itself says both targets'
    // timers are masked and stopped: the hold is taken on every target
    // before the first step.
    wavegate_tests::lab::eventually(LONG, "the timers to be held", || {
        ["w1", "w2"]
            .iter()
            .all(|h| {
                lab.exec(h, &["systemctl", "is-enabled", "apt-daily-upgrade.timer"]).stdout.trim() == "masked"
                    // A masked timer that was stopped reads `inactive`
                    // or `failed`: not `active`, which is what counts.
                    && lab.exec(h, &["systemctl", "is-active", "apt-daily.timer"]).stdout.trim() != "active"
            })
            .then_some(())
    });
    assert_eq!(
        on(&lab, "bk1", "systemctl is-enabled apt-daily-upgrade.timer"),
        "enabled",
        "not a target"
    );
    lab.wait_state(&id, "completed", LONG);
    wavegate_tests::lab::eventually(LONG, "the timers to be restored", || {
        ["w1", "w2"]
            .iter()
            .all(|h| {
                lab.exec(h, &["systemctl", "is-enabled", "apt-daily-upgrade.timer"])
                    .stdout
                    .trim()
                    == "enabled"
                    && lab
                        .exec(h, &["systemctl", "is-active", "apt-daily-upgrade.timer"])
                        .stdout
                        .trim()
                        == "active"
            })
            .then_some(())
    });
    for h in ["w1", "w2"] {
        assert_eq!(on(&lab, h, "cat /var/lib/slow-fix"), "fixed");
    }
    let events = lab.status(&id)["events"].to_string();
    assert!(events.contains("apt-daily-upgrade.timer masked"), "{events}");
    assert!(events.contains("apt-daily-upgrade.timer unmasked"), "{events}");
    lab.audit_verifies();
}
