//! Faults around the agents: a network partition between the controller and
//! one agent (a proxy the test controls) during a step and during bake; an
//! agent SIGKILLed while it writes a snapshot; a host whose snapshot store
//! is full. Real processes over mutual TLS; needs root (mounts).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use wavegate_tests::lab::{Lab, eventually};
use wavegate_tests::proxy::Proxy;

const LONG: Duration = Duration::from_secs(90);

/// Put the canary of a freshly submitted rollout behind a proxy.
fn canary_behind_proxy(lab: &Lab, id: &str) -> (String, Proxy) {
    let canary = lab.waves(id)[0][0].clone();
    let addr = std::fs::read_to_string(lab.dir.join("controller.addr")).expect("controller address");
    let proxy = Proxy::start(addr.trim().parse().expect("socket address"));
    lab.reroute_agent(&canary, &format!("https://{}", proxy.addr));
    (canary, proxy)
}

/// After a partition the canary failed for silence, the rollout halted
/// and no later host ran; healing the partition changes none of that.
fn silent_canary_halts(lab: &Lab, id: &str, canary: &str, proxy: &Proxy, later: &[String]) {
    let status = lab.wait_state(id, "halted", LONG);
    let reason = status["halt_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(canary) && reason.contains("no answer from the agent"),
        "the halt names the silent host and why: {reason}"
    );
    let (state, detail) = lab.host_state(id, canary);
    assert_eq!(state, "failed", "a silent host is never healthy: {detail}");
    for h in later {
        assert!(
            lab.host_lines(h, "/etc/wavegate-marker").is_empty(),
            "{h} ran after the canary went silent"
        );
    }
    // The agent comes back (and may now deliver its late answer): the
    // verdict stands.
    proxy.heal();
    lab.wait_agents();
    assert_eq!(lab.status(id)["state"], "halted");
    assert_eq!(lab.host_state(id, canary).0, "failed");
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_partition_during_a_step_fails_the_host_for_silence_and_halts() {
    let lab = Lab::up_with("partition-step", "lab-fleet.yaml", "2s", &[]);
    let id = lab.submit("lab/partition-step.yaml");
    let (canary, proxy) = canary_behind_proxy(&lab, &id);
    lab.approve(&id);
    eventually(LONG, "the canary's step to start", || {
        (lab.host_lines(&canary, "/etc/wavegate-marker") == ["start"]).then_some(())
    });
    proxy.partition();
    // The step itself finishes on the host; only its answer is lost.
    eventually(LONG, "the step to finish on the host", || {
        (lab.host_lines(&canary, "/etc/wavegate-marker") == ["start", "done"]).then_some(())
    });
    let later: Vec<String> = lab.waves(&id)[1].clone();
    silent_canary_halts(&lab, &id, &canary, &proxy, &later);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_partition_during_bake_fails_the_host_for_silence_and_halts() {
    let lab = Lab::up_with("partition-bake", "lab-fleet.yaml", "2s", &[]);
    let id = lab.submit("lab/partition-bake.yaml");
    let (canary, proxy) = canary_behind_proxy(&lab, &id);
    lab.approve(&id);
    eventually(LONG, "the canary wave to bake", || {
        (lab.status(&id)["waves"][0]["state"] == "baking").then_some(())
    });
    assert_eq!(
        lab.host_state(&id, &canary).0,
        "healthy",
        "healthy before the partition"
    );
    proxy.partition();
    let later: Vec<String> = lab.waves(&id)[1].clone();
    silent_canary_halts(&lab, &id, &canary, &proxy, &later);
    assert!(lab.host_state(&id, &canary).1.contains("during bake"));
}

/// Fill a host's `/srv/app` with `mib` MiB that do not compress.
/// The DNS hosts' /srv/app, before the submit-time dry-run: a step whose
/// dry-run fails (no such directory) is blocked.
fn seed_app_dirs(lab: &Lab) {
    for h in ["s1", "s2"] {
        std::fs::create_dir_all(lab.host_path(h, "/srv/app")).expect("mkdir");
    }
}

fn seed_incompressible(lab: &Lab, host: &str, mib: usize) {
    let dir = lab.host_path(host, "/srv/app");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let status = Command::new("dd")
        .arg("if=/dev/urandom")
        .arg(format!("of={}", dir.join("payload").display()))
        .args(["bs=1M", &format!("count={mib}"), "status=none"])
        .status()
        .expect("dd");
    assert!(status.success());
}

fn snapshot_dir(lab: &Lab, host: &str) -> PathBuf {
    lab.dir.join("hosts").join(host).join("agent").join("snapshots")
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn an_agent_killed_while_writing_a_snapshot_takes_it_again_and_runs_the_step_once() {
    let lab = Lab::up("snapshot-kill", "lab-fleet.yaml");
    seed_app_dirs(&lab);
    let id = lab.submit("lab/big-snapshot.yaml");
    let waves = lab.waves(&id);
    let canary = waves[0][0].clone();
    seed_incompressible(&lab, &canary, 40);
    seed_incompressible(&lab, &waves[1][0], 1);
    lab.approve(&id);
    let partial = snapshot_dir(&lab, &canary).join(format!("{id}.partial"));
    eventually(LONG, "the canary's snapshot to be under way", || {
        std::fs::read_dir(&partial)
            .ok()?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".zst"))
            .then_some(())
    });
    let args = lab.kill9(&["wavegate-agent", "--host-id", &canary], "exec-step");
    assert!(
        !snapshot_dir(&lab, &canary).join(&id).exists(),
        "the kill came before the snapshot was complete"
    );
    lab.respawn(&args, &format!("agent-{canary}-restarted"));
    lab.wait_state(&id, "completed", LONG);
    assert_eq!(
        lab.host_lines(&canary, "/srv/app/marker"),
        ["patched"],
        "the step ran once"
    );
    assert!(!partial.exists(), "no half-written snapshot is left");
    let manifest = snapshot_dir(&lab, &canary).join(&id).join("manifest.json");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).expect("a complete snapshot")).expect("manifest JSON");
    let bytes: u64 = m["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .map(|p| p["tar"]["bytes"].as_u64().unwrap_or(0))
        .sum();
    assert!(bytes > 40 << 20, "the snapshot holds the payload: {m}");
}

