//! The rollout engine: submit, approve, then wave by wave (steps, health
//! checks, bake), halting by itself when a wave fails beyond its budget.
//!
//! Every state change is persisted before it is acted on: a command's id is
//! stored as the host's `in_flight` before the command is sent, so after a
//! controller restart the same id is sent again and the agent answers from
//! its journal instead of running the step twice.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};
use wavegate_domain::audit::AuditBody;
use wavegate_domain::command::{
    Command, CommandKind, CommandResult, DryRun, Fetch, FetchReport, Outcome, Report as AgentReport, RunStep,
    SnapshotBackend,
};
use wavegate_domain::effects::{DryRunRecord, FetchRecord};
use wavegate_domain::plan::{CheckKind, Plan};
use wavegate_domain::rollout::{
    Approval, CheckSpec, Control, HostNext, HostPreview, HostRecord, HostState, ProbeSpec, RebootWait, RollbackRequest,
    RollbackState, Rollout, RolloutState, StateError, StepResult, StepSpec, TransitionError, Wave, WaveState,
};
use wavegate_domain::snapshot::{SnapshotEvent, SnapshotRecord, SnapshotState};
use wavegate_domain::{Fleet, PolicySet, Report, Source, check_plan};

use crate::hub::{ExecError, Hub};
use crate::leader::Leadership;
use crate::store::{StateStore, host_key};

pub use change::Change;

mod change;
mod commit;
mod host;
mod output;
mod rollback;

mod mirrors;
mod submit;
mod updaters;
mod wave;

/// A rollout and its hosts, as held in memory (mirrors the store).
#[derive(Clone, Debug)]
pub struct Entry {
    /// Header.
    pub rollout: Rollout,
    /// Host records by id.
    pub hosts: BTreeMap<String, HostRecord>,
    /// What hosts of a running wave are doing that their records do not
    /// say yet (`dry-run`, `snapshot`), for people watching. Kept in
    /// memory only: a restarted controller starts the host over anyway.
    pub activity: BTreeMap<String, &'static str>,
}

impl Entry {
    /// The host records, to read (as [`Change::hosts`] gives them).
    pub fn hosts(&self) -> &BTreeMap<String, HostRecord> {
        &self.hosts
    }
}

