//! Target resolution: the plan's selection against the inventory, frozen into
//! an explicit, sorted list of hosts. There is no implicit "all hosts": an
//! empty selection, or one that resolves to nothing, is refused.

use std::collections::BTreeSet;

use crate::fleet::{Fleet, HostIdx};
use crate::plan::{Narrow, TargetSpec};
use crate::violation::{Code, Loc, Violation};

/// The frozen target list, sorted by host id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Targets {
    hosts: Vec<HostIdx>,
}

impl Targets {
    /// The hosts, sorted by id.
    pub fn hosts(&self) -> &[HostIdx] {
        &self.hosts
    }

    /// How many hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Build a target list directly (tests, the planner's own checks).
    pub fn from_hosts(fleet: &Fleet, hosts: impl IntoIterator<Item = HostIdx>) -> Targets {
        let mut hosts: Vec<HostIdx> = hosts.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
        hosts.sort_by(|a, b| fleet.id(*a).cmp(fleet.id(*b)));
        Targets { hosts }
    }
}

/// Resolve a selection; every unknown name is reported, not just the first.
pub fn resolve(fleet: &Fleet, spec: &TargetSpec, plan_file: &str) -> (Targets, Vec<Violation>) {
    let mut v = Vec::new();
    let targets_loc = spec.loc.clone().unwrap_or_else(|| Loc::file(plan_file));
    if !spec.selects_anything() {
        let why = if spec.loc.is_none() {
            "the plan has no `targets`"
        } else {
            "`targets` selects no hosts, groups or labels"
        };
        v.push(
            Violation::new(Code::TargetsMissing, format!("{why}; wavegate never defaults to all hosts"))
                .at(&targets_loc)
                .field("targets")
                .fix("name the hosts: `targets: {hosts: [p09, p10]}`, or groups, or labels; add `expect_count` to pin the number"),
        );
        return (Targets { hosts: Vec::new() }, v);
    }

    let mut selected: BTreeSet<HostIdx> = BTreeSet::new();
    for h in &spec.hosts {
        match fleet.lookup(&h.value) {
            Some(idx) => {
                selected.insert(idx);
            }
            None => v.push(unknown_host(fleet, &h.value, &h.loc, "targets.hosts")),
        }
    }
    for g in &spec.groups {
        match fleet.group(&g.value) {
            Some(members) => selected.extend(members.iter().copied()),
            None => v.push(
                Violation::new(
                    Code::UnknownGroup,
                    format!("no host of the inventory is in group `{}`", g.value),
                )
                .at(&g.loc)
                .field("targets.groups")
                .fix(format!("check the group name against `groups:` in {}", fleet.file())),
            ),
        }
    }
    if !spec.labels.is_empty() {
        let mut label_ok = true;
        for (key, value) in &spec.labels {
            let known = fleet
                .hosts()
                .any(|h| fleet.host(h).labels.get(key) == Some(&value.value));
            if !known {
                label_ok = false;
                let key_known = fleet.hosts().any(|h| fleet.host(h).labels.contains_key(key));
                let msg = if key_known {
                    format!("no host of the inventory has label `{key}: {}`", value.value)
                } else {
                    format!("no host of the inventory has a label `{key}`")
                };
                v.push(
                    Violation::new(Code::UnknownLabel, msg)
                        .at(&value.loc)
                        .field(format!("targets.labels.{key}"))
                        .fix(format!("check the label against `labels:` in {}", fleet.file())),
                );
            }
        }
        if label_ok {
            selected.extend(fleet.hosts().filter(|h| {
                let labels = &fleet.host(*h).labels;
                spec.labels.iter().all(|(k, want)| labels.get(k) == Some(&want.value))
            }));
        }
    }
    if let Some(narrow) = &spec.narrow {
        narrow_to(fleet, narrow, &mut selected, &mut v);
    }
    for x in &spec.exclude {
        match fleet.lookup(&x.value) {
            Some(idx) => {
                selected.remove(&idx);
            }
            None => v.push(unknown_host(fleet, &x.value, &x.loc, "targets.exclude")),
        }
    }
    let targets = Targets::from_hosts(fleet, selected);

    // Only "resolves to nothing" when the selection was otherwise sound:
    // an unknown name is the clearer report.
    if targets.is_empty() && v.is_empty() {
        v.push(
            Violation::new(
                Code::TargetsMissing,
                "the targets resolve to no host (everything selected is excluded, nothing matches every label, or `where` leaves none)",
            )
            .at(&targets_loc)
            .field("targets")
            .fix("check `targets` against the inventory; `labels` selects hosts carrying every label listed"),
        );
    }
    if let Some(expect) = &spec.expect_count
        && v.is_empty()
        && expect.value != targets.len()
    {
        v.push(
            Violation::new(
                Code::ExpectCountMismatch,
                format!("the targets resolve to {} hosts but `expect_count` is {}", targets.len(), expect.value),
            )
            .at(&expect.loc)
            .field("targets.expect_count")
            .hosts(targets.hosts().iter().map(|h| fleet.id(*h).to_owned()))
            .fix("check the selection against the resolved list above; change `expect_count` only if that list is what you meant"),
        );
    }
    (targets, v)
}

/// Keep only the hosts that meet every condition of `where:`. An unknown
/// group or label is reported like one in the selection itself.
fn narrow_to(fleet: &Fleet, narrow: &Narrow, selected: &mut BTreeSet<HostIdx>, v: &mut Vec<Violation>) {
    for g in &narrow.groups {
        match fleet.group(&g.value) {
            Some(members) => selected.retain(|h| members.contains(h)),
            None => v.push(
                Violation::new(
                    Code::UnknownGroup,
                    format!("no host of the inventory is in group `{}`", g.value),
                )
                .at(&g.loc)
                .field("targets.where.groups")
                .fix(format!("check the group name against `groups:` in {}", fleet.file())),
            ),
        }
    }
    for (key, want) in &narrow.labels {
        if !fleet
            .hosts()
            .any(|h| fleet.host(h).labels.get(key) == Some(&want.value))
        {
            v.push(
                Violation::new(
                    Code::UnknownLabel,
                    format!("no host of the inventory has label `{key}: {}`", want.value),
                )
                .at(&want.loc)
                .field(format!("targets.where.labels.{key}"))
                .fix(format!("check the label against `labels:` in {}", fleet.file())),
            );
        }
        selected.retain(|h| fleet.host(*h).labels.get(key) == Some(&want.value));
    }
    if !narrow.roles.is_empty() {
        selected.retain(|h| narrow.roles.contains(&fleet.host(*h).role));
    }
}

fn unknown_host(fleet: &Fleet, id: &str, loc: &Loc, field: &str) -> Violation {
    let close: Option<&str> = fleet
        .hosts()
        .map(|h| fleet.id(h))
        .filter(|known| strsim::levenshtein(known, id) <= 1)
        .min();
    let fix = match close {
        Some(c) => format!("did you mean `{c}`? Hosts must be in {}", fleet.file()),
        None => format!(
            "check the id against {}; a plan can only target hosts the inventory lists",
            fleet.file()
        ),
    };
    Violation::new(Code::UnknownHost, format!("the inventory has no host `{id}`"))
        .at(loc)
        .field(field)
        .hosts([id.to_owned()])
        .fix(fix)
}
