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
use std::io::Read as _;
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use anyhow::{Context, Result, bail};
use regex::Regex;
use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
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
    // Only finished records: a `.tmp` a crash left behind is no hold.
    let mut out: Vec<HoldRecord> = dir
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
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

/// The host root, opened once. What is read below it resolves inside it
/// (`RESOLVE_IN_ROOT`: a link to `/etc/shadow` in a lab host's tree is that
/// host's `/etc/shadow`, never the machine's); what is written or removed
/// is reached without following any link at all, and only by name in a
/// directory handle, so a planted link is refused, never written through.
struct Root {
    fd: OwnedFd,
}

/// Bytes of a configuration file read at most.
const READ_LIMIT: u64 = 1 << 20;

impl Root {
    fn open(root: &Path) -> Result<Root> {
        Ok(Root {
            fd: crate::snapshot::fsx::open_dir(root)?,
        })
    }

    fn resolve_in(&self, p: &str, flags: OFlags) -> Option<OwnedFd> {
        let how = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
        rustix::fs::openat2(
            &self.fd,
            p.trim_start_matches('/'),
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            how,
        )
        .ok()
    }

    /// A regular file's text (the first MiB), links resolved inside the root.
    fn read(&self, p: &str) -> Option<String> {
        let fd = self.resolve_in(p, OFlags::RDONLY | OFlags::NONBLOCK)?;
        let st = rustix::fs::fstat(&fd).ok()?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return None;
        }
        let mut text = String::new();
        std::io::Read::take(std::fs::File::from(fd), READ_LIMIT)
            .read_to_string(&mut text)
            .ok()?;
        Some(text)
    }

    /// The names in a directory, sorted (links resolved inside the root).
    fn names(&self, dir: &str) -> Vec<String> {
        let Some(fd) = self.resolve_in(dir, OFlags::RDONLY | OFlags::DIRECTORY) else {
            return Vec::new();
        };
        crate::snapshot::fsx::names(fd.as_fd())
            .unwrap_or_default()
            .into_iter()
            .map(|n| String::from_utf8_lossy(&n).into_owned())
            .collect()
    }

    /// A directory to write in, reached without following any link.
    fn dir_to_write(&self, dir: &str) -> Result<OwnedFd> {
        crate::snapshot::fsx::open_beneath(self.fd.as_fd(), dir.as_bytes(), true)?
            .with_context(|| format!("{dir} does not exist"))
    }

    /// Whether `dir/name` exists (itself, not what it may point to; the
    /// directory's links resolved inside the root).
    fn has(&self, dir: &str, name: &str) -> bool {
        self.resolve_in(dir, OFlags::RDONLY | OFlags::DIRECTORY)
            .is_some_and(|d| rustix::fs::statat(&d, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok())
    }

    /// Whether `dir/name` is a link to /dev/null (a mask).
    fn masked_at(&self, dir: &str, name: &str) -> bool {
        self.resolve_in(dir, OFlags::RDONLY | OFlags::DIRECTORY)
            .is_some_and(|d| is_dev_null_link(d.as_fd(), name))
    }
}

fn is_dev_null_link(dir: BorrowedFd<'_>, name: &str) -> bool {
    rustix::fs::readlinkat(dir, name, Vec::new()).is_ok_and(|t| t.as_bytes() == b"/dev/null")
}

/// A unit's state under the host root: what enables it.
fn unit_enabled(root: &Root, unit: &str) -> Option<String> {
    WANTS.iter().find(|w| root.has(w, unit)).map(|w| format!("/{w}/{unit}"))
}

fn unit_masked(root: &Root, unit: &str) -> bool {
    ["etc/systemd/system", "run/systemd/system"]
        .iter()
        .any(|d| root.masked_at(d, unit))
}

