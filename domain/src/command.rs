//! The agent contract as the controller's engine and the agents work with
//! it: the commands a controller sends, and what comes back. These are plain
//! domain types; `wavegate_proto::convert` is the one place where they
//! become wire messages and back, and it refuses a value it does not know
//! (an unknown outcome, package manager or backend) instead of guessing.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::effects::StepReport;
use crate::packages::Packages;
use crate::plan::Reboot;
use crate::rollout::CheckSpec;
use crate::snapshot::SnapshotPart;

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Ran and succeeded (exit 0, or every check passed).
    Ok,
    /// Ran and failed (non-zero exit, or a check failed).
    Failed,
    /// Killed at its time limit.
    TimedOut,
    /// Accepted, but the agent cannot account for how it ended.
    Interrupted,
    /// The agent refused to run it.
    Refused,
}

impl Outcome {
    /// Its name in records and for people.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::Interrupted => "interrupted",
            Outcome::Refused => "refused",
        }
    }

    /// The outcome a record names (`None` for a name it does not know).
    pub fn parse(s: &str) -> Option<Outcome> {
        [
            Outcome::Ok,
            Outcome::Failed,
            Outcome::TimedOut,
            Outcome::Interrupted,
            Outcome::Refused,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a snapshot is kept. Its name is the one site policies write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SnapshotBackend {
    /// A read-only btrfs snapshot of a subvolume.
    #[serde(rename = "btrfs")]
    Btrfs,
    /// wavegate's own record archive in zstd (any filesystem).
    #[serde(rename = "tar+zstd")]
    TarZstd,
}

impl SnapshotBackend {
    /// Every backend, in the order they are preferred.
    pub const ALL: [SnapshotBackend; 2] = [SnapshotBackend::Btrfs, SnapshotBackend::TarZstd];

    /// Its name, as shown and as a site policy writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotBackend::Btrfs => "btrfs",
            SnapshotBackend::TarZstd => "tar+zstd",
        }
    }

    /// The backend a policy names (`None` for one it does not know).
    pub fn parse(s: &str) -> Option<SnapshotBackend> {
        SnapshotBackend::ALL.into_iter().find(|b| b.as_str() == s)
    }
}

impl fmt::Display for SnapshotBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a restore does to a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Put back as it was.
    Changed,
    /// Deleted: added since the snapshot.
    Added,
    /// Brought back: removed since the snapshot.
    Removed,
}

impl ChangeKind {
    /// Its name for people and in records.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Changed => "changed",
            ChangeKind::Added => "added",
            ChangeKind::Removed => "removed",
        }
    }

    /// The change a record names (`None` for a name it does not know).
    pub fn parse(s: &str) -> Option<ChangeKind> {
        [ChangeKind::Changed, ChangeKind::Added, ChangeKind::Removed]
            .into_iter()
            .find(|c| c.as_str() == s)
    }
}

/// A path a restore would change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathChange {
    /// Host path, escaped where it is not UTF-8.
    pub path: String,
    /// What the restore does to it.
    pub kind: ChangeKind,
}

/// A command for one host's agent. Its id is stable across resends: an
/// agent that ran it answers from its journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// Unique id; the agent journals it before running the command.
    pub id: String,
    /// What to do.
    pub kind: CommandKind,
    /// The site's redact patterns, on top of the agent's own.
    pub redact: Vec<String>,
    /// Weaker confinement the site accepts by name.
    pub accept_weaker: Vec<String>,
}

impl Command {
    /// A command with no site redaction and no weaker confinement.
    pub fn new(id: impl Into<String>, kind: CommandKind) -> Command {
        Command {
            id: id.into(),
            kind,
            redact: Vec::new(),
            accept_weaker: Vec::new(),
        }
    }
}

