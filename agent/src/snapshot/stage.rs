//! A restore that never deletes first.
//!
//! The restored tree is built beside the live one, on the same filesystem,
//! in a staging directory that only the agent can enter (`0700`, root, a
//! random name). It is checked against the manifest there, made durable,
//! and only then swapped in, one name at a time, with
//! `renameat2(RENAME_EXCHANGE)`: each name is always either the old tree or
//! the restored one. What was replaced stays in the staging directory until
//! every swap is done and recorded durably; then it is removed.
//!
//! What is swapped (a *unit*) is the largest tree that holds nothing that
//! must stay where it is: a write-set root, or, when the root is a mount
//! point, a subvolume, or holds another part, an untouchable path or the
//! agent's snapshots, each of its children in turn (the root stays and gets
//! its owner, mode and times back through its handle).
//!
//! A journal beside the snapshot records the plan before the first swap, so
//! an agent killed half way finishes the swaps when it starts again
//! ([`recover`]): the write set is then wholly the restored tree, never a
//! mix. Killed while building, the staging directories are removed and the
//! write set is untouched. No space, an I/O error or a snapshot that does
//! not match its manifest stop the restore before the first swap.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result, bail};
use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use serde::{Deserialize, Serialize};

use super::fsx::{self, BlockDigest, Node, RawPath};
use super::{Entry, Kind, Part};

/// Kill this process when `WAVEGATE_AGENT_CRASH_AT` names this point: the
/// crash tests make an agent die at a known moment of a restore.
pub fn crash_point(name: &str) {
    if std::env::var("WAVEGATE_AGENT_CRASH_AT").is_ok_and(|v| v == name) {
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Where a restore works: a directory that holds units (by host path), and
/// its staging directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Location {
    /// Host path of the directory.
    pub path: RawPath,
    /// The staging directory's name in it.
    pub staging: String,
    /// The staging directory's inode (0 until it is made).
    #[serde(default)]
    pub staging_ino: u64,
}

/// One name swapped.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Unit {
    /// Index into the locations.
    pub loc: usize,
    /// The name in that directory.
    pub name: RawPath,
    /// The restored tree's device and inode, when the snapshot has it;
    /// `None`: the snapshot does not have it, and what is there is moved
    /// aside.
    pub staged_ino: Option<(u64, u64)>,
}

/// The journal of a restore in progress.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Journal {
    /// `building`, `swapping` or `swapped`.
    pub phase: String,
    /// Every location.
    pub locations: Vec<Location>,
    /// Every unit (known from `swapping` on).
    #[serde(default)]
    pub units: Vec<Unit>,
    /// Directories kept in place, with the metadata they get back.
    #[serde(default)]
    pub kept: Vec<Entry>,
}

/// The journal's file in a snapshot directory.
pub fn journal_path(dir: &Path) -> std::path::PathBuf {
    dir.join("restore.json")
}

fn save(dir: &Path, j: &Journal) -> Result<()> {
    crate::journal::write_durably(&journal_path(dir), &serde_json::to_vec_pretty(j)?)
}

/// What a part's restore will do, before anything is made.
pub struct Plan {
    /// Host paths of units, with (location index, name).
    units: BTreeMap<RawPath, (usize, RawPath)>,
    /// Kept directories: host path to their snapshot entry.
    kept: BTreeMap<RawPath, Entry>,
    /// The manifest entries by path.
    want: HashMap<RawPath, Entry>,
    /// Units the snapshot has.
    staged: BTreeSet<RawPath>,
    /// Paths left out (not built, not checked).
    skip: Vec<String>,
    /// Units left as they are: unchanged since the snapshot.
    unchanged: Vec<RawPath>,
}

/// Plans and carries out restores of one or more parts together.
pub struct Restore<'a> {
    root: BorrowedFd<'a>,
    dir: &'a Path,
    token: String,
    locations: Vec<Location>,
    loc_fds: Vec<OwnedFd>,
    staging_fds: Vec<OwnedFd>,
    by_path: HashMap<RawPath, usize>,
    plans: Vec<Plan>,
    journal: Journal,
}

