//! Loading site policies: a directory given by the operator, or the default
//! set shipped in `policies/` and built into the binary.

use std::path::{Path, PathBuf};

use wavegate_domain::{Code, Loc, PolicySet, Source, Violation};

pub use wavegate_domain::policy::SHIPPED;
pub use wavegate_operator::policies::PolicySource;

/// Read policy files; an unreadable directory or file is a `parse-error`
/// violation (bad input), like a broken file.
pub fn load(source: &PolicySource) -> Result<PolicySet, Vec<Violation>> {
    match source {
        PolicySource::Shipped => {
            let files: Vec<Source<'_>> = SHIPPED.iter().map(|(name, text)| Source { name, text }).collect();
            PolicySet::parse(&files)
        }
        PolicySource::Dir(dir) => {
            let texts = read_dir(dir)?;
            let files: Vec<Source<'_>> = texts.iter().map(|(name, text)| Source { name, text }).collect();
            PolicySet::parse(&files)
        }
    }
}

fn unreadable(path: &Path, err: impl std::fmt::Display, fix: &str) -> Violation {
    let name = path.display().to_string();
    Violation::new(Code::ParseError, format!("cannot read {name}: {err}"))
        .at(&Loc::file(&name))
        .fix(fix)
}

fn read_dir(dir: &Path) -> Result<Vec<(String, String)>, Vec<Violation>> {
    let fix = "give --policies a directory of policy YAML files (see docs/policy-reference.md)";
    let entries = std::fs::read_dir(dir).map_err(|e| vec![unreadable(dir, e, fix)])?;
    let mut paths: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| vec![unreadable(dir, e, fix)])?;
        let path = entry.path();
        let is_yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if is_yaml && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    if paths.is_empty() {
        return Err(vec![unreadable(dir, "no *.yaml policy files in it", fix)]);
    }
    let mut out = Vec::with_capacity(paths.len());
    let mut problems = Vec::new();
    for p in paths {
        match std::fs::read_to_string(&p) {
            Ok(text) => out.push((p.display().to_string(), text)),
            Err(e) => problems.push(unreadable(
                &p,
                e,
                "make the file readable, or move it out of the policy directory",
            )),
        }
    }
    if problems.is_empty() { Ok(out) } else { Err(problems) }
}
