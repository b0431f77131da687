//! The agent runs a step at most once: a repeated command is answered from
//! its journal; a step that outlived an agent restart is waited for; one that
//! left nothing behind is reported as interrupted, never run again. Timeouts
//! kill the step's whole process group.

use std::path::{Path, PathBuf};

use wavegate_agent::exec::run_step_once;
use wavegate_agent::journal::{Job, Journal, Mode};
use wavegate_proto::v1::Outcome;

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wavegate-agent"))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wavegate-agent-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch");
    d
}

fn job(id: &str, run: String, timeout_ms: u64) -> Job {
    Job::new(id, &run, timeout_ms, Path::new("/"), Mode::Plain)
}

fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p).map(|s| s.lines().count()).unwrap_or(0)
}

#[tokio::test]
async fn a_repeated_command_is_answered_from_the_journal() {
    let dir = scratch("repeat");
    let journal = Journal::open(&dir).expect("journal");
    let marker = dir.join("marker");
    let j = job("r1:0:h:step0", format!("echo ran >> {}", marker.display()), 10_000);
    let (first, replayed) = run_step_once(&exe(), &journal, j.clone()).await.expect("first");
    assert_eq!((first.outcome, replayed), (Outcome::Ok as i32, false));
    let (second, replayed) = run_step_once(&exe(), &journal, j).await.expect("second");
    assert!(replayed, "the second answer comes from the journal");
    assert_eq!(second.output_sha256, first.output_sha256);
    assert_eq!(lines(&marker), 1, "the step ran exactly once");
}

#[tokio::test]
async fn an_accepted_step_without_a_result_is_interrupted_not_rerun() {
    let dir = scratch("interrupted");
    let journal = Journal::open(&dir).expect("journal");
    let marker = dir.join("marker");
    let j = job("r1:0:h:step1", format!("echo ran >> {}", marker.display()), 10_000);
    // Accepted, then the agent and its supervisor vanished before it ran.
    journal.accept(&j).expect("accept");
    let (r, replayed) = run_step_once(&exe(), &journal, j).await.expect("answer");
    assert!(replayed);
    assert_eq!(r.outcome, Outcome::Interrupted as i32);
    assert_eq!(lines(&marker), 0, "an unaccounted step is never run again");
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let dir = scratch("timeout");
    let journal = Journal::open(&dir).expect("journal");
    let marker = dir.join("late");
    // The background child would write the marker after the timeout.
    let run = format!("(sleep 2; echo late > {}) & sleep 30", marker.display());
    let started = std::time::Instant::now();
    let (r, _) = run_step_once(&exe(), &journal, job("r1:0:h:step2", run, 300))
        .await
        .expect("answer");
    assert_eq!(r.outcome, Outcome::TimedOut as i32, "{}", r.detail);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    // Wait past the moment the background child would have written.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        assert!(!marker.exists(), "a process of the step's group survived its timeout");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[tokio::test]
async fn a_failing_step_reports_its_exit_code_and_output() {
    let dir = scratch("fail");
    let journal = Journal::open(&dir).expect("journal");
    let (r, _) = run_step_once(
        &exe(),
        &journal,
        job("r1:0:h:step3", "echo oops; exit 7".into(), 10_000),
    )
    .await
    .expect("answer");
    assert_eq!((r.outcome, r.exit_code), (Outcome::Failed as i32, 7));
    assert_eq!(String::from_utf8_lossy(&r.output_tail), "oops\n");
}
