//! The embedded store: one redb database in the data directory.
//!
//! Every state change is one write transaction, and redb commits it with an
//! fdatasync before `commit` returns, so the engine acts only on state that a
//! power cut cannot take back. This module is the only one that knows redb.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use ed25519_dalek::{SigningKey, VerifyingKey};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use wavegate_domain::audit::{AuditBody, AuditRecord, Checkpoint, Tamper};
use wavegate_domain::rollout::{HostRecord, Rollout};

use super::{
    Batch, Build, OutputPiece, OutputQuery, StateStore, extend_chain, host_key, output_key, refusal_body, shell,
    signing_key, verdict,
};

/// Counters and settings.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Plan bytes by SHA-256.
const PLANS: TableDefinition<&str, &str> = TableDefinition::new("plans");
/// Rollout headers by id (JSON).
const ROLLOUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("rollouts");
/// Host records by `<rollout id>/<host id>` (JSON).
const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
/// Inventory files by SHA-256, as the controller was started with them.
const INVENTORIES: TableDefinition<&str, &str> = TableDefinition::new("inventories");
/// Refused requests, in order: who asked for what, and why it was refused.
const REFUSALS: TableDefinition<u64, &str> = TableDefinition::new("refusals");
/// The audit log: a hash chain, appended in the transaction of the change it records.
pub const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// The signed head of the audit log.
const CHECKPOINT: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoint");
/// Notifications not yet delivered, in order: written in the transaction
/// of the change they announce, deleted once a receiver took them.
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// Steps' and checks' output, by [`output_key`]: the bytes that start at
/// that offset.
const OUTPUT: TableDefinition<&str, &[u8]> = TableDefinition::new("output");

/// The redb store.
pub struct RedbStore {
    db: Database,
    path: std::path::PathBuf,
    key: SigningKey,
    /// Bytes of output committed without a sync since the last synced
    /// commit: redb keeps those in memory until then.
    unsynced_output: std::sync::atomic::AtomicU64,
}

/// The store's page cache.
const CACHE: usize = 64 << 20;

/// How much output may wait in memory for a synced commit.
const UNSYNCED_OUTPUT: u64 = 16 << 20;

/// Append audit records to the chain inside `txn`, and sign the new head.
fn append(txn: &WriteTransaction, key: &SigningKey, bodies: Vec<AuditBody>) -> Result<()> {
    if bodies.is_empty() {
        return Ok(());
    }
    let mut table = txn.open_table(AUDIT)?;
    let last: Option<AuditRecord> = match table.last()? {
        Some((_, v)) => Some(serde_json::from_slice(v.value())?),
        None => None,
    };
    let (records, cp) = extend_chain(last.as_ref(), key, bodies);
    for r in &records {
        table.insert(r.seq, serde_json::to_vec(r)?.as_slice())?;
    }
    if let Some(cp) = cp {
        txn.open_table(CHECKPOINT)?
            .insert("head", serde_json::to_vec(&cp)?.as_slice())?;
    }
    Ok(())
}

/// Append notifications to the outbox inside `txn`.
fn enqueue(txn: &WriteTransaction, outbox: &[Vec<u8>]) -> Result<()> {
    if outbox.is_empty() {
        return Ok(());
    }
    let mut t = txn.open_table(OUTBOX)?;
    let first = t.last()?.map_or(1, |(k, _)| k.value() + 1);
    for (seq, body) in (first..).zip(outbox) {
        t.insert(seq, body.as_slice())?;
    }
    Ok(())
}

