//! `wavegate plan check`: what would this plan do, and is it safe?

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use wavegate_domain::{Code, Loc, Report, Source, Violation, check_sources};

use super::{Output, PolicyArgs};
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
    },
}

/// Run a `plan` subcommand.
pub fn run(cmd: PlanCommand) -> anyhow::Result<u8> {
    match cmd {
        PlanCommand::Check {
            fleet,
            plan,
            policies,
            output,
        } => {
            let report = check_files(&fleet, &plan, &policies);
            if !output.emit(&report)? {
                print!("{}", render(&report));
            }
            Ok(report.exit_status())
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
    let mut s = items.iter().take(max).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > max {
        let _ = write!(s, " (+{} more)", items.len() - max);
    }
    s
}

/// The report for a person.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let name = r.plan.as_deref().unwrap_or("(unreadable)");
    let _ = writeln!(out, "plan      {name}  ({})", r.plan_file);
    let _ = writeln!(out, "fleet     {}", r.fleet_file);
    let _ = writeln!(
        out,
        "policies  {}",
        if r.policies.is_empty() {
            "-".into()
        } else {
            r.policies.join(", ")
        }
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "targets ({}): {}", r.targets.len(), list(&r.targets, 40));
    if !r.waves.is_empty() {
        let _ = writeln!(out);
        let rows: Vec<[String; 5]> = r
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
                    list(&w.hosts, 8),
                    list(&w.groups, 4),
                    list(&w.failure_domains, 4),
                ]
            })
            .collect();
        let header = ["WAVE", "HOSTS", "MEMBERS", "GROUPS", "FAILURE DOMAINS"];
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: [&str; 5]| {
            let mut l = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                if i == 4 {
                    l.push_str(cell);
                } else {
                    let _ = write!(l, "{cell:<w$}  ");
                }
            }
            l.trim_end().to_string()
        };
        let _ = writeln!(out, "{}", line(header));
        for row in &rows {
            let _ = writeln!(out, "{}", line([&row[0], &row[1], &row[2], &row[3], &row[4]]));
        }
    }
    if !r.steps.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "steps:");
        for (i, st) in r.steps.iter().enumerate() {
            match &st.packages {
                Some(p) => {
                    let _ = writeln!(out, "  {} {}: package step, {p}", i + 1, st.name);
                    let _ = writeln!(
                        out,
                        "      writes: {} and the directories of the packages' files on each host (from its package database and the fetched packages)",
                        st.writes.join(", ")
                    );
                }
                None => {
                    let _ = writeln!(out, "  {} {}: {}", i + 1, st.name, st.run);
                    let _ = writeln!(out, "      writes: {}", st.writes.join(", "));
                }
            }
            if let Some(f) = &st.fetch {
                let _ = writeln!(
                    out,
                    "      fetch first, with the network, writing only {}: {f}",
                    st.fetch_writes.join(", ")
                );
            }
            if st.max_deletions > 0 {
                let _ = writeln!(out, "      may delete {} files per host", st.max_deletions);
            }
            if let Some(why) = &st.allow_failure {
                let _ = writeln!(out, "      a failing dry-run is allowed: {why}");
            }
            if st.reboot != "never" {
                let _ = writeln!(out, "      reboots the host afterwards ({})", st.reboot);
            }
        }
    }
    for note in &r.notes {
        let _ = writeln!(out, "note: {note}");
    }
    let _ = writeln!(out);
    if r.violations.is_empty() {
        let _ = writeln!(out, "OK: no violations; the plan may be submitted.");
    } else {
        let _ = writeln!(out, "violations ({}):", r.violations.len());
        for v in &r.violations {
            let _ = writeln!(out, "  {v}");
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