/// The apt configuration files in the order apt reads them: the parts in
/// `apt.conf.d` that apt reads (names of letters, digits, `_`, `-` and `.`,
/// with no extension or `.conf`), then `apt.conf`, which overrides them.
fn apt_conf_files(root: &Root) -> Vec<String> {
    let read_by_apt = |n: &str| {
        n.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
            && match n.rsplit_once('.') {
                None => true,
                Some((_, ext)) => ext == "conf",
            }
    };
    let mut files: Vec<String> = root
        .names("etc/apt/apt.conf.d")
        .into_iter()
        .filter(|n| read_by_apt(n))
        .map(|n| format!("/etc/apt/apt.conf.d/{n}"))
        .collect();
    files.push("/etc/apt/apt.conf".to_owned());
    files
}

/// The last `APT::Periodic::Unattended-Upgrade` setting in these files:
/// (its value, "file:line: text").
fn uu_setting(root: &Root, include_holds: bool) -> Option<(String, String)> {
    let mut last = None;
    for f in apt_conf_files(root) {
        if !include_holds && f.rsplit('/').next().is_some_and(|n| n.starts_with(HOLD_FILE_PREFIX)) {
            continue;
        }
        let Some(text) = root.read(&f) else { continue };
        for (i, line) in text.lines().enumerate() {
            let l = line.trim();
            if l.starts_with("//") || l.starts_with('#') {
                continue;
            }
            // apt's option names are not case-sensitive.
            let rest = l
                .get(..UU_SETTING.len())
                .filter(|head| head.eq_ignore_ascii_case(UU_SETTING))
                .map(|_| &l[UU_SETTING.len()..]);
            if let Some(rest) = rest {
                let value = rest.trim().trim_end_matches(';').trim().trim_matches('"').to_owned();
                last = Some((value, format!("{f}:{}: {}", i + 1, wavegate_domain::text::inert(l))));
            }
        }
    }
    last
}

/// What on this host can change packages on its own, with the evidence.
pub fn scan(root: &Path, state_dir: &Path) -> Vec<Updater> {
    let Ok(root) = Root::open(root) else {
        return Vec::new();
    };
    let holds = records(state_dir);
    let held_unit = |unit: &str| {
        holds
            .iter()
            .find(|h| h.masked.iter().any(|m| m == unit))
            .map(|h| h.rollout.clone())
    };
    let mut out = Vec::new();

    if let Some((value, evidence)) = uu_setting(&root, false)
        && value != "0"
        && root.has("usr/bin", "unattended-upgrade")
    {
        let overridden = uu_setting(&root, true).is_some_and(|(v, _)| v == "0");
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
        let Some(link) = unit_enabled(&root, unit) else {
            continue;
        };
        let held_by = held_unit(unit);
        if unit_masked(&root, unit) && held_by.is_none() {
            // Masked by the host's own administrator: it does not run.
            continue;
        }
        // An override file of the administrator's own cannot be masked
        // without removing it: such a timer cannot be held.
        let holdable =
            held_by.is_some() || !root.has("etc/systemd/system", unit) || root.masked_at("etc/systemd/system", unit);
        out.push(Updater {
            kind: *kind,
            what: (*unit).into(),
            evidence: format!("enabled by {link}"),
            holdable,
            held_by,
        });
    }

    for (dir, name) in [
        ("etc/systemd/system/multi-user.target.wants", "snapd.service"),
        ("etc/systemd/system/sockets.target.wants", "snapd.socket"),
    ] {
        if root.has(dir, name) {
            out.push(Updater {
                kind: UpdaterKind::SnapRefresh,
                what: "snapd".into(),
                evidence: format!("enabled by /{dir}/{name}"),
                holdable: false,
                held_by: None,
            });
            break;
        }
    }

    out.extend(cron_jobs(&root));
    out
}

