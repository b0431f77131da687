//! Rollouts, waves and hosts as state machines, with guarded transitions.
//!
//! The controller's engine persists a [`Rollout`] and its [`HostRecord`]s on
//! every change and asks this module what is allowed; no I/O happens here.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::units::Amount;

/// Where a rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Submitted and validated; waiting for its approvers.
    AwaitingApproval,
    /// Waves are being run.
    Running,
    /// An operator paused it; no new host starts.
    Paused,
    /// A gate failed beyond budget; nothing moves until a person decides.
    Halted,
    /// Every wave confirmed healthy.
    Completed,
    /// Ended by an operator; nothing more runs.
    Aborted,
    /// Refused at submit (its first wave's dry-run was blocked); it can
    /// never be approved.
    Refused,
}

impl RolloutState {
    /// The contract string (FORMATS.md "Rollout status").
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::AwaitingApproval => "awaiting_approval",
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Halted => "halted",
            RolloutState::Completed => "completed",
            RolloutState::Aborted => "aborted",
            RolloutState::Refused => "refused",
        }
    }

    /// Whether nothing can happen to the rollout any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RolloutState::Completed | RolloutState::Aborted | RolloutState::Refused
        )
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a wave is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveState {
    /// Not started.
    Pending,
    /// Steps and first health checks are running.
    Running,
    /// Steps are done; health checks repeat for the bake time.
    Baking,
    /// Healthy for the whole bake.
    Confirmed,
    /// The rollout halted in this wave.
    Halted,
}

impl WaveState {
    /// The status string.
    pub fn as_str(self) -> &'static str {
        match self {
            WaveState::Pending => "pending",
            WaveState::Running => "running",
            WaveState::Baking => "baking",
            WaveState::Confirmed => "confirmed",
            WaveState::Halted => "halted",
        }
    }
}

/// Where a host is within its wave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Never received a real step.
    Untouched,
    /// Steps are being run (or will continue after a resume).
    Running,
    /// Every step succeeded; its health checks have not passed yet.
    Succeeded,
    /// Steps done and health checks passing.
    Healthy,
    /// A step or a health check failed.
    Failed,
}

impl HostState {
    /// The status string.
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Untouched => "untouched",
            HostState::Running => "running",
            HostState::Succeeded => "succeeded",
            HostState::Healthy => "healthy",
            HostState::Failed => "failed",
        }
    }
}

/// A rollout's state as people read it: a rollout that completed with
/// failed hosts under its budget says so, and names them (never a bare
/// "completed").
pub fn state_line(state: &str, failed: &[String]) -> String {
    match failed_note(failed) {
        Some(note) if state == "completed" => format!("completed with {note}"),
        _ => state.to_owned(),
    }
}

/// "2 failed hosts: p3, p4" (the first ten named), or `None` for none.
pub fn failed_note(failed: &[String]) -> Option<String> {
    const NAMED: usize = 10;
    if failed.is_empty() {
        return None;
    }
    let mut names = failed.iter().take(NAMED).cloned().collect::<Vec<_>>().join(", ");
    if failed.len() > NAMED {
        names.push_str(&format!(" and {} more", failed.len() - NAMED));
    }
    Some(format!(
        "{} failed host{}: {names}",
        failed.len(),
        if failed.len() == 1 { "" } else { "s" }
    ))
}

/// The hosts that failed, sorted by id.
pub fn failed_hosts<'a>(hosts: impl IntoIterator<Item = &'a HostRecord>) -> Vec<String> {
    let mut out: Vec<String> = hosts
        .into_iter()
        .filter(|h| h.state == HostState::Failed)
        .map(|h| h.host.clone())
        .collect();
    out.sort();
    out
}

/// A backup's live mirror, as a rollout guards it during a wave that holds
/// its primaries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorHold {
    /// The backup the mirror feeds.
    pub backup: String,
    /// Its primaries in the wave.
    pub primaries: Vec<String>,
    /// The 0-based wave.
    pub wave: usize,
    /// Where it is.
    pub state: MirrorState,
    /// Whether its copy was snapshotted before the wave (the snapshot's key
    /// on the backup is [`MirrorHold::snapshot_key`]).
    #[serde(default)]
    pub snapshotted: bool,
    /// What happened, for people.
    #[serde(default)]
    pub detail: String,
}

impl MirrorHold {
    /// The key of the backup's snapshot of its copy, taken for wave `wave`
    /// (0-based) of `rollout`.
    pub fn snapshot_key(rollout: &str, wave: usize) -> String {
        format!("{rollout}-mirror-w{}", wave + 1)
    }

    /// Whether the mirror is held back now (paused, or its copy kept to
    /// restore), so its wave may run.
    pub fn guarding(&self) -> bool {
        matches!(
            self.state,
            MirrorState::Paused | MirrorState::Snapshotted | MirrorState::Live
        )
    }

    /// Whether it may be held back now and owes a resume: guarded, being
    /// guarded, or paused with its copy restored.
    pub fn owes_resume(&self) -> bool {
        self.guarding() || matches!(self.state, MirrorState::Guarding | MirrorState::Restored)
    }
}

/// Where a guarded mirror is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MirrorState {
    /// Being paused or snapshotted (recorded before it is asked).
    Guarding,
    /// Paused (and its copy snapshotted, when so configured) until the
    /// wave is confirmed.
    Paused,
    /// Left running, its copy snapshotted to restore.
    Snapshotted,
    /// Left running: it cannot be paused and the plan accepts that.
    Live,
    /// Resumed after the wave was confirmed.
    Resumed,
    /// Its copy restored from the snapshot after its primary was rolled
    /// back; kept paused.
    Restored,
    /// Left paused: its primary failed and was not restored.
    LeftPaused,
}

impl MirrorState {
    /// Its name in status.
    pub fn as_str(self) -> &'static str {
        match self {
            MirrorState::Guarding => "guarding",
            MirrorState::Paused => "paused",
            MirrorState::Snapshotted => "snapshotted",
            MirrorState::Live => "live",
            MirrorState::Resumed => "resumed",
            MirrorState::Restored => "restored",
            MirrorState::LeftPaused => "left_paused",
        }
    }
}

