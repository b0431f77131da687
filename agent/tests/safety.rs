//! The agent's safety mechanisms on a real host root (needs root, for mount
//! and PID namespaces; CI runs as root): the dry-run sandbox sees what a
//! step would do and cannot change the host; a confined run cannot write
//! outside its write set; a snapshot restores the write set byte for byte.

use std::io::Read as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use wavegate_agent::exec::{run_step_once, run_supervised};
use wavegate_agent::journal::{Job, Journal, Mode};
use wavegate_agent::sandbox::{DryStep, StepReport};
use wavegate_agent::snapshot;
use wavegate_proto::v1::Outcome;

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wavegate-agent"))
}

/// A host root like a lab's: its own etc/home/var/tmp, the machine's system
/// directories (bound read-only by the runner).
fn host(name: &str) -> (PathBuf, PathBuf) {
    let base = std::env::temp_dir().join(format!("wavegate-safety-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let root = base.join("root");
    for d in [
        "etc/app",
        "home/alice/mail",
        "home/bob",
        "var/lib/app",
        "tmp",
        "run",
        "dev",
        "proc",
    ] {
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
    std::fs::write(root.join("etc/app/app.conf"), "setting = 1\n").expect("write");
    for (i, f) in [
        "home/alice/mail/1",
        "home/alice/mail/2",
        "home/alice/notes",
        "home/bob/site.html",
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(root.join(f), format!("customer data {i}\n")).expect("write");
    }
    let state = base.join("state");
    std::fs::create_dir_all(&state).expect("state");
    (root, state)
}

/// Every file under a directory with its bytes, mode and owner.
fn tree(root: &Path) -> Vec<(String, Vec<u8>, u32, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            let m = p.symlink_metadata().expect("meta");
            let rel = p.strip_prefix(root).expect("rel").display().to_string();
            if ["usr", "bin", "sbin", "lib", "lib64", "dev", "proc"].contains(&rel.as_str()) {
                continue;
            }
            if m.is_dir() {
                out.push((rel, Vec::new(), m.mode(), m.uid()));
                stack.push(p);
            } else {
                let bytes = if m.file_type().is_symlink() {
                    std::fs::read_link(&p).expect("link").display().to_string().into_bytes()
                } else if !m.is_file() {
                    b"(special file)".to_vec()
                } else {
                    std::fs::read(&p).expect("read")
                };
                out.push((rel, bytes, m.mode(), m.uid()));
            }
        }
    }
    out.sort();
    out
}

async fn dry_run(root: &Path, state: &Path, run: &str, writes: &[&str], max_deletions: u64) -> Vec<StepReport> {
    let mut job = Job::new("dry", "", 0, root, Mode::DryRun);
    job.steps = vec![DryStep {
        name: "step".into(),
        run: run.into(),
        writes: writes.iter().map(|w| (*w).to_owned()).collect(),
        max_deletions,
        timeout_ms: 20_000,
        allow_failure: None,
        ..DryStep::default()
    }];
    let scratch = state.join("scratch");
    std::fs::create_dir_all(&scratch).expect("scratch");
    let r = run_supervised(&exe(), &scratch, &job).await.expect("dry-run");
    assert!(!r.report.is_empty(), "no report: {}", r.detail);
    serde_json::from_str(&r.report).expect("report")
}

#[tokio::test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
async fn the_2012_delete_is_seen_counted_and_blocked_without_touching_anything() {
    let (root, state) = host("2012");
    let before = tree(&root);
    // The update program's target variable is empty: it deletes every home.
    let run = "TARGET=''; echo 'x = 2' > /etc/app/app.conf; rm -rf /home/$TARGET*";
    let reports = dry_run(&root, &state, run, &["/etc/app"], 0).await;
    let r = &reports[0];
    assert!(r.blocked, "{r:#?}");
    assert_eq!(r.outside_deleted.count, 4, "four customer files would go: {r:#?}");
    assert!(
        r.outside_deleted.sample.iter().any(|p| p.starts_with("/home/alice")),
        "{r:#?}"
    );
    assert!(r.modified.sample.contains(&"/etc/app/app.conf".to_string()), "{r:#?}");
    assert!(r.reasons.iter().any(|x| x.contains("outside the declared write set")));
    assert_eq!(tree(&root), before, "a dry-run changed the host");
}

#[tokio::test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
async fn a_cleanup_inside_its_write_set_and_budget_passes() {
    let (root, state) = host("cleanup");
    let reports = dry_run(&root, &state, "rm -f /home/alice/mail/*", &["/home/alice/mail"], 2).await;
    assert!(!reports[0].blocked, "{:#?}", reports[0]);
    assert_eq!(reports[0].deleted.count, 2);
    let reports = dry_run(&root, &state, "rm -f /home/alice/mail/*", &["/home/alice/mail"], 1).await;
    assert!(reports[0].blocked, "over budget: {:#?}", reports[0]);
    // rm -rf then mkdir: the directory comes back empty (an opaque directory
    // in the overlay); its old files still count as deleted.
    let reports = dry_run(&root, &state, "rm -rf /home/bob && mkdir /home/bob", &["/etc/app"], 0).await;
    assert!(
        reports[0].blocked && reports[0].outside_deleted.count == 1,
        "{:#?}",
        reports[0]
    );
}

#[tokio::test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
async fn a_dry_run_cannot_kill_host_processes_or_reach_sockets_or_servers() {
    let (root, state) = host("isolation");
    let mut victim = std::process::Command::new("sleep").arg("300").spawn().expect("victim");
    let sock_path = root.join("var/lib/app/app.sock");
    let unix = std::os::unix::net::UnixListener::bind(&sock_path).expect("unix listener");
    unix.set_nonblocking(true).expect("nonblocking");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp listener");
    tcp.set_nonblocking(true).expect("nonblocking");
    let port = tcp.local_addr().expect("addr").port();
    let before = tree(&root);
    let run = format!(
        "kill -9 {pid}; pkill -9 -x sleep; \
         python3 -c \"import socket; s=socket.socket(socket.AF_UNIX); s.connect('/var/lib/app/app.sock'); s.send(b'x')\"; \
         bash -c 'echo hello > /dev/tcp/127.0.0.1/{port}'; \
         rm -rf /home/alice",
        pid = victim.id()
    );
    let reports = dry_run(&root, &state, &run, &["/etc/app"], 0).await;
    assert!(reports[0].blocked, "{:#?}", reports[0]);
    assert!(
        victim.try_wait().expect("wait").is_none(),
        "a dry-run killed a host process"
    );
    assert!(unix.accept().is_err(), "a dry-run reached a host unix socket");
    assert!(tcp.accept().is_err(), "a dry-run reached a local TCP server");
    assert_eq!(tree(&root), before, "a dry-run changed the host's files");
    victim.kill().expect("kill");
    let _ = victim.wait();
}

#[tokio::test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
async fn a_confined_run_cannot_write_outside_its_write_set() {
    let (root, state) = host("confined");
    let journal = Journal::open(&state).expect("journal");
    let mut job = Job::new(
        "c1",
        "echo 'x = 2' > /etc/app/app.conf; rm -rf /home/alice",
        20_000,
        &root,
        Mode::Confined,
    );
    job.writes = vec!["/etc/app".into()];
    let (r, _) = run_step_once(&exe(), &journal, job).await.expect("run");
    assert_eq!(r.outcome, Outcome::Failed as i32, "rm outside the write set must fail");
    assert!(
        String::from_utf8_lossy(&r.output_tail).contains("Read-only file system"),
        "{}",
        String::from_utf8_lossy(&r.output_tail)
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/app/app.conf")).expect("conf"),
        "x = 2\n",
        "the write set is writable"
    );
    assert!(
        root.join("home/alice/notes").exists(),
        "customer data outside the write set survived"
    );
    // A write-set path the dry-run saw created is made before it is bound.
    let mut job = Job::new("c2", "echo hi >> /etc/marker", 20_000, &root, Mode::Confined);
    job.writes = vec!["/etc/marker".into()];
    job.create_files = vec!["/etc/marker".into()];
    let (r, _) = run_step_once(&exe(), &journal, job).await.expect("run");
    assert_eq!(r.outcome, Outcome::Ok as i32, "{}", r.detail);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/marker")).expect("marker"),
        "hi\n"
    );
}

