//! Saying what happened, on lab hosts: a rollout that ends with a failed
//! host under its budget says so in its state line, its status, its list
//! row and its webhook; `rollout logs -f` on a rollout awaiting approval
//! says so and waits for its output. Needs root.

use std::io::BufRead as _;
use std::process::Child;
use std::time::Duration;

use wavegate_tests::Run;
use wavegate_tests::lab::{Lab, eventually};

const LONG: Duration = Duration::from_secs(90);

const PLAN: &str = "name: one-may-fail
targets:
  hosts: [s1, s2]
steps:
  - name: patch
    run: echo patching && echo patched > /srv/app/marker
    writes: [/srv/app]
waves:
  - size: 1
  - size: 100%
health:
  checks:
    - {name: not-broken, exec: \"test ! -e /srv/app/broken\"}
  bake: 100ms
  interval: 50ms
failure_budget:
  canary: 0
  wave: 1
";

fn finished(mut child: Child, what: &str) -> Run {
    eventually(LONG, &format!("{what} to end"), || child.try_wait().ok().flatten());
    child.wait_with_output().expect("output").into()
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_rollout_that_completes_with_a_failed_host_says_so_everywhere() {
    let (port, bodies) = wavegate_tests::webhook_receiver();
    let secret = std::env::temp_dir().join(format!("wavegate-outcome-secret-{}", std::process::id()));
    std::fs::write(&secret, "a-shared-secret-for-the-outcome-test").expect("secret");
    let url = format!("http://127.0.0.1:{port}/hook");
    let lab = Lab::up_extra(
        "outcome",
        "lab-fleet.yaml",
        &[
            "--webhook",
            &url,
            "--webhook-secret-file",
            secret.to_str().expect("utf-8"),
        ],
    );
    // s2's health check fails once it is patched; its wave tolerates one.
    lab.seed("s2", "/srv/app/broken", "yes\n");
    lab.seed("s1", "/srv/app/.keep", "");
    let plan = lab.write_plan("one-may-fail", PLAN);
    let id = lab.submit_path(&plan);

    // Followed before approval: it says it waits, and does.
    let mut follow = lab.spawn_as("auditor", &["rollout", "logs", &id, "-f"]);
    let stderr = follow.stderr.take().expect("stderr");
    let (tx, said) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = said.recv_timeout(LONG).expect("logs -f says something before approval");
    assert!(
        first.contains("is awaiting approval (0/1 approvals) and has not started; waiting"),
        "{first}"
    );
    assert!(
        follow.try_wait().expect("try_wait").is_none(),
        "logs -f ended before the rollout started"
    );
    lab.approve(&id);
    let status = lab.wait_state(&id, "completed", LONG);
    let run = finished(follow, "rollout logs -f");
    assert_eq!(run.status, 0, "{}", run.stderr);
    for h in ["s1", "s2"] {
        assert!(
            run.stdout.contains(&format!("{h} | patching")),
            "the follow shows {h}'s step, which ran after it started waiting:\n{}",
            run.stdout
        );
    }

    // The state line, the status (JSON and text), the list and the audit
    // trail name the failed host.
    assert_eq!(status["failed_hosts"], serde_json::json!(["s2"]), "{status:#}");
    assert_eq!(status["summary"], "completed with 1 failed host: s2");
    let text = lab.wavegate_as("auditor", &["rollout", "status", &id]);
    assert!(
        text.stdout
            .lines()
            .next()
            .unwrap_or("")
            .ends_with("state COMPLETED with 1 failed host: s2"),
        "{}",
        text.stdout
    );
    let list = lab.wavegate_as("auditor", &["rollout", "list"]);
    assert!(list.stdout.contains("completed (1 failed)"), "{}", list.stdout);
    let events = status["events"].to_string();
    assert!(
        events.contains("every wave confirmed within its failure budget; rollout completed with 1 failed host: s2"),
        "{events}"
    );

    // The webhook: never a bare "completed".
    let deadline = std::time::Instant::now() + LONG;
    let completed = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let body = bodies.recv_timeout(left).expect("the completion's webhook");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json body");
        if v["event"] == "completed" {
            break v;
        }
    };
    assert_eq!(completed["failed_hosts"], serde_json::json!(["s2"]), "{completed:#}");
    assert_eq!(completed["summary"], "completed with 1 failed host: s2");
    lab.audit_verifies();
}
