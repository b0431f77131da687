//! Package steps: a step that upgrades or installs packages with the host's
//! package manager instead of running a script. wavegate turns one into a
//! fetch (download into the package cache, with the network), an offline
//! run (from the cache only, so the dry-run and the real run need no
//! network), and the package manager's own state, which is part of the
//! write set; the agent adds the files of the packages themselves on each
//! host, from its package database and the fetched packages.

use serde::{Deserialize, Serialize};

/// A package manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Manager {
    /// Debian and Ubuntu: apt-get and dpkg.
    Apt,
    /// Fedora, RHEL and their kin: dnf and rpm.
    Dnf,
}

impl Manager {
    /// Its name in a plan.
    pub fn as_str(self) -> &'static str {
        match self {
            Manager::Apt => "apt",
            Manager::Dnf => "dnf",
        }
    }

    /// Parse a plan's `manager:`.
    pub fn parse(s: &str) -> Option<Manager> {
        match s {
            "apt" => Some(Manager::Apt),
            "dnf" => Some(Manager::Dnf),
            _ => None,
        }
    }

    /// The paths the package manager itself changes when it installs: its
    /// database, caches, logs and locks.
    pub fn state_paths(self) -> &'static [&'static str] {
        match self {
            Manager::Apt => &[
                "/var/lib/dpkg",
                "/var/lib/apt",
                "/var/cache/apt",
                "/var/cache/debconf",
                "/var/log/apt",
                "/var/log/dpkg.log",
                "/var/log/alternatives.log",
            ],
            Manager::Dnf => &[
                "/var/lib/rpm",
                "/var/lib/dnf",
                "/var/cache/dnf",
                "/var/log/dnf.log",
                "/var/log/dnf.rpm.log",
                "/var/log/dnf.librepo.log",
                "/var/log/hawkey.log",
            ],
        }
    }

    /// What the fetch may write: the package lists and the package cache,
    /// and the locks it takes on the way.
    pub fn fetch_writes(self) -> &'static [&'static str] {
        match self {
            Manager::Apt => &[
                "/var/lib/apt/lists",
                "/var/cache/apt",
                "/var/lib/dpkg/lock",
                "/var/lib/dpkg/lock-frontend",
            ],
            Manager::Dnf => &["/var/cache/dnf", "/var/lib/dnf"],
        }
    }
}

/// What a package step does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packages {
    /// The package manager.
    pub manager: Manager,
    /// Packages to bring to the newest version the repositories offer; each
    /// must be installed already.
    #[serde(default)]
    pub upgrade: Vec<String>,
    /// Packages to install (or up- or downgrade) to exactly this version.
    #[serde(default)]
    pub install: Vec<(String, String)>,
}

/// Whether `name` is a package name: Debian policy's letters, and what rpm
/// names use besides (`_`, upper case).
pub fn valid_name(name: &str) -> bool {
    let mut b = name.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() >= 2
        && b.all(|c| c.is_ascii_alphanumeric() || b"+-._".contains(&c))
}

/// Whether `v` is a version string (epoch, upstream version, revision).
pub fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.as_bytes()[0].is_ascii_digit()
        && v.bytes().all(|c| c.is_ascii_alphanumeric() || b".+~:-_".contains(&c))
}

impl Packages {
    /// Every package the step names.
    pub fn names(&self) -> Vec<&str> {
        self.upgrade
            .iter()
            .map(String::as_str)
            .chain(self.install.iter().map(|(n, _)| n.as_str()))
            .collect()
    }

    fn targets(&self) -> String {
        let mut v: Vec<String> = self.install.iter().map(|(n, ver)| format!("{n}={ver}")).collect();
        if self.manager == Manager::Dnf {
            v = self.install.iter().map(|(n, ver)| format!("{n}-{ver}")).collect();
        }
        v.join(" ")
    }

    /// The fetch: refresh the package lists and download what the step
    /// installs into the cache, nothing more.
    pub fn fetch_command(&self) -> String {
        let up = self.upgrade.join(" ");
        let inst = self.targets();
        match self.manager {
            Manager::Apt => {
                let mut c = String::from("apt-get -q update");
                if !up.is_empty() {
                    c.push_str(&format!(
                        " && apt-get -q -y --download-only install --only-upgrade {up}"
                    ));
                }
                if !inst.is_empty() {
                    c.push_str(&format!(
                        " && apt-get -q -y --download-only --allow-downgrades install {inst}"
                    ));
                }
                c
            }
            Manager::Dnf => {
                let mut parts = Vec::new();
                if !up.is_empty() {
                    parts.push(format!("dnf -y -q upgrade --downloadonly {up}"));
                }
                if !inst.is_empty() {
                    parts.push(format!("dnf -y -q install --downloadonly {inst}"));
                }
                parts.join(" && ")
            }
        }
    }