fn take(state: &Path, root: &Path, writes: &[String]) -> anyhow::Result<snapshot::Manifest> {
    snapshot::take(&snapshot::Request {
        state_dir: state,
        host: "p1",
        root,
        rollout: "r0001",
        writes,
        untouchable: &[],
        force: None,
    })
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_snapshot_restores_the_write_set_byte_for_byte() {
    let (root, state) = host("snapshot");
    let mail = root.join("home/alice/mail");
    std::fs::set_permissions(mail.join("1"), std::fs::Permissions::from_mode(0o640)).expect("chmod");
    std::os::unix::fs::chown(mail.join("2"), Some(1234), Some(5678)).expect("chown");
    std::os::unix::fs::symlink("1", mail.join("latest")).expect("symlink");
    let writes = vec!["/home/alice".to_string(), "/etc/new-dir".to_string()];
    let before = tree(&root);
    let m = take(&state, &root, &writes).expect("take");
    assert_eq!(
        m.roots.get("/etc/new-dir"),
        Some(&false),
        "an absent path is recorded as absent"
    );
    // The step: changes, deletes, creates, and makes a directory that did not exist.
    std::fs::write(mail.join("1"), "overwritten").expect("write");
    std::fs::remove_file(mail.join("2")).expect("rm");
    std::fs::write(root.join("home/alice/created-by-step"), "new").expect("create");
    std::fs::create_dir_all(root.join("etc/new-dir/sub")).expect("mkdir");
    assert!(
        snapshot::restore(&state, "p2", &root, "r0001").is_err(),
        "a snapshot from another host is refused"
    );
    snapshot::restore(&state, "p1", &root, "r0001").expect("restore");
    assert_eq!(tree(&root), before, "the restore is not exact");
    // Taking it again keeps the first snapshot (the state before the first step).
    std::fs::write(mail.join("1"), "changed again").expect("write");
    take(&state, &root, &writes).expect("take again");
    snapshot::restore(&state, "p1", &root, "r0001").expect("restore");
    let mut f = std::fs::File::open(mail.join("1")).expect("open");
    let mut s = String::new();
    f.read_to_string(&mut s).expect("read");
    assert_eq!(s, "customer data 0\n");
}

#[tokio::test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
async fn a_step_cannot_tell_its_dry_run_from_its_real_run_by_its_environment() {
    let (root, state) = host("env");
    let scratch = state.join("scratch");
    std::fs::create_dir_all(&scratch).expect("scratch");
    let mut dry = Job::new("env-dry", "", 0, &root, Mode::DryRun);
    dry.steps = vec![DryStep {
        name: "env".into(),
        run: "env | sort; pwd".into(),
        writes: vec!["/etc/app".into()],
        max_deletions: 0,
        timeout_ms: 20_000,
        allow_failure: None,
        ..DryStep::default()
    }];
    let seen_dry = run_supervised(&exe(), &scratch, &dry).await.expect("dry-run");
    let journal = Journal::open(&state).expect("journal");
    let mut real = Job::new("env-real", "env | sort; pwd", 20_000, &root, Mode::Confined);
    real.writes = vec!["/etc/app".into()];
    let (seen_real, _) = run_step_once(&exe(), &journal, real).await.expect("real run");
    assert!(!seen_real.output_tail.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&seen_dry.output_tail),
        String::from_utf8_lossy(&seen_real.output_tail),
        "the dry-run's environment differs from the real run's"
    );
}
