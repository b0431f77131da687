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

async fn spawn_and_wait(exe: &Path, job_dir: &Path, durable: bool) -> Result<Stored> {
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
        if durable {
            journal::write_durably(&job_dir.join("pid"), pid.to_string().as_bytes())?;
        } else {
            std::fs::write(job_dir.join("pid"), pid.to_string())?;
        }
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

fn refused(why: &str) -> Stored {
    Stored {
        outcome: Outcome::Refused as i32,
        ..interrupted(why)
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
    std::fs::write(dir.join(journal::SCRATCH_MARK), b"")?;
    let r = match tail {
        Some((s, tx)) => {
            crate::output::while_running(dir.join("output.log"), s, tx, spawn_and_wait(exe, &dir, false)).await
        }
        None => spawn_and_wait(exe, &dir, false).await,
    };
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// Run a step at most once: answer from the journal when it has been seen,
/// wait for a supervisor that outlived an agent restart, or accept and run.
/// The bool says whether the answer is a replay. `exe` is the agent binary
/// (its `exec-step` mode is the supervisor).
pub async fn run_step_once(exe: &Path, journal: &Journal, job: Job) -> Result<(Stored, bool)> {
    // The same id must be the same command: an id reused with other
    // content (a controller store put back from a backup counts its ids
    // again) is refused, not answered with another command's result.
    let before = match journal.accepted_job(&job.command_id) {
        Ok(b) => b,
        Err(e) => {
            return Ok((
                refused(&format!(
                    "command {} is in the journal but its entry cannot be read ({e:#}); not run, not replayed",
                    job.command_id
                )),
                false,
            ));
        }
    };
    if let Some(before) = before
        && before.content_digest() != job.content_digest()
    {
        tracing::warn!(command = %job.command_id, "A command id came again with other content; refused.");
        return Ok((
            refused(&format!(
                "command id {} was used before for another command (accepted at {} ms since the epoch); \
                 refused: neither run nor answered from the journal",
                job.command_id, before.accepted_ms
            )),
            false,
        ));
    }
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
            Ok((spawn_and_wait(exe, &dir, true).await?, false))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, run: &str, root: &Path) -> Job {
        Job::new(id, run, 1_000, root, journal::Mode::Confined)
    }

    /// A finished step is answered from the journal when its id and its
    /// content come again, and refused when only the id does.
    #[tokio::test]
    async fn an_id_seen_again_with_other_content_is_refused_not_replayed() {
        let dir = std::env::temp_dir().join(format!("wg-journal-{}-{}", std::process::id(), rand::random::<u32>()));
        let journal = Journal::open(&dir).expect("journal");
        let first = job("r0001-aaaaaa:0:h1:step0:x", "echo one", &dir);
        let at = journal.accept(&first).expect("accept");
        let ok = Stored {
            outcome: Outcome::Ok as i32,
            exit_code: 0,
            ..interrupted("done")
        };
        journal::finish(&at, &ok).expect("finish");
        // The supervisor is never started: both answers come before it.
        let exe = Path::new("/nonexistent/wavegate-agent");

        let (same, replayed) = run_step_once(exe, &journal, first.clone()).await.expect("answer");
        assert!(replayed);
        assert_eq!(same.outcome, Outcome::Ok as i32);

        let mut other = job("r0001-aaaaaa:0:h1:step0:x", "rm -rf /home/*", &dir);
        other.from = "https://elsewhere".into();
        let (answer, replayed) = run_step_once(exe, &journal, other).await.expect("answer");
        assert!(!replayed);
        assert_eq!(answer.outcome, Outcome::Refused as i32, "{}", answer.detail);
        assert!(
            answer.detail.contains("used before for another command"),
            "{}",
            answer.detail
        );

        // What the agent adds itself (the controller's address, the boot)
        // does not make it another command.
        let mut resent = first.clone();
        resent.from = "https://standby".into();
        resent.boot_id = "another-boot".into();
        let (again, replayed) = run_step_once(exe, &journal, resent).await.expect("answer");
        assert!(replayed);
        assert_eq!(again.outcome, Outcome::Ok as i32);

        // An entry that cannot be read: refused, not guessed.
        std::fs::write(at.join("job.json"), b"{not json").expect("damage");
        let (broken, _) = run_step_once(exe, &journal, first).await.expect("answer");
        assert_eq!(broken.outcome, Outcome::Refused as i32, "{}", broken.detail);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
