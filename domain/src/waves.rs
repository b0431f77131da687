//! The wave planner and the wave checker.
//!
//! Generated waves obey, by construction:
//! 1. every target is in exactly one wave, and nothing else is in any;
//! 2. no wave holds a host together with a host that backs it up, directly or
//!    through a chain;
//! 3. every backup's wave comes after every wave holding one of its primaries;
//! 4. the first wave (the canary) has exactly the first size, unless fewer
//!    targets may go first (then every one that may, and a note says why);
//! 5. the same inputs give the same waves;
//! 6. each wave spreads over failure domains and groups, and the canary covers
//!    as many groups, failure domains and label values as its size allows.
//!
//! [`check`] verifies 1-3 (and the policy caps) for any waves, explicit or
//! generated, so a planner bug is refused rather than run.
//!
//! Sizes are per wave, in the manner of Ansible's `serial` list: a percentage is
//! of all targets, rounded up; the last size repeats until every target is
//! placed. A wave may come out smaller than its size when the ordering rule or
//! a policy cap leaves fewer hosts eligible; the planner then adds waves.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};

use crate::fleet::{Fleet, HostIdx};
use crate::targets::Targets;
use crate::units::Amount;
use crate::violation::{Code, Loc, Violation};

/// A host attribute a cap counts by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attribute {
    /// The host's failure domain (hosts without one are each alone).
    FailureDomain,
    /// The value of a label; hosts without the label are not counted.
    Label(String),
}

/// "At most this many hosts sharing one value of `attribute` in a wave": a
/// site policy rule that the planner honours and the checker enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cap {
    /// The policy rule it comes from (reported as `policy:<id>`).
    pub rule_id: String,
    /// Where the rule is written.
    pub loc: Loc,
    /// What hosts are counted by.
    pub attribute: Attribute,
    /// Absolute limit per wave.
    pub max_hosts: Option<u64>,
    /// Limit as a share of the targets holding that value, rounded up.
    pub max_share: Option<u8>,
}

impl Cap {
    /// The class a host falls in, if it is counted at all.
    fn class_of<'f>(&self, fleet: &'f Fleet, h: HostIdx) -> Option<&'f str> {
        let host = fleet.host(h);
        match &self.attribute {
            Attribute::FailureDomain => host.failure_domain.as_deref(),
            Attribute::Label(key) => host.labels.get(key).map(String::as_str),
        }
    }

    /// The limit for a class holding `class_size` targets; never below one,
    /// so that a wave can always make progress.
    pub fn limit(&self, class_size: usize) -> usize {
        let by_count = self
            .max_hosts
            .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
        let by_share = self.max_share.map_or(usize::MAX, |p| Amount::Percent(p).of(class_size));
        by_count.min(by_share).max(1)
    }

    fn describe(&self) -> String {
        match &self.attribute {
            Attribute::FailureDomain => "hosts of one failure domain".into(),
            Attribute::Label(k) => format!("hosts with one value of label `{k}`"),
        }
    }
}

/// Per-wave bookkeeping of every cap.
struct CapState<'a> {
    caps: &'a [Cap],
    /// For each cap, the limit per class.
    limits: Vec<HashMap<&'a str, usize>>,
    /// For each cap, the count per class in the wave being filled.
    counts: Vec<HashMap<&'a str, usize>>,
}

impl<'a> CapState<'a> {
    fn new(fleet: &'a Fleet, targets: &Targets, caps: &'a [Cap]) -> CapState<'a> {
        let limits = caps
            .iter()
            .map(|cap| {
                let mut sizes: HashMap<&str, usize> = HashMap::new();
                for h in targets.hosts() {
                    if let Some(c) = cap.class_of(fleet, *h) {
                        *sizes.entry(c).or_default() += 1;
                    }
                }
                sizes.into_iter().map(|(c, n)| (c, cap.limit(n))).collect()
            })
            .collect();
        CapState {
            caps,
            limits,
            counts: vec![HashMap::new(); caps.len()],
        }
    }

    fn new_wave(&mut self) {
        self.counts.iter_mut().for_each(HashMap::clear);
    }

    /// The first cap that adding `h` would break, if any.
    fn blocking(&self, fleet: &'a Fleet, h: HostIdx) -> Option<&'a Cap> {
        self.caps.iter().enumerate().find_map(|(i, cap)| {
            let class = cap.class_of(fleet, h)?;
            let have = self.counts[i].get(class).copied().unwrap_or(0);
            let limit = self.limits[i].get(class).copied().unwrap_or(1);
            (have >= limit).then_some(cap)
        })
    }

    fn add(&mut self, fleet: &'a Fleet, h: HostIdx) {
        for (i, cap) in self.caps.iter().enumerate() {
            if let Some(class) = cap.class_of(fleet, h) {
                *self.counts[i].entry(class).or_default() += 1;
            }
        }
    }
}

