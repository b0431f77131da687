//! The step supervisor: `wavegate-agent exec-step JOB_DIR`.
//!
//! A separate, detached process per step, so that a step outlives an agent
//! crash and its outcome is still recorded. It enters its own mount
//! namespace, binds the machine's system directories read-only into the host
//! root, and runs `/bin/sh -c` there (through the system's `chroot`, so no
//! unsafe code is needed), in its own process group, killed whole at its
//! timeout. The result goes to the journal atomically.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, geteuid};
use sha2::{Digest, Sha256};
use wavegate_proto::v1::Outcome;

use crate::journal::{self, Job, Mode, Stored};

/// Directories of the machine a host root sees read-only.
const SYSTEM_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// How much output the result carries.
pub const TAIL: u64 = 16 * 1024;

fn bind(src: &Path, dst: &Path, readonly: bool) -> Result<()> {
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("binding {} on {}", src.display(), dst.display()))?;
    if readonly {
        mount(
            None::<&str>,
            dst,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
            None::<&str>,
        )
        .with_context(|| format!("making {} read-only", dst.display()))?;
    }
    Ok(())
}

/// Enter a private mount namespace and prepare `root` (when it is not `/`).
fn prepare(root: &Path) -> Result<()> {
    let is_root = geteuid().is_root();
    if root == Path::new("/") {
        if is_root {
            unshare(CloneFlags::CLONE_NEWNS).context("entering a mount namespace")?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
        }
        return Ok(());
    }
    if !is_root {
        bail!("running steps under a host root needs root (mount namespaces); run the agent as root");
    }
    unshare(CloneFlags::CLONE_NEWNS).context("entering a mount namespace")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making mounts private")?;
    for d in SYSTEM_DIRS {
        let src = Path::new("/").join(d);
        let dst = root.join(d);
        let is_link = src
            .symlink_metadata()
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(true);
        if is_link || !src.is_dir() {
            continue;
        }
        std::fs::create_dir_all(&dst)?;
        bind(&src, &dst, true)?;
    }
    for (d, ro) in [("dev", false), ("proc", true)] {
        let dst = root.join(d);
        std::fs::create_dir_all(&dst)?;
        bind(&Path::new("/").join(d), &dst, ro)?;
    }
    Ok(())
}

fn stored(outcome: Outcome, exit_code: i32, started: Instant, output: &Path, detail: String) -> Stored {
    let (sha, tail) = digest(output);
    Stored {
        outcome: outcome as i32,
        exit_code,
        duration_ms: started.elapsed().as_millis() as u64,
        output_sha256: sha,
        output_tail: tail,
        detail,
        report: String::new(),
    }
}

/// Confine a real run: a read-only view of the host root with only the
/// write set bound writable, and a private /tmp. A step with a missing target
/// line fails with "read-only file system" instead of deleting data.
fn confine(job: &Job, base: &Path) -> Result<PathBuf> {
    let root = &job.host_root;
    if !geteuid().is_root() {
        bail!("a confined run needs root (mount namespaces); run the agent as root");
    }
    unshare(CloneFlags::CLONE_NEWNS).context("entering a mount namespace")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making mounts private")?;
    // Write-set paths the dry-run saw created must exist to be bound; only
    // the path itself is made, never a parent outside the write set.
    for (paths, dir) in [(&job.create_dirs, true), (&job.create_files, false)] {
        for p in paths {
            let full = root.join(p.trim_start_matches('/'));
            if full.symlink_metadata().is_err() && full.parent().is_some_and(Path::is_dir) {
                if dir {
                    std::fs::create_dir(&full)?;
                } else {
                    std::fs::File::create(&full)?;
                }
            }
        }
    }
    let m = base.join("root");
    std::fs::create_dir_all(&m)?;
    bind(root, &m, false)?;
    // Every mount under the view read-only, not just the top one.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = m.display().to_string();
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|p| *p == prefix || p.starts_with(&format!("{prefix}/")))
        .map(str::to_owned)
        .collect();
    points.sort();
    points.dedup();
    for p in &points {
        mount(
            None::<&str>,
            p.as_str(),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .with_context(|| format!("making {p} read-only"))?;
    }
    if root != Path::new("/") {
        for d in SYSTEM_DIRS {
            let src = Path::new("/").join(d);
            let dst = m.join(d);
            let is_link = src
                .symlink_metadata()
                .map(|x| x.file_type().is_symlink())
                .unwrap_or(true);
            if is_link || !src.is_dir() || !dst.is_dir() {
                continue;
            }
            bind(&src, &dst, true)?;
        }
    }
    for (d, ro) in [("dev", false), ("proc", true)] {
        let dst = m.join(d);
        if dst.is_dir() {
            bind(&Path::new("/").join(d), &dst, ro)?;
        }
    }
    let tmp = m.join("tmp");
    if tmp.is_dir() {
        mount(
            Some("tmpfs"),
            &tmp,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("size=512m,mode=1777"),
        )
        .context("a private /tmp")?;
    }
    for w in &job.writes {
        let src = root.join(w.trim_start_matches('/'));
        if src.symlink_metadata().is_ok() {
            bind(&src, &m.join(w.trim_start_matches('/')), false)?;
        }
    }
    Ok(m)
}

