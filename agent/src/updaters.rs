//! Updaters outside the rollout on this host: found under the host root
//! with their evidence, held for a rollout and restored after.
//!
//! A hold changes only what it can undo exactly: a file of its own in
//! `/etc/apt/apt.conf.d` per rollout (later files override earlier ones, so
//! it switches unattended-upgrades and apt's periodic runs off), and a
//! mask (`/etc/systemd/system/<timer>` -> `/dev/null`) for a timer that has
//! no override file there. What it did is written to the agent's state
//! before it is done, so a release after a crash still undoes it, and a
//! timer two rollouts hold is unmasked only when the last one lets go.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use anyhow::{Context, Result, bail};
use regex::Regex;
use serde::{Deserialize, Serialize};
use wavegate_domain::updaters::{Updater, UpdaterKind};

/// apt's periodic setting that runs unattended-upgrades.
const UU_SETTING: &str = "APT::Periodic::Unattended-Upgrade";
/// The prefix of a hold's own apt file (`99zz-wavegate-hold-<rollout>`).
const HOLD_FILE_PREFIX: &str = "99zz-wavegate-hold-";

/// Timers that change packages, by kind.
const TIMERS: &[(&str, UpdaterKind)] = &[
    ("apt-daily.timer", UpdaterKind::AptDaily),
    ("apt-daily-upgrade.timer", UpdaterKind::AptDaily),
    ("dnf-automatic.timer", UpdaterKind::DnfAutomatic),
    ("dnf-automatic-install.timer", UpdaterKind::DnfAutomatic),
    ("dnf-automatic-download.timer", UpdaterKind::DnfAutomatic),
    ("dnf5-automatic.timer", UpdaterKind::DnfAutomatic),
];

/// Where a unit is enabled from (a `WantedBy=` link).
const WANTS: &[&str] = &[
    "etc/systemd/system/timers.target.wants",
    "usr/lib/systemd/system/timers.target.wants",
    "lib/systemd/system/timers.target.wants",
];

/// A package manager changing packages, in a cron line.
static CRON_UPDATE: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::expect_used)]
    Regex::new(
        r"\b(?:(?:apt-get|apt|aptitude)\s+(?:-\S+\s+)*(?:upgrade|dist-upgrade|full-upgrade|safe-upgrade|install)|(?:dnf|yum|dnf5)\s+(?:-\S+\s+)*(?:upgrade|update|install|distro-sync)|unattended-upgrades?|snap\s+refresh|zypper\s+(?:-\S+\s+)*(?:up|update|dup|patch))\b",
    )
    .expect("the cron pattern compiles")
});

/// What one rollout's hold did on this host.
#[derive(Debug, Default, Serialize, Deserialize)]
struct HoldRecord {
    rollout: String,
    /// Its own apt file, if it wrote one.
    apt_file: Option<String>,
    /// Timers it masked (or found masked by another hold of wavegate's).
    masked: Vec<String>,
}

fn holds_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("updater-holds")
}

fn records(state_dir: &Path) -> Vec<HoldRecord> {
    let Ok(dir) = std::fs::read_dir(holds_dir(state_dir)) else {
        return Vec::new();
    };
    let mut out: Vec<HoldRecord> = dir
        .flatten()
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    out.sort_by(|a, b| a.rollout.cmp(&b.rollout));
    out
}

fn record_path(state_dir: &Path, rollout: &str) -> PathBuf {
    holds_dir(state_dir).join(format!("{}.json", hex::encode(rollout)))
}

fn save(state_dir: &Path, rec: &HoldRecord) -> Result<()> {
    let dir = holds_dir(state_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = record_path(state_dir, &rec.rollout);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(rec)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

fn is_dev_null_link(p: &Path) -> bool {
    std::fs::read_link(p).is_ok_and(|t| t == Path::new("/dev/null"))
}

/// A unit's state under the host root: whether something enables it, and
/// whether it is masked.
fn unit_enabled(root: &Path, unit: &str) -> Option<String> {
    WANTS
        .iter()
        .map(|w| root.join(w).join(unit))
        .find(|p| std::fs::symlink_metadata(p).is_ok())
        .map(|p| format!("/{}", p.strip_prefix(root).unwrap_or(&p).display()))
}

fn unit_masked(root: &Path, unit: &str) -> bool {
    ["etc/systemd/system", "run/systemd/system"]
        .iter()
        .any(|d| is_dev_null_link(&root.join(d).join(unit)))
}

/// The apt configuration files in the order apt reads them.
fn apt_conf_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("etc/apt/apt.conf")];
    if let Ok(dir) = std::fs::read_dir(root.join("etc/apt/apt.conf.d")) {
        let mut parts: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        parts.sort();
        files.extend(parts);
    }
    files
}

