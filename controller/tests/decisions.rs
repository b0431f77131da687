//! The engine's decisions, in process and without root: a scripted agent
//! per host answers through the hub, and each test drives a rollout to a
//! halt or to its end. What is checked is what the engine decided (halt or
//! not, which hosts got a step, what a resume retries), not how a real
//! host carries a step out; the labs do that.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wavegate::engine::{Engine, Entry, Settings};
use wavegate::hub::Hub;
use wavegate::store::Store;
use wavegate_domain::rollout::{Control, HostState, RolloutState, WaveState};
use wavegate_domain::{Fleet, PolicySet, Source};
use wavegate_proto::v1 as pb;

const FLEET: &str = "hosts:
  - {id: h1}
  - {id: h2}
  - {id: h3}
  - {id: h4}
  - {id: h5}
";

const HOSTS: [&str; 5] = ["h1", "h2", "h3", "h4", "h5"];

/// What each scripted agent does: which hosts fail their step or their
/// health checks, and every real step each host was sent.
#[derive(Default)]
struct Script {
    fail_step: Mutex<HashSet<String>>,
    fail_checks: Mutex<HashSet<String>>,
    steps: Mutex<BTreeMap<String, usize>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Script {
    fn fail_step(&self, hosts: &[&str]) {
        *lock(&self.fail_step) = hosts.iter().map(|h| (*h).to_owned()).collect();
    }

    fn steps_of(&self, host: &str) -> usize {
        lock(&self.steps).get(host).copied().unwrap_or(0)
    }

    fn answer(&self, host: &str, cmd: &pb::Command) -> pb::CommandResult {
        let mut r = pb::CommandResult {
            command_id: cmd.id.clone(),
            outcome: pb::Outcome::Ok as i32,
            ..Default::default()
        };
        match &cmd.kind {
            Some(pb::command::Kind::DryRun(d)) => {
                let reports: Vec<_> = d
                    .steps
                    .iter()
                    .map(|s| wavegate_domain::effects::StepReport {
                        step: s.name.clone(),
                        ..Default::default()
                    })
                    .collect();
                r.report_json = serde_json::to_string(&reports).expect("json");
            }
            Some(pb::command::Kind::TakeSnapshot(_)) => {
                r.report_json = r#"{"files":0,"archive_bytes":0}"#.into();
            }
            Some(pb::command::Kind::RunStep(_)) => {
                *lock(&self.steps).entry(host.to_owned()).or_default() += 1;
                if lock(&self.fail_step).contains(host) {
                    r.outcome = pb::Outcome::Failed as i32;
                    r.exit_code = 1;
                    r.detail = "scripted to fail".into();
                }
            }
            Some(pb::command::Kind::RunChecks(c)) => {
                let ok = !lock(&self.fail_checks).contains(host);
                r.checks = c
                    .checks
                    .iter()
                    .map(|c| pb::CheckResult {
                        name: c.name.clone(),
                        ok,
                        detail: if ok { String::new() } else { "scripted to fail".into() },
                    })
                    .collect();
                if !ok {
                    r.outcome = pb::Outcome::Failed as i32;
                }
            }
            _ => {}
        }
        r
    }
}

/// Plug a scripted agent for `host` into the hub.
fn agent(hub: &Arc<Hub>, host: &str, script: &Arc<Script>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    hub.connect(host, tx);
    let (hub, host, script) = (Arc::clone(hub), host.to_owned(), Arc::clone(script));
    tokio::spawn(async move {
        while let Some(Ok(msg)) = rx.recv().await {
            if let Some(pb::controller_message::Body::Command(cmd)) = msg.body {
                hub.deliver(&host, script.answer(&host, &cmd));
            }
        }
    });
}

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
    let fleet = Fleet::parse(Source {
        name: "fleet.yaml",
        text: FLEET,
    })
    .expect("fleet");
    let hub = Arc::new(Hub::default());
    let script = Arc::new(Script::default());
    for h in HOSTS {
        agent(&hub, h, &script);
    }
    let engine = Engine::new(
        Store::open(&dir).expect("store").shared(),
        hub,
        (fleet, FLEET),
        PolicySet::default(),
        Settings {
            agent_grace: Duration::from_secs(1),
            output_cap: wavegate::engine::DEFAULT_OUTPUT_CAP,
            output_rollout_cap: wavegate::engine::DEFAULT_OUTPUT_ROLLOUT_CAP,
            notify: false,
            leadership: wavegate::leader::Leadership::single(),
        },
    )
    .await
    .expect("engine");
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
    rig.script.fail_step(&[&canary]);
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
    rig.script.fail_step(&[&wave2[0]]);
    let e = rig.until_state(&id, RolloutState::Completed).await;
    assert_eq!(e.hosts[&wave2[0]].state, HostState::Failed);
    let healthy = e.hosts.values().filter(|h| h.state == HostState::Healthy).count();
    assert_eq!(healthy, 4, "the other four are healthy");

    // Two of four is over a budget of one.
    let id = rig.run(&plan("1", "halt", false)).await;
    let wave2 = rig.engine.get(&id).await.expect("rollout").rollout.waves[1]
        .hosts
        .clone();
    rig.script.fail_step(&[&wave2[0], &wave2[1]]);
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
    rig.script.fail_step(&[&canary]);
    rig.until_state(&id, RolloutState::Halted).await;
    assert_eq!(rig.script.steps_of(&canary), 1);
    // Fixed; a person resumes.
    rig.script.fail_step(&[]);
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
    lock(&rig.script.fail_checks).insert(canary.clone());
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
