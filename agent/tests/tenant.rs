//! The agent snapshots a step's write set and rolls it back as root, over
//! directories that hosting customers (tenants) own and can change at any
//! moment. A tenant must not be able to turn that into a write outside its
//! own files, nor destroy the other tenants' data, nor hang or break the
//! snapshot with the odd files it is free to make. Each tenant here is a
//! bare numeric uid (`setpriv`, no user in /etc/passwd); every file lives
//! under a temporary host root on loop-mounted ext4 and btrfs filesystems.
//! Needs root, util-linux, python3, e2fsprogs and btrfs-progs.

mod common;

use std::ffi::OsStr;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::Duration;

use common::{Host, Node, assert_same_tree, eventually, perms, sh};
use wavegate_agent::snapshot::{self, BackendKind, Manifest};

const TAR: Option<BackendKind> = Some(BackendKind::TarZstd);

/// A filesystem for `/home`: ext4 of 64 MB, btrfs of 256 MB.
fn home(name: &str, fstype: &str) -> Host {
    let mut h = Host::new(name);
    h.disk("/home", fstype, if fstype == "btrfs" { 256 } else { 64 });
    h
}

/// Open a FIFO without blocking, as reader and writer at once: whoever is
/// waiting in `open` on its other end gets through.
fn unblock(p: &Path) -> Option<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(p)
        .ok()
}

/// A take that must end within `limit`; if it does not, the FIFOs it may be
/// blocked on are opened so it can end, and the test fails.
fn take_within(
    h: &Host,
    writes: &[&str],
    force: Option<BackendKind>,
    fifos: &[&str],
    limit: Duration,
) -> (anyhow::Result<Manifest>, Duration) {
    let rx = h.take_in_thread("r1", writes, force);
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => {
            let _held: Vec<_> = fifos.iter().filter_map(|f| unblock(&h.path(f))).collect();
            let _ = rx.recv_timeout(Duration::from_secs(30));
            panic!("the snapshot of {writes:?} did not finish within {limit:?} (it waits on a FIFO in the write set)");
        }
    }
}

/// A restore that must end within `limit`.
fn restore_within(h: &Host, limit: Duration) -> (anyhow::Result<Manifest>, Duration) {
    h.restore_in_thread("r1")
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("the rollback did not finish within {limit:?}"))
}

fn outcome(r: &anyhow::Result<Manifest>) -> String {
    match r {
        Ok(_) => "ok".to_owned(),
        Err(e) => format!("error: {e:#}"),
    }
}

fn is_symlink(p: &Path) -> bool {
    p.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink())
}

// 1. A directory swapped for a symlink out of the write set.

