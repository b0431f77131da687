//! What an operator sees while a rollout runs: live output (`rollout logs
//! -f`), 100 MB of it stored whole, the `rollout watch` view under tmux and
//! piped, and webhook notifications to a local HTTP server, signed and
//! retried. Needs root and tmux (`scripts/test` installs it).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use wavegate_tests::lab::{Lab, eventually};

const LONG: Duration = Duration::from_secs(120);

fn one_host_plan(name: &str, run: &str, extra: &str) -> String {
    format!(
        "name: {name}
targets:
  hosts: [w1]
steps:
  - name: talk
    run: \"{run}\"
    writes: [/var/lib/talk]
    timeout: 5m
waves:
  - size: 1
health:
{extra}  bake: 100ms
  interval: 50ms
"
    )
}

fn seed(lab: &Lab) {
    for h in ["w1", "bk1", "s1"] {
        std::fs::create_dir_all(lab.host_path(h, "/var/lib/talk")).expect("mkdir");
    }
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn logs_follow_shows_each_line_while_the_step_still_runs() {
    let lab = Lab::up("logs-follow", "disks-fleet.yaml");
    seed(&lab);
    let plan = lab.write_plan(
        "slow",
        &one_host_plan("slow", "for i in 1 2 3 4 5; do echo line $i; sleep 1; done", ""),
    );
    let id = lab.submit_path(&plan);
    lab.approve(&id);
    let mut follower = lab.spawn_as("auditor", &["rollout", "logs", &id, "w1", "-f"]);
    let stdout = follower.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((line, Instant::now())).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let mut first_seen_running = false;
    while let Ok((line, _)) = rx.recv_timeout(LONG) {
        if line == "line 1" {
            // The step prints for five seconds; when its first line is here,
            // it must still be running.
            let (state, detail) = lab.host_state(&id, "w1");
            first_seen_running = state == "running" && detail.contains("running step `talk`");
            assert!(first_seen_running, "line 1 came after the step ended: {state} {detail}");
        }
        lines.push(line);
        if lines.iter().any(|l| l == "line 5") {
            break;
        }
    }
    assert!(first_seen_running, "the first line was seen: {lines:?}");
    let got: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|l| l.starts_with("line "))
        .collect();
    assert_eq!(got, ["line 1", "line 2", "line 3", "line 4", "line 5"]);
    lab.wait_state(&id, "completed", LONG);
    let status = follower.wait().expect("wait");
    assert!(status.success(), "logs -f ends when the step ends");
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_hundred_megabytes_of_output_are_stored_whole_and_checked_against_the_agents_hash() {
    let lab = Lab::up("logs-flood", "disks-fleet.yaml");
    seed(&lab);
    // 100,000,000 bytes of text in lines of 100.
    let plan = lab.write_plan(
        "flood",
        &one_host_plan(
            "flood",
            "head -c 99000000 /dev/zero | tr '\\\\0' x | fold -w 99; echo",
            "",
        ),
    );
    let id = lab.submit_path(&plan);
    lab.approve(&id);
    lab.wait_state(&id, "completed", LONG);
    let run = lab.wavegate_as(
        "auditor",
        &["rollout", "logs", &id, "w1", "--summary", "--output", "json"],
    );
    assert_eq!(run.status, 0, "{}", run.stderr);
    let summary = run.json();
    let talk = summary
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["step"] == "talk")
        .cloned()
        .expect("the step's summary");
    assert_eq!(talk["stored"], 100_000_000, "{summary:#}");
    assert_eq!(
        talk["verified"], "ok",
        "the stored output's SHA-256 is the agent's: {summary:#}"
    );
    // And what is stored reads back whole.
    let mut child = lab.spawn_as("auditor", &["rollout", "logs", &id, "w1", "--step", "talk"]);
    let mut out = child.stdout.take().expect("stdout");
    let mut hasher = <Sha256 as sha2::Digest>::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = out.read(&mut buf).expect("read");
        if k == 0 {
            break;
        }
        n += k as u64;
        sha2::Digest::update(&mut hasher, &buf[..k]);
    }
    assert!(child.wait().expect("wait").success());
    assert_eq!(n, 100_000_000, "every byte reads back");
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux (installed by scripts/test)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn watch_draws_waves_progress_and_the_halt_in_a_terminal_and_plain_lines_in_a_pipe() {
    let lab = Lab::up("watch", "disks-fleet.yaml");
    seed(&lab);
    let plan = lab.write_plan(
        "breaks",
        "name: breaks
targets:
  groups: [g-web, g-backup, g-dns]
steps:
  - name: tune
    run: \"echo tuning the cache; echo cache size 0 > /var/lib/talk/conf\"
    writes: [/var/lib/talk]
waves:
  - size: 1
  - size: 100%
health:
  checks:
    - {name: cache works, exec: \"! grep -q 'size 0' /var/lib/talk/conf\"}
  bake: 2s
  interval: 50ms
on_failure: halt
",
    );
    let id = lab.submit_path(&plan);
    let canary = lab.waves(&id)[0][0].clone();
    let env: String = lab
        .identity("auditor")
        .into_iter()
        .map(|(k, v)| format!("{k}='{v}' "))
        .collect();
    let session = format!("wavegate-watch-{}", std::process::id());
    let bin = wavegate_tests::wavegate_bin();
    let script = format!("{env} {} rollout watch {id}; echo EXIT=$?; sleep 60", bin.display());
    let _ = tmux(&["kill-session", "-t", &session]);
    let ok = Command::new("tmux")
        .args(["new-session", "-d", "-s", &session, "-x", "160", "-y", "30", &script])
        .status()
        .expect("tmux");
    assert!(ok.success());
    lab.approve(&id);
    let screen = eventually(LONG, "the watch to show the halt and exit", || {
        let s = tmux(&["capture-pane", "-p", "-t", &session]);
        s.contains("EXIT=").then_some(s)
    });
    let _ = tmux(&["kill-session", "-t", &session]);
    let failed = format!("FAILED {canary}");
    for want in [
        "wave 1 canary",
        "[=",
        "1/1",
        "HALTED:",
        "1 failed",
        &failed,
        "| tuning the cache",
        "EXIT=1",
    ] {
        assert!(screen.contains(want), "`{want}` is on the screen:\n{screen}");
    }
    // Piped, the same rollout prints plain lines and the same exit status.
    let run = lab.wavegate_as("auditor", &["rollout", "watch", &id]);
    assert_eq!(run.status, 1, "{}", run.stdout);
    assert!(run.stdout.contains("HALTED:"), "{}", run.stdout);
    assert!(
        !run.stdout.contains('\u{1b}'),
        "no escape codes in a pipe: {:?}",
        run.stdout
    );
}

/// One request as the receiver saw it: headers, body, when.
type Request = (Vec<(String, String)>, Vec<u8>, Instant);

/// A local HTTP server that records each request (headers and body) and
/// answers 200.
struct Receiver {
    port: u16,
    got: mpsc::Receiver<Request>,
}

impl Receiver {
    fn on(listener: TcpListener) -> Receiver {
        let port = listener.local_addr().expect("addr").port();
        let (tx, got) = mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut r = BufReader::new(conn.try_clone().expect("clone"));
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                let mut headers = Vec::new();
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.trim_end().split_once(':') {
                        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
                    }
                }
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                let _ = r.read_exact(&mut body);
                let mut c = conn;
                let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                if tx.send((headers, body, Instant::now())).is_err() {
                    break;
                }
            }
        });
        Receiver { port, got }
    }

    /// The next notification of `event`, skipping others: its headers, its
    /// raw body, the body as JSON, and when it came.
    fn next(&self, event: &str) -> (Vec<(String, String)>, Vec<u8>, serde_json::Value, Instant) {
        let deadline = Instant::now() + LONG;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (h, body, at) = self
                .got
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no `{event}` notification"));
            let v: serde_json::Value = serde_json::from_slice(&body).expect("a JSON body");
            if v["event"] == event {
                return (h, body, v, at);
            }
        }
    }
}

