//! The one place where wire messages become domain types and back, for the
//! controller and the agent alike. A value the wire carries that the domain
//! does not know (an unknown outcome, package manager, backend, change kind
//! or violation code, or a message with a part missing) is an error, never a
//! default: the receiver refuses it.

use std::collections::BTreeMap;

use wavegate_domain::check::{Report as CheckReport, StepPlan, WaveReport};
use wavegate_domain::command::{
    ChangeKind, CheckResult, Command, CommandKind, CommandResult, DryRun, Fetch, FetchReport, Outcome, OutputChunk,
    OutputSummary, PathChange, Report, RunStep, SnapshotBackend, SnapshotSummary, Step,
};
use wavegate_domain::effects::{Category, DryRunRecord, FetchRecord, PackageChange, StepReport};
use wavegate_domain::packages::{Manager, Packages};
use wavegate_domain::plan::Reboot;
use wavegate_domain::rollout::{CheckSpec, ProbeSpec};
use wavegate_domain::snapshot::SnapshotPart;
use wavegate_domain::{Code, Violation};

use crate::v1 as pb;

/// A wire message the domain cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

fn bad(what: impl Into<String>) -> WireError {
    WireError(what.into())
}

// ---------------------------------------------------------------------------
// Enums.

impl From<Outcome> for pb::Outcome {
    fn from(o: Outcome) -> pb::Outcome {
        match o {
            Outcome::Ok => pb::Outcome::Ok,
            Outcome::Failed => pb::Outcome::Failed,
            Outcome::TimedOut => pb::Outcome::TimedOut,
            Outcome::Interrupted => pb::Outcome::Interrupted,
            Outcome::Refused => pb::Outcome::Refused,
        }
    }
}

/// The outcome an `Outcome` field holds.
pub fn outcome(v: i32) -> Result<Outcome, WireError> {
    match pb::Outcome::try_from(v) {
        Ok(pb::Outcome::Ok) => Ok(Outcome::Ok),
        Ok(pb::Outcome::Failed) => Ok(Outcome::Failed),
        Ok(pb::Outcome::TimedOut) => Ok(Outcome::TimedOut),
        Ok(pb::Outcome::Interrupted) => Ok(Outcome::Interrupted),
        Ok(pb::Outcome::Refused) => Ok(Outcome::Refused),
        Ok(pb::Outcome::Unspecified) | Err(_) => Err(bad(format!("unknown outcome {v}"))),
    }
}

fn reboot_to(r: Reboot) -> pb::Reboot {
    match r {
        Reboot::Never => pb::Reboot::Never,
        Reboot::Always => pb::Reboot::Always,
        Reboot::IfRequired => pb::Reboot::IfRequired,
    }
}

/// The reboot a `Reboot` field holds.
pub fn reboot(v: i32) -> Result<Reboot, WireError> {
    match pb::Reboot::try_from(v) {
        Ok(pb::Reboot::Never) => Ok(Reboot::Never),
        Ok(pb::Reboot::Always) => Ok(Reboot::Always),
        Ok(pb::Reboot::IfRequired) => Ok(Reboot::IfRequired),
        Err(_) => Err(bad(format!("unknown reboot mode {v}"))),
    }
}

fn manager_to(m: Manager) -> pb::PackageManager {
    match m {
        Manager::Apt => pb::PackageManager::Apt,
        Manager::Dnf => pb::PackageManager::Dnf,
    }
}

/// The package manager a `PackageManager` field holds.
pub fn manager(v: i32) -> Result<Manager, WireError> {
    match pb::PackageManager::try_from(v) {
        Ok(pb::PackageManager::Apt) => Ok(Manager::Apt),
        Ok(pb::PackageManager::Dnf) => Ok(Manager::Dnf),
        Ok(pb::PackageManager::Unspecified) | Err(_) => Err(bad(format!(
            "unknown package manager {v}: this agent knows apt and dnf; a package step is never run as a plain command"
        ))),
    }
}

/// The wire value of a backend.
pub fn backend_to(b: Option<SnapshotBackend>) -> i32 {
    (match b {
        None => pb::SnapshotBackend::Unspecified,
        Some(SnapshotBackend::Btrfs) => pb::SnapshotBackend::Btrfs,
        Some(SnapshotBackend::TarZstd) => pb::SnapshotBackend::TarZstd,
    }) as i32
}