impl<'a> Restore<'a> {
    /// A restore under host root `root`, journalled in snapshot directory
    /// `dir`.
    pub fn new(root: BorrowedFd<'a>, dir: &'a Path) -> Restore<'a> {
        Restore {
            root,
            dir,
            token: hex::encode(rand::random::<[u8; 8]>()),
            locations: Vec::new(),
            loc_fds: Vec::new(),
            staging_fds: Vec::new(),
            by_path: HashMap::new(),
            plans: Vec::new(),
            journal: Journal::default(),
        }
    }

    fn location(&mut self, path: &RawPath) -> Result<usize> {
        if let Some(&i) = self.by_path.get(path) {
            return Ok(i);
        }
        let fd = fsx::open_beneath(self.root, path.as_bytes(), true)?
            .with_context(|| format!("{path} is not there to restore into"))?;
        let i = self.locations.len();
        self.locations.push(Location {
            path: path.clone(),
            staging: format!(".wavegate-restore-{}", self.token),
            staging_ino: 0,
        });
        self.loc_fds.push(fd);
        self.by_path.insert(path.clone(), i);
        Ok(i)
    }

    /// Plan a part: which names are swapped, which directories stay.
    /// Returns the plan's index.
    pub fn plan(&mut self, part: &Part) -> Result<usize> {
        let skip: Vec<RawPath> = part.skip.iter().map(|s| RawPath::from(s.as_str())).collect();
        // Only what is there now has to stay where it is.
        let mut present = Vec::new();
        for s in &skip {
            if fsx::node_at(self.root, s.as_bytes()).ok().flatten().is_some() {
                present.push(s.clone());
            }
        }
        let skipped = |p: &RawPath| skip.iter().any(|s| fsx::within(p.as_bytes(), s.as_bytes()));
        let holds_skip = |p: &RawPath| {
            present
                .iter()
                .any(|s| s != p && fsx::within(s.as_bytes(), p.as_bytes()))
        };
        let want: HashMap<RawPath, Entry> = part.entries.iter().map(|e| (e.path.clone(), e.clone())).collect();
        let mut plan = Plan {
            units: BTreeMap::new(),
            kept: BTreeMap::new(),
            want,
            staged: BTreeSet::new(),
            skip: part.skip.clone(),
            unchanged: Vec::new(),
        };
        let mut queue: Vec<RawPath> = part.roots.keys().map(|r| RawPath::from(r.as_str())).collect();
        while let Some(p) = queue.pop() {
            if skipped(&p) {
                continue;
            }
            let live = fsx::node_at(self.root, p.as_bytes())?;
            if live.is_none() && !plan.want.contains_key(&p) {
                // Not there before, not there now: nothing to do.
                continue;
            }
            let parent_dev = fsx::node_at(self.root, p.parent().as_bytes())?.map(|n| n.stat.st_dev);
            let boundary = p.as_bytes() == b"/"
                || p.as_bytes() == part.mount.as_bytes()
                || live.as_ref().is_some_and(|n| {
                    n.kind() == Kind::Dir
                        && (Some(n.stat.st_dev) != parent_dev || (n.stat.st_ino == 256 && fsx::is_btrfs(n.fd.as_fd())))
                });
            if !boundary && !holds_skip(&p) {
                let loc = self.location(&p.parent())?;
                if let Some(n) = &live
                    && Some(n.stat.st_dev) != parent_dev
                {
                    bail!("{p} is on another filesystem than its directory; it cannot be swapped");
                }
                if plan.want.contains_key(&p) {
                    plan.staged.insert(p.clone());
                }
                plan.units.insert(p.clone(), (loc, RawPath(p.name().to_vec())));
                continue;
            }
            // It stays; what is in it is swapped name by name.
            let Some(node) = live.filter(|n| n.kind() == Kind::Dir) else {
                bail!(
                    "{p} must stay where it is (it holds a mount, a subvolume or a path left out of the snapshot) but it is not a directory now"
                );
            };
            let Some(e) = plan.want.get(&p).filter(|e| e.kind == Kind::Dir) else {
                bail!(
                    "{p} must stay where it is (it holds a mount, a subvolume or a path left out of the snapshot) but the snapshot does not have it as a directory"
                );
            };
            plan.kept.insert(p.clone(), e.clone());
            let mut names: BTreeSet<Vec<u8>> = fsx::names(node.reopen()?.as_fd())?.into_iter().collect();
            for w in plan.want.keys() {
                if w.parent() == p && w != &p {
                    names.insert(w.name().to_vec());
                }
            }
            let staging = format!(".wavegate-restore-{}", self.token);
            for n in names {
                if n == staging.as_bytes() {
                    continue;
                }
                queue.push(p.child(&n));
            }
        }
        self.plans.push(plan);
        Ok(self.plans.len() - 1)
    }

    /// Leave alone every unit of plan `i` that `same` says is unchanged
    /// since the snapshot: it is neither rebuilt nor swapped.
    pub fn keep_unchanged(&mut self, i: usize, same: &dyn Fn(&RawPath) -> Result<bool>) -> Result<()> {
        let plan = &mut self.plans[i];
        let candidates: Vec<RawPath> = plan.staged.iter().cloned().collect();
        for u in candidates {
            if !same(&u)? {
                continue;
            }
            plan.units.remove(&u);
            plan.staged.remove(&u);
            plan.want.retain(|p, _| !fsx::within(p.as_bytes(), u.as_bytes()));
            plan.unchanged.push(u);
        }
        Ok(())
    }

    /// The units of plan `i` (host paths) that the snapshot has.
    pub fn staged_units(&self, i: usize) -> Vec<RawPath> {
        self.plans[i].staged.iter().cloned().collect()
    }

    /// Check that every filesystem has room for what will be built: `need`
    /// bytes of data per plan (its index), plus a block per entry.
    pub fn check_room(&self, need: &[(usize, u64)]) -> Result<()> {
        let mut by_dev: BTreeMap<u64, (u64, usize)> = BTreeMap::new();
        for &(i, bytes) in need {
            let plan = &self.plans[i];
            let Some(&(loc, _)) = plan.units.values().next() else {
                continue;
            };
            let fd = &self.loc_fds[loc];
            let dev = rustix::fs::fstat(fd)?.st_dev;
            let meta = plan.want.len() as u64 * 4096;
            let e = by_dev.entry(dev).or_insert((0, loc));
            e.0 += bytes + meta;
        }
        for (need, loc) in by_dev.values() {
            let room = fsx::room(self.loc_fds[*loc].as_fd())?;
            // A margin for the filesystem's own metadata.
            let need = need + need / 50 + (1 << 20);
            if room < need {
                bail!(
                    "not enough space to restore: the restore is built beside the live files before they are replaced, and needs {} MiB on the filesystem of {}, which has {} MiB free; free some space and retry (nothing was changed)",
                    need.div_ceil(1 << 20),
                    self.locations[*loc].path,
                    room >> 20
                );
            }
        }
        Ok(())
    }

    /// Make the staging directories (journalled first, so an agent killed
    /// from here on cleans them up when it starts again).
    pub fn begin(&mut self) -> Result<()> {
        self.journal = Journal {
            phase: "building".into(),
            locations: self.locations.clone(),
            units: Vec::new(),
            kept: Vec::new(),
        };
        save(self.dir, &self.journal)?;
        for (i, loc) in self.locations.iter_mut().enumerate() {
            let fd = &self.loc_fds[i];
            rustix::fs::mkdirat(fd, loc.staging.as_str(), Mode::from_raw_mode(0o700))
                .with_context(|| format!("making a staging directory in {}", loc.path))?;
            let s = rustix::fs::openat(
                fd,
                loc.staging.as_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let st = rustix::fs::fstat(&s)?;
            if st.st_uid != rustix::process::geteuid().as_raw() || st.st_mode & 0o077 != 0 {
                bail!("the staging directory in {} is not the agent's own", loc.path);
            }
            rustix::fs::fchmod(&s, Mode::from_raw_mode(0o700))?;
            loc.staging_ino = st.st_ino;
            self.staging_fds.push(s);
        }
        self.journal.locations = self.locations.clone();
        save(self.dir, &self.journal)?;
        crash_point("restore-building");
        Ok(())
    }

    /// A builder that makes plan `i`'s restored tree from its entries.
    pub fn builder(&self, i: usize) -> Builder<'_> {
        Builder {
            r: self,
            plan: &self.plans[i],
            stack: Vec::new(),
            file: None,
            seen: 0,
        }
    }

    /// Check the built trees against their manifests (metadata of every
    /// path, read back through handles); nothing live has changed yet.
    pub fn check_built(&mut self) -> Result<()> {
        let mut units = Vec::new();
        let mut kept = Vec::new();
        for plan in &self.plans {
            let mut seen = 0usize;
            for (path, (loc, name)) in &plan.units {
                let staged = if plan.staged.contains(path) {
                    let node = fsx::open_child(self.staging_fds[*loc].as_fd(), name.as_bytes())?
                        .with_context(|| format!("the restored {path} was not built"))?;
                    let ino = node.stat.st_ino;
                    let dev = node.stat.st_dev;
                    fsx::walk(node, path.clone(), dev, &plan.skip, &mut |e, _| {
                        seen += 1;
                        check(&plan.want, &e, false)
                    })?;
                    Some((dev, ino))
                } else {
                    None
                };
                units.push(Unit {
                    loc: *loc,
                    name: name.clone(),
                    staged_ino: staged,
                });
            }
            seen += plan.kept.len();
            if seen != plan.want.len() {
                bail!(
                    "the restored tree has {seen} paths; the snapshot has {}",
                    plan.want.len()
                );
            }
            kept.extend(plan.kept.values().cloned());
        }
        self.journal.units = units;
        self.journal.kept = kept;
        Ok(())
    }

    /// Make the built trees durable, journal the swaps, and swap them in.
    /// Then give kept directories their metadata back, make that durable,
    /// and remove what was replaced.
    pub fn commit(mut self) -> Result<()> {
        let mut devs = BTreeSet::new();
        for fd in &self.staging_fds {
            if devs.insert(rustix::fs::fstat(fd)?.st_dev) {
                rustix::fs::syncfs(fd)?;
            }
        }
        self.journal.phase = "swapping".into();
        save(self.dir, &self.journal)?;
        finish(self.root, self.dir, &mut self.journal, &self.loc_fds, &self.staging_fds)
    }

    /// Remove the staging directories (a restore that stops before its
    /// first swap): the live tree was never touched.
    pub fn abandon(self) {
        clean(&self.locations, &self.loc_fds, &self.staging_fds);
        let _ = std::fs::remove_file(journal_path(self.dir));
    }
}