/// Why a request was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The plan is bad input (parse errors); the report says where.
    #[error("the plan is not valid")]
    BadPlan(Box<Report>),
    /// A safety rule refused the plan.
    #[error("the plan was refused by the safety rules")]
    Refused(Box<Report>),
    /// The first wave's dry-run was blocked; the rollout is stored refused.
    #[error("the dry-run was blocked")]
    DryRunBlocked(Box<Entry>),
    /// A request refused by a gate (self-approval, bypass, wrong hash...).
    #[error("{0}")]
    Denied(String),
    /// No such rollout.
    #[error("no rollout `{0}`")]
    NotFound(String),
    /// Not allowed in the rollout's state.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// The engine asked a wave or a host for a move it cannot make (a bug):
    /// nothing of that change is stored.
    #[error(transparent)]
    State(#[from] StateError),
    /// The store failed; nothing was acted on.
    #[error("the store failed: {0}")]
    Store(#[from] anyhow::Error),
    /// This controller is a standby (or cannot act as the leader now):
    /// ask the leader.
    #[error("{0}")]
    Standby(String),
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long past a step's own timeout the controller waits for an agent
    /// (to reconnect and answer) before the host counts as failed.
    pub agent_grace: Duration,
    /// How much output the controller keeps per host and rollout.
    pub output_cap: u64,
    /// How much output the controller keeps per rollout, every host
    /// together: hosts that flood cannot fill the controller's disk.
    pub output_rollout_cap: u64,
    /// Whether state changes are announced (a webhook is configured):
    /// their notifications go into the outbox with each change.
    pub notify: bool,
    /// Whether this controller may act (always, with an embedded store).
    pub leadership: Arc<Leadership>,
}

/// The output kept per host and rollout when the controller is not told.
pub const DEFAULT_OUTPUT_CAP: u64 = 256 << 20;

/// The output kept per rollout (all hosts) when the controller is not told.
pub const DEFAULT_OUTPUT_ROLLOUT_CAP: u64 = 2 << 30;

/// Changes applied in memory and waiting for their commit, in order.
struct Pending {
    rollout: String,
    /// `<rollout>/<host>` keys and JSON of the host records it changed.
    hosts: Vec<(String, Vec<u8>)>,
    bodies: Vec<AuditBody>,
    /// Notifications of the change, committed with it.
    outbox: Vec<Vec<u8>>,
}

/// What the engine holds under its lock.
#[derive(Default)]
struct State {
    rollouts: BTreeMap<String, Entry>,
    /// Changes not yet committed (the group-commit queue).
    queue: Vec<Pending>,
    /// Sequence number of the last change queued.
    queued: u64,
    /// SHA-256 of each host record as last queued, so only real changes
    /// become audit records.
    host_digests: HashMap<String, [u8; 32]>,
    /// Command ids of real steps handed to a session (every step in flight
    /// when the state was loaded counts: it may have been): a halt names
    /// the hosts whose step was sent, not those whose id was stored and
    /// will never be sent.
    sent: HashSet<String>,
}

impl State {
    /// The state as stored.
    fn loaded(stored: Vec<(Rollout, Vec<HostRecord>)>) -> Result<State> {
        let mut state = State::default();
        for (rollout, hosts) in stored {
            for h in &hosts {
                let json = serde_json::to_vec(h).map_err(anyhow::Error::from)?;
                state
                    .host_digests
                    .insert(host_key(&rollout.id, &h.host), Sha256::digest(&json).into());
            }
            for h in &hosts {
                if let (Some(cmd), HostState::Running) = (&h.in_flight, h.state) {
                    state.sent.insert(cmd.clone());
                }
            }
            let hosts = hosts.into_iter().map(|h| (h.host.clone(), h)).collect();
            state.rollouts.insert(
                rollout.id.clone(),
                Entry {
                    rollout,
                    hosts,
                    activity: BTreeMap::new(),
                },
            );
        }
        Ok(state)
    }
}

/// How far the store has caught up with memory.
#[derive(Clone, Debug, Default)]
struct Durable {
    /// Every change up to this sequence number is committed.
    upto: u64,
    /// A commit failed: nothing more is acted on (fail closed).
    failed: Option<String>,
}

/// The engine.
pub struct Engine {
    store: Arc<dyn StateStore>,
    metrics: crate::metrics::Metrics,
    inventory_hash: String,
    fleet_text: String,
    hub: Arc<Hub>,
    fleet: Fleet,
    policies: PolicySet,
    settings: Settings,
    state: Mutex<State>,
    drivers: Mutex<HashSet<String>>,
    /// Whether this controller has read the store as leader (always, for a
    /// single controller): until then an elected one changes nothing and
    /// drives nothing, since its memory is a standby's copy.
    promoted: std::sync::atomic::AtomicBool,
    changes: watch::Sender<u64>,
    durable: watch::Sender<Durable>,
    /// Wakes the writer when a change is queued.
    wake: Arc<Notify>,
    /// Distinguishes this controller process's health-check rounds from an
    /// earlier one's, so a restarted bake never gets a journaled old answer.
    boot: String,
    /// Live output on its way to the store.
    output: output::OutputSink,
    /// Wakes the notification sender when something was put in the outbox.
    notified: Arc<Notify>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time in milliseconds.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn event(r: &mut Rollout, text: impl Into<String>) {
    let text = text.into();
    info!(rollout = %r.id, "{text}");
    r.events.push(format!("{} {text}", utc(now_ms())));
}

/// The unguessable part of a command id: a session that learns or
/// guesses another host's ids still cannot answer for it (the hub also
/// checks the host), and no id repeats across controllers or restored
/// stores.
fn nonce() -> String {
    crate::store::random_letters(8)
}

fn checks_command(id: String, checks: &[CheckSpec]) -> Command {
    let rollout_id = id.split(':').next().unwrap_or_default().to_owned();
    Command::new(
        id,
        CommandKind::RunChecks {
            rollout_id,
            checks: checks.to_vec(),
        },
    )
}

fn checks_timeout(checks: &[CheckSpec]) -> Duration {
    Duration::from_millis(checks.iter().map(|c| c.timeout_ms).sum::<u64>())
}

/// Summarise a checks result for people.
fn checks_detail(r: &CommandResult) -> String {
    let failed: Vec<String> = r
        .checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    if failed.is_empty() {
        r.detail.clone()
    } else {
        format!("health check failed: {}", failed.join("; "))
    }
}

impl Engine {
    /// An engine over an open store; rollouts in it are loaded. A standby
    /// engine serves reads until [`Engine::promote`].
    pub async fn new(
        store: Arc<dyn StateStore>,
        hub: Arc<Hub>,
        (fleet, fleet_text): (Fleet, &str),
        policies: PolicySet,
        settings: Settings,
    ) -> Result<Arc<Engine>> {
        let inventory_hash = hex::encode(Sha256::digest(fleet_text.as_bytes()));
        if settings.leadership.leads() {
            store
                .put_inventory(inventory_hash.clone(), fleet_text.to_owned())
                .await?;
        }
        hub.set_leadership(Arc::clone(&settings.leadership));
        hub.set_redact(policies.redact());
        hub.set_accept_weaker(policies.accept_weaker());
        let state = State::loaded(store.load().await?)?;
        let (changes, _) = watch::channel(0);
        let (durable, _) = watch::channel(Durable::default());
        let wake = Arc::new(Notify::new());
        let (output, output_rx) = output::OutputSink::new();
        let cap = (settings.output_cap, settings.output_rollout_cap);
        let engine = Arc::new(Engine {
            output,
            notified: Arc::new(Notify::new()),
            store,
            metrics: crate::metrics::Metrics::new().map_err(|e| anyhow::anyhow!("metrics: {e}"))?,
            inventory_hash,
            fleet_text: fleet_text.to_owned(),
            hub,
            fleet,
            policies,
            settings,
            state: Mutex::new(state),
            drivers: Mutex::new(HashSet::new()),
            promoted: std::sync::atomic::AtomicBool::new(false),
            changes,
            durable,
            wake: Arc::clone(&wake),
            boot: format!("{:x}", now_ms()),
        });
        tokio::spawn(commit::writer(Arc::downgrade(&engine), wake));
        tokio::spawn(output::writer(Arc::downgrade(&engine), output_rx, cap));
        Ok(engine)
    }

    /// A standby reads the store again, to show what the leader did.
    pub async fn refresh(&self) -> Result<()> {
        if self.settings.leadership.leads() {
            return Ok(());
        }
        let fresh = State::loaded(self.store.load().await?)?;
        {
            let mut st = self.lock();
            st.rollouts = fresh.rollouts;
            st.host_digests = fresh.host_digests;
        }
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// This controller was elected: read the store as the old leader left
    /// it, and continue every rollout from there.
    pub async fn promote(self: &Arc<Self>) -> Result<()> {
        let fresh = State::loaded(self.store.load().await?)?;
        {
            let mut st = self.lock();
            st.rollouts = fresh.rollouts;
            st.host_digests = fresh.host_digests;
        }
        self.store
            .put_inventory(self.inventory_hash.clone(), self.fleet_text.clone())
            .await?;
        self.halt_what_is_over_budget().await?;
        self.promoted.store(true, std::sync::atomic::Ordering::SeqCst);
        self.changes.send_modify(|n| *n += 1);
        self.start();
        Ok(())
    }

    fn promoted(&self) -> bool {
        self.settings.leadership.is_single() || self.promoted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether this controller leads (and has taken over); if not, who does.
    pub fn leading(&self) -> Result<(), EngineError> {
        if self.settings.leadership.leads() && self.promoted() {
            Ok(())
        } else if self.settings.leadership.leads() {
            Err(EngineError::Standby(
                "this controller was just elected and is still reading the store; try again in a moment".into(),
            ))
        } else {
            Err(EngineError::Standby(
                self.settings.leadership.may_act().err().unwrap_or_default(),
            ))
        }
    }

    /// Who may act.
    pub fn leadership(&self) -> &Arc<Leadership> {
        &self.settings.leadership
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Note what a host is doing before its record says so (`None`: done),
    /// and wake the watchers.
    fn set_activity(&self, id: &str, host: &str, what: Option<&'static str>) {
        {
            let mut st = self.lock();
            let Some(e) = st.rollouts.get_mut(id) else { return };
            match what {
                Some(w) => e.activity.insert(host.to_owned(), w),
                None => e.activity.remove(host),
            };
        }
        self.changes.send_modify(|n| *n += 1);
    }

    /// Run `f` on a rollout under the lock (for small reads).
    fn with<R>(&self, id: &str, f: impl FnOnce(&Entry) -> R) -> Result<R, EngineError> {
        let st = self.lock();
        st.rollouts
            .get(id)
            .map(f)
            .ok_or_else(|| EngineError::NotFound(id.to_owned()))
    }

    /// Why the engine stopped acting, if a commit to the store failed.
    pub fn store_failure(&self) -> Option<String> {
        self.store_failed()
    }

    /// `f` of every rollout, under the lock (for figures; no copies).
    pub fn rollup<R>(&self, f: impl Fn(&Entry) -> R) -> Vec<R> {
        self.lock().rollouts.values().map(f).collect()
    }

    /// The inventory.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// The agent hub.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Record a refused request durably (and in the log). A standby only
    /// logs it: it writes nothing.
    pub async fn refuse(&self, text: &str) {
        warn!(refusal = text, "Refused a request.");
        // A standby, or a leader that cannot reach its store right now,
        // only logs it: the request handler must not wait for an outage.
        if !self.settings.leadership.leads() || self.settings.leadership.may_act().is_err() {
            return;
        }
        if let Err(e) = self.store.record_refusal(format!("{} {text}", utc(now_ms()))).await {
            error!(error = %e, "Could not record a refusal.");
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The store, shared (for the notification sender).
    pub fn store_arc(&self) -> Arc<dyn StateStore> {
        Arc::clone(&self.store)
    }

    /// What wakes the notification sender.
    pub fn notified(&self) -> Arc<Notify> {
        Arc::clone(&self.notified)
    }

    /// The store (audit log reads).
    pub fn store(&self) -> &dyn StateStore {
        &*self.store
    }

    /// Every refusal recorded so far.
    pub async fn refusals(&self) -> Result<Vec<String>> {
        self.store.refusals().await
    }

    /// Subscribe to "something changed".
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Start drivers for every approved rollout that is not finished (after a
    /// restart, they continue where they stopped).
    pub fn start(self: &Arc<Self>) {
        if !self.settings.leadership.leads() || !self.promoted() {
            return;
        }
        let ids: Vec<String> = self
            .lock()
            .rollouts
            .values()
            .filter(|e| {
                // A final rollout whose updaters' hold was not released yet
                // is driven to release it.
                (!e.rollout.state.is_final() && e.rollout.state != RolloutState::AwaitingApproval)
                    || !e.rollout.updaters_held.is_empty()
                    || e.rollout
                        .mirrors
                        .iter()
                        .any(wavegate_domain::rollout::MirrorHold::owes_resume)
            })
            .map(|e| e.rollout.id.clone())
            .collect();
        for id in ids {
            self.spawn_driver(&id);
        }
        // Rollback requests approved but not finished when the last
        // controller stopped: their hosts are restored again, to the end.
        let approved: Vec<(String, u32, Vec<String>)> = self
            .lock()
            .rollouts
            .values()
            .flat_map(|e| {
                e.rollout
                    .rollback_requests
                    .iter()
                    .filter(|q| q.state == RollbackState::Running)
                    .map(|q| (e.rollout.id.clone(), q.number, q.hosts.clone()))
            })
            .collect();
        for (id, number, hosts) in approved {
            let engine = Arc::clone(self);
            tokio::spawn(async move {
                if let Err(e) = engine.carry_out_rollback(&id, number, hosts).await {
                    error!(rollout = %id, error = %e, "A rollback request found running could not be finished.");
                }
            });
        }
        let engine = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                engine.sweep_snapshots().await;
            }
        });
    }

    fn spawn_driver(self: &Arc<Self>, id: &str) {
        let fresh = self
            .drivers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_owned());
        if fresh {
            let engine = Arc::clone(self);
            let id = id.to_owned();
            tokio::spawn(async move {
                if let Err(e) = engine.clone().drive(&id).await {
                    error!(rollout = %id, error = %e, "Rollout driver stopped; nothing more is sent for it.");
                }
                engine
                    .drivers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&id);
            });
        }
    }

    /// A copy of one rollout, as committed.
    pub async fn get(&self, id: &str) -> Result<Entry, EngineError> {
        self.read_durable(id, Entry::clone).await
    }

    /// The full id of the rollout an operator names: the id itself, or its
    /// number alone (`r0007` for `r0007-k3x9qa`) when exactly one rollout
    /// has it. Anything else is returned as given (and is then not found).
    pub fn full_id(&self, id: &str) -> String {
        let st = self.lock();
        if id.is_empty() || st.rollouts.contains_key(id) {
            return id.to_owned();
        }
        let prefix = format!("{id}-");
        let mut found = st.rollouts.keys().filter(|k| k.starts_with(&prefix));
        match (found.next(), found.next()) {
            (Some(one), None) => one.clone(),
            _ => id.to_owned(),
        }
    }

    /// `get` for an operator or the web view: on a leader cut off from its
    /// store it does not wait for the outage to end (see
    /// `durable_for_reader`).
    pub async fn show(&self, id: &str) -> Result<Entry, EngineError> {
        let (entry, seq) = {
            let st = self.lock();
            let e = st
                .rollouts
                .get(id)
                .ok_or_else(|| EngineError::NotFound(id.to_owned()))?;
            (e.clone(), st.queued)
        };
        self.durable_for_reader(seq).await?;
        Ok(entry)
    }

    /// Copies of every rollout, newest first, as committed.
    pub async fn list(&self) -> Vec<Entry> {
        let (all, seq) = {
            let st = self.lock();
            (st.rollouts.values().rev().cloned().collect(), st.queued)
        };
        // On a failed store this still shows memory; /ready says why.
        let _ = self.durable_for_reader(seq).await;
        all
    }
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_340_182_800_000), "2012-06-20T09:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}
