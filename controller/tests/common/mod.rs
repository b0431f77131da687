//! What the engine's in-process tests share: a scripted agent per host,
//! plugged into the hub, and an engine over a real store in a directory.
//! (Each test file uses what it needs of it.)
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wavegate::engine::{Engine, Settings};
use wavegate::hub::Hub;
use wavegate::store::Store;
use wavegate_domain::{Fleet, PolicySet, Source};
use wavegate_proto::v1 as pb;

/// What each scripted agent does: which hosts fail their step or their
/// health checks, and every real step each host was sent.
#[derive(Default)]
pub struct Script {
    pub fail_step: Mutex<HashSet<String>>,
    pub fail_checks: Mutex<HashSet<String>>,
    pub steps: Mutex<BTreeMap<String, usize>>,
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Script {
    pub fn fail_step(&self, hosts: &[&str]) {
        *lock(&self.fail_step) = hosts.iter().map(|h| (*h).to_owned()).collect();
    }

    pub fn steps_of(&self, host: &str) -> usize {
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
                r.report = Some(pb::command_result::Report::DryRuns(pb::DryRunReports {
                    steps: reports.into_iter().map(pb::StepReport::from).collect(),
                }));
            }
            Some(pb::command::Kind::TakeSnapshot(_)) => {
                r.report = Some(pb::command_result::Report::Snapshot(pb::SnapshotSummary::default()));
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
pub fn agent(hub: &Arc<Hub>, host: &str, script: &Arc<Script>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    hub.connect(host, tx);
    let (hub, host, script) = (Arc::clone(hub), host.to_owned(), Arc::clone(script));
    tokio::spawn(async move {
        while let Some(Ok(msg)) = rx.recv().await {
            if let Some(pb::controller_message::Body::Command(cmd)) = msg.body {
                let r = wavegate_domain::command::CommandResult::try_from(script.answer(&host, &cmd)).expect("typed");
                hub.deliver(&host, r);
            }
        }
    });
}

/// An engine over a store in `dir` for the inventory `fleet`, with a
/// scripted agent for each of `hosts` (not started: a test that drives
/// rollouts calls `start`, which keeps the engine alive in its tasks).
pub async fn engine(dir: &std::path::Path, fleet: &'static str, hosts: &[&str], script: &Arc<Script>) -> Arc<Engine> {
    let parsed = Fleet::parse(Source {
        name: "fleet.yaml",
        text: fleet,
    })
    .expect("fleet");
    let hub = Arc::new(Hub::default());
    for h in hosts {
        agent(&hub, h, script);
    }
    Engine::new(
        Store::open(dir).expect("store").shared(),
        hub,
        (parsed, fleet),
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
    .expect("engine")
}
