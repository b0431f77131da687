//! The sandbox's cost per step: a step that does nothing (`true`), dry-run
//! in the sandbox and run confined, on a host root laid out like a lab
//! host's, each through the step supervisor as the agent runs them. Prints
//! the median and the 90th percentile over the runs; run with
//! `bash scripts/bench sandbox` (needs root: namespaces). A step is dry-run
//! up to twice per host (at submit on the first wave, and right before its
//! real run), so this is what every host pays per step, on top of the
//! step itself.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wavegate_agent::exec::{run_step_once, run_supervised};
use wavegate_agent::journal::{Job, Journal, Mode};
use wavegate_agent::sandbox::DryStep;

fn host(base: &Path) -> PathBuf {
    let root = base.join("root");
    for d in ["etc/app", "srv/site", "home", "tmp", "run", "dev", "proc", "sys"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    for d in ["usr", "bin", "sbin", "lib", "lib64"] {
        let machine = Path::new("/").join(d);
        match std::fs::read_link(&machine) {
            Ok(t) => std::os::unix::fs::symlink(t, root.join(d)).expect("symlink"),
            Err(_) if machine.is_dir() => std::fs::create_dir_all(root.join(d)).expect("mkdir"),
            Err(_) => {}
        }
    }
    std::fs::write(root.join("etc/app/app.conf"), "x = 1\n").expect("write");
    root
}

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(v[v.len() / 2]), ms(v[(v.len() * 9 / 10).min(v.len() - 1)]))
}

fn main() {
    let runs: usize = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(30);
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_wavegate-agent"));
    let base = std::env::temp_dir().join(format!("wavegate-bench-sandbox-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let root = host(&base);
    let state = base.join("state");
    std::fs::create_dir_all(state.join("scratch")).expect("state");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (mut dry, mut confined) = (Vec::new(), Vec::new());
    rt.block_on(async {
        let journal = Journal::open(&state).expect("journal");
        for i in 0..runs {
            let mut job = Job::new(&format!("dry{i}"), "", 0, &root, Mode::DryRun);
            job.steps = vec![DryStep {
                name: "noop".into(),
                run: "true".into(),
                writes: vec!["/srv/site".into()],
                max_deletions: 0,
                timeout_ms: 20_000,
                allow_failure: None,
                ..DryStep::default()
            }];
            let t = Instant::now();
            let r = run_supervised(&exe, &state.join("scratch"), &job)
                .await
                .expect("dry-run");
            dry.push(t.elapsed());
            assert!(!r.report.is_empty(), "the dry-run failed: {}", r.detail);
            let mut job = Job::new(&format!("run{i}"), "true", 20_000, &root, Mode::Confined);
            job.writes = vec!["/srv/site".into()];
            let t = Instant::now();
            let (r, _) = run_step_once(&exe, &journal, job).await.expect("run");
            confined.push(t.elapsed());
            assert_eq!(r.exit_code, 0, "the confined run failed: {}", r.detail);
        }
    });
    let _ = std::fs::remove_dir_all(&base);
    let (d50, d90) = stats(dry);
    let (c50, c90) = stats(confined);
    println!("sandbox cost of a step that does nothing ({runs} runs each, through the step supervisor):");
    println!("  dry-run in the sandbox   median {d50:7.1} ms   p90 {d90:7.1} ms");
    println!("  confined real run        median {c50:7.1} ms   p90 {c90:7.1} ms");
}
