//! A rollback the agent did not finish (killed, power cut) must leave each
//! tenant's files wholly as they were before it or wholly as the snapshot
//! has them once `snapshot recover` has run, never a mix; and a rollback
//! after that puts the snapshot back. The agent kills itself with SIGKILL
//! at a named point when `WAVEGATE_AGENT_CRASH_AT` says so. Needs root,
//! util-linux, e2fsprogs and btrfs-progs.

mod common;

use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{HOST, Host, Node, assert_same_tree, exe, tree_diff};
use wavegate_agent::snapshot;

fn home(name: &str, fstype: &str) -> Host {
    let mut h = Host::new(name);
    h.disk("/home", fstype, if fstype == "btrfs" { 256 } else { 64 });
    h
}

/// Run the agent with `args`, at most 60 seconds; its output goes to a log
/// in the test's directory, returned with the status.
fn agent(h: &Host, args: &[&str], crash_at: Option<&str>) -> (ExitStatus, String) {
    let log = h.base.join("agent.log");
    let out = std::fs::File::create(&log).expect("log");
    let mut cmd = Command::new(exe());
    cmd.args(args)
        .env_remove("WAVEGATE_AGENT_CRASH_AT")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out);
    if let Some(at) = crash_at {
        cmd.env("WAVEGATE_AGENT_CRASH_AT", at);
    }
    let mut child = cmd.spawn().expect("agent");
    let end = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`wavegate-agent {}` ran for 60 s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

fn restore_args(h: &Host) -> Vec<String> {
    vec![
        "snapshot".into(),
        "restore".into(),
        "--state-dir".into(),
        h.state.display().to_string(),
        "--host-root".into(),
        h.root.display().to_string(),
        "--host-id".into(),
        HOST.into(),
        "--rollout".into(),
        "r1".into(),
    ]
}

fn recover_args(h: &Host) -> Vec<String> {
    vec![
        "snapshot".into(),
        "recover".into(),
        "--state-dir".into(),
        h.state.display().to_string(),
        "--host-root".into(),
        h.root.display().to_string(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Three tenants with a few files each; the snapshot of `/home`; then a
/// step that changes every tenant's files. Returns the tree as snapshotted.
fn snapshot_then_step(h: &Host) -> Vec<Node> {
    h.tenants();
    for t in ["t1", "t2", "t3"] {
        for i in 0..20 {
            h.write(&format!("/home/{t}/site/page{i}.html"), &format!("{t} page {i}\n"));
        }
    }
    h.chown("/home/t1", 2001);
    h.chown("/home/t2", 2002);
    h.chown("/home/t3", 2003);
    let snapped = h.tree();
    h.take("r1", &["/home"], None).expect("take");
    for t in ["t1", "t2", "t3"] {
        for i in 0..20 {
            h.write(&format!("/home/{t}/site/page{i}.html"), "changed\n");
        }
        std::fs::remove_dir_all(h.path(&format!("/home/{t}/Maildir"))).expect("rm");
        h.write(&format!("/home/{t}/site/new.html"), "new\n");
    }
    std::fs::remove_dir_all(h.path("/home/t2")).expect("rm");
    h.write("/home/t4/site/index.html", "a new tenant\n");
    snapped
}

/// Killed at `at`, recovered by the agent binary (or the library call),
/// the write set is wholly one tree; a rollback then gives the snapshot.
fn a_killed_rollback_is_recovered(name: &str, fstype: &str, at: &str, by_binary: bool) {
    let h = home(name, fstype);
    let snapped = snapshot_then_step(&h);
    let pre = h.tree();
    let (status, log) = agent(&h, &strs(&restore_args(&h)), Some(at));
    assert_eq!(
        status.signal(),
        Some(9),
        "the agent was to kill itself at {at}: {status:?}; it said: {log}"
    );
    let killed = h.tree();
    eprintln!(
        "killed at {at}: {} path(s) differ from before the rollback, {} from the snapshot",
        tree_diff(&killed, &pre).len(),
        tree_diff(&killed, &snapped).len()
    );
    if by_binary {
        let (status, log) = agent(&h, &strs(&recover_args(&h)), None);
        assert!(status.success(), "`snapshot recover`: {status:?}; it said: {log}");
    } else {
        snapshot::recover(&h.state, &h.root).expect("recover");
    }
    let now = h.tree();
    if now != pre && now != snapped {
        let (mut a, mut b) = (tree_diff(&now, &pre), tree_diff(&now, &snapped));
        let (na, nb) = (a.len(), b.len());
        a.truncate(5);
        b.truncate(5);
        panic!(
            "after a rollback killed at {at} and recovered, the write set is a mix: {na} difference(s) from before the rollback:\n{}\n{nb} from the snapshot:\n{}",
            a.join("\n"),
            b.join("\n")
        );
    }
    eprintln!(
        "killed at {at} and recovered: the write set is {}",
        if now == pre {
            "as it was before the rollback"
        } else {
            "the snapshot's"
        }
    );
    // Recovering again changes nothing.
    snapshot::recover(&h.state, &h.root).expect("recover again");
    assert_same_tree(&h.tree(), &now, "after a second recover");
    snapshot::restore(&h.state, HOST, &h.root, "r1").expect("the rollback after the recovery");
    assert_same_tree(&h.tree(), &snapped, "after the rollback");
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_rollback_killed_while_building_is_recovered_to_one_tree_ext4() {
    a_killed_rollback_is_recovered("crash-build-ext4", "ext4", "restore-building", true);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_rollback_killed_while_swapping_is_recovered_to_one_tree_ext4() {
    a_killed_rollback_is_recovered("crash-swap-ext4", "ext4", "restore-swapping", true);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_rollback_killed_while_building_is_recovered_to_one_tree_btrfs() {
    a_killed_rollback_is_recovered("crash-build-btrfs", "btrfs", "restore-building", true);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_rollback_killed_while_swapping_is_recovered_to_one_tree_btrfs() {
    a_killed_rollback_is_recovered("crash-swap-btrfs", "btrfs", "restore-swapping", true);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_rollback_killed_while_swapping_is_recovered_by_the_library_call_ext4() {
    a_killed_rollback_is_recovered("crash-swap-lib-ext4", "ext4", "restore-swapping", false);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn the_agents_rollback_keeps_its_files_private_and_restores_the_snapshot() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let h = home("crash-none", "ext4");
    let snapped = snapshot_then_step(&h);
    let (status, log) = agent(&h, &strs(&restore_args(&h)), None);
    assert!(status.success(), "`snapshot restore`: {status:?}; it said: {log}");
    assert_same_tree(&h.tree(), &snapped, "after the agent's rollback");
    let (status, log) = agent(&h, &strs(&recover_args(&h)), None);
    assert!(
        status.success(),
        "`snapshot recover` with nothing to do: {status:?}; it said: {log}"
    );
    assert_same_tree(&h.tree(), &snapped, "after a recover with nothing to do");
    let mut wrong = Vec::new();
    let mut stack = vec![h.state.join("snapshots")];
    while let Some(p) = stack.pop() {
        let m = p.symlink_metadata().expect("lstat");
        let want = if m.is_dir() { 0o700 } else { 0o600 };
        if m.mode() & 0o7777 != want {
            wrong.push(format!("{} is {:o}, not {want:o}", p.display(), m.mode() & 0o7777));
        }
        if m.is_dir() {
            stack.extend(
                std::fs::read_dir(&p)
                    .expect("read_dir")
                    .map(|e| e.expect("entry").path()),
            );
        }
    }
    assert!(wrong.is_empty(), "the agent's snapshot files: {}", wrong.join("; "));
}
