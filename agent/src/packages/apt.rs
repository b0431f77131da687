//! apt and dpkg (Debian, Ubuntu): the package database a dry-run reads.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use wavegate_domain::effects::PackageChange;

use super::PackageDb;

/// apt with dpkg underneath.
pub struct Apt;

impl PackageDb for Apt {
    fn siblings(&self, at: &dyn Fn(&str) -> PathBuf, names: &[String]) -> Vec<String> {
        let status = std::fs::read_to_string(at("/var/lib/dpkg/status")).unwrap_or_default();
        let sources = dpkg_sources(&status);
        let wanted: std::collections::BTreeSet<&str> = names
            .iter()
            .filter_map(|n| sources.get(n.as_str()).map(String::as_str))
            .collect();
        sources
            .iter()
            .filter(|(_, src)| wanted.contains(src.as_str()))
            .map(|(pkg, _)| (*pkg).to_owned())
            .collect()
    }

    fn locks(&self) -> &'static [&'static str] {
        &["/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock"]
    }

    fn installed(&self, at: &dyn Fn(&str) -> PathBuf) -> Result<BTreeMap<String, String>, String> {
        let status = std::fs::read_to_string(at("/var/lib/dpkg/status"))
            .map_err(|e| format!("this host has no dpkg database (/var/lib/dpkg/status: {e})"))?;
        Ok(dpkg_installed(&status))
    }

    fn changes(&self, simulation: &str) -> Vec<PackageChange> {
        apt_simulation(simulation)
    }

    fn installed_files(&self, at: &dyn Fn(&str) -> PathBuf, name: &str) -> Vec<String> {
        let list = std::fs::read_dir(at("/var/lib/dpkg/info"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|f| f == &format!("{name}.list") || f.starts_with(&format!("{name}:")) && f.ends_with(".list"));
        let Some(list) = list else { return Vec::new() };
        let Ok(text) = std::fs::read_to_string(at(&format!("/var/lib/dpkg/info/{list}"))) else {
            return Vec::new();
        };
        text.lines()
            .filter(|l| !l.is_empty() && *l != "/.")
            .map(str::to_owned)
            .collect()
    }

    fn new_files(&self, at: &dyn Fn(&str) -> PathBuf, c: &PackageChange) -> Result<Vec<(String, bool)>, String> {
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
        Ok(deb_contents(&String::from_utf8_lossy(&out.stdout)))
    }

    fn transient(&self) -> &'static [&'static str] {
        &[".dpkg-new", ".dpkg-tmp", ".dpkg-old", ".dpkg-dist", ".dpkg-bak"]
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

/// Installed packages and the source package each is built from (its own
/// name when the status has no `Source:`; a `Source: x (version)` names x).
pub fn dpkg_sources(status: &str) -> BTreeMap<&str, String> {
    let mut out = BTreeMap::new();
    for para in status.split("\n\n") {
        let field = |k: &str| {
            para.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix(':')))
                .map(str::trim)
        };
        if let (Some(name), Some(st)) = (field("Package"), field("Status"))
            && st.ends_with(" installed")
        {
            let src = field("Source")
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or(name);
            out.insert(name, src.to_owned());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_installed_package_has_its_source() {
        let status = "Package: nginx\nStatus: install ok installed\nVersion: 1.22.1-9\n\n\
                      Package: nginx-common\nStatus: install ok installed\nSource: nginx\nVersion: 1.22.1-9\n\n\
                      Package: libssl3\nStatus: install ok installed\nSource: openssl (3.0.15-1~deb12u1)\nVersion: 3.0.15-1~deb12u1+b1\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n";
        let s = dpkg_sources(status);
        assert_eq!(s.get("nginx").map(String::as_str), Some("nginx"));
        assert_eq!(s.get("nginx-common").map(String::as_str), Some("nginx"));
        assert_eq!(s.get("libssl3").map(String::as_str), Some("openssl"));
        assert!(!s.contains_key("gone"));
    }

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
}