/// SHA-256 and the last [`TAIL`] bytes of a file.
pub fn digest(path: &Path) -> (String, Vec<u8>) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return (hex::encode(Sha256::digest(b"")), Vec::new());
    };
    let mut hasher = Sha256::new();
    let mut buf = [0u8; 64 * 1024];
    while let Ok(n) = f.read(&mut buf) {
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut tail = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(TAIL))).is_ok() {
        let _ = f.read_to_end(&mut tail);
    }
    (hex::encode(hasher.finalize()), tail)
}

/// Run one job to its end and journal the result. Returns the result.
pub fn exec(job_dir: &Path) -> Result<Stored> {
    let job: Job = serde_json::from_slice(&std::fs::read(job_dir.join("job.json"))?)?;
    let output = job_dir.join("output.log");
    let started = Instant::now();
    let result = match job.mode {
        Mode::DryRun => match crate::sandbox::dry_run(&job.host_root, &job_dir.join("sandbox"), &job.steps, &output) {
            Ok(reports) => {
                let blocked: Vec<String> = reports
                    .iter()
                    .filter(|r| r.blocked)
                    .map(|r| format!("{}: {}", r.step, r.reasons.join("; ")))
                    .collect();
                let (outcome, code, detail) = if blocked.is_empty() {
                    (Outcome::Ok, 0, String::new())
                } else {
                    (Outcome::Failed, 1, format!("dry-run blocked: {}", blocked.join(" | ")))
                };
                let mut s = stored(outcome, code, started, &output, detail);
                s.report = serde_json::to_string(&reports)?;
                s
            }
            // A sandbox that cannot be set up blocks; it never means "skip".
            Err(e) => stored(
                Outcome::Refused,
                -1,
                started,
                &output,
                format!("dry-run blocked: the sandbox could not be set up: {e:#}"),
            ),
        },
        _ => match run(&job, job_dir, &output) {
            Ok((outcome, code, detail)) => stored(outcome, code, started, &output, detail),
            Err(e) => stored(
                Outcome::Refused,
                -1,
                started,
                &output,
                format!("the step was not run: {e:#}"),
            ),
        },
    };
    journal::finish(job_dir, &result)?;
    Ok(result)
}

fn run(job: &Job, job_dir: &Path, output: &PathBuf) -> Result<(Outcome, i32, String)> {
    let root = match job.mode {
        Mode::Confined => confine(job, &job_dir.join("confined"))?,
        _ => {
            prepare(&job.host_root)?;
            job.host_root.clone()
        }
    };
    let out = std::fs::File::create(output)?;
    let err = out.try_clone()?;
    let mut cmd = if root == Path::new("/") {
        Command::new("/bin/sh")
    } else {
        let mut c = Command::new("chroot");
        c.arg(&root).arg("/bin/sh");
        c
    };
    let mut child = cmd
        .arg("-c")
        .arg(&job.run)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .context("starting /bin/sh")?;
    let pgid = Pid::from_raw(child.id() as i32);
    let deadline = Instant::now() + Duration::from_millis(job.timeout_ms);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Whatever the shell left behind in its group goes too.
    let _ = killpg(pgid, Signal::SIGKILL);
    match status {
        Some(s) => {
            let code = s.code().unwrap_or(-1);
            if s.success() {
                Ok((Outcome::Ok, 0, String::new()))
            } else {
                Ok((Outcome::Failed, code, format!("exited with status {code}")))
            }
        }
        None => {
            let _ = child.wait();
            Ok((
                Outcome::TimedOut,
                -1,
                format!("killed after its timeout of {} ms", job.timeout_ms),
            ))
        }
    }
}