/// The backend a `SnapshotBackend` field holds (`None`: unspecified).
pub fn backend(v: i32) -> Result<Option<SnapshotBackend>, WireError> {
    match pb::SnapshotBackend::try_from(v) {
        Ok(pb::SnapshotBackend::Unspecified) => Ok(None),
        Ok(pb::SnapshotBackend::Btrfs) => Ok(Some(SnapshotBackend::Btrfs)),
        Ok(pb::SnapshotBackend::TarZstd) => Ok(Some(SnapshotBackend::TarZstd)),
        Err(_) => Err(bad(format!("unknown snapshot backend {v}"))),
    }
}

fn change_to(c: ChangeKind) -> pb::ChangeKind {
    match c {
        ChangeKind::Changed => pb::ChangeKind::Changed,
        ChangeKind::Added => pb::ChangeKind::Added,
        ChangeKind::Removed => pb::ChangeKind::Removed,
    }
}

/// The change a `ChangeKind` field holds.
pub fn change(v: i32) -> Result<ChangeKind, WireError> {
    match pb::ChangeKind::try_from(v) {
        Ok(pb::ChangeKind::Changed) => Ok(ChangeKind::Changed),
        Ok(pb::ChangeKind::Added) => Ok(ChangeKind::Added),
        Ok(pb::ChangeKind::Removed) => Ok(ChangeKind::Removed),
        Ok(pb::ChangeKind::Unspecified) | Err(_) => Err(bad(format!("unknown path change {v}"))),
    }
}

// ---------------------------------------------------------------------------
// Commands.

impl From<Command> for pb::Command {
    fn from(c: Command) -> pb::Command {
        use pb::command::Kind as K;
        let kind = match c.kind {
            CommandKind::RunStep(s) => K::RunStep(pb::RunStep {
                rollout_id: s.rollout_id,
                step: Some(s.step.into()),
                create_dirs: s.create_dirs,
                create_files: s.create_files,
                untouchable: s.untouchable,
            }),
            CommandKind::RunChecks { rollout_id, checks } => K::RunChecks(pb::RunChecks {
                rollout_id,
                checks: checks.into_iter().map(check_to).collect(),
            }),
            CommandKind::DryRun(d) => K::DryRun(pb::DryRun {
                rollout_id: d.rollout_id,
                steps: d.steps.into_iter().map(pb::Step::from).collect(),
                untouchable: d.untouchable,
                fetch_stages: d.fetch_stages,
            }),
            CommandKind::TakeSnapshot {
                rollout_id,
                paths,
                untouchable,
                backend,
            } => K::TakeSnapshot(pb::TakeSnapshot {
                rollout_id,
                paths,
                untouchable,
                backend: backend_to(backend),
            }),
            CommandKind::RestoreSnapshot { rollout_id, preview } => {
                K::RestoreSnapshot(pb::RestoreSnapshot { rollout_id, preview })
            }
            CommandKind::ReleaseSnapshot { rollout_id } => K::ReleaseSnapshot(pb::ReleaseSnapshot { rollout_id }),
            CommandKind::HoldUpdaters { rollout_id, hold } => K::HoldUpdaters(pb::HoldUpdaters { rollout_id, hold }),
            CommandKind::Mirror {
                rollout_id,
                purpose,
                run,
                timeout_ms,
            } => K::Mirror(pb::MirrorCommand {
                rollout_id,
                purpose,
                run,
                timeout_ms,
            }),
            CommandKind::Fetch(f) => K::Fetch(pb::Fetch {
                rollout_id: f.rollout_id,
                step_name: f.step_name,
                run: f.run,
                writes: f.writes,
                timeout_ms: f.timeout_ms,
                skip_if_digest: f.skip_if_digest,
                stage: f.stage,
                adopt_digest: f.adopt_digest,
                only_roles: f.only_roles,
            }),
        };
        pb::Command {
            id: c.id,
            kind: Some(kind),
            redact: c.redact,
            accept_weaker: c.accept_weaker,
        }
    }
}

