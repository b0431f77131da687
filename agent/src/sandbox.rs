//! The dry-run sandbox and the effect set.
//!
//! A dry-run runs the plan's steps on copy-on-write overlays of the host:
//! one overlay per filesystem mounted under the host root (the root's own,
//! and every mount below it at any depth, each with its own upper layer on
//! tmpfs), so a step sees the host's whole tree and its effects on every
//! filesystem are collected. It runs in new PID, network, IPC and UTS
//! namespaces: it cannot see or signal host processes, reach the network (or
//! a local TCP server), or connect to the host's unix sockets (a private
//! /tmp, /run and /var/run, and every listening socket path masked).
//! Afterwards the upper layers say exactly what the steps would delete,
//! modify and create. A mount that cannot be overlaid (FUSE, network, an
//! unknown type, or one the kernel refuses as a lower layer) is bound
//! read-only and blocks every step whose write set reaches it; if the
//! sandbox itself cannot be set up, every step is blocked.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::mount::{MsFlags, mount};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::mountinfo::{self, HostMount, Treatment};
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

/// A step as the dry-run takes it: the domain's, as the command carried it.
pub type DryStep = wavegate_domain::command::Step;

/// How a command ended in the sandbox.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ran {
    /// Its exit code (-1: none, it was killed).
    pub exit_code: i32,
    /// Whether it was killed at its time limit.
    pub timed_out: bool,
    /// The last lines of its output.
    pub tail: String,
}

/// How many lines of a dry-run's output its report keeps.
pub const TAIL_LINES: usize = 20;

/// The last `n` lines of `text`.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether `path` is one of `writes` or inside one.
pub fn inside(path: &str, writes: &[String]) -> bool {
    wavegate_domain::paths::within_any(path, writes)
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
    walk(upper, lower, "", Path::new(""), &mut out);
    out
}

/// One overlay of the sandbox: the host path it covers, its upper layer and
/// the filesystem under it.
#[derive(Clone, Debug)]
pub struct Layer {
    /// Host path of the mount (`/` for the host root's own filesystem).
    pub rel: String,
    /// Its upper layer (on the sandbox's tmpfs).
    pub upper: PathBuf,
    /// The mount itself, as the sandbox process sees it.
    pub lower: PathBuf,
}

/// Every layer's effects, keyed by host path.
pub fn scan_layers(layers: &[Layer]) -> BTreeMap<String, Effect> {
    let mut out = BTreeMap::new();
    for l in layers {
        let prefix = if l.rel == "/" { "" } else { l.rel.as_str() };
        walk(&l.upper, &l.lower, prefix, Path::new(""), &mut out);
    }
    out
}