/// Waves produced by the planner, with notes where they differ from the sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generated {
    /// The waves; each sorted by host id.
    pub waves: Vec<Vec<HostIdx>>,
    /// Why a wave is smaller than its size, where it is.
    pub notes: Vec<String>,
}

/// Order hosts so that every prefix takes from each class in proportion to the
/// class's size: host `j` of a class of `n` sits at `(2j+1)/2n`. Stable within
/// a class, ties broken by class key, so the result is deterministic.
fn interleave<K: Ord + Clone>(hosts: Vec<HostIdx>, class: impl Fn(HostIdx) -> K) -> Vec<HostIdx> {
    let mut by_class: BTreeMap<K, Vec<HostIdx>> = BTreeMap::new();
    for h in hosts {
        by_class.entry(class(h)).or_default().push(h);
    }
    let mut keyed: Vec<(u64, u64, &K, HostIdx)> = Vec::new();
    for (k, members) in &by_class {
        let n = members.len() as u64;
        for (j, h) in members.iter().enumerate() {
            keyed.push((2 * j as u64 + 1, 2 * n, k, *h));
        }
    }
    keyed.sort_by(|a, b| {
        (u128::from(a.0) * u128::from(b.1))
            .cmp(&(u128::from(b.0) * u128::from(a.1)))
            .then_with(|| a.2.cmp(b.2))
    });
    keyed.into_iter().map(|(_, _, _, h)| h).collect()
}

/// The planner's preference order: spread over failure domains, and within a
/// failure domain over groups.
fn spread_order(fleet: &Fleet, targets: &Targets) -> Vec<HostIdx> {
    let by_group = interleave(targets.hosts().to_vec(), |h| {
        fleet.host(h).groups.iter().cloned().collect::<Vec<_>>().join(",")
    });
    interleave(by_group, |h| {
        let host = fleet.host(h);
        match &host.failure_domain {
            Some(fd) => (0u8, fd.clone()),
            // A host with no failure domain fails alone.
            None => (1u8, host.id.clone()),
        }
    })
}

/// The attribute values a host contributes to the canary's coverage.
fn coverage_keys(fleet: &Fleet, h: HostIdx) -> Vec<String> {
    let host = fleet.host(h);
    let mut keys: Vec<String> = host.groups.iter().map(|g| format!("g\u{0}{g}")).collect();
    keys.extend(host.labels.iter().map(|(k, v)| format!("l\u{0}{k}\u{0}{v}")));
    if let Some(fd) = &host.failure_domain {
        keys.push(format!("f\u{0}{fd}"));
    }
    keys
}

