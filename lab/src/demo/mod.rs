//! `wavegate demo`: a small hosting provider in a lab on this machine, and
//! three stories told with a live, plain-text display (it works in a pipe):
//! a good fix rolls out in canary waves, backups last; the 2012 update
//! program is refused by its dry-run; a plan that breaks a site halts on its
//! canary and the canary is rolled back. Everything lives in a temporary
//! lab directory, removed at the end; the machine's own files are never
//! touched.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use wavegate_operator::policies::PolicyArgs;

use crate::disks::{FsSpec, unmount_all};
use crate::processes::down;
use crate::up::{HostKind, up_kind};

mod provider;

pub use provider::update_2012;
mod stories;

/// Flags of `wavegate demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the lab running at the end (to browse the web view); stop it
    /// later with `wavegate lab down --dir DIR`.
    #[arg(long)]
    pub keep: bool,
    /// Where to build the lab (default: a new directory under /tmp).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// What each host is: `dir` (a directory; the fastest) or `container`
    /// (a systemd-nspawn container booted with systemd, running real nginx
    /// and postfix, its agent installed over ssh and run by its unit).
    #[arg(long, value_enum, default_value_t = HostKind::Dir)]
    pub hosts: HostKind,
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// What this machine lacks for the demo, each with how to get it.
fn preflight(kind: HostKind) -> Vec<String> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root: the lab's hosts run in mount, PID and network namespaces; run `sudo wavegate demo`".into());
    }
    if !std::fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .contains("overlay")
    {
        missing.push(
            "overlayfs, for the dry-run sandbox: run `modprobe overlay` (or use a kernel with CONFIG_OVERLAY_FS)"
                .into(),
        );
    }
    for (cmd, pkg) in [
        ("unshare", "util-linux"),
        ("chroot", "coreutils"),
        ("mount", "mount"),
        ("mkfs.ext4", "e2fsprogs"),
        ("dpkg-deb", "dpkg"),
        ("apt-get", "apt"),
        ("apt-ftparchive", "apt-utils"),
    ] {
        if !on_path(cmd) {
            missing.push(format!("`{cmd}`: install it with `apt-get install {pkg}`"));
        }
    }
    if kind == HostKind::Container {
        for (cmd, pkg) in [
            ("systemd-nspawn", "systemd-container"),
            ("mmdebstrap", "mmdebstrap"),
            ("ip", "iproute2"),
            ("ssh", "openssh-client"),
        ] {
            if !on_path(cmd) {
                missing.push(format!("`{cmd}`: install it with `apt-get install {pkg}`"));
            }
        }
    }
    missing
}

/// Run the demo; returns the exit status.
pub async fn run(args: DemoArgs) -> Result<u8> {
    if args.hosts == HostKind::Vm {
        eprintln!(
            "wavegate demo runs on dir or container hosts (20 VMs under TCG would take minutes to boot); `wavegate lab up --hosts vm` makes a lab of VMs"
        );
        return Ok(2);
    }
    let missing = preflight(args.hosts);
    if !missing.is_empty() {
        eprintln!("wavegate demo cannot run on this machine; it needs:");
        for m in &missing {
            eprintln!("  - {m}");
        }
        return Ok(1);
    }
    let dir = args
        .dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("wavegate-demo-{}", std::process::id())));
    if dir.exists() {
        bail!("{} exists; give --dir a new directory", dir.display());
    }
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    println!(
        "wavegate demo: a small hosting provider in a lab under {}",
        dir.display()
    );
    println!("(20 hosts: 8 shared-hosting servers w01-w08, a backup for each bk01-bk08 in another rack,");
    println!(" name servers, a mail relay and a management host. Each keeps its customers' /home on an");
    println!(" ext4 filesystem of its own, on a loop device; nothing outside that directory is touched)");
    if args.hosts == HostKind::Container {
        println!("(every host is a container booted with systemd as PID 1 from a Debian 12 image, running");
        println!(" nginx and postfix; the agent is installed over each host's sshd and run by its unit)");
    }
    println!();
    let fleet_path = dir.join("fleet.yaml");
    std::fs::write(&fleet_path, provider::fleet())?;
    let policies = PolicyArgs { policies: None };
    let homes = FsSpec::parse("/home=ext4").map_err(anyhow::Error::msg)?;
    let status = up_kind(&fleet_path, &dir.join("lab"), &policies, "10s", &[homes], args.hosts).await?;
    if status != 0 {
        bail!("the lab did not start");
    }
    let lab_dir = dir.join("lab");
    let result = stories::stories(&lab_dir).await;
    if args.keep {
        println!(
            "\nThe lab keeps running: `wavegate lab down --dir {}` stops it.",
            lab_dir.display()
        );
    } else {
        down(&lab_dir)?;
        unmount_all(&lab_dir)?;
        crate::container::remove_network(&lab_dir)?;
        let _ = std::fs::remove_dir_all(&dir);
        println!("\nThe lab is stopped and removed (run `wavegate demo --keep` to browse it afterwards).");
    }
    match result {
        Ok(true) => Ok(0),
        Ok(false) => Ok(1),
        Err(e) => {
            eprintln!("wavegate demo: {e:#}");
            Ok(1)
        }
    }
}
