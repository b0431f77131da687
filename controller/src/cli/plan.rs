//! `wavegate plan check`: what would this plan do, and is it safe?

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use wavegate_domain::text::inert;
use wavegate_domain::{Code, Loc, Report, Source, Violation, check_sources};

use super::{Output, PolicyArgs, show};
use crate::policies;

/// `wavegate plan ...`
#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Check a plan against the fleet inventory and the site policies: print
    /// the frozen targets, the waves and every violation. Exit 0 when the plan
    /// is safe to submit, 2 on bad input, 3 when a safety rule refuses it.
    Check {
        /// The fleet inventory (YAML).
        #[arg(long, value_name = "FLEET", env = "WAVEGATE_FLEET")]
        fleet: PathBuf,
        /// The patch plan (YAML).
        #[arg(value_name = "PLAN")]
        plan: PathBuf,
        /// Site policies to check against.
        #[command(flatten)]
        policies: PolicyArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// With a controller (`--controller`, or a lab identity's
        /// environment), also what the targets' agents report of updaters
        /// outside the rollout, and the site's `updaters` rule applied to
        /// it, as a submit would.
        #[command(flatten)]
        conn: super::client::Conn,
    },
}

/// Run a `plan` subcommand.
pub async fn run(cmd: PlanCommand) -> anyhow::Result<u8> {
    match cmd {
        PlanCommand::Check {
            fleet,
            plan,
            policies,
            output,
            conn,
        } => {
            let mut report = check_files(&fleet, &plan, &policies);
            if report.ok {
                updaters(&mut report, &policies, &conn).await;
            }
            if !output.emit(&report)? {
                show(&render(&report));
            }
            Ok(report.exit_status())
        }
    }
}

/// What the controller knows of the targets' updaters outside the rollout,
/// into the report (as a submit puts it). Without a controller, or when it
/// cannot be asked, a site `updaters` rule is left to the submit, and the
/// report says so.
async fn updaters(report: &mut Report, policy_args: &PolicyArgs, conn: &super::client::Conn) {
    let rule_set = policies::load(&policy_args.source()).ok();
    let rule = rule_set.as_ref().and_then(|p| p.updaters());
    let asked = match &conn.controller {
        None => Err("no controller given (--controller)".to_owned()),
        Some(_) => match conn.connect().await {
            Err(e) => Err(format!("{e:#}")),
            Ok(mut client) => client
                .fleet(wavegate_proto::v1::FleetRequest {})
                .await
                .map(|r| r.into_inner().hosts)
                .map_err(|s| s.message().to_owned()),
        },
    };
    match asked {
        Ok(hosts) => {
            let known: std::collections::HashMap<String, Option<Vec<wavegate_domain::updaters::Updater>>> = hosts
                .into_iter()
                .map(|h| {
                    let list = h
                        .updaters_known
                        .then(|| h.updaters.into_iter().map(wavegate_proto::convert::updater).collect());
                    (h.id, list)
                })
                .collect();
            wavegate_domain::updaters::gate(report, |h| known.get(h).cloned().flatten(), rule);
        }
        Err(why) => {
            if let Some((id, _, _)) = rule {
                report.notes.push(format!(
                    "the site rule {id} on updaters outside the rollout is applied at submit: {why}"
                ));
            }
        }
    }
}

/// Read a file, or record why it could not be read.
fn read(path: &Path, what: &str, problems: &mut Vec<Violation>) -> Option<String> {
    std::fs::read_to_string(path)
        .map_err(|e| {
            let name = path.display().to_string();
            problems.push(
                Violation::new(Code::ParseError, format!("cannot read the {what} {name}: {e}"))
                    .at(&Loc::file(&name))
                    .fix(format!("check the path of the {what}")),
            );
        })
        .ok()
}

