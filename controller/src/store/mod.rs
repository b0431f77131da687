//! The controller's durable store, behind one interface with two
//! implementations: [`redb`] (embedded, one file in the data directory: the
//! default) and [`etcd`] (a cluster several controllers share, one of them
//! the leader).
//!
//! Both keep the same promise: a change is acted on only once it is durable
//! (redb's commit is an fdatasync, etcd's a raft commit a quorum has on
//! disk), and the audit records of a change are appended in the same
//! transaction as the change itself.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use ed25519_dalek::{SigningKey, VerifyingKey};
use wavegate_domain::audit::{self, AuditBody, AuditRecord, Checkpoint, Tamper};
use wavegate_domain::rollout::{HostRecord, Rollout};

pub mod etcd;
pub mod redb;

pub use self::redb::{AUDIT, RedbStore};

/// The redb store under its old name.
pub type Store = RedbStore;

/// Builds a new rollout from the id the store allocated: the header, its
/// host records, their audit records and notifications.
pub type Build = Box<dyn FnOnce(String) -> (Rollout, Vec<HostRecord>, Vec<AuditBody>, Vec<Vec<u8>>) + Send>;

/// One group commit: rollout headers and host records (JSON, keyed by
/// rollout id and by [`host_key`]), the audit records of the changes and
/// their notifications, all in one transaction.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Rollout headers.
    pub rollouts: Vec<(String, Vec<u8>)>,
    /// Host records.
    pub hosts: Vec<(String, Vec<u8>)>,
    /// Audit records.
    pub audit: Vec<AuditBody>,
    /// Notifications.
    pub outbox: Vec<Vec<u8>>,
}

impl Batch {
    /// How many keys the batch writes (audit records count one each).
    pub fn ops(&self) -> usize {
        self.rollouts.len() + self.hosts.len() + self.audit.len() + self.outbox.len()
    }
}

/// Which stored output to read.
#[derive(Clone, Debug, Default)]
pub struct OutputQuery {
    /// Rollout.
    pub rollout: String,
    /// One host only.
    pub host: Option<String>,
    /// One step only.
    pub step: Option<String>,
    /// Per (host, step): skip pieces that start before this offset.
    pub from: HashMap<(String, String), u64>,
    /// Stop after about this many bytes.
    pub max_bytes: usize,
}

/// A piece of a step's output, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputPiece {
    /// Rollout.
    pub rollout: String,
    /// Host.
    pub host: String,
    /// Step, fetch or check.
    pub step: String,
    /// Where `data` starts in the step's output.
    pub offset: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Letters of the random part of ids: no two that read alike (no i, l, o, u).
const ID_LETTERS: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// `n` random letters of [`ID_LETTERS`] (5 bits each).
pub fn random_letters(n: usize) -> String {
    (0..n)
        .map(|_| char::from(ID_LETTERS[usize::from(rand::random::<u8>() & 31)]))
        .collect()
}

/// The id of the `seq`th rollout of a store: its number for people, and
/// 30 random bits so that an id is never given twice, even by a store put
/// back from a backup that has counted the same numbers again (the agents
/// keep snapshots and journals under the old ids).
pub fn rollout_id(seq: u64) -> String {
    format!("r{seq:04}-{}", random_letters(6))
}

/// The key of a piece of output: rollout, host, step and offset, so that a
/// range scan reads one step's output in order.
pub fn output_key(rollout: &str, host: &str, step: &str, offset: u64) -> String {
    format!("{rollout}\u{0}{host}\u{0}{step}\u{0}{offset:020}")
}

/// The parts of an [`output_key`].
pub fn parse_output_key(k: &str) -> Option<(String, String, String, u64)> {
    let mut it = k.split('\u{0}');
    let (r, h, s, o) = (it.next()?, it.next()?, it.next()?, it.next()?);
    Some((r.to_owned(), h.to_owned(), s.to_owned(), o.parse().ok()?))
}

/// The key of a host record: `<rollout id>/<host id>`.
pub fn host_key(rollout: &str, host: &str) -> String {
    format!("{rollout}/{host}")
}

