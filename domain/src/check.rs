//! `plan check`: a plan against an inventory and the site policies, giving the
//! frozen targets, the waves and every violation.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;

use crate::fleet::{Fleet, HostIdx, Role};
use crate::plan::{self, WaveSpec};
use crate::policy::PolicySet;
use crate::targets::{self, Targets};
use crate::violation::{Code, Violation, exit_status};
use crate::waves;
use crate::yaml::Source;

/// One wave as reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct WaveReport {
    /// 1-based.
    pub index: usize,
    /// Host ids, sorted.
    pub hosts: Vec<String>,
    /// Groups the wave's hosts are in.
    pub groups: Vec<String>,
    /// Failure domains the wave's hosts are in.
    pub failure_domains: Vec<String>,
    /// How many of the wave's hosts are backups.
    pub backups: usize,
    /// How many of its hosts may have a real step running at once.
    #[serde(default)]
    pub max_in_flight: usize,
    /// The maintenance windows it must fit in (the plan's, and each site
    /// rule's for its hosts' groups); empty: any time.
    #[serde(default)]
    pub windows: Vec<crate::windows::WindowSet>,
    /// How long it is expected to take, at most: batch after batch of
    /// `max_in_flight` hosts, each the sum of its steps' time limits (and
    /// reboot limits), then the bake. A wave starts only when this fits.
    #[serde(default)]
    pub expected_ms: u64,
}

/// The answer to "what would this plan do, and is it safe?".
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Report {
    /// No violations.
    pub ok: bool,
    /// The plan's name, when it could be read.
    pub plan: Option<String>,
    /// The plan file.
    pub plan_file: String,
    /// The inventory file.
    pub fleet_file: String,
    /// The frozen target list, sorted.
    pub targets: Vec<String>,
    /// The waves, in order.
    pub waves: Vec<WaveReport>,
    /// Every problem found, ordered by file and position.
    pub violations: Vec<Violation>,
    /// Where the waves differ from the plan's sizes, and why.
    pub notes: Vec<String>,
    /// Ids of the policy rules the plan was checked against.
    pub policies: Vec<String>,
    /// What each step is and may change, as the plan says it.
    #[serde(default)]
    pub steps: Vec<StepPlan>,
}

/// One step as `plan check` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StepPlan {
    /// Its name.
    pub name: String,
    /// `run` or `packages`.
    pub kind: String,
    /// What it runs (generated for a package step).
    pub run: String,
    /// Its write set as the plan gives it (a package step adds its
    /// packages' files on each host).
    pub writes: Vec<String>,
    /// A package step: what it changes, like `apt: upgrade postfix`.
    #[serde(default)]
    pub packages: Option<String>,
    /// Its fetch, run before the dry-run with the network.
    #[serde(default)]
    pub fetch: Option<String>,
    /// What the fetch may write.
    #[serde(default)]
    pub fetch_writes: Vec<String>,
    /// `never`, `always` or `if-required`.
    pub reboot: plan::Reboot,
    /// Deletion budget.
    pub max_deletions: u64,
    /// Why a failing dry-run is acceptable, if the plan says so.
    #[serde(default)]
    pub allow_failure: Option<String>,
    /// The roles it is for (`only_roles`); empty: every role.
    #[serde(default)]
    pub only_roles: Vec<String>,
}

impl Report {
    /// A report for input that could not be read at all.
    pub fn unreadable(fleet_file: &str, plan_file: &str, violations: Vec<Violation>) -> Report {
        finish(
            fleet_file,
            plan_file,
            None,
            Vec::new(),
            Vec::new(),
            violations,
            Vec::new(),
            &PolicySet::default(),
        )
    }

    /// The exit status FORMATS.md gives this result.
    pub fn exit_status(&self) -> u8 {
        exit_status(&self.violations)
    }
}

/// Check a plan given as text against an inventory given as text.
pub fn check_sources(fleet: Source<'_>, plan: Source<'_>, policies: &PolicySet) -> Report {
    match Fleet::parse(fleet) {
        Ok(f) => check(&f, plan, policies),
        Err(fleet_violations) => {
            // The plan's own rules can still be checked without the inventory.
            let mut violations = fleet_violations;
            match plan::parse(plan) {
                Ok((_, v)) => violations.extend(v),
                Err(v) => violations.push(*v),
            }
            finish(
                fleet.name,
                plan.name,
                None,
                Vec::new(),
                Vec::new(),
                violations,
                Vec::new(),
                policies,
            )
        }
    }
}

