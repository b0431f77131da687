//! Site policies: YAML rule files every plan is checked against.
//!
//! Each rule has an `id` (reported as `policy:<id>`) and a `kind`; the kinds
//! and their fields are documented in `docs/policy-reference.md`. The two cap
//! kinds are also handed to the wave planner, so generated waves honour them.

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::fleet::{Fleet, HostIdx};
use crate::plan::Plan;
use crate::targets::Targets;
use crate::units::{self, Amount, Scalar, format_duration};
use crate::violation::{Code, Loc, Violation};
use crate::waves::{Attribute, Cap};
use crate::yaml::{self, Source, loc_of};

/// The default policy files shipped in the repository's `policies/` and
/// built into every binary, as (name, text): the controller's set when no
/// `--policies` directory is given, and the base of a lab's own copy.
pub const SHIPPED: &[(&str, &str)] = &[("policies/default.yaml", include_str!("../../policies/default.yaml"))];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyDoc {
    #[allow(dead_code)]
    description: Option<String>,
    rules: Option<Vec<Spanned<RuleDoc>>>,
}

/// Every field any rule kind takes; which ones a kind accepts is checked after
/// parsing, so that each problem has a location.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    id: Option<Spanned<String>>,
    kind: Option<Spanned<String>>,
    description: Option<String>,
    max_hosts: Option<Spanned<i64>>,
    max_share: Option<Spanned<Scalar>>,
    min: Option<Spanned<Scalar>>,
    paths: Option<Vec<Spanned<String>>>,
    min_approvals: Option<Spanned<i64>>,
    label: Option<Spanned<String>>,
    patterns: Option<Vec<Spanned<String>>>,
    backend: Option<Spanned<String>>,
    accept: Option<Vec<Spanned<String>>>,
    action: Option<Spanned<String>>,
    kinds: Option<Vec<Spanned<String>>>,
    groups: Option<Vec<Spanned<String>>>,
    windows: Option<Vec<Spanned<crate::windows::WindowDoc>>>,
}

/// The rule kinds, with the fields each accepts.
const KINDS: &[(&str, &[&str])] = &[
    ("canary-size", &["max_hosts", "max_share"]),
    ("max-in-flight", &["max_hosts", "max_share"]),
    ("min-bake", &["min"]),
    ("protected-paths", &["paths", "min_approvals"]),
    ("failure-domain-cap", &["max_hosts", "max_share"]),
    ("label-cap", &["label", "max_hosts", "max_share"]),
    ("destructive-command", &["patterns"]),
    ("require-expect-count", &[]),
    ("require-health-checks", &[]),
    ("untouchable", &["paths"]),
    ("snapshot-backend", &["backend"]),
    ("fetch-writes", &["paths"]),
    ("redact", &["patterns"]),
    ("weaker-confinement", &["accept"]),
    ("updaters", &["action", "kinds"]),
    ("maintenance-window", &["groups", "windows"]),
];

/// What a site can accept doing without, by name, on a kernel that lacks it.
pub const WEAKER: &[&str] = &["landlock", "seccomp"];

/// Where a step's `fetch` may write when no site rule says otherwise: the
/// package managers' caches. A fetch runs before anyone approves the plan,
/// so what it writes must be a cache, never a host's configuration.
pub const DEFAULT_FETCH_WRITES: &[&str] = &["/var/cache"];

/// Snapshot backends a site policy may force: tar + zstd works on every
/// filesystem, so forcing it can never leave a host without a snapshot.
pub const FORCEABLE_BACKENDS: &[&str] = &["tar+zstd"];

/// What a rule checks.
#[derive(Clone, Debug)]
pub enum RuleKind {
    /// The canary may hold at most this many hosts / this share of targets.
    CanarySize {
        /// Absolute limit.
        max_hosts: Option<u64>,
        /// Share of the targets, rounded up.
        max_share: Option<u8>,
    },
    /// At most this many hosts / this share of a wave may have a real
    /// step running at once: a plan asking for more is refused, and a plan
    /// that does not say is held to it.
    MaxInFlight {
        /// Absolute limit.
        max_hosts: Option<u64>,
        /// Share of each wave, rounded up.
        max_share: Option<u8>,
    },
    /// `health.bake` must be at least this long.
    MinBake {
        /// Minimum bake.
        min: Duration,
    },
    /// Steps writing to (or above, or inside) these paths need more approvers.
    ProtectedPaths {
        /// Protected paths, normalised.
        paths: Vec<String>,
        /// Approvals a plan touching them must ask for.
        min_approvals: u32,
    },
    /// A per-wave cap (failure domain or label value).
    Cap(Cap),
    /// A step whose `run` holds a destructive command must declare
    /// `max_deletions` above zero.
    DestructiveCommand {
        /// Site patterns on top of the built-in ones.
        extra: Vec<Regex>,
    },
    /// `targets.expect_count` is required.
    RequireExpectCount,
    /// At least one health check is required.
    RequireHealthChecks,
    /// No step may change these paths: they are read-only in the dry-run
    /// and the real run, and a step whose `writes` lies inside one is
    /// refused.
    Untouchable {
        /// The paths, normalised.
        paths: Vec<String>,
    },
    /// Every snapshot is taken by this backend (`tar+zstd`), whatever the
    /// host's filesystem offers.
    SnapshotBackend {
        /// The backend's name.
        backend: String,
    },
    /// Steps may run on hosts whose kernel lacks these (`landlock`,
    /// `seccomp`), with the weaker confinement that leaves.
    WeakerConfinement {
        /// The names.
        accept: Vec<String>,
    },
    /// Output matching these patterns is masked on the agent before it is
    /// sent, on top of the built-in patterns ([`crate::redact`]).
    Redact {
        /// The patterns as written (each a valid regular expression).
        patterns: Vec<String>,
    },
    /// A step's `fetch_writes` must lie beneath these paths (without such a
    /// rule: [`DEFAULT_FETCH_WRITES`]).
    FetchWrites {
        /// The paths, normalised.
        paths: Vec<String>,
    },
    /// Updaters outside the rollout on a plan's targets (unattended-upgrades,
    /// apt and dnf timers, snapd, cron jobs): refuse the plan, or hold them
    /// for the rollout. Checked at submit, against what each target's agent
    /// reported; a target whose agent never did is refused.
    Updaters {
        /// Refuse or hold.
        action: crate::updaters::UpdaterAction,
        /// The kinds it is about (none: every kind).
        kinds: Vec<crate::updaters::UpdaterKind>,
    },
    /// A wave holding a host of these groups (none: any host) starts only
    /// when it fits, whole, inside one of these windows.
    MaintenanceWindow {
        /// The groups it is for; empty: every host.
        groups: Vec<String>,
        /// The windows.
        windows: Vec<crate::windows::Window>,
    },
}