/// A refused transition: what was asked, and the state it was asked in.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a rollout that is {from}")]
pub struct TransitionError {
    /// What was asked.
    pub action: &'static str,
    /// The state it was in.
    pub from: RolloutState,
}

/// A refused move of a wave or a host: the engine asked for a state its
/// record cannot reach from where it is (a bug, never an operator's doing).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} cannot go from {from} to {to}")]
pub struct StateError {
    /// `wave 2` or `host p1`.
    pub what: String,
    /// The state it was in.
    pub from: &'static str,
    /// The state asked for.
    pub to: &'static str,
}

impl WaveState {
    /// Whether the engine may move a wave from `self` to `to`. (Halting and
    /// resuming are the rollout's own transitions, in this module.)
    pub fn can_become(self, to: WaveState) -> bool {
        use WaveState::*;
        self == to
            || matches!(
                (self, to),
                (Pending | Halted, Running) | (Running, Baking) | (Baking, Confirmed) | (_, Halted)
            ) && self != Confirmed
    }
}

impl HostState {
    /// Whether the engine may move a host from `self` to `to`: forward
    /// through its steps and checks, or to failed from anywhere. A healthy
    /// or failed host runs nothing again unless a person resumes the
    /// rollout (the rollout's own transition, in this module).
    pub fn can_become(self, to: HostState) -> bool {
        use HostState::*;
        self == to
            || match to {
                Untouched => false,
                Running => self == Untouched,
                Succeeded => matches!(self, Untouched | Running),
                Healthy => matches!(self, Untouched | Running | Succeeded),
                Failed => true,
            }
    }
}

impl Wave {
    /// Its windows, one line per source: `plan: daily 02:00-05:00 UTC`.
    pub fn window_lines(&self) -> Vec<String> {
        self.windows.iter().map(crate::windows::WindowSet::describe).collect()
    }

    /// While it waits for a window: why, and until when, for people.
    pub fn waiting(&self) -> Option<String> {
        let until = self.waits_until_ms?;
        let tz = self
            .windows
            .first()
            .and_then(|s| s.windows.first())
            .map_or("UTC", |w| w.tz.as_str());
        Some(format!(
            "waits for its maintenance window: starts at {} (expected to take up to {}; {})",
            crate::windows::local(i64::try_from(until).unwrap_or(i64::MAX), tz),
            crate::units::format_duration(std::time::Duration::from_millis(self.expected_ms)),
            self.window_lines().join("; ")
        ))
    }

    /// How many of its hosts have a real step running now (sent or about
    /// to be: the step's id is stored).
    pub fn in_flight(&self, hosts: &BTreeMap<String, HostRecord>) -> usize {
        self.hosts
            .iter()
            .filter_map(|h| hosts.get(h))
            .filter(|h| h.in_flight.is_some() && h.state == HostState::Running)
            .count()
    }

    /// How many of its hosts may have a real step running at once.
    pub fn max_in_flight(&self) -> usize {
        match self.max_in_flight {
            0 => crate::plan::in_flight_limit(crate::plan::DEFAULT_MAX_IN_FLIGHT, self.hosts.len()),
            n => n,
        }
    }

    /// Move the wave to `to`, when that is a move it can make.
    pub fn set_state(&mut self, to: WaveState) -> Result<(), StateError> {
        if !self.state.can_become(to) {
            return Err(StateError {
                what: format!("wave {}", self.index),
                from: self.state.as_str(),
                to: to.as_str(),
            });
        }
        self.state = to;
        Ok(())
    }
}

impl HostRecord {
    /// Move the host to `to`, when that is a move it can make.
    pub fn set_state(&mut self, to: HostState) -> Result<(), StateError> {
        if !self.state.can_become(to) {
            return Err(StateError {
                what: format!("host {}", self.host),
                from: self.state.as_str(),
                to: to.as_str(),
            });
        }
        self.state = to;
        Ok(())
    }
}

/// What a host does next while its rollout runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostNext {
    /// Nothing: it is healthy or failed (or the rollout is not running).
    Stop,
    /// Real step `index`; `resend` is the id already stored for it (sent
    /// before a restart or a reconnect: the same id goes again).
    Step {
        /// The step's index in the plan.
        index: usize,
        /// The command id stored for it, if any.
        resend: Option<String>,
    },
    /// Its health checks, under this command id (stored in `in_flight`).
    Checks {
        /// The checks' command id.
        command_id: String,
    },
    /// Wait for its new boot after a step's reboot.
    Reboot(RebootWait),
}

impl HostRecord {
    /// Decide what the host does next in `rollout`, and record what that
    /// moves: with no step left it is healthy when the plan has no checks,
    /// else it has succeeded and its checks go under `checks_id` (or the
    /// id already in flight). Pure: the caller stores the record.
    pub fn next(&mut self, rollout: &Rollout, checks_id: impl FnOnce() -> String) -> Result<HostNext, StateError> {
        if rollout.state != RolloutState::Running {
            return Ok(HostNext::Stop);
        }
        Ok(match self.state {
            HostState::Healthy | HostState::Failed => HostNext::Stop,
            _ if self.reboot.is_some() => HostNext::Reboot(self.reboot.clone().unwrap_or(RebootWait {
                step: String::new(),
                from_boot: String::new(),
                deadline_ms: 0,
            })),
            HostState::Untouched | HostState::Running if self.next_step < rollout.steps.len() => HostNext::Step {
                index: self.next_step,
                resend: self.in_flight.clone(),
            },
            HostState::Untouched | HostState::Running | HostState::Succeeded => {
                if rollout.checks.is_empty() {
                    self.set_state(HostState::Healthy)?;
                    self.detail = "steps done; the plan has no health checks".into();
                    HostNext::Stop
                } else {
                    let command_id = self.in_flight.clone().unwrap_or_else(checks_id);
                    self.in_flight = Some(command_id.clone());
                    self.set_state(HostState::Succeeded)?;
                    self.detail = "steps done; running health checks".into();
                    HostNext::Checks { command_id }
                }
            }
        })
    }
}