/// Cron lines that run a package manager.
fn cron_jobs(root: &Root) -> Vec<Updater> {
    // The system's cron files, and root's own crontab. A tenant's crontab
    // runs as the tenant, who cannot change packages; counted, it would let
    // any tenant with `crontab -e` refuse every rollout to its host.
    let mut files = vec!["/etc/crontab".to_owned(), "/var/spool/cron/crontabs/root".to_owned()];
    for dir in [
        "etc/cron.d",
        "etc/cron.hourly",
        "etc/cron.daily",
        "etc/cron.weekly",
        "etc/cron.monthly",
    ] {
        files.extend(root.names(dir).into_iter().map(|n| format!("/{dir}/{n}")));
    }
    let mut out = Vec::new();
    for f in files {
        let Some(text) = root.read(&f) else { continue };
        for (i, line) in text.lines().enumerate() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') || !CRON_UPDATE.is_match(l) {
                continue;
            }
            out.push(Updater {
                kind: UpdaterKind::Cron,
                what: f.clone(),
                evidence: format!("{f}:{}: {}", i + 1, wavegate_domain::text::inert(l)),
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
pub fn hold(root_path: &Path, state_dir: &Path, rollout: &str) -> Result<Vec<String>> {
    let found = scan(root_path, state_dir);
    let cannot: Vec<String> = found
        .iter()
        .filter(|u| u.active() && !u.holdable)
        .map(Updater::describe)
        .collect();
    if !cannot.is_empty() {
        bail!("these updaters cannot be held: {}", cannot.join("; "));
    }
    let root = Root::open(root_path)?;
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
    let name = format!("{HOLD_FILE_PREFIX}{}", hex::encode(rollout));
    // What is on the host decides, not the record: a hold retried after a
    // crash between the record and the write writes it now.
    let apt_in_place = rec.apt_file.is_some()
        && root
            .dir_to_write("etc/apt/apt.conf.d")
            .is_ok_and(|d| ours(d.as_fd(), &name, rollout));
    if wants_apt && !apt_in_place {
        let dir = root.dir_to_write("etc/apt/apt.conf.d")?;
        rec.apt_file = Some(name.clone());
        save(state_dir, &rec)?;
        // A new file of its own, or nothing: whatever is at that name
        // already (a link, a file) is refused, never written through.
        let fd = rustix::fs::openat(
            &dir,
            name.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .with_context(|| format!("creating /etc/apt/apt.conf.d/{name}"))?;
        let mut f = std::fs::File::from(fd);
        std::io::Write::write_all(
            &mut f,
            format!(
                "// Written by wavegate for rollout {rollout}: apt's periodic runs are held until it ends.\n\
                 {UU_SETTING} \"0\";\nAPT::Periodic::Update-Package-Lists \"0\";\nAPT::Periodic::Download-Upgradeable-Packages \"0\";\n"
            )
            .as_bytes(),
        )?;
        f.sync_all()?;
        done.push(format!(
            "apt's periodic runs off ({UU_SETTING} \"0\" in /etc/apt/apt.conf.d/{name})"
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
        let dir = root.dir_to_write("etc/systemd/system")?;
        if rec.masked.iter().any(|m| m == unit) && is_dev_null_link(dir.as_fd(), unit) {
            continue;
        }
        if !rec.masked.iter().any(|m| m == unit) {
            rec.masked.push(unit.to_owned());
        }
        save(state_dir, &rec)?;
        if !is_dev_null_link(dir.as_fd(), unit) {
            // A new link, or nothing: an override file there is refused.
            rustix::fs::symlinkat("/dev/null", &dir, unit).with_context(|| format!("masking {unit}"))?;
        }
        if live_systemd(root_path) {
            systemctl(&["daemon-reload"])?;
            systemctl(&["stop", unit])?;
        }
        done.push(format!("{unit} masked"));
    }
    save(state_dir, &rec)?;
    // Held is what apt and systemd now see, checked again: an `apt.conf`
    // that sets it after every part, or an upgrade already running, is a
    // hold that did not take, and the rollout must not start.
    if wants_apt
        && let Some((v, at)) = uu_setting(&root, true)
        && v != "0"
    {
        bail!("unattended-upgrades is still on after the hold: {at} is read after wavegate's file");
    }
    if live_systemd(root_path) {
        for service in TIMERS.iter().map(|(t, _)| t.replace(".timer", ".service")) {
            let running = std::process::Command::new("systemctl")
                .args(["is-active", "--quiet", &service])
                .status()
                .is_ok_and(|s| s.success());
            if running {
                bail!(
                    "{service} is running now (an update in progress): the hold takes effect only after it ends; try again then"
                );
            }
        }
    }
    Ok(done)
}

/// Whether `dir/name` is this rollout's hold file.
fn ours(dir: BorrowedFd<'_>, name: &str, rollout: &str) -> bool {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()
    .and_then(|fd| {
        let mut text = String::new();
        std::io::Read::take(std::fs::File::from(fd), READ_LIMIT)
            .read_to_string(&mut text)
            .ok()
            .map(|_| text)
    })
    .is_some_and(|t| t.contains(&format!("for rollout {rollout}:")))
}

/// Undo `rollout`'s hold; what it restored, one line each. A timer another
/// rollout still holds stays masked. Only what the hold made is removed: a
/// file of its own with its marker, a link to /dev/null.
pub fn release(root_path: &Path, state_dir: &Path, rollout: &str) -> Result<Vec<String>> {
    let all = records(state_dir);
    let Some(rec) = all.iter().find(|r| r.rollout == rollout) else {
        return Ok(Vec::new());
    };
    let root = Root::open(root_path)?;
    let mut done = Vec::new();
    if let Some(name) = &rec.apt_file
        && let Ok(dir) = root.dir_to_write("etc/apt/apt.conf.d")
        && ours(dir.as_fd(), name, rollout)
    {
        rustix::fs::unlinkat(&dir, name.as_str(), rustix::fs::AtFlags::empty())
            .with_context(|| format!("removing /etc/apt/apt.conf.d/{name}"))?;
        done.push(format!(
            "apt's periodic runs restored (/etc/apt/apt.conf.d/{name} removed)"
        ));
    }
    let mut reload = false;
    if let Ok(dir) = root.dir_to_write("etc/systemd/system") {
        for unit in &rec.masked {
            let others = all.iter().any(|r| r.rollout != rollout && r.masked.contains(unit));
            if others || !is_dev_null_link(dir.as_fd(), unit) {
                continue;
            }
            rustix::fs::unlinkat(&dir, unit.as_str(), rustix::fs::AtFlags::empty())
                .with_context(|| format!("unmasking {unit}"))?;
            reload = true;
            done.push(format!("{unit} unmasked"));
        }
    }
    if reload && live_systemd(root_path) {
        systemctl(&["daemon-reload"])?;
        for unit in &rec.masked {
            if unit_enabled(&root, unit).is_some() {
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
        assert!(masked(&root, "apt-daily-upgrade.timer"));
        // A second rollout holds too; the first one's release keeps the
        // masks the second still needs.
        hold(&root, &state, "r0002").expect("second hold");
        let restored = release(&root, &state, "r0001").expect("release");
        assert_eq!(restored.len(), 1, "only r0001's apt file: {restored:?}");
        assert!(masked(&root, "apt-daily.timer"));
        let restored = release(&root, &state, "r0002").expect("release");
        assert_eq!(restored.len(), 3, "{restored:?}");
        assert!(std::fs::symlink_metadata(root.join("etc/systemd/system/apt-daily.timer")).is_err());
        assert!(scan(&root, &state).iter().all(Updater::active));
        assert!(
            release(&root, &state, "r0002").expect("again").is_empty(),
            "a release is idempotent"
        );
    }

    fn masked(root: &Path, unit: &str) -> bool {
        std::fs::read_link(root.join("etc/systemd/system").join(unit)).is_ok_and(|t| t == Path::new("/dev/null"))
    }

    /// A link planted where a hold writes (by an earlier step with /etc in
    /// its write set, say) is refused, never written through; and a link
    /// in what is read resolves inside the host root, never to the
    /// machine's own files.
    #[test]
    fn planted_links_are_never_followed_out_of_the_host_root() {
        let (root, state) = debian_with_unattended_upgrades("links");
        let victim = root.parent().expect("base").join("victim");
        std::fs::write(&victim, "precious\n").expect("victim");
        let name = format!("{HOLD_FILE_PREFIX}{}", hex::encode("r0009"));
        std::os::unix::fs::symlink(&victim, root.join("etc/apt/apt.conf.d").join(&name)).expect("plant");
        let err = hold(&root, &state, "r0009").expect_err("refused");
        assert!(format!("{err:#}").contains(&name), "{err:#}");
        assert_eq!(std::fs::read_to_string(&victim).expect("victim"), "precious\n");
        // The unit directory swapped for a link (inside the root, so the
        // timers are still found): the mask is refused, not written there.
        std::fs::create_dir_all(root.join("elsewhere")).expect("mkdir");
        std::fs::rename(root.join("etc/systemd/system"), root.join("elsewhere/system")).expect("mv");
        std::os::unix::fs::symlink("/elsewhere/system", root.join("etc/systemd/system")).expect("plant");
        assert_eq!(
            scan(&root, &state)
                .iter()
                .filter(|u| u.kind == UpdaterKind::AptDaily)
                .count(),
            2,
            "found through the link, inside the root"
        );
        let err = hold(&root, &state, "r0010").expect_err("refused");
        assert!(format!("{err:#}").contains("etc/systemd/system"), "{err:#}");
        assert!(std::fs::symlink_metadata(root.join("elsewhere/system/apt-daily.timer")).is_err());
        // A cron file that links to an absolute path is read in the host's
        // tree: here, nothing there.
        std::fs::write(&victim, "0 3 * * * root apt-get -y upgrade\n").expect("victim");
        seed(&root, "/etc/cron.d/.keep", "");
        std::os::unix::fs::symlink(&victim, root.join("etc/cron.d/outside")).expect("plant");
        assert!(scan(&root, &state).iter().all(|u| u.kind != UpdaterKind::Cron));
    }

    /// apt's own reading: `apt.conf` after every part, parts with another
    /// extension ignored, option names in any case.
    #[test]
    fn the_setting_is_read_as_apt_reads_it_and_a_hold_that_does_not_take_is_refused() {
        let (root, state) = debian_with_unattended_upgrades("apt-order");
        // A backup file apt never reads does not switch it off.
        seed(
            &root,
            "/etc/apt/apt.conf.d/50off.bak",
            "APT::Periodic::Unattended-Upgrade \"0\";\n",
        );
        assert!(
            scan(&root, &state)
                .iter()
                .any(|u| u.kind == UpdaterKind::UnattendedUpgrades)
        );
        // Written in another case, and in apt.conf, which apt reads last.
        seed(&root, "/etc/apt/apt.conf", "apt::periodic::unattended-upgrade \"1\";\n");
        let found = scan(&root, &state);
        let uu = found
            .iter()
            .find(|u| u.kind == UpdaterKind::UnattendedUpgrades)
            .expect("found");
        assert!(uu.evidence.starts_with("/etc/apt/apt.conf:1:"), "{}", uu.evidence);
        let err = hold(&root, &state, "r0011").expect_err("apt.conf overrides the hold");
        assert!(format!("{err:#}").contains("still on after the hold"), "{err:#}");
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
        // A tenant's own crontab runs as the tenant: not an updater, and
        // no way for a tenant to refuse its host every rollout.
        seed(&root, "/var/spool/cron/crontabs/acme", "0 4 * * * apt-get -y upgrade\n");
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
    fn roots_own_crontab_is_read() {
        let (root, state) = debian_with_unattended_upgrades("root-crontab");
        seed(&root, "/var/spool/cron/crontabs/root", "30 2 * * * dnf -y upgrade\n");
        let found = scan(&root, &state);
        assert!(
            found
                .iter()
                .any(|u| u.evidence == "/var/spool/cron/crontabs/root:1: 30 2 * * * dnf -y upgrade"),
            "{found:?}"
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
