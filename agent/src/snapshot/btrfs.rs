//! The btrfs backend: a read-only snapshot of the subvolume that holds the
//! part's paths, made by btrfs-progs (`btrfs subvolume snapshot -r`) in a
//! `.wavegate-snapshots` subvolume beside the data, the way snapper keeps
//! `.snapshots`. Taking it costs no copy; it is verified by the filesystem
//! (it exists, is read-only, comes from the subvolume it should, and its
//! generation has not moved), not by reading every byte.
//!
//! A restore of a whole subvolume that is not a mount point swaps a
//! writable snapshot of the snapshot into its place: one step, whatever its
//! size. Otherwise (a mount point, or paths inside a subvolume) it puts
//! back only what differs: a snapshot keeps each file's inode number and
//! change time, and any change to a live file moves its change time, so a
//! file whose inode and change time both match its snapshot copy is
//! unchanged and is left alone. Everything else is removed, or put back as
//! a reflink of the snapshot's data (no bytes are copied), with its owner,
//! mode, times and extended attributes.

use std::ffi::OsString;
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

use super::fsx::{self, RawPath};
use super::stage::{Builder, Restore};
use super::{Backend, BtrfsInfo, Kept, Kind, Part, host_path, walk_part};
use crate::mountinfo::HostMount;

/// The subvolume beside the data that holds wavegate's snapshots of it.
pub const SNAPSHOT_DIR: &str = ".wavegate-snapshots";

/// The btrfs backend.
pub struct Btrfs;

/// Whether btrfs-progs is installed.
pub fn available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        Command::new("btrfs")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn btrfs(args: &[&str], path: &Path) -> Result<String> {
    btrfs_os(args, path.as_os_str())
}