/// Check a plan against a parsed inventory.
pub fn check(fleet: &Fleet, plan_src: Source<'_>, policies: &PolicySet) -> Report {
    check_plan(fleet, plan_src, policies).0
}

/// Check a plan and hand back the parsed plan too, for a submission that
/// turns it into a rollout (use the plan only when the report is ok).
pub fn check_plan(fleet: &Fleet, plan_src: Source<'_>, policies: &PolicySet) -> (Report, Option<plan::Plan>) {
    let (plan, mut violations) = match plan::parse(plan_src) {
        Ok(p) => p,
        Err(v) => {
            let report = finish(
                fleet.file(),
                plan_src.name,
                None,
                Vec::new(),
                Vec::new(),
                vec![*v],
                Vec::new(),
                policies,
            );
            return (report, None);
        }
    };
    let (targets, target_violations) = targets::resolve(fleet, &plan.targets, &plan.file);
    let targets_ok = target_violations.is_empty() && !targets.is_empty();
    violations.extend(target_violations);
    let mut mirror_notes = Vec::new();
    if targets_ok {
        violations.extend(role_mismatches(fleet, &plan, &targets));
        violations.extend(live_mirrors(fleet, &plan, &targets, &mut mirror_notes));
    }

    let mut notes = Vec::new();
    let mut waves_out = Vec::new();
    if targets_ok {
        let caps = policies.caps();
        let (waves, locs) = match &plan.waves {
            WaveSpec::Sizes(sizes) => {
                let amounts: Vec<_> = sizes.iter().map(|s| s.value).collect();
                let generated = waves::generate(fleet, &targets, &amounts, &caps);
                notes = generated.notes;
                // Generated waves are checked like explicit ones: a planner
                // bug is refused, never run.
                let (_, coverage) = waves::resolve_explicit(
                    fleet,
                    &targets,
                    &as_explicit(fleet, &generated.waves, &plan.waves_loc),
                    &plan.waves_loc,
                );
                violations.extend(coverage);
                (generated.waves, vec![plan.waves_loc.clone()])
            }
            WaveSpec::Explicit(list) => {
                let (waves, v) = waves::resolve_explicit(fleet, &targets, list, &plan.waves_loc);
                violations.extend(v);
                let locs = list.iter().map(|w| w.loc.clone()).collect();
                (waves, locs)
            }
        };
        violations.extend(waves::check(fleet, &targets, &waves, &locs, &caps));
        violations.extend(policies.check(fleet, &plan, Some((&targets, &waves))));
        waves_out = waves;
    } else {
        violations.extend(policies.check(fleet, &plan, None));
    }
    let target_ids = targets.hosts().iter().map(|h| fleet.id(*h).to_owned()).collect();
    let mut reports = wave_reports(fleet, &waves_out);
    let sizes: Vec<usize> = waves_out.iter().map(Vec::len).collect();
    for (r, limit) in reports.iter_mut().zip(policies.in_flight_limits(&plan, &sizes)) {
        r.max_in_flight = limit;
    }
    for (r, hosts) in reports.iter_mut().zip(&waves_out) {
        r.windows = policies.window_sets(fleet, &plan, hosts);
        r.expected_ms = expected_ms(&plan, hosts.len(), r.max_in_flight);
        if !r.windows.is_empty()
            && crate::windows::next_start(&r.windows, WEEK_REFERENCE_MS, Duration::from_millis(r.expected_ms)).is_none()
        {
            let names: Vec<String> = r.windows.iter().map(crate::windows::WindowSet::describe).collect();
            violations.push(
                Violation::new(
                    Code::WindowUnfit,
                    format!(
                        "wave {} is expected to take up to {} ({} batch(es) of {} host(s), each its steps' time limits, then the bake) and fits no maintenance window ({})",
                        r.index,
                        crate::units::format_duration(Duration::from_millis(r.expected_ms)),
                        r.hosts.len().div_ceil(r.max_in_flight.max(1)),
                        r.max_in_flight,
                        names.join("; ")
                    ),
                )
                .at(&plan.windows_loc.clone().unwrap_or_else(|| plan.waves_loc.clone()))
                .field("windows")
                .hosts(r.hosts.clone())
                .fix("give steps the `timeout` they really need, shorten the bake, raise `max_in_flight`, make the wave smaller, or widen the window"),
            );
        }
    }
    notes.extend(mirror_notes);
    let mut report = finish(
        fleet.file(),
        &plan.file,
        Some(plan.name.clone()),
        target_ids,
        reports,
        violations,
        notes,
        policies,
    );
    report.steps = plan
        .steps
        .iter()
        .map(|s| StepPlan {
            name: s.name.clone(),
            kind: s.kind().into(),
            run: s.run.clone(),
            writes: s.writes.clone(),
            packages: s.packages.as_ref().map(crate::packages::Packages::describe),
            fetch: s.fetch.clone(),
            fetch_writes: s.fetch_writes.clone(),
            reboot: s.reboot,
            max_deletions: s.max_deletions,
            allow_failure: s.allow_failure.clone(),
            only_roles: s.only_roles.iter().map(|r| r.as_str().to_owned()).collect(),
        })
        .collect();
    (report, Some(plan))
}

