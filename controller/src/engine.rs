//! The rollout engine: submit, approve, then wave by wave (steps, health
//! checks, bake), halting by itself when a wave fails beyond its budget.
//!
//! Every state change is persisted before it is acted on: a command's id is
//! stored as the host's `in_flight` before the command is sent, so after a
//! controller restart the same id is sent again and the agent answers from
//! its journal instead of running the step twice.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};
use wavegate_domain::plan::{CheckKind, Plan};
use wavegate_domain::rollout::{
    Approval, CheckSpec, HostRecord, HostState, ProbeSpec, Rollout, RolloutState, StepResult, StepSpec,
    TransitionError, Wave, WaveState, over_budget,
};
use wavegate_domain::{Fleet, PolicySet, Report, Source, check_plan};
use wavegate_proto::v1 as pb;

use crate::hub::Hub;
use crate::store::Store;

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

/// The engine.
pub struct Engine {
    store: Store,
    inventory_hash: String,
    hub: Arc<Hub>,
    fleet: Fleet,
    policies: PolicySet,
    settings: Settings,
    state: Mutex<BTreeMap<String, Entry>>,
    drivers: Mutex<HashSet<String>>,
    changes: watch::Sender<u64>,
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
    Step { cmd: pb::Command, timeout: Duration },
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
        let mut state = BTreeMap::new();
        for (rollout, hosts) in store.load()? {
            let hosts = hosts.into_iter().map(|h| (h.host.clone(), h)).collect();
            state.insert(rollout.id.clone(), Entry { rollout, hosts });
        }
        let (changes, _) = watch::channel(0);
        Ok(Arc::new(Engine {
            store,
            inventory_hash,
            hub,
            fleet,
            policies,
            settings,
            state: Mutex::new(state),
            drivers: Mutex::new(HashSet::new()),
            changes,
            boot: format!("{:x}", now_ms()),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
            .values()
            .filter(|e| !e.rollout.state.is_final() && e.rollout.state != RolloutState::AwaitingApproval)
            .map(|e| e.rollout.id.clone())
            .collect();
        for id in ids {
            self.spawn_driver(&id);
        }
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

    /// Apply `f` to a rollout and persist the header and the hosts it names
    /// before anyone acts on the change.
    fn mutate<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Entry) -> Result<(R, Vec<String>), EngineError>,
    ) -> Result<R, EngineError> {
        let mut state = self.lock();
        let entry = state.get_mut(id).ok_or_else(|| EngineError::NotFound(id.to_owned()))?;
        let mut copy = entry.clone();
        let (out, changed) = f(&mut copy)?;
        let hosts: Vec<&HostRecord> = changed.iter().filter_map(|h| copy.hosts.get(h)).collect();
        self.store.save(&copy.rollout, &hosts)?;
        *entry = copy;
        drop(state);
        self.changes.send_modify(|n| *n += 1);
        Ok(out)
    }

    /// A copy of one rollout.
    pub fn get(&self, id: &str) -> Result<Entry, EngineError> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(id.to_owned()))
    }

    /// Copies of every rollout, newest first.
    pub fn list(&self) -> Vec<Entry> {
        self.lock().values().rev().cloned().collect()
    }

    /// Validate a plan exactly as `plan check` does and create a rollout.
    pub fn submit(
        &self,
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
        let (rollout, hosts) = self.store.create_rollout(&hash, plan_yaml, |id| {
            let (mut r, h) = build(id, submitter, &hash, &plan, &waves);
            r.inventory_hash.clone_from(&self.inventory_hash);
            (r, h)
        })?;
        let entry = Entry {
            hosts: hosts.into_iter().map(|h| (h.host.clone(), h)).collect(),
            rollout,
        };
        self.lock().insert(entry.rollout.id.clone(), entry.clone());
        self.changes.send_modify(|n| *n += 1);
        Ok((entry, report))
    }

    /// Approve, bound to the plan hash the approver saw.
    pub fn approve(self: &Arc<Self>, who: &str, id: &str, plan_hash: &str) -> Result<Entry, EngineError> {
        let started = self.mutate(id, |e| {
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
            let started = r.approve(Approval {
                who: who.to_owned(),
                plan_hash: hash,
                at_ms: now_ms(),
            })?;
            event(
                r,
                format!("approved by {who} ({} of {})", r.approvals.len(), r.approvals_required),
            );
            if started {
                event(r, "all approvals in; rollout running");
            }
            Ok((started, Vec::new()))
        });
        if let Err(EngineError::Denied(msg)) = &started {
            self.refuse(&format!("approval of {id} by {who}: {msg}"));
            // Record it on the rollout too (the transaction above did not commit).
            let _ = self.mutate(id, |e| {
                event(&mut e.rollout, format!("refused approval by {who}: {msg}"));
                Ok(((), Vec::new()))
            });
        }
        if started? {
            self.spawn_driver(id);
        }
        self.get(id)
    }

    /// Pause, resume or abort, on an operator's word.
    pub fn control(self: &Arc<Self>, who: &str, id: &str, action: &str) -> Result<Entry, EngineError> {
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
        })?;
        if action == "resume" {
            self.spawn_driver(id);
        }
        self.get(id)
    }

    async fn wait_change(&self, rx: &mut watch::Receiver<u64>) {
        let _ = rx.changed().await;
    }

    async fn drive(self: Arc<Self>, id: &str) -> Result<(), EngineError> {
        let mut rx = self.subscribe();
        loop {
            let entry = self.get(id)?;
            match entry.rollout.state {
                RolloutState::Running => {}
                RolloutState::Completed | RolloutState::Aborted => return Ok(()),
                _ => {
                    self.wait_change(&mut rx).await;
                    continue;
                }
            }
            match entry.rollout.current_wave() {
                None => {
                    self.mutate(id, |e| {
                        e.rollout.complete()?;
                        event(&mut e.rollout, "every wave confirmed healthy; rollout completed");
                        Ok(((), Vec::new()))
                    })?;
                    return Ok(());
                }
                Some(w) => self.run_wave(id, w).await?,
            }
        }
    }

    fn running(&self, id: &str) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|e| e.rollout.state == RolloutState::Running)
    }

    async fn run_wave(self: &Arc<Self>, id: &str, w: usize) -> Result<(), EngineError> {
        let hosts = self.mutate(id, |e| {
            let wave = &mut e.rollout.waves[w];
            if wave.state == WaveState::Pending {
                wave.state = WaveState::Running;
                let text = format!("wave {} started: {}", wave.index, wave.hosts.join(", "));
                event(&mut e.rollout, text);
            }
            Ok((e.rollout.waves[w].hosts.clone(), Vec::new()))
        })?;
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
        self.bake(id, w).await
    }

    async fn bake(self: &Arc<Self>, id: &str, w: usize) -> Result<(), EngineError> {
        let (bake, interval, checks, attempt) = self.mutate(id, |e| {
            let r = &mut e.rollout;
            r.waves[w].state = WaveState::Baking;
            let text = format!("wave {} baking for {} ms", w + 1, r.bake_ms);
            event(r, text);
            Ok((
                (r.bake_ms, r.interval_ms.max(1), r.checks.clone(), r.attempt),
                Vec::new(),
            ))
        })?;
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
                let Some(e) = state.get(id) else { return Ok(()) };
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
                    self.host_failed(id, w, &host, detail)?;
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
            Ok(((), Vec::new()))
        })
    }

    /// Mark a host failed; halt when the wave is over its budget.
    fn host_failed(&self, id: &str, w: usize, host: &str, detail: String) -> Result<(), EngineError> {
        self.mutate(id, |e| {
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
            }
            Ok(((), vec![host.to_owned()]))
        })
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
                let step = &steps[h.next_step];
                let cmd_id = h
                    .in_flight
                    .clone()
                    .unwrap_or_else(|| format!("{rid}:{attempt}:{host}:step{}", h.next_step));
                h.in_flight = Some(cmd_id.clone());
                h.state = HostState::Running;
                h.detail = format!("running step `{}`", step.name);
                let cmd = pb::Command {
                    id: cmd_id,
                    kind: Some(pb::command::Kind::RunStep(pb::RunStep {
                        rollout_id: rid,
                        step_name: step.name.clone(),
                        run: step.run.clone(),
                        writes: step.writes.clone(),
                        timeout_ms: step.timeout_ms,
                        max_deletions: step.max_deletions,
                    })),
                };
                Next::Step {
                    cmd,
                    timeout: Duration::from_millis(step.timeout_ms),
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
        Ok((next, vec![host.to_owned()]))
    }

    async fn run_host(self: Arc<Self>, id: &str, w: usize, host: &str) -> Result<(), EngineError> {
        loop {
            // Decide and persist under the lock: after a halt, nothing new goes out.
            let next = self.mutate(id, |e| self.next_for(e, host))?;
            match next {
                Next::Stop => return Ok(()),
                Next::Step { cmd, timeout } => {
                    let cmd_id = cmd.id.clone();
                    let step_name = match &cmd.kind {
                        Some(pb::command::Kind::RunStep(s)) => s.step_name.clone(),
                        _ => String::new(),
                    };
                    let deadline = Instant::now() + timeout + self.settings.agent_grace;
                    let res = self.hub.execute(host, cmd, deadline).await;
                    match res {
                        Ok(r) => {
                            let ok = r.outcome == pb::Outcome::Ok as i32;
                            let result = StepResult {
                                step: step_name.clone(),
                                command_id: cmd_id,
                                outcome: outcome_name(r.outcome).into(),
                                exit_code: r.exit_code,
                                duration_ms: r.duration_ms,
                                output_sha256: r.output_sha256.clone(),
                                replayed: r.replayed,
                            };
                            if ok {
                                self.mutate(id, |e| {
                                    let h = e
                                        .hosts
                                        .get_mut(host)
                                        .ok_or_else(|| EngineError::NotFound(host.to_owned()))?;
                                    h.results.push(result);
                                    h.next_step += 1;
                                    h.in_flight = None;
                                    h.detail = format!("step `{step_name}` done");
                                    Ok(((), vec![host.to_owned()]))
                                })?;
                            } else {
                                self.mutate(id, |e| {
                                    let h = e
                                        .hosts
                                        .get_mut(host)
                                        .ok_or_else(|| EngineError::NotFound(host.to_owned()))?;
                                    h.results.push(result);
                                    Ok(((), vec![host.to_owned()]))
                                })?;
                                let detail = format!(
                                    "step `{step_name}` {} (exit {}){}",
                                    outcome_name(r.outcome),
                                    r.exit_code,
                                    if r.detail.is_empty() {
                                        String::new()
                                    } else {
                                        format!(": {}", r.detail)
                                    }
                                );
                                return self.host_failed(id, w, host, detail);
                            }
                        }
                        Err(e) => return self.host_failed(id, w, host, format!("step `{step_name}`: {e}")),
                    }
                }
                Next::Checks { cmd, timeout } => {
                    let deadline = Instant::now() + timeout + self.settings.agent_grace;
                    match self.hub.execute(host, cmd, deadline).await {
                        Ok(r) if r.outcome == pb::Outcome::Ok as i32 => {
                            self.mutate(id, |e| {
                                let h = e
                                    .hosts
                                    .get_mut(host)
                                    .ok_or_else(|| EngineError::NotFound(host.to_owned()))?;
                                h.state = HostState::Healthy;
                                h.in_flight = None;
                                h.detail = "healthy".into();
                                Ok(((), vec![host.to_owned()]))
                            })?;
                            return Ok(());
                        }
                        Ok(r) => return self.host_failed(id, w, host, checks_detail(&r)),
                        Err(e) => return self.host_failed(id, w, host, format!("health checks: {e}")),
                    }
                }
            }
        }
    }
}

fn build(id: String, submitter: &str, hash: &str, plan: &Plan, waves: &[Vec<String>]) -> (Rollout, Vec<HostRecord>) {
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
