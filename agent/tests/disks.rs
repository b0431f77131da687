//! The gate on a server laid out the way hosting servers are: customer data
//! on filesystems of their own (ext4, xfs, btrfs on loop devices), a FUSE
//! mount the sandbox cannot overlay, a bind mount and a symlink. Needs root
//! (loop devices, mounts, namespaces), e2fsprogs, xfsprogs, btrfs-progs and
//! bindfs; `scripts/test` installs them.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use wavegate_agent::exec::{run_step_once, run_supervised};
use wavegate_agent::journal::{Job, Journal, Mode};
use wavegate_agent::sandbox::{DryStep, StepReport};
use wavegate_agent::snapshot::{self, BackendKind, Kept};
use wavegate_proto::v1::Outcome;

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wavegate-agent"))
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A host root with its own filesystems; everything is unmounted when it
/// goes, deepest first.
struct Host {
    base: PathBuf,
    root: PathBuf,
    state: PathBuf,
    mounts: Vec<PathBuf>,
}

impl Host {
    fn new(name: &str) -> Host {
        let base = std::env::temp_dir().join(format!("wavegate-disks-{name}-{}", std::process::id()));
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!("umount -R {0}/root 2>/dev/null; rm -rf {0}", base.display()),
            ])
            .status();
        let root = base.join("root");
        for d in ["etc/app", "home", "var/lib/mysql", "srv", "tmp", "run", "dev", "proc"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        for d in ["usr", "bin", "sbin", "lib", "lib64"] {
            let machine = Path::new("/").join(d);
            match std::fs::read_link(&machine) {
                Ok(t) => std::os::unix::fs::symlink(t, root.join(d)).expect("symlink"),
                Err(_) if machine.is_dir() => std::fs::create_dir_all(root.join(d)).expect("mkdir"),
                Err(_) => {}
            }
        }
        std::fs::write(root.join("etc/app/app.conf"), "setting = 1\n").expect("write");
        let state = base.join("state");
        std::fs::create_dir_all(state.join("scratch")).expect("state");
        std::fs::create_dir_all(base.join("disks")).expect("disks");
        Host {
            base,
            root,
            state,
            mounts: Vec::new(),
        }
    }

    /// A new filesystem of `fstype` at host path `at`.
    fn disk(&mut self, at: &str, fstype: &str, mb: u64) {
        let img = self
            .base
            .join("disks")
            .join(format!("{}.img", at.trim_start_matches('/').replace('/', "-")));
        sh(&format!("truncate -s {mb}M {}", img.display()));
        let mkfs = match fstype {
            // The way xfstests makes filesystems under xfsprogs' 300 MB floor.
            "xfs" => format!("TEST_DIR=1 TEST_DEV=1 QA_CHECK_FS=1 mkfs.xfs -q -f {}", img.display()),
            "btrfs" => format!("mkfs.btrfs -q -f -M {} >/dev/null", img.display()),
            _ => format!("mkfs.ext4 -q -F {}", img.display()),
        };
        sh(&mkfs);
        let point = self.path(at);
        std::fs::create_dir_all(&point).expect("mount point");
        sh(&format!("mount -o loop {} {}", img.display(), point.display()));
        self.mounts.push(point);
    }

    /// A FUSE view of `src` at `at` (bindfs): a mount the sandbox cannot overlay.
    fn fuse(&mut self, src: &str, at: &str) {
        let point = self.path(at);
        std::fs::create_dir_all(&point).expect("mount point");
        sh(&format!("bindfs {} {}", self.path(src).display(), point.display()));
        self.mounts.push(point);
    }

    fn bind(&mut self, src: &str, at: &str) {
        let point = self.path(at);
        std::fs::create_dir_all(&point).expect("mount point");
        sh(&format!(
            "mount --bind {} {}",
            self.path(src).display(),
            point.display()
        ));
        self.mounts.push(point);
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    fn write(&self, p: &str, text: &str) {
        let full = self.path(p);
        std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
        std::fs::write(full, text).expect("write");
    }

    /// Every path under the root with its bytes, mode and owner (wavegate's
    /// own snapshot directories left out).
    fn tree(&self) -> Vec<(String, Vec<u8>, u32, u32)> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
                let p = e.path();
                let m = p.symlink_metadata().expect("meta");
                let rel = p.strip_prefix(&self.root).expect("rel").display().to_string();
                if ["usr", "bin", "sbin", "lib", "lib64", "dev", "proc"].contains(&rel.as_str())
                    || rel.ends_with(".wavegate-snapshots")
                {
                    continue;
                }
                if m.is_dir() {
                    out.push((rel, Vec::new(), m.mode(), m.uid()));
                    stack.push(p);
                } else if m.file_type().is_symlink() {
                    let t = std::fs::read_link(&p).expect("link").display().to_string();
                    out.push((rel, t.into_bytes(), m.mode(), m.uid()));
                } else {
                    out.push((rel, std::fs::read(&p).expect("read"), m.mode(), m.uid()));
                }
            }
        }
        out.sort();
        out
    }

    async fn dry_run(&self, run: &str, writes: &[&str], max_deletions: u64, untouchable: &[&str]) -> StepReport {
        let mut job = Job::new("dry", "", 0, &self.root, Mode::DryRun);
        job.steps = vec![DryStep {
            name: "step".into(),
            run: run.into(),
            writes: writes.iter().map(|w| (*w).to_owned()).collect(),
            max_deletions,
            timeout_ms: 20_000,
            allow_failure: None,
            ..DryStep::default()
        }];
        job.untouchable = untouchable.iter().map(|w| (*w).to_owned()).collect();
        let r = run_supervised(&exe(), &self.state.join("scratch"), &job)
            .await
            .expect("dry-run");
        assert!(!r.report.is_empty(), "no report: {}", r.detail);
        let mut reports: Vec<StepReport> = serde_json::from_str(&r.report).expect("report");
        reports.remove(0)
    }

    async fn confined(&self, id: &str, run: &str, writes: &[&str]) -> wavegate_agent::journal::Stored {
        let journal = Journal::open(&self.state).expect("journal");
        let mut job = Job::new(id, run, 20_000, &self.root, Mode::Confined);
        job.writes = writes.iter().map(|w| (*w).to_owned()).collect();
        run_step_once(&exe(), &journal, job).await.expect("run").0
    }

    fn take(&self, rollout: &str, writes: &[&str], force: Option<BackendKind>) -> snapshot::Manifest {
        let writes: Vec<String> = writes.iter().map(|w| (*w).to_owned()).collect();
        snapshot::take(&snapshot::Request {
            state_dir: &self.state,
            host: "h1",
            root: &self.root,
            rollout,
            writes: &writes,
            untouchable: &[],
            force,
        })
        .expect("take")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg(m).status();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }
}

