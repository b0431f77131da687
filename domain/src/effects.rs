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
        s
    }
}