/// A small tmpfs over a host's snapshot store, unmounted on drop.
struct FullStore(PathBuf);

impl FullStore {
    fn mount(dir: &Path) -> FullStore {
        std::fs::create_dir_all(dir).expect("mkdir");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "size=256k",
                "wavegate-test-full",
                dir.to_str().expect("utf-8"),
            ])
            .status()
            .expect("mount");
        assert!(status.success(), "mount a small tmpfs (needs root)");
        FullStore(dir.to_path_buf())
    }
}

impl Drop for FullStore {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_full_snapshot_store_leaves_the_host_unchanged_and_the_budget_decides() {
    let lab = Lab::up("snapshot-full", "lab-fleet.yaml");
    seed_app_dirs(&lab);
    // Wave 2 tolerates one failed host: the rollout completes without it.
    let id = lab.submit("lab/snapshot-full.yaml");
    let waves = lab.waves(&id);
    let (canary, later) = (waves[0][0].clone(), waves[1][0].clone());
    for h in [&canary, &later] {
        seed_incompressible(&lab, h, 2);
    }
    let before = lab.all_host_files();
    let full = FullStore::mount(&snapshot_dir(&lab, &later));
    lab.approve(&id);
    lab.wait_state(&id, "completed", LONG);
    let (state, detail) = lab.host_state(&id, &later);
    assert_eq!(state, "failed");
    assert!(detail.contains("no verified snapshot"), "{detail}");
    let after = lab.all_host_files();
    let changed_on_later: Vec<&String> = after
        .keys()
        .chain(before.keys())
        .filter(|k| k.starts_with(&format!("{later}:")) && before.get(*k) != after.get(*k))
        .collect();
    assert!(changed_on_later.is_empty(), "{later} changed: {changed_on_later:?}");
    assert_eq!(lab.host_lines(&canary, "/srv/app/marker"), ["patched"]);
    drop(full);

    // The canary tolerates none: the same fault on the canary halts.
    let id = lab.submit("lab/snapshot-full.yaml");
    assert_eq!(lab.waves(&id)[0][0], canary);
    let before = lab.all_host_files();
    let _full = FullStore::mount(&snapshot_dir(&lab, &canary));
    lab.approve(&id);
    let status = lab.wait_state(&id, "halted", LONG);
    assert!(
        status["halt_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("no verified snapshot"),
        "{status:#}"
    );
    assert_eq!(lab.all_host_files(), before, "no host changed");
}
