//! Text from hosts is shown on the operator's terminal, never obeyed by it.
//! A step prints what a hostile host would: a clear screen, an OSC 0
//! title, an OSC 8 link, a carriage return and a fake "all healthy" line,
//! a C1 CSI (U+009B), DEL and bidirectional controls; it also names a
//! tenant's file with them. Every command that shows that text is read
//! from a pipe, in every output form, and none lets a raw control through:
//! text forms show the escapes, JSON and YAML escape them and still carry
//! the same text. Needs root (a lab).

use std::process::Child;
use std::time::Duration;

use serde_json::Value;
use wavegate_tests::Run;
use wavegate_tests::lab::{Lab, eventually};

const LONG: Duration = Duration::from_secs(120);

/// The step's last line, as printf writes it: every attack at once.
const PAYLOAD: &str = concat!(
    "\\033[2J",                                                      // clear the screen
    "\\033]0;pwned\\007",                                            // OSC 0: the window title
    "\\033]8;;http://evil.example/\\033\\\\click\\033]8;;\\033\\\\", // OSC 8: a link
    " \\302\\23331m",                                                // U+009B: a C1 CSI
    " \\342\\200\\256exe.txt",                                       // U+202E: right-to-left override
    " \\342\\200\\217",                                              // U+200F: right-to-left mark
    " \\177",                                                        // DEL
    "\\r\\033[2KALL HOSTS HEALTHY",                                  // a fake line over the real one
);

/// The same line as the step prints it.
const PRINTED: &str = "\u{1b}[2J\u{1b}]0;pwned\u{7}\u{1b}]8;;http://evil.example/\u{1b}\\click\u{1b}]8;;\u{1b}\\ \u{9b}31m \u{202e}exe.txt \u{200f} \u{7f}\r\u{1b}[2KALL HOSTS HEALTHY";

/// The tenant's file the blocked step makes, as a text form shows it.
const TENANT_FILE: &str = "/var/lib/tenant/a\\x1b[2Jb\\x9bc\\u{202e}d";

/// What a text form shows of it.
const SHOWN: [&str; 7] = [
    "\\x1b[2J",
    "\\x1b]0;pwned\\x07",
    "\\x1b]8;;http://evil.example/",
    "\\x9b31m",
    "\\u{202e}exe.txt",
    "\\u{200f}",
    "\\x7f\\r\\x1b[2KALL HOSTS HEALTHY",
];