/// What a command does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandKind {
    /// Run one plan step.
    RunStep(RunStep),
    /// Run health checks once.
    RunChecks {
        /// The rollout they run for.
        rollout_id: String,
        /// The checks.
        checks: Vec<CheckSpec>,
    },
    /// Dry-run steps in a copy-on-write sandbox.
    DryRun(DryRun),
    /// Snapshot the write set (once per rollout) and verify it.
    TakeSnapshot {
        /// The rollout.
        rollout_id: String,
        /// Absolute paths to keep.
        paths: Vec<String>,
        /// Paths left out (never changed).
        untouchable: Vec<String>,
        /// A backend forced by the site policy (`None`: the agent picks).
        backend: Option<SnapshotBackend>,
    },
    /// Restore this rollout's snapshot, or only say what that would change.
    RestoreSnapshot {
        /// The rollout.
        rollout_id: String,
        /// Only preview.
        preview: bool,
    },
    /// Delete this rollout's snapshot.
    ReleaseSnapshot {
        /// The rollout.
        rollout_id: String,
    },
    /// Run a step's fetch.
    Fetch(Fetch),
    /// Pause or resume the live mirror feeding this backup: the
    /// inventory's command, run as the host is.
    Mirror {
        /// The rollout.
        rollout_id: String,
        /// `pause` or `resume`.
        purpose: String,
        /// Command line.
        run: String,
        /// Time limit.
        timeout_ms: u64,
    },
    /// Hold the host's updaters for a rollout, or release the hold.
    HoldUpdaters {
        /// The rollout.
        rollout_id: String,
        /// Hold (`true`) or release.
        hold: bool,
    },
}

/// A plan step, as every command that runs one carries it (and as the
/// agent's journal keeps a dry-run's steps).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Name from the plan.
    pub name: String,
    /// Command line (made by wavegate for a package step).
    pub run: String,
    /// Declared write set.
    pub writes: Vec<String>,
    /// Time limit.
    pub timeout_ms: u64,
    /// Deletion budget.
    pub max_deletions: u64,
    /// Why a failing dry-run is acceptable; without it, a dry-run that
    /// exits non-zero, times out or is killed blocks the step.
    #[serde(default)]
    pub allow_failure: Option<String>,
    /// Whether the host reboots after it.
    #[serde(default)]
    pub reboot: Reboot,
    /// A package step: resolved on the host before it is dry-run.
    #[serde(default)]
    pub packages: Option<Packages>,
    /// The roles it is for; empty: every role. The agent refuses it on a
    /// host whose own role (its `--role`) is not one of them, or unknown.
    #[serde(default)]
    pub only_roles: Vec<String>,
}

/// One plan step, for real, confined to its write set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunStep {
    /// The rollout.
    pub rollout_id: String,
    /// The step; its `writes` are this host's.
    pub step: Step,
    /// Write-set paths its dry-run created as directories.
    pub create_dirs: Vec<String>,
    /// Likewise, as files.
    pub create_files: Vec<String>,
    /// Paths that stay read-only inside the write set.
    pub untouchable: Vec<String>,
}

/// Steps to dry-run, in order, in one sandbox.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DryRun {
    /// The rollout.
    pub rollout_id: String,
    /// The steps.
    pub steps: Vec<Step>,
    /// Paths bound read-only.
    pub untouchable: Vec<String>,
    /// Staging caches of this host's fetches, laid over the host.
    pub fetch_stages: Vec<String>,
}

/// A step's fetch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fetch {
    /// The rollout.
    pub rollout_id: String,
    /// The step.
    pub step_name: String,
    /// Command line.
    pub run: String,
    /// The only paths it may write.
    pub writes: Vec<String>,
    /// Time limit.
    pub timeout_ms: u64,
    /// Not run again when the write set's digest is this already.
    pub skip_if_digest: String,
    /// At submit: staged, nothing on the host changes.
    pub stage: bool,
    /// After approval: adopt the staging cache with this digest.
    pub adopt_digest: String,
    /// The roles its step is for; empty: every role. The agent refuses the
    /// fetch, as it does the step, on a host of another role.
    pub only_roles: Vec<String>,
}

