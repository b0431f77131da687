//! Package steps on this host: what a package step would change here, and
//! the write set that follows from it.
//!
//! Before a package step is dry-run, the agent checks that the package
//! manager is free (nobody holds its lock) and that every package to upgrade
//! is installed, asks the package manager offline which versions would
//! change (a simulation, in the sandbox), and reads the files of each
//! package: the installed version's from the package database, the new
//! version's from the package the fetch put in the cache. The write set is
//! the package manager's state plus the directories those files live in (a
//! package manager replaces a file by writing a new one beside it and
//! renaming it over the old one, so it needs the directory). The dry-run is
//! judged more narrowly: only the packages' own files (and the names the
//! package manager gives them on the way) and its state may change.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use wavegate_domain::effects::PackageChange;
use wavegate_domain::packages::{Manager, Packages};

use crate::mountinfo::within;

mod apt;

/// One package manager's database, as a dry-run reads it. The steps of
/// [`resolve`] are the same for every package manager; what differs is
/// here, one file per manager (`apt.rs`; dnf would be `dnf.rs`).
pub trait PackageDb {
    /// Lock files it holds while it works (checked on the host itself).
    fn locks(&self) -> &'static [&'static str];
    /// Installed packages, name -> version, read through `at` (a host path
    /// as the sandbox shows it). `Err` when the host has no such database.
    fn installed(&self, at: &dyn Fn(&str) -> PathBuf) -> Result<BTreeMap<String, String>, String>;
    /// Which versions the simulation's output says would change.
    fn changes(&self, simulation: &str) -> Vec<PackageChange>;
    /// The files of the installed package `name`.
    fn installed_files(&self, at: &dyn Fn(&str) -> PathBuf, name: &str) -> Vec<String>;
    /// The files of the version `change.to` of a package, from the package
    /// the fetch put in the cache: (path, is a directory).
    fn new_files(&self, at: &dyn Fn(&str) -> PathBuf, change: &PackageChange) -> Result<Vec<(String, bool)>, String>;
    /// Names it gives a file while it replaces it (suffixes).
    fn transient(&self) -> &'static [&'static str];
    /// The installed packages built from the same source as any of
    /// `names` (`nginx` and `nginx-common`): whose services a package
    /// step's maintainer scripts may restart.
    fn siblings(&self, at: &dyn Fn(&str) -> PathBuf, names: &[String]) -> Vec<String>;
}

/// The service units of the packages a package step names and of their
/// siblings ([`PackageDb::siblings`]): systemd units and SysV scripts (as
/// `NAME.service`), read from the installed packages' file lists. These
/// are the only services the step's maintainer scripts may act on.
pub fn services(host_root: &Path, p: &Packages) -> BTreeSet<String> {
    let Ok(db) = db(p.manager) else {
        return BTreeSet::new();
    };
    let at = |rel: &str| host_root.join(rel.trim_start_matches('/'));
    let mut names: Vec<String> = p.upgrade.clone();
    names.extend(p.install.iter().map(|(n, _)| n.clone()));
    let mut out = BTreeSet::new();
    for pkg in db.siblings(&at, &names) {
        for f in db.installed_files(&at, &pkg) {
            let unit = ["/lib/systemd/system/", "/usr/lib/systemd/system/"]
                .iter()
                .find_map(|d| f.strip_prefix(d))
                .filter(|u| !u.contains('/') && (u.ends_with(".service") || u.ends_with(".socket")))
                .map(str::to_owned)
                .or_else(|| {
                    f.strip_prefix("/etc/init.d/")
                        .filter(|s| !s.contains('/') && !s.is_empty())
                        .map(|s| format!("{s}.service"))
                });
            out.extend(unit);
        }
    }
    out
}

/// The database of a package manager this agent can read.
fn db(m: Manager) -> Result<&'static dyn PackageDb, String> {
    match m {
        Manager::Apt => Ok(&apt::Apt),
        Manager::Dnf => {
            Err("dnf package steps are not supported by this agent yet: it reads package files from dpkg only".into())
        }
    }
}

/// What a package step resolves to on this host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// The packages and versions that would change.
    pub changes: Vec<PackageChange>,
    /// The write set on this host: state and the packages' directories.
    pub writes: Vec<String>,
    /// The packages' own files and directories, old and new versions.
    pub files: BTreeSet<String>,
    /// The package manager's state paths.
    pub state: Vec<String>,
    /// Names the package manager gives a file while it replaces it.
    pub transient: &'static [&'static str],
}

impl Resolved {
    /// Whether the dry-run may change `path`: a package file (or one of
    /// its transient names), or under the package manager's state, or the
    /// step's own extra writes.
    pub fn allows(&self, path: &str, extra: &[String]) -> bool {
        if self.state.iter().chain(extra).any(|s| within(path, s)) || self.files.contains(path) {
            return true;
        }
        self.transient
            .iter()
            .any(|t| path.strip_suffix(t).is_some_and(|base| self.files.contains(base)))
    }
}

