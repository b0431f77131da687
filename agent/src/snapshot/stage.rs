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
use std::os::unix::ffi::OsStrExt as _;
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
    /// Host path of the directory that holds the staging directory: the
    /// top of the same filesystem when only root can write there (no
    /// tenant can rename the staging directory away), else `path`.
    pub holder: RawPath,
    /// The staging directory's name in the holder.
    pub staging: String,
    /// The staging directory's inode (0 until it is made).
    #[serde(default)]
    pub staging_ino: u64,
    /// Host path of the mount the part is on (subvolumes found in a
    /// replaced tree are deleted by their id through it).
    pub mount: RawPath,
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

/// A directory kept in place, and the metadata it gets back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Kept {
    /// Its snapshot entry.
    pub entry: Entry,
    /// Its inode when the restore was planned (it must still be that one).
    pub ino: u64,
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
    pub kept: Vec<Kept>,
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
    /// The part's mount.
    mount: String,
}

/// Plans and carries out restores of one or more parts together.
pub struct Restore<'a> {
    root: BorrowedFd<'a>,
    root_path: &'a Path,
    dir: &'a Path,
    token: String,
    locations: Vec<Location>,
    loc_fds: Vec<OwnedFd>,
    staging_fds: Vec<OwnedFd>,
    kept_fds: Vec<(Kept, OwnedFd)>,
    by_path: HashMap<RawPath, usize>,
    plans: Vec<Plan>,
    journal: Journal,
    /// Every part's roots: a part never swaps another part's place away,
    /// even when that place is gone.
    all_roots: Vec<RawPath>,
    /// Mount points under the host root now.
    mounts: Vec<RawPath>,
}