/// One approval, bound to the plan bytes it was given for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Certificate name of the approver.
    pub who: String,
    /// The person the approver's certificate names: approvals count
    /// distinct people, not names.
    #[serde(default)]
    pub person: String,
    /// SHA-256 of the plan the approver saw.
    pub plan_hash: String,
    /// SHA-256 of the dry-run reports the approver saw.
    #[serde(default)]
    pub dry_run_digest: String,
    /// Unix milliseconds.
    pub at_ms: u64,
}

/// A step as the engine runs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpec {
    /// Name from the plan.
    pub name: String,
    /// Command line.
    pub run: String,
    /// Declared write set.
    pub writes: Vec<String>,
    /// Time limit.
    pub timeout_ms: u64,
    /// Deletion budget per host.
    pub max_deletions: u64,
    /// Why a failing dry-run is acceptable (the plan's `dry_run:
    /// allow_failure`).
    #[serde(default)]
    pub allow_failure: Option<String>,
    /// Run before the dry-run, with the network, confined to `fetch_writes`.
    #[serde(default)]
    pub fetch: Option<String>,
    /// What the fetch may write.
    #[serde(default)]
    pub fetch_writes: Vec<String>,
    /// A package step: what it changes.
    #[serde(default)]
    pub packages: Option<crate::packages::Packages>,
    /// Whether the host reboots after the step.
    #[serde(default)]
    pub reboot: crate::plan::Reboot,
    /// How long it may take to come back.
    #[serde(default)]
    pub reboot_timeout_ms: u64,
    /// The roles it is for (`only_roles`); empty: every role.
    #[serde(default)]
    pub only_roles: Vec<String>,
}

impl StepSpec {
    /// The step as a command carries it to a host (its plan's write set;
    /// a host's resolved one replaces it for a package step's real run).
    pub fn step(&self) -> crate::command::Step {
        crate::command::Step {
            name: self.name.clone(),
            run: self.run.clone(),
            writes: self.writes.clone(),
            timeout_ms: self.timeout_ms,
            max_deletions: self.max_deletions,
            allow_failure: self.allow_failure.clone(),
            reboot: self.reboot,
            packages: self.packages.clone(),
            only_roles: self.only_roles.clone(),
        }
    }
}

/// A health check as the engine runs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeSpec {
    /// TCP connect.
    Tcp(String),
    /// HTTP GET expecting a status.
    Http {
        /// URL.
        url: String,
        /// Healthy status.
        expect_status: u16,
    },
    /// Command that exits 0.
    Exec(String),
}

/// A named health check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    /// Name.
    pub name: String,
    /// Probe.
    pub probe: ProbeSpec,
    /// Time limit.
    pub timeout_ms: u64,
}

/// A wave of a rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    /// 1-based.
    pub index: usize,
    /// Where it is.
    pub state: WaveState,
    /// Host ids, sorted.
    pub hosts: Vec<String>,
    /// While it bakes: when its bake ends, Unix milliseconds.
    #[serde(default)]
    pub bake_ends_ms: Option<u64>,
    /// How many of its hosts may have a real step running at once, as
    /// resolved at submit (0 in a record written before the field: the
    /// default, see [`Wave::max_in_flight`]).
    #[serde(default)]
    pub max_in_flight: usize,
    /// The maintenance windows it must fit in, as resolved at submit;
    /// empty: any time.
    #[serde(default)]
    pub windows: Vec<crate::windows::WindowSet>,
    /// How long it is expected to take at most, in milliseconds.
    #[serde(default)]
    pub expected_ms: u64,
    /// While it waits for a window: when it may start, Unix milliseconds.
    #[serde(default)]
    pub waits_until_ms: Option<u64>,
}

/// A rollout's header: everything but the per-host records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Id, like `r0001`.
    pub id: String,
    /// Plan name.
    pub plan_name: String,
    /// SHA-256 of the plan bytes, hex.
    pub plan_hash: String,
    /// SHA-256 of the inventory the waves were planned against.
    #[serde(default)]
    pub inventory_hash: String,
    /// Who submitted it.
    pub submitter: String,
    /// The person the submitter's certificate names (who may not approve).
    #[serde(default)]
    pub submitter_person: String,
    /// The site rule that has this rollout hold its targets' updaters
    /// outside the rollout from its start to its end (none: no hold).
    #[serde(default)]
    pub hold_updaters: Option<String>,
    /// Hosts whose updaters this rollout holds now (released at its end).
    #[serde(default)]
    pub updaters_held: Vec<String>,
    /// Whether the hold was taken (at the start, before any step).
    #[serde(default)]
    pub updaters_hold_taken: bool,
    /// The live mirrors feeding the targets' backups, as guarded for each
    /// wave: paused, snapshotted, resumed, restored.
    #[serde(default)]
    pub mirrors: Vec<MirrorHold>,
    /// Backups whose live mirror cannot be guarded and whose risk the plan
    /// accepts by name (`accept_live_mirrors`).
    #[serde(default)]
    pub accepted_live_mirrors: Vec<String>,
    /// Approvals so far.
    pub approvals: Vec<Approval>,
    /// Approvals needed.
    pub approvals_required: u32,
    /// Where it is.
    pub state: RolloutState,
    /// Why it halted.
    pub halt_reason: Option<String>,
    /// The waves.
    pub waves: Vec<Wave>,
    /// Steps.
    pub steps: Vec<StepSpec>,
    /// Health checks.
    pub checks: Vec<CheckSpec>,
    /// Bake time.
    pub bake_ms: u64,
    /// Check interval during bake.
    pub interval_ms: u64,
    /// Failed hosts tolerated in the canary.
    pub budget_canary: Amount,
    /// Failed hosts tolerated in later waves.
    pub budget_wave: Amount,
    /// Bumped on every resume, so retried commands get new ids.
    pub attempt: u32,
    /// `rollback` (restore failed hosts when halting) or `halt`.
    #[serde(default)]
    pub on_failure: crate::plan::OnFailure,
    /// How long snapshots are kept after their wave is confirmed.
    #[serde(default)]
    pub retain_ms: u64,
    /// The union of every step's write set: what each host's snapshot holds.
    #[serde(default)]
    pub write_set: Vec<String>,
    /// The first wave's dry-run reports, taken at submit; approvals bind to them.
    #[serde(default)]
    pub dry_runs: Vec<crate::effects::DryRunRecord>,
    /// SHA-256 of `dry_runs` as stored.
    #[serde(default)]
    pub dry_run_digest: String,
    /// A halt whose failed hosts still have to be restored.
    #[serde(default)]
    pub rollback_pending: bool,
    /// Host paths no step may change (the plan's and the site's).
    #[serde(default)]
    pub untouchable: Vec<String>,
    /// The snapshot backend the site policy forces (empty: the best per
    /// filesystem).
    #[serde(default)]
    pub snapshot_backend: String,
    /// Human-readable events, oldest first.
    pub events: Vec<String>,
    /// People's requests to restore hosts from their snapshots, oldest
    /// first (the automatic rollback of a failed wave is not one).
    #[serde(default)]
    pub rollback_requests: Vec<RollbackRequest>,
}