/// One site policy rule.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Id, reported as `policy:<id>`.
    pub id: String,
    /// What it is for, in the policy author's words.
    pub description: Option<String>,
    /// Where it is written.
    pub loc: Loc,
    /// What it checks.
    pub kind: RuleKind,
}

/// Every rule from a set of policy files.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    rules: Vec<Rule>,
}

/// A `max-in-flight` rule's limit for a wave of `size` hosts: never below
/// one, so that a wave can always make progress.
fn in_flight_cap(max_hosts: Option<u64>, max_share: Option<u8>, size: usize) -> usize {
    let by_count = max_hosts.map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
    let by_share = max_share.map_or(usize::MAX, |p| Amount::Percent(p).of(size));
    by_count.min(by_share).max(1)
}

/// Built-in destructive command patterns: a deleting command in command
/// position, `find -delete`, `rsync --delete`, and SQL that drops data.
static DESTRUCTIVE: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    let command = r"(?:^|[\s;&|(`{!])(?:sudo\s+|exec\s+|xargs\s+(?:-\S+\s+)*)?(?:/usr)?(?:/s?bin/)?";
    let end = r"(?:\s|$|[;&|)`}])";
    let mut v = Vec::new();
    for (name, word) in [
        ("rm", "rm"),
        ("rmdir", "rmdir"),
        ("unlink", "unlink"),
        ("shred", "shred"),
        ("truncate", "truncate"),
        ("dd", "dd"),
        ("mkfs", r"mkfs(?:\.[a-z0-9]+)?"),
        ("wipefs", "wipefs"),
        ("blkdiscard", "blkdiscard"),
    ] {
        if let Ok(re) = Regex::new(&format!("{command}{word}{end}")) {
            v.push((name, re));
        }
    }
    for (name, re) in [
        ("find -delete", r"\bfind\b.*\s-delete\b"),
        ("rsync --delete", r"\brsync\b.*\s--delete"),
        ("SQL DROP", r"(?i)\bdrop\s+(?:table|database|schema|index|view)\b"),
        ("SQL TRUNCATE", r"(?i)\btruncate\s+table\b"),
        ("SQL DELETE", r"(?i)\bdelete\s+from\b"),
    ] {
        if let Ok(re) = Regex::new(re) {
            v.push((name, re));
        }
    }
    v
});

/// The destructive command a `run` line holds, if any (built-in patterns).
pub fn destructive_command(run: &str) -> Option<&'static str> {
    DESTRUCTIVE
        .iter()
        .find(|(_, re)| re.is_match(run))
        .map(|(name, _)| *name)
}

fn valid_rule_id(id: &str) -> bool {
    let mut b = id.bytes();
    matches!(b.next(), Some(b'a'..=b'z' | b'0'..=b'9'))
        && b.all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.'))
}

fn bad(loc: &Loc, field: String, message: String, fix: impl Into<String>) -> Violation {
    Violation::new(Code::ParseError, message).at(loc).field(field).fix(fix)
}

/// A rule's `paths`, normalised; each one refused is reported at its place
/// (rule `i`, whose id is `id`), with `example` in the fix.
fn rule_paths(
    file: &str,
    i: usize,
    id: &str,
    paths: Option<&[Spanned<String>]>,
    example: &str,
    v: &mut Vec<Violation>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (j, p) in paths.into_iter().flatten().enumerate() {
        match crate::plan::normalise_write_path(&p.value) {
            Ok(n) => out.push(n),
            Err(why) => v.push(bad(
                &loc_of(file, p),
                format!("rules[{i}].paths[{j}]"),
                format!("rule `{id}`: path `{}` {why}", p.value),
                format!("write absolute paths like `{example}`"),
            )),
        }
    }
    out
}

