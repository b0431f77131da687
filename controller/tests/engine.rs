//! The engine over a real store, without a network: what is refused is
//! refused and recorded, and everything survives a restart on the same data
//! directory.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use wavegate::engine::{Engine, EngineError, Settings};
use wavegate::hub::Hub;
use wavegate::store::Store;
use wavegate_domain::rollout::RolloutState;
use wavegate_domain::{Fleet, PolicySet, Source};

const FLEET: &str = "hosts:\n  - {id: p1, role: primary}\n  - {id: b1, role: backup, backup_of: [p1]}\n";
const PLAN: &str =
    "name: t\ntargets: {hosts: [p1, b1]}\nsteps: [{name: s, run: 'true', writes: [/etc/x]}]\nhealth: {bake: 0s}\n";

fn data_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wavegate-engine-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Plug an in-process agent for `host` into the hub: it answers every dry-run
/// with a clean report per step, and anything else with OK.
fn fake_agent(hub: &Arc<Hub>, host: &str) {
    use wavegate_proto::v1 as pb;
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    hub.connect(host, tx);
    let hub = Arc::clone(hub);
    let host = host.to_owned();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = rx.recv().await {
            let Some(pb::controller_message::Body::Command(cmd)) = msg.body else {
                continue;
            };
            let report_json = match &cmd.kind {
                Some(pb::command::Kind::DryRun(d)) => serde_json::to_string(
                    &d.steps
                        .iter()
                        .map(|s| wavegate_domain::effects::StepReport {
                            step: s.name.clone(),
                            ..Default::default()
                        })
                        .collect::<Vec<_>>(),
                )
                .expect("json"),
                _ => String::new(),
            };
            hub.deliver(
                &host,
                pb::CommandResult {
                    command_id: cmd.id,
                    outcome: pb::Outcome::Ok as i32,
                    report_json,
                    ..Default::default()
                },
            );
        }
    });
}

async fn engine(dir: &std::path::Path) -> Arc<Engine> {
    let fleet = Fleet::parse(Source {
        name: "fleet.yaml",
        text: FLEET,
    })
    .expect("fleet");
    let hub = Arc::new(Hub::default());
    for h in ["p1", "b1"] {
        fake_agent(&hub, h);
    }
    Engine::new(
        Store::open(dir).expect("store").shared(),
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
    .expect("engine")
}

#[tokio::test]
async fn bypass_and_self_approval_are_refused_and_recorded_durably() {
    let dir = data_dir("refusals");
    let e = engine(&dir).await;
    let err = e
        .submit("sam", "sam@x", "plan.yaml", PLAN, &["canary".into()])
        .await
        .expect_err("bypass refused");
    assert!(matches!(err, EngineError::Denied(_)), "{err}");
    let nobody = e
        .submit("sam", "", "plan.yaml", PLAN, &[])
        .await
        .expect_err("no person");
    assert!(matches!(nobody, EngineError::Denied(_)), "{nobody}");
    let (entry, _) = e.submit("sam", "sam@x", "plan.yaml", PLAN, &[]).await.expect("submit");
    let id = entry.rollout.id.clone();
    assert!(matches!(
        e.approve("sam", "sam@x", &id, "").await,
        Err(EngineError::Denied(_))
    ));
    assert_eq!(
        e.get(&id).await.expect("get").rollout.state,
        RolloutState::AwaitingApproval
    );
    drop(e);

    // A restart on the same directory still knows all of it.
    let e = engine(&dir).await;
    let refusals = e.refusals().await.expect("refusals");
    assert!(
        refusals.iter().any(|r| r.contains("sam asked to bypass: canary")),
        "{refusals:#?}"
    );
    assert!(
        refusals.iter().any(|r| r.contains(&format!("approval of {id} by sam"))),
        "{refusals:#?}"
    );
    let entry = e.get(&id).await.expect("rollout survives a restart");
    assert_eq!(
        entry.rollout.dry_runs.len(),
        1,
        "the canary's dry-run report is stored: {:?}",
        entry.rollout.dry_runs
    );
    assert_eq!(entry.rollout.waves.len(), 2, "primary and backup in separate waves");
    assert_eq!(entry.rollout.waves[0].hosts, ["p1"]);
    assert!(
        !entry.rollout.inventory_hash.is_empty(),
        "the rollout names the inventory it was planned on"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_refused_plan_creates_no_rollout() {
    let dir = data_dir("refused-plan");
    let e = engine(&dir).await;
    let bad = PLAN.replace("targets: {hosts: [p1, b1]}\n", "");
    match e.submit("sam", "sam@x", "plan.yaml", &bad, &[]).await {
        Err(EngineError::Refused(report)) => assert!(
            report
                .violations
                .iter()
                .any(|v| v.code.to_string() == "targets-missing")
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let typo = PLAN.replace("name: t", "nmae: t");
    assert!(matches!(
        e.submit("sam", "sam@x", "plan.yaml", &typo, &[]).await,
        Err(EngineError::BadPlan(_))
    ));
    assert!(e.list().await.is_empty(), "nothing is half-created");
    let _ = std::fs::remove_dir_all(&dir);
}