impl From<Step> for pb::Step {
    fn from(s: Step) -> pb::Step {
        pb::Step {
            name: s.name,
            run: s.run,
            writes: s.writes,
            timeout_ms: s.timeout_ms,
            max_deletions: s.max_deletions,
            allow_failure: s.allow_failure.unwrap_or_default(),
            reboot: reboot_to(s.reboot) as i32,
            only_roles: s.only_roles,
            kind: s.packages.map(|p| {
                pb::step::Kind::Packages(pb::PackageSpec {
                    manager: manager_to(p.manager) as i32,
                    upgrade: p.upgrade,
                    install: p.install.into_iter().collect(),
                })
            }),
        }
    }
}

impl TryFrom<pb::Step> for Step {
    type Error = WireError;

    fn try_from(s: pb::Step) -> Result<Step, WireError> {
        let packages = match s.kind {
            None => None,
            Some(pb::step::Kind::Packages(p)) => {
                // The map carries no order; the domain keeps one.
                let install: BTreeMap<String, String> = p.install.into_iter().collect();
                Some(Packages {
                    manager: manager(p.manager).map_err(|e| bad(format!("step `{}`: {e}", s.name)))?,
                    upgrade: p.upgrade,
                    install: install.into_iter().collect(),
                })
            }
        };
        Ok(Step {
            reboot: reboot(s.reboot)?,
            name: s.name,
            run: s.run,
            writes: s.writes,
            timeout_ms: s.timeout_ms,
            max_deletions: s.max_deletions,
            allow_failure: (!s.allow_failure.is_empty()).then_some(s.allow_failure),
            packages,
            only_roles: s.only_roles,
        })
    }
}

fn check_to(c: CheckSpec) -> pb::HealthCheck {
    use pb::health_check::Probe;
    pb::HealthCheck {
        name: c.name,
        probe: Some(match c.probe {
            ProbeSpec::Tcp(a) => Probe::Tcp(a),
            ProbeSpec::Http { url, expect_status } => Probe::Http(pb::HttpProbe {
                url,
                expect_status: u32::from(expect_status),
            }),
            ProbeSpec::Exec(cmd) => Probe::Exec(cmd),
        }),
        timeout_ms: c.timeout_ms,
    }
}

fn check_from(c: pb::HealthCheck) -> Result<CheckSpec, WireError> {
    use pb::health_check::Probe;
    let probe = match c.probe {
        Some(Probe::Tcp(a)) => ProbeSpec::Tcp(a),
        Some(Probe::Http(h)) => ProbeSpec::Http {
            url: h.url,
            expect_status: u16::try_from(h.expect_status).map_err(|_| {
                bad(format!(
                    "check `{}`: status {} is not an HTTP status",
                    c.name, h.expect_status
                ))
            })?,
        },
        Some(Probe::Exec(cmd)) => ProbeSpec::Exec(cmd),
        None => return Err(bad(format!("check `{}` has no probe", c.name))),
    };
    Ok(CheckSpec {
        name: c.name,
        probe,
        timeout_ms: c.timeout_ms,
    })
}

impl TryFrom<pb::Command> for Command {
    type Error = WireError;

    fn try_from(c: pb::Command) -> Result<Command, WireError> {
        use pb::command::Kind as K;
        let kind = match c.kind {
            None => return Err(bad(format!("command {} says nothing to do", c.id))),
            Some(K::RunStep(s)) => CommandKind::RunStep(RunStep {
                step: s
                    .step
                    .ok_or_else(|| bad(format!("command {} runs no step", c.id)))?
                    .try_into()?,
                rollout_id: s.rollout_id,
                create_dirs: s.create_dirs,
                create_files: s.create_files,
                untouchable: s.untouchable,
            }),
            Some(K::RunChecks(r)) => CommandKind::RunChecks {
                rollout_id: r.rollout_id,
                checks: r.checks.into_iter().map(check_from).collect::<Result<_, _>>()?,
            },
            Some(K::DryRun(d)) => CommandKind::DryRun(DryRun {
                rollout_id: d.rollout_id,
                steps: d.steps.into_iter().map(Step::try_from).collect::<Result<_, _>>()?,
                untouchable: d.untouchable,
                fetch_stages: d.fetch_stages,
            }),
            Some(K::TakeSnapshot(t)) => CommandKind::TakeSnapshot {
                backend: backend(t.backend)?,
                rollout_id: t.rollout_id,
                paths: t.paths,
                untouchable: t.untouchable,
            },
            Some(K::RestoreSnapshot(r)) => CommandKind::RestoreSnapshot {
                rollout_id: r.rollout_id,
                preview: r.preview,
            },
            Some(K::ReleaseSnapshot(r)) => CommandKind::ReleaseSnapshot {
                rollout_id: r.rollout_id,
            },
            Some(K::HoldUpdaters(h)) => CommandKind::HoldUpdaters {
                rollout_id: h.rollout_id,
                hold: h.hold,
            },
            Some(K::Mirror(m)) => CommandKind::Mirror {
                rollout_id: m.rollout_id,
                purpose: m.purpose,
                run: m.run,
                timeout_ms: m.timeout_ms,
            },
            Some(K::Fetch(f)) => CommandKind::Fetch(Fetch {
                rollout_id: f.rollout_id,
                step_name: f.step_name,
                run: f.run,
                writes: f.writes,
                timeout_ms: f.timeout_ms,
                skip_if_digest: f.skip_if_digest,
                stage: f.stage,
                adopt_digest: f.adopt_digest,
                only_roles: f.only_roles,
            }),
        };
        Ok(Command {
            id: c.id,
            kind,
            redact: c.redact,
            accept_weaker: c.accept_weaker,
        })
    }
}

