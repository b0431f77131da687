//! Fuzzing the operator-facing parsers (plan, inventory, policy) with
//! proptest: real documents from this repository, mutated with byte edits
//! and YAML-significant tokens. No input may panic a parser, and every
//! problem found must say where it is: the file, a line and a column.
//!
//! CI runs a few thousand cases per parser. For a long run:
//! `PROPTEST_CASES=200000 cargo test --release -p wavegate-domain --test parser_fuzz`.

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::Config;
use wavegate_domain::{Fleet, PolicySet, Source, Violation, check_sources};

fn read(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn seeds(dir: &str) -> Vec<String> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("seed"))
        .collect()
}

/// Pieces that mean something to YAML or to our formats.
const TOKENS: &[&str] = &[
    ":",
    ": ",
    "-",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ",",
    "\n",
    "  ",
    "\t",
    "'",
    "\"",
    "&a ",
    "*a",
    "!!str ",
    "!!binary ",
    "# ",
    "|",
    ">",
    "~",
    "null",
    "true",
    "1e309",
    "-1",
    "0",
    "99999999999999999999",
    "10%",
    "101%",
    "5m",
    "0s",
    "1h30m",
    "3600000000000000h",
    "? ",
    "---\n",
    "...\n",
    "\u{feff}",
    "é",
    "\u{0}",
    "/",
    "..",
    "/home",
    "*",
    "%",
    "<<: *a\n",
    "id: x\n",
    "hosts:\n",
    "steps:\n",
    "waves:\n",
    "targets:\n",
    "rules:\n",
    "kind: ",
    "backup_of: [",
];

#[derive(Clone, Debug)]
enum Edit {
    Delete { at: usize, len: usize },
    Insert { at: usize, token: usize },
    Replace { at: usize, byte: u8 },
    DuplicateLine { line: usize },
    SwapLines { a: usize, b: usize },
    Truncate { at: usize },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1usize..12).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(at, token)| Edit::Insert { at, token }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Edit::Replace { at, byte }),
        any::<usize>().prop_map(|line| Edit::DuplicateLine { line }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines { a, b }),
        any::<usize>().prop_map(|at| Edit::Truncate { at }),
    ]
}

/// Apply edits; the result is made valid UTF-8 the way a file read would.
fn mutate(seed: &str, edits: &[Edit]) -> String {
    let mut bytes = seed.as_bytes().to_vec();
    for e in edits {
        let n = bytes.len().max(1);
        match *e {
            Edit::Delete { at, len } => {
                let at = at % n;
                let end = (at + len).min(bytes.len());
                if at < end {
                    bytes.drain(at..end);
                }
            }
            Edit::Insert { at, token } => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, TOKENS[token].bytes());
            }
            Edit::Replace { at, byte } => {
                if !bytes.is_empty() {
                    bytes[at % n] = byte;
                }
            }
            Edit::DuplicateLine { line } | Edit::SwapLines { a: line, .. } if bytes.is_empty() => {
                let _ = line;
            }
            Edit::DuplicateLine { line } => {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let mut lines: Vec<&str> = text.split('\n').collect();
                let i = line % lines.len();
                lines.insert(i, lines[i]);
                bytes = lines.join("\n").into_bytes();
            }
            Edit::SwapLines { a, b } => {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let mut lines: Vec<&str> = text.split('\n').collect();
                let (a, b) = (a % lines.len(), b % lines.len());
                lines.swap(a, b);
                bytes = lines.join("\n").into_bytes();
            }
            Edit::Truncate { at } => bytes.truncate(at % n),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn located(v: &Violation, file: &str, text: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(v.file.as_deref(), Some(file), "no file: {:?}", v);
    let line = v.line.ok_or_else(|| TestCaseError::fail(format!("no line: {v:?}")))?;
    let column = v
        .column
        .ok_or_else(|| TestCaseError::fail(format!("no column: {v:?}")))?;
    let lines = text.split('\n').count() as u64;
    prop_assert!(
        line >= 1 && line <= lines + 1,
        "line {} outside 1..={}: {:?}",
        line,
        lines + 1,
        v
    );
    prop_assert!(column >= 1, "column 0: {:?}", v);
    Ok(())
}

fn cases(default: u32) -> Config {
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(default),
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn plans_never_panic_and_every_problem_has_a_place(
        seed in 0usize..1000,
        edits in proptest::collection::vec(edit(), 1..6),
    ) {
        let fleet = read("tests/fixtures/fleet.yaml");
        let plans = PLANS.with(|p| p.clone());
        let text = mutate(&plans[seed % plans.len()], &edits);
        let policies = PolicySet::parse(&[Source { name: "default.yaml", text: &read("policies/default.yaml") }])
            .expect("shipped policies");
        let report = check_sources(
            Source { name: "fleet.yaml", text: &fleet },
            Source { name: "plan.yaml", text: &text },
            &policies,
        );
        for v in report.violations.iter().filter(|v| v.file.as_deref() != Some("fleet.yaml")) {
            located(v, "plan.yaml", &text)?;
        }
    }

    #[test]
    fn inventories_never_panic_and_every_problem_has_a_place(
        seed in 0usize..1000,
        edits in proptest::collection::vec(edit(), 1..6),
    ) {
        let fleets = FLEETS.with(|f| f.clone());
        let text = mutate(&fleets[seed % fleets.len()], &edits);
        if let Err(violations) = Fleet::parse(Source { name: "fleet.yaml", text: &text }) {
            prop_assert!(!violations.is_empty());
            for v in &violations {
                located(v, "fleet.yaml", &text)?;
            }
        }
    }

    #[test]
    fn policies_never_panic_and_every_problem_has_a_place(
        seed in 0usize..1000,
        edits in proptest::collection::vec(edit(), 1..6),
    ) {
        let seeds = POLICIES.with(|p| p.clone());
        let text = mutate(&seeds[seed % seeds.len()], &edits);
        if let Err(violations) = PolicySet::parse(&[Source { name: "site.yaml", text: &text }]) {
            prop_assert!(!violations.is_empty());
            for v in &violations {
                located(v, "site.yaml", &text)?;
            }
        }
    }
}

thread_local! {
    static PLANS: Vec<String> = {
        let mut v = seeds("tests/fixtures/plans");
        v.extend(seeds("examples/plans"));
        v
    };
    static FLEETS: Vec<String> = vec![
        read("tests/fixtures/fleet.yaml"),
        read("tests/fixtures/lab-fleet.yaml"),
        read("examples/fleet.yaml"),
    ];
    static POLICIES: Vec<String> = vec![
        read("policies/default.yaml"),
        read("policies/examples/strict-site.yaml"),
    ];
}
