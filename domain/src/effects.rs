//! Dry-run reports: what a step would delete, modify and create on a host,
//! and whether that blocks it. Produced by the agent's sandbox, stored and
//! shown by the controller.

use serde::{Deserialize, Serialize};

/// How many paths each category keeps as a sample.
pub const SAMPLE: usize = 20;

/// One category of effects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Category {
    /// How many paths (for deletions: files).
    pub count: u64,
    /// Bytes involved.
    pub bytes: u64,
    /// Up to [`SAMPLE`] paths.
    pub sample: Vec<String>,
}

impl Category {
    /// Count a path.
    pub fn add(&mut self, path: &str, count: u64, bytes: u64) {
        self.count += count;
        self.bytes += bytes;
        if self.sample.len() < SAMPLE {
            self.sample.push(path.to_owned());
        }
    }
}

/// The dry-run report of one step on one host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReport {
    /// Step name.
    pub step: String,
    /// Whether the real step must not run.
    pub blocked: bool,
    /// Why it is blocked.
    pub reasons: Vec<String>,
    /// Files deleted.
    pub deleted: Category,
    /// Paths modified.
    pub modified: Category,
    /// Paths created.
    pub created: Category,
    /// Effects outside the declared write set (any kind).
    pub outside: Category,
    /// Deleted files outside the write set.
    pub outside_deleted: Category,
    /// The step's exit code in the sandbox (-1 when killed).
    pub exit_code: i32,
    /// Write-set paths created as directories (the confined run makes them).
    pub created_dirs: Vec<String>,
    /// Write-set paths created as files.
    pub created_files: Vec<String>,
    /// Whether the step was killed at its time limit in the sandbox.
    #[serde(default)]
    pub timed_out: bool,
    /// The last lines of its output in the sandbox.
    #[serde(default)]
    pub output_tail: String,
    /// The plan's reason why a failing dry-run is acceptable, when it
    /// failed and that let it pass.
    #[serde(default)]
    pub allowed_failure: Option<String>,
    /// A package step: the packages and versions that would change.
    #[serde(default)]
    pub packages: Vec<PackageChange>,
    /// A package step: its write set on this host (the package manager's
    /// state and the directories of the packages' files), which the real
    /// run is confined to and the snapshot holds.
    #[serde(default)]
    pub implied_writes: Vec<String>,
    /// Service actions the step's maintainer scripts asked for ("restart
    /// nginx.service"): held back in the dry-run, carried out by the agent
    /// after a real run (see the agent's `services`).
    #[serde(default)]
    pub services: Vec<String>,
}

/// One package a package step would change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageChange {
    /// Package name.
    pub name: String,
    /// The version installed now (empty: not installed).
    pub from: String,
    /// The version it would be (empty: removed).
    pub to: String,
}

/// A fetch run before a dry-run: what it did to the host's cache.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRecord {
    /// Its command id.
    pub command_id: String,
    /// ok | failed | timed_out | refused | ...
    pub outcome: String,
    /// Whether it ran (false: the cache still matched the last fetch).
    pub ran: bool,
    /// SHA-256 of the fetch's write set after it.
    pub digest: String,
    /// Exit code, -1 when none.
    pub exit_code: i32,
    /// SHA-256 of its output.
    pub output_sha256: String,
    /// For people.
    pub detail: String,
    /// The key of the staging cache it wrote (a fetch at submit, before
    /// approval: nothing on the host changed); empty when it wrote the
    /// host (after approval) or was adopted.
    #[serde(default)]
    pub stage: String,
}

impl FetchRecord {
    /// Whether the fetch ended well (its record names the outcome; a
    /// name this controller does not know is not well).
    pub fn ok(&self) -> bool {
        crate::command::Outcome::parse(&self.outcome) == Some(crate::command::Outcome::Ok)
    }
}

/// A dry-run report as the controller keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRunRecord {
    /// Host.
    pub host: String,
    /// Step name.
    pub step: String,
    /// Whether it blocked.
    pub blocked: bool,
    /// Why, or why there is no report (agent unreachable, sandbox failed).
    pub reasons: Vec<String>,
    /// The report, when the sandbox produced one.
    pub report: Option<StepReport>,
    /// The fetch that ran (or was found current) right before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<FetchRecord>,
}

impl DryRunRecord {
    /// A line for people: counts and sample paths.
    pub fn summary(&self) -> String {
        let Some(r) = &self.report else {
            return format!("{} / {}: BLOCKED: {}", self.host, self.step, self.reasons.join("; "));
        };
        let mut s = format!(
            "{} / {}: {} — would delete {} files ({} bytes), modify {}, create {}",
            self.host,
            self.step,
            if self.blocked { "BLOCKED" } else { "ok" },
            r.deleted.count,
            r.deleted.bytes,
            r.modified.count,
            r.created.count
        );
        if !r.packages.is_empty() {
            let changes: Vec<String> = r
                .packages
                .iter()
                .map(|p| match (p.from.as_str(), p.to.as_str()) {
                    ("", to) => format!("{} (new) -> {to}", p.name),
                    (from, "") => format!("{} {from} -> removed", p.name),
                    (from, to) => format!("{} {from} -> {to}", p.name),
                })
                .collect();
            s.push_str(&format!("; packages: {}", changes.join(", ")));
            if !r.services.is_empty() {
                s.push_str(&format!(
                    "; its scripts ask to {} (held back here; the agent does it in the real run)",
                    r.services.join(", ")
                ));
            }
            if !r.modified.sample.is_empty() {
                s.push_str(&format!(
                    "; replaces {}",
                    r.modified.sample.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
        if let Some(why) = &r.allowed_failure {
            s.push_str(&format!("; its dry-run exited {}, allowed: {why}", r.exit_code));
        }
        if r.outside.count > 0 {
            s.push_str(&format!(
                "; OUTSIDE the write set: {} effects, {} files deleted, e.g. {}",
                r.outside.count,
                r.outside_deleted.count,
                r.outside.sample.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        if !self.reasons.is_empty() {
            s.push_str(&format!("; {}", self.reasons.join("; ")));
        }
        if self.blocked && !r.output_tail.trim().is_empty() {
            let last: Vec<&str> = r.output_tail.trim_end().lines().rev().take(5).collect();
            let last: Vec<&str> = last.into_iter().rev().collect();
            s.push_str(&format!("; last output: {}", last.join(" | ")));
        }
        s
    }
}
