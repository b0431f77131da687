//! One fake agent for the engine's in-process tests, the HA tests and the
//! load generator: it answers every command at once, from memory, as a
//! healthy host would (a clean dry-run report per step, an empty snapshot,
//! passing checks), except where its script says a host fails. How the
//! answer reaches the controller (straight into a hub, or over a real gRPC
//! session) is the caller's; what it answers is decided here only.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use wavegate_domain::command::{
    CheckResult, Command, CommandKind, CommandResult, FetchReport, Outcome, Report, SnapshotSummary,
};
use wavegate_domain::effects::StepReport;

/// Which hosts fail what, and what each host was sent.
#[derive(Default)]
pub struct Script {
    /// Hosts whose every real step fails.
    fail_step: Mutex<HashSet<String>>,
    /// Hosts among which the first real step to arrive fails (once).
    fail_first_step_of: Mutex<HashSet<String>>,
    /// Hosts whose health checks fail.
    fail_checks: Mutex<HashSet<String>>,
    /// Real steps each host was sent.
    steps: Mutex<BTreeMap<String, usize>>,
    /// How long a real step takes to answer when it succeeds, and when it
    /// fails (zero: at once).
    step_time: Mutex<(std::time::Duration, std::time::Duration)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn names(hosts: impl IntoIterator<Item = impl AsRef<str>>) -> HashSet<String> {
    hosts.into_iter().map(|h| h.as_ref().to_owned()).collect()
}

impl Script {
    /// Every real step on these hosts fails (replacing the last such set).
    pub fn fail_step(&self, hosts: impl IntoIterator<Item = impl AsRef<str>>) {
        *lock(&self.fail_step) = names(hosts);
    }

    /// The first real step to arrive on one of these hosts fails, once.
    pub fn fail_first_step_of(&self, hosts: impl IntoIterator<Item = impl AsRef<str>>) {
        *lock(&self.fail_first_step_of) = names(hosts);
    }

    /// The health checks of these hosts fail.
    pub fn fail_checks(&self, hosts: impl IntoIterator<Item = impl AsRef<str>>) {
        *lock(&self.fail_checks) = names(hosts);
    }

    /// A real step answers only after `ok` when it succeeds and after
    /// `failed` when it fails, as a step that does some work would. (How
    /// the caller waits is the caller's: see [`Script::delay`].)
    pub fn step_time(&self, ok: std::time::Duration, failed: std::time::Duration) {
        *lock(&self.step_time) = (ok, failed);
    }

    /// How long to hold `result`, the answer to `cmd`, before delivering it.
    pub fn delay(&self, cmd: &Command, result: &CommandResult) -> std::time::Duration {
        let (ok, failed) = *lock(&self.step_time);
        match cmd.kind {
            CommandKind::RunStep(_) if result.ok() => ok,
            CommandKind::RunStep(_) => failed,
            _ => std::time::Duration::ZERO,
        }
    }

    /// How many real steps `host` was sent.
    pub fn steps_of(&self, host: &str) -> usize {
        lock(&self.steps).get(host).copied().unwrap_or(0)
    }

    /// Real steps sent to every host so far.
    pub fn steps_total(&self) -> usize {
        lock(&self.steps).values().sum()
    }

    /// The answer of `host`'s agent to `cmd`.
    pub fn answer(&self, host: &str, cmd: &Command) -> CommandResult {
        let mut r = CommandResult::new(cmd.id.clone(), Outcome::Ok, "");
        let fail = |r: &mut CommandResult, detail: &str| {
            r.outcome = Outcome::Failed;
            r.exit_code = 1;
            r.detail = detail.to_owned();
        };
        match &cmd.kind {
            CommandKind::DryRun(d) => {
                r.report = Some(Report::DryRun(
                    d.steps
                        .iter()
                        .map(|s| StepReport {
                            step: s.name.clone(),
                            ..StepReport::default()
                        })
                        .collect(),
                ));
            }
            CommandKind::TakeSnapshot { .. } => r.report = Some(Report::Snapshot(SnapshotSummary::default())),
            CommandKind::Fetch(_) => {
                r.report = Some(Report::Fetch(FetchReport {
                    ran: true,
                    ..FetchReport::default()
                }));
            }
            CommandKind::RunStep(_) => {
                *lock(&self.steps).entry(host.to_owned()).or_default() += 1;
                if lock(&self.fail_step).contains(host) {
                    fail(&mut r, "scripted to fail");
                } else {
                    let mut first = lock(&self.fail_first_step_of);
                    if first.contains(host) {
                        first.clear();
                        fail(&mut r, "the first step to arrive fails, on purpose");
                    }
                }
            }
            CommandKind::RunChecks { checks, .. } => {
                let ok = !lock(&self.fail_checks).contains(host);
                r.checks = checks
                    .iter()
                    .map(|c| CheckResult {
                        name: c.name.clone(),
                        ok,
                        detail: if ok { String::new() } else { "scripted to fail".into() },
                    })
                    .collect();
                if !ok {
                    fail(&mut r, "health check failed");
                }
            }
            CommandKind::RestoreSnapshot { .. }
            | CommandKind::ReleaseSnapshot { .. }
            | CommandKind::HoldUpdaters { .. }
            | CommandKind::Mirror { .. } => {}
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use wavegate_domain::command::{DryRun, RunStep, Step};

    use super::*;

    fn step(id: &str) -> Command {
        Command::new(id, CommandKind::RunStep(RunStep::default()))
    }

    #[test]
    fn a_healthy_host_answers_ok_and_a_scripted_one_fails() {
        let s = Script::default();
        let dry = Command::new(
            "d",
            CommandKind::DryRun(DryRun {
                steps: vec![Step {
                    name: "patch".into(),
                    ..Step::default()
                }],
                ..DryRun::default()
            }),
        );
        let r = s.answer("h1", &dry);
        assert!(r.ok());
        assert!(matches!(&r.report, Some(Report::DryRun(v)) if v.len() == 1 && !v[0].blocked));
        s.fail_step(["h2"]);
        assert!(s.answer("h1", &step("a")).ok());
        assert_eq!(s.answer("h2", &step("b")).outcome, Outcome::Failed);
        assert_eq!(s.answer("h2", &step("c")).outcome, Outcome::Failed, "every step");
        s.fail_first_step_of(["h3", "h4"]);
        assert_eq!(s.answer("h4", &step("d")).outcome, Outcome::Failed);
        assert!(s.answer("h3", &step("e")).ok(), "only the first");
        assert_eq!((s.steps_of("h2"), s.steps_total()), (2, 5));
    }
}
