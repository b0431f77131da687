//! The step supervisor: `wavegate-agent exec-step JOB_DIR`.
//!
//! A separate, detached process per step, so that a step outlives an agent
//! crash and its outcome is still recorded. It enters its own mount
//! namespace, binds the machine's system directories read-only into the host
//! root, and runs `/bin/sh -c` there (through the system's `chroot`, so no
//! unsafe code is needed), in its own process group, killed whole at its
//! timeout. The result goes to the journal atomically.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::unistd::geteuid;
use sha2::{Digest, Sha256};
use wavegate_proto::v1::Outcome;

use crate::journal::{self, Job, Mode, Stored};
use crate::mounts;

/// How much output the result carries.
pub const TAIL: u64 = 16 * 1024;

/// Enter a private mount namespace and prepare `root` (when it is not `/`).
fn prepare(root: &Path) -> Result<()> {
    if root == Path::new("/") {
        // Without root there is no namespace to enter, and none is needed.
        return if geteuid().is_root() {
            mounts::private_namespace("a step")
        } else {
            Ok(())
        };
    }
    mounts::private_namespace("running steps under a host root")?;
    mounts::bind_system_dirs(root)?;
    for (d, ro) in [("dev", false), ("proc", true)] {
        let dst = root.join(d);
        std::fs::create_dir_all(&dst)?;
        mounts::bind(&Path::new("/").join(d), &dst, ro)?;
    }
    Ok(())
}

fn stored(
    outcome: Outcome,
    exit_code: i32,
    started: Instant,
    output: &Path,
    detail: String,
    redact: &[String],
) -> Stored {
    let (sha, tail) = digest(output, redact);
    Stored {
        outcome: outcome as i32,
        exit_code,
        duration_ms: started.elapsed().as_millis() as u64,
        output_sha256: sha,
        output_tail: tail,
        detail,
        report: String::new(),
        boot_id: String::new(),
    }
}

/// Snapshot directories the btrfs backend keeps beside the data (see
/// `snapshot::btrfs`); a confined step never writes them.
pub const BTRFS_SNAPSHOT_DIR: &str = ".wavegate-snapshots";