/// Compare an entry read from a built tree (or a snapshot) with the
/// manifest's; the digest too when `digest`.
fn check(want: &HashMap<RawPath, Entry>, e: &Entry, digest: bool) -> Result<()> {
    let Some(w) = want.get(&e.path) else {
        bail!("{} is not in the snapshot's manifest", e.path);
    };
    let mut a = e.clone();
    let mut b = w.clone();
    if !digest {
        a.sha256.clear();
        b.sha256.clear();
    }
    if a != b {
        bail!(
            "{} does not match the snapshot's manifest ({} {:o} {}:{} {} bytes; the manifest has {} {:o} {}:{} {} bytes)",
            e.path,
            a.kind.as_str(),
            a.mode,
            a.uid,
            a.gid,
            a.size,
            b.kind.as_str(),
            b.mode,
            b.uid,
            b.gid,
            b.size
        );
    }
    Ok(())
}

/// Makes a restored tree, entry by entry in pre-order, checking each
/// against the manifest as it goes.
pub struct Builder<'a> {
    r: &'a Restore<'a>,
    plan: &'a Plan,
    stack: Vec<(RawPath, File, Entry)>,
    file: Option<(File, Entry, BlockDigest)>,
    seen: usize,
}

impl Builder<'_> {
    fn pop_to(&mut self, parent: &RawPath) -> Result<()> {
        while let Some((p, _, _)) = self.stack.last() {
            if p == parent {
                break;
            }
            if let Some((_, f, e)) = self.stack.pop() {
                fsx::set_times(f.as_fd(), &e)?;
            }
        }
        Ok(())
    }

    /// Whether an entry is in a unit left as it is (it is not given).
    pub fn unchanged(&self, p: &RawPath) -> bool {
        self.plan
            .unchanged
            .iter()
            .any(|u| fsx::within(p.as_bytes(), u.as_bytes()))
    }

    /// The next entry. Its metadata must match the manifest; a file's
    /// content follows as [`Builder::block`]s or one [`Builder::clone_from`].
    pub fn entry(&mut self, e: Entry) -> Result<()> {
        if self.file.is_some() {
            bail!("an entry before the previous file ended");
        }
        check(&self.plan.want, &e, false)?;
        if self.plan.kept.contains_key(&e.path) {
            self.pop_to(&RawPath(Vec::new()))?;
            self.seen += 1;
            return Ok(());
        }
        let (dir, name): (BorrowedFd<'_>, RawPath) = if let Some((loc, name)) = self.plan.units.get(&e.path) {
            self.pop_to(&RawPath(Vec::new()))?;
            (self.r.staging_fds[*loc].as_fd(), name.clone())
        } else {
            let parent = e.path.parent();
            self.pop_to(&parent)?;
            match self.stack.last() {
                Some((p, f, _)) if *p == parent => (f.as_fd(), RawPath(e.path.name().to_vec())),
                _ => bail!("{} is outside every path being restored", e.path),
            }
        };
        let made = fsx::make(dir, name.as_bytes(), &e).with_context(|| format!("restoring {}", e.path))?;
        self.seen += 1;
        match e.kind {
            Kind::File => {
                let f = made.context("a file was not created")?;
                let size = e.size;
                self.file = Some((f, e, BlockDigest::new(size)));
            }
            Kind::Dir => {
                let f = File::from(open_name(dir, name.as_bytes())?);
                fsx::set_meta(f.as_fd(), &e)?;
                self.stack.push((e.path.clone(), f, e));
            }
            _ => fsx::set_meta_at(dir, name.as_bytes(), &e)?,
        }
        Ok(())
    }

    /// A data block of the current file.
    pub fn block(&mut self, off: u64, bytes: &[u8]) -> Result<()> {
        let Some((f, e, d)) = self.file.as_mut() else {
            bail!("data outside a file");
        };
        if off.checked_add(bytes.len() as u64).is_none_or(|end| end > e.size) {
            bail!("{}: data past the file's end", e.path);
        }
        fsx::write_block(f, off, bytes).with_context(|| format!("restoring {}", e.path))?;
        d.block(off, bytes);
        Ok(())
    }

    /// The current file's content as a reflink of `src` (btrfs).
    pub fn clone_from(&mut self, src: &File) -> Result<()> {
        let Some((f, e, _)) = self.file.as_mut() else {
            bail!("data outside a file");
        };
        rustix::fs::ioctl_ficlone(&*f, src).with_context(|| format!("restoring {} (reflink)", e.path))?;
        Ok(())
    }

    /// The end of the current file; `check_digest` compares its content
    /// digest (of the blocks written) with the manifest's.
    pub fn end_file(&mut self, check_digest: bool) -> Result<()> {
        let Some((f, e, d)) = self.file.take() else {
            bail!("the end of a file that did not start");
        };
        if check_digest {
            let got = d.finish();
            let want = self.plan.want.get(&e.path).map(|w| w.sha256.as_str()).unwrap_or("");
            if got != want {
                bail!("{} in the snapshot does not match its manifest hash", e.path);
            }
        }
        fsx::set_meta(f.as_fd(), &e)?;
        fsx::set_times(f.as_fd(), &e)?;
        Ok(())
    }

    /// Every entry given: set the last directories' times. Returns how
    /// many entries were given.
    pub fn finish(mut self) -> Result<usize> {
        if self.file.is_some() {
            bail!("the last file did not end");
        }
        self.pop_to(&RawPath(Vec::new()))?;
        Ok(self.seen)
    }
}