/// Where a rollback request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackState {
    /// Waiting for the approvals the rollout itself needed.
    AwaitingApproval,
    /// Approved; hosts are being restored.
    Running,
    /// Every host was restored, or tried.
    Done,
}

impl RollbackState {
    /// The name in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            RollbackState::AwaitingApproval => "awaiting_approval",
            RollbackState::Running => "running",
            RollbackState::Done => "done",
        }
    }
}

/// What a restore would change on one host, seen when it was asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPreview {
    /// Host id.
    pub host: String,
    /// The first paths: (path, `changed` | `added` | `removed`).
    pub changes: Vec<(String, String)>,
    /// How many paths in all.
    pub total: u64,
    /// Why there is no preview, when the host could not give one.
    pub error: String,
}

/// A person's request to undo a rollout (or part of it): a change like
/// any other, approved like the plan it undoes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackRequest {
    /// 1-based, per rollout.
    pub number: u32,
    /// Where it is.
    pub state: RollbackState,
    /// Who asked (certificate name), and the person.
    pub requested_by: String,
    /// The requester's person (who may not approve it).
    pub requester_person: String,
    /// The hosts it restores.
    pub hosts: Vec<String>,
    /// What it would revert, per host.
    pub preview: Vec<HostPreview>,
    /// SHA-256 of hosts and preview: what approvals are bound to.
    pub digest: String,
    /// Approvals so far.
    pub approvals: Vec<Approval>,
    /// Approvals needed.
    pub approvals_required: u32,
    /// Unix milliseconds.
    pub at_ms: u64,
}

impl RollbackRequest {
    /// Record an approval (the caller has checked the role and the
    /// digest). Refused for the requester's person and for a person with
    /// no identity; a person approves once. True once it has every
    /// approval it needs (and is running).
    pub fn approve(&mut self, approval: Approval) -> Result<bool, String> {
        if self.state != RollbackState::AwaitingApproval {
            return Err(format!("rollback request {} is {}", self.number, self.state.as_str()));
        }
        if approval.person.is_empty() {
            return Err(format!("the certificate of {} names no person", approval.who));
        }
        if approval.person == self.requester_person {
            return Err(format!(
                "{} ({}) asked for this rollback and cannot approve it; another person must",
                approval.who, approval.person
            ));
        }
        if approval.digest_differs(&self.digest) {
            return Err(format!(
                "the preview changed: you approved {}, the request is {}; read it again",
                approval.dry_run_digest, self.digest
            ));
        }
        if !self.approvals.iter().any(|a| a.person == approval.person) {
            self.approvals.push(approval);
        }
        if self.approvals.len() >= self.approvals_required.max(1) as usize {
            self.state = RollbackState::Running;
            return Ok(true);
        }
        Ok(false)
    }
}

impl Approval {
    /// For a rollback request: `dry_run_digest` carries the preview digest
    /// the approver read (empty: the current one).
    fn digest_differs(&self, current: &str) -> bool {
        !self.dry_run_digest.is_empty() && self.dry_run_digest != current
    }
}

impl Rollout {
    fn guard(&self, action: &'static str, allowed: &[RolloutState]) -> Result<(), TransitionError> {
        if allowed.contains(&self.state) {
            Ok(())
        } else {
            Err(TransitionError {
                action,
                from: self.state,
            })
        }
    }

    /// Record an approval. The caller has already refused the submitter and
    /// a hash mismatch; this guards the state and counts distinct approvers.
    /// Returns true when the rollout now has all the approvals it needs and
    /// has moved to running.
    pub fn approve(&mut self, approval: Approval) -> Result<bool, TransitionError> {
        self.guard("approve", &[RolloutState::AwaitingApproval])?;
        // One person, one approval, whatever name each certificate has.
        let same = |a: &Approval| {
            if a.person.is_empty() || approval.person.is_empty() {
                a.who == approval.who
            } else {
                a.person == approval.person
            }
        };
        if !self.approvals.iter().any(same) {
            self.approvals.push(approval);
        }
        let valid = self
            .approvals
            .iter()
            .filter(|a| a.plan_hash == self.plan_hash && a.dry_run_digest == self.dry_run_digest)
            .count();
        if valid >= self.approvals_required as usize {
            self.state = RolloutState::Running;
            return Ok(true);
        }
        Ok(false)
    }

    /// Pause: no new host starts.
    pub fn pause(&mut self) -> Result<(), TransitionError> {
        self.guard("pause", &[RolloutState::Running])?;
        self.state = RolloutState::Paused;
        Ok(())
    }

    /// Resume a paused or halted rollout. A halted wave is re-entered: its
    /// failed hosts are retried with fresh command ids (`attempt`).
    pub fn resume(&mut self) -> Result<(), TransitionError> {
        self.guard("resume", &[RolloutState::Paused, RolloutState::Halted])?;
        if self.state == RolloutState::Halted {
            self.attempt += 1;
            for w in &mut self.waves {
                if w.state == WaveState::Halted {
                    w.state = WaveState::Pending;
                }
            }
        }
        self.state = RolloutState::Running;
        self.halt_reason = None;
        Ok(())
    }

