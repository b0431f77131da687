//! The dry-run sandbox and the effect set.
//!
//! A dry-run runs the plan's steps on a copy-on-write overlay of the host
//! root (upper layer on tmpfs), in new PID, network, IPC and UTS namespaces:
//! it cannot see or signal host processes, reach the network (or a local TCP
//! server), or connect to the host's unix sockets (a private /tmp, /run and
//! /var/run, and every listening socket path masked). Afterwards the upper
//! layer says exactly what the steps would delete, modify and create. If any
//! part of this cannot be set up, the dry-run is blocked.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::mount::{MsFlags, mount};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::mounts;

pub use wavegate_domain::effects::{Category, SAMPLE, StepReport};

/// What happened to one path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// Removed; `files` counts the files under it (1 for a file).
    Deleted {
        /// Files removed.
        files: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// Changed content, mode, owner or link target.
    Modified {
        /// Size after.
        bytes: u64,
    },
    /// New.
    Created {
        /// Whether it is a directory.
        dir: bool,
        /// Size.
        bytes: u64,
    },
}

/// A step for the sandbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DryStep {
    /// Name.
    pub name: String,
    /// Command line.
    pub run: String,
    /// Declared write set.
    pub writes: Vec<String>,
    /// Deletion budget.
    pub max_deletions: u64,
    /// Time limit.
    pub timeout_ms: u64,
}

/// Whether `path` is one of `writes` or inside one.
pub fn inside(path: &str, writes: &[String]) -> bool {
    writes
        .iter()
        .any(|w| path == w || path.strip_prefix(w.as_str()).is_some_and(|r| r.starts_with('/')))
}

fn file_hash(p: &Path) -> Option<String> {
    let mut f = std::fs::File::open(p).ok()?;
    let mut h = Sha256::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Some(hex::encode(h.finalize()))
}

/// Files and bytes under a path of the lower layer.
fn count(p: &Path) -> (u64, u64) {
    let Ok(m) = p.symlink_metadata() else { return (0, 0) };
    if !m.is_dir() {
        return (1, m.len());
    }
    let mut total = (0, 0);
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let (f, b) = count(&e.path());
            total.0 += f;
            total.1 += b;
        }
    }
    total
}

fn differs(up: &Path, low: &Path) -> bool {
    let (Ok(a), Ok(b)) = (up.symlink_metadata(), low.symlink_metadata()) else {
        return true;
    };
    if a.file_type() != b.file_type() || a.mode() != b.mode() || a.uid() != b.uid() || a.gid() != b.gid() {
        return true;
    }
    if a.file_type().is_symlink() {
        return std::fs::read_link(up).ok() != std::fs::read_link(low).ok();
    }
    if a.is_file() {
        return a.len() != b.len() || file_hash(up) != file_hash(low);
    }
    false
}

