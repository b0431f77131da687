//! Property tests for the wave planner and the wave checker, over random
//! fleets with backup chains and multi-primary backups, random targets and
//! random wave sizes.

use std::collections::{BTreeSet, HashMap};

use proptest::prelude::*;
use wavegate_domain::units::Amount;
use wavegate_domain::waves::{self, Attribute, Cap};
use wavegate_domain::{Code, Fleet, HostIdx, Loc, Source, Targets};

/// A random fleet description: host i may back up any hosts before it (so the
/// graph is acyclic), giving chains and multi-primary backups.
#[derive(Clone, Debug)]
struct FleetSpec {
    hosts: Vec<HostSpec>,
}

#[derive(Clone, Debug)]
struct HostSpec {
    backup_of: Vec<usize>,
    failure_domain: Option<u8>,
    group: u8,
    os: u8,
}

fn fleet_spec() -> impl Strategy<Value = FleetSpec> {
    (1usize..36).prop_flat_map(|n| {
        let hosts = (0..n)
            .map(|i| {
                let backups = if i == 0 {
                    Just(Vec::new()).boxed()
                } else {
                    prop_oneof![
                        3 => Just(Vec::new()),
                        2 => proptest::collection::vec(0..i, 1..=3.min(i)),
                    ]
                    .boxed()
                };
                (backups, proptest::option::of(0u8..5), 0u8..4, 0u8..3).prop_map(|(b, fd, group, os)| HostSpec {
                    backup_of: b.into_iter().collect::<BTreeSet<_>>().into_iter().collect(),
                    failure_domain: fd,
                    group,
                    os,
                })
            })
            .collect::<Vec<_>>();
        hosts.prop_map(|hosts| FleetSpec { hosts })
    })
}

fn yaml(spec: &FleetSpec, order: &[usize]) -> String {
    let mut out = String::from("hosts:\n");
    for &i in order {
        let h = &spec.hosts[i];
        out.push_str(&format!(
            "  - id: h{i:03}\n    groups: [g{}]\n    labels: {{os: os{}}}\n",
            h.group, h.os
        ));
        if let Some(fd) = h.failure_domain {
            out.push_str(&format!("    failure_domain: fd{fd}\n"));
        }
        if h.backup_of.is_empty() {
            out.push_str("    role: primary\n");
        } else {
            let ids: Vec<String> = h.backup_of.iter().map(|p| format!("h{p:03}")).collect();
            out.push_str(&format!("    role: backup\n    backup_of: [{}]\n", ids.join(", ")));
        }
    }
    out
}

fn parse(text: &str) -> Fleet {
    Fleet::parse(Source {
        name: "fleet.yaml",
        text,
    })
    .expect("generated fleets are valid")
}

fn amount() -> impl Strategy<Value = Amount> {
    prop_oneof![(1u64..8).prop_map(Amount::Count), (1u8..=100).prop_map(Amount::Percent)]
}

fn caps_strategy() -> impl Strategy<Value = Vec<Cap>> {
    let cap = |attribute: Attribute, id: &'static str| {
        (proptest::option::of(1u64..4), proptest::option::of(1u8..=100)).prop_map(move |(max_hosts, max_share)| Cap {
            rule_id: id.into(),
            loc: Loc::default(),
            attribute: attribute.clone(),
            max_hosts,
            max_share,
        })
    };
    prop_oneof![
        2 => Just(Vec::new()),
        1 => cap(Attribute::FailureDomain, "fd").prop_map(|c| vec![c]),
        1 => (cap(Attribute::FailureDomain, "fd"), cap(Attribute::Label("os".into()), "os")).prop_map(|(a, b)| vec![a, b]),
    ]
}

struct Case {
    fleet: Fleet,
    targets: Targets,
}

fn case(spec: &FleetSpec, mask: &[bool]) -> Option<Case> {
    let order: Vec<usize> = (0..spec.hosts.len()).collect();
    let fleet = parse(&yaml(spec, &order));
    let chosen: Vec<HostIdx> = (0..spec.hosts.len())
        .filter(|i| mask.get(*i).copied().unwrap_or(true))
        .filter_map(|i| fleet.lookup(&format!("h{i:03}")))
        .collect();
    if chosen.is_empty() {
        return None;
    }
    let targets = Targets::from_hosts(&fleet, chosen);
    Some(Case { fleet, targets })
}