impl<'a> Restore<'a> {
    /// A restore under host root `root` (open as `root_fd`), journalled in
    /// snapshot directory `dir`, of a snapshot whose parts have `all_roots`.
    pub fn new(root_fd: BorrowedFd<'a>, root: &'a Path, dir: &'a Path, all_roots: &[String]) -> Result<Restore<'a>> {
        let mounts = crate::mountinfo::read()?
            .iter()
            .filter_map(|m| {
                m.point
                    .strip_prefix(root)
                    .ok()
                    .map(|rel| rel.as_os_str().as_bytes().to_vec())
            })
            .filter(|rel| !rel.is_empty())
            .map(|rel| {
                let mut v = b"/".to_vec();
                v.extend(rel);
                RawPath(v)
            })
            .collect();
        Ok(Restore {
            root: root_fd,
            root_path: root,
            dir,
            token: hex::encode(rand::random::<[u8; 8]>()),
            locations: Vec::new(),
            loc_fds: Vec::new(),
            staging_fds: Vec::new(),
            kept_fds: Vec::new(),
            by_path: HashMap::new(),
            plans: Vec::new(),
            journal: Journal::default(),
            all_roots: all_roots.iter().map(|r| RawPath(fsx::raw(r))).collect(),
            mounts,
        })
    }

    /// The top of the filesystem holding `loc` when only root can write
    /// there, else `loc` itself.
    fn holder_for(&self, loc: &RawPath, dev: u64) -> RawPath {
        let mut best = loc.clone();
        let mut p = loc.clone();
        loop {
            let Ok(Some(n)) = fsx::node_at(self.root, p.as_bytes()) else {
                break;
            };
            if n.stat.st_dev != dev || n.kind() != Kind::Dir {
                break;
            }
            if n.stat.st_uid == 0 && n.stat.st_mode & 0o022 == 0 {
                best = p.clone();
            }
            if p.as_bytes() == b"/" {
                break;
            }
            p = p.parent();
        }
        best
    }

    fn location(&mut self, path: &RawPath, mount: &str) -> Result<usize> {
        if let Some(&i) = self.by_path.get(path) {
            return Ok(i);
        }
        let fd = fsx::open_beneath(self.root, path.as_bytes(), true)?
            .with_context(|| format!("{path} is not there to restore into"))?;
        let dev = rustix::fs::fstat(&fd)?.st_dev;
        let i = self.locations.len();
        self.locations.push(Location {
            path: path.clone(),
            holder: self.holder_for(path, dev),
            staging: format!(".wavegate-restore-{}-{i}", self.token),
            staging_ino: 0,
            mount: RawPath(fsx::raw(mount)),
        });
        self.loc_fds.push(fd);
        self.by_path.insert(path.clone(), i);
        Ok(i)
    }

    /// Plan a part: which names are swapped, which directories stay.
    /// Returns the plan's index.
    pub fn plan(&mut self, part: &Part) -> Result<usize> {
        let mine: Vec<RawPath> = part.roots.keys().map(|r| RawPath(fsx::raw(r))).collect();
        // What must stay where it is: paths left out that are there, the
        // places of other parts (there or not), and every mount point.
        let mut present: Vec<RawPath> = Vec::new();
        for s in &part.skip {
            let s = RawPath(fsx::raw(s));
            if fsx::node_at(self.root, s.as_bytes()).ok().flatten().is_some() {
                present.push(s);
            }
        }
        present.extend(self.all_roots.iter().filter(|r| !mine.contains(r)).cloned());
        let mounts: Vec<RawPath> = self
            .mounts
            .iter()
            .filter(|m| m.as_bytes() != part.mount.as_bytes())
            .cloned()
            .collect();
        present.extend(mounts.iter().cloned());
        let skipped = |p: &RawPath| {
            fsx::skipped(p.as_bytes(), &part.skip) || mounts.iter().any(|m| fsx::within(p.as_bytes(), m.as_bytes()))
        };
        let holds = |p: &RawPath| {
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
            mount: part.mount.clone(),
        };
        let mut queue: Vec<(RawPath, bool)> = mine.iter().map(|r| (r.clone(), true)).collect();
        while let Some((p, is_root)) = queue.pop() {
            if skipped(&p) {
                continue;
            }
            let live = fsx::node_at(self.root, p.as_bytes())?;
            if live.is_none() && !plan.want.contains_key(&p) {
                // Not there before, not there now: nothing to do.
                continue;
            }
            let parent = fsx::node_at(self.root, p.parent().as_bytes())?;
            let parent_dev = parent.as_ref().map(|n| n.stat.st_dev);
            let boundary = p.as_bytes() == b"/"
                || p.as_bytes() == fsx::raw(&part.mount).as_slice()
                || live.as_ref().is_some_and(|n| {
                    n.kind() == Kind::Dir
                        && (Some(n.stat.st_dev) != parent_dev || (n.stat.st_ino == 256 && fsx::is_btrfs(n.fd.as_fd())))
                });
            if !boundary && !holds(&p) {
                if let Some(n) = &live
                    && Some(n.stat.st_dev) != parent_dev
                {
                    bail!("{p} is on another filesystem than its directory; it cannot be swapped");
                }
                // The directory a root is swapped in is outside the write
                // set: it must be the one it was at the snapshot, not one
                // a tenant renamed into its place.
                if is_root && let Some(want) = part.parents.get(&p.escaped()) {
                    let now = parent.as_ref().map(|n| (n.stat.st_ino, n.stat.st_uid, n.stat.st_gid));
                    if now != Some((want[0], want[1] as u32, want[2] as u32)) {
                        bail!(
                            "the directory holding {p} is not the one it was when the snapshot was taken (replaced or renamed since); refusing to restore into it"
                        );
                    }
                }
                let loc = self.location(&p.parent(), &part.mount)?;
                if plan.want.contains_key(&p) {
                    plan.staged.insert(p.clone());
                }
                plan.units.insert(p.clone(), (loc, RawPath(p.name().to_vec())));
                continue;
            }
            // It stays; what is in it is swapped name by name.
            let why = "it holds a mount, a subvolume or a path left out of the snapshot";
            let Some(e) = plan.want.get(&p).filter(|e| e.kind == Kind::Dir).cloned() else {
                bail!("{p} must stay where it is ({why}) but the snapshot does not have it as a directory");
            };
            let Some(fd) = fsx::open_beneath(self.root, p.as_bytes(), true)? else {
                bail!("{p} must stay where it is ({why}) but it is not a directory now");
            };
            let st = rustix::fs::fstat(&fd)?;
            // A tenant who can rename names in its parent could put another
            // directory in its place: it must still belong to whom it did.
            if (st.st_uid, st.st_gid) != (e.uid, e.gid) {
                bail!(
                    "{p} must stay where it is ({why}) but its owner changed since the snapshot ({}:{} now, {}:{} then); refusing to restore into it",
                    st.st_uid,
                    st.st_gid,
                    e.uid,
                    e.gid
                );
            }
            plan.kept.insert(p.clone(), e.clone());
            let mut names: BTreeSet<Vec<u8>> = fsx::names(fd.as_fd())?.into_iter().collect();
            self.kept_fds.push((
                Kept {
                    entry: e,
                    ino: st.st_ino,
                },
                fd,
            ));
            for w in plan.want.keys() {
                if w.parent() == p && w != &p {
                    names.insert(w.name().to_vec());
                }
            }
            let prefix = format!(".wavegate-restore-{}", self.token);
            for n in names {
                if n.starts_with(prefix.as_bytes()) {
                    continue;
                }
                queue.push((p.child(&n), false));
            }
        }
        self.plans.push(plan);
        Ok(self.plans.len() - 1)
    }

    /// Leave alone every unit of plan `i` that `same` says is unchanged
    /// since the snapshot: it is neither rebuilt nor swapped. A changed
    /// unit that `same_dir` says is still the same directory (only what is
    /// in it changed) stays in place and its names become units in turn,
    /// so only what changed is rebuilt.
    pub fn keep_unchanged(
        &mut self,
        i: usize,
        same: &dyn Fn(&RawPath) -> Result<bool>,
        same_dir: &dyn Fn(&RawPath) -> Result<bool>,
    ) -> Result<()> {
        let mut queue: Vec<RawPath> = self.plans[i].staged.iter().cloned().collect();
        while let Some(u) = queue.pop() {
            if same(&u)? {
                let plan = &mut self.plans[i];
                plan.units.remove(&u);
                plan.staged.remove(&u);
                plan.want.retain(|p, _| !fsx::within(p.as_bytes(), u.as_bytes()));
                plan.unchanged.push(u);
                continue;
            }
            if !same_dir(&u)? {
                continue;
            }
            let Some(e) = self.plans[i].want.get(&u).filter(|e| e.kind == Kind::Dir).cloned() else {
                continue;
            };
            let Some(fd) = fsx::open_beneath(self.root, u.as_bytes(), true)? else {
                continue;
            };
            let st = rustix::fs::fstat(&fd)?;
            if (st.st_uid, st.st_gid) != (e.uid, e.gid) {
                continue;
            }
            let mount = self.plans[i].mount.clone();
            let loc = self.location(&u, &mount)?;
            let mut names: BTreeSet<Vec<u8>> = fsx::names(fd.as_fd())?.into_iter().collect();
            let plan = &mut self.plans[i];
            for w in plan.want.keys() {
                if w.parent() == u && *w != u {
                    names.insert(w.name().to_vec());
                }
            }
            plan.units.remove(&u);
            plan.staged.remove(&u);
            plan.kept.insert(u.clone(), e.clone());
            self.kept_fds.push((
                Kept {
                    entry: e,
                    ino: st.st_ino,
                },
                fd,
            ));
            for n in names {
                let c = u.child(&n);
                plan.units.insert(c.clone(), (loc, RawPath(n)));
                if plan.want.contains_key(&c) {
                    plan.staged.insert(c.clone());
                    queue.push(c);
                }
            }
        }
        Ok(())
    }

    /// Check that every filesystem has room for what will be built: `need`
    /// bytes of data per plan (its index), plus a block per entry.
    pub fn check_room(&self, need: &[(usize, u64)]) -> Result<()> {
        // No plan may put its units inside another plan's unit: that tree
        // goes away in the swap.
        for (a, pa) in self.plans.iter().enumerate() {
            for (b, pb) in self.plans.iter().enumerate() {
                if a == b {
                    continue;
                }
                for &(loc, _) in pa.units.values() {
                    let lp = &self.locations[loc].path;
                    if let Some(u) = pb.units.keys().find(|u| fsx::within(lp.as_bytes(), u.as_bytes())) {
                        bail!("{lp} is inside {u}, which another part of the snapshot replaces; refusing the restore");
                    }
                }
            }
        }
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
        for loc in &mut self.locations {
            let holder = fsx::open_beneath(self.root, loc.holder.as_bytes(), true)?
                .with_context(|| format!("{} is gone", loc.holder))?;
            rustix::fs::mkdirat(&holder, loc.staging.as_str(), Mode::from_raw_mode(0o700))
                .with_context(|| format!("making a staging directory in {}", loc.holder))?;
            let s = rustix::fs::openat(
                &holder,
                loc.staging.as_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let st = rustix::fs::fstat(&s)?;
            if st.st_uid != rustix::process::geteuid().as_raw()
                || st.st_mode & 0o077 != 0
                || st.st_ino == 256
                || !fsx::names(s.as_fd())?.is_empty()
            {
                bail!("the staging directory in {} is not the one the agent made", loc.holder);
            }
            // A default ACL inherited from its directory would give what is
            // built in it attributes the snapshot does not have.
            let _ = rustix::fs::fremovexattr(&s, "system.posix_acl_default");
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
        }
        self.journal.units = units;
        self.journal.kept = self.kept_fds.iter().map(|(k, _)| k.clone()).collect();
        Ok(())
    }

    /// Make the built trees durable, journal the swaps, and swap them in.
    /// Then give kept directories their metadata back, make that durable,
    /// and remove what was replaced. A swap that fails undoes the ones
    /// before it: the write set is then as it was.
    pub fn commit(mut self) -> Result<()> {
        let mut devs = BTreeSet::new();
        for fd in &self.staging_fds {
            if devs.insert(rustix::fs::fstat(fd)?.st_dev) {
                rustix::fs::syncfs(fd)?;
            }
        }
        self.journal.phase = "swapping".into();
        save(self.dir, &self.journal)?;
        let kept: Vec<(Kept, OwnedFd)> = std::mem::take(&mut self.kept_fds);
        finish(
            self.root_path,
            self.dir,
            &mut self.journal,
            &self.loc_fds,
            &self.staging_fds,
            Some(&kept),
            self.root,
        )
    }

    /// Remove the staging directories (a restore that stops before its
    /// first swap): the live tree was never touched.
    pub fn abandon(self) {
        clean(self.root_path, &self.locations, &self.staging_fds, self.root);
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

    /// The current file's content as a reflink of `src` (btrfs), or a
    /// copy that keeps its holes where a reflink is refused (a file marked
    /// no-copy-on-write cannot be cloned into a new one).
    pub fn clone_from(&mut self, src: &File) -> Result<()> {
        let Some((f, e, _)) = self.file.as_mut() else {
            bail!("data outside a file");
        };
        match rustix::fs::ioctl_ficlone(&*f, src) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::XDEV) | Err(rustix::io::Errno::OPNOTSUPP) => {
                fsx::copy_sparse(src, e.size, f).with_context(|| format!("restoring {} (copy)", e.path))
            }
            Err(err) => Err(err).with_context(|| format!("restoring {} (reflink)", e.path)),
        }
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

fn id_of(dir: BorrowedFd<'_>, name: &[u8]) -> Option<(u64, u64)> {
    fsx::open_child(dir, name)
        .ok()
        .flatten()
        .map(|n: Node| (n.stat.st_dev, n.stat.st_ino))
}

fn os(b: &[u8]) -> &std::ffi::OsStr {
    std::os::unix::ffi::OsStrExt::from_bytes(b)
}

/// Swap one unit in (each step can be run again: where the restored tree's
/// inode is tells whether it was).
fn swap_in(u: &Unit, loc: BorrowedFd<'_>, staging: BorrowedFd<'_>) -> Result<()> {
    let name = os(u.name.as_bytes());
    match u.staged_ino {
        Some(id) => {
            if id_of(loc, u.name.as_bytes()) == Some(id) {
                return Ok(());
            }
            if id_of(staging, u.name.as_bytes()) != Some(id) {
                bail!(
                    "the restored {} is neither in place nor in its staging directory",
                    u.name
                );
            }
            // The live name may come and go under a tenant's hands:
            // exchange when it is there, place when it is not.
            for _ in 0..8 {
                let r = if id_of(loc, u.name.as_bytes()).is_some() {
                    rustix::fs::renameat_with(staging, name, loc, name, RenameFlags::EXCHANGE)
                } else {
                    rustix::fs::renameat_with(staging, name, loc, name, RenameFlags::NOREPLACE)
                };
                match r {
                    Ok(()) => return Ok(()),
                    Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::EXIST) => continue,
                    // overlayfs without redirect_dir=on cannot rename a
                    // directory its lower layer holds: say so, not EXDEV.
                    Err(rustix::io::Errno::XDEV) => bail!(
                        "swapping {} into place: this filesystem refuses to swap directories (an overlayfs root needs the mount option redirect_dir=on for that); nothing was lost",
                        u.name
                    ),
                    Err(e) => return Err(e).with_context(|| format!("swapping {} into place", u.name)),
                }
            }
            bail!("{} kept changing while it was swapped into place", u.name)
        }
        None => match rustix::fs::renameat_with(loc, name, staging, name, RenameFlags::NOREPLACE) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("moving {} aside", u.name)),
        },
    }
}