/// What an agent answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandResult {
    /// The command's id.
    pub command_id: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Exit code (-1 when none).
    pub exit_code: i32,
    /// Wall time.
    pub duration_ms: u64,
    /// SHA-256 of the whole output, hex.
    pub output_sha256: String,
    /// The last part of the output.
    pub output_tail: Vec<u8>,
    /// Per-check results.
    pub checks: Vec<CheckResult>,
    /// Answered from the journal.
    pub replayed: bool,
    /// For people: why it failed, was refused or interrupted.
    pub detail: String,
    /// What it found, by kind of command.
    pub report: Option<Report>,
    /// The host reboots after this step.
    pub reboot_pending: bool,
    /// The agent's boot id.
    pub boot_id: String,
    /// A restore preview: the first paths.
    pub changes: Vec<PathChange>,
    /// A restore preview: how many in all.
    pub changes_total: u64,
}

impl CommandResult {
    /// A result with nothing but an id, an outcome and a sentence.
    pub fn new(command_id: impl Into<String>, outcome: Outcome, detail: impl Into<String>) -> CommandResult {
        CommandResult {
            command_id: command_id.into(),
            outcome,
            exit_code: if outcome == Outcome::Ok { 0 } else { -1 },
            duration_ms: 0,
            output_sha256: String::new(),
            output_tail: Vec::new(),
            checks: Vec::new(),
            replayed: false,
            detail: detail.into(),
            report: None,
            reboot_pending: false,
            boot_id: String::new(),
            changes: Vec::new(),
            changes_total: 0,
        }
    }

    /// Whether it ended well.
    pub fn ok(&self) -> bool {
        self.outcome == Outcome::Ok
    }
}

/// One health check's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckResult {
    /// Check name.
    pub name: String,
    /// Passed.
    pub ok: bool,
    /// What was seen.
    pub detail: String,
}

/// What a command found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    /// A dry-run's reports, one per step.
    DryRun(Vec<StepReport>),
    /// A snapshot as taken.
    Snapshot(SnapshotSummary),
    /// A fetch's result.
    Fetch(FetchReport),
}

/// A snapshot as the agent took it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotSummary {
    /// Paths in it.
    pub files: u64,
    /// Bytes it keeps.
    pub bytes: u64,
    /// The write-set paths it holds.
    pub roots: Vec<String>,
    /// One line for people.
    pub describe: String,
    /// One part per filesystem.
    pub parts: Vec<SnapshotPart>,
}

/// A fetch's result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchReport {
    /// SHA-256 of its write set afterwards.
    pub digest: String,
    /// Whether it ran.
    pub ran: bool,
    /// At submit: the staging cache's key.
    pub stage: String,
    /// After approval: the staged fetch was put in place.
    pub adopted: bool,
}

/// Output of a running command, as the agent sends it. Offsets make a
/// chunk sent twice harmless.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputChunk {
    /// The command's id.
    pub command_id: String,
    /// Bytes of combined stdout and stderr.
    pub data: Vec<u8>,
    /// Where `data` starts in the command's whole output.
    pub offset: u64,
    /// Bytes skipped right before this chunk.
    pub dropped: u64,
    /// The rollout it belongs to (empty: none).
    pub rollout_id: String,
    /// The step, fetch or check it is the output of.
    pub step: String,
}

/// What is stored of one host's output of one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputSummary {
    /// Host.
    pub host: String,
    /// Step, fetch or check.
    pub step: String,
    /// Bytes stored.
    pub stored: u64,
    /// Whether it is the whole output ("" while the step runs).
    pub verified: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_none() {
        for o in [
            Outcome::Ok,
            Outcome::Failed,
            Outcome::TimedOut,
            Outcome::Interrupted,
            Outcome::Refused,
        ] {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
        }
        assert_eq!(Outcome::parse("unknown"), None);
        for b in SnapshotBackend::ALL {
            assert_eq!(SnapshotBackend::parse(b.as_str()), Some(b));
        }
        assert_eq!(SnapshotBackend::parse("zfs"), None);
    }
}
