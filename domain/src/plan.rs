//! The patch plan (FORMATS.md "Patch plan"): parsing and the rules the plan
//! language carries on its own, before the inventory or any site policy.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::fleet::Role;
use crate::units::{self, Amount, Scalar};
use crate::violation::{Code, Loc, Violation};
use crate::yaml::{self, Source, loc_of};

/// Waves used when a plan has no `waves:`: a one-host canary, then 10 %, then
/// halves of the targets.
pub const DEFAULT_WAVES: [Amount; 3] = [Amount::Count(1), Amount::Percent(10), Amount::Percent(50)];
/// Step timeout when a step has none.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Bake time when the plan has none.
pub const DEFAULT_BAKE: Duration = Duration::from_secs(10 * 60);
/// Health-check interval during bake when the plan has none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// Health-check timeout when a check has none.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Hosts of a wave with a real step running at once when the plan says
/// nothing: a tenth of the wave, and at least one.
pub const DEFAULT_MAX_IN_FLIGHT: Amount = Amount::Percent(10);
/// How long snapshots are kept after their wave is confirmed healthy.
pub const DEFAULT_RETAIN: Duration = Duration::from_secs(7 * 24 * 3600);

// ---------------------------------------------------------------------------
// The document as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanDoc {
    name: Option<Spanned<String>>,
    description: Option<String>,
    targets: Option<Spanned<TargetsDoc>>,
    steps: Option<Spanned<Vec<Spanned<StepDoc>>>>,
    waves: Option<Spanned<Vec<Spanned<WaveDoc>>>>,
    health: Option<HealthDoc>,
    failure_budget: Option<BudgetDoc>,
    on_failure: Option<Spanned<String>>,
    snapshot: Option<SnapshotDoc>,
    approvals: Option<Spanned<i64>>,
    untouchable: Option<Vec<Spanned<String>>>,
    max_in_flight: Option<Spanned<Scalar>>,
    accept_live_mirrors: Option<Vec<Spanned<String>>>,
    windows: Option<Spanned<Vec<Spanned<crate::windows::WindowDoc>>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetsDoc {
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
    #[serde(default)]
    groups: Vec<Spanned<String>>,
    #[serde(default)]
    labels: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    expect_count: Option<Spanned<i64>>,
    #[serde(rename = "where")]
    narrow: Option<Spanned<WhereDoc>>,
}

/// `targets.where`: conditions every target must meet.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WhereDoc {
    #[serde(default)]
    groups: Vec<Spanned<String>>,
    #[serde(default)]
    labels: BTreeMap<String, Spanned<String>>,
    role: Option<Spanned<OneOrMany>>,
}

/// One word or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(w) => vec![w],
            OneOrMany::Many(ws) => ws,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepDoc {
    name: Option<Spanned<String>>,
    run: Option<Spanned<String>>,
    writes: Option<Spanned<Vec<Spanned<String>>>>,
    max_deletions: Option<Spanned<i64>>,
    timeout: Option<Spanned<Scalar>>,
    dry_run: Option<Spanned<DryRunDoc>>,
    fetch: Option<Spanned<String>>,
    fetch_writes: Option<Spanned<Vec<Spanned<String>>>>,
    packages: Option<Spanned<PackagesDoc>>,
    reboot: Option<Spanned<RebootDoc>>,
    reboot_timeout: Option<Spanned<Scalar>>,
    only_roles: Option<Spanned<OneOrMany>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DryRunDoc {
    allow_failure: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PackagesDoc {
    manager: Option<Spanned<String>>,
    upgrade: Option<Vec<Spanned<String>>>,
    install: Option<BTreeMap<String, Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RebootDoc {
    Flag(bool),
    Word(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaveDoc {
    size: Option<Spanned<Scalar>>,
    hosts: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthDoc {
    #[serde(default)]
    checks: Vec<Spanned<CheckDoc>>,
    bake: Option<Spanned<Scalar>>,
    interval: Option<Spanned<Scalar>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckDoc {
    name: Option<Spanned<String>>,
    tcp: Option<Spanned<String>>,
    http: Option<Spanned<String>>,
    exec: Option<Spanned<String>>,
    expect_status: Option<Spanned<i64>>,
    timeout: Option<Spanned<Scalar>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetDoc {
    canary: Option<Spanned<Scalar>>,
    wave: Option<Spanned<Scalar>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotDoc {
    retain: Option<Spanned<Scalar>>,
}

// ---------------------------------------------------------------------------
// The validated plan.

/// A value and where the operator wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct At<T> {
    /// The value.
    pub value: T,
    /// Where it is written.
    pub loc: Loc,
}

impl<T> At<T> {
    fn from_spanned(file: &str, s: Spanned<T>) -> At<T> {
        let loc = loc_of(file, &s);
        At { value: s.value, loc }
    }
}

/// The plan's target selection, before resolution against an inventory.
#[derive(Clone, Debug, Default)]
pub struct TargetSpec {
    /// Where `targets:` is; `None` when the plan has none.
    pub loc: Option<Loc>,
    /// Hosts named one by one.
    pub hosts: Vec<At<String>>,
    /// Groups whose hosts are all targets.
    pub groups: Vec<At<String>>,
    /// Hosts carrying every one of these labels are targets.
    pub labels: Vec<(String, At<String>)>,
    /// Hosts taken out again.
    pub exclude: Vec<At<String>>,
    /// The number of hosts the selection must resolve to.
    pub expect_count: Option<At<usize>>,
    /// `where:` conditions that narrow the selection: a host stays a target
    /// only if it meets every one.
    pub narrow: Option<Narrow>,
}

/// `targets.where`: the conditions every target must meet.
#[derive(Clone, Debug, Default)]
pub struct Narrow {
    /// Where `where:` is written.
    pub loc: Loc,
    /// Groups a target must be in, every one of them.
    pub groups: Vec<At<String>>,
    /// Labels a target must carry, every one of them.
    pub labels: Vec<(String, At<String>)>,
    /// Roles a target may have (any of them); empty: any role.
    pub roles: Vec<Role>,
}

impl TargetSpec {
    /// Whether the plan selects anything at all (before resolution).
    pub fn selects_anything(&self) -> bool {
        !(self.hosts.is_empty() && self.groups.is_empty() && self.labels.is_empty())
    }
}

/// One step of a plan.
#[derive(Clone, Debug)]
pub struct Step {
    /// Name, unique in the plan.
    pub name: String,
    /// The command, run by `/bin/sh -c` on the host.
    pub run: String,
    /// Absolute, normalised paths the step may change.
    pub writes: Vec<String>,
    /// Files the step may delete per host.
    pub max_deletions: u64,
    /// How long the step may run.
    pub timeout: Duration,
    /// Where the step is written.
    pub loc: Loc,
    /// Where its `run` is written.
    pub run_loc: Loc,
    /// Where its `writes` is written (the step when absent).
    pub writes_loc: Loc,
    /// Why a failing dry-run of this step is acceptable (`dry_run:
    /// allow_failure:`); without it, a dry-run that fails blocks the step.
    pub allow_failure: Option<String>,
    /// A command run before the dry-run, with the network, that may write
    /// only `fetch_writes` (a package cache, say), so that the step itself
    /// needs no network.
    pub fetch: Option<String>,
    /// What the fetch may write.
    pub fetch_writes: Vec<String>,
    /// A package step: what it upgrades or installs. Its `run` and `fetch`
    /// are generated, and its write set is the package manager's state plus
    /// the packages' files on each host.
    pub packages: Option<crate::packages::Packages>,
    /// Whether the host reboots after the step.
    pub reboot: Reboot,
    /// How long the host may take to come back after its reboot.
    pub reboot_timeout: Duration,
    /// The roles the step is for (`only_roles`); empty: every role. Checked
    /// against the inventory at plan check and by each agent against its
    /// own role before the step runs.
    pub only_roles: Vec<Role>,
    /// Where `only_roles` is written (the step when absent).
    pub only_roles_loc: Loc,
}

impl Step {
    /// What kind of step it is, as `plan check` names it: `packages` for a
    /// package step, `run` for a command. A new kind of step names itself
    /// here.
    pub fn kind(&self) -> &'static str {
        if self.packages.is_some() { "packages" } else { "run" }
    }
}

/// Whether a step ends with a reboot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reboot {
    /// Never.
    #[default]
    Never,
    /// Always.
    Always,
    /// When the host says it needs one (`/run/reboot-required`, or
    /// `needs-restarting -r`).
    IfRequired,
}

impl Reboot {
    /// Its name in a plan.
    pub fn as_str(self) -> &'static str {
        match self {
            Reboot::Never => "never",
            Reboot::Always => "always",
            Reboot::IfRequired => "if-required",
        }
    }
}

/// How long a host may take to come back after a reboot when the plan does
/// not say.
pub const DEFAULT_REBOOT_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// How the waves are given.
#[derive(Clone, Debug)]
pub enum WaveSpec {
    /// Sizes, one per wave; the last repeats until every target is placed.
    Sizes(Vec<At<Amount>>),
    /// Explicit host lists, one per wave.
    Explicit(Vec<At<Vec<At<String>>>>),
}

/// What a health check probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connect to `host:port`.
    Tcp(String),
    /// An HTTP GET answered with this status.
    Http {
        /// URL to fetch.
        url: String,
        /// Status that means healthy.
        expect_status: u16,
    },
    /// A command that exits 0.
    Exec(String),
}

/// One health check.
#[derive(Clone, Debug)]
pub struct HealthCheck {
    /// Name, unique in the plan.
    pub name: String,
    /// What it probes.
    pub kind: CheckKind,
    /// How long one probe may take.
    pub timeout: Duration,
}

/// The health gate of every wave.
#[derive(Clone, Debug)]
pub struct Health {
    /// Checks run on every host.
    pub checks: Vec<HealthCheck>,
    /// How long a wave must stay healthy.
    pub bake: Duration,
    /// Where `bake` is written (the file when absent).
    pub bake_loc: Loc,
    /// Time between checks during bake.
    pub interval: Duration,
}

/// Failed hosts tolerated before a halt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureBudget {
    /// In the first wave.
    pub canary: Amount,
    /// In every later wave.
    pub wave: Amount,
}

/// What happens when a wave exceeds its failure budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Restore the failed hosts from their snapshots, then halt.
    Rollback,
    /// Halt and leave the hosts as they are (also what a record written
    /// before the field existed meant).
    #[default]
    Halt,
}

impl OnFailure {
    /// Its name in a plan.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Rollback => "rollback",
            OnFailure::Halt => "halt",
        }
    }
}