    /// The step itself, from the cache only: it can run without a network,
    /// in the dry-run as in the real run.
    pub fn run_command(&self) -> String {
        self.command(false)
    }

    /// The same command as a simulation: it plans the change offline and
    /// changes nothing (apt-get -s without taking the locks; dnf
    /// --assumeno), so a dry-run can read which versions would change.
    pub fn simulation_command(&self) -> String {
        self.command(true)
    }

    fn command(&self, simulate: bool) -> String {
        let up = self.upgrade.join(" ");
        let inst = self.targets();
        match self.manager {
            Manager::Apt => {
                let sim = if simulate { "-s " } else { "" };
                let nolock = if simulate { " -o Debug::NoLocking=1" } else { "" };
                let base = format!(
                    "DEBIAN_FRONTEND=noninteractive apt-get {sim}-q -y --no-download{nolock} \
                     -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
                );
                let mut parts = Vec::new();
                if !up.is_empty() {
                    parts.push(format!("{base} install --only-upgrade {up}"));
                }
                if !inst.is_empty() {
                    parts.push(format!("{base} --allow-downgrades install {inst}"));
                }
                parts.join(" && ")
            }
            Manager::Dnf => {
                let yes = if simulate { "--assumeno" } else { "-y" };
                let mut parts = Vec::new();
                if !up.is_empty() {
                    parts.push(format!("dnf {yes} -q --cacheonly upgrade {up}"));
                }
                if !inst.is_empty() {
                    parts.push(format!("dnf {yes} -q --cacheonly install {inst}"));
                }
                parts.join(" && ")
            }
        }
    }

    /// For people: `apt: upgrade postfix; install openssl=3.0.15-1`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.upgrade.is_empty() {
            parts.push(format!("upgrade {}", self.upgrade.join(", ")));
        }
        if !self.install.is_empty() {
            parts.push(format!("install {}", self.targets().replace(' ', ", ")));
        }
        format!("{}: {}", self.manager.as_str(), parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_apt_step_fetches_online_and_runs_offline() {
        let p = Packages {
            manager: Manager::Apt,
            upgrade: vec!["postfix".into()],
            install: vec![("openssl".into(), "3.0.15-1".into())],
        };
        let fetch = p.fetch_command();
        assert!(fetch.starts_with("apt-get -q update"), "{fetch}");
        assert!(
            fetch.contains("--download-only install --only-upgrade postfix"),
            "{fetch}"
        );
        assert!(fetch.contains("install openssl=3.0.15-1"), "{fetch}");
        let run = p.run_command();
        assert!(run.contains("--no-download"), "the run never downloads: {run}");
        assert!(run.contains("install --only-upgrade postfix"), "{run}");
        assert!(!run.contains("update"), "{run}");
        assert_eq!(p.names(), ["postfix", "openssl"]);
        assert_eq!(
            run,
            "DEBIAN_FRONTEND=noninteractive apt-get -q -y --no-download -o Dpkg::Options::=--force-confdef \
             -o Dpkg::Options::=--force-confold install --only-upgrade postfix && DEBIAN_FRONTEND=noninteractive \
             apt-get -q -y --no-download -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
             --allow-downgrades install openssl=3.0.15-1"
        );
        // The simulation is the same command planned, not done: apt-get -s,
        // and without the locks a real run would take.
        let sim = p.simulation_command();
        assert_eq!(
            sim,
            run.replace(
                "apt-get -q -y --no-download",
                "apt-get -s -q -y --no-download -o Debug::NoLocking=1"
            )
        );
        let dnf = Packages {
            manager: Manager::Dnf,
            ..p
        };
        assert!(
            dnf.simulation_command()
                .starts_with("dnf --assumeno -q --cacheonly upgrade postfix")
        );
        assert!(dnf.run_command().starts_with("dnf -y -q --cacheonly upgrade postfix"));
    }

    #[test]
    fn names_and_versions() {
        for ok in ["postfix", "libssl3", "g++", "python3.11", "NetworkManager"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "a", "-x", "a b", "x;rm", "$(id)"] {
            assert!(!valid_name(bad), "{bad}");
        }
        for ok in ["1.1", "1:3.0.15-1~deb12u1", "2.4.62-1+b1"] {
            assert!(valid_version(ok), "{ok}");
        }
        for bad in ["", "latest", "1 2", "1;rm"] {
            assert!(!valid_version(bad), "{bad}");
        }
    }
}