/// Paths under the write set that stay read-only anyway: untouchable ones,
/// the agent's own files, and btrfs snapshot directories.
fn protected(job: &Job, mounts: &[crate::mountinfo::HostMount]) -> Vec<String> {
    let inside = |p: &str| job.writes.iter().any(|w| crate::mountinfo::within(p, w));
    let mut out: Vec<String> = job
        .untouchable
        .iter()
        .chain(&job.protect)
        .filter(|p| inside(p))
        .cloned()
        .collect();
    let mut tops: Vec<String> = job.writes.clone();
    tops.extend(
        mounts
            .iter()
            .filter(|m| m.rel != "/" && inside(&m.rel))
            .map(|m| m.rel.clone()),
    );
    for t in tops {
        let p = format!("{}/{BTRFS_SNAPSHOT_DIR}", t.trim_end_matches('/'));
        if job.host_root.join(p.trim_start_matches('/')).is_dir() {
            out.push(p);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Confine a real run: a read-only view of the host root, every mount in it
/// included, with only the write set bound writable (whichever filesystem
/// each path lives on), and a private /tmp. A step with a missing target
/// line fails with "read-only file system" instead of deleting data. A write
/// set that is reached through a symlink, that holds the same files as a
/// path outside it (a bind mount), or that reaches a mount the dry-run could
/// not overlay is refused before anything runs.
fn confine(job: &Job, base: &Path) -> Result<PathBuf> {
    let root = &job.host_root;
    mounts::private_namespace("a confined run")?;
    let table = crate::mountinfo::read()?;
    let host = crate::mountinfo::host_mounts(&table, root, &job.untouchable, &[base]);
    let problems = crate::sandbox::write_set_problems(root, &host, &job.writes);
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("; "));
    }
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
    mounts::bind(root, &m, false)?;
    // Every mount under the view read-only, not just the top one.
    mounts::readonly_tree(&m)?;
    if root != Path::new("/") {
        mounts::bind_system_dirs(&m)?;
    }
    // /dev and /proc are the jail's own (a minimal /dev, a fresh /proc of
    // its PID namespace): the machine's are never seen.
    let tmp = m.join("tmp");
    if tmp.is_dir() {
        mounts::tmpfs(&tmp, "size=512m,mode=1777").context("a private /tmp")?;
    }
    for w in &job.writes {
        let src = root.join(w.trim_start_matches('/'));
        if src.symlink_metadata().is_ok() {
            mounts::bind(&src, &m.join(w.trim_start_matches('/')), false)?;
        }
    }
    for p in protected(job, &host) {
        let at = m.join(p.trim_start_matches('/'));
        if at.symlink_metadata().is_ok() {
            mounts::bind(&at, &at, false)?;
            mounts::readonly_tree(&at)?;
        }
    }
    // No socket of the host answers: not the service manager's, not
    // D-Bus's (a raw client there could start any unit, outside the write
    // set), not a database's. Abstract sockets are Landlock's to scope.
    crate::sandbox::mask_sockets(root, &m, job.check)?;
    Ok(m)
}

/// SHA-256 and the last [`TAIL`] bytes of a command's output as it leaves
/// the host: every line masked with the built-in and the site's `redact`
/// patterns (the same masking the live output gets, so the controller's
/// stored copy hashes the same). The journal keeps the output as it was.
pub fn digest(path: &Path, redact: &[String]) -> (String, Vec<u8>) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return (hex::encode(Sha256::digest(b"")), Vec::new());
    };
    // Patterns were checked when the command came; an empty set masks with
    // the built-in ones only.
    let r = wavegate_domain::redact::Redactor::lazy(redact);
    let mut stream = wavegate_domain::redact::Stream::new(r);
    let mut hasher = Sha256::new();
    let mut tail: std::collections::VecDeque<u8> = std::collections::VecDeque::new();
    let mut take = |bytes: Vec<u8>, hasher: &mut Sha256| {
        hasher.update(&bytes);
        tail.extend(bytes);
        let over = tail.len().saturating_sub(TAIL as usize);
        tail.drain(..over);
    };
    let mut buf = [0u8; 64 * 1024];
    while let Ok(n) = f.read(&mut buf) {
        if n == 0 {
            break;
        }
        take(stream.push(&buf[..n]), &mut hasher);
    }
    take(stream.finish(), &mut hasher);
    (hex::encode(hasher.finalize()), tail.into_iter().collect())
}

/// Run one job to its end and journal the result. Returns the result.
pub fn exec(job_dir: &Path) -> Result<Stored> {
    let job: Job = serde_json::from_slice(&std::fs::read(job_dir.join("job.json"))?)?;
    let output = job_dir.join("output.log");
    let started = Instant::now();
    let site = crate::jail::Site {
        redact: job.redact.clone(),
        accept_weaker: job.accept_weaker.clone(),
        hide: job.hide.iter().map(PathBuf::from).collect(),
    };
    let result = match job.mode {
        Mode::DryRun => match crate::sandbox::dry_run(
            &job.host_root,
            &job_dir.join("sandbox"),
            &job.steps,
            &job.untouchable,
            &output,
            &job.stages,
            &site,
        ) {
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
                let mut s = stored(outcome, code, started, &output, detail, &job.redact);
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
                &job.redact,
            ),
        },
        Mode::FetchStaged => {
            let out = job.stage_out.clone().unwrap_or_else(|| job_dir.join("stage"));
            match crate::sandbox::fetch_staged(
                &job.host_root,
                &job_dir.join("sandbox"),
                &job.run,
                &job.writes,
                Duration::from_millis(job.timeout_ms.max(1)),
                &output,
                &out,
                &site,
            ) {
                Ok(ran) if ran.timed_out => stored(
                    Outcome::TimedOut,
                    -1,
                    started,
                    &output,
                    format!("killed after its timeout of {} ms", job.timeout_ms),
                    &job.redact,
                ),
                Ok(ran) if ran.exit_code == 0 => stored(Outcome::Ok, 0, started, &output, String::new(), &job.redact),
                Ok(ran) => stored(
                    Outcome::Failed,
                    ran.exit_code,
                    started,
                    &output,
                    format!("exited with status {}", ran.exit_code),
                    &job.redact,
                ),
                Err(e) => stored(
                    Outcome::Refused,
                    -1,
                    started,
                    &output,
                    format!("the fetch was not run: {e:#}"),
                    &job.redact,
                ),
            }
        }
        _ => match run(&job, job_dir, &output) {
            Ok((outcome, code, detail)) => stored(outcome, code, started, &output, detail, &job.redact),
            Err(e) => stored(
                Outcome::Refused,
                -1,
                started,
                &output,
                format!("the step was not run: {e:#}"),
                &job.redact,
            ),
        },
    };
    let result = Stored {
        boot_id: job.boot_id.clone(),
        ..result
    };
    journal::finish(job_dir, &result)?;
    Ok(result)
}