/// A parsed, self-consistent patch plan.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The file it came from.
    pub file: String,
    /// Plan name.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// Target selection.
    pub targets: TargetSpec,
    /// Steps, in order.
    pub steps: Vec<Step>,
    /// Wave sizes or explicit waves.
    pub waves: WaveSpec,
    /// Where `waves:` is written (the file when absent).
    pub waves_loc: Loc,
    /// Health gate.
    pub health: Health,
    /// Failure budgets.
    pub failure_budget: FailureBudget,
    /// Reaction to a failure beyond budget.
    pub on_failure: OnFailure,
    /// How long snapshots are kept after confirmation.
    pub snapshot_retain: Duration,
    /// Distinct approvers needed, never the submitter.
    pub approvals: u32,
    /// Where `approvals` is written (the file when absent).
    pub approvals_loc: Loc,
    /// Host paths no step of this plan may change (a network share, a
    /// FUSE mount, a database it must not touch): read-only in the dry-run
    /// and in the real run, and never in a snapshot.
    pub untouchable: Vec<At<String>>,
    /// Hosts of a wave with a real step running at once, as written (none:
    /// [`DEFAULT_MAX_IN_FLIGHT`]); see [`in_flight_limit`].
    pub max_in_flight: Option<At<Amount>>,
    /// Backups fed by a live mirror that cannot be paused, whose risk the
    /// plan accepts by name: their primaries' waves run while the mirror
    /// copies.
    pub accept_live_mirrors: Vec<At<String>>,
    /// Maintenance windows every wave must fit in (none: any time).
    pub windows: Vec<crate::windows::Window>,
    /// Where `windows:` is written.
    pub windows_loc: Option<Loc>,
}

/// How many of a wave's `size` hosts may have a real step running at once
/// under `amount`: a share is rounded up, and the answer is at least one
/// and at most the wave.
pub fn in_flight_limit(amount: Amount, size: usize) -> usize {
    amount.of(size).min(size).max(1)
}

impl Plan {
    /// Every `writes` path of every step, deduplicated and sorted: what
    /// every host's snapshot holds at least (package steps add their
    /// packages' files on each host).
    pub fn write_set(&self) -> BTreeSet<&str> {
        self.steps
            .iter()
            .flat_map(|s| s.writes.iter().map(String::as_str))
            .collect()
    }
}

/// Parse a plan. A YAML-level failure is returned as the only violation;
/// otherwise the plan comes back with every problem found in its fields
/// (invalid values are replaced by their defaults so later checks can run).
pub fn parse(source: Source<'_>) -> Result<(Plan, Vec<Violation>), Box<Violation>> {
    let doc: PlanDoc = yaml::parse(source, "plan")?;
    let mut v = Vec::new();
    let plan = from_doc(source.name, doc, &mut v);
    Ok((plan, v))
}

fn parse_error(loc: &Loc, field: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) -> Violation {
    Violation::new(Code::ParseError, message).at(loc).field(field).fix(fix)
}

fn duration(
    file: &str,
    raw: Option<Spanned<Scalar>>,
    field: &str,
    default: Duration,
    v: &mut Vec<Violation>,
) -> Duration {
    let Some(raw) = raw else { return default };
    match units::parse_duration(&raw.value) {
        Ok(d) => d,
        Err(e) => {
            v.push(parse_error(
                &loc_of(file, &raw),
                field,
                format!("`{field}`: {e}"),
                "durations look like `30s`, `10m`, `72h`",
            ));
            default
        }
    }
}