    /// Halt: a gate failed beyond budget.
    pub fn halt(&mut self, wave: usize, reason: String) -> Result<(), TransitionError> {
        self.guard("halt", &[RolloutState::Running, RolloutState::Paused])?;
        self.state = RolloutState::Halted;
        self.halt_reason = Some(reason);
        if let Some(w) = self.waves.get_mut(wave) {
            w.state = WaveState::Halted;
        }
        Ok(())
    }

    /// Abort for good.
    pub fn abort(&mut self) -> Result<(), TransitionError> {
        self.guard(
            "abort",
            &[
                RolloutState::AwaitingApproval,
                RolloutState::Running,
                RolloutState::Paused,
                RolloutState::Halted,
            ],
        )?;
        self.state = RolloutState::Aborted;
        Ok(())
    }

    /// Every wave confirmed.
    pub fn complete(&mut self) -> Result<(), TransitionError> {
        self.guard("complete", &[RolloutState::Running])?;
        if self.waves.iter().any(|w| w.state != WaveState::Confirmed) {
            return Err(TransitionError {
                action: "complete (a wave is unconfirmed)",
                from: self.state,
            });
        }
        self.state = RolloutState::Completed;
        Ok(())
    }

    /// The first wave not yet confirmed, if any.
    pub fn current_wave(&self) -> Option<usize> {
        self.waves.iter().position(|w| w.state != WaveState::Confirmed)
    }

    /// Failed hosts tolerated in wave `index` (0-based) of `size` hosts.
    pub fn budget(&self, index: usize, size: usize) -> usize {
        let budget = if index == 0 {
            self.budget_canary
        } else {
            self.budget_wave
        };
        match budget {
            Amount::Count(n) => usize::try_from(n).unwrap_or(usize::MAX),
            // A share of a wave is rounded down: 10% of 5 hosts tolerates 0.
            Amount::Percent(p) => size * usize::from(p) / 100,
        }
    }
}

/// A host's progress in a rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Host id.
    pub host: String,
    /// 0-based wave.
    pub wave: usize,
    /// Where it is.
    pub state: HostState,
    /// The next step to run.
    pub next_step: usize,
    /// A command sent and not yet answered; resent with the same id after a
    /// reconnect or a controller restart, so it never runs twice.
    pub in_flight: Option<String>,
    /// What happened, for people.
    pub detail: String,
    /// One entry per finished step.
    pub results: Vec<StepResult>,
    /// The snapshot taken before its first real step.
    #[serde(default)]
    pub snapshot: Option<crate::snapshot::SnapshotRecord>,
    /// The latest dry-run of each step, taken right before the real run.
    #[serde(default)]
    pub dry_runs: Vec<crate::effects::DryRunRecord>,
    /// Whether it was restored from its snapshot.
    #[serde(default)]
    pub rolled_back: bool,
    /// A reboot the controller waits for, after a step asked for one.
    #[serde(default)]
    pub reboot: Option<RebootWait>,
    /// The boot id the host last reported.
    #[serde(default)]
    pub boot_id: String,
}

/// A host that is rebooting after a step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootWait {
    /// The step it rebooted after.
    pub step: String,
    /// Its boot id before the reboot; it is back when it reports another.
    pub from_boot: String,
    /// When it has failed if it is not back, Unix milliseconds.
    pub deadline_ms: u64,
}

impl HostRecord {
    /// A host that has not been touched.
    pub fn new(host: String, wave: usize) -> HostRecord {
        HostRecord {
            host,
            wave,
            state: HostState::Untouched,
            next_step: 0,
            in_flight: None,
            detail: String::new(),
            results: Vec::new(),
            snapshot: None,
            dry_runs: Vec::new(),
            rolled_back: false,
            reboot: None,
            boot_id: String::new(),
        }
    }
}

/// The outcome of one step on one host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepResult {
    /// Step name.
    pub step: String,
    /// Command id.
    pub command_id: String,
    /// ok | failed | timed_out | interrupted | refused | unreachable
    pub outcome: String,
    /// Exit code, -1 when none.
    pub exit_code: i32,
    /// Wall time.
    pub duration_ms: u64,
    /// SHA-256 of the output.
    pub output_sha256: String,
    /// Whether the agent answered from its journal.
    pub replayed: bool,
    /// The last part of its output (the agent keeps the whole of it).
    #[serde(default)]
    pub output_tail: String,
    /// Bytes of its output the controller stored.
    #[serde(default)]
    pub output_stored: u64,
    /// "ok" when the stored output is the whole output (its SHA-256 matches
    /// the agent's), or why not.
    #[serde(default)]
    pub output_verified: String,
}

/// Whether a wave with `failed` failed hosts is over its budget.
pub fn over_budget(failed: usize, budget: usize) -> bool {
    failed > budget
}

/// What a person may do to a rollout once it is approved. A closed set:
/// an action nobody wrote down cannot reach the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// No new host starts; what runs finishes.
    Pause,
    /// Go on; from a halt, re-enter the halted wave and retry its failed
    /// hosts.
    Resume,
    /// Stop for good.
    Abort,
}

impl Control {
    /// The word in events and the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Control::Pause => "pause",
            Control::Resume => "resume",
            Control::Abort => "abort",
        }
    }
}

/// A wave over its failure budget: the halt, decided and not yet applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaltDecision {
    /// The wave (0-based).
    pub wave: usize,
    /// Its failed hosts.
    pub failed: usize,
    /// Its hosts.
    pub size: usize,
    /// Failed hosts it tolerates.
    pub budget: usize,
    /// Hosts of the rollout with a step in flight at the halt (the
    /// auditors' question: who else ran it?), in order.
    pub in_flight: Vec<String>,
}

impl HaltDecision {
    /// The halt reason people read: the count against the budget, the
    /// failure that tipped it, and who else was mid-step.
    pub fn reason(&self, host: &str, detail: &str) -> String {
        let what = if self.wave == 0 {
            "the canary (wave 1)".to_string()
        } else {
            format!("wave {}", self.wave + 1)
        };
        let mut reason = format!(
            "{what}: {} of {} hosts failed, budget {}; last: {host}: {detail}",
            self.failed, self.size, self.budget
        );
        if !self.in_flight.is_empty() {
            reason.push_str(&format!("; in flight at the halt: {}", self.in_flight.join(", ")));
        }
        reason
    }
}

