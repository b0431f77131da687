//! A takeover on a real 3-member etcd, in process: a commit too large for
//! one etcd transaction is written in parts, the rollout headers last. A
//! leader that died between two parts leaves a host's failure stored while
//! its rollout still runs; the successor must find that and halt the
//! rollout before it drives anything, as the whole commit would have.

use std::sync::Arc;
use std::time::Duration;

use wavegate::engine::{Engine, Settings};
use wavegate::etcd::{Etcd, EtcdConfig};
use wavegate::hub::Hub;
use wavegate::leader::{Leadership, campaign};
use wavegate::store::etcd::{EtcdStore, Limits};
use wavegate::store::{Batch, StateStore, host_key, signing_key};
use wavegate_domain::command::Command;
use wavegate_domain::rollout::{HostState, RolloutState, WaveState};
use wavegate_domain::{Fleet, PolicySet, Source};
use wavegate_lab::fake::Script;
use wavegate_proto::v1 as pb;
use wavegate_tests::etcd::EtcdCluster;

const FLEET: &str = "hosts:\n  - {id: p1, role: primary}\n  - {id: b1, role: backup, backup_of: [p1]}\n";
const PLAN: &str =
    "name: t\ntargets: {hosts: [p1, b1]}\nsteps: [{name: s, run: 'true', writes: [/etc/x]}]\nhealth: {bake: 0s}\n";

/// The tests' one fake agent for `host`, plugged into the hub.
fn agent(hub: &Arc<Hub>, host: &str, script: Arc<Script>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    hub.connect(host, tx);
    let hub = Arc::clone(hub);
    let host = host.to_owned();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = rx.recv().await {
            if let Some(pb::controller_message::Body::Command(cmd)) = msg.body {
                let cmd = Command::try_from(cmd).expect("a command the fake can read");
                hub.deliver(&host, script.answer(&host, &cmd));
            }
        }
    });
}

async fn engine(store: &Arc<EtcdStore>, leadership: &Arc<Leadership>, script: &Arc<Script>) -> Arc<Engine> {
    let fleet = Fleet::parse(Source {
        name: "fleet.yaml",
        text: FLEET,
    })
    .expect("fleet");
    let hub = Arc::new(Hub::default());
    for h in ["p1", "b1"] {
        agent(&hub, h, Arc::clone(script));
    }
    let store: Arc<dyn StateStore> = Arc::clone(store) as Arc<dyn StateStore>;
    let e = Engine::new(
        store,
        hub,
        (fleet, FLEET),
        PolicySet::default(),
        Settings {
            agent_grace: Duration::from_secs(1),
            output_cap: 4 << 20,
            output_rollout_cap: 256 << 20,
            notify: false,
            leadership: Arc::clone(leadership),
        },
    )
    .await
    .expect("engine");
    e.promote().await.expect("take over");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_stored_without_its_halt_is_halted_by_the_successor_before_anything_runs() {
    let cluster = EtcdCluster::start("takeover").expect("a local etcd cluster");
    let dir = std::env::temp_dir().join(format!("wavegate-takeover-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let etcd = Arc::new(Etcd::new(EtcdConfig::parse(&cluster.url).expect("url")).expect("client"));
    let leadership = Leadership::elected("https://takeover.invalid:7443");
    let store = Arc::new(
        EtcdStore::open(
            Arc::clone(&etcd),
            "/takeover",
            signing_key(&dir).expect("key"),
            Arc::clone(&leadership),
            Limits::for_fleet(2),
        )
        .await
        .expect("open the store"),
    );
    tokio::spawn(campaign(
        Arc::clone(&etcd),
        store.leader_key(),
        Duration::from_secs(10),
        Arc::clone(&leadership),
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while leadership.fence().is_none() {
        assert!(std::time::Instant::now() < deadline, "not elected within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let script = Arc::new(Script::default());
    let first = engine(&store, &leadership, &script).await;
    let (entry, _) = first
        .submit("sam", "sam@x", "plan.yaml", PLAN, &[])
        .await
        .expect("submit");
    let id = entry.rollout.id.clone();
    drop(first);

    // What the old leader left: the rollout running its canary (an earlier
    // commit), then the first part of a split commit: the canary failed.
    let (mut rollout, hosts) = store
        .load()
        .await
        .expect("load")
        .into_iter()
        .find(|(r, _)| r.id == id)
        .expect("the rollout is stored");
    rollout.state = RolloutState::Running;
    rollout.waves[0].state = WaveState::Running;
    store
        .commit(Batch {
            rollouts: vec![(id.clone(), serde_json::to_vec(&rollout).expect("json"))],
            ..Default::default()
        })
        .await
        .expect("the header commit");
    let mut p1 = hosts.into_iter().find(|h| h.host == "p1").expect("p1");
    p1.state = HostState::Failed;
    p1.detail = "step s exited 1".into();
    store
        .commit(Batch {
            hosts: vec![(host_key(&id, "p1"), serde_json::to_vec(&p1).expect("json"))],
            ..Default::default()
        })
        .await
        .expect("the first part of the split commit");

    let successor = engine(&store, &leadership, &script).await;
    let after = successor.get(&id).await.expect("the rollout").rollout;
    assert_eq!(after.state, RolloutState::Halted, "{after:#?}");
    let reason = after.halt_reason.clone().unwrap_or_default();
    assert!(
        reason.contains("canary") && reason.contains("budget") && reason.contains("p1"),
        "the halt says why: {reason}"
    );
    assert_eq!(
        script.steps_total(),
        0,
        "no host was sent a step, before or after the halt"
    );
    assert!(
        successor.store().verify_audit().await.expect("verify").is_ok(),
        "the audit chain verifies"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