fn from_doc(file: &str, doc: PlanDoc, v: &mut Vec<Violation>) -> Plan {
    let whole = Loc::file(file);
    let name = match doc.name {
        Some(n) if n.value.chars().any(crate::text::is_active) => {
            v.push(parse_error(
                &loc_of(file, &n),
                "name",
                format!(
                    "the plan name `{}` contains a control character",
                    crate::text::inert(&n.value)
                ),
                "write the name in plain text: it is shown on operators' terminals",
            ));
            crate::text::inert(&n.value).into_owned()
        }
        Some(n) if !n.value.trim().is_empty() => n.value,
        Some(n) => {
            v.push(parse_error(
                &loc_of(file, &n),
                "name",
                "the plan name is empty",
                "give the plan a name, like `name: mailfix-2012-06-20`",
            ));
            String::new()
        }
        None => {
            v.push(parse_error(
                &whole,
                "name",
                "the plan has no `name`",
                "add `name: <what this plan does>` at the top",
            ));
            String::new()
        }
    };

    let targets = match doc.targets {
        None => TargetSpec::default(),
        Some(t) => {
            let loc = loc_of(file, &t);
            let t = t.value;
            let expect_count = t.expect_count.and_then(|c| {
                let at = loc_of(file, &c);
                match usize::try_from(c.value) {
                    Ok(n) if n > 0 => Some(At { value: n, loc: at }),
                    _ => {
                        v.push(parse_error(
                            &at,
                            "targets.expect_count",
                            format!("`expect_count: {}` is not a positive count", c.value),
                            "write the number of hosts you expect the targets to resolve to",
                        ));
                        None
                    }
                }
            });
            TargetSpec {
                loc: Some(loc),
                hosts: t.hosts.into_iter().map(|s| At::from_spanned(file, s)).collect(),
                groups: t.groups.into_iter().map(|s| At::from_spanned(file, s)).collect(),
                labels: t
                    .labels
                    .into_iter()
                    .map(|(k, s)| (k, At::from_spanned(file, s)))
                    .collect(),
                exclude: t.exclude.into_iter().map(|s| At::from_spanned(file, s)).collect(),
                expect_count,
                narrow: t.narrow.map(|w| narrow(file, w, v)),
            }
        }
    };

    let steps = steps(file, doc.steps, v);
    let (waves, waves_loc) = waves(file, doc.waves, v);
    let health = health(file, doc.health, v);

    let budget = |raw: Option<Spanned<Scalar>>, field: &str, v: &mut Vec<Violation>| match raw {
        None => Amount::Count(0),
        Some(raw) => units::parse_amount(&raw.value, true).unwrap_or_else(|e| {
            v.push(parse_error(
                &loc_of(file, &raw),
                field,
                format!("`{field}`: {e}"),
                "a budget is a count of failed hosts tolerated (`0`) or a share (`10%`)",
            ));
            Amount::Count(0)
        }),
    };
    let failure_budget = match doc.failure_budget {
        None => FailureBudget {
            canary: Amount::Count(0),
            wave: Amount::Count(0),
        },
        Some(b) => FailureBudget {
            canary: budget(b.canary, "failure_budget.canary", v),
            wave: budget(b.wave, "failure_budget.wave", v),
        },
    };

    let on_failure = match doc.on_failure.as_ref().map(|s| s.value.as_str()) {
        None | Some("rollback") => OnFailure::Rollback,
        Some("halt") => OnFailure::Halt,
        Some(other) => {
            let loc = doc.on_failure.as_ref().map(|s| loc_of(file, s)).unwrap_or_default();
            v.push(parse_error(
                &loc,
                "on_failure",
                format!("`on_failure: {other}` is not a choice"),
                "write `on_failure: rollback` (restore failed hosts, then halt) or `on_failure: halt`",
            ));
            OnFailure::Rollback
        }
    };

    let snapshot_retain = match doc.snapshot {
        None => DEFAULT_RETAIN,
        Some(s) => duration(file, s.retain, "snapshot.retain", DEFAULT_RETAIN, v),
    };

    let (approvals, approvals_loc) = match doc.approvals {
        None => (1, whole.clone()),
        Some(a) => {
            let loc = loc_of(file, &a);
            match u32::try_from(a.value) {
                Ok(n) if n >= 1 => (n, loc),
                _ => {
                    v.push(
                        Violation::new(
                            Code::ApprovalsInvalid,
                            format!(
                                "`approvals: {}` would let a plan run without a second person seeing it",
                                a.value
                            ),
                        )
                        .at(&loc)
                        .field("approvals")
                        .fix("write `approvals: 1` or more; the submitter never counts as an approver"),
                    );
                    (1, loc)
                }
            }
        }
    };

    let mut untouchable = Vec::new();
    for (i, p) in doc.untouchable.into_iter().flatten().enumerate() {
        let at = loc_of(file, &p);
        match normalise_write_path(&p.value) {
            Ok(norm) => untouchable.push(At { value: norm, loc: at }),
            Err(why) => v.push(parse_error(
                &at,
                format!("untouchable[{i}]"),
                format!("`untouchable` path `{}` {why}", p.value),
                "list absolute paths no step may change, like `/srv/nfs`",
            )),
        }
    }
    for (i, step) in steps.iter().enumerate() {
        for w in &step.writes {
            if let Some(u) = untouchable.iter().find(|u| within(w, &u.value)) {
                v.push(
                    Violation::new(
                        Code::WritesInvalid,
                        format!(
                            "step `{}`: `writes` path `{w}` is inside `{}`, which the plan marks untouchable (at {})",
                            step.name, u.value, u.loc
                        ),
                    )
                    .at(&step.writes_loc)
                    .field(format!("steps[{i}].writes"))
                    .fix("take the path out of `writes`, or out of `untouchable` if the step may change it"),
                );
            }
        }
    }

    let max_in_flight = doc.max_in_flight.and_then(|raw| {
        let loc = loc_of(file, &raw);
        match units::parse_amount(&raw.value, false) {
            Ok(Amount::Count(0) | Amount::Percent(0)) => {
                v.push(parse_error(
                    &loc,
                    "max_in_flight",
                    "`max_in_flight: 0` would never start a host",
                    "write a positive count (`5`) or a share of each wave (`10%`)",
                ));
                None
            }
            Ok(amount) => Some(At { value: amount, loc }),
            Err(e) => {
                v.push(parse_error(
                    &loc,
                    "max_in_flight",
                    format!("`max_in_flight`: {e}"),
                    "write how many hosts of a wave may run a step at once: a count (`5`) or a share of the wave (`10%`)",
                ));
                None
            }
        }
    });

    Plan {
        file: file.to_owned(),
        name,
        description: doc.description,
        targets,
        steps,
        waves,
        waves_loc,
        health,
        failure_budget,
        on_failure,
        snapshot_retain,
        approvals,
        approvals_loc,
        untouchable,
        max_in_flight,
        windows_loc: doc.windows.as_ref().map(|w| loc_of(file, w)),
        windows: doc
            .windows
            .map(|w| crate::windows::from_docs(file, w.value, "windows", v))
            .unwrap_or_default(),
        accept_live_mirrors: doc
            .accept_live_mirrors
            .unwrap_or_default()
            .into_iter()
            .map(|s| At::from_spanned(file, s))
            .collect(),
    }
}

pub use crate::paths::within;

