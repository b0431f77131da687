//! The agent's journal: every step it accepts is written down (and synced)
//! before it runs, and its result after; a command seen again is answered
//! from here instead of being run twice.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How the supervisor runs a job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The host root as it is (the agent's own use only).
    #[default]
    Plain,
    /// Confined: the host root read-only except `writes` and a private /tmp.
    Confined,
    /// The dry-run sandbox: nothing on the host changes.
    DryRun,
    /// A fetch before approval: over the sandbox's view, what it writes
    /// beneath `writes` kept in the staging tree `stage_out`.
    FetchStaged,
}

/// What the supervisor runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    /// The command's id.
    pub command_id: String,
    /// Command line for /bin/sh -c.
    pub run: String,
    /// Time limit.
    pub timeout_ms: u64,
    /// The host root the command sees as `/`.
    pub host_root: PathBuf,
    /// How it runs.
    #[serde(default)]
    pub mode: Mode,
    /// Weaker confinement a site policy accepts by name (`landlock`,
    /// `seccomp`) on a kernel that lacks it.
    #[serde(default)]
    pub accept_weaker: Vec<String>,
    /// Writable paths of a confined run.
    #[serde(default)]
    pub writes: Vec<String>,
    /// Write-set paths to create as directories before a confined run.
    #[serde(default)]
    pub create_dirs: Vec<String>,
    /// Write-set paths to create as empty files before a confined run.
    #[serde(default)]
    pub create_files: Vec<String>,
    /// Steps of a dry-run.
    #[serde(default)]
    pub steps: Vec<crate::sandbox::DryStep>,
    /// Host paths no step may change (the plan's and the site's
    /// `untouchable`): read-only in the dry-run and in the real run.
    #[serde(default)]
    pub untouchable: Vec<String>,
    /// The site's redact patterns: the output's digest and tail (and a
    /// dry-run's report) are of the masked output.
    #[serde(default)]
    pub redact: Vec<String>,
    /// Host paths no step may see (the agent's state directory, its key
    /// and certificate): covered in every jail.
    #[serde(default)]
    pub hide: Vec<String>,
    /// Staged fetches' trees laid over the host in a dry-run.
    #[serde(default)]
    pub stages: Vec<PathBuf>,
    /// Where a staged fetch keeps what it wrote.
    #[serde(default)]
    pub stage_out: Option<PathBuf>,
    /// Host paths of the agent's own that stay read-only in a confined run
    /// even inside a write set (its journal and snapshots).
    #[serde(default)]
    pub protect: Vec<String>,
    /// A package step: its packages, whose own services the agent restarts
    /// after the run when their maintainer scripts ask (see `services`).
    #[serde(default)]
    pub packages: Option<wavegate_domain::packages::Packages>,
    /// A health check: it may reach the host's unix sockets but the
    /// service manager's and D-Bus's (a database's, to ask whether it is
    /// up); a step reaches none.
    #[serde(default)]
    pub check: bool,
    /// Whether it keeps the host's network: a fetch and a health check do;
    /// a step runs in a network namespace of its own, as its dry-run did.
    #[serde(default)]
    pub network: bool,
    /// The boot it was accepted in.
    #[serde(default)]
    pub boot_id: String,
    /// The controller that sent it (its URL).
    #[serde(default)]
    pub from: String,
    /// When it was accepted, in milliseconds since the epoch.
    #[serde(default)]
    pub accepted_ms: u64,
}

impl Job {
    /// A job with the defaults for everything but what it runs.
    pub fn new(command_id: &str, run: &str, timeout_ms: u64, host_root: &Path, mode: Mode) -> Job {
        Job {
            command_id: command_id.to_owned(),
            run: run.to_owned(),
            timeout_ms,
            host_root: host_root.to_path_buf(),
            mode,
            accept_weaker: Vec::new(),
            writes: Vec::new(),
            create_dirs: Vec::new(),
            create_files: Vec::new(),
            steps: Vec::new(),
            untouchable: Vec::new(),
            redact: Vec::new(),
            hide: Vec::new(),
            stages: Vec::new(),
            stage_out: None,
            protect: Vec::new(),
            packages: None,
            check: false,
            network: false,
            boot_id: String::new(),
            from: String::new(),
            accepted_ms: 0,
        }
    }
}