/// Which process holds a package manager's lock file, if any (dpkg, apt
/// and rpm use fcntl record locks).
fn lock_holder(file: &Path) -> Option<i32> {
    use nix::fcntl::{FcntlArg, fcntl};
    let f = std::fs::File::open(file).ok()?;
    let mut lk = nix::libc::flock {
        l_type: nix::libc::F_WRLCK as i16,
        l_whence: nix::libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    fcntl(&f, FcntlArg::F_GETLK(&mut lk)).ok()?;
    (lk.l_type != nix::libc::F_UNLCK as i16).then_some(lk.l_pid)
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim().to_owned())
        .unwrap_or_default()
}

/// Resolve a package step on the host at `host_root`, reading its files
/// through `view` (the sandbox's view of it, with staged fetches laid over
/// it); locks are checked on the host itself. `simulate` runs a command in
/// the sandbox (offline) and returns its exit code and output. An `Err`
/// says why the step cannot run on this host.
pub fn resolve(
    host_root: &Path,
    view: &Path,
    p: &Packages,
    extra: &[String],
    simulate: &mut dyn FnMut(&str) -> anyhow::Result<(i32, String)>,
) -> Result<Resolved, String> {
    let db = db(p.manager)?;
    let at = |rel: &str| view.join(rel.trim_start_matches('/'));
    for lock in db.locks() {
        if let Some(pid) = lock_holder(&host_root.join(lock.trim_start_matches('/'))) {
            return Err(format!(
                "the package manager is locked: {lock} is held by process {pid} ({}); try again when it is done",
                cmdline(pid)
            ));
        }
    }
    let installed = db.installed(&at)?;
    for name in &p.upgrade {
        if !installed.contains_key(name) {
            return Err(format!(
                "package {name} is not installed on this host; a package step only upgrades installed packages (use `install:` to add one)"
            ));
        }
    }
    let (code, out) = simulate(&p.simulation_command())
        .map_err(|e| format!("the package manager's simulation could not run: {e:#}"))?;
    if code != 0 {
        let last: Vec<&str> = out.trim_end().lines().rev().take(5).collect();
        let last: Vec<&str> = last.into_iter().rev().collect();
        return Err(format!(
            "the package manager cannot plan this change offline (exit {code}): {}",
            last.join(" | ")
        ));
    }
    let changes = db.changes(&out);
    let mut files: BTreeSet<String> = BTreeSet::new();
    let mut new_dirs: BTreeSet<String> = BTreeSet::new();
    let mut leaves: BTreeSet<String> = BTreeSet::new();
    for c in &changes {
        for l in db.installed_files(&at, &c.name) {
            if !at(&l).is_dir() {
                leaves.insert(l.clone());
            }
            files.insert(l);
        }
        if c.to.is_empty() {
            continue;
        }
        for (path, dir) in db.new_files(&at, c)? {
            if dir {
                if !at(&path).exists() {
                    new_dirs.insert(path.clone());
                }
            } else {
                leaves.insert(path.clone());
            }
            files.insert(path);
        }
    }
    let state: Vec<String> = p.manager.state_paths().iter().map(|s| (*s).to_owned()).collect();
    let mut writes: BTreeSet<String> = state.iter().cloned().collect();
    writes.extend(extra.iter().cloned());
    for leaf in &leaves {
        let parent = match leaf.rsplit_once('/') {
            Some(("", _)) | None => {
                return Err(format!(
                    "{leaf} lies directly in /; wavegate will not make / writable for a package"
                ));
            }
            Some((dir, _)) => dir.to_owned(),
        };
        writes.insert(parent);
    }
    writes.extend(new_dirs);
    // Inner paths are covered by the outer ones.
    let all: Vec<String> = writes.iter().cloned().collect();
    let writes: Vec<String> = all
        .iter()
        .filter(|w| !all.iter().any(|o| o != *w && within(w, o)))
        .cloned()
        .collect();
    Ok(Resolved {
        changes,
        writes,
        files,
        state,
        transient: db.transient(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dry_run_may_change_the_package_files_and_their_transient_names_only() {
        let r = Resolved {
            files: ["/opt/wgtest/bin/wgtest".to_owned()].into_iter().collect(),
            state: vec!["/var/lib/dpkg".into()],
            transient: apt::Apt.transient(),
            ..Resolved::default()
        };
        assert!(r.allows("/opt/wgtest/bin/wgtest", &[]));
        assert!(r.allows("/opt/wgtest/bin/wgtest.dpkg-new", &[]));
        assert!(r.allows("/var/lib/dpkg/info/wgtest.list", &[]));
        assert!(
            !r.allows("/opt/wgtest/bin/other", &[]),
            "the directory is writable, not open"
        );
        assert!(r.allows("/opt/wgtest/bin/other", &["/opt/wgtest/bin/other".into()]));
        assert!(!r.allows("/srv/customer-data/a", &[]));
    }
}