fn steps(file: &str, doc: Option<Spanned<Vec<Spanned<StepDoc>>>>, v: &mut Vec<Violation>) -> Vec<Step> {
    let Some(list) = doc else {
        v.push(parse_error(
            &Loc::file(file),
            "steps",
            "the plan has no `steps`",
            "add `steps:` with at least one step (`name`, `run`, `writes`)",
        ));
        return Vec::new();
    };
    if list.value.is_empty() {
        v.push(parse_error(
            &loc_of(file, &list),
            "steps",
            "the plan's `steps` list is empty",
            "add at least one step (`name`, `run`, `writes`)",
        ));
    }
    let mut seen_names = BTreeMap::new();
    let mut out = Vec::with_capacity(list.value.len());
    for (i, step) in list.value.into_iter().enumerate() {
        let loc = loc_of(file, &step);
        let s = step.value;
        let field = format!("steps[{i}]");
        let name = match s.name {
            Some(n) if n.value.chars().any(crate::text::is_active) => {
                v.push(parse_error(
                    &loc_of(file, &n),
                    format!("{field}.name"),
                    format!(
                        "step name `{}` contains a control character",
                        crate::text::inert(&n.value)
                    ),
                    "write the name in plain text: it is shown on operators' terminals",
                ));
                crate::text::inert(&n.value).into_owned()
            }
            Some(n) if !n.value.trim().is_empty() => {
                let at = loc_of(file, &n);
                if let Some(first) = seen_names.insert(n.value.clone(), at.clone()) {
                    v.push(parse_error(
                        &at,
                        format!("{field}.name"),
                        format!("step name `{}` is used twice (first at {first})", n.value),
                        "give every step its own name; the audit log and the agent journal refer to steps by name",
                    ));
                }
                n.value
            }
            _ => {
                v.push(parse_error(
                    &loc,
                    format!("{field}.name"),
                    format!("step {} has no name", i + 1),
                    "add `name: <what the step does>`",
                ));
                format!("step {}", i + 1)
            }
        };
        let packages = s.packages.map(|p| packages(file, &field, &name, p, v));
        let (run, run_loc) = match (s.run, &packages) {
            (Some(r), Some(_)) => {
                v.push(parse_error(
                    &loc_of(file, &r),
                    format!("{field}.run"),
                    format!("step `{name}` has both `run` and `packages`"),
                    "a package step's command is made by wavegate; remove `run`, or make it a step of its own",
                ));
                (r.value, loc.clone())
            }
            (None, Some((p, ploc))) => (p.as_ref().map(|p| p.run_command()).unwrap_or_default(), ploc.clone()),
            (Some(r), None) if !r.value.trim().is_empty() => {
                let at = loc_of(file, &r);
                (r.value, at)
            }
            _ => {
                v.push(parse_error(
                    &loc,
                    format!("{field}.run"),
                    format!("step `{name}` has no `run` command"),
                    "add `run: <command>` (it is run by /bin/sh -c on each target), or `packages:` for a package step",
                ));
                (String::new(), loc.clone())
            }
        };
        let package_step = packages.is_some();
        let packages = packages.and_then(|(p, _)| p);
        let (writes, writes_loc) = match s.writes {
            // A package step's write set is its package manager's state and
            // its packages' files; `writes` may add to it. (A broken
            // `packages:` has been reported already.)
            None if package_step => {
                let state = packages.as_ref().map(|p| p.manager.state_paths()).unwrap_or_default();
                (state.iter().map(|p| (*p).to_owned()).collect(), loc.clone())
            }
            None => {
                v.push(
                    Violation::new(Code::WritesMissing, format!("step `{name}` does not declare what it may change"))
                        .at(&loc)
                        .field(format!("{field}.writes"))
                        .fix("add `writes: [/absolute/path, ...]` listing every path the step may change; it bounds the dry-run, the confinement and the snapshot"),
                );
                (Vec::new(), loc.clone())
            }
            Some(w) => {
                let wloc = loc_of(file, &w);
                if w.value.is_empty() {
                    v.push(
                        Violation::new(Code::WritesMissing, format!("step `{name}` has an empty `writes` list"))
                            .at(&wloc)
                            .field(format!("{field}.writes"))
                            .fix("list every absolute path the step may change"),
                    );
                }
                let mut paths = BTreeSet::new();
                for (j, p) in w.value.into_iter().enumerate() {
                    let ploc = loc_of(file, &p);
                    match normalise_write_path(&p.value) {
                        Ok(norm) => {
                            paths.insert(norm);
                        }
                        Err(why) => v.push(
                            Violation::new(
                                Code::WritesInvalid,
                                format!("step `{name}`: `writes` path `{}` {why}", p.value),
                            )
                            .at(&ploc)
                            .field(format!("{field}.writes[{j}]"))
                            .fix("write the exact absolute directories or files the step changes, like `/etc/postfix`"),
                        ),
                    }
                }
                if let Some(p) = &packages {
                    paths.extend(p.manager.state_paths().iter().map(|p| (*p).to_owned()));
                }
                (paths.into_iter().collect(), wloc)
            }
        };
        let allow_failure = s.dry_run.and_then(|d| {
            let dloc = loc_of(file, &d);
            match d.value.allow_failure {
                // The reason is shown in every dry-run summary, one line
                // each; a folded block's final newline is not a second line.
                Some(a) if a.value.trim_end().chars().any(crate::text::is_active) => {
                    v.push(parse_error(
                        &loc_of(file, &a),
                        format!("{field}.dry_run.allow_failure"),
                        format!(
                            "step `{name}`: `allow_failure` `{}` contains a control character",
                            crate::text::inert(&a.value)
                        ),
                        "write the reason in plain text on one line: it is shown on operators' terminals",
                    ));
                    None
                }
                Some(a) if !a.value.trim().is_empty() => Some(a.value),
                Some(a) => {
                    v.push(parse_error(
                        &loc_of(file, &a),
                        format!("{field}.dry_run.allow_failure"),
                        format!("step `{name}`: `allow_failure` gives no reason"),
                        "say why a failing dry-run of this step is acceptable, like `allow_failure: \"needs the license server\"`",
                    ));
                    None
                }
                None => {
                    v.push(parse_error(
                        &dloc,
                        format!("{field}.dry_run"),
                        format!("step `{name}`: `dry_run` says nothing"),
                        "write `dry_run: {allow_failure: \"why a failing dry-run is acceptable\"}`, or remove `dry_run`",
                    ));
                    None
                }
            }
        });
        let (fetch, fetch_writes) = fetch_fields(file, &field, &name, s.fetch, s.fetch_writes, packages.as_ref(), v);
        let reboot = match s.reboot.as_ref().map(|r| &r.value) {
            None | Some(RebootDoc::Flag(false)) => Reboot::Never,
            Some(RebootDoc::Flag(true)) => Reboot::Always,
            Some(RebootDoc::Word(w)) if w == "if-required" => Reboot::IfRequired,
            Some(RebootDoc::Word(w)) => {
                let rloc = s.reboot.as_ref().map(|r| loc_of(file, r)).unwrap_or_default();
                v.push(parse_error(
                    &rloc,
                    format!("{field}.reboot"),
                    format!("step `{name}`: `reboot: {w}` is not a choice"),
                    "write `reboot: true`, `reboot: false` or `reboot: if-required`",
                ));
                Reboot::Never
            }
        };
        if let (Reboot::Never, Some(t)) = (reboot, &s.reboot_timeout) {
            v.push(parse_error(
                &loc_of(file, t),
                format!("{field}.reboot_timeout"),
                format!("step `{name}` has a `reboot_timeout` but does not reboot"),
                "remove `reboot_timeout`, or add `reboot: true` or `reboot: if-required`",
            ));
        }
        let reboot_timeout = duration(
            file,
            s.reboot_timeout,
            &format!("{field}.reboot_timeout"),
            DEFAULT_REBOOT_TIMEOUT,
            v,
        );
        let max_deletions = match s.max_deletions {
            None => 0,
            Some(m) => u64::try_from(m.value).unwrap_or_else(|_| {
                v.push(parse_error(
                    &loc_of(file, &m),
                    format!("{field}.max_deletions"),
                    format!("`max_deletions: {}` is negative", m.value),
                    "write how many files the step may delete per host (0 or more)",
                ));
                0
            }),
        };
        let timeout = duration(file, s.timeout, &format!("{field}.timeout"), DEFAULT_STEP_TIMEOUT, v);
        let (only_roles, only_roles_loc) = match s.only_roles {
            None => (Vec::new(), loc.clone()),
            Some(r) => role_list(
                file,
                r,
                &format!("{field}.only_roles"),
                (
                    &format!("step `{name}` has an empty `only_roles`: it would be for no host"),
                    "name the roles the step is for (`only_roles: [backup]`), or remove the field for every role",
                ),
                v,
            ),
        };
        out.push(Step {
            name,
            run,
            writes,
            max_deletions,
            timeout,
            loc,
            run_loc,
            writes_loc,
            allow_failure,
            fetch,
            fetch_writes,
            packages,
            reboot,
            reboot_timeout,
            only_roles,
            only_roles_loc,
        });
    }
    out
}

