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
use std::path::Path;
use std::process::Command;

use wavegate_domain::effects::PackageChange;
use wavegate_domain::packages::{Manager, Packages};

use crate::mountinfo::within;

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
}

/// Names dpkg gives a file while it replaces it.
const TRANSIENT: &[&str] = &[".dpkg-new", ".dpkg-tmp", ".dpkg-old", ".dpkg-dist", ".dpkg-bak"];

impl Resolved {
    /// Whether the dry-run may change `path`: a package file (or one of
    /// its transient names), or under the package manager's state, or the
    /// step's own extra writes.
    pub fn allows(&self, path: &str, extra: &[String]) -> bool {
        if self.state.iter().chain(extra).any(|s| within(path, s)) || self.files.contains(path) {
            return true;
        }
        TRANSIENT
            .iter()
            .any(|t| path.strip_suffix(t).is_some_and(|base| self.files.contains(base)))
    }
}

/// The installed packages of a dpkg status file: name -> version.
pub fn dpkg_installed(status: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for para in status.split("\n\n") {
        let field = |k: &str| {
            para.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix(':')))
                .map(|v| v.trim().to_owned())
        };
        if let (Some(name), Some(status), Some(version)) = (field("Package"), field("Status"), field("Version"))
            && status.ends_with(" installed")
        {
            out.insert(name, version);
        }
    }
    out
}

/// The changes in `apt-get -s` output: `Inst NAME [OLD] (NEW ...)` and
/// `Remv NAME [OLD]`.
pub fn apt_simulation(text: &str) -> Vec<PackageChange> {
    let mut out = Vec::new();
    for line in text.lines() {
        let (kind, rest) = match line.split_once(' ') {
            Some(("Inst", r)) => ("inst", r),
            Some(("Remv", r)) => ("remv", r),
            _ => continue,
        };
        let mut words = rest.split_whitespace();
        let Some(name) = words.next() else { continue };
        let rest: Vec<&str> = words.collect();
        let rest = rest.join(" ");
        let from = rest
            .strip_prefix('[')
            .and_then(|r| r.split_once(']'))
            .map(|(v, _)| v.to_owned())
            .unwrap_or_default();
        let to = if kind == "inst" {
            rest.split_once('(')
                .and_then(|(_, r)| r.split_whitespace().next())
                .unwrap_or_default()
                .to_owned()
        } else {
            String::new()
        };
        out.push(PackageChange {
            name: name.to_owned(),
            from,
            to,
        });
    }
    out
}

/// The paths of `dpkg-deb -c` output, absolute, without the trailing `/` of
/// directories: (path, is a directory).
pub fn deb_contents(text: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let dir = line.starts_with('d');
        // mode owner size date time path [-> target]
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let path = path.trim_start_matches('.');
        let path = path.trim_end_matches('/');
        if path.is_empty() {
            continue;
        }
        out.push((path.to_owned(), dir));
    }
    out
}

