//! The lab: a controller and one agent per inventory host on this machine
//! (`wavegate lab ...`), the demo told in one (`wavegate demo`), and the
//! local package repository the demo and the tests use. Each host has its
//! own root directory, laid out as FORMATS.md's "Lab layout" says. It never
//! touches the machine's own files: hosts see the machine's system
//! directories read-only and their own /etc, /home, /srv, /var and /tmp.
//!
//! The `wavegate` binary carries it through its cargo feature `lab` (on by
//! default); the build the systemd units deploy leaves it out, so that
//! build neither compiles nor links anything here.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::Result;

pub mod boot;
pub mod certs;
pub mod command;
pub mod container;
pub mod demo;
pub mod disks;
pub mod etcd;
pub mod exec;
pub mod fake;
pub mod hosts;
pub mod image;
pub mod policies;
pub mod processes;
pub mod repo;
pub mod status;
pub mod up;
pub mod vm;

pub use command::{LabCommand, run};
pub use policies::lab_policies;

/// Run a command to its end (no stdin); its stdout, or an error saying
/// `what` failed with everything it printed.
pub(crate) fn run_command(cmd: &mut std::process::Command, what: &str) -> Result<Vec<u8>> {
    use anyhow::Context as _;
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        anyhow::bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// `p`, made absolute against the current directory.
fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}