fn btrfs_os(args: &[&str], path: &std::ffi::OsStr) -> Result<String> {
    let out = Command::new("btrfs")
        .args(args)
        .arg(path)
        .output()
        .context("running btrfs (btrfs-progs)")?;
    if !out.status.success() {
        bail!(
            "`btrfs {} {}` failed: {}",
            args.join(" "),
            path.to_string_lossy(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What `btrfs subvolume show` says of a subvolume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Show {
    /// Its UUID.
    pub uuid: String,
    /// The UUID of the subvolume it is a snapshot of (`-` when none).
    pub parent_uuid: String,
    /// Its generation.
    pub generation: u64,
    /// The transaction it was made in.
    pub created_gen: u64,
    /// Whether it is read-only.
    pub readonly: bool,
}

/// Parse the output of `btrfs subvolume show`.
pub fn parse_show(text: &str) -> Show {
    let mut s = Show::default();
    for line in text.lines() {
        let Some((k, v)) = line.trim().split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.trim() {
            "UUID" => s.uuid = v.to_owned(),
            "Parent UUID" => s.parent_uuid = v.to_owned(),
            "Generation" => s.generation = v.parse().unwrap_or(0),
            "Gen at creation" => s.created_gen = v.parse().unwrap_or(0),
            "Flags" => s.readonly = v.split_whitespace().any(|f| f == "readonly"),
            _ => {}
        }
    }
    s
}

fn show(path: &Path) -> Result<Show> {
    Ok(parse_show(&btrfs(&["subvolume", "show"], path)?))
}

/// The host path of the btrfs subvolume holding `path` (or the nearest of
/// its parents that exists), when that subvolume's root is under the host
/// root: a snapshot can only be taken of a whole subvolume.
pub fn subvolume_of(root: &Path, path: &str) -> Option<String> {
    let mut p = path.to_owned();
    while host_path(root, &p).symlink_metadata().is_err() {
        p = parent(&p)?;
    }
    let dev = host_path(root, &p).symlink_metadata().ok()?.dev();
    while p != "/" {
        let up = parent(&p)?;
        if host_path(root, &up).symlink_metadata().ok()?.dev() != dev {
            break;
        }
        p = up;
    }
    // Every subvolume's root directory is inode 256 (BTRFS_FIRST_FREE_OBJECTID).
    (host_path(root, &p).symlink_metadata().ok()?.ino() == 256).then_some(p)
}

fn parent(p: &str) -> Option<String> {
    if p == "/" {
        return None;
    }
    Some(match p.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) | None => "/".to_owned(),
        Some((head, _)) => head.to_owned(),
    })
}

/// The part's snapshot record, when it has one.
fn record(part: &Part) -> Option<&BtrfsInfo> {
    match &part.kept {
        Some(Kept::Btrfs(b)) => Some(b),
        _ => None,
    }
}

fn info(part: &Part) -> Result<&BtrfsInfo> {
    record(part).context("a btrfs part without its snapshot record")
}

/// `dir`'s name `name` as a path another process can use: through the
/// directory's handle, never its path.
fn at_fd(dir: BorrowedFd<'_>, name: &[u8]) -> OsString {
    let mut p = fsx::proc_path(dir).into_os_string();
    p.push("/");
    p.push(std::ffi::OsStr::from_bytes(name));
    p
}

/// Delete the subvolume `name` in `dir` by its id, through `anchor` (a
/// path of the same filesystem that only root controls: the mount).
///
/// Never by its path: `btrfs subvolume delete PATH` resolves PATH with
/// realpath(3), which reads a `/proc/self/fd` link as text and walks that
/// text again, following any link a tenant swapped in. `inspect-internal
/// rootid` only opens the path, which goes through the handle itself.
pub fn delete_subvolume_at(dir: BorrowedFd<'_>, name: &[u8], anchor: &Path) -> Result<()> {
    let Some(node) = fsx::open_child(dir, name)? else {
        return Ok(());
    };
    if node.kind() != Kind::Dir || node.stat.st_ino != 256 || !fsx::is_btrfs(node.fd.as_fd()) {
        bail!("{} is not a btrfs subvolume; not deleting it", RawPath(name.to_vec()));
    }
    let id: u64 = btrfs_os(
        &["inspect-internal", "rootid"],
        fsx::proc_path(node.fd.as_fd()).as_os_str(),
    )?
    .trim()
    .parse()
    .context("reading a subvolume's id")?;
    if id <= 5 {
        bail!("refusing to delete the top-level subvolume");
    }
    let out = Command::new("btrfs")
        .args(["subvolume", "delete", "--subvolid", &id.to_string()])
        .arg(anchor)
        .output()
        .context("running btrfs (btrfs-progs)")?;
    if !out.status.success() {
        bail!(
            "`btrfs subvolume delete --subvolid {id} {}` failed: {}",
            anchor.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn anchor(root: &Path, part: &Part) -> PathBuf {
    host_path(root, &part.mount)
}

/// The holder of a subvolume's snapshots, opened and checked: a directory
/// of its own subvolume, owned by root, 0700. A tenant who owns the
/// subvolume's top directory can make a `.wavegate-snapshots` of their own
/// there: that one is refused.
fn holder(sub: BorrowedFd<'_>, create: bool) -> Result<Option<OwnedFd>> {
    let mut node = fsx::open_child(sub, SNAPSHOT_DIR.as_bytes())?;
    if node.is_none() {
        if !create {
            return Ok(None);
        }
        btrfs_os(&["subvolume", "create"], &at_fd(sub, SNAPSHOT_DIR.as_bytes()))?;
        node = fsx::open_child(sub, SNAPSHOT_DIR.as_bytes())?;
    }
    let n = node.context("the snapshot holder vanished as it was made")?;
    if n.kind() != Kind::Dir || n.stat.st_ino != 256 || n.stat.st_uid != 0 {
        bail!(
            "{SNAPSHOT_DIR} here is not the agent's (not a root-owned subvolume); refusing to use it: remove it and retry"
        );
    }
    let fd = OwnedFd::from(n.reopen()?);
    rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o700))?;
    Ok(Some(fd))
}

/// The snapshot of a part, opened without following anything.
fn open_snap(root: &Path, b: &BtrfsInfo) -> Result<Option<OwnedFd>> {
    let root_fd = fsx::open_dir(root)?;
    fsx::open_beneath(root_fd.as_fd(), b.snapshot.as_bytes(), true)
}

impl Backend for Btrfs {
    fn claim(&self, root: &Path, home: &HostMount, path: &str) -> Option<Result<String, String>> {
        if home.mount.fstype != "btrfs" {
            return None;
        }
        if !available() {
            return Some(Err("btrfs-progs is not installed on this host; tar+zstd used".into()));
        }
        Some(
            subvolume_of(root, path)
                .ok_or_else(|| "the subvolume holding it is not visible under the host root; tar+zstd used".to_owned()),
        )
    }

    fn init(&self, part: &mut Part, key: &str) {
        part.kept = Some(Kept::Btrfs(BtrfsInfo {
            subvolume: key.to_owned(),
            snapshot: String::new(),
            uuid: String::new(),
            parent_uuid: String::new(),
            generation: 0,
            created_gen: 0,
            tree_sha256: String::new(),
        }));
    }

    fn prepare(&self, part: &mut Part, index: usize, rollout: &str) {
        if let Some(Kept::Btrfs(b)) = part.kept.as_mut() {
            b.snapshot = format!(
                "{}/{}/{}-{index}",
                b.subvolume.trim_end_matches('/'),
                SNAPSHOT_DIR,
                super::safe_name(rollout)
            );
        }
    }

    fn own_paths(&self, part: &Part) -> Vec<String> {
        record(part)
            .iter()
            .map(|b| format!("{}/{}", b.subvolume.trim_end_matches('/'), SNAPSHOT_DIR))
            .collect()
    }

    fn can_restore_whole(&self, root: &Path, part: &Part) -> Result<bool> {
        swappable_whole(root, part)
    }

    fn take(&self, root: &Path, _dir: &Path, part: &mut Part) -> Result<Vec<String>> {
        let b = info(part)?.clone();
        let root_fd = fsx::open_dir(root)?;
        let sub = fsx::open_beneath(root_fd.as_fd(), b.subvolume.as_bytes(), true)?
            .with_context(|| format!("the subvolume {} is gone", b.subvolume))?;
        let hold = holder(sub.as_fd(), true)?.context("no snapshot holder")?;
        let name = b.snapshot.rsplit('/').next().unwrap_or_default().to_owned();
        if fsx::open_child(hold.as_fd(), name.as_bytes())?.is_some() {
            // Left by a take that was interrupted: it is not ours to trust.
            delete_subvolume_at(hold.as_fd(), name.as_bytes(), &anchor(root, part))?;
        }
        let out = Command::new("btrfs")
            .args(["subvolume", "snapshot", "-r"])
            .arg(fsx::proc_path(sub.as_fd()))
            .arg(at_fd(hold.as_fd(), name.as_bytes()))
            .output()
            .context("running btrfs (btrfs-progs)")?;
        if !out.status.success() {
            bail!(
                "`btrfs subvolume snapshot -r {} {}` failed: {}",
                b.subvolume,
                b.snapshot,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let result = (|| {
            let snap_fd = fsx::open_child(hold.as_fd(), name.as_bytes())?
                .context("the new snapshot is gone")?
                .reopen()?;
            let snap = fsx::proc_path(snap_fd.as_fd());
            let s = show(&snap)?;
            let src = show(&fsx::proc_path(sub.as_fd()))?;
            if !s.readonly {
                bail!("the new snapshot {} is not read-only", b.snapshot);
            }
            if s.parent_uuid != src.uuid {
                bail!(
                    "the new snapshot {} does not come from {} (parent {}, expected {})",
                    b.snapshot,
                    b.subvolume,
                    s.parent_uuid,
                    src.uuid
                );
            }
            let roots: Vec<String> = part.roots.keys().cloned().collect();
            let mut entries = Vec::new();
            let walked = walk_part(snap_fd.as_fd(), &b.subvolume, &roots, &part.skip, &mut |e, _| {
                entries.push(e);
                Ok(())
            })?;
            part.alloc = walked.alloc;
            let found = walked.boundaries;
            part.skip.extend(found.iter().cloned());
            part.skip.sort();
            part.skip.dedup();
            // What the walk found below as boundaries is not in the part.
            entries.retain(|e| !found.iter().any(|f| fsx::within(e.path.as_bytes(), f.as_bytes())));
            entries.sort_by(|a, b| a.path.cmp(&b.path));
            part.entries = entries;
            part.kept = Some(Kept::Btrfs(BtrfsInfo {
                uuid: s.uuid,
                parent_uuid: s.parent_uuid,
                generation: s.generation,
                created_gen: s.created_gen,
                tree_sha256: tree_digest(&snap, &b.subvolume, &roots, &part.skip)?,
                ..b.clone()
            }));
            // Its tree was read just now; the flags say it stays that way.
            flags(root, part)?;
            Ok(found)
        })();
        if result.is_err() {
            let _ = delete_subvolume_at(hold.as_fd(), name.as_bytes(), &anchor(root, part));
        }
        result
    }

    fn verify(&self, root: &Path, _dir: &Path, part: &Part) -> Result<()> {
        flags(root, part)?;
        let b = info(part)?;
        let snap_fd = open_snap(root, b)?.with_context(|| format!("the snapshot {} is gone", b.snapshot))?;
        let roots: Vec<String> = part.roots.keys().cloned().collect();
        if tree_digest(&fsx::proc_path(snap_fd.as_fd()), &b.subvolume, &roots, &part.skip)? != b.tree_sha256 {
            bail!(
                "the snapshot {} was written to after it was taken (its files' inodes or change times moved)",
                b.snapshot
            );
        }
        Ok(())
    }

    fn check_before_restore(&self, root: &Path, dir: &Path, part: &Part) -> Result<()> {
        self.verify(root, dir, part)
    }

    fn restore_whole(&self, root: &Path, part: &Part) -> Result<bool> {
        let b = info(part)?;
        let Some(nested) = swappable(root, part, b)? else {
            return Ok(false);
        };
        swap(root, part, b, &nested)?;
        Ok(true)
    }

    fn keep_unchanged(&self, root: &Path, part: &Part, r: &mut Restore<'_>, i: usize) -> Result<()> {
        let b = info(part)?;
        let snap_fd = open_snap(root, b)?.with_context(|| format!("the snapshot {} is gone", b.snapshot))?;
        let root_fd = fsx::open_dir(root)?;
        let rest = |u: &RawPath| -> Vec<u8> {
            u.as_bytes()
                .strip_prefix(fsx::raw(b.subvolume.trim_end_matches('/')).as_slice())
                .unwrap_or(u.as_bytes())
                .to_vec()
        };
        let same = |u: &RawPath| -> Result<bool> {
            let (Some(s), Some(l)) = (
                fsx::node_at(snap_fd.as_fd(), &rest(u))?,
                fsx::node_at(root_fd.as_fd(), u.as_bytes())?,
            ) else {
                return Ok(false);
            };
            Ok(fsx::inodes(s, u.clone(), &part.skip)? == fsx::inodes(l, u.clone(), &part.skip)?)
        };
        // The same directory (a snapshot keeps inode numbers) with only
        // what is in it changed.
        let same_dir = |u: &RawPath| -> Result<bool> {
            let (Some(s), Some(l)) = (
                fsx::node_at(snap_fd.as_fd(), &rest(u))?,
                fsx::node_at(root_fd.as_fd(), u.as_bytes())?,
            ) else {
                return Ok(false);
            };
            Ok(s.kind() == Kind::Dir && l.kind() == Kind::Dir && s.stat.st_ino == l.stat.st_ino)
        };
        r.keep_unchanged(i, &same, &same_dir)
    }

    fn restore_bytes(&self, _part: &Part) -> u64 {
        // Files come back as reflinks of the snapshot's data: no bytes.
        0
    }

    fn build(&self, root: &Path, _dir: &Path, part: &Part, bld: &mut Builder<'_>) -> Result<()> {
        let b = info(part)?;
        let snap_fd = open_snap(root, b)?.with_context(|| format!("the snapshot {} is gone", b.snapshot))?;
        let roots: Vec<String> = part.roots.keys().cloned().collect();
        walk_part(snap_fd.as_fd(), &b.subvolume, &roots, &part.skip, &mut |e, f| {
            if bld.unchanged(&e.path) {
                return Ok(());
            }
            let file = e.kind == Kind::File;
            bld.entry(e)?;
            if file {
                bld.clone_from(f.context("a file without a handle")?)?;
                bld.end_file(false)?;
            }
            Ok(())
        })?;
        Ok(())
    }

    fn release(&self, root: &Path, _dir: &Path, part: &Part) -> Result<()> {
        let b = info(part)?;
        let root_fd = fsx::open_dir(root)?;
        let Some((holder_path, name)) = b.snapshot.rsplit_once('/') else {
            return Ok(());
        };
        let Some(hold) = fsx::open_beneath(root_fd.as_fd(), holder_path.as_bytes(), true)? else {
            return Ok(());
        };
        let st = rustix::fs::fstat(&hold)?;
        if st.st_uid != 0 || st.st_ino != 256 {
            bail!("{holder_path} is not the agent's snapshot holder; not deleting anything in it");
        }
        if fsx::open_child(hold.as_fd(), name.as_bytes())?.is_some() {
            delete_subvolume_at(hold.as_fd(), name.as_bytes(), &anchor(root, part))?;
        }
        Ok(())
    }
}

/// The snapshot is there, read-only, and the one that was taken: its UUID,
/// its parent's and the transaction it was made in.
fn flags(root: &Path, part: &Part) -> Result<()> {
    let b = info(part)?;
    let Some(fd) = open_snap(root, b)? else {
        bail!("the snapshot {} is gone", b.snapshot);
    };
    let s = show(&fsx::proc_path(fd.as_fd()))?;
    if !s.readonly {
        bail!("the snapshot {} is no longer read-only", b.snapshot);
    }
    if s.uuid != b.uuid || s.parent_uuid != b.parent_uuid {
        bail!(
            "{} is not the snapshot that was taken (uuid {}, parent {}; expected {}, parent {})",
            b.snapshot,
            s.uuid,
            s.parent_uuid,
            b.uuid,
            b.parent_uuid
        );
    }
    if s.created_gen != b.created_gen {
        bail!(
            "{} is not the snapshot that was taken (made in transaction {}, expected {})",
            b.snapshot,
            s.created_gen,
            b.created_gen
        );
    }
    Ok(())
}

/// SHA-256 over every inode under `roots` in a snapshot (reached through
/// `snap`, a `/proc/self/fd` path of its handle, showing host path
/// `prefix`), leaving out `skip`: path, inode number, change time (to the
/// nanosecond), mode, owner, size and link target, in path order. Names are
/// walked as raw bytes and written escaped. Read on every core.
fn tree_digest(snap: &Path, prefix: &str, roots: &[String], skip: &[String]) -> Result<String> {
    let prefix_raw = fsx::raw(prefix);
    let at = |p: &[u8]| -> PathBuf {
        let rest = if prefix_raw == b"/" {
            p
        } else {
            p.strip_prefix(prefix_raw.as_slice()).unwrap_or(p)
        };
        let start = rest.iter().position(|&c| c != b'/').unwrap_or(rest.len());
        snap.join(std::ffi::OsStr::from_bytes(&rest[start..]))
    };
    let line = |p: &[u8], m: &std::fs::Metadata| -> Result<String> {
        let link = if m.file_type().is_symlink() {
            RawPath(std::fs::read_link(at(p))?.into_os_string().into_vec()).escaped()
        } else {
            String::new()
        };
        Ok(format!(
            "{}\0{}\0{}.{}\0{:o}\0{}:{}\0{}\0{link}\n",
            RawPath(p.to_vec()).escaped(),
            m.ino(),
            m.ctime(),
            m.ctime_nsec(),
            m.mode(),
            m.uid(),
            m.gid(),
            m.len()
        ))
    };
    let child = |p: &[u8], name: &std::ffi::OsStr| -> Vec<u8> { RawPath(p.to_vec()).child(name.as_bytes()).0 };
    let subtree = |top: &[u8]| -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut stack = vec![top.to_vec()];
        while let Some(p) = stack.pop() {
            let m = at(&p)
                .symlink_metadata()
                .with_context(|| format!("reading {} in the snapshot", RawPath(p.clone())))?;
            out.push(line(&p, &m)?);
            if m.is_dir() {
                for c in std::fs::read_dir(at(&p))?.flatten() {
                    let c = child(&p, &c.file_name());
                    if !fsx::skipped(&c, skip) {
                        stack.push(c);
                    }
                }
            }
        }
        Ok(out)
    };
    let mut lines = Vec::new();
    for r in roots {
        let r = fsx::raw(r);
        if fsx::skipped(&r, skip) || at(&r).symlink_metadata().is_err() {
            continue;
        }
        let m = at(&r).symlink_metadata()?;
        lines.push(line(&r, &m)?);
        if !m.is_dir() {
            continue;
        }
        let children: Vec<Vec<u8>> = std::fs::read_dir(at(&r))?
            .flatten()
            .map(|c| child(&r, &c.file_name()))
            .filter(|c| !fsx::skipped(c, skip))
            .collect();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
        let parts: Vec<Result<Vec<String>>> = std::thread::scope(|sc| {
            let jobs: Vec<_> = (0..cores)
                .map(|k| {
                    let mine: Vec<&Vec<u8>> = children.iter().skip(k).step_by(cores).collect();
                    let subtree = &subtree;
                    sc.spawn(move || {
                        let mut v = Vec::new();
                        for c in mine {
                            v.extend(subtree(c)?);
                        }
                        Ok(v)
                    })
                })
                .collect();
            jobs.into_iter()
                .map(|j| {
                    j.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a reading thread panicked")))
                })
                .collect()
        });
        for p in parts {
            lines.extend(p?);
        }
    }
    lines.sort();
    let mut h = <sha2::Sha256 as sha2::Digest>::new();
    for l in &lines {
        sha2::Digest::update(&mut h, l.as_bytes());
    }
    Ok(hex::encode(sha2::Digest::finalize(h)))
}

/// Whether a part is restored by swapping its whole subvolume.
pub fn swappable_whole(root: &Path, part: &Part) -> Result<bool> {
    let Some(b) = record(part) else { return Ok(false) };
    Ok(swappable(root, part, b)?.is_some())
}

/// When the part is one whole subvolume that is not a mount point, in a
/// directory no tenant can write to, it is put back in one step: a
/// writable snapshot of the snapshot takes its place. That needs every
/// path left out of the part below it to be a nested subvolume (those are
/// carried over), and no quotas on the filesystem (a new subvolume would
/// lose the old one's limits). Returns the nested subvolumes to carry
/// over, or `None` to restore by building beside the live files.
fn swappable(root: &Path, part: &Part, b: &BtrfsInfo) -> Result<Option<Vec<String>>> {
    if part.roots.len() != 1 || part.roots.get(&b.subvolume) != Some(&true) || b.subvolume == "/" {
        return Ok(None);
    }
    let root_fd = fsx::open_dir(root)?;
    let live = host_path(root, &b.subvolume);
    let mounted = crate::mountinfo::read()?.iter().any(|m| m.point == live);
    let Some(node) = fsx::node_at(root_fd.as_fd(), b.subvolume.as_bytes())? else {
        return Ok(None);
    };
    if mounted || node.kind() != Kind::Dir || node.stat.st_ino != 256 {
        return Ok(None);
    }
    // Names in the parent must be the agent's alone: a tenant who could
    // rename them could race the swap.
    let parent = RawPath::from(b.subvolume.as_str()).parent();
    let Some(pnode) = fsx::node_at(root_fd.as_fd(), parent.as_bytes())? else {
        return Ok(None);
    };
    if pnode.stat.st_uid != 0 || pnode.stat.st_mode & 0o022 != 0 {
        return Ok(None);
    }
    // Every path left out below it must be a subvolume directly in its
    // top directory (those are carried over); anything else left out (an
    // untouchable directory, a mount, a deeper subvolume) must stay where
    // it is, so the part is rebuilt beside the live files instead.
    let mounts = crate::mountinfo::read()?;
    for sk in &part.skip {
        let Some(n) = fsx::node_at(root_fd.as_fd(), &fsx::raw(sk)).ok().flatten() else {
            continue;
        };
        let parent_is_top = RawPath(fsx::raw(sk)).parent().as_bytes() == fsx::raw(&b.subvolume).as_slice();
        if n.kind() != Kind::Dir
            || n.stat.st_ino != 256
            || !parent_is_top
            || mounts.iter().any(|x| x.point == host_path(root, sk))
        {
            return Ok(None);
        }
    }
    // Carried over: every subvolume in the top directory now, also one made
    // since the snapshot (its old place would block deleting the old tree).
    let top = node.reopen()?;
    let mut nested = Vec::new();
    for name in fsx::names(top.as_fd())? {
        let Some(c) = fsx::open_child(top.as_fd(), &name)? else {
            continue;
        };
        if c.kind() == Kind::Dir && c.stat.st_ino == 256 && fsx::is_btrfs(c.fd.as_fd()) {
            nested.push(RawPath(fsx::raw(&b.subvolume)).child(&name).escaped());
        }
    }
    let quotas = Command::new("btrfs")
        .args(["qgroup", "show", "-f"])
        .arg(fsx::proc_path(node.fd.as_fd()))
        .output()
        .is_ok_and(|o| o.status.success());
    Ok((!quotas).then_some(nested))
}

/// Put a whole subvolume back by swapping a writable snapshot of its
/// snapshot into its place (`renameat2` with `RENAME_EXCHANGE`, so the
/// path is never missing), carrying nested subvolumes (directly in its top
/// directory) across, then delete what was there. Every call goes through
/// handles: the parent directory is root's, checked by [`swappable`].
fn swap(root: &Path, part: &Part, b: &BtrfsInfo, nested: &[String]) -> Result<()> {
    let root_fd = fsx::open_dir(root)?;
    let sub = RawPath::from(b.subvolume.as_str());
    let parent = fsx::open_beneath(root_fd.as_fd(), sub.parent().as_bytes(), true)?
        .context("a subvolume has a parent directory")?;
    let live = fsx::open_child(parent.as_fd(), sub.name())?
        .context("the subvolume is gone")?
        .reopen()?;
    let fresh_name = replaced_name(&b.subvolume);
    if fsx::open_child(parent.as_fd(), fresh_name.as_bytes())?.is_some() {
        delete_subvolume_at(parent.as_fd(), fresh_name.as_bytes(), &anchor(root, part))?;
    }
    let snap_fd = open_snap(root, b)?.with_context(|| format!("the snapshot {} is gone", b.snapshot))?;
    let out = Command::new("btrfs")
        .args(["subvolume", "snapshot"])
        .arg(fsx::proc_path(snap_fd.as_fd()))
        .arg(at_fd(parent.as_fd(), fresh_name.as_bytes()))
        .output()
        .context("running btrfs (btrfs-progs)")?;
    if !out.status.success() {
        bail!(
            "`btrfs subvolume snapshot {} {}` failed: {}",
            b.snapshot,
            fresh_name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let fresh = fsx::open_child(parent.as_fd(), fresh_name.as_bytes())?
        .context("the restored copy vanished")?
        .reopen()?;
    let made = show(&fsx::proc_path(fresh.as_fd()))?;
    if made.parent_uuid != b.uuid {
        let _ = delete_subvolume_at(parent.as_fd(), fresh_name.as_bytes(), &anchor(root, part));
        bail!("the restored copy of {} does not come from its snapshot", b.subvolume);
    }
    // Nested subvolumes are empty placeholders in a snapshot; the live ones
    // move into the copy before it takes the subvolume's place.
    for n in nested {
        let name = RawPath(fsx::raw(n)).name().to_vec();
        let os = std::ffi::OsStr::from_bytes(&name);
        if let Some(p) = fsx::open_child(fresh.as_fd(), &name)?
            && p.kind() == Kind::Dir
        {
            rustix::fs::unlinkat(&fresh, os, rustix::fs::AtFlags::REMOVEDIR)
                .with_context(|| format!("clearing the place of {n}"))?;
        }
        rustix::fs::renameat(&live, os, &fresh, os).with_context(|| format!("carrying {n} over"))?;
    }
    rustix::fs::renameat_with(
        &parent,
        std::ffi::OsStr::from_bytes(fresh_name.as_bytes()),
        &parent,
        std::ffi::OsStr::from_bytes(sub.name()),
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .with_context(|| format!("swapping the restored {} into place", b.subvolume))?;
    // What the step left is now under the other name: it goes once the
    // restore is durable ([`discard_replaced`]).
    Ok(())
}

/// The name beside a subvolume where a swap leaves the tree it replaced.
fn replaced_name(subvolume: &str) -> String {
    let name = subvolume.rsplit('/').next().unwrap_or_default();
    format!(".{name}.wavegate-restore")
}

/// Delete what a swap replaced (btrfs frees it in the background).
pub fn discard_replaced(root: &Path, part: &Part) -> Result<()> {
    let Some(b) = record(part) else { return Ok(()) };
    let root_fd = fsx::open_dir(root)?;
    let sub = RawPath::from(b.subvolume.as_str());
    let Some(parent) = fsx::open_beneath(root_fd.as_fd(), sub.parent().as_bytes(), true)? else {
        return Ok(());
    };
    let name = replaced_name(&b.subvolume);
    if let Some(n) = fsx::open_child(parent.as_fd(), name.as_bytes())?
        && n.kind() == Kind::Dir
        && n.stat.st_ino == 256
    {
        delete_subvolume_at(parent.as_fd(), name.as_bytes(), &anchor(root, part))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subvolume_show_is_read() {
        let text = "snap1\n\tName: \t\t\tsnap1\n\tUUID: \t\t\tafce2514-adcf\n\tParent UUID: \t\tb006e140\n\tReceived UUID: \t\t-\n\tSubvolume ID: \t\t256\n\tGeneration: \t\t9\n\tGen at creation: \t7\n\tFlags: \t\t\treadonly\n";
        let s = parse_show(text);
        assert_eq!(
            s,
            Show {
                uuid: "afce2514-adcf".into(),
                parent_uuid: "b006e140".into(),
                generation: 9,
                created_gen: 7,
                readonly: true
            }
        );
        assert!(!parse_show("\tFlags: \t\t\t-\n").readonly);
    }

    #[test]
    fn parents() {
        assert_eq!(parent("/home/t1").as_deref(), Some("/home"));
        assert_eq!(parent("/home").as_deref(), Some("/"));
        assert_eq!(parent("/"), None);
    }
}