fn is_whiteout(m: &std::fs::Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

fn opaque(p: &Path) -> bool {
    matches!(xattr::get(p, "trusted.overlay.opaque"), Ok(Some(v)) if v == b"y")
}

/// Every path of the upper layer, as effects against the lower layer.
pub fn scan(upper: &Path, lower: &Path) -> BTreeMap<String, Effect> {
    let mut out = BTreeMap::new();
    walk(upper, lower, Path::new(""), &mut out);
    out
}

fn walk(upper: &Path, lower: &Path, rel: &Path, out: &mut BTreeMap<String, Effect>) {
    let Ok(rd) = std::fs::read_dir(upper.join(rel)) else {
        return;
    };
    for e in rd.flatten() {
        let rel_p = rel.join(e.file_name());
        let key = format!("/{}", rel_p.display());
        let up = upper.join(&rel_p);
        let low = lower.join(&rel_p);
        let Ok(m) = up.symlink_metadata() else { continue };
        let low_exists = low.symlink_metadata().is_ok();
        if is_whiteout(&m) {
            let (files, bytes) = count(&low);
            out.insert(key, Effect::Deleted { files, bytes });
        } else if m.is_dir() {
            if !low_exists {
                out.insert(key.clone(), Effect::Created { dir: true, bytes: 0 });
                walk_created(&up, &key, out);
            } else if opaque(&up) {
                // Removed and made again: everything below in the lower
                // layer is gone, everything in the upper one is new.
                let (files, bytes) = count(&low);
                out.insert(key.clone(), Effect::Deleted { files, bytes });
                walk_created(&up, &key, out);
            } else {
                if differs(&up, &low) {
                    out.insert(key.clone(), Effect::Modified { bytes: 0 });
                }
                walk(upper, lower, &rel_p, out);
            }
        } else if !low_exists {
            out.insert(
                key,
                Effect::Created {
                    dir: false,
                    bytes: m.len(),
                },
            );
        } else if differs(&up, &low) {
            out.insert(key, Effect::Modified { bytes: m.len() });
        }
    }
}

fn walk_created(dir: &Path, key: &str, out: &mut BTreeMap<String, Effect>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let k = format!("{key}/{}", e.file_name().to_string_lossy());
        let Ok(m) = e.path().symlink_metadata() else { continue };
        if m.is_dir() {
            out.insert(k.clone(), Effect::Created { dir: true, bytes: 0 });
            walk_created(&e.path(), &k, out);
        } else if !is_whiteout(&m) {
            out.insert(
                k,
                Effect::Created {
                    dir: false,
                    bytes: m.len(),
                },
            );
        }
    }
}

