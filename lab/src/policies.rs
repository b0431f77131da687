//! The lab's own copy of the shipped policies.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// The lab's own copy of the shipped policies, written to `DIR/policies` so
/// it can be read: every rule as shipped, except that the bake minimum is
/// lifted, because lab plans bake for seconds, not minutes.
pub fn lab_policies(dir: &Path) -> Result<PathBuf> {
    let out = dir.join("policies");
    std::fs::create_dir_all(&out)?;
    for (name, text) in wavegate_domain::policy::SHIPPED {
        let file = Path::new(name)
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("default.yaml"));
        let lab = text.replace(
            "    min: 5m\n",
            "    # lab: lowered from the shipped 5m, so lab plans may bake for seconds\n    min: 0s\n",
        );
        std::fs::write(out.join(file), lab)?;
    }
    Ok(out)
}