fn customers(h: &Host, base: &str) {
    for c in ["acme", "bluefin", "corvid"] {
        h.write(
            &format!("{base}/{c}/public_html/index.html"),
            &format!("<h1>{c}</h1>\n"),
        );
        h.write(&format!("{base}/{c}/Maildir/cur/1.eml"), &format!("From: client@{c}\n"));
    }
}

fn output(r: &wavegate_agent::journal::Stored) -> String {
    String::from_utf8_lossy(&r.output_tail).into_owned()
}

/// Before: the sandbox overlaid the root only, a separately mounted /home
/// showed up empty, and this step counted 0 deletions.
#[tokio::test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
async fn the_dry_run_sees_and_counts_deletions_on_every_mounted_filesystem() {
    let mut h = Host::new("every-mount");
    h.disk("/home", "ext4", 64);
    h.disk("/var/lib/mysql", "xfs", 64);
    customers(&h, "/home");
    // A mount inside a mount.
    h.disk("/home/big", "ext4", 64);
    h.write("/home/big/archive/2011.tar", "old mail\n");
    h.write("/var/lib/mysql/shop/orders.ibd", "orders\n");
    h.write("/var/lib/mysql/shop/customers.ibd", "customers\n");
    let before = h.tree();
    let r = h
        .dry_run(
            "d=/ho; rm -rf ${d}me/*/*; rm -f /var/lib/mysql/shop/*; echo 2 > /etc/app/app.conf",
            &["/etc/app"],
            0,
            &[],
        )
        .await;
    assert!(r.blocked, "{r:#?}");
    // Six customer files, the archive on the nested mount, two tables.
    assert_eq!(r.outside_deleted.count, 9, "{r:#?}");
    let sample = r.outside_deleted.sample.join(" ");
    for p in ["/home/acme", "/home/big/archive", "/var/lib/mysql/shop/orders.ibd"] {
        assert!(sample.contains(p), "{p} is named: {sample}");
    }
    assert!(r.modified.sample.contains(&"/etc/app/app.conf".to_owned()), "{r:#?}");
    assert_eq!(h.tree(), before, "a dry-run changed a file on some filesystem");

    // Inside its write set and budget, on the xfs database, it passes.
    let r = h
        .dry_run("rm -f /var/lib/mysql/shop/orders.ibd", &["/var/lib/mysql/shop"], 1, &[])
        .await;
    assert!(!r.blocked, "{r:#?}");
    assert_eq!((r.deleted.count, r.outside.count), (1, 0), "{r:#?}");
}

