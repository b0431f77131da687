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
use wavegate_domain::effects::{DryRunRecord, StepReport};
use wavegate_domain::plan::{CheckKind, OnFailure, Plan};
use wavegate_domain::rollout::{
    Approval, CheckSpec, HostRecord, HostState, ProbeSpec, Rollout, RolloutState, StepResult, StepSpec,
    TransitionError, Wave, WaveState, over_budget,
};
use wavegate_domain::snapshot::{SnapshotEvent, SnapshotRecord, SnapshotState};
use wavegate_domain::{Fleet, PolicySet, Report, Source, check_plan};
use wavegate_proto::v1 as pb;

use crate::hub::{ExecError, Hub};
use crate::store::{Store, host_key};

/// A rollout and its hosts, as held in memory (mirrors the store).
#[derive(Clone, Debug)]
pub struct Entry {
    /// Header.
    pub rollout: Rollout,
    /// Host records by id.
    pub hosts: BTreeMap<String, HostRecord>,
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
    /// The store failed; nothing was acted on.
    #[error("the store failed: {0}")]
    Store(#[from] anyhow::Error),
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long past a step's own timeout the controller waits for an agent
    /// (to reconnect and answer) before the host counts as failed.
    pub agent_grace: Duration,
}

/// Changes applied in memory and waiting for their commit, in order.
struct Pending {
    rollout: String,
    /// `<rollout>/<host>` keys and JSON of the host records it changed.
    hosts: Vec<(String, Vec<u8>)>,
    bodies: Vec<AuditBody>,
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
    store: Arc<Store>,
    metrics: crate::metrics::Metrics,
    inventory_hash: String,
    hub: Arc<Hub>,
    fleet: Fleet,
    policies: PolicySet,
    settings: Settings,
    state: Mutex<State>,
    drivers: Mutex<HashSet<String>>,
    changes: watch::Sender<u64>,
    durable: watch::Sender<Durable>,
    /// Wakes the writer when a change is queued.
    wake: Arc<Notify>,
    /// Distinguishes this controller process's health-check rounds from an
    /// earlier one's, so a restarted bake never gets a journaled old answer.
    boot: String,
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

/// What a host task does next.
enum Next {
    Stop,
    Step { index: usize, resend: Option<String> },
    Checks { cmd: pb::Command, timeout: Duration },
}

fn outcome_name(o: i32) -> &'static str {
    match pb::Outcome::try_from(o).unwrap_or(pb::Outcome::Unspecified) {
        pb::Outcome::Ok => "ok",
        pb::Outcome::Failed => "failed",
        pb::Outcome::TimedOut => "timed_out",
        pb::Outcome::Interrupted => "interrupted",
        pb::Outcome::Refused => "refused",
        pb::Outcome::Unspecified => "unknown",
    }
}

fn checks_command(id: String, checks: &[CheckSpec]) -> pb::Command {
    let checks = checks
        .iter()
        .map(|c| pb::HealthCheck {
            name: c.name.clone(),
            timeout_ms: c.timeout_ms,
            probe: Some(match &c.probe {
                ProbeSpec::Tcp(a) => pb::health_check::Probe::Tcp(a.clone()),
                ProbeSpec::Http { url, expect_status } => pb::health_check::Probe::Http(pb::HttpProbe {
                    url: url.clone(),
                    expect_status: u32::from(*expect_status),
                }),
                ProbeSpec::Exec(cmd) => pb::health_check::Probe::Exec(cmd.clone()),
            }),
        })
        .collect();
    pb::Command {
        id,
        kind: Some(pb::command::Kind::RunChecks(pb::RunChecks { checks })),
    }
}

fn checks_timeout(checks: &[CheckSpec]) -> Duration {
    Duration::from_millis(checks.iter().map(|c| c.timeout_ms).sum::<u64>())
}

/// Summarise a checks result for people.
fn checks_detail(r: &pb::CommandResult) -> String {
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
    /// An engine over an open store; rollouts in it are loaded.
    pub fn new(
        store: Store,
        hub: Arc<Hub>,
        (fleet, fleet_text): (Fleet, &str),
        policies: PolicySet,
        settings: Settings,
    ) -> Result<Arc<Engine>> {
        let inventory_hash = hex::encode(Sha256::digest(fleet_text.as_bytes()));
        store.put_inventory(&inventory_hash, fleet_text)?;
        let mut state = State::default();
        for (rollout, hosts) in store.load()? {
            for h in &hosts {
                let json = serde_json::to_vec(h).map_err(anyhow::Error::from)?;
                state
                    .host_digests
                    .insert(host_key(&rollout.id, &h.host), Sha256::digest(&json).into());
            }
            let hosts = hosts.into_iter().map(|h| (h.host.clone(), h)).collect();
            state.rollouts.insert(rollout.id.clone(), Entry { rollout, hosts });
        }
        let (changes, _) = watch::channel(0);
        let (durable, _) = watch::channel(Durable::default());
        let wake = Arc::new(Notify::new());
        let engine = Arc::new(Engine {
            store: Arc::new(store),
            metrics: crate::metrics::Metrics::new().map_err(|e| anyhow::anyhow!("metrics: {e}"))?,
            inventory_hash,
            hub,
            fleet,
            policies,
            settings,
            state: Mutex::new(state),
            drivers: Mutex::new(HashSet::new()),
            changes,
            durable,
            wake: Arc::clone(&wake),
            boot: format!("{:x}", now_ms()),
        });
        tokio::spawn(writer(Arc::downgrade(&engine), wake));
        Ok(engine)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Why nothing more may be acted on, if a commit failed.
    fn store_failed(&self) -> Option<String> {
        self.durable.borrow().failed.clone()
    }

    /// Why the engine stopped acting, if a commit to the store failed.
    pub fn store_failure(&self) -> Option<String> {
        self.store_failed()
    }

    /// `f` of every rollout, under the lock (for figures; no copies).
    pub fn rollup<R>(&self, f: impl Fn(&Entry) -> R) -> Vec<R> {
        self.lock().rollouts.values().map(f).collect()
    }

    /// Wait until every change up to `seq` is committed.
    async fn durable_upto(&self, seq: u64) -> Result<(), EngineError> {
        let mut rx = self.durable.subscribe();
        let d = rx
            .wait_for(|d| d.upto >= seq || d.failed.is_some())
            .await
            .map_err(|_| EngineError::Store(anyhow::anyhow!("the store writer stopped")))?
            .clone();
        match d.failed {
            Some(why) if d.upto < seq => Err(EngineError::Store(anyhow::anyhow!(why))),
            _ => Ok(()),
        }
    }

    /// Read a rollout under the lock, and return once what was read is
    /// committed: callers never see a state a power cut could take back.
    async fn read_durable<R>(&self, id: &str, f: impl FnOnce(&Entry) -> R) -> Result<R, EngineError> {
        let (out, seq) = {
            let st = self.lock();
            let e = st
                .rollouts
                .get(id)
                .ok_or_else(|| EngineError::NotFound(id.to_owned()))?;
            (f(e), st.queued)
        };
        self.durable_upto(seq).await?;
        Ok(out)
    }

    /// The dispatch gate of a rollout: open while it runs and the store
    /// works. The guard it returns is the engine's lock, so a halt cannot
    /// slip in between the check and the send.
    fn gate<'a>(&'a self, id: &'a str) -> impl Fn() -> Result<std::sync::MutexGuard<'a, State>, String> + 'a {
        move || {
            let st = self.lock();
            if let Some(why) = self.store_failed() {
                return Err(why);
            }
            match st.rollouts.get(id).map(|e| e.rollout.state) {
                Some(RolloutState::Running) => Ok(st),
                Some(state) => Err(format!("rollout {id} is {state}")),
                None => Err(format!("no rollout {id}")),
            }
        }
    }

    /// Run `f` on a rollout under the lock (for small reads).
    fn with<R>(&self, id: &str, f: impl FnOnce(&Entry) -> R) -> Result<R, EngineError> {
        let st = self.lock();
        st.rollouts
            .get(id)
            .map(f)
            .ok_or_else(|| EngineError::NotFound(id.to_owned()))
    }

    /// The inventory.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// The agent hub.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Record a refused request durably (and in the log).
    pub fn refuse(&self, text: &str) {
        warn!(refusal = text, "Refused a request.");
        if let Err(e) = self.store.record_refusal(&format!("{} {text}", utc(now_ms()))) {
            error!(error = %e, "Could not record a refusal.");
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The store (audit log reads).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Every refusal recorded so far.
    pub fn refusals(&self) -> Result<Vec<String>> {
        self.store.refusals()
    }

    /// Subscribe to "something changed".
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Start drivers for every approved rollout that is not finished (after a
    /// restart, they continue where they stopped).
    pub fn start(self: &Arc<Self>) {
        let ids: Vec<String> = self
            .lock()
            .rollouts
            .values()
            .filter(|e| !e.rollout.state.is_final() && e.rollout.state != RolloutState::AwaitingApproval)
            .map(|e| e.rollout.id.clone())
            .collect();
        for id in ids {
            self.spawn_driver(&id);
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

    /// Apply `f` to a rollout in memory, queue the header and the hosts it
    /// names for the next group commit, and return once that commit is
    /// durable, so nobody acts on the change before a power cut would keep
    /// it. Changes are committed in the order they were made. `f` must not
    /// change anything before it returns an error.
    async fn mutate<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Entry) -> Result<(R, Vec<String>), EngineError>,
    ) -> Result<R, EngineError> {
        let (out, seq) = {
            let mut st = self.lock();
            if let Some(why) = self.store_failed() {
                return Err(EngineError::Store(anyhow::anyhow!(why)));
            }
            let State {
                rollouts,
                queue,
                queued,
                host_digests,
            } = &mut *st;
            let entry = rollouts
                .get_mut(id)
                .ok_or_else(|| EngineError::NotFound(id.to_owned()))?;
            let events_before = entry.rollout.events.len();
            let (out, changed) = f(entry)?;
            // The audit records of this change go into the same commit.
            let mut bodies: Vec<AuditBody> = entry.rollout.events[events_before.min(entry.rollout.events.len())..]
                .iter()
                .map(|text| AuditBody {
                    kind: "event".into(),
                    rollout: Some(id.to_owned()),
                    host: None,
                    actor: None,
                    text: text.clone(),
                    data: serde_json::Value::Null,
                })
                .collect();
            let mut hosts = Vec::new();
            for name in changed.iter().collect::<BTreeSet<_>>() {
                let Some(h) = entry.hosts.get(name) else { continue };
                let json = serde_json::to_vec(h).map_err(anyhow::Error::from)?;
                let key = host_key(id, name);
                let digest: [u8; 32] = Sha256::digest(&json).into();
                if host_digests.get(&key) == Some(&digest) {
                    continue;
                }
                host_digests.insert(key.clone(), digest);
                bodies.push(AuditBody {
                    kind: "host".into(),
                    rollout: Some(id.to_owned()),
                    host: Some(h.host.clone()),
                    actor: None,
                    text: format!("{}: {} ({})", h.host, h.state.as_str(), h.detail),
                    data: serde_json::to_value(h).unwrap_or_default(),
                });
                hosts.push((key, json));
            }
            *queued += 1;
            queue.push(Pending {
                rollout: id.to_owned(),
                hosts,
                bodies,
            });
            (out, *queued)
        };
        self.wake.notify_one();
        self.durable_upto(seq).await?;
        self.changes.send_modify(|n| *n += 1);
        Ok(out)
    }

    /// A copy of one rollout, as committed.
    pub async fn get(&self, id: &str) -> Result<Entry, EngineError> {
        self.read_durable(id, Entry::clone).await
    }

    /// Copies of every rollout, newest first, as committed.
    pub async fn list(&self) -> Vec<Entry> {
        let (all, seq) = {
            let st = self.lock();
            (st.rollouts.values().rev().cloned().collect(), st.queued)
        };
        // On a failed store this still shows memory; /ready says why.
        let _ = self.durable_upto(seq).await;
        all
    }

    /// Validate a plan exactly as `plan check` does, dry-run every step on
    /// the first wave's hosts, and create a rollout. A blocked dry-run (or a
    /// host that cannot dry-run) stores the rollout as refused: it can never
    /// be approved, and its reports say what would have happened.
    pub async fn submit(
        self: &Arc<Self>,
        submitter: &str,
        plan_file: &str,
        plan_yaml: &str,
        bypass: &[String],
    ) -> Result<(Entry, Report), EngineError> {
        if !bypass.is_empty() {
            self.refuse(&format!("{submitter} asked to bypass: {}", bypass.join(", ")));
            return Err(EngineError::Denied(format!(
                "refused: nothing skips the canary, the approval or the backup rule (asked to bypass: {})",
                bypass.join(", ")
            )));
        }
        let (report, plan) = check_plan(
            &self.fleet,
            Source {
                name: plan_file,
                text: plan_yaml,
            },
            &self.policies,
        );
        let plan = match plan {
            Some(p) if report.ok => p,
            _ if report.exit_status() == 2 => return Err(EngineError::BadPlan(Box::new(report))),
            _ => return Err(EngineError::Refused(Box::new(report))),
        };
        let hash = hex::encode(Sha256::digest(plan_yaml.as_bytes()));
        let waves: Vec<Vec<String>> = report.waves.iter().map(|w| w.hosts.clone()).collect();
        let (template, _) = build(String::new(), submitter, &hash, &plan, &waves, &self.policies);
        let first = waves.first().cloned().unwrap_or_default();
        let tag = format!("submit:{}:{}", &hash[..12], self.boot);
        let mut probes = Vec::new();
        for host in first {
            let engine = Arc::clone(self);
            let steps = template.steps.clone();
            let untouchable = template.untouchable.clone();
            let tag = tag.clone();
            probes.push(tokio::spawn(async move {
                engine.dry_run(&tag, &host, &steps, &untouchable).await
            }));
        }
        let mut records = Vec::new();
        for p in probes {
            match p.await {
                Ok(r) => records.extend(r),
                Err(e) => return Err(EngineError::Store(anyhow::anyhow!("dry-run task failed: {e}"))),
            }
        }
        let blocked: Vec<String> = records
            .iter()
            .filter(|r| r.blocked)
            .map(DryRunRecord::summary)
            .collect();
        crate::failpoint::hit("submit-dry-run-done");
        let (rollout, hosts) = self.store.create_rollout(&hash, plan_yaml, |id| {
            let (mut r, h) = build(id, submitter, &hash, &plan, &waves, &self.policies);
            r.inventory_hash.clone_from(&self.inventory_hash);
            r.dry_runs = records.clone();
            r.dry_run_digest = hex::encode(Sha256::digest(serde_json::to_vec(&records).unwrap_or_default()));
            for rec in &records {
                event(&mut r, format!("dry-run at submit: {}", rec.summary()));
            }
            if !blocked.is_empty() {
                r.state = RolloutState::Refused;
                r.halt_reason = Some(format!(
                    "refused at submit: the first wave's dry-run was blocked: {}",
                    blocked.join(" | ")
                ));
                event(&mut r, "refused: a blocked dry-run; this rollout can never be approved");
            }
            let mut bodies = vec![AuditBody {
                kind: "submit".into(),
                rollout: Some(r.id.clone()),
                host: None,
                actor: Some(submitter.to_owned()),
                text: format!("{submitter} submitted plan `{}` ({hash})", r.plan_name),
                data: serde_json::json!({
                    "plan_hash": hash,
                    "plan_file": plan_file,
                    "plan_yaml": plan_yaml,
                    "inventory_hash": r.inventory_hash,
                    "targets": report.targets,
                    "waves": report.waves,
                    "notes": report.notes,
                    "policies": report.policies,
                    "violations": report.violations,
                    "dry_runs": r.dry_runs,
                }),
            }];
            bodies.extend(r.events.iter().map(|text| AuditBody {
                kind: "event".into(),
                rollout: Some(r.id.clone()),
                host: None,
                actor: None,
                text: text.clone(),
                data: serde_json::Value::Null,
            }));
            (r, h, bodies)
        })?;
        crate::failpoint::hit("submit-committed");
        let entry = Entry {
            hosts: hosts.into_iter().map(|h| (h.host.clone(), h)).collect(),
            rollout,
        };
        self.lock().rollouts.insert(entry.rollout.id.clone(), entry.clone());
        self.changes.send_modify(|n| *n += 1);
        if !blocked.is_empty() {
            self.refuse(&format!(
                "submission {} by {submitter}: dry-run blocked",
                entry.rollout.id
            ));
            return Err(EngineError::DryRunBlocked(Box::new(entry)));
        }
        Ok((entry, report))
    }

    /// Dry-run `steps` in one sandbox on `host`; one record per step. A host
    /// that cannot answer, or whose sandbox fails, is blocked.
    async fn dry_run(&self, tag: &str, host: &str, steps: &[StepSpec], untouchable: &[String]) -> Vec<DryRunRecord> {
        let cmd = pb::Command {
            id: format!("{tag}:{host}:dry-run"),
            kind: Some(pb::command::Kind::DryRun(pb::DryRun {
                rollout_id: String::new(),
                untouchable: untouchable.to_vec(),
                steps: steps
                    .iter()
                    .map(|s| pb::DryRunStep {
                        name: s.name.clone(),
                        run: s.run.clone(),
                        writes: s.writes.clone(),
                        max_deletions: s.max_deletions,
                        timeout_ms: s.timeout_ms,
                    })
                    .collect(),
            })),
        };
        let timeout = Duration::from_millis(steps.iter().map(|s| s.timeout_ms).sum::<u64>());
        let deadline = Instant::now() + timeout + self.settings.agent_grace;
        let blocked_all = |why: String| {
            steps
                .iter()
                .map(|s| DryRunRecord {
                    host: host.to_owned(),
                    step: s.name.clone(),
                    blocked: true,
                    reasons: vec![why.clone()],
                    report: None,
                })
                .collect()
        };
        let records: Vec<DryRunRecord> = match self.hub.execute(host, cmd, deadline).await {
            Ok(r) => match serde_json::from_str::<Vec<StepReport>>(&r.report_json) {
                Ok(reports) if reports.len() == steps.len() => reports
                    .into_iter()
                    .map(|rep| DryRunRecord {
                        host: host.to_owned(),
                        step: rep.step.clone(),
                        blocked: rep.blocked,
                        reasons: rep.reasons.clone(),
                        report: Some(rep),
                    })
                    .collect(),
                _ => blocked_all(format!("no dry-run report: {}", r.detail)),
            },
            Err(e) => blocked_all(format!("no dry-run: {e}")),
        };
        let blocked = records.iter().filter(|r| r.blocked).count();
        self.metrics.dry_runs_blocked.inc_by(blocked as u64);
        records
    }

    /// Approve, bound to the plan hash the approver saw.
    pub async fn approve(self: &Arc<Self>, who: &str, id: &str, plan_hash: &str) -> Result<Entry, EngineError> {
        let started = self
            .mutate(id, |e| {
                let r = &mut e.rollout;
                if r.submitter == who {
                    return Err(EngineError::Denied(format!(
                        "{who} submitted this rollout and cannot approve it; another person must"
                    )));
                }
                if !plan_hash.is_empty() && plan_hash != r.plan_hash {
                    return Err(EngineError::Denied(format!(
                        "the plan changed: you approved {plan_hash}, this rollout runs {}; review the plan it runs",
                        r.plan_hash
                    )));
                }
                let hash = r.plan_hash.clone();
                let dry_run_digest = r.dry_run_digest.clone();
                let started = r.approve(Approval {
                    who: who.to_owned(),
                    plan_hash: hash,
                    dry_run_digest,
                    at_ms: now_ms(),
                })?;
                event(
                    r,
                    format!(
                        "approved by {who} ({} of {}) for plan {} and dry-run reports {}",
                        r.approvals.len(),
                        r.approvals_required,
                        r.plan_hash,
                        r.dry_run_digest
                    ),
                );
                if started {
                    event(r, "all approvals in; rollout running");
                }
                Ok((started, Vec::new()))
            })
            .await;
        if let Err(EngineError::Denied(msg)) = &started {
            self.refuse(&format!("approval of {id} by {who}: {msg}"));
            // Record it on the rollout too (the transaction above did not commit).
            let _ = self
                .mutate(id, |e| {
                    event(&mut e.rollout, format!("refused approval by {who}: {msg}"));
                    Ok(((), Vec::new()))
                })
                .await;
        }
        if started? {
            crate::failpoint::hit("approval-committed");
            self.spawn_driver(id);
        }
        self.get(id).await
    }

    /// Pause, resume or abort, on an operator's word.
    pub async fn control(self: &Arc<Self>, who: &str, id: &str, action: &str) -> Result<Entry, EngineError> {
        self.mutate(id, |e| {
            let r = &mut e.rollout;
            let mut changed = Vec::new();
            match action {
                "pause" => r.pause()?,
                "resume" => {
                    let was_halted = r.state == RolloutState::Halted;
                    r.resume()?;
                    if was_halted {
                        // Failed hosts of the re-entered wave are retried.
                        for h in e.hosts.values_mut() {
                            if h.state == HostState::Failed
                                && r.waves.get(h.wave).is_some_and(|w| w.state == WaveState::Pending)
                            {
                                h.state = HostState::Running;
                                h.in_flight = None;
                                changed.push(h.host.clone());
                            }
                        }
                    }
                }
                _ => r.abort()?,
            }
            event(r, format!("{action} by {who}"));
            Ok(((), changed))
        })
        .await?;
        if action == "resume" {
            self.spawn_driver(id);
        }
        self.get(id).await
    }

    async fn wait_change(&self, rx: &mut watch::Receiver<u64>) {
        let _ = rx.changed().await;
    }

    async fn drive(self: Arc<Self>, id: &str) -> Result<(), EngineError> {
        let mut rx = self.subscribe();
        loop {
            let (state, rollback_pending, current) = self.with(id, |e| {
                (e.rollout.state, e.rollout.rollback_pending, e.rollout.current_wave())
            })?;
            match state {
                RolloutState::Running => {}
                RolloutState::Completed | RolloutState::Aborted | RolloutState::Refused => return Ok(()),
                RolloutState::Halted if rollback_pending => {
                    self.auto_rollback(id).await?;
                    continue;
                }
                _ => {
                    self.wait_change(&mut rx).await;
                    continue;
                }
            }
            match current {
                None => {
                    self.mutate(id, |e| {
                        e.rollout.complete()?;
                        event(&mut e.rollout, "every wave confirmed healthy; rollout completed");
                        Ok(((), Vec::new()))
                    })
                    .await?;
                    return Ok(());
                }
                Some(w) => self.run_wave(id, w).await?,
            }
        }
    }

    fn running(&self, id: &str) -> bool {
        self.lock()
            .rollouts
            .get(id)
            .is_some_and(|e| e.rollout.state == RolloutState::Running)
    }

    async fn run_wave(self: &Arc<Self>, id: &str, w: usize) -> Result<(), EngineError> {
        let started = Instant::now();
        let hosts = self
            .mutate(id, |e| {
                let wave = &mut e.rollout.waves[w];
                if wave.state == WaveState::Pending {
                    wave.state = WaveState::Running;
                    let text = format!("wave {} started: {}", wave.index, wave.hosts.join(", "));
                    event(&mut e.rollout, text);
                }
                Ok((e.rollout.waves[w].hosts.clone(), Vec::new()))
            })
            .await?;
        crate::failpoint::hit("wave-start-committed");
        let mut tasks = Vec::new();
        for host in hosts {
            let engine = Arc::clone(self);
            let id = id.to_owned();
            tasks.push(tokio::spawn(async move { engine.run_host(&id, w, &host).await }));
        }
        for t in tasks {
            match t.await {
                Ok(r) => r?,
                Err(e) => return Err(EngineError::Store(anyhow::anyhow!("host task failed: {e}"))),
            }
        }
        if !self.running(id) {
            return Ok(());
        }
        self.bake(id, w).await?;
        if self.with(id, |e| e.rollout.waves[w].state)? == WaveState::Confirmed {
            self.metrics.waves_confirmed.inc();
            self.metrics.wave_duration.observe(started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    async fn bake(self: &Arc<Self>, id: &str, w: usize) -> Result<(), EngineError> {
        let (bake, interval, checks, attempt) = self
            .mutate(id, |e| {
                let r = &mut e.rollout;
                r.waves[w].state = WaveState::Baking;
                let text = format!("wave {} baking for {} ms", w + 1, r.bake_ms);
                event(r, text);
                Ok((
                    (r.bake_ms, r.interval_ms.max(1), r.checks.clone(), r.attempt),
                    Vec::new(),
                ))
            })
            .await?;
        crate::failpoint::hit("bake-committed");
        let end = Instant::now() + Duration::from_millis(bake);
        let mut round = 0u64;
        while Instant::now() < end {
            let pause = Duration::from_millis(interval).min(end - Instant::now());
            tokio::time::sleep(pause).await;
            if !self.running(id) {
                return Ok(());
            }
            round += 1;
            if checks.is_empty() {
                continue;
            }
            let healthy: Vec<String> = {
                let state = self.lock();
                let Some(e) = state.rollouts.get(id) else { return Ok(()) };
                e.hosts
                    .values()
                    .filter(|h| h.wave == w && h.state == HostState::Healthy)
                    .map(|h| h.host.clone())
                    .collect()
            };
            let mut probes = Vec::new();
            for host in healthy {
                let cmd = checks_command(format!("{id}:{attempt}:{host}:bake:{}:{round}", self.boot), &checks);
                let deadline = Instant::now() + checks_timeout(&checks) + self.settings.agent_grace;
                let engine = Arc::clone(self);
                probes.push(tokio::spawn(async move {
                    (host.clone(), engine.hub.execute(&host, cmd, deadline).await)
                }));
            }
            for p in probes {
                let Ok((host, res)) = p.await else { continue };
                let failed = match res {
                    Ok(r) if r.outcome == pb::Outcome::Ok as i32 => None,
                    Ok(r) => Some(format!("during bake: {}", checks_detail(&r))),
                    Err(e) => Some(format!("during bake: {e}")),
                };
                if let Some(detail) = failed {
                    self.host_failed(id, w, &host, detail).await?;
                }
            }
            if !self.running(id) {
                return Ok(());
            }
        }
        self.mutate(id, |e| {
            let r = &mut e.rollout;
            if r.state != RolloutState::Running {
                return Ok(((), Vec::new()));
            }
            r.waves[w].state = WaveState::Confirmed;
            event(r, format!("wave {} confirmed healthy", w + 1));
            let retain_ms = r.retain_ms;
            let mut changed = Vec::new();
            for h in e.hosts.values_mut().filter(|h| h.wave == w) {
                if let Some(snap) = h.snapshot.as_mut() {
                    snap.apply(&SnapshotEvent::WaveConfirmed {
                        now_ms: now_ms(),
                        retain_ms,
                    });
                    changed.push(h.host.clone());
                }
            }
            Ok(((), changed))
        })
        .await?;
        if self.with(id, |e| e.rollout.waves[w].state)? == WaveState::Confirmed {
            crate::failpoint::hit("wave-confirmed");
        }
        Ok(())
    }

    /// Mark a host failed; halt when the wave is over its budget.
    async fn host_failed(&self, id: &str, w: usize, host: &str, detail: String) -> Result<(), EngineError> {
        self.host_failed_at(id, w, host, detail, None).await
    }

    /// [`Engine::host_failed`] for a failure an agent reported at `received`:
    /// when it halts the rollout, the time from then to the halt's commit is
    /// measured.
    async fn host_failed_at(
        &self,
        id: &str,
        w: usize,
        host: &str,
        detail: String,
        received: Option<Instant>,
    ) -> Result<(), EngineError> {
        let halted = self
            .mutate(id, |e| {
                let h = e
                    .hosts
                    .get_mut(host)
                    .ok_or_else(|| EngineError::NotFound(host.to_owned()))?;
                h.state = HostState::Failed;
                h.in_flight = None;
                h.detail = detail.clone();
                let r = &mut e.rollout;
                event(r, format!("host {host} failed: {detail}"));
                let failed = e
                    .hosts
                    .values()
                    .filter(|h| h.wave == w && h.state == HostState::Failed)
                    .count();
                let size = r.waves[w].hosts.len();
                let budget = r.budget(w, size);
                if over_budget(failed, budget) && matches!(r.state, RolloutState::Running | RolloutState::Paused) {
                    let in_flight: Vec<String> = e
                        .hosts
                        .values()
                        .filter(|h| h.in_flight.is_some())
                        .map(|h| h.host.clone())
                        .collect();
                    let what = if w == 0 {
                        "the canary (wave 1)".to_string()
                    } else {
                        format!("wave {}", w + 1)
                    };
                    let mut reason =
                        format!("{what}: {failed} of {size} hosts failed, budget {budget}; last: {host}: {detail}");
                    if !in_flight.is_empty() {
                        reason.push_str(&format!("; in flight at the halt: {}", in_flight.join(", ")));
                    }
                    r.halt(w, reason.clone())?;
                    event(r, format!("halted: {reason}"));
                    self.metrics.waves_halted.inc();
                    if r.on_failure == "rollback" {
                        r.rollback_pending = true;
                    }
                    // Only hosts whose snapshot record changes are written
                    // again: at 10,000 hosts, serialising every record here
                    // made the halt several times slower to commit.
                    let mut changed = vec![host.to_owned()];
                    for h in e.hosts.values_mut() {
                        if let Some(snap) = h.snapshot.as_mut() {
                            let before = snap.clone();
                            snap.apply(&SnapshotEvent::Halted);
                            if *snap != before {
                                changed.push(h.host.clone());
                            }
                        }
                    }
                    return Ok((true, changed));
                }
                Ok((false, vec![host.to_owned()]))
            })
            .await?;
        if halted {
            crate::failpoint::hit("halt-committed");
        }
        if halted && let Some(at) = received {
            let secs = at.elapsed().as_secs_f64();
            self.metrics.halt_commit.observe(secs);
            self.metrics.last_halt_commit.set(secs);
        }
        Ok(())
    }

    fn next_for(&self, e: &mut Entry, host: &str) -> Result<(Next, Vec<String>), EngineError> {
        let r = &e.rollout;
        if r.state != RolloutState::Running {
            return Ok((Next::Stop, Vec::new()));
        }
        let (rid, attempt, steps, checks) = (r.id.clone(), r.attempt, r.steps.clone(), r.checks.clone());
        let h = e
            .hosts
            .get_mut(host)
            .ok_or_else(|| EngineError::NotFound(host.to_owned()))?;
        let next = match h.state {
            HostState::Healthy | HostState::Failed => Next::Stop,
            HostState::Untouched | HostState::Running if h.next_step < steps.len() => {
                let index = h.next_step;
                match h.in_flight.clone() {
                    // Sent before a restart or a reconnect: send the same id again.
                    Some(id) => Next::Step {
                        index,
                        resend: Some(id),
                    },
                    None => Next::Step { index, resend: None },
                }
            }
            HostState::Untouched | HostState::Running | HostState::Succeeded => {
                if checks.is_empty() {
                    h.state = HostState::Healthy;
                    h.detail = "steps done; the plan has no health checks".into();
                    Next::Stop
                } else {
                    let cmd_id = h
                        .in_flight
                        .clone()
                        .unwrap_or_else(|| format!("{rid}:{attempt}:{host}:checks:{}", self.boot));
                    h.in_flight = Some(cmd_id.clone());
                    h.state = HostState::Succeeded;
                    h.detail = "steps done; running health checks".into();
                    Next::Checks {
                        cmd: checks_command(cmd_id, &checks),
                        timeout: checks_timeout(&checks),
                    }
                }
            }
        };
        let _ = rid;
        Ok((next, vec![host.to_owned()]))
    }

    async fn record_host(&self, id: &str, host: &str, f: impl FnOnce(&mut HostRecord)) -> Result<(), EngineError> {
        self.mutate(id, |e| {
            let h = e
                .hosts
                .get_mut(host)
                .ok_or_else(|| EngineError::NotFound(host.to_owned()))?;
            f(h);
            Ok(((), vec![host.to_owned()]))
        })
        .await
    }

    /// Dry-run step `index` on the host's current state, snapshot the write
    /// set before the first real step, then persist the command id and send
    /// the confined real step. Returns the step's result, or why it did not
    /// run (the host has then failed).
    async fn real_step(
        self: &Arc<Self>,
        id: &str,
        w: usize,
        host: &str,
        index: usize,
        resend: Option<String>,
    ) -> Result<Option<(String, pb::CommandResult, Instant)>, EngineError> {
        let (step, attempt, write_set, untouchable, backend) = self.with(id, |e| {
            let r = &e.rollout;
            (
                r.steps[index].clone(),
                r.attempt,
                r.write_set.clone(),
                r.untouchable.clone(),
                r.snapshot_backend.clone(),
            )
        })?;
        let cmd_id = match resend {
            Some(cmd_id) => cmd_id,
            None => {
                // 1. Its own dry-run, right before the real run.
                let tag = format!("{id}:{attempt}:{}", self.boot);
                let records = self
                    .dry_run(
                        &format!("{tag}:step{index}"),
                        host,
                        std::slice::from_ref(&step),
                        &untouchable,
                    )
                    .await;
                let record = records.into_iter().next();
                if let Some(rec) = &record {
                    let rec2 = rec.clone();
                    self.record_host(id, host, |h| {
                        h.dry_runs.retain(|d| d.step != rec2.step);
                        h.dry_runs.push(rec2);
                    })
                    .await?;
                }
                match &record {
                    Some(rec) if !rec.blocked => {}
                    Some(rec) => {
                        self.host_failed(
                            id,
                            w,
                            host,
                            format!("step `{}` not run: dry-run blocked: {}", step.name, rec.summary()),
                        )
                        .await?;
                        return Ok(None);
                    }
                    None => {
                        self.host_failed(id, w, host, format!("step `{}` not run: no dry-run report", step.name))
                            .await?;
                        return Ok(None);
                    }
                }
                // 2. A verified snapshot before the host's first real step.
                let has_snapshot = self.with(id, |e| e.hosts.get(host).is_some_and(|h| h.snapshot.is_some()))?;
                if !has_snapshot {
                    let cmd = pb::Command {
                        id: format!("{id}:{host}:snapshot"),
                        kind: Some(pb::command::Kind::TakeSnapshot(pb::TakeSnapshot {
                            rollout_id: id.to_owned(),
                            paths: write_set.clone(),
                            untouchable: untouchable.clone(),
                            backend: backend.clone(),
                        })),
                    };
                    let deadline = Instant::now() + Duration::from_secs(600) + self.settings.agent_grace;
                    match self
                        .hub
                        .execute_gated(host, cmd, deadline, self.gate(id))
                        .await
                        .map(|(r, _)| r)
                    {
                        Err(ExecError::NotSent(why)) => {
                            info!(rollout = %id, host, "Snapshot not sent: {why}.");
                            return Ok(None);
                        }
                        Ok(res) if res.outcome == pb::Outcome::Ok as i32 => {
                            let info: serde_json::Value = serde_json::from_str(&res.report_json).unwrap_or_default();
                            let mut snap = SnapshotRecord::pinned(
                                info["archive_bytes"].as_u64().unwrap_or(0),
                                info["files"].as_u64().unwrap_or(0),
                                now_ms(),
                            );
                            snap.parts = serde_json::from_value(info["parts"].clone()).unwrap_or_default();
                            // The host record (and its audit record) says so, with
                            // the backend of every part; no rollout event per host,
                            // which would grow without bound.
                            self.record_host(id, host, |h| {
                                h.detail =
                                    format!("snapshot of its write set taken and verified ({})", snap.backends());
                                h.snapshot = Some(snap);
                            })
                            .await?;
                        }
                        Ok(res) => {
                            self.host_failed(
                                id,
                                w,
                                host,
                                format!("no verified snapshot, so no real step: {}", res.detail),
                            )
                            .await?;
                            return Ok(None);
                        }
                        Err(e) => {
                            self.host_failed(id, w, host, format!("no verified snapshot, so no real step: {e}"))
                                .await?;
                            return Ok(None);
                        }
                    }
                }
                // 3. Persist the command id, unless a halt came in meanwhile.
                let cmd_id = format!("{id}:{attempt}:{host}:step{index}");
                let sent = self
                    .mutate(id, |e| {
                        if e.rollout.state != RolloutState::Running {
                            return Ok((false, Vec::new()));
                        }
                        let h = e
                            .hosts
                            .get_mut(host)
                            .ok_or_else(|| EngineError::NotFound(host.to_owned()))?;
                        h.in_flight = Some(cmd_id.clone());
                        h.state = HostState::Running;
                        h.detail = format!("running step `{}`", step.name);
                        Ok((true, vec![host.to_owned()]))
                    })
                    .await?;
                if !sent {
                    return Ok(None);
                }
                crate::failpoint::hit("step-persisted");
                cmd_id
            }
        };
        let hints = self
            .with(id, |e| {
                e.hosts.get(host).and_then(|h| {
                    h.dry_runs
                        .iter()
                        .find(|d| d.step == step.name)
                        .and_then(|d| d.report.clone())
                })
            })?
            .unwrap_or_default();
        let cmd = pb::Command {
            id: cmd_id.clone(),
            kind: Some(pb::command::Kind::RunStep(pb::RunStep {
                rollout_id: id.to_owned(),
                step_name: step.name.clone(),
                run: step.run.clone(),
                writes: step.writes.clone(),
                timeout_ms: step.timeout_ms,
                max_deletions: step.max_deletions,
                create_dirs: hints.created_dirs,
                create_files: hints.created_files,
                untouchable,
            })),
        };
        let deadline = Instant::now() + Duration::from_millis(step.timeout_ms) + self.settings.agent_grace;
        match self.hub.execute_gated(host, cmd, deadline, self.gate(id)).await {
            Ok((res, received)) => Ok(Some((step.name, res, received))),
            // Halted, paused or aborted since the command id was stored: the
            // id stays in flight, and a resume sends that same id again.
            Err(ExecError::NotSent(why)) => {
                info!(rollout = %id, host, "Step not sent: {why}.");
                Ok(None)
            }
            Err(e) => {
                self.host_failed(id, w, host, format!("step `{}`: {e}", step.name))
                    .await?;
                Ok(None)
            }
        }
    }

    async fn run_host(self: Arc<Self>, id: &str, w: usize, host: &str) -> Result<(), EngineError> {
        loop {
            let next = self.mutate(id, |e| self.next_for(e, host)).await?;
            match next {
                Next::Stop => return Ok(()),
                Next::Step { index, resend } => {
                    let Some((step_name, r, received)) = self.real_step(id, w, host, index, resend).await? else {
                        return Ok(());
                    };
                    let ok = r.outcome == pb::Outcome::Ok as i32;
                    self.metrics.steps.with_label_values(&[outcome_name(r.outcome)]).inc();
                    self.metrics.step_duration.observe(r.duration_ms as f64 / 1000.0);
                    let result = StepResult {
                        step: step_name.clone(),
                        command_id: r.command_id.clone(),
                        outcome: outcome_name(r.outcome).into(),
                        exit_code: r.exit_code,
                        duration_ms: r.duration_ms,
                        output_sha256: r.output_sha256.clone(),
                        replayed: r.replayed,
                        output_tail: String::from_utf8_lossy(&r.output_tail).into_owned(),
                    };
                    self.record_host(id, host, |h| {
                        h.results.push(result);
                        if ok {
                            h.next_step += 1;
                            h.in_flight = None;
                            h.detail = format!("step `{step_name}` done");
                        }
                    })
                    .await?;
                    if !ok {
                        let tail = String::from_utf8_lossy(&r.output_tail);
                        let last = tail.lines().last().unwrap_or_default().to_owned();
                        let detail = format!(
                            "step `{step_name}` {} (exit {}){}{}",
                            outcome_name(r.outcome),
                            r.exit_code,
                            if r.detail.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", r.detail)
                            },
                            if last.is_empty() {
                                String::new()
                            } else {
                                format!("; last output: {last}")
                            }
                        );
                        return self.host_failed_at(id, w, host, detail, Some(received)).await;
                    }
                }
                Next::Checks { cmd, timeout } => {
                    let deadline = Instant::now() + timeout + self.settings.agent_grace;
                    match self
                        .hub
                        .execute_gated(host, cmd, deadline, || Ok::<(), String>(()))
                        .await
                    {
                        Ok((r, _)) if r.outcome == pb::Outcome::Ok as i32 => {
                            self.record_host(id, host, |h| {
                                h.state = HostState::Healthy;
                                h.in_flight = None;
                                h.detail = "healthy".into();
                            })
                            .await?;
                            return Ok(());
                        }
                        Ok((r, received)) => {
                            return self
                                .host_failed_at(id, w, host, checks_detail(&r), Some(received))
                                .await;
                        }
                        Err(e) => return self.host_failed(id, w, host, format!("health checks: {e}")).await,
                    }
                }
            }
        }
    }

    /// After an automatic halt with `on_failure: rollback`: restore the
    /// halted wave's failed hosts, then clear the flag.
    async fn auto_rollback(self: &Arc<Self>, id: &str) -> Result<(), EngineError> {
        let entry = self.get(id).await?;
        let halted = entry.rollout.waves.iter().position(|w| w.state == WaveState::Halted);
        let hosts: Vec<String> = entry
            .hosts
            .values()
            .filter(|h| Some(h.wave) == halted && h.state == HostState::Failed && h.snapshot.is_some())
            .map(|h| h.host.clone())
            .collect();
        self.restore_hosts(id, &hosts, "the controller (on_failure: rollback)")
            .await;
        self.mutate(id, |e| {
            e.rollout.rollback_pending = false;
            Ok(((), Vec::new()))
        })
        .await
    }

    /// Restore hosts from their snapshots and run their health checks again.
    async fn restore_hosts(self: &Arc<Self>, id: &str, hosts: &[String], who: &str) -> Vec<(String, bool)> {
        let Ok(entry) = self.get(id).await else {
            return Vec::new();
        };
        let checks = entry.rollout.checks.clone();
        let mut tasks = Vec::new();
        for host in hosts.iter().cloned() {
            let engine = Arc::clone(self);
            let (id, who, checks) = (id.to_owned(), who.to_owned(), checks.clone());
            tasks.push(tokio::spawn(async move {
                let cmd = pb::Command {
                    id: format!("{id}:{host}:restore:{}", now_ms()),
                    kind: Some(pb::command::Kind::RestoreSnapshot(pb::RestoreSnapshot {
                        rollout_id: id.clone(),
                    })),
                };
                let deadline = Instant::now() + Duration::from_secs(600) + engine.settings.agent_grace;
                let (ok, mut detail) = match engine.hub.execute(&host, cmd, deadline).await {
                    Ok(r) if r.outcome == pb::Outcome::Ok as i32 => (true, "rolled back from its snapshot".to_string()),
                    Ok(r) => (false, format!("rollback FAILED: {}", r.detail)),
                    Err(e) => (false, format!("rollback FAILED: {e}")),
                };
                if ok {
                    crate::failpoint::hit("rollback-restored");
                }
                if ok && !checks.is_empty() {
                    let cmd = checks_command(format!("{id}:{host}:after-restore:{}", now_ms()), &checks);
                    let deadline = Instant::now() + checks_timeout(&checks) + engine.settings.agent_grace;
                    detail.push_str(match engine.hub.execute(&host, cmd, deadline).await {
                        Ok(r) if r.outcome == pb::Outcome::Ok as i32 => "; health checks pass",
                        _ => "; health checks still FAIL",
                    });
                }
                let _ = engine
                    .mutate(&id, |e| {
                        if let Some(h) = e.hosts.get_mut(&host) {
                            h.rolled_back |= ok;
                            if ok {
                                // Back to its state before the first step: a
                                // resume runs its steps again, from the start.
                                h.next_step = 0;
                                h.in_flight = None;
                            }
                            h.detail = format!("{} ({detail})", h.detail);
                            if let Some(s) = h.snapshot.as_mut() {
                                s.apply(&SnapshotEvent::Restored);
                            }
                        }
                        event(&mut e.rollout, format!("host {host} {detail}; by {who}"));
                        Ok(((), vec![host.clone()]))
                    })
                    .await;
                (host, ok)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            if let Ok(r) = t.await {
                out.push(r);
            }
        }
        out
    }

    /// Restore hosts on an operator's request (`rollout rollback`).
    pub async fn rollback(
        self: &Arc<Self>,
        who: &str,
        id: &str,
        wave: Option<usize>,
        host: Option<&str>,
    ) -> Result<Entry, EngineError> {
        let entry = self.get(id).await?;
        if matches!(
            entry.rollout.state,
            RolloutState::Running | RolloutState::AwaitingApproval
        ) {
            return Err(EngineError::Denied(format!(
                "rollout {id} is {}; pause or abort it before rolling hosts back",
                entry.rollout.state
            )));
        }
        let hosts: Vec<String> = entry
            .hosts
            .values()
            .filter(|h| wave.is_none_or(|w| h.wave + 1 == w) && host.is_none_or(|x| h.host == x))
            .filter(|h| h.snapshot.as_ref().is_some_and(|s| s.state != SnapshotState::Released))
            .map(|h| h.host.clone())
            .collect();
        if hosts.is_empty() {
            return Err(EngineError::Denied(
                "no host of that selection has a snapshot to restore".into(),
            ));
        }
        self.restore_hosts(id, &hosts, who).await;
        self.get(id).await
    }

    /// Every dry-run record of a rollout: (phase, record).
    pub async fn dry_runs(&self, id: &str) -> Result<Vec<(&'static str, DryRunRecord)>, EngineError> {
        let e = self.get(id).await?;
        let mut out: Vec<(&'static str, DryRunRecord)> =
            e.rollout.dry_runs.iter().map(|d| ("submit", d.clone())).collect();
        for h in e.hosts.values() {
            out.extend(h.dry_runs.iter().map(|d| ("before-step", d.clone())));
        }
        Ok(out)
    }

    /// Release every retained snapshot whose retention is over. Pinned
    /// snapshots are never touched here.
    async fn sweep_snapshots(self: &Arc<Self>) {
        let due: Vec<(String, String)> = self
            .lock()
            .rollouts
            .values()
            .flat_map(|e| {
                e.hosts.values().filter_map(|h| {
                    let mut s = h.snapshot.clone()?;
                    s.apply(&SnapshotEvent::Tick { now_ms: now_ms() })
                        .then(|| (e.rollout.id.clone(), h.host.clone()))
                })
            })
            .collect();
        for (id, host) in due {
            let cmd = pb::Command {
                id: format!("{id}:{host}:release:{}", now_ms()),
                kind: Some(pb::command::Kind::ReleaseSnapshot(pb::ReleaseSnapshot {
                    rollout_id: id.clone(),
                })),
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            if let Ok(r) = self.hub.execute(&host, cmd, deadline).await
                && r.outcome == pb::Outcome::Ok as i32
            {
                let _ = self
                    .mutate(&id, |e| {
                        if let Some(s) = e.hosts.get_mut(&host).and_then(|h| h.snapshot.as_mut()) {
                            s.apply(&SnapshotEvent::Tick { now_ms: now_ms() });
                        }
                        event(
                            &mut e.rollout,
                            format!("host {host}: snapshot released after its retention"),
                        );
                        Ok(((), vec![host.clone()]))
                    })
                    .await;
            }
        }
    }
}

/// The group-commit writer: takes every queued change at once, commits them
/// in one transaction (one fdatasync), then releases their waiters. With many
/// hosts in flight, one commit carries the changes of all of them.
async fn writer(engine: Weak<Engine>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        loop {
            let Some(engine) = engine.upgrade() else { return };
            let (pending, headers, upto) = {
                let mut st = engine.lock();
                if st.queue.is_empty() {
                    break;
                }
                let pending = std::mem::take(&mut st.queue);
                let ids: BTreeSet<&str> = pending.iter().map(|p| p.rollout.as_str()).collect();
                let headers: Result<Vec<(String, Vec<u8>)>, serde_json::Error> = ids
                    .into_iter()
                    .filter_map(|id| st.rollouts.get(id))
                    .map(|e| Ok((e.rollout.id.clone(), serde_json::to_vec(&e.rollout)?)))
                    .collect();
                (pending, headers, st.queued)
            };
            let store = Arc::clone(&engine.store);
            let result = match headers {
                Ok(headers) => tokio::task::spawn_blocking(move || {
                    let mut hosts = Vec::new();
                    let mut bodies = Vec::new();
                    for p in pending {
                        hosts.extend(p.hosts);
                        bodies.extend(p.bodies);
                    }
                    store.commit(&headers, &hosts, bodies)
                })
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r),
                Err(e) => Err(e.into()),
            };
            match result {
                Ok(()) => engine.durable.send_modify(|d| d.upto = upto),
                Err(e) => {
                    let why = format!(
                        "a commit to the store failed ({e:#}); nothing more is sent to any host until the controller is restarted"
                    );
                    error!("{why}");
                    engine.durable.send_modify(|d| d.failed = Some(why));
                    return;
                }
            }
        }
    }
}

fn build(
    id: String,
    submitter: &str,
    hash: &str,
    plan: &Plan,
    waves: &[Vec<String>],
    policies: &PolicySet,
) -> (Rollout, Vec<HostRecord>) {
    let mut untouchable: Vec<String> = plan
        .untouchable
        .iter()
        .map(|u| u.value.clone())
        .chain(policies.untouchable())
        .collect();
    untouchable.sort();
    untouchable.dedup();
    let steps = plan
        .steps
        .iter()
        .map(|s| StepSpec {
            name: s.name.clone(),
            run: s.run.clone(),
            writes: s.writes.clone(),
            timeout_ms: s.timeout.as_millis() as u64,
            max_deletions: s.max_deletions,
        })
        .collect();
    let checks = plan
        .health
        .checks
        .iter()
        .map(|c| CheckSpec {
            name: c.name.clone(),
            timeout_ms: c.timeout.as_millis() as u64,
            probe: match &c.kind {
                CheckKind::Tcp(a) => ProbeSpec::Tcp(a.clone()),
                CheckKind::Http { url, expect_status } => ProbeSpec::Http {
                    url: url.clone(),
                    expect_status: *expect_status,
                },
                CheckKind::Exec(e) => ProbeSpec::Exec(e.clone()),
            },
        })
        .collect();
    let mut hosts = Vec::new();
    let waves: Vec<Wave> = waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            hosts.extend(w.iter().map(|h| HostRecord::new(h.clone(), i)));
            Wave {
                index: i + 1,
                state: WaveState::Pending,
                hosts: w.clone(),
            }
        })
        .collect();
    let mut rollout = Rollout {
        id,
        plan_name: plan.name.clone(),
        plan_hash: hash.to_owned(),
        inventory_hash: String::new(),
        submitter: submitter.to_owned(),
        approvals: Vec::new(),
        approvals_required: plan.approvals,
        state: RolloutState::AwaitingApproval,
        halt_reason: None,
        waves,
        steps,
        checks,
        bake_ms: plan.health.bake.as_millis() as u64,
        interval_ms: plan.health.interval.as_millis() as u64,
        budget_canary: plan.failure_budget.canary,
        budget_wave: plan.failure_budget.wave,
        attempt: 0,
        on_failure: match plan.on_failure {
            OnFailure::Rollback => "rollback".into(),
            OnFailure::Halt => "halt".into(),
        },
        retain_ms: plan.snapshot_retain.as_millis() as u64,
        write_set: plan.write_set().into_iter().map(str::to_owned).collect(),
        dry_runs: Vec::new(),
        dry_run_digest: String::new(),
        rollback_pending: false,
        untouchable,
        snapshot_backend: policies.snapshot_backend().unwrap_or_default(),
        events: Vec::new(),
    };
    event(
        &mut rollout,
        format!("submitted by {submitter}: plan `{}` ({hash})", plan.name),
    );
    (rollout, hosts)
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