fn open_name(dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        std::os::unix::ffi::OsStrExt::from_bytes(name) as &std::ffi::OsStr,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn ino_of(dir: BorrowedFd<'_>, name: &[u8]) -> Option<u64> {
    fsx::open_child(dir, name).ok().flatten().map(|n: Node| n.stat.st_ino)
}

fn id_of(dir: BorrowedFd<'_>, name: &[u8]) -> Option<(u64, u64)> {
    fsx::open_child(dir, name)
        .ok()
        .flatten()
        .map(|n: Node| (n.stat.st_dev, n.stat.st_ino))
}

/// Swap every unit not yet swapped (each step can be run again: where the
/// restored tree's inode is tells whether it was), restore kept
/// directories' metadata, make it durable, journal it, clean up.
fn finish(
    root: BorrowedFd<'_>,
    dir: &Path,
    j: &mut Journal,
    loc_fds: &[OwnedFd],
    staging_fds: &[OwnedFd],
) -> Result<()> {
    for (k, u) in j.units.iter().enumerate() {
        let (loc, staging) = (loc_fds[u.loc].as_fd(), staging_fds[u.loc].as_fd());
        let name = std::os::unix::ffi::OsStrExt::from_bytes(u.name.as_bytes()) as &std::ffi::OsStr;
        match u.staged_ino {
            Some(ino) => {
                if id_of(loc, u.name.as_bytes()) == Some(ino) {
                    continue;
                }
                if id_of(staging, u.name.as_bytes()) != Some(ino) {
                    bail!(
                        "the restored {} is neither in place nor in its staging directory",
                        u.name
                    );
                }
                // The live name may come and go under a tenant's hands:
                // exchange when it is there, place when it is not.
                let mut done = false;
                for _ in 0..8 {
                    let r = if ino_of(loc, u.name.as_bytes()).is_some() {
                        rustix::fs::renameat_with(staging, name, loc, name, RenameFlags::EXCHANGE)
                    } else {
                        rustix::fs::renameat_with(staging, name, loc, name, RenameFlags::NOREPLACE)
                    };
                    match r {
                        Ok(()) => {
                            done = true;
                            break;
                        }
                        Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::EXIST) => continue,
                        Err(e) => return Err(e).with_context(|| format!("swapping {} into place", u.name)),
                    }
                }
                if !done {
                    bail!("{} kept changing while it was swapped into place", u.name);
                }
            }
            None => {
                if ino_of(loc, u.name.as_bytes()).is_none() {
                    continue;
                }
                match rustix::fs::renameat_with(loc, name, staging, name, RenameFlags::NOREPLACE) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                    Err(e) => return Err(e).with_context(|| format!("moving {} aside", u.name)),
                }
            }
        }
        if k == 0 {
            crash_point("restore-swapping");
        }
    }
    // Kept directories last: the swaps moved their times.
    let mut kept = j.kept.clone();
    kept.sort_by(|a, b| b.path.cmp(&a.path));
    for e in &kept {
        if let Some(fd) = fsx::open_beneath(root, e.path.as_bytes(), true)? {
            let st = rustix::fs::fstat(&fd)?;
            if st.st_uid != e.uid || st.st_gid != e.gid || st.st_mode & 0o7777 != e.mode {
                rustix::fs::fchown(
                    &fd,
                    Some(rustix::fs::Uid::from_raw(e.uid)),
                    Some(rustix::fs::Gid::from_raw(e.gid)),
                )?;
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(e.mode))?;
            }
            fsx::set_times(fd.as_fd(), e)?;
        }
    }
    let mut devs = BTreeSet::new();
    for fd in loc_fds {
        if devs.insert(rustix::fs::fstat(fd)?.st_dev) {
            rustix::fs::syncfs(fd)?;
        }
    }
    j.phase = "swapped".into();
    save(dir, j)?;
    clean(&j.locations, loc_fds, staging_fds);
    std::fs::remove_file(journal_path(dir))?;
    Ok(())
}