/// Undo a unit's swap, if it was made.
fn swap_out(u: &Unit, loc: BorrowedFd<'_>, staging: BorrowedFd<'_>) -> Result<()> {
    let name = os(u.name.as_bytes());
    match u.staged_ino {
        Some(id) => {
            if id_of(loc, u.name.as_bytes()) != Some(id) {
                return Ok(());
            }
            let r = if id_of(staging, u.name.as_bytes()).is_some() {
                rustix::fs::renameat_with(loc, name, staging, name, RenameFlags::EXCHANGE)
            } else {
                rustix::fs::renameat_with(loc, name, staging, name, RenameFlags::NOREPLACE)
            };
            r.with_context(|| format!("putting {} back as it was", u.name))
        }
        None => {
            if id_of(staging, u.name.as_bytes()).is_none() || id_of(loc, u.name.as_bytes()).is_some() {
                return Ok(());
            }
            rustix::fs::renameat_with(staging, name, loc, name, RenameFlags::NOREPLACE)
                .with_context(|| format!("putting {} back as it was", u.name))
        }
    }
}

/// Swap every unit not yet swapped; when one cannot be, undo the ones
/// before it. Then restore kept directories' metadata, make it durable,
/// journal it, clean up.
fn finish(
    root_path: &Path,
    dir: &Path,
    j: &mut Journal,
    loc_fds: &[OwnedFd],
    staging_fds: &[OwnedFd],
    kept_fds: Option<&[(Kept, OwnedFd)]>,
    root: BorrowedFd<'_>,
) -> Result<()> {
    // A mount put on a name since the plan cannot be swapped: find out
    // before the first swap.
    for u in &j.units {
        let loc = loc_fds[u.loc].as_fd();
        if let Some(n) = fsx::open_child(loc, u.name.as_bytes())?
            && n.stat.st_dev != rustix::fs::fstat(loc)?.st_dev
            && Some((n.stat.st_dev, n.stat.st_ino)) != u.staged_ino
        {
            bail!(
                "{} in {} is a mount now; the restore cannot swap it (nothing was changed)",
                u.name,
                j.locations[u.loc].path
            );
        }
    }
    for (k, u) in j.units.iter().enumerate() {
        let (loc, staging) = (loc_fds[u.loc].as_fd(), staging_fds[u.loc].as_fd());
        if let Err(e) = swap_in(u, loc, staging) {
            let mut undo = Vec::new();
            for v in j.units[..=k].iter().rev() {
                if let Err(e) = swap_out(v, loc_fds[v.loc].as_fd(), staging_fds[v.loc].as_fd()) {
                    undo.push(format!("{e:#}"));
                }
            }
            if undo.is_empty() {
                j.phase = "building".into();
                save(dir, j)?;
                clean(root_path, &j.locations, staging_fds, root);
                let _ = std::fs::remove_file(journal_path(dir));
                return Err(e.context("the restore was undone: the write set is as it was before it"));
            }
            return Err(e.context(format!(
                "the restore could not be undone either ({}); run it again",
                undo.join("; ")
            )));
        }
        if k == 0 {
            crash_point("restore-swapping");
        }
    }
    // Kept directories last: the swaps moved their times.
    let apply = |e: &Entry, fd: BorrowedFd<'_>| -> Result<()> {
        fsx::set_meta(fd, e)?;
        fsx::set_times(fd, e)
    };
    match kept_fds {
        Some(kept) => {
            for (k, fd) in kept.iter().rev() {
                apply(&k.entry, fd.as_fd())?;
            }
        }
        None => {
            for k in j.kept.iter().rev() {
                if let Some(fd) = fsx::open_beneath(root, k.entry.path.as_bytes(), true)? {
                    let st = rustix::fs::fstat(&fd)?;
                    if st.st_ino == k.ino && (st.st_uid, st.st_gid) == (k.entry.uid, k.entry.gid) {
                        apply(&k.entry, fd.as_fd())?;
                    } else {
                        tracing::warn!(
                            "{} is not the directory it was; its metadata is left as it is",
                            k.entry.path
                        );
                    }
                }
            }
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
    clean(root_path, &j.locations, staging_fds, root);
    std::fs::remove_file(journal_path(dir))?;
    Ok(())
}

/// Empty and remove the staging directories (through their handles; the
/// name is removed only while it is still the agent's directory).
/// Subvolumes in a replaced tree are deleted by their id, never by a path
/// a tenant could redirect.
fn clean(root_path: &Path, locations: &[Location], staging_fds: &[OwnedFd], root: BorrowedFd<'_>) {
    for (loc, s) in locations.iter().zip(staging_fds) {
        let Ok(st) = rustix::fs::fstat(s) else { continue };
        let anchor = super::host_path(root_path, &String::from_utf8_lossy(loc.mount.as_bytes()));
        let subvolume = |d: BorrowedFd<'_>, n: &[u8]| super::btrfs::delete_subvolume_at(d, n, &anchor);
        if let Ok(names) = fsx::names(s.as_fd()) {
            for n in names {
                if let Err(e) = fsx::remove_all(s.as_fd(), &n, st.st_dev, &subvolume) {
                    tracing::warn!("removing the replaced {} of {}: {e:#}", RawPath(n), loc.path);
                }
            }
        }
        if let Ok(Some(h)) = fsx::open_beneath(root, loc.holder.as_bytes(), true)
            && fsx::open_child(h.as_fd(), loc.staging.as_bytes())
                .ok()
                .flatten()
                .is_some_and(|n| n.stat.st_ino == st.st_ino)
        {
            let _ = rustix::fs::unlinkat(&h, loc.staging.as_str(), AtFlags::REMOVEDIR);
        }
    }
}

/// Finish or undo a restore that was interrupted in snapshot directory
/// `dir`: killed while building, its staging directories go and the write
/// set is as it was; killed while swapping, the swaps are finished (or, if
/// one cannot be, all are undone).
pub fn recover_dir(root_path: &Path, root: BorrowedFd<'_>, dir: &Path) -> Result<bool> {
    let Ok(bytes) = std::fs::read(journal_path(dir)) else {
        return Ok(false);
    };
    let mut j: Journal = serde_json::from_slice(&bytes).context("reading an interrupted restore's journal")?;
    let mut loc_fds = Vec::new();
    let mut staging_fds = Vec::new();
    let mut locations = Vec::new();
    for loc in &j.locations {
        let opened = (|| -> Result<Option<(OwnedFd, OwnedFd)>> {
            let Some(l) = fsx::open_beneath(root, loc.path.as_bytes(), true)? else {
                return Ok(None);
            };
            let Some(h) = fsx::open_beneath(root, loc.holder.as_bytes(), true)? else {
                return Ok(None);
            };
            // Killed between making it and recording its inode: the name is
            // random and only root can make a 0700 root directory.
            match fsx::open_child(h.as_fd(), loc.staging.as_bytes())? {
                Some(n)
                    if n.kind() == Kind::Dir
                        && n.stat.st_uid == 0
                        && (n.stat.st_ino == loc.staging_ino
                            || (loc.staging_ino == 0 && n.stat.st_mode & 0o777 == 0o700)) =>
                {
                    Ok(Some((l, OwnedFd::from(n.reopen()?))))
                }
                _ => Ok(None),
            }
        })()?;
        match opened {
            Some((l, s)) => {
                locations.push(loc.clone());
                loc_fds.push(l);
                staging_fds.push(s);
            }
            None if j.phase == "swapping" => bail!(
                "the staging directory of an interrupted restore in {} is gone; the restore cannot be finished (run the restore again)",
                loc.holder
            ),
            None => {}
        }
    }
    if j.phase == "swapping" {
        finish(root_path, dir, &mut j, &loc_fds, &staging_fds, None, root)?;
    } else {
        clean(root_path, &locations, &staging_fds, root);
        std::fs::remove_file(journal_path(dir))?;
    }
    Ok(true)
}