/// A step that names the roles it is for, and targets of another role: the
/// hosts are named, and the plan is refused (a replica's wipe never reaches
/// a primary because a selection was wider than meant).
fn role_mismatches(fleet: &Fleet, plan: &plan::Plan, targets: &Targets) -> Vec<Violation> {
    let mut out = Vec::new();
    for (i, step) in plan.steps.iter().enumerate().filter(|(_, s)| !s.only_roles.is_empty()) {
        let wrong: Vec<String> = targets
            .hosts()
            .iter()
            .filter(|h| !step.only_roles.contains(&fleet.host(**h).role))
            .map(|h| format!("{} ({})", fleet.id(*h), fleet.host(*h).role))
            .collect();
        if wrong.is_empty() {
            continue;
        }
        let roles: Vec<&str> = step.only_roles.iter().map(|r| r.as_str()).collect();
        let roles = roles.join(", ");
        let ids = targets
            .hosts()
            .iter()
            .filter(|h| !step.only_roles.contains(&fleet.host(**h).role))
            .map(|h| fleet.id(*h).to_owned());
        out.push(
            Violation::new(
                Code::RoleMismatch,
                format!(
                    "step `{}` is only for {roles}, but {} of the targets {} not: {}",
                    step.name,
                    wrong.len(),
                    if wrong.len() == 1 { "is" } else { "are" },
                    wrong.join(", ")
                ),
            )
            .at(&step.only_roles_loc)
            .field(format!("steps[{i}].only_roles"))
            .hosts(ids)
            .fix(format!(
                "narrow the targets to those roles (`targets: {{where: {{role: [{roles}]}}}}`), or put the step for the other hosts in a plan of its own"
            )),
        );
    }
    out
}

/// The targets' backups fed by a live mirror: how each is guarded during
/// its primary's wave (a note), or a violation when it cannot be and the
/// plan does not accept that by name (KDE, 2013: "too perfect a mirror").
fn live_mirrors(fleet: &Fleet, plan: &plan::Plan, targets: &Targets, notes: &mut Vec<String>) -> Vec<Violation> {
    let mut out = Vec::new();
    let accepted = |b: &str| plan.accept_live_mirrors.iter().any(|a| a.value == b);
    for a in &plan.accept_live_mirrors {
        if fleet.lookup(&a.value).is_none() {
            out.push(
                Violation::new(Code::UnknownHost, format!("the inventory has no host `{}`", a.value))
                    .at(&a.loc)
                    .field("accept_live_mirrors")
                    .hosts([a.value.clone()])
                    .fix("name the backup whose live mirror the plan accepts, as the inventory gives it"),
            );
        }
    }
    let mut seen = BTreeSet::new();
    for t in targets.hosts() {
        for b in fleet.direct_backups(*t) {
            let backup = fleet.host(b);
            let Some(m) = &backup.mirror else { continue };
            if !seen.insert((b, *t)) {
                continue;
            }
            let (primary, bid) = (fleet.id(*t), fleet.id(b));
            let feed = m.feed.as_deref().map(|f| format!(" ({f})")).unwrap_or_default();
            if m.guarded() {
                let copy = m.snapshot_paths(&plan.write_set().into_iter().map(str::to_owned).collect::<Vec<_>>());
                let how = match (&m.pause, copy.is_empty()) {
                    (Some(_), true) => "paused before its wave and resumed once the wave is confirmed".to_owned(),
                    (Some(_), false) => format!(
                        "paused before its wave, {} snapshotted, and resumed once the wave is confirmed",
                        copy.join(", ")
                    ),
                    (None, _) => format!(
                        "left running; {} on {bid} snapshotted before its wave and restored if {primary} is rolled back",
                        copy.join(", ")
                    ),
                };
                notes.push(format!("{bid} is fed from {primary} by a live mirror{feed}: {how}"));
            } else if accepted(bid) {
                notes.push(format!(
                    "{bid} is fed from {primary} by a live mirror{feed} that cannot be paused; the plan accepts the risk by name"
                ));
            } else {
                out.push(
                    Violation::new(
                        Code::MirrorUnguarded,
                        format!(
                            "{bid} is fed from target {primary} by a live mirror{feed} that can be neither paused nor snapshotted: damage to {primary} would reach its backup within minutes"
                        ),
                    )
                    .at(&plan.targets.loc.clone().unwrap_or_else(|| crate::violation::Loc::file(&plan.file)))
                    .field("targets")
                    .hosts([primary.to_owned(), bid.to_owned()])
                    .fix(format!(
                        "give {bid}'s `mirror` in the inventory `pause` and `resume` commands or `snapshot_before` paths, leave {primary} out, or accept the risk by name: `accept_live_mirrors: [{bid}]`"
                    )),
                );
            }
        }
    }
    out
}

