//! A primary and its backup fed by a live mirror, on lab hosts: a patch
//! that damages the primary's data in a way its dry-run cannot see is
//! halted and rolled back, and the backup's copy is never damaged at any
//! moment of the rollout, because its mirror was paused before the
//! primary's wave. Needs root.

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wavegate_tests::lab::{Lab, eventually};

const LONG: Duration = Duration::from_secs(90);
const GOOD: &str = "customer data, version 1\n";

/// The mirror: every second, p1's /srv/db/data to b1's /srv/mirror/data,
/// unless b1's /srv/mirror/.pause is there (acknowledged with .paused).
fn start_mirror(lab: &Lab) -> Child {
    let p = lab.host_path("p1", "/srv/db");
    let b = lab.host_path("b1", "/srv/mirror");
    Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "while :; do if [ -e {b}/.pause ]; then [ -e {b}/.paused ] || touch {b}/.paused; else rm -f {b}/.paused; cp {p}/data {b}/data.tmp && mv {b}/data.tmp {b}/data; fi; sleep 1; done",
            p = p.display(),
            b = b.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("the mirror loop")
}

/// Stop the mirror loop and its `sleep`.
fn stop_mirror(mut mirror: Child) {
    // Its own process group (`-- -PGID`), never anything else.
    let group = format!("-{}", mirror.id());
    assert!(mirror.id() > 1, "a real process group");
    let _ = Command::new("kill").args(["-s", "KILL", "--", &group]).status();
    let _ = mirror.wait();
}

const PLAN: &str = "name: db-schema-fix
targets:
  hosts: [p1]
steps:
  - name: migrate
    # In the real run (which sees the host's /run) it damages the data; the
    # dry-run (a private /run) sees a harmless update.
    # It then takes two seconds more: long enough for an unpaused mirror,
    # which copies every second, to copy the damage.
    run: if test -e /run/live; then echo DAMAGED > /srv/db/data && sleep 2; else echo 'customer data, version 2' > /srv/db/data; fi
    writes: [/srv/db]
waves:
  - size: 1