/// A plan whose one step prints the payload on w1 and fails, in its
/// dry-run (allowed) and in the real run, which halts the canary.
fn noisy_plan() -> String {
    format!(
        "name: noisy
targets:
  hosts: [w1]
steps:
  - name: talk
    run: |
      printf 'starting\\n{PAYLOAD}\\n'
      exit 1
    writes: [/var/lib/talk]
    timeout: 5m
    dry_run: {{allow_failure: \"it fails on purpose\"}}
waves:
  - size: 1
health:
  bake: 100ms
  interval: 50ms
on_failure: halt
"
    )
}

/// A plan whose dry-run is blocked: it names a tenant's file with escape
/// sequences outside its write set, and prints the payload.
fn blocked_plan() -> String {
    format!(
        "name: spills
targets:
  hosts: [w1]
steps:
  - name: spill
    run: |
      touch \"/var/lib/tenant/$(printf 'a\\033[2Jb\\302\\233c\\342\\200\\256d')\"
      printf '{PAYLOAD}\\n'
    writes: [/var/lib/talk]
waves:
  - size: 1
health:
  bake: 100ms
  interval: 50ms
"
    )
}

/// The characters that would drive a terminal: C0 controls but tab and
/// newline, DEL, C1 controls (UTF-8 C2 80 to C2 9F), bidirectional
/// controls.
fn drives_a_terminal(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{8}' | '\u{b}'..='\u{1f}' | '\u{7f}'..='\u{9f}')
        || matches!(
            c,
            '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// Whether some string in `v` contains `needle`.
fn carries(v: &Value, needle: &str) -> bool {
    match v {
        Value::String(s) => s.contains(needle),
        Value::Array(a) => a.iter().any(|x| carries(x, needle)),
        Value::Object(o) => o.values().any(|x| carries(x, needle)),
        _ => false,
    }
}

/// The documents of a YAML stream (`---` between them), read back.
fn yaml_docs(text: &str) -> Result<Vec<Value>, String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line == "---" {
            docs.push(String::new());
        } else if let Some(d) = docs.last_mut() {
            d.push_str(line);
            d.push('\n');
        }
    }
    docs.iter()
        .filter(|d| !d.trim().is_empty())
        .map(|d| {
            wavegate_domain::yaml::parse::<Value>(
                wavegate_domain::Source {
                    name: "stdout",
                    text: d,
                },
                "output",
            )
            .map_err(|v| v.to_string())
        })
        .collect()
}

/// Every command's problems, reported together at the end: one run shows
/// which commands obey the host.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    /// Nothing in either stream would drive a terminal.
    fn inert(&mut self, what: &str, run: &Run) {
        for (stream, text) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
            let active: Vec<char> = text.chars().filter(|c| drives_a_terminal(*c)).collect();
            if !active.is_empty() {
                self.0.push(format!(
                    "{what}: {stream} lets {active:?} reach the terminal:\n{text:?}"
                ));
            }
        }
    }

    /// A text form: inert, and every escape is there to read.
    fn shown(&mut self, what: &str, run: &Run) {
        self.inert(what, run);
        for s in SHOWN {
            if !run.stdout.contains(s) {
                self.0.push(format!("{what}: `{s}` is not shown:\n{}", run.stdout));
            }
        }
    }

    /// The file the step made outside its write set is named, its
    /// escape sequence and controls shown.
    fn names_the_tenant_file(&mut self, what: &str, run: &Run) {
        if !run.stdout.contains(TENANT_FILE) {
            self.0
                .push(format!("{what}: `{TENANT_FILE}` is not named:\n{}", run.stdout));
        }
    }

    /// JSON documents, one or one per line: inert, with the C1 and
    /// bidirectional controls as JSON escapes, and the printed line in
    /// them whole.
    fn json(&mut self, what: &str, run: &Run, per_line: bool) {
        self.inert(what, run);
        if !(run.stdout.contains("\\u009b") && run.stdout.contains("\\u202e")) {
            self.0.push(format!(
                "{what}: U+009B and U+202E are not JSON escapes:\n{}",
                run.stdout
            ));
        }
        let docs: Result<Vec<Value>, _> = if per_line {
            run.stdout.lines().map(serde_json::from_str).collect()
        } else {
            serde_json::from_str(&run.stdout).map(|v| vec![v])
        };
        match docs {
            Ok(docs) if docs.iter().any(|d| carries(d, PRINTED)) => {}
            Ok(_) => self
                .0
                .push(format!("{what}: the printed line is not in it whole:\n{}", run.stdout)),
            Err(e) => self.0.push(format!("{what}: not JSON ({e}):\n{}", run.stdout)),
        }
    }

    /// A YAML stream: inert, and it reads back with the printed line whole.
    fn yaml(&mut self, what: &str, run: &Run) {
        self.inert(what, run);
        match yaml_docs(&run.stdout) {
            Ok(docs) if docs.iter().any(|d| carries(d, PRINTED)) => {}
            Ok(_) => self.0.push(format!(
                "{what}: the printed line does not read back whole:\n{}",
                run.stdout
            )),
            Err(e) => self.0.push(format!("{what}: not YAML ({e}):\n{}", run.stdout)),
        }
    }
}