fn walk(upper: &Path, lower: &Path, prefix: &str, rel: &Path, out: &mut BTreeMap<String, Effect>) {
    let Ok(rd) = std::fs::read_dir(upper.join(rel)) else {
        return;
    };
    for e in rd.flatten() {
        let rel_p = rel.join(e.file_name());
        let key = format!("{prefix}/{}", rel_p.display());
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
                walk(upper, lower, prefix, &rel_p, out);
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

/// Why a step's write set cannot be dry-run or confined on this host: it
/// reaches a mount the sandbox cannot overlay, it is the same files as a
/// path outside the write set (a bind mount), or it is reached through a
/// symlink. Empty when there is nothing in the way.
pub fn write_set_problems(host_root: &Path, mounts: &[HostMount], writes: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for w in writes {
        for m in mountinfo::reached_by(mounts, w) {
            if let Treatment::Refused(why) = &m.treatment {
                out.push(format!(
                    "`writes` path {w} reaches the mount {}, which cannot be overlaid: {why}; the dry-run cannot see what the step would do there (list {} as `untouchable` if no step may change it)",
                    m.describe(),
                    m.rel
                ));
            }
        }
        if let Some(alias) = mountinfo::alias_outside(mounts, w, writes) {
            out.push(format!(
                "`writes` path {w} holds the same files as {alias} (a bind mount or a filesystem mounted twice); a change there would change {alias}, which the write set does not name"
            ));
        }
        if let Some((link, target)) = symlink_on_path(host_root, w) {
            out.push(format!(
                "`writes` path {w} goes through the symlink {link} -> {target}; declare the path it points to"
            ));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The first symlink on the way from the host root to `path`, and where it
/// points.
pub fn symlink_on_path(host_root: &Path, path: &str) -> Option<(String, String)> {
    let mut at = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        at.push('/');
        at.push_str(part);
        let full = host_root.join(at.trim_start_matches('/'));
        match full.symlink_metadata() {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&full)
                    .map(|t| t.display().to_string())
                    .unwrap_or_default();
                return Some((at, target));
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Judge one step's effects against what it may change (`allowed`: its
/// write set, or for a package step its packages' files) and its deletion
/// budget, and how its run ended: a dry-run that failed, timed out or was
/// killed says nothing about the real run, so it blocks unless the plan
/// says why that is acceptable. `blocks` are reasons found before it ran
/// ([`write_set_problems`]).
pub fn judge(
    step: &DryStep,
    effects: &BTreeMap<String, Effect>,
    ran: &Ran,
    blocks: &[String],
    allowed: &dyn Fn(&str) -> bool,
) -> StepReport {
    let mut r = StepReport {
        step: step.name.clone(),
        exit_code: ran.exit_code,
        timed_out: ran.timed_out,
        output_tail: ran.tail.clone(),
        ..StepReport::default()
    };
    r.reasons.extend(blocks.iter().cloned());
    let failed = if ran.timed_out {
        Some(format!(
            "the dry-run was killed at its time limit of {} ms",
            step.timeout_ms
        ))
    } else if ran.exit_code < 0 {
        Some("the dry-run was killed".to_owned())
    } else if ran.exit_code != 0 {
        Some(format!("the dry-run exited with status {}", ran.exit_code))
    } else {
        None
    };
    match (failed, &step.allow_failure) {
        (Some(_), Some(why)) => r.allowed_failure = Some(why.clone()),
        (Some(what), None) => r.reasons.push(format!(
            "{what}, so its effects are no prediction of the real run (a step whose dry-run may fail says `dry_run: {{allow_failure: \"why\"}}`)"
        )),
        (None, _) => {}
    }
    for (path, effect) in effects {
        let ok = allowed(path);
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

/// Cover every bound unix socket of the host that `view` (a view of
/// `host_root`, in this process's own mount namespace) shows with
/// /dev/null: the service manager's, D-Bus's, journald's, a database's.
/// A raw client on systemd's private socket could start or stop any unit,
/// outside every write set; in the sandbox and in a confined real run
/// nothing answers there. With `service_manager_only` (a health check,
/// which may well ask a database's socket whether it is up), only systemd's
/// and D-Bus's sockets are covered.
pub fn mask_sockets(host_root: &Path, view: &Path, service_manager_only: bool) -> Result<()> {
    let root_real = host_root.canonicalize()?;
    let view_real = view.canonicalize()?;
    for sock in unix_socket_paths() {
        let rel = match sock.strip_prefix(host_root) {
            Ok(r) => r.to_path_buf(),
            Err(_) if host_root == Path::new("/") => sock.strip_prefix("/").map(Path::to_path_buf).unwrap_or_default(),
            Err(_) => continue,
        };
        // Bound through a link (`/var/run/docker.sock`, /var/run being a
        // link to /run): the socket is covered where it really is. One
        // gone since the kernel listed it needs no cover.
        let Ok(real) = host_root.join(&rel).canonicalize() else {
            continue;
        };
        let Ok(rel) = real.strip_prefix(&root_real) else {
            continue;
        };
        let path = Path::new("/").join(rel);
        if service_manager_only
            && !["/run/systemd", "/run/dbus", "/run/user"]
                .iter()
                .any(|d| path.starts_with(d))
        {
            continue;
        }
        let target = view_real.join(rel);
        // No link on the way in the view either (a tenant's directory
        // swapped for one since): the cover must land where it is named.
        let expected = target.parent().map(Path::to_path_buf);
        if target.parent().map(Path::canonicalize).and_then(Result::ok) != expected {
            continue;
        }
        if !target
            .symlink_metadata()
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false)
        {
            continue;
        }
        if let Err(e) = mounts::bind(Path::new("/dev/null"), &target, false) {
            // Removed in the meantime: nothing to cover. Anything else
            // leaves a socket open: fail closed.
            if target.symlink_metadata().is_ok() {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The sandbox as set up: the merged view, its overlays, and the mounts of
/// the host it was built from.
pub struct Sandbox {
    /// The root a step is chrooted into.
    pub merged: PathBuf,
    /// One overlay per filesystem that can be overlaid.
    pub layers: Vec<Layer>,
    /// The host's mounts, with what the sandbox did with each (a mount the
    /// kernel refused as a lower layer is marked refused here).
    pub mounts: Vec<HostMount>,
}

/// Escape a path for an overlay mount option (`\`, `:` and `,` are special).
fn overlay_escape(p: &Path) -> String {
    let mut out = String::new();
    for c in p.display().to_string().chars() {
        if matches!(c, '\\' | ':' | ',') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn overlay(lower: &Path, staged: &[PathBuf], upper: &Path, work: &Path, at: &Path) -> Result<()> {
    std::fs::create_dir_all(upper)?;
    std::fs::create_dir_all(work)?;
    // Staged fetches lie over the host: the step sees what its fetch will
    // have put in place by the time it runs for real.
    let lowers: Vec<String> = staged
        .iter()
        .map(|p| overlay_escape(p))
        .chain([overlay_escape(lower)])
        .collect();
    // Plain copy-up only: no redirects or metacopy, whatever the kernel's
    // defaults, so an upper layer (a staged fetch) holds whole files.
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off",
        lowers.join(":"),
        overlay_escape(upper),
        overlay_escape(work)
    );
    mount(
        Some("overlay"),
        at,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .with_context(|| format!("mounting a copy-on-write overlay of {}", lower.display()))
}

/// Set up the sandbox for `host_root` under `base` (which this process owns,
/// in its own mount namespace): an overlay of the host root's filesystem,
/// then one of every mount below it, parents first. `untouchable` paths are
/// bound read-only instead. `stages` are staged fetches' trees (shaped like
/// the host root), laid over the host in that order.
pub fn setup(host_root: &Path, base: &Path, untouchable: &[String], stages: &[PathBuf]) -> Result<Sandbox> {
    mounts::private_namespace("the dry-run sandbox (mount, PID and network namespaces)")?;
    std::fs::create_dir_all(base)?;
    // The host's mounts before the sandbox adds its own.
    let table = mountinfo::read()?;
    let mut host = mountinfo::host_mounts(&table, host_root, untouchable, &[base]);
    mounts::tmpfs(base, "size=1g,mode=0700")?;
    let merged = base.join("merged");
    std::fs::create_dir_all(&merged)?;
    // A staged tree kept on the host's own filesystem (the agent's state
    // directory on a server whose root is `/`) lies inside the layer it
    // would be laid over, and overlayfs refuses overlapping layers (ELOOP):
    // such a tree is laid over from a copy on the sandbox's tmpfs.
    let mut copies = Vec::new();
    for (i, s) in stages.iter().enumerate() {
        if host.iter().any(|m| {
            let lower = host_root.join(m.rel.trim_start_matches('/'));
            s.starts_with(&lower)
        }) {
            let copy = base.join(format!("stage-copy/{i}"));
            std::fs::create_dir_all(copy.parent().unwrap_or(base))?;
            let ok = std::process::Command::new("cp")
                .args(["-a", "--sparse=always"])
                .arg(s)
                .arg(&copy)
                .status()
                .context("copying a staged fetch into the sandbox (cp)")?
                .success();
            if !ok {
                bail!("copying the staged fetch {} into the sandbox failed", s.display());
            }
            copies.push(copy);
        } else {
            copies.push(s.clone());
        }
    }
    let stages = &copies[..];
    let mut layers = Vec::new();
    for (n, m) in host.iter_mut().enumerate() {
        let staged: Vec<PathBuf> = stages
            .iter()
            .map(|s| s.join(m.rel.trim_start_matches('/')))
            .filter(|p| p.is_dir())
            .collect();
        let (lower, at) = if m.rel == "/" {
            (host_root.to_path_buf(), merged.clone())
        } else {
            (
                host_root.join(m.rel.trim_start_matches('/')),
                merged.join(m.rel.trim_start_matches('/')),
            )
        };
        if m.rel == "/" {
            // Without its root filesystem there is no sandbox at all.
            if !matches!(m.treatment, Treatment::Overlay | Treatment::ReadOnly(_)) {
                bail!(
                    "the host root's filesystem {} cannot be overlaid: {:?}",
                    m.describe(),
                    m.treatment
                );
            }
            let (upper, work) = (base.join(format!("upper/{n}")), base.join(format!("work/{n}")));
            overlay(&lower, &staged, &upper, &work, &at)?;
            layers.push(Layer {
                rel: m.rel.clone(),
                upper,
                lower,
            });
            continue;
        }
        if !at.is_dir() || !lower.is_dir() {
            // A file mounted on a file, or a mount point the view does not
            // reach: nothing to overlay, and nothing a step could count on.
            if matches!(m.treatment, Treatment::Overlay) {
                m.treatment = Treatment::Refused("it is not a directory mount".into());
            }
            if lower.exists() && at.exists() && !matches!(m.treatment, Treatment::Virtual) {
                mounts::bind_one(&lower, &at, true)?;
            }
            continue;
        }
        match m.treatment.clone() {
            Treatment::Overlay => {
                let (upper, work) = (base.join(format!("upper/{n}")), base.join(format!("work/{n}")));
                match overlay(&lower, &staged, &upper, &work, &at) {
                    Ok(()) => layers.push(Layer {
                        rel: m.rel.clone(),
                        upper,
                        lower,
                    }),
                    Err(e) => {
                        // The kernel refused it as a lower layer: keep the
                        // view (read-only) and block what reaches it.
                        m.treatment = Treatment::Refused(format!("the kernel refused to overlay it ({e:#})"));
                        mounts::bind_one(&lower, &at, true)?;
                    }
                }
            }
            Treatment::ReadOnly(_) | Treatment::Refused(_) => mounts::bind_one(&lower, &at, true)?,
            // /proc and /dev are the sandbox's own; the rest stays out.
            Treatment::Virtual => {}
        }
    }
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
    mask_sockets(host_root, &merged, false)?;
    std::fs::create_dir_all(merged.join("proc")).ok();
    Ok(Sandbox {
        merged,
        layers,
        mounts: host,
    })
}

/// Run one command inside the sandbox: the jail ([`crate::jail`]) in new
/// PID, network, IPC and UTS namespaces, pivoted into the merged root with
/// a fresh /proc and a minimal /dev, capabilities dropped and a seccomp
/// filter. Its output is appended to `output`; what it wrote there is
/// returned with how it ended. A jail that could not be set up is an error:
/// the step never ran, which never counts as a dry-run that passed.
fn run_in(
    merged: &Path,
    run: &str,
    timeout: Duration,
    output: &Path,
    site: &crate::jail::Site,
) -> Result<(Ran, String)> {
    run_jailed(merged, run, timeout, output, None, true, site)
}

/// [`run_in`] with Landlock's write set (`writable`) and the host's network
/// (`own_network` false) as a fetch needs them.
fn run_jailed(
    merged: &Path,
    run: &str,
    timeout: Duration,
    output: &Path,
    writable: Option<Vec<String>>,
    own_network: bool,
    site: &crate::jail::Site,
) -> Result<(Ran, String)> {
    let start = std::fs::metadata(output).map_or(0, |m| m.len());
    let out = std::fs::OpenOptions::new().create(true).append(true).open(output)?;
    let spec_file = output.with_extension("jail.json");
    let spec = crate::jail::Spec {
        root: merged.to_path_buf(),
        run: run.to_owned(),
        writable,
        accept_weaker: site.accept_weaker.clone(),
        hide: site.hide.clone(),
    };
    std::fs::write(&spec_file, serde_json::to_vec(&spec)?)?;
    let exe = std::env::current_exe().context("finding the agent's own binary")?;
    let mut cmd = crate::jail::command(&exe, &spec_file, own_network);
    let mut child = mounts::step_process(&mut cmd, &out)?
        .spawn()
        .context("starting the sandbox (util-linux `unshare`)")?;
    let status = mounts::wait_or_kill_group(&mut child, timeout)?;
    let text = {
        use std::io::{Read as _, Seek as _};
        let mut f = std::fs::File::open(output)?;
        f.seek(std::io::SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.take(4 << 20).read_to_end(&mut buf)?;
        String::from_utf8_lossy(&buf).into_owned()
    };
    // What a report shows of the output is masked like everything else
    // that leaves the host (the journal keeps it as it was).
    let masked = String::from_utf8_lossy(&wavegate_domain::redact::Redactor::lazy(&site.redact).all(text.as_bytes()))
        .into_owned();
    let ran = Ran {
        exit_code: status.and_then(|s| s.code()).unwrap_or(-1),
        timed_out: status.is_none(),
        tail: last_lines(&masked, TAIL_LINES),
    };
    if let Some(why) = crate::jail::setup_failed(ran.exit_code, &spec_file) {
        bail!("the sandbox could not be set up: {why}");
    }
    Ok((ran, text))
}

/// Run a fetch before approval: in the jail over the sandbox's view of the
/// host (with the network, writes allowed only beneath `writes`), then keep
/// what it wrote beneath `writes` as a staged tree at `out` (see
/// [`crate::fetch`]). Nothing on the host changes.
#[allow(
    clippy::too_many_arguments,
    reason = "each is one of the fetch's own settings; a struct for one caller adds nothing"
)]
pub fn fetch_staged(
    host_root: &Path,
    base: &Path,
    run: &str,
    writes: &[String],
    timeout: Duration,
    output: &Path,
    out: &Path,
    site: &crate::jail::Site,
) -> Result<Ran> {
    let sandbox = setup(host_root, base, &[], &[])?;
    // Where it may write must be there for Landlock to allow it: made in
    // the copy-on-write view (and so in the staging cache), not the host.
    for w in writes {
        let at = sandbox.merged.join(w.trim_start_matches('/'));
        if at.symlink_metadata().is_err() {
            std::fs::create_dir_all(&at).with_context(|| format!("making {w} in the sandbox"))?;
        }
    }
    let (ran, _) = run_jailed(
        &sandbox.merged,
        run,
        timeout,
        output,
        Some(writes.to_vec()),
        false,
        site,
    )?;
    if ran.exit_code == 0 && !ran.timed_out {
        crate::fetch::keep(&sandbox.layers, writes, out)?;
    }
    Ok(ran)
}

/// Dry-run `steps` in order in one sandbox over `host_root`; each step's
/// effects are those its run added. Never changes the host. `stages` are
/// staged fetches' trees, laid over the host.
pub fn dry_run(
    host_root: &Path,
    base: &Path,
    steps: &[DryStep],
    untouchable: &[String],
    output: &Path,
    stages: &[PathBuf],
    site: &crate::jail::Site,
) -> Result<Vec<StepReport>> {
    let sandbox = setup(host_root, base, untouchable, stages)?;
    // invoke-rc.d and deb-systemd-invoke note what they are asked (see
    // `services`): nothing in the sandbox reaches the host's services.
    crate::services::install(&sandbox.merged, host_root, &base.join("services"))?;
    let mut before: BTreeMap<String, Effect> = BTreeMap::new();
    let mut reports = Vec::new();
    let scratch = base.join("scratch-output");
    for step in steps {
        let mut blocks = write_set_problems(host_root, &sandbox.mounts, &step.writes);
        let mut resolved = None;
        if let Some(p) = &step.packages {
            let mut simulate = |cmd: &str| -> Result<(i32, String)> {
                let _ = std::fs::remove_file(&scratch);
                let (ran, text) = run_in(
                    &sandbox.merged,
                    cmd,
                    Duration::from_millis(step.timeout_ms.max(1)),
                    &scratch,
                    site,
                )?;
                Ok((ran.exit_code, text))
            };
            // Read through the sandbox's view: a package fetched before
            // approval is in a staging cache laid over the host there.
            match crate::packages::resolve(host_root, &sandbox.merged, p, &step.writes, &mut simulate) {
                Ok(r) => {
                    blocks.extend(write_set_problems(host_root, &sandbox.mounts, &r.writes));
                    resolved = Some(r);
                }
                Err(why) => blocks.push(why),
            }
        }
        let (ran, _) = run_in(
            &sandbox.merged,
            &step.run,
            Duration::from_millis(step.timeout_ms.max(1)),
            output,
            site,
        )?;
        let after = scan_layers(&sandbox.layers);
        let delta: BTreeMap<String, Effect> = after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let allowed = |p: &str| match &resolved {
            Some(r) => r.allows(p, &step.writes),
            None => inside(p, &step.writes),
        };
        let mut report = judge(step, &delta, &ran, &blocks, &allowed);
        report
            .reasons
            .extend(emptied(host_root, &sandbox.merged, &delta, &allowed));
        // What its maintainer scripts asked of the service manager: the
        // real run has the agent do it, for the packages' own services only.
        let asked = crate::services::requests(&sandbox.merged);
        let _ = std::fs::remove_file(sandbox.merged.join(crate::services::REQUESTS));
        let units = step
            .packages
            .as_ref()
            .map(|p| crate::packages::services(host_root, p))
            .unwrap_or_default();
        for r in &asked {
            report.services.push(r.describe());
            report
                .reasons
                .extend(crate::services::refusal(r, &units, step.packages.is_some()));
        }
        // Reasons quote what the package manager printed: masked as well.
        let mut r = wavegate_domain::redact::Redactor::lazy(&site.redact);
        for reason in &mut report.reasons {
            *reason = String::from_utf8_lossy(&r.all(reason.as_bytes())).into_owned();
        }
        if let Some(r) = resolved {
            report.packages = r.changes;
            report.implied_writes = r.writes;
        }
        report.blocked = !report.reasons.is_empty();
        reports.push(report);
        before = after;
    }
    Ok(reports)
}

/// Directories outside what a step may change that its run would leave
/// empty (or remove), for people: "it would empty /srv/customer-data".
fn emptied(
    host_root: &Path,
    merged: &Path,
    effects: &BTreeMap<String, Effect>,
    allowed: &dyn Fn(&str) -> bool,
) -> Vec<String> {
    let mut parents: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (path, e) in effects {
        let Effect::Deleted { files, .. } = e else { continue };
        if allowed(path) {
            continue;
        }
        if host_root.join(path.trim_start_matches('/')).is_dir() && *files > 0 {
            out.push(format!(
                "it would remove {path} ({files} files), outside what it may change"
            ));
        }
        if let Some((parent, _)) = path.rsplit_once('/')
            && !parent.is_empty()
        {
            parents.insert(parent.to_owned());
        }
    }
    for p in parents {
        let had = std::fs::read_dir(host_root.join(p.trim_start_matches('/'))).map_or(0, |d| d.count());
        let has = std::fs::read_dir(merged.join(p.trim_start_matches('/'))).map_or(0, |d| d.count());
        if had > 0 && has == 0 {
            out.push(format!("it would empty {p}, outside what it may change"));
        }
    }
    out
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
            allow_failure: None,
            ..DryStep::default()
        };
        let mut effects = BTreeMap::new();
        effects.insert("/etc/app/a".to_string(), Effect::Deleted { files: 1, bytes: 3 });
        let ok = Ran::default();
        let allowed = |p: &str| inside(p, &step.writes);
        let r = judge(&step, &effects, &ok, &[], &allowed);
        assert!(!r.blocked, "{r:?}");
        effects.insert("/home/alice".to_string(), Effect::Deleted { files: 40, bytes: 4000 });
        let r = judge(&step, &effects, &ok, &[], &allowed);
        assert!(r.blocked);
        assert_eq!(r.outside_deleted.count, 40);
        assert_eq!(r.outside_deleted.sample, ["/home/alice"]);
        assert_eq!(r.deleted.count, 41);
        assert_eq!(r.reasons.len(), 2, "outside and over budget: {:?}", r.reasons);
    }

    #[test]
    fn a_failed_dry_run_blocks_unless_the_plan_says_why() {
        let mut step = DryStep {
            name: "s".into(),
            run: String::new(),
            writes: vec!["/etc/app".into()],
            max_deletions: 0,
            timeout_ms: 1000,
            allow_failure: None,
            ..DryStep::default()
        };
        let allowed = |p: &str| inside(p, &["/etc/app".to_owned()]);
        let none = BTreeMap::new();
        for (ran, says) in [
            (
                Ran {
                    exit_code: 7,
                    ..Ran::default()
                },
                "exited with status 7",
            ),
            (
                Ran {
                    exit_code: -1,
                    timed_out: true,
                    ..Ran::default()
                },
                "time limit of 1000 ms",
            ),
            (
                Ran {
                    exit_code: -1,
                    ..Ran::default()
                },
                "was killed",
            ),
        ] {
            let r = judge(&step, &none, &ran, &[], &allowed);
            assert!(r.blocked, "{r:?}");
            assert!(r.reasons[0].contains(says), "{:?}", r.reasons);
        }
        step.allow_failure = Some("needs the license server".into());
        let r = judge(
            &step,
            &none,
            &Ran {
                exit_code: 7,
                ..Ran::default()
            },
            &[],
            &allowed,
        );
        assert!(!r.blocked, "{r:?}");
        assert_eq!(r.allowed_failure.as_deref(), Some("needs the license server"));
    }
}
