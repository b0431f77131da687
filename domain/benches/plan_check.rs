//! How long `plan check` takes on a large fleet: 10,000 hosts with 5,000
//! primary/backup pairs, 250 racks, every host targeted, sized waves, the
//! shipped default policies. Prints its figures; run with
//! `cargo bench -p wavegate-domain --bench plan_check`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use wavegate_domain::{Fleet, PolicySet, Source, check, check_sources};

const PAIRS: usize = 5_000;

fn inventory() -> String {
    let mut s = String::with_capacity(PAIRS * 400);
    s.push_str("hosts:\n");
    for i in 0..PAIRS {
        let _ = write!(
            s,
            "  - id: p{i:05}\n    address: 10.{}.{}.{}\n    groups: [g-{}]\n    labels: {{os: debian{}, customer: c{:04}, rack: r{:03}}}\n    failure_domain: dc1-r{:03}\n    role: primary\n",
            i / 65536,
            (i / 256) % 256,
            i % 256,
            i % 20,
            11 + i % 2,
            i / 2,
            i % 125,
            i % 125,
        );
        let _ = write!(
            s,
            "  - id: b{i:05}\n    groups: [g-{}-backup]\n    labels: {{os: debian12, rack: r{:03}}}\n    failure_domain: dc2-r{:03}\n    role: backup\n    backup_of: [p{i:05}]\n",
            i % 20,
            125 + i % 125,
            125 + i % 125,
        );
    }
    s
}

fn plan() -> String {
    let groups: Vec<String> = (0..20)
        .flat_map(|g| [format!("g-{g}"), format!("g-{g}-backup")])
        .collect();
    format!(
        "name: fleet-wide-openssl
targets:
  groups: [{}]
  expect_count: {}
steps:
  - name: upgrade openssl
    run: apt-get install -y --only-upgrade openssl
    writes: [/usr/lib/x86_64-linux-gnu, /var/lib/dpkg]
waves:
  - size: 1
  - size: 10%
  - size: 25%
health:
  checks: [{{name: ssh, tcp: \"127.0.0.1:22\"}}]
  bake: 10m
",
        groups.join(", "),
        PAIRS * 2
    )
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, Duration, T) {
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let start = Instant::now();
        last = Some(f());
        times.push(start.elapsed());
    }
    times.sort();
    (times[0], times[times.len() / 2], last.expect("at least one run"))
}

fn main() {
    let fleet_text = inventory();
    let plan_text = plan();
    let policies = PolicySet::parse(&[Source {
        name: "policies/default.yaml",
        text: include_str!("../../policies/default.yaml"),
    }])
    .expect("shipped policies load");
    let fleet_src = Source {
        name: "fleet.yaml",
        text: &fleet_text,
    };
    let plan_src = Source {
        name: "plan.yaml",
        text: &plan_text,
    };
    let runs = 7;

    println!(
        "plan check benchmark: {} hosts, {} backup pairs, inventory {:.1} MB, {runs} runs each",
        PAIRS * 2,
        PAIRS,
        fleet_text.len() as f64 / 1e6
    );

    let (min, med, fleet) = time(runs, || Fleet::parse(fleet_src).expect("valid fleet"));
    println!(
        "  parse + validate inventory      min {:>8.1} ms   median {:>8.1} ms",
        ms(min),
        ms(med)
    );

    let (min, med, report) = time(runs, || check(&fleet, plan_src, &policies));
    assert!(
        report.ok,
        "the benchmark plan must pass: {:#?}",
        &report.violations[..report.violations.len().min(3)]
    );
    println!(
        "  resolve + plan waves + policies min {:>8.1} ms   median {:>8.1} ms",
        ms(min),
        ms(med)
    );

    let (min, med, report) = time(runs, || check_sources(fleet_src, plan_src, &policies));
    println!(
        "  whole plan check (from text)    min {:>8.1} ms   median {:>8.1} ms",
        ms(min),
        ms(med)
    );
    let sizes: Vec<usize> = report.waves.iter().map(|w| w.hosts.len()).collect();
    println!(
        "  waves: {} ({:?}...), targets: {}",
        sizes.len(),
        &sizes[..sizes.len().min(6)],
        report.targets.len()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