/// A role or a list of roles as written, checked: an empty list is
/// reported with `empty` (its message and fix), an unknown role by name.
fn role_list(
    file: &str,
    r: Spanned<OneOrMany>,
    field: &str,
    empty: (&str, &str),
    v: &mut Vec<Violation>,
) -> (Vec<Role>, Loc) {
    let at = loc_of(file, &r);
    let words = r.value.into_vec();
    if words.is_empty() {
        v.push(parse_error(&at, field, empty.0, empty.1));
    }
    (roles(&at, field, words, v), at)
}

/// Role names, each checked; an unknown one is reported at `at`.
fn roles(at: &Loc, field: &str, words: Vec<String>, v: &mut Vec<Violation>) -> Vec<Role> {
    let mut out = Vec::new();
    for w in words {
        match Role::parse(&w) {
            Some(r) if !out.contains(&r) => out.push(r),
            Some(_) => {}
            None => v.push(parse_error(
                at,
                field,
                format!("`{}` is not a role", crate::text::inert(&w)),
                "a role is `primary`, `backup` or `standalone`, as the inventory gives it",
            )),
        }
    }
    out
}

/// `targets.where`, checked.
fn narrow(file: &str, w: Spanned<WhereDoc>, v: &mut Vec<Violation>) -> Narrow {
    let loc = loc_of(file, &w);
    let w = w.value;
    if w.groups.is_empty() && w.labels.is_empty() && w.role.is_none() {
        v.push(parse_error(
            &loc,
            "targets.where",
            "`targets.where` has no condition",
            "give it `groups`, `labels` or `role` (a target must meet every one), or remove it",
        ));
    }
    let roles = match w.role {
        None => Vec::new(),
        Some(r) => {
            role_list(
                file,
                r,
                "targets.where.role",
                (
                    "`targets.where.role` is an empty list: no host would be a target",
                    "name a role (`role: backup`) or several (`role: [backup, standalone]`)",
                ),
                v,
            )
            .0
        }
    };
    Narrow {
        loc,
        groups: w.groups.into_iter().map(|s| At::from_spanned(file, s)).collect(),
        labels: w
            .labels
            .into_iter()
            .map(|(k, s)| (k, At::from_spanned(file, s)))
            .collect(),
        roles,
    }
}

/// A step's `packages:`, checked; the location is the block's.
fn packages(
    file: &str,
    field: &str,
    name: &str,
    doc: Spanned<PackagesDoc>,
    v: &mut Vec<Violation>,
) -> (Option<crate::packages::Packages>, Loc) {
    use crate::packages::{Manager, Packages, valid_name, valid_version};
    let loc = loc_of(file, &doc);
    let p = doc.value;
    let before = v.len();
    let manager = match &p.manager {
        Some(m) => match Manager::parse(&m.value) {
            Some(mgr) => Some(mgr),
            None => {
                v.push(parse_error(
                    &loc_of(file, m),
                    format!("{field}.packages.manager"),
                    format!(
                        "step `{name}`: `manager: {}` is not a package manager wavegate knows",
                        m.value
                    ),
                    "write `manager: apt` (Debian, Ubuntu) or `manager: dnf` (Fedora, RHEL)",
                ));
                None
            }
        },
        None => {
            v.push(parse_error(
                &loc,
                format!("{field}.packages.manager"),
                format!("step `{name}`: `packages` names no `manager`"),
                "add `manager: apt` or `manager: dnf`",
            ));
            None
        }
    };
    let mut upgrade = Vec::new();
    for (j, n) in p.upgrade.into_iter().flatten().enumerate() {
        if valid_name(&n.value) {
            upgrade.push(n.value);
        } else {
            v.push(parse_error(
                &loc_of(file, &n),
                format!("{field}.packages.upgrade[{j}]"),
                format!("step `{name}`: `{}` is not a package name", n.value),
                "write package names as the package manager spells them, like `postfix` or `libssl3`",
            ));
        }
    }
    let mut install = Vec::new();
    for (n, ver) in p.install.into_iter().flatten() {
        if !valid_name(&n) {
            v.push(parse_error(
                &loc_of(file, &ver),
                format!("{field}.packages.install.{n}"),
                format!("step `{name}`: `{n}` is not a package name"),
                "write package names as the package manager spells them, like `postfix` or `libssl3`",
            ));
        } else if !valid_version(&ver.value) {
            v.push(parse_error(
                &loc_of(file, &ver),
                format!("{field}.packages.install.{n}"),
                format!("step `{name}`: `{}` is not a version of `{n}`", ver.value),
                "write the exact version to install, in quotes, like `openssl: \"3.0.15-1~deb12u1\"`",
            ));
        } else {
            install.push((n, ver.value));
        }
    }
    if upgrade.is_empty() && install.is_empty() && v.len() == before {
        v.push(parse_error(
            &loc,
            format!("{field}.packages"),
            format!("step `{name}`: `packages` names no package"),
            "add `upgrade: [postfix]` or `install: {openssl: \"3.0.15-1\"}`",
        ));
    }
    let pk = manager.filter(|_| v.len() == before).map(|manager| Packages {
        manager,
        upgrade,
        install,
    });
    (pk, loc)
}

