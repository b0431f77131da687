//! The engine over a real store, without a network: what is refused is
//! refused and recorded, and everything survives a restart on the same data
//! directory.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use wavegate::engine::{Engine, EngineError};
use wavegate_domain::rollout::RolloutState;

const FLEET: &str = "hosts:\n  - {id: p1, role: primary}\n  - {id: b1, role: backup, backup_of: [p1]}\n";
const PLAN: &str =
    "name: t\ntargets: {hosts: [p1, b1]}\nsteps: [{name: s, run: 'true', writes: [/etc/x]}]\nhealth: {bake: 0s}\n";

fn data_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wavegate-engine-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

async fn engine(dir: &std::path::Path) -> Arc<Engine> {
    common::engine(dir, FLEET, &["p1", "b1"], &Arc::new(common::Script::default())).await
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