fn as_explicit(
    fleet: &Fleet,
    waves: &[Vec<HostIdx>],
    loc: &crate::violation::Loc,
) -> Vec<plan::At<Vec<plan::At<String>>>> {
    waves
        .iter()
        .map(|w| plan::At {
            value: w
                .iter()
                .map(|h| plan::At {
                    value: fleet.id(*h).to_owned(),
                    loc: loc.clone(),
                })
                .collect(),
            loc: loc.clone(),
        })
        .collect()
}

/// A fixed instant (Monday 2026-01-05 00:00 UTC): whether a wave can ever
/// fit its windows is asked over the week from here, so that a check is
/// the same whenever it runs.
const WEEK_REFERENCE_MS: i64 = 1_767_571_200_000;

/// How long a wave of `size` hosts takes at most: batches of `limit`
/// hosts, each the sum of the steps' time limits and reboot limits, then
/// the bake.
pub fn expected_ms(plan: &plan::Plan, size: usize, limit: usize) -> u64 {
    let per_host: Duration = plan
        .steps
        .iter()
        .map(|s| {
            s.timeout
                + if s.reboot == plan::Reboot::Never {
                    Duration::ZERO
                } else {
                    s.reboot_timeout
                }
        })
        .sum();
    let batches = size.div_ceil(limit.max(1)) as u32;
    (per_host * batches + plan.health.bake).as_millis() as u64
}

fn wave_reports(fleet: &Fleet, waves: &[Vec<HostIdx>]) -> Vec<WaveReport> {
    waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let groups: BTreeSet<&str> = w
                .iter()
                .flat_map(|h| fleet.host(*h).groups.iter().map(String::as_str))
                .collect();
            let fds: BTreeSet<&str> = w
                .iter()
                .filter_map(|h| fleet.host(*h).failure_domain.as_deref())
                .collect();
            WaveReport {
                index: i + 1,
                hosts: w.iter().map(|h| fleet.id(*h).to_owned()).collect(),
                groups: groups.into_iter().map(str::to_owned).collect(),
                failure_domains: fds.into_iter().map(str::to_owned).collect(),
                backups: w.iter().filter(|h| fleet.host(**h).role == Role::Backup).count(),
                max_in_flight: 0,
                windows: Vec::new(),
                expected_ms: 0,
            }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn finish(
    fleet_file: &str,
    plan_file: &str,
    plan: Option<String>,
    targets: Vec<String>,
    waves: Vec<WaveReport>,
    mut violations: Vec<Violation>,
    notes: Vec<String>,
    policies: &PolicySet,
) -> Report {
    waves::sort_violations(&mut violations);
    violations.dedup();
    Report {
        ok: violations.is_empty(),
        plan,
        plan_file: plan_file.to_owned(),
        fleet_file: fleet_file.to_owned(),
        targets,
        waves,
        violations,
        notes,
        policies: policies.rules().iter().map(|r| r.id.clone()).collect(),
        steps: Vec::new(),
    }
}

/// Targets as a list of ids (for callers that hold a [`Targets`]).
pub fn target_ids(fleet: &Fleet, targets: &Targets) -> Vec<String> {
    targets.hosts().iter().map(|h| fleet.id(*h).to_owned()).collect()
}