impl PolicySet {
    /// Parse policy files; every problem in every file is reported.
    pub fn parse(files: &[Source<'_>]) -> Result<PolicySet, Vec<Violation>> {
        let mut v = Vec::new();
        let mut rules = Vec::new();
        let mut seen: HashMap<String, Loc> = HashMap::new();
        for src in files {
            let doc: PolicyDoc = match yaml::parse(*src, "policy file") {
                Ok(d) => d,
                Err(e) => {
                    v.push(*e);
                    continue;
                }
            };
            let Some(list) = doc.rules else {
                v.push(bad(
                    &Loc::file(src.name),
                    "rules".into(),
                    "the policy file has no `rules:` list".into(),
                    "list the rules under `rules:`; see docs/policy-reference.md",
                ));
                continue;
            };
            for (i, rule) in list.into_iter().enumerate() {
                if let Some(r) = parse_rule(src.name, i, rule, &mut v) {
                    if let Some(first) = seen.get(&r.id) {
                        v.push(bad(
                            &r.loc,
                            format!("rules[{i}].id"),
                            format!("policy rule id `{}` is used twice (first at {first})", r.id),
                            "give every rule its own id; violations are reported as policy:<id>",
                        ));
                        continue;
                    }
                    seen.insert(r.id.clone(), r.loc.clone());
                    rules.push(r);
                }
            }
        }
        if v.is_empty() { Ok(PolicySet { rules }) } else { Err(v) }
    }

    /// The rules, in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The weaker confinement the site accepts by name.
    pub fn accept_weaker(&self) -> Vec<String> {
        self.rules
            .iter()
            .flat_map(|r| match &r.kind {
                RuleKind::WeakerConfinement { accept } => accept.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// The site's redact patterns (on top of the built-in ones).
    pub fn redact(&self) -> Vec<String> {
        self.rules
            .iter()
            .flat_map(|r| match &r.kind {
                RuleKind::Redact { patterns } => patterns.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// Paths the site marks untouchable.
    pub fn untouchable(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .rules
            .iter()
            .flat_map(|r| match &r.kind {
                RuleKind::Untouchable { paths } => paths.clone(),
                _ => Vec::new(),
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The snapshot backend the site forces, if any.
    pub fn snapshot_backend(&self) -> Option<String> {
        self.rules.iter().find_map(|r| match &r.kind {
            RuleKind::SnapshotBackend { backend } => Some(backend.clone()),
            _ => None,
        })
    }

    /// How many hosts of each wave (of the sizes given) may have a real
    /// step running at once: the plan's `max_in_flight` (or the default),
    /// held to every `max-in-flight` rule.
    pub fn in_flight_limits(&self, plan: &Plan, sizes: &[usize]) -> Vec<usize> {
        let amount = plan
            .max_in_flight
            .as_ref()
            .map_or(crate::plan::DEFAULT_MAX_IN_FLIGHT, |a| a.value);
        sizes
            .iter()
            .map(|&size| {
                let caps = self.rules.iter().filter_map(|r| match r.kind {
                    RuleKind::MaxInFlight { max_hosts, max_share } => Some(in_flight_cap(max_hosts, max_share, size)),
                    _ => None,
                });
                caps.fold(crate::plan::in_flight_limit(amount, size), usize::min)
            })
            .collect()
    }

    /// The site's rule on updaters outside the rollout, if it has one: its
    /// id, what it does and the kinds it is about.
    pub fn updaters(&self) -> Option<(&str, crate::updaters::UpdaterAction, &[crate::updaters::UpdaterKind])> {
        self.rules.iter().find_map(|r| match &r.kind {
            RuleKind::Updaters { action, kinds } => Some((r.id.as_str(), *action, kinds.as_slice())),
            _ => None,
        })
    }

    /// The windows that apply to a wave of these hosts: the plan's, and
    /// each site rule's whose groups one of them is in.
    pub fn window_sets(&self, fleet: &Fleet, plan: &Plan, hosts: &[HostIdx]) -> Vec<crate::windows::WindowSet> {
        let mut out = Vec::new();
        if !plan.windows.is_empty() {
            out.push(crate::windows::WindowSet {
                source: "plan".into(),
                windows: plan.windows.clone(),
            });
        }
        for r in &self.rules {
            let RuleKind::MaintenanceWindow { groups, windows } = &r.kind else {
                continue;
            };
            let applies = groups.is_empty()
                || hosts
                    .iter()
                    .any(|h| fleet.host(*h).groups.iter().any(|g| groups.contains(g)));
            if applies {
                out.push(crate::windows::WindowSet {
                    source: format!("policy:{}", r.id),
                    windows: windows.clone(),
                });
            }
        }
        out
    }

    /// The caps the planner must honour.
    pub fn caps(&self) -> Vec<Cap> {
        self.rules
            .iter()
            .filter_map(|r| match &r.kind {
                RuleKind::Cap(c) => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    /// Check a plan against every rule except the caps (which
    /// [`crate::waves::check`] enforces wave by wave). `placed` is the
    /// resolved targets and waves, when resolution succeeded: rules about the
    /// plan's own content run either way, so one run reports everything.
    pub fn check(&self, fleet: &Fleet, plan: &Plan, placed: Option<(&Targets, &[Vec<HostIdx>])>) -> Vec<Violation> {
        let mut v = Vec::new();
        for rule in &self.rules {
            let code = Code::Policy(rule.id.clone());
            let why = rule
                .description
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            match &rule.kind {
                RuleKind::CanarySize { max_hosts, max_share } => {
                    let Some((targets, waves)) = placed else { continue };
                    let Some(canary) = waves.first() else { continue };
                    let cap = Cap {
                        rule_id: rule.id.clone(),
                        loc: rule.loc.clone(),
                        attribute: Attribute::FailureDomain,
                        max_hosts: *max_hosts,
                        max_share: *max_share,
                    };
                    let limit = cap.limit(targets.len());
                    if canary.len() > limit {
                        v.push(
                            Violation::new(code, format!("the canary (wave 1) holds {} hosts; the site allows at most {limit} for {} targets{why}", canary.len(), targets.len()))
                                .at(&plan.waves_loc)
                                .field("waves[0]")
                                .hosts(canary.iter().map(|h| fleet.id(*h).to_owned()))
                                .fix(format!("make the first wave at most {limit} host{}, like `- size: 1`", if limit == 1 { "" } else { "s" })),
                        );
                    }
                }
                RuleKind::MaxInFlight { max_hosts, max_share } => {
                    // Only a number the plan wrote can be over the cap; a
                    // plan that says nothing is held to it.
                    let (Some((_, waves)), Some(asked)) = (placed, plan.max_in_flight.as_ref()) else {
                        continue;
                    };
                    let over = waves.iter().enumerate().find_map(|(i, w)| {
                        let (want, cap) = (
                            crate::plan::in_flight_limit(asked.value, w.len()),
                            in_flight_cap(*max_hosts, *max_share, w.len()),
                        );
                        (want > cap).then_some((i, w.len(), want, cap))
                    });
                    if let Some((i, size, want, cap)) = over {
                        v.push(
                            Violation::new(
                                code,
                                format!(
                                    "`max_in_flight: {}` lets {want} hosts of wave {} ({size} hosts) run a step at once; the site allows at most {cap}{why}",
                                    asked.value,
                                    i + 1
                                ),
                            )
                            .at(&asked.loc)
                            .field("max_in_flight")
                            .fix(format!("write `max_in_flight: {cap}` or less, or leave it out to take the site's limit")),
                        );
                    }
                }
                RuleKind::MinBake { min } => {
                    if plan.health.bake < *min {
                        v.push(
                            Violation::new(
                                code,
                                format!(
                                    "`health.bake` is {}; the site requires at least {}{why}",
                                    format_duration(plan.health.bake),
                                    format_duration(*min)
                                ),
                            )
                            .at(&plan.health.bake_loc)
                            .field("health.bake")
                            .fix(format!(
                                "write `bake: {}` or longer, so a wave is watched before the next one starts",
                                format_duration(*min)
                            )),
                        );
                    }
                }
                RuleKind::ProtectedPaths { paths, min_approvals } => {
                    if plan.approvals >= *min_approvals {
                        continue;
                    }
                    for (i, step) in plan.steps.iter().enumerate() {
                        let hits: Vec<String> = step
                            .writes
                            .iter()
                            .flat_map(|w| {
                                paths
                                    .iter()
                                    .filter(move |p| overlaps(w, p))
                                    .map(move |p| format!("`{w}` covers `{p}`"))
                            })
                            .collect();
                        if !hits.is_empty() {
                            v.push(
                                Violation::new(code.clone(), format!("step `{}` may change protected customer data: {}{why}", step.name, hits.join(", ")))
                                    .at(&step.writes_loc)
                                    .field(format!("steps[{i}].writes"))
                                    .fix(format!("narrow `writes` to what the step really changes, or ask for `approvals: {min_approvals}` (the plan asks for {})", plan.approvals)),
                            );
                        }
                    }
                }
                RuleKind::DestructiveCommand { extra } => {
                    for (i, step) in plan.steps.iter().enumerate() {
                        if step.max_deletions > 0 {
                            continue;
                        }
                        let hit = destructive_command(&step.run).map(str::to_owned).or_else(|| {
                            extra
                                .iter()
                                .find(|re| re.is_match(&step.run))
                                .map(|re| format!("site pattern `{re}`"))
                        });
                        if let Some(hit) = hit {
                            v.push(
                                Violation::new(code.clone(), format!("step `{}` runs a destructive command ({hit}) but declares `max_deletions: 0`{why}", step.name))
                                    .at(&step.run_loc)
                                    .field(format!("steps[{i}].run"))
                                    .fix("declare `max_deletions: N`, the number of files the step may delete per host, so its dry-run is held to it; or remove the command"),
                            );
                        }
                    }
                }
                RuleKind::RequireExpectCount => {
                    if plan.targets.expect_count.is_none() {
                        v.push(
                            Violation::new(code, format!("`targets` has no `expect_count`{why}"))
                                .at(&plan.targets.loc.clone().unwrap_or_else(|| Loc::file(&plan.file)))
                                .field("targets.expect_count")
                                .fix(match placed {
                                    Some((targets, _)) => format!(
                                        "add `expect_count: {}` if the {} resolved targets are what you meant",
                                        targets.len(),
                                        targets.len()
                                    ),
                                    None => "add `expect_count: N`, the number of hosts the selection must resolve to"
                                        .into(),
                                }),
                        );
                    }
                }
                RuleKind::RequireHealthChecks => {
                    if plan.health.checks.is_empty() {
                        v.push(
                            Violation::new(code, format!("the plan has no health checks{why}"))
                                .at(&Loc::file(&plan.file))
                                .field("health.checks")
                                .fix("add at least one check that proves the patched service works, like `{name: smtp, tcp: \"127.0.0.1:25\"}`"),
                        );
                    }
                }
                RuleKind::Untouchable { paths } => {
                    for (i, step) in plan.steps.iter().enumerate() {
                        let hits: Vec<String> = step
                            .writes
                            .iter()
                            .flat_map(|w| {
                                paths
                                    .iter()
                                    .filter(move |p| crate::plan::within(w, p))
                                    .map(move |p| format!("`{w}` is inside `{p}`"))
                            })
                            .collect();
                        if !hits.is_empty() {
                            v.push(
                                Violation::new(
                                    code.clone(),
                                    format!(
                                        "step `{}` would change what the site marks untouchable: {}{why}",
                                        step.name,
                                        hits.join(", ")
                                    ),
                                )
                                .at(&step.writes_loc)
                                .field(format!("steps[{i}].writes"))
                                .fix("take the path out of `writes`; no plan may change an untouchable path"),
                            );
                        }
                    }
                }
                RuleKind::FetchWrites { paths } => fetch_writes_outside(plan, paths, &code, &why, &mut v),
                RuleKind::Cap(_)
                | RuleKind::SnapshotBackend { .. }
                | RuleKind::Redact { .. }
                | RuleKind::WeakerConfinement { .. } => {}
                // Needs what the agents reported: checked at submit.
                RuleKind::Updaters { .. } => {}
                // Each wave's fit is checked with the waves (check.rs).
                RuleKind::MaintenanceWindow { .. } => {}
            }
        }
        if !self
            .rules
            .iter()
            .any(|r| matches!(r.kind, RuleKind::FetchWrites { .. }))
        {
            let paths: Vec<String> = DEFAULT_FETCH_WRITES.iter().map(|p| (*p).to_owned()).collect();
            let why = " (built in: a fetch runs before approval, so it may fill caches only)";
            fetch_writes_outside(plan, &paths, &Code::Policy("fetch-writes".into()), why, &mut v);
        }
        v
    }
}

/// A violation for every `fetch_writes` path of `plan` not beneath `paths`.
fn fetch_writes_outside(plan: &Plan, paths: &[String], code: &Code, why: &str, v: &mut Vec<Violation>) {
    for (i, step) in plan.steps.iter().enumerate() {
        // A package step's fetch writes its manager's cache, which the
        // manager names; what the plan adds is checked like any other.
        let manager: &[&str] = step.packages.as_ref().map_or(&[], |p| p.manager.fetch_writes());
        for (j, w) in step.fetch_writes.iter().enumerate() {
            if paths.iter().any(|p| crate::plan::within(w, p)) || manager.contains(&w.as_str()) {
                continue;
            }
            v.push(
                Violation::new(
                    code.clone(),
                    format!(
                        "step `{}`: its fetch may write `{w}`, outside what a fetch may fill ({}){why}",
                        step.name,
                        paths.join(", ")
                    ),
                )
                .at(&step.loc)
                .field(format!("steps[{i}].fetch_writes[{j}]"))
                .fix(format!(
                    "let the fetch fill a cache beneath {} and the step (which runs after approval) put things in place",
                    paths.join(" or ")
                )),
            );
        }
    }
}

/// Whether writing `w` may touch protected `p`: the same path, one inside the
/// other.
fn overlaps(w: &str, p: &str) -> bool {
    let inside = |a: &str, b: &str| a == b || a.strip_prefix(b).is_some_and(|rest| rest.starts_with('/'));
    inside(w, p) || inside(p, w)
}

fn parse_rule(file: &str, i: usize, rule: Spanned<RuleDoc>, v: &mut Vec<Violation>) -> Option<Rule> {
    let loc = loc_of(file, &rule);
    let r = rule.value;
    let field = |f: &str| format!("rules[{i}].{f}");
    let before = v.len();
    let id = match &r.id {
        Some(id) if valid_rule_id(&id.value) => id.value.clone(),
        Some(id) => {
            v.push(bad(
                &loc_of(file, id),
                field("id"),
                format!("`{}` is not a valid rule id", id.value),
                "use lower-case letters, digits and `-`, like `canary-size`",
            ));
            String::new()
        }
        None => {
            v.push(bad(
                &loc,
                field("id"),
                "a policy rule has no `id`".into(),
                "add `id: <name>`; violations are reported as policy:<id>",
            ));
            String::new()
        }
    };
    let Some(kind) = r.kind.as_ref() else {
        v.push(bad(
            &loc,
            field("kind"),
            format!("rule `{id}` has no `kind`"),
            format!("add `kind:` with one of: {}", kind_names()),
        ));
        return None;
    };
    let Some((kind_name, accepted)) = KINDS.iter().find(|(k, _)| *k == kind.value) else {
        v.push(bad(
            &loc_of(file, kind),
            field("kind"),
            format!("rule `{id}`: `{}` is not a rule kind", kind.value),
            format!("use one of: {}", kind_names()),
        ));
        return None;
    };
    let present: BTreeMap<&str, Loc> = [
        ("max_hosts", r.max_hosts.as_ref().map(|s| loc_of(file, s))),
        ("max_share", r.max_share.as_ref().map(|s| loc_of(file, s))),
        ("min", r.min.as_ref().map(|s| loc_of(file, s))),
        ("paths", r.paths.as_ref().map(|_| loc.clone())),
        ("min_approvals", r.min_approvals.as_ref().map(|s| loc_of(file, s))),
        ("label", r.label.as_ref().map(|s| loc_of(file, s))),
        ("patterns", r.patterns.as_ref().map(|_| loc.clone())),
        ("backend", r.backend.as_ref().map(|s| loc_of(file, s))),
    ]
    .into_iter()
    .filter_map(|(k, l)| l.map(|l| (k, l)))
    .collect();
    for (f, floc) in &present {
        if !accepted.contains(f) {
            let takes = if accepted.is_empty() {
                "no fields".to_string()
            } else {
                accepted.join(", ")
            };
            v.push(bad(
                floc,
                field(f),
                format!("rule `{id}`: `{f}` does not apply to kind `{kind_name}`"),
                format!("kind `{kind_name}` takes {takes}"),
            ));
        }
    }
    let max_hosts = r.max_hosts.as_ref().and_then(|m| match u64::try_from(m.value) {
        Ok(n) if n > 0 => Some(n),
        _ => {
            v.push(bad(
                &loc_of(file, m),
                field("max_hosts"),
                format!("rule `{id}`: `max_hosts: {}` must be at least 1", m.value),
                "write a positive count",
            ));
            None
        }
    });
    let max_share = r
        .max_share
        .as_ref()
        .and_then(|m| match units::parse_amount(&m.value, false) {
            Ok(Amount::Percent(p)) => Some(p),
            Ok(Amount::Count(_)) => {
                v.push(bad(
                    &loc_of(file, m),
                    field("max_share"),
                    format!("rule `{id}`: `max_share` must be a percentage"),
                    "write `max_share: 10%`, or use `max_hosts` for a count",
                ));
                None
            }
            Err(e) => {
                v.push(bad(
                    &loc_of(file, m),
                    field("max_share"),
                    format!("rule `{id}`: {e}"),
                    "write `max_share: 10%`",
                ));
                None
            }
        });
    let needs_limit = matches!(
        *kind_name,
        "canary-size" | "failure-domain-cap" | "label-cap" | "max-in-flight"
    );
    if needs_limit && max_hosts.is_none() && max_share.is_none() && r.max_hosts.is_none() && r.max_share.is_none() {
        v.push(bad(
            &loc,
            field("max_hosts"),
            format!("rule `{id}` sets no limit"),
            "add `max_hosts: N`, `max_share: N%`, or both",
        ));
    }
    let kind = match *kind_name {
        "canary-size" => RuleKind::CanarySize { max_hosts, max_share },
        "maintenance-window" => {
            let named = r.windows.as_ref().is_some_and(|w| !w.is_empty());
            let windows = crate::windows::from_docs(file, r.windows.unwrap_or_default(), &field("windows"), v);
            if !named {
                v.push(bad(
                    &loc,
                    field("windows"),
                    format!("rule `{id}` names no window"),
                    "add `windows: [{start: \"02:00\", end: \"05:00\", tz: Europe/Berlin}]`",
                ));
            }
            RuleKind::MaintenanceWindow {
                groups: r.groups.iter().flatten().map(|g| g.value.clone()).collect(),
                windows,
            }
        }
        "updaters" => {
            use crate::updaters::{UpdaterAction, UpdaterKind};
            let action = match r.action.as_ref().map(|a| a.value.as_str()) {
                Some("refuse") => UpdaterAction::Refuse,
                Some("hold") => UpdaterAction::Hold,
                other => {
                    let at = r.action.as_ref().map_or_else(|| loc.clone(), |a| loc_of(file, a));
                    v.push(bad(
                        &at,
                        field("action"),
                        match other {
                            Some(w) => format!("rule `{id}`: `action: {w}` is not an action"),
                            None => format!("rule `{id}` has no `action`"),
                        },
                        "write `action: refuse` (refuse plans whose targets have one) or `action: hold` (hold them for the rollout)",
                    ));
                    UpdaterAction::Refuse
                }
            };
            let mut kinds = Vec::new();
            for (j, k) in r.kinds.iter().flatten().enumerate() {
                match UpdaterKind::parse(&k.value) {
                    Some(kind) => kinds.push(kind),
                    None => v.push(bad(
                        &loc_of(file, k),
                        format!("rules[{i}].kinds[{j}]"),
                        format!("rule `{id}`: `{}` is not a kind of updater", k.value),
                        format!("write one of: {}", UpdaterKind::ALL.map(UpdaterKind::as_str).join(", ")),
                    )),
                }
            }
            RuleKind::Updaters { action, kinds }
        }
        "max-in-flight" => RuleKind::MaxInFlight { max_hosts, max_share },
        "min-bake" => {
            let min = match &r.min {
                None => {
                    v.push(bad(
                        &loc,
                        field("min"),
                        format!("rule `{id}` has no `min`"),
                        "add `min: 5m`",
                    ));
                    Duration::ZERO
                }
                Some(m) => units::parse_duration(&m.value).unwrap_or_else(|e| {
                    v.push(bad(
                        &loc_of(file, m),
                        field("min"),
                        format!("rule `{id}`: {e}"),
                        "write `min: 5m`",
                    ));
                    Duration::ZERO
                }),
            };
            RuleKind::MinBake { min }
        }
        "untouchable" => {
            let paths = rule_paths(file, i, &id, r.paths.as_deref(), "/srv/nfs", v);
            if r.paths.as_ref().is_none_or(Vec::is_empty) {
                v.push(bad(
                    &loc,
                    field("paths"),
                    format!("rule `{id}` marks no paths untouchable"),
                    "add `paths: [/srv/nfs]`",
                ));
            }
            RuleKind::Untouchable { paths }
        }
        "weaker-confinement" => {
            let mut accept = Vec::new();
            for (j, a) in r.accept.iter().flatten().enumerate() {
                if WEAKER.contains(&a.value.as_str()) {
                    accept.push(a.value.clone());
                } else {
                    v.push(bad(
                        &loc_of(file, a),
                        format!("rules[{i}].accept[{j}]"),
                        format!(
                            "rule `{id}`: `{}` is not something a step's jail can do without",
                            a.value
                        ),
                        format!("write one of: {}", WEAKER.join(", ")),
                    ));
                }
            }
            if r.accept.as_ref().is_none_or(Vec::is_empty) {
                v.push(bad(
                    &loc,
                    field("accept"),
                    format!("rule `{id}` accepts nothing"),
                    "add `accept: [landlock]`, naming what the site's older kernels lack",
                ));
            }
            RuleKind::WeakerConfinement { accept }
        }
        "redact" => {
            let mut patterns = Vec::new();
            for (j, p) in r.patterns.iter().flatten().enumerate() {
                match crate::redact::Redactor::new(std::slice::from_ref(&p.value)) {
                    Ok(_) => patterns.push(p.value.clone()),
                    Err(e) => v.push(bad(
                        &loc_of(file, p),
                        format!("rules[{i}].patterns[{j}]"),
                        format!("rule `{id}`: {e}"),
                        "write a regular expression (Rust regex syntax), like `customer-[0-9]{4}`",
                    )),
                }
            }
            if r.patterns.as_ref().is_none_or(Vec::is_empty) {
                v.push(bad(
                    &loc,
                    field("patterns"),
                    format!("rule `{id}` has no patterns"),
                    "add `patterns: ['secret-[a-z0-9]+']`",
                ));
            }
            RuleKind::Redact { patterns }
        }
        "fetch-writes" => {
            let paths = rule_paths(file, i, &id, r.paths.as_deref(), "/var/cache", v);
            if r.paths.as_ref().is_none_or(Vec::is_empty) {
                v.push(bad(
                    &loc,
                    field("paths"),
                    format!("rule `{id}` lets a fetch write nowhere"),
                    "add `paths: [/var/cache]`",
                ));
            }
            RuleKind::FetchWrites { paths }
        }
        "snapshot-backend" => {
            let backend = match &r.backend {
                Some(b) if FORCEABLE_BACKENDS.contains(&b.value.as_str()) => b.value.clone(),
                Some(b) => {
                    v.push(bad(
                        &loc_of(file, b),
                        field("backend"),
                        format!("rule `{id}`: `{}` is not a snapshot backend a site can force", b.value),
                        format!(
                            "write `backend: tar+zstd` (it works on every filesystem); the others are chosen per filesystem: {}",
                            FORCEABLE_BACKENDS.join(", ")
                        ),
                    ));
                    String::new()
                }
                None => {
                    v.push(bad(
                        &loc,
                        field("backend"),
                        format!("rule `{id}` names no `backend`"),
                        "add `backend: tar+zstd`",
                    ));
                    String::new()
                }
            };
            RuleKind::SnapshotBackend { backend }
        }
        "protected-paths" => {
            let paths = rule_paths(file, i, &id, r.paths.as_deref(), "/home", v);
            if r.paths.as_ref().is_none_or(Vec::is_empty) {
                v.push(bad(
                    &loc,
                    field("paths"),
                    format!("rule `{id}` protects no paths"),
                    "add `paths: [/home, /var/mail]`",
                ));
            }
            let min_approvals = match &r.min_approvals {
                None => 2,
                Some(m) => u32::try_from(m.value).ok().filter(|n| *n >= 1).unwrap_or_else(|| {
                    v.push(bad(
                        &loc_of(file, m),
                        field("min_approvals"),
                        format!("rule `{id}`: `min_approvals: {}` must be at least 1", m.value),
                        "write `min_approvals: 2`",
                    ));
                    2
                }),
            };
            RuleKind::ProtectedPaths { paths, min_approvals }
        }
        "failure-domain-cap" => RuleKind::Cap(Cap {
            rule_id: id.clone(),
            loc: loc.clone(),
            attribute: Attribute::FailureDomain,
            max_hosts,
            max_share,
        }),
        "label-cap" => {
            let label = match &r.label {
                Some(l) if !l.value.is_empty() => l.value.clone(),
                _ => {
                    v.push(bad(
                        &loc,
                        field("label"),
                        format!("rule `{id}` names no `label`"),
                        "add `label: customer` (the label whose hosts are counted per value)",
                    ));
                    String::new()
                }
            };
            RuleKind::Cap(Cap {
                rule_id: id.clone(),
                loc: loc.clone(),
                attribute: Attribute::Label(label),
                max_hosts,
                max_share,
            })
        }
        "destructive-command" => {
            let mut extra = Vec::new();
            for (j, p) in r.patterns.iter().flatten().enumerate() {
                match Regex::new(&p.value) {
                    Ok(re) => extra.push(re),
                    Err(e) => v.push(bad(
                        &loc_of(file, p),
                        format!("rules[{i}].patterns[{j}]"),
                        format!("rule `{id}`: pattern `{}` is not a regular expression: {e}", p.value),
                        "write a Rust `regex` pattern, like `\\bmysqladmin\\s+drop\\b`",
                    )),
                }
            }
            RuleKind::DestructiveCommand { extra }
        }
        "require-expect-count" => RuleKind::RequireExpectCount,
        _ => RuleKind::RequireHealthChecks,
    };
    (v.len() == before).then_some(Rule {
        id,
        description: r.description,
        loc,
        kind,
    })
}

fn kind_names() -> String {
    KINDS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destructive_commands_are_recognised() {
        for run in [
            "rm -rf /home/$TARGET",
            "cd /x && rm -f a",
            "sudo rm a",
            "/bin/rm a",
            "find /var/mail -type f -delete",
            "find /x | xargs -0 rm",
            "rsync -a --delete src/ dst/",
            "mysql -e 'DROP DATABASE shop'",
            "psql -c \"truncate table orders\"",
            "dd if=/dev/zero of=/dev/sda",
            "mkfs.ext4 /dev/sdb1",
            "wipefs -a /dev/sdb",
            "shred -u secret",
            "truncate -s 0 /var/log/x",
            "unlink /etc/x",
        ] {
            assert!(destructive_command(run).is_some(), "{run:?} not flagged");
        }
        for run in [
            "/usr/local/sbin/patch-postfix --apply",
            "docker run --rm image",
            "perform-update",
            "apt-get install -y postfix",
            "echo confirmed > /etc/motd",
            "systemctl restart postfix",
        ] {
            assert_eq!(destructive_command(run), None, "{run:?} flagged");
        }
    }

    #[test]
    fn overlap_is_by_path_component() {
        assert!(overlaps("/home", "/home"));
        assert!(overlaps("/home/alice", "/home"));
        assert!(overlaps("/var", "/var/mail"));
        assert!(!overlaps("/homes", "/home"));
        assert!(!overlaps("/var/lib/mysqlx", "/var/lib/mysql"));
    }

    fn parse(text: &str) -> Result<PolicySet, Vec<Violation>> {
        PolicySet::parse(&[Source { name: "p.yaml", text }])
    }

    #[test]
    fn a_fetch_may_fill_caches_only_unless_the_site_says_otherwise() {
        let fleet = Fleet::parse(Source {
            name: "x.yaml",
            text: "hosts:\n  - {id: a}\n",
        })
        .expect("fleet");
        let plan = |fetch_writes: &str| {
            let text = format!(
                "name: p\ntargets: {{hosts: [a]}}\nsteps:\n  - {{name: s, run: x, writes: [/srv/app], fetch: f, fetch_writes: {fetch_writes}}}\nwaves: [{{size: 1}}]\nhealth: {{checks: [{{name: c, tcp: \"127.0.0.1:1\"}}]}}\n"
            );
            let (p, v) = crate::plan::parse(Source {
                name: "p.yaml",
                text: &text,
            })
            .expect("plan");
            assert!(v.is_empty(), "{v:?}");
            p
        };
        let none = PolicySet::default();
        let codes = |set: &PolicySet, p: &Plan| -> Vec<String> {
            set.check(&fleet, p, None).iter().map(|v| v.code.to_string()).collect()
        };
        assert!(codes(&none, &plan("[/var/cache/app]")).is_empty());
        let v = none.check(&fleet, &plan("[/root/.ssh]"), None);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].code.to_string(), "policy:fetch-writes");
        assert!(v[0].message.contains("/root/.ssh"), "{}", v[0].message);
        let site = parse("rules:\n  - {id: fw, kind: fetch-writes, paths: [/srv/cache]}\n").expect("rules");
        assert_eq!(codes(&site, &plan("[/srv/cache/x]")), Vec::<String>::new());
        assert_eq!(codes(&site, &plan("[/var/cache/app]")), ["policy:fw"]);
        assert!(parse("rules:\n  - {id: fw, kind: fetch-writes}\n").is_err());
    }

    #[test]
    fn max_in_flight_defaults_to_a_tenth_and_a_site_caps_it() {
        let fleet = Fleet::parse(Source {
            name: "x.yaml",
            text: "hosts:\n  - {id: a}\n",
        })
        .expect("fleet");
        let plan = |line: &str| -> Result<Plan, Vec<Violation>> {
            let text =
                format!("name: p\ntargets: {{hosts: [a]}}\nsteps: [{{name: s, run: x, writes: [/srv]}}]\n{line}");
            let (p, v) = crate::plan::parse(Source {
                name: "p.yaml",
                text: &text,
            })
            .map_err(|v| vec![*v])?;
            if v.is_empty() { Ok(p) } else { Err(v) }
        };
        let none = PolicySet::default();
        let default = plan("").expect("plan");
        // A tenth, rounded up, at least one, at most the wave.
        assert_eq!(none.in_flight_limits(&default, &[1, 5, 1000, 9000]), [1, 1, 100, 900]);
        let five = plan("max_in_flight: 5\n").expect("plan");
        assert_eq!(none.in_flight_limits(&five, &[1, 3, 50]), [1, 3, 5]);
        let all = plan("max_in_flight: 100%\n").expect("plan");
        assert_eq!(none.in_flight_limits(&all, &[7, 50]), [7, 50]);
        for bad in ["0", "0%", "-1", "150%", "many"] {
            let v = plan(&format!("max_in_flight: {bad}\n")).expect_err(bad);
            assert_eq!(v[0].code.to_string(), "parse-error", "{bad}: {v:?}");
            assert_eq!(v[0].field.as_deref(), Some("max_in_flight"), "{bad}");
            assert_eq!(v[0].line, Some(4), "{bad}: placed at its line");
        }
        let site = parse("rules:\n  - {id: slow, kind: max-in-flight, max_hosts: 20, max_share: 5%}\n").expect("rules");
        // A plan that says nothing is held to the site's limit.
        assert_eq!(site.in_flight_limits(&default, &[10, 1000, 9000]), [1, 20, 20]);
        // One that asks for more than the site allows is refused, placed.
        let a = fleet.hosts().next().expect("a host");
        let waves = vec![vec![a; 1000]];
        let (targets, _) = crate::targets::resolve(&fleet, &all.targets, "p.yaml");
        let v = site.check(&fleet, &all, Some((&targets, &waves)));
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].code.to_string(), "policy:slow");
        assert!(
            v[0].message
                .contains("1000 hosts of wave 1 (1000 hosts) run a step at once; the site allows at most 20"),
            "{}",
            v[0].message
        );
        assert_eq!((v[0].line, v[0].field.as_deref()), (Some(4), Some("max_in_flight")));
        assert!(
            site.check(
                &fleet,
                &plan("max_in_flight: 2%\n").expect("plan"),
                Some((&targets, &waves))
            )
            .is_empty()
        );
        assert!(
            parse("rules:\n  - {id: m, kind: max-in-flight}\n").is_err(),
            "a cap without a limit"
        );
    }

    #[test]
    fn redact_and_weaker_confinement_rules() {
        let set = parse(
            "rules:\n  - {id: r, kind: redact, patterns: ['customer-[0-9]+']}\n  - {id: w, kind: weaker-confinement, accept: [landlock]}\n",
        )
        .expect("valid");
        assert_eq!(set.redact(), ["customer-[0-9]+"]);
        assert_eq!(set.accept_weaker(), ["landlock"]);
        let errs = parse(
            "rules:\n  - {id: r, kind: redact, patterns: ['(']}\n  - {id: w, kind: weaker-confinement, accept: [apparmor]}\n",
        )
        .expect_err("invalid");
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs.iter().any(|e| e.field.as_deref() == Some("rules[1].accept[0]")),
            "{errs:?}"
        );
    }

    #[test]
    fn untouchable_and_snapshot_backend_rules() {
        let set = parse(
            "rules:\n  - {id: nfs, kind: untouchable, paths: [/srv/nfs, /mnt/backup/]}\n  - {id: tar, kind: snapshot-backend, backend: tar+zstd}\n",
        )
        .expect("valid");
        assert_eq!(set.untouchable(), ["/mnt/backup", "/srv/nfs"]);
        assert_eq!(set.snapshot_backend().as_deref(), Some("tar+zstd"));
        let errs = parse("rules:\n  - {id: b, kind: snapshot-backend, backend: zfs}\n  - {id: u, kind: untouchable}\n")
            .expect_err("invalid");
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert!(errs[0].message.contains("`zfs` is not a snapshot backend"), "{errs:#?}");
    }

    #[test]
    fn a_maintenance_window_rule_applies_to_waves_holding_its_groups() {
        let site = parse(
            "rules:\n  - id: biz-nights\n    kind: maintenance-window\n    groups: [g-biz]\n    windows:\n      - {days: [mon], start: \"02:00\", end: \"05:00\", tz: Europe/Berlin}\n",
        )
        .expect("rules");
        let fleet = Fleet::parse(Source {
            name: "f.yaml",
            text: "hosts:\n  - {id: a, groups: [g-biz]}\n  - {id: b, groups: [g-dns]}\n",
        })
        .expect("fleet");
        let (plan, v) = crate::plan::parse(Source {
            name: "p.yaml",
            text: "name: x\nsteps: [{name: s, run: r, writes: [/x]}]\n",
        })
        .expect("plan");
        assert!(v.is_empty(), "{v:?}");
        let a = fleet.lookup("a").expect("a");
        let b = fleet.lookup("b").expect("b");
        let sets = site.window_sets(&fleet, &plan, &[a, b]);
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].source, "policy:biz-nights");
        assert!(
            site.window_sets(&fleet, &plan, &[b]).is_empty(),
            "g-dns alone runs any time"
        );
        let errs = parse("rules:\n  - {id: w, kind: maintenance-window, windows: [{start: \"02:00\", end: \"05:00\", tz: Nowhere/Land}]}\n")
            .expect_err("an unknown zone");
        assert!(errs[0].message.contains("Nowhere/Land"), "{errs:?}");
    }

    #[test]
    fn an_updaters_rule_says_what_to_do_and_about_which_kinds() {
        let site =
            parse("rules:\n  - {id: hold, kind: updaters, action: hold, kinds: [apt-daily, unattended-upgrades]}\n")
                .expect("rules");
        let (id, action, kinds) = site.updaters().expect("the rule");
        assert_eq!((id, action), ("hold", crate::updaters::UpdaterAction::Hold));
        assert_eq!(
            kinds,
            [
                crate::updaters::UpdaterKind::AptDaily,
                crate::updaters::UpdaterKind::UnattendedUpgrades
            ]
        );
        let errs = parse("rules:\n  - {id: a, kind: updaters, action: pause}\n  - {id: b, kind: updaters, action: refuse, kinds: [yum-cron]}\n  - {id: c, kind: updaters}\n")
            .expect_err("refused");
        let messages: Vec<&str> = errs.iter().map(|v| v.message.as_str()).collect();
        assert!(
            messages.iter().any(|m| m.contains("`action: pause` is not an action")),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("`yum-cron` is not a kind of updater")),
            "{messages:?}"
        );
        assert!(
            messages.iter().any(|m| m.contains("rule `c` has no `action`")),
            "{messages:?}"
        );
    }

    #[test]
    fn rule_fields_are_checked_per_kind() {
        let errs = parse(
            "rules:
  - {id: a, kind: min-bake, min: 5m, max_hosts: 3}
  - {id: b, kind: no-such-kind}
  - {id: c, kind: label-cap, max_share: 50%}
  - {id: d, kind: canary-size}
  - {id: f, kind: require-health-checks}
  - {id: f, kind: require-expect-count}
  - {id: e, kind: destructive-command, patterns: ['(']}
",
        )
        .expect_err("invalid");
        let msgs: Vec<&str> = errs.iter().map(|v| v.message.as_str()).collect();
        assert!(
            errs.iter().all(|v| v.code == Code::ParseError && v.line.is_some()),
            "{errs:#?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("`max_hosts` does not apply to kind `min-bake`")),
            "{msgs:?}"
        );
        assert!(msgs.iter().any(|m| m.contains("not a rule kind")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("names no `label`")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("sets no limit")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("used twice")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("not a regular expression")), "{msgs:?}");
    }
}
