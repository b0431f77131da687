//! What the engine's in-process tests share: a scripted agent per host,
//! plugged into the hub, and an engine over a real store in a directory.
//! (Each test file uses what it needs of it.)
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use wavegate::engine::{Engine, Settings};
use wavegate::hub::Hub;
use wavegate::store::Store;
use wavegate_domain::{Fleet, PolicySet, Source};
use wavegate_proto::v1 as pb;

pub use wavegate_lab::fake::Script;

/// Plug a scripted agent for `host` into the hub.
pub fn agent(hub: &Arc<Hub>, host: &str, script: &Arc<Script>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    hub.connect(host, tx);
    let (hub, host, script) = (Arc::clone(hub), host.to_owned(), Arc::clone(script));
    tokio::spawn(async move {
        while let Some(Ok(msg)) = rx.recv().await {
            if let Some(pb::controller_message::Body::Command(cmd)) = msg.body {
                let cmd = wavegate_domain::command::Command::try_from(cmd).expect("a command the fake can read");
                let answer = script.answer(&host, &cmd);
                let delay = script.delay(&cmd, &answer);
                if delay.is_zero() {
                    hub.deliver(&host, answer);
                } else {
                    // A slow step: its host answers later, and meanwhile
                    // takes its next command (a real agent's session does).
                    let hub = Arc::clone(&hub);
                    let host = host.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        hub.deliver(&host, answer);
                    });
                }
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
