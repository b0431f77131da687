//! The lab's processes: starting the controllers and the hosts in the
//! background, finding every process of a lab, and stopping them all.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};

pub(crate) fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<u32> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let child = std::process::Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        // Its own process group: it outlives this command and ignores the
        // terminal's signals; `lab down` stops it.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(child.id())
}

/// Processes whose command line mentions the lab directory (the controller,
/// the agents and any step they left running).
pub(crate) fn running(dir: &Path) -> Result<Vec<i32>> {
    let needle = dir.display().to_string();
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        // Not a lab command run by hand (this one, or an `up` or `status`);
        // the hosts' own `lab boot` processes are the lab's.
        let by_hand = [" lab up ", " lab down ", " lab status ", " lab exec "]
            .iter()
            .any(|c| cmdline.contains(c));
        if cmdline.contains(&needle) && !by_hand {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Processes whose root directory lies in the lab directory: a container
/// host's, or a step's.
fn rooted(dir: &Path) -> Vec<i32> {
    let needle = format!("{}/", dir.display());
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(root) = std::fs::read_link(entry.path().join("root"))
            && format!("{}/", root.display()).starts_with(&needle)
        {
            pids.push(pid);
        }
    }
    pids
}

/// Stop every process of the lab: SIGTERM, then SIGKILL after 5 s (30 s
/// for container hosts, which shut down through systemd), then whatever
/// still runs inside a host's root.
pub fn down(dir: &Path) -> Result<usize> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pids = running(dir)?;
    for p in &pids {
        let _ = kill(Pid::from_raw(*p), Signal::SIGTERM);
    }
    let grace = if dir.join("containers.json").exists() { 30 } else { 5 };
    let deadline = std::time::Instant::now() + Duration::from_secs(grace);
    loop {
        let left = running(dir)?;
        if left.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            for p in left {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = rooted(dir);
        if left.is_empty() || std::time::Instant::now() > deadline {
            break;
        }
        for p in left {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(pids.len())
}
