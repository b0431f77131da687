//! The controller's durable store: one redb database in the data directory.
//!
//! Every state change is one write transaction, and redb commits it with an
//! fdatasync before `commit` returns, so the engine acts only on state that a
//! power cut cannot take back. This module is the only one that knows redb.

use std::path::Path;

use anyhow::{Context, Result};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use wavegate_domain::rollout::{HostRecord, Rollout};

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

/// The store.
pub struct Store {
    db: Database,
}

fn host_key(rollout: &str, host: &str) -> String {
    format!("{rollout}/{host}")
}

impl Store {
    /// Open (or create) the store in `dir`. A damaged file is an error that
    /// names it; nothing is overwritten.
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating the data directory {}", dir.display()))?;
        let path = dir.join("wavegate.redb");
        let db = Database::create(&path).with_context(|| {
            format!(
                "opening the store {} (if it is damaged, restore it from a backup; wavegate will not overwrite it)",
                path.display()
            )
        })?;
        let txn = db.begin_write()?;
        {
            txn.open_table(META)?;
            txn.open_table(PLANS)?;
            txn.open_table(ROLLOUTS)?;
            txn.open_table(HOSTS)?;
            txn.open_table(INVENTORIES)?;
            txn.open_table(REFUSALS)?;
        }
        txn.commit()?;
        Ok(Store { db })
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
        build: impl FnOnce(String) -> (Rollout, Vec<HostRecord>),
    ) -> Result<(Rollout, Vec<HostRecord>)> {
        let txn = self.db.begin_write()?;
        let built;
        {
            let mut meta = txn.open_table(META)?;
            let next = meta.get("next_rollout")?.map_or(1, |v| v.value());
            meta.insert("next_rollout", next + 1)?;
            built = build(format!("r{next:04}"));
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
        txn.commit()?;
        Ok(built)
    }

    /// Store a rollout header and some of its host records, in one
    /// transaction.
    pub fn save(&self, rollout: &Rollout, hosts: &[&HostRecord]) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            txn.open_table(ROLLOUTS)?
                .insert(rollout.id.as_str(), serde_json::to_vec(rollout)?.as_slice())?;
            let mut table = txn.open_table(HOSTS)?;
            for h in hosts {
                table.insert(
                    host_key(&rollout.id, &h.host).as_str(),
                    serde_json::to_vec(h)?.as_slice(),
                )?;
            }
        }
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

    /// The plan bytes with this hash.
    pub fn plan(&self, hash: &str) -> Result<Option<String>> {
        let txn = self.db.begin_read()?;
        let plans = txn.open_table(PLANS)?;
        Ok(plans.get(hash)?.map(|v| v.value().to_owned()))
    }
}
