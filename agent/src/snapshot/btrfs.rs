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

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

use super::{Backend, BtrfsInfo, Entry, Part, entry_at, entry_of, host_path, is_boundary, remove_except, walk};
use crate::mountinfo::within;

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
    let out = Command::new("btrfs")
        .args(args)
        .arg(path)
        .output()
        .context("running btrfs (btrfs-progs)")?;
    if !out.status.success() {
        bail!(
            "`btrfs {} {}` failed: {}",
            args.join(" "),
            path.display(),
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

fn info(part: &Part) -> Result<&BtrfsInfo> {
    part.btrfs.as_ref().context("a btrfs part without its snapshot record")
}

impl Backend for Btrfs {
    fn take(&self, root: &Path, _dir: &Path, part: &mut Part) -> Result<Vec<String>> {
        let b = info(part)?.clone();
        let live = host_path(root, &b.subvolume);
        let holder = live.join(SNAPSHOT_DIR);
        if !holder.exists() {
            btrfs(&["subvolume", "create"], &holder)?;
            std::fs::set_permissions(&holder, std::fs::Permissions::from_mode(0o700))?;
        }
        let snap = host_path(root, &b.snapshot);
        if snap.exists() {
            // Left by a take that was interrupted: it is not ours to trust.
            btrfs(&["subvolume", "delete"], &snap)?;
        }
        let out = Command::new("btrfs")
            .args(["subvolume", "snapshot", "-r"])
            .arg(&live)
            .arg(&snap)
            .output()
            .context("running btrfs (btrfs-progs)")?;
        if !out.status.success() {
            bail!(
                "`btrfs subvolume snapshot -r {} {}` failed: {}",
                live.display(),
                snap.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let result = (|| {
            let s = show(&snap)?;
            let src = show(&live)?;
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
            let (entries, found) = walk(&snap, &b.subvolume, root, &roots, &part.skip)?;
            part.skip.extend(found.iter().cloned());
            part.skip.sort();
            part.skip.dedup();
            part.entries = entries;
            part.btrfs = Some(BtrfsInfo {
                uuid: s.uuid,
                parent_uuid: s.parent_uuid,
                generation: s.generation,
                created_gen: s.created_gen,
                tree_sha256: tree_digest(&snap, &b.subvolume, &roots, &part.skip)?,
                ..b.clone()
            });
            // Its tree was read just now; the flags say it stays that way.
            flags(root, part)?;
            Ok(found)
        })();
        if result.is_err() {
            let _ = btrfs(&["subvolume", "delete"], &snap);
        }
        result
    }

    fn verify(&self, root: &Path, _dir: &Path, part: &Part) -> Result<()> {
        flags(root, part)?;
        let b = info(part)?;
        let snap = host_path(root, &b.snapshot);
        let roots: Vec<String> = part.roots.keys().cloned().collect();
        if tree_digest(&snap, &b.subvolume, &roots, &part.skip)? != b.tree_sha256 {
            bail!(
                "the snapshot {} was written to after it was taken (its files' inodes or change times moved)",
                b.snapshot
            );
        }
        Ok(())
    }

    fn restore(&self, root: &Path, _dir: &Path, part: &Part) -> Result<()> {
        let b = info(part)?;
        let snap = host_path(root, &b.snapshot);
        if let Some(nested) = swappable(root, part, b)? {
            return swap(root, b, &snap, &nested);
        }
        let sync = Sync {
            root,
            snap: &snap,
            prefix: &b.subvolume,
            skip: &part.skip,
        };
        let mut found = Found::default();
        for (r, existed) in &part.roots {
            if *existed {
                sync.tree(r, &mut found)?;
            } else {
                remove_except(root, r, &part.skip, is_boundary(root, r))?;
            }
        }
        // Directory times change as their children are put back; set them
        // last, then read the directories as they now are.
        for (p, l, sm) in found.dirs.iter().rev() {
            set_times(l, sm)?;
            found.entries.push(entry_at(l, p)?);
        }
        // The tree as it now is, read while it was put back, against the
        // snapshot's own listing.
        let mut now = found.entries;
        now.sort_by(|a, b| a.path.cmp(&b.path));
        if now != part.entries {
            let diff: Vec<&str> = now
                .iter()
                .filter(|e| !part.entries.contains(e))
                .map(|e| e.path.as_str())
                .chain(
                    part.entries
                        .iter()
                        .filter(|e| !now.contains(e))
                        .map(|e| e.path.as_str()),
                )
                .take(5)
                .collect();
            bail!(
                "after the restore the write set still differs from the snapshot: {}",
                diff.join(", ")
            );
        }
        Ok(())
    }

    fn release(&self, root: &Path, _dir: &Path, part: &Part) -> Result<()> {
        let b = info(part)?;
        let snap = host_path(root, &b.snapshot);
        if snap.exists() {
            btrfs(&["subvolume", "delete"], &snap)?;
        }
        Ok(())
    }
}

/// The snapshot is there, read-only, and the one that was taken: its UUID,
/// its parent's and the transaction it was made in.
fn flags(root: &Path, part: &Part) -> Result<()> {
    let b = info(part)?;
    let snap = host_path(root, &b.snapshot);
    if !snap.is_dir() {
        bail!("the snapshot {} is gone", b.snapshot);
    }
    let s = show(&snap)?;
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

/// SHA-256 over every inode under `roots` in a snapshot (mounted at `snap`,
/// showing host path `prefix`), leaving out `skip`: path, inode number,
/// change time (to the nanosecond), mode, owner, size and link target, in
/// path order. Read on every core.
fn tree_digest(snap: &Path, prefix: &str, roots: &[String], skip: &[String]) -> Result<String> {
    let at = |p: &str| -> PathBuf {
        let rest = if prefix == "/" {
            p
        } else {
            p.strip_prefix(prefix).unwrap_or(p)
        };
        snap.join(rest.trim_start_matches('/'))
    };
    let skipped = |p: &str| skip.iter().any(|s| within(p, s));
    let line = |p: &str, m: &std::fs::Metadata| -> Result<String> {
        let link = if m.file_type().is_symlink() {
            std::fs::read_link(at(p))?.display().to_string()
        } else {
            String::new()
        };
        Ok(format!(
            "{p}\0{}\0{}.{}\0{:o}\0{}:{}\0{}\0{link}\n",
            m.ino(),
            m.ctime(),
            m.ctime_nsec(),
            m.mode(),
            m.uid(),
            m.gid(),
            m.len()
        ))
    };
    let subtree = |top: &str| -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut stack = vec![top.to_owned()];
        while let Some(p) = stack.pop() {
            let m = at(&p)
                .symlink_metadata()
                .with_context(|| format!("reading {p} in the snapshot"))?;
            out.push(line(&p, &m)?);
            if m.is_dir() {
                for c in std::fs::read_dir(at(&p))?.flatten() {
                    let c = format!("{}/{}", p.trim_end_matches('/'), c.file_name().to_string_lossy());
                    if !skipped(&c) {
                        stack.push(c);
                    }
                }
            }
        }
        Ok(out)
    };
    let mut lines = Vec::new();
    for r in roots {
        if skipped(r) || at(r).symlink_metadata().is_err() {
            continue;
        }
        let m = at(r).symlink_metadata()?;
        lines.push(line(r, &m)?);
        if !m.is_dir() {
            continue;
        }
        let children: Vec<String> = std::fs::read_dir(at(r))?
            .flatten()
            .map(|c| format!("{}/{}", r.trim_end_matches('/'), c.file_name().to_string_lossy()))
            .filter(|c| !skipped(c))
            .collect();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
        let parts: Vec<Result<Vec<String>>> = std::thread::scope(|sc| {
            let jobs: Vec<_> = (0..cores)
                .map(|k| {
                    let mine: Vec<&String> = children.iter().skip(k).step_by(cores).collect();
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

/// When the part is one whole subvolume that is not a mount point, it is
/// put back in one step: a writable snapshot of the snapshot takes its
/// place. That needs every path left out of the part below it to be a
/// nested subvolume (those are carried over), and no quotas on the
/// filesystem (a new subvolume would lose the old one's limits). Returns
/// the nested subvolumes to carry over, or `None` to restore file by file.
fn swappable(root: &Path, part: &Part, b: &BtrfsInfo) -> Result<Option<Vec<String>>> {
    if part.roots.len() != 1 || part.roots.get(&b.subvolume) != Some(&true) || b.subvolume == "/" {
        return Ok(None);
    }
    let live = host_path(root, &b.subvolume);
    let mounted = crate::mountinfo::read()?.iter().any(|m| m.point == live);
    if mounted || live.symlink_metadata().map(|m| m.ino()).ok() != Some(256) {
        return Ok(None);
    }
    let mut nested = Vec::new();
    for sk in &part.skip {
        let Ok(m) = host_path(root, sk).symlink_metadata() else {
            continue;
        };
        // Only a subvolume can be carried over whole; anything else left
        // out (an untouchable directory, a mount) must stay where it is.
        if m.ino() != 256 || crate::mountinfo::read()?.iter().any(|x| x.point == host_path(root, sk)) {
            return Ok(None);
        }
        nested.push(sk.clone());
    }
    let quotas = Command::new("btrfs")
        .args(["qgroup", "show", "-f"])
        .arg(&live)
        .output()
        .is_ok_and(|o| o.status.success());
    Ok((!quotas).then_some(nested))
}

/// Put a whole subvolume back by swapping a writable snapshot of its
/// snapshot into its place (`renameat2` with `RENAME_EXCHANGE`, so the
/// path is never missing), carrying nested subvolumes across, then delete
/// what was there.
fn swap(root: &Path, b: &BtrfsInfo, snap: &Path, nested: &[String]) -> Result<()> {
    let live = host_path(root, &b.subvolume);
    let fresh = replaced(root, b).context("a subvolume has a parent directory")?;
    if fresh.exists() {
        btrfs(&["subvolume", "delete"], &fresh)?;
    }
    let out = Command::new("btrfs")
        .args(["subvolume", "snapshot"])
        .arg(snap)
        .arg(&fresh)
        .output()
        .context("running btrfs (btrfs-progs)")?;
    if !out.status.success() {
        bail!(
            "`btrfs subvolume snapshot {} {}` failed: {}",
            snap.display(),
            fresh.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let made = show(&fresh)?;
    if made.parent_uuid != b.uuid {
        let _ = btrfs(&["subvolume", "delete"], &fresh);
        bail!("the restored copy of {} does not come from its snapshot", b.subvolume);
    }
    // Nested subvolumes are empty placeholders in a snapshot; the live ones
    // move into the copy before it takes the subvolume's place.
    for n in nested {
        let rest = n
            .strip_prefix(b.subvolume.as_str())
            .unwrap_or(n)
            .trim_start_matches('/');
        let placeholder = fresh.join(rest);
        if placeholder.is_dir() {
            std::fs::remove_dir(&placeholder).with_context(|| format!("clearing the place of {n}"))?;
        }
        std::fs::rename(host_path(root, n), &placeholder).with_context(|| format!("carrying {n} over"))?;
    }
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &fresh,
        nix::fcntl::AT_FDCWD,
        &live,
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
    .with_context(|| format!("swapping the restored {} into place", b.subvolume))?;
    // `fresh` now holds what the step left: it goes once the restore is
    // durable ([`discard_replaced`]), so the sync does not wait for it.
    Ok(())
}

/// Where a swap leaves the tree it replaced.
fn replaced(root: &Path, b: &BtrfsInfo) -> Option<PathBuf> {
    let live = host_path(root, &b.subvolume);
    let name = live.file_name()?.to_string_lossy().into_owned();
    Some(live.parent()?.join(format!(".{name}.wavegate-restore")))
}

/// Delete what a swap replaced (btrfs frees it in the background).
pub fn discard_replaced(root: &Path, part: &Part) -> Result<()> {
    let Some(b) = part.btrfs.as_ref() else { return Ok(()) };
    if let Some(old) = replaced(root, b)
        && old.exists()
    {
        btrfs(&["subvolume", "delete"], &old)?;
    }
    Ok(())
}

/// Making a live tree equal to its snapshot.
struct Sync<'a> {
    root: &'a Path,
    snap: &'a Path,
    prefix: &'a str,
    skip: &'a [String],
}

/// What a sync saw: the entries of the files and links as they now are,
/// and the directories, whose times are set (and entries read) last.
#[derive(Default)]
struct Found {
    entries: Vec<Entry>,
    dirs: Vec<(String, PathBuf, std::fs::Metadata)>,
}

/// Whether two inodes are the same, unchanged since the snapshot.
fn unchanged(live: &std::fs::Metadata, snap: &std::fs::Metadata) -> bool {
    live.ino() == snap.ino()
        && live.ctime() == snap.ctime()
        && live.ctime_nsec() == snap.ctime_nsec()
        && live.len() == snap.len()
        && live.file_type() == snap.file_type()
}

fn sorted_names(d: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(d)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    Ok(v)
}

impl Sync<'_> {
    fn snap_path(&self, p: &str) -> PathBuf {
        let rest = if self.prefix == "/" {
            p
        } else {
            p.strip_prefix(self.prefix).unwrap_or(p)
        };
        self.snap.join(rest.trim_start_matches('/'))
    }

    fn skipped(&self, p: &str) -> bool {
        self.skip.iter().any(|s| within(p, s))
    }

    /// Sync a root: the directory itself here, what is below it on every
    /// core (most of a restore is waiting on the filesystem per inode).
    fn tree(&self, p: &str, found: &mut Found) -> Result<()> {
        let Some(children) = self.dir(p, found)? else {
            return Ok(());
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
        let parts: Vec<Result<Found>> = std::thread::scope(|sc| {
            let jobs: Vec<_> = (0..cores)
                .map(|k| {
                    let mine: Vec<&String> = children.iter().skip(k).step_by(cores).collect();
                    sc.spawn(move || {
                        let mut f = Found::default();
                        for c in mine {
                            self.path(c, &mut f)?;
                        }
                        Ok(f)
                    })
                })
                .collect();
            jobs.into_iter()
                .map(|j| {
                    j.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a restore thread panicked")))
                })
                .collect()
        });
        for f in parts {
            let f = f?;
            found.entries.extend(f.entries);
            found.dirs.extend(f.dirs);
        }
        Ok(())
    }

    /// If `p` is a directory in the snapshot: make it one here, remove what
    /// the snapshot does not have, and return its children to sync. `None`
    /// when it is not a directory (it has been synced as a file or link).
    fn dir(&self, p: &str, found: &mut Found) -> Result<Option<Vec<String>>> {
        if self.skipped(p) {
            return Ok(None);
        }
        let (s, l) = (self.snap_path(p), host_path(self.root, p));
        let sm = s
            .symlink_metadata()
            .with_context(|| format!("reading {p} in the snapshot"))?;
        if !sm.is_dir() {
            self.leaf(p, &s, &l, &sm, found)?;
            return Ok(None);
        }
        let lm = l.symlink_metadata().ok();
        if !lm.as_ref().is_some_and(std::fs::Metadata::is_dir) {
            remove_except(self.root, p, self.skip, false)?;
            std::fs::create_dir(&l).with_context(|| format!("making {p}"))?;
        }
        let in_snap = sorted_names(&s)?;
        let child = |n: &str| format!("{}/{n}", p.trim_end_matches('/'));
        for n in sorted_names(&l)? {
            if in_snap.binary_search(&n).is_err() {
                remove_except(self.root, &child(&n), self.skip, false)?;
            }
        }
        set_owner_mode(&l, &sm, lm.as_ref().filter(|m| m.is_dir()))?;
        found.dirs.push((p.to_owned(), l, sm));
        Ok(Some(
            in_snap.iter().map(|n| child(n)).filter(|c| !self.skipped(c)).collect(),
        ))
    }

    fn path(&self, p: &str, found: &mut Found) -> Result<()> {
        if let Some(children) = self.dir(p, found)? {
            for c in children {
                self.path(&c, found)?;
            }
        }
        Ok(())
    }

    /// A file or a link: kept when it is the same inode, unchanged since the
    /// snapshot; otherwise put back.
    fn leaf(&self, p: &str, s: &Path, l: &Path, sm: &std::fs::Metadata, found: &mut Found) -> Result<()> {
        let lm = l.symlink_metadata().ok();
        if let Some(m) = lm.as_ref()
            && unchanged(m, sm)
        {
            let link = if m.file_type().is_symlink() {
                std::fs::read_link(l)?.display().to_string()
            } else {
                String::new()
            };
            found.entries.push(entry_of(p, m, link));
            return Ok(());
        }
        if lm.is_some() {
            remove_except(self.root, p, self.skip, false)?;
        }
        if sm.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(s)?, l).with_context(|| format!("linking {p}"))?;
        } else if sm.is_file() {
            reflink_copy::reflink(s, l).with_context(|| format!("putting {p} back (reflink)"))?;
            if let Ok(names) = xattr::list(s) {
                for n in names {
                    if let Ok(Some(v)) = xattr::get(s, &n) {
                        let _ = xattr::set(l, &n, &v);
                    }
                }
            }
        } else {
            // A socket or a fifo: nothing a snapshot keeps the content of.
            return Ok(());
        }
        set_owner_mode(l, sm, None)?;
        set_times(l, sm)?;
        found.entries.push(entry_at(l, p)?);
        Ok(())
    }
}

/// Give `l` the owner and mode of its snapshot copy (`sm`); `lm` is what
/// `l` has now, when known (a new file has none worth asking for).
fn set_owner_mode(l: &Path, sm: &std::fs::Metadata, lm: Option<&std::fs::Metadata>) -> Result<()> {
    if lm.is_none_or(|m| m.uid() != sm.uid() || m.gid() != sm.gid()) {
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            l,
            Some(nix::unistd::Uid::from_raw(sm.uid())),
            Some(nix::unistd::Gid::from_raw(sm.gid())),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
    }
    // After the owner: a chown clears set-id bits.
    if !sm.file_type().is_symlink() {
        std::fs::set_permissions(l, std::fs::Permissions::from_mode(sm.mode() & 0o7777))?;
    }
    Ok(())
}

/// Give `l` the access and modification times of its snapshot copy, to the
/// nanosecond.
fn set_times(l: &Path, sm: &std::fs::Metadata) -> Result<()> {
    let at = nix::sys::time::TimeSpec::new(sm.atime(), sm.atime_nsec());
    let mt = nix::sys::time::TimeSpec::new(sm.mtime(), sm.mtime_nsec());
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        l,
        &at,
        &mt,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )?;
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
