//! The shared store: an etcd cluster, every key under one prefix (see
//! [`super::keys`]), written only by the elected leader.
//!
//! Every write is one etcd transaction that succeeds only if the leader key
//! is still the one this controller created (its creation revision: a
//! fencing token), so a controller that lost its lease, however late its
//! request arrives, changes nothing. A change and its audit records go in
//! the same transaction. Writes are made one at a time; each also records
//! its own id under `commit`, so that a write whose answer was lost (a
//! member died, the network dropped it) is found applied or not, and sent
//! again only if not: no audit record is ever appended twice.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use ed25519_dalek::{SigningKey, VerifyingKey};
use tokio::sync::Mutex;
use tracing::warn;
use wavegate_domain::audit::{AuditBody, AuditRecord, Checkpoint};
use wavegate_domain::rollout::{HostRecord, Rollout};
use wavegate_proto::etcd as etcdpb;

use super::{
    Batch, Build, OutputDigest, OutputEnds, OutputPiece, OutputQuery, Selection, StateStore, extend_chain, host_key,
    keys, output_key, refusal_body, shell,
};
use crate::etcd::{Etcd, EtcdError, created_at, delete, modified_at, put, read};
use crate::leader::{LeaderRecord, Leadership};

/// What one transaction may hold, as this store asks etcd to accept
/// (`--max-txn-ops`, `--max-request-bytes`); checked when the store opens.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Operations per transaction.
    pub ops: usize,
    /// Bytes per request.
    pub bytes: usize,
}

impl Limits {
    /// What a fleet of `hosts` needs: creating a rollout over all of them
    /// writes a host record and an audit record for each, in one
    /// transaction.
    pub fn for_fleet(hosts: usize) -> Limits {
        Limits {
            ops: (hosts * 2 + 64).max(1024),
            bytes: (hosts * 4096 + (1 << 20)).max(4 << 20),
        }
    }
}

/// The writer's view of the store's tails, read once per leadership:
/// `fence` is the leadership they were read under, after it was won, so
/// every write of the previous leader is in them.
#[derive(Default)]
struct Tails {
    fence: Option<i64>,
    head: Option<AuditRecord>,
    next_outbox: u64,
    next_refusal: u64,
    commits: u64,
    /// The revision the commit marker was last written at, by this
    /// controller's last write (or as found when the tails were read).
    /// Every write requires it unchanged, so of several copies of one
    /// request in flight at most one applies, and none after a later one.
    marker: i64,
}

/// The etcd store.
pub struct EtcdStore {
    etcd: Arc<Etcd>,
    prefix: String,
    key: SigningKey,
    leadership: Arc<Leadership>,
    limits: Limits,
    tails: Mutex<Tails>,
}

/// Why a write was not made: this controller does not lead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotLeader(pub String);

impl EtcdStore {
    /// Open the store under `prefix` (like `/wavegate`), check that etcd
    /// takes transactions as large as `limits`, and that the audit log is
    /// signed with `key` (all controllers of one store share their key).
    pub async fn open(
        etcd: Arc<Etcd>,
        prefix: &str,
        key: SigningKey,
        leadership: Arc<Leadership>,
        limits: Limits,
    ) -> Result<EtcdStore> {
        if !prefix.starts_with('/') || prefix.len() < 2 {
            bail!("--store-prefix `{prefix}` must be an absolute key prefix like /wavegate");
        }
        let prefix = format!("{}/", prefix.trim_end_matches('/'));
        let store = EtcdStore {
            etcd,
            prefix,
            key,
            leadership,
            limits,
            tails: Mutex::new(Tails::default()),
        };
        store.probe().await?;
        store.claim_key().await?;
        Ok(store)
    }