/// A step's `fetch` and `fetch_writes`, checked (a package step has its
/// own fetch).
fn fetch_fields(
    file: &str,
    field: &str,
    name: &str,
    fetch: Option<Spanned<String>>,
    writes: Option<Spanned<Vec<Spanned<String>>>>,
    packages: Option<&crate::packages::Packages>,
    v: &mut Vec<Violation>,
) -> (Option<String>, Vec<String>) {
    if let Some(p) = packages {
        if let Some(f) = &fetch {
            v.push(parse_error(
                &loc_of(file, f),
                format!("{field}.fetch"),
                format!("step `{name}` is a package step and has a `fetch` of its own"),
                "remove `fetch`: a package step fetches its packages itself",
            ));
        }
        let mut w: Vec<String> = p.manager.fetch_writes().iter().map(|s| (*s).to_owned()).collect();
        // What the plan adds is checked like any write path: a `..` would
        // climb out of where a fetch may write.
        for (j, x) in writes.into_iter().flat_map(|w| w.value).enumerate() {
            match normalise_write_path(&x.value) {
                Ok(n) => w.push(n),
                Err(why) => v.push(
                    Violation::new(
                        Code::WritesInvalid,
                        format!("step `{name}`: `fetch_writes` path `{}` {why}", x.value),
                    )
                    .at(&loc_of(file, &x))
                    .field(format!("{field}.fetch_writes[{j}]"))
                    .fix("write the exact absolute directories the fetch fills, like `/var/cache/apt`"),
                ),
            }
        }
        return (Some(p.fetch_command()), w);
    }
    match (fetch, writes) {
        (None, None) => (None, Vec::new()),
        (None, Some(w)) => {
            v.push(parse_error(
                &loc_of(file, &w),
                format!("{field}.fetch_writes"),
                format!("step `{name}` has `fetch_writes` but no `fetch`"),
                "add the `fetch:` command that writes them, or remove `fetch_writes`",
            ));
            (None, Vec::new())
        }
        (Some(f), None) => {
            v.push(
                Violation::new(Code::WritesMissing, format!("step `{name}`: its `fetch` does not declare what it may write"))
                    .at(&loc_of(file, &f))
                    .field(format!("{field}.fetch_writes"))
                    .fix("add `fetch_writes: [/var/cache/...]`, the paths the fetch may write; nothing else is writable for it"),
            );
            (Some(f.value), Vec::new())
        }
        (Some(f), Some(w)) if f.value.trim().is_empty() => {
            v.push(parse_error(
                &loc_of(file, &f),
                format!("{field}.fetch"),
                format!("step `{name}` has an empty `fetch`"),
                "write the command that fetches what the step needs, or remove `fetch` and `fetch_writes`",
            ));
            let _ = w;
            (None, Vec::new())
        }
        (Some(f), Some(w)) => {
            let mut out = Vec::new();
            for (j, p) in w.value.into_iter().enumerate() {
                match normalise_write_path(&p.value) {
                    Ok(n) => out.push(n),
                    Err(why) => v.push(
                        Violation::new(
                            Code::WritesInvalid,
                            format!("step `{name}`: `fetch_writes` path `{}` {why}", p.value),
                        )
                        .at(&loc_of(file, &p))
                        .field(format!("{field}.fetch_writes[{j}]"))
                        .fix("write the exact absolute directories the fetch fills, like `/var/cache/apt`"),
                    ),
                }
            }
            (Some(f.value), out)
        }
    }
}

/// Normalise a `writes` path, or say why it is refused.
pub fn normalise_write_path(p: &str) -> Result<String, &'static str> {
    if p.is_empty() {
        return Err("is empty");
    }
    if !p.starts_with('/') {
        return Err("is relative; the write set must be absolute paths");
    }
    if p.chars().any(|c| c.is_control()) {
        return Err("contains a control character");
    }
    if p.contains(['*', '?', '[', ']', '{', '}']) {
        return Err("contains a wildcard; the write set is explicit paths, not patterns");
    }
    let mut parts = Vec::new();
    for part in p.split('/').filter(|s| !s.is_empty()) {
        if part == "." || part == ".." {
            return Err("contains `.` or `..`; write the path it means");
        }
        parts.push(part);
    }
    if parts.is_empty() {
        return Err("is the whole filesystem; a step may never change `/`");
    }
    Ok(format!("/{}", parts.join("/")))
}

fn waves(file: &str, doc: Option<Spanned<Vec<Spanned<WaveDoc>>>>, v: &mut Vec<Violation>) -> (WaveSpec, Loc) {
    let default = || {
        WaveSpec::Sizes(
            DEFAULT_WAVES
                .iter()
                .map(|a| At {
                    value: *a,
                    loc: Loc::file(file),
                })
                .collect(),
        )
    };
    let Some(list) = doc else {
        return (default(), Loc::file(file));
    };
    let loc = loc_of(file, &list);
    if list.value.is_empty() {
        v.push(
            Violation::new(Code::WaveInvalid, "`waves:` is an empty list")
                .at(&loc)
                .field("waves")
                .fix("remove `waves:` to use the default waves (1, 10%, 50%), or list wave sizes like `- size: 1`"),
        );
        return (default(), loc);
    }
    let mut sizes = Vec::new();
    let mut explicit = Vec::new();
    for (i, wave) in list.value.into_iter().enumerate() {
        let wloc = loc_of(file, &wave);
        let field = format!("waves[{i}]");
        match (wave.value.size, wave.value.hosts) {
            (Some(size), None) => {
                let sloc = loc_of(file, &size);
                match units::parse_amount(&size.value, false) {
                    Ok(a) => sizes.push(At { value: a, loc: sloc }),
                    Err(e) => v.push(parse_error(
                        &sloc,
                        format!("{field}.size"),
                        format!("wave {}: {e}", i + 1),
                        "sizes look like `1`, `10` or `25%`",
                    )),
                }
            }
            (None, Some(hosts)) => {
                if hosts.is_empty() {
                    v.push(
                        Violation::new(Code::WaveInvalid, format!("wave {} lists no hosts", i + 1))
                            .at(&wloc)
                            .field(format!("{field}.hosts"))
                            .fix("list the wave's hosts, or remove the wave"),
                    );
                }
                explicit.push(At {
                    value: hosts.into_iter().map(|h| At::from_spanned(file, h)).collect(),
                    loc: wloc,
                });
            }
            (Some(_), Some(_)) => v.push(parse_error(
                &wloc,
                field,
                format!("wave {} has both `size` and `hosts`", i + 1),
                "give each wave either `size: N` or `hosts: [...]`, not both",
            )),
            (None, None) => v.push(parse_error(
                &wloc,
                field,
                format!("wave {} has neither `size` nor `hosts`", i + 1),
                "write `- size: 1`, `- size: 25%` or `- hosts: [p09]`",
            )),
        }
    }
    match (sizes.is_empty(), explicit.is_empty()) {
        (false, false) => {
            v.push(
                Violation::new(Code::WaveInvalid, "`waves:` mixes sizes and explicit host lists")
                    .at(&loc)
                    .field("waves")
                    .fix("either give every wave a `size`, or list every wave's `hosts` (explicit waves must place every target)"),
            );
            (WaveSpec::Sizes(sizes), loc)
        }
        (true, false) => (WaveSpec::Explicit(explicit), loc),
        (false, true) => (WaveSpec::Sizes(sizes), loc),
        (true, true) => (default(), loc),
    }
}