/// How long a store locked by another process is waited for at open.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl RedbStore {
    /// Open (or create) the store in `dir`. A damaged file is an error that
    /// names it; nothing is overwritten.
    pub fn open(dir: &Path) -> Result<RedbStore> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating the data directory {}", dir.display()))?;
        let path = dir.join("wavegate.redb");
        let damaged = || {
            format!(
                "opening the store {} (if it is damaged, restore it from a backup; wavegate will not overwrite it)",
                path.display()
            )
        };
        // redb asserts on some damage (a truncated file) instead of returning
        // an error; that must be a clear refusal too, not a crash.
        // A controller that was just killed may still hold the file's lock
        // while the kernel closes its files (a restart by systemd, a crash
        // test): the lock is asked for again, for a while, before the
        // store is called taken.
        let held_until = std::time::Instant::now() + LOCK_WAIT;
        let opened = loop {
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            // redb caches up to 1 GiB by default; output streamed through
            // the store would fill that. The state itself is small.
            let opened = std::panic::catch_unwind(|| redb::Builder::new().set_cache_size(CACHE).create(&path));
            std::panic::set_hook(hook);
            if matches!(opened, Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)))
                && std::time::Instant::now() < held_until
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
            break opened;
        };
        let db = match opened {
            Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
                return Err(anyhow::anyhow!(
                    "the store {} is open in another process, still after {}s: another controller on this data directory? Stop it first",
                    path.display(),
                    LOCK_WAIT.as_secs()
                ));
            }
            Ok(db) => db.with_context(damaged)?,
            Err(panic) => {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "an inconsistency".into());
                return Err(anyhow::anyhow!("the store file is damaged: {why}")).with_context(damaged);
            }
        };
        let key = signing_key(dir)?;
        let txn = db.begin_write()?;
        {
            txn.open_table(AUDIT)?;
            txn.open_table(CHECKPOINT)?;
            txn.open_table(META)?;
            txn.open_table(PLANS)?;
            txn.open_table(ROLLOUTS)?;
            txn.open_table(HOSTS)?;
            txn.open_table(INVENTORIES)?;
            txn.open_table(REFUSALS)?;
            txn.open_table(OUTPUT)?;
            txn.open_table(OUTBOX)?;
        }
        txn.commit()?;
        Ok(RedbStore {
            db,
            path,
            key,
            unsynced_output: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The store as the engine uses it.
    pub fn shared(self) -> Arc<dyn StateStore> {
        Arc::new(Arc::new(self))
    }

    /// The key that verifies the audit log's checkpoints.
    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Every audit record, in order, and the signed head.
    pub fn audit(&self) -> Result<(Vec<AuditRecord>, Option<Checkpoint>)> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AUDIT)?;
        let mut records = Vec::new();
        for e in table.iter()? {
            let (k, v) = e?;
            // A record that no longer parses is kept as an empty shell with
            // its key, so verification names it instead of failing to read.
            records.push(serde_json::from_slice(v.value()).unwrap_or_else(|_| shell(k.value())));
        }
        let cp = txn
            .open_table(CHECKPOINT)?
            .get("head")?
            .and_then(|v| serde_json::from_slice(v.value()).ok());
        Ok((records, cp))
    }

    /// How many records the audit log holds.
    pub fn audit_len(&self) -> Result<u64> {
        use redb::ReadableTableMetadata as _;
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(AUDIT)?.len()?)
    }

    /// Verify the live audit log.
    pub fn verify_audit(&self) -> Result<std::result::Result<usize, Tamper>> {
        let (records, cp) = self.audit()?;
        Ok(verdict(&records, cp.as_ref(), &self.public_key()))
    }

    /// Append audit records on their own (no state change).
    pub fn audit_only(&self, bodies: Vec<AuditBody>) -> Result<()> {
        let txn = self.db.begin_write()?;
        append(&txn, &self.key, bodies)?;
        txn.commit()?;
        Ok(())
    }

    /// Keep the inventory the controller runs with.
    pub fn put_inventory(&self, hash: &str, text: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(INVENTORIES)?.insert(hash, text)?;
        txn.commit()?;
        Ok(())
    }

    /// Record a refused request.
    pub fn record_refusal(&self, text: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(REFUSALS)?;
            let next = t.last()?.map_or(1, |(k, _)| k.value() + 1);
            t.insert(next, text)?;
        }
        append(&txn, &self.key, vec![refusal_body(text)])?;
        txn.commit()?;
        Ok(())
    }

    /// Every refused request, oldest first.
    pub fn refusals(&self) -> Result<Vec<String>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(REFUSALS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            out.push(e?.1.value().to_owned());
        }
        Ok(out)
    }

    /// Create a rollout in one transaction: allocate its id, store the plan
    /// bytes, the header and every host record.
    pub fn create_rollout(
        &self,
        plan_hash: &str,
        plan_yaml: &str,
        build: impl FnOnce(String) -> (Rollout, Vec<HostRecord>, Vec<AuditBody>, Vec<Vec<u8>>),
    ) -> Result<(Rollout, Vec<HostRecord>)> {
        let txn = self.db.begin_write()?;
        let built;
        let bodies;
        let outbox;
        {
            let mut meta = txn.open_table(META)?;
            let next = meta.get("next_rollout")?.map_or(1, |v| v.value());
            meta.insert("next_rollout", next + 1)?;
            let (r, h, b, o) = build(super::rollout_id(next));
            built = (r, h);
            bodies = b;
            outbox = o;
            txn.open_table(PLANS)?.insert(plan_hash, plan_yaml)?;
            txn.open_table(ROLLOUTS)?
                .insert(built.0.id.as_str(), serde_json::to_vec(&built.0)?.as_slice())?;
            let mut hosts = txn.open_table(HOSTS)?;
            for h in &built.1 {
                hosts.insert(
                    host_key(&built.0.id, &h.host).as_str(),
                    serde_json::to_vec(h)?.as_slice(),
                )?;
            }
        }
        append(&txn, &self.key, bodies)?;
        enqueue(&txn, &outbox)?;
        txn.commit()?;
        Ok(built)
    }

    /// Commit rollout headers, host records and their audit records (all
    /// JSON, keyed by rollout id and by [`host_key`]) in one transaction:
    /// one fdatasync for a whole batch of changes.
    pub fn commit(&self, batch: Batch) -> Result<()> {
        let txn = self.db.begin_write()?;
        enqueue(&txn, &batch.outbox)?;
        {
            let mut table = txn.open_table(ROLLOUTS)?;
            for (id, json) in &batch.rollouts {
                table.insert(id.as_str(), json.as_slice())?;
            }
            let mut table = txn.open_table(HOSTS)?;
            for (key, json) in &batch.hosts {
                table.insert(key.as_str(), json.as_slice())?;
            }
        }
        append(&txn, &self.key, batch.audit)?;
        txn.commit()?;
        Ok(())
    }

    /// Every rollout with its host records, oldest first.
    pub fn load(&self) -> Result<Vec<(Rollout, Vec<HostRecord>)>> {
        let txn = self.db.begin_read()?;
        let rollouts = txn.open_table(ROLLOUTS)?;
        let hosts = txn.open_table(HOSTS)?;
        let mut out = Vec::new();
        for entry in rollouts.iter()? {
            let (k, v) = entry?;
            let rollout: Rollout = serde_json::from_slice(v.value())
                .with_context(|| format!("rollout {} in the store is unreadable", k.value()))?;
            let prefix = format!("{}/", rollout.id);
            let mut records = Vec::new();
            for h in hosts.range(prefix.as_str()..)? {
                let (hk, hv) = h?;
                if !hk.value().starts_with(&prefix) {
                    break;
                }
                records
                    .push(serde_json::from_slice(hv.value()).with_context(|| format!("host record {}", hk.value()))?);
            }
            out.push((rollout, records));
        }
        Ok(out)
    }

    /// The oldest notification not yet delivered.
    pub fn outbox_first(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(OUTBOX)?;
        Ok(t.first()?.map(|(k, v)| (k.value(), v.value().to_vec())))
    }

    /// A notification was delivered: it goes.
    pub fn outbox_done(&self, seq: u64) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(OUTBOX)?.remove(seq)?;
        txn.commit()?;
        Ok(())
    }

    /// Store pieces of output. Output is not what the engine acts on, so
    /// this commit is not synced on its own (the next state change's commit
    /// makes it durable), unless 16 MiB of output would otherwise wait in
    /// memory for that: a flood of output never grows it without bound.
    pub fn append_output(&self, pieces: &[OutputPiece]) -> Result<()> {
        use std::sync::atomic::Ordering;
        if pieces.is_empty() {
            return Ok(());
        }
        let bytes: u64 = pieces.iter().map(|p| p.data.len() as u64).sum();
        let waiting = self.unsynced_output.fetch_add(bytes, Ordering::SeqCst) + bytes;
        let mut txn = self.db.begin_write()?;
        if waiting < UNSYNCED_OUTPUT {
            txn.set_durability(redb::Durability::None)?;
        } else {
            self.unsynced_output.store(0, Ordering::SeqCst);
        }
        {
            let mut t = txn.open_table(OUTPUT)?;
            for p in pieces {
                t.insert(
                    output_key(&p.rollout, &p.host, &p.step, p.offset).as_str(),
                    p.data.as_slice(),
                )?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Every stored piece of output under `prefix`, in key order, until
    /// `f` says stop.
    fn scan_output(&self, prefix: &str, mut f: impl FnMut(&str, &[u8]) -> bool) -> Result<()> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(OUTPUT)?;
        for e in t.range(prefix..)? {
            let (k, v) = e?;
            if !k.value().starts_with(prefix) || !f(k.value(), v.value()) {
                break;
            }
        }
        Ok(())
    }

    /// Stored output of a rollout, in order of host, step and offset.
    pub fn read_output(&self, q: &OutputQuery) -> Result<Vec<OutputPiece>> {
        let mut sel = super::Selection::new(q);
        self.scan_output(&sel.prefix(), |k, v| sel.take(k, v))?;
        Ok(sel.pieces)
    }

    /// Bytes stored for one step's output, contiguous from its start, and
    /// their SHA-256; and whether there is a gap (something missing).
    pub fn output_digest(&self, rollout: &str, host: &str, step: &str) -> Result<(u64, String, bool)> {
        let mut d = super::OutputDigest::default();
        self.scan_output(&format!("{rollout}\u{0}{host}\u{0}{step}\u{0}"), |k, v| {
            d.add(k, v);
            true
        })?;
        Ok(d.finish())
    }

    /// Where each stored step's output of a rollout and host ends: (step,
    /// bytes up to the end of its last piece).
    pub fn output_ends(&self, rollout: &str, host: &str) -> Result<Vec<(String, u64)>> {
        let mut ends = super::OutputEnds::default();
        self.scan_output(&format!("{rollout}\u{0}{host}\u{0}"), |k, v| {
            ends.add(k, v.len());
            true
        })?;
        Ok(ends.finish())
    }

    /// Every key and value of the store, named as the etcd store lays
    /// them out under its prefix (for `wavegate store migrate`), in order.
    pub fn export(&self) -> Result<Vec<(String, Vec<u8>)>> {
        use super::keys;
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        if let Some(v) = txn.open_table(META)?.get("next_rollout")? {
            out.push((keys::NEXT_ROLLOUT.to_owned(), v.value().to_string().into_bytes()));
        }
        let text_tables = [(PLANS, keys::PLANS), (INVENTORIES, keys::INVENTORIES)];
        for (table, name) in text_tables {
            for e in txn.open_table(table)?.iter()? {
                let (k, v) = e?;
                out.push((format!("{name}{}", k.value()), v.value().as_bytes().to_vec()));
            }
        }
        let byte_tables = [(ROLLOUTS, keys::ROLLOUTS), (HOSTS, keys::HOSTS), (OUTPUT, keys::OUTPUT)];
        for (table, name) in byte_tables {
            for e in txn.open_table(table)?.iter()? {
                let (k, v) = e?;
                out.push((format!("{name}{}", k.value()), v.value().to_vec()));
            }
        }
        for e in txn.open_table(REFUSALS)?.iter()? {
            let (k, v) = e?;
            out.push((
                format!("{}{}", keys::REFUSALS, keys::seq(k.value())),
                v.value().as_bytes().to_vec(),
            ));
        }
        for (table, name) in [(AUDIT, keys::AUDIT), (OUTBOX, keys::OUTBOX)] {
            for e in txn.open_table(table)?.iter()? {
                let (k, v) = e?;
                out.push((format!("{name}{}", keys::seq(k.value())), v.value().to_vec()));
            }
        }
        if let Some(v) = txn.open_table(CHECKPOINT)?.get("head")? {
            out.push((keys::CHECKPOINT.to_owned(), v.value().to_vec()));
        }
        out.push((
            keys::AUDIT_KEY.to_owned(),
            hex::encode(self.public_key().to_bytes()).into_bytes(),
        ));
        Ok(out)
    }

    /// The plan bytes with this hash.
    pub fn plan(&self, hash: &str) -> Result<Option<String>> {
        let txn = self.db.begin_read()?;
        let plans = txn.open_table(PLANS)?;
        Ok(plans.get(hash)?.map(|v| v.value().to_owned()))
    }
}

/// Runs the store's calls on the blocking pool: a commit waits for an
/// fdatasync, which must not hold up the runtime's workers.
async fn blocking<R: Send + 'static>(
    store: &Arc<RedbStore>,
    f: impl FnOnce(&RedbStore) -> Result<R> + Send + 'static,
) -> Result<R> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || f(&store)).await?
}