const SECRET: &str = "a-long-shared-secret-for-the-webhook-test";

/// The signature header is HMAC-SHA256 of the body as sent, under the
/// shared secret (checked here with the hmac crate, not wavegate's code).
fn check_signature(headers: &[(String, String)], raw: &[u8]) {
    let sig = headers
        .iter()
        .find(|(k, _)| k == "x-wavegate-signature-256")
        .map(|(_, v)| v.clone())
        .expect("a signature header");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(raw);
    assert_eq!(sig, format!("sha256={}", hex::encode(mac.finalize().into_bytes())));
    let mut wrong = Hmac::<Sha256>::new_from_slice(b"another secret").expect("key");
    wrong.update(raw);
    assert_ne!(sig, format!("sha256={}", hex::encode(wrong.finalize().into_bytes())));
}

fn webhook_lab(name: &str, port: u16) -> Lab {
    let dir = std::env::temp_dir().join(format!("wavegate-secret-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).expect("secret");
    let url = format!("http://127.0.0.1:{port}/hooks/wavegate");
    Lab::up_extra(
        name,
        "disks-fleet.yaml",
        &[
            "--webhook",
            &url,
            "--webhook-secret-file",
            secret.to_str().expect("path"),
        ],
    )
}

const FAILS: &str = "name: fails
targets:
  hosts: [w1]
steps:
  - name: tune
    run: echo broken > /var/lib/talk/conf
    writes: [/var/lib/talk]
waves:
  - size: 1
health:
  checks:
    - {name: works, exec: \"! grep -q broken /var/lib/talk/conf\"}
  bake: 100ms
  interval: 50ms
";

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_halt_reaches_the_webhook_signed_within_a_second() {
    let receiver = Receiver::on(TcpListener::bind("127.0.0.1:0").expect("listener"));
    let lab = webhook_lab("webhook", receiver.port);
    seed(&lab);
    let id = lab.submit_path(&lab.write_plan("fails", FAILS));
    let (h, raw, v, _) = receiver.next("awaiting_approval");
    check_signature(&h, &raw);
    assert_eq!(v["rollout"], id.as_str());
    lab.approve(&id);
    let status = lab.wait_state(&id, "halted", LONG);
    let seen = Instant::now();
    let (h, raw, v, at) = receiver.next("halted");
    check_signature(&h, &raw);
    assert_eq!(v["halt_reason"], status["halt_reason"], "{v:#}");
    assert!(
        at.saturating_duration_since(seen) < Duration::from_secs(1),
        "it arrived {:?} after the halt was visible",
        at.saturating_duration_since(seen)
    );
    assert!(h.iter().any(|(k, v)| k == "x-wavegate-event" && v == "halted"), "{h:?}");
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn a_receiver_that_is_down_gets_the_halt_once_it_is_back() {
    // A port nothing listens on yet.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let lab = webhook_lab("webhook-down", port);
    seed(&lab);
    let id = lab.submit_path(&lab.write_plan("fails", FAILS));
    lab.approve(&id);
    lab.wait_state(&id, "halted", LONG);
    eventually(LONG, "the controller to have tried and failed", || {
        lab.log("controller")
            .contains("Could not deliver a notification")
            .then_some(())
    });
    let receiver = Receiver::on(TcpListener::bind(("127.0.0.1", port)).expect("the same port"));
    // Everything that waited is delivered, in order, the halt among it.
    let (h, raw, v, _) = receiver.next("halted");
    check_signature(&h, &raw);
    assert_eq!(v["rollout"], id.as_str());
}