/// Empty and remove the staging directories (through their handles; the
/// name is removed only while it is still the agent's directory).
fn clean(locations: &[Location], loc_fds: &[OwnedFd], staging_fds: &[OwnedFd]) {
    for (i, loc) in locations.iter().enumerate() {
        let (Some(l), Some(s)) = (loc_fds.get(i), staging_fds.get(i)) else {
            continue;
        };
        if let Ok(names) = fsx::names(s.as_fd()) {
            for n in names {
                if let Err(e) = fsx::remove_all(s.as_fd(), &n, &super::btrfs::delete_subvolume_at) {
                    tracing::warn!("removing the replaced {} in {}: {e:#}", RawPath(n), loc.path);
                }
            }
        }
        let ours = rustix::fs::fstat(s).ok().map(|st| st.st_ino);
        if ours.is_some() && ino_of(l.as_fd(), loc.staging.as_bytes()) == ours {
            let _ = rustix::fs::unlinkat(l, loc.staging.as_str(), AtFlags::REMOVEDIR);
        }
    }
}

/// Finish or undo a restore that was interrupted in snapshot directory
/// `dir`: killed while building, its staging directories go and the write
/// set is as it was; killed while swapping, the swaps are finished.
pub fn recover_dir(root: BorrowedFd<'_>, dir: &Path) -> Result<bool> {
    let Ok(bytes) = std::fs::read(journal_path(dir)) else {
        return Ok(false);
    };
    let mut j: Journal = serde_json::from_slice(&bytes).context("reading an interrupted restore's journal")?;
    let mut loc_fds = Vec::new();
    let mut staging_fds = Vec::new();
    let mut locations = Vec::new();
    for loc in &j.locations {
        let Some(l) = fsx::open_beneath(root, loc.path.as_bytes(), true)? else {
            continue;
        };
        let s = match fsx::open_child(l.as_fd(), loc.staging.as_bytes())? {
            // Killed between making it and recording its inode: the name is
            // random and only root can make a 0700 root directory.
            Some(n)
                if n.kind() == Kind::Dir
                    && (n.stat.st_ino == loc.staging_ino
                        || (loc.staging_ino == 0 && n.stat.st_uid == 0 && n.stat.st_mode & 0o777 == 0o700)) =>
            {
                n.reopen()?
            }
            _ => {
                if j.phase == "swapping" {
                    bail!(
                        "the staging directory of an interrupted restore in {} is gone; the restore cannot be finished (run it again)",
                        loc.path
                    );
                }
                continue;
            }
        };
        locations.push(loc.clone());
        loc_fds.push(l);
        staging_fds.push(OwnedFd::from(s));
    }
    if j.phase == "swapping" {
        if locations.len() != j.locations.len() {
            bail!("an interrupted restore's directories are gone; run the restore again");
        }
        finish(root, dir, &mut j, &loc_fds, &staging_fds)?;
    } else {
        clean(&locations, &loc_fds, &staging_fds);
        std::fs::remove_file(journal_path(dir))?;
    }
    Ok(true)
}