#[tonic::async_trait]
impl StateStore for Arc<RedbStore> {
    fn describe(&self) -> String {
        format!("redb {}", self.path.display())
    }

    fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    async fn audit(&self) -> Result<(Vec<AuditRecord>, Option<Checkpoint>)> {
        blocking(self, RedbStore::audit).await
    }

    async fn audit_len(&self) -> Result<u64> {
        blocking(self, RedbStore::audit_len).await
    }

    async fn put_inventory(&self, hash: String, text: String) -> Result<()> {
        blocking(self, move |s| s.put_inventory(&hash, &text)).await
    }

    async fn record_refusal(&self, text: String) -> Result<()> {
        blocking(self, move |s| s.record_refusal(&text)).await
    }

    async fn refusals(&self) -> Result<Vec<String>> {
        blocking(self, RedbStore::refusals).await
    }

    async fn create_rollout(
        &self,
        plan_hash: String,
        plan_yaml: String,
        build: Build,
    ) -> Result<(Rollout, Vec<HostRecord>)> {
        blocking(self, move |s| s.create_rollout(&plan_hash, &plan_yaml, build)).await
    }

    async fn commit(&self, batch: Batch) -> Result<()> {
        blocking(self, move |s| s.commit(batch)).await
    }

    async fn load(&self) -> Result<Vec<(Rollout, Vec<HostRecord>)>> {
        blocking(self, RedbStore::load).await
    }