/// Generate waves for `targets` from per-wave `sizes` (at least one).
pub fn generate(fleet: &Fleet, targets: &Targets, sizes: &[Amount], caps: &[Cap]) -> Generated {
    let n = targets.len();
    let mut out = Generated {
        waves: Vec::new(),
        notes: Vec::new(),
    };
    if n == 0 || sizes.is_empty() {
        return out;
    }
    let target_set: HashSet<HostIdx> = targets.hosts().iter().copied().collect();
    // For every target, the targets that must be in strictly earlier waves.
    let mut pending: HashMap<HostIdx, usize> = HashMap::with_capacity(n);
    let mut waiting_on: HashMap<HostIdx, Vec<HostIdx>> = HashMap::new();
    for &t in targets.hosts() {
        let ancestors: Vec<HostIdx> = fleet
            .primaries_transitive(t)
            .into_iter()
            .filter(|a| target_set.contains(a))
            .collect();
        pending.insert(t, ancestors.len());
        for a in ancestors {
            waiting_on.entry(a).or_default().push(t);
        }
    }
    let order = spread_order(fleet, targets);
    let position: HashMap<HostIdx, usize> = order.iter().enumerate().map(|(i, h)| (*h, i)).collect();
    let mut remaining = order;
    let mut caps_state = CapState::new(fleet, targets, caps);

    while !remaining.is_empty() {
        let k = out.waves.len();
        let size = sizes.get(k).or(sizes.last()).map_or(1, |s| s.of(n)).max(1);
        caps_state.new_wave();
        let mut capped_by: BTreeSet<&str> = BTreeSet::new();
        let mut picked: Vec<HostIdx> = Vec::with_capacity(size.min(remaining.len()));
        if k == 0 {
            // The canary: greedy maximum coverage of groups, label values and
            // failure domains (lazy evaluation: gains only shrink).
            let mut covered: HashSet<String> = HashSet::new();
            let mut heap: BinaryHeap<(usize, Reverse<usize>, HostIdx)> = remaining
                .iter()
                .filter(|h| pending[*h] == 0)
                .map(|h| (coverage_keys(fleet, *h).len(), Reverse(position[h]), *h))
                .collect();
            while picked.len() < size {
                let Some((stale, pos, h)) = heap.pop() else { break };
                let gain = coverage_keys(fleet, h)
                    .into_iter()
                    .filter(|c| !covered.contains(c))
                    .count();
                if gain < stale {
                    heap.push((gain, pos, h));
                    continue;
                }
                if let Some(cap) = caps_state.blocking(fleet, h) {
                    capped_by.insert(&cap.rule_id);
                    continue;
                }
                caps_state.add(fleet, h);
                covered.extend(coverage_keys(fleet, h));
                picked.push(h);
            }
        } else {
            for &h in &remaining {
                if picked.len() == size {
                    break;
                }
                if pending[&h] != 0 {
                    continue;
                }
                if let Some(cap) = caps_state.blocking(fleet, h) {
                    capped_by.insert(&cap.rule_id);
                    continue;
                }
                caps_state.add(fleet, h);
                picked.push(h);
            }
        }
        if picked.is_empty() {
            // Unreachable for a valid fleet (a DAG always has a ready host and
            // caps are at least one); the checker will refuse the result.
            out.notes.push(format!(
                "the planner could not place {} hosts; refusing to guess",
                remaining.len()
            ));
            break;
        }
        if picked.len() < size && picked.len() < remaining.len() {
            let mut why = Vec::new();
            let ready = remaining.iter().filter(|h| pending[*h] == 0).count();
            if ready < size {
                why.push(format!(
                    "only {ready} of the remaining targets may go now (the others back up hosts still to be patched)"
                ));
            }
            if !capped_by.is_empty() {
                let rules: Vec<&str> = capped_by.into_iter().collect();
                why.push(format!(
                    "policy {} caps how many alike hosts one wave may hold",
                    rules.join(", ")
                ));
            }
            let label = if k == 0 {
                "wave 1 (the canary)".to_string()
            } else {
                format!("wave {}", k + 1)
            };
            out.notes.push(format!(
                "{label} holds {} hosts, not {size}: {}",
                picked.len(),
                why.join("; ")
            ));
        }
        let picked_set: HashSet<HostIdx> = picked.iter().copied().collect();
        remaining.retain(|h| !picked_set.contains(h));
        for h in &picked {
            for d in waiting_on.get(h).map(Vec::as_slice).unwrap_or(&[]) {
                if let Some(p) = pending.get_mut(d) {
                    *p -= 1;
                }
            }
        }
        picked.sort_by(|a, b| fleet.id(*a).cmp(fleet.id(*b)));
        out.waves.push(picked);
    }
    out
}

/// Resolve explicit waves to hosts, refusing unknown hosts, hosts that are not
/// targets, hosts in two waves and targets in none.
pub fn resolve_explicit(
    fleet: &Fleet,
    targets: &Targets,
    waves: &[crate::plan::At<Vec<crate::plan::At<String>>>],
    waves_loc: &Loc,
) -> (Vec<Vec<HostIdx>>, Vec<Violation>) {
    let target_set: HashSet<HostIdx> = targets.hosts().iter().copied().collect();
    let mut placed: HashMap<HostIdx, usize> = HashMap::new();
    let mut v = Vec::new();
    let mut out = Vec::with_capacity(waves.len());
    for (i, wave) in waves.iter().enumerate() {
        let mut hosts = Vec::new();
        for h in &wave.value {
            let field = format!("waves[{i}].hosts");
            let Some(idx) = fleet.lookup(&h.value) else {
                v.push(
                    Violation::new(
                        Code::UnknownHost,
                        format!("wave {} names `{}`, which the inventory does not have", i + 1, h.value),
                    )
                    .at(&h.loc)
                    .field(field)
                    .hosts([h.value.clone()])
                    .fix(format!("check the id against {}", fleet.file())),
                );
                continue;
            };
            if !target_set.contains(&idx) {
                v.push(
                    Violation::new(Code::WaveInvalid, format!("wave {} names `{}`, which is not one of the plan's targets", i + 1, h.value))
                        .at(&h.loc)
                        .field(field)
                        .hosts([h.value.clone()])
                        .fix("add the host to `targets`, or take it out of the wave: nothing outside the targets is ever touched"),
                );
                continue;
            }
            if let Some(first) = placed.insert(idx, i) {
                v.push(
                    Violation::new(
                        Code::WaveInvalid,
                        format!("`{}` is in wave {} and again in wave {}", h.value, first + 1, i + 1),
                    )
                    .at(&h.loc)
                    .field(field)
                    .hosts([h.value.clone()])
                    .fix("put every host in exactly one wave"),
                );
                continue;
            }
            hosts.push(idx);
        }
        hosts.sort_by(|a, b| fleet.id(*a).cmp(fleet.id(*b)));
        out.push(hosts);
    }
    let missing: Vec<String> = targets
        .hosts()
        .iter()
        .filter(|h| !placed.contains_key(h))
        .map(|h| fleet.id(*h).to_owned())
        .collect();
    if !missing.is_empty() {
        v.push(
            Violation::new(
                Code::WaveInvalid,
                format!("{} targets are in no wave: {}", missing.len(), missing.join(", ")),
            )
            .at(waves_loc)
            .field("waves")
            .hosts(missing)
            .fix("add them to a wave, or use `size:` waves and let wavegate place every target"),
        );
    }
    (out, v)
}

