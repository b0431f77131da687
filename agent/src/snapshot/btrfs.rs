//! The btrfs backend: a read-only snapshot of the subvolume that holds the
//! part's paths, made by btrfs-progs (`btrfs subvolume snapshot -r`) in a
//! `.wavegate-snapshots` subvolume beside the data, the way snapper keeps
//! `.snapshots`. Taking it costs no copy; it is verified by the filesystem
//! (it exists, is read-only, comes from the subvolume it should, and its
//! generation has not moved), not by reading every byte.
//!
//! A restore puts back only what differs: a snapshot keeps each file's
//! inode number and change time, and any change to a live file moves its
//! change time, so a file whose inode and change time both match its
//! snapshot copy is unchanged and is left alone. Everything else is
//! removed, or put back as a reflink of the snapshot's data (no bytes are
//! copied), with its owner, mode, times and extended attributes.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

use super::{Backend, BtrfsInfo, Part, host_path, is_boundary, remove_except, walk};
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
                ..b.clone()
            });
            self.verify(root, _dir, part)?;
            Ok(found)
        })();
        if result.is_err() {
            let _ = btrfs(&["subvolume", "delete"], &snap);
        }
        result
    }

    fn verify(&self, root: &Path, _dir: &Path, part: &Part) -> Result<()> {
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
        if s.generation != b.generation {
            bail!(
                "the snapshot {} was written to after it was taken (generation {}, taken at {})",
                b.snapshot,
                s.generation,
                b.generation
            );
        }
        Ok(())
    }

    fn restore(&self, root: &Path, _dir: &Path, part: &Part) -> Result<()> {
        let b = info(part)?;
        let snap = host_path(root, &b.snapshot);
        let mut sync = Sync {
            root,
            snap: &snap,
            prefix: &b.subvolume,
            skip: &part.skip,
            dirs: Vec::new(),
        };
        for (r, existed) in &part.roots {
            if *existed {
                sync.path(r)?;
            } else {
                remove_except(root, r, &part.skip, is_boundary(root, r))?;
            }
        }
        // Directory times change as their children are put back; set them last.
        for (full, from) in sync.dirs.iter().rev() {
            set_times(full, from, false)?;
        }
        let roots: Vec<String> = part.roots.keys().cloned().collect();
        let (now, _) = walk(root, "/", root, &roots, &part.skip)?;
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

/// Making a live tree equal to its snapshot.
struct Sync<'a> {
    root: &'a Path,
    snap: &'a Path,
    prefix: &'a str,
    skip: &'a [String],
    /// Directories put back, with their snapshot copies, in walk order.
    dirs: Vec<(PathBuf, PathBuf)>,
}

/// Whether two inodes are the same, unchanged since the snapshot.
fn unchanged(live: &std::fs::Metadata, snap: &std::fs::Metadata) -> bool {
    live.ino() == snap.ino()
        && live.ctime() == snap.ctime()
        && live.ctime_nsec() == snap.ctime_nsec()
        && live.len() == snap.len()
        && live.file_type() == snap.file_type()
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

    fn path(&mut self, p: &str) -> Result<()> {
        if self.skip.iter().any(|s| within(p, s)) {
            return Ok(());
        }
        let (s, l) = (self.snap_path(p), host_path(self.root, p));
        let sm = s
            .symlink_metadata()
            .with_context(|| format!("reading {p} in the snapshot"))?;
        let lm = l.symlink_metadata().ok();
        let same_kind = lm.as_ref().is_some_and(|m| m.file_type() == sm.file_type());
        if sm.is_dir() {
            if !same_kind {
                remove_except(self.root, p, self.skip, false)?;
                std::fs::create_dir(&l).with_context(|| format!("making {p}"))?;
            }
            let names = |d: &Path| -> Result<Vec<String>> {
                let mut v: Vec<String> = std::fs::read_dir(d)?
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                v.sort();
                Ok(v)
            };
            let in_snap = names(&s)?;
            let child = |n: &str| format!("{}/{n}", p.trim_end_matches('/'));
            for n in names(&l)? {
                if in_snap.binary_search(&n).is_err() {
                    remove_except(self.root, &child(&n), self.skip, false)?;
                }
            }
            for n in &in_snap {
                self.path(&child(n))?;
            }
            set_owner_mode(&l, &sm)?;
            self.dirs.push((l, s));
            return Ok(());
        }
        if same_kind && lm.as_ref().is_some_and(|m| unchanged(m, &sm)) {
            return Ok(());
        }
        if lm.is_some() {
            remove_except(self.root, p, self.skip, false)?;
        }
        if sm.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&s)?, &l).with_context(|| format!("linking {p}"))?;
            set_times(&l, &s, true)?;
            return Ok(());
        }
        if !sm.is_file() {
            // A socket or a fifo: nothing a snapshot keeps the content of.
            return Ok(());
        }
        reflink_copy::reflink(&s, &l).with_context(|| format!("putting {p} back (reflink)"))?;
        if let Ok(names) = xattr::list(&s) {
            for n in names {
                if let Ok(Some(v)) = xattr::get(&s, &n) {
                    let _ = xattr::set(&l, &n, &v);
                }
            }
        }
        set_owner_mode(&l, &sm)?;
        set_times(&l, &s, false)
    }
}

fn set_owner_mode(l: &Path, sm: &std::fs::Metadata) -> Result<()> {
    let lm = l.symlink_metadata()?;
    if lm.uid() != sm.uid() || lm.gid() != sm.gid() {
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            l,
            Some(nix::unistd::Uid::from_raw(sm.uid())),
            Some(nix::unistd::Gid::from_raw(sm.gid())),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
    }
    // After the owner: a chown clears set-id bits.
    if !sm.file_type().is_symlink() && l.symlink_metadata()?.mode() & 0o7777 != sm.mode() & 0o7777 {
        std::fs::set_permissions(l, std::fs::Permissions::from_mode(sm.mode() & 0o7777))?;
    }
    Ok(())
}

/// Give `l` the owner (symlinks) and the access and modification times of
/// its snapshot copy `s`, to the nanosecond.
fn set_times(l: &Path, s: &Path, symlink: bool) -> Result<()> {
    let sm = s.symlink_metadata()?;
    if symlink {
        set_owner_mode(l, &sm)?;
    }
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
        let text = "snap1\n\tName: \t\t\tsnap1\n\tUUID: \t\t\tafce2514-adcf\n\tParent UUID: \t\tb006e140\n\tReceived UUID: \t\t-\n\tSubvolume ID: \t\t256\n\tGeneration: \t\t7\n\tGen at creation: \t7\n\tFlags: \t\t\treadonly\n";
        let s = parse_show(text);
        assert_eq!(
            s,
            Show {
                uuid: "afce2514-adcf".into(),
                parent_uuid: "b006e140".into(),
                generation: 7,
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
