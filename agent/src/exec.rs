//! Starting the step supervisor and waiting for it; answering a command the
//! journal already knows.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use wavegate_proto::v1::Outcome;

use crate::journal::{self, Job, Journal, Known, Stored};

/// Whether the supervisor recorded in `job_dir` is still running.
fn supervisor_alive(job_dir: &Path) -> bool {
    let Ok(pid) = std::fs::read_to_string(job_dir.join("pid")) else {
        return false;
    };
    let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", pid.trim())) else {
        return false;
    };
    String::from_utf8_lossy(&cmdline).contains("exec-step")
}

async fn spawn_and_wait(exe: &Path, job_dir: &Path) -> Result<Stored> {
    let mut child = tokio::process::Command::new(exe)
        .arg("exec-step")
        .arg(job_dir)
        // Its own process group: a signal to the agent does not reach it, so
        // the step ends and is journaled even if the agent is killed.
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .context("starting the step supervisor")?;
    if let Some(pid) = child.id() {
        journal::write_durably(&job_dir.join("pid"), pid.to_string().as_bytes())?;
    }
    let _ = child.wait().await;
    Ok(journal::result(job_dir).unwrap_or_else(|| interrupted("the step supervisor ended without a result")))
}

fn interrupted(why: &str) -> Stored {
    Stored {
        outcome: Outcome::Interrupted as i32,
        exit_code: -1,
        duration_ms: 0,
        output_sha256: String::new(),
        output_tail: Vec::new(),
        detail: why.to_owned(),
        report: String::new(),
        boot_id: String::new(),
    }
}

/// Run a job through the supervisor in a scratch directory (health checks:
/// not journaled, always run afresh).
pub async fn run_supervised(exe: &Path, scratch: &Path, job: &Job) -> Result<Stored> {
    run_supervised_tailed(exe, scratch, job, None).await
}

/// [`run_supervised`], its output sent live through `tail` when given.
pub async fn run_supervised_tailed(
    exe: &Path,
    scratch: &Path,
    job: &Job,
    tail: Option<(
        crate::output::Stream,
        &tokio::sync::mpsc::Sender<wavegate_proto::v1::AgentMessage>,
    )>,
) -> Result<Stored> {
    let dir = scratch.join(format!("{}-{}", std::process::id(), rand::random::<u64>()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("job.json"), serde_json::to_vec(job)?)?;
    let r = match tail {
        Some((s, tx)) => crate::output::while_running(dir.join("output.log"), s, tx, spawn_and_wait(exe, &dir)).await,
        None => spawn_and_wait(exe, &dir).await,
    };
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// Run a step at most once: answer from the journal when it has been seen,
/// wait for a supervisor that outlived an agent restart, or accept and run.
/// The bool says whether the answer is a replay. `exe` is the agent binary
/// (its `exec-step` mode is the supervisor).
pub async fn run_step_once(exe: &Path, journal: &Journal, job: Job) -> Result<(Stored, bool)> {
    match journal.lookup(&job.command_id) {
        Known::Finished(stored) => Ok((stored, true)),
        Known::Accepted(dir) => {
            // Accepted before a restart: the supervisor may still be running.
            while supervisor_alive(&dir) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if let Some(stored) = journal::result(&dir) {
                return Ok((stored, true));
            }
            let stored = interrupted("the agent restarted and the step left no result; it was not run again");
            journal::finish(&dir, &stored)?;
            Ok((stored, true))
        }
        Known::New => {
            let dir = journal.accept(&job)?;
            Ok((spawn_and_wait(exe, &dir).await?, false))
        }
    }
}
