//! Mount-namespace and process-group plumbing shared by the supervisor's
//! three ways of running a command (plain, confined, dry-run sandbox).

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, geteuid};

/// Directories of the machine a host root sees read-only.
pub const SYSTEM_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Enter a private mount namespace (root only); `what` says what needs it.
pub fn private_namespace(what: &str) -> Result<()> {
    if !geteuid().is_root() {
        bail!("{what} needs root (mount namespaces); run the agent as root");
    }
    unshare(CloneFlags::CLONE_NEWNS).context("entering a mount namespace")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making mounts private")
}

/// Bind `src` on `dst` (recursively), read-only if asked.
pub fn bind(src: &Path, dst: &Path, readonly: bool) -> Result<()> {
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("binding {} on {}", src.display(), dst.display()))?;
    if readonly {
        remount_readonly(dst)?;
    }
    Ok(())
}

/// Bind `src` on `dst` without the mounts below `src`, read-only if asked
/// (the sandbox handles each mount below on its own).
pub fn bind_one(src: &Path, dst: &Path, readonly: bool) -> Result<()> {
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .with_context(|| format!("binding {} on {}", src.display(), dst.display()))?;
    if readonly {
        remount_readonly(dst)?;
    }
    Ok(())
}

/// Make an existing bind mount read-only.
pub fn remount_readonly(dst: &Path) -> Result<()> {
    mount(
        None::<&str>,
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .with_context(|| format!("making {} read-only", dst.display()))
}

/// Make every mount at or below `dir` read-only (a recursive bind keeps the
/// flags of the mounts it copies, so each one is remounted on its own).
pub fn readonly_tree(dir: &Path) -> Result<()> {
    let prefix = dir.display().to_string();
    let mut points: Vec<PathBuf> = crate::mountinfo::read()?
        .into_iter()
        .map(|m| m.point)
        .filter(|p| crate::mountinfo::within(&p.display().to_string(), &prefix))
        .collect();
    points.sort();
    points.dedup();
    for p in &points {
        remount_readonly(p)?;
    }
    Ok(())
}

/// Mount a tmpfs with `options` (like `size=1g,mode=0700`).
pub fn tmpfs(dst: &Path, options: &str) -> Result<()> {
    mount(
        Some("tmpfs"),
        dst,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options),
    )
    .with_context(|| format!("mounting a tmpfs on {}", dst.display()))
}

/// Bind the machine's system directories read-only into `root`, where the
/// root has a directory for them (a merged usr's symlinks need nothing).
/// Nothing is created in `root`: under an overlay that would be an effect.
pub fn bind_system_dirs(root: &Path) -> Result<()> {
    for d in SYSTEM_DIRS {
        let src = Path::new("/").join(d);
        let dst = root.join(d);
        let is_link = src
            .symlink_metadata()
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(true);
        let dst_is_dir = dst.symlink_metadata().map(|m| m.is_dir()).unwrap_or(false);
        if is_link || !src.is_dir() || !dst_is_dir {
            continue;
        }
        bind(&src, &dst, true)?;
    }
    Ok(())
}

/// Wait for `child` (the leader of its own process group) until `timeout`;
/// then, and also after a normal exit, kill whatever is left of its group.
/// `None` means it was killed at its timeout.
pub fn wait_or_kill_group(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let pgid = Pid::from_raw(child.id() as i32);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = killpg(pgid, Signal::SIGKILL);
    if status.is_none() {
        let _ = child.wait();
    }
    Ok(status)
}

/// Set a step's process up the same way for its dry-run and its real run: a
/// dry-run that a script could tell apart (by its environment, say) would
/// let it behave differently there. A clean environment, `/` as working
/// directory, no stdin, combined output to `out`, its own process group.
pub fn step_process<'a>(
    cmd: &'a mut std::process::Command,
    out: &std::fs::File,
) -> Result<&'a mut std::process::Command> {
    use std::os::unix::process::CommandExt as _;
    Ok(cmd
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out.try_clone()?)
        .process_group(0))
}