    /// `open`, waiting while no etcd member answers (a controller started,
    /// or restarted as a standby, while etcd is away): it says so every
    /// few seconds and goes on once etcd is back. Any other error ends it.
    pub async fn open_waiting(
        etcd: Arc<Etcd>,
        prefix: &str,
        key: SigningKey,
        leadership: Arc<Leadership>,
        limits: Limits,
    ) -> Result<EtcdStore> {
        let mut delay = Duration::from_millis(200);
        loop {
            match EtcdStore::open(Arc::clone(&etcd), prefix, key.clone(), Arc::clone(&leadership), limits).await {
                Err(e) if e.downcast_ref::<EtcdError>().is_some_and(EtcdError::transient) => {
                    warn!(error = %format!("{e:#}"), "Waiting for etcd (check --store if this goes on).");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                r => return r,
            }
        }
    }

    fn k(&self, name: &str) -> Vec<u8> {
        format!("{}{name}", self.prefix).into_bytes()
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The leader key.
    pub fn leader_key(&self) -> Vec<u8> {
        self.k(keys::LEADER)
    }

    /// The client.
    pub fn etcd(&self) -> &Arc<Etcd> {
        &self.etcd
    }

    /// Ask etcd for a read-only transaction as large as the largest write
    /// this store will make: a cluster started with etcd's defaults (128
    /// operations, 1.5 MiB) refuses it now, with a clear message, instead
    /// of refusing a rollout's commit later.
    async fn probe(&self) -> Result<()> {
        let probe = self.k("probe");
        let pad = vec![b'x'; self.limits.bytes.saturating_sub(64 * self.limits.ops)];
        let txn = etcdpb::TxnRequest {
            compare: vec![etcdpb::Compare {
                result: etcdpb::compare::CompareResult::Equal as i32,
                target: etcdpb::compare::CompareTarget::Value as i32,
                key: probe.clone(),
                target_union: Some(etcdpb::compare::TargetUnion::Value(pad)),
            }],
            success: Vec::new(),
            failure: (0..self.limits.ops).map(|_| read(probe.clone())).collect(),
        };
        match self.etcd.txn(txn).await {
            Ok(_) => Ok(()),
            Err(EtcdError::Refused(why)) if why.contains("too many operations") => bail!(
                "etcd refuses transactions of {} operations ({why}); start every member with --max-txn-ops {} or more",
                self.limits.ops,
                self.limits.ops
            ),
            Err(EtcdError::Refused(why)) if why.contains("too large") || why.contains("larger than") => bail!(
                "etcd refuses requests of {} bytes ({why}); start every member with --max-request-bytes {} or more",
                self.limits.bytes,
                self.limits.bytes
            ),
            Err(e) => Err(anyhow!(e)).context(format!(
                "checking the etcd cluster at {}",
                self.etcd.endpoints().join(",")
            )),
        }
    }

    /// Record the audit public key in the store the first time, and refuse
    /// to run with another: one log, one signer.
    async fn claim_key(&self) -> Result<()> {
        let ours = hex::encode(self.key.verifying_key().to_bytes());
        let k = self.k(keys::AUDIT_KEY);
        let txn = etcdpb::TxnRequest {
            compare: vec![created_at(k.clone(), 0)],
            success: vec![put(k.clone(), ours.clone())],
            failure: vec![read(k.clone())],
        };
        let stored = match self.etcd.txn(txn).await? {
            r if r.succeeded => ours.clone(),
            r => first_value(&r)
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_default(),
        };
        if stored != ours {
            bail!(
                "the audit log in this etcd store is signed with another key ({stored}); every controller of one store \
                 needs the same audit-ed25519.key in its data directory: copy it from the first controller"
            );
        }
        Ok(())
    }

    /// Make one fenced write. On a lost answer, find out whether it was
    /// applied before sending it again; keep trying while etcd cannot
    /// answer (a lost quorum), and give up only if this controller no
    /// longer leads, or etcd refuses the request itself. On any error the
    /// tails are read again before the next write.
    async fn write(&self, tails: &mut Tails, ops: Vec<etcdpb::RequestOp>) -> Result<()> {
        let r = self.write_once(tails, ops).await;
        if r.is_err() {
            tails.fence = None;
        }
        r
    }

    async fn write_once(&self, tails: &mut Tails, mut ops: Vec<etcdpb::RequestOp>) -> Result<()> {
        let Some(fence) = self.leadership.fence() else {
            return Err(NotLeader(crate::leader::standby_why(None)).into());
        };
        tails.commits += 1;
        let id = format!("{}:{}:{}", self.leadership.instance(), fence, tails.commits);
        let marker = self.k(keys::COMMIT);
        ops.push(put(marker.clone(), id.clone()));
        let req = etcdpb::TxnRequest {
            compare: vec![
                created_at(self.leader_key(), fence),
                modified_at(marker.clone(), tails.marker),
            ],
            success: ops,
            failure: vec![read(self.leader_key()), read(marker.clone())],
        };
        let mut delay = Duration::from_millis(100);
        let mut unanswered = false;
        loop {
            if self.leadership.fence() != Some(fence) {
                return Err(NotLeader("this controller lost its leadership".into()).into());
            }
            match self.etcd.txn(req.clone()).await {
                Ok(r) if r.succeeded => {
                    tails.marker = r.header.map_or(0, |h| h.revision);
                    return Ok(());
                }
                Ok(r) => {
                    let (leader, mark) = refused_reads(&r);
                    if leader.as_ref().is_none_or(|kv| kv.create_revision != fence) {
                        let now = leader
                            .and_then(|kv| serde_json::from_slice::<LeaderRecord>(&kv.value).ok())
                            .map_or_else(|| "nobody".to_owned(), |l| l.url);
                        let why = format!("another controller leads now ({now}): this one's write was refused");
                        self.leadership.lose(&why);
                        return Err(NotLeader(why).into());
                    }
                    // Still ours: the marker moved, so an earlier copy of
                    // this very request was applied, or the store was
                    // changed behind this controller's back.
                    return match mark {
                        Some(kv) if kv.value == id.as_bytes() => {
                            tails.marker = kv.mod_revision;
                            Ok(())
                        }
                        _ => Err(anyhow!(
                            "the etcd store changed under this controller (its commit marker moved, the leader key did not); \
                             is another program writing under {}?",
                            self.prefix
                        )),
                    };
                }
                // Refused now, but an earlier copy may have been applied:
                // the marker says which.
                Err(e @ EtcdError::Refused(_)) if unanswered => {
                    return match self.etcd.get(&marker).await {
                        Ok(Some(kv)) if kv.value == id.as_bytes() => {
                            tails.marker = kv.mod_revision;
                            Ok(())
                        }
                        _ => Err(e.into()),
                    };
                }
                Err(e @ EtcdError::Refused(_)) => return Err(e.into()),
                Err(e) => {
                    unanswered = true;
                    warn!(error = %e, "A write to etcd got no answer; sending it again (at most one copy can apply).");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    // Sending it again is safe: the marker's revision lets
                    // at most one copy apply.
                }
            }
        }
    }

    /// Read the tails (audit head, outbox and refusal counters) once per
    /// leadership; a controller that does not lead has no tails to write.
    async fn tails(&self) -> Result<tokio::sync::MutexGuard<'_, Tails>> {
        let Some(fence) = self.leadership.fence() else {
            return Err(NotLeader(crate::leader::standby_why(None)).into());
        };
        let mut t = self.tails.lock().await;
        if t.fence != Some(fence) {
            // The marker first: a late copy of an earlier write of this
            // controller that lands while the rest is read moves it, and
            // the next write is then refused instead of building on a
            // stale audit head.
            t.marker = self
                .etcd
                .get(&self.k(keys::COMMIT))
                .await?
                .map_or(0, |kv| kv.mod_revision);
            t.head = match self.etcd.last(&self.k(keys::AUDIT)).await? {
                Some(kv) => Some(serde_json::from_slice(&kv.value).context("the last audit record is unreadable")?),
                None => None,
            };
            t.next_outbox = self.next_seq(keys::OUTBOX).await?;
            t.next_refusal = self.next_seq(keys::REFUSALS).await?;
            t.fence = Some(fence);
        }
        Ok(t)
    }

    async fn next_seq(&self, table: &str) -> Result<u64> {
        let p = self.k(table);
        Ok(match self.etcd.last(&p).await? {
            Some(kv) => {
                let k = String::from_utf8_lossy(&kv.key[p.len()..]).into_owned();
                k.parse::<u64>().map(|n| n + 1).unwrap_or(1)
            }
            None => 1,
        })
    }

    /// The operations that append `bodies` to the audit log; returns the
    /// new head to keep once the write succeeds.
    fn audit_ops(
        &self,
        head: Option<&AuditRecord>,
        bodies: Vec<AuditBody>,
        ops: &mut Vec<etcdpb::RequestOp>,
    ) -> Result<Option<AuditRecord>> {
        let (records, cp) = extend_chain(head, &self.key, bodies);
        for r in &records {
            ops.push(put(
                self.k(&format!("{}{}", keys::AUDIT, keys::seq(r.seq))),
                serde_json::to_vec(r)?,
            ));
        }
        if let Some(cp) = cp {
            ops.push(put(self.k(keys::CHECKPOINT), serde_json::to_vec(&cp)?));
        }
        Ok(records.last().cloned())
    }

    fn outbox_ops(&self, first: u64, outbox: &[Vec<u8>], ops: &mut Vec<etcdpb::RequestOp>) -> u64 {
        for (seq, body) in (first..).zip(outbox) {
            ops.push(put(
                self.k(&format!("{}{}", keys::OUTBOX, keys::seq(seq))),
                body.clone(),
            ));
        }
        first + outbox.len() as u64
    }

    /// Scan `table` + `sub` (values with their key after the table name).
    async fn scan(&self, table: &str, sub: &str, f: impl FnMut(&str, Vec<u8>) -> bool) -> Result<()> {
        self.scan_at(table, sub, 0, f).await.map(|_| ())
    }

    /// `scan` at a revision (0: now); returns the revision read.
    async fn scan_at(&self, table: &str, sub: &str, at: i64, mut f: impl FnMut(&str, Vec<u8>) -> bool) -> Result<i64> {
        let p = self.k(table);
        let mut full = p.clone();
        full.extend_from_slice(sub.as_bytes());
        Ok(self
            .etcd
            .scan_at(&full, at, |kv| {
                let k = String::from_utf8_lossy(&kv.key[p.len()..]).into_owned();
                f(&k, kv.value)
            })
            .await?)
    }

    /// Copy a store's keys in (`wavegate store migrate`): only into an
    /// empty prefix, in transactions as large as the limits allow, not
    /// fenced (no controller may run against the prefix meanwhile).
    pub async fn import(&self, entries: Vec<(String, Vec<u8>)>) -> Result<usize> {
        let existing = self.etcd.count(self.prefix.as_bytes()).await?;
        // The audit key this store wrote when it opened does not count.
        if existing > 1 {
            bail!(
                "the etcd prefix {} already holds {existing} keys; migrate only into an empty prefix (give another --store-prefix)",
                self.prefix
            );
        }
        let mut n = 0;
        let mut ops = Vec::new();
        let mut bytes = 0;
        for (k, v) in entries {
            bytes += k.len() + v.len() + 16;
            ops.push(put(self.k(&k), v));
            n += 1;
            if ops.len() + 1 >= self.limits.ops || bytes >= self.limits.bytes / 2 {
                self.import_txn(std::mem::take(&mut ops)).await?;
                bytes = 0;
            }
        }
        if !ops.is_empty() {
            self.import_txn(ops).await?;
        }
        Ok(n)
    }

    async fn import_txn(&self, ops: Vec<etcdpb::RequestOp>) -> Result<()> {
        let txn = etcdpb::TxnRequest {
            compare: vec![created_at(self.leader_key(), 0)],
            success: ops,
            failure: Vec::new(),
        };
        let r = self.etcd.txn(txn).await?;
        if !r.succeeded {
            bail!(
                "a controller took the leadership of this prefix during the migration; stop it and migrate again into a fresh prefix"
            );
        }
        Ok(())
    }
}

fn first_value(r: &etcdpb::TxnResponse) -> Option<Vec<u8>> {
    r.responses.iter().find_map(|op| match &op.response {
        Some(etcdpb::response_op::Response::ResponseRange(rr)) => rr.kvs.first().map(|kv| kv.value.clone()),
        _ => None,
    })
}

#[tonic::async_trait]
impl StateStore for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd {} prefix {}", self.etcd.endpoints().join(","), self.prefix)
    }

    fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    fn max_ops(&self) -> Option<usize> {
        // Room for the checkpoint and the commit id.
        Some(self.limits.ops - 2)
    }

    async fn audit(&self) -> Result<(Vec<AuditRecord>, Option<Checkpoint>)> {
        let mut records = Vec::new();
        let mut bad = None;
        self.scan(keys::AUDIT, "", |k, v| {
            let seq = k.parse::<u64>().unwrap_or(0);
            records.push(serde_json::from_slice(&v).unwrap_or_else(|_| shell(seq)));
            if seq == 0 {
                bad = Some(k.to_owned());
            }
            true
        })
        .await?;
        if let Some(k) = bad {
            bail!(
                "the audit log holds a key that is not a sequence number: {}{}{k}",
                self.prefix,
                keys::AUDIT
            );
        }
        let cp = self
            .etcd
            .get(&self.k(keys::CHECKPOINT))
            .await?
            .and_then(|kv| serde_json::from_slice(&kv.value).ok());
        Ok((records, cp))
    }

    async fn audit_len(&self) -> Result<u64> {
        Ok(self.etcd.count(&self.k(keys::AUDIT)).await?)
    }

    async fn put_inventory(&self, hash: String, text: String) -> Result<()> {
        let mut t = self.tails().await?;
        self.write(&mut t, vec![put(self.k(&format!("{}{hash}", keys::INVENTORIES)), text)])
            .await
    }

    async fn record_refusal(&self, text: String) -> Result<()> {
        let mut t = self.tails().await?;
        let mut ops = vec![put(
            self.k(&format!("{}{}", keys::REFUSALS, keys::seq(t.next_refusal))),
            text.clone(),
        )];
        let head = self.audit_ops(t.head.as_ref(), vec![refusal_body(&text)], &mut ops)?;
        self.write(&mut t, ops).await?;
        t.next_refusal += 1;
        t.head = head.or(t.head.take());
        Ok(())
    }

    async fn refusals(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        self.scan(keys::REFUSALS, "", |_, v| {
            out.push(String::from_utf8_lossy(&v).into_owned());
            true
        })
        .await?;
        Ok(out)
    }

    async fn create_rollout(
        &self,
        plan_hash: String,
        plan_yaml: String,
        build: Build,
    ) -> Result<(Rollout, Vec<HostRecord>)> {
        let mut t = self.tails().await?;
        let next: u64 = match self.etcd.get(&self.k(keys::NEXT_ROLLOUT)).await? {
            Some(kv) => String::from_utf8_lossy(&kv.value)
                .parse()
                .context("the next rollout number in etcd is unreadable")?,
            None => 1,
        };
        let (rollout, hosts, bodies, outbox) = build(super::rollout_id(next));
        let mut ops = vec![
            put(self.k(keys::NEXT_ROLLOUT), (next + 1).to_string()),
            put(self.k(&format!("{}{plan_hash}", keys::PLANS)), plan_yaml),
            put(
                self.k(&format!("{}{}", keys::ROLLOUTS, rollout.id)),
                serde_json::to_vec(&rollout)?,
            ),
        ];
        for h in &hosts {
            ops.push(put(
                self.k(&format!("{}{}", keys::HOSTS, host_key(&rollout.id, &h.host))),
                serde_json::to_vec(h)?,
            ));
        }
        let head = self.audit_ops(t.head.as_ref(), bodies, &mut ops)?;
        let next_outbox = self.outbox_ops(t.next_outbox, &outbox, &mut ops);
        self.write(&mut t, ops).await?;
        t.head = head.or(t.head.take());
        t.next_outbox = next_outbox;
        Ok((rollout, hosts))
    }

    async fn commit(&self, batch: Batch) -> Result<()> {
        let mut t = self.tails().await?;
        let mut ops = Vec::with_capacity(batch.ops() + 2);
        for (id, json) in batch.rollouts {
            ops.push(put(self.k(&format!("{}{id}", keys::ROLLOUTS)), json));
        }
        for (key, json) in batch.hosts {
            ops.push(put(self.k(&format!("{}{key}", keys::HOSTS)), json));
        }
        let head = self.audit_ops(t.head.as_ref(), batch.audit, &mut ops)?;
        let next_outbox = self.outbox_ops(t.next_outbox, &batch.outbox, &mut ops);
        self.write(&mut t, ops).await?;
        t.head = head.or(t.head.take());
        t.next_outbox = next_outbox;
        Ok(())
    }

    async fn load(&self) -> Result<Vec<(Rollout, Vec<HostRecord>)>> {
        let mut rollouts: Vec<(Rollout, Vec<HostRecord>)> = Vec::new();
        let mut bad = None;
        // Headers and host records as of one revision: a consistent copy.
        let at = self
            .scan_at(keys::ROLLOUTS, "", 0, |k, v| match serde_json::from_slice(&v) {
                Ok(r) => {
                    rollouts.push((r, Vec::new()));
                    true
                }
                Err(e) => {
                    bad = Some(format!("rollout {k} in etcd is unreadable: {e}"));
                    false
                }
            })
            .await?;
        if let Some(why) = bad {
            bail!(why);
        }
        let index: std::collections::HashMap<String, usize> = rollouts
            .iter()
            .enumerate()
            .map(|(i, (r, _))| (r.id.clone(), i))
            .collect();
        self.scan_at(keys::HOSTS, "", at, |k, v| {
            let rid = k.split('/').next().unwrap_or_default();
            match (index.get(rid), serde_json::from_slice::<HostRecord>(&v)) {
                (Some(&i), Ok(h)) => {
                    rollouts[i].1.push(h);
                    true
                }
                (_, Err(e)) => {
                    bad = Some(format!("host record {k} in etcd is unreadable: {e}"));
                    false
                }
                // Written with its rollout: none without one at one revision.
                (None, Ok(_)) => true,
            }
        })
        .await?;
        if let Some(why) = bad {
            bail!(why);
        }
        Ok(rollouts)
    }

    async fn outbox_first(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let mut first = None;
        self.scan(keys::OUTBOX, "", |k, v| {
            first = k.parse::<u64>().ok().map(|seq| (seq, v));
            false
        })
        .await?;
        Ok(first)
    }

    async fn outbox_done(&self, seq: u64) -> Result<()> {
        let mut t = self.tails().await?;
        self.write(
            &mut t,
            vec![delete(self.k(&format!("{}{}", keys::OUTBOX, keys::seq(seq))))],
        )
        .await
    }

    async fn append_output(&self, pieces: Vec<OutputPiece>) -> Result<()> {
        let mut t = self.tails().await?;
        let mut ops = Vec::new();
        let mut bytes = 0;
        for p in pieces {
            bytes += p.data.len() + 128;
            ops.push(put(
                self.k(&format!(
                    "{}{}",
                    keys::OUTPUT,
                    output_key(&p.rollout, &p.host, &p.step, p.offset)
                )),
                p.data,
            ));
            if bytes >= self.limits.bytes / 2 || ops.len() + 2 >= self.limits.ops {
                self.write(&mut t, std::mem::take(&mut ops)).await?;
                bytes = 0;
            }
        }
        if !ops.is_empty() {
            self.write(&mut t, ops).await?;
        }
        Ok(())
    }

    async fn read_output(&self, q: OutputQuery) -> Result<Vec<OutputPiece>> {
        let mut sel = Selection::new(&q);
        let sub = sel.prefix();
        self.scan(keys::OUTPUT, &sub, |k, v| sel.take(k, &v)).await?;
        Ok(sel.pieces)
    }

    async fn output_digest(&self, rollout: String, host: String, step: String) -> Result<(u64, String, bool)> {
        let mut d = OutputDigest::default();
        self.scan(
            keys::OUTPUT,
            &format!("{rollout}\u{0}{host}\u{0}{step}\u{0}"),
            |k, v| {
                d.add(k, &v);
                true
            },
        )
        .await?;
        Ok(d.finish())
    }

    async fn output_ends(&self, rollout: String, host: String) -> Result<Vec<(String, u64)>> {
        let mut ends = OutputEnds::default();
        self.scan(keys::OUTPUT, &format!("{rollout}\u{0}{host}\u{0}"), |k, v| {
            ends.add(k, v.len());
            true
        })
        .await?;
        Ok(ends.finish())
    }

    async fn plan(&self, hash: String) -> Result<Option<String>> {
        Ok(self
            .etcd
            .get(&self.k(&format!("{}{hash}", keys::PLANS)))
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }
}

/// The leader key and the commit marker, as a refused write read them.
fn refused_reads(r: &etcdpb::TxnResponse) -> (Option<etcdpb::KeyValue>, Option<etcdpb::KeyValue>) {
    let mut kvs = r.responses.iter().map(|op| match &op.response {
        Some(etcdpb::response_op::Response::ResponseRange(range)) => range.kvs.first().cloned(),
        _ => None,
    });
    (kvs.next().flatten(), kvs.next().flatten())
}