/// The durable store, as the engine, the API and the web view use it.
#[tonic::async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// What it is and where, for people (`redb /var/lib/wavegate`).
    fn describe(&self) -> String;

    /// The key that verifies the audit log's checkpoints.
    fn public_key(&self) -> VerifyingKey;

    /// The most keys one commit may write, if the store has a limit: the
    /// engine splits a group commit between changes to stay under it.
    fn max_ops(&self) -> Option<usize> {
        None
    }

    /// Every audit record, in order, and the signed head. A record that no
    /// longer parses is kept as an empty shell with its sequence number, so
    /// that verification names it instead of failing to read.
    async fn audit(&self) -> Result<(Vec<AuditRecord>, Option<Checkpoint>)>;

    /// How many records the audit log holds.
    async fn audit_len(&self) -> Result<u64>;

    /// Verify the live audit log.
    async fn verify_audit(&self) -> Result<std::result::Result<usize, Tamper>> {
        let (records, cp) = self.audit().await?;
        Ok(verdict(&records, cp.as_ref(), &self.public_key()))
    }

    /// Keep the inventory the controller runs with.
    async fn put_inventory(&self, hash: String, text: String) -> Result<()>;

    /// Record a refused request (and its audit record).
    async fn record_refusal(&self, text: String) -> Result<()>;

    /// Every refused request, oldest first.
    async fn refusals(&self) -> Result<Vec<String>>;

    /// Create a rollout in one transaction: allocate its id, store the plan
    /// bytes, the header, every host record, their audit records and
    /// notifications.
    async fn create_rollout(
        &self,
        plan_hash: String,
        plan_yaml: String,
        build: Build,
    ) -> Result<(Rollout, Vec<HostRecord>)>;

    /// Commit one batch in one transaction.
    async fn commit(&self, batch: Batch) -> Result<()>;

    /// Every rollout with its host records, oldest first.
    async fn load(&self) -> Result<Vec<(Rollout, Vec<HostRecord>)>>;

    /// The oldest notification not yet delivered.
    async fn outbox_first(&self) -> Result<Option<(u64, Vec<u8>)>>;

    /// A notification was delivered: it goes.
    async fn outbox_done(&self, seq: u64) -> Result<()>;

    /// Store pieces of output. Output is not what the engine acts on; a
    /// store may make it durable with the next state change instead.
    async fn append_output(&self, pieces: Vec<OutputPiece>) -> Result<()>;

    /// Stored output of a rollout, in order of host, step and offset.
    async fn read_output(&self, q: OutputQuery) -> Result<Vec<OutputPiece>>;

    /// Bytes stored for one step's output, contiguous from its start, and
    /// their SHA-256; and whether there is a gap (something missing).
    async fn output_digest(&self, rollout: String, host: String, step: String) -> Result<(u64, String, bool)>;

    /// Where each stored step's output of a rollout and host ends.
    async fn output_ends(&self, rollout: String, host: String) -> Result<Vec<(String, u64)>>;

    /// The plan bytes with this hash.
    async fn plan(&self, hash: String) -> Result<Option<String>>;
}

/// The verdict on an audit log and its signed head.
pub fn verdict(
    records: &[AuditRecord],
    cp: Option<&Checkpoint>,
    key: &VerifyingKey,
) -> std::result::Result<usize, Tamper> {
    match cp {
        Some(cp) => audit::verify(records, cp, key),
        None if records.is_empty() => Ok(0),
        None => Err(Tamper {
            seq: 1,
            why: "the log has records but no signed checkpoint".into(),
        }),
    }
}