/// The last `APT::Periodic::Unattended-Upgrade` setting in these files:
/// (its value, "file:line: text").
fn uu_setting(root: &Path, include_holds: bool) -> Option<(String, String)> {
    let mut last = None;
    for f in apt_conf_files(root) {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !include_holds && name.starts_with(HOLD_FILE_PREFIX) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for (i, line) in text.lines().enumerate() {
            let l = line.trim();
            if l.starts_with("//") || l.starts_with('#') {
                continue;
            }
            if let Some(rest) = l.strip_prefix(UU_SETTING) {
                let value = rest.trim().trim_end_matches(';').trim().trim_matches('"').to_owned();
                let shown = f.strip_prefix(root).unwrap_or(&f).display();
                last = Some((value, format!("/{shown}:{}: {l}", i + 1)));
            }
        }
    }
    last
}

/// What on this host can change packages on its own, with the evidence.
pub fn scan(root: &Path, state_dir: &Path) -> Vec<Updater> {
    let holds = records(state_dir);
    let held_unit = |unit: &str| {
        holds
            .iter()
            .find(|h| h.masked.iter().any(|m| m == unit))
            .map(|h| h.rollout.clone())
    };
    let mut out = Vec::new();

    if let Some((value, evidence)) = uu_setting(root, false)
        && value != "0"
        && root.join("usr/bin/unattended-upgrade").exists()
    {
        let overridden = uu_setting(root, true).is_some_and(|(v, _)| v == "0");
        out.push(Updater {
            kind: UpdaterKind::UnattendedUpgrades,
            what: UU_SETTING.into(),
            evidence,
            holdable: true,
            held_by: overridden
                .then(|| holds.iter().find(|h| h.apt_file.is_some()).map(|h| h.rollout.clone()))
                .flatten(),
        });
    }

    for (unit, kind) in TIMERS {
        let Some(link) = unit_enabled(root, unit) else { continue };
        let held_by = held_unit(unit);
        if unit_masked(root, unit) && held_by.is_none() {
            // Masked by the host's own administrator: it does not run.
            continue;
        }
        // An override file of the administrator's own cannot be masked
        // without removing it: such a timer cannot be held.
        let override_file = root.join("etc/systemd/system").join(unit);
        let holdable =
            held_by.is_some() || std::fs::symlink_metadata(&override_file).is_err() || is_dev_null_link(&override_file);
        out.push(Updater {
            kind: *kind,
            what: (*unit).into(),
            evidence: format!("enabled by {link}"),
            holdable,
            held_by,
        });
    }

    for link in [
        "etc/systemd/system/multi-user.target.wants/snapd.service",
        "etc/systemd/system/sockets.target.wants/snapd.socket",
    ] {
        if std::fs::symlink_metadata(root.join(link)).is_ok() {
            out.push(Updater {
                kind: UpdaterKind::SnapRefresh,
                what: "snapd".into(),
                evidence: format!("enabled by /{link}"),
                holdable: false,
                held_by: None,
            });
            break;
        }
    }

    out.extend(cron_jobs(root));
    out
}

/// Cron lines that run a package manager.
fn cron_jobs(root: &Path) -> Vec<Updater> {
    let mut files = vec![root.join("etc/crontab")];
    for dir in [
        "etc/cron.d",
        "etc/cron.hourly",
        "etc/cron.daily",
        "etc/cron.weekly",
        "etc/cron.monthly",
        "var/spool/cron/crontabs",
    ] {
        if let Ok(d) = std::fs::read_dir(root.join(dir)) {
            let mut parts: Vec<PathBuf> = d.flatten().map(|e| e.path()).collect();
            parts.sort();
            files.extend(parts);
        }
    }
    let mut out = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for (i, line) in text.lines().enumerate() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') || !CRON_UPDATE.is_match(l) {
                continue;
            }
            let shown = f.strip_prefix(root).unwrap_or(&f).display().to_string();
            out.push(Updater {
                kind: UpdaterKind::Cron,
                what: format!("/{shown}"),
                evidence: format!("/{shown}:{}: {}", i + 1, wavegate_domain::text::inert(l)),
                holdable: false,
                held_by: None,
            });
        }
    }
    out
}

/// Whether this agent manages the machine's own systemd (not a lab root).
fn live_systemd(root: &Path) -> bool {
    root == Path::new("/") && Path::new("/run/systemd/system").is_dir()
}

fn systemctl(args: &[&str]) -> Result<()> {
    let st = std::process::Command::new("systemctl")
        .args(args)
        .status()
        .context("running systemctl")?;
    if !st.success() {
        bail!("systemctl {} failed ({st})", args.join(" "));
    }
    Ok(())
}