/// Which process holds a dpkg lock file, if any (dpkg and apt use fcntl
/// record locks).
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
    if p.manager == Manager::Dnf {
        return Err(
            "dnf package steps are not supported by this agent yet: it reads package files from dpkg only".into(),
        );
    }
    let at = |rel: &str| view.join(rel.trim_start_matches('/'));
    for lock in ["/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock"] {
        if let Some(pid) = lock_holder(&host_root.join(lock.trim_start_matches('/'))) {
            return Err(format!(
                "the package manager is locked: {lock} is held by process {pid} ({}); try again when it is done",
                cmdline(pid)
            ));
        }
    }
    let status = std::fs::read_to_string(at("/var/lib/dpkg/status"))
        .map_err(|e| format!("this host has no dpkg database (/var/lib/dpkg/status: {e})"))?;
    let installed = dpkg_installed(&status);
    for name in &p.upgrade {
        if !installed.contains_key(name) {
            return Err(format!(
                "package {name} is not installed on this host; a package step only upgrades installed packages (use `install:` to add one)"
            ));
        }
    }
    let sim = p.run_command().replace(
        "apt-get -q -y --no-download",
        "apt-get -s -q -y --no-download -o Debug::NoLocking=1",
    );
    let (code, out) = simulate(&sim).map_err(|e| format!("the package manager's simulation could not run: {e:#}"))?;
    if code != 0 {
        let last: Vec<&str> = out.trim_end().lines().rev().take(5).collect();
        let last: Vec<&str> = last.into_iter().rev().collect();
        return Err(format!(
            "the package manager cannot plan this change offline (exit {code}): {}",
            last.join(" | ")
        ));
    }
    let changes = apt_simulation(&out);
    let mut files: BTreeSet<String> = BTreeSet::new();
    let mut new_dirs: BTreeSet<String> = BTreeSet::new();
    let mut leaves: BTreeSet<String> = BTreeSet::new();
    for c in &changes {
        let list = std::fs::read_dir(at("/var/lib/dpkg/info"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|f| {
                f == &format!("{}.list", c.name) || f.starts_with(&format!("{}:", c.name)) && f.ends_with(".list")
            });
        if let Some(list) = list
            && let Ok(text) = std::fs::read_to_string(at(&format!("/var/lib/dpkg/info/{list}")))
        {
            for l in text.lines().filter(|l| !l.is_empty() && *l != "/.") {
                files.insert(l.to_owned());
                if !at(l).is_dir() {
                    leaves.insert(l.to_owned());
                }
            }
        }
        if c.to.is_empty() {
            continue;
        }
        let want = format!("{}_{}_", c.name, c.to.replace(':', "%3a"));
        let deb = std::fs::read_dir(at("/var/cache/apt/archives"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with(&want) && f.to_string_lossy().ends_with(".deb"))
            })
            .ok_or_else(|| {
                format!(
                    "{} {} is not in the package cache (/var/cache/apt/archives); the fetch did not download it",
                    c.name, c.to
                )
            })?;
        let out = Command::new("dpkg-deb")
            .arg("-c")
            .arg(&deb)
            .output()
            .map_err(|e| format!("cannot read {}: dpkg-deb: {e}", deb.display()))?;
        if !out.status.success() {
            return Err(format!(
                "cannot read {}: {}",
                deb.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        for (path, dir) in deb_contents(&String::from_utf8_lossy(&out.stdout)) {
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dpkg_database_is_read() {
        let status = "Package: wgtest\nStatus: install ok installed\nVersion: 1.0\n\nPackage: gone\nStatus: deinstall ok config-files\nVersion: 2\n";
        let m = dpkg_installed(status);
        assert_eq!(m.get("wgtest").map(String::as_str), Some("1.0"));
        assert!(!m.contains_key("gone"), "config-files only is not installed");
    }

    #[test]
    fn a_simulation_says_what_changes() {
        let out = "Reading package lists...\nInst wgtest [1.0] (1.1 localhost [all])\nInst newpkg (2.0 localhost [amd64])\nConf wgtest (1.1 localhost [all])\nRemv oldpkg [0.9]\n";
        let c = apt_simulation(out);
        let got: Vec<(&str, &str, &str)> = c
            .iter()
            .map(|c| (c.name.as_str(), c.from.as_str(), c.to.as_str()))
            .collect();
        assert_eq!(
            got,
            [("wgtest", "1.0", "1.1"), ("newpkg", "", "2.0"), ("oldpkg", "0.9", "")]
        );
    }

    #[test]
    fn a_package_archive_is_listed() {
        let out = "drwxr-xr-x root/root         0 2026-12-03 15:01 ./\ndrwxr-xr-x root/root         0 2026-12-03 15:01 ./opt/wgtest/\n-rwxr-xr-x root/root        10 2026-12-03 15:01 ./opt/wgtest/bin/wgtest\nlrwxrwxrwx root/root         0 2026-12-03 15:01 ./opt/wgtest/bin/wgt -> wgtest\n";
        assert_eq!(
            deb_contents(out),
            [
                ("/opt/wgtest".to_owned(), true),
                ("/opt/wgtest/bin/wgtest".to_owned(), false),
                ("/opt/wgtest/bin/wgt".to_owned(), false)
            ]
        );
    }

    #[test]
    fn a_dry_run_may_change_the_package_files_and_their_transient_names_only() {
        let r = Resolved {
            files: ["/opt/wgtest/bin/wgtest".to_owned()].into_iter().collect(),
            state: vec!["/var/lib/dpkg".into()],
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