#[tokio::test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
async fn a_mount_the_sandbox_cannot_overlay_blocks_every_step_that_reaches_it() {
    let mut h = Host::new("fuse");
    h.write("/srv/export/shared.txt", "shared\n");
    h.fuse("/srv/export", "/srv/share");
    for writes in [&["/srv/share"][..], &["/srv"][..], &["/srv/share/sub"][..]] {
        let r = h.dry_run("true", writes, 0, &[]).await;
        assert!(r.blocked, "{writes:?}: {r:#?}");
        let why = r.reasons.join(" ");
        assert!(
            why.contains("/srv/share") && why.contains("FUSE"),
            "the mount is named: {why}"
        );
    }
    // A step whose write set does not reach it runs, and sees the mount
    // read-only.
    let r = h
        .dry_run(
            "cat /srv/share/shared.txt && ! touch /srv/share/x",
            &["/etc/app"],
            0,
            &[],
        )
        .await;
    assert!(!r.blocked, "{r:#?}");
    assert_eq!(r.exit_code, 0, "{r:#?}");
    // Listed as untouchable, it is read-only and blocks nothing.
    let r = h.dry_run("! touch /srv/share/x", &["/srv"], 0, &["/srv/share"]).await;
    assert!(!r.blocked, "{r:#?}");
    assert_eq!(r.exit_code, 0, "{r:#?}");
    // The real run refuses the write set that reaches it.
    let res = h.confined("fuse-real", "touch /srv/share/x", &["/srv/share"]).await;
    assert_eq!(res.outcome, Outcome::Refused as i32, "{}", res.detail);
    assert!(res.detail.contains("/srv/share"), "{}", res.detail);
    assert!(!h.path("/srv/export/x").exists());
}