health:
  checks:
    - {name: data-intact, exec: \"! grep -q DAMAGED /srv/db/data\"}
  bake: 100ms
  interval: 50ms
on_failure: rollback
";

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_backup_fed_by_a_live_mirror_never_copies_its_primarys_damage() {
    let lab = Lab::up("mirror", "mirror-fleet.yaml");
    lab.seed("p1", "/srv/db/data", GOOD);
    lab.seed("p1", "/run/live", "yes\n");
    lab.seed("b1", "/srv/mirror/data", GOOD);
    let mirror = start_mirror(&lab);

    // Watches the backup's copy the whole time, every 10 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, copy) = (Arc::clone(&stop), lab.host_path("b1", "/srv/mirror/data"));
        std::thread::spawn(move || {
            let mut seen = 0u64;
            let mut damaged = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                if let Ok(text) = std::fs::read_to_string(&copy) {
                    seen += 1;
                    if text.contains("DAMAGED") {
                        damaged.push(text);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (seen, damaged)
        })
    };

    let check = wavegate_tests::wavegate([
        "plan".as_ref(),
        "check".as_ref(),
        "--fleet".as_ref(),
        wavegate_tests::fixture("mirror-fleet.yaml").as_os_str(),
        "--policies".as_ref(),
        lab.dir.join("policies").as_os_str(),
        lab.write_plan("db", PLAN).as_ref(),
    ]);
    assert_eq!(check.status, 0, "{}", check.stdout);
    assert!(
        check.stdout.contains("note: b1 is fed from p1 by a live mirror (a copy every second from p1): paused before its wave, /srv/mirror snapshotted"),
        "plan check says how the mirror is guarded:\n{}",
        check.stdout
    );

    let id = lab.submit_path(&lab.dir.join("db.yaml").display().to_string());
    lab.approve(&id);
    let status = lab.wait_state(&id, "halted", LONG);
    assert!(
        status["halt_reason"].as_str().unwrap_or("").contains("data-intact"),
        "{status:#}"
    );
    // The primary is rolled back; the backup's mirror stays paused, and
    // its copy, compared with the snapshot taken before the wave, is as it was.
    let m = eventually(LONG, "the backup's copy to be checked against its snapshot", || {
        let s = lab.status(&id);
        (s["mirrors"][0]["state"] == "restored").then(|| s["mirrors"][0].clone())
    });
    assert_eq!(m["backup"], "b1");
    assert!(
        m["detail"].as_str().unwrap_or("").contains("nothing to restore"),
        "{m:#}"
    );
    assert_eq!(
        lab.read_host("p1", "/srv/db/data").as_deref(),
        Some(GOOD),
        "p1 is rolled back"
    );
    assert!(
        lab.host_path("b1", "/srv/mirror/.pause").exists(),
        "the mirror stays paused while halted"
    );

    // Aborted: p1 was restored, so the mirror is resumed, and copies p1's
    // good data again.
    let abort = lab.wavegate_as("submitter", &["rollout", "abort", &id]);
    assert_eq!(abort.status, 0, "{}", abort.stderr);
    eventually(LONG, "the mirror to be resumed", || {
        (!lab.host_path("b1", "/srv/mirror/.pause").exists()).then_some(())
    });
    eventually(LONG, "the mirror to copy again", || {
        (!lab.host_path("b1", "/srv/mirror/.paused").exists()).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    let (seen, damaged) = watcher.join().expect("watcher");
    stop_mirror(mirror);
    assert!(seen > 100, "the watcher read the copy {seen} times");
    assert!(
        damaged.is_empty(),
        "the backup's copy was damaged {} times",
        damaged.len()
    );
    assert_eq!(lab.read_host("b1", "/srv/mirror/data").as_deref(), Some(GOOD));
    let events = lab.status(&id)["events"].to_string();
    assert!(
        events.contains("the live mirror feeding b1 from p1 guarded before wave 1: paused"),
        "{events}"
    );
    assert!(events.contains("resumed (`rm -f /srv/mirror/.pause`)"), "{events}");
    lab.audit_verifies();
}

#[test]
fn a_mirror_that_cannot_be_paused_blocks_its_primary_unless_the_plan_accepts_it_by_name() {
    let dir = std::env::temp_dir().join(format!("wavegate-mirror-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let fleet = dir.join("fleet.yaml");
    std::fs::write(
        &fleet,
        "hosts:\n  - {id: p1, role: primary}\n  - {id: b1, role: backup, backup_of: [p1], mirror: {feed: DRBD protocol C}}\n",
    )
    .expect("fleet");
    let plan = |extra: &str| {
        let p = dir.join("plan.yaml");
        std::fs::write(
            &p,
            format!(
                "name: x\ntargets: {{hosts: [p1]}}\nsteps:\n  - {{name: s, run: 'true', writes: [/srv/x]}}\n{extra}"
            ),
        )
        .expect("plan");
        p
    };
    let check = |p: &std::path::Path| {
        wavegate_tests::wavegate([
            "plan".as_ref(),
            "check".as_ref(),
            "--fleet".as_ref(),
            fleet.as_os_str(),
            p.as_os_str(),
            "--output".as_ref(),
            "json".as_ref(),
        ])
    };
    let run = check(&plan(""));
    assert_eq!(run.status, 3, "{}", run.stdout);
    let r = run.json();
    let v = r["violations"]
        .as_array()
        .expect("violations")
        .iter()
        .find(|v| v["code"] == "mirror-unguarded")
        .cloned()
        .unwrap_or_else(|| panic!("{r:#}"));
    assert_eq!(v["hosts"], serde_json::json!(["b1", "p1"]));
    assert!(
        v["fix"].as_str().unwrap_or("").contains("accept_live_mirrors: [b1]"),
        "{v:#}"
    );
    let run = check(&plan("accept_live_mirrors: [b1]\n"));
    let r = run.json();
    assert!(
        !r["violations"].to_string().contains("mirror-unguarded"),
        "accepted by name: {r:#}"
    );
    assert!(
        r["notes"].to_string().contains("the plan accepts the risk by name"),
        "{r:#}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Aborted while its primary is mid-step, a mirror is not resumed: it
/// stays paused with its snapshot, and says so.
#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn an_abort_mid_step_leaves_the_mirror_paused() {
    let lab = Lab::up("mirror-abort", "mirror-fleet.yaml");
    lab.seed("p1", "/srv/db/data", GOOD);
    lab.seed("b1", "/srv/mirror/data", GOOD);
    let mirror = start_mirror(&lab);
    let plan = lab.write_plan(
        "slow",
        "name: slow
targets:
  hosts: [p1]
steps:
  - name: migrate
    run: echo half-migrated > /srv/db/data && sleep 6
    writes: [/srv/db]
    timeout: 60s
waves:
  - size: 1
health:
  bake: 100ms
  interval: 50ms
",
    );
    let id = lab.submit_path(&plan);
    lab.approve(&id);
    eventually(LONG, "p1 to be mid-step", || {
        (lab.read_host("p1", "/srv/db/data").as_deref() == Some("half-migrated\n")).then_some(())
    });
    let abort = lab.wavegate_as("submitter", &["rollout", "abort", &id]);
    assert_eq!(abort.status, 0, "{}", abort.stderr);
    let m = eventually(LONG, "the mirror's state after the abort", || {
        let s = lab.status(&id);
        (s["mirrors"][0]["state"] == "left_paused").then(|| s["mirrors"][0].clone())
    });
    assert!(m["detail"].as_str().unwrap_or("").contains("p1"), "{m:#}");
    assert!(lab.host_path("b1", "/srv/mirror/.pause").exists(), "still paused");
    assert_eq!(lab.read_host("b1", "/srv/mirror/data").as_deref(), Some(GOOD));
    stop_mirror(mirror);
}