/// Judge one step's effects against its write set and deletion budget.
pub fn judge(step: &DryStep, effects: &BTreeMap<String, Effect>, exit_code: i32) -> StepReport {
    let mut r = StepReport {
        step: step.name.clone(),
        exit_code,
        ..StepReport::default()
    };
    for (path, effect) in effects {
        let ok = inside(path, &step.writes);
        match effect {
            Effect::Deleted { files, bytes } => {
                r.deleted.add(path, *files, *bytes);
                if !ok {
                    r.outside_deleted.add(path, *files, *bytes);
                }
            }
            Effect::Modified { bytes } => r.modified.add(path, 1, *bytes),
            Effect::Created { dir, bytes } => {
                r.created.add(path, 1, *bytes);
                if ok {
                    if *dir {
                        r.created_dirs.push(path.clone())
                    } else {
                        r.created_files.push(path.clone())
                    }
                }
            }
        }
        if !ok {
            let n = match effect {
                Effect::Deleted { files, .. } => *files,
                _ => 1,
            };
            r.outside.add(path, n, 0);
        }
    }
    if r.outside.count > 0 {
        r.reasons.push(format!(
            "{} effects outside the declared write set ({} files deleted there), e.g. {}",
            r.outside.count,
            r.outside_deleted.count,
            r.outside.sample.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    if r.deleted.count > step.max_deletions {
        r.reasons.push(format!(
            "deletes {} files; max_deletions is {}",
            r.deleted.count, step.max_deletions
        ));
    }
    r.blocked = !r.reasons.is_empty();
    r
}

/// Paths of listening unix sockets (from the host's network namespace).
fn unix_socket_paths() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// Set up the sandbox for `host_root` under `base` (which this process owns,
/// in its own mount namespace). Returns the merged root and the upper layer.
fn setup(host_root: &Path, base: &Path) -> Result<(PathBuf, PathBuf)> {
    mounts::private_namespace("the dry-run sandbox (mount, PID and network namespaces)")?;
    std::fs::create_dir_all(base)?;
    mounts::tmpfs(base, "size=1g,mode=0700")?;
    let (upper, work, merged) = (base.join("upper"), base.join("work"), base.join("merged"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d)?;
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        host_root.display(),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .context("mounting the copy-on-write overlay of the host root")?;
    if host_root != Path::new("/") {
        mounts::bind_system_dirs(&merged)?;
    }
    // A minimal /dev: no disks to write to.
    let dev = merged.join("dev");
    std::fs::create_dir_all(&dev).ok();
    mounts::tmpfs(&dev, "size=1m,mode=0755")?;
    for d in ["null", "zero", "full", "random", "urandom", "tty"] {
        let src = Path::new("/dev").join(d);
        if src.exists() {
            std::fs::write(dev.join(d), b"")?;
            mounts::bind(&src, &dev.join(d), false)?;
        }
    }
    // Private scratch where sockets usually live.
    for d in ["tmp", "run", "var/run", "var/tmp", "dev/shm"] {
        let p = merged.join(d);
        if p.is_dir() && !p.symlink_metadata().map(|m| m.file_type().is_symlink()).unwrap_or(true) {
            mounts::tmpfs(&p, "size=256m,mode=1777")?;
        }
    }
    // Every listening unix socket path of the host, masked.
    for sock in unix_socket_paths() {
        let rel = match sock.strip_prefix(host_root) {
            Ok(r) => r.to_path_buf(),
            Err(_) if host_root == Path::new("/") => sock.strip_prefix("/").map(Path::to_path_buf).unwrap_or_default(),
            Err(_) => continue,
        };
        let target = merged.join(&rel);
        if target
            .symlink_metadata()
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false)
        {
            mounts::bind(Path::new("/dev/null"), &target, false)?;
        }
    }
    std::fs::create_dir_all(merged.join("proc")).ok();
    Ok((merged, upper))
}

/// Run one command inside the sandbox: new PID, network, IPC and UTS
/// namespaces, a fresh /proc, chrooted into the merged root.
fn run_in(merged: &Path, run: &str, timeout: Duration, output: &Path) -> Result<i32> {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(output)?;
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--net", "--ipc", "--uts", "--fork", "--kill-child"])
        .arg(format!("--mount-proc={}", merged.join("proc").display()))
        .arg("chroot")
        .arg(merged)
        .args(["/bin/sh", "-c", run]);
    let mut child = mounts::step_process(&mut cmd, &out)?
        .spawn()
        .context("starting the sandbox (util-linux `unshare`)")?;
    let status = mounts::wait_or_kill_group(&mut child, timeout)?;
    Ok(status.and_then(|s| s.code()).unwrap_or(-1))
}

/// Dry-run `steps` in order in one sandbox over `host_root`; each step's
/// effects are those its run added. Never changes the host.
pub fn dry_run(host_root: &Path, base: &Path, steps: &[DryStep], output: &Path) -> Result<Vec<StepReport>> {
    let (merged, upper) = setup(host_root, base)?;
    let mut before: BTreeMap<String, Effect> = BTreeMap::new();
    let mut reports = Vec::new();
    for step in steps {
        let code = run_in(
            &merged,
            &step.run,
            Duration::from_millis(step.timeout_ms.max(1)),
            output,
        )?;
        let after = scan(&upper, host_root);
        let delta: BTreeMap<String, Effect> = after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        reports.push(judge(step, &delta, code));
        before = after;
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_is_by_component() {
        let w = vec!["/etc/app".to_string()];
        assert!(inside("/etc/app", &w));
        assert!(inside("/etc/app/x.conf", &w));
        assert!(!inside("/etc/apple", &w));
        assert!(!inside("/etc", &w));
    }

    #[test]
    fn judging_blocks_outside_effects_and_over_budget_deletions() {
        let step = DryStep {
            name: "s".into(),
            run: String::new(),
            writes: vec!["/etc/app".into()],
            max_deletions: 1,
            timeout_ms: 1,
        };
        let mut effects = BTreeMap::new();
        effects.insert("/etc/app/a".to_string(), Effect::Deleted { files: 1, bytes: 3 });
        let r = judge(&step, &effects, 0);
        assert!(!r.blocked, "{r:?}");
        effects.insert("/home/alice".to_string(), Effect::Deleted { files: 40, bytes: 4000 });
        let r = judge(&step, &effects, 0);
        assert!(r.blocked);
        assert_eq!(r.outside_deleted.count, 40);
        assert_eq!(r.outside_deleted.sample, ["/home/alice"]);
        assert_eq!(r.deleted.count, 41);
        assert_eq!(r.reasons.len(), 2, "outside and over budget: {:?}", r.reasons);
    }
}