/// An audit record that no longer parses, kept with its sequence number.
pub fn shell(seq: u64) -> AuditRecord {
    AuditRecord {
        seq,
        at_ms: 0,
        prev: String::new(),
        body_sha256: String::new(),
        hash: String::new(),
        body: None,
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Load the controller's audit signing key from `dir/audit-ed25519.key`, or
/// make one (mode 0600). Controllers that share an etcd store share this
/// key: the deployment copies it to each.
pub fn signing_key(dir: &Path) -> Result<SigningKey> {
    let path = dir.join("audit-ed25519.key");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let bytes = hex::decode(text.trim()).with_context(|| format!("{} is not a hex key", path.display()))?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .with_context(|| format!("{} is not a 32-byte key", path.display()))?;
        return Ok(SigningKey::from_bytes(&arr));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating the data directory {}", dir.display()))?;
    let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(hex::encode(key.to_bytes()).as_bytes())?;
    f.sync_all()?;
    Ok(key)
}

/// The audit record of a refusal.
pub fn refusal_body(text: &str) -> AuditBody {
    AuditBody {
        kind: "refusal".into(),
        rollout: None,
        host: None,
        actor: None,
        text: text.to_owned(),
        data: serde_json::Value::Null,
    }
}

/// Picks the pieces an [`OutputQuery`] asks for from a key-ordered scan.
pub struct Selection<'a> {
    q: &'a OutputQuery,
    bytes: usize,
    /// What was picked.
    pub pieces: Vec<OutputPiece>,
}

impl<'a> Selection<'a> {
    /// A selection for `q`.
    pub fn new(q: &'a OutputQuery) -> Selection<'a> {
        Selection {
            q,
            bytes: 0,
            pieces: Vec::new(),
        }
    }

    /// The key prefix to scan.
    pub fn prefix(&self) -> String {
        match &self.q.host {
            Some(h) => format!("{}\u{0}{h}\u{0}", self.q.rollout),
            None => format!("{}\u{0}", self.q.rollout),
        }
    }

    /// Consider one stored piece; false once enough was picked.
    pub fn take(&mut self, key: &str, data: &[u8]) -> bool {
        let Some((r, h, s, offset)) = parse_output_key(key) else {
            return true;
        };
        if self.q.step.as_ref().is_some_and(|want| *want != s) {
            return true;
        }
        if self.q.from.get(&(h.clone(), s.clone())).is_some_and(|f| offset < *f) {
            return true;
        }
        self.bytes += data.len();
        self.pieces.push(OutputPiece {
            rollout: r,
            host: h,
            step: s,
            offset,
            data: data.to_vec(),
        });
        self.bytes < self.q.max_bytes
    }
}

/// The SHA-256 of one step's stored output, read in order.
#[derive(Default)]
pub struct OutputDigest {
    h: sha2::Sha256,
    end: u64,
    gap: bool,
}

impl OutputDigest {
    /// Add the next stored piece.
    pub fn add(&mut self, key: &str, data: &[u8]) {
        use sha2::Digest as _;
        let Some((_, _, _, offset)) = parse_output_key(key) else {
            return;
        };
        if offset != self.end {
            self.gap = true;
        }
        self.h.update(data);
        self.end = offset + data.len() as u64;
    }

    /// (bytes up to the last piece's end, SHA-256, whether a piece is missing).
    pub fn finish(self) -> (u64, String, bool) {
        use sha2::Digest as _;
        (self.end, hex::encode(self.h.finalize()), self.gap)
    }
}

/// Where each step's stored output ends, from a scan of one host's output.
#[derive(Default)]
pub struct OutputEnds(std::collections::BTreeMap<String, u64>);

impl OutputEnds {
    /// Add the next stored piece (its key and length).
    pub fn add(&mut self, key: &str, len: usize) {
        if let Some((_, _, s, offset)) = parse_output_key(key) {
            self.0.insert(s, offset + len as u64);
        }
    }

    /// (step, end) pairs, by step.
    pub fn finish(self) -> Vec<(String, u64)> {
        self.0.into_iter().collect()
    }
}

/// Extend the audit chain after `last` with `bodies`; returns the new
/// records and the signed checkpoint of the new head (none if no body).
pub fn extend_chain(
    last: Option<&AuditRecord>,
    key: &SigningKey,
    bodies: Vec<AuditBody>,
) -> (Vec<AuditRecord>, Option<Checkpoint>) {
    let at = now_ms();
    let mut out: Vec<AuditRecord> = Vec::with_capacity(bodies.len());
    for body in bodies {
        let r = audit::next(out.last().or(last), at, body);
        out.push(r);
    }
    let cp = out.last().map(|head| Checkpoint::sign(key, head.seq, &head.hash));
    (out, cp)
}

/// The names of the store's keys, as the etcd store lays them out under
/// its prefix (and `wavegate store migrate` copies a redb store into).
pub mod keys {
    /// The leader key (attached to the leader's lease).
    pub const LEADER: &str = "leader";
    /// The id of the last transaction committed (to tell whether a write
    /// whose answer was lost was applied).
    pub const COMMIT: &str = "commit";
    /// The next rollout number.
    pub const NEXT_ROLLOUT: &str = "meta/next_rollout";
    /// The public key that verifies the audit log's checkpoints.
    pub const AUDIT_KEY: &str = "meta/audit_key";
    /// The signed head of the audit log.
    pub const CHECKPOINT: &str = "checkpoint";
    /// Plan bytes by SHA-256.
    pub const PLANS: &str = "plans/";
    /// Rollout headers by id.
    pub const ROLLOUTS: &str = "rollouts/";
    /// Host records by `<rollout id>/<host id>`.
    pub const HOSTS: &str = "hosts/";
    /// Inventory files by SHA-256.
    pub const INVENTORIES: &str = "inventories/";
    /// Refused requests by sequence number.
    pub const REFUSALS: &str = "refusals/";
    /// Audit records by sequence number.
    pub const AUDIT: &str = "audit/";
    /// Notifications not yet delivered, by sequence number.
    pub const OUTBOX: &str = "outbox/";
    /// Output pieces by output key.
    pub const OUTPUT: &str = "output/";

    /// A sequence number as a key that sorts in order.
    pub fn seq(n: u64) -> String {
        format!("{n:020}")
    }
}