// ---------------------------------------------------------------------------
// Results and reports.

impl From<CommandResult> for pb::CommandResult {
    fn from(r: CommandResult) -> pb::CommandResult {
        use pb::command_result::Report as R;
        pb::CommandResult {
            command_id: r.command_id,
            outcome: pb::Outcome::from(r.outcome) as i32,
            exit_code: r.exit_code,
            duration_ms: r.duration_ms,
            output_sha256: r.output_sha256,
            output_tail: r.output_tail,
            checks: r.checks.into_iter().map(pb::CheckResult::from).collect(),
            replayed: r.replayed,
            detail: r.detail,
            report: r.report.map(|rep| match rep {
                Report::DryRun(steps) => R::DryRuns(pb::DryRunReports {
                    steps: steps.into_iter().map(pb::StepReport::from).collect(),
                }),
                Report::Snapshot(s) => R::Snapshot(s.into()),
                Report::Fetch(f) => R::Fetch(pb::FetchReport {
                    digest: f.digest,
                    ran: f.ran,
                    stage: f.stage,
                    adopted: f.adopted,
                }),
            }),
            reboot_pending: r.reboot_pending,
            boot_id: r.boot_id,
            changes: r.changes.into_iter().map(path_change_to).collect(),
            changes_total: r.changes_total,
        }
    }
}

impl From<CheckResult> for pb::CheckResult {
    fn from(c: CheckResult) -> pb::CheckResult {
        pb::CheckResult {
            name: c.name,
            ok: c.ok,
            detail: c.detail,
        }
    }
}

/// A path change on the wire.
pub fn path_change_to(c: PathChange) -> pb::PathChange {
    pb::PathChange {
        path: c.path,
        kind: change_to(c.kind) as i32,
    }
}

impl TryFrom<pb::CommandResult> for CommandResult {
    type Error = WireError;

    fn try_from(r: pb::CommandResult) -> Result<CommandResult, WireError> {
        use pb::command_result::Report as R;
        let report = match r.report {
            None => None,
            Some(R::DryRuns(d)) => Some(Report::DryRun(
                d.steps
                    .into_iter()
                    .map(StepReport::try_from)
                    .collect::<Result<_, _>>()?,
            )),
            Some(R::Snapshot(s)) => Some(Report::Snapshot(SnapshotSummary {
                files: s.files,
                bytes: s.bytes,
                roots: s.roots,
                describe: s.describe,
                parts: s
                    .parts
                    .into_iter()
                    .map(SnapshotPart::try_from)
                    .collect::<Result<_, _>>()?,
            })),
            Some(R::Fetch(f)) => Some(Report::Fetch(FetchReport {
                digest: f.digest,
                ran: f.ran,
                stage: f.stage,
                adopted: f.adopted,
            })),
        };
        Ok(CommandResult {
            outcome: outcome(r.outcome)?,
            changes: r
                .changes
                .into_iter()
                .map(|c| {
                    Ok(PathChange {
                        kind: change(c.kind)?,
                        path: c.path,
                    })
                })
                .collect::<Result<_, WireError>>()?,
            command_id: r.command_id,
            exit_code: r.exit_code,
            duration_ms: r.duration_ms,
            output_sha256: r.output_sha256,
            output_tail: r.output_tail,
            checks: r
                .checks
                .into_iter()
                .map(|c| CheckResult {
                    name: c.name,
                    ok: c.ok,
                    detail: c.detail,
                })
                .collect(),
            replayed: r.replayed,
            detail: r.detail,
            report,
            reboot_pending: r.reboot_pending,
            boot_id: r.boot_id,
            changes_total: r.changes_total,
        })
    }
}

