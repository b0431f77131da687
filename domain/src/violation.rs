//! Violations: every problem `plan check` (and a refused submission) reports.
//!
//! The codes are a contract with operators and with tests outside this
//! repository (`FORMATS.md`): add codes, never rename or drop one.

use std::fmt;

use serde::{Serialize, Serializer};

/// A stable violation code.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Code {
    /// No targets, or they resolve to nothing.
    TargetsMissing,
    /// A host id the inventory does not know.
    UnknownHost,
    /// A group no host of the inventory is in.
    UnknownGroup,
    /// A label (key and value) no host of the inventory carries.
    UnknownLabel,
    /// The resolved target count differs from `expect_count`.
    ExpectCountMismatch,
    /// A step has no `writes`.
    WritesMissing,
    /// A `writes` path is relative, `/`, or otherwise refused.
    WritesInvalid,
    /// A host and a host backing it up share a wave.
    PairSameWave,
    /// A backup is in a wave before its primary's.
    BackupBeforePrimary,
    /// The inventory itself is invalid (cycle, self-backup, duplicate id, ...).
    InventoryInvalid,
    /// Explicit waves that do not place every target exactly once, or name a
    /// host that is not a target. (Added by wavegate; not in the first contract.)
    WaveInvalid,
    /// `approvals` below one: nobody but the submitter would see the plan.
    /// (Added by wavegate; not in the first contract.)
    ApprovalsInvalid,
    /// A step names the roles it is for (`only_roles`) and a target has
    /// another. (Added by wavegate; not in the first contract.)
    RoleMismatch,
    /// A target's backup is fed by a live mirror that can be neither paused
    /// nor snapshotted, and the plan does not accept that by name. (Added
    /// by wavegate; not in the first contract.)
    MirrorUnguarded,
    /// A wave is expected to take longer than any maintenance window that
    /// applies to it leaves. (Added by wavegate; not in the first contract.)
    WindowUnfit,
    /// A site policy refused the plan; carries the rule id.
    Policy(String),
    /// Not valid YAML, a wrong type, an unknown field, a malformed value.
    ParseError,
}

impl Code {
    /// The code as operators and JSON consumers see it.
    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        use std::borrow::Cow::Borrowed;
        match self {
            Code::TargetsMissing => Borrowed("targets-missing"),
            Code::UnknownHost => Borrowed("unknown-host"),
            Code::UnknownGroup => Borrowed("unknown-group"),
            Code::UnknownLabel => Borrowed("unknown-label"),
            Code::ExpectCountMismatch => Borrowed("expect-count-mismatch"),
            Code::WritesMissing => Borrowed("writes-missing"),
            Code::WritesInvalid => Borrowed("writes-invalid"),
            Code::PairSameWave => Borrowed("pair-same-wave"),
            Code::BackupBeforePrimary => Borrowed("backup-before-primary"),
            Code::InventoryInvalid => Borrowed("inventory-invalid"),
            Code::WaveInvalid => Borrowed("wave-invalid"),
            Code::ApprovalsInvalid => Borrowed("approvals-invalid"),
            Code::RoleMismatch => Borrowed("role-mismatch"),
            Code::MirrorUnguarded => Borrowed("mirror-unguarded"),
            Code::WindowUnfit => Borrowed("window-unfit"),
            Code::Policy(id) => std::borrow::Cow::Owned(format!("policy:{id}")),
            Code::ParseError => Borrowed("parse-error"),
        }
    }

    /// Whether this code means "the input could not be read as a plan at all"
    /// (exit 2) rather than "a safety gate refused it" (exit 3).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Code::ParseError)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

impl Code {
    /// Parse a contract string back into a code.
    pub fn parse(s: &str) -> Option<Code> {
        if let Some(id) = s.strip_prefix("policy:") {
            return Some(Code::Policy(id.to_owned()));
        }
        [
            Code::TargetsMissing,
            Code::UnknownHost,
            Code::UnknownGroup,
            Code::UnknownLabel,
            Code::ExpectCountMismatch,
            Code::WritesMissing,
            Code::WritesInvalid,
            Code::PairSameWave,
            Code::BackupBeforePrimary,
            Code::InventoryInvalid,
            Code::WaveInvalid,
            Code::ApprovalsInvalid,
            Code::RoleMismatch,
            Code::MirrorUnguarded,
            Code::WindowUnfit,
            Code::ParseError,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

impl<'de> serde::Deserialize<'de> for Code {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Code, D::Error> {
        let s = String::deserialize(d)?;
        Code::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown violation code `{s}`")))
    }
}

impl Serialize for Code {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_str())
    }
}

/// Where in an operator's file something is. Line and column count from 1;
/// either may be unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loc {
    /// The file as the operator named it.
    pub file: Option<String>,
    /// 1-based line, when known.
    pub line: Option<u64>,
    /// 1-based column, when known.
    pub column: Option<u64>,
}