fn wave_index(waves: &[Vec<HostIdx>]) -> HashMap<HostIdx, usize> {
    waves
        .iter()
        .enumerate()
        .flat_map(|(i, w)| w.iter().map(move |h| (*h, i)))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, .. ProptestConfig::default() })]

    #[test]
    fn generated_waves_keep_every_rule(
        spec in fleet_spec(),
        mask in proptest::collection::vec(proptest::bool::weighted(0.8), 36),
        sizes in proptest::collection::vec(amount(), 1..5),
        caps in caps_strategy(),
    ) {
        let Some(Case { fleet, targets }) = case(&spec, &mask) else { return Ok(()) };
        let generated = waves::generate(&fleet, &targets, &sizes, &caps);
        let waves = &generated.waves;
        let at = wave_index(waves);

        // 1. Every target exactly once, nothing else.
        let placed: usize = waves.iter().map(Vec::len).sum();
        prop_assert_eq!(placed, targets.len(), "a host placed twice or missed");
        let target_set: BTreeSet<HostIdx> = targets.hosts().iter().copied().collect();
        let wave_set: BTreeSet<HostIdx> = at.keys().copied().collect();
        prop_assert_eq!(&wave_set, &target_set);
        prop_assert!(waves.iter().all(|w| !w.is_empty()), "empty wave");

        // 2 and 3. A backup (direct or through a chain) is strictly later.
        for &h in targets.hosts() {
            for b in fleet.backups_transitive(h) {
                if let Some(&wb) = at.get(&b) {
                    prop_assert!(wb > at[&h], "{} (wave {}) backs up {} (wave {})", fleet.id(b), wb + 1, fleet.id(h), at[&h] + 1);
                }
            }
        }

        // 4. The canary has exactly the first size when that many targets
        //    may go first and no cap stands in the way.
        let first = sizes[0].of(targets.len()).max(1);
        let roots = targets.hosts().iter().filter(|h| fleet.primaries_transitive(**h).iter().all(|p| !target_set.contains(p))).count();
        if caps.is_empty() {
            prop_assert_eq!(waves[0].len(), first.min(roots));
        } else {
            prop_assert!(waves[0].len() <= first);
        }
        if waves[0].len() < first.min(targets.len()) {
            prop_assert!(!generated.notes.is_empty(), "a short canary must be explained");
        }

        // The checker agrees: no backup rule and no cap is broken.
        let problems = waves::check(&fleet, &targets, waves, &[Loc::default()], &caps);
        prop_assert!(problems.is_empty(), "{:#?}", problems);

        // 5. Same inputs, same waves; and the inventory's order does not matter.
        prop_assert_eq!(&waves::generate(&fleet, &targets, &sizes, &caps), &generated);
        let reversed: Vec<usize> = (0..spec.hosts.len()).rev().collect();
        let fleet2 = parse(&yaml(&spec, &reversed));
        let targets2 = Targets::from_hosts(&fleet2, targets.hosts().iter().map(|h| fleet2.lookup(fleet.id(*h)).expect("same ids")));
        let ids = |f: &Fleet, w: &[Vec<HostIdx>]| -> Vec<Vec<String>> { w.iter().map(|w| w.iter().map(|h| f.id(*h).to_owned()).collect()).collect() };
        prop_assert_eq!(ids(&fleet2, &waves::generate(&fleet2, &targets2, &sizes, &caps).waves), ids(&fleet, waves));
    }

    #[test]
    fn explicit_waves_breaking_the_backup_rules_are_refused(
        spec in fleet_spec(),
        pick in any::<proptest::sample::Index>(),
        before in any::<bool>(),
    ) {
        let all = vec![true; spec.hosts.len()];
        let Some(Case { fleet, targets }) = case(&spec, &all) else { return Ok(()) };
        let pairs: Vec<(HostIdx, HostIdx)> = targets
            .hosts()
            .iter()
            .flat_map(|p| fleet.backups_transitive(*p).into_iter().map(move |b| (*p, b)))
            .collect();
        if pairs.is_empty() {
            return Ok(());
        }
        let (primary, backup) = pairs[pick.index(pairs.len())];
        // Start from valid waves, then break exactly one relation.
        let mut waves = waves::generate(&fleet, &targets, &[Amount::Count(1)], &[]).waves;
        for w in &mut waves {
            w.retain(|h| *h != backup);
        }
        let p_wave = waves.iter().position(|w| w.contains(&primary)).expect("primary placed");
        let expected = if before {
            waves.insert(p_wave, vec![backup]);
            Code::BackupBeforePrimary
        } else {
            waves[p_wave].push(backup);
            Code::PairSameWave
        };
        waves.retain(|w| !w.is_empty());
        let problems = waves::check(&fleet, &targets, &waves, &[Loc::default()], &[]);
        let names = BTreeSet::from([fleet.id(primary).to_owned(), fleet.id(backup).to_owned()]);
        prop_assert!(
            problems.iter().any(|v| v.code == expected && v.hosts.iter().cloned().collect::<BTreeSet<_>>() == names),
            "expected {} naming {:?}, got {:#?}", expected, names, problems
        );
    }
}