fn category_to(c: Category) -> Option<pb::EffectCategory> {
    Some(pb::EffectCategory {
        count: c.count,
        bytes: c.bytes,
        sample: c.sample,
    })
}

fn category(c: Option<pb::EffectCategory>) -> Category {
    c.map(|c| Category {
        count: c.count,
        bytes: c.bytes,
        sample: c.sample,
    })
    .unwrap_or_default()
}

impl From<StepReport> for pb::StepReport {
    fn from(r: StepReport) -> pb::StepReport {
        pb::StepReport {
            step: r.step,
            blocked: r.blocked,
            reasons: r.reasons,
            deleted: category_to(r.deleted),
            modified: category_to(r.modified),
            created: category_to(r.created),
            outside: category_to(r.outside),
            outside_deleted: category_to(r.outside_deleted),
            exit_code: r.exit_code,
            created_dirs: r.created_dirs,
            created_files: r.created_files,
            timed_out: r.timed_out,
            output_tail: r.output_tail,
            allowed_failure: r.allowed_failure,
            packages: r
                .packages
                .into_iter()
                .map(|p| pb::PackageChange {
                    name: p.name,
                    from: p.from,
                    to: p.to,
                })
                .collect(),
            implied_writes: r.implied_writes,
            services: r.services,
        }
    }
}

impl TryFrom<pb::StepReport> for StepReport {
    type Error = WireError;

    fn try_from(r: pb::StepReport) -> Result<StepReport, WireError> {
        Ok(StepReport {
            step: r.step,
            blocked: r.blocked,
            reasons: r.reasons,
            deleted: category(r.deleted),
            modified: category(r.modified),
            created: category(r.created),
            outside: category(r.outside),
            outside_deleted: category(r.outside_deleted),
            exit_code: r.exit_code,
            created_dirs: r.created_dirs,
            created_files: r.created_files,
            timed_out: r.timed_out,
            output_tail: r.output_tail,
            allowed_failure: r.allowed_failure,
            packages: r
                .packages
                .into_iter()
                .map(|p| PackageChange {
                    name: p.name,
                    from: p.from,
                    to: p.to,
                })
                .collect(),
            implied_writes: r.implied_writes,
            services: r.services,
        })
    }
}

impl From<SnapshotSummary> for pb::SnapshotSummary {
    fn from(s: SnapshotSummary) -> pb::SnapshotSummary {
        pb::SnapshotSummary {
            files: s.files,
            bytes: s.bytes,
            roots: s.roots,
            describe: s.describe,
            parts: s.parts.into_iter().map(pb::SnapshotPart::from).collect(),
        }
    }
}

impl From<SnapshotPart> for pb::SnapshotPart {
    fn from(p: SnapshotPart) -> pb::SnapshotPart {
        pb::SnapshotPart {
            backend: backend_to(Some(p.backend)),
            mount: p.mount,
            fstype: p.fstype,
            roots: p.roots,
            files: p.files,
            bytes: p.bytes,
            note: p.note,
        }
    }
}

impl TryFrom<pb::SnapshotPart> for SnapshotPart {
    type Error = WireError;

    fn try_from(p: pb::SnapshotPart) -> Result<SnapshotPart, WireError> {
        Ok(SnapshotPart {
            backend: backend(p.backend)?
                .ok_or_else(|| bad(format!("snapshot part at {} names no backend", p.mount)))?,
            mount: p.mount,
            fstype: p.fstype,
            roots: p.roots,
            files: p.files,
            bytes: p.bytes,
            note: p.note,
        })
    }
}

