//! `wavegate completions` and `wavegate man`: shell completions
//! (clap_complete) and man pages (clap_mangen), made from the same command
//! definitions as the CLI itself, so they never drift from it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory as _;

use super::Cli;

/// Print the completion script for `shell` (`wavegate completions bash >
/// /etc/bash_completion.d/wavegate`).
pub fn completions(shell: clap_complete::Shell) -> Result<u8> {
    let mut cmd = Cli::command();
    // Into a buffer first: clap_complete panics when stdout closes early
    // (`| head`), and a closed pipe is not an error.
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "wavegate", &mut buf);
    use std::io::Write as _;
    let _ = std::io::stdout().write_all(&buf);
    Ok(0)
}

/// Write a man page for `wavegate` and every subcommand into `dir`
/// (`wavegate.1`, `wavegate-rollout.1`, `wavegate-rollout-logs.1`...), or
/// print `wavegate.1` when no directory is given.
pub fn man(dir: Option<&Path>) -> Result<u8> {
    let cmd = Cli::command();
    let Some(dir) = dir else {
        clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
        return Ok(0);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    write_pages(&cmd, "wavegate", dir, &mut written)?;
    for p in &written {
        println!("{}", p.display());
    }
    Ok(0)
}

fn write_pages(cmd: &clap::Command, name: &str, dir: &Path, written: &mut Vec<PathBuf>) -> Result<()> {
    let page = cmd.clone().name(name.to_owned());
    let path = dir.join(format!("{name}.1"));
    let mut f = std::fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?;
    clap_mangen::Man::new(page).render(&mut f)?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