/// Check files on disk. Unreadable files and broken policies become
/// violations in the report (nothing is checked against half the input), so
/// `--output json` always prints one object.
pub fn check_files(fleet: &Path, plan: &Path, policy_args: &PolicyArgs) -> Report {
    let fleet_name = fleet.display().to_string();
    let plan_name = plan.display().to_string();
    let mut problems = Vec::new();
    let fleet_text = read(fleet, "fleet inventory", &mut problems);
    let plan_text = read(plan, "plan", &mut problems);
    let policy_set = policies::load(&policy_args.source())
        .map_err(|v| problems.extend(v))
        .ok();
    match (fleet_text, plan_text, policy_set) {
        (Some(f), Some(p), Some(pol)) => check_sources(
            Source {
                name: &fleet_name,
                text: &f,
            },
            Source {
                name: &plan_name,
                text: &p,
            },
            &pol,
        ),
        _ => Report::unreadable(&fleet_name, &plan_name, problems),
    }
}

/// Show at most `max` items of a list, then how many more.
fn list(items: &[String], max: usize) -> String {
    if items.is_empty() {
        return "-".into();
    }
    let mut s = items.iter().take(max).map(|i| inert(i)).collect::<Vec<_>>().join(", ");
    if items.len() > max {
        let _ = write!(s, " (+{} more)", items.len() - max);
    }
    s
}

/// Every item, each made inert, comma-separated.
fn joined(items: &[String]) -> String {
    items.iter().map(|i| inert(i)).collect::<Vec<_>>().join(", ")
}

/// A command of several lines, each made inert, the later ones indented
/// under the first: a line of a step's `run` does not pass for a line of
/// the report.
fn command(text: &str, indent: &str) -> String {
    text.trim_end()
        .lines()
        .map(|l| inert(l).into_owned())
        .collect::<Vec<_>>()
        .join(&format!("\n{indent}"))
}

/// A violation whose every field quoting the plan, the inventory or a
/// policy (a host's or a path's name) is made inert on its line; its own
/// lines (hosts, fix) stay.
fn inert_violation(v: &Violation) -> Violation {
    let mut v = v.clone();
    v.message = inert(&v.message).into_owned();
    v.hosts = v.hosts.iter().map(|h| inert(h).into_owned()).collect();
    v.file = v.file.as_deref().map(|f| inert(f).into_owned());
    v.field = v.field.as_deref().map(|f| inert(f).into_owned());
    v.fix = v.fix.as_deref().map(|f| inert(f).into_owned());
    v
}