/// Wait (polling) until `child` ends, then what it printed.
fn finished(mut child: Child, what: &str) -> Run {
    eventually(LONG, &format!("{what} to end"), || child.try_wait().ok().flatten());
    child.wait_with_output().expect("output").into()
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn hostile_text_from_a_host_is_shown_inert_by_every_command() {
    let lab = Lab::up("terminal", "disks-fleet.yaml");
    for h in ["w1", "bk1", "s1"] {
        std::fs::create_dir_all(lab.host_path(h, "/var/lib/talk")).expect("mkdir");
        std::fs::create_dir_all(lab.host_path(h, "/var/lib/tenant")).expect("mkdir");
    }
    let auditor = |args: &[&str]| lab.wavegate_as("auditor", args);
    let mut p = Problems::default();

    // A dry-run that is blocked: what `submit` prints of it, and `dryrun`.
    let spills = lab.write_plan("spills", &blocked_plan());
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &spills]);
    assert_eq!(run.status, 3, "blocked:\n{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("its last output:"), "{}", run.stdout);
    p.shown("submit (blocked)", &run);
    p.names_the_tenant_file("submit (blocked)", &run);
    let refused = run
        .stdout
        .split_whitespace()
        .skip_while(|w| *w != "rollout")
        .nth(1)
        .expect("the refused rollout's id")
        .to_owned();
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &spills, "--output", "json"]);
    assert_eq!(run.status, 3, "{}", run.stderr);
    p.json("submit --output json (blocked)", &run, false);
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &spills, "--output", "yaml"]);
    p.yaml("submit --output yaml (blocked)", &run);
    let run = auditor(&["rollout", "dryrun", &refused]);
    p.shown("dryrun", &run);
    p.names_the_tenant_file("dryrun", &run);
    p.json(
        "dryrun --output json",
        &auditor(&["rollout", "dryrun", &refused, "--output", "json"]),
        false,
    );
    p.yaml(
        "dryrun --output yaml",
        &auditor(&["rollout", "dryrun", &refused, "--output", "yaml"]),
    );

    // A step that prints the payload and fails: its output, the host's
    // detail, the halt reason and the audit trail all quote it.
    let noisy = lab.write_plan("noisy", &noisy_plan());
    let run = lab.wavegate_as("submitter", &["rollout", "submit", &noisy, "--output", "json"]);
    assert_eq!(run.status, 0, "{}\n{}", run.stdout, run.stderr);
    let id = run.json()["id"].as_str().expect("id").to_owned();
    let watch = lab.spawn_as("auditor", &["rollout", "watch", &id]);
    lab.approve(&id);
    let follow = lab.spawn_as("auditor", &["rollout", "logs", &id, "-f"]);
    let halted = lab.wait_state(&id, "halted", LONG);
    assert!(
        carries(&halted["halt_reason"], PRINTED),
        "the halt reason quotes the host's last line: {halted:#}"
    );

    let run = finished(watch, "rollout watch");
    assert_eq!(run.status, 1, "a halted rollout: {}", run.stderr);
    p.shown("watch", &run);
    let run = finished(follow, "rollout logs -f");
    assert!(run.stdout.contains("w1 | starting"), "{}", run.stdout);
    p.shown("logs -f", &run);

    let run = auditor(&["rollout", "status", &id]);
    p.shown("status", &run);
    let halt_lines = run.stdout.lines().filter(|l| l.starts_with("HALTED: ")).count();
    assert_eq!(halt_lines, 1, "the halt reason is one line:\n{}", run.stdout);
    p.json(
        "status --output json",
        &auditor(&["rollout", "status", &id, "--output", "json"]),
        false,
    );
    p.yaml(
        "status --output yaml",
        &auditor(&["rollout", "status", &id, "--output", "yaml"]),
    );
    p.json(
        "list --output json",
        &auditor(&["rollout", "list", "--output", "json"]),
        false,
    );
    p.yaml("list --output yaml", &auditor(&["rollout", "list", "--output", "yaml"]));

    p.shown("logs", &auditor(&["rollout", "logs", &id]));
    p.shown(
        "logs w1 --step talk",
        &auditor(&["rollout", "logs", &id, "w1", "--step", "talk"]),
    );
    p.json(
        "logs --output json",
        &auditor(&["rollout", "logs", &id, "--output", "json"]),
        true,
    );
    p.yaml(
        "logs --output yaml",
        &auditor(&["rollout", "logs", &id, "--output", "yaml"]),
    );

    let run = auditor(&["audit", "report", &id]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    p.shown("audit report", &run);
    p.shown("audit log", &auditor(&["audit", "log", "--rollout", &id]));
    p.json(
        "audit log --output json",
        &auditor(&["audit", "log", "--rollout", &id, "--output", "json"]),
        true,
    );
    p.yaml(
        "audit log --output yaml",
        &auditor(&["audit", "log", "--rollout", &id, "--output", "yaml"]),
    );

    assert!(p.0.is_empty(), "{} problems:\n\n{}", p.0.len(), p.0.join("\n\n"));

    // None of it changed what the log proves.
    let run = auditor(&["audit", "verify"]);
    assert_eq!(run.status, 0, "audit verify: {}\n{}", run.stdout, run.stderr);
    let export = lab.dir.join("audit.jsonl");
    let export = export.to_str().expect("path");
    let run = auditor(&["audit", "export", "--file", export]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    let run = auditor(&["audit", "verify", "--file", export]);
    assert_eq!(run.status, 0, "audit verify --file: {}\n{}", run.stdout, run.stderr);
}