impl From<pb::OutputChunk> for OutputChunk {
    fn from(c: pb::OutputChunk) -> OutputChunk {
        OutputChunk {
            command_id: c.command_id,
            data: c.data,
            offset: c.offset,
            dropped: c.dropped,
            rollout_id: c.rollout_id,
            step: c.step,
        }
    }
}

// ---------------------------------------------------------------------------
// The operator API's reports.

impl From<OutputSummary> for pb::LogChunk {
    fn from(s: OutputSummary) -> pb::LogChunk {
        pb::LogChunk {
            host: s.host,
            step: s.step,
            stored: s.stored,
            verified: s.verified,
            ..pb::LogChunk::default()
        }
    }
}

/// A fetch record's outcome when no agent answered.
const UNREACHABLE: &str = "unreachable";

/// A dry-run record on the wire, with the phase it was taken in.
pub fn dry_run_record_to(phase: &str, d: DryRunRecord) -> pb::DryRunRecord {
    let unreachable = d.fetch.as_ref().is_some_and(|f| f.outcome == UNREACHABLE);
    pb::DryRunRecord {
        phase: phase.to_owned(),
        host: d.host,
        step: d.step,
        blocked: d.blocked,
        reasons: d.reasons,
        report: d.report.map(pb::StepReport::from),
        fetch: d.fetch.map(|f| pb::FetchRecord {
            command_id: f.command_id,
            // A record names an outcome this controller wrote itself, or
            // says the agent was out of reach.
            outcome: Outcome::parse(&f.outcome).map_or(pb::Outcome::Unspecified, pb::Outcome::from) as i32,
            unreachable,
            ran: f.ran,
            digest: f.digest,
            exit_code: f.exit_code,
            output_sha256: f.output_sha256,
            detail: f.detail,
            stage: f.stage,
        }),
    }
}

/// A dry-run record from the wire, and its phase.
pub fn dry_run_record(d: pb::DryRunRecord) -> Result<(String, DryRunRecord), WireError> {
    let fetch = match d.fetch {
        None => None,
        Some(f) => Some(FetchRecord {
            outcome: if f.unreachable {
                UNREACHABLE.to_owned()
            } else {
                outcome(f.outcome)?.as_str().to_owned()
            },
            command_id: f.command_id,
            ran: f.ran,
            digest: f.digest,
            exit_code: f.exit_code,
            output_sha256: f.output_sha256,
            detail: f.detail,
            stage: f.stage,
        }),
    };
    Ok((
        d.phase,
        DryRunRecord {
            host: d.host,
            step: d.step,
            blocked: d.blocked,
            reasons: d.reasons,
            report: d.report.map(StepReport::try_from).transpose()?,
            fetch,
        },
    ))
}

/// A refusal as gRPC status details: a protobuf `Refusal`.
pub fn refusal_bytes(r: &pb::Refusal) -> Vec<u8> {
    prost::Message::encode_to_vec(r)
}

/// Why a submit was refused, as the status details carry it.
#[derive(Clone, Debug)]
pub enum Refusal {
    /// The plan is not valid, or a safety rule refused it.
    Check(CheckReport),
    /// The first wave's dry-run was blocked.
    Blocked {
        /// The refused rollout.
        id: String,
        /// Why.
        halt_reason: String,
        /// Its dry-runs.
        dry_runs: Vec<DryRunRecord>,
    },
}

/// The refusal in gRPC status details (`None` when there is none, or it
/// cannot be read).
pub fn refusal(details: &[u8]) -> Option<Refusal> {
    if details.is_empty() {
        return None;
    }
    match <pb::Refusal as prost::Message>::decode(details).ok()?.kind? {
        pb::refusal::Kind::Check(r) => CheckReport::try_from(r).ok().map(Refusal::Check),
        pb::refusal::Kind::Blocked(b) => Some(Refusal::Blocked {
            id: b.id,
            halt_reason: b.halt_reason,
            dry_runs: b
                .dry_runs
                .into_iter()
                .map(|d| dry_run_record(d).map(|(_, d)| d))
                .collect::<Result<_, _>>()
                .ok()?,
        }),
    }
}