impl Rollout {
    /// The one halt decision: wave `wave` must halt when the rollout is
    /// running or paused and more of the wave's hosts have failed than its
    /// budget allows.
    pub fn halt_decision(&self, wave: usize, hosts: &BTreeMap<String, HostRecord>) -> Option<HaltDecision> {
        if !matches!(self.state, RolloutState::Running | RolloutState::Paused) {
            return None;
        }
        let size = self.waves.get(wave)?.hosts.len();
        let failed = hosts
            .values()
            .filter(|h| h.wave == wave && h.state == HostState::Failed)
            .count();
        let budget = self.budget(wave, size);
        over_budget(failed, budget).then(|| HaltDecision {
            wave,
            failed,
            size,
            budget,
            in_flight: hosts
                .values()
                .filter(|h| h.in_flight.is_some() && h.state == HostState::Running)
                .map(|h| h.host.clone())
                .collect(),
        })
    }

    /// Apply a halt: the rollout and its wave halt with `reason`; with
    /// `on_failure: rollback` the rollback is pending; every pinned
    /// snapshot stays pinned past its retention. Returns the hosts whose
    /// records changed.
    pub fn apply_halt(
        &mut self,
        d: &HaltDecision,
        reason: String,
        hosts: &mut BTreeMap<String, HostRecord>,
    ) -> Result<Vec<String>, TransitionError> {
        self.halt(d.wave, reason)?;
        if self.on_failure == crate::plan::OnFailure::Rollback {
            self.rollback_pending = true;
        }
        let mut changed = Vec::new();
        for h in hosts.values_mut() {
            if let Some(snap) = h.snapshot.as_mut() {
                let before = snap.clone();
                snap.apply(&crate::snapshot::SnapshotEvent::Halted);
                if *snap != before {
                    changed.push(h.host.clone());
                }
            }
        }
        Ok(changed)
    }

