//! Benchmark 9: durable changes per second through the store interface the
//! engine uses, on redb (one file, fdatasync) and on etcd (a 3-member
//! cluster on loopback, each member fsyncing its log, started by
//! `scripts/etcd-cluster`). One change is what the engine commits when a
//! host's state moves: the host record and its audit record, in one
//! transaction, fenced on the leader key for etcd. Run with
//! `cargo bench -p wavegate --bench store` (or `bash scripts/bench store`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use wavegate::etcd::{Etcd, EtcdConfig};
use wavegate::leader::{Leadership, campaign};
use wavegate::store::etcd::{EtcdStore, Limits};
use wavegate::store::{Batch, RedbStore, StateStore, signing_key};
use wavegate_domain::audit::AuditBody;

fn change(i: usize) -> (String, Vec<u8>, AuditBody) {
    let host = format!("h{i:05}");
    let record = serde_json::json!({
        "host": host, "wave": 2, "state": "healthy", "detail": "healthy", "next_step": 1,
        "results": [{"step": "noop", "command_id": format!("r0001:0:{host}:step0"), "outcome": "ok",
                     "exit_code": 0, "duration_ms": 3,
                     "output_sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}],
    });
    let body = AuditBody {
        kind: "host".into(),
        rollout: Some("r0001".into()),
        host: Some(host.clone()),
        actor: None,
        text: format!("{host}: healthy (healthy)"),
        data: record.clone(),
    };
    (
        format!("r0001/{host}"),
        serde_json::to_vec(&record).unwrap_or_default(),
        body,
    )
}

fn batch(from: usize, n: usize) -> Batch {
    let mut b = Batch::default();
    for i in from..from + n {
        let (k, v, body) = change(i);
        b.hosts.push((k, v));
        b.audit.push(body);
    }
    b
}

/// Commit `total` changes `per` to a transaction, one transaction after
/// the other (as the engine's writer does); changes per second.
async fn run(store: &Arc<dyn StateStore>, total: usize, per: usize) -> Result<f64> {
    let t = Instant::now();
    for c in 0..total / per {
        store.commit(batch(c * per, per)).await?;
    }
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

async fn measure(name: &str, store: Arc<dyn StateStore>, singles: usize) -> Result<()> {
    let one = run(&store, singles, 1).await?;
    println!("  {name}: one change per commit: {one:.0} changes/s ({singles} commits)");
    for per in [10usize, 100] {
        let rate = run(&store, 5_000, per).await?;
        println!("  {name}: {per} changes per commit (group commit under load): {rate:.0} changes/s");
    }
    let t = Instant::now();
    let verdict = store.verify_audit().await?;
    println!(
        "  {name}: the audit chain ({} records) verifies in {:.2} s: {}",
        store.audit_len().await?,
        t.elapsed().as_secs_f64(),
        if verdict.is_ok() { "intact" } else { "BROKEN" }
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let scratch = std::env::temp_dir().join(format!("wavegate-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    println!("benchmark 9: durable changes per second (a host record and its audit record per change)");

    let redb = RedbStore::open(&scratch.join("redb"))?.shared();
    measure("redb", redb, 1_000).await?;

    let cluster = wavegate_lab::etcd::EtcdCluster::start_in(scratch.join("etcd"))?;
    let etcd = Arc::new(Etcd::new(EtcdConfig::parse(&cluster.url).map_err(anyhow::Error::msg)?)?);
    let leadership = Leadership::elected("https://bench.invalid:7000");
    let key = signing_key(&scratch.join("key"))?;
    let store = EtcdStore::open(
        Arc::clone(&etcd),
        "/wavegate-bench",
        key,
        Arc::clone(&leadership),
        Limits::for_fleet(1_000),
    )
    .await?;
    tokio::spawn(campaign(
        Arc::clone(&etcd),
        store.leader_key(),
        Duration::from_secs(10),
        Arc::clone(&leadership),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while leadership.fence().is_none() {
        if Instant::now() > deadline {
            bail!("not elected on the benchmark's own etcd within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    measure("etcd (3 members, loopback)", Arc::new(store), 1_000).await?;
    drop(cluster);
    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}
