//! The engine's decisions, in process and without root: a scripted agent
//! per host answers through the hub, and each test drives a rollout to a
//! halt or to its end. What is checked is what the engine decided (halt or
//! not, which hosts got a step, what a resume retries), not how a real
//! host carries a step out; the labs do that.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Script;
use wavegate::engine::{Engine, Entry};
use wavegate_domain::rollout::{Control, HostState, RolloutState, WaveState};

const FLEET: &str = "hosts:
  - {id: h1}
  - {id: h2}
  - {id: h3}
  - {id: h4}
  - {id: h5}
";

const HOSTS: [&str; 5] = ["h1", "h2", "h3", "h4", "h5"];

struct Rig {
    engine: Arc<Engine>,
    script: Arc<Script>,
    dir: std::path::PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn rig(name: &str) -> Rig {
    let dir = std::env::temp_dir().join(format!("wavegate-decisions-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let script = Arc::new(Script::default());
    let engine = common::engine(&dir, FLEET, &HOSTS, &script).await;
    engine.start();
    Rig { engine, script, dir }
}

/// A plan over the five hosts: a canary of one, then the other four.
fn plan(budget: &str, on_failure: &str, checks: bool) -> String {
    let health = if checks {
        "health: {checks: [{name: up, exec: 'true'}], bake: 0s, interval: 10ms}\n"
    } else {
        "health: {bake: 0s}\n"
    };
    format!(
        "name: t
targets: {{hosts: [h1, h2, h3, h4, h5]}}
steps: [{{name: s, run: 'true', writes: [/etc/x]}}]
waves: [{{size: 1}}, {{size: 100%}}]
failure_budget: {{canary: 0, wave: {budget}}}
on_failure: {on_failure}
{health}"
    )
}

impl Rig {
    async fn run(&self, yaml: &str) -> String {
        let (entry, _) = self
            .engine
            .submit("sam", "sam@x", "plan.yaml", yaml, &[])
            .await
            .expect("submit");
        let id = entry.rollout.id.clone();
        self.engine.approve("ann", "ann@x", &id, "").await.expect("approve");
        id
    }

    /// Wait, on the engine's own change notices, until `done` holds.
    async fn until(&self, id: &str, what: &str, done: impl Fn(&Entry) -> bool) -> Entry {
        let mut changes = self.engine.subscribe();
        let wait = async {
            loop {
                let e = self.engine.get(id).await.expect("rollout");
                if done(&e) {
                    return e;
                }
                let _ = changes.changed().await;
            }
        };
        match tokio::time::timeout(Duration::from_secs(30), wait).await {
            Ok(e) => e,
            Err(_) => panic!(
                "rollout {id} never got {what}: {:?}",
                self.engine.get(id).await.map(|e| e.rollout.events)
            ),
        }
    }

    async fn until_state(&self, id: &str, state: RolloutState) -> Entry {
        self.until(id, &format!("{state:?}"), |e| {
            e.rollout.state == state && !e.rollout.rollback_pending
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_canary_halts_before_any_other_host_is_sent_its_step() {
    let rig = rig("canary").await;
    let id = rig.run(&plan("0", "halt", false)).await;
    let canary = rig.engine.get(&id).await.expect("rollout").rollout.waves[0].hosts[0].clone();
    rig.script.fail_step([&canary]);
    let e = rig.until_state(&id, RolloutState::Halted).await;
    let reason = e.rollout.halt_reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with("the canary (wave 1): 1 of 1 hosts failed, budget 0"),
        "{reason}"
    );
    assert_eq!(e.rollout.waves[1].state, WaveState::Pending);
    for h in HOSTS.iter().filter(|h| **h != canary) {
        assert_eq!(rig.script.steps_of(h), 0, "{h} was sent a step after the canary failed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_within_its_budget_goes_on_and_one_over_it_halts() {
    // Budget 1 of the second wave's 4: one failure is tolerated.
    let rig = rig("budget").await;
    let id = rig.run(&plan("1", "halt", false)).await;
    let wave2 = rig.engine.get(&id).await.expect("rollout").rollout.waves[1]
        .hosts
        .clone();
    rig.script.fail_step([&wave2[0]]);
    let e = rig.until_state(&id, RolloutState::Completed).await;
    assert_eq!(e.hosts[&wave2[0]].state, HostState::Failed);
    let healthy = e.hosts.values().filter(|h| h.state == HostState::Healthy).count();
    assert_eq!(healthy, 4, "the other four are healthy");

    // Two of four is over a budget of one.
    let id = rig.run(&plan("1", "halt", false)).await;
    let wave2 = rig.engine.get(&id).await.expect("rollout").rollout.waves[1]
        .hosts
        .clone();
    rig.script.fail_step([&wave2[0], &wave2[1]]);
    let e = rig.until_state(&id, RolloutState::Halted).await;
    let reason = e.rollout.halt_reason.clone().unwrap_or_default();
    assert!(reason.starts_with("wave 2: 2 of 4 hosts failed, budget 1"), "{reason}");
    assert_eq!(e.rollout.waves[1].state, WaveState::Halted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_retries_the_failed_hosts_once_and_finishes() {
    let rig = rig("resume").await;
    let id = rig.run(&plan("0", "halt", false)).await;
    let canary = rig.engine.get(&id).await.expect("rollout").rollout.waves[0].hosts[0].clone();
    rig.script.fail_step([&canary]);
    rig.until_state(&id, RolloutState::Halted).await;
    assert_eq!(rig.script.steps_of(&canary), 1);
    // Fixed; a person resumes.
    rig.script.fail_step(Vec::<String>::new());
    rig.engine.control("ann", &id, Control::Resume).await.expect("resume");
    let e = rig.until_state(&id, RolloutState::Completed).await;
    assert_eq!(
        rig.script.steps_of(&canary),
        2,
        "the failed canary ran again, once: {:#?}",
        e.rollout.events
    );
    for h in HOSTS.iter().filter(|h| **h != canary) {
        assert_eq!(rig.script.steps_of(h), 1, "{h} ran its step once");
    }
    assert_eq!(e.rollout.attempt, 1);
    assert!(e.hosts.values().all(|h| h.state == HostState::Healthy));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_checks_halt_the_canary_and_a_pause_holds_the_rollout() {
    let rig = rig("checks").await;
    let id = rig.run(&plan("0", "halt", true)).await;
    let canary = rig.engine.get(&id).await.expect("rollout").rollout.waves[0].hosts[0].clone();
    // The step succeeds; its health checks fail.
    rig.script.fail_checks([&canary]);
    let e = rig.until_state(&id, RolloutState::Halted).await;
    assert_eq!(e.hosts[&canary].state, HostState::Failed);
    assert_eq!(rig.script.steps_of(&canary), 1);

    // A pause is refused on a halted rollout, and an abort ends it for good.
    assert!(rig.engine.control("ann", &id, Control::Pause).await.is_err());
    rig.engine.control("ann", &id, Control::Abort).await.expect("abort");
    assert!(rig.engine.control("ann", &id, Control::Resume).await.is_err());
    let e = rig.engine.get(&id).await.expect("rollout");
    assert_eq!(e.rollout.state, RolloutState::Aborted);
}

/// A canary `c0` and fifty hosts `w00`..`w49`.
static FIFTY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let mut f = String::from("hosts:\n  - {id: c0}\n");
    for i in 0..50 {
        f.push_str(&format!("  - {{id: w{i:02}}}\n"));
    }
    f
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_max_in_flight_five_a_failing_wave_of_fifty_runs_its_step_on_at_most_five() {
    let dir = std::env::temp_dir().join(format!("wavegate-decisions-in-flight-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let hosts: Vec<String> = std::iter::once("c0".to_owned())
        .chain((0..50).map(|i| format!("w{i:02}")))
        .collect();
    let names: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let script = Arc::new(Script::default());
    let engine = common::engine(&dir, FIFTY.as_str(), &names, &script).await;
    engine.start();
    let rig = Rig {
        engine,
        script: Arc::clone(&script),
        dir,
    };
    // A step takes a while: the one that fails says so after 300 ms, when
    // the other hosts started with it have been sent theirs; they take 1 s.
    script.step_time(Duration::from_millis(1000), Duration::from_millis(300));
    let plan = "name: t
targets: {groups: [], hosts: [c0], labels: {}}
steps: [{name: s, run: 'true', writes: [/etc/x]}]
waves: [{size: 1}, {size: 100%}]
failure_budget: {canary: 0, wave: 0}
max_in_flight: 5
health: {bake: 0s}
on_failure: halt
";
    let all = format!("[{}]", names.join(", "));
    let plan = plan.replace("hosts: [c0], labels", &format!("hosts: {all}, labels"));
    let id = rig.run(&plan).await;
    let wave2 = rig.engine.get(&id).await.expect("rollout").rollout.waves[1].clone();
    assert_eq!((wave2.hosts.len(), wave2.max_in_flight()), (50, 5));
    script.fail_first_step_of(&wave2.hosts);
    let e = rig.until_state(&id, RolloutState::Halted).await;
    let ran: Vec<&String> = wave2.hosts.iter().filter(|h| script.steps_of(h) > 0).collect();
    assert!(
        (1..=5).contains(&ran.len()),
        "{} hosts of the wave ran the step: {ran:?}",
        ran.len()
    );
    let failed: Vec<&String> = wave2
        .hosts
        .iter()
        .filter(|h| e.hosts[*h].state == HostState::Failed)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    // The halt names exactly the other hosts that had been sent the step.
    let reason = e.rollout.halt_reason.clone().unwrap_or_default();
    let named: Vec<&str> = reason
        .split_once("; in flight at the halt: ")
        .map(|(_, l)| l.split(", ").collect())
        .unwrap_or_default();
    let others: Vec<&str> = ran.iter().filter(|h| **h != failed[0]).map(|h| h.as_str()).collect();
    assert_eq!(named, others, "{reason}");
    assert_eq!(named.len(), 4, "the four others were mid-step at the halt: {reason}");
    // The step once answered, nothing more starts: what ran is all that runs.
    let settled = rig
        .until(&id, "its in-flight steps answered", |e| {
            e.hosts.values().all(|h| h.in_flight.is_none())
        })
        .await;
    let untouched = settled
        .hosts
        .values()
        .filter(|h| h.state == HostState::Untouched)
        .count();
    assert_eq!(untouched, 50 - ran.len(), "{:#?}", settled.rollout.events);
    assert_eq!(wave2.hosts.iter().map(|h| script.steps_of(h)).sum::<usize>(), ran.len());
}