/// The tenant's side of the race, made deterministic by two FIFOs sorted
/// before its bait: an archiver that opens FIFOs is held at `a1` until the
/// tenant, with the walk over, swaps `bait` for a symlink to the host's
/// `/etc`, and at `a2` until the swap is done. An archiver that never opens
/// FIFOs leaves the tenant waiting; the test then lets it through after the
/// snapshot, so the swap happens between the snapshot and the rollback.
fn a_directory_swapped_for_a_symlink_while_the_snapshot_is_taken(name: &str, fstype: &str, force: Option<BackendKind>) {
    let h = home(name, fstype);
    h.tenants();
    // The bait holds one file named like the host's and of its size (the
    // tenant can read it): an archiver that follows the symlink keeps the
    // host's /etc/passwd as it is now, and a restore that follows it puts
    // that back over whatever the host has changed since.
    let size = std::fs::metadata(h.path("/etc/passwd")).expect("stat").len();
    h.write_mode(
        "/home/t1/bait/passwd",
        &"x".repeat(usize::try_from(size).expect("size")),
        0o644,
    );
    h.chown("/home/t1/bait", 2001);
    h.as_tenant(2001, "/home/t1", "mkfifo a1 a2");
    let etc = h.tree_of("/etc");
    let homes = h.tree_of("/home");
    let mut tenant = h.tenant(
        2001,
        "/home/t1",
        &[
            "timeout",
            "40",
            "sh",
            "-c",
            "exec 3>a1; mv bait bait.old && ln -s ../../etc bait; exec 4>a2",
        ],
    );
    let rx = h.take_in_thread("r1", &["/home"], force);
    let taken = rx.recv_timeout(Duration::from_secs(30));
    // Whichever way the take went, the tenant gets through its FIFOs now.
    let _held: Vec<_> = ["/home/t1/a2", "/home/t1/a1"]
        .iter()
        .filter_map(|f| unblock(&h.path(f)))
        .collect();
    let Ok((taken, _)) = taken else {
        let _ = rx.recv_timeout(Duration::from_secs(30));
        panic!("the snapshot did not finish within 30 s");
    };
    let swapped = tenant.wait(Duration::from_secs(20));
    assert!(
        swapped.is_some_and(|s| s.success()),
        "the tenant's swap: {swapped:?} {}",
        tenant.stderr()
    );
    assert!(is_symlink(&h.path("/home/t1/bait")), "the tenant swapped its directory");
    assert_same_tree(&h.tree_of("/etc"), &etc, "the host's /etc after the snapshot");
    // The host changes its own files after the snapshot (a new account).
    h.write_mode(
        "/etc/passwd",
        "root:x:0:0:root:/root:/bin/bash\nt1:x:2001:2001::/home/t1:/bin/sh\nt2:x:2002:2002::/home/t2:/bin/sh\n",
        0o644,
    );
    let etc = h.tree_of("/etc");
    if let Err(e) = taken {
        // A refused snapshot is safe; there is nothing to roll back.
        eprintln!("the snapshot was refused: {e:#}");
        return;
    }
    let pre = h.tree();
    let (r, _) = restore_within(&h, Duration::from_secs(60));
    assert_same_tree(
        &h.tree_of("/etc"),
        &etc,
        &format!(
            "the host's /etc after a rollback over a tenant's symlink to it (rollback: {})",
            outcome(&r)
        ),
    );
    match r {
        Ok(_) => assert_same_tree(
            &h.tree_of("/home"),
            &homes,
            "after the rollback, /home as it was snapshotted",
        ),
        Err(e) => assert_same_tree(
            &h.tree(),
            &pre,
            &format!("a rollback that failed ({e:#}) changed the tree"),
        ),
    }
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_tenant_swapping_a_directory_for_a_symlink_during_the_snapshot_cannot_reach_etc_ext4_tar() {
    a_directory_swapped_for_a_symlink_while_the_snapshot_is_taken("swap-take-ext4", "ext4", None);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_tenant_swapping_a_directory_for_a_symlink_during_the_snapshot_cannot_reach_etc_btrfs_forced_tar() {
    a_directory_swapped_for_a_symlink_while_the_snapshot_is_taken("swap-take-btrfs-tar", "btrfs", TAR);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_tenant_swapping_a_directory_for_a_symlink_during_the_snapshot_cannot_reach_etc_btrfs() {
    a_directory_swapped_for_a_symlink_while_the_snapshot_is_taken("swap-take-btrfs", "btrfs", None);
}

/// A loop the tenant runs: whenever `name` is there and not a symlink
/// (the rollback has just made it), move it aside and put a symlink to
/// `target` in its place.
const RACER: &str = r#"
import os, stat, sys
name, target = sys.argv[1], sys.argv[2]
i = 0
while True:
    try:
        if stat.S_ISLNK(os.lstat(name).st_mode):
            continue
        os.rename(name, ".moved%d" % i)
        i += 1
        os.symlink(target, name)
    except OSError:
        pass
"#;

/// The write set is the tenant's site; while the rollback runs, the tenant
/// keeps swapping the site for a symlink to the host's `/etc`.
fn a_rollback_raced_by_a_symlink_to_etc(name: &str, fstype: &str, force: Option<BackendKind>) {
    let h = home(name, fstype);
    h.tenants();
    for i in 0..300 {
        h.write_mode(&format!("/home/t1/site/f{i:03}.html"), &format!("page {i}\n"), 0o644);
    }
    h.write_mode("/home/t1/site/passwd", "root::0:0:t1 was here:/root:/bin/sh\n", 0o644);
    h.write_mode("/home/t1/site/shadow", "root::19000:0:99999:7:::\n", 0o644);
    h.chown("/home/t1", 2001);
    let etc = h.tree_of("/etc");
    let site = h.tree_of("/home/t1/site");
    h.take("r1", &["/home/t1/site"], force).expect("take");
    // The step changed every page.
    for i in 0..300 {
        h.write(&format!("/home/t1/site/f{i:03}.html"), "changed\n");
    }
    let mut racer = h.tenant(
        2001,
        "/home/t1",
        &["timeout", "50", "python3", "-c", RACER, "site", "../../etc"],
    );
    assert!(
        eventually(Duration::from_secs(10), || is_symlink(&h.path("/home/t1/site"))),
        "the tenant's loop started: {}",
        racer.stderr()
    );
    for round in 0..5 {
        let (r, _) = restore_within(&h, Duration::from_secs(30));
        assert_same_tree(
            &h.tree_of("/etc"),
            &etc,
            &format!(
                "round {round}: the host's /etc after a rollback raced by a tenant's symlink (rollback: {})",
                outcome(&r)
            ),
        );
    }
    racer.kill();
    let (r, _) = restore_within(&h, Duration::from_secs(30));
    r.expect("with the tenant stopped, the rollback succeeds");
    assert_same_tree(&h.tree_of("/home/t1/site"), &site, "the site after the rollback");
    assert_same_tree(&h.tree_of("/etc"), &etc, "the host's /etc");
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_tenant_racing_the_rollback_with_a_symlink_to_etc_changes_nothing_outside_ext4_tar() {
    a_rollback_raced_by_a_symlink_to_etc("race-ext4", "ext4", None);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_tenant_racing_the_rollback_with_a_symlink_to_etc_changes_nothing_outside_btrfs() {
    a_rollback_raced_by_a_symlink_to_etc("race-btrfs", "btrfs", None);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_tenant_racing_the_rollback_with_a_symlink_to_etc_changes_nothing_outside_btrfs_forced_tar() {
    a_rollback_raced_by_a_symlink_to_etc("race-btrfs-tar", "btrfs", TAR);
}

// 2. The permission fix-up of a restore, pointed at the host's files.

/// The tenant's script: once the rollback has deleted `canary` (the first
/// of the extra entries of `victim`; `junk`, a directory of 5000 files, is
/// next and slow to delete), swap `victim` for a symlink to `target`.
const AFTER_CANARY: &str = r#"
import os, sys, time
canary, victim, target = sys.argv[1], sys.argv[2], sys.argv[3]
while os.path.lexists(canary):
    pass
end = time.time() + 5
while time.time() < end:
    try:
        os.rename(victim, victim + ".moved")
        os.symlink(target, victim)
        break
    except OSError:
        pass
"#;

/// The tenant's world-writable directory `site/sub` is swapped for a
/// symlink to the host's `/etc` while the rollback empties it: a fix-up
/// that follows it makes `/etc` world-writable (and restores the tenant's
/// script into it).
fn the_permission_fix_up_of_a_directory_never_follows_a_symlink(name: &str, fstype: &str, force: Option<BackendKind>) {
    let h = home(name, fstype);
    h.tenants();
    h.write_mode("/home/t1/site/sub/run.sh", "#!/bin/sh\necho tenant\n", 0o755);
    h.chown("/home/t1", 2001);
    std::fs::set_permissions(h.path("/home/t1/site/sub"), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let etc = h.tree_of("/etc");
    let site = h.tree_of("/home/t1/site");
    h.take("r1", &["/home/t1/site"], force).expect("take");
    // The step (the tenant's own) left extra files in sub.
    h.as_tenant(
        2001,
        "/home/t1/site/sub",
        "python3 -c \"import os; os.mkdir('junk'); [open('junk/%05d' % i, 'w').close() for i in range(5000)]\" && touch 0canary",
    );
    let mut tenant = h.tenant(
        2001,
        "/home/t1",
        &[
            "timeout",
            "40",
            "python3",
            "-c",
            AFTER_CANARY,
            "site/sub/0canary",
            "site/sub",
            "../../../etc",
        ],
    );
    let (r, _) = restore_within(&h, Duration::from_secs(60));
    let _ = tenant.wait(Duration::from_secs(10));
    tenant.kill();
    assert_same_tree(
        &h.tree_of("/etc"),
        &etc,
        &format!(
            "the host's /etc after a rollback whose directory was swapped for a symlink to it (rollback: {})",
            outcome(&r)
        ),
    );
    let (r, _) = restore_within(&h, Duration::from_secs(30));
    r.expect("with the tenant stopped, the rollback succeeds");
    assert_same_tree(&h.tree_of("/home/t1/site"), &site, "the site after the rollback");
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn the_permission_fix_up_of_a_directory_never_follows_a_tenants_symlink_btrfs() {
    the_permission_fix_up_of_a_directory_never_follows_a_symlink("fixup-dir-btrfs", "btrfs", None);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn the_permission_fix_up_of_a_directory_never_follows_a_tenants_symlink_ext4_tar() {
    the_permission_fix_up_of_a_directory_never_follows_a_symlink("fixup-dir-ext4", "ext4", None);
}

/// The tenant keeps swapping its world-writable file `site/app.cgi` for a
/// symlink to the host's `/etc/shadow` while rollbacks put it back: a
/// fix-up that follows the symlink makes the shadow file 0777.
fn the_permission_fix_up_of_a_file_never_follows_a_symlink(name: &str, fstype: &str, force: Option<BackendKind>) {
    let h = home(name, fstype);
    h.tenants();
    h.write_mode("/home/t1/site/app.cgi", "#!/bin/sh\necho cgi\n", 0o777);
    h.chown("/home/t1", 2001);
    let shadow = h.path("/etc/shadow");
    let (mode, uid, text) = (
        perms(&shadow),
        shadow.symlink_metadata().expect("lstat").uid(),
        std::fs::read(&shadow).expect("read"),
    );
    assert_eq!(mode, 0o600);
    let etc = h.tree_of("/etc");
    h.take("r1", &["/home/t1/site"], force).expect("take");
    let site = h.tree_of("/home/t1/site");
    let mut racer = h.tenant(
        2001,
        "/home/t1/site",
        &[
            "timeout",
            "50",
            "python3",
            "-c",
            RACER,
            "app.cgi",
            "../../../etc/shadow",
        ],
    );
    assert!(
        eventually(Duration::from_secs(10), || is_symlink(&h.path("/home/t1/site/app.cgi"))),
        "the tenant's loop started: {}",
        racer.stderr()
    );
    for round in 0..50 {
        let (r, _) = restore_within(&h, Duration::from_secs(30));
        let m = shadow.symlink_metadata().expect("lstat");
        assert!(
            (perms(&shadow), m.uid(), std::fs::read(&shadow).expect("read")) == (mode, uid, text.clone()),
            "round {round}: the host's /etc/shadow is now mode {:o}, owner {} (was {mode:o}, {uid}) after a rollback raced by a tenant's symlink to it (rollback: {})",
            perms(&shadow),
            m.uid(),
            outcome(&r)
        );
    }
    racer.kill();
    assert_same_tree(&h.tree_of("/etc"), &etc, "the host's /etc");
    let (r, _) = restore_within(&h, Duration::from_secs(30));
    r.expect("with the tenant stopped, the rollback succeeds");
    assert_same_tree(&h.tree_of("/home/t1/site"), &site, "the site after the rollback");
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn the_permission_fix_up_of_a_file_never_follows_a_tenants_symlink_to_etc_shadow_btrfs() {
    the_permission_fix_up_of_a_file_never_follows_a_symlink("fixup-file-btrfs", "btrfs", None);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn the_permission_fix_up_of_a_file_never_follows_a_tenants_symlink_to_etc_shadow_ext4_tar() {
    the_permission_fix_up_of_a_file_never_follows_a_symlink("fixup-file-ext4", "ext4", None);
}

// 3. One tenant's sparse file.

/// Bytes written into the sparse image, at their offsets.
const MARKS: [(u64, &[u8]); 3] = [
    (0, b"tenant one's image starts here"),
    (4 << 30, b"four gigabytes in"),
    ((8 << 30) - 16, b"the last sixteen"),
];

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_tenants_8_gb_sparse_file_stays_sparse_and_costs_no_tenant_its_data() {
    let h = home("sparse", "ext4");
    h.tenants();
    {
        let mut f = std::fs::File::create(h.path("/home/t1/vm.img")).expect("create");
        f.set_len(8 << 30).expect("truncate");
        for (at, bytes) in MARKS {
            f.seek(SeekFrom::Start(at)).expect("seek");
            f.write_all(bytes).expect("write");
        }
    }
    h.chown("/home/t1/vm.img", 2001);
    let before = h.tree();
    let rx = h.take_in_thread("r1", &["/home"], None);
    let (r, took) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the snapshot did not finish within 60 s");
    r.expect("take");
    assert!(took < Duration::from_secs(30), "the snapshot took {took:?}");
    // The step, across every tenant.
    h.write("/home/t2/site/index.html", "defaced\n");
    std::fs::remove_dir_all(h.path("/home/t3/Maildir")).expect("rm");
    h.write("/home/t1/new.txt", "new\n");
    let (r, took) = restore_within(&h, Duration::from_secs(60));
    r.expect("restore");
    assert!(took < Duration::from_secs(30), "the rollback took {took:?}");
    assert_same_tree(&h.tree(), &before, "every tenant's files after the rollback");
    let img = h.path("/home/t1/vm.img");
    let m = img.symlink_metadata().expect("lstat");
    assert_eq!(m.len(), 8 << 30, "the image's size");
    let mut f = std::fs::File::open(&img).expect("open");
    for (at, want) in MARKS {
        let mut got = vec![0u8; want.len()];
        f.seek(SeekFrom::Start(at)).expect("seek");
        f.read_exact(&mut got).expect("read");
        assert_eq!(got, want, "the bytes at offset {at}");
    }
    assert!(
        m.blocks() * 512 < 1 << 20,
        "the image is no longer sparse: {} bytes allocated",
        m.blocks() * 512
    );
}

// 4. A full disk.

/// Pseudo-random bytes (xorshift), so they do not compress.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_rollback_that_runs_out_of_space_changes_nothing_and_succeeds_once_there_is_room() {
    let h = home("full", "ext4");
    h.tenants();
    for (t, seed) in [("t1", 1), ("t2", 2)] {
        std::fs::write(h.path(&format!("/home/{t}/site/data.bin")), noise(seed, 10 << 20)).expect("write");
    }
    h.chown("/home/t1", 2001);
    h.chown("/home/t2", 2002);
    let snapped = h.tree();
    h.take("r1", &["/home/t1", "/home/t2"], None).expect("take");
    // The step dropped the data and wrote a little; then /home filled up.
    for t in ["t1", "t2"] {
        std::fs::remove_file(h.path(&format!("/home/{t}/site/data.bin"))).expect("rm");
        h.write(&format!("/home/{t}/site/new.txt"), "new\n");
    }
    sh(&format!(
        "dd if=/dev/zero of={} bs=1M 2>/dev/null; sync",
        h.path("/home/filler").display()
    ));
    let pre = h.tree();
    let (r, _) = restore_within(&h, Duration::from_secs(60));
    let err = r.expect_err("a rollback onto a full disk fails");
    assert!(
        format!("{err:#}").to_lowercase().contains("space"),
        "the error says the disk is full: {err:#}"
    );
    assert_same_tree(&h.tree(), &pre, &format!("after a rollback that failed ({err:#})"));
    std::fs::remove_file(h.path("/home/filler")).expect("rm");
    let (r, _) = restore_within(&h, Duration::from_secs(60));
    r.expect("with room, the rollback succeeds");
    assert_same_tree(&h.tree(), &snapped, "after the rollback");
}

// 5. FIFOs, sockets, device nodes and names that are not UTF-8.

fn a_fifo_does_not_hang_the_snapshot(name: &str, fstype: &str, force: Option<BackendKind>) {
    let h = home(name, fstype);
    h.tenants();
    h.as_tenant(2001, "/home/t1/site", "mkfifo pipe");
    let before = h.tree();
    let (r, _) = take_within(&h, &["/home"], force, &["/home/t1/site/pipe"], Duration::from_secs(30));
    r.expect("take");
    std::fs::remove_file(h.path("/home/t1/site/pipe")).expect("rm");
    let (r, _) = restore_within(&h, Duration::from_secs(60));
    r.expect("restore");
    assert_same_tree(&h.tree(), &before, "after the rollback");
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_fifo_in_the_write_set_does_not_hang_the_snapshot_ext4_tar() {
    a_fifo_does_not_hang_the_snapshot("fifo-ext4", "ext4", None);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_fifo_in_the_write_set_does_not_hang_the_snapshot_btrfs() {
    a_fifo_does_not_hang_the_snapshot("fifo-btrfs", "btrfs", None);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_fifo_in_the_write_set_does_not_hang_the_snapshot_btrfs_forced_tar() {
    a_fifo_does_not_hang_the_snapshot("fifo-btrfs-tar", "btrfs", TAR);
}

fn fifos_sockets_and_devices_come_back(name: &str, fstype: &str, force: Option<BackendKind>) {
    let h = home(name, fstype);
    h.tenants();
    h.as_tenant(
        2001,
        "/home/t1/site",
        "mkfifo -m 0620 pipe && python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); s.bind(\"sock\")' && chmod 0640 sock",
    );
    // A device node only root can make: /dev/null's numbers.
    let null = h.path("/home/t1/site/null");
    nix::sys::stat::mknod(
        &null,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .expect("mknod");
    std::fs::set_permissions(&null, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let before = h.tree();
    let (r, _) = take_within(&h, &["/home"], force, &["/home/t1/site/pipe"], Duration::from_secs(30));
    r.expect("take");
    // The step removed them, and left a plain file where the FIFO was.
    for n in ["pipe", "sock", "null"] {
        std::fs::remove_file(h.path(&format!("/home/t1/site/{n}"))).expect("rm");
    }
    h.write("/home/t1/site/pipe", "a file now\n");
    let (r, _) = restore_within(&h, Duration::from_secs(60));
    r.expect("restore");
    let site = h.path("/home/t1/site");
    let ft = |n: &str| site.join(n).symlink_metadata().expect("lstat").file_type();
    assert!(ft("pipe").is_fifo(), "the FIFO is a FIFO again");
    assert!(ft("sock").is_socket(), "the socket is a socket again");
    assert!(ft("null").is_char_device(), "the device node is a device node again");
    assert_same_tree(&h.tree(), &before, "after the rollback");
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn fifos_sockets_and_device_nodes_come_back_as_themselves_ext4_tar() {
    fifos_sockets_and_devices_come_back("special-ext4", "ext4", None);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn fifos_sockets_and_device_nodes_come_back_as_themselves_btrfs() {
    fifos_sockets_and_devices_come_back("special-btrfs", "btrfs", None);
}

fn names_that_are_not_utf8_round_trip(name: &str, fstype: &str, force: Option<BackendKind>) {
    let h = home(name, fstype);
    h.tenants();
    let site = h.path("/home/t1/site");
    let at = |b: &[u8]| site.join(OsStr::from_bytes(b));
    std::fs::write(at(b"caf\xe9"), "latin-1 name\n").expect("write");
    std::fs::write(at(b"dup\xff"), "ff\n").expect("write");
    std::fs::write(at("dup\u{FFFD}".as_bytes()), "fffd\n").expect("write");
    std::fs::create_dir(at(b"d\xfe\xfe")).expect("mkdir");
    std::fs::write(at(b"d\xfe\xfe/x\x80y"), "inside\n").expect("write");
    std::os::unix::fs::symlink(OsStr::from_bytes(b"caf\xe9"), at(b"to-caf\xe9")).expect("symlink");
    h.chown("/home/t1", 2001);
    let before = h.tree();
    let (r, _) = take_within(&h, &["/home"], force, &[], Duration::from_secs(30));
    r.expect("take");
    // The step.
    std::fs::remove_file(at(b"caf\xe9")).expect("rm");
    std::fs::write(at(b"dup\xff"), "changed\n").expect("write");
    std::fs::remove_file(at("dup\u{FFFD}".as_bytes())).expect("rm");
    std::fs::remove_dir_all(at(b"d\xfe\xfe")).expect("rm");
    std::fs::remove_file(at(b"to-caf\xe9")).expect("rm");
    let (r, _) = restore_within(&h, Duration::from_secs(60));
    r.expect("restore");
    assert_eq!(std::fs::read(at(b"dup\xff")).expect("read"), b"ff\n");
    assert_eq!(std::fs::read(at("dup\u{FFFD}".as_bytes())).expect("read"), b"fffd\n");
    assert_eq!(std::fs::read(at(b"d\xfe\xfe/x\x80y")).expect("read"), b"inside\n");
    assert_same_tree(&h.tree(), &before, "after the rollback");
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn names_that_are_not_utf8_round_trip_byte_for_byte_ext4_tar() {
    names_that_are_not_utf8_round_trip("names-ext4", "ext4", None);
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn names_that_are_not_utf8_round_trip_byte_for_byte_btrfs() {
    names_that_are_not_utf8_round_trip("names-btrfs", "btrfs", None);
}

// 6. The agent's own files.

fn the_snapshot_files_are_private(name: &str, fstype: &str) {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let h = home(name, fstype);
    h.tenants();
    assert_eq!(perms(&h.state), 0o755, "the state directory the test made");
    h.take("r1", &["/home", "/etc/app"], None).expect("take");
    let snaps = h.state.join("snapshots");
    let dir = snapshot::dir(&h.state, "r1");
    assert!(dir.is_dir(), "{} exists", dir.display());
    let mut wrong = Vec::new();
    let mut stack = vec![snaps];
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

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn the_snapshot_directories_are_0700_and_their_files_0600_ext4_tar() {
    the_snapshot_files_are_private("private-ext4", "ext4");
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn the_snapshot_directories_are_0700_and_their_files_0600_btrfs() {
    the_snapshot_files_are_private("private-btrfs", "btrfs");
}

/// The listing the tests compare keeps two names that differ only in
/// invalid UTF-8 apart (a check of the helper itself).
#[test]
fn a_tree_keeps_names_byte_for_byte() {
    let h = Host::new("tree");
    std::fs::write(h.path_bytes("/tmp", b"dup\xff"), "a").expect("write");
    std::fs::write(h.path_bytes("/tmp", "dup\u{FFFD}".as_bytes()), "b").expect("write");
    let t: Vec<Node> = h.tree_of("/tmp");
    assert_eq!(t.len(), 3, "{t:?}");
    assert_ne!(t[1].path, t[2].path);
}