impl From<CheckReport> for pb::CheckReport {
    fn from(r: CheckReport) -> pb::CheckReport {
        pb::CheckReport {
            ok: r.ok,
            plan: r.plan,
            plan_file: r.plan_file,
            fleet_file: r.fleet_file,
            targets: r.targets,
            waves: r
                .waves
                .into_iter()
                .map(|w| pb::CheckWave {
                    index: w.index as u64,
                    hosts: w.hosts,
                    groups: w.groups,
                    failure_domains: w.failure_domains,
                    backups: w.backups as u64,
                    max_in_flight: w.max_in_flight as u64,
                    expected_ms: w.expected_ms,
                    windows: w.windows.iter().map(window_set_to).collect(),
                })
                .collect(),
            violations: r.violations.into_iter().map(violation_to).collect(),
            notes: r.notes,
            policies: r.policies,
            steps: r
                .steps
                .into_iter()
                .map(|s| pb::StepPlan {
                    reboot: reboot_to(s.reboot) as i32,
                    name: s.name,
                    kind: s.kind,
                    run: s.run,
                    writes: s.writes,
                    packages: s.packages,
                    fetch: s.fetch,
                    fetch_writes: s.fetch_writes,
                    max_deletions: s.max_deletions,
                    allow_failure: s.allow_failure,
                    only_roles: s.only_roles,
                })
                .collect(),
        }
    }
}

fn violation_to(v: Violation) -> pb::Violation {
    pb::Violation {
        code: v.code.as_str().into_owned(),
        message: v.message,
        hosts: v.hosts,
        file: v.file,
        line: v.line,
        column: v.column,
        field: v.field,
        fix: v.fix,
    }
}

impl TryFrom<pb::CheckReport> for CheckReport {
    type Error = WireError;

    fn try_from(r: pb::CheckReport) -> Result<CheckReport, WireError> {
        let violations = r
            .violations
            .into_iter()
            .map(|v| {
                Ok(Violation {
                    code: Code::parse(&v.code).ok_or_else(|| bad(format!("unknown violation code `{}`", v.code)))?,
                    message: v.message,
                    hosts: v.hosts,
                    file: v.file,
                    line: v.line,
                    column: v.column,
                    field: v.field,
                    fix: v.fix,
                })
            })
            .collect::<Result<_, WireError>>()?;
        let steps = r
            .steps
            .into_iter()
            .map(|s| {
                Ok(StepPlan {
                    reboot: reboot(s.reboot)?,
                    name: s.name,
                    kind: s.kind,
                    run: s.run,
                    writes: s.writes,
                    packages: s.packages,
                    fetch: s.fetch,
                    fetch_writes: s.fetch_writes,
                    max_deletions: s.max_deletions,
                    allow_failure: s.allow_failure,
                    only_roles: s.only_roles,
                })
            })
            .collect::<Result<_, WireError>>()?;
        Ok(CheckReport {
            ok: r.ok,
            plan: r.plan,
            plan_file: r.plan_file,
            fleet_file: r.fleet_file,
            targets: r.targets,
            waves: r
                .waves
                .into_iter()
                .map(|w| WaveReport {
                    index: w.index as usize,
                    hosts: w.hosts,
                    groups: w.groups,
                    failure_domains: w.failure_domains,
                    backups: w.backups as usize,
                    max_in_flight: usize::try_from(w.max_in_flight).unwrap_or(usize::MAX),
                    expected_ms: w.expected_ms,
                    windows: w.windows.into_iter().map(window_set).collect(),
                })
                .collect(),
            violations,
            notes: r.notes,
            policies: r.policies,
            steps,
        })
    }
}

/// An updater as the wire carries it.
pub fn updater_to(u: &wavegate_domain::updaters::Updater) -> pb::Updater {
    pb::Updater {
        kind: u.kind.as_str().into(),
        what: u.what.clone(),
        evidence: u.evidence.clone(),
        holdable: u.holdable,
        held_by: u.held_by.clone().unwrap_or_default(),
    }
}

/// An updater from the wire; a kind this build does not know is kept as a
/// cron job's kin (it cannot be held), never dropped.
pub fn updater(u: pb::Updater) -> wavegate_domain::updaters::Updater {
    use wavegate_domain::updaters::{Updater, UpdaterKind};
    let known = UpdaterKind::parse(&u.kind);
    Updater {
        kind: known.unwrap_or(UpdaterKind::Cron),
        what: if known.is_some() {
            u.what
        } else {
            format!("{} {}", u.kind, u.what)
        },
        evidence: u.evidence,
        holdable: u.holdable && known.is_some(),
        held_by: (!u.held_by.is_empty()).then_some(u.held_by),
    }
}