    async fn outbox_first(&self) -> Result<Option<(u64, Vec<u8>)>> {
        blocking(self, RedbStore::outbox_first).await
    }

    async fn outbox_done(&self, seq: u64) -> Result<()> {
        blocking(self, move |s| s.outbox_done(seq)).await
    }

    async fn append_output(&self, pieces: Vec<OutputPiece>) -> Result<()> {
        blocking(self, move |s| s.append_output(&pieces)).await
    }

    async fn read_output(&self, q: OutputQuery) -> Result<Vec<OutputPiece>> {
        blocking(self, move |s| s.read_output(&q)).await
    }

    async fn output_digest(&self, rollout: String, host: String, step: String) -> Result<(u64, String, bool)> {
        blocking(self, move |s| s.output_digest(&rollout, &host, &step)).await
    }

    async fn output_ends(&self, rollout: String, host: String) -> Result<Vec<(String, u64)>> {
        blocking(self, move |s| s.output_ends(&rollout, &host)).await
    }

    async fn plan(&self, hash: String) -> Result<Option<String>> {
        blocking(self, move |s| s.plan(&hash)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store still held by a controller that is going away is waited
    /// for, not refused at once (a restart right after a crash).
    #[test]
    fn a_store_held_for_a_moment_is_opened_once_it_is_let_go() {
        let dir = std::env::temp_dir().join(format!("wavegate-redb-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = RedbStore::open(&dir).expect("first");
        let (tx, rx) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            // Let go only once the second open has begun waiting.
            rx.recv().expect("go");
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(first);
        });
        tx.send(()).expect("send");
        let started = std::time::Instant::now();
        let second = RedbStore::open(&dir).expect("opened after the first let go");
        assert!(started.elapsed() >= std::time::Duration::from_millis(300), "it waited");
        holder.join().expect("holder");
        drop(second);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