impl Job {
    /// A digest of what the controller asked for: the command, its limits
    /// and what it may write. Not of what this agent adds (its hidden and
    /// protected paths, the boot, the controller's address, the time) nor
    /// of the site's settings each controller reads for itself (redact
    /// patterns, accepted weaker confinement), so the same command sent
    /// again by another controller matches. A
    /// command id seen again with another digest is not the same command:
    /// it is neither run nor answered from the journal.
    pub fn content_digest(&self) -> String {
        let what = serde_json::json!({
            "run": self.run,
            "timeout_ms": self.timeout_ms,
            "host_root": self.host_root,
            "mode": self.mode,
            "writes": self.writes,
            "create_dirs": self.create_dirs,
            "create_files": self.create_files,
            "steps": self.steps,
            "untouchable": self.untouchable,
        });
        hex::encode(Sha256::digest(what.to_string().as_bytes()))
    }
}

/// A finished command, as journaled (mirrors the wire result).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stored {
    /// wavegate.v1.Outcome as a number.
    pub outcome: i32,
    /// Exit code, -1 when none.
    pub exit_code: i32,
    /// Wall time.
    pub duration_ms: u64,
    /// SHA-256 of the whole output.
    pub output_sha256: String,
    /// Last part of the output.
    pub output_tail: Vec<u8>,
    /// For people.
    pub detail: String,
    /// Dry-run reports (JSON), when the job was a dry-run.
    #[serde(default)]
    pub report: String,
    /// The boot the command ran in.
    #[serde(default)]
    pub boot_id: String,
}

/// What the journal knows of a command.
pub enum Known {
    /// Never seen.
    New,
    /// Accepted (maybe still running, maybe interrupted).
    Accepted(PathBuf),
    /// Finished.
    Finished(Stored),
}

/// The journal directory.
#[derive(Clone, Debug)]
pub struct Journal {
    dir: PathBuf,
}

/// Write `bytes` to `path` atomically and durably: temp file, fsync, rename,
/// fsync of the directory.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("a journal file has a directory")?;
    let tmp = path.with_extension("tmp");
    {
        // The agent's files are root's alone (a manifest names customers'
        // files), whatever the umask of whoever started it.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

impl Journal {
    /// The journal under `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Journal> {
        let dir = state_dir.join("journal");
        crate::snapshot::private_dir(&dir).with_context(|| format!("creating the journal {}", dir.display()))?;
        Ok(Journal { dir })
    }

    /// The directory of one command: readable, and unique per id.
    pub fn job_dir(&self, id: &str) -> PathBuf {
        let readable: String = id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .take(80)
            .collect();
        let digest = hex::encode(&Sha256::digest(id.as_bytes())[..6]);
        self.dir.join(format!("{readable}-{digest}"))
    }

    /// What the journal knows of `id`.
    pub fn lookup(&self, id: &str) -> Known {
        let dir = self.job_dir(id);
        if let Ok(bytes) = std::fs::read(dir.join("result.json"))
            && let Ok(stored) = serde_json::from_slice(&bytes)
        {
            return Known::Finished(stored);
        }
        if dir.join("job.json").exists() {
            Known::Accepted(dir)
        } else {
            Known::New
        }
    }

    /// The job accepted under `id`, if any. An entry that is there but
    /// cannot be read is an error: the caller cannot tell what ran.
    pub fn accepted_job(&self, id: &str) -> Result<Option<Job>> {
        let path = self.job_dir(id).join("job.json");
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Record a job as accepted, durably, before it runs.
    pub fn accept(&self, job: &Job) -> Result<PathBuf> {
        let dir = self.job_dir(&job.command_id);
        std::fs::create_dir_all(&dir)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        let accepted_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let job = Job {
            accepted_ms,
            ..job.clone()
        };
        write_durably(&dir.join("job.json"), &serde_json::to_vec_pretty(&job)?)?;
        Ok(dir)
    }
}

/// The mark of a job run in a scratch directory (a dry-run, a health
/// check): never journaled, deleted once read, so nothing in it is synced.
pub const SCRATCH_MARK: &str = "scratch";

/// Record a job's result: durably for a journaled job, plainly for one in
/// a scratch directory (its four syncs were 8 of a host's 18).
pub fn finish(job_dir: &Path, stored: &Stored) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(stored)?;
    if job_dir.join(SCRATCH_MARK).exists() {
        std::fs::write(job_dir.join("result.json"), bytes)?;
        return Ok(());
    }
    write_durably(&job_dir.join("result.json"), &bytes)
}

/// Read a job's result, if it has one.
pub fn result(job_dir: &Path) -> Option<Stored> {
    serde_json::from_slice(&std::fs::read(job_dir.join("result.json")).ok()?).ok()
}
