//! `wavegate-agent`: the agent daemon, and (internally) the step supervisor.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The wavegate agent: dials the controller and runs what it is sent.
#[derive(Debug, Parser)]
#[command(name = "wavegate-agent", version, about)]
struct Args {
    /// Controller URL, like https://controller.example:7443; for a group
    /// of controllers sharing one store, every one of them, comma-separated
    /// (the agent finds the leader).
    #[arg(long, env = "WAVEGATE_CONTROLLER")]
    controller: String,
    /// CA certificate.
    #[arg(long, env = "WAVEGATE_CA")]
    ca: Option<PathBuf>,
    /// This agent's certificate (it names the host).
    #[arg(long, env = "WAVEGATE_CERT")]
    cert: Option<PathBuf>,
    /// This agent's key.
    #[arg(long, env = "WAVEGATE_KEY")]
    key: Option<PathBuf>,
    /// Connect without TLS. For local development only.
    #[arg(long)]
    insecure_plaintext_for_local_dev: bool,
    /// This host's id in the inventory.
    #[arg(long, env = "WAVEGATE_HOST_ID")]
    host_id: String,
    /// This host's role (primary, backup or standalone), set here on the
    /// host and never taken from the controller: a step that names the
    /// roles it is for (`only_roles`) runs only when this is one of them,
    /// and never on an agent that was not told.
    #[arg(long, env = "WAVEGATE_ROLE", value_parser = parse_role)]
    role: Option<wavegate_domain::fleet::Role>,
    /// Root directory under which every step and exec check runs.
    #[arg(long, default_value = "/")]
    host_root: PathBuf,
    /// Where the journal lives.
    #[arg(long, default_value = "/var/lib/wavegate-agent")]
    state_dir: PathBuf,
    /// Read this boot's id from this file instead of
    /// /proc/sys/kernel/random/boot_id (a lab host's own boots).
    #[cfg(feature = "lab")]
    #[arg(long, hide = true)]
    boot_id_file: Option<PathBuf>,
    /// Reboot by exiting for the lab to start the agent again, instead of
    /// rebooting the machine. Only `wavegate lab` uses it.
    #[cfg(feature = "lab")]
    #[arg(long, hide = true)]
    lab_reboot: bool,
}

fn parse_role(word: &str) -> Result<wavegate_domain::fleet::Role, String> {
    wavegate_domain::fleet::Role::parse(word)
        .ok_or_else(|| format!("`{word}` is not a role: write primary, backup or standalone"))
}

/// `wavegate-agent snapshot ...`: a host's snapshots by hand, for an
/// operator whose controller is gone (the agent does the same when told).
#[derive(Debug, Parser)]
#[command(name = "wavegate-agent snapshot")]
struct SnapshotArgs {
    #[command(subcommand)]
    cmd: SnapshotCmd,
}

#[derive(Debug, clap::Subcommand)]
enum SnapshotCmd {
    /// Restore a rollout's snapshot over its write set (built beside the
    /// live files, checked, then swapped in).
    Restore {
        /// The agent's state directory.
        #[arg(long, default_value = "/var/lib/wavegate-agent")]
        state_dir: PathBuf,
        /// The host root.
        #[arg(long, default_value = "/")]
        host_root: PathBuf,
        /// This host's id (a snapshot is only restored on its own host).
        #[arg(long)]
        host_id: String,
        /// The rollout whose snapshot it is.
        #[arg(long)]
        rollout: String,
    },
    /// Finish or undo every restore that was interrupted (the agent does
    /// this when it starts).
    Recover {
        /// The agent's state directory.
        #[arg(long, default_value = "/var/lib/wavegate-agent")]
        state_dir: PathBuf,
        /// The host root.
        #[arg(long, default_value = "/")]
        host_root: PathBuf,
    },
}