fn run(job: &Job, job_dir: &Path, output: &PathBuf) -> Result<(Outcome, i32, String)> {
    let root = match job.mode {
        Mode::Confined => {
            let view = confine(job, &job_dir.join("confined"))?;
            // invoke-rc.d and deb-systemd-invoke note what they are asked;
            // the agent does it after the step (see `services`).
            crate::services::install(&view, &job.host_root, &crate::services::work_dir(job_dir))?;
            view
        }
        _ => {
            prepare(&job.host_root)?;
            job.host_root.clone()
        }
    };
    // The services a package step's scripts may have restarted, read from
    // the package database before the step can change it.
    let units = match (&job.mode, &job.packages) {
        (Mode::Confined, Some(p)) => Some(crate::packages::services(&job.host_root, p)),
        _ => None,
    };
    let out = std::fs::File::create(output)?;
    let mut cmd = if job.mode == Mode::Confined {
        // The jail: pivoted into the confined view, Landlock allowing
        // writes only beneath the write set and the private /tmp.
        let spec_file = job_dir.join("jail.json");
        let spec = crate::jail::Spec {
            root: root.clone(),
            run: job.run.clone(),
            writable: Some(job.writes.clone()),
            accept_weaker: job.accept_weaker.clone(),
            hide: job.hide.iter().map(PathBuf::from).collect(),
        };
        std::fs::write(&spec_file, serde_json::to_vec(&spec)?)?;
        let exe = std::env::current_exe().context("finding the agent's own binary")?;
        // A step runs without the network, as its dry-run did: it reaches
        // no service (a database over TCP, an abstract socket) whose
        // effects no dry-run sees; what it needs from outside is its
        // fetch's. A fetch and a health check keep the host's network.
        crate::jail::command(&exe, &spec_file, !job.network)
    } else if root == Path::new("/") {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(&job.run);
        c
    } else {
        let mut c = Command::new("/usr/sbin/chroot");
        c.arg(&root).arg("/bin/sh").arg("-c").arg(&job.run);
        c
    };
    let mut child = mounts::step_process(&mut cmd, &out)?
        .spawn()
        .context("starting /bin/sh")?;
    // Whatever the shell leaves behind in its group goes too.
    let status = mounts::wait_or_kill_group(&mut child, Duration::from_millis(job.timeout_ms))?;
    if let Some(code) = status.and_then(|s| s.code())
        && let Some(why) = crate::jail::setup_failed(code, &job_dir.join("jail.json"))
    {
        anyhow::bail!("the sandbox could not be set up: {why}");
    }
    match status {
        Some(s) => {
            let code = s.code().unwrap_or(-1);
            if s.success() {
                if job.mode != Mode::Confined {
                    return Ok((Outcome::Ok, 0, String::new()));
                }
                let asked = crate::services::requests(&root);
                let done = match &units {
                    Some(units) => {
                        let touched = crate::services::touched_file(job_dir);
                        crate::services::perform(&job.host_root, &asked, units, output, &touched)
                    }
                    None => match asked
                        .iter()
                        .find_map(|r| crate::services::refusal(r, &Default::default(), false))
                    {
                        Some(why) => Err(anyhow::anyhow!(why)),
                        None => Ok(()),
                    },
                };
                match done {
                    Ok(()) => Ok((Outcome::Ok, 0, String::new())),
                    Err(e) => Ok((Outcome::Failed, 0, format!("the step ran, but {e:#}"))),
                }
            } else {
                Ok((Outcome::Failed, code, format!("exited with status {code}")))
            }
        }
        None => Ok((
            Outcome::TimedOut,
            -1,
            format!("killed after its timeout of {} ms", job.timeout_ms),
        )),
    }
}