/// Check waves against the backup rules (2 and 3) and the policy caps. `locs`
/// gives each wave's location (generated waves point at `waves:`).
pub fn check(fleet: &Fleet, targets: &Targets, waves: &[Vec<HostIdx>], locs: &[Loc], caps: &[Cap]) -> Vec<Violation> {
    let mut v = Vec::new();
    let wave_of: HashMap<HostIdx, usize> = waves
        .iter()
        .enumerate()
        .flat_map(|(i, w)| w.iter().map(move |h| (*h, i)))
        .collect();
    let loc_for = |i: usize| locs.get(i).or(locs.last()).cloned().unwrap_or_default();
    for (i, wave) in waves.iter().enumerate() {
        for &primary in wave {
            for backup in fleet.backups_transitive(primary) {
                let Some(&j) = wave_of.get(&backup) else { continue };
                if j > i {
                    continue;
                }
                let (p, b) = (fleet.id(primary), fleet.id(backup));
                let how = if fleet.direct_backups(primary).any(|d| d == backup) {
                    "backs up"
                } else {
                    "backs up (through a chain of backups)"
                };
                if i == j {
                    v.push(
                        Violation::new(Code::PairSameWave, format!("wave {}: `{b}` {how} `{p}`, and both are in this wave", i + 1))
                            .at(&loc_for(i))
                            .field(format!("waves[{i}]"))
                            .hosts([p, b])
                            .fix(format!("move `{b}` to a wave after `{p}`'s: one change must never reach a host and its backup at once")),
                    );
                } else {
                    v.push(
                        Violation::new(
                            Code::BackupBeforePrimary,
                            format!("`{b}` (wave {}) {how} `{p}`, which is only patched in wave {}", j + 1, i + 1),
                        )
                        .at(&loc_for(j))
                        .field(format!("waves[{j}]"))
                        .hosts([p, b])
                        .fix(format!("move `{b}` to a wave after wave {}: a backup is touched only once its primaries' wave is confirmed healthy", i + 1)),
                    );
                }
            }
        }
    }
    let state = CapState::new(fleet, targets, caps);
    for (i, wave) in waves.iter().enumerate() {
        for (c, cap) in caps.iter().enumerate() {
            let mut by_class: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for h in wave {
                if let Some(class) = cap.class_of(fleet, *h) {
                    by_class.entry(class).or_default().push(fleet.id(*h));
                }
            }
            for (class, hosts) in by_class {
                let limit = state.limits[c].get(class).copied().unwrap_or(1);
                if hosts.len() > limit {
                    v.push(
                        Violation::new(
                            Code::Policy(cap.rule_id.clone()),
                            format!(
                                "wave {} holds {} {} (`{class}`); the policy allows {limit}",
                                i + 1,
                                hosts.len(),
                                cap.describe()
                            ),
                        )
                        .at(&loc_for(i))
                        .field(format!("waves[{i}]"))
                        .hosts(hosts.iter().map(|h| (*h).to_owned()))
                        .fix(format!(
                            "spread these hosts over more waves (rule `{}` at {})",
                            cap.rule_id, cap.loc
                        )),
                    );
                }
            }
        }
    }
    v
}

/// Order of violations for display: by file position, then code.
pub fn sort_violations(v: &mut [Violation]) {
    v.sort_by(|a, b| {
        let pos = |x: &Violation| (x.file.clone(), x.line.unwrap_or(0), x.column.unwrap_or(0));
        pos(a)
            .cmp(&pos(b))
            .then_with(|| a.code.cmp(&b.code))
            .then_with(|| a.hosts.cmp(&b.hosts))
    });
}