#[tokio::test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
async fn a_confined_run_is_read_only_on_every_filesystem_but_its_write_set() {
    let mut h = Host::new("confined");
    h.disk("/home", "ext4", 64);
    h.disk("/var/lib/mysql", "xfs", 64);
    customers(&h, "/home");
    h.write("/var/lib/mysql/shop/orders.ibd", "orders\n");
    let before = h.tree();
    let res = h
        .confined("undeclared", "echo x > /var/lib/mysql/shop/orders.ibd", &["/etc/app"])
        .await;
    assert_eq!(res.outcome, Outcome::Failed as i32);
    assert!(output(&res).contains("Read-only file system"), "{}", output(&res));
    let res = h.confined("home", "rm -rf /home/acme", &["/var/lib/mysql"]).await;
    assert_eq!(res.outcome, Outcome::Failed as i32);
    assert!(output(&res).contains("Read-only file system"), "{}", output(&res));
    assert_eq!(h.tree(), before, "nothing outside the write sets changed");
    let res = h
        .confined(
            "declared",
            "echo v2 > /var/lib/mysql/shop/orders.ibd",
            &["/var/lib/mysql"],
        )
        .await;
    assert_eq!(res.outcome, Outcome::Ok as i32, "{} {}", res.detail, output(&res));
    assert_eq!(
        std::fs::read_to_string(h.path("/var/lib/mysql/shop/orders.ibd")).expect("read"),
        "v2\n"
    );
}