/// The report for a person. Names, paths and commands are the plan
/// author's and the inventory's: every one is made inert on its line.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let name = inert(r.plan.as_deref().unwrap_or("(unreadable)"));
    let _ = writeln!(out, "plan      {name}  ({})", inert(&r.plan_file));
    let _ = writeln!(out, "fleet     {}", inert(&r.fleet_file));
    let _ = writeln!(
        out,
        "policies  {}",
        if r.policies.is_empty() {
            "-".into()
        } else {
            joined(&r.policies)
        }
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "targets ({}): {}", r.targets.len(), list(&r.targets, 40));
    if !r.waves.is_empty() {
        let _ = writeln!(out);
        let rows: Vec<[String; 6]> = r
            .waves
            .iter()
            .map(|w| {
                let label = if w.index == 1 {
                    "1 canary".to_string()
                } else {
                    w.index.to_string()
                };
                [
                    label,
                    format!("{} ({} backup)", w.hosts.len(), w.backups),
                    w.max_in_flight.to_string(),
                    list(&w.hosts, 8),
                    list(&w.groups, 4),
                    list(&w.failure_domains, 4),
                ]
            })
            .collect();
        let header = ["WAVE", "HOSTS", "AT ONCE", "MEMBERS", "GROUPS", "FAILURE DOMAINS"];
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: [&str; 6]| {
            let mut l = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                if i == 5 {
                    l.push_str(cell);
                } else {
                    let _ = write!(l, "{cell:<w$}  ");
                }
            }
            l.trim_end().to_string()
        };
        let _ = writeln!(out, "{}", line(header));
        for row in &rows {
            let _ = writeln!(out, "{}", line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]]));
        }
        for w in r.waves.iter().filter(|w| !w.windows.is_empty()) {
            let sets: Vec<String> = w
                .windows
                .iter()
                .map(wavegate_domain::windows::WindowSet::describe)
                .collect();
            let _ = writeln!(
                out,
                "wave {} runs only inside {} (expected to take up to {})",
                w.index,
                inert(&sets.join("; ")),
                wavegate_domain::units::format_duration(std::time::Duration::from_millis(w.expected_ms))
            );
        }
    }
    if !r.steps.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "steps:");
        for (i, st) in r.steps.iter().enumerate() {
            let step = inert(&st.name);
            match &st.packages {
                Some(p) => {
                    let _ = writeln!(out, "  {} {step}: package step, {}", i + 1, inert(p));
                    let _ = writeln!(
                        out,
                        "      writes: {} and the directories of the packages' files on each host (from its package database and the fetched packages)",
                        joined(&st.writes)
                    );
                }
                None => {
                    let _ = writeln!(out, "  {} {step}: {}", i + 1, command(&st.run, "        "));
                    let _ = writeln!(out, "      writes: {}", joined(&st.writes));
                }
            }
            if let Some(f) = &st.fetch {
                let _ = writeln!(
                    out,
                    "      fetch first, with the network, writing only {}: {}",
                    joined(&st.fetch_writes),
                    command(f, "        ")
                );
            }
            if !st.only_roles.is_empty() {
                let _ = writeln!(out, "      only for {} hosts", inert(&st.only_roles.join(", ")));
            }
            if st.max_deletions > 0 {
                let _ = writeln!(out, "      may delete {} files per host", st.max_deletions);
            }
            if let Some(why) = &st.allow_failure {
                let _ = writeln!(out, "      a failing dry-run is allowed: {}", inert(why));
            }
            if st.reboot != wavegate_domain::plan::Reboot::Never {
                let _ = writeln!(out, "      reboots the host afterwards ({})", st.reboot.as_str());
            }
        }
    }
    for note in &r.notes {
        let _ = writeln!(out, "note: {}", inert(note));
    }
    let _ = writeln!(out);
    if r.violations.is_empty() {
        let _ = writeln!(out, "OK: no violations; the plan may be submitted.");
    } else {
        let _ = writeln!(out, "violations ({}):", r.violations.len());
        for v in &r.violations {
            let _ = writeln!(out, "  {}", inert_violation(v));
        }
        let _ = writeln!(out);
        let verdict = match r.exit_status() {
            2 => "BAD INPUT: fix the files above and check again (exit 2).",
            _ => "REFUSED by the safety rules above (exit 3).",
        };
        let _ = writeln!(out, "{verdict}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_on_a_hostile_plan_keeps_its_lines() {
        let plan = "name: p
targets: {hosts: [\"p1\\e[2J\\nOK: no violations; the plan may be submitted.\"]}
steps:
  - name: s
    run: |
      echo one
      printf '\\033]0;t\\007'\u{202e}
    writes: [/etc/app]
";
        let fleet = "hosts:\n  - {id: p1}\n";
        let report = check_sources(
            Source {
                name: "fleet.yaml",
                text: fleet,
            },
            Source {
                name: "plan.yaml",
                text: plan,
            },
            &wavegate_domain::PolicySet::default(),
        );
        let text = render(&report);
        assert!(
            !text.chars().any(|c| wavegate_domain::text::is_active(c) && c != '\n'),
            "{text}"
        );
        // The host's name stays inside its violation's line; the only
        // verdict line is the report's own.
        assert_eq!(text.lines().filter(|l| l.starts_with("OK: ")).count(), 0, "{text}");
        assert!(text.contains("p1\\x1b[2J\\nOK: no violations"), "{text}");
        // A command's later lines are indented under its first.
        assert!(
            text.contains("  1 s: echo one\n        printf '\\033]0;t\\007'\\u{202e}\n"),
            "{text}"
        );
    }
}
