//! A lab host's root directory: its own /etc, /home, /srv, /var and /tmp,
//! and the machine's system directories, which it sees read-only.

use std::path::Path;

use anyhow::{Context, Result};

/// System directories a lab host sees read-only from the machine.
pub const SYSTEM_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];
const OWN_DIRS: &[&str] = &[
    "etc", "home", "srv", "var", "var/log", "var/tmp", "var/lib", "tmp", "root", "run", "opt", "dev", "proc",
];
const ETC_SEED: &[&str] = &["passwd", "group", "hosts", "nsswitch.conf", "resolv.conf", "os-release"];

/// Create a host root if it does not exist yet (files already there stay).
pub(crate) fn host_root(root: &Path) -> Result<()> {
    for d in OWN_DIRS {
        std::fs::create_dir_all(root.join(d))?;
    }
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    for d in SYSTEM_DIRS {
        let machine = Path::new("/").join(d);
        let here = root.join(d);
        if here.symlink_metadata().is_ok() {
            continue;
        }
        match std::fs::read_link(&machine) {
            // Merged /usr: /bin -> usr/bin and the like.
            Ok(target) => std::os::unix::fs::symlink(target, &here)?,
            Err(_) if machine.is_dir() => std::fs::create_dir_all(&here)?,
            Err(_) => {}
        }
    }
    for f in ETC_SEED {
        let src = Path::new("/etc").join(f);
        let dst = root.join("etc").join(f);
        if !dst.exists() && src.exists() {
            std::fs::copy(&src, &dst).with_context(|| format!("seeding {}", dst.display()))?;
        }
    }
    Ok(())
}