fn health(file: &str, doc: Option<HealthDoc>, v: &mut Vec<Violation>) -> Health {
    let Some(h) = doc else {
        return Health {
            checks: Vec::new(),
            bake: DEFAULT_BAKE,
            bake_loc: Loc::file(file),
            interval: DEFAULT_INTERVAL,
        };
    };
    let bake_loc = h
        .bake
        .as_ref()
        .map(|b| loc_of(file, b))
        .unwrap_or_else(|| Loc::file(file));
    let bake = duration(file, h.bake, "health.bake", DEFAULT_BAKE, v);
    let interval_loc = h.interval.as_ref().map(|b| loc_of(file, b));
    let mut interval = duration(file, h.interval, "health.interval", DEFAULT_INTERVAL, v);
    if interval.is_zero() {
        v.push(parse_error(
            &interval_loc.unwrap_or_else(|| Loc::file(file)),
            "health.interval",
            "`health.interval` is zero",
            "write how often checks run during bake, like `interval: 30s`",
        ));
        interval = DEFAULT_INTERVAL;
    }
    let mut names = BTreeSet::new();
    let mut checks = Vec::new();
    for (i, c) in h.checks.into_iter().enumerate() {
        let loc = loc_of(file, &c);
        let c = c.value;
        let field = format!("health.checks[{i}]");
        let name = match c.name {
            Some(n) if n.value.chars().any(crate::text::is_active) => {
                v.push(parse_error(
                    &loc_of(file, &n),
                    format!("{field}.name"),
                    format!(
                        "health check name `{}` contains a control character",
                        crate::text::inert(&n.value)
                    ),
                    "write the name in plain text: it is shown on operators' terminals",
                ));
                crate::text::inert(&n.value).into_owned()
            }
            Some(n) if !n.value.trim().is_empty() => n.value,
            _ => {
                v.push(parse_error(
                    &loc,
                    format!("{field}.name"),
                    format!("health check {} has no name", i + 1),
                    "add `name: <what it checks>`",
                ));
                format!("check {}", i + 1)
            }
        };
        if !names.insert(name.clone()) {
            v.push(parse_error(
                &loc,
                format!("{field}.name"),
                format!("health check name `{name}` is used twice"),
                "give every check its own name",
            ));
        }
        let status = c.expect_status.as_ref().map(|s| (s.value, loc_of(file, s)));
        let kind = match (c.tcp, c.http, c.exec) {
            (Some(t), None, None) => {
                let ok = t
                    .value
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
                if !ok {
                    v.push(parse_error(
                        &loc_of(file, &t),
                        format!("{field}.tcp"),
                        format!("check `{name}`: `{}` is not host:port", t.value),
                        "write `tcp: \"127.0.0.1:25\"`",
                    ));
                }
                Some(CheckKind::Tcp(t.value))
            }
            (None, Some(u), None) => {
                if !(u.value.starts_with("http://") || u.value.starts_with("https://")) {
                    v.push(parse_error(
                        &loc_of(file, &u),
                        format!("{field}.http"),
                        format!("check `{name}`: `{}` is not an http:// or https:// URL", u.value),
                        "write `http: \"http://127.0.0.1/\"`",
                    ));
                }
                let expect_status = match status.as_ref() {
                    None => 200,
                    Some((s, sloc)) => u16::try_from(*s)
                        .ok()
                        .filter(|s| (100..=599).contains(s))
                        .unwrap_or_else(|| {
                            v.push(parse_error(
                                sloc,
                                format!("{field}.expect_status"),
                                format!("check `{name}`: `{s}` is not an HTTP status"),
                                "write a status from 100 to 599, like `expect_status: 200`",
                            ));
                            200
                        }),
                };
                Some(CheckKind::Http {
                    url: u.value,
                    expect_status,
                })
            }
            (None, None, Some(e)) => Some(CheckKind::Exec(e.value)),
            _ => {
                v.push(parse_error(&loc, field.clone(), format!("check `{name}` must have exactly one of `tcp`, `http`, `exec`"), "write `{name: smtp, tcp: \"127.0.0.1:25\"}`, `{name: site, http: \"http://127.0.0.1/\"}` or `{name: svc, exec: \"systemctl is-active svc\"}`"));
                None
            }
        };
        if let (Some((_, sloc)), Some(k)) = (&status, &kind)
            && !matches!(k, CheckKind::Http { .. })
        {
            v.push(parse_error(
                sloc,
                format!("{field}.expect_status"),
                format!("check `{name}`: `expect_status` only goes with `http`"),
                "remove `expect_status`, or make the check an `http` check",
            ));
        }
        let timeout = duration(file, c.timeout, &format!("{field}.timeout"), DEFAULT_CHECK_TIMEOUT, v);
        if let Some(kind) = kind {
            checks.push(HealthCheck { name, kind, timeout });
        }
    }
    Health {
        checks,
        bake,
        bake_loc,
        interval,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_control_characters_are_refused_with_the_field_named() {
        let (_, v) = parse_ok(
            "name: \"fix\\nr0009  completed  all-good\"\ntargets: {hosts: [a]}\nsteps:\n  - {name: \"s\\u001b[2J\", run: x, writes: [/x]}\nhealth: {checks: [{name: \"c\\u0007\", tcp: \"127.0.0.1:1\"}]}\n",
        );
        let fields: Vec<&str> = v.iter().filter_map(|x| x.field.as_deref()).collect();
        for f in ["name", "steps[0].name", "health.checks[0].name"] {
            assert!(fields.contains(&f), "{f} not refused: {v:?}");
        }
        assert!(v.iter().any(|x| x.message.contains("fix\\nr0009")), "{v:?}");
    }

    fn parse_ok(text: &str) -> (Plan, Vec<Violation>) {
        parse(Source {
            name: "plan.yaml",
            text,
        })
        .expect("yaml-level parse")
    }

    const FORMATS_EXAMPLE: &str = r#"
name: mailfix-2012-06-20
description: CVE fix for the mail system
targets:
  hosts: [p09, p10]
  groups: [g-biz2]
  labels: {os: debian12}
  exclude: [p12]
  expect_count: 12
steps:
  - name: patch postfix
    run: /usr/local/sbin/patch-postfix --apply
    writes: [/etc/postfix, /usr/lib/postfix]
    max_deletions: 0
    timeout: 10m
waves:
  - size: 1
  - size: 25%
  - size: 100%
health:
  checks:
    - {name: smtp, tcp: "127.0.0.1:25"}
    - {name: site, http: "http://127.0.0.1/", expect_status: 200}
    - {name: postfix, exec: "systemctl is-active postfix"}
  bake: 10m
  interval: 30s
failure_budget:
  canary: 0
  wave: 0
on_failure: rollback
snapshot:
  retain: 72h
approvals: 1
"#;

    #[test]
    fn formats_example_parses_cleanly() {
        let (plan, v) = parse_ok(FORMATS_EXAMPLE);
        assert!(v.is_empty(), "{v:#?}");
        assert_eq!(plan.name, "mailfix-2012-06-20");
        assert_eq!(plan.steps[0].writes, ["/etc/postfix", "/usr/lib/postfix"]);
        assert_eq!(plan.targets.expect_count.as_ref().map(|c| c.value), Some(12));
        assert_eq!(plan.health.checks.len(), 3);
        assert_eq!(plan.snapshot_retain, Duration::from_secs(72 * 3600));
        match &plan.waves {
            WaveSpec::Sizes(s) => {
                let got: Vec<Amount> = s.iter().map(|a| a.value).collect();
                assert_eq!(got, [Amount::Count(1), Amount::Percent(25), Amount::Percent(100)]);
            }
            other => panic!("expected sizes, got {other:?}"),
        }
    }

    #[test]
    fn every_field_problem_is_reported_at_once() {
        let (_, v) = parse_ok(
            "name: x
targets: {hosts: [a]}
steps:
  - name: one
    run: echo
  - name: two
    run: echo
    writes: [etc/x, /, /a/../b]
    timeout: soon
waves:
  - size: 0
health:
  bake: 5
approvals: 0
",
        );
        let codes: Vec<String> = v.iter().map(|x| x.code.to_string()).collect();
        assert_eq!(
            codes,
            [
                "writes-missing",
                "writes-invalid",
                "writes-invalid",
                "writes-invalid",
                "parse-error",
                "parse-error",
                "parse-error",
                "approvals-invalid"
            ],
            "{v:#?}"
        );
        assert!(v.iter().all(|x| x.line.is_some()), "every problem has a line: {v:#?}");
    }

    #[test]
    fn untouchable_paths_are_checked_and_a_step_may_not_write_inside_one() {
        let (plan, v) = parse_ok(
            "name: x\nsteps: [{name: a, run: b, writes: [/srv/nfs/cache, /srv]}]\nuntouchable: [/srv/nfs/, relative]\n",
        );
        let codes: Vec<String> = v.iter().map(|x| x.code.to_string()).collect();
        assert_eq!(codes, ["parse-error", "writes-invalid"], "{v:#?}");
        assert!(v[1].message.contains("/srv/nfs/cache"), "{}", v[1].message);
        assert_eq!(
            plan.untouchable.iter().map(|u| u.value.as_str()).collect::<Vec<_>>(),
            ["/srv/nfs"]
        );
    }

    #[test]
    fn a_package_step_gets_its_commands_and_the_managers_state() {
        let (plan, v) = parse_ok(
            "name: x\nsteps:\n  - name: mail\n    packages: {manager: apt, upgrade: [postfix], install: {openssl: 3.0.15-1}}\n    reboot: if-required\n    reboot_timeout: 5m\n",
        );
        assert!(v.is_empty(), "{v:#?}");
        let s = &plan.steps[0];
        let p = s.packages.as_ref().expect("packages");
        assert_eq!(p.install, [("openssl".to_owned(), "3.0.15-1".to_owned())]);
        assert!(s.run.contains("--no-download"), "{}", s.run);
        assert!(s.fetch.as_deref().is_some_and(|f| f.contains("--download-only")));
        assert!(s.writes.contains(&"/var/lib/dpkg".to_owned()), "{:?}", s.writes);
        assert!(s.fetch_writes.contains(&"/var/cache/apt".to_owned()));
        assert_eq!(
            (s.reboot, s.reboot_timeout),
            (Reboot::IfRequired, Duration::from_secs(300))
        );
    }

    #[test]
    fn step_kinds_fetches_reboots_and_dry_run_failures_are_checked() {
        let (_, v) = parse_ok(
            "name: x
steps:
  - {name: a, run: b, writes: [/x], packages: {manager: apt, upgrade: [pkg]}}
  - {name: c, packages: {manager: yum, upgrade: [pkg]}}
  - {name: d, packages: {manager: apt, install: {pkg: latest}}}
  - {name: e, run: b, writes: [/x], fetch: get}
  - {name: f, run: b, writes: [/x], fetch_writes: [/c]}
  - {name: g, run: b, writes: [/x], reboot: sometimes}
  - {name: h, run: b, writes: [/x], reboot_timeout: 1m}
  - {name: i, run: b, writes: [/x], dry_run: {allow_failure: ''}}
",
        );
        let fields: Vec<String> = v.iter().map(|x| x.field.clone().unwrap_or_default()).collect();
        assert_eq!(
            fields,
            [
                "steps[0].run",
                "steps[1].packages.manager",
                "steps[2].packages.install.pkg",
                "steps[3].fetch_writes",
                "steps[4].fetch_writes",
                "steps[5].reboot",
                "steps[6].reboot_timeout",
                "steps[7].dry_run.allow_failure",
            ],
            "{v:#?}"
        );
        assert!(v.iter().all(|x| x.line.is_some()), "{v:#?}");
    }

    #[test]
    fn write_paths() {
        assert_eq!(normalise_write_path("/etc//postfix/"), Ok("/etc/postfix".into()));
        for bad in ["", "etc", "/", "//", "/a/./b", "/a/../b", "/etc/*.conf", "/a\nb"] {
            assert!(normalise_write_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn missing_name_and_steps_are_reported() {
        let (_, v) = parse_ok("targets: {hosts: [a]}\n");
        let fields: Vec<_> = v.iter().map(|x| x.field.clone().unwrap_or_default()).collect();
        assert_eq!(fields, ["name", "steps"]);
    }

    #[test]
    fn roles_in_where_and_only_roles_are_checked_where_they_are_written() {
        let (p, v) = parse_ok(
            "name: x\ntargets: {groups: [g], where: {role: [backup, standalone], groups: [h]}}\nsteps:\n  - {name: a, run: b, writes: [/x], only_roles: backup}\n",
        );
        assert!(v.is_empty(), "{v:?}");
        let narrow = p.targets.narrow.expect("where");
        assert_eq!(narrow.roles, [Role::Backup, Role::Standalone]);
        assert_eq!(narrow.groups[0].value, "h");
        assert_eq!(p.steps[0].only_roles, [Role::Backup]);
        assert_eq!(p.steps[0].only_roles_loc.line, Some(4));

        let (_, v) = parse_ok(
            "name: x\ntargets: {groups: [g], where: {}}\nsteps:\n  - {name: a, run: b, writes: [/x], only_roles: []}\n  - {name: c, run: b, writes: [/x], only_roles: [primary, master]}\n",
        );
        let fields: Vec<_> = v
            .iter()
            .map(|v| (v.field.as_deref().unwrap_or(""), v.code.clone()))
            .collect();
        assert_eq!(
            fields,
            [
                ("targets.where", Code::ParseError),
                ("steps[0].only_roles", Code::ParseError),
                ("steps[1].only_roles", Code::ParseError),
            ],
            "{v:#?}"
        );
        assert!(v[2].message.contains("`master` is not a role"), "{}", v[2].message);
    }

    #[test]
    fn mixed_waves_are_refused() {
        let (_, v) = parse_ok("name: x\nsteps: [{name: a, run: b, writes: [/x]}]\nwaves: [{size: 1}, {hosts: [a]}]\n");
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].code, Code::WaveInvalid);
    }

    #[test]
    fn health_check_needs_exactly_one_probe() {
        let (plan, v) = parse_ok(
            "name: x\nsteps: [{name: a, run: b, writes: [/x]}]\nhealth: {checks: [{name: c, tcp: \"h:1\", exec: true}]}\n",
        );
        assert_eq!(v.len(), 1, "{v:#?}");
        assert!(plan.health.checks.is_empty());
    }
}
