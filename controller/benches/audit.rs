//! Benchmark 6: durable audit records per second. Every record is appended
//! to the hash chain, the head is signed, and the transaction commits with
//! redb's fdatasync before it counts. Run with
//! `cargo bench -p wavegate --bench audit`.

use std::time::Instant;

use wavegate::store::Store;
use wavegate_domain::audit::AuditBody;

fn body(i: usize) -> AuditBody {
    AuditBody {
        kind: "host".into(),
        rollout: Some("r0001".into()),
        host: Some(format!("h{i:05}")),
        actor: None,
        text: format!("h{i:05}: healthy (healthy)"),
        data: serde_json::json!({
            "host": format!("h{i:05}"),
            "wave": 2,
            "state": "healthy",
            "detail": "healthy",
            "next_step": 1,
            "in_flight": null,
            "results": [{
                "step": "noop",
                "command_id": format!("r0001:0:h{i:05}:step0"),
                "outcome": "ok",
                "exit_code": 0,
                "duration_ms": 3,
                "output_sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            }],
        }),
    }
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("wavegate-bench-audit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir)?;
    println!("benchmark 6: durable audit records per second (each commit fdatasync'd, head signed)");

    let n = 2_000;
    let t = Instant::now();
    for i in 0..n {
        store.audit_only(vec![body(i)])?;
    }
    let one = t.elapsed().as_secs_f64();
    println!(
        "  one record per commit: {n} records in {one:.2} s, {:.0} records/s (target >= 1,000)",
        n as f64 / one
    );

    for batch in [10usize, 100] {
        let commits = 20_000 / batch;
        let t = Instant::now();
        for c in 0..commits {
            store.commit(wavegate::store::Batch {
                audit: (0..batch).map(|i| body(c * batch + i)).collect(),
                ..Default::default()
            })?;
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "  {batch} records per commit (the engine's group commit under load): {} records in {secs:.2} s, {:.0} records/s",
            commits * batch,
            (commits * batch) as f64 / secs
        );
    }
    let verify = Instant::now();
    let verdict = store.verify_audit()?;
    println!(
        "  the whole chain ({} records) verifies in {:.2} s: {}",
        store.audit_len()?,
        verify.elapsed().as_secs_f64(),
        if verdict.is_ok() { "intact" } else { "BROKEN" }
    );
    drop(store);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
