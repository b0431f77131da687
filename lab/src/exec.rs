//! `lab exec`: a command on a lab host as its steps see it (its own root,
//! the machine's system directories read-only), run through the agent's own
//! step supervisor.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use wavegate_agent::journal::{self, Job, Mode};

/// Quote an argument for /bin/sh.
pub(crate) fn sh_quote(a: &str) -> String {
    if !a.is_empty()
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return a.to_owned();
    }
    format!("'{}'", a.replace('\'', "'\\''"))
}

/// `lab exec`: one command on one host, through the agent's own supervisor
/// (the way the agent runs anything on its host).
pub(crate) fn exec(dir: &Path, host: &str, agent_bin: Option<PathBuf>, cmd: &[String]) -> Result<u8> {
    let (code, output, detail) = exec_output(dir, host, agent_bin, cmd)?;
    use std::io::Write as _;
    std::io::stdout().write_all(&output)?;
    if code != 0 && !detail.is_empty() {
        eprintln!("wavegate lab exec: {detail}");
    }
    Ok(code)
}

/// Run a command on a lab host as its steps see it; returns its exit
/// status, its output and, when it failed, why.
pub fn exec_output(
    dir: &Path,
    host: &str,
    agent_bin: Option<PathBuf>,
    cmd: &[String],
) -> Result<(u8, Vec<u8>, String)> {
    if let Some(hosts) = crate::container::ssh_hosts(dir) {
        if !hosts.iter().any(|h| h == host) {
            bail!("{} has no host `{host}`", dir.display());
        }
        // A booted host is reached the way an operator reaches it.
        return crate::container::ssh_exec(dir, host, cmd);
    }
    let host_dir = dir.join("hosts").join(host);
    let root = host_dir.join("root");
    if !root.is_dir() {
        bail!("{} has no host `{host}` (no {})", dir.display(), root.display());
    }
    let agent = match agent_bin {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .map(|p| p.join("wavegate-agent"))
            .unwrap_or_default(),
    };
    let job_dir =
        host_dir
            .join("agent")
            .join("lab-exec")
            .join(format!("{}-{:x}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&job_dir)?;
    let run = cmd.iter().map(|a| sh_quote(a)).collect::<Vec<_>>().join(" ");
    // The job as the agent's supervisor reads it (`wavegate-agent exec-step
    // DIR` reads `DIR/job.json` as a `Job` and writes `DIR/result.json`).
    let job = Job::new(
        &format!("lab-exec-{}", job_dir.display()),
        &run,
        600_000,
        &root,
        Mode::Plain,
    );
    std::fs::write(job_dir.join("job.json"), serde_json::to_vec(&job)?)?;
    let status = std::process::Command::new(&agent)
        .arg("exec-step")
        .arg(&job_dir)
        .status()
        .with_context(|| format!("starting {}", agent.display()))?;
    let output = std::fs::read(job_dir.join("output.log")).unwrap_or_default();
    let result = journal::result(&job_dir);
    let _ = std::fs::remove_dir_all(&job_dir);
    if !status.success() {
        // Its detail quoted, or `null` when it wrote no result.
        let detail = serde_json::Value::from(result.as_ref().map(|r| r.detail.as_str()));
        bail!("the agent's supervisor failed on {host}: {detail}");
    }
    let Some(result) = result else {
        return Ok((1, output, String::new()));
    };
    Ok((u8::try_from(result.exit_code).unwrap_or(1), output, result.detail))
}