fn snapshot_cmd(argv: &[String]) -> ExitCode {
    let args = match SnapshotArgs::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    let res = match args.cmd {
        SnapshotCmd::Restore {
            state_dir,
            host_root,
            host_id,
            rollout,
        } => wavegate_agent::snapshot::restore(&state_dir, &host_id, &host_root, &rollout)
            .map(|m| println!("restored from the snapshot: {}", m.describe())),
        SnapshotCmd::Recover { state_dir, host_root } => {
            wavegate_agent::snapshot::recover(&state_dir, &host_root).map(|()| println!("no restore is left half done"))
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wavegate-agent snapshot: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("jail") {
        // The step's jail (see `jail`): it execs the step, or says why not.
        let Some(spec) = argv.get(2) else {
            eprintln!("usage: wavegate-agent jail SPEC");
            return ExitCode::from(2);
        };
        let Err(e) = wavegate_agent::jail::enter(std::path::Path::new(spec));
        eprintln!("{} {e:#}", wavegate_agent::jail::SETUP_FAILED_LINE);
        return ExitCode::from(wavegate_agent::jail::SETUP_FAILED as u8);
    }
    if argv.get(1).map(String::as_str) == Some("exec-step") {
        // Steps create files the way root's shell would (0644, 0755),
        // whatever the agent's own umask.
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
        // The step supervisor: synchronous and single-threaded, because it
        // enters a mount namespace.
        let Some(dir) = argv.get(2) else {
            eprintln!("usage: wavegate-agent exec-step JOB_DIR");
            return ExitCode::from(2);
        };
        return match wavegate_agent::runner::exec(std::path::Path::new(dir)) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("wavegate-agent exec-step: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    // The agent's own files (journal, snapshots, archives that hold
    // customers' private files) are readable by root alone, whoever starts
    // it and whatever its unit says.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    // A walk holds a handle per directory level; a deep tree must not run
    // out of them (the soft limit is often 1024, the hard one far more).
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if nofile.current < nofile.maximum {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: nofile.maximum,
                maximum: nofile.maximum,
            },
        );
    }
    if argv.get(1).map(String::as_str) == Some("snapshot") {
        return snapshot_cmd(&argv[1..]);
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let tls = match (args.ca, args.cert, args.key, args.insecure_plaintext_for_local_dev) {
        (Some(ca), Some(cert), Some(key), false) => Some((ca, cert, key)),
        (_, _, _, true) => None,
        _ => {
            eprintln!("wavegate-agent: give --ca, --cert and --key, or --insecure-plaintext-for-local-dev");
            return ExitCode::from(2);
        }
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("wavegate-agent: cannot find its own binary: {e}");
            return ExitCode::from(1);
        }
    };
    #[cfg(feature = "lab")]
    let (boot_id_file, lab_reboot) = (args.boot_id_file.as_deref(), args.lab_reboot);
    #[cfg(not(feature = "lab"))]
    let (boot_id_file, lab_reboot) = (None, false);
    let boot_id = match wavegate_agent::session::boot_id(boot_id_file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("wavegate-agent: {e:#}");
            return ExitCode::from(1);
        }
    };
    let cfg = wavegate_agent::session::Config {
        boot_id,
        lab_reboot,
        exe,
        controller: String::new(),
        controllers: args
            .controller
            .split(',')
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect(),
        tls,
        host_id: args.host_id,
        role: args.role,
        host_root: args.host_root,
        state_dir: args.state_dir,
    };
    if let Err(e) = wavegate_agent::snapshot::private_dir(&cfg.state_dir) {
        eprintln!("wavegate-agent: the state directory: {e:#}");
        return ExitCode::from(1);
    }
    // A restore that was cut short (the agent killed mid-way) is finished
    // before anything else: the write set is never left half restored.
    if let Err(e) = wavegate_agent::snapshot::recover(&cfg.state_dir, &cfg.host_root) {
        tracing::error!("an interrupted restore could not be finished: {e:#}");
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wavegate-agent: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(wavegate_agent::session::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wavegate-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    #[test]
    fn the_agent_units_command_line_parses() {
        let unit = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/wavegate-agent.service"),
        )
        .expect("unit");
        let exec = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("ExecStart");
        // %H is the unit's host name specifier; any valid id stands in for it.
        let args: Vec<String> = exec.split_whitespace().map(|a| a.replace("%H", "p09")).collect();
        if let Err(e) = super::Args::try_parse_from(&args) {
            panic!("deploy/systemd/wavegate-agent.service runs a command the agent does not accept:\n{e}");
        }
    }
}