/// Hold every active, holdable updater for `rollout`; what it held, one
/// line each. Refused (nothing held) when an updater cannot be held.
pub fn hold(root: &Path, state_dir: &Path, rollout: &str) -> Result<Vec<String>> {
    let found = scan(root, state_dir);
    let cannot: Vec<String> = found
        .iter()
        .filter(|u| u.active() && !u.holdable)
        .map(Updater::describe)
        .collect();
    if !cannot.is_empty() {
        bail!("these updaters cannot be held: {}", cannot.join("; "));
    }
    let mut rec = records(state_dir)
        .into_iter()
        .find(|r| r.rollout == rollout)
        .unwrap_or_else(|| HoldRecord {
            rollout: rollout.to_owned(),
            ..Default::default()
        });
    let mut done = Vec::new();
    let wants_apt = found
        .iter()
        .any(|u| u.kind == UpdaterKind::UnattendedUpgrades || u.kind == UpdaterKind::AptDaily);
    if wants_apt && rec.apt_file.is_none() {
        let name = format!("{HOLD_FILE_PREFIX}{}", hex::encode(rollout));
        let path = root.join("etc/apt/apt.conf.d").join(&name);
        rec.apt_file = Some(name);
        save(state_dir, &rec)?;
        std::fs::create_dir_all(path.parent().unwrap_or(root))?;
        std::fs::write(
            &path,
            format!(
                "// Written by wavegate for rollout {rollout}: apt's periodic runs are held until it ends.\n\
                 {UU_SETTING} \"0\";\nAPT::Periodic::Update-Package-Lists \"0\";\nAPT::Periodic::Download-Upgradeable-Packages \"0\";\n"
            ),
        )
        .with_context(|| format!("writing {}", path.display()))?;
        done.push(format!(
            "apt's periodic runs off ({UU_SETTING} \"0\" in /etc/apt/apt.conf.d/{})",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
    }
    let timers: BTreeSet<&str> = found
        .iter()
        // Held by another rollout too: this one records it, so that the
        // other's release leaves it masked.
        .filter(|u| matches!(u.kind, UpdaterKind::AptDaily | UpdaterKind::DnfAutomatic))
        .map(|u| u.what.as_str())
        .collect();
    for unit in timers {
        if rec.masked.iter().any(|m| m == unit) {
            continue;
        }
        rec.masked.push(unit.to_owned());
        save(state_dir, &rec)?;
        let link = root.join("etc/systemd/system").join(unit);
        if !is_dev_null_link(&link) {
            std::fs::create_dir_all(link.parent().unwrap_or(root))?;
            std::os::unix::fs::symlink("/dev/null", &link).with_context(|| format!("masking {unit}"))?;
        }
        if live_systemd(root) {
            systemctl(&["daemon-reload"])?;
            systemctl(&["stop", unit])?;
        }
        done.push(format!("{unit} masked"));
    }
    save(state_dir, &rec)?;
    Ok(done)
}

/// Undo `rollout`'s hold; what it restored, one line each. A timer another
/// rollout still holds stays masked.
pub fn release(root: &Path, state_dir: &Path, rollout: &str) -> Result<Vec<String>> {
    let all = records(state_dir);
    let Some(rec) = all.iter().find(|r| r.rollout == rollout) else {
        return Ok(Vec::new());
    };
    let mut done = Vec::new();
    if let Some(name) = &rec.apt_file {
        let path = root.join("etc/apt/apt.conf.d").join(name);
        if std::fs::read_to_string(&path).is_ok_and(|t| t.contains(&format!("for rollout {rollout}:"))) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            done.push(format!(
                "apt's periodic runs restored (/etc/apt/apt.conf.d/{name} removed)"
            ));
        }
    }
    let mut reload = false;
    for unit in &rec.masked {
        let others = all.iter().any(|r| r.rollout != rollout && r.masked.contains(unit));
        let link = root.join("etc/systemd/system").join(unit);
        if others || !is_dev_null_link(&link) {
            continue;
        }
        std::fs::remove_file(&link).with_context(|| format!("unmasking {unit}"))?;
        reload = true;
        done.push(format!("{unit} unmasked"));
    }
    if reload && live_systemd(root) {
        systemctl(&["daemon-reload"])?;
        for unit in &rec.masked {
            if unit_enabled(root, unit).is_some() {
                systemctl(&["start", unit])?;
            }
        }
    }
    let path = record_path(state_dir, rollout);
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(done)
}

/// A file under a test's host root.
#[cfg(test)]
fn seed(root: &Path, path: &str, text: &str) {
    let p = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, text).expect("write");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debian_with_unattended_upgrades(name: &str) -> (PathBuf, PathBuf) {
        let base = std::env::temp_dir().join(format!("wavegate-updaters-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (root, state) = (base.join("root"), base.join("state"));
        seed(
            &root,
            "/etc/apt/apt.conf.d/20auto-upgrades",
            "APT::Periodic::Update-Package-Lists \"1\";\nAPT::Periodic::Unattended-Upgrade \"1\";\n",
        );
        seed(&root, "/usr/bin/unattended-upgrade", "#!/usr/bin/python3\n");
        let wants = root.join("etc/systemd/system/timers.target.wants");
        std::fs::create_dir_all(&wants).expect("wants");
        for t in ["apt-daily.timer", "apt-daily-upgrade.timer"] {
            std::os::unix::fs::symlink(format!("/lib/systemd/system/{t}"), wants.join(t)).expect("link");
        }
        (root, state)
    }

    #[test]
    fn unattended_upgrades_and_the_apt_timers_are_found_held_and_restored() {
        let (root, state) = debian_with_unattended_upgrades("hold");
        let found = scan(&root, &state);
        let kinds: Vec<(UpdaterKind, &str)> = found.iter().map(|u| (u.kind, u.what.as_str())).collect();
        assert_eq!(
            kinds,
            [
                (UpdaterKind::UnattendedUpgrades, UU_SETTING),
                (UpdaterKind::AptDaily, "apt-daily.timer"),
                (UpdaterKind::AptDaily, "apt-daily-upgrade.timer"),
            ]
        );
        assert_eq!(
            found[0].evidence,
            "/etc/apt/apt.conf.d/20auto-upgrades:2: APT::Periodic::Unattended-Upgrade \"1\";"
        );
        assert!(found.iter().all(Updater::active));

        let held = hold(&root, &state, "r0001").expect("hold");
        assert_eq!(held.len(), 3, "{held:?}");
        let now = scan(&root, &state);
        assert_eq!(now.len(), 3, "a held updater is still named: {now:?}");
        assert!(now.iter().all(|u| u.held_by.as_deref() == Some("r0001")), "{now:?}");
        assert!(is_dev_null_link(
            &root.join("etc/systemd/system/apt-daily-upgrade.timer")
        ));
        // A second rollout holds too; the first one's release keeps the
        // masks the second still needs.
        hold(&root, &state, "r0002").expect("second hold");
        let restored = release(&root, &state, "r0001").expect("release");
        assert_eq!(restored.len(), 1, "only r0001's apt file: {restored:?}");
        assert!(is_dev_null_link(&root.join("etc/systemd/system/apt-daily.timer")));
        let restored = release(&root, &state, "r0002").expect("release");
        assert_eq!(restored.len(), 3, "{restored:?}");
        assert!(std::fs::symlink_metadata(root.join("etc/systemd/system/apt-daily.timer")).is_err());
        assert!(scan(&root, &state).iter().all(Updater::active));
        assert!(
            release(&root, &state, "r0002").expect("again").is_empty(),
            "a release is idempotent"
        );
    }

    #[test]
    fn cron_jobs_and_snapd_are_found_and_cannot_be_held() {
        let (root, state) = debian_with_unattended_upgrades("cron");
        seed(
            &root,
            "/etc/cron.d/nightly",
            "# apt-get upgrade would be here\n0 3 * * * root apt-get -y upgrade >/dev/null\n",
        );
        seed(
            &root,
            "/etc/cron.daily/apt-compat",
            "#!/bin/sh\nexec /usr/lib/apt/apt.systemd.daily\n",
        );
        let found = scan(&root, &state);
        let cron: Vec<&Updater> = found.iter().filter(|u| u.kind == UpdaterKind::Cron).collect();
        assert_eq!(cron.len(), 1, "{found:?}");
        assert_eq!(
            cron[0].evidence,
            "/etc/cron.d/nightly:2: 0 3 * * * root apt-get -y upgrade >/dev/null"
        );
        let err = hold(&root, &state, "r0003").expect_err("a cron job cannot be held");
        assert!(format!("{err:#}").contains("/etc/cron.d/nightly"), "{err:#}");
        assert!(
            !root
                .join("etc/apt/apt.conf.d")
                .join(format!("{HOLD_FILE_PREFIX}{}", hex::encode("r0003")))
                .exists(),
            "nothing is half held"
        );
    }

    #[test]
    fn a_timer_masked_by_the_administrator_is_not_reported() {
        let (root, state) = debian_with_unattended_upgrades("masked");
        std::os::unix::fs::symlink("/dev/null", root.join("etc/systemd/system/apt-daily.timer")).expect("mask");
        let found = scan(&root, &state);
        assert!(!found.iter().any(|u| u.what == "apt-daily.timer"), "{found:?}");
    }
}