#[tokio::test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
async fn a_write_set_reached_through_a_bind_mount_or_a_symlink_is_refused() {
    let mut h = Host::new("alias");
    h.disk("/home", "ext4", 64);
    customers(&h, "/home");
    h.bind("/home/acme/public_html", "/srv/www");
    std::os::unix::fs::symlink("/home/bluefin", h.path("/etc/site")).expect("symlink");
    let r = h.dry_run("true", &["/srv/www"], 0, &[]).await;
    assert!(r.blocked, "{r:#?}");
    assert!(
        r.reasons.join(" ").contains("/home/acme/public_html"),
        "the alias is named: {:?}",
        r.reasons
    );
    let res = h
        .confined("bind", "echo hacked > /srv/www/index.html", &["/srv/www"])
        .await;
    assert_eq!(res.outcome, Outcome::Refused as i32, "{}", res.detail);
    let res = h.confined("link", "echo hacked > /etc/site/x", &["/etc/site"]).await;
    assert_eq!(res.outcome, Outcome::Refused as i32, "{}", res.detail);
    assert!(res.detail.contains("symlink"), "{}", res.detail);
    assert_eq!(
        std::fs::read_to_string(h.path("/home/acme/public_html/index.html")).expect("read"),
        "<h1>acme</h1>\n"
    );
    assert!(!h.path("/home/bluefin/x").exists());
    // Declaring both names of the same files is fine.
    let r = h.dry_run("true", &["/srv/www", "/home/acme/public_html"], 0, &[]).await;
    assert!(!r.blocked, "{r:#?}");
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_write_set_across_filesystems_is_snapshotted_per_filesystem_and_restored_byte_for_byte() {
    let mut h = Host::new("snap-tar");
    h.disk("/home", "ext4", 64);
    h.disk("/var/lib/mysql", "xfs", 64);
    customers(&h, "/home");
    h.write("/var/lib/mysql/shop/orders.ibd", "orders\n");
    h.write("/var/log/app.log", "log\n");
    std::fs::set_permissions(h.path("/home/acme/Maildir"), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let before = h.tree();
    let m = h.take("r1", &["/etc/app", "/home/acme", "/var", "/etc/new"], None);
    let mounts: Vec<(&str, BackendKind)> = m.parts.iter().map(|p| (p.mount.as_str(), p.backend)).collect();
    assert_eq!(
        mounts,
        [
            ("/", BackendKind::TarZstd),
            ("/home", BackendKind::TarZstd),
            ("/var/lib/mysql", BackendKind::TarZstd)
        ],
        "{m:#?}"
    );
    assert!(
        m.parts[0].skip.contains(&"/var/lib/mysql".to_owned()),
        "{:?}",
        m.parts[0].skip
    );
    // The step: across all three filesystems, including the mount points'
    // own contents.
    std::fs::remove_dir_all(h.path("/home/acme/public_html")).expect("rm");
    std::fs::write(h.path("/home/acme/new"), "x").expect("write");
    std::fs::remove_dir_all(h.path("/var/lib/mysql/shop")).expect("rm");
    std::fs::write(h.path("/var/lib/mysql/ibdata1"), "x").expect("write");
    std::fs::write(h.path("/var/log/app.log"), "changed").expect("write");
    std::fs::create_dir_all(h.path("/etc/new/sub")).expect("mkdir");
    std::fs::write(h.path("/etc/app/app.conf"), "setting = 2\n").expect("write");
    snapshot::restore(&h.state, "h1", &h.root, "r1").expect("restore");
    assert_eq!(h.tree(), before, "the restore is not exact");
    assert!(h.path("/var/lib/mysql").is_dir(), "the mount point stays");
}

fn subvolume_id(h: &Host, at: &str) -> String {
    let out = Command::new("btrfs")
        .args(["subvolume", "show"])
        .arg(h.path(at))
        .output()
        .expect("btrfs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Subvolume ID:").map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

fn btrfs_subvolume(h: &Host, at: &str) {
    sh(&format!("btrfs -q subvolume create {}", h.path(at).display()));
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_btrfs_subvolume_gets_a_read_only_snapshot_that_restores_byte_for_byte() {
    let mut h = Host::new("snap-btrfs");
    h.disk("/home", "btrfs", 256);
    customers(&h, "/home");
    h.write("/home/t1/tmp/cache-1", "cache\n");
    btrfs_subvolume(&h, "/home/t2");
    h.write("/home/t2/site/index.php", "<?php echo 1;\n");
    // A subvolume inside a write path: a part of its own.
    btrfs_subvolume(&h, "/home/t2/db");
    h.write("/home/t2/db/data", "rows\n");
    std::os::unix::fs::symlink("site/index.php", h.path("/home/t2/latest")).expect("symlink");
    let before = h.tree();
    let m = h.take("r2", &["/home/t1/tmp", "/home/t2", "/etc/app"], None);
    let parts: Vec<(&str, BackendKind, Vec<&String>)> = m
        .parts
        .iter()
        .map(|p| (p.mount.as_str(), p.backend, p.roots.keys().collect()))
        .collect();
    assert_eq!(parts.len(), 4, "{parts:?}");
    let backends: Vec<BackendKind> = m.parts.iter().map(|p| p.backend).collect();
    assert_eq!(
        backends.iter().filter(|b| **b == BackendKind::Btrfs).count(),
        3,
        "/home, /home/t2 and /home/t2/db are subvolumes: {parts:?}"
    );
    let roots: Vec<String> = m.parts.iter().flat_map(|p| p.roots.keys().cloned()).collect();
    assert!(roots.contains(&"/home/t2/db".to_owned()), "{roots:?}");
    for p in m.parts.iter().filter(|p| p.backend == BackendKind::Btrfs) {
        let Some(Kept::Btrfs(b)) = p.kept.as_ref() else {
            panic!("btrfs record")
        };
        assert!(b.generation > 0 && !b.uuid.is_empty(), "{b:?}");
        assert!(h.path(&b.snapshot).is_dir(), "{} exists", b.snapshot);
    }
    // The step.
    std::fs::remove_file(h.path("/home/t1/tmp/cache-1")).expect("rm");
    std::fs::write(h.path("/home/t1/tmp/cache-2"), "new").expect("write");
    std::fs::write(h.path("/home/t2/site/index.php"), "<?php broken").expect("write");
    std::fs::set_permissions(h.path("/home/t2/site"), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::fs::remove_file(h.path("/home/t2/latest")).expect("rm");
    std::fs::write(h.path("/home/t2/db/data"), "dropped").expect("write");
    // And something outside the write set that the restore must not touch.
    std::fs::write(h.path("/home/acme/public_html/index.html"), "edited by its owner\n").expect("write");
    let untouched = std::fs::read(h.path("/home/acme/public_html/index.html")).expect("read");
    let (home_id, t2_id) = (subvolume_id(&h, "/home"), subvolume_id(&h, "/home/t2"));
    snapshot::restore(&h.state, "h1", &h.root, "r2").expect("restore");
    assert_eq!(
        subvolume_id(&h, "/home"),
        home_id,
        "a mounted subvolume is restored in place"
    );
    assert_ne!(
        subvolume_id(&h, "/home/t2"),
        t2_id,
        "a whole subvolume that is not a mount point is swapped for a copy of its snapshot"
    );
    let mut expected = before.clone();
    for e in expected.iter_mut() {
        if e.0 == "home/acme/public_html/index.html" {
            e.1 = untouched.clone();
        }
    }
    assert_eq!(h.tree(), expected, "the restore is not exact");
    // Released, the snapshot subvolumes are gone.
    snapshot::release(&h.state, &h.root, "r2").expect("release");
    for p in m.parts.iter().filter_map(|p| match &p.kept {
        Some(Kept::Btrfs(b)) => Some(b),
        _ => None,
    }) {
        assert!(!h.path(&p.snapshot).exists(), "{} released", p.snapshot);
    }
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_btrfs_snapshot_that_was_written_to_fails_verification() {
    let mut h = Host::new("snap-btrfs-verify");
    h.disk("/home", "btrfs", 256);
    customers(&h, "/home");
    // Two snapshots of one subvolume, then its files change: btrfs moves
    // the second one's root generation on its own, which must not count as
    // tampering.
    h.take("r3-first", &["/home/acme"], None);
    let m = h.take("r3", &["/home/acme"], None);
    std::fs::remove_dir_all(h.path("/home/bluefin")).expect("rm");
    std::fs::write(h.path("/home/acme/public_html/index.html"), "changed\n").expect("write");
    sh("sync");
    snapshot::restore(&h.state, "h1", &h.root, "r3").expect("an untouched snapshot verifies");
    assert_eq!(
        std::fs::read_to_string(h.path("/home/acme/public_html/index.html")).expect("read"),
        "<h1>acme</h1>\n"
    );
    let Some(Kept::Btrfs(b)) = m.parts[0].kept.clone() else {
        panic!("btrfs")
    };
    let snap = h.path(&b.snapshot);
    sh(&format!("btrfs property set -ts {} ro false", snap.display()));
    std::fs::write(snap.join("acme/planted"), "x").expect("write");
    sh("sync");
    sh(&format!("btrfs property set -ts {} ro true", snap.display()));
    let err = snapshot::restore(&h.state, "h1", &h.root, "r3").expect_err("a tampered snapshot is refused");
    assert!(format!("{err:#}").contains("written to"), "{err:#}");
}

#[tokio::test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
async fn a_site_can_force_tar_and_a_confined_step_cannot_touch_btrfs_snapshots() {
    let mut h = Host::new("force-tar");
    h.disk("/home", "btrfs", 256);
    customers(&h, "/home");
    let before = h.tree();
    let m = h.take("r4", &["/home/acme"], Some(BackendKind::TarZstd));
    assert_eq!(m.parts[0].backend, BackendKind::TarZstd);
    assert!(m.parts[0].note.contains("forced"), "{}", m.parts[0].note);
    let m = h.take("r5", &["/home"], None);
    assert_eq!(m.parts[0].backend, BackendKind::Btrfs);
    let res = h
        .confined(
            "wipe",
            "rm -rf /home/.wavegate-snapshots/*/acme; s=$?; rm -rf /home/acme; exit $s",
            &["/home"],
        )
        .await;
    assert_eq!(res.outcome, Outcome::Failed as i32, "{}", output(&res));
    assert!(output(&res).contains("Read-only file system"), "{}", output(&res));
    assert!(!h.path("/home/acme").exists(), "the write set was writable");
    snapshot::restore(&h.state, "h1", &h.root, "r5").expect("the snapshot survived the step");
    assert_eq!(h.tree(), before);
}