/// Maintenance windows as the wire carries them.
pub fn window_set_to(s: &wavegate_domain::windows::WindowSet) -> pb::WindowSet {
    pb::WindowSet {
        source: s.source.clone(),
        windows: s
            .windows
            .iter()
            .map(|w| pb::Window {
                days: w.days.clone(),
                start: w.start.clone(),
                end: w.end.clone(),
                tz: w.tz.clone(),
            })
            .collect(),
    }
}

/// Maintenance windows from the wire.
pub fn window_set(s: pb::WindowSet) -> wavegate_domain::windows::WindowSet {
    wavegate_domain::windows::WindowSet {
        source: s.source,
        windows: s
            .windows
            .into_iter()
            .map(|w| wavegate_domain::windows::Window {
                days: w.days,
                start: w.start,
                end: w.end,
                tz: w.tz,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_enum_values_are_errors_not_defaults() {
        assert!(outcome(0).is_err(), "an unspecified outcome is not `ok`");
        assert!(outcome(99).is_err());
        assert!(manager(0).is_err(), "a package step never becomes a plain step");
        assert!(manager(7).is_err());
        assert!(backend(9).is_err());
        assert_eq!(backend(0), Ok(None));
        assert!(change(0).is_err());
        assert!(reboot(5).is_err());
    }

    #[test]
    fn a_command_survives_the_wire() {
        let cmd = Command {
            id: "r0001-abcdef:0:h1:step0:xyz".into(),
            kind: CommandKind::RunStep(RunStep {
                rollout_id: "r0001-abcdef".into(),
                step: Step {
                    name: "patch".into(),
                    run: "true".into(),
                    writes: vec!["/srv/app".into()],
                    timeout_ms: 5000,
                    reboot: Reboot::IfRequired,
                    allow_failure: Some("it probes".into()),
                    ..Step::default()
                },
                ..RunStep::default()
            }),
            redact: vec!["secret".into()],
            accept_weaker: Vec::new(),
        };
        let back = Command::try_from(pb::Command::from(cmd.clone())).expect("converts");
        assert_eq!(back, cmd);
        let dry = Command::new(
            "d",
            CommandKind::DryRun(DryRun {
                rollout_id: "r".into(),
                steps: vec![Step {
                    name: "pkgs".into(),
                    packages: Some(Packages {
                        manager: Manager::Apt,
                        upgrade: vec!["nginx".into()],
                        install: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
                    }),
                    ..Step::default()
                }],
                ..DryRun::default()
            }),
        );
        assert_eq!(
            Command::try_from(pb::Command::from(dry.clone())).expect("converts"),
            dry
        );
    }

    #[test]
    fn a_result_with_each_report_survives_the_wire() {
        let mut r = CommandResult::new("c", Outcome::Ok, "done");
        r.report = Some(Report::Snapshot(SnapshotSummary {
            files: 3,
            bytes: 10,
            roots: vec!["/home".into()],
            describe: "3 paths".into(),
            parts: vec![SnapshotPart {
                backend: SnapshotBackend::Btrfs,
                mount: "/home".into(),
                fstype: "btrfs".into(),
                roots: vec!["/home".into()],
                files: 3,
                bytes: 10,
                note: String::new(),
            }],
        }));
        r.changes = vec![PathChange {
            path: "/home/a".into(),
            kind: ChangeKind::Removed,
        }];
        assert_eq!(
            CommandResult::try_from(pb::CommandResult::from(r.clone())).expect("converts"),
            r
        );
        r.report = Some(Report::DryRun(vec![StepReport {
            step: "s".into(),
            blocked: true,
            reasons: vec!["deleted outside".into()],
            allowed_failure: Some("it probes".into()),
            ..StepReport::default()
        }]));
        assert_eq!(
            CommandResult::try_from(pb::CommandResult::from(r.clone())).expect("converts"),
            r
        );
        r.report = Some(Report::Fetch(FetchReport {
            digest: "d".into(),
            ran: true,
            stage: "k".into(),
            adopted: false,
        }));
        assert_eq!(
            CommandResult::try_from(pb::CommandResult::from(r.clone())).expect("converts"),
            r
        );
    }
}