    /// A person's control. Returns the hosts whose records changed: a
    /// resume from a halt retries the failed hosts of the re-entered wave
    /// (with fresh command ids: `attempt` goes up).
    pub fn control(
        &mut self,
        c: Control,
        hosts: &mut BTreeMap<String, HostRecord>,
    ) -> Result<Vec<String>, TransitionError> {
        let mut changed = Vec::new();
        match c {
            Control::Pause => self.pause()?,
            Control::Abort => self.abort()?,
            Control::Resume => {
                let was_halted = self.state == RolloutState::Halted;
                self.resume()?;
                // A rollback asked for while it stood still is not carried
                // out while it runs again.
                for q in &mut self.rollback_requests {
                    if q.state == RollbackState::AwaitingApproval {
                        q.state = RollbackState::Done;
                    }
                }
                if was_halted {
                    for h in hosts.values_mut() {
                        if h.state == HostState::Failed
                            && self.waves.get(h.wave).is_some_and(|w| w.state == WaveState::Pending)
                        {
                            h.state = HostState::Running;
                            h.in_flight = None;
                            changed.push(h.host.clone());
                        }
                    }
                }
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout() -> Rollout {
        Rollout {
            id: "r0001".into(),
            plan_name: "p".into(),
            plan_hash: "h1".into(),
            inventory_hash: "i1".into(),
            submitter: "sam".into(),
            submitter_person: "sam@x".into(),
            hold_updaters: None,
            updaters_held: Vec::new(),
            updaters_hold_taken: false,
            mirrors: Vec::new(),
            accepted_live_mirrors: Vec::new(),
            approvals: Vec::new(),
            approvals_required: 2,
            state: RolloutState::AwaitingApproval,
            halt_reason: None,
            waves: vec![
                Wave {
                    index: 1,
                    state: WaveState::Pending,
                    hosts: vec!["a".into()],
                    bake_ends_ms: None,
                    max_in_flight: 1,
                    windows: Vec::new(),
                    expected_ms: 0,
                    waits_until_ms: None,
                },
                Wave {
                    index: 2,
                    state: WaveState::Pending,
                    hosts: vec!["b".into()],
                    bake_ends_ms: None,
                    max_in_flight: 1,
                    windows: Vec::new(),
                    expected_ms: 0,
                    waits_until_ms: None,
                },
            ],
            steps: Vec::new(),
            checks: Vec::new(),
            bake_ms: 0,
            interval_ms: 1000,
            budget_canary: Amount::Count(0),
            budget_wave: Amount::Percent(10),
            attempt: 0,
            on_failure: crate::plan::OnFailure::Rollback,
            retain_ms: 0,
            write_set: Vec::new(),
            dry_runs: Vec::new(),
            dry_run_digest: "d1".into(),
            rollback_pending: false,
            untouchable: Vec::new(),
            snapshot_backend: String::new(),
            events: Vec::new(),
            rollback_requests: Vec::new(),
        }
    }

    fn approval(who: &str, hash: &str) -> Approval {
        Approval {
            who: who.into(),
            person: format!("{who}@x"),
            plan_hash: hash.into(),
            dry_run_digest: "d1".into(),
            at_ms: 0,
        }
    }

    #[test]
    fn needs_distinct_approvers_on_the_same_plan() {
        let mut r = rollout();
        assert_eq!(r.approve(approval("ann", "h1")), Ok(false));
        assert_eq!(
            r.approve(approval("ann", "h1")),
            Ok(false),
            "the same approver twice counts once"
        );
        assert_eq!(
            r.approve(approval("bob", "other-plan")),
            Ok(false),
            "an approval of another plan does not count"
        );
        let other_reports = Approval {
            dry_run_digest: "other".into(),
            ..approval("bea", "h1")
        };
        assert_eq!(
            r.approve(other_reports),
            Ok(false),
            "an approval of other dry-run reports does not count"
        );
        assert_eq!(r.approve(approval("cy", "h1")), Ok(true));
        assert_eq!(r.state, RolloutState::Running);
        assert!(r.approve(approval("dee", "h1")).is_err(), "no approvals once running");
    }

    #[test]
    fn two_certificates_of_one_person_approve_once() {
        let mut r = rollout();
        assert_eq!(r.approve(approval("ann", "h1")), Ok(false));
        let ann_again = Approval {
            person: "ann@x".into(),
            ..approval("ann-laptop", "h1")
        };
        assert_eq!(r.approve(ann_again), Ok(false), "the same person under another name");
        assert_eq!(r.approvals.len(), 1);
        assert_eq!(r.approve(approval("bob", "h1")), Ok(true));
    }

    fn request() -> RollbackRequest {
        RollbackRequest {
            number: 1,
            state: RollbackState::AwaitingApproval,
            requested_by: "sam".into(),
            requester_person: "sam@x".into(),
            hosts: vec!["a".into()],
            preview: Vec::new(),
            digest: "p1".into(),
            approvals: Vec::new(),
            approvals_required: 2,
            at_ms: 0,
        }
    }

    #[test]
    fn a_rollback_request_needs_other_people_and_the_preview_they_read() {
        let mut q = request();
        let sam = Approval {
            person: "sam@x".into(),
            ..approval("sam-admin", "")
        };
        assert!(q.approve(sam).is_err(), "the requester under another name");
        let nobody = Approval {
            person: String::new(),
            ..approval("old-cert", "")
        };
        assert!(q.approve(nobody).is_err(), "a certificate that names no person");
        let stale = Approval {
            dry_run_digest: "p0".into(),
            ..approval("ann", "")
        };
        assert!(q.approve(stale).is_err(), "another preview than the request's");
        let ann = Approval {
            dry_run_digest: "p1".into(),
            ..approval("ann", "")
        };
        assert_eq!(q.approve(ann.clone()), Ok(false));
        assert_eq!(q.approve(ann), Ok(false), "one person, one approval");
        let bob = Approval {
            dry_run_digest: String::new(),
            ..approval("bob", "")
        };
        assert_eq!(q.approve(bob), Ok(true), "no digest: the current preview");
        assert_eq!(q.state, RollbackState::Running);
        assert!(q.approve(approval("cy", "")).is_err(), "no approvals once running");
    }

    /// Two waves (a: canary, b: wave 2), running, with their host records.
    fn running() -> (Rollout, BTreeMap<String, HostRecord>) {
        let mut r = rollout();
        r.state = RolloutState::Running;
        r.waves[1].hosts = vec!["b".into(), "c".into(), "d".into(), "e".into()];
        let hosts = [("a", 0), ("b", 1), ("c", 1), ("d", 1), ("e", 1)]
            .into_iter()
            .map(|(h, w)| (h.to_owned(), HostRecord::new(h.into(), w)))
            .collect();
        (r, hosts)
    }

    fn fail(hosts: &mut BTreeMap<String, HostRecord>, h: &str) {
        let rec = hosts.get_mut(h).expect("host");
        rec.state = HostState::Failed;
        rec.in_flight = None;
    }

    #[test]
    fn the_canary_halts_on_its_first_failure_and_names_who_was_in_flight() {
        let (mut r, mut hosts) = running();
        assert_eq!(r.halt_decision(0, &hosts), None, "nothing failed");
        let b = hosts.get_mut("b").expect("b");
        (b.in_flight, b.state) = (Some("cmd".into()), HostState::Running);
        // c has passed its step and runs its health checks: not mid-step.
        let c = hosts.get_mut("c").expect("c");
        (c.in_flight, c.state) = (Some("checks".into()), HostState::Succeeded);
        fail(&mut hosts, "a");
        let d = r.halt_decision(0, &hosts).expect("the canary's budget is 0");
        assert_eq!((d.failed, d.size, d.budget), (1, 1, 0));
        assert_eq!(d.in_flight, vec!["b".to_owned()]);
        let reason = d.reason("a", "exit 1");
        assert_eq!(
            reason,
            "the canary (wave 1): 1 of 1 hosts failed, budget 0; last: a: exit 1; in flight at the halt: b"
        );
        r.apply_halt(&d, reason, &mut hosts).expect("halt");
        assert_eq!((r.state, r.waves[0].state), (RolloutState::Halted, WaveState::Halted));
        assert!(r.rollback_pending, "on_failure: rollback");
        assert_eq!(r.halt_decision(0, &hosts), None, "a halted rollout is not halted again");
    }

    #[test]
    fn a_wave_tolerates_its_share_rounded_down() {
        // 25 % of 4 hosts tolerates one failure; the second halts.
        let (mut r, mut hosts) = running();
        r.budget_wave = Amount::Percent(25);
        fail(&mut hosts, "b");
        assert_eq!(r.halt_decision(1, &hosts), None, "one of four is within 25 %");
        fail(&mut hosts, "c");
        let d = r.halt_decision(1, &hosts).expect("two of four is over");
        assert_eq!((d.wave, d.failed, d.budget), (1, 2, 1));
        assert!(d.reason("c", "x").starts_with("wave 2: 2 of 4 hosts failed, budget 1"));
        // 10 % of 4 rounds down to 0: the first failure halts.
        r.budget_wave = Amount::Percent(10);
        let (_, mut fresh) = running();
        fail(&mut fresh, "e");
        assert!(r.halt_decision(1, &fresh).is_some());
        // A count is a count.
        r.budget_wave = Amount::Count(2);
        assert_eq!(r.halt_decision(1, &hosts), None);
    }

    #[test]
    fn only_a_running_or_paused_rollout_halts_and_halt_only_keeps_rollback_when_asked() {
        let (mut r, mut hosts) = running();
        fail(&mut hosts, "a");
        for state in [
            RolloutState::AwaitingApproval,
            RolloutState::Halted,
            RolloutState::Completed,
            RolloutState::Aborted,
        ] {
            r.state = state;
            assert_eq!(r.halt_decision(0, &hosts), None, "{state:?}");
        }
        r.state = RolloutState::Paused;
        let d = r.halt_decision(0, &hosts).expect("a paused rollout halts");
        r.on_failure = crate::plan::OnFailure::Halt;
        r.apply_halt(&d, "x".into(), &mut hosts).expect("halt");
        assert!(!r.rollback_pending, "on_failure: halt leaves the hosts as they are");
        assert_eq!(r.halt_decision(7, &hosts), None, "no such wave");
    }

    #[test]
    fn controls_are_guarded_and_a_resume_retries_the_halted_waves_failed_hosts() {
        let (mut r, mut hosts) = running();
        assert_eq!(r.control(Control::Pause, &mut hosts), Ok(Vec::new()));
        assert!(r.control(Control::Pause, &mut hosts).is_err(), "paused already");
        r.control(Control::Resume, &mut hosts).expect("resume a pause");
        assert_eq!(r.attempt, 0, "a pause is no new attempt");
        fail(&mut hosts, "a");
        let d = r.halt_decision(0, &hosts).expect("halt");
        r.apply_halt(&d, "x".into(), &mut hosts).expect("halt");
        assert!(r.control(Control::Pause, &mut hosts).is_err(), "a halt is not paused");
        let changed = r.control(Control::Resume, &mut hosts).expect("resume");
        assert_eq!(changed, vec!["a".to_owned()], "the failed canary is retried");
        assert_eq!(hosts["a"].state, HostState::Running);
        assert_eq!((r.attempt, r.waves[0].state), (1, WaveState::Pending));
        assert_eq!(r.halt_reason, None);
        // A rollback asked for while it stood still is withdrawn by a resume.
        r.control(Control::Pause, &mut hosts).expect("pause");
        r.rollback_requests.push(request());
        r.control(Control::Resume, &mut hosts).expect("resume");
        assert_eq!(r.rollback_requests[0].state, RollbackState::Done);
        assert_eq!(r.control(Control::Abort, &mut hosts), Ok(Vec::new()));
        for c in [Control::Pause, Control::Resume, Control::Abort] {
            assert!(r.control(c, &mut hosts).is_err(), "{c:?} after an abort");
        }
    }

    #[test]
    fn what_a_host_does_next() {
        let mut r = rollout();
        r.state = RolloutState::Running;
        r.steps = vec![StepSpec {
            name: "s".into(),
            run: "true".into(),
            writes: vec!["/etc/x".into()],
            timeout_ms: 1,
            max_deletions: 0,
            allow_failure: None,
            fetch: None,
            fetch_writes: Vec::new(),
            packages: None,
            reboot: crate::plan::Reboot::Never,
            reboot_timeout_ms: 0,
            only_roles: Vec::new(),
        }];
        let mut h = HostRecord::new("h1".into(), 0);
        let id = || "c1".to_owned();
        assert_eq!(h.next(&r, id), Ok(HostNext::Step { index: 0, resend: None }));
        h.in_flight = Some("s0".into());
        assert_eq!(
            h.next(&r, id),
            Ok(HostNext::Step {
                index: 0,
                resend: Some("s0".into())
            }),
            "a stored id is sent again"
        );
        h.in_flight = None;
        h.next_step = 1;
        r.checks = Vec::new();
        assert_eq!(h.next(&r, id), Ok(HostNext::Stop));
        assert_eq!(
            h.state,
            HostState::Healthy,
            "no checks: healthy once the steps are done"
        );
        let mut h = HostRecord::new("h2".into(), 0);
        h.next_step = 1;
        r.checks = vec![CheckSpec {
            name: "up".into(),
            probe: ProbeSpec::Exec("true".into()),
            timeout_ms: 1,
        }];
        assert_eq!(
            h.next(&r, id),
            Ok(HostNext::Checks {
                command_id: "c1".into()
            })
        );
        assert_eq!((h.state, h.in_flight.as_deref()), (HostState::Succeeded, Some("c1")));
        assert_eq!(
            h.next(&r, || "other".into()),
            Ok(HostNext::Checks {
                command_id: "c1".into()
            }),
            "the checks in flight keep their id"
        );
        h.state = HostState::Failed;
        assert_eq!(h.next(&r, id), Ok(HostNext::Stop));
        r.state = RolloutState::Paused;
        let mut h = HostRecord::new("h3".into(), 0);
        assert_eq!(h.next(&r, id), Ok(HostNext::Stop), "nothing while paused");
    }

    #[test]
    fn a_host_moves_forward_or_fails_and_a_wave_in_order() {
        use HostState as H;
        for (from, to, ok) in [
            (H::Untouched, H::Running, true),
            (H::Running, H::Succeeded, true),
            (H::Succeeded, H::Healthy, true),
            (H::Untouched, H::Healthy, true),
            (H::Healthy, H::Failed, true),
            (H::Failed, H::Failed, true),
            (H::Healthy, H::Running, false),
            (H::Failed, H::Healthy, false),
            (H::Failed, H::Running, false),
            (H::Running, H::Untouched, false),
        ] {
            assert_eq!(from.can_become(to), ok, "{from:?} -> {to:?}");
        }
        use WaveState as W;
        for (from, to, ok) in [
            (W::Pending, W::Running, true),
            (W::Running, W::Baking, true),
            (W::Baking, W::Confirmed, true),
            (W::Baking, W::Halted, true),
            (W::Halted, W::Running, true),
            (W::Pending, W::Confirmed, false),
            (W::Running, W::Confirmed, false),
            (W::Confirmed, W::Halted, false),
            (W::Confirmed, W::Running, false),
        ] {
            assert_eq!(from.can_become(to), ok, "{from:?} -> {to:?}");
        }
    }

    #[test]
    fn transitions_are_guarded() {
        let mut r = rollout();
        assert!(r.pause().is_err());
        assert!(r.resume().is_err());
        assert!(r.halt(0, "x".into()).is_err(), "cannot halt before it runs");
        r.state = RolloutState::Running;
        r.halt(0, "canary failed".into()).expect("halt");
        assert_eq!(r.waves[0].state, WaveState::Halted);
        assert!(r.complete().is_err());
        r.resume().expect("a person resumes");
        assert_eq!(
            (r.state, r.attempt, r.waves[0].state),
            (RolloutState::Running, 1, WaveState::Pending)
        );
        r.abort().expect("abort");
        assert!(r.resume().is_err(), "aborted is final");
        assert!(r.state.is_final());
    }

    #[test]
    fn budgets() {
        let r = rollout();
        assert_eq!(r.budget(0, 1), 0);
        assert_eq!(r.budget(1, 5), 0);
        assert_eq!(r.budget(1, 20), 2);
        assert!(over_budget(1, 0));
        assert!(!over_budget(2, 2));
    }
}