impl Loc {
    /// A whole file, or a key missing from it: its first line and column,
    /// where a missing top-level key belongs. Every problem has a place.
    pub fn file(file: &str) -> Loc {
        Loc {
            file: Some(file.to_owned()),
            line: Some(1),
            column: Some(1),
        }
    }

    /// A position in a file; zero means unknown (serde-saphyr's convention).
    pub fn at(file: &str, line: u64, column: u64) -> Loc {
        Loc {
            file: Some(file.to_owned()),
            line: (line > 0).then_some(line),
            column: (line > 0 && column > 0).then_some(column),
        }
    }
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line, self.column) {
            (Some(file), Some(l), Some(c)) => write!(f, "{file}:{l}:{c}"),
            (Some(file), Some(l), None) => write!(f, "{file}:{l}"),
            (Some(file), None, _) => f.write_str(file),
            (None, _, _) => f.write_str("<input>"),
        }
    }
}

/// One problem, with everything an operator needs to fix it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Violation {
    /// Stable code.
    pub code: Code,
    /// What is wrong, in a sentence.
    pub message: String,
    /// Hosts involved, sorted; empty when none.
    pub hosts: Vec<String>,
    /// File the problem is in, when known.
    pub file: Option<String>,
    /// 1-based line, when known.
    pub line: Option<u64>,
    /// 1-based column, when known.
    pub column: Option<u64>,
    /// The field, as a path into the document (`steps[0].writes`), when known.
    pub field: Option<String>,
    /// What to write instead.
    pub fix: Option<String>,
}

impl Violation {
    /// A violation with a code and a message; add the rest with the builders.
    pub fn new(code: Code, message: impl Into<String>) -> Violation {
        Violation {
            code,
            message: message.into(),
            hosts: Vec::new(),
            file: None,
            line: None,
            column: None,
            field: None,
            fix: None,
        }
    }

    /// Where it is.
    pub fn at(mut self, loc: &Loc) -> Violation {
        self.file = loc.file.clone();
        self.line = loc.line;
        self.column = loc.column;
        self
    }

    /// The hosts involved (sorted and deduplicated here).
    pub fn hosts<I, S>(mut self, hosts: I) -> Violation
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.hosts = hosts.into_iter().map(Into::into).collect();
        self.hosts.sort();
        self.hosts.dedup();
        self
    }

    /// The field path.
    pub fn field(mut self, field: impl Into<String>) -> Violation {
        self.field = Some(field.into());
        self
    }

    /// What would fix it.
    pub fn fix(mut self, fix: impl Into<String>) -> Violation {
        self.fix = Some(fix.into());
        self
    }

    /// The location as one value.
    pub fn loc(&self) -> Loc {
        Loc {
            file: self.file.clone(),
            line: self.line,
            column: self.column,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: [{}] {}", self.loc(), self.code, self.message)?;
        if let Some(field) = &self.field {
            write!(f, " (field `{field}`)")?;
        }
        if !self.hosts.is_empty() {
            write!(f, "\n    hosts: {}", self.hosts.join(", "))?;
        }
        if let Some(fix) = &self.fix {
            write!(f, "\n    fix: {fix}")?;
        }
        Ok(())
    }
}

/// The exit status a set of violations maps to (FORMATS.md): 0 when there are
/// none, 2 when any is bad input, 3 otherwise.
pub fn exit_status(violations: &[Violation]) -> u8 {
    if violations.is_empty() {
        0
    } else if violations.iter().any(|v| v.code.is_bad_input()) {
        2
    } else {
        3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialise_as_contract_strings() {
        let v = Violation::new(Code::Policy("canary-size".into()), "too big");
        let json = serde_json::to_value(&v).expect("serialises");
        assert_eq!(json["code"], "policy:canary-size");
        let back: Violation = serde_json::from_value(json).expect("deserialises");
        assert_eq!(back, v);
        assert_eq!(
            Code::parse(&Code::BackupBeforePrimary.to_string()),
            Some(Code::BackupBeforePrimary)
        );
        assert_eq!(Code::PairSameWave.to_string(), "pair-same-wave");
    }

    #[test]
    fn bad_input_wins_over_refusal() {
        let refused = Violation::new(Code::TargetsMissing, "x");
        let bad = Violation::new(Code::ParseError, "y");
        assert_eq!(exit_status(&[]), 0);
        assert_eq!(exit_status(std::slice::from_ref(&refused)), 3);
        assert_eq!(exit_status(&[refused, bad]), 2);
    }

    #[test]
    fn zero_position_is_unknown() {
        let loc = Loc::at("f.yaml", 0, 0);
        assert_eq!(loc.line, None);
        assert_eq!(loc.to_string(), "f.yaml");
        assert_eq!(Loc::at("f.yaml", 3, 7).to_string(), "f.yaml:3:7");
    }
}
