//! `lab boot`: one lab host's machine. It runs the host's agent with a
//! fresh boot id at every start; when the agent asks for a reboot, every
//! process of the host is killed and the agent starts again in a new boot.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// A new boot id, in the kernel's format.
fn new_boot_id() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Every process of a lab host but the caller: its command line or its root
/// directory lies in the host's directory (every step runs chrooted there).
fn host_processes(host_dir: &Path) -> Vec<i32> {
    let needle = format!("{}/", host_dir.display());
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let root = std::fs::read_link(entry.path().join("root"))
            .map(|r| format!("{}/", r.display()))
            .unwrap_or_default();
        if cmdline.contains(&needle) || root.starts_with(&needle) {
            out.push(pid);
        }
    }
    out
}

/// Whether a process is a zombie (dead, waiting to be reaped).
fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Reap every child that has ended (this process is the host's subreaper,
/// so the host's orphans are its children).
fn reap() {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    while let Ok(s) = waitpid(nix::unistd::Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if s == WaitStatus::StillAlive {
            break;
        }
    }
}

/// `lab boot`: run the host's agent, boot after boot. It is the child
/// subreaper of everything the host starts, so after a reboot no process of
/// the old boot is left, not even as a zombie.
pub(crate) fn boot(host_dir: &Path, boot_id_file: &Path, agent: &[String]) -> Result<u8> {
    use nix::sys::signal::{Signal, kill};
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::Pid;
    let Some((bin, args)) = agent.split_first() else {
        bail!("give the agent's command line after --");
    };
    nix::sys::prctl::set_child_subreaper(true).context("becoming the host's subreaper")?;
    loop {
        std::fs::write(boot_id_file, format!("{}\n", new_boot_id()))
            .with_context(|| format!("writing {}", boot_id_file.display()))?;
        let child = std::process::Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let agent_pid = Pid::from_raw(child.id() as i32);
        // Every child is waited for here (orphans of the host come to this
        // process); the agent's end decides what happens next.
        let code = loop {
            match waitpid(Pid::from_raw(-1), None) {
                Ok(WaitStatus::Exited(pid, code)) if pid == agent_pid => break Some(code),
                Ok(WaitStatus::Signaled(pid, ..)) if pid == agent_pid => break None,
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => bail!("waiting for the agent: {e}"),
            }
        };
        if code != Some(wavegate_agent::session::LAB_REBOOT_EXIT) {
            return Ok(code.and_then(|c| u8::try_from(c).ok()).unwrap_or(1));
        }
        // A reboot: nothing of the host's survives it, not its steps, not
        // what they started; nothing else is touched.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            reap();
            let left: Vec<i32> = host_processes(host_dir).into_iter().filter(|p| !zombie(*p)).collect();
            if left.is_empty() || std::time::Instant::now() > deadline {
                break;
            }
            for p in left {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        reap();
        eprintln!("lab: {} rebooted", host_dir.display());
    }
}
